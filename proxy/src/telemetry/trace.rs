//! What each HTTP request leaves behind besides metrics: a span (a client span
//! in the calling proxy, a server span in the called one, joined through the
//! trace context in the headers) and an access-log line. Both are off unless
//! configured, and then the layer costs nothing: no span, no allocation, the
//! inner future as it is.
//!
//! The stages below learn what the span and the line report (route, backend,
//! endpoint, peer identity, retries) and write it into the request's `Notes`,
//! which exist only when something will read them.
//!
//! A span is not built here: the request keeps a small record of what it
//! knew (ids, times, the path, the notes) and hands it to the export thread,
//! which makes the attributes and the OTLP span. The serving thread pays for
//! the ids, two clock reads, a copy of the path (inline when short) and a
//! move into the queue.
//!
//! A span starts when the request arrives and ends when the response head is
//! ready, or when the client goes away first (`strait.cancelled`, and the
//! access-log line's status is 0). A gRPC call's span ends with the call, when
//! its status is known (the trailers, or a head that carries it), so that the
//! span reports it. Retries do not get spans of their own: the client span
//! counts them (`strait.retry.count`) and marks each with an event.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use futures_util::future::Either;
use http::{Request, Response};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, TraceFlags, TraceState};
use strait_otel::{Record, Recorder, SpanWriter, export, propagate};

use super::access_log::{AccessLog, Line};
use super::metrics::Direction;
use super::short_str::ShortStr;
use crate::defaults::PROXY_ERROR_HEADER;
use crate::http::{BoxBody, grpc};
use crate::identity::Identity;

/// Where spans and access-log lines go; `None` of both when neither is on.
#[derive(Debug)]
pub struct Observe {
    pub tracer: Option<Recorder<ProxySpan>>,
    /// No trace is started by ratio: only callers' sampled traces are
    /// followed, and traces a caller asked for without ids (B3 `1`, `d`).
    pub never_start: bool,
    pub access_log: Option<AccessLog>,
}

/// `server.address` and `server.port`: what the app addressed, rather than
/// the listener it reached us on or the address a name resolved to.
fn server_of<'a>(
    direction: Direction,
    destination: Option<&'a crate::addr::DestAddr>,
    authority: &'a Option<(ShortStr, Option<u16>)>,
    ip: &'a mut Option<Arc<str>>,
) -> Option<(&'a str, Option<u16>)> {
    use crate::addr::DestAddr;
    // An IPv6 literal without its brackets, as the conventions want it.
    let authority = authority.as_ref().map(|(h, p)| {
        let h = h.as_str();
        let bare = h.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        (bare.unwrap_or(h), *p)
    });
    match (direction, destination, authority) {
        (Direction::Inbound, _, Some(a)) => Some(a),
        (Direction::Outbound, Some(DestAddr::Name(n)), _) => Some((n.host(), Some(n.port()))),
        // Redirected from an address (a ClusterIP): the name the app gave,
        // at the port it connected to unless it named one; not a local
        // listener's name or an address (`--upstream` on loopback).
        (Direction::Outbound, Some(DestAddr::Socket(a)), Some((host, port)))
            if host.parse::<std::net::IpAddr>().is_err()
                && !host.eq_ignore_ascii_case("localhost") =>
        {
            Some((host, port.or(Some(a.port()))))
        }
        (_, Some(DestAddr::Name(n)), _) => Some((n.host(), Some(n.port()))),
        (_, Some(DestAddr::Socket(a)), _) => {
            let ip: &str = ip.insert(endpoint_strings(*a).0);
            Some((ip, Some(a.port())))
        }
        (_, None, a) => a,
    }
}

/// What the stages learnt about one request, for its span and log line.
#[derive(Debug, Default)]
pub struct Notes {
    /// The destination as the app addressed it (before discovery).
    pub destination: Option<crate::addr::DestAddr>,
    pub route: Option<(Arc<str>, Arc<str>, Arc<str>)>,
    pub backend: Option<Arc<str>>,
    pub endpoint: Option<SocketAddr>,
    pub peer: Option<Identity>,
    pub retries: u32,
    /// Each retry as it was sent, for the span's events (the first few).
    pub retried_at: Vec<Retried>,
    /// The kubelet's probe, let in in plaintext: no span (a root trace every
    /// probe period of every pod would crowd out the app's), but a log line.
    pub probe: bool,
}

