//! Retries, as a `tower::retry` policy: which responses are retried (a request
//! that never reached a backend, the route's statuses and gRPC codes), whether
//! the body can be sent again (`replay`), the route's budget, and the backoff.
//! A retry re-enters the backend split and the balancer, avoiding the endpoint
//! that just failed.

mod budget;
pub mod replay;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use prometheus_client::metrics::counter::Counter;

use crate::telemetry::metrics::OnFirstUse;
use rand::Rng;
use strait_api::v1 as api;
use tower::retry::budget::Budget;

pub use self::budget::RetryBudget;

pub use self::replay::{BodyEnd, NotReplayable, ReplayBody};
use crate::balance::{Avoid, Picked, ServedBy};
use crate::defaults;
use crate::http::BoxBody;
use crate::http::error::{RequestNotSent, Unsent};

/// A route's retry policy (Gateway API `retry`, GEP-1731).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub grpc_codes: Vec<u32>,
    /// The least wait before the first retry; it doubles with each (jittered
    /// up to twice itself).
    pub backoff: Duration,
}

impl RetryConfig {
    /// With no retry policy on a route, only requests that never reached a
    /// backend are retried: that is always safe, and a dead endpoint then costs
    /// a retry, not a failed request.
    pub fn connect_only() -> Self {
        RetryConfig {
            attempts: defaults::CONNECT_RETRIES,
            codes: Vec::new(),
            grpc_codes: Vec::new(),
            backoff: Duration::ZERO,
        }
    }

    /// Whether responses are retried (statuses, gRPC codes), not only requests
    /// that never reached a backend. Only then is a copy of each request kept:
    /// a request that never left comes back whole (`Unsent`).
    pub fn retries_responses(&self) -> bool {
        !self.codes.is_empty() || !self.grpc_codes.is_empty()
    }

    pub fn parse(r: Option<api::RetryPolicy>) -> Self {
        let Some(r) = r else {
            return Self::connect_only();
        };
        RetryConfig {
            attempts: r.attempts.min(defaults::MAX_RETRY_ATTEMPTS),
            codes: r
                .codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .filter(|c| (400..=599).contains(c))
                .collect(),
            grpc_codes: r.grpc_codes,
            backoff: r
                .backoff
                .and_then(|d| Duration::try_from(d).ok())
                .map_or(defaults::RETRY_BACKOFF, |d| {
                    d.min(defaults::MAX_RETRY_BACKOFF)
                }),
        }
    }
}

/// A retry budget's settings (`BackendPolicy.retryBudget`).
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetConfig {
    pub ratio: f32,
    pub min_per_second: u32,
    pub ttl: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: defaults::RETRY_BUDGET_RATIO,
            min_per_second: defaults::RETRY_BUDGET_MIN_PER_SECOND,
            ttl: defaults::RETRY_BUDGET_TTL,
        }
    }
}

impl BudgetConfig {
    /// Out-of-range values are clamped.
    pub fn parse(b: Option<api::RetryBudget>) -> Self {
        let Some(b) = b else {
            return Self::default();
        };
        let d = Self::default();
        BudgetConfig {
            ratio: if b.ratio.is_finite() {
                (b.ratio as f32).clamp(0.0, 1.0)
            } else {
                d.ratio
            },
            min_per_second: b
                .min_retries_per_second
                .min(defaults::MAX_RETRY_BUDGET_MIN_PER_SECOND),
            ttl: b
                .ttl
                .and_then(|t| Duration::try_from(t).ok())
                .map_or(d.ttl, |t| {
                    t.clamp(Duration::from_secs(1), Duration::from_secs(60))
                }),
        }
    }

    pub fn build(&self) -> RetryBudget {
        RetryBudget::new(self.ttl, self.min_per_second, self.ratio)
    }
}

/// Counters of one route's retries.
#[derive(Clone, Debug)]
pub struct RetryMetrics {
    pub retries: OnFirstUse<Counter>,
    pub budget_exhausted: OnFirstUse<Counter>,
    pub body_too_large: OnFirstUse<Counter>,
    pub body_unfinished: OnFirstUse<Counter>,
}

