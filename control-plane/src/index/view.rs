//! What a proxy sees of one destination: computed from a snapshot, once per change
//! for every proxy watching it.

use std::net::SocketAddr;

use prost::Message as _;
use strait_api::v1 as api;

use super::{ObjKey, PodInfo, ServicePort, Snapshot, wire};
use crate::backend_policy::BackendPolicySpec;
use crate::defaults;
use crate::routes::{RouteId, RouteKind, RouteSpec};

/// A destination as a proxy names it, normalised so that every spelling of the same
/// Service shares one view.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestKey {
    Service {
        svc: ObjKey,
        port: u16,
    },
    ClusterIp(SocketAddr),
    /// A name that is not a cluster Service name: never meshed.
    External(String),
}

/// `key` as the Service it names when it is a Service's cluster IP: the
/// two spellings make the same view (`build`), built once per change.
pub fn canonical(snap: &Snapshot, key: &DestKey) -> DestKey {
    match key {
        DestKey::ClusterIp(sa) => match snap.by_cluster_ip.get(&sa.ip()) {
            Some(svc) => DestKey::Service {
                svc: svc.clone(),
                port: sa.port(),
            },
            None => key.clone(),
        },
        _ => key.clone(),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseDestError {
    #[error("destination {0:?} is not HOST:PORT")]
    NoPort(String),
}

impl DestKey {
    /// Parses `svc.ns.svc.cluster.local:port`, the short forms `svc:port`,
    /// `svc.ns:port`, `svc.ns.svc:port` (resolved against `namespace`), or
    /// `cluster-ip:port`.
    pub fn parse(dest: &str, namespace: &str) -> Result<DestKey, ParseDestError> {
        let no_port = || ParseDestError::NoPort(dest.to_string());
        if let Ok(sa) = dest.parse::<SocketAddr>() {
            // One spelling per address: a scope id, a flow label or an
            // IPv4-mapped form would make one Service's view as many watch
            // keys as a client cares to spell, each held and recomputed apart.
            return Ok(DestKey::ClusterIp(SocketAddr::new(
                sa.ip().to_canonical(),
                sa.port(),
            )));
        }
        let (host, port) = dest.rsplit_once(':').ok_or_else(no_port)?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(no_port)?;
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let labels: Vec<&str> = host.split('.').collect();
        let domain: Vec<&str> = defaults::CLUSTER_DOMAIN.split('.').collect();
        let (name, ns) = match labels.as_slice() {
            [svc] => (*svc, namespace),
            [svc, ns] => (*svc, *ns),
            [svc, ns, "svc"] => (*svc, *ns),
            [svc, ns, "svc", rest @ ..] if rest == domain.as_slice() => (*svc, *ns),
            _ => return Ok(DestKey::External(format!("{host}:{port}"))),
        };
        if name.is_empty() || ns.is_empty() {
            return Ok(DestKey::External(format!("{host}:{port}")));
        }
        Ok(DestKey::Service {
            svc: ObjKey {
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            port,
        })
    }
}

pub fn not_meshed() -> api::DestinationUpdate {
    api::DestinationUpdate {
        kind: Some(api::destination_update::Kind::NotMeshed(api::NotMeshed {})),
    }
}

/// A Service port as proxies name it: "svc.ns.svc.cluster.local:port".
pub fn service_name(svc: &ObjKey, port: u16) -> String {
    format!(
        "{}.{}.svc.{}:{}",
        svc.name,
        svc.namespace,
        defaults::CLUSTER_DOMAIN,
        port
    )
}

/// A view, and what building it found out besides.
#[derive(Debug)]
pub struct Built {
    pub update: api::DestinationUpdate,
    /// A backend's endpoints depend on the caller's zone: unless one does, a
    /// destination's view for a caller of unknown zone is every zone's, and
    /// a destination watched from many zones is computed once.
    pub hinted: bool,
    /// It was over `MAX_DISCOVERY_VIEW_BYTES`, and is sent without what did
    /// not fit.
    pub cut: bool,
}

/// The view of `key` in `snap`, for a caller in `zone` (when known): the
/// Service itself and every Service its routes send to, each with its ready
/// endpoints (those meant for the caller's zone, where a Service asks for
/// topology-aware routing) and policy; its routes; whether it is opaque.
/// Everything is in a stable order, so that equal views compare equal.
pub fn build(snap: &Snapshot, key: &DestKey, zone: Option<&str>) -> Built {
    build_within(snap, key, zone, defaults::MAX_DISCOVERY_VIEW_BYTES)
}

/// What stamping a view adds to it once built (`discovery::Views`): its
/// `changed_at`, and a `version` of more digits.
const STAMP_BYTES: usize = 32;

/// `build`, the view at most `max` bytes encoded: a proxy refuses a message
/// larger than it reads, so an oversized view would reach no proxy, and held
/// by every watch until read, it would cost the controller that many times.
/// Routes go in, in Gateway API's order, while they (with the backends they
/// bring) fit; one that does not is left out, and the next tried. So the
/// routes that were served stay served when a newer, larger one is
/// attached, and the Service's own endpoints are always there: where every
/// route is left out, callers take the default route to the Service.
fn build_within(snap: &Snapshot, key: &DestKey, zone: Option<&str>, max: usize) -> Built {
    let mut built = Built {
        update: not_meshed(),
        hinted: false,
        cut: false,
    };
    let (svc, port) = match key {
        DestKey::Service { svc, port } => (svc.clone(), *port),
        DestKey::ClusterIp(sa) => match snap.by_cluster_ip.get(&sa.ip()) {
            Some(svc) => (svc.clone(), sa.port()),
            None => {
                built.update = pod_view(snap, *sa);
                return built;
            }
        },
        DestKey::External(_) => return built,
    };
    let Some(sp) = service_port(snap, &svc, port) else {
        return built;
    };
    let name = service_name(&svc, port);
    let policy = snap.backend_policy(&svc);
    let opaque = opaque_port(snap, &svc, sp);
    let http = !opaque && sp.app_protocol.as_deref().is_some_and(http_app_protocol);
    let mut s = api::Service {
        name: name.clone(),
        version: snap.version,
        // Stamped when handed to the streams (`discovery::Views`).
        changed_at: None,
        backends: vec![api::Backend {
            name,
            endpoints: endpoints(snap, &svc, port, zone, &mut built.hinted),
            policy: policy.map(BackendPolicySpec::to_api),
        }],
        routes: Vec::new(),
        policy: policy.map(BackendPolicySpec::to_api),
        opaque,
        http,
    };
    // The update's bytes with `len` bytes of Service.
    let fits = |len: usize| wire::entry(len) + STAMP_BYTES <= max;
    let mut len = s.encoded_len();
    // A Service with more endpoints than fit (some 90,000) keeps the first
    // that do, by address, rather than none.
    let mut dropped_endpoints = 0;
    if !fits(len) {
        let own = &mut s.backends[0].endpoints;
        // `len` less each entry: at least what is left, as lengths only shrink.
        while !fits(len)
            && let Some(e) = own.pop()
        {
            len -= wire::entry(e.encoded_len());
            dropped_endpoints += 1;
        }
        len = s.encoded_len();
    }
    let mut left_out = Vec::new();
    for (id, r) in attached_routes(snap, &svc, sp) {
        let route = r.to_api(&id.key, port);
        let mut cost = wire::entry(route.encoded_len());
        let (mut new, mut hinted) = (Vec::<api::Backend>::new(), false);
        // A ref strait cannot send to (another kind, another namespace) has
        // no backend: its share is answered 500.
        let refs = r.rules.iter().flat_map(|rule| &rule.backends);
        for b in refs.filter(|b| b.unresolvable.is_none()) {
            if !fits(len + cost) {
                // Left out whatever else it brings: not worked out.
                break;
            }
            let (target, target_port) = b.target(port);
            let name = service_name(target, target_port);
            // A Service (or a port of it) that does not exist, or is gone since
            // the route was accepted, is left out: the proxies answer its share
            // of requests 500, as Gateway API asks of a backendRef that does not
            // resolve. One without ready endpoints is sent, and answers 503.
            if s.backends.iter().chain(&new).all(|x| x.name != name)
                && service_port(snap, target, target_port).is_some()
            {
                let backend = api::Backend {
                    name,
                    endpoints: endpoints(snap, target, target_port, zone, &mut hinted),
                    policy: snap.backend_policy(target).map(BackendPolicySpec::to_api),
                };
                cost += wire::entry(backend.encoded_len());
                new.push(backend);
            }
        }
        if fits(len + cost) {
            len += cost;
            built.hinted |= hinted;
            s.backends.extend(new);
            s.routes.push(route);
        } else {
            left_out.push(id);
        }
    }
    if !left_out.is_empty() || dropped_endpoints > 0 {
        built.cut = true;
        let names: Vec<String> = left_out.iter().take(8).map(|id| id.to_string()).collect();
        strait_otel::sampled!(
            warn,
            service = %svc,
            port,
            limit_bytes = max,
            routes_left_out = left_out.len(),
            first_left_out = ?names,
            endpoints_left_out = dropped_endpoints,
            "a Service port's view is larger than a proxy may be sent: the routes that do not fit are left out (the oldest are kept)"
        );
    }
    built.update = api::DestinationUpdate {
        kind: Some(api::destination_update::Kind::Service(s)),
    };
    built
}

/// Gateway API's order of routes: oldest first (a route without a creation
/// time counts as oldest), then by namespace/name.
fn precedence(
    (ka, a): &(&RouteId, &RouteSpec),
    (kb, b): &(&RouteId, &RouteSpec),
) -> std::cmp::Ordering {
    a.created.cmp(&b.created).then_with(|| ka.cmp(kb))
}

/// The routes served on a Service port, in Gateway API's order, the first
/// `MAX_ROUTES_PER_PARENT` of them. Where a GRPCRoute is attached, the
/// GRPCRoutes only: of the two kinds on one parent, the more specific wins
/// (GEP-1426) and the HTTPRoutes are told they conflict.
fn attached_routes<'a>(
    snap: &'a Snapshot,
    svc: &ObjKey,
    port: &ServicePort,
) -> Vec<(&'a RouteId, &'a RouteSpec)> {
    // A headless Service has no frontend, and its routes' status says none
    // applies (`status.rs`): nor do they for a caller that names it.
    if snap.services.get(svc).is_some_and(|i| i.headless) {
        return Vec::new();
    }
    let mut routes: Vec<(&RouteId, &RouteSpec)> = attached(snap, svc, port).collect();
    if routes.iter().any(|(id, _)| id.kind == RouteKind::Grpc) {
        routes.retain(|(id, _)| id.kind == RouteKind::Grpc);
    }
    routes.sort_by(precedence);
    // Those past it are told so in their status (`past_route_cap`).
    routes.truncate(defaults::MAX_ROUTES_PER_PARENT);
    routes
}

/// Whether route `id`, attached to a Service port, is not served there
/// because `MAX_ROUTES_PER_PARENT` routes come before it.
pub fn past_route_cap(snap: &Snapshot, svc: &ObjKey, port: &ServicePort, id: &RouteId) -> bool {
    // Most Services have a few routes: none is past it.
    if snap
        .routes_by_parent
        .get(svc)
        .is_none_or(|all| all.len() <= defaults::MAX_ROUTES_PER_PARENT)
    {
        return false;
    }
    let Some(route) = snap.routes.get(id).filter(|r| r.attaches_to(svc, port)) else {
        return false;
    };
    let grpc = grpc_route_on(snap, svc, port).is_some();
    if grpc && id.kind != RouteKind::Grpc {
        // Not served there anyway, and told why.
        return false;
    }
    let ahead = attached(snap, svc, port)
        .filter(|(k, _)| !grpc || k.kind == RouteKind::Grpc)
        .filter(|other| precedence(other, &(id, route)).is_lt())
        .count();
    ahead >= defaults::MAX_ROUTES_PER_PARENT
}

fn attached<'a: 'b, 'b>(
    snap: &'a Snapshot,
    svc: &'b ObjKey,
    port: &'b ServicePort,
) -> impl Iterator<Item = (&'a RouteId, &'a RouteSpec)> + 'b {
    snap.routes_by_parent
        .get(svc)
        .into_iter()
        .flatten()
        .filter_map(|k| snap.routes.get(k).map(|r| (k, r)))
        .filter(move |(_, r)| r.attaches_to(svc, port))
}