/// A retry: when it was sent, and what the attempt before it met (which a
/// later attempt's endpoint and status would otherwise hide: a request
/// retried to 200 names only the endpoint that answered).
#[derive(Clone, Copy, Debug)]
pub struct Retried {
    pub at: SystemTime,
    pub failed_endpoint: Option<SocketAddr>,
    pub failed_status: u16,
}

/// Retry events kept per span at most; the count says the rest.
const RETRY_EVENTS: usize = 8;

/// In a request's extensions when its span or log line will be written.
#[derive(Clone, Debug)]
pub struct RequestNotes(Arc<Mutex<Notes>>);

impl RequestNotes {
    pub fn with(&self, f: impl FnOnce(&mut Notes)) {
        if let Ok(mut n) = self.0.lock() {
            f(&mut n);
        }
    }

    /// A retry is about to be sent: counted, and an event on the span naming
    /// the endpoint and status of the attempt that failed.
    pub fn retried(&self, failed_endpoint: Option<SocketAddr>, failed_status: u16) {
        self.with(|notes| {
            notes.retries += 1;
            if notes.retried_at.len() < RETRY_EVENTS {
                notes.retried_at.push(Retried {
                    at: SystemTime::now(),
                    failed_endpoint,
                    failed_status,
                });
            }
        });
    }
}

/// A request let in as the kubelet's probe: its span is not recorded, and
/// the context handed to the app says the trace is not sampled, so that an
/// instrumented app does not record one either (under a parent that never
/// arrives).
pub fn probe<B>(req: &mut Request<B>) {
    let Some(notes) = notes(req) else {
        return;
    };
    notes.with(|n| n.probe = true);
    let header = http::header::HeaderName::from_static("traceparent");
    let unsampled = (req.headers().get(&header))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_suffix("-01"))
        .and_then(|v| http::HeaderValue::from_str(&format!("{v}-00")).ok());
    if let Some(v) = unsampled {
        req.headers_mut().insert(header, v);
    }
}

/// Notes of `req`, if anyone will read them.
pub fn notes<B>(req: &Request<B>) -> Option<&RequestNotes> {
    req.extensions().get::<RequestNotes>()
}

#[derive(Clone, Debug)]
pub struct TraceLayer {
    observe: Option<Arc<Observe>>,
    direction: Direction,
    /// Inbound: the verified identity of the calling proxy.
    peer: Option<Identity>,
    /// Inbound: the caller's address, for the access log.
    client: Option<std::net::IpAddr>,
}

impl TraceLayer {
    pub fn new(
        observe: Option<Arc<Observe>>,
        direction: Direction,
        peer: Option<Identity>,
    ) -> Self {
        TraceLayer {
            observe,
            direction,
            peer,
            client: None,
        }
    }

    /// Inbound: the caller's address, for the access log.
    pub fn for_client(mut self, client: std::net::IpAddr) -> Self {
        self.client = Some(client.to_canonical());
        self
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    layer: TraceLayer,
}

impl<S, B> tower::Service<Request<B>> for Trace<S>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = S::Error;
    type Future = Either<S::Future, TracedFuture<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(observe) = self.layer.observe.clone() else {
            return Either::Left(self.inner.call(req));
        };
        let direction = self.layer.direction;
        let start = Instant::now();
        let span = observe
            .tracer
            .as_ref()
            .and_then(|t| start_span(t, observe.never_start, &mut req));
        if span.is_none() && observe.access_log.is_none() {
            return Either::Left(self.inner.call(req));
        }
        let notes = Arc::new(Mutex::new(Notes {
            peer: self.layer.peer.clone(),
            ..Notes::default()
        }));
        req.extensions_mut().insert(RequestNotes(notes.clone()));
        let line = observe
            .access_log
            .as_ref()
            .map(|_| Line::of(&req, direction).from_client(self.layer.client));
        let pending = Pending {
            observe,
            direction,
            grpc: grpc::is_call(&req),
            start,
            span,
            line,
            notes,
        };
        Either::Right(TracedFuture {
            inner: self.inner.call(req),
            pending: Some(pending),
        })
    }
}

