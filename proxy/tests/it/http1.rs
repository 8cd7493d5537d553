//! HTTP/1.1 carried correctly: keep-alive, pipelining, streaming both ways,
//! upgrades and CONNECT, hop-by-hop headers.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use strait_tests::backend::Backend;
use strait_tests::client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{self, metric};

#[tokio::test]
async fn keep_alive_reuses_one_connection_each_side() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let c = client::http1();
    for _ in 0..10 {
        let (status, body) = client::get(&c, &format!("http://{}/", proxy.upstream()))
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }
    assert_eq!(backend.requests(), 10);
    assert_eq!(
        backend.connections(),
        1,
        "the proxy pools its upstream connection"
    );
    let m = proxy.metrics_text();
    assert_eq!(
        metric(
            &m,
            "strait_proxy_tcp_connections_total{direction=\"outbound\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "strait_proxy_http_responses_total{direction=\"outbound\",status_class=\"2xx\"}"
        ),
        Some(10.0),
        "{m}"
    );
}

#[tokio::test]
async fn many_host_names_share_one_upstream_connection() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    // The client keeps one connection to the proxy; each request names another
    // host (HTTP/1 in Host, HTTP/2 in :authority). A pool keyed by host would
    // open a connection to the app for each.
    let c = client::http1();
    for i in 0..20 {
        let req = Request::get(format!("http://{}/", proxy.upstream()))
            .header("host", format!("name-{i}.example"))
            .body(client::empty())
            .unwrap();
        let rsp = c.request(req).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(
            rsp.headers()["x-seen-host"],
            format!("name-{i}.example").as_str(),
            "the app sees the host the client named"
        );
    }
    let tcp = TcpStream::connect(proxy.upstream()).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for i in 0..20 {
        let req = Request::get(format!("http://name-{i}.example/"))
            .body(client::empty())
            .unwrap();
        let rsp = h2.send_request(req).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(
            rsp.headers()["x-seen-host"],
            format!("name-{i}.example").as_str(),
            "the app sees the authority the client named"
        );
    }
    assert_eq!(backend.requests(), 40);
    assert_eq!(
        backend.connections(),
        2,
        "one connection per HTTP version, whatever the host"
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
    s.write_all(
        b"GET /status/201 HTTP/1.1\r\nhost: a\r\n\r\nGET /status/202 HTTP/1.1\r\nhost: a\r\n\r\nGET /status/203 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let statuses: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .map(|l| &l[9..12])
        .collect();
    assert_eq!(statuses, ["201", "202", "203"], "{out}");
}

#[tokio::test]
async fn chunked_upload_and_download_stream_through() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let c = client::http1();
    // An upload of unknown length goes chunked; the echo comes back chunked.
    let chunks =
        futures_util::stream::iter((0..100).map(|i| {
            Ok::<_, strait_tests::BoxError>(Frame::data(Bytes::from(format!("chunk-{i};"))))
        }));
    let req = Request::post(format!("http://{}/echo", proxy.upstream()))
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap();
    let rsp = c.request(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    let want: String = (0..100).map(|i| format!("chunk-{i};")).collect();
    assert_eq!(body, want.as_bytes());

    let (status, body) = client::get(&c, &format!("http://{}/bytes/1000000", proxy.upstream()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 1_000_000);
}

#[tokio::test]
async fn server_sent_events_arrive_before_the_stream_ends() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let c = client::http1();
    let rsp = c
        .get(format!("http://{}/sse", proxy.upstream()).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(rsp.headers()["content-type"], "text/event-stream");
    let mut body = rsp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event arrives while the stream is open")
        .unwrap()
        .unwrap();
    assert_eq!(first.data_ref().unwrap().as_ref(), b"data: first\n\n");
    backend.release_sse();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest.as_ref(), b"data: last\n\n");
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let (mut ws, rsp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.upstream()))
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let got = ws.next().await.unwrap().unwrap();
        assert_eq!(got, Message::text(format!("hello {i}")));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn connect_tunnels_pass_through() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
    s.write_all(b"CONNECT example.test:443 HTTP/1.1\r\nhost: example.test:443\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"raw tunnel bytes").await.unwrap();
    let mut echoed = [0u8; 16];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"raw tunnel bytes");
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_the_proxy() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let c = client::http1();
    let req = Request::builder()
        .method(Method::GET)
        .uri(format!("http://{}/", proxy.upstream()))
        .header("host", "web.example:8080")
        .header("connection", "x-private, keep-alive")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("x-app", "kept")
        .body(client::empty())
        .unwrap();
    let rsp = c.request(req).await.unwrap();
    let seen = rsp.headers()["x-seen-headers"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        rsp.headers()["x-seen-host"],
        "web.example:8080",
        "Host survives the hop"
    );
    assert!(seen.contains("x-app"), "{seen}");
    for h in ["x-private", "keep-alive", "proxy-connection"] {
        assert!(
            !seen.split(',').any(|s| s == h),
            "{h} reached the backend: {seen}"
        );
    }
}

