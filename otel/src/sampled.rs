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

#[cfg(test)]
mod tests {
    use super::*;

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
}
