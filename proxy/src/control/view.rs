//! What discovery says of a destination, parsed from the wire once into the
//! types the outbound stack uses: backends with their endpoints and policy, and
//! the rules of the routes attached.

use std::net::SocketAddr;
use std::sync::Arc;

use strait_api::v1 as api;

use crate::balance::BackendConfig;
use crate::identity::Identity;
use crate::outbound::route::{self, Rule};
use crate::retry::BudgetConfig;

#[derive(Clone, Debug)]
pub enum Resolution {
    /// Not a meshed Service: pass the traffic through untouched.
    NotMeshed,
    Service(Arc<ServiceView>),
}

#[derive(Debug)]
pub struct ServiceView {
    pub name: Arc<str>,
    /// This view's place among those received for its destination (later is
    /// higher), so a slow caller's older view never replaces a newer one.
    pub version: u64,
    /// The destination itself first: the default route's backend.
    pub backends: Vec<BackendView>,
    /// Every rule of every route attached, in the controller's order.
    pub routes: Vec<Rule>,
    /// Whether any route is attached, rules or not: if none is, requests take
    /// the default route to the Service; if one is, those no rule matches are
    /// answered 404, as Gateway API asks (a route with `rules: []` included).
    pub attached: bool,
    /// The retry budget of each of this Service's routes.
    pub budget: BudgetConfig,
    pub opaque: bool,
    /// The Service port's `appProtocol` names HTTP: detected, and routed,
    /// even on a port of this proxy's `--opaque-ports`.
    pub http: bool,
    /// The routes as received, when `routes` are they: an update with the
    /// same (most are endpoint changes) reuses `routes` rather than compile
    /// their regexes again.
    received: Option<Vec<api::HttpRoute>>,
}

impl ServiceView {
    /// The backend of the default route (and of opaque streams).
    pub fn default_backend(&self) -> Option<&BackendView> {
        self.backends.first()
    }
}

#[derive(Debug)]
pub struct BackendView {
    pub name: Arc<str>,
    pub endpoints: Vec<Endpoint>,
    pub config: BackendConfig,
}

/// The peer proxy in front of a meshed endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerProxy {
    pub port: u16,
    pub identity: Identity,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The workload's own address (pod IP and target port).
    pub addr: SocketAddr,
    pub proxy: Option<PeerProxy>,
    pub zone: String,
}

impl Endpoint {
    /// Where the client proxy connects: the peer proxy's inbound port when meshed.
    pub fn connect_addr(&self) -> SocketAddr {
        match &self.proxy {
            Some(p) => SocketAddr::new(self.addr.ip(), p.port),
            None => self.addr,
        }
    }
}

/// A backend's endpoints; the first that does not parse refuses the update.
/// An address sent twice is kept once (it would get twice the traffic).
fn endpoints(b: Vec<api::Endpoint>) -> Result<Vec<Endpoint>, String> {
    let mut out: Vec<Endpoint> = Vec::with_capacity(b.len());
    let mut seen = std::collections::HashSet::with_capacity(b.len());
    for e in b {
        let addr = match e.addr.as_ref().map(|a| a.addr.parse::<SocketAddr>()) {
            Some(Ok(a)) => a,
            _ => {
                return Err(format!(
                    "an endpoint without a valid address ({:?})",
                    e.addr
                ));
            }
        };
        let proxy = if e.proxy_port == 0 {
            None
        } else {
            let port = u16::try_from(e.proxy_port).ok();
            let identity = e.identity.as_ref().map(|i| i.spiffe_id.parse::<Identity>());
            match (port, identity) {
                (Some(port), Some(Ok(identity))) => Some(PeerProxy { port, identity }),
                _ => {
                    return Err(format!(
                        "meshed endpoint {addr} without a valid proxy port and identity"
                    ));
                }
            }
        };
        if !seen.insert(addr) {
            continue;
        }
        out.push(Endpoint {
            addr,
            proxy,
            zone: e.zone,
        });
    }
    Ok(out)
}

