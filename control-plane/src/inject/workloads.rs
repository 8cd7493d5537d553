//! `strait inject`: the sidecar added to the pods of workload YAML, the way the
//! webhook adds it at admission. Documents that hold no pod pass through as
//! they were written (comments and all), in their order.

use serde_json::Value;

use super::{ALREADY_INJECTED, Namespace, Outcome, Settings, inject};

const INJECTED: &str = "injected";
const INJECTED_AGAIN: &str = "injected again: its proxy had other settings";

/// What happened to one workload, for the report on stderr.
#[derive(Debug, PartialEq)]
pub struct Report {
    pub object: String,
    pub result: Result<&'static str, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("document {doc}: not YAML: {reason}")]
    Yaml { doc: usize, reason: String },
}

/// Injects every pod template in a multi-document YAML stream.
pub fn inject_stream(input: &str, s: &Settings) -> Result<(String, Vec<Report>), StreamError> {
    let mut out = String::with_capacity(input.len() * 2);
    let mut reports = Vec::new();
    for (i, doc) in documents(input).into_iter().enumerate() {
        let doc_no = i + 1;
        if i > 0 {
            out.push_str("---\n");
        }
        let value: Value = match parse(doc) {
            Ok(v) => v,
            Err(e) => {
                return Err(StreamError::Yaml {
                    doc: doc_no,
                    reason: e.to_string(),
                });
            }
        };
        let mut value = value;
        // Read as kubectl (YAML 1.1) reads it before anything is decided:
        // `hostNetwork: yes` is a host-network pod, never injected. Written
        // back the same way, so kubectl reads back what was meant.
        super::yaml::yaml11_booleans(&mut value);
        let before = reports.len();
        inject_object(&mut value, s, &mut reports);
        let changed = reports[before..]
            .iter()
            .any(|r| matches!(r.result, Ok(INJECTED | INJECTED_AGAIN)));
        if changed {
            out.push_str(&super::yaml::to_yaml(&value));
        } else {
            out.push_str(doc);
            if !doc.ends_with('\n') && !doc.is_empty() {
                out.push('\n');
            }
        }
    }
    Ok((out, reports))
}

/// A document as kubectl reads it: YAML 1.1's merge keys (`<<: *common`)
/// merged, or they would be written back as a field named `<<`.
fn parse(doc: &str) -> Result<Value, serde_norway::Error> {
    if !doc.contains("<<") {
        return serde_norway::from_str(doc);
    }
    let mut v: serde_norway::Value = serde_norway::from_str(doc)?;
    v.apply_merge()?;
    serde::Deserialize::deserialize(v)
}

/// Splits a stream at `---` lines, as kubectl does.
fn documents(input: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end();
        if bare == "---" {
            docs.push(&input[start..pos]);
            start = pos + line.len();
        } else if bare.starts_with("--- ") {
            // What follows the marker on its line starts the document.
            docs.push(&input[start..pos]);
            start = pos + 4;
        }
        pos += line.len();
    }
    docs.push(&input[start..]);
    // A stream that starts with `---` has nothing before it; a document that is
    // only whitespace or comments is kept, so nothing is lost.
    if docs.first().is_some_and(|d| d.trim().is_empty()) {
        docs.remove(0);
    }
    docs
}

/// Where a kind keeps its pod: the object itself, or a template within it.
fn template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn inject_object(v: &mut Value, s: &Settings, reports: &mut Vec<Report>) {
    let kind = v
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = v.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_object(item, s, reports);
            }
        }
        return;
    }
    let Some(path) = template_path(&kind) else {
        return;
    };
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    let object = format!("{}/{name}", kind.to_lowercase());
    let namespace = v.pointer("/metadata/namespace").and_then(Value::as_str);
    if namespace.is_some_and(|ns| {
        ns == s.mesh_namespace || crate::defaults::SYSTEM_NAMESPACES.contains(&ns)
    }) {
        // The webhooks never see these: DNS and the controller that proxies
        // wait for must not wait for them.
        reports.push(Report {
            object,
            result: Ok("the system's and the mesh's own namespaces are never meshed"),
        });
        return;
    }
    let Some(pod) = v.pointer_mut(path) else {
        reports.push(Report {
            object,
            result: Err(format!("no pod template at {path}")),
        });
        return;
    };
    let result = match inject(pod, Namespace::Enabled, s) {
        Ok(Outcome::Inject(patch)) => patched(pod, &patch).map(|()| INJECTED),
        Ok(Outcome::Skip(ALREADY_INJECTED)) => injected_again(pod, s),
        Ok(Outcome::Skip(why)) => Ok(why),
        Err(e) => Err(e.to_string()),
    };
    reports.push(Report { object, result });
}

