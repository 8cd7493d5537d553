//! Load balancing over a destination's endpoints: power of two choices over
//! peak-EWMA latency. Each request picks two endpoints at random and takes the one
//! with the lower cost, latency-weighted by requests in flight; a slow endpoint
//! quickly costs more and gets less traffic, without starving it of the requests
//! that show it has recovered.

mod ewma;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rand::Rng;
use tokio::time::Instant;

pub use ewma::PeakEwma;

use crate::control::view::Endpoint;
use crate::defaults;

#[derive(Debug, Default)]
pub struct Balancer {
    /// Load per endpoint, kept across discovery updates.
    stats: Mutex<HashMap<SocketAddr, Arc<EndpointLoad>>>,
}

#[derive(Debug)]
pub struct EndpointLoad {
    ewma: Mutex<PeakEwma>,
    pending: std::sync::atomic::AtomicU32,
}

impl EndpointLoad {
    fn new() -> Self {
        EndpointLoad {
            ewma: Mutex::new(PeakEwma::new(Instant::now())),
            pending: Default::default(),
        }
    }

    fn cost(&self, now: Instant) -> f64 {
        let pending = self.pending.load(std::sync::atomic::Ordering::Relaxed);
        let ewma = self.ewma.lock().map(|e| e.cost(now)).unwrap_or(f64::MAX);
        ewma * f64::from(pending + 1)
    }
}

/// A request in flight to an endpoint: counted until dropped, and its latency is
/// recorded with `observe`.
#[derive(Debug)]
pub struct InFlight {
    load: Arc<EndpointLoad>,
    start: Instant,
}

impl InFlight {
    pub fn observe(&self) {
        self.record(std::time::Duration::ZERO);
    }

    /// The endpoint failed (refused the connection, or its proxy could not reach
    /// its app). Such failures are fast; recorded as their latency they would make a
    /// dead endpoint the most attractive one. Recorded as a penalty instead.
    pub fn fail(&self) {
        self.record(defaults::BALANCER_FAILURE_PENALTY);
    }

    /// Records the time since the request started, or `at_least`.
    fn record(&self, at_least: std::time::Duration) {
        let now = Instant::now();
        let took = now.saturating_duration_since(self.start).max(at_least);
        if let Ok(mut e) = self.load.ewma.lock() {
            e.observe(took, now);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Balancer {
    /// Picks an endpoint; `None` when there are none.
    pub fn pick<'a>(&self, endpoints: &'a [Endpoint]) -> Option<(&'a Endpoint, InFlight)> {
        let n = endpoints.len();
        let chosen = match n {
            0 => return None,
            1 => 0,
            _ => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                let now = Instant::now();
                let (la, lb) = (self.load(&endpoints[a]), self.load(&endpoints[b]));
                if la.cost(now) <= lb.cost(now) { a } else { b }
            }
        };
        let ep = &endpoints[chosen];
        let load = self.load(ep);
        load.pending
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.forget_removed(endpoints);
        Some((
            ep,
            InFlight {
                load,
                start: Instant::now(),
            },
        ))
    }

    fn load(&self, ep: &Endpoint) -> Arc<EndpointLoad> {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats
            .entry(ep.addr)
            .or_insert_with(|| Arc::new(EndpointLoad::new()))
            .clone()
    }

    /// Bounded memory: forget endpoints discovery no longer lists, once the map is
    /// clearly larger than the current set.
    fn forget_removed(&self, endpoints: &[Endpoint]) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if stats.len() > 2 * endpoints.len() + 8 {
            stats.retain(|addr, _| endpoints.iter().any(|e| e.addr == *addr));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn eps(n: u16) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], 8000 + i)),
                proxy: None,
                zone: String::new(),
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_endpoint_gets_far_less_than_its_share() {
        let b = Balancer::default();
        let eps = eps(3);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let (ep, inflight) = b.pick(&eps).unwrap();
            let i = (ep.addr.port() - 8000) as usize;
            counts[i] += 1;
            // Endpoint 0 is ten times slower.
            let rtt = if i == 0 {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(5)
            };
            tokio::time::advance(rtt).await;
            inflight.observe();
        }
        assert!(counts[0] < 3000 / 10, "slow endpoint got {counts:?}");
        assert!(counts[1] > 1000 && counts[2] > 1000, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_is_avoided_though_it_fails_fast() {
        let b = Balancer::default();
        let eps = eps(3);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let (ep, inflight) = b.pick(&eps).unwrap();
            let i = (ep.addr.port() - 8000) as usize;
            counts[i] += 1;
            if i == 0 {
                // Connection refused: answered at once.
                tokio::time::advance(Duration::from_micros(100)).await;
                inflight.fail();
            } else {
                tokio::time::advance(Duration::from_millis(5)).await;
                inflight.observe();
            }
        }
        assert!(counts[0] < 30, "failing endpoint got {counts:?}");
    }

    #[test]
    fn no_endpoints_no_pick_and_one_endpoint_always() {
        let b = Balancer::default();
        assert!(b.pick(&[]).is_none());
        let one = eps(1);
        for _ in 0..10 {
            assert_eq!(b.pick(&one).unwrap().0.addr, one[0].addr);
        }
    }
}
