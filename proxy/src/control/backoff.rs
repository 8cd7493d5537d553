//! Exponential backoff with full jitter, so that proxies that lost the control
//! plane together do not reconnect together.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::defaults;

#[derive(Debug)]
pub struct Backoff {
    /// The ceiling of the next delay.
    next: Duration,
    /// When the stream now open first answered.
    up_since: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: first_ceiling(),
            up_since: None,
        }
    }
}

/// Even the first delay is drawn from a range: after a controller restart,
/// every watch of every proxy would otherwise come back in the same instant.
fn first_ceiling() -> Duration {
    defaults::CONTROL_BACKOFF_MIN * 2
}

impl Backoff {
    /// The stream answered. The backoff starts over only once a stream has
    /// stayed up for as long as the longest delay: one that fails after its
    /// first answer, again and again, is retried ever more slowly rather than
    /// ten times a second.
    pub fn connected(&mut self) {
        self.up_since.get_or_insert_with(Instant::now);
    }

    /// A request succeeded: the next failure starts from the first delay.
    pub fn reset(&mut self) {
        self.next = first_ceiling();
        self.up_since = None;
    }

    /// A delay drawn from [min, current ceiling]; the ceiling doubles up to the max.
    pub fn next_delay(&mut self) -> Duration {
        if let Some(since) = self.up_since.take()
            && since.elapsed() >= defaults::CONTROL_BACKOFF_MAX
        {
            self.reset();
        }
        let ceiling = self.next;
        self.next = (self.next * 2).min(defaults::CONTROL_BACKOFF_MAX);
        let min = defaults::CONTROL_BACKOFF_MIN.as_millis() as u64;
        let max = (ceiling.as_millis() as u64).max(min);
        Duration::from_millis(rand::rng().random_range(min..=max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn delays_grow_within_bounds_and_start_over_after_a_stable_stream() {
        let mut b = Backoff::default();
        let first: Vec<Duration> = (0..50).map(|_| Backoff::default().next_delay()).collect();
        assert!(
            first.iter().any(|d| *d != first[0]),
            "the first delay is jittered"
        );
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= defaults::CONTROL_BACKOFF_MIN && d <= defaults::CONTROL_BACKOFF_MAX,
                "{d:?}"
            );
        }
        assert_eq!(b.next, defaults::CONTROL_BACKOFF_MAX);
        // A stream that fails soon after answering does not start it over.
        b.connected();
        tokio::time::advance(Duration::from_secs(1)).await;
        b.next_delay();
        assert_eq!(b.next, defaults::CONTROL_BACKOFF_MAX);
        // One that stayed up does.
        b.connected();
        tokio::time::advance(defaults::CONTROL_BACKOFF_MAX).await;
        assert!(b.next_delay() <= first_ceiling());
    }
}
