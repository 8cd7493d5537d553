//! HTTPRoute filters: header modifiers on the request and the response, URL
//! rewrites, and redirects (answered by the proxy, never sent to a backend).

use http::header::{HOST, LOCATION};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use strait_api::v1 as api;

use super::ViewError;
use crate::http::BoxBody;

#[derive(Clone, Debug, Default)]
pub struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

#[derive(Clone, Debug)]
pub enum PathModifier {
    Full(String),
    /// Replaces the part of the path the rule's prefix match matched.
    Prefix(String),
}

#[derive(Clone, Debug)]
pub struct Redirect {
    scheme: Option<http::uri::Scheme>,
    hostname: Option<String>,
    port: Option<u16>,
    path: Option<PathModifier>,
    status: StatusCode,
}

#[derive(Clone, Debug)]
pub struct Rewrite {
    hostname: Option<HeaderValue>,
    path: Option<PathModifier>,
}

/// A rule's filters, grouped by when they apply.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    pub request: Vec<HeaderModifier>,
    pub response: Vec<HeaderModifier>,
    pub rewrite: Option<Rewrite>,
    pub redirect: Option<Redirect>,
    /// A request filter sets or adds Host: known when parsed, not per request.
    sets_host: bool,
}

fn header_pairs(
    field: &str,
    hs: Vec<api::Header>,
) -> Result<Vec<(HeaderName, HeaderValue)>, ViewError> {
    hs.into_iter()
        .map(|h| {
            let n = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| ViewError::new(field, format!("bad header name {:?}", h.name)))?;
            let v = HeaderValue::from_str(&h.value)
                .map_err(|_| ViewError::new(field, format!("bad value for {:?}", h.name)))?;
            Ok((n, v))
        })
        .collect()
}

