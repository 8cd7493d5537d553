//! IP networks as given in flags and annotations (`10.0.0.0/8`), parsed by
//! one set of rules wherever they are read: the injector admits exactly what
//! the proxy and its init container take.

use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 network, "10.0.0.0/8" or "fd00::/8" (a bare address is
/// a /32 or /128). Host bits must be zero, so a typo cannot silently skip a
/// different network than meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// `ip` is in this network (an IPv4-mapped IPv6 address, or network, as
    /// its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| match a {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32u32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let (addr, prefix) = match self.addr {
            IpAddr::V6(a) if self.prefix >= 96 && a.to_ipv4_mapped().is_some() => {
                (self.addr.to_canonical(), self.prefix - 96)
            }
            _ => (self.addr, self.prefix),
        };
        let ((net, width), (ip, ip_width)) = (bits(addr), bits(ip.to_canonical()));
        let host = width - u32::from(prefix);
        width == ip_width && net.checked_shr(host).unwrap_or(0) == ip.checked_shr(host).unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid CIDR {0:?}: {1}")]
pub struct CidrError(String, &'static str);

impl FromStr for IpNet {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| CidrError(s.to_string(), why);
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| bad("not an IP address (ADDR/PREFIX)"))?;
        let bits: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = match prefix {
            None => bits,
            Some(p) => p.parse().ok().filter(|p| *p <= bits).ok_or_else(|| {
                bad(if addr.is_ipv4() {
                    "the prefix length is 0-32"
                } else {
                    "the prefix length is 0-128"
                })
            })?,
        };
        let value = match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        // The low `bits - prefix` bits: the host's part of the address.
        let host_bits = u128::MAX
            .checked_shr(128 - u32::from(bits - prefix))
            .unwrap_or(0);
        if value & host_bits != 0 {
            return Err(bad("host bits are set"));
        }
        Ok(IpNet { addr, prefix })
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_contains_its_addresses_of_its_family_only() {
        let net = |n: &str| n.parse::<IpNet>().unwrap();
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        assert!(net("10.0.0.0/8").contains(ip("10.255.0.1")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")), "mapped");
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!net("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(net("::/0").contains(ip("2001:db8::1")));
        assert!(!net("::/0").contains(ip("8.8.8.8")));
        assert!(net("192.168.1.7").contains(ip("192.168.1.7")));
        assert!(!net("192.168.1.7").contains(ip("192.168.1.8")));
        assert!(
            net("fd00::/8").contains(ip("fdab::1")) && !net("fd00::/8").contains(ip("fe80::1"))
        );
        assert!(
            net("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")),
            "a mapped network"
        );
    }
}
