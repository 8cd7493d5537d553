//! A controller on a manifests directory and proxies that follow it while traffic
//! flows: endpoint changes, a controller restart, a broken file, balancing.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use strait_tests::backend::Backend;
use strait_tests::load::Load;
use strait_tests::manifests::{ManifestDir, endpoint, meshed_pod, service};
use strait_tests::mesh::{ControllerProc, Sidecar};
use strait_tests::{client, wait};

const NS: &str = "test";
const WEB: &str = "web.test.svc.cluster.local:80";

/// A backend with its own sidecar, declared in the manifests as a meshed pod.
struct Pod {
    name: String,
    backend: Backend,
    _sidecar: Sidecar,
}

impl Pod {
    async fn start(dir: &ManifestDir, grpc: SocketAddr, name: &str, backend: Backend) -> Pod {
        let sidecar = Sidecar::start(grpc, NS, name, &[]).await;
        dir.write(
            &format!("pod-{name}.yaml"),
            &meshed_pod(NS, name, "web", sidecar.inbound.port()),
        );
        Pod {
            name: name.to_string(),
            backend,
            _sidecar: sidecar,
        }
    }

    fn add_endpoint(&self, dir: &ManifestDir) {
        dir.write(
            &self.slice_file(),
            &endpoint(NS, "web", &self.name, self.backend.addr),
        );
    }

    fn remove_endpoint(&self, dir: &ManifestDir) {
        dir.remove(&self.slice_file());
    }

    fn slice_file(&self) -> String {
        format!("slice-{}.yaml", self.name)
    }

    fn requests(&self) -> usize {
        self.backend.requests()
    }
}

/// Waits until `pod` receives traffic; returns how long that took.
async fn until_serving(pod: &Pod, since: Instant) -> Duration {
    let before = pod.requests();
    wait::until(
        &format!("{} to receive traffic", pod.name),
        Duration::from_secs(5),
        || async { pod.requests() > before },
    )
    .await;
    since.elapsed()
}

/// Waits until `pod` stops receiving traffic (no new request over a window in
/// which the load sent plenty); returns how long that took.
async fn until_drained(pod: &Pod, load: &Load, since: Instant) -> Duration {
    loop {
        let (mine, total) = (pod.requests(), load.ok());
        wait::until("more traffic", Duration::from_secs(5), || async {
            load.ok() >= total + 20
        })
        .await;
        if pod.requests() == mine {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{} still gets traffic",
            pod.name
        );
    }
}

#[tokio::test]
async fn endpoint_changes_redirect_traffic_within_a_second_without_failures() {
    let dir = ManifestDir::new();
    dir.write("service.yaml", &service(NS, "web", 80));
    let cp = ControllerProc::start(dir.path()).await;
    let a = Pod::start(&dir, cp.grpc, "web-a", Backend::start().await).await;
    let b = Pod::start(&dir, cp.grpc, "web-b", Backend::start().await).await;
    let c = Pod::start(&dir, cp.grpc, "web-c", Backend::start().await).await;
    a.add_endpoint(&dir);
    let client = Sidecar::start(cp.grpc, NS, "client", &[WEB]).await;
    let url = format!("http://{}/", client.upstreams[0]);
    wait::until(
        "traffic through the mesh",
        Duration::from_secs(10),
        || async { matches!(client::get(&client::http1(), &url).await, Ok((s, _)) if s == 200) },
    )
    .await;

    let load = Load::start(&url, 4);
    // Add B: it serves within a second.
    let t = Instant::now();
    b.add_endpoint(&dir);
    let took = until_serving(&b, t).await;
    assert!(
        took < Duration::from_secs(1),
        "added endpoint served after {took:?}"
    );
    // Remove A: it gets no new requests within a second; its in-flight ones finish.
    let t = Instant::now();
    a.remove_endpoint(&dir);
    let took = until_drained(&a, &load, t).await;
    assert!(
        took < Duration::from_secs(1),
        "removed endpoint drained after {took:?}"
    );
    // Replace B with C, one at a time, as a rolling update does.
    let t = Instant::now();
    c.add_endpoint(&dir);
    until_serving(&c, t).await;
    let t = Instant::now();
    b.remove_endpoint(&dir);
    let took = until_drained(&b, &load, t).await;
    assert!(
        took < Duration::from_secs(1),
        "replaced endpoint drained after {took:?}"
    );

    let (ok, failed, errors) = load.stop().await;
    assert_eq!(
        failed, 0,
        "failed requests during endpoint changes: {errors:?}"
    );
    assert!(ok > 100, "load ran ({ok} requests)");
    assert!(c.requests() > 0 && b.requests() > 0 && a.requests() > 0);
}

