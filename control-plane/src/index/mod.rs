//! The one in-memory index of the mesh: Services, their endpoints and the Pods
//! behind them, the routes and policies attached to them, fed by a source
//! (manifests or the Kubernetes API). Each change produces a new immutable
//! snapshot; views of destinations are computed from a snapshot. The maps are persistent (structurally shared), so a snapshot costs
//! O(1) to take and a change costs what it touches, not the size of the mesh.

pub mod view;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};

use imbl::{HashMap, OrdMap, OrdSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Pod, PodSpec, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use strait_api::v1 as api;
use tokio::time::Instant;
use tracing::warn;

pub use view::{DestKey, ParseDestError};

use crate::backend_policy::BackendPolicySpec;
use crate::defaults;
use crate::routes::{RouteId, RouteSpec};

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// What the port speaks: anything but HTTP (and its kin) makes it opaque.
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceInfo {
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`: no frontend, its callers reach its pods by their
    /// own addresses, so no route of its applies.
    pub headless: bool,
    /// `type: ExternalName`: a DNS alias, with no port of the mesh's.
    pub external_name: bool,
    pub ports: Vec<ServicePort>,
    /// Topology-aware routing asked for (`service.kubernetes.io/topology-mode:
    /// Auto`, or `spec.trafficDistribution`): its endpoints' zone hints are
    /// followed, as kube-proxy follows them.
    pub topology_aware: bool,
    /// `spec.selector`: the pods it is meant for, empty for a Service
    /// without one (whose slices are written by hand). What a `targetRef`
    /// policy covers before any slice lists a new pod.
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EndpointInfo {
    pub addr: IpAddr,
    pub ready: bool,
    /// Terminating but still serving: used only while no endpoint of the
    /// Service is ready, as kube-proxy does (KEP-1669).
    pub draining: bool,
    pub zone: Option<String>,
    /// The zones whose callers this endpoint is for (`hints.forZones`, set
    /// by the EndpointSlice controller for topology-aware Services); empty:
    /// no hint.
    pub for_zones: Vec<String>,
    pub pod: Option<ObjKey>,
}

/// One EndpointSlice, reduced to what discovery needs.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceInfo {
    /// Port name ("" for unnamed) to port number.
    pub ports: Vec<(String, u16)>,
    pub endpoints: Vec<EndpointInfo>,
    /// The pods its endpoints name, sorted, once each: the Service's members,
    /// which a `targetRef` AuthorizationPolicy covers (those of a slice that
    /// brings no endpoints, IPv6 or FQDN, too). Looked up for every pod at
    /// every change, so sorted here once rather than scanned there.
    pub pods: Vec<ObjKey>,
    /// The addresses of its endpoints that name no pod (written by hand or by
    /// an operator), sorted: whichever pod is alone at one is a member too.
    /// Usually none, so a policy's members are not found by a scan.
    pub unnamed: Vec<IpAddr>,
    /// An IPv6 slice: its endpoints are used only by a Service with no IPv4
    /// slice, since a dual-stack Service's list the same pods again.
    pub ipv6: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    /// Port of the pod's proxy inbound listener: `Some` for meshed pods.
    pub inbound_port: Option<u16>,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// The kubelet's probes of its containers, let through in plaintext.
    pub probes: Vec<api::ProbeRoute>,
    /// Its own addresses (`status.podIPs`): none for a pod on the node's
    /// network, which shares the node's, or one that has ended.
    pub ips: Vec<IpAddr>,
    /// Ports its proxy does not intercept (`strait.dev/skip-inbound-ports`),
    /// as inclusive ranges.
    pub skip_inbound: Vec<(u16, u16)>,
    /// Ports its proxy carries as opaque TCP (`strait.dev/opaque-ports`), as
    /// inclusive ranges: those who call the pod by its address skip detection
    /// on them too, as Linkerd's opaque-ports annotation has them.
    pub opaque: Vec<(u16, u16)>,
    /// The node it runs on (`spec.nodeName`), once scheduled: whose zone its
    /// proxy's requests prefer when a Service asks for topology-aware routing.
    pub node: Option<String>,
    /// Its node's addresses and `hostPort`s that lead to its container ports
    /// (a node-local agent's, a broker advertising its node's address),
    /// while it runs.
    pub host_ports: Vec<(SocketAddr, u16)>,
    /// Being deleted (`metadata.deletionTimestamp`): one stuck terminating
    /// (a volume that will not unmount, a finalizer) keeps its address in
    /// its status for as long, after the network may have given it to a new
    /// pod.
    pub deleting: bool,
}

/// Everything the controller knows at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub version: u64,
    /// When this snapshot was built, for push-latency metrics.
    pub built: Instant,
    pub trust_domain: String,
    pub services: HashMap<ObjKey, ServiceInfo>,
    pub by_cluster_ip: HashMap<IpAddr, ObjKey>,
    /// EndpointSlices by the Service they belong to, keyed by slice name for order.
    pub slices: HashMap<ObjKey, OrdMap<String, SliceInfo>>,
    pub pods: HashMap<ObjKey, PodInfo>,
    /// The pods at each address: one, but for a moment two while an address
    /// passes from a pod that ended to a new one (or for longer, from one
    /// stuck terminating: see `holder`).
    pub by_pod_ip: HashMap<IpAddr, OrdSet<ObjKey>>,
    /// The pods behind each node address and `hostPort`, as `by_pod_ip`.
    pub by_host_port: HashMap<SocketAddr, OrdSet<ObjKey>>,
    /// Service-account tokens (local mode), by digest: the service account each
    /// proves. Only digests are kept, so the tokens themselves are not in memory.
    pub tokens: HashMap<TokenDigest, ObjKey>,
    /// strait's AuthorizationPolicies, by namespace/name: ordered, so that a
    /// namespace's are one range, and a pod's policy is not worked out from
    /// every policy of the mesh at every change. Shared between snapshots, as
    /// the other maps are: a policy may list a thousand identities.
    pub authorizations: OrdMap<ObjKey, crate::authz::AuthorizationSpec>,
    /// HTTPRoutes and GRPCRoutes with a Service among their parents.
    pub routes: HashMap<RouteId, RouteSpec>,
    /// The routes naming each Service as a parent: a view finds its routes
    /// without looking at every route of the mesh.
    pub routes_by_parent: HashMap<ObjKey, OrdSet<RouteId>>,
    /// strait's BackendPolicies by the Service they target, then by name: the
    /// first is in force (they share the Service's namespace).
    pub backend_policies: HashMap<ObjKey, OrdMap<String, BackendPolicySpec>>,
    /// Namespaces holding an AuthorizationPolicy the API server took and the
    /// controller refused, with no good version of it to keep: what it guards
    /// is unknown, so every pod of the namespace is refused every caller (its
    /// kubelet probes aside) until the policy is fixed or deleted. One
    /// tenant's broken policy closes that tenant's namespace, not the mesh.
    pub sealed_namespaces: BTreeSet<String>,
    /// Each node read and its zone (its `topology.kubernetes.io/zone`
    /// label), if it has one: a node without a zone is known to have none,
    /// which a node not read yet is not.
    pub node_zones: HashMap<String, Option<String>>,
    /// Every pod of the cluster is indexed, meshed or not (the API server's
    /// watch): a pod an endpoint names and the index lacks is one not seen
    /// yet (its watch behind the slices', relisting), not an unmeshed one.
    /// From manifests, a slice may name pods no file declares.
    pub every_pod_indexed: bool,
}

