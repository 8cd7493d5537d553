//! Bad input from the network against running pods: what an app (or anything
//! in a pod) can throw at its own sidecar, and what a host on the network can
//! throw at another pod's inbound side. Each is answered with a clear refusal,
//! nothing reaches the app, no proxy dies, and their memory does not grow. The
//! suite prints a table of what was tried and what happened.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use strait_tests::backend::Backend;
use strait_tests::pki::{Pki, request_over_tls};
use strait_tests::pods::{MeshedPod, NS, PodMesh};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;

/// Sends `bytes` and returns what came back before the peer closed (or `wait`
/// passed), as text.
async fn raw(addr: SocketAddr, bytes: Vec<u8>, wait: Duration) -> String {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return "connection refused".into();
    };
    // The peer may close before everything is written: that is a refusal too.
    let _ = s.write_all(&bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `head` and then stalls (sends nothing more, keeps the connection).
async fn stall(addr: SocketAddr, head: Vec<u8>) -> String {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return "connection refused".into();
    };
    let _ = s.write_all(&head).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(rsp: &str) -> String {
    rsp.lines().next().unwrap_or("(nothing)").trim().to_string()
}

/// An HTTP/2 frame, by hand: the attacker's side.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The GOAWAY error code among the frames `got` holds, if any.
fn goaway(got: &[u8]) -> Option<u32> {
    let mut i = 0;
    while i + 9 <= got.len() {
        let len = ((got[i] as usize) << 16) | ((got[i + 1] as usize) << 8) | got[i + 2] as usize;
        if got[i + 3] == 0x7 && i + 17 <= got.len() {
            return Some(u32::from_be_bytes([
                got[i + 13],
                got[i + 14],
                got[i + 15],
                got[i + 16],
            ]));
        }
        i += 9 + len;
    }
    None
}

/// Sends an HTTP/2 connection's worth of `frames` after the preface; returns
/// the GOAWAY code the peer answered with, if it did.
/// `n` discovery watch calls on streams 1, 3, …, their HEADERS with `flags`,
/// each followed by what `then` makes for its stream.
fn watch_calls(n: u32, flags: u8, then: impl Fn(u32) -> Vec<u8>) -> Vec<u8> {
    let mut frames = Vec::new();
    for stream in (0..n).map(|i| 2 * i + 1) {
        frames.extend(frame(
            0x1,
            flags,
            stream,
            &grpc_headers("/strait.api.v1.Discovery/Watch"),
        ));
        frames.extend(then(stream));
    }
    frames
}

async fn h2_attack(addr: SocketAddr, frames: Vec<u8>) -> Option<u32> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frames);
    let _ = s.write_all(&out).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    goaway(&got)
}

struct Row {
    what: &'static str,
    against: &'static str,
    outcome: String,
    refused: bool,
}

/// Runs `f` in the client pod: its traffic goes to its own sidecar's outbound
/// side, as an app's would.
async fn from_client_pod<F, Fut, T>(client: &MeshedPod, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    client.pod.run(f).join().await
}

fn rss_kib(p: &MeshedPod) -> u64 {
    p.proxy.as_ref().expect("proxy").memory_kib().1
}

