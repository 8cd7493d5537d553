//! The controller on the Kubernetes API (`--kubernetes`), against the test
//! stand-in for the API server: the same mesh behaviours as on manifests
//! (endpoints change, a bad object is refused, identities are proven), and the
//! watch protocol's hard cases (dropped watches, 410 Gone and relists).

use std::net::SocketAddr;
use std::time::Duration;

use strait_api::v1 as api;
use strait_api::v1::identity_client::IdentityClient;
use strait_tests::backend::Backend;
use strait_tests::kube_api::KubeApi;
use strait_tests::manifests::{ManifestDir, endpoint, meshed_pod, service};
use strait_tests::mesh::{Sidecar, SidecarIdentity, SidecarOpts};
use strait_tests::pki::{Pki, controller_channel, csr, token_file};
use strait_tests::process::{Proc, free_port};
use strait_tests::{client, wait};

const NS: &str = "test";
const WEB: &str = "web.test.svc.cluster.local:80";
const AUDIENCE: &str = "identity.strait.dev";

struct Controller {
    proc: Proc,
    grpc: SocketAddr,
    admin: SocketAddr,
}

/// `strait controller --kubernetes` with `extra` flags, on the cluster of `kubeconfig`.
fn spawn_controller(kubeconfig: &std::path::Path, extra: &[String]) -> Controller {
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args = vec![
        "controller".to_string(),
        "--kubernetes".into(),
        format!("--grpc-addr={grpc}"),
        format!("--admin-addr={admin}"),
    ];
    args.extend(extra.iter().cloned());
    let kubeconfig = kubeconfig.to_str().unwrap();
    let proc = Proc::spawn(
        "strait",
        &args,
        &[("KUBECONFIG", kubeconfig), ("STRAIT_LOG", "warn")],
    );
    Controller { proc, grpc, admin }
}

/// A ready controller on the stand-in, issuing certificates from `pki` if given.
async fn controller(api: &KubeApi, dir: &ManifestDir, pki: Option<&Pki>) -> Controller {
    let extra: Vec<String> = pki
        .map(|p| {
            vec![
                format!("--issuer-cert={}", p.issuer_cert().display()),
                format!("--issuer-key={}", p.issuer_key().display()),
            ]
        })
        .unwrap_or_default();
    let mut cp = spawn_controller(&api.kubeconfig(dir.path()), &extra);
    cp.proc.ready(cp.admin, Duration::from_secs(20)).await;
    cp
}

async fn get_ok(client: &Sidecar) -> bool {
    let url = format!("http://{}/", client.upstreams[0]);
    matches!(client::get(&client::http1(), &url).await, Ok((s, _)) if s == 200)
}

/// Waits until `backend` gets requests sent through `client`.
async fn until_serving(client: &Sidecar, backend: &Backend, what: &str) {
    wait::until(what, Duration::from_secs(10), || async {
        let before = backend.requests();
        get_ok(client).await && backend.requests() > before
    })
    .await;
}

/// Sends `n` requests and says how many reached `backend`; all must succeed.
async fn share(client: &Sidecar, backend: &Backend, n: usize) -> usize {
    let before = backend.requests();
    for _ in 0..n {
        assert!(get_ok(client).await, "a request failed");
    }
    backend.requests() - before
}

#[tokio::test]
async fn the_controller_follows_the_api_server_through_dropped_watches_and_relists() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    api.apply(&service(NS, "web", 80));
    // strait's CRDs are not installed in this cluster, and the controller's
    // role is an earlier release's, without GRPCRoutes or Nodes: that holds
    // nothing up.
    api.remove_kind("backendpolicies");
    api.forbid_kind("grpcroutes");
    api.forbid_kind("nodes");
    let cp = controller(&api, &dir, None).await;
    assert!(
        api.lists("services") >= 1 && api.lists("pods") >= 1 && api.lists("endpointslices") >= 1
    );
    let ready_lists = api.lists("endpointslices");

    let (a, b, c) = (
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    );
    let mut sidecars = Vec::new();
    for (name, backend) in [("web-a", &a), ("web-b", &b), ("web-c", &c)] {
        let s = Sidecar::start(cp.grpc, NS, name, &[]).await;
        api.apply(&meshed_pod(NS, name, "web", s.inbound.port()));
        sidecars.push((name, backend, s));
    }
    api.apply(&endpoint(NS, "web", "web-a", a.addr));
    let client = Sidecar::start(cp.grpc, NS, "client", &[WEB]).await;
    until_serving(&client, &a, "traffic to web-a").await;

    // Endpoints change: B added, A removed.
    api.apply(&endpoint(NS, "web", "web-b", b.addr));
    until_serving(&client, &b, "traffic to web-b").await;
    api.delete("discovery.k8s.io/v1", "EndpointSlice", NS, "web-web-a");
    wait::until("web-a drained", Duration::from_secs(10), || async {
        share(&client, &a, 20).await == 0
    })
    .await;

    // A bad update is refused and the last good Service keeps serving.
    api.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: test}\nspec:\n  ports: [{name: http, port: 0}]\n",
    );
    assert_eq!(
        share(&client, &b, 20).await,
        20,
        "the last good Service serves"
    );

    // A dropped watch resumes from where it was: no relist, changes flow.
    let watches = api.watches("endpointslices");
    api.cut_watches();
    wait::until("the watch resumed", Duration::from_secs(10), || async {
        api.watches("endpointslices") > watches
    })
    .await;
    api.apply(&endpoint(NS, "web", "web-c", c.addr));
    until_serving(&client, &c, "traffic to web-c after a dropped watch").await;
    assert_eq!(
        api.lists("endpointslices"),
        ready_lists,
        "resumed, not relisted"
    );

    // History compacted: resuming gets 410 Gone, the controller relists, and
    // a change made meanwhile arrives.
    api.compact();
    api.delete("discovery.k8s.io/v1", "EndpointSlice", NS, "web-web-b");
    wait::until(
        "a relist after 410 Gone",
        Duration::from_secs(10),
        || async { api.lists("endpointslices") > ready_lists },
    )
    .await;
    wait::until(
        "web-b drained after the relist",
        Duration::from_secs(10),
        || async { share(&client, &b, 20).await == 0 },
    )
    .await;
    assert_eq!(share(&client, &c, 20).await, 20);
    // Still ready throughout.
    let (status, _) = wait::admin_get(cp.admin, "/ready").await.unwrap();
    assert_eq!(status, 200);
    // The kinds it may not read are off, which an alert on failing watches
    // says; a kind not installed is not a failure.
    let (_, metrics) = wait::admin_get(cp.admin, "/metrics").await.unwrap();
    for (kind, failing) in [
        ("GRPCRoute", 1),
        ("Node", 1),
        ("BackendPolicy", 0),
        ("EndpointSlice", 0),
    ] {
        let series = format!("strait_controller_watch_failing{{kind=\"{kind}\"}} {failing}");
        assert!(metrics.contains(&series), "{series} not in:\n{metrics}");
    }
}