/// SHA-256 of a service-account token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenDigest(pub [u8; 32]);

impl TokenDigest {
    pub fn of(token: &[u8]) -> Self {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        TokenDigest(out)
    }
}

// A digest is not the token, but there is no reason to print it either.
impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenDigest(..)")
    }
}

impl Snapshot {
    pub fn empty(trust_domain: &str) -> Self {
        Snapshot {
            version: 0,
            built: Instant::now(),
            trust_domain: trust_domain.to_string(),
            services: HashMap::new(),
            by_cluster_ip: HashMap::new(),
            slices: HashMap::new(),
            pods: HashMap::new(),
            by_pod_ip: HashMap::new(),
            by_host_port: HashMap::new(),
            tokens: HashMap::new(),
            authorizations: OrdMap::new(),
            routes: HashMap::new(),
            routes_by_parent: HashMap::new(),
            backend_policies: HashMap::new(),
            sealed_namespaces: BTreeSet::new(),
            node_zones: HashMap::new(),
            every_pod_indexed: false,
        }
    }

    /// A pod's zone: that of the node it runs on.
    pub fn zone_of_pod(&self, pod: &PodInfo) -> Option<&str> {
        let node = pod.node.as_ref()?;
        self.node_zones.get(node)?.as_deref()
    }

    pub fn endpoint_count(&self) -> usize {
        self.slices
            .values()
            .flat_map(|s| s.values())
            .map(|s| s.endpoints.len())
            .sum()
    }

    /// The BackendPolicy in force for a Service: the first by name.
    pub fn backend_policy(&self, svc: &ObjKey) -> Option<&BackendPolicySpec> {
        self.backend_policies
            .get(svc)
            .and_then(|m| m.values().next())
    }
}

/// Validates Kubernetes objects into their index form (done once, when parsed).
#[derive(Debug)]
pub struct SnapshotBuilder;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ObjectError {
    #[error("{kind} has no metadata.name")]
    NoName { kind: &'static str },
    #[error("{kind} {key}: {field}: {reason}")]
    Field {
        kind: &'static str,
        key: ObjKey,
        field: String,
        reason: String,
    },
}

fn key(
    kind: &'static str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<ObjKey, ObjectError> {
    let name = meta.name.clone().ok_or(ObjectError::NoName { kind })?;
    let k = ObjKey {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
    };
    // Namespaces end up in identities and destination names, and proxies
    // ask by them as DNS labels (a pod in `Team_A` would never get its policy).
    if !crate::spec::dns_label(&k.namespace) {
        return Err(ObjectError::Field {
            kind,
            field: "metadata.namespace".into(),
            reason: format!("{:?} is not a namespace name", k.namespace),
            key: k,
        });
    }
    Ok(k)
}

fn port(kind: &'static str, key: &ObjKey, field: String, p: i32) -> Result<u16, ObjectError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ObjectError::Field {
            kind,
            key: key.clone(),
            field,
            reason: format!("{p} is not a port (1-65535)"),
        })
}

