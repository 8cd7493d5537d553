//! Connections to upstreams, per upstream address, HTTP version and (towards a
//! peer proxy) expected identity: one shared HTTP/2 connection, or a pool of
//! HTTP/1 ones. Requests keep their own `Host`/`:authority` while the connection
//! goes where the proxy decided, and a Host never opens a connection of its own.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::BoxBody;
use crate::defaults;
use crate::identity::{Identity, tls};
use crate::transport::coalesce::{Coalesced, FlushAfterPollExecutor};
use crate::transport::connect;
pub use crate::transport::connect::{ConnectError, PeerTls};

pub type HttpClient = Client<Connector, BoxBody>;

/// Connects to one fixed address, whatever the request's URI says; to a peer
/// proxy, over mTLS that verifies the peer's identity.
#[derive(Clone, Debug)]
pub struct Connector {
    addr: SocketAddr,
    timeout: Duration,
    tls: PeerMode,
}

#[derive(Clone, Debug)]
enum PeerMode {
    Plain,
    Mtls(PeerTls, Identity, &'static [u8]),
    /// Plaintext to an HTTP forward proxy (HTTP/1 only).
    ForwardProxy,
}

/// A connection to an upstream: plaintext, or mTLS to a peer proxy; or
/// plaintext to an HTTP forward proxy (Squid, an egress proxy), to which
/// requests go in absolute form (`GET http://host/path`), as the app sent
/// them: in origin form a forward proxy cannot tell where to.
#[derive(Debug)]
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<PeerStream>),
    ToProxy(TcpStream),
}

/// An mTLS connection to a peer proxy, and the alert the peer refused this
/// proxy's certificate with, once it has: in TLS 1.3 that comes on the first
/// read, after the handshake, and HTTP/2 keeps only the kind of an I/O
/// error, so it is noted where it is read.
#[derive(Debug)]
pub struct PeerStream {
    tls: TlsStream<TcpStream>,
    refused: Arc<OnceLock<rustls::AlertDescription>>,
    /// Outbound handshake failures, which the refusal is (once).
    failures: prometheus_client::metrics::counter::Counter,
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        match self {
            UpstreamIo::Tls(t) if t.tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_H2) => {
                c.negotiated_h2()
            }
            UpstreamIo::ToProxy(_) => c.proxy(true),
            _ => c,
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) | UpstreamIo::ToProxy(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => {
                let read = Pin::new(&mut s.tls).poll_read(cx, buf);
                if let Poll::Ready(Err(e)) = &read
                    && let Some(alert) = tls::refused_our_certificate(e)
                    && s.refused.set(alert).is_ok()
                {
                    s.failures.inc();
                }
                read
            }
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) | UpstreamIo::ToProxy(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut s.tls).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) | UpstreamIo::ToProxy(s) => {
                Pin::new(s).poll_write_vectored(cx, bufs)
            }
            UpstreamIo::Tls(s) => Pin::new(&mut s.tls).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) | UpstreamIo::ToProxy(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) | UpstreamIo::ToProxy(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut s.tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) | UpstreamIo::ToProxy(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut s.tls).poll_shutdown(cx),
        }
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamIo>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (addr, timeout, tls) = (self.addr, self.timeout, self.tls.clone());
        Box::pin(async move {
            match tls {
                PeerMode::Plain => Ok(TokioIo::new(UpstreamIo::Plain(
                    connect::tcp(addr, timeout).await?,
                ))),
                PeerMode::ForwardProxy => Ok(TokioIo::new(UpstreamIo::ToProxy(
                    connect::tcp(addr, timeout).await?,
                ))),
                PeerMode::Mtls(peer_tls, peer, alpn) => {
                    let s = peer_tls.connect(addr, &peer, alpn, timeout).await?;
                    Ok(TokioIo::new(UpstreamIo::Tls(Box::new(PeerStream {
                        tls: s,
                        refused: Arc::default(),
                        failures: peer_tls.handshake_failures(),
                    }))))
                }
            }
        })
    }
}

/// HTTP/2 connections to an upstream, shared by every request to it whatever its
/// `:authority` (hyper's pooled client keys connections by authority, which would
/// open one per Host a client cares to send). A request takes the first
/// connection with a stream to spare under the peer's
/// `SETTINGS_MAX_CONCURRENT_STREAMS`; when every one is full another is opened
/// (up to `H2_MAX_CONNECTIONS_PER_UPSTREAM`), so concurrency past one
/// connection's limit does not queue. Each connection closes when unused for
/// `POOL_IDLE_TIMEOUT`.
#[derive(Clone)]
pub struct H2Client {
    inner: Arc<H2Inner>,
}

struct H2Inner {
    connector: Connector,
    /// PING interval and timeout, if pinged (`keepalive_for`).
    keepalive: Option<(Duration, Duration)>,
    state: Mutex<H2State>,
    /// Held while connecting, so that requests arriving together share one
    /// connection (or one failure) instead of each opening their own.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// Tells requests waiting on a connect that a stream was given back.
    room: Arc<Room>,
}

/// Requests waiting on a connect (every connection full) take a stream given
/// back on an open one meanwhile, rather than wait out a slow connect (a peer
/// whose accept queue drops SYNs is slow to connect to just when it is busy).
#[derive(Default)]
struct Room {
    /// How many wait: a stream given back with none waiting tells nobody,
    /// so a request pays one load for this.
    waiting: AtomicUsize,
    freed: tokio::sync::Notify,
}

impl Room {
    /// Counts a request as waiting for as long as the guard lives.
    fn wait(self: &Arc<Self>) -> impl Drop {
        // SeqCst with `StreamSlot::release`: a waiter that then finds no room
        // is either seen waiting by the giver or sees the stream given back.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let room = self.clone();
        scopeguard(move || {
            room.waiting.fetch_sub(1, Ordering::SeqCst);
        })
    }

    /// Waits for `fut`, unless `look` finds a stream first: it looks now and
    /// each time one is given back (`Err` holds what it found).
    async fn unless_freed<F: Future>(
        &self,
        mut fut: Pin<&mut F>,
        look: impl Fn() -> Option<(H2Conn, StreamSlot)>,
    ) -> Result<F::Output, (H2Conn, StreamSlot)> {
        loop {
            // Enabled (registered with the Notify) before looking, so that a
            // stream given back after the look is not missed: without the
            // `enable`, the wake-up could come before the wait.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(found) = look() {
                return Err(found);
            }
            tokio::select! {
                out = &mut fut => return Ok(out),
                () = freed => {}
            }
        }
    }
}

