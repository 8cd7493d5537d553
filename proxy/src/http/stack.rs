//! The HTTP stack of a connection, the same in both directions but for how the
//! destination is chosen: the request's path through the proxy, on one screen.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tower::{Layer, ServiceBuilder};

use super::BoxBody;
use super::conn_guard::{ConnState, InFlightBody, InFlightCap, InFlightLayer};
use super::forward::{Forward, UpgradeConn};
use super::grpc::ErrorsLayer;
use super::metrics::RequestMetricsLayer;
use super::normalize::NormalizeLayer;
use super::request_body::RequestBody;
use super::server::{ConnMeta, serve_http1, serve_http2};
use crate::proxy::Shared;
use crate::telemetry::Direction;
use crate::telemetry::trace::TraceLayer;

/// A request body as the stack sees it: the client's, with its stall timeout.
pub type ClientBody = RequestBody<InFlightBody<Incoming>>;

#[derive(Clone, Debug)]
pub struct HttpStack {
    shared: Arc<Shared>,
    /// Requests in flight in this direction, over all its connections.
    cap: Arc<InFlightCap>,
    metrics: RequestMetricsLayer,
    grpc_errors: ErrorsLayer,
    normalize: NormalizeLayer,
    forward: Forward,
}

impl HttpStack {
    pub fn new(shared: Arc<Shared>, direction: Direction) -> Self {
        HttpStack {
            cap: InFlightCap::with_pressure(
                shared.config.max_in_flight_requests,
                shared.memory.clone(),
            ),
            metrics: RequestMetricsLayer::new(shared.metrics.clone(), direction),
            grpc_errors: ErrorsLayer::new(direction),
            normalize: NormalizeLayer::new(shared.metrics.clone(), direction),
            forward: Forward::new(
                shared.clients.clone(),
                shared.own.clone(),
                shared.tcp.clone(),
                shared.metrics.clone(),
                shared.drain.clone(),
                direction,
            ),
            shared,
        }
    }

    /// The last service of the stack: sends a request where it was decided.
    pub fn forward(&self) -> &Forward {
        &self.forward
    }

    /// Serves one connection already detected as HTTP/1 (`h2 == false`) or HTTP/2.
    pub async fn serve<I, L>(&self, io: I, h2: bool, dst: L, meta: &ConnMeta)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        L: Layer<Forward>,
        L::Service: tower::Service<Request<ClientBody>, Response = Response<BoxBody>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        <L::Service as tower::Service<Request<ClientBody>>>::Future: Send + 'static,
    {
        let s = &self.shared;
        let mut state = match meta.caller_share {
            true => ConnState::of_caller(self.cap.of_source(meta.client.0.ip())),
            // Inbound, spared its caller's share: plaintext HTTP/1 to a
            // probed port, the kubelet's probes.
            false if meta.direction == Direction::Inbound => ConnState::of_probes(),
            false => ConnState::default(),
        };
        // An HTTP/2 connection to one destination goes away after an answer
        // that it could not be reached, as an HTTP/1 one is closed: outbound
        // the app's, which resolves the name again; inbound a client's from
        // outside the mesh, when the app has stopped listening (shutting
        // down), which reconnects through its Service to a pod that serves.
        // A peer's carries every request of its pod.
        if h2 && meta.one_destination {
            state = state.closing_on_unreachable();
        }
        let state = Arc::new(state);
        let body_timeout = s.http.body_read_timeout;
        // Inbound, where mTLS is on, a caller with no verified identity gets
        // the proxy's own answers without their reasons (after the metrics
        // and the span have them).
        let unverified =
            meta.direction == Direction::Inbound && s.identity.is_some() && meta.peer.is_none();
        let redact = super::error::redact_if(unverified);
        let mut trace = TraceLayer::new(s.observe.clone(), meta.direction, meta.peer.clone());
        if meta.direction == Direction::Inbound {
            trace = trace.for_client(meta.client.0.ip());
        }
        if h2 {
            let tunnels = state.clone();
            let svc = ServiceBuilder::new()
                .layer(InFlightLayer::new(state.clone(), self.cap.clone()))
                // No stall timeout over HTTP/2: streams may rightly be quiet.
                // A CONNECT's tunnel keeps the connection busy while open.
                .map_request(move |req: Request<InFlightBody<Incoming>>| {
                    RequestBody::wrap(upgradable(req, &tunnels), None)
                })
                .layer(self.grpc_errors)
                .map_response(redact)
                .layer(self.metrics.for_peer(meta.caller.as_ref()))
                // Outside normalization, so a request it refuses (smuggling,
                // a bare LF) still leaves its span and access-log line.
                .layer(trace.clone())
                .layer(self.normalize.clone())
                .layer(dst)
                .service(self.forward.clone());
            serve_http2(io, svc, state, &s.http, meta, &s.drain).await;
        } else {
            let upgrades = state.clone();
            let svc = ServiceBuilder::new()
                .layer(InFlightLayer::new(state.clone(), self.cap.clone()))
                // Told when a request upgrades the connection. Only one hyper
                // can hand over (an `Upgrade` header, or CONNECT) may, whatever
                // a route's filters add to it later; the rest are spared it.
                .map_request(move |req: Request<InFlightBody<Incoming>>| {
                    RequestBody::wrap(upgradable(req, &upgrades), Some(body_timeout))
                })
                .layer(self.grpc_errors)
                .map_response(redact)
                .layer(self.metrics.for_peer(meta.caller.as_ref()))
                .layer(trace)
                .layer(self.normalize.clone())
                .layer(dst)
                .service(self.forward.clone());
            serve_http1(io, svc, state, &s.http, meta, &s.drain).await;
        }
    }
}

/// A request hyper could hand over (an `Upgrade` header, or CONNECT) carries
/// its connection, told when it does.
fn upgradable<B>(mut req: Request<B>, conn: &Arc<ConnState>) -> Request<B> {
    if req
        .extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_some()
    {
        req.extensions_mut().insert(UpgradeConn(conn.clone()));
    }
    req
}
