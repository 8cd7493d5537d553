//! A TCP listener with a cap on open connections, that stops accepting on drain.
//!
//! An address of every IPv6 host (`[::]`) takes IPv4 connections too, as a
//! dual-stack pod's inbound port must, and is taken for `0.0.0.0` where the
//! kernel has no IPv6. The outbound listener on IPv4 loopback also listens on
//! IPv6 loopback, where `init`'s IPv6 rules send the app's IPv6 connections.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

pub use strait_api::listen::bind;
use strait_api::listen::no_ipv6;
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
    /// The same port on IPv6 loopback (see `with_ipv6_loopback`).
    v6_loopback: Option<TcpListener>,
    local: SocketAddr,
    direction: Direction,
}

#[derive(Debug, thiserror::Error)]
// The cause is the source, which `{:#}` prints after: named here too, it
// would be said twice.
#[error("cannot listen on {addr} ({what})")]
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
        let tcp = bind(addr).map_err(err)?;
        let local = tcp.local_addr().map_err(err)?;
        // Inherited by every connection accepted: no system call each. The
        // inbound listener's callers come over the network; the others' are
        // this pod's app.
        super::connect::keepalive(&tcp, direction == Direction::Inbound);
        Ok(Listener {
            tcp,
            v6_loopback: None,
            local,
            direction,
        })
    }

    /// A listener on IPv4 loopback also listens at its port on IPv6 loopback,
    /// where the kernel has it: the app's IPv6 connections are redirected
    /// there. One limit of connections covers both. Where IPv6 loopback is
    /// missing, or (for an ephemeral port) its port is taken, the listener
    /// stays IPv4 only. `ephemeral`: the port was the kernel's pick (0).
    pub fn with_ipv6_loopback(mut self, ephemeral: bool) -> Result<Self, BindError> {
        if self.local.ip() != Ipv4Addr::LOCALHOST {
            return Ok(self);
        }
        let addr = SocketAddr::from((Ipv6Addr::LOCALHOST, self.local.port()));
        match bind(addr) {
            Ok(tcp) => {
                super::connect::keepalive(&tcp, false);
                self.v6_loopback = Some(tcp);
            }
            Err(e) if no_ipv6(&e) || (ephemeral && e.kind() == io::ErrorKind::AddrInUse) => {
                debug!(%addr, error = %e, "not listening on IPv6 loopback");
            }
            Err(source) => {
                return Err(BindError {
                    addr,
                    what: "--outbound-addr's port on IPv6 loopback too",
                    source,
                });
            }
        }
        Ok(self)
    }

    /// Where IPv6 loopback is listened on too.
    pub fn ipv6_loopback(&self) -> Option<SocketAddr> {
        self.v6_loopback.as_ref().and_then(|l| l.local_addr().ok())
    }

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let Some(v6) = &self.v6_loopback else {
            return self.tcp.accept().await;
        };
        std::future::poll_fn(|cx| match self.tcp.poll_accept(cx) {
            Poll::Pending => v6.poll_accept(cx),
            ready => ready,
        })
        .await
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
                r = self.accept() => r,
            };
            let (stream, peer) = match accepted {
                // IPv4 clients of a dual-stack listener as IPv4 (not
                // `::ffff:10.0.0.5`), for policy, limits, logs and metrics.
                Ok((s, peer)) => (s, SocketAddr::new(peer.ip().to_canonical(), peer.port())),
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
    /// accepts (from its listener) and the one it makes. Only those facing
    /// the network give up on bytes unacknowledged: the app's may stop
    /// reading, and cannot vanish.
    #[tokio::test]
    async fn connections_accepted_and_made_are_kept_alive() {
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), Direction::Inbound, "test")
            .await
            .unwrap();
        // To loopback: the app's side.
        let made = super::super::connect::tcp(l.local_addr(), Duration::from_secs(5))
            .await
            .unwrap();
        let (accepted, _) = l.tcp.accept().await.unwrap();
        let app_side = Listener::bind("127.0.0.1:0".parse().unwrap(), Direction::Outbound, "test")
            .await
            .unwrap();
        let _from_app = tokio::net::TcpStream::connect(app_side.local_addr())
            .await
            .unwrap();
        let (from_app, _) = app_side.tcp.accept().await.unwrap();
        for (end, s, network) in [
            ("accepted", &accepted, true),
            ("made", &made, false),
            ("the app's", &from_app, false),
        ] {
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
            assert_eq!(
                s.tcp_user_timeout().unwrap(),
                network.then_some(crate::defaults::TCP_USER_TIMEOUT),
                "{end}: a peer gone with bytes in flight is given up too, the app never"
            );
        }
    }

    /// `[::]` takes IPv4 connections too, and their clients are seen as
    /// IPv4 (policy's networks, per-source limits and logs are IPv4); an
    /// IPv4 loopback listener also answers on IPv6 loopback.
    #[tokio::test]
    async fn every_host_takes_both_families_and_loopback_gets_its_ipv6_twin() {
        let (_trigger, drain) = super::super::drain::channel();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let any = Listener::bind("[::]:0".parse().unwrap(), Direction::Inbound, "test")
            .await
            .unwrap();
        let port = any.local_addr().port();
        let seen = tx.clone();
        tokio::spawn(any.serve(drain.clone(), Metrics::new(), 10, move |a| {
            let _ = seen.send(a.client.0);
            async {}
        }));
        let _c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let client = rx.recv().await.unwrap();
        assert_eq!(client.ip(), std::net::IpAddr::from(Ipv4Addr::LOCALHOST));

        let lo = Listener::bind("127.0.0.1:0".parse().unwrap(), Direction::Outbound, "test")
            .await
            .unwrap()
            .with_ipv6_loopback(true)
            .unwrap();
        let Some(v6) = lo.ipv6_loopback() else {
            return strait_tests::host::missing("IPv6 loopback (::1)");
        };
        assert_eq!(v6.port(), lo.local_addr().port());
        tokio::spawn(lo.serve(drain, Metrics::new(), 10, move |a| {
            let _ = tx.send(a.client.0);
            async {}
        }));
        for addr in [SocketAddr::from((Ipv4Addr::LOCALHOST, v6.port())), v6] {
            let _c = TcpStream::connect(addr).await.unwrap();
            assert_eq!(rx.recv().await.unwrap().ip(), addr.ip(), "{addr}");
        }
    }

    /// A fixed outbound port taken on IPv6 loopback is an error: `init`
    /// sends the app's IPv6 connections there, to whatever holds it.
    #[tokio::test]
    async fn a_fixed_port_taken_on_ipv6_loopback_is_an_error() {
        let Ok(held) = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) else {
            return strait_tests::host::missing("IPv6 loopback (::1)");
        };
        let port = held.local_addr().unwrap().port();
        let l = Listener::bind(
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Direction::Outbound,
            "outbound",
        )
        .await
        .unwrap();
        let e = l.with_ipv6_loopback(false).unwrap_err();
        assert_eq!(e.source.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(e.to_string().contains(&format!("[::1]:{port}")), "{e}");
    }
}