pin_project_lite::pin_project! {
    /// The inner future, and the span and log line written as it resolves; in
    /// the request's own future rather than boxed, so tracing a request moves
    /// and allocates nothing more.
    pub struct TracedFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
    }
}

impl<F, E> Future for TracedFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        let Some(mut pending) = this.pending.take() else {
            return Poll::Ready(out);
        };
        match out {
            Ok(rsp) => {
                let status = rsp.status().as_u16();
                let error = rsp.headers().get(PROXY_ERROR_HEADER);
                if pending.grpc {
                    let end = GrpcEnd {
                        status,
                        // Kept as it came (a reference count): read at the end.
                        error: error.cloned(),
                        pending,
                    };
                    return Poll::Ready(Ok(grpc::on_status(rsp, end)));
                }
                pending.end(Some(status), error.and_then(|v| v.to_str().ok()), None);
                Poll::Ready(Ok(rsp))
            }
            Err(e) => {
                pending.end(None, Some("no-response"), None);
                Poll::Ready(Err(e))
            }
        }
    }
}

/// A gRPC call's span and line, written when its status is known.
struct GrpcEnd {
    pending: Pending,
    status: u16,
    error: Option<http::HeaderValue>,
}

impl grpc::OnStatus for GrpcEnd {
    fn status(mut self, code: usize) {
        // The caller went away before the status: cancelled, as before the head.
        let error = match code {
            grpc::CANCELLED => Some(CANCELLED),
            _ => self.error.as_ref().and_then(|v| v.to_str().ok()),
        };
        self.pending.end(Some(self.status), error, Some(code));
    }
}

/// A request whose span or log line is still to be written: written when
/// the response head is ready, or on drop, when the client went away first.
struct Pending {
    observe: Arc<Observe>,
    direction: Direction,
    /// The request was a gRPC call.
    grpc: bool,
    start: Instant,
    span: Option<Started>,
    line: Option<Line>,
    notes: Arc<Mutex<Notes>>,
}

impl Pending {
    /// `grpc_code`: a gRPC call's status once known, as an index into
    /// `grpc::LABELS`.
    fn end(&mut self, status: Option<u16>, error: Option<&str>, grpc_code: Option<usize>) {
        let (span, line) = (self.span.take(), self.line.take());
        if span.is_none() && line.is_none() {
            return;
        }
        let notes = std::mem::take(&mut *self.notes.lock().unwrap_or_else(|p| p.into_inner()));
        let trace_id = span.as_ref().map(|s| s.cx.trace_id());
        if let (Some(log), Some(line)) = (&self.observe.access_log, line) {
            log.write(line.finish(
                status.unwrap_or(0),
                self.start.elapsed(),
                &notes,
                trace_id,
                error,
                grpc_code,
            ));
        }
        if let (Some(t), Some(started)) = (&self.observe.tracer, span.filter(|_| !notes.probe)) {
            let end = started.at + self.start.elapsed();
            t.record(ProxySpan {
                started,
                direction: self.direction,
                grpc: self.grpc,
                grpc_code,
                end,
                status,
                // The value may be an upstream's own header: any length.
                error: error.map(super::access_log::bounded_str),
                notes,
            });
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let code = self.grpc.then_some(grpc::CANCELLED);
        self.end(None, Some(CANCELLED), code);
    }
}

/// The error a span and log line carry when the client went away before the
/// response head.
const CANCELLED: &str = "cancelled";

/// What is known of a span when its request arrives.
#[derive(Debug)]
struct Started {
    /// Ours: the context the next hop sees as its parent.
    cx: SpanContext,
    parent: Option<SpanId>,
    method: &'static str,
    /// A method the conventions do not know (`method` is `_OTHER`), as sent.
    method_original: Option<ShortStr>,
    version: http::Version,
    /// The authority the caller addressed (`:authority` or `Host`).
    authority: Option<Addressed>,
    path: ShortStr,
    at: SystemTime,
}

/// The authority a request addressed, as the serving thread found it.
enum Addressed {
    /// Host and port from the request's URI, which hyper has parsed.
    Split(ShortStr, Option<u16>),
    /// A `Host` header as it came: split on the export thread, so that a
    /// traced HTTP/1 request does not pay for parsing it. One over
    /// `MAX_FIELD` bytes is kept cut, and then names no server.
    Host(ShortStr),
}

impl std::fmt::Debug for Addressed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addressed::Split(host, port) => f.debug_tuple("Split").field(host).field(port).finish(),
            // User info in a `Host` is a credential: not shown.
            Addressed::Host(raw) => {
                let raw = raw.as_str();
                let host = raw.rsplit_once('@').map_or(raw, |(_, host)| host);
                f.debug_tuple("Host").field(&host).finish()
            }
        }
    }
}

