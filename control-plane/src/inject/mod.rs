//! Adding the sidecar to a pod: one pure function, pod in and JSON patch out,
//! shared by the admission webhook and `strait inject`.
//!
//! The proxy goes in as a native sidecar (an init container with
//! `restartPolicy: Always` and a startup probe on `/ready`), so the app's
//! containers, and any init container of the app's, start only once the proxy
//! holds its certificate, and a Job's pod still completes. Before it runs
//! `strait-proxy init`, which writes the pod's interception rules.

mod budget;
pub mod cert_files;
mod places;
pub mod validate;
pub mod webhook;
pub mod workloads;
mod yaml;

use serde_json::{Value, json};

use crate::defaults;

/// The annotation (on a pod) or label (on a namespace) that asks for injection.
pub const INJECT: &str = "strait.dev/inject";
pub const OPAQUE_PORTS: &str = "strait.dev/opaque-ports";
pub const SKIP_INBOUND_PORTS: &str = "strait.dev/skip-inbound-ports";
pub const SKIP_OUTBOUND_PORTS: &str = "strait.dev/skip-outbound-ports";
/// Destination networks (IPv4 CIDRs) the app reaches directly.
pub const SKIP_OUTBOUND_CIDRS: &str = "strait.dev/skip-outbound-cidrs";
/// At most this many networks in `SKIP_OUTBOUND_CIDRS`: each is a rule.
const MAX_SKIP_CIDRS: usize = 64;
/// Networks whose addresses the proxy asks discovery about
/// (`--discovery-networks`, every address by default): narrowed to the
/// cluster's pod, Service and node ranges, anything else passes through at
/// once.
pub const DISCOVERY_NETWORKS: &str = "strait.dev/discovery-networks";
pub const PROXY_LOG_LEVEL: &str = "strait.dev/proxy-log-level";
/// The proxy's TCP connect timeout to upstreams (`--connect-timeout`): an app
/// calling far-away or slow-accepting servers (the internet, across regions)
/// needs more than the 1 s default, which one lost SYN uses up.
pub const PROXY_CONNECT_TIMEOUT: &str = "strait.dev/proxy-connect-timeout";
/// How long a quiet opaque stream (`--tcp-idle-timeout`, 1 h) and an idle
/// HTTP connection (`--http-idle-timeout`, 120 s) are kept: a database's
/// `LISTEN` waiter or a subscriber quiet for hours, or a load balancer that
/// keeps idle connections to the pod longer than 120 s (Google's: 600 s),
/// needs more.
pub const PROXY_TCP_IDLE_TIMEOUT: &str = "strait.dev/proxy-tcp-idle-timeout";
pub const PROXY_HTTP_IDLE_TIMEOUT: &str = "strait.dev/proxy-http-idle-timeout";
/// Istio's label for whether its ambient mesh takes a pod (`ambient`), or
/// not (`none`, which a namespace's label does not override).
pub const AMBIENT_MODE: &str = "istio.io/dataplane-mode";
/// How long a request body may go without a byte, and a write to a client
/// without progress (`--http-body-read-timeout`, 30 s): an app that reads a
/// download in pauses longer than that (a batch written per chunk), streams
/// an upload with gaps, or serves downloads edge clients pause, needs more.
pub const PROXY_HTTP_BODY_READ_TIMEOUT: &str = "strait.dev/proxy-http-body-read-timeout";
/// The proxy's connection limits (`--max-connections`,
/// `--inbound-max-connections-per-source`): a pod that edge clients reach in
/// plaintext (an ingress controller behind a load balancer or a node's
/// address) holds many connections from a few addresses.
pub const PROXY_MAX_CONNECTIONS: &str = "strait.dev/proxy-max-connections";
pub const PROXY_INBOUND_MAX_CONNECTIONS_PER_SOURCE: &str =
    "strait.dev/proxy-inbound-max-connections-per-source";
/// The proxy's worker threads (`--threads`, 1 by default): a busy gateway or
/// ingress pod whose proxy has more than a core. Not given, a CPU limit over
/// one core gives as many threads as it has cores, rounded up (as Linkerd
/// and Istio derive theirs).
pub const PROXY_THREADS: &str = "strait.dev/proxy-threads";
/// Destinations the proxy watches at once (`--max-discovery-watches`): an
/// ingress controller that dials each of thousands of pods in turn.
pub const PROXY_MAX_DISCOVERY_WATCHES: &str = "strait.dev/proxy-max-discovery-watches";
/// The proxy's `--threads` at most.
const MAX_THREADS: u16 = 64;
/// The highest connection limit an annotation may set: each connection may
/// take two open files, and the kernel's default ceiling is 2^20.
const MAX_CONNECTION_LIMIT: usize = 500_000;
/// The proxy's resources, as Kubernetes quantities (`100m`, `64Mi`).
pub const PROXY_CPU_REQUEST: &str = "strait.dev/proxy-cpu-request";
pub const PROXY_CPU_LIMIT: &str = "strait.dev/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST: &str = "strait.dev/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT: &str = "strait.dev/proxy-memory-limit";
pub const PROXY_IMAGE: &str = "strait.dev/proxy-image";
/// Where the proxy exports spans (`none`: nowhere), the share of new traces
/// it records, its access log (`off`: none): the mesh's defaults, per pod.
pub const PROXY_OTLP_ENDPOINT: &str = "strait.dev/proxy-otlp-endpoint";
pub const PROXY_TRACE_SAMPLING: &str = "strait.dev/proxy-trace-sampling";
pub const PROXY_ACCESS_LOG: &str = "strait.dev/proxy-access-log";
/// `service.name` of the proxy's spans; else the pod's
/// `app.kubernetes.io/name` or `app` label, else its service account.
pub const SERVICE_NAME: &str = "strait.dev/service-name";

/// The containers and volumes injection adds, by name: a pod that has the
/// proxy container is already injected.
pub const PROXY_CONTAINER: &str = "strait-proxy";
/// Why a pod with strait's proxy is not injected (again).
pub const ALREADY_INJECTED: &str = "already injected";
pub const INIT_CONTAINER: &str = "strait-init";
pub(super) const TOKEN_VOLUME: &str = "strait-token";
pub(super) const XTABLES_VOLUME: &str = "strait-xtables";
/// The volumes injection adds.
pub(super) const VOLUMES: [&str; 2] = [TOKEN_VOLUME, XTABLES_VOLUME];
const TOKEN_DIR: &str = "/var/run/strait/token";

/// What every injected proxy is told: where the control plane is and what to trust.
#[derive(Clone, Debug)]
pub struct Settings {
    pub proxy_image: String,
    pub control_plane: String,
    /// The controller's identity, when not the proxies' default
    /// (`ns/strait-system/sa/strait-controller`).
    pub control_plane_identity: Option<String>,
    pub trust_domain: String,
    /// The trust anchors (PEM), given to each proxy in its environment: a
    /// ConfigMap would have to exist in every meshed namespace.
    pub trust_anchors_pem: String,
    pub token_audience: String,
    /// The iptables backend the init container writes with.
    pub iptables_mode: IptablesMode,
    /// What every proxy exports and logs, unless its pod says otherwise.
    pub telemetry: Telemetry,
    /// Where the controller runs: never meshed, nor are the system's own
    /// namespaces (`strait inject`; the webhooks never see them).
    pub mesh_namespace: String,
    /// The proxy's resources where a pod does not set its own.
    pub proxy_resources: ProxyResources,
}

/// The mesh's defaults for every proxy's resources (`--proxy-cpu-request`
/// and the like): a namespace's LimitRange or ResourceQuota may ask each
/// container for more than the built-in ones, or for a CPU limit, and
/// setting them on every pod of every team is what a mesh-wide value saves.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct ProxyResources {
    /// Injected proxies' CPU request, where a pod's
    /// `strait.dev/proxy-cpu-request` does not say [default: 10m].
    #[arg(long, value_name = "QUANTITY", value_parser = a_quantity)]
    pub proxy_cpu_request: Option<String>,
    /// Injected proxies' CPU limit [default: none].
    #[arg(long, value_name = "QUANTITY", value_parser = a_quantity)]
    pub proxy_cpu_limit: Option<String>,
    /// Injected proxies' memory request [default: 20Mi].
    #[arg(long, value_name = "QUANTITY", value_parser = a_quantity)]
    pub proxy_memory_request: Option<String>,
    /// Injected proxies' memory limit [default: 250Mi].
    #[arg(long, value_name = "QUANTITY", value_parser = a_quantity)]
    pub proxy_memory_limit: Option<String>,
}

