#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};

use super::webhook::{FailurePolicy, Hook, review};
use super::workloads::inject_stream;
use super::*;

fn settings() -> Settings {
    Settings::with_anchors("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into())
}

fn pod(annotations: Value, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p", "namespace": "shop", "annotations": annotations},
           "spec": spec})
}

fn app_spec() -> Value {
    json!({"containers": [{"name": "app", "image": "app:1"}]})
}

fn applied(mut pod: Value, ns: Namespace) -> Value {
    match inject(&pod, ns, &settings()).unwrap() {
        Outcome::Inject(p) => json_patch::patch(&mut pod, &p).unwrap(),
        Outcome::Skip(why) => panic!("skipped: {why}"),
    }
    pod
}

fn init_names(pod: &Value) -> Vec<&str> {
    pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

#[test]
fn an_annotated_pod_gets_the_init_container_and_the_native_sidecar() {
    let p = applied(
        pod(json!({INJECT: "enabled"}), app_spec()),
        Namespace::NotEnabled,
    );
    assert_eq!(init_names(&p), ["strait-init", "strait-proxy"]);
    let proxy = &p["spec"]["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    // Why either failed, in `kubectl describe pod`.
    for c in &p["spec"]["initContainers"].as_array().unwrap()[..2] {
        assert_eq!(c["terminationMessagePolicy"], "FallbackToLogsOnError");
    }
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    // Given ten minutes to get its certificate, so that a controller or API
    // server away for a while is not made worse by the kubelet's back-off.
    let startup = &proxy["startupProbe"];
    assert!(
        startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap()
            >= 600,
        "{startup}"
    );
    // No volume the cluster autoscaler takes for local storage (a disk-backed
    // emptyDir), which would keep it from draining any node a meshed pod is on.
    for v in p["spec"]["volumes"].as_array().unwrap() {
        if let Some(dir) = v.get("emptyDir") {
            assert_eq!(dir["medium"], "Memory", "{v}");
        }
    }
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    assert_eq!(
        env(proxy, "STRAIT_PROXY_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_SERVICE_ACCOUNT").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.serviceAccountName"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_APP_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP",
        "the app is dialled on the pod's address, so loopback-only ports stay private"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_ADMIN_ADDR").unwrap()["value"],
        "[::]:4191",
        "the kubelet probes the pod's first address, IPv4 or IPv6"
    );
    assert!(
        env(proxy, "STRAIT_PROXY_TRUST_ANCHORS_PEM").unwrap()["value"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(proxy["resources"]["requests"]["cpu"].is_string());
    let init = &p["spec"]["initContainers"][0];
    assert_eq!(init["args"][0], "init");
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    // The proxy injected listens on IPv6 loopback: IPv6 egress goes to it.
    assert!(env(init, "STRAIT_PROXY_IPV6_OUTBOUND").is_none());
    let token = p["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "strait-token")
        .unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        defaults::TOKEN_AUDIENCE
    );
    assert_eq!(
        p["metadata"]["annotations"]["strait.dev/inbound-port"],
        "4143"
    );
    assert_eq!(p["metadata"]["annotations"][INJECT], "enabled", "kept");
    assert_eq!(
        p["spec"]["containers"],
        app_spec()["containers"],
        "the app is untouched"
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    let once = applied(
        pod(json!({INJECT: "enabled"}), app_spec()),
        Namespace::NotEnabled,
    );
    assert_eq!(
        inject(&once, Namespace::Enabled, &settings()).unwrap(),
        Outcome::Skip("already injected")
    );
}

#[test]
fn leftovers_of_an_injection_or_another_mesh_s_sidecar_are_refused_by_name() {
    let once = applied(
        pod(json!({INJECT: "enabled"}), app_spec()),
        Namespace::NotEnabled,
    );
    // The proxy taken out by hand, the rest left.
    let mut left = once.clone();
    left["spec"]["initContainers"] = json!(
        once["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] != PROXY_CONTAINER)
            .collect::<Vec<_>>()
    );
    let e = inject(&left, Namespace::Enabled, &settings()).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("strait-init, strait-token, strait-xtables from an earlier injection"),
        "{e}"
    );
    for (list, name) in [
        ("containers", "linkerd-proxy"),
        ("initContainers", "istio-init"),
        ("containers", "kuma-sidecar"),
        ("initContainers", "consul-connect-inject-init"),
    ] {
        let mut spec = app_spec();
        spec[list] = json!([{"name": name, "image": "x"}, {"name": "app", "image": "app:1"}]);
        let e = inject(&pod(json!({}), spec), Namespace::Enabled, &settings()).unwrap_err();
        assert!(
            e.to_string().contains(&format!("another mesh's {name}")),
            "{e}"
        );
    }
}

/// An app port the proxy listens on would keep the proxy (or the app)
/// from starting with nothing said: the pod is refused, naming the port.
#[test]
fn an_app_on_a_port_of_the_proxy_is_refused_by_name() {
    let mut spec = app_spec();
    spec["containers"] = json!([{"name": "app", "image": "app:1",
                                 "ports": [{"containerPort": 8080}, {"containerPort": 4191}]}]);
    let e = inject(&pod(json!({}), spec), Namespace::Enabled, &settings()).unwrap_err();
    assert!(
        e.to_string()
            .contains("container app port 4191 is a port the proxy listens on"),
        "{e}"
    );
    let mut spec = app_spec();
    spec["containers"] = json!([{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}, {"containerPort": 4143, "protocol": "UDP"}]}]);
    assert!(matches!(
        inject(&pod(json!({}), spec), Namespace::Enabled, &settings()).unwrap(),
        Outcome::Inject(_)
    ));
}

/// Istio's ambient mode redirects a pod's traffic in its own network
/// namespace (no container to see): two sets of interception rules in one
/// pod would send each other's traffic astray.
/// Istio enrolls a pod by its label and annotates it only after admission:
/// the label is what the injector sees.
#[test]
fn a_pod_in_istio_s_ambient_mesh_is_refused() {
    let annotated = pod(
        json!({"ambient.istio.io/redirection": "enabled"}),
        app_spec(),
    );
    let mut labelled = pod(json!({}), app_spec());
    labelled["metadata"]["labels"] = json!({"istio.io/dataplane-mode": "ambient"});
    for p in [annotated, labelled] {
        let e = inject(&p, Namespace::Enabled, &settings()).unwrap_err();
        assert!(e.to_string().contains("Istio's ambient mesh"), "{e}");
    }
    let mut opted_out = pod(json!({}), app_spec());
    opted_out["metadata"]["labels"] = json!({"istio.io/dataplane-mode": "none"});
    assert!(matches!(
        inject(&opted_out, Namespace::Enabled, &settings()).unwrap(),
        Outcome::Inject(_)
    ));
}

/// A pod's opaque ports are its own, inbound: the port numbers its app
/// calls elsewhere keep the proxy's defaults (its MinIO on 9000 stays HTTP
/// whatever its own 9000 is). A proxy of an earlier release (a pod naming
/// its own image) knows one list only, and gets it there.
#[test]
fn a_pod_s_opaque_ports_are_its_inbound_ones() {
    let p = applied(
        pod(json!({OPAQUE_PORTS: "9000"}), app_spec()),
        Namespace::Enabled,
    );
    let proxy = &p["spec"]["initContainers"][1];
    assert_eq!(
        env(proxy, "STRAIT_PROXY_INBOUND_OPAQUE_PORTS").unwrap()["value"],
        "9000"
    );
    assert!(env(proxy, "STRAIT_PROXY_OPAQUE_PORTS").is_none());
    let p = applied(
        pod(
            json!({OPAQUE_PORTS: "9000", PROXY_IMAGE: "registry.local/strait-proxy:v0.0.1"}),
            app_spec(),
        ),
        Namespace::Enabled,
    );
    let proxy = &p["spec"]["initContainers"][1];
    assert_eq!(
        env(proxy, "STRAIT_PROXY_OPAQUE_PORTS").unwrap()["value"],
        "9000"
    );
}

/// Istio's node agent enrolls running pods once their namespace is labelled
/// for ambient: an injected pod says it is not to be, beside its own labels
/// or as its first, and `init`'s look for another mesh's rules, made once at
/// the pod's start, is not all that stands in the way.
#[test]
fn an_injected_pod_keeps_istio_s_ambient_mesh_out() {
    let mut labelled = pod(json!({}), app_spec());
    labelled["metadata"]["labels"] = json!({"app": "web"});
    let unlabelled = pod(json!({}), app_spec());
    let mut bare = json!({"apiVersion": "v1", "kind": "Pod", "spec": app_spec()});
    for p in [labelled, unlabelled, bare.take()] {
        let p = applied(p, Namespace::Enabled);
        assert_eq!(
            p["metadata"]["labels"]["istio.io/dataplane-mode"], "none",
            "{p}"
        );
    }
    let mut labelled = pod(json!({}), app_spec());
    labelled["metadata"]["labels"] = json!({"app": "web"});
    assert_eq!(
        applied(labelled, Namespace::Enabled)["metadata"]["labels"]["app"],
        "web"
    );
}

/// A manifest injected by `strait inject` that another mesh's injector then
/// gave its own sidecar is refused, not passed as injected: the two would
/// redirect each other's connections (Linkerd's takes strait's very ports).
#[test]
fn an_injected_pod_another_mesh_claimed_too_is_refused() {
    let mut both = applied(pod(json!({}), app_spec()), Namespace::Enabled);
    both["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "linkerd-proxy", "image": "x"}));
    // Whether or not its namespace is labelled: `strait inject`'s output
    // names no `strait.dev/inject`.
    for ns in [Namespace::Enabled, Namespace::NotEnabled] {
        let e = inject(&both, ns, &settings()).unwrap_err();
        assert!(
            e.to_string().contains("another mesh's linkerd-proxy"),
            "{e}"
        );
    }
    assert!(
        both["metadata"]["annotations"]
            .get("strait.dev/inbound-port")
            .is_some(),
        "what the opt-in webhook's condition looks for"
    );
}

/// The proxy's own connections are the ones not redirected, by its uid: an
/// app running as that uid would leave the pod past the proxy (no mTLS, no
/// policy, refused by every peer that requires mTLS) with nothing said.
#[test]
fn an_app_running_as_the_proxy_s_uid_is_refused_by_name() {
    let refused = |spec: Value| {
        inject(&pod(json!({}), spec), Namespace::Enabled, &settings())
            .unwrap_err()
            .to_string()
    };
    let e = refused(json!({"securityContext": {"runAsUser": 2102},
                           "containers": [{"name": "app", "image": "app:1"}]}));
    assert!(e.contains("container app runs as uid 2102"), "{e}");
    let e = refused(json!({"initContainers": [{"name": "migrate", "image": "m",
                                               "securityContext": {"runAsUser": 2102}}],
                           "containers": [{"name": "app", "image": "app:1"}]}));
    assert!(e.contains("container migrate runs as uid 2102"), "{e}");
    // A container's own uid is the one it runs as.
    let spec = json!({"securityContext": {"runAsUser": 2102},
                      "containers": [{"name": "app", "image": "app:1",
                                      "securityContext": {"runAsUser": 1000}}]});
    assert!(matches!(
        inject(&pod(json!({}), spec), Namespace::Enabled, &settings()).unwrap(),
        Outcome::Inject(_)
    ));
}

/// An empty annotation (as a template renders an unset value) skips
/// nothing rather than refusing the pod.
#[test]
fn empty_skip_annotations_skip_nothing() {
    let p = applied(
        pod(
            json!({SKIP_OUTBOUND_CIDRS: "", SKIP_OUTBOUND_PORTS: ""}),
            app_spec(),
        ),
        Namespace::Enabled,
    );
    let init = &p["spec"]["initContainers"][0];
    assert!(env(init, "STRAIT_PROXY_SKIP_OUTBOUND_CIDRS").is_none());
}

#[test]
fn the_namespace_label_injects_unless_the_pod_opts_out_or_uses_the_host_network() {
    let plain = pod(json!({}), app_spec());
    assert!(matches!(
        inject(&plain, Namespace::NotEnabled, &settings()).unwrap(),
        Outcome::Skip(_)
    ));
    assert_eq!(init_names(&applied(plain, Namespace::Enabled)).len(), 2);

    let opted_out = pod(json!({INJECT: "disabled"}), app_spec());
    assert!(matches!(
        inject(&opted_out, Namespace::Enabled, &settings()).unwrap(),
        Outcome::Skip(_)
    ));
    // The label (which also keeps the pod from the webhooks) opts out too,
    // whatever the annotation says.
    let mut labelled = pod(json!({INJECT: "enabled"}), app_spec());
    labelled["metadata"]["labels"] = json!({INJECT: "disabled"});
    assert_eq!(
        inject(&labelled, Namespace::Enabled, &settings()).unwrap(),
        Outcome::Skip("the pod is labelled strait.dev/inject=disabled")
    );
    // The label asks for it as the annotation does.
    let mut asked = pod(json!({}), app_spec());
    asked["metadata"]["labels"] = json!({INJECT: "enabled"});
    assert_eq!(init_names(&applied(asked, Namespace::NotEnabled)).len(), 2);
    let host = pod(
        json!({INJECT: "enabled"}),
        json!({"hostNetwork": true, "containers": [{"name": "a", "image": "a"}]}),
    );
    assert_eq!(
        inject(&host, Namespace::Enabled, &settings()).unwrap(),
        Outcome::Skip("the pod uses the host's network")
    );
    // A Windows pod could run neither the proxy nor its init container.
    for spec in [
        json!({"os": {"name": "windows"}, "containers": [{"name": "a", "image": "a"}]}),
        json!({"nodeSelector": {"kubernetes.io/os": "windows"}, "containers": [{"name": "a", "image": "a"}]}),
        json!({"affinity": os_affinity(&[&["windows"]]), "containers": [{"name": "a", "image": "a"}]}),
        json!({"affinity": os_affinity(&[&["windows"], &["windows"]]), "containers": [{"name": "a", "image": "a"}]}),
    ] {
        let p = pod(json!({INJECT: "enabled"}), spec);
        assert_eq!(
            inject(&p, Namespace::Enabled, &settings()).unwrap(),
            Outcome::Skip("the pod runs on Windows")
        );
    }
    // A pod that may land on Linux nodes is injected.
    for spec in [
        json!({"os": {"name": "linux"}, "containers": [{"name": "a", "image": "a"}]}),
        json!({"affinity": os_affinity(&[&["linux", "windows"]]), "containers": [{"name": "a", "image": "a"}]}),
        json!({"affinity": os_affinity(&[&["windows"], &["linux"]]), "containers": [{"name": "a", "image": "a"}]}),
    ] {
        let linux = pod(json!({INJECT: "enabled"}), spec);
        assert!(matches!(
            inject(&linux, Namespace::Enabled, &settings()).unwrap(),
            Outcome::Inject(_)
        ));
    }
    // The node's DNS has no name for the controller: the proxy could never
    // reach it. The cluster's DNS, said outright, is fine.
    for (policy, skipped) in [("Default", true), ("ClusterFirst", false)] {
        let p = pod(
            json!({INJECT: "enabled"}),
            json!({"dnsPolicy": policy, "containers": [{"name": "a", "image": "a"}]}),
        );
        let out = inject(&p, Namespace::Enabled, &settings()).unwrap();
        assert_eq!(
            matches!(out, Outcome::Skip(_)),
            skipped,
            "{policy}: {out:?}"
        );
    }
}

#[test]
fn annotations_reach_the_proxy_and_the_init_container() {
    let p = applied(
        pod(
            json!({OPAQUE_PORTS: "5432", SKIP_INBOUND_PORTS: "22,9000-9010",
                   SKIP_OUTBOUND_PORTS: "443", PROXY_LOG_LEVEL: "debug",
                   PROXY_CONNECT_TIMEOUT: "5s",
                   PROXY_TCP_IDLE_TIMEOUT: "4h",
                   PROXY_HTTP_IDLE_TIMEOUT: "620s",
                   PROXY_HTTP_BODY_READ_TIMEOUT: "5m",
                   PROXY_MAX_CONNECTIONS: "50000",
                   PROXY_INBOUND_MAX_CONNECTIONS_PER_SOURCE: " 40000",
                   PROXY_MAX_DISCOVERY_WATCHES: "1500",
                   SKIP_OUTBOUND_CIDRS: "169.254.169.254, 10.0.0.0/8, fd00:10:96::/112",
                   DISCOVERY_NETWORKS: "10.0.0.0/8, 34.118.224.0/20",
                   PROXY_IMAGE: "registry.local/strait-proxy:dev"}),
            json!({"initContainers": [{"name": "migrate", "image": "m"}],
                   "volumes": [{"name": "data", "emptyDir": {}}],
                   "containers": [{"name": "app", "image": "app"}]}),
        ),
        Namespace::Enabled,
    );
    assert_eq!(init_names(&p), ["strait-init", "strait-proxy", "migrate"]);
    let (init, proxy) = (
        &p["spec"]["initContainers"][0],
        &p["spec"]["initContainers"][1],
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_OPAQUE_PORTS").unwrap()["value"],
        "5432"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_LOG_LEVEL").unwrap()["value"],
        "debug"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_CONNECT_TIMEOUT").unwrap()["value"],
        "5s"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_DISCOVERY_NETWORKS").unwrap()["value"],
        "10.0.0.0/8,34.118.224.0/20"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_TCP_IDLE_TIMEOUT").unwrap()["value"],
        "4h"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_HTTP_IDLE_TIMEOUT").unwrap()["value"],
        "620s"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_HTTP_BODY_READ_TIMEOUT").unwrap()["value"],
        "5m"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_MAX_CONNECTIONS").unwrap()["value"],
        "50000"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_INBOUND_MAX_CONNECTIONS_PER_SOURCE").unwrap()["value"],
        "40000"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_MAX_DISCOVERY_WATCHES").unwrap()["value"],
        "1500"
    );
    assert_eq!(
        env(init, "STRAIT_PROXY_SKIP_INBOUND_PORTS").unwrap()["value"],
        "22,9000-9010"
    );
    assert_eq!(
        env(init, "STRAIT_PROXY_SKIP_OUTBOUND_PORTS").unwrap()["value"],
        "443"
    );
    assert_eq!(
        env(init, "STRAIT_PROXY_SKIP_OUTBOUND_CIDRS").unwrap()["value"],
        "169.254.169.254,10.0.0.0/8,fd00:10:96::/112"
    );
    // The default backend (nft) is the init's own default.
    assert!(env(init, "STRAIT_PROXY_IPTABLES_MODE").is_none());
    assert_eq!(proxy["image"], "registry.local/strait-proxy:dev");
    // The root, NET_ADMIN init container keeps the operator's image.
    assert_eq!(init["image"], settings().proxy_image);
    // A proxy the pod names may not listen on IPv6 loopback: the app's IPv6
    // connections are not sent there.
    assert_eq!(
        env(init, "STRAIT_PROXY_IPV6_OUTBOUND").unwrap()["value"],
        "false"
    );
    let volumes: Vec<&str> = p["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(volumes[0], "data", "the app's volumes stay first");
}

#[test]
fn the_iptables_backend_set_on_the_controller_reaches_the_init_container() {
    let mut s = settings();
    s.iptables_mode = IptablesMode::Legacy;
    let patch = match inject(&pod(json!({}), app_spec()), Namespace::Enabled, &s).unwrap() {
        Outcome::Inject(p) => p,
        Outcome::Skip(why) => panic!("skipped: {why}"),
    };
    let mut p = pod(json!({}), app_spec());
    json_patch::patch(&mut p, &patch).unwrap();
    let init = &p["spec"]["initContainers"][0];
    assert_eq!(init["name"], "strait-init");
    assert_eq!(
        env(init, "STRAIT_PROXY_IPTABLES_MODE").unwrap()["value"],
        "legacy"
    );
}

/// The proxy container's value of `name`, for a pod with `labels` and
/// `annotations` injected with `s`.
fn proxy_env(s: &Settings, labels: Value, annotations: Value, name: &str) -> Option<String> {
    let mut p = pod(annotations, app_spec());
    p["metadata"]["labels"] = labels;
    match inject(&p, Namespace::Enabled, s).unwrap() {
        Outcome::Inject(patch) => json_patch::patch(&mut p, &patch).unwrap(),
        Outcome::Skip(why) => panic!("skipped: {why}"),
    }
    let proxy = &p["spec"]["initContainers"][1];
    assert_eq!(proxy["name"], PROXY_CONTAINER);
    env(proxy, name).map(|e| e["value"].as_str().unwrap().to_string())
}

#[test]
fn traces_and_access_logs_follow_the_mesh_unless_the_pod_says_otherwise() {
    let none = settings();
    let mut mesh = settings();
    mesh.telemetry = Telemetry {
        proxy_otlp_endpoint: Some("http://otel.observability:4317".into()),
        proxy_trace_sampling: Some("0.1".into()),
        proxy_access_log: Some(AccessLog::Json),
    };
    let (endpoint, sampling, log, service) = (
        "STRAIT_PROXY_OTLP_ENDPOINT",
        "STRAIT_PROXY_TRACE_SAMPLING",
        "STRAIT_PROXY_ACCESS_LOG",
        "STRAIT_PROXY_SERVICE_NAME",
    );
    // Nothing configured: nothing exported or logged.
    for name in [endpoint, sampling, log, service] {
        assert_eq!(
            proxy_env(&none, json!({"app": "web"}), json!({}), name),
            None
        );
    }
    // The mesh's defaults, the spans named for the app's label.
    let labels = json!({"app.kubernetes.io/name": "checkout", "app": "web"});
    let got = |s: &Settings, labels: &Value, annotations: Value, name| {
        proxy_env(s, labels.clone(), annotations, name)
    };
    assert_eq!(
        got(&mesh, &labels, json!({}), endpoint).as_deref(),
        Some("http://otel.observability:4317")
    );
    assert_eq!(
        got(&mesh, &labels, json!({}), sampling).as_deref(),
        Some("0.1")
    );
    assert_eq!(got(&mesh, &labels, json!({}), log).as_deref(), Some("json"));
    assert_eq!(
        got(&mesh, &labels, json!({}), service).as_deref(),
        Some("checkout")
    );
    assert_eq!(
        got(&mesh, &json!({"app": "web"}), json!({}), service).as_deref(),
        Some("web")
    );
    // No label: the proxy names its spans for the service account.
    assert_eq!(got(&mesh, &json!({}), json!({}), service), None);
    // A pod's own choices.
    let own = json!({
        PROXY_OTLP_ENDPOINT: "http://tempo.tracing:4317",
        PROXY_TRACE_SAMPLING: "1",
        PROXY_ACCESS_LOG: "text",
        SERVICE_NAME: "checkout-api",
    });
    assert_eq!(
        got(&none, &labels, own.clone(), endpoint).as_deref(),
        Some("http://tempo.tracing:4317")
    );
    assert_eq!(
        got(&none, &labels, own.clone(), sampling).as_deref(),
        Some("1")
    );
    assert_eq!(
        got(&none, &labels, own.clone(), log).as_deref(),
        Some("text")
    );
    assert_eq!(
        got(&none, &labels, own, service).as_deref(),
        Some("checkout-api")
    );
    // And its way out of the mesh's.
    let out = json!({PROXY_OTLP_ENDPOINT: "none", PROXY_ACCESS_LOG: "off"});
    for name in [endpoint, sampling, log, service] {
        assert_eq!(got(&mesh, &labels, out.clone(), name), None, "{name}");
    }
}

/// A proxy given more than a core runs as many threads: by its annotation,
/// or, not given, by its CPU limit's cores rounded up.
#[test]
fn the_proxy_s_threads_follow_its_annotation_or_its_cpu_limit() {
    let threads = |annotations: Value| {
        let p = applied(pod(annotations, app_spec()), Namespace::Enabled);
        env(&p["spec"]["initContainers"][1], "STRAIT_PROXY_THREADS")
            .map(|e| e["value"].as_str().unwrap().to_string())
    };
    assert_eq!(threads(json!({PROXY_THREADS: "4"})).as_deref(), Some("4"));
    assert_eq!(threads(json!({PROXY_CPU_LIMIT: "4"})).as_deref(), Some("4"));
    assert_eq!(
        threads(json!({PROXY_CPU_LIMIT: "2500m"})).as_deref(),
        Some("3")
    );
    assert_eq!(
        threads(json!({PROXY_CPU_LIMIT: "8", PROXY_THREADS: "2"})).as_deref(),
        Some("2")
    );
    assert_eq!(
        threads(json!({PROXY_CPU_LIMIT: "1"})),
        None,
        "one is the default"
    );
    assert_eq!(threads(json!({PROXY_CPU_LIMIT: "500m"})), None);
    assert_eq!(threads(json!({})), None);
}

#[test]
fn bad_annotations_are_named_in_the_error() {
    for (k, v) in [
        (OPAQUE_PORTS, "postgres"),
        (SKIP_INBOUND_PORTS, "0"),
        (SKIP_OUTBOUND_PORTS, "90-80"),
        (PROXY_LOG_LEVEL, "loud=="),
        (PROXY_CONNECT_TIMEOUT, "5"),
        (PROXY_CONNECT_TIMEOUT, "0s"),
        (PROXY_CONNECT_TIMEOUT, "1h"),
        (PROXY_TCP_IDLE_TIMEOUT, "0s"),
        (PROXY_TCP_IDLE_TIMEOUT, "60d"),
        (PROXY_HTTP_IDLE_TIMEOUT, "2d"),
        (PROXY_HTTP_IDLE_TIMEOUT, "never"),
        (PROXY_HTTP_BODY_READ_TIMEOUT, "0s"),
        (PROXY_HTTP_BODY_READ_TIMEOUT, "2h"),
        (PROXY_MAX_CONNECTIONS, "0"),
        (PROXY_MAX_CONNECTIONS, "lots"),
        (PROXY_INBOUND_MAX_CONNECTIONS_PER_SOURCE, "600000"),
        (PROXY_MAX_DISCOVERY_WATCHES, "-1"),
        (PROXY_MAX_DISCOVERY_WATCHES, "2001"),
        (PROXY_THREADS, "0"),
        (PROXY_THREADS, "65"),
        (PROXY_IMAGE, "two words"),
        (SKIP_OUTBOUND_CIDRS, "10.0.0.0/33"),
        (SKIP_OUTBOUND_CIDRS, "fd00::1/64"),
        (SKIP_OUTBOUND_CIDRS, "10.1.2.3/16"),
        (DISCOVERY_NETWORKS, "10.0.0.0/8,cluster"),
        (INJECT, "yes"),
        (PROXY_OTLP_ENDPOINT, "collector:4317"),
        (PROXY_OTLP_ENDPOINT, "https://collector:4317"),
        (PROXY_OTLP_ENDPOINT, "http://collector"),
        (PROXY_TRACE_SAMPLING, "1.5"),
        (PROXY_ACCESS_LOG, "apache"),
    ] {
        let err = inject(
            &pod(json!({k: v}), app_spec()),
            Namespace::Enabled,
            &settings(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(k) && err.contains(v), "{err}");
    }
    let err = inject(
        &pod(json!({SERVICE_NAME: "two\nlines"}), app_spec()),
        Namespace::Enabled,
        &settings(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(SERVICE_NAME), "{err}");
}

/// A field filter's value is a regular expression, compiled into an
/// automaton as the filter is parsed: one that grows exponentially would take
/// the controller's memory and a worker for as long as it builds. Refused
/// before any of that, as is a filter of unbounded length.
#[test]
fn a_log_filter_is_refused_before_it_can_cost_the_controller() {
    let blowup = format!("[{{f=(a|b)*a{}}}]=debug", "(a|b)".repeat(16));
    for v in [blowup, format!("info,{}", "a=debug,".repeat(100))] {
        let start = std::time::Instant::now();
        let err = inject(
            &pod(json!({PROXY_LOG_LEVEL: v}), app_spec()),
            Namespace::Enabled,
            &settings(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(PROXY_LOG_LEVEL), "{err}");
        assert!(start.elapsed() < std::time::Duration::from_millis(100));
    }
    // Spans by name are fine.
    let spans = pod(json!({PROXY_LOG_LEVEL: "warn,[connect]=debug"}), app_spec());
    assert!(inject(&spans, Namespace::Enabled, &settings()).is_ok());
}

fn admission(object: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object, "dryRun": false,
        }
    }))
    .unwrap()
}

/// The webhook's answer: (HTTP status, allowed, patched object, message, warnings).
fn webhook(object: &Value, ns: Namespace, policy: FailurePolicy) -> (u16, Value) {
    let (status, review) = review(&admission(object), Hook::Inject(ns), &settings(), policy);
    (status.as_u16(), serde_json::to_value(review).unwrap())
}

fn patched(object: &Value, rsp: &Value) -> Value {
    let mut out = object.clone();
    // The patch's bytes travel as a JSON array of numbers (which the API
    // server's decoder takes for a []byte as it takes base64).
    if let Some(p) = rsp["response"]["patch"].as_array() {
        let bytes: Vec<u8> = p.iter().map(|b| b.as_u64().unwrap() as u8).collect();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut out, &patch).unwrap();
    }
    out
}

/// Every pod template of the sample workloads in deploy/examples/workloads.
fn sample_pods() -> Vec<(String, Value)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/workloads");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for doc in text.split("\n---\n") {
            let v: Value = serde_norway::from_str(doc).unwrap();
            let name = format!(
                "{}/{}",
                v["kind"].as_str().unwrap(),
                v["metadata"]["name"].as_str().unwrap()
            );
            let template = match v["kind"].as_str().unwrap() {
                "Pod" => v.clone(),
                "CronJob" => v["spec"]["jobTemplate"]["spec"]["template"].clone(),
                "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => v["spec"]["template"].clone(),
                _ => continue,
            };
            let mut pod = template;
            pod["apiVersion"] = json!("v1");
            pod["kind"] = json!("Pod");
            out.push((name, pod));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn the_webhook_injects_the_sample_workloads_and_leaves_the_opted_out_alone() {
    let pods = sample_pods();
    assert_eq!(
        pods.len(),
        6,
        "{:?}",
        pods.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    for (name, pod) in pods {
        // The namespace `shop` is labelled for injection.
        let (status, rsp) = webhook(&pod, Namespace::Enabled, FailurePolicy::Fail);
        assert_eq!(status, 200, "{name}");
        assert_eq!(rsp["response"]["allowed"], true, "{name}");
        assert_eq!(
            rsp["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        let out = patched(&pod, &rsp);
        let untouched = name == "Pod/debug" || name == "DaemonSet/node-agent";
        if untouched {
            assert_eq!(out, pod, "{name} is not injected");
            assert!(rsp["response"]["patch"].is_null());
            continue;
        }
        assert_eq!(
            &init_names(&out)[..2],
            ["strait-init", "strait-proxy"],
            "{name}"
        );
        // Re-injection changes nothing.
        let (_, again) = webhook(&out, Namespace::Enabled, FailurePolicy::Fail);
        assert!(again["response"]["patch"].is_null(), "{name}");
        assert_eq!(again["response"]["allowed"], true);
    }
}

#[test]
fn a_pod_that_cannot_be_injected_is_refused_or_admitted_per_the_failure_policy() {
    let bad = pod(json!({INJECT: "enabled", OPAQUE_PORTS: "http"}), app_spec());
    let (status, rsp) = webhook(&bad, Namespace::NotEnabled, FailurePolicy::Fail);
    assert_eq!(status, 200);
    assert_eq!(rsp["response"]["allowed"], false);
    let msg = rsp["response"]["status"]["message"].as_str().unwrap();
    assert!(msg.contains("strait.dev/opaque-ports"), "{msg}");

    let (_, rsp) = webhook(&bad, Namespace::NotEnabled, FailurePolicy::Ignore);
    assert_eq!(rsp["response"]["allowed"], true);
    assert!(rsp["response"]["patch"].is_null());
    assert!(
        rsp["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("strait.dev/opaque-ports")
    );
}

#[test]
fn a_malformed_review_gets_a_clear_error() {
    for body in [
        &b"{"[..],
        b"[]",
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
    ] {
        let (status, review) = review(
            body,
            Hook::Inject(Namespace::Enabled),
            &settings(),
            FailurePolicy::Fail,
        );
        assert_eq!(status.as_u16(), 400);
        let rsp = serde_json::to_value(review).unwrap();
        assert_eq!(rsp["response"]["allowed"], false);
        assert!(
            rsp["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("not an AdmissionReview")
        );
    }
}

/// Anyone who reaches the webhook's port can send bad reviews: the log
/// takes a few of them, each short, however many and however long.
#[test]
fn bad_reviews_are_logged_sampled_and_short() {
    #[derive(Clone, Default)]
    struct Log(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Log {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // serde's message quotes the string it could not take.
    let long = format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..100 {
            let (status, _) = review(
                long.as_bytes(),
                Hook::Inject(Namespace::Enabled),
                &settings(),
                FailurePolicy::Fail,
            );
            assert_eq!(status.as_u16(), 400);
        }
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        !lines.is_empty() && lines.len() <= 10,
        "{} lines",
        lines.len()
    );
    assert!(lines.iter().all(|l| l.len() < 1024), "{}", lines[0].len());
}

#[test]
fn strait_inject_edits_pod_templates_and_keeps_every_other_document_as_written() {
    let input = "\
# the app
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: nginx
---
# kept verbatim, comment included
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Pod
    metadata: {name: a}
    spec: {containers: [{name: a, image: a}]}
";
    let (out, reports) = inject_stream(input, &settings()).unwrap();
    let docs: Vec<&str> = out.split("\n---\n").collect();
    assert_eq!(docs.len(), 3);
    assert!(
        docs[1].starts_with("# kept verbatim, comment included\n"),
        "{}",
        docs[1]
    );
    let web: Value = serde_norway::from_str(docs[0]).unwrap();
    assert_eq!(
        init_names(&web["spec"]["template"]),
        ["strait-init", "strait-proxy"]
    );
    let list: Value = serde_norway::from_str(docs[2]).unwrap();
    assert_eq!(init_names(&list["items"][0]).len(), 2);
    assert_eq!(
        reports,
        [
            workloads::Report {
                object: "deployment/web".into(),
                result: Ok("injected")
            },
            workloads::Report {
                object: "pod/a".into(),
                result: Ok("injected")
            },
        ]
    );
    // Injecting the output again changes nothing.
    let (again, _) = inject_stream(&out, &settings()).unwrap();
    assert_eq!(again, out);
}

/// What kubectl (YAML 1.1) reads differently from this parser comes out
/// as kubectl would have read the input: a plain octal file mode is a
/// number, a quoted `on` stays a string rather than turning boolean.
#[test]
fn strait_inject_writes_what_kubectl_reads_as_written() {
    let input = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
        - name: web
          image: nginx
          env: [{name: FEATURE, value: \"on\"}, {name: SINCE, value: \"2024-01-01\"}]
      volumes:
        - name: config
          configMap: {name: web, defaultMode: 0644}
";
    let (out, reports) = inject_stream(input, &settings()).unwrap();
    assert_eq!(reports[0].result, Ok("injected"));
    let web: Value = serde_norway::from_str(&out).unwrap();
    let pod = &web["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["configMap"]["defaultMode"], 420);
    assert_eq!(pod["containers"][0]["env"][0]["value"], "on");
    assert!(out.contains("value: \"on\""), "{out}");
    assert!(out.contains("value: \"2024-01-01\""), "{out}");
}

/// YAML 1.1's merge keys are merged, as kubectl merges them, and a document
/// that starts on its `---` line is kept whole.
#[test]
fn strait_inject_reads_merge_keys_and_documents_on_the_marker_line() {
    let input = "\
# first
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
        - &common
          name: worker
          image: web
          ports: [{containerPort: 8080}]
        - name: web
          <<: *common
          image: web:2
--- {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: [{name: p, image: p}]}}
--- # a comment
kind: ConfigMap
";
    let (out, reports) = inject_stream(input, &settings()).unwrap();
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(
        reports.iter().all(|r| r.result == Ok("injected")),
        "{reports:?}"
    );
    assert!(!out.contains("<<"), "{out}");
    let docs: Vec<Value> = out
        .split("\n---\n")
        .map(|d| serde_norway::from_str(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 4, "{out}");
    let web = &docs[1]["spec"]["template"]["spec"]["containers"][1];
    assert_eq!(web["image"], "web:2", "the container's own field wins");
    assert_eq!(web["ports"][0]["containerPort"], 8080, "merged");
    assert_eq!(init_names(&docs[2]).len(), 2);
    assert_eq!(docs[3]["kind"], "ConfigMap");
}

/// A host-network pod written with a YAML 1.1 boolean (`hostNetwork: yes`,
/// which kubectl reads as true) is left alone like any other: injected, its
/// init container would rewrite the node's own iptables.
#[test]
fn strait_inject_reads_yaml_1_1_booleans_before_deciding() {
    for yes in ["yes", "on", "y", "True"] {
        let input = format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: d}}\nspec:\n  template:\n    spec:\n      hostNetwork: {yes}\n      containers: [{{name: c, image: c}}]\n"
        );
        let (out, reports) = inject_stream(&input, &settings()).unwrap();
        assert_eq!(reports.len(), 1, "{yes}: {reports:?}");
        assert_ne!(reports[0].result, Ok("injected"), "{yes}: {reports:?}");
        assert_eq!(out, input, "{yes}: written back as it was");
    }
}

/// `kubectl get deploy -A -o yaml | strait inject -` passes by the system's
/// and the mesh's own workloads: a controller or DNS server whose proxy
/// waits for them would never start again.
#[test]
fn strait_inject_leaves_the_system_and_the_mesh_alone() {
    let deployment = |ns: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d, namespace: {ns}}}\nspec:\n  template:\n    spec:\n      containers: [{{name: c, image: c}}]\n"
        )
    };
    let input = [
        "kube-system",
        "kube-node-lease",
        "strait-system",
        "mesh",
        "prod",
    ]
    .map(deployment)
    .join("---\n");
    let mut s = settings();
    s.controller_at("mesh", "strait-controller", 8090);
    let (out, reports) = inject_stream(&input, &s).unwrap();
    let injected: Vec<bool> = reports.iter().map(|r| r.result == Ok("injected")).collect();
    // strait-system is not this mesh's namespace here.
    assert_eq!(injected, [false, false, true, false, true], "{reports:?}");
    let meshed: Vec<bool> = out
        .split("\n---\n")
        .map(|d| d.contains("strait-proxy"))
        .collect();
    assert_eq!(meshed, injected, "{out}");
}

#[test]
fn strait_inject_refuses_a_broken_document_and_names_it() {
    let err = inject_stream("kind: Pod\n---\nkind: [\n", &settings()).unwrap_err();
    assert!(err.to_string().starts_with("document 2: not YAML"), "{err}");
}

/// A `tcpSocket` probe of the app's port would reach its proxy, which accepts
/// whether or not the app listens: it is pointed at the proxy's report on the
/// app's port instead, the rest of the probe as written.
#[test]
fn tcp_probes_ask_the_proxy_whether_the_app_listens() {
    let p = applied(
        pod(
            json!({INJECT: "enabled"}),
            json!({"containers": [
                {"name": "db", "image": "db", "ports": [{"name": "pg", "containerPort": 5432}],
                 "readinessProbe": {"tcpSocket": {"port": "pg"}, "periodSeconds": 7},
                 "livenessProbe": {"tcpSocket": {"port": 5432}, "failureThreshold": 9},
                 "startupProbe": {"httpGet": {"path": "/up", "port": 8080}}},
                {"name": "cache", "image": "cache",
                 "livenessProbe": {"tcpSocket": {"port": "6379"}},
                 "readinessProbe": {"tcpSocket": {"port": 11211, "host": "10.0.0.9"}}}
            ]}),
        ),
        Namespace::Enabled,
    );
    let c = &p["spec"]["containers"];
    let to_proxy =
        |port: u16| json!({"path": format!("/probe/tcp/{port}?timeout=1s"), "port": 4191});
    assert_eq!(
        c[0]["readinessProbe"],
        json!({"httpGet": to_proxy(5432), "periodSeconds": 7})
    );
    assert_eq!(
        c[0]["livenessProbe"],
        json!({"httpGet": to_proxy(5432), "failureThreshold": 9})
    );
    assert_eq!(
        c[0]["startupProbe"]["httpGet"]["port"], 8080,
        "HTTP probes stay"
    );
    assert_eq!(c[1]["livenessProbe"], json!({"httpGet": to_proxy(6379)}));
    assert_eq!(
        c[1]["readinessProbe"]["tcpSocket"]["host"], "10.0.0.9",
        "another host's port is not the proxy's to answer for"
    );
    let proxy = &p["spec"]["initContainers"][1];
    assert_eq!(
        env(proxy, "STRAIT_PROXY_TCP_PROBE_PORTS").unwrap()["value"],
        "5432,6379"
    );
    // Without tcpSocket probes, nothing is asked of the proxy.
    let plain = applied(
        pod(json!({INJECT: "enabled"}), app_spec()),
        Namespace::Enabled,
    );
    assert!(
        env(
            &plain["spec"]["initContainers"][1],
            "STRAIT_PROXY_TCP_PROBE_PORTS"
        )
        .is_none()
    );
}

/// The probe's own timeout travels with it; the app's sidecars are covered
/// at their places; probes rewritten before keep their port on the proxy's
/// list; a pod that names another proxy image keeps its probes as written.
#[test]
fn tcp_probe_rewrites_keep_timeouts_sidecars_and_earlier_rewrites() {
    let p = applied(
        pod(
            json!({INJECT: "enabled"}),
            json!({
                "initContainers": [
                    {"name": "migrate", "image": "m"},
                    {"name": "envoy", "image": "e", "restartPolicy": "Always",
                     "livenessProbe": {"tcpSocket": {"port": 9901}, "timeoutSeconds": 0}}],
                "containers": [
                    {"name": "db", "image": "db",
                     "readinessProbe": {"tcpSocket": {"port": 5432}, "timeoutSeconds": 5},
                     "startupProbe": {"tcpSocket": {"port": 5432}, "timeoutSeconds": 120},
                     "livenessProbe": {"httpGet": {"path": "/probe/tcp/6379?timeout=1s", "port": 4191}}}]}),
        ),
        Namespace::Enabled,
    );
    assert_eq!(
        init_names(&p),
        ["strait-init", "strait-proxy", "migrate", "envoy"]
    );
    assert_eq!(
        p["spec"]["initContainers"][3]["livenessProbe"]["httpGet"]["path"],
        "/probe/tcp/9901?timeout=1s"
    );
    assert_eq!(
        p["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/probe/tcp/5432?timeout=5s"
    );
    assert_eq!(
        p["spec"]["containers"][0]["startupProbe"]["httpGet"]["path"],
        "/probe/tcp/5432?timeout=60s",
        "the proxy waits 60 s at most"
    );
    let proxy = &p["spec"]["initContainers"][1];
    assert_eq!(
        env(proxy, "STRAIT_PROXY_TCP_PROBE_PORTS").unwrap()["value"],
        "5432,6379,9901"
    );

    let pinned = applied(
        pod(
            json!({INJECT: "enabled", PROXY_IMAGE: "registry.local/strait-proxy:old"}),
            json!({"containers": [{"name": "db", "image": "db",
                   "readinessProbe": {"tcpSocket": {"port": 5432}}}]}),
        ),
        Namespace::Enabled,
    );
    assert_eq!(
        pinned["spec"]["containers"][0]["readinessProbe"],
        json!({"tcpSocket": {"port": 5432}})
    );

    // So is the mesh's own image when it is of an earlier release (pinned
    // across an upgrade, a CLI newer than the install); this release's, a
    // later one or a digest are not.
    let probe_with = |image: &str| {
        let mut s = settings();
        s.proxy_image = image.into();
        let mut p = pod(
            json!({INJECT: "enabled"}),
            json!({"containers": [{"name": "db", "image": "db",
                   "readinessProbe": {"tcpSocket": {"port": 5432}}}]}),
        );
        let Outcome::Inject(patch) = inject(&p, Namespace::Enabled, &s).unwrap() else {
            panic!("skipped")
        };
        json_patch::patch(&mut p, &patch).unwrap();
        (
            s.earlier_proxy(),
            p["spec"]["containers"][0]["readinessProbe"].clone(),
        )
    };
    let (said, probe) = probe_with("registry.local/strait-proxy:v0.0.9");
    assert_eq!(probe, json!({"tcpSocket": {"port": 5432}}));
    assert!(said.unwrap().contains("of a release before 0.1.0"));
    for image in [
        format!(
            "registry.local:5000/strait-proxy:v{}",
            env!("CARGO_PKG_VERSION")
        ),
        "registry.local/strait-proxy:v99.0.0-rc.1".into(),
        "registry.local/strait-proxy@sha256:0123".into(),
        "registry.local:5000/strait-proxy".into(),
    ] {
        let (said, probe) = probe_with(&image);
        assert!(
            probe.get("httpGet").is_some() && said.is_none(),
            "{image}: {probe}"
        );
    }
}

/// Pod-level resources: the API server refuses a pod whose containers'
/// requests together (an init container's with the sidecars before it, the
/// proxy among them) pass the pod's. The proxy's defaults are fitted within
/// them, its limit within the pod's; an annotation's request that does not
/// fit refuses the pod, naming it.
#[test]
fn the_proxy_fits_the_pods_own_resources() {
    let spec = |pod_resources: Value| {
        json!({"resources": pod_resources,
               "initContainers": [{"name": "agent", "image": "a", "restartPolicy": "Always",
                                   "resources": {"requests": {"cpu": "100m"}}},
                                  {"name": "migrate", "image": "m",
                                   "resources": {"limits": {"cpu": "1"}}}],
               "containers": [{"name": "app", "image": "app:1",
                               "resources": {"requests": {"cpu": "400m", "memory": "100Mi"}}}]})
    };
    let injected = |annotations: Value, pod_resources: Value| {
        let mut a = json!({INJECT: "enabled"});
        a.as_object_mut()
            .unwrap()
            .extend(annotations.as_object().unwrap().clone());
        inject(
            &pod(a, spec(pod_resources)),
            Namespace::NotEnabled,
            &settings(),
        )
    };
    let resources = |annotations: Value, pod_resources: Value| {
        let Ok(Outcome::Inject(patch)) = injected(annotations, pod_resources) else {
            panic!("not injected")
        };
        let mut p = pod(json!({}), spec(json!({})));
        json_patch::patch(&mut p, &patch).unwrap();
        assert_eq!(
            p["spec"]["initContainers"][0]["resources"],
            p["spec"]["initContainers"][1]["resources"]
        );
        p["spec"]["initContainers"][1]["resources"].clone()
    };
    // The app's containers take all the pod asks: the proxy shares it.
    assert_eq!(
        resources(json!({}), json!({"requests": {"memory": "100Mi"}})),
        json!({"requests": {"cpu": "10m", "memory": "0"}, "limits": {"memory": "250Mi"}})
    );
    // The migration (its request its limit) runs beside the agent and the
    // proxy: 1.1 cores of 1.1 taken.
    assert_eq!(
        resources(json!({}), json!({"requests": {"cpu": "1100m"}})),
        json!({"requests": {"cpu": "0m", "memory": "20Mi"}, "limits": {"memory": "250Mi"}})
    );
    // Some left: the default where it fits, else what is left; the limit
    // down to the pod's, its request (none given) being its limit.
    assert_eq!(
        resources(
            json!({}),
            json!({"requests": {"cpu": 2}, "limits": {"memory": "110Mi"}})
        ),
        json!({"requests": {"cpu": "10m", "memory": "10485760"}, "limits": {"memory": "115343360"}})
    );
    assert_eq!(
        resources(json!({}), json!({"limits": {"memory": "2Gi"}})),
        json!({"requests": {"cpu": "10m", "memory": "20Mi"}, "limits": {"memory": "250Mi"}})
    );
    // A limit given comes down too (the proxy would size its shedding to
    // what the pod's cgroup never lets it reach); a request given that
    // cannot fit refuses the pod.
    let tight = json!({"limits": {"memory": "800Mi"}});
    let given = resources(json!({PROXY_MEMORY_LIMIT: "1Gi"}), tight.clone());
    assert_eq!(given["limits"]["memory"], "838860800");
    let err = injected(json!({PROXY_MEMORY_REQUEST: "750Mi"}), tight).unwrap_err();
    assert!(err.to_string().contains(PROXY_MEMORY_REQUEST), "{err}");
    assert!(err.to_string().contains("spec.resources"), "{err}");
}

/// The proxy's resources: defaults, or what the pod's annotations say; a
/// value that is not a quantity, or a request above its limit, refuses the
/// pod with the annotation's name.
#[test]
fn proxy_resources_follow_the_pods_annotations() {
    let resources = |annotations: Value| {
        let mut a = json!({INJECT: "enabled"});
        a.as_object_mut()
            .unwrap()
            .extend(annotations.as_object().unwrap().clone());
        let p = applied(pod(a, app_spec()), Namespace::NotEnabled);
        // The init container's are the proxy's: a quota asking for a CPU
        // limit asks it of every container.
        assert_eq!(
            p["spec"]["initContainers"][0]["resources"],
            p["spec"]["initContainers"][1]["resources"]
        );
        p["spec"]["initContainers"][1]["resources"].clone()
    };
    assert_eq!(
        resources(json!({})),
        json!({"requests": {"cpu": "10m", "memory": "20Mi"}, "limits": {"memory": "250Mi"}})
    );
    assert_eq!(
        resources(json!({PROXY_CPU_REQUEST: "100m", PROXY_CPU_LIMIT: "1",
                         PROXY_MEMORY_REQUEST: "64Mi", PROXY_MEMORY_LIMIT: "1Gi"})),
        json!({"requests": {"cpu": "100m", "memory": "64Mi"},
               "limits": {"cpu": "1", "memory": "1Gi"}})
    );
    // Equal in other notations is equal.
    assert_eq!(
        resources(json!({PROXY_CPU_REQUEST: "700m", PROXY_CPU_LIMIT: "0.7"}))["limits"]["cpu"],
        "0.7"
    );
    // A limit under the default request brings the request down with it.
    assert_eq!(
        resources(json!({PROXY_MEMORY_LIMIT: "16Mi", PROXY_CPU_LIMIT: "5m"})),
        json!({"requests": {"cpu": "5m", "memory": "16Mi"},
               "limits": {"cpu": "5m", "memory": "16Mi"}})
    );
    // Every form Kubernetes takes, in billionths, exact.
    for (q, want) in [
        ("+1", 1_000_000_000),
        ("1e3", 1_000_000_000_000),
        ("1E3", 1_000_000_000_000),
        ("5e-1", 500_000_000),
        ("500u", 500_000),
        ("100n", 100),
        ("0", 0),
        (".5", 500_000_000),
        ("5.", 5_000_000_000),
        ("1Ki", 1_024_000_000_000),
        ("700m", 700_000_000),
        ("0.7", 700_000_000),
        ("2E", 2_000_000_000_000_000_000_000_000_000),
    ] {
        assert_eq!(quantity(q), Some(want), "{q}");
    }
    for q in ["-1", "1x", "e3", "1e", "1.2.3", "Mi", "", ".", "1e9999"] {
        assert_eq!(quantity(q), None, "{q}");
    }
    // A byte over the limit is over it, however the two are written.
    let over = pod(
        json!({INJECT: "enabled", PROXY_MEMORY_REQUEST: "1073741825", PROXY_MEMORY_LIMIT: "1Gi"}),
        app_spec(),
    );
    assert!(inject(&over, Namespace::NotEnabled, &settings()).is_err());
    // A request above the default limit takes the limit up with it: what
    // the pod gives wins over a default.
    let big = applied(
        pod(
            json!({INJECT: "enabled", PROXY_MEMORY_REQUEST: "1Gi"}),
            app_spec(),
        ),
        Namespace::NotEnabled,
    );
    assert_eq!(
        big["spec"]["initContainers"][1]["resources"],
        json!({"requests": {"cpu": "10m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}})
    );
    for (name, value, why) in [
        (PROXY_CPU_REQUEST, "lots", "quantity"),
        (PROXY_MEMORY_LIMIT, "-1Mi", "quantity"),
    ] {
        let p = pod(json!({INJECT: "enabled", name: value}), app_spec());
        let e = inject(&p, Namespace::NotEnabled, &settings()).unwrap_err();
        assert!(
            e.to_string().contains(name) && e.to_string().contains(why),
            "{e}"
        );
    }
}

/// Manifests kept as `strait inject` wrote them are injected again with the
/// settings of now (a rotated anchor bundle, a new proxy image), as the webhook
/// injects new pods; with the same settings they are left as written.
#[test]
fn injected_manifests_take_new_settings_and_are_otherwise_left_alone() {
    let input = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: db, namespace: shop}
spec:
  template:
    spec:
      containers:
        - name: db
          image: postgres
          livenessProbe: {tcpSocket: {port: 5432}, timeoutSeconds: 3}
      volumes:
        - name: config
          configMap: {name: db, defaultMode: 0644}
";
    let (once, reports) = inject_stream(input, &settings()).unwrap();
    assert_eq!(reports[0].result, Ok("injected"));

    // Nothing changed: the document as it was, byte for byte.
    let (again, reports) = inject_stream(&once, &settings()).unwrap();
    assert_eq!(reports[0].result, Ok("already injected"));
    assert_eq!(again, once);

    // Read back from the cluster, with what the API server fills in and its
    // way of writing quantities: still the same injection.
    let mut read_back: Value = serde_norway::from_str(&once).unwrap();
    let spec = &mut read_back["spec"]["template"]["spec"];
    for c in spec["initContainers"].as_array_mut().unwrap() {
        c["imagePullPolicy"] = json!("IfNotPresent");
        c["terminationMessagePath"] = json!("/dev/termination-log");
        if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
            for p in ports {
                p["protocol"] = json!("TCP");
            }
        }
        if c["name"] == "strait-proxy" {
            c["readinessProbe"]["timeoutSeconds"] = json!(1);
            c["readinessProbe"]["successThreshold"] = json!(1);
            c["readinessProbe"]["httpGet"]["scheme"] = json!("HTTP");
        }
    }
    spec["volumes"][1]["projected"]["defaultMode"] = json!(420);
    let read_back = super::yaml::to_yaml(&read_back);
    let (again, reports) = inject_stream(&read_back, &settings()).unwrap();
    assert_eq!(reports[0].result, Ok("already injected"));
    assert_eq!(again, read_back);

    // A rotation's bundle and a new image: both taken, nothing added twice.
    let bundle = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n";
    let rotated = Settings {
        proxy_image: "registry.example/strait-proxy:next".into(),
        ..Settings::with_anchors(bundle.into())
    };
    let (out, reports) = inject_stream(&once, &rotated).unwrap();
    assert_eq!(
        reports[0].result,
        Ok("injected again: its proxy had other settings")
    );
    let v: Value = serde_norway::from_str(&out).unwrap();
    let pod = &v["spec"]["template"]["spec"];
    assert_eq!(
        init_names(&v["spec"]["template"]),
        ["strait-init", "strait-proxy"]
    );
    let proxy = &pod["initContainers"][1];
    assert_eq!(proxy["image"], "registry.example/strait-proxy:next");
    assert_eq!(
        env(proxy, "STRAIT_PROXY_TRUST_ANCHORS_PEM").unwrap()["value"],
        bundle
    );
    let volumes: Vec<&str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(volumes, ["config", "strait-token", "strait-xtables"]);
    assert_eq!(pod["volumes"][0]["configMap"]["defaultMode"], 420);
    // The probe rewritten once, its port still given to the proxy.
    assert_eq!(
        pod["containers"][0]["livenessProbe"]["httpGet"]["path"],
        "/probe/tcp/5432?timeout=3s"
    );
    assert_eq!(
        env(proxy, "STRAIT_PROXY_TCP_PROBE_PORTS").unwrap()["value"],
        "5432"
    );
    // And the result is itself left alone with those settings.
    let (twice, reports) = inject_stream(&out, &rotated).unwrap();
    assert_eq!(reports[0].result, Ok("already injected"));
    assert_eq!(twice, out);
}

/// The mesh's defaults for the proxy's resources (a namespace's LimitRange
/// asks every container for more, or for a CPU limit) apply where a pod sets
/// none; a pod's annotations still win.
#[test]
fn the_mesh_s_proxy_resources_apply_where_a_pod_sets_none() {
    let mut s = settings();
    s.proxy_resources = ProxyResources {
        proxy_cpu_request: Some("50m".into()),
        proxy_cpu_limit: Some("1".into()),
        proxy_memory_request: None,
        proxy_memory_limit: Some("1Gi".into()),
    };
    let injected = |annotations: Value| {
        let mut p = pod(annotations, app_spec());
        let Outcome::Inject(patch) = inject(&p, Namespace::Enabled, &s).unwrap() else {
            panic!("skipped")
        };
        json_patch::patch(&mut p, &patch).unwrap();
        p
    };
    let p = injected(json!({}));
    for c in &p["spec"]["initContainers"].as_array().unwrap()[..2] {
        assert_eq!(
            c["resources"],
            json!({"requests": {"cpu": "50m", "memory": "20Mi"},
                   "limits": {"cpu": "1", "memory": "1Gi"}}),
            "{}",
            c["name"]
        );
    }
    let p = injected(
        json!({"strait.dev/proxy-cpu-limit": "20m", "strait.dev/proxy-memory-request": "32Mi"}),
    );
    assert_eq!(
        p["spec"]["initContainers"][1]["resources"],
        json!({"requests": {"cpu": "20m", "memory": "32Mi"},
               "limits": {"cpu": "20m", "memory": "1Gi"}}),
        "the pod's own limit, the mesh's request brought down to it"
    );
    // A mesh whose request is above its limit would refuse every pod.
    let bad = ProxyResources {
        proxy_memory_request: Some("2Gi".into()),
        proxy_memory_limit: Some("1Gi".into()),
        ..ProxyResources::default()
    };
    assert!(
        bad.check()
            .unwrap_err()
            .contains("--proxy-memory-request 2Gi is above")
    );
    assert!(a_quantity("lots").is_err());
    // Nor above the built-in memory limit.
    let over_default = ProxyResources {
        proxy_memory_request: Some("300Mi".into()),
        ..ProxyResources::default()
    };
    assert!(over_default.check().is_err());
    // A pod asking for more than the mesh's limit takes the limit up with
    // it (the pod wins over a default), and its proxy gets a thread per
    // core of the limit, whoever set it.
    let p = injected(json!({"strait.dev/proxy-cpu-request": "2"}));
    let proxy = &p["spec"]["initContainers"][1];
    assert_eq!(proxy["resources"]["limits"]["cpu"], "2");
    assert_eq!(env(proxy, "STRAIT_PROXY_THREADS").unwrap()["value"], "2");
    let p = injected(json!({}));
    assert!(
        env(&p["spec"]["initContainers"][1], "STRAIT_PROXY_THREADS").is_none(),
        "one core: one thread"
    );
}

/// EKS Fargate refuses a container that adds NET_ADMIN: its pods (its own
/// webhook names their scheduler) are left unmeshed, with why, rather than
/// admitted to stay Pending.
#[test]
fn a_fargate_pod_is_left_alone_with_why() {
    let mut spec = app_spec();
    spec["schedulerName"] = json!("fargate-scheduler");
    let p = pod(json!({INJECT: "enabled"}), spec);
    let Outcome::Skip(why) = inject(&p, Namespace::Enabled, &settings()).unwrap() else {
        panic!("injected");
    };
    assert!(
        why.contains("Fargate") && why.contains("NET_ADMIN"),
        "{why}"
    );
}

/// A required node affinity with one term per entry, each asking for
/// `kubernetes.io/os` in the values given.
fn os_affinity(terms: &[&[&str]]) -> Value {
    let terms: Vec<Value> = terms
        .iter()
        .map(|values| json!({"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": values}]}))
        .collect();
    json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}})
}

/// A review of a great many small values (any pod may send one) is refused
/// unread: 4 MiB of `[0,0,…]` is two million values, 64 MiB once read.
/// A pod with thousands of containers' worth of fields is read as before.
#[test]
fn a_review_of_too_many_values_is_refused_unread() {
    let mut big = pod(json!({"strait.dev/inject": "enabled"}), app_spec());
    big["spec"]["x"] = json!(vec![0u8; 600_000]);
    let (status, rsp) = webhook(&big, Namespace::Enabled, FailurePolicy::Fail);
    assert_eq!(status, 400);
    let msg = rsp["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("more than 500000 values"), "{rsp}");

    let env: Vec<Value> = (0..20_000)
        .map(|i| json!({"name": format!("V{i}"), "value": "x, y: \"z\""}))
        .collect();
    let spec = json!({"containers": [{"name": "app", "image": "app:1", "env": env}]});
    let (status, rsp) = webhook(
        &pod(json!({"strait.dev/inject": "enabled"}), spec),
        Namespace::Enabled,
        FailurePolicy::Fail,
    );
    assert_eq!((status, &rsp["response"]["allowed"]), (200, &json!(true)));
    assert!(rsp["response"]["patch"].is_array(), "injected");
}