#[derive(Default)]
struct H2State {
    /// Open connections, oldest first: requests fill the oldest, so the newer
    /// ones go idle and close when the burst is over.
    conns: Vec<H2Conn>,
    /// Connect attempts so far, and how the last one failed: requests that
    /// waited on an attempt that failed fail with it.
    attempts: u64,
    /// Whether attempt `attempts` is still under way.
    connecting: bool,
    failed: Option<(u64, ConnectError)>,
    /// When the last attempt failed: for a while after, requests that find
    /// every connection full wait on one rather than try again each.
    failed_at: Option<std::time::Instant>,
}

#[derive(Clone)]
struct H2Conn {
    n: u64,
    sender: SendRequest<BoxBody>,
    load: Arc<ConnLoad>,
}

/// What the pool knows of one connection's use.
struct ConnLoad {
    /// Streams taken and not yet given back (the response body is done or dropped).
    streams: AtomicUsize,
    /// The peer's concurrent-stream limit as last seen by the connection task.
    max_streams: AtomicUsize,
    /// Requests sent so far, to notice an idle connection.
    requests: AtomicU64,
    room: Arc<Room>,
    /// A peer proxy's refusal of this proxy's certificate, as read.
    refused: Option<Arc<OnceLock<rustls::AlertDescription>>>,
}

impl H2Conn {
    fn has_room(&self) -> bool {
        self.load.streams.load(Ordering::SeqCst) < self.load.max_streams.load(Ordering::Relaxed)
    }

    fn take(&self) -> StreamSlot {
        self.load.streams.fetch_add(1, Ordering::Relaxed);
        self.load.requests.fetch_add(1, Ordering::Relaxed);
        StreamSlot(Some(self.load.clone()))
    }
}

/// One stream of a connection, given back when dropped.
struct StreamSlot(Option<Arc<ConnLoad>>);