/// Parses an update. One that does not parse whole (no kind, an endpoint that
/// does not read) is refused, and the caller keeps the answer it had: the
/// control plane should never send one, and a proxy must not trust that, nor
/// serve half of a Service's endpoints. Routes that do not read (a newer
/// controller's, say, during an upgrade) keep the last routes that did, with
/// the update's endpoints, so that endpoints still follow the pods. Last
/// routes that name a backend the last view carried and the update does not
/// refuse the update (500s for that backend's share otherwise): the last view
/// stays whole. With no view of the Service before, it is served as if no
/// route were attached (its own endpoints, the first backend, over mTLS):
/// where passing its traffic through would have sent it too, but in
/// plaintext. A backend the last view did not carry either does not resolve,
/// and stays so.
pub fn parse(
    update: api::DestinationUpdate,
    previous: Option<&Resolution>,
) -> Result<Resolution, String> {
    let svc = match update.kind {
        Some(api::destination_update::Kind::Service(s)) => s,
        Some(api::destination_update::Kind::NotMeshed(_)) => return Ok(Resolution::NotMeshed),
        None => return Err("an update that is neither a Service nor not meshed".into()),
    };
    let mut backends = Vec::with_capacity(svc.backends.len());
    for b in svc.backends {
        backends.push(BackendView {
            endpoints: endpoints(b.endpoints).map_err(|e| format!("backend {}: {e}", b.name))?,
            config: BackendConfig::parse(b.policy),
            name: b.name.into(),
        });
    }
    let budget = BudgetConfig::parse(svc.policy.and_then(|p| p.retry_budget));
    let same_routes = match previous {
        Some(Resolution::Service(prev))
            if *prev.name == *svc.name && prev.received.as_ref() == Some(&svc.routes) =>
        {
            Some(prev.routes.clone())
        }
        _ => None,
    };
    let parsed = match same_routes {
        Some(routes) => Ok(routes),
        None => route::parse(svc.routes.clone()),
    };
    let mut attached = !svc.routes.is_empty();
    let mut received = Some(svc.routes);
    let routes = match parsed {
        Ok(routes) => routes,
        Err(e) => match previous {
            Some(Resolution::Service(prev))
                if *prev.name == *svc.name
                    && prev.routes.iter().all(|r| {
                        r.backends.iter().all(|(b, _)| {
                            backends.iter().any(|v: &BackendView| v.name == *b)
                                || prev.backends.iter().all(|v| v.name != *b)
                        })
                    }) =>
            {
                tracing::warn!(service = %svc.name, error = %e, "discovery sent routes that do not parse; keeping the last ones with the new endpoints");
                received = None;
                attached = prev.attached;
                prev.routes.clone()
            }
            // Last routes whose backends are gone: the last view stays whole.
            Some(Resolution::Service(prev)) if *prev.name == *svc.name => return Err(e),
            // Nothing readable to keep (a new watch, or this proxy older than
            // the controller's routes): the Service as if no route were
            // attached, its own endpoints called over mTLS, rather than no
            // answer, which would send its traffic around the mesh in
            // plaintext, past every identity check.
            _ => {
                tracing::warn!(service = %svc.name, error = %e, "discovery sent routes that do not parse, and none before; serving the Service without routes until they do");
                received = None;
                attached = false;
                Vec::new()
            }
        },
    };
    Ok(Resolution::Service(Arc::new(ServiceView {
        routes,
        attached,
        name: svc.name.into(),
        version: svc.version,
        backends,
        budget,
        opaque: svc.opaque,
        http: svc.http,
        received,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(addr: &str, proxy_port: u32, identity: &str) -> api::Endpoint {
        api::Endpoint {
            addr: Some(api::SocketAddress { addr: addr.into() }),
            proxy_port,
            identity: Some(api::WorkloadIdentity {
                spiffe_id: identity.into(),
            }),
            ..Default::default()
        }
    }

    fn service(endpoints: Vec<api::Endpoint>) -> api::DestinationUpdate {
        api::DestinationUpdate {
            kind: Some(api::destination_update::Kind::Service(api::Service {
                name: "web.shop.svc.cluster.local:80".into(),
                backends: vec![api::Backend {
                    name: "web".into(),
                    endpoints,
                    policy: None,
                }],
                ..Default::default()
            })),
        }
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    #[test]
    fn an_update_that_does_not_parse_whole_is_refused() {
        assert!(parse(api::DestinationUpdate { kind: None }, None).is_err());
        for bad in [
            endpoint("10.0.0.1", 4143, WEB),
            endpoint("10.0.0.1:80", 70000, WEB),
            endpoint("10.0.0.1:80", 4143, "web"),
        ] {
            let update = service(vec![endpoint("10.0.0.2:80", 4143, WEB), bad]);
            let e = parse(update, None).unwrap_err();
            assert!(e.starts_with("backend web: "), "{e}");
        }
        let not_meshed = api::DestinationUpdate {
            kind: Some(api::destination_update::Kind::NotMeshed(api::NotMeshed {})),
        };
        assert!(matches!(parse(not_meshed, None), Ok(Resolution::NotMeshed)));
    }

    fn with_route(mut update: api::DestinationUpdate, path: &str) -> api::DestinationUpdate {
        if let Some(api::destination_update::Kind::Service(s)) = &mut update.kind {
            s.routes = vec![api::HttpRoute {
                name: "shop/web".into(),
                rules: vec![api::HttpRouteRule {
                    matches: vec![api::HttpMatch {
                        path: Some(api::http_match::Path::Regex(path.into())),
                        ..Default::default()
                    }],
                    backends: vec![api::WeightedBackend {
                        backend: "web".into(),
                        weight: 1,
                    }],
                    ..Default::default()
                }],
            }];
        }
        update
    }

    /// Routes a proxy cannot read (a newer controller's) keep the last ones
    /// it could, while endpoints go on following the pods.
    #[test]
    fn routes_that_do_not_parse_keep_the_last_ones_and_endpoints_move_on() {
        let first = parse(
            with_route(service(vec![endpoint("10.0.0.1:80", 4143, WEB)]), "/v1/.*"),
            None,
        )
        .unwrap();
        let bad = with_route(service(vec![endpoint("10.0.0.2:80", 4143, WEB)]), "(");
        // Nothing to keep (a new watch, this proxy older than the routes):
        // the Service without routes, its endpoints still called over mTLS,
        // rather than no answer, which would send its traffic around the
        // mesh in plaintext.
        let Ok(Resolution::Service(bare)) = parse(bad.clone(), None) else {
            panic!("a Service");
        };
        assert!(!bare.attached && bare.routes.is_empty(), "{bare:?}");
        assert!(bare.received.is_none(), "read again with the next update");
        let e = &bare.backends[0].endpoints[0];
        assert_eq!(e.addr.to_string(), "10.0.0.2:80");
        assert!(e.proxy.is_some(), "{e:?}");
        let Ok(Resolution::Service(next)) = parse(bad, Some(&first)) else {
            panic!("a Service");
        };
        assert_eq!(next.routes.len(), 1, "the last routes");
        assert_eq!(&*next.routes[0].route, "shop/web");
        assert_eq!(
            next.backends[0].endpoints[0].addr.to_string(),
            "10.0.0.2:80"
        );
        // Last routes naming a backend the last view carried and the update
        // does not would turn its share to 500s: refused.
        let mut gone = with_route(service(vec![endpoint("10.0.0.2:80", 4143, WEB)]), "(");
        if let Some(api::destination_update::Kind::Service(s)) = &mut gone.kind {
            s.backends[0].name = "web-v2".into();
        }
        assert!(parse(gone, Some(&first)).is_err());
        // A backend the last view did not carry either (its Service does not
        // exist: 500s for its share) does not stop endpoints moving on.
        let mut dangling = with_route(service(vec![endpoint("10.0.0.1:80", 4143, WEB)]), "/v1/.*");
        if let Some(api::destination_update::Kind::Service(s)) = &mut dangling.kind {
            s.routes[0].rules[0].backends.push(api::WeightedBackend {
                backend: "nowhere".into(),
                weight: 1,
            });
        }
        let first = parse(dangling, None).unwrap();
        let bad = with_route(service(vec![endpoint("10.0.0.3:80", 4143, WEB)]), "(");
        let Ok(Resolution::Service(next)) = parse(bad, Some(&first)) else {
            panic!("a Service");
        };
        assert_eq!(next.routes[0].backends.len(), 2, "the last routes");
        assert_eq!(
            next.backends[0].endpoints[0].addr.to_string(),
            "10.0.0.3:80"
        );
    }

    /// An update whose routes are the last ones (an endpoint moved) keeps
    /// the routes already built (their regexes compiled once); new routes are
    /// built anew, and a kept-over view's routes are never taken for parsed.
    #[test]
    fn routes_received_again_are_not_built_again() {
        let at =
            |addr: &str, path: &str| with_route(service(vec![endpoint(addr, 4143, WEB)]), path);
        let view = |r: &Resolution| match r {
            Resolution::Service(s) => s.clone(),
            _ => panic!("a Service"),
        };
        let first = parse(at("10.0.0.1:80", "/v1/.*"), None).unwrap();
        let moved = parse(at("10.0.0.2:80", "/v1/.*"), Some(&first)).unwrap();
        assert!(Arc::ptr_eq(
            &view(&first).routes[0].route,
            &view(&moved).routes[0].route
        ));
        assert_eq!(
            view(&moved).backends[0].endpoints[0].addr.to_string(),
            "10.0.0.2:80"
        );
        let changed = parse(at("10.0.0.2:80", "/v2/.*"), Some(&moved)).unwrap();
        assert!(!Arc::ptr_eq(
            &view(&moved).routes[0].route,
            &view(&changed).routes[0].route
        ));
        // Bad routes keep the last ones; the same bad routes again are checked
        // again (their backends may be gone by then).
        let kept = parse(at("10.0.0.3:80", "("), Some(&changed)).unwrap();
        let mut gone = at("10.0.0.3:80", "(");
        if let Some(api::destination_update::Kind::Service(s)) = &mut gone.kind {
            s.backends[0].name = "web-v2".into();
        }
        assert!(parse(gone, Some(&kept)).is_err());
    }

    #[test]
    fn an_address_sent_twice_is_one_endpoint() {
        let update = service(vec![
            endpoint("10.0.0.1:80", 4143, WEB),
            endpoint("10.0.0.2:80", 4143, WEB),
            endpoint("10.0.0.1:80", 4143, WEB),
        ]);
        let Ok(Resolution::Service(s)) = parse(update, None) else {
            panic!("a Service");
        };
        let addrs: Vec<String> = s.backends[0]
            .endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(addrs, ["10.0.0.1:80", "10.0.0.2:80"]);
    }

    /// A route attached with no rules (`rules: []` is valid Gateway API) is
    /// still attached: requests are answered 404 rather than left to the
    /// default route, and a bad update keeps that.
    #[test]
    fn a_route_without_rules_is_attached() {
        let none = parse(service(vec![endpoint("10.0.0.1:80", 4143, WEB)]), None).unwrap();
        let Resolution::Service(v) = &none else {
            panic!("a Service");
        };
        assert!(!v.attached, "no route");
        let mut empty = service(vec![endpoint("10.0.0.1:80", 4143, WEB)]);
        if let Some(api::destination_update::Kind::Service(s)) = &mut empty.kind {
            s.routes = vec![api::HttpRoute {
                name: "shop/web".into(),
                rules: Vec::new(),
            }];
        }
        let attached = parse(empty, Some(&none)).unwrap();
        let Resolution::Service(v) = &attached else {
            panic!("a Service");
        };
        assert!(v.attached && v.routes.is_empty(), "{v:?}");
        let bad = with_route(service(vec![endpoint("10.0.0.2:80", 4143, WEB)]), "(");
        let Ok(Resolution::Service(kept)) = parse(bad, Some(&attached)) else {
            panic!("a Service");
        };
        assert!(kept.attached && kept.routes.is_empty(), "{kept:?}");
    }
}
