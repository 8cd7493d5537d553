//! What a test needs of the host beyond loopback, and what happens when it is
//! missing: in CI (`CI` set) a test fails loudly; elsewhere it is skipped with
//! the reason printed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

/// The test cannot run here: panics in CI, otherwise prints why and returns.
pub fn missing(what: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("this test needs {what}, and CI must provide it");
    }
    eprintln!("skipped: needs {what}");
}

/// An address of this host that is not loopback, so that connecting to our own
/// listeners through it looks to them like a caller from the network. The
/// host's own address when it has one (found by asking the kernel which source
/// it would use for a documentation-range peer; nothing is sent); otherwise, as
/// root, 198.51.100.7 added to `lo`.
pub fn non_loopback_ip() -> Option<IpAddr> {
    let routed = [
        "192.0.2.1:9",
        "198.51.100.1:9",
        "203.0.113.1:9",
        "10.255.255.1:9",
    ]
    .iter()
    .filter_map(|peer| {
        let s = UdpSocket::bind("0.0.0.0:0").ok()?;
        s.connect(peer.parse::<SocketAddr>().ok()?).ok()?;
        s.local_addr().ok().map(|a| a.ip())
    })
    .find(|ip| !ip.is_loopback() && !ip.is_unspecified());
    if routed.is_some() {
        return routed;
    }
    let ours = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    let added = std::process::Command::new("ip")
        .args(["addr", "replace", "198.51.100.7/32", "dev", "lo"])
        .status()
        .is_ok_and(|s| s.success());
    added.then_some(ours)
}
