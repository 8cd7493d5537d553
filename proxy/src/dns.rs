//! Names that discovery does not answer for (a `Host` outside the mesh, a fixed
//! destination on a proxy without a control plane) go to the system resolver.
//! `getaddrinfo` blocks, so every lookup is a hop to Tokio's blocking pool and
//! often a query to the cluster's DNS server: done per request, it cost more
//! than the rest of the request. An answer is kept for `TTL` and used by every
//! request and stream to that name meanwhile; a failure is not kept, so a name
//! that starts to resolve is reachable at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::addr::{DestAddr, NameAddr};
use crate::http::error::ProxyError;

/// How long an answer is used. `getaddrinfo` does not say how long a record
/// may be kept; five seconds is Envoy's default refresh for DNS clusters: a
/// moved name is followed within that, and a busy one is looked up once per
/// interval rather than per request.
pub const TTL: Duration = Duration::from_secs(5);

/// Names kept at most: they come from apps' `Host` headers, so the cache must
/// not grow with whatever an app sends. Past it, new answers are used unkept
/// until expired ones make room.
pub const MAX_NAMES: usize = 1024;

/// The answers in use, shared by a proxy's stacks.
#[derive(Clone, Debug, Default)]
pub struct Names {
    kept: Arc<Mutex<HashMap<NameAddr, Answer>>>,
}

#[derive(Clone, Copy, Debug)]
struct Answer {
    addr: SocketAddr,
    until: Instant,
}

impl Names {
    /// The address to connect to: as given, or the first address the name
    /// resolves to.
    pub async fn resolve(
        &self,
        dst: &DestAddr,
        timeout: Duration,
    ) -> Result<SocketAddr, ProxyError> {
        match dst {
            DestAddr::Socket(a) => Ok(*a),
            DestAddr::Name(n) => {
                if let Some(a) = self.kept(n, Instant::now()) {
                    return Ok(a);
                }
                let addr = lookup(dst, n, timeout).await?;
                self.keep(n, addr, Instant::now());
                Ok(addr)
            }
        }
    }

    fn kept(&self, name: &NameAddr, now: Instant) -> Option<SocketAddr> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.get(name).filter(|a| a.until > now).map(|a| a.addr)
    }

    fn keep(&self, name: &NameAddr, addr: SocketAddr, now: Instant) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= MAX_NAMES && !kept.contains_key(name) {
            kept.retain(|_, a| a.until > now);
            if kept.len() >= MAX_NAMES {
                return;
            }
        }
        kept.insert(
            name.clone(),
            Answer {
                addr,
                until: now + TTL,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.lock().map(|k| k.len()).unwrap_or_default()
    }
}

async fn lookup(dst: &DestAddr, n: &NameAddr, timeout: Duration) -> Result<SocketAddr, ProxyError> {
    let fail = |reason: String| ProxyError::Resolve {
        name: dst.clone(),
        reason,
    };
    let mut addrs = tokio::time::timeout(timeout, tokio::net::lookup_host((n.host(), n.port())))
        .await
        .map_err(|_| fail(format!("timed out after {timeout:?}")))?
        // getaddrinfo's own text varies by libc; say what it means.
        .map_err(|e| {
            fail(match e.kind() {
                std::io::ErrorKind::TimedOut => "lookup timed out".to_string(),
                _ => "no such name, or no address for it".to_string(),
            })
        })?;
    addrs.next().ok_or_else(|| fail("no addresses".into()))
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

    #[test]
    fn an_answer_is_used_until_it_expires() {
        let names = Names::default();
        let web = name("web.example:80");
        let t0 = Instant::now();
        assert_eq!(names.kept(&web, t0), None);
        names.keep(&web, at(80), t0);
        assert_eq!(names.kept(&web, t0 + TTL / 2), Some(at(80)));
        assert_eq!(names.kept(&web, t0 + TTL), None, "expired: looked up again");
        assert_eq!(names.kept(&name("web.example:81"), t0), None, "ports apart");
        names.keep(&web, at(8080), t0 + TTL);
        assert_eq!(names.kept(&web, t0 + TTL), Some(at(8080)), "the new answer");
    }

    #[test]
    fn the_cache_is_bounded_and_expired_answers_make_room() {
        let names = Names::default();
        let t0 = Instant::now();
        for i in 0..MAX_NAMES {
            names.keep(&name(&format!("n{i}.example:80")), at(80), t0);
        }
        let late = name("late.example:80");
        names.keep(&late, at(81), t0);
        assert_eq!(names.len(), MAX_NAMES);
        assert_eq!(names.kept(&late, t0), None, "used, not kept");
        assert_eq!(
            names.kept(&name("n0.example:80"), t0),
            Some(at(80)),
            "a full cache keeps what it has"
        );
        names.keep(&late, at(81), t0 + TTL);
        assert_eq!(names.len(), 1, "the expired answers went");
        assert_eq!(names.kept(&late, t0 + TTL), Some(at(81)));
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
