//! Identity and mTLS with the real binaries: certificates from the controller's CA,
//! verified peers, STRICT mode and allow lists, rotation of certificates and of
//! trust anchors, and no key material outside the proxy's memory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use strait_api::v1 as api;
use strait_api::v1::identity_client::IdentityClient;
use strait_tests::backend::Backend;
use strait_tests::load::Load;
use strait_tests::manifests::{ManifestDir, endpoint, meshed_pod, service};
use strait_tests::mesh::{
    ControllerProc, Sidecar, SidecarIdentity, SidecarOpts, metric_sum, metric_where,
};
use strait_tests::pki::{
    Pki, controller_channel, controller_channel_as, csr, exchange_over_tls, request_over_tls,
    token_file, token_secret,
};
use strait_tests::process::free_port;
use strait_tests::{client, wait};

const NS: &str = "test";
const WEB: &str = "web.test.svc.cluster.local:80";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/test/sa/client";

/// A controller issuing certificates, the `web` service (one backend behind a
/// sidecar running as service account `web_sa`) and token files for `client`,
/// `web` and `intruder`.
struct Mesh {
    dir: ManifestDir,
    tokens: ManifestDir,
    pki: Pki,
    anchors: PathBuf,
    ctl: ControllerProc,
    backend: Backend,
    web: Sidecar,
}

impl Mesh {
    async fn start(web_sa: &str, lifetime: Option<&str>) -> Mesh {
        let pki = Pki::new();
        let anchors = pki.anchors();
        Self::start_with(pki, anchors, web_sa, lifetime).await
    }

    async fn start_with(pki: Pki, anchors: PathBuf, web_sa: &str, lifetime: Option<&str>) -> Mesh {
        Self::start_web_args(pki, anchors, web_sa, lifetime, &[]).await
    }

    /// With more flags for web's proxy.
    async fn start_web_args(
        pki: Pki,
        anchors: PathBuf,
        web_sa: &str,
        lifetime: Option<&str>,
        web_args: &[&str],
    ) -> Mesh {
        let dir = ManifestDir::new();
        let tokens = ManifestDir::new();
        for sa in ["client", "web", "intruder"] {
            dir.write(
                &format!("token-{sa}.yaml"),
                &token_secret(NS, sa, &format!("token-of-{sa}")),
            );
            token_file(tokens.path(), sa, &format!("token-of-{sa}"));
        }
        dir.write("svc.yaml", &service(NS, "web", 80));
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let ctl = ControllerProc::start_with(dir.path(), grpc, Some(&pki), lifetime).await;
        let backend = Backend::start().await;
        let opts = SidecarOpts {
            identity: Some(identity(&anchors, &tokens, web_sa)),
            args: web_args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        let web = Sidecar::start_with(ctl.grpc, NS, "web-0", &[], opts).await;
        // The pod is declared with service account `web`: what clients will expect.
        dir.write(
            "pod-web.yaml",
            &meshed_pod(NS, "web-0", "web", web.inbound.port()),
        );
        dir.write(
            "slice-web.yaml",
            &endpoint(NS, "web", "web-0", backend.addr),
        );
        Mesh {
            dir,
            tokens,
            pki,
            anchors,
            ctl,
            backend,
            web,
        }
    }

    fn identity(&self, sa: &str) -> SidecarIdentity {
        identity(&self.anchors, &self.tokens, sa)
    }

    async fn sidecar(&self, pod: &str, sa: &str, upstreams: &[&str]) -> Sidecar {
        let opts = SidecarOpts {
            identity: Some(self.identity(sa)),
            ..Default::default()
        };
        Sidecar::start_with(self.ctl.grpc, NS, pod, upstreams, opts).await
    }

    /// A plaintext request straight to web's inbound port, as a client outside the mesh.
    async fn plaintext(&self) -> (http::StatusCode, String) {
        self.plaintext_to("GET", "/client-id").await
    }

    /// Declares web's pod with an HTTP probe (readiness, then liveness) at
    /// each path, of its app's port.
    fn probed_at(&self, paths: &[&str]) {
        let probes: String = ["readinessProbe", "livenessProbe"]
            .iter()
            .zip(paths)
            .map(|(kind, path)| format!("    {kind}: {{httpGet: {{path: {path}, port: http}}}}\n"))
            .collect();
        self.dir.write(
            "pod-web.yaml",
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-0\n  namespace: {NS}\n  annotations: {{strait.dev/inbound-port: \"{}\"}}\nspec:\n  serviceAccountName: web\n  containers:\n  - name: app\n    image: app\n    ports: [{{name: http, containerPort: {}}}]\n{probes}",
                self.web.inbound.port(),
                self.backend.addr.port()
            ),
        );
    }

    async fn plaintext_to(&self, method: &str, target: &str) -> (http::StatusCode, String) {
        self.plaintext_with(method, target, &[], "").await
    }

    async fn plaintext_with(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &'static str,
    ) -> (http::StatusCode, String) {
        let c = client::http1();
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{target}", self.web.inbound))
            .header("strait-target-port", self.backend.addr.port());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(client::body(body)).unwrap();
        let rsp = c.request(req).await.expect("plaintext request");
        let status = rsp.status();
        use http_body_util::BodyExt;
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

fn identity(anchors: &std::path::Path, tokens: &ManifestDir, sa: &str) -> SidecarIdentity {
    SidecarIdentity {
        anchors: anchors.to_path_buf(),
        token_file: tokens.path().join(format!("{sa}.token")),
        service_account: sa.to_string(),
    }
}

/// STRICT on web, allowing the client only; once web's proxy refuses plaintext.
async fn strict_for_client(m: &Mesh) {
    m.dir.write(
        "policy.yaml",
        &policy("STRICT", &format!("{{identity: \"{CLIENT_ID}\"}}")),
    );
    wait::until("STRICT to apply", Duration::from_secs(5), || async {
        m.plaintext().await.0 == 403
    })
    .await;
}

fn policy(mtls: &str, allow: &str) -> String {
    format!(
        "apiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  targetRef: {{kind: Service, name: web}}\n  mtls: {mtls}\n  allow: [{allow}]\n"
    )
}

async fn get(url: &str) -> (http::StatusCode, String) {
    client::get(&client::http1(), url).await.expect("request")
}

/// Waits for `url` (an app's `/client-id`) to be served with the client's
/// verified identity, then checks it is, with a 200.
async fn served_as_client(url: &str, what: &str) {
    wait::until(what, Duration::from_secs(5), || async {
        get(url).await.1 == CLIENT_ID
    })
    .await;
    let (status, body) = get(url).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, CLIENT_ID));
}

#[tokio::test]
async fn meshed_requests_carry_the_verified_client_identity() {
    let m = Mesh::start("web", None).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let url = format!("http://{}/client-id", c.upstreams[0]);
    let (status, body) = get(&url).await;
    assert_eq!(status, 200);
    assert_eq!(
        body, CLIENT_ID,
        "the app learns the caller's verified identity"
    );
    // PERMISSIVE by default: a plaintext client outside the mesh is served, and
    // cannot pretend to be anyone.
    let (status, body) = m.plaintext().await;
    assert_eq!(status, 200);
    assert_eq!(body, "none");
    // The default lifetime is a day.
    let expiry = metric_sum(
        c.admin,
        "strait_proxy_identity_cert_expiration_timestamp_seconds",
    )
    .await;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now + 23.0 * 3600.0..now + 25.0 * 3600.0).contains(&expiry),
        "expiry {expiry}, now {now}"
    );
}

/// Once it has a certificate, a proxy proves itself to the controller with it:
/// a destination first used after its token stopped proving anything (expired,
/// revoked, or the API server down past the controller's cache) is still
/// watched, so it is still reached over mTLS rather than passed through.
#[tokio::test]
async fn watches_opened_after_the_first_certificate_are_proved_by_it() {
    let m = Mesh::start("web", None).await;
    // Ready: certified, on a connection opened before that, with the token.
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    token_file(m.tokens.path(), "client", "a-token-nobody-issued");
    let url = format!("http://{}/client-id", c.upstreams[0]);
    let (status, body) = get(&url).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, CLIENT_ID),
        "web is watched with the certificate, and reached over mTLS"
    );
}

