//! Traffic policy through real processes: HTTPRoute weights, matches, timeouts
//! and retries, BackendPolicy budgets and circuit breaking, with backends that
//! fail, stall and stream on command. Endpoints are plain (unmeshed) workloads:
//! the client proxy's stack is what is under test.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use strait_tests::backend::Backend;
use strait_tests::load::Load;
use strait_tests::manifests::{ManifestDir, endpoint, meshed_pod, service};
use strait_tests::mesh::{ControllerProc, Sidecar, metric_sum};
use strait_tests::process::free_port;
use strait_tests::{client, wait};

const NS: &str = "test";
const WEB: &str = "web.test.svc.cluster.local:80";
/// A rule sending everything to `web`, retrying 503s three times.
const RETRY_503: &str = "  - backendRefs: [{name: web, port: 80}]\n    retry: {codes: [503], attempts: 3, backoff: 1ms}\n";

/// A controller, a client sidecar with a local listener for `web`, and the
/// Services `web`, `web-v1` and `web-v2`.
struct Mesh {
    dir: ManifestDir,
    cp: ControllerProc,
    client: Sidecar,
}

impl Mesh {
    async fn start(files: &[(&str, String)]) -> Mesh {
        let dir = ManifestDir::new();
        for svc in ["web", "web-v1", "web-v2"] {
            dir.write(&format!("svc-{svc}.yaml"), &service(NS, svc, 80));
        }
        for (name, yaml) in files {
            dir.write(name, yaml);
        }
        let cp = ControllerProc::start(dir.path()).await;
        let client = Sidecar::start(cp.grpc, NS, "client", &[WEB]).await;
        Mesh { dir, cp, client }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.client.upstreams[0])
    }

    /// `backend` serves `svc`, as pod `pod`.
    fn serve(&self, svc: &str, pod: &str, backend: &Backend) {
        self.dir.write(
            &format!("slice-{pod}.yaml"),
            &endpoint(NS, svc, pod, backend.addr),
        );
    }

    /// `v1` serves `web-v1` and `v2` serves `web-v2`; returns once the canary
    /// routes reach both.
    async fn serve_canary(&self, v1: &Backend, v2: &Backend) {
        self.serve("web-v1", "v1", v1);
        self.serve("web-v2", "v2", v2);
        self.until_ok("/").await;
        wait::until("v2 serving", Duration::from_secs(10), || async {
            client::http1()
                .request(req("GET", &self.url("/"), Some("true")))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    async fn until_ok(&self, path: &str) {
        let url = self.url(path);
        wait::until(
            "traffic through the mesh",
            Duration::from_secs(10),
            || async {
                matches!(client::get(&client::http1(), &url).await, Ok((s, _)) if s == 200)
            },
        )
        .await;
    }

    async fn metric(&self, name: &str) -> f64 {
        metric_sum(self.client.admin, name).await
    }
}

fn route(name: &str, annotations: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: {NS}\n  annotations: {{{annotations}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n{rules}"
    )
}

fn backend_policy(spec: &str) -> String {
    format!(
        "apiVersion: policy.strait.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  targetRef: {{group: \"\", kind: Service, name: web}}\n{spec}"
    )
}

fn split(v1: u32, v2: u32) -> String {
    route(
        "web",
        "",
        &format!(
            "  - backendRefs:\n    - {{name: web-v1, port: 80, weight: {v1}}}\n    - {{name: web-v2, port: 80, weight: {v2}}}\n"
        ),
    )
}

/// Sends `n` requests (8 at a time); returns how many answered `want`.
async fn send(url: &str, n: usize, want: http::StatusCode) -> usize {
    let c = client::http1();
    let mut ok = 0;
    for _ in 0..n / 8 {
        let batch = (0..8).map(|_| client::get(&c, url));
        for r in futures_util::future::join_all(batch).await {
            if matches!(r, Ok((s, _)) if s == want) {
                ok += 1;
            }
        }
    }
    ok
}

#[tokio::test]
async fn weights_split_traffic_and_a_live_shift_fails_nothing() {
    let (v1, v2) = (Backend::start().await, Backend::start().await);
    let mesh = Mesh::start(&[("route.yaml", split(90, 10))]).await;
    mesh.serve("web-v1", "v1", &v1);
    mesh.serve("web-v2", "v2", &v2);
    wait::until("both versions serving", Duration::from_secs(10), || async {
        send(&mesh.url("/"), 80, http::StatusCode::OK).await;
        v1.requests() > 0 && v2.requests() > 0
    })
    .await;

    let (a1, a2) = (v1.requests(), v2.requests());
    assert_eq!(send(&mesh.url("/"), 2000, http::StatusCode::OK).await, 2000);
    let (n1, n2) = (v1.requests() - a1, v2.requests() - a2);
    let share = n2 as f64 / (n1 + n2) as f64;
    println!(
        "90/10 split over {} requests: v1 {n1}, v2 {n2} ({:.1} % to v2)",
        n1 + n2,
        share * 100.0
    );
    assert!(
        (0.07..=0.13).contains(&share),
        "v2 got {:.1} %",
        share * 100.0
    );

    // Shift to 10/90 under load: it takes effect within a second, and no
    // request fails on the way.
    let load = Load::start(&mesh.url("/"), 4);
    wait::until("load running", Duration::from_secs(5), || async {
        load.ok() > 50
    })
    .await;
    let t = Instant::now();
    mesh.dir.write("route.yaml", &split(10, 90));
    let took = loop {
        let (b1, b2) = (v1.requests(), v2.requests());
        let sent = load.ok();
        wait::until("more traffic", Duration::from_secs(5), || async {
            load.ok() >= sent + 60
        })
        .await;
        let (d1, d2) = (v1.requests() - b1, v2.requests() - b2);
        if d2 > 3 * d1 {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the shift never took effect"
        );
    };
    let (ok, failed, errors) = load.stop().await;
    println!("shift to 10/90 took effect after {took:?}; {ok} requests, {failed} failed");
    assert_eq!(failed, 0, "failed during the shift: {errors:?}");
    assert!(took < Duration::from_secs(1), "the shift took {took:?}");
}

#[tokio::test]
async fn retries_on_503_hide_a_flaky_backend() {
    let b = Backend::start().await;
    // A backend failing 30 % of requests needs about 0.43 retries a request:
    // more than the default budget (20 %) grants at this rate.
    let mesh = Mesh::start(&[
        ("route.yaml", route("web", "", RETRY_503)),
        (
            "policy.yaml",
            backend_policy("  retryBudget: {ratio: 0.6, minRetriesPerSecond: 10, ttl: 10s}\n"),
        ),
    ])
    .await;
    mesh.serve("web", "web-0", &b);
    mesh.until_ok("/").await;
    let n = 1000;
    let ok = send(&mesh.url("/flaky/30"), n, http::StatusCode::OK).await;
    let retries = mesh.metric("strait_proxy_route_retries_total").await;
    println!("30 % failing backend, 3 retries: {ok}/{n} succeeded, {retries} retries");
    assert!(ok * 100 >= n * 99, "only {ok} of {n} succeeded");
    assert!(retries >= 250.0, "{retries} retries");
}

/// A retry waiting out its backoff while discovery moves the Service to
/// other endpoints goes to those, not to the ones its request began on.
#[tokio::test]
async fn a_retry_after_the_endpoints_changed_goes_to_the_new_ones() {
    let (old, new) = (Backend::start().await, Backend::start().await);
    old.fail_with(Some(503));
    let rule = "  - backendRefs: [{name: web, port: 80}]\n    retry: {codes: [503], attempts: 1, backoff: 1s}\n";
    let mesh = Mesh::start(&[("route.yaml", route("web", "", rule))]).await;
    mesh.serve("web", "web-0", &new);
    mesh.until_ok("/").await;
    mesh.serve("web", "web-0", &old);
    // A request whose first attempt reached the old endpoint (once the proxy
    // has the change; before, requests go to the new one and succeed).
    let url = mesh.url("/");
    let deadline = Instant::now() + Duration::from_secs(10);
    let pending = loop {
        assert!(
            Instant::now() < deadline,
            "the old endpoint never got a request"
        );
        let seen = old.requests();
        let url = url.clone();
        let r = tokio::spawn(async move { client::get(&client::http1(), &url).await });
        let reached = wait::until_or(Duration::from_millis(900), || async {
            old.requests() > seen
        });
        if reached.await {
            break r;
        }
        let (status, _) = r.await.unwrap().unwrap();
        assert_eq!(status, 200, "before the change reached the proxy");
    };
    // Its retry waits at least a second: the endpoints change back meanwhile.
    let served = new.requests();
    mesh.serve("web", "web-0", &new);
    let (status, _) = pending.await.unwrap().unwrap();
    assert_eq!(
        status, 200,
        "the retry went to the endpoint its request began on"
    );
    assert!(new.requests() > served);
}

/// `web` served by `b`, its one rule with a 200 ms request timeout.
async fn with_request_timeout(b: &Backend) -> Mesh {
    let mesh = Mesh::start(&[(
        "route.yaml",
        route(
            "web",
            "",
            "  - backendRefs: [{name: web, port: 80}]\n    timeouts: {request: 200ms}\n",
        ),
    )])
    .await;
    mesh.serve("web", "web-0", b);
    mesh.until_ok("/").await;
    mesh
}

#[tokio::test]
async fn a_request_timeout_cuts_a_stalled_backend_with_a_504() {
    let b = Backend::start().await;
    let mesh = with_request_timeout(&b).await;
    const BACKEND_5XX: &str = "strait_proxy_backend_responses_total{service=\"web.test.svc.cluster.local:80\",route=\"test/web\",rule=\"0\",backend=\"web.test.svc.cluster.local:80\",status_class=\"5xx\"}";
    // Those of the wait for the mesh to be up.
    let failed_before = mesh.metric(BACKEND_5XX).await;
    let c = client::http1();
    for _ in 0..3 {
        let t = Instant::now();
        let rsp = c
            .get(mesh.url("/slow/2000").parse().unwrap())
            .await
            .unwrap();
        let took = t.elapsed();
        assert_eq!(rsp.status(), http::StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            rsp.headers()["strait-proxy-error"],
            "request timeout after 200ms"
        );
        println!("stalled backend answered by the proxy after {took:?}");
        // Well before the backend's 2 s; the upper bound leaves a loaded
        // 2-core machine room (the heavy suites run beside this one).
        assert!(
            took >= Duration::from_millis(150) && took <= Duration::from_millis(600),
            "504 after {took:?}"
        );
    }
    assert_eq!(
        mesh.metric("strait_proxy_route_timeouts_total{service=\"web.test.svc.cluster.local:80\",route=\"test/web\",rule=\"0\",reason=\"request\"}").await,
        3.0
    );
    // The backend that stalled answers for the 504s in its own series, which
    // canary analysis compares: it does not look healthy.
    assert_eq!(mesh.metric(BACKEND_5XX).await - failed_before, 3.0);
}

/// Without a route timeout, a caller that gives up first (its own timeout)
/// leaves its attempt in the backend's requests and in no response: the
/// success rate canary analysis computes from them counts the hang, as
/// Linkerd's backend requests and Envoy's code-0 responses do.
#[tokio::test]
async fn an_attempt_its_caller_gave_up_on_counts_against_its_backend() {
    let b = Backend::start().await;
    let mesh = Mesh::start(&[(
        "route.yaml",
        route("web", "", "  - backendRefs: [{name: web, port: 80}]\n"),
    )])
    .await;
    mesh.serve("web", "web-0", &b);
    mesh.until_ok("/").await;
    const REQUESTS: &str = "strait_proxy_backend_requests_total";
    const RESPONSES: &str = "strait_proxy_backend_responses_total";
    let (sent, answered) = (mesh.metric(REQUESTS).await, mesh.metric(RESPONSES).await);
    assert!(
        sent >= 1.0 && sent == answered,
        "{sent} sent, {answered} answered"
    );
    let c = client::http1();
    for _ in 0..3 {
        let gave_up = tokio::time::timeout(
            Duration::from_millis(200),
            c.get(mesh.url("/slow/5000").parse().unwrap()),
        )
        .await;
        assert!(
            gave_up.is_err(),
            "the backend answered before the caller gave up"
        );
    }
    // The attempts' futures go as the connections close.
    wait::until(
        "the abandoned attempts counted",
        Duration::from_secs(5),
        || async { mesh.metric(REQUESTS).await - sent == 3.0 },
    )
    .await;
    assert_eq!(
        mesh.metric(RESPONSES).await,
        answered,
        "no response was counted"
    );
}

/// A gRPC call the proxy fails is answered as gRPC answers: HTTP 200, the code
/// the app's gRPC library reports (a route's timeout is DEADLINE_EXCEEDED, not
/// the UNAVAILABLE a 504 reads as) and the proxy's reason as its message.
#[tokio::test]
async fn a_grpc_call_the_proxy_fails_is_answered_as_a_grpc_error() {
    let b = Backend::start().await;
    let mesh = with_request_timeout(&b).await;
    let c = client::http2();
    let call = |path: &str| {
        http::Request::post(mesh.url(path))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(client::empty())
            .unwrap()
    };
    let rsp = c.request(call("/slow/2000")).await.unwrap();
    assert_eq!(rsp.status(), http::StatusCode::OK);
    let h = rsp.headers().clone();
    assert_eq!(h["content-type"], "application/grpc");
    assert_eq!(h["grpc-status"], "4", "{h:?}");
    assert_eq!(h["grpc-message"], "request timeout after 200ms");
    assert_eq!(h["strait-proxy-error"], "request timeout after 200ms");
    assert!(
        rsp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty()
    );
    assert_eq!(
        mesh.metric("strait_proxy_route_grpc_responses_total{service=\"web.test.svc.cluster.local:80\",route=\"test/web\",rule=\"0\",grpc_status=\"4\"}").await,
        1.0,
        "counted as the code the app received"
    );
    assert_eq!(
        mesh.metric("strait_proxy_backend_grpc_responses_total{service=\"web.test.svc.cluster.local:80\",route=\"test/web\",rule=\"0\",backend=\"web.test.svc.cluster.local:80\",grpc_status=\"4\"}").await,
        1.0,
        "and against the backend that stalled"
    );
    // The app's own answer passes as it came.
    let rsp = c.request(call("/status/503")).await.unwrap();
    assert_eq!(rsp.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(!rsp.headers().contains_key("grpc-status"));
    // A request that is not a gRPC call gets the HTTP status.
    let rsp = c
        .request(
            http::Request::post(mesh.url("/slow/2000"))
                .body(client::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status(), http::StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn a_retry_budget_bounds_the_load_on_a_failing_backend() {
    let b = Backend::start().await;
    b.fail_with(Some(503));
    let mesh = Mesh::start(&[
        ("route.yaml", route("web", "", RETRY_503)),
        (
            "policy.yaml",
            backend_policy("  retryBudget: {ratio: 0.2, minRetriesPerSecond: 0, ttl: 10s}\n"),
        ),
    ])
    .await;
    mesh.serve("web", "web-0", &b);
    let url = mesh.url("/");
    // The backend itself answers (not the proxy for want of endpoints).
    wait::until("the backend failing", Duration::from_secs(10), || async {
        let _ = client::get(&client::http1(), &url).await;
        b.requests() > 0
    })
    .await;
    let before = b.requests();
    let n = 800;
    send(&url, n, http::StatusCode::SERVICE_UNAVAILABLE).await;
    let seen = b.requests() - before;
    let ratio = seen as f64 / n as f64;
    let exhausted = mesh
        .metric("strait_proxy_route_retries_skipped_total{service=\"web.test.svc.cluster.local:80\",route=\"test/web\",rule=\"0\",reason=\"budget_exhausted\"}")
        .await;
    let retries = mesh.metric("strait_proxy_route_retries_total").await;
    println!(
        "100 % failing backend, 20 % budget: {n} requests, backend saw {seen} ({ratio:.2}x), {retries} retries, {exhausted} retries refused"
    );
    assert!(
        ratio <= 1.22,
        "backend saw {ratio:.2}x the client's requests"
    );
    assert!(ratio >= 1.1, "retries should still be spent: {ratio:.2}x");
    assert!(exhausted > 0.0);
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_readmitted_when_it_recovers() {
    let eps = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let mesh = Mesh::start(&[
        (
            "route.yaml",
            route(
                "web",
                "",
                "  - backendRefs: [{name: web, port: 80}]\n    retry: {codes: [500], attempts: 2, backoff: 1ms}\n",
            ),
        ),
        (
            "policy.yaml",
            backend_policy(
                "  outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 500ms, maxEjectionTime: 1s, maxEjectionPercent: 50}\n",
            ),
        ),
    ])
    .await;
    for (i, b) in eps.iter().enumerate() {
        mesh.serve("web", &format!("web-{i}"), b);
    }
    wait::until("all three serving", Duration::from_secs(10), || async {
        send(&mesh.url("/"), 64, http::StatusCode::OK).await;
        eps.iter().all(|b| b.requests() > 0)
    })
    .await;
    eps[2].fail_with(Some(500));
    let n = 1000;
    let ok = send(&mesh.url("/"), n, http::StatusCode::OK).await;
    // Ejected by now: the next requests hardly reach it.
    let before = eps[2].requests();
    let ok2 = send(&mesh.url("/"), n, http::StatusCode::OK).await;
    let share = (eps[2].requests() - before) as f64 / n as f64;
    let ejections = mesh.metric("strait_proxy_backend_ejections_total").await;
    println!(
        "one of three endpoints failing: {ok}/{n} then {ok2}/{n} succeeded; it got {:.2} % of the second {n}; {ejections} ejections",
        share * 100.0
    );
    assert!(ok * 1000 >= n * 995, "{ok} of {n} succeeded");
    assert!(ok2 * 1000 >= n * 995, "{ok2} of {n} succeeded");
    assert!(
        share < 0.01,
        "the failing endpoint got {:.2} %",
        share * 100.0
    );
    assert!(ejections >= 1.0);

    // It recovers: a probe re-admits it and it takes its share again.
    eps[2].fail_with(None);
    let before = eps[2].requests();
    wait::until(
        "the recovered endpoint re-admitted",
        Duration::from_secs(10),
        || async {
            send(&mesh.url("/"), 64, http::StatusCode::OK).await;
            eps[2].requests() > before + 20
        },
    )
    .await;
}

fn canary_routes() -> String {
    route(
        "web",
        "",
        "  - matches: [{headers: [{name: x-canary, value: \"true\"}]}]\n    backendRefs: [{name: web-v2, port: 80}]\n  - matches: [{path: {type: RegularExpression, value: \"/items/[0-9]+\"}}]\n    backendRefs: [{name: web-v2, port: 80}]\n  - matches: [{method: DELETE}]\n    backendRefs: [{name: web-v2, port: 80}]\n  - backendRefs: [{name: web-v1, port: 80}]\n",
    )
}

async fn which(
    v1: &Backend,
    v2: &Backend,
    req: http::Request<strait_tests::TestBody>,
) -> &'static str {
    let (a1, a2) = (v1.requests(), v2.requests());
    let rsp = client::http1().request(req).await.unwrap();
    assert!(rsp.status().is_success(), "{}", rsp.status());
    match (v1.requests() - a1, v2.requests() - a2) {
        (1, 0) => "v1",
        (0, 1) => "v2",
        other => panic!("reached {other:?}"),
    }
}

fn req(method: &str, url: &str, canary: Option<&str>) -> http::Request<strait_tests::TestBody> {
    let mut b = http::Request::builder().method(method).uri(url);
    if let Some(c) = canary {
        b = b.header("x-canary", c);
    }
    b.body(client::empty()).unwrap()
}

#[tokio::test]
async fn matches_route_by_header_path_regex_and_method() {
    let (v1, v2) = (Backend::start().await, Backend::start().await);
    let mesh = Mesh::start(&[("route.yaml", canary_routes())]).await;
    mesh.serve_canary(&v1, &v2).await;
    let cases = [
        ("GET", "/a", Some("true"), "v2"),
        ("GET", "/a", Some("false"), "v1"),
        ("GET", "/a", None, "v1"),
        ("GET", "/items/42", None, "v2"),
        ("GET", "/items/42/x", None, "v1"),
        ("GET", "/items/abc", None, "v1"),
        ("DELETE", "/a", None, "v2"),
        ("PUT", "/a", None, "v1"),
    ];
    for _ in 0..10 {
        for (method, path, canary, want) in cases {
            let got = which(&v1, &v2, req(method, &mesh.url(path), canary)).await;
            assert_eq!(got, want, "{method} {path} x-canary: {canary:?}");
        }
    }
}

#[tokio::test]
async fn an_invalid_route_is_reported_and_the_last_good_routes_keep_serving() {
    let (v1, v2) = (Backend::start().await, Backend::start().await);
    let mesh = Mesh::start(&[("route.yaml", canary_routes())]).await;
    mesh.serve_canary(&v1, &v2).await;
    let bad = [
        (
            "unknown backend",
            canary_routes().replace("web-v2", "nowhere"),
        ),
        (
            "bad regex",
            canary_routes().replace("/items/[0-9]+", "/items/[0-9+"),
        ),
        (
            "a parent in another namespace",
            canary_routes().replace(
                "kind: Service, name: web,",
                "kind: Service, namespace: other, name: web,",
            ),
        ),
        (
            "a backend in another namespace",
            canary_routes().replace("{name: web-v2,", "{name: web-v2, namespace: other,"),
        ),
    ];
    for (i, (what, yaml)) in bad.iter().enumerate() {
        let errors = mesh.cp.metric("strait_controller_reload_errors").await;
        mesh.dir.write("route.yaml", yaml);
        wait::until(
            &format!("{what} reported"),
            Duration::from_secs(10),
            || async { mesh.cp.metric("strait_controller_reload_errors").await > errors },
        )
        .await;
        // The routes in force before the bad edit still route.
        for _ in 0..10 {
            assert_eq!(
                which(&v1, &v2, req("GET", &mesh.url("/a"), Some("true"))).await,
                "v2",
                "after {what}"
            );
            assert_eq!(
                which(&v1, &v2, req("GET", &mesh.url("/a"), None)).await,
                "v1",
                "after {what}"
            );
        }
        println!(
            "{}: {what} reported, the last good routes kept serving",
            i + 1
        );
    }
    // Every backend at weight 0 is no error: the rule is drained, and answers 500.
    mesh.dir.write("route.yaml", &split(0, 0));
    wait::until("the drained rule", Duration::from_secs(10), || async {
        send(&mesh.url("/a"), 8, http::StatusCode::INTERNAL_SERVER_ERROR).await == 8
    })
    .await;
}

/// A route attached without rules holds its Service's traffic, as on the API
/// server: absent `rules` are the CRD's default rule (every path, no backend:
/// 500), not the Service's traffic left to it as if no route were attached;
/// `rules: []` matches nothing (404).
#[tokio::test]
async fn a_route_without_rules_holds_its_services_traffic() {
    let web = Backend::start().await;
    let mesh = Mesh::start(&[]).await;
    mesh.serve("web", "web", &web);
    mesh.until_ok("/").await;
    let status = async || match client::get(&client::http1(), &mesh.url("/a")).await {
        Ok((s, _)) => s.as_u16(),
        Err(_) => 0,
    };
    // `spec` without `rules`.
    mesh.dir.write(
        "route.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\n  namespace: {NS}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n"
        ),
    );
    wait::until(
        "the default rule's 500",
        Duration::from_secs(10),
        || async { status().await == 500 },
    )
    .await;
    let reached = web.requests();
    for _ in 0..5 {
        assert_eq!(status().await, 500);
    }
    assert_eq!(
        web.requests(),
        reached,
        "the Service was reached past the route"
    );
    // `rules: []` (valid: the CRD sets no minimum) is a route attached that
    // matches nothing: 404, as Gateway API asks, not the Service.
    mesh.dir.write(
        "route.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\n  namespace: {NS}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules: []\n"
        ),
    );
    wait::until("no rule's 404", Duration::from_secs(10), || async {
        status().await == 404
    })
    .await;
    for _ in 0..5 {
        assert_eq!(status().await, 404);
    }
    // `/config` tells an attached route without rules from none.
    let (_, body) = strait_tests::wait::admin_get(mesh.client.admin, "/config")
        .await
        .unwrap();
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    let answer = &config["state"]["destinations"][0]["answer"];
    assert_eq!(answer["routes_attached"], true, "{config:#}");
    assert_eq!(answer["routes"], serde_json::json!([]), "{config:#}");
    assert_eq!(
        web.requests(),
        reached,
        "the Service was reached past the route"
    );
}

/// A backend Service deleted after its route was accepted no longer resolves:
/// its share of requests is answered 500, as Gateway API asks, while the
/// route's other rules keep serving; a backend that resolves but has no ready
/// endpoints answers 503.
#[tokio::test]
async fn a_backend_service_deleted_later_gets_its_share_answered_500() {
    let (v1, v2) = (Backend::start().await, Backend::start().await);
    let mesh = Mesh::start(&[("route.yaml", canary_routes())]).await;
    mesh.serve_canary(&v1, &v2).await;
    let status = async |canary: Option<&str>| {
        let rsp = client::http1()
            .request(req("GET", &mesh.url("/a"), canary))
            .await
            .unwrap();
        let reason = rsp
            .headers()
            .get("strait-proxy-error")
            .map(|v| v.to_str().unwrap().to_string());
        (rsp.status(), reason)
    };
    // No ready endpoint: the backend still resolves.
    mesh.dir.remove("slice-v2.yaml");
    wait::until(
        "web-v2 without endpoints",
        Duration::from_secs(10),
        || async { status(Some("true")).await.0 == http::StatusCode::SERVICE_UNAVAILABLE },
    )
    .await;
    mesh.dir.remove("svc-web-v2.yaml");
    wait::until("web-v2 gone", Duration::from_secs(10), || async {
        status(Some("true")).await.0 == http::StatusCode::INTERNAL_SERVER_ERROR
    })
    .await;
    for _ in 0..5 {
        assert_eq!(
            status(Some("true")).await,
            (
                http::StatusCode::INTERNAL_SERVER_ERROR,
                Some("backend web-v2.test.svc.cluster.local:80 not found".to_string())
            )
        );
        assert_eq!(
            which(&v1, &v2, req("GET", &mesh.url("/a"), None)).await,
            "v1"
        );
    }
}

async fn post(url: &str, body: Bytes) -> (http::StatusCode, String) {
    let req = http::Request::post(url).body(client::body(body)).unwrap();
    let rsp = client::http1().request(req).await.unwrap();
    let status = rsp.status();
    let text = rsp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

/// A mesh whose `web` (served by `b`) retries 503s, the route in force: a
/// flaky path is retried.
async fn retrying_mesh(b: &Backend) -> Mesh {
    let mesh = Mesh::start(&[("route.yaml", route("web", "", RETRY_503))]).await;
    mesh.serve("web", "web-0", b);
    mesh.until_ok("/").await;
    wait::until("retries in force", Duration::from_secs(10), || async {
        send(&mesh.url("/flaky/50"), 16, http::StatusCode::OK).await == 16
    })
    .await;
    mesh
}

#[tokio::test]
async fn a_small_body_is_replayed_intact_and_a_large_one_never() {
    let b = Backend::start().await;
    let mesh = retrying_mesh(&b).await;

    let small: Bytes = (0..1024u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let (status, text) = post(&mesh.url("/upload-flaky"), small.clone()).await;
    assert_eq!((status.as_u16(), text.as_str()), (200, "1024"));
    let uploads = b.uploads();
    assert_eq!(uploads.len(), 2, "one attempt and one retry");
    assert!(
        uploads.iter().all(|u| *u == small),
        "every attempt carried the body intact"
    );

    let large = Bytes::from(vec![7u8; 1024 * 1024]);
    let (status, _) = post(&mesh.url("/upload-flaky"), large.clone()).await;
    assert_eq!(
        status,
        http::StatusCode::SERVICE_UNAVAILABLE,
        "a 1 MiB body is not replayed"
    );
    let uploads = b.uploads();
    assert_eq!(uploads.len(), 3, "the large body reached the backend once");
    assert_eq!(uploads[2], large);
    assert_eq!(
        mesh.metric("strait_proxy_route_retries_skipped_total{service=\"web.test.svc.cluster.local:80\",route=\"test/web\",rule=\"0\",reason=\"body_too_large\"}").await,
        1.0
    );
}

/// With no retry policy, a request that cannot reach its endpoint (nothing
/// listens there) is sent again, whole, to another: a dead endpoint costs a
/// retry, not a failed request. No copy of the request is kept for this; it is
/// handed back unsent, on both paths: a plain endpoint (an HTTP/1 upstream) and
/// a meshed one whose proxy is gone (HTTP/2 to the peer proxy).
#[tokio::test]
async fn a_dead_endpoint_costs_a_retry_not_a_failed_request() {
    let nobody = || SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cases = [
        (
            "a plain endpoint nothing listens on",
            vec![("slice-dead.yaml", endpoint(NS, "web", "dead", nobody()))],
        ),
        (
            "a meshed endpoint whose proxy is gone",
            vec![
                ("pod-gone.yaml", meshed_pod(NS, "gone", "web", free_port())),
                ("slice-gone.yaml", endpoint(NS, "web", "gone", nobody())),
            ],
        ),
    ];
    let body = Bytes::from_static(b"order 7: two coffees, one without milk");
    for (what, files) in cases {
        // A mesh each: the dead endpoint is the only one a retry can come from.
        let b = Backend::start().await;
        let mesh = Mesh::start(&[]).await;
        mesh.serve("web", "web-0", &b);
        mesh.until_ok("/").await;
        for (name, yaml) in &files {
            mesh.dir.write(name, yaml);
        }
        let mut sent = 0;
        wait::until(
            &format!("a request to {what} retried"),
            Duration::from_secs(10),
            || {
                sent += 1;
                let (mesh, body) = (&mesh, body.clone());
                async move {
                    // Every request is answered by the live endpoint, its body
                    // intact, whichever endpoint it was sent to first.
                    let (status, text) = post(&mesh.url("/echo"), body.clone()).await;
                    assert_eq!(status, http::StatusCode::OK, "{what}: {text}");
                    assert_eq!(text.as_bytes(), &body[..], "{what}");
                    mesh.metric("strait_proxy_route_retries_total").await > 0.0
                }
            },
        )
        .await;
        println!("{what}: retried within {sent} requests, none failed");
    }
}

/// A pod whose app has stopped listening while its proxy still serves (an
/// app shutting down gracefully, still in its Service's endpoints until the
/// change reaches every caller) costs a request without a body a retry on
/// another endpoint, on a route with no retries: its proxy answers that
/// none of the request reached the app, and the caller's proxy sends it on
/// as it would one it could not connect to itself. (It answered 502, which
/// reached the client.)
#[tokio::test]
async fn an_app_gone_behind_its_live_proxy_costs_a_retry_not_a_failed_request() {
    // On a route with no retries (no copy kept: the head is), and on one
    // that retries other statuses (its own copy).
    for routes in [vec![], vec![("route.yaml", route("web", "", RETRY_503))]] {
        let what = if routes.is_empty() {
            "no route"
        } else {
            "a route retrying 503"
        };
        let b = Backend::start().await;
        let mesh = Mesh::start(&routes).await;
        mesh.serve("web", "web-0", &b);
        mesh.until_ok("/").await;
        let draining = Sidecar::start(mesh.cp.grpc, NS, "draining", &[]).await;
        mesh.dir.write(
            "pod-draining.yaml",
            &meshed_pod(NS, "draining", "web", draining.inbound.port()),
        );
        let nobody = SocketAddr::from(([127, 0, 0, 1], free_port()));
        mesh.dir.write(
            "slice-draining.yaml",
            &endpoint(NS, "web", "draining", nobody),
        );
        let mut sent = 0;
        wait::until(
            &format!("a request to the draining pod ({what})"),
            Duration::from_secs(10),
            || {
                sent += 1;
                let (mesh, draining) = (&mesh, draining.admin);
                async move {
                    let (status, text) =
                        client::get(&client::http1(), &mesh.url("/")).await.unwrap();
                    assert_eq!(status, http::StatusCode::OK, "{what}: {text}");
                    // Until the draining pod's proxy has said it could not
                    // reach its app.
                    metric_sum(draining, "strait_proxy_http_proxy_errors_total").await > 0.0
                }
            },
        )
        .await;
        assert!(
            mesh.metric("strait_proxy_route_retries_total").await > 0.0,
            "{what}: answered, not retried"
        );
        println!("{what}: retried within {sent} requests, none failed");
    }
}

/// A rule that retries statuses still retries a request no endpoint took,
/// even one whose body is too large to keep a copy of: that body was never
/// read. (It was read ahead by one frame, and then could not be sent again:
/// the client got 502 where a route without retries retried.)
#[tokio::test]
async fn a_large_body_never_sent_is_retried_on_a_retrying_route() {
    let b = Backend::start().await;
    let mesh = retrying_mesh(&b).await;
    let nobody = SocketAddr::from(([127, 0, 0, 1], free_port()));
    mesh.dir
        .write("slice-dead.yaml", &endpoint(NS, "web", "dead", nobody));
    let large = Bytes::from(vec![7u8; 1024 * 1024]);
    const RETRIES: &str = "strait_proxy_route_retries_total";
    let before = mesh.metric(RETRIES).await;
    let mut sent = 0;
    wait::until(
        "a large request to the dead endpoint retried",
        Duration::from_secs(10),
        || {
            sent += 1;
            let (mesh, large) = (&mesh, large.clone());
            async move {
                let (status, text) = post(&mesh.url("/echo"), large.clone()).await;
                assert_eq!(status, http::StatusCode::OK, "{text}");
                assert_eq!(text.len(), large.len());
                mesh.metric(RETRIES).await > before
            }
        },
    )
    .await;
    println!("retried within {sent} requests, none failed");
}

#[tokio::test]
async fn a_grpc_method_route_retries_unavailable() {
    grpc_calls_retried_by(format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: echo\n  namespace: {NS}\n  annotations: {{retry.strait.dev/grpc-codes: unavailable}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo}}]\n  rules:\n  - matches: [{{path: {{type: Exact, value: /strait.testing.v1.Echo/Unary}}}}]\n    backendRefs: [{{name: echo, port: 80}}]\n    retry: {{attempts: 2, backoff: 1ms}}\n"
    ))
    .await;
}

/// The same through a GRPCRoute: its method match and the route's retry
/// annotation are what retries the calls, and a call no rule matches is
/// answered UNIMPLEMENTED (Gateway API's 404).
#[tokio::test]
async fn a_grpcroute_method_match_retries_unavailable() {
    let (mesh, mut echo) = grpc_calls_retried_by(format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: echo\n  namespace: {NS}\n  annotations: {{retry.strait.dev/grpc-codes: unavailable}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo}}]\n  rules:\n  - matches: [{{method: {{service: strait.testing.v1.Echo, method: Unary}}}}]\n    backendRefs: [{{name: echo, port: 80}}]\n"
    ))
    .await;
    let other = echo
        .server_stream(strait_api::testing::EchoRequest {
            message: "hi".into(),
            ..Default::default()
        })
        .await
        .expect_err("no rule matches ServerStream");
    assert_eq!(other.code(), tonic::Code::Unimplemented, "{other:?}");
    assert_eq!(other.message(), "no route matches the request");
    // Counted, as the Service's unmatched requests: a route that answers
    // everything 404 shows as failing, not as no traffic.
    let (_, text) = wait::admin_get(mesh.1.admin, "/metrics").await.unwrap();
    for line in [
        "strait_proxy_route_requests_total{service=\"echo.test.svc.cluster.local:80\",route=\"unmatched\",rule=\"\"} 1",
        "strait_proxy_route_grpc_responses_total{service=\"echo.test.svc.cluster.local:80\",route=\"unmatched\",rule=\"\",grpc_status=\"12\"} 1",
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
}

/// A mesh of one Service `echo` whose endpoint is the gRPC server at `app`
/// (with `route` attached, if any), a client sidecar with a listener for it,
/// and an Echo client on that listener; the first three keep it up.
async fn echo_behind(
    app: SocketAddr,
    route: Option<&str>,
) -> (
    ManifestDir,
    ControllerProc,
    Sidecar,
    strait_api::testing::echo_client::EchoClient<tonic::transport::Channel>,
) {
    let dir = ManifestDir::new();
    dir.write("svc.yaml", &service(NS, "echo", 80));
    dir.write("slice.yaml", &endpoint(NS, "echo", "echo-0", app));
    if let Some(route) = route {
        dir.write("route.yaml", route);
    }
    let cp = ControllerProc::start(dir.path()).await;
    let client = Sidecar::start(cp.grpc, NS, "client", &["echo.test.svc.cluster.local:80"]).await;
    let echo = strait_api::testing::echo_client::EchoClient::connect(format!(
        "http://{}",
        client.upstreams[0]
    ))
    .await
    .unwrap();
    (dir, cp, client, echo)
}

/// A gRPC server lost mid-call (its process gone, its connection closed
/// without a word) is UNAVAILABLE to the caller, as without the mesh: not
/// INTERNAL, on which clients neither reconnect a watch nor retry.
#[tokio::test]
async fn a_grpc_server_lost_mid_call_is_unavailable() {
    let (app, lose) = strait_tests::grpc::start_lost_mid_call().await;
    let (_dir, _cp, client, mut echo) = echo_behind(app, None).await;
    let mut replies = echo
        .server_stream(strait_api::testing::EchoRequest {
            message: "one".into(),
            repeat: 2,
            ..Default::default()
        })
        .await
        .expect("the call's head")
        .into_inner();
    let first = replies.message().await.expect("the first reply");
    assert_eq!(first.map(|r| r.message).as_deref(), Some("one"));
    lose.notify_waiters();
    let lost = tokio::time::timeout(Duration::from_secs(10), replies.message())
        .await
        .expect("the call ended")
        .expect_err("a status");
    assert_eq!(lost.code(), tonic::Code::Unavailable, "{lost:?}");
    assert!(lost.message().contains("mid-call"), "{lost:?}");
    // Counted as the caller saw it.
    let (_, text) = wait::admin_get(client.admin, "/metrics").await.unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("strait_proxy_grpc_responses_total")
                && l.contains("grpc_status=\"14\"")
                && l.ends_with(" 1")),
        "{text}"
    );
}

