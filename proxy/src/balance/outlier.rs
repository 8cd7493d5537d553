//! Outlier ejection (circuit breaking) per endpoint: consecutive failures eject
//! it for a while; when the while is over one request probes it (half-open); a
//! success re-admits it, a failure ejects it again for twice as long.

use std::time::Duration;

use strait_api::v1 as api;
use tokio::time::Instant;

use crate::defaults;

#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// 0: never eject.
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: defaults::BREAKER_CONSECUTIVE_FAILURES,
            base_ejection: defaults::BREAKER_BASE_EJECTION,
            max_ejection: defaults::BREAKER_MAX_EJECTION,
            max_ejected_percent: defaults::BREAKER_MAX_EJECTED_PERCENT,
        }
    }
}

impl BreakerConfig {
    pub fn parse(c: Option<api::CircuitBreaker>) -> Self {
        let d = Self::default();
        let Some(c) = c else { return d };
        let dur = |x: Option<prost_types::Duration>, or: Duration| {
            x.and_then(|x| Duration::try_from(x).ok())
                .filter(|x| !x.is_zero())
                .map_or(or, |x| x.min(defaults::MAX_DURATION_FLAG))
        };
        let base_ejection = dur(c.base_ejection_time, d.base_ejection);
        BreakerConfig {
            consecutive_failures: c.consecutive_failures,
            base_ejection,
            max_ejection: dur(c.max_ejection_time, d.max_ejection).max(base_ejection),
            max_ejected_percent: if c.max_ejection_percent == 0 {
                d.max_ejected_percent
            } else {
                c.max_ejection_percent.min(100)
            },
        }
    }

    /// How many of `n` endpoints may be ejected at once: one at least when
    /// there are two, as Envoy does, or a small percentage (Istio's 10 on
    /// fewer than ten endpoints) would turn the breaker off unseen.
    pub fn cap(&self, n: usize) -> usize {
        if n < 2 {
            return 0;
        }
        (n * self.max_ejected_percent as usize / 100).max(1)
    }
}

/// What the breaker knows of one endpoint.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive: u32,
    /// Every failure of the current run was a failure to connect.
    only_unreachable: bool,
    ejected_until: Option<Instant>,
    /// Ejections in a row without a successful probe: the next lasts 2^n times
    /// the base.
    ejections: u32,
    /// A probe request is in flight.
    probing: bool,
    /// Probes started so far: a probe that ends without a verdict (cancelled)
    /// frees the slot only if it is still the current one.
    probes: u64,
    /// Until then the balancer takes any other endpoint first: it failed
    /// fast (refused, or answered a failure the breaker could not act on,
    /// or shed load), which a latency estimate alone would read as cheap.
    avoid_until: Option<Instant>,
    /// When it was last passed over: only a success sent since ends that.
    avoided_at: Option<Instant>,
    /// Times avoided since its last success: each time twice as long.
    avoided: u32,
}

/// What failed: an answer (a server error, a timeout), or the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failed {
    Answer,
    Unreachable,
}

/// Whether an endpoint may take a request now, and as what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// It may, but any endpoint not failing goes first.
    Failing,
    /// Its ejection is over: this request is the probe.
    Probe,
    No,
}

impl Outlier {
    pub fn admit(&self, now: Instant) -> Admit {
        match self.ejected_until {
            None if self.avoid_until.is_some_and(|u| now < u) => Admit::Failing,
            None => Admit::Yes,
            Some(_) if self.probing => Admit::No,
            // Not while it sheds load: its probe's 429 decided nothing, and
            // probing again at once would send it every request drawn.
            Some(until) if now >= until && !self.is_avoided(now) => Admit::Probe,
            Some(_) => Admit::No,
        }
    }

    /// Marks the probe started; returns its number, for `abandon_probe`.
    pub fn start_probe(&mut self) -> u64 {
        self.probing = true;
        self.probes += 1;
        self.probes
    }