/// `/config` shows what a proxy knows: its certificate, the destinations it
/// watches with their endpoints and the identities expected of them, and its
/// inbound policy.
#[tokio::test]
async fn the_admin_config_shows_what_the_proxy_knows() {
    let m = Mesh::start("web", None).await;
    strict_for_client(&m).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let (status, _) = get(&format!("http://{}/client-id", c.upstreams[0])).await;
    assert_eq!(status, 200);
    let config = |admin| async move {
        let (status, body) = strait_tests::wait::admin_get(admin, "/config")
            .await
            .unwrap();
        assert_eq!(status, 200);
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["state"].clone()
    };
    let known = config(c.admin).await;
    assert_eq!(known["identity"]["identity"], CLIENT_ID, "{known:#}");
    assert!(known["identity"]["valid_until"].is_string(), "{known:#}");
    let dest = &known["destinations"][0];
    assert_eq!(dest["destination"], WEB, "{known:#}");
    assert_eq!(dest["controller"], "answering", "{known:#}");
    assert_eq!(dest["answer"]["service"], WEB, "{known:#}");
    assert_eq!(dest["answer"]["routes_attached"], false, "{known:#}");
    let endpoint = &dest["answer"]["backends"][0]["endpoints"][0];
    assert_eq!(
        endpoint["identity"], "spiffe://cluster.local/ns/test/sa/web",
        "{known:#}"
    );
    assert_eq!(endpoint["proxy_port"], m.web.inbound.port(), "{known:#}");
    let known = config(m.web.admin).await;
    let web = &known["inbound_policy"]["default"];
    assert_eq!(web["mtls"], "STRICT", "{known:#}");
    assert_eq!(web["allow"][0]["identity"], CLIENT_ID, "{known:#}");
}

/// One HTTP/2 connection between two proxies carries at most the peer's
/// 1,000 concurrent streams: more concurrent requests than that ride a second
/// connection rather than queue (and the server proxy does the same towards an
/// app whose own limit is hyper's 200).
#[tokio::test]
async fn more_concurrent_requests_than_one_connection_takes_are_all_in_flight() {
    const REQUESTS: usize = 1_500;
    let m = Mesh::start("web", None).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let url: http::Uri = format!("http://{}/hold", c.upstreams[0]).parse().unwrap();
    // The app's own HTTP/2 connections to its sidecar: two, each under the limit.
    let apps = [client::http2(), client::http2()];
    let mut sent = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let (app, url) = (apps[i % 2].clone(), url.clone());
        sent.spawn(async move {
            let rsp = app.get(url).await?;
            let status = rsp.status();
            http_body_util::BodyExt::collect(rsp.into_body()).await?;
            anyhow::Ok(status)
        });
    }
    let backend = m.backend.stats.clone();
    wait::until(
        "every request in flight at the app at once",
        Duration::from_secs(30),
        || {
            let backend = backend.clone();
            async move { backend.in_flight.load(std::sync::atomic::Ordering::SeqCst) == REQUESTS }
        },
    )
    .await;
    m.backend.release_held();
    let mut ok = 0;
    while let Some(done) = sent.join_next().await {
        let status = done.expect("request task").expect("request");
        assert_eq!(status, 200);
        ok += 1;
    }
    assert_eq!(ok, REQUESTS);
    // Every request crossed the pair over mTLS as the client's identity.
    let allowed = metric_sum(m.web.admin, "strait_proxy_inbound_authorizations_total").await;
    assert!(allowed >= REQUESTS as f64, "authorizations {allowed}");
}

#[tokio::test]
async fn strict_refuses_plaintext_and_the_allow_list_picks_identities() {
    let m = Mesh::start("web", None).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let intruder = m.sidecar("intruder-0", "intruder", &[WEB]).await;
    strict_for_client(&m).await;
    // A caller outside the mesh gets the status, not how the port's policy
    // is set (which the proxy logs).
    let (status, body) = m.plaintext().await;
    assert_eq!((status.as_u16(), body.as_str()), (403, "Forbidden\n"));

    let (status, body) = get(&format!("http://{}/client-id", c.upstreams[0])).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, CLIENT_ID));
    let (status, body) = get(&format!("http://{}/client-id", intruder.upstreams[0])).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("spiffe://cluster.local/ns/test/sa/intruder is not allowed"),
        "{body}"
    );

    let (_, text) = wait::admin_get(m.web.admin, "/metrics").await.unwrap();
    assert!(
        text.lines().any(
            |l| l.starts_with("strait_proxy_inbound_authorizations_total")
                && l.contains("sa/intruder")
                && l.contains("decision=\"deny\"")
        ),
        "denials are counted by peer identity:\n{text}"
    );

    // A namespace in the allow list admits its workloads.
    m.dir
        .write("policy.yaml", &policy("STRICT", "{namespace: test}"));
    let url = format!("http://{}/client-id", intruder.upstreams[0]);
    wait::until(
        "the namespace rule to apply",
        Duration::from_secs(5),
        || async { get(&url).await.0 == 200 },
    )
    .await;
}

/// The kubelet's probes start no trace: a root span every probe period of
/// every pod, at the default sampling, would crowd out the app's. Other
/// plaintext requests still do.
#[tokio::test]
async fn the_kubelets_probes_are_not_traced() {
    use strait_tests::otlp::{Mode, OtlpCollector};
    let collector = OtlpCollector::start(Mode::Accept).await;
    let otlp = format!("--otlp-endpoint={}", collector.endpoint());
    let pki = Pki::new();
    let anchors = pki.anchors();
    let m = Mesh::start_web_args(pki, anchors, "web", None, &[&otlp, "--trace-sampling=1"]).await;
    m.probed_at(&["/healthz", "/trace-context"]);
    // Probes until one is let in as a probe (the route known): those
    // before it were ordinary requests, and traced.
    let admitted = || {
        metric_where(
            m.web.admin,
            "strait_proxy_inbound_authorizations_total",
            &["decision=\"probe\""],
        )
    };
    let mut before = 0;
    wait::until("the probe route", Duration::from_secs(5), || {
        before += 1;
        async {
            m.plaintext_to("GET", "/healthz").await;
            admitted().await > 0.0
        }
    })
    .await;
    for _ in 0..3 {
        assert_eq!(m.plaintext_to("GET", "/healthz").await.0, 200);
    }
    // Nor does an instrumented app: the context it is handed is not sampled.
    let (_, seen) = m.plaintext_to("GET", "/trace-context").await;
    let traceparent = seen.lines().next().unwrap_or_default();
    assert!(
        traceparent.starts_with("traceparent=00-") && traceparent.ends_with("-00"),
        "{seen}"
    );
    assert_eq!(m.plaintext_to("GET", "/other").await.0, 200);
    let path = |s: &strait_tests::otlp::Received| s.attr("url.path").unwrap_or_default();
    // Spans leave in the order they end: the probes' would be before it.
    let spans = collector
        .wait_until(Duration::from_secs(10), |spans| {
            spans.iter().any(|s| path(s) == "/other")
        })
        .await;
    assert!(spans.iter().any(|s| path(s) == "/other"), "{spans:#?}");
    let probes = spans.iter().filter(|s| path(s) == "/healthz").count();
    assert_eq!(probes, before - 1, "spans of requests let in as probes");
}

