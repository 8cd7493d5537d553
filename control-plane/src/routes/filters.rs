//! HTTPRoute rule filters: request and response header modifiers, URL rewrites
//! and redirects, validated as the proxies will read them.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use strait_api::v1 as api;

use super::matches::{path_value, unsupported};
use super::parse::port;
use crate::defaults;
use crate::spec::{SpecError, dns_name};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FilterDoc {
    #[serde(rename = "type")]
    pub(super) kind: String,
    request_header_modifier: Option<HeaderModifierDoc>,
    response_header_modifier: Option<HeaderModifierDoc>,
    url_rewrite: Option<UrlRewriteDoc>,
    request_redirect: Option<RedirectDoc>,
}

#[derive(Deserialize)]
struct HeaderModifierDoc {
    #[serde(default)]
    set: Vec<HeaderDoc>,
    #[serde(default)]
    add: Vec<HeaderDoc>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
struct HeaderDoc {
    name: String,
    value: String,
}

#[derive(Deserialize)]
struct UrlRewriteDoc {
    hostname: Option<String>,
    path: Option<PathModifierDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PathModifierDoc {
    #[serde(rename = "type")]
    kind: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RedirectDoc {
    scheme: Option<String>,
    hostname: Option<String>,
    port: Option<i64>,
    path: Option<PathModifierDoc>,
    status_code: Option<i64>,
}

/// Fields that describe one hop's connection or message framing: the proxies
/// strip or set them themselves, and one set by a filter would either vanish
/// or mis-frame the message (a body read by the wrong length).
const PROXY_OWNED: [http::HeaderName; 8] = [
    http::header::CONNECTION,
    http::header::CONTENT_LENGTH,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
];

/// Whether `name` is one of strait's own fields (`strait-proxy-error`,
/// `strait-client-id`, …): the proxies set and strip them, and one a filter
/// set would pass an app's answer for the proxy's, or do nothing.
pub(super) fn strait_s(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.starts_with("strait-") || n.starts_with("strait_")
}

/// Which list of a header filter: `Host` is single-valued, an authority, and
/// never absent from an HTTP/1.1 request.
#[derive(Clone, Copy, PartialEq)]
enum Action {
    Set,
    Add,
}

fn headers(at: &str, hs: &[HeaderDoc], action: Action) -> Result<Vec<api::Header>, SpecError> {
    hs.iter()
        .enumerate()
        .map(|(i, h)| {
            let Ok(name) = http::HeaderName::from_bytes(h.name.as_bytes()) else {
                return Err(SpecError::new(
                    format!("{at}[{i}].name"),
                    format!("{:?} is not a header name", h.name),
                ));
            };
            if strait_s(&h.name) {
                return Err(SpecError::new(
                    format!("{at}[{i}].name"),
                    format!("{:?} is one of strait's own fields, which the proxies set themselves", h.name),
                ));
            }
            if name == http::header::HOST {
                if action == Action::Add {
                    return Err(SpecError::new(
                        format!("{at}[{i}].name"),
                        "Host has one value: a second would have the request refused (400); use set",
                    ));
                }
                let authority = http::uri::Authority::try_from(h.value.as_str());
                if authority.is_err() || h.value.contains('@') || h.value.is_empty() {
                    return Err(SpecError::new(
                        format!("{at}[{i}].value"),
                        format!("{:?} is not a host[:port]", h.value),
                    ));
                }
            }
            if PROXY_OWNED.contains(&name) {
                return Err(SpecError::new(
                    format!("{at}[{i}].name"),
                    format!(
                        "{:?} describes the connection or the message framing, which the proxy sets itself; a filter cannot set it",
                        h.name
                    ),
                ));
            }
            if http::HeaderValue::from_str(&h.value).is_err() {
                return Err(SpecError::new(
                    format!("{at}[{i}].value"),
                    "not a header value (visible ASCII only)",
                ));
            }
            Ok(api::Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
        })
        .collect()
}

fn header_modifier(at: &str, m: &HeaderModifierDoc) -> Result<api::HeaderModifier, SpecError> {
    // Gateway API's CRD allows 16 of each.
    for (list, len) in [
        ("set", m.set.len()),
        ("add", m.add.len()),
        ("remove", m.remove.len()),
    ] {
        SpecError::at_most(format!("{at}.{list}"), len, defaults::MAX_MATCH_VALUES)?;
    }
    for (i, n) in m.remove.iter().enumerate() {
        let name = http::HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
            SpecError::new(
                format!("{at}.remove[{i}]"),
                format!("{n:?} is not a header name"),
            )
        })?;
        if name == http::header::HOST || strait_s(n) || PROXY_OWNED.contains(&name) {
            return Err(SpecError::new(
                format!("{at}.remove[{i}]"),
                format!(
                    "{n:?} cannot be removed: the request needs it, or the proxies set it themselves"
                ),
            ));
        }
    }
    // Gateway API: one action per header name. Which of two would win is
    // the order a proxy applies them in, not what the route says.
    let named = m.set.iter().map(|h| ("set", &h.name));
    let named = named
        .chain(m.add.iter().map(|h| ("add", &h.name)))
        .chain(m.remove.iter().map(|n| ("remove", n)));
    let mut seen = HashSet::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (list, name) in named {
        let i = index.entry(list).or_default();
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(SpecError::new(
                format!("{at}.{list}[{i}]"),
                format!("{name:?} has another action in this filter; one per header name"),
            ));
        }
        *i += 1;
    }
    Ok(api::HeaderModifier {
        set: headers(&format!("{at}.set"), &m.set, Action::Set)?,
        add: headers(&format!("{at}.add"), &m.add, Action::Add)?,
        remove: m.remove.clone(),
    })
}

fn hostname(field: &str, h: Option<&String>) -> Result<String, SpecError> {
    match h {
        None => Ok(String::new()),
        Some(h) if dns_name(h) => Ok(h.clone()),
        Some(h) => Err(SpecError::new(
            field,
            format!("{h:?} is not a hostname (lowercase DNS name)"),
        )),
    }
}

/// `prefix_only`: every match of the rule is a path prefix, which is what a
/// ReplacePrefixMatch replaces.
fn path_modifier(
    at: &str,
    p: Option<&PathModifierDoc>,
    prefix_only: bool,
) -> Result<Option<api::PathModifier>, SpecError> {
    use api::path_modifier::Kind;
    let Some(p) = p else { return Ok(None) };
    let kind = match p.kind.as_str() {
        "ReplaceFullPath" => {
            let field = format!("{at}.replaceFullPath");
            let v = p
                .replace_full_path
                .as_deref()
                .ok_or_else(|| SpecError::new(&field, "missing for type ReplaceFullPath"))?;
            Kind::ReplaceFullPath(path_value(&field, v)?)
        }
        "ReplacePrefixMatch" => {
            let field = format!("{at}.replacePrefixMatch");
            let v = p
                .replace_prefix_match
                .as_deref()
                .ok_or_else(|| SpecError::new(&field, "missing for type ReplacePrefixMatch"))?;
            if !prefix_only {
                return Err(SpecError::new(
                    format!("{at}.type"),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
                ));
            }
            // Empty takes the prefix off (Gateway API's table: `/foo/bar`
            // matched by `/foo` becomes `/bar`).
            let v = if v.is_empty() {
                String::new()
            } else {
                path_value(&field, v)?
            };
            Kind::ReplacePrefixMatch(v)
        }
        other => return Err(unsupported(&format!("{at}.type"), other)),
    };
    Ok(Some(api::PathModifier { kind: Some(kind) }))
}

pub(super) fn filters(
    at: &str,
    fs: &[FilterDoc],
    matches: &[api::HttpMatch],
) -> Result<Vec<api::HttpFilter>, SpecError> {
    use api::http_filter::Kind;
    let prefix_only = matches
        .iter()
        .all(|m| matches!(m.path, None | Some(api::http_match::Path::Prefix(_))));
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, f) in fs.iter().enumerate() {
        let at = format!("{at}.filters[{i}]");
        // Gateway API: each of these at most once per rule.
        if !seen.insert(f.kind.as_str()) {
            return Err(SpecError::new(
                format!("{at}.type"),
                format!("{} is given twice in one rule", f.kind),
            ));
        }
        let missing = |name: &str| {
            SpecError::new(
                format!("{at}.{name}"),
                format!("missing for type {}", f.kind),
            )
        };
        let kind = match f.kind.as_str() {
            "RequestHeaderModifier" => {
                let m = f
                    .request_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("requestHeaderModifier"))?;
                Kind::RequestHeaderModifier(header_modifier(
                    &format!("{at}.requestHeaderModifier"),
                    m,
                )?)
            }
            "ResponseHeaderModifier" => {
                let m = f
                    .response_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("responseHeaderModifier"))?;
                Kind::ResponseHeaderModifier(header_modifier(
                    &format!("{at}.responseHeaderModifier"),
                    m,
                )?)
            }
            "URLRewrite" => {
                let r = f
                    .url_rewrite
                    .as_ref()
                    .ok_or_else(|| missing("urlRewrite"))?;
                let at = format!("{at}.urlRewrite");
                Kind::UrlRewrite(api::UrlRewrite {
                    hostname: hostname(&format!("{at}.hostname"), r.hostname.as_ref())?,
                    path: path_modifier(&format!("{at}.path"), r.path.as_ref(), prefix_only)?,
                })
            }
            "RequestRedirect" => {
                let r = f
                    .request_redirect
                    .as_ref()
                    .ok_or_else(|| missing("requestRedirect"))?;
                let at = format!("{at}.requestRedirect");
                let scheme = match r.scheme.as_deref() {
                    None => String::new(),
                    Some(s @ ("http" | "https")) => s.to_string(),
                    Some(s) => {
                        return Err(SpecError::new(
                            format!("{at}.scheme"),
                            format!("{s:?} is not http or https"),
                        ));
                    }
                };
                let status_code = match r.status_code {
                    None => defaults::DEFAULT_REDIRECT_STATUS,
                    // Gateway API's enum: 301 and 302 (core), 303, 307 and
                    // 308 (extended).
                    Some(c @ (301 | 302 | 303 | 307 | 308)) => {
                        u32::try_from(c).unwrap_or(defaults::DEFAULT_REDIRECT_STATUS)
                    }
                    Some(c) => {
                        return Err(SpecError::new(
                            format!("{at}.statusCode"),
                            format!("{c} is not 301, 302, 303, 307 or 308"),
                        ));
                    }
                };
                Kind::RequestRedirect(api::RequestRedirect {
                    scheme,
                    hostname: hostname(&format!("{at}.hostname"), r.hostname.as_ref())?,
                    port: match r.port {
                        None => 0,
                        Some(p) => u32::from(port(format!("{at}.port"), p)?),
                    },
                    path: path_modifier(&format!("{at}.path"), r.path.as_ref(), prefix_only)?,
                    status_code,
                })
            }
            other => {
                return Err(SpecError::new(
                    format!("{at}.type"),
                    format!(
                        "{other:?} is not a supported filter (RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestRedirect)"
                    ),
                ));
            }
        };
        out.push(api::HttpFilter { kind: Some(kind) });
    }
    if seen.contains("URLRewrite") && seen.contains("RequestRedirect") {
        return Err(SpecError::new(
            format!("{at}.filters"),
            "URLRewrite and RequestRedirect cannot be used together",
        ));
    }
    Ok(out)
}
