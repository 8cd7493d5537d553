//! Request and response hygiene between hops (RFC 9110 §7.6.1): hop-by-hop headers
//! are removed, and ambiguous message framing (request smuggling) is refused.

use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, StatusCode, Version};

use super::BoxBody;
use super::conn_guard::{HeadFault, OverCap};
use super::error::error_response;
use super::upgrade;
use crate::telemetry::{Direction, Metrics};

#[derive(Clone, Debug)]
pub struct NormalizeLayer {
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl NormalizeLayer {
    pub fn new(metrics: Arc<Metrics>, direction: Direction) -> Self {
        Self { metrics, direction }
    }
}

impl<S> tower::Layer<S> for NormalizeLayer {
    type Service = Normalize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Normalize {
            inner,
            metrics: self.metrics.clone(),
            direction: self.direction,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Normalize<S> {
    inner: S,
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl<S, B> tower::Service<Request<B>> for Normalize<S>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<BoxBody>, S::Error>>, NormalizeFuture<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let head = req.method() == Method::HEAD;
        if let Some(over) = req.extensions().get::<OverCap>() {
            // Shed at once: queued, it would hold what the cap keeps free.
            let (reason, text) = match over {
                OverCap::Direction => (
                    "in_flight_limit",
                    "too many requests in flight (not processed)",
                ),
                OverCap::Caller => (
                    "source_in_flight_limit",
                    "too many requests in flight from this caller (not processed)",
                ),
                OverCap::Memory => (
                    "memory_pressure",
                    "the proxy is near its memory limit (not processed)",
                ),
            };
            self.metrics.reject_http(self.direction, reason);
            strait_otel::sampled!(
                warn,
                direction = self.direction.as_str(),
                reason,
                "{text}: answered 503"
            );
            // "Not processed": a calling proxy passes this one over for a
            // while, as for a 429, and may send the request elsewhere, rather
            // than take an overloaded proxy for a failing app and eject it.
            let rsp = error_response(reason, StatusCode::SERVICE_UNAVAILABLE, text);
            return Either::Left(std::future::ready(Ok(to_method(rsp, head))));
        }
        if let Err(refused) = check_head(&mut req) {
            // Each of these lets two parsers read different requests from the
            // same bytes; refuse every reading and close the connection.
            self.metrics.reject_http(self.direction, refused.reason());
            strait_otel::sampled!(
                info,
                direction = self.direction.as_str(),
                reason = refused.reason(),
                "refused request: {refused}"
            );
            let mut rsp = error_response("rejected", refused.status(), refused.message());
            rsp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return Either::Left(std::future::ready(Ok(to_method(rsp, head))));
        }
        let keep_upgrade = upgrade::is_upgrade_request(&req);
        let keep_alive_10 =
            req.version() == http::Version::HTTP_10 && asks_keep_alive(req.headers());
        strip_hop_by_hop(req.headers_mut(), keep_upgrade);
        Either::Right(NormalizeFuture {
            inner: self.inner.call(req),
            keep_alive_10,
            head,
        })
    }
}

pin_project_lite::pin_project! {
    /// The request's future, its response's hop-by-hop fields stripped.
    pub struct NormalizeFuture<F> {
        #[pin]
        inner: F,
        // An HTTP/1.0 client that asked to keep its connection: hyper keeps
        // it only if the response says so.
        keep_alive_10: bool,
        head: bool,
    }
}

impl<F, E> Future for NormalizeFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut rsp = std::task::ready!(this.inner.poll(cx))?;
        if !only_chunked(rsp.headers()) {
            // Its body is still in a coding the client was not told of.
            strait_otel::sampled!(
                info,
                "an upstream's response has a transfer coding other than chunked; answered 502"
            );
            rsp = error_response(
                "upstream",
                StatusCode::BAD_GATEWAY,
                "the upstream's response has a transfer coding other than chunked",
            );
            rsp.extensions_mut().insert(super::error::CloseClient);
        }
        let keep = rsp.status() == StatusCode::SWITCHING_PROTOCOLS;
        // The proxy's own answer to a client's broken body, or for a
        // destination that could not be reached, closes the connection, and
        // the client is told so (RFC 9110 §15.5.9).
        let close = rsp
            .extensions()
            .get::<super::error::CloseClient>()
            .is_some();
        response_framing(rsp.headers_mut());
        strip_hop_by_hop(rsp.headers_mut(), keep);
        if close {
            rsp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        } else if *this.keep_alive_10 && framed_by_length(&rsp) {
            // A response of unknown length ends with the connection, as
            // HTTP/1.0 frames it: that one is not kept.
            rsp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("keep-alive"),
            );
        }
        Poll::Ready(Ok(to_method(rsp, *this.head)))
    }
}

