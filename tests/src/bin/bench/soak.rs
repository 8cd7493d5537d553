//! `bench soak`: a long run of mixed traffic through an mTLS pair while the
//! Service's endpoints churn, sampling the memory and open files of every
//! process, to show whether anything grows with time. Loopback only: no root.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use strait_tests::backend::Backend;
use strait_tests::client;
use strait_tests::manifests::{ManifestDir, endpoint, meshed_pod, service};
use strait_tests::mesh::{ControllerProc, Sidecar, SidecarIdentity, SidecarOpts};
use strait_tests::pki::{Pki, token_file, token_secret};
use strait_tests::process::{Proc, free_port};

const NS: &str = "soak";
const WEB: &str = "web.soak.svc.cluster.local:80";

#[derive(Clone, Debug)]
pub struct Params {
    pub duration: Duration,
    pub sample_every: Duration,
    pub churn_every: Duration,
    /// Requests per second, spread over a GET, a 4 KiB POST echoed and a
    /// 64 KiB download.
    pub rate: u64,
}

#[derive(Debug, Serialize)]
pub struct Sample {
    pub at_s: f64,
    /// (process, RSS KiB, open file descriptors)
    pub processes: Vec<(String, u64, usize)>,
    pub ok: u64,
    pub failed: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub duration_s: f64,
    pub rate: u64,
    pub endpoint_replacements: u64,
    pub samples: Vec<Sample>,
}

/// One endpoint of `web`: an app and its sidecar, in the manifests while it lives.
struct Replica {
    name: String,
    _app: Backend,
    sidecar: Sidecar,
}