/// The retry policy of one request on one route.
#[derive(Clone)]
pub struct Policy {
    config: Arc<RetryConfig>,
    budget: Arc<RetryBudget>,
    metrics: RetryMetrics,
    /// Retries made so far for this request.
    retried: u32,
    deposited: bool,
    /// The route's request timeout, and when it ends for this request.
    timeout: Option<Duration>,
    deadline: Option<tokio::time::Instant>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("config", &self.config)
            .field("retried", &self.retried)
            .finish()
    }
}

impl Policy {
    pub fn new(config: Arc<RetryConfig>, budget: Arc<RetryBudget>, metrics: RetryMetrics) -> Self {
        Policy {
            config,
            budget,
            metrics,
            retried: 0,
            deposited: false,
            timeout: None,
            deadline: None,
        }
    }

    /// The route's request timeout (`timeouts.request`), which covers every
    /// attempt: a retry that could not start before it ends is not made.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether this response asks for another attempt.
    fn retryable(&self, grpc_call: bool, rsp: &Response<BoxBody>) -> bool {
        if rsp.extensions().get::<RequestNotSent>().is_some() {
            return true;
        }
        // A proxy's answer to what the request itself did (a bad Host, a
        // loop, a stalled body) would only come again.
        if rsp
            .extensions()
            .get::<crate::http::error::ClientFaulted>()
            .is_some()
        {
            return false;
        }
        if self.config.codes.contains(&rsp.status().as_u16()) {
            return true;
        }
        // Of a gRPC call only. A gRPC error without a body comes as a
        // trailers-only response: its status is in the headers. A proxy's
        // own server error counts as the code the app will get (a 503 is
        // UNAVAILABLE).
        grpc_call
            && !self.config.grpc_codes.is_empty()
            && crate::http::grpc::retry_code(rsp)
                .is_some_and(|c| self.config.grpc_codes.contains(&(c as u32)))
    }

    /// Exponential backoff with jitter above a floor: uniform in
    /// [base * 2^(n-1), base * 2^n] for the nth retry.
    /// `backoff` is the least wait between attempts (GEP-1731), so even the
    /// first retry waits that long; the jitter keeps clients that failed
    /// together from retrying together. Near the cap the range is
    /// [cap / 2, cap] (never below `backoff`), so it stays spread there too.
    fn backoff(&self, nth: u32) -> Duration {
        let base = self.config.backoff;
        if base.is_zero() {
            return Duration::ZERO;
        }
        let cap = defaults::MAX_RETRY_BACKOFF.max(base);
        let floor = base.saturating_mul(1 << nth.saturating_sub(1).min(16));
        let high = floor.saturating_mul(2).min(cap);
        let low = floor.min(high / 2).max(base);
        if low >= high {
            return high;
        }
        rand::rng().random_range(low..=high)
    }
}

impl<E> tower::retry::Policy<Request<ReplayBody>, Response<BoxBody>, E> for Policy {
    type Future = Backoff;

