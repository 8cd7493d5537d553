//! What the proxy refuses, and how: every rejection is a clear status, never a
//! crash, and nothing malformed reaches the app.

use std::time::Duration;

use strait_tests::backend::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, metric};

/// Sends raw bytes and returns everything the proxy answers before closing (or 5 s).
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(rsp: &str) -> &str {
    rsp.get(9..12).unwrap_or("")
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_431() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let mut many = String::from("GET / HTTP/1.1\r\nhost: a\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let rsp = raw(proxy.upstream(), many.as_bytes()).await;
    assert_eq!(status_of(&rsp), "431", "{rsp}");

    let big = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let rsp = raw(proxy.upstream(), big.as_bytes()).await;
    assert_eq!(status_of(&rsp), "431", "{rsp}");
    assert_eq!(backend.requests(), 0, "nothing reached the app");
    let m = proxy.metrics_text();
    assert_eq!(
        metric(
            &m,
            "strait_proxy_http_rejected_requests_total{direction=\"outbound\",reason=\"headers_too_large\"}"
        ),
        Some(2.0),
        "{m}"
    );
}

#[tokio::test]
async fn request_smuggling_is_refused_with_400() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    // Both framings: a downstream that honours Content-Length would see "GET /smuggled".
    let rsp = raw(
        proxy.upstream(),
        b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&rsp), "400", "{rsp}");
    assert!(
        rsp.contains("conflicting Content-Length and Transfer-Encoding"),
        "{rsp}"
    );
    assert_eq!(
        rsp.matches("HTTP/1.1 ").count(),
        1,
        "the smuggled request is not served: {rsp}"
    );

    // Two different Content-Lengths.
    let rsp = raw(
        proxy.upstream(),
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nabcde",
    )
    .await;
    assert_eq!(status_of(&rsp), "400", "{rsp}");

    // Obsolete line folding.
    let rsp = raw(
        proxy.upstream(),
        b"GET / HTTP/1.1\r\nhost: a\r\nx-folded: one\r\n two\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&rsp), "400", "{rsp}");
    assert_eq!(backend.requests(), 0, "nothing reached the app");

    // Not only the first request of a keep-alive connection is checked.
    let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut first = Vec::new();
    while !String::from_utf8_lossy(&first).ends_with("\r\n\r\nok") {
        let mut b = [0u8; 256];
        let n = s.read(&mut b).await.unwrap();
        assert!(n > 0, "connection closed after the first request");
        first.extend_from_slice(&b[..n]);
    }
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let rsp = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&rsp), "400", "{rsp}");
    assert_eq!(
        backend.requests(),
        1,
        "only the clean request reached the app"
    );
}

