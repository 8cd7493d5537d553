//! The built `strait-proxy` binary as a separate process: flags, readiness,
//! traffic, bounded memory on a large streamed body, and SIGTERM.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use strait_tests::backend::Backend;
use strait_tests::process::{Proc, free_port};
use strait_tests::{client, wait};

fn bin() -> &'static str {
    "strait-proxy"
}

#[tokio::test]
async fn a_bad_flag_exits_non_zero_naming_it() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait-proxy"))
        .args(["--outbound-addr", "not-an-address"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--outbound-addr"), "{err}");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait-proxy"))
        .env("STRAIT_PROXY_SHUTDOWN_GRACE_PERIOD", "soon")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--shutdown-grace-period"), "{err}");
}

#[tokio::test]
async fn bad_values_exit_2_with_one_line_and_no_backtrace() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait-proxy"))
        .args(["--admin-addr=127.0.0.1:0", "--inbound-addr=127.0.0.1:0"])
        .args(["--outbound-addr=127.0.0.1:0", "--control-plane=notaurl"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--control-plane") && !err.contains("backtrace"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Values that can only misbehave, named with what they clash with.
    for (args, says) in [
        (
            vec![
                "--upstream=127.0.0.1:4140=127.0.0.1:80",
                "--outbound-addr=127.0.0.1:4140",
            ],
            "--outbound-addr (127.0.0.1:4140) and --upstream 127.0.0.1:4140=127.0.0.1:80 (127.0.0.1:4140) claim the same address",
        ),
        (vec!["--max-connections=0"], "--max-connections 0"),
        // A semaphore's permits: past 2^61 they panicked at start.
        (
            vec!["--max-connections=2305843009213693952"],
            "--max-connections 2305843009213693952: give at most 10000000",
        ),
        (
            vec!["--max-in-flight-requests=10000001"],
            "--max-in-flight-requests 10000001: give at most",
        ),
        // More watches than the one connection to the controller carries.
        (
            vec!["--max-discovery-watches=2001"],
            "--max-discovery-watches 2001: each watch is a stream",
        ),
        // No port: 80 would be dialled, where no controller listens.
        (
            vec!["--control-plane=http://127.0.0.1"],
            "expected https://HOST:PORT (the controller's gRPC port, 8090)",
        ),
        (
            vec!["--inbound-max-connections-per-source=0"],
            "--inbound-max-connections-per-source 0",
        ),
        (
            vec![
                "--trust-anchors=/dev/null",
                "--token-file=/dev/null",
                "--control-plane=https://127.0.0.1:1",
            ],
            "--trust-anchors /dev/null: expected PEM certificates",
        ),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait-proxy"))
            .args(["--admin-addr=127.0.0.1:0", "--inbound-addr=127.0.0.1:0"])
            // Each is refused before anything binds.
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }

    // The init container's ports: never 0, never one port for both; no
    // blank log filter.
    for (args, says) in [
        (
            vec!["init", "--dry-run", "--inbound-port=0"],
            "--inbound-port",
        ),
        (
            vec!["init", "--dry-run", "--inbound-port=4140"],
            "--inbound-port and --outbound-port are both 4140",
        ),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait-proxy"))
            .args(&args)
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }

    // A port taken by another process is not a flag error, and still one line.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait-proxy"))
        .args(["--admin-addr=127.0.0.1:0", "--outbound-addr=127.0.0.1:0"])
        .arg(format!("--inbound-addr={}", taken.local_addr().unwrap()))
        .env("RUST_BACKTRACE", "1")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot listen") && !err.contains("backtrace"),
        "{err}"
    );
}