/// Whether a Service port is declared opaque, as discovery tells callers:
/// its `appProtocol` is not one of HTTP's, or a BackendPolicy lists it among
/// its `opaquePorts`. No route applies there.
pub fn opaque_port(snap: &Snapshot, svc: &ObjKey, sp: &ServicePort) -> bool {
    sp.app_protocol
        .as_deref()
        .is_some_and(|p| !http_app_protocol(p))
        || snap
            .backend_policy(svc)
            .is_some_and(|p| p.opaque_ports.contains(&sp.port))
}

/// Whether callers carry a Service port as TCP, as a route's status tells
/// it: declared opaque, or, with no `appProtocol`, one of the ports proxies
/// carry so by default (`strait_api::DEFAULT_OPAQUE_PORTS`, their
/// `--opaque-ports` unless set otherwise; an HTTP `appProtocol` takes it out).
pub fn carried_as_tcp(snap: &Snapshot, svc: &ObjKey, sp: &ServicePort) -> bool {
    opaque_port(snap, svc, sp)
        || (sp.app_protocol.is_none() && strait_api::DEFAULT_OPAQUE_PORTS.contains(&sp.port))
}

/// Whether an `appProtocol` is HTTP's (or carried over HTTP).
fn http_app_protocol(p: &str) -> bool {
    defaults::HTTP_APP_PROTOCOLS
        .iter()
        .any(|h| h.eq_ignore_ascii_case(p))
}

/// A GRPCRoute attached to a Service port, which the port's HTTPRoutes
/// give way to.
pub fn grpc_route_on<'a>(
    snap: &'a Snapshot,
    svc: &ObjKey,
    port: &ServicePort,
) -> Option<&'a RouteId> {
    attached(snap, svc, port)
        .map(|(id, _)| id)
        .filter(|id| id.kind == RouteKind::Grpc)
        .min()
}

/// Whether a route served on some Service port sends there to `target` (a
/// backendRef of a kind strait sends to, at a port `target` has): where a
/// headless Service's BackendPolicy is used after all.
pub fn served_route_sends_to(snap: &Snapshot, target: &ObjKey) -> bool {
    snap.routes.iter().any(|(id, r)| {
        r.parents.iter().any(|p| {
            let Some(info) = snap.services.get(&p.service) else {
                return false;
            };
            // Not on an opaque port, where no route is applied; a backend
            // weighted 0 gets nothing.
            info.ports.iter().any(|sp| {
                !carried_as_tcp(snap, &p.service, sp)
                    && r.rules.iter().flat_map(|rule| &rule.backends).any(|b| {
                        let (to, port) = b.target(sp.port);
                        b.unresolvable.is_none()
                            && b.weight > 0
                            && to == target
                            && service_port(snap, to, port).is_some()
                    })
                    && attached_routes(snap, &p.service, sp)
                        .iter()
                        .any(|(served, _)| *served == id)
            })
        })
    })
}

/// A Service's port, when the index has both.
fn service_port<'a>(snap: &'a Snapshot, svc: &ObjKey, port: u16) -> Option<&'a ServicePort> {
    snap.services
        .get(svc)?
        .ports
        .iter()
        .find(|p| p.port == port)
}