/// `Err` when a list of an object holds more than `max` entries.
fn at_most(
    kind: &'static str,
    key: &ObjKey,
    field: impl Into<String>,
    len: usize,
    max: usize,
) -> Result<(), ObjectError> {
    if len > max {
        return Err(ObjectError::Field {
            kind,
            key: key.clone(),
            field: field.into(),
            reason: format!("{len} entries, more than the limit of {max}"),
        });
    }
    Ok(())
}

/// A Service or EndpointSlice port's protocol: TCP when unset, as Kubernetes
/// defaults it.
fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}

impl SnapshotBuilder {
    /// Validates a Service into its index form (done once, when parsed).
    pub fn service(svc: &Service) -> Result<(ObjKey, ServiceInfo), ObjectError> {
        const KIND: &str = "Service";
        let k = key(KIND, &svc.metadata)?;
        let spec = svc.spec.clone().unwrap_or_default();
        // Only the ports the mesh carries count: the others are skipped
        // below and cost nothing once parsed.
        let n = spec.ports.iter().flatten();
        let n = n.filter(|p| is_tcp(p.protocol.as_deref())).count();
        at_most(KIND, &k, "spec.ports", n, defaults::MAX_SERVICE_PORTS)?;
        let n = spec.cluster_ips.as_ref().map_or(0, Vec::len);
        at_most(KIND, &k, "spec.clusterIPs", n, defaults::MAX_CLUSTER_IPS)?;
        let mut ports = Vec::new();
        // An ExternalName Service is a DNS alias with no endpoints of its own:
        // no port of it is the mesh's, so callers reach the name it points
        // at, as they would without the mesh.
        let alias = spec.type_.as_deref() == Some("ExternalName");
        for (i, p) in spec.ports.unwrap_or_default().iter().enumerate() {
            if alias {
                break;
            }
            // The mesh carries TCP: a UDP or SCTP port of the same number
            // must not lend its target or protocol to the TCP one.
            if !is_tcp(p.protocol.as_deref()) {
                continue;
            }
            ports.push(ServicePort {
                name: p.name.clone(),
                port: port(KIND, &k, format!("spec.ports[{i}].port"), p.port)?,
                app_protocol: p.app_protocol.clone(),
            });
        }
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let mut cluster_ips = Vec::new();
        let ips = spec.cluster_ips.unwrap_or_default();
        for (i, ip) in spec.cluster_ip.iter().chain(ips.iter()).enumerate() {
            if ip == "None" || ip.is_empty() {
                continue;
            }
            let ip: IpAddr = ip.parse().map_err(|_| ObjectError::Field {
                kind: KIND,
                key: k.clone(),
                field: if i == 0 {
                    "spec.clusterIP".into()
                } else {
                    "spec.clusterIPs".into()
                },
                reason: format!("{ip:?} is not an IP address"),
            })?;
            if !cluster_ips.contains(&ip) {
                cluster_ips.push(ip);
            }
        }
        let topology_mode = svc.metadata.annotations.as_ref().and_then(|a| {
            a.get(defaults::TOPOLOGY_MODE_ANNOTATION)
                .or_else(|| a.get(defaults::TOPOLOGY_HINTS_ANNOTATION))
        });
        // As kube-proxy reads them: `trafficDistribution` wins; otherwise
        // the annotation, `Auto` in either case.
        let topology_aware = spec.traffic_distribution.is_some()
            || topology_mode.is_some_and(|m| m.eq_ignore_ascii_case("auto"));
        Ok((
            k,
            ServiceInfo {
                cluster_ips,
                headless,
                external_name: alias,
                ports,
                topology_aware,
                selector: spec.selector.unwrap_or_default(),
            },
        ))
    }

