//! What the controller says of strait's policies and of the routes whose
//! parents are Services: `Accepted` (the object is valid) and `ResolvedRefs`
//! (the Services it names exist), with a reason, a message and the generation
//! they describe. Written only by the replica that holds the lease, and only
//! when they change, so an unchanged mesh costs the API server nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::Kind;
use crate::index::{ObjKey, Snapshot};

/// The controller name in a route's `status.parents[]`.
pub const CONTROLLER_NAME: &str = "strait.dev/controller";

/// What an object's status is computed from, taken from it as it was read.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusInput {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub resource_version: String,
    /// Which object of that name: one deleted and made again (`kubectl
    /// replace --force`) is another, whose status is still to write.
    pub uid: String,
    /// Why the object was refused, if it was.
    pub error: Option<String>,
    /// Services it applies to (a policy's target, a route's Service parents).
    pub targets: Vec<String>,
    /// Services it sends to (a route's backends).
    pub backends: Vec<String>,
    /// A route's backendRefs of kinds strait does not send to, as
    /// `group/Kind name`.
    pub invalid_kinds: Vec<String>,
    /// A route's backendRefs to Services of other namespaces, as
    /// `namespace/name`.
    pub not_permitted: Vec<String>,
    /// A route's Service parents as its parentRefs name them: the port and
    /// `sectionName` (a port's name) each must exist on the Service.
    pub parent_refs: Vec<ParentRef>,
    /// The ports a route's backendRefs name, per Service.
    pub backend_ports: Vec<(String, u16)>,
    /// The ports an AuthorizationPolicy names (its pods' own).
    pub policy_ports: Vec<u16>,
    /// A BackendPolicy's `opaquePorts` (its Service's ports).
    pub opaque_ports: Vec<u16>,
    /// Its status as last read.
    pub current: Value,
}

/// A route's parentRef to a Service.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentRef {
    pub name: String,
    pub port: Option<u16>,
    pub section: Option<String>,
    /// As written in the spec, which `status.parents[].parentRef` echoes so
    /// that tools can pair the two.
    pub written: Value,
}

