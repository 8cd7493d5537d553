//! Discovery watches: one per destination in use, shared by every connection to
//! it, dropped when idle. The data path reads the latest answer without waiting;
//! only the first request to a new destination waits (boundedly) for a first answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strait_api::v1 as api;
use strait_api::v1::discovery_client::DiscoveryClient;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{AuthedChannel, Link};
use crate::addr::IpNet;
use tracing::{debug, info, warn};

use super::Workload;
use super::backoff::Backoff;
use super::view::{Resolution, parse};
use crate::addr::DestAddr;
use crate::defaults;
use crate::outbound::logical::Logical;

struct Watch {
    rx: watch::Receiver<Option<Resolution>>,
    logical: Arc<Logical>,
    state: Arc<WatchState>,
    task: tokio::task::AbortHandle,
}

#[derive(Debug)]
struct WatchState {
    last_used_ms: AtomicU64,
    /// The stream's last failure said the controller could not be reached,
    /// and nothing has come since (not a refusal: a controller that is up
    /// and refuses renews nothing either way).
    away: AtomicBool,
    /// A request already waited for the first answer in vain: later ones do not
    /// wait again (pass through at once) until an answer comes.
    waited: AtomicBool,
    /// The answer an earlier watch of this destination held when it was
    /// dropped idle: what requests get should the controller not answer.
    fallback: Option<Resolution>,
    /// When the fallback was its watch's own answer (`now_ms`): passed on,
    /// it does not grow younger.
    fallback_at: u64,
    /// When the stream first failed after its last message (`now_ms`;
    /// `u64::MAX` while it has not): the answer is as old as that.
    failing_since: AtomicU64,
    /// What `now_ms` counts from (the discovery's start).
    epoch: Instant,
    /// Woken when a call or stream of the watch fails.
    failed: tokio::sync::Notify,
    /// How many of its calls and streams failed.
    failures: std::sync::atomic::AtomicU32,
}

/// One watched destination, as the admin server shows it.
#[derive(Debug)]
pub struct Known {
    pub destination: String,
    /// The controller's answer on this watch; `None` until the first.
    pub answer: Option<Resolution>,
    /// With no answer yet: the one remembered from an earlier watch.
    pub remembered: Option<Resolution>,
    pub away: bool,
    pub idle_ms: u64,
}

/// How long a dropped watch's last answer may stand in for the controller:
/// older, its endpoints are likely gone (pods rescheduled), and passing
/// through to the Service's address, which kube-proxy keeps current, is the
/// better guess.
const MAX_REMEMBERED_AGE_MS: u64 = 30 * 60 * 1000;

/// What a request gets of a watch: its answers, its stages, its state.
type WatchHandle = (
    watch::Receiver<Option<Resolution>>,
    Arc<Logical>,
    Arc<WatchState>,
);

impl Watch {
    /// Holds a meshed answer while the controller cannot be reached: dropped,
    /// its destination's traffic would lose its identity. A `NotMeshed`
    /// answer is what no answer gives, so holding one strands nothing.
    fn stranded(&self) -> bool {
        self.state.away.load(Ordering::Relaxed)
            && matches!(
                self.rx.borrow().as_ref().or(self.state.fallback.as_ref()),
                Some(Resolution::Service(_))
            )
    }

    /// The answer it has (as of `now`), or failing one, the one it started
    /// with (as of when that was an answer).
    fn answer(&self, now: u64) -> Option<(Resolution, u64)> {
        match self.rx.borrow().clone() {
            Some(r) => Some((r, now.min(self.state.failing_since.load(Ordering::Relaxed)))),
            None => self
                .state
                .fallback
                .clone()
                .map(|r| (r, self.state.fallback_at)),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A destination's current answer, and the stages built for it (routes,
/// backends and their balancers), kept with the watch.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub resolution: Resolution,
    pub logical: Arc<Logical>,
}

pub struct Discovery {
    link: Arc<Link>,
    /// Index change at the controller to an update's receipt here.
    lag: prometheus_client::metrics::histogram::Histogram,
    workload: Workload,
    start: Instant,
    watches: Mutex<HashMap<DestAddr, Watch>>,
    /// The last answers of watches dropped idle, with when (`now_ms`): a
    /// destination used again while the controller is away gets its last
    /// answer (its identity, its routes) rather than being passed through.
    remembered: Mutex<Remembered>,
    /// The last watch call or stream to the controller failed, and none has
    /// answered since: what tells an outage from a slow answer.
    unreachable: Arc<Unreachable>,
    /// How long a remembered answer may stand in (`MAX_REMEMBERED_AGE_MS`).
    remembered_for_ms: u64,
    /// Destinations watched at once, and answers remembered
    /// (`--max-discovery-watches`).
    max_watches: usize,
    /// Where the addresses discovery is asked about are
    /// (`--discovery-networks`); every one when empty.
    networks: Vec<IpNet>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("workload", &self.workload)
            .finish()
    }
}

/// Whether the last call a watch made found the controller out of reach (and
/// none has got through since): `/config`'s "unreachable", and the
/// `control_unreachable` gauge. The gauge is the one record: watches on
/// other threads set it at once, and a flag beside it could be left saying
/// the opposite until the next call.
#[derive(Debug, Default)]
struct Unreachable {
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Unreachable {
    fn set(&self, away: bool) {
        self.gauge.set(i64::from(away));
    }

    fn get(&self) -> bool {
        self.gauge.get() != 0
    }
}

impl Discovery {
    pub fn new(
        link: Arc<Link>,
        workload: Workload,
        lag: prometheus_client::metrics::histogram::Histogram,
        unreachable: prometheus_client::metrics::gauge::Gauge,
        max_watches: usize,
        networks: Vec<IpNet>,
    ) -> Arc<Self> {
        Self::remembering_for(
            link,
            workload,
            (lag, unreachable),
            MAX_REMEMBERED_AGE_MS,
            (max_watches, networks),
        )
    }

