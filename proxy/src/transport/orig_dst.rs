//! The original destination of a connection that iptables redirected to us.

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::addr::OrigDst;

/// `SO_ORIGINAL_DST` of a redirected connection; `None` when the connection was
/// not redirected or the kernel has no NAT entry for it.
///
/// With conntrack active (as it is once `strait-proxy init` installed NAT rules),
/// a connection that was *not* redirected still has an entry, whose original
/// destination is the socket's own local address. That is compared with the
/// socket's address, not the listener's: a listener on 0.0.0.0:4143 accepts
/// connections to 10.0.0.5:4143, which must not read as "redirected to 4143".
pub fn orig_dst(stream: &TcpStream) -> Option<OrigDst> {
    let local = stream.local_addr().ok()?;
    let sock = SockRef::from(stream);
    let addr = match local {
        std::net::SocketAddr::V4(_) => sock.original_dst_v4(),
        std::net::SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (addr != local).then_some(OrigDst(addr))
}
