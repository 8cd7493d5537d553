//! The proxy pair measured against a direct connection and the reference pairs, in
//! one run, scenarios interleaved (A B C D, A B C D, ...) so that ratios survive a
//! noisy machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strait_tests::backend::Backend;
use strait_tests::manifests::{ManifestDir, endpoint, meshed_pod, service};
use strait_tests::mesh::{ControllerProc, Sidecar, SidecarIdentity, SidecarOpts};
use strait_tests::pki::{Pki, token_file, token_secret};
use strait_tests::process::free_port;
use tokio::process::Command;

use crate::refs::{self, Certs};
use crate::stats::percentile;

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
}

#[derive(Clone, Debug, Serialize)]
pub struct Load {
    pub label: String,
    pub proto: Proto,
    /// Requests per second in total; `None` for as fast as possible.
    pub rate: Option<u32>,
    /// A new TCP connection for every request (HTTP/1.1).
    pub new_connection: bool,
    pub seconds: u64,
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
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Memory {
    pub scenario: String,
    pub process: String,
    pub idle_rss_mib: f64,
    pub peak_rss_mib: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub machine: String,
    pub samples: Vec<Sample>,
    pub memory: Vec<Memory>,
}

struct Target {
    name: &'static str,
    h1: SocketAddr,
    h2: SocketAddr,
    pids: Vec<(String, u32)>,
}

const CONNS: u32 = 16;

/// The well-known pairs strait is judged against.
const REFERENCES: [&str; 2] = ["haproxy-mtls", "nginx-mtls"];

pub fn loads(quick: bool) -> Vec<Load> {
    let l = |label: &str, proto, rate, new_connection, seconds| Load {
        label: label.to_string(),
        proto,
        rate,
        new_connection,
        seconds,
    };
    if quick {
        return vec![
            l("h1 500/s", Proto::H1, Some(500), false, 2),
            l("h2 500/s", Proto::H2, Some(500), false, 2),
            l("h1 new conn", Proto::H1, None, true, 1),
        ];
    }
    vec![
        l("h1 1000/s", Proto::H1, Some(1000), false, 15),
        l("h1 2000/s", Proto::H1, Some(2000), false, 15),
        l("h1 4000/s", Proto::H1, Some(4000), false, 15),
        l("h2 1000/s", Proto::H2, Some(1000), false, 15),
        l("h2 2000/s", Proto::H2, Some(2000), false, 15),
        l("h1 max", Proto::H1, None, false, 10),
        l("h2 max", Proto::H2, None, false, 10),
        l("h1 new conn", Proto::H1, None, true, 10),
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

struct Measured {
    rps: f64,
    sorted_ms: Vec<f64>,
    requests: u64,
    errors: u64,
}

async fn h2load(addr: SocketAddr, load: &Load, work: &Path) -> anyhow::Result<Measured> {
    let log = work.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let mut args = vec![
        "-c".to_string(),
        CONNS.to_string(),
        "-t".into(),
        "1".into(),
        "-D".into(),
        load.seconds.to_string(),
        "--log-file".into(),
        log.display().to_string(),
    ];
    if load.proto == Proto::H1 {
        args.push("--h1".into());
    } else if load.rate.is_none() {
        args.extend(["-m".into(), "8".into()]);
    }
    if let Some(rate) = load.rate {
        args.extend(["--rps".into(), format!("{}", (rate / CONNS).max(1))]);
    }
    args.push(format!("http://{addr}/1k"));
    let out = Command::new("h2load").args(&args).output().await?;
    anyhow::ensure!(
        out.status.success(),
        "h2load failed (apt-get install nghttp2-client): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rps = stdout
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim().split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let counts = stdout
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or("");
    let count = |what: &str| {
        counts
            .split(',')
            .find(|p| p.trim().ends_with(what))
            .and_then(|p| p.split_whitespace().find(|w| w.parse::<u64>().is_ok()))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (done, failed, errored, timeout) = (
        count("done"),
        count("failed"),
        count("errored"),
        count("timeout"),
    );
    let mut sorted_ms: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (_, status, us) = (f.next()?, f.next()?, f.next()?);
            (status.starts_with('2')).then(|| us.trim().parse::<f64>().ok().map(|u| u / 1000.0))?
        })
        .collect();
    sorted_ms.sort_by(f64::total_cmp);
    Ok(Measured {
        rps,
        sorted_ms,
        requests: done,
        errors: failed + errored + timeout,
    })
}

/// HTTP/1.1 with a new connection for every request, `CONNS` at a time.
async fn new_connections(addr: SocketAddr, seconds: u64) -> anyhow::Result<Measured> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONNS)
        .map(|_| {
            tokio::spawn(async move {
                let (mut ms, mut errors) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = async {
                        let s = tokio::net::TcpStream::connect(addr).await?;
                        let (mut send, conn) =
                            hyper::client::conn::http1::handshake::<
                                _,
                                http_body_util::Empty<bytes::Bytes>,
                            >(hyper_util::rt::TokioIo::new(s))
                            .await?;
                        tokio::spawn(conn);
                        let req = http::Request::get("/1k")
                            .header("host", "bench")
                            .header("connection", "close")
                            .body(http_body_util::Empty::new())?;
                        let rsp = send.send_request(req).await?;
                        let ok = rsp.status().is_success();
                        http_body_util::BodyExt::collect(rsp.into_body()).await?;
                        anyhow::Ok(ok)
                    }
                    .await;
                    match r {
                        Ok(true) => ms.push(t.elapsed().as_secs_f64() * 1000.0),
                        _ => errors += 1,
                    }
                }
                (ms, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (ms, e) = t.await?;
        all.extend(ms);
        errors += e;
    }
    all.sort_by(f64::total_cmp);
    Ok(Measured {
        rps: all.len() as f64 / start.elapsed().as_secs_f64(),
        requests: all.len() as u64,
        sorted_ms: all,
        errors,
    })
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
            h1: self.client.upstreams[0],
            h2: self.client.upstreams[0],
            pids: vec![
                ("client proxy".into(), self.client.proc.pid()),
                ("server proxy".into(), self.server.proc.pid()),
            ],
        }
    }
}

async fn strait_pair(
    backend: SocketAddr,
    mtls: bool,
    binary: Option<PathBuf>,
    args: Vec<String>,
) -> StraitPair {
    let dir = ManifestDir::new();
    let tokens = ManifestDir::new();
    dir.write("service.yaml", &service("bench", "backend", 80));
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
        binary: binary.clone(),
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
    let client = Sidecar::start_with(
        cp.grpc,
        "bench",
        "client-0",
        &["backend.bench.svc.cluster.local:80"],
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

/// Runs every scenario under every load (only those labelled in `only`, when
/// given), `rounds` times, interleaved.
pub async fn run(
    quick: bool,
    rounds: usize,
    only: &[String],
    work: PathBuf,
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
    std::fs::create_dir_all(&work)?;
    let backend = Backend::start().await;
    let certs = Certs::generate(&work.join("certs")).await?;
    if let Some(b) = &baseline {
        anyhow::ensure!(b.exists(), "--baseline: {} not found", b.display());
    }
    let pair = strait_pair(backend.addr, false, None, Vec::new()).await;
    let mtls = strait_pair(backend.addr, true, None, Vec::new()).await;
    let before = match baseline {
        Some(b) => Some(strait_pair(backend.addr, true, Some(b), Vec::new()).await),
        None => None,
    };
    // A collector that takes every span and keeps none: what tracing costs the
    // proxies, not what storing spans costs the bench.
    let collector = if with_tracing {
        Some(strait_tests::otlp::OtlpCollector::start(strait_tests::otlp::Mode::Discard).await)
    } else {
        None
    };
    let traced = match &collector {
        Some(c) => Some(
            strait_pair(
                backend.addr,
                true,
                None,
                vec![
                    format!("--otlp-endpoint={}", c.endpoint()),
                    "--trace-sampling=1".into(),
                ],
            )
            .await,
        ),
        None => None,
    };
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
    // The reference proxies report no readiness: wait until each answers.
    for addr in [hap.h1, ngx.h1] {
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
            h1: backend.addr,
            h2: backend.addr,
            pids: vec![],
        },
        pair.target("strait"),
        mtls.target("strait-mtls"),
    ];
    if let Some(b) = &before {
        targets.push(b.target("strait-mtls-before"));
    }
    if let Some(t) = &traced {
        targets.push(t.target("strait-mtls-traced"));
    }
    targets.extend([
        Target {
            name: hap.name,
            h1: hap.h1,
            h2: hap.h2,
            pids: vec![
                ("client proxy".into(), pid(&hap.client)),
                ("server proxy".into(), pid(&hap.server)),
            ],
        },
        Target {
            name: ngx.name,
            h1: ngx.h1,
            h2: ngx.h2,
            pids: vec![
                ("client proxy".into(), pid(&ngx.client)),
                ("server proxy".into(), pid(&ngx.server)),
            ],
        },
    ]);
    let idle: Vec<Vec<f64>> = targets
        .iter()
        .map(|t| t.pids.iter().map(|(_, p)| rss_mib(*p).0).collect())
        .collect();

    let mut samples = Vec::new();
    for round in 0..rounds {
        for load in loads.iter().cloned() {
            for t in &targets {
                let addr = if load.proto == Proto::H1 { t.h1 } else { t.h2 };
                let before: Vec<u64> = t.pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
                let started = Instant::now();
                let m = if load.new_connection {
                    new_connections(addr, load.seconds).await?
                } else {
                    h2load(addr, &load, &work).await?
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
                let s = Sample {
                    round,
                    scenario: t.name.to_string(),
                    load: load.label.clone(),
                    achieved_rps: m.rps,
                    p50_ms: percentile(&m.sorted_ms, 0.5),
                    p90_ms: percentile(&m.sorted_ms, 0.9),
                    p99_ms: percentile(&m.sorted_ms, 0.99),
                    p999_ms: percentile(&m.sorted_ms, 0.999),
                    requests: m.requests,
                    errors: m.errors,
                    vcpu_per_krps,
                };
                eprintln!(
                    "round {round} {:<13} {:<12} {:>8.0} req/s  p50 {:.3}  p99 {:.3}  p99.9 {:.3} ms  errors {}",
                    s.scenario, s.load, s.achieved_rps, s.p50_ms, s.p99_ms, s.p999_ms, s.errors
                );
                samples.push(s);
            }
        }
    }
    let mut memory = Vec::new();
    for (t, idle) in targets.iter().zip(idle) {
        for ((role, p), idle) in t.pids.iter().zip(idle) {
            memory.push(Memory {
                scenario: t.name.to_string(),
                process: role.clone(),
                idle_rss_mib: idle,
                peak_rss_mib: rss_mib(*p).1,
            });
        }
    }
    let _ = (
        hap.client.start_kill(),
        hap.server.start_kill(),
        ngx.client.start_kill(),
        ngx.server.start_kill(),
    );
    Ok(Results {
        machine: machine(),
        samples,
        memory,
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
    let cpu = |s: &Sample| {
        if s.vcpu_per_krps.is_empty() {
            f64::NAN
        } else {
            s.vcpu_per_krps.iter().sum::<f64>() / s.vcpu_per_krps.len() as f64
        }
    };
    for (load, scenario, s) in rows.iter().filter(|r| r.1 != "direct") {
        let of = |name: &str| {
            rows.iter()
                .find(|(l, sc, _)| l == load && sc == name)
                .map(|r| &r.2)
        };
        let refs: Vec<&Sample> = REFERENCES.iter().filter_map(|n| of(n)).collect();
        let best_p99 = refs.iter().map(|r| r.p99_ms).fold(f64::INFINITY, f64::min);
        let best_cpu = refs.iter().map(|r| cpu(r)).fold(f64::INFINITY, f64::min);
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
            fmt(of("haproxy-mtls").map_or(f64::NAN, |h| s.achieved_rps / h.achieved_rps)),
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
            .filter(|s| s.load == load && s.scenario == scenario)
            .collect();
        let m = |f: fn(&Sample) -> f64| median(ss.iter().map(|s| f(s)).collect());
        let n = ss.first().map_or(0, |s| s.vcpu_per_krps.len());
        let vcpu = (0..n)
            .map(|i| median(ss.iter().map(|s| s.vcpu_per_krps[i]).collect()))
            .collect();
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
            },
        ));
    }
    rows
}

pub fn markdown(r: &Results) -> String {
    let rows = summary(r);
    let mut out = format!(
        "Machine: {}. Medians over rounds; latency in ms; vCPU per 1,000 requests/s for the client-side / server-side proxy.\n\n",
        r.machine
    );
    out.push_str("| load | scenario | req/s | p50 | p90 | p99 | p99.9 | errors | vCPU/1k req/s | p99 added over direct | p99 added vs best reference |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for (load, scenario, s) in &rows {
        let direct = rows
            .iter()
            .find(|(l, sc, _)| l == load && sc == "direct")
            .map(|r| r.2.p99_ms);
        let best_ref = rows
            .iter()
            .filter(|(l, sc, _)| l == load && REFERENCES.contains(&sc.as_str()))
            .map(|r| r.2.p99_ms - direct.unwrap_or(0.0))
            .fold(f64::INFINITY, f64::min);
        let added = direct.map(|d| s.p99_ms - d).unwrap_or(0.0);
        let vcpu: Vec<String> = s.vcpu_per_krps.iter().map(|v| format!("{v:.3}")).collect();
        let vs_ref = if scenario == "direct" || !best_ref.is_finite() {
            "-".to_string()
        } else {
            format!("{:+.3}", added - best_ref)
        };
        out.push_str(&format!(
            "| {load} | {scenario} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} |\n",
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
            if scenario == "direct" {
                "-".into()
            } else {
                format!("{added:+.3}")
            },
            vs_ref
        ));
    }
    out.push_str(&ratios(&rows));
    out.push_str(&mtls_cost(&rows));
    out.push_str(&tracing_cost(&rows));
    out.push_str(
        "\n| scenario | process | idle RSS MiB | peak RSS MiB |\n| --- | --- | --- | --- |\n",
    );
    for m in &r.memory {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} |\n",
            m.scenario, m.process, m.idle_rss_mib, m.peak_rss_mib
        ));
    }
    out
}

