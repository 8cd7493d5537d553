//! Load balancing over one backend's endpoints. The default is power of two
//! choices over peak-EWMA latency: each request draws two endpoints and takes the
//! cheaper one, latency weighted by requests in flight, so a slow endpoint
//! quickly gets less traffic without being starved of the requests that show it
//! has recovered. Round robin and consistent hashing (on a header or cookie, for
//! stickiness) are there for those who ask. Every mode skips endpoints that the
//! breaker (`outlier`) has ejected.

mod ewma;
pub mod outlier;
pub mod service;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::telemetry::metrics::OnFirstUse;
use http::HeaderName;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rand::Rng;
use strait_api::v1 as api;
use tokio::time::Instant;

pub use ewma::PeakEwma;
pub use outlier::BreakerConfig;
use outlier::{Admit, Failed, Outlier};
pub use service::Balance;

use crate::control::view::Endpoint;
use crate::defaults;
use crate::http::ToPeer;

/// Set on a response a retry could follow (see `ServedBy::worth_noting`): the
/// endpoint (workload address) that answered it.
#[derive(Clone, Copy, Debug)]
pub struct ServedBy(pub SocketAddr);

impl ServedBy {
    /// Whether a response may be retried, so its endpoint is worth noting: an
    /// error status (retried statuses are 4xx and 5xx, and so are the proxy's
    /// own "not sent" answers) or a gRPC status in the headers. A success is
    /// never retried, and noting it would cost its response an extension map.
    pub fn worth_noting<B>(rsp: &http::Response<B>) -> bool {
        rsp.status().as_u16() >= 400 || rsp.headers().contains_key("grpc-status")
    }
}

/// On a request whose attempts may time out above the balancer: the endpoint
/// each attempt went to, shared by the attempts (their heads are copies of one
/// another's), so a retry after a timeout avoids it as after any failure.
#[derive(Clone, Debug, Default)]
pub struct Picked(Arc<std::sync::Mutex<Option<SocketAddr>>>);

impl Picked {
    pub fn set(&self, ep: SocketAddr) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(ep);
    }

    pub fn get(&self) -> Option<SocketAddr> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Set on a retried request: the endpoints that failed it so far, to be
/// avoided while there is another. All of them, not the last only: two
/// endpoints that fail fast (and so look cheap) would otherwise take every
/// attempt in turn from a healthy one. At most one per attempt.
#[derive(Clone, Debug, Default)]
pub struct Avoid(pub Vec<SocketAddr>);

impl Avoid {
    pub fn add(&mut self, ep: SocketAddr) {
        if !self.0.contains(&ep) {
            self.0.push(ep);
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum HashKey {
    Header(HeaderName),
    Cookie(String),
}

#[derive(Clone, Debug, PartialEq, Default)]
pub enum LbConfig {
    #[default]
    PeakEwma,
    RoundRobin,
    ConsistentHash(HashKey),
}

/// A backend's policy: how its endpoints are chosen and when they are ejected.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct BackendConfig {
    pub lb: LbConfig,
    pub breaker: BreakerConfig,
    pub connect_timeout: Option<Duration>,
}

impl BackendConfig {
    pub fn parse(p: Option<api::BackendPolicy>) -> Self {
        let Some(p) = p else {
            return Self::default();
        };
        let lb = match api::LoadBalancer::try_from(p.load_balancer) {
            Ok(api::LoadBalancer::RoundRobin) => LbConfig::RoundRobin,
            Ok(api::LoadBalancer::ConsistentHash) => {
                use api::consistent_hash::Key;
                match p.consistent_hash.and_then(|h| h.key) {
                    Some(Key::Header(h)) => match HeaderName::from_bytes(h.as_bytes()) {
                        Ok(n) => LbConfig::ConsistentHash(HashKey::Header(n)),
                        Err(_) => LbConfig::PeakEwma,
                    },
                    Some(Key::Cookie(c)) => LbConfig::ConsistentHash(HashKey::Cookie(c)),
                    None => LbConfig::PeakEwma,
                }
            }
            _ => LbConfig::PeakEwma,
        };
        BackendConfig {
            lb,
            breaker: BreakerConfig::parse(p.circuit_breaker),
            connect_timeout: p
                .connect_timeout
                .and_then(|d| Duration::try_from(d).ok())
                .filter(|d| !d.is_zero())
                .map(|d| d.min(defaults::MAX_DURATION_FLAG)),
        }
    }
}

/// Counters of one backend's breaker, made on its first pick (or ejection):
/// a caller's backends are built for every Service it resolves, most never
/// used, and a fleet exporting zeros for each would be most of its series.
/// Made before any ejection, so that an alert on their increase sees the first.
pub struct BackendMetrics(OnFirstUse<BreakerSeries>);

#[derive(Debug, Default)]
pub struct BreakerSeries {
    pub ejections: Counter,
    pub ejected: Gauge,
}

impl BackendMetrics {
    pub fn new(make: impl Fn() -> BreakerSeries + Send + Sync + 'static) -> Self {
        BackendMetrics(OnFirstUse::new(make))
    }

    pub fn get(&self) -> &BreakerSeries {
        self.0.get()
    }
}

impl Default for BackendMetrics {
    fn default() -> Self {
        BackendMetrics::new(BreakerSeries::default)
    }
}

impl std::fmt::Debug for BackendMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What an endpoint that has not answered yet is guessed to cost: the median
/// estimate of those of its backend that have answered, so that it draws
/// about its share until its own answers say more. Guessed fast (the 1 ms
/// default) it won every pick it was drawn for until it held dozens of
/// requests: a rollout's new pod, still cold (a JVM's first answers take
/// seconds), got twice its share from every caller. `None`: none has
/// answered, and the default stands.
fn typical_cost<'a>(states: impl Iterator<Item = &'a EndpointState>, now: Instant) -> Option<f64> {
    // Not those failing (their estimate a penalty): half a backend failing
    // in an incident would otherwise have the capacity added for it guessed
    // slow, and left idle until its first answer.
    let mut costs: Vec<f64> = states
        .filter(|s| {
            let o = s.outlier();
            !o.is_avoided(now) && !o.is_ejected()
        })
        .filter_map(|s| {
            let e = s.ewma.lock().ok()?;
            e.answered().then(|| e.cost(now))
        })
        .collect();
    if costs.is_empty() {
        return None;
    }
    costs.sort_unstable_by(f64::total_cmp);
    Some(costs[costs.len() / 2])
}

#[derive(Debug)]
pub struct EndpointState {
    ewma: Mutex<PeakEwma>,
    /// Requests and streams on the endpoint: its load.
    pending: AtomicU32,
    /// Of those, the ones not judged yet: waiting for an answer.
    awaiting: AtomicU32,
    outlier: Mutex<Outlier>,
}

impl EndpointState {
    /// `like`: what a new endpoint is guessed to cost (`typical_cost`).
    fn new(like: Option<f64>, now: Instant) -> Self {
        EndpointState {
            ewma: Mutex::new(PeakEwma::guessing(like, now)),
            pending: AtomicU32::new(0),
            awaiting: AtomicU32::new(0),
            outlier: Mutex::default(),
        }
    }

    fn cost(&self, now: Instant) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed);
        let awaiting = self.awaiting.load(Ordering::Relaxed) > 0;
        let ewma = self
            .ewma
            .lock()
            .map(|e| e.cost_awaiting(awaiting, now))
            .unwrap_or(f64::MAX);
        ewma * f64::from(pending + 1)
    }

    fn outlier(&self) -> std::sync::MutexGuard<'_, Outlier> {
        self.outlier.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug)]
struct Slot {
    endpoint: Endpoint,
    /// What the forwarder needs for a meshed endpoint, made with the list.
    to_peer: Option<ToPeer>,
    state: Arc<EndpointState>,
}

/// One backend's endpoints as discovery last listed them, each with the state
/// (latency, in flight, breaker) it had under the previous list.
#[derive(Debug)]
pub struct Endpoints {
    name: Arc<str>,
    slots: Box<[Slot]>,
    config: BackendConfig,
    next: AtomicUsize,
    /// Round robin's turns given over: a counter of their own, so they go
    /// round the usable endpoints whatever the pattern of those out of use.
    given_over: AtomicUsize,
    /// Shared by every list of this backend (its series stay while one lives).
    metrics: Arc<BackendMetrics>,
    /// Shared by every list of this backend built one from another: the
    /// newest. A request that outlives its list (a retry waiting out its
    /// backoff while the endpoints change) picks from that one.
    newest: Arc<Mutex<Weak<Endpoints>>>,
    /// A newer list exists: only then is `newest` read.
    replaced: AtomicBool,
    /// What this backend has added to the ejected gauge, shared by its lists
    /// as `newest` is. Counted as a share rather than set: one Service
    /// reached at two addresses has a backend (and breaker) at each, both on
    /// the same gauge, and one going must not zero the other's.
    reported: Arc<std::sync::atomic::AtomicI64>,
    /// Held from counting the ejected to ejecting one more, shared by the
    /// backend's lists: failures judged at once would each see room under
    /// the cap and together pass it. Failures only take it.
    ejecting: Arc<Mutex<()>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PickError {
    NoEndpoints,
}

/// A request in flight to an endpoint: counted until dropped; its outcome goes
/// to the latency estimate and the breaker.
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<Endpoints>,
    index: usize,
    start: Instant,
    /// This request probes an ejected endpoint (the probe's number).
    probe: Option<u64>,
    /// When the route's per-attempt timeout gives up on the endpoint: dropped
    /// unjudged by then, the request timed out, a failure of the endpoint's.
    deadline: Option<Instant>,
    /// When its body ended, for one that had a body to send.
    body_end: Option<crate::retry::BodyEnd>,
    /// An outcome was recorded.
    judged: std::sync::atomic::AtomicBool,
    /// A connection made ahead: its success (and its probe, given back at
    /// the connect) wait for the connection to be used (`used`).
    judged_when_used: AtomicBool,
}