impl ProxyResources {
    /// `(flag, value)` of each one set, in the controller's argument order.
    pub fn flags(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("--proxy-cpu-request", &self.proxy_cpu_request),
            ("--proxy-cpu-limit", &self.proxy_cpu_limit),
            ("--proxy-memory-request", &self.proxy_memory_request),
            ("--proxy-memory-limit", &self.proxy_memory_limit),
        ]
        .into_iter()
        .filter_map(|(f, v)| Some((f, v.as_deref()?)))
    }

    /// As given, each not given taken from `installed`.
    pub fn or(self, installed: ProxyResources) -> ProxyResources {
        ProxyResources {
            proxy_cpu_request: self.proxy_cpu_request.or(installed.proxy_cpu_request),
            proxy_cpu_limit: self.proxy_cpu_limit.or(installed.proxy_cpu_limit),
            proxy_memory_request: self.proxy_memory_request.or(installed.proxy_memory_request),
            proxy_memory_limit: self.proxy_memory_limit.or(installed.proxy_memory_limit),
        }
    }

    /// Refused where a request is above its limit (given, or the built-in
    /// memory limit): every pod would be.
    pub fn check(&self) -> Result<(), String> {
        for (req, limit, what) in [
            (
                &self.proxy_cpu_request,
                self.proxy_cpu_limit.as_deref(),
                "cpu",
            ),
            (
                &self.proxy_memory_request,
                Some(
                    self.proxy_memory_limit
                        .as_deref()
                        .unwrap_or(DEFAULT_MEMORY_LIMIT),
                ),
                "memory",
            ),
        ] {
            if let (Some(r), Some(l)) = (req, limit)
                && quantity(r) > quantity(l)
            {
                return Err(format!(
                    "--proxy-{what}-request {r} is above the proxy's {what} limit {l} (--proxy-{what}-limit)"
                ));
            }
        }
        Ok(())
    }
}

/// The proxy's memory limit where neither the mesh nor the pod sets one.
const DEFAULT_MEMORY_LIMIT: &str = "250Mi";

/// A Kubernetes quantity, as a flag's value.
pub fn a_quantity(v: &str) -> Result<String, String> {
    quantity(v)
        .map(|_| v.to_string())
        .ok_or_else(|| format!("{v:?} is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)"))
}

/// Traces and access logs of injected proxies, for the whole mesh: flags of
/// the controller (and of `strait inject`), which pods' annotations override.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    pub proxy_otlp_endpoint: Option<String>,
    pub proxy_trace_sampling: Option<String>,
    pub proxy_access_log: Option<AccessLog>,
}

/// `strait inject`'s telemetry flags: the controller's, without their
/// environment variables, which are the proxy's own names (a shell set up to
/// run a proxy by hand would otherwise write its settings into manifests).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TelemetryArgs {
    /// The OpenTelemetry collector (plaintext OTLP/gRPC,
    /// `http://collector:4317`) every injected proxy exports spans to, or
    /// `none` [default: the installed one]; a pod's
    /// `strait.dev/proxy-otlp-endpoint` overrides it.
    #[arg(long, value_name = "URL", value_parser = otlp_endpoint_or_none)]
    pub proxy_otlp_endpoint: Option<String>,
    /// Share of new traces injected proxies record (0.0 to 1.0; callers'
    /// sampled traces are always followed) [default: the installed one, or
    /// the proxy's 1.0].
    #[arg(long, value_name = "RATIO", value_parser = sampling_ratio)]
    pub proxy_trace_sampling: Option<String>,
    /// Injected proxies' access log on their stdout, or `off` [default: the
    /// installed one].
    #[arg(long, value_enum)]
    pub proxy_access_log: Option<AccessLogArg>,
}

impl TelemetryArgs {
    /// As given, and what is not given as `installed` has it: `none` and
    /// `off` leave the installed endpoint and access log out.
    pub fn over(&self, installed: Telemetry) -> Telemetry {
        Telemetry {
            proxy_otlp_endpoint: match self.proxy_otlp_endpoint.as_deref() {
                Some(NO_ENDPOINT) => None,
                Some(e) => Some(e.to_string()),
                None => installed.proxy_otlp_endpoint,
            },
            proxy_trace_sampling: (self.proxy_trace_sampling.clone())
                .or(installed.proxy_trace_sampling),
            proxy_access_log: match self.proxy_access_log {
                Some(AccessLogArg::Text) => Some(AccessLog::Text),
                Some(AccessLogArg::Json) => Some(AccessLog::Json),
                Some(AccessLogArg::Off) => None,
                None => installed.proxy_access_log,
            },
        }
    }
}

const NO_ENDPOINT: &str = "none";

fn otlp_endpoint_or_none(v: &str) -> Result<String, String> {
    if v == NO_ENDPOINT {
        return Ok(v.to_string());
    }
    otlp_endpoint(v)
}

/// `strait inject --proxy-access-log`: a format, or none even where the
/// install has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLogArg {
    Text,
    Json,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLog {
    Text,
    Json,
}

impl AccessLog {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLog::Text => "text",
            AccessLog::Json => "json",
        }
    }
}

/// `http://HOST:PORT`, as the proxy takes it.
pub fn otlp_endpoint(v: &str) -> Result<String, String> {
    match strait_otel::export::endpoint_problem(v) {
        None => Ok(v.to_string()),
        Some(why) => Err(format!("{v:?}: {why}")),
    }
}

/// A ratio from 0.0 to 1.0, kept as written.
pub fn sampling_ratio(v: &str) -> Result<String, String> {
    match v.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(v.trim().to_string()),
        _ => Err(format!("{v:?} is not a ratio from 0.0 to 1.0")),
    }
}

/// A `service.name`: printable, at most 253 bytes (a Kubernetes name's length).
fn valid_service_name(v: &str) -> bool {
    !v.is_empty() && v.len() <= 253 && !v.chars().any(char::is_control)
}

/// Which iptables backend writes a pod's rules: the one the nodes' kube-proxy
/// uses. nft on current distributions; legacy on older nodes, where nft rules
/// would not load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IptablesMode {
    #[default]
    Nft,
    Legacy,
}

impl IptablesMode {
    pub fn as_str(self) -> &'static str {
        match self {
            IptablesMode::Nft => "nft",
            IptablesMode::Legacy => "legacy",
        }
    }
}

/// The trust anchors from `path` (named by `flag` in the error): a readable
/// file with at least one PEM certificate.
pub fn read_anchors(flag: &str, path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .ok()
        .filter(|pem| pem.contains("-----BEGIN CERTIFICATE-----"))
        .ok_or_else(|| {
            format!(
                "{flag} {}: not a readable PEM certificate bundle",
                path.display()
            )
        })
}

/// A duration humantime reads, from `min` to `max`.
fn valid_duration(
    v: &str,
    min: std::time::Duration,
    max: std::time::Duration,
) -> Option<std::time::Duration> {
    humantime::parse_duration(v.trim())
        .ok()
        .filter(|d| (min..=max).contains(d))
}

impl Settings {
    /// The installed defaults with these anchors, trust domain and (if given)
    /// proxy image.
    pub fn new(trust_anchors_pem: String, trust_domain: &str, proxy_image: Option<&str>) -> Self {
        let mut s = Settings::with_anchors(trust_anchors_pem);
        s.trust_domain = trust_domain.to_string();
        if let Some(i) = proxy_image {
            s.proxy_image = i.to_string();
        }
        s
    }

    /// What to say when the mesh's proxy image is of an earlier release.
    pub fn earlier_proxy(&self) -> Option<String> {
        earlier_release(&self.proxy_image).then(|| {
            format!(
                "the proxy image {} is of a release before {}, whose proxy does not answer the probes this injector rewrites nor listen on IPv6 loopback: probes are left as written and apps' IPv6 connections unmeshed, as for a pod that names its own image; give this release's proxy image to have them",
                self.proxy_image,
                SERVES_WHAT_IS_WRITTEN_SINCE.map(|n| n.to_string()).join(".")
            )
        })
    }

