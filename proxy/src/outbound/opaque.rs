//! Opaque TCP: to a balanced endpoint of the Service's default backend (over
//! mTLS to its proxy when both sides have identities), else as addressed.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::DIRECTION;
use super::logical::Builder;
use crate::addr::DestAddr;
use crate::balance::InFlight;
use crate::control::discovery::Resolved;
use crate::control::view::{PeerProxy, Resolution};
use crate::identity::tls;
use crate::proxy::Shared;
use crate::transport::PrefixedIo;
use crate::transport::connect::PeerTls;

pub async fn forward<I>(s: &Shared, b: &Builder, io: I, dst: DestAddr, resolved: Option<Resolved>)
where
    I: AsyncRead + AsyncWrite + crate::tcp::Abort + Unpin,
{
    match connect(s, b, dst, resolved, Ahead::No).await {
        Ok(up) => up.splice(s, io, Bytes::new()).await,
        Err(refused) => {
            // Reset, as a refused connect is: a client that wrote and
            // half-closed would take a clean close for the server's answer.
            io.abort();
            refused.report(s);
        }
    }
}

/// An opaque stream's connection onward, made before the client's bytes flow.
pub struct Upstream {
    conn: Conn,
    /// The stream's load on its endpoint, for as long as it lasts. Judged by
    /// the connect, as soon as it is made: the endpoint took the stream, as
    /// far as the balancer can tell, as fast as the connect (the stream's life
    /// says nothing of its latency). A connection made for a client that has
    /// not spoken may idle for an hour, and meanwhile does not await an answer
    /// (which would make its endpoint look slow), nor hold the probe of an
    /// endpoint just out of ejection: it probes only if used (`Ahead`).
    load: Option<InFlight>,
}

enum Conn {
    /// To the endpoint's proxy, over mTLS.
    Peer(Box<TlsStream<TcpStream>>, std::net::SocketAddr),
    /// To the endpoint (or the destination) itself.
    Direct(TcpStream, DestAddr),
}

impl Upstream {
    /// A connection made ahead carries a stream that works: see
    /// `InFlight::used`.
    pub fn used(&self) {
        if let Some(l) = &self.load {
            l.used();
        }
    }

    /// Ends a stream that carried nothing, cleanly (a TLS close, then a
    /// FIN), within a moment: what a peer proxy tells its app is that the
    /// client went away, not that the stream failed.
    pub async fn close(self) {
        let shut = async {
            match self.conn {
                Conn::Peer(mut t, _) => t.shutdown().await,
                Conn::Direct(mut t, _) => t.shutdown().await,
            }
        };
        let _ = tokio::time::timeout(crate::tcp::CLOSE_WITHIN, shut).await;
    }

    /// Reads what the server sends before the client has said anything.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match &mut self.conn {
            Conn::Peer(t, ..) => t.read_buf(buf).await,
            Conn::Direct(t, _) => t.read_buf(buf).await,
        }
    }

    /// Copies both ways, `first` (already read from the server) to the client first.
    pub async fn splice<I>(self, s: &Shared, io: I, first: Bytes)
    where
        I: AsyncRead + AsyncWrite + crate::tcp::Abort + Unpin,
    {
        let (tcp, m) = (&s.tcp, &s.metrics);
        let load = self.load;
        match self.conn {
            Conn::Peer(t, addr) => {
                let answered = !first.is_empty();
                let up = PrefixedIo::new(first, t);
                let ended = crate::tcp::splice(io, up, &addr, tcp, m, DIRECTION).await;
                // The peer proxy cut the stream without a word (no TLS
                // close): its app refused it (down, restarting) or its
                // policy did. Not a reset: the peer resets a stream it
                // refuses for what the client sent. The
                // connect counted as a success; this makes the endpoint
                // costly to the balancer, or a dead app behind a live proxy
                // would draw most new streams (they end at once).
                let cut = ended.upstream_failed == Some(std::io::ErrorKind::UnexpectedEof);
                if cut
                    && !answered
                    && ended.down == 0
                    && let Some(l) = &load
                {
                    l.stream_cut();
                }
            }
            Conn::Direct(t, dst) => {
                let up = PrefixedIo::new(first, t);
                crate::tcp::splice(io, up, &dst, tcp, m, DIRECTION).await;
            }
        }
    }
}

/// Why an opaque stream could not be connected; counted and logged by whoever
/// gives up on the stream.
pub enum Refused {
    /// The destination (or an unmeshed endpoint) could not be resolved or reached.
    Dial {
        reason: &'static str,
        to: DestAddr,
        error: String,
    },
    NoEndpoints {
        service: String,
    },
    /// The endpoint's proxy could not be reached, or was not who discovery said.
    Peer {
        addr: std::net::SocketAddr,
        identity: String,
        error: String,
    },
}

