//! Names that discovery does not answer for (a `Host` outside the mesh, a fixed
//! destination on a proxy without a control plane) go to the system resolver.
//! `getaddrinfo` blocks, so every lookup is a hop to Tokio's blocking pool and
//! often a query to the cluster's DNS server: done per request, it cost more
//! than the rest of the request. An answer is kept for `TTL`, and the requests
//! and streams to that name meanwhile take its addresses in turn; a failure is
//! not kept, so a name that starts to resolve is reachable at once. At most
//! `MAX_LOOKUPS` calls run at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::addr::{DestAddr, NameAddr};
use crate::http::error::ProxyError;

/// How long an answer is used. `getaddrinfo` does not say how long a record
/// may be kept; five seconds is Envoy's default refresh for DNS clusters: a
/// moved name is followed within that (on top of the record's own TTL in the
/// resolver's caches), and a busy one is looked up once per interval rather
/// than per request.
pub const TTL: Duration = Duration::from_secs(5);

/// Names kept at most: they come from apps' `Host` headers, so the cache must
/// not grow with whatever an app sends. Past it, new answers are used unkept
/// until expired ones make room.
pub const MAX_NAMES: usize = 1024;

/// Addresses kept per name at most; a name with more is spread over these.
pub const MAX_ADDRS: usize = 16;

/// `getaddrinfo` calls under way at most. Each holds a thread of Tokio's
/// blocking pool until it returns, however long after its request gave up: a
/// resolver that hangs would otherwise take a thread for every request to a
/// new name (and then queue them without bound). Past these, a lookup waits
/// for one to finish, within its own timeout.
pub const MAX_LOOKUPS: usize = 16;

static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS);

/// The answers in use, shared by a proxy's stacks.
#[derive(Clone, Debug, Default)]
pub struct Names {
    kept: Arc<Mutex<HashMap<NameAddr, Answer>>>,
}

#[derive(Clone, Debug)]
struct Answer {
    /// Never empty.
    addrs: Vec<SocketAddr>,
    /// Which address the next connection takes: a name with several addresses
    /// has its connections spread over them, in turn, as a resolver that
    /// shuffles its answers would spread them, and one of them that refuses
    /// connections holds up only every n-th.
    next: usize,
    until: Instant,
}

impl Names {
    /// The address to connect to: as given, or one of the addresses the name
    /// resolves to, each in turn.
    pub async fn resolve(
        &self,
        dst: &DestAddr,
        timeout: Duration,
    ) -> Result<SocketAddr, ProxyError> {
        match dst {
            DestAddr::Socket(a) => Ok(*a),
            DestAddr::Name(n) => {
                if let Some(a) = self.next(n, Instant::now()) {
                    return Ok(a);
                }
                let deadline = Instant::now() + timeout;
                let waited = tokio::time::timeout_at(deadline, LOOKUPS.acquire()).await;
                let Ok(Ok(permit)) = waited else {
                    return Err(ProxyError::Resolve {
                        name: dst.clone(),
                        reason: format!("timed out after {timeout:?} (resolver busy)"),
                    });
                };
                // Another request may have looked it up while this one waited
                // its turn: at an answer's expiry, many do.
                if let Some(a) = self.next(n, Instant::now()) {
                    return Ok(a);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let addrs = lookup(dst, n, left, permit).await?;
                Ok(self.keep(n, addrs, Instant::now()))
            }
        }
    }

    fn next(&self, name: &NameAddr, now: Instant) -> Option<SocketAddr> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let answer = kept.get_mut(name).filter(|a| a.until > now)?;
        let addr = answer.addrs[answer.next % answer.addrs.len()];
        answer.next = answer.next.wrapping_add(1);
        Some(addr)
    }

    /// Keeps a fresh answer (not empty) and returns its first address.
    fn keep(&self, name: &NameAddr, addrs: Vec<SocketAddr>, now: Instant) -> SocketAddr {
        let first = addrs[0];
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= MAX_NAMES && !kept.contains_key(name) {
            kept.retain(|_, a| a.until > now);
            if kept.len() >= MAX_NAMES {
                return first;
            }
        }
        kept.insert(
            name.clone(),
            Answer {
                addrs,
                next: 1,
                until: now + TTL,
            },
        );
        first
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.lock().map(|k| k.len()).unwrap_or_default()
    }
}

/// The name's addresses of the family the resolver puts first (a dual-stack
/// name's server may listen on one only, and the resolver's order is the
/// system's preference), in its order, without repeats, at most `MAX_ADDRS`;
/// never empty.
async fn lookup(
    dst: &DestAddr,
    n: &NameAddr,
    timeout: Duration,
    permit: tokio::sync::SemaphorePermit<'static>,
) -> Result<Vec<SocketAddr>, ProxyError> {
    let fail = |reason: String| ProxyError::Resolve {
        name: dst.clone(),
        reason,
    };
    let (host, port) = (n.host().to_string(), n.port());
    // The permit goes with the call: freed when getaddrinfo returns, however
    // long after this request gave up on it.
    let looked_up = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .map(|found| found.collect::<Vec<_>>())
    });
    let found = tokio::time::timeout(timeout, looked_up)
        .await
        .map_err(|_| fail(format!("timed out after {timeout:?}")))?
        .map_err(|e| fail(format!("lookup failed: {e}")))?
        // getaddrinfo's own text varies by libc; say what it means.
        .map_err(|e| {
            fail(match e.kind() {
                std::io::ErrorKind::TimedOut => "lookup timed out".to_string(),
                _ => "no such name, or no address for it".to_string(),
            })
        })?;
    let addrs = usable(found);
    if addrs.is_empty() {
        return Err(fail("no addresses".into()));
    }
    Ok(addrs)
}