impl StatusInput {
    /// From an object of a custom kind as the API returned it.
    pub fn of(kind: Kind, v: &Value, error: Option<String>) -> Self {
        let meta = &v["metadata"];
        let str_at = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).map(String::from);
        let port_at = |v: &Value| v["port"].as_u64().and_then(|p| u16::try_from(p).ok());
        let (mut parent_refs, mut backend_ports) = (Vec::new(), Vec::new());
        let (mut invalid_kinds, mut not_permitted) = (Vec::new(), Vec::new());
        let (targets, backends) = match kind {
            Kind::HttpRoute | Kind::GrpcRoute => {
                parent_refs = v["spec"]["parentRefs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    // A core Service: a `Service` of another group is not
                    // strait's to report on. One without a group (or with
                    // Gateway API's, its default) is, to say the route is
                    // refused for it.
                    .filter(|p| {
                        p["kind"].as_str() == Some("Service")
                            && crate::routes::service_parent(p["group"].as_str())
                    })
                    .filter_map(|p| {
                        Some(ParentRef {
                            name: str_at(p, "/name")?,
                            port: port_at(p),
                            section: str_at(p, "/sectionName"),
                            written: p.clone(),
                        })
                    })
                    .collect::<Vec<_>>();
                let parents = parent_refs.iter().map(|p| p.name.clone()).collect();
                let service = |b: &&Value| {
                    b["kind"].as_str().is_none_or(|k| k == "Service")
                        && crate::routes::core_group(b["group"].as_str().unwrap_or(""))
                };
                let (refs, others): (Vec<&Value>, Vec<&Value>) = v["spec"]["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|r| r["backendRefs"].as_array().into_iter().flatten())
                    .partition(service);
                invalid_kinds = others
                    .iter()
                    .map(|b| {
                        format!(
                            "{}/{} {}",
                            b["group"].as_str().unwrap_or(""),
                            b["kind"].as_str().unwrap_or(""),
                            b["name"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                let own = meta["namespace"].as_str().unwrap_or("default");
                let (refs, others): (Vec<&Value>, Vec<&Value>) = refs
                    .into_iter()
                    .partition(|b| b["namespace"].as_str().is_none_or(|ns| ns == own));
                not_permitted = others
                    .iter()
                    .map(|b| {
                        format!(
                            "{}/{}",
                            b["namespace"].as_str().unwrap_or(""),
                            b["name"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                backend_ports = refs
                    .iter()
                    .filter_map(|b| Some((str_at(b, "/name")?, port_at(b)?)))
                    .collect();
                let backends = refs.iter().filter_map(|b| str_at(b, "/name")).collect();
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
            uid: str_at(meta, "/uid").unwrap_or_default(),
            error,
            targets,
            backends,
            invalid_kinds,
            not_permitted,
            parent_refs,
            backend_ports,
            policy_ports: match kind {
                Kind::AuthorizationPolicy => ports_at(&v["spec"]["ports"]),
                _ => Vec::new(),
            },
            opaque_ports: match kind {
                Kind::BackendPolicy => ports_at(&v["spec"]["opaquePorts"]),
                _ => Vec::new(),
            },
            current: v.get("status").cloned().unwrap_or(Value::Null),
        }
    }
}

fn ports_at(list: &Value) -> Vec<u16> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| u16::try_from(p.as_u64()?).ok())
        .collect()
}

impl StatusInput {
    /// Whether its status, as read, holds entries strait wrote.
    pub fn has_entries_of_ours(&self) -> bool {
        self.current["parents"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["controllerName"] == CONTROLLER_NAME))
    }
}

pub type Statuses = Arc<HashMap<(Kind, String), StatusInput>>;

/// A status write the API server refused is tried again after this long, or
/// at once when the object changes (a conflict's newer version arriving).
const RETRY_REFUSED_WRITE: Duration = Duration::from_secs(30);

/// A status write not answered in this long is given up and retried as a
/// refused one: the writer sends one at a time, and one left hanging (an API
/// server that stopped answering on that connection) would stop every status
/// while the lease, renewed apart, stayed with this replica.
const STATUS_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What was last written for each object: its uid, the version the write
/// was made from, and the status (times aside). It stands in for the status
/// read only until a newer version is read: then the status read says
/// whether the write is still there, or another party has overwritten it.
type Written = HashMap<(Kind, String), (String, String, Value)>;

/// The status to write for `s` (and what it says, times aside), if one is
/// due: not when the object already says it or it was written, nor while a
/// refused write for this version waits. A refusal is forgotten once nothing
/// is left to write, so that no retry stays armed for it.
fn to_write(
    key: &(Kind, String),
    s: &StatusInput,
    snap: &Snapshot,
    written: &Written,
    refused: &mut Refused,
) -> Option<(Value, Value)> {
    let want = desired(s, snap);
    let said = without_times(&want);
    let wrote = written.get(key).is_some_and(|(uid, version, w)| {
        *uid == s.uid && *version == s.resource_version && *w == said
    });
    if said == without_times(&s.current) || wrote {
        refused.forget(key);
        return None;
    }
    if refused.holds_back(key, &s.resource_version) {
        return None;
    }
    Some((want, said))
}

/// Status writes the API server refused (a conflict, a denial, an invalid
/// status), so that a refusal is not repeated at every snapshot: by object,
/// the version it was for and when.
#[derive(Debug, Default)]
struct Refused(HashMap<(Kind, String), (String, Instant)>);

impl Refused {
    /// Whether the write for `version` of `key` waits: refused for that very
    /// version less than `RETRY_REFUSED_WRITE` ago.
    fn holds_back(&self, key: &(Kind, String), version: &str) -> bool {
        self.0
            .get(key)
            .is_some_and(|(v, at)| v == version && at.elapsed() < RETRY_REFUSED_WRITE)
    }

    fn record(&mut self, key: &(Kind, String), version: &str) {
        self.0
            .insert(key.clone(), (version.to_string(), Instant::now()));
    }

    fn forget(&mut self, key: &(Kind, String)) {
        self.0.remove(key);
    }

    /// When the first write held back may be tried again.
    fn next_retry(&self) -> Option<Instant> {
        self.0
            .values()
            .map(|(_, at)| *at + RETRY_REFUSED_WRITE)
            .min()
    }
}

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
    json!({"type": kind, "status": status, "reason": reason, "message": short(message),
           "observedGeneration": generation, "lastTransitionTime": since})
}

/// A condition's message at most. An error may quote what it refused (a
/// 40 KB regex), and past Gateway API's 32,768 characters the API server
/// refuses the whole status, leaving the last one (`Accepted`) in place.
const MAX_MESSAGE_BYTES: usize = 1024;

fn short(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message.into();
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end]).into()
}

/// The two conditions of an object whose `targets` and `backends` are looked
/// up in `snap`; for a route, of its entry for `parent`.
fn conditions(
    s: &StatusInput,
    snap: &Snapshot,
    old: &Value,
    parent: Option<&ParentRef>,
) -> Vec<Value> {
    let service = |name: &String| {
        snap.services.get(&ObjKey {
            namespace: s.namespace.clone(),
            name: name.clone(),
        })
    };
    let exists = |name: &String| service(name).is_some();
    // The ports of its Service a route's parentRef attaches it to: one port
    // must match both the port and the sectionName given.
    let parent_ports = parent.and_then(|p| {
        let ports = &service(&p.name)?.ports;
        Some(
            ports
                .iter()
                .filter(|sp| {
                    p.port.is_none_or(|n| sp.port == n)
                        && p.section
                            .as_ref()
                            .is_none_or(|s| sp.name.as_ref() == Some(s))
                })
                .collect::<Vec<_>>(),
        )
    });
    // A parentRef to a Service that does not exist, or whose port or
    // sectionName the Service does not have, attaches the route to nothing
    // (Gateway API: NoMatchingParent).
    let no_parent = parent
        .filter(|p| !exists(&p.name))
        .map(|p| format!("no Service {} in namespace {}", p.name, s.namespace));
    let unmatched = parent
        .zip(parent_ports.as_ref())
        .filter(|(_, ports)| ports.is_empty())
        .map(|(p, _)| match (p.port, &p.section) {
            (Some(n), Some(s)) => format!("Service {} has no port {n} named {s}", p.name),
            (Some(n), None) => format!("Service {} has no port {n}", p.name),
            (None, Some(s)) => format!("Service {} has no port named {s}", p.name),
            (None, None) => format!("Service {} has no ports", p.name),
        })
        .or(no_parent);
    // The parentRef, its Service and the ports it names there, when it names some.
    let named_ports = parent
        .zip(parent_ports.as_ref())
        .filter(|(_, ports)| !ports.is_empty())
        .map(|(p, ports)| {
            let svc = ObjKey {
                namespace: s.namespace.clone(),
                name: p.name.clone(),
            };
            (p, ports, svc)
        });
    // A headless Service has no frontend: its callers dial its pods' own
    // addresses, where no Service's route applies (GEP-1426 leaves such
    // parents out); nor has an ExternalName Service, a DNS alias whose
    // callers reach the name it points at.
    // Nor does a Service's BackendPolicy for them (only where a route sends
    // to the Service).
    let no_frontend_for = |name: &String, what: &str| {
        let i = service(name)?;
        if i.headless {
            Some(format!(
                "Service {name} is headless (clusterIP: None): its callers reach its pods by their own addresses, where no {what} applies"
            ))
        } else {
            i.external_name.then(|| format!(
                "Service {name} is an ExternalName alias: its callers reach the name it points at, where no {what} applies"
            ))
        }
    };
    // A route served elsewhere that sends to a headless Service uses its
    // policy there (none can send to an ExternalName one).
    let a_route_sends_to = |name: &String| {
        service(name).is_some_and(|i| i.headless && !i.external_name)
            && crate::index::view::served_route_sends_to(
                snap,
                &ObjKey {
                    namespace: s.namespace.clone(),
                    name: name.clone(),
                },
            )
    };
    let no_frontend = match s.kind {
        Kind::BackendPolicy => s.targets.iter().find_map(|t| {
            if a_route_sends_to(t) {
                return None;
            }
            no_frontend_for(t, "Service's policy").map(|why| {
                format!("{why} (only a route served on another Service's port that sends to it would use it, and none is served; declare its pods' opaque ports in their strait.dev/opaque-ports)")
            })
        }),
        _ => parent
            .filter(|_| s.kind.is_route())
            .and_then(|p| no_frontend_for(&p.name, "route")),
    };
    // An HTTPRoute gives way to a GRPCRoute on the same parent (GEP-1426):
    // where one is attached to every port this parentRef is, it is not served.
    let shadowed = named_ports
        .as_ref()
        .filter(|_| s.kind == Kind::HttpRoute)
        .and_then(|(p, ports, svc)| {
            let by: Vec<_> = ports
                .iter()
                .map(|sp| crate::index::view::grpc_route_on(snap, svc, sp))
                .collect::<Option<_>>()?;
            Some(format!(
                "{} is attached to Service {} too: of an HTTPRoute and a GRPCRoute on one parent, only the GRPCRoute is served",
                by[0], p.name
            ))
        });
    // Past the routes a Service port serves, the newest are not served there:
    // on every port this parentRef names, not accepted; on some, said so.
    let past_cap = named_ports
        .as_ref()
        .filter(|_| s.kind.is_route())
        .and_then(|(p, ports, svc)| {
            let key = ObjKey {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            };
            let id = match s.kind {
                Kind::GrpcRoute => crate::routes::RouteId::grpc(key),
                _ => crate::routes::RouteId::http(key),
            };
            let past: Vec<String> = ports
                .iter()
                .filter(|sp| crate::index::view::past_route_cap(snap, svc, sp, &id))
                .map(|sp| sp.port.to_string())
                .collect();
            (!past.is_empty()).then(|| {
                let why = format!(
                    "{} older routes (or of a name before this one's) are attached to Service {} port {}: the most strait serves on a port",
                    crate::defaults::MAX_ROUTES_PER_PARENT,
                    p.name,
                    past.join(", ")
                );
                (past.len() == ports.len(), why)
            })
        });
    // A port its callers carry as TCP (its appProtocol, a BackendPolicy's
    // opaquePorts) reads no HTTP: no route is applied there. On every port
    // this parentRef names, not accepted; on some, said so.
    let opaque = named_ports
        .as_ref()
        .filter(|_| s.kind.is_route())
        .and_then(|(p, ports, svc)| {
            let opaque: Vec<String> = ports
                .iter()
                .filter(|sp| crate::index::view::carried_as_tcp(snap, svc, sp))
                .map(|sp| sp.port.to_string())
                .collect();
            (!opaque.is_empty()).then(|| {
                let (ports_are, what) = match opaque.len() {
                    1 => ("port", "is"),
                    _ => ("ports", "are"),
                };
                let why = format!(
                    "Service {} {ports_are} {} {what} opaque (its appProtocol, or a BackendPolicy's opaquePorts, or, without an appProtocol, one callers carry as TCP by default: give an HTTP port appProtocol: http): carried as TCP, with no route",
                    p.name,
                    opaque.join(", ")
                );
                (opaque.len() == ports.len(), why)
            })
        });
    // A backendRef to a port its Service does not have sends its share nowhere.
    let bad_ports: Vec<String> = s
        .backend_ports
        .iter()
        .filter_map(|(name, port)| {
            let info = service(name)?;
            if info.external_name {
                return Some(format!(
                    "Service {name} is an ExternalName alias, which a route cannot send to"
                ));
            }
            (!info.ports.iter().any(|sp| sp.port == *port))
                .then(|| format!("Service {name} has no port {port}"))
        })
        .collect();
    // Of BackendPolicies on one Service only the first by name applies; the
    // others are told so (Gateway API policy attachment's `Conflicted`).
    let conflicted = (s.kind == Kind::BackendPolicy)
        .then(|| {
            s.targets.iter().find_map(|t| {
                let first = snap
                    .backend_policies
                    .get(&ObjKey {
                        namespace: s.namespace.clone(),
                        name: t.clone(),
                    })?
                    .keys()
                    .next()?;
                (*first != s.name).then(|| {
                    format!("BackendPolicy {first} applies to Service {t}: of several, the first by name does")
                })
            })
        })
        .flatten();
    // A policy whose target does not exist covers nothing until it does:
    // not accepted (policy attachment's TargetNotFound), so that a typo in
    // its name does not read as a port closed.
    let no_target = Some(
        s.targets
            .iter()
            .filter(|t| !s.kind.is_route() && !exists(t))
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .filter(|m| !m.is_empty())
    .map(|m| {
        format!(
            "no Service {} in namespace {}: the policy covers nothing until there is",
            m.join(", "),
            s.namespace
        )
    });
    let accepted = match (&s.error, unmatched) {
        // Gateway API's reason for a route with a value it cannot take;
        // policy attachment's for a policy.
        (Some(e), _) if s.kind.is_route() => {
            condition("Accepted", false, "UnsupportedValue", e, s.generation, old)
        }
        (Some(e), _) => condition("Accepted", false, "Invalid", e, s.generation, old),
        (None, _) if no_target.is_some() => condition(
            "Accepted",
            false,
            "TargetNotFound",
            no_target.as_deref().unwrap_or_default(),
            s.generation,
            old,
        ),
        (None, _) if conflicted.is_some() => condition(
            "Accepted",
            false,
            "Conflicted",
            conflicted.as_deref().unwrap_or_default(),
            s.generation,
            old,
        ),
        (None, _) if no_frontend.is_some() => condition(
            "Accepted",
            false,
            "UnsupportedValue",
            no_frontend.as_deref().unwrap_or_default(),
            s.generation,
            old,
        ),
        (None, Some(why)) => condition(
            "Accepted",
            false,
            "NoMatchingParent",
            &why,
            s.generation,
            old,
        ),
        (None, None) if shadowed.is_some() => condition(
            "Accepted",
            false,
            "Conflicted",
            shadowed.as_deref().unwrap_or_default(),
            s.generation,
            old,
        ),
        (None, None) => match (&past_cap, &opaque) {
            (_, Some((true, why))) => condition(
                "Accepted",
                false,
                "UnsupportedValue",
                why,
                s.generation,
                old,
            ),
            (Some((true, why)), _) => {
                condition("Accepted", false, "TooManyRoutes", why, s.generation, old)
            }
            (past_cap, opaque) => {
                let not_served: Vec<&str> = [past_cap, opaque]
                    .into_iter()
                    .flatten()
                    .map(|(_, why)| why.as_str())
                    .collect();
                let note = service_ports_named(s, snap).or_else(|| opaque_ports_missing(s, snap));
                let message = if let Some(note) = note {
                    format!("accepted by strait; {note}")
                } else if not_served.is_empty() {
                    "accepted by strait".to_string()
                } else {
                    format!(
                        "accepted by strait, not served where {}",
                        not_served.join("; ")
                    )
                };
                condition("Accepted", true, "Accepted", &message, s.generation, old)
            }
        },
    };
    // A route's parents are told of under `Accepted`, each in its own entry:
    // its references are its backends.
    let parents = if parent.is_some() {
        &[][..]
    } else {
        &s.targets[..]
    };
    let missing: Vec<&String> = parents
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
    } else if !s.invalid_kinds.is_empty() {
        let msg = format!(
            "not kinds strait sends to (only Services), their share of requests answered 500: {}",
            s.invalid_kinds.join(", ")
        );
        condition(
            "ResolvedRefs",
            false,
            "InvalidKind",
            &msg,
            s.generation,
            old,
        )
    } else if !s.not_permitted.is_empty() {
        let msg = format!(
            "{}, their share of requests answered 500: {}",
            crate::routes::OTHER_NAMESPACE,
            s.not_permitted.join(", ")
        );
        condition(
            "ResolvedRefs",
            false,
            "RefNotPermitted",
            &msg,
            s.generation,
            old,
        )
    } else if missing.is_empty() && bad_ports.is_empty() {
        condition(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "every Service referenced exists",
            s.generation,
            old,
        )
    } else if missing.is_empty() {
        condition(
            "ResolvedRefs",
            false,
            "BackendNotFound",
            &bad_ports.join("; "),
            s.generation,
            old,
        )
    } else {
        let names: Vec<&str> = missing.iter().map(|n| n.as_str()).collect();
        let reason = if s.kind.is_route() {
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

/// A `targetRef` policy's ports that are its Service's ports and none of its
/// pods' (the slices' target ports): `ports` names the pods' own ports, as
/// Istio's and Linkerd's policies do, so `80` on a Service that sends port 80
/// to the pods' 8080 protects nothing while 8080 stays as open as before.
/// Said in the status, which otherwise reads as if all were well.
fn service_ports_named(s: &StatusInput, snap: &Snapshot) -> Option<String> {
    let target = s.targets.first()?;
    let svc = ObjKey {
        namespace: s.namespace.clone(),
        name: target.clone(),
    };
    let pods: std::collections::BTreeSet<u16> = snap
        .slices
        .get(&svc)?
        .values()
        .flat_map(|slice| slice.ports.iter().map(|(_, p)| *p))
        .collect();
    let info = snap.services.get(&svc)?;
    let wrong: Vec<String> = s
        .policy_ports
        .iter()
        .filter(|p| !pods.contains(p) && info.ports.iter().any(|sp| sp.port == **p))
        .map(u16::to_string)
        .collect();
    if wrong.is_empty() || pods.is_empty() {
        return None;
    }
    let listen: Vec<String> = pods.iter().map(u16::to_string).collect();
    let (ports, reach) = match wrong.len() {
        1 => ("port", "reaches"),
        _ => ("ports", "reach"),
    };
    Some(format!(
        "{ports} {} of Service {target} {reach} its pods on {}: a policy's ports are the pods' own, and no endpoint of the Service listens on {}",
        wrong.join(", "),
        listen.join(", "),
        wrong.join(", ")
    ))
}

/// A BackendPolicy's `opaquePorts` its Service does not have: they name the
/// Service's ports, not its pods' (as an AuthorizationPolicy's `ports` do),
/// and one of the pods' `8080` behind the Service's `80` leaves `80` detected.
fn opaque_ports_missing(s: &StatusInput, snap: &Snapshot) -> Option<String> {
    let target = s.targets.first()?;
    let info = snap.services.get(&ObjKey {
        namespace: s.namespace.clone(),
        name: target.clone(),
    })?;
    let missing: Vec<String> = s
        .opaque_ports
        .iter()
        .filter(|p| !info.ports.iter().any(|sp| sp.port == **p))
        .map(u16::to_string)
        .collect();
    if missing.is_empty() {
        return None;
    }
    let has: Vec<String> = info.ports.iter().map(|sp| sp.port.to_string()).collect();
    Some(format!(
        "opaquePorts {} are not ports of Service {target} ({}): they name the Service's ports, and none is opaque by them",
        missing.join(", "),
        if has.is_empty() {
            "it has none".to_string()
        } else {
            format!("its ports: {}", has.join(", "))
        }
    ))
}

/// The status the object should have.
pub fn desired(s: &StatusInput, snap: &Snapshot) -> Value {
    match s.kind {
        Kind::HttpRoute | Kind::GrpcRoute => {
            let ours = s.parent_refs.iter().map(|parent| {
                let parent_ref = parent.written.clone();
                let old = s.current["parents"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| {
                        p["controllerName"] == CONTROLLER_NAME && p["parentRef"] == parent_ref
                    })
                    .map(|p| p["conditions"].clone())
                    .unwrap_or(Value::Null);
                json!({"parentRef": parent_ref,
                       "controllerName": CONTROLLER_NAME,
                       "conditions": conditions(s, snap, &old, Some(parent))})
            });
            let mut ours: Vec<Value> = ours.collect();
            // Entries of other controllers (a Gateway's) are kept as they
            // are, and each of ours where it was (put last, it would be
            // written again only to reorder, and fought over by a controller
            // that puts its own last); new ones go last, gone ones go.
            let mut parents: Vec<Value> = Vec::with_capacity(ours.len());
            for p in s.current["parents"].as_array().into_iter().flatten() {
                if p["controllerName"] != CONTROLLER_NAME {
                    parents.push(p.clone());
                } else if let Some(i) = ours.iter().position(|o| o["parentRef"] == p["parentRef"]) {
                    parents.push(ours.remove(i));
                }
            }
            parents.extend(ours);
            json!({"parents": parents})
        }
        _ => json!({"conditions": conditions(s, snap, &s.current["conditions"], None)}),
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

/// The shortest time between two rounds of statuses.
const ROUND_EVERY: Duration = Duration::from_secs(1);

/// Writes statuses while `leader` says this replica holds the lease.
pub async fn write(
    client: kube::Client,
    identity: String,
    mut statuses: watch::Receiver<Statuses>,
    mut snapshot: watch::Receiver<Arc<Snapshot>>,
    mut leader: watch::Receiver<bool>,
) {
    let mut written: Written = HashMap::new();
    let mut refused = Refused::default();
    let mut last_round: Option<Instant> = None;
    loop {
        if *leader.borrow() {
            // Every status is worked out again each round, and snapshots
            // come up to 100 a second under endpoint churn, which no status
            // reads: rounds are a second apart at most, each taking the
            // changes of the second before it.
            if let Some(t) = last_round {
                tokio::time::sleep_until(t + ROUND_EVERY).await;
            }
        }
        if *leader.borrow_and_update() {
            last_round = Some(Instant::now());
            let (all, snap) = (
                statuses.borrow_and_update().clone(),
                snapshot.borrow_and_update().clone(),
            );
            for (key, s) in all.iter() {
                let Some((want, said)) = to_write(key, s, &snap, &written, &mut refused) else {
                    continue;
                };
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
                let patched = tokio::time::timeout(
                    STATUS_WRITE_TIMEOUT,
                    api.patch_status(&s.name, &params, &Patch::Merge(patch)),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(kube::Error::Service(
                        format!("no answer in {STATUS_WRITE_TIMEOUT:?}").into(),
                    ))
                });
                match patched {
                    Ok(_) => {
                        debug!(kind = ?s.kind, object = %key.1, "status written");
                        written.insert(
                            key.clone(),
                            (s.uid.clone(), s.resource_version.clone(), said),
                        );
                        refused.forget(key);
                    }
                    Err(e) => {
                        warn!(kind = ?s.kind, object = %key.1, error = %e, retry_in = ?RETRY_REFUSED_WRITE, "cannot write status");
                        refused.record(key, &s.resource_version);
                    }
                }
            }
            written.retain(|k, _| all.contains_key(k));
            refused.0.retain(|k, _| all.contains_key(k));
        } else {
            written.clear();
            refused.0.clear();
        }
        // A refused write is tried again once its wait is over, whatever else
        // happens meanwhile.
        let retry = refused.next_retry();
        tokio::select! {
            r = statuses.changed() => if r.is_err() { return },
            r = snapshot.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
            () = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused write waits before it is tried again for the same version
    /// of the object; a newer version is tried at once.
    #[tokio::test(start_paused = true)]
    async fn a_refused_write_is_not_repeated_at_every_snapshot() {
        let key = (Kind::HttpRoute, "shop/r".to_string());
        let mut refused = Refused::default();
        assert!(!refused.holds_back(&key, "7"));
        refused.record(&key, "7");
        let at = Instant::now();
        assert!(refused.holds_back(&key, "7"));
        assert!(!refused.holds_back(&key, "8"), "a newer version waits");
        assert_eq!(refused.next_retry(), Some(at + RETRY_REFUSED_WRITE));
        tokio::time::advance(RETRY_REFUSED_WRITE).await;
        assert!(!refused.holds_back(&key, "7"));
        refused.forget(&key);
        assert_eq!(refused.next_retry(), None);
    }

    /// An object deleted and made again with the same spec (`kubectl replace
    /// --force`) is another object: its status is written though the same
    /// words were written for the one before.
    #[test]
    fn an_object_made_again_gets_its_status_though_the_last_one_had_it() {
        let snap = Snapshot::empty("cluster.local");
        let route = |uid: &str| {
            serde_json::json!({
                "metadata": {"namespace": "shop", "name": "r", "resourceVersion": "7", "uid": uid},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}]}
            })
        };
        let key = (Kind::HttpRoute, "shop/r".to_string());
        let (mut written, mut refused) = (Written::new(), Refused::default());
        let first = StatusInput::of(Kind::HttpRoute, &route("a"), None);
        let (_, said) = to_write(&key, &first, &snap, &written, &mut refused).unwrap();
        written.insert(key.clone(), (first.uid.clone(), "7".into(), said));
        assert!(to_write(&key, &first, &snap, &written, &mut refused).is_none());
        let again = StatusInput::of(Kind::HttpRoute, &route("b"), None);
        assert!(to_write(&key, &again, &snap, &written, &mut refused).is_some());
    }

    /// A status strait wrote that another party then overwrote (a
    /// `kubectl edit --subresource status`, another controller's stale
    /// write) is written again once that version is read.
    #[test]
    fn a_status_overwritten_after_it_was_written_is_written_again() {
        let snap = Snapshot::empty("cluster.local");
        let route = serde_json::json!({
            "metadata": {"namespace": "shop", "name": "r", "resourceVersion": "7", "uid": "a"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}]}
        });
        let key = (Kind::HttpRoute, "shop/r".to_string());
        let (mut written, mut refused) = (Written::new(), Refused::default());
        let s = StatusInput::of(Kind::HttpRoute, &route, None);
        let (want, said) = to_write(&key, &s, &snap, &written, &mut refused).unwrap();
        written.insert(key.clone(), ("a".into(), "7".into(), said));
        // Until the write is read back, the version it was made from is not
        // written to again.
        assert!(to_write(&key, &s, &snap, &written, &mut refused).is_none());
        let mut landed = route.clone();
        landed["status"] = want;
        landed["metadata"]["resourceVersion"] = "8".into();
        let s = StatusInput::of(Kind::HttpRoute, &landed, None);
        assert!(to_write(&key, &s, &snap, &written, &mut refused).is_none());
        let mut overwritten = route.clone();
        overwritten["status"] = serde_json::json!({"parents": []});
        overwritten["metadata"]["resourceVersion"] = "9".into();
        let s = StatusInput::of(Kind::HttpRoute, &overwritten, None);
        assert!(
            to_write(&key, &s, &snap, &written, &mut refused).is_some(),
            "the overwritten status is left as it is"
        );
    }

    /// A status write the API server never answers is given up and tried
    /// again, rather than holding every status after it back for good.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_write_is_given_up_and_tried_again() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let patches = Arc::new(AtomicUsize::new(0));
        let counted = patches.clone();
        let api = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let n = if req.method() == http::Method::PATCH {
                counted.fetch_add(1, Ordering::SeqCst)
            } else {
                usize::MAX
            };
            async move {
                if n == 0 {
                    // The first write is never answered.
                    std::future::pending::<()>().await;
                }
                let body = r#"{"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute","metadata":{"name":"r","namespace":"shop"}}"#;
                http::Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body.as_bytes().to_vec()))
            }
        });
        let client = kube::Client::new(api, "default");
        let route = serde_json::json!({
            "metadata": {"namespace": "shop", "name": "r", "resourceVersion": "7", "uid": "a"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}]}
        });
        let statuses: Statuses = Arc::new(HashMap::from([(
            (Kind::HttpRoute, "shop/r".to_string()),
            StatusInput::of(Kind::HttpRoute, &route, None),
        )]));
        let (_s, statuses) = watch::channel(statuses);
        let (_n, snapshot) = watch::channel(Arc::new(Snapshot::empty("cluster.local")));
        let (_l, leader) = watch::channel(true);
        let writer = tokio::spawn(write(client, "strait".into(), statuses, snapshot, leader));
        tokio::time::sleep(STATUS_WRITE_TIMEOUT + RETRY_REFUSED_WRITE * 2).await;
        assert!(
            patches.load(Ordering::SeqCst) >= 2,
            "the write was not tried again"
        );
        writer.abort();
    }

    /// A refused write whose status arrived anyway (the write landed though
    /// its answer did not, another replica wrote it) leaves no retry armed:
    /// an expired one would wake the writer at once, round after round.
    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_forgotten_once_nothing_is_left_to_write() {
        let snap = Snapshot::empty("cluster.local");
        let route = serde_json::json!({
            "metadata": {"namespace": "shop", "name": "r", "resourceVersion": "7"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}]}
        });
        let s = StatusInput::of(Kind::HttpRoute, &route, None);
        let key = (Kind::HttpRoute, "shop/r".to_string());
        let (written, mut refused) = (HashMap::new(), Refused::default());
        let (want, _) =
            to_write(&key, &s, &snap, &written, &mut refused).expect("a status to write");
        refused.record(&key, "7");
        assert!(
            to_write(&key, &s, &snap, &written, &mut refused).is_none(),
            "held back"
        );
        let mut landed = route.clone();
        landed["status"] = want;
        landed["metadata"]["resourceVersion"] = "8".into();
        let s = StatusInput::of(Kind::HttpRoute, &landed, None);
        assert!(to_write(&key, &s, &snap, &written, &mut refused).is_none());
        assert_eq!(refused.next_retry(), None);
    }

    /// strait's entries stay where they are among other controllers': put
    /// last each time, they would be written again just to reorder them,
    /// and against a controller that puts its own last, for ever.
    #[test]
    fn entries_keep_their_place_among_other_controllers() {
        let snap = Snapshot::empty("cluster.local");
        let gateway = serde_json::json!({"parentRef": {"name": "a-gateway"},
            "controllerName": "example.io/gateway", "conditions": []});
        let mut route = serde_json::json!({
            "metadata": {"namespace": "shop", "name": "r", "resourceVersion": "7", "uid": "a"},
            "spec": {"parentRefs": [
                {"group": "", "kind": "Service", "name": "web"},
                {"name": "a-gateway"}
            ]},
            "status": {"parents": [gateway.clone()]}
        });
        let want = desired(&StatusInput::of(Kind::HttpRoute, &route, None), &snap);
        let ours = want["parents"][1].clone();
        assert_eq!(ours["controllerName"], CONTROLLER_NAME);
        // The other controller wrote its entry last.
        route["status"] = serde_json::json!({"parents": [ours, gateway]});
        let s = StatusInput::of(Kind::HttpRoute, &route, None);
        assert_eq!(desired(&s, &snap), route["status"]);
        let key = (Kind::HttpRoute, "shop/r".to_string());
        let (written, mut refused) = (Written::new(), Refused::default());
        assert!(to_write(&key, &s, &snap, &written, &mut refused).is_none());
    }

    /// A route that no longer has a Service parent still has strait's
    /// entries taken out of its status; other controllers' stay.
    #[test]
    fn strait_s_entries_of_a_route_without_service_parents_are_taken_out() {
        let route = serde_json::json!({
            "metadata": {"namespace": "shop", "name": "r"},
            "spec": {"parentRefs": [{"name": "a-gateway"}]},
            "status": {"parents": [
                {"parentRef": {"group": "", "kind": "Service", "name": "web"},
                 "controllerName": CONTROLLER_NAME, "conditions": []},
                {"parentRef": {"name": "a-gateway"},
                 "controllerName": "example.io/gateway", "conditions": []}
            ]}
        });
        let s = StatusInput::of(Kind::HttpRoute, &route, None);
        assert!(s.targets.is_empty() && s.has_entries_of_ours());
        let want = desired(&s, &Snapshot::empty("cluster.local"));
        assert_eq!(
            want["parents"],
            serde_json::json!([{"parentRef": {"name": "a-gateway"},
                "controllerName": "example.io/gateway", "conditions": []}])
        );
        let ours_gone = serde_json::json!({"metadata": route["metadata"], "spec": route["spec"], "status": want});
        assert!(!StatusInput::of(Kind::HttpRoute, &ours_gone, None).has_entries_of_ours());
    }

    /// A route's parentRef to a Service that does not exist attaches it to
    /// nothing: that entry is not Accepted, and the other parent's entry does
    /// not take the missing parent for a missing backend.
    #[test]
    fn a_parent_service_that_does_not_exist_is_no_matching_parent() {
        let route = serde_json::json!({
            "metadata": {"namespace": "shop", "name": "r"},
            "spec": {
                "parentRefs": [
                    {"group": "", "kind": "Service", "name": "web"},
                    {"group": "", "kind": "Service", "name": "api"}
                ],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]
            }
        });
        let mut snap = Snapshot::empty("cluster.local");
        snap.services.insert(
            ObjKey {
                namespace: "shop".into(),
                name: "web".into(),
            },
            crate::index::ServiceInfo {
                cluster_ips: vec![],
                headless: false,
                external_name: false,
                ports: vec![crate::index::ServicePort {
                    name: None,
                    port: 80,
                    app_protocol: None,
                }],
                topology_aware: false,
                selector: Default::default(),
            },
        );
        let s = StatusInput::of(Kind::HttpRoute, &route, None);
        let want = desired(&s, &snap);
        let said = |parent: usize, kind: &str| {
            let c = condition_in(&want["parents"][parent]["conditions"], kind);
            (c["status"].clone(), c["reason"].clone())
        };
        assert_eq!(want["parents"][1]["parentRef"]["name"], "api");
        assert_eq!(said(0, "Accepted"), ("True".into(), "Accepted".into()));
        assert_eq!(
            said(0, "ResolvedRefs"),
            ("True".into(), "ResolvedRefs".into())
        );
        assert_eq!(
            said(1, "Accepted"),
            ("False".into(), "NoMatchingParent".into())
        );
        assert_eq!(
            said(1, "ResolvedRefs"),
            ("True".into(), "ResolvedRefs".into())
        );
    }

    /// The condition of type `kind` in a list of them.
    fn condition_in(conditions: &Value, kind: &str) -> Value {
        conditions
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap()
            .clone()
    }

    /// The `Accepted` condition (status, reason, message) of route `name`
    /// with one parentRef.
    /// The objects of `yaml`, in `snap`.
    fn insert(snap: &mut Snapshot, yaml: &str) {
        for o in crate::manifests::parse_file(yaml).unwrap() {
            o.insert_into(snap);
        }
    }

    /// A policy's condition `kind`: status, reason, message.
    fn status_of(want: &Value, kind: &str) -> (String, String, String) {
        let c = condition_in(&want["conditions"], kind);
        let s = |k: &str| c[k].as_str().unwrap().to_string();
        (s("status"), s("reason"), s("message"))
    }

    fn route_accepted(snap: &Snapshot, name: &str, parent: Value) -> (String, String, String) {
        let route = serde_json::json!({
            "metadata": {"namespace": "shop", "name": name},
            "spec": {"parentRefs": [parent]}
        });
        let want = desired(&StatusInput::of(Kind::HttpRoute, &route, None), snap);
        let c = condition_in(&want["parents"][0]["conditions"], "Accepted");
        let s = |k: &str| c[k].as_str().unwrap().to_string();
        (s("status"), s("reason"), s("message"))
    }

    /// A policy's `ports` are its pods' own: naming the Service's port (80,
    /// which the Service sends to the pods' 8080) protects nothing, and the
    /// status says so rather than reading as if all were well.
    #[test]
    fn a_policy_naming_its_service_s_port_says_it_protects_nothing() {
        let mut snap = Snapshot::empty("cluster.local");
        insert(
            &mut snap,
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{name: http, port: 80, targetPort: 8080}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.1.0.9]}]\n",
        );
        let message = |ports: Value| {
            let policy = serde_json::json!({
                "metadata": {"namespace": "shop", "name": "p"},
                "spec": {"targetRef": {"kind": "Service", "name": "web"}, "mtls": "STRICT", "ports": ports}
            });
            let want = desired(
                &StatusInput::of(Kind::AuthorizationPolicy, &policy, None),
                &snap,
            );
            let c = condition_in(&want["conditions"], "Accepted");
            (
                c["status"].clone(),
                c["message"].as_str().unwrap().to_string(),
            )
        };
        let (status, m) = message(serde_json::json!([80]));
        assert_eq!(status, "True");
        assert!(
            m.contains("port 80 of Service web reaches its pods on 8080"),
            "{m}"
        );
        let (_, m) = message(serde_json::json!([8080]));
        assert_eq!(m, "accepted by strait");
    }

    /// A policy whose Service does not exist (a typo in its name) covers
    /// nothing: not accepted, so that `kubectl get` does not show a STRICT
    /// port that is open; accepted once the Service is there.
    #[test]
    fn a_policy_whose_service_does_not_exist_is_not_accepted() {
        let mut snap = Snapshot::empty("cluster.local");
        for kind in [Kind::AuthorizationPolicy, Kind::BackendPolicy] {
            let policy = serde_json::json!({
                "metadata": {"namespace": "shop", "name": "p"},
                "spec": {"targetRef": {"kind": "Service", "name": "web-api"}, "mtls": "STRICT"}
            });
            let want = desired(&StatusInput::of(kind, &policy, None), &snap);
            let (status, reason, message) = status_of(&want, "Accepted");
            assert_eq!(
                (status.as_str(), reason.as_str()),
                ("False", "TargetNotFound"),
                "{kind:?}"
            );
            assert!(
                message.contains("no Service web-api in namespace shop"),
                "{message}"
            );
        }
        insert(
            &mut snap,
            "apiVersion: v1\nkind: Service\nmetadata: {name: web-api, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n",
        );
        let policy = serde_json::json!({
            "metadata": {"namespace": "shop", "name": "p"},
            "spec": {"targetRef": {"kind": "Service", "name": "web-api"}, "mtls": "STRICT"}
        });
        let want = desired(
            &StatusInput::of(Kind::AuthorizationPolicy, &policy, None),
            &snap,
        );
        assert_eq!(status_of(&want, "Accepted").0, "True");
    }

    /// A route on a port its callers carry as TCP is applied nowhere there:
    /// not accepted where that is every port its parentRef names, accepted
    /// with the port named where it is some.
    #[test]
    fn a_route_on_an_opaque_port_says_it_is_not_served_there() {
        let mut snap = Snapshot::empty("cluster.local");
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec: {ports: [{name: sql, port: 5432, appProtocol: tcp}, {name: http, port: 80, appProtocol: http2}, {name: tls, port: 443, appProtocol: https}, {name: wss, port: 8443, appProtocol: kubernetes.io/wss}]}\n";
        insert(&mut snap, yaml);
        let accepted = |parent: serde_json::Value| route_accepted(&snap, "r", parent);
        // The app's own TLS: no proxy reads a request there to route.
        for port in [443, 8443] {
            let (status, reason, message) = accepted(
                serde_json::json!({"group": "", "kind": "Service", "name": "db", "port": port}),
            );
            assert_eq!(
                (status.as_str(), reason.as_str()),
                ("False", "UnsupportedValue"),
                "{port}: {message}"
            );
        }
        let (status, reason, message) = accepted(
            serde_json::json!({"group": "", "kind": "Service", "name": "db", "port": 5432}),
        );
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "UnsupportedValue")
        );
        assert!(message.contains("port 5432 is opaque"), "{message}");
        let (status, _, message) =
            accepted(serde_json::json!({"group": "", "kind": "Service", "name": "db"}));
        assert_eq!(status, "True", "{message}");
        assert!(
            message.contains("not served where Service db ports 5432, 443, 8443 are opaque"),
            "{message}"
        );
        let (status, _, message) =
            accepted(serde_json::json!({"group": "", "kind": "Service", "name": "db", "port": 80}));
        assert_eq!(
            (status.as_str(), message.as_str()),
            ("True", "accepted by strait")
        );
        // A port callers carry as TCP by default (Selenium's 4444), without an
        // appProtocol, is opaque; with an HTTP one it is routed.
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: grid, namespace: shop}\nspec: {ports: [{name: wd, port: 4444}]}\n";
        insert(&mut snap, yaml);
        let grid =
            serde_json::json!({"group": "", "kind": "Service", "name": "grid", "port": 4444});
        let (status, _, message) = route_accepted(&snap, "r", grid.clone());
        assert_eq!(status, "False", "{message}");
        assert!(message.contains("appProtocol: http"), "{message}");
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: grid, namespace: shop}\nspec: {ports: [{name: wd, port: 4444, appProtocol: http}]}\n";
        insert(&mut snap, yaml);
        let (status, _, message) = route_accepted(&snap, "r", grid);
        assert_eq!(
            (status.as_str(), message.as_str()),
            ("True", "accepted by strait")
        );
    }

    /// A headless Service has no frontend: its callers reach its pods by
    /// their own addresses, where no Service's route applies (GEP-1426 leaves
    /// headless parents out). A route on one is not accepted, and says why.
    #[test]
    fn a_route_on_a_headless_service_says_it_is_never_applied() {
        let mut snap = Snapshot::empty("cluster.local");
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec: {clusterIP: None, ports: [{name: http, port: 80}]}\n";
        insert(&mut snap, yaml);
        let (status, reason, message) = route_accepted(
            &snap,
            "r",
            serde_json::json!({"group": "", "kind": "Service", "name": "db"}),
        );
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "UnsupportedValue"),
            "{message}"
        );
        assert!(message.contains("headless"), "{message}");
        // An ExternalName alias: neither a parent nor a backend, and said so
        // rather than "has no ports".
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: shop}\nspec: {type: ExternalName, externalName: db.example.com, ports: [{port: 443}]}\n";
        insert(&mut snap, yaml);
        let (status, reason, message) = route_accepted(
            &snap,
            "r",
            serde_json::json!({"group": "", "kind": "Service", "name": "ext"}),
        );
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "UnsupportedValue"),
            "{message}"
        );
        assert!(message.contains("ExternalName alias"), "{message}");
        let route = serde_json::json!({
            "metadata": {"namespace": "shop", "name": "to-ext"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "db"}],
                "rules": [{"backendRefs": [{"name": "ext", "port": 443}]}]
            }
        });
        let want = desired(&StatusInput::of(Kind::HttpRoute, &route, None), &snap);
        let refs = condition_in(&want["parents"][0]["conditions"], "ResolvedRefs");
        let message = refs["message"].as_str().unwrap();
        assert_eq!(refs["status"], "False");
        assert!(message.contains("ExternalName alias"), "{message}");
    }

    /// A backendRef strait cannot send to leaves the route accepted and says
    /// why under `ResolvedRefs: False`, with Gateway API's reason: a kind it
    /// does not send to (`InvalidKind`), another namespace's Service, which
    /// no ReferenceGrant strait reads permits (`RefNotPermitted`).
    #[test]
    fn a_backend_strait_cannot_send_to_says_why_in_gateway_api_s_terms() {
        let mut snap = Snapshot::empty("cluster.local");
        insert(
            &mut snap,
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n",
        );
        for (other, reason, named) in [
            (
                serde_json::json!({"group": "multicluster.x-k8s.io", "kind": "ServiceImport", "name": "web"}),
                "InvalidKind",
                "multicluster.x-k8s.io/ServiceImport web",
            ),
            (
                serde_json::json!({"name": "web", "namespace": "canary", "port": 80}),
                "RefNotPermitted",
                "canary/web",
            ),
        ] {
            let route = serde_json::json!({
                "metadata": {"namespace": "shop", "name": "r"},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                    "rules": [{"backendRefs": [{"name": "web", "namespace": "shop", "port": 80}, other]}]
                }
            });
            let want = desired(&StatusInput::of(Kind::HttpRoute, &route, None), &snap);
            let conditions = &want["parents"][0]["conditions"];
            assert_eq!(condition_in(conditions, "Accepted")["status"], "True");
            let refs = condition_in(conditions, "ResolvedRefs");
            assert_eq!(
                (refs["status"].as_str(), refs["reason"].as_str()),
                (Some("False"), Some(reason)),
                "{refs}"
            );
            let message = refs["message"].as_str().unwrap();
            assert!(message.contains(named), "{message}");
        }
    }

    /// A route strait cannot take says so with Gateway API's reason
    /// (tools read it), a policy with policy attachment's.
    #[test]
    fn a_refused_object_says_why_in_its_kinds_terms() {
        let route = serde_json::json!({
            "metadata": {"namespace": "shop", "name": "r"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}]}
        });
        let snap = Snapshot::empty("cluster.local");
        let error =
            Some("spec.rules[0].filters[0].type: RequestMirror is not supported".to_string());
        let s = StatusInput::of(Kind::HttpRoute, &route, error.clone());
        let want = desired(&s, &snap);
        let accepted = condition_in(&want["parents"][0]["conditions"], "Accepted");
        assert_eq!(accepted["status"], "False");
        assert_eq!(accepted["reason"], "UnsupportedValue");
        let policy = serde_json::json!({
            "metadata": {"namespace": "shop", "name": "p"},
            "spec": {"targetRef": {"group": "", "kind": "Service", "name": "web"}}
        });
        let s = StatusInput::of(Kind::BackendPolicy, &policy, error);
        let want = desired(&s, &snap);
        let text = want.to_string();
        assert!(text.contains(r#""reason":"Invalid""#), "{text}");
    }

    /// Past the routes a Service port serves, the newest route says it is
    /// not served there: not accepted where that is every port its
    /// parentRef names, accepted with the port named where it is some.
    #[test]
    fn a_route_past_the_routes_a_port_serves_says_so() {
        use crate::routes::{ParentRef, RouteId, RouteSpec};
        let mut snap = Snapshot::empty("cluster.local");
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{name: http, port: 80}, {name: admin, port: 81}]}\n";
        insert(&mut snap, yaml);
        let key = |name: &str| ObjKey {
            namespace: "shop".into(),
            name: name.into(),
        };
        let spec = |port: Option<u16>, day: i64| RouteSpec {
            created: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1_704_067_200 + day * 86_400).unwrap(),
            )),
            parents: vec![ParentRef {
                service: key("web"),
                port,
                section_name: None,
            }],
            rules: Vec::new(),
        };
        for i in 0..crate::defaults::MAX_ROUTES_PER_PARENT {
            snap.add_route(RouteId::http(key(&format!("r-{i:03}"))), spec(Some(80), 0));
        }
        // On both ports; then one on port 80 only.
        snap.add_route(RouteId::http(key("late")), spec(None, 1));
        snap.add_route(RouteId::http(key("later")), spec(Some(80), 2));
        let accepted = |name: &str, parent: Value| route_accepted(&snap, name, parent);
        let on_80 = serde_json::json!({"group": "", "kind": "Service", "name": "web", "port": 80});
        let (status, reason, message) = accepted("later", on_80.clone());
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "TooManyRoutes")
        );
        assert!(
            message.contains("256 older routes") && message.contains("port 80"),
            "{message}"
        );
        let both = serde_json::json!({"group": "", "kind": "Service", "name": "web"});
        let (status, reason, message) = accepted("late", both);
        assert_eq!((status.as_str(), reason.as_str()), ("True", "Accepted"));
        assert!(
            message.contains("not served where") && message.contains("port 80:"),
            "{message}"
        );
        let (status, _, message) = accepted("r-000", on_80);
        assert_eq!(
            (status.as_str(), message.as_str()),
            ("True", "accepted by strait")
        );
    }

    /// Of two BackendPolicies on one Service, the one that does not apply
    /// says so rather than reading Accepted.
    #[test]
    fn the_backend_policy_that_does_not_apply_is_conflicted() {
        let policy = |name: &str| {
            format!(
                "apiVersion: policy.strait.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: web}}\n  connectTimeout: 1s\n"
            )
        };
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{ports: [{{port: 80}}]}}\n---\n{}---\n{}",
            policy("a"),
            policy("b")
        );
        let mut snap = Snapshot::empty("cluster.local");
        insert(&mut snap, &yaml);
        let accepted = |name: &str| {
            let v: Value = serde_norway::from_str(&policy(name)).unwrap();
            let s = StatusInput::of(Kind::BackendPolicy, &v, None);
            let want = desired(&s, &snap);
            let c = condition_in(&want["conditions"], "Accepted");
            (
                c["status"].as_str().unwrap().to_string(),
                c["reason"].as_str().unwrap().to_string(),
            )
        };
        assert_eq!(accepted("a"), ("True".to_string(), "Accepted".to_string()));
        assert_eq!(
            accepted("b"),
            ("False".to_string(), "Conflicted".to_string())
        );
    }

    /// A BackendPolicy on a headless Service is not taken for applied: its
    /// callers dial the pods, where no Service's policy applies. One whose
    /// opaquePorts name ports the Service lacks (its pods' own) says so.
    #[test]
    fn a_backend_policy_that_callers_never_use_says_so() {
        let policy = |target: &str, opaque: &str| {
            format!(
                "apiVersion: policy.strait.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: p-{target}, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: {target}}}\n  outlierDetection: {{consecutiveFailures: 5}}\n  opaquePorts: [{opaque}]\n"
            )
        };
        let mut snap = Snapshot::empty("cluster.local");
        insert(
            &mut snap,
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec: {clusterIP: None, ports: [{port: 5432}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {ports: [{port: 80, targetPort: 8080}]}\n",
        );
        let accepted_in = |snap: &Snapshot, yaml: String| {
            let v: Value = serde_norway::from_str(&yaml).unwrap();
            let want = desired(&StatusInput::of(Kind::BackendPolicy, &v, None), snap);
            let c = condition_in(&want["conditions"], "Accepted");
            (
                c["status"].as_str().unwrap().to_string(),
                c["reason"].as_str().unwrap().to_string(),
                c["message"].as_str().unwrap().to_string(),
            )
        };
        let (status, reason, message) = accepted_in(&snap, policy("db", "5432"));
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "UnsupportedValue")
        );
        assert!(message.contains("headless"), "{message}");
        let (status, _, message) = accepted_in(&snap, policy("api", "8080"));
        assert_eq!(status, "True");
        assert!(
            message.contains("opaquePorts 8080 are not ports of Service api (its ports: 80)"),
            "{message}"
        );
        let (_, _, message) = accepted_in(&snap, policy("api", "80"));
        assert_eq!(message, "accepted by strait");
        // A route on the headless Service itself is never served: no use.
        insert(
            &mut snap,
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: self-db, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: db}]\n  rules:\n  - backendRefs: [{name: db, port: 5432}]\n",
        );
        let (status, _, message) = accepted_in(&snap, policy("db", "5432"));
        assert_eq!(status, "False", "{message}");
        assert!(message.contains("none is served"), "{message}");
        // Once a route served elsewhere sends to it, the policy is used there.
        insert(
            &mut snap,
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-db, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: api}]\n  rules:\n  - backendRefs: [{name: db, port: 5432}]\n",
        );
        let (status, _, message) = accepted_in(&snap, policy("db", "5432"));
        assert_eq!(status, "True", "{message}");
        // Unless the port it is on is carried as TCP, where no route applies.
        insert(
            &mut snap,
            "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {ports: [{port: 80, targetPort: 8080, appProtocol: tcp}]}\n",
        );
        let (status, _, message) = accepted_in(&snap, policy("db", "5432"));
        assert_eq!(status, "False", "{message}");
    }

    /// A message quoting a long refused value is cut, so that the status
    /// that says the route is refused is one the API server takes.
    #[test]
    fn a_long_message_is_cut_to_what_a_status_takes() {
        let long = format!("spec.rules[0]: {:?} is not a regex", "é(".repeat(20_000));
        let c = condition("Accepted", false, "Invalid", &long, 3, &Value::Null);
        let m = c["message"].as_str().unwrap();
        assert!(m.len() <= MAX_MESSAGE_BYTES + 3, "{} bytes", m.len());
        assert!(m.starts_with("spec.rules[0]: \"é(") && m.ends_with('…'));
        let c = condition("Accepted", false, "Invalid", "short", 3, &Value::Null);
        assert_eq!(c["message"], "short");
    }

    /// Only core Services are strait's parents to report on: a `Service`
    /// kind of another API group belongs to whoever serves that group.
    #[test]
    fn a_service_parent_of_another_group_is_not_strait_s() {
        let route = serde_json::json!({
            "metadata": {"namespace": "shop", "name": "r"},
            "spec": {"parentRefs": [
                {"group": "", "kind": "Service", "name": "web"},
                {"group": "core", "kind": "Service", "name": "api"},
                {"group": "mesh.example.io", "kind": "Service", "name": "theirs"},
                {"kind": "Service", "name": "no-group"},
                {"group": "gateway.networking.k8s.io", "kind": "Service", "name": "defaulted"},
                {"name": "a-gateway"}
            ]}
        });
        let s = StatusInput::of(Kind::HttpRoute, &route, None);
        // Those refused for their group are reported, to say so.
        assert_eq!(s.targets, ["web", "api", "no-group", "defaulted"]);
    }
}
