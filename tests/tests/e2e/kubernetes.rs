//! What strait brings to a cluster, short of an API server: the sidecar
//! injector as the API server calls it (AdmissionReview over HTTPS).

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use strait_tests::manifests::ManifestDir;
use strait_tests::mesh::ControllerProc;
use strait_tests::pki::Pki;
use strait_tests::process::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TLS connection to the webhook as the API server makes it: verified
/// against the webhook's `caBundle` (the mesh's trust anchors) for the
/// controller's Service name.
async fn connect(pki: &Pki, port: u16) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.anchors()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = ServerName::try_from("strait-controller.strait-system.svc").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("the webhook's certificate is valid for its Service under the anchors")
}

/// POSTs `body` to the webhook as the API server does. Returns (status, body).
async fn post(pki: &Pki, port: u16, path: &str, body: &[u8]) -> (u16, Value) {
    let mut tls = connect(pki, port).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: strait-controller.strait-system.svc\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1;
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.into())),
    )
}

fn review(pod: Value) -> Vec<u8> {
    review_of(("", "v1", "Pod", "pods"), pod)
}

/// The review of a creation in namespace `shop`, as the API server sends it.
fn review_of((group, version, kind, resource): (&str, &str, &str, &str), object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "b0a8f9d4-1f6e-4c52-9d43-5f0f1c1e2a77",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
        }
    }))
    .unwrap()
}

/// A pod that asks for the proxy by its annotation.
fn opted_in_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "annotations": {"strait.dev/inject": "enabled"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
}

/// A controller serving the injector on the returned port.
fn injector(pki: &Pki, dir: &ManifestDir) -> (ControllerProc, u16) {
    let port = free_port();
    let grpc = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let extra = [
        format!("--webhook-addr=127.0.0.1:{port}"),
        format!("--trust-anchors={}", pki.anchors().display()),
        "--proxy-image=registry.local/strait-proxy:test".to_string(),
    ];
    let cp = ControllerProc::spawn_with(dir.path(), grpc, Some(pki), None, &extra);
    (cp, port)
}

#[tokio::test]
async fn the_injector_answers_admission_reviews_over_https_signed_by_the_issuer() {
    let pki = Pki::new();
    let dir = ManifestDir::new();
    let (mut cp, port) = injector(&pki, &dir);
    cp.ready(std::time::Duration::from_secs(20)).await;

    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "annotations": {"strait.dev/inject": "enabled"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "nginx"}]}});
    let (status, rsp) = post(&pki, port, "/inject", &review(pod.clone())).await;
    assert_eq!(status, 200, "{rsp}");
    assert_eq!(
        rsp["response"]["uid"],
        "b0a8f9d4-1f6e-4c52-9d43-5f0f1c1e2a77"
    );
    assert_eq!(rsp["response"]["allowed"], true);
    assert_eq!(rsp["response"]["patchType"], "JSONPatch");
    let patch: Vec<u8> = rsp["response"]["patch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    let patch = String::from_utf8(patch).unwrap();
    assert!(
        patch.contains("registry.local/strait-proxy:test"),
        "--proxy-image is used"
    );
    let anchors = std::fs::read_to_string(pki.anchors()).unwrap();
    let patch: Value = serde_json::from_str(&patch).unwrap();
    let given = patch
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|op| op["value"].as_array())
        .flatten()
        .filter(|c| c["name"] == "strait-proxy")
        .flat_map(|c| c["env"].as_array().unwrap().iter())
        .find(|e| e["name"] == "STRAIT_PROXY_TRUST_ANCHORS_PEM")
        .map(|e| e["value"].as_str().unwrap().to_string());
    assert_eq!(
        given.as_deref(),
        Some(anchors.as_str()),
        "the proxies are given the anchors"
    );

    // Not annotated, in a namespace that is not labelled: admitted untouched.
    let mut plain = pod.clone();
    plain["metadata"]["annotations"] = json!({});
    let (status, rsp) = post(&pki, port, "/inject", &review(plain.clone())).await;
    assert_eq!((status, &rsp["response"]["allowed"]), (200, &json!(true)));
    assert!(rsp["response"]["patch"].is_null());
    // The same pod through the labelled-namespace path is injected.
    let (_, rsp) = post(&pki, port, "/inject/enabled-namespace", &review(plain)).await;
    assert!(rsp["response"]["patch"].is_array());

    // A malformed review: a clear 400, and the webhook keeps serving.
    let (status, rsp) = post(&pki, port, "/inject", b"{\"kind\":").await;
    assert_eq!(status, 400);
    assert!(
        rsp["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not an AdmissionReview")
    );
    let (status, _) = post(&pki, port, "/inject", &review(pod)).await;
    assert_eq!(status, 200);
}

