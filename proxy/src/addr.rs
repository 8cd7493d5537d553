//! Types for the addresses and ports the proxy deals in, parsed once at the edge.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// Where the app meant to connect (from `SO_ORIGINAL_DST` or an `--upstream` listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

/// The port of the app in the peer pod, carried from proxy to proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetPort(pub u16);

/// The addresses this proxy listens on: never a destination of its own traffic
/// (a request to one of them would come straight back to us).
#[derive(Clone, Debug)]
pub struct OwnAddrs {
    listeners: std::sync::Arc<[SocketAddr]>,
    /// Listeners other hosts reach (inbound, admin): bound to every address,
    /// one is ours at loopback and at `host` only; another pod's port 4191
    /// is not ours.
    public: std::sync::Arc<[SocketAddr]>,
    /// This host's address besides loopback (the pod's, where the app is reached).
    host: Option<IpAddr>,
}

impl OwnAddrs {
    /// Listeners bound to every address are ours at any address: a loop
    /// through one reached by an address of the host not known here (another
    /// interface, the other family) is still caught.
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        OwnAddrs {
            listeners: addrs.into_iter().collect(),
            public: std::sync::Arc::new([]),
            host: None,
        }
    }

    /// With `public` listeners, which other hosts reach at their own ports,
    /// on a host whose address is `host`.
    pub fn with_public(self, public: impl IntoIterator<Item = SocketAddr>, host: IpAddr) -> Self {
        let host = host.to_canonical();
        OwnAddrs {
            public: public.into_iter().collect(),
            host: (!host.is_loopback() && !host.is_unspecified()).then_some(host),
            ..self
        }
    }

    /// Whether a connection to `addr` would reach one of our listeners. Loopback
    /// addresses (and ::ffff:127.0.0.1, and 0.0.0.0) are one host to the kernel.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        let local = ip.is_loopback() || ip.is_unspecified();
        let ours = local || self.host == Some(ip);
        let at = |l: &SocketAddr, any: bool| {
            l.port() == addr.port()
                && (l.ip().to_canonical() == ip
                    || l.ip().is_unspecified() && any
                    || local && l.ip().is_loopback())
        };
        self.listeners.iter().any(|l| at(l, true)) || self.public.iter().any(|l| at(l, ours))
    }

    /// Whether one of our listeners has this port (as a port of this pod).
    pub fn has_port(&self, port: u16) -> bool {
        self.listeners
            .iter()
            .chain(self.public.iter())
            .any(|l| l.port() == port)
    }
}

/// The address of the client of a connection we accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// A destination: an address, or a DNS name and port to resolve when connecting.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DestAddr {
    Socket(SocketAddr),
    Name(NameAddr),
}

impl DestAddr {
    pub fn port(&self) -> u16 {
        match self {
            DestAddr::Socket(a) => a.port(),
            DestAddr::Name(n) => n.port,
        }
    }
}

impl fmt::Display for DestAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestAddr::Socket(a) => a.fmt(f),
            DestAddr::Name(n) => n.fmt(f),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NameAddr {
    /// Shared: a name is cloned into every request of a fixed destination and
    /// into discovery's keys.
    host: std::sync::Arc<str>,
    port: u16,
}

impl NameAddr {
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("expected HOST:PORT, got {0:?}")]
    MissingPort(String),
    #[error("invalid port in {0:?}")]
    BadPort(String),
    #[error("invalid host name {0:?}")]
    BadHost(String),
    #[error(
        "expected LOCAL=DEST (e.g. 127.0.0.1:15432=db.default.svc.cluster.local:5432), got {0:?}"
    )]
    BadUpstream(String),
    #[error("invalid port list {0:?}: {1}")]
    BadPorts(String, String),
}

impl FromStr for DestAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(DestAddr::Socket(canonical(a)));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| AddrError::MissingPort(s.to_string()))?;
        let port: u16 = port
            .parse()
            .map_err(|_| AddrError::BadPort(s.to_string()))?;
        if port == 0 {
            return Err(AddrError::BadPort(s.to_string()));
        }
        if !is_dns_name(host) {
            return Err(AddrError::BadHost(host.to_string()));
        }
        Ok(DestAddr::Name(NameAddr {
            host: host.trim_end_matches('.').to_ascii_lowercase().into(),
            port,
        }))
    }
}

/// One address, one form: an IPv4-mapped IPv6 address as the IPv4 one, and
/// no scope id or flow label but a link-local address's scope (which it needs
/// to be reached). Each form would otherwise be a destination of its own, a
/// watch of its own on the controller for one Service, and a client writing
/// `Host: [::ffff:10.96.0.20%N]` could open as many as it liked.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(_) => a,
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => {
                let link_local = v6.ip().segments()[0] & 0xffc0 == 0xfe80;
                let scope = if link_local { v6.scope_id() } else { 0 };
                SocketAddr::V6(std::net::SocketAddrV6::new(*v6.ip(), v6.port(), 0, scope))
            }
        },
    }
}

/// RFC 1123 host name: labels of letters, digits and hyphens, at most 253 bytes.
fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `--upstream LOCAL=DEST`: a local listener whose connections all go to DEST.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub local: SocketAddr,
    pub dest: DestAddr,
}