/// STRICT does not fail the pod's probes: the kubelet, which has no identity,
/// gets through in plaintext to exactly what the pod declares it probes.
#[tokio::test]
async fn the_kubelets_probes_pass_strict_and_nothing_else_does() {
    let m = Mesh::start("web", None).await;
    m.probed_at(&["/healthz"]);
    m.dir
        .write("policy.yaml", &policy("STRICT", "{namespace: test}"));
    wait::until(
        "STRICT and the probe to apply",
        Duration::from_secs(5),
        || async {
            m.plaintext().await.0 == 403 && m.plaintext_to("GET", "/healthz").await.0 == 200
        },
    )
    .await;
    let (_, text) = wait::admin_get(m.web.admin, "/metrics").await.unwrap();
    let before = plaintext(&text);
    let (status, body) = m.plaintext_to("GET", "/healthz").await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "ok"));
    for (method, target) in [
        ("POST", "/healthz"),
        ("GET", "/healthz/"),
        ("GET", "/healthz?x=1"),
    ] {
        let (status, body) = m.plaintext_to(method, target).await;
        assert_eq!(
            (status.as_u16(), body.as_str()),
            (403, "Forbidden\n"),
            "{method} {target}"
        );
    }
    // Nothing more than the probe: not a body (whatever headers are left to
    // say so), not an upgrade, which would open a tunnel to the app.
    for headers in [&[][..], &[("connection", "content-length")][..]] {
        let (status, body) = m.plaintext_with("GET", "/healthz", headers, "hello").await;
        assert_eq!(status, 403, "a body with {headers:?}: {body}");
    }
    let upgrade = [("connection", "upgrade"), ("upgrade", "websocket")];
    let (status, body) = m.plaintext_with("GET", "/healthz", &upgrade, "").await;
    assert_eq!(status, 403, "{body}");
    // The probes are counted apart from other plaintext callers, so that an
    // operator can tell whether any but the kubelet remain.
    let (_, text) = wait::admin_get(m.web.admin, "/metrics").await.unwrap();
    let after = plaintext(&text);
    assert!(after("probe") >= before("probe") + 1.0, "{text}");
    assert_eq!(after("allow"), before("allow"), "{text}");
    assert_eq!(after("deny"), before("deny") + 6.0, "{text}");
}

/// Plaintext HTTP requests by the authorization's decision, in a proxy's
/// metrics.
fn plaintext(text: &str) -> impl Fn(&str) -> f64 + '_ {
    move |decision: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("strait_proxy_inbound_authorizations_total{")
                    && l.contains("peer=\"unauthenticated\"")
                    && l.contains("protocol=\"http\"")
                    && l.contains(&format!("decision=\"{decision}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    }
}

/// A mesh, a client's proxy serving web, and a connection to it.
async fn connected_to_web() -> (Mesh, Sidecar, tokio::net::TcpStream) {
    let m = Mesh::start("web", None).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    served_as_client(
        &format!("http://{}/client-id", c.upstreams[0]),
        "web to be reached",
    )
    .await;
    let s = tokio::net::TcpStream::connect(c.upstreams[0])
        .await
        .unwrap();
    (m, c, s)
}

/// An HTTP/1.0 request without `Host` reaches the app naming the address it
/// was sent to, not the server proxy's own address and port.
#[tokio::test]
async fn an_http10_request_without_host_names_where_it_was_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_m, _c, mut s) = connected_to_web().await;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut rsp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rsp))
        .await
        .expect("an answer, then the end")
        .unwrap();
    let rsp = String::from_utf8_lossy(&rsp).to_lowercase();
    assert!(rsp.starts_with("http/1.0 200"), "{rsp}");
    assert!(
        rsp.contains(&format!("x-seen-host: {WEB}\r\n")),
        "the app was told another host: {rsp}"
    );
}

/// An HTTP/1.0 client that asks to keep its connection (`ab -k`) keeps it
/// through the mesh: each response says so, and the next request is
/// answered on the same connection.
#[tokio::test]
async fn an_http10_client_keeps_its_connection_alive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_m, _c, mut s) = connected_to_web().await;
    for i in 0..3 {
        s.write_all(b"GET /client-id HTTP/1.0\r\nHost: web\r\nConnection: Keep-Alive\r\n\r\n")
            .await
            .unwrap();
        // The head, then as many bytes as it says.
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
                .await
                .expect("an answer")
                .unwrap();
            assert_eq!(
                n,
                1,
                "request {i}: closed after {:?}",
                String::from_utf8_lossy(&got)
            );
            got.push(b[0]);
        }
        let head = String::from_utf8_lossy(&got).to_lowercase();
        assert!(head.starts_with("http/1.0 200"), "request {i}: {head}");
        assert!(
            head.contains("connection: keep-alive\r\n"),
            "request {i}: {head}"
        );
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("a length")
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(body, CLIENT_ID.as_bytes(), "request {i}");
    }
}

/// A client that dials a meshed pod's own address, as a StatefulSet's clients
/// do, reaches it over mTLS with its identity checked, not in plaintext.
#[tokio::test]
async fn a_pod_dialled_by_its_own_address_is_reached_over_mtls() {
    let m = Mesh::start("web", None).await;
    // The pod's address is where its app listens: loopback, in this mesh.
    m.dir.write(
        "pod-web.yaml",
        &format!(
            "{}status: {{phase: Running, podIP: 127.0.0.1, podIPs: [{{ip: 127.0.0.1}}]}}\n",
            meshed_pod(NS, "web-0", "web", m.web.inbound.port())
        ),
    );
    let pod_addr = m.backend.addr.to_string();
    let c = m.sidecar("client-0", "client", &[&pod_addr]).await;
    let url = format!("http://{}/client-id", c.upstreams[0]);
    served_as_client(&url, "the pod's address to resolve to it").await;
    // The pod's policy holds on that path too.
    m.dir
        .write("policy.yaml", &policy("STRICT", "{namespace: other}"));
    wait::until("the policy to apply", Duration::from_secs(5), || async {
        get(&url).await.0 == 403
    })
    .await;
}

/// Kubernetes takes a service-account name with a dot-free part over 63 bytes,
/// which makes no DNS name for the handshake's SNI: such a pod is still
/// reached, over mTLS, by its URI identity.
#[tokio::test]
async fn a_service_account_name_that_is_no_dns_label_is_reached_over_mtls() {
    let m = Mesh::start("web", None).await;
    let long = "a".repeat(64);
    m.dir
        .write("token-long.yaml", &token_secret(NS, &long, "token-of-long"));
    token_file(m.tokens.path(), &long, "token-of-long");
    // The pod must be known (as that account's) for its proxy to get its
    // policy; its inbound port is known once the proxy runs.
    let pod = |port| meshed_pod(NS, "long-0", &long, port);
    m.dir.write("pod-long.yaml", &pod(1));
    let long_web = m.sidecar("long-0", &long, &[]).await;
    m.dir.write("pod-long.yaml", &pod(long_web.inbound.port()));
    m.dir.write(
        "slice-web.yaml",
        &endpoint(NS, "web", "long-0", m.backend.addr),
    );
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    // Only long-0's proxy holds that account, and web's only endpoint is there.
    served_as_client(
        &format!("http://{}/client-id", c.upstreams[0]),
        "web to be reached as the long account",
    )
    .await;
}

#[tokio::test]
async fn a_peer_with_the_wrong_identity_is_refused_by_the_client_proxy() {
    // web-0 is declared as service account `web`, but its proxy holds `intruder`.
    let m = Mesh::start("intruder", None).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let (status, body) = get(&format!("http://{}/client-id", c.upstreams[0])).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("presented identity spiffe://cluster.local/ns/test/sa/intruder")
            && body.contains("promised spiffe://cluster.local/ns/test/sa/web"),
        "{body}"
    );
    assert_eq!(
        m.backend.requests(),
        0,
        "nothing reached the impostor's app"
    );
    assert!(metric_sum(c.admin, "strait_proxy_tls_identity_mismatches_total").await >= 1.0);
}