#[tokio::test]
async fn identity_flags_are_checked_before_anything_is_sent() {
    let pki = strait_tests::pki::Pki::new();
    let tokens = strait_tests::manifests::ManifestDir::new();
    let token = strait_tests::pki::token_file(tokens.path(), "web", "t");
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait-proxy"))
            .args(["--admin-addr=127.0.0.1:0", "--inbound-addr=127.0.0.1:0"])
            .args(["--outbound-addr=127.0.0.1:0"])
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let anchors = format!("--trust-anchors={}", pki.anchors().display());
    let token = format!("--token-file={}", token.display());
    // The token would travel in the clear.
    let err = run(vec![
        anchors.clone(),
        token.clone(),
        "--control-plane=http://127.0.0.1:8090".into(),
    ])
    .await;
    assert!(err.contains("must be https://"), "{err}");
    // Nothing to verify the controller with.
    let err = run(vec!["--control-plane=https://127.0.0.1:8090".into()]).await;
    assert!(err.contains("needs --trust-anchors"), "{err}");
    let err = run(vec![anchors.clone(), token.clone()]).await;
    assert!(err.contains("--control-plane"), "{err}");
    let err = run(vec![
        anchors,
        token,
        "--control-plane=https://127.0.0.1:8090".into(),
        "--control-plane-identity=not-spiffe".into(),
    ])
    .await;
    assert!(err.contains("--control-plane-identity"), "{err}");
    let err = run(vec![
        "--trust-anchors=/nonexistent/anchors.pem".into(),
        "--control-plane=https://127.0.0.1:8090".into(),
        "--token-file=/nonexistent/token".into(),
    ])
    .await;
    assert!(err.contains("/nonexistent/anchors.pem"), "{err}");
}

#[tokio::test]
async fn the_binary_serves_upstream_traffic_and_stops_on_sigterm() {
    let backend = Backend::start().await;
    let (admin, local) = (free_port(), free_port());
    let args = vec![
        format!("--admin-addr=127.0.0.1:{admin}"),
        "--inbound-addr=127.0.0.1:0".into(),
        "--outbound-addr=127.0.0.1:0".into(),
        format!("--upstream=127.0.0.1:{local}={}", backend.addr),
        "--log-format=json".into(),
    ];
    let mut proxy = Proc::spawn(bin(), &args, &[("STRAIT_PROXY_LOG_LEVEL", "warn")]);
    let admin_addr = format!("127.0.0.1:{admin}").parse().unwrap();
    wait::ready(admin_addr, Duration::from_secs(20)).await;
    let (idle_hwm, _) = proxy.memory_kib();

    let c = client::http1();
    for _ in 0..50 {
        let (status, body) = client::get(&c, &format!("http://127.0.0.1:{local}/"))
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }

    // 1 GiB streamed through: the proxy's memory stays flat.
    const CHUNK: usize = 256 * 1024;
    const TOTAL: usize = 1 << 30;
    let chunk = Bytes::from(vec![b'z'; CHUNK]);
    let chunks = futures_util::stream::iter(
        (0..TOTAL / CHUNK)
            .map(move |_| Ok::<_, strait_tests::BoxError>(Frame::data(chunk.clone()))),
    );
    let req = Request::post(format!("http://127.0.0.1:{local}/count"))
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap();
    let rsp = c.request(req).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let counted = rsp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(counted, TOTAL.to_string().as_bytes());
    let (peak_hwm, _) = proxy.memory_kib();
    eprintln!("strait-proxy RSS peak: idle {idle_hwm} KiB, after 1 GiB upload {peak_hwm} KiB");
    assert!(
        peak_hwm < idle_hwm + 32 * 1024,
        "1 GiB upload grew the proxy from {idle_hwm} KiB to {peak_hwm} KiB"
    );

    proxy.sigterm().await;
    let status = tokio::time::timeout(Duration::from_secs(10), proxy.child.wait())
        .await
        .expect("exits promptly after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        tokio::net::TcpStream::connect(format!("127.0.0.1:{local}"))
            .await
            .is_err()
    );
}

/// A proxy whose admin server is bound off loopback, as in a pod for the
/// kubelet's probes, at info level: it and the admin address from loopback
/// and from another address of this host. None, said why, without one.
async fn admin_off_loopback() -> Option<(Proc, std::net::SocketAddr, std::net::SocketAddr)> {
    let Some(ip) = strait_tests::host::non_loopback_ip() else {
        strait_tests::host::missing("an address that is not loopback (or root to add one)");
        return None;
    };
    let port = free_port();
    let args = vec![
        format!("--admin-addr=0.0.0.0:{port}"),
        "--inbound-addr=127.0.0.1:0".into(),
        "--outbound-addr=127.0.0.1:0".into(),
        "--log-level=info".into(),
    ];
    let proxy = Proc::spawn(bin(), &args, &[]);
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait::ready(local, Duration::from_secs(20)).await;
    Some((proxy, local, std::net::SocketAddr::new(ip, port)))
}