/// A call the server resets before answering reaches the caller with the
/// code its gRPC client would read from the reset (CANCEL: CANCELLED), and
/// is not retried as UNAVAILABLE: the server may have run it. A reset that
/// says the call was not processed (REFUSED_STREAM) is still UNAVAILABLE.
#[tokio::test]
async fn a_call_the_server_resets_keeps_the_reset_s_code_and_is_not_retried() {
    for (reason, want, calls_at_most) in [
        (h2::Reason::CANCEL, tonic::Code::Cancelled, 1),
        (h2::Reason::INTERNAL_ERROR, tonic::Code::Internal, 1),
        (h2::Reason::REFUSED_STREAM, tonic::Code::Unavailable, 3),
    ] {
        let (app, calls) = strait_tests::grpc::start_resetting(reason).await;
        let route = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: echo\n  namespace: {NS}\n  annotations: {{retry.strait.dev/grpc-codes: unavailable}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo}}]\n  rules:\n  - backendRefs: [{{name: echo, port: 80}}]\n"
        );
        let (_dir, _cp, client, mut echo) = echo_behind(app, Some(&route)).await;
        // Once the route (its retries) is known, one call.
        wait::until("the route in force", Duration::from_secs(10), || async {
            metric_sum(client.admin, "strait_proxy_route_requests_total").await > 0.0 || {
                let _ = echo
                    .clone()
                    .unary(strait_api::testing::EchoRequest::default())
                    .await;
                false
            }
        })
        .await;
        let before = calls.load(std::sync::atomic::Ordering::SeqCst);
        let status = echo
            .unary(strait_api::testing::EchoRequest::default())
            .await
            .expect_err("reset");
        let made = calls.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert_eq!(status.code(), want, "{reason:?}: {status:?}");
        assert!(
            (1..=calls_at_most).contains(&made),
            "{reason:?}: {made} calls reached the server"
        );
        if reason == h2::Reason::CANCEL {
            assert!(status.message().contains("reset the stream"), "{status:?}");
        }
    }
}