#[tokio::test]
async fn the_controller_signs_only_the_identity_a_token_proves() {
    let dir = ManifestDir::new();
    dir.write("t.yaml", &token_secret(NS, "client", "secret-client-token"));
    let pki = Pki::new();
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ctl = ControllerProc::start_with(dir.path(), grpc, Some(&pki), Some("1h")).await;
    // A plaintext client gets nowhere: the port is TLS-only once certificates are issued.
    let mut plain = IdentityClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    assert!(
        plain
            .certify(api::CertifyRequest {
                identity: CLIENT_ID.into(),
                token: b"secret-client-token".to_vec(),
                csr_der: csr(CLIENT_ID),
            })
            .await
            .is_err()
    );
    let mut c = IdentityClient::new(
        controller_channel(grpc, &std::fs::read_to_string(pki.anchors()).unwrap()).await,
    );
    let ask = |identity: &str, token: &str, csr_for: &str| api::CertifyRequest {
        identity: identity.into(),
        token: token.as_bytes().to_vec(),
        csr_der: csr(csr_for),
    };
    let ok = c
        .certify(ask(CLIENT_ID, "secret-client-token", CLIENT_ID))
        .await
        .unwrap()
        .into_inner();
    let leaf = rustls_pki_types::CertificateDer::from(ok.leaf_der.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    assert_eq!(ee.valid_uri_names().collect::<Vec<_>>(), [CLIENT_ID]);
    let until = ok.valid_until.unwrap().seconds;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((until - now - 3600).abs() < 30, "lifetime as configured");

    let web = "spiffe://cluster.local/ns/test/sa/web";
    let e = c
        .certify(ask(web, "secret-client-token", web))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = c
        .certify(ask(CLIENT_ID, "secret-client-token", web))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::PermissionDenied,
        "a CSR for another name: {e:?}"
    );
    let e = c
        .certify(ask(CLIENT_ID, "guessed", CLIENT_ID))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(
        ctl.metric("strait_controller_identity_certify_refusals_total")
            .await
            >= 1.0
    );
    // The test PKI's issuer is valid for a day: the gauge says when to rotate.
    let expires = ctl
        .metric("strait_controller_identity_issuer_expiration_timestamp_seconds")
        .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (expires - (now + 86400.0)).abs() < 3600.0,
        "issuer expiry {expires}, now {now}"
    );
}

/// Opens a discovery watch of `web` and a policy watch of `pod`, each with
/// `token` as the bearer credential if given; returns the code of each (Ok when
/// the first message arrived).
async fn watch_codes(
    channel: tonic::transport::Channel,
    token: Option<&str>,
    ns: &str,
    pod: &str,
) -> (tonic::Code, tonic::Code) {
    use strait_api::v1::discovery_client::DiscoveryClient;
    use strait_api::v1::inbound_policy_client::InboundPolicyClient;
    fn with<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    }
    async fn first<M>(
        r: Result<tonic::Response<tonic::Streaming<M>>, tonic::Status>,
    ) -> tonic::Code {
        match r {
            Ok(rsp) => match rsp.into_inner().message().await {
                Ok(Some(_)) => tonic::Code::Ok,
                Ok(None) => tonic::Code::Unknown,
                Err(e) => e.code(),
            },
            Err(e) => e.code(),
        }
    }
    let d = DiscoveryClient::new(channel.clone())
        .watch(with(
            api::WatchDestination {
                destination: WEB.into(),
                context_namespace: NS.into(),
                proxy_id: "probe".into(),
            },
            token,
        ))
        .await;
    let d = first(d).await;
    let p = InboundPolicyClient::new(channel)
        .watch(with(
            api::WatchWorkload {
                namespace: ns.into(),
                pod: pod.into(),
                proxy_id: "probe".into(),
            },
            token,
        ))
        .await;
    (d, first(p).await)
}

#[tokio::test]
async fn the_controller_answers_only_proxies_of_the_mesh_and_each_only_its_own_policy() {
    let m = Mesh::start("web", None).await;
    let anchors = std::fs::read_to_string(&m.anchors).unwrap();
    let chan = || controller_channel(m.ctl.grpc, &anchors);
    use tonic::Code::{Ok as Answered, PermissionDenied, Unauthenticated};
    // A stranger on the network: no credential, or a made-up one.
    assert_eq!(
        watch_codes(chan().await, None, NS, "web-0").await,
        (Unauthenticated, Unauthenticated)
    );
    assert_eq!(
        watch_codes(chan().await, Some("guessed"), NS, "web-0").await,
        (Unauthenticated, Unauthenticated)
    );
    // A proxy of the mesh by its token: discovery, and its own pod's policy only.
    assert_eq!(
        watch_codes(chan().await, Some("token-of-web"), NS, "web-0").await,
        (Answered, Answered)
    );
    assert_eq!(
        watch_codes(chan().await, Some("token-of-client"), NS, "web-0").await,
        (Answered, PermissionDenied),
        "client's token must not read web's policy"
    );
    assert_eq!(
        watch_codes(chan().await, Some("token-of-web"), "other", "web-0").await,
        (Answered, PermissionDenied),
        "nor a pod of another namespace"
    );
    // By its workload certificate, with no token at all.
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);
    let leaf = m.pki.leaf(
        "spiffe://cluster.local/ns/test/sa/web",
        now - day,
        now + day,
    );
    let as_web = controller_channel_as(m.ctl.grpc, &anchors, Some(leaf)).await;
    assert_eq!(
        watch_codes(as_web, None, NS, "web-0").await,
        (Answered, Answered)
    );
    // A certificate from another CA proves nothing.
    let other = Pki::new().leaf(
        "spiffe://cluster.local/ns/test/sa/web",
        now - day,
        now + day,
    );
    let forged = controller_channel_as(m.ctl.grpc, &anchors, Some(other)).await;
    assert_eq!(
        watch_codes(forged, None, NS, "web-0").await,
        (Unauthenticated, Unauthenticated)
    );
    // Two refusals per probe above: four without a credential, four for the wrong one.
    assert_eq!(
        metric_sum(m.ctl.admin, "strait_controller_api_refusals_total").await,
        8.0
    );
    // The real proxies authenticate themselves (web's became ready, which takes
    // its policy) and are served discovery.
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let (status, body) = get(&format!("http://{}/client-id", c.upstreams[0])).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, CLIENT_ID));
}

#[tokio::test]
async fn certificates_from_another_ca_or_expired_are_refused() {
    let m = Mesh::start("web", None).await;
    let port = m.backend.addr.port();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);

    let good = m.pki.leaf(CLIENT_ID, now - hour, now + hour);
    let seen = request_over_tls(m.web.inbound, good, port, "/client-id").await;
    assert_eq!(
        seen.status_line.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "{seen:?}"
    );
    assert_eq!(
        seen.kx.as_deref(),
        Some("X25519MLKEM768"),
        "post-quantum hybrid preferred"
    );

    let other = Pki::new().leaf(CLIENT_ID, now - hour, now + hour);
    let seen = request_over_tls(m.web.inbound, other, port, "/client-id").await;
    assert_eq!(seen.status_line, None, "another CA's certificate: {seen:?}");

    let expired = m.pki.leaf(CLIENT_ID, now - 2 * hour, now - hour);
    let seen = request_over_tls(m.web.inbound, expired, port, "/client-id").await;
    assert_eq!(seen.status_line, None, "an expired certificate: {seen:?}");
    assert!(metric_sum(m.web.admin, "strait_proxy_tls_handshake_failures_total").await >= 2.0);
    assert_eq!(m.backend.requests(), 1);
}

/// A proxy whose certificate has expired (its control plane gone for longer
/// than a certificate lives) is not ready, as peers refuse it; still live.
#[tokio::test]
async fn a_proxy_whose_certificate_expired_is_not_ready() {
    let m = Mesh::start("web", Some("3s")).await;
    let admin = m.web.admin;
    assert_eq!(wait::admin_get(admin, "/ready").await.unwrap().0, 200);
    let mut ctl = m.ctl.proc;
    ctl.child.kill().await.expect("stop the controller");
    wait::until(
        "web's proxy to say its certificate expired",
        Duration::from_secs(10),
        || async move {
            matches!(wait::admin_get(admin, "/ready").await,
                Ok((503, body)) if body.trim() == "certificate expired")
        },
    )
    .await;
    assert_eq!(wait::admin_get(admin, "/live").await.unwrap().0, 200);
}

#[tokio::test]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let m = Mesh::start("web", Some("3s")).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let load = Load::start(&format!("http://{}/1k", c.upstreams[0]), 4);
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let serials = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    // Three serials seen by a peer: two renewals, more than two lifetimes of load.
    wait::until("three certificate serials", Duration::from_secs(20), || {
        let leaf = m.pki.leaf(CLIENT_ID, now - hour, now + hour);
        let inbound = m.web.inbound;
        let port = m.backend.addr.port();
        let serials = serials.clone();
        async move {
            let seen = request_over_tls(inbound, leaf, port, "/1k")
                .await
                .server_serial;
            let mut s = serials.lock().unwrap();
            s.extend(seen);
            s.len() >= 3
        }
    })
    .await;
    let (ok, failed, errors) = load.stop().await;
    assert!(ok > 100, "steady load ran: {ok}");
    assert_eq!(failed, 0, "{errors:?}");
    // Three serials on web: its first certificate and at least two renewals.
    assert!(
        metric_sum(
            m.web.admin,
            "strait_proxy_identity_certificate_renewals_total"
        )
        .await
            >= 2.0
    );
    for admin in [m.web.admin, c.admin] {
        assert_eq!(
            metric_sum(admin, "strait_proxy_identity_certificate_failures_total").await,
            0.0
        );
    }
}