#[tokio::test]
async fn admin_state_changes_are_refused_from_the_network_and_reads_are_not() {
    let Some((_proxy, local, remote)) = admin_off_loopback().await else {
        return;
    };
    use strait_tests::wait::{admin_get, admin_request};
    for path in ["/live", "/ready", "/metrics", "/config", "/log-level"] {
        assert_eq!(admin_get(remote, path).await.unwrap().0, 200, "{path}");
    }
    // What the proxy knows of other services and of who may call it is
    // for the pod itself; its flags are for anyone.
    let (_, config) = admin_get(remote, "/config").await.unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["state"], "shown to loopback callers only",
        "{config}"
    );
    assert_eq!(config["log_level"], "info", "{config}");
    let (_, config) = admin_get(local, "/config").await.unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["state"]["inbound_policy"]["default"]["mtls"], "PERMISSIVE",
        "{config}"
    );
    let (status, body) = admin_request(remote, "PUT", "/log-level", "trace")
        .await
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (
            403,
            "changing the log level is accepted only from loopback\n"
        )
    );
    let (status, _) = admin_request(remote, "POST", "/shutdown", "")
        .await
        .unwrap();
    assert_eq!(status, 403);
    // Nothing changed: the level is as started, and the proxy still serves.
    assert_eq!(
        admin_get(local, "/log-level").await.unwrap(),
        (200, "info\n".into())
    );
    assert_eq!(admin_get(remote, "/ready").await.unwrap().0, 200);
    // The same requests from loopback are the pod's own business.
    let (status, _) = admin_request(local, "PUT", "/log-level", "debug")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        admin_get(remote, "/log-level").await.unwrap(),
        (200, "debug\n".into())
    );
    // The running configuration says so too.
    let (_, config) = admin_get(local, "/config").await.unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["log_level"], "debug", "{config}");
}

/// The kubelet's `tcpSocket` probes, pointed here by the injector, learn
/// whether the app listens: the probe of the port itself would reach the
/// proxy, which accepts either way. Only the listed ports are tried.
#[tokio::test]
async fn tcp_probes_say_whether_the_app_listens() {
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_port = app.local_addr().unwrap().port();
    let gone_port = free_port();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let args = vec![
        format!("--admin-addr={admin}"),
        "--inbound-addr=127.0.0.1:0".into(),
        "--outbound-addr=127.0.0.1:0".into(),
        format!("--tcp-probe-ports={app_port},{gone_port}"),
    ];
    let _proxy = Proc::spawn(bin(), &args, &[]);
    wait::ready(admin, Duration::from_secs(20)).await;
    use strait_tests::wait::admin_get;
    let probe = |port: u16| async move { admin_get(admin, &format!("/probe/tcp/{port}")).await };
    assert_eq!(probe(app_port).await.unwrap().0, 200);
    let timed = format!("/probe/tcp/{app_port}?timeout=5s");
    assert_eq!(admin_get(admin, &timed).await.unwrap().0, 200);
    let (status, body) = probe(gone_port).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("refused"), "{body}");
    // The app stops listening: the probe fails, as it would without a proxy.
    drop(app);
    assert_eq!(probe(app_port).await.unwrap().0, 503);
    // A port no probe declared is not tried.
    assert_eq!(probe(22).await.unwrap().0, 404);
    assert_eq!(admin_get(admin, "/probe/tcp/x").await.unwrap().0, 404);
}

/// Another pod cannot take every admin place: the kubelet's probes, of the
/// proxy and of the app's TCP ports, still get through.
#[tokio::test]
async fn one_address_holds_a_few_admin_connections_at_most() {
    use tokio::io::AsyncReadExt;
    let Some((_proxy, local, remote)) = admin_off_loopback().await else {
        return;
    };
    let mut held = Vec::new();
    for _ in 0..strait_proxy::admin::MAX_CONNECTIONS_PER_SOURCE {
        held.push(tokio::net::TcpStream::connect(remote).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(remote).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut [0u8; 1])).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a connection past the address's share: {read:?}"
    );
    // Loopback (the pod's own containers) is served meanwhile.
    assert_eq!(
        strait_tests::wait::admin_get(local, "/ready")
            .await
            .unwrap()
            .0,
        200
    );
    held.pop();
    strait_tests::wait::until("a place to free", Duration::from_secs(5), || async {
        matches!(
            strait_tests::wait::admin_get(remote, "/live").await,
            Ok((200, _))
        )
    })
    .await;
}