impl Refused {
    /// Counted, and logged sampled: the app can open streams to a dead
    /// destination as fast as it likes.
    pub fn report(&self, s: &Shared) {
        match self {
            Refused::Dial { reason, to, error } => {
                s.metrics.reject_tcp(DIRECTION, reason);
                strait_otel::sampled!(warn, direction = DIRECTION.as_str(), dst = %to, %error, "opaque stream refused");
            }
            Refused::NoEndpoints { service } => {
                s.metrics.reject_tcp(DIRECTION, "no_endpoints");
                strait_otel::sampled!(warn, %service, "no endpoints; opaque stream closed");
            }
            Refused::Peer {
                addr,
                identity,
                error,
            } => {
                s.metrics.reject_tcp(DIRECTION, "connect");
                strait_otel::sampled!(warn, peer = %addr, %identity, %error, "opaque stream to peer proxy refused");
            }
        }
    }
}

/// Whether a connection is made ahead of a client that has not spoken yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ahead {
    /// The stream is opaque: its connect is all the balancer will learn.
    No,
    /// It may turn out HTTP and the connection be dropped unused: its connect
    /// re-admits no endpoint it probes unless the connection is used
    /// (`InFlight::connected_ahead`).
    OfASilentClient,
}

/// The connect went through: judged so, as `ahead` says.
fn connected(load: &InFlight, ahead: Ahead, took: Duration) {
    match ahead {
        Ahead::No => load.success_took(took),
        Ahead::OfASilentClient => load.connected_ahead(took),
    }
}

/// Connects where an opaque stream to `dst` goes.
pub async fn connect(
    s: &Shared,
    b: &Builder,
    dst: DestAddr,
    resolved: Option<Resolved>,
    ahead: Ahead,
) -> Result<Upstream, Refused> {
    let dial = async |to: DestAddr, load: Option<InFlight>, within: Duration| {
        let start = tokio::time::Instant::now();
        match crate::tcp::dial_within(&to, &s.tcp, within).await {
            Ok(t) => {
                if let Some(l) = &load {
                    connected(l, ahead, start.elapsed());
                }
                Ok(Upstream {
                    conn: Conn::Direct(t, to),
                    load,
                })
            }
            Err((reason, error)) => {
                // An endpoint that refuses is a failure for the breaker, not
                // the fastest answer of all.
                if let Some(l) = load {
                    l.unreachable();
                }
                Err(Refused::Dial { reason, to, error })
            }
        }
    };
    let Some(Resolved {
        resolution: Resolution::Service(view),
        logical,
    }) = resolved
    else {
        return dial(dst, None, s.tcp.connect_timeout).await;
    };
    let stages = logical.stages(&view, b);
    let backend = stages.default_backend();
    // A BackendPolicy's connectTimeout holds for its opaque streams too.
    let within = backend
        .and_then(|eps| eps.config().connect_timeout)
        .unwrap_or(s.tcp.connect_timeout);
    let picked = backend.and_then(|eps| eps.pick(&http::HeaderMap::new(), &[]).ok());
    let Some(in_flight) = picked else {
        return Err(Refused::NoEndpoints {
            service: view.name.to_string(),
        });
    };
    let ep = in_flight.endpoint().clone();
    let (Some(peer), Some(peer_tls)) = (&ep.proxy, &s.peer_tls) else {
        return dial(DestAddr::Socket(ep.addr), Some(in_flight), within).await;
    };
    let addr = ep.connect_addr();
    if let Some(reason) = peer_tls.own_certificate_problem() {
        // This proxy's fault, not the endpoint's.
        in_flight.no_verdict();
        return Err(Refused::Peer {
            addr,
            identity: peer.identity.to_string(),
            error: reason.to_string(),
        });
    }
    let start = tokio::time::Instant::now();
    match over_mtls(ep.addr.port(), addr, peer, peer_tls, within).await {
        Ok(t) => {
            connected(&in_flight, ahead, start.elapsed());
            Ok(Upstream {
                conn: Conn::Peer(Box::new(t), addr),
                load: Some(in_flight),
            })
        }
        Err(error) => {
            in_flight.unreachable();
            Err(Refused::Peer {
                addr,
                identity: peer.identity.to_string(),
                error,
            })
        }
    }
}

/// One mTLS connection to the peer proxy per stream (ALPN `strait-opaque/1`),
/// the target port first, then the app's bytes both ways. The peer must present
/// the identity discovery gave; there is no plaintext fallback.
async fn over_mtls(
    target_port: u16,
    addr: std::net::SocketAddr,
    peer: &PeerProxy,
    peer_tls: &PeerTls,
    within: Duration,
) -> Result<TlsStream<TcpStream>, String> {
    let mut stream = peer_tls
        .connect(addr, &peer.identity, tls::ALPN_OPAQUE, within)
        .await
        .map_err(|e| e.to_string())?;
    // Flushed at once: a server-speaks-first app waits on it.
    let preamble = target_port.to_be_bytes();
    async {
        stream.write_all(&preamble).await?;
        stream.flush().await
    }
    .await
    .map_err(|e| e.to_string())?;
    Ok(stream)
}