#[tokio::test]
async fn trust_anchors_rotate_without_stopping_traffic() {
    let (a, b) = (Pki::new(), Pki::new());
    let bundle = ManifestDir::new();
    bundle.write(
        "bundle.pem",
        &format!("{}{}", a.generated.anchor_pem, b.generated.anchor_pem),
    );
    let anchors = bundle.path().join("bundle.pem");
    let m = Mesh::start_with(a, anchors, "web", Some("3s")).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let load = Load::start(&format!("http://{}/1k", c.upstreams[0]), 4);
    wait::until("traffic", Duration::from_secs(5), || async {
        load.ok() > 20
    })
    .await;

    // The issuer moves from anchor A to anchor B.
    let grpc = m.ctl.grpc;
    let mut old = m.ctl.proc;
    old.child.kill().await.expect("stop the first controller");
    let ctl = ControllerProc::start_with(m.dir.path(), grpc, Some(&b), Some("3s")).await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let b_issuer = b.issuer_der();
    wait::until(
        "web to present a certificate from issuer B",
        Duration::from_secs(15),
        || {
            let leaf = b.leaf(CLIENT_ID, now - hour, now + hour);
            let (inbound, port) = (m.web.inbound, m.backend.addr.port());
            let want = b_issuer.clone();
            async move {
                request_over_tls(inbound, leaf, port, "/1k")
                    .await
                    .server_issuer
                    == Some(want)
            }
        },
    )
    .await;
    let before = load.ok();
    wait::until("traffic after the move", Duration::from_secs(5), || async {
        load.ok() > before + 50
    })
    .await;
    let (_, failed, errors) = load.stop().await;
    assert_eq!(failed, 0, "{errors:?}");
    drop(ctl);
}

/// A rotation half done: the client's proxy holds a certificate of the new
/// issuer, and web's proxy trusts only the old anchor. In TLS 1.3 web's
/// refusal comes after the client's handshake has ended; the caller still
/// says what it is, and counts it as the failed handshake it is.
#[tokio::test]
async fn a_peer_that_does_not_trust_the_issuer_yet_is_named_by_the_caller() {
    let (a, b) = (Pki::new(), Pki::new());
    let bundle = ManifestDir::new();
    bundle.write(
        "bundle.pem",
        &format!("{}{}", a.generated.anchor_pem, b.generated.anchor_pem),
    );
    let both = bundle.path().join("bundle.pem");
    let only_a = a.anchors();
    let m = Mesh::start_with(a, only_a, "web", None).await;
    let grpc = m.ctl.grpc;
    let mut old = m.ctl.proc;
    old.child.kill().await.expect("stop the first controller");
    let ctl = ControllerProc::start_with(m.dir.path(), grpc, Some(&b), None).await;
    let opts = SidecarOpts {
        identity: Some(identity(&both, &m.tokens, "client")),
        ..Default::default()
    };
    let c = Sidecar::start_with(grpc, NS, "client-0", &[WEB], opts).await;
    let (status, body) = get(&format!("http://{}/client-id", c.upstreams[0])).await;
    assert_eq!(status, http::StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains("the peer refused this proxy's certificate (TLS alert"),
        "{body}"
    );
    let failed = metric_where(
        c.admin,
        "strait_proxy_tls_handshake_failures_total",
        &["direction=\"outbound\""],
    )
    .await;
    assert_eq!(failed, 1.0, "one connection refused, one failure counted");
    drop(ctl);
}

#[tokio::test]
async fn no_key_material_leaves_the_proxy() {
    let m = Mesh::start("web", None).await;
    let cwd = ManifestDir::new();
    let opts = SidecarOpts {
        identity: Some(m.identity("client")),
        cwd: Some(cwd.path().to_path_buf()),
        ..Default::default()
    };
    let c = Sidecar::start_with(m.ctl.grpc, NS, "client-0", &[WEB], opts).await;
    let (status, _) = get(&format!("http://{}/client-id", c.upstreams[0])).await;
    assert_eq!(status, 200);
    let files: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().collect();
    assert!(files.is_empty(), "the proxy wrote {files:?}");
    for path in ["/config", "/metrics", "/ready", "/live", "/log-level"] {
        let (_, body) = wait::admin_get(c.admin, path).await.unwrap();
        for secret in ["PRIVATE KEY", "BEGIN", "token-of-client"] {
            assert!(!body.contains(secret), "{path} shows {secret}:\n{body}");
        }
    }
}

/// Writes `msg`, half-closes, and returns everything read until the stream ends.
async fn roundtrip(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    if s.write_all(msg).await.is_err() || s.shutdown().await.is_err() {
        return buf;
    }
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf));
    let _ = read.await.expect("the stream ends");
    buf
}

#[tokio::test]
async fn an_app_that_answers_before_reading_an_upload_keeps_its_connection() {
    // `/1k` answers without reading the body. The body rides DATA frames behind
    // the request's HEADERS between the proxies; had the server proxy written
    // the head alone, the app would have answered, found no body to drain and
    // closed the connection, and the next request on it would have failed.
    let m = Mesh::start("web", None).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let url = format!("http://{}/1k", c.upstreams[0]);
    let http = client::http1();
    assert_eq!(get(&url).await.0, 200);
    let before = m.backend.connections();
    for i in 0..100 {
        let req = http::Request::post(&url)
            .body(client::body(vec![b'u'; 1024]))
            .unwrap();
        let rsp = http.request(req).await.expect("a response");
        assert_eq!(rsp.status(), 200, "upload {i}");
        use http_body_util::BodyExt;
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 1024, "upload {i}");
    }
    let opened = m.backend.connections() - before;
    assert!(
        opened <= 1,
        "the app's connections were closed under 100 uploads: {opened} opened"
    );
}

#[tokio::test]
async fn a_silent_meshed_client_is_served_as_http_with_its_identity() {
    // A pool connection opened ahead of its request: past the detection timeout
    // the client proxy opens an opaque mTLS stream to web's proxy, in case the
    // server speaks first. When the client then speaks HTTP, it is served as
    // HTTP (the app learns the caller's identity, which opaque bytes never carry).
    let m = Mesh::start("web", None).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let url = format!("http://{}/client-id", c.upstreams[0]);
    assert_eq!(
        get(&url).await,
        (http::StatusCode::OK, CLIENT_ID.to_string())
    );
    let before = m.backend.connections();
    let silent = tokio::net::TcpStream::connect(c.upstreams[0])
        .await
        .expect("connect");
    wait::until(
        "the opaque stream onward for a silent client",
        Duration::from_secs(5),
        || async { m.backend.connections() > before },
    )
    .await;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(silent))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get("/client-id")
        .header("host", "web.test.svc.cluster.local")
        .body(client::empty())
        .unwrap();
    let rsp = send.send_request(req).await.expect("a response");
    assert_eq!(rsp.status(), 200);
    use http_body_util::BodyExt;
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, CLIENT_ID, "served as HTTP, over the mesh");
}

