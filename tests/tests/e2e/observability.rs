//! Traces, access logs and metrics of the real binaries: spans received by an
//! in-process OTLP collector, joined across two proxies and the apps around them.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use strait_tests::backend::Backend;
use strait_tests::manifests::{ManifestDir, endpoint, meshed_pod, service};
use strait_tests::mesh::{ControllerProc, Sidecar, SidecarOpts, metric_sum, metric_where};
use strait_tests::otlp::{Mode, OtlpCollector, Received};
use strait_tests::{client, wait};

const NS: &str = "test";
const WEB: &str = "web.test.svc.cluster.local:80";
/// The app's own span: the proxies' spans must join its trace.
const APP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN: &str = "00f067aa0ba902b7";

/// A client sidecar calling `web`, served by a backend behind its own sidecar;
/// both proxies export to `collector` with `extra` flags.
struct Mesh {
    _dir: ManifestDir,
    _cp: ControllerProc,
    backend: Backend,
    client: Sidecar,
    server: Sidecar,
}

impl Mesh {
    async fn start(collector: &str, extra: &[&str]) -> Mesh {
        let dir = ManifestDir::new();
        dir.write("svc.yaml", &service(NS, "web", 80));
        let cp = ControllerProc::start(dir.path()).await;
        let backend = Backend::start().await;
        let args: Vec<String> = [format!("--otlp-endpoint={collector}")]
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect();
        let opts = |sa: &str| SidecarOpts {
            args: args
                .iter()
                .cloned()
                .chain([format!("--service-account={sa}")])
                .collect(),
            ..Default::default()
        };
        let server = Sidecar::start_with(cp.grpc, NS, "web-0", &[], opts("web")).await;
        dir.write(
            "pod.yaml",
            &meshed_pod(NS, "web-0", "web", server.inbound.port()),
        );
        dir.write("slice.yaml", &endpoint(NS, "web", "web-0", backend.addr));
        let client = Sidecar::start_with(cp.grpc, NS, "client-0", &[WEB], opts("client")).await;
        let m = Mesh {
            _dir: dir,
            _cp: cp,
            backend,
            client,
            server,
        };
        // Until discovery has the peer proxy: the first requests may pass through.
        let url = m.url("/");
        wait::until("meshed traffic", Duration::from_secs(10), || async {
            let c = client::http1();
            let req = http::Request::get(&url).body(client::empty()).unwrap();
            match c.request(req).await {
                Ok(r) => r.status() == 200 && m.server_requests().await > 0.0,
                Err(_) => false,
            }
        })
        .await;
        m
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.client.upstreams[0])
    }

    async fn server_requests(&self) -> f64 {
        metric_sum(self.server.admin, "strait_proxy_http_requests_total").await
    }

    /// GET `path` with `headers`; returns the body.
    async fn get(&self, path: &str, headers: &[(&str, String)]) -> String {
        let mut b = http::Request::get(self.url(path));
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        let rsp = client::http1()
            .request(b.body(client::empty()).unwrap())
            .await
            .expect("request through the mesh");
        assert_eq!(rsp.status(), 200);
        use http_body_util::BodyExt;
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }
}

/// The value after `key=` on its own line.
fn field<'a>(body: &'a str, key: &str) -> &'a str {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or("")
}

fn of_trace<'a>(spans: &'a [Received], trace: &str, kind: i32) -> Vec<&'a Received> {
    spans
        .iter()
        .filter(|s| s.trace_id() == trace && s.span.kind == kind)
        .collect()
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// A request retried to a 200 names the attempt that failed on its span's
/// retry event: the span's own endpoint and status are the last attempt's.
#[tokio::test]
async fn a_retry_event_names_the_failed_attempt() {
    let collector = OtlpCollector::start(Mode::Accept).await;
    let m = Mesh::start(&collector.endpoint(), &[]).await;
    m._dir.write(
        "route.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n  - backendRefs: [{{name: web, port: 80}}]\n    retry: {{codes: [503], attempts: 3, backoff: 1ms}}\n"
        ),
    );
    // Every other request fails at the backend: once the route is in force,
    // none fails through the mesh.
    let url = m.url("/flaky/50");
    wait::until("the retrying route", Duration::from_secs(10), || async {
        let c = client::http1();
        let mut ok = 0;
        for _ in 0..4 {
            let req = http::Request::get(&url).body(client::empty()).unwrap();
            if c.request(req).await.is_ok_and(|r| r.status() == 200) {
                ok += 1;
            }
        }
        ok == 4
    })
    .await;
    let spans = collector
        .wait_until(Duration::from_secs(10), |spans| {
            spans.iter().any(|s| {
                s.span.kind == CLIENT && s.attr("strait.retry.count").as_deref() == Some("1")
            })
        })
        .await;
    let retried = spans
        .iter()
        .find(|s| s.span.kind == CLIENT && s.attr("strait.retry.count").as_deref() == Some("1"))
        .expect("a retried request's span");
    assert_eq!(
        retried.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    let event = &retried.span.events[0];
    assert_eq!(event.name, "retry");
    let attr = |key: &str| {
        event
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone()?.value)
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    assert_eq!(
        attr("strait.retry.failed_status"),
        Some(Value::IntValue(503))
    );
    assert_eq!(
        attr("strait.retry.failed_endpoint"),
        Some(Value::StringValue(m.backend.addr.to_string())),
        "the endpoint as the span names it: {event:?}"
    );
}