/// A response to HEAD has no content (RFC 9110 §9.3.2). hyper's HTTP/1
/// server leaves it out, but its HTTP/2 server sends the body as DATA, which
/// the caller's HTTP/2 stack takes for a protocol error and resets the stream
/// over (and a calling proxy, after 1,024 of them on one connection to a
/// peer, tears down the connection with every stream on it). The proxy's own
/// answers have a body; an upstream's answer to HEAD has none. The length
/// the body would have had is kept, as a GET's answer would give it.
fn to_method(mut rsp: Response<BoxBody>, head: bool) -> Response<BoxBody> {
    if !head {
        return rsp;
    }
    let length = http_body::Body::size_hint(rsp.body()).exact();
    let headers = rsp.headers_mut();
    if let Some(n) = length.filter(|n| *n > 0)
        && !headers.contains_key(header::CONTENT_LENGTH)
        && !headers.contains_key(header::TRANSFER_ENCODING)
    {
        headers.insert(header::CONTENT_LENGTH, n.into());
    }
    *rsp.body_mut() = super::empty();
    rsp
}

/// Whether `Connection` asks to keep the connection (HTTP/1.0's opt-in).
fn asks_keep_alive(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|o| o.trim().eq_ignore_ascii_case("keep-alive"))
}

/// A response whose length an HTTP/1.0 client can know before it ends.
fn framed_by_length<B: http_body::Body>(rsp: &Response<B>) -> bool {
    rsp.headers().contains_key(header::CONTENT_LENGTH)
        || rsp.body().size_hint().exact().is_some()
        || matches!(
            rsp.status(),
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        )
}

/// A response's framing as the next hop must read it. One framed both ways
/// was read as chunked (RFC 9112 §6.3), and its Content-Length, which an
/// intermediary must remove, would frame what is sent on: the body cut
/// short, with the connection kept as if it were whole. A list of one length
/// (`5, 5`), which hyper takes, is sent as that length: HTTP/2 refuses a list.
fn response_framing(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
        return;
    }
    if let Some(n) = listed_length(headers) {
        headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(n));
    }
}

/// Whether Transfer-Encoding, if any, is `chunked` alone: the one coding
/// hyper decodes, so the only one whose header may be dropped.
fn only_chunked(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match codings.next() {
        None => true,
        Some(first) => first.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// The length Content-Length gives when it is a list (several fields, or
/// commas) whose values all agree; `None` when it is one value, or absent.
fn listed_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_none() && !first.as_bytes().contains(&b',') {
        return None;
    }
    let mut n = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().ok()?.split(',') {
            let m: u64 = part.trim().parse().ok()?;
            if n.is_some_and(|n| n != m) {
                return None;
            }
            n = Some(m);
        }
    }
    n
}

/// Why a request head is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadRefusal {
    #[error("conflicting Content-Length and Transfer-Encoding")]
    ConflictingFraming,
    #[error("a line of the request head ends in a bare LF, not CRLF")]
    BareLf,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("an HTTP/1.1 request without a Host header")]
    MissingHost,
    #[error("a request target in authority form (host:port) outside CONNECT")]
    AuthorityForm,
    #[error("a transfer coding other than chunked")]
    TransferCoding,
}

impl HeadRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            HeadRefusal::ConflictingFraming => "smuggling",
            HeadRefusal::BareLf => "bare_lf",
            HeadRefusal::DuplicateHost => "duplicate_host",
            HeadRefusal::MissingHost => "missing_host",
            HeadRefusal::AuthorityForm => "authority_form",
            HeadRefusal::TransferCoding => "transfer_coding",
        }
    }

    /// 501 for a coding nobody here can decode (RFC 9112 §6.1), as a server
    /// would answer; 400 for a malformed head.
    fn status(self) -> StatusCode {
        match self {
            HeadRefusal::TransferCoding => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn message(self) -> &'static str {
        match self {
            HeadRefusal::ConflictingFraming => "conflicting Content-Length and Transfer-Encoding",
            HeadRefusal::BareLf => "request head lines must end in CRLF",
            HeadRefusal::DuplicateHost => "more than one Host header",
            HeadRefusal::MissingHost => "HTTP/1.1 request without a Host header",
            HeadRefusal::AuthorityForm => "a request target of host:port is for CONNECT only",
            HeadRefusal::TransferCoding => "transfer codings other than chunked are not supported",
        }
    }
}

