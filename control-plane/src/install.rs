//! `strait install`: every manifest a cluster needs, as one YAML stream for
//! `kubectl apply -f -`: the namespace, the CRDs, least-privilege RBAC, the
//! identity (a freshly generated trust anchor and issuer unless given), the
//! controller (two replicas, a PodDisruptionBudget), its Service and the
//! webhook configurations of the injector and of the policy validator. The Helm chart in `deploy/helm/strait`
//! renders the same objects (a test compares them).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::defaults;
use crate::identity::ca;

pub const NAMESPACE: &str = defaults::CONTROLLER_NAMESPACE;
pub const CONTROLLER: &str = defaults::CONTROLLER_SERVICE_ACCOUNT;
pub const ANCHORS_CONFIG_MAP: &str = "strait-trust-anchors";
pub const ISSUER_SECRET: &str = "strait-identity-issuer";
pub const WEBHOOK_CONFIG: &str = "strait-proxy-injector";
pub const VALIDATION_CONFIG: &str = "strait-policy-validator";
/// How long a generated trust anchor and issuer live (rotate before then).
const GENERATED_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
    /// The trust anchors (PEM) proxies verify peers with; with the issuer flags,
    /// instead of a freshly generated anchor and issuer.
    #[arg(long, value_name = "FILE", requires_all = ["identity_issuer_certificate_file", "identity_issuer_key_file"])]
    pub identity_trust_anchors_file: Option<PathBuf>,
    /// The issuer's certificate (PEM), signed by one of the trust anchors.
    #[arg(long, value_name = "FILE", requires_all = ["identity_trust_anchors_file", "identity_issuer_key_file"])]
    pub identity_issuer_certificate_file: Option<PathBuf>,
    /// The issuer's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["identity_trust_anchors_file", "identity_issuer_certificate_file"])]
    pub identity_issuer_key_file: Option<PathBuf>,
    /// Trust domain of workload identities [default: the installed one, or
    /// cluster.local].
    #[arg(long, value_parser = a_trust_domain)]
    pub trust_domain: Option<String>,
    /// The controller's image (default: this release's).
    #[arg(long, value_name = "IMAGE", value_parser = crate::inject::image)]
    pub controller_image: Option<String>,
    /// The proxy image injected pods run (default: this release's).
    #[arg(long, value_name = "IMAGE", value_parser = crate::inject::image)]
    pub proxy_image: Option<String>,
    /// The iptables backend injected pods' init containers write with: the one
    /// the nodes' kube-proxy uses [default: the installed one, or nft].
    #[arg(long, value_enum)]
    pub proxy_iptables_mode: Option<crate::inject::IptablesMode>,
    /// Controller replicas: each serves proxies; one at a time writes status
    /// [default: the installed number, or 2].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub replicas: Option<u16>,
    /// The OpenTelemetry collector (OTLP/gRPC, `http://collector:4317`) the
    /// controller and every injected proxy export spans to.
    #[arg(long, value_name = "URL", value_parser = crate::inject::otlp_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces injected proxies record (0.0 to 1.0); default 1.0.
    #[arg(long, value_name = "RATIO", value_parser = crate::inject::sampling_ratio)]
    pub proxy_trace_sampling: Option<String>,
    /// Injected proxies' access log on their stdout; default none.
    #[arg(long, value_enum)]
    pub proxy_access_log: Option<crate::inject::AccessLog>,
    #[command(flatten)]
    pub proxy_resources: crate::inject::ProxyResources,
    /// Do not look for an existing install's identity in the cluster: without
    /// the identity flags, a new trust anchor and issuer are generated even if
    /// strait is installed (applied there, they replace the mesh's identity).
    #[arg(long)]
    pub ignore_cluster: bool,
    /// Do not keep the installed replicas, `--otlp-endpoint`,
    /// `--proxy-trace-sampling`, `--proxy-access-log` and the proxies'
    /// resources where not given again: they go back to their defaults (no
    /// traces, no access log). The identity, trust domain and iptables mode
    /// are kept still.
    #[arg(long)]
    pub reset_settings: bool,
}

/// How long looking for an existing install may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reading every pod may take, a page at a time: tens of
/// thousands of them are some hundred pages.
const PODS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The manifests, keeping the identity of the install already in the cluster
/// (as the chart does with `lookup`): applying them again, to change an image
/// or the replicas, must not replace the trust anchor and issuer under running
/// controllers and proxies, which would each keep the old ones. Nor the
/// settings not given again: a trust domain reset to the default would cut
/// every running proxy off, and a reset iptables mode would give new pods
/// rules the nodes cannot load.
pub async fn run(args: &InstallArgs) -> anyhow::Result<String> {
    let given = args.identity_trust_anchors_file.is_some();
    // What the meshed pods would be read for, with no controller to say it.
    let settings_given = args.trust_domain.is_some() && args.proxy_iptables_mode.is_some();
    let existing = if args.ignore_cluster {
        None
    } else if given {
        // The identity is given; the settings are still read back, but a
        // cluster that cannot be asked (rendering for elsewhere) is no error.
        // One that answered with a refusal is: an install may be there, and
        // its settings would be replaced by the defaults unseen.
        match existing_install(&args.cluster, false, settings_given).await {
            Ok(e) => e,
            Err(e) if stopped(&e) => return Err(e),
            Err(e) => {
                eprintln!(
                    "strait install: the installed settings could not be read back ({e:#}); the identity files given are used, with --trust-domain and --proxy-iptables-mode as given (give them as installed)"
                );
                None
            }
        }
    } else {
        existing_install(&args.cluster, true, settings_given).await?
    };
    let pods_anchors = (existing.as_ref())
        .map(|e| e.pods_anchors_pem.clone())
        .unwrap_or_default();
    let installed_args = (existing.as_ref())
        .map(|e| e.controller_args.clone())
        .unwrap_or_default();
    // The identity's objects deleted under a running controller, for a new one.
    let regenerated = !given && existing.as_ref().is_some_and(|e| e.identity.is_none());
    let values = args.values(existing)?;
    let mut asked: Vec<&str> = if args.reset_settings {
        RESET_BY_SETTINGS.to_vec()
    } else {
        Vec::new()
    };
    // An endpoint no longer taken is left out (`settings_of` says so), not
    // to be set again by hand.
    for flag in ["--otlp-endpoint", "--proxy-otlp-endpoint"] {
        if flag_value(&installed_args, &[], flag)
            .is_some_and(|e| crate::inject::otlp_endpoint(&e).is_err())
        {
            asked.push(flag);
        }
    }
    let dropped = flags_dropped(&installed_args, &controller_args(&values), &asked);
    if !dropped.is_empty() {
        eprintln!(
            "strait install: the installed controller also has {}, which this install does not write (set by hand, or by the chart?): kubectl apply replaces the arguments where it changes them (an upgrade does), and those are gone; set them as STRAIT_* variables on the Deployment instead, which apply keeps",
            dropped.join(", ")
        );
    }
    if !pods_anchors.is_empty() {
        let under: Vec<_> = (pods_anchors.iter())
            .map(|a| issuer_under(&values.identity, a))
            .collect();
        // Mid-rotation the pods hold two bundles: the issuer must be under
        // one, and those holding the other are named for a restart.
        match under.iter().filter(|u| u.is_ok()).count() {
            0 => {
                let e = under.into_iter().find_map(Result::err);
                anyhow::bail!(
                    "the identity is not one the meshed pods' proxies trust ({}): the controllers would restart with it and every proxy not restarted since would be cut off from them and from newly injected pods; give the installed identity, rotate as docs/kubernetes.md says (a bundle of the old and new anchors with the old issuer first, then restart the meshed workloads), or go ahead with --ignore-cluster, which reads nothing back, so with the installed settings given again: {}",
                    e.map(|e| e.to_string()).unwrap_or_default(),
                    values.as_flags()
                );
            }
            n if n < under.len() => eprintln!(
                "strait install: the identity given is under the trust anchors of some meshed pods but not all (they hold {} bundles): `strait check` names those holding others, to restart",
                under.len()
            ),
            _ => {}
        }
    }
    if regenerated {
        eprintln!(
            "strait install: {NAMESPACE} has the controller but neither Secret {ISSUER_SECRET} nor ConfigMap {ANCHORS_CONFIG_MAP}: a new trust anchor and issuer are generated (no meshed pod's proxy holds other anchors)"
        );
    }
    if values.replicas == 1 {
        eprintln!(
            "strait install: with one replica, a node drain or a restart leaves no injector for a while, and pods of labelled namespaces are refused until it is back"
        );
    }
    render(&values)
}

/// The cluster answered, but not enough to go on: these credentials may not
/// read what an install is made of, or the meshed pods. Unlike a cluster
/// that cannot be asked (rendering for elsewhere), no reason to go on as if
/// nothing were installed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Stop(String);

fn stopped(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Stop>().is_some()
}

/// The ways on when the install cannot be read back.
const UNREAD_WAYS_ON: &str = "use credentials that can; if the output is for another cluster, pass --context or --kubeconfig for it; or pass --ignore-cluster, which reads nothing, with the settings given (--trust-domain, --proxy-iptables-mode and the like)";

