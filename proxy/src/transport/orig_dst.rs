//! The original destination of a connection that iptables redirected to us.

use std::net::SocketAddr;

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
///
/// On a listener on `[::]`, IPv4 connections arrive with IPv4-mapped addresses
/// (`::ffff:10.0.0.5`); their NAT entry is IPv4's, asked for as such, and
/// compared in IPv4's form.
pub fn orig_dst(stream: &TcpStream) -> Option<OrigDst> {
    let local = canonical(stream.local_addr().ok()?);
    let sock = SockRef::from(stream);
    let addr = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    let addr = canonical(addr);
    (addr != local).then_some(OrigDst(addr))
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}
