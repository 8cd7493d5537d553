//! Metric series keyed by something the network brings (a calling identity),
//! handed out while in use and removed from their families once nobody has
//! held them for `METRICS_RETAIN_IDLE`. Without this, every identity that ever
//! called stays in `/metrics` and in memory for the life of the proxy (a
//! namespace per CI run is enough to grow it for good).
//!
//! Held means an `Arc` of the series outside this map, which a connection
//! keeps for its life; the series cannot move while nobody holds it, so
//! removing it after the wait loses no count a scrape could have seen in that
//! time. The map keeps its own `Arc` until then, so a caller that comes back
//! (a new connection per request) gets its series with one lookup rather than
//! building their labels again.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a new key may sweep the others (scrapes sweep each time).
const SWEEP_ON_INSERT_EVERY: Duration = Duration::from_secs(60);

/// `remove`, given to `get` and `sweep`, takes one key's series out of their
/// families.
pub struct Retained<K, V> {
    state: Mutex<State<K, V>>,
    retain: Duration,
}

struct State<K, V> {
    entries: HashMap<K, Entry<V>>,
    swept: Option<Instant>,
}

struct Entry<V> {
    /// Held elsewhere while its count is above one.
    series: Arc<V>,
    /// When a sweep first found nobody holding it (and nobody has since).
    idle_since: Option<Instant>,
}

impl<K: Hash + Eq, V> Retained<K, V> {
    pub fn new(retain: Duration) -> Self {
        Retained {
            state: Mutex::new(State {
                entries: HashMap::new(),
                swept: None,
            }),
            retain,
        }
    }

    /// The series of `key`, the same ones until they are removed; `make`
    /// resolves them in their families when they are not tracked.
    pub fn get(&self, key: K, make: impl FnOnce(&K) -> V, remove: impl FnMut(&K)) -> Arc<V> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = state.entries.get_mut(&key) {
            e.idle_since = None;
            return e.series.clone();
        }
        let v = Arc::new(make(&key));
        state.entries.insert(
            key,
            Entry {
                series: v.clone(),
                idle_since: None,
            },
        );
        // A proxy nobody scrapes still sheds what it no longer uses.
        let now = Instant::now();
        if state
            .swept
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_ON_INSERT_EVERY)
        {
            self.sweep_locked(&mut state, now, remove);
        }
        v
    }

    /// Removes the series nobody has held since a sweep at least `retain`
    /// before `now`, and marks the ones nobody holds now.
    pub fn sweep(&self, now: Instant, remove: impl FnMut(&K)) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.sweep_locked(&mut state, now, remove);
    }

    fn sweep_locked(&self, state: &mut State<K, V>, now: Instant, mut remove: impl FnMut(&K)) {
        state.swept = Some(now);
        // Under the lock: a `get` of a key being removed waits, then makes
        // fresh series rather than handing out ones no longer exported.
        state.entries.retain(|key, e| {
            if Arc::strong_count(&e.series) > 1 {
                e.idle_since = None;
                return true;
            }
            match e.idle_since {
                None => {
                    e.idle_since = Some(now);
                    true
                }
                Some(t) if now.saturating_duration_since(t) >= self.retain => {
                    remove(key);
                    false
                }
                Some(_) => true,
            }
        });
    }

    /// Keys tracked, held or waiting out their retention.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.entries.len()
    }
}

impl<K, V> std::fmt::Debug for Retained<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retained")
            .field("retain", &self.retain)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETAIN: Duration = Duration::from_secs(600);

    /// A `Retained` whose removals are written down.
    struct Tested {
        inner: Retained<&'static str, u32>,
        removed: Mutex<Vec<&'static str>>,
    }

    impl Tested {
        fn get(&self, key: &'static str, make: impl FnOnce(&&'static str) -> u32) -> Arc<u32> {
            self.inner
                .get(key, make, |k| self.removed.lock().unwrap().push(*k))
        }

        fn sweep(&self, now: Instant) {
            self.inner
                .sweep(now, |k| self.removed.lock().unwrap().push(*k))
        }

        fn tracked(&self) -> usize {
            self.inner.tracked()
        }
    }

    fn retained() -> Tested {
        Tested {
            inner: Retained::new(RETAIN),
            removed: Mutex::default(),
        }
    }

    #[test]
    fn a_key_nobody_holds_is_removed_after_the_wait_and_not_before() {
        let r = retained();
        let removed = &r.removed;
        let t0 = Instant::now();
        let a = r.get("a", |_| 1);
        drop(a);
        r.sweep(t0);
        r.sweep(t0 + RETAIN - Duration::from_secs(1));
        assert!(
            removed.lock().unwrap().is_empty(),
            "removed before the wait"
        );
        r.sweep(t0 + RETAIN);
        assert_eq!(*removed.lock().unwrap(), ["a"]);
        assert_eq!(r.tracked(), 0);
    }

    #[test]
    fn a_held_key_stays_however_long() {
        let r = retained();
        let removed = &r.removed;
        let t0 = Instant::now();
        let held = r.get("a", |_| 1);
        for hours in 0..48 {
            r.sweep(t0 + Duration::from_secs(3600) * hours);
        }
        assert!(removed.lock().unwrap().is_empty());
        assert!(Arc::ptr_eq(&held, &r.get("a", |_| 2)), "the same series");
    }

    #[test]
    fn using_a_key_again_restarts_its_wait() {
        let r = retained();
        let removed = &r.removed;
        let t0 = Instant::now();
        drop(r.get("a", |_| 1));
        r.sweep(t0);
        // Used (and let go) between two sweeps: its counts may have moved
        // since the last scrape, so the wait starts over.
        drop(r.get("a", |_| 1));
        r.sweep(t0 + RETAIN);
        assert!(removed.lock().unwrap().is_empty());
        r.sweep(t0 + RETAIN * 2);
        assert_eq!(*removed.lock().unwrap(), ["a"]);
    }

    #[test]
    fn a_key_let_go_comes_back_without_being_made_again() {
        let r = retained();
        let t0 = Instant::now();
        let first = r.get("a", |_| 1);
        let kept = Arc::as_ptr(&first);
        drop(first);
        r.sweep(t0);
        let again = r.get("a", |_| panic!("made again while still tracked"));
        assert_eq!(Arc::as_ptr(&again), kept, "the same series");
        // Held again: the wait started by the sweep no longer counts.
        r.sweep(t0 + RETAIN);
        assert!(r.removed.lock().unwrap().is_empty());
    }

    #[test]
    fn a_removed_key_is_made_again_when_it_comes_back() {
        let r = retained();
        let t0 = Instant::now();
        drop(r.get("a", |_| 1));
        r.sweep(t0);
        r.sweep(t0 + RETAIN);
        let made = std::cell::Cell::new(false);
        let a = r.get("a", |_| {
            made.set(true);
            3
        });
        assert!(made.get());
        assert_eq!(*a, 3);
    }
}
