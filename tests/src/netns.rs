//! Pods made of Linux network namespaces, on a LAN of their own.
//!
//! A LAN is a namespace holding a bridge; each pod is a namespace with one veth
//! (`eth0`) on that bridge and its own address, and the host joins the bridge
//! through one more veth, so the test (and a controller it runs) reaches every
//! pod and every pod the host. The bridge lives outside the host's namespace so
//! the host's firewall (a `FORWARD` policy of DROP, br_netfilter) never sees pod
//! traffic. Everything is removed on drop, panics included: deleting the LAN's
//! namespace takes the bridge and every veth with it.
//!
//! Pods are dual-stack where the host has IPv6: an IPv6 address each on the
//! LAN's /64 too, and a default IPv6 route via the host.
//!
//! Needs root and iproute2; [`Lan::new`] says so (fails in CI, skips elsewhere).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::process::Proc;

/// A /24 of 10.0.0.0/8 with a bridge, the host at .1 and pods from .2; and
/// the same hosts on a /64 of fd00::/8 where IPv6 can be had.
pub struct Lan {
    net: [u8; 2],
    pods: u8,
    ipv6: bool,
}

/// A pod: a network namespace with `eth0` on the LAN and a default route via the host.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, where the LAN has IPv6.
    pub ip6: Option<Ipv6Addr>,
}

impl Lan {
    /// A new LAN, or `None` (after [`crate::host::missing`]) when this host
    /// cannot make one.
    pub fn new() -> Option<Lan> {
        if !is_root() || !have("ip") {
            crate::host::missing("root and iproute2 (network namespaces)");
            return None;
        }
        // The LAN's namespace is named for its subnet, so creating it claims the
        // subnet atomically against tests running in parallel.
        let start = std::process::id() as usize;
        for i in 0..2000 {
            let n = (start + i * 7919) % (50 * 256);
            let net = [200 + (n / 256) as u8, (n % 256) as u8];
            let mut lan = Lan {
                net,
                pods: 0,
                ipv6: false,
            };
            if ip(&["netns", "add", &lan.ns()]).is_err() {
                continue;
            }
            let (host, ns) = (lan.host_link(), lan.ns());
            let veth = [
                "link", "add", &host, "type", "veth", "peer", "name", "uplink", "netns", &ns,
            ];
            if ip(&veth).is_ok() {
                lan.ipv6 = lan.wire();
                return Some(lan);
            }
        }
        panic!("no free 10.x.y.0/24 for a test LAN");
    }

    fn host_link(&self) -> String {
        format!("strait-h{}-{}", self.net[0], self.net[1])
    }

    fn ns(&self) -> String {
        format!("strait-lan-{}-{}", self.net[0], self.net[1])
    }

    fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net[0], self.net[1], host)
    }

    fn addr6(&self, host: u8) -> Ipv6Addr {
        let [a, b] = self.net.map(u16::from);
        Ipv6Addr::new(0xfd00, a, b, 0, 0, 0, 0, u16::from(host))
    }

    /// The host's address on this LAN (where pods reach a controller on the host).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.addr(1)
    }

    /// Whether pods on this LAN have IPv6 addresses.
    pub fn has_ipv6(&self) -> bool {
        self.ipv6
    }

    /// Wires the LAN; whether it has IPv6.
    fn wire(&self) -> bool {
        let (ns, host) = (self.ns(), self.host_link());
        must(ip_in(&ns, &["link", "add", "br0", "type", "bridge"]));
        must(ip_in(&ns, &["link", "set", "uplink", "master", "br0"]));
        for link in ["br0", "uplink", "lo"] {
            must(ip_in(&ns, &["link", "set", link, "up"]));
        }
        let cidr = format!("{}/24", self.host_ip());
        must(ip(&["addr", "add", &cidr, "dev", &host]));
        must(ip(&["link", "set", &host, "up"]));
        // Without duplicate address detection, an address is usable at once.
        let cidr6 = format!("{}/64", self.addr6(1));
        ip(&["-6", "addr", "add", &cidr6, "dev", &host, "nodad"]).is_ok()
    }

    /// A new pod on this LAN.
    pub fn pod(&mut self, name: &str) -> Pod {
        self.pods += 1;
        assert!(self.pods < 250, "a LAN holds at most 249 pods");
        let mut pod = Pod {
            name: format!("strait-{}-{}-{name}", self.net[0], self.net[1]),
            ip: self.addr(self.pods + 1),
            ip6: None,
        };
        let (lan, port) = (self.ns(), format!("p{}", self.pods));
        must(ip(&["netns", "add", &pod.name]));
        must(ip_in(
            &lan,
            &["link", "add", &port, "type", "veth", "peer", "name", "eth0"],
        ));
        must(ip_in(&lan, &["link", "set", "eth0", "netns", &pod.name]));
        must(ip_in(&lan, &["link", "set", &port, "master", "br0", "up"]));
        let cidr = format!("{}/24", pod.ip);
        must(ip_in(&pod.name, &["addr", "add", &cidr, "dev", "eth0"]));
        must(ip_in(&pod.name, &["link", "set", "eth0", "up"]));
        must(ip_in(&pod.name, &["link", "set", "lo", "up"]));
        let via = self.host_ip().to_string();
        must(ip_in(&pod.name, &["route", "add", "default", "via", &via]));
        if self.ipv6 {
            let ip6 = self.addr6(self.pods + 1);
            let cidr6 = format!("{ip6}/64");
            must(ip_in(
                &pod.name,
                &["-6", "addr", "add", &cidr6, "dev", "eth0", "nodad"],
            ));
            let via6 = self.addr6(1).to_string();
            must(ip_in(
                &pod.name,
                &["-6", "route", "add", "default", "via", &via6],
            ));
            pod.ip6 = Some(ip6);
        }
        pod
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns()]);
        let _ = ip(&["link", "del", &self.host_link()]);
    }
}

impl Pod {
    /// A command run inside this pod's network namespace, as root.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `strait-proxy init` with `args` in this pod; panics with its stderr
    /// if it fails.
    pub fn init(&self, args: &[&str]) {
        let out = self
            .command(crate::process::binary("strait-proxy"))
            .arg("init")
            .args(args)
            .output()
            .expect("run strait-proxy init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Spawns `program` in this pod as `uid` (killed on drop).
    pub fn spawn_as(&self, uid: u32, program: PathBuf, args: &[String]) -> Proc {
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg(format!("--setuid={uid}"))
            .arg(format!("--setgid={uid}"))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        Proc {
            child: cmd.spawn().expect("spawn in pod"),
        }
    }
}

/// Code running inside a pod: a thread of its own in the pod's network
/// namespace, with its own runtime, so every socket it opens is the pod's (the
/// app side of a test: servers and clients alike). Stopped on drop.
pub struct InPod<T> {
    result: Option<tokio::sync::oneshot::Receiver<T>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl<T> InPod<T> {
    /// What the code returned; panics if it panicked.
    pub async fn join(mut self) -> T {
        let rx = self.result.take().expect("joined once");
        rx.await.expect("the code in the pod panicked")
    }
}

impl Pod {
    /// Runs `f`'s future inside this pod (see [`InPod`]).
    pub fn run<F, Fut>(&self, f: F) -> InPod<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future + 'static,
        Fut::Output: Send + 'static,
    {
        use std::os::fd::AsFd;
        let path = format!("/run/netns/{}", self.name);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("pod {}", self.name))
            .spawn(move || {
                let ns = std::fs::File::open(&path).expect("open the pod's namespace");
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .expect("enter the pod's namespace");
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime in the pod");
                rt.block_on(async move {
                    tokio::select! {
                        v = f() => { let _ = tx.send(v); }
                        _ = &mut stopped => {}
                    }
                });
            })
            .expect("a thread in the pod");
        InPod {
            result: Some(rx),
            _stop: stop,
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Whatever still runs in the pod goes with it: servers that fork or
        // daemonize (PostgreSQL, RabbitMQ's Erlang VM and epmd) outlive the
        // process the test started, and a namespace outlives its name.
        if let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stdin(Stdio::null())
            .output()
        {
            let pids: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter(|p| *p != std::process::id().to_string())
                .map(str::to_string)
                .collect();
            if !pids.is_empty() {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .args(&pids)
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Whether `program` is on the PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args))
}

fn ip_in(ns: &str, args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(["-n", ns]).args(args))
}

/// Runs a command to completion; its stderr is the error.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(r: Result<(), String>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}
