//! This workload's inbound policy, parsed once from the control plane's answer:
//! per port, the mTLS mode and which identities may call.

use std::collections::HashMap;
use std::sync::Arc;

use strait_api::v1 as api;
use tokio::sync::watch;
use tracing::warn;

use crate::identity::Identity;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plaintext accepted from clients outside the mesh (the default, so that a mesh
    /// can be adopted one workload at a time).
    Permissive,
    /// Only peers with a verified identity.
    Strict,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allow {
    Identity(Identity),
    /// Every workload of a namespace, in this mesh's trust domain.
    Namespace {
        namespace: String,
        trust_domain: String,
    },
    /// An entry this proxy could not read. It matches nobody, but it keeps the
    /// list non-empty: an unreadable rule must narrow access, never open it.
    Unreadable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPolicy {
    pub mode: Mode,
    /// Empty: every verified identity of the mesh (and in PERMISSIVE mode,
    /// plaintext) may call.
    pub allow: Vec<Allow>,
    /// The mesh's trust domain: with an empty allow list, a peer whose
    /// certificate verifies but names another trust domain (the anchors also
    /// sign another mesh's issuer) is not one of the mesh's workloads, and is
    /// let in only by an `identity` entry naming it. `None` without a control
    /// plane, where there is no policy to keep.
    pub trust_domain: Option<Arc<str>>,
}

impl Default for PortPolicy {
    fn default() -> Self {
        PortPolicy {
            mode: Mode::Permissive,
            allow: Vec::new(),
            trust_domain: None,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    #[error("this workload's inbound policy is not known yet")]
    NoPolicyYet,
    #[error("port {0} requires mTLS (STRICT); plaintext refused")]
    PlaintextOnStrict(u16),
    #[error("port {0} allows only listed identities; an unauthenticated client is not one")]
    Unauthenticated(u16),
    #[error("identity {1} is not allowed on port {0}")]
    NotAllowed(u16, Identity),
    #[error(
        "identity {1} is of another trust domain than this mesh's; port {0} admits it only by name"
    )]
    ForeignTrustDomain(u16, Identity),
    /// Every entry of the list names nobody: the controller sealed the port
    /// (its policies were refused or too large to send), so naming the
    /// caller would send whoever reads it to the allow lists.
    #[error(
        "port {0} admits no caller: its AuthorizationPolicies could not be applied (refused by the controller, or not readable by this proxy: their logs say why)"
    )]
    NoneAdmitted(u16),
}

