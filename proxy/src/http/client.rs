//! Connections to upstreams, per upstream address, HTTP version and (towards a
//! peer proxy) expected identity: one shared HTTP/2 connection, or a pool of
//! HTTP/1 ones. Requests keep their own `Host`/`:authority` while the connection
//! goes where the proxy decided, and a Host never opens a connection of its own.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
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
}

/// A connection to an upstream: plaintext, or mTLS to a peer proxy.
#[derive(Debug)]
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        match self {
            UpstreamIo::Tls(t) if t.get_ref().1.alpn_protocol() == Some(tls::ALPN_H2) => {
                c.negotiated_h2()
            }
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
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
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
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
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
                PeerMode::Mtls(peer_tls, peer, alpn) => {
                    let s = peer_tls.connect(addr, &peer, alpn, timeout).await?;
                    Ok(TokioIo::new(UpstreamIo::Tls(Box::new(s))))
                }
            }
        })
    }
}

/// One HTTP/2 connection to an upstream, shared by every request to it whatever
/// its `:authority` (hyper's pooled client keys connections by authority, which
/// would open one per Host a client cares to send). Reconnects when it closes;
/// closes when unused for `POOL_IDLE_TIMEOUT`.
#[derive(Clone)]
pub struct H2Client {
    inner: Arc<H2Inner>,
}

struct H2Inner {
    connector: Connector,
    state: Mutex<H2State>,
    /// Held while connecting, so that requests arriving together share one
    /// connection (or one failure) instead of each opening their own.
    connecting: tokio::sync::Mutex<()>,
    /// Requests sent so far, to notice an idle connection.
    requests: AtomicU64,
}

#[derive(Default)]
struct H2State {
    /// The connection in use, with its number.
    current: Option<(u64, SendRequest<BoxBody>)>,
    /// Connect attempts so far, and how the last one failed: requests that
    /// waited on an attempt that failed fail with it.
    attempts: u64,
    failed: Option<(u64, ConnectError)>,
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
        }
    }
}

impl H2Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, H2State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn usable(&self) -> Option<(u64, SendRequest<BoxBody>)> {
        self.state()
            .current
            .as_ref()
            .filter(|(_, s)| s.is_ready())
            .cloned()
    }

    /// Stops handing out connection `n`; it closes once its streams are done.
    fn forget(&self, n: u64) {
        let mut st = self.state();
        if st.current.as_ref().is_some_and(|(c, _)| *c == n) {
            st.current = None;
        }
    }
}

impl H2Client {
    fn new(connector: Connector) -> Self {
        H2Client {
            inner: Arc::new(H2Inner {
                connector,
                state: Mutex::default(),
                connecting: tokio::sync::Mutex::new(()),
                requests: AtomicU64::new(0),
            }),
        }
    }

    async fn sender(&self) -> Result<(u64, SendRequest<BoxBody>), ClientError> {
        if let Some(s) = self.inner.usable() {
            return Ok(s);
        }
        let attempts_before = self.inner.state().attempts;
        let _connecting = self.inner.connecting.lock().await;
        if let Some(s) = self.inner.usable() {
            return Ok(s);
        }
        let attempt = {
            let mut st = self.inner.state();
            if st.attempts > attempts_before
                && let Some((a, e)) = &st.failed
                && *a == st.attempts
            {
                // An attempt made while we waited failed: so do we, at once.
                return Err(e.duplicate().into());
            }
            st.attempts += 1;
            st.attempts
        };
        match self.connect(attempt).await {
            Ok(sender) => {
                let mut st = self.inner.state();
                st.failed = None;
                st.current = Some((attempt, sender.clone()));
                Ok((attempt, sender))
            }
            Err(e) => {
                self.inner.state().failed = Some((attempt, e.duplicate()));
                Err(e.into())
            }
        }
    }

