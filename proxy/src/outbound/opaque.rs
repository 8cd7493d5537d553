//! Opaque TCP: to a balanced endpoint of the Service's default backend (over
//! mTLS to its proxy when both sides have identities), else as addressed.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::warn;

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
    I: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(up) = connect(s, b, dst, resolved).await {
        up.splice(s, io, Bytes::new()).await;
    }
}

/// An opaque stream's connection onward, made before the client's bytes flow.
pub struct Upstream {
    conn: Conn,
    /// Counts the stream as load on its endpoint for as long as it lasts.
    _load: Option<InFlight>,
}

enum Conn {
    /// To the endpoint's proxy, over mTLS.
    Peer(Box<TlsStream<TcpStream>>, std::net::SocketAddr),
    /// To the endpoint (or the destination) itself.
    Direct(TcpStream, DestAddr),
}

impl Upstream {
    /// Reads what the server sends before the client has said anything.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match &mut self.conn {
            Conn::Peer(t, _) => t.read_buf(buf).await,
            Conn::Direct(t, _) => t.read_buf(buf).await,
        }
    }

    /// Copies both ways, `first` (already read from the server) to the client first.
    pub async fn splice<I>(self, s: &Shared, io: I, first: Bytes)
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let (tcp, m) = (&s.tcp, &s.metrics);
        match self.conn {
            Conn::Peer(t, addr) => {
                let up = PrefixedIo::new(first, t);
                crate::tcp::splice(io, up, &addr, tcp, m, DIRECTION).await
            }
            Conn::Direct(t, dst) => {
                let up = PrefixedIo::new(first, t);
                crate::tcp::splice(io, up, &dst, tcp, m, DIRECTION).await
            }
        }
    }
}

/// Connects where an opaque stream to `dst` goes; `None` (counted and logged)
/// when it cannot.
pub async fn connect(
    s: &Shared,
    b: &Builder,
    dst: DestAddr,
    resolved: Option<Resolved>,
) -> Option<Upstream> {
    let Some(Resolved {
        resolution: Resolution::Service(view),
        logical,
    }) = resolved
    else {
        let t = crate::tcp::connect(&dst, &s.tcp, &s.metrics, DIRECTION).await?;
        return Some(Upstream {
            conn: Conn::Direct(t, dst),
            _load: None,
        });
    };
    let stages = logical.stages(&view, b);
    let picked = stages
        .default_backend()
        .and_then(|eps| eps.pick(&http::HeaderMap::new(), None).ok());
    let Some(in_flight) = picked else {
        s.metrics.reject_tcp(DIRECTION, "no_endpoints");
        warn!(service = %view.name, "no endpoints; opaque stream closed");
        return None;
    };
    let ep = in_flight.endpoint().clone();
    if let (Some(peer), Some(peer_tls)) = (&ep.proxy, &s.peer_tls) {
        let addr = ep.connect_addr();
        return match over_mtls(s, ep.addr.port(), addr, peer, peer_tls).await {
            Ok(t) => {
                in_flight.success();
                Some(Upstream {
                    conn: Conn::Peer(Box::new(t), addr),
                    _load: Some(in_flight),
                })
            }
            Err((reason, error)) => {
                in_flight.unreachable();
                s.metrics.reject_tcp(DIRECTION, reason);
                warn!(peer = %addr, identity = %peer.identity, %error, "opaque stream to peer proxy refused");
                None
            }
        };
    }
    let to = DestAddr::Socket(ep.addr);
    let t = crate::tcp::connect(&to, &s.tcp, &s.metrics, DIRECTION).await?;
    Some(Upstream {
        conn: Conn::Direct(t, to),
        _load: Some(in_flight),
    })
}

/// One mTLS connection to the peer proxy per stream (ALPN `strait-opaque/1`),
/// the target port first, then the app's bytes both ways. The peer must present
/// the identity discovery gave; there is no plaintext fallback.
async fn over_mtls(
    s: &Shared,
    target_port: u16,
    addr: std::net::SocketAddr,
    peer: &PeerProxy,
    peer_tls: &PeerTls,
) -> Result<TlsStream<TcpStream>, (&'static str, String)> {
    let mut stream = peer_tls
        .connect(
            addr,
            &peer.identity,
            tls::ALPN_OPAQUE,
            s.tcp.connect_timeout,
        )
        .await
        .map_err(|e| ("connect", e.to_string()))?;
    // Flushed at once: a server-speaks-first app waits on it.
    let preamble = target_port.to_be_bytes();
    async {
        stream.write_all(&preamble).await?;
        stream.flush().await
    }
    .await
    .map_err(|e| ("connect", e.to_string()))?;
    Ok(stream)
}