/// What tracing every request costs: the mTLS pair exporting a client and a
/// server span per request against the same pair without tracing.
fn tracing_cost(rows: &[(String, String, Sample)]) -> String {
    cost_table(
        rows,
        ("strait-mtls", "strait-mtls-traced"),
        "traced vs not (strait-mtls, 100 % sampling)",
        "off -> on",
        true,
    )
}

/// What mTLS costs strait: the mTLS pair against the plaintext pair, per load.
fn mtls_cost(rows: &[(String, String, Sample)]) -> String {
    cost_table(
        rows,
        ("strait", "strait-mtls"),
        "strait-mtls vs strait",
        "plaintext -> mTLS",
        false,
    )
}

/// Scenario `with` against `base`, per load: latency added, CPU and rate
/// before and after (and the CPU change of both proxies together, if asked).
/// Empty when the run has neither.
fn cost_table(
    rows: &[(String, String, Sample)],
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
                (" CPU change (sum of both) |", " --- |")
            } else {
                ("", "")
            };
            out.push_str(&format!(
                "\n| load | {what}: p50 added | p99 added | vCPU/1k req/s client / server ({change}) |{extra} req/s ({change}) |\n| --- | --- | --- | --- |{dashes} --- |\n"
            ));
        }
        let extra = if cpu_change {
            format!(" {:+.1} % |", (sum(w) / sum(b) - 1.0) * 100.0)
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
