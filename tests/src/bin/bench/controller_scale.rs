//! The control plane at scale: N Services with M endpoints each (every endpoint a
//! meshed Pod) in a manifests directory, W simulated proxy watches, and the time
//! from a file change to every watcher of the changed Service holding the update.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;
use strait_api::v1 as api;
use strait_api::v1::discovery_client::DiscoveryClient;
use strait_tests::kube_api::KubeApi;
use strait_tests::manifests::ManifestDir;
use strait_tests::mesh::ControllerProc;
use strait_tests::process::{Proc, free_port};
use strait_tests::wait;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

use crate::stats::percentile;

#[derive(Clone, Debug, Serialize)]
pub struct Params {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub watches: usize,
    pub watched_services: usize,
    pub changes: usize,
    /// The controller on the API server stand-in (`--kubernetes`) rather than
    /// on a manifests directory.
    pub kubernetes: bool,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub params: Params,
    pub manifest_bytes: u64,
    pub load_to_ready_ms: f64,
    pub rss_loaded_mib: f64,
    pub first_answer_all_watches_ms: f64,
    pub rss_peak_mib: f64,
    pub change_to_all_watchers_ms_p50: f64,
    pub change_to_all_watchers_ms_p99: f64,
    pub change_to_all_watchers_ms_max: f64,
}

const PER_FILE: usize = 100;

fn ns(svc: usize) -> String {
    format!("bench-{}", svc % 100)
}

fn services_file(block: usize, p: &Params) -> String {
    let mut s = String::new();
    for i in block * PER_FILE..((block + 1) * PER_FILE).min(p.services) {
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: {}}}\nspec:\n  clusterIP: 10.{}.{}.{}\n  ports: [{{name: http, port: 80}}]\n",
            ns(i),
            96 + i / 65536,
            (i / 256) % 256,
            i % 256
        );
    }
    s
}

/// `generation` changes one Service's slice (an extra endpoint comes and goes).
/// The EndpointSlices of one file; a Service in `extra` has one endpoint more.
fn slices_file(block: usize, p: &Params, extra: &std::collections::HashSet<usize>) -> String {
    let mut s = String::new();
    for i in block * PER_FILE..((block + 1) * PER_FILE).min(p.services) {
        s.push_str(&slice_doc(i, p, extra));
    }
    s
}

/// Service `i`'s EndpointSlice, one more endpoint if it is in `extra`.
fn slice_doc(i: usize, p: &Params, extra: &std::collections::HashSet<usize>) -> String {
    let mut s = String::new();
    {
        let _ = write!(
            s,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-a\n  namespace: {}\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
            ns(i)
        );
        let extra = usize::from(extra.contains(&i));
        for j in 0..p.endpoints_per_service + extra {
            let _ = write!(
                s,
                "  - addresses: [\"10.{}.{}.{}\"]\n    targetRef: {{kind: Pod, name: svc-{i}-{j}}}\n",
                128 + i / 256 / 4,
                (i / 4) % 256,
                (i % 4) * 64 + j % 64
            );
        }
    }
    s
}

fn pods_file(block: usize, p: &Params) -> String {
    let mut s = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for i in block * PER_FILE..((block + 1) * PER_FILE).min(p.services) {
        for j in 0..p.endpoints_per_service + 1 {
            let _ = write!(
                s,
                "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: svc-{i}-{j}, namespace: {}, annotations: {{strait.dev/inbound-port: \"4143\"}}}}\n  spec: {{serviceAccountName: svc-{i}, containers: [{{name: app, image: app}}]}}\n",
                ns(i)
            );
        }
    }
    s
}

fn rss_mib(proc: &strait_tests::process::Proc) -> (f64, f64) {
    let (hwm, rss) = proc.memory_kib();
    (rss as f64 / 1024.0, hwm as f64 / 1024.0)
}

