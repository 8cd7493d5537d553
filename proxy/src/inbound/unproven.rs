//! What clients that have not proved a mesh identity may hold of the inbound
//! listener. Anyone who can reach the pod can open connections to it and say
//! nothing (a silent one is carried as opaque TCP, and held as long as an
//! opaque stream is). Without a share per address, one host could take every
//! slot of `--max-connections`, and the mesh's own peers would be refused.
//!
//! So an address holds at most its share of plaintext connections, and,
//! separately, of connections still opening (waiting for a first byte or in
//! the TLS handshake): a host at its plaintext share can still be a peer. A
//! connection whose certificate names a workload gives its place back: peers
//! are counted only under `--max-connections`, since one pod's proxy may
//! rightly hold many (an opaque stream per connection of a database pool).
//! With mTLS on, plaintext connections and connections still opening, of all
//! addresses together, hold at most three quarters of the listener, so that
//! the quarter left is the peers' whoever floods it. A peer's connection must
//! open too, and cannot be told from a flood's before its handshake ends: past
//! the three quarters, a connection still opening may take of that quarter,
//! each address at most a sixty-fourth of it. Filling it then takes sixty-four
//! addresses rather than one.
//!
//! The kubelet's probes come in plaintext from the node's address, which also
//! carries every outside client the node forwards: a connection to a port it
//! probes may take one of a few places kept past all of the above, so that a
//! busy or flooded listener does not fail the probe and get the pod restarted.
//!
//! Loopback is counted like any address: in a pod nothing reaches the
//! inbound port from loopback, and the tests need it counted.

use std::net::IpAddr;
use std::sync::Arc;

use strait_api::per_source::{PerSource, Share};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a source's places are of (`PerSource::take_of`).
const PLAINTEXT: u64 = 0;
const OPENING: u64 = 1;

/// Of the peers' quarter, the part one address may hold while opening.
const RESERVE_PARTS: usize = 64;

/// Places kept for the kubelet's probes past every other limit, and of them
/// what one address may hold (a liveness and a readiness probe at once).
const PROBE_PLACES: usize = 16;
const PROBE_PLACES_PER_SOURCE: usize = 2;

/// Clones share their counts.
#[derive(Clone, Debug)]
pub(super) struct Unproven {
    by_source: PerSource,
    /// With mTLS: plaintext and opening connections of every address together.
    unproven: Option<Arc<Semaphore>>,
    /// Opening connections past `unproven`, in the peers' quarter.
    reserve: PerSource,
    /// Plaintext connections to a port the kubelet probes, past every limit
    /// above: `PROBE_PLACES` in all, two per address.
    probes: Arc<Semaphore>,
    probes_by_source: PerSource,
}

/// A connection's places until it has said whether it is a peer: its
/// address's share, and a place in the pool or, past it, in the peers'
/// quarter (neither without mTLS).
#[derive(Debug)]
pub(super) struct Opening {
    _share: Share,
    _pool: Option<OwnedSemaphorePermit>,
    _reserve: Option<Share>,
}

/// A plaintext connection's places, given back when it closes.
#[derive(Debug)]
pub(super) struct Plaintext {
    _share: Share,
    _permit: Option<OwnedSemaphorePermit>,
    /// Held in the places kept for the kubelet's probes: the connection is
    /// served a probe and closed, and nothing else (it would keep the place
    /// from the next probe).
    pub probe_only: bool,
}

/// Why a connection was refused: the reason it is counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// Its address holds its share.
    Source,
    /// Plaintext connections hold all they may of the listener.
    Unauthenticated,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Source => "source_limit",
            Refused::Unauthenticated => "unauthenticated_limit",
        }
    }
}

/// With mTLS on, the places of a listener of `max_connections` that
/// connections yet to prove a mesh identity may hold together: a quarter is
/// kept for the mesh's peers.
pub fn unproven_share(max_connections: usize) -> usize {
    (max_connections - max_connections / 4).max(1)
}