    /// Proxies reach the controller by its Service, named for its service
    /// account, in its namespace, and check that it presents that account's
    /// identity (said outright only where it is not the installed default's,
    /// which the proxy assumes).
    pub fn controller_at(&mut self, namespace: &str, service_account: &str, grpc_port: u16) {
        self.mesh_namespace = namespace.to_string();
        self.control_plane = format!("https://{service_account}.{namespace}.svc:{grpc_port}");
        self.control_plane_identity = (namespace != defaults::CONTROLLER_NAMESPACE
            || service_account != defaults::CONTROLLER_SERVICE_ACCOUNT)
            .then(|| {
                format!(
                    "spiffe://{}/ns/{namespace}/sa/{service_account}",
                    self.trust_domain
                )
            });
    }

    /// The defaults of a cluster installed by `strait install`, with these anchors.
    pub fn with_anchors(trust_anchors_pem: String) -> Self {
        Settings {
            proxy_image: defaults::proxy_image(),
            control_plane: defaults::CONTROL_PLANE_URL.to_string(),
            control_plane_identity: None,
            trust_domain: defaults::TRUST_DOMAIN.to_string(),
            trust_anchors_pem,
            token_audience: defaults::TOKEN_AUDIENCE.to_string(),
            iptables_mode: IptablesMode::default(),
            telemetry: Telemetry::default(),
            mesh_namespace: defaults::CONTROLLER_NAMESPACE.to_string(),
            proxy_resources: ProxyResources::default(),
        }
    }
}

/// Whether the pod's namespace asks for injection (its `strait.dev/inject`
/// label is `enabled`); `strait inject` asks for every pod it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Namespace {
    Enabled,
    NotEnabled,
}

/// What injection did with a pod.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The patch that adds the sidecar.
    Inject(json_patch::Patch),
    /// Left as it is, and why.
    Skip(&'static str),
}