    /// Validates an EndpointSlice: returns the Service it belongs to and its name.
    pub fn slice(es: &EndpointSlice) -> Result<(ObjKey, String, SliceInfo), ObjectError> {
        const KIND: &str = "EndpointSlice";
        let k = key(KIND, &es.metadata)?;
        let svc = es
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(defaults::SERVICE_NAME_LABEL))
            .ok_or_else(|| ObjectError::Field {
                kind: KIND,
                key: k.clone(),
                field: format!("metadata.labels[\"{}\"]", defaults::SERVICE_NAME_LABEL),
                reason: "missing: an EndpointSlice must name its Service".into(),
            })?;
        // Kubernetes copies every port of the Service into each of its
        // slices, UDP and SCTP included: TCP ports are the ones counted.
        let n = es.ports.iter().flatten();
        let n = n.filter(|p| is_tcp(p.protocol.as_deref())).count();
        at_most(KIND, &k, "ports", n, defaults::MAX_SLICE_PORTS)?;
        at_most(
            KIND,
            &k,
            "endpoints",
            es.endpoints.len(),
            defaults::MAX_SLICE_ENDPOINTS,
        )?;
        let mut ports = Vec::new();
        for (i, p) in es.ports.iter().flatten().enumerate() {
            let Some(n) = p.port.filter(|_| is_tcp(p.protocol.as_deref())) else {
                continue;
            };
            ports.push((
                p.name.clone().unwrap_or_default(),
                port(KIND, &k, format!("ports[{i}].port"), n)?,
            ));
        }
        let mut endpoints = Vec::new();
        let pod_of = |e: &k8s_openapi::api::discovery::v1::Endpoint| {
            e.target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    Some(ObjKey {
                        namespace: r.namespace.clone().unwrap_or_else(|| k.namespace.clone()),
                        name: r.name.clone()?,
                    })
                })
        };
        let mut pods: Vec<ObjKey> = es.endpoints.iter().filter_map(pod_of).collect();
        pods.sort();
        pods.dedup();
        // An FQDN slice has no addresses to dial: it adds no endpoints; its
        // pods are kept, as an IPv6 slice's are.
        let ipv6 = es.address_type == "IPv6";
        if es.address_type != "IPv4" && !ipv6 {
            return Ok((
                ObjKey {
                    namespace: k.namespace.clone(),
                    name: svc.clone(),
                },
                k.name,
                SliceInfo {
                    ports,
                    endpoints,
                    pods,
                    unnamed: Vec::new(),
                    ipv6: false,
                },
            ));
        }
        for (i, e) in es.endpoints.iter().enumerate() {
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            // `ready` is false for every terminating endpoint; `serving` says
            // whether it still serves (unset: it does, as the v1 API says and
            // kube-proxy reads it).
            let draining = !ready
                && c.and_then(|c| c.terminating).unwrap_or(false)
                && c.and_then(|c| c.serving).unwrap_or(true);
            let pod = pod_of(e);
            at_most(
                KIND,
                &k,
                format!("endpoints[{i}].addresses"),
                e.addresses.len(),
                defaults::MAX_ENDPOINT_ADDRESSES,
            )?;
            let hints = e.hints.as_ref().and_then(|h| h.for_zones.as_ref());
            at_most(
                KIND,
                &k,
                format!("endpoints[{i}].hints.forZones"),
                hints.map_or(0, Vec::len),
                defaults::MAX_ZONE_HINTS,
            )?;
            let for_zones: Vec<String> = hints
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect();
            // Only the first address: Kubernetes defines nothing for the
            // others (its own controller writes one), and kube-proxy uses none.
            for (j, a) in e.addresses.iter().enumerate().take(1) {
                let addr: IpAddr = a.parse().map_err(|_| ObjectError::Field {
                    kind: KIND,
                    key: k.clone(),
                    field: format!("endpoints[{i}].addresses[{j}]"),
                    reason: format!("{a:?} is not an IP address"),
                })?;
                endpoints.push(EndpointInfo {
                    addr,
                    ready,
                    draining,
                    zone: e.zone.clone(),
                    for_zones: for_zones.clone(),
                    pod: pod.clone(),
                });
            }
        }
        let svc_key = ObjKey {
            namespace: k.namespace.clone(),
            name: svc.clone(),
        };
        Ok((
            svc_key,
            k.name,
            SliceInfo {
                ports,
                unnamed: unnamed(&endpoints),
                endpoints,
                pods,
                ipv6,
            },
        ))
    }

    /// A Secret of type `kubernetes.io/service-account-token`: the digest of its
    /// token and the service account it proves. Other Secrets are not kept.
    pub fn token(secret: &Secret) -> Result<Option<(TokenDigest, ObjKey)>, ObjectError> {
        const KIND: &str = "Secret";
        if secret.type_.as_deref() != Some(defaults::SA_TOKEN_SECRET_TYPE) {
            return Ok(None);
        }
        let k = key(KIND, &secret.metadata)?;
        let field = |field: String, reason: &str| ObjectError::Field {
            kind: KIND,
            key: k.clone(),
            field,
            reason: reason.to_string(),
        };
        let account = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(defaults::SA_NAME_ANNOTATION))
            .filter(|n| strait_api::identity::valid_part(n))
            .ok_or_else(|| {
                field(
                    format!("metadata.annotations[\"{}\"]", defaults::SA_NAME_ANNOTATION),
                    "missing or not a service-account name: which service account the token is for",
                )
            })?;
        let token = secret
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get("token"))
                    .map(|s| s.as_bytes().to_vec())
            })
            .filter(|t| !t.trim_ascii().is_empty())
            .ok_or_else(|| field("data.token".into(), "missing or empty"))?;
        Ok(Some((
            TokenDigest::of(token.trim_ascii()),
            ObjKey {
                namespace: k.namespace.clone(),
                name: account.clone(),
            },
        )))
    }

    pub fn pod(pod: &Pod) -> Result<(ObjKey, PodInfo), ObjectError> {
        const KIND: &str = "Pod";
        let k = key(KIND, &pod.metadata)?;
        // A pod on the node's network has no proxy of its own to call,
        // whatever its annotations say (injection skips it).
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        let inbound_port = match pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(defaults::INBOUND_PORT_ANNOTATION))
        {
            _ if host_network => None,
            None => None,
            Some(v) if v.trim().is_empty() => Some(defaults::DEFAULT_INBOUND_PORT),
            Some(v) => Some(
                v.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| ObjectError::Field {
                        kind: KIND,
                        key: k.clone(),
                        field: format!(
                            "metadata.annotations[\"{}\"]",
                            defaults::INBOUND_PORT_ANNOTATION
                        ),
                        reason: format!("{v:?} is not a port (1-65535)"),
                    })?,
            ),
        };
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        // It becomes part of the pod's identity, which proxies parse strictly.
        if !strait_api::identity::valid_part(&service_account) {
            return Err(ObjectError::Field {
                kind: KIND,
                key: k.clone(),
                field: "spec.serviceAccountName".into(),
                reason: format!("{service_account:?} is not a service-account name"),
            });
        }
        // A port-list annotation, as ranges.
        let ranges = |name: &str| {
            pod.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(name))
                .map(|v| port_ranges(v))
                .unwrap_or_default()
        };
        let ips = own_ips(pod);
        let host_ports = if ips.is_empty() {
            Vec::new()
        } else {
            host_ports(pod)
        };
        Ok((
            k,
            PodInfo {
                inbound_port,
                service_account,
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                probes: pod.spec.as_ref().map(probe_routes).unwrap_or_default(),
                ips,
                skip_inbound: ranges(crate::inject::SKIP_INBOUND_PORTS),
                opaque: ranges(crate::inject::OPAQUE_PORTS),
                node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                host_ports,
                deleting: pod.metadata.deletion_timestamp.is_some(),
            },
        ))
    }

    /// A Node: its name and its zone, if it has one.
    pub fn node(
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Result<(String, Option<String>), ObjectError> {
        let name = meta
            .name
            .clone()
            .ok_or(ObjectError::NoName { kind: "Node" })?;
        let zone = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(defaults::ZONE_LABEL))
            .filter(|z| !z.is_empty())
            .cloned();
        Ok((name, zone))
    }
}

