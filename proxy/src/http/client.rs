//! Connection pools to upstreams: one hyper client per upstream address and HTTP
//! version, so that requests keep their own `Host`/`:authority` while the
//! connection goes where the proxy decided.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::BoxBody;
use crate::defaults;

pub type HttpClient = Client<Connector, BoxBody>;

/// Connects to one fixed address, whatever the request's URI says.
#[derive(Clone, Debug)]
pub struct Connector {
    addr: SocketAddr,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connect to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (addr, timeout) = (self.addr, self.timeout);
        Box::pin(async move { connect(addr, timeout).await.map(TokioIo::new) })
    }
}

/// A TCP connection with our timeout and TCP_NODELAY.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout {
            addr,
            after: timeout,
        })?
        .map_err(|source| ConnectError::Io { addr, source })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[derive(Clone, Debug)]
pub struct ClientCache {
    pools: Arc<Mutex<HashMap<(SocketAddr, bool), HttpClient>>>,
    connect_timeout: Duration,
}

impl ClientCache {
    pub fn new(connect_timeout: Duration) -> Self {
        ClientCache {
            pools: Arc::default(),
            connect_timeout,
        }
    }

    /// The client for `addr`, speaking HTTP/2 with prior knowledge when `h2`.
    pub fn get(&self, addr: SocketAddr, h2: bool) -> HttpClient {
        let mut pools = match self.pools.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = pools.get(&(addr, h2)) {
            return c.clone();
        }
        if pools.len() >= defaults::MAX_CLIENT_POOLS {
            // Bounded memory: drop some pool; in-flight requests keep their clones.
            if let Some(k) = pools.keys().next().copied() {
                pools.remove(&k);
            }
        }
        let c = self.build(addr, h2);
        pools.insert((addr, h2), c.clone());
        c
    }

    fn build(&self, addr: SocketAddr, h2: bool) -> HttpClient {
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(defaults::POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(defaults::POOL_MAX_IDLE_PER_HOST)
            // The request keeps the Host the app sent; we never invent one.
            .set_host(false);
        if h2 {
            b.http2_only(true)
                .http2_keep_alive_interval(defaults::H2_KEEPALIVE_INTERVAL)
                .http2_keep_alive_timeout(defaults::H2_KEEPALIVE_TIMEOUT)
                .http2_initial_connection_window_size(defaults::H2_CONNECTION_WINDOW)
                .http2_initial_stream_window_size(defaults::H2_STREAM_WINDOW);
        }
        b.build(Connector {
            addr,
            timeout: self.connect_timeout,
        })
    }
}