    fn remembering_for(
        link: Arc<Link>,
        workload: Workload,
        (lag, unreachable): (
            prometheus_client::metrics::histogram::Histogram,
            prometheus_client::metrics::gauge::Gauge,
        ),
        remembered_for_ms: u64,
        (max_watches, networks): (usize, Vec<IpNet>),
    ) -> Arc<Self> {
        let d = Arc::new(Discovery {
            lag,
            link,
            workload,
            start: Instant::now(),
            watches: Mutex::default(),
            remembered: Mutex::default(),
            unreachable: Arc::new(Unreachable { gauge: unreachable }),
            remembered_for_ms,
            max_watches: max_watches.max(1),
            networks,
        });
        tokio::spawn(Self::sweep(Arc::downgrade(&d)));
        d
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The current answer for `dest`; for a destination not watched yet, waits up
    /// to `timeout` for the first one. `None` when there is no answer in time.
    pub async fn resolve(&self, dest: &DestAddr, timeout: Duration) -> Option<Resolved> {
        // Every slot holds an answer the controller cannot renew now: pass through.
        let (mut rx, logical, state) = self.watch(dest)?;
        let current = rx.borrow().clone();
        // The last answer of an earlier watch, while the controller is away
        // (not when it is only slow: discovery's answer is then on its way).
        // Away for this watch too until its own call gets through: once the
        // controller is back, another watch may answer first, and this one
        // retries on its own backoff (up to 10 s) meanwhile.
        let fallback = || {
            (self.unreachable.get() || state.away.load(Ordering::Relaxed))
                .then(|| state.fallback.clone())
                .flatten()
        };
        let resolution = match current {
            Some(r) => r,
            None => match fallback() {
                Some(last) => last,
                // The controller did not answer in time before: do not make
                // every request to this destination wait as long again.
                None if state.waited.load(Ordering::Relaxed) => return None,
                None => {
                    // Until the watch's calls keep failing: then no answer is
                    // coming soon (the controller down, or refusing it), and
                    // waiting on would stall every new destination's first
                    // request while the controller is away.
                    let first = async {
                        loop {
                            let failed = state.failed.notified();
                            tokio::pin!(failed);
                            failed.as_mut().enable();
                            // Its first retry failed too: not a blip (a
                            // controller replica going away), which the
                            // retry 100-200 ms later gets past.
                            if state.failures.load(Ordering::Relaxed) >= 2 {
                                return None;
                            }
                            tokio::select! {
                                biased;
                                r = rx.wait_for(Option::is_some) => return r.ok().and_then(|r| r.clone()),
                                () = failed => {}
                            }
                        }
                    };
                    // In a block: `first` borrows the receiver until dropped.
                    let answered = {
                        tokio::pin!(first);
                        if self.unreachable.get() {
                            let short = timeout.min(defaults::DISCOVERY_WAIT_WHILE_UNREACHABLE);
                            match tokio::time::timeout(short, &mut first).await {
                                Ok(r) => r,
                                // The controller came back meanwhile: its answer
                                // is on its way, behind the others' reconnects.
                                Err(_) if !self.unreachable.get() => {
                                    tokio::time::timeout(timeout.saturating_sub(short), first)
                                        .await
                                        .ok()
                                        .flatten()
                                }
                                Err(_) => None,
                            }
                        } else {
                            tokio::time::timeout(timeout, first).await.ok().flatten()
                        }
                    };
                    // An answer the stream gave just before it failed.
                    match answered.or_else(|| rx.borrow().clone()) {
                        Some(r) => r,
                        None => {
                            state.waited.store(true, Ordering::Relaxed);
                            if let Some(last) = fallback() {
                                warn!(destination = %dest, ?timeout, "no answer from discovery in time; using its last answer until it answers");
                                last
                            } else {
                                warn!(destination = %dest, ?timeout, "no answer from discovery (in time, or at all); passing through until it answers");
                                return None;
                            }
                        }
                    }
                }
            },
        };
        Some(Resolved {
            resolution,
            logical,
        })
    }

    /// Whether discovery is asked about `dest`: a name always; an address in
    /// the networks given, never a link-local one (a cloud's metadata
    /// service, which a client asks with a short timeout).
    fn asks_about(&self, dest: &DestAddr) -> bool {
        let DestAddr::Socket(a) = dest else {
            return true;
        };
        let ip = a.ip().to_canonical();
        let link_local = match ip {
            std::net::IpAddr::V4(v4) => v4.is_link_local(),
            std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        !link_local && (self.networks.is_empty() || self.networks.iter().any(|n| n.contains(ip)))
    }

    fn watch(&self, dest: &DestAddr) -> Option<WatchHandle> {
        if !self.asks_about(dest) {
            return None;
        }
        let now = self.now_ms();
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = watches.get(dest) {
            w.state.last_used_ms.store(now, Ordering::Relaxed);
            return Some((w.rx.clone(), w.logical.clone(), w.state.clone()));
        }
        if watches.len() >= self.max_watches {
            // Bounded: a flood of distinct destinations (random Host headers) evicts
            // the least recently used watch rather than growing without end. Never
            // one that holds an answer while the controller is away: it could not
            // be answered again, and its traffic would lose its identity.
            let lru = watches
                .iter()
                .filter(|(_, w)| !w.stranded())
                .min_by_key(|(_, w)| w.state.last_used_ms.load(Ordering::Relaxed))
                .map(|(d, _)| d.clone());
            match lru {
                Some(lru) => {
                    debug!(destination = %lru, "too many discovery watches; dropping the least recently used");
                    if let Some(w) = watches.remove(&lru) {
                        self.remember(lru, &w, now);
                    }
                }
                None => return None,
            }
        }
        let (fallback, fallback_at) = self
            .remembered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(dest)
            .filter(|(_, at)| now.saturating_sub(*at) < self.remembered_for_ms)
            .map_or((None, 0), |(r, at)| (Some(r), at));
        let (tx, rx) = watch::channel(None);
        let req = api::WatchDestination {
            destination: dest.to_string(),
            context_namespace: self.workload.namespace.clone(),
            proxy_id: format!("{}.{}", self.workload.pod, self.workload.namespace),
        };
        // Made while the controller is unreachable, with an answer to stand
        // in: stranded from the start, not evicted before its first call fails.
        let away = self.unreachable.get() && matches!(fallback, Some(Resolution::Service(_)));
        let state = Arc::new(WatchState {
            last_used_ms: AtomicU64::new(now),
            away: AtomicBool::new(away),
            waited: AtomicBool::new(false),
            fallback,
            fallback_at,
            failing_since: AtomicU64::new(u64::MAX),
            epoch: self.start,
            failed: tokio::sync::Notify::new(),
            failures: Default::default(),
        });
        let logical: Arc<Logical> = Arc::default();
        // The current certificate's channel at each watch (Link).
        let (link, workload) = (self.link.clone(), self.workload.clone());
        let client = move || {
            DiscoveryClient::new(link.authed(&workload))
                .max_decoding_message_size(crate::defaults::CONTROL_MAX_MESSAGE_BYTES)
        };
        let task = tokio::spawn(follow(
            client,
            req,
            tx,
            logical.clone(),
            state.clone(),
            self.lag.clone(),
            self.unreachable.clone(),
        ))
        .abort_handle();
        let w = Watch {
            rx: rx.clone(),
            logical: logical.clone(),
            state: state.clone(),
            task,
        };
        watches.insert(dest.clone(), w);
        Some((rx, logical, state))
    }

    /// Drops watches no request has used for `DISCOVERY_IDLE_TIMEOUT`, except
    /// those holding an answer while the controller is away: dropped, their
    /// destination would be passed through (no mTLS) on its next use.
    async fn sweep(this: std::sync::Weak<Self>) {
        let mut tick = tokio::time::interval(defaults::DISCOVERY_IDLE_TIMEOUT / 2);
        loop {
            tick.tick().await;
            let Some(d) = this.upgrade() else { return };
            d.drop_idle(d.now_ms());
        }
    }

    fn drop_idle(&self, now: u64) {
        let idle = defaults::DISCOVERY_IDLE_TIMEOUT.as_millis() as u64;
        {
            let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<DestAddr> = watches
                .iter()
                .filter(|(_, w)| {
                    let used =
                        now.saturating_sub(w.state.last_used_ms.load(Ordering::Relaxed)) < idle;
                    !used && !w.stranded()
                })
                .map(|(d, _)| d.clone())
                .collect();
            // Remembered before `watches` is let go, as an evicted watch is:
            // a request in between would start a watch without the answer
            // to stand in, left beside it unused. The oldest answers past
            // the bound go once all are in, not one search per watch.
            if !gone.is_empty() {
                let mut kept = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
                for dest in gone {
                    if let Some(w) = watches.remove(&dest) {
                        debug!(%dest, "dropping idle discovery watch");
                        keep_answer(&mut kept, dest, &w, now);
                    }
                }
                forget_oldest(&mut kept, self.max_watches);
            }
        }
        // Too old to stand in, an answer is only memory held.
        self.remembered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, at)| now.saturating_sub(*at) < self.remembered_for_ms);
    }