#[tokio::test]
async fn http_sent_to_the_outbound_port_follows_its_host_header() {
    let backend = Backend::start().await;
    let proxy = support::start(support::config()).await;
    let c = client::http1();
    let req = Request::get(format!("http://{}/status/204", proxy.addrs.outbound))
        .header("host", backend.addr.to_string())
        .body(client::empty())
        .unwrap();
    let rsp = c.request(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::NO_CONTENT);

    // A Host naming the proxy itself would loop: refused, with the reason.
    let req = Request::get(format!("http://{}/", proxy.addrs.outbound))
        .body(client::empty())
        .unwrap();
    let rsp = c.request(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::BAD_REQUEST);
    assert!(
        rsp.headers()["strait-proxy-error"]
            .to_str()
            .unwrap()
            .contains("loop"),
        "{:?}",
        rsp.headers()
    );
}

/// A destination the proxy cannot connect to (a pod gone after a rollout,
/// a Service recreated elsewhere) answers 502 and closes the app's
/// keep-alive connection: without the mesh the server's going away would
/// have closed it, and the app, reconnecting, resolves its name again rather
/// than failing every request on the connection it holds.
#[tokio::test]
async fn a_connect_failure_closes_the_app_s_connection() {
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", strait_tests::process::free_port())
        .parse()
        .unwrap();
    let proxy = support::start_to(dead).await;
    let mut c = TcpStream::connect(proxy.upstream()).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: db-0.db\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut answer))
        .await
        .expect("the connection closed after the answer")
        .unwrap();
    let lower = answer.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 502"), "{answer}");
    assert!(lower.contains("\r\nconnection: close\r\n"), "{answer}");
}

/// As over HTTP/1, the app's HTTP/2 connection to a destination the proxy
/// cannot connect to goes away (GOAWAY) after the answer: a gRPC channel
/// balancing over a headless Service's pods holds one per pod address, and
/// with it open would send every call to a pod gone after a rollout, never
/// resolving the name again. (It stayed open until idle for two minutes.)
#[tokio::test]
async fn a_connect_failure_sends_the_app_s_http2_connection_away() {
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", strait_tests::process::free_port())
        .parse()
        .unwrap();
    let proxy = support::start_to(dead).await;
    let tcp = TcpStream::connect(proxy.upstream()).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let req = Request::get("http://db-0.db/").body(()).unwrap();
    let (rsp, _) = h2.send_request(req, true).unwrap();
    let rsp = rsp.await.unwrap();
    assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the connection went away after the answer")
        .unwrap()
        .unwrap();
}