impl Addressed {
    fn split(self) -> Option<(ShortStr, Option<u16>)> {
        match self {
            Addressed::Split(host, port) => Some((host, port)),
            Addressed::Host(raw) => {
                let a: http::uri::Authority = raw.as_str().parse().ok()?;
                Some((ShortStr::bounded(a.host()), a.port_u16()))
            }
        }
    }
}

/// A finished span, as queued for export.
#[derive(Debug)]
pub struct ProxySpan {
    started: Started,
    direction: Direction,
    grpc: bool,
    /// A gRPC call's status, as an index into `grpc::LABELS`.
    grpc_code: Option<usize>,
    end: SystemTime,
    /// `None`: no response (the client went away, or the connection failed).
    status: Option<u16>,
    error: Option<String>,
    notes: Notes,
}

/// Starts this request's span, child of the caller's context when it sent one,
/// and makes the span the context the next hop sees. `None`: not sampled. The
/// caller's unsampled context (or B3 deny) passes untouched; a new trace we
/// chose not to sample is passed on as unsampled, so the next proxy records
/// none of it, and so is a B3 caller's trace it left us to decide on.
fn start_span<B>(
    tracer: &Recorder<ProxySpan>,
    never_start: bool,
    req: &mut Request<B>,
) -> Option<Started> {
    use propagate::Parent;
    let (trace_id, parent_id, sampled, state, format) = match propagate::extract(req.headers()) {
        Some(Parent::Denied) => return None,
        // The caller asked for this trace to be recorded, with no ids: a new
        // one, whatever the ratio.
        Some(Parent::Forced(f)) => (
            export::new_trace_id(),
            None,
            true,
            TraceState::default(),
            Some(f),
        ),
        Some(Parent::Decided(sc, _)) if !sc.is_sampled() => return None,
        Some(Parent::Decided(sc, f)) => (
            sc.trace_id(),
            Some(sc.span_id()),
            true,
            sc.trace_state().clone(),
            Some(f),
        ),
        // B3 ids left for us to decide on: the ratio decides, in their trace.
        Some(Parent::Deferred(..)) if never_start => return None,
        Some(Parent::Deferred(sc, f)) => (
            sc.trace_id(),
            Some(sc.span_id()),
            tracer.samples(sc.trace_id()),
            sc.trace_state().clone(),
            Some(f),
        ),
        None if never_start => return None,
        None => {
            let id = export::new_trace_id();
            (id, None, tracer.samples(id), TraceState::default(), None)
        }
    };
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let cx = SpanContext::new(trace_id, export::new_span_id(), flags, false, state);
    // Not sampled by our ratio: the next hop is told so (`-00`), and follows
    // the decision rather than making its own.
    propagate::inject(req.headers_mut(), &cx, format);
    if !sampled {
        return None;
    }
    // Outbound, the destination the stages resolve comes first; this stands
    // in for it when that is an address (a ClusterIP the app's connection
    // was redirected from), as the name the app used is the one to show.
    let authority = req
        .uri()
        .authority()
        .map(|a| Addressed::Split(ShortStr::bounded(a.host()), a.port_u16()))
        .or_else(|| {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            Some(Addressed::Host(ShortStr::bounded(h)))
        });
    let method = method_name(req.method());
    Some(Started {
        cx,
        parent: parent_id,
        method,
        method_original: (method == OTHER_METHOD).then(|| ShortStr::bounded(req.method().as_str())),
        version: req.version(),
        authority,
        // Bounded: the export queue counts spans, so spans are bounded in size.
        path: ShortStr::bounded(req.uri().path()),
        at: SystemTime::now(),
    })
}