/// A pod that asks for injection and cannot have it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("annotation {name}: {value:?} is not a list of ports (e.g. 25,8000-8100)")]
    Ports { name: &'static str, value: String },
    #[error("annotation {name}: {value:?} {why}")]
    Annotation {
        name: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("the pod is malformed: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Conflict(String),
}

/// Containers of other meshes' injection: two sidecars would each redirect the
/// pod's traffic, and Linkerd's proxy takes strait's very ports and user id.
pub(crate) const OTHER_MESHES: [&str; 9] = [
    "istio-proxy",
    "istio-init",
    "istio-validation",
    "linkerd-proxy",
    "linkerd-init",
    "kuma-sidecar",
    "kuma-init",
    "consul-dataplane",
    "consul-connect-inject-init",
];

/// Whether a pod is for Windows nodes: by its `os.name`, or, as older
/// manifests say it, a node selector or a required node affinity whose every
/// term asks for Windows (the webhook's `not-windows` condition reads the same).
fn runs_on_windows(pod: &Value) -> bool {
    const OS: &str = "kubernetes.io/os";
    let windows_term = |t: &Value| {
        t["matchExpressions"].as_array().is_some_and(|es| {
            es.iter().any(|e| {
                e["key"] == OS
                    && e["operator"] == "In"
                    && e["values"]
                        .as_array()
                        .is_some_and(|v| !v.iter().any(|v| v == "linux"))
            })
        })
    };
    let terms = pod
        .pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        .and_then(Value::as_array);
    pod.pointer("/spec/os/name").and_then(Value::as_str) == Some("windows")
        || pod
            .pointer("/spec/nodeSelector/kubernetes.io~1os")
            .and_then(Value::as_str)
            == Some("windows")
        || terms.is_some_and(|ts| !ts.is_empty() && ts.iter().all(windows_term))
}

/// The patch that injects `pod` (a Pod, or a workload's pod template: both
/// have `metadata` and `spec`), or why it is left alone.
pub fn inject(pod: &Value, ns: Namespace, s: &Settings) -> Result<Outcome, InjectError> {
    let annotations = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object);
    let annotation = |k: &str| annotations.and_then(|a| a.get(k)).and_then(Value::as_str);
    // The label keeps a pod from the webhooks (their objectSelector); the
    // injector and `strait inject` honour it too.
    let label = pod
        .pointer("/metadata/labels/strait.dev~1inject")
        .and_then(Value::as_str);
    if label == Some("disabled") {
        return Ok(Outcome::Skip(
            "the pod is labelled strait.dev/inject=disabled",
        ));
    }
    let spec = pod
        .get("spec")
        .and_then(Value::as_object)
        .ok_or(InjectError::Malformed("no spec"))?;
    let named = |list: &str, name: &str| {
        spec.get(list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(name))
        })
    };
    // Injected already (`strait inject`'s output names no `strait.dev/inject`):
    // looked at below for another mesh's sidecar whatever asks.
    let injected = named("initContainers", PROXY_CONTAINER) || named("containers", PROXY_CONTAINER);
    match annotation(INJECT) {
        Some("disabled") => return Ok(Outcome::Skip("the pod's strait.dev/inject is disabled")),
        Some("enabled") => {}
        Some(other) => {
            return Err(InjectError::Annotation {
                name: INJECT,
                value: other.to_string(),
                why: "is neither enabled nor disabled",
            });
        }
        // The label asks as the annotation does (as Istio's pod label does).
        None if ns == Namespace::NotEnabled && label != Some("enabled") && !injected => {
            return Ok(Outcome::Skip(
                "neither the pod nor its namespace asks for it",
            ));
        }
        None => {}
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skip("the pod uses the host's network"));
    }
    // EKS Fargate (its own webhook, called first, names its scheduler)
    // refuses to run a container that adds NET_ADMIN: the pod would stay
    // Pending, never scheduled, with the reason only in its events.
    if spec.get("schedulerName").and_then(Value::as_str) == Some("fargate-scheduler") {
        return Ok(Outcome::Skip(
            "the pod runs on EKS Fargate, which does not allow the init container's NET_ADMIN",
        ));
    }
    // The proxy and its init container are Linux programs: a Windows pod
    // given them would never start.
    if runs_on_windows(pod) {
        return Ok(Outcome::Skip("the pod runs on Windows"));
    }
    // The proxy finds its controller by its Service's name, which the node's
    // resolver does not know: it would never become ready, nor the app start.
    if spec.get("dnsPolicy").and_then(Value::as_str) == Some("Default") {
        return Ok(Outcome::Skip(
            "the pod resolves names with its node's DNS (dnsPolicy: Default), where the controller's Service has no name",
        ));
    }
    // Before "already injected": a manifest injected by `strait inject` that
    // another mesh's injector then gave its sidecar too would run two.
    let other: Vec<&str> = OTHER_MESHES
        .into_iter()
        .filter(|n| named("initContainers", n) || named("containers", n))
        .collect();
    if !other.is_empty() {
        return Err(InjectError::Conflict(format!(
            "the pod already has another mesh's {}: take it out of that mesh first (strait.dev/inject: disabled keeps strait out)",
            other.join(", ")
        )));
    }
    // Istio's ambient mode redirects the pod's traffic in its network
    // namespace, with no container of its own to see: two sets of
    // interception rules would send each other's traffic astray. It enrolls a
    // pod by its `istio.io/dataplane-mode` label (or its namespace's, which
    // `strait-proxy init` finds by the rules) and annotates it only after
    // admission, once its rules are written.
    let ambient_label = pod
        .pointer(&format!(
            "/metadata/labels/{}",
            pointer_escape(AMBIENT_MODE)
        ))
        .and_then(Value::as_str)
        == Some("ambient");
    if ambient_label || annotation("ambient.istio.io/redirection") == Some("enabled") {
        return Err(InjectError::Conflict(
            "the pod is in Istio's ambient mesh (its istio.io/dataplane-mode label, or ambient.istio.io/redirection): take it out of that mesh first (strait.dev/inject: disabled keeps strait out)".into(),
        ));
    }
    if injected {
        return Ok(Outcome::Skip(ALREADY_INJECTED));
    }
    // What an earlier injection left when its proxy was taken out by hand:
    // added again, the names clash (the API server refuses the pod), and an
    // init container alone would redirect the app's traffic to no proxy.
    let volume = |name: &str| {
        spec.get("volumes")
            .and_then(Value::as_array)
            .is_some_and(|vs| {
                vs.iter()
                    .any(|v| v.get("name").and_then(Value::as_str) == Some(name))
            })
    };
    let left: Vec<&str> = [INIT_CONTAINER]
        .into_iter()
        .filter(|n| named("initContainers", n) || named("containers", n))
        .chain(VOLUMES.into_iter().filter(|v| volume(v)))
        .collect();
    if !left.is_empty() {
        return Err(InjectError::Conflict(format!(
            "the pod has {} from an earlier injection but no {PROXY_CONTAINER}: remove them, or the proxy too was meant to stay",
            left.join(", ")
        )));
    }
    if !spec.get("containers").is_some_and(Value::is_array) {
        return Err(InjectError::Malformed("spec.containers is not a list"));
    }
    // The proxy listens on these in the pod's network: an app container
    // declaring one would keep one of them from starting, with no reason
    // given but a crash loop.
    let app_containers = || {
        ["initContainers", "containers"]
            .into_iter()
            .flat_map(|list| {
                spec.get(list)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
            })
    };
    let taken: Vec<String> = app_containers()
        .flat_map(|c| {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
            (c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten())
            // TCP only: the proxy's listeners leave UDP and SCTP free.
            .filter(|p| {
                p.get("protocol")
                    .and_then(Value::as_str)
                    .is_none_or(|p| p == "TCP")
            })
            .filter_map(|p| p.get("containerPort").and_then(Value::as_u64))
            .filter(|p| defaults::MESH_PORTS.iter().any(|m| u64::from(*m) == *p))
            .map(move |p| format!("container {name} port {p}"))
        })
        .collect();
    if !taken.is_empty() {
        let mesh: Vec<String> = defaults::MESH_PORTS.iter().map(u16::to_string).collect();
        return Err(InjectError::Conflict(format!(
            "{} is a port the proxy listens on in the pod ({}): move the app's port, or keep the pod out of the mesh (strait.dev/inject: disabled)",
            taken.join(", "),
            mesh.join(", ")
        )));
    }
    // The proxy's own connections are told apart by its uid and not
    // redirected: an app container running as it would leave the pod past
    // the proxy, with no mTLS or policy, and be refused by every peer that
    // requires mTLS, with nothing said. (An image's own `USER` cannot be seen
    // here.)
    let pod_uid = pod.pointer("/spec/securityContext/runAsUser");
    let as_proxy: Vec<&str> = app_containers()
        .filter(|c| {
            c.pointer("/securityContext/runAsUser")
                .or(pod_uid)
                .and_then(Value::as_u64)
                == Some(u64::from(defaults::PROXY_UID))
        })
        .map(|c| c.get("name").and_then(Value::as_str).unwrap_or("?"))
        .collect();
    if let Some(name) = as_proxy.first() {
        return Err(InjectError::Conflict(format!(
            "container {name} runs as uid {uid}, the proxy's, whose connections are not redirected: its traffic would bypass the proxy (no mTLS, no policy); run it as another uid, or keep the pod out of the mesh (strait.dev/inject: disabled)",
            uid = defaults::PROXY_UID
        )));
    }

    let ports = |name: &'static str| -> Result<Option<String>, InjectError> {
        annotation(name)
            .map(|v| {
                valid_ports(v)
                    .then(|| v.to_string())
                    .ok_or(InjectError::Ports {
                        name,
                        value: v.to_string(),
                    })
            })
            .transpose()
    };
    let opaque = ports(OPAQUE_PORTS)?;
    let skip_in = ports(SKIP_INBOUND_PORTS)?;
    let skip_out = ports(SKIP_OUTBOUND_PORTS)?;
    let skip_cidrs = annotation(SKIP_OUTBOUND_CIDRS)
        // Empty, as a template renders an unset value: nothing skipped, as
        // with the port annotations.
        .filter(|v| v.split(',').any(|c| !c.trim().is_empty()))
        .map(|v| {
            cidrs(v).ok_or(InjectError::Annotation {
                    name: SKIP_OUTBOUND_CIDRS,
                    value: v.to_string(),
                    why: "is not a list of at most 64 IPv4 or IPv6 networks, host bits zero (e.g. 169.254.169.254,10.0.0.0/8,fd00::/8)",
                })
        })
        .transpose()?;
    let discovery_networks = annotation(DISCOVERY_NETWORKS)
        .map(|v| {
            cidrs(v).ok_or(InjectError::Annotation {
                name: DISCOVERY_NETWORKS,
                value: v.to_string(),
                why: "is not a list of at most 64 IPv4 or IPv6 networks, host bits zero (e.g. 10.0.0.0/8,100.64.0.0/10,::/0)",
            })
        })
        .transpose()?;
    let log_level = annotation(PROXY_LOG_LEVEL)
        .map(|v| {
            valid_log_level(v)
                .then(|| v.to_string())
                .ok_or(InjectError::Annotation {
                    name: PROXY_LOG_LEVEL,
                    value: v.to_string(),
                    why: "is not a log filter of at most 512 bytes without field filters (e.g. info, debug, warn,strait_proxy=debug)",
                })
        })
        .transpose()?;
    let mut resources = proxy_resources(&annotation, &s.proxy_resources)?;
    fit_pod_resources(&mut resources, spec, &annotation)?;
    let mut more_env = telemetry_env(pod, &annotation, &s.telemetry)?;
    if let Some(networks) = discovery_networks {
        more_env.push(json!({"name": "STRAIT_PROXY_DISCOVERY_NETWORKS", "value": networks}));
    }
    use std::time::Duration;
    // A connect timeout more than nothing, and not so long that a dead
    // upstream holds its callers for good; idle timeouts of a second at
    // least, and bounded, since what they keep holds memory and a slot.
    for (name, var, min, max, why) in [
        (
            PROXY_CONNECT_TIMEOUT,
            "STRAIT_PROXY_CONNECT_TIMEOUT",
            Duration::from_millis(1),
            Duration::from_secs(600),
            "is not a duration from 1ms to 10m (e.g. 500ms, 5s)",
        ),
        (
            PROXY_TCP_IDLE_TIMEOUT,
            "STRAIT_PROXY_TCP_IDLE_TIMEOUT",
            Duration::from_secs(1),
            Duration::from_secs(30 * 86_400),
            "is not a duration from 1s to 30d (e.g. 4h)",
        ),
        (
            PROXY_HTTP_IDLE_TIMEOUT,
            "STRAIT_PROXY_HTTP_IDLE_TIMEOUT",
            Duration::from_secs(1),
            Duration::from_secs(86_400),
            "is not a duration from 1s to 24h (e.g. 620s)",
        ),
        (
            PROXY_HTTP_BODY_READ_TIMEOUT,
            "STRAIT_PROXY_HTTP_BODY_READ_TIMEOUT",
            Duration::from_secs(1),
            Duration::from_secs(3_600),
            "is not a duration from 1s to 1h (e.g. 5m)",
        ),
    ] {
        if let Some(v) = annotation(name) {
            valid_duration(v, min, max).ok_or(InjectError::Annotation {
                name,
                value: v.to_string(),
                why,
            })?;
            more_env.push(json!({"name": var, "value": v}));
        }
    }
    const CONNECTIONS: (usize, &str) = (
        MAX_CONNECTION_LIMIT,
        "is not a whole number from 1 to 500000",
    );
    // A CPU limit's cores, rounded up (its validity is checked with the
    // resources above).
    let limit_threads = resources
        .pointer("/limits/cpu")
        .and_then(Value::as_str)
        .and_then(quantity)
        .map(|q| q.div_euclid(1_000_000_000) + i128::from(q.rem_euclid(1_000_000_000) != 0))
        .map(|cores| cores.clamp(1, i128::from(MAX_THREADS)))
        .filter(|cores| *cores > 1);
    if annotation(PROXY_THREADS).is_none()
        && let Some(n) = limit_threads
    {
        more_env.push(json!({"name": "STRAIT_PROXY_THREADS", "value": n.to_string()}));
    }
    // Each watch is a stream on the proxy's one connection to the controller,
    // which takes `GRPC_MAX_CONCURRENT_STREAMS` (2,048) at once with the
    // policy watch and certificate requests: one more would wait unanswered.
    const WATCHES: (usize, &str) = (
        defaults::MAX_PROXY_DISCOVERY_WATCHES,
        "is not a whole number from 1 to 2000",
    );
    for (name, var, (max, why)) in [
        (
            PROXY_MAX_CONNECTIONS,
            "STRAIT_PROXY_MAX_CONNECTIONS",
            CONNECTIONS,
        ),
        (
            PROXY_INBOUND_MAX_CONNECTIONS_PER_SOURCE,
            "STRAIT_PROXY_INBOUND_MAX_CONNECTIONS_PER_SOURCE",
            CONNECTIONS,
        ),
        (
            PROXY_MAX_DISCOVERY_WATCHES,
            "STRAIT_PROXY_MAX_DISCOVERY_WATCHES",
            WATCHES,
        ),
        (
            PROXY_THREADS,
            "STRAIT_PROXY_THREADS",
            (
                usize::from(MAX_THREADS),
                "is not a whole number from 1 to 64",
            ),
        ),
    ] {
        if let Some(v) = annotation(name) {
            let n = v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or(InjectError::Annotation {
                    name,
                    value: v.to_string(),
                    why,
                })?;
            more_env.push(json!({"name": var, "value": n.to_string()}));
        }
    }
    let image = match annotation(PROXY_IMAGE) {
        Some(i) if valid_image(i) => i.to_string(),
        Some(i) => {
            return Err(InjectError::Annotation {
                name: PROXY_IMAGE,
                value: i.to_string(),
                why: "is not an image reference",
            });
        }
        None => s.proxy_image.clone(),
    };

    // A proxy of another release, named by the pod or the mesh's of an
    // earlier one, may be too old for what this release writes.
    let older = annotation(PROXY_IMAGE).is_some() || earlier_release(&s.proxy_image);
    // The init container runs as root with NET_ADMIN: its image is always the
    // operator's, never one a pod's author names (the proxy's runs as the
    // proxy's user, with no capability, as any container of theirs could).
    // The init container gets the proxy's resources: a quota or LimitRange
    // that asks the proxy for a CPU limit or a minimum asks it too, and an
    // init container's resources cost the pod nothing beyond its sidecars'.
    let init = init_container(
        s,
        skip_in.as_deref(),
        skip_out.as_deref(),
        skip_cidrs.as_deref(),
        // An older proxy may not listen on IPv6 loopback: its app's IPv6
        // connections are left alone rather than refused.
        !older,
        resources.clone(),
    );
    // An older proxy would not answer a rewritten probe: its probes stay as
    // written.
    let (probe_ops, init_probe_ops, probed) = match older {
        false => tcp_probes(spec),
        // Probes an earlier injection rewrote still need their ports listed.
        true => (Vec::new(), Vec::new(), tcp_probes(spec).2),
    };
    let probed = (!probed.is_empty()).then(|| {
        let ports: Vec<String> = probed.iter().map(u16::to_string).collect();
        ports.join(",")
    });
    // The pod's own ports: inbound only, not the port numbers its app calls
    // elsewhere (its MinIO on 9000 is HTTP whatever its own 9000 is). A
    // proxy of an earlier release knows one list only.
    let opaque = opaque.as_deref().map(|p| match older {
        false => ("STRAIT_PROXY_INBOUND_OPAQUE_PORTS", p),
        true => ("STRAIT_PROXY_OPAQUE_PORTS", p),
    });
    let proxy = proxy_container(
        &image,
        s,
        opaque,
        log_level.as_deref(),
        probed.as_deref(),
        resources,
        more_env,
    );
    let volumes = [
        json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": s.token_audience, "expirationSeconds": 3600, "path": "token"}}]}}),
        // Only iptables' lock file. In memory: the cluster autoscaler will not
        // drain a node for a pod with a disk-backed emptyDir (its default
        // `--skip-nodes-with-local-storage`), and every meshed pod has this one.
        json!({"name": XTABLES_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}),
    ];

    // The app's own init containers' probes first, at their indices before
    // the proxy's containers go in ahead of them.
    let mut ops = init_probe_ops;
    // The init container first, then the proxy, then the app's own init containers.
    if spec.get("initContainers").is_some_and(Value::is_array) {
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": proxy}));
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": init}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [init, proxy]}));
    }
    if spec.get("volumes").is_some_and(Value::is_array) {
        for v in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": v}));
        }
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    }
    ops.extend(probe_ops);
    let inbound_port = defaults::DEFAULT_INBOUND_PORT.to_string();
    if annotations.is_some() {
        ops.push(json!({"op": "add",
            "path": format!("/metadata/annotations/{}", pointer_escape(defaults::INBOUND_PORT_ANNOTATION)),
            "value": inbound_port}));
    } else if pod.get("metadata").is_some_and(Value::is_object) {
        ops.push(json!({"op": "add", "path": "/metadata/annotations",
            "value": {defaults::INBOUND_PORT_ANNOTATION: inbound_port}}));
    } else if pod.get("metadata").is_none_or(Value::is_null) {
        ops.push(json!({"op": "add", "path": "/metadata",
            "value": {"annotations": {defaults::INBOUND_PORT_ANNOTATION: inbound_port}}}));
    } else {
        return Err(InjectError::Malformed("metadata is not an object"));
    }
    // Istio's ambient mesh enrolls running pods once their namespace is
    // labelled for it, writing its rules beside the proxy's: a pod of ours
    // says it is not to be (metadata exists by now).
    if pod
        .pointer("/metadata/labels")
        .is_some_and(Value::is_object)
    {
        ops.push(json!({"op": "add",
            "path": format!("/metadata/labels/{}", pointer_escape(AMBIENT_MODE)),
            "value": "none"}));
    } else {
        ops.push(json!({"op": "add", "path": "/metadata/labels", "value": {AMBIENT_MODE: "none"}}));
    }
    let patch = serde_json::from_value(Value::Array(ops))
        .map_err(|_| InjectError::Malformed("cannot express the patch"))?;
    Ok(Outcome::Inject(patch))
}

