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
//! A span starts when the request arrives and ends when the response head is
//! ready. Retries do not get spans of their own: the client span counts them
//! (`strait.retry.count`) and marks each with an event.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::Either;
use http::{Request, Response};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _,
};
use opentelemetry::{KeyValue, Value};
use strait_otel::opentelemetry_sdk::trace::SdkTracer;
use strait_otel::propagate;

use super::access_log::{AccessLog, Line};
use super::metrics::Direction;
use crate::defaults::PROXY_ERROR_HEADER;
use crate::identity::Identity;

/// Where spans and access-log lines go; `None` of both when neither is on.
#[derive(Clone, Debug)]
pub struct Observe {
    pub tracer: Option<SdkTracer>,
    /// No new trace is ever started: only callers' sampled traces are followed.
    pub never_start: bool,
    pub access_log: Option<AccessLog>,
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
}

/// In a request's extensions when its span or log line will be written.
#[derive(Clone, Debug)]
pub struct RequestNotes(Arc<Mutex<Notes>>, Option<opentelemetry::Context>);

impl RequestNotes {
    pub fn with(&self, f: impl FnOnce(&mut Notes)) {
        if let Ok(mut n) = self.0.lock() {
            f(&mut n);
        }
    }

    /// A retry is about to be sent: counted, and an event on the span.
    pub fn retried(&self) {
        let mut n = 0;
        self.with(|notes| {
            notes.retries += 1;
            n = notes.retries;
        });
        if let Some(cx) = &self.1 {
            cx.span().add_event(
                "retry",
                vec![KeyValue::new("strait.retry.attempt", i64::from(n))],
            );
        }
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
        }
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

type Traced<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

impl<S, B, RB> tower::Service<Request<B>> for Trace<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Either<S::Future, Traced<RB, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(observe) = self.layer.observe.clone() else {
            return Either::Left(self.inner.call(req));
        };
        let direction = self.layer.direction;
        let start = Instant::now();
        let span_cx = observe
            .tracer
            .as_ref()
            .and_then(|t| start_span(t, observe.never_start, direction, &mut req));
        if span_cx.is_none() && observe.access_log.is_none() {
            return Either::Left(self.inner.call(req));
        }
        let notes = Arc::new(Mutex::new(Notes {
            peer: self.layer.peer.clone(),
            ..Notes::default()
        }));
        req.extensions_mut()
            .insert(RequestNotes(notes.clone(), span_cx.clone()));
        let line = observe
            .access_log
            .as_ref()
            .map(|_| Line::of(&req, direction));
        let fut = self.inner.call(req);
        Either::Right(Box::pin(async move {
            let rsp = fut.await?;
            let notes = std::mem::take(&mut *notes.lock().unwrap_or_else(|p| p.into_inner()));
            let error = rsp
                .headers()
                .get(PROXY_ERROR_HEADER)
                .and_then(|v| v.to_str().ok());
            let status = rsp.status().as_u16();
            let trace_id = span_cx
                .as_ref()
                .map(|cx| cx.span().span_context().trace_id());
            if let Some(cx) = &span_cx {
                end_span(cx, direction, status, error, &notes);
            }
            if let (Some(log), Some(line)) = (&observe.access_log, line) {
                log.write(line.finish(status, start.elapsed(), &notes, trace_id, error));
            }
            Ok(rsp)
        }))
    }
}

