//! The open-file limit. Container runtimes often leave the soft one at 1,024
//! (containerd 2 under systemd does), which Go programs raise by themselves
//! and Rust ones do not: each connection takes a descriptor, so a proxy's few
//! hundred opaque streams, or a controller's connected proxies (two each for a
//! while after a certificate), would exhaust it, and the admin port's probes
//! with them.

/// Raises the soft limit on open files to the hard one. Returns the limit
/// now in force.
pub fn raise() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    // No hard limit (`None`): as far as the kernel's own (`nr_open`,
    // 1,048,576 by default) lets a soft one go.
    let want = cur.maximum.unwrap_or(1 << 20);
    if cur.current.is_some_and(|c| c < want) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: cur.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current
}
