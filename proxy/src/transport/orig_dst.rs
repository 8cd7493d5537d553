//! The original destination of a connection that iptables redirected to us.

use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::addr::OrigDst;

/// `SO_ORIGINAL_DST` of a redirected connection; `None` when the connection was
/// not redirected (the original destination is our own listener) or the kernel
/// has no NAT entry for it.
pub fn orig_dst(stream: &TcpStream, local: SocketAddr) -> Option<OrigDst> {
    let sock = SockRef::from(stream);
    let addr = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (addr != local).then_some(OrigDst(addr))
}
