//! Serving one accepted connection as HTTP/1.1 or HTTP/2 with hyper, hardened:
//! header limits, slowloris and idle timeouts, HTTP/2 stream and reset limits, and
//! graceful shutdown on drain.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::BoxError;
use super::conn_guard::{ConnState, GuardedIo};
use crate::addr::ClientAddr;
use crate::defaults;
use crate::telemetry::{Direction, Metrics};
use crate::transport::Drain;
use crate::transport::coalesce::{Coalesced, FlushAfterPoll};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// hyper's connection settings, made once: a builder holds its timer
    /// behind an `Arc` that building one per connection would allocate again.
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl ServerConfig {
    pub fn new(
        header_read_timeout: Duration,
        body_read_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // GuardedIo times heads and idleness; hyper's single timer cannot tell them apart.
            .header_read_timeout(None)
            .keep_alive(true)
            .max_headers(defaults::MAX_HEADERS)
            .max_header_size(defaults::MAX_HEADER_BYTES);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(defaults::H2_MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(defaults::H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(defaults::H2_MAX_LOCAL_ERROR_RESET_STREAMS)
            .max_header_list_size(defaults::MAX_HEADER_BYTES as u32)
            .keep_alive_interval(defaults::H2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(defaults::H2_KEEPALIVE_TIMEOUT)
            // Fixed windows rather than adaptive ones: h2 sizes its budget for buffered
            // small DATA frames from the connection window, and a proxy holds many
            // small gRPC messages in flight at once.
            .initial_connection_window_size(defaults::H2_CONNECTION_WINDOW)
            .initial_stream_window_size(defaults::H2_STREAM_WINDOW);
        ServerConfig {
            header_read_timeout,
            body_read_timeout,
            idle_timeout,
            h1,
            h2,
        }
    }
}

/// Who is being served, for logs and metrics.
#[derive(Clone, Debug)]
pub struct ConnMeta {
    pub direction: Direction,
    pub client: ClientAddr,
    pub metrics: Arc<Metrics>,
    /// Inbound: the calling proxy's verified identity.
    pub peer: Option<crate::identity::Identity>,
}

pub async fn serve_http1<I, S, B>(
    io: I,
    svc: S,
    state: Arc<ConnState>,
    cfg: &ServerConfig,
    meta: &ConnMeta,
    drain: &Drain,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let io = GuardedIo::new(io, state.clone(), cfg.header_read_timeout, cfg.idle_timeout);
    // The connection is dropped before its tunnels are waited for below: an
    // upgrade hyper has not handed over yet is cancelled by the drop, and
    // would otherwise keep its tunnel waiting, and this, for ever.
    let res = {
        let conn = cfg
            .h1
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc))
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = drain.signaled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = res {
        let reason = if state.header_timed_out() {
            Some("header_timeout")
        } else if e.is_parse_too_large() {
            Some("headers_too_large")
        } else if e.is_parse() {
            Some("malformed")
        } else {
            None
        };
        match reason {
            Some(reason) => {
                meta.metrics.reject_http(meta.direction, reason);
                strait_otel::sampled!(info, direction = meta.direction.as_str(), client = %meta.client.0, reason, error = %e, "refused HTTP/1 request");
            }
            None => {
                debug!(direction = meta.direction.as_str(), client = %meta.client.0, error = %e, "HTTP/1 connection ended")
            }
        }
    }
    // hyper is done once it hands an upgraded stream over; the connection is
    // not, and keeps its place under the connection limit until the stream ends.
    state.tunnels_closed().await;
}

/// Serves HTTP/2; `state` is fed by the stack's `InFlightLayer`, so that a
/// connection with no stream for `cfg.idle_timeout` is closed (GOAWAY): PINGs
/// alone would keep it open for ever.
pub async fn serve_http2<I, S, B>(
    io: I,
    svc: S,
    state: Arc<ConnState>,
    cfg: &ServerConfig,
    meta: &ConnMeta,
    drain: &Drain,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // Each poll's writes leave together (transport::coalesce).
    let conn = FlushAfterPoll::new(cfg.h2.serve_connection(
        TokioIo::new(Coalesced::new(io)),
        TowerToHyperService::new(svc),
    ));
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.signaled() => {
            conn.as_mut().inner().graceful_shutdown();
            conn.await
        }
        _ = state.idle_for(cfg.idle_timeout) => {
            debug!(direction = meta.direction.as_str(), client = %meta.client.0, "idle HTTP/2 connection, closing");
            conn.as_mut().inner().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        // h2 answers protocol abuse (rapid reset, oversized headers) with GOAWAY itself.
        strait_otel::sampled!(info, direction = meta.direction.as_str(), client = %meta.client.0, error = %e, "HTTP/2 connection ended with an error");
    }
}
