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
//! With mTLS on, plaintext connections of all addresses together hold at
//! most three quarters of the listener, so that the quarter left is the
//! peers' whoever floods it.
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

/// Clones share their counts.
#[derive(Clone, Debug)]
pub(super) struct Unproven {
    by_source: PerSource,
    /// With mTLS: plaintext connections of every address together.
    plaintext: Option<Arc<Semaphore>>,
}

/// A plaintext connection's places, given back when it closes.
#[derive(Debug)]
pub(super) struct Plaintext {
    _share: Share,
    _permit: Option<OwnedSemaphorePermit>,
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

impl Unproven {
    /// `per_source`: the share of one address (by default a quarter of
    /// `max_connections`); `mtls`: whether peers can prove themselves, and so
    /// have part of the listener kept for them.
    pub fn new(max_connections: usize, per_source: Option<usize>, mtls: bool) -> Self {
        let per_source = per_source.unwrap_or((max_connections / 4).max(1));
        Unproven {
            by_source: PerSource::new(per_source),
            plaintext: mtls.then(|| {
                Arc::new(Semaphore::new(
                    (max_connections - max_connections / 4).max(1),
                ))
            }),
        }
    }

    /// A place for a connection that has yet to say whether it is a peer.
    pub fn opening(&self, source: IpAddr) -> Result<Share, Refused> {
        self.by_source
            .take_of(Some(source), OPENING)
            .ok_or(Refused::Source)
    }

    /// Places for a plaintext connection, for its life.
    pub fn plaintext(&self, source: IpAddr) -> Result<Plaintext, Refused> {
        let share = self
            .by_source
            .take_of(Some(source), PLAINTEXT)
            .ok_or(Refused::Source)?;
        let permit = match &self.plaintext {
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
            .map(|_| u.plaintext(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(u.plaintext(ip("10.0.0.1")).unwrap_err(), Refused::Source);
        // Opening connections are counted apart: a host at its plaintext
        // share may still be a peer.
        let opening = u.opening(ip("10.0.0.1")).unwrap();
        let _second = u.opening(ip("10.0.0.1")).unwrap();
        assert_eq!(u.opening(ip("10.0.0.1")).unwrap_err(), Refused::Source);
        drop(opening);
        let _again = u.opening(ip("10.0.0.1")).unwrap();
        let others: Vec<_> = ["10.0.0.2", "10.0.0.2", "10.0.0.3", "10.0.0.3"]
            .into_iter()
            .map(|s| u.plaintext(ip(s)).unwrap())
            .collect();
        // Six of eight: the rest is the peers'.
        assert_eq!(
            u.plaintext(ip("10.0.0.4")).unwrap_err(),
            Refused::Unauthenticated
        );
        drop(a);
        assert!(u.plaintext(ip("10.0.0.4")).is_ok(), "places given back");
        drop(others);
    }

    #[test]
    fn without_mtls_only_the_share_counts_and_it_is_never_zero() {
        let u = Unproven::new(8, None, false);
        let held: Vec<_> = (0..2)
            .map(|_| u.plaintext(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(u.plaintext(ip("10.0.0.1")).unwrap_err(), Refused::Source);
        let more: Vec<_> = (0..6)
            .map(|i| u.plaintext(ip(&format!("10.0.1.{i}"))).unwrap())
            .collect();
        assert_eq!(held.len() + more.len(), 8);
        let tiny = Unproven::new(1, None, true);
        let _one = tiny.plaintext(ip("10.0.0.1")).unwrap();
    }
}
