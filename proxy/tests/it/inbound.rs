//! The inbound listener: requests carry the target port of the app in this pod.

use http::{Request, StatusCode};
use strait_tests::backend::Backend;
use strait_tests::client;

use crate::support;

#[tokio::test]
async fn inbound_forwards_to_the_target_port_on_loopback() {
    let backend = Backend::start().await;
    let proxy = support::start(support::config()).await;
    for c in [client::http1(), client::http2()] {
        let req = Request::get(format!("http://{}/status/202", proxy.addrs.inbound))
            .header("strait-target-port", backend.addr.port().to_string())
            .body(client::empty())
            .unwrap();
        let rsp = c.request(req).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::ACCEPTED);
        let seen = rsp.headers()["x-seen-headers"].to_str().unwrap();
        assert!(
            !seen.contains("strait-target-port"),
            "the proxy's header stops at the proxy: {seen}"
        );
    }
    let m = proxy.metrics_text();
    assert!(
        m.contains("strait_proxy_http_requests_total{direction=\"inbound\"} 2"),
        "{m}"
    );
}

/// A head an app may send over HTTP/1 (under 64 KiB) reaches the app
/// through the hop between proxies, where HTTP/2 counts it larger (32 bytes
/// per field) and the client proxy adds its own fields: not a 431 that
/// only the mesh gives.
#[tokio::test]
async fn a_head_an_http1_app_may_send_passes_the_peer_hop() {
    let backend = Backend::start().await;
    let proxy = support::start(support::config()).await;
    let path = format!("/echo-path/{}", "a".repeat(64_900));
    let mut req = Request::get(format!("http://{}{path}", proxy.addrs.inbound))
        .header("strait-target-port", backend.addr.port().to_string())
        .header("strait-orig-proto", "HTTP/1.1");
    for i in 0..12 {
        req = req.header(format!("x-h{i}"), "v");
    }
    let rsp = client::http2()
        .request(req.body(client::empty()).unwrap())
        .await
        .unwrap();
    assert_ne!(rsp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(rsp.status().is_success(), "{:?}", rsp.status());
}

#[tokio::test]
async fn inbound_without_a_target_port_is_a_clear_400() {
    let proxy = support::start(support::config()).await;
    let c = client::http1();
    let rsp = c
        .get(format!("http://{}/", proxy.addrs.inbound).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::BAD_REQUEST);
    assert!(
        rsp.headers()["strait-proxy-error"]
            .to_str()
            .unwrap()
            .contains("no target port"),
        "{:?}",
        rsp.headers()
    );
    let req = Request::get(format!("http://{}/", proxy.addrs.inbound))
        .header("strait-target-port", "http")
        .body(client::empty())
        .unwrap();
    assert_eq!(
        c.request(req).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn the_proxys_own_ports_are_never_a_target() {
    let backend = Backend::start().await;
    let proxy = support::start(support::with_upstream(support::config(), backend.addr)).await;
    let c = client::http1();
    // Aimed at the admin server, a remote client would be "loopback" there and
    // could shut the proxy down; aimed at the outbound or an upstream listener,
    // it would use this pod as an open proxy.
    for port in [
        proxy.addrs.admin.port(),
        proxy.addrs.outbound.port(),
        proxy.upstream().port(),
        proxy.addrs.inbound.port(),
    ] {
        let req = Request::post(format!("http://{}/shutdown", proxy.addrs.inbound))
            .header("strait-target-port", port.to_string())
            .body(client::empty())
            .unwrap();
        let rsp = c.request(req).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::BAD_REQUEST, "port {port}");
        assert!(
            rsp.headers()["strait-proxy-error"]
                .to_str()
                .unwrap()
                .contains("loop"),
            "{:?}",
            rsp.headers()
        );
    }
    let (status, _) = strait_tests::wait::admin_get(proxy.addrs.admin, "/ready")
        .await
        .unwrap();
    assert_eq!(status, 200, "still serving");
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn a_host_naming_the_proxy_itself_is_refused_as_a_loop() {
    let proxy = support::start(support::config()).await;
    let c = client::http1();
    let req = Request::get(format!("http://{}/", proxy.addrs.outbound))
        .header("host", format!("localhost:{}", proxy.addrs.outbound.port()))
        .body(client::empty())
        .unwrap();
    let rsp = c.request(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::BAD_REQUEST);
    let m = proxy.metrics_text();
    assert!(
        m.contains("strait_proxy_http_requests_total{direction=\"outbound\"} 1"),
        "one request, not a cascade: {m}"
    );
}

/// Callers of an HTTP/2 app do not share its connections: one that holds
/// every stream it can have there (requests the app does not answer) leaves
/// another's requests unaffected, as it would without a proxy.
#[tokio::test]
async fn one_caller_holding_an_http2_apps_streams_does_not_stall_another() {
    // Sixteen connections per caller (`H2_MAX_CONNECTIONS_PER_UPSTREAM`), at
    // the app's one stream each, and one request more waiting.
    const HELD: usize = 16;
    let backend = Backend::start_h2_streams(1).await;
    let proxy = support::start(support::config()).await;
    let request = |c: &client::HttpClient, path: &str| to_app(c, &proxy, &backend, path);
    let greedy = client::http2_from("127.0.0.1".parse().unwrap());
    // Two requests one after the other first: the pool learns the app's
    // limit from its first connection's SETTINGS by the second (and gives
    // it to each connection it opens after).
    for _ in 0..2 {
        let rsp = request(&greedy, "/status/200").await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
    }
    let mut held = tokio::task::JoinSet::new();
    let stats = backend.stats.clone();
    // One at a time, so that each finds the others' connections full.
    for n in 1..=HELD {
        held.spawn(request(&greedy, "/hold"));
        let stats = stats.clone();
        strait_tests::wait::until(
            "the greedy caller's request held at the app",
            std::time::Duration::from_secs(10),
            || {
                let stats = stats.clone();
                async move { stats.in_flight.load(std::sync::atomic::Ordering::SeqCst) == n }
            },
        )
        .await;
    }
    held.spawn(request(&greedy, "/hold"));
    let other = client::http2_from("127.0.0.2".parse().unwrap());
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        request(&other, "/status/202"),
    )
    .await
    .expect("another caller is answered while the first holds its streams")
    .unwrap();
    assert_eq!(answered.status(), StatusCode::ACCEPTED);
    backend.release_held();
    while let Some(done) = held.join_next().await {
        assert_eq!(done.unwrap().unwrap().status(), StatusCode::OK);
    }
}

/// One caller may hold a quarter of the inbound requests in flight
/// (`--max-in-flight-requests`), as of the connections: an HTTP/2 client
/// that opens streams it never lets finish (it gives no flow-control
/// window, or the app holds them) would otherwise take the whole cap, and
/// every other caller, and the kubelet's probes, would be answered 503.
#[tokio::test]
async fn one_caller_holds_at_most_a_quarter_of_the_requests_in_flight() {
    let backend = Backend::start().await;
    let mut config = support::config();
    config.max_in_flight_requests = 8;
    let proxy = support::start(config).await;
    let request = |c: &client::HttpClient, path: &str| to_app(c, &proxy, &backend, path);
    let greedy = client::http2_from("127.0.0.1".parse().unwrap());
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..2 {
        held.spawn(request(&greedy, "/hold"));
    }
    strait_tests::wait::until(
        "the greedy caller's requests held at the app",
        std::time::Duration::from_secs(10),
        || async { backend.in_flight() == 2 },
    )
    .await;
    let shed = request(&greedy, "/status/200").await.unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        shed.headers()["strait-proxy-error"],
        "too many requests in flight from this caller (not processed)"
    );
    let other = client::http2_from("127.0.0.2".parse().unwrap());
    let answered = request(&other, "/status/202").await.unwrap();
    assert_eq!(answered.status(), StatusCode::ACCEPTED);
    backend.release_held();
    while let Some(done) = held.join_next().await {
        assert_eq!(done.unwrap().unwrap().status(), StatusCode::OK);
    }
    let room = request(&greedy, "/status/200").await.unwrap();
    assert_eq!(room.status(), StatusCode::OK, "room again once they ended");
}

/// A GET of `path` through the inbound listener to the app `backend`, as a
/// peer sends it (its target port named).
fn to_app(
    c: &client::HttpClient,
    proxy: &support::TestProxy,
    backend: &Backend,
    path: &str,
) -> hyper_util::client::legacy::ResponseFuture {
    let req = Request::get(format!("http://{}{path}", proxy.addrs.inbound))
        .header("strait-target-port", backend.addr.port().to_string())
        .body(client::empty())
        .unwrap();
    c.request(req)
}
