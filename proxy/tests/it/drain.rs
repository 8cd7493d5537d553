//! Graceful shutdown: accepted requests finish, new connections are refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use strait_tests::backend::Backend;
use strait_tests::client;

use crate::support;

#[tokio::test]
async fn drain_under_load_loses_no_accepted_request() {
    let backend = Backend::start().await;
    let mut c = support::with_upstream(support::config(), backend.addr);
    c.shutdown_grace_period = Duration::from_secs(10);
    let proxy = support::start(c).await;
    let url = format!("http://{}/slow/300", proxy.upstream());

    // Steady load: 16 keep-alive clients in a loop, each until the proxy is gone.
    let ok = Arc::new(AtomicUsize::new(0));
    let failed_after_accept = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (url, ok) = (url.clone(), ok.clone());
        let failed = failed_after_accept.clone();
        workers.push(tokio::spawn(async move {
            let c = client::http1();
            loop {
                match client::get(&c, &url).await {
                    Ok((StatusCode::OK, _)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok((s, _)) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        panic!("status {s} during drain");
                    }
                    // Refused or closed before the request was accepted: the load
                    // generator sees the proxy going away, as it should.
                    Err(_) => return,
                }
            }
        }));
    }
    strait_tests::wait::until("16 requests in flight", Duration::from_secs(10), || async {
        backend.in_flight() == 16
    })
    .await;
    proxy.shutdown();
    let clean = tokio::time::timeout(Duration::from_secs(15), proxy.join())
        .await
        .unwrap();
    assert!(clean, "drain finished within the grace period");
    for w in workers {
        w.await.unwrap();
    }
    // Every request the app accepted was answered to its client.
    assert_eq!(failed_after_accept.load(Ordering::SeqCst), 0);
    assert_eq!(
        backend.stats.completed.load(Ordering::SeqCst),
        ok.load(Ordering::SeqCst),
        "each request served by the app reached its client"
    );
    assert!(ok.load(Ordering::SeqCst) >= 16);
}

#[tokio::test]
async fn after_drain_new_connections_are_refused() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let addr = proxy.upstream();
    assert!(proxy.stop().await);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

/// An opaque stream still open when the grace period ends is reset, on both
/// sides: a client reading a clean end would take what it got for all
/// there was (a truncated download, a query's answer cut short).
#[tokio::test]
async fn an_opaque_stream_cut_at_the_end_of_the_grace_period_is_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (echo, mut ended) = strait_tests::tcp::echo_telling().await;
    let mut c = support::with_upstream(support::config(), echo);
    c.opaque_ports = echo.port().to_string().parse().unwrap();
    c.shutdown_grace_period = Duration::from_millis(200);
    let proxy = support::start(c).await;
    let mut s = tokio::net::TcpStream::connect(proxy.upstream())
        .await
        .unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");

    proxy.shutdown();
    let clean = tokio::time::timeout(Duration::from_secs(5), proxy.join())
        .await
        .expect("the proxy stops once the grace period is over");
    assert!(!clean, "the stream outlived the grace period");
    strait_tests::tcp::ends_in_a_reset(&mut s, Duration::from_secs(5), "the client").await;
    let upstream = tokio::time::timeout(Duration::from_secs(5), ended.recv())
        .await
        .expect("the upstream's end within 5 s")
        .unwrap();
    assert_eq!(upstream.bytes, b"ping");
    assert!(upstream.reset, "the upstream read a clean end");
}

/// Shutting down, a stream whose app has ended its side is closed at once
/// rather than held for the grace period while the far side says nothing:
/// a pod's proxy is stopped after its app has exited, and an idle pooled
/// connection of a client may stay silent for minutes. Here the app is the
/// client (an outbound stream); the far server reads the end and keeps its
/// side open.
#[tokio::test]
async fn draining_does_not_wait_on_a_stream_its_app_has_ended() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let far = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let far_addr = far.local_addr().unwrap();
    let (read_end, got_end) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = far.accept().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        let _ = read_end.send(all);
        // Silent, its side open, as long as the test runs.
        std::future::pending::<()>().await;
        drop(s);
    });
    let mut c = support::with_upstream(support::config(), far_addr);
    c.opaque_ports = far_addr.port().to_string().parse().unwrap();
    c.shutdown_grace_period = Duration::from_secs(30);
    let proxy = support::start(c).await;
    let mut app = tokio::net::TcpStream::connect(proxy.upstream())
        .await
        .unwrap();
    app.write_all(b"bye").await.unwrap();
    app.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), got_end).await;
    assert_eq!(
        got.expect("the app's end reached the far side").unwrap(),
        b"bye"
    );

    proxy.shutdown();
    let clean = tokio::time::timeout(Duration::from_secs(5), proxy.join())
        .await
        .expect("the proxy stops well within its grace period");
    assert!(clean, "a stream was cut at the end of the grace period");
}