impl StreamSlot {
    fn release(&mut self) {
        if let Some(load) = self.0.take() {
            load.streams.fetch_sub(1, Ordering::SeqCst);
            // One stream, one waiter: waking them all would have each look
            // under the pool's lock for the one stream, N looks per stream
            // given back while N wait. A waiter woken and gone before it
            // looks (its connect done, its request dropped) passes the
            // wake-up on (tokio's `Notified` does on drop); with none
            // registered it is kept for the next to wait.
            if load.room.waiting.load(Ordering::SeqCst) > 0 {
                load.room.freed.notify_one();
            }
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// An upstream's response body; over HTTP/2 it holds its stream's place in the
/// pool until it ends.
pub struct UpstreamBody {
    inner: Incoming,
    slot: StreamSlot,
}

impl UpstreamBody {
    fn new(inner: Incoming, slot: StreamSlot) -> Self {
        UpstreamBody { inner, slot }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = polled {
            self.slot.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for H2Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Client")
            .field("addr", &self.inner.connector.addr)
            .finish()
    }
}

/// Why a request to an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Pooled(#[from] hyper_util::client::legacy::Error),
}

impl ConnectError {
    /// The same error, for every request that waited on one connect attempt.
    fn duplicate(&self) -> ConnectError {
        match self {
            ConnectError::Timeout { addr, after } => ConnectError::Timeout {
                addr: *addr,
                after: *after,
            },
            ConnectError::Io { addr, source } => ConnectError::Io {
                addr: *addr,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            ConnectError::Tls { addr, reason } => ConnectError::Tls {
                addr: *addr,
                reason: reason.clone(),
            },
            ConnectError::OwnCertificate { addr, reason } => ConnectError::OwnCertificate {
                addr: *addr,
                reason,
            },
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Where a request goes: a stream on an open connection, or a new connection.
enum Pick {
    Stream(H2Conn, StreamSlot),
    Connect,
}

impl H2Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, H2State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream on the oldest open connection with room; past the connection
    /// limit, on the least loaded one (the request waits there for a stream).
    fn pick(&self) -> Pick {
        let mut st = self.state();
        st.conns.retain(|c| c.sender.is_ready());
        if let Some(c) = st.conns.iter().find(|c| c.has_room()) {
            return Pick::Stream(c.clone(), c.take());
        }
        let retry_soon = st
            .failed_at
            .is_some_and(|t| t.elapsed() < defaults::H2_CONNECT_BACKOFF);
        if st.conns.len() < defaults::H2_MAX_CONNECTIONS_PER_UPSTREAM
            && (st.conns.is_empty() || !retry_soon)
        {
            return Pick::Connect;
        }
        match least_loaded(st.conns.iter()) {
            Some((c, slot)) => Pick::Stream(c, slot),
            None => Pick::Connect,
        }
    }

    /// A stream on an open connection with room, if there is one.
    fn room_now(&self) -> Option<(H2Conn, StreamSlot)> {
        let st = self.state();
        let c = st
            .conns
            .iter()
            .find(|c| c.sender.is_ready() && c.has_room())?;
        Some((c.clone(), c.take()))
    }

    /// A stream on any open connection, room or not.
    fn any(&self) -> Option<(H2Conn, StreamSlot)> {
        least_loaded(self.state().conns.iter().filter(|c| c.sender.is_ready()))
    }

    /// Stops handing out connection `n`; it closes once its streams are done.
    fn forget(&self, n: u64) {
        self.state().conns.retain(|c| c.n != n);
    }
}

/// A peer proxy is across the network, where a node can die without a reset:
/// pinged, and given up on quickly. Nothing else is pinged: gRPC servers
/// (grpc-go, grpc-java, C-core) take one PING per 5 minutes from a client
/// while they send nothing, and at the third too soon close the connection
/// (`too_many_pings`), failing every call on it: a watch quiet for a minute
/// would have cost all of them. An app (the pod's own) resets if it dies,
/// and TCP keepalive (`transport::connect::keepalive`) notices any upstream
/// whose node is gone. (With identities off a peer proxy is `Plain` too, and
/// is left to TCP keepalive likewise.)
fn keepalive_for(tls: &PeerMode) -> Option<(Duration, Duration)> {
    match tls {
        PeerMode::Mtls(..) => Some((
            defaults::H2_PEER_KEEPALIVE_INTERVAL,
            defaults::H2_PEER_KEEPALIVE_TIMEOUT,
        )),
        PeerMode::Plain | PeerMode::ForwardProxy => None,
    }
}

impl H2Client {
    fn new(connector: Connector) -> Self {
        let keepalive = keepalive_for(&connector.tls);
        Self::with_keepalive(connector, keepalive)
    }

    fn with_keepalive(connector: Connector, keepalive: Option<(Duration, Duration)>) -> Self {
        H2Client {
            inner: Arc::new(H2Inner {
                connector,
                keepalive,
                state: Mutex::default(),
                connecting: Arc::default(),
                room: Arc::default(),
            }),
        }
    }

    async fn checkout(&self) -> Result<(H2Conn, StreamSlot), ClientError> {
        if let Pick::Stream(c, s) = self.inner.pick() {
            return Ok((c, s));
        }
        // The attempts whose outcome is known: one under way now is one this
        // request waits on, and fails with.
        let attempts_before = {
            let st = self.inner.state();
            st.attempts - u64::from(st.connecting)
        };
        let _waiting = self.inner.room.wait();
        let lock = self.inner.connecting.clone().lock_owned();
        tokio::pin!(lock);
        let picked = || match self.inner.pick() {
            Pick::Stream(c, s) => Some((c, s)),
            Pick::Connect => None,
        };
        let connecting = match self.inner.room.unless_freed(lock, picked).await {
            Ok(connecting) => connecting,
            Err(picked) => return Ok(picked),
        };
        if let Pick::Stream(c, s) = self.inner.pick() {
            return Ok((c, s));
        }
        let attempt = {
            let mut st = self.inner.state();
            if st.attempts > attempts_before
                && let Some((a, e)) = &st.failed
                && *a == st.attempts
            {
                // An attempt made while we waited failed: so do we, at once,
                // unless a connection is open to wait on.
                let e = e.duplicate();
                drop(st);
                return self.inner.any().ok_or_else(|| e.into());
            }
            st.attempts += 1;
            st.connecting = true;
            st.attempts
        };
        // The attempt runs on its own: a request that gives up (its client
        // gone, its deadline past) does not take the connect with it, and the
        // requests after it wait on this one rather than start over, which
        // under handshakes slower than the requests' deadlines would never
        // connect at all.
        let me = self.clone();
        let attempt = tokio::spawn(async move {
            // The next request looks once the outcome is recorded.
            let _connecting = connecting;
            // Cleared however the attempt ends, the runtime stopping included.
            let _attempt_done = scopeguard(|| me.inner.state().connecting = false);
            let connected = me.connect(attempt).await;
            let mut st = me.inner.state();
            // With the outcome, under one lock: a request looking in between
            // would see neither.
            st.connecting = false;
            match connected {
                Ok(conn) => {
                    let slot = conn.take();
                    st.failed = None;
                    st.failed_at = None;
                    st.conns.push(conn.clone());
                    Ok((conn, slot))
                }
                Err(e) => {
                    st.failed = Some((attempt, e.duplicate()));
                    st.failed_at = Some(std::time::Instant::now());
                    Err(e)
                }
            }
        });
        tokio::pin!(attempt);
        let attempted = match self
            .inner
            .room
            .unless_freed(attempt, || self.inner.room_now())
            .await
        {
            Ok(attempted) => attempted,
            Err(picked) => return Ok(picked),
        };
        let e = match attempted {
            Ok(Ok(picked)) => return Ok(picked),
            Ok(Err(e)) => e,
            // The runtime is stopping (the task cannot panic).
            Err(e) => ConnectError::Io {
                addr: self.inner.connector.addr,
                source: std::io::Error::other(e),
            },
        };
        match self.inner.any() {
            Some(open) => {
                tracing::debug!(upstream = %self.inner.connector.addr, error = %e, "another HTTP/2 connection failed; queueing on an open one");
                Ok(open)
            }
            None => Err(e.into()),
        }
    }

    async fn connect(&self, n: u64) -> Result<H2Conn, ConnectError> {
        let addr = self.inner.connector.addr;
        let io = tower::Service::call(&mut self.inner.connector.clone(), Uri::default()).await?;
        let mut b = hyper::client::conn::http2::Builder::new(FlushAfterPollExecutor);
        b.timer(TokioTimer::new());
        if let Some((interval, timeout)) = self.inner.keepalive {
            b.keep_alive_interval(interval).keep_alive_timeout(timeout);
        }
        b.initial_connection_window_size(defaults::H2_CONNECTION_WINDOW)
            .initial_stream_window_size(defaults::H2_STREAM_WINDOW)
            // As the peer's server takes: a head an app may send over HTTP/1
            // comes back whole, rather than as a stream error (and past
            // about 112 KB a GOAWAY that fails every stream of the connection).
            .max_header_list_size(defaults::H2_MAX_HEADER_LIST_BYTES as u32)
            // A request body waiting on the peer's window holds this much
            // per stream, not hyper's 1 MiB (as the server's answers).
            .max_send_buf_size(defaults::H2_MAX_SEND_BUF)
            // Frames on a stream a caller cancelled, in flight as it did, are
            // ignored while h2 remembers the stream (for a second), and each
            // refused with a reset of h2's own once it has forgotten it; h2
            // caps those for the connection's whole life (it bounds what an
            // upstream that sends frames on old streams and reads nothing
            // can pile up), and past the cap the connection and all its
            // streams go. Remembered as many as may be open, not 50, the
            // frames of a burst of cancellations are not refused.
            .max_concurrent_reset_streams(defaults::H2_MAX_CONCURRENT_STREAMS as usize);
        // Until its SETTINGS arrive, a connection assumes the limit the others to
        // this upstream have seen (a peer proxy's is known): a burst that opened
        // it must not overshoot and have streams refused.
        let seen = self
            .inner
            .state()
            .conns
            .iter()
            .map(|c| c.load.max_streams.load(Ordering::Relaxed))
            .max();
        match (seen, &self.inner.connector.tls) {
            (Some(max), _) => {
                b.initial_max_send_streams(max);
            }
            (None, PeerMode::Mtls(..)) => {
                b.initial_max_send_streams(defaults::H2_MAX_CONCURRENT_STREAMS as usize);
            }
            (None, PeerMode::Plain | PeerMode::ForwardProxy) => {}
        }
        let refused = match io.inner() {
            UpstreamIo::Tls(s) => Some(s.refused.clone()),
            _ => None,
        };
        let io = TokioIo::new(Coalesced::new(io.into_inner()));
        let (sender, conn) = b.handshake(io).await.map_err(|e| ConnectError::Io {
            addr,
            source: io::Error::other(format!("HTTP/2 handshake: {e}")),
        })?;
        let load = Arc::new(ConnLoad {
            streams: AtomicUsize::new(0),
            max_streams: AtomicUsize::new(conn.current_max_send_streams()),
            requests: AtomicU64::new(0),
            room: self.inner.room.clone(),
            refused,
        });
        let inner = Arc::downgrade(&self.inner);
        let watched = load.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            // Polls the connection, and keeps the pool's view of the peer's
            // stream limit current (SETTINGS may change it at any time). hyper
            // drives the socket in a task of its own; this one is polled as
            // requests are handed to it, so the view is as of the last one.
            let mut conn = std::future::poll_fn(move |cx| {
                let polled = conn.as_mut().poll(cx);
                watched
                    .max_streams
                    .store(conn.current_max_send_streams(), Ordering::Relaxed);
                polled
            });
            let mut seen = u64::MAX;
            let ended = loop {
                tokio::select! {
                    r = &mut conn => break r,
                    _ = tokio::time::sleep(defaults::POOL_IDLE_TIMEOUT) => {
                        let Some(inner) = inner.upgrade() else { break conn.await };
                        match load_of(&inner, n) {
                            // Busy: new requests, or streams still open (a
                            // gRPC stream, server-sent events), which would
                            // otherwise keep it open outside the set while
                            // another connection replaced it.
                            Some((sent, open)) if sent != seen || open > 0 => seen = sent,
                            // Idle (no new request since the last look) or no
                            // longer handed out: it closes once the streams in
                            // flight are done.
                            _ => {
                                inner.forget(n);
                                drop(inner);
                                break conn.await;
                            }
                        }
                    }
                }
            };
            // Ended (a dead peer's PING timed out, a GOAWAY): out of the set
            // now rather than at the next request's look.
            if let Some(inner) = inner.upgrade() {
                inner.forget(n);
            }
            if let Err(e) = ended {
                tracing::debug!(upstream = %addr, error = %e, "HTTP/2 connection to upstream ended");
            }
        });
        Ok(H2Conn { n, sender, load })
    }

    /// Checks out a stream and sends on it (the forwarder does the two apart).
    #[cfg(test)]
    async fn request(
        &self,
        req: http::Request<BoxBody>,
    ) -> Result<http::Response<UpstreamBody>, ClientError> {
        let (conn, slot) = self.checkout().await?;
        self.send(conn, slot, req).await.map_err(|e| e.error)
    }

    /// Sends on a checked-out stream (the connection is the pool's clone, to
    /// send on as it is). A request the connection did not take (it was
    /// closing) is sent again once, on another connection: it never reached the
    /// upstream. If no other connection takes it, it comes back unsent.
    async fn send(
        &self,
        mut conn: H2Conn,
        mut slot: StreamSlot,
        mut req: http::Request<BoxBody>,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        let mut again = false;
        loop {
            let mut e = match conn.sender.try_send_request(req).await {
                Ok(rsp) => return Ok(rsp.map(|b| UpstreamBody::new(b, slot))),
                Err(e) => e,
            };
            // A peer that refused this proxy's certificate refuses it on
            // another connection too: its word is what the caller is told,
            // and the app never saw the request.
            if let Some(alert) = conn.load.refused.as_ref().and_then(|r| r.get()) {
                return Err(SendError {
                    error: ConnectError::Tls {
                        addr: self.inner.connector.addr,
                        reason: format!("{} (TLS alert {alert:?})", tls::REFUSED_OUR_CERTIFICATE),
                    }
                    .into(),
                    unsent: e.take_message(),
                });
            }
            let Some(back) = e.take_message() else {
                return Err(ClientError::from(e.into_error()).into());
            };
            if again {
                return Err(SendError {
                    error: ConnectError::Io {
                        addr: self.inner.connector.addr,
                        source: io::Error::from(io::ErrorKind::ConnectionAborted),
                    }
                    .into(),
                    unsent: Some(back),
                });
            }
            self.inner.forget(conn.n);
            drop(slot);
            (conn, slot) = match self.checkout().await {
                Ok(c) => c,
                Err(error) => {
                    return Err(SendError {
                        error,
                        unsent: Some(back),
                    });
                }
            };
            req = back;
            again = true;
        }
    }

    /// Connect attempts made so far.
    #[cfg(test)]
    fn attempts(&self) -> u64 {
        self.inner.state().attempts
    }

    /// Open connections and the streams each has in use.
    #[cfg(test)]
    fn streams(&self) -> Vec<usize> {
        self.inner
            .state()
            .conns
            .iter()
            .map(|c| c.load.streams.load(Ordering::Relaxed))
            .collect()
    }
}

/// A stream on the connection with the fewest in use.
fn least_loaded<'a>(conns: impl Iterator<Item = &'a H2Conn>) -> Option<(H2Conn, StreamSlot)> {
    conns
        .min_by_key(|c| c.load.streams.load(Ordering::Relaxed))
        .map(|c| (c.clone(), c.take()))
}

/// Requests sent so far on connection `n`, if the pool still hands it out.
/// Requests sent on connection `n` so far, and its streams open now.
fn load_of(inner: &H2Inner, n: u64) -> Option<(u64, usize)> {
    inner.state().conns.iter().find(|c| c.n == n).map(|c| {
        (
            c.load.requests.load(Ordering::Relaxed),
            c.load.streams.load(Ordering::Relaxed),
        )
    })
}

/// A client for one upstream and HTTP version.
#[derive(Clone, Debug)]
pub enum UpstreamClient {
    /// HTTP/1: a pool of connections, one request at a time on each.
    Http1(Arc<HttpClient>),
    Http2(H2Client),
}

/// A client ready to send one request: over HTTP/2 a stream is already
/// checked out (its connection made if there was none), so a failure to
/// connect comes before the request is given up, and the caller still has it.
pub struct Ready(ReadyTo);

enum ReadyTo {
    Http1(Arc<HttpClient>),
    Http2(H2Client, H2Conn, StreamSlot),
}

/// Why a request failed to be sent. Over HTTP/2, a request the connection
/// closed before taking is sent on another; if no other can be had, it comes
/// back (`unsent`), as the connection gave it back.
#[derive(Debug)]
pub struct SendError {
    pub error: ClientError,
    pub unsent: Option<http::Request<BoxBody>>,
}

impl From<ClientError> for SendError {
    fn from(error: ClientError) -> Self {
        SendError {
            error,
            unsent: None,
        }
    }
}

impl Ready {
    pub async fn send(
        self,
        req: http::Request<BoxBody>,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        match self.0 {
            ReadyTo::Http1(c) => {
                let rsp = c.request(req).await.map_err(ClientError::from)?;
                Ok(rsp.map(|b| UpstreamBody::new(b, StreamSlot(None))))
            }
            ReadyTo::Http2(c, conn, slot) => c.send(conn, slot, req).await,
        }
    }
}

impl UpstreamClient {
    /// Over HTTP/2, checks out a stream (connecting if need be). HTTP/1's pool
    /// connects as it sends.
    pub async fn ready(&self) -> Result<Ready, ClientError> {
        match self {
            UpstreamClient::Http1(c) => Ok(Ready(ReadyTo::Http1(c.clone()))),
            UpstreamClient::Http2(c) => {
                let (conn, slot) = c.checkout().await?;
                Ok(Ready(ReadyTo::Http2(c.clone(), conn, slot)))
            }
        }
    }
}

type PoolKey = (
    SocketAddr,
    bool,
    Option<Identity>,
    Option<Duration>,
    Option<PoolPerCaller>,
    bool,
);

/// On an inbound request to an HTTP/2 app: the caller's address, whose
/// requests get HTTP/2 connections of their own. Shared by every caller, the
/// app's connections (and their stream limits and flow-control windows) would
/// let one caller that opens streams and never finishes them, or never reads
/// what it asked for, hold them all, and every other caller's request wait
/// behind it. Without a proxy each client has connections of its own; so it
/// has here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolPerCaller(pub std::net::IpAddr);

/// A client for one upstream, with the upstream's address as a URI authority,
/// made once rather than formatted for every request that names it.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub client: UpstreamClient,
    pub authority: Option<http::uri::Authority>,
}

#[derive(Clone, Debug)]
pub struct ClientCache {
    /// Outbound clients (to endpoints, peer proxies).
    shared: Arc<Mutex<Pools>>,
    /// Inbound HTTP/2 clients of one caller each (`PoolPerCaller`), apart:
    /// callers anyone can multiply (one per address that reaches the pod)
    /// must not evict the clients of this pod's own requests.
    per_caller: Arc<Mutex<Pools>>,
    /// Inbound HTTP/1 clients, shared by callers (one request at a time per
    /// connection), apart too: a caller's requests to many ports of the pod
    /// must not evict this pod's outbound clients either.
    inbound: Arc<Mutex<Pools>>,
    connect_timeout: Duration,
    tls: Option<PeerTls>,
}

/// Clients by upstream, each with the tick of its last use, so that the least
/// recently used go first when the cache is full.
#[derive(Debug, Default)]
struct Pools {
    clients: HashMap<PoolKey, (Upstream, u64)>,
    tick: u64,
}

impl Pools {
    /// Makes room for one more: when full, the least recently used eighth
    /// goes in one pass, so that a cache kept full by new upstreams pays a
    /// pass every `MAX_CLIENT_POOLS / 8` of them rather than on each.
    /// In-flight requests keep their clones.
    fn make_room(&mut self) {
        if self.clients.len() < defaults::MAX_CLIENT_POOLS {
            return;
        }
        let mut ticks: Vec<u64> = self.clients.values().map(|(_, used)| *used).collect();
        let n = (ticks.len() / 8).max(1);
        let (_, newest_gone, _) = ticks.select_nth_unstable(n - 1);
        let newest_gone = *newest_gone;
        self.clients.retain(|_, (_, used)| *used > newest_gone);
    }
}

impl ClientCache {
    pub fn new(connect_timeout: Duration, tls: Option<PeerTls>) -> Self {
        ClientCache {
            shared: Arc::default(),
            per_caller: Arc::default(),
            inbound: Arc::default(),
            connect_timeout,
            tls,
        }
    }

    /// Whether connections to peer proxies use mTLS.
    pub fn mtls(&self) -> bool {
        self.tls.is_some()
    }

    /// The client for `addr`, speaking HTTP/2 with prior knowledge when `h2`; over
    /// mTLS verifying `peer` when it is a peer proxy and this proxy has an identity.
    /// `timeout` overrides the connect timeout (a backend policy's); `caller`
    /// (an inbound request's) keeps the caller's HTTP/2 connections apart
    /// from other callers', and inbound clients apart from outbound ones.
    /// `forward_proxy`: `addr` is an HTTP forward proxy, sent HTTP/1 requests
    /// in absolute form.
    pub fn get(
        &self,
        addr: SocketAddr,
        h2: bool,
        peer: Option<&Identity>,
        timeout: Option<Duration>,
        caller: Option<PoolPerCaller>,
        forward_proxy: bool,
    ) -> Upstream {
        let forward_proxy = forward_proxy && !h2 && peer.is_none();
        let peer = peer.filter(|_| self.tls.is_some());
        let (pools, caller) = match caller {
            Some(c) if h2 => (&self.per_caller, Some(c)),
            Some(_) => (&self.inbound, None),
            None => (&self.shared, None),
        };
        let mut pools = pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.tick += 1;
        let tick = pools.tick;
        let key = (addr, h2, peer.cloned(), timeout, caller, forward_proxy);
        if let Some((c, used)) = pools.clients.get_mut(&key) {
            *used = tick;
            return c.clone();
        }
        pools.make_room();
        let c = Upstream {
            client: self.build(
                addr,
                h2,
                peer,
                timeout.unwrap_or(self.connect_timeout),
                forward_proxy,
            ),
            authority: http::uri::Authority::try_from(addr.to_string()).ok(),
        };
        pools.clients.insert(key, (c.clone(), tick));
        c
    }

    /// Whether a client for this key is kept, and how many are: shared and
    /// per caller.
    #[cfg(test)]
    fn kept(&self, addr: SocketAddr, h2: bool) -> (bool, usize, usize) {
        let shared = self.shared.lock().unwrap();
        let per_caller = self.per_caller.lock().unwrap();
        (
            shared
                .clients
                .contains_key(&(addr, h2, None, None, None, false)),
            shared.clients.len(),
            per_caller.clients.len(),
        )
    }

    fn build(
        &self,
        addr: SocketAddr,
        h2: bool,
        peer: Option<&Identity>,
        timeout: Duration,
        forward_proxy: bool,
    ) -> UpstreamClient {
        let tls = match (peer, &self.tls) {
            (Some(id), Some(t)) => PeerMode::Mtls(
                t.clone(),
                id.clone(),
                if h2 { tls::ALPN_H2 } else { tls::ALPN_HTTP1 },
            ),
            _ if forward_proxy => PeerMode::ForwardProxy,
            _ => PeerMode::Plain,
        };
        let connector = Connector { addr, timeout, tls };
        if h2 {
            return UpstreamClient::Http2(H2Client::new(connector));
        }
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(defaults::HTTP1_POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(defaults::POOL_MAX_IDLE_PER_HOST)
            // A response head as large as a request's may be (hyper's own
            // limit is about 400 KB): one larger could not cross the HTTP/2
            // hop between proxies, and is a 502 that says so.
            .http1_max_buf_size(defaults::MAX_HEADER_BYTES)
            // Legacy servers' heads that clients read directly (`Server :
            // x`, a header folded over two lines): a proxy removes the
            // space (RFC 9112 5.1) and unfolds, rather than answering 502
            // and counting the endpoint as failing. Framing is unchanged.
            .http1_allow_spaces_after_header_name_in_responses(true)
            .http1_allow_obsolete_multiline_headers_in_responses(true)
            // The request keeps the Host the app sent; we never invent one.
            .set_host(false);
        UpstreamClient::Http1(Arc::new(b.build(connector)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;
    use tokio::sync::Semaphore;

    use super::*;

    fn address(i: usize) -> SocketAddr {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i as u32);
        SocketAddr::from((ip, 8080))
    }

    /// Inbound callers, as many as there are addresses that reach the pod,
    /// each with clients of their own, evict none of this pod's outbound
    /// clients (and their connections to peers).
    #[tokio::test]
    async fn clients_per_caller_do_not_evict_the_shared_ones() {
        let cache = ClientCache::new(Duration::from_secs(1), None);
        let peer = address(1);
        cache.get(peer, true, None, None, None, false);
        let app = SocketAddr::from(([127, 0, 0, 1], 8080));
        for i in 0..defaults::MAX_CLIENT_POOLS * 2 {
            let caller = PoolPerCaller(address(i).ip());
            cache.get(app, true, None, None, Some(caller), false);
        }
        // One caller's HTTP/1 requests to many ports of the pod.
        let caller = PoolPerCaller(address(1).ip());
        for port in 1..=(defaults::MAX_CLIENT_POOLS * 2) as u16 {
            let app = SocketAddr::from(([127, 0, 0, 1], port));
            cache.get(app, false, None, None, Some(caller), false);
        }
        let (kept, shared, per_caller) = cache.kept(peer, true);
        assert!(kept, "the outbound client is kept");
        assert_eq!(shared, 1);
        assert!(per_caller <= defaults::MAX_CLIENT_POOLS, "{per_caller}");
    }

    /// Full, the cache drops the least recently used: an upstream in use
    /// all along stays, one used once long ago goes.
    #[tokio::test]
    async fn a_full_cache_drops_the_least_recently_used() {
        let cache = ClientCache::new(Duration::from_secs(1), None);
        let (busy, once) = (address(0), address(1));
        cache.get(once, false, None, None, None, false);
        for i in 2..defaults::MAX_CLIENT_POOLS * 3 {
            cache.get(busy, false, None, None, None, false);
            cache.get(address(i), false, None, None, None, false);
        }
        let (kept, shared, _) = cache.kept(busy, false);
        assert!(kept, "in use all along");
        assert!(!cache.kept(once, false).0, "used once, long ago");
        assert!(shared <= defaults::MAX_CLIENT_POOLS, "{shared}");
    }

    /// An HTTP/2 server allowing `max` concurrent streams whose requests wait
    /// for a permit; counts the requests it is holding.
    async fn server(max: u32) -> (SocketAddr, Arc<AtomicUsize>, Arc<Semaphore>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (held, gate) = serve(listener, max, usize::MAX);
        (addr, held, gate)
    }

    /// `server` on `listener`, accepting `connections` connections only (the
    /// listener kept open, so further connects queue on it).
    fn serve(
        listener: TcpListener,
        max: u32,
        connections: usize,
    ) -> (Arc<AtomicUsize>, Arc<Semaphore>) {
        let (held, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
        let (h, g) = (held.clone(), gate.clone());
        tokio::spawn(async move {
            for _ in 0..connections {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (h, g) = (h.clone(), g.clone());
                let svc = service_fn(move |_req| {
                    let (h, g) = (h.clone(), g.clone());
                    async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        g.acquire().await.unwrap().forget();
                        Ok::<_, std::convert::Infallible>(http::Response::new(super::super::full(
                            "done",
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max)
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
            std::future::pending::<()>().await;
            drop(listener);
        });
        (held, gate)
    }

    fn client(addr: SocketAddr) -> H2Client {
        H2Client::new(Connector {
            addr,
            timeout: Duration::from_secs(5),
            tls: PeerMode::Plain,
        })
    }

    fn get() -> http::Request<BoxBody> {
        http::Request::get("http://upstream/")
            .version(http::Version::HTTP_2)
            .body(super::super::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn past_the_peers_stream_limit_another_connection_opens() {
        let (addr, held, gate) = server(10).await;
        let c = client(addr);
        // The connection learns the limit from the server's SETTINGS, which come
        // before the first answer; the pool sees it from the next request on.
        gate.add_permits(2);
        for _ in 0..2 {
            let rsp = c.request(get()).await.unwrap();
            rsp.into_body().collect().await.unwrap();
        }
        held.store(0, Ordering::SeqCst);
        assert_eq!(c.streams(), vec![0], "the stream is given back");

        let mut sent = tokio::task::JoinSet::new();
        for _ in 0..25 {
            let c = c.clone();
            sent.spawn(async move {
                let rsp = c.request(get()).await.unwrap();
                rsp.into_body().collect().await.unwrap().to_bytes()
            });
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while held.load(Ordering::SeqCst) < 25 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of 25 requests reached the server",
                held.load(Ordering::SeqCst)
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(c.streams(), vec![10, 10, 5]);
        gate.add_permits(25);
        while let Some(body) = sent.join_next().await {
            assert_eq!(body.unwrap(), "done");
        }
        assert_eq!(c.streams(), vec![0, 0, 0], "every stream is given back");
    }

    /// Frames an upstream sends on a stream a caller cancelled, in flight
    /// as it did, are not refused with resets of h2's own while h2 remembers
    /// the stream (up to 1,000 for a second here, 50 by default), and a
    /// connection is ended past 1,024 of those in its life, with every
    /// stream on it: a peer shared by all a pod's callers, with gRPC calls
    /// cancelled by the hundred, would be dropped again and again. Here each
    /// of 1,800 cancelled streams, a hundred at a time, gets such a frame
    /// (fewer than 1,024 refused with the change; more without it, however
    /// slowly the test runs, up to 14 s).
    #[tokio::test]
    async fn late_frames_on_cancelled_streams_do_not_end_the_connection() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut preface = [0u8; 24];
                    tcp.read_exact(&mut preface).await?;
                    // SETTINGS: 1,000 streams at once.
                    tcp.write_all(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 3, 0xe8])
                        .await?;
                    loop {
                        let mut head = [0u8; 9];
                        tcp.read_exact(&mut head).await?;
                        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let mut payload = vec![0; len];
                        tcp.read_exact(&mut payload).await?;
                        let (kind, flags, id) = (head[3], head[4], &head[5..9]);
                        let frame = |kind: u8, flags: u8, payload: &[u8]| {
                            let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
                            f.extend_from_slice(&[kind, flags]);
                            f.extend_from_slice(id);
                            f.extend_from_slice(payload);
                            f
                        };
                        match kind {
                            // SETTINGS, acknowledged.
                            4 if flags & 1 == 0 => {
                                tcp.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await?
                            }
                            // HEADERS: `:status 200`, a body to come.
                            1 => tcp.write_all(&frame(1, 4, &[0x88])).await?,
                            // RST_STREAM CANCEL: a DATA frame that was on
                            // its way (not for the client's refusals of
                            // such frames, which would go back and forth).
                            3 if payload == [0, 0, 0, 8] => {
                                tcp.write_all(&frame(0, 0, b"late")).await?
                            }
                            _ => {}
                        }
                    }
                    #[allow(unreachable_code)]
                    Ok::<_, std::io::Error>(())
                });
            }
        });
        let c = client(addr);
        // The server's stream limit known before the bursts.
        drop(c.request(get()).await.unwrap());
        for round in 0..18 {
            let heads = (0..100).map(|_| c.request(get()));
            let answers = futures_util::future::join_all(heads).await;
            for (i, rsp) in answers.into_iter().enumerate() {
                let rsp = rsp.unwrap_or_else(|e| panic!("round {round}, request {i}: {e}"));
                assert_eq!(rsp.status(), 200);
            }
            // Dropped unread: each stream cancelled.
        }
        let rsp = c
            .request(get())
            .await
            .expect("the connection still answers");
        assert_eq!(rsp.status(), 200);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the connection was ended and another opened"
        );
    }

    /// A peer proxy that stops answering without a reset (its node died, the
    /// network drops its packets) is given up within the keep-alive's
    /// interval and timeout: its requests fail and the connection leaves the
    /// pool, rather than taking requests for 40 s.
    #[tokio::test(start_paused = true)]
    async fn a_peer_gone_silent_is_given_up_within_the_keepalive() {
        use tokio::io::AsyncWriteExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            // Its SETTINGS, then nothing: never a PING's answer, never a reset.
            tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
            std::future::pending::<()>().await;
            drop(tcp);
        });
        let peer = (
            defaults::H2_PEER_KEEPALIVE_INTERVAL,
            defaults::H2_PEER_KEEPALIVE_TIMEOUT,
        );
        let c = H2Client::with_keepalive(
            Connector {
                addr,
                timeout: Duration::from_secs(5),
                tls: PeerMode::Plain,
            },
            Some(peer),
        );
        let start = tokio::time::Instant::now();
        let failed = c.request(get()).await;
        let took = start.elapsed();
        assert!(failed.is_err(), "answered by a silent peer");
        let within = peer.0 + peer.1;
        assert!(
            took <= within + Duration::from_secs(1),
            "gave up after {took:?}"
        );
        assert!(
            c.streams().is_empty(),
            "the dead connection is still pooled"
        );
        silent.abort();
    }

    /// An app's HTTP/2 connection is not pinged: a gRPC server closes one
    /// pinged more than once per 5 minutes while it sends nothing
    /// (`too_many_pings`), and with it every call, a quiet watch's first.
    #[tokio::test(start_paused = true)]
    async fn an_app_s_connection_is_not_pinged_while_a_call_is_quiet() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pings = Arc::new(AtomicUsize::new(0));
        let counted = pings.clone();
        // An HTTP/2 server that answers PINGs and SETTINGS, and never the call.
        let app = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
            let mut preface = [0u8; 24];
            tcp.read_exact(&mut preface).await.unwrap();
            loop {
                let mut head = [0u8; 9];
                if tcp.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0; len];
                if tcp.read_exact(&mut payload).await.is_err() {
                    return;
                }
                let ack = head[4] & 1 == 1;
                match head[3] {
                    6 if !ack => {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let mut pong = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                        pong.extend_from_slice(&payload);
                        tcp.write_all(&pong).await.unwrap();
                    }
                    4 if !ack => tcp.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap(),
                    _ => {}
                }
            }
        });
        let c = H2Client::new(Connector {
            addr,
            timeout: Duration::from_secs(5),
            tls: PeerMode::Plain,
        });
        let call = tokio::spawn(async move { c.request(get()).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 0);
        assert!(!call.is_finished(), "the quiet call ended");
        call.abort();
        app.abort();
    }

    /// A connection carrying a long stream (gRPC streaming, server-sent
    /// events) is not idle, however long since its last new request.
    #[tokio::test(start_paused = true)]
    async fn a_connection_with_a_stream_open_is_not_idle() {
        let (addr, held, gate) = server(10).await;
        let c = client(addr);
        let c2 = c.clone();
        let open = tokio::spawn(async move { c2.request(get()).await.unwrap() });
        while held.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(defaults::POOL_IDLE_TIMEOUT * 3).await;
        assert_eq!(c.streams(), vec![1], "still in the set");
        gate.add_permits(1);
        let rsp = open.await.unwrap();
        rsp.into_body().collect().await.unwrap();
        tokio::time::sleep(defaults::POOL_IDLE_TIMEOUT * 3).await;
        assert!(c.streams().is_empty(), "idle once the stream is done");
    }

    /// Response bodies a client is slow to read hold flow-control window of
    /// the connection as well as of their stream: enough of them must not
    /// stall every other response on the connection. Eight unread downloads
    /// filled the window of the connection (4 MiB, four streams' worth), and a
    /// small answer behind them never came.
    #[tokio::test]
    async fn unread_downloads_leave_the_connection_room_for_other_answers() {
        use futures_util::StreamExt as _;
        use http_body_util::{BodyExt as _, StreamBody};
        const CHUNK: usize = 16 * 1024;
        const DOWNLOAD: usize = 2 * 1024 * 1024;
        const DOWNLOADS: usize = 8;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Bytes of the downloads hyper took from their bodies: what it had
        // window for, give or take a chunk.
        let pulled = Arc::new(AtomicUsize::new(0));
        let p = pulled.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let p = p.clone();
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let p = p.clone();
                    async move {
                        let body = if req.uri().path() == "/big" {
                            let chunks =
                                futures_util::stream::iter(0..DOWNLOAD / CHUNK).map(move |_| {
                                    p.fetch_add(CHUNK, Ordering::SeqCst);
                                    Ok::<_, super::super::BoxError>(http_body::Frame::data(
                                        bytes::Bytes::from(vec![b'x'; CHUNK]),
                                    ))
                                });
                            StreamBody::new(chunks).boxed_unsync()
                        } else {
                            super::super::full("ok")
                        };
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        let c = client(addr);
        let to = |path: &str| {
            http::Request::get(format!("http://upstream{path}"))
                .version(http::Version::HTTP_2)
                .body(super::super::empty())
                .unwrap()
        };
        let mut unread = Vec::new();
        for _ in 0..DOWNLOADS {
            unread.push(c.request(to("/big")).await.unwrap());
        }
        // Every download has sent what the windows allow.
        let want = (DOWNLOADS * (defaults::H2_STREAM_WINDOW as usize).min(DOWNLOAD))
            .min(defaults::H2_CONNECTION_WINDOW as usize);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while pulled.load(Ordering::SeqCst) < want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the downloads sent {} of {want} bytes",
                pulled.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(c.streams(), vec![DOWNLOADS], "all on one connection");
        let small = async {
            let rsp = c.request(to("/small")).await.unwrap();
            rsp.into_body().collect().await.unwrap().to_bytes()
        };
        let got = tokio::time::timeout(Duration::from_secs(5), small)
            .await
            .expect("a small answer is stuck behind unread downloads");
        assert_eq!(got, "ok");
        drop(unread);
    }

    /// Requests that give up on a connect still under way (their client went
    /// away, their deadline passed) leave it running: the next requests wait
    /// on it rather than start over, so a handshake slower than the requests'
    /// deadlines still ends in a connection.
    #[tokio::test]
    async fn a_connect_outlives_the_requests_that_gave_up_on_it() {
        let (addr, queued, listener) = strait_tests::tcp::stalling().await;
        let c = H2Client::new(Connector {
            addr,
            timeout: Duration::from_secs(10),
            tls: PeerMode::Plain,
        });
        for _ in 0..3 {
            let gave_up = tokio::time::timeout(Duration::from_millis(100), c.request(get())).await;
            assert!(gave_up.is_err(), "a request got through a stalled connect");
        }
        // The upstream takes connections again: the connect's next SYN is
        // answered.
        drop(queued);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let svc = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(super::super::full(
                        "done",
                    )))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        let rsp = tokio::time::timeout(Duration::from_secs(10), c.request(get()))
            .await
            .expect("no connection in 10 s")
            .expect("the request through the connection");
        assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "done");
        assert_eq!(
            c.attempts(),
            1,
            "one connect, carried on when requests gave up"
        );
    }