/// A proxy logging each request as JSON on its piped stdout, admin on
/// `admin`, serving `backend` on `local`, with one more flag.
fn access_logging(
    admin: u16,
    local: u16,
    backend: std::net::SocketAddr,
    flag: &str,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_strait-proxy"))
        .args([
            format!("--admin-addr=127.0.0.1:{admin}"),
            "--inbound-addr=127.0.0.1:0".into(),
            "--outbound-addr=127.0.0.1:0".into(),
            format!("--upstream=127.0.0.1:{local}={backend}"),
            "--access-log=json".into(),
            flag.into(),
            "--log-level=warn".into(),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// A request still open when the shutdown grace period ends is cut, and
/// still leaves its line: those are the requests a rollout's operator looks for.
#[tokio::test]
async fn a_request_cut_at_shutdown_leaves_its_access_log_line() {
    let backend = Backend::start().await;
    let (admin, local) = (free_port(), free_port());
    let mut child = access_logging(admin, local, backend.addr, "--shutdown-grace-period=1s");
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    wait::ready(admin, Duration::from_secs(20)).await;
    let held = tokio::spawn(async move {
        client::get(
            &client::http1(),
            &format!("http://127.0.0.1:{local}/slow/60000"),
        )
        .await
    });
    wait::until(
        "the slow request at the app",
        Duration::from_secs(10),
        || async { backend.in_flight() == 1 },
    )
    .await;
    let (status, _) = wait::admin_request(admin, "POST", "/shutdown", "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let mut out = String::new();
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(
        Duration::from_secs(10),
        child.stdout.take().unwrap().read_to_string(&mut out),
    )
    .await
    .expect("the proxy gone within 10 s")
    .unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["path"], "/slow/60000", "{out}");
    assert_eq!(lines[0]["status"], 0, "{out}");
    assert_eq!(lines[0]["proxy_error"], "cancelled", "{out}");
    assert!(held.await.unwrap().is_err(), "the cut request was answered");
}

#[tokio::test]
async fn the_access_log_has_a_json_line_per_request_with_its_trace() {
    let backend = Backend::start().await;
    let (admin, local) = (free_port(), free_port());
    // Nobody listens: spans are dropped, their trace ids still logged.
    let otlp = format!("--otlp-endpoint=http://127.0.0.1:{}", free_port());
    let mut child = access_logging(admin, local, backend.addr, &otlp);
    wait::ready(
        std::net::SocketAddr::from(([127, 0, 0, 1], admin)),
        Duration::from_secs(20),
    )
    .await;
    let c = client::http1();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let req = Request::get(format!("http://127.0.0.1:{local}/status/404"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .body(client::empty())
        .unwrap();
    assert_eq!(c.request(req).await.unwrap().status(), 404);
    let (status, _) = client::get(&c, &format!("http://127.0.0.1:{local}/x?q=1"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    // A client that gives up before the answer still leaves a line.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        client::get(
            &client::http1(),
            &format!("http://127.0.0.1:{local}/slow/10000"),
        ),
    )
    .await;
    assert!(gave_up.is_err(), "the slow answer came early");
    // A request the proxy refuses (its framing is ambiguous) leaves a line too.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", local))
            .await
            .unwrap();
        s.write_all(b"POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            .await
            .unwrap();
        let mut rsp = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rsp)).await;
        assert!(
            rsp.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&rsp)
        );
    }
    // Lines are written as requests finish; read until all four are there.
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    use tokio::io::AsyncBufReadExt;
    while lines.len() < 4 {
        let mut l = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), stdout.read_line(&mut l))
            .await
            .expect("an access-log line within 10 s")
            .unwrap();
        assert!(n > 0, "stdout closed");
        lines.push(serde_json::from_str::<serde_json::Value>(&l).unwrap());
    }
    let first = &lines[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/status/404");
    assert_eq!(first["status"], 404);
    assert_eq!(first["direction"], "outbound");
    assert_eq!(first["trace_id"], trace, "{first}");
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(lines[1]["path"], "/x");
    assert_eq!(lines[1]["status"], 200);
    assert!(
        lines[1]["trace_id"].as_str().is_some_and(|t| t.len() == 32),
        "a new trace for a request without one: {}",
        lines[1]
    );
    // The last two in either order: the cancelled request's line is written
    // when its connection is seen closed.
    let by_path = |p: &str| {
        lines
            .iter()
            .find(|l| l["path"] == p)
            .unwrap_or_else(|| panic!("no line for {p}: {lines:?}"))
    };
    let cancelled = by_path("/slow/10000");
    assert_eq!(cancelled["path"], "/slow/10000", "{cancelled}");
    assert_eq!(cancelled["status"], 0, "{cancelled}");
    assert_eq!(cancelled["proxy_error"], "cancelled", "{cancelled}");
    assert!(
        cancelled["duration_ms"].as_f64().unwrap() >= 250.0,
        "{cancelled}"
    );
    let refused = by_path("/smuggle");
    assert_eq!(
        (&refused["method"], &refused["path"], &refused["status"]),
        (
            &serde_json::json!("POST"),
            &serde_json::json!("/smuggle"),
            &serde_json::json!(400)
        ),
        "{refused}"
    );
    assert!(
        refused["proxy_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{refused}"
    );
}

/// The loader reads every relocation when the proxy starts, and they stay
/// resident: packed (`build.rs`), the proxy's 20,000 relative relocations take
/// a few KiB of every pod's memory rather than 480 KiB. `build.rs` packs them
/// where the toolchain and glibc can (glibc 2.36 and later); CI's can.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn relative_relocations_are_packed() {
    if !cfg!(relr_packed) {
        return strait_tests::host::missing(
            "a toolchain that packs relative relocations (glibc 2.36, see the build's warning)",
        );
    }
    let Ok(out) = std::process::Command::new("readelf")
        .args(["-d", "-W", env!("CARGO_BIN_EXE_strait-proxy")])
        .output()
    else {
        return strait_tests::host::missing("readelf (binutils)");
    };
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let bytes = |tag: &str| {
        dynamic
            .lines()
            .find(|l| l.contains(tag))
            .and_then(|l| l.split_whitespace().rev().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
    };
    let (packed, plain) = (bytes("(RELRSZ)"), bytes("(RELASZ)"));
    assert!(packed.is_some(), "no packed relocations:\n{dynamic}");
    assert!(
        plain.unwrap_or(0) < 64 * 1024,
        "{plain:?} bytes of plain relocations"
    );
}

/// A runtime that leaves the soft open-file limit at 1,024 would let a few
/// hundred opaque streams exhaust it (and the admin port's probes with them):
/// the proxy raises it to the hard limit at start.
#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_one() {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} --admin-addr={admin} --inbound-addr=127.0.0.1:0 --outbound-addr=127.0.0.1:0",
            env!("CARGO_BIN_EXE_strait-proxy")
        ))
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    wait::ready(admin.parse().unwrap(), Duration::from_secs(10)).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id().unwrap())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (f[3], f[4]);
    assert_eq!(soft, hard, "{line}");
    // And no core dump, which would put its memory (its key) on disk.
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let f: Vec<&str> = core.split_whitespace().collect();
    assert_eq!((f[4], f[5]), ("1", "1"), "{core}");
}