fn patched(pod: &mut Value, patch: &json_patch::Patch) -> Result<(), String> {
    json_patch::patch(pod, patch).map_err(|e| e.to_string())?;
    as_kubectl_reads(pod);
    Ok(())
}

/// A pod's file modes as kubectl would have read the file (YAML 1.1).
fn as_kubectl_reads(pod: &mut Value) {
    if let Some(volumes) = pod.pointer_mut("/spec/volumes") {
        super::yaml::octal_modes(volumes);
    }
}

/// A pod template an earlier `strait inject` wrote: injected again from what
/// it was, so that manifests kept injected take a new anchor bundle (a
/// rotation), proxy image or setting as the webhook's pods do. Left as
/// written when that changes nothing.
fn injected_again(pod: &mut Value, s: &Settings) -> Result<&'static str, String> {
    let mut bare = pod.clone();
    uninject(&mut bare);
    let patch = match inject(&bare, Namespace::Enabled, s) {
        Ok(Outcome::Inject(patch)) => patch,
        Ok(Outcome::Skip(_)) => return Ok(ALREADY_INJECTED),
        Err(e) => return Err(e.to_string()),
    };
    patched(&mut bare, &patch)?;
    let mut was = pod.clone();
    as_kubectl_reads(&mut was);
    if same(&bare, &was) {
        return Ok(ALREADY_INJECTED);
    }
    *pod = bare;
    Ok(INJECTED_AGAIN)
}

/// Fields the API server fills in where injection writes none: a manifest
/// read back from the cluster (`kubectl get deploy -o yaml`) has them.
const DEFAULTED: [&str; 8] = [
    "imagePullPolicy",
    "terminationMessagePath",
    "protocol",
    "timeoutSeconds",
    "successThreshold",
    "scheme",
    "apiVersion",
    "defaultMode",
];

/// Whether `was` is what injection writes now (`fresh`), but for fields the
/// API server defaults and quantities it writes otherwise (`0.5` as `500m`).
fn same(fresh: &Value, was: &Value) -> bool {
    match (fresh, was) {
        (Value::Object(f), Value::Object(w)) => {
            f.iter()
                .all(|(k, v)| w.get(k).is_some_and(|wv| same(v, wv)))
                && w.keys()
                    .all(|k| f.contains_key(k) || DEFAULTED.contains(&k.as_str()))
        }
        (Value::Array(f), Value::Array(w)) => {
            f.len() == w.len() && f.iter().zip(w).all(|(a, b)| same(a, b))
        }
        (Value::String(f), Value::String(w)) => {
            f == w || super::quantity(f).is_some_and(|q| super::quantity(w) == Some(q))
        }
        _ => fresh == was,
    }
}

/// What injection adds that injecting again would add twice: the init
/// container, the proxy, their volumes and the annotation (its label is set
/// again as it is). Probes it rewrote stay rewritten (injection lists their
/// ports again).
fn uninject(pod: &mut Value) {
    let ours = |item: &Value, names: &[&str]| {
        item.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| names.contains(&n))
    };
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    for (list, names) in [
        (
            "initContainers",
            &[super::INIT_CONTAINER, super::PROXY_CONTAINER][..],
        ),
        ("containers", &[super::PROXY_CONTAINER][..]),
        ("volumes", &super::VOLUMES[..]),
    ] {
        if let Some(items) = spec.get_mut(list).and_then(Value::as_array_mut) {
            items.retain(|i| !ours(i, names));
        }
    }
    if let Some(a) = pod
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        a.remove(crate::defaults::INBOUND_PORT_ANNOTATION);
    }
}