#[tokio::test]
async fn identities_are_proven_with_token_reviews_for_strait_s_audience() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let pki = Pki::new();
    let web_token = KubeApi::service_account_token("web", AUDIENCE);
    let client_token = KubeApi::service_account_token("client", AUDIENCE);
    // The API server would accept it, for its own audience: not ours.
    let api_token = KubeApi::service_account_token("client", "https://kubernetes.default.svc");
    api.add_token(&web_token, NS, "web", AUDIENCE);
    api.add_token(&client_token, NS, "client", AUDIENCE);
    api.add_token(&api_token, NS, "client", "https://kubernetes.default.svc");
    // Shaped as ours, but unknown to the API server.
    let made_up = KubeApi::service_account_token("made-up", AUDIENCE);
    api.apply(&service(NS, "web", 80));
    let cp = controller(&api, &dir, Some(&pki)).await;

    // A meshed pair whose proxies prove themselves with their projected tokens.
    let backend = Backend::start().await;
    let id = |sa: &str, token: &str| SidecarOpts {
        identity: Some(SidecarIdentity {
            anchors: pki.anchors(),
            token_file: token_file(dir.path(), sa, token),
            service_account: sa.into(),
        }),
        ..Default::default()
    };
    let server = Sidecar::start_with(cp.grpc, NS, "web-a", &[], id("web", &web_token)).await;
    api.apply(&meshed_pod(NS, "web-a", "web", server.inbound.port()));
    api.apply(&endpoint(NS, "web", "web-a", backend.addr));
    let client =
        Sidecar::start_with(cp.grpc, NS, "client", &[WEB], id("client", &client_token)).await;
    until_serving(
        &client,
        &backend,
        "mTLS traffic between proxies proven by TokenReview",
    )
    .await;

    // Certify: a token for another audience, or none the API server knows, proves nothing.
    let anchors = std::fs::read_to_string(pki.anchors()).unwrap();
    let mut c = IdentityClient::new(controller_channel(cp.grpc, &anchors).await);
    let me = "spiffe://cluster.local/ns/test/sa/client";
    let ask = |token: &str| api::CertifyRequest {
        identity: me.into(),
        token: token.as_bytes().to_vec(),
        csr_der: csr(me),
    };
    assert!(c.certify(ask(&client_token)).await.is_ok());
    for bad in [api_token.as_str(), made_up.as_str(), "not-a-token"] {
        let e = c.certify(ask(bad)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}: {e:?}");
    }
    // The namespace and account are the review's: web's token cannot get client's name.
    let e = c.certify(ask(&web_token)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
}

/// A replica with its own name and a short lease.
fn replica(api: &KubeApi, dir: &ManifestDir, name: &str) -> (Proc, SocketAddr) {
    replica_with(api, dir, name, "2s")
}

fn replica_with(api: &KubeApi, dir: &ManifestDir, name: &str, lease: &str) -> (Proc, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let args = vec![
        "controller".to_string(),
        "--kubernetes".into(),
        format!("--grpc-addr=127.0.0.1:{}", free_port()),
        format!("--admin-addr={admin}"),
        format!("--pod-name={name}"),
        format!("--lease-duration={lease}"),
    ];
    let kubeconfig = api.kubeconfig(dir.path());
    let proc = Proc::spawn(
        "strait",
        &args,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("STRAIT_LOG", "warn"),
        ],
    );
    (proc, admin)
}

fn condition(object: &serde_json::Value, kind: &str) -> (String, String, i64) {
    let c = object["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .cloned()
        .unwrap_or_default();
    (
        c["status"].as_str().unwrap_or_default().to_string(),
        c["reason"].as_str().unwrap_or_default().to_string(),
        c["observedGeneration"].as_i64().unwrap_or(-1),
    )
}

fn policy(name: &str, target: &str, extra: &str) -> String {
    format!(
        "apiVersion: policy.strait.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  targetRef: {{group: \"\", kind: Service, name: {target}}}\n{extra}"
    )
}

#[tokio::test]
async fn one_replica_at_a_time_writes_status_and_another_takes_over_when_it_dies() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    api.apply(&service(NS, "web", 80));
    api.apply(&policy("web", "web", "  connectTimeout: 500ms\n"));
    api.apply(&policy("typo", "web", "  conectTimeout: 500ms\n"));
    api.apply(&policy("orphan", "gone", ""));
    api.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-split, namespace: test}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n    - backendRefs: [{name: web, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]\n",
    );
    // A GRPCRoute may share an HTTPRoute's name: each has its own status.
    // On the same parent, the GRPCRoute is served and the HTTPRoute is not.
    api.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: web-split, namespace: test}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n    - matches: [{method: {service: shop.v1.Cart}}]\n      backendRefs: [{name: web, port: 80}]\n",
    );
    // The Services exist; the ports named do not.
    api.apply("apiVersion: v1\nkind: Service\nmetadata: {name: multi, namespace: test}\nspec:\n  ports: [{name: http, port: 80}, {name: admin, port: 9090}]\n");
    api.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-ports, namespace: test}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 81}, {group: \"\", kind: Service, name: multi, port: 80, sectionName: admin}]\n  rules:\n    - backendRefs: [{name: web, port: 9090}]\n",
    );
    let (mut a, a_admin) = replica(&api, &dir, "replica-a");
    let (mut b, b_admin) = replica(&api, &dir, "replica-b");
    a.ready(a_admin, Duration::from_secs(20)).await;
    b.ready(b_admin, Duration::from_secs(20)).await;

    let status_of = |name: &str| api.get("backendpolicies", NS, name).unwrap_or_default();
    wait::until("statuses written", Duration::from_secs(10), || async {
        condition(&status_of("web"), "Accepted").0 == "True"
            && condition(&status_of("typo"), "Accepted").0 == "False"
            && condition(&status_of("orphan"), "ResolvedRefs").0 == "False"
            && [
                ("httproutes", "web-split"),
                ("httproutes", "web-ports"),
                ("grpcroutes", "web-split"),
            ]
            .iter()
            .all(|(kind, r)| {
                api.get(kind, NS, r)
                    .is_some_and(|r| r["status"]["parents"].is_array())
            })
    })
    .await;
    assert_eq!(
        condition(&status_of("web"), "Accepted"),
        ("True".into(), "Accepted".into(), 1)
    );
    assert_eq!(
        condition(&status_of("web"), "ResolvedRefs"),
        ("True".into(), "ResolvedRefs".into(), 1)
    );
    assert_eq!(condition(&status_of("typo"), "Accepted").1, "Invalid");
    let typo = status_of("typo");
    let msg = typo["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("conectTimeout"),
        "the reason names the field: {msg}"
    );
    assert_eq!(
        condition(&status_of("orphan"), "ResolvedRefs").1,
        "TargetNotFound"
    );
    let route = api.get("httproutes", NS, "web-split").unwrap();
    let parent = &route["status"]["parents"][0];
    assert_eq!(parent["controllerName"], "strait.dev/controller");
    assert_eq!(parent["parentRef"]["name"], "web");
    let resolved = parent["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "ResolvedRefs")
        .unwrap();
    assert_eq!(
        (resolved["status"].as_str(), resolved["reason"].as_str()),
        (Some("False"), Some("BackendNotFound"))
    );
    let accepted = parent["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Accepted")
        .unwrap();
    assert_eq!(accepted["reason"], "Conflicted", "{accepted}");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .contains("GRPCRoute test/web-split"),
        "{accepted}"
    );

    let grpc = api.get("grpcroutes", NS, "web-split").unwrap();
    let conditions = grpc["status"]["parents"][0]["conditions"]
        .as_array()
        .unwrap();
    assert!(
        conditions
            .iter()
            .all(|c| c["status"] == "True" && c["observedGeneration"] == 1),
        "the GRPCRoute is accepted and its Service resolved: {conditions:?}"
    );

    let route = api.get("httproutes", NS, "web-ports").unwrap();
    let parent = &route["status"]["parents"][0];
    assert_eq!(
        parent["parentRef"],
        serde_json::json!({"group": "", "kind": "Service", "name": "web", "port": 81}),
        "the parentRef as written"
    );
    let of = |kind: &str| {
        let c = parent["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap();
        (
            c["status"].as_str().unwrap().to_string(),
            c["reason"].as_str().unwrap().to_string(),
            c["message"].as_str().unwrap().to_string(),
        )
    };
    let (accepted, reason, msg) = of("Accepted");
    assert_eq!(
        (accepted.as_str(), reason.as_str()),
        ("False", "NoMatchingParent")
    );
    assert!(msg.contains("no port 81"), "{msg}");
    let (resolved, reason, msg) = of("ResolvedRefs");
    assert_eq!(
        (resolved.as_str(), reason.as_str()),
        ("False", "BackendNotFound")
    );
    assert!(msg.contains("Service web has no port 9090"), "{msg}");
    // Port 80 exists, and so does a port named admin, but not one that is
    // both: the route attaches to nothing there either.
    let second = &route["status"]["parents"][1];
    assert_eq!(second["parentRef"]["sectionName"], "admin");
    let accepted = second["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Accepted")
        .unwrap();
    assert_eq!(accepted["reason"], "NoMatchingParent", "{accepted}");

    // Exactly one replica wrote, the lease holder, and nothing twice.
    let lease = api
        .get("leases", "strait-system", "strait-controller")
        .expect("a lease");
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    let patches = api.status_patches();
    assert!(patches.iter().all(|(m, _, _)| *m == holder), "{patches:?}");
    assert_eq!(patches.len(), 6, "one write per object: {patches:?}");

    // The writer dies: the other takes over within the lease's 2 s and writes
    // the status of a policy changed meanwhile.
    let (dead, survivor) = if holder == "replica-a" {
        (a, "replica-b")
    } else {
        (b, "replica-a")
    };
    drop(dead);
    api.apply(&policy("typo", "web", "  connectTimeout: 500ms\n"));
    let t = std::time::Instant::now();
    wait::until(
        "the other replica to write",
        Duration::from_secs(10),
        || async {
            condition(&status_of("typo"), "Accepted") == ("True".into(), "Accepted".into(), 2)
        },
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took over after {:?}",
        t.elapsed()
    );
    let last = api.status_patches().last().cloned().unwrap();
    assert_eq!(last.0, survivor);
}

