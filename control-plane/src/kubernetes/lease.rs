//! Which replica writes status: the holder of a `coordination.k8s.io/v1` Lease.
//! Every replica serves proxies; only the leader writes, so replicas never
//! fight over an object's status. A leader that cannot renew in time stops
//! writing at once, before any other replica may take the lease over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub const LEASE_NAME: &str = "strait-controller";

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    /// This replica's name (its pod's), recorded as the holder.
    pub identity: String,
    /// How long a holder's lease lasts without renewal; others take over after.
    pub duration: Duration,
}

/// Runs the election until `stop`, saying on `leader` whether this replica
/// holds the lease; stopped, it stops writing and gives the lease up.
pub async fn elect(
    client: kube::Client,
    cfg: LeaseConfig,
    mut ready: watch::Receiver<bool>,
    leader: watch::Sender<bool>,
    stop: tokio_util::sync::CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let renew_every = cfg.duration / 3;
    // As the Lease records it, in whole seconds: followers wait that long.
    let recorded = Duration::from_secs(cfg.duration.as_secs());
    // Until when our hold is certain: the last successful renewal plus the
    // duration, less a margin for clocks and the request's own time.
    let mut held_until: Option<Instant> = None;
    let mut seen = Seen::default();
    // An API server out of reach would otherwise be a warning every renewal.
    let mut failing = strait_otel::sampled::FailureRun::default();
    let run = async {
        // Not before this replica's index is whole: one whose lists never
        // complete (RBAC missing one kind) has no statuses to write, and
        // holding the lease it would keep the ready replicas from writing.
        if ready.wait_for(|r| *r).await.is_err() {
            std::future::pending::<()>().await;
        }
        loop {
            let started = Instant::now();
            // A hold that ran out while this replica slept (a renewal failed
            // and nothing else happened) ends before the next attempt, which
            // may hang.
            if held_until.is_some_and(|t| started >= t)
                && leader.send_if_modified(|l| std::mem::replace(l, false))
            {
                info!(identity = %cfg.identity, leader = false, "status writer election");
            }
            // An attempt that hangs (a dead pooled connection) is not waited
            // for past the hold: writing stops then, before a follower may
            // take over, whatever the attempt comes to.
            let deadline = match held_until {
                Some(t) if t > started => (started + renew_every).min(t),
                _ => started + renew_every,
            };
            let outcome = tokio::time::timeout_at(deadline, attempt(&api, &cfg, &mut seen)).await;
            let failure = match outcome {
                Ok(Ok(true)) => {
                    held_until = Some(started + recorded - recorded / 4);
                    None
                }
                Ok(Ok(false)) => {
                    held_until = None;
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("timed out".to_string()),
            };
            match failure {
                Some(error) if failing.failed(&error) => {
                    warn!(%error, failures = failing.failures(), "lease renewal failed");
                }
                Some(error) => {
                    debug!(%error, failures = failing.failures(), "lease renewal failed");
                }
                None => {
                    let failures = failing.succeeded();
                    if failures > 0 {
                        info!(failures, "lease renewal succeeded after failing");
                    }
                }
            }
            let holds = held_until.is_some_and(|t| Instant::now() < t);
            if leader.send_if_modified(|l| std::mem::replace(l, holds) != holds) {
                info!(identity = %cfg.identity, leader = holds, "status writer election");
            }
            // Wake up to renew, or at the latest when the hold runs out.
            let next = started + renew_every;
            let wake = match held_until {
                Some(t) if holds => next.min(t),
                _ => next,
            };
            tokio::time::sleep_until(wake).await;
        }
    };
    // Stopped, even mid-attempt (a slow API server): writing stops, and the
    // lease is given up whether or not that attempt won it (`release`
    // checks that it is ours).
    tokio::select! {
        () = stop.cancelled() => {}
        () = run => {}
    }
    leader.send_replace(false);
    release(&api, &cfg).await;
}

/// Gives the lease up, as client-go's elections do on a clean stop: without
/// a holder, another replica takes it at its next attempt instead of waiting
/// for the lease's duration to pass. Only if it is still ours (the resource
/// version makes the write a compare-and-swap).
async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    let Ok(Some(mut lease)) = api.get_opt(LEASE_NAME).await else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => info!(identity = %cfg.identity, "status writer's lease given up"),
        Err(e) => warn!(error = %e, "could not give the status writer's lease up"),
    }
}

/// The other holder's lease as last read, and when (on this replica's clock):
/// it is judged expired when it has not changed for its duration as this
/// replica measures it, so the clocks of replicas need not agree.
#[derive(Default)]
struct Seen {
    last: Option<(Option<String>, Option<MicroTime>)>,
    since: Option<Instant>,
}