/// The ready endpoints of a Service port, by address; none when the Service or
/// the port is not in the index. When none is ready, those terminating but
/// still serving (a single replica rolling over, a `Recreate` Deployment, a
/// scale-down draining), as kube-proxy falls back to them: unmeshed callers
/// are still served then, so meshed ones must be too.
///
/// Of a topology-aware Service, only the ready endpoints hinted for the
/// caller's `zone`, under kube-proxy's conditions: every ready endpoint has a
/// hint, and at least one is for that zone. Otherwise (a caller of unknown
/// zone, hints missing or being rolled out, none for the zone) all of them,
/// so that a wrong or partial hint never leaves a caller with nothing.
/// `hinted` is set when the hints are in force, whatever `zone` is.
fn endpoints(
    snap: &Snapshot,
    svc: &ObjKey,
    port: u16,
    zone: Option<&str>,
    hinted: &mut bool,
) -> Vec<api::Endpoint> {
    let Some(sp) = service_port(snap, svc, port) else {
        return Vec::new();
    };
    let topology = snap.services.get(svc).is_some_and(|s| s.topology_aware);
    let port_name = sp.name.clone().unwrap_or_default();
    // A dual-stack Service's IPv6 slices list its pods again: one family's
    // endpoints, IPv4 where it has them (proxies listen on both).
    let ipv4 = snap.slices.get(svc).is_some_and(|s| {
        s.values()
            .any(|slice| !slice.ipv6 && !slice.endpoints.is_empty())
    });
    let slices = || {
        snap.slices
            .get(svc)
            .into_iter()
            .flat_map(|s| s.values())
            .filter(|slice| !(ipv4 && slice.ipv6))
            .filter_map(|slice| {
                let (_, target) = slice.ports.iter().find(|(n, _)| *n == port_name)?;
                Some((slice, *target))
            })
    };
    // Endpoints whose pod is no longer at their address are left out first,
    // so that they do not count as the ready ones either.
    let live = |e: &crate::index::EndpointInfo| -> Option<Option<(&ObjKey, &PodInfo)>> {
        // Written by hand or by an operator (Patroni's leader Endpoints):
        // whichever pod is at the address alone, as the address itself would
        // be called, and none where two claim it.
        let Some(k) = e.pod.as_ref() else {
            return Some(snap.pod_at(e.addr));
        };
        // Another pod claims the address: the pod named (recreated, gone,
        // or ended with its end not seen yet) may not be what answers there,
        // and the one that does is not the Service's: called as the pod
        // named (an identity the two may share), or in plaintext as
        // unmeshed. As with a pod's own address, two claims are none, but
        // for one of them being deleted.
        let shared = || {
            (snap.by_pod_ip.get(&e.addr))
                .is_some_and(|keys| snap.holder(keys).is_none_or(|(h, _)| h != k))
        };
        match snap.pods.get_key_value(k) {
            // The pod named holds another address now (recreated): what
            // answers at this one is not it.
            Some((_, p)) if !p.ips.is_empty() && !p.ips.contains(&e.addr) => None,
            _ if shared() => None,
            Some(kp) => Some(Some(kp)),
            // Not seen yet: called as unmeshed, a meshed pod would get
            // plaintext (refused under STRICT, its identity lost otherwise).
            // Left out until its pod is indexed, as Linkerd does.
            None if snap.every_pod_indexed => None,
            None => Some(None),
        }
    };
    let any_ready = slices().any(|(s, _)| s.endpoints.iter().any(|e| e.ready && live(e).is_some()));
    let ready = || {
        slices()
            .flat_map(|(s, _)| &s.endpoints)
            .filter(|e| e.ready && live(e).is_some())
    };
    let hints = topology && any_ready && ready().all(|e| !e.for_zones.is_empty());
    *hinted |= hints;
    let zone = zone.filter(|z| hints && ready().any(|e| e.for_zones.iter().any(|h| h == z)));
    let mut endpoints = Vec::new();
    for (slice, target) in slices() {
        let usable = |e: &&crate::index::EndpointInfo| {
            if any_ready {
                e.ready && zone.is_none_or(|z| e.for_zones.iter().any(|h| h == z))
            } else {
                e.draining
            }
        };
        for e in slice.endpoints.iter().filter(usable) {
            let Some(pod) = live(e) else {
                continue;
            };
            endpoints.push(endpoint(
                snap,
                SocketAddr::new(e.addr, target),
                pod,
                e.zone.clone().unwrap_or_default(),
            ));
        }
    }
    // An address two slices list is kept from the one that names its pod,
    // if either does: the other copy would have it called in plaintext.
    endpoints.sort_by(|a, b| {
        a.addr
            .as_ref()
            .map(|x| &x.addr)
            .cmp(&b.addr.as_ref().map(|x| &x.addr))
            .then((a.proxy_port == 0).cmp(&(b.proxy_port == 0)))
    });
    endpoints.dedup_by(|a, b| a.addr == b.addr);
    endpoints
}

/// An endpoint at `addr`, with its pod's proxy and identity when it is meshed
/// for that port: a Service port that targets the proxy's own ports or a port
/// it skips (`strait.dev/skip-inbound-ports`) reaches the pod as it is, as the
/// pod's own address does.
fn endpoint(
    snap: &Snapshot,
    addr: SocketAddr,
    pod: Option<(&ObjKey, &PodInfo)>,
    zone: String,
) -> api::Endpoint {
    let (proxy_port, identity) = match pod {
        Some((k, p)) if p.proxied_port(addr.port()) => (
            u32::from(p.inbound_port.unwrap_or(defaults::DEFAULT_INBOUND_PORT)),
            Some(api::WorkloadIdentity {
                spiffe_id: format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    snap.trust_domain, k.namespace, p.service_account
                ),
            }),
        ),
        _ => (0, None),
    };
    // No pod labels: proxies do not use them, they made up most of a view's
    // bytes (a label edit pushed every watcher a new view), and any mesh
    // member may watch any Service.
    api::Endpoint {
        addr: Some(api::SocketAddress {
            addr: addr.to_string(),
        }),
        proxy_port,
        identity,
        weight: 1,
        zone,
    }
}

/// A meshed pod's own address, which a client reaches without a Service's
/// address: a StatefulSet pod's DNS name, a headless Service, an endpoint the
/// client picked itself (databases, brokers, scrapers). The view is that one
/// endpoint, so the connection gets mTLS and the pod's identity is checked,
/// and nothing else: a Service's routes and policy are not the pod's, and the
/// client chose where to go. Not meshed when no pod, or more than one, holds
/// the address, its pod has no proxy, or the port is not the app's through
/// the proxy (the proxy's own ports, ports it skips).
///
/// A node's address at a pod's `hostPort` is that pod's address at the
/// container port, as Linkerd has it: the client's proxy calls the pod's
/// proxy, with mTLS, rather than the node in plaintext.
fn pod_view(snap: &Snapshot, addr: SocketAddr) -> api::DestinationUpdate {
    let at = match snap.pod_at(addr.ip()) {
        Some((key, pod)) => Some((key, pod, addr)),
        None => snap.pod_at_host_port(addr),
    };
    let Some((key, pod, addr)) = at.filter(|(_, p, a)| p.proxied_port(a.port())) else {
        return not_meshed();
    };
    // Named for the pods' service account, not the pod: the name labels the
    // client's metrics, which must stay bounded while pods come and go.
    let name = format!(
        "{}.{}.serviceaccount.{}:{}",
        pod.service_account,
        key.namespace,
        defaults::CLUSTER_DOMAIN,
        addr.port()
    );
    api::DestinationUpdate {
        kind: Some(api::destination_update::Kind::Service(api::Service {
            name: name.clone(),
            version: snap.version,
            changed_at: None,
            backends: vec![api::Backend {
                name,
                endpoints: vec![endpoint(snap, addr, Some((key, pod)), String::new())],
                policy: None,
            }],
            routes: Vec::new(),
            policy: None,
            // As its own proxy carries the port (its `strait.dev/opaque-ports`).
            opaque: pod
                .opaque
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&addr.port())),
            http: false,
        })),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, port: u16) -> DestKey {
        DestKey::Service {
            svc: ObjKey {
                namespace: ns.into(),
                name: name.into(),
            },
            port,
        }
    }

    #[test]
    fn every_spelling_of_a_service_is_one_key() {
        for d in [
            "web:80",
            "web.shop:80",
            "web.shop.svc:80",
            "web.shop.svc.cluster.local:80",
            "WEB.shop.svc.cluster.local.:80",
        ] {
            assert_eq!(
                DestKey::parse(d, "shop").unwrap(),
                svc("shop", "web", 80),
                "{d}"
            );
        }
        assert_eq!(
            DestKey::parse("web:80", "other").unwrap(),
            svc("other", "web", 80)
        );
        assert_eq!(
            DestKey::parse("10.96.0.10:53", "x").unwrap(),
            DestKey::ClusterIp("10.96.0.10:53".parse().unwrap())
        );
        assert_eq!(
            DestKey::parse("api.example.com:443", "x").unwrap(),
            DestKey::External("api.example.com:443".into())
        );
        assert!(DestKey::parse("web", "x").is_err());
        // An address has one key however it is spelt.
        let v6 = DestKey::parse("[fd00::20]:80", "x").unwrap();
        for spelling in ["[fd00::20%1]:80", "[fd00::20%2]:80", "[fd00:0::20]:80"] {
            assert_eq!(DestKey::parse(spelling, "x").unwrap(), v6, "{spelling}");
        }
        assert_eq!(
            DestKey::parse("[::ffff:10.96.0.20]:80", "x").unwrap(),
            DestKey::parse("10.96.0.20:80", "x").unwrap()
        );
        assert!(DestKey::parse("web:http", "x").is_err());
    }

    const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports:
    - {name: http, port: 80, targetPort: 8080, appProtocol: kubernetes.io/h2c}
    - {name: db, port: 5432, appProtocol: tcp}
---
apiVersion: v1
kind: Service
metadata: {name: web-canary, namespace: shop}
spec:
  ports: [{name: http, port: 80, targetPort: 8081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: db, port: 5432}]