/// A replica told to stop (SIGTERM) gives the status writer's lease up: the
/// other takes it at its next attempt, not once the lease's 6 s have passed.
#[tokio::test]
async fn a_stopping_replica_gives_its_lease_up() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let (mut a, a_admin) = replica_with(&api, &dir, "replica-a", "6s");
    a.ready(a_admin, Duration::from_secs(20)).await;
    let holder = || {
        api.get("leases", "strait-system", "strait-controller")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    };
    wait::until(
        "replica-a to hold the lease",
        Duration::from_secs(10),
        || async { holder().as_deref() == Some("replica-a") },
    )
    .await;
    let (mut b, b_admin) = replica_with(&api, &dir, "replica-b", "6s");
    b.ready(b_admin, Duration::from_secs(20)).await;

    a.sigterm().await;
    // Given up at once, though the replica serves on for its shutdown delay.
    let t = std::time::Instant::now();
    wait::until(
        "replica-b to take the lease",
        Duration::from_secs(15),
        || async { holder().as_deref() == Some("replica-b") },
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_millis(4500),
        "taken over after {:?}: the lease was not given up",
        t.elapsed()
    );
    let exited = tokio::time::timeout(Duration::from_secs(15), a.child.wait()).await;
    assert!(matches!(&exited, Ok(Ok(s)) if s.success()), "{exited:?}");
}

