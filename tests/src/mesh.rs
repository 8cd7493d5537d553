//! The real binaries on loopback: a controller on a manifests directory and
//! sidecar proxies that follow it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

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
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let proc = Proc::spawn(
            "strait",
            &[
                "controller".into(),
                format!("--manifests={}", dir.display()),
                format!("--grpc-addr={grpc}"),
                format!("--admin-addr={admin}"),
            ],
            &[("STRAIT_LOG", "warn")],
        );
        wait::ready(admin, Duration::from_secs(20)).await;
        ControllerProc { proc, grpc, admin }
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let (_, text) = wait::admin_get(self.admin, "/metrics")
            .await
            .expect("controller metrics");
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

impl Sidecar {
    /// A proxy for pod `pod` in namespace `ns`, following the controller at `grpc`,
    /// with a local listener for each upstream destination name.
    pub async fn start(grpc: SocketAddr, ns: &str, pod: &str, upstreams: &[&str]) -> Sidecar {
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
            format!("--control-plane=http://{grpc}"),
            format!("--namespace={ns}"),
            format!("--pod-name={pod}"),
        ];
        for (local, dest) in locals.iter().zip(upstreams) {
            args.push(format!("--upstream={local}={dest}"));
        }
        let proc = Proc::spawn("strait-proxy", &args, &[("STRAIT_PROXY_LOG_LEVEL", "warn")]);
        wait::ready(admin, Duration::from_secs(20)).await;
        Sidecar {
            proc,
            inbound,
            admin,
            upstreams: locals,
        }
    }
}
