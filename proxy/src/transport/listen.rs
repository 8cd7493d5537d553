//! A TCP listener with a cap on open connections, that stops accepting on drain.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use super::Drain;
use crate::addr::ClientAddr;
use crate::defaults;
use crate::telemetry::metrics::{ConnectionCounters, Direction, Metrics, OpenConnection};

/// A connection we accepted, with what we know of it so far.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub client: ClientAddr,
    /// The address of our listener that accepted it.
    pub local: SocketAddr,
    _permit: OwnedSemaphorePermit,
    _open: OpenConnection,
}

#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    local: SocketAddr,
    direction: Direction,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub what: &'static str,
    #[source]
    pub source: io::Error,
}

impl Listener {
    pub async fn bind(
        addr: SocketAddr,
        direction: Direction,
        what: &'static str,
    ) -> Result<Self, BindError> {
        let err = |source| BindError { addr, what, source };
        let tcp = TcpListener::bind(addr).await.map_err(err)?;
        let local = tcp.local_addr().map_err(err)?;
        // Inherited by every connection accepted: no system call each.
        super::connect::keepalive(&tcp);
        Ok(Listener {
            tcp,
            local,
            direction,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Accepts until drained, running `handle` for each connection as a tracked task.
    /// Beyond `max_connections`, new connections are answered 503 (HTTP/1) or closed.
    pub async fn serve<H, F>(
        self,
        drain: Drain,
        metrics: Arc<Metrics>,
        max_connections: usize,
        handle: H,
    ) where
        H: Fn(Accepted) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let limit = Arc::new(Semaphore::new(max_connections));
        let rejecting = Arc::new(Semaphore::new(defaults::MAX_REJECTING_CONNECTIONS));
        let counters = ConnectionCounters::new(&metrics, self.direction);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = drain.signaled() => break,
                r = self.tcp.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: log, back off briefly so
                    // we do not spin, and keep serving what is open.
                    // Sampled: out of descriptors, this comes every 10 ms.
                    strait_otel::sampled!(warn, listener = %self.local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Latency matters more than packet count for request/response traffic.
            let _ = stream.set_nodelay(true);
            match limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    let open = counters.accepted();
                    // Boxed: a connection's future holds its whole stack inline
                    // and is large, and a task moves the future it is given
                    // several times (into its cell, and over it when done).
                    drain.spawn(crate::boxed::pin(|| {
                        handle(Accepted {
                            stream,
                            client: ClientAddr(peer),
                            local: self.local,
                            _permit: permit,
                            _open: open,
                        })
                    }));
                }
                Err(_) => {
                    metrics.reject_tcp(self.direction, "connection_limit");
                    // Sampled: each refusal is the client's doing, and counted.
                    strait_otel::sampled!(
                        warn,
                        listener = %self.local, client = %peer, max_connections,
                        "connection limit reached, refusing connection"
                    );
                    if let Ok(p) = rejecting.clone().try_acquire_owned() {
                        tokio::spawn(async move {
                            crate::http::reject::over_capacity(stream).await;
                            drop(p);
                        });
                    }
                }
            }
        }
        debug!(listener = %self.local, "stopped accepting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends the proxy holds probe a quiet peer: the connection it
    /// accepts (from its listener) and the one it makes.
    #[tokio::test]
    async fn connections_accepted_and_made_are_kept_alive() {
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), Direction::Inbound, "test")
            .await
            .unwrap();
        let made = super::super::connect::tcp(l.local_addr(), Duration::from_secs(5))
            .await
            .unwrap();
        let (accepted, _) = l.tcp.accept().await.unwrap();
        for (end, s) in [("accepted", &accepted), ("made", &made)] {
            let s = socket2::SockRef::from(s);
            assert!(s.keepalive().unwrap(), "{end}");
            assert_eq!(
                s.tcp_keepalive_time().unwrap(),
                crate::defaults::TCP_KEEPALIVE,
                "{end}"
            );
            assert_eq!(
                s.tcp_keepalive_retries().unwrap(),
                crate::defaults::TCP_KEEPALIVE_PROBES,
                "{end}"
            );
        }
    }
}
