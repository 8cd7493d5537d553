//! Waiting for a time on the wall clock, which is what certificates expire
//! by. A timer does not run while the machine sleeps (a suspended laptop, a
//! paused VM) nor jumps when the clock is set: a day's certificate renewed by
//! a timer alone could be renewed hours after it expired, and a credential's
//! end noticed as late.

use std::time::{Duration, SystemTime};

/// The longest a wait goes between looks at the wall clock.
pub const WALL_CLOCK_STEP: Duration = Duration::from_secs(30);

/// Waits until the wall clock (`now`) reads `at`, reading it again every
/// `WALL_CLOCK_STEP`.
pub async fn wall_clock_sleep(at: SystemTime, now: impl Fn() -> SystemTime) {
    loop {
        let left = at.duration_since(now()).unwrap_or_default();
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(WALL_CLOCK_STEP)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    /// A wait follows the wall clock: after a suspend that moved it past
    /// the time waited for, the wait ends within one step, not when a timer
    /// that did not run while suspended would end.
    #[tokio::test(start_paused = true)]
    async fn a_wait_follows_the_wall_clock() {
        let wall = Arc::new(std::sync::Mutex::new(SystemTime::UNIX_EPOCH));
        let read = wall.clone();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(3600);
        let waiting = tokio::spawn(wall_clock_sleep(at, move || *read.lock().unwrap()));
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!waiting.is_finished());
        // Ten minutes of timers, and the machine slept for an hour.
        *wall.lock().unwrap() += Duration::from_secs(4200);
        let started = tokio::time::Instant::now();
        waiting.await.unwrap();
        assert!(
            started.elapsed() <= WALL_CLOCK_STEP,
            "{:?}",
            started.elapsed()
        );
    }
}
