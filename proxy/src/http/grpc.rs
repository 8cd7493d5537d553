//! A gRPC call's outcome. gRPC answers HTTP 200 and puts its status in the
//! trailers (`grpc-status`), or in the headers of a response without a body
//! (trailers-only), so a failed call looks like a success to anything that
//! reads only the status line. Metrics and spans learn the call's status here:
//! from the head when it is there, else when the body ends.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::future::{Either, FutureExt as _, Map};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};

use super::BoxBody;
use crate::defaults::PROXY_ERROR_HEADER;
use crate::telemetry::Direction;

/// A gRPC call: what its client sent says so (`content-type: application/grpc`,
/// `application/grpc+proto`…). gRPC-Web (`application/grpc-web…`) is not: its
/// status travels inside the body.
pub fn is_call<B>(req: &Request<B>) -> bool {
    is_grpc(req.headers())
}

/// Whether a head's `content-type` is gRPC's (a request's or a response's).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .filter(|v| v.len() >= PREFIX.len() && v[..PREFIX.len()].eq_ignore_ascii_case(PREFIX))
        .is_some_and(|v| matches!(v.get(PREFIX.len()), None | Some(b'+' | b';')))
}

const PREFIX: &[u8] = b"application/grpc";

/// Where a gRPC body stands between length-prefixed messages (a flag byte,
/// four bytes of length, the message), so that a status sent in trailers
/// lands on a message boundary, where a client reads it as the call's status
/// rather than as a message cut short.
#[derive(Debug, Default)]
pub struct Messages {
    /// Bytes of the current prefix seen (0 to 4; 0 also between messages).
    prefix: u8,
    length: [u8; 4],
    /// Bytes of the current message still to come.
    remaining: u64,
}

impl Messages {
    pub fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            if self.prefix > 0 {
                self.length[usize::from(self.prefix) - 1] = data[0];
            }
            data = &data[1..];
            self.prefix += 1;
            if self.prefix == 5 {
                self.prefix = 0;
                self.remaining = u64::from(u32::from_be_bytes(self.length));
            }
        }
    }

    pub fn between(&self) -> bool {
        self.prefix == 0 && self.remaining == 0
    }
}

/// How a call ended, as the `grpc_status` label says it: a code from 0 to 16;
/// `invalid` for a `grpc-status` that is not one; `none` when the response
/// ended without one (the stream was reset or cut); `cancelled` when the
/// caller went away before the status came.
pub type Label = &'static str;

pub const LABELS: [Label; 20] = [
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "10",
    "11",
    "12",
    "13",
    "14",
    "15",
    "16",
    "invalid",
    "none",
    "cancelled",
];

/// Indexes of `invalid`, `none` and `cancelled` in `LABELS`.
pub const INVALID: usize = 17;
pub const NONE: usize = 18;
pub const CANCELLED: usize = 19;

/// The caller's deadline for the call, as gRPC over HTTP/2 writes it.
pub const TIMEOUT_HEADER: &str = "grpc-timeout";

/// A call's `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = headers.get(TIMEOUT_HEADER)?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    if n.is_empty() || n.len() > 8 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `left` as a `grpc-timeout` value: milliseconds, rounded up, or a unit
/// coarse enough to fit in 8 digits.
pub fn timeout_value(left: std::time::Duration) -> HeaderValue {
    let ms = left.as_nanos().div_ceil(1_000_000);
    let text = if ms < 100_000_000 {
        format!("{ms}m")
    } else {
        format!("{}S", left.as_secs().min(99_999_999))
    };
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("0m"))
}

/// The call's status, as an index into `LABELS`, from a `grpc-status` field.
fn code_in(headers: &HeaderMap) -> Option<usize> {
    let v = headers.get("grpc-status")?;
    Some(
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|c| *c <= 16)
            .unwrap_or(INVALID),
    )
}

