//! The proxy pair measured against a direct connection and the reference pairs, in
//! one run, scenarios interleaved (A B C D, D C B A, ...) so that ratios survive a
//! noisy machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strait_tests::backend::Backend;
use strait_tests::manifests::{ManifestDir, endpoint, meshed_pod, service};
use strait_tests::mesh::{ControllerProc, Sidecar, SidecarIdentity, SidecarOpts};
use strait_tests::pki::{Pki, token_file, token_secret};
use strait_tests::process::free_port;

use crate::load as generate;
use crate::refs::{self, Certs};

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
}

#[derive(Clone, Debug, Serialize)]
pub struct Load {
    pub label: String,
    pub proto: Proto,
    pub kind: Kind,
    pub seconds: u64,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum Kind {
    /// Requests per second in total, open loop (oha).
    Rate(u32),
    /// As fast as the connections go (h2load).
    Max,
    /// A new TCP connection for every request (HTTP/1.1).
    NewConnection,
    /// Opaque TCP: a new connection per 64-byte echo; "req/s" are connections/s.
    TcpConnections,
    /// Opaque TCP: this many bytes echoed over one connection; "req/s" are MB/s.
    TcpBulk(u64),
}

impl Load {
    fn tcp(&self) -> bool {
        matches!(self.kind, Kind::TcpConnections | Kind::TcpBulk(_))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub round: usize,
    pub scenario: String,
    pub load: String,
    pub achieved_rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub requests: u64,
    pub errors: u64,
    /// CPU seconds per second of each proxy process, per 1,000 requests/s.
    pub vcpu_per_krps: Vec<f64>,
    /// Each proxy process's peak RSS during this load (the kernel's high-water
    /// mark, reset to the RSS of the moment before it: so it includes what the
    /// allocator kept from the loads before).
    #[serde(default)]
    pub peak_rss_mib: Vec<f64>,
}

impl Sample {
    /// Whether the sample says anything of the scenario: a round with
    /// failed requests (their latency is in oha's percentiles, and a fast
    /// 502 is fast), or that served nothing (no CPU per request to speak
    /// of, which would read as the lowest), is left out of every table,
    /// plot and verdict.
    pub fn valid(&self) -> bool {
        self.errors == 0 && self.achieved_rps > 0.0
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Memory {
    pub scenario: String,
    pub process: String,
    pub idle_rss_mib: f64,
    pub peak_rss_mib: f64,
}

/// Memory held open by idle keep-alive connections, per proxy process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdleConns {
    pub scenario: String,
    pub process: String,
    pub connections: usize,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    pub kib_per_connection: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub machine: String,
    pub samples: Vec<Sample>,
    pub memory: Vec<Memory>,
    #[serde(default)]
    pub idle_conns: Vec<IdleConns>,
}

struct Target {
    name: &'static str,
    /// Where HTTP loads go (HTTP/1.1, HTTP/2 with prior knowledge) and opaque TCP
    /// loads; a target without one is not measured under those loads.
    h1: Option<SocketAddr>,
    h2: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    pids: Vec<(String, u32)>,
}

impl Target {
    fn addr(&self, load: &Load) -> Option<SocketAddr> {
        match (load.tcp(), load.proto) {
            (true, _) => self.tcp,
            (false, Proto::H1) => self.h1,
            (false, Proto::H2) => self.h2,
        }
    }
}

pub const CONNS: u32 = 16;

/// The well-known pairs strait is judged against (the HAProxy TCP pair only
/// carries the opaque TCP loads).
const REFERENCES: [&str; 3] = ["haproxy-mtls", "nginx-mtls", "haproxy-tcp-mtls"];

/// Keep-alive connections held open to measure memory per connection.
const IDLE_CONNECTIONS: usize = 10_000;

pub fn loads(quick: bool) -> Vec<Load> {
    let l = |label: &str, proto, kind, seconds| Load {
        label: label.to_string(),
        proto,
        kind,
        seconds,
    };
    if quick {
        return vec![
            l("h1 500/s", Proto::H1, Kind::Rate(500), 2),
            l("h2 500/s", Proto::H2, Kind::Rate(500), 2),
            l("h1 max", Proto::H1, Kind::Max, 1),
            l("h1 new conn", Proto::H1, Kind::NewConnection, 1),
            l("tcp conn", Proto::H1, Kind::TcpConnections, 1),
            l("tcp 8 MiB", Proto::H1, Kind::TcpBulk(8 << 20), 0),
        ];
    }
    vec![
        l("h1 1000/s", Proto::H1, Kind::Rate(1000), 10),
        l("h1 2000/s", Proto::H1, Kind::Rate(2000), 10),
        l("h2 1000/s", Proto::H2, Kind::Rate(1000), 10),
        l("h2 2000/s", Proto::H2, Kind::Rate(2000), 10),
        l("h1 max", Proto::H1, Kind::Max, 8),
        l("h2 max", Proto::H2, Kind::Max, 8),
        l("h1 new conn", Proto::H1, Kind::NewConnection, 8),
        l("tcp conn", Proto::H1, Kind::TcpConnections, 5),
        l("tcp 1 GiB", Proto::H1, Kind::TcpBulk(1 << 30), 0),
    ]
}

fn cpu_ticks(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3; utime and stime are fields 14 and 15.
    let num = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    num(14) + num(15)
}

/// Starts a new high-water mark of `pid`'s RSS (`clear_refs` 5); false when the
/// kernel refused, and the mark still covers everything before.
fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn rss_mib(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |n: &str| {
        s.lines()
            .find(|l| l.starts_with(n))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The strait pair: a controller, a server-side proxy in front of the backend and a
/// client-side proxy whose upstream listener the load generator talks to. With
/// `mtls`, the controller issues certificates and the proxies talk mTLS.
struct StraitPair {
    _dir: ManifestDir,
    _tokens: ManifestDir,
    _pki: Option<Pki>,
    _cp: ControllerProc,
    server: Sidecar,
    client: Sidecar,
}

impl StraitPair {
    fn target(&self, name: &'static str) -> Target {
        Target {
            name,
            h1: Some(self.client.upstreams[0]),
            h2: Some(self.client.upstreams[0]),
            tcp: Some(self.client.upstreams[1]),
            pids: vec![
                ("client proxy".into(), self.client.proc.pid()),
                ("server proxy".into(), self.server.proc.pid()),
            ],
        }
    }
}

/// A directory of this run's own, removed with everything in it when dropped,
/// however the run ends (an error, or the pair held until interrupted). A lock
/// on a file in it, held for the run's life, tells other runs it is in use.
struct Scratch {
    dir: PathBuf,
    _in_use: std::fs::File,
}

impl Scratch {
    const LOCK: &str = ".in-use";

    /// `parent/name-<pid>`. Those of earlier runs that were killed (ctrl-c
    /// during `bench proxy` runs no destructor), whose lock nobody holds, go
    /// first.
    fn new(parent: &std::path::Path, name: &str) -> anyhow::Result<Scratch> {
        let prefix = format!("{name}-");
        for e in std::fs::read_dir(parent)?.flatten() {
            let file_name = e.file_name();
            let ours = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .is_some_and(|p| p.parse::<u32>().is_ok());
            if ours && Self::unused(&e.path()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = parent.join(format!("{name}-{}", std::process::id()));
        // Left by an earlier process with this pid: not this run's.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let lock = std::fs::File::create(dir.join(Self::LOCK))?;
        lock.try_lock()
            .map_err(|e| anyhow::anyhow!("cannot lock {}: {e}", dir.display()))?;
        Ok(Scratch { dir, _in_use: lock })
    }

    /// No run holds `dir`'s lock (or it has none: a run that never got to
    /// take it).
    fn unused(dir: &std::path::Path) -> bool {
        match std::fs::File::open(dir.join(Self::LOCK)) {
            Ok(f) => f.try_lock().is_ok(),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The directory the proxies' copies are staged in: beside the build, on a
/// disk as the build is, where the page cache can drop them (a temporary
/// directory may be memory, whose pages stay).
fn staging(build: &std::path::Path) -> anyhow::Result<Scratch> {
    let dir = build.parent().unwrap_or(std::path::Path::new("."));
    Scratch::new(dir, "bench-staged")
}

/// A copy of the proxy binary at `from`, in `work`, synced and dropped from the
/// page cache before anything runs it. How much of its code a proxy's RSS
/// counts depends on how the file's pages came into the page cache: a page
/// fault maps the whole folio it falls in, and a file just written (by the
/// linker, or copied) sits there in other folios than one read through `exec`'s
/// own faults, as from a container image. By hand, one binary showed 7.06–7.15
/// MiB file-backed as copied, 6.36–6.58 as written in 4 KiB blocks and
/// 6.63–6.68 as dropped and read back: more than the difference between two
/// builds that a `--baseline` run is for. Staged alike, builds start alike.
fn staged(work: &std::path::Path, name: &str, from: &std::path::Path) -> anyhow::Result<PathBuf> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let to = dir.join("strait-proxy");
    std::fs::copy(from, &to)?;
    std::fs::File::open(&to)?.sync_all()?;
    // posix_fadvise(POSIX_FADV_DONTNEED), through dd (coreutils) to keep this
    // crate free of unsafe code.
    let dropped = std::process::Command::new("dd")
        .arg(format!("if={}", to.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status()?;
    anyhow::ensure!(
        dropped.success(),
        "dd could not drop {} from the page cache",
        to.display()
    );
    Ok(to)
}

/// `backend` serves HTTP, `echo` opaque TCP (as a database port, 5432).
async fn strait_pair(
    backend: SocketAddr,
    echo: SocketAddr,
    mtls: bool,
    binary: PathBuf,
    args: Vec<String>,
) -> StraitPair {
    let dir = ManifestDir::new();
    let tokens = ManifestDir::new();
    dir.write("service.yaml", &service("bench", "backend", 80));
    dir.write("service-db.yaml", &service("bench", "db", 5432));
    let pki = mtls.then(Pki::new);
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let cp = ControllerProc::start_with(dir.path(), grpc, pki.as_ref(), None).await;
    let opts = |sa: &str| SidecarOpts {
        identity: pki.as_ref().map(|p| {
            let token = format!("bench-token-of-{sa}");
            dir.write(
                &format!("token-{sa}.yaml"),
                &token_secret("bench", sa, &token),
            );
            SidecarIdentity {
                anchors: p.anchors(),
                token_file: token_file(tokens.path(), sa, &token),
                service_account: sa.to_string(),
            }
        }),
        cwd: None,
        binary: Some(binary.clone()),
        args: args.clone(),
    };
    let server = Sidecar::start_with(cp.grpc, "bench", "backend-0", &[], opts("backend")).await;
    dir.write(
        "pod.yaml",
        &meshed_pod("bench", "backend-0", "backend", server.inbound.port()),
    );
    dir.write(
        "slice.yaml",
        &endpoint("bench", "backend", "backend-0", backend),
    );
    dir.write("slice-db.yaml", &endpoint("bench", "db", "backend-0", echo));
    let client = Sidecar::start_with(
        cp.grpc,
        "bench",
        "client-0",
        &[
            "backend.bench.svc.cluster.local:80",
            "db.bench.svc.cluster.local:5432",
        ],
        opts("client"),
    )
    .await;
    StraitPair {
        _dir: dir,
        _tokens: tokens,
        _pki: pki,
        _cp: cp,
        server,
        client,
    }
}

/// With a binary, the mTLS pair exporting a span per request (100 % sampling)
/// to a collector that takes every span and keeps none: what tracing costs the
/// proxies, not what storing spans costs the bench.
async fn traced_pair(
    backend: SocketAddr,
    echo: SocketAddr,
    binary: Option<PathBuf>,
) -> Option<(strait_tests::otlp::OtlpCollector, StraitPair)> {
    let binary = binary?;
    let collector =
        strait_tests::otlp::OtlpCollector::start(strait_tests::otlp::Mode::Discard).await;
    let args = vec![
        format!("--otlp-endpoint={}", collector.endpoint()),
        "--trace-sampling=1".into(),
    ];
    let pair = strait_pair(backend, echo, true, binary, args).await;
    Some((collector, pair))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .unwrap_or("0")
                .parse::<u64>()
                .unwrap_or(0)
                / 1024
                / 1024
        })
        .unwrap_or(0);
    format!(
        "{} vCPU ({cpu}), {mem} GiB",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}

/// Runs every scenario under every load (only those labelled in `only`, and
/// only the scenarios named in `scenarios` beside direct, when given),
/// `rounds` times, interleaved.
pub async fn run(
    quick: bool,
    rounds: usize,
    only: &[String],
    scenarios: &[String],
    baseline: Option<PathBuf>,
    with_tracing: bool,
) -> anyhow::Result<Results> {
    let loads: Vec<Load> = loads(quick)
        .into_iter()
        .filter(|l| only.is_empty() || only.contains(&l.label))
        .collect();
    anyhow::ensure!(
        !loads.is_empty(),
        "no load is labelled {only:?}; the labels are {:?}",
        self::loads(quick)
            .iter()
            .map(|l| l.label.clone())
            .collect::<Vec<_>>()
    );
    let work = Scratch::new(&std::env::temp_dir(), "strait-bench")?;
    refs::raise_open_files();
    let backend = Backend::start().await;
    let echo = strait_tests::tcp::echo().await;
    let certs = Certs::generate(&work.join("certs")).await?;
    if let Some(b) = &baseline {
        anyhow::ensure!(b.exists(), "--baseline: {} not found", b.display());
    }
    // A copy per pair: the pages one pair's processes bring into the page
    // cache would otherwise be mapped by another pair's for free.
    let build = strait_tests::process::binary("strait-proxy");
    let stage = staging(&build)?;
    let plain = staged(&stage, "strait", &build)?;
    let mtls = staged(&stage, "strait-mtls", &build)?;
    let baseline = baseline
        .map(|b| staged(&stage, "strait-mtls-before", &b))
        .transpose()?;
    let traced = with_tracing
        .then(|| staged(&stage, "strait-mtls-traced", &build))
        .transpose()?;
    let pair = strait_pair(backend.addr, echo, false, plain, Vec::new()).await;
    let mtls = strait_pair(backend.addr, echo, true, mtls, Vec::new()).await;
    let before = match baseline {
        Some(b) => Some(strait_pair(backend.addr, echo, true, b, Vec::new()).await),
        None => None,
    };
    let traced = traced_pair(backend.addr, echo, traced).await;
    let mut hap = refs::haproxy(
        &certs,
        &work,
        backend.addr,
        [free_port(), free_port(), free_port()],
    )?;
    let mut ngx = refs::nginx(
        &certs,
        &work,
        backend.addr,
        [free_port(), free_port(), free_port()],
    )?;
    let mut hap_h2 = refs::haproxy_h2(
        &certs,
        &work,
        backend.addr,
        [free_port(), free_port(), free_port()],
    )?;
    let mut hap_tcp = refs::haproxy_tcp(&certs, &work, echo, [free_port(), free_port()])?;
    // The reference proxies report no readiness: wait until each answers.
    strait_tests::wait::until(
        "the HAProxy TCP pair listening",
        Duration::from_secs(10),
        || async { tokio::net::TcpStream::connect(hap_tcp.h1).await.is_ok() },
    )
    .await;
    for addr in [hap.h1, ngx.h1, hap_h2.h1] {
        let c = strait_tests::client::http1();
        strait_tests::wait::until(&format!("{addr} answering"), Duration::from_secs(10), || {
            let c = c.clone();
            async move { matches!(strait_tests::client::get(&c, &format!("http://{addr}/1k")).await, Ok((s, _)) if s == 200) }
        })
        .await;
    }
    let pid = |c: &tokio::process::Child| c.id().unwrap_or(0);
    let mut targets = vec![
        Target {
            name: "direct",
            h1: Some(backend.addr),
            h2: Some(backend.addr),
            tcp: Some(echo),
            pids: vec![],
        },
        pair.target("strait"),
        mtls.target("strait-mtls"),
    ];
    if let Some(b) = &before {
        targets.push(b.target("strait-mtls-before"));
    }
    if let Some((_, t)) = &traced {
        targets.push(t.target("strait-mtls-traced"));
    }
    targets.extend([
        Target {
            name: hap.name,
            h1: Some(hap.h1),
            h2: Some(hap.h2),
            tcp: None,
            pids: vec![
                ("client proxy".into(), pid(&hap.client)),
                ("server proxy".into(), pid(&hap.server)),
            ],
        },
        Target {
            name: ngx.name,
            h1: Some(ngx.h1),
            h2: Some(ngx.h2),
            tcp: None,
            pids: vec![
                ("client proxy".into(), pid(&ngx.client)),
                ("server proxy".into(), pid(&ngx.server)),
            ],
        },
        Target {
            name: hap_h2.name,
            h1: Some(hap_h2.h1),
            h2: Some(hap_h2.h2),
            tcp: None,
            pids: vec![
                ("client proxy".into(), pid(&hap_h2.client)),
                ("server proxy".into(), pid(&hap_h2.server)),
            ],
        },
        Target {
            name: hap_tcp.name,
            h1: None,
            h2: None,
            tcp: Some(hap_tcp.h1),
            pids: vec![
                ("client proxy".into(), pid(&hap_tcp.client)),
                ("server proxy".into(), pid(&hap_tcp.server)),
            ],
        },
    ]);
    if let Some(unknown) = scenarios
        .iter()
        .find(|n| !targets.iter().any(|t| t.name == n.as_str()))
    {
        anyhow::bail!(
            "--scenario {unknown:?}: the scenarios are {:?}",
            targets.iter().map(|t| t.name).collect::<Vec<_>>()
        );
    }
    targets.retain(|t| {
        scenarios.is_empty() || t.name == "direct" || scenarios.iter().any(|n| n == t.name)
    });
    let idle: Vec<Vec<f64>> = targets
        .iter()
        .map(|t| t.pids.iter().map(|(_, p)| rss_mib(*p).0).collect())
        .collect();

    let mut samples = Vec::new();
    for round in 0..rounds {
        for load in loads.iter().cloned() {
            // Every other round in the reverse order, so that no scenario always
            // follows the same one: a pair compared with the one run just before
            // it (traced after untraced) would otherwise carry whatever running
            // second costs or saves.
            let order: Vec<&Target> = if round % 2 == 0 {
                targets.iter().collect()
            } else {
                targets.iter().rev().collect()
            };
            for t in order {
                let Some(addr) = t.addr(&load) else {
                    continue;
                };
                let before: Vec<u64> = t.pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
                let peaks_reset = t.pids.iter().all(|(_, p)| reset_peak_rss(*p));
                let started = Instant::now();
                let m = match load.kind {
                    Kind::Rate(rate) => generate::oha(addr, &load, rate).await?,
                    Kind::Max => generate::h2load(addr, &load, &work).await?,
                    Kind::NewConnection => generate::new_connections(addr, load.seconds).await?,
                    Kind::TcpConnections => generate::tcp_connections(addr, load.seconds).await?,
                    Kind::TcpBulk(bytes) => generate::tcp_bulk(addr, bytes).await?,
                };
                let wall = started.elapsed().as_secs_f64();
                let vcpu_per_krps = t
                    .pids
                    .iter()
                    .zip(&before)
                    .map(|((_, p), b)| {
                        let cpu_s = (cpu_ticks(*p) - b) as f64 / 100.0;
                        if m.rps > 0.0 {
                            (cpu_s / wall) / (m.rps / 1000.0)
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let peak_rss_mib = if peaks_reset {
                    t.pids.iter().map(|(_, p)| rss_mib(*p).1).collect()
                } else {
                    Vec::new()
                };
                let s = Sample {
                    round,
                    scenario: t.name.to_string(),
                    load: load.label.clone(),
                    achieved_rps: m.rps,
                    p50_ms: m.pct[0],
                    p90_ms: m.pct[1],
                    p99_ms: m.pct[2],
                    p999_ms: m.pct[3],
                    requests: m.requests,
                    errors: m.errors,
                    vcpu_per_krps,
                    peak_rss_mib,
                };
                eprintln!(
                    "round {round} {:<13} {:<12} {:>8.0} req/s  p50 {:.3}  p99 {:.3}  p99.9 {:.3} ms  errors {}{}",
                    s.scenario,
                    s.load,
                    s.achieved_rps,
                    s.p50_ms,
                    s.p99_ms,
                    s.p999_ms,
                    s.errors,
                    if s.valid() {
                        ""
                    } else {
                        "  (left out: invalid)"
                    }
                );
                samples.push(s);
            }
        }
    }
    let mut memory = Vec::new();
    for (t, idle) in targets.iter().zip(idle) {
        for (i, ((role, p), idle)) in t.pids.iter().zip(idle).enumerate() {
            // The mark is reset before each load, so the peak over the run is the
            // highest of the loads' (or the mark itself, had the resets failed).
            let peak = samples
                .iter()
                .filter(|s| s.scenario == t.name)
                .filter_map(|s| s.peak_rss_mib.get(i).copied())
                .reduce(f64::max)
                .unwrap_or_else(|| rss_mib(*p).1);
            memory.push(Memory {
                scenario: t.name.to_string(),
                process: role.clone(),
                idle_rss_mib: idle,
                peak_rss_mib: peak,
            });
        }
    }
    // Memory per connection: keep-alive connections that each carried one
    // request, held open at once, against each HTTP pair in turn.
    let conns = if quick { 200 } else { IDLE_CONNECTIONS };
    let mut idle_conns = Vec::new();
    for t in targets
        .iter()
        .filter(|t| t.h1.is_some() && !t.pids.is_empty())
    {
        let before: Vec<f64> = t.pids.iter().map(|(_, p)| rss_mib(*p).0).collect();
        // A failure here costs this figure, not the rounds already measured.
        let held = match generate::idle_connections(t.h1.expect("filtered"), conns).await {
            Ok(held) => held,
            Err(e) => {
                eprintln!("{}: idle connections not measured: {e:#}", t.name);
                continue;
            }
        };
        for ((role, p), before) in t.pids.iter().zip(before) {
            let after = rss_mib(*p).0;
            idle_conns.push(IdleConns {
                scenario: t.name.to_string(),
                process: role.clone(),
                connections: held.len(),
                rss_before_mib: before,
                rss_after_mib: after,
                kib_per_connection: (after - before) * 1024.0 / held.len() as f64,
            });
        }
        eprintln!("{} held {} idle connections", t.name, held.len());
    }
    let _ = (
        hap.client.start_kill(),
        hap.server.start_kill(),
        ngx.client.start_kill(),
        ngx.server.start_kill(),
        hap_h2.client.start_kill(),
        hap_h2.server.start_kill(),
        hap_tcp.client.start_kill(),
        hap_tcp.server.start_kill(),
    );
    Ok(Results {
        machine: machine(),
        samples,
        memory,
        idle_conns,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        n => v[n / 2],
    }
}

/// One row per scenario and load: medians over rounds.
/// The same figures as ratios, which survive a noisy machine better than
/// absolute times: each pair's p99 to `direct`'s and to the better reference
/// pair's, its throughput to the HAProxy pair's, and its CPU (mean of the two
/// proxies) to the better reference pair's.
fn ratios(rows: &[(String, String, Sample)]) -> String {
    let mut out = String::from(
        "\n| load | scenario | p99 / direct | p99 / best reference | req/s / HAProxy pair | vCPU / best reference |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    // A proxy a load does not pass (the plaintext pair's server side under
    // opaque TCP, which goes straight to the backend) is not averaged in.
    let cpu = |s: &Sample| {
        let busy: Vec<f64> = s
            .vcpu_per_krps
            .iter()
            .copied()
            .filter(|v| *v > 0.0)
            .collect();
        if busy.is_empty() {
            f64::NAN
        } else {
            busy.iter().sum::<f64>() / busy.len() as f64
        }
    };
    for (load, scenario, s) in rows.iter().filter(|r| r.1 != "direct") {
        let of = |name: &str| {
            rows.iter()
                .find(|(l, sc, _)| l == load && sc == name)
                .map(|r| &r.2)
        };
        let refs: Vec<&Sample> = REFERENCES.iter().filter_map(|n| of(n)).collect();
        // No reference in the run (`--scenario` left them out): no ratio,
        // rather than a figure over infinity read as 0.00.
        let best = |f: &dyn Fn(&Sample) -> f64| refs.iter().map(|r| f(r)).fold(f64::NAN, f64::min);
        let best_p99 = best(&|r| r.p99_ms);
        let best_cpu = best(&cpu);
        let fmt = |x: f64| {
            if x.is_finite() {
                format!("{x:.2}")
            } else {
                "-".to_string()
            }
        };
        out.push_str(&format!(
            "| {load} | {scenario} | {} | {} | {} | {} |\n",
            fmt(of("direct").map_or(f64::NAN, |d| s.p99_ms / d.p99_ms)),
            fmt(s.p99_ms / best_p99),
            fmt(of("haproxy-mtls")
                .or_else(|| of("haproxy-tcp-mtls"))
                .map_or(f64::NAN, |h| s.achieved_rps / h.achieved_rps)),
            fmt(cpu(s) / best_cpu),
        ));
    }
    out
}

pub fn summary(r: &Results) -> Vec<(String, String, Sample)> {
    let mut rows = Vec::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    for s in &r.samples {
        let k = (s.load.clone(), s.scenario.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (load, scenario) in keys {
        let ss: Vec<&Sample> = r
            .samples
            .iter()
            .filter(|s| s.load == load && s.scenario == scenario && s.valid())
            .collect();
        if ss.is_empty() {
            continue;
        }
        let m = |f: fn(&Sample) -> f64| median(ss.iter().map(|s| f(s)).collect());
        let n = ss.first().map_or(0, |s| s.vcpu_per_krps.len());
        let vcpu = (0..n)
            .map(|i| median(ss.iter().map(|s| s.vcpu_per_krps[i]).collect()))
            .collect();
        let peaks: Vec<&Vec<f64>> = ss
            .iter()
            .map(|s| &s.peak_rss_mib)
            .filter(|p| p.len() == n)
            .collect();
        let peak_rss_mib = if n > 0 && !peaks.is_empty() {
            (0..n)
                .map(|i| median(peaks.iter().map(|p| p[i]).collect()))
                .collect()
        } else {
            Vec::new()
        };
        rows.push((
            load.clone(),
            scenario.clone(),
            Sample {
                round: ss.len(),
                scenario,
                load,
                achieved_rps: m(|s| s.achieved_rps),
                p50_ms: m(|s| s.p50_ms),
                p90_ms: m(|s| s.p90_ms),
                p99_ms: m(|s| s.p99_ms),
                p999_ms: m(|s| s.p999_ms),
                requests: ss.iter().map(|s| s.requests).sum(),
                errors: ss.iter().map(|s| s.errors).sum(),
                vcpu_per_krps: vcpu,
                peak_rss_mib,
            },
        ));
    }
    rows
}

pub fn markdown(r: &Results) -> String {
    let rows = summary(r);
    let mut out = format!(
        "Machine: {}. Medians over rounds; latency in ms; vCPU per 1,000 requests/s for the client-side / server-side proxy. Under `tcp conn` req/s are connections/s; under `tcp <size>` they are MB/s each way (vCPU per 1,000 MB/s) and the latency is the whole transfer's.\n\n",
        r.machine
    );
    out.push_str("| load | scenario | req/s | p50 | p90 | p99 | p99.9 | errors | vCPU/1k req/s | peak RSS MiB | p99 added over direct | p99 added vs best reference |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for (load, scenario, s) in &rows {
        let direct = rows
            .iter()
            .find(|(l, sc, _)| l == load && sc == "direct")
            .map(|r| r.2.p99_ms);
        // Without a direct row (its every round left out), nothing is
        // added over it: said as "-", not as nothing added.
        let best_ref = rows
            .iter()
            .filter(|(l, sc, _)| l == load && REFERENCES.contains(&sc.as_str()))
            .filter_map(|r| Some(r.2.p99_ms - direct?))
            .fold(f64::INFINITY, f64::min);
        let added = direct.map(|d| s.p99_ms - d);
        let vcpu: Vec<String> = s.vcpu_per_krps.iter().map(|v| format!("{v:.3}")).collect();
        let peak: Vec<String> = s.peak_rss_mib.iter().map(|v| format!("{v:.1}")).collect();
        let vs_ref = match added {
            Some(a) if scenario != "direct" && best_ref.is_finite() => {
                format!("{:+.3}", a - best_ref)
            }
            _ => "-".to_string(),
        };
        out.push_str(&format!(
            "| {load} | {scenario} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} |\n",
            s.achieved_rps,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.p999_ms,
            s.errors,
            if vcpu.is_empty() {
                "-".into()
            } else {
                vcpu.join(" / ")
            },
            if peak.is_empty() {
                "-".into()
            } else {
                peak.join(" / ")
            },
            match added {
                Some(a) if scenario != "direct" => format!("{a:+.3}"),
                _ => "-".into(),
            },
            vs_ref
        ));
    }
    out.push_str(&ratios(&rows));
    out.push_str(&verdicts(r));
    let valid: Vec<Sample> = r.samples.iter().filter(|s| s.valid()).cloned().collect();
    out.push_str(&mtls_cost(&rows, &valid));
    out.push_str(&tracing_cost(&rows, &valid));
    out.push_str(&baseline_cost(&rows, &valid));
    for s in r.samples.iter().filter(|s| !s.valid()) {
        out.push_str(&format!(
            "\nLeft out: round {} of {} under {} ({} errors, {:.0} req/s).\n",
            s.round, s.scenario, s.load, s.errors, s.achieved_rps
        ));
    }
    out.push_str(
        "\n| scenario | process | idle RSS MiB | peak RSS MiB |\n| --- | --- | --- | --- |\n",
    );
    for m in &r.memory {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} |\n",
            m.scenario, m.process, m.idle_rss_mib, m.peak_rss_mib
        ));
    }
    if !r.idle_conns.is_empty() {
        out.push_str("\n| scenario | process | idle keep-alive connections | RSS MiB before -> after | KiB per connection |\n| --- | --- | --- | --- | --- |\n");
        for i in &r.idle_conns {
            out.push_str(&format!(
                "| {} | {} | {} | {:.1} -> {:.1} | {:.1} |\n",
                i.scenario,
                i.process,
                i.connections,
                i.rss_before_mib,
                i.rss_after_mib,
                i.kib_per_connection
            ));
        }
    }
    out
}

/// min..max over rounds.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(v: Vec<f64>) -> Option<Spread> {
        (!v.is_empty()).then(|| Spread {
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            median: median(v),
        })
    }

    fn show(&self) -> String {
        format!("{:.3} ({:.3}–{:.3})", self.median, self.min, self.max)
    }

    /// Lower or higher than `other` only if the ranges do not overlap.
    fn verdict(&self, other: &Spread) -> &'static str {
        if self.max < other.min {
            "lower"
        } else if self.min > other.max {
            "higher"
        } else {
            "within spread"
        }
    }
}

/// The strait mTLS pair against the better reference pair, per fixed-rate load,
/// with the spread between rounds: latency added over direct (paired by round)
/// and each proxy's vCPU per 1,000 requests/s. A verdict only where the rounds'
/// ranges do not overlap.
fn verdicts(r: &Results) -> String {
    let mut loads: Vec<&str> = Vec::new();
    for s in &r.samples {
        if s.load.ends_with("/s") && !loads.contains(&s.load.as_str()) {
            loads.push(&s.load);
        }
    }
    let rounds = |load: &str, scenario: &str| -> Vec<&Sample> {
        r.samples
            .iter()
            .filter(|s| s.load == load && s.scenario == scenario && s.valid())
            .collect()
    };
    let added = |load: &str, scenario: &str, f: fn(&Sample) -> f64| {
        let direct = rounds(load, "direct");
        Spread::of(
            rounds(load, scenario)
                .iter()
                .filter_map(|s| {
                    let d = direct.iter().find(|d| d.round == s.round)?;
                    Some(f(s) - f(d))
                })
                .collect(),
        )
    };
    let cpu = |load: &str, scenario: &str, i: Option<usize>| {
        Spread::of(
            rounds(load, scenario)
                .iter()
                .filter(|s| !s.vcpu_per_krps.is_empty())
                .map(|s| match i {
                    Some(i) => s.vcpu_per_krps.get(i).copied().unwrap_or(f64::NAN),
                    None => s.vcpu_per_krps.iter().sum::<f64>() / s.vcpu_per_krps.len() as f64,
                })
                .collect(),
        )
    };
    let peak = |load: &str, scenario: &str, i: usize| {
        Spread::of(
            rounds(load, scenario)
                .iter()
                .filter_map(|s| s.peak_rss_mib.get(i).copied())
                .collect(),
        )
    };
    // The HTTP reference pair with the lower median of a figure.
    let better = |f: &dyn Fn(&str) -> Option<Spread>| {
        ["haproxy-mtls", "nginx-mtls"]
            .into_iter()
            .filter_map(|n| Some((n, f(n)?)))
            .min_by(|a, b| a.1.median.total_cmp(&b.1.median))
    };
    let mut out = String::new();
    for load in loads {
        let Some(strait_p50) = added(load, "strait-mtls", |s| s.p50_ms) else {
            continue;
        };
        // The better reference: lower median p50 added.
        let Some((best, ref_p50)) = better(&|n| added(load, n, |s| s.p50_ms)) else {
            continue;
        };
        if out.is_empty() {
            out.push_str("\nstrait-mtls against the better reference pair, median (min–max) over rounds; a verdict only where the ranges do not overlap:\n\n| load | figure | strait-mtls | better reference | verdict |\n| --- | --- | --- | --- | --- |\n");
        }
        let mut row = |what: String, a: Option<Spread>, b: Option<Spread>| {
            if let (Some(a), Some(b)) = (a, b) {
                out.push_str(&format!(
                    "| {load} | {what} | {} | {} | {} |\n",
                    a.show(),
                    b.show(),
                    a.verdict(&b)
                ));
            }
        };
        row(
            format!("p50 added over direct, ms ({best})"),
            Some(strait_p50),
            Some(ref_p50),
        );
        let best_p99 = better(&|n| added(load, n, |s| s.p99_ms));
        if let Some((n, p99)) = best_p99 {
            row(
                format!("p99 added over direct, ms ({n})"),
                added(load, "strait-mtls", |s| s.p99_ms),
                Some(p99),
            );
        }
        // The better reference pair (lower mean of its two proxies), each strait
        // proxy against the reference proxy in the same role.
        let best_cpu = better(&|n| cpu(load, n, None));
        if let Some((n, _)) = best_cpu {
            for (i, role) in ["client", "server"].iter().enumerate() {
                row(
                    format!("vCPU/1k req/s, {role} proxy (vs {n}'s)"),
                    cpu(load, "strait-mtls", Some(i)),
                    cpu(load, n, Some(i)),
                );
            }
            for (i, role) in ["client", "server"].iter().enumerate() {
                row(
                    format!("peak RSS MiB, {role} proxy (vs {n}'s)"),
                    peak(load, "strait-mtls", i),
                    peak(load, n, i),
                );
            }
        }
    }
    out
}

/// What tracing every request costs: the mTLS pair exporting a client and a
/// server span per request against the same pair without tracing.
fn tracing_cost(rows: &[(String, String, Sample)], samples: &[Sample]) -> String {
    cost_table(
        rows,
        samples,
        ("strait-mtls", "strait-mtls-traced"),
        "traced vs not (strait-mtls, 100 % sampling)",
        "off -> on",
        true,
    )
}

/// What a change costs: the mTLS pair against the same pair on the
/// `--baseline` build, paired by round like the tracing cost.
fn baseline_cost(rows: &[(String, String, Sample)], samples: &[Sample]) -> String {
    cost_table(
        rows,
        samples,
        ("strait-mtls-before", "strait-mtls"),
        "this build vs --baseline (strait-mtls)",
        "before -> this build",
        true,
    )
}

/// What mTLS costs strait: the mTLS pair against the plaintext pair, per
/// HTTP load. Not the opaque TCP loads: without identities the plaintext
/// pair's client proxy sends those straight to the backend, so the pair
/// would be one proxy against two.
fn mtls_cost(rows: &[(String, String, Sample)], samples: &[Sample]) -> String {
    let http: Vec<(String, String, Sample)> = rows
        .iter()
        .filter(|r| !r.0.starts_with("tcp"))
        .cloned()
        .collect();
    cost_table(
        &http,
        samples,
        ("strait", "strait-mtls"),
        "strait-mtls vs strait",
        "plaintext -> mTLS",
        false,
    )
}

/// Scenario `with` against `base`, per load: latency added, CPU and rate
/// before and after (and the CPU change of both proxies together, if asked:
/// paired by round, its median and range, since the two proxies' medians may
/// come from different rounds). Empty when the run has neither.
fn cost_table(
    rows: &[(String, String, Sample)],
    samples: &[Sample],
    (base, with): (&str, &str),
    what: &str,
    change: &str,
    cpu_change: bool,
) -> String {
    let find = |load: &str, scenario: &str| {
        rows.iter()
            .find(|(l, s, _)| l == load && s == scenario)
            .map(|r| &r.2)
    };
    let cpu = |s: &Sample| {
        s.vcpu_per_krps
            .iter()
            .map(|v| format!("{v:.3}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let sum = |s: &Sample| s.vcpu_per_krps.iter().sum::<f64>();
    let mut loads: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    loads.dedup();
    let mut out = String::new();
    for load in loads {
        let (Some(b), Some(w)) = (find(load, base), find(load, with)) else {
            continue;
        };
        if out.is_empty() {
            let (extra, dashes) = if cpu_change {
                (
                    " CPU change (sum of both, per round: median (range)) |",
                    " --- |",
                )
            } else {
                ("", "")
            };
            out.push_str(&format!(
                "\n| load | {what}: p50 added | p99 added | vCPU/1k req/s client / server ({change}) |{extra} req/s ({change}) |\n| --- | --- | --- | --- |{dashes} --- |\n"
            ));
        }
        let extra = if cpu_change {
            let changes: Vec<f64> = samples
                .iter()
                .filter(|s| s.load == load && s.scenario == with)
                .filter_map(|w| {
                    let b = samples
                        .iter()
                        .find(|b| b.load == load && b.scenario == base && b.round == w.round)?;
                    Some((sum(w) / sum(b) - 1.0) * 100.0)
                })
                .filter(|c| c.is_finite())
                .collect();
            match Spread::of(changes) {
                Some(c) => format!(" {:+.1} % ({:+.1} to {:+.1}) |", c.median, c.min, c.max),
                None => " - |".to_string(),
            }
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| {load} | {:+.3} | {:+.3} | {} -> {} |{extra} {:.0} -> {:.0} |\n",
            w.p50_ms - b.p50_ms,
            w.p99_ms - b.p99_ms,
            cpu(b),
            cpu(w),
            b.achieved_rps,
            w.achieved_rps
        ));
    }
    out
}

/// Starts the backend, the strait mTLS pair (and, with `with_tracing`, a traced
/// one) and the HAProxy mTLS pairs (HTTP/1.1 and HTTP/2 between the two),
/// prints where each listens and its pids, and keeps them up until interrupted:
/// to profile or trace them by hand under a load of one's own.
pub async fn hold(with_tracing: bool) -> anyhow::Result<()> {
    let work = Scratch::new(&std::env::temp_dir(), "strait-bench")?;
    refs::raise_open_files();
    let backend = Backend::start().await;
    let echo = strait_tests::tcp::echo().await;
    let certs = Certs::generate(&work.join("certs")).await?;
    let build = strait_tests::process::binary("strait-proxy");
    let stage = staging(&build)?;
    let mtls = staged(&stage, "strait-mtls", &build)?;
    let traced = with_tracing
        .then(|| staged(&stage, "strait-mtls-traced", &build))
        .transpose()?;
    let mtls = strait_pair(backend.addr, echo, true, mtls, Vec::new()).await;
    let traced = traced_pair(backend.addr, echo, traced).await;
    let hap = refs::haproxy(
        &certs,
        &work,
        backend.addr,
        [free_port(), free_port(), free_port()],
    )?;
    let hap_h2 = refs::haproxy_h2(
        &certs,
        &work,
        backend.addr,
        [free_port(), free_port(), free_port()],
    )?;
    let pid = |c: &tokio::process::Child| c.id().unwrap_or(0);
    println!("direct           http://{}/1k", backend.addr);
    let show = |name: &str, p: &StraitPair| {
        println!(
            "{name:<16} http://{}/1k  tcp {}  client pid {}  server pid {}",
            p.client.upstreams[0],
            p.client.upstreams[1],
            p.client.proc.pid(),
            p.server.proc.pid()
        )
    };
    show("strait-mtls", &mtls);
    if let Some((_, t)) = &traced {
        show("strait-traced", t);
    }
    for h in [&hap, &hap_h2] {
        println!(
            "{:<16} http://{}/1k (h2 {})  client pid {}  server pid {}",
            h.name,
            h.h1,
            h.h2,
            pid(&h.client),
            pid(&h.server)
        );
    }
    println!("up until interrupted (ctrl-c or SIGTERM)");
    // The pairs and references are killed as they are dropped, which a
    // default SIGTERM would skip, leaving them running.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    drop((hap, hap_h2));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: usize, scenario: &str, load: &str, vcpu: [f64; 2]) -> Sample {
        Sample {
            round,
            scenario: scenario.into(),
            load: load.into(),
            achieved_rps: 1000.0,
            p50_ms: 0.3,
            p90_ms: 0.4,
            p99_ms: 0.6,
            p999_ms: 1.0,
            requests: 10_000,
            errors: 0,
            vcpu_per_krps: vcpu.to_vec(),
            peak_rss_mib: vec![11.0, 11.0],
        }
    }

    /// The traced pair's CPU change is paired round by round: the two
    /// proxies' own medians can come from different rounds, and their sum
    /// then says what no round did.
    #[test]
    fn the_cpu_change_is_paired_by_round() {
        let l = "h1 1000/s";
        let samples = vec![
            sample(0, "strait-mtls", l, [0.1, 0.1]),
            sample(0, "strait-mtls-traced", l, [0.3, 0.1]),
            sample(1, "strait-mtls", l, [0.2, 0.2]),
            sample(1, "strait-mtls-traced", l, [0.2, 0.2]),
            sample(2, "strait-mtls", l, [0.3, 0.3]),
            sample(2, "strait-mtls-traced", l, [0.3, 0.3]),
        ];
        let r = Results {
            machine: "test".into(),
            samples,
            memory: Vec::new(),
            idle_conns: Vec::new(),
        };
        // By round: +100 %, 0, 0. The sums of each proxy's median (0.3 + 0.2
        // against 0.2 + 0.2) would say +25 %, which no round did.
        let table = tracing_cost(&summary(&r), &r.samples);
        assert!(table.contains("| +0.0 % (+0.0 to +100.0) |"), "{table}");
        // Opaque TCP loads are not in what mTLS costs (one proxy against two).
        let mut samples = r.samples.clone();
        samples.push(sample(0, "strait", "tcp conn", [0.07, 0.0]));
        samples.push(sample(0, "strait-mtls", "tcp conn", [0.35, 0.35]));
        let r = Results { samples, ..r };
        let table = mtls_cost(&summary(&r), &r.samples);
        assert!(!table.contains("tcp conn"), "{table}");
    }

    /// A round with failed requests, or that served nothing, says nothing of
    /// its scenario: left out of the verdicts (a CPU of 0 would read as the
    /// lowest), and named.
    #[test]
    fn a_round_with_errors_is_left_out() {
        let l = "h1 1000/s";
        let mut samples = Vec::new();
        for round in 0..3 {
            samples.push(sample(round, "direct", l, [0.0, 0.0]));
            samples.push(sample(round, "nginx-mtls", l, [0.08, 0.08]));
            let mut broken = sample(round, "strait-mtls", l, [0.0, 0.0]);
            (broken.errors, broken.achieved_rps) = (10_000, 0.0);
            samples.push(broken);
        }
        let r = Results {
            machine: "test".into(),
            samples,
            memory: Vec::new(),
            idle_conns: Vec::new(),
        };
        assert!(summary(&r).iter().all(|(_, s, _)| s != "strait-mtls"));
        let text = markdown(&r);
        assert!(!text.contains("lower"), "{text}");
        assert!(
            text.contains("Left out: round 0 of strait-mtls under h1 1000/s (10000 errors"),
            "{text}"
        );
        // Every direct round left out: nothing is said added over it.
        let mut samples = r.samples.clone();
        for s in samples.iter_mut().filter(|s| s.scenario == "direct") {
            s.errors = 1;
        }
        let text = markdown(&Results { samples, ..r });
        let row = text
            .lines()
            .find(|l| l.starts_with("| h1 1000/s | nginx-mtls |"))
            .unwrap();
        assert!(row.ends_with("| - | - |"), "{row}");
    }

    /// A run against `--baseline` alone (no reference pairs) prints the
    /// change paired by round, and no ratio to a reference it did not run.
    #[test]
    fn a_baseline_run_says_what_changed_and_no_reference_ratio() {
        let l = "h2 1000/s";
        let samples = vec![
            sample(0, "strait-mtls-before", l, [0.1, 0.1]),
            sample(0, "strait-mtls", l, [0.1, 0.12]),
            sample(1, "strait-mtls-before", l, [0.2, 0.2]),
            sample(1, "strait-mtls", l, [0.18, 0.18]),
            sample(2, "strait-mtls-before", l, [0.1, 0.1]),
            sample(2, "strait-mtls", l, [0.1, 0.1]),
        ];
        let r = Results {
            machine: "test".into(),
            samples,
            memory: Vec::new(),
            idle_conns: Vec::new(),
        };
        let rows = summary(&r);
        // By round: +10 %, -10 %, 0.
        let table = baseline_cost(&rows, &r.samples);
        assert!(table.contains("| +0.0 % (-10.0 to +10.0) |"), "{table}");
        let ratios = ratios(&rows);
        assert!(
            ratios.contains(&format!("| {l} | strait-mtls | - | - | - | - |")),
            "{ratios}"
        );
    }
}