/// `strait check` against a cluster that has what `strait install` applies.
#[tokio::test]
async fn strait_check_passes_on_an_installed_cluster_and_names_what_is_missing() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let strait = strait_tests::process::binary("strait");
    let install = std::process::Command::new(&strait)
        .args(["install", "--ignore-cluster"])
        .output()
        .unwrap();
    assert!(install.status.success());
    let install_text = String::from_utf8(install.stdout).unwrap();
    for doc in install_text.split("\n---\n") {
        let v: serde_json::Value = serde_norway::from_str(doc).unwrap();
        let served = [
            "CustomResourceDefinition",
            "ConfigMap",
            "Secret",
            "Deployment",
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        ];
        if served.contains(&v["kind"].as_str().unwrap()) {
            api.apply(doc);
        }
    }
    // What the cluster's own controllers would have done: Gateway API's CRD
    // installed, the Deployment's replicas ready, the Service's endpoints.
    api.apply("apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: httproutes.gateway.networking.k8s.io}\nspec:\n  group: gateway.networking.k8s.io\n  names: {kind: HTTPRoute, plural: httproutes}\n  scope: Namespaced\n  versions: [{name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, properties: {spec: {type: object, properties: {rules: {type: array, items: {type: object, properties: {retry: {type: object}}}}}}}}}}]\n");
    let mut deployment: serde_json::Value = serde_json::to_value(
        api.get("deployments", "strait-system", "strait-controller")
            .unwrap(),
    )
    .unwrap();
    deployment["status"] = serde_json::json!({"replicas": 2, "readyReplicas": 2});
    api.apply(&deployment.to_string());
    api.apply("apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus: {nodeInfo: {kubeletVersion: v1.30.2}}\n");
    api.apply("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: strait-controller-x, namespace: strait-system, labels: {kubernetes.io/service-name: strait-controller}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.9], conditions: {ready: true}}]\nports: [{name: webhook, port: 8443}]\n");

    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {strait.dev/inject: enabled}}\n");
    // Run on the runtime: the stand-in answers on this same thread.
    let kubeconfig = api.kubeconfig(dir.path());
    let check = || {
        tokio::process::Command::new(&strait)
            .arg("check")
            .env("KUBECONFIG", &kubeconfig)
            .output()
    };
    let out = check().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "[ok  ] the Kubernetes API answers",
        "[ok  ] every node's kubelet runs native sidecars (1 node(s))",
        "[ok  ] CRD authorizationpolicies.policy.strait.dev is installed",
        "[ok  ] Gateway API HTTPRoute is installed (experimental channel",
        "[ok  ] the controller is ready (2 of 2 replicas)",
        "[ok  ] the trust anchor is valid for 36",
        "[ok  ] the issuer is valid for 36",
        "[ok  ] the issuer is signed under the trust anchors",
        "[ok  ] the injector's webhook is configured and trusts the mesh's anchors",
        "[ok  ] the policy validator's webhook is configured and trusts the mesh's anchors",
        "[ok  ] the injector's Service has 1 ready endpoint(s)",
        // A namespace labelled, its pods not restarted since.
        "[warn] no meshed pod yet, though 1 namespace(s) are labelled strait.dev/inject=enabled",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // Asked about another namespace (strait installed elsewhere, as the
    // chart's `namespace` value puts it): the install the injector's
    // webhook calls is checked, and said.
    let elsewhere = tokio::process::Command::new(&strait)
        .args(["check", "--namespace", "mesh-system"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&elsewhere.stdout).to_string();
    assert!(elsewhere.status.success(), "{text}");
    assert!(
        text.contains("[warn] no controller in mesh-system; the injector's webhook calls one in strait-system: checking that install (strait check --namespace strait-system)")
            && text.contains("[ok  ] the controller is ready (2 of 2 replicas)"),
        "{text}"
    );

    // More meshed pods than one page holds: every one is counted, and none of
    // the lists asked for all of a large cluster's pods at once.
    let meshed_pod = |i: usize, ready: bool| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("web-{i}"), "namespace": format!("ns-{}", i % 7)},
            "spec": {
                "initContainers": [{"name": "strait-init"},
                                   {"name": "strait-proxy", "restartPolicy": "Always"}],
                "containers": [{"name": "app"}],
            },
            "status": {
                "phase": "Running",
                "initContainerStatuses": [{"name": "strait-proxy", "ready": ready,
                    "image": "", "imageID": "", "restartCount": 0}],
            },
        })
        .to_string()
    };
    for i in 0..601 {
        api.apply(&meshed_pod(i, i != 600));
    }
    api.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: unmeshed, namespace: ns-0}\nspec: {containers: [{name: app}]}\n");
    // One of the labelled namespace's, from before its label.
    api.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: before-the-label, namespace: shop}\nspec: {containers: [{name: app, image: app}]}\nstatus: {phase: Running}\n");
    let text = String::from_utf8_lossy(&check().await.unwrap().stdout).to_string();
    assert!(
        text.contains("[warn] 600 of 601 meshed pods have a ready proxy; not ready: ns-"),
        "{text}"
    );
    assert!(
        text.contains("[warn] 1 pod(s) asked to be meshed run without a proxy")
            && text.contains("shop/before-the-label"),
        "{text}"
    );
    assert!(
        (1..=500).contains(&api.largest_page("pods")),
        "pods listed {} at once",
        api.largest_page("pods")
    );

    // Break seven things: each is named, and the exit status says so (an old
    // kubelet as a warning: the node may rightly stay). Cilium replacing
    // kube-proxy balances Services inside pods, around the proxies.
    api.apply("apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nstatus: {nodeInfo: {kubeletVersion: v1.28.7}}\n");
    api.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cilium-config, namespace: kube-system}\ndata: {kube-proxy-replacement: \"true\"}\n");
    // A platform's policy refusing the init container: its pods never exist.
    api.apply("apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: web-5d9, namespace: shop}\nspec: {selector: {matchLabels: {app: web}}, template: {metadata: {labels: {app: web}}, spec: {containers: [{name: web}]}}}\nstatus: {replicas: 0, conditions: [{type: ReplicaFailure, status: \"True\", reason: FailedCreate, message: \"pods \\\"web-5d9-x\\\" is forbidden: GKE Warden rejected the request: linux capability 'NET_ADMIN' on container 'strait-init' not allowed\"}]}\n");
    // A route strait did not accept, and one another controller did not
    // (not strait's to tell).
    for (name, controller) in [
        ("grid", "strait.dev/controller"),
        ("edge", "example.io/gateway"),
    ] {
        api.apply(&format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{parentRefs: [{{kind: Service, name: {name}}}]}}\nstatus: {{parents: [{{controllerName: {controller}, parentRef: {{kind: Service, name: {name}}}, conditions: [{{type: Accepted, status: \"False\", reason: UnsupportedValue, message: \"Service {name} port 4444 is opaque\"}}]}}]}}\n"));
    }
    api.forbid_kind("grpcroutes");
    // A LimitRange the injected proxy does not fit (250Mi over 20Mi).
    api.apply("apiVersion: v1\nkind: LimitRange\nmetadata: {name: ratio, namespace: shop}\nspec: {limits: [{type: Container, maxLimitRequestRatio: {memory: \"4\"}}]}\n");
    api.delete(
        "admissionregistration.k8s.io/v1",
        "ValidatingWebhookConfiguration",
        "default",
        "strait-policy-validator",
    );
    api.delete(
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "default",
        "backendpolicies.policy.strait.dev",
    );
    deployment["status"] = serde_json::json!({"replicas": 2, "readyReplicas": 0});
    api.apply(&deployment.to_string());
    let out = check().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[FAIL] CRD backendpolicies.policy.strait.dev is missing"),
        "{text}"
    );
    assert!(
        text.contains("[warn] 1 node(s) run a kubelet older than 1.29 (node-b v1.28.7)"),
        "{text}"
    );
    assert!(
        text.contains("[FAIL] the controller has no ready replica (0 of 2)"),
        "{text}"
    );
    assert!(
        text.contains("[FAIL] no ValidatingWebhookConfiguration strait-policy-validator"),
        "{text}"
    );
    assert!(
        text.contains("[FAIL] Cilium balances Services inside pods"),
        "{text}"
    );
    assert!(
        text.contains("[FAIL] 1 workload(s) cannot create meshed pods, refused at admission for the mesh's containers: shop/web-5d9 ("),
        "{text}"
    );
    assert!(
        text.contains("[FAIL] LimitRange(s) of namespaces labelled strait.dev/inject=enabled refuse the injected proxy as the mesh's resources make it, so meshed pods there are refused (by an error naming no container): shop/ratio (memory limit 250Mi over request 20Mi above its maxLimitRequestRatio 4)"),
        "{text}"
    );
    assert!(
        text.contains(
            "[warn] 1 route(s) or policy(ies) not accepted by strait, so not applied there"
        ),
        "{text}"
    );
    assert!(
        text.contains(": HTTPRoute shop/grid (via Service grid: UnsupportedValue: Service grid port 4444 is opaque) (kubectl describe"),
        "{text}"
    );
    // A kind these credentials may not list is not checked, and fails nothing.
    assert!(
        text.contains("[warn] the grpcroutes cannot be read"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("6 check(s) failed"));

    // An earlier release's CRD, which prunes unknown fields (Helm does not
    // upgrade CRDs), is named as such.
    let crd = install_text
        .split("\n---\n")
        .find(|d| d.contains("name: authorizationpolicies.policy.strait.dev"))
        .unwrap()
        .replace("x-kubernetes-preserve-unknown-fields: true", "");
    api.apply(&crd);
    let text = String::from_utf8_lossy(&check().await.unwrap().stdout).to_string();
    assert!(
        text.contains("[FAIL] CRD authorizationpolicies.policy.strait.dev is an earlier release's"),
        "{text}"
    );
}

/// The trust anchors and issuer `strait install` put in a cluster, and the
/// `ca.crt` of its output.
/// Applies the objects of `kinds` among `strait install`'s output, as an
/// install applied would leave them.
fn apply_installed(api: &KubeApi, manifests: &[u8], kinds: &[&str]) {
    for doc in String::from_utf8_lossy(manifests).split("\n---\n") {
        let v: serde_json::Value = serde_norway::from_str(doc).unwrap();
        if v["kind"].as_str().is_some_and(|k| kinds.contains(&k)) {
            api.apply(doc);
        }
    }
}

fn installed_identity(manifests: &[u8]) -> (String, String) {
    let text = std::str::from_utf8(manifests).unwrap();
    let (mut anchors, mut issuer) = (None, None);
    for doc in text.split("\n---\n") {
        let v: serde_json::Value = serde_norway::from_str(doc).unwrap();
        match v["kind"].as_str() {
            Some("ConfigMap") => anchors = v["data"]["ca.crt"].as_str().map(String::from),
            Some("Secret") => issuer = v["stringData"]["tls.key"].as_str().map(String::from),
            _ => {}
        }
    }
    (anchors.expect("the anchors"), issuer.expect("the issuer"))
}

/// `strait install` applied again (to change an image, the replicas) keeps the
/// identity the cluster has: new anchors would be trusted by the API server's
/// webhook call and new proxies, while running controllers and proxies kept
/// the old ones. So are the trust domain and iptables mode not given again.
#[tokio::test]
async fn strait_install_again_keeps_the_installed_identity() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let kubeconfig = api.kubeconfig(dir.path());
    let strait = strait_tests::process::binary("strait");
    let install = |extra: &[&str], kubeconfig: &std::path::Path| {
        tokio::process::Command::new(&strait)
            .arg("install")
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .output()
    };
    // An empty cluster: a new identity, applied.
    let settings = [
        "--trust-domain",
        "corp.example",
        "--proxy-iptables-mode",
        "legacy",
        "--replicas",
        "3",
        "--otlp-endpoint",
        "http://collector.obs:4317",
        "--proxy-trace-sampling",
        "0.25",
        "--proxy-access-log",
        "json",
        "--proxy-cpu-limit",
        "2",
        "--proxy-memory-request",
        "64Mi",
    ];
    let first = install(&settings, &kubeconfig).await.unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    apply_installed(&api, &first.stdout, &["ConfigMap", "Secret", "Deployment"]);
    let installed = installed_identity(&first.stdout);

    // Run again to change one setting, the others are kept (an upgrade that
    // dropped the collector would stop every proxy's traces unnoticed).
    let again = install(&["--proxy-trace-sampling", "0.5"], &kubeconfig)
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert_eq!(installed_identity(&again.stdout), installed);
    assert!(
        stderr.contains("keeping the trust anchors and issuer"),
        "{stderr}"
    );
    assert!(
        stderr.contains("keeping the installed --replicas=3 --otlp-endpoint=http://collector.obs:4317 --proxy-access-log=json --proxy-cpu-limit=2 --proxy-memory-request=64Mi (not given again; --reset-settings drops them)"),
        "{stderr}"
    );
    let again = String::from_utf8(again.stdout).unwrap();
    for kept in [
        "--trust-domain=corp.example",
        "--proxy-iptables-mode=legacy",
        "--otlp-endpoint=http://collector.obs:4317",
        "--proxy-otlp-endpoint=http://collector.obs:4317",
        "--proxy-access-log=json",
        "--proxy-trace-sampling=0.5",
        "--proxy-cpu-limit=2",
        "--proxy-memory-request=64Mi",
        "replicas: 3",
    ] {
        assert!(again.contains(kept), "{kept} not kept in:\n{again}");
    }
    assert!(!again.contains("--proxy-trace-sampling=0.25"));
    // Asked to, the settings go back to their defaults; the identity and
    // trust domain stay.
    let reset = install(&["--reset-settings"], &kubeconfig).await.unwrap();
    assert!(reset.status.success());
    assert_eq!(installed_identity(&reset.stdout), installed);
    let reset = String::from_utf8(reset.stdout).unwrap();
    assert!(reset.contains("--trust-domain=corp.example"));
    assert!(reset.contains("replicas: 2"));
    for dropped in [
        "otlp-endpoint",
        "--proxy-trace-sampling",
        "--proxy-access-log",
        "--proxy-cpu-limit",
        "--proxy-memory-request",
    ] {
        assert!(!reset.contains(dropped), "{dropped} kept in:\n{reset}");
    }
    // The iptables mode may change (the nodes did); the trust domain may not.
    let nft = install(&["--proxy-iptables-mode", "nft"], &kubeconfig)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&nft.stdout).contains("--proxy-iptables-mode=nft"));
    let moved = install(&["--trust-domain", "cluster.local"], &kubeconfig)
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&moved.stderr);
    assert!(
        !moved.status.success() && moved.stdout.is_empty(),
        "{stderr}"
    );
    assert!(
        stderr.contains("installed with trust domain \"corp.example\""),
        "{stderr}"
    );
    // Given identity files (rotating the anchors), the settings still are kept.
    let pki = Pki::new();
    let files = pki.install_flags();
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    let rotated = install(&files, &kubeconfig).await.unwrap();
    let out = String::from_utf8_lossy(&rotated.stdout);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    assert!(
        out.contains("--trust-domain=corp.example"),
        "trust domain not kept"
    );
    assert_ne!(installed_identity(&rotated.stdout), installed);

    // Asked to, it generates anew.
    let fresh = install(&["--ignore-cluster"], &kubeconfig).await.unwrap();
    assert!(fresh.status.success());
    let fresh = installed_identity(&fresh.stdout);
    assert_ne!(fresh.0, installed.0);
    assert_ne!(fresh.1, installed.1);

    // A cluster that cannot be asked: nothing printed, and the way out named.
    let gone = dir.path().join("gone");
    std::fs::write(
        &gone,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\ncontexts:\n- name: gone\n  context: {{cluster: gone, user: none}}\nusers:\n- name: none\n  user: {{}}\ncurrent-context: gone\n",
            free_port()
        ),
    )
    .unwrap();
    // So does a configuration that cannot be read, which kubectl would use.
    for kubeconfig in [gone, dir.path().join("missing")] {
        let refused = install(&[], &kubeconfig).await.unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{stderr}");
        assert!(refused.stdout.is_empty());
        assert!(stderr.contains("--ignore-cluster"), "{stderr}");
    }
}