/// Unary calls to an echo server failing every other call UNAVAILABLE,
/// through a mesh with `route`: none fails. Returns what keeps the mesh up,
/// and the client.
async fn grpc_calls_retried_by(
    route: String,
) -> (
    (ControllerProc, Sidecar),
    strait_api::testing::echo_client::EchoClient<tonic::transport::Channel>,
) {
    let grpc: SocketAddr = strait_tests::grpc::start_flaky_echo().await;
    let (_dir, cp, client, mut echo) = echo_behind(grpc, Some(&route)).await;
    // Until the route is known, calls may fail; then every call succeeds.
    wait::until(
        "the retry route in force",
        Duration::from_secs(10),
        || async {
            let mut all = true;
            for _ in 0..4 {
                all &= echo
                    .clone()
                    .unary(strait_api::testing::EchoRequest {
                        message: "hi".into(),
                        ..Default::default()
                    })
                    .await
                    .is_ok();
            }
            all
        },
    )
    .await;
    let mut failed = 0;
    for i in 0..50 {
        let r = echo
            .unary(strait_api::testing::EchoRequest {
                message: format!("m{i}"),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => assert_eq!(r.into_inner().message, format!("m{i}")),
            Err(_) => failed += 1,
        }
    }
    let retries = metric_sum(client.admin, "strait_proxy_route_retries_total").await;
    println!(
        "flaky gRPC backend (every other call UNAVAILABLE): 50 calls, {failed} failed, {retries} retries"
    );
    assert_eq!(failed, 0);
    assert!(retries >= 25.0);
    ((cp, client), echo)
}

#[tokio::test]
async fn a_port_declared_opaque_by_app_protocol_skips_detection() {
    use tokio::io::AsyncReadExt;
    // A server-speaks-first protocol on a port strait does not know to be opaque:
    // only the Service's appProtocol says so.
    let server = strait_tests::tcp::banner(b"220 ready\r\n").await;
    let dir = ManifestDir::new();
    dir.write(
        "svc.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: smtp, namespace: {NS}}}\nspec:\n  ports: [{{name: http, port: 2525, appProtocol: smtp}}]\n"
        ),
    );
    dir.write("slice.yaml", &endpoint(NS, "smtp", "smtp-0", server));
    let cp = ControllerProc::start(dir.path()).await;
    let client = Sidecar::start(cp.grpc, NS, "client", &["smtp.test.svc.cluster.local:2525"]).await;
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let mut s = tokio::net::TcpStream::connect(client.upstreams[0])
            .await
            .unwrap();
        let mut banner = [0u8; 11];
        s.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"220 ready\r\n");
        fastest = fastest.min(t.elapsed());
    }
    println!("banner through the proxy after {fastest:?} (detection would wait 300 ms)");
    assert!(
        fastest < Duration::from_millis(150),
        "banner after {fastest:?}"
    );
}