    fn retry(
        &mut self,
        req: &mut Request<ReplayBody>,
        result: &mut Result<Response<BoxBody>, E>,
    ) -> Option<Self::Future> {
        let rsp = result.as_ref().ok()?;
        let not_sent = rsp.extensions().get::<RequestNotSent>().is_some();
        // Requests never sent are retried whatever the route's attempts say.
        let attempts = if not_sent {
            self.config.attempts.max(defaults::CONNECT_RETRIES)
        } else {
            self.config.attempts
        };
        // The content type is read only where a route retries by gRPC code.
        let grpc_call = !self.config.grpc_codes.is_empty() && crate::http::grpc::is_call(req);
        if !self.retryable(grpc_call, rsp) || self.retried >= attempts {
            return None;
        }
        // With no copy kept, only a request that came back unsent can go
        // again: any other is no retry, and not its body's fault (its copy
        // was never asked for, so every body "overflows" it).
        if !self.config.retries_responses() && rsp.extensions().get::<Unsent>().is_none() {
            return None;
        }
        if let Err(why) = req.body().replayable(not_sent) {
            match why {
                NotReplayable::TooLarge => self.metrics.body_too_large.inc(),
                NotReplayable::Unfinished => self.metrics.body_unfinished.inc(),
            };
            return None;
        }
        if !self.config.retries_responses() {
            // No copy was kept (`clone_request`): the request is the one that
            // came back unsent. One that did not come back cannot be sent again.
            let head = rsp.extensions().get::<Unsent>()?.take()?;
            let body = req.body().again();
            *req = Request::from_parts(head, body);
        }
        let wait = self.backoff(self.retried + 1);
        // A retry that could not start before the request's timeout would
        // only turn this answer into a 504 at the deadline.
        if self
            .deadline
            .is_some_and(|d| tokio::time::Instant::now() + wait >= d)
        {
            return None;
        }
        let Some(paid) = self.budget.take() else {
            self.metrics.budget_exhausted.inc();
            return None;
        };
        // The retry tells the server what is left of the caller's deadline,
        // not the whole of it again.
        if let Some(d) = self.deadline
            && req
                .headers()
                .contains_key(crate::http::grpc::TIMEOUT_HEADER)
        {
            let left = d.saturating_duration_since(tokio::time::Instant::now() + wait);
            req.headers_mut().insert(
                crate::http::grpc::TIMEOUT_HEADER,
                crate::http::grpc::timeout_value(left),
            );
        }
        self.retried += 1;
        let notes = crate::telemetry::trace::notes(req).cloned();
        let served_by = rsp.extensions().get::<ServedBy>().map(|s| s.0);
        // A timed-out attempt's 504 was made above the balancer: its endpoint
        // is where the balancer noted it.
        let picked = || req.extensions().get::<Picked>().and_then(Picked::get);
        let failed_endpoint = served_by.or_else(picked);
        if let Some(ep) = failed_endpoint {
            match req.extensions_mut().get_mut::<Avoid>() {
                Some(a) => a.add(ep),
                None => {
                    req.extensions_mut().insert(Avoid(vec![ep]));
                }
            }
        }
        Some(Backoff {
            sleep: tokio::time::sleep(wait),
            pending: Some(Pending {
                retries: self.metrics.retries.clone(),
                notes,
                failed: (failed_endpoint, rsp.status().as_u16()),
                paid: Some((self.budget.clone(), paid)),
            }),
        })
    }

    fn clone_request(&mut self, req: &Request<ReplayBody>) -> Option<Request<ReplayBody>> {
        if !self.deposited {
            self.deposited = true;
            self.budget.deposit();
            // The sooner of the route's timeout and the caller's own gRPC
            // deadline: a retry the caller will not wait for is not made.
            let caller = crate::http::grpc::timeout(req.headers());
            self.deadline = match (self.timeout, caller) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
            .map(|t| tokio::time::Instant::now() + t);
        }
        // An upgrade hands the connection over: there is nothing to send again.
        if req.method() == http::Method::CONNECT || crate::http::upgrade::is_upgrade_request(req) {
            return None;
        }
        if !self.config.retries_responses() {
            // Only requests that never left are retried, and those come back
            // whole: nothing is copied but the handle on the body.
            return Some(Request::new(req.body().again()));
        }
        Some(Request::from_parts(
            crate::http::head_of(req),
            req.body().again(),
        ))
    }
}

pin_project_lite::pin_project! {
    /// The wait before a retry. The retry is counted (in metrics and on the
    /// request's span) once the wait is over and it goes: a request's
    /// timeout during the wait sends none, and gives its budget back.
    pub struct Backoff {
        #[pin]
        sleep: tokio::time::Sleep,
        pending: Option<Pending>,
    }
}

/// A retry decided and paid for, not yet sent.
struct Pending {
    retries: OnFirstUse<Counter>,
    notes: Option<crate::telemetry::trace::RequestNotes>,
    /// The failed attempt's endpoint and status, for the span.
    failed: (Option<std::net::SocketAddr>, u16),
    paid: Option<(Arc<RetryBudget>, budget::Withdrawal)>,
}