/// HTTP/2 sent straight to the outbound port names each request's
/// destination: one that cannot be reached fails that request, not the
/// connection, whose other requests go where they name.
#[tokio::test]
async fn a_connection_naming_each_request_s_destination_stays_after_one_is_unreachable() {
    let backend = Backend::start().await;
    let proxy = support::start(support::config()).await;
    let tcp = TcpStream::connect(proxy.addrs.outbound).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let dead = strait_tests::process::free_port();
    for (authority, want) in [
        (format!("127.0.0.1:{dead}"), StatusCode::BAD_GATEWAY),
        (backend.addr.to_string(), StatusCode::OK),
    ] {
        let mut h2 = h2.clone().ready().await.unwrap();
        let req = Request::get(format!("http://{authority}/"))
            .body(())
            .unwrap();
        let (rsp, _) = h2.send_request(req, true).unwrap();
        assert_eq!(rsp.await.unwrap().status(), want, "{authority}");
    }
    assert!(!conn.is_finished(), "the connection went away");
}

/// An app configured with an HTTP forward proxy (`http_proxy=`, Squid)
/// sends its requests in absolute form, which the forward proxy needs to
/// know where to: they reach it so. Origin-form requests stay as they are.
#[tokio::test]
async fn a_forward_proxy_gets_requests_in_absolute_form() {
    let squid = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let squid_addr = squid.local_addr().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = squid.accept().await else {
                return;
            };
            let lines_tx = lines_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read_exact(&mut b).await.is_ok() {
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let _ = lines_tx.send(text.lines().next().unwrap_or_default().to_string());
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    let proxy = support::start_to(squid_addr).await;
    for (line, want) in [
        (
            "GET http://example.test:8080/x?y=1 HTTP/1.1\r\nHost: example.test:8080",
            "GET http://example.test:8080/x?y=1 HTTP/1.1",
        ),
        (
            "GET http://user:pw@example.test/ HTTP/1.1\r\nHost: example.test",
            "GET http://example.test/ HTTP/1.1",
        ),
        // The proxy it goes to opens the TLS to the origin (Squid does):
        // sent on as `http://`, it would fetch in plaintext.
        (
            "GET https://example.test/x HTTP/1.1\r\nHost: example.test",
            "GET https://example.test/x HTTP/1.1",
        ),
        (
            "GET ftp://example.test/file HTTP/1.1\r\nHost: example.test",
            "GET ftp://example.test/file HTTP/1.1",
        ),
        ("GET /x HTTP/1.1\r\nHost: example.test", "GET /x HTTP/1.1"),
    ] {
        let mut c = TcpStream::connect(proxy.upstream()).await.unwrap();
        c.write_all(format!("{line}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let seen = tokio::time::timeout(Duration::from_secs(5), lines.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, want);
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_naming_it() {
    let dead = strait_tests::process::free_port();
    let proxy = support::start_to(format!("127.0.0.1:{dead}").parse().unwrap()).await;
    let c = client::http1();
    let rsp = c
        .get(format!("http://{}/", proxy.upstream()).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
    let reason = rsp.headers()["strait-proxy-error"].to_str().unwrap();
    assert!(reason.contains(&format!("127.0.0.1:{dead}")), "{reason}");
}

/// An upstream outside the mesh that answers every request with `response`.
async fn canned_upstream(response: &'static [u8]) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let _ = s.write_all(response).await;
            });
        }
    });
    addr
}

/// A GET through a proxy whose upstream listener goes to `addr`.
async fn get_through_a_proxy_to(
    addr: std::net::SocketAddr,
) -> http::Response<hyper::body::Incoming> {
    let proxy = support::start_to(addr).await;
    client::http1()
        .request(
            Request::get(format!("http://{}/", proxy.upstream()))
                .body(client::empty())
                .unwrap(),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn an_upstreams_own_proxy_error_field_is_not_taken_for_the_proxys() {
    // A server outside the mesh answers with the field the proxies use to tell
    // their own answers from the app's.
    let addr = canned_upstream(b"HTTP/1.1 503 Service Unavailable\r\nstrait-proxy-error: connection refused\r\ncontent-length: 0\r\n\r\n").await;
    let rsp = get_through_a_proxy_to(addr).await;
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        rsp.headers().get("strait-proxy-error").is_none(),
        "{:?}",
        rsp.headers()
    );
}

/// A response head larger than a request's may be could not cross the
/// HTTP/2 hop between proxies (refused there, and past about 112 KB the
/// whole connection with every stream on it): it is a 502 that says why,
/// where the app's head was read; one of 60 KB still passes.
#[tokio::test]
async fn a_response_head_over_the_limit_is_a_502_that_says_so() {
    let head = |kib: usize| -> &'static [u8] {
        format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok",
            "a".repeat(kib * 1024)
        )
        .leak()
        .as_bytes()
    };
    let rsp = get_through_a_proxy_to(canned_upstream(head(100)).await).await;
    assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
    let reason = rsp.headers()["strait-proxy-error"].to_str().unwrap();
    assert!(reason.contains("response head over 64 KiB"), "{reason}");
    let fits = head(60);
    let rsp = get_through_a_proxy_to(canned_upstream(fits).await).await;
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(rsp.headers()["x-big"].len(), 60 * 1024);
}