#[tokio::test]
async fn opaque_tcp_between_meshed_pods_rides_mtls() {
    let m = Mesh::start("web", None).await;
    // A database-like port on the web pod (5432 is opaque by default).
    let echo = strait_tests::tcp::echo().await;
    m.dir.write("svc-db.yaml", &service(NS, "db", 5432));
    m.dir
        .write("slice-db.yaml", &endpoint(NS, "db", "web-0", echo));
    // STRICT: only a stream that arrives over mTLS can reach the app at all.
    strict_for_client(&m).await;
    let db = "db.test.svc.cluster.local:5432";
    let c = m.sidecar("client-0", "client", &[db]).await;
    let intruder = m.sidecar("intruder-0", "intruder", &[db]).await;

    let msg = b"SELECT 1; -- over mTLS, half-closed";
    wait::until(
        "the stream to be echoed",
        Duration::from_secs(5),
        || async { roundtrip(c.upstreams[0], msg).await == msg },
    )
    .await;
    assert!(
        roundtrip(intruder.upstreams[0], b"let me in")
            .await
            .is_empty(),
        "an identity outside the allow list is closed"
    );
    let (_, text) = wait::admin_get(m.web.admin, "/metrics").await.unwrap();
    let counted = |sa: &str, decision: &str| {
        text.lines().any(|l| {
            l.starts_with("strait_proxy_inbound_authorizations_total")
                && l.contains("protocol=\"tcp\"")
                && l.contains(&format!("sa/{sa}\""))
                && l.contains(&format!("decision=\"{decision}\""))
        })
    };
    assert!(
        counted("client", "allow") && counted("intruder", "deny"),
        "{text}"
    );

    // A stream open when the allow list drops its identity is closed, as a
    // new one would be refused: not left running for as long as bytes move.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut open = tokio::net::TcpStream::connect(c.upstreams[0])
        .await
        .unwrap();
    open.write_all(b"PING 1\r\n").await.unwrap();
    let mut back = [0u8; 8];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"PING 1\r\n");
    let rest = closed_when_revoked(&m, &mut open, "the opaque stream").await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

/// An endpoint whose proxy is up and whose app is not (crashed, restarting,
/// not yet out of the endpoints) takes each opaque stream over mTLS and cuts
/// it at once: it is avoided, not favoured for being the least loaded.
#[tokio::test]
async fn a_meshed_endpoint_whose_app_is_down_is_avoided_for_opaque_streams() {
    use tokio::io::AsyncReadExt;
    let m = Mesh::start("web", None).await;
    let up = strait_tests::tcp::banner(b"220 ready\r\n").await;
    let down: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let web1 = m.sidecar("web-1", "web", &[]).await;
    m.dir.write(
        "pod-web-1.yaml",
        &meshed_pod(NS, "web-1", "web", web1.inbound.port()),
    );
    m.dir.write("svc-db.yaml", &service(NS, "db", 5432));
    m.dir
        .write("slice-db-0.yaml", &endpoint(NS, "db", "web-0", up));
    m.dir
        .write("slice-db-1.yaml", &endpoint(NS, "db", "web-1", down));
    let c = m
        .sidecar("client-0", "client", &["db.test.svc.cluster.local:5432"])
        .await;
    let greeted = async || {
        let mut s = tokio::net::TcpStream::connect(c.upstreams[0])
            .await
            .unwrap();
        let mut banner = [0u8; 11];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner));
        (matches!(read.await, Ok(Ok(_))) && &banner == b"220 ready\r\n").then_some(s)
    };
    wait::until("a stream greeted", Duration::from_secs(10), || async {
        greeted().await.is_some()
    })
    .await;
    // Streams that last (a connection pool's) load the live endpoint; the
    // dead one's end at once and never do.
    let mut held = Vec::new();
    let mut cut = 0;
    for _ in 0..20 {
        match greeted().await {
            Some(s) => held.push(s),
            None => cut += 1,
        }
    }
    assert!(
        cut <= 2,
        "{cut} of 20 streams went to the endpoint whose app is down"
    );
}

/// A stream that fails on one side reaches the other as a reset, not as a
/// clean end: an app must not take a truncated upload for a whole one, nor
/// a client a cut-off answer for a complete one.
#[tokio::test]
async fn a_reset_crosses_the_mesh_as_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = Mesh::start("web", None).await;
    let (app, mut received) = strait_tests::tcp::echo_telling().await;
    let failing_app = strait_tests::tcp::resetting().await;
    m.dir.write("svc-db.yaml", &service(NS, "db", 5432));
    m.dir
        .write("slice-db.yaml", &endpoint(NS, "db", "web-0", app));
    m.dir.write("svc-cache.yaml", &service(NS, "cache", 6379));
    m.dir.write(
        "slice-cache.yaml",
        &endpoint(NS, "cache", "web-0", failing_app),
    );
    let c = m
        .sidecar(
            "client-0",
            "client",
            &[
                "db.test.svc.cluster.local:5432",
                "cache.test.svc.cluster.local:6379",
            ],
        )
        .await;
    // A stream closed cleanly reaches the app as closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let clean = loop {
        let mut s = tokio::net::TcpStream::connect(c.upstreams[0])
            .await
            .unwrap();
        s.write_all(b"\x00whole").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
        // While the mesh starts, a stream may reach the app empty (the
        // peer proxy connects to it at once): the one that carried the
        // bytes is the one that tells.
        match tokio::time::timeout(Duration::from_millis(500), received.recv()).await {
            Ok(Some(r)) if !r.bytes.is_empty() => break r,
            _ => assert!(
                std::time::Instant::now() < deadline,
                "the app never reached"
            ),
        }
    };
    assert_eq!(clean.bytes, b"\x00whole");
    assert!(!clean.reset, "a clean close stays clean");

    // The client resets in the middle of an upload (what it sent so far
    // has reached the app: it came back).
    let mut s = tokio::net::TcpStream::connect(c.upstreams[0])
        .await
        .unwrap();
    let part = b"\x00\x00\x10\x00part of an upload";
    s.write_all(part).await.unwrap();
    let mut back = [0u8; 21];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, part);
    s.set_zero_linger().unwrap();
    drop(s);
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let r = received.recv().await.expect("a connection");
            if r.bytes == part {
                break r;
            }
        }
    })
    .await
    .expect("the app's connection ended");
    assert!(cut.reset, "the app saw a clean end: {cut:?}");

    // The app resets in the middle of the stream: the client sees a reset.
    let mut s = tokio::net::TcpStream::connect(c.upstreams[1])
        .await
        .unwrap();
    s.write_all(b"\x00\x01get").await.unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the stream ended");
    assert!(
        ended.is_err(),
        "the client saw a clean end: {ended:?} {rest:?}"
    );
}

/// Drops the client from web's allow list and waits for `open`, a stream
/// admitted before, to be closed; what came on it meanwhile.
async fn closed_when_revoked(m: &Mesh, open: &mut tokio::net::TcpStream, what: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    m.dir.write(
        "policy.yaml",
        &policy(
            "STRICT",
            "{identity: \"spiffe://cluster.local/ns/test/sa/other\"}",
        ),
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "{what} revoked is still open"
    );
    rest
}

/// A WebSocket outlives the request that opened it: when the allow list
/// drops its caller, the tunnel is closed as a new request would be refused.
#[tokio::test]
async fn an_upgraded_connection_closes_when_its_caller_is_no_longer_allowed() {
    let m = Mesh::start("web", None).await;
    strict_for_client(&m).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let mut ws = websocket(c.upstreams[0]).await;
    closed_when_revoked(&m, &mut ws, "the WebSocket").await;
}

/// CONNECT over HTTP/2 (RFC 9113 §8.5) crosses the mesh: the hop between
/// the proxies carries it as HTTP/1.1's CONNECT, as it does upgrades, and
/// the stream is the tunnel to web. Before, the client got 200 and a stream
/// that ended at once.
#[tokio::test]
async fn an_http2_connect_tunnel_crosses_the_mesh() {
    let m = Mesh::start("web", None).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    client::h2_connect_echoes(c.upstreams[0]).await;
}

