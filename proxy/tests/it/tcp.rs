//! Opaque TCP: bytes both ways with half-close, server-speaks-first protocols on
//! declared and undeclared ports.

use std::time::{Duration, Instant};

use strait_proxy::addr::PortSet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, metric};

#[tokio::test]
async fn opaque_echo_preserves_half_close() {
    let echo = strait_tests::tcp::echo().await;
    let proxy = support::start_to(echo).await;
    let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
    // Not HTTP: a binary payload that is carried untouched.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload).await.unwrap();
    // Half-close: we are done writing, but still reading.
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "bytes differ");
    let m = proxy.metrics_text();
    assert_eq!(
        metric(
            &m,
            "strait_proxy_protocol_detected_connections_total{direction=\"outbound\",protocol=\"opaque\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

/// The workload's own opaque ports (`strait.dev/opaque-ports`) are its
/// inbound ones: its app's calls to another server's port of the same number
/// are still read as HTTP, routed and counted.
#[tokio::test]
async fn the_workload_s_own_opaque_ports_leave_its_calls_out_alone() {
    let backend = strait_tests::backend::Backend::start().await;
    let mut c = support::with_upstream(support::config(), backend.addr);
    c.inbound_opaque_ports = Some(backend.addr.port().to_string().parse().unwrap());
    let proxy = support::start(c).await;
    let (status, _) = strait_tests::client::get(
        &strait_tests::client::http1(),
        &format!("http://{}/", proxy.upstream()),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let m = proxy.metrics_text();
    assert_eq!(
        metric(
            &m,
            "strait_proxy_protocol_detected_connections_total{direction=\"outbound\",protocol=\"http1\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn server_speaks_first_on_an_undeclared_port_is_answered_within_the_bounded_wait() {
    let server = strait_tests::tcp::banner(b"220 smtp.test ESMTP\r\n").await;
    let mut c = support::with_upstream(support::config(), server);
    c.opaque_ports = PortSet::default();
    let proxy = support::start(c).await;
    let start = Instant::now();
    let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
    let mut banner = [0u8; 21];
    s.read_exact(&mut banner).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(&banner, b"220 smtp.test ESMTP\r\n");
    assert!(
        waited >= Duration::from_millis(300),
        "detection waited {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1500),
        "banner took {waited:?}"
    );
    s.write_all(b"EHLO me\r\n").await.unwrap();
    let mut echo = [0u8; 9];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"EHLO me\r\n");
}

#[tokio::test]
async fn declared_opaque_ports_skip_detection() {
    let server = strait_tests::tcp::banner(b"+OK redis\r\n").await;
    let mut c = support::with_upstream(support::config(), server);
    c.opaque_ports = server.port().to_string().parse().unwrap();
    // A huge detection timeout proves the banner does not wait for it.
    c.detect_timeout = Duration::from_secs(30);
    let proxy = support::start(c).await;
    let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
    let mut banner = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner))
        .await
        .expect("banner without waiting for detection")
        .unwrap();
    assert_eq!(&banner, b"+OK redis\r\n");
}

/// An opaque stream whose connect onward is refused is reset, not closed:
/// a client that wrote and half-closed (`echo data | nc -N`) would read a
/// clean, empty answer and take it for the server's.
#[tokio::test]
async fn a_refused_opaque_stream_is_reset_not_closed() {
    let dead = support::refused_addr();
    let proxy = support::start_to(dead).await;
    let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
    s.write_all(&[0u8, 1, 2, 3, 255]).await.unwrap();
    s.shutdown().await.unwrap();
    strait_tests::tcp::ends_in_a_reset(&mut s, Duration::from_secs(5), "refused").await;
}

/// A server that resets the connection before a word reaches a client
/// waiting for its greeting as a reset, as it would without the proxy, not
/// as a clean close (an empty answer).
#[tokio::test]
async fn a_reset_before_the_greeting_reaches_a_silent_client_as_a_reset() {
    let server = strait_tests::tcp::resetting_at_once().await;
    let mut c = support::with_upstream(support::config(), server);
    c.opaque_ports = PortSet::default();
    c.detect_timeout = Duration::from_millis(100);
    let proxy = support::start(c).await;
    let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
    strait_tests::tcp::ends_in_a_reset(&mut s, Duration::from_secs(5), "a silent client").await;
}

/// An HTTP/2 server sends its SETTINGS as soon as it accepts, before it
/// reads a client's preface: no greeting of a server-speaks-first protocol.
/// A client silent past the detection wait and then speaking HTTP/2 is
/// served as HTTP, its requests routed and counted, not carried raw (on the
/// inbound side, raw HTTP/2 would reach the app with whatever
/// `strait-client-id` it claimed).
#[tokio::test]
async fn a_silent_client_of_an_http2_server_is_still_served_as_http() {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(tokio::sync::Notify::new());
    let on_accept = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            on_accept.notify_one();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"h2 app")),
                    ))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    let mut c = support::with_upstream(support::config(), server);
    c.opaque_ports = PortSet::default();
    c.detect_timeout = Duration::from_millis(100);
    let proxy = support::start(c).await;
    let s = TcpStream::connect(proxy.upstream()).await.unwrap();
    // Silent until the proxy has connected onward, and the server's
    // SETTINGS have had time to arrive.
    tokio::time::timeout(Duration::from_secs(5), accepted.notified())
        .await
        .expect("the proxy connects onward for a silent client");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{server}/"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let rsp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"h2 app");
    let m = proxy.metrics_text();
    assert_eq!(
        metric(
            &m,
            "strait_proxy_protocol_detected_connections_total{direction=\"outbound\",protocol=\"http2\"}"
        ),
        Some(1.0),
        "{m}"
    );
}