endpoints: [{addresses: [10.0.0.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-canary-1, namespace: shop, labels: {kubernetes.io/service-name: web-canary}}
addressType: IPv4
ports: [{name: http, port: 8081}]
endpoints: [{addresses: [10.0.0.2]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-canary, namespace: shop, creationTimestamp: "2024-01-02T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - backendRefs: [{name: web, weight: 90}, {name: web-canary, weight: 10}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: a-newest, namespace: shop, creationTimestamp: "2024-01-03T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
    - name: slow
      matches: [{path: {type: Exact, value: /slow}}]
      timeouts: {request: 5s}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: z-oldest, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: core, kind: Service, name: web, sectionName: http}]
  rules: [{matches: [{method: POST}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: db-only, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 5432}]
  rules: [{}]
"#;

    fn snapshot(yaml: &str) -> Snapshot {
        let mut s = Snapshot::empty("cluster.local");
        for o in crate::manifests::parse_file(yaml).unwrap() {
            o.insert_into(&mut s);
        }
        s
    }

    fn service(s: &Snapshot, key: &DestKey) -> api::Service {
        match view(s, key, None).kind {
            Some(api::destination_update::Kind::Service(s)) => s,
            other => panic!("not a Service: {other:?}"),
        }
    }

    fn addrs(b: &api::Backend) -> Vec<&str> {
        b.endpoints
            .iter()
            .filter_map(|e| e.addr.as_ref().map(|a| a.addr.as_str()))
            .collect()
    }

    const WEB: &str = "web.shop.svc.cluster.local:80";
    const CANARY: &str = "web-canary.shop.svc.cluster.local:80";

    #[test]
    fn routes_attached_to_a_service_reach_its_view_in_order() {
        let s = service(&snapshot(MESH), &svc("shop", "web", 80));
        let names: Vec<&str> = s.routes.iter().map(|r| r.name.as_str()).collect();
        // Oldest first; the route for port 5432 only is not this port's.
        assert_eq!(names, ["shop/z-oldest", "shop/b-canary", "shop/a-newest"]);
        let slow = &s.routes[2].rules[0];
        assert_eq!(slow.name, "slow");
        assert!(
            slow.backends.is_empty(),
            "a rule without backendRefs has none"
        );
        assert_eq!(slow.request_timeout.map(|d| d.seconds), Some(5));
        assert_eq!(s.routes[0].rules[0].name, "0", "unnamed rules go by index");
        let split: Vec<(&str, u32)> = s.routes[1].rules[0]
            .backends
            .iter()
            .map(|b| (b.backend.as_str(), b.weight))
            .collect();
        assert_eq!(split, [(WEB, 90), (CANARY, 10)]);

        let db = service(&snapshot(MESH), &svc("shop", "web", 5432));
        let names: Vec<&str> = db.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["shop/db-only", "shop/a-newest"],
            "no creation time sorts first"
        );
    }

    /// Where a GRPCRoute is attached to a port, it is served and the port's
    /// HTTPRoutes are not (GEP-1426); it may share an HTTPRoute's name.
    #[test]
    fn a_grpc_route_on_a_port_is_served_instead_of_its_http_routes() {
        let grpc = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: b-canary, namespace: shop, creationTimestamp: "2024-01-02T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - matches: [{method: {service: shop.v1.Cart, method: AddItem}}]
      backendRefs: [{name: web-canary}]
"#;
        let snap = snapshot(&format!("{MESH}{grpc}"));
        let s = service(&snap, &svc("shop", "web", 80));
        let names: Vec<&str> = s.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["shop/b-canary"]);
        let rule = &s.routes[0].rules[0];
        assert_eq!(
            rule.matches[0].path,
            Some(api::http_match::Path::Exact("/shop.v1.Cart/AddItem".into()))
        );
        assert_eq!(rule.backends[0].backend, CANARY);
        // Another port of the Service keeps its HTTPRoutes.
        let db = service(&snap, &svc("shop", "web", 5432));
        assert_eq!(db.routes.len(), 2);
        // Removing the GRPCRoute brings the HTTPRoutes back, the one of its
        // name among them.
        let mut snap = snap;
        snap.remove_route(&crate::routes::RouteId::grpc(ObjKey {
            namespace: "shop".into(),
            name: "b-canary".into(),
        }));
        let s = service(&snap, &svc("shop", "web", 80));
        let names: Vec<&str> = s.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["shop/z-oldest", "shop/b-canary", "shop/a-newest"]);
        assert_eq!(s.routes[1].rules[0].backends.len(), 2);
    }

    /// A backendRef of a kind strait does not send to, or to another
    /// namespace's Service (no ReferenceGrant is read), has no backend: its
    /// share of requests finds none (500), whatever Service shares its
    /// name, and the rest of the rule is served.
    #[test]
    fn a_backend_of_another_kind_takes_its_share_nowhere() {
        for other in [
            "{group: multicluster.x-k8s.io, kind: ServiceImport, name: web, weight: 1}",
            "{name: web, namespace: other, port: 80, weight: 1}",
        ] {
            let import = format!(
                r#"
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: other}}
spec: {{clusterIP: 10.96.9.9, ports: [{{name: http, port: 80}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: z-import, namespace: shop, creationTimestamp: "2023-01-01T00:00:00Z"}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: 80}}]
  rules:
    - backendRefs:
      - {{name: web-canary, weight: 1}}
      - {other}
"#
            );
            let snap = snapshot(&format!("{MESH}{import}"));
            let s = service(&snap, &svc("shop", "web", 80));
            assert_eq!(s.routes[0].name, "shop/z-import");
            let split: Vec<(&str, u32)> = s.routes[0].rules[0]
                .backends
                .iter()
                .map(|b| (b.backend.as_str(), b.weight))
                .collect();
            assert_eq!(split.len(), 2);
            assert_eq!(split[0], (CANARY, 1));
            assert_eq!(split[1].1, 1);
            assert!(
                s.backends.iter().all(|b| b.name != split[1].0),
                "{split:?} goes to a backend"
            );
        }
    }

    /// The view alone.
    fn view(snap: &Snapshot, key: &DestKey, zone: Option<&str>) -> api::DestinationUpdate {
        build(snap, key, zone).update
    }

    /// Each backend's name and endpoint addresses.
    fn backends_of(s: &api::Service) -> Vec<(&str, Vec<&str>)> {
        s.backends
            .iter()
            .map(|b| (b.name.as_str(), addrs(b)))
            .collect()
    }

    /// A route on `web` in `shop`, of one rule matching a header of
    /// `header_bytes`, created `created` seconds into 2024 (`None`: no time).
    pub(crate) fn route_on(
        port: Option<u16>,
        created: Option<i64>,
        header_bytes: usize,
    ) -> RouteSpec {
        use crate::routes::{ParentRef, Rule};
        let start = 1_704_067_200;
        RouteSpec {
            created: created.map(|s| {
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::from_second(start + s).unwrap(),
                )
            }),
            parents: vec![ParentRef {
                service: ObjKey {
                    namespace: "shop".into(),
                    name: "web".into(),
                },
                port,
                section_name: None,
            }],
            rules: vec![Rule {
                name: None,
                matches: vec![api::HttpMatch {
                    headers: vec![api::HeaderMatch {
                        name: "x-big".into(),
                        value: Some(api::header_match::Value::Exact("v".repeat(header_bytes))),
                    }],
                    ..Default::default()
                }],
                filters: Vec::new(),
                backends: Vec::new(),
                request_timeout: None,
                backend_request_timeout: None,
                retry: None,
            }],
        }
    }

    fn route_id(name: &str) -> RouteId {
        RouteId::http(ObjKey {
            namespace: "shop".into(),
            name: name.into(),
        })
    }

    fn route_names(s: &api::Service) -> Vec<&str> {
        s.routes.iter().map(|r| r.name.as_str()).collect()
    }

    /// A view too large for a proxy to take (a tenant's routes of 1.2 MiB
    /// each on one port) is sent without the routes that do not fit: the
    /// older routes and the Service's endpoints are still served, and so
    /// is a newer route small enough to fit.
    #[test]
    fn an_oversized_view_leaves_out_the_newer_routes_that_do_not_fit() {
        let mut snap = snapshot(MESH);
        let big = 1_200 * 1024;
        // After MESH's routes, which are of January 2024's first days.
        for i in 0..9 {
            snap.add_route(
                route_id(&format!("big-{i}")),
                route_on(Some(80), Some(10 * 86_400 + i), big),
            );
        }
        snap.add_route(route_id("small"), route_on(Some(80), Some(20 * 86_400), 10));
        let built = build(&snap, &svc("shop", "web", 80), None);
        assert!(built.cut);
        let size = built.update.encoded_len();
        assert!(
            size + STAMP_BYTES <= defaults::MAX_DISCOVERY_VIEW_BYTES,
            "{size} bytes"
        );
        let Some(api::destination_update::Kind::Service(s)) = &built.update.kind else {
            panic!("not a Service: {:?}", built.update)
        };
        let fit = defaults::MAX_DISCOVERY_VIEW_BYTES / (big + 16);
        let mut want = vec!["shop/z-oldest", "shop/b-canary", "shop/a-newest"];
        let bigs: Vec<String> = (0..fit).map(|i| format!("shop/big-{i}")).collect();
        want.extend(bigs.iter().map(String::as_str));
        want.push("shop/small");
        assert_eq!(route_names(s), want);
        let backends = backends_of(s);
        assert_eq!(
            backends,
            [
                (WEB, vec!["10.0.0.1:8080"]),
                (CANARY, vec!["10.0.0.2:8081"])
            ]
        );
        // Another port of the Service is not cut for this one's routes.
        assert!(!build(&snap, &svc("shop", "web", 5432), None).cut);
    }

    /// The limit is on the view as sent: one that fits it is sent whole,
    /// and one byte less leaves out the newest route.
    #[test]
    fn a_view_that_fits_the_limit_is_sent_whole() {
        let snap = snapshot(MESH);
        let key = svc("shop", "web", 80);
        let whole = build_within(&snap, &key, None, usize::MAX);
        assert!(!whole.cut);
        let max = whole.update.encoded_len() + STAMP_BYTES;
        let at = build_within(&snap, &key, None, max);
        assert!(!at.cut);
        assert_eq!(at.update, whole.update);
        assert_eq!(view(&snap, &key, None), whole.update);
        let under = build_within(&snap, &key, None, max - 1);
        assert!(under.cut);
        let Some(api::destination_update::Kind::Service(s)) = &under.update.kind else {
            panic!("not a Service")
        };
        assert_eq!(route_names(s), ["shop/z-oldest", "shop/b-canary"]);
        assert_eq!(s.backends.len(), 2, "the canary's route is still served");
    }

    /// Past `MAX_ROUTES_PER_PARENT` routes on a port, the newest (then last
    /// by namespace/name) are not served there; the port's count is its own.
    #[test]
    fn routes_past_the_limit_of_a_port_are_not_served() {
        let mut snap = snapshot(MESH);
        let max = defaults::MAX_ROUTES_PER_PARENT;
        // MESH has three routes on port 80 and two on 5432.
        for i in 0..max - 3 {
            snap.add_route(
                route_id(&format!("r-{i:03}")),
                route_on(Some(80), Some(86_400), 1),
            );
        }
        let key = svc("shop", "web", 80);
        let names = |snap: &Snapshot| {
            route_names(&service(snap, &key))
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        let full = names(&snap);
        assert_eq!(full.len(), max);
        // Two newer ones, of one creation time: ordered by name.
        snap.add_route(route_id("s-late"), route_on(Some(80), Some(5 * 86_400), 1));
        snap.add_route(route_id("a-late"), route_on(Some(80), Some(5 * 86_400), 1));
        // And one on the other port only.
        snap.add_route(route_id("db-2"), route_on(Some(5432), Some(0), 1));
        assert_eq!(names(&snap), full);
        let web = ObjKey {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let port80 = snap.services[&web].ports[0].clone();
        let past =
            |snap: &Snapshot, name: &str| past_route_cap(snap, &web, &port80, &route_id(name));
        assert!(past(&snap, "s-late") && past(&snap, "a-late"));
        for kept in ["r-000", "z-oldest", "db-2"] {
            assert!(!past(&snap, kept), "{kept}");
        }
        assert_eq!(service(&snap, &svc("shop", "web", 5432)).routes.len(), 3);
        // One of the oldest going makes room for the next.
        snap.remove_route(&route_id("r-000"));
        assert!(names(&snap).contains(&"shop/a-late".to_string()));
        assert!(!past(&snap, "a-late") && past(&snap, "s-late"));
    }

    #[test]
    fn backend_refs_bring_their_endpoints() {
        let s = service(&snapshot(MESH), &svc("shop", "web", 80));
        let backends = backends_of(&s);
        assert_eq!(
            backends,
            [
                (WEB, vec!["10.0.0.1:8080"]),
                (CANARY, vec!["10.0.0.2:8081"])
            ],
            "the Service first, then each backend once"
        );
    }

    /// Changes every slice of shop/web in place.
    fn edit_web_slices(snap: &mut Snapshot, f: impl Fn(&mut crate::index::SliceInfo)) {
        let web = snap
            .slices
            .get_mut(&ObjKey {
                namespace: "shop".into(),
                name: "web".into(),
            })
            .unwrap();
        for name in web.keys().cloned().collect::<Vec<_>>() {
            let mut s = web.get(&name).unwrap().clone();
            f(&mut s);
            web.insert(name, s);
        }
    }

    /// A dual-stack Service has a slice per family, listing the same pods:
    /// its IPv4 one brings the endpoints, so that no pod is called twice as
    /// often. An IPv6-only Service's IPv6 slice brings them (proxies listen
    /// on both families), and an FQDN slice never does: it has no addresses
    /// to dial.
    #[test]
    fn one_family_of_slices_brings_endpoints() {
        let yaml = format!(
            "{MESH}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v6, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv6
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [\"fd00::1\"]}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-fqdn, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: FQDN
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [db.example.com]}}]
"
        );
        let s = service(&snapshot(&yaml), &svc("shop", "web", 80));
        assert_eq!(addrs(&s.backends[0]), ["10.0.0.1:8080"]);

        let mut snap = snapshot(&yaml);
        edit_web_slices(&mut snap, |s| {
            if !s.ipv6 {
                s.endpoints.clear();
            }
        });
        let s = service(&snap, &svc("shop", "web", 80));
        assert_eq!(addrs(&s.backends[0]), ["[fd00::1]:8080"], "IPv6 only");
    }

    /// Endpoints terminating but still serving are used while none is ready,
    /// and only then; one neither ready nor serving never is.
    #[test]
    fn terminating_endpoints_still_serving_stand_in_while_none_is_ready() {
        let slice = |endpoints: &str| {
            format!(
                "{MESH}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-2, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: {endpoints}
"
            )
        };
        let draining = "{addresses: [\"10.0.0.7\"], conditions: {ready: false, serving: true, terminating: true}}";
        let gone = "{addresses: [\"10.0.0.8\"], conditions: {ready: false, serving: false, terminating: true}}";
        let starting = "{addresses: [\"10.0.0.9\"], conditions: {ready: false}}";
        // With the Service's ready endpoint: only it.
        let s = service(
            &snapshot(&slice(&format!("[{draining}, {gone}, {starting}]"))),
            &svc("shop", "web", 80),
        );
        assert_eq!(addrs(&s.backends[0]), ["10.0.0.1:8080"]);
        // Without it: the one still serving.
        let mut snap = snapshot(&slice(&format!("[{draining}, {gone}, {starting}]")));
        edit_web_slices(&mut snap, |s| {
            s.endpoints.retain(|e| e.addr.to_string() != "10.0.0.1")
        });
        let s = service(&snap, &svc("shop", "web", 80));
        assert_eq!(addrs(&s.backends[0]), ["10.0.0.7:8080"]);
    }

    /// A headless Service's routes are said never to apply (their status):
    /// a caller that names the Service (an `--upstream`, HTTP sent straight
    /// to the outbound port) does not get them either.
    #[test]
    fn a_headless_service_named_gets_no_routes() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: db}]
  rules: [{matches: [{path: {type: PathPrefix, value: /a}}], timeouts: {request: 1s}}]