const OTHER_METHOD: &str = "_OTHER";

/// The method as a span name and attribute: the standard ones without an
/// allocation.
fn method_name(m: &http::Method) -> &'static str {
    use http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        // Semantic conventions: other methods are reported as `_OTHER`.
        _ => OTHER_METHOD,
    }
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        _ => "1.1",
    }
}

/// An endpoint's address, without and with its port.
type EndpointStrings = std::collections::HashMap<SocketAddr, (Arc<str>, Arc<str>)>;

/// Endpoints written as span attributes (the address alone, and with its
/// port), formatted once per endpoint by the export thread that calls this, and
/// copied from the cache after. Bounded: the cache starts over when it is full.
fn endpoint_strings(e: SocketAddr) -> (Arc<str>, Arc<str>) {
    const MAX: usize = 1024;
    thread_local! {
        static SEEN: std::cell::RefCell<EndpointStrings> = std::cell::RefCell::default();
    }
    SEEN.with_borrow_mut(|seen| {
        if seen.len() >= MAX && !seen.contains_key(&e) {
            seen.clear();
        }
        seen.entry(e)
            .or_insert_with(|| (e.ip().to_string().into(), e.to_string().into()))
            .clone()
    })
}

/// Distinct gRPC span names one proxy gives, at most. The client names the
/// method it calls, and one sending made-up methods would otherwise fill the
/// tracing backend's index of operations (Jaeger's, Tempo's). Past it a
/// method not named before gets a span named `grpc`; its service and method
/// stay in `rpc.service` and `rpc.method`.
const MAX_RPC_SPAN_NAMES: usize = 1000;
/// A name no span has had for this long gives its place to a new one: a
/// proxy living for weeks in front of APIs that change (v1 retired for v2)
/// would otherwise name none of the new methods once full.
const RPC_SPAN_NAME_IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The gRPC span names given, and when each last was.
#[derive(Default)]
struct RpcNames {
    seen: std::collections::HashMap<Box<str>, std::time::Instant>,
    /// While full: no name can have been idle long enough before this.
    none_idle_before: Option<std::time::Instant>,
}

impl RpcNames {
    fn named(&mut self, name: &str, served: bool, now: std::time::Instant) -> bool {
        if let Some(last) = self.seen.get_mut(name) {
            *last = now;
            return true;
        }
        if !served {
            return false;
        }
        if self.seen.len() >= MAX_RPC_SPAN_NAMES {
            if self.none_idle_before.is_some_and(|t| now < t) {
                return false;
            }
            let Some((oldest, last)) = (self.seen.iter())
                .min_by_key(|(_, last)| **last)
                .map(|(n, last)| (n.clone(), *last))
            else {
                return false;
            };
            if now.saturating_duration_since(last) < RPC_SPAN_NAME_IDLE {
                // Names are only ever seen later, so none is idle before then.
                self.none_idle_before = Some(last + RPC_SPAN_NAME_IDLE);
                return false;
            }
            self.seen.remove(&oldest);
        }
        self.seen.insert(name.into(), now);
        true
    }
}

/// Whether a call's span may be named for its method. A method not named
/// before takes a place only from a call its server `served`: answered with a
/// status other than UNIMPLEMENTED, and not by a proxy's own error, so that
/// made-up methods (a scanner's) do not take the places of real ones. Run as
/// spans are encoded, on the exporter's thread, not on the request path.
fn named_rpc(service: &str, method: &str, served: bool) -> bool {
    static SEEN: std::sync::LazyLock<std::sync::Mutex<RpcNames>> =
        std::sync::LazyLock::new(Default::default);
    let name = format!("{service}/{method}");
    SEEN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .named(&name, served, std::time::Instant::now())
}

