//! No core dumps. A process that aborts (a stack overflow, a fault in C
//! code, a signal from a debugging container) would leave its whole memory on
//! the node's disk, where a dump collector keeps it past the pod: the
//! proxy's workload key, the controller's issuer key. Panics unwind and dump
//! nothing either way.

/// Sets the core file size to zero, soft and hard, for this process and what
/// it starts.
pub fn off() {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    // Lowering a limit is always allowed; nothing to do if it fails.
    let _ = setrlimit(Resource::Core, none);
}
