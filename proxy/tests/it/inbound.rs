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