/// Whether a call's end says its server has the method: a status of the
/// server's, not UNIMPLEMENTED, nor the proxy's own (`error`); or cancelled
/// after the server's head (a watch its client ends). Cancelled before the
/// head, or no status, says nothing of it: a client may call a made-up method
/// and go at once, and a catch-all server may answer any path without one.
fn served(grpc_code: Option<usize>, status: Option<u16>, error: bool) -> bool {
    match grpc_code {
        Some(grpc::CANCELLED) => status.is_some(),
        Some(c) => c < grpc::INVALID && c != 12 && !error,
        None => false,
    }
}

impl Record for ProxySpan {
    fn write(self, w: &mut SpanWriter<'_>) {
        let ProxySpan {
            started,
            direction,
            grpc,
            grpc_code,
            end,
            status,
            error,
            notes,
        } = self;
        w.context(&started.cx, started.parent);
        w.kind(match direction {
            Direction::Outbound => SpanKind::Client,
            Direction::Inbound => SpanKind::Server,
        });
        w.times(started.at, end);
        // The RPC conventions beside HTTP's: the service and method from the
        // path, and the call's status.
        let rpc = grpc.then(|| grpc::service_and_method(started.path.as_str()));
        let served = served(grpc_code, status, error.is_some());
        // RPC spans are named for the method they call; HTTP spans for
        // theirs, or `HTTP` for a method the conventions do not know.
        match (rpc.flatten(), &started.method_original) {
            (Some((service, method)), _) if named_rpc(service, method, served) => {
                w.name(&[service, "/", method]);
            }
            (Some(_), _) => w.name(&["grpc"]),
            (None, Some(_)) => w.name(&["HTTP"]),
            (None, None) => w.name(&[started.method]),
        }
        w.str("http.request.method", started.method);
        if let Some(m) = &started.method_original {
            w.str("http.request.method_original", m.as_str());
        }
        w.str("url.path", started.path.as_str());
        if direction == Direction::Inbound {
            // The app's own scheme: mTLS between the proxies is the mesh's.
            w.str("url.scheme", "http");
        }
        w.str("network.protocol.version", protocol(started.version));
        w.str("strait.direction", direction.as_str());
        if let Some(s) = status {
            w.int("http.response.status_code", i64::from(s));
        }
        let mut ip = None;
        let authority = started.authority.and_then(Addressed::split);
        let server = server_of(direction, notes.destination.as_ref(), &authority, &mut ip);
        if let Some((host, port)) = server {
            w.str("server.address", host);
            if let Some(p) = port {
                w.int("server.port", i64::from(p));
            }
            if direction == Direction::Outbound {
                // The URL the app asked for, without its query: strait records
                // no query string anywhere (it can carry credentials).
                let path = started.path.as_str();
                let (open, close) = if host.contains(':') && !host.starts_with('[') {
                    ("[", "]")
                } else {
                    ("", "")
                };
                let mut digits = itoa::Buffer::new();
                let port = port.map_or("", |p| digits.format(p));
                let colon = if port.is_empty() { "" } else { ":" };
                w.str_parts(
                    "url.full",
                    &["http://", open, host, close, colon, port, path],
                );
            }
        }
        if let Some((service, route, rule)) = &notes.route {
            w.str("strait.service", service);
            w.str("strait.route", route);
            w.str("strait.rule", rule);
        }
        if let Some(b) = &notes.backend {
            w.str("strait.backend", b);
        }
        if let Some(e) = notes.endpoint {
            let (ip, endpoint) = endpoint_strings(e);
            w.str("network.peer.address", &ip);
            w.int("network.peer.port", i64::from(e.port()));
            w.str("strait.endpoint", &endpoint);
        }
        if let Some(p) = &notes.peer {
            w.str("strait.peer.identity", p.as_shared());
        }
        w.int("strait.retry.count", i64::from(notes.retries));
        let cancelled = error.as_deref() == Some(CANCELLED);
        if cancelled {
            w.bool("strait.cancelled", true);
        } else if let Some(e) = &error {
            w.str("strait.proxy.error", e);
        }
        if let Some(rpc) = rpc {
            w.str("rpc.system", "grpc");
            if let Some((service, method)) = rpc {
                w.str("rpc.service", service);
                w.str("rpc.method", method);
            }
            if let Some(c) = grpc_code.filter(|c| *c < grpc::INVALID) {
                w.int("rpc.grpc.status_code", c as i64);
            }
        }
        // Semantic conventions: 5xx is an error on both sides, 4xx on the
        // client's; no response for another reason than the client leaving is
        // an error too. A gRPC call failed by its status: any but OK on the
        // client's side; on the server's, those that say the server failed;
        // no status, or one that is not a code, on both.
        // A caller that went away failed nothing, whatever was answered.
        let http_failed = !cancelled
            && match status {
                Some(s) => s >= 500 || (direction == Direction::Outbound && s >= 400),
                None => true,
            };
        let grpc_failed = grpc_code.is_some_and(|c| match c {
            grpc::CANCELLED => false,
            c if c >= grpc::INVALID => true,
            c => match direction {
                Direction::Outbound => c != 0,
                Direction::Inbound => matches!(c, 2 | 4 | 12 | 13 | 14 | 15),
            },
        });
        if http_failed || grpc_failed {
            // A gRPC call's error is its code, however it came (an HTTP error
            // is read as a gRPC client reads it).
            let code;
            let kind = match (grpc_code, status, &error) {
                (Some(c), _, _) if c != grpc::CANCELLED => grpc::LABELS[c],
                (_, Some(s), _) => {
                    code = s.to_string();
                    code.as_str()
                }
                (_, None, Some(e)) => e.as_str(),
                (_, None, None) => "_OTHER",
            };
            w.str("error.type", kind);
            w.error(error.as_deref().unwrap_or_default());
        }
        w.dropped_events(notes.retries.saturating_sub(RETRY_EVENTS as u32));
        for (r, n) in notes.retried_at.iter().zip(1i64..) {
            w.event("retry", r.at, "strait.retry.attempt", n);
            w.event_int("strait.retry.failed_status", i64::from(r.failed_status));
            if let Some(ep) = r.failed_endpoint {
                w.event_str("strait.retry.failed_endpoint", &ep.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client choosing its methods freely names at most a thousand spans
    /// for them; the methods named first keep their names.
    #[test]
    fn a_method_is_served_by_its_server_s_status_or_a_cancel_after_its_head() {
        assert!(served(Some(0), Some(200), false));
        assert!(served(Some(5), Some(200), false));
        assert!(!served(Some(12), Some(200), false), "UNIMPLEMENTED");
        assert!(!served(Some(14), Some(503), true), "the proxy's own");
        assert!(
            served(Some(grpc::CANCELLED), Some(200), true),
            "a watch ended"
        );
        assert!(
            !served(Some(grpc::CANCELLED), None, true),
            "gone before the head"
        );
        assert!(!served(Some(grpc::NONE), Some(200), false), "no status");
        assert!(!served(Some(grpc::INVALID), Some(200), false));
    }

    #[test]
    fn grpc_span_names_are_bounded() {
        // Methods the server does not have (UNIMPLEMENTED) take no place.
        for i in 0..2 * MAX_RPC_SPAN_NAMES {
            assert!(!named_rpc("made.Up", &format!("m{i}"), false));
        }
        assert!(named_rpc("shop.Orders", "Get", true));
        for i in 1..MAX_RPC_SPAN_NAMES {
            assert!(named_rpc("junk.S", &format!("m{i}"), true), "{i}");
        }
        assert!(!named_rpc("junk.S", "one_more", true));
        assert!(named_rpc("shop.Orders", "Get", false), "named before");
        assert!(named_rpc("junk.S", "m7", true));
    }

    /// Once full, a name no span has had for an hour gives its place to a
    /// new method served (an API's v2 after its v1 was retired); one in use
    /// keeps its place.
    #[test]
    fn a_grpc_span_name_idle_for_an_hour_gives_its_place() {
        let mut names = RpcNames::default();
        let t0 = std::time::Instant::now();
        for i in 0..MAX_RPC_SPAN_NAMES {
            assert!(names.named(&format!("v1.S/m{i}"), true, t0));
        }
        let later = t0 + RPC_SPAN_NAME_IDLE / 2;
        assert!(names.named("v1.S/m7", false, later), "in use");
        assert!(!names.named("v2.S/m0", true, later), "full, none idle");
        let after = t0 + RPC_SPAN_NAME_IDLE + std::time::Duration::from_secs(1);
        assert!(names.named("v2.S/m0", true, after));
        assert!(names.named("v1.S/m7", false, after), "kept: seen since");
        assert!(
            !names.named("v2.S/m1", false, after),
            "not served: no place"
        );
        assert_eq!(names.seen.len(), MAX_RPC_SPAN_NAMES);
    }
    use crate::addr::DestAddr;

    /// A `Host` header is split on the export thread as the URI's
    /// authority would be; one that is not an authority names no server.
    #[test]
    fn a_host_header_is_split_where_the_span_is_written() {
        let text = |a: Addressed| a.split().map(|(h, p)| (h.as_str().to_string(), p));
        let split = |h: &str| text(Addressed::Host(ShortStr::bounded(h)));
        let of = |h: &str, p| Some((h.to_string(), p));
        assert_eq!(split("web.shop:8080"), of("web.shop", Some(8080)));
        assert_eq!(split("web.shop"), of("web.shop", None));
        assert_eq!(split("[fd00::10]:80"), of("[fd00::10]", Some(80)));
        assert_eq!(split("web shop"), None);
        assert_eq!(split(&"a".repeat(2000)), None);
        let secret = Addressed::Host(ShortStr::bounded("user:pass@web.shop:80"));
        assert_eq!(format!("{secret:?}"), r#"Host("web.shop:80")"#);
        assert_eq!(text(secret), of("web.shop", Some(80)));
        let uri = Addressed::Split(ShortStr::bounded("web.shop"), Some(80));
        assert_eq!(text(uri), of("web.shop", Some(80)));
    }

    #[test]
    fn the_server_is_what_the_app_addressed() {
        let host = |h: &str, p: Option<u16>| Some((ShortStr::bounded(h), p));
        let ip: DestAddr = DestAddr::Socket("10.96.0.10:80".parse().unwrap());
        let name: DestAddr = "web.shop.svc.cluster.local:80".parse().unwrap();
        let mut buf = None;
        // Redirected from a ClusterIP: the name in Host, at the port dialled.
        let web = host("web.shop.svc.cluster.local", None);
        assert_eq!(
            server_of(Direction::Outbound, Some(&ip), &web, &mut buf),
            Some(("web.shop.svc.cluster.local", Some(80)))
        );
        // An address with no Host, or one that names a local listener: the
        // address.
        assert_eq!(
            server_of(Direction::Outbound, Some(&ip), &None, &mut buf),
            Some(("10.96.0.10", Some(80)))
        );
        let local = host("localhost", Some(7000));
        assert_eq!(
            server_of(Direction::Outbound, Some(&ip), &local, &mut buf),
            Some(("10.96.0.10", Some(80)))
        );
        // An address in Host, IPv6 in brackets included: the address dialled.
        for literal in ["10.96.0.10", "[fd00::10]", "fd00::10"] {
            assert_eq!(
                server_of(
                    Direction::Outbound,
                    Some(&ip),
                    &host(literal, Some(80)),
                    &mut buf
                ),
                Some(("10.96.0.10", Some(80))),
                "{literal}"
            );
        }
        // A name resolved by the stages: the name, whatever the Host says.
        let other = host("localhost", Some(4140));
        assert_eq!(
            server_of(Direction::Outbound, Some(&name), &other, &mut buf),
            Some(("web.shop.svc.cluster.local", Some(80)))
        );
        // Inbound: the caller's Host.
        assert_eq!(
            server_of(Direction::Inbound, Some(&ip), &web, &mut buf),
            Some(("web.shop.svc.cluster.local", None))
        );
        // An IPv6 literal, bare: `url.full` adds the brackets back.
        assert_eq!(
            server_of(
                Direction::Inbound,
                Some(&ip),
                &host("[fd00::10]", Some(8080)),
                &mut buf
            ),
            Some(("fd00::10", Some(8080)))
        );
    }
}