    async fn connect(&self, n: u64) -> Result<SendRequest<BoxBody>, ConnectError> {
        let addr = self.inner.connector.addr;
        let io = tower::Service::call(&mut self.inner.connector.clone(), Uri::default()).await?;
        let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .keep_alive_interval(defaults::H2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(defaults::H2_KEEPALIVE_TIMEOUT)
            .initial_connection_window_size(defaults::H2_CONNECTION_WINDOW)
            .initial_stream_window_size(defaults::H2_STREAM_WINDOW)
            .max_header_list_size(defaults::MAX_HEADER_BYTES as u32);
        let (sender, conn) = b.handshake(io).await.map_err(|e| ConnectError::Io {
            addr,
            source: io::Error::other(format!("HTTP/2 handshake: {e}")),
        })?;
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            tokio::pin!(conn);
            let mut seen = u64::MAX;
            let ended = loop {
                tokio::select! {
                    r = &mut conn => break r,
                    _ = tokio::time::sleep(defaults::POOL_IDLE_TIMEOUT) => {
                        let Some(inner) = inner.upgrade() else { break conn.await };
                        let sent = inner.requests.load(Ordering::Relaxed);
                        if sent == seen {
                            // Idle: no new request uses it; it closes once the
                            // streams in flight are done.
                            inner.forget(n);
                            drop(inner);
                            break conn.await;
                        }
                        seen = sent;
                    }
                }
            };
            if let Err(e) = ended {
                tracing::debug!(upstream = %addr, error = %e, "HTTP/2 connection to upstream ended");
            }
        });
        Ok(sender)
    }

    /// Sends a request. One that the connection did not take (it was closing) is
    /// sent again once, on a new connection: it never reached the upstream.
    pub async fn request(
        &self,
        req: http::Request<BoxBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let (n, mut sender) = self.sender().await?;
        match sender.try_send_request(req).await {
            Ok(rsp) => Ok(rsp),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    self.inner.forget(n);
                    let (_, mut sender) = self.sender().await?;
                    Ok(sender.send_request(req).await?)
                }
                None => Err(e.into_error().into()),
            },
        }
    }
}

/// A client for one upstream and HTTP version.
#[derive(Clone, Debug)]
pub enum UpstreamClient {
    /// HTTP/1: a pool of connections, one request at a time on each.
    Http1(Arc<HttpClient>),
    Http2(H2Client),
}

impl UpstreamClient {
    pub async fn request(
        &self,
        req: http::Request<BoxBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        match self {
            UpstreamClient::Http1(c) => Ok(c.request(req).await?),
            UpstreamClient::Http2(c) => c.request(req).await,
        }
    }
}

type PoolKey = (SocketAddr, bool, Option<Identity>, Option<Duration>);

#[derive(Clone, Debug)]
pub struct ClientCache {
    pools: Arc<Mutex<HashMap<PoolKey, UpstreamClient>>>,
    connect_timeout: Duration,
    tls: Option<PeerTls>,
}

impl ClientCache {
    pub fn new(connect_timeout: Duration, tls: Option<PeerTls>) -> Self {
        ClientCache {
            pools: Arc::default(),
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
    /// `timeout` overrides the connect timeout (a backend policy's).
    pub fn get(
        &self,
        addr: SocketAddr,
        h2: bool,
        peer: Option<&Identity>,
        timeout: Option<Duration>,
    ) -> UpstreamClient {
        let peer = peer.filter(|_| self.tls.is_some());
        let mut pools = match self.pools.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let key = (addr, h2, peer.cloned(), timeout);
        if let Some(c) = pools.get(&key) {
            return c.clone();
        }
        if pools.len() >= defaults::MAX_CLIENT_POOLS {
            // Bounded memory: drop some pool; in-flight requests keep their clones.
            if let Some(k) = pools.keys().next().cloned() {
                pools.remove(&k);
            }
        }
        let c = self.build(addr, h2, peer, timeout.unwrap_or(self.connect_timeout));
        pools.insert(key, c.clone());
        c
    }

    fn build(
        &self,
        addr: SocketAddr,
        h2: bool,
        peer: Option<&Identity>,
        timeout: Duration,
    ) -> UpstreamClient {
        let tls = match (peer, &self.tls) {
            (Some(id), Some(t)) => PeerMode::Mtls(
                t.clone(),
                id.clone(),
                if h2 { tls::ALPN_H2 } else { tls::ALPN_HTTP1 },
            ),
            _ => PeerMode::Plain,
        };
        let connector = Connector { addr, timeout, tls };
        if h2 {
            return UpstreamClient::Http2(H2Client::new(connector));
        }
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(defaults::POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(defaults::POOL_MAX_IDLE_PER_HOST)
            // The request keeps the Host the app sent; we never invent one.
            .set_host(false);
        UpstreamClient::Http1(Arc::new(b.build(connector)))
    }
}