/// A Service port among the callers' default opaque ports (Selenium's 4444)
/// whose `appProtocol` says HTTP is routed as HTTP: its route applies, where
/// the caller's own list would carry it as TCP past every rule. Without an
/// `appProtocol`, a caller whose own list leaves the port out
/// (`--opaque-ports=`) routes it too: the controller does not impose the
/// default list on it.
#[tokio::test]
async fn an_http_app_protocol_routes_a_port_callers_carry_as_tcp_by_default() {
    let grid = Backend::start().await;
    let dir = ManifestDir::new();
    for (name, app_protocol) in [("grid", ", appProtocol: http"), ("grid-plain", "")] {
        dir.write(
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  ports: [{{name: http, port: 4444{app_protocol}}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: {name}, port: 4444}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /wd}}}}]\n    backendRefs: [{{name: {name}, port: 4444}}]\n"
            ),
        );
        dir.write(
            &format!("{name}-slice.yaml"),
            &endpoint(NS, name, &format!("{name}-0"), grid.addr),
        );
    }
    let cp = ControllerProc::start(dir.path()).await;
    let own_list = strait_tests::mesh::SidecarOpts {
        args: vec!["--opaque-ports=".into()],
        ..Default::default()
    };
    let clients = [
        Sidecar::start(cp.grpc, NS, "client", &["grid.test.svc.cluster.local:4444"]).await,
        Sidecar::start_with(
            cp.grpc,
            NS,
            "client-2",
            &["grid-plain.test.svc.cluster.local:4444"],
            own_list,
        )
        .await,
    ];
    let http = client::http1();
    for c in &clients {
        let url = |path: &str| format!("http://{}{path}", c.upstreams[0]);
        wait::until(
            "the grid through the proxy",
            Duration::from_secs(10),
            || async {
                matches!(client::get(&http, &url("/wd/hub")).await, Ok((s, _)) if s == 200)
            },
        )
        .await;
        let reached = grid.requests();
        // Past the route's only rule: the proxy's 404, not the app's answer.
        let (status, _) = client::get(&http, &url("/other")).await.unwrap();
        assert_eq!(status, 404);
        assert_eq!(grid.requests(), reached, "carried past the route");
    }
}