#[tokio::test]
async fn a_stalled_request_head_gets_408() {
    let backend = Backend::start().await;
    let mut c = support::with_upstream(support::config(), backend.addr);
    c.http_header_read_timeout = Duration::from_millis(300);
    let proxy = support::start(c).await;
    let start = std::time::Instant::now();
    let rsp = raw(proxy.upstream(), b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: ").await;
    assert_eq!(status_of(&rsp), "408", "{rsp}");
    assert!(start.elapsed() < Duration::from_secs(3));
    let m = proxy.metrics_text();
    assert_eq!(
        metric(
            &m,
            "strait_proxy_http_rejected_requests_total{direction=\"outbound\",reason=\"header_timeout\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

/// A client that dials the inbound port itself and says nothing has no app a
/// stream could go to: it is closed after the head's timeout, not left to
/// hold its place for the hour an opaque stream may idle.
#[tokio::test]
async fn a_silent_client_with_nowhere_to_go_is_closed_after_the_head_timeout() {
    let mut c = support::config();
    c.http_header_read_timeout = Duration::from_millis(500);
    let proxy = support::start(c).await;
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(proxy.addrs.inbound).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut [0u8; 1])).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed rather than held: {read:?}"
    );
    assert!(start.elapsed() >= Duration::from_millis(500));
}

/// A port check of the inbound port (connect, close) is no refused stream.
#[tokio::test]
async fn a_client_gone_without_a_word_is_not_counted_refused() {
    let proxy = support::start(support::config()).await;
    let opaque = |t: &str| {
        metric(
            t,
            "strait_proxy_protocol_detected_connections_total{direction=\"inbound\",protocol=\"opaque\"}",
        )
        .unwrap_or(0.0)
    };
    drop(TcpStream::connect(proxy.addrs.inbound).await.unwrap());
    strait_tests::wait::until("the connection settled", Duration::from_secs(5), || async {
        opaque(&proxy.metrics_text()) >= 1.0
    })
    .await;
    let text = proxy.metrics_text();
    assert!(!text.contains("no_target_port"), "{text}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_quietly() {
    let backend = Backend::start().await;
    let mut c = support::with_upstream(support::config(), backend.addr);
    c.http_idle_timeout = Duration::from_millis(300);
    let proxy = support::start(c).await;
    let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("closed after the idle timeout")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(
        out.matches("HTTP/1.1 ").count(),
        1,
        "one response, then a quiet close: {out}"
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test]
async fn connections_beyond_the_cap_get_503() {
    let backend = Backend::start().await;
    let mut c = support::with_upstream(support::config(), backend.addr);
    c.max_connections = Some(2);
    let proxy = support::start(c).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    let rsp = raw(proxy.upstream(), b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(status_of(&rsp), "503", "{rsp}");
    assert!(rsp.contains("connection limit reached"), "{rsp}");
    drop(held);
    // Capacity comes back once connections close.
    let c = strait_tests::client::http1();
    strait_tests::wait::until("a free connection slot", Duration::from_secs(5), || {
        let c = c.clone();
        let url = format!("http://{}/", proxy.upstream());
        async move { matches!(strait_tests::client::get(&c, &url).await, Ok((s, _)) if s == 200) }
    })
    .await;
}

#[tokio::test]
async fn an_upgraded_connection_keeps_its_place_under_the_cap() {
    let backend = Backend::start().await;
    let mut c = support::with_upstream(support::config(), backend.addr);
    c.max_connections = Some(1);
    let proxy = support::start(c).await;
    // A CONNECT tunnel: hyper hands the stream over and is done with it.
    let mut tunnel = TcpStream::connect(proxy.upstream()).await.unwrap();
    tunnel
        .write_all(b"CONNECT example.test:443 HTTP/1.1\r\nhost: example.test:443\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tunnel.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tunnel.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tunnel.read_exact(&mut echoed).await.unwrap();
    // The tunnel is still a connection: no room for another.
    let rsp = raw(proxy.upstream(), b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(status_of(&rsp), "503", "{rsp}");
    let m = proxy.metrics_text();
    assert_eq!(
        support::metric(
            &m,
            "strait_proxy_tcp_open_connections{direction=\"outbound\"}"
        ),
        Some(1.0),
        "{m}"
    );
    // Closed, it frees its place.
    drop(tunnel);
    let c = strait_tests::client::http1();
    strait_tests::wait::until("the tunnel's slot", Duration::from_secs(5), || {
        let c = c.clone();
        let url = format!("http://{}/", proxy.upstream());
        async move { matches!(strait_tests::client::get(&c, &url).await, Ok((s, _)) if s == 200) }
    })
    .await;
}

/// HTTP/2 frames, written by hand: this is the attacker's side.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn http2_rapid_reset_closes_the_connection() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    // HPACK: :method GET, :scheme http, :path /slow/1000, :authority a.
    let mut headers = vec![0x82, 0x86, 0x44, 10];
    headers.extend_from_slice(b"/slow/1000");
    headers.extend_from_slice(&[0x41, 1, b'a']);
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        out.extend(frame(0x1, 0x5, id, &headers)); // HEADERS, END_STREAM|END_HEADERS
        out.extend(frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    // The proxy may close before we finish writing; that is the point.
    let _ = s.write_all(&out).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the proxy closed the connection");
    // Find a GOAWAY frame (type 7) among the frames the proxy sent.
    let mut i = 0;
    let mut goaway = None;
    while i + 9 <= got.len() {
        let len = ((got[i] as usize) << 16) | ((got[i + 1] as usize) << 8) | got[i + 2] as usize;
        if got[i + 3] == 0x7 && i + 9 + 8 <= got.len() {
            let code = u32::from_be_bytes([got[i + 13], got[i + 14], got[i + 15], got[i + 16]]);
            goaway = Some(code);
        }
        i += 9 + len;
    }
    // ENHANCE_YOUR_CALM (0xb): too many resets.
    assert_eq!(goaway, Some(0xb), "GOAWAY with ENHANCE_YOUR_CALM");
    assert!(
        backend.requests() < 2000,
        "the flood did not all reach the app"
    );
}

/// An HTTP/2 client that opens its flow-control windows wide and then reads
/// nothing is cut once the proxy's writes make no progress for the body
/// timeout, as an HTTP/1 one is: it would otherwise hold its connection, and
/// up to 64 KiB of answer per stream, for as long as it likes (sending a byte
/// now and then keeps HTTP/2's pings from noticing).
#[tokio::test]
async fn an_http2_client_that_reads_nothing_is_cut() {
    const BODY: usize = 64 << 20;
    let backend = Backend::start().await;
    let mut c = support::with_upstream(support::config(), backend.addr);
    c.http_body_read_timeout = Duration::from_secs(1);
    let proxy = support::start(c).await;
    let mut s = TcpStream::connect(proxy.upstream()).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE 2^31-1, and the connection's window as wide.
    let mut settings = 4u16.to_be_bytes().to_vec();
    settings.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    out.extend(frame(0x4, 0, 0, &settings));
    out.extend(frame(0x8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()));
    // HPACK: :method GET, :scheme http, :path /bytes/<BODY>, :authority a.
    let path = format!("/bytes/{BODY}");
    let mut headers = vec![0x82, 0x86, 0x44, path.len() as u8];
    headers.extend_from_slice(path.as_bytes());
    headers.extend_from_slice(&[0x41, 1, b'a']);
    out.extend(frame(0x1, 0x5, 1, &headers));
    s.write_all(&out).await.unwrap();
    // Reads nothing for three body timeouts: the time this test is about.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "still connected after reading {got} bytes: the stalled client was not cut"
    );
    assert!(got < BODY, "the whole answer arrived: {got} bytes");
}

/// Requests past `--max-in-flight-requests` are answered 503 at once, named
/// as the proxy's own answer and counted; once those in flight end, requests
/// go through again.
#[tokio::test]
async fn requests_past_the_in_flight_cap_are_shed_with_503() {
    let backend = Backend::start().await;
    let mut c = support::with_upstream(support::config(), backend.addr);
    c.max_in_flight_requests = 2;
    let proxy = support::start(c).await;
    let base = format!("http://{}", proxy.upstream());
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = format!("{base}/slow/1500");
            tokio::spawn(async move {
                strait_tests::client::get(&strait_tests::client::http1(), &url).await
            })
        })
        .collect();
    strait_tests::wait::until("2 requests in flight", Duration::from_secs(10), || async {
        backend.in_flight() == 2
    })
    .await;
    let c = strait_tests::client::http1();
    let rsp = c.get(format!("{base}/1k").parse().unwrap()).await.unwrap();
    assert_eq!(rsp.status(), 503);
    assert_eq!(
        rsp.headers()["strait-proxy-error"],
        "too many requests in flight (not processed)"
    );
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().0, 200, "those in flight finish");
    }
    let (status, _) = strait_tests::client::get(&c, &format!("{base}/1k"))
        .await
        .unwrap();
    assert_eq!(status, 200, "room again once they ended");
    assert_eq!(
        metric(
            &proxy.metrics_text(),
            "strait_proxy_http_rejected_requests_total{direction=\"outbound\",reason=\"in_flight_limit\"}"
        ),
        Some(1.0)
    );
}