fn fds(p: &Proc) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", p.pid()))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub async fn run(p: Params) -> anyhow::Result<Report> {
    let dir = ManifestDir::new();
    let tokens = ManifestDir::new();
    for sa in ["client", "web"] {
        dir.write(
            &format!("token-{sa}.yaml"),
            &token_secret(NS, sa, &format!("token-of-{sa}")),
        );
        token_file(tokens.path(), sa, &format!("token-of-{sa}"));
    }
    dir.write("svc.yaml", &service(NS, "web", 80));
    let pki = Pki::new();
    let anchors = pki.anchors();
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    // Short certificates, so renewals happen all along the run.
    let ctl = ControllerProc::start_with(dir.path(), grpc, Some(&pki), Some("10m")).await;
    let opts = |sa: &str| SidecarOpts {
        identity: Some(SidecarIdentity {
            anchors: anchors.clone(),
            token_file: tokens.path().join(format!("{sa}.token")),
            service_account: sa.to_string(),
        }),
        ..Default::default()
    };
    let mut serial = 0u64;
    let start_replica = async |serial: u64| {
        let name = format!("web-{serial}");
        let app = Backend::start().await;
        let sidecar = Sidecar::start_with(grpc, NS, &name, &[], opts("web")).await;
        dir.write(
            &format!("pod-{name}.yaml"),
            &meshed_pod(NS, &name, "web", sidecar.inbound.port()),
        );
        dir.write(
            &format!("slice-{name}.yaml"),
            &endpoint(NS, "web", &name, app.addr),
        );
        Replica {
            name,
            _app: app,
            sidecar,
        }
    };
    let mut replicas = Vec::new();
    for _ in 0..3 {
        serial += 1;
        replicas.push(start_replica(serial).await);
    }
    let client_proxy = Sidecar::start_with(grpc, NS, "client-0", &[WEB], opts("client")).await;
    let base = format!("http://{}", client_proxy.upstreams[0]);

    // The load: one request per tick, rotating through the mix.
    let (ok, failed, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let load = {
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        let base = base.clone();
        let every = Duration::from_micros(1_000_000 / p.rate.max(1));
        tokio::spawn(async move {
            let c = client::http1();
            let mut tick = tokio::time::interval(every);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                n += 1;
                let (c, base, ok, failed) = (c.clone(), base.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let r = match n % 3 {
                        0 => client::get(&c, &format!("{base}/")).await.map(|(s, _)| s),
                        1 => {
                            let req = http::Request::post(format!("{base}/echo"))
                                .body(client::body(vec![b'x'; 4096]))
                                .expect("request");
                            c.request(req).await.map(|r| r.status()).map_err(Into::into)
                        }
                        _ => client::get(&c, &format!("{base}/bytes/65536"))
                            .await
                            .map(|(s, _)| s),
                    };
                    match r {
                        Ok(s) if s.is_success() => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                });
            }
        })
    };

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut next_churn = p.churn_every;
    let mut replacements = 0u64;
    while started.elapsed() < p.duration {
        let now = started.elapsed();
        if now >= next_sample {
            let mut processes = vec![
                (
                    "controller".to_string(),
                    ctl.proc.memory_kib().1,
                    fds(&ctl.proc),
                ),
                (
                    "client proxy".to_string(),
                    client_proxy.proc.memory_kib().1,
                    fds(&client_proxy.proc),
                ),
            ];
            for r in &replicas {
                processes.push((
                    format!("server proxy ({})", r.name),
                    r.sidecar.proc.memory_kib().1,
                    fds(&r.sidecar.proc),
                ));
            }
            let s = Sample {
                at_s: now.as_secs_f64(),
                processes,
                ok: ok.load(Ordering::Relaxed),
                failed: failed.load(Ordering::Relaxed),
            };
            eprintln!(
                "{:>6.0} s  ok {}  failed {}  {}",
                s.at_s,
                s.ok,
                s.failed,
                s.processes
                    .iter()
                    .map(|(n, kib, fd)| format!("{n}: {} KiB {fd} fds", kib))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            samples.push(s);
            next_sample += p.sample_every;
        }
        if now >= next_churn {
            // A rolling replacement of one endpoint: the new one in, the
            // oldest out of the Service, then stopped.
            serial += 1;
            replicas.push(start_replica(serial).await);
            let old = replicas.remove(0);
            dir.remove(&format!("slice-{}.yaml", old.name));
            dir.remove(&format!("pod-{}.yaml", old.name));
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(old);
            replacements += 1;
            next_churn += p.churn_every;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let _ = load.await;
    Ok(Report {
        duration_s: started.elapsed().as_secs_f64(),
        rate: p.rate,
        endpoint_replacements: replacements,
        samples,
    })
}

/// Per process: first and last sample's RSS and fds, the most of each, and the
/// RSS trend over the second half of the run (KiB per hour, least squares), so
/// a warm-up does not read as growth. Only processes present from start to end.
pub fn markdown(r: &Report) -> String {
    let mut out = format!(
        "{:.0} s at {} req/s, {} endpoint replacements; ok {}, failed {}\n\n| process | RSS first -> last KiB | RSS max KiB | trend, second half (KiB/h) | fds first -> last (max) |\n| --- | --- | --- | --- | --- |\n",
        r.duration_s,
        r.rate,
        r.endpoint_replacements,
        r.samples.last().map_or(0, |s| s.ok),
        r.samples.last().map_or(0, |s| s.failed),
    );
    let names: Vec<String> = r
        .samples
        .first()
        .map(|s| s.processes.iter().map(|p| p.0.clone()).collect())
        .unwrap_or_default();
    for name in names {
        let series: Vec<(f64, u64, usize)> = r
            .samples
            .iter()
            .filter_map(|s| {
                s.processes
                    .iter()
                    .find(|p| p.0 == name)
                    .map(|p| (s.at_s, p.1, p.2))
            })
            .collect();
        if series.len() != r.samples.len() {
            continue;
        }
        let half = &series[series.len() / 2..];
        let trend = slope(half) * 3600.0;
        let (first, last) = (series[0], series[series.len() - 1]);
        out.push_str(&format!(
            "| {name} | {} -> {} | {} | {trend:+.0} | {} -> {} ({}) |\n",
            first.1,
            last.1,
            series.iter().map(|s| s.1).max().unwrap_or(0),
            first.2,
            last.2,
            series.iter().map(|s| s.2).max().unwrap_or(0),
        ));
    }
    out
}

fn slope(points: &[(f64, u64, usize)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let num: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 as f64 - my)).sum();
    let den: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}