/// The same server checks strait's policies as the API server sends them: a
/// misspelt field is refused at apply with its name, the right spelling is
/// admitted.
#[tokio::test]
async fn the_validator_refuses_at_apply_a_policy_the_controller_would_refuse() {
    let pki = Pki::new();
    let dir = ManifestDir::new();
    let (mut cp, port) = injector(&pki, &dir);
    cp.ready(std::time::Duration::from_secs(20)).await;
    let review = |spec: Value| {
        review_of(
            (
                "policy.strait.dev",
                "v1alpha1",
                "AuthorizationPolicy",
                "authorizationpolicies",
            ),
            json!({"apiVersion": "policy.strait.dev/v1alpha1", "kind": "AuthorizationPolicy",
                   "metadata": {"name": "web", "namespace": "shop"}, "spec": spec}),
        )
    };
    let typo = json!({"selector": {"matchLabels": {"app": "web"}}, "mTLS": "STRICT"});
    let (status, rsp) = post(&pki, port, "/validate", &review(typo)).await;
    assert_eq!(status, 200, "{rsp}");
    assert_eq!(rsp["response"]["allowed"], false, "{rsp}");
    let msg = rsp["response"]["status"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("strait refuses AuthorizationPolicy shop/web: ")
            && msg.contains("unknown field `mTLS`"),
        "{msg}"
    );
    let right = json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": "STRICT"});
    let (status, rsp) = post(&pki, port, "/validate", &review(right)).await;
    assert_eq!((status, &rsp["response"]["allowed"]), (200, &json!(true)));
}

/// Any pod can reach the webhook. Connections that say nothing, as many as
/// it holds and more, do not keep the API server waiting: a new connection
/// takes the place of the longest idle one, and its review is answered at
/// once rather than when a silent one times out (10 s).
#[tokio::test]
async fn silent_connections_do_not_keep_the_api_server_from_the_injector() {
    let pki = Pki::new();
    let dir = ManifestDir::new();
    let (mut cp, port) = injector(&pki, &dir);
    cp.ready(std::time::Duration::from_secs(20)).await;
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let pod = opted_in_pod();
    let started = std::time::Instant::now();
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        post(&pki, port, "/inject", &review(pod.clone())),
    )
    .await;
    let (status, rsp) = answered.expect("answered while 300 silent connections are open");
    assert_eq!((status, &rsp["response"]["allowed"]), (200, &json!(true)));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // The oldest silent connections were closed for newer ones.
    let mut buf = [0u8; 1];
    let first =
        tokio::time::timeout(std::time::Duration::from_secs(1), silent[0].read(&mut buf)).await;
    assert!(matches!(first, Ok(Ok(0)) | Ok(Err(_))), "{first:?}");
    drop(silent);

    // Nor do connections that send a review's head and hold back its body:
    // they are as idle as silent ones.
    // Within the 10 s a held-back body may take: no place is given back by
    // a review ending meanwhile.
    let started = std::time::Instant::now();
    let _holding = holding_back(&pki, port, 1000, 260).await;
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(5).saturating_sub(started.elapsed()),
        post(&pki, port, "/inject", &review(pod)),
    )
    .await;
    let (status, rsp) = answered.expect("answered while 260 connections hold back their bodies");
    assert_eq!((status, &rsp["response"]["allowed"]), (200, &json!(true)));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// A connection asking the webhook for anything but a review (a GET, another