/// A response framed both ways is read as chunked (RFC 9112 §6.3), as a
/// client without the proxy reads it: its Content-Length, which no longer
/// says anything, must not go on to frame what the proxy sends.
#[tokio::test]
async fn a_chunked_response_that_also_gives_a_length_arrives_whole() {
    let addr = canned_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let rsp = get_through_a_proxy_to(addr).await;
    assert_eq!(rsp.status(), StatusCode::OK);
    let body = rsp.into_body().collect().await.map(|b| b.to_bytes());
    assert_eq!(body.ok().as_deref(), Some(&b"hello world"[..]));
}

/// CONNECT over HTTP/2 (RFC 9113 §8.5; `curl --proxy-http2`, an egress
/// proxy reached over HTTP/2): the stream becomes the tunnel, as HTTP/1.1's
/// connection does.
#[tokio::test]
async fn an_http2_connect_tunnel_passes_through() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    client::h2_connect_echoes(proxy.upstream()).await;
}

/// A quiet HTTP/2 CONNECT tunnel is not an idle connection: past the HTTP
/// idle timeout (and the grace the GOAWAY leaves) it still carries bytes, as
/// an HTTP/1.1 one does, until the opaque-stream idle timeout.
#[tokio::test]
async fn a_quiet_http2_connect_tunnel_outlives_the_http_idle_timeout() {
    let backend = Backend::start().await;
    let mut c = support::with_upstream(support::config(), backend.addr);
    c.http_idle_timeout = Duration::from_millis(300);
    c.http_header_read_timeout = Duration::from_millis(300);
    let proxy = support::start(c).await;
    let mut tunnel = client::h2_connect(proxy.upstream()).await;
    client::tunnel_echoes(&mut tunnel, b"before").await;
    // Quiet for five idle timeouts: the time this test is about.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client::tunnel_echoes(&mut tunnel, b"after").await;
}