#[tokio::test]
async fn bad_input_from_the_network_is_refused_and_costs_no_memory() {
    let Some(mut mesh) = PodMesh::start().await else {
        return;
    };
    let timeouts = [
        "--http-header-read-timeout=1s",
        "--http-body-read-timeout=1s",
    ];
    let server = mesh.pod("server", "web", &timeouts).await;
    let client = mesh.pod("client", "client", &timeouts).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _app = server.pod.run(move || async move {
        let b = Backend::start_on(SocketAddr::from(([0, 0, 0, 0], APP_PORT))).await;
        let _ = tx.send(b.stats.clone());
        std::future::pending::<()>().await;
        drop(b);
    });
    let app = rx.await.expect("the app started");
    let web = mesh.service("web", 80, APP_PORT);
    mesh.endpoints("web", APP_PORT, &[&server]);
    mesh.dir.write(
        "policy.yaml",
        &format!(
            "apiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  targetRef: {{kind: Service, name: web}}\n  mtls: STRICT\n  allow: [{{identity: \"{}\"}}]\n",
            client.identity()
        ),
    );
    mesh.wait_reachable(&client, web).await;
    // Warm both proxies (pools, buffers) before measuring.
    for _ in 0..50 {
        mesh.wait_reachable(&client, web).await;
    }
    let rss_before = (rss_kib(&client), rss_kib(&server));
    let served_before = app.requests();
    let mut rows = Vec::new();

    // From an app in the client pod, to its own sidecar (intercepted, as the
    // app's every connection is).
    let http1: [(&'static str, Vec<u8>, &str); 5] = [
        (
            "request smuggling: Content-Length and Transfer-Encoding",
            b"POST /echo HTTP/1.1\r\nhost: web\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: web\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "request smuggling: two Content-Lengths",
            b"POST / HTTP/1.1\r\nhost: web\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nabcde".to_vec(),
            "400",
        ),
        (
            "obsolete line folding",
            b"GET / HTTP/1.1\r\nhost: web\r\nx-folded: one\r\n two\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "150 header fields",
            {
                let mut h = String::from("GET / HTTP/1.1\r\nhost: web\r\n");
                for i in 0..150 {
                    h.push_str(&format!("x-h{i}: v\r\n"));
                }
                h.push_str("\r\n");
                h.into_bytes()
            },
            "431",
        ),
        (
            "a 100 KiB header",
            format!(
                "GET / HTTP/1.1\r\nhost: web\r\nx-big: {}\r\n\r\n",
                "a".repeat(100 * 1024)
            )
            .into_bytes(),
            "431",
        ),
    ];
    for (what, bytes, want) in http1 {
        let rsp = from_client_pod(&client, move || raw(web, bytes, Duration::from_secs(5))).await;
        let got = status_of(&rsp);
        rows.push(Row {
            what,
            against: "the client's outbound",
            refused: got.contains(want) && rsp.matches("HTTP/1.1 ").count() == 1,
            outcome: got,
        });
    }
    let rsp = from_client_pod(&client, move || {
        stall(web, b"GET / HTTP/1.1\r\nhost: web\r\nx-slow: ".to_vec())
    })
    .await;
    rows.push(Row {
        what: "slowloris: a request head never finished",
        against: "the client's outbound",
        refused: status_of(&rsp).contains("408"),
        outcome: status_of(&rsp),
    });
    let rsp = from_client_pod(&client, move || {
        stall(
            web,
            b"POST /count HTTP/1.1\r\nhost: web\r\ncontent-length: 1000\r\n\r\nonly a little"
                .to_vec(),
        )
    })
    .await;
    rows.push(Row {
        what: "slowloris: a request body that stops",
        against: "the client's outbound",
        refused: status_of(&rsp).contains("408"),
        outcome: status_of(&rsp),
    });
    // HTTP/2 with prior knowledge: a rapid-reset flood, then a CONTINUATION flood.
    let mut reset = Vec::new();
    // HPACK: :method GET, :scheme http, :path /slow/1000, :authority web.
    let mut headers = vec![0x82, 0x86, 0x44, 10];
    headers.extend_from_slice(b"/slow/1000");
    headers.extend_from_slice(&[0x41, 3]);
    headers.extend_from_slice(b"web");
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        reset.extend(frame(0x1, 0x5, id, &headers));
        reset.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
    }
    // Streams the proxy took before their reset may reach the app: not counted.
    let before_floods = app.requests();
    let code = from_client_pod(&client, move || h2_attack(web, reset)).await;
    rows.push(Row {
        what: "HTTP/2 rapid reset (2,000 streams opened and cancelled)",
        against: "the client's outbound",
        refused: code == Some(0xb),
        outcome: format!("GOAWAY {code:?} (0xb: ENHANCE_YOUR_CALM)"),
    });
    let mut continuation = frame(0x1, 0x1, 1, &headers[..4]); // HEADERS, END_STREAM, no END_HEADERS
    // A literal header without indexing, new name, repeated: an endless block.
    let mut junk = Vec::new();
    for _ in 0..64 {
        junk.extend_from_slice(&[0x00, 3, b'x', b'-', b'a', 100]);
        junk.extend_from_slice(&[b'v'; 100]);
    }
    for _ in 0..2000 {
        continuation.extend(frame(0x9, 0, 1, &junk));
    }
    let code = from_client_pod(&client, move || h2_attack(web, continuation)).await;
    rows.push(Row {
        what: "HTTP/2 CONTINUATION flood (an endless header block, 14 MB)",
        against: "the client's outbound",
        refused: code.is_some(),
        outcome: format!("GOAWAY {code:?}"),
    });

    let flood_streams = app.requests() - before_floods;

    // From a host on the network, to the server pod's inbound side.
    let inbound = SocketAddr::from((server.pod.ip, 4143));
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let expired = mesh
        .pki()
        .leaf(&client.identity(), now - 2 * hour, now - hour);
    let seen = request_over_tls(inbound, expired, APP_PORT, "/").await;
    rows.push(Row {
        what: "a peer with an expired certificate",
        against: "the server's inbound",
        refused: seen.status_line.is_none(),
        outcome: seen
            .status_line
            .unwrap_or_else(|| "TLS handshake refused".into()),
    });
    let foreign = Pki::new().leaf(&client.identity(), now - hour, now + hour);
    let seen = request_over_tls(inbound, foreign, APP_PORT, "/").await;
    rows.push(Row {
        what: "a peer whose certificate has another trust anchor",
        against: "the server's inbound",
        refused: seen.status_line.is_none(),
        outcome: seen
            .status_line
            .unwrap_or_else(|| "TLS handshake refused".into()),
    });
    let intruder = mesh.pki().leaf(
        &format!("spiffe://cluster.local/ns/{NS}/sa/intruder"),
        now - hour,
        now + hour,
    );
    let seen = request_over_tls(inbound, intruder, APP_PORT, "/").await;
    rows.push(Row {
        what: "a peer with a valid certificate for an identity the policy does not allow",
        against: "the server's inbound",
        refused: seen
            .status_line
            .as_deref()
            .is_some_and(|l| l.contains("403")),
        outcome: seen.status_line.unwrap_or_else(|| "(nothing)".into()),
    });
    let rsp = raw(
        SocketAddr::from((server.pod.ip, APP_PORT)),
        b"GET / HTTP/1.1\r\nhost: web\r\n\r\n".to_vec(),
        Duration::from_secs(5),
    )
    .await;
    rows.push(Row {
        what: "a plaintext client (STRICT)",
        against: "the server's inbound",
        refused: status_of(&rsp).contains("403"),
        outcome: status_of(&rsp),
    });
    // A TLS record header, then noise: not a ClientHello.
    let mut garbage = vec![0x16, 0x03, 0x01, 0x40, 0x00];
    garbage.extend((0..16 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let rsp = raw(inbound, garbage, Duration::from_secs(5)).await;
    rows.push(Row {
        what: "a TLS client sending garbage",
        against: "the server's inbound",
        refused: !rsp.contains("HTTP/"),
        outcome: format!("closed after {} bytes back", rsp.len()),
    });

    // The mesh still serves, nothing bad reached the app, nobody grew.
    mesh.wait_reachable(&client, web).await;
    let served = app.requests() - served_before - flood_streams;
    let rss_after = (rss_kib(&client), rss_kib(&server));
    println!("\n| bad input | against | answer | refused |\n| --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} |",
            r.what,
            r.against,
            r.outcome,
            if r.refused { "yes" } else { "NO" }
        );
    }
    println!(
        "RSS before -> after: client proxy {} -> {} KiB, server proxy {} -> {} KiB; requests that reached the app: {served} (the closing check's and the slow body's)",
        rss_before.0, rss_after.0, rss_before.1, rss_after.1
    );
    for r in &rows {
        assert!(r.refused, "{} against {}: {}", r.what, r.against, r.outcome);
    }
    // The closing check's request, and the slow body's (its head was sound;
    // the app saw its body cut short).
    assert!(served <= 2, "bad input reached the app: {served} requests");
    for (name, before, after) in [
        ("client", rss_before.0, rss_after.0),
        ("server", rss_before.1, rss_after.1),
    ] {
        assert!(
            after < before + 8 * 1024,
            "the {name} proxy grew from {before} to {after} KiB"
        );
    }
    let mut client = client;
    let mut server = server;
    for p in [&mut client, &mut server] {
        let proc = p.proxy.as_mut().expect("proxy");
        assert!(
            proc.child.try_wait().expect("try_wait").is_none(),
            "{}'s proxy died",
            p.pod.name
        );
    }
}

/// HPACK for one request header block, by hand (literals, no Huffman): a gRPC
/// call of `path`.
fn grpc_headers(path: &str) -> Vec<u8> {
    let literal = |out: &mut Vec<u8>, v: &str| {
        out.push(v.len() as u8);
        out.extend_from_slice(v.as_bytes());
    };
    // :method POST, :scheme http (static table 3 and 6).
    let mut h = vec![0x83, 0x86];
    // :path (static name 4), without indexing.
    h.push(0x04);
    literal(&mut h, path);
    // :authority (static name 1).
    h.push(0x01);
    literal(&mut h, "strait-controller");
    // content-type (static name 31: 15 in the prefix, 16 after).
    h.extend_from_slice(&[0x0f, 0x10]);
    literal(&mut h, "application/grpc");
    // te: trailers, a new name.
    h.push(0x00);
    literal(&mut h, "te");
    literal(&mut h, "trailers");
    h
}

/// A client that makes the controller's HTTP/2 reset stream after stream
/// for its own errors, and reads nothing, is sent away: each reset would be
/// queued for it without bound, and any pod may reach the controller's
/// port before proving anything.
#[tokio::test]
async fn streams_reset_for_a_client_s_errors_end_its_connection_to_the_controller() {
    use strait_tests::manifests::ManifestDir;
    use strait_tests::mesh::ControllerProc;

    let dir = ManifestDir::new();
    let cp = ControllerProc::start(dir.path()).await;
    // Calls each followed by a window update that overflows its stream's
    // window: h2 resets the stream itself.
    let frames = watch_calls(2000, 0x5, |stream| {
        frame(0x8, 0, stream, &0x7fff_ffffu32.to_be_bytes())
    });
    assert_eq!(
        h2_attack(cp.grpc, frames).await,
        Some(0xb),
        "no GOAWAY(ENHANCE_YOUR_CALM)"
    );
    let (status, _) = strait_tests::wait::admin_get(cp.admin, "/ready")
        .await
        .expect("admin");
    assert_eq!(status, 200);
}

/// Requests whose message never completes, more of them from one address
/// than the controller answers at once: each held one would keep a message's
/// buffer before anyone is authenticated. Past the address's share they are
/// refused at once (`RESOURCE_EXHAUSTED`, counted), and the controller stays
/// ready for everyone else.
#[tokio::test]
async fn unfinished_grpc_requests_from_one_address_are_refused_past_its_share() {
    use strait_tests::manifests::ManifestDir;
    use strait_tests::mesh::ControllerProc;

    let Some(ip) = strait_tests::host::non_loopback_ip() else {
        return strait_tests::host::missing("an address that is not loopback (or root to add one)");
    };
    let dir = ManifestDir::new();
    let grpc = SocketAddr::new(ip, strait_tests::process::free_port());
    let cp = ControllerProc::start_on(dir.path(), grpc).await;

    // One connection, 200 calls, each announcing a 64 KiB message and
    // sending only the 5-byte prefix of it.
    const CALLS: u32 = 200;
    // HEADERS with END_HEADERS, then DATA without END_STREAM.
    let frames = watch_calls(CALLS, 0x4, |stream| {
        frame(0x0, 0x0, stream, &[0, 0, 1, 0, 0])
    });
    let mut s = TcpStream::connect(grpc).await.expect("connect");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frames);
    s.write_all(&out).await.expect("write");

    let name =
        "strait_controller_api_refusals_total{service=\"grpc\",reason=\"too_many_requests\"}";
    let past_share = f64::from(CALLS) - 64.0;
    strait_tests::wait::until(
        "the calls past the share refused",
        Duration::from_secs(10),
        || {
            let cp = &cp;
            async move { cp.metric(name).await >= past_share }
        },
    )
    .await;
    assert_eq!(
        cp.metric(name).await,
        past_share,
        "the address's share is 64 unanswered requests"
    );
    // Still there for everyone else, with the stalled connection open.
    let (status, _) = strait_tests::wait::admin_get(cp.admin, "/ready")
        .await
        .expect("admin");
    assert_eq!(status, 200);
    drop(s);
}