/// Against a real cluster, when one is named for it: the controller's source
/// lists it and becomes ready, and `strait check` runs (its verdict depends on
/// what is installed there, so only its running is asserted). Not on
/// `KUBECONFIG`, which a developer's shell names their own clusters by; and
/// the controller's Lease is asked for in a namespace that does not exist, so
/// it never writes a status there.
#[tokio::test]
async fn against_a_real_cluster_when_one_is_named() {
    let Some(kubeconfig) = std::env::var_os("STRAIT_E2E_KUBECONFIG") else {
        eprintln!("skipped: set STRAIT_E2E_KUBECONFIG to run this against a real cluster");
        return;
    };
    let mut cp = spawn_controller(
        std::path::Path::new(&kubeconfig),
        &[
            "--pod-name=strait-e2e".into(),
            "--namespace=strait-e2e-no-such-namespace".into(),
        ],
    );
    cp.proc.ready(cp.admin, Duration::from_secs(60)).await;
    let out = tokio::process::Command::new(strait_tests::process::binary("strait"))
        .arg("check")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[ok  ] the Kubernetes API answers"), "{text}");
}

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n  - backendRefs:\n    - {{name: web-v1, port: 80, weight: {v1}}}\n    - {{name: web-v2, port: 80, weight: {v2}}}\n"
    )
}

/// Routes change through the API as through manifests: an HTTPRoute's
/// weights move traffic from one Service to another, and deleting the route
/// sends it back to the parent Service's own endpoints.
#[tokio::test]
async fn httproute_changes_through_the_api_move_traffic() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let (web, v1, v2) = (
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    );
    for (svc, b) in [("web", &web), ("web-v1", &v1), ("web-v2", &v2)] {
        api.apply(&service(NS, svc, 80));
        api.apply(&strait_tests::manifests::unmeshed_pod(NS, svc));
        api.apply(&endpoint(NS, svc, svc, b.addr));
    }
    api.apply(&split(100, 0));
    let cp = controller(&api, &dir, None).await;
    // Nodes are read too, for their zones (topology-aware routing).
    assert!(api.lists("nodes") >= 1, "nodes not listed");
    assert_eq!(
        api.whole_reads("nodes"),
        0,
        "Nodes asked for whole, not as metadata"
    );
    let client = Sidecar::start(cp.grpc, NS, "client", &[WEB]).await;
    until_serving(&client, &v1, "the route sends web's traffic to web-v1").await;
    assert_eq!(share(&client, &v1, 20).await, 20);

    api.apply(&split(0, 100));
    until_serving(&client, &v2, "the shifted route").await;
    wait::until("all of it on web-v2", Duration::from_secs(10), || async {
        share(&client, &v2, 20).await == 20
    })
    .await;

    api.delete("gateway.networking.k8s.io/v1", "HTTPRoute", NS, "web");
    until_serving(&client, &web, "web's own endpoints once the route is gone").await;
    assert!(web.requests() > 0);
}