/// Whether a response head ends its call with a server's failure
/// (trailers-only UNKNOWN, INTERNAL, UNAVAILABLE or DATA_LOSS): an endpoint
/// that fails every call fast must not look healthy, and fast, to the
/// breaker and the balancer, as Envoy's and Linkerd's do not. A status only
/// the trailers carry is not read: the verdict is given at the head.
pub fn server_failed(headers: &HeaderMap) -> bool {
    matches!(code_in(headers), Some(2 | 13 | 14 | 15))
}

/// Whether a response head ends its call with RESOURCE_EXHAUSTED in
/// trailers-only form: the server shedding load, as a 429 is.
pub fn shed(headers: &HeaderMap) -> bool {
    code_in(headers) == Some(8)
}

/// On a response the proxy made, how the call ended (an index into
/// `LABELS`) where the HTTP status alone would mislead: a route's timeout is
/// DEADLINE_EXCEEDED, not the UNAVAILABLE a 504 reads as, which gRPC clients
/// may retry; a request body the caller failed (over HTTP/2, a stream it
/// reset) is the caller's cancellation, not the server's error.
#[derive(Clone, Copy, Debug)]
pub struct Code(pub u8);

pub const DEADLINE_EXCEEDED: Code = Code(4);
pub const UNAVAILABLE: Code = Code(14);
pub const CALLER_CANCELLED: Code = Code(CANCELLED as u8);

/// The gRPC code the head of a response to a call stands for, as retries
/// weigh it: its `grpc-status`, or for a proxy's own server error (this
/// one's, or relayed from the server's proxy) the code the app will be
/// answered with. Not an app's bare HTTP error, which a gateway in front of
/// it may send after the call ran (the route's HTTP `codes` say whether to
/// retry those), nor a proxy's 4xx, which the request itself caused.
pub fn retry_code<B>(rsp: &Response<B>) -> Option<usize> {
    if let Some(c) = code_in(rsp.headers()) {
        return (c < INVALID).then_some(c);
    }
    let caller_caused = rsp
        .extensions()
        .get::<super::error::ClientFaulted>()
        .is_some();
    if caller_caused
        || !rsp.status().is_server_error()
        || !rsp.headers().contains_key(PROXY_ERROR_HEADER)
    {
        return None;
    }
    code_of_head(rsp).filter(|c| *c < INVALID)
}

/// What a gRPC client makes of a response head without `grpc-status`: gRPC's
/// mapping of HTTP statuses to codes; `None` for a 200, whose status is still
/// to come in the trailers.
fn code_of_head<B>(rsp: &Response<B>) -> Option<usize> {
    if let Some(c) = code_in(rsp.headers()) {
        return Some(c);
    }
    if let Some(Code(c)) = rsp.extensions().get::<Code>() {
        return Some(usize::from(*c));
    }
    Some(match rsp.status() {
        StatusCode::OK => return None,
        StatusCode::BAD_REQUEST => 13,
        StatusCode::UNAUTHORIZED => 16,
        StatusCode::FORBIDDEN => 7,
        StatusCode::NOT_FOUND => 12,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => 14,
        _ => 2,
    })
}

/// Told a call's status once, however its response ends.
pub trait OnStatus: Send + Unpin + 'static {
    /// `code` indexes `LABELS`.
    fn status(self, code: usize);
}

impl<A: OnStatus, B: OnStatus> OnStatus for (A, B) {
    fn status(self, code: usize) {
        self.0.status(code);
        self.1.status(code);
    }
}

impl<A: OnStatus> OnStatus for Option<A> {
    fn status(self, code: usize) {
        if let Some(a) = self {
            a.status(code);
        }
    }
}

/// Calls `on` with the status of the call `rsp` answers: at once when the head
/// says it, else when the body's trailers come (or it ends without them, or is
/// dropped first), the body then wrapped to watch for them.
pub fn on_status(rsp: Response<BoxBody>, on: impl OnStatus) -> Response<BoxBody> {
    match code_of_head(&rsp) {
        Some(code) => {
            on.status(code);
            rsp
        }
        None => rsp.map(|inner| {
            BoxBody::new(StatusBody {
                inner,
                on: Some(on),
            })
        }),
    }
}

