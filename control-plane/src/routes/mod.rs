//! Gateway API HTTPRoutes and GRPCRoutes attached to Services (GAMMA:
//! `parentRefs` of kind Service): their validated index form, and what the
//! proxies are sent of them. A GRPCRoute is served as an HTTP route: a gRPC
//! method is the path `/package.Service/Method`.

mod filters;
mod grpc;
mod matches;
mod parse;

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use strait_api::v1 as api;

pub(crate) use parse::{core_group, service_parent};
pub use parse::{parse, parse_grpc};

use crate::index::view::service_name;
use crate::index::{ObjKey, ServiceInfo, ServicePort};
use crate::spec::{SpecError, proto_duration};

/// Which of Gateway API's route kinds an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
}

/// A route in the index: an HTTPRoute and a GRPCRoute may share a name.
/// Ordered by namespace/name first, as Gateway API orders routes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId {
    pub key: ObjKey,
    pub kind: RouteKind,
}

impl RouteId {
    pub fn http(key: ObjKey) -> Self {
        RouteId {
            key,
            kind: RouteKind::Http,
        }
    }

    pub fn grpc(key: ObjKey) -> Self {
        RouteId {
            key,
            kind: RouteKind::Grpc,
        }
    }
}

impl std::fmt::Display for RouteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            RouteKind::Http => write!(f, "HTTPRoute {}", self.key),
            RouteKind::Grpc => write!(f, "GRPCRoute {}", self.key),
        }
    }
}

/// One HTTPRoute or GRPCRoute, as strait serves it.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteSpec {
    /// `metadata.creationTimestamp`: the older of two routes wins ties.
    pub created: Option<Time>,
    /// Only the Services among its parents.
    pub parents: Vec<ParentRef>,
    pub rules: Vec<Rule>,
}

/// A Service the route is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    pub service: ObjKey,
    /// Only this Service port, when given.
    pub port: Option<u16>,
    /// Only the Service port of this name, when given.
    pub section_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: Option<String>,
    /// Validated (regular expressions compile as the proxies compile them).
    pub matches: Vec<api::HttpMatch>,
    pub filters: Vec<api::HttpFilter>,
    pub backends: Vec<BackendRef>,
    /// `None`: no timeout (absent, or "0s").
    pub request_timeout: Option<Duration>,
    pub backend_request_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    pub service: ObjKey,
    /// `None`: the port of the parent Service the request came to.
    pub port: Option<u16>,
    pub weight: u32,
    /// Why it resolves to nothing: its share of requests is answered 500,
    /// as Gateway API asks, rather than the whole route refused.
    pub unresolvable: Option<Unresolvable>,
}

/// Why a backend in another namespace is not sent to.
pub const OTHER_NAMESPACE: &str = "a backend in another namespace needs that namespace's consent (a ReferenceGrant), which strait does not read";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unresolvable {
    /// A kind strait cannot send to (`group/Kind`, e.g. a ServiceImport):
    /// `InvalidKind`.
    Kind(String),
    /// A Service in another namespace, whose consent (a ReferenceGrant)
    /// strait does not read: `RefNotPermitted`.
    OtherNamespace,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    pub attempts: u32,
    pub codes: Vec<u32>,
    pub backoff: Option<Duration>,
    /// From the route's `retry.strait.dev/grpc-codes` annotation.
    pub grpc_codes: Vec<u32>,
}

impl ParentRef {
    fn attaches(&self, svc: &ObjKey, port: &ServicePort) -> bool {
        self.service == *svc
            && self.port.is_none_or(|p| p == port.port)
            && self
                .section_name
                .as_ref()
                .is_none_or(|n| port.name.as_ref() == Some(n))
    }
}

impl BackendRef {
    /// The Service and port this sends to, for a request to `parent_port`.
    pub fn target(&self, parent_port: u16) -> (&ObjKey, u16) {
        (&self.service, self.port.unwrap_or(parent_port))
    }
}

impl RouteSpec {
    pub fn attaches_to(&self, svc: &ObjKey, port: &ServicePort) -> bool {
        self.parents.iter().any(|p| p.attaches(svc, port))
    }

