//! Exponential backoff with full jitter, so that proxies that lost the control
//! plane together do not reconnect together.

use std::time::Duration;

use rand::Rng;

use crate::defaults;

#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: defaults::CONTROL_BACKOFF_MIN,
        }
    }
}

impl Backoff {
    pub fn reset(&mut self) {
        self.next = defaults::CONTROL_BACKOFF_MIN;
    }

    /// A delay drawn from [min, current ceiling]; the ceiling doubles up to the max.
    pub fn next_delay(&mut self) -> Duration {
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

    #[test]
    fn delays_grow_within_bounds_and_reset() {
        let mut b = Backoff::default();
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= defaults::CONTROL_BACKOFF_MIN && d <= defaults::CONTROL_BACKOFF_MAX,
                "{d:?}"
            );
        }
        assert_eq!(b.next, defaults::CONTROL_BACKOFF_MAX);
        b.reset();
        assert!(b.next_delay() <= defaults::CONTROL_BACKOFF_MIN * 2);
    }
}