#[tokio::test]
async fn a_controller_restart_fails_no_request() {
    let dir = ManifestDir::new();
    dir.write("service.yaml", &service(NS, "web", 80));
    let cp = ControllerProc::start(dir.path()).await;
    let a = Pod::start(&dir, cp.grpc, "web-a", Backend::start().await).await;
    a.add_endpoint(&dir);
    let client = Sidecar::start(cp.grpc, NS, "client", &[WEB]).await;
    let url = format!("http://{}/", client.upstreams[0]);
    wait::until(
        "traffic through the mesh",
        Duration::from_secs(10),
        || async { matches!(client::get(&client::http1(), &url).await, Ok((s, _)) if s == 200) },
    )
    .await;

    // A controller that has run a while has counted many index versions; the
    // one that replaces it starts counting again.
    // (web's view changes 30 times: web-b in, web-b out).
    let b = Pod::start(&dir, cp.grpc, "web-b", Backend::start().await).await;
    for i in 0..30 {
        let v = cp.metric("strait_controller_index_version").await;
        if i % 2 == 0 {
            b.add_endpoint(&dir);
        } else {
            b.remove_endpoint(&dir);
        }
        wait::until("the change indexed", Duration::from_secs(10), || async {
            cp.metric("strait_controller_index_version").await > v
        })
        .await;
    }
    let load = Load::start(&url, 4);
    let grpc = cp.grpc;
    let mut cp = cp;
    cp.proc.child.kill().await.unwrap();
    // The mesh runs on what it knew while the controller is away.
    let before = load.ok();
    wait::until(
        "traffic without a controller",
        Duration::from_secs(10),
        || async { load.ok() > before + 200 },
    )
    .await;
    let cp = ControllerProc::start_on(dir.path(), grpc).await;
    // Both proxies watch again: the client's destination and its own policy, and
    // the backend's policy.
    wait::until("proxies re-watching", Duration::from_secs(20), || async {
        cp.metric("strait_controller_watches{service=\"inbound_policy\"}")
            .await
            >= 2.0
            && cp
                .metric("strait_controller_watches{service=\"discovery\"}")
                .await
                >= 1.0
    })
    .await;
    let before = load.ok();
    wait::until(
        "traffic after the restart",
        Duration::from_secs(10),
        || async { load.ok() > before + 200 },
    )
    .await;
    // Changes made through the new controller take effect, though its index
    // counts versions from the start again.
    b.add_endpoint(&dir);
    a.remove_endpoint(&dir);
    until_serving(&b, Instant::now()).await;
    until_drained(&a, &load, Instant::now()).await;
    let (ok, failed, errors) = load.stop().await;
    assert_eq!(
        failed, 0,
        "failed requests across the controller restart: {errors:?}"
    );
    assert!(ok > 400);
}

/// Told to stop (SIGTERM, as Kubernetes does), a controller says it is not
/// ready, serves on for its shutdown delay (5 s), then ends its proxies'
/// watches and exits, rather than wait on streams that never end until it
/// is killed; its proxies serve on with what they knew.
#[tokio::test]
async fn a_controller_stops_after_its_delay_though_proxies_watch_it() {
    let dir = ManifestDir::new();
    dir.write("service.yaml", &service(NS, "web", 80));
    let mut cp = ControllerProc::start(dir.path()).await;
    let a = Pod::start(&dir, cp.grpc, "web-a", Backend::start().await).await;
    a.add_endpoint(&dir);
    let client = Sidecar::start(cp.grpc, NS, "client", &[WEB]).await;
    let url = format!("http://{}/", client.upstreams[0]);
    let served =
        || async { matches!(client::get(&client::http1(), &url).await, Ok((s, _)) if s == 200) };
    wait::until("traffic through the mesh", Duration::from_secs(10), served).await;
    assert!(
        cp.metric("strait_controller_watches{service=\"discovery\"}")
            .await
            >= 1.0
    );

    cp.proc.sigterm().await;
    wait::until(
        "the controller not ready",
        Duration::from_secs(3),
        || async { matches!(wait::admin_get(cp.admin, "/ready").await, Ok((503, _))) },
    )
    .await;
    let exited = tokio::time::timeout(Duration::from_secs(10), cp.proc.child.wait()).await;
    assert!(
        matches!(&exited, Ok(Ok(s)) if s.success()),
        "the controller did not stop within 10 s: {exited:?}"
    );
    assert!(served().await, "the proxies serve on without it");
}

