//! GRPCRoute rules in the form the proxies follow for HTTP: a gRPC call is a
//! POST to `/package.Service/Method`, so a method match is a path match, and
//! the rest (headers, filters, backends) is an HTTPRoute rule's.
//!
//! Precedence is GRPCRoute's, not the path form's: each match carries the
//! characters of the service and of the method it names (`GrpcRank`), which
//! the proxies rank before header matches.

use serde::Deserialize;
use strait_api::v1 as api;

use super::Rule;
use super::filters::FilterDoc;
use super::matches::{ValueMatchDoc, full_match_regex, header_matches, unsupported};
use super::parse::{BackendRefDoc, grpc_codes_retry, rule_matches, rule_parts};
use crate::index::ObjKey;
use crate::spec::SpecError;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GrpcRuleDoc {
    name: Option<String>,
    #[serde(default)]
    matches: Vec<GrpcMatchDoc>,
    #[serde(default)]
    filters: Vec<FilterDoc>,
    #[serde(default)]
    backend_refs: Vec<BackendRefDoc>,
    session_persistence: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct GrpcMatchDoc {
    method: Option<MethodDoc>,
    #[serde(default)]
    headers: Vec<ValueMatchDoc>,
}

#[derive(Deserialize)]
struct MethodDoc {
    #[serde(rename = "type")]
    kind: Option<String>,
    service: Option<String>,
    method: Option<String>,
}

/// The filters Gateway API defines for GRPCRoute that strait applies.
const FILTERS: [&str; 2] = ["RequestHeaderModifier", "ResponseHeaderModifier"];

/// One GRPCRoute rule. GRPCRoute has no timeouts or retry of its own: the
/// route's `retry.strait.dev/grpc-codes` annotation retries its calls.
pub(super) fn rule(
    route: &ObjKey,
    at: &str,
    r: &GrpcRuleDoc,
    grpc: Option<&[u32]>,
) -> Result<Rule, SpecError> {
    super::parse::refuse_session_persistence(at, &r.session_persistence)?;
    let mut matches = rule_matches(at, &r.matches, grpc_match)?;
    // A rule without matches takes every call: said as a match that names
    // nothing, so that it ranks among the route's others as GRPCRoute ranks
    // it (by its place, among those that name nothing), not after them all.
    if matches.is_empty() {
        matches.push(api::HttpMatch {
            grpc_rank: Some(rank(None)),
            ..Default::default()
        });
    }
    if let Some((i, f)) = (r.filters.iter().enumerate()).find(|(_, f)| !FILTERS.contains(&&*f.kind))
    {
        return Err(SpecError::new(
            format!("{at}.filters[{i}].type"),
            format!(
                "{:?} is not a GRPCRoute filter strait applies ({})",
                f.kind,
                FILTERS.join(", ")
            ),
        ));
    }
    let mut rule = rule_parts(
        route,
        at,
        r.name.as_ref(),
        matches,
        &r.filters,
        &r.backend_refs,
    )?;
    rule.retry = grpc.map(grpc_codes_retry);
    Ok(rule)
}

fn grpc_match(at: &str, m: &GrpcMatchDoc) -> Result<api::HttpMatch, SpecError> {
    Ok(api::HttpMatch {
        path: m
            .method
            .as_ref()
            .map(|x| method_path(&format!("{at}.method"), x))
            .transpose()?,
        method: String::new(),
        headers: header_matches(at, &m.headers)?,
        query_params: Vec::new(),
        grpc_rank: Some(rank(m.method.as_ref())),
    })
}

/// Gateway API ranks GRPCRoute matches by the characters of the service they
/// match, then of the method. A name counts as written (a leading dot, not in
/// the call's path, does not), and so does a pattern, as an HTTPRoute's
/// prefix counts as written.
fn rank(m: Option<&MethodDoc>) -> api::GrpcRank {
    let chars = |v: Option<&str>| {
        let v = v.unwrap_or_default();
        let v = match m.and_then(|m| m.kind.as_deref()) {
            Some("RegularExpression") => v,
            _ => v.strip_prefix('.').unwrap_or(v),
        };
        u32::try_from(v.chars().count()).unwrap_or(u32::MAX)
    };
    api::GrpcRank {
        service_chars: chars(m.and_then(|m| m.service.as_deref())),
        method_chars: chars(m.and_then(|m| m.method.as_deref())),
    }
}

/// A method match as the path it matches.
fn method_path(at: &str, m: &MethodDoc) -> Result<api::http_match::Path, SpecError> {
    use api::http_match::Path;
    for (field, v) in [("service", &m.service), ("method", &m.method)] {
        if v.as_deref() == Some("") {
            return Err(SpecError::new(
                format!("{at}.{field}"),
                "empty (leave it out to match any)",
            ));
        }
    }
    let (service, method) = (m.service.as_deref(), m.method.as_deref());
    let neither = || {
        SpecError::new(
            at,
            "names neither a service nor a method (give one or both)",
        )
    };
    if service.is_none() && method.is_none() {
        return Err(neither());
    }
    match m.kind.as_deref().unwrap_or("Exact") {
        "Exact" => {
            if let Some(s) = service
                && !service_name(s)
            {
                return Err(SpecError::new(
                    format!("{at}.service"),
                    format!("{s:?} is not a gRPC service name (such as \"shop.v1.Cart\")"),
                ));
            }
            if let Some(x) = method
                && !method_name(x)
            {
                return Err(SpecError::new(
                    format!("{at}.method"),
                    format!("{x:?} is not a gRPC method name (such as \"AddItem\")"),
                ));
            }
            // A fully qualified name's leading dot is not in the call's path.
            let service = service.map(|s| s.strip_prefix('.').unwrap_or(s));
            Ok(match (service, method) {
                (Some(s), Some(x)) => Path::Exact(format!("/{s}/{x}")),
                (Some(s), None) => Path::Prefix(format!("/{s}")),
                // A method name is letters, digits and `_`: nothing a
                // pattern gives a meaning to.
                (None, Some(x)) => Path::Regex(format!("/[^/]+/{x}")),
                (None, None) => return Err(neither()),
            })
        }
        "RegularExpression" => {
            let part = |field: &str, v: Option<&str>| match v {
                Some(v) => name_pattern(&format!("{at}.{field}"), v),
                None => Ok("[^/]+".to_string()),
            };
            let pattern = format!("/{}/{}", part("service", service)?, part("method", method)?);
            Ok(Path::Regex(full_match_regex(at, &pattern)?))
        }
        other => Err(unsupported(&format!("{at}.type"), other)),
    }
}

/// A service's or method's pattern as a group of the path's. It matches the
/// whole name, so a `^` that starts it and a `$` that ends it are dropped;
/// any other anchor could never match inside the path, and is refused
/// rather than leave a rule that matches nothing.
fn name_pattern(field: &str, pattern: &str) -> Result<String, SpecError> {
    use regex_syntax::hir::Look;
    full_match_regex(field, pattern)?;
    let trimmed = pattern.strip_prefix('^').unwrap_or(pattern);
    let trimmed = trimmed.strip_suffix('$').unwrap_or(trimmed);
    // Unless dropping them broke it (`a\\$` ends with a literal `$`).
    let parsed = |p: &str| regex_syntax::Parser::new().parse(p).ok();
    let (p, hir) = match parsed(trimmed) {
        Some(hir) => (trimmed, hir),
        None => (
            pattern,
            parsed(pattern).ok_or_else(|| SpecError::new(field, "not a regular expression"))?,
        ),
    };
    let looks = hir.properties().look_set();
    let anchors = [
        Look::Start,
        Look::End,
        Look::StartLF,
        Look::EndLF,
        Look::StartCRLF,
        Look::EndCRLF,
    ];
    if anchors.into_iter().any(|a| looks.contains(a)) {
        return Err(SpecError::new(
            field,
            format!(
                "{pattern:?} anchors inside the name (^ or $ but at its start and end): it would match no call"
            ),
        ));
    }
    Ok(format!("(?:{p})"))
}

/// Gateway API's pattern for a service: dot-separated identifiers, with an
/// optional leading dot.
fn service_name(s: &str) -> bool {
    let s = s.strip_prefix('.').unwrap_or(s);
    s.len() <= 1024 && s.split('.').all(identifier)
}

fn method_name(s: &str) -> bool {
    s.len() <= 1024 && identifier(s)
}

fn identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use strait_api::v1 as api;

    use crate::routes::parse_grpc;

    fn route(matches: Value, filters: Value) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": "cart", "namespace": "shop",
                         "annotations": {"retry.strait.dev/grpc-codes": "unavailable"}},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "cart", "port": 50051}],
                "rules": [{
                    "matches": matches,
                    "filters": filters,
                    "backendRefs": [{"name": "cart-v2", "port": 50051, "weight": 10}]
                }]
            }
        })
    }

    fn path_of(method: Value) -> Option<api::http_match::Path> {
        let (_, spec) = parse_grpc(&route(json!([{"method": method}]), json!([])))
            .unwrap()
            .unwrap();
        spec.rules[0].matches[0].path.clone()
    }

    fn refused(matches: Value, filters: Value) -> (String, String) {
        let e = parse_grpc(&route(matches, filters)).unwrap_err();
        (e.field, e.reason)
    }

    /// GRPCRoute ranks by the service named, then the method: a service
    /// alone goes before a method alone, whatever their paths' forms.
    #[test]
    fn a_match_carries_the_characters_of_its_service_and_method() {
        let rank = |m: Value| {
            let (_, spec) = parse_grpc(&route(json!([m]), json!([]))).unwrap().unwrap();
            let r = spec.rules[0].matches[0].grpc_rank.unwrap();
            (r.service_chars, r.method_chars)
        };
        let method = |m: Value| json!({"method": m});
        assert_eq!(
            rank(method(json!({"service": ".shop.Cart", "method": "Get"}))),
            (9, 3)
        );
        assert_eq!(rank(method(json!({"service": "shop.Cart"}))), (9, 0));
        assert_eq!(rank(method(json!({"method": "Get"}))), (0, 3));
        assert_eq!(
            rank(method(
                json!({"type": "RegularExpression", "service": "shop\\..*"})
            )),
            (8, 0)
        );
        // No method match: any call, ranked last but for its headers.
        assert_eq!(
            rank(json!({"headers": [{"name": "x-v", "value": "2"}]})),
            (0, 0)
        );
        // No match at all: the same, not a match of another kind.
        let (_, spec) = parse_grpc(&route(json!([]), json!([]))).unwrap().unwrap();
        let m = &spec.rules[0].matches;
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].path.clone(), m[0].grpc_rank),
            (None, Some(api::GrpcRank::default()))
        );
    }

    /// As HTTPRoute's: session persistence is refused.
    #[test]
    fn session_persistence_is_refused() {
        let mut v = route(json!([]), json!([]));
        v["spec"]["rules"][0]["sessionPersistence"] = json!({"type": "Header", "sessionName": "s"});
        let e = parse_grpc(&v).unwrap_err();
        assert_eq!(e.field, "spec.rules[0].sessionPersistence");
    }

    /// As HTTPRoute's: strait's own fields are set after matching.
    #[test]
    fn a_match_on_strait_s_own_fields_is_refused() {
        let (field, _) = refused(
            json!([{"headers": [{"name": "strait-client-id", "value": "x"}]}]),
            json!([]),
        );
        assert_eq!(field, "spec.rules[0].matches[0].headers[0].name");
    }

    #[test]
    fn a_method_match_is_the_path_of_the_call() {
        use api::http_match::Path;
        let path = |m| path_of(m).unwrap();
        assert_eq!(
            path(json!({"service": "shop.v1.Cart", "method": "AddItem"})),
            Path::Exact("/shop.v1.Cart/AddItem".into())
        );
        assert_eq!(
            path(json!({"type": "Exact", "service": "shop.v1.Cart"})),
            Path::Prefix("/shop.v1.Cart".into())
        );
        assert_eq!(
            path(json!({"method": "AddItem"})),
            Path::Regex("/[^/]+/AddItem".into())
        );
        assert_eq!(
            path(json!({"type": "RegularExpression", "service": "shop\\.v[12]\\.Cart"})),
            Path::Regex("/(?:shop\\.v[12]\\.Cart)/[^/]+".into())
        );
        // Anchors at the ends of a name are where it ends anyway.
        assert_eq!(
            path(json!({"type": "RegularExpression", "service": "^shop\\..*$", "method": "^Add"})),
            Path::Regex("/(?:shop\\..*)/(?:Add)".into())
        );
        // A fully qualified service's leading dot is not in the path.
        assert_eq!(
            path(json!({"service": ".shop.v1.Cart", "method": "AddItem"})),
            Path::Exact("/shop.v1.Cart/AddItem".into())
        );
        // The path regex a proxy compiles matches what the rule means.
        let Path::Regex(r) = path(json!({"type": "RegularExpression", "method": "Add.*"})) else {
            panic!()
        };
        let r = regex::Regex::new(&format!("^(?:{r})$")).unwrap();
        assert!(r.is_match("/shop.v1.Cart/AddItem"));
        assert!(!r.is_match("/shop.v1.Cart/RemoveItem"));
    }

    #[test]
    fn a_rule_keeps_its_headers_backends_filters_and_the_route_s_grpc_retry() {
        let (key, spec) = parse_grpc(&route(
            json!([{"method": {"service": "shop.v1.Cart"},
                    "headers": [{"name": "x-tenant", "value": "a"},
                                {"type": "RegularExpression", "name": "x-user", "value": "b.*"}]}]),
            json!([{"type": "RequestHeaderModifier",
                    "requestHeaderModifier": {"set": [{"name": "x-via", "value": "mesh"}]}}]),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(key.to_string(), "shop/cart");
        let rule = &spec.rules[0];
        assert_eq!(rule.matches[0].headers.len(), 2);
        assert_eq!(rule.filters.len(), 1);
        assert_eq!(rule.backends[0].service.name, "cart-v2");
        assert_eq!(
            (rule.backends[0].port, rule.backends[0].weight),
            (Some(50051), 10)
        );
        let retry = rule.retry.as_ref().expect("the annotation's retry");
        assert_eq!(retry.grpc_codes, vec![14]);
        assert!(retry.codes.is_empty());
    }

    #[test]
    fn what_a_grpc_route_cannot_say_is_refused_by_field() {
        let at = "spec.rules[0]";
        let cases = [
            (
                json!([{"method": {"type": "Exact"}}]),
                json!([]),
                format!("{at}.matches[0].method"),
            ),
            (
                json!([{"method": {"service": "shop/Cart"}}]),
                json!([]),
                format!("{at}.matches[0].method.service"),
            ),
            (
                json!([{"method": {"method": "Add.Item"}}]),
                json!([]),
                format!("{at}.matches[0].method.method"),
            ),
            (
                json!([{"method": {"type": "RegularExpression", "method": "(a"}}]),
                json!([]),
                format!("{at}.matches[0].method.method"),
            ),
            (
                json!([{"method": {"type": "RegularExpression", "service": "a|^b"}}]),
                json!([]),
                format!("{at}.matches[0].method.service"),
            ),
            (
                json!([{"method": {"service": "", "method": "Add"}}]),
                json!([]),
                format!("{at}.matches[0].method.service"),
            ),
            (
                json!([{"method": {"type": "Prefix", "service": "a"}}]),
                json!([]),
                format!("{at}.matches[0].method.type"),
            ),
            (
                json!([{"headers": [{"name": "bad name", "value": "a"}]}]),
                json!([]),
                format!("{at}.matches[0].headers[0].name"),
            ),
            (
                json!([]),
                json!([{"type": "URLRewrite", "urlRewrite": {"hostname": "a"}}]),
                format!("{at}.filters[0].type"),
            ),
        ];
        for (matches, filters, field) in cases {
            let (got, why) = refused(matches.clone(), filters);
            assert_eq!(got, field, "{matches}: {why}");
        }
    }

    #[test]
    fn a_route_of_gateways_only_is_not_strait_s() {
        let mut v = route(json!([]), json!([]));
        v["spec"]["parentRefs"] = json!([{"name": "gw"}]);
        assert!(parse_grpc(&v).unwrap().is_none());
    }
}