    /// Every connection full, requests wait on a connect; one that stalls
    /// (the peer's accept queue drops SYNs) does not hold them when a stream
    /// is given back on the open connection meanwhile.
    #[tokio::test]
    async fn a_stream_given_back_during_a_slow_connect_is_taken() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        // One connection, one stream at a time; no other connection accepted.
        let (held, gate) = serve(listener, 1, 1);
        let c = H2Client::new(Connector {
            addr,
            timeout: Duration::from_secs(10),
            tls: PeerMode::Plain,
        });
        // The limit learnt, then a request holding the connection's stream.
        gate.add_permits(1);
        let rsp = c.request(get()).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        let c1 = c.clone();
        let first = tokio::spawn(async move {
            let rsp = c1.request(get()).await.unwrap();
            rsp.into_body().collect().await.unwrap().to_bytes()
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while held.load(Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "never held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Further connects stall: the accept queue is filled.
        let mut queued = Vec::new();
        while let Ok(c) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            queued.push(c.unwrap());
            assert!(queued.len() < 64, "the accept queue never filled");
        }
        // More waiters than streams given back at once: each stream given
        // back goes to one of them, and none is left waiting on the connect.
        const WAITING: usize = 20;
        let mut more = tokio::task::JoinSet::new();
        for _ in 0..WAITING {
            let c = c.clone();
            more.spawn(async move {
                let rsp = c.request(get()).await.unwrap();
                rsp.into_body().collect().await.unwrap().to_bytes()
            });
        }
        while c.attempts() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "no second connect");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gate.add_permits(1 + WAITING);
        assert_eq!(first.await.unwrap(), "done");
        let both = async {
            while let Some(body) = more.join_next().await {
                assert_eq!(body.unwrap(), "done");
            }
        };
        tokio::time::timeout(Duration::from_secs(3), both)
            .await
            .expect("waited out the stalled connect");
        drop(queued);
    }

    #[tokio::test]
    async fn requests_waiting_on_a_connect_fail_with_it() {
        let (addr, _queued, _listener) = strait_tests::tcp::stalling().await;
        let c = H2Client::new(Connector {
            addr,
            timeout: Duration::from_millis(300),
            tls: PeerMode::Plain,
        });
        let mut sent = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let c = c.clone();
            sent.spawn(async move { c.request(get()).await.map(drop) });
        }
        while let Some(r) = sent.join_next().await {
            assert!(
                r.unwrap().is_err(),
                "a request got through a stalled connect"
            );
        }
        // One attempt, its failure shared: before, each waiter made its own
        // after the one before it failed, so the last waited 3 x 300 ms.
        assert_eq!(c.attempts(), 1);
    }
}
