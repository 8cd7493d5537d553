//! Freed heap goes back to the kernel. glibc returns only the top of its heap
//! by itself, so after a burst (many connections, a maximum-throughput load) a
//! proxy kept what the burst had allocated and freed: 1.2–1.6 MiB more RSS per
//! proxy, for good. Every `HEAP_TRIM_INTERVAL` the free pages are handed back
//! (`malloc_trim`), costing a walk of the free lists and one `madvise` per
//! free run of pages; a request allocating right after pays a page fault.
//!
//! Part of the binary, not the library, which forbids unsafe code: the one
//! call below is the binary's allocator policy, as a `#[global_allocator]`
//! would be.

use std::time::Duration;

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
fn trim() {
    // SAFETY: no arguments beyond the padding to keep; glibc takes each
    // arena's lock, so it is safe against every other thread's allocations.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other C libraries (musl) return freed memory themselves, or have no call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

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
