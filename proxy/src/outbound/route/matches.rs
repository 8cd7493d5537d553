//! HTTPRoute matches: what a request must look like to take a rule, and the order
//! in which matches are tried (Gateway API precedence).

use std::cmp::Ordering;

use http::Request;
use regex::Regex;
use strait_api::v1 as api;

use super::ViewError;

#[derive(Clone, Debug)]
pub enum PathMatch {
    Exact(String),
    /// Matches the prefix on whole path segments: `/api` matches `/api` and
    /// `/api/x`, not `/apix` (Gateway API).
    Prefix(String),
    Regex(Regex),
}

#[derive(Clone, Debug)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn is_match(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => e == v,
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// A prefix's length as written, which ranks it ("/api/" over "/api"),
    /// though both match the same segments.
    pub prefix_len: usize,
    pub method: Option<http::Method>,
    pub headers: Vec<(http::HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    /// A GRPCRoute's match: the characters of the service, then of the
    /// method, it names, which rank it whatever its path's form.
    pub grpc: Option<(u32, u32)>,
}

impl Default for RouteMatch {
    /// No match given: a prefix match on "/", which every request satisfies.
    fn default() -> Self {
        RouteMatch {
            path: PathMatch::Prefix("/".into()),
            prefix_len: 1,
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
            grpc: None,
        }
    }
}

/// Regexes match the whole value (as RE2 full matches in Gateway API
/// implementations), and are bounded in size: they come from the network.
fn regex(field: &str, pattern: &str) -> Result<Regex, ViewError> {
    // Alone first: a pattern with unbalanced groups (`/a)|(.*`) would otherwise
    // compile inside the anchoring group and escape it.
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| ViewError::new(field, format!("bad regular expression {pattern:?}: {e}")))?;
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| ViewError::new(field, format!("bad regular expression {pattern:?}: {e}")))
}

fn value(field: &str, exact: Option<String>, re: Option<String>) -> Result<ValueMatch, ViewError> {
    match (exact, re) {
        (Some(e), _) => Ok(ValueMatch::Exact(e)),
        (None, Some(r)) => Ok(ValueMatch::Regex(regex(field, &r)?)),
        (None, None) => Err(ViewError::new(field, "no value to match")),
    }
}