/// What `lookup` keeps of a resolver's answer.
fn usable(found: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for a in found {
        if addrs.len() == MAX_ADDRS {
            break;
        }
        let family = addrs
            .first()
            .is_none_or(|f: &SocketAddr| f.is_ipv4() == a.is_ipv4());
        if family && !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> NameAddr {
        match s.parse::<DestAddr>().expect("name") {
            DestAddr::Name(n) => n,
            DestAddr::Socket(_) => panic!("{s} is an address"),
        }
    }

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    /// With every lookup slot taken (a resolver that hangs), a new lookup
    /// waits within its timeout and fails, rather than take another thread.
    #[tokio::test]
    async fn lookups_under_way_are_bounded() {
        let dst: DestAddr = "localhost:80".parse().unwrap();
        let names = Names::default();
        let ok = names.resolve(&dst, Duration::from_secs(5)).await;
        assert!(ok.is_ok(), "{ok:?}");
        let held = LOOKUPS.acquire_many(MAX_LOOKUPS as u32).await.unwrap();
        let other: DestAddr = "localhost:81".parse().unwrap();
        let e = names
            .resolve(&other, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        drop(held);
        assert!(names.resolve(&other, Duration::from_secs(5)).await.is_ok());
    }

    #[test]
    fn an_answer_is_used_until_it_expires() {
        let names = Names::default();
        let web = name("web.example:80");
        let t0 = Instant::now();
        assert_eq!(names.next(&web, t0), None);
        assert_eq!(names.keep(&web, vec![at(80)], t0), at(80));
        assert_eq!(names.next(&web, t0 + TTL / 2), Some(at(80)));
        assert_eq!(names.next(&web, t0 + TTL), None, "expired: looked up again");
        assert_eq!(names.next(&name("web.example:81"), t0), None, "ports apart");
        names.keep(&web, vec![at(8080)], t0 + TTL);
        assert_eq!(names.next(&web, t0 + TTL), Some(at(8080)), "the new answer");
    }

    #[test]
    fn connections_take_a_names_addresses_in_turn() {
        let names = Names::default();
        let web = name("web.example:80");
        let t0 = Instant::now();
        let taken: Vec<_> = std::iter::once(names.keep(&web, vec![at(1), at(2), at(3)], t0))
            .chain((0..5).map(|_| names.next(&web, t0).expect("kept")))
            .collect();
        assert_eq!(taken, [1, 2, 3, 1, 2, 3].map(at));
    }

    #[test]
    fn an_answer_keeps_the_first_family_once_each_and_at_most_max_addrs() {
        let v6 = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 80));
        assert_eq!(usable([at(1), v6, at(2), at(1)]), [at(1), at(2)]);
        assert_eq!(usable([v6, at(1)]), [v6]);
        assert_eq!(usable((0..100).map(at)).len(), MAX_ADDRS);
        assert!(usable([]).is_empty());
    }

    #[test]
    fn the_cache_is_bounded_and_expired_answers_make_room() {
        let names = Names::default();
        let t0 = Instant::now();
        for i in 0..MAX_NAMES {
            names.keep(&name(&format!("n{i}.example:80")), vec![at(80)], t0);
        }
        let late = name("late.example:80");
        assert_eq!(names.keep(&late, vec![at(81)], t0), at(81), "used");
        assert_eq!(names.len(), MAX_NAMES);
        assert_eq!(names.next(&late, t0), None, "but not kept");
        assert_eq!(
            names.next(&name("n0.example:80"), t0),
            Some(at(80)),
            "a full cache keeps what it has"
        );
        names.keep(&late, vec![at(81)], t0 + TTL);
        assert_eq!(names.len(), 1, "the expired answers went");
        assert_eq!(names.next(&late, t0 + TTL), Some(at(81)));
    }

    #[tokio::test]
    async fn a_name_is_looked_up_once_and_a_failure_is_not_kept() {
        let names = Names::default();
        let local = "localhost:8080".parse::<DestAddr>().expect("name");
        let addr = names
            .resolve(&local, Duration::from_secs(10))
            .await
            .expect("localhost resolves");
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 8080);
        assert_eq!(names.len(), 1);
        let bad = "no-such-name.invalid:80".parse::<DestAddr>().expect("name");
        let err = names
            .resolve(&bad, Duration::from_secs(10))
            .await
            .expect_err("an .invalid name never resolves");
        assert_eq!(err.reason(), "resolve");
        assert_eq!(names.len(), 1, "the failure is not kept");
        let ip = "10.1.2.3:80".parse::<DestAddr>().expect("address");
        let same = names.resolve(&ip, Duration::from_secs(10)).await;
        assert_eq!(same.ok(), Some(SocketAddr::from(([10, 1, 2, 3], 80))));
        assert_eq!(names.len(), 1, "addresses are not kept");
    }
}