/// RFC 9112 framing of a request head: one Host (and one at all in HTTP/1.1),
/// CRLF line ends, not both Content-Length and Transfer-Encoding. An
/// absolute-form target's authority is the one that counts (§3.2.2): Host is
/// rewritten to it, so that the next hop cannot read another.
pub fn check_head<B>(req: &mut Request<B>) -> Result<(), HeadRefusal> {
    match req.extensions().get::<HeadFault>() {
        Some(HeadFault::ConflictingFraming) => return Err(HeadRefusal::ConflictingFraming),
        Some(HeadFault::BareLf) => return Err(HeadRefusal::BareLf),
        None => {}
    }
    let h = req.headers();
    if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
        return Err(HeadRefusal::ConflictingFraming);
    }
    // hyper decodes the chunked framing and leaves any other coding
    // (`gzip, chunked`) on the bytes, and Transfer-Encoding is not sent on:
    // the app would read gzip as the body.
    if !only_chunked(h) {
        return Err(HeadRefusal::TransferCoding);
    }
    // A list of one length (`5, 5`), which hyper takes, goes on as that
    // length: the HTTP/2 hop between proxies refuses a list.
    if let Some(n) = listed_length(h) {
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, header::HeaderValue::from(n));
    }
    let h = req.headers();
    let mut hosts = h.get_all(header::HOST).iter();
    let (first, second) = (hosts.next().is_some(), hosts.next().is_some());
    if second {
        return Err(HeadRefusal::DuplicateHost);
    }
    let h1 = matches!(req.version(), Version::HTTP_11 | Version::HTTP_10);
    if h1 && req.method() != Method::CONNECT {
        // `GET example.com:80 HTTP/1.1` (RFC 9112 §3.2.3: CONNECT's form
        // only) would have gone on as `GET /`, a request nobody sent.
        if req.uri().authority().is_some() && req.uri().scheme().is_none() {
            return Err(HeadRefusal::AuthorityForm);
        }
        if req.uri().authority().is_some() {
            host_from_authority(req);
        } else if !first && req.version() == Version::HTTP_11 {
            return Err(HeadRefusal::MissingHost);
        }
    } else if !h1 && first {
        // HTTP/2: `:authority` is the target (the destination, the next hop
        // and an HTTP/2 app read it); a `host` naming another would pick a
        // route's Host rule for a request the app serves as the authority's
        // (RFC 9113 §8.3.1).
        host_from_authority(req);
    }
    Ok(())
}

/// Makes Host name the request target's authority, when it has one.
fn host_from_authority<B>(req: &mut Request<B>) {
    let Some(a) = req.uri().authority() else {
        return;
    };
    let host = super::host_port(a);
    if req.headers().get(header::HOST).map(|v| v.as_bytes()) != Some(host.as_bytes())
        && let Ok(v) = header::HeaderValue::from_str(&host)
    {
        req.headers_mut().insert(header::HOST, v);
    }
}

static HOP_BY_HOP: [HeaderName; 5] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
];

/// Removes the fields that describe one connection rather than the message: those
/// named by `Connection`, and the standard hop-by-hop set. An upgrade keeps
/// `Connection: upgrade` and `Upgrade`, which the next hop needs to upgrade too;
/// `TE: trailers` is kept because gRPC over HTTP/2 requires it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one pass over the few names present
    // instead of eight lookups, each hashing a name (twice per request per proxy).
    if !keep_upgrade
        && headers
            .keys()
            .all(|n| n != header::CONNECTION && !HOP_BY_HOP.contains(n))
    {
        return;
    }
    // Only the options that name a field present are made into names: an
    // option that names none (the usual `close`) costs no allocation.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| headers.contains_key(*n))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    // A client that accepts trailers says so among its codings, and names TE
    // in Connection as RFC 9110 asks: the app gets `TE: trailers` whatever
    // else came with it (and HTTP/2 allows no other value).
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for n in named {
        if (keep_upgrade && n == header::UPGRADE) || protected(&n) || n == header::TE {
            continue;
        }
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        if keep_upgrade && n == header::UPGRADE {
            continue;
        }
        headers.remove(n);
    }
    if te_trailers {
        headers.insert(header::TE, header::HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
    } else {
        headers.remove(header::CONNECTION);
    }
}