/// path, a body that is no review) is closed after its answer: asking again every few milliseconds
/// kept it from ever being idle, so 256 of them held every place the API
/// server's reviews need.
#[tokio::test]
async fn a_connection_asking_for_no_review_is_closed_after_its_answer() {
    let pki = Pki::new();
    let dir = ManifestDir::new();
    let (mut cp, port) = injector(&pki, &dir);
    cp.ready(std::time::Duration::from_secs(20)).await;
    for head in [
        "GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        "GET /inject HTTP/1.1\r\nhost: x\r\n\r\n",
        "POST /inject HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx",
    ] {
        let mut tls = connect(&pki, port).await;
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_to_end(&mut out))
                .await;
        assert!(read.is_ok(), "{head:?}: the connection was kept open");
        let text = String::from_utf8_lossy(&out);
        assert!(["404", "405", "400"].contains(&&text[9..12]), "{text}");
    }
}

/// `n` connections that each send a review's head declaring `length` bytes
/// and one byte of its body, and hold back the rest.
async fn holding_back(
    pki: &Pki,
    port: u16,
    length: usize,
    n: usize,
) -> Vec<tokio_rustls::client::TlsStream<TcpStream>> {
    let head = format!(
        "POST /inject HTTP/1.1\r\nhost: strait-controller.strait-system.svc\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n{{"
    );
    let mut holding = Vec::new();
    for _ in 0..n {
        let mut tls = connect(pki, port).await;
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        holding.push(tls);
    }
    holding
}

/// A review reserves room for its declared length before its body comes.
/// Connections that declare the most a small review may have and send no
/// body, more than the room there is, do not keep the API server's review
/// waiting until they time out (10 s): once their bodies are late, a review
/// that finds no room closes them one by one.
#[tokio::test]
async fn bodies_that_never_come_do_not_keep_the_api_server_from_the_injector() {
    let pki = Pki::new();
    let dir = ManifestDir::new();
    let (mut cp, port) = injector(&pki, &dir);
    cp.ready(std::time::Duration::from_secs(20)).await;
    // 64 of them hold the room of small reviews (16 MiB); the rest wait for
    // room, ahead of the API server's review.
    let mut holding = holding_back(&pki, port, 262_144, 100).await;
    let pod = opted_in_pod();
    // Within 5 s of the last of them, half the time they could hold room.
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        post(&pki, port, "/inject", &review(pod)),
    )
    .await;
    let (status, rsp) = answered.expect("answered while 100 connections hold room for no body");
    assert_eq!((status, &rsp["response"]["allowed"]), (200, &json!(true)));
    // The first of them, late the longest, was closed.
    let mut buf = [0u8; 1];
    let first =
        tokio::time::timeout(std::time::Duration::from_secs(1), holding[0].read(&mut buf)).await;
    assert!(matches!(first, Ok(Ok(0)) | Ok(Err(_))), "{first:?}");
}