/// The install in the cluster `cluster` names, its identity too if
/// `identity`; `None` when nothing names a cluster (rendering for elsewhere)
/// or it has no install.
async fn existing_install(
    cluster: &crate::cluster::ClusterArgs,
    identity: bool,
    settings_given: bool,
) -> anyhow::Result<Option<Installed>> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    if !cluster.named() {
        if !identity {
            return Ok(None);
        }
        eprintln!(
            "strait install: no Kubernetes configuration (KUBECONFIG, ~/.kube/config, in a pod), so no existing install was looked for: a new trust anchor and issuer are generated (applied over an install, they would replace its identity)"
        );
        return Ok(None);
    }
    let cannot = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot tell whether strait is installed (reading {NAMESPACE}/{ISSUER_SECRET}): {e}; pass the --identity-* files, or --ignore-cluster to generate a new identity anyway"
        )
    };
    let (client, name) = cluster.client_or(cannot).await?;
    eprintln!("strait install: reading the install in the cluster at {name}");
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let maps: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let deployments: kube::Api<Deployment> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let all = async {
        if !identity {
            return Ok::<_, kube::Error>((None, None, deployments.get_opt(CONTROLLER).await?));
        }
        Ok::<_, kube::Error>((
            secrets.get_opt(ISSUER_SECRET).await?,
            maps.get_opt(ANCHORS_CONFIG_MAP).await?,
            deployments.get_opt(CONTROLLER).await?,
        ))
    };
    let read = tokio::time::timeout(LOOKUP_TIMEOUT, all)
        .await
        .map_err(|_| cannot(&format_args!("no answer in {LOOKUP_TIMEOUT:?}")))?;
    // Refused the Secret (an account that may view but not read secrets):
    // the cluster answered, and where strait is installed, a new identity
    // is not the way on.
    if let Err(kube::Error::Api(s)) = &read
        && s.code == 403
        && let Ok(Ok(Some(_))) =
            tokio::time::timeout(LOOKUP_TIMEOUT, deployments.get_opt(CONTROLLER)).await
    {
        anyhow::bail!(Stop(format!(
            "strait is installed in the cluster at {name} (Deployment {NAMESPACE}/{CONTROLLER}), but these credentials may not read its identity ({}): use credentials that can read Secret {NAMESPACE}/{ISSUER_SECRET}, or give the installed identity with the --identity-* files; a new one would cut every running proxy off",
            s.message
        )));
    }
    let (secret, anchors, controller) = read.map_err(|e| match &e {
        kube::Error::Api(s) if s.code == 403 => anyhow::Error::new(Stop(format!(
            "these credentials may not read {NAMESPACE} ({}), so whether strait is installed there, and with which settings, cannot be told: {UNREAD_WAYS_ON}",
            s.message
        ))),
        _ => cannot(&e),
    })?;
    if secret.is_none() && anchors.is_none() && controller.is_none() {
        let left = left_behind(client, identity, settings_given).await?;
        if identity && left.is_none() {
            eprintln!(
                "strait install: no install there: a new trust anchor and issuer are generated"
            );
        }
        return Ok(left);
    }
    let no_controller = controller.is_none();
    let mut found = installed(secret, anchors, controller)?;
    match found.as_mut() {
        // The identity replaced under a running install (files given, or its
        // Secret and ConfigMap deleted for a new one): the controllers restart
        // with it, so the meshed pods' proxies must trust its issuer (`run`),
        // as after a lost namespace.
        Some(f) if f.identity.is_none() => f.pods_anchors_pem = pods_anchors(client).await?,
        // The identity kept without its controller (`helm uninstall` keeps
        // the Secret and ConfigMap): no Deployment says the trust domain and
        // iptables mode it ran with, and a default one would cut the running
        // proxies off. Their pods say; given as flags too, they are checked
        // against the pods' (`values`), and only a cluster whose pods cannot
        // be read takes them unchecked.
        Some(f) if no_controller => {
            eprintln!(
                "strait install: {NAMESPACE} holds the identity but no controller: the replicas, traces, access log and proxy resources it was installed with are not known without its Deployment; give them again if they were set"
            );
            match meshed_pods(client).await {
                Ok(m) => {
                    if let Some(g) = m.given {
                        eprintln!(
                            "strait install: taking the trust domain, iptables mode and proxy image the meshed pods were injected with, where not given"
                        );
                        f.take_pods_settings(g);
                    }
                }
                Err(e) if settings_given => eprintln!(
                    "strait install: the meshed pods could not be read ({e}): the --trust-domain and --proxy-iptables-mode given are taken as they were installed, unchecked"
                ),
                Err(e) => {
                    return Err(Stop(format!(
                        "{NAMESPACE} holds the identity but no controller, and the meshed pods could not be read ({e}), so the trust domain and iptables mode they were injected with cannot be told: use credentials that may list pods in every namespace, or give both as they were installed (--trust-domain, --proxy-iptables-mode)"
                    ))
                    .into());
                }
            }
        }
        _ => {}
    }
    Ok(found)
}

/// Every meshed pod, read within `PODS_LOOKUP_TIMEOUT`; the error says why not.
async fn meshed_pods(client: kube::Client) -> Result<crate::check::Meshed, String> {
    tokio::time::timeout(PODS_LOOKUP_TIMEOUT, crate::check::meshed_pods(client))
        .await
        .map_err(|_| format!("no answer in {PODS_LOOKUP_TIMEOUT:?}"))
        .and_then(|r| r.map_err(|e| e.to_string()))
}

/// The trust anchor bundles the meshed pods' proxies hold. Pods that cannot
/// be read stop the install: nothing then tells whether a new identity
/// would cut them off.
async fn pods_anchors(client: kube::Client) -> anyhow::Result<Vec<String>> {
    match meshed_pods(client).await {
        Ok(m) => Ok(m.given.map(|g| g.anchors_pem).unwrap_or_default()),
        Err(e) => Err(Stop(format!(
            "the meshed pods could not be read ({e}), so whether their proxies trust the new identity cannot be told: use credentials that may list pods in every namespace, or pass --ignore-cluster, which reads nothing, with the installed settings given (--trust-domain, --proxy-iptables-mode and the like)"
        ))
        .into()),
    }
}

/// With no install in its namespace, what one left: meshed pods, or the
/// injector's configuration, which is cluster-wide and outlives a deleted
/// namespace. The pods' proxies trust the anchors that went with the
/// namespace, and a new identity would cut every one of them off from the
/// new controller and from the pods it injects, which no check would show
/// until their certificates expired. With the identity given (restored from
/// a backup), the pods' settings are kept, as an install's would be, and the
/// identity must be theirs (`run`).
async fn left_behind(
    client: kube::Client,
    identity: bool,
    settings_given: bool,
) -> anyhow::Result<Option<Installed>> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let hooks: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(client.clone());
    let within = |what: &str, e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "{NAMESPACE} holds no install, and whether one left {what} could not be told ({e}); pass --ignore-cluster to generate a new identity anyway"
        )
    };
    let injector = tokio::time::timeout(LOOKUP_TIMEOUT, hooks.get_opt(WEBHOOK_CONFIG))
        .await
        .map_err(|_| {
            within(
                "its injector",
                &format_args!("no answer in {LOOKUP_TIMEOUT:?}"),
            )
        })?
        .map_err(|e| within("its injector", &e))?
        .is_some();
    // Pods it may not list (an installer's narrower account) or a slow list:
    // nothing tells then whether proxies trust what was lost.
    let meshed = match meshed_pods(client).await {
        Ok(m) => m,
        // The identity given (restored from a backup): the pods are what
        // would say the trust domain and iptables mode, given neither.
        Err(e) if !identity && !settings_given => {
            return Err(Stop(format!(
                "{NAMESPACE} holds no install, and the meshed pods could not be read ({e}), so the trust domain and iptables mode they were injected with cannot be told: use credentials that may list pods in every namespace, or give both as they were installed (--trust-domain, --proxy-iptables-mode)"
            ))
            .into());
        }
        Err(e) => return Err(within("meshed pods", &e)),
    };
    if !identity {
        if meshed.given.is_some() {
            eprintln!(
                "strait install: {NAMESPACE} holds no install: taking the trust domain, iptables mode and proxy image its meshed pods were injected with, where not given; the replicas, traces, access log and proxy resources it had are not known: give them again if they were set"
            );
        }
        return Ok(meshed.given.map(|g| {
            let mut i = Installed {
                pods_anchors_pem: g.anchors_pem.clone(),
                ..Installed::default()
            };
            i.take_pods_settings(g);
            i
        }));
    }
    let Some(given) = meshed.given.filter(|_| meshed.pods.count > 0) else {
        if injector {
            eprintln!(
                "strait install: {NAMESPACE} holds no install, but MutatingWebhookConfiguration {WEBHOOK_CONFIG} remains (the namespace deleted?); no meshed pod runs, so a new identity is generated and replaces the one it names"
            );
        }
        return Ok(None);
    };
    let domain = (given.trust_domain.as_ref())
        .map(|d| format!(" in trust domain {d:?}"))
        .unwrap_or_default();
    // What a new install must be given to fit the pods.
    let as_theirs = [
        (given.trust_domain.as_ref()).map(|d| format!(" --trust-domain={d}")),
        Some(format!(
            " --proxy-iptables-mode={}",
            given.iptables_mode.as_deref().unwrap_or("nft")
        )),
    ];
    let as_theirs: String = as_theirs.into_iter().flatten().collect();
    anyhow::bail!(
        "{NAMESPACE} holds no install, but {} meshed pod(s) run ({}){domain}: its trust anchors and issuer went with it (was the namespace deleted?). A new identity would leave every running proxy cut off from the new controller and from newly injected pods. Give the old identity with the --identity-* files (the pods' trust domain and iptables mode are kept), or pass --ignore-cluster{} to generate a new one, apply it, then restart every meshed workload (docs/kubernetes.md, \"The identity lost\")",
        meshed.pods.count,
        meshed.pods,
        as_theirs
    )
}

