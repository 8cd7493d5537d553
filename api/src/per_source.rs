//! What one source address may hold at once: connections to the controller's
//! gRPC port, watches, token reviews, connections to a proxy's admin port.
//! Every pod has an address of its own, so a pod that opens them without end
//! is refused past its share rather than taking what every other caller (other
//! proxies, the kubelet) needs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Who gets a connection's place on a port other pods can reach (the admin
/// ports, where the kubelet probes): any address while open places are free,
/// up to its share; the last `reserved` only loopback and addresses holding
/// fewer than two (a probe, a scraper). A few addresses holding their share
/// each would otherwise fill every place and the kubelet's probes fail.
#[derive(Debug)]
pub struct Admission {
    open: Arc<tokio::sync::Semaphore>,
    reserved: Arc<tokio::sync::Semaphore>,
    by_source: PerSource,
}

/// An admitted connection's place, given back when dropped.
pub type Place = (tokio::sync::OwnedSemaphorePermit, Share);

/// Addresses holding fewer than this may take a reserved place.
const RESERVED_FOR_UNDER: usize = 2;

impl Admission {
    /// `total` places, `reserved` of them kept as above, `per_source` at
    /// most per address other than loopback.
    pub fn new(total: usize, reserved: usize, per_source: usize) -> Self {
        Admission {
            open: Arc::new(tokio::sync::Semaphore::new(total.saturating_sub(reserved))),
            reserved: Arc::new(tokio::sync::Semaphore::new(reserved.min(total))),
            by_source: PerSource::sparing_loopback(per_source),
        }
    }

    pub fn admit(&self, source: IpAddr) -> Result<Place, &'static str> {
        let few = || source.is_loopback() || self.by_source.held_by(source) < RESERVED_FOR_UNDER;
        let permit = match self.open.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) if few() => self
                .reserved
                .clone()
                .try_acquire_owned()
                .map_err(|_| "connections at the limit; closed")?,
            Err(_) => return Err("connections at the limit; closed"),
        };
        let share = self
            .by_source
            .take(Some(source))
            .ok_or("connections from this address at the limit; closed")?;
        Ok((permit, share))
    }
}

/// Places held, by source and what they are of (0 when not told).
type Held = Arc<Mutex<HashMap<(IpAddr, u64), usize>>>;

#[derive(Clone, Debug)]
pub struct PerSource {
    limit: usize,
    /// Loopback callers are in the controller's own network namespace: in a
    /// cluster only its own pod, and the demo and the benchmarks run every
    /// proxy there. Some shares count them anyway.
    count_loopback: bool,
    held: Held,
}

/// One place in a source's share, given back when dropped.
#[derive(Debug)]
#[must_use = "the place is given back when this is dropped"]
pub struct Share(Option<(Held, (IpAddr, u64))>);

impl PerSource {
    /// At most `limit` at once per address, loopback included.
    pub fn new(limit: usize) -> Self {
        PerSource {
            limit,
            count_loopback: true,
            held: Held::default(),
        }
    }

    /// At most `limit` at once per address; loopback is not counted.
    pub fn sparing_loopback(limit: usize) -> Self {
        PerSource {
            count_loopback: false,
            ..PerSource::new(limit)
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A place for `source`, unless it holds its share already. An unknown
    /// source (no address) is not counted.
    pub fn take(&self, source: Option<IpAddr>) -> Option<Share> {
        self.take_of(source, 0)
    }

    /// A place for `source` among those of `what` (a hash of what is held:
    /// a watched view), unless it holds its share of them already.
    pub fn take_of(&self, source: Option<IpAddr>, what: u64) -> Option<Share> {
        let Some(source) = source.filter(|s| self.count_loopback || !s.is_loopback()) else {
            return Some(Share(None));
        };
        let key = (source, what);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(key).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Share(Some((self.held.clone(), key))))
    }

    /// Places `source` holds now.
    pub fn held_by(&self, source: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&(source, 0)).copied().unwrap_or(0)
    }

    #[cfg(test)]
    pub fn sources(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let Some((held, source)) = &self.0 else {
            return;
        };
        let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(source) {
            *n -= 1;
            if *n == 0 {
                held.remove(source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    /// A few addresses holding their share each cannot take every place:
    /// the last ones go to addresses holding fewer than two (the kubelet's
    /// probe) and to loopback.
    #[test]
    fn the_kubelet_finds_a_place_when_others_hold_theirs() {
        let a = super::Admission::new(64, 16, 8);
        let ip = |i: u8| std::net::IpAddr::from([10, 0, 0, i]);
        let mut held = Vec::new();
        for i in 1..=8 {
            for _ in 0..8 {
                if let Ok(p) = a.admit(ip(i)) {
                    held.push(p);
                }
            }
        }
        // Six take the open places; the last two, arriving with none, two
        // reserved ones each.
        assert_eq!(held.len(), 48 + 2 * 2);
        assert!(a.admit(ip(1)).is_err(), "past the others' places");
        let kubelet = ip(200);
        let first = a.admit(kubelet).expect("a reserved place");
        let _second = a.admit(kubelet).expect("a second, still few");
        assert!(a.admit(kubelet).is_err(), "not a third");
        assert!(a.admit(std::net::Ipv4Addr::LOCALHOST.into()).is_ok());
        drop(first);
        assert!(a.admit(kubelet).is_ok(), "its place back");
    }

    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn one_address_gets_its_share_and_no_more() {
        let p = PerSource::new(3);
        let shares: Vec<_> = (0..3).map(|_| p.take(ip("10.0.0.1")).unwrap()).collect();
        assert!(p.take(ip("10.0.0.1")).is_none(), "a fourth at once");
        assert!(p.take(ip("10.0.0.2")).is_some(), "another address");
        drop(shares);
        let s = p.take(ip("10.0.0.1"));
        assert!(s.is_some(), "places given back");
        assert_eq!(p.held_by("10.0.0.1".parse().unwrap()), 1);
        drop(s);
        assert_eq!(p.sources(), 0, "no entry left behind");
    }

    #[test]
    fn loopback_and_unknown_sources_are_spared_where_asked() {
        let spared = PerSource::sparing_loopback(1);
        let kept: Vec<_> = (0..10)
            .map(|_| spared.take(ip("127.0.0.1")).unwrap())
            .chain((0..10).map(|_| spared.take(ip("::1")).unwrap()))
            .chain((0..10).map(|_| spared.take(None).unwrap()))
            .collect();
        assert_eq!(spared.sources(), 0);
        let _one = spared.take(ip("10.0.0.1")).unwrap();
        assert!(spared.take(ip("10.0.0.1")).is_none());
        drop(kept);

        let counted = PerSource::new(1);
        let _one = counted.take(ip("127.0.0.1")).unwrap();
        assert!(counted.take(ip("127.0.0.1")).is_none());
    }
}