/// An endpoint that refuses opaque streams is judged unreachable, as one that
/// fails requests is, and avoided: not taken for the fastest of all.
#[tokio::test]
async fn an_endpoint_refusing_opaque_streams_is_avoided() {
    use tokio::io::AsyncReadExt;
    let server = strait_tests::tcp::banner(b"220 ready\r\n").await;
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = ManifestDir::new();
    dir.write(
        "svc.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: smtp, namespace: {NS}}}\nspec:\n  ports: [{{name: http, port: 2525, appProtocol: smtp}}]\n"
        ),
    );
    dir.write("slice-0.yaml", &endpoint(NS, "smtp", "smtp-0", server));
    dir.write("slice-1.yaml", &endpoint(NS, "smtp", "smtp-1", dead));
    let cp = ControllerProc::start(dir.path()).await;
    let client = Sidecar::start(cp.grpc, NS, "client", &["smtp.test.svc.cluster.local:2525"]).await;
    let greeted = async || {
        let mut s = tokio::net::TcpStream::connect(client.upstreams[0])
            .await
            .unwrap();
        let mut banner = [0u8; 11];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner));
        matches!(read.await, Ok(Ok(_))) && &banner == b"220 ready\r\n"
    };
    let mut warm_up = 0;
    for _ in 0..30 {
        warm_up += usize::from(greeted().await);
    }
    let mut after = 0;
    for _ in 0..20 {
        after += usize::from(greeted().await);
    }
    println!("greeted {warm_up}/30 while learning, {after}/20 after");
    assert_eq!(after, 20, "the dead endpoint still chosen");
}