/// What the objects read back say was installed; `None` when nothing was.
fn installed(
    secret: Option<k8s_openapi::api::core::v1::Secret>,
    anchors: Option<k8s_openapi::api::core::v1::ConfigMap>,
    controller: Option<k8s_openapi::api::apps::v1::Deployment>,
) -> anyhow::Result<Option<Installed>> {
    let (secret, anchors) = match (secret, anchors) {
        (None, None) if controller.is_none() => return Ok(None),
        // The identity's objects deleted (for a new one) under a running
        // controller: its trust domain and settings still hold.
        // Said in `run`, once the meshed pods' anchors are read.
        (None, None) => (None, None),
        (Some(s), Some(a)) => (Some(s), Some(a)),
        _ => anyhow::bail!(
            "{NAMESPACE} has only one of Secret {ISSUER_SECRET} and ConfigMap {ANCHORS_CONFIG_MAP}: pass the --identity-* files"
        ),
    };
    let identity = match (secret, anchors) {
        (Some(secret), Some(anchors)) => {
            let secret_field = |k: &str| {
                secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(k))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
                    .ok_or_else(|| anyhow::anyhow!("Secret {NAMESPACE}/{ISSUER_SECRET} has no {k}"))
            };
            let identity = Identity {
                anchors_pem: anchors
                    .data
                    .as_ref()
                    .and_then(|d| d.get("ca.crt"))
                    .cloned()
                    .ok_or_else(|| {
                        anyhow::anyhow!("ConfigMap {NAMESPACE}/{ANCHORS_CONFIG_MAP} has no ca.crt")
                    })?,
                issuer_cert_pem: secret_field("tls.crt")?,
                issuer_key_pem: secret_field("tls.key")?,
            };
            eprintln!(
                "strait install: keeping the trust anchors and issuer of the install in the cluster ({NAMESPACE}/{ISSUER_SECRET})"
            );
            Some(identity)
        }
        _ => None,
    };
    let replicas = controller
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .and_then(|r| u16::try_from(r).ok())
        .filter(|r| (1..=64).contains(r));
    let container = controller.as_ref().and_then(controller_container);
    let controller_image = container.and_then(|c| c.image.clone());
    let controller_args = container.and_then(|c| c.args.clone()).unwrap_or_default();
    // Set on the Deployment by hand or by the chart's values (a large
    // cluster's controller given more memory): kept, as the replicas are.
    let controller_resources = container
        .and_then(|c| c.resources.as_ref())
        .and_then(|r| serde_json::to_value(r).ok())
        .filter(|r| *r != default_controller_resources());
    let controller_pull_policy = container
        .and_then(|c| c.image_pull_policy.clone())
        .filter(|p| p != DEFAULT_PULL_POLICY);
    let InstalledArgs {
        trust_domain,
        iptables_mode,
        proxy_image,
        telemetry,
        proxy_resources,
    } = settings_of(controller, "strait install");
    Ok(Some(Installed {
        identity,
        trust_domain,
        iptables_mode,
        proxy_image,
        controller_image,
        telemetry,
        proxy_resources,
        replicas,
        controller_args,
        controller_resources,
        controller_pull_policy,
        pods_anchors_pem: Vec::new(),
    }))
}

/// What the controller Deployment's own arguments say it was installed with.
#[derive(Debug, Default)]
struct InstalledArgs {
    trust_domain: Option<String>,
    iptables_mode: Option<crate::inject::IptablesMode>,
    proxy_image: Option<String>,
    telemetry: crate::inject::Telemetry,
    proxy_resources: crate::inject::ProxyResources,
}

fn settings_of(
    controller: Option<k8s_openapi::api::apps::v1::Deployment>,
    who: &str,
) -> InstalledArgs {
    let container = controller.as_ref().and_then(controller_container);
    let arg = |flag: &str| container.and_then(|c| container_flag(c, flag));
    let trust_domain = arg("--trust-domain");
    let iptables_mode = arg("--proxy-iptables-mode")
        .and_then(|m| <crate::inject::IptablesMode as clap::ValueEnum>::from_str(&m, false).ok());
    if trust_domain.is_none() && container.is_some() {
        eprintln!(
            "{who}: Deployment {NAMESPACE}/{CONTROLLER} names no --trust-domain; pass --trust-domain if it is not {}",
            defaults::TRUST_DOMAIN
        );
    }
    InstalledArgs {
        trust_domain,
        iptables_mode,
        proxy_image: arg("--proxy-image"),
        telemetry: crate::inject::Telemetry {
            // One an earlier release took (credentials or a query in it,
            // which OTLP/gRPC never sent) would stop the new controller and
            // new proxies at start.
            proxy_otlp_endpoint: arg("--proxy-otlp-endpoint").filter(|e| {
                let Err(why) = crate::inject::otlp_endpoint(e) else {
                    return true;
                };
                let flag = match who {
                    "strait install" => "--otlp-endpoint",
                    _ => "--proxy-otlp-endpoint",
                };
                // (Not the URL itself: it may hold a password.)
                let why = why.split_once("\": ").map_or("", |(_, w)| w);
                eprintln!(
                    "{who}: the installed --proxy-otlp-endpoint is no longer taken ({why}): left out; give {flag} again"
                );
                false
            }),
            proxy_trace_sampling: arg("--proxy-trace-sampling"),
            proxy_access_log: arg("--proxy-access-log").and_then(|l| {
                <crate::inject::AccessLog as clap::ValueEnum>::from_str(&l, false).ok()
            }),
        },
        // Read as given (the controller refuses one it cannot read).
        proxy_resources: controller
            .as_ref()
            .map(proxy_resources_of)
            .unwrap_or_default(),
    }
}

/// A controller flag's value as the controller reads it: the last
/// `--flag=value` or `--flag value` among its arguments, or else the
/// container's `STRAIT_FLAG` variable when it is given literally.
/// The controller Deployment's own container.
fn controller_container(
    d: &k8s_openapi::api::apps::v1::Deployment,
) -> Option<&k8s_openapi::api::core::v1::Container> {
    (d.spec.as_ref()?.template.spec.as_ref()?.containers.iter()).find(|c| c.name == "controller")
}

/// A flag's value as the controller container of `d` is given it.
/// The proxies' resources the controller Deployment's own arguments give
/// (read as given: the controller refuses one it cannot read).
pub(crate) fn proxy_resources_of(
    d: &k8s_openapi::api::apps::v1::Deployment,
) -> crate::inject::ProxyResources {
    let arg = |flag: &str| controller_flag(d, flag);
    crate::inject::ProxyResources {
        proxy_cpu_request: arg("--proxy-cpu-request"),
        proxy_cpu_limit: arg("--proxy-cpu-limit"),
        proxy_memory_request: arg("--proxy-memory-request"),
        proxy_memory_limit: arg("--proxy-memory-limit"),
    }
}

pub(crate) fn controller_flag(
    d: &k8s_openapi::api::apps::v1::Deployment,
    flag: &str,
) -> Option<String> {
    container_flag(controller_container(d)?, flag)
}

fn container_flag(c: &k8s_openapi::api::core::v1::Container, flag: &str) -> Option<String> {
    flag_value(
        c.args.as_deref().unwrap_or_default(),
        c.env.as_deref().unwrap_or_default(),
        flag,
    )
}

fn flag_value(
    args: &[String],
    env: &[k8s_openapi::api::core::v1::EnvVar],
    flag: &str,
) -> Option<String> {
    let mut found = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        match a.strip_prefix(flag) {
            Some("") => found = it.next().cloned().or(found),
            Some(v) if v.starts_with('=') => found = Some(v[1..].to_string()),
            _ => {}
        }
    }
    found.or_else(|| {
        let name = format!(
            "STRAIT_{}",
            flag.trim_start_matches('-')
                .replace('-', "_")
                .to_uppercase()
        );
        env.iter().rev().find(|e| e.name == name)?.value.clone()
    })
}

/// What `strait inject` needs of the install in the cluster `cluster` names:
/// its trust anchors (public, unlike the issuer's key, which is not read) and
/// its settings. `None` when nothing names a cluster or it has no install.
pub async fn installed_for_injection(
    cluster: &crate::cluster::ClusterArgs,
    namespace: &str,
) -> anyhow::Result<Option<(Option<String>, Installed)>> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::ConfigMap;
    if !cluster.named() {
        return Ok(None);
    }
    let cannot = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot read the install in the cluster ({namespace}/{ANCHORS_CONFIG_MAP}): {e}"
        )
    };
    let (client, name) = cluster.client_or(cannot).await?;
    eprintln!("strait inject: reading the install in the cluster at {name}");
    let maps: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), namespace);
    let deployments: kube::Api<Deployment> = kube::Api::namespaced(client, namespace);
    let both = async {
        Ok::<_, kube::Error>((
            maps.get_opt(ANCHORS_CONFIG_MAP).await?,
            deployments.get_opt(CONTROLLER).await?,
        ))
    };
    let (anchors, controller) = tokio::time::timeout(LOOKUP_TIMEOUT, both)
        .await
        .map_err(|_| cannot(&format_args!("no answer in {LOOKUP_TIMEOUT:?}")))?
        .map_err(|e| cannot(&e))?;
    if anchors.is_none() && controller.is_none() {
        return Ok(None);
    }
    let anchors = anchors
        .and_then(|m| m.data?.remove("ca.crt"))
        .filter(|pem| !pem.trim().is_empty());
    let a = settings_of(controller, "strait inject");
    Ok(Some((
        anchors,
        Installed {
            identity: None,
            trust_domain: a.trust_domain,
            iptables_mode: a.iptables_mode,
            proxy_image: a.proxy_image,
            controller_image: None,
            telemetry: a.telemetry,
            proxy_resources: a.proxy_resources,
            replicas: None,
            controller_args: Vec::new(),
            controller_resources: None,
            controller_pull_policy: None,
            pods_anchors_pem: Vec::new(),
        },
    )))
}

/// What an install in the cluster was made with.
#[derive(Default)]
pub struct Installed {
    /// Unless the identity was given, so not read back.
    pub identity: Option<Identity>,
    pub trust_domain: Option<String>,
    pub iptables_mode: Option<crate::inject::IptablesMode>,
    /// The proxy image its injector uses. `strait inject` uses it; an upgrade
    /// installs this release's image unless given one, and says so when it
    /// replaces another.
    pub proxy_image: Option<String>,
    /// The controller Deployment's image (read by `strait install` only, to
    /// say when it is replaced).
    pub controller_image: Option<String>,
    /// Kept by `strait install` where not given again, as the replicas are
    /// (unless `--reset-settings`).
    pub telemetry: crate::inject::Telemetry,
    /// The injected proxies' default resources, kept likewise.
    pub proxy_resources: crate::inject::ProxyResources,
    /// The controller Deployment's (read by `strait install` only).
    pub replicas: Option<u16>,
    /// The controller container's arguments (read by `strait install`
    /// only, to name those set by hand that the install would drop).
    pub controller_args: Vec<String>,
    /// The controller container's resources and image pull policy where not
    /// the install's own (read by `strait install` only, and kept).
    pub controller_resources: Option<serde_json::Value>,
    pub controller_pull_policy: Option<String>,
    /// With no install left, the trust anchors its meshed pods hold: an
    /// identity given must be under them.
    pub pods_anchors_pem: Vec<String>,
}

