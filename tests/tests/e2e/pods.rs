//! The mesh on namespace pods: every protocol our users run, from an app in a
//! client pod to a server in another, through both sidecars (intercepted by
//! the rules of `strait-proxy init`, mutual TLS between them), the apps
//! unaware of the mesh and addressing Services by virtual cluster IPs.
//!
//! Every Service is STRICT, so an answer at all proves the bytes between the
//! pods were mutual TLS; a plaintext probe from outside the mesh is refused on
//! the same ports. Each row of the printed table names the protocol, what
//! crossed, and how many of its requests or connections the server's proxy
//! admitted as the client's verified identity.

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use strait_api::testing::EchoRequest;
use strait_api::testing::echo_client::EchoClient;
use strait_tests::backend::Backend;
use strait_tests::netns::{Pod, have};
use strait_tests::pods::{MeshedPod, PodMesh};
use strait_tests::{client, grpc, wait};
use tokio_tungstenite::tungstenite::Message;

/// A check's outcome: what crossed, or what went wrong.
type Check = Result<String, String>;

const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;

/// Runs a program inside `pod` (as root, so the app side: intercepted).
fn in_pod(pod: &Pod, program: &str, args: &[&str]) -> Output {
    pod.command(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn stdout_of(o: &Output) -> Check {
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        Err(format!(
            "{}: {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// The server's proxy's count of what it admitted from `client`'s identity.
async fn admitted(server: &MeshedPod, client: &MeshedPod) -> f64 {
    let peer = format!("peer=\"{}\"", client.identity());
    server
        .metric(
            "strait_proxy_inbound_authorizations_total",
            &[&peer, "decision=\"allow\""],
        )
        .await
}

async fn post(url: String, content_type: &str, extra: (&str, &str), body: &'static str) -> Check {
    let req = Request::post(&url)
        .header("content-type", content_type)
        .header(extra.0, extra.1)
        .body(client::body(body))
        .map_err(|e| e.to_string())?;
    let rsp = client::http1()
        .request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = rsp.status();
    let seen = rsp
        .headers()
        .get("x-seen-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let got = rsp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != StatusCode::OK || got != body.as_bytes() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&got)));
    }
    if !seen.split(',').any(|h| h == extra.0) {
        return Err(format!("{} did not reach the server: {seen}", extra.0));
    }
    Ok(format!("{} bytes echoed, {} kept", got.len(), extra.0))
}

async fn sse(web: SocketAddr, app: std::sync::Arc<strait_tests::backend::Stats>) -> Check {
    let rsp = client::http1()
        .get(
            format!("http://{web}/sse")
                .parse()
                .map_err(|e| format!("{e}"))?,
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut body = rsp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .map_err(|_| "no first event while the stream was open".to_string())?
        .ok_or("stream ended")?
        .map_err(|e| e.to_string())?;
    let first = first.into_data().unwrap_or_default();
    if first != Bytes::from_static(b"data: first\n\n") {
        return Err(format!("first event {first:?}"));
    }
    app.release_sse();
    let rest = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    if rest != Bytes::from_static(b"data: last\n\n") {
        return Err(format!("last event {rest:?}"));
    }
    Ok("first event before the stream ended, then the last".into())
}

/// A WebSocket to the echo; with `subprotocol`, a GraphQL-over-WebSocket
/// exchange (`graphql-transport-ws` messages), else text and binary frames.
async fn websocket(web: SocketAddr, subprotocol: Option<&str>) -> Check {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{web}/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    if let Some(p) = subprotocol {
        req.headers_mut().insert(
            "sec-websocket-protocol",
            p.parse().map_err(|e| format!("{e}"))?,
        );
    }
    let tcp = tokio::net::TcpStream::connect(web)
        .await
        .map_err(|e| e.to_string())?;
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let messages: Vec<Message> = match subprotocol {
        Some(_) => vec![
            Message::text(r#"{"type":"connection_init"}"#),
            Message::text(
                r#"{"id":"1","type":"subscribe","payload":{"query":"subscription { cartUpdated { id } }"}}"#,
            ),
        ],
        None => vec![
            Message::text("hello"),
            Message::binary(vec![0u8, 1, 2, 255]),
        ],
    };
    for m in &messages {
        ws.send(m.clone()).await.map_err(|e| e.to_string())?;
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .map_err(|_| "no echo".to_string())?
            .ok_or("closed")?
            .map_err(|e| e.to_string())?;
        if &got != m {
            return Err(format!("sent {m:?}, got {got:?}"));
        }
    }
    let _ = ws.close(None).await;
    Ok(format!("{} messages echoed", messages.len()))
}

async fn grpc_calls(rpc: SocketAddr) -> Check {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{rpc}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut c = EchoClient::new(channel);
    let msg = |m: &str| EchoRequest {
        message: m.into(),
        ..Default::default()
    };
    let unary = c
        .unary(msg("unary"))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    if unary.message != "unary" {
        return Err(format!("unary: {unary:?}"));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = c
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    // Each reply before the next request: the stream is live both ways.
    for i in 0..10 {
        tx.send(msg(&format!("m{i}")))
            .await
            .map_err(|e| e.to_string())?;
        let r = replies
            .message()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("bidi ended early")?;
        if r.message != format!("m{i}") || r.seq != i {
            return Err(format!("bidi {i}: {r:?}"));
        }
    }
    drop(tx);
    Ok("unary, and 10 bidirectional messages each answered in turn".into())
}

/// gRPC-Web as a browser sends it: a length-prefixed message in an HTTP/1.1
/// POST, answered (by the echo) in the same framing.
async fn grpc_web(web: SocketAddr) -> Check {
    let mut framed = vec![0u8, 0, 0, 0, 5];
    framed.extend_from_slice(b"hello");
    let req = Request::post(format!("http://{web}/echo"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(client::body(framed.clone()))
        .map_err(|e| e.to_string())?;
    let rsp = client::http1()
        .request(req)
        .await
        .map_err(|e| e.to_string())?;
    let version = rsp
        .headers()
        .get("x-seen-version")
        .cloned()
        .unwrap_or(http::HeaderValue::from_static(""));
    let got = rsp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if got != framed {
        return Err(format!("{got:?}"));
    }
    Ok(format!(
        "framed message intact, app saw {}",
        version.to_str().unwrap_or("?")
    ))
}

/// Postgres in the server pod, as its own user, trusting the LAN.
fn start_postgres(
    server: &MeshedPod,
    dir: &std::path::Path,
) -> Option<strait_tests::process::Proc> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .find(|b| b.join("postgres").exists())?;
    let uid = uid_of("postgres")?;
    std::fs::create_dir_all(dir).ok()?;
    chown(dir, uid);
    let data = dir.join("data");
    let init = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("initdb"))
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(&data)
        .output()
        .ok()?;
    assert!(
        init.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhost all all 0.0.0.0/0 trust\n",
    )
    .ok()?;
    Some(server.pod.spawn_as(
        uid,
        bin.join("postgres"),
        &[
            "-D".into(),
            data.display().to_string(),
            "-c".into(),
            "listen_addresses=0.0.0.0".into(),
            "-c".into(),
            format!("unix_socket_directories={}", dir.display()),
        ],
    ))
}

/// MariaDB in the server pod (it drops to its own user), any client admitted.
fn start_mariadb(server: &MeshedPod, dir: &std::path::Path) -> strait_tests::process::Proc {
    std::fs::create_dir_all(dir).expect("mariadb dir");
    if let Some(uid) = uid_of("mysql") {
        chown(dir, uid);
    }
    let data = dir.join("data");
    let init = Command::new("mariadb-install-db")
        .args([
            "--user=mysql",
            "--skip-test-db",
            "--auth-root-authentication-method=normal",
        ])
        .arg(format!("--datadir={}", data.display()))
        .output()
        .expect("mariadb-install-db");
    assert!(
        init.status.success(),
        "mariadb-install-db: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    server.pod.spawn_as(
        0,
        "mariadbd".into(),
        &[
            "--no-defaults".into(),
            "--user=mysql".into(),
            format!("--datadir={}", data.display()),
            format!("--socket={}", dir.join("sock").display()),
            format!("--pid-file={}", dir.join("pid").display()),
            "--bind-address=0.0.0.0".into(),
            "--port=3306".into(),
            "--skip-grant-tables".into(),
            "--skip-name-resolve".into(),
            format!("--log-error={}", dir.join("error.log").display()),
        ],
    )
}

const RABBITMQ: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// RabbitMQ in the server pod as its own user, with its files in `dir` and
/// the guest user allowed from other hosts (the mesh's connections arrive
/// from the pod's address, not loopback).
fn start_rabbitmq(server: &MeshedPod, dir: &std::path::Path) -> strait_tests::process::Proc {
    std::fs::create_dir_all(dir).expect("rabbitmq dir");
    let conf = dir.join("rabbitmq.conf");
    std::fs::write(
        &conf,
        "loopback_users = none\nlisteners.tcp.default = 5672\n",
    )
    .expect("rabbitmq.conf");
    let uid = uid_of("rabbitmq").expect("the rabbitmq user");
    let _ = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{uid}"))
        .arg(dir)
        .status();
    let var = |k: &str, v: &std::path::Path| format!("{k}={}", v.display());
    server.pod.spawn_as(
        uid,
        "env".into(),
        &[
            var("HOME", dir),
            var("RABBITMQ_CONFIG_FILE", &conf),
            var("RABBITMQ_MNESIA_BASE", &dir.join("mnesia")),
            var("RABBITMQ_LOG_BASE", &dir.join("log")),
            "RABBITMQ_NODENAME=strait-test@localhost".into(),
            var("RABBITMQ_LOGS", &dir.join("rabbit.log")),
            RABBITMQ.into(),
        ],
    )
}

/// Throughput with redis-benchmark, then a message through pub/sub.
async fn redis_checks(pod: &Pod, host: &str) -> Check {
    let bench = stdout_of(&in_pod(
        pod,
        "redis-benchmark",
        &["-h", host, "-n", "2000", "-c", "8", "-q", "-t", "set,get"],
    ))?;
    let rates: Vec<&str> = bench
        .lines()
        .filter_map(|l| l.rsplit('\r').next())
        .filter(|l| l.starts_with("SET:") || l.starts_with("GET:"))
        .collect();
    if rates.len() != 2 {
        return Err(format!("redis-benchmark: {bench}"));
    }
    let mut cmd = pod.command("redis-cli");
    cmd.args(["-h", host, "subscribe", "news"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut sub = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(sub.stdout.take().ok_or("no stdout")?).lines();
    // redis-cli prints `subscribe`, `news`, `1` once subscribed; then a message
    // as `message`, `news`, its text.
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut published = false;
        while let Ok(Some(l)) = lines.next_line().await {
            seen.push(l.clone());
            if !published && seen.ends_with(&["subscribe".into(), "news".into(), "1".into()]) {
                published = true;
                let n = stdout_of(&in_pod(
                    pod,
                    "redis-cli",
                    &["-h", host, "publish", "news", "cart 42"],
                ))?;
                if n != "1" {
                    return Err(format!("published to {n} subscribers"));
                }
            }
            if published && l == "cart 42" {
                return Ok(());
            }
        }
        Err("the subscriber stopped".to_string())
    })
    .await;
    let _ = sub.kill().await;
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("pub/sub: {e}; subscriber saw {seen:?}")),
        Err(_) => {
            return Err(format!(
                "pub/sub: no message in 10 s; subscriber saw {seen:?}"
            ));
        }
    }
    Ok(format!(
        "{}; pub/sub message delivered",
        rates
            .iter()
            .map(|r| r.split(',').next().unwrap_or(r).trim())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn uid_of(user: &str) -> Option<u32> {
    let o = Command::new("id").args(["-u", user]).output().ok()?;
    String::from_utf8_lossy(&o.stdout).trim().parse().ok()
}

fn chown(p: &std::path::Path, uid: u32) {
    let _ = Command::new("chown")
        .arg(format!("{uid}:{uid}"))
        .arg(p)
        .status();
}

/// Runs `program` in `pod` until it succeeds with an output `done` accepts, or
/// `within` passes: a server just started may not listen yet.
async fn until_ok(
    within: Duration,
    pod: &Pod,
    program: &str,
    args: &[&str],
    done: fn(&str) -> bool,
) -> Check {
    let deadline = Instant::now() + within;
    loop {
        let mut cmd = pod.command(program);
        cmd.args(args).stdin(Stdio::null());
        let r = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{program}: {e}"))
            .and_then(|o| stdout_of(&o))
            .and_then(|out| if done(&out) { Ok(out) } else { Err(out) });
        if r.is_ok() || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A STRICT Service for `port` of the server pod; its virtual address.
fn strict_service(mesh: &mut PodMesh, name: &str, port: u16, server: &MeshedPod) -> SocketAddr {
    let addr = mesh.service(name, port, port);
    mesh.endpoints(name, port, &[server]);
    mesh.strict(name);
    addr
}

#[tokio::test]
async fn every_protocol_crosses_the_mesh_with_mtls_and_the_callers_identity() {
    let Some(mut mesh) = PodMesh::start().await else {
        return;
    };
    // A client silent this long would be carried as opaque TCP: a connection
    // that waited for detection would show it.
    let detect = ["--detect-timeout=5s"];
    let server = mesh.pod("server", "server", &detect).await;
    let client = mesh.pod("client", "client", &detect).await;

    // The server pod's apps.
    let (stats_tx, stats_rx) = tokio::sync::oneshot::channel();
    let _http_app = server.pod.run(move || async move {
        let b = Backend::start_on(SocketAddr::from(([0, 0, 0, 0], HTTP_PORT))).await;
        let _ = stats_tx.send(b.stats.clone());
        std::future::pending::<()>().await;
        drop(b);
    });
    let http_stats = stats_rx.await.expect("the HTTP app started");
    let _grpc_app = server.pod.run(|| async {
        grpc::start_echo_on(SocketAddr::from(([0, 0, 0, 0], GRPC_PORT))).await;
        std::future::pending::<()>().await;
    });

    let web = mesh.service("web", 80, HTTP_PORT);
    let rpc = mesh.service("rpc", GRPC_PORT, GRPC_PORT);
    mesh.endpoints("web", HTTP_PORT, &[&server]);
    mesh.endpoints("rpc", GRPC_PORT, &[&server]);
    mesh.strict("web");
    mesh.strict("rpc");

    // Until discovery and policy have reached both proxies.
    mesh.wait_reachable(&client, web).await;

    let mut rows: Vec<(&str, Check, f64)> = Vec::new();
    macro_rules! row {
        ($name:expr, $check:expr) => {{
            let before = admitted(&server, &client).await;
            let outcome = $check;
            let after = admitted(&server, &client).await;
            rows.push(($name, outcome, after - before));
        }};
    }

    let http =
        |f: fn(SocketAddr) -> std::pin::Pin<Box<dyn std::future::Future<Output = Check>>>| {
            client.pod.run(move || f(web)).join()
        };
    row!(
        "HTTP/1.1 REST (JSON)",
        http(|web| Box::pin(post(
            format!("http://{web}/echo"),
            "application/json",
            ("accept", "application/json"),
            r#"{"cart":{"id":42,"items":["tea","milk"]}}"#,
        )))
        .await
    );
    row!(
        "SOAP (XML POST, SOAPAction)",
        http(|web| Box::pin(post(
            format!("http://{web}/echo"),
            "text/xml; charset=utf-8",
            ("soapaction", "\"urn:shop#GetCart\""),
            r#"<?xml version="1.0"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><GetCart><Id>42</Id></GetCart></soap:Body></soap:Envelope>"#,
        )))
        .await
    );
    row!(
        "GraphQL (POST)",
        http(|web| Box::pin(post(
            format!("http://{web}/echo"),
            "application/json",
            ("accept", "application/graphql-response+json"),
            r#"{"query":"query { cart(id: 42) { items { name } } }"}"#,
        )))
        .await
    );
    row!(
        "GraphQL subscription (WebSocket)",
        http(|web| Box::pin(websocket(web, Some("graphql-transport-ws")))).await
    );
    row!(
        "WebSocket",
        http(|web| Box::pin(websocket(web, None))).await
    );
    let release = http_stats.clone();
    row!(
        "SSE",
        client.pod.run(move || sse(web, release)).join().await
    );
    row!(
        "gRPC unary and bidirectional streaming",
        client.pod.run(move || grpc_calls(rpc)).join().await
    );
    row!(
        "gRPC-Web (HTTP/1.1)",
        http(|web| Box::pin(grpc_web(web))).await
    );

    // Real servers from Debian's packages, driven by their own clients.
    let scratch = Scratch::new();
    if let Some(_pg) = start_postgres(&server, &scratch.join("pg")) {
        let pg = strict_service(&mut mesh, "pg", 5432, &server);
        let host = pg.ip().to_string();
        row!("PostgreSQL (psql, pgbench)", {
            let q = until_ok(
                Duration::from_secs(30),
                &client.pod,
                "psql",
                &["-h", &host, "-U", "postgres", "-Atc", "select 6*7"],
                |_| true,
            )
            .await;
            match q {
                Ok(v) if v == "42" => {
                    let pgbench = |args: &[&str]| {
                        let mut a = vec!["-h", &host, "-U", "postgres"];
                        a.extend_from_slice(args);
                        a.push("postgres");
                        stdout_of(&in_pod(&client.pod, "pgbench", &a))
                    };
                    pgbench(&["-i", "-q"]).and_then(|_| {
                        let out = pgbench(&["-c", "4", "-t", "200"])?;
                        let done = out
                            .lines()
                            .find(|l| l.contains("transactions actually processed"))
                            .unwrap_or("")
                            .to_string();
                        if done.ends_with("800/800") {
                            let tps = out.lines().find(|l| l.starts_with("tps")).unwrap_or("");
                            Ok(format!("select 6*7 = 42; pgbench {done}, {tps}"))
                        } else {
                            Err(out)
                        }
                    })
                }
                Ok(v) => Err(format!("select 6*7 = {v}")),
                Err(e) => Err(e),
            }
        });
    } else {
        strait_tests::host::missing("PostgreSQL (postgresql)");
    }

    if have("redis-server") && have("redis-benchmark") {
        let _redis = server.pod.spawn_as(
            0,
            "redis-server".into(),
            &[
                "--bind",
                "0.0.0.0",
                "--port",
                "6379",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .map(String::from),
        );
        let redis = strict_service(&mut mesh, "redis", 6379, &server);
        let host = redis.ip().to_string();
        row!("Redis (redis-benchmark, pub/sub)", {
            let ping = until_ok(
                Duration::from_secs(20),
                &client.pod,
                "redis-cli",
                &["-h", &host, "ping"],
                |s| s == "PONG",
            )
            .await;
            match ping {
                Ok(_) => redis_checks(&client.pod, &host).await,
                Err(e) => Err(e),
            }
        });
        // As a StatefulSet's clients do: the pod's own address, no Service.
        let pod_ip = server.pod.ip.to_string();
        row!(
            "Redis by the pod's own address (no Service)",
            until_ok(
                Duration::from_secs(20),
                &client.pod,
                "redis-cli",
                &["-h", &pod_ip, "ping"],
                |s| s == "PONG",
            )
            .await
        );
    } else {
        strait_tests::host::missing("Redis (redis-server, redis-tools)");
    }

    if have("mosquitto") && have("mosquitto_sub") {
        let conf = scratch.join("mosquitto.conf");
        std::fs::write(
            &conf,
            "listener 1883 0.0.0.0\nallow_anonymous true\nlog_dest none\n",
        )
        .expect("mosquitto.conf");
        let _mqtt = server.pod.spawn_as(
            0,
            "mosquitto".into(),
            &["-c".to_string(), conf.display().to_string()],
        );
        let mqtt = strict_service(&mut mesh, "mqtt", 1883, &server);
        let host = mqtt.ip().to_string();
        row!("MQTT (mosquitto)", {
            // A retained message, then a subscriber that must receive it.
            let published = until_ok(
                Duration::from_secs(20),
                &client.pod,
                "mosquitto_pub",
                &[
                    "-h",
                    &host,
                    "-t",
                    "shop/cart",
                    "-m",
                    "cart 42 updated",
                    "-r",
                    "-q",
                    "1",
                ],
                |_| true,
            )
            .await;
            published.and_then(|_| {
                let got = stdout_of(&in_pod(
                    &client.pod,
                    "mosquitto_sub",
                    &[
                        "-h",
                        &host,
                        "-t",
                        "shop/cart",
                        "-C",
                        "1",
                        "-W",
                        "10",
                        "-q",
                        "1",
                    ],
                ))?;
                if got == "cart 42 updated" {
                    Ok("QoS 1 publish (retained), subscriber received it".into())
                } else {
                    Err(got)
                }
            })
        });
    } else {
        strait_tests::host::missing("MQTT (mosquitto, mosquitto-clients)");
    }

    if have("mariadbd") && have("mariadb-install-db") {
        let dir = scratch.join("mariadb");
        let _db = start_mariadb(&server, &dir);
        let svc = strict_service(&mut mesh, "db", 3306, &server);
        let host = svc.ip().to_string();
        row!("MariaDB (server speaks first)", {
            let ready = until_ok(
                Duration::from_secs(30),
                &client.pod,
                "mariadb",
                &["-h", &host, "-u", "root", "-N", "-e", "select 1"],
                |_| true,
            )
            .await;
            ready.and_then(|_| {
                // Timed on a warm server: the client waits for the server's
                // greeting, which must not wait for the client (5 s of
                // detection, had the port not been carried as opaque).
                let t = Instant::now();
                let v = stdout_of(&in_pod(
                    &client.pod,
                    "mariadb",
                    &["-h", &host, "-u", "root", "-N", "-e", "select 6*7"],
                ))?;
                let took = t.elapsed();
                if v != "42" {
                    Err(format!("select 6*7 = {v}"))
                } else if took > Duration::from_secs(2) {
                    Err(format!("the connection stalled: {took:?}"))
                } else {
                    Ok(format!(
                        "select 6*7 = 42, connect and query in {} ms",
                        took.as_millis()
                    ))
                }
            })
        });
    } else {
        strait_tests::host::missing("MariaDB (mariadb-server, mariadb-client)");
    }

    if have("amqp-publish") && std::path::Path::new(RABBITMQ).exists() {
        let _rabbit = start_rabbitmq(&server, &scratch.join("rabbitmq"));
        let amqp = strict_service(&mut mesh, "amqp", 5672, &server);
        let url = format!("amqp://guest:guest@{amqp}");
        row!("RabbitMQ (AMQP 0-9-1 publish, consume)", {
            // The broker takes seconds to start: its queue declared once it answers.
            let declared = until_ok(
                Duration::from_secs(60),
                &client.pod,
                "amqp-declare-queue",
                &["-u", &url, "-q", "orders"],
                |_| true,
            )
            .await;
            declared.and_then(|_| {
                stdout_of(&in_pod(
                    &client.pod,
                    "amqp-publish",
                    &["-u", &url, "-r", "orders", "-b", "order 42 placed"],
                ))?;
                let got = stdout_of(&in_pod(
                    &client.pod,
                    "amqp-get",
                    &["-u", &url, "-q", "orders"],
                ))?;
                if got == "order 42 placed" {
                    Ok("declared a queue, published, consumed the message".into())
                } else {
                    Err(format!("consumed {got:?}"))
                }
            })
        });
    } else {
        strait_tests::host::missing("RabbitMQ (rabbitmq-server, amqp-tools)");
    }

    print_table(&rows);
    // STRICT: plaintext from outside the mesh, straight to the server pod, is refused.
    let plain = client::get(
        &client::http1(),
        &format!("http://{}:{HTTP_PORT}/", server.pod.ip),
    )
    .await;
    assert!(
        !matches!(plain, Ok((StatusCode::OK, _))),
        "plaintext reached a STRICT app: {plain:?}"
    );
    println!("plaintext probe to the server pod's {HTTP_PORT}: refused ({plain:?})");
    if have("redis-server") {
        // An opaque port too: a plaintext client gets nothing from Redis.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect((server.pod.ip, 6379))
            .await
            .expect("connect to the server pod");
        let _ = s.write_all(b"PING\r\n").await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            !String::from_utf8_lossy(&buf).contains("PONG"),
            "plaintext reached Redis: {buf:?}"
        );
        println!(
            "plaintext probe to the server pod's 6379: closed with {} bytes ({})",
            buf.len(),
            if read.is_ok() {
                "closed"
            } else {
                "no answer in 5 s"
            }
        );
    }
    // TLS from outside the mesh (the API server calling a webhook, an HTTPS
    // scrape) to a workload no policy makes STRICT (the client pod's) is the
    // app's own: carried to it as TCP, not taken for a peer proxy's mTLS,
    // which it cannot finish.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const TLS_PORT: u16 = 9443;
        let (listening_tx, listening) = tokio::sync::oneshot::channel();
        let _tls_app = client.pod.run(move || async move {
            let l = tokio::net::TcpListener::bind(("0.0.0.0", TLS_PORT))
                .await
                .expect("bind the app's TLS port");
            let _ = listening_tx.send(());
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        listening.await.expect("the app listens");
        // The start of a ClientHello: what the proxy decides on.
        let hello = b"\x16\x03\x01\x00\x05hello";
        let mut s = tokio::net::TcpStream::connect((client.pod.ip, TLS_PORT))
            .await
            .expect("connect to the client pod");
        s.write_all(hello).await.unwrap();
        let mut back = [0u8; 10];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await;
        assert!(
            matches!(read, Ok(Ok(_))) && &back == hello,
            "TLS from outside the mesh did not reach the app: {read:?} {back:?}"
        );
        println!("TLS from outside the mesh to the client pod's {TLS_PORT}: reached the app");
    }
    for (name, outcome, by_identity) in &rows {
        assert!(outcome.is_ok(), "{name}: {outcome:?}");
        assert!(
            *by_identity >= 1.0,
            "{name}: the server's proxy admitted nothing from {}",
            client.identity()
        );
    }
}

/// A meshed pod whose app serves `port`, and whose pod (as the controller
/// reads it) has the kubelet probe `/healthz` there; with the app's handle.
async fn probed_server(
    mesh: &mut PodMesh,
    port: u16,
    extra: &[&str],
) -> (MeshedPod, strait_tests::netns::InPod<()>) {
    let server = mesh.pod("server", "server", extra).await;
    let app = server.pod.run(move || async move {
        let b = Backend::start_on(SocketAddr::from(([0, 0, 0, 0], port))).await;
        std::future::pending::<()>().await;
        drop(b);
    });
    let (name, ip) = (server.pod.name.clone(), server.pod.ip);
    mesh.dir.write(
        &format!("pod-{name}.yaml"),
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: test\n  labels: {{app: server}}\n  annotations: {{strait.dev/inbound-port: \"4143\"}}\nspec:\n  serviceAccountName: server\n  containers:\n  - name: app\n    image: app\n    readinessProbe: {{httpGet: {{path: /healthz, port: {port}}}}}\nstatus: {{phase: Running, podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}\n"
        ),
    );
    (server, app)
}

/// The kubelet probes an app port over HTTP in plaintext. On a port declared
/// opaque whose Service is STRICT, such a connection was carried unread and
/// refused whole, so the pod never became ready: the probe gets through, and
/// nothing else in plaintext does.
#[tokio::test]
async fn the_kubelets_probe_of_an_opaque_port_passes_strict() {
    const PROBED: u16 = 9000;
    let Some(mut mesh) = PodMesh::start().await else {
        return;
    };
    let (server, _app) = probed_server(&mut mesh, PROBED, &["--opaque-ports=9000"]).await;
    let ip = server.pod.ip;
    strict_service(&mut mesh, "probed", PROBED, &server);
    let get = |path: &'static str| async move {
        client::get(&client::http1(), &format!("http://{ip}:{PROBED}{path}"))
            .await
            .map(|(status, _)| status.as_u16())
            .ok()
    };
    // STRICT in force (anything else refused, as a request) and the probe
    // admitted.
    wait::until(
        "STRICT and the probe to apply",
        Duration::from_secs(15),
        || async { get("/other").await == Some(403) && get("/healthz").await == Some(200) },
    )
    .await;
    // Not an opaque stream in plaintext either.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((ip, PROBED)).await.unwrap();
    let _ = s.write_all(b"\x00\x01binary\r\n").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
    assert!(buf.is_empty(), "plaintext bytes were answered: {buf:?}");
}

/// A client outside the mesh holding an HTTP/2 connection to a meshed pod (a
/// gRPC client in a namespace not yet meshed, through the Service's cluster
/// IP or a node port) is sent away once the app stops listening, shutting
/// down, as the app's own GOAWAY would have sent it: it reconnects through
/// the Service to a pod that serves. Before, every request on the connection
/// failed until the pod was gone, a removed endpoint moving no connection.
#[tokio::test]
async fn an_unmeshed_http2_client_is_sent_away_when_the_app_stops_listening() {
    let Some(mut mesh) = PodMesh::start().await else {
        return;
    };
    let server = mesh.pod("server", "server", &[]).await;
    let app = server.pod.run(|| async {
        let b = Backend::start_on(SocketAddr::from(([0, 0, 0, 0], HTTP_PORT))).await;
        std::future::pending::<()>().await;
        drop(b);
    });
    let target = SocketAddr::from((server.pod.ip, HTTP_PORT));
    wait::until(
        "the app to answer through its proxy",
        Duration::from_secs(15),
        || async {
            client::get(&client::http1(), &format!("http://{target}/"))
                .await
                .is_ok_and(|(status, _)| status == StatusCode::OK)
        },
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(target).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let mut conn = tokio::spawn(conn);
    let get = |h2: h2::client::SendRequest<Bytes>| async move {
        let mut h2 = h2.ready().await.map_err(|e| e.to_string())?;
        let req = Request::get(format!("http://{target}/")).body(()).unwrap();
        let (rsp, _) = h2.send_request(req, true).map_err(|e| e.to_string())?;
        rsp.await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string())
    };
    assert_eq!(get(h2.clone()).await, Ok(200));

    // The app stops listening; its pod and proxy stay.
    drop(app);
    server
        .pod
        .run(|| {
            wait::until(
                "the app to stop listening",
                Duration::from_secs(10),
                || async {
                    tokio::net::TcpStream::connect(("127.0.0.1", HTTP_PORT))
                        .await
                        .is_err()
                },
            )
        })
        .join()
        .await;
    assert_eq!(get(h2.clone()).await, Ok(502), "the app is not listening");
    tokio::time::timeout(Duration::from_secs(10), &mut conn)
        .await
        .expect("the connection went away after the answer")
        .unwrap()
        .unwrap();
    println!("an HTTP/2 client outside the mesh: 502 once, then GOAWAY");
}

/// A dual-stack Service's IPv6 leg is meshed as its IPv4 one. Most clients
/// (glibc's address order) dial a dual-stack Service's IPv6 cluster IP first;
/// that, and a pod's IPv6 address, go through both proxies with mTLS; and a
/// client outside the mesh reaching the pod over IPv6 meets the proxy's
/// policy. Before, the app's IPv6 connections left unmeshed and IPv6
/// connections to a meshed pod were refused.
#[tokio::test]
async fn a_dual_stack_services_ipv6_leg_is_meshed_too() {
    let Some(mut mesh) = PodMesh::start().await else {
        return;
    };
    if !mesh.lan.has_ipv6() {
        strait_tests::host::missing("IPv6 in network namespaces");
        return;
    }
    let server = mesh.pod("server", "server", &[]).await;
    let client = mesh.pod("client", "client", &[]).await;
    let _app = server.pod.run(|| async {
        let b = Backend::start_on(SocketAddr::from(([0, 0, 0, 0], HTTP_PORT))).await;
        std::future::pending::<()>().await;
        drop(b);
    });
    let (web, web6) = mesh.dual_stack_service("web", 80, HTTP_PORT, &[&server]);
    mesh.strict("web");
    mesh.wait_reachable(&client, web).await;

    let server6 = SocketAddr::from((server.pod.ip6.expect("IPv6"), HTTP_PORT));
    for target in [web6, server6] {
        let before = admitted(&server, &client).await;
        let got = client
            .pod
            .run(move || async move {
                client::get(&client::http1(), &format!("http://{target}/"))
                    .await
                    .map(|(status, _)| status.as_u16())
                    .map_err(|e| e.to_string())
            })
            .join()
            .await;
        assert_eq!(got, Ok(200), "the client's app to {target}");
        assert_eq!(
            admitted(&server, &client).await - before,
            1.0,
            "{target}: admitted as the client's identity, so over mTLS"
        );
    }
    let (status, _) = client::get(&client::http1(), &format!("http://{server6}/"))
        .await
        .expect("the server's proxy answers over IPv6");
    assert_eq!(status, 403, "plaintext over IPv6 meets STRICT");
    // Where the pod's first address is IPv6, the kubelet probes it there.
    let (status, body) = client::get(
        &client::http1(),
        &format!("http://{}/ready", SocketAddr::from((server6.ip(), 4191))),
    )
    .await
    .expect("the server's proxy's admin port answers over IPv6");
    assert_eq!(status, 200, "{body}");
}

fn print_table(rows: &[(&str, Check, f64)]) {
    println!("\n| protocol | outcome | admitted as the client's identity |\n| --- | --- | --- |");
    for (name, outcome, n) in rows {
        let o = match outcome {
            Ok(s) => format!("ok: {s}"),
            Err(e) => format!("FAILED: {e}"),
        };
        println!("| {name} | {o} | {n} |");
    }
}

/// A scratch directory for the servers' data, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let d = std::env::temp_dir().join(format!("strait-pods-apps-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }

    fn join(&self, p: &str) -> std::path::PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The node's address carries the kubelet's probes and every outside client
/// the node forwards. Past that address's share, a connection to a probed port
/// takes one of the places kept for probes: one that is not a probe is
/// answered 503 and closed at once, so that the kubelet's next probe finds
/// its place (before, forwarded keep-alive clients kept both, and the probe
/// was refused).
#[tokio::test]
async fn forwarded_clients_leave_the_kubelets_probe_its_place() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PROBED: u16 = 9000;
    let Some(mut mesh) = PodMesh::start().await else {
        return;
    };
    let (server, _app) = probed_server(
        &mut mesh,
        PROBED,
        &["--inbound-max-connections-per-source=2"],
    )
    .await;
    let ip = server.pod.ip;
    // A request on a connection of its own, kept open: its status, and
    // whether the proxy closed the connection after it.
    let keep_alive = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect((ip, PROBED)).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: server\r\n\r\n");
        let _ = s.write_all(req.as_bytes()).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // Until the response's end (its body is short) or the connection's.
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        let status = String::from_utf8_lossy(&got).get(9..12).map(String::from);
        (s, status, closed)
    };
    wait::until(
        "the probe known to the proxy",
        Duration::from_secs(15),
        || async {
            let probe =
                client::get(&client::http1(), &format!("http://{ip}:{PROBED}/healthz")).await;
            matches!(probe, Ok((s, _)) if s == 200)
        },
    )
    .await;
    // Those connections given back, so that the share below is whole.
    wait::until(
        "no inbound connection open",
        Duration::from_secs(15),
        || async {
            server
                .metric(
                    "strait_proxy_tcp_open_connections",
                    &["direction=\"inbound\""],
                )
                .await
                == 0.0
        },
    )
    .await;
    // The address's share, held by forwarded clients.
    let (_a, sa, _) = keep_alive("/orders").await;
    let (_b, sb, _) = keep_alive("/orders").await;
    assert_eq!((sa.as_deref(), sb.as_deref()), (Some("200"), Some("200")));
    // Two more: past the share, in the probes' places, answered and closed.
    for _ in 0..2 {
        let (_c, status, closed) = keep_alive("/orders").await;
        assert_eq!(status.as_deref(), Some("503"));
        assert!(
            closed,
            "a probe's place kept by a client that is not a probe"
        );
    }
    // The kubelet's probe, from the same address, still gets through.
    let probe = client::get(&client::http1(), &format!("http://{ip}:{PROBED}/healthz")).await;
    assert!(matches!(probe, Ok((s, _)) if s == 200), "{probe:?}");
}