    /// The probe ended without a verdict (its request was cancelled or timed
    /// out in a layer above): the next request probes again, or the endpoint
    /// would stay ejected for ever.
    pub fn abandon_probe(&mut self, probe: u64) {
        if self.probing && self.probes == probe {
            self.probing = false;
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// Failures since the last success (or ejection), counted whether or not
    /// the breaker may act on them.
    pub fn failures_in_a_row(&self) -> u32 {
        self.consecutive
    }

    /// Whether `probe` is the probe in flight now: only its outcome decides
    /// an ejected endpoint's fate (requests sent before the ejection may still
    /// come back).
    fn is_current(&self, probe: Option<u64>) -> bool {
        self.probing && probe == Some(self.probes)
    }

    /// Failed fast: passed over while others work, for 1 s, then twice as
    /// long each time until a success (so that it is tried again now and
    /// then, and found when it recovers, but at a rate of its own rather than
    /// whenever the others cost more than its penalty).
    pub fn avoid(&mut self, now: Instant, probe: Option<u64>) {
        // Failures of requests sent before it was passed over (a burst in
        // flight together) are one failure, not one doubling each; and late
        // answers of an ejected endpoint's requests change nothing, as they
        // do not for the breaker: only its probe's does.
        if self.is_avoided(now) || (self.ejected_until.is_some() && !self.is_current(probe)) {
            return;
        }
        let d = defaults::BALANCER_FAILURE_PENALTY.saturating_mul(1 << self.avoided.min(5));
        self.avoid_until = Some(now + d);
        self.avoided_at = Some(now);
        self.avoided = self.avoided.saturating_add(1);
    }

    /// Whether it is passed over now (`avoid`).
    pub fn is_avoided(&self, now: Instant) -> bool {
        self.avoid_until.is_some_and(|u| now < u)
    }

    /// Records a success of a request sent at `sent`; returns true when it
    /// re-admits the endpoint.
    pub fn success(&mut self, probe: Option<u64>, sent: Instant) -> bool {
        self.consecutive = 0;
        if self.is_current(probe) {
            // The probe passed: back in rotation, with a clean record.
            self.ejected_until = None;
            self.ejections = 0;
            self.probing = false;
            self.avoid_until = None;
            self.avoided = 0;
            return true;
        }
        // Not by a request sent before it was passed over: an endpoint
        // shedding load answers some of those it holds well, and one of them
        // would end the passing over within milliseconds, as would an
        // endpoint refusing connections some of the time.
        if self.ejected_until.is_none() && self.avoided_at.is_none_or(|at| sent > at) {
            self.avoid_until = None;
            self.avoided = 0;
        }
        false
    }

    /// Records a failure; returns true when it ejects the endpoint.
    /// `may_eject` says whether the backend's cap leaves room for one more.
    pub fn failure(
        &mut self,
        config: &BreakerConfig,
        now: Instant,
        may_eject: bool,
        probe: Option<u64>,
    ) -> bool {
        self.failure_as(config, now, may_eject, probe, Failed::Answer)
    }

    /// A connection to the endpoint was made: a run of failures to connect
    /// is over. One that holds failed answers is not: a connect says nothing
    /// of those (the peer's proxy may be up, its app answering 503).
    pub fn reachable(&mut self) {
        if self.only_unreachable {
            self.consecutive = 0;
        }
    }

    /// As `failure`, saying what failed.
    pub fn failure_as(
        &mut self,
        config: &BreakerConfig,
        now: Instant,
        may_eject: bool,
        probe: Option<u64>,
        kind: Failed,
    ) -> bool {
        if self.is_current(probe) {
            self.probing = false;
            // The breaker switched off meanwhile: in again for good.
            if config.consecutive_failures == 0 {
                let _ = self.readmit();
                return false;
            }
            // No room under the cap (the backend shrank, or the cap was
            // lowered, since it went out): back in rotation, its record kept
            // for its next ejection.
            if !may_eject {
                self.ejected_until = None;
                self.consecutive = 0;
                return false;
            }
            // The probe failed: out again, for longer.
            self.eject(config, now);
            return true;
        }
        if self.ejected_until.is_some() {
            // Out already; a late answer of an earlier request changes nothing.
            return false;
        }
        let unreachable = kind == Failed::Unreachable;
        self.only_unreachable = unreachable && (self.consecutive == 0 || self.only_unreachable);
        self.consecutive = self.consecutive.saturating_add(1);
        if config.consecutive_failures == 0
            || self.consecutive < config.consecutive_failures
            || !may_eject
        {
            return false;
        }
        self.eject(config, now);
        true
    }

    /// In again with a clean slate (the breaker switched off); whether it
    /// was out. Being passed over is the balancer's, not the breaker's, and
    /// stays: with the breaker off, every update of the endpoints comes here.
    pub fn readmit(&mut self) -> bool {
        let was_out = self.ejected_until.is_some() || self.probing;
        self.consecutive = 0;
        self.only_unreachable = false;
        self.ejected_until = None;
        self.ejections = 0;
        self.probing = false;
        was_out
    }

    fn eject(&mut self, config: &BreakerConfig, now: Instant) {
        let factor = 1u32 << self.ejections.min(16);
        let d = config
            .base_ejection
            .saturating_mul(factor)
            .min(config.max_ejection);
        self.ejected_until = Some(now + d);
        self.ejections = self.ejections.saturating_add(1);
        self.consecutive = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(8),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn a_small_percentage_still_ejects_one_of_a_few() {
        let at = |pct| BreakerConfig {
            max_ejected_percent: pct,
            ..config()
        };
        assert_eq!(at(10).cap(5), 1);
        assert_eq!(at(30).cap(3), 1);
        assert_eq!(at(50).cap(10), 5);
        assert_eq!(at(100).cap(1), 0, "a lone endpoint stays");
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_and_a_probe_readmits() {
        let c = config();
        let mut o = Outlier::default();
        let now = Instant::now();
        assert!(!o.failure(&c, now, true, None));
        assert!(!o.success(None, Instant::now()));
        assert!(!o.failure(&c, now, true, None));
        assert!(!o.failure(&c, now, true, None));
        assert!(o.failure(&c, now, true, None), "third in a row ejects");
        assert_eq!(o.admit(now), Admit::No);
        let later = now + Duration::from_secs(1);
        assert_eq!(o.admit(later), Admit::Probe);
        let p = o.start_probe();
        assert_eq!(o.admit(later), Admit::No, "one probe at a time");
        o.abandon_probe(p);
        assert_eq!(
            o.admit(later),
            Admit::Probe,
            "a cancelled probe frees the slot"
        );
        let p = o.start_probe();
        assert!(
            !o.success(None, Instant::now()),
            "only the probe's answer re-admits"
        );
        assert_eq!(o.admit(later), Admit::No);
        assert!(o.success(Some(p), Instant::now()), "the probe re-admits");
        assert_eq!(o.admit(later), Admit::Yes);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_doubles_the_ejection_up_to_the_max() {
        let c = config();
        let mut o = Outlier::default();
        let mut now = Instant::now();
        for _ in 0..3 {
            o.failure(&c, now, true, None);
        }
        let mut expected = Duration::from_secs(1);
        for _ in 0..5 {
            assert_eq!(
                o.admit(now + expected - Duration::from_millis(1)),
                Admit::No
            );
            now += expected;
            assert_eq!(o.admit(now), Admit::Probe);
            let p = o.start_probe();
            assert!(
                !o.failure(&c, now, true, None),
                "a late answer is no verdict"
            );
            assert!(o.failure(&c, now, true, Some(p)));
            expected = (expected * 2).min(Duration::from_secs(8));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_keeps_an_endpoint_in() {
        let c = config();
        let mut o = Outlier::default();
        let now = Instant::now();
        for _ in 0..10 {
            assert!(!o.failure(&c, now, false, None));
        }
        assert_eq!(o.admit(now), Admit::Yes);
        assert_eq!(c.cap(3), 1);
        assert_eq!(c.cap(1), 0);
    }
}
