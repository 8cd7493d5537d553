//! Routes: the HTTPRoute rules discovery sent for a Service, typed once, and the
//! choice of the rule a request takes (Gateway API match precedence).

pub mod filters;
pub mod matches;

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use strait_api::v1 as api;

pub use self::filters::Filters;
pub use self::matches::{PathMatch, RouteMatch};
use crate::retry::RetryConfig;

/// Why discovery's description of a route was not usable.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ViewError {
    field: String,
    reason: String,
}

impl ViewError {
    pub fn new(field: &str, reason: impl Into<String>) -> Self {
        ViewError {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// The route label of requests no HTTPRoute describes.
pub const DEFAULT_ROUTE: &str = "default";

/// One rule of an HTTPRoute (or the default route), as a request sees it.
#[derive(Clone, Debug)]
pub struct Rule {
    /// "namespace/name" of the HTTPRoute, or `DEFAULT_ROUTE`.
    pub route: Arc<str>,
    /// The rule's name, or its index.
    pub rule: Arc<str>,
    pub matches: Vec<RouteMatch>,
    /// Backend names (of `ServiceView::backends`) and weights.
    pub backends: Vec<(Arc<str>, u32)>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Arc<RetryConfig>,
    pub filters: Filters,
}

fn timeout(d: Option<prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .map(|d| d.min(crate::defaults::MAX_DURATION_FLAG))
}

impl Rule {
    /// Every request to `backend`, with no policy but connection retries.
    pub fn default_for(backend: Arc<str>) -> Self {
        Rule {
            route: DEFAULT_ROUTE.into(),
            rule: "0".into(),
            matches: vec![RouteMatch::default()],
            backends: vec![(backend, 1)],
            request_timeout: None,
            backend_timeout: None,
            retry: Arc::new(RetryConfig::connect_only()),
            filters: Filters::default(),
        }
    }

    fn parse(route: &Arc<str>, index: usize, r: api::HttpRouteRule) -> Result<Self, ViewError> {
        let matches = if r.matches.is_empty() {
            vec![RouteMatch::default()]
        } else {
            r.matches
                .into_iter()
                .map(RouteMatch::parse)
                .collect::<Result<_, _>>()?
        };
        Ok(Rule {
            route: route.clone(),
            rule: if r.name.is_empty() {
                index.to_string().into()
            } else {
                r.name.into()
            },
            matches,
            backends: r
                .backends
                .into_iter()
                .map(|b| (Arc::from(b.backend), b.weight))
                .collect(),
            request_timeout: timeout(r.request_timeout),
            backend_timeout: timeout(r.backend_request_timeout),
            retry: Arc::new(RetryConfig::parse(r.retry)),
            filters: Filters::parse(r.filters)?,
        })
    }
}

/// The rules of every route, in the controller's order; a rule that does not
/// parse refuses them all (the controller validates routes: this is a proxy
/// not trusting the wire).
pub fn parse(routes: Vec<api::HttpRoute>) -> Result<Vec<Rule>, String> {
    let mut out = Vec::new();
    for r in routes {
        let name: Arc<str> = r.name.into();
        for (i, rule) in r.rules.into_iter().enumerate() {
            out.push(Rule::parse(&name, i, rule).map_err(|e| format!("route {name}: {e}"))?);
        }
    }
    Ok(out)
}

/// Which rule each match leads to, most specific match first.
#[derive(Debug)]
pub struct Table {
    order: Vec<(RouteMatch, usize)>,
}

impl Table {
    pub fn new(rules: &[Rule]) -> Self {
        let mut order: Vec<(RouteMatch, usize)> = rules
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.matches.iter().map(move |m| (m.clone(), i)))
            .collect();
        // Stable: equal matches keep the order of their routes and rules.
        order.sort_by(|a, b| a.0.precedence(&b.0));
        Table { order }
    }

    /// The rule a request takes and the match that chose it.
    pub fn select<B>(&self, req: &Request<B>) -> Option<(usize, &RouteMatch)> {
        self.order
            .iter()
            .find(|(m, _)| m.is_match(req))
            .map(|(m, i)| (*i, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, rules: Vec<api::HttpRouteRule>) -> api::HttpRoute {
        api::HttpRoute {
            name: name.into(),
            rules,
        }
    }

    fn to(backend: &str, matches: Vec<api::HttpMatch>) -> api::HttpRouteRule {
        api::HttpRouteRule {
            matches,
            backends: vec![api::WeightedBackend {
                backend: backend.into(),
                weight: 1,
            }],
            ..Default::default()
        }
    }

    fn header(name: &str, value: &str) -> api::HttpMatch {
        api::HttpMatch {
            headers: vec![api::HeaderMatch {
                name: name.into(),
                value: Some(api::header_match::Value::Exact(value.into())),
            }],
            ..Default::default()
        }
    }

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn a_header_match_wins_over_a_catch_all_declared_first() {
        let rules = parse(vec![route(
            "ns/web",
            vec![to("v1", vec![]), to("v2", vec![header("x-canary", "true")])],
        )])
        .unwrap();
        let t = Table::new(&rules);
        let pick = |h: &[(&str, &str)]| &*rules[t.select(&req(h)).unwrap().0].backends[0].0;
        assert_eq!(pick(&[("x-canary", "true")]), "v2");
        assert_eq!(pick(&[("x-canary", "false")]), "v1");
        assert_eq!(pick(&[]), "v1");
    }

    /// Half a Service's routes would send what the other half describes
    /// along the default route, whatever its weights and timeouts said.
    #[test]
    fn a_route_that_does_not_parse_refuses_them_all() {
        let bad = api::HttpMatch {
            path: Some(api::http_match::Path::Regex("(".into())),
            ..Default::default()
        };
        let e = parse(vec![
            route("ns/bad", vec![to("v1", vec![]), to("v2", vec![bad])]),
            route("ns/good", vec![to("v3", vec![])]),
        ])
        .unwrap_err();
        assert!(e.starts_with("route ns/bad: "), "{e}");
    }

    /// GRPCRoute: the match naming a service goes before the one naming a
    /// method only, though the first is a path prefix and the second a
    /// pattern; and a service and method before either.
    #[test]
    fn grpc_matches_rank_by_service_then_method() {
        use api::http_match::Path;
        let grpc = |path: Path, service_chars: u32, method_chars: u32| api::HttpMatch {
            path: Some(path),
            grpc_rank: Some(api::GrpcRank {
                service_chars,
                method_chars,
            }),
            ..Default::default()
        };
        let mut rules = vec![
            to(
                "any-get",
                vec![grpc(Path::Regex("/[^/]+/Get".into()), 0, 3)],
            ),
            to("cart", vec![grpc(Path::Prefix("/shop.Cart".into()), 9, 0)]),
        ];
        let pick = |rules: &[api::HttpRouteRule], path: &str| {
            let rules = parse(vec![route("ns/cart", rules.to_vec())]).unwrap();
            let t = Table::new(&rules);
            let req = Request::post(path).body(()).unwrap();
            rules[t.select(&req).unwrap().0].backends[0].0.to_string()
        };
        assert_eq!(pick(&rules, "/shop.Cart/Get"), "cart");
        assert_eq!(pick(&rules, "/shop.Other/Get"), "any-get");
        rules.push(to(
            "cart-get",
            vec![grpc(Path::Exact("/shop.Cart/Get".into()), 9, 3)],
        ));
        assert_eq!(pick(&rules, "/shop.Cart/Get"), "cart-get");
        assert_eq!(pick(&rules, "/shop.Cart/Put"), "cart");
    }

    #[test]
    fn no_match_means_no_rule() {
        let rules = parse(vec![route(
            "ns/web",
            vec![to("v2", vec![header("x-canary", "true")])],
        )])
        .unwrap();
        assert!(Table::new(&rules).select(&req(&[])).is_none());
    }
}
