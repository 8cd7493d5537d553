//! HTTPRoute and GRPCRoute objects (`gateway.networking.k8s.io`) into their
//! index form. Only routes with a Service among their parents are strait's; all
//! they say is validated here, so a proxy never gets a rule it cannot follow.
//! Fields strait does not read are ignored, as Gateway API keeps adding some.

use std::collections::HashSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use strait_api::v1 as api;

use super::filters::{FilterDoc, filters};
use super::grpc::GrpcRuleDoc;
use super::matches::{MatchDoc, http_match};
use super::{BackendRef, ParentRef, Retry, RouteSpec, Rule, Unresolvable};
use crate::defaults;
use crate::index::ObjKey;
use crate::spec::{self, SpecError, dns_label};

/// A route of either kind: `R` is its kind's rule.
#[derive(Deserialize)]
struct Doc<R> {
    metadata: ObjectMeta,
    #[serde(default = "SpecDoc::empty")]
    spec: SpecDoc<R>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecDoc<R> {
    #[serde(default)]
    parent_refs: Vec<ParentRefDoc>,
    #[serde(default = "Vec::new")]
    rules: Vec<R>,
}

impl<R> SpecDoc<R> {
    fn empty() -> Self {
        SpecDoc {
            parent_refs: Vec::new(),
            rules: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ParentRefDoc {
    group: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: String,
    section_name: Option<String>,
    port: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleDoc {
    name: Option<String>,
    #[serde(default)]
    matches: Vec<MatchDoc>,
    #[serde(default)]
    filters: Vec<FilterDoc>,
    #[serde(default)]
    backend_refs: Vec<BackendRefDoc>,
    timeouts: Option<TimeoutsDoc>,
    retry: Option<RetryDoc>,
    session_persistence: Option<serde::de::IgnoredAny>,
}

/// Session persistence (experimental, kept where its channel's CRDs are
/// installed) asks every request of a session to go to one endpoint; the
/// proxies balance each request, so a route asking it is refused rather
/// than accepted and balanced anyway (logins failing now and then).
pub(super) fn refuse_session_persistence(
    at: &str,
    asked: &Option<serde::de::IgnoredAny>,
) -> Result<(), SpecError> {
    match asked {
        Some(_) => Err(SpecError::new(
            format!("{at}.sessionPersistence"),
            "session persistence is not supported (each request is balanced on its own)",
        )),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
pub(super) struct BackendRefDoc {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i64>,
    weight: Option<i64>,
    #[serde(default)]
    filters: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimeoutsDoc {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Deserialize)]
struct RetryDoc {
    #[serde(default)]
    codes: Vec<i64>,
    attempts: Option<i64>,
    backoff: Option<String>,
}

/// gRPC status names by code (`canceled` is accepted too).
const GRPC_CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

/// Parses and validates one HTTPRoute. `None`: none of its parents is a Service,
/// so it is another implementation's (a Gateway's) and not read further.
pub fn parse(v: &serde_json::Value) -> Result<Option<(ObjKey, RouteSpec)>, SpecError> {
    // The CRD defaults absent rules to one that matches every path and names
    // no backend (so answers 500): on the API server a route without rules
    // holds its Service's traffic, and from manifests it must too, rather
    // than leave it to the Service as if no route were attached.
    // (A `spec` that is no mapping is left to fail as it reads.)
    if v.get("spec")
        .and_then(serde_json::Value::as_object)
        .is_some_and(|s| !s.contains_key("rules"))
    {
        let mut v = v.clone();
        // A mapping, as just checked: indexing into it cannot panic.
        v["spec"]["rules"] =
            serde_json::json!([{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]);
        return parse_kind::<RuleDoc>(&v, rule);
    }
    parse_kind::<RuleDoc>(v, rule)
}

/// As `parse`, for a GRPCRoute.
pub fn parse_grpc(v: &serde_json::Value) -> Result<Option<(ObjKey, RouteSpec)>, SpecError> {
    parse_kind::<GrpcRuleDoc>(v, super::grpc::rule)
}

/// The matches of `rules` that are regular expressions (path, header, query
/// parameter, gRPC method), of either route kind; a GRPCRoute's match of a
/// method alone is one too, as proxies match it.
fn regexes_in(rules: &serde_json::Value) -> usize {
    fn count(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Object(m) => {
                fn kind(o: &serde_json::Map<String, serde_json::Value>) -> Option<&str> {
                    o.get("type").and_then(serde_json::Value::as_str)
                }
                let method_alone = match m.get("method") {
                    Some(serde_json::Value::Object(g)) => {
                        g.get("service").is_none_or(serde_json::Value::is_null)
                            && g.get("method").is_some_and(|m| !m.is_null())
                            && kind(g).is_none_or(|t| t == "Exact")
                    }
                    _ => false,
                };
                usize::from(kind(m) == Some("RegularExpression"))
                    + usize::from(method_alone)
                    + m.values().map(count).sum::<usize>()
            }
            serde_json::Value::Array(a) => a.iter().map(count).sum(),
            _ => 0,
        }
    }
    rules
        .as_array()
        .map_or(0, |rules| rules.iter().map(|r| count(&r["matches"])).sum())
}

/// A route's rule of kind `R`: the route, the rule's field path, the rule,
/// and the gRPC codes its route's annotation retries.
type RuleFn<R> = fn(&ObjKey, &str, &R, Option<&[u32]>) -> Result<Rule, SpecError>;

fn parse_kind<R: serde::de::DeserializeOwned>(
    v: &serde_json::Value,
    rule: RuleFn<R>,
) -> Result<Option<(ObjKey, RouteSpec)>, SpecError> {
    let doc: Doc<R> = serde_path_to_error::deserialize(v).map_err(SpecError::from_serde)?;
    let key = spec::key(&doc.metadata)?;
    SpecError::at_most(
        "spec.parentRefs",
        doc.spec.parent_refs.len(),
        defaults::MAX_ROUTE_PARENTS,
    )?;
    SpecError::at_most(
        "spec.rules",
        doc.spec.rules.len(),
        defaults::MAX_ROUTE_RULES,
    )?;
    let parents = parents(&key, &doc.spec.parent_refs)?;
    if parents.is_empty() {
        return Ok(None);
    }
    // Each regular expression may take milliseconds to compile, here and in
    // every client proxy: a route of thousands would stall them all.
    let regexes = regexes_in(&v["spec"]["rules"]);
    if regexes > defaults::MAX_ROUTE_REGEXES {
        return Err(SpecError::new(
            "spec.rules",
            format!(
                "{regexes} regular expressions, more than the limit of {} in one route",
                defaults::MAX_ROUTE_REGEXES
            ),
        ));
    }
    let grpc_codes = match doc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(defaults::RETRY_GRPC_CODES_ANNOTATION))
    {
        Some(v) => Some(grpc_codes(v)?),
        None => None,
    };
    let mut rules = Vec::new();
    let mut names = HashSet::new();
    for (i, r) in doc.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let rule = rule(&key, &at, r, grpc_codes.as_deref())?;
        if let Some(n) = &rule.name
            && !names.insert(n.clone())
        {
            return Err(SpecError::new(
                format!("{at}.name"),
                format!("{n:?} names another rule too"),
            ));
        }
        rules.push(rule);
    }
    let route = RouteSpec {
        created: doc.metadata.creation_timestamp,
        parents,
        rules,
    };
    Ok(Some((key, route)))
}

pub(super) fn port(field: String, p: i64) -> Result<u16, SpecError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| SpecError::new(field, format!("{p} is not a port (1-65535)")))
}

/// The core API group, as a parentRef or backendRef writes it.
pub(crate) fn core_group(group: &str) -> bool {
    group.is_empty() || group == "core"
}

/// Gateway API's group, what a parentRef's `group` defaults to.
pub(crate) const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Whether a parentRef names a Service strait reports on: a core one, or one
/// whose group was left out (or defaulted), to say the route is refused for it.
pub(crate) fn service_parent(group: Option<&str>) -> bool {
    group.is_none_or(|g| core_group(g) || g == GATEWAY_GROUP)
}

fn parents(route: &ObjKey, refs: &[ParentRefDoc]) -> Result<Vec<ParentRef>, SpecError> {
    let mut out = Vec::new();
    for (i, p) in refs.iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        // Gateway API's defaults: a parentRef without kind is a Gateway's.
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        if kind != "Service" {
            continue;
        }
        // Left out, the group is Gateway API's own (the API server writes it
        // in), which has no Service: the route would attach to nothing.
        match p.group.as_deref() {
            Some(g) if core_group(g) => {}
            None | Some(GATEWAY_GROUP) => {
                return Err(SpecError::new(
                    format!("{at}.group"),
                    "a Service parent needs group \"\" (core); left out, it is Gateway API's, \
                     which has no Service",
                ));
            }
            Some(_) => continue,
        }
        if !dns_label(&p.name) {
            return Err(SpecError::new(
                format!("{at}.name"),
                format!("{:?} is not a Service name", p.name),
            ));
        }
        let namespace = own_namespace(
            &format!("{at}.namespace"),
            route,
            p.namespace.as_ref(),
            "a route changes traffic only to Services of its own namespace (one elsewhere would \
             change it for every client in the mesh; routes for one namespace's own clients are \
             not supported)",
        )?;
        let parent = ParentRef {
            service: ObjKey {
                namespace,
                name: p.name.clone(),
            },
            port: p.port.map(|n| port(format!("{at}.port"), n)).transpose()?,
            section_name: p.section_name.clone(),
        };
        if !out.contains(&parent) {
            out.push(parent);
        }
    }
    Ok(out)
}

/// A referenced object's namespace, which must be the route's own (its
/// default): a route may not reach into a namespace that did not write it.
fn own_namespace(
    field: &str,
    route: &ObjKey,
    ns: Option<&String>,
    why: &str,
) -> Result<String, SpecError> {
    match ns {
        None => Ok(route.namespace.clone()),
        Some(ns) if *ns == route.namespace => Ok(ns.clone()),
        Some(ns) if dns_label(ns) => Err(SpecError::new(
            field,
            format!(
                "{ns:?} is not the route's namespace ({:?}): {why}",
                route.namespace
            ),
        )),
        Some(ns) => Err(SpecError::new(
            field,
            format!("{ns:?} is not a namespace name"),
        )),
    }
}

/// The `retry.strait.dev/grpc-codes` annotation: names (any case, snake or kebab
/// case) or numbers, comma separated.
fn grpc_codes(v: &str) -> Result<Vec<u32>, SpecError> {
    let field = format!(
        "metadata.annotations[\"{}\"]",
        defaults::RETRY_GRPC_CODES_ANNOTATION
    );
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name = item.to_ascii_lowercase().replace('-', "_");
        let code = match name.parse::<u32>() {
            Ok(n) => (usize::try_from(n).is_ok_and(|n| n < GRPC_CODES.len())).then_some(n),
            Err(_) => GRPC_CODES
                .iter()
                .position(|c| *c == name || (name == "canceled" && *c == "cancelled"))
                .and_then(|p| u32::try_from(p).ok()),
        };
        let code = code.ok_or_else(|| {
            SpecError::new(
                &field,
                format!("{item:?} is not a gRPC status code (a name such as unavailable, or 0-16)"),
            )
        })?;
        if !out.contains(&code) {
            out.push(code);
        }
    }
    if out.is_empty() {
        return Err(SpecError::new(
            field,
            "empty: list gRPC status codes, e.g. \"unavailable,resource-exhausted\"",
        ));
    }
    out.sort_unstable();
    Ok(out)
}

fn backend_ref(route: &ObjKey, at: &str, b: &BackendRefDoc) -> Result<BackendRef, SpecError> {
    let kind = b.kind.as_deref().unwrap_or("Service");
    let group = b.group.as_deref().unwrap_or("");
    let weight = weight(at, b.weight)?;
    if kind != "Service" || !core_group(group) {
        // Gateway API: unresolved (`InvalidKind`), its share answered 500;
        // the rest of the route stands.
        return Ok(BackendRef {
            service: ObjKey {
                namespace: route.namespace.clone(),
                name: b.name.clone(),
            },
            port: None,
            weight,
            unresolvable: Some(Unresolvable::Kind(format!("{group}/{kind}"))),
        });
    }
    if !dns_label(&b.name) {
        return Err(SpecError::new(
            format!("{at}.name"),
            format!("{:?} is not a Service name", b.name),
        ));
    }
    if !b.filters.is_empty() {
        return Err(SpecError::new(
            format!("{at}.filters"),
            "filters on a backendRef are not supported (put them on the rule)",
        ));
    }
    // Another namespace's Service: unresolved (`RefNotPermitted`), its
    // share answered 500; the rest of the route stands.
    let (namespace, unresolvable) = match &b.namespace {
        Some(ns) if *ns != route.namespace => {
            if !dns_label(ns) {
                return Err(SpecError::new(
                    format!("{at}.namespace"),
                    format!("{ns:?} is not a namespace name"),
                ));
            }
            (ns.clone(), Some(Unresolvable::OtherNamespace))
        }
        _ => (route.namespace.clone(), None),
    };
    Ok(BackendRef {
        service: ObjKey {
            namespace,
            name: b.name.clone(),
        },
        port: b.port.map(|p| port(format!("{at}.port"), p)).transpose()?,
        weight,
        unresolvable,
    })
}

fn weight(at: &str, w: Option<i64>) -> Result<u32, SpecError> {
    match w {
        None => Ok(1),
        Some(w) if w < 0 => Err(SpecError::new(
            format!("{at}.weight"),
            format!("{w} is negative"),
        )),
        Some(w) => u32::try_from(w)
            .ok()
            .filter(|w| *w <= defaults::MAX_BACKEND_WEIGHT)
            .ok_or_else(|| {
                SpecError::new(
                    format!("{at}.weight"),
                    format!("{w} is more than {}", defaults::MAX_BACKEND_WEIGHT),
                )
            }),
    }
}

/// A timeout: "0s" is none (Gateway API).
fn timeout(field: &str, v: Option<&String>) -> Result<Option<std::time::Duration>, SpecError> {
    Ok(v.map(|v| spec::duration(field, v))
        .transpose()?
        .filter(|d| !d.is_zero()))
}

fn retry(at: &str, r: &RetryDoc, grpc: Option<&[u32]>) -> Result<Retry, SpecError> {
    let mut codes = Vec::new();
    for (i, c) in r.codes.iter().enumerate() {
        let code = u32::try_from(*c)
            .ok()
            .filter(|c| defaults::RETRY_STATUS_CODES.contains(c))
            .ok_or_else(|| {
                SpecError::new(
                    format!("{at}.codes[{i}]"),
                    format!(
                        "{c} is not an HTTP status that can be retried ({}-{})",
                        defaults::RETRY_STATUS_CODES.start(),
                        defaults::RETRY_STATUS_CODES.end()
                    ),
                )
            })?;
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    let attempts = match r.attempts {
        None => defaults::DEFAULT_RETRY_ATTEMPTS,
        Some(a) => u32::try_from(a)
            .ok()
            .filter(|a| *a <= defaults::MAX_RETRY_ATTEMPTS)
            .ok_or_else(|| {
                SpecError::new(
                    format!("{at}.attempts"),
                    format!("{a} is not 0-{}", defaults::MAX_RETRY_ATTEMPTS),
                )
            })?,
    };
    Ok(Retry {
        attempts,
        codes,
        backoff: r
            .backoff
            .as_ref()
            .map(|b| spec::duration(&format!("{at}.backoff"), b))
            .transpose()?,
        grpc_codes: grpc.unwrap_or_default().to_vec(),
    })
}

/// What the rules of both kinds have: a name, matches (already in the
/// proxies' form), filters and backendRefs. No timeouts and no retry.
pub(super) fn rule_parts(
    route: &ObjKey,
    at: &str,
    name: Option<&String>,
    matches: Vec<api::HttpMatch>,
    filter_docs: &[FilterDoc],
    backend_refs: &[BackendRefDoc],
) -> Result<Rule, SpecError> {
    // A SectionName: a DNS name, dots allowed.
    if let Some(n) = name
        && !crate::spec::dns_name(n)
    {
        return Err(SpecError::new(
            format!("{at}.name"),
            format!("{n:?} is not a rule name (lowercase letters, digits, '-' and '.')"),
        ));
    }
    SpecError::at_most(
        format!("{at}.filters"),
        filter_docs.len(),
        defaults::MAX_RULE_FILTERS,
    )?;
    SpecError::at_most(
        format!("{at}.backendRefs"),
        backend_refs.len(),
        defaults::MAX_RULE_BACKENDS,
    )?;
    let filters = filters(at, filter_docs, &matches)?;
    // As Gateway API's own validation: a redirect answers the request, so
    // backends beside it would be silently unused.
    let redirects = filters
        .iter()
        .any(|f| matches!(f.kind, Some(api::http_filter::Kind::RequestRedirect(_))));
    if redirects && !backend_refs.is_empty() {
        return Err(SpecError::new(
            format!("{at}.backendRefs"),
            "a rule with a RequestRedirect filter has no backendRefs: the redirect answers",
        ));
    }
    let backends = backend_refs
        .iter()
        .enumerate()
        .map(|(i, b)| backend_ref(route, &format!("{at}.backendRefs[{i}]"), b))
        .collect::<Result<Vec<_>, _>>()?;
    // Every backend at weight 0 is accepted: it is how a rule is drained, and
    // the proxies answer its requests 500, as Gateway API says.
    Ok(Rule {
        name: name.cloned(),
        matches,
        filters,
        backends,
        request_timeout: None,
        backend_request_timeout: None,
        retry: None,
    })
}

/// The retry of a rule whose route's annotation names gRPC codes and whose
/// own spec says nothing of retries.
pub(super) fn grpc_codes_retry(codes: &[u32]) -> Retry {
    Retry {
        attempts: defaults::DEFAULT_RETRY_ATTEMPTS,
        codes: Vec::new(),
        backoff: None,
        grpc_codes: codes.to_vec(),
    }
}

/// A rule's matches, bounded in number, each parsed at its own field path.
pub(super) fn rule_matches<M>(
    at: &str,
    matches: &[M],
    parse: impl Fn(&str, &M) -> Result<api::HttpMatch, SpecError>,
) -> Result<Vec<api::HttpMatch>, SpecError> {
    SpecError::at_most(
        format!("{at}.matches"),
        matches.len(),
        defaults::MAX_RULE_MATCHES,
    )?;
    (matches.iter().enumerate())
        .map(|(i, m)| parse(&format!("{at}.matches[{i}]"), m))
        .collect()
}

fn rule(route: &ObjKey, at: &str, r: &RuleDoc, grpc: Option<&[u32]>) -> Result<Rule, SpecError> {
    refuse_session_persistence(at, &r.session_persistence)?;
    let matches = rule_matches(at, &r.matches, http_match)?;
    let mut rule = rule_parts(
        route,
        at,
        r.name.as_ref(),
        matches,
        &r.filters,
        &r.backend_refs,
    )?;
    let timeouts = r.timeouts.as_ref();
    let request_timeout = timeout(
        &format!("{at}.timeouts.request"),
        timeouts.and_then(|t| t.request.as_ref()),
    )?;
    let backend_request_timeout = timeout(
        &format!("{at}.timeouts.backendRequest"),
        timeouts.and_then(|t| t.backend_request.as_ref()),
    )?;
    if let (Some(req), Some(back)) = (request_timeout, backend_request_timeout)
        && back > req
    {
        return Err(SpecError::new(
            format!("{at}.timeouts.backendRequest"),
            "longer than timeouts.request, which it is part of",
        ));
    }
    rule.retry = match (&r.retry, grpc) {
        (Some(doc), _) => Some(retry(&format!("{at}.retry"), doc, grpc)?),
        (None, Some(codes)) => Some(grpc_codes_retry(codes)),
        (None, None) => None,
    };
    rule.request_timeout = request_timeout;
    rule.backend_request_timeout = backend_request_timeout;
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{Value, json};
    use strait_api::v1 as api;

    use super::*;

    fn route() -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [{
                    "name": "canary",
                    "matches": [{
                        "path": {"type": "PathPrefix", "value": "/api"},
                        "headers": [{"name": "x-user", "type": "RegularExpression", "value": "a.*"}],
                        "queryParams": [{"name": "v", "value": "2"}],
                        "method": "GET"
                    }],
                    "filters": [
                        {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}], "remove": ["x-b"]}},
                        {"type": "URLRewrite", "urlRewrite": {"hostname": "api.internal", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}}
                    ],
                    "backendRefs": [{"name": "web", "port": 80, "weight": 90}, {"name": "web-canary", "weight": 10}],
                    "timeouts": {"request": "1s", "backendRequest": "200ms"},
                    "retry": {"codes": [503], "attempts": 3, "backoff": "25ms"}
                }, {"name": "fallback"}]
            }
        })
    }

    /// Sets (or adds) the value at a JSON pointer.
    fn set(v: &mut Value, ptr: &str, value: Value) {
        let (parent, last) = ptr.rsplit_once('/').unwrap();
        match v.pointer_mut(parent).unwrap() {
            Value::Object(m) => {
                m.insert(last.to_string(), value);
            }
            Value::Array(a) => a[last.parse::<usize>().unwrap()] = value,
            other => panic!("{other}"),
        }
    }

    fn parsed(v: &Value) -> RouteSpec {
        parse(v).unwrap().unwrap().1
    }

    /// As the CRD defaults it on the API server: a route without rules has
    /// one, matching every path, with no backend.
    #[test]
    fn a_route_without_rules_gets_the_crds_default_rule() {
        let mut v = route();
        v["spec"].as_object_mut().unwrap().remove("rules");
        let r = parsed(&v);
        assert_eq!(r.rules.len(), 1, "{:?}", r.rules);
        assert!(r.rules[0].backends.is_empty());
        // A `spec` that is no mapping is refused, as before.
        for spec in [json!("parentRefs"), json!(7), json!([1])] {
            v["spec"] = spec;
            assert!(parse(&v).is_err(), "{v}");
        }
    }

    fn field_of(v: &Value) -> String {
        parse(v).unwrap_err().field
    }

    /// A rule asking for session persistence is refused, not accepted and
    /// balanced per request anyway.
    #[test]
    fn session_persistence_is_refused() {
        let mut v = route();
        v["spec"]["rules"][1]["sessionPersistence"] = json!({"type": "Cookie", "sessionName": "s"});
        assert_eq!(field_of(&v), "spec.rules[1].sessionPersistence");
    }

    /// A match on one of strait's own fields is refused: the caller's proxy
    /// matches what the caller's app sent, so a route on `strait-client-id`
    /// would route on a claim anyone can make.
    #[test]
    fn a_match_on_strait_s_own_fields_is_refused() {
        for name in ["strait-client-id", "Strait_Target_Port"] {
            let mut v = route();
            set(
                &mut v,
                "/spec/rules/0/matches/0/headers",
                json!([{"name": "x-user", "value": "a"}, {"name": name, "value": "spiffe://cluster.local/ns/shop/sa/tester"}]),
            );
            let e = parse(&v).unwrap_err();
            assert_eq!(
                e.field, "spec.rules[0].matches[0].headers[1].name",
                "{name}"
            );
            assert!(e.reason.contains("AuthorizationPolicy"), "{}", e.reason);
            assert!(!e.reason.contains("  "), "{}", e.reason);
        }
    }

    /// One action per header name in a header filter, whatever the case.
    #[test]
    fn a_header_with_two_actions_is_refused() {
        let mut v = route();
        set(
            &mut v,
            "/spec/rules/0/filters/0/requestHeaderModifier/remove",
            json!(["x-b", "X-A"]),
        );
        assert_eq!(
            field_of(&v),
            "spec.rules[0].filters[0].requestHeaderModifier.remove[1]"
        );
        set(
            &mut v,
            "/spec/rules/0/filters/0/requestHeaderModifier/remove",
            json!(["x-b"]),
        );
        let r = parsed(&v);
        assert_eq!(r.rules.len(), 2);
    }

    /// A header filter a proxy could not follow is refused, naming the
    /// field: a second Host (the request refused 400), a Host that is no
    /// authority, Host removed, and strait's own fields.
    #[test]
    fn header_filters_a_proxy_could_not_follow_are_refused() {
        let at = "/spec/rules/0/filters/0/requestHeaderModifier";
        for (list, value, field) in [
            (
                "add",
                json!([{"name": "Host", "value": "api.internal"}]),
                "add[0].name",
            ),
            (
                "set",
                json!([{"name": "host", "value": "api internal"}]),
                "set[0].value",
            ),
            (
                "set",
                json!([{"name": "Host", "value": "u:p@api"}]),
                "set[0].value",
            ),
            ("remove", json!(["x-b", "Host"]), "remove[1]"),
            (
                "set",
                json!([{"name": "strait-proxy-error", "value": "x"}]),
                "set[0].name",
            ),
            (
                "add",
                json!([{"name": "Strait-Client-Id", "value": "x"}]),
                "add[0].name",
            ),
        ] {
            let mut v = route();
            set(&mut v, &format!("{at}/remove"), json!([]));
            set(&mut v, &format!("{at}/set"), json!([]));
            set(&mut v, &format!("{at}/{list}"), value.clone());
            assert_eq!(
                field_of(&v),
                format!("spec.rules[0].filters[0].requestHeaderModifier.{field}"),
                "{list} {value}"
            );
        }
        // Host set to an authority is a route a proxy follows.
        let mut v = route();
        set(&mut v, &format!("{at}/remove"), json!([]));
        set(
            &mut v,
            &format!("{at}/set"),
            json!([{"name": "Host", "value": "api.internal:8080"}]),
        );
        assert_eq!(parsed(&v).rules.len(), 2);
    }

    /// Gateway API's ReplacePrefixMatch table has an empty replacement
    /// (`/foo/bar` to `/bar`): the prefix taken off.
    #[test]
    fn an_empty_prefix_replacement_takes_the_prefix_off() {
        let mut v = route();
        set(
            &mut v,
            "/spec/rules/0/filters/1/urlRewrite/path/replacePrefixMatch",
            json!(""),
        );
        let r = parsed(&v);
        let rewrite = format!("{:?}", r.rules[0].filters);
        assert!(rewrite.contains("ReplacePrefixMatch(\"\")"), "{rewrite}");
        // Still a path when given: no "/" first is refused.
        set(
            &mut v,
            "/spec/rules/0/filters/1/urlRewrite/path/replacePrefixMatch",
            json!("v2"),
        );
        assert!(
            field_of(&v).ends_with("replacePrefixMatch"),
            "{}",
            field_of(&v)
        );
    }

    #[test]
    fn an_unnamed_rule_and_one_named_as_its_index_keep_apart() {
        let mut v = route();
        set(&mut v, "/spec/rules/0/name", json!("1"));
        set(&mut v, "/spec/rules/1", json!({}));
        let key = ObjKey {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let api = parsed(&v).to_api(&key, 80);
        let names: Vec<&str> = api.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["1", "_1"]);
        set(&mut v, "/spec/rules/0/name", json!("canary"));
        let api = parsed(&v).to_api(&key, 80);
        let names: Vec<&str> = api.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["canary", "1"]);
        // A SectionName may have dots.
        set(&mut v, "/spec/rules/0/name", json!("canary.v2"));
        let api = parsed(&v).to_api(&key, 80);
        assert_eq!(api.rules[0].name, "canary.v2");
    }

    #[test]
    fn a_full_route_is_read_with_gateway_defaults() {
        let r = parsed(&route());
        assert_eq!(r.parents.len(), 1);
        assert_eq!(r.parents[0].port, Some(80));
        let rule = &r.rules[0];
        assert_eq!(rule.name.as_deref(), Some("canary"));
        assert_eq!(
            rule.matches[0].path,
            Some(api::http_match::Path::Prefix("/api".into()))
        );
        assert_eq!(rule.matches[0].method, "GET");
        assert_eq!(rule.filters.len(), 2);
        assert_eq!(rule.backends[1].weight, 10);
        assert_eq!(rule.backends[1].port, None, "the parent's port is used");
        assert_eq!(rule.backends[1].service.namespace, "shop");
        assert_eq!(rule.request_timeout, Some(Duration::from_secs(1)));
        assert_eq!(
            rule.backend_request_timeout,
            Some(Duration::from_millis(200))
        );
        let retry = rule.retry.as_ref().unwrap();
        assert_eq!((retry.attempts, retry.codes.clone()), (3, vec![503]));
        assert_eq!(retry.backoff, Some(Duration::from_millis(25)));
        // An empty rule: no matches, no backends, no timeouts, no retries.
        let empty = &r.rules[1];
        assert!(empty.matches.is_empty() && empty.backends.is_empty() && empty.retry.is_none());
    }

    #[test]
    fn a_route_reaches_only_into_its_own_namespace() {
        // Named explicitly, the route's own namespace is as good as the default.
        let mut v = route();
        v["spec"]["parentRefs"][0]["namespace"] = "shop".into();
        v["spec"]["rules"][0]["backendRefs"][0]["namespace"] = "shop".into();
        assert_eq!(parsed(&v).parents[0].service.namespace, "shop");
        // A route written in `dev` would otherwise send every client's traffic
        // for `shop/web` wherever it liked.
        let mut v = route();
        v["spec"]["parentRefs"][0]["namespace"] = "prod".into();
        let e = parse(&v).unwrap_err();
        assert_eq!(e.field, "spec.parentRefs[0].namespace");
        assert!(e.reason.contains("its own namespace"), "{}", e.reason);
        // A backend there is unresolved, its share answered 500 (Gateway
        // API's `RefNotPermitted`): the rest of the route stands.
        let mut v = route();
        v["spec"]["rules"][0]["backendRefs"][1]["namespace"] = "prod".into();
        let refs = &parsed(&v).rules[0].backends;
        assert_eq!(refs[0].unresolvable, None);
        assert_eq!(refs[1].unresolvable, Some(Unresolvable::OtherNamespace));
        assert_eq!(refs[1].service.namespace, "prod");
        v["spec"]["rules"][0]["backendRefs"][1]["namespace"] = "Prod!".into();
        let e = parse(&v).unwrap_err();
        assert_eq!(e.field, "spec.rules[0].backendRefs[1].namespace");
    }

    #[test]
    fn a_bad_regex_rejects_the_route_and_names_the_field() {
        let mut v = route();
        v["spec"]["rules"][0]["matches"][0]["headers"][0]["value"] = "[a-".into();
        let e = parse(&v).unwrap_err();
        assert_eq!(e.field, "spec.rules[0].matches[0].headers[0].value");
        assert!(
            e.reason.contains("bad regular expression") && !e.reason.contains('\n'),
            "{}",
            e.reason
        );

        let mut v = route();
        v["spec"]["rules"][0]["matches"][0]["path"] =
            json!({"type": "RegularExpression", "value": "(/x"});
        assert_eq!(field_of(&v), "spec.rules[0].matches[0].path.value");

        // Unbalanced groups would escape the anchors the proxies add.
        let mut v = route();
        v["spec"]["rules"][0]["matches"][0]["path"] =
            json!({"type": "RegularExpression", "value": "/a)|(.*"});
        assert_eq!(field_of(&v), "spec.rules[0].matches[0].path.value");
    }

    /// Regular expressions are bounded per route (each costs every client
    /// proxy a compile), and header modifier lists as Gateway API bounds them.
    #[test]
    fn a_route_of_too_many_regexes_or_header_changes_is_refused() {
        let with_regexes = |n: usize| {
            let mut v = route();
            let header = json!({"name": "x-user", "type": "RegularExpression", "value": "a.*"});
            let m = json!({"headers": vec![header; 16]});
            v["spec"]["rules"][0]["matches"] = json!(vec![m; n / 16]);
            v["spec"]["rules"][1]["matches"] =
                json!([{"path": {"type": "RegularExpression", "value": "/a.*"}}]);
            v
        };
        assert!(parse(&with_regexes(48)).is_ok(), "49 regexes");
        let e = parse(&with_regexes(64)).unwrap_err();
        assert_eq!(e.field, "spec.rules");
        assert!(
            e.reason.starts_with("65 regular expressions"),
            "{}",
            e.reason
        );

        let mut v = route();
        let header = json!({"name": "x-a", "value": "1"});
        v["spec"]["rules"][0]["filters"][0]["requestHeaderModifier"]["add"] =
            json!(vec![header; 17]);
        assert_eq!(
            field_of(&v),
            "spec.rules[0].filters[0].requestHeaderModifier.add"
        );

        // A GRPCRoute's match of a method alone is matched as a regex; of a
        // service (and method), exactly.
        let grpc = json!([{"matches": [
            {"method": {"method": "Add"}},
            {"method": {"type": "Exact", "service": null, "method": "Add"}},
            {"method": {"service": "shop.Cart", "method": "Add"}},
            {"method": {"type": "RegularExpression", "service": "shop\\..*"}},
            {"headers": [{"name": "x", "value": "y"}]}
        ]}]);
        assert_eq!(regexes_in(&grpc), 3);
    }

    #[test]
    fn routes_without_a_service_parent_are_not_strait_s() {
        let mut v = route();
        v["spec"]["parentRefs"] =
            json!([{"name": "gw"}, {"kind": "Service", "group": "other.io", "name": "x"}]);
        // Not read further: a Gateway's route may use what strait does not support.
        v["spec"]["rules"][0]["filters"][0]["type"] = "RequestMirror".into();
        assert!(parse(&v).unwrap().is_none());
    }

    /// Gateway API: a backendRef of a kind the implementation does not
    /// support is unresolved (`InvalidKind`, its share answered 500); the
    /// route stands.
    #[test]
    fn a_backend_of_another_kind_is_unresolved_not_the_route_refused() {
        let mut v = route();
        v["spec"]["rules"][0]["backendRefs"][1] = json!({"group": "multicluster.x-k8s.io",
            "kind": "ServiceImport", "name": "web", "weight": 10});
        let (_, spec) = parse(&v).unwrap().unwrap();
        let refs = &spec.rules[0].backends;
        assert_eq!(refs[0].unresolvable, None);
        assert_eq!(
            refs[1].unresolvable,
            Some(Unresolvable::Kind(
                "multicluster.x-k8s.io/ServiceImport".into()
            ))
        );
        assert_eq!(refs[1].weight, 10);
        // Its weight is still checked.
        v["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(-1);
        assert_eq!(
            parse(&v).unwrap_err().field,
            "spec.rules[0].backendRefs[1].weight"
        );
    }

    #[test]
    fn invalid_rules_are_refused_naming_the_field() {
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "/spec/rules/0/backendRefs/0/weight",
                json!(-1),
                "spec.rules[0].backendRefs[0].weight",
            ),
            (
                "/spec/rules/0/backendRefs/0/weight",
                json!(2_000_000),
                "spec.rules[0].backendRefs[0].weight",
            ),
            (
                "/spec/rules/0/filters/0/type",
                json!("RequestMirror"),
                "spec.rules[0].filters[0].type",
            ),
            (
                "/spec/rules/0/retry/codes/0",
                json!(200),
                "spec.rules[0].retry.codes[0]",
            ),
            (
                "/spec/rules/0/retry/attempts",
                json!(11),
                "spec.rules[0].retry.attempts",
            ),
            (
                "/spec/rules/0/retry/backoff",
                json!("1.5s"),
                "spec.rules[0].retry.backoff",
            ),
            (
                "/spec/rules/0/timeouts/request",
                json!("1d"),
                "spec.rules[0].timeouts.request",
            ),
            (
                "/spec/rules/0/timeouts/request",
                json!("100ms"),
                "spec.rules[0].timeouts.backendRequest",
            ),
            (
                "/spec/rules/0/matches/0/path/type",
                json!("Glob"),
                "spec.rules[0].matches[0].path.type",
            ),
            (
                "/spec/rules/0/matches/0/path/value",
                json!("api"),
                "spec.rules[0].matches[0].path.value",
            ),
            (
                "/spec/rules/0/matches/0/path/value",
                json!("/a b"),
                "spec.rules[0].matches[0].path.value",
            ),
            (
                "/spec/rules/0/matches/0/headers/0/type",
                json!("Prefix"),
                "spec.rules[0].matches[0].headers[0].type",
            ),
            (
                "/spec/rules/0/matches/0/queryParams/0/type",
                json!("Fuzzy"),
                "spec.rules[0].matches[0].queryParams[0].type",
            ),
            (
                "/spec/rules/0/matches/0/method",
                json!("FETCH"),
                "spec.rules[0].matches[0].method",
            ),
            (
                "/spec/rules/0/matches/0/path/type",
                json!("Exact"),
                "spec.rules[0].filters[1].urlRewrite.path.type",
            ),
            (
                "/spec/rules/0/filters/0/requestHeaderModifier/set/0/name",
                json!("bad name"),
                "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
            ),
            (
                "/spec/rules/0/filters/0/requestHeaderModifier/set/0/name",
                json!("Connection"),
                "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
            ),
            (
                "/spec/rules/0/filters/0/requestHeaderModifier/set/0/name",
                json!("transfer-encoding"),
                "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
            ),
            ("/spec/rules/1/name", json!("canary"), "spec.rules[1].name"),
            (
                "/spec/rules/1/name",
                json!("Bad_Name"),
                "spec.rules[1].name",
            ),
            (
                "/spec/parentRefs/0/port",
                json!(0),
                "spec.parentRefs[0].port",
            ),
            // What the API server writes in for a group left out.
            (
                "/spec/parentRefs/0/group",
                json!("gateway.networking.k8s.io"),
                "spec.parentRefs[0].group",
            ),
            ("/spec/rules/1/name", json!("a..b"), "spec.rules[1].name"),
        ];
        for (ptr, value, field) in cases {
            let mut v = route();
            set(&mut v, ptr, value);
            assert_eq!(field_of(&v), field, "{ptr}");
        }
    }

    #[test]
    fn every_backend_ref_at_weight_zero_is_a_drained_rule_not_an_error() {
        // Refused, the change would leave the split before it in force.
        let mut v = route();
        v["spec"]["rules"][0]["backendRefs"][0]["weight"] = 0.into();
        v["spec"]["rules"][0]["backendRefs"][1]["weight"] = 0.into();
        let r = parsed(&v);
        assert!(r.rules[0].backends.iter().all(|b| b.weight == 0));
    }

    #[test]
    fn a_redirect_gets_its_default_status_and_cannot_join_a_rewrite() {
        let mut v = route();
        v["spec"]["rules"][0]["filters"][0] = json!({"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "port": 8443}});
        assert_eq!(field_of(&v), "spec.rules[0].filters");
        v["spec"]["rules"][0]["filters"]
            .as_array_mut()
            .unwrap()
            .pop();
        // Backends beside a redirect would never be used.
        assert_eq!(field_of(&v), "spec.rules[0].backendRefs");
        v["spec"]["rules"][0]["backendRefs"] = json!([]);
        let r = parsed(&v);
        let Some(api::http_filter::Kind::RequestRedirect(red)) = &r.rules[0].filters[0].kind else {
            panic!("{:?}", r.rules[0].filters)
        };
        assert_eq!(
            (red.scheme.as_str(), red.port, red.status_code),
            ("https", 8443, 302)
        );
        // Gateway API's extended codes are taken as written; others are not.
        for code in [303, 307, 308] {
            v["spec"]["rules"][0]["filters"][0]["requestRedirect"]["statusCode"] = code.into();
            let r = parsed(&v);
            let Some(api::http_filter::Kind::RequestRedirect(red)) = &r.rules[0].filters[0].kind
            else {
                panic!("{:?}", r.rules[0].filters)
            };
            assert_eq!(red.status_code, code);
        }
        v["spec"]["rules"][0]["filters"][0]["requestRedirect"]["statusCode"] = 305.into();
        assert_eq!(
            field_of(&v),
            "spec.rules[0].filters[0].requestRedirect.statusCode"
        );
    }

    #[test]
    fn zero_timeouts_mean_none() {
        let mut v = route();
        v["spec"]["rules"][0]["timeouts"] = json!({"request": "0s", "backendRequest": "1m30s"});
        let r = parsed(&v);
        assert_eq!(r.rules[0].request_timeout, None);
        assert_eq!(
            r.rules[0].backend_request_timeout,
            Some(Duration::from_secs(90))
        );
    }

    #[test]
    fn the_grpc_codes_annotation_retries_every_rule() {
        let mut v = route();
        v["metadata"]["annotations"] = json!({"retry.strait.dev/grpc-codes": "Unavailable, resource-exhausted,DEADLINE_EXCEEDED,14,cancelled"});
        let r = parsed(&v);
        let with_retry = r.rules[0].retry.as_ref().unwrap();
        assert_eq!(with_retry.attempts, 3, "the rule's own retry stays");
        assert_eq!(with_retry.grpc_codes, vec![1, 4, 8, 14]);
        let without = r.rules[1].retry.as_ref().unwrap();
        assert_eq!((without.attempts, without.grpc_codes.len()), (2, 4));

        for bad in ["unavailabel", "17", ""] {
            v["metadata"]["annotations"]["retry.strait.dev/grpc-codes"] = bad.into();
            let e = parse(&v).unwrap_err();
            assert!(
                e.field.contains("retry.strait.dev/grpc-codes"),
                "{bad}: {e}"
            );
        }
    }
}
