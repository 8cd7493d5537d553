//! Freed heap goes back to the kernel. glibc returns only the top of its heap
//! by itself, so after a burst (many connections, a maximum-throughput load) a
//! proxy kept what the burst had allocated and freed: 1.2–1.6 MiB more RSS per
//! proxy, for good. Every `HEAP_TRIM_INTERVAL` the free pages are handed back
//! (`malloc_trim`), costing a walk of the free lists and one `madvise` per
//! free run of pages; a request allocating right after pays a page fault.
//!
//! glibc's per-thread cache (tcache) keeps up to seven freed chunks of each
//! small size for the thread to reuse, which `malloc_trim` leaves alone, and
//! the chunks it keeps pin the pages around them. After a maximum-throughput
//! load that left a proxy 0.4–0.5 MiB more resident (measured with
//! `malloc_stats`: the heap's free memory, not what was in use, had grown)
//! for good, and put it over 12 MiB at 2,000 req/s. The cache is off in the
//! proxy (`glibc.malloc.tcache_count=0`), at no CPU cost seen at 2,000 req/s
//! or at maximum throughput: the serving thread's allocations are few, and
//! glibc's arena is uncontended with one thread. With more (`--threads`), a
//! task's memory may be freed on another thread than the one that took it,
//! through the other arena's lock, which the cache would spare: the cache stays
//! on there. glibc reads the setting only at start, from `GLIBC_TUNABLES`, so
//! the proxy starts itself again with it set; an operator's own `tcache_count`
//! stands.
//!
//! Part of the binary, not the library, which forbids unsafe code: the one
//! call below is the binary's allocator policy, as a `#[global_allocator]`
//! would be.

use std::time::Duration;

pub use thread_cache::without as without_thread_cache;

/// Starting again with glibc's per-thread cache off (see the top of this file).
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
mod thread_cache {
    /// Where glibc reads its allocator settings from, at start.
    const TUNABLES: &str = "GLIBC_TUNABLES";
    const TCACHE_COUNT: &str = "glibc.malloc.tcache_count";
    /// Set for the process started again, so that it is started again once only,
    /// whatever glibc made of the tunables (it drops them for a privileged
    /// binary, `AT_SECURE`).
    const STARTED_AGAIN: &str = "STRAIT_PROXY_ALLOCATOR_SET";

    /// The `GLIBC_TUNABLES` to start again with, or `None` to run on as is: the
    /// cache is already set, by the operator or by an earlier start.
    fn tunables_to_set(current: Option<&std::ffi::OsStr>, started_again: bool) -> Option<String> {
        if started_again {
            return None;
        }
        let off = format!("{TCACHE_COUNT}=0");
        match current.map(|c| c.to_str()) {
            None => Some(off),
            Some(Some("")) => Some(off),
            Some(Some(c)) if c.contains(TCACHE_COUNT) => None,
            // First: glibc 2.36 shows only the first of them in
            // `/proc/<pid>/environ` (it applies them all).
            Some(Some(c)) => Some(format!("{off}:{c}")),
            // Not text: not glibc's to read either; left alone.
            Some(None) => None,
        }
    }