/// Creates the mesh's objects in the API stand-in, one by one as a cluster's
/// controllers would; returns the size of their YAML.
fn apply_all(p: &Params, api: &KubeApi) -> anyhow::Result<u64> {
    let mut bytes = 0u64;
    let none = Default::default();
    for i in 0..p.services {
        let block = services_file_one(i);
        bytes += block.len() as u64;
        api.apply(&block);
        let slice = slice_doc(i, p, &none);
        bytes += slice.len() as u64;
        api.apply(&slice);
        for j in 0..p.endpoints_per_service + 1 {
            let pod = format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: svc-{i}-{j}, namespace: {}, annotations: {{strait.dev/inbound-port: \"4143\"}}}}\nspec: {{serviceAccountName: svc-{i}, containers: [{{name: app, image: app}}]}}\n",
                ns(i)
            );
            bytes += pod.len() as u64;
            api.apply(&pod);
        }
    }
    Ok(bytes)
}

fn services_file_one(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: {}}}\nspec:\n  clusterIP: 10.{}.{}.{}\n  ports: [{{name: http, port: 80}}]\n",
        ns(i),
        96 + i / 65536,
        (i / 256) % 256,
        i % 256
    )
}

/// Writes the mesh's manifests into `dir`; returns their size in bytes.
pub fn write_manifests(p: &Params, dir: &std::path::Path) -> anyhow::Result<u64> {
    let blocks = p.services.div_ceil(PER_FILE);
    let mut manifest_bytes = 0u64;
    for b in 0..blocks {
        for (name, text) in [
            (format!("services-{b:04}.yaml"), services_file(b, p)),
            (
                format!("slices-{b:04}.yaml"),
                slices_file(b, p, &Default::default()),
            ),
            (format!("pods-{b:04}.yaml"), pods_file(b, p)),
        ] {
            manifest_bytes += text.len() as u64;
            std::fs::write(dir.join(name), text)?;
        }
    }
    Ok(manifest_bytes)
}

