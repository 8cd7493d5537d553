//! The real binaries on loopback: a controller on a manifests directory and
//! sidecar proxies that follow it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pki::Pki;

use crate::process::{Proc, free_port};
use crate::wait;

pub struct ControllerProc {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl ControllerProc {
    pub async fn start(dir: &Path) -> ControllerProc {
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Self::start_on(dir, grpc).await
    }

    /// Starts on a given gRPC address (to restart a controller where it was).
    pub async fn start_on(dir: &Path, grpc: SocketAddr) -> ControllerProc {
        Self::start_with(dir, grpc, None, None).await
    }

    /// Starts issuing certificates from `pki`'s issuer, valid for `lifetime`.
    pub async fn start_with(
        dir: &Path,
        grpc: SocketAddr,
        pki: Option<&Pki>,
        lifetime: Option<&str>,
    ) -> ControllerProc {
        let mut cp = Self::spawn(dir, grpc, pki, lifetime);
        cp.ready(Duration::from_secs(20)).await;
        cp
    }

    /// Starts without waiting for `/ready`.
    pub fn spawn(
        dir: &Path,
        grpc: SocketAddr,
        pki: Option<&Pki>,
        lifetime: Option<&str>,
    ) -> ControllerProc {
        Self::spawn_with(dir, grpc, pki, lifetime, &[])
    }

    /// As `spawn`, with more flags.
    pub fn spawn_with(
        dir: &Path,
        grpc: SocketAddr,
        pki: Option<&Pki>,
        lifetime: Option<&str>,
        extra: &[String],
    ) -> ControllerProc {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut args = vec![
            "controller".into(),
            format!("--manifests={}", dir.display()),
            format!("--grpc-addr={grpc}"),
            format!("--admin-addr={admin}"),
        ];
        if let Some(p) = pki {
            args.push(format!("--issuer-cert={}", p.issuer_cert().display()));
            args.push(format!("--issuer-key={}", p.issuer_key().display()));
        }
        if let Some(l) = lifetime {
            args.push(format!("--cert-lifetime={l}"));
        }
        args.extend(extra.iter().cloned());
        let proc = Proc::spawn("strait", &args, &[("STRAIT_LOG", "warn")]);
        ControllerProc { proc, grpc, admin }
    }

    /// Waits until `/ready` answers 200; fails at once if the controller exits.
    pub async fn ready(&mut self, within: Duration) {
        self.proc.ready(self.admin, within).await
    }

    /// A metric's value; 0 while the admin server does not answer yet.
    pub async fn metric(&self, name: &str) -> f64 {
        let Ok((_, text)) = wait::admin_get(self.admin, "/metrics").await else {
            return 0.0;
        };
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

pub struct Sidecar {
    pub proc: Proc,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// One local address per `upstreams` entry, in order.
    pub upstreams: Vec<SocketAddr>,
}

/// What a sidecar needs for mTLS.
#[derive(Clone, Debug)]
pub struct SidecarIdentity {
    pub anchors: PathBuf,
    pub token_file: PathBuf,
    pub service_account: String,
}

#[derive(Clone, Debug, Default)]
pub struct SidecarOpts {
    pub identity: Option<SidecarIdentity>,
    /// The proxy's working directory.
    pub cwd: Option<PathBuf>,
    /// Another `strait-proxy` binary than this build's (a baseline to compare).
    pub binary: Option<PathBuf>,
    /// More flags (`--otlp-endpoint=…`).
    pub args: Vec<String>,
}

impl Sidecar {
    /// A proxy for pod `pod` in namespace `ns`, following the controller at `grpc`,
    /// with a local listener for each upstream destination name.
    pub async fn start(grpc: SocketAddr, ns: &str, pod: &str, upstreams: &[&str]) -> Sidecar {
        Self::start_with(grpc, ns, pod, upstreams, SidecarOpts::default()).await
    }

    pub async fn start_with(
        grpc: SocketAddr,
        ns: &str,
        pod: &str,
        upstreams: &[&str],
        opts: SidecarOpts,
    ) -> Sidecar {
        let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let locals: Vec<SocketAddr> = upstreams
            .iter()
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().expect("addr"))
            .collect();
        let mut args = vec![
            format!("--inbound-addr={inbound}"),
            "--outbound-addr=127.0.0.1:0".into(),
            format!("--admin-addr={admin}"),
            // A controller that issues certificates serves TLS only.
            format!(
                "--control-plane={}://{grpc}",
                if opts.identity.is_some() {
                    "https"
                } else {
                    "http"
                }
            ),
            format!("--namespace={ns}"),
            format!("--pod-name={pod}"),
        ];
        for (local, dest) in locals.iter().zip(upstreams) {
            args.push(format!("--upstream={local}={dest}"));
        }
        if let Some(id) = &opts.identity {
            args.push(format!("--trust-anchors={}", id.anchors.display()));
            args.push(format!("--token-file={}", id.token_file.display()));
            args.push(format!("--service-account={}", id.service_account));
        }
        args.extend(opts.args.iter().cloned());
        let envs = [("STRAIT_PROXY_LOG_LEVEL", "warn")];
        let mut proc = match opts.binary {
            Some(path) => Proc::spawn_path(path, &args, &envs, opts.cwd.as_deref()),
            None => Proc::spawn_in("strait-proxy", &args, &envs, opts.cwd.as_deref()),
        };
        proc.ready(admin, Duration::from_secs(20)).await;
        Sidecar {
            proc,
            inbound,
            admin,
            upstreams: locals,
        }
    }
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
pub async fn metric_where(admin: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    let (_, text) = wait::admin_get(admin, "/metrics")
        .await
        .expect("scrape /metrics");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of every sample of a metric (all label sets) on an admin server.
pub async fn metric_sum(admin: SocketAddr, name: &str) -> f64 {
    let Ok((_, text)) = wait::admin_get(admin, "/metrics").await else {
        return 0.0;
    };
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}
