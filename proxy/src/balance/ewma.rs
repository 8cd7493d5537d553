//! Peak-sensitive EWMA of latency (as tower's and Linkerd's): a slower observation
//! replaces the estimate at once; with time the estimate decays (time constant
//! `BALANCER_EWMA_DECAY`), so an endpoint that turned slow is avoided immediately,
//! and one that is no longer chosen becomes worth trying again.

use std::time::Duration;

use tokio::time::Instant;

use crate::defaults;

#[derive(Debug, Clone)]
pub struct PeakEwma {
    /// Estimated latency, nanoseconds.
    cost_ns: f64,
    stamp: Instant,
    /// When the requests now awaited began to wait.
    busy_since: Instant,
    /// The estimate is a guess, which the first answer replaces whole.
    guessed: bool,
}

impl PeakEwma {
    pub fn new(now: Instant) -> Self {
        Self::guessing(None, now)
    }

    /// An endpoint with no answer yet, guessed to cost `like` (nanoseconds;
    /// at least the default): what its backend's others cost, so that it
    /// draws its share until it answers rather than every pick it is in.
    pub fn guessing(like: Option<f64>, now: Instant) -> Self {
        let floor = defaults::BALANCER_DEFAULT_RTT.as_nanos() as f64;
        PeakEwma {
            cost_ns: like.map_or(floor, |c| c.max(floor)),
            stamp: now,
            busy_since: now,
            guessed: true,
        }
    }

    /// Whether an answer has been observed: the estimate is no guess.
    pub fn answered(&self) -> bool {
        !self.guessed
    }

    fn decay(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        (-elapsed / defaults::BALANCER_EWMA_DECAY.as_secs_f64()).exp()
    }

    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        if std::mem::replace(&mut self.guessed, false) {
            // The guess goes whole, though not below the default, where
            // every estimate starts: endpoints answering in microseconds
            // would otherwise be told apart by noise, the cheaper taking all.
            self.cost_ns = rtt.max(defaults::BALANCER_DEFAULT_RTT.as_nanos() as f64);
        } else if rtt > self.cost_ns {
            self.cost_ns = rtt;
        } else {
            let w = self.decay(now);
            self.cost_ns = self.cost_ns * w + rtt * (1.0 - w);
        }
        self.stamp = now;
    }

    /// The estimate, decayed for the time since the last observation.
    pub fn cost(&self, now: Instant) -> f64 {
        self.cost_ns * self.decay(now)
    }

    /// Requests are waiting on the endpoint again, from `now` (none were).
    pub fn busy_from(&mut self, now: Instant) {
        self.busy_since = now;
    }

    /// The estimate, `awaiting` answers. Decay is for an endpoint left alone:
    /// one holding requests that answers none (hung, or deadlocked) would
    /// otherwise look ever faster for its silence and draw ever more of them.
    /// So while answers are awaited the estimate stays at least the default,
    /// and once none has come for longer than the failure penalty (counted
    /// from the last answer, or from when requests began to wait if later:
    /// an endpoint idle an hour is not slow for it) it is at least that
    /// silence. Streams already judged (an opaque stream, a response body
    /// being read) wait for nothing.
    pub fn cost_awaiting(&self, awaiting: bool, now: Instant) -> f64 {
        let cost = self.cost(now);
        if !awaiting {
            return cost;
        }
        let silent = now.saturating_duration_since(self.stamp.max(self.busy_since));
        let floor = if silent > defaults::BALANCER_FAILURE_PENALTY {
            silent
        } else {
            defaults::BALANCER_DEFAULT_RTT
        };
        cost.max(floor.as_nanos() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peaks_jump_and_decay_slowly() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(100), t0);
        assert_eq!(e.cost(t0), 100e6);
        let t1 = t0 + Duration::from_secs(1);
        e.observe(Duration::from_millis(1), t1);
        assert!(
            e.cost(t1) > 80e6,
            "one fast answer does not erase a peak: {}",
            e.cost(t1)
        );
        let t2 = t1 + Duration::from_secs(60);
        e.observe(Duration::from_millis(1), t2);
        assert!(e.cost(t2) < 2e6, "{}", e.cost(t2));
        e.observe(Duration::from_millis(100), t2);
        let idle = t2 + Duration::from_secs(30);
        assert!(
            e.cost(idle) < 10e6,
            "an endpoint left alone becomes worth a try: {}",
            e.cost(idle)
        );
    }
}