impl HeaderModifier {
    fn parse(field: &str, m: api::HeaderModifier) -> Result<Self, ViewError> {
        Ok(HeaderModifier {
            set: header_pairs(field, m.set)?,
            add: header_pairs(field, m.add)?,
            remove: m
                .remove
                .iter()
                .map(|n| {
                    HeaderName::from_bytes(n.as_bytes())
                        .map_err(|_| ViewError::new(field, format!("bad header name {n:?}")))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    fn names_host(&self) -> bool {
        self.set.iter().chain(&self.add).any(|(n, _)| n == HOST)
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

fn path_modifier(p: Option<api::PathModifier>) -> Option<PathModifier> {
    use api::path_modifier::Kind;
    match p.and_then(|p| p.kind)? {
        Kind::ReplaceFullPath(s) => Some(PathModifier::Full(s)),
        Kind::ReplacePrefixMatch(s) => Some(PathModifier::Prefix(s)),
    }
}

impl Filters {
    pub fn parse(fs: Vec<api::HttpFilter>) -> Result<Filters, ViewError> {
        use api::http_filter::Kind;
        let mut out = Filters::default();
        for f in fs {
            match f.kind {
                Some(Kind::RequestHeaderModifier(m)) => out
                    .request
                    .push(HeaderModifier::parse("requestHeaderModifier", m)?),
                Some(Kind::ResponseHeaderModifier(m)) => out
                    .response
                    .push(HeaderModifier::parse("responseHeaderModifier", m)?),
                Some(Kind::UrlRewrite(r)) => {
                    let hostname = if r.hostname.is_empty() {
                        None
                    } else {
                        Some(HeaderValue::from_str(&r.hostname).map_err(|_| {
                            ViewError::new("urlRewrite.hostname", format!("{:?}", r.hostname))
                        })?)
                    };
                    out.rewrite = Some(Rewrite {
                        hostname,
                        path: path_modifier(r.path),
                    });
                }
                Some(Kind::RequestRedirect(r)) => {
                    let scheme = match r.scheme.as_str() {
                        "" => None,
                        "http" => Some(http::uri::Scheme::HTTP),
                        "https" => Some(http::uri::Scheme::HTTPS),
                        s => {
                            return Err(ViewError::new(
                                "requestRedirect.scheme",
                                format!("{s:?} is not http or https"),
                            ));
                        }
                    };
                    // Gateway API's codes: 301 and 302 (its core), 303, 307
                    // and 308 (extended); 302 when none is given.
                    let status = match r.status_code {
                        0 | 302 => StatusCode::FOUND,
                        301 => StatusCode::MOVED_PERMANENTLY,
                        303 => StatusCode::SEE_OTHER,
                        307 => StatusCode::TEMPORARY_REDIRECT,
                        308 => StatusCode::PERMANENT_REDIRECT,
                        s => {
                            return Err(ViewError::new(
                                "requestRedirect.statusCode",
                                format!("{s} is not 301, 302, 303, 307 or 308"),
                            ));
                        }
                    };
                    out.redirect = Some(Redirect {
                        scheme,
                        hostname: (!r.hostname.is_empty()).then_some(r.hostname),
                        port: u16::try_from(r.port).ok().filter(|p| *p != 0),
                        path: path_modifier(r.path),
                        status,
                    });
                }
                // A kind a newer controller sends (prost leaves what it does
                // not know unset): skipped, the rule would do something else
                // than its route says. Refused, as any part not understood.
                None => {
                    return Err(ViewError::new(
                        "filters",
                        "a filter of a kind this proxy does not know (a newer controller's): upgrade the proxy",
                    ));
                }
            }
        }
        out.sets_host = out.request.iter().any(HeaderModifier::names_host);
        Ok(out)
    }

    /// Applies the request filters; `Err` carries the redirect to answer instead.
    pub fn on_request<B>(
        &self,
        req: &mut Request<B>,
        matched_prefix: Option<&str>,
    ) -> Result<(), Box<Response<BoxBody>>> {
        if let Some(r) = &self.redirect {
            return Err(Box::new(r.response(req, matched_prefix)));
        }
        for m in &self.request {
            m.apply(req.headers_mut());
        }
        // A filter that sets Host sets the authority too: an HTTP/2 request
        // goes with `:authority`, which must not differ from Host (RFC 9113
        // §8.3.1), and gRPC servers read only that.
        if self.sets_host
            && let Some(h) = req.headers().get(HOST).cloned()
        {
            set_authority(req, &h);
        }
        if let Some(r) = &self.rewrite {
            if let Some(h) = &r.hostname {
                req.headers_mut().insert(HOST, h.clone());
                set_authority(req, h);
            }
            if let Some(p) = &r.path {
                let new = rewrite_path(req.uri(), p, matched_prefix);
                let mut parts = req.uri().clone().into_parts();
                if let Ok(pq) = PathAndQuery::try_from(new) {
                    parts.path_and_query = Some(pq);
                    if let Ok(u) = Uri::from_parts(parts) {
                        *req.uri_mut() = u;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn on_response<B>(&self, rsp: &mut Response<B>) {
        for m in &self.response {
            m.apply(rsp.headers_mut());
        }
    }
}

/// The new path and query of `uri` under `p`.
fn rewrite_path(uri: &Uri, p: &PathModifier, matched_prefix: Option<&str>) -> String {
    let path = uri.path();
    let new_path = match p {
        PathModifier::Full(f) => f.clone(),
        PathModifier::Prefix(replacement) => {
            let prefix = matched_prefix.unwrap_or("/");
            let rest = if prefix == "/" {
                path
            } else {
                path.strip_prefix(prefix).unwrap_or(path)
            };
            let base = replacement.trim_end_matches('/');
            // A trailing slash after the prefix stays (Gateway API's table:
            // /foo/ with prefix /foo and replacement /xyz is /xyz/).
            if prefix != "/" && rest == "/" {
                return with_query(format!("{base}/"), uri);
            }
            // The one slash that joined prefix and rest: `/foo//bar` keeps
            // its second (an object key's, say).
            let rest = rest.strip_prefix('/').unwrap_or(rest);
            if rest.is_empty() {
                if base.is_empty() {
                    "/".into()
                } else {
                    base.into()
                }
            } else {
                format!("{base}/{rest}")
            }
        }
    };
    with_query(new_path, uri)
}

/// Makes a request's authority, where its URI has one, `host`. A CONNECT's
/// is its target, which a Host does not move.
fn set_authority<B>(req: &mut Request<B>, host: &http::HeaderValue) {
    if req.method() != http::Method::CONNECT
        && req.uri().authority().is_some()
        && let Ok(a) = Authority::try_from(host.as_bytes())
    {
        let mut parts = req.uri().clone().into_parts();
        parts.authority = Some(a);
        if let Ok(u) = Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
}

fn with_query(path: String, uri: &Uri) -> String {
    match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

impl Redirect {
    fn response<B>(&self, req: &Request<B>, matched_prefix: Option<&str>) -> Response<BoxBody> {
        let host_header = req
            .uri()
            .host()
            .map(str::to_string)
            .or_else(|| {
                // As an authority: an IPv6 literal keeps its brackets and colons.
                req.headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| h.parse::<http::uri::Authority>().ok())
                    .map(|a| a.host().to_string())
            })
            .unwrap_or_default();
        let scheme = self
            .scheme
            .clone()
            .or_else(|| req.uri().scheme().cloned())
            .unwrap_or(http::uri::Scheme::HTTP);
        let host = self.hostname.clone().unwrap_or(host_header);
        let default_port = if scheme == http::uri::Scheme::HTTPS {
            443
        } else {
            80
        };
        // No port given and no scheme: the port the request came to. To a
        // new hostname, the Service's (GAMMA's listener port), the one the app
        // addressed, not that of a local `--upstream` listener its Host may
        // name; to the same host, the port that host was reached on, as Host
        // says (the Service's when it says none). With a scheme, its own.
        let host_port = || {
            req.uri().port_u16().or_else(|| {
                let h = req.headers().get(HOST)?.to_str().ok()?;
                h.parse::<http::uri::Authority>().ok()?.port_u16()
            })
        };
        let dst_port = || {
            req.extensions()
                .get::<crate::http::Dst>()
                .map(|d| d.0.port())
        };
        let came_to = || match self.hostname {
            Some(_) => dst_port().or_else(host_port),
            None => host_port().or_else(dst_port),
        };
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => Some(p),
            (None, None) => came_to(),
            (None, Some(_)) => None,
        }
        .filter(|p| *p != default_port);
        let path = match &self.path {
            Some(p) => rewrite_path(req.uri(), p, matched_prefix),
            None => req
                .uri()
                .path_and_query()
                .map_or("/".into(), |pq| pq.as_str().to_string()),
        };
        let location = match port {
            Some(p) => format!("{scheme}://{host}:{p}{path}"),
            None => format!("{scheme}://{host}{path}"),
        };
        let mut rsp = Response::new(crate::http::empty());
        *rsp.status_mut() = self.status;
        if let Ok(v) = HeaderValue::from_str(&location) {
            rsp.headers_mut().insert(LOCATION, v);
        }
        rsp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_of_an_unknown_kind_is_refused_not_skipped() {
        let e = Filters::parse(vec![api::HttpFilter { kind: None }]).unwrap_err();
        assert!(format!("{e}").contains("does not know"), "{e}");
    }

    #[test]
    fn prefix_rewrites_keep_the_rest_of_the_path_and_the_query() {
        let uri: Uri = "/old/items/3?x=1".parse().unwrap();
        let p = PathModifier::Prefix("/new".into());
        assert_eq!(rewrite_path(&uri, &p, Some("/old")), "/new/items/3?x=1");
        let p = PathModifier::Prefix("/".into());
        assert_eq!(rewrite_path(&uri, &p, Some("/old")), "/items/3?x=1");
        let full = PathModifier::Full("/x".into());
        assert_eq!(rewrite_path(&uri, &full, None), "/x?x=1");
    }

    /// Gateway API's ReplacePrefixMatch table.
    #[test]
    fn prefix_rewrites_follow_the_gateway_api_table() {
        for (path, prefix, replacement, want) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/foo//bar", "/foo", "/xyz", "/xyz//bar"),
            ("/foo//", "/foo", "/xyz", "/xyz//"),
        ] {
            let uri: Uri = path.parse().unwrap();
            let p = PathModifier::Prefix(replacement.into());
            assert_eq!(
                rewrite_path(&uri, &p, Some(prefix)),
                want,
                "{path} {prefix} {replacement:?}"
            );
        }
    }

    fn redirect(r: api::RequestRedirect) -> Filters {
        Filters::parse(vec![api::HttpFilter {
            kind: Some(api::http_filter::Kind::RequestRedirect(r)),
        }])
        .unwrap()
    }

    /// A header filter that sets Host sets the authority an HTTP/2 request
    /// goes with as well: an HTTP/2 app's request is routed as an HTTP/1 one.
    #[test]
    fn a_filter_setting_host_sets_the_authority() {
        let f = Filters::parse(vec![api::HttpFilter {
            kind: Some(api::http_filter::Kind::RequestHeaderModifier(
                api::HeaderModifier {
                    set: vec![api::Header {
                        name: "Host".into(),
                        value: "api.internal".into(),
                    }],
                    ..Default::default()
                },
            )),
        }])
        .unwrap();
        let mut h2 = Request::post("http://web.shop:8080/pkg.Svc/Call")
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        f.on_request(&mut h2, None).unwrap();
        assert_eq!(h2.uri().authority().unwrap().as_str(), "api.internal");
        assert_eq!(h2.headers()[HOST], "api.internal");
        let mut h1 = Request::get("/a")
            .header(HOST, "web.shop:8080")
            .body(())
            .unwrap();
        f.on_request(&mut h1, None).unwrap();
        assert_eq!(h1.uri(), "/a");
        assert_eq!(h1.headers()[HOST], "api.internal");
        let mut connect = Request::connect("web.shop:443")
            .header(HOST, "web.shop:443")
            .body(())
            .unwrap();
        f.on_request(&mut connect, None).unwrap();
        assert_eq!(connect.uri(), "web.shop:443");
    }

    /// The `Location` that `f` answers a GET of `/a?b=c` with, sent with
    /// this `Host` to the Service `dst` when given.
    fn location(f: &Filters, host: &str, dst: Option<&str>) -> (StatusCode, String) {
        let mut req = Request::builder()
            .uri("/a?b=c")
            .header("host", host)
            .body(())
            .unwrap();
        if let Some(d) = dst {
            req.extensions_mut()
                .insert(crate::http::Dst(d.parse().unwrap()));
        }
        let rsp = f.on_request(&mut req, None).unwrap_err();
        let at = rsp.headers()[LOCATION].to_str().unwrap().to_string();
        (rsp.status(), at)
    }

    #[test]
    fn redirects_answer_with_a_location() {
        let f = redirect(api::RequestRedirect {
            scheme: "https".into(),
            status_code: 301,
            ..Default::default()
        });
        let (status, at) = location(&f, "web.shop:80", None);
        assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(at, "https://web.shop/a?b=c");
        // A Service reached by its IPv6 address, with and without a port.
        assert_eq!(location(&f, "[fd00::1]", None).1, "https://[fd00::1]/a?b=c");
        assert_eq!(
            location(&f, "[fd00::1]:8080", None).1,
            "https://[fd00::1]/a?b=c"
        );
        // Gateway API's extended codes, which keep the method (307, 308) or
        // make it a GET (303).
        for code in [303, 307, 308] {
            let f = redirect(api::RequestRedirect {
                status_code: code,
                ..Default::default()
            });
            let (status, at) = location(&f, "web.shop:80", None);
            assert_eq!(status.as_u16(), code as u16);
            assert_eq!(at, "http://web.shop/a?b=c");
        }
        let same = redirect(api::RequestRedirect {
            status_code: 302,
            ..Default::default()
        });
        assert_eq!(
            location(&same, "[fd00::1]", None).1,
            "http://[fd00::1]/a?b=c"
        );
    }

    /// Without a scheme or a port, a redirect keeps the port the request came
    /// to (the Service's), not HTTP's 80; with a scheme, that scheme's port.
    #[test]
    fn a_redirect_without_a_port_keeps_the_services() {
        let to_new_host = |scheme: &str| {
            redirect(api::RequestRedirect {
                scheme: scheme.into(),
                hostname: "new.shop".into(),
                status_code: 302,
                ..Default::default()
            })
        };
        for (scheme, host, want) in [
            ("", "web.shop:8080", "http://new.shop:8080/a?b=c"),
            ("", "web.shop", "http://new.shop/a?b=c"),
            ("", "web.shop:80", "http://new.shop/a?b=c"),
            ("https", "web.shop:8080", "https://new.shop/a?b=c"),
        ] {
            let (_, at) = location(&to_new_host(scheme), host, None);
            assert_eq!(at, want, "{scheme:?} {host}");
        }
        // To a new host, the Service the app addressed decides, not the Host
        // of a local listener (`--upstream 127.0.0.1:9000=web.shop:8080`),
        // nor its absence.
        for host in ["127.0.0.1:9000", "web.shop"] {
            let (_, at) = location(&to_new_host(""), host, Some("web.shop:8080"));
            assert_eq!(at, "http://new.shop:8080/a?b=c", "{host}");
        }
        // To the same host, the port that host was reached on.
        let same_host = redirect(api::RequestRedirect {
            status_code: 302,
            ..Default::default()
        });
        for (host, want) in [
            ("127.0.0.1:9000", "http://127.0.0.1:9000/a?b=c"),
            ("web.shop", "http://web.shop:8080/a?b=c"),
        ] {
            let (_, at) = location(&same_host, host, Some("web.shop:8080"));
            assert_eq!(at, want, "{host}");
        }
    }
}