/// The proxy's telemetry settings as its environment: the pod's annotations,
/// else the mesh's; and the spans' `service.name`.
fn telemetry_env<'a>(
    pod: &Value,
    annotation: &impl Fn(&str) -> Option<&'a str>,
    mesh: &Telemetry,
) -> Result<Vec<Value>, InjectError> {
    let refused = |name: &'static str, value: &str, why: &'static str| InjectError::Annotation {
        name,
        value: value.to_string(),
        why,
    };
    let mut env = Vec::new();
    let mut set = |name: &str, v: &str| env.push(json!({"name": name, "value": v}));
    let endpoint = match annotation(PROXY_OTLP_ENDPOINT) {
        Some("none") => None,
        Some(v) => Some(otlp_endpoint(v).map_err(|_| {
            refused(
                PROXY_OTLP_ENDPOINT,
                v,
                "is not http://HOST:PORT (the collector's plaintext OTLP/gRPC port) or none",
            )
        })?),
        None => mesh.proxy_otlp_endpoint.clone(),
    };
    let sampling = match annotation(PROXY_TRACE_SAMPLING) {
        Some(v) => Some(
            sampling_ratio(v)
                .map_err(|_| refused(PROXY_TRACE_SAMPLING, v, "is not a ratio from 0.0 to 1.0"))?,
        ),
        None => mesh.proxy_trace_sampling.clone(),
    };
    let access_log = match annotation(PROXY_ACCESS_LOG) {
        Some("off") => None,
        Some("text") => Some(AccessLog::Text),
        Some("json") => Some(AccessLog::Json),
        Some(v) => return Err(refused(PROXY_ACCESS_LOG, v, "is not text, json or off")),
        None => mesh.proxy_access_log,
    };
    let label = |k: &str| {
        pod.pointer(&format!("/metadata/labels/{}", pointer_escape(k)))
            .and_then(Value::as_str)
    };
    let service_name = match annotation(SERVICE_NAME) {
        Some(v) if valid_service_name(v) => Some(v),
        Some(v) => {
            return Err(refused(
                SERVICE_NAME,
                v,
                "is not a name (printable, at most 253 bytes)",
            ));
        }
        // A label that is no name is left out: the service account names the spans.
        None => label("app.kubernetes.io/name")
            .or_else(|| label("app"))
            .filter(|v| valid_service_name(v)),
    };
    if let Some(e) = &endpoint {
        set("STRAIT_PROXY_OTLP_ENDPOINT", e);
        if let Some(r) = &sampling {
            set("STRAIT_PROXY_TRACE_SAMPLING", r);
        }
        if let Some(n) = service_name {
            set("STRAIT_PROXY_SERVICE_NAME", n);
        }
    }
    if let Some(f) = access_log {
        set("STRAIT_PROXY_ACCESS_LOG", f.as_str());
    }
    Ok(env)
}

