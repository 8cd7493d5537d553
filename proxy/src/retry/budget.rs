//! A retry budget: retries may be at most `ratio` of the requests of the last
//! `ttl`, plus `min_per_second`. tower's `TpsBudget` works the same way but
//! charges a retry `(1 / ratio) as isize` requests, so a ratio between those
//! steps rounds up to the next: 0.3 allowed a third of requests, 0.6 all of
//! them. Here a request deposits a million units and a retry withdraws
//! a million over `ratio`, rounded down: a ratio is kept to a millionth, and
//! never allows fewer retries than it says.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tower::retry::budget::Budget;

/// Units a request deposits.
const DEPOSIT: i64 = 1_000_000;
/// Windows the `ttl` is divided in: deposits older than the oldest are gone.
const WINDOWS: usize = 10;

#[derive(Debug)]
pub struct RetryBudget {
    /// Units a request deposits: none with a ratio of 0, when only the
    /// reserve pays for retries.
    deposit: i64,
    /// Units a retry withdraws.
    withdraw: i64,
    /// What `min_per_second` grants, always there.
    reserve: i64,
    window: Duration,
    state: Mutex<Windows>,
}

#[derive(Debug)]
struct Windows {
    /// Net units per window; `current` is being written.
    slots: [i64; WINDOWS],
    current: usize,
    started: Instant,
    /// Windows begun since the budget was made: which one a withdrawal
    /// was taken from, and whether it is still counted.
    epoch: u64,
}

/// A retry paid for, which `refund` gives back if it is never sent.
#[derive(Debug)]
pub struct Withdrawal {
    epoch: u64,
}

impl RetryBudget {
    /// `ratio` in 0..=1, `ttl` in 1..=60 s (the configuration clamps both).
    pub fn new(ttl: Duration, min_per_second: u32, ratio: f32) -> Self {
        // Kept to a millionth: a smaller ratio is 0, when the reserve alone
        // pays (charged a billion deposits, a retry would outweigh it).
        let (deposit, withdraw) = if ratio >= 1e-6 {
            (
                DEPOSIT,
                ((DEPOSIT as f64 / f64::from(ratio)).floor() as i64).max(1),
            )
        } else {
            (0, DEPOSIT)
        };
        // In milliseconds of the ttl: a 1.5 s ttl holds 1.5 s of retries.
        // At most 10,000/s for 60 s at a millionth's price: well inside i64.
        let reserve = i64::try_from(
            i128::from(min_per_second) * (ttl.as_millis() as i128) * i128::from(withdraw) / 1000,
        )
        .unwrap_or(i64::MAX);
        RetryBudget {
            deposit,
            withdraw,
            reserve,
            window: (ttl / WINDOWS as u32).max(Duration::from_millis(1)),
            state: Mutex::new(Windows {
                slots: [0; WINDOWS],
                current: 0,
                started: Instant::now(),
                epoch: 0,
            }),
        }
    }

    fn windows(&self) -> std::sync::MutexGuard<'_, Windows> {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Windows that passed since the current one started are emptied.
        let passed = Instant::now().saturating_duration_since(w.started);
        let n = passed.as_nanos() / self.window.as_nanos();
        if n > 0 {
            w.epoch = w.epoch.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
            for _ in 0..n.min(WINDOWS as u128) {
                w.current = (w.current + 1) % WINDOWS;
                let c = w.current;
                w.slots[c] = 0;
            }
            // Whole windows only, so the current one keeps its phase; after a
            // long quiet spell, restarted now.
            w.started = if n >= WINDOWS as u128 {
                Instant::now()
            } else {
                w.started + self.window * n as u32
            };
        }
        w
    }

    /// Pays for one retry, if the budget allows it.
    pub fn take(&self) -> Option<Withdrawal> {
        let mut w = self.windows();
        let balance = w
            .slots
            .iter()
            .fold(self.reserve, |sum, s| sum.saturating_add(*s));
        if balance < self.withdraw {
            return None;
        }
        let c = w.current;
        w.slots[c] = w.slots[c].saturating_sub(self.withdraw);
        Some(Withdrawal { epoch: w.epoch })
    }

    /// Gives back a retry that was paid for and not sent (its request ended
    /// during the backoff), to the window it was taken from: once that
    /// window is past, the payment has expired anyway.
    pub fn refund(&self, paid: Withdrawal) {
        let mut w = self.windows();
        let age = w.epoch.saturating_sub(paid.epoch);
        if age >= WINDOWS as u64 {
            return;
        }
        let slot = (w.current + WINDOWS - age as usize) % WINDOWS;
        w.slots[slot] = w.slots[slot].saturating_add(self.withdraw);
    }
}