impl Endpoints {
    /// The endpoints of `name`, keeping the state of those already in `prev`,
    /// which they replace.
    pub fn new(
        name: Arc<str>,
        endpoints: &[Endpoint],
        config: BackendConfig,
        prev: Option<&Endpoints>,
        metrics: Arc<BackendMetrics>,
    ) -> Arc<Self> {
        // By address and identity: a pod IP reused by a pod of another
        // account is another endpoint, not the heir of the old one's
        // ejection and latency.
        let key = |e: &Endpoint| (e.addr, e.proxy.as_ref().map(|p| p.identity.clone()));
        let old: HashMap<_, &Arc<EndpointState>> = prev
            .map(|p| {
                p.slots
                    .iter()
                    .map(|s| (key(&s.endpoint), &s.state))
                    .collect()
            })
            .unwrap_or_default();
        let now = Instant::now();
        let like = typical_cost(old.values().map(|s| &***s), now);
        let slots: Box<[Slot]> = endpoints
            .iter()
            .map(|e| Slot {
                endpoint: e.clone(),
                to_peer: e
                    .proxy
                    .as_ref()
                    .map(|p| ToPeer::new(e.addr.port(), p.identity.clone())),
                state: old
                    .get(&key(e))
                    .map(|s| Arc::clone(s))
                    .unwrap_or_else(|| Arc::new(EndpointState::new(like, now))),
            })
            .collect();
        // The breaker switched off: those it had ejected are in again, judged
        // afresh (their failures' penalty would keep them idle long after).
        if config.breaker.consecutive_failures == 0 {
            for s in &slots {
                let was_out = s.state.outlier().readmit();
                if was_out && let Ok(mut e) = s.state.ewma.lock() {
                    *e = PeakEwma::guessing(like, now);
                }
            }
        }
        let e = Endpoints {
            name,
            slots,
            config,
            // A fresh list starts at a random turn: every proxy sees the
            // endpoints in one order (by address), and callers that each
            // send a request now and then (a watch idle for a minute is
            // dropped, its list with it) would all start at the first pod.
            next: AtomicUsize::new(prev.map_or_else(
                || rand::rng().random::<u32>() as usize,
                |p| p.next.load(Ordering::Relaxed),
            )),
            given_over: AtomicUsize::new(0),
            metrics,
            newest: prev.map(|p| p.newest.clone()).unwrap_or_default(),
            replaced: AtomicBool::new(false),
            reported: prev.map(|p| p.reported.clone()).unwrap_or_default(),
            ejecting: prev.map(|p| p.ejecting.clone()).unwrap_or_default(),
        };
        let e = Arc::new(e);
        *e.newest.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(&e);
        if let Some(p) = prev {
            p.replaced.store(true, Ordering::Release);
        }
        e.report();
        e
    }

    /// The newest list of this backend, when a newer one replaced this one:
    /// for a request that outlived its list. `None` while this is the newest,
    /// and once the backend is gone from discovery (its newest list dropped:
    /// held weakly, or each list would keep its successors alive): a request
    /// still under way then keeps the list it began with.
    pub fn replacement(&self) -> Option<Arc<Self>> {
        if !self.replaced.load(Ordering::Acquire) {
            return None;
        }
        let newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        newest.upgrade()
    }

    /// The list a request on this one is judged by: this one while it is
    /// the newest, else its replacement; none once the backend has left
    /// discovery (its newest list dropped).
    fn in_force(self: &Arc<Self>) -> Option<Arc<Self>> {
        if !self.replaced.load(Ordering::Acquire) {
            return Some(self.clone());
        }
        self.replacement()
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn config(&self) -> &BackendConfig {
        &self.config
    }

    /// Brings this list's share of the ejected gauge to its count now. Counted
    /// and published under the ejecting lock: on several threads, a count
    /// taken before another's readmission and published after it would leave
    /// the gauge wrong until the next change.
    fn report(&self) {
        let _one_at_a_time = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.ejected() as i64;
        let before = self.reported.swap(n, Ordering::Relaxed);
        if n != before {
            self.metrics.get().ejected.inc_by(n - before);
        }
    }

    fn ejected(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state.outlier().is_ejected())
            .count()
    }

    /// Picks an endpoint for a request with these headers, avoiding `avoid`
    /// when another will do.
    pub fn pick(
        self: &Arc<Self>,
        headers: &http::HeaderMap,
        avoid: &[SocketAddr],
    ) -> Result<InFlight, PickError> {
        let n = self.slots.len();
        if n == 0 {
            return Err(PickError::NoEndpoints);
        }
        // The backend is in use: its breaker's series are exported from now.
        self.metrics.get();
        let now = Instant::now();
        // What the breaker says of an endpoint, read once per draw: `None`
        // when it may not take this request.
        let usable = |i: usize, strict: bool| {
            if strict && avoid.contains(&self.slots[i].endpoint.addr) {
                return None;
            }
            Some(self.slots[i].state.outlier().admit(now)).filter(|a| *a != Admit::No)
        };
        // With every endpoint ejected (a discovery update can leave more than the
        // cap out), fail open: any endpoint beats a certain 503.
        let draw = || {
            self.choose(headers, now, |i| usable(i, true))
                .or_else(|| self.choose(headers, now, |i| usable(i, false)))
                .or_else(|| self.choose(headers, now, |_| Some(Admit::Yes)))
                .ok_or(PickError::NoEndpoints)
        };
        let mut redraws = 0;
        let (chosen, probe) = loop {
            let (chosen, admit) = draw()?;
            if admit != Admit::Probe {
                break (chosen, None);
            }
            // Read again under the lock that starts the probe: another thread
            // may have started it since the draw. The endpoint is then out
            // until that probe ends, and the request is drawn again (a few
            // times at most: a draw that keeps losing goes where it drew).
            let mut o = self.slots[chosen].state.outlier();
            if o.admit(now) == Admit::Probe {
                break (chosen, Some(o.start_probe()));
            }
            if redraws == 2 {
                break (chosen, None);
            }
            redraws += 1;
        };
        let state = &self.slots[chosen].state;
        state.pending.fetch_add(1, Ordering::Relaxed);
        if state.awaiting.fetch_add(1, Ordering::Relaxed) == 0
            && let Ok(mut e) = state.ewma.lock()
        {
            e.busy_from(now);
        }
        Ok(InFlight {
            backend: self.clone(),
            index: chosen,
            start: now,
            probe,
            deadline: None,
            body_end: None,
            judged: Default::default(),
            judged_when_used: Default::default(),
        })
    }

    fn choose(
        &self,
        headers: &http::HeaderMap,
        now: Instant,
        ok: impl Fn(usize) -> Option<Admit>,
    ) -> Option<(usize, Admit)> {
        let n = self.slots.len();
        if n == 1 {
            return ok(0).map(|a| (0, a));
        }
        match &self.config.lb {
            LbConfig::RoundRobin => {
                let turn = self.next.fetch_add(1, Ordering::Relaxed);
                match ok(turn % n) {
                    Some(a) if a != Admit::Failing => return Some((turn % n, a)),
                    _ => {}
                }
                // A turn of an endpoint out of use, or passed over for
                // failing fast or shedding load (as P2C passes it over), goes
                // to the usable ones in turn, those that work first: given to
                // the next in line, a run of ejected neighbours (one node's
                // pods, sorted by address) would all land on one.
                // Counted, then the k-th taken: no allocation per request
                // while an endpoint fails.
                let ok = &ok;
                let usable = |working: bool| {
                    (0..n).filter_map(move |i| {
                        ok(i)
                            .filter(|a| !working || *a != Admit::Failing)
                            .map(|a| (i, a))
                    })
                };
                // Each pass reads the endpoints' state afresh, which other
                // requests may change meanwhile: one gone by the second
                // pass leaves this draw empty, and the fail-open draws go on.
                let working = usable(true).next().is_some();
                let count = usable(working).count();
                (count > 0).then_some(()).and_then(|()| {
                    let k = self.given_over.fetch_add(1, Ordering::Relaxed) % count;
                    usable(working).nth(k)
                })
            }
            LbConfig::ConsistentHash(key) => match hash_key(key, headers) {
                // Rendezvous hashing: the same key picks the same endpoint on
                // every proxy, and a change of endpoints moves only the keys of
                // the endpoints that changed.
                Some(k) => (0..n)
                    .filter_map(|i| ok(i).map(|a| (i, a)))
                    .max_by_key(|&(i, _)| rendezvous_score(k, self.slots[i].endpoint.addr)),
                None => self.p2c(now, &ok),
            },
            LbConfig::PeakEwma => self.p2c(now, &ok),
        }
    }

    fn p2c(&self, now: Instant, ok: &impl Fn(usize) -> Option<Admit>) -> Option<(usize, Admit)> {
        let n = self.slots.len();
        let mut rng = rand::rng();
        let mut draw = |not: Option<usize>| {
            let usable = |i: usize| (Some(i) != not).then(|| ok(i)).flatten().map(|a| (i, a));
            for _ in 0..4 {
                if let Some(d) = usable(rng.random_range(0..n)) {
                    return Some(d);
                }
            }
            // Drawn among the usable, not the next usable after a draw,
            // which would favour the endpoints after ejected ones.
            let all: Vec<(usize, Admit)> = (0..n).filter_map(usable).collect();
            (!all.is_empty()).then(|| all[rng.random_range(0..all.len())])
        };
        let a = draw(None)?;
        let Some(b) = draw(Some(a.0)) else {
            return Some(a);
        };
        // An endpoint whose ejection is over is probed when drawn, whatever
        // its estimate: the failures that ejected it (timeouts above all)
        // left it costly for a minute, and it would lose every comparison
        // for that long, still counted against `maxEjectionPercent`.
        if a.1 == Admit::Probe {
            return Some(a);
        }
        if b.1 == Admit::Probe {
            return Some(b);
        }
        // One that failed fast loses to one that works, whatever either
        // costs: its penalty is a latency, and an endpoint that works but
        // is slow, or busy, would cost more and lose to it.
        match (a.1 == Admit::Failing, b.1 == Admit::Failing) {
            (true, false) => return Some(b),
            (false, true) => return Some(a),
            _ => {}
        }
        let (ca, cb) = (
            self.slots[a.0].state.cost(now),
            self.slots[b.0].state.cost(now),
        );
        Some(if ca <= cb { a } else { b })
    }
}