impl RouteMatch {
    pub fn parse(m: api::HttpMatch) -> Result<RouteMatch, ViewError> {
        use api::http_match::Path;
        let prefix_len = match &m.path {
            Some(Path::Prefix(p)) => p.len(),
            _ => 1,
        };
        let path = match m.path {
            None => PathMatch::Prefix("/".into()),
            Some(Path::Exact(p)) => PathMatch::Exact(p),
            Some(Path::Prefix(p)) => {
                // "/api/" and "/api" are one prefix on segments.
                let trimmed = p.trim_end_matches('/');
                PathMatch::Prefix(if trimmed.is_empty() {
                    "/".into()
                } else {
                    trimmed.into()
                })
            }
            Some(Path::Regex(r)) => PathMatch::Regex(regex("path", &r)?),
        };
        let method = if m.method.is_empty() {
            None
        } else {
            Some(
                http::Method::from_bytes(m.method.as_bytes())
                    .map_err(|_| ViewError::new("method", format!("{:?}", m.method)))?,
            )
        };
        let mut headers = Vec::new();
        for h in m.headers {
            let name = http::HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| ViewError::new("headers", format!("bad name {:?}", h.name)))?;
            use api::header_match::Value;
            let (e, r) = match h.value {
                Some(Value::Exact(e)) => (Some(e), None),
                Some(Value::Regex(r)) => (None, Some(r)),
                None => (None, None),
            };
            let v = value("headers", e, r)?;
            // Gateway API: of entries naming one header (names are
            // case-insensitive), only the first counts.
            if !headers.iter().any(|(n, _)| *n == name) {
                headers.push((name, v));
            }
        }
        let mut query = Vec::new();
        for q in m.query_params {
            use api::query_param_match::Value;
            let (e, r) = match q.value {
                Some(Value::Exact(e)) => (Some(e), None),
                Some(Value::Regex(r)) => (None, Some(r)),
                None => (None, None),
            };
            let v = value("queryParams", e, r)?;
            // As for headers; query names are compared exactly.
            if !query.iter().any(|(n, _)| *n == q.name) {
                query.push((q.name, v));
            }
        }
        Ok(RouteMatch {
            path,
            prefix_len,
            method,
            headers,
            query,
            grpc: m.grpc_rank.map(|r| (r.service_chars, r.method_chars)),
        })
    }

    pub fn is_match<B>(&self, req: &Request<B>) -> bool {
        if let Some(m) = &self.method
            && req.method() != m
        {
            return false;
        }
        let path = req.uri().path();
        let path_ok = match &self.path {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                p == "/"
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
        };
        if !path_ok {
            return false;
        }
        for (name, want) in &self.headers {
            // A repeated header matches when any one of its values does; in
            // practice a match names single-valued headers.
            let mut values = req.headers().get_all(name).iter();
            let ok = values.any(|v| v.to_str().is_ok_and(|v| want.is_match(v)))
                // HTTP/2 and gRPC carry the host in `:authority`, which GAMMA
                // users match as `Host` (a match cannot name `:authority`).
                || (name == http::header::HOST
                    && !req.headers().contains_key(http::header::HOST)
                    && req.uri().authority().is_some_and(|a| want.is_match(a.as_str())));
            if !ok {
                return false;
            }
        }
        if !self.query.is_empty() {
            let q = req.uri().query().unwrap_or("");
            for (name, want) in &self.query {
                // The first occurrence of a parameter is the one matched (Gateway API).
                let found = q
                    .split('&')
                    .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v);
                if !found.is_some_and(|v| want.is_match(v)) {
                    return false;
                }
            }
        }
        true
    }

    /// Gateway API precedence, most specific first: an exact path, then a regular
    /// expression (implementation-specific in the spec: before prefixes, so a
    /// regex rule is not shadowed by a catch-all), then the longest prefix; then a
    /// method match, more header matches, more query matches. GRPCRoute's
    /// matches rank by the longer service named, then method, then more header
    /// matches (a port's rules are all of one kind; were they not, gRPC's would
    /// go first, so that the order stays total). Equal matches keep the order of
    /// their routes and rules (a stable sort).
    pub fn precedence(&self, other: &RouteMatch) -> Ordering {
        match (self.grpc, other.grpc) {
            (Some(a), Some(b)) => {
                return b
                    .cmp(&a)
                    .then_with(|| other.headers.len().cmp(&self.headers.len()));
            }
            (Some(_), None) => return Ordering::Less,
            (None, Some(_)) => return Ordering::Greater,
            (None, None) => {}
        }
        let rank = |m: &RouteMatch| match &m.path {
            PathMatch::Exact(_) => (0, 0),
            PathMatch::Regex(_) => (1, 0),
            PathMatch::Prefix(_) => (2, usize::MAX - m.prefix_len),
        };
        rank(self)
            .cmp(&rank(other))
            .then_with(|| other.method.is_some().cmp(&self.method.is_some()))
            .then_with(|| other.headers.len().cmp(&self.headers.len()))
            .then_with(|| other.query.len().cmp(&self.query.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn parse(path: Option<api::http_match::Path>) -> RouteMatch {
        RouteMatch::parse(api::HttpMatch {
            path,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn prefixes_match_whole_segments() {
        use api::http_match::Path;
        let m = parse(Some(Path::Prefix("/api/".into())));
        assert!(m.is_match(&req("GET", "/api", &[])));
        assert!(m.is_match(&req("GET", "/api/v1?x=1", &[])));
        assert!(!m.is_match(&req("GET", "/apix", &[])));
        let all = parse(None);
        assert!(all.is_match(&req("GET", "/anything", &[])));
    }

    #[test]
    fn regexes_match_the_whole_path() {
        use api::http_match::Path;
        assert!(
            RouteMatch::parse(api::HttpMatch {
                path: Some(Path::Regex("/a)|(.*".into())),
                ..Default::default()
            })
            .is_err(),
            "a pattern cannot escape its anchors"
        );
        let m = parse(Some(Path::Regex("/v[0-9]+/items".into())));
        assert!(m.is_match(&req("GET", "/v2/items", &[])));
        assert!(!m.is_match(&req("GET", "/v2/items/3", &[])));
        assert!(
            RouteMatch::parse(api::HttpMatch {
                path: Some(Path::Regex("(".into())),
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn headers_query_and_method_all_must_hold() {
        let m = RouteMatch::parse(api::HttpMatch {
            method: "POST".into(),
            headers: vec![api::HeaderMatch {
                name: "X-Canary".into(),
                value: Some(api::header_match::Value::Exact("true".into())),
            }],
            query_params: vec![api::QueryParamMatch {
                name: "v".into(),
                value: Some(api::query_param_match::Value::Regex("[12]".into())),
            }],
            ..Default::default()
        })
        .unwrap();
        assert!(m.is_match(&req("POST", "/?v=2&w=1", &[("x-canary", "true")])));
        assert!(!m.is_match(&req("GET", "/?v=2", &[("x-canary", "true")])));
        assert!(!m.is_match(&req("POST", "/?v=3", &[("x-canary", "true")])));
        assert!(!m.is_match(&req("POST", "/?v=2", &[("x-canary", "false")])));
        assert!(!m.is_match(&req("POST", "/?v=2", &[])));
    }

    #[test]
    fn of_entries_naming_one_field_the_first_counts() {
        let exact = |v: &str| Some(api::header_match::Value::Exact(v.into()));
        let m = RouteMatch::parse(api::HttpMatch {
            headers: vec![
                api::HeaderMatch {
                    name: "X-V".into(),
                    value: exact("a"),
                },
                api::HeaderMatch {
                    name: "x-v".into(),
                    value: exact("b"),
                },
            ],
            query_params: ["1", "2"]
                .map(|v| api::QueryParamMatch {
                    name: "q".into(),
                    value: Some(api::query_param_match::Value::Exact(v.into())),
                })
                .into(),
            ..Default::default()
        })
        .unwrap();
        assert!(m.is_match(&req("GET", "/?q=1", &[("x-v", "a")])));
        assert!(!m.is_match(&req("GET", "/?q=1", &[("x-v", "b")])));
        assert!(!m.is_match(&req("GET", "/?q=2", &[("x-v", "a")])));
    }

    #[test]
    fn a_host_match_reads_the_authority_of_http_2() {
        let m = RouteMatch::parse(api::HttpMatch {
            headers: vec![api::HeaderMatch {
                name: "host".into(),
                value: Some(api::header_match::Value::Exact("api.shop:8080".into())),
            }],
            ..Default::default()
        })
        .unwrap();
        let h2 = |uri: &str| {
            let mut r = req("POST", uri, &[]);
            *r.version_mut() = http::Version::HTTP_2;
            r
        };
        assert!(m.is_match(&h2("http://api.shop:8080/pkg.Svc/Call")));
        assert!(!m.is_match(&h2("http://other.shop:8080/pkg.Svc/Call")));
        assert!(m.is_match(&req("GET", "/", &[("host", "api.shop:8080")])));
        assert!(!m.is_match(&req(
            "GET",
            "http://api.shop:8080/",
            &[("host", "other.shop:8080")]
        )));
    }

    #[test]
    fn more_specific_matches_come_first() {
        use api::http_match::Path;
        let exact = parse(Some(Path::Exact("/a".into())));
        let long = parse(Some(Path::Prefix("/a/b".into())));
        let short = parse(Some(Path::Prefix("/a".into())));
        let re = parse(Some(Path::Regex("/a.*".into())));
        let mut with_header = parse(Some(Path::Prefix("/a".into())));
        with_header.headers.push((
            http::HeaderName::from_static("x"),
            ValueMatch::Exact("1".into()),
        ));
        let mut v = [&short, &with_header, &long, &re, &exact];
        v.sort_by(|a, b| a.precedence(b));
        let order: Vec<String> = v
            .iter()
            .map(|m| format!("{:?}/{}", m.path, m.headers.len()))
            .collect();
        assert!(matches!(v[0].path, PathMatch::Exact(_)), "{order:?}");
        assert!(matches!(v[1].path, PathMatch::Regex(_)), "{order:?}");
        assert!(
            matches!(&v[2].path, PathMatch::Prefix(p) if p == "/a/b"),
            "{order:?}"
        );
        assert_eq!(v[3].headers.len(), 1, "{order:?}");

        // Ranked by the prefix as written: "/a/" is the longer, though it
        // matches what "/a" does.
        let slash = parse(Some(Path::Prefix("/a/".into())));
        assert_eq!(slash.precedence(&short), Ordering::Less);
        assert_eq!(short.precedence(&slash), Ordering::Greater);
    }
}