/// An HTTP/2 upstream that refuses a stream (over its concurrent-stream
/// limit: grpc-go's `MaxConcurrentStreams`) did not process the request
/// (RFC 9113 §8.7): a 503 that says so, safe to send again, and nothing
/// against the endpoint; not a 502 "failed mid-request".
#[tokio::test]
async fn a_stream_the_upstream_refused_is_said_not_processed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    let proxy = support::start_to(addr).await;
    let rsp = client::http2()
        .request(
            Request::get(format!("http://{}/", proxy.upstream()))
                .body(client::body(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let reason = rsp.headers()["strait-proxy-error"].to_str().unwrap();
    assert!(
        reason.contains("refused the stream (not processed)"),
        "{reason}"
    );
}

/// The proxy's own answers are counted apart from the upstream's, by why:
/// a refused connect is `connect`, an app's 500 is no proxy error.
#[tokio::test]
async fn the_proxys_own_errors_are_counted_by_reason() {
    let gone = support::refused_addr();
    let proxy = support::start_to(gone).await;
    let c = client::http1();
    let (status, _) = client::get(&c, &format!("http://{}/", proxy.upstream()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        support::outbound_proxy_errors(&proxy, "connect"),
        Some(1.0),
        "{}",
        proxy.metrics_text()
    );

    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let (status, _) = client::get(&c, &format!("http://{}/status/500", proxy.upstream()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let m = proxy.metrics_text();
    assert!(
        !m.contains("strait_proxy_http_proxy_errors_total{"),
        "the app's answer is not the proxy's: {m}"
    );
}

/// Connections a burst opened to an upstream are all kept for the next
/// burst: a cap on idle ones closed those above it (the proxy left holding
/// their TIME_WAIT) only to open them again.
#[tokio::test]
async fn a_burst_s_connections_are_all_reused_by_the_next() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let url = format!("http://{}/slow/300", proxy.upstream());
    let burst = || async {
        let c = client::http1();
        let all = (0..80).map(|_| {
            let (c, url) = (c.clone(), url.clone());
            async move { client::get(&c, &url).await.unwrap().0 }
        });
        for status in futures_util::future::join_all(all).await {
            assert_eq!(status, StatusCode::OK);
        }
    };
    burst().await;
    let first = backend.connections();
    assert!(first >= 70, "the burst ran at once: {first} connections");
    burst().await;
    assert_eq!(backend.connections(), first, "the second burst reused them");
}

/// The proxy's own answer to a HEAD has no content (RFC 9110 §9.3.2), over
/// HTTP/2 too: DATA on a HEAD stream is malformed, the caller's HTTP/2 stack
/// resets the stream, and a calling proxy whose connection to a peer counts
/// 1,024 such resets tears that connection down with everything on it.
#[tokio::test]
async fn the_proxys_own_answer_to_a_head_has_no_body() {
    let gone = support::refused_addr();
    let proxy = support::start_to(gone).await;
    for c in [client::http1(), client::http2()] {
        let req = Request::head(format!("http://{}/", proxy.upstream()))
            .body(client::body(Bytes::new()))
            .unwrap();
        let rsp = c.request(req).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
        assert!(rsp.headers().contains_key("strait-proxy-error"));
        // The length a GET's answer would have had, as HEAD gives it.
        let length = &rsp.headers()[http::header::CONTENT_LENGTH];
        assert_ne!(length, "0", "{:?}", rsp.headers());
        let body = rsp.into_body().collect().await.map(|b| b.to_bytes());
        assert!(body.as_ref().is_ok_and(Bytes::is_empty), "{body:?}");
    }
}

/// An app's HTTP/2 client holding a thousand long-lived calls open on its one
/// connection to the proxy (watches, subscriptions) can still make another:
/// the proxy lets the app open as many streams as it may have requests in
/// flight, where a limit of 1,000 would have the app's client queue every
/// call after, unanswered, as gRPC clients do at the limit a server sets.
#[tokio::test]
async fn an_app_holding_a_thousand_streams_can_open_another() {
    const HELD: usize = 1000;
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let c = client::http2();
    let url = format!("http://{}", proxy.upstream());
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..HELD {
        let (c, url) = (c.clone(), url.clone());
        held.spawn(async move { client::get(&c, &format!("{url}/hold")).await });
    }
    strait_tests::wait::until(
        "every call held at the app",
        Duration::from_secs(20),
        || async { backend.in_flight() == HELD },
    )
    .await;
    let another = tokio::time::timeout(
        Duration::from_secs(5),
        client::get(&c, &format!("{url}/status/202")),
    )
    .await
    .expect("a call past 1,000 open streams is answered")
    .unwrap();
    assert_eq!(another.0, StatusCode::ACCEPTED);
    backend.release_held();
    while let Some(done) = held.join_next().await {
        assert_eq!(done.unwrap().unwrap().0, StatusCode::OK);
    }
}