impl Pending {
    fn sent(mut self) {
        self.paid = None;
        self.retries.inc();
        if let Some(n) = &self.notes {
            n.retried(self.failed.0, self.failed.1);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some((budget, paid)) = self.paid.take() {
            budget.refund(paid);
        }
    }
}

impl std::future::Future for Backoff {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        std::task::ready!(this.sleep.poll(cx));
        if let Some(p) = this.pending.take() {
            p.sent();
        }
        std::task::Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32, codes: &[u16]) -> Policy {
        policy_for(RetryConfig {
            attempts,
            codes: codes.to_vec(),
            grpc_codes: vec![14],
            backoff: Duration::from_millis(10),
        })
    }

    fn policy_for(config: RetryConfig) -> Policy {
        let budget = BudgetConfig {
            ratio: 0.2,
            min_per_second: 0,
            ttl: Duration::from_secs(10),
        };
        Policy::new(
            Arc::new(config),
            Arc::new(budget.build()),
            RetryMetrics {
                retries: OnFirstUse::made(Counter::default()),
                budget_exhausted: OnFirstUse::made(Counter::default()),
                body_too_large: OnFirstUse::made(Counter::default()),
                body_unfinished: OnFirstUse::made(Counter::default()),
            },
        )
    }

    /// On a route that keeps no copy, a request its peer did not process
    /// but that did not come back (a peer's `not processed` 503) is no
    /// retry, and not counted as a body too large to replay: there was no
    /// copy to be too large for.
    #[tokio::test]
    async fn no_retry_without_a_copy_is_not_a_body_too_large() {
        use http_body_util::BodyExt;
        let p = policy_for(RetryConfig::connect_only());
        deposits_of_others(&p);
        let mut q = p.clone();
        let q: &mut Tower = &mut q;
        let mut body = ReplayBody::new(crate::http::full("ten bytes!"), 0);
        body.frame().await.unwrap().unwrap();
        let mut r = Request::new(body);
        let mut shed = rsp(503);
        if let Ok(rsp) = &mut shed {
            rsp.extensions_mut().insert(RequestNotSent);
        }
        assert!(q.retry(&mut r, &mut shed).is_none());
        assert_eq!(p.metrics.body_too_large.get().get(), 0);
    }

    fn req() -> Request<ReplayBody> {
        Request::new(ReplayBody::new(crate::http::empty(), 1024))
    }

    fn rsp(status: u16) -> Result<Response<BoxBody>, std::convert::Infallible> {
        let mut r = Response::new(crate::http::empty());
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        Ok(r)
    }

    type Tower = dyn tower::retry::Policy<
            Request<ReplayBody>,
            Response<BoxBody>,
            std::convert::Infallible,
            Future = Backoff,
        >;

    /// Ten other requests' deposits, for the budget to allow retries.
    fn deposits_of_others(p: &Policy) {
        for _ in 0..10 {
            let mut q = p.clone();
            let q: &mut Tower = &mut q;
            q.clone_request(&req());
        }
    }

    /// Each retry avoids every endpoint that failed the request so far, not
    /// the last only: two that fail fast would otherwise take every attempt
    /// in turn from a healthy one.
    #[tokio::test(start_paused = true)]
    async fn a_retry_avoids_every_endpoint_that_failed_the_request() {
        let p = policy(3, &[503]);
        deposits_of_others(&p);
        let mut p = p.clone();
        let p: &mut Tower = &mut p;
        let mut kept = p.clone_request(&req()).unwrap();
        let failed_by = |ep: std::net::SocketAddr| {
            let mut r = rsp(503);
            if let Ok(r) = &mut r {
                r.extensions_mut().insert(ServedBy(ep));
            }
            r
        };
        let (x, y) = (
            std::net::SocketAddr::from(([10, 0, 0, 1], 8080)),
            std::net::SocketAddr::from(([10, 0, 0, 2], 8080)),
        );
        for ep in [x, y, x] {
            assert!(p.retry(&mut kept, &mut failed_by(ep)).is_some());
            kept = p.clone_request(&kept).unwrap();
        }
        assert_eq!(
            kept.extensions().get::<Avoid>().map(|a| a.0.clone()),
            Some(vec![x, y])
        );
    }

