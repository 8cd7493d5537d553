//! Opaque TCP: to a balanced endpoint of the Service's default backend (over
//! mTLS to its proxy when both sides have identities), else as addressed.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::warn;

use super::DIRECTION;
use super::logical::Builder;
use crate::addr::DestAddr;
use crate::balance::InFlight;
use crate::control::discovery::Resolved;
use crate::control::view::{PeerProxy, Resolution};
use crate::identity::tls;
use crate::proxy::Shared;
use crate::transport::connect::PeerTls;

pub async fn forward<I>(s: &Shared, b: &Builder, io: I, dst: DestAddr, resolved: Option<Resolved>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let Some(Resolved {
        resolution: Resolution::Service(view),
        logical,
    }) = resolved
    else {
        return crate::tcp::forward(io, &dst, &s.tcp, &s.metrics, DIRECTION).await;
    };
    let stages = logical.stages(&view, b);
    let picked = stages
        .default_backend()
        .and_then(|eps| eps.pick(&http::HeaderMap::new(), None).ok());
    let Some(in_flight) = picked else {
        s.metrics.reject_tcp(DIRECTION, "no_endpoints");
        warn!(service = %view.name, "no endpoints; opaque stream closed");
        return;
    };
    let ep = in_flight.endpoint().clone();
    if let (Some(peer), Some(peer_tls)) = (&ep.proxy, &s.peer_tls) {
        return over_mtls(
            s,
            io,
            ep.addr.port(),
            ep.connect_addr(),
            peer,
            peer_tls,
            in_flight,
        )
        .await;
    }
    let to = DestAddr::Socket(ep.addr);
    crate::tcp::forward(io, &to, &s.tcp, &s.metrics, DIRECTION).await
}

/// One mTLS connection to the peer proxy per stream (ALPN `strait-opaque/1`),
/// the target port first, then the app's bytes both ways. The peer must present
/// the identity discovery gave; there is no plaintext fallback.
async fn over_mtls<I>(
    s: &Shared,
    io: I,
    target_port: u16,
    addr: std::net::SocketAddr,
    peer: &PeerProxy,
    peer_tls: &PeerTls,
    in_flight: InFlight,
) where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let failed = |reason: &'static str, error: String| {
        in_flight.unreachable();
        s.metrics.reject_tcp(DIRECTION, reason);
        warn!(peer = %addr, identity = %peer.identity, %error, "opaque stream to peer proxy refused");
    };
    let mut stream = match peer_tls
        .connect(
            addr,
            &peer.identity,
            tls::ALPN_OPAQUE,
            s.tcp.connect_timeout,
        )
        .await
    {
        Ok(t) => t,
        Err(e) => return failed("connect", e.to_string()),
    };
    // Flushed at once: a server-speaks-first app waits on it.
    let preamble = target_port.to_be_bytes();
    if let Err(e) = async {
        stream.write_all(&preamble).await?;
        stream.flush().await
    }
    .await
    {
        return failed("connect", e.to_string());
    }
    in_flight.success();
    crate::tcp::splice(io, stream, &addr, &s.tcp, &s.metrics, DIRECTION).await
}
