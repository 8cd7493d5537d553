//! The admin server: health, metrics, config, log level, shutdown.

use std::time::Duration;

use strait_tests::backend::Backend;
use strait_tests::wait::{admin_get, admin_request};

use crate::support;

#[tokio::test]
async fn health_metrics_and_config() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let admin = proxy.addrs.admin;
    assert_eq!(
        admin_get(admin, "/live").await.unwrap(),
        (200, "live\n".into())
    );
    assert_eq!(
        admin_get(admin, "/ready").await.unwrap(),
        (200, "ready\n".into())
    );

    let c = strait_tests::client::http1();
    for path in ["/", "/status/503", "/status/404"] {
        strait_tests::client::get(&c, &format!("http://{}{path}", proxy.upstream()))
            .await
            .unwrap();
    }
    let (status, metrics) = admin_get(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for line in [
        "strait_proxy_http_requests_total{direction=\"outbound\"} 3",
        "strait_proxy_http_responses_total{direction=\"outbound\",status_class=\"2xx\"} 1",
        "strait_proxy_http_responses_total{direction=\"outbound\",status_class=\"4xx\"} 1",
        "strait_proxy_http_responses_total{direction=\"outbound\",status_class=\"5xx\"} 1",
        "strait_proxy_tcp_open_connections{direction=\"outbound\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert!(
        metrics.contains("strait_proxy_http_response_latency_seconds_bucket"),
        "{metrics}"
    );

    let (status, config) = admin_get(admin, "/config").await.unwrap();
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["detect_timeout"], "300ms");
    assert_eq!(
        config["upstreams"][0],
        format!("127.0.0.1:0={}", backend.addr)
    );

    assert_eq!(admin_get(admin, "/nope").await.unwrap().0, 404);
    assert_eq!(
        admin_get(admin, "/shutdown").await.unwrap().0,
        405,
        "shutdown needs POST"
    );
}

#[tokio::test]
async fn shutdown_from_loopback_drains_and_ready_turns_503() {
    let backend = Backend::start().await;
    let mut c = support::with_upstream(support::config(), backend.addr);
    c.shutdown_grace_period = Duration::from_secs(5);
    let proxy = support::start(c).await;
    let admin = proxy.addrs.admin;
    // A request in flight keeps the drain going long enough to see /ready say so.
    let url = format!("http://{}/slow/1000", proxy.upstream());
    let slow = tokio::spawn(async move {
        strait_tests::client::get(&strait_tests::client::http1(), &url).await
    });
    strait_tests::wait::until("request in flight", Duration::from_secs(5), || async {
        backend.in_flight() == 1
    })
    .await;
    let (status, _) = admin_request(admin, "POST", "/shutdown", "").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        admin_get(admin, "/ready").await.unwrap(),
        (503, "draining\n".into())
    );
    let (status, body) = slow.await.unwrap().unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "slow"));
    assert!(proxy.join().await, "drained cleanly");
}

#[tokio::test]
async fn admin_connections_are_capped_and_the_data_path_is_not() {
    use tokio::io::AsyncReadExt;
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let admin = proxy.addrs.admin;
    // Connections that never send a request hold every admin slot.
    let mut held = Vec::new();
    for _ in 0..strait_proxy::admin::MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    // Accepted in order, so one more finds no slot: closed at once.
    let mut extra = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a connection past the cap: {read:?}"
    );
    // The proxy's own traffic is untouched.
    let c = strait_tests::client::http1();
    let (status, _) = strait_tests::client::get(&c, &format!("http://{}/", proxy.upstream()))
        .await
        .unwrap();
    assert_eq!(status, 200);
    // A slot freed is a slot for the next probe.
    held.pop();
    strait_tests::wait::until("an admin slot to free", Duration::from_secs(5), || async {
        matches!(admin_get(admin, "/ready").await, Ok((200, _)))
    })
    .await;
}