impl Unproven {
    /// `per_source`: the share of one address (by default a quarter of
    /// `max_connections`); `mtls`: whether peers can prove themselves, and so
    /// have part of the listener kept for them.
    pub fn new(max_connections: usize, per_source: Option<usize>, mtls: bool) -> Self {
        let per_source = per_source.unwrap_or((max_connections / 4).max(1));
        let peers = max_connections / 4;
        Unproven {
            by_source: PerSource::new(per_source),
            unproven: mtls.then(|| Arc::new(Semaphore::new(unproven_share(max_connections)))),
            reserve: PerSource::new((peers / RESERVE_PARTS).max(1)),
            probes: Arc::new(Semaphore::new(PROBE_PLACES)),
            probes_by_source: PerSource::new(PROBE_PLACES_PER_SOURCE),
        }
    }

    /// Places for a connection that has yet to say whether it is a peer.
    pub fn opening(&self, source: IpAddr) -> Result<Opening, Refused> {
        let share = self
            .by_source
            .take_of(Some(source), OPENING)
            .ok_or(Refused::Source)?;
        let (pool, reserve) = match &self.unproven {
            None => (None, None),
            Some(pool) => match pool.clone().try_acquire_owned() {
                Ok(permit) => (Some(permit), None),
                Err(_) => {
                    let place = self.reserve.take(Some(source));
                    (None, Some(place.ok_or(Refused::Unauthenticated)?))
                }
            },
        };
        Ok(Opening {
            _share: share,
            _pool: pool,
            _reserve: reserve,
        })
    }

    /// Places for a plaintext connection, for its life. One to a port the
    /// kubelet probes (`probed`, asked only when the limits below refuse it)
    /// may take one of the places kept for probes when its address, or
    /// plaintext clients together, hold all they may: the kubelet shares the
    /// node's address with every client that node forwards, and a failed
    /// probe restarts the pod.
    pub fn plaintext(
        &self,
        source: IpAddr,
        probed: impl FnOnce() -> bool,
    ) -> Result<Plaintext, Refused> {
        match self.pooled(source) {
            Err(refused) if probed() => self.probe(source).ok_or(refused),
            held => held,
        }
    }

    fn pooled(&self, source: IpAddr) -> Result<Plaintext, Refused> {
        let share = self
            .by_source
            .take_of(Some(source), PLAINTEXT)
            .ok_or(Refused::Source)?;
        let permit = match &self.unproven {
            Some(room) => Some(
                room.clone()
                    .try_acquire_owned()
                    .map_err(|_| Refused::Unauthenticated)?,
            ),
            None => None,
        };
        Ok(Plaintext {
            _share: share,
            _permit: permit,
            probe_only: false,
        })
    }