#[tokio::test]
async fn the_controller_says_what_to_pass_when_it_has_no_source() {
    let out = tokio::process::Command::new(strait_tests::process::binary("strait"))
        .args([
            "controller",
            "--admin-addr=127.0.0.1:0",
            "--grpc-addr=127.0.0.1:0",
        ])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBECONFIG")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--manifests DIR") && err.contains("--kubernetes"),
        "{err}"
    );
}

/// `strait inject` against the cluster strait is installed in injects with its
/// anchors, trust domain and iptables mode, as the webhook would: defaults
/// (cluster.local, nft) would give proxies that cannot reach the controller
/// and init rules the nodes cannot load. A trust domain other than the
/// installed one is refused.
#[tokio::test]
async fn strait_inject_takes_the_installed_anchors_and_settings() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let kubeconfig = api.kubeconfig(dir.path());
    let strait = strait_tests::process::binary("strait");
    let installed = std::process::Command::new(&strait)
        .args([
            "install",
            "--ignore-cluster",
            "--trust-domain",
            "corp.example",
        ])
        .args(["--proxy-iptables-mode", "legacy"])
        // A registry of its own (air-gapped) and the mesh's collector.
        .args(["--proxy-image", "registry.internal/strait-proxy:1"])
        .args(["--otlp-endpoint", "http://collector.obs:4317"])
        // What a namespace's LimitRange asks of every container.
        .args(["--proxy-cpu-limit", "1"])
        .output()
        .unwrap();
    assert!(installed.status.success());
    apply_installed(&api, &installed.stdout, &["ConfigMap", "Deployment"]);
    let (anchors, _) = installed_identity(&installed.stdout);
    dir.write(
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\nspec:\n  containers: [{name: app, image: app}]\n",
    );
    let inject = |extra: &[&str]| {
        tokio::process::Command::new(&strait)
            .arg("inject")
            .arg(dir.path().join("pod.yaml"))
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .output()
    };
    let out = inject(&[]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod: serde_json::Value = serde_norway::from_slice(&out.stdout).unwrap();
    let env = |name: &str| {
        pod["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["env"].as_array().cloned().unwrap_or_default())
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str().map(String::from))
    };
    assert_eq!(
        env("STRAIT_PROXY_TRUST_DOMAIN").as_deref(),
        Some("corp.example")
    );
    assert_eq!(
        env("STRAIT_PROXY_TRUST_ANCHORS_PEM")
            .as_deref()
            .map(str::trim),
        Some(anchors.trim())
    );
    let init = serde_json::to_string(&pod["spec"]["initContainers"][0]).unwrap();
    assert!(init.contains("legacy"), "{init}");
    // The installed injector's proxy image and telemetry, not this CLI's defaults.
    let inits = pod["spec"]["initContainers"].as_array().unwrap();
    assert!(
        inits
            .iter()
            .all(|c| c["image"] == "registry.internal/strait-proxy:1"),
        "{inits:?}"
    );
    assert_eq!(
        env("STRAIT_PROXY_OTLP_ENDPOINT").as_deref(),
        Some("http://collector.obs:4317")
    );
    assert_eq!(inits[1]["resources"]["limits"]["cpu"], "1", "{inits:?}");

    let other = inject(&["--trust-domain", "cluster.local"]).await.unwrap();
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && other.stdout.is_empty(),
        "{stderr}"
    );
    assert!(stderr.contains("\"corp.example\""), "{stderr}");
    // Installed in another namespace, all given: its controller there, as
    // its injector would name it.
    let anchors_file = dir.path().join("anchors.pem");
    std::fs::write(&anchors_file, &anchors).unwrap();
    let elsewhere = std::process::Command::new(&strait)
        .arg("inject")
        .arg(dir.path().join("pod.yaml"))
        .arg(format!(
            "--identity-trust-anchors-file={}",
            anchors_file.display()
        ))
        .args([
            "--trust-domain",
            "corp.example",
            "--proxy-iptables-mode",
            "nft",
        ])
        .args(["--namespace", "mesh"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&elsewhere.stdout);
    assert!(
        elsewhere.status.success(),
        "{}",
        String::from_utf8_lossy(&elsewhere.stderr)
    );
    assert!(
        out.contains("https://strait-controller.mesh.svc:8090"),
        "{out}"
    );
    assert!(
        out.contains("spiffe://corp.example/ns/mesh/sa/strait-controller"),
        "{out}"
    );
    // Without a cluster to read and without the anchors: the way out named.
    let alone = std::process::Command::new(&strait)
        .arg("inject")
        .arg(dir.path().join("pod.yaml"))
        .arg("--ignore-cluster")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&alone.stderr);
    assert!(
        !alone.status.success() && alone.stdout.is_empty(),
        "{stderr}"
    );
    assert!(stderr.contains("--identity-trust-anchors-file"), "{stderr}");
}

/// A pod `strait install` or `strait inject` meshed: its init and proxy
/// containers, with what they were given (legacy iptables, a registry of
/// the cluster's own, the trust domain and anchors).
fn injected_pod(ns: &str, pod: &str, trust_domain: &str, anchors: &str, phase: &str) -> String {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": ns},
        "spec": {
            "initContainers": [{"name": "strait-init", "image": "registry.local/strait-proxy:1",
                                "env": [{"name": "STRAIT_PROXY_IPTABLES_MODE", "value": "legacy"}]}],
            "containers": [
                {"name": "app", "image": "app"},
                {"name": "strait-proxy", "image": "registry.local/strait-proxy:1",
                 "env": [{"name": "STRAIT_PROXY_TRUST_DOMAIN", "value": trust_domain},
                         {"name": "STRAIT_PROXY_TRUST_ANCHORS_PEM", "value": anchors}]},
            ],
        },
        "status": {"phase": phase},
    });
    serde_norway::to_string(&pod).unwrap()
}

/// `strait` run against the stand-in.
async fn strait_on(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(strait_tests::process::binary("strait"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .await
        .unwrap()
}

/// Behind a corporate proxy the CLI reaches the cluster as kubectl does:
/// `HTTPS_PROXY` set everywhere left every command failing (kube's proxy
/// support was left out), while kubectl sends nothing on this machine
/// through it; a cluster's own `proxy-url` is taken whatever the server.
/// (`NO_PROXY`'s reading is tested in `cluster.rs`.)
#[tokio::test]
async fn the_cli_reaches_the_cluster_as_kubectl_does_behind_a_proxy() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let kubeconfig = api.kubeconfig(dir.path());
    let dead_proxy = format!("http://127.0.0.2:{}", strait_tests::process::free_port());
    let install = |kubeconfig: &std::path::Path| {
        tokio::process::Command::new(strait_tests::process::binary("strait"))
            .arg("install")
            .env("KUBECONFIG", kubeconfig)
            .env("HTTPS_PROXY", &dead_proxy)
            // The stand-in speaks plain HTTP: Go takes this one for it.
            .env("HTTP_PROXY", &dead_proxy)
            .env("NO_PROXY", "example.com")
            .output()
    };
    let out = install(&kubeconfig).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&api.addr.to_string()), "{stderr}");
    // The cluster's own proxy, which does not answer: through it, and said so.
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let server = format!("server: \"http://{}\"", api.addr);
    assert!(text.contains(&server), "{text}");
    dir.write(
        "proxied",
        &text.replace(&server, &format!("{server}, proxy-url: \"{dead_proxy}\"")),
    );
    let out = install(&dir.path().join("proxied")).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("disabled feature"), "{stderr}");
}