"#;
        let s = service(&snapshot(yaml), &svc("shop", "db", 80));
        assert!(s.routes.is_empty(), "{:?}", s.routes);
    }

    /// An endpoint whose `serving` is unset serves (the v1 API's reading,
    /// and kube-proxy's): terminating, it stands in while none is ready,
    /// though its `ready` is false. Slices written by hand or by another
    /// controller leave it out.
    #[test]
    fn an_endpoint_without_serving_serves() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-1, namespace: shop, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.2.0.1], conditions: {ready: false, terminating: true}}
  - {addresses: [10.2.0.2], conditions: {ready: false}}
"#;
        let s = service(&snapshot(yaml), &svc("shop", "ext", 80));
        assert_eq!(addrs(&s.backends[0]), ["10.2.0.1:8080"]);
    }

    /// A pod on the node's network is not meshed, whatever its annotations
    /// say (a copied manifest): its endpoint is the app's port in
    /// plaintext, not the node's address on the proxy's port.
    #[test]
    fn a_host_network_pod_is_not_a_meshed_endpoint() {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: agent-0, namespace: shop, annotations: {strait.dev/inbound-port: "4143"}}
spec: {hostNetwork: true, serviceAccountName: agent, containers: [{name: a, image: a}]}
status: {phase: Running, podIP: 10.9.0.1, podIPs: [{ip: 10.9.0.1}]}
---
apiVersion: v1
kind: Service
metadata: {name: agent, namespace: shop}
spec: {ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: agent-1, namespace: shop, labels: {kubernetes.io/service-name: agent}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.9.0.1], targetRef: {kind: Pod, name: agent-0}}
"#;
        let s = service(&snapshot(yaml), &svc("shop", "agent", 80));
        let e = &s.backends[0].endpoints;
        assert_eq!(addrs(&s.backends[0]), ["10.9.0.1:8080"]);
        assert_eq!(e[0].proxy_port, 0, "{e:?}");
    }

    /// A backendRef whose Service is gone is left out of the backends, while
    /// the route still names it: the proxies answer its share 500.
    #[test]
    fn a_deleted_backend_service_is_left_out() {
        let mut snap = snapshot(MESH);
        snap.remove_service(&ObjKey {
            namespace: "shop".into(),
            name: "web-canary".into(),
        });
        let s = service(&snap, &svc("shop", "web", 80));
        let names: Vec<&str> = s.backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, [WEB]);
        let named = s
            .routes
            .iter()
            .flat_map(|r| &r.rules)
            .flat_map(|r| &r.backends)
            .any(|w| w.backend == CANARY);
        assert!(named, "the route keeps its share: {s:?}");
    }

    #[test]
    fn a_cluster_ip_view_equals_the_service_name_view() {
        let snap = snapshot(MESH);
        let by_ip = DestKey::ClusterIp("10.96.0.20:80".parse().unwrap());
        assert_eq!(
            view(&snap, &by_ip, None),
            view(&snap, &svc("shop", "web", 80), None)
        );
        assert_eq!(service(&snap, &by_ip).routes.len(), 3);
    }

    const POLICIES: &str = r#"
