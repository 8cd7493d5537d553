//! What the controller says of strait's policies and of the HTTPRoutes whose
//! parents are Services: `Accepted` (the object is valid) and `ResolvedRefs`
//! (the Services it names exist), with a reason, a message and the generation
//! they describe. Written only by the replica that holds the lease, and only
//! when they change, so an unchanged mesh costs the API server nothing.

use std::collections::HashMap;
use std::sync::Arc;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::Kind;
use crate::index::{ObjKey, Snapshot};

/// The controller name in HTTPRoute `status.parents[]`.
pub const CONTROLLER_NAME: &str = "strait.dev/controller";

/// What an object's status is computed from, taken from it as it was read.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusInput {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub resource_version: String,
    /// Why the object was refused, if it was.
    pub error: Option<String>,
    /// Services it applies to (a policy's target, a route's Service parents).
    pub targets: Vec<String>,
    /// Services it sends to (a route's backends).
    pub backends: Vec<String>,
    /// Its status as last read.
    pub current: Value,
}

impl StatusInput {
    /// From an object of a custom kind as the API returned it.
    pub fn of(kind: Kind, v: &Value, error: Option<String>) -> Self {
        let meta = &v["metadata"];
        let str_at = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).map(String::from);
        let (targets, backends) = match kind {
            Kind::HttpRoute => {
                let parents = v["spec"]["parentRefs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["kind"].as_str() == Some("Service"))
                    .filter_map(|p| str_at(p, "/name"))
                    .collect();
                let backends = v["spec"]["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|r| r["backendRefs"].as_array().into_iter().flatten())
                    .filter(|b| b["kind"].as_str().is_none_or(|k| k == "Service"))
                    .filter_map(|b| str_at(b, "/name"))
                    .collect();
                (parents, backends)
            }
            _ => (
                str_at(v, "/spec/targetRef/name").into_iter().collect(),
                Vec::new(),
            ),
        };
        StatusInput {
            kind,
            namespace: str_at(meta, "/namespace").unwrap_or_else(|| "default".into()),
            name: str_at(meta, "/name").unwrap_or_default(),
            generation: meta["generation"].as_i64().unwrap_or(0),
            resource_version: str_at(meta, "/resourceVersion").unwrap_or_default(),
            error,
            targets,
            backends,
            current: v.get("status").cloned().unwrap_or(Value::Null),
        }
    }
}

pub type Statuses = Arc<HashMap<(Kind, String), StatusInput>>;

fn condition(
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: i64,
    old: &Value,
) -> Value {
    let status = if ok { "True" } else { "False" };
    // The transition time moves only when the status does.
    let since = old
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == kind && c["status"] == status)
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| {
            json!(
                k8s_openapi::jiff::Timestamp::now()
                    .strftime("%Y-%m-%dT%H:%M:%SZ")
                    .to_string()
            )
        });
    json!({"type": kind, "status": status, "reason": reason, "message": message,
           "observedGeneration": generation, "lastTransitionTime": since})
}

/// The two conditions of an object whose `targets` and `backends` are looked up in `snap`.
fn conditions(s: &StatusInput, snap: &Snapshot, old: &Value) -> Vec<Value> {
    let exists = |name: &String| {
        snap.services.contains_key(&ObjKey {
            namespace: s.namespace.clone(),
            name: name.clone(),
        })
    };
    let accepted = match &s.error {
        None => condition(
            "Accepted",
            true,
            "Accepted",
            "accepted by strait",
            s.generation,
            old,
        ),
        Some(e) => condition("Accepted", false, "Invalid", e, s.generation, old),
    };
    let missing: Vec<&String> = s
        .targets
        .iter()
        .chain(&s.backends)
        .filter(|n| !exists(n))
        .collect();
    let resolved = if s.error.is_some() {
        condition(
            "ResolvedRefs",
            false,
            "Invalid",
            "not resolved: the object is invalid",
            s.generation,
            old,
        )
    } else if missing.is_empty() {
        condition(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "every Service referenced exists",
            s.generation,
            old,
        )
    } else {
        let names: Vec<&str> = missing.iter().map(|n| n.as_str()).collect();
        let reason = if s.kind == Kind::HttpRoute {
            "BackendNotFound"
        } else {
            "TargetNotFound"
        };
        let msg = format!(
            "no Service {} in namespace {}",
            names.join(", "),
            s.namespace
        );
        condition("ResolvedRefs", false, reason, &msg, s.generation, old)
    };
    vec![accepted, resolved]
}

/// The status the object should have.
pub fn desired(s: &StatusInput, snap: &Snapshot) -> Value {
    match s.kind {
        Kind::HttpRoute => {
            // Entries of other controllers (a Gateway's) are kept as they are.
            let others = s.current["parents"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["controllerName"] != CONTROLLER_NAME)
                .cloned();
            let ours = s.targets.iter().map(|parent| {
                let old = s.current["parents"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| {
                        p["controllerName"] == CONTROLLER_NAME
                            && p["parentRef"]["name"] == parent.as_str()
                    })
                    .map(|p| p["conditions"].clone())
                    .unwrap_or(Value::Null);
                json!({"parentRef": {"group": "", "kind": "Service", "name": parent},
                       "controllerName": CONTROLLER_NAME,
                       "conditions": conditions(s, snap, &old)})
            });
            json!({"parents": others.chain(ours).collect::<Vec<_>>()})
        }
        _ => json!({"conditions": conditions(s, snap, &s.current["conditions"])}),
    }
}

/// A status without its transition times, to compare what a status says.
fn without_times(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| *k != "lastTransitionTime")
                .map(|(k, v)| (k.clone(), without_times(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_times).collect()),
        v => v.clone(),
    }
}

/// Writes statuses while `leader` says this replica holds the lease.
pub async fn write(
    client: kube::Client,
    identity: String,
    mut statuses: watch::Receiver<Statuses>,
    mut snapshot: watch::Receiver<Arc<Snapshot>>,
    mut leader: watch::Receiver<bool>,
) {
    let mut written: HashMap<(Kind, String), Value> = HashMap::new();
    loop {
        if *leader.borrow_and_update() {
            let (all, snap) = (
                statuses.borrow_and_update().clone(),
                snapshot.borrow_and_update().clone(),
            );
            for (key, s) in all.iter() {
                let want = desired(s, &snap);
                let said = without_times(&want);
                if said == without_times(&s.current) || written.get(key) == Some(&said) {
                    continue;
                }
                // Losing the lease stops writing at once, mid-round included.
                if !*leader.borrow() {
                    break;
                }
                let Some(ar) = s.kind.resource() else {
                    continue;
                };
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), &s.namespace, &ar);
                let params = PatchParams {
                    field_manager: Some(identity.clone()),
                    ..Default::default()
                };
                // The resourceVersion read makes the patch conditional: a
                // status changed meanwhile (another controller's HTTPRoute
                // entry) is not overwritten from a stale read.
                let patch =
                    json!({"metadata": {"resourceVersion": s.resource_version}, "status": want});
                match api
                    .patch_status(&s.name, &params, &Patch::Merge(patch))
                    .await
                {
                    Ok(_) => {
                        debug!(kind = ?s.kind, object = %key.1, "status written");
                        written.insert(key.clone(), said);
                    }
                    Err(e) => {
                        warn!(kind = ?s.kind, object = %key.1, error = %e, "cannot write status")
                    }
                }
            }
            written.retain(|k, _| all.contains_key(k));
        } else {
            written.clear();
        }
        tokio::select! {
            r = statuses.changed() => if r.is_err() { return },
            r = snapshot.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
        }
    }
}