#[tokio::test]
async fn a_request_through_two_proxies_joins_the_apps_trace() {
    let collector = OtlpCollector::start(Mode::Accept).await;
    let m = Mesh::start(&collector.endpoint(), &[]).await;
    let seen = m
        .get(
            "/trace-context?token=secret",
            &[("traceparent", format!("00-{APP_TRACE}-{APP_SPAN}-01"))],
        )
        .await;
    let spans = collector.trace(APP_TRACE, 2).await;
    let client_spans = of_trace(&spans, APP_TRACE, CLIENT);
    let server_spans = of_trace(&spans, APP_TRACE, SERVER);
    assert_eq!(
        (client_spans.len(), server_spans.len()),
        (1, 1),
        "{spans:#?}"
    );
    let (c, s) = (client_spans[0], server_spans[0]);
    assert_eq!(
        c.parent_id(),
        APP_SPAN,
        "the client span is the app's child"
    );
    assert_eq!(
        s.parent_id(),
        c.span_id(),
        "the server span is the client span's child"
    );
    // The upstream app is handed the server span as its parent.
    let tp = field(&seen, "traceparent");
    assert_eq!(tp, format!("00-{APP_TRACE}-{}-01", s.span_id()), "{seen}");
    // Names and attributes.
    assert_eq!((c.span.name.as_str(), s.span.name.as_str()), ("GET", "GET"));
    assert_eq!((c.service.as_str(), s.service.as_str()), ("client", "web"));
    for (span, key, want) in [
        (c, "http.request.method", "GET"),
        (c, "http.response.status_code", "200"),
        (c, "server.address", "web.test.svc.cluster.local"),
        (c, "server.port", "80"),
        (c, "strait.service", WEB),
        (c, "strait.route", "default"),
        (c, "strait.backend", WEB),
        (c, "strait.retry.count", "0"),
        // The URL the app asked for, its query left out.
        (
            c,
            "url.full",
            "http://web.test.svc.cluster.local:80/trace-context",
        ),
        (s, "http.response.status_code", "200"),
        (s, "url.path", "/trace-context"),
        (s, "url.scheme", "http"),
    ] {
        assert_eq!(span.attr(key).as_deref(), Some(want), "{key} of {span:#?}");
    }
    assert_eq!(
        c.attr("strait.endpoint"),
        Some(m.backend.addr.to_string()),
        "the endpoint chosen"
    );
}

/// The HTTP conventions name a span for its method only when they know the
/// method; any other is `_OTHER`, in a span named `HTTP`, with the method as sent.
#[tokio::test]
async fn a_method_the_conventions_do_not_know_is_reported_as_sent() {
    let collector = OtlpCollector::start(Mode::Accept).await;
    let m = Mesh::start(&collector.endpoint(), &[]).await;
    let trace = "6bf92f3577b34da6a3ce929d0e0e4738";
    let req = http::Request::builder()
        .method(http::Method::from_bytes(b"PROPFIND").unwrap())
        .uri(m.url("/dav"))
        .header("traceparent", format!("00-{trace}-{APP_SPAN}-01"))
        .body(client::empty())
        .unwrap();
    let rsp = client::http1()
        .request(req)
        .await
        .expect("through the mesh");
    assert_eq!(rsp.status(), 200);
    let spans = collector.trace(trace, 2).await;
    for kind in [CLIENT, SERVER] {
        let span = of_trace(&spans, trace, kind)[0];
        assert_eq!(span.span.name, "HTTP", "{span:#?}");
        assert_eq!(span.attr("http.request.method").as_deref(), Some("_OTHER"));
        assert_eq!(
            span.attr("http.request.method_original").as_deref(),
            Some("PROPFIND")
        );
    }
}

#[tokio::test]
async fn a_request_the_client_abandons_still_ends_both_spans() {
    let collector = OtlpCollector::start(Mode::Accept).await;
    let m = Mesh::start(&collector.endpoint(), &[]).await;
    let trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let req = http::Request::get(m.url("/slow/10000"))
        .header("traceparent", format!("00-{trace}-{APP_SPAN}-01"))
        .body(client::empty())
        .unwrap();
    let c = client::http1();
    let gave_up = tokio::time::timeout(Duration::from_millis(300), c.request(req)).await;
    assert!(gave_up.is_err(), "the slow answer came early");
    drop(c);
    let spans = collector.trace(trace, 2).await;
    let (client_spans, server_spans) = (
        of_trace(&spans, trace, CLIENT),
        of_trace(&spans, trace, SERVER),
    );
    assert_eq!(
        (client_spans.len(), server_spans.len()),
        (1, 1),
        "{spans:#?}"
    );
    for span in [client_spans[0], server_spans[0]] {
        assert_eq!(
            span.attr("strait.cancelled").as_deref(),
            Some("true"),
            "{span:#?}"
        );
        assert_eq!(span.attr("http.response.status_code"), None, "{span:#?}");
        assert_eq!(span.attr("url.path").as_deref(), Some("/slow/10000"));
    }
}

#[tokio::test]
async fn spans_queued_at_exit_are_sent_before_the_proxies_stop() {
    let collector = OtlpCollector::start(Mode::Accept).await;
    let mut m = Mesh::start(&collector.endpoint(), &[]).await;
    m.get(
        "/",
        &[("traceparent", format!("00-{APP_TRACE}-{APP_SPAN}-01"))],
    )
    .await;
    // Stopped at once: the request's two spans would otherwise wait for the
    // export thread's next look (up to 200 ms), which a proxy that exits
    // sooner never makes.
    for p in [&m.client, &m.server] {
        p.proc.sigterm().await;
    }
    for p in [&mut m.client, &mut m.server] {
        tokio::time::timeout(Duration::from_secs(10), p.proc.child.wait())
            .await
            .expect("the proxy stops")
            .expect("wait for the proxy");
    }
    let spans = collector.spans();
    assert_eq!(of_trace(&spans, APP_TRACE, CLIENT).len(), 1, "{spans:#?}");
    assert_eq!(of_trace(&spans, APP_TRACE, SERVER).len(), 1, "{spans:#?}");
}