/// One review on a kept-alive connection (as the API server keeps them):
/// the status, or `None` when the connection was closed instead.
async fn review_on(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    body: &[u8],
) -> Option<u16> {
    let head = format!(
        "POST /inject HTTP/1.1\r\nhost: strait-controller.strait-system.svc\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.ok()?;
    tls.write_all(body).await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tls.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        let Some((head, rest)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap();
        if rest.len() >= length {
            return head.split_whitespace().nth(1)?.parse().ok();
        }
    }
}

/// Told to stop, the controller closes the API server's kept-alive
/// connections to the injector (answering what is in flight first), and
/// still answers new ones, one review each, for its shutdown delay (a
/// terminating pod leaves its Service a moment later); then it exits.
#[tokio::test]
async fn a_stopping_controller_answers_reviews_for_its_delay_then_closes_connections() {
    let pki = Pki::new();
    let dir = ManifestDir::new();
    let (mut cp, port) = injector(&pki, &dir);
    cp.ready(std::time::Duration::from_secs(20)).await;
    let pod = opted_in_pod();
    let mut kept = connect(&pki, port).await;
    assert_eq!(review_on(&mut kept, &review(pod.clone())).await, Some(200));

    cp.proc.sigterm().await;
    let stopped = std::time::Instant::now();
    let mut buf = [0u8; 1];
    // The kept connection, idle, is closed at once (TLS close_notify, then
    // EOF), while the controller still runs.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(3), kept.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    assert!(cp.proc.child.try_wait().unwrap().is_none(), "still running");
    // During the delay a new connection is answered, once, then closed.
    let mut fresh = connect(&pki, port).await;
    assert_eq!(review_on(&mut fresh, &review(pod)).await, Some(200));
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(3), fresh.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    assert!(stopped.elapsed() < std::time::Duration::from_secs(4));
    let exited =
        tokio::time::timeout(std::time::Duration::from_secs(15), cp.proc.child.wait()).await;
    assert!(matches!(&exited, Ok(Ok(s)) if s.success()), "{exited:?}");
}

/// A reader that goes away (`strait check | head -3`, `| grep -q`) ends the
/// CLI as SIGPIPE ends a C or Go tool: quietly, not with a panic's message
/// and status 101.
#[test]
fn output_to_a_reader_gone_ends_quietly() {
    use std::process::Stdio;
    let mut child = std::process::Command::new(strait_tests::process::binary("strait"))
        .args(["install", "--ignore-cluster"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before anything is written: the first write fails.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Environment variables are read as a deployment writes them: a boolean as
/// `false`, `0` or `yes`, and a log filter checked as the flag's is.
#[test]
fn environment_variables_read_as_deployments_write_them() {
    let dir = ManifestDir::new();
    let strait = |env: &[(&str, &str)], args: &[&str]| {
        let mut c = std::process::Command::new(strait_tests::process::binary("strait"));
        c.args(args).envs(env.iter().copied());
        c.output().unwrap()
    };
    let manifests = dir.path().to_str().unwrap();
    // Off, it does not clash with --manifests: the next problem is reported.
    let off = strait(
        &[("STRAIT_KUBERNETES", "false")],
        &[
            "controller",
            "--manifests",
            manifests,
            "--webhook-addr=127.0.0.1:0",
        ],
    );
    let err = String::from_utf8_lossy(&off.stderr);
    assert_eq!(off.status.code(), Some(2), "{err}");
    assert!(err.contains("--trust-anchors"), "{err}");
    // On (as `yes`), it does, by name.
    let on = strait(
        &[("STRAIT_KUBERNETES", "yes")],
        &["controller", "--manifests", manifests],
    );
    let err = String::from_utf8_lossy(&on.stderr);
    assert_eq!(on.status.code(), Some(2), "{err}");
    assert!(err.contains("--manifests and --kubernetes"), "{err}");
    assert!(
        strait(&[("STRAIT_LOG_JSON", "1")], &["crds"])
            .status
            .success()
    );
    let bad = strait(&[("STRAIT_LOG", "a=b=c")], &["crds"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("STRAIT_LOG"), "{err}");
}

#[tokio::test]
async fn the_injector_needs_the_trust_anchors_and_a_certificate() {
    let dir = ManifestDir::new();
    let out = std::process::Command::new(strait_tests::process::binary("strait"))
        .args(["controller", "--manifests"])
        .arg(dir.path())
        .args([
            "--webhook-addr=127.0.0.1:0",
            "--admin-addr=127.0.0.1:0",
            "--grpc-addr=127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trust-anchors"));

    let pki = Pki::new();
    let out = std::process::Command::new(strait_tests::process::binary("strait"))
        .args(["controller", "--manifests"])
        .arg(dir.path())
        .arg(format!("--trust-anchors={}", pki.anchors().display()))
        .args([
            "--webhook-addr=127.0.0.1:0",
            "--admin-addr=127.0.0.1:0",
            "--grpc-addr=127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--webhook-cert") && err.contains("--issuer-cert"),
        "{err}"
    );

    // Its own certificate is not enough: the proxies it injects would get
    // none, and their apps never start.
    let out = tokio::process::Command::new(strait_tests::process::binary("strait"))
        .args(["controller", "--manifests"])
        .arg(dir.path())
        .arg(format!("--trust-anchors={}", pki.anchors().display()))
        .arg(format!("--webhook-cert={}", pki.issuer_cert().display()))
        .arg(format!("--webhook-key={}", pki.issuer_key().display()))
        .args([
            "--webhook-addr=127.0.0.1:0",
            "--admin-addr=127.0.0.1:0",
            "--grpc-addr=127.0.0.1:0",
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), out)
        .await
        .expect("refused at start, not served")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--issuer-cert"), "{err}");
}

/// The objects of a YAML stream by kind/namespace/name.
fn objects(yaml: &str) -> std::collections::BTreeMap<String, Value> {
    let mut out = std::collections::BTreeMap::new();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        let key = format!(
            "{}/{}/{}",
            v["kind"].as_str().unwrap(),
            v["metadata"]["namespace"].as_str().unwrap_or(""),
            v["metadata"]["name"].as_str().unwrap()
        );
        assert!(out.insert(key.clone(), v).is_none(), "{key} twice");
    }
    out
}

/// The identity material, which each generation makes anew.
fn without_keys(
    mut objs: std::collections::BTreeMap<String, Value>,
) -> std::collections::BTreeMap<String, Value> {
    for (k, v) in objs.iter_mut() {
        if k.starts_with("ConfigMap/strait-system/strait-trust-anchors") {
            v["data"]["ca.crt"] = json!("<generated>");
        }
        if k.starts_with("Secret/strait-system/strait-identity-issuer") {
            v["stringData"] = json!("<generated>");
        }
        if k.starts_with("MutatingWebhookConfiguration/")
            || k.starts_with("ValidatingWebhookConfiguration/")
        {
            for h in v["webhooks"].as_array_mut().unwrap() {
                h["clientConfig"]["caBundle"] = json!("<generated>");
            }
        }
        if k.starts_with("Deployment/strait-system/strait-controller") {
            v["spec"]["template"]["metadata"]["annotations"]["strait.dev/identity-checksum"] =
                json!("<generated>");
        }
    }
    objs
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// `strait install`, the Helm chart and `strait inject` make manifests that
/// pass strict schema validation; the chart renders what `strait install`
/// prints; custom resource examples fit their CRDs.
#[test]
fn install_the_chart_and_inject_make_the_same_valid_manifests() {
    use strait_tests::netns::have;
    if !have("helm") || !have("kubernetes-validate") {
        strait_tests::host::missing(
            "helm and kubernetes-validate (pip install kubernetes-validate; .ci/k8s-tools for helm)",
        );
        return;
    }
    let strait = strait_tests::process::binary("strait");
    let pki = Pki::new();
    let dir = ManifestDir::new();
    let identity = [
        format!("--identity-trust-anchors-file={}", pki.anchors().display()),
        format!(
            "--identity-issuer-certificate-file={}",
            pki.issuer_cert().display()
        ),
        format!("--identity-issuer-key-file={}", pki.issuer_key().display()),
    ];
    let install = run(std::process::Command::new(&strait)
        .arg("install")
        .args(&identity));
    // An issuer from another PKI than the anchors is refused, with the reason.
    let other = Pki::new();
    let mismatched = std::process::Command::new(&strait)
        .arg("install")
        .arg(format!(
            "--identity-trust-anchors-file={}",
            other.anchors().display()
        ))
        .args(&identity[1..])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&mismatched.stderr);
    assert!(!mismatched.status.success(), "{stderr}");
    assert!(
        stderr.contains("do not verify against the trust anchors"),
        "{stderr}"
    );
    // A trust domain the controller would refuse, refused before install.
    let bad = std::process::Command::new(&strait)
        .args([
            "install",
            "--ignore-cluster",
            "--trust-domain=spiffe://Example.ORG",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success()
            && stderr.contains("--trust-domain")
            && stderr.contains("not a trust domain"),
        "{stderr}"
    );
    // The namespace outlives a release that stops rendering it, and the
    // identity a release uninstalled (to be installed again, reading it back).
    for kept in [
        "Namespace//strait-system",
        "ConfigMap/strait-system/strait-trust-anchors",
        "Secret/strait-system/strait-identity-issuer",
    ] {
        let o = &objects(&install)[kept];
        assert_eq!(
            o["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "{kept}: {o}"
        );
    }
    let generated = run(std::process::Command::new(&strait).args(["install", "--ignore-cluster"]));
    let chart = repo("deploy/helm/strait");
    let helm = |extra: &[String]| {
        run(std::process::Command::new("helm")
            .args(["template", "strait"])
            .arg(&chart)
            .arg("--include-crds")
            .args(extra))
    };
    let set_file =
        |key: &str, path: &std::path::Path| format!("--set-file={key}={}", path.display());
    let anchors = set_file("identity.trustAnchorsPEM", &pki.anchors());
    let crt = set_file("identity.issuer.crtPEM", &pki.issuer_cert());
    let key = set_file("identity.issuer.keyPEM", &pki.issuer_key());
    let given = helm(&[anchors, crt.clone(), key.clone()]);
    // Without an identity and with no cluster to read one back from (as Argo
    // CD renders), refused: each render would make another.
    let no_cluster = std::process::Command::new("helm")
        .args(["template", "strait"])
        .arg(&chart)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&no_cluster.stderr);
    assert!(
        !no_cluster.status.success() && stderr.contains("rendered without a cluster"),
        "{stderr}"
    );
    let throwaway = "--set=identity.generateWithoutCluster=true".to_string();
    let default = helm(std::slice::from_ref(&throwaway));
    // Placement an operator of a large cluster sets: a PriorityClass, and
    // replicas spread across zones.
    let placed = objects(&helm(&[
        throwaway.clone(),
        "--set=priorityClassName=strait-critical".to_string(),
        r#"--set-json=topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"ScheduleAnyway","labelSelector":{"matchLabels":{"app.kubernetes.io/name":"strait-controller"}}}]"#.to_string(),
    ]));
    let spec = &placed["Deployment/strait-system/strait-controller"]["spec"]["template"]["spec"];
    assert_eq!(spec["priorityClassName"], "strait-critical", "{spec}");
    // The controller's log filter, for an incident, through the chart.
    let debug = objects(&helm(&[
        throwaway.clone(),
        "--set=logLevel=debug".to_string(),
    ]));
    let args = &debug["Deployment/strait-system/strait-controller"]["spec"]["template"]["spec"]["containers"]
        [0]["args"];
    assert!(
        args.as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--log-level=debug"),
        "{args}"
    );
    // No fixed uid (the image's), which OpenShift's restricted SCC refuses.
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{spec}");
    assert!(spec["securityContext"].get("runAsUser").is_none(), "{spec}");
    assert_eq!(
        spec["topologySpreadConstraints"][0]["topologyKey"], "topology.kubernetes.io/zone",
        "{spec}"
    );
    // Part of an identity, or something else than PEM, is refused with the
    // reason, rather than rendered into controllers that cannot start.
    for (extra, why) in [
        (vec![crt.clone()], "together, or none"),
        (
            vec!["--set=identity.trustAnchorsPEM=nope".to_string(), crt, key],
            "trustAnchorsPEM holds no PEM certificate",
        ),
        (
            vec!["--set=proxyIptablesMode=Legacy".to_string()],
            "proxyIptablesMode \"Legacy\": expected nft or legacy",
        ),
        (
            vec!["--set=proxyResources.cpuLimit=lots".to_string()],
            "proxyResources.cpuLimit \"lots\": expected a Kubernetes quantity",
        ),
        // What `strait install --replicas` refuses.
        (
            vec!["--set=replicas=0".to_string()],
            "replicas 0: expected 1 to 64",
        ),
        // A trust domain the controller would refuse at start.
        (
            vec!["--set=trustDomain=spiffe://Cluster.Local".to_string()],
            "trustDomain \"spiffe://Cluster.Local\": not a trust domain",
        ),
        // A misspelt key, which would change nothing, and a pull secret
        // the API server would refuse (named whatever Helm's wording).
        (vec!["--set=replica=3".to_string()], "replica"),
        (
            vec!["--set=tracing.otlpEndpiont=http://c:4317".to_string()],
            "otlpEndpiont",
        ),
        (
            vec!["--set=imagePullSecrets[0]=regcred".to_string()],
            "imagePullSecrets",
        ),
    ] {
        let out = std::process::Command::new("helm")
            .args(["template", "strait"])
            .arg(&chart)
            .arg(&throwaway)
            .args(&extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(why), "{stderr}");
    }

    // The controllers restart when the identity changes: their pod template
    // carries a hash of it, of the very identity the same render made.
    let checksum = |objs: &std::collections::BTreeMap<String, Value>| {
        let d = &objs["Deployment/strait-system/strait-controller"];
        d["spec"]["template"]["metadata"]["annotations"]["strait.dev/identity-checksum"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let rendered = objects(&default);
    let made = strait_control_plane::install::Identity {
        anchors_pem: rendered["ConfigMap/strait-system/strait-trust-anchors"]["data"]["ca.crt"]
            .as_str()
            .unwrap()
            .into(),
        issuer_cert_pem:
            rendered["Secret/strait-system/strait-identity-issuer"]["stringData"]["tls.crt"]
                .as_str()
                .unwrap()
                .into(),
        issuer_key_pem: String::new(),
    };
    assert_eq!(
        checksum(&rendered),
        strait_control_plane::install::identity_checksum(&made)
    );
    assert_ne!(checksum(&objects(&install)), checksum(&objects(&generated)));

    // Same identity: the very same objects. Generated: the same but for keys.
    assert_eq!(objects(&given), objects(&install));
    // Traces and access logs of the mesh, set the same way through both.
    let telemetry = ["http://otel.observability:4317", "0.1", "json"];
    let installed = run(std::process::Command::new(&strait)
        .arg("install")
        .args(&identity)
        .arg(format!("--otlp-endpoint={}", telemetry[0]))
        .arg(format!("--proxy-trace-sampling={}", telemetry[1]))
        .arg(format!("--proxy-access-log={}", telemetry[2]))
        .args(["--proxy-cpu-request=50m", "--proxy-memory-limit=1Gi"]));
    let charted = helm(&[
        set_file("identity.trustAnchorsPEM", &pki.anchors()),
        set_file("identity.issuer.crtPEM", &pki.issuer_cert()),
        set_file("identity.issuer.keyPEM", &pki.issuer_key()),
        format!("--set=tracing.otlpEndpoint={}", telemetry[0]),
        format!("--set=tracing.proxySampling={}", telemetry[1]),
        format!("--set=proxyAccessLog={}", telemetry[2]),
        "--set=proxyResources.cpuRequest=50m".to_string(),
        "--set=proxyResources.memoryLimit=1Gi".to_string(),
    ]);
    assert_eq!(objects(&charted), objects(&installed));
    let args = objects(&installed)["Deployment/strait-system/strait-controller"]["spec"]
        ["template"]["spec"]["containers"][0]["args"]
        .clone();
    for want in [
        "--otlp-endpoint=http://otel.observability:4317",
        "--proxy-otlp-endpoint=http://otel.observability:4317",
        "--proxy-trace-sampling=0.1",
        "--proxy-access-log=json",
        "--proxy-cpu-request=50m",
        "--proxy-memory-limit=1Gi",
    ] {
        assert!(
            args.as_array().unwrap().iter().any(|a| a == want),
            "{want} in {args}"
        );
    }
    assert_eq!(
        without_keys(objects(&default)),
        without_keys(objects(&generated))
    );
    assert_ne!(
        objects(&generated),
        objects(&install),
        "a fresh anchor each time"
    );
    // The chart's CRDs are strait's.
    assert_eq!(
        std::fs::read_to_string(chart.join("crds/policy.strait.dev.yaml")).unwrap(),
        run(std::process::Command::new(&strait).arg("crds"))
    );
    run(std::process::Command::new("helm")
        .arg("lint")
        .arg("--strict")
        .arg(&throwaway)
        .arg(&chart));

    // Every built-in object passes strict validation (unknown fields are errors).
    let mut examples: Vec<_> = std::fs::read_dir(repo("deploy/examples/workloads"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    examples.sort();
    let mut injected = String::new();
    for e in &examples {
        injected.push_str("---\n");
        injected.push_str(&run(std::process::Command::new(&strait)
            .arg("inject")
            .arg(e)
            .arg(&identity[0])));
    }
    assert!(
        injected.matches("name: \"strait-proxy\"\n").count() >= 4,
        "the examples were injected"
    );
    for (name, yaml) in [
        ("install.yaml", &install),
        ("helm.yaml", &default),
        ("injected.yaml", &injected),
    ] {
        dir.write(name, yaml);
        let out = run(std::process::Command::new("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", "1.33.0", "--no-warn"])
            .arg(dir.path().join(name)));
        assert!(
            !out.contains("ERROR") && !out.contains("FAIL"),
            "{name}: {out}"
        );
    }
    // The validator does refuse an unknown field.
    dir.write(
        "bad.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {}\nspecial: 1\n",
    );
    let bad = std::process::Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .arg(dir.path().join("bad.yaml"))
        .output()
        .unwrap();
    assert!(
        !bad.status.success(),
        "strict validation must catch an unknown field"
    );

    // Custom resource examples fit their CRDs.
    let mut crs = vec![repo("deploy/crds/policy.strait.dev.yaml")];
    crs.extend(examples);
    crs.extend(
        std::fs::read_dir(repo("deploy/examples/demo"))
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    let out = run(std::process::Command::new("python3")
        .arg(repo("tests/scripts/validate_custom_resources.py"))
        .args(&crs));
    assert!(
        out.contains("3 custom resources checked, 0 failed"),
        "{out}"
    );
}

/// What the injector writes into the init container's environment (the
/// iptables backend, the networks a pod skips) is what `strait-proxy init`
/// reads: a value it refused would keep every such pod from starting.
#[test]
fn the_init_container_takes_what_the_injector_writes() {
    let pki = Pki::new();
    let dir = ManifestDir::new();
    dir.write(
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: shop\n  annotations:\n    strait.dev/inject: enabled\n    strait.dev/skip-outbound-cidrs: \"169.254.169.254, 10.0.0.0/8\"\nspec:\n  containers: [{name: app, image: app}]\n",
    );
    let injected = run(
        std::process::Command::new(strait_tests::process::binary("strait"))
            .arg("inject")
            .arg(dir.path().join("pod.yaml"))
            .arg(format!(
                "--identity-trust-anchors-file={}",
                pki.anchors().display()
            ))
            .args(["--proxy-iptables-mode", "legacy"]),
    );
    let pod: serde_json::Value = serde_norway::from_str(&injected).unwrap();
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["name"], "strait-init");
    let mut cmd = std::process::Command::new(strait_tests::process::binary("strait-proxy"));
    cmd.args(
        init["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap()),
    )
    .arg("--dry-run")
    .env_clear()
    // Kubernetes' service links for Services named `strait-proxy-inbound`
    // and `strait-proxy-outbound` in the pod's namespace.
    .env("STRAIT_PROXY_INBOUND_PORT", "tcp://10.96.0.7:80")
    .env("STRAIT_PROXY_OUTBOUND_PORT", "tcp://10.96.0.8:80");
    let mut names = Vec::new();
    for e in init["env"].as_array().unwrap() {
        names.push(e["name"].as_str().unwrap().to_string());
        cmd.env(e["name"].as_str().unwrap(), e["value"].as_str().unwrap());
    }
    assert!(
        names.contains(&"STRAIT_PROXY_IPTABLES_MODE".to_string())
            && names.contains(&"STRAIT_PROXY_SKIP_OUTBOUND_CIDRS".to_string()),
        "{names:?}"
    );
    let rules = run(&mut cmd);
    for skipped in ["169.254.169.254/32", "10.0.0.0/8"] {
        assert!(rules.contains(skipped), "{skipped} not in:\n{rules}");
    }
}
