//! The demo's live table: per destination, requests per second, success rate,
//! latency percentiles and which endpoints served the traffic; below it, what the
//! traffic policy did (canary share, retries, timeouts, ejections).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::proxy_metrics::PolicyCounters;

const WEB: &str = "web.demo.svc.cluster.local:80";
const API: &str = "api.demo.svc.cluster.local:80";
/// The canary's pods name themselves `api-v2-…` in the chain.
const CANARY_POD_PREFIX: &str = "api-v2-";

/// Latencies the whole run's figures keep at most per destination (8 MB):
/// past it each new one takes a kept one's place at random (reservoir
/// sampling), so the summary's percentiles stay the whole run's at
/// `--rate 10000` for hours.
const MAX_TOTAL_SAMPLES: usize = 1_000_000;

#[derive(Clone, Debug, Default)]
pub struct DestStats {
    pub requests: u64,
    pub ok: u64,
    pub micros: Vec<u64>,
    /// Latencies recorded in all, `micros` holding a sample of them.
    timed: u64,
    pub served_by: BTreeMap<String, u64>,
    /// The caller identities the serving proxies verified.
    pub callers: BTreeMap<String, u64>,
}

impl DestStats {
    fn add(&mut self, ok: bool, micros: Option<u64>, by: Option<&str>, caller: Option<&str>) {
        if let Some(c) = caller.filter(|c| !c.is_empty()) {
            *self.callers.entry(c.to_string()).or_default() += 1;
        }
        self.requests += 1;
        self.ok += u64::from(ok);
        if let Some(m) = micros {
            self.micros.push(m);
        }
        if let Some(b) = by.filter(|b| !b.is_empty()) {
            *self.served_by.entry(b.to_string()).or_default() += 1;
        }
    }

    fn merge(&mut self, o: &DestStats, cap: usize) {
        self.requests += o.requests;
        self.ok += o.ok;
        let mut rng = rand::rng();
        for &m in &o.micros {
            self.timed += 1;
            if self.micros.len() < cap {
                self.micros.push(m);
            } else {
                let i = rand::Rng::random_range(&mut rng, 0..self.timed);
                if let Some(kept) = self.micros.get_mut(i as usize) {
                    *kept = m;
                }
            }
        }
        for (k, v) in &o.served_by {
            *self.served_by.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.callers {
            *self.callers.entry(k.clone()).or_default() += v;
        }
    }

    fn percentile(&self, p: f64) -> Option<Duration> {
        if self.micros.is_empty() {
            return None;
        }
        let mut v = self.micros.clone();
        v.sort_unstable();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        Some(Duration::from_micros(v[i.min(v.len() - 1)]))
    }
}

#[derive(Clone, Debug, Default)]
pub struct Window {
    pub dests: BTreeMap<&'static str, DestStats>,
}

impl Window {
    pub fn ok_requests(&self) -> u64 {
        self.dests.get(WEB).map_or(0, |d| d.ok)
    }

    /// The share (0-100) of api requests the canary served, if api served any.
    fn canary_percent(&self) -> Option<f64> {
        let served = &self.dests.get(API)?.served_by;
        let all: u64 = served.values().sum();
        let canary: u64 = served
            .iter()
            .filter(|(k, _)| k.starts_with(CANARY_POD_PREFIX))
            .map(|(_, v)| v)
            .sum();
        (all > 0).then(|| 100.0 * canary as f64 / all as f64)
    }
}

/// The canary's route weight, and when the demo shifts it.
#[derive(Clone, Copy, Debug)]
pub enum Canary {
    /// No weight to shift (the manifests have no routes.yaml with the demo's split).
    AsConfigured,
    Planned {
        from: u32,
        to: u32,
        at: Duration,
    },
    Shifted {
        from: u32,
        to: u32,
        at: Duration,
    },
}

impl fmt::Display for Canary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Canary::AsConfigured => write!(f, "route weights as in the manifests"),
            Canary::Planned { from, to, at } => {
                write!(f, "route weight {from}, {to} from {}s", at.as_secs())
            }
            Canary::Shifted { from, to, at } => {
                write!(f, "route weight {from} -> {to} at {}s", at.as_secs())
            }
        }
    }
}

/// The lines under the table: the canary's share of `w`, and web-0's proxy
/// counters (since it started).
fn policy_lines(w: &Window, proxy: Option<PolicyCounters>, canary: Canary) -> String {
    let share = w
        .canary_percent()
        .map_or("-".into(), |p| format!("{p:.1} %"));
    let mut out = format!("canary api-v2: {share} of api requests ({canary})\n");
    match proxy {
        Some(c) => out.push_str(&format!(
            "retries: {} (503s of the flaky api-2 and 500s of api-3, retried on another endpoint)\n\
             timeouts: {} (/slow cut at 300ms, answered 504: the failures in SUCCESS, as expected)\n\
             ejected now: {} (ejections so far: {}; api-3 answers 500 to everything, 3 in a row eject it)\n",
            c.retries, c.timeouts, c.ejected_now, c.ejections
        )),
        None => out.push_str("retries, timeouts, ejections: web-0's proxy metrics did not answer\n"),
    }
    out
}

#[derive(Debug, Default)]
pub struct Stats {
    window: Window,
    total: Window,
    /// The slowest request since the last table, and its trace id.
    pub slowest: Option<(u64, String)>,
}