struct StatusBody<F: OnStatus> {
    inner: BoxBody,
    on: Option<F>,
}

impl<F: OnStatus> Drop for StatusBody<F> {
    fn drop(&mut self) {
        if let Some(on) = self.on.take() {
            // A body at its end may be dropped unpolled (it ended without
            // trailers); one that is not was given up by the caller.
            on.status(if http_body::Body::is_end_stream(&self.inner) {
                NONE
            } else {
                CANCELLED
            });
        }
    }
}

/// Tells `F` the call was cancelled if it is dropped before `answered`: a
/// call whose caller went away before the response head.
pub struct UntilAnswered<F: OnStatus>(Option<F>);

impl<F: OnStatus> UntilAnswered<F> {
    pub fn new(on: F) -> Self {
        UntilAnswered(Some(on))
    }

    /// The head has come: the status is the response's to tell.
    pub fn answered(mut self) -> Option<F> {
        self.0.take()
    }

    /// `rsp` answers the call, which `waiting` (if any) was waiting on: the
    /// status is read from it as it goes.
    pub fn respond(waiting: Option<Self>, rsp: Response<BoxBody>) -> Response<BoxBody> {
        match waiting.and_then(Self::answered) {
            Some(on) => on_status(rsp, on),
            None => rsp,
        }
    }
}

impl<F: OnStatus> Drop for UntilAnswered<F> {
    fn drop(&mut self) {
        if let Some(on) = self.0.take() {
            on.status(CANCELLED);
        }
    }
}