pub async fn run(p: Params) -> anyhow::Result<Results> {
    let dir = ManifestDir::new();
    let api = if p.kubernetes {
        Some(KubeApi::start().await)
    } else {
        None
    };
    let manifest_bytes = match &api {
        Some(api) => apply_all(&p, api)?,
        None => write_manifests(&p, dir.path())?,
    };
    eprintln!(
        "controller-scale{}: {} services, {} endpoints, {:.1} MiB of YAML",
        if p.kubernetes { " (--kubernetes)" } else { "" },
        p.services,
        p.services * p.endpoints_per_service,
        manifest_bytes as f64 / 1048576.0
    );

    let start = Instant::now();
    let cp = match &api {
        Some(api) => {
            let grpc: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
            let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
            let kubeconfig = api.kubeconfig(dir.path());
            let args = vec![
                "controller".to_string(),
                "--kubernetes".into(),
                format!("--grpc-addr={grpc}"),
                format!("--admin-addr={admin}"),
            ];
            let proc = Proc::spawn(
                "strait",
                &args,
                &[
                    ("KUBECONFIG", kubeconfig.to_str().unwrap_or_default()),
                    ("STRAIT_LOG", "warn"),
                ],
            );
            wait::ready(admin, Duration::from_secs(120)).await;
            ControllerProc { proc, grpc, admin }
        }
        None => ControllerProc::start(dir.path()).await,
    };
    let load_to_ready_ms = start.elapsed().as_secs_f64() * 1000.0;
    let (rss_loaded_mib, _) = rss_mib(&cp.proc);
    eprintln!("controller ready after {load_to_ready_ms:.0} ms, RSS {rss_loaded_mib:.1} MiB");

    // W watches over `watched_services` Services, spread over channels as separate
    // proxies' connections would be.
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, u64, Instant)>();
    let channels = (p.watches / 10).max(1);
    let mut chans = Vec::new();
    for _ in 0..channels {
        chans.push(
            Endpoint::from_shared(format!("http://{}", cp.grpc))?
                .connect()
                .await?,
        );
    }
    let watch_start = Instant::now();
    for w in 0..p.watches {
        let svc = w % p.watched_services;
        let mut client = DiscoveryClient::new(chans[w % channels].clone());
        let tx = tx.clone();
        tokio::spawn(async move {
            let req = api::WatchDestination {
                destination: format!("svc-{svc}.{}.svc.cluster.local:80", ns(svc)),
                context_namespace: "default".into(),
                proxy_id: format!("bench-{w}"),
            };
            let Ok(rsp) = client.watch(req).await else {
                return;
            };
            let mut s = rsp.into_inner();
            while let Ok(Some(u)) = s.message().await {
                let version = match u.kind {
                    Some(api::destination_update::Kind::Service(s)) => s.version,
                    _ => 0,
                };
                let _ = tx.send((w, version, Instant::now()));
            }
        });
    }
    let mut first: HashMap<usize, u64> = HashMap::new();
    while first.len() < p.watches {
        let (w, v, _) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("watch streams ended"))?;
        first.insert(w, v);
    }
    let first_answer_all_watches_ms = watch_start.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "{} watches answered after {first_answer_all_watches_ms:.0} ms",
        p.watches
    );

    let mut latencies = Vec::new();
    // Each change adds an endpoint to, or removes one from, one watched Service.
    let mut extra = std::collections::HashSet::new();
    for c in 0..p.changes {
        let svc = (c * 7) % p.watched_services;
        let watchers: Vec<usize> = (0..p.watches)
            .filter(|w| w % p.watched_services == svc)
            .collect();
        let block = svc / PER_FILE;
        if !extra.insert(svc) {
            extra.remove(&svc);
        }
        // Drain anything left from earlier changes.
        while rx.try_recv().is_ok() {}
        let t = Instant::now();
        match &api {
            // One object changes, as an EndpointSlice controller would change it.
            Some(api) => api.apply(&slice_doc(svc, &p, &extra)),
            None => dir.write(
                &format!("slices-{block:04}.yaml"),
                &slices_file(block, &p, &extra),
            ),
        }
        let mut got = std::collections::HashSet::new();
        let mut last = t;
        while got.len() < watchers.len() {
            let (w, _, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("watch streams ended"))?;
            if watchers.contains(&w) && got.insert(w) {
                last = at;
            }
        }
        latencies.push(last.duration_since(t).as_secs_f64() * 1000.0);
    }
    let (_, rss_peak_mib) = rss_mib(&cp.proc);
    latencies.sort_by(f64::total_cmp);
    Ok(Results {
        manifest_bytes,
        load_to_ready_ms,
        rss_loaded_mib,
        first_answer_all_watches_ms,
        rss_peak_mib,
        change_to_all_watchers_ms_p50: percentile(&latencies, 0.5),
        change_to_all_watchers_ms_p99: percentile(&latencies, 0.99),
        change_to_all_watchers_ms_max: latencies.last().copied().unwrap_or(0.0),
        params: p,
    })
}

pub fn markdown(r: &Results) -> String {
    format!(
        "| measure | value | target |\n| --- | --- | --- |\n\
         | Services / endpoints (meshed Pods) | {} / {} | 10,000 / 100,000 |\n\
         | source | {} | |\n\
         | YAML read | {:.1} MiB | |\n\
         | controller start to `/ready` (first full index) | {:.0} ms | < 2,000 ms |\n\
         | controller RSS, loaded | {:.1} MiB | |\n\
         | {} watches, all first answers | {:.0} ms | |\n\
         | controller peak RSS (VmHWM) | {:.1} MiB | < 300 MB |\n\
         | change to every watcher updated, p50 / p99 / max ({} changes) | {:.1} / {:.1} / {:.1} ms | p99 < 100 ms |\n",
        r.params.services,
        r.params.services * r.params.endpoints_per_service,
        if r.params.kubernetes {
            "API server stand-in (`--kubernetes`)"
        } else {
            "manifests directory"
        },
        r.manifest_bytes as f64 / 1048576.0,
        r.load_to_ready_ms,
        r.rss_loaded_mib,
        r.params.watches,
        r.first_answer_all_watches_ms,
        r.rss_peak_mib,
        r.params.changes,
        r.change_to_all_watchers_ms_p50,
        r.change_to_all_watchers_ms_p99,
        r.change_to_all_watchers_ms_max,
    )
}