impl Installed {
    /// What the meshed pods were injected with, where no controller says it.
    fn take_pods_settings(&mut self, g: crate::check::Given) {
        self.trust_domain = g.trust_domain;
        self.iptables_mode = g.iptables_mode.and_then(|m| {
            <crate::inject::IptablesMode as clap::ValueEnum>::from_str(&m, false).ok()
        });
        self.proxy_image = g.proxy_image;
    }
}

/// The identity material the install carries.
pub struct Identity {
    pub anchors_pem: String,
    pub issuer_cert_pem: String,
    pub issuer_key_pem: String,
}

/// What the manifests are made from (the chart's values, in effect).
pub struct Values {
    pub identity: Identity,
    pub trust_domain: String,
    pub controller_image: String,
    pub proxy_image: String,
    pub proxy_iptables_mode: crate::inject::IptablesMode,
    pub replicas: u16,
    pub otlp_endpoint: Option<String>,
    pub proxy_trace_sampling: Option<String>,
    pub proxy_access_log: Option<crate::inject::AccessLog>,
    pub proxy_resources: crate::inject::ProxyResources,
    /// The controller container's, where not the install's defaults.
    pub controller_resources: Option<serde_json::Value>,
    pub controller_pull_policy: Option<String>,
}

impl Values {
    /// The `strait install` flags that make these settings (not the
    /// identity), for an install that cannot read them back.
    fn as_flags(&self) -> String {
        let mut flags = vec![
            format!("--trust-domain={}", self.trust_domain),
            format!(
                "--proxy-iptables-mode={}",
                self.proxy_iptables_mode.as_str()
            ),
            format!("--replicas={}", self.replicas),
            format!("--controller-image={}", self.controller_image),
            format!("--proxy-image={}", self.proxy_image),
        ];
        flags.extend(
            self.otlp_endpoint
                .iter()
                .map(|e| format!("--otlp-endpoint={e}")),
        );
        flags.extend(
            (self.proxy_trace_sampling.iter()).map(|r| format!("--proxy-trace-sampling={r}")),
        );
        flags.extend(
            (self.proxy_access_log.iter()).map(|l| format!("--proxy-access-log={}", l.as_str())),
        );
        flags.extend(
            self.proxy_resources
                .flags()
                .map(|(f, v)| format!("{f}={v}")),
        );
        flags.join(" ")
    }

    /// Values that say nothing (no identity, no images), for what does not
    /// depend on them: the objects' kinds and names.
    fn blank() -> Self {
        Values {
            identity: Identity {
                anchors_pem: String::new(),
                issuer_cert_pem: String::new(),
                issuer_key_pem: String::new(),
            },
            trust_domain: defaults::TRUST_DOMAIN.to_string(),
            controller_image: String::new(),
            proxy_image: String::new(),
            proxy_iptables_mode: Default::default(),
            replicas: 1,
            otlp_endpoint: None,
            proxy_trace_sampling: None,
            proxy_access_log: None,
            proxy_resources: Default::default(),
            controller_resources: None,
            controller_pull_policy: None,
        }
    }
}

/// The trust domain asked for, or else the installed one, or else the
/// default; one asked for that is not the installed one is refused with
/// `clash(installed, asked)`: a mesh has one trust domain.
pub fn trust_domain(
    want: Option<&str>,
    installed: Option<&str>,
    clash: impl FnOnce(&str, &str) -> String,
) -> anyhow::Result<String> {
    match (want, installed) {
        (Some(want), Some(have)) if want != have => Err(anyhow::anyhow!(clash(have, want))),
        (Some(d), _) | (None, Some(d)) => Ok(d.to_string()),
        (None, None) => Ok(defaults::TRUST_DOMAIN.to_string()),
    }
}

impl InstallArgs {
    /// This release's images, from the installed repositories where the
    /// install took them from a registry of its own (an air-gapped mirror):
    /// the public ones would not be pulled there, and every new meshed pod
    /// would wait on its init container. With what to say of each: the
    /// repository kept, and a digest pin dropped.
    fn images(
        &self,
        (controller, proxy): (Option<String>, Option<String>),
    ) -> ((String, String), Vec<String>) {
        let mut said = Vec::new();
        let mut image = |what: &str,
                         flag: &str,
                         given: &Option<String>,
                         installed: Option<String>,
                         ours: String| {
            if let Some(g) = given {
                return g.clone();
            }
            let Some(installed) = installed else {
                return ours;
            };
            let repo = crate::inject::repository(&installed);
            let tag = &ours[crate::inject::repository(&ours).len()..];
            let taken = format!("{repo}{tag}");
            if repo != crate::inject::repository(&ours) {
                said.push(format!(
                    "strait install: this release's {what} image from the installed repository, {taken} (pass {flag} for another)"
                ));
            } else if installed.contains('@') {
                said.push(format!(
                    "strait install: the installed {what} image {installed} is pinned by digest; this release's is {taken}, by tag (pass {flag} to pin it)"
                ));
            }
            taken
        };
        let c = image(
            "controller",
            "--controller-image",
            &self.controller_image,
            controller,
            defaults::controller_image(),
        );
        let p = image(
            "proxy",
            "--proxy-image",
            &self.proxy_image,
            proxy,
            defaults::proxy_image(),
        );
        ((c, p), said)
    }