/// A watcher that reads nothing (its HTTP/2 window shut: a wedged proxy, or
/// anyone who may watch) holds its stream's last message, and so the graceful
/// close: the stopping controller cuts it after its drain timeout (15 s) and
/// exits, rather than wait until it is killed.
#[tokio::test]
async fn a_watcher_that_reads_nothing_does_not_hold_a_stopping_controller() {
    use strait_api::v1 as api;
    use strait_api::v1::discovery_client::DiscoveryClient;
    let dir = ManifestDir::new();
    dir.write("service.yaml", &service(NS, "web", 80));
    let grpc: SocketAddr = format!("127.0.0.1:{}", strait_tests::process::free_port())
        .parse()
        .unwrap();
    let mut cp = ControllerProc::spawn_with(
        dir.path(),
        grpc,
        None,
        None,
        &["--shutdown-delay=0s".into()],
    );
    cp.ready(Duration::from_secs(20)).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .initial_stream_window_size(0)
        .connect()
        .await
        .expect("connect to the controller");
    let _held = DiscoveryClient::new(channel)
        .watch(api::WatchDestination {
            destination: WEB.into(),
            context_namespace: NS.into(),
            proxy_id: "wedged".into(),
        })
        .await
        .expect("the watch begins");

    cp.proc.sigterm().await;
    let exited = tokio::time::timeout(Duration::from_secs(25), cp.proc.child.wait()).await;
    assert!(
        matches!(&exited, Ok(Ok(s)) if s.success()),
        "the controller did not stop within 25 s: {exited:?}"
    );
}

/// A proxy the controller refuses says why it is not ready: its user need
/// not guess between a controller it cannot reach and one that refuses it.
#[tokio::test]
async fn a_proxy_the_controller_refuses_says_why_it_is_not_ready() {
    let dir = ManifestDir::new();
    let cp = ControllerProc::start(dir.path()).await;
    let admin: SocketAddr = format!("127.0.0.1:{}", strait_tests::process::free_port())
        .parse()
        .unwrap();
    let _proxy = strait_tests::process::Proc::spawn(
        "strait-proxy",
        &[
            "--inbound-addr=127.0.0.1:0".into(),
            "--outbound-addr=127.0.0.1:0".into(),
            format!("--admin-addr={admin}"),
            format!("--control-plane=http://{}", cp.grpc),
            // Not a Kubernetes name: the controller refuses the watch.
            "--namespace=Shop".into(),
            "--pod-name=web-a".into(),
        ],
        &[("STRAIT_PROXY_LOG_LEVEL", "warn")],
    );
    let refused = || async {
        matches!(wait::admin_get(admin, "/ready").await,
            Ok((503, body)) if body.contains("namespace is not a Kubernetes name"))
    };
    let said = wait::until_or(Duration::from_secs(10), refused).await;
    let last = wait::admin_get(admin, "/ready").await;
    assert!(said, "/ready said: {last:?}");
}