#[tokio::test]
async fn b3_is_continued_and_answered_in_kind() {
    let collector = OtlpCollector::start(Mode::Accept).await;
    let m = Mesh::start(&collector.endpoint(), &[]).await;
    let trace64 = "a3ce929d0e0e4736";
    let seen = m
        .get(
            "/trace-context",
            &[
                ("x-b3-traceid", trace64.to_string()),
                ("x-b3-spanid", APP_SPAN.to_string()),
                ("x-b3-sampled", "1".to_string()),
            ],
        )
        .await;
    let trace = format!("0000000000000000{trace64}");
    let spans = collector.trace(&trace, 2).await;
    let c = of_trace(&spans, &trace, CLIENT);
    let s = of_trace(&spans, &trace, SERVER);
    assert_eq!((c.len(), s.len()), (1, 1), "{spans:#?}");
    assert_eq!(c[0].parent_id(), APP_SPAN);
    // A B3 app downstream stays in the trace: the headers it reads point at
    // the server span.
    assert_eq!(field(&seen, "x-b3-spanid"), s[0].span_id(), "{seen}");
    assert!(field(&seen, "x-b3-traceid").ends_with(trace64), "{seen}");
    assert!(field(&seen, "traceparent").contains(&trace), "{seen}");
}

/// An app's B3 decision is kept whatever the proxies' ratio: `b3: 0` passes
/// untouched and records nothing (it used to start a sampled trace, and the
/// next hop rewrote the header to `1`), `b3: d` starts a recorded one.
#[tokio::test]
async fn b3_decisions_without_ids_are_kept() {
    let collector = OtlpCollector::start(Mode::Accept).await;
    let m = Mesh::start(&collector.endpoint(), &["--trace-sampling=1"]).await;
    let seen = m.get("/trace-context", &[("b3", "0".to_string())]).await;
    assert_eq!(field(&seen, "traceparent"), "", "{seen}");
    // No proxy started a trace: each would have handed the next hop its span.
    assert_eq!(field(&seen, "b3"), "0", "{seen}");
    drop(m);

    // Debug without ids, with sampling off: recorded, and still debug for the app.
    let collector = OtlpCollector::start(Mode::Accept).await;
    let m = Mesh::start(&collector.endpoint(), &["--trace-sampling=0"]).await;
    let seen = m.get("/trace-context", &[("b3", "d".to_string())]).await;
    let b3 = field(&seen, "b3");
    assert!(b3.ends_with("-d"), "{seen}");
    let trace = b3.split('-').next().unwrap().to_string();
    let spans = collector.trace(&trace, 2).await;
    assert_eq!(
        (
            of_trace(&spans, &trace, CLIENT).len(),
            of_trace(&spans, &trace, SERVER).len()
        ),
        (1, 1),
        "{spans:#?}"
    );
}

#[tokio::test]
async fn sampling_zero_exports_nothing_new_and_one_exports_every_request() {
    let none = OtlpCollector::start(Mode::Accept).await;
    let m = Mesh::start(&none.endpoint(), &["--trace-sampling=0"]).await;
    for _ in 0..20 {
        let seen = m.get("/trace-context", &[]).await;
        assert_eq!(field(&seen, "traceparent"), "", "no trace started: {seen}");
    }
    // A caller's sampled trace is still followed.
    m.get(
        "/",
        &[("traceparent", format!("00-{APP_TRACE}-{APP_SPAN}-01"))],
    )
    .await;
    assert_eq!(none.trace(APP_TRACE, 2).await.len(), 2);
    assert!(
        none.spans().iter().all(|s| s.trace_id() == APP_TRACE),
        "only the caller's trace: {:#?}",
        none.spans()
    );
    drop(m);

    let all = OtlpCollector::start(Mode::Accept).await;
    let m = Mesh::start(&all.endpoint(), &["--trace-sampling=1"]).await;
    let mut traces = std::collections::HashSet::new();
    for _ in 0..20 {
        let seen = m.get("/trace-context", &[]).await;
        let tp = field(&seen, "traceparent");
        let trace = tp.split('-').nth(1).expect("a trace started").to_string();
        traces.insert(trace);
    }
    assert_eq!(traces.len(), 20, "one trace per request");
    for t in &traces {
        let spans = all.trace(t, 2).await;
        assert_eq!(
            (
                of_trace(&spans, t, CLIENT).len(),
                of_trace(&spans, t, SERVER).len()
            ),
            (1, 1),
            "a client and a server span for {t}"
        );
    }
}

#[tokio::test]
async fn a_collector_down_or_stalling_costs_spans_not_requests() {
    // Nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr: SocketAddr = dead.local_addr().unwrap();
    drop(dead);
    let stalling = OtlpCollector::start(Mode::Stall).await;
    for endpoint in [format!("http://{dead_addr}"), stalling.endpoint()] {
        let m = Mesh::start(&endpoint, &[]).await;
        let url = m.url("/");
        let c = client::http1();
        let n = 3000;
        let started = std::time::Instant::now();
        for _ in 0..n / 10 {
            let batch = (0..10).map(|_| client::get(&c, &url));
            for r in futures_util::future::join_all(batch).await {
                assert_eq!(r.expect("request").0, 200);
            }
        }
        let took = started.elapsed();
        wait::until(
            "spans counted as dropped",
            Duration::from_secs(20),
            || async {
                metric_sum(m.client.admin, "strait_proxy_trace_spans_dropped_total").await > 0.0
            },
        )
        .await;
        let dropped = metric_sum(m.client.admin, "strait_proxy_trace_spans_dropped_total").await;
        let (_, rss) = m.client.proc.memory_kib();
        println!(
            "collector {endpoint}: {n} requests in {took:?}, {dropped} spans dropped, client proxy RSS {rss} KiB"
        );
        assert!(wait::admin_get(m.client.admin, "/ready").await.unwrap().0 == 200);
        // The queue holds at most a few thousand spans.
        assert!(rss < 64 * 1024, "client proxy at {rss} KiB");
    }
}