/// A BackendPolicy's `connectTimeout` holds for opaque streams as for HTTP:
/// to an endpoint whose connects hang, the stream is closed after the
/// policy's 200 ms, not the proxy's default second.
#[tokio::test]
async fn a_backend_connect_timeout_holds_for_opaque_streams() {
    use tokio::io::AsyncReadExt;
    let (hanging, _queued, _listener) = strait_tests::tcp::stalling().await;
    let dir = ManifestDir::new();
    dir.write(
        "svc.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  ports: [{{name: http, port: 5432, appProtocol: postgresql}}]\n"
        ),
    );
    dir.write("slice.yaml", &endpoint(NS, "web", "web-0", hanging));
    dir.write("policy.yaml", &backend_policy("  connectTimeout: 200ms\n"));
    let cp = ControllerProc::start(dir.path()).await;
    let client = Sidecar::start(cp.grpc, NS, "client", &["web.test.svc.cluster.local:5432"]).await;
    // The policy has reached the proxy once a stream ends within it; before,
    // streams end after the default second. The last five must all be quick.
    let mut quick = 0;
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(client.upstreams[0])
            .await
            .unwrap();
        let start = Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0u8; 1])).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
        let took = start.elapsed();
        // Not at once either: the endpoint was tried, for the policy's time.
        assert!(took >= Duration::from_millis(150), "closed after {took:?}");
        quick = if took < Duration::from_millis(700) {
            quick + 1
        } else {
            0
        };
        if quick == 5 {
            return;
        }
    }
    panic!("opaque streams to a hanging endpoint waited past the backend's connectTimeout");
}

