//! HTTPRoute matches: path (Exact, PathPrefix, RegularExpression), headers and
//! query parameters (Exact, RegularExpression) and method, validated as the
//! proxies will read them.

use serde::Deserialize;
use strait_api::v1 as api;

use crate::defaults;
use crate::spec::SpecError;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct MatchDoc {
    path: Option<PathDoc>,
    #[serde(default)]
    headers: Vec<ValueMatchDoc>,
    #[serde(default)]
    query_params: Vec<ValueMatchDoc>,
    method: Option<String>,
}

#[derive(Deserialize)]
struct PathDoc {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct ValueMatchDoc {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: String,
    value: String,
}

/// The methods Gateway API matches on.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Regular expressions match whole values, compiled as the proxies compile them.
/// The pattern is compiled alone first: with unbalanced groups (`/a)|(.*`) it
/// would compile inside the anchoring group and escape it.
pub(super) fn full_match_regex(field: &str, pattern: &str) -> Result<String, SpecError> {
    for p in [pattern.to_string(), format!("^(?:{pattern})$")] {
        regex::RegexBuilder::new(&p)
            .size_limit(defaults::ROUTE_REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| {
                // The crate's message spans lines (pattern, caret, error): keep the error.
                let msg = e.to_string();
                let why = msg
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("error: "))
                    .unwrap_or(msg.trim());
                SpecError::new(field, format!("bad regular expression {pattern:?}: {why}"))
            })?;
    }
    Ok(pattern.to_string())
}

pub(super) fn path_value(field: &str, v: &str) -> Result<String, SpecError> {
    // As a request's path would parse: a rewrite to a path that cannot be
    // sent (a space, a control character) would be silently skipped.
    if !v.starts_with('/')
        || v.contains(['?', '#'])
        || http::uri::PathAndQuery::try_from(v).is_err()
    {
        return Err(SpecError::new(
            field,
            format!("{v:?} is not a path (it starts with \"/\", without query or fragment)"),
        ));
    }
    Ok(v.to_string())
}

pub(super) fn http_match(at: &str, m: &MatchDoc) -> Result<api::HttpMatch, SpecError> {
    use api::http_match::Path;
    SpecError::at_most(
        format!("{at}.queryParams"),
        m.query_params.len(),
        defaults::MAX_MATCH_VALUES,
    )?;
    let path = match &m.path {
        None => None,
        Some(p) => {
            let field = format!("{at}.path.value");
            let value = p.value.as_deref().unwrap_or("/");
            Some(match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => Path::Exact(path_value(&field, value)?),
                "PathPrefix" => Path::Prefix(path_value(&field, value)?),
                "RegularExpression" => Path::Regex(full_match_regex(&field, value)?),
                other => return Err(unsupported(&format!("{at}.path.type"), other)),
            })
        }
    };
    let method = match &m.method {
        None => String::new(),
        Some(x) if METHODS.contains(&x.as_str()) => x.clone(),
        Some(x) => {
            return Err(SpecError::new(
                format!("{at}.method"),
                format!("{x:?} is not one of {}", METHODS.join(", ")),
            ));
        }
    };
    let headers = header_matches(at, &m.headers)?;
    let mut query_params = Vec::new();
    for (i, q) in m.query_params.iter().enumerate() {
        let at = format!("{at}.queryParams[{i}]");
        if q.name.is_empty() {
            return Err(SpecError::new(format!("{at}.name"), "empty"));
        }
        use api::query_param_match::Value;
        let value = match value_kind(&at, q)? {
            true => Value::Exact(q.value.clone()),
            false => Value::Regex(full_match_regex(&format!("{at}.value"), &q.value)?),
        };
        query_params.push(api::QueryParamMatch {
            name: q.name.clone(),
            value: Some(value),
        });
    }
    Ok(api::HttpMatch {
        path,
        method,
        headers,
        query_params,
        grpc_rank: None,
    })
}

/// Header matches (`{at}.headers`), of HTTPRoutes and GRPCRoutes alike.
pub(super) fn header_matches(
    at: &str,
    docs: &[ValueMatchDoc],
) -> Result<Vec<api::HeaderMatch>, SpecError> {
    SpecError::at_most(
        format!("{at}.headers"),
        docs.len(),
        defaults::MAX_MATCH_VALUES,
    )?;
    let mut headers = Vec::new();
    for (i, h) in docs.iter().enumerate() {
        let at = format!("{at}.headers[{i}]");
        if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
            return Err(SpecError::new(
                format!("{at}.name"),
                format!("{:?} is not a header name", h.name),
            ));
        }
        // Matching happens in the caller's proxy, before any `strait-*`
        // field is set or checked: it would read what the caller's app sent,
        // so `strait-client-id` there would be a claim, not an identity.
        if super::filters::strait_s(&h.name) {
            return Err(SpecError::new(
                format!("{at}.name"),
                format!(
                    "{:?} is one of strait's own fields, which callers' proxies match before it is set (what the caller's app sent, not a verified identity); an AuthorizationPolicy decides by identity",
                    h.name
                ),
            ));
        }
        use api::header_match::Value;
        let value = match value_kind(&at, h)? {
            true => Value::Exact(h.value.clone()),
            false => Value::Regex(full_match_regex(&format!("{at}.value"), &h.value)?),
        };
        headers.push(api::HeaderMatch {
            name: h.name.clone(),
            value: Some(value),
        });
    }
    Ok(headers)
}

/// Whether a header or query match is exact (else a regular expression).
fn value_kind(at: &str, m: &ValueMatchDoc) -> Result<bool, SpecError> {
    match m.kind.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(true),
        "RegularExpression" => Ok(false),
        other => Err(unsupported(&format!("{at}.type"), other)),
    }
}

pub(super) fn unsupported(field: &str, kind: &str) -> SpecError {
    SpecError::new(field, format!("{kind:?} is not a supported type"))
}
