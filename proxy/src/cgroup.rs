//! The container's memory limit, as its cgroup says: the proxy sizes its
//! default connection limit to it, so that what its limits let in cannot get
//! it OOM-killed (the injected sidecar's limit is 250 MiB; 20,000 idle
//! connections on each listener would take several times that), and sheds
//! new requests near it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::defaults;

/// The memory limit of this process's cgroup, in bytes: cgroup v2's
/// `memory.max`, else v1's `memory.limit_in_bytes`, of the cgroup
/// `/proc/self/cgroup` names, else of the mount's root (a container's own
/// cgroup, where it has a namespace or the mount of its own). `None` without
/// one (no file, `max`, or v1's "unlimited", a number near `u64::MAX`).
pub fn memory_limit() -> Option<u64> {
    own_memory().map(|m| m.limit)
}

/// A cgroup's memory limit, and where its use is read.
#[derive(Clone, Debug)]
struct Memory {
    limit: u64,
    dir: PathBuf,
    v2: bool,
}

fn own_memory() -> Option<Memory> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    memory_under(Path::new("/sys/fs/cgroup"), &own)
}

#[cfg(test)]
fn memory_limit_under(root: &Path, own: &str) -> Option<u64> {
    memory_under(root, own).map(|m| m.limit)
}

fn memory_under(root: &Path, own: &str) -> Option<Memory> {
    let mut dirs = Vec::new();
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            dirs.push((root.join(path), true));
        } else if controllers.split(',').any(|c| c == "memory") {
            dirs.push((root.join("memory").join(path), false));
        }
    }
    dirs.push((root.to_path_buf(), true));
    dirs.push((root.join("memory"), false));
    let (dir, v2, v) = dirs.into_iter().find_map(|(dir, v2)| {
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        let v = std::fs::read_to_string(dir.join(file)).ok()?;
        Some((dir, v2, v))
    })?;
    let limit = parse_limit(&v)?;
    Some(Memory { limit, dir, v2 })
}

/// A limit file's bytes, `None` where unlimited (v2's `max`; v1 writes
/// "unlimited" as the largest page-aligned i64).
fn parse_limit(v: &str) -> Option<u64> {
    v.trim().parse::<u64>().ok().filter(|b| *b < 1 << 60)
}

impl Memory {
    /// The working set and the limit now (`None` where unlimited): the
    /// kubelet resizes a running container's limit in place (a pod's
    /// `resize`, a VPA), and shedding at 90 % of the old one would answer
    /// 503 with memory to spare, or let the proxy be killed under a lowered
    /// one.
    fn now(&self) -> Option<(u64, Option<u64>)> {
        let file = if self.v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        let limit = std::fs::read_to_string(self.dir.join(file)).ok()?;
        Some((self.working_set()?, parse_limit(&limit)))
    }

    /// What the cgroup uses less its inactive page cache, which the kernel
    /// reclaims before it kills: the working set, as the kubelet reckons it.
    /// Socket buffers count (cgroup v2 charges them), and heap the allocator
    /// keeps after it was freed.
    fn working_set(&self) -> Option<u64> {
        let (usage, inactive) = if self.v2 {
            ("memory.current", "inactive_file")
        } else {
            ("memory.usage_in_bytes", "total_inactive_file")
        };
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).ok();
        let used = read(usage)?.trim().parse::<u64>().ok()?;
        let inactive = read("memory.stat")
            .and_then(|stat| {
                stat.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == inactive).then(|| v.trim().parse::<u64>().ok())?
                })
            })
            .unwrap_or(0);
        Some(used.saturating_sub(inactive))
    }
}

/// Called while memory is near the limit (the binary's heap trim): freed
/// heap the allocator kept would otherwise hold the proxy there.
static ON_PRESSURE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what to call while memory is near the limit.
pub fn on_pressure(f: fn()) {
    let _ = ON_PRESSURE.set(f);
}

/// Whether the proxy is near its container's memory limit: past 90 % of it
/// in use (the cgroup's working set), new requests are shed (503, not
/// processed) until it is back under 85 %. Its limits bound connections, but
/// not the bytes each request may hold (a stream's HTTP/2 window, 256 KiB,
/// and the socket buffers behind it, while the app reads slowly): a burst of
/// slow uploads would otherwise get the proxy OOM-killed, and every
/// connection of the pod with it. A sidecar's cgroup is its own; a proxy in a
/// cgroup shared with others (a host's service) sheds when they together
/// near its limit, which is then near too.
#[derive(Clone, Debug, Default)]
pub struct Pressure(Option<Arc<AtomicBool>>);

impl Pressure {
    /// Watched every `MEMORY_PRESSURE_EVERY` where the container has a
    /// limit; never high where it has none. On a runtime.
    pub fn of_own_cgroup() -> Self {
        match own_memory() {
            Some(m) if m.working_set().is_some() => Self::watch(m.limit, move || m.now()),
            _ => Pressure(None),
        }
    }