    /// Keeps what a dropped watch knew, within `max_watches`
    /// answers (the oldest forgotten first).
    fn remember(&self, dest: DestAddr, w: &Watch, now: u64) {
        let mut kept = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        keep_answer(&mut kept, dest, w, now);
        forget_oldest(&mut kept, self.max_watches);
    }

    /// Every destination watched now, by name: its answer (or, until one
    /// comes, the remembered one it started with), whether the controller
    /// could not be reached at the last try, and how long since it was used.
    pub fn known(&self) -> Vec<Known> {
        let now = self.now_ms();
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let taken: Vec<_> = watches
            .iter()
            .map(|(dest, w)| {
                // One borrow: a second, while the follower waits to send,
                // would wait behind it with `watches` held.
                let answer = w.rx.borrow().clone();
                (dest.clone(), answer, w.state.clone())
            })
            .collect();
        drop(watches);
        let mut out: Vec<Known> = taken
            .into_iter()
            .map(|(dest, answer, state)| Known {
                destination: dest.to_string(),
                remembered: answer.is_none().then(|| state.fallback.clone()).flatten(),
                answer,
                away: state.away.load(Ordering::Relaxed),
                idle_ms: now.saturating_sub(state.last_used_ms.load(Ordering::Relaxed)),
            })
            .collect();
        out.sort_unstable_by(|a, b| a.destination.cmp(&b.destination));
        out
    }