/// A request the proxy itself answers with a 5xx (here, its upstream
/// refuses the connection) is in the proxy's log at the default level, with
/// why: the first place an engineer looks when meshed calls fail.
#[tokio::test]
async fn a_5xx_the_proxy_makes_is_logged_with_why() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (admin, outbound) = (free_port(), free_port());
    let mut proxy = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait-proxy"))
        .args([
            format!("--admin-addr=127.0.0.1:{admin}"),
            "--inbound-addr=127.0.0.1:0".into(),
            format!("--outbound-addr=127.0.0.1:{outbound}"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait::ready(
        format!("127.0.0.1:{admin}").parse().unwrap(),
        Duration::from_secs(10),
    )
    .await;
    let gone = free_port();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", outbound))
        .await
        .unwrap();
    s.write_all(
        format!("GET http://127.0.0.1:{gone}/ HTTP/1.1\r\nhost: 127.0.0.1:{gone}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    proxy.start_kill().unwrap();
    let out = proxy.wait_with_output().await.unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = log
        .lines()
        .find(|l| l.contains("request answered by the proxy"))
        .unwrap_or_else(|| panic!("no line for the 502 in:\n{log}"));
    assert!(line.contains("connect"), "{line}");
    assert!(line.contains(&gone.to_string()), "{line}");
}