impl Stats {
    pub fn record(
        &mut self,
        ok: bool,
        micros: u64,
        chain: &str,
        callers: &str,
        backend_us: Option<u64>,
    ) {
        // An empty chain is a request no app answered (the load pod's proxy
        // answered it): it counts for web, and api was never asked.
        let mut hops = chain.split(',').filter(|h| !h.is_empty());
        let web = hops.next();
        let api = hops.next();
        let mut callers = callers.split(',');
        self.window
            .dests
            .entry(WEB)
            .or_default()
            .add(ok, Some(micros), web, callers.next());
        if web.is_some() {
            self.window.dests.entry(API).or_default().add(
                api.is_some() && ok,
                backend_us,
                api,
                callers.next(),
            );
        }
    }

    /// Every request recorded, the window under way included: the summary's
    /// figures are over the whole run, so a stop between two tables loses none.
    pub fn take_total(&mut self) -> Window {
        self.take_window();
        std::mem::take(&mut self.total)
    }

    pub fn take_window(&mut self) -> Window {
        let w = std::mem::take(&mut self.window);
        for (k, d) in &w.dests {
            self.total
                .dests
                .entry(k)
                .or_default()
                .merge(d, MAX_TOTAL_SAMPLES);
        }
        w
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}ms", d.as_secs_f64() * 1000.0))
}

fn endpoints(d: &DestStats) -> String {
    let eps: Vec<String> = d
        .served_by
        .iter()
        .map(|(k, v)| format!("{k} ({v})"))
        .collect();
    eps.join(" ")
}

fn rows(w: &Window, seconds: f64) -> String {
    let width = w
        .dests
        .values()
        .map(|d| endpoints(d).len())
        .max()
        .unwrap_or(0)
        .max(24);
    let mut out = format!(
        "{:<32} {:>8} {:>9} {:>9} {:>9}  {:<width$} {}\n",
        "DESTINATION",
        "RPS",
        "SUCCESS",
        "P50",
        "P99",
        "ENDPOINTS (requests)",
        "VERIFIED CALLER (mTLS)"
    );
    for (name, d) in &w.dests {
        let success = if d.requests == 0 {
            0.0
        } else {
            100.0 * d.ok as f64 / d.requests as f64
        };
        let callers: Vec<&str> = d.callers.keys().map(String::as_str).collect();
        out.push_str(&format!(
            "{:<32} {:>8.1} {:>8.2}% {:>9} {:>9}  {:<width$} {}\n",
            name,
            d.requests as f64 / seconds.max(0.001),
            success,
            ms(d.percentile(0.5)),
            ms(d.percentile(0.99)),
            endpoints(d),
            callers.join(" ")
        ));
    }
    out
}

/// The table of the last second (on a terminal, clearing the screen first).
pub fn live(
    w: &Window,
    proxy: Option<PolicyCounters>,
    canary: Canary,
    elapsed: Duration,
    rate: u32,
    tty: bool,
) -> String {
    format!(
        "{}strait demo: {}s, {rate} req/s offered (Ctrl-C to stop)\n{}\n{}\n",
        if tty { "\x1b[H\x1b[2J" } else { "" },
        elapsed.as_secs(),
        rows(w, 1.0),
        policy_lines(w, proxy, canary)
    )
}

pub fn summary(
    total: &Window,
    proxy: Option<PolicyCounters>,
    canary: Canary,
    elapsed: Duration,
) -> String {
    format!(
        "summary over {:.0}s:\n{}\n{}\n",
        elapsed.as_secs_f64(),
        rows(total, elapsed.as_secs_f64()),
        policy_lines(total, proxy, canary)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request the load pod's proxy answered itself (no app in its chain)
    /// failed at web, and is not counted against api, which it never reached.
    #[test]
    fn a_request_that_reached_no_app_is_not_counted_for_api() {
        let mut s = Stats::default();
        s.record(false, 900, "", "", None);
        s.record(
            true,
            1200,
            "web-0,api-1",
            "spiffe://a,spiffe://b",
            Some(700),
        );
        let w = s.take_window();
        assert_eq!(w.dests[WEB].requests, 2);
        assert_eq!(w.dests[WEB].ok, 1);
        assert_eq!(w.dests[API].requests, 1);
        assert_eq!(w.dests[API].ok, 1);
        assert_eq!(w.dests[API].served_by.get("api-1"), Some(&1));
    }

    /// The run's latencies are kept within a bound, as a sample of them all:
    /// later windows' take their share of places.
    #[test]
    fn the_runs_latencies_are_a_bounded_sample() {
        let mut total = DestStats::default();
        for window in 0..10u64 {
            let w = DestStats {
                requests: 1000,
                ok: 1000,
                micros: (0..1000).map(|i| window * 1000 + i).collect(),
                ..Default::default()
            };
            total.merge(&w, 100);
        }
        assert_eq!(total.requests, 10_000);
        assert_eq!(total.micros.len(), 100);
        let late = total.micros.iter().filter(|m| **m >= 5000).count();
        assert!(
            (20..=80).contains(&late),
            "{late} of 100 from the later half"
        );
    }

    /// The summary counts the requests since the last table too.
    #[test]
    fn the_total_takes_the_window_under_way() {
        let mut s = Stats::default();
        s.record(true, 1000, "web-0,api-0", "", Some(500));
        let _ = s.take_window();
        s.record(true, 1000, "web-0,api-1", "", Some(500));
        let total = s.take_total();
        assert_eq!(total.dests[WEB].requests, 2);
        assert_eq!(total.ok_requests(), 2);
    }
}