/// The value of one series of the client proxy's outbound metrics (`name`
/// with `direction="outbound"` and `label="value"`), 0 when absent.
async fn outbound(admin: SocketAddr, name: &str, label: &str, value: &str) -> f64 {
    let series = format!("{name}{{direction=\"outbound\",{label}=\"{value}\"}}");
    let Ok((_, text)) = wait::admin_get(admin, "/metrics").await else {
        return 0.0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The client proxy's outbound connections detected as `protocol`.
async fn detected(admin: SocketAddr, protocol: &str) -> f64 {
    let name = "strait_proxy_protocol_detected_connections_total";
    outbound(admin, name, "protocol", protocol).await
}

/// Sends `n` requests over `conn`, an HTTP/1.1 connection opened earlier.
async fn requests_on(conn: tokio::net::TcpStream, host: &str, n: usize) -> Vec<http::StatusCode> {
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    for _ in 0..n {
        let r = http::Request::get("/")
            .header("host", host)
            .body(client::empty())
            .expect("request");
        let rsp = send.send_request(r).await.expect("a response");
        statuses.push(rsp.status());
    }
    statuses
}

#[tokio::test]
async fn a_client_silent_past_detection_is_still_routed_as_http() {
    // HTTP clients open pool connections ahead of their requests (hyper does
    // when a connection it was opening is no longer needed): silent past the
    // detection timeout, such a connection must still follow its route, not
    // be carried as opaque TCP to the Service's own endpoints.
    let (v0, v2) = (Backend::start().await, Backend::start().await);
    let mesh = Mesh::start(&[("route.yaml", split(0, 100))]).await;
    mesh.serve("web", "v0", &v0);
    mesh.serve("web-v2", "v2", &v2);
    mesh.until_ok("/").await;
    let admin = mesh.client.admin;
    let rejected = || metric_sum(admin, "strait_proxy_tcp_rejected_connections_total");
    let (c0, q0, q2) = (v0.connections(), v0.requests(), v2.requests());
    let (http1, opaque, rejected0) = (
        detected(admin, "http1").await,
        detected(admin, "opaque").await,
        rejected().await,
    );

    let silent = tokio::net::TcpStream::connect(mesh.client.upstreams[0])
        .await
        .expect("connect");
    // Past the detection timeout the proxy connects onward as for an opaque
    // stream, in case the server speaks first: `web`'s endpoint sees it.
    wait::until(
        "the connection onward for a silent client",
        Duration::from_secs(5),
        || async { v0.connections() > c0 },
    )
    .await;
    let statuses = requests_on(silent, "web.test.svc.cluster.local", 3).await;
    let (to_v2, to_v0) = (v2.requests() - q2, v0.requests() - q0);
    println!(
        "after a silent start, 3 requests {statuses:?}: v2 (weight 100) served {to_v2}, web's own endpoint {to_v0}"
    );
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(to_v2, 3, "the route's backend took them");
    assert_eq!(to_v0, 0, "nothing went to the Service's own endpoint");
    assert_eq!(
        detected(admin, "http1").await - http1,
        1.0,
        "counted as HTTP/1"
    );
    assert_eq!(
        detected(admin, "opaque").await,
        opaque,
        "not counted as opaque"
    );
    assert_eq!(rejected().await, rejected0, "nothing refused");
}

/// Services `web-v1`, without endpoints of its own, and `web-v2` at `v2`,
/// and a route sending all of `web-v1` to `web-v2`.
fn route_v1_to_v2(dir: &ManifestDir, v2: SocketAddr) {
    for svc in ["web-v1", "web-v2"] {
        dir.write(&format!("svc-{svc}.yaml"), &service(NS, svc, 80));
    }
    dir.write("slice-v2.yaml", &endpoint(NS, "web-v2", "v2", v2));
    dir.write(
        "route.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: v1, namespace: {NS}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web-v1, port: 80}}]\n  rules:\n  - backendRefs: [{{name: web-v2, port: 80}}]\n"
        ),
    );
}

#[tokio::test]
async fn a_silent_client_of_a_service_without_endpoints_is_still_routed() {
    // `web-v1` has no endpoints of its own, only a route to `web-v2`: a silent
    // client has nothing to connect onward to, and waits to be served as HTTP.
    let v2 = Backend::start().await;
    let dir = ManifestDir::new();
    dir.write("svc-plain.yaml", &service(NS, "plain", 80));
    route_v1_to_v2(&dir, v2.addr);
    let cp = ControllerProc::start(dir.path()).await;
    let client = Sidecar::start(
        cp.grpc,
        NS,
        "client",
        &[
            "web-v1.test.svc.cluster.local:80",
            "plain.test.svc.cluster.local:80",
        ],
    )
    .await;
    let url = format!("http://{}/", client.upstreams[0]);
    wait::until("the route serving", Duration::from_secs(10), || async {
        matches!(client::get(&client::http1(), &url).await, Ok((s, _)) if s == 200)
    })
    .await;
    let rejected = || metric_sum(client.admin, "strait_proxy_tcp_rejected_connections_total");
    let (q2, opaque, rejected0) = (
        v2.requests(),
        detected(client.admin, "opaque").await,
        rejected().await,
    );

    let silent = tokio::net::TcpStream::connect(client.upstreams[0])
        .await
        .expect("connect");
    // Silent past the detection timeout (300 ms): the case under test.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let statuses = requests_on(silent, "web-v1.test.svc.cluster.local", 2).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(v2.requests() - q2, 2, "the route's backend took them");
    assert_eq!(
        detected(client.admin, "opaque").await,
        opaque,
        "not counted as opaque"
    );
    assert_eq!(rejected().await, rejected0, "nothing refused");

    // `plain` has no endpoints and no routes: nothing says it is HTTP, so a
    // silent client is reset (and the refusal counted), as an opaque stream
    // that cannot connect is, rather than left waiting for a greeting.
    use tokio::io::AsyncReadExt;
    let no_endpoints = || {
        let name = "strait_proxy_tcp_rejected_connections_total";
        outbound(client.admin, name, "reason", "no_endpoints")
    };
    let (refused0, opaque0) = (no_endpoints().await, detected(client.admin, "opaque").await);
    let mut s = tokio::net::TcpStream::connect(client.upstreams[1])
        .await
        .expect("connect");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(&closed, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "reset: {closed:?}"
    );
    assert_eq!(rejected().await, rejected0 + 1.0, "one refusal counted");
    assert_eq!(
        no_endpoints().await,
        refused0 + 1.0,
        "for want of endpoints"
    );
    assert_eq!(
        detected(client.admin, "opaque").await,
        opaque0 + 1.0,
        "as opaque"
    );
}

#[tokio::test]
async fn a_silent_client_of_a_routed_service_with_nowhere_to_go_waits_an_http_idle_time() {
    // A silent client of a Service with routes is waited for when nothing can
    // be connected onward: it may be an HTTP client's pooled connection. But
    // no longer than an HTTP server keeps an idle connection (here 2 s), not
    // an opaque stream's hour: it may be waiting for a greeting.
    let dir = ManifestDir::new();
    let v2 = Backend::start().await;
    route_v1_to_v2(&dir, v2.addr);
    let cp = ControllerProc::start(dir.path()).await;
    let opts = strait_tests::mesh::SidecarOpts {
        args: vec!["--http-idle-timeout=2s".into()],
        ..Default::default()
    };
    let client = Sidecar::start_with(
        cp.grpc,
        NS,
        "client",
        &["web-v1.test.svc.cluster.local:80"],
        opts,
    )
    .await;
    let url = format!("http://{}/", client.upstreams[0]);
    wait::until("the route serving", Duration::from_secs(10), || async {
        matches!(client::get(&client::http1(), &url).await, Ok((s, _)) if s == 200)
    })
    .await;

    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(client.upstreams[0])
        .await
        .expect("connect");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "closed: {closed:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "waited for as long as an idle HTTP connection is kept: {waited:?}"
    );
}

/// A client pointed at the outbound port itself (HTTP naming its `Host`)
/// that opens its connection ahead of use, and speaks after detection gave
/// up, is still served.
#[tokio::test]
async fn a_connection_to_the_outbound_port_made_ahead_of_use_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start().await;
    let port = |_| format!("127.0.0.1:{}", free_port());
    let (outbound, inbound, admin) = (port(0), port(1), port(2));
    let mut proxy = strait_tests::process::Proc::spawn(
        "strait-proxy",
        &[
            format!("--outbound-addr={outbound}"),
            format!("--inbound-addr={inbound}"),
            format!("--admin-addr={admin}"),
        ],
        &[],
    );
    proxy
        .ready(admin.parse().unwrap(), Duration::from_secs(10))
        .await;
    let mut s = tokio::net::TcpStream::connect(&outbound).await.unwrap();
    // Silent past the detection timeout (300 ms): the case under test.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let req = format!(
        "GET / HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        backend.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut rsp = String::new();
    s.read_to_string(&mut rsp).await.unwrap();
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp:?}");
}