/// `--kubeconfig` and `--context` choose the cluster the CLI reads, as
/// kubectl's do: `strait install | kubectl --context prod apply -f -` must
/// keep prod's identity whatever the current context is (another cluster's,
/// or a new one where that has none, would cut prod's proxies off), and says
/// which cluster it read.
#[tokio::test]
async fn the_cli_reads_the_cluster_its_flags_name() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let prod = api.kubeconfig(dir.path());
    let strait = strait_tests::process::binary("strait");
    let first = tokio::process::Command::new(&strait)
        .args(["install", "--ignore-cluster"])
        .output()
        .await
        .unwrap();
    assert!(first.status.success());
    apply_installed(&api, &first.stdout, &["ConfigMap", "Secret", "Deployment"]);
    let (anchors, _) = installed_identity(&first.stdout);
    // The current context: a cluster nobody answers; `prod`: the install.
    let server = format!("http://{}", api.addr);
    dir.write(
        "two-contexts",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\n- name: prod\n  cluster: {{server: \"{server}\"}}\nusers:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: dev\n  context: {{cluster: gone, user: u}}\n- name: prod\n  context: {{cluster: prod, user: u}}\ncurrent-context: dev\n",
            strait_tests::process::free_port()
        ),
    );
    let two = dir.path().join("two-contexts");
    let prod = prod.to_str().unwrap();
    for (args, what) in [
        (&["install", "--context", "prod"][..], "install --context"),
        (
            &["install", "--kubeconfig", prod][..],
            "install --kubeconfig",
        ),
    ] {
        let out = strait_on(&two, args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {stderr}");
        assert_eq!(installed_identity(&out.stdout).0, anchors, "{what}");
        assert!(
            stderr.contains(&server),
            "{what} names no cluster: {stderr}"
        );
    }
    // Unflagged, the current context, which does not answer: refused.
    let out = strait_on(&two, &["install"]).await;
    assert!(!out.status.success() && out.stdout.is_empty());
    // A context misspelt is said as such, not as a cluster to start afresh.
    let out = strait_on(&two, &["install", "--context", "prdo"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("no context \"prdo\"")
            && stderr.contains("dev, prod")
            && !stderr.contains("--ignore-cluster"),
        "{stderr}"
    );
    // inject and check read the same cluster.
    dir.write(
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\nspec:\n  containers: [{name: app, image: app}]\n",
    );
    let pod = dir.path().join("pod.yaml");
    let out = strait_on(
        &two,
        &["inject", pod.to_str().unwrap(), "--context", "prod"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected = String::from_utf8_lossy(&out.stdout);
    let first_line = anchors.lines().nth(1).unwrap();
    assert!(
        injected.contains(first_line),
        "not the installed anchors: {injected}"
    );
    let out = strait_on(&two, &["check", "--context", "prod"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("checking the cluster at {server}"))
            && text.contains("(context prod)"),
        "{text}"
    );
    assert!(text.contains("[ok  ] the Kubernetes API answers"), "{text}");
}

/// Credentials that may view the cluster but not read the install's
/// Secret (or Deployment) are told so: not offered a new identity, nor given
/// the defaults in place of the installed settings.
#[tokio::test]
async fn strait_install_refused_a_read_says_so_rather_than_start_afresh() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let kubeconfig = api.kubeconfig(dir.path());
    let first = strait_on(&kubeconfig, &["install", "--trust-domain", "prod.example"]).await;
    assert!(first.status.success());
    apply_installed(&api, &first.stdout, &["ConfigMap", "Secret", "Deployment"]);
    api.forbid_kind("secrets");
    let refused = strait_on(&kubeconfig, &["install"]).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && refused.stdout.is_empty(),
        "{stderr}"
    );
    assert!(
        stderr.contains("strait is installed in the cluster at"),
        "{stderr}"
    );
    assert!(!stderr.contains("--ignore-cluster to generate"), "{stderr}");
    // The identity given, its settings still cannot be read: no defaults.
    api.forbid_kind("deployments");
    let pki = Pki::new();
    let mut args = vec!["install".to_string()];
    args.extend(pki.install_flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let given = strait_on(&kubeconfig, &args).await;
    let stderr = String::from_utf8_lossy(&given.stderr);
    assert!(
        !given.status.success() && given.stdout.is_empty(),
        "{stderr}"
    );
    assert!(stderr.contains("may not read"), "{stderr}");
    // Nothing installed, Secrets refused: the ways on are named.
    let fresh = KubeApi::start().await;
    let fresh_dir = ManifestDir::new();
    let fresh_config = fresh.kubeconfig(fresh_dir.path());
    fresh.forbid_kind("secrets");
    let refused = strait_on(&fresh_config, &["install"]).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    for way in ["--context", "--ignore-cluster"] {
        assert!(stderr.contains(way), "{way} not in {stderr}");
    }
    // A new identity over a running install, the meshed pods unreadable:
    // not told that no pod holds other anchors.
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let kubeconfig = api.kubeconfig(dir.path());
    let first = strait_on(&kubeconfig, &["install"]).await;
    apply_installed(&api, &first.stdout, &["ConfigMap", "Secret", "Deployment"]);
    api.delete("v1", "Secret", "strait-system", "strait-identity-issuer");
    api.delete("v1", "ConfigMap", "strait-system", "strait-trust-anchors");
    api.forbid_kind("pods");
    let unread = strait_on(&kubeconfig, &["install"]).await;
    let stderr = String::from_utf8_lossy(&unread.stderr);
    assert!(!unread.status.success(), "{stderr}");
    assert!(
        stderr.contains("the meshed pods could not be read"),
        "{stderr}"
    );
    assert!(!stderr.contains("no meshed pod's proxy holds"), "{stderr}");
}

/// A new identity over a running install (files given in one step, or its
/// Secret and ConfigMap deleted for a new one) would restart the controllers
/// with an issuer the running proxies do not trust, cutting them off: refused
/// while meshed pods hold other anchors, with the way on.
#[tokio::test]
async fn strait_install_refuses_an_identity_the_running_proxies_do_not_trust() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let kubeconfig = api.kubeconfig(dir.path());
    let first = strait_on(&kubeconfig, &["install", "--proxy-iptables-mode", "legacy"]).await;
    assert!(first.status.success());
    apply_installed(&api, &first.stdout, &["ConfigMap", "Secret", "Deployment"]);
    let (anchors, _) = installed_identity(&first.stdout);
    api.apply(&injected_pod(
        "shop",
        "web",
        "cluster.local",
        &anchors,
        "Running",
    ));
    let other = Pki::new();
    let mut args = vec!["install".to_string()];
    args.extend(other.install_flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = strait_on(&kubeconfig, &args).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && refused.stdout.is_empty(),
        "{stderr}"
    );
    for said in [
        "not one the meshed pods' proxies trust",
        "--ignore-cluster",
        "rotate",
    ] {
        assert!(stderr.contains(said), "{said} not in: {stderr}");
    }
    // The identity's objects deleted for a new one: the same.
    api.delete("v1", "Secret", "strait-system", "strait-identity-issuer");
    api.delete("v1", "ConfigMap", "strait-system", "strait-trust-anchors");
    let regenerated = strait_on(&kubeconfig, &["install"]).await;
    let stderr = String::from_utf8_lossy(&regenerated.stderr);
    assert!(!regenerated.status.success(), "{stderr}");
    assert!(
        stderr.contains("not one the meshed pods' proxies trust"),
        "{stderr}"
    );
    // The way on keeps the installed settings, and nothing says a new
    // identity was made.
    assert!(stderr.contains("--ignore-cluster"), "{stderr}");
    assert!(stderr.contains("--proxy-iptables-mode=legacy"), "{stderr}");
    assert!(!stderr.contains("are generated"), "{stderr}");
    // No meshed pod left: nothing to cut off.
    api.delete("v1", "Pod", "shop", "web");
    assert!(strait_on(&kubeconfig, &args).await.status.success());
}

/// `helm uninstall` keeps the identity's Secret and ConfigMap and deletes the
/// controller. `strait install` after it kept the identity but, no
/// Deployment saying otherwise, installed the default trust domain and
/// iptables mode, cutting every running proxy off: the meshed pods say what
/// the controller ran with.
#[tokio::test]
async fn strait_install_over_a_kept_identity_takes_the_pods_settings() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let kubeconfig = api.kubeconfig(dir.path());
    let first = strait_on(
        &kubeconfig,
        &[
            "install",
            "--trust-domain=corp.example",
            "--proxy-iptables-mode=legacy",
        ],
    )
    .await;
    assert!(first.status.success());
    apply_installed(&api, &first.stdout, &["ConfigMap", "Secret"]);
    let (anchors, _) = installed_identity(&first.stdout);
    api.apply(&injected_pod(
        "shop",
        "web",
        "corp.example",
        &anchors,
        "Running",
    ));
    let again = strait_on(&kubeconfig, &["install"]).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&again.stdout),
        String::from_utf8_lossy(&again.stderr),
    );
    assert!(again.status.success(), "{stderr}");
    assert!(
        stderr.contains("holds the identity but no controller"),
        "{stderr}"
    );
    assert!(!stderr.contains("names no --trust-domain"), "{stderr}");
    for kept in [
        "--trust-domain=corp.example",
        "--proxy-iptables-mode=legacy",
    ] {
        assert!(stdout.contains(kept), "{kept} not in the install");
    }
    assert_eq!(
        installed_identity(&again.stdout).0,
        anchors,
        "the identity kept"
    );
    // Another trust domain than the pods' is refused, as over a controller.
    let other = strait_on(&kubeconfig, &["install", "--trust-domain=other.example"]).await;
    assert!(!other.status.success());
    // Given with the iptables mode too, it is still checked against the pods.
    let other = strait_on(
        &kubeconfig,
        &[
            "install",
            "--trust-domain=other.example",
            "--proxy-iptables-mode=legacy",
        ],
    )
    .await;
    assert!(!other.status.success());
    let given = strait_on(
        &kubeconfig,
        &[
            "install",
            "--trust-domain=corp.example",
            "--proxy-iptables-mode=legacy",
        ],
    )
    .await;
    assert!(
        given.status.success(),
        "{}",
        String::from_utf8_lossy(&given.stderr)
    );
}