apiVersion: policy.strait.dev/v1alpha1
kind: BackendPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRef: {group: "", kind: Service, name: web}
  connectTimeout: 1s
  loadBalancer: {type: RoundRobin}
---
apiVersion: policy.strait.dev/v1alpha1
kind: BackendPolicy
metadata: {name: canary, namespace: shop}
spec:
  targetRef: {kind: Service, name: web-canary}
  loadBalancer: {type: ConsistentHash, hashCookie: session}
  opaquePorts: [80]
"#;

    #[test]
    fn backend_policy_reaches_the_view() {
        let snap = snapshot(&format!("{MESH}---{POLICIES}"));
        let s = service(&snap, &svc("shop", "web", 80));
        let own = s.policy.clone().unwrap();
        assert_eq!(own.load_balancer, api::LoadBalancer::RoundRobin as i32);
        assert_eq!(own.connect_timeout.map(|d| d.seconds), Some(1));
        assert_eq!(s.backends[0].policy.as_ref(), Some(&own));
        let canary = s.backends[1].policy.as_ref().unwrap();
        assert_eq!(
            canary.load_balancer,
            api::LoadBalancer::ConsistentHash as i32
        );
        assert!(!s.opaque, "the canary's opaque ports are its own");
        assert!(service(&snap, &svc("shop", "web-canary", 80)).opaque);
    }

    #[test]
    fn of_two_backend_policies_for_a_service_the_first_by_name_applies() {
        // The canary's policy, renamed and on web (the rest of POLICIES is
        // not repeated: one object twice in a file is refused).
        let canary = POLICIES.split("---").nth(1).unwrap();
        let second = canary
            .replace("name: canary,", "name: a-first,")
            .replace("name: web-canary}", "name: web}");
        let snap = snapshot(&format!("{MESH}---{POLICIES}---{second}"));
        let s = service(&snap, &svc("shop", "web", 80));
        let p = s.policy.unwrap();
        assert_eq!(p.load_balancer, api::LoadBalancer::ConsistentHash as i32);
    }

    #[test]
    fn app_protocol_tcp_makes_the_port_opaque() {
        let snap = snapshot(MESH);
        assert!(service(&snap, &svc("shop", "web", 5432)).opaque);
        assert!(
            !service(&snap, &svc("shop", "web", 80)).opaque,
            "kubernetes.io/h2c is HTTP"
        );
        let plain = MESH.replace(", appProtocol: kubernetes.io/h2c", "");
        assert!(!service(&snapshot(&plain), &svc("shop", "web", 80)).opaque);
        let mysql = MESH.replace("kubernetes.io/h2c", "mysql");
        assert!(service(&snapshot(&mysql), &svc("shop", "web", 80)).opaque);
        // Istio's names for HTTP/2 and gRPC-Web: a port moved from Istio
        // keeps its routes.
        for http in ["http2", "grpc-web", "HTTP2"] {
            let named = MESH.replace("kubernetes.io/h2c", http);
            assert!(
                !service(&snapshot(&named), &svc("shop", "web", 80)).opaque,
                "{http} is HTTP"
            );
        }
    }

    #[test]
    fn route_and_policy_changes_change_the_view_and_others_do_not() {
        let key = svc("shop", "web", 80);
        let before = view(&snapshot(MESH), &key, None);
        let elsewhere = format!(
            "{MESH}---\napiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: shop}}\nspec: {{ports: [{{port: 80}}]}}\n"
        );
        assert_eq!(view(&snapshot(&elsewhere), &key, None), before);
        let reweighted = MESH.replace("weight: 10}", "weight: 20}");
        assert_ne!(view(&snapshot(&reweighted), &key, None), before);
        let with_policy = format!("{MESH}---{POLICIES}");
        assert_ne!(view(&snapshot(&with_policy), &key, None), before);
    }

    /// A Service port that targets the proxy's own ports, or a port the pod's
    /// proxy skips, reaches the pod as it is: sent as meshed, the client's
    /// proxy would dial the peer's inbound port, which refuses them.
    #[test]
    fn a_service_port_the_proxy_does_not_serve_is_not_meshed() {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, annotations: {strait.dev/inbound-port: "4143", strait.dev/skip-inbound-ports: "9000"}}
spec: {serviceAccountName: web, containers: [{name: web, image: web}]}
status: {phase: Running, podIP: 10.1.0.9, podIPs: [{ip: 10.1.0.9}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports:
    - {name: http, port: 80, targetPort: 8080}
    - {name: admin, port: 4191, targetPort: 4191}
    - {name: skipped, port: 9000, targetPort: 9000}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: admin, port: 4191}, {name: skipped, port: 9000}]
endpoints: [{addresses: [10.1.0.9], targetRef: {kind: Pod, name: web-0}}]
"#;
        let s = snapshot(yaml);
        let proxied = |port: u16| {
            let e = &service(&s, &svc("shop", "web", port)).backends[0].endpoints[0];
            (e.proxy_port, e.identity.is_some())
        };
        assert_eq!(proxied(80), (4143, true));
        assert_eq!(proxied(4191), (0, false));
        assert_eq!(proxied(9000), (0, false));
    }

    /// Only an endpoint's first address is one (Kubernetes defines nothing
    /// for the others, and kube-proxy does not use them), and an address two
    /// slices list is taken with its pod when either names one: taken from
    /// the slice without, a meshed pod would be called in plaintext, and a
    /// STRICT one refuse it.
    #[test]
    fn an_endpoint_is_its_first_address_and_keeps_its_pod_from_any_slice() {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, annotations: {strait.dev/inbound-port: "4143"}}
spec: {serviceAccountName: web, containers: [{name: web, image: web}]}
status: {phase: Running, podIP: 10.1.0.9, podIPs: [{ip: 10.1.0.9}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-by-hand, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.9]}, {addresses: [10.1.0.7, 10.1.0.8]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: b-controller, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.9], targetRef: {kind: Pod, name: web-0}}]
"#;
        let s = snapshot(yaml);
        let web = service(&s, &svc("shop", "web", 80));
        let b = &web.backends[0];
        assert_eq!(addrs(b), ["10.1.0.7:8080", "10.1.0.9:8080"]);
        let pod = b
            .endpoints
            .iter()
            .find(|e| e.addr.as_ref().unwrap().addr == "10.1.0.9:8080")
            .unwrap();
        assert!(pod.identity.is_some() && pod.proxy_port != 0, "{pod:?}");
    }

    /// A Service whose endpoints an operator writes without naming pods
    /// (Patroni's leader): one at meshed pod `shop/db-0`'s address, one at an
    /// address outside the cluster.
    pub(crate) const LEADER_NAMING_NO_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, annotations: {strait.dev/inbound-port: "4143"}}
