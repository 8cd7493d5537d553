//! Who a token proves: the one question `Certify` and the API's callers ask of
//! a service-account token. In local mode the manifests list the tokens (as
//! digests); in a cluster the API server answers, through a TokenReview.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::index::{ObjKey, Snapshot, TokenDigest};
use crate::kubernetes::tokens::TokenReviewer;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token proves no service account")]
    Unknown,
    #[error("the token could not be checked: {0}")]
    Unavailable(String),
}

/// Refused reviews one address may cause per `REFUSALS_WINDOW`. A pod's own
/// token is refused only while the API server does not know it yet; made-up
/// tokens, each differing so that no cached refusal serves, would otherwise
/// cost the API server a review each, as fast as the address can ask. Past
/// this, the address's uncached tokens wait for the window's end unreviewed.
pub(crate) const REFUSALS_PER_SOURCE: u32 = 8;
pub(crate) const REFUSALS_WINDOW: Duration = Duration::from_secs(10);
/// Addresses whose refusals are counted, at most (ended windows go first).
const REFUSING_SOURCES_MAX: usize = 4096;

/// Refused reviews per address, in its current window.
#[derive(Debug, Default)]
pub struct Refusing(Mutex<Refusals>);

#[derive(Debug, Default)]
struct Refusals {
    by_source: HashMap<IpAddr, (Instant, u32)>,
    /// The windows of addresses the map has no place for, one per network
    /// (IPv4 /24, IPv6 /64): a host with thousands of addresses (an IPv6 /64
    /// holds more than enough) would otherwise guess uncounted from the next
    /// one. Its addresses count together, and new addresses of other
    /// networks are not held up by it.
    overflow: HashMap<IpAddr, (Instant, u32)>,
    /// Past as many networks, one window for all the rest: a host with
    /// thousands of networks guesses no faster than one of them.
    rest: Option<(Instant, u32)>,
}

/// The network an address past those counted on their own counts in.
fn network(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) & 0xffff_ff00).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) & !u128::from(u64::MAX)).into()),
    }
}

impl Refusals {
    /// The window `source` counts in, if any.
    fn window(&self, source: IpAddr) -> Option<&(Instant, u32)> {
        match self.by_source.get(&source) {
            Some(w) => Some(w),
            None if self.by_source.len() >= REFUSING_SOURCES_MAX => {
                match self.overflow.get(&network(source)) {
                    Some(w) => Some(w),
                    None if self.overflow.len() >= REFUSING_SOURCES_MAX => self.rest.as_ref(),
                    None => None,
                }
            }
            None => None,
        }
    }
}

impl Refusing {
    /// Whether `source` has caused its share of refusals in this window.
    pub fn exhausted(&self, source: IpAddr, now: Instant) -> bool {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.window(source)
            .is_some_and(|(since, n)| now < *since + REFUSALS_WINDOW && *n >= REFUSALS_PER_SOURCE)
    }

    pub fn refused(&self, source: IpAddr, now: Instant) {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let held = &mut *held;
        let (since, n) = match place(&mut held.by_source, source, now) {
            Some(w) => w,
            None => match place(&mut held.overflow, network(source), now) {
                Some(w) => w,
                None => held.rest.get_or_insert((now, 0)),
            },
        };
        if now >= *since + REFUSALS_WINDOW {
            (*since, *n) = (now, 0);
        }
        *n += 1;
    }
}

/// `key`'s window in `map`, made if there is room (ended windows go first
/// when it is full); `None` when there is none.
fn place(
    map: &mut HashMap<IpAddr, (Instant, u32)>,
    key: IpAddr,
    now: Instant,
) -> Option<&mut (Instant, u32)> {
    if map.len() >= REFUSING_SOURCES_MAX && !map.contains_key(&key) {
        map.retain(|_, (since, _)| now < *since + REFUSALS_WINDOW);
        if map.len() >= REFUSING_SOURCES_MAX {
            return None;
        }
    }
    Some(map.entry(key).or_insert((now, 0)))
}

/// Where tokens are checked.
#[derive(Clone, Debug)]
pub enum Verifier {
    /// The service-account token Secrets of the manifests; guesses from an
    /// address past its refusals are not looked at until its window ends.
    Manifests(watch::Receiver<Arc<Snapshot>>, Arc<Refusing>),
    /// The API server's TokenReview.
    Kubernetes(Box<TokenReviewer>),
}

impl Verifier {
    /// Tokens of the manifests in `snap`.
    pub fn manifests(snap: watch::Receiver<Arc<Snapshot>>) -> Self {
        Verifier::Manifests(snap, Arc::default())
    }

    /// The service account (namespace and name) `token` proves; `source` is
    /// the address the caller connected from.
    pub async fn verify(
        &self,
        token: &[u8],
        source: Option<std::net::IpAddr>,
    ) -> Result<ObjKey, TokenError> {
        let token = token.trim_ascii();
        match self {
            Verifier::Manifests(snap, refusing) => {
                // A token a host guesses at costs it a place in its window,
                // as a TokenReview's would: its refusals are bounded in
                // rate, not only counted. Loopback is this machine's own.
                let now = Instant::now();
                let counted = source.filter(|s| !s.is_loopback());
                if let Some(s) = counted
                    && refusing.exhausted(s, now)
                {
                    return Err(TokenError::Unavailable(
                        "too many unknown tokens from this address lately; try again in a few seconds".into(),
                    ));
                }
                let known = snap.borrow().tokens.get(&TokenDigest::of(token)).cloned();
                if known.is_none()
                    && let Some(s) = counted
                {
                    refusing.refused(s, now);
                }
                known.ok_or(TokenError::Unknown)
            }
            Verifier::Kubernetes(r) => r.review(token, source).await,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Guessing tokens of the manifests from one address is bounded as
    /// TokenReviews are: a few refusals per window, then none looked at
    /// until it ends; other addresses, loopback and the real token of a
    /// fresh window are answered.
    #[tokio::test(start_paused = true)]
    async fn guessed_tokens_from_one_address_are_bounded() {
        let mut snap = Snapshot::empty("cluster.local");
        snap.add_token(
            TokenDigest::of(b"the-real-token"),
            ObjKey {
                namespace: "shop".into(),
                name: "web".into(),
            },
        );
        let (_tx, rx) = watch::channel(Arc::new(snap));
        let v = Verifier::manifests(rx);
        let pod: Option<IpAddr> = Some("10.0.0.7".parse().unwrap());
        for i in 0..REFUSALS_PER_SOURCE {
            let guess = format!("guess-{i}");
            assert_eq!(
                v.verify(guess.as_bytes(), pod).await,
                Err(TokenError::Unknown)
            );
        }
        assert!(matches!(
            v.verify(b"the-real-token", pod).await,
            Err(TokenError::Unavailable(_))
        ));
        let other: Option<IpAddr> = Some("10.0.0.8".parse().unwrap());
        assert!(v.verify(b"the-real-token", other).await.is_ok());
        let local: Option<IpAddr> = Some("127.0.0.1".parse().unwrap());
        for _ in 0..=REFUSALS_PER_SOURCE {
            assert_eq!(v.verify(b"nope", local).await, Err(TokenError::Unknown));
        }
        tokio::time::advance(REFUSALS_WINDOW).await;
        assert!(v.verify(b"the-real-token", pod).await.is_ok());
    }
}