/// Takes or renews the lease; `Ok(false)` when another replica holds it.
async fn attempt(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    seen: &mut Seen,
) -> Result<bool, kube::Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let seconds = i32::try_from(cfg.duration.as_secs()).unwrap_or(i32::MAX);
    let current = match api.get_opt(LEASE_NAME).await? {
        Some(l) => l,
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        }
    };
    let spec = current.spec.clone().unwrap_or_default();
    let ours = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
    let state = (spec.holder_identity.clone(), spec.renew_time.clone());
    if seen.last.as_ref() != Some(&state) {
        seen.last = Some(state);
        seen.since = Some(Instant::now());
    }
    let duration = Duration::from_secs(
        spec.lease_duration_seconds
            .unwrap_or(0)
            .max(0)
            .unsigned_abs()
            .into(),
    );
    let expired =
        spec.holder_identity.is_none() || seen.since.is_none_or(|t| t.elapsed() > duration);
    if !ours && !expired {
        return Ok(false);
    }
    let mut next = current;
    let s = next.spec.get_or_insert_with(LeaseSpec::default);
    if !ours {
        s.holder_identity = Some(cfg.identity.clone());
        s.acquire_time = Some(now.clone());
        s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
    }
    s.renew_time = Some(now);
    s.lease_duration_seconds = Some(seconds);
    // The resourceVersion we read makes this a compare-and-swap: a replica
    // that lost a race gets 409 and stays a follower.
    match api.replace(LEASE_NAME, &PostParams::default(), &next).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const NOT_FOUND: &str =
        r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
    const CREATED: &str = r#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"strait-controller","namespace":"s","resourceVersion":"1"},"spec":{"holderIdentity":"a","leaseDurationSeconds":15}}"#;
    const FAILED: &str = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"InternalError","code":500}"#;

    /// An election of replica `a` for a 15 s lease against an API server
    /// that finds no lease, creates it (ours), answers the next `failing`
    /// requests with 500 and never answers any after. Returns the leader
    /// flag, the count of requests, the start, and the election's stop.
    fn elected_then(
        failing: usize,
    ) -> (
        watch::Receiver<bool>,
        Arc<std::sync::atomic::AtomicUsize>,
        Instant,
        tokio_util::sync::CancellationToken,
    ) {
        elected_once_ready(failing, watch::channel(true).1)
    }

    fn elected_once_ready(
        failing: usize,
        ready: watch::Receiver<bool>,
    ) -> (
        watch::Receiver<bool>,
        Arc<std::sync::atomic::AtomicUsize>,
        Instant,
        tokio_util::sync::CancellationToken,
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let api = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let method = req.method().clone();
            async move {
                let (status, body) = match (n, method) {
                    (0, _) => (404, NOT_FOUND),
                    (1, http::Method::POST) => (201, CREATED),
                    (n, _) if n < 2 + failing => (500, FAILED),
                    _ => std::future::pending().await,
                };
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body.as_bytes().to_vec()))
            }
        });
        let client = kube::Client::new(api, "s");
        let (tx, rx) = watch::channel(false);
        let stop = tokio_util::sync::CancellationToken::new();
        let cfg = LeaseConfig {
            namespace: "s".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
        };
        let start = Instant::now();
        tokio::spawn(elect(client, cfg, ready, tx, stop.clone()));
        (rx, calls, start, stop)
    }

    /// A replica whose index is not whole yet (a list that never completes)
    /// does not campaign, so it cannot hold the lease from ready replicas
    /// with nothing to write; once whole, it does.
    #[tokio::test(start_paused = true)]
    async fn a_replica_not_ready_does_not_campaign() {
        let (ready_tx, ready) = watch::channel(false);
        let (rx, calls, _, stop) = elected_once_ready(0, ready);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(!*rx.borrow());
        ready_tx.send_replace(true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(*rx.borrow(), "the leader once ready");
        stop.cancel();
    }

    /// A leader whose renewal hangs (a dead pooled connection) stops writing
    /// when its hold ends, three quarters of the lease in, not when the
    /// hanging attempt gives up: a follower may take over at the full lease.
    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewal_hangs_stops_writing_when_its_hold_ends() {
        let (rx, _, start, stop) = elected_then(0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(*rx.borrow(), "the leader after creating the lease");
        // Held until 11.25 s; followers may take over from 15 s.
        tokio::time::sleep_until(start + Duration::from_millis(11_500)).await;
        assert!(!*rx.borrow(), "still writing past its hold");
        stop.cancel();
    }

    /// A leader whose renewals fail at once keeps writing until its hold
    /// ends, not through the next attempt, which may hang: it stops when the
    /// hold runs out while it sleeps.
    #[tokio::test(start_paused = true)]
    async fn a_hold_that_runs_out_between_attempts_ends_before_the_next() {
        let (rx, calls, start, stop) = elected_then(2);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(*rx.borrow(), "the leader after creating the lease");
        // Renewals at 5 s and 10 s fail at once; the one at 11.25 s hangs.
        tokio::time::sleep_until(start + Duration::from_millis(10_500)).await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert!(*rx.borrow(), "still within its hold (11.25 s)");
        tokio::time::sleep_until(start + Duration::from_millis(11_500)).await;
        assert!(!*rx.borrow(), "still writing past its hold");
        stop.cancel();
    }
}