spec: {serviceAccountName: db, containers: [{name: db, image: db}]}
status: {phase: Running, podIP: 10.1.0.9, podIPs: [{ip: 10.1.0.9}]}
---
apiVersion: v1
kind: Service
metadata: {name: db-leader, namespace: shop}
spec: {ports: [{name: pg, port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-leader-mirrored, namespace: shop, labels: {kubernetes.io/service-name: db-leader}}
addressType: IPv4
ports: [{name: pg, port: 5432}]
endpoints: [{addresses: [10.1.0.9]}, {addresses: [10.9.0.1]}]
"#;

    /// Endpoints written by hand or by an operator (Patroni's leader Service,
    /// Endpoints mirrored into slices) name no pod: one at a meshed pod's
    /// address is that pod, called over mTLS as its address alone would be,
    /// not in plaintext that a STRICT pod refuses. Unmeshed addresses stay
    /// plaintext.
    #[test]
    fn an_endpoint_naming_no_pod_at_a_meshed_pod_s_address_is_that_pod() {
        let s = snapshot(LEADER_NAMING_NO_POD);
        let leader = service(&s, &svc("shop", "db-leader", 5432));
        let b = &leader.backends[0];
        assert_eq!(addrs(b), ["10.1.0.9:5432", "10.9.0.1:5432"]);
        let at = |a: &str| {
            b.endpoints
                .iter()
                .find(|e| e.addr.as_ref().unwrap().addr == a)
                .unwrap()
        };
        let pod = at("10.1.0.9:5432");
        assert_eq!(pod.proxy_port, 4143, "{pod:?}");
        assert_eq!(
            pod.identity.as_ref().map(|i| i.spiffe_id.as_str()),
            Some("spiffe://cluster.local/ns/shop/sa/db")
        );
        let outside = at("10.9.0.1:5432");
        assert!(
            outside.identity.is_none() && outside.proxy_port == 0,
            "{outside:?}"
        );
    }

    /// An ExternalName Service is an alias, not a meshed Service without
    /// endpoints: callers pass through to the name, and no route sends to it.
    #[test]
    fn an_external_name_service_is_not_meshed() {
        let s = snapshot(
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec: {type: ExternalName, externalName: db.example.com, ports: [{port: 5432}]}\n",
        );
        assert_eq!(view(&s, &svc("shop", "db", 5432), None), not_meshed());
    }

    /// A slice that names a pod no longer at its address (gone, and the
    /// address another's; or recreated elsewhere) does not send callers to
    /// whoever holds it now, unverified.
    #[test]
    fn an_endpoint_whose_pod_is_no_longer_there_is_left_out() {
        let with = |pods: &str, endpoints: &str| {
            format!(
                r#"{pods}
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
  - {{addresses: [10.1.0.9], targetRef: {{kind: Pod, name: web-0}}}}
  - {endpoints}
"#
            )
        };
        let yaml = |pods: &str| with(pods, "{addresses: [10.1.0.10]}");
        let pod = |ns: &str, name: &str, ip: &str| {
            format!(
                "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, annotations: {{strait.dev/inbound-port: \"4143\"}}}}
spec: {{serviceAccountName: {name}, containers: [{{name: a, image: a}}]}}
status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}
---"
            )
        };
        let endpoints = |pods: &str| {
            let s = snapshot(&yaml(pods));
            let v = service(&s, &svc("shop", "web", 80));
            v.backends[0]
                .endpoints
                .iter()
                .map(|e| (e.addr.as_ref().unwrap().addr.clone(), e.proxy_port))
                .collect::<Vec<_>>()
        };
        let ours = endpoints(&pod("shop", "web-0", "10.1.0.9"));
        assert_eq!(
            ours,
            [("10.1.0.10:8080".into(), 0), ("10.1.0.9:8080".into(), 4143)]
        );
        // Gone, its address another namespace's pod's now.
        let taken = endpoints(&pod("other", "x", "10.1.0.9"));
        assert_eq!(taken, [("10.1.0.10:8080".to_string(), 0)]);
        // Recreated at another address.
        let moved = endpoints(&pod("shop", "web-0", "10.1.0.77"));
        assert_eq!(moved, [("10.1.0.10:8080".to_string(), 0)]);
        // Gone, and nobody at its address yet: as before.
        assert_eq!(endpoints("").len(), 2);
        // From the API server, which indexes every pod, one it names and
        // has not indexed is not seen yet: left out, not called as unmeshed
        // (plaintext to a meshed pod). Manifests may name undeclared pods.
        let mut from_api = snapshot(&yaml(""));
        from_api.every_pod_indexed = true;
        let v = service(&from_api, &svc("shop", "web", 80));
        assert_eq!(addrs(&v.backends[0]), ["10.1.0.10:8080"]);
        // Recreated and not addressed yet, its old address another's.
        let unaddressed = format!(
            "{}\n{}",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, annotations: {strait.dev/inbound-port: \"4143\"}}\nspec: {serviceAccountName: web, containers: [{name: a, image: a}]}\nstatus: {phase: Pending}\n---",
            pod("other", "x", "10.1.0.9")
        );
        assert_eq!(endpoints(&unaddressed), [("10.1.0.10:8080".to_string(), 0)]);
        // Still at its address while a new pod of the same account is seen
        // there too (its end not seen yet): neither is called as the other.
        let both = format!(
            "{}\n{}",
            pod("shop", "web-0", "10.1.0.9"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: other-0, namespace: shop, annotations: {strait.dev/inbound-port: \"4143\"}}\nspec: {serviceAccountName: web-0, containers: [{name: a, image: a}]}\nstatus: {phase: Running, podIP: 10.1.0.9, podIPs: [{ip: 10.1.0.9}]}\n---"
        );
        assert_eq!(endpoints(&both), [("10.1.0.10:8080".to_string(), 0)]);

        // A stale ready endpoint does not count as ready: the one still
        // serving while it terminates stands in, as when none is ready.
        let s = snapshot(&with(
            &pod("other", "x", "10.1.0.9"),
            "{addresses: [10.1.0.11], conditions: {ready: false, serving: true, terminating: true}}",
        ));
        let v = service(&s, &svc("shop", "web", 80));
        assert_eq!(addrs(&v.backends[0]), ["10.1.0.11:8080"]);
    }

    /// A client that dials a meshed pod's own address (a StatefulSet's pod,
    /// a headless Service) gets that pod, with its identity, and nothing else.
    #[test]
    fn a_pods_own_address_is_that_pod_over_mtls() {
        let pod = |name: &str, ip: &str, meshed: bool, phase: &str| {
            let annotations = if meshed {
                "annotations: {strait.dev/inbound-port: \"4143\", strait.dev/skip-inbound-ports: \"22,9000-9010\", strait.dev/opaque-ports: \"5060,6440-6450\"}"
            } else {
                "annotations: {}"
            };
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}, {annotations}}}\nspec: {{serviceAccountName: db, containers: [{{name: db, image: db}}]}}\nstatus: {{phase: {phase}, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n---\n"
            )
        };
        let mut s = snapshot(
            &[
                pod("db-0", "10.1.0.5", true, "Running"),
                pod("plain-0", "10.1.0.6", false, "Running"),
                pod("done-0", "10.1.0.7", true, "Succeeded"),
            ]
            .concat(),
        );
        let at = |ip: &str| DestKey::ClusterIp(format!("{ip}:5432").parse().unwrap());
        let db = service(&s, &at("10.1.0.5"));
        assert_eq!(db.name, "db.shop.serviceaccount.cluster.local:5432");
        assert!(db.routes.is_empty() && !db.opaque);
        let [b] = db.backends.as_slice() else {
            panic!("{db:?}")
        };
        assert_eq!(addrs(b), ["10.1.0.5:5432"]);
        let e = &b.endpoints[0];
        assert_eq!(e.proxy_port, 4143);
        assert_eq!(
            e.identity.as_ref().unwrap().spiffe_id,
            "spiffe://cluster.local/ns/shop/sa/db"
        );
        for ip in ["10.1.0.6", "10.1.0.7", "10.1.0.8"] {
            assert_eq!(view(&s, &at(ip), None), not_meshed(), "{ip}");
        }
        // The ports the pod declares opaque are opaque to its callers too:
        // a server-first protocol not waited on, SIP not read as HTTP.
        for (port, opaque) in [(5060, true), (6446, true), (6451, false), (5432, false)] {
            let key = DestKey::ClusterIp(format!("10.1.0.5:{port}").parse().unwrap());
            assert_eq!(service(&s, &key).opaque, opaque, "{port}");
        }
        // The proxy's own ports and those it skips are not the app's through it.
        for port in [22, 4140, 4143, 4191, 9000, 9010] {
            let key = DestKey::ClusterIp(format!("10.1.0.5:{port}").parse().unwrap());
            assert_eq!(view(&s, &key, None), not_meshed(), "{port}");
        }
        // An address two pods claim (one ended, its successor started) is
        // nobody's until one lets go of it.
        for o in crate::manifests::parse_file(&pod("db-1", "10.1.0.5", true, "Pending")).unwrap() {
            o.insert_into(&mut s);
        }
        assert_eq!(view(&s, &at("10.1.0.5"), None), not_meshed());
        s.remove_pod(&ObjKey {
            namespace: "shop".into(),
            name: "db-0".into(),
        });
        let db1 = service(&s, &at("10.1.0.5"));
        assert_eq!(db1.backends[0].endpoints[0].proxy_port, 4143, "db-1's now");
    }

    /// A pod stuck terminating (a volume that will not unmount) keeps its
    /// address in its status after the network gave it to a new pod: the
    /// address is the new pod's, as a Service's endpoint and called
    /// directly, not out of the mesh until someone force-deletes the old.
    #[test]
    fn an_address_given_on_by_a_pod_stuck_terminating_is_the_new_pods() {
        let pod = |name: &str, extra: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, {extra}annotations: {{strait.dev/inbound-port: \"4143\"}}}}\nspec: {{serviceAccountName: {name}, containers: [{{name: web, image: web}}]}}\nstatus: {{phase: Running, podIP: 10.1.0.5, podIPs: [{{ip: 10.1.0.5}}]}}\n---\n"
            )
        };
        let svc_and_slice = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.1.0.5], targetRef: {kind: Pod, name: web-new, namespace: shop}}]\n";
        let stuck = pod("web-old", "deletionTimestamp: \"2026-01-01T00:00:00Z\", ");
        let s = snapshot(&[stuck.clone(), pod("web-new", ""), svc_and_slice.into()].concat());
        let web = service(&s, &svc("shop", "web", 80));
        assert_eq!(addrs(&web.backends[0]), ["10.1.0.5:8080"]);
        let direct = service(&s, &DestKey::ClusterIp("10.1.0.5:8080".parse().unwrap()));
        let e = &direct.backends[0].endpoints[0];
        assert_eq!(
            e.identity.as_ref().unwrap().spiffe_id,
            "spiffe://cluster.local/ns/shop/sa/web-new"
        );
        // Two claims neither being deleted, or both: nobody's, as before.
        let s = snapshot(&[pod("web-old", ""), pod("web-new", ""), svc_and_slice.into()].concat());
        assert!(
            service(&s, &svc("shop", "web", 80)).backends[0]
                .endpoints
                .is_empty()
        );
        let both = pod("web-new", "deletionTimestamp: \"2026-01-01T00:00:00Z\", ");
        let s = snapshot(&[stuck, both].concat());
        let direct = DestKey::ClusterIp("10.1.0.5:8080".parse().unwrap());
        assert_eq!(view(&s, &direct, None), not_meshed());
    }

    /// A node's address at a meshed pod's `hostPort` (a node-local agent, a
    /// broker advertising its node's address) is that pod at its container
    /// port, over mTLS with its identity; not once the pod has ended, nor at
    /// a port it does not publish, nor for a UDP one.
    #[test]
    fn a_node_address_at_a_pods_host_port_is_that_pod() {
        let pod = |name: &str, phase: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: obs, annotations: {{strait.dev/inbound-port: \"4143\"}}}}\nspec: {{serviceAccountName: agent, containers: [{{name: agent, image: a, ports: [{{containerPort: 4317, hostPort: 14317}}, {{containerPort: 8125, hostPort: 8125, protocol: UDP}}, {{containerPort: 9090}}]}}]}}\nstatus: {{phase: {phase}, hostIP: 10.0.0.9, hostIPs: [{{ip: 10.0.0.9}}], podIP: 10.1.0.5, podIPs: [{{ip: 10.1.0.5}}]}}\n"
            )
        };
        let at = |a: &str| DestKey::ClusterIp(a.parse().unwrap());
        let s = snapshot(&pod("agent-x", "Running"));
        let v = service(&s, &at("10.0.0.9:14317"));
        let [b] = v.backends.as_slice() else {
            panic!("{v:?}")
        };
        assert_eq!(addrs(b), ["10.1.0.5:4317"]);
        assert_eq!(b.endpoints[0].proxy_port, 4143);
        assert_eq!(
            b.endpoints[0].identity.as_ref().unwrap().spiffe_id,
            "spiffe://cluster.local/ns/obs/sa/agent"
        );
        for other in ["10.0.0.9:8125", "10.0.0.9:9090", "10.0.0.8:14317"] {
            assert_eq!(view(&s, &at(other), None), not_meshed(), "{other}");
        }
        let s = snapshot(&pod("agent-x", "Succeeded"));
        assert_eq!(view(&s, &at("10.0.0.9:14317"), None), not_meshed());
    }

    /// A Service with topology-aware routing: a caller gets the endpoints
    /// hinted for its zone, under kube-proxy's conditions, and every
    /// endpoint whenever those do not hold.
    #[test]
    fn a_topology_aware_service_sends_callers_to_their_zone() {
        let mesh = |mode: &str, hints: [&str; 3]| {
            let endpoint = |ip: &str, zone: &str, hint: &str| {
                let hints = match hint {
                    "" => String::new(),
                    h => format!(", hints: {{forZones: [{{name: {h}}}]}}"),
                };
                format!("{{addresses: [{ip}], zone: {zone}{hints}}}")
            };
            format!(
                r#"
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: shop, annotations: {{service.kubernetes.io/topology-mode: {mode}}}}}
spec: {{clusterIP: 10.96.0.30, ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: api-1, namespace: shop, labels: {{kubernetes.io/service-name: api}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: [{}, {}, {}]
"#,
                endpoint("10.0.1.1", "a", hints[0]),
                endpoint("10.0.1.2", "a", hints[1]),
                endpoint("10.0.2.1", "b", hints[2]),
            )
        };
        let key = svc("shop", "api", 80);
        let seen = |yaml: &str, zone: Option<&str>| -> Vec<String> {
            match view(&snapshot(yaml), &key, zone).kind {
                Some(api::destination_update::Kind::Service(s)) => addrs(&s.backends[0])
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
                other => panic!("not a Service: {other:?}"),
            }
        };
        let all = ["10.0.1.1:8080", "10.0.1.2:8080", "10.0.2.1:8080"];
        let hinted = mesh("Auto", ["a", "a", "b"]);
        assert_eq!(seen(&hinted, Some("a")), all[..2]);
        assert_eq!(seen(&hinted, Some("b")), all[2..]);
        // A caller of unknown zone, or of a zone no endpoint is for.
        assert_eq!(seen(&hinted, None), all);
        assert_eq!(seen(&hinted, Some("c")), all);
        // One ready endpoint without a hint (hints being rolled out).
        assert_eq!(seen(&mesh("Auto", ["a", "", "b"]), Some("a")), all);
        // Hints the Service no longer asks for (left by an earlier mode).
        assert_eq!(seen(&mesh("Disabled", ["a", "a", "b"]), Some("a")), all);
        // `trafficDistribution` asks as the annotation does; and so does the
        // annotation's name before Kubernetes 1.27.
        let distributed = hinted.replace(
            "spec: {clusterIP: 10.96.0.30,",
            "spec: {trafficDistribution: PreferClose, clusterIP: 10.96.0.30,",
        );
        let distributed = distributed.replace("topology-mode: Auto", "topology-mode: Disabled");
        assert_eq!(seen(&distributed, Some("b")), all[2..]);
        let older = hinted.replace("topology-mode", "topology-aware-hints");
        assert_eq!(seen(&older, Some("b")), all[2..]);
        // A zone whose endpoints are not ready: the caller is not left with none.
        let b_down = hinted.replace(
            "{addresses: [10.0.2.1], zone: b",
            "{addresses: [10.0.2.1], conditions: {ready: false}, zone: b",
        );
        assert_eq!(seen(&b_down, Some("b")), all[..2]);
    }
}