    /// The values, with `existing` the install in the cluster.
    pub fn values(&self, existing: Option<Installed>) -> anyhow::Result<Values> {
        let trust_domain = trust_domain(
            self.trust_domain.as_deref(),
            existing.as_ref().and_then(|e| e.trust_domain.as_deref()),
            |have, _| {
                format!(
                    "strait is installed with trust domain {have:?}: another would cut every running proxy off from the controller and its peers; leave --trust-domain out to keep it, or remove strait first to change it"
                )
            },
        )?;
        let proxy_iptables_mode = self
            .proxy_iptables_mode
            .or(existing.as_ref().and_then(|e| e.iptables_mode))
            .unwrap_or_default();
        let kept = existing
            .as_ref()
            .filter(|_| !self.reset_settings)
            .map(|e| (e.replicas, e.telemetry.clone(), e.proxy_resources.clone()))
            .unwrap_or_default();
        let (controller_resources, controller_pull_policy) = existing
            .as_ref()
            .filter(|_| !self.reset_settings)
            .map(|e| {
                (
                    e.controller_resources.clone(),
                    e.controller_pull_policy.clone(),
                )
            })
            .unwrap_or_default();
        let controller_kept: Vec<String> = [
            (controller_resources.as_ref()).map(|r| format!("resources {r}")),
            (controller_pull_policy.as_ref()).map(|p| format!("imagePullPolicy {p}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !controller_kept.is_empty() {
            eprintln!(
                "strait install: keeping the controller's {} from its Deployment (--reset-settings drops them)",
                controller_kept.join(" and ")
            );
        }
        let proxy_resources = self.proxy_resources.clone().or(kept.2.clone());
        proxy_resources.check().map_err(anyhow::Error::msg)?;
        let replicas = self.replicas.or(kept.0).unwrap_or(2);
        let otlp_endpoint = self.otlp_endpoint.clone().or(kept.1.proxy_otlp_endpoint);
        let proxy_trace_sampling = self
            .proxy_trace_sampling
            .clone()
            .or(kept.1.proxy_trace_sampling);
        let proxy_access_log = self.proxy_access_log.or(kept.1.proxy_access_log);
        let kept: Vec<String> = [
            (self.replicas.is_none() && kept.0.is_some_and(|r| r != 2))
                .then(|| format!("--replicas={replicas}")),
            self.otlp_endpoint
                .is_none()
                .then_some(otlp_endpoint.as_ref())
                .flatten()
                .map(|e| format!("--otlp-endpoint={e}")),
            self.proxy_trace_sampling
                .is_none()
                .then_some(proxy_trace_sampling.as_ref())
                .flatten()
                .map(|r| format!("--proxy-trace-sampling={r}")),
            self.proxy_access_log
                .is_none()
                .then_some(proxy_access_log)
                .flatten()
                .map(|l| format!("--proxy-access-log={}", l.as_str())),
        ]
        .into_iter()
        .flatten()
        .chain(
            kept.2
                .flags()
                .filter(|(f, _)| !self.proxy_resources.flags().any(|(given, _)| given == *f))
                .map(|(f, v)| format!("{f}={v}")),
        )
        .collect();
        if !kept.is_empty() {
            eprintln!(
                "strait install: keeping the installed {} (not given again; --reset-settings drops them)",
                kept.join(" ")
            );
        }
        let existing_images = existing
            .as_ref()
            .map(|e| (e.controller_image.clone(), e.proxy_image.clone()))
            .unwrap_or_default();
        let existing = existing.and_then(|e| e.identity);
        let identity = match (
            &self.identity_trust_anchors_file,
            &self.identity_issuer_certificate_file,
            &self.identity_issuer_key_file,
        ) {
            (Some(a), Some(c), Some(k)) => {
                let read = |flag: &str, p: &PathBuf| {
                    std::fs::read_to_string(p)
                        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", p.display()))
                };
                let identity = Identity {
                    anchors_pem: read("--identity-trust-anchors-file", a)?,
                    issuer_cert_pem: read("--identity-issuer-certificate-file", c)?,
                    issuer_key_pem: read("--identity-issuer-key-file", k)?,
                };
                checked(
                    identity,
                    "--identity-trust-anchors-file",
                    "--identity-issuer-certificate-file and --identity-trust-anchors-file",
                )?
            }
            _ => match existing {
                Some(identity) => checked(
                    identity,
                    "the installed ConfigMap's ca.crt",
                    "the installed issuer and trust anchors",
                )?,
                None => {
                    let g = ca::generate(&trust_domain, GENERATED_VALIDITY)?;
                    Identity {
                        anchors_pem: g.anchor_pem.clone(),
                        issuer_cert_pem: g.issuer_cert_pem.clone(),
                        issuer_key_pem: g.issuer_key_pem.clone(),
                    }
                }
            },
        };
        let ((controller_image, proxy_image), notices) = self.images(existing_images);
        for notice in notices {
            eprintln!("{notice}");
        }
        Ok(Values {
            identity,
            trust_domain,
            controller_image,
            proxy_image,
            proxy_iptables_mode,
            replicas,
            otlp_endpoint,
            proxy_trace_sampling,
            proxy_access_log,
            proxy_resources,
            controller_resources,
            controller_pull_policy,
        })
    }
}

/// `identity` if the controller would take it: an issuer it can load, which
/// signs certificates that verify against the anchors.
fn checked(identity: Identity, anchors_from: &str, pair_from: &str) -> anyhow::Result<Identity> {
    if !identity.anchors_pem.contains("-----BEGIN CERTIFICATE-----") {
        anyhow::bail!("{anchors_from}: no PEM certificate in it");
    }
    issuer_under(&identity, &identity.anchors_pem)
        .map_err(|e| anyhow::anyhow!("{pair_from}: {e}"))?;
    Ok(identity)
}

/// Whether `identity`'s issuer signs certificates that verify against
/// `anchors_pem`: the controller would refuse it at start otherwise.
fn issuer_under(identity: &Identity, anchors_pem: &str) -> anyhow::Result<()> {
    let issuer = ca::Ca::from_pem(
        &identity.issuer_cert_pem,
        &identity.issuer_key_pem,
        Duration::from_secs(3600),
    )
    .map_err(|(flag, e)| anyhow::anyhow!("the issuer cannot be used ({flag}): {e}"))?;
    issuer.chains_to(anchors_pem).map_err(anyhow::Error::msg)
}

fn labels() -> Value {
    json!({"app.kubernetes.io/name": CONTROLLER, "app.kubernetes.io/part-of": "strait"})
}

/// The controller's pods are never meshed: `strait inject` of every
/// Deployment in the cluster passes them by, and the webhooks never see them
/// (their namespace aside). A controller whose proxy waits for a controller
/// would never come back once all its pods were gone.
fn pod_labels() -> Value {
    let mut l = labels();
    l["strait.dev/inject"] = json!("disabled");
    l
}

/// The settings `--reset-settings` puts back to their defaults: flags an
/// install wrote, dropped as asked, not set by hand.
const RESET_BY_SETTINGS: &[&str] = &[
    "--otlp-endpoint",
    "--proxy-otlp-endpoint",
    "--proxy-trace-sampling",
    "--proxy-access-log",
    "--proxy-cpu-request",
    "--proxy-cpu-limit",
    "--proxy-memory-request",
    "--proxy-memory-limit",
];

/// The flags among `installed` that `new` does not have, by name, but for
/// those in `asked` (dropped as asked).
fn flags_dropped(installed: &[String], new: &[String], asked: &[&str]) -> Vec<String> {
    let name = |a: &String| {
        a.starts_with("--")
            .then(|| a.split_once('=').map_or(a.as_str(), |(n, _)| n).to_string())
    };
    let new: std::collections::HashSet<String> = new.iter().filter_map(name).collect();
    let mut out: Vec<String> = installed
        .iter()
        .filter_map(name)
        .filter(|n| !new.contains(n) && !asked.contains(&n.as_str()))
        .collect();
    out.dedup();
    out
}

/// The controller's arguments, in the chart's order.
fn controller_args(v: &Values) -> Vec<String> {
    let mut args: Vec<String> = [
        "controller",
        "--kubernetes",
        "--issuer-cert=/var/run/strait/issuer/tls.crt",
        "--issuer-key=/var/run/strait/issuer/tls.key",
        "--trust-anchors=/var/run/strait/trust-anchors/ca.crt",
    ]
    .map(String::from)
    .into();
    args.push(format!("--trust-domain={}", v.trust_domain));
    args.push(format!("--proxy-image={}", v.proxy_image));
    args.push(format!(
        "--proxy-iptables-mode={}",
        v.proxy_iptables_mode.as_str()
    ));
    if let Some(e) = &v.otlp_endpoint {
        args.push(format!("--otlp-endpoint={e}"));
        args.push(format!("--proxy-otlp-endpoint={e}"));
    }
    if let Some(r) = &v.proxy_trace_sampling {
        args.push(format!("--proxy-trace-sampling={r}"));
    }
    if let Some(l) = v.proxy_access_log {
        args.push(format!("--proxy-access-log={}", l.as_str()));
    }
    for (flag, value) in v.proxy_resources.flags() {
        args.push(format!("{flag}={value}"));
    }
    args.push(format!("--webhook-addr={}", defaults::WEBHOOK_ADDR));
    args.push("--admin-addr=[::]:9990".into());
    args.push("--log-format=json".into());
    args
}

/// A trust domain the controller would take: refused here rather than
/// installed as a controller that exits at start.
pub(crate) fn a_trust_domain(v: &str) -> Result<String, String> {
    if strait_api::identity::valid_trust_domain(v) {
        Ok(v.to_string())
    } else {
        Err(format!(
            "{v:?} is not a trust domain (lower-case letters, digits, '-', '.', '_'; no spiffe://)"
        ))
    }
}

/// Every object, in the order `kubectl apply` needs them.
pub fn objects(v: &Values) -> anyhow::Result<Vec<Value>> {
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        // Kept by Helm when a release stops rendering it or is uninstalled:
        // deleting it would take the issuer and everything else in it.
        "metadata": {"name": NAMESPACE, "labels": {"strait.dev/inject": "disabled"},
                     "annotations": {"helm.sh/resource-policy": "keep"}},
    })];
    for (_, yaml) in crate::crds::render()? {
        out.push(serde_norway::from_str(&yaml)?);
    }
    out.extend(rbac());
    // Kept by `helm uninstall` too: an install after one (a release mended
    // by uninstalling it) reads them back rather than making anchors the
    // running proxies do not trust.
    let keep = json!({"helm.sh/resource-policy": "keep"});
    out.push(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": ANCHORS_CONFIG_MAP, "namespace": NAMESPACE, "annotations": keep},
        "data": {"ca.crt": v.identity.anchors_pem},
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": ISSUER_SECRET, "namespace": NAMESPACE, "annotations": keep},
        "stringData": {"tls.crt": v.identity.issuer_cert_pem, "tls.key": v.identity.issuer_key_pem},
    }));
    out.push(deployment(v));
    out.push(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": CONTROLLER, "namespace": NAMESPACE},
        // Replicas that are not ready (a bad issuer, a crash loop) may still
        // be evicted: otherwise they would hold every drain of their nodes.
        "spec": {"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                 "selector": {"matchLabels": labels()}},
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": CONTROLLER, "namespace": NAMESPACE, "labels": labels()},
        "spec": {"selector": labels(), "ports": [
            {"name": "grpc", "port": 8090, "targetPort": "grpc"},
            {"name": "webhook", "port": 443, "targetPort": "webhook"},
            {"name": "admin", "port": 9990, "targetPort": "admin"},
        ]},
    }));
    out.push(webhook_configuration(&v.identity.anchors_pem));
    out.push(validation_configuration(&v.identity.anchors_pem));
    Ok(out)
}

fn rbac() -> Vec<Value> {
    let read = json!(["get", "list", "watch"]);
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": CONTROLLER, "namespace": NAMESPACE}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": CONTROLLER},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "pods", "nodes"], "verbs": read},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
                {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"], "verbs": read},
                {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes/status", "grpcroutes/status"], "verbs": ["patch"]},
                {"apiGroups": ["policy.strait.dev"], "resources": ["authorizationpolicies", "backendpolicies"], "verbs": read},
                {"apiGroups": ["policy.strait.dev"], "resources": ["authorizationpolicies/status", "backendpolicies/status"], "verbs": ["patch"]},
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["get", "list"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": CONTROLLER},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROLLER},
            "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": NAMESPACE}],
        }),
        // strait's policies for Kubernetes' own user-facing roles, as
        // cert-manager's are: a namespace's admins and editors write them
        // there (as its NetworkPolicies), its viewers read them (which
        // policy answers their callers 403), with no binding of the
        // platform team's.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "strait-edit", "labels": {
                "rbac.authorization.k8s.io/aggregate-to-admin": "true",
                "rbac.authorization.k8s.io/aggregate-to-edit": "true"}},
            "rules": [{"apiGroups": ["policy.strait.dev"], "resources": ["authorizationpolicies", "backendpolicies"],
                       "verbs": ["create", "delete", "deletecollection", "patch", "update"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "strait-view", "labels": {
                "rbac.authorization.k8s.io/aggregate-to-admin": "true",
                "rbac.authorization.k8s.io/aggregate-to-edit": "true",
                "rbac.authorization.k8s.io/aggregate-to-view": "true"}},
            "rules": [{"apiGroups": ["policy.strait.dev"], "resources": ["authorizationpolicies", "backendpolicies"],
                       "verbs": read}],
        }),
        // The leader lease lives in the controller's namespace only.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": CONTROLLER, "namespace": NAMESPACE},
            "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                       "verbs": ["create"]},
                      {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                       "resourceNames": [crate::kubernetes::lease::LEASE_NAME], "verbs": ["get", "update"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": CONTROLLER, "namespace": NAMESPACE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROLLER},
            "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": NAMESPACE}],
        }),
    ]
}