/// A collector that takes an export but says it rejected some of its spans
/// (an OTLP partial success) has not got those: each counts as dropped, once.
#[tokio::test]
async fn spans_a_collector_rejects_count_as_dropped() {
    let rejecting = OtlpCollector::start(Mode::Reject).await;
    let m = Mesh::start(&rejecting.endpoint(), &[]).await;
    let c = client::http1();
    let url = m.url("/");
    for _ in 0..20 {
        assert_eq!(client::get(&c, &url).await.expect("request").0, 200);
    }
    let admins = [m.client.admin, m.server.admin];
    let sum = async |name: &str| {
        let mut total = 0.0;
        for a in admins {
            total += metric_sum(a, name).await;
        }
        total
    };
    // Every request either proxy served made a span, and each reached the
    // collector.
    let spans = sum("strait_proxy_http_requests_total").await as u64;
    assert!(spans >= 40, "{spans}");
    let counts = &rejecting.counts;
    wait::until("every span exported", Duration::from_secs(10), || async {
        counts.received.load(Ordering::Relaxed) >= spans
    })
    .await;
    assert!(counts.rejected.load(Ordering::Relaxed) > 0);
    // One dropped span per span rejected (read together: an export still on
    // its way moves both).
    wait::until(
        "rejected spans counted as dropped",
        Duration::from_secs(10),
        || async {
            let rejected = counts.rejected.load(Ordering::Relaxed) as f64;
            sum("strait_proxy_trace_spans_dropped_total").await == rejected
                && counts.rejected.load(Ordering::Relaxed) as f64 == rejected
        },
    )
    .await;
}

/// An export the collector could not take just then (UNAVAILABLE, as while it
/// restarts) is sent again: no span is lost.
#[tokio::test]
async fn an_export_the_collector_refuses_once_is_sent_again() {
    let collector = OtlpCollector::start(Mode::RefuseFirst).await;
    let m = Mesh::start(&collector.endpoint(), &[]).await;
    let seen = m.get("/trace-context", &[]).await;
    let trace = field(&seen, "traceparent")
        .split('-')
        .nth(1)
        .expect("a trace started")
        .to_string();
    assert_eq!(collector.trace(&trace, 2).await.len(), 2);
    let mut spans = 0.0;
    for a in [m.client.admin, m.server.admin] {
        spans += metric_sum(a, "strait_proxy_http_requests_total").await;
    }
    let received = collector
        .wait_until(Duration::from_secs(10), |s| s.len() as f64 >= spans)
        .await;
    assert_eq!(received.len() as f64, spans, "every request's span");
    assert_eq!(collector.counts.refused.load(Ordering::Relaxed), 1);
    for a in [m.client.admin, m.server.admin] {
        assert_eq!(
            metric_sum(a, "strait_proxy_trace_spans_dropped_total").await,
            0.0
        );
    }
}

