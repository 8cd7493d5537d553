//! HTTP/1 framing the way RFC 9110/9112 require, through the built binary:
//! every refusal is a 400 (or 408) in strait's words, the app never sees the
//! request, and a client's own faults are never blamed on the upstream.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use strait_tests::backend::Backend;
use strait_tests::process::{Proc, free_port};
use strait_tests::wait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Binary {
    _proc: Proc,
    upstream: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
}

/// The real proxy: `--upstream` to `backend`, an inbound listener, and the
/// given extra flags.
async fn binary(backend: SocketAddr, extra: &[&str]) -> Binary {
    let (admin, upstream, inbound) = (free_port(), free_port(), free_port());
    let mut args = vec![
        format!("--admin-addr=127.0.0.1:{admin}"),
        format!("--inbound-addr=127.0.0.1:{inbound}"),
        "--outbound-addr=127.0.0.1:0".into(),
        format!("--upstream=127.0.0.1:{upstream}={backend}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let proc = Proc::spawn("strait-proxy", &args, &[("STRAIT_PROXY_LOG_LEVEL", "warn")]);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    wait::ready(admin, Duration::from_secs(20)).await;
    Binary {
        _proc: proc,
        upstream: SocketAddr::from(([127, 0, 0, 1], upstream)),
        inbound: SocketAddr::from(([127, 0, 0, 1], inbound)),
        admin,
    }
}

/// Sends raw bytes; returns all the proxy answers before it closes (or 10 s).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(rsp: &str) -> &str {
    rsp.get(9..12).unwrap_or("")
}

fn header<'a>(rsp: &'a str, name: &str) -> Option<&'a str> {
    rsp.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn host_rules_bare_lf_and_connection_listing_host() {
    let backend = Backend::start().await;
    let p = binary(backend.addr, &[]).await;
    let cases: [(&[u8], &str, &str); 3] = [
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "400",
            "more than one Host header",
        ),
        (
            b"GET / HTTP/1.1\r\n\r\n",
            "400",
            "HTTP/1.1 request without a Host header",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\nx-split: b\r\n\r\n",
            "400",
            "request head lines must end in CRLF",
        ),
    ];
    for (req, status, reason) in cases {
        let rsp = raw(p.upstream, req).await;
        assert_eq!(status_of(&rsp), status, "{rsp}");
        assert_eq!(header(&rsp, "strait-proxy-error"), Some(reason), "{rsp}");
    }
    assert_eq!(backend.requests(), 0, "nothing refused reached the app");

    // Absolute form: the target's authority wins over Host (RFC 9112 §3.2.2).
    let rsp = raw(
        p.upstream,
        b"GET http://right.example:8080/ HTTP/1.1\r\nHost: wrong.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&rsp), "200", "{rsp}");
    assert_eq!(header(&rsp, "x-seen-host"), Some("right.example:8080"));
    // `Connection: host` names a field no hop may drop.
    let rsp = raw(
        p.upstream,
        b"GET / HTTP/1.1\r\nHost: kept.example\r\nConnection: host, close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&rsp), "200", "{rsp}");
    assert_eq!(header(&rsp, "x-seen-host"), Some("kept.example"));
    // HTTP/1.0 needs no Host.
    let rsp = raw(p.upstream, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(status_of(&rsp), "200", "{rsp}");
}

#[tokio::test]
async fn a_clients_bad_chunking_is_a_400_not_a_502() {
    let backend = Backend::start().await;
    let p = binary(backend.addr, &[]).await;
    for chunk in ["zz", "-5", "fffffffffffffffffffff", "5\r\nabc\r\n0"] {
        let req = format!(
            "POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}\r\n\r\n"
        );
        let rsp = raw(p.upstream, req.as_bytes()).await;
        assert_eq!(status_of(&rsp), "400", "chunk {chunk:?}: {rsp}");
        let reason = header(&rsp, "strait-proxy-error").unwrap_or_default();
        assert!(
            reason.contains("request body from the client was malformed"),
            "chunk {chunk:?}: {rsp}"
        );
    }
    let (_, metrics) = wait::admin_get(p.admin, "/metrics").await.unwrap();
    assert!(
        !metrics.contains("status_class=\"5xx\""),
        "no 5xx counted: {metrics}"
    );
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_with_408() {
    let backend = Backend::start().await;
    let p = binary(backend.addr, &["--http-body-read-timeout=1s"]).await;
    let started = Instant::now();
    let rsp = raw(
        p.upstream,
        b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab",
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status_of(&rsp), "408", "{rsp}");
    assert!(
        header(&rsp, "strait-proxy-error").is_some_and(|r| r.contains("stalled")),
        "{rsp}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(8),
        "{took:?}"
    );
    // A slow body that keeps moving is not cut.
    let mut s = TcpStream::connect(p.upstream).await.unwrap();
    s.write_all(
        b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    for b in [b"a", b"b", b"c", b"d"] {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(b).await.unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let rsp = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&rsp), "200", "{rsp}");
    assert!(rsp.ends_with("\r\n\r\n4"), "{rsp}");
}

#[tokio::test]
async fn target_ports_must_be_one_plain_number_and_never_a_proxys() {
    let backend = Backend::start().await;
    let p = binary(backend.addr, &[]).await;
    let port = backend.addr.port();
    let ask = |headers: String| {
        format!("GET / HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n")
    };
    let ok = raw(
        p.inbound,
        ask(format!("strait-target-port: {port}\r\n")).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&ok), "200", "{ok}");
    for (headers, status) in [
        (format!("strait-target-port: +{port}\r\n"), "400"),
        (
            format!("strait-target-port: {port}\r\nstrait-target-port: {port}\r\n"),
            "400",
        ),
        (format!("strait-target-port: {}\r\n", p.admin.port()), "400"),
        ("strait-target-port: 4191\r\n".to_string(), "403"),
    ] {
        let rsp = raw(p.inbound, ask(headers.clone()).as_bytes()).await;
        assert_eq!(status_of(&rsp), status, "{headers:?}: {rsp}");
    }
    assert_eq!(backend.requests(), 1);
}

/// A proxy in front of `backend` logging at info, its output kept: its
/// admin and upstream addresses, once ready.
async fn logging_at_info(backend: &Backend) -> (tokio::process::Child, SocketAddr, SocketAddr) {
    let (admin, upstream) = (free_port(), free_port());
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait-proxy"))
        .args([
            format!("--admin-addr=127.0.0.1:{admin}"),
            "--inbound-addr=127.0.0.1:0".into(),
            "--outbound-addr=127.0.0.1:0".into(),
            format!("--upstream=127.0.0.1:{upstream}={}", backend.addr),
            "--log-level=info".into(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    wait::ready(admin, Duration::from_secs(20)).await;
    (child, admin, SocketAddr::from(([127, 0, 0, 1], upstream)))
}

#[tokio::test]
async fn a_flood_of_junk_is_counted_in_full_and_logged_as_a_sample() {
    let backend = Backend::start().await;
    let (mut child, admin, upstream) = logging_at_info(&backend).await;
    const JUNK: usize = 200;
    for _ in 0..JUNK {
        let rsp = raw(upstream, b"GET / HTTP/1.1\nHost: a\n\n").await;
        assert_eq!(status_of(&rsp), "400", "{rsp}");
    }
    let (_, metrics) = wait::admin_get(admin, "/metrics").await.unwrap();
    let counted = metrics
        .lines()
        .find(|l| {
            l.starts_with("strait_proxy_http_rejected_requests_total") && l.contains("bare_lf")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(counted, Some(JUNK as f64), "{metrics}");
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    let lines = log
        .lines()
        .filter(|l| l.contains("refused request"))
        .count();
    assert!(
        (1..=10).contains(&lines),
        "{lines} log lines for {JUNK} junk requests:\n{log}"
    );
}

/// h2 logs a warning for every PING acknowledgement it never asked for,
/// and keeps the connection: 17 bytes each, a stranger's stream of them
/// would be a log line each. Other crates' lines are sampled as strait's
/// own are.
#[tokio::test]
async fn a_flood_of_unasked_ping_acks_is_logged_as_a_sample() {
    let backend = Backend::start().await;
    let (mut child, _, upstream) = logging_at_info(&backend).await;
    let mut s = TcpStream::connect(upstream).await.unwrap();
    // The preface, an empty SETTINGS, the acknowledgements, then a PING of
    // our own: its answer comes once every frame before it was read.
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    const ACKS: usize = 1000;
    for _ in 0..ACKS {
        bytes.extend_from_slice(b"\0\0\x08\x06\x01\0\0\0\0\0\0\0\0\0\0\0\0");
    }
    bytes.extend_from_slice(b"\0\0\x08\x06\0\0\0\0\0strait!!");
    s.write_all(&bytes).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).await.unwrap();
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0; len];
            s.read_exact(&mut payload).await.unwrap();
            if head[3] == 6 && head[4] & 1 == 1 && payload == b"strait!!" {
                return;
            }
        }
    })
    .await;
    assert!(answered.is_ok(), "our PING was not answered");
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let lines = log.lines().filter(|l| l.contains("PING ack")).count();
    assert!(
        (1..=10).contains(&lines),
        "{lines} log lines for {ACKS} unasked PING acknowledgements"
    );
}

/// A transfer coding other than chunked (`gzip, chunked`) is one hyper does
/// not decode, and Transfer-Encoding is not sent on: the next hop would read
/// the gzip bytes as the body. A request with one is answered 501 (RFC 9112
/// §6.1) and never reaches the app; a response with one is a 502, both ways
/// of the pair (from an app behind the inbound side, and from an upstream).
#[tokio::test]
async fn transfer_codings_other_than_chunked_are_not_passed_on_undecoded() {
    let backend = Backend::start().await;
    let proxy = binary(backend.addr, &[]).await;
    // (One not ending in chunked, hyper refuses with 400 itself.)
    for coding in ["gzip, chunked", "chunked, chunked"] {
        let req = format!(
            "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {coding}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let rsp = raw(proxy.upstream, req.as_bytes()).await;
        assert_eq!(status_of(&rsp), "501", "{coding}: {rsp}");
        assert!(
            header(&rsp, "strait-proxy-error").is_some_and(|e| e.contains("transfer coding")),
            "{rsp}"
        );
    }
    assert_eq!(backend.requests(), 0, "nothing reached the app");
    // Chunked alone is read and sent on.
    let rsp = raw(
        proxy.upstream,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&rsp), "200", "{rsp}");

    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read_exact(&mut b).await.is_ok() {
                    head.push(b[0]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
                    .await;
            });
        }
    });
    let proxy = binary(app_addr, &[]).await;
    let ask = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nstrait-target-port: {}\r\nConnection: close\r\n\r\n",
        app_addr.port()
    );
    for to in [proxy.upstream, proxy.inbound] {
        let rsp = raw(to, ask.as_bytes()).await;
        assert_eq!(status_of(&rsp), "502", "{to}: {rsp}");
        assert!(!rsp.contains("hello"), "{rsp}");
    }
}