#[tokio::test]
async fn a_malformed_file_leaves_traffic_untouched_and_is_reported() {
    let dir = ManifestDir::new();
    dir.write("service.yaml", &service(NS, "web", 80));
    let cp = ControllerProc::start(dir.path()).await;
    let a = Pod::start(&dir, cp.grpc, "web-a", Backend::start().await).await;
    let b = Pod::start(&dir, cp.grpc, "web-b", Backend::start().await).await;
    a.add_endpoint(&dir);
    let client = Sidecar::start(cp.grpc, NS, "client", &[WEB]).await;
    let url = format!("http://{}/", client.upstreams[0]);
    wait::until(
        "traffic through the mesh",
        Duration::from_secs(10),
        || async { matches!(client::get(&client::http1(), &url).await, Ok((s, _)) if s == 200) },
    )
    .await;
    let load = Load::start(&url, 2);

    // Break A's slice (a bad address) and, in the same edit, point it at B: none of
    // it may apply.
    let broken = endpoint(NS, "web", "web-a", b.backend.addr).replace("127.0.0.1", "127.0.0.one");
    dir.write(&a.slice_file(), &broken);
    wait::until("the error reported", Duration::from_secs(5), || async {
        cp.metric("strait_controller_reload_errors_total").await >= 1.0
    })
    .await;
    let (served_a, total) = (a.requests(), load.ok());
    wait::until("more traffic", Duration::from_secs(5), || async {
        load.ok() > total + 100
    })
    .await;
    assert!(
        a.requests() > served_a,
        "the last good endpoint keeps serving"
    );
    assert_eq!(b.requests(), 0, "nothing of the broken file applied");

    // Fixing the file applies it.
    let t = Instant::now();
    dir.write(
        &a.slice_file(),
        &endpoint(NS, "web", "web-a", b.backend.addr),
    );
    until_serving(&b, t).await;
    let (_, failed, errors) = load.stop().await;
    assert_eq!(failed, 0, "{errors:?}");
    assert_eq!(a.backend.stats.in_flight.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_ten_times_slower_endpoint_gets_well_under_its_share() {
    let dir = ManifestDir::new();
    dir.write("service.yaml", &service(NS, "web", 80));
    let cp = ControllerProc::start(dir.path()).await;
    let slow = Pod::start(
        &dir,
        cp.grpc,
        "web-slow",
        Backend::start_slow(Duration::from_millis(30)).await,
    )
    .await;
    let f1 = Pod::start(
        &dir,
        cp.grpc,
        "web-f1",
        Backend::start_slow(Duration::from_millis(3)).await,
    )
    .await;
    let f2 = Pod::start(
        &dir,
        cp.grpc,
        "web-f2",
        Backend::start_slow(Duration::from_millis(3)).await,
    )
    .await;
    for p in [&slow, &f1, &f2] {
        p.add_endpoint(&dir);
    }
    let client = Sidecar::start(cp.grpc, NS, "client", &[WEB]).await;
    let url = format!("http://{}/", client.upstreams[0]);
    // All three endpoints are in one scan of the directory: once both fast ones
    // have served, the slow one is known too.
    let c = client::http1();
    wait::until(
        "both fast endpoints serving",
        Duration::from_secs(10),
        || async {
            let _ = client::get(&c, &url).await;
            f1.requests() > 0 && f2.requests() > 0
        },
    )
    .await;
    let base = (slow.requests(), f1.requests(), f2.requests());
    let load = Load::start(&url, 4);
    wait::until("600 requests", Duration::from_secs(30), || async {
        load.ok() >= 600
    })
    .await;
    let (ok, failed, errors) = load.stop().await;
    assert_eq!(failed, 0, "{errors:?}");
    let (s, a, b) = (
        slow.requests() - base.0,
        f1.requests() - base.1,
        f2.requests() - base.2,
    );
    let share = s as f64 / (s + a + b) as f64;
    eprintln!("slow {s}, fast {a} and {b} of {ok}: slow share {share:.3}");
    assert!(
        share < 0.15,
        "slow endpoint got {share:.3} of the traffic ({s}/{a}/{b})"
    );
}

#[tokio::test]
async fn a_controller_started_on_a_broken_file_serves_only_once_it_loads() {
    let dir = ManifestDir::new();
    dir.write("service.yaml", &service(NS, "web", 80));
    dir.write("broken.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: test}\nspec: {ports: [{port: eighty}]}\n");
    let grpc: SocketAddr = format!("127.0.0.1:{}", strait_tests::process::free_port())
        .parse()
        .unwrap();
    let mut cp = ControllerProc::spawn(dir.path(), grpc, None, None);
    wait::until("the rejection counted", Duration::from_secs(20), || async {
        cp.metric("strait_controller_reload_errors_total").await >= 1.0
    })
    .await;
    let (status, _) = wait::admin_get(cp.admin, "/ready").await.unwrap();
    assert_eq!(status, 503, "not ready while a manifest is rejected");
    assert!(
        tokio::net::TcpStream::connect(grpc).await.is_ok(),
        "the port is bound"
    );

    dir.write("broken.yaml", &service(NS, "x", 80));
    cp.ready(Duration::from_secs(10)).await;
    // Serving now: a proxy gets its answers.
    let _sidecar = Sidecar::start(cp.grpc, NS, "client", &[WEB]).await;
}

#[tokio::test]
async fn a_refusing_endpoint_costs_a_few_requests_not_its_share() {
    let dir = ManifestDir::new();
    dir.write("service.yaml", &service(NS, "web", 80));
    let cp = ControllerProc::start(dir.path()).await;
    let a = Pod::start(&dir, cp.grpc, "web-a", Backend::start().await).await;
    let b = Pod::start(&dir, cp.grpc, "web-b", Backend::start().await).await;
    // C stays listed, but its pod is gone: every connection to its proxy is
    // refused at once, which looks fast to a latency-aware balancer.
    let c = Pod::start(&dir, cp.grpc, "web-c", Backend::start().await).await;
    for p in [&a, &b, &c] {
        p.add_endpoint(&dir);
    }
    drop(c);
    let client = Sidecar::start(cp.grpc, NS, "client", &[WEB]).await;
    let url = format!("http://{}/", client.upstreams[0]);
    let http = client::http1();
    wait::until(
        "both live endpoints serving",
        Duration::from_secs(10),
        || async {
            let _ = client::get(&http, &url).await;
            a.requests() > 0 && b.requests() > 0
        },
    )
    .await;
    let mut failed = 0;
    for _ in 0..300 {
        match client::get(&http, &url).await {
            Ok((s, _)) if s == 200 => {}
            _ => failed += 1,
        }
    }
    assert!(
        failed <= 5,
        "{failed} of 300 requests failed on the refusing endpoint"
    );
}

/// Service `web` with `ports` as its ports (each named after its number).
fn web_with_ports(ports: impl Iterator<Item = u32>) -> String {
    let ports: String = ports
        .map(|p| format!("  - {{name: p{p}, port: {}}}\n", (p - 1) % 65_535 + 1))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  ports:\n{ports}"
    )
}

#[tokio::test]
async fn an_oversized_service_is_refused_and_the_last_good_one_serves() {
    let dir = ManifestDir::new();
    dir.write("service.yaml", &service(NS, "web", 80));
    let cp = ControllerProc::start(dir.path()).await;
    let a = Pod::start(&dir, cp.grpc, "web-a", Backend::start().await).await;
    a.add_endpoint(&dir);
    let client = Sidecar::start(cp.grpc, NS, "client", &[WEB]).await;
    let url = format!("http://{}/", client.upstreams[0]);
    let ok =
        || async { matches!(client::get(&client::http1(), &url).await, Ok((s, _)) if s == 200) };
    wait::until("traffic through the mesh", Duration::from_secs(10), ok).await;
    let (before_peak, before) = cp.proc.memory_kib();

    // 100,000 ports, about 3 MB of YAML, in place of the good Service.
    dir.write("service.yaml", &web_with_ports(1..=100_000));
    wait::until("the refusal reported", Duration::from_secs(20), || async {
        cp.metric("strait_controller_reload_errors_total").await >= 1.0
    })
    .await;
    assert!(ok().await, "the last good Service keeps serving");
    let (peak, after) = cp.proc.memory_kib();
    println!(
        "controller RSS before {before} KiB, after refusing 100,000 ports {after} KiB (peak {peak} KiB)"
    );
    // Refused before it is parsed: neither kept nor paid for on the way.
    assert!(
        peak < before_peak + 32 * 1024,
        "peak RSS grew by more than 32 MiB: {before_peak} -> {peak} KiB"
    );
    // Small enough to parse, over the limit of ports per Service.
    dir.write("service.yaml", &web_with_ports(1..=300));
    wait::until("the second refusal", Duration::from_secs(20), || async {
        cp.metric("strait_controller_reload_errors_total").await >= 2.0
    })
    .await;
    assert!(ok().await, "the last good Service still serves");
}