impl PortPolicy {
    pub fn check(&self, port: u16, peer: Option<&Identity>) -> Result<(), Denied> {
        match peer {
            None if self.mode == Mode::Strict => Err(Denied::PlaintextOnStrict(port)),
            None if !self.allow.is_empty() => Err(Denied::Unauthenticated(port)),
            None => Ok(()),
            Some(id) if self.allow.is_empty() => match self.trust_domain.as_deref() {
                Some(td) if td != id.trust_domain() => {
                    Err(Denied::ForeignTrustDomain(port, id.clone()))
                }
                _ => Ok(()),
            },
            Some(id) => {
                let ok = self.allow.iter().any(|a| match a {
                    Allow::Identity(i) => i == id,
                    Allow::Namespace {
                        namespace,
                        trust_domain,
                    } => namespace == id.namespace() && trust_domain == id.trust_domain(),
                    Allow::Unreadable => false,
                });
                if ok {
                    Ok(())
                } else if self.allow.iter().all(|a| *a == Allow::Unreadable) {
                    Err(Denied::NoneAdmitted(port))
                } else {
                    Err(Denied::NotAllowed(port, id.clone()))
                }
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InboundPolicy {
    pub ports: HashMap<u16, PortPolicy>,
    pub default: PortPolicy,
    /// The kubelet's probes of this pod: allowed in plaintext whatever the
    /// port's policy, since the kubelet has no identity to present.
    pub probes: Vec<Probe>,
}

/// One probe request: this method and exactly this request target on this port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub port: u16,
    pub grpc: bool,
    pub target: Box<str>,
}

impl InboundPolicy {
    pub fn port(&self, port: u16) -> &PortPolicy {
        self.ports.get(&port).unwrap_or(&self.default)
    }

    /// Whether a plaintext request is one of the kubelet's probes, as the
    /// kubelet sends them: an HTTP probe is a GET or HEAD over HTTP/1.x with no
    /// body and no upgrade (an upgrade on the probe's path would open a tunnel
    /// to the app past the policy); a gRPC probe is a POST of the health
    /// method over HTTP/2. The request target is compared byte for byte.
    pub fn is_probe<B: http_body::Body>(&self, port: u16, req: &http::Request<B>) -> bool {
        use http::{Method, Version, header};
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        // By the body as it was framed: its headers may be gone by now
        // (hop-by-hop, or named in `Connection`).
        let bodiless = req.body().size_hint().exact() == Some(0);
        let plain_get = (req.method() == Method::GET || req.method() == Method::HEAD)
            && req.version() < Version::HTTP_2
            && bodiless
            && !req.headers().contains_key(header::UPGRADE);
        let grpc = req.method() == Method::POST && req.version() == Version::HTTP_2;
        self.probes.iter().any(|p| {
            p.port == port && *p.target == *target && if p.grpc { grpc } else { plain_get }
        })
    }
}

fn port_policy(p: api::PortPolicy, trust_domain: &Arc<str>) -> PortPolicy {
    // A mode this proxy does not know (a newer controller's) narrows access,
    // as an unreadable rule does: only an unset one or PERMISSIVE opens it.
    let mode = match api::MtlsMode::try_from(p.mode) {
        Ok(api::MtlsMode::Unspecified | api::MtlsMode::Permissive) => Mode::Permissive,
        Ok(api::MtlsMode::Strict) => Mode::Strict,
        Err(_) => {
            warn!(
                mode = p.mode,
                "an mTLS mode in the inbound policy is unknown; taken as STRICT"
            );
            Mode::Strict
        }
    };
    let mut allow = Vec::new();
    for a in p.allow {
        match a.subject {
            Some(api::authorization::Subject::Identity(i)) => match i.spiffe_id.parse() {
                Ok(id) => allow.push(Allow::Identity(id)),
                Err(e) => {
                    warn!(error = %e, "an identity in the inbound policy is unreadable; it matches nobody");
                    allow.push(Allow::Unreadable);
                }
            },
            Some(api::authorization::Subject::Namespace(ns)) => allow.push(Allow::Namespace {
                namespace: ns,
                trust_domain: trust_domain.to_string(),
            }),
            None => {
                warn!("an entry of the inbound policy names nobody; it matches nobody");
                allow.push(Allow::Unreadable);
            }
        }
    }
    PortPolicy {
        mode,
        allow,
        trust_domain: Some(trust_domain.clone()),
    }
}

/// Reads the control plane's answer; `trust_domain` is this mesh's, the only
/// one whose identities namespace rules admit.
pub fn parse(p: api::WorkloadPolicy, trust_domain: &str) -> InboundPolicy {
    let trust_domain: Arc<str> = trust_domain.into();
    let trust_domain = &trust_domain;
    InboundPolicy {
        ports: p
            .ports
            .into_iter()
            .filter_map(|pp| {
                let port = u16::try_from(pp.port).ok()?;
                Some((port, port_policy(pp, trust_domain)))
            })
            .collect(),
        // Our controller always sends one. Absent (a broken controller, a
        // truncated message), it narrows access as an unreadable rule does:
        // the mesh's own workloads only, no plaintext.
        default: port_policy(
            p.default.unwrap_or_else(|| {
                warn!(
                    "the inbound policy has no default; taken as STRICT for this mesh's workloads"
                );
                api::PortPolicy {
                    mode: api::MtlsMode::Strict as i32,
                    ..Default::default()
                }
            }),
            trust_domain,
        ),
        probes: p
            .probes
            .into_iter()
            .filter_map(|r| {
                let grpc = match api::ProbeKind::try_from(r.kind) {
                    Ok(api::ProbeKind::HttpGet) => false,
                    Ok(api::ProbeKind::Grpc) => true,
                    // A kind this proxy does not know lets nothing through.
                    _ => return None,
                };
                Some(Probe {
                    port: u16::try_from(r.port).ok()?,
                    grpc,
                    target: r.path.into(),
                })
            })
            .collect(),
    }
}

/// The policy in force: `None` until the control plane's first answer (everything
/// is refused until then); without a control plane, the default (all allowed).
pub type PolicyRx = watch::Receiver<Option<Arc<InboundPolicy>>>;

/// The decision for a peer on a port under the policy in force.
pub fn check(policy: &PolicyRx, port: u16, peer: Option<&Identity>) -> Result<(), Denied> {
    match &*policy.borrow() {
        Some(p) => p.port(port).check(port, peer),
        None => Err(Denied::NoPolicyYet),
    }
}

/// Whether the kubelet probes `port` (in plaintext, by the policy in force).
pub fn probed(policy: &PolicyRx, port: u16) -> bool {
    policy
        .borrow()
        .as_ref()
        .is_some_and(|p| p.probes.iter().any(|pr| pr.port == port))
}

/// What a client silent past the detection wait may do on `port`. `Ok(true)`:
/// the port admits it as TCP, so a stream to the app is made for it at once.
/// `Ok(false)`: it may speak first, and only HTTP goes on, each request
/// authorized: a plaintext client on a port the kubelet probes, since the
/// probe itself is sent late when the kubelet is throttled, and is let
/// through by its exact target. `Err`: refused now.
pub fn silent_client(
    policy: &PolicyRx,
    port: u16,
    peer: Option<&Identity>,
) -> Result<bool, Denied> {
    match check(policy, port, peer) {
        Ok(()) => Ok(true),
        Err(_) if peer.is_none() && probed(policy, port) => Ok(false),
        Err(denied) => Err(denied),
    }
}

/// Resolves once the port's policy no longer admits `peer`: a stream admitted
/// when it opened (opaque TCP, an upgraded connection) is closed when a change
/// revokes it, as a new one would be refused, rather than run for as long as
/// bytes move.
pub async fn revoked(mut policy: PolicyRx, port: u16, peer: Option<Identity>) -> Denied {
    loop {
        // The policy in force now first: a change between the admission and
        // this call is not missed.
        if let Err(denied) = check(&policy, port, peer.as_ref()) {
            return denied;
        }
        if policy.changed().await.is_err() {
            // The policy can no longer change: what was admitted stays so.
            return std::future::pending().await;
        }
    }
}

/// How a request was let in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// By the port's policy: a change of policy may revoke it.
    Policy,
    /// As one of the kubelet's probes, whatever the port's policy.
    Probe,
}

/// The decision for an HTTP request: as [`check`], except that the kubelet's
/// probes are let through in plaintext.
pub fn check_request<B: http_body::Body>(
    policy: &PolicyRx,
    port: u16,
    peer: Option<&Identity>,
    req: &http::Request<B>,
) -> Result<Admitted, Denied> {
    let policy = policy.borrow();
    let Some(p) = &*policy else {
        return Err(Denied::NoPolicyYet);
    };
    // A probe whatever the policy says, so that it is counted apart from
    // other plaintext: nothing to revoke either way (never an upgrade).
    if peer.is_none() && p.is_probe(port, req) {
        return Ok(Admitted::Probe);
    }
    p.port(port).check(port, peer).map(|()| Admitted::Policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    #[test]
    fn strict_refuses_plaintext_and_allow_lists_pick_identities() {
        let web = id("spiffe://td/ns/shop/sa/web");
        let other = id("spiffe://td/ns/other/sa/x");
        let elsewhere = id("spiffe://other.td/ns/shop/sa/web");
        let strict = PortPolicy {
            mode: Mode::Strict,
            allow: vec![],
            trust_domain: Some("td".into()),
        };
        assert_eq!(strict.check(80, None), Err(Denied::PlaintextOnStrict(80)));
        assert_eq!(strict.check(80, Some(&web)), Ok(()));
        assert_eq!(
            strict.check(80, Some(&elsewhere)),
            Err(Denied::ForeignTrustDomain(80, elsewhere.clone())),
            "every identity of the mesh, not every one the anchors verify"
        );
        let by_name = PortPolicy {
            allow: vec![Allow::Identity(elsewhere.clone())],
            ..strict.clone()
        };
        assert_eq!(by_name.check(80, Some(&elsewhere)), Ok(()));

        let listed = PortPolicy {
            mode: Mode::Permissive,
            allow: vec![Allow::Namespace {
                namespace: "shop".into(),
                trust_domain: "td".into(),
            }],
            trust_domain: Some("td".into()),
        };
        assert_eq!(
            listed.check(80, Some(&elsewhere)),
            Err(Denied::NotAllowed(80, elsewhere.clone())),
            "a namespace rule admits only this trust domain"
        );
        assert_eq!(listed.check(80, Some(&web)), Ok(()));
        assert_eq!(
            listed.check(80, Some(&other)),
            Err(Denied::NotAllowed(80, other.clone()))
        );
        assert_eq!(listed.check(80, None), Err(Denied::Unauthenticated(80)));
        assert_eq!(PortPolicy::default().check(80, None), Ok(()));
    }

    /// An answer without a default admits this mesh's workloads only: no
    /// plaintext client, no other mesh's.
    #[test]
    fn an_answer_without_a_default_narrows_access_never_opens_it() {
        let web = id("spiffe://td/ns/shop/sa/web");
        let elsewhere = id("spiffe://other.td/ns/shop/sa/web");
        let none = parse(api::WorkloadPolicy::default(), "td");
        assert_eq!(none.port(80).check(80, Some(&web)), Ok(()));
        assert_eq!(
            none.port(80).check(80, None),
            Err(Denied::PlaintextOnStrict(80))
        );
        assert_eq!(
            none.port(80).check(80, Some(&elsewhere)),
            Err(Denied::ForeignTrustDomain(80, elsewhere.clone()))
        );
    }

    /// STRICT on every port, allowing `subject`.
    fn strict_for(
        subject: api::authorization::Subject,
        probes: Vec<api::ProbeRoute>,
    ) -> api::WorkloadPolicy {
        api::WorkloadPolicy {
            ports: vec![],
            default: Some(api::PortPolicy {
                port: 0,
                mode: api::MtlsMode::Strict as i32,
                allow: vec![api::Authorization {
                    subject: Some(subject),
                }],
            }),
            probes,
        }
    }

    #[test]
    fn an_unknown_mode_narrows_access_never_opens_it() {
        let mut policy = strict_for(
            api::authorization::Subject::Identity(api::WorkloadIdentity {
                spiffe_id: "spiffe://td/ns/shop/sa/web".into(),
            }),
            vec![],
        );
        if let Some(d) = policy.default.as_mut() {
            d.mode = 7;
            d.allow.clear();
        }
        let p = parse(policy, "td");
        assert_eq!(
            p.port(80).check(80, None),
            Err(Denied::PlaintextOnStrict(80))
        );
    }

    #[test]
    fn an_unreadable_allow_entry_narrows_access_never_opens_it() {
        let p = parse(
            strict_for(
                api::authorization::Subject::Identity(api::WorkloadIdentity {
                    spiffe_id: "spiffe://td/ns/shop/sa/*".into(),
                }),
                vec![],
            ),
            "td",
        );
        let web = id("spiffe://td/ns/shop/sa/web");
        assert_eq!(
            p.port(80).check(80, Some(&web)),
            Err(Denied::NoneAdmitted(80))
        );
        // Beside a readable entry, a caller it does not name is named.
        let mut both = strict_for(api::authorization::Subject::Namespace("pay".into()), vec![]);
        both.default
            .as_mut()
            .unwrap()
            .allow
            .push(api::Authorization { subject: None });
        assert_eq!(
            parse(both, "td").port(80).check(80, Some(&web)),
            Err(Denied::NotAllowed(80, web.clone()))
        );
    }

    /// A namespace the controller sealed (its policies refused, or too large
    /// to send) is not answered as if the caller were missing from a list.
    #[test]
    fn a_sealed_port_says_it_admits_no_one() {
        let mut sealed = strict_for(api::authorization::Subject::Namespace("x".into()), vec![]);
        sealed.default.as_mut().unwrap().allow = vec![api::Authorization { subject: None }];
        let web = id("spiffe://td/ns/shop/sa/web");
        let denied = parse(sealed, "td")
            .port(8080)
            .check(8080, Some(&web))
            .unwrap_err();
        assert_eq!(denied, Denied::NoneAdmitted(8080));
        let said = denied.to_string();
        assert!(
            !said.contains("shop/sa/web") && said.contains("could not be applied"),
            "{said}"
        );
    }

    /// A plaintext client silent past the detection wait on a STRICT port
    /// the kubelet probes may still speak (a probe sent late), HTTP only;
    /// on a port it does not probe it is refused at once; a peer the port
    /// admits gets its stream.
    #[test]
    fn a_silent_client_of_a_probed_port_may_still_send_its_probe() {
        let (_tx, rx) = watch::channel(Some(Arc::new(parse(
            strict_for(
                api::authorization::Subject::Namespace("shop".into()),
                vec![api::ProbeRoute {
                    port: 8080,
                    kind: api::ProbeKind::HttpGet as i32,
                    path: "/healthz".into(),
                }],
            ),
            "td",
        ))));
        assert_eq!(silent_client(&rx, 8080, None), Ok(false));
        assert_eq!(
            silent_client(&rx, 9090, None),
            Err(Denied::PlaintextOnStrict(9090))
        );
        let web = id("spiffe://td/ns/shop/sa/web");
        assert_eq!(silent_client(&rx, 8080, Some(&web)), Ok(true));
        let other = id("spiffe://td/ns/other/sa/x");
        assert!(silent_client(&rx, 8080, Some(&other)).is_err());
    }

    /// The kubelet's probes get through a STRICT port in plaintext, and
    /// nothing else does: not another path, method or port, nor a peer the
    /// allow list refuses.
    #[test]
    fn only_the_kubelets_probes_pass_strict_in_plaintext() {
        let probe = |port, kind: api::ProbeKind, path: &str| api::ProbeRoute {
            port,
            kind: kind as i32,
            path: path.into(),
        };
        let (tx, rx) = watch::channel(Some(Arc::new(parse(
            strict_for(
                api::authorization::Subject::Namespace("shop".into()),
                vec![
                    probe(8080, api::ProbeKind::HttpGet, "/ready?full=1"),
                    probe(9090, api::ProbeKind::Grpc, "/grpc.health.v1.Health/Check"),
                    probe(7070, api::ProbeKind::Unspecified, "/"),
                ],
            ),
            "td",
        ))));
        let req = |method: &str, target: &str| {
            let h2 = target.starts_with("/grpc");
            http::Request::builder()
                .method(method)
                .uri(target)
                .version(if h2 {
                    http::Version::HTTP_2
                } else {
                    http::Version::HTTP_11
                })
                .body(Framed::Length(0))
                .unwrap()
        };
        let with = |mut r: http::Request<Framed>, name: &'static str, value: &'static str| {
            r.headers_mut()
                .insert(name, http::HeaderValue::from_static(value));
            r
        };
        let decide = |port, peer: Option<&Identity>, r: &http::Request<Framed>| {
            check_request(&rx, port, peer, r).is_ok()
        };
        assert!(decide(8080, None, &req("GET", "/ready?full=1")));
        assert!(decide(8080, None, &req("HEAD", "/ready?full=1")));
        assert!(decide(
            9090,
            None,
            &req("POST", "/grpc.health.v1.Health/Check")
        ));
        for (port, method, target) in [
            (8080, "GET", "/ready"),
            (8080, "GET", "/ready?full=1&x"),
            (8080, "POST", "/ready?full=1"),
            (8081, "GET", "/ready?full=1"),
            (9090, "GET", "/grpc.health.v1.Health/Check"),
            (7070, "GET", "/"),
        ] {
            assert!(
                !decide(port, None, &req(method, target)),
                "{method} {target} on {port}"
            );
        }
        // Nothing that would carry more than the probe: an upgrade (a tunnel
        // to the app), a body, a gRPC call over HTTP/1.1.
        let probe = || req("GET", "/ready?full=1");
        assert!(decide(8080, None, &with(probe(), "content-length", "0")));
        let grpc_over_h1 = http::Request::post("/grpc.health.v1.Health/Check")
            .body(Framed::Length(5))
            .unwrap();
        // The body as framed, whatever headers are left to say so.
        let framed = |body| probe().map(|_| body);
        for (port, r) in [
            (
                8080,
                with(with(probe(), "upgrade", "h2c"), "connection", "Upgrade"),
            ),
            (8080, with(probe(), "upgrade", "websocket")),
            (8080, framed(Framed::Length(5))),
            (8080, framed(Framed::Chunked)),
            (9090, grpc_over_h1),
        ] {
            assert!(!decide(port, None, &r), "{r:?}");
        }
        let outsider = id("spiffe://td/ns/other/sa/x");
        assert!(!decide(8080, Some(&outsider), &req("GET", "/ready?full=1")));
        // Under PERMISSIVE, which lets plaintext in anyway, a probe is still
        // told apart (counted `probe`), so that plaintext `allow` is every
        // caller but the kubelet.
        let mut open = strict_for(
            api::authorization::Subject::Namespace("shop".into()),
            vec![api::ProbeRoute {
                port: 8080,
                kind: api::ProbeKind::HttpGet as i32,
                path: "/ready?full=1".into(),
            }],
        );
        let default = open.default.as_mut().unwrap();
        default.mode = api::MtlsMode::Permissive as i32;
        default.allow.clear();
        tx.send_replace(Some(Arc::new(parse(open, "td"))));
        assert_eq!(
            check_request(&rx, 8080, None, &req("GET", "/ready?full=1")),
            Ok(Admitted::Probe)
        );
        assert_eq!(
            check_request(&rx, 8080, None, &req("GET", "/other")),
            Ok(Admitted::Policy)
        );
        tx.send_replace(None);
        assert_eq!(
            check_request(&rx, 8080, None, &req("GET", "/ready?full=1")),
            Err(Denied::NoPolicyYet)
        );
    }

    /// A request body as hyper framed it: a length, or chunks of unknown size.
    #[derive(Debug)]
    enum Framed {
        Length(u64),
        Chunked,
    }

    impl http_body::Body for Framed {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            std::task::Poll::Ready(None)
        }

        fn size_hint(&self) -> http_body::SizeHint {
            match self {
                Framed::Length(n) => http_body::SizeHint::with_exact(*n),
                Framed::Chunked => http_body::SizeHint::default(),
            }
        }
    }
}
