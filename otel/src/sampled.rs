//! Log lines that strangers can cause (junk connections, refused requests,
//! failed handshakes) are rate-limited per call site: a few per window, the rest
//! counted and reported with the next line that is logged. The metrics count
//! every one; the log only needs a sample.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// Lines per call site per window.
const BURST: u32 = 5;
const WINDOW_SECS: u64 = 10;

fn now_window() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() / WINDOW_SECS
}

#[derive(Debug)]
pub struct Budget {
    window: AtomicU64,
    used: AtomicU32,
    suppressed: AtomicU64,
}

impl Budget {
    pub const fn new() -> Self {
        Budget {
            window: AtomicU64::new(0),
            used: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one logged)` when this line may be
    /// logged.
    pub fn take(&self) -> Option<u64> {
        let now = now_window();
        let seen = self.window.load(Ordering::Relaxed);
        if now != seen
            && self
                .window
                .compare_exchange(seen, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

/// Budgets of one call site, one per key (a reason label of a fixed set), so
/// that a noisy key does not crowd the others out of the log: a destination
/// with no endpoints answering every request would leave no line for the
/// timeout an engineer is paged about. A key takes the first free slot the
/// first time it is seen; past `N` keys, the last slot is shared.
#[derive(Debug)]
pub struct Keyed<const N: usize>([(OnceLock<&'static str>, Budget); N]);

impl<const N: usize> Keyed<N> {
    pub const fn new() -> Self {
        Keyed([const { (OnceLock::new(), Budget::new()) }; N])
    }

    /// As [`Budget::take`], from `key`'s budget.
    pub fn take(&self, key: &'static str) -> Option<u64> {
        for (k, budget) in &self.0 {
            if *k.get_or_init(|| key) == key {
                return budget.take();
            }
        }
        self.0[N - 1].1.take()
    }
}

impl<const N: usize> Default for Keyed<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// `sampled_by!(reason, info, …)`: as [`sampled!`], with a budget per value
/// of `reason` (a `&'static str` of a small fixed set).
#[macro_export]
macro_rules! sampled_by {
    ($key:expr, $level:ident, $($arg:tt)+) => {{
        static BUDGETS: $crate::sampled::Keyed<32> = $crate::sampled::Keyed::new();
        if let Some(suppressed) = BUDGETS.take($key) {
            ::tracing::$level!(suppressed, $($arg)+);
        }
    }};
}

/// `sampled!(warn, client = %c, "message")`: a `tracing` event at that level,
/// at most a few per ten seconds from this call site, with `suppressed` saying
/// how many were left out before it.
#[macro_export]
macro_rules! sampled {
    ($level:ident, $($arg:tt)+) => {{
        static BUDGET: $crate::sampled::Budget = $crate::sampled::Budget::new();
        if let Some(suppressed) = BUDGET.take() {
            ::tracing::$level!(suppressed, $($arg)+);
        }
    }};
}

/// Sampling for the lines of other crates: h2 warns once per unsolicited
/// PING acknowledgement a peer sends (17 bytes each, the connection kept),
/// and hyper-util once per CONNECT whose target has a path, quoting it. A
/// stranger reaching a listener could write the node's disk full through
/// them, on the thread that serves requests. Their events at info and above
/// take a budget per place in their code, as strait's own such lines do
/// (with no count of those left out: their fields are not ours to add);
/// debug and trace, off unless asked for, pass.
#[derive(Debug, Default)]
pub struct OthersSampled {
    budgets: std::sync::Mutex<std::collections::HashMap<tracing::callsite::Identifier, Budget>>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for OthersSampled {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        let meta = event.metadata();
        if meta.target().starts_with("strait") || *meta.level() > tracing::Level::INFO {
            return true;
        }
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        budgets.entry(meta.callsite()).or_default().take().is_some()
    }
}

/// Failures in a row of one task that retries on its own (a certificate
/// renewal, a lease): worth a warning are the first few, one whose reason
/// changed, and every 60th (ten minutes apart at a 10 s backoff), with the
/// count; the rest belong at debug. Out of reach for a day, a renewal every
/// 10 s would otherwise log thousands of the same line.
#[derive(Debug, Default)]
pub struct FailureRun {
    failures: u32,
    last: String,
}

impl FailureRun {
    /// Counts a failure; whether it is worth a warning.
    pub fn failed(&mut self, reason: &str) -> bool {
        self.failures = self.failures.saturating_add(1);
        let new = reason != self.last;
        if new {
            self.last = reason.to_string();
        }
        self.failures <= 3 || new || self.failures.is_multiple_of(60)
    }

    /// Failures so far in this run.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Ends the run; how many failures it had.
    pub fn succeeded(&mut self) -> u32 {
        self.last.clear();
        std::mem::take(&mut self.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An hour of an unreachable controller at a 10 s backoff is a few
    /// warnings, not 360; a failure that says something new is always one,
    /// and a success starts the count again.
    #[test]
    fn failures_in_a_row_are_warned_of_sparingly() {
        let mut run = FailureRun::default();
        let warned = (0..360).filter(|_| run.failed("unreachable")).count();
        assert_eq!(warned, 3 + 6, "the first three, then one each 60");
        assert!(run.failed("refused"), "a new reason");
        assert_eq!(run.succeeded(), 361);
        assert!(run.failed("unreachable") && run.failures() == 1);
    }

    #[test]
    fn a_burst_then_silence_counted() {
        let b = Budget::new();
        let logged: Vec<Option<u64>> = (0..100).map(|_| b.take()).collect();
        assert_eq!(
            logged.iter().filter(|l| l.is_some()).count(),
            BURST as usize
        );
        assert_eq!(b.suppressed.load(Ordering::Relaxed), 100 - BURST as u64);
    }

    /// A reason logged on every request leaves the others their lines.
    #[test]
    fn a_noisy_key_leaves_the_others_their_budget() {
        // The proxy's reasons for a 5xx of its own (docs/configuration.md).
        let reasons = [
            "connect",
            "connect_timeout",
            "upstream",
            "refused",
            "no_endpoints",
            "resolve",
            "no_backend",
            "request_timeout",
            "backend_request_timeout",
            "in_flight_limit",
            "source_in_flight_limit",
            "memory_pressure",
            "connection_limit",
        ];
        for noisy in reasons {
            let k = Keyed::<32>::new();
            for _ in 0..1000 {
                k.take(noisy);
            }
            assert!(k.take(noisy).is_none(), "{noisy}");
            for other in reasons.iter().filter(|r| **r != noisy) {
                assert!(k.take(other).is_some(), "{other} after {noisy}");
            }
        }
    }
}