/// A hash of the public identity (anchors and issuer certificate) on the
/// controller's pod template: applying a new identity restarts the
/// controllers, which read it only at start. The chart computes the same.
pub fn identity_checksum(id: &Identity) -> String {
    let both = format!("{}{}", id.anchors_pem, id.issuer_cert_pem);
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, both.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn deployment(v: &Values) -> Value {
    let probe =
        |path: &str| json!({"httpGet": {"path": path, "port": "admin"}, "periodSeconds": 10});
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": CONTROLLER, "namespace": NAMESPACE, "labels": labels()},
        "spec": {
            "replicas": v.replicas,
            "selector": {"matchLabels": labels()},
            "template": {
                "metadata": {"labels": pod_labels(),
                             "annotations": {"strait.dev/identity-checksum": identity_checksum(&v.identity)}},
                "spec": {
                    "serviceAccountName": CONTROLLER,
                    // A Linux program: a mixed cluster's Windows nodes,
                    // often untainted, would take a replica that never
                    // starts (and the disruption budget with it).
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    // The image's user (2103), not a fixed one: OpenShift's
                    // restricted SCC gives pods a uid of the namespace's range
                    // and refuses any other.
                    "securityContext": {"runAsNonRoot": true,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    // Replicas on different nodes where the cluster has them.
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                            "labelSelector": {"matchLabels": labels()}},
                    }]}},
                    "containers": [{
                        "name": "controller",
                        "image": v.controller_image,
                        "imagePullPolicy": v.controller_pull_policy.as_deref().unwrap_or(DEFAULT_PULL_POLICY),
                        "args": controller_args(v),
                        "env": [
                            {"name": "STRAIT_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "STRAIT_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        ],
                        "ports": [
                            {"name": "grpc", "containerPort": 8090},
                            {"name": "webhook", "containerPort": 8443},
                            {"name": "admin", "containerPort": 9990},
                        ],
                        "readinessProbe": probe("/ready"),
                        "livenessProbe": probe("/live"),
                        "resources": v.controller_resources.clone().unwrap_or_else(default_controller_resources),
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [
                            {"name": "issuer", "mountPath": "/var/run/strait/issuer", "readOnly": true},
                            {"name": "trust-anchors", "mountPath": "/var/run/strait/trust-anchors", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "issuer", "secret": {"secretName": ISSUER_SECRET}},
                        {"name": "trust-anchors", "configMap": {"name": ANCHORS_CONFIG_MAP}},
                    ],
                },
            },
        },
    })
}

/// The controller container's resources unless the installed ones differ.
fn default_controller_resources() -> Value {
    json!({"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}})
}

const DEFAULT_PULL_POLICY: &str = "IfNotPresent";

/// Not a pod for Windows nodes, as `inject` reads it: by `os.name`, a node
/// selector, or a required node affinity whose every term asks for Windows.
const NOT_WINDOWS: &str = "!(has(object.spec.os) && has(object.spec.os.name) && object.spec.os.name == 'windows') && !(has(object.spec.nodeSelector) && 'kubernetes.io/os' in object.spec.nodeSelector && object.spec.nodeSelector['kubernetes.io/os'] == 'windows') && !(has(object.spec.affinity) && has(object.spec.affinity.nodeAffinity) && has(object.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution) && size(object.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms) > 0 && object.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms.all(t, has(t.matchExpressions) && t.matchExpressions.exists(e, e.key == 'kubernetes.io/os' && e.operator == 'In' && has(e.values) && !('linux' in e.values))))";

/// The pods the injector would leave alone, as CEL: those on the host's
/// network or its DNS, on EKS Fargate, Windows pods, those injected already (`strait inject`, or a reinvocation)
/// and in no other mesh, and
/// those whose annotation opts out.
fn match_conditions() -> Value {
    json!([
        {"name": "not-host-network",
         "expression": "!has(object.spec.hostNetwork) || !object.spec.hostNetwork"},
        {"name": "not-node-dns",
         "expression": "!has(object.spec.dnsPolicy) || object.spec.dnsPolicy != 'Default'"},
        {"name": "not-fargate",
         "expression": "!has(object.spec.schedulerName) || object.spec.schedulerName != 'fargate-scheduler'"},
        {"name": "not-windows", "expression": NOT_WINDOWS},
        {"name": "not-injected-or-in-another-mesh", "expression": not_injected_or_in_another_mesh()},
        {"name": "not-opted-out",
         "expression": "!(has(object.metadata.annotations) && 'strait.dev/inject' in object.metadata.annotations && object.metadata.annotations['strait.dev/inject'] == 'disabled')"},
    ])
}

/// Injected pods are not sent, unless another mesh has claimed them too (a
/// manifest from `strait inject` given Istio's or Linkerd's sidecar by their
/// injectors): the injector refuses those, with the reason.
fn not_injected_or_in_another_mesh() -> String {
    let has = |names: &str| {
        format!(
            "object.spec.containers.exists(c, c.name {names}) || (has(object.spec.initContainers) && object.spec.initContainers.exists(c, c.name {names}))"
        )
    };
    let others = crate::inject::OTHER_MESHES
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "!({}) || {} || (has(object.metadata.labels) && 'istio.io/dataplane-mode' in object.metadata.labels && object.metadata.labels['istio.io/dataplane-mode'] == 'ambient')",
        has("== 'strait-proxy'"),
        has(&format!("in [{others}]"))
    )
}

/// A pod of a namespace not labelled for injection is injected only when
/// its own annotation (any value but `disabled`, which is checked) or label
/// (`enabled`) asks, as `inject::inject` reads them; one injected already
/// (`strait inject` writes `strait.dev/inbound-port`) is looked at for
/// another mesh's sidecar (`not-injected-or-in-another-mesh` sends only those).
const ASKS_FOR_IT: &str = "(has(object.metadata.annotations) && ('strait.dev/inject' in object.metadata.annotations || 'strait.dev/inbound-port' in object.metadata.annotations)) || (has(object.metadata.labels) && 'strait.dev/inject' in object.metadata.labels && object.metadata.labels['strait.dev/inject'] == 'enabled')";

/// Two webhooks, as the injector reads them (`inject::webhook`): pods of
/// labelled namespaces always, other pods (outside the system namespaces) when
/// their own annotation or label asks.
fn webhook_configuration(anchors_pem: &str) -> Value {
    use base64::Engine as _;
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(anchors_pem.as_bytes());
    let hook = |name: &str, path: &str, selector: Value, failure: &str, conditions: Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure,
            "timeoutSeconds": 10,
            "reinvocationPolicy": "IfNeeded",
            "clientConfig": {"caBundle": ca_bundle, "service": {"name": CONTROLLER, "namespace": NAMESPACE, "path": path, "port": 443}},
            "namespaceSelector": selector,
            "objectSelector": {"matchExpressions": [{"key": "strait.dev/inject", "operator": "NotIn", "values": ["disabled"]}]},
            // What the injector leaves alone is not sent at all: while no
            // controller answers, the fail-closed hook would refuse it.
            "matchConditions": conditions,
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIG},
        "webhooks": [
            // Fail closed, but never on the system's or the mesh's own pods,
            // whatever their namespace's labels: a controller that could only
            // be admitted by a running controller would never come back.
            hook("namespace.inject.strait.dev", crate::inject::webhook::ENABLED_NAMESPACE_PATH,
                 json!({"matchLabels": {"strait.dev/inject": "enabled"},
                        "matchExpressions": [not_system()]}), "Fail", match_conditions()),
            hook("pod.inject.strait.dev", crate::inject::webhook::PATH,
                 json!({"matchExpressions": [
                     {"key": "strait.dev/inject", "operator": "NotIn", "values": ["enabled", "disabled"]},
                     not_system(),
                 ]}), "Ignore", {
                     // Only the pods that ask: the API server would otherwise
                     // wait on the controller for every pod of the cluster.
                     let mut c = match_conditions();
                     if let Some(list) = c.as_array_mut() {
                         list.push(json!({"name": "asks-for-it", "expression": ASKS_FOR_IT}));
                     }
                     c
                 }),
        ],
    })
}

/// Policies are checked as the controller parses them (`inject::validate`),
/// so a misspelt or invalid one fails at apply. Fail closed: while no
/// controller answers, a policy cannot be created or changed (a clear error
/// to retry), rather than stored unchecked; deletes are never held up, nor
/// (`SPEC_CHANGED`) a change of its metadata alone: a finalizer the garbage
/// collector removes, a label GitOps sets.
fn validation_configuration(anchors_pem: &str) -> Value {
    use base64::Engine as _;
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(anchors_pem.as_bytes());
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": VALIDATION_CONFIG},
        "webhooks": [{
            "name": "validate.policy.strait.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "clientConfig": {"caBundle": ca_bundle, "service": {"name": CONTROLLER, "namespace": NAMESPACE, "path": crate::inject::validate::PATH, "port": 443}},
            "matchConditions": [{"name": "spec-changed", "expression": SPEC_CHANGED}],
            "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": ["policy.strait.dev"], "apiVersions": ["*"],
                       "resources": ["authorizationpolicies", "backendpolicies"], "scope": "Namespaced"}],
        }],
    })
}

/// A policy's create, or an update of its spec: the API server asks the
/// validator only then, so that a foreground deletion's finalizer, removed by
/// the garbage collector, is not held up by a controller that is down.
pub const SPEC_CHANGED: &str = "request.operation == 'CREATE' || !has(object.spec) || !has(oldObject.spec) || object.spec != oldObject.spec";

/// Namespaces no webhook of the mesh's sees, by name (which the API server
/// sets, so no label can take it off).
fn not_system() -> Value {
    let [system, lease] = crate::defaults::SYSTEM_NAMESPACES;
    json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
           "values": [system, lease, NAMESPACE]})
}

#[derive(Debug, Default, clap::Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
    /// Print the objects even though meshed pods still run, or the cluster
    /// cannot be asked: with the controller gone their proxies get no
    /// certificate, and each leaves its Services when the one it holds
    /// expires (the first some 6 h later).
    #[arg(long)]
    pub force: bool,
}

/// `strait uninstall`: what the install made (below), once no meshed pod is
/// left running, as `linkerd uninstall` asks. A pod keeps its sidecar until
/// it is recreated, and a pod restarted in place after the controller went
/// (a node's reboot) redirects its traffic to a proxy that can never start,
/// and its app never starts either.
pub async fn uninstall(args: &UninstallArgs) -> anyhow::Result<String> {
    if !args.force && args.cluster.named() {
        let cannot = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "cannot tell whether meshed pods still run ({e}); pass --force to print the objects anyway"
            )
        };
        let (client, name) = args.cluster.client_or(cannot).await?;
        eprintln!("strait uninstall: looking for meshed pods in the cluster at {name}");
        let meshed = meshed_pods(client).await.map_err(|e| cannot(&e))?;
        if meshed.pods.count > 0 {
            anyhow::bail!(
                "{} meshed pod(s) still run ({}): take the strait.dev/inject label off their namespaces (and the annotation off their templates) and restart them first (docs/kubernetes.md, \"Uninstalling\"), or pass --force. With the controller gone their proxies get no certificate, and each pod leaves its Services once the one it holds expires",
                meshed.pods.count,
                meshed.pods
            );
        }
    }
    uninstall_objects()
}