fn init_container(
    s: &Settings,
    skip_in: Option<&str>,
    skip_out: Option<&str>,
    skip_cidrs: Option<&str>,
    ipv6_outbound: bool,
    resources: Value,
) -> Value {
    let image = &s.proxy_image;
    let mut env = Vec::new();
    if !ipv6_outbound {
        env.push(json!({"name": "STRAIT_PROXY_IPV6_OUTBOUND", "value": "false"}));
    }
    if let Some(p) = skip_in {
        env.push(json!({"name": "STRAIT_PROXY_SKIP_INBOUND_PORTS", "value": p}));
    }
    if let Some(p) = skip_out {
        env.push(json!({"name": "STRAIT_PROXY_SKIP_OUTBOUND_PORTS", "value": p}));
    }
    if let Some(c) = skip_cidrs {
        env.push(json!({"name": "STRAIT_PROXY_SKIP_OUTBOUND_CIDRS", "value": c}));
    }
    if s.iptables_mode != IptablesMode::default() {
        env.push(json!({"name": "STRAIT_PROXY_IPTABLES_MODE", "value": s.iptables_mode.as_str()}));
    }
    json!({
        "name": INIT_CONTAINER,
        "image": image,
        // The ports as flags, not left to the environment: a Service named
        // `strait-proxy-inbound` in the pod's namespace gives every container
        // `STRAIT_PROXY_INBOUND_PORT=tcp://...` (Kubernetes' service links).
        // Its reason (an iptables error) in `kubectl describe`, not only in
        // its log: a Job's pod that fails here is not retried in place.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "args": [
            "init",
            "--proxy-uid", defaults::PROXY_UID.to_string(),
            "--inbound-port", defaults::DEFAULT_INBOUND_PORT.to_string(),
            "--outbound-port", defaults::PROXY_OUTBOUND_PORT.to_string(),
        ],
        "env": env,
        "resources": resources,
        // iptables needs uid 0 with NET_ADMIN and NET_RAW, and nothing else.
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        // iptables takes its lock in /run.
        "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": "/run"}],
    })
}

/// The path of a rewritten probe: the port, and the probe's own timeout
/// (the kubelet's default, 1 s, when it has none), which the proxy waits for
/// the app's answer.
const PROBE_TCP_PATH: &str = "/probe/tcp/";

/// The app's `tcpSocket` probes, pointed at its proxy's `/probe/tcp/PORT`, and
/// the ports they probe. A probe of the port itself would reach the proxy,
/// which accepts whether or not the app listens: a dead app would pass. The
/// rest of each probe (periods, thresholds, timeouts) is kept; a probe of
/// another host, or of a port no container declares by that name, is left
/// as it is. Probes rewritten before (a template injected once, its sidecar
/// since removed) keep their port on the list. The app's containers come
/// first, then its restartable init containers (sidecars), whose ops must run
/// before the proxy's containers are inserted ahead of them.
fn tcp_probes(spec: &serde_json::Map<String, Value>) -> (Vec<Value>, Vec<Value>, Vec<u16>) {
    let (mut containers_ops, mut init_ops, mut ports) = (Vec::new(), Vec::new(), Vec::new());
    for (list, ops) in [
        ("containers", &mut containers_ops),
        ("initContainers", &mut init_ops),
    ] {
        let containers = spec.get(list).and_then(Value::as_array);
        for (i, c) in containers.into_iter().flatten().enumerate() {
            let sidecar = c.get("restartPolicy").and_then(Value::as_str) == Some("Always");
            if list == "initContainers" && !sidecar {
                continue;
            }
            for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let Some(probe) = c.get(kind).and_then(Value::as_object) else {
                    continue;
                };
                if let Some(port) = rewritten_port(probe) {
                    if !ports.contains(&port) {
                        ports.push(port);
                    }
                    continue;
                }
                let Some(tcp) = probe.get("tcpSocket").and_then(Value::as_object) else {
                    continue;
                };
                let elsewhere = tcp
                    .get("host")
                    .and_then(Value::as_str)
                    .is_some_and(|h| !h.is_empty());
                let Some(port) = tcp.get("port").and_then(|p| container_port(c, p)) else {
                    continue;
                };
                if elsewhere {
                    continue;
                }
                // 0 or none is the kubelet's 1 s; the proxy waits 60 s at most.
                let timeout = probe
                    .get("timeoutSeconds")
                    .and_then(Value::as_u64)
                    .filter(|t| *t > 0)
                    .unwrap_or(1)
                    .min(60);
                let mut rewritten = probe.clone();
                rewritten.remove("tcpSocket");
                rewritten.insert(
                    "httpGet".into(),
                    json!({"path": format!("{PROBE_TCP_PATH}{port}?timeout={timeout}s"),
                           "port": defaults::PROXY_ADMIN_PORT}),
                );
                ops.push(
                    json!({"op": "replace", "path": format!("/spec/{list}/{i}/{kind}"),
                    "value": rewritten}),
                );
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
        }
    }
    ports.sort_unstable();
    (containers_ops, init_ops, ports)
}

/// The app port of a probe rewritten by an earlier injection.
fn rewritten_port(probe: &serde_json::Map<String, Value>) -> Option<u16> {
    let get = probe.get("httpGet")?;
    if get.get("port").and_then(Value::as_u64) != Some(u64::from(defaults::PROXY_ADMIN_PORT)) {
        return None;
    }
    let rest = get.get("path")?.as_str()?.strip_prefix(PROBE_TCP_PATH)?;
    let port = rest.split_once('?').map_or(rest, |(p, _)| p);
    port.parse().ok().filter(|p| *p != 0)
}