    fn watch(limit: u64, now: impl Fn() -> Option<(u64, Option<u64>)> + Send + 'static) -> Self {
        let high = Arc::new(AtomicBool::new(false));
        let flag = Arc::downgrade(&high);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(defaults::MEMORY_PRESSURE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut limit = Some(limit);
            loop {
                every.tick().await;
                let Some(flag) = flag.upgrade() else { return };
                let Some((used, limit_now)) = now() else {
                    continue;
                };
                if limit_now != limit {
                    tracing::info!(
                        was = limit,
                        now = limit_now,
                        "the container's memory limit changed: shedding follows it (the connection limit stays as fitted at start)"
                    );
                    limit = limit_now;
                }
                let was = flag.load(Ordering::Relaxed);
                let now = limit.is_some_and(|limit| high_after(was, used, limit));
                if now && let Some(f) = ON_PRESSURE.get() {
                    f();
                }
                if now != was {
                    flag.store(now, Ordering::Relaxed);
                    if now {
                        tracing::warn!(
                            used,
                            limit,
                            "near the container's memory limit: new requests are answered 503 until it is back under 85 %"
                        );
                    } else {
                        tracing::info!(used, limit, "back under 85 % of the memory limit");
                    }
                }
            }
        });
        Pressure(Some(high))
    }

    /// Set by hand (tests).
    pub fn fixed(high: bool) -> Self {
        Pressure(Some(Arc::new(AtomicBool::new(high))))
    }

    pub fn is_high(&self) -> bool {
        self.0.as_ref().is_some_and(|h| h.load(Ordering::Relaxed))
    }
}

/// High past 90 % of `limit`; once high, until under 85 %.
fn high_after(was: bool, used: u64, limit: u64) -> bool {
    let at = |pct: u64| limit / 100 * pct;
    if was { used >= at(85) } else { used > at(90) }
}

/// Connections per listener that fit in `limit` bytes with one listener
/// full (`MEMORY_PER_CONNECTION` each, after `MEMORY_RESERVE`), within
/// `MIN_MAX_CONNECTIONS` and the default `MAX_CONNECTIONS`. One: the inbound
/// listener is the one the network can fill; the outbound one holds the
/// app's own connections, and sizing for both full would halve what a
/// database's or a cache's pod may be connected to.
pub fn connections_within(limit: u64) -> usize {
    let n = limit.saturating_sub(defaults::MEMORY_RESERVE) / defaults::MEMORY_PER_CONNECTION;
    usize::try_from(n)
        .unwrap_or(usize::MAX)
        .clamp(defaults::MIN_MAX_CONNECTIONS, defaults::MAX_CONNECTIONS)
}