/// What `strait install` made, for `strait uninstall | kubectl delete
/// --ignore-not-found -f -`: each object by its kind and name, in the order
/// that leaves nothing refusing in between. The webhooks go first: both fail
/// closed, and once their controller is gone they would refuse every pod of
/// the labelled namespaces and every policy change, cluster-wide. The
/// namespace goes last. The CRDs are left out: deleting them deletes every
/// policy of every namespace (`strait crds | kubectl delete -f -` does that).
pub fn uninstall_objects() -> anyhow::Result<String> {
    let names = Values::blank();
    let docs = objects(&names)?
        .into_iter()
        .rev()
        .filter(|o| o["kind"] != "CustomResourceDefinition")
        .map(|o| {
            let mut metadata = serde_json::Map::new();
            for key in ["name", "namespace"] {
                if let Some(v) = o["metadata"].get(key) {
                    metadata.insert(key.to_string(), v.clone());
                }
            }
            serde_norway::to_string(&json!({
                "apiVersion": o["apiVersion"], "kind": o["kind"], "metadata": metadata,
            }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(docs.join("---\n"))
}

/// The YAML stream.
pub fn render(v: &Values) -> anyhow::Result<String> {
    let docs = objects(v)?
        .iter()
        .map(serde_norway::to_string)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(docs.join("---\n"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Flags set by hand on the installed controller that an install does
    /// not write (a webhook failure policy for a cluster that needs it, a
    /// webhook certificate of cert-manager's) are named: applied, an upgrade
    /// would drop them unseen.
    #[test]
    fn controller_flags_set_by_hand_are_named_where_an_install_drops_them() {
        let controller = serde_json::from_value::<k8s_openapi::api::apps::v1::Deployment>(json!({
            "spec": {"replicas": 2, "selector": {}, "template": {"spec": {"containers": [
                {"name": "controller", "args": [
                    "controller", "--kubernetes", "--trust-domain=cluster.local",
                    "--webhook-failure-policy=ignore", "--cert-lifetime", "48h",
                    // Written by an install with telemetry, and by the chart.
                    "--otlp-endpoint=http://c:4317", "--log-level=debug",
                ]},
            ]}}}
        }))
        .unwrap();
        let i = installed(None, None, Some(controller)).unwrap().unwrap();
        let installed_args = i.controller_args.clone();
        // Settings put back to their defaults are not flags set by hand.
        let new = controller_args(&install_args(&["--reset-settings"]).values(Some(i)).unwrap());
        assert!(!new.iter().any(|a| a.starts_with("--otlp-endpoint")));
        // The chart's --log-level is dropped too, and said; the telemetry
        // --reset-settings drops is as asked.
        assert_eq!(
            flags_dropped(&installed_args, &new, RESET_BY_SETTINGS),
            ["--webhook-failure-policy", "--cert-lifetime", "--log-level"]
        );
        assert!(flags_dropped(&new, &new, &[]).is_empty());
    }

    /// The controller's resources and pull policy set on its Deployment (a
    /// large cluster's controller given 2 GiB, by hand or the chart's values)
    /// are kept by an upgrade: put back to 512 MiB, its new replicas were
    /// killed for memory and the rollout stalled. An install's own read back
    /// as its own, and `--reset-settings` drops them.
    #[test]
    fn the_controllers_resources_set_on_its_deployment_are_kept() {
        let of = |resources: Value, pull: &str| {
            let d = json!({"spec": {"selector": {}, "template": {"spec": {"containers": [
                {"name": "controller", "args": ["--trust-domain=cluster.local"],
                 "resources": resources, "imagePullPolicy": pull},
            ]}}}});
            let d = serde_json::from_value::<k8s_openapi::api::apps::v1::Deployment>(d).unwrap();
            installed(None, None, Some(d)).unwrap().unwrap()
        };
        let container = |flags: &[&str], i: Installed| {
            let d = deployment(&install_args(flags).values(Some(i)).unwrap());
            d["spec"]["template"]["spec"]["containers"][0].clone()
        };
        let raised =
            json!({"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}});
        let c = container(&[], of(raised.clone(), "Always"));
        assert_eq!(c["resources"], raised);
        assert_eq!(c["imagePullPolicy"], "Always");
        let c = container(&["--reset-settings"], of(raised, "Always"));
        assert_eq!(c["resources"], default_controller_resources());
        assert_eq!(c["imagePullPolicy"], DEFAULT_PULL_POLICY);
        let own = of(default_controller_resources(), DEFAULT_PULL_POLICY);
        assert!(own.controller_resources.is_none() && own.controller_pull_policy.is_none());
    }

    /// An install whose identity objects were deleted (for a new identity)
    /// keeps its trust domain and settings: a trust domain back to the
    /// default would cut the running proxies off.
    #[test]
    fn an_install_without_its_identity_keeps_its_settings() {
        let controller = serde_json::from_value::<k8s_openapi::api::apps::v1::Deployment>(json!({
            "spec": {"replicas": 3, "selector": {}, "template": {"spec": {"containers": [
                {"name": "controller", "args": ["--trust-domain=corp.example", "--proxy-iptables-mode=legacy"]},
            ]}}}
        }))
        .unwrap();
        let i = installed(None, None, Some(controller))
            .unwrap()
            .expect("the controller's settings");
        assert!(i.identity.is_none(), "a new identity is made");
        assert_eq!(i.trust_domain.as_deref(), Some("corp.example"));
        assert_eq!(i.iptables_mode, Some(crate::inject::IptablesMode::Legacy));
        assert_eq!(i.replicas, Some(3));
        assert!(installed(None, None, None).unwrap().is_none());
        // One of the two is no identity to keep or replace: refused.
        let anchors = k8s_openapi::api::core::v1::ConfigMap::default();
        assert!(installed(None, Some(anchors), None).is_err());
    }

    /// The settings read back from the controller's variables are the ones
    /// it reads: each of its flags is a `STRAIT_*` variable.
    #[test]
    fn every_controller_flag_is_the_variable_read_back() {
        use clap::Args;
        let cmd = crate::controller::ControllerArgs::augment_args(clap::Command::new("controller"));
        for a in cmd.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            let want = format!("STRAIT_{}", long.replace('-', "_").to_uppercase());
            assert_eq!(
                a.get_env().and_then(|e| e.to_str()),
                Some(want.as_str()),
                "--{long}"
            );
        }
    }

    fn install_args(flags: &[&str]) -> InstallArgs {
        use clap::{Args, FromArgMatches};
        let cmd = InstallArgs::augment_args(clap::Command::new("install"));
        let m = cmd
            .try_get_matches_from(std::iter::once("install").chain(flags.iter().copied()))
            .unwrap();
        InstallArgs::from_arg_matches(&m).unwrap()
    }

    /// An install from a registry of the user's own (an air-gapped mirror)
    /// is upgraded to this release's images from that registry, and is told
    /// so (the public ones would not be pulled there; pinning the installed
    /// one would keep an earlier proxy under this injector); an install of
    /// the public images is upgraded without a word.
    #[test]
    fn installed_repositories_are_kept_and_said() {
        let args = install_args;
        let at = |registry: &str| {
            serde_json::from_value::<k8s_openapi::api::apps::v1::Deployment>(json!({
                "spec": {"selector": {}, "template": {"spec": {"containers": [
                    {"name": "controller", "image": format!("{registry}/strait:v0.0.9"),
                     "args": ["--trust-domain=cluster.local", format!("--proxy-image={registry}/strait-proxy:v0.0.9")]},
                ]}}}
            }))
            .unwrap()
        };
        let images = |a: &InstallArgs, controller: &k8s_openapi::api::apps::v1::Deployment| {
            let e = installed(None, None, Some(controller.clone()))
                .unwrap()
                .unwrap();
            a.images((e.controller_image, e.proxy_image))
        };
        let ours = env!("CARGO_PKG_VERSION");
        // A mirror of the user's own: this release from there, and said.
        let ((c, p), said) = images(&args(&[]), &at("registry.local"));
        assert_eq!(c, format!("registry.local/strait:v{ours}"));
        assert_eq!(p, format!("registry.local/strait-proxy:v{ours}"));
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said[0].contains("--controller-image"), "{}", said[0]);
        // Given again (or another on purpose): as given, nothing to say.
        let given = args(&[
            "--controller-image=registry.local/strait:v0.1.0",
            "--proxy-image=registry.local/strait-proxy:v0.2.0",
        ]);
        let ((c, p), said) = images(&given, &at("registry.local"));
        assert_eq!(
            (c.as_str(), p.as_str(), said.len()),
            (
                "registry.local/strait:v0.1.0",
                "registry.local/strait-proxy:v0.2.0",
                0
            )
        );
        // The public images of an earlier release: the upgrade asked for.
        let public = at("ghcr.io/strait-dev");
        let ((c, p), said) = images(&args(&[]), &public);
        assert_eq!(
            (c, p),
            (defaults::controller_image(), defaults::proxy_image())
        );
        assert!(said.is_empty(), "{said:?}");
        // Pinned by digest: the pin goes, and is said to.
        let mut pinned = public.clone();
        let spec = pinned
            .spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap();
        spec.containers[0].args = Some(vec![
            "--trust-domain=cluster.local".into(),
            "--proxy-image=ghcr.io/strait-dev/strait-proxy:v0.0.9@sha256:ab".into(),
        ]);
        let ((_, p), said) = images(&args(&[]), &pinned);
        assert_eq!(p, defaults::proxy_image());
        assert!(
            said.len() == 1
                && said[0].contains("strait-proxy:v0.0.9@sha256:ab is pinned by digest"),
            "{said:?}"
        );
        // Nothing installed: this release's public images.
        assert_eq!(
            args(&[]).images((None, None)).0,
            (defaults::controller_image(), defaults::proxy_image())
        );
    }

    /// An install edited by hand, or by a tool that splits flags from their
    /// values, still gives its settings to `strait inject`.
    #[test]
    fn settings_are_read_in_every_spelling_the_controller_takes() {
        use k8s_openapi::api::core::v1::EnvVar;
        let var = |n: &str, v: &str| EnvVar {
            name: n.into(),
            value: Some(v.into()),
            value_from: None,
        };
        let deployment = |args: &[&str], env: Vec<EnvVar>| {
            serde_json::from_value::<k8s_openapi::api::apps::v1::Deployment>(json!({
                "spec": {"selector": {}, "template": {"spec": {"containers": [
                    {"name": "sidecar", "args": ["--trust-domain=wrong"]},
                    {"name": "controller", "args": args, "env": env},
                ]}}}
            }))
            .unwrap()
        };
        let a = settings_of(
            Some(deployment(
                &[
                    "controller",
                    "--trust-domain",
                    "corp.example",
                    "--proxy-image=old/proxy:1",
                    "--proxy-image=registry.local/proxy:2",
                    "--proxy-access-log",
                    "json",
                ],
                vec![
                    var("STRAIT_TRUST_DOMAIN", "from-env"),
                    var("STRAIT_PROXY_OTLP_ENDPOINT", "http://collector:4317"),
                    var("STRAIT_PROXY_TRACE_SAMPLING", "0.25"),
                ],
            )),
            "test",
        );
        // Arguments win over the environment, and the last of a flag wins.
        assert_eq!(a.trust_domain.as_deref(), Some("corp.example"));
        assert_eq!(a.proxy_image.as_deref(), Some("registry.local/proxy:2"));
        assert_eq!(
            a.telemetry.proxy_access_log,
            Some(crate::inject::AccessLog::Json)
        );
        assert_eq!(
            a.telemetry.proxy_otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
        assert_eq!(a.telemetry.proxy_trace_sampling.as_deref(), Some("0.25"));
        // A flag that is only a prefix of another is not it, and a flag with
        // no value after it is not given.
        let a = settings_of(
            Some(deployment(
                &["--proxy-image-pull-policy=Always", "--proxy-image"],
                vec![],
            )),
            "test",
        );
        assert_eq!(a.proxy_image, None);
        assert_eq!(a.trust_domain, None);
        // An endpoint an earlier release took with credentials in it is left
        // out: the new controller and proxies would refuse it at start.
        let a = settings_of(
            Some(deployment(
                &["--proxy-otlp-endpoint=http://u:p@collector:4317"],
                vec![],
            )),
            "test",
        );
        assert_eq!(a.telemetry.proxy_otlp_endpoint, None);
    }

    /// Neither webhook, the fail-closed one included, sees the system's or the
    /// mesh's own namespace, whatever labels those carry.
    #[test]
    fn no_webhook_sees_the_system_or_the_mesh_namespace() {
        let config = webhook_configuration("anchors");
        let hooks = config["webhooks"].as_array().unwrap();
        assert_eq!(hooks.len(), 2);
        for hook in hooks {
            let excluded = hook["namespaceSelector"]["matchExpressions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["key"] == "kubernetes.io/metadata.name")
                .unwrap_or_else(|| panic!("{} selects by name", hook["name"]));
            assert_eq!(excluded["operator"], "NotIn");
            for ns in ["kube-system", "kube-node-lease", NAMESPACE] {
                assert!(
                    excluded["values"].as_array().unwrap().contains(&json!(ns)),
                    "{} sees {ns}",
                    hook["name"]
                );
            }
        }
    }

    /// A namespace's admins and editors may write strait's policies there,
    /// and its viewers read them, through Kubernetes' own roles.
    #[test]
    fn the_user_facing_roles_take_straits_policies() {
        let objects = objects_of_an_install();
        let role = |name: &str| {
            (objects.iter())
                .find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("no ClusterRole {name}"))
                .clone()
        };
        let aggregated = |r: &Value, to: &str| {
            r["metadata"]["labels"][format!("rbac.authorization.k8s.io/aggregate-to-{to}")]
                == "true"
        };
        let grants = |r: &Value, verb: &str| {
            r["rules"].as_array().unwrap().iter().any(|rule| {
                rule["apiGroups"] == json!(["policy.strait.dev"])
                    && rule["resources"] == json!(["authorizationpolicies", "backendpolicies"])
                    && rule["verbs"].as_array().unwrap().iter().any(|v| v == verb)
            })
        };
        let (edit, view) = (role("strait-edit"), role("strait-view"));
        assert!(
            aggregated(&edit, "admin") && aggregated(&edit, "edit") && !aggregated(&edit, "view")
        );
        assert!(grants(&edit, "create") && grants(&edit, "delete"));
        assert!(
            ["admin", "edit", "view"]
                .iter()
                .all(|to| aggregated(&view, to))
        );
        assert!(grants(&view, "list") && !grants(&view, "create"));
    }

    /// Uninstalling removes the fail-closed webhooks before anything they
    /// need (their controller, its Service) and the namespace last, names
    /// every other object the install made, leaves the CRDs (and with them
    /// every policy), and carries no key.
    #[test]
    fn uninstall_takes_the_webhooks_out_first_and_the_namespace_last() {
        let out = uninstall_objects().unwrap();
        let objects: Vec<Value> = out
            .split("---\n")
            .map(|d| serde_norway::from_str(d).unwrap())
            .collect();
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            &kinds[..2],
            [
                "ValidatingWebhookConfiguration",
                "MutatingWebhookConfiguration"
            ]
        );
        assert_eq!(kinds.last(), Some(&"Namespace"));
        let named = |o: &Value| {
            (
                o["kind"].as_str().unwrap().to_string(),
                o["metadata"]["name"].as_str().unwrap().to_string(),
            )
        };
        let mut installed: Vec<_> = objects_of_an_install()
            .iter()
            .filter(|o| o["kind"] != "CustomResourceDefinition")
            .map(named)
            .collect();
        let mut removed: Vec<_> = objects.iter().map(named).collect();
        installed.sort();
        removed.sort();
        assert_eq!(removed, installed);
        assert!(
            !out.contains("PRIVATE KEY") && !out.contains("stringData"),
            "{out}"
        );
    }

    fn objects_of_an_install() -> Vec<Value> {
        objects(&Values {
            identity: Identity {
                anchors_pem: "anchors".into(),
                issuer_cert_pem: "cert".into(),
                issuer_key_pem: "-----BEGIN PRIVATE KEY-----".into(),
            },
            ..Values::blank()
        })
        .unwrap()
    }

    /// The controller is never meshed, whoever injects what.
    #[test]
    fn the_controllers_pods_say_they_are_never_meshed() {
        let d = deployment(&Values {
            controller_image: "c".into(),
            proxy_image: "p".into(),
            replicas: 2,
            ..Values::blank()
        });
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        assert_eq!(labels["strait.dev/inject"], "disabled");
        let pod = &d["spec"]["template"];
        // Nor scheduled where it could not start.
        assert_eq!(
            pod["spec"]["nodeSelector"],
            json!({"kubernetes.io/os": "linux"})
        );
        let s = crate::inject::Settings::with_anchors("anchors".into());
        assert!(matches!(
            crate::inject::inject(pod, crate::inject::Namespace::Enabled, &s),
            Ok(crate::inject::Outcome::Skip(_))
        ));
    }

    /// An injected pod is not sent to the injector, unless another mesh has
    /// claimed it too (the injector refuses it).
    #[test]
    fn injected_pods_are_sent_only_when_another_mesh_claimed_them() {
        let conditions = match_conditions();
        let c = conditions
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "not-injected-or-in-another-mesh")
            .unwrap();
        let e = c["expression"].as_str().unwrap();
        for name in crate::inject::OTHER_MESHES {
            assert!(e.contains(&format!("'{name}'")), "{name}: {e}");
        }
        assert!(e.starts_with("!(object.spec.containers.exists(c, c.name == 'strait-proxy')"));
        assert!(e.contains("'istio.io/dataplane-mode'"));
    }

    /// Pods the injector skips for where they run are not sent either: the
    /// fail-closed hook would refuse them while no controller answers.
    #[test]
    fn pods_skipped_for_where_they_run_are_not_sent() {
        let conditions = match_conditions();
        let expr = |name: &str| {
            conditions
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap()["expression"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert!(expr("not-fargate").contains("'fargate-scheduler'"));
        let windows = expr("not-windows");
        for field in [
            "object.spec.os.name",
            "object.spec.nodeSelector",
            "nodeSelectorTerms.all(",
        ] {
            assert!(windows.contains(field), "{field}: {windows}");
        }
    }

    /// The fail-closed validator is asked of a create or a spec changed
    /// only: a foreground deletion's finalizer, which the garbage collector
    /// removes by an update, is not held up while no controller answers.
    #[test]
    fn the_validator_is_asked_only_of_specs() {
        let config = validation_configuration("anchors");
        let hook = &config["webhooks"][0];
        assert_eq!(hook["failurePolicy"], "Fail");
        assert_eq!(
            hook["matchConditions"],
            json!([{"name": "spec-changed", "expression": SPEC_CHANGED}])
        );
        assert!(SPEC_CHANGED.contains("object.spec != oldObject.spec"));
    }

    /// Outside labelled namespaces only the pods that ask are sent: the API
    /// server does not wait on the controller for the rest of the cluster.
    #[test]
    fn the_opt_in_webhook_sees_only_pods_that_ask() {
        let config = webhook_configuration("anchors");
        let asks = |hook: &Value| {
            hook["matchConditions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "asks-for-it" && c["expression"] == ASKS_FOR_IT)
        };
        let hooks = config["webhooks"].as_array().unwrap();
        assert!(!asks(&hooks[0]), "every pod of a labelled namespace");
        assert_eq!(hooks[1]["name"], "pod.inject.strait.dev");
        assert!(asks(&hooks[1]));
    }
}