/// A probe's port: a number, the name of one of the container's ports, or a
/// number written as a string (as the kubelet reads it).
fn container_port(c: &Value, port: &Value) -> Option<u16> {
    let n = match port {
        Value::Number(n) => n.as_u64()?,
        Value::String(name) => match c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        {
            Some(p) => p.get("containerPort").and_then(Value::as_u64)?,
            None => name.parse().ok()?,
        },
        _ => return None,
    };
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn proxy_container(
    image: &str,
    s: &Settings,
    opaque: Option<(&str, &str)>,
    log_level: Option<&str>,
    tcp_probe_ports: Option<&str>,
    resources: Value,
    more_env: Vec<Value>,
) -> Value {
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let value = |name: &str, v: &str| json!({"name": name, "value": v});
    let mut env = vec![
        field("STRAIT_PROXY_NAMESPACE", "metadata.namespace"),
        field("STRAIT_PROXY_POD_NAME", "metadata.name"),
        field("STRAIT_PROXY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        // The inbound side dials the app on the pod's address, not loopback: a
        // port the app binds to 127.0.0.1 only stays private to the pod.
        field("STRAIT_PROXY_APP_IP", "status.podIP"),
        value("STRAIT_PROXY_CONTROL_PLANE", &s.control_plane),
        value("STRAIT_PROXY_TRUST_DOMAIN", &s.trust_domain),
        value("STRAIT_PROXY_TRUST_ANCHORS_PEM", &s.trust_anchors_pem),
        value("STRAIT_PROXY_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
        // The kubelet probes /ready and /live on the pod's address; state changes
        // answer loopback callers only.
        value(
            "STRAIT_PROXY_ADMIN_ADDR",
            &format!("[::]:{}", defaults::PROXY_ADMIN_PORT),
        ),
    ];
    if let Some(id) = &s.control_plane_identity {
        env.push(value("STRAIT_PROXY_CONTROL_PLANE_IDENTITY", id));
    }
    if let Some((var, p)) = opaque {
        env.push(value(var, p));
    }
    if let Some(l) = log_level {
        env.push(value("STRAIT_PROXY_LOG_LEVEL", l));
    }
    if let Some(p) = tcp_probe_ports {
        env.push(value("STRAIT_PROXY_TCP_PROBE_PORTS", p));
    }
    env.extend(more_env);
    let probe = |path: &str, period: u32, failures: u32| {
        json!({"httpGet": {"path": path, "port": defaults::PROXY_ADMIN_PORT},
               "periodSeconds": period, "failureThreshold": failures})
    };
    json!({
        "name": PROXY_CONTAINER,
        "image": image,
        "restartPolicy": "Always",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": env,
        "ports": [
            {"name": "strait-inbound", "containerPort": defaults::DEFAULT_INBOUND_PORT},
            {"name": "strait-admin", "containerPort": defaults::PROXY_ADMIN_PORT},
        ],
        // The app starts once the proxy holds its certificate and configuration.
        // Ten minutes, as Istio's: a restart never brings a certificate sooner
        // (a new key, the same controller), and killing the proxy while the
        // controller or the API server is away (a cold start of the cluster, a
        // node rebooted) adds the kubelet's back-off of up to 5 min after it is back.
        "startupProbe": probe("/ready", 1, 600),
        "readinessProbe": probe("/ready", 10, 3),
        "livenessProbe": probe("/live", 10, 3),
        "resources": resources,
        "securityContext": {
            "runAsUser": defaults::PROXY_UID,
            "runAsGroup": defaults::PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
        ],
    })
}

/// RFC 6901: `~` and `/` inside a key.
fn pointer_escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// "25,587,8000-8100": what the proxy's port-set flags accept.
fn valid_ports(v: &str) -> bool {
    let port = |p: &str| p.trim().parse::<u16>().is_ok_and(|n| n > 0);
    v.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .all(|p| match p.split_once('-') {
            Some((lo, hi)) => {
                port(lo)
                    && port(hi)
                    && lo.trim().parse::<u16>().ok() <= hi.trim().parse::<u16>().ok()
            }
            None => port(p),
        })
}

/// "169.254.169.254, 10.0.0.0/8" as the proxy's network flags take it
/// (comma-separated, no spaces), if it is at most `MAX_SKIP_CIDRS` networks
/// they accept, read by their parser: a network the init or the proxy
/// refused would keep the pod from starting.
fn cidrs(v: &str) -> Option<String> {
    let cidrs: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    (!cidrs.is_empty()
        && cidrs.len() <= MAX_SKIP_CIDRS
        && cidrs
            .iter()
            .all(|c| c.parse::<strait_api::net::IpNet>().is_ok()))
    .then(|| cidrs.join(","))
}

/// A RUST_LOG-style filter: directives of `target=level` or `level`, or
/// spans by name. Not field values (`{field=value}`): each is compiled into
/// an automaton whose size the pattern's author chooses, here by anyone who
/// can create a pod, in the controller that serves every proxy.
fn valid_log_level(v: &str) -> bool {
    v.len() <= MAX_LOG_FILTER_BYTES
        && !v.contains(['{', '}'])
        && crate::log::parse_filter(v).is_ok()
}

/// What a log line keeps of a text a client chose: its first 256 bytes.
pub(crate) fn clipped(s: &str) -> &str {
    let mut end = s.len().min(256);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A proxy's log filter at most: a few dozen directives.
const MAX_LOG_FILTER_BYTES: usize = 512;

/// The proxy's resources: the pod's annotations over the mesh's defaults, or
/// else the built-in ones (requests 10m CPU and 20Mi, a 250Mi memory limit,
/// no CPU limit). A default request
/// above a given limit comes down to it; a given one is refused.
fn proxy_resources<'a>(
    annotation: &impl Fn(&str) -> Option<&'a str>,
    mesh: &'a ProxyResources,
) -> Result<Value, InjectError> {
    let get = |name: &'static str| -> Result<Option<(&'a str, i128)>, InjectError> {
        let Some(v) = annotation(name) else {
            return Ok(None);
        };
        match quantity(v) {
            Some(q) => Ok(Some((v, q))),
            None => Err(InjectError::Annotation {
                name,
                value: v.to_string(),
                why: "is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)",
            }),
        }
    };
    let mut requests = serde_json::Map::new();
    let mut limits = serde_json::Map::new();
    for (kind, req_name, limit_name, default_req, default_limit) in [
        (
            "cpu",
            PROXY_CPU_REQUEST,
            PROXY_CPU_LIMIT,
            mesh.proxy_cpu_request.as_deref().unwrap_or("10m"),
            mesh.proxy_cpu_limit.as_deref(),
        ),
        (
            "memory",
            PROXY_MEMORY_REQUEST,
            PROXY_MEMORY_LIMIT,
            mesh.proxy_memory_request.as_deref().unwrap_or("20Mi"),
            Some(
                mesh.proxy_memory_limit
                    .as_deref()
                    .unwrap_or(DEFAULT_MEMORY_LIMIT),
            ),
        ),
    ] {
        let given_req = get(req_name)?;
        let given_limit = get(limit_name)?;
        let default_limit = default_limit.map(|d| (d, quantity(d).unwrap_or(i128::MAX)));
        // What the pod gives wins over a default: a default request above
        // its limit comes down to it, a default limit below its request goes
        // up to it. Both given, a request above its limit is refused.
        let (req, limit) = match (given_req, given_limit) {
            (Some((r, q)), Some((_, l))) if q > l => {
                return Err(InjectError::Annotation {
                    name: req_name,
                    value: r.to_string(),
                    why: "is above the proxy's limit",
                });
            }
            (Some((r, _)), Some((l, _))) => (r, Some(l)),
            (Some((r, q)), None) => match default_limit {
                Some((_, l)) if q > l => (r, Some(r)),
                d => (r, d.map(|d| d.0)),
            },
            (None, Some((l, lq))) if quantity(default_req).is_some_and(|d| d > lq) => (l, Some(l)),
            (None, l) => (default_req, l.or(default_limit).map(|l| l.0)),
        };
        requests.insert(kind.into(), json!(req));
        if let Some(l) = limit {
            limits.insert(kind.into(), json!(l));
        }
    }
    Ok(json!({"requests": requests, "limits": limits}))
}

/// Fits the proxy's resources (and so its init container's) within the
/// pod's own (`spec.resources`, pod-level resources: beta and on by default
/// since Kubernetes 1.34). The API server holds the containers' requests
/// together (as it adds them up: sidecars with the containers, a one-off
/// init container with the sidecars started before it, the proxy among
/// them) to the pod's request, or its limit where it gives none. A default
/// request comes down to what the app's containers leave (nothing, at
/// worst: the proxy then shares the pod's budget), and one an annotation
/// gives that does not fit is refused, rather than the pod by the API
/// server. A limit, given or not, comes down to the pod's: the proxy could
/// not use more, and sizes its memory shedding and connections to its own.
fn fit_pod_resources<'a>(
    resources: &mut Value,
    spec: &serde_json::Map<String, Value>,
    annotation: &impl Fn(&str) -> Option<&'a str>,
) -> Result<(), InjectError> {
    let Some(pod) = spec.get("resources").filter(|r| r.is_object()) else {
        return Ok(());
    };
    let amount = |v: Option<&Value>| match v? {
        Value::String(q) => quantity(q),
        Value::Number(n) => quantity(&n.to_string()),
        _ => None,
    };
    // What the app's containers need of the pod's request, the proxy left
    // out (and strait's own, from an earlier injection).
    let needed = |kind: &str| -> i128 {
        let app = |c: &&Value| {
            !matches!(
                c.get("name").and_then(Value::as_str),
                Some(PROXY_CONTAINER | INIT_CONTAINER)
            )
        };
        // A request not given is its limit (the API server defaults it so).
        let request = |c: &Value| {
            amount(c.pointer(&format!("/resources/requests/{kind}")))
                .or_else(|| amount(c.pointer(&format!("/resources/limits/{kind}"))))
                .unwrap_or(0)
        };
        let list = |name: &str| {
            spec.get(name)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        };
        let (mut sidecars, mut init_peak) = (0, 0);
        for c in list("initContainers").filter(app) {
            match c.get("restartPolicy").and_then(Value::as_str) {
                Some("Always") => sidecars += request(c),
                _ => init_peak = init_peak.max(sidecars + request(c)),
            }
        }
        let running: i128 = list("containers").filter(app).map(request).sum();
        (running + sidecars).max(init_peak)
    };
    for (kind, req_name, unit) in [
        ("cpu", PROXY_CPU_REQUEST, 1_000_000),
        ("memory", PROXY_MEMORY_REQUEST, 1_000_000_000),
    ] {
        let pod_limit = amount(pod.pointer(&format!("/limits/{kind}")));
        let pod_request = amount(pod.pointer(&format!("/requests/{kind}"))).or(pod_limit);
        // Millicores, bytes: rounded down, so as not to pass it.
        let written = |n: i128| {
            let n = n / unit;
            json!(if kind == "cpu" {
                format!("{n}m")
            } else {
                n.to_string()
            })
        };
        if let Some(max) = pod_limit
            && let Some(l) = resources.pointer_mut(&format!("/limits/{kind}"))
            && amount(Some(l)).is_some_and(|l| l > max)
        {
            *l = written(max);
        }
        if let Some(budget) = pod_request
            && let Some(r) = resources.pointer_mut(&format!("/requests/{kind}"))
        {
            let left = (budget - needed(kind)).max(0);
            if amount(Some(r)).is_some_and(|r| r > left) {
                if let Some(v) = annotation(req_name) {
                    return Err(InjectError::Annotation {
                        name: req_name,
                        value: v.to_string(),
                        why: "does not fit the pod's own spec.resources: the containers' requests together, this one's among them, may not pass the pod's",
                    });
                }
                *r = written(left);
            }
        }
    }
    Ok(())
}

/// The requests and limits a pod without `strait.dev/proxy-*` annotations
/// gives its proxy (and init container) under the mesh's defaults, by
/// resource: each as written, and its value (`quantity`).
pub(crate) fn default_proxy_resources(
    mesh: &ProxyResources,
) -> [std::collections::BTreeMap<String, (String, i128)>; 2] {
    let made = proxy_resources(&|_| None, mesh).unwrap_or_default();
    ["requests", "limits"].map(|which| {
        made[which]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| {
                let v = v.as_str()?;
                Some((k.clone(), (v.to_string(), quantity(v)?)))
            })
            .collect()
    })
}

