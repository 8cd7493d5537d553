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
    /// Towards the app (the outbound listener): as many streams as the
    /// direction may have requests in flight. An app's client keeps one
    /// connection per destination and queues every call past the limit a
    /// server sets, unanswered; long-lived calls (watches, subscriptions)
    /// past 1,000 would have stopped every other call on it. The network's
    /// clients keep the bound.
    h2_app: http2::Builder<TokioExecutor>,
}

impl ServerConfig {
    pub fn new(
        header_read_timeout: Duration,
        body_read_timeout: Duration,
        idle_timeout: Duration,
        app_streams: usize,
    ) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // GuardedIo times heads and idleness; hyper's single timer cannot tell them apart.
            .header_read_timeout(None)
            .keep_alive(true)
            .max_headers(defaults::MAX_HEADERS)
            .max_header_size(defaults::MAX_HEADER_BYTES)
            .max_buf_size(defaults::HTTP1_MAX_BUF_BYTES);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(defaults::H2_MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(defaults::H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(defaults::H2_MAX_LOCAL_ERROR_RESET_STREAMS)
            .max_header_list_size(defaults::H2_MAX_HEADER_LIST_BYTES as u32)
            .max_send_buf_size(defaults::H2_MAX_SEND_BUF)
            .keep_alive_interval(defaults::H2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(defaults::H2_KEEPALIVE_TIMEOUT)
            // Fixed windows rather than adaptive ones: h2 sizes its budget for buffered
            // small DATA frames from the connection window, and a proxy holds many
            // small gRPC messages in flight at once.
            .initial_connection_window_size(defaults::H2_CONNECTION_WINDOW)
            .initial_stream_window_size(defaults::H2_STREAM_WINDOW);
        let mut h2_app = h2.clone();
        h2_app.max_concurrent_streams(u32::try_from(app_streams).unwrap_or(u32::MAX));
        // h2 refuses each frame on a stream it has forgotten (one answered
        // here before its body was read: an open breaker's 503, a timeout
        // during an upload) with a reset of its own, remembering 50 streams
        // for a second, and past 1,024 such resets over a connection's life
        // ends it with every stream on it. The cap guards against network
        // clients that make a server reset on purpose (CVE-2025-8671); the
        // app is the pod's own, and its one connection carries all its calls.
        h2_app.max_local_error_reset_streams(None);
        ServerConfig {
            header_read_timeout,
            body_read_timeout,
            idle_timeout,
            h1,
            h2,
            h2_app,
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
    /// Inbound: the caller's series (`Metrics::inbound_peer`), looked up once
    /// for the connection and shared by its request counts and decisions.
    pub caller: Option<Arc<crate::telemetry::metrics::PeerMetrics>>,
    /// Inbound: when that identity's certificate expires. Short-lived
    /// certificates are the mesh's revocation: no request is taken on the
    /// connection after it (HTTP/2 GOAWAY; HTTP/1 closed after the request
    /// in flight), and the calling proxy asks again on a new connection,
    /// with the certificate it holds then. What is in flight finishes.
    pub until: Option<tokio::time::Instant>,
    /// Inbound: whether the connection's requests count toward its caller's
    /// share of the requests in flight (`InFlightCap`): not a plaintext
    /// connection to a port the kubelet probes, whose address (the node's)
    /// others share.
    pub caller_share: bool,
    /// Every request of the connection goes to one destination (outbound,
    /// its original destination or an `--upstream` listener's; inbound, the
    /// app port a client outside the mesh was redirected from), so an answer
    /// that it cannot be reached is the connection's, not only the request's;
    /// not so for HTTP sent straight to the outbound port, or a peer proxy's,
    /// whose requests each name theirs.
    pub one_destination: bool,
}

/// Resolves at `until`, or never.
pub async fn expiry(until: Option<tokio::time::Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
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
    // hyper reads nothing while an answer waits to be written: a client that
    // stops reading (its window shut) would hold the connection, its slot and
    // the app's side of it for ever, as no read timer runs while a request is
    // in flight. A write that makes no progress for the body timeout fails.
    let io = strait_api::write_deadline::WriteDeadline::new(io, cfg.body_read_timeout);
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
            () = expiry(meta.until) => {
                debug!(client = %meta.client.0, "peer certificate expired; closing after the request in flight");
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
    // h2 reads on while its writes wait: a client that opens its windows
    // and reads nothing would hold the connection, and what each of its
    // streams has buffered, for as long as it sends a byte now and then
    // (which keeps the pings from noticing). As over HTTP/1, a write that
    // makes no progress for the body timeout ends the connection.
    let io = strait_api::write_deadline::WriteDeadline::new(io, cfg.body_read_timeout);
    // Each poll's writes leave together (transport::coalesce).
    let h2 = match meta.direction {
        Direction::Outbound => &cfg.h2_app,
        Direction::Inbound => &cfg.h2,
    };
    let conn = FlushAfterPoll::new(h2.serve_connection(
        TokioIo::new(Coalesced::new(io)),
        TowerToHyperService::new(svc),
    ));
    tokio::pin!(conn);
    // `Ok(bounded)`: shut down, and with `bounded` given up once nothing is
    // in flight; `Err`: the connection ended on its own.
    let shutdown = tokio::select! {
        r = conn.as_mut() => Err(r),
        _ = drain.signaled() => Ok(false),
        () = expiry(meta.until) => {
            debug!(client = %meta.client.0, "peer certificate expired; GOAWAY");
            Ok(true)
        }
        _ = state.idle_for(cfg.idle_timeout) => {
            debug!(direction = meta.direction.as_str(), client = %meta.client.0, "idle HTTP/2 connection, closing");
            Ok(true)
        }
        () = state.close_asked() => {
            debug!(direction = meta.direction.as_str(), client = %meta.client.0, "destination unreachable; GOAWAY");
            Ok(true)
        }
    };
    let res = match shutdown {
        Err(r) => r,
        Ok(bounded) => {
            conn.as_mut().inner().graceful_shutdown();
            if bounded {
                // A stream that raced the GOAWAY is let finish. A connection
                // still in its handshake (a preface sent in part) would take
                // the shutdown only once the handshake ended, never: given up
                // once nothing is in flight.
                loop {
                    match tokio::time::timeout(cfg.header_read_timeout, conn.as_mut()).await {
                        Ok(r) => break r,
                        Err(_) if !state.carrying() => break Ok(()),
                        Err(_) => {}
                    }
                }
            } else {
                conn.await
            }
        }
    };
    if let Err(e) = res {
        // h2 answers protocol abuse (rapid reset, oversized headers) with GOAWAY itself.
        strait_otel::sampled!(info, direction = meta.direction.as_str(), client = %meta.client.0, error = %e, "HTTP/2 connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Timeouts of 10 s (head), 30 s (body) and 120 s (idle), an inbound
    /// client, and a drain never signalled while the trigger lives.
    fn setup() -> (
        ServerConfig,
        ConnMeta,
        (crate::transport::drain::DrainTrigger, Drain),
    ) {
        let cfg = ServerConfig::new(
            Duration::from_secs(10),
            Duration::from_secs(30),
            Duration::from_secs(120),
            defaults::MAX_IN_FLIGHT_REQUESTS,
        );
        let meta = ConnMeta {
            direction: Direction::Inbound,
            client: crate::addr::ClientAddr("127.0.0.1:40000".parse().unwrap()),
            metrics: Metrics::new(),
            peer: None,
            caller: None,
            until: None,
            caller_share: false,
            one_destination: false,
        };
        (cfg, meta, crate::transport::drain::channel())
    }

    /// An HTTP/1 upload's body reaches the proxy in chunks no larger than its
    /// buffer bound, however fast the client sends: each chunk is held whole
    /// until the next hop takes it, so their size is the memory an upload
    /// costs. A head as large as the head limit still fits.
    #[tokio::test]
    async fn an_upload_comes_in_bounded_chunks() {
        use http_body_util::BodyExt as _;
        let (mut client, server) = tokio::io::duplex(4 << 20);
        let (cfg, meta, (_trigger, drain)) = setup();
        let (tx, mut chunks) = tokio::sync::mpsc::unbounded_channel();
        let svc = tower::service_fn(move |req: Request<Incoming>| {
            let tx = tx.clone();
            async move {
                let mut body = req.into_body();
                while let Some(f) = body.frame().await {
                    if let Ok(d) = f.unwrap().into_data() {
                        let _ = tx.send(d.len());
                    }
                }
                Ok::<_, Infallible>(Response::new(super::super::empty()))
            }
        });
        let state = Arc::new(ConnState::default());
        tokio::spawn(async move {
            serve_http1(server, svc, state, &cfg, &meta, &drain).await;
        });
        let len = 4 << 20;
        let big_field = "a".repeat(defaults::MAX_HEADER_BYTES - 200);
        let head = format!(
            "POST / HTTP/1.1\r\nhost: x\r\nx-big: {big_field}\r\ncontent-length: {len}\r\n\r\n"
        );
        client.write_all(head.as_bytes()).await.unwrap();
        client.write_all(&vec![b'x'; len]).await.unwrap();
        let mut answer = [0u8; 12];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        let (mut total, mut largest) = (0, 0);
        while let Ok(n) = chunks.try_recv() {
            total += n;
            largest = largest.max(n);
        }
        assert_eq!(total, len);
        // The buffer's allocation may round up past the bound (it grows by
        // doubling, and the head had it grown): half a MiB without the bound.
        assert!(
            largest <= 2 * defaults::HTTP1_MAX_BUF_BYTES,
            "a chunk of {largest} bytes"
        );
    }

    /// Frames a caller sends on a stream that has ended here (answered
    /// before its body was read) are ignored while h2 remembers the stream
    /// (50 at most, for a second), and past that each is refused with a
    /// reset of h2's own, capped at 1,024 for a connection's life: the app's
    /// connection, carrying all its calls, is not ended for them; a network
    /// client's still is.
    #[tokio::test]
    async fn late_frames_end_a_network_client_s_connection_only() {
        /// Reads frames until `want` HEADERS have come; false at a GOAWAY or
        /// the connection's end.
        async fn answers(client: &mut tokio::io::DuplexStream, want: usize) -> bool {
            let mut answered = 0;
            while answered < want {
                let mut head = [0u8; 9];
                if client.read_exact(&mut head).await.is_err() {
                    return false;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                if client.read_exact(&mut vec![0; len]).await.is_err() {
                    return false;
                }
                match head[3] {
                    7 => return false,
                    4 if head[4] & 1 == 0 => {
                        let _ = client.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await;
                    }
                    1 => answered += 1,
                    _ => {}
                }
            }
            true
        }
        /// Whether the connection still answers after 1,250 frames on
        /// streams h2 no longer remembers.
        async fn still_answers(direction: Direction) -> bool {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let (cfg, mut meta, (_trigger, drain)) = setup();
            meta.direction = direction;
            let svc = tower::service_fn(|_: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(super::super::empty()))
            });
            let state = Arc::new(ConnState::default());
            tokio::spawn(async move {
                serve_http2(server, svc, state, &cfg, &meta, &drain).await;
            });
            client
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
            client
                .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
                .await
                .unwrap();
            // HEADERS (`:method GET`, `:scheme http`, `:path /`), a body
            // still to come unless `end`.
            let headers = |id: u32, end: bool| {
                let mut f = vec![0, 0, 3, 1, if end { 5 } else { 4 }];
                f.extend_from_slice(&id.to_be_bytes());
                f.extend_from_slice(&[0x82, 0x86, 0x84]);
                f
            };
            let mut next = 1u32;
            for _ in 0..25 {
                let ids: Vec<u32> = (0..100).map(|i| next + 2 * i).collect();
                next += 200;
                for id in &ids {
                    if client.write_all(&headers(*id, false)).await.is_err() {
                        return false;
                    }
                }
                if !answers(&mut client, ids.len()).await {
                    return false;
                }
                // An empty DATA frame on each, answered and reset: 50 at
                // most are remembered.
                for id in &ids {
                    let mut f = vec![0, 0, 0, 0, 0];
                    f.extend_from_slice(&id.to_be_bytes());
                    if client.write_all(&f).await.is_err() {
                        return false;
                    }
                }
            }
            client.write_all(&headers(next, true)).await.is_ok() && answers(&mut client, 1).await
        }
        assert!(
            still_answers(Direction::Outbound).await,
            "the app's connection was ended"
        );
        assert!(
            !still_answers(Direction::Inbound).await,
            "a network client's was not"
        );
    }

    /// A client that sends part of the HTTP/2 preface and then nothing holds
    /// its connection (and its place under the listener's limit) no longer
    /// than an idle one: hyper's handshake has no timer of its own.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_http2_preface_is_closed_as_idle() {
        let (mut client, server) = tokio::io::duplex(1024);
        let (cfg, meta, (_trigger, drain)) = setup();
        let svc = tower::service_fn(|_: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(super::super::empty()))
        });
        let state = Arc::new(ConnState::default());
        let served = tokio::spawn(async move {
            serve_http2(server, svc, state, &cfg, &meta, &drain).await;
        });
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let start = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(3600), served)
            .await
            .expect("held an hour")
            .unwrap();
        assert!(
            start.elapsed() <= Duration::from_secs(130),
            "closed after {:?}",
            start.elapsed()
        );
    }

    /// A peer whose certificate expires is served no longer on a connection
    /// it keeps busy: it is closed at the expiry, not left open while
    /// requests keep coming.
    #[tokio::test(start_paused = true)]
    async fn a_connection_ends_when_its_peers_certificate_does() {
        let (mut client, server) = tokio::io::duplex(4096);
        let (cfg, mut meta, (_trigger, drain)) = setup();
        let start = tokio::time::Instant::now();
        meta.until = Some(start + Duration::from_secs(5));
        let svc = tower::service_fn(|_: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(super::super::empty()))
        });
        let state = Arc::new(ConnState::default());
        let served = tokio::spawn(async move {
            serve_http1(server, svc, state, &cfg, &meta, &drain).await;
        });
        // A request a second, each answered, until the connection ends.
        let mut answered = 0;
        loop {
            let asked = client.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
            let mut buf = [0u8; 1024];
            match (asked, client.read(&mut buf).await) {
                (Ok(()), Ok(n)) if n > 0 => answered += 1,
                _ => break,
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(start.elapsed() < Duration::from_secs(60), "still served");
        }
        tokio::time::timeout(Duration::from_secs(1), served)
            .await
            .expect("the connection's task ended")
            .unwrap();
        assert!((5..=6).contains(&answered), "{answered} answered");
        assert!(
            start.elapsed() <= Duration::from_secs(7),
            "{:?}",
            start.elapsed()
        );
    }

    /// A client that asks and then reads nothing of a large answer (its
    /// window shut) loses the connection once the write has made no
    /// progress for the body timeout, rather than holding it for ever.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off() {
        let (mut client, server) = tokio::io::duplex(1024);
        let (cfg, meta, (_trigger, drain)) = setup();
        let svc = tower::service_fn(
            |_: Request<super::super::conn_guard::InFlightBody<Incoming>>| async {
                // Streamed, as hyper takes a whole body at once into its buffer.
                let chunks = futures_util::stream::iter((0..64).map(|_| {
                    Ok(http_body::Frame::data(bytes::Bytes::from(vec![
                        b'x';
                        16384
                    ])))
                }));
                Ok::<_, Infallible>(Response::new(super::super::BoxBody::new(
                    http_body_util::StreamBody::new(chunks),
                )))
            },
        );
        let state = Arc::new(ConnState::default());
        // As the stack has it: the guard knows a request is in flight.
        let svc = tower::Layer::layer(
            &super::super::conn_guard::InFlightLayer::new(
                state.clone(),
                super::super::conn_guard::InFlightCap::new(8),
            ),
            svc,
        );
        let served = tokio::spawn(async move {
            serve_http1(server, svc, state, &cfg, &meta, &drain).await;
        });
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let start = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(3600), served)
            .await
            .expect("held an hour")
            .unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "closed after {waited:?}"
        );
        // What was written before it stalled is there; the rest never came.
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got).await;
        assert!(got.starts_with(b"HTTP/1.1 200"));
        assert!(got.len() < 1 << 20, "{} bytes", got.len());
    }
}