/// Starts this request's span, child of the caller's context when it sent one,
/// and makes the span the context the next hop sees. `None`: not sampled. The
/// caller's unsampled context passes untouched; a new trace we chose not to
/// sample is passed on as unsampled, so the next proxy records none of it.
fn start_span<B>(
    tracer: &SdkTracer,
    never_start: bool,
    direction: Direction,
    req: &mut Request<B>,
) -> Option<opentelemetry::Context> {
    let parent = propagate::extract(req.headers());
    match &parent {
        Some((sc, _)) if !sc.is_sampled() => return None,
        None if never_start => return None,
        _ => {}
    }
    let parent_cx = match &parent {
        Some((sc, _)) => opentelemetry::Context::new().with_remote_span_context(sc.clone()),
        None => opentelemetry::Context::new(),
    };
    let kind = match direction {
        Direction::Outbound => SpanKind::Client,
        Direction::Inbound => SpanKind::Server,
    };
    let method = method_name(req.method());
    let mut attrs = Vec::with_capacity(8);
    attrs.push(KeyValue::new("http.request.method", method.clone()));
    let authority = req
        .uri()
        .authority()
        .map(|a| (a.host().to_string(), a.port_u16()))
        .or_else(|| {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            let a: http::uri::Authority = h.parse().ok()?;
            Some((a.host().to_string(), a.port_u16()))
        });
    // Outbound, the address is the destination the stages resolve (`end_span`).
    if let (Some((host, port)), Direction::Inbound) = (authority, direction) {
        attrs.push(KeyValue::new(
            "server.address",
            super::access_log::bounded(host),
        ));
        if let Some(p) = port {
            attrs.push(KeyValue::new("server.port", i64::from(p)));
        }
    }
    // Bounded: the export queue counts spans, so spans are bounded in size.
    attrs.push(KeyValue::new(
        "url.path",
        super::access_log::bounded(req.uri().path().to_string()),
    ));
    attrs.push(KeyValue::new(
        "network.protocol.version",
        protocol(req.version()),
    ));
    attrs.push(KeyValue::new("strait.direction", direction.as_str()));
    let span = tracer
        .span_builder(method)
        .with_kind(kind)
        .with_attributes(attrs)
        .start_with_context(tracer, &parent_cx);
    let sc: SpanContext = span.span_context().clone();
    // Not sampled by our ratio: the next hop is told so (`-00`), and follows
    // the decision rather than making its own.
    propagate::inject(req.headers_mut(), &sc, parent.map(|(_, f)| f));
    if !span.is_recording() {
        return None;
    }
    Some(parent_cx.with_span(span))
}

/// The method as a span name and attribute: the standard ones without an
/// allocation.
fn method_name(m: &http::Method) -> std::borrow::Cow<'static, str> {
    use http::Method;
    let known: &'static str = match *m {
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
        _ => "_OTHER",
    };
    std::borrow::Cow::Borrowed(known)
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        _ => "1.1",
    }
}

fn end_span(
    cx: &opentelemetry::Context,
    direction: Direction,
    status: u16,
    error: Option<&str>,
    notes: &Notes,
) {
    let span = cx.span();
    let mut attrs = vec![KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    )];
    // What the app addressed, rather than the listener it reached us on.
    match &notes.destination {
        Some(crate::addr::DestAddr::Name(n)) => {
            attrs.push(KeyValue::new("server.address", n.host().to_string()));
            attrs.push(KeyValue::new("server.port", i64::from(n.port())));
        }
        Some(crate::addr::DestAddr::Socket(a)) if direction == Direction::Outbound => {
            attrs.push(KeyValue::new("server.address", a.ip().to_string()));
            attrs.push(KeyValue::new("server.port", i64::from(a.port())));
        }
        _ => {}
    }
    // Names from configuration, shared rather than copied.
    let shared = |s: &Arc<str>| Value::String(opentelemetry::StringValue::from(s.clone()));
    if let Some((service, route, rule)) = &notes.route {
        attrs.push(KeyValue::new("strait.service", shared(service)));
        attrs.push(KeyValue::new("strait.route", shared(route)));
        attrs.push(KeyValue::new("strait.rule", shared(rule)));
    }
    if let Some(b) = &notes.backend {
        attrs.push(KeyValue::new("strait.backend", shared(b)));
    }
    if let Some(e) = notes.endpoint {
        attrs.push(KeyValue::new("network.peer.address", e.ip().to_string()));
        attrs.push(KeyValue::new("network.peer.port", i64::from(e.port())));
        attrs.push(KeyValue::new("strait.endpoint", e.to_string()));
    }
    if let Some(p) = &notes.peer {
        attrs.push(KeyValue::new("strait.peer.identity", p.to_string()));
    }
    attrs.push(KeyValue::new(
        "strait.retry.count",
        i64::from(notes.retries),
    ));
    if let Some(e) = error {
        attrs.push(KeyValue::new("strait.proxy.error", e.to_string()));
    }
    // Semantic conventions: 5xx is an error on both sides, 4xx on the client's.
    let failed = status >= 500 || (direction == Direction::Outbound && status >= 400);
    if failed {
        attrs.push(KeyValue::new("error.type", status.to_string()));
    }
    span.set_attributes(attrs);
    if failed {
        span.set_status(Status::error(error.unwrap_or_default().to_string()));
    }
    span.end();
}