/// The score of `addr` for `key` in rendezvous hashing. A fixed algorithm
/// over fixed bytes (FNV-1a, then MurmurHash3's 64-bit finalizer to spread
/// FNV's weak last bytes): proxies of different builds, or built by
/// different compilers, must send a key to the same endpoint, which std's
/// `DefaultHasher` (and `Hash` for addresses) do not promise.
fn rendezvous_score(key: &[u8], addr: SocketAddr) -> u64 {
    use std::hash::Hasher as _;
    let mut h = fnv::FnvHasher::default();
    h.write(key);
    match addr.ip() {
        std::net::IpAddr::V4(ip) => h.write(&ip.octets()),
        std::net::IpAddr::V6(ip) => h.write(&ip.octets()),
    }
    h.write(&addr.port().to_be_bytes());
    let mut x = h.finish();
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn hash_key<'a>(key: &HashKey, headers: &'a http::HeaderMap) -> Option<&'a [u8]> {
    match key {
        HashKey::Header(h) => headers.get(h).map(|v| v.as_bytes()),
        HashKey::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes()),
    }
}

impl InFlight {
    /// The request is given up on at `deadline` (the route's `backendRequest`
    /// timeout), and counts then as the endpoint's failure; for a request
    /// with a body, only if it ended (`body_end`) in the first half of the
    /// attempt, so the endpoint had the whole request at least as long.
    pub fn give_up_at(&mut self, deadline: Instant, body_end: Option<crate::retry::BodyEnd>) {
        self.deadline = Some(deadline);
        self.body_end = body_end;
    }

    /// The attempt timed out with the whole request long enough at the
    /// endpoint for the timeout to be its failure.
    fn timed_out(&self, now: Instant) -> bool {
        let Some(d) = self.deadline.filter(|d| now >= *d) else {
            return false;
        };
        match &self.body_end {
            None => true,
            Some(e) => {
                let half = d.saturating_duration_since(self.start) / 2;
                e.at().is_some_and(|at| at <= self.start + half)
            }
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.backend.slots[self.index].endpoint
    }

    /// Set when the endpoint is meshed.
    pub fn to_peer(&self) -> Option<&ToPeer> {
        self.backend.slots[self.index].to_peer.as_ref()
    }

    fn state(&self) -> &EndpointState {
        &self.backend.slots[self.index].state
    }

    /// The endpoint answered well (its latency is recorded).
    pub fn success(&self) {
        self.succeeded(None);
    }

    /// As `success`, judged later than the endpoint answered: `took` is how
    /// long it took (an opaque stream's connect). A pick is judged once: a
    /// later success is a no-op.
    pub fn success_took(&self, took: Duration) {
        self.succeeded(Some(took));
    }

    fn succeeded(&self, took: Option<Duration>) {
        // Once: a stream judged when it connected is not judged again when
        // its bytes start to flow.
        if !self.settle() {
            return;
        }
        if self.state().outlier().success(self.probe, self.start) {
            self.readmitted();
        }
        match took {
            Some(t) => self.observe(t),
            None => self.record(Duration::ZERO),
        }
    }

    /// Its failures are behind it: judged afresh, as a new endpoint is, or
    /// their penalty would keep it idle long after.
    fn readmitted(&self) {
        let now = Instant::now();
        let like = typical_cost(
            self.backend
                .slots
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != self.index)
                .map(|(_, s)| &*s.state),
            now,
        );
        if let Ok(mut e) = self.state().ewma.lock() {
            *e = PeakEwma::guessing(like, now);
        }
        tracing::info!(backend = %self.backend.name, endpoint = %self.endpoint().addr, "ejected endpoint re-admitted after a successful probe");
        if let Some(live) = self.backend.in_force() {
            live.report();
        }
    }

    /// As `success_took`, for a connection made ahead of a client that has
    /// not spoken: its latency counts now, but a connect alone is no success
    /// for the breaker (the client may speak HTTP and the connection go
    /// unused, or the app behind a peer's proxy answer only 503s). The probe
    /// is given back at once (so a request can make it while this connection
    /// idles); `used` makes it, and counts the success, once the stream works.
    pub fn connected_ahead(&self, took: Duration) {
        if !self.settle() {
            return;
        }
        self.observe(took);
        // Not a success yet either: its app may answer nothing but 503. It
        // ends a run of failures to connect only; `used` counts the rest.
        self.judged_when_used.store(true, Ordering::Relaxed);
        let mut o = self.state().outlier();
        o.reachable();
        if let Some(p) = self.probe {
            o.abandon_probe(p);
        }
    }

    /// The connection made ahead carries a stream that works after all (the
    /// server greeted, or the client's bytes are opaque and the connect is
    /// all an opaque stream is judged by): the probe of its endpoint, if
    /// that still waits for one. Not for a connection closed without a word.
    pub fn used(&self) {
        if !self.judged_when_used.swap(false, Ordering::Relaxed) {
            return;
        }
        let readmitted = {
            let mut o = self.state().outlier();
            if o.admit(Instant::now()) == Admit::Probe {
                let p = o.start_probe();
                o.success(Some(p), Instant::now())
            } else {
                // A success: the endpoint's run of failures is over (by a
                // connection made since it was last passed over).
                o.success(None, self.start)
            }
        };
        if readmitted {
            self.readmitted();
        }
    }

    /// The request says nothing about the endpoint (the client failed it): no
    /// latency sample, no breaker verdict; a probe is abandoned, not decided.
    pub fn no_verdict(&self) {
        self.settle();
    }

    /// No verdict, but the time it took counts towards the latency estimate.
    pub fn waited(&self) {
        if self.settle() {
            self.record(Duration::ZERO);
        }
    }

    /// Judged: no longer waiting for an answer (once, whatever judged it).
    /// True for the call that judged it.
    fn settle(&self) -> bool {
        let first = !self.judged.swap(true, Ordering::Relaxed);
        if first {
            self.state().awaiting.fetch_sub(1, Ordering::Relaxed);
        }
        first
    }

    /// The endpoint could not be reached (refused the connection, timed out,
    /// its proxy could not reach its app). Such failures are fast: recorded as
    /// their latency they would make a dead endpoint the most attractive one, so
    /// they are recorded as a penalty, and counted by the breaker.
    pub fn unreachable(&self) {
        self.penalize();
        self.breaker_failure(Failed::Unreachable);
    }

    /// An opaque stream the endpoint's proxy cut before anything came back:
    /// its app refused or dropped it. A penalty as a failed connect's, not
    /// the stream's life (which may be long), and a failure to the breaker.
    pub fn stream_cut(&self) {
        self.observe(defaults::BALANCER_FAILURE_PENALTY);
        self.avoid();
        self.breaker_failure(Failed::Answer);
    }

    /// The peer proxy in front of the endpoint answered that its app could
    /// not be reached: as fast as a failed connect, and as much a penalty,
    /// but a failed answer to the breaker (a connect to that peer proxy says
    /// nothing of its app).
    pub fn app_unreachable(&self) {
        self.penalize();
        self.breaker_failure(Failed::Answer);
    }

    /// The endpoint shed the request (429, or gRPC RESOURCE_EXHAUSTED): it
    /// is protecting itself, not broken, so the breaker counts nothing (nor
    /// does the answer decide a probe); but its fast answer is no measure of
    /// its cost, and as one it would draw more of the load it refuses. It
    /// is passed over while others work.
    pub fn shed(&self) {
        if self.settle() {
            self.avoid();
        }
    }

    /// The endpoint answered with a server error: the breaker counts the
    /// failure, and its latency is what it is. Unless the run of failures
    /// is one that ejects, and the breaker could not (its cap reached, or
    /// off): then it is recorded as an unreachable one is, since answering
    /// fast it would win every comparison and draw the traffic of the
    /// endpoints that work.
    pub fn failed(&self) {
        if self.breaker_failure(Failed::Answer) {
            self.penalize();
        } else {
            self.record(Duration::ZERO);
        }
    }

    /// Counts a failure; true when its run is one that ejects (the breaker's
    /// count, or the default one with the breaker off) yet the endpoint is
    /// still in.
    fn breaker_failure(&self, kind: Failed) -> bool {
        self.settle();
        let b = &self.backend;
        // Judged by the list in force: this request's may have been replaced
        // while it was under way (its endpoints' state carries over). An
        // endpoint no longer in it is gone, and gets no verdict; nor does any
        // once the backend has left discovery.
        let Some(live) = b.in_force() else {
            return false;
        };
        let state = &b.slots[self.index].state;
        if !live.slots.iter().any(|s| Arc::ptr_eq(&s.state, state)) {
            return false;
        }
        let (ejected, kept_in) = {
            let _one_at_a_time = live.ejecting.lock().unwrap_or_else(|p| p.into_inner());
            let cap = live.config.breaker.cap(live.slots.len());
            // The others out: a probe's endpoint is out already, and counts
            // against the cap only if it goes out again.
            let others = live
                .ejected()
                .saturating_sub(usize::from(state.outlier().is_ejected()));
            let may_eject = others < cap;
            let mut outlier = self.state().outlier();
            let ejected = outlier.failure_as(
                &live.config.breaker,
                Instant::now(),
                may_eject,
                self.probe,
                kind,
            );
            let run = match live.config.breaker.consecutive_failures {
                0 => defaults::BREAKER_CONSECUTIVE_FAILURES,
                n => n,
            };
            let kept_in = !outlier.is_ejected() && outlier.failures_in_a_row() >= run;
            (ejected, kept_in)
        };
        if ejected {
            b.metrics.get().ejections.inc();
            tracing::info!(backend = %b.name, endpoint = %self.endpoint().addr, "endpoint ejected after consecutive failures");
        }
        live.report();
        kept_in
    }

    /// A fast failure: recorded as the failure penalty, and passed over
    /// while other endpoints work.
    fn penalize(&self) {
        self.record(defaults::BALANCER_FAILURE_PENALTY);
        self.avoid();
    }

    fn avoid(&self) {
        self.state().outlier().avoid(Instant::now(), self.probe);
    }

