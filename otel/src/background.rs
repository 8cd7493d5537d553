//! The export thread's place in the scheduler. It wakes every `BATCH_DELAY`
//! after sleeping, and Linux's fair scheduler favours a thread that has slept:
//! its burst of conversion and encoding (a few milliseconds at 1,000 req/s)
//! ran ahead of requests arriving meanwhile, and those requests made the traced
//! proxy's p99. In the `SCHED_IDLE` class it gets a token share of the CPU
//! (a weight of 3 against an ordinary thread's 1,024) while the threads it
//! competes with want it, and a waking request preempts it. It competes with
//! the threads of its own cgroup: in a pod, the proxy's container, so it yields
//! to the proxy's serving threads, not to the app's. Under a load that leaves
//! it little time, spans wait in the bounded queue and, once it is full, are
//! dropped and counted, as for a collector that is down.

/// Puts the calling thread in `SCHED_IDLE`; an unprivileged thread may always
/// lower its own class.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn yield_to_serving() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` is initialised and
    // outlives the call, which only reads it; `SCHED_IDLE` takes priority 0.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// musl's `sched_setscheduler` is a stub, and other systems have no such class.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn yield_to_serving() -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "SCHED_IDLE is set on Linux with glibc only",
    ))
}

/// The scheduling policy in a `/proc/.../stat` line (its 41st field).
#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
pub(crate) fn policy_in(stat: &str) -> u32 {
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    after_name
        .split(' ')
        .nth(38)
        .and_then(|p| p.parse().ok())
        .expect("policy")
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn policy() -> u32 {
        policy_in(&std::fs::read_to_string("/proc/thread-self/stat").expect("stat"))
    }

    #[test]
    fn only_the_calling_thread_and_those_it_starts_go_idle() {
        let before = policy();
        let (idle, child) = std::thread::spawn(|| {
            yield_to_serving().expect("SCHED_IDLE");
            (policy(), std::thread::spawn(policy).join().expect("child"))
        })
        .join()
        .expect("thread");
        assert_eq!(idle, libc::SCHED_IDLE as u32);
        assert_eq!(
            child,
            libc::SCHED_IDLE as u32,
            "threads it starts inherit it"
        );
        assert_eq!(policy(), before, "other threads keep theirs");
        assert_ne!(before, libc::SCHED_IDLE as u32);
    }
}