/// A response that streams on (server-sent events, a gRPC stream) outlives
/// the decision that admitted its request: when the allow list drops its
/// caller, it is ended, as a new request would be refused.
#[tokio::test]
async fn a_response_stream_ends_when_its_caller_is_no_longer_allowed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = Mesh::start("web", None).await;
    strict_for_client(&m).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let mut sse = tokio::net::TcpStream::connect(c.upstreams[0])
        .await
        .unwrap();
    sse.write_all(b"GET /sse HTTP/1.1\r\nhost: web\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("data: first") {
        let mut b = [0u8; 256];
        let n = sse.read(&mut b).await.expect("the first event");
        assert!(n > 0, "closed before the first event");
        got.extend_from_slice(&b[..n]);
    }
    let rest = closed_when_revoked(&m, &mut sse, "the event stream").await;
    assert!(
        !String::from_utf8_lossy(&rest).contains("data: last"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

/// An upload outlives the decision that admitted it too: when the allow list
/// drops its caller mid-body, the rest never reaches the app, and the caller
/// is answered 403 as a new request would be.
#[tokio::test]
async fn an_upload_stops_when_its_caller_is_no_longer_allowed() {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = Mesh::start("web", None).await;
    strict_for_client(&m).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    served_as_client(
        &format!("http://{}/client-id", c.upstreams[0]),
        "the client to be let in",
    )
    .await;
    let heads = || m.backend.stats.requests.load(Ordering::SeqCst);
    let before = heads();
    let mut up = tokio::net::TcpStream::connect(c.upstreams[0])
        .await
        .unwrap();
    // `/count` answers the body's length once all of it has come.
    up.write_all(
        b"POST /count HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n",
    )
    .await
    .unwrap();
    wait::until(
        "the upload to reach the app",
        Duration::from_secs(5),
        || async { heads() > before },
    )
    .await;

    m.dir.write(
        "policy.yaml",
        &policy(
            "STRICT",
            "{identity: \"spiffe://cluster.local/ns/test/sa/other\"}",
        ),
    );
    wait::until(
        "the client to be refused",
        Duration::from_secs(5),
        || async { get(&format!("http://{}/client-id", c.upstreams[0])).await.0 == 403 },
    )
    .await;
    up.write_all(b"3\r\ntwo\r\n0\r\n\r\n").await.unwrap();
    let mut rsp = Vec::new();
    while !rsp.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), up.read(&mut b))
            .await
            .unwrap_or_else(|_| panic!("no answer: {}", String::from_utf8_lossy(&rsp)))
            .expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&rsp));
        rsp.extend_from_slice(&b[..n]);
    }
    let rsp = String::from_utf8_lossy(&rsp);
    assert!(rsp.starts_with("HTTP/1.1 403"), "{rsp}");
    // Counted once, as the one request it is.
    let (_, text) = wait::admin_get(m.web.admin, "/metrics").await.unwrap();
    let revoked: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("strait_proxy_http_rejected_requests_total")
                && l.contains("reason=\"unauthorized\"")
        })
        .collect();
    assert!(
        revoked.len() == 1 && revoked[0].ends_with(" 1"),
        "{revoked:?}"
    );
}

/// A gRPC stream whose caller the policy stops allowing ends as a call
/// refused at the start would: PERMISSION_DENIED, through both proxies.
#[tokio::test]
async fn a_grpc_stream_ends_permission_denied_when_its_caller_is_no_longer_allowed() {
    use strait_api::testing::EchoRequest;
    use strait_api::testing::echo_client::EchoClient;
    let m = Mesh::start("web", None).await;
    let app = strait_tests::grpc::start_echo().await;
    m.dir
        .write("slice-web.yaml", &endpoint(NS, "web", "web-0", app));
    strict_for_client(&m).await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let echo = EchoClient::connect(format!("http://{}", c.upstreams[0]))
        .await
        .expect("connect through the client proxy");
    let say = |message: &str| EchoRequest {
        message: message.into(),
        ..Default::default()
    };
    wait::until("gRPC through both proxies", Duration::from_secs(10), || {
        let mut echo = echo.clone();
        async move { echo.unary(say("hi")).await.is_ok() }
    })
    .await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(say("one")).await.unwrap();
    let mut replies = echo
        .clone()
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("the stream opens")
        .into_inner();
    assert_eq!(replies.message().await.unwrap().unwrap().message, "one");

    m.dir.write(
        "policy.yaml",
        &policy(
            "STRICT",
            "{identity: \"spiffe://cluster.local/ns/test/sa/other\"}",
        ),
    );
    let end = tokio::time::timeout(Duration::from_secs(10), replies.message())
        .await
        .expect("the revoked stream is still open");
    let status = end.expect_err("the stream ends with a status");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    drop(tx);
}

/// An identity a caller may claim in `strait-client-id`; the app must never see it.
const FORGED_ID: &str = "spiffe://cluster.local/ns/prod/sa/admin";

#[tokio::test]
async fn http_carried_raw_never_reaches_the_app_with_a_claimed_identity() {
    let m = Mesh::start("web", None).await;
    let port = m.backend.addr.port();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let forged_get = |target: &str| {
        format!(
            "GET {target} HTTP/1.1\r\nhost: web\r\nstrait-target-port: {port}\r\nstrait-client-id: {FORGED_ID}\r\nconnection: close\r\n\r\n"
        )
    };
    // What the app said the caller was: the body, whatever its framing.
    let body = |rsp: &[u8]| {
        let text = String::from_utf8_lossy(rsp).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            !text.contains(FORGED_ID),
            "the claimed identity reached the app: {text}"
        );
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        [CLIENT_ID, "none"]
            .into_iter()
            .find(|id| body.contains(id))
            .unwrap_or(body)
            .to_string()
    };

    // Anything holding a workload certificate can carry a stream as opaque
    // (the port first, then raw bytes) to a port not declared opaque: HTTP on
    // it is served as HTTP, and the app is told the verified identity.
    let leaf = m.pki.leaf(CLIENT_ID, now - hour, now + hour);
    let mut stream = port.to_be_bytes().to_vec();
    stream.extend(forged_get("/client-id").as_bytes());
    let rsp = exchange_over_tls(m.web.inbound, leaf, b"strait-opaque/1", &stream).await;
    assert_eq!(body(&rsp), CLIENT_ID, "carried as opaque by a peer");

    // A request line that lenient servers (Tomcat, Python's) take and ours
    // does not: refused as HTTP, never carried raw to the app (here an echo
    // server, which would send the forged header back).
    let lenient_app = strait_tests::tcp::echo().await;
    for line in [
        "GET\t/client-id\tHTTP/1.1",
        "  GET /client-id HTTP/1.1",
        "GET /client-id HTTP/1.10",
        "GET /client-id HTTP/1.1 ",
        // HTTP/0.9, after which Python's server reads headers all the same,
        // whatever the target.
        "GET /client-id",
        "GET client-id",
    ] {
        let mut stream = lenient_app.port().to_be_bytes().to_vec();
        stream.extend(
            format!("{line}\r\nhost: web\r\nstrait-client-id: {FORGED_ID}\r\n\r\n").as_bytes(),
        );
        let leaf = m.pki.leaf(CLIENT_ID, now - hour, now + hour);
        let rsp = exchange_over_tls(m.web.inbound, leaf, b"strait-opaque/1", &stream).await;
        let text = String::from_utf8_lossy(&rsp);
        assert!(text.starts_with("HTTP/1.1 400"), "{line:?}: {text}");
        assert!(
            !text.contains(FORGED_ID),
            "{line:?} reached the app: {text}"
        );
    }

    // A plaintext client silent past the detection timeout, then HTTP.
    let mut s = tokio::net::TcpStream::connect(m.web.inbound).await.unwrap();
    // Silent past the detection timeout (300 ms): the case under test.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rsp = send_raw(&mut s, &[forged_get("/client-id").as_bytes()]).await;
    assert_eq!(body(&rsp), "none", "silent, then HTTP");

    // The start of a request, a pause past the detection timeout, the rest.
    let mut s = tokio::net::TcpStream::connect(m.web.inbound).await.unwrap();
    let req = forged_get("/client-id");
    let (start, rest) = req.split_at(1);
    use tokio::io::AsyncWriteExt;
    s.write_all(start.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rsp = send_raw(&mut s, &[rest.as_bytes()]).await;
    assert_eq!(body(&rsp), "none", "a pause within the request line");

    // A control byte in the request line, and a pause before its end: the
    // line decides, not the byte.
    let mut s = tokio::net::TcpStream::connect(m.web.inbound).await.unwrap();
    let req = forged_get("\x01/client-id");
    let (start, rest) = req.split_at("GET \x01/client-id".len());
    s.write_all(start.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rsp = send_raw(&mut s, &[rest.as_bytes()]).await;
    let text = String::from_utf8_lossy(&rsp);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(!text.contains(FORGED_ID), "reached the app: {text}");

    // Control bytes (which Netty skips before a request line) and the start
    // of a line, a pause past the detection timeout, then the rest: carried
    // as opaque, as binary protocols that open with control bytes are, but
    // ended before the app (one that answers nothing before a whole request,
    // as HTTP servers do) has a whole line.
    let (waiting_app, received) = strait_tests::tcp::sink().await;
    let mut received = received;
    let mut first = waiting_app.port().to_be_bytes().to_vec();
    first.extend(b"\x00GET /client-id HT");
    let rest = format!("TP/1.1\r\nhost: web\r\nstrait-client-id: {FORGED_ID}\r\n\r\n");
    let leaf = m.pki.leaf(CLIENT_ID, now - hour, now + hour);
    strait_tests::pki::exchange_over_tls_in_parts(
        m.web.inbound,
        leaf,
        b"strait-opaque/1",
        &[&first, rest.as_bytes()],
        Duration::from_millis(600),
    )
    .await;
    let got = tokio::time::timeout(Duration::from_secs(5), received.recv())
        .await
        .expect("the app's connection ended")
        .expect("a connection");
    assert_eq!(
        String::from_utf8_lossy(&got.bytes),
        "\x00GET /client-id HT",
        "the app saw the line's start only"
    );

    // A meshed app's request whose line is longer than detection reads: HTTP
    // through both proxies, not opaque bytes.
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let mut s = tokio::net::TcpStream::connect(c.upstreams[0])
        .await
        .unwrap();
    let long = format!("/client-id?pad={}", "a".repeat(9000));
    let rsp = send_raw(&mut s, &[forged_get(&long).as_bytes()]).await;
    assert_eq!(body(&rsp), CLIENT_ID, "a 9 KiB request line");
    assert_eq!(m.backend.requests(), 4);
}

/// A peer proxy's handshake that starts past the detection timeout (a lost
/// segment, a throttled CPU) is answered, not taken for a silent plaintext
/// client and closed.
#[tokio::test]
async fn a_peers_handshake_that_starts_late_is_still_answered() {
    let m = Mesh::start("web", None).await;
    let port = m.backend.addr.port();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let leaf = m.pki.leaf(CLIENT_ID, now - hour, now + hour);
    let req = format!(
        "GET /client-id HTTP/1.1\r\nhost: web\r\nstrait-target-port: {port}\r\nconnection: close\r\n\r\n"
    );
    // Past the detection timeout (300 ms).
    let late = Duration::from_millis(600);
    let rsp = strait_tests::pki::exchange_over_tls_after(
        m.web.inbound,
        leaf,
        b"http/1.1",
        req.as_bytes(),
        late,
    )
    .await;
    let text = String::from_utf8_lossy(&rsp);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(CLIENT_ID), "{text}");
}