/// `strait inject FILE|-`.
#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
    /// The YAML to inject: a file, or `-` for standard input.
    #[arg(value_name = "FILE|-")]
    pub input: String,
    /// The mesh's trust anchors (PEM) [default: those of the install in the
    /// cluster read, its ConfigMap strait-system/strait-trust-anchors].
    #[arg(long, env = "STRAIT_IDENTITY_TRUST_ANCHORS_FILE", value_name = "FILE")]
    pub identity_trust_anchors_file: Option<std::path::PathBuf>,
    /// The proxy image [default: the installed one, or this release's].
    #[arg(long, value_name = "IMAGE", value_parser = crate::inject::image)]
    pub proxy_image: Option<String>,
    /// The iptables backend the init containers write with: the one the nodes'
    /// kube-proxy uses [default: the installed one, or nft].
    #[arg(long, value_enum)]
    pub proxy_iptables_mode: Option<super::IptablesMode>,
    /// Trust domain of workload identities [default: the installed one, or
    /// cluster.local].
    #[arg(long, value_parser = crate::install::a_trust_domain)]
    pub trust_domain: Option<String>,
    /// Do not read the install in the cluster: the anchors file is then needed,
    /// and the settings are as given (or their defaults). Nothing is read
    /// either when all four (with --proxy-image) are given.
    #[arg(long)]
    pub ignore_cluster: bool,
    /// The namespace strait is installed in, where its settings are read.
    #[arg(long, default_value = crate::defaults::CONTROLLER_NAMESPACE)]
    pub namespace: String,
    #[command(flatten)]
    pub telemetry: super::TelemetryArgs,
    #[command(flatten)]
    pub proxy_resources: super::ProxyResources,
}