    /// Replaces the process with itself, the thread cache off (see above); returns
    /// only when that is not needed, with `None`, or cannot be done, with why,
    /// to run as it is. Call before any thread or descriptor is made.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub fn without() -> Option<String> {
        use std::os::unix::process::CommandExt as _;
        let current = std::env::var_os(TUNABLES);
        let tunables = tunables_to_set(
            current.as_deref(),
            std::env::var_os(STARTED_AGAIN).is_some(),
        )?;
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => return Some(format!("its executable cannot be read ({e})")),
        };
        let mut args = std::env::args_os();
        let Some(arg0) = args.next() else {
            return Some("started without a name (no argv[0])".into());
        };
        // Run through a loader (`ld.so strait-proxy run …`) or a tool, the
        // executable is the loader, not the proxy: started again with the
        // proxy's arguments, it would not be the proxy.
        if let Err(why) = is_self(&exe, &arg0, std::env::var_os("PATH").as_deref()) {
            return Some(why);
        }
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg0(arg0);
        // Returns only on failure (the binary replaced or gone since it started):
        // then the proxy runs with glibc's defaults.
        let e = cmd
            .args(args)
            .env(TUNABLES, tunables)
            .env(STARTED_AGAIN, "1")
            .exec();
        Some(format!(
            "{} could not be started again ({e})",
            exe.display()
        ))
    }

    /// Whether `arg0`, the name the process was started by (found through
    /// `path` when it has no `/`, as a shell finds it), is the file `exe`;
    /// if not, why not. Anything that cannot be read is not.
    fn is_self(
        exe: &std::path::Path,
        arg0: &std::ffi::OsStr,
        path: Option<&std::ffi::OsStr>,
    ) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt as _;
        let named = std::path::Path::new(arg0);
        // As `execvp` searches: the first executable file of that name.
        let executable = |p: &std::path::Path| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        };
        let found = if arg0.as_encoded_bytes().contains(&b'/') {
            named.to_path_buf()
        } else {
            path.into_iter()
                .flat_map(std::env::split_paths)
                .map(|dir| dir.join(named))
                .find(|p| executable(p))
                .ok_or_else(|| format!("started as {}, not found in PATH", named.display()))?
        };
        let id = |p: &std::path::Path| {
            std::fs::metadata(p)
                .map(|m| (m.dev(), m.ino()))
                .map_err(|e| format!("{} cannot be read ({e})", p.display()))
        };
        if id(&found)? == id(exe)? {
            Ok(())
        } else {
            Err(format!(
                "started as {} through {}, which is not it",
                found.display(),
                exe.display()
            ))
        }
    }

    /// Other C libraries have no such cache, or no such setting.
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub fn without() -> Option<String> {
        None
    }

    #[cfg(test)]
    mod tests {
        use super::{is_self, tunables_to_set};
        use std::ffi::OsStr;

        /// Started through a loader, the executable is the loader and the name
        /// the proxy's: no restart. A name found through `PATH`, or a link to
        /// the binary, is the binary.
        #[test]
        fn only_the_binary_itself_is_started_again() {
            use std::os::unix::fs::PermissionsExt as _;
            let dir = std::env::temp_dir().join(format!("strait-heap-{}", std::process::id()));
            for sub in ["bin", "data"] {
                std::fs::create_dir_all(dir.join(sub)).unwrap();
            }
            let proxy = dir.join("bin/strait-proxy");
            let loader = dir.join("ld-linux.so.2");
            std::fs::write(&proxy, "proxy").unwrap();
            std::fs::write(&loader, "loader").unwrap();
            let exec = std::fs::Permissions::from_mode(0o755);
            std::fs::set_permissions(&proxy, exec).unwrap();
            // Not executable, first in PATH: passed over, as a shell does.
            std::fs::write(dir.join("data/strait-proxy"), "data").unwrap();
            let link = dir.join("sidecar");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&proxy, &link).unwrap();
            let path = std::env::join_paths([dir.join("none"), dir.join("data"), dir.join("bin")])
                .unwrap();
            let path = Some(path.as_os_str());

            assert_eq!(is_self(&proxy, proxy.as_os_str(), None), Ok(()));
            assert_eq!(
                is_self(&proxy, link.as_os_str(), None),
                Ok(()),
                "a link to it"
            );
            assert_eq!(
                is_self(&proxy, OsStr::new("strait-proxy"), path),
                Ok(()),
                "found in PATH"
            );
            let through = is_self(&loader, proxy.as_os_str(), path).unwrap_err();
            assert!(
                through.ends_with("ld-linux.so.2, which is not it"),
                "{through}"
            );
            let not_found = "started as strait-proxy, not found in PATH";
            assert_eq!(
                is_self(&proxy, OsStr::new("strait-proxy"), None).unwrap_err(),
                not_found
            );
            assert_eq!(
                is_self(&proxy, OsStr::new("other"), path).unwrap_err(),
                "started as other, not found in PATH"
            );
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn the_cache_is_turned_off_once_and_an_operators_setting_stands() {
            let off = "glibc.malloc.tcache_count=0";
            assert_eq!(tunables_to_set(None, false).as_deref(), Some(off));
            assert_eq!(
                tunables_to_set(Some(OsStr::new("")), false).as_deref(),
                Some(off)
            );
            assert_eq!(
                tunables_to_set(Some(OsStr::new("glibc.malloc.trim_threshold=65536")), false)
                    .as_deref(),
                Some("glibc.malloc.tcache_count=0:glibc.malloc.trim_threshold=65536")
            );
            assert_eq!(
                tunables_to_set(Some(OsStr::new("glibc.malloc.tcache_count=3")), false),
                None,
                "the operator's own"
            );
            assert_eq!(tunables_to_set(None, true), None, "started again already");
        }
    }
}

/// Hands freed heap back to the kernel every `every`, for as long as the
/// runtime runs.
pub async fn return_freed(every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await;
    loop {
        tick.tick().await;
        trim();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() {
    // SAFETY: no arguments beyond the padding to keep; glibc takes each
    // arena's lock, so it is safe against every other thread's allocations.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other C libraries (musl) return freed memory themselves, or have no call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    fn anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("RssAnon")
    }

    /// Memory freed in the middle of the heap, which glibc keeps by itself,
    /// leaves the process when trimmed.
    #[test]
    fn freed_pages_in_the_middle_of_the_heap_leave_the_process() {
        // 16 MiB in 2 KiB blocks, every 64th kept: the rest is free, but the
        // kept ones pin the heap's top, so glibc returns none of it itself.
        let mut blocks: Vec<Vec<u8>> = (0..8192).map(|i| vec![i as u8; 2048]).collect();
        let kept: Vec<Vec<u8>> = blocks.iter_mut().step_by(64).map(std::mem::take).collect();
        drop(blocks);
        let before = anon_kib();
        super::trim();
        let after = anon_kib();
        assert!(
            before.saturating_sub(after) > 8 * 1024,
            "RssAnon {before} KiB -> {after} KiB"
        );
        assert!(kept.iter().all(|b| b.len() == 2048));
    }
}