    /// The Services every parent refers to, for the index's reverse lookup.
    pub fn parent_services(&self) -> impl Iterator<Item = &ObjKey> {
        self.parents.iter().map(|p| &p.service)
    }

    /// backendRefs naming a Service that `service` does not know, or a port that
    /// Service does not have: a route that would send traffic nowhere.
    pub fn unresolved<'a>(
        &self,
        service: impl Fn(&ObjKey) -> Option<&'a ServiceInfo>,
    ) -> Vec<SpecError> {
        let mut out = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            for (j, b) in rule.backends.iter().enumerate() {
                let at = format!("spec.rules[{i}].backendRefs[{j}]");
                match &b.unresolvable {
                    Some(Unresolvable::Kind(kind)) => {
                        out.push(SpecError::new(
                            format!("{at}.kind"),
                            format!("{kind} is not a kind strait sends to (only Services)"),
                        ));
                        continue;
                    }
                    Some(Unresolvable::OtherNamespace) => {
                        out.push(SpecError::new(
                            format!("{at}.namespace"),
                            format!(
                                "{:?} is not the route's namespace: {OTHER_NAMESPACE}",
                                b.service.namespace
                            ),
                        ));
                        continue;
                    }
                    None => {}
                }
                match service(&b.service) {
                    None => out.push(SpecError::new(
                        format!("{at}.name"),
                        format!("Service {} does not exist (unknown backend)", b.service),
                    )),
                    Some(info) => {
                        if let Some(p) = b.port
                            && !info.ports.iter().any(|sp| sp.port == p)
                        {
                            out.push(SpecError::new(
                                format!("{at}.port"),
                                format!("Service {} has no port {p}", b.service),
                            ));
                        }
                    }
                }
            }
        }
        out
    }

    /// As sent to proxies of `parent_port`: backendRefs without a port go there.
    pub fn to_api(&self, key: &ObjKey, parent_port: u16) -> api::HttpRoute {
        api::HttpRoute {
            name: key.to_string(),
            rules: self
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let mut rule = r.to_api(i, parent_port);
                    // An unnamed rule goes by its index: by `_1` should
                    // another be named `1` (names cannot start so), so the
                    // two share no metrics and no retry budget.
                    if r.name.is_none()
                        && self
                            .rules
                            .iter()
                            .any(|o| o.name.as_deref() == Some(&rule.name))
                    {
                        rule.name = format!("_{i}");
                    }
                    rule
                })
                .collect(),
        }
    }
}

impl Rule {
    fn to_api(&self, index: usize, parent_port: u16) -> api::HttpRouteRule {
        let mut backends: Vec<api::WeightedBackend> = Vec::new();
        for b in &self.backends {
            let (svc, port) = b.target(parent_port);
            // Named as no backend is (a Service's name has no `/`), so that
            // its share finds none: 500.
            let name = match &b.unresolvable {
                Some(Unresolvable::Kind(kind)) => format!("{kind}/{svc}"),
                Some(Unresolvable::OtherNamespace) => format!("ReferenceGrant/{svc}"),
                None => service_name(svc, port),
            };
            // Two refs to one backend are one backend with both weights.
            match backends.iter_mut().find(|w| w.backend == name) {
                Some(w) => w.weight = w.weight.saturating_add(b.weight),
                None => backends.push(api::WeightedBackend {
                    backend: name,
                    weight: b.weight,
                }),
            }
        }
        api::HttpRouteRule {
            matches: self.matches.clone(),
            backends,
            request_timeout: self.request_timeout.map(proto_duration),
            backend_request_timeout: self.backend_request_timeout.map(proto_duration),
            retry: self.retry.as_ref().map(|r| api::RetryPolicy {
                attempts: r.attempts,
                codes: r.codes.clone(),
                backoff: r.backoff.map(proto_duration),
                grpc_codes: r.grpc_codes.clone(),
            }),
            filters: self.filters.clone(),
            name: self.name.clone().unwrap_or_else(|| index.to_string()),
        }
    }
}