/// The anchors, trust domain and iptables mode to inject with: as given, and
/// what is not given as the install in the cluster has it, so that injected
/// proxies can reach its controller and their init containers' rules load.
async fn settings_from_args(args: &InjectArgs) -> anyhow::Result<Settings> {
    let given = match &args.identity_trust_anchors_file {
        Some(path) => Some(
            super::read_anchors("--identity-trust-anchors-file", path)
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let all_given = given.is_some()
        && args.trust_domain.is_some()
        && args.proxy_iptables_mode.is_some()
        && args.proxy_image.is_some();
    let installed = if args.ignore_cluster || all_given {
        None
    } else {
        match crate::install::installed_for_injection(&args.cluster, &args.namespace).await {
            Ok(i) => i,
            // Rendering for another cluster with everything given is no error.
            Err(e) if given.is_some() => {
                eprintln!(
                    "strait inject: {e:#}; the anchors file given is used, with --trust-domain and --proxy-iptables-mode as given (give them as installed)"
                );
                None
            }
            Err(e) => return Err(e.context("pass --identity-trust-anchors-file (and the settings strait was installed with), or --ignore-cluster")),
        }
    };
    let (cluster_anchors, installed) = match installed {
        Some((a, i)) => (a, Some(i)),
        None => (None, None),
    };
    if let (Some(g), Some(c)) = (&given, &cluster_anchors)
        && g.trim() != c.trim()
    {
        eprintln!(
            "strait inject: the anchors file given differs from the anchors of the install in the cluster read; its trust domain and iptables mode are used unless given (--ignore-cluster to read nothing)"
        );
    }
    let anchors = given.or(cluster_anchors).ok_or_else(|| {
        anyhow::anyhow!(
            "no trust anchors: pass --identity-trust-anchors-file, or run against the cluster strait is installed in (KUBECONFIG)"
        )
    })?;
    let trust_domain = crate::install::trust_domain(
        args.trust_domain.as_deref(),
        installed.as_ref().and_then(|i| i.trust_domain.as_deref()),
        |have, want| {
            format!(
                "strait is installed with trust domain {have:?} in the cluster read: proxies injected with {want:?} could not reach its controller; leave --trust-domain out, or pass --ignore-cluster to render for another cluster"
            )
        },
    )?;
    // What is not given is as the installed injector has it, so that a pod
    // injected here runs the proxy (from the registry, with the telemetry)
    // the webhook would give it.
    let proxy_image =
        (args.proxy_image.as_ref()).or(installed.as_ref().and_then(|i| i.proxy_image.as_ref()));
    let mut settings = Settings::new(anchors, &trust_domain, proxy_image.map(String::as_str));
    if let Some(why) = settings.earlier_proxy() {
        eprintln!("strait inject: {why}");
    }
    // Installed elsewhere than the default: its controller's Service and
    // identity there, as its injector would set them.
    let port = crate::defaults::GRPC_ADDR
        .parse::<std::net::SocketAddr>()
        .map_or(8090, |a| a.port());
    settings.controller_at(
        &args.namespace,
        crate::defaults::CONTROLLER_SERVICE_ACCOUNT,
        port,
    );
    settings.iptables_mode = args
        .proxy_iptables_mode
        .or(installed.as_ref().and_then(|i| i.iptables_mode))
        .unwrap_or_default();
    let installed = installed.unwrap_or_default();
    settings.telemetry = (args.telemetry).over(installed.telemetry);
    settings.proxy_resources = (args.proxy_resources.clone()).or(installed.proxy_resources);
    settings
        .proxy_resources
        .check()
        .map_err(anyhow::Error::msg)?;
    Ok(settings)
}

/// Reads, injects and prints; what happened to each workload goes to stderr.
/// Any failure prints nothing on stdout, so `| kubectl apply -f -` applies
/// nothing half-done.
pub async fn run(args: &InjectArgs) -> anyhow::Result<()> {
    use std::io::Read as _;
    let input = if args.input == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| anyhow::anyhow!("cannot read standard input: {e}"))?;
        s
    } else {
        std::fs::read_to_string(&args.input)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.input))?
    };
    let settings = settings_from_args(args).await?;
    let (out, reports) = inject_stream(&input, &settings)?;
    let mut failed = 0;
    for r in &reports {
        match &r.result {
            Ok(what) => eprintln!("{}: {what}", r.object),
            Err(e) => {
                failed += 1;
                eprintln!("{}: error: {e}", r.object);
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} workload(s) could not be injected; nothing was printed");
    }
    crate::output::print(format_args!("{out}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: InjectArgs,
    }

    fn parse(flags: &[&str]) -> Result<InjectArgs, clap::Error> {
        Cli::try_parse_from(["strait-inject", "app.yaml"].iter().chain(flags)).map(|c| c.args)
    }

    /// A trust domain the proxies would refuse at start is refused here, as
    /// `strait install` refuses it, before anything is printed: otherwise
    /// every injected pod's proxy would exit and its app never start.
    #[test]
    fn a_trust_domain_a_proxy_would_refuse_is_refused() {
        for bad in ["spiffe://corp.example", "Corp.Example"] {
            let e = parse(&["--trust-domain", bad]).expect_err(bad);
            assert!(e.to_string().contains("is not a trust domain"), "{e}");
        }
        let ok = parse(&["--trust-domain", "corp.example"]).unwrap();
        assert_eq!(ok.trust_domain.as_deref(), Some("corp.example"));
    }

    /// What is not given comes from the install; `none` and `off` leave its
    /// collector and access log out.
    #[test]
    fn telemetry_not_given_is_the_installed_and_can_be_turned_off() {
        let installed = || super::super::Telemetry {
            proxy_otlp_endpoint: Some("http://collector:4317".into()),
            proxy_trace_sampling: Some("0.5".into()),
            proxy_access_log: Some(super::super::AccessLog::Json),
        };
        let kept = parse(&[]).unwrap().telemetry.over(installed());
        assert_eq!(
            kept.proxy_otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
        assert_eq!(kept.proxy_access_log, Some(super::super::AccessLog::Json));
        let off = parse(&["--proxy-otlp-endpoint", "none", "--proxy-access-log", "off"])
            .unwrap()
            .telemetry
            .over(installed());
        assert_eq!(off.proxy_otlp_endpoint, None);
        assert_eq!(off.proxy_access_log, None);
        assert_eq!(off.proxy_trace_sampling.as_deref(), Some("0.5"));
        assert!(parse(&["--proxy-otlp-endpoint", "collector:4317"]).is_err());
    }
}