/// The proxy runs with glibc's per-thread cache off (it kept memory a busy
/// moment had freed), started again by itself with the setting; an
/// operator's own setting stands. With several threads, or run through the
/// dynamic loader (whose executable is not the proxy), it runs as started.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[tokio::test]
async fn the_proxy_runs_with_the_allocators_thread_cache_off() {
    // What the process was started with: glibc 2.36 leaves the first of the
    // tunables there (it applies them all).
    let environ = |pid: u32, name: &str| {
        let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        let prefix = format!("{name}=");
        raw.split(|b| *b == 0)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .find_map(|v| v.strip_prefix(prefix.as_str()))
            .map(str::to_string)
    };
    // The loader this test itself was loaded by, the proxy's too: the file
    // mapped at the address the kernel gives as the loader's (AT_BASE).
    let auxv = std::fs::read("/proc/self/auxv").expect("auxv");
    const AT_BASE: u64 = 7;
    let base = auxv
        .chunks_exact(16)
        .map(|e| {
            let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap());
            (word(&e[..8]), word(&e[8..]))
        })
        .find_map(|(k, v)| (k == AT_BASE && v != 0).then_some(v))
        .expect("AT_BASE: a dynamically linked test");
    let loader = std::fs::read_to_string("/proc/self/maps")
        .expect("maps")
        .lines()
        .find_map(|l| {
            let start = u64::from_str_radix(l.split('-').next()?, 16).ok()?;
            let path = l.split_whitespace().nth(5)?;
            (start == base).then(|| std::path::PathBuf::from(path))
        })
        .expect("the loader's mapping in /proc/self/maps");
    let proxy_bin = strait_tests::process::binary("strait-proxy");
    for (given, how, first, started_again) in [
        (None, "", Some("glibc.malloc.tcache_count=0"), true),
        (
            Some("glibc.malloc.trim_threshold=131072"),
            "",
            Some("glibc.malloc.tcache_count=0"),
            true,
        ),
        (
            Some("glibc.malloc.tcache_count=2"),
            "",
            Some("glibc.malloc.tcache_count=2"),
            false,
        ),
        (None, "--threads=2", None, false),
        (None, "loader", None, false),
    ] {
        let port = |_| format!("127.0.0.1:{}", free_port());
        let (outbound, inbound, admin) = (port(0), port(1), port(2));
        let envs: Vec<(&str, &str)> = given.map(|g| ("GLIBC_TUNABLES", g)).into_iter().collect();
        let mut args = vec![
            format!("--outbound-addr={outbound}"),
            format!("--inbound-addr={inbound}"),
            format!("--admin-addr={admin}"),
        ];
        let program = match how {
            "loader" => {
                args.insert(0, proxy_bin.display().to_string());
                loader.clone()
            }
            "" => proxy_bin.clone(),
            flag => {
                args.push(flag.to_string());
                proxy_bin.clone()
            }
        };
        // The test's own allocator settings, if any, are not the proxy's.
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&args)
            .env_remove("GLIBC_TUNABLES")
            .env_remove("STRAIT_PROXY_ALLOCATOR_SET")
            .envs(envs.iter().copied());
        let mut proxy = strait_tests::process::Proc::spawn_command(cmd);
        proxy
            .ready(admin.parse().unwrap(), Duration::from_secs(10))
            .await;
        let pid = proxy.pid();
        let tunables = environ(pid, "GLIBC_TUNABLES");
        assert_eq!(
            tunables
                .as_deref()
                .map(|t| t.split(':').next().unwrap_or(t)),
            first,
            "given {given:?} {how}"
        );
        assert_eq!(
            environ(pid, "STRAIT_PROXY_ALLOCATOR_SET").is_some(),
            started_again,
            "given {given:?} {how}"
        );
    }
}

#[tokio::test]
async fn a_silent_client_still_gets_a_greeting_or_an_opaque_stream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Undeclared ports, so both go through detection and its timeout.
    let greeter = strait_tests::tcp::banner(b"220 ready\r\n").await;
    let echo = strait_tests::tcp::echo().await;
    // A server that closes every connection at once, without a word.
    let closer = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let closer_addr = closer.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = closer.accept().await {
            drop(s);
        }
    });
    let dir = ManifestDir::new();
    dir.write("svc-smtp.yaml", &service(NS, "smtp", 2525));
    dir.write("svc-echo.yaml", &service(NS, "echo", 7000));
    dir.write("svc-closer.yaml", &service(NS, "closer", 7001));
    dir.write("slice-smtp.yaml", &endpoint(NS, "smtp", "smtp-0", greeter));
    dir.write("slice-echo.yaml", &endpoint(NS, "echo", "echo-0", echo));
    dir.write(
        "slice-closer.yaml",
        &endpoint(NS, "closer", "closer-0", closer_addr),
    );
    let cp = ControllerProc::start(dir.path()).await;
    let client = Sidecar::start(
        cp.grpc,
        NS,
        "client",
        &[
            "smtp.test.svc.cluster.local:2525",
            "echo.test.svc.cluster.local:7000",
            "closer.test.svc.cluster.local:7001",
        ],
    )
    .await;

    // The server speaks first: its greeting comes once detection gives up.
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(client.upstreams[0])
        .await
        .expect("connect");
    let mut greeting = [0u8; 11];
    s.read_exact(&mut greeting).await.expect("the greeting");
    assert_eq!(&greeting, b"220 ready\r\n");
    println!("greeting through the proxy after {:?}", t.elapsed());
    s.write_all(b"EHLO mesh\r\n").await.expect("write");
    let mut back = [0u8; 11];
    s.read_exact(&mut back).await.expect("the echo");
    assert_eq!(&back, b"EHLO mesh\r\n");

    // The client only reads, and half-closes at once: the greeting still comes.
    let mut s = tokio::net::TcpStream::connect(client.upstreams[0])
        .await
        .expect("connect");
    s.shutdown().await.expect("half-close");
    let mut greeting = Vec::new();
    s.read_to_end(&mut greeting)
        .await
        .expect("the greeting, then EOF");
    assert_eq!(greeting, b"220 ready\r\n");

    // The client speaks first, but late, and not HTTP: carried as it is.
    let mut s = tokio::net::TcpStream::connect(client.upstreams[1])
        .await
        .expect("connect");
    // Silent past the detection timeout (300 ms): the case under test.
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(b"PING 1\r\n").await.expect("write");
    let mut back = [0u8; 8];
    s.read_exact(&mut back).await.expect("the echo");
    assert_eq!(&back, b"PING 1\r\n");
    s.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.expect("EOF after the echo");
    assert!(rest.is_empty());

    // The server closes first, without a word: so does the client's connection,
    // rather than waiting on for bytes that will never come.
    let mut s = tokio::net::TcpStream::connect(client.upstreams[2])
        .await
        .expect("connect");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "closed as the server closed: {closed:?}"
    );
}

#[tokio::test]
async fn a_clients_bad_chunking_never_counts_against_an_endpoint() {
    let eps = [Backend::start().await, Backend::start().await];
    let mesh = Mesh::start(&[(
        "policy.yaml",
        backend_policy(
            "  outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 30s, maxEjectionTime: 60s, maxEjectionPercent: 50}\n",
        ),
    )])
    .await;
    for (i, b) in eps.iter().enumerate() {
        mesh.serve("web", &format!("web-{i}"), b);
    }
    wait::until("both serving", Duration::from_secs(10), || async {
        send(&mesh.url("/"), 16, http::StatusCode::OK).await;
        eps.iter().all(|b| b.requests() > 0)
    })
    .await;
    // A client that breaks its own chunked framing, again and again: each is
    // its 400, and no endpoint is ejected for it.
    for _ in 0..10 {
        let mut s = tokio::net::TcpStream::connect(mesh.client.upstreams[0])
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(
            b"POST /count HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab",
        )
        .await
        .unwrap();
        s.write_all(b"zz\r\n-1\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let rsp = String::from_utf8_lossy(&out);
        assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    }
    assert_eq!(
        mesh.metric("strait_proxy_backend_ejections_total").await,
        0.0
    );
    let before: Vec<usize> = eps.iter().map(|b| b.requests()).collect();
    assert_eq!(send(&mesh.url("/"), 64, http::StatusCode::OK).await, 64);
    for (i, b) in eps.iter().enumerate() {
        assert!(b.requests() > before[i], "endpoint {i} still serves");
    }
}

/// A port already taken stops the proxy with the flag that names it, and the
/// system's reason said once.
#[tokio::test]
async fn a_port_taken_names_its_flag() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap();
    let out = tokio::process::Command::new(strait_tests::process::binary("strait-proxy"))
        .arg("--outbound-addr=127.0.0.1:0")
        .arg("--inbound-addr=127.0.0.1:0")
        .arg(format!("--admin-addr={taken}"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {taken} (--admin-addr)")),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
}
