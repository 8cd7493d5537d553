//! What the proxy knows now, as `GET /config` shows it beside its flags: its
//! identity, its inbound policy, and the controller's answer for every
//! destination it watches (the Service, its backends, their endpoints and
//! peer identities, the routes). What a user compares with what the cluster
//! says when traffic goes somewhere unexpected.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::balance::{HashKey, LbConfig};
use crate::control::discovery::Discovery;
use crate::control::view::{BackendView, Resolution};
use crate::identity::Credentials;
use crate::inbound::policy::{Allow, InboundPolicy, Mode, PolicyRx, PortPolicy};
use crate::outbound::route::Rule;

/// Where the admin server reads what the proxy knows (its credentials are
/// the admin state's own).
pub struct Known {
    pub discovery: Option<Arc<Discovery>>,
    pub policy: PolicyRx,
    /// Why the policy's last watch failed, until one answers.
    pub policy_failure: crate::control::policy::LastFailure,
}

impl Known {
    /// What a proxy that is not ready (and not draining) waits for.
    pub fn waiting_for(&self, creds: Option<&Credentials>) -> String {
        if self.policy.borrow().is_none() {
            let mut why = "the control plane's inbound policy for this workload".to_string();
            if let Some(e) = self.policy_failure.get() {
                why.push_str(&format!(" (last watch {e})"));
            }
            return why;
        }
        match creds {
            Some(c) if c.current().is_none() => "the first certificate".into(),
            _ => "the control plane".into(),
        }
    }

    pub fn json(&self, creds: Option<&Credentials>) -> Value {
        let policy = self.policy.borrow().clone();
        json!({
            "identity": creds.map(identity),
            // null: not known yet (nothing is let in until it is).
            "inbound_policy": policy.as_deref().map(inbound),
            "destinations": self.discovery.as_ref().map(|d| {
                d.known().into_iter().map(|k| json!({
                    "destination": k.destination,
                    "controller": if k.away { "unreachable" } else { "answering" },
                    "idle_seconds": k.idle_ms / 1000,
                    // null: no answer yet.
                    "answer": k.answer.as_ref().map(resolution),
                    "remembered": k.remembered.as_ref().map(resolution),
                })).collect::<Vec<_>>()
            }),
        })
    }
}

fn identity(c: &Credentials) -> Value {
    json!({
        "identity": c.identity().as_str(),
        // null: no certificate yet.
        "valid_until": c.valid_until().map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        "expired": c.expired(),
    })
}

fn inbound(p: &InboundPolicy) -> Value {
    let mut ports: Vec<_> = p.ports.iter().collect();
    ports.sort_unstable_by_key(|(port, _)| **port);
    json!({
        "default": port_policy(&p.default),
        "ports": ports.into_iter().map(|(port, pp)| (port.to_string(), port_policy(pp))).collect::<serde_json::Map<_, _>>(),
        "probes": p.probes.iter().map(|pr| json!({
            "port": pr.port,
            "grpc": pr.grpc,
            "target": &*pr.target,
        })).collect::<Vec<_>>(),
    })
}

fn port_policy(p: &PortPolicy) -> Value {
    json!({
        "mtls": match p.mode {
            Mode::Permissive => "PERMISSIVE",
            Mode::Strict => "STRICT",
        },
        // Empty: every identity of the mesh (and, PERMISSIVE, plaintext).
        "allow": p.allow.iter().map(|a| match a {
            Allow::Identity(i) => json!({"identity": i.as_str()}),
            Allow::Namespace { namespace, .. } => json!({"namespace": namespace}),
            Allow::Unreadable => json!("unreadable (matches nobody)"),
        }).collect::<Vec<_>>(),
    })
}

fn resolution(r: &Resolution) -> Value {
    let s = match r {
        Resolution::NotMeshed => return json!("not meshed: passed through"),
        Resolution::Service(s) => s,
    };
    json!({
        "service": &*s.name,
        "opaque": s.opaque,
        "backends": s.backends.iter().map(backend).collect::<Vec<_>>(),
        // None attached: the default route, to the first backend.
        "routes_attached": s.attached,
        "routes": s.routes.iter().map(rule).collect::<Vec<_>>(),
    })
}

fn backend(b: &BackendView) -> Value {
    json!({
        "name": &*b.name,
        "load_balancer": match &b.config.lb {
            LbConfig::PeakEwma => "peak_ewma".to_string(),
            LbConfig::RoundRobin => "round_robin".to_string(),
            LbConfig::ConsistentHash(HashKey::Header(h)) => format!("consistent_hash(header {h})"),
            LbConfig::ConsistentHash(HashKey::Cookie(c)) => format!("consistent_hash(cookie {c})"),
        },
        "connect_timeout": b.config.connect_timeout.map(duration),
        "endpoints": b.endpoints.iter().map(|e| json!({
            "address": e.addr.to_string(),
            // null: not meshed, reached in plaintext.
            "proxy_port": e.proxy.as_ref().map(|p| p.port),
            "identity": e.proxy.as_ref().map(|p| p.identity.as_str()),
            "zone": &e.zone,
        })).collect::<Vec<_>>(),
    })
}

fn rule(r: &Rule) -> Value {
    json!({
        "route": &*r.route,
        "rule": &*r.rule,
        "backends": r.backends.iter().map(|(name, weight)| json!({"name": &**name, "weight": weight})).collect::<Vec<_>>(),
        "request_timeout": r.request_timeout.map(duration),
        "backend_timeout": r.backend_timeout.map(duration),
        "retries": r.retry.attempts,
    })
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