/// A cluster whose strait namespace was deleted (the identity with it) still
/// runs meshed pods, and keeps the injector's cluster-wide configuration: a
/// new install's new anchors would cut every running proxy off from the new
/// controller and from newly injected pods, unnoticed for hours. `strait
/// install` says so and names the ways on; given the old identity back, it
/// takes the pods' trust domain.
#[tokio::test]
async fn strait_install_over_a_deleted_install_says_what_it_left() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let kubeconfig = api.kubeconfig(dir.path());
    let pki = Pki::new();
    let anchors = std::fs::read_to_string(pki.anchors()).unwrap();
    api.apply(&injected_pod(
        "shop",
        "web",
        "corp.example",
        &anchors,
        "Running",
    ));
    let refused = strait_on(&kubeconfig, &["install"]).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && refused.stdout.is_empty(),
        "{stderr}"
    );
    for said in [
        "1 meshed pod(s) run (shop/web) in trust domain \"corp.example\"",
        "--identity-*",
        "--ignore-cluster",
    ] {
        assert!(stderr.contains(said), "{said} not in: {stderr}");
    }
    // The old identity given back: the pods' settings, not the defaults.
    let files = |pki: &Pki| {
        let mut args = vec!["install".to_string()];
        args.extend(pki.install_flags());
        args
    };
    let args = files(&pki);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let restored = strait_on(&kubeconfig, &args).await;
    let out = String::from_utf8_lossy(&restored.stdout);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    for kept in [
        "--trust-domain=corp.example",
        "--proxy-iptables-mode=legacy",
    ] {
        assert!(out.contains(kept), "{kept} not kept: {out}");
    }
    // The pods' registry kept (this release's tag), and said.
    assert!(
        out.contains(&format!(
            "--proxy-image=registry.local/strait-proxy:v{}",
            env!("CARGO_PKG_VERSION")
        )),
        "{out}"
    );
    assert!(
        String::from_utf8_lossy(&restored.stderr)
            .contains("proxy image from the installed repository, registry.local/strait-proxy:v"),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let mut clash = args.clone();
    clash.extend(["--trust-domain", "cluster.local"]);
    assert!(!strait_on(&kubeconfig, &clash).await.status.success());
    // Another identity (a backup of another cluster, or from before a
    // rotation) is not the one the pods trust.
    let other = Pki::new();
    let args = files(&other);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let wrong = strait_on(&kubeconfig, &args).await;
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && wrong.stdout.is_empty(),
        "{stderr}"
    );
    assert!(
        stderr.contains("not one the meshed pods' proxies trust"),
        "{stderr}"
    );
    assert!(
        strait_on(&kubeconfig, &["install", "--ignore-cluster"])
            .await
            .status
            .success()
    );

    // The pods gone, the injector's configuration still names the install.
    api.delete("v1", "Pod", "shop", "web");
    let hook = strait_on(&kubeconfig, &["install", "--ignore-cluster"]).await;
    for doc in String::from_utf8(hook.stdout).unwrap().split("\n---\n") {
        if doc.contains("kind: MutatingWebhookConfiguration") {
            api.apply(doc);
        }
    }
    // A finished Job's pod is no meshed pod left running: nothing trusts
    // the lost anchors, and the new identity replaces the configuration's.
    api.apply(&injected_pod(
        "shop",
        "job",
        "corp.example",
        &anchors,
        "Succeeded",
    ));
    let fresh = strait_on(&kubeconfig, &["install"]).await;
    let stderr = String::from_utf8_lossy(&fresh.stderr);
    assert!(fresh.status.success(), "{stderr}");
    assert!(
        stderr.contains("MutatingWebhookConfiguration strait-proxy-injector remains"),
        "{stderr}"
    );
}

/// `strait uninstall` waits for the meshed pods, as `linkerd uninstall`
/// does: with the controller gone their proxies get no certificate, and a
/// pod restarted in place never starts. `--force` prints the objects anyway.
#[tokio::test]
async fn strait_uninstall_waits_for_the_meshed_pods() {
    let api = KubeApi::start().await;
    let dir = ManifestDir::new();
    let kubeconfig = api.kubeconfig(dir.path());
    api.apply(&injected_pod("shop", "web", "cluster.local", "", "Running"));
    let refused = strait_on(&kubeconfig, &["uninstall"]).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && refused.stdout.is_empty(),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 meshed pod(s) still run (shop/web)") && stderr.contains("--force"),
        "{stderr}"
    );
    let forced = strait_on(&kubeconfig, &["uninstall", "--force"]).await;
    assert!(forced.status.success());
    assert!(String::from_utf8_lossy(&forced.stdout).contains("kind: MutatingWebhookConfiguration"));
    api.delete("v1", "Pod", "shop", "web");
    let done = strait_on(&kubeconfig, &["uninstall"]).await;
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(done.stdout, forced.stdout);
}