    fn probe(&self, source: IpAddr) -> Option<Plaintext> {
        let share = self.probes_by_source.take(Some(source))?;
        let permit = self.probes.clone().try_acquire_owned().ok()?;
        Some(Plaintext {
            _share: share,
            _permit: Some(permit),
            probe_only: true,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_holds_its_share_and_plaintext_leaves_the_peers_a_quarter() {
        let u = Unproven::new(8, Some(2), true);
        let a: Vec<_> = (0..2)
            .map(|_| u.plaintext(ip("10.0.0.1"), || false).unwrap())
            .collect();
        assert_eq!(
            u.plaintext(ip("10.0.0.1"), || false).unwrap_err(),
            Refused::Source
        );
        // Opening connections are counted apart: a host at its plaintext
        // share may still be a peer.
        let opening = u.opening(ip("10.0.0.1")).unwrap();
        let _second = u.opening(ip("10.0.0.1")).unwrap();
        assert_eq!(u.opening(ip("10.0.0.1")).unwrap_err(), Refused::Source);
        drop(opening);
        let again = u.opening(ip("10.0.0.1")).unwrap();
        // Handshakes that end give their places back.
        drop((again, _second));
        let others: Vec<_> = ["10.0.0.2", "10.0.0.2", "10.0.0.3", "10.0.0.3"]
            .into_iter()
            .map(|s| u.plaintext(ip(s), || false).unwrap())
            .collect();
        // Six of eight: the rest is the peers'.
        assert_eq!(
            u.plaintext(ip("10.0.0.4"), || false).unwrap_err(),
            Refused::Unauthenticated
        );
        drop(a);
        assert!(
            u.plaintext(ip("10.0.0.4"), || false).is_ok(),
            "places given back"
        );
        drop(others);
    }

    /// Four addresses at their opening share (a quarter each) would hold
    /// the whole listener, and a peer could not open a connection to it.
    #[test]
    fn opening_connections_leave_the_peers_quarter_to_many_addresses() {
        let u = Unproven::new(1024, Some(256), true);
        let flood: Vec<_> = (1..=3)
            .flat_map(|i| {
                let source = ip(&format!("10.0.0.{i}"));
                (0..256).map(move |_| source)
            })
            .map(|source| u.opening(source).unwrap())
            .collect();
        // Three quarters are held: plaintext clients get no more,
        assert_eq!(
            u.plaintext(ip("10.0.1.1"), || false).unwrap_err(),
            Refused::Unauthenticated
        );
        // and an address opening more gets a sixty-fourth of the rest.
        let fourth: Vec<_> = (0..256)
            .map_while(|_| u.opening(ip("10.0.0.4")).ok())
            .collect();
        assert_eq!(fourth.len(), 4);
        assert_eq!(
            u.opening(ip("10.0.0.4")).unwrap_err(),
            Refused::Unauthenticated
        );
        // Other addresses, the peers among them, still open theirs.
        let peers: Vec<_> = (0..60)
            .map(|i| u.opening(ip(&format!("10.0.2.{i}"))).unwrap())
            .collect();
        drop(flood);
        // Given back: the pool is taken first again.
        let _plain = u.plaintext(ip("10.0.1.1"), || false).unwrap();
        drop((fourth, peers));
    }

    /// A kubelet probe comes in plaintext from the node's address, which
    /// carries every outside client that node forwards too. With plaintext
    /// connections holding all they may (its address's share, or all
    /// addresses' three quarters), a probe of a probed port still gets a
    /// place: refused, it would fail, and the pod be restarted for others'
    /// connections.
    #[test]
    fn a_probed_port_keeps_places_for_the_kubelet() {
        let u = Unproven::new(8, Some(2), true);
        let held: Vec<_> = ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]
            .into_iter()
            .chain(["10.0.0.3", "10.0.0.3"])
            .map(|s| u.plaintext(ip(s), || false).unwrap())
            .collect();
        let node = ip("10.0.0.9");
        assert_eq!(
            u.plaintext(node, || false).unwrap_err(),
            Refused::Unauthenticated
        );
        // The pool is full and the node's share is not: a probe is let in,
        // in a place that serves probes only,
        let probe = u.plaintext(node, || true).expect("a probe's place");
        assert!(probe.probe_only && !held[0].probe_only);
        // and so is one from an address at its share (the node's, carrying
        // forwarded clients).
        let at_share = u
            .plaintext(ip("10.0.0.1"), || true)
            .expect("a probe's place");
        // Each address has at most two of these, all together at most
        // sixteen: a flood of probes takes little from the peers' quarter.
        let _second = u.plaintext(node, || true).unwrap();
        assert_eq!(
            u.plaintext(node, || true).unwrap_err(),
            Refused::Unauthenticated
        );
        let others: Vec<_> = (0..32)
            .map_while(|i| u.plaintext(ip(&format!("10.0.1.{i}")), || true).ok())
            .collect();
        assert_eq!(others.len(), PROBE_PLACES - 3);
        drop((probe, at_share, held, others));
        let _ = u.plaintext(ip("10.0.1.100"), || true).unwrap();
    }

    #[test]
    fn without_mtls_only_the_share_counts_and_it_is_never_zero() {
        let u = Unproven::new(8, None, false);
        let held: Vec<_> = (0..2)
            .map(|_| u.plaintext(ip("10.0.0.1"), || false).unwrap())
            .collect();
        assert_eq!(
            u.plaintext(ip("10.0.0.1"), || false).unwrap_err(),
            Refused::Source
        );
        let more: Vec<_> = (0..6)
            .map(|i| u.plaintext(ip(&format!("10.0.1.{i}")), || false).unwrap())
            .collect();
        assert_eq!(held.len() + more.len(), 8);
        let tiny = Unproven::new(1, None, true);
        let _one = tiny.plaintext(ip("10.0.0.1"), || false).unwrap();
    }
}
