//! Running a proxy in-process on ephemeral loopback ports.

use std::net::SocketAddr;
use std::time::Duration;

use strait_proxy::addr::{DestAddr, Upstream};
use strait_proxy::transport::drain::ShutdownHandle;
use strait_proxy::{Addrs, Config, Proxy};

pub struct TestProxy {
    pub addrs: Addrs,
    pub metrics: std::sync::Arc<strait_proxy::telemetry::Metrics>,
    handle: ShutdownHandle,
    task: tokio::task::JoinHandle<strait_proxy::Stopped>,
}

impl TestProxy {
    /// The first `--upstream` listener.
    pub fn upstream(&self) -> SocketAddr {
        self.addrs.upstreams[0]
    }

    pub fn shutdown(&self) {
        self.handle.shutdown();
    }

    /// Shuts down and returns whether the drain finished within the grace period.
    pub async fn stop(self) -> bool {
        self.handle.shutdown();
        self.join().await
    }

    /// Also checks that nothing but the shutdown asked for stopped it.
    pub async fn join(self) -> bool {
        let stopped = self.task.await.expect("proxy task");
        assert_eq!(stopped.failed, None, "the proxy stopped by itself");
        stopped.clean
    }

    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }
}

/// A config with every listener on an ephemeral loopback port.
pub fn config() -> Config {
    Config::loopback()
}

/// Adds an upstream listener on an ephemeral port that forwards to `dest`.
pub fn with_upstream(mut c: Config, dest: SocketAddr) -> Config {
    c.upstreams.push(Upstream {
        local: "127.0.0.1:0".parse().expect("addr"),
        dest: DestAddr::Socket(dest),
    });
    c
}

pub async fn start(config: Config) -> TestProxy {
    let proxy = Proxy::bind(config, None).await.expect("bind proxy");
    let addrs = proxy.addrs().clone();
    let metrics = proxy.metrics();
    let handle = proxy.shutdown_handle();
    let task = tokio::spawn(proxy.run());
    strait_tests::wait::ready(addrs.admin, Duration::from_secs(10)).await;
    TestProxy {
        addrs,
        metrics,
        handle,
        task,
    }
}

/// A proxy whose one upstream listener forwards to `dest`.
pub async fn start_to(dest: SocketAddr) -> TestProxy {
    start(with_upstream(config(), dest)).await
}

/// The value of a metric line that starts with `prefix` (labels included).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A loopback address nothing listens on: connecting there is refused.
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Responses the proxy made itself outbound for `reason`.
pub fn outbound_proxy_errors(proxy: &TestProxy, reason: &str) -> Option<f64> {
    metric(
        &proxy.metrics_text(),
        &format!(
            "strait_proxy_http_proxy_errors_total{{direction=\"outbound\",reason=\"{reason}\"}}"
        ),
    )
}