#[tokio::test]
async fn a_server_that_speaks_first_is_still_reached_across_the_mesh() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An undeclared port: the client proxy carries the silent client as
    // opaque, and web's proxy, which settles who speaks first, lets the
    // app's greeting through.
    let m = Mesh::start("web", None).await;
    let greeter = strait_tests::tcp::banner(b"220 ready\r\n").await;
    m.dir.write("svc-smtp.yaml", &service(NS, "smtp", 2525));
    m.dir
        .write("slice-smtp.yaml", &endpoint(NS, "smtp", "web-0", greeter));
    let smtp = "smtp.test.svc.cluster.local:2525";
    let c = m.sidecar("client-0", "client", &[smtp]).await;
    let mut s = tokio::net::TcpStream::connect(c.upstreams[0])
        .await
        .unwrap();
    let mut greeting = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting))
        .await
        .expect("the greeting in time")
        .expect("the greeting");
    assert_eq!(&greeting, b"220 ready\r\n");
    s.write_all(b"EHLO mesh\r\n").await.unwrap();
    let mut back = [0u8; 11];
    s.read_exact(&mut back).await.expect("the echo");
    assert_eq!(&back, b"EHLO mesh\r\n");
}

/// Writes `parts` in turn and reads to the end.
async fn send_raw(s: &mut tokio::net::TcpStream, parts: &[&[u8]]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for p in parts {
        s.write_all(p).await.unwrap();
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf));
    read.await.expect("the response ends").unwrap();
    buf
}

/// A plaintext HTTP/1 request to web's inbound port from `source`, on a
/// connection left open: the status line, or `None` when the proxy closed it
/// unanswered.
async fn plaintext_from(m: &Mesh, source: &str) -> (tokio::net::TcpStream, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(m.web.inbound).await.unwrap();
    let req = format!(
        "GET /client-id HTTP/1.1\r\nhost: web\r\nstrait-target-port: {}\r\n\r\n",
        m.backend.addr.port()
    );
    // A refused connection may be closed before the request is written.
    let _ = s.write_all(req.as_bytes()).await;
    let mut head = [0u8; 12];
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("answered or closed");
    let status = read
        .ok()
        .map(|_| String::from_utf8_lossy(&head).into_owned());
    (s, status)
}

/// One address holds its share of the inbound listener's plaintext
/// connections, and plaintext clients together three quarters of it; a
/// verified peer is counted under neither, and its handshake is not refused
/// for its address's plaintext connections.
#[tokio::test]
async fn plaintext_clients_hold_a_share_per_address_and_leave_room_for_peers() {
    let pki = Pki::new();
    let anchors = pki.anchors();
    let m = Mesh::start_web_args(
        pki,
        anchors,
        "web",
        None,
        &[
            "--max-connections=8",
            "--inbound-max-connections-per-source=2",
        ],
    )
    .await;
    let c = m.sidecar("client-0", "client", &[WEB]).await;
    let via_client = format!("http://{}/client-id", c.upstreams[0]);
    served_as_client(&via_client, "a peer before any plaintext client").await;

    let mut held = Vec::new();
    for _ in 0..2 {
        let (s, status) = plaintext_from(&m, "127.0.0.1").await;
        assert_eq!(status.as_deref(), Some("HTTP/1.1 200"));
        held.push(s);
    }
    let (_, refused) = plaintext_from(&m, "127.0.0.1").await;
    assert_eq!(
        refused, None,
        "a third from one address is closed unanswered"
    );
    let rejected = |reason: &str| {
        let admin = m.web.admin;
        let name = format!(
            "strait_proxy_tcp_rejected_connections_total{{direction=\"inbound\",reason=\"{reason}\"}}"
        );
        async move { metric_sum(admin, &name).await }
    };
    assert_eq!(rejected("source_limit").await, 1.0);

    // Other addresses have shares of their own, up to six plaintext
    // connections of the eight.
    let mut others = Vec::new();
    for source in ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"] {
        let (s, status) = plaintext_from(&m, source).await;
        assert_eq!(status.as_deref(), Some("HTTP/1.1 200"), "from {source}");
        others.push(s);
    }
    let (_, refused) = plaintext_from(&m, "127.0.0.4").await;
    assert_eq!(refused, None, "a seventh plaintext connection is closed");
    assert_eq!(rejected("unauthenticated_limit").await, 1.0);

    // The peers' quarter: the pooled connection still serves, and a
    // WebSocket, which takes a connection of its own, opens from the
    // address that holds its whole plaintext share.
    served_as_client(&via_client, "a peer with plaintext clients at their limit").await;
    let _ws = websocket(c.upstreams[0]).await;
    assert_eq!(
        rejected("source_limit").await,
        1.0,
        "the peer was not refused"
    );

    // Closed, plaintext connections give their places back.
    drop(held);
    wait::until(
        "the address's share given back",
        Duration::from_secs(10),
        || async { plaintext_from(&m, "127.0.0.1").await.1.as_deref() == Some("HTTP/1.1 200") },
    )
    .await;
    drop(others);
}

/// A WebSocket to web opened through a client proxy's `upstream`, its
/// upgrade answered 101.
async fn websocket(upstream: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut ws = tokio::net::TcpStream::connect(upstream).await.unwrap();
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nhost: web\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        ws.read_exact(&mut b).await.expect("the upgrade's answer");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws
}