/// The sorted addresses of endpoints that name no pod.
fn unnamed(endpoints: &[EndpointInfo]) -> Vec<IpAddr> {
    let mut a: Vec<IpAddr> = endpoints
        .iter()
        .filter(|e| e.pod.is_none())
        .map(|e| e.addr)
        .collect();
    a.sort_unstable();
    a.dedup();
    a
}

/// `22,9000-9010` as ranges; what does not read as ports is left out (the
/// injector refuses such values before a pod runs with them).
fn port_ranges(v: &str) -> Vec<(u16, u16)> {
    let port = |p: &str| p.trim().parse::<u16>().ok();
    v.split(',')
        .filter_map(|p| match p.split_once('-') {
            Some((lo, hi)) => Some((port(lo)?, port(hi)?)),
            None => port(p).map(|n| (n, n)),
        })
        .collect()
}

impl PodInfo {
    /// Whether a connection to `port` at this pod's address goes to its app
    /// through its proxy: not the proxy's own ports, nor those it skips.
    pub fn proxied_port(&self, port: u16) -> bool {
        self.inbound_port.is_some_and(|p| p != port)
            && !defaults::MESH_PORTS.contains(&port)
            && !self
                .skip_inbound
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&port))
    }
}

/// Where on its node a pod's TCP container ports are published (`hostPort`,
/// at the port's `hostIP` or every node address): Kubernetes gives a node
/// address and port to one pod at a time. Asked of a running pod only.
fn host_ports(pod: &Pod) -> Vec<(SocketAddr, u16)> {
    let (Some(spec), Some(status)) = (pod.spec.as_ref(), pod.status.as_ref()) else {
        return Vec::new();
    };
    let node_ips: Vec<IpAddr> = (status.host_ips.iter().flatten().map(|i| i.ip.as_str()))
        .chain(status.host_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let mut out: Vec<(SocketAddr, u16)> = Vec::new();
    let ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten());
    for p in ports.filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP") {
        let (Some(host), Ok(container)) = (p.host_port, u16::try_from(p.container_port)) else {
            continue;
        };
        let Ok(host) = u16::try_from(host) else {
            continue;
        };
        let bound: Option<IpAddr> = p.host_ip.as_deref().and_then(|ip| ip.parse().ok());
        for ip in node_ips
            .iter()
            .filter(|ip| bound.is_none_or(|b| b.is_unspecified() || b == **ip))
        {
            out.push((SocketAddr::new(*ip, host), container));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Takes `key` from `index`'s entry at `at`, and the entry once empty.
fn unindex<K: std::hash::Hash + Eq + Clone>(
    index: &mut HashMap<K, OrdSet<ObjKey>>,
    at: &K,
    key: &ObjKey,
) {
    if let Some(keys) = index.get_mut(at) {
        keys.remove(key);
        if keys.is_empty() {
            index.remove(at);
        }
    }
}

/// A pod's own addresses, while it runs.
fn own_ips(pod: &Pod) -> Vec<IpAddr> {
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let ended = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    if host_network || ended {
        return Vec::new();
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|i| i.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The kubelet's HTTP and gRPC probes of a pod's containers, and its HTTP
/// lifecycle hooks (`preStop`, `postStart`: sent the same way, from the
/// node, and a refusal is taken for success, so an app's drain call would
/// be skipped unseen), as the requests its proxy lets through in plaintext.
/// Not those for another host, nor HTTPS ones (TLS without a client
/// certificate): the proxy does not see them as the kubelet's.
fn probe_routes(spec: &PodSpec) -> Vec<api::ProbeRoute> {
    let mut routes: Vec<api::ProbeRoute> = Vec::new();
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    for c in containers {
        let http_get = |h: &HTTPGetAction| {
            let elsewhere = h.host.as_deref().is_some_and(|h| !h.is_empty());
            let http = h
                .scheme
                .as_deref()
                .is_none_or(|s| s.eq_ignore_ascii_case("HTTP"));
            let path = kubelet_target(h.path.as_deref().unwrap_or_default());
            container_port(c, &h.port)
                .filter(|_| http && !elsewhere && path.len() <= defaults::MAX_PROBE_PATH)
                .map(|port| api::ProbeRoute {
                    port: port.into(),
                    kind: api::ProbeKind::HttpGet as i32,
                    path,
                })
        };
        let hooks = c
            .lifecycle
            .iter()
            .flat_map(|l| [&l.pre_stop, &l.post_start])
            .flatten()
            .filter_map(|h| h.http_get.as_ref().and_then(http_get));
        let probes = [&c.liveness_probe, &c.readiness_probe, &c.startup_probe];
        let probes = probes.into_iter().flatten().filter_map(|p| {
            if let Some(h) = &p.http_get {
                http_get(h)
            } else if let Some(g) = &p.grpc {
                u16::try_from(g.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .map(|port| api::ProbeRoute {
                        port: port.into(),
                        kind: api::ProbeKind::Grpc as i32,
                        path: defaults::GRPC_HEALTH_CHECK_PATH.to_string(),
                    })
            } else {
                None
            }
        });
        for r in probes.chain(hooks) {
            if !routes.contains(&r) && routes.len() < defaults::MAX_PROBE_ROUTES {
                routes.push(r);
            }
        }
    }
    routes
}

/// A probe's port: a number, or the name of one of the container's ports
/// (or, as the kubelet falls back to, a number written as a string).
fn container_port(c: &Container, port: &IntOrString) -> Option<u16> {
    let n = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => match c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
        {
            Some(p) => p.container_port,
            None => name.parse().ok()?,
        },
    };
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// The request target the kubelet sends for an HTTP probe's `path`, as Go's
/// `url.Parse(path).RequestURI()` makes it: the fragment dropped, the path's
/// bytes that may not stand in a path percent-encoded (valid escapes kept),
/// the query as written, and `/` for nothing.
fn kubelet_target(path: &str) -> String {
    let path = path.split_once('#').map_or(path, |(p, _)| p);
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut out = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        out.push('/');
    }
    let bytes = path.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let escape = b == b'%'
            && bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/[]".contains(&b) || escape {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl Snapshot {
    pub fn add_service(&mut self, key: ObjKey, info: ServiceInfo) {
        for ip in &info.cluster_ips {
            self.by_cluster_ip.insert(*ip, key.clone());
        }
        self.services.insert(key, info);
    }

    pub fn remove_service(&mut self, key: &ObjKey) {
        if let Some(info) = self.services.remove(key) {
            for ip in &info.cluster_ips {
                if self.by_cluster_ip.get(ip) == Some(key) {
                    self.by_cluster_ip.remove(ip);
                    // Another Service that claims it too (two manifests
                    // giving one `clusterIP`, which the API server would not
                    // take) keeps it: the address stays meshed. Services
                    // change seldom next to their endpoints: they are looked
                    // through here (a few µs per thousand) rather than indexed.
                    let other = self
                        .services
                        .iter()
                        .filter(|(_, s)| s.cluster_ips.contains(ip))
                        .map(|(k, _)| k)
                        .min()
                        .cloned();
                    if let Some(other) = other {
                        self.by_cluster_ip.insert(*ip, other);
                    }
                }
            }
        }
    }

    pub fn add_slice(&mut self, service: ObjKey, name: String, info: SliceInfo) {
        self.slices.entry(service).or_default().insert(name, info);
    }

    pub fn remove_slice(&mut self, service: &ObjKey, name: &str) {
        if let Some(slices) = self.slices.get_mut(service) {
            slices.remove(name);
            if slices.is_empty() {
                self.slices.remove(service);
            }
        }
    }

    pub fn add_pod(&mut self, key: ObjKey, info: PodInfo) {
        self.remove_pod(&key);
        for ip in &info.ips {
            self.by_pod_ip.entry(*ip).or_default().insert(key.clone());
        }
        for (at, _) in &info.host_ports {
            self.by_host_port
                .entry(*at)
                .or_default()
                .insert(key.clone());
        }
        self.pods.insert(key, info);
    }

    pub fn add_node(&mut self, node: String, zone: Option<String>) {
        self.node_zones.insert(node, zone);
    }

    pub fn remove_node(&mut self, node: &str) {
        self.node_zones.remove(node);
    }

    pub fn remove_pod(&mut self, key: &ObjKey) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        for ip in &old.ips {
            unindex(&mut self.by_pod_ip, ip, key);
        }
        for (at, _) in &old.host_ports {
            unindex(&mut self.by_host_port, at, key);
        }
    }

    /// The pod a node address and `hostPort` lead to, with the pod's address
    /// (of the node address's family) and container port there; unless
    /// none, or more than one not being deleted, claims it (`holder`).
    pub fn pod_at_host_port(&self, at: SocketAddr) -> Option<(&ObjKey, &PodInfo, SocketAddr)> {
        let (key, pod) = self.holder(self.by_host_port.get(&at)?)?;
        let (_, port) = pod.host_ports.iter().find(|(a, _)| *a == at)?;
        let ip = (pod.ips.iter().find(|ip| ip.is_ipv4() == at.is_ipv4())).or(pod.ips.first())?;
        Some((key, pod, SocketAddr::new(*ip, *port)))
    }

    /// The pod at `ip`, unless none, or more than one not being deleted,
    /// claims it (`holder`).
    pub fn pod_at(&self, ip: IpAddr) -> Option<(&ObjKey, &PodInfo)> {
        self.holder(self.by_pod_ip.get(&ip)?)
    }

    /// Which of the pods claiming one address holds it: the one alone, else
    /// the one alone not being deleted, else none (an address passing from
    /// a pod that ended unseen to a new one: either may answer there). A pod
    /// stuck terminating lets go of its address on the network long before
    /// its status does, and its new pod would otherwise be out of the mesh
    /// for as long as it stays stuck (hours, till someone force-deletes it).
    pub fn holder<'a>(&'a self, keys: &'a OrdSet<ObjKey>) -> Option<(&'a ObjKey, &'a PodInfo)> {
        let mut claims = keys.iter().filter_map(|k| self.pods.get_key_value(k));
        if keys.len() == 1 {
            return claims.next();
        }
        let mut live = claims.filter(|(_, p)| !p.deleting);
        match (live.next(), live.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    }

    pub fn add_token(&mut self, digest: TokenDigest, account: ObjKey) {
        self.tokens.insert(digest, account);
    }

    pub fn remove_token(&mut self, digest: &TokenDigest) {
        self.tokens.remove(digest);
    }

    pub fn add_authorization(&mut self, key: ObjKey, spec: crate::authz::AuthorizationSpec) {
        self.authorizations.insert(key, spec);
    }

    pub fn remove_authorization(&mut self, key: &ObjKey) {
        self.authorizations.remove(key);
    }

    pub fn add_route(&mut self, key: RouteId, route: RouteSpec) {
        self.remove_route(&key);
        for svc in route.parent_services() {
            self.routes_by_parent
                .entry(svc.clone())
                .or_default()
                .insert(key.clone());
        }
        self.routes.insert(key, route);
    }

    pub fn remove_route(&mut self, key: &RouteId) {
        let Some(route) = self.routes.remove(key) else {
            return;
        };
        for svc in route.parent_services() {
            if let Some(keys) = self.routes_by_parent.get_mut(svc) {
                keys.remove(key);
                if keys.is_empty() {
                    self.routes_by_parent.remove(svc);
                }
            }
        }
    }

    /// A second policy for one Service is kept (it takes over if the first goes)
    /// but not applied, and said so.
    pub fn add_backend_policy(&mut self, target: ObjKey, name: String, spec: BackendPolicySpec) {
        let policies = self.backend_policies.entry(target.clone()).or_default();
        policies.insert(name, spec);
        if policies.len() > 1 {
            let names: Vec<&String> = policies.keys().collect();
            warn!(
                service = %target,
                policies = ?names,
                "more than one BackendPolicy targets this Service; only the first by name applies"
            );
        }
    }

    pub fn remove_backend_policy(&mut self, target: &ObjKey, name: &str) {
        if let Some(policies) = self.backend_policies.get_mut(target) {
            policies.remove(name);
            if policies.is_empty() {
                self.backend_policies.remove(target);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A namespace is a DNS label, as Kubernetes has it and as proxies ask
    /// by it: one that is not (accepted from a file) would leave its pods'
    /// proxies waiting for a policy they can never ask for.
    #[test]
    fn a_namespace_that_is_no_dns_label_is_refused() {
        for ns in ["Team_A", "prod.eu", "-a", ".."] {
            let meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some(ns.into()),
                ..Default::default()
            };
            let e = key("Pod", &meta).unwrap_err().to_string();
            assert!(e.contains("metadata.namespace"), "{ns}: {e}");
            assert!(crate::spec::key(&meta).is_err(), "{ns}");
        }
    }

    /// Two Services claiming one cluster IP (from manifests: the API server
    /// would refuse the second): the one that stays keeps the address.
    #[test]
    fn a_cluster_ip_claimed_twice_stays_with_the_service_left() {
        let svc = |name: &str| {
            let s: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
            }))
            .unwrap();
            SnapshotBuilder::service(&s).unwrap()
        };
        let ip: IpAddr = "10.96.0.10".parse().unwrap();
        let mut snap = Snapshot::empty("cluster.local");
        let (a, b) = (svc("a"), svc("b"));
        snap.add_service(a.0.clone(), a.1);
        snap.add_service(b.0.clone(), b.1);
        snap.remove_service(&b.0);
        assert_eq!(snap.by_cluster_ip.get(&ip), Some(&a.0));
        snap.remove_service(&a.0);
        assert_eq!(snap.by_cluster_ip.get(&ip), None);
    }

    /// A UDP port of the same number as a TCP one (DNS's 53, say) lends it
    /// neither its target nor its name.
    #[test]
    fn only_tcp_ports_are_indexed() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "dns", "namespace": "shop"},
            "spec": {"ports": [
                {"name": "udp", "port": 8080, "protocol": "UDP", "targetPort": 9000},
                {"name": "tcp", "port": 8080, "protocol": "TCP"},
                {"name": "sctp", "port": 9, "protocol": "SCTP"},
                {"name": "plain", "port": 80}
            ]}
        }))
        .unwrap();
        let (_, info) = SnapshotBuilder::service(&svc).unwrap();
        let names: Vec<_> = info.ports.iter().map(|p| p.name.as_deref()).collect();
        assert_eq!(names, [Some("tcp"), Some("plain")]);
        let es: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "dns-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": "IPv4",
            "ports": [{"name": "udp", "port": 9000, "protocol": "UDP"},
                      {"name": "tcp", "port": 8080}],
            "endpoints": []
        }))
        .unwrap();
        let (_, _, info) = SnapshotBuilder::slice(&es).unwrap();
        assert_eq!(info.ports, [("tcp".to_string(), 8080)]);
    }

    /// What the kubelet will send, per probe: the path as written (query
    /// included), a named port resolved against its own container's ports.
    #[test]
    fn the_kubelets_probes_become_the_requests_let_through() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-0", "namespace": "shop"},
            "spec": {"containers": [
                {"name": "app", "image": "app",
                 "ports": [{"name": "http", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"path": "/ready?full=1#top", "port": "http"}},
                 "livenessProbe": {"httpGet": {"port": 8081}},
                 "startupProbe": {"grpc": {"port": 9090}}},
                {"name": "other", "image": "other",
                 "readinessProbe": {"httpGet": {"path": "/x", "port": "http"}},
                 "livenessProbe": {"httpGet": {"path": "/tls", "port": 8443, "scheme": "HTTPS"}},
                 "startupProbe": {"httpGet": {"path": "/y", "port": 80, "host": "10.0.0.9"}}},
                {"name": "tcp", "image": "tcp",
                 "readinessProbe": {"tcpSocket": {"port": 5432}},
                 "livenessProbe": {"httpGet": {"path": "/ready?full=1", "port": 8080}},
                 "startupProbe": {"httpGet": {"path": "health/ä b", "port": "8082"}}}
            ]}
        }))
        .unwrap();
        let (_, info) = SnapshotBuilder::pod(&pod).unwrap();
        let got: Vec<(u32, i32, &str)> = info
            .probes
            .iter()
            .map(|r| (r.port, r.kind, r.path.as_str()))
            .collect();
        let (get, grpc) = (api::ProbeKind::HttpGet as i32, api::ProbeKind::Grpc as i32);
        assert_eq!(
            got,
            [
                (8081, get, "/"),
                (8080, get, "/ready?full=1"),
                (9090, grpc, "/grpc.health.v1.Health/Check"),
                (8082, get, "/health/%C3%A4%20b"),
            ]
        );
    }

    /// The kubelet's HTTP lifecycle hooks come from the node in plaintext as
    /// its probes do: refused under STRICT, a `preStop` drain call was
    /// skipped unseen (the kubelet takes any answer for success).
    #[test]
    fn the_kubelets_http_hooks_are_let_through_as_its_probes() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-0", "namespace": "shop"},
            "spec": {"containers": [
                {"name": "app", "image": "app",
                 "ports": [{"name": "admin", "containerPort": 8022}],
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
                 "lifecycle": {
                     "preStop": {"httpGet": {"path": "/wait-for-drain", "port": "admin"}},
                     "postStart": {"httpGet": {"path": "/warm", "port": 8443, "scheme": "HTTPS"}}}},
                {"name": "other", "image": "other",
                 "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}},
                               "postStart": {"httpGet": {"path": "/started", "port": 9000}}}}
            ]}
        }))
        .unwrap();
        let (_, info) = SnapshotBuilder::pod(&pod).unwrap();
        let got: Vec<(u32, &str)> = info
            .probes
            .iter()
            .map(|r| (r.port, r.path.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (8080, "/ready"),
                (8022, "/wait-for-drain"),
                (9000, "/started")
            ]
        );
    }
}