    pub fn watched(&self) -> usize {
        self.watches.lock().map(|w| w.len()).unwrap_or(0)
    }
}

type Remembered = HashMap<DestAddr, (Resolution, u64)>;

/// Keeps what a dropped watch knew. Not `NotMeshed`: it is what no answer
/// gives, and would crowd out the answers worth keeping.
fn keep_answer(kept: &mut Remembered, dest: DestAddr, w: &Watch, now: u64) {
    if let Some((answer @ Resolution::Service(_), at)) = w.answer(now) {
        kept.insert(dest, (answer, at));
    }
}

/// Forgets the oldest answers past `max`.
fn forget_oldest(kept: &mut Remembered, max: usize) {
    let over = kept.len().saturating_sub(max);
    if over == 0 {
        return;
    }
    // One at a time (a watch evicted for a new destination): a search, no copy.
    if over == 1 {
        let oldest = kept
            .iter()
            .min_by_key(|(_, (_, at))| *at)
            .map(|(d, _)| d.clone());
        if let Some(d) = oldest {
            kept.remove(&d);
        }
        return;
    }
    let mut by_age: Vec<(u64, DestAddr)> =
        kept.iter().map(|(d, (_, at))| (*at, d.clone())).collect();
    by_age.select_nth_unstable_by_key(over - 1, |(at, _)| *at);
    for (_, d) in &by_age[..over] {
        kept.remove(d);
    }
}

/// Follows one destination for as long as it is watched, reconnecting with
/// jittered backoff; the last answer stays in force while disconnected.
async fn follow(
    client: impl Fn() -> DiscoveryClient<AuthedChannel>,
    req: api::WatchDestination,
    tx: watch::Sender<Option<Resolution>>,
    logical: Arc<Logical>,
    state: Arc<WatchState>,
    lag: prometheus_client::metrics::histogram::Histogram,
    unreachable: Arc<Unreachable>,
) {
    let mut backoff = Backoff::default();
    // A call or stream failed: the answer in force dates from now, and stands
    // in for the controller's if the controller could not be reached.
    let failed = |e: &tonic::Status| {
        let away = away(e);
        if away {
            unreachable.set(true);
        }
        state.away.store(away, Ordering::Relaxed);
        let now = state.epoch.elapsed().as_millis() as u64;
        state.failing_since.fetch_min(now, Ordering::Relaxed);
        state.failures.fetch_add(1, Ordering::Relaxed);
        state.failed.notify_waiters();
    };
    // Views are ordered by arrival here, not by the controller's index version:
    // that restarts with the controller (and differs between replicas), so
    // after a reconnect every change would look older than the last one seen.
    // Counted on from the answer this watch started with, if any: stages
    // built from it must give way to the first view that arrives.
    let mut received: u64 = match &state.fallback {
        Some(Resolution::Service(v)) => v.version,
        _ => 0,
    };
    loop {
        match client().watch(req.clone()).await {
            Ok(rsp) => {
                let mut stream = rsp.into_inner();
                // A stream's first answer is the view as it stands, however
                // long ago it changed: only the changes after it are lag.
                let mut first = true;
                loop {
                    match stream.message().await {
                        Ok(Some(mut update)) => {
                            backoff.connected();
                            unreachable.set(false);
                            received += 1;
                            if let Some(api::destination_update::Kind::Service(s)) =
                                &mut update.kind
                            {
                                s.version = received;
                            }
                            state.away.store(false, Ordering::Relaxed);
                            // Against the answer in force, or else the one this
                            // watch started with: a refused part keeps its last good form.
                            let changed_at = match &update.kind {
                                Some(api::destination_update::Kind::Service(s)) => s.changed_at,
                                _ => None,
                            };
                            let parsed = {
                                let prev = tx.borrow();
                                parse(update, prev.as_ref().or(state.fallback.as_ref()))
                            };
                            let r = match parsed {
                                Ok(r) => r,
                                Err(e) => {
                                    // The answer in force is no longer the
                                    // controller's: it ages from now, as when a
                                    // stream fails.
                                    let now = state.epoch.elapsed().as_millis() as u64;
                                    state.failing_since.fetch_min(now, Ordering::Relaxed);
                                    warn!(destination = %req.destination, error = %e, "discovery sent an update that does not parse; keeping the last answer");
                                    continue;
                                }
                            };
                            state.failing_since.store(u64::MAX, Ordering::Relaxed);
                            if !std::mem::replace(&mut first, false)
                                && let Some(at) = changed_at
                                && let Ok(at) = std::time::SystemTime::try_from(at)
                            {
                                // Clocks apart by more than the lag read as zero.
                                let d = std::time::SystemTime::now()
                                    .duration_since(at)
                                    .unwrap_or_default();
                                lag.observe(d.as_secs_f64());
                            }
                            match &r {
                                Resolution::Service(s) => {
                                    debug!(destination = %req.destination, service = %s.name, backends = s.backends.len(), routes = s.routes.len(), "discovery update");
                                    logical.refresh(s);
                                }
                                Resolution::NotMeshed => logical.clear(received),
                            }
                            tx.send_replace(Some(r));
                        }
                        Ok(None) => {
                            info!(destination = %req.destination, "discovery stream ended; re-watching");
                            break;
                        }
                        Err(e) => {
                            failed(&e);
                            warn!(destination = %req.destination, error = %e.message(), "discovery stream failed; keeping the last answer");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                failed(&e);
                debug!(destination = %req.destination, error = %e.message(), "discovery unavailable; keeping the last answer");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Whether a failed call says the controller could not be reached (down,
/// restarting, the network), rather than that it answered and refused: only
/// then do remembered answers stand in for its own.
fn away(e: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        e.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use strait_api::v1::discovery_server::{Discovery as Serve, DiscoveryServer};

    /// Answers every watch with one Service of `n` meshed endpoints.
    struct Large(usize);

    type Updates = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<api::DestinationUpdate, tonic::Status>> + Send>,
    >;

    #[tonic::async_trait]
    impl Serve for Large {
        type WatchStream = Updates;
        async fn watch(
            &self,
            _: tonic::Request<api::WatchDestination>,
        ) -> Result<tonic::Response<Updates>, tonic::Status> {
            use futures_util::StreamExt;
            let s = futures_util::stream::once(std::future::ready(Ok(update(self.0))))
                .chain(futures_util::stream::pending());
            Ok(tonic::Response::new(Box::pin(s)))
        }
    }

    /// A Service of `n` meshed endpoints.
    fn update(n: usize) -> api::DestinationUpdate {
        let endpoints = (0..n)
            .map(|i| api::Endpoint {
                addr: Some(api::SocketAddress {
                    addr: format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255),
                }),
                proxy_port: 4143,
                identity: Some(api::WorkloadIdentity {
                    spiffe_id: "spiffe://cluster.local/ns/shop/sa/web".into(),
                }),
                weight: 1,
                zone: "europe-west1-b".into(),
            })
            .collect();
        api::DestinationUpdate {
            kind: Some(api::destination_update::Kind::Service(api::Service {
                name: "web.shop.svc.cluster.local:80".into(),
                backends: vec![api::Backend {
                    name: "web".into(),
                    endpoints,
                    policy: None,
                }],
                ..Default::default()
            })),
        }
    }

    /// Answers its first watch with three views in turn (1, 2, then 3
    /// endpoints); later ones it refuses (a controller restarting) until it
    /// is back up, then answers with 4 endpoints.
    struct Restarting(std::sync::atomic::AtomicUsize, Arc<AtomicBool>);

    #[tonic::async_trait]
    impl Serve for Restarting {
        type WatchStream = Updates;
        async fn watch(
            &self,
            _: tonic::Request<api::WatchDestination>,
        ) -> Result<tonic::Response<Updates>, tonic::Status> {
            use futures_util::StreamExt;
            let views = match self.0.fetch_add(1, Ordering::SeqCst) {
                0 => vec![update(1), update(2), update(3)],
                _ if !self.1.load(Ordering::SeqCst) => {
                    return Err(tonic::Status::unavailable("restarting"));
                }
                _ => vec![update(4)],
            };
            let s = futures_util::stream::iter(views.into_iter().map(Ok))
                .chain(futures_util::stream::pending());
            Ok(tonic::Response::new(Box::pin(s)))
        }
    }

    /// Answers the first watch with one endpoint and keeps it open; every
    /// later one as `Later` says.
    struct Once(std::sync::atomic::AtomicUsize, Later);

    #[derive(Clone, Copy, PartialEq)]
    enum Later {
        /// Unavailable: a controller gone.
        Gone,
        /// Never answered: a controller slow.
        Slow,
        /// Refused by a controller that is up (past this address's share).
        Refused,
    }

    #[tonic::async_trait]
    impl Serve for Once {
        type WatchStream = Updates;
        async fn watch(
            &self,
            _: tonic::Request<api::WatchDestination>,
        ) -> Result<tonic::Response<Updates>, tonic::Status> {
            if self.0.fetch_add(1, Ordering::SeqCst) > 0 {
                return match self.1 {
                    Later::Slow => Ok(tonic::Response::new(Box::pin(
                        futures_util::stream::pending(),
                    ))),
                    Later::Gone => Err(tonic::Status::unavailable("gone")),
                    Later::Refused => Err(tonic::Status::resource_exhausted("too many watches")),
                };
            }
            let Large(n) = Large(1);
            Large(n)
                .watch(tonic::Request::new(Default::default()))
                .await
        }
    }

    /// Answers the first watch with `.1` (a Service when true, else not
    /// meshed), then fails its stream, and every later call, with `.2`.
    struct Lost(Arc<std::sync::atomic::AtomicUsize>, bool, tonic::Code);

    #[tonic::async_trait]
    impl Serve for Lost {
        type WatchStream = Updates;
        async fn watch(
            &self,
            _: tonic::Request<api::WatchDestination>,
        ) -> Result<tonic::Response<Updates>, tonic::Status> {
            let failure = tonic::Status::new(self.2, "lost");
            if self.0.fetch_add(1, Ordering::SeqCst) > 0 {
                return Err(failure);
            }
            let first = if self.1 {
                update(1)
            } else {
                api::DestinationUpdate {
                    kind: Some(api::destination_update::Kind::NotMeshed(Default::default())),
                }
            };
            let s = futures_util::stream::iter([Ok(first), Err(failure)]);
            Ok(tonic::Response::new(Box::pin(s)))
        }
    }

    async fn discovery_of(svc: impl Serve) -> Arc<Discovery> {
        discovery_remembering(svc, MAX_REMEMBERED_AGE_MS).await
    }

    async fn discovery_remembering(svc: impl Serve, for_ms: u64) -> Arc<Discovery> {
        discovery_with(svc, for_ms, defaults::MAX_DISCOVERY_WATCHES).await
    }

    async fn discovery_with(svc: impl Serve, for_ms: u64, max_watches: usize) -> Arc<Discovery> {
        discovery_in(svc, for_ms, (max_watches, Vec::new())).await
    }

    async fn discovery_in(
        svc: impl Serve,
        for_ms: u64,
        watches_and_networks: (usize, Vec<IpNet>),
    ) -> Arc<Discovery> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DiscoveryServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let link = Link::new(&format!("http://{addr}"), None).unwrap();
        let workload = Workload {
            namespace: "shop".into(),
            pod: "client-0".into(),
            trust_domain: "cluster.local".into(),
            token_file: None,
        };
        let lag = prometheus_client::metrics::histogram::Histogram::new([1.0]);
        Discovery::remembering_for(
            link,
            workload,
            (lag, Default::default()),
            for_ms,
            watches_and_networks,
        )
    }

    fn service_of(r: Option<Resolved>) -> Option<Arc<super::super::view::ServiceView>> {
        match r? {
            Resolved {
                resolution: Resolution::Service(s),
                ..
            } => Some(s),
            _ => None,
        }
    }

    /// A destination used now and then (a job every few minutes) keeps its
    /// identity and routes through a controller outage: its watch, dropped
    /// idle, left its last answer.
    /// `--max-discovery-watches` bounds the destinations watched at once:
    /// the least recently used goes for a new one.
    #[tokio::test]
    async fn the_watch_cap_is_the_flag_s() {
        for (cap, watched) in [(3, 3), (1000, 4)] {
            let d = discovery_with(Large(1), MAX_REMEMBERED_AGE_MS, cap).await;
            for i in 1..=4 {
                let dest: DestAddr = format!("10.96.0.{i}:80").parse().unwrap();
                assert!(service_of(d.resolve(&dest, Duration::from_secs(10)).await).is_some());
            }
            assert_eq!(d.watched(), watched, "cap {cap}");
        }
    }

    /// Discovery is asked about addresses in `--discovery-networks` only,
    /// and never a link-local one: a connection to the internet or a
    /// cloud's metadata service passes through at once, whatever the
    /// controller's state, and takes no watch. Names always are.
    #[tokio::test]
    async fn only_addresses_in_the_discovery_networks_are_asked_about() {
        let networks = ["10.0.0.0/8", "::/0"].map(|n| n.parse().unwrap()).to_vec();
        let d = discovery_in(Large(1), MAX_REMEMBERED_AGE_MS, (1000, networks)).await;
        let asked = |dest: &str| {
            let d = d.clone();
            let dest: DestAddr = dest.parse().unwrap();
            async move { d.resolve(&dest, Duration::from_secs(10)).await.is_some() }
        };
        for outside in [
            "8.8.8.8:443",
            "169.254.169.254:80",
            "[fe80::1]:80",
            "[::ffff:8.8.4.4]:443",
        ] {
            assert!(!asked(outside).await, "{outside}");
        }
        assert_eq!(d.watched(), 0);
        for inside in [
            "10.96.0.1:80",
            "[2600:1f14::1]:443",
            "web.shop.svc.cluster.local:80",
        ] {
            assert!(asked(inside).await, "{inside}");
        }
        assert_eq!(d.watched(), 3);
    }

    #[tokio::test]
    async fn a_destination_used_again_while_the_controller_is_away_gets_its_last_answer() {
        let d = discovery_of(Once(Default::default(), Later::Gone)).await;
        let dest: DestAddr = "10.96.0.10:80".parse().unwrap();
        let first = service_of(d.resolve(&dest, Duration::from_secs(10)).await);
        assert_eq!(first.expect("answered").backends[0].endpoints.len(), 1);
        let idle = defaults::DISCOVERY_IDLE_TIMEOUT.as_millis() as u64;
        d.drop_idle(d.now_ms() + idle + 1);
        assert_eq!(d.watched(), 0);
        let again = service_of(d.resolve(&dest, Duration::from_millis(300)).await);
        assert_eq!(
            again.expect("its last answer").backends[0].endpoints.len(),
            1
        );
        // And so does every later request, without waiting again.
        let later = service_of(d.resolve(&dest, Duration::from_secs(10)).await);
        assert!(later.is_some());
    }

    /// The controller back for other watches, a watch still waiting to call
    /// it again keeps its last answer: passed through meanwhile, its traffic
    /// would lose mTLS and its routes for up to the watch's backoff.
    #[tokio::test]
    async fn a_last_answer_stands_in_until_its_own_watch_gets_through() {
        let d = discovery_of(Once(Default::default(), Later::Gone)).await;
        let dest: DestAddr = "10.96.0.10:80".parse().unwrap();
        assert!(service_of(d.resolve(&dest, Duration::from_secs(10)).await).is_some());
        let idle = defaults::DISCOVERY_IDLE_TIMEOUT.as_millis() as u64;
        d.drop_idle(d.now_ms() + idle + 1);
        assert!(service_of(d.resolve(&dest, Duration::from_millis(300)).await).is_some());
        // Another destination's watch got through.
        d.unreachable.set(false);
        let still = service_of(d.resolve(&dest, Duration::from_millis(300)).await);
        assert!(
            still.is_some(),
            "passed through before its watch got through"
        );
    }

    /// Once the controller is back, its first view replaces the last answer
    /// the watch started with: stages built from that answer (a later view's
    /// place is compared with theirs) would otherwise stay in force until
    /// the new watch had received as many views as the old one.
    #[tokio::test]
    async fn the_first_view_after_an_outage_is_newer_than_the_answer_it_replaces() {
        let up = Arc::new(AtomicBool::new(false));
        let d = discovery_of(Restarting(Default::default(), up.clone())).await;
        let dest: DestAddr = "10.96.0.10:80".parse().unwrap();
        let endpoints = |r: &Option<Resolution>| match r {
            Some(Resolution::Service(s)) => s.backends[0].endpoints.len(),
            _ => 0,
        };
        let (mut rx, _, _) = d.watch(&dest).unwrap();
        let third =
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|r| endpoints(r) == 3))
                .await
                .unwrap()
                .unwrap()
                .clone();
        let Some(Resolution::Service(third)) = third else {
            panic!()
        };
        let idle = defaults::DISCOVERY_IDLE_TIMEOUT.as_millis() as u64;
        d.drop_idle(d.now_ms() + idle + 1);
        // The controller refuses: the last answer stands in.
        let stand_in = service_of(d.resolve(&dest, Duration::from_millis(300)).await)
            .expect("the last answer");
        assert_eq!(stand_in.version, third.version);
        // It is back: its view is the newer one.
        up.store(true, Ordering::SeqCst);
        let (mut rx, _, _) = d.watch(&dest).unwrap();
        let live = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap()
            .clone();
        let Some(Resolution::Service(live)) = live else {
            panic!()
        };
        assert_eq!(live.backends[0].endpoints.len(), 4);
        assert!(
            live.version > stand_in.version,
            "live {} after the stand-in's {}",
            live.version,
            stand_in.version
        );
    }

    /// Not while the controller is only slow (its answer is on its way), nor
    /// once the answer is too old to trust.
    #[tokio::test]
    async fn a_last_answer_stands_in_only_for_an_absent_controller_and_not_for_long() {
        let d = discovery_of(Once(Default::default(), Later::Slow)).await;
        let dest: DestAddr = "10.96.0.10:80".parse().unwrap();
        assert!(service_of(d.resolve(&dest, Duration::from_secs(10)).await).is_some());
        let idle = defaults::DISCOVERY_IDLE_TIMEOUT.as_millis() as u64;
        d.drop_idle(d.now_ms() + idle + 1);
        let slow = d.resolve(&dest, Duration::from_millis(300)).await;
        assert!(slow.is_none(), "passed through");

        let d = discovery_remembering(Once(Default::default(), Later::Gone), 0).await;
        assert!(service_of(d.resolve(&dest, Duration::from_secs(10)).await).is_some());
        d.drop_idle(d.now_ms() + idle + 1);
        let old = d.resolve(&dest, Duration::from_millis(300)).await;
        assert!(old.is_none(), "too old: passed through");

        // Nor when the controller is up and refuses the watch: its word
        // stands, not an answer from before.
        let d = discovery_of(Once(Default::default(), Later::Refused)).await;
        assert!(service_of(d.resolve(&dest, Duration::from_secs(10)).await).is_some());
        d.drop_idle(d.now_ms() + idle + 1);
        let refused = d.resolve(&dest, Duration::from_millis(300)).await;
        assert!(refused.is_none(), "refused: passed through");
    }

    /// Only a meshed answer the controller cannot renew for being away is
    /// kept past idleness (and out of eviction): a watch holding "not meshed",
    /// or refused by a controller that is up, would otherwise hold its slot
    /// for ever, and enough of them would leave no slot for meshed
    /// destinations, passed through without mTLS.
    #[tokio::test]
    async fn only_a_meshed_answer_the_controller_cannot_renew_outlives_idleness() {
        use tonic::Code;
        let dest: DestAddr = "10.96.0.10:80".parse().unwrap();
        let idle = defaults::DISCOVERY_IDLE_TIMEOUT.as_millis() as u64;
        for (meshed, code, kept) in [
            (true, Code::Unavailable, true),
            (false, Code::Unavailable, false),
            (true, Code::ResourceExhausted, false),
            (true, Code::Unauthenticated, false),
        ] {
            let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let d = discovery_of(Lost(calls.clone(), meshed, code)).await;
            let (mut rx, _, _) = d.watch(&dest).unwrap();
            let answered = rx.wait_for(Option::is_some);
            tokio::time::timeout(Duration::from_secs(10), answered)
                .await
                .unwrap()
                .unwrap();
            // The stream's failure after its answer was taken in once the
            // watch is called again.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while calls.load(Ordering::SeqCst) < 2 {
                assert!(tokio::time::Instant::now() < deadline, "{meshed} {code:?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            d.drop_idle(d.now_ms() + idle + 1);
            assert_eq!(d.watched(), usize::from(kept), "{meshed} {code:?}");
        }
    }

    /// Remembered answers too old to stand in are let go, not held until the
    /// destination is used again.
    #[tokio::test]
    async fn answers_too_old_to_stand_in_are_forgotten() {
        let d = discovery_remembering(Once(Default::default(), Later::Gone), 1000).await;
        let dest: DestAddr = "10.96.0.10:80".parse().unwrap();
        assert!(service_of(d.resolve(&dest, Duration::from_secs(10)).await).is_some());
        let idle = defaults::DISCOVERY_IDLE_TIMEOUT.as_millis() as u64;
        let now = d.now_ms() + idle + 1;
        d.drop_idle(now);
        assert_eq!(d.remembered.lock().unwrap().len(), 1);
        d.drop_idle(now + 999);
        assert_eq!(d.remembered.lock().unwrap().len(), 1);
        d.drop_idle(now + 1000);
        assert_eq!(d.remembered.lock().unwrap().len(), 0);
    }

    /// While the controller is down (or refuses the watch), a destination
    /// with no answer to stand in (an external API's address, the cloud's
    /// metadata) passes through as soon as its watch's call fails, not after
    /// the whole wait: no answer is coming, and each new destination's first
    /// request would stall as long.
    #[tokio::test]
    async fn a_destination_passes_through_at_once_when_its_watch_fails() {
        for code in [tonic::Code::Unavailable, tonic::Code::PermissionDenied] {
            let failing = Arc::new(std::sync::atomic::AtomicUsize::new(1));
            let d = discovery_of(Lost(failing, false, code)).await;
            for dest in ["169.254.169.254:80", "203.0.113.7:443"] {
                let t = tokio::time::Instant::now();
                let r = d
                    .resolve(&dest.parse().unwrap(), Duration::from_secs(5))
                    .await;
                assert!(r.is_none(), "{code:?} {dest}");
                let took = t.elapsed();
                assert!(took < Duration::from_secs(2), "{code:?} {dest}: {took:?}");
            }
        }
    }

    /// While the controller is out of reach (any watch found it so), a new
    /// destination's first request waits only as long as a blip takes: its
    /// own watch's call queues behind every other watch's reconnect and
    /// would fail too late to end the wait, so every new destination (an
    /// external API's rotating addresses) would wait the whole 2 s.
    #[tokio::test]
    async fn a_new_destination_waits_briefly_while_the_controller_is_out_of_reach() {
        let d = discovery_of(Once(Default::default(), Later::Slow)).await;
        let first: DestAddr = "10.96.0.10:80".parse().unwrap();
        assert!(service_of(d.resolve(&first, Duration::from_secs(10)).await).is_some());
        d.unreachable.set(true);
        let t = tokio::time::Instant::now();
        let r = d
            .resolve(&"203.0.113.7:443".parse().unwrap(), Duration::from_secs(5))
            .await;
        assert!(r.is_none());
        let took = t.elapsed();
        assert!(
            took >= defaults::DISCOVERY_WAIT_WHILE_UNREACHABLE && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    /// The short wait is not cut short when the controller comes back during
    /// it: the destination's answer is then on its way, and a meshed
    /// destination passed through in plaintext would meet STRICT's refusal.
    #[tokio::test]
    async fn the_short_wait_goes_on_when_the_controller_comes_back_during_it() {
        let d = discovery_of(Delayed(Duration::from_millis(900))).await;
        d.unreachable.set(true);
        let back = {
            let d = d.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                d.unreachable.set(false);
            })
        };
        let r = d
            .resolve(&"10.96.0.10:80".parse().unwrap(), Duration::from_secs(2))
            .await;
        back.await.unwrap();
        assert!(service_of(r).is_some(), "answered after 0.9 s");
    }

    /// Answers every watch with a Service, after `0`.
    struct Delayed(Duration);

    #[tonic::async_trait]
    impl Serve for Delayed {
        type WatchStream = Updates;
        async fn watch(
            &self,
            _: tonic::Request<api::WatchDestination>,
        ) -> Result<tonic::Response<Updates>, tonic::Status> {
            tokio::time::sleep(self.0).await;
            use futures_util::StreamExt;
            let s = futures_util::stream::iter([Ok::<_, tonic::Status>(update(1))])
                .chain(futures_util::stream::pending());
            Ok(tonic::Response::new(Box::pin(s)))
        }
    }

    /// Fails the first watch, as a controller replica going away does, and
    /// answers every later one with a Service.
    struct Blip(Arc<std::sync::atomic::AtomicUsize>);

    #[tonic::async_trait]
    impl Serve for Blip {
        type WatchStream = Updates;
        async fn watch(
            &self,
            _: tonic::Request<api::WatchDestination>,
        ) -> Result<tonic::Response<Updates>, tonic::Status> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(tonic::Status::unavailable("going away"));
            }
            use futures_util::StreamExt;
            let s = futures_util::stream::iter([Ok::<_, tonic::Status>(update(1))])
                .chain(futures_util::stream::pending());
            Ok(tonic::Response::new(Box::pin(s)))
        }
    }

    /// One failed call is a blip the watch's retry gets past: a meshed
    /// destination's first request waits for that answer rather than passing
    /// through in plaintext (which a STRICT server refuses).
    #[tokio::test]
    async fn a_first_request_waits_past_one_failed_call() {
        let d = discovery_of(Blip(Default::default())).await;
        let dest: DestAddr = "10.96.0.10:80".parse().unwrap();
        let r = service_of(d.resolve(&dest, Duration::from_secs(5)).await);
        assert_eq!(
            r.expect("answered after the retry").backends[0]
                .endpoints
                .len(),
            1
        );
    }

    /// A watch made while the controller is unreachable, starting from a
    /// remembered answer, is stranded from the start: evicted before its
    /// first call failed, it would lose the answer's place to no purpose.
    #[tokio::test]
    async fn a_watch_made_during_an_outage_from_a_remembered_answer_is_kept() {
        let d = discovery_of(Once(Default::default(), Later::Gone)).await;
        let (first, other): (DestAddr, DestAddr) = (
            "10.96.0.10:80".parse().unwrap(),
            "10.96.0.11:80".parse().unwrap(),
        );
        assert!(service_of(d.resolve(&first, Duration::from_secs(10)).await).is_some());
        let idle = defaults::DISCOVERY_IDLE_TIMEOUT.as_millis() as u64;
        d.drop_idle(d.now_ms() + idle + 1);
        // The controller is found gone by another destination's watch.
        assert!(
            d.resolve(&other, Duration::from_millis(300))
                .await
                .is_none()
        );
        assert!(d.unreachable.get());
        assert_eq!(d.unreachable.gauge.get(), 1, "the gauge says so too");
        d.watch(&first).unwrap();
        let watches = d.watches.lock().unwrap();
        assert!(watches[&first].stranded(), "not kept before its first call");
    }

    /// A remembered answer passed from watch to watch keeps its age: a
    /// destination watched again and again does not keep an old answer alive.
    #[tokio::test]
    async fn a_remembered_answer_keeps_its_age_from_watch_to_watch() {
        let d = discovery_of(Once(Default::default(), Later::Slow)).await;
        let dest: DestAddr = "10.96.0.10:80".parse().unwrap();
        assert!(service_of(d.resolve(&dest, Duration::from_secs(10)).await).is_some());
        let idle = defaults::DISCOVERY_IDLE_TIMEOUT.as_millis() as u64;
        let then = d.now_ms() + idle + 1;
        d.drop_idle(then);
        // Watched again: the controller is slow, the watch has only the
        // remembered answer when it is dropped in turn.
        d.watch(&dest).unwrap();
        d.drop_idle(then + idle + 1);
        assert_eq!(d.watched(), 0);
        assert_eq!(d.remembered.lock().unwrap()[&dest].1, then);
    }

    /// A watch's own answer is remembered as of when its stream failed,
    /// not as of its drop: refused for hours while in use, it is not fresh.
    #[tokio::test]
    async fn an_answer_is_remembered_as_old_as_its_streams_failure() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let d = discovery_of(Lost(calls.clone(), true, tonic::Code::ResourceExhausted)).await;
        let dest: DestAddr = "10.96.0.10:80".parse().unwrap();
        assert!(service_of(d.resolve(&dest, Duration::from_secs(10)).await).is_some());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while calls.load(Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let failed_by = d.now_ms();
        let idle = defaults::DISCOVERY_IDLE_TIMEOUT.as_millis() as u64;
        d.drop_idle(failed_by + idle + 1);
        let at = d.remembered.lock().unwrap()[&dest].1;
        assert!(
            at <= failed_by,
            "remembered as of {at}, failed by {failed_by}"
        );
    }

    /// Answers with one endpoint, then with an update this proxy cannot
    /// read (a newer controller's kind), and keeps the stream open.
    struct Unreadable;

    #[tonic::async_trait]
    impl Serve for Unreadable {
        type WatchStream = Updates;
        async fn watch(
            &self,
            _: tonic::Request<api::WatchDestination>,
        ) -> Result<tonic::Response<Updates>, tonic::Status> {
            use futures_util::StreamExt;
            let views = [update(1), api::DestinationUpdate { kind: None }];
            let s = futures_util::stream::iter(views.into_iter().map(Ok))
                .chain(futures_util::stream::pending());
            Ok(tonic::Response::new(Box::pin(s)))
        }
    }

    /// An answer kept past an update that could not be read is no longer the
    /// controller's: remembered as of that update, not as fresh when dropped.
    #[tokio::test]
    async fn an_answer_kept_past_an_unreadable_update_ages_from_it() {
        let d = discovery_of(Unreadable).await;
        let dest: DestAddr = "10.96.0.10:80".parse().unwrap();
        assert!(service_of(d.resolve(&dest, Duration::from_secs(10)).await).is_some());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let refused = || {
            d.watches.lock().unwrap()[&dest]
                .state
                .failing_since
                .load(Ordering::Relaxed)
                != u64::MAX
        };
        while !refused() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the unreadable update left the answer fresh"
            );
            tokio::task::yield_now().await;
        }
        let refused_by = d.now_ms();
        let idle = defaults::DISCOVERY_IDLE_TIMEOUT.as_millis() as u64;
        d.drop_idle(refused_by + idle + 1);
        let at = d.remembered.lock().unwrap()[&dest].1;
        assert!(
            at <= refused_by,
            "remembered as of {at}, refused by {refused_by}"
        );
    }

    #[tokio::test]
    async fn a_service_past_grpcs_default_message_size_is_taken_whole() {
        const ENDPOINTS: usize = 60_000;
        let d = discovery_of(Large(ENDPOINTS)).await;
        let dest: DestAddr = "10.96.0.10:80".parse().unwrap();
        let r = d.resolve(&dest, Duration::from_secs(10)).await;
        let Some(Resolved {
            resolution: Resolution::Service(s),
            ..
        }) = r
        else {
            panic!("no view of the Service");
        };
        assert_eq!(s.backends[0].endpoints.len(), ENDPOINTS);
    }
}