impl<F: OnStatus> http_body::Body for StatusBody<F> {
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let code = match &frame {
            Some(Ok(f)) => f.trailers_ref().map(|t| code_in(t).unwrap_or(NONE)),
            Some(Err(_)) | None => Some(NONE),
        };
        if let Some(code) = code
            && let Some(on) = this.on.take()
        {
            on.status(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Answers a gRPC call the proxy failed as gRPC does: a response without a
/// body whose head carries the code (`grpc-status`) and the reason
/// (`grpc-message`), so the app's gRPC client reports the proxy's reason and
/// the right code rather than "unexpected HTTP status 503". Outbound only,
/// where the app is the caller: between proxies the HTTP status stays, as the
/// calling proxy's retries and balancer read it, and the calling proxy
/// answers its app in kind. Outermost but for the connection's own layers, so
/// metrics and spans see what the proxy decided.
#[derive(Clone, Copy, Debug)]
pub struct ErrorsLayer {
    on: bool,
}

impl ErrorsLayer {
    pub fn new(direction: Direction) -> Self {
        ErrorsLayer {
            on: direction == Direction::Outbound,
        }
    }
}

impl<S> tower::Layer<S> for ErrorsLayer {
    type Service = Errors<S>;
    fn layer(&self, inner: S) -> Errors<S> {
        Errors { inner, on: self.on }
    }
}

#[derive(Clone, Debug)]
pub struct Errors<S> {
    inner: S,
    on: bool,
}

type Answer<E> = fn(Result<Response<BoxBody>, E>) -> Result<Response<BoxBody>, E>;

impl<S, B> tower::Service<Request<B>> for Errors<S>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>>,
{
    type Response = Response<BoxBody>;
    type Error = S::Error;
    type Future = Either<S::Future, Map<S::Future, Answer<S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // A CONNECT answered 200 would be taken for an open tunnel.
        if !self.on || req.method() == http::Method::CONNECT || !is_call(&req) {
            return Either::Left(self.inner.call(req));
        }
        let answer: Answer<S::Error> = |r| r.map(in_kind);
        Either::Right(self.inner.call(req).map(answer))
    }
}

/// The proxy's own error response to a call, as a gRPC error; any other
/// response as it is.
fn in_kind(rsp: Response<BoxBody>) -> Response<BoxBody> {
    let proxy_error = rsp.headers().get(PROXY_ERROR_HEADER).cloned();
    let Some(reason) = proxy_error else {
        return rsp;
    };
    let failed = rsp.status().is_client_error() || rsp.status().is_server_error();
    if !failed || rsp.headers().contains_key("grpc-status") {
        return rsp;
    }
    let Some(code) = code_of_head(&rsp).filter(|c| *c < INVALID) else {
        return rsp;
    };
    let (mut head, _) = rsp.into_parts();
    head.status = StatusCode::OK;
    head.headers.remove(http::header::CONTENT_LENGTH);
    trailers_only(&mut head.headers, code, reason.as_bytes());
    Response::from_parts(head, super::empty())
}

/// The fields of a trailers-only gRPC answer: the call ends with `code`,
/// `reason` its message.
fn trailers_only(h: &mut HeaderMap, code: usize, reason: &[u8]) {
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from_static(LABELS[code]));
    if let Some(v) = message(reason) {
        h.insert("grpc-message", v);
    }
}

/// A call's response whose upstream is lost mid-call (its connection closed
/// or broken, or ended by a GOAWAY) ends with `grpc-status: 14`
/// (UNAVAILABLE) in trailers, as the caller's gRPC client reports a lost
/// connection without the mesh. Passed on as it came, the loss reached the
/// caller as a reset with `INTERNAL_ERROR` (hyper's reset for any body error
/// without a code of its own): INTERNAL, which clients that reconnect a watch
/// or retry on UNAVAILABLE do not. A reset the upstream sent (CANCEL, say)
/// keeps its code, and so does a loss in the middle of a message, where
/// trailers would be read as a message cut short. Any other response is
/// returned as it is.
pub fn rescued(
    rsp: Response<BoxBody>,
    upstream: std::net::SocketAddr,
    lost: Lost,
) -> Response<BoxBody> {
    if !is_grpc(rsp.headers()) || rsp.headers().contains_key("grpc-status") {
        return rsp;
    }
    rsp.map(|inner| {
        super::boxed(Rescue {
            inner,
            messages: Messages::default(),
            upstream,
            lost,
            ended: false,
        })
    })
}

/// What became of an upstream, in words, from the error its body ended with.
pub type Lost = fn(&(dyn std::error::Error + 'static)) -> std::borrow::Cow<'static, str>;

struct Rescue {
    inner: BoxBody,
    messages: Messages,
    upstream: std::net::SocketAddr,
    lost: Lost,
    ended: bool,
}

/// The code of the RST_STREAM the upstream itself sent, if that is how its
/// stream ended: the caller's to see (hyper passes it on, mid-body).
pub fn upstream_reset(e: &(dyn std::error::Error + 'static)) -> Option<h2::Reason> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason().filter(|_| h2.is_reset() && h2.is_remote());
        }
        cur = e.source();
    }
    None
}

/// A call the upstream reset before answering, answered as the caller's
/// gRPC client reads such a reset (CANCEL as CANCELLED, ENHANCE_YOUR_CALM as
/// RESOURCE_EXHAUSTED, INADEQUATE_SECURITY as PERMISSION_DENIED, the rest as
/// INTERNAL), in a trailers-only response. Made a 502, it was UNAVAILABLE:
/// retried where UNAVAILABLE is (the server may have run the call, a
/// grpc-java server resets with CANCEL when its own deadline passes), and
/// counted against the endpoint. `None` for REFUSED_STREAM, which says the
/// call was not processed: that stays UNAVAILABLE, safe to retry.
pub fn reset_answer(
    reason: h2::Reason,
    upstream: std::net::SocketAddr,
) -> Option<Response<BoxBody>> {
    let code = match reason {
        h2::Reason::REFUSED_STREAM => return None,
        h2::Reason::CANCEL => 1,
        h2::Reason::ENHANCE_YOUR_CALM => 8,
        h2::Reason::INADEQUATE_SECURITY => 7,
        _ => 13,
    };
    let mut rsp = Response::new(super::empty());
    let why = format!("upstream {upstream} reset the stream ({reason:?})");
    trailers_only(rsp.headers_mut(), code, why.as_bytes());
    Some(rsp)
}

impl http_body::Body for Rescue {
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    this.messages.advance(d);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Some(Err(e)) if this.messages.between() && upstream_reset(&*e).is_none() => {
                this.ended = true;
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static(LABELS[14]));
                let why = format!(
                    "upstream {} failed: {} mid-call",
                    this.upstream,
                    (this.lost)(&*e)
                );
                if let Some(m) = message(why.as_bytes()) {
                    trailers.insert("grpc-message", m);
                }
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// `reason` as a `grpc-message`: bounded, and escaped the gRPC way
/// (printable ASCII but `%` as it is, the rest as %XX).
fn message(reason: &[u8]) -> Option<HeaderValue> {
    const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    // Bounded: the reason may be the server proxy's, relayed.
    let reason = crate::telemetry::access_log::bounded_str(&String::from_utf8_lossy(reason));
    let message = percent_encoding::percent_encode(reason.as_bytes(), ESCAPED).to_string();
    HeaderValue::from_str(&message).ok()
}

/// `/package.Service/Method` as its service and method, for spans: names as
/// protobuf writes them, 128 bytes at most, since a client chooses them.
pub fn service_and_method(path: &str) -> Option<(&str, &str)> {
    let ident = |s: &str, dots: bool| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || (dots && b == b'.'))
    };
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (path.len() <= 128 && ident(service, true) && ident(method, false)).then_some((service, method))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt as _;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<&'static str>>>);

    impl OnStatus for Seen {
        fn status(self, code: usize) {
            self.0.lock().unwrap().push(LABELS[code]);
        }
    }

    impl Seen {
        fn take(&self) -> Vec<&'static str> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    /// A body of one data frame, then `grpc-status: code` in the trailers.
    fn frames(data: &'static [u8], trailers: Option<&'static str>) -> BoxBody {
        let mut v: Vec<Result<_, super::super::BoxError>> =
            vec![Ok(http_body::Frame::data(Bytes::from_static(data)))];
        if let Some(code) = trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", code.parse().unwrap());
            v.push(Ok(http_body::Frame::trailers(t)));
        }
        BoxBody::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            v,
        )))
    }

    fn response(status: u16, head: Option<&str>, body: BoxBody) -> Response<BoxBody> {
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        if let Some(c) = head {
            r.headers_mut().insert("grpc-status", c.parse().unwrap());
        }
        r
    }

    #[tokio::test]
    async fn the_status_comes_from_the_trailers_the_head_or_the_http_status() {
        let seen = Seen::default();
        // In the trailers: told once the body has ended, not before.
        let rsp = on_status(
            response(200, None, frames(b"msg", Some("14"))),
            seen.clone(),
        );
        assert_eq!(seen.take(), Vec::<&str>::new());
        let body = rsp.into_body().collect().await.unwrap();
        assert_eq!(body.trailers().unwrap()["grpc-status"], "14");
        assert_eq!(seen.take(), ["14"]);

        // Trailers-only: at once, the body untouched.
        let _ = on_status(response(200, Some("5"), frames(b"", None)), seen.clone());
        assert_eq!(seen.take(), ["5"]);
        // Not a code.
        let _ = on_status(response(200, Some("99"), frames(b"", None)), seen.clone());
        assert_eq!(seen.take(), ["invalid"]);
        // An HTTP error, as a gRPC client reads it.
        for (status, code) in [(503, "14"), (404, "12"), (500, "2"), (429, "14")] {
            let _ = on_status(response(status, None, frames(b"", None)), seen.clone());
            assert_eq!(seen.take(), [code], "HTTP {status}");
        }
    }

    #[tokio::test]
    async fn a_body_that_ends_without_a_status_is_none_and_one_given_up_cancelled() {
        let seen = Seen::default();
        let rsp = on_status(response(200, None, frames(b"msg", None)), seen.clone());
        rsp.into_body().collect().await.unwrap();
        assert_eq!(seen.take(), ["none"]);
        // Dropped before its end: the caller gave up.
        let rsp = on_status(response(200, None, frames(b"msg", Some("0"))), seen.clone());
        drop(rsp);
        assert_eq!(seen.take(), ["cancelled"]);
        // Dropped at its end, unpolled: it had no status to give.
        let rsp = on_status(response(200, None, super::super::empty()), seen.clone());
        drop(rsp);
        assert_eq!(seen.take(), ["none"]);
        // A request body the caller failed (a stream it reset) answered by
        // the proxy: the caller's cancellation, answered as it was.
        let rsp = crate::http::error::ProxyError::ClientBody.into_response();
        let rsp = on_status(rsp, seen.clone());
        assert_eq!(seen.take(), ["cancelled"]);
        assert_eq!(in_kind(rsp).status(), StatusCode::BAD_REQUEST);
        // Before the head.
        let waiting = UntilAnswered::new(seen.clone());
        drop(waiting);
        assert_eq!(seen.take(), ["cancelled"]);
        let waiting = UntilAnswered::new(seen.clone());
        assert!(waiting.answered().is_some());
        assert_eq!(seen.take(), Vec::<&str>::new());
    }

    #[test]
    fn the_proxys_own_errors_are_answered_as_grpc_errors() {
        use crate::http::error::error_response;
        let answered = in_kind(error_response(
            "no_endpoints",
            StatusCode::SERVICE_UNAVAILABLE,
            "no endpoints for web:80 (100% ejected)",
        ));
        assert_eq!(answered.status(), StatusCode::OK);
        let h = answered.headers();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(
            h["grpc-message"],
            "no endpoints for web:80 (100%25 ejected)"
        );
        assert_eq!(
            h[PROXY_ERROR_HEADER],
            "no endpoints for web:80 (100% ejected)"
        );
        assert!(!h.contains_key("content-length"));
        assert!(
            http_body::Body::is_end_stream(answered.body()),
            "trailers-only"
        );

        let mut timeout = error_response(
            "request_timeout",
            StatusCode::GATEWAY_TIMEOUT,
            "request timeout",
        );
        timeout.extensions_mut().insert(DEADLINE_EXCEEDED);
        assert_eq!(in_kind(timeout).headers()["grpc-status"], "4");

        // The app's own answers pass as they came.
        let app = response(503, None, frames(b"busy", None));
        assert_eq!(in_kind(app).status(), StatusCode::SERVICE_UNAVAILABLE);
        let mut already = error_response("refused", StatusCode::SERVICE_UNAVAILABLE, "x");
        already
            .headers_mut()
            .insert("grpc-status", HeaderValue::from_static("8"));
        assert_eq!(in_kind(already).status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn calls_are_known_by_their_content_type() {
        let req = |ct: &str| {
            Request::post("/")
                .header("content-type", ct)
                .body(())
                .unwrap()
        };
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;x=1",
            "Application/gRPC",
        ] {
            assert!(is_call(&req(ct)), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/grpc-web-text",
            "application/json",
        ] {
            assert!(!is_call(&req(ct)), "{ct}");
        }
        assert!(!is_call(&Request::post("/").body(()).unwrap()));
    }

    #[test]
    fn paths_name_a_service_and_method() {
        assert_eq!(
            service_and_method("/strait.testing.v1.Echo/Unary"),
            Some(("strait.testing.v1.Echo", "Unary"))
        );
        let long = format!("/{}/Unary", "a".repeat(128 - 6));
        for p in [
            "/",
            "/Echo",
            "//Unary",
            "/Echo/",
            "/a/b/c",
            "Echo/Unary",
            "/Echo/Un.ary",
            "/Echo/Un%20ary",
            "/Ech o/Unary",
            &long,
        ] {
            assert_eq!(service_and_method(p), None, "{p}");
        }
    }
}