    fn record(&self, at_least: Duration) {
        let took = Instant::now()
            .saturating_duration_since(self.start)
            .max(at_least);
        self.observe(took);
    }

    fn observe(&self, took: Duration) {
        if let Ok(mut e) = self.state().ewma.lock() {
            e.observe(took, Instant::now());
        }
    }
}

impl Drop for Endpoints {
    fn drop(&mut self) {
        // The newest list is gone: its backend left discovery, or its
        // destination was dropped. Nothing of it is ejected any more, and
        // no verdict will come to set the gauge again.
        if !*self.replaced.get_mut() {
            let share = self.reported.swap(0, Ordering::Relaxed);
            if share != 0 {
                self.metrics.get().ejected.dec_by(share);
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state().pending.fetch_sub(1, Ordering::Relaxed);
        if !self.judged.load(Ordering::Relaxed) {
            if self.timed_out(Instant::now()) {
                // The attempt timed out: an endpoint that accepts requests and
                // never answers must not keep its share of them.
                self.failed();
            } else {
                // Cancelled above us (the client went away, or the whole
                // request's timeout): no verdict, but it took at least this
                // long, which the latency estimate should know.
                self.record(Duration::ZERO);
                self.settle();
            }
        }
        if let Some(p) = self.probe {
            // A no-op once the probe's outcome was recorded.
            self.state().outlier().abandon_probe(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: u16) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], 8000 + i)),
                proxy: None,
                zone: String::new(),
            })
            .collect()
    }

    fn backend(n: u16, config: BackendConfig) -> Arc<Endpoints> {
        Endpoints::new("b".into(), &eps(n), config, None, Default::default())
    }

    fn index(f: &InFlight) -> usize {
        (f.endpoint().addr.port() - 8000) as usize
    }

    /// A backend resolved but never picked exports no breaker series (a
    /// caller's destinations each build every backend they have); its first
    /// pick makes them, at 0, before any ejection.
    #[test]
    fn a_backend_s_breaker_series_are_made_by_its_first_pick() {
        let m = crate::telemetry::metrics::Metrics::new();
        let b = Endpoints::new(
            "b".into(),
            &eps(2),
            BackendConfig::default(),
            None,
            m.backend("web:80", "b"),
        );
        assert!(!m.encode().contains("backend_eject"), "never picked");
        b.pick(&Default::default(), &[]).unwrap().success();
        let text = m.encode();
        assert!(
            text.contains(
                "strait_proxy_backend_ejections_total{service=\"web:80\",backend=\"b\"} 0"
            ),
            "{text}"
        );
    }

    /// Ejects endpoint 0 by its breaker's count of failures, without
    /// drawing it.
    fn eject_0(b: &Endpoints) {
        for _ in 0..b.config.breaker.consecutive_failures {
            b.slots[0]
                .state
                .outlier()
                .failure(&b.config.breaker, Instant::now(), true, None);
        }
    }

    /// How 3,000 requests in turn spread over three endpoints, each answered
    /// after the time `answer` gives for its endpoint, as it says.
    async fn shares(
        b: &Arc<Endpoints>,
        answer: impl Fn(usize) -> (Duration, fn(&InFlight)),
    ) -> [usize; 3] {
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            let i = index(&f);
            counts[i] += 1;
            let (took, verdict) = answer(i);
            tokio::time::advance(took).await;
            verdict(&f);
        }
        counts
    }

    /// Endpoints failing every request at once must not draw the traffic of
    /// the one that works where the breaker cannot take them out: two of
    /// three failing fast (the cap lets one out), or one of three with the
    /// breaker off.
    #[tokio::test(start_paused = true)]
    async fn endpoints_failing_fast_do_not_draw_the_traffic() {
        // However slow the one that works: answering in 1.5 s it cost more
        // than the failures' penalty, and the failing took nearly all.
        for works_in in [Duration::from_millis(20), Duration::from_millis(1500)] {
            for (failing, breaker_on) in [(2usize, true), (1, false)] {
                let mut config = BackendConfig::default();
                if !breaker_on {
                    config.breaker.consecutive_failures = 0;
                }
                let counts = shares(&backend(3, config), |i| {
                    if i < failing {
                        (Duration::from_millis(1), InFlight::failed)
                    } else {
                        (works_in, InFlight::success)
                    }
                })
                .await;
                let to_failing: usize = counts[..failing].iter().sum();
                assert!(
                    to_failing < 300,
                    "{failing} failing fast, breaker on: {breaker_on}, the other answering in {works_in:?}: {counts:?}"
                );
            }
        }
    }

    /// An endpoint failing fast loses to one that works however many
    /// requests that one holds: compared by cost, the failure's penalty (1 s)
    /// was less than ten requests held by an endpoint answering in 100 ms,
    /// and the failing one took every request past those.
    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_loses_to_a_busy_one_that_works() {
        let mut config = BackendConfig::default();
        config.breaker.consecutive_failures = 0;
        let b = backend(2, config);
        for _ in 0..10 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            if index(&f) == 0 {
                f.unreachable();
            } else {
                tokio::time::advance(Duration::from_millis(100)).await;
                f.success();
            }
        }
        let mut held = Vec::new();
        let mut to_failing = 0;
        for _ in 0..200 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            if index(&f) == 0 {
                to_failing += 1;
                f.unreachable();
            } else {
                held.push(f);
            }
        }
        assert!(
            to_failing < 10,
            "{to_failing} of 200 to the failing endpoint"
        );
    }

    /// An ejected endpoint whose probe is answered 429 stays out and is not
    /// probed again until it has been passed over a while: the probe
    /// decided nothing, and probing again at once sent it every request
    /// drawn. Avoidance survives an update of the endpoints with the
    /// breaker off, and a burst of failures in flight together doubles it
    /// once, not once each.
    #[tokio::test(start_paused = true)]
    async fn passing_over_holds_through_probes_updates_and_bursts() {
        use tower::Service as _;
        let b = backend(2, BackendConfig::default());
        eject_0(&b);
        tokio::time::advance(Duration::from_secs(6)).await;
        let (to_0, mut svc) = endpoint_0_answers(&b, || {
            let mut rsp = http::Response::new(crate::http::empty());
            *rsp.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
            rsp
        });
        for _ in 0..100 {
            let _ = svc.call(http::Request::new(Empty::new())).await;
        }
        assert_eq!(to_0.load(Ordering::SeqCst), 1, "one probe");
        assert!(b.slots[0].state.outlier().is_ejected());

        // Late answers of requests sent before an ejection neither delay
        // its probe nor clear what its probe's answer set.
        let b = two_in_turn();
        let late = pick_0(&b);
        for _ in 0..5 {
            pick_0(&b).failed();
        }
        assert_eq!(b.ejected(), 1);
        tokio::time::advance(Duration::from_millis(4900)).await;
        late.unreachable();
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(
            b.slots[0].state.outlier().admit(Instant::now()),
            Admit::Probe
        );

        let mut off = BackendConfig::default();
        off.breaker.consecutive_failures = 0;
        let b = backend(3, off.clone());
        pick_0(&b).unreachable();
        let next = Endpoints::new("b".into(), &eps(3), off, Some(&b), b.metrics.clone());
        assert!(next.slots[0].state.outlier().is_avoided(Instant::now()));

        let b = backend(1, BackendConfig::default());
        let burst: Vec<InFlight> = (0..6)
            .map(|_| b.pick(&Default::default(), &[]).unwrap())
            .collect();
        for f in burst {
            f.unreachable();
        }
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(
            !b.slots[0].state.outlier().is_avoided(Instant::now()),
            "passed over for 1 s, not 32"
        );
    }

    /// An endpoint that sheds load (429, or gRPC RESOURCE_EXHAUSTED) answers
    /// fast, and counted as a fast success it drew more of the load it was
    /// refusing. It is passed over while others take requests; the breaker
    /// does not count it (the endpoint is protecting itself, not broken).
    #[tokio::test(start_paused = true)]
    async fn an_endpoint_shedding_load_is_passed_over() {
        use tower::Service as _;
        for (what, status, grpc_status) in [
            ("429", http::StatusCode::TOO_MANY_REQUESTS, None),
            ("RESOURCE_EXHAUSTED", http::StatusCode::OK, Some("8")),
            // A stream refused unprocessed, here or at the peer's app.
            ("refused", http::StatusCode::SERVICE_UNAVAILABLE, None),
        ] {
            let b = backend(3, BackendConfig::default());
            let (to_0, mut svc) = endpoint_0_answers(&b, move || {
                if what == "refused" {
                    return crate::http::error::ProxyError::Refused {
                        addr: "10.0.0.1:8080".parse().unwrap(),
                        reason: "refused the stream (not processed)".into(),
                    }
                    .into_response();
                }
                let mut rsp = http::Response::new(crate::http::empty());
                *rsp.status_mut() = status;
                if let Some(code) = grpc_status {
                    rsp.headers_mut()
                        .insert("content-type", "application/grpc".parse().unwrap());
                    rsp.headers_mut()
                        .insert("grpc-status", code.parse().unwrap());
                }
                rsp
            });
            for _ in 0..300 {
                let _ = svc.call(http::Request::new(Empty::new())).await;
            }
            let to_0 = to_0.load(Ordering::SeqCst);
            // Its share would be 100.
            assert!(to_0 < 30, "{what}: {to_0} of 300 to the endpoint shedding");
            assert_eq!(b.ejected(), 0, "{what}");
        }
    }

    /// An endpoint shedding load answers some of the requests it held well:
    /// those, sent before it shed, do not end its passing over.
    #[tokio::test(start_paused = true)]
    async fn a_success_sent_before_a_shed_does_not_end_the_passing_over() {
        let b = two_in_turn();
        let earlier = pick_0(&b);
        pick_0(&b).shed();
        tokio::time::advance(Duration::from_millis(5)).await;
        earlier.success();
        assert!(
            b.slots[0].state.outlier().is_avoided(Instant::now()),
            "passed over for 1 s, not 5 ms"
        );
        // One sent since ends it.
        pick_0(&b).success();
        assert!(!b.slots[0].state.outlier().is_avoided(Instant::now()));
        // Nor does a connection made ahead before it, used since.
        let b = two_in_turn();
        let ahead = pick_0(&b);
        ahead.connected_ahead(Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(5)).await;
        pick_0(&b).shed();
        tokio::time::advance(Duration::from_millis(5)).await;
        ahead.used();
        assert!(b.slots[0].state.outlier().is_avoided(Instant::now()));
    }

    /// Round robin passes over an endpoint that sheds load (or fails fast
    /// past the breaker's cap) while others work, as P2C does.
    #[tokio::test(start_paused = true)]
    async fn round_robin_passes_over_an_endpoint_shedding_load() {
        let b = backend(
            3,
            BackendConfig {
                lb: LbConfig::RoundRobin,
                ..Default::default()
            },
        );
        let mut to_0 = 0;
        for _ in 0..300 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            if index(&f) == 0 {
                to_0 += 1;
                f.shed();
            } else {
                f.success();
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // Its share would be 100; tried again as each pass-over ends.
        assert!((1..30).contains(&to_0), "{to_0} of 300");
    }

    /// An endpoint's state may change between round robin's passes over
    /// the list (another request starts its probe, or ejects it): the draw
    /// comes back empty, for the fail-open draws to take over, and does not
    /// panic in the request path.
    #[test]
    fn round_robin_survives_endpoints_changing_during_its_draw() {
        let b = backend(
            3,
            BackendConfig {
                lb: LbConfig::RoundRobin,
                ..Default::default()
            },
        );
        b.next.store(0, Ordering::Relaxed);
        b.given_over.store(1, Ordering::Relaxed);
        let calls = std::cell::Cell::new(0);
        let ok = |i: usize| {
            calls.set(calls.get() + 1);
            match i {
                0 => None,
                2 if calls.get() > 6 => None,
                _ => Some(Admit::Yes),
            }
        };
        assert_eq!(b.choose(&Default::default(), Instant::now(), ok), None);
    }

    /// Lists made afresh (a caller's first request, or one after its watch
    /// went idle) do not all start their turns at the first endpoint, which
    /// every proxy has in the same order.
    #[test]
    fn round_robin_lists_do_not_all_start_at_the_first_endpoint() {
        let mut first = [0usize; 3];
        for _ in 0..300 {
            let b = backend(
                3,
                BackendConfig {
                    lb: LbConfig::RoundRobin,
                    ..Default::default()
                },
            );
            first[index(&b.pick(&Default::default(), &[]).unwrap())] += 1;
        }
        assert!(first.iter().all(|&c| c > 50), "{first:?}");
    }

    /// A pod added to a busy backend (a rollout's new replica) draws about
    /// its share while it has not answered, not every pick it is drawn for:
    /// guessed fast, it took requests until it held dozens, from every
    /// caller, while still cold. Its first answer then says what it costs.
    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_draws_its_share_until_it_answers() {
        let b = backend(10, BackendConfig::default());
        for _ in 0..500 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            tokio::time::advance(Duration::from_millis(50)).await;
            f.success();
        }
        let grown = Endpoints::new(
            "b".into(),
            &eps(11),
            BackendConfig::default(),
            Some(&b),
            Default::default(),
        );
        // Held, unanswered: the new pod is slow to start.
        let held: Vec<InFlight> = (0..1100)
            .map(|_| grown.pick(&Default::default(), &[]).unwrap())
            .collect();
        let to_new = held.iter().filter(|f| index(f) == 10).count();
        // Its share is 100; guessed at 1 ms it took about 200.
        assert!(to_new < 150, "{to_new} of 1100 to the new endpoint");
        // Answering fast, it is known to be fast at once.
        let fast = held.into_iter().find(|f| index(f) == 10).unwrap();
        tokio::time::advance(Duration::from_millis(5)).await;
        fast.success();
        let state = &grown.slots[10].state;
        let cost = state.ewma.lock().unwrap().cost(Instant::now());
        assert!(cost < 6e6, "{cost}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_endpoint_gets_far_less_than_its_share() {
        let b = backend(3, BackendConfig::default());
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            let i = index(&f);
            counts[i] += 1;
            // Endpoint 0 is ten times slower.
            let rtt = if i == 0 { 50 } else { 5 };
            tokio::time::advance(Duration::from_millis(rtt)).await;
            f.success();
        }
        assert!(counts[0] < 3000 / 10, "slow endpoint got {counts:?}");
        assert!(counts[1] > 1000 && counts[2] > 1000, "{counts:?}");
    }

    /// An endpoint that takes requests and answers none (no timeout to fail
    /// them, so the breaker never hears of it) is not taken for a fast one
    /// as its estimate decays.
    #[tokio::test(start_paused = true)]
    async fn an_endpoint_holding_requests_it_never_answers_draws_few() {
        let b = backend(3, BackendConfig::default());
        let mut hung = Vec::new();
        for _ in 0..40_000 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            tokio::time::advance(Duration::from_millis(2)).await;
            if index(&f) == 0 {
                hung.push(f);
            } else {
                f.success();
            }
        }
        // 80 s of load: without a floor, the hung endpoint's estimate
        // decays to nothing and it draws hundreds.
        assert!(hung.len() < 20, "{} requests hung", hung.len());
    }

    /// One request probes an endpoint whose ejection is over: requests that
    /// drew it at the same moment and lost the probe to another go elsewhere,
    /// not to the endpoint the breaker still holds out.
    #[test]
    fn requests_that_lose_the_probe_go_elsewhere() {
        let mut config = BackendConfig::default();
        config.breaker.base_ejection = Duration::ZERO;
        let threads = 4;
        let mut lost = 0;
        for _ in 0..500 {
            let b = backend(2, config.clone());
            // Ejected directly: drawn against an endpoint answering in
            // microseconds, it would take a million draws to fail five times
            // (both estimates sit at the 1 ms floor, decaying alike, the
            // busy one a hair lower).
            eject_0(&b);
            assert!(b.slots[0].state.outlier().is_ejected());
            let start = Arc::new(std::sync::Barrier::new(threads));
            let picks: Vec<InFlight> = (0..threads)
                .map(|_| {
                    let (b, start) = (b.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        b.pick(&Default::default(), &[]).unwrap()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            let to_0 = picks.iter().filter(|f| index(f) == 0).count();
            let probes = picks.iter().filter(|f| f.probe.is_some()).count();
            assert!(probes <= 1, "{probes} probes at once");
            lost += to_0 - probes;
        }
        assert_eq!(
            lost, 0,
            "requests sent to an ejected endpoint without probing it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_is_ejected_then_probed_and_readmitted() {
        let mut config = BackendConfig::default();
        config.breaker.base_ejection = Duration::from_secs(5);
        let b = backend(3, config);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            let i = index(&f);
            counts[i] += 1;
            tokio::time::advance(Duration::from_millis(1)).await;
            if i == 0 { f.failed() } else { f.success() }
        }
        assert!(counts[0] < 30, "failing endpoint got {counts:?}");
        // It recovers: after its ejection, a probe re-admits it.
        tokio::time::advance(Duration::from_secs(60)).await;
        let mut back = 0;
        for _ in 0..3000 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            back += usize::from(index(&f) == 0);
            tokio::time::advance(Duration::from_millis(1)).await;
            f.success();
        }
        assert!(back > 300, "recovered endpoint got {back} of 3000");
    }

    /// Streams already judged (pooled database connections, a response
    /// body being read) wait for no answer: however long since an endpoint
    /// last answered, they do not make it look slow, and no endpoint is
    /// starved for holding them.
    #[tokio::test(start_paused = true)]
    async fn long_lived_judged_streams_do_not_make_an_endpoint_look_slow() {
        let b = backend(2, BackendConfig::default());
        let mut held = Vec::new();
        for _ in 0..10 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            f.success_took(Duration::from_millis(1));
            held.push(f);
            tokio::time::advance(Duration::from_secs(60)).await;
        }
        let mut counts = [0usize; 2];
        for _ in 0..200 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            counts[index(&f)] += 1;
            tokio::time::advance(Duration::from_millis(1)).await;
            f.success();
        }
        assert!(counts[0] > 40 && counts[1] > 40, "{counts:?}");
    }

    /// The ejected gauge counts the list in force: a request that outlived
    /// its list (discovery replaced it meanwhile) does not set it from the
    /// old one, whose gone endpoints would count for ever.
    #[tokio::test(start_paused = true)]
    async fn the_ejected_gauge_counts_the_list_in_force() {
        let b = two_in_turn();
        let mut in_flight = None;
        for _ in 0..100 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
            match index(&f) {
                0 => f.failed(),
                _ if in_flight.is_none() => in_flight = Some(f),
                _ => f.success(),
            }
            if b.ejected() == 1 && in_flight.is_some() {
                break;
            }
        }
        assert_eq!(b.metrics.get().ejected.get(), 1, "endpoint 0 ejected");
        // Endpoint 0 leaves the Service; the request on endpoint 1 then fails.
        let newer = Endpoints::new(
            "b".into(),
            &eps(2)[1..],
            b.config.clone(),
            Some(&b),
            b.metrics.clone(),
        );
        assert_eq!(b.metrics.get().ejected.get(), 0);
        in_flight.expect("a request on endpoint 1").failed();
        assert_eq!(
            b.metrics.get().ejected.get(),
            0,
            "none of the list in force"
        );
        drop(newer);
    }

    /// An address now held by a pod of another identity is a new endpoint:
    /// it does not inherit the old one's ejection. The same pod keeps it.
    #[tokio::test(start_paused = true)]
    async fn an_address_of_another_identity_does_not_inherit_its_ejection() {
        let as_ = |account: &str| {
            let id = crate::identity::Identity::of("cluster.local", "shop", account).unwrap();
            let mut es = eps(2);
            for e in &mut es {
                e.proxy = Some(crate::control::view::PeerProxy {
                    port: 4143,
                    identity: id.clone(),
                });
            }
            es
        };
        let mut config = BackendConfig {
            lb: LbConfig::RoundRobin,
            ..Default::default()
        };
        config.breaker.base_ejection = Duration::from_secs(5);
        let b = Endpoints::new("b".into(), &as_("web"), config, None, Default::default());
        drop(eject_the_first(&b, false).await);
        assert_eq!(b.ejected(), 1);
        let same = Endpoints::new(
            "b".into(),
            &as_("web"),
            b.config.clone(),
            Some(&b),
            b.metrics.clone(),
        );
        assert_eq!(same.ejected(), 1, "the same pod keeps its ejection");
        let reused = Endpoints::new(
            "b".into(),
            &as_("db"),
            b.config.clone(),
            Some(&same),
            b.metrics.clone(),
        );
        assert_eq!(reused.ejected(), 0, "another pod at the address");
    }

    /// A backend gone from discovery (dropped from its route, its Service
    /// deleted) has nothing ejected: its gauge does not keep the last count.
    #[tokio::test(start_paused = true)]
    async fn a_backend_gone_from_discovery_has_nothing_ejected() {
        let b = two_in_turn();
        drop(eject_the_first(&b, false).await);
        let metrics = b.metrics.clone();
        let newer = replaced(&b);
        drop(b);
        assert_eq!(
            metrics.get().ejected.get(),
            1,
            "a replaced list is not the backend gone"
        );
        drop(newer);
        assert_eq!(metrics.get().ejected.get(), 0);
    }

    /// A failed probe ejects again only within the cap: a backend shrunk to
    /// its ejected endpoint (one endpoint is never ejected) takes it back
    /// rather than counting it out again and again.
    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_ejects_again_only_within_the_cap() {
        let b = two_in_turn();
        drop(eject_the_first(&b, false).await);
        let ejections = b.metrics.get().ejections.get();
        // Scaled down to the ejected endpoint.
        let one = Endpoints::new(
            "b".into(),
            &eps(1),
            b.config.clone(),
            Some(&b),
            b.metrics.clone(),
        );
        drop(b);
        assert_eq!(one.ejected(), 1, "carried over");
        tokio::time::advance(Duration::from_secs(6)).await;
        let probe = one.pick(&Default::default(), &[]).unwrap();
        assert!(probe.probe.is_some());
        probe.failed();
        assert_eq!(one.ejected(), 0, "no room under the cap: back in");
        assert_eq!(one.metrics.get().ejections.get(), ejections);
        assert_eq!(one.metrics.get().ejected.get(), 0);
    }

    /// One Service reached at two addresses has a backend at each, on one
    /// gauge: the one that goes (its destination idle) takes only its own
    /// ejections off it.
    #[tokio::test(start_paused = true)]
    async fn two_backends_on_one_gauge_count_their_own_ejections() {
        let a = two_in_turn();
        let b = Endpoints::new(
            "b".into(),
            &eps(2),
            a.config.clone(),
            None,
            a.metrics.clone(),
        );
        drop(eject_the_first(&a, false).await);
        assert_eq!(a.metrics.get().ejected.get(), 1);
        drop(eject_the_first(&b, false).await);
        assert_eq!(a.metrics.get().ejected.get(), 2);
        drop(b);
        assert_eq!(
            a.metrics.get().ejected.get(),
            1,
            "the other's ejection stays"
        );
        let metrics = a.metrics.clone();
        let newer = replaced(&a);
        assert_eq!(metrics.get().ejected.get(), 1, "carried over");
        drop(a);
        drop(newer);
        assert_eq!(metrics.get().ejected.get(), 0);
    }

    /// Switching the breaker off (a BackendPolicy's `consecutiveFailures: 0`)
    /// lets the endpoints it had ejected in again at once.
    #[tokio::test(start_paused = true)]
    async fn switching_the_breaker_off_readmits_the_ejected() {
        let b = two_in_turn();
        drop(eject_the_first(&b, false).await);
        assert_eq!(b.ejected(), 1);
        let mut off = b.config.clone();
        off.breaker.consecutive_failures = 0;
        let newer = Endpoints::new("b".into(), &eps(2), off, Some(&b), b.metrics.clone());
        assert_eq!(newer.ejected(), 0);
        assert_eq!(newer.metrics.get().ejected.get(), 0);
        let picked: Vec<usize> = (0..2)
            .map(|_| {
                let f = newer.pick(&Default::default(), &[]).unwrap();
                let i = index(&f);
                f.success();
                i
            })
            .collect();
        assert!(picked.contains(&0), "{picked:?}");
    }

    /// A request that outlived its backend (replaced, then gone from
    /// discovery) gives no verdict: the gauge is not set again from its list.
    #[tokio::test(start_paused = true)]
    async fn a_request_outliving_its_backend_leaves_the_gauge_at_zero() {
        let b = two_in_turn();
        let in_flight = eject_the_first(&b, true).await;
        let metrics = b.metrics.clone();
        drop(replaced(&b));
        assert_eq!(metrics.get().ejected.get(), 0);
        in_flight.expect("a request on endpoint 1").failed();
        drop(b);
        assert_eq!(metrics.get().ejected.get(), 0);
    }

    /// An endpoint discovery took away meanwhile gets no verdict from a
    /// request that outlived its list: no ejection is counted or logged
    /// for an endpoint that is gone.
    #[tokio::test(start_paused = true)]
    async fn an_endpoint_gone_from_the_list_is_not_ejected() {
        let b = two_in_turn();
        let needed = b.config.breaker.consecutive_failures as usize;
        let mut on_first = Vec::new();
        while on_first.len() < needed {
            let f = b.pick(&Default::default(), &[]).unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
            if index(&f) == 0 {
                on_first.push(f);
            } else {
                f.success();
            }
        }
        let last = on_first.pop().unwrap();
        for f in on_first {
            f.failed();
        }
        assert_eq!(b.metrics.get().ejections.get(), 0, "one failure short");
        // Endpoint 0 leaves the Service, two others join (room under the
        // ejection cap); its last request then fails.
        let newer = Endpoints::new(
            "b".into(),
            &eps(4)[1..],
            b.config.clone(),
            Some(&b),
            b.metrics.clone(),
        );
        last.failed();
        assert_eq!(b.metrics.get().ejections.get(), 0);
        drop(newer);
    }

    /// Fails the first of `b`'s endpoints until it is ejected; with `hold`,
    /// keeps a request on the second under way, and returns it.
    async fn eject_the_first(b: &Arc<Endpoints>, hold: bool) -> Option<InFlight> {
        let mut in_flight = None;
        while b.ejected() == 0 || (hold && in_flight.is_none()) {
            let f = b.pick(&Default::default(), &[]).unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
            match index(&f) {
                0 => f.failed(),
                _ if hold && in_flight.is_none() => in_flight = Some(f),
                _ => f.success(),
            }
        }
        in_flight
    }

    /// Failures judged at once on many endpoints eject no more of them than
    /// `maxEjectionPercent` allows: the count and the ejection are one step.
    #[test]
    fn failures_at_once_eject_no_more_than_the_cap() {
        let mut config = BackendConfig {
            lb: LbConfig::RoundRobin,
            ..Default::default()
        };
        config.breaker.consecutive_failures = 1;
        config.breaker.max_ejected_percent = 10;
        for _ in 0..300 {
            let b = backend(10, config.clone());
            let start = Arc::new(std::sync::Barrier::new(10));
            let failing: Vec<_> = (0..10)
                .map(|_| {
                    let f = b.pick(&Default::default(), &[]).unwrap();
                    let start = start.clone();
                    std::thread::spawn(move || {
                        start.wait();
                        f.failed();
                    })
                })
                .collect();
            for t in failing {
                t.join().unwrap();
            }
            assert_eq!(b.ejected(), 1, "one of ten at most, and one");
            assert_eq!(b.metrics.get().ejections.get(), 1);
        }
    }

    /// A newer list of `b`'s endpoints, as discovery makes it.
    fn replaced(b: &Arc<Endpoints>) -> Arc<Endpoints> {
        Endpoints::new(
            "b".into(),
            &eps(2),
            b.config.clone(),
            Some(b),
            b.metrics.clone(),
        )
    }

    type Empty = http_body_util::Empty<bytes::Bytes>;

    /// `b` balanced over a stand-in where endpoint 0 answers `answer()` and
    /// the other 200, with the count of requests endpoint 0 got.
    fn endpoint_0_answers(
        b: &Arc<Endpoints>,
        answer: impl Fn() -> http::Response<crate::http::BoxBody> + Clone + Send + 'static,
    ) -> (
        Arc<AtomicUsize>,
        impl tower::Service<
            http::Request<Empty>,
            Response = http::Response<crate::http::BoxBody>,
            Error = std::convert::Infallible,
        >,
    ) {
        let failed = Arc::new(AtomicUsize::new(0));
        let counted = failed.clone();
        let inner = tower::service_fn(move |req: http::Request<Empty>| {
            let to_0 = matches!(req.extensions().get::<crate::http::Dst>(),
                Some(crate::http::Dst(crate::addr::DestAddr::Socket(a))) if a.port() == 8000);
            if to_0 {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            std::future::ready(Ok::<_, std::convert::Infallible>(if to_0 {
                answer()
            } else {
                http::Response::new(crate::http::empty())
            }))
        });
        (failed, service::Balance::new(b.clone(), inner, None))
    }

    /// Two endpoints taken in turn, ejected for 5 s the first time.
    fn two_in_turn() -> Arc<Endpoints> {
        let mut config = BackendConfig {
            lb: LbConfig::RoundRobin,
            ..Default::default()
        };
        config.breaker.base_ejection = Duration::from_secs(5);
        backend(2, config)
    }

    /// A pick of the first endpoint; picks of the other on the way succeed.
    /// The other is avoided, as a retry avoids an endpoint that failed it:
    /// the first is drawn while it is passed over too, unless it is out.
    fn pick_0(b: &Arc<Endpoints>) -> InFlight {
        let other = [b.slots[1].endpoint.addr];
        loop {
            let f = b.pick(&Default::default(), &other).unwrap();
            if index(&f) == 0 {
                return f;
            }
            f.success();
        }
    }

    /// A connection judged when it was made (a silent client's) decides the
    /// probe of an endpoint just out of ejection at once, and is not judged
    /// again when its bytes flow.
    #[tokio::test(start_paused = true)]
    async fn a_connection_judged_when_made_decides_its_probe_once() {
        let b = two_in_turn();
        let pick_0 = || pick_0(&b);
        for _ in 0..5 {
            pick_0().failed();
        }
        assert_eq!(b.ejected(), 1);
        tokio::time::advance(Duration::from_secs(6)).await;
        let held = pick_0();
        held.success_took(Duration::from_millis(1));
        assert_eq!(b.ejected(), 0, "connected: re-admitted at once");
        assert_eq!(b.slots[0].state.awaiting.load(Ordering::Relaxed), 0);
        held.success_took(Duration::from_secs(3600));
        let cost = b.slots[0].state.cost(Instant::now());
        assert!(cost < 1e9, "judged once, not by the stream's life: {cost}");
    }

    /// A connection made ahead of a silent client does not re-admit an
    /// endpoint by its connect alone (the peer's proxy is up, its app may
    /// answer 503): dropped unused, the next request probes; used for an
    /// opaque stream, it is the probe.
    #[tokio::test(start_paused = true)]
    async fn a_connection_made_ahead_probes_only_when_used() {
        let b = two_in_turn();
        let pick_0 = || pick_0(&b);
        let eject = || {
            for _ in 0..5 {
                pick_0().failed();
            }
            assert_eq!(b.ejected(), 1);
        };
        eject();
        tokio::time::advance(Duration::from_secs(6)).await;
        let ahead = pick_0();
        ahead.connected_ahead(Duration::from_millis(1));
        assert_eq!(b.ejected(), 1, "a connect alone re-admits nothing");
        // While it idles, a request may probe: its answer decides.
        let probe = pick_0();
        probe.success();
        assert_eq!(b.ejected(), 0, "the request's answer re-admits");
        drop(ahead);

        // Ejected again; this time the connection made ahead is used.
        eject();
        tokio::time::advance(Duration::from_secs(60)).await;
        let ahead = pick_0();
        ahead.connected_ahead(Duration::from_millis(1));
        assert_eq!(b.ejected(), 1);
        ahead.used();
        assert_eq!(b.ejected(), 0, "an opaque stream that flows re-admits");

        // A connection made ahead ends a run of failures once its stream
        // works, as any success does; its connect alone does not.
        for _ in 0..4 {
            pick_0().failed();
        }
        let worked = pick_0();
        worked.connected_ahead(Duration::from_millis(1));
        worked.used();
        for _ in 0..4 {
            pick_0().failed();
        }
        assert_eq!(b.ejected(), 0, "no five failures in a row");
        pick_0().connected_ahead(Duration::from_millis(1));
        pick_0().failed();
        assert_eq!(
            b.ejected(),
            1,
            "five in a row: the connect counted for nothing"
        );

        // Failures to connect are another matter: a connect ends their run.
        tokio::time::advance(Duration::from_secs(600)).await;
        pick_0().success();
        assert_eq!(b.ejected(), 0);
        for _ in 0..4 {
            pick_0().unreachable();
        }
        pick_0().connected_ahead(Duration::from_millis(1));
        for _ in 0..4 {
            pick_0().unreachable();
        }
        assert_eq!(
            b.ejected(),
            0,
            "the connect ended the run of failed connects"
        );

        // Not a run of the peer proxy's word that its app is unreachable: a
        // connect to the peer proxy says nothing of its app.
        tokio::time::advance(Duration::from_secs(600)).await;
        pick_0().success();
        for _ in 0..4 {
            pick_0().app_unreachable();
        }
        pick_0().connected_ahead(Duration::from_millis(1));
        pick_0().app_unreachable();
        assert_eq!(b.ejected(), 1, "five in a row");
    }

    /// Through the balancer: a peer proxy's answer that its app cannot be
    /// reached is a failed answer, whose run a connect made ahead to that
    /// peer proxy does not end; this proxy's own failure to connect is a
    /// failed connect.
    #[tokio::test(start_paused = true)]
    async fn a_peer_s_word_that_its_app_is_unreachable_is_a_failed_answer() {
        use crate::http::error::{UpstreamFailure, error_response};
        use tower::Service as _;
        let answer = |ours: bool| {
            let mut rsp = error_response(
                "connect",
                http::StatusCode::BAD_GATEWAY,
                "connection refused",
            );
            if ours {
                rsp.extensions_mut().insert(UpstreamFailure);
            }
            rsp
        };
        for (ours, ejected) in [(false, 1), (true, 0)] {
            let b = two_in_turn();
            // Endpoint 0 fails every request; the other answers.
            let (failed, mut svc) = endpoint_0_answers(&b, move || answer(ours));
            for n in [4, 5] {
                while failed.load(Ordering::SeqCst) < n {
                    let _ = svc.call(http::Request::new(Empty::new())).await;
                    // Passed over while the other works, for a while.
                    tokio::time::advance(Duration::from_millis(100)).await;
                }
                if n == 4 {
                    pick_0(&b).connected_ahead(Duration::from_millis(1));
                }
            }
            assert_eq!(b.ejected(), ejected, "ours: {ours}");
        }
    }

    /// A gRPC server that fails every call at once (trailers-only
    /// UNAVAILABLE, HTTP 200) is ejected as one answering 503 would be; a
    /// call refused for its own sake (NOT_FOUND) ejects nothing.
    #[tokio::test(start_paused = true)]
    async fn a_grpc_server_failing_every_call_is_ejected() {
        use tower::Service as _;
        for (code, ejected) in [("14", 1), ("13", 1), ("5", 0), ("0", 0)] {
            let b = two_in_turn();
            let (failed, mut svc) = endpoint_0_answers(&b, move || {
                let mut rsp = http::Response::new(crate::http::empty());
                rsp.headers_mut()
                    .insert("content-type", "application/grpc".parse().unwrap());
                rsp.headers_mut()
                    .insert("grpc-status", code.parse().unwrap());
                rsp
            });
            while failed.load(Ordering::SeqCst) < 5 {
                let _ = svc.call(http::Request::new(Empty::new())).await;
            }
            assert_eq!(b.ejected(), ejected, "grpc-status {code}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_that_never_answers_is_ejected_when_attempts_time_out() {
        // Round robin: nothing but the breaker steers around a silent endpoint
        // (the latency-aware default shuns it after its first timeout).
        let b = backend(
            3,
            BackendConfig {
                lb: LbConfig::RoundRobin,
                ..Default::default()
            },
        );
        let timeout = Duration::from_secs(1);
        let mut counts = [0usize; 3];
        for _ in 0..300 {
            let mut f = b.pick(&Default::default(), &[]).unwrap();
            f.give_up_at(Instant::now() + timeout, None);
            let i = index(&f);
            counts[i] += 1;
            if i == 0 {
                // Accepted, never answered: the route's timeout drops it.
                tokio::time::advance(timeout).await;
                drop(f);
            } else {
                tokio::time::advance(Duration::from_millis(1)).await;
                f.success();
            }
        }
        assert_eq!(b.ejected(), 1, "{counts:?}");
        assert!(counts[0] <= 10, "the silent endpoint got {counts:?}");
    }

    /// Ejected for timing out, an endpoint's estimate is seconds, which would
    /// lose every comparison for a minute after its ejection: it is probed as
    /// soon as its ejection is over, and re-admitted when the probe succeeds.
    #[tokio::test(start_paused = true)]
    async fn an_endpoint_ejected_for_timeouts_is_probed_when_its_ejection_ends() {
        let mut config = BackendConfig::default();
        config.breaker.base_ejection = Duration::from_secs(5);
        let b = backend(3, config);
        let timeout = Duration::from_secs(10);
        // Endpoint 0 hangs: its attempts time out until it is ejected.
        while b.ejected() == 0 {
            let mut f = b.pick(&Default::default(), &[]).unwrap();
            f.give_up_at(Instant::now() + timeout, None);
            if index(&f) == 0 {
                tokio::time::advance(timeout).await;
                drop(f);
            } else {
                tokio::time::advance(Duration::from_millis(1)).await;
                f.success();
            }
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        // Healthy again: within a few requests it is probed and re-admitted.
        let mut until_probed = 0;
        loop {
            until_probed += 1;
            assert!(until_probed < 50, "no probe in 50 requests");
            let f = b.pick(&Default::default(), &[]).unwrap();
            let probed = index(&f) == 0;
            tokio::time::advance(Duration::from_millis(1)).await;
            f.success();
            if probed {
                break;
            }
        }
        assert_eq!(b.ejected(), 0, "re-admitted after {until_probed} requests");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_gives_up_early_ejects_nothing() {
        // Two endpoints: one alone is never ejected, whatever it does.
        let b = two_in_turn();
        for i in 0..100 {
            // (An ejected endpoint is drawn no more.)
            assert_eq!(b.ejected(), 0, "after {i}");
            let mut f = pick_0(&b);
            let until = Instant::now() + Duration::from_secs(1);
            f.give_up_at(until, None);
            tokio::time::advance(Duration::from_millis(10)).await;
            drop(f);
        }
        assert_eq!(b.ejected(), 0);
        assert_eq!(b.slots[0].state.outlier().failures_in_a_row(), 0);
    }

    /// Through the balancer: a server that reads a gRPC call's (or a small
    /// POST's) whole body and never answers is ejected when its attempts time
    /// out, as one answering 503 is; it never was, since the body had not
    /// ended when the balancer sent the request on.
    #[tokio::test(start_paused = true)]
    async fn a_server_that_reads_the_body_and_hangs_is_ejected() {
        use http_body_util::BodyExt as _;
        use tower::Service as _;
        let b = two_in_turn();
        let inner = tower::service_fn(|req: http::Request<crate::retry::ReplayBody>| async move {
            let _ = req.into_body().collect().await;
            std::future::pending::<
                Result<http::Response<crate::http::BoxBody>, std::convert::Infallible>,
            >()
            .await
        });
        let timeout = Duration::from_millis(100);
        let mut svc = service::Balance::new(b.clone(), inner, Some(timeout));
        for _ in 0..10 {
            let body = crate::retry::ReplayBody::new(
                crate::http::full(bytes::Bytes::from_static(b"hello")),
                1024,
            );
            let mut req = http::Request::new(body);
            if let Some(end) = req.body().end_noted() {
                req.extensions_mut().insert(end);
            }
            // The route's timeout above the balancer drops the attempt.
            let _ = tokio::time::timeout(timeout, svc.call(req)).await;
        }
        assert_eq!(b.ejected(), 1);
    }

    /// An attempt with a body that times out is the endpoint's failure when
    /// the body was all sent early in the attempt (a gRPC call's, a small
    /// POST's): a hung gRPC server was never ejected. Not when the client
    /// was still sending it, or sent it too late for the endpoint to answer.
    #[tokio::test(start_paused = true)]
    async fn a_timed_out_attempt_with_a_body_sent_in_time_counts() {
        let timeout = Duration::from_secs(1);
        for (ended_after, ejected) in [
            (Some(Duration::ZERO), 1),
            (Some(Duration::from_millis(400)), 1),
            (Some(Duration::from_millis(900)), 0),
            (None, 0),
        ] {
            let b = two_in_turn();
            for _ in 0..5 {
                let mut f = pick_0(&b);
                let end = crate::retry::BodyEnd::default();
                f.give_up_at(Instant::now() + timeout, Some(end.clone()));
                if let Some(after) = ended_after {
                    tokio::time::advance(after).await;
                    end.ended();
                    tokio::time::advance(timeout - after).await;
                } else {
                    tokio::time::advance(timeout).await;
                }
                drop(f);
            }
            assert_eq!(b.ejected(), ejected, "body ended after {ended_after:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_endpoint_is_avoided_though_it_fails_fast() {
        let mut config = BackendConfig::default();
        config.breaker.consecutive_failures = 0;
        let counts = shares(&backend(3, config), |i| match i {
            // Connection refused: answered at once.
            0 => (Duration::from_micros(100), InFlight::unreachable),
            _ => (Duration::from_millis(5), InFlight::success),
        })
        .await;
        assert!(counts[0] < 30, "unreachable endpoint got {counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn state_survives_an_update_of_the_list() {
        let b = backend(3, BackendConfig::default());
        for _ in 0..10 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            if index(&f) == 0 {
                f.failed()
            } else {
                f.success()
            }
        }
        let next = Endpoints::new(
            "b".into(),
            &eps(4),
            BackendConfig::default(),
            Some(&b),
            Default::default(),
        );
        assert!(Arc::ptr_eq(&b.slots[0].state, &next.slots[0].state));
    }

    /// A request that outlived its list (a retry after its backoff, the
    /// endpoints changed meanwhile) picks from the newest list, not from
    /// endpoints discovery has since removed.
    #[test]
    fn a_request_that_outlived_its_list_picks_from_the_newest() {
        let first = backend(1, BackendConfig::default());
        assert!(first.replacement().is_none());
        let moved: Vec<Endpoint> = eps(3).into_iter().skip(1).collect();
        let second = Endpoints::new(
            "b".into(),
            &moved,
            BackendConfig::default(),
            Some(&first),
            Default::default(),
        );
        let third = Endpoints::new(
            "b".into(),
            &moved,
            BackendConfig::default(),
            Some(&second),
            Default::default(),
        );
        let newest = first.replacement().expect("replaced");
        assert!(Arc::ptr_eq(&newest, &third), "the newest, not the next");
        assert!(third.replacement().is_none());
        // Gone from discovery: the last list stands.
        drop((second, third, newest));
        assert!(first.replacement().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_spreads_the_turns_of_ejected_endpoints_over_the_rest() {
        let b = backend(
            10,
            BackendConfig {
                lb: LbConfig::RoundRobin,
                ..Default::default()
            },
        );
        // Neighbours 0 to 4 (half, the cap) fail until ejected.
        for _ in 0..200 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            if index(&f) < 5 {
                f.failed();
            } else {
                f.success();
            }
        }
        let mut counts = [0usize; 10];
        for _ in 0..1000 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            counts[index(&f)] += 1;
            f.success();
        }
        assert_eq!(counts[..5], [0; 5], "{counts:?}");
        assert!(
            counts[5..].iter().all(|c| (180..=220).contains(c)),
            "{counts:?}"
        );
        // Not neighbours: every other one of four.
        let b = backend(
            4,
            BackendConfig {
                lb: LbConfig::RoundRobin,
                ..Default::default()
            },
        );
        for _ in 0..100 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            if index(&f).is_multiple_of(2) {
                f.failed();
            } else {
                f.success();
            }
        }
        let mut counts = [0usize; 4];
        for _ in 0..1000 {
            let f = b.pick(&Default::default(), &[]).unwrap();
            counts[index(&f)] += 1;
            f.success();
        }
        assert_eq!([counts[0], counts[2]], [0, 0], "{counts:?}");
        assert!((480..=520).contains(&counts[1]), "{counts:?}");
    }

    /// A WebSocket counts as load on its endpoint while it is open, as an
    /// opaque stream does, not only until its 101.
    #[tokio::test]
    async fn an_upgraded_connection_is_load_while_it_lasts() {
        use tower::{Service, ServiceExt};
        let b = backend(1, BackendConfig::default());
        let tunnel = crate::http::upgrade::TunnelHold::default();
        let held = tunnel.clone();
        let inner = tower::service_fn(move |_: http::Request<crate::http::BoxBody>| {
            let held = held.clone();
            async move {
                let mut rsp = http::Response::new(crate::http::empty());
                *rsp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                rsp.extensions_mut().insert(held);
                Ok::<_, std::convert::Infallible>(rsp)
            }
        });
        let mut svc = service::Balance::new(b.clone(), inner, None);
        let rsp = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(crate::http::empty()))
            .await
            .unwrap();
        drop(rsp);
        let pending = || b.slots[0].state.pending.load(Ordering::Relaxed);
        assert_eq!(pending(), 1, "open");
        drop((tunnel, svc));
        assert_eq!(pending(), 0, "closed");
    }

    #[test]
    fn round_robin_takes_turns_and_hashing_sticks() {
        let rr = backend(
            3,
            BackendConfig {
                lb: LbConfig::RoundRobin,
                ..Default::default()
            },
        );
        let seq: Vec<usize> = (0..6)
            .map(|_| index(&rr.pick(&Default::default(), &[]).unwrap()))
            .collect();
        assert_eq!(seq[..3], seq[3..]);
        let mut sorted = seq[..3].to_vec();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2]);

        let h = backend(
            5,
            BackendConfig {
                lb: LbConfig::ConsistentHash(HashKey::Cookie("session".into())),
                ..Default::default()
            },
        );
        let mut headers = http::HeaderMap::new();
        headers.insert("cookie", "a=1; session=abc".parse().unwrap());
        let first = index(&h.pick(&headers, &[]).unwrap());
        for _ in 0..20 {
            assert_eq!(index(&h.pick(&headers, &[]).unwrap()), first);
        }
    }

    /// The same key reaches the same endpoint from every build (the scores
    /// are fixed: a change here moves every hashed client), keys spread
    /// evenly, and an endpoint leaving moves only its own keys.
    #[test]
    fn hashing_is_fixed_even_and_moves_only_the_keys_of_a_changed_endpoint() {
        // FNV-1a of the key, the address's octets and its port (big-endian),
        // through fmix64: worked out apart from this code.
        const KNOWN_SCORE_V4: u64 = 6_717_121_467_399_456_938;
        const KNOWN_SCORE_V6: u64 = 5_491_553_794_531_871_395;
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            rendezvous_score(b"user-1", addr("10.0.0.1:8080")),
            KNOWN_SCORE_V4
        );
        assert_eq!(
            rendezvous_score(b"user-1", addr("[fd00::1]:8080")),
            KNOWN_SCORE_V6
        );
        let pick = |key: &str, eps: &[SocketAddr]| -> SocketAddr {
            *eps.iter()
                .max_by_key(|a| rendezvous_score(key.as_bytes(), **a))
                .unwrap()
        };
        let five: Vec<SocketAddr> = eps(5).iter().map(|e| e.addr).collect();
        let mut counts = [0usize; 5];
        for k in 0..5000 {
            let to = pick(&format!("key-{k}"), &five);
            counts[five.iter().position(|a| *a == to).unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
        let four = &five[1..];
        for k in 0..5000 {
            let key = format!("key-{k}");
            let before = pick(&key, &five);
            if before != five[0] {
                assert_eq!(pick(&key, four), before, "{key} moved");
            }
        }
    }

    #[test]
    fn a_retry_avoids_the_endpoint_that_failed() {
        let b = backend(2, BackendConfig::default());
        let avoid = eps(2)[0].addr;
        for _ in 0..50 {
            assert_ne!(
                b.pick(&Default::default(), &[avoid])
                    .unwrap()
                    .endpoint()
                    .addr,
                avoid
            );
        }
        // Every endpoint a request failed on, while another is left.
        let three = backend(3, BackendConfig::default());
        let failed = [eps(3)[0].addr, eps(3)[1].addr];
        for _ in 0..50 {
            let picked = three.pick(&Default::default(), &failed).unwrap();
            assert_eq!(picked.endpoint().addr, eps(3)[2].addr);
        }
        let one = backend(1, BackendConfig::default());
        assert!(one.pick(&Default::default(), &[eps(1)[0].addr]).is_ok());
        assert_eq!(
            backend(0, BackendConfig::default())
                .pick(&Default::default(), &[])
                .unwrap_err(),
            PickError::NoEndpoints
        );
    }

    #[test]
    fn the_endpoint_is_noted_on_every_response_a_retry_could_follow() {
        let rsp = |status: u16, grpc: Option<&'static str>| {
            let mut r = http::Response::new(());
            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
            if let Some(g) = grpc {
                r.headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static(g));
            }
            r
        };
        // Every status a route may retry (400..=599), the proxy's own 502, 503
        // and 504, and gRPC errors in a 200's headers.
        for status in [400, 404, 429, 500, 502, 503, 504, 599] {
            assert!(ServedBy::worth_noting(&rsp(status, None)), "{status}");
        }
        assert!(ServedBy::worth_noting(&rsp(200, Some("14"))));
        for status in [100, 200, 204, 301, 304] {
            assert!(!ServedBy::worth_noting(&rsp(status, None)), "{status}");
        }
    }
}