impl Budget for RetryBudget {
    fn deposit(&self) {
        let mut w = self.windows();
        let c = w.current;
        w.slots[c] = w.slots[c].saturating_add(self.deposit);
    }

    fn withdraw(&self) -> bool {
        self.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Retries the budget allows against `requests` requests.
    fn allowed(b: &RetryBudget, requests: usize) -> usize {
        for _ in 0..requests {
            b.deposit();
        }
        (0..requests).take_while(|_| b.withdraw()).count()
    }

    /// However small a ratio, the reserve still grants `min_per_second`:
    /// a billionth once charged a retry so much that it granted a tenth.
    #[tokio::test(start_paused = true)]
    async fn a_tiny_ratio_keeps_the_reserve_whole() {
        for ratio in [1e-9, 1e-7, 0.0] {
            let b = RetryBudget::new(Duration::from_secs(10), 10, ratio);
            assert_eq!(allowed(&b, 0), 0, "nothing asked");
            let granted = (0..1000).take_while(|_| b.withdraw()).count();
            assert_eq!(granted, 100, "ratio {ratio}");
        }
        let b = RetryBudget::new(Duration::from_secs(60), 10_000, 1e-6);
        assert_eq!((0..1_000_000).take_while(|_| b.withdraw()).count(), 600_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ratio_is_kept_between_tower_steps() {
        // tower's budget allowed 1,000, 1,000, 500 and 333 here.
        for (ratio, want) in [(0.75, 750), (0.6, 600), (0.4, 400), (0.3, 300), (0.2, 200)] {
            let b = RetryBudget::new(Duration::from_secs(10), 0, ratio);
            assert_eq!(allowed(&b, 1000), want, "ratio {ratio}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_pays_without_requests_and_a_zero_ratio_adds_nothing() {
        let b = RetryBudget::new(Duration::from_secs(10), 2, 0.0);
        // 2 a second over 10 s.
        assert_eq!(allowed(&b, 1000), 20);
        let b = RetryBudget::new(Duration::from_millis(1500), 10, 0.0);
        assert_eq!(allowed(&b, 1000), 15);
    }

    /// A refunded retry can be taken again while its window lasts, and not
    /// after: a refund never grants more than the budget would have.
    #[tokio::test(start_paused = true)]
    async fn a_refund_returns_the_retry_to_its_own_window() {
        let b = RetryBudget::new(Duration::from_secs(10), 1, 0.0);
        let paid: Vec<_> = (0..10).map_while(|_| b.take()).collect();
        assert_eq!(paid.len(), 10, "1 a second over 10 s");
        assert!(b.take().is_none());
        let mut paid = paid.into_iter();
        b.refund(paid.next().unwrap());
        let again = b.take().expect("a refunded retry is there again");
        // Refunded later, in a later window, it still goes back.
        tokio::time::advance(Duration::from_secs(3)).await;
        b.refund(again);
        assert!(b.take().is_some());
        assert!(b.take().is_none());
        // Past the ttl the payment has expired by itself: a refund then
        // adds nothing beyond the reserve, which is whole again.
        tokio::time::advance(Duration::from_secs(11)).await;
        b.refund(paid.next().unwrap());
        assert_eq!((0..100).map_while(|_| b.take()).count(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_ttl() {
        let b = RetryBudget::new(Duration::from_secs(10), 0, 0.5);
        for _ in 0..100 {
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!b.withdraw(), "deposits older than the ttl still paid");
        for _ in 0..100 {
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!((0..100).take_while(|_| b.withdraw()).count(), 50);
    }
}