/// A Kubernetes quantity's value in billionths (`100m` is 100,000,000,
/// `64Mi` 64 × 2^20 × 10^9), exact, for checking and comparing as the API
/// server does: a decimal number, optionally signed `+`, with a binary
/// (`Ki`…`Ei`) or decimal (`n`…`E`) suffix or a decimal exponent (`1e3`).
/// Negative values are refused (no resource is), and so are values too
/// large to hold.
pub(crate) fn quantity(v: &str) -> Option<i128> {
    if v.is_empty() || v.len() > 32 {
        return None;
    }
    let v = v.strip_prefix('+').unwrap_or(v);
    // Billionths per unit: 10^(9 + exponent), or 2^(10k) × 10^9.
    let decimal = |e: i32| -> Option<(i128, i128)> {
        let e = e + 9;
        if e >= 0 {
            Some((10i128.checked_pow(u32::try_from(e).ok()?)?, 1))
        } else {
            Some((1, 10i128.checked_pow(u32::try_from(-e).ok()?)?))
        }
    };
    let binary = |k: u32| Some((1024i128.pow(k) * 1_000_000_000, 1));
    let suffixes: [(&str, Option<(i128, i128)>); 15] = [
        ("Ki", binary(1)),
        ("Mi", binary(2)),
        ("Gi", binary(3)),
        ("Ti", binary(4)),
        ("Pi", binary(5)),
        ("Ei", binary(6)),
        ("n", decimal(-9)),
        ("u", decimal(-6)),
        ("m", decimal(-3)),
        ("k", decimal(3)),
        ("M", decimal(6)),
        ("G", decimal(9)),
        ("T", decimal(12)),
        ("P", decimal(15)),
        ("E", decimal(18)),
    ];
    // The number as an integer and its count of fraction digits.
    let number = |n: &str| -> Option<(i128, u32)> {
        let (int, frac) = n.split_once('.').unwrap_or((n, ""));
        let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
        if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
            return None;
        }
        let all: i128 = format!("{int}{frac}").parse().ok()?;
        Some((all, u32::try_from(frac.len()).ok()?))
    };
    let scaled = |n: &str, (mul, div): (i128, i128)| -> Option<i128> {
        let (all, frac) = number(n)?;
        let den = 10i128.checked_pow(frac)?.checked_mul(div)?;
        // Rounded up, as the API server rounds what it cannot hold.
        let num = all.checked_mul(mul)?;
        Some(num / den + i128::from(num % den != 0))
    };
    for (suffix, factor) in &suffixes {
        if let Some(n) = v.strip_suffix(suffix)
            && let (Some(_), Some(f)) = (number(n), factor)
        {
            return scaled(n, *f);
        }
    }
    // A decimal exponent: `1e3`, `5E-1`.
    if let Some((mantissa, exp)) = v.split_once(['e', 'E']) {
        let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
        if !digits.is_empty() && digits.len() <= 3 && digits.bytes().all(|b| b.is_ascii_digit()) {
            let e: i32 = exp.parse().ok()?;
            return scaled(mantissa, decimal(e)?);
        }
        return None;
    }
    scaled(v, (1_000_000_000, 1))
}

/// An image without its tag or digest: `registry.local/strait-proxy`.
pub fn repository(image: &str) -> &str {
    let name = image.split('@').next().unwrap_or(image);
    match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    }
}

/// The release an image's tag names (`v0.1.0`, `0.2.0-rc.1`): none for a
/// digest, `latest` or a tag of the user's own.
fn release_of(image: &str) -> Option<[u64; 3]> {
    let name = image.split('@').next()?;
    let tag = name.get(repository(name).len() + 1..)?;
    let version = tag.strip_prefix('v').unwrap_or(tag);
    let mut parts = version.split(['-', '+']).next()?.split('.');
    let mut release = [0; 3];
    for n in &mut release {
        *n = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(release)
}

/// The first release whose proxy serves all the injector writes into a pod
/// for it: the probes it rewrites (`/probe/tcp`), IPv6 loopback. A release
/// that adds to that list moves this to itself.
const SERVES_WHAT_IS_WRITTEN_SINCE: [u64; 3] = [0, 1, 0];

/// A proxy image of an earlier release than `SERVES_WHAT_IS_WRITTEN_SINCE`
/// (a pinned `--proxy-image` kept across an upgrade, a CLI newer than the
/// install): its proxy would not answer what the injector writes.
fn earlier_release(image: &str) -> bool {
    release_of(image).is_some_and(|r| r < SERVES_WHAT_IS_WRITTEN_SINCE)
}

/// An image reference: no spaces or control characters, bounded.
fn valid_image(v: &str) -> bool {
    !v.is_empty() && v.len() <= 512 && v.bytes().all(|b| b.is_ascii_graphic())
}

/// An image flag's value (`--proxy-image`, `--controller-image`): an empty
/// one (a script's unset variable) would have every meshed pod refused by
/// the API server, far from its cause.
pub fn image(v: &str) -> Result<String, String> {
    if valid_image(v) {
        Ok(v.to_string())
    } else {
        Err(format!(
            "{v:?} is not an image reference (e.g. ghcr.io/strait-dev/strait-proxy:v0.1.0)"
        ))
    }
}

#[cfg(test)]
mod tests;
