//! Running the built binaries as separate processes.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};

/// The path of a binary built in this workspace's target dir (next to the test
/// executable's `deps/` folder).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests through cargo (cargo nextest run --workspace)",
        path.display()
    );
    path
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(bin: &str, args: &[String], envs: &[(&str, &str)]) -> Proc {
        Self::spawn_in(bin, args, envs, None)
    }

    /// Spawns with `cwd` as the working directory.
    pub fn spawn_in(
        bin: &str,
        args: &[String],
        envs: &[(&str, &str)],
        cwd: Option<&std::path::Path>,
    ) -> Proc {
        Self::spawn_path(binary(bin), args, envs, cwd)
    }

    /// Spawns the binary at `path` (another build of it, to compare against).
    pub fn spawn_path(
        path: PathBuf,
        args: &[String],
        envs: &[(&str, &str)],
        cwd: Option<&std::path::Path>,
    ) -> Proc {
        let mut cmd = Command::new(path);
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        cmd.args(args).envs(envs.iter().copied());
        Self::spawn_command(cmd)
    }

    /// Spawns `cmd` as made by the caller (an environment variable removed,
    /// another program in front), with no stdin, killed when dropped.
    pub fn spawn_command(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        Proc {
            child: cmd.spawn().expect("spawn binary"),
        }
    }

    /// Waits until `/ready` on `admin` answers 200; fails at once if the
    /// process exits first.
    pub async fn ready(&mut self, admin: std::net::SocketAddr, within: std::time::Duration) {
        let child = &mut self.child;
        crate::wait::ready_unless(admin, within, || {
            child.try_wait().ok().flatten().map(|s| s.to_string())
        })
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running child has a pid")
    }

    /// Sends SIGTERM (through kill(1), keeping this crate free of unsafe code).
    pub async fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Peak resident memory (VmHWM) and current (VmRSS), in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc status");
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }
}

/// A free loopback port (bound and released; good enough for tests on one machine).
/// Never one this process handed out before: two taken before either is bound
/// (a controller's gRPC and admin ports) could otherwise be the same.
///
/// Outside the kernel's ephemeral range (see `outside`): a port picked in it
/// (as `bind(0)` picks) is free only until some outgoing connection of any
/// test takes it as its local port, and the child that was to listen on it
/// then fails with "address in use". Each test process starts in a block of
/// its own (by pid), so tests running side by side seldom walk the same
/// ports, and claims each port it hands out with a lock held until it exits,
/// so they never hand out the same one.
pub fn free_port() -> u16 {
    const BLOCK: u32 = 64;
    static NEXT: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);
    static CLAIMED: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let (first, last) = unused_by_the_kernel();
    let span = last - first + 1;
    let mut next = NEXT.lock().unwrap_or_else(|p| p.into_inner());
    let start = *next.get_or_insert_with(|| {
        let blocks = (span / BLOCK).max(1);
        (std::process::id() % blocks) * BLOCK
    });
    for i in 0..span {
        let offset = (start + i) % span;
        let port = (first + offset) as u16;
        let claim = match claim(port) {
            Claim::Taken => continue,
            Claim::Held(file) => Some(file),
            Claim::Unsupported => None,
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            *next = Some(offset + 1);
            CLAIMED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(claim);
            return port;
        }
    }
    panic!("no free port in {first}..={last}");
}

enum Claim {
    Held(std::fs::File),
    /// Another test process holds it.
    Taken,
    /// No lock can be had here (an unwritable temporary directory): the
    /// bind alone decides.
    Unsupported,
}

/// A lock on `port` among the test processes of this machine, held while the
/// file is open (the kernel lets it go when the process exits, however).
fn claim(port: u16) -> Claim {
    let dir = std::env::temp_dir().join("strait-test-ports");
    let opened = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
    });
    let Ok(file) = opened else {
        return Claim::Unsupported;
    };
    match file.try_lock() {
        Ok(()) => Claim::Held(file),
        Err(std::fs::TryLockError::WouldBlock) => Claim::Taken,
        Err(std::fs::TryLockError::Error(_)) => Claim::Unsupported,
    }
}

/// Ports the kernel does not hand out on its own: outside its ephemeral range
/// (`ip_local_port_range`).
fn unused_by_the_kernel() -> (u32, u32) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    outside(range)
}

/// From 20000 to below the ephemeral range `(low, high)` when that leaves at
/// least 1,024 ports (Linux's default range does); else the larger of the
/// unprivileged ports below it and those above it, if it has 256; else, the
/// kernel taking nearly every port, a small window, which it may take too.
fn outside((low, high): (u32, u32)) -> (u32, u32) {
    const UNPRIVILEGED: u32 = 1024;
    if low > 20000 + 1024 {
        return (20000, low - 1);
    }
    let below = (UNPRIVILEGED, low.saturating_sub(1));
    let above = (high + 1, 65535);
    let size = |(a, b): (u32, u32)| (b + 1).saturating_sub(a);
    let larger = if size(below) >= size(above) {
        below
    } else {
        above
    };
    if size(larger) >= 256 {
        larger
    } else {
        (10000, 11023)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn listening_ports_are_picked_outside_the_kernels_range() {
        use super::outside;
        assert_eq!(outside((32768, 60999)), (20000, 32767), "Linux's default");
        assert_eq!(outside((15000, 28000)), (28001, 65535));
        assert_eq!(outside((1024, 50000)), (50001, 65535));
        assert_eq!(outside((8000, 65000)), (1024, 7999));
        assert_eq!(outside((1024, 65535)), (10000, 11023), "nothing outside");
    }
}