    /// The 504 of a timed-out attempt is made above the balancer and names no
    /// endpoint: the retry avoids the one the balancer noted on the request.
    #[tokio::test(start_paused = true)]
    async fn a_retry_after_a_timeout_avoids_the_endpoint_that_timed_out() {
        let p = policy(2, &[504]);
        deposits_of_others(&p);
        let mut p = p.clone();
        let p: &mut Tower = &mut p;
        let mut sent = req();
        sent.extensions_mut().insert(Picked::default());
        let mut kept = p.clone_request(&sent).unwrap();
        // The balancer picks for the request it was sent; the kept copy shares
        // the note.
        let hung = std::net::SocketAddr::from(([10, 0, 0, 7], 8080));
        sent.extensions().get::<Picked>().unwrap().set(hung);
        let mut timed_out = rsp(504);
        if let Ok(r) = &mut timed_out {
            r.extensions_mut()
                .insert(crate::timeout::TimedOut(crate::timeout::Kind::Backend));
        }
        assert!(p.retry(&mut kept, &mut timed_out).is_some());
        assert_eq!(
            kept.extensions().get::<Avoid>().map(|a| a.0.clone()),
            Some(vec![hung])
        );
    }

    /// A retry counts when it goes, after its backoff: one whose wait the
    /// request's timeout cut short (its future dropped) never went, and
    /// gives back what it took of the budget.
    #[tokio::test(start_paused = true)]
    async fn a_retry_counts_once_its_backoff_is_over() {
        let p = policy(3, &[503]);
        deposits_of_others(&p);
        let mut q = p.clone();
        let q: &mut Tower = &mut q;
        let mut r = q.clone_request(&req()).unwrap();
        let cut_short = q.retry(&mut r, &mut rsp(503)).expect("a retry");
        drop(cut_short);
        assert_eq!(p.metrics.retries.get().get(), 0);
        let waited = q.retry(&mut r, &mut rsp(503)).expect("a retry");
        let t = tokio::time::Instant::now();
        waited.await;
        assert!(t.elapsed() >= Duration::from_millis(5), "backed off");
        assert_eq!(p.metrics.retries.get().get(), 1);
        // 11 requests at 20 % pay for 2 retries: the one cut short was not
        // one of them.
        let last = q
            .retry(&mut r, &mut rsp(503))
            .expect("the budget's second retry");
        last.await;
        assert_eq!(p.metrics.retries.get().get(), 2);
        assert_eq!(p.metrics.budget_exhausted.get().get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_when_the_budget_is_spent() {
        let p = policy(3, &[503]);
        // Retries waiting out their backoff: none has given its share back.
        let mut waiting = Vec::new();
        for _ in 0..100 {
            let mut p = p.clone();
            let p: &mut Tower = &mut p;
            let mut r = p.clone_request(&req()).unwrap();
            waiting.extend(p.retry(&mut r, &mut rsp(503)));
        }
        let allowed = waiting.len();
        // 20 % of 100 requests.
        assert!((18..=22).contains(&allowed), "{allowed} retries allowed");
        assert_eq!(p.metrics.retries.get().get(), 0, "none sent yet");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_budget() {
        let p = policy(3, &[503]);
        let mut allowed = 0;
        let mut waiting = Vec::new();
        for _ in 0..100 {
            let mut batch: Vec<(Policy, Request<ReplayBody>)> = (0..8)
                .map(|_| {
                    let mut p = p.clone();
                    let r = {
                        let t: &mut Tower = &mut p;
                        t.clone_request(&req()).unwrap()
                    };
                    (p, r)
                })
                .collect();
            tokio::time::advance(Duration::from_millis(1)).await;
            for (p, r) in &mut batch {
                let t: &mut Tower = p;
                while let Some(backoff) = t.retry(r, &mut rsp(503)) {
                    waiting.push(backoff);
                    allowed += 1;
                }
            }
        }
        assert!(
            (150..=170).contains(&allowed),
            "{allowed} retries of 800 requests"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_routes_statuses_and_grpc_codes_are_retried() {
        let p = policy(3, &[503]);
        let mut ok = rsp(200).unwrap();
        assert!(!p.retryable(true, &ok));
        ok.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("14"));
        assert!(p.retryable(true, &ok));
        assert!(!p.retryable(false, &ok), "gRPC codes of gRPC calls only");
        assert!(p.retryable(false, &rsp(503).unwrap()));
        assert!(!p.retryable(false, &rsp(500).unwrap()));
        let mut refused = rsp(502).unwrap();
        refused.extensions_mut().insert(RequestNotSent);
        assert!(p.retryable(false, &refused));
        // A proxy's own server error (this one's, or relayed) is the
        // UNAVAILABLE the app will get; an app's bare 502 is left to the
        // route's HTTP codes, and so is every request but a gRPC call.
        let p = policy(3, &[]);
        assert!(!p.retryable(true, &rsp(502).unwrap()));
        let proxys = || {
            crate::http::error::error_response(
                "connect",
                http::StatusCode::BAD_GATEWAY,
                "connect to 10.0.0.7:8080 failed: refused",
            )
        };
        assert!(p.retryable(true, &proxys()));
        assert!(!p.retryable(false, &proxys()));
        // Not what the caller's own request caused.
        let mut bad = proxys();
        bad.extensions_mut()
            .insert(crate::http::error::ClientFaulted);
        assert!(!p.retryable(true, &bad));
        let mut bad = rsp(400).unwrap();
        bad.extensions_mut()
            .insert(crate::http::error::ClientFaulted);
        assert!(
            !policy(3, &[400]).retryable(false, &bad),
            "whatever the codes"
        );
        let relayed_loop = crate::http::error::error_response(
            "loop",
            http::StatusCode::BAD_REQUEST,
            "request loop: 10.0.0.7:4143 is this proxy",
        );
        let p13 = policy_for(RetryConfig {
            attempts: 3,
            codes: Vec::new(),
            grpc_codes: vec![13],
            backoff: Duration::from_millis(10),
        });
        assert!(!p13.retryable(true, &relayed_loop));
        let mut timeout = crate::http::error::error_response(
            "request_timeout",
            http::StatusCode::GATEWAY_TIMEOUT,
            "request timeout",
        );
        timeout
            .extensions_mut()
            .insert(crate::http::grpc::DEADLINE_EXCEEDED);
        assert!(
            !p.retryable(true, &timeout),
            "DEADLINE_EXCEEDED is not listed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_never_sent_are_retried_even_with_no_attempts() {
        let mut p = policy(0, &[]);
        let t: &mut Tower = &mut p;
        let mut r = t.clone_request(&req()).expect("a clone to retry with");
        let mut refused = rsp(502);
        if let Ok(rsp) = &mut refused {
            rsp.extensions_mut().insert(RequestNotSent);
        }
        // The budget's floor is 0 in this policy: fill it first.
        for _ in 0..20 {
            p.budget.deposit();
        }
        let t: &mut Tower = &mut p;
        assert!(t.retry(&mut r, &mut refused).is_some());
        assert!(
            t.retry(&mut r, &mut rsp(503)).is_none(),
            "statuses need attempts"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_copy_kept_a_request_is_sent_again_as_handed_back() {
        let mut p = policy_for(RetryConfig::connect_only());
        for _ in 0..20 {
            p.budget.deposit();
        }
        let mut original = req();
        *original.uri_mut() = http::Uri::from_static("/orders?id=7");
        original
            .headers_mut()
            .insert("x-app", http::HeaderValue::from_static("kept"));
        let t: &mut Tower = &mut p;
        let mut kept = t.clone_request(&original).expect("a handle to retry with");
        assert!(kept.headers().is_empty(), "nothing copied up front");
        // The forwarder could not connect and handed the request back.
        let (head, _) = original.into_parts();
        let mut refused = rsp(502);
        if let Ok(rsp) = &mut refused {
            rsp.extensions_mut().insert(RequestNotSent);
            rsp.extensions_mut().insert(Unsent::new(head));
        }
        assert!(t.retry(&mut kept, &mut refused).is_some());
        assert_eq!(kept.uri(), "/orders?id=7");
        assert_eq!(kept.headers()["x-app"], "kept");
        // Not handed back: there is nothing whole to send again.
        let mut lost = rsp(502);
        if let Ok(rsp) = &mut lost {
            rsp.extensions_mut().insert(RequestNotSent);
        }
        let mut kept = t.clone_request(&kept).expect("a handle to retry with");
        assert!(t.retry(&mut kept, &mut lost).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_from_its_floor_and_stays_under_its_cap() {
        let p = policy(10, &[503]);
        for n in 1..=12 {
            let b = p.backoff(n);
            let floor =
                (Duration::from_millis(10) * (1 << (n - 1))).min(defaults::MAX_RETRY_BACKOFF);
            // Near the cap the range is its upper half.
            let low = floor.min(defaults::MAX_RETRY_BACKOFF / 2);
            assert!(b >= low && b <= floor * 2, "{n}: {b:?}");
            assert!(b <= defaults::MAX_RETRY_BACKOFF, "{n}: {b:?}");
        }
    }

    /// At the cap the wait is still spread: clients that failed together at
    /// their tenth retry do not all come back in the same instant.
    #[tokio::test(start_paused = true)]
    async fn backoff_at_its_cap_is_still_jittered() {
        let p = policy(20, &[503]);
        let waits: std::collections::BTreeSet<Duration> = (0..50).map(|_| p.backoff(15)).collect();
        assert!(waits.len() > 1, "every wait at the cap was {waits:?}");
        let cap = defaults::MAX_RETRY_BACKOFF;
        assert!(
            waits.iter().all(|w| *w >= cap / 2 && *w <= cap),
            "{waits:?}"
        );
    }

    /// A gRPC caller's own deadline (`grpc-timeout`) bounds retries as the
    /// route's timeout does: none that could not start before it, and the
    /// one made says what is left of it.
    #[tokio::test(start_paused = true)]
    async fn a_grpc_caller_s_deadline_bounds_retries() {
        let config = |backoff| RetryConfig {
            attempts: 3,
            codes: vec![503],
            grpc_codes: Vec::new(),
            backoff,
        };
        let call = |timeout: &str| {
            let mut r = req();
            r.headers_mut()
                .insert("grpc-timeout", timeout.parse().unwrap());
            r
        };
        // 50 ms left, a 100 ms backoff: no retry.
        let mut p = policy_for(config(Duration::from_millis(100)));
        deposits_of_others(&p);
        let t: &mut Tower = &mut p;
        let mut r = call("50m");
        t.clone_request(&r);
        assert!(t.retry(&mut r, &mut rsp(503)).is_none());
        // 2 s left, a 100 ms backoff at most 200: a retry, told what is left.
        let mut p = policy_for(config(Duration::from_millis(100)));
        deposits_of_others(&p);
        let t: &mut Tower = &mut p;
        let mut r = call("2S");
        t.clone_request(&r);
        assert!(t.retry(&mut r, &mut rsp(503)).is_some());
        let left = crate::http::grpc::timeout(r.headers()).unwrap();
        assert!(
            left >= Duration::from_millis(1799) && left <= Duration::from_millis(1900),
            "{left:?}"
        );
    }

    /// A retry whose backoff would outlast the request's timeout is not
    /// made: the caller gets the failure it would have waited for, at once,
    /// not a 504 at the deadline that hides it.
    #[tokio::test(start_paused = true)]
    async fn a_retry_that_cannot_start_before_the_deadline_is_not_made() {
        use tower::{Service, ServiceExt};
        let config = RetryConfig {
            attempts: 3,
            codes: vec![503],
            grpc_codes: Vec::new(),
            backoff: Duration::from_millis(200),
        };
        let p = policy_for(config).with_timeout(Some(Duration::from_millis(150)));
        deposits_of_others(&p);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let backend = {
            let calls = calls.clone();
            tower::service_fn(move |_: Request<ReplayBody>| {
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async { rsp(503) }
            })
        };
        let retry = tower::retry::Retry::new(p, backend);
        let mut svc = tower::Layer::layer(
            &crate::timeout::TimeoutLayer::new(
                Some(Duration::from_millis(150)),
                crate::timeout::Kind::Request,
                OnFirstUse::made(Counter::default()),
            ),
            retry,
        );
        let start = tokio::time::Instant::now();
        let answer = svc.ready().await.unwrap().call(req()).await.unwrap();
        assert_eq!(answer.status(), 503, "{:?}", answer.headers());
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