/// Fields a `Connection` header may not name away: Host, which every HTTP/1.1
/// request needs, strait's own, which the proxies act on (a client must not
/// make one hop drop what the next relies on), and the trace context, which
/// the proxy has written for the next hop by then.
fn protected(n: &HeaderName) -> bool {
    n == header::HOST
        || n.as_str().starts_with("strait-")
        || strait_otel::propagate::is_context_header(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// A list of one length goes on as that length, on requests and
    /// responses: the HTTP/2 hop between proxies refuses a list, and the
    /// message would fail only inside the mesh.
    #[test]
    fn a_list_of_one_length_goes_on_as_that_length() {
        let mut rsp = HeaderMap::new();
        rsp.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5, 5"));
        response_framing(&mut rsp);
        assert_eq!(rsp[header::CONTENT_LENGTH], "5");
        let mut req = Request::post("/")
            .header(header::HOST, "web")
            .header(header::CONTENT_LENGTH, "7")
            .header(header::CONTENT_LENGTH, "7")
            .body(())
            .unwrap();
        check_head(&mut req).unwrap();
        let lengths: Vec<_> = req
            .headers()
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .collect();
        assert_eq!(lengths, ["7"]);
        // One value, or values that disagree (hyper refuses those), are left.
        let mut one = HeaderMap::new();
        one.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        response_framing(&mut one);
        assert_eq!(one[header::CONTENT_LENGTH], "12");
        assert_eq!(listed_length(&one), None);
        let mut split = HeaderMap::new();
        split.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5, 6"));
        assert_eq!(listed_length(&split), None);
    }

    #[test]
    fn connection_cannot_name_host_strait_or_trace_headers_away() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("host, strait-target-port, traceparent, x-gone"),
        );
        h.insert(header::HOST, HeaderValue::from_static("web"));
        h.insert("traceparent", HeaderValue::from_static("00-1-2-01"));
        h.insert("strait-target-port", HeaderValue::from_static("8080"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[header::HOST], "web");
        assert_eq!(h["strait-target-port"], "8080");
        assert_eq!(h["traceparent"], "00-1-2-01");
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn host_rules_of_rfc_9112() {
        let req = |uri: &str, hosts: &[&str]| {
            let mut b = Request::builder().uri(uri).version(Version::HTTP_11);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).unwrap()
        };
        assert_eq!(
            check_head(&mut req("/", &["a", "b"])),
            Err(HeadRefusal::DuplicateHost)
        );
        assert_eq!(
            check_head(&mut req("/", &[])),
            Err(HeadRefusal::MissingHost)
        );
        let mut abs = req("http://web.test:8080/x", &["evil"]);
        assert_eq!(check_head(&mut abs), Ok(()));
        assert_eq!(abs.headers()[header::HOST], "web.test:8080");
        let mut abs = req("http://web.test/x", &[]);
        assert_eq!(check_head(&mut abs), Ok(()));
        assert_eq!(abs.headers()[header::HOST], "web.test");
        assert_eq!(
            check_head(&mut req("web.test:80", &["web.test"])),
            Err(HeadRefusal::AuthorityForm)
        );
        let mut abs = req("http://user:secret@web.test:81/x", &[]);
        assert_eq!(check_head(&mut abs), Ok(()));
        assert_eq!(abs.headers()[header::HOST], "web.test:81", "no userinfo");
        let mut h10 = req("/", &[]);
        *h10.version_mut() = Version::HTTP_10;
        assert_eq!(check_head(&mut h10), Ok(()), "HTTP/1.0 needs no Host");
    }

    /// Over HTTP/2 the target is `:authority`, which the destination, the
    /// next hop and an HTTP/2 app read: a `host` field naming another is
    /// made to agree (RFC 9113 §8.3.1), so that a route matching on Host
    /// picks the rule for the request the app serves.
    #[test]
    fn an_http2_host_field_agrees_with_the_authority() {
        let h2 = |uri: &str, host: Option<&str>| {
            let mut b = Request::builder().uri(uri).version(Version::HTTP_2);
            if let Some(h) = host {
                b = b.header(header::HOST, h);
            }
            b.body(()).unwrap()
        };
        let mut other = h2("http://web.shop/x", Some("admin.shop"));
        assert_eq!(check_head(&mut other), Ok(()));
        assert_eq!(other.headers()[header::HOST], "web.shop");
        let mut same = h2("http://web.shop:8080/x", Some("web.shop:8080"));
        assert_eq!(check_head(&mut same), Ok(()));
        assert_eq!(same.headers()[header::HOST], "web.shop:8080");
        let mut none = h2("http://web.shop/x", None);
        assert_eq!(check_head(&mut none), Ok(()));
        assert!(!none.headers().contains_key(header::HOST), "none added");
        let mut host_only = h2("/x", Some("web.shop"));
        assert_eq!(check_head(&mut host_only), Ok(()));
        assert_eq!(host_only.headers()[header::HOST], "web.shop");
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-app"], "kept");

        // Options in any case, across several Connection fields; `close` is
        // also a (reserved) field name and goes too when present.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static(" X-Secret ,x-other"),
        );
        h.insert("close", HeaderValue::from_static("1"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn each_hop_by_hop_field_alone_goes_and_the_rest_stay() {
        let ordinary = || {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("web"));
            h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            h.insert("x-keep-alive", HeaderValue::from_static("1"));
            h
        };
        let mut h = ordinary();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, ordinary());
        for name in HOP_BY_HOP.iter().chain([&header::CONNECTION]) {
            let mut h = ordinary();
            h.insert(name, HeaderValue::from_static("gzip"));
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h, ordinary(), "{name}");
        }
        // An upgrade is told to the next hop even when nothing else is there.
        let mut h = ordinary();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn keeps_upgrade_and_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::TE], "trailers");
    }

    /// A client asking for trailers as RFC 9110 has it (TE named in
    /// Connection, trailers among other codings, over several lines) still
    /// gets them: hyper apps send trailers only to `TE: trailers`.
    #[test]
    fn te_trailers_is_kept_however_it_is_asked() {
        for (connection, te) in [
            (Some("TE"), &["trailers"][..]),
            (Some("keep-alive, te"), &["trailers"][..]),
            (None, &["trailers, deflate"][..]),
            (None, &["gzip", "Trailers"][..]),
        ] {
            let mut h = HeaderMap::new();
            if let Some(c) = connection {
                h.insert(header::CONNECTION, HeaderValue::from_static(c));
            }
            for t in te {
                h.append(header::TE, HeaderValue::from_static(t));
            }
            strip_hop_by_hop(&mut h, false);
            let kept: Vec<_> = h.get_all(header::TE).iter().collect();
            assert_eq!(kept, ["trailers"], "{connection:?} {te:?}");
            assert!(!h.contains_key(header::CONNECTION));
        }
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip, deflate"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key(header::TE));
    }

    /// The proxy's own answer to a client's broken body tells the client
    /// the connection closes, though the response's hop-by-hop fields go; a
    /// refusal of one request (a bad Host) leaves the connection open.
    #[tokio::test]
    async fn the_proxy_s_own_close_survives_the_stripping() {
        use crate::http::error::ProxyError;
        use tower::{Layer, Service, ServiceExt};
        async fn through_normalize(e: fn() -> ProxyError) -> Response<BoxBody> {
            let inner = tower::service_fn(move |_req: Request<()>| async move {
                Ok::<_, std::convert::Infallible>(e().into_response())
            });
            let mut svc = NormalizeLayer::new(
                crate::telemetry::metrics::Metrics::new(),
                crate::telemetry::metrics::Direction::Inbound,
            )
            .layer(inner);
            let req = Request::get("/")
                .header(header::HOST, "a")
                .body(())
                .unwrap();
            svc.ready().await.unwrap().call(req).await.unwrap()
        }
        let rsp =
            through_normalize(|| ProxyError::ClientBodyStalled(std::time::Duration::from_secs(30)))
                .await;
        assert_eq!(rsp.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(rsp.headers()[header::CONNECTION], "close");
        let rsp = through_normalize(|| ProxyError::BadRequest("invalid Host header")).await;
        assert_eq!(rsp.status(), StatusCode::BAD_REQUEST);
        assert!(!rsp.headers().contains_key(header::CONNECTION));
    }
}