impl FromStr for Upstream {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (local, dest) = s
            .split_once('=')
            .ok_or_else(|| AddrError::BadUpstream(s.to_string()))?;
        let local = local
            .trim()
            .parse()
            .map_err(|_| AddrError::BadUpstream(s.to_string()))?;
        let dest = dest.trim().parse()?;
        Ok(Upstream { local, dest })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.local, self.dest)
    }
}

/// A set of ports: "25,587,8000-8100"; the empty string is the empty set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(BTreeSet<u16>);

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0.contains(&port)
    }
    pub fn insert(&mut self, port: u16) {
        self.0.insert(port);
    }
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().copied()
    }
}

impl FromStr for PortSet {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| AddrError::BadPorts(s.to_string(), why.to_string());
        let mut set = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let lo: u16 = lo.trim().parse().map_err(|_| bad("not a port number"))?;
            let hi: u16 = hi.trim().parse().map_err(|_| bad("not a port number"))?;
            if lo == 0 || lo > hi {
                return Err(bad("ports are 1-65535 and ranges go low-high"));
            }
            set.extend(lo..=hi);
        }
        Ok(PortSet(set))
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports: Vec<String> = self.0.iter().map(u16::to_string).collect();
        f.write_str(&ports.join(","))
    }
}

pub use strait_api::net::IpNet;

#[cfg(test)]
mod tests {
    use super::*;

    /// A public listener on every address is reached at loopback and at the
    /// pod's own address; another pod's admin port (a meshed Prometheus
    /// scraping it) is not ours. Other listeners on every address are ours at
    /// any address.
    #[test]
    fn a_listener_on_every_address_is_ours_at_our_addresses_only() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let own = OwnAddrs::new([a("127.0.0.1:4140"), a("0.0.0.0:15432")])
            .with_public([a("0.0.0.0:4191")], "10.0.0.7".parse().unwrap());
        for mine in [
            "127.0.0.1:4191",
            "127.0.0.2:4191",
            "0.0.0.0:4191",
            "[::ffff:127.0.0.1]:4191",
            "10.0.0.7:4191",
            "[::ffff:10.0.0.7]:4191",
            "127.0.0.1:4140",
            // Any address's, for a listener of the pod's own traffic.
            "10.0.0.8:15432",
        ] {
            assert!(own.contains(a(mine)), "{mine}");
        }
        for other in ["10.0.0.8:4191", "10.0.0.7:4140", "10.0.0.7:80"] {
            assert!(!own.contains(a(other)), "{other}");
        }
        // Without a host address, loopback only.
        let own = OwnAddrs::new([]).with_public([a("0.0.0.0:4191")], "127.0.0.1".parse().unwrap());
        assert!(own.contains(a("127.0.0.1:4191")));
        assert!(!own.contains(a("10.0.0.7:4191")));
    }

    #[test]
    fn an_address_has_one_form() {
        let parse = |s: &str| s.parse::<DestAddr>().unwrap();
        let v4 = parse("10.96.0.20:80");
        for form in [
            "[::ffff:10.96.0.20]:80",
            "[::ffff:10.96.0.20%1]:80",
            "[::ffff:10.96.0.20%4294967295]:80",
        ] {
            assert_eq!(parse(form), v4, "{form}");
        }
        assert_eq!(parse("[fd00::1%7]:80"), parse("[fd00::1]:80"));
        // A link-local address keeps the interface it is reached on.
        assert_eq!(parse("[fe80::1%2]:80").to_string(), "[fe80::1%2]:80");
    }

    #[test]
    fn upstream_parses_name_and_socket_destinations() {
        let u: Upstream = "127.0.0.1:15432=db.default.svc.cluster.local:5432"
            .parse()
            .unwrap();
        assert_eq!(u.local, "127.0.0.1:15432".parse().unwrap());
        assert_eq!(u.dest.to_string(), "db.default.svc.cluster.local:5432");
        let u: Upstream = "127.0.0.1:1=[::1]:80".parse().unwrap();
        assert_eq!(u.dest, DestAddr::Socket("[::1]:80".parse().unwrap()));
    }

    #[test]
    fn malformed_upstreams_are_refused_with_the_reason() {
        assert!(matches!(
            "127.0.0.1:1".parse::<Upstream>(),
            Err(AddrError::BadUpstream(_))
        ));
        assert!(matches!(
            "127.0.0.1:1=db".parse::<Upstream>(),
            Err(AddrError::MissingPort(_))
        ));
        assert!(matches!(
            "127.0.0.1:1=db:0".parse::<Upstream>(),
            Err(AddrError::BadPort(_))
        ));
        assert!(matches!(
            "127.0.0.1:1=bad_host!:80".parse::<Upstream>(),
            Err(AddrError::BadHost(_))
        ));
    }

    #[test]
    fn port_sets_take_lists_ranges_and_nothing() {
        let p: PortSet = "25, 587,8000-8002".parse().unwrap();
        assert!(p.contains(25) && p.contains(8001) && !p.contains(80));
        assert_eq!(p.to_string(), "25,587,8000,8001,8002");
        assert_eq!("".parse::<PortSet>().unwrap(), PortSet::default());
        assert!("0".parse::<PortSet>().is_err());
        assert!("9-3".parse::<PortSet>().is_err());
        assert!("http".parse::<PortSet>().is_err());
    }
}