/// Whether `limit` bytes hold `n` connections on each listener, as
/// `connections_within` counts them (a `--max-connections` given).
pub fn holds(limit: u64, n: usize) -> bool {
    (n as u64)
        .saturating_mul(defaults::MEMORY_PER_CONNECTION)
        .saturating_add(defaults::MEMORY_RESERVE)
        <= limit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_read_from_either_cgroup_version() {
        let dir = tempfile_dir();
        let at_root = |d: &Path| memory_limit_under(d, "");
        assert_eq!(at_root(&dir), None, "no cgroup files");
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        assert_eq!(at_root(&dir), None, "v2, unlimited");
        std::fs::write(dir.join("memory.max"), "262144000\n").unwrap();
        assert_eq!(at_root(&dir), Some(262_144_000));
        // Its own cgroup's, where /proc/self/cgroup names one that exists.
        std::fs::create_dir_all(dir.join("kubepods/pod1/c1")).unwrap();
        std::fs::write(dir.join("kubepods/pod1/c1/memory.max"), "104857600").unwrap();
        assert_eq!(
            memory_limit_under(&dir, "0::/kubepods/pod1/c1\n"),
            Some(100 << 20)
        );
        assert_eq!(
            memory_limit_under(&dir, "0::/elsewhere\n"),
            Some(262_144_000),
            "a path outside this mount: the mount's own"
        );
        std::fs::remove_file(dir.join("memory.max")).unwrap();
        std::fs::create_dir_all(dir.join("memory/docker/abc")).unwrap();
        let v1 = dir.join("memory/memory.limit_in_bytes");
        std::fs::write(&v1, "9223372036854771712\n").unwrap();
        assert_eq!(at_root(&dir), None, "v1, unlimited");
        std::fs::write(&v1, "536870912\n").unwrap();
        assert_eq!(at_root(&dir), Some(512 << 20));
        std::fs::write(
            dir.join("memory/docker/abc/memory.limit_in_bytes"),
            "268435456",
        )
        .unwrap();
        assert_eq!(
            memory_limit_under(&dir, "12:pids:/docker/abc\n5:cpuacct,memory:/docker/abc\n"),
            Some(256 << 20)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The injected default (250 MiB) holds 6,976 connections per listener,
    /// the inbound one full of idle keep-alive connections (about 17 KiB
    /// each, measured) well inside it; no limit, or a large one, leaves the
    /// default.
    #[test]
    fn connections_fit_the_limit() {
        let n = connections_within(250 << 20);
        assert_eq!(n, 6_976);
        let idle_full = n as u64 * 17 * 1024 + defaults::MEMORY_RESERVE;
        assert!(idle_full < 250 << 20, "{idle_full}");
        assert_eq!(connections_within(4 << 30), defaults::MAX_CONNECTIONS);
        assert!(holds(250 << 20, n) && !holds(250 << 20, n + 1));
        assert!(holds(4 << 30, 50_000), "more than the default, given");
        assert!(!holds(250 << 20, 50_000));
        assert_eq!(connections_within(16 << 20), defaults::MIN_MAX_CONNECTIONS);
    }

    /// Shedding starts past 90 % of the limit and stops under 85 %, so a
    /// proxy hovering at the line does not flap; with no limit, never.
    #[test]
    fn pressure_is_high_past_90_percent_until_under_85() {
        let limit = 100 << 20;
        assert!(!high_after(false, limit / 100 * 90, limit));
        assert!(high_after(false, limit / 100 * 90 + 1, limit));
        assert!(high_after(true, limit / 100 * 86, limit));
        assert!(!high_after(true, limit / 100 * 85 - 1, limit));
        assert!(!Pressure::default().is_high(), "no limit: never high");
        // The working set: in use less the inactive page cache, of either
        // version's files.
        let dir = tempfile_dir();
        std::fs::write(dir.join("memory.max"), "1000000\n").unwrap();
        std::fs::write(dir.join("memory.current"), "600000\n").unwrap();
        std::fs::write(
            dir.join("memory.stat"),
            "anon 300000\nfile 300000\nactive_file 100000\ninactive_file 200000\n",
        )
        .unwrap();
        let m = memory_under(&dir, "").unwrap();
        assert_eq!((m.limit, m.working_set()), (1_000_000, Some(400_000)));
        std::fs::remove_file(dir.join("memory.max")).unwrap();
        std::fs::create_dir_all(dir.join("memory")).unwrap();
        std::fs::write(dir.join("memory/memory.limit_in_bytes"), "1000000").unwrap();
        std::fs::write(dir.join("memory/memory.usage_in_bytes"), "500000").unwrap();
        std::fs::write(
            dir.join("memory/memory.stat"),
            "inactive_file 1\ntotal_inactive_file 100000\n",
        )
        .unwrap();
        let m = memory_under(&dir, "").unwrap();
        assert_eq!(m.working_set(), Some(400_000));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The watch follows the memory in use: high once it passes 90 % of
    /// the limit, low again under 85 %.
    #[tokio::test(start_paused = true)]
    async fn pressure_follows_the_memory_in_use() {
        static USED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000);
        let p = Pressure::watch(10_000, || {
            Some((USED.load(Ordering::Relaxed), Some(10_000)))
        });
        let settle = || tokio::time::sleep(defaults::MEMORY_PRESSURE_EVERY * 2);
        settle().await;
        assert!(!p.is_high());
        USED.store(9_500, Ordering::Relaxed);
        settle().await;
        assert!(p.is_high());
        USED.store(8_000, Ordering::Relaxed);
        settle().await;
        assert!(!p.is_high());
    }

    /// A limit resized in place (a pod's `resize`, a VPA) is followed:
    /// raised, shedding stops; lowered, it starts; unlimited, never.
    #[tokio::test(start_paused = true)]
    async fn a_limit_resized_in_place_is_followed() {
        let dir = tempfile_dir();
        std::fs::write(dir.join("memory.max"), "1000000\n").unwrap();
        std::fs::write(dir.join("memory.current"), "950000\n").unwrap();
        std::fs::write(dir.join("memory.stat"), "inactive_file 0\n").unwrap();
        let m = memory_under(&dir, "").unwrap();
        let p = Pressure::watch(m.limit, move || m.now());
        let settle = || tokio::time::sleep(defaults::MEMORY_PRESSURE_EVERY * 2);
        settle().await;
        assert!(p.is_high(), "95 % of the limit");
        std::fs::write(dir.join("memory.max"), "4000000\n").unwrap();
        settle().await;
        assert!(
            !p.is_high(),
            "raised: still shedding at 90 % of the old limit"
        );
        std::fs::write(dir.join("memory.max"), "1000000\n").unwrap();
        settle().await;
        assert!(p.is_high(), "lowered again");
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        settle().await;
        assert!(!p.is_high(), "unlimited");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "strait-cgroup-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
