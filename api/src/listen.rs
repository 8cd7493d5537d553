//! Listening sockets for both binaries' ports: `[::]` means every address of
//! both families, as a pod's first address may be either (an IPv6-only or
//! IPv6-first cluster's kubelet probes the IPv6 one).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpListener;
use tracing::debug;

/// Binds `addr` (within a Tokio runtime); `[::]` takes IPv4 connections too (whatever
/// `net.ipv6.bindv6only` says), and is `0.0.0.0` where the kernel has no IPv6.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let every_host_v6 = addr.ip() == Ipv6Addr::UNSPECIFIED;
    let (socket, addr) = match Socket::new(Domain::for_address(addr), Type::STREAM, None) {
        Err(e) if every_host_v6 && no_ipv6(&e) => {
            debug!(%addr, error = %e, "no IPv6: listening on IPv4 only");
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            (Socket::new(Domain::IPV4, Type::STREAM, None)?, v4)
        }
        r => (r?, addr),
    };
    if every_host_v6 && addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // As std's and Tokio's own listeners: a restarted process rebinds its port
    // while the last one's connections are in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The kernel has no IPv6 (booted without it), or not on this interface.
pub fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
}