#[tokio::test]
async fn metrics_count_by_route_backend_status_and_peer_identity() {
    use strait_tests::mesh::SidecarIdentity;
    use strait_tests::pki::{Pki, token_file, token_secret};
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
    let collector = OtlpCollector::start(Mode::Accept).await;
    let grpc: SocketAddr = format!("127.0.0.1:{}", strait_tests::process::free_port())
        .parse()
        .unwrap();
    let _cp = ControllerProc::start_with(dir.path(), grpc, Some(&pki), None).await;
    let opts = |sa: &str| SidecarOpts {
        identity: Some(SidecarIdentity {
            anchors: pki.anchors(),
            token_file: tokens.path().join(format!("{sa}.token")),
            service_account: sa.to_string(),
        }),
        args: vec![format!("--otlp-endpoint={}", collector.endpoint())],
        ..Default::default()
    };
    let backend = Backend::start().await;
    let server = Sidecar::start_with(grpc, NS, "web-0", &[], opts("web")).await;
    dir.write(
        "pod.yaml",
        &meshed_pod(NS, "web-0", "web", server.inbound.port()),
    );
    dir.write("slice.yaml", &endpoint(NS, "web", "web-0", backend.addr));
    let client = Sidecar::start_with(grpc, NS, "client-0", &[WEB], opts("client")).await;
    let url = |p: &str| format!("http://{}{p}", client.upstreams[0]);
    let peer = "peer=\"spiffe://cluster.local/ns/test/sa/client\"";
    wait::until(
        "meshed traffic over mTLS",
        Duration::from_secs(10),
        || async {
            let _ = client::get(&client::http1(), &url("/")).await;
            metric_where(
                server.admin,
                "strait_proxy_inbound_peer_requests_total",
                &[peer],
            )
            .await
                > 0.0
        },
    )
    .await;
    let route = [
        "service=\"web.test.svc.cluster.local:80\"",
        "route=\"default\"",
    ];
    let snapshot = || async {
        (
            metric_where(
                client.admin,
                "strait_proxy_route_responses_total",
                &[route[0], route[1], "status_class=\"2xx\""],
            )
            .await,
            metric_where(
                client.admin,
                "strait_proxy_backend_responses_total",
                &[
                    route[0],
                    "backend=\"web.test.svc.cluster.local:80\"",
                    "status_class=\"5xx\"",
                ],
            )
            .await,
            metric_where(
                server.admin,
                "strait_proxy_inbound_peer_responses_total",
                &[peer, "status_class=\"2xx\""],
            )
            .await,
            metric_where(
                server.admin,
                "strait_proxy_inbound_peer_responses_total",
                &[peer, "status_class=\"5xx\""],
            )
            .await,
        )
    };
    let before = snapshot().await;
    let c = client::http1();
    for _ in 0..10 {
        assert_eq!(client::get(&c, &url("/")).await.unwrap().0, 200);
    }
    for _ in 0..5 {
        assert_eq!(client::get(&c, &url("/status/503")).await.unwrap().0, 503);
    }
    let after = snapshot().await;
    assert_eq!(
        (
            after.0 - before.0,
            after.1 - before.1,
            after.2 - before.2,
            after.3 - before.3
        ),
        (10.0, 5.0, 10.0, 5.0),
        "route 2xx, backend 5xx (client proxy); by caller identity 2xx, 5xx (server proxy)"
    );
    let latency = metric_where(
        client.admin,
        "strait_proxy_backend_response_latency_seconds_count",
        &[route[0]],
    )
    .await;
    assert!(latency >= 15.0, "{latency}");

    // Each proxy's span names the other side's verified identity.
    let traced = client::http1()
        .request(
            http::Request::get(url("/"))
                .header("traceparent", format!("00-{APP_TRACE}-{APP_SPAN}-01"))
                .body(client::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(traced.status(), 200);
    let spans = collector.trace(APP_TRACE, 2).await;
    let (c, s) = (
        of_trace(&spans, APP_TRACE, CLIENT),
        of_trace(&spans, APP_TRACE, SERVER),
    );
    assert_eq!((c.len(), s.len()), (1, 1), "{spans:#?}");
    assert_eq!(
        c[0].attr("strait.peer.identity").as_deref(),
        Some("spiffe://cluster.local/ns/test/sa/web")
    );
    assert_eq!(
        s[0].attr("strait.peer.identity").as_deref(),
        Some("spiffe://cluster.local/ns/test/sa/client")
    );
}

#[tokio::test]
async fn the_controller_exports_reloads_pushes_and_certificates() {
    use strait_tests::mesh::SidecarIdentity;
    use strait_tests::pki::{Pki, token_file, token_secret};
    let collector = OtlpCollector::start(Mode::Accept).await;
    let dir = ManifestDir::new();
    let tokens = ManifestDir::new();
    dir.write("token.yaml", &token_secret(NS, "client", "token-of-client"));
    token_file(tokens.path(), "client", "token-of-client");
    dir.write("svc.yaml", &service(NS, "web", 80));
    let pki = Pki::new();
    let grpc: SocketAddr = format!("127.0.0.1:{}", strait_tests::process::free_port())
        .parse()
        .unwrap();
    let mut cp = ControllerProc::spawn_with(
        dir.path(),
        grpc,
        Some(&pki),
        None,
        &[format!("--otlp-endpoint={}", collector.endpoint())],
    );
    cp.ready(Duration::from_secs(20)).await;
    let opts = SidecarOpts {
        identity: Some(SidecarIdentity {
            anchors: pki.anchors(),
            token_file: tokens.path().join("client.token"),
            service_account: "client".into(),
        }),
        ..Default::default()
    };
    let client = Sidecar::start_with(grpc, NS, "client-0", &[WEB], opts).await;
    // A watch of `web`, then a change to it: a push.
    let _ = client::get(
        &client::http1(),
        &format!("http://{}/", client.upstreams[0]),
    )
    .await;
    dir.write(
        "slice.yaml",
        &endpoint(NS, "web", "web-0", "127.0.0.1:9".parse().unwrap()),
    );
    let names = ["manifests.reload", "discovery.push", "identity.certify"];
    let spans = collector
        .wait_until(Duration::from_secs(15), |s| {
            names.iter().all(|n| {
                s.iter()
                    .any(|r| r.span.name == *n && r.service == "strait-controller")
            })
        })
        .await;
    for n in names {
        assert!(
            spans.iter().any(|r| r.span.name == n),
            "no {n} span among {:?}",
            spans
                .iter()
                .map(|r| r.span.name.clone())
                .collect::<Vec<_>>()
        );
    }
    let push = spans.iter().rev().find(|r| {
        r.span.name == "discovery.push" && r.attr("strait.views.pushed").as_deref() == Some("1")
    });
    assert!(push.is_some(), "a push that updated web's view");
    let certify = spans
        .iter()
        .find(|r| r.span.name == "identity.certify")
        .unwrap();
    assert_eq!(
        certify.attr("strait.identity.asked").as_deref(),
        Some("spiffe://cluster.local/ns/test/sa/client")
    );
    // What was issued, for an audit the sampled log lines cannot give.
    assert_eq!(
        certify.attr("strait.identity").as_deref(),
        Some("spiffe://cluster.local/ns/test/sa/client")
    );
    let serial = certify
        .attr("strait.certificate.serial")
        .unwrap_or_default();
    assert!(
        serial.len() >= 16 && serial.bytes().all(|b| b.is_ascii_hexdigit() || b == b':'),
        "serial {serial:?}"
    );
}

#[test]
fn every_metric_the_dashboard_plots_exists_and_is_documented() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/strait-mesh.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let docs = std::fs::read_to_string(root.join("docs/observability.md")).unwrap();
    let proxy = std::fs::read_to_string(root.join("proxy/src/telemetry/metrics.rs")).unwrap();
    let controller = std::fs::read_to_string(root.join("control-plane/src/metrics.rs")).unwrap();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() > 20, "{} queries", exprs.len());
    let mut names = std::collections::BTreeSet::new();
    for e in &exprs {
        for (i, _) in e.match_indices("strait_") {
            let name: String = e[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    for name in &names {
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_count")
            .trim_end_matches("_sum");
        let short = base
            .trim_start_matches("strait_proxy_")
            .trim_start_matches("strait_controller_");
        assert!(
            docs.contains(&format!("`{short}`"))
                || docs.contains(&format!("`{short}`,"))
                || docs.contains(short),
            "{name} is not in docs/observability.md"
        );
        let registered = short.trim_end_matches("_total");
        // Under the prefix of the binary that registers it.
        let sources = if name.starts_with("strait_proxy_") {
            &proxy
        } else {
            &controller
        };
        assert!(
            sources.contains(&format!("\"{registered}\"")),
            "{name} is plotted but no such metric is registered under its prefix"
        );
    }
    for e in &exprs {
        // Rates of counters and histogram buckets only.
        for f in ["rate(", "increase("] {
            for (i, _) in e.match_indices(f) {
                let arg: String = e[i + f.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    arg.ends_with("_total") || arg.ends_with("_bucket"),
                    "{f}{arg}: not a counter in {e}"
                );
            }
        }
        if e.contains("histogram_quantile(") {
            assert!(e.contains("by (le"), "quantile without le: {e}");
        }
        // A ratio whose numerator is a subset of series (non-5xx, status
        // 0) falls back to 0 where the subset has none: a route whose
        // every call failed shows 0 %, not a gap.
        if e.contains(") / ") && (e.contains("!=\"5xx\"") || e.contains("grpc_status=\"0\"")) {
            assert!(e.contains(" or 0 * "), "no 0 % where all failed: {e}");
        }
        // An HTTP success rate is over the requests: one its caller gave up
        // on has no response, and a backend that hangs would read 100 %.
        if e.contains("route_responses_total") && e.contains("!=\"5xx\"") {
            assert!(
                e.ends_with("(rate(strait_proxy_route_requests_total{service=~\"$service\"}[$__rate_interval]))"),
                "a success rate over responses only: {e}"
            );
        }
    }
    // The server side's panels say which namespace (and for errors which
    // pod) answered, not the mesh's sum.
    for e in exprs
        .iter()
        .filter(|e| e.contains("strait_proxy_inbound_") || e.contains("strait_proxy_tls_"))
    {
        assert!(
            e.contains("namespace=~\"$namespace\""),
            "not by namespace: {e}"
        );
        assert!(
            e.contains("by (namespace") || e.contains("by (le, namespace"),
            "{e}"
        );
        // Per pod, only the pods with something to show: every proxy
        // exports these at 0, and a fleet's flat lines would bury them.
        if e.contains("by (namespace, pod") {
            assert!(e.ends_with(" > 0"), "a line per pod, zeros too: {e}");
        }
    }
    // What the page says to alert on is plotted.
    for alert in [
        "strait_controller_identity_issuer_expiration_timestamp_seconds",
        "strait_controller_watch_failing",
    ] {
        assert!(names.contains(alert), "{alert} is not plotted");
    }
}

#[tokio::test]
async fn discovery_lag_is_measured_for_each_change_after_the_first_answer() {
    let dir = ManifestDir::new();
    dir.write("svc.yaml", &service(NS, "web", 80));
    let backend = Backend::start().await;
    dir.write("slice.yaml", &endpoint(NS, "web", "web-0", backend.addr));
    let cp = ControllerProc::start(dir.path()).await;
    let client = Sidecar::start(cp.grpc, NS, "client-0", &[WEB]).await;
    let url = format!("http://{}/", client.upstreams[0]);
    wait::until("web served", Duration::from_secs(10), || async {
        matches!(client::get(&client::http1(), &url).await, Ok((s, _)) if s == 200)
    })
    .await;
    let count = || {
        metric_sum(
            client.admin,
            "strait_proxy_control_discovery_lag_seconds_count",
        )
    };
    assert_eq!(count().await, 0.0, "the first answer is not lag");
    let other = Backend::start().await;
    dir.write("slice-2.yaml", &endpoint(NS, "web", "web-1", other.addr));
    wait::until("the change measured", Duration::from_secs(10), || async {
        count().await >= 1.0
    })
    .await;
    let sum = metric_sum(
        client.admin,
        "strait_proxy_control_discovery_lag_seconds_sum",
    )
    .await;
    assert!(sum < 5.0, "lag {sum} s for a change on the same host");
}

/// gRPC answers a failed call with HTTP 200 and its status in the trailers (or
/// in the head of a response without a body): both proxies count and trace
/// calls by that status, on the route, by direction and by caller.
#[tokio::test]
async fn grpc_calls_are_counted_and_traced_by_their_status() {
    use strait_api::testing::EchoRequest;
    use strait_api::testing::echo_client::EchoClient;
    let collector = OtlpCollector::start(Mode::Accept).await;
    let app = strait_tests::grpc::start_echo().await;
    let dir = ManifestDir::new();
    dir.write("svc.yaml", &service(NS, "web", 80));
    let cp = ControllerProc::start(dir.path()).await;
    let opts = |sa: &str| SidecarOpts {
        args: vec![
            format!("--otlp-endpoint={}", collector.endpoint()),
            format!("--service-account={sa}"),
        ],
        ..Default::default()
    };
    let server = Sidecar::start_with(cp.grpc, NS, "web-0", &[], opts("web")).await;
    dir.write(
        "pod.yaml",
        &meshed_pod(NS, "web-0", "web", server.inbound.port()),
    );
    dir.write("slice.yaml", &endpoint(NS, "web", "web-0", app));
    let client = Sidecar::start_with(cp.grpc, NS, "client-0", &[WEB], opts("client")).await;
    let echo = EchoClient::connect(format!("http://{}", client.upstreams[0]))
        .await
        .expect("connect through the client proxy");
    let call = |fail_code: i32| EchoRequest {
        message: "hi".into(),
        fail_code,
        ..Default::default()
    };
    wait::until("gRPC through both proxies", Duration::from_secs(10), || {
        let mut echo = echo.clone();
        async move {
            echo.unary(call(0)).await.is_ok()
                && metric_sum(server.admin, "strait_proxy_http_requests_total").await > 0.0
        }
    })
    .await;

    let codes = ["0", "5", "14"];
    let snapshot = || async {
        let mut counts = Vec::new();
        for code in codes {
            let code = format!("grpc_status=\"{code}\"");
            counts.push([
                metric_where(
                    client.admin,
                    "strait_proxy_route_grpc_responses_total",
                    &["route=\"default\"", &code],
                )
                .await,
                metric_where(
                    client.admin,
                    "strait_proxy_grpc_responses_total",
                    &["direction=\"outbound\"", &code],
                )
                .await,
                metric_where(
                    server.admin,
                    "strait_proxy_grpc_responses_total",
                    &["direction=\"inbound\"", &code],
                )
                .await,
                metric_where(
                    server.admin,
                    "strait_proxy_inbound_peer_grpc_responses_total",
                    &["peer=\"unauthenticated\"", &code],
                )
                .await,
            ]);
        }
        let http_2xx = metric_where(
            client.admin,
            "strait_proxy_route_responses_total",
            &["status_class=\"2xx\""],
        )
        .await;
        (counts, http_2xx)
    };
    let (before, before_2xx) = snapshot().await;
    let before_all = metric_where(
        client.admin,
        "strait_proxy_route_grpc_responses_total",
        &["route=\"default\""],
    )
    .await;
    let mut e = echo.clone();
    for _ in 0..3 {
        e.unary(call(0)).await.expect("an OK call");
    }
    for _ in 0..2 {
        let err = e.unary(call(5)).await.expect_err("a NOT_FOUND call");
        assert_eq!(err.code(), tonic::Code::NotFound);
    }
    // A stream that answers once, then fails: the status comes in the trailers.
    let mut replies = e
        .bidi(futures_util::stream::iter([call(0), call(14)]))
        .await
        .expect("a stream")
        .into_inner();
    assert!(replies.message().await.expect("a reply").is_some());
    let err = replies.message().await.expect_err("then UNAVAILABLE");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    drop(replies);
    // Counted as each status passes each proxy.
    let want = [3.0, 2.0, 1.0];
    let deltas = || async {
        let (after, _) = snapshot().await;
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| [a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3]])
            .collect::<Vec<_>>()
    };
    let counted = |d: &[[f64; 4]]| d.iter().zip(want).all(|(d, w)| d.iter().all(|n| *n == w));
    wait::until_or(Duration::from_secs(5), || async {
        counted(&deltas().await)
    })
    .await;
    let last = deltas().await;
    assert!(
        counted(&last),
        "per code 0, 5, 14 (route, outbound, inbound, by caller): {last:?}"
    );
    println!("per code (route, outbound, inbound, by caller): {last:?}");
    let (_, after_2xx) = snapshot().await;
    assert_eq!(
        after_2xx - before_2xx,
        6.0,
        "every call was an HTTP 200, failed or not"
    );
    // Each call counted once, under one status.
    let all = metric_where(
        client.admin,
        "strait_proxy_route_grpc_responses_total",
        &["route=\"default\""],
    )
    .await;
    assert_eq!(all, before_all + 6.0);

    // A caller that gives up on a stream after its head: `cancelled`, and
    // not a failure of its span.
    let cancelled = || async {
        let c = "grpc_status=\"cancelled\"";
        (
            metric_where(
                client.admin,
                "strait_proxy_route_grpc_responses_total",
                &[c],
            )
            .await,
            metric_where(client.admin, "strait_proxy_grpc_responses_total", &[c]).await,
        )
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<http_body::Frame<bytes::Bytes>, strait_tests::BoxError>,
    >(1);
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let given_up = "33333333333333333333333333333333";
    let req = http::Request::post(format!(
        "http://{}/strait.testing.v1.Echo/Bidi",
        client.upstreams[0]
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("traceparent", format!("00-{given_up}-{APP_SPAN}-01"))
    .body(body)
    .unwrap();
    let rsp = client::http2()
        .request(req)
        .await
        .expect("the stream's head");
    assert_eq!(rsp.status(), http::StatusCode::OK);
    // The request's body fails: the client resets the stream.
    tx.send(Err("the caller gives up".into())).await.unwrap();
    drop(rsp);
    let counted = wait::until_or(Duration::from_secs(5), || async {
        cancelled().await == (1.0, 1.0)
    })
    .await;
    assert!(counted, "route, outbound: {:?}", cancelled().await);
    let spans = collector.trace(given_up, 2).await;
    let c = of_trace(&spans, given_up, CLIENT);
    assert_eq!(c.len(), 1, "{spans:#?}");
    assert_eq!(c[0].attr("strait.cancelled").as_deref(), Some("true"));
    assert_eq!(c[0].attr("error.type"), None, "{:#?}", c[0]);

    // A caller that gives up before the head (a unary call whose message
    // never comes, abandoned by its deadline): `cancelled` too.
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<http_body::Frame<bytes::Bytes>, strait_tests::BoxError>,
    >(1);
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let req = http::Request::post(format!(
        "http://{}/strait.testing.v1.Echo/Unary",
        client.upstreams[0]
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(body)
    .unwrap();
    // The route's count: the call is then in the route's hands, and its
    // cancellation counted there. A failed scrape fails the test.
    let requests = || {
        metric_where(
            client.admin,
            "strait_proxy_route_requests_total",
            &["route=\"default\""],
        )
    };
    let seen = requests().await;
    let h2 = client::http2();
    let pending = tokio::spawn(async move { h2.request(req).await.map(|r| r.status()) });
    // Given up once the client proxy has it (however long connecting took).
    wait::until(
        "the call at the client proxy",
        Duration::from_secs(10),
        || async { requests().await > seen },
    )
    .await;
    assert!(
        !pending.is_finished(),
        "no head while the message is missing"
    );
    pending.abort();
    let counted = wait::until_or(Duration::from_secs(5), || async {
        cancelled().await == (2.0, 2.0)
    })
    .await;
    drop(tx);
    assert!(counted, "route, outbound: {:?}", cancelled().await);

    // Spans name the method, carry the status and end with the call.
    let traced = |trace: &str, fail_code| {
        let mut r = tonic::Request::new(call(fail_code));
        r.metadata_mut().insert(
            "traceparent",
            format!("00-{trace}-{APP_SPAN}-01").parse().unwrap(),
        );
        r
    };
    let unary_trace = "11111111111111111111111111111111";
    assert!(e.unary(traced(unary_trace, 5)).await.is_err());
    let stream_trace = "22222222222222222222222222222222";
    let mut r = tonic::Request::new(futures_util::stream::iter([call(0), call(14)]));
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{stream_trace}-{APP_SPAN}-01").parse().unwrap(),
    );
    let mut replies = e.bidi(r).await.expect("a stream").into_inner();
    assert!(replies.message().await.expect("a reply").is_some());
    assert!(replies.message().await.is_err());
    drop(replies);
    for (trace, code, server_failed) in [(unary_trace, "5", false), (stream_trace, "14", true)] {
        let spans = collector.trace(trace, 2).await;
        let (c, s) = (
            of_trace(&spans, trace, CLIENT),
            of_trace(&spans, trace, SERVER),
        );
        assert_eq!((c.len(), s.len()), (1, 1), "{spans:#?}");
        for span in [c[0], s[0]] {
            let method = if trace == unary_trace {
                "Unary"
            } else {
                "Bidi"
            };
            assert_eq!(span.span.name, format!("strait.testing.v1.Echo/{method}"));
            assert_eq!(span.attr("rpc.system").as_deref(), Some("grpc"));
            assert_eq!(
                span.attr("rpc.service").as_deref(),
                Some("strait.testing.v1.Echo")
            );
            assert_eq!(
                span.attr("rpc.grpc.status_code").as_deref(),
                Some(code),
                "{span:#?}"
            );
            assert_eq!(
                span.attr("http.response.status_code").as_deref(),
                Some("200")
            );
        }
        // Any status but OK fails the client's call; on the server's side only
        // those that say the server failed.
        assert_eq!(c[0].attr("error.type").as_deref(), Some(code));
        let server_error = s[0].attr("error.type");
        assert_eq!(
            server_error.as_deref(),
            server_failed.then_some(code),
            "{:#?}",
            s[0]
        );
    }
}

/// The proxy in front of a server that cannot reach its app answers 502; the
/// calling proxy hands that to its app's gRPC client as UNAVAILABLE with the
/// server proxy's reason, rather than as an unexplained HTTP status.
#[tokio::test]
async fn a_grpc_call_the_server_proxy_fails_reaches_the_app_as_a_grpc_error() {
    use strait_api::testing::EchoRequest;
    use strait_api::testing::echo_client::EchoClient;
    // Nothing listens where the app should be.
    let dead: SocketAddr = format!("127.0.0.1:{}", strait_tests::process::free_port())
        .parse()
        .unwrap();
    let dir = ManifestDir::new();
    dir.write("svc.yaml", &service(NS, "web", 80));
    let cp = ControllerProc::start(dir.path()).await;
    let server = Sidecar::start(cp.grpc, NS, "web-0", &[]).await;
    dir.write(
        "pod.yaml",
        &meshed_pod(NS, "web-0", "web", server.inbound.port()),
    );
    dir.write("slice.yaml", &endpoint(NS, "web", "web-0", dead));
    let client = Sidecar::start(cp.grpc, NS, "client-0", &[WEB]).await;
    let echo = EchoClient::connect(format!("http://{}", client.upstreams[0]))
        .await
        .expect("connect to the client proxy");
    let call = |mut echo: EchoClient<_>| async move {
        echo.unary(EchoRequest {
            message: "hi".into(),
            ..Default::default()
        })
        .await
    };
    let relayed = wait::until_or(Duration::from_secs(10), || {
        let echo = echo.clone();
        async move {
            let _ = call(echo).await;
            metric_sum(server.admin, "strait_proxy_http_requests_total").await > 0.0
        }
    })
    .await;
    assert!(relayed, "the server proxy was never reached");
    let unavailable = "grpc_status=\"14\"";
    let counts = || async {
        (
            metric_where(
                server.admin,
                "strait_proxy_grpc_responses_total",
                &["direction=\"inbound\"", unavailable],
            )
            .await,
            metric_where(
                client.admin,
                "strait_proxy_grpc_responses_total",
                &["direction=\"outbound\"", unavailable],
            )
            .await,
        )
    };
    let before = counts().await;
    let err = call(echo.clone())
        .await
        .expect_err("no app behind the server proxy");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .starts_with(&format!("connect to {dead} failed")),
        "the server proxy's reason: {err:?}"
    );
    assert!(
        err.metadata().get("strait-proxy-error").is_some(),
        "{err:?}"
    );
    // Both proxies count the call as the code the app got.
    let after = counts().await;
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1.0, 1.0),
        "server proxy inbound, client proxy outbound"
    );
}
