//! No core dumps. A process that aborts (a stack overflow, a fault in C
//! code, a signal from a debugging container) would leave its whole memory on
//! the node's disk, where a dump collector keeps it past the pod: the
//! proxy's workload key, the controller's issuer key. Panics unwind and dump
//! nothing either way.

/// Sets the core file size to one byte, soft and hard, for this process and
/// what it starts: below any core file's size, and the value Linux takes to
/// mean "no dump" where `core_pattern` pipes dumps to a handler (it ignores
/// the limit there otherwise, zero included).
pub fn off() {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let none = Rlimit {
        current: Some(1),
        maximum: Some(1),
    };
    // Lowering a limit is always allowed; nothing to do if it fails.
    let _ = setrlimit(Resource::Core, none);
}
