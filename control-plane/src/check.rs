//! `strait check`: is strait installed and working on this cluster? One line
//! per check, `ok`, `warn` or `FAIL`, and a non-zero exit when any fails.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, LimitRange, Namespace, Node, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion,
};
use kube::api::{Api, ListParams};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certificate::X509Certificate;

use crate::install::{
    ANCHORS_CONFIG_MAP, CONTROLLER, ISSUER_SECRET, VALIDATION_CONFIG, WEBHOOK_CONFIG,
};

/// Certificates closer than this to their end are a warning.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
    /// The namespace strait is installed in.
    #[arg(long, default_value = crate::defaults::CONTROLLER_NAMESPACE)]
    pub namespace: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// One check's outcome.
#[derive(Debug)]
pub struct Line {
    pub verdict: Verdict,
    pub what: String,
    /// Not made: the credentials could not read what it needed.
    pub unchecked: bool,
}

fn line(verdict: Verdict, what: impl Into<String>) -> Line {
    Line {
        verdict,
        what: what.into(),
        unchecked: false,
    }
}

/// Runs every check, printing each as it completes; fails when any fails.
pub async fn run(args: &CheckArgs) -> anyhow::Result<()> {
    let lines = checks(args).await;
    crate::output::print(format_args!(
        "{}\n",
        summary(&lines).map_err(anyhow::Error::msg)?
    ));
    Ok(())
}

/// The last word: "working" only when every check was made.
fn summary(lines: &[Line]) -> Result<String, String> {
    let failed = lines.iter().filter(|l| l.verdict == Verdict::Fail).count();
    if failed > 0 {
        return Err(format!("{failed} check(s) failed"));
    }
    match lines.iter().filter(|l| l.unchecked).count() {
        0 => Ok("strait is installed and working".into()),
        n => Ok(format!(
            "strait is installed; {n} check(s) could not be made with these credentials (above)"
        )),
    }
}

async fn checks(args: &CheckArgs) -> Vec<Line> {
    let mut out = Vec::new();
    let mut say = |l: Line| {
        let tag = match l.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        crate::output::print(format_args!("[{tag}] {}\n", l.what));
        out.push(l);
    };
    let client = match args.cluster.client().await {
        Ok((c, name)) => {
            crate::output::print(format_args!("checking the cluster at {name}\n"));
            c
        }
        Err(e) => {
            say(line(
                Verdict::Fail,
                format!(
                    "no Kubernetes configuration (--kubeconfig, KUBECONFIG or in-cluster): {e:#}"
                ),
            ));
            return out;
        }
    };
    match client.apiserver_version().await {
        Ok(v) if supports_native_sidecars(&v.major, &v.minor) => say(line(
            Verdict::Ok,
            format!("the Kubernetes API answers (version {})", v.git_version),
        )),
        Ok(v) => say(line(
            Verdict::Fail,
            format!(
                "Kubernetes {} is too old: injected proxies are native sidecars, which need 1.29 or later",
                v.git_version
            ),
        )),
        Err(e) => {
            say(line(
                Verdict::Fail,
                format!("the Kubernetes API does not answer: {e}"),
            ));
            return out;
        }
    }

    // The API server may be newer than the kubelets (up to three minors): a
    // kubelet before 1.29 runs the proxy as an init container that never
    // ends, and the pods scheduled there never start.
    say(match kubelets(&client).await {
        Ok(kubelets) => nodes_line(&kubelets),
        Err(e) => unread("the nodes (kubelet versions)", &e),
    });

    // Cilium's configuration, where Cilium is the network: absent elsewhere.
    let cilium: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    match cilium.get_opt(CILIUM_CONFIG).await {
        Ok(Some(cm)) => {
            if let Some(l) = cilium_line(&cm.data.unwrap_or_default()) {
                say(l);
            }
        }
        Ok(None) => {}
        Err(e) => say(unread(&format!("kube-system/{CILIUM_CONFIG}"), &e)),
    }

    // Calico's, where its eBPF data plane runs: the same balancing at
    // connect() as Cilium's. Absent (a 404) where Calico is not.
    let felix = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("crd.projectcalico.org", "v1", "FelixConfiguration"),
        "felixconfigurations",
    );
    let felix: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &felix);
    match felix.get_opt("default").await {
        Ok(Some(f)) => {
            if let Some(l) = calico_line(&f.data["spec"]) {
                say(l);
            }
        }
        Ok(None) => {}
        Err(e) => say(unread("Calico's FelixConfiguration default", &e)),
    }

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "authorizationpolicies.policy.strait.dev",
        "backendpolicies.policy.strait.dev",
    ] {
        say(match crds.get_opt(name).await {
            Ok(Some(crd)) if crate::crds::keeps_unknown_spec_fields(&crd) => {
                line(Verdict::Ok, format!("CRD {name} is installed"))
            }
            // Helm does not upgrade CRDs: one from before they kept unknown
            // fields has the API server drop a misspelt field before the
            // validator can refuse it.
            Ok(Some(_)) => line(
                Verdict::Fail,
                format!(
                    "CRD {name} is an earlier release's: a misspelt field is dropped rather than refused (strait crds | kubectl apply -f -)"
                ),
            ),
            Ok(None) => line(
                Verdict::Fail,
                format!("CRD {name} is missing (strait crds | kubectl apply -f -)"),
            ),
            Err(e) => unread(&format!("CRD {name}"), &e),
        });
    }
    say(
        match crds.get_opt("httproutes.gateway.networking.k8s.io").await {
            Ok(crd) => httproute_line(crd.as_ref()),
            Err(e) => unread("Gateway API's HTTPRoute CRD", &e),
        },
    );
    say(
        match crds.get_opt("grpcroutes.gateway.networking.k8s.io").await {
            Ok(crd) => grpcroute_line(crd.as_ref()),
            Err(e) => unread("Gateway API's GRPCRoute CRD", &e),
        },
    );

    let mut ns = args.namespace.clone();
    let mut controller = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get_opt(CONTROLLER)
        .await;
    // Where the injector's webhooks call their controller: with none where
    // asked and all calling one elsewhere (the chart's `namespace` value),
    // that install is checked, rather than six failures saying to install
    // again; with one here and a webhook calling elsewhere (another
    // install's), pods are admitted by that one, said.
    let called: Vec<String> = match Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(WEBHOOK_CONFIG)
        .await
    {
        Ok(Some(hook)) => (hook.webhooks.iter().flatten())
            .filter_map(|w| Some(w.client_config.service.as_ref()?.namespace.clone()))
            .collect(),
        _ => Vec::new(),
    };
    match (&controller, called.iter().find(|n| **n != ns)) {
        (Ok(None), Some(there)) if called.iter().all(|n| n == there) => {
            say(line(
                Verdict::Warn,
                format!(
                    "no controller in {ns}; the injector's webhook calls one in {there}: checking that install (strait check --namespace {there})"
                ),
            ));
            ns = there.clone();
            controller = Api::<Deployment>::namespaced(client.clone(), &ns)
                .get_opt(CONTROLLER)
                .await;
        }
        (_, Some(there)) => say(line(
            Verdict::Warn,
            format!(
                "the injector's webhook calls a controller in {there}, not in {ns}: pods are admitted there (strait check --namespace {there})"
            ),
        )),
        _ => {}
    }
    let ns = &ns;
    // A certificate of the operator's own (cert-manager's) for the webhooks,
    // whose caBundle then holds its CA, not the mesh's anchors.
    let installed = controller.as_ref().ok().and_then(Option::as_ref);
    let flag = |f: &str| installed.and_then(|d| crate::install::controller_flag(d, f));
    let own_webhook_cert = flag("--webhook-cert");
    let proxy_image = flag("--proxy-image");
    let proxy_resources = installed
        .map(crate::install::proxy_resources_of)
        .unwrap_or_default();
    say(match controller {
        Ok(Some(d)) => {
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let ready = d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            match ready {
                r if r >= want && rolling_out(&d) => line(
                    Verdict::Warn,
                    format!(
                        "the controller is ready on {r} of {want} replicas, but its rollout has not finished: pods of the current template are missing or not available (kubectl -n {ns} rollout status deploy/{CONTROLLER})"
                    ),
                ),
                0 => line(
                    Verdict::Fail,
                    format!(
                        "the controller has no ready replica (0 of {want}): kubectl -n {ns} describe deploy/{CONTROLLER}; kubectl -n {ns} logs deploy/{CONTROLLER}"
                    ),
                ),
                r if r < want => line(
                    Verdict::Warn,
                    format!("the controller is ready on {r} of {want} replicas"),
                ),
                r => line(
                    Verdict::Ok,
                    format!("the controller is ready ({r} of {want} replicas)"),
                ),
            }
        }
        Ok(None) => line(
            Verdict::Fail,
            format!(
                "no controller Deployment {ns}/{CONTROLLER} (strait install | kubectl apply -f -)"
            ),
        ),
        // Without it, nothing says strait is installed at all.
        Err(e) => line(
            Verdict::Fail,
            format!("the controller Deployment cannot be read: {e}"),
        ),
    });

    let anchors = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(ANCHORS_CONFIG_MAP)
        .await
        .map(|cm| cm.and_then(|cm| cm.data?.remove("ca.crt")));
    let issuer = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(ISSUER_SECRET)
        .await
        .map(|s| {
            s.and_then(|s| {
                let data = s.data?;
                let text = |k: &str| {
                    data.get(k)
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                };
                Some((text("tls.crt")?, text("tls.key")))
            })
        });
    say(match &anchors {
        Ok(Some(pem)) => {
            let issuer = issuer
                .as_ref()
                .ok()
                .and_then(|i| i.as_ref())
                .map(|(c, _)| c.as_str());
            anchors_expiry(pem, issuer)
        }
        Ok(None) => line(
            Verdict::Fail,
            format!("no trust anchors (ConfigMap {ns}/{ANCHORS_CONFIG_MAP}, key ca.crt)"),
        ),
        Err(e) => unread(&format!("ConfigMap {ns}/{ANCHORS_CONFIG_MAP}"), e),
    });
    say(match &issuer {
        Ok(Some((pem, _))) => expiry("the issuer", pem, true),
        Ok(None) => line(
            Verdict::Fail,
            format!("no issuer (Secret {ns}/{ISSUER_SECRET}, key tls.crt)"),
        ),
        Err(e) => unread(&format!("Secret {ns}/{ISSUER_SECRET}"), e),
    });
    if let (Ok(Some((issuer, _))), Ok(Some(anchors))) = (&issuer, &anchors) {
        say(chain_line(issuer, anchors));
    }
    // What the controller checks of it before it signs anything: a chain to
    // the anchors alone does not make an issuer.
    if let Ok(Some((crt, key))) = &issuer {
        say(match key {
            Some(key) => issuer_key_line(crt, key),
            None => line(
                Verdict::Fail,
                format!("the issuer has no key (Secret {ns}/{ISSUER_SECRET}, key tls.key)"),
            ),
        });
    }
    // Unread: the webhook's bundle cannot be compared with them.
    let anchors = anchors.ok();

    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    say(webhook_line(
        "the injector's webhook",
        hooks.get_opt(WEBHOOK_CONFIG).await.map(|h| {
            h.map(|h| {
                ca_bundles(
                    h.webhooks
                        .unwrap_or_default()
                        .into_iter()
                        .map(|w| w.client_config),
                )
            })
        }),
        anchors.as_ref(),
        own_webhook_cert.as_deref(),
        &format!("no MutatingWebhookConfiguration {WEBHOOK_CONFIG}: pods are not injected"),
        Verdict::Fail,
    ));
    let hooks: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    say(webhook_line(
        "the policy validator's webhook",
        hooks.get_opt(VALIDATION_CONFIG).await.map(|h| {
            h.map(|h| {
                ca_bundles(
                    h.webhooks
                        .unwrap_or_default()
                        .into_iter()
                        .map(|w| w.client_config),
                )
            })
        }),
        anchors.as_ref(),
        own_webhook_cert.as_deref(),
        &format!(
            "no ValidatingWebhookConfiguration {VALIDATION_CONFIG}: a misspelt policy is not refused at apply, and closes its namespace or is ignored instead"
        ),
        Verdict::Fail,
    ));
    // The API server calls the webhook through the Service: it answers only
    // if the Service has a ready endpoint.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let selector = format!("kubernetes.io/service-name={CONTROLLER}");
    say(
        match slices.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => {
                let ready = list
                    .items
                    .iter()
                    .flat_map(|s| &s.endpoints)
                    // Unset is ready, as the API defines it.
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                    .count();
                if ready > 0 {
                    line(
                        Verdict::Ok,
                        format!("the injector's Service has {ready} ready endpoint(s)"),
                    )
                } else {
                    line(
                        Verdict::Fail,
                        format!(
                            "the Service {ns}/{CONTROLLER} has no ready endpoint: the webhook cannot answer"
                        ),
                    )
                }
            }
            Err(e) => unread("the controller's endpoints", &e),
        },
    );

    // Pods Pod Security refuses never exist, so no count of pods shows them.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let enabled = ListParams::default().labels(&format!("{}=enabled", crate::inject::INJECT));
    let labelled = namespaces.list(&enabled).await;

    // The bundle every proxy should hold, as a set: the same certificates
    // however a PEM text spaces or orders them.
    let bundle = anchors
        .as_ref()
        .and_then(|a| a.as_deref())
        .and_then(anchor_set);
    // Pods refused at admission for the mesh's containers (a platform's
    // policy: OpenShift's SCC, GKE Autopilot, Kyverno) never exist as pods:
    // their ReplicaSets say why.
    if let Ok(list) = &labelled {
        let mut refused = Named::default();
        let mut unreadable = None;
        for ns in list.items.iter().filter_map(|n| n.metadata.name.as_deref()) {
            // A page at a time: each holds a pod template, and a Deployment
            // keeps ten old ones.
            let api = Api::<ReplicaSet>::namespaced(client.clone(), ns);
            let listed = each_listed(&api, 100, |out: &mut Vec<String>, rs| {
                out.extend(refused_for_the_mesh(rs));
            });
            match listed.await {
                Ok(found) => found.into_iter().for_each(|r| refused.push_named(|| r)),
                Err(e) => {
                    unreadable.get_or_insert((ns.to_string(), e));
                }
            }
        }
        if let Some((ns, e)) = unreadable {
            say(unread(&format!("the ReplicaSets of {ns}"), &e));
        }
        if let Some(l) = refused_line(&refused) {
            say(l);
        }
    }

    // Pods the injector would mesh that run without a proxy: created
    // before their namespace was labelled, or while the controller was
    // down (the webhook for a pod's own ask lets it through then).
    let asked = Asked {
        enabled: labelled
            .as_ref()
            .map(|l| labelled_as(&l.items, "enabled"))
            .unwrap_or_default(),
        disabled: namespaces
            .list(&ListParams::default().labels(&format!("{}=disabled", crate::inject::INJECT)))
            .await
            .map(|l| labelled_as(&l.items, "disabled"))
            .unwrap_or_default(),
        system: ns.clone(),
    };
    let listed = each_listed(
        &Api::<Pod>::all(client.clone()),
        PODS_PAGE,
        |(meshed, stale, other): &mut (MeshedPods, StaleAnchors, OtherProxies), p| {
            meshed.count(p);
            if asked.unmeshed(p) {
                meshed.unmeshed.push(p);
            }
            if let Some(b) = &bundle {
                stale.count(p, b);
            }
            if let Some(want) = &proxy_image {
                other.count(p, want);
            }
        },
    )
    .await;
    match listed {
        Ok((meshed, stale, other)) => {
            let mut l = meshed.line();
            // Labelled, and still none: the pods running then were not
            // restarted (injection happens only at a pod's creation).
            if meshed.meshed == 0
                && let Ok(list) = &labelled
                && !list.items.is_empty()
            {
                l.what = format!(
                    "no meshed pod yet, though {} namespace(s) are labelled {}=enabled: pods are meshed when created, so restart those that ran before (kubectl rollout restart)",
                    list.items.len(),
                    crate::inject::INJECT
                );
            }
            say(l);
            if let Some(l) = meshed.init_failed_line() {
                say(l);
            }
            if let Some(l) = meshed.uncaptured_line() {
                say(l);
            }
            if let Some(l) = meshed.unmeshed_line() {
                say(l);
            }
            if let Some(l) = stale.line(ns) {
                say(l);
            }
            if let Some(want) = &proxy_image
                && let Some(l) = other.line(want)
            {
                say(l);
            }
            match &labelled {
                Ok(list) => {
                    if let Some(l) = refusing_pod_security(&list.items, &meshed.namespaces) {
                        say(l);
                    }
                    if let Some(l) = also_in_ambient(&list.items) {
                        say(l);
                    }
                    let names: std::collections::HashSet<&str> = (list.items.iter())
                        .filter_map(|n| n.metadata.name.as_deref())
                        .collect();
                    if !names.is_empty() {
                        match Api::<LimitRange>::all(client.clone())
                            .list(&ListParams::default())
                            .await
                        {
                            Ok(ranges) => {
                                let labelled = ranges.items.iter().filter(|r| {
                                    r.metadata
                                        .namespace
                                        .as_deref()
                                        .is_some_and(|n| names.contains(n))
                                });
                                if let Some(l) = limit_ranges_refusing(
                                    labelled,
                                    &proxy_resources,
                                    &meshed.namespaces,
                                ) {
                                    say(l);
                                }
                            }
                            Err(e) => say(unread("the LimitRanges", &e)),
                        }
                    }
                }
                Err(e) => say(unread("the labelled namespaces", e)),
            }
        }
        Err(e) => say(unread("the pods", &e)),
    }

    // What strait did not take: a route that is not applied, a policy that
    // does not guard, which nothing above would show.
    let mut refused = Named::default();
    for kind in crate::kubernetes::Kind::ALL {
        let Some(ar) = kind.resource() else {
            continue;
        };
        let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &ar);
        let listed = each_listed(&api, PODS_PAGE, |out: &mut Named, o| {
            if let Some(why) = not_accepted(kind, o) {
                out.push_named(|| format!("{} {why}", ar.kind));
            }
        })
        .await;
        match listed {
            Ok(found) => refused.extend(found),
            // Its CRD not installed: nothing of the kind to take (said above).
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            // A check that can only warn does not fail for a list it missed.
            Err(e) => say(Line {
                unchecked: true,
                ..line(
                    Verdict::Warn,
                    format!("the {} cannot be read ({e}): not checked", ar.plural),
                )
            }),
        }
    }
    if let Some(l) = not_accepted_line(&refused) {
        say(l);
    }
    out
}

/// `namespace/name (via parent: reason: message)` when strait wrote
/// `Accepted: False` of the object's current generation: a route's under its
/// own parent entries (other controllers' are theirs), one object once,
/// naming the parents refused; a policy's in its conditions.
fn not_accepted(kind: crate::kubernetes::Kind, o: &kube::api::DynamicObject) -> Option<String> {
    let generation = o.metadata.generation.unwrap_or(0);
    let refused = |c: &&serde_json::Value| {
        c["type"] == "Accepted"
            && c["status"] == "False"
            && c["observedGeneration"]
                .as_i64()
                .is_none_or(|g| g >= generation)
    };
    let said = |c: &serde_json::Value| {
        let s = |k: &str| c[k].as_str().unwrap_or("");
        format!("{}: {}", s("reason"), crate::inject::clipped(s("message")))
    };
    let status = &o.data["status"];
    let why: Vec<String> = if kind.is_route() {
        (status["parents"].as_array().into_iter().flatten())
            .filter(|p| p["controllerName"] == crate::kubernetes::status::CONTROLLER_NAME)
            .filter_map(|p| {
                let c = p["conditions"].as_array()?.iter().find(refused)?;
                let r = &p["parentRef"];
                let port = r["port"]
                    .as_u64()
                    .map(|p| format!(":{p}"))
                    .unwrap_or_default();
                Some(format!(
                    "via {} {}{port}: {}",
                    r["kind"].as_str().unwrap_or("Service"),
                    r["name"].as_str().unwrap_or(""),
                    said(c)
                ))
            })
            .collect()
    } else {
        (status["conditions"].as_array().into_iter().flatten())
            .find(refused)
            .map(said)
            .into_iter()
            .collect()
    };
    (!why.is_empty()).then(|| {
        format!(
            "{}/{} ({})",
            o.metadata.namespace.as_deref().unwrap_or(""),
            o.metadata.name.as_deref().unwrap_or(""),
            why.join("; ")
        )
    })
}

/// The routes and policies strait did not accept, the first few named.
fn not_accepted_line(refused: &Named) -> Option<Line> {
    (refused.count > 0).then(|| {
        line(
            Verdict::Warn,
            format!(
                "{} route(s) or policy(ies) not accepted by strait, so not applied there (a route on a port callers carry as TCP by default is applied only by proxies whose --opaque-ports leave it out): {refused} (kubectl describe names each condition)",
                refused.count,
            ),
        )
    })
}

/// LimitRanges of labelled namespaces that the injected proxy, as the mesh's
/// resources make it, does not fit: every pod meshed there without
/// `strait.dev/proxy-*` annotations that fit is refused, with an error that
/// names no container, which its owners' own containers do not cause.
/// Where meshed pods run (annotated ones fit), a warning. As Kubernetes'
/// LimitRanger has it: a limit the proxy lacks is given a Container item's
/// `default` (the API server makes a `max` the default where none is
/// given) of any of its namespace's ranges, in no set order, and every
/// range then judges the pod.
fn limit_ranges_refusing<'a>(
    ranges: impl Iterator<Item = &'a LimitRange>,
    mesh: &crate::inject::ProxyResources,
    meshed_in: &std::collections::HashSet<String>,
) -> Option<Line> {
    use crate::inject::quantity;
    use k8s_openapi::api::core::v1::LimitRangeItem;
    type Quantities = Option<
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >;
    let get = |m: &Quantities, k: &str| {
        let q = m.as_ref()?.get(k)?;
        Some((q.0.clone(), quantity(&q.0)?))
    };
    let items = |r: &'a LimitRange| -> &'a [LimitRangeItem] {
        r.spec
            .as_ref()
            .map(|s| s.limits.as_slice())
            .unwrap_or_default()
    };
    let [requests, limits] = crate::inject::default_proxy_resources(mesh);
    let mut by_namespace = std::collections::BTreeMap::<&str, Vec<&LimitRange>>::new();
    for r in ranges {
        by_namespace
            .entry(r.metadata.namespace.as_deref().unwrap_or(""))
            .or_default()
            .push(r);
    }
    let mut refusing = Vec::new();
    let mut pods_run = false;
    for (ns, ranges) in by_namespace {
        for (k, (req_text, req)) in &requests {
            // The limits the proxy may end with: its own, or any default.
            let limit: Vec<(String, i128)> = match limits.get(k) {
                Some(own) => vec![own.clone()],
                None => (ranges.iter())
                    .flat_map(|r| items(r))
                    .filter(|i| i.type_ == "Container")
                    .filter_map(|i| get(&i.default, k).or_else(|| get(&i.max, k)))
                    .collect(),
            };
            for r in &ranges {
                let mut why = Vec::new();
                for item in items(r) {
                    let pod = item.type_ == "Pod";
                    if item.type_ != "Container" && !pod {
                        continue;
                    }
                    if let Some((max_text, max)) = get(&item.max, k)
                        && let Some((l_text, _)) = limit.iter().find(|(_, l)| *l > max)
                    {
                        // A pod's max is of its containers' sum, which the
                        // proxy's limit alone may pass.
                        let of = if pod { "its pod max" } else { "its max" };
                        let alone = if pod { " alone" } else { "" };
                        why.push(format!("{k} limit {l_text} above {of} {max_text}{alone}"));
                    }
                    if pod {
                        continue;
                    }
                    if let Some((min_text, min)) = get(&item.min, k)
                        && *req < min
                    {
                        why.push(format!("{k} request {req_text} below its min {min_text}"));
                    }
                    let ratio = get(&item.max_limit_request_ratio, k);
                    if let Some((l_text, _)) = limit.iter().find(|(_, l)| l < req) {
                        why.push(format!(
                            "{k} limit {l_text} (a default) below the proxy's request {req_text}"
                        ));
                    } else if let Some((ratio_text, ratio)) = ratio {
                        match limit.iter().find(|(_, l)| {
                            l.saturating_mul(1_000_000_000) > ratio.saturating_mul(*req)
                        }) {
                            Some((l_text, _)) => why.push(format!(
                                "{k} limit {l_text} over request {req_text} above its maxLimitRequestRatio {ratio_text}"
                            )),
                            None if limit.is_empty() => why.push(format!(
                                "no {k} limit, which its maxLimitRequestRatio {ratio_text} needs"
                            )),
                            None => {}
                        }
                    }
                }
                if !why.is_empty() {
                    refusing.push((ns, r.metadata.name.as_deref().unwrap_or(""), why));
                }
            }
        }
    }
    // One entry per range, its reasons of every resource together.
    let mut named: Vec<(&str, &str, Vec<String>)> = Vec::new();
    for (ns, name, why) in refusing {
        match named.iter_mut().find(|(n, m, _)| *n == ns && *m == name) {
            Some((_, _, all)) => all.extend(why),
            None => named.push((ns, name, why)),
        }
        pods_run |= meshed_in.contains(ns);
    }
    (!named.is_empty()).then(|| {
        let named: Vec<String> = named
            .iter()
            .map(|(ns, name, why)| format!("{ns}/{name} ({})", why.join(", ")))
            .collect();
        line(
            if pods_run { Verdict::Warn } else { Verdict::Fail },
            format!(
                "LimitRange(s) of namespaces labelled {}=enabled refuse the injected proxy as the mesh's resources make it, so meshed pods there are refused (by an error naming no container): {} (give the proxy resources within them: strait.dev/proxy-cpu-request and the like on the pods, or strait install --proxy-memory-limit and the like for the mesh)",
                crate::inject::INJECT,
                named.join("; ")
            ),
        )
    })
}

/// Namespaces labelled for injection and for Istio's ambient mesh: their
/// injected pods carry `istio.io/dataplane-mode: none`, which takes them out
/// of ambient without a word, its policies with it.
fn also_in_ambient(namespaces: &[Namespace]) -> Option<Line> {
    let both: Vec<&str> = namespaces
        .iter()
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(crate::inject::AMBIENT_MODE))
                .is_some_and(|m| m == "ambient")
        })
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    (!both.is_empty()).then(|| {
        line(
            Verdict::Warn,
            format!(
                "namespace(s) labelled {}=enabled are also in Istio's ambient mesh ({}=ambient): {}; their meshed pods leave ambient (they carry {}=none), so its mTLS and policies no longer cover them: take each namespace out of one mesh",
                crate::inject::INJECT,
                crate::inject::AMBIENT_MODE,
                both.join(", "),
                crate::inject::AMBIENT_MODE,
            ),
        )
    })
}

/// Namespaces labelled for injection whose Pod Security level refuses the
/// init container (root, `NET_ADMIN`, `NET_RAW`): every pod the injector
/// meshes there is refused, and is never seen as a pod.
/// A namespace where meshed pods run is not refused (an admission
/// configuration exempts it, or the init container, whatever its label says).
fn refusing_pod_security(
    namespaces: &[Namespace],
    meshed_in: &std::collections::HashSet<String>,
) -> Option<Line> {
    let refusing: Vec<String> = namespaces
        .iter()
        .filter(|n| {
            !n.metadata
                .name
                .as_ref()
                .is_some_and(|n| meshed_in.contains(n))
        })
        .filter_map(|n| {
            let labels = n.metadata.labels.as_ref()?;
            if labels.get(crate::inject::INJECT).map(String::as_str) != Some("enabled") {
                return None;
            }
            let level = labels.get("pod-security.kubernetes.io/enforce")?;
            matches!(level.as_str(), "baseline" | "restricted")
                .then(|| format!("{} ({level})", n.metadata.name.as_deref().unwrap_or("")))
        })
        .collect();
    (!refusing.is_empty()).then(|| {
        line(
            Verdict::Fail,
            format!(
                "namespace(s) labelled {}=enabled enforce a Pod Security level that refuses the init container's NET_ADMIN and NET_RAW, so their meshed pods are never created: {} (label them pod-security.kubernetes.io/enforce=privileged: Pod Security exempts namespaces, users and runtime classes, never one container; docs/kubernetes.md, Known limits)",
                crate::inject::INJECT,
                refusing.join(", ")
            ),
        )
    })
}

/// A bundle's certificates, sorted: `None` if it does not parse.
fn anchor_set(pem: &str) -> Option<Vec<Vec<u8>>> {
    let mut set: Vec<Vec<u8>> = certificates(pem).ok()?.iter().map(|c| c.to_vec()).collect();
    set.sort();
    set.dedup();
    Some(set)
}

/// Meshed pods whose proxies were given other trust anchors than the
/// installed bundle (injected before it changed, or from manifests `strait
/// inject` wrote then): mid-rotation, the pods still to restart before the
/// issuer moves, or they are cut off from it.
#[derive(Debug, Default)]
struct StaleAnchors(Named);

/// Pods counted, the first few named.
#[derive(Debug, Default)]
pub(crate) struct Named {
    pub count: usize,
    /// The first few, by namespace and name.
    named: Vec<String>,
}

impl Named {
    const NAMED: usize = 5;

    fn push(&mut self, p: &Pod) {
        self.push_with(p, None);
    }

    /// With what to say of it, in parentheses.
    fn push_with(&mut self, p: &Pod, detail: Option<String>) {
        self.push_named(|| {
            let m = &p.metadata;
            let detail = detail.map(|d| format!(" ({d})")).unwrap_or_default();
            format!(
                "{}/{}{detail}",
                m.namespace.as_deref().unwrap_or(""),
                m.name.as_deref().unwrap_or("")
            )
        });
    }

    /// Those of `other` too, named while there is room.
    fn extend(&mut self, other: Named) {
        let room = Self::NAMED.saturating_sub(self.named.len());
        self.named.extend(other.named.into_iter().take(room));
        self.count += other.count;
    }

    /// One more, named (`name` is made only then) if among the first few.
    fn push_named(&mut self, name: impl FnOnce() -> String) {
        self.count += 1;
        if self.named.len() < Self::NAMED {
            self.named.push(name());
        }
    }
}

/// `ns/a, ns/b and 3 more`.
impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.named.join(", "))?;
        match self.count - self.named.len() {
            0 => Ok(()),
            n => write!(f, " and {n} more"),
        }
    }
}

/// The meshed pods that should be running, and the trust domain their
/// proxies were given: what `strait install` and `strait uninstall` look for
/// where the install is gone, or about to go.
#[derive(Debug, Default)]
pub(crate) struct Meshed {
    pub pods: Named,
    /// What the first of them was injected with.
    pub given: Option<Given>,
}

/// What the injector gave a meshed pod: its install's settings.
#[derive(Debug, Default)]
pub(crate) struct Given {
    pub trust_domain: Option<String>,
    /// Each distinct bundle of anchors the pods hold (mid-rotation, two),
    /// a few at most.
    pub anchors_pem: Vec<String>,
    /// `None` for the default (nft), which the injector leaves unsaid.
    pub iptables_mode: Option<String>,
    pub proxy_image: Option<String>,
}

impl Meshed {
    fn count(&mut self, p: &Pod) {
        let Some(proxy) = proxy_container(p).filter(|_| should_run(p)) else {
            return;
        };
        self.pods.push(p);
        let given = self.given.get_or_insert_with(|| {
            let init = p
                .spec
                .iter()
                .flat_map(|s| s.init_containers.iter().flatten());
            let init = init
                .into_iter()
                .find(|c| c.name == crate::inject::INIT_CONTAINER);
            Given {
                trust_domain: proxy_env(proxy, "STRAIT_PROXY_TRUST_DOMAIN").map(String::from),
                anchors_pem: Vec::new(),
                iptables_mode: init
                    .and_then(|c| proxy_env(c, "STRAIT_PROXY_IPTABLES_MODE"))
                    .map(String::from),
                proxy_image: proxy.image.clone(),
            }
        });
        const BUNDLES: usize = 4;
        if let Some(pem) = proxy_env(proxy, "STRAIT_PROXY_TRUST_ANCHORS_PEM")
            && given.anchors_pem.len() < BUNDLES
            && let Some(set) = anchor_set(pem)
            && !given
                .anchors_pem
                .iter()
                .any(|b| anchor_set(b).as_ref() == Some(&set))
        {
            given.anchors_pem.push(pem.to_string());
        }
    }
}

/// Every meshed pod of the cluster, a page at a time.
pub(crate) async fn meshed_pods(client: kube::Client) -> Result<Meshed, kube::Error> {
    each_listed(&Api::<Pod>::all(client), PODS_PAGE, Meshed::count).await
}

/// A literal variable of the proxy container.
fn proxy_env<'a>(proxy: &'a k8s_openapi::api::core::v1::Container, name: &str) -> Option<&'a str> {
    proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

impl StaleAnchors {
    fn count(&mut self, p: &Pod, bundle: &[Vec<u8>]) {
        if !should_run(p) {
            return;
        }
        let given = proxy_container(p).and_then(|c| proxy_env(c, "STRAIT_PROXY_TRUST_ANCHORS_PEM"));
        let Some(given) = given else {
            return;
        };
        if anchor_set(given).as_deref() != Some(bundle) {
            self.0.push(p);
        }
    }

    /// Said with the controller first: it gives new pods the anchors it
    /// read at start, so after the ConfigMap changed by hand, restarting
    /// the pods alone would give them the old ones again.
    fn line(&self, ns: &str) -> Option<Line> {
        (self.0.count > 0).then(|| {
            line(
                Verdict::Warn,
                format!(
                    "{} meshed pod(s) hold other trust anchors than ConfigMap {ANCHORS_CONFIG_MAP} ({}): restart them before moving the issuer to a new anchor, or they lose their peers and the controller; the controller first if it started before the ConfigMap changed (it gives new pods the anchors it read then: kubectl -n {ns} rollout restart deploy/{CONTROLLER})",
                    self.0.count, self.0
                ),
            )
        })
    }
}

/// Meshed pods whose proxy is another image than the one the injector gives
/// now: injected before an upgrade (or a move to another registry), they run
/// the earlier proxy until they are restarted. A pod that names its own
/// (`strait.dev/proxy-image`) keeps it on purpose.
#[derive(Debug, Default)]
struct OtherProxies(Named);

impl OtherProxies {
    fn count(&mut self, p: &Pod, want: &str) {
        let pinned = (p.metadata.annotations.as_ref())
            .is_some_and(|a| a.contains_key(crate::inject::PROXY_IMAGE));
        if pinned || !should_run(p) {
            return;
        }
        let image = proxy_container(p).and_then(|c| c.image.as_deref());
        if let Some(image) = image.filter(|i| !same_image(i, want)) {
            self.0.push_with(p, Some(image.to_string()));
        }
    }

    fn line(&self, want: &str) -> Option<Line> {
        (self.0.count > 0).then(|| {
            line(
                Verdict::Warn,
                format!(
                    "{} meshed pod(s) run another proxy than the injector's {want} ({}): injected before an upgrade, a pod keeps its proxy until restarted (kubectl rollout restart; manifests `strait inject` wrote, injected again first)",
                    self.0.count, self.0
                ),
            )
        })
    }
}

/// The same image, but for a digest one side has pinned it by (a policy
/// engine's admission adds one to the tag it was given).
fn same_image(a: &str, b: &str) -> bool {
    match (a.split_once('@'), b.split_once('@')) {
        (Some(_), Some(_)) | (None, None) => a == b,
        (Some((a, _)), None) => a == b,
        (None, Some((b, _))) => a == b,
    }
}

/// Pods read per page: a cluster may run tens of thousands, and the API
/// server answers a list in one response unless asked for pages (kubectl asks
/// for 500; a pod's object is a few KiB).
const PODS_PAGE: u32 = 500;

/// Folds every object of `api`'s collection into a fresh `S` with `each`,
/// `page` at a time, so that no more than a page is held at once. A list that
/// outlives its continue token (the API server keeps one about five minutes,
/// then answers 410 Gone) goes on from where it stopped with the token the
/// 410 carries (the API's inconsistent continuation): the rest is read at a
/// later version, which a count can take. Without one it is read again from
/// the start into a fresh `S`, so that nothing is counted twice. After
/// `LIST_EXPIRED` expiries it gives up.
async fn each_listed<K, S: Default>(
    api: &Api<K>,
    page: u32,
    mut each: impl FnMut(&mut S, &K),
) -> Result<S, kube::Error>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let mut expired = 0;
    'list: loop {
        let mut folded = S::default();
        let mut params = ListParams::default().limit(page);
        loop {
            let list = match api.list(&params).await {
                Ok(list) => list,
                Err(kube::Error::Api(s))
                    if s.code == 410
                        && params.continue_token.is_some()
                        && expired < LIST_EXPIRED =>
                {
                    expired += 1;
                    let inconsistent = s.metadata.as_ref().and_then(|m| m.continue_.as_deref());
                    match inconsistent.filter(|c| !c.is_empty()) {
                        Some(next) => {
                            params = params.continue_token(next);
                            continue;
                        }
                        None => continue 'list,
                    }
                }
                Err(e) => return Err(e),
            };
            list.items.iter().for_each(|o| each(&mut folded, o));
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(next) => params = params.continue_token(&next),
                None => return Ok(folded),
            }
        }
    }
}

/// Times a paged list's continue token may expire before `check` gives up
/// on it: a pass read again from the start takes as long as the last, so one
/// that keeps expiring will not finish.
const LIST_EXPIRED: u32 = 2;

/// How long a meshed pod may take to start before `check` calls it stuck:
/// the injected proxy's startup probe's window.
const STARTUP_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// The meshed pods' proxies: those of pods that should be running count (a
/// finished Job's pod, or one being deleted, keeps its stopped proxy); none
/// ready among them is a mesh that does not work (no certificate issued, no
/// configuration), some is a mesh starting or in trouble. Counted a pod at a
/// time, as the pages arrive.
#[derive(Debug, Default)]
struct MeshedPods {
    meshed: usize,
    ready: usize,
    /// One is running, or has been starting for longer than it may.
    started: bool,
    /// The first few not ready, with why their containers say.
    unready: Named,
    /// The namespaces a meshed pod runs in.
    namespaces: std::collections::HashSet<String>,
    /// Pods ended (a Job's, with `restartPolicy: Never`) by their init
    /// container's failure in the last hour: not retried in place, so no
    /// pod is left crash-looping to say so.
    init_failed: Named,
    /// Running a proxy with no `strait-init` (a manifest `strait inject`
    /// wrote, edited by hand; a policy engine stripping containers that ask
    /// for NET_ADMIN): nothing sends the app's traffic through its proxy,
    /// which is ready all the same.
    uncaptured: Named,
    /// Running without a proxy though the injector would give them one.
    unmeshed: Named,
}

/// Where the injector meshes pods, to find those that run without a proxy.
struct Asked {
    /// Namespaces labelled `strait.dev/inject=enabled`.
    enabled: std::collections::HashSet<String>,
    /// Namespaces labelled `strait.dev/inject=disabled`: the webhooks skip them.
    disabled: std::collections::HashSet<String>,
    /// The mesh's own namespace, which the webhooks skip too.
    system: String,
}

impl Asked {
    /// Whether `p` runs without a proxy the injector would give it now.
    fn unmeshed(&self, p: &Pod) -> bool {
        let Some(ns) = p.metadata.namespace.as_deref() else {
            return false;
        };
        if proxy_container(p).is_some()
            || !should_run(p)
            || self.disabled.contains(ns)
            || ns == self.system
            || crate::defaults::SYSTEM_NAMESPACES.contains(&ns)
            // A static pod's mirror: the kubelet runs it from a file on the
            // node, which no restart through the API changes.
            || (p.metadata.annotations.as_ref())
                .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
        {
            return false;
        }
        let asks = |m: &Option<std::collections::BTreeMap<String, String>>| {
            m.as_ref()
                .and_then(|m| m.get(crate::inject::INJECT))
                .is_some_and(|v| v == "enabled")
        };
        let state = match self.enabled.contains(ns) {
            true => crate::inject::Namespace::Enabled,
            // Most of a cluster's pods: not made into JSON to be told so.
            false if !asks(&p.metadata.annotations) && !asks(&p.metadata.labels) => return false,
            false => crate::inject::Namespace::NotEnabled,
        };
        // The injector's own rules say which it would take (not a pod on the
        // node's network, nor one that opted out): no false alarms.
        let settings = crate::inject::Settings::with_anchors(String::new());
        serde_json::to_value(p).is_ok_and(|v| {
            matches!(
                crate::inject::inject(&v, state, &settings),
                Ok(crate::inject::Outcome::Inject(_))
            )
        })
    }
}

/// The names of the namespaces labelled `strait.dev/inject=value`.
fn labelled_as(items: &[Namespace], value: &str) -> std::collections::HashSet<String> {
    (items.iter())
        .filter(|n| {
            (n.metadata.labels.as_ref())
                .and_then(|l| l.get(crate::inject::INJECT))
                .is_some_and(|v| v == value)
        })
        .filter_map(|n| n.metadata.name.clone())
        .collect()
}

impl MeshedPods {
    fn count(&mut self, p: &Pod) {
        if proxy_container(p).is_none() {
            return;
        }
        if let Some(why) = init_failed(p) {
            self.init_failed.push_with(p, Some(why));
        }
        if !should_run(p) {
            return;
        }
        let intercepted = (p.spec.iter())
            .flat_map(|s| s.init_containers.iter().flatten())
            .any(|c| c.name == crate::inject::INIT_CONTAINER);
        if !intercepted {
            self.uncaptured.push(p);
        }
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        self.meshed += 1;
        if phase == Some("Running")
            && let Some(ns) = &p.metadata.namespace
            && !self.namespaces.contains(ns)
        {
            self.namespaces.insert(ns.clone());
        }
        if proxy_ready(p) {
            self.ready += 1;
        } else {
            self.unready.push_with(p, not_ready_why(p));
        }
        // Pods still starting (Pending) may simply not be there yet; one Pending
        // past the proxy's startup window is not starting, it is stuck.
        let stuck_since = k8s_openapi::jiff::Timestamp::now() - STARTUP_WINDOW;
        self.started |= phase == Some("Running")
            || p.metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| t.0 < stuck_since);
    }

    /// Recent pods that ended in `strait-init`: a node that cannot write
    /// the rules (a kernel module missing, the wrong iptables backend) fails
    /// every Job scheduled there, and nothing else shows it.
    fn init_failed_line(&self) -> Option<Line> {
        (self.init_failed.count > 0).then(|| {
            line(
                Verdict::Fail,
                format!(
                    "{} meshed pod(s) ended in the last hour because {} failed (their interception rules could not be written; a Job's pod is not retried in place): {}",
                    self.init_failed.count,
                    crate::inject::INIT_CONTAINER,
                    self.init_failed
                ),
            )
        })
    }

    /// Pods the injector would mesh, running without a proxy.
    fn unmeshed_line(&self) -> Option<Line> {
        (self.unmeshed.count > 0).then(|| {
            line(
                Verdict::Warn,
                format!(
                    "{} pod(s) asked to be meshed run without a proxy (created before their namespace was labelled, or while the controller was down): no mTLS and no policy for them until recreated (kubectl rollout restart, once nothing above refuses new meshed pods and the controller is ready): {}",
                    self.unmeshed.count, self.unmeshed
                ),
            )
        })
    }

    /// Pods whose proxy nothing sends traffic through.
    fn uncaptured_line(&self) -> Option<Line> {
        (self.uncaptured.count > 0).then(|| {
            line(
                Verdict::Fail,
                format!(
                    "{} meshed pod(s) run a proxy but no {}: their traffic does not go through it (no mTLS, no policy); inject their manifests again or restart them: {}",
                    self.uncaptured.count,
                    crate::inject::INIT_CONTAINER,
                    self.uncaptured
                ),
            )
        })
    }

    fn line(&self) -> Line {
        match (self.meshed, self.ready) {
            (0, _) => line(
                Verdict::Warn,
                "no meshed pod yet (label a namespace strait.dev/inject=enabled)",
            ),
            (n, r) if r == n => line(
                Verdict::Ok,
                format!(
                    "{r} meshed pod(s), every proxy ready (holds its certificate and configuration)"
                ),
            ),
            (n, 0) if self.started => line(
                Verdict::Fail,
                format!(
                    "none of {n} meshed pods has a ready proxy: no certificate or configuration reaches them, or the pods cannot start (see kubectl describe, and a proxy's log): {}",
                    self.unready
                ),
            ),
            (n, r) => line(
                Verdict::Warn,
                format!(
                    "{r} of {n} meshed pods have a ready proxy; not ready: {}",
                    self.unready
                ),
            ),
        }
    }
}

/// The pod's proxy container, if it is meshed.
fn proxy_container(p: &Pod) -> Option<&k8s_openapi::api::core::v1::Container> {
    p.spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
        .find(|c| c.name == crate::inject::PROXY_CONTAINER)
}

/// Whether the pod should be running: a finished Job's pod, or one being
/// deleted, keeps a stopped proxy.
fn should_run(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    p.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// Why a pod ended in the last hour in its init container, as it said.
fn init_failed(p: &Pod) -> Option<String> {
    let status = p.status.as_ref()?;
    if status.phase.as_deref() != Some("Failed") {
        return None;
    }
    let since = k8s_openapi::jiff::Timestamp::now() - std::time::Duration::from_secs(3_600);
    let init = status
        .init_container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == crate::inject::INIT_CONTAINER)?;
    let ended = init.state.as_ref()?.terminated.as_ref()?;
    if ended.exit_code == 0 || ended.finished_at.as_ref().is_some_and(|t| t.0 < since) {
        return None;
    }
    let why = ended.message.as_deref().and_then(last_line);
    Some(match why {
        Some(w) => format!("exit {}: {w}", ended.exit_code),
        None => format!("exit {}", ended.exit_code),
    })
}

/// What the mesh's containers of a pod whose proxy is not ready say: one
/// waiting, its reason and the last line it ended with (its log's tail, by
/// `FallbackToLogsOnError`: the error it exited on), or the waiting message
/// (a configuration error); a proxy running but not ready, as much, and its
/// restarts (no certificate or configuration yet: its log says why).
fn not_ready_why(p: &Pod) -> Option<String> {
    let status = p.status.as_ref()?;
    let mesh = [
        crate::inject::INIT_CONTAINER,
        crate::inject::PROXY_CONTAINER,
    ];
    let mut ours = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter(|c| mesh.contains(&c.name.as_str()));
    let said = ours.clone().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref().unwrap_or("waiting");
        let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref());
        let why = (last.and_then(|t| t.message.as_deref()))
            .or(waiting.message.as_deref())
            .and_then(last_line);
        Some(match why {
            Some(w) => format!("{}: {reason}: {w}", c.name),
            None => format!("{}: {reason}", c.name),
        })
    });
    said.or_else(|| {
        ours.find(|c| {
            c.name == crate::inject::PROXY_CONTAINER
                && c.state.as_ref().is_some_and(|s| s.running.is_some())
        })
        .map(|c| {
            format!(
                "{}: running, not ready, {} restart(s): see its log",
                c.name, c.restart_count
            )
        })
    })
    // Not scheduled: the scheduler says why (no node fits, or one that
    // refuses what the pod asks, as EKS Fargate refuses NET_ADMIN).
    .or_else(|| {
        let unscheduled = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
        let why = unscheduled.message.as_deref().and_then(last_line);
        let reason = unscheduled.reason.as_deref().unwrap_or("Unschedulable");
        Some(match why {
            Some(w) => format!("not scheduled: {reason}: {w}"),
            None => format!("not scheduled: {reason}"),
        })
    })
    .or_else(|| status.phase.clone())
}

/// A message's last line that says something, on one line and cut short.
fn last_line(message: &str) -> Option<String> {
    let line = message
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())?;
    let clean: String = line
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(160)
        .collect();
    Some(if clean.len() < line.len() {
        format!("{clean}…")
    } else {
        clean
    })
}

fn proxy_ready(p: &Pod) -> bool {
    let status = p.status.as_ref();
    status
        .into_iter()
        .flat_map(|s| {
            s.init_container_statuses
                .iter()
                .flatten()
                .chain(s.container_statuses.iter().flatten())
        })
        .any(|c| c.name == crate::inject::PROXY_CONTAINER && c.ready)
}

/// The CA bundles a webhook configuration's webhooks are called under: a
/// webhook without one is called under the API server's system roots, which
/// cannot verify the mesh's certificate, so it counts as an empty bundle.
fn ca_bundles(configs: impl Iterator<Item = WebhookClientConfig>) -> Vec<Vec<u8>> {
    configs
        .map(|c| c.ca_bundle.map(|b| b.0).unwrap_or_default())
        .collect()
}

/// A webhook configuration: there, and trusting the anchors the controller's
/// serving certificate is signed under, or the API server cannot call it.
fn webhook_line(
    what: &str,
    bundles: Result<Option<Vec<Vec<u8>>>, kube::Error>,
    anchors: Option<&Option<String>>,
    own_cert: Option<&str>,
    missing: &str,
    if_missing: Verdict,
) -> Line {
    match bundles {
        Ok(Some(bundles)) => {
            // As sets of certificates: the same PEM may be written with
            // other line ends, or in another order (a rotation's old and
            // new). Certificates beside the anchors verify alike, but one
            // may be an anchor a rotation meant to retire: said.
            let compared = |a: &String| {
                let a = anchor_set(a)?;
                let mut beside = 0;
                for b in &bundles {
                    let b = std::str::from_utf8(b).ok().and_then(anchor_set)?;
                    if !a.iter().all(|c| b.binary_search(c).is_ok()) {
                        return None;
                    }
                    beside = beside.max(b.len() - a.len());
                }
                (!bundles.is_empty()).then_some(beside)
            };
            if let Some(cert) = own_cert {
                return line(
                    Verdict::Warn,
                    format!(
                        "{what} is configured; the controller serves a certificate of its own (--webhook-cert {cert}), whose CA its caBundle must hold: not compared"
                    ),
                );
            }
            match anchors.map(|a| a.as_ref().and_then(compared)) {
                None => line(
                    Verdict::Warn,
                    format!(
                        "{what} is configured; its caBundle is not compared with the unread anchors"
                    ),
                ),
                Some(Some(0)) => line(
                    Verdict::Ok,
                    format!("{what} is configured and trusts the mesh's anchors"),
                ),
                Some(Some(n)) => line(
                    Verdict::Warn,
                    format!(
                        "{what} trusts the mesh's anchors and {n} other certificate(s) beside them: an anchor a rotation retired is still trusted there until its caBundle is written again (apply strait install's output again, or helm upgrade)"
                    ),
                ),
                Some(_) => line(
                    Verdict::Fail,
                    format!(
                        "{what}'s caBundle is not the trust anchors: the API server cannot verify the controller's certificate (apply strait install's output again)"
                    ),
                ),
            }
        }
        Ok(None) => line(if_missing, missing),
        Err(e) => unread(what, &e),
    }
}

/// A read refused (a `view` role cannot read Secrets or cluster-scoped
/// objects) is not the object missing: it is said as what it is, and not
/// failed on. Any other error fails.
/// The controller watches Gateway API's routes at `v1` only: a CRD that does
/// not serve it (HTTPRoute before Gateway API 1.0, GRPCRoute before 1.1) is
/// as good as absent, and its routes are not served.
fn served_v1(crd: &CustomResourceDefinition) -> Option<&CustomResourceDefinitionVersion> {
    crd.spec
        .versions
        .iter()
        .find(|v| v.name == "v1" && v.served)
}

/// Gateway API's CRDs, the experimental channel (HTTPRoute `retry`), in a
/// release the controller reads: what a check that finds them missing or
/// too early says to run.
const GATEWAY_API_INSTALL: &str = "kubectl apply --server-side -f https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.2.1/experimental-install.yaml";

fn httproute_line(crd: Option<&CustomResourceDefinition>) -> Line {
    let Some(crd) = crd else {
        return line(
            Verdict::Fail,
            format!(
                "Gateway API's CRDs are missing: HTTPRoutes (routing, weights, timeouts, retries) are a prerequisite; install them: {GATEWAY_API_INSTALL}"
            ),
        );
    };
    let Some(v1) = served_v1(crd) else {
        return line(
            Verdict::Fail,
            format!(
                "Gateway API's HTTPRoute CRD does not serve v1 (a release before Gateway API 1.0), the only version the controller reads: no HTTPRoute is served until Gateway API's CRDs are upgraded: {GATEWAY_API_INSTALL}"
            ),
        );
    };
    let schema = serde_json::to_string(&v1.schema).unwrap_or_default();
    if schema.contains("\"retry\"") {
        line(
            Verdict::Ok,
            "Gateway API HTTPRoute is installed (experimental channel: retries available)",
        )
    } else {
        line(
            Verdict::Warn,
            format!(
                "Gateway API HTTPRoute is installed without HTTPRoute retry (the standard channel, or a release before Gateway API 1.2): install the experimental channel for it: {GATEWAY_API_INSTALL}"
            ),
        )
    }
}

fn grpcroute_line(crd: Option<&CustomResourceDefinition>) -> Line {
    match crd {
        None => line(
            Verdict::Warn,
            format!(
                "Gateway API's GRPCRoute CRD is missing (a release before Gateway API 1.1): GRPCRoutes cannot be written; HTTPRoutes still route gRPC ({GATEWAY_API_INSTALL})"
            ),
        ),
        Some(crd) if served_v1(crd).is_none() => line(
            Verdict::Warn,
            format!(
                "Gateway API's GRPCRoute CRD does not serve v1 (a release before Gateway API 1.1), the only version the controller reads: GRPCRoutes are not served until Gateway API's CRDs are upgraded: {GATEWAY_API_INSTALL}"
            ),
        ),
        Some(_) => line(Verdict::Ok, "Gateway API GRPCRoute is installed"),
    }
}

/// A ReplicaSet whose pods are refused for what injection adds: its name
/// and the refusal's last line.
fn refused_for_the_mesh(rs: &ReplicaSet) -> Option<String> {
    let failure = rs
        .status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")?;
    let message = failure.message.as_deref()?;
    // The capabilities count where the workload's own containers add none
    // (a policy may name a container by its place, not its name).
    let adds = |cap: &str| {
        let spec = rs
            .spec
            .as_ref()
            .and_then(|s| s.template.as_ref()?.spec.as_ref());
        spec.into_iter()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .filter_map(|c| {
                c.security_context
                    .as_ref()?
                    .capabilities
                    .as_ref()?
                    .add
                    .as_ref()
            })
            .flatten()
            .any(|a| a == cap)
    };
    let ours = [
        crate::inject::INIT_CONTAINER,
        crate::inject::PROXY_CONTAINER,
    ]
    .into_iter()
    .chain(["NET_ADMIN", "NET_RAW"].into_iter().filter(|c| !adds(c)));
    let at = ours.filter_map(|w| message.find(w)).min()?;
    // Around what names the mesh: policies' messages run long (an SCC's
    // lists every provider it tried).
    let from = (0..=at.saturating_sub(80))
        .rev()
        .find(|i| message.is_char_boundary(*i))
        .unwrap_or(0);
    let excerpt = last_line(&message[from..]).unwrap_or_default();
    Some(format!(
        "{}/{} ({}{excerpt})",
        rs.metadata.namespace.as_deref().unwrap_or(""),
        rs.metadata.name.as_deref().unwrap_or(""),
        if from > 0 { "…" } else { "" },
    ))
}

fn refused_line(refused: &Named) -> Option<Line> {
    (refused.count > 0).then(|| {
        line(
            Verdict::Fail,
            format!(
                "{} workload(s) cannot create meshed pods, refused at admission for the mesh's containers: {refused} (docs/kubernetes.md, Platforms)",
                refused.count,
            ),
        )
    })
}

/// Cilium's agent configuration (its Helm chart writes it).
const CILIUM_CONFIG: &str = "cilium-config";

/// Whether Cilium balances Services at `connect()` inside pods (its
/// kube-proxy replacement's socket load balancing): an app's connection to a
/// ClusterIP then leaves for a pod's address before the interception rules
/// see it, and its proxy finds that pod rather than the Service. Linkerd and
/// Istio need the same `socketLB.hostNamespaceOnly`.
fn cilium_line(config: &std::collections::BTreeMap<String, String>) -> Option<Line> {
    let value = |k: &str| config.get(k).map(|v| v.trim().to_ascii_lowercase());
    let replaces_kube_proxy = matches!(
        value("kube-proxy-replacement").as_deref(),
        Some("true" | "strict")
    );
    // Kube-proxy replacement turns socket balancing on whatever
    // `bpf-lb-sock` says (its chart writes `false` beside it); without it,
    // that key alone does.
    let socket_lb = replaces_kube_proxy || value("bpf-lb-sock").as_deref() == Some("true");
    if !socket_lb {
        return None;
    }
    Some(
        if value("bpf-lb-sock-hostns-only").as_deref() == Some("true") {
            line(
                Verdict::Ok,
                "Cilium's socket load balancing leaves pods alone (bpf-lb-sock-hostns-only)",
            )
        } else {
            line(
                Verdict::Fail,
                format!(
                    "Cilium balances Services inside pods (socket load balancing, kube-system/{CILIUM_CONFIG}): a meshed app's connection to a Service reaches its proxy addressed to one pod, so the Service's routes, retries, timeouts, balancing and BackendPolicy are not applied; set Cilium's socketLB.hostNamespaceOnly=true (bpf-lb-sock-hostns-only: \"true\") and restart its agents and the meshed pods"
                ),
            )
        },
    )
}

/// Whether Calico's eBPF data plane balances Services at `connect()` inside
/// pods (its connect-time load balancer, on by default for TCP): as Cilium's
/// socket balancing, it hands the proxy a pod's address for a Service's.
fn calico_line(spec: &serde_json::Value) -> Option<Line> {
    if spec["bpfEnabled"].as_bool() != Some(true) {
        return None;
    }
    // The field of Calico 3.27 and later; before, a boolean (default on).
    let off = match spec["bpfConnectTimeLoadBalancing"].as_str() {
        Some(mode) => mode == "Disabled",
        None => spec["bpfConnectTimeLoadBalancingEnabled"].as_bool() == Some(false),
    };
    Some(if off {
        line(
            Verdict::Ok,
            "Calico's eBPF data plane leaves Services to the pods (bpfConnectTimeLoadBalancing: Disabled)",
        )
    } else {
        line(
            Verdict::Fail,
            "Calico's eBPF data plane balances Services inside pods (connect-time load balancing, FelixConfiguration default): a meshed app's connection to a Service reaches its proxy addressed to one pod, so the Service's routes, retries, timeouts, balancing and BackendPolicy are not applied; set bpfConnectTimeLoadBalancing: Disabled and bpfHostNetworkedNATWithoutCTLB: Enabled in it, and restart the meshed pods",
        )
    })
}

fn unread(what: &str, e: &kube::Error) -> Line {
    match e {
        kube::Error::Api(s) if s.code == 403 => Line {
            unchecked: true,
            ..line(
                Verdict::Warn,
                format!("{what} cannot be read with these credentials ({e}): not checked"),
            )
        },
        _ => line(Verdict::Fail, format!("{what} cannot be read: {e}")),
    }
}

/// The certificates of a PEM text, parsed; an error names what is wrong.
fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, &'static str> {
    let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "is not a PEM certificate")?;
    if ders.is_empty() {
        return Err("is not a PEM certificate");
    }
    for der in &ders {
        x509_parser::parse_x509_certificate(der).map_err(|_| "is not a valid certificate")?;
    }
    Ok(ders)
}

/// How long `pem`'s certificate has left: the first one's, or with
/// `whole_chain` the earliest to end of all (an issuer's intermediates bound
/// every leaf it signs as much as it does).
fn expiry(what: &str, pem: &str, whole_chain: bool) -> Line {
    let ders = match certificates(pem) {
        Ok(d) => d,
        Err(e) => return line(Verdict::Fail, format!("{what} {e}")),
    };
    let take = if whole_chain { ders.len() } else { 1 };
    let Some((not_after, subject, at)) = (ders.iter().take(take).enumerate())
        .filter_map(|(i, der)| {
            let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
            Some((
                c.validity().not_after.timestamp(),
                c.subject().to_string(),
                i,
            ))
        })
        .min_by_key(|(t, _, _)| *t)
    else {
        return line(Verdict::Fail, format!("{what} is not a valid certificate"));
    };
    let what = if at == 0 {
        what.to_string()
    } else {
        format!("{what}'s intermediate ({subject})")
    };
    dated(&what, not_after)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The verdict on a certificate that ends at `not_after` (Unix seconds).
fn dated(what: &str, not_after: i64) -> Line {
    let left = not_after - unix_now();
    let days = left / 86400;
    if left <= 0 {
        line(
            Verdict::Fail,
            format!("{what} has expired: no certificate it signs is valid"),
        )
    } else if left < EXPIRY_WARNING.as_secs() as i64 {
        line(
            Verdict::Warn,
            format!("{what} expires in {days} day(s): rotate it"),
        )
    } else {
        line(Verdict::Ok, format!("{what} is valid for {days} more days"))
    }
}

/// Whether a Deployment's rollout has not finished, as `kubectl rollout
/// status` reads it: ready replicas count the old ReplicaSet's too, so a new
/// one that cannot start hides behind them until they are replaced. No
/// verdict without an observed generation (zeros are left out of a status).
fn rolling_out(d: &Deployment) -> bool {
    let (Some(status), Some(spec)) = (d.status.as_ref(), d.spec.as_ref()) else {
        return false;
    };
    let Some(observed) = status.observed_generation else {
        return false;
    };
    let want = spec.replicas.unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or(0);
    observed < d.metadata.generation.unwrap_or(0)
        || updated < want
        || status.replicas.unwrap_or(0) > updated
        || status.available_replicas.unwrap_or(0) < updated
}

/// Whether the controller would sign with this issuer: its key is the
/// certificate's, it is a CA, and a leaf it signs verifies against it.
fn issuer_key_line(crt: &str, key: &str) -> Line {
    match crate::identity::ca::Ca::from_pem(crt, key, std::time::Duration::from_secs(3600)) {
        Ok(_) => line(
            Verdict::Ok,
            "the issuer's key is its certificate's, and what it signs verifies",
        ),
        Err((_, why)) => line(
            Verdict::Fail,
            format!("the controller cannot sign with the issuer: {why}"),
        ),
    }
}

/// Whether the issuer's chain (`tls.crt`: the issuer, then any
/// intermediates) leads to one of the trust anchors, signature by signature.
/// A rotation done out of order breaks this: the controller then refuses to
/// start, and proxies would refuse what it signs.
fn chain_line(issuer_pem: &str, anchors_pem: &str) -> Line {
    let (chain, anchors) = match (certificates(issuer_pem), certificates(anchors_pem)) {
        (Ok(c), Ok(a)) => (c, a),
        // Said by the expiry lines already.
        _ => {
            return line(
                Verdict::Fail,
                "the issuer's chain to the trust anchors cannot be checked: one of them does not parse",
            );
        }
    };
    // What the controller's webpki would try, and then some: a Secret of
    // thousands of certificates is not something to verify pair by pair.
    if chain.len() > MAX_CHAIN {
        return line(
            Verdict::Fail,
            format!(
                "the issuer's tls.crt holds {} certificates, more than {MAX_CHAIN}: no chain that long is verified",
                chain.len()
            ),
        );
    }
    let chain: Vec<_> = chain.iter().filter_map(parse).collect();
    let anchors: Vec<_> = anchors.iter().filter_map(parse).collect();
    let (anchored, unsupported) = anchored(&chain, &anchors);
    let issuer = chain
        .first()
        .map(|c| c.subject().to_string())
        .unwrap_or_default();
    if anchored {
        line(Verdict::Ok, "the issuer is signed under the trust anchors")
    } else if unsupported {
        let l = line(
            Verdict::Warn,
            format!(
                "the issuer's ({issuer}) chain to the trust anchors uses a signature algorithm this check cannot verify: not checked"
            ),
        );
        Line {
            unchecked: true,
            ..l
        }
    } else {
        line(
            Verdict::Fail,
            format!(
                "the issuer ({issuer}) is not signed under the trust anchors: the controller does not start with it, and proxies would refuse every certificate it signs (rotate in the order docs/kubernetes.md gives)"
            ),
        )
    }
}

fn parse<'a>(der: &'a CertificateDer<'static>) -> Option<X509Certificate<'a>> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .ok()
}

/// Whether a path leads from the issuer (`chain[0]`) up through the
/// certificates with it, in any order, to one of `anchors` (or to a
/// certificate that is one), as webpki builds it for the controller: only a
/// certificate named as the issuer is tried. And whether a signature on the
/// way used an algorithm this check cannot verify.
fn anchored(chain: &[X509Certificate<'_>], anchors: &[X509Certificate<'_>]) -> (bool, bool) {
    if chain.is_empty() {
        return (false, false);
    }
    let mut unsupported = false;
    let mut signs = |by: &X509Certificate<'_>, c: &X509Certificate<'_>| {
        if by.subject().as_raw() != c.issuer().as_raw() {
            return false;
        }
        match c.verify_signature(Some(by.public_key())) {
            Ok(()) => true,
            Err(x509_parser::error::X509Error::SignatureUnsupportedAlgorithm) => {
                unsupported = true;
                false
            }
            Err(_) => false,
        }
    };
    let mut used = vec![false; chain.len()];
    let found = path_up(0, chain, anchors, &mut used, &mut signs);
    (found, unsupported)
}

/// The trust anchors' expiry. Every certificate of the mesh ends with the
/// anchor its issuer is under (the API server checks a webhook's root by
/// date too), so that one is judged, the earliest to end where the issuer is
/// under several or cannot be read; an anchor past its end that signs no
/// issuer is only stale, to be dropped from the bundle.
fn anchors_expiry(anchors_pem: &str, issuer_pem: Option<&str>) -> Line {
    let ders = match certificates(anchors_pem) {
        Ok(d) => d,
        Err(e) => return line(Verdict::Fail, format!("the trust anchors {e}")),
    };
    let anchors: Vec<_> = ders.iter().filter_map(parse).collect();
    let chain_ders = issuer_pem
        .and_then(|p| certificates(p).ok())
        .filter(|c| c.len() <= MAX_CHAIN)
        .unwrap_or_default();
    let chain: Vec<_> = chain_ders.iter().filter_map(parse).collect();
    let mut in_use: Vec<bool> = anchors
        .iter()
        .map(|a| anchored(&chain, std::slice::from_ref(a)).0)
        .collect();
    if !in_use.contains(&true) {
        // No issuer to tell by (the chain line says why): all of them.
        in_use = vec![true; anchors.len()];
    }
    let ends = |a: &X509Certificate<'_>| a.validity().not_after.timestamp();
    let Some(first) = (0..anchors.len())
        .filter(|&i| in_use[i])
        .min_by_key(|&i| ends(&anchors[i]))
    else {
        return line(
            Verdict::Fail,
            "the trust anchors are not valid certificates",
        );
    };
    let what = match anchors.len() {
        1 => "the trust anchor".to_string(),
        _ => format!("the trust anchor ({})", anchors[first].subject()),
    };
    let verdict = dated(&what, ends(&anchors[first]));
    let stale: Vec<String> = (0..anchors.len())
        .filter(|&i| !in_use[i] && ends(&anchors[i]) <= unix_now())
        .map(|i| anchors[i].subject().to_string())
        .collect();
    if verdict.verdict == Verdict::Ok && !stale.is_empty() {
        line(
            Verdict::Warn,
            format!(
                "{}; the bundle's {} expired and signs no issuer: drop it from the bundle",
                verdict.what,
                stale.join(", ")
            ),
        )
    } else {
        verdict
    }
}

/// Certificates in an issuer's `tls.crt` that `strait check` walks: webpki
/// allows 6 intermediates.
const MAX_CHAIN: usize = 16;

/// Whether `chain[at]` leads to an anchor through the certificates of `chain`
/// not yet `used`: a certificate from which no anchor was reached is not
/// tried again, so each is visited once, whatever `tls.crt` holds.
fn path_up(
    at: usize,
    chain: &[X509Certificate<'_>],
    anchors: &[X509Certificate<'_>],
    used: &mut [bool],
    signs: &mut dyn FnMut(&X509Certificate<'_>, &X509Certificate<'_>) -> bool,
) -> bool {
    let c = &chain[at];
    if anchors
        .iter()
        .any(|a| a.as_raw() == c.as_raw() || signs(a, c))
    {
        return true;
    }
    used[at] = true;
    for j in 0..chain.len() {
        if !used[j] && signs(&chain[j], c) && path_up(j, chain, anchors, used, signs) {
            return true;
        }
    }
    false
}

/// Each node's name and kubelet version, read a page at a time: a node's
/// object is large (its images), and a cluster may have thousands.
async fn kubelets(client: &kube::Client) -> Result<Vec<(String, String)>, kube::Error> {
    each_listed(
        &Api::<Node>::all(client.clone()),
        200,
        |out: &mut Vec<_>, n: &Node| {
            let version = n
                .status
                .as_ref()
                .and_then(|s| s.node_info.as_ref())
                .map(|i| i.kubelet_version.clone())
                .unwrap_or_default();
            out.push((n.metadata.name.clone().unwrap_or_default(), version));
        },
    )
    .await
}

/// The verdict on the nodes' kubelets, `(name, version)`.
fn nodes_line(kubelets: &[(String, String)]) -> Line {
    if kubelets.is_empty() {
        return line(Verdict::Warn, "no node is registered: nothing can run yet");
    }
    let old: Vec<String> = kubelets
        .iter()
        .filter(|(_, v)| {
            let (major, minor) = version_parts(v);
            !supports_native_sidecars(major, minor)
        })
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    if old.is_empty() {
        return line(
            Verdict::Ok,
            format!(
                "every node's kubelet runs native sidecars ({} node(s))",
                kubelets.len()
            ),
        );
    }
    let shown = old.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    let more = old.len().saturating_sub(5);
    // A warning: such a node may rightly stay (a virtual node, a pool kept
    // for unmeshed workloads); meshed pods that never start fail below.
    line(
        Verdict::Warn,
        format!(
            "{} node(s) run a kubelet older than 1.29 ({shown}{}): injected pods scheduled there never start; upgrade them or keep meshed pods off them",
            old.len(),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
        ),
    )
}

/// `v1.28.3-eks-1234` as `("1", "28")`.
fn version_parts(v: &str) -> (&str, &str) {
    let v = v.strip_prefix('v').unwrap_or(v);
    let mut parts = v.splitn(3, '.');
    let major = parts.next().unwrap_or("");
    let minor = parts.next().unwrap_or("");
    (major, minor)
}

/// Whether a Kubernetes version (`major`, `minor` as `/version` gives them:
/// some providers write `29+`) runs init containers with `restartPolicy:
/// Always` as sidecars: on by default from 1.29.
fn supports_native_sidecars(major: &str, minor: &str) -> bool {
    let number = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .ok()
    };
    match (number(major), number(minor)) {
        (Some(major), Some(minor)) => (major, minor) >= (1, 29),
        // Unknown: not refused on a guess.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str, ready: bool, deleted: bool) -> Pod {
        let mut metadata = serde_json::json!({"name": "p"});
        if deleted {
            metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        serde_json::from_value(serde_json::json!({
            "metadata": metadata,
            "spec": {
                "initContainers": [{"name": crate::inject::PROXY_CONTAINER, "restartPolicy": "Always"},
                                   {"name": crate::inject::INIT_CONTAINER}],
                "containers": [{"name": "app"}],
            },
            "status": {
                "phase": phase,
                "initContainerStatuses": [{
                    "name": crate::inject::PROXY_CONTAINER, "ready": ready,
                    "image": "", "imageID": "", "restartCount": 0,
                }],
            },
        }))
        .unwrap()
    }

    /// Mid-rotation, the pods whose proxies still hold the old bundle are
    /// named before the issuer moves: however the bundle's PEM is laid out,
    /// the same certificates are the same anchors.
    #[test]
    fn pods_holding_other_anchors_are_named() {
        let (old, new) = (
            crate::identity::ca::generate("cluster.local", std::time::Duration::from_secs(3600))
                .unwrap()
                .anchor_pem,
            crate::identity::ca::generate("cluster.local", std::time::Duration::from_secs(3600))
                .unwrap()
                .anchor_pem,
        );
        let given = |name: &str, pem: &str, phase: &str| {
            let mut p = pod(phase, true, false);
            p.metadata.name = Some(name.into());
            p.metadata.namespace = Some("shop".into());
            let proxy = &mut p.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0];
            proxy.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
                name: "STRAIT_PROXY_TRUST_ANCHORS_PEM".into(),
                value: Some(pem.into()),
                value_from: None,
            }]);
            p
        };
        let bundle = anchor_set(&format!("{old}{new}")).unwrap();
        let mut tally = StaleAnchors::default();
        for p in [
            given("both", &format!("{new}\n\n{old}"), "Running"),
            given("old-only", &old, "Running"),
            given("done", &old, "Succeeded"),
            pod("Running", true, false),
        ] {
            tally.count(&p, &bundle);
        }
        let l = tally.line("strait-system").expect("one pod to restart");
        assert_eq!(l.verdict, Verdict::Warn);
        assert!(
            l.what.contains("1 meshed pod(s)")
                && l.what.contains("shop/old-only")
                && l.what
                    .contains("kubectl -n strait-system rollout restart deploy/strait-controller"),
            "{}",
            l.what
        );
        let mut none = StaleAnchors::default();
        none.count(&given("both", &format!("{old}{new}"), "Running"), &bundle);
        assert!(none.line("strait-system").is_none());
    }

    /// After an upgrade, the pods still running the earlier proxy are named,
    /// but not those that name their own image or have finished.
    #[test]
    fn pods_running_an_earlier_proxy_are_named() {
        let with = |name: &str, image: &str, phase: &str, pinned: bool| {
            let mut p = pod(phase, true, false);
            p.metadata.name = Some(name.into());
            p.metadata.namespace = Some("shop".into());
            if pinned {
                p.metadata.annotations =
                    Some([(crate::inject::PROXY_IMAGE.to_string(), image.to_string())].into());
            }
            p.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0].image =
                Some(image.into());
            p
        };
        let (old, new) = ("r/strait-proxy:v0.0.9", "r/strait-proxy:v0.1.0");
        let mut tally = OtherProxies::default();
        for p in [
            with("current", new, "Running", false),
            with("earlier", old, "Running", false),
            with("pinned", old, "Running", true),
            with("done", old, "Succeeded", false),
        ] {
            tally.count(&p, new);
        }
        let l = tally.line(new).expect("one pod to restart");
        assert_eq!(l.verdict, Verdict::Warn);
        assert!(
            l.what.starts_with("1 meshed pod(s)")
                && l.what.contains("shop/earlier (r/strait-proxy:v0.0.9)"),
            "{}",
            l.what
        );
        let mut none = OtherProxies::default();
        none.count(&with("current", new, "Running", false), new);
        let digested = format!("{new}@sha256:ab");
        none.count(&with("digested", &digested, "Running", false), new);
        assert!(none.line(new).is_none(), "{:?}", none.line(new));
    }

    #[test]
    fn no_ready_proxy_fails_and_finished_pods_do_not_count() {
        let verdict = |pods: &[Pod]| {
            let mut tally = MeshedPods::default();
            pods.iter().for_each(|p| tally.count(p));
            tally.line().verdict
        };
        let running = |ready| pod("Running", ready, false);
        assert_eq!(verdict(&[running(false), running(false)]), Verdict::Fail);
        assert_eq!(verdict(&[running(true), running(false)]), Verdict::Warn);
        // Just installed: pods starting are not yet a failure; pods Pending
        // for long are stuck.
        assert_eq!(verdict(&[pod("Pending", false, false)]), Verdict::Warn);
        let mut stuck = pod("Pending", false, false);
        stuck.metadata.creation_timestamp =
            Some(serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).unwrap());
        assert_eq!(verdict(&[stuck]), Verdict::Fail);
        // A finished Job's pod and one being deleted keep a stopped proxy.
        let finished = [
            running(true),
            running(true),
            pod("Succeeded", false, false),
            pod("Failed", false, false),
            pod("Running", false, true),
        ];
        assert_eq!(verdict(&finished), Verdict::Ok);
        assert_eq!(verdict(&[pod("Succeeded", false, false)]), Verdict::Warn);
        // A ready proxy nothing sends traffic through is named.
        let mut tally = MeshedPods::default();
        let mut bare = running(true);
        bare.spec
            .as_mut()
            .unwrap()
            .init_containers
            .as_mut()
            .unwrap()
            .pop();
        for p in [running(true), bare] {
            tally.count(&p);
        }
        let l = tally.uncaptured_line().expect("one pod named");
        assert!(
            l.verdict == Verdict::Fail && l.what.starts_with("1 meshed pod(s)"),
            "{}",
            l.what
        );
        assert!(MeshedPods::default().uncaptured_line().is_none());
    }

    /// Pods the injector would mesh that run without a proxy are named (a
    /// labelled namespace's pods from before the label, a pod asking for it
    /// while the controller was down); those it would leave alone are not.
    #[test]
    fn pods_asked_to_be_meshed_without_a_proxy_are_named() {
        let plain = |ns: &str, name: &str, extra: serde_json::Value| -> Pod {
            let mut v = serde_json::json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]},
                "status": {"phase": "Running"},
            });
            json_patch::merge(&mut v, &extra);
            serde_json::from_value(v).unwrap()
        };
        let asked = Asked {
            enabled: ["shop".to_string()].into(),
            disabled: ["legacy".to_string()].into(),
            system: "strait-system".into(),
        };
        let annotated =
            serde_json::json!({"metadata": {"annotations": {crate::inject::INJECT: "enabled"}}});
        let mut meshed = pod("Running", true, false);
        meshed.metadata.namespace = Some("shop".into());
        for (p, want) in [
            (
                plain("shop", "before-the-label", serde_json::json!({})),
                true,
            ),
            (plain("other", "asked-while-down", annotated.clone()), true),
            (plain("other", "never-asked", serde_json::json!({})), false),
            (
                plain("legacy", "in-an-opted-out-namespace", annotated.clone()),
                false,
            ),
            (plain("strait-system", "the-controller", annotated), false),
            (
                plain(
                    "shop",
                    "host",
                    serde_json::json!({"spec": {"hostNetwork": true}}),
                ),
                false,
            ),
            (
                plain(
                    "shop",
                    "done",
                    serde_json::json!({"status": {"phase": "Succeeded"}}),
                ),
                false,
            ),
            (meshed, false),
            (
                plain(
                    "shop",
                    "kube-apiserver-static",
                    serde_json::json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "abc"}}}),
                ),
                false,
            ),
        ] {
            assert_eq!(asked.unmeshed(&p), want, "{:?}", p.metadata.name);
        }
    }

    /// A Job's pod that ended in `strait-init` is not retried in place, so
    /// no crash-looping pod names the node's problem: check does, with what
    /// the init container said, for an hour.
    #[test]
    fn pods_ended_by_the_init_container_are_named() {
        let ended = |exit: i32, at: &str| {
            let mut p = pod("Failed", false, false);
            p.status.as_mut().unwrap().init_container_statuses = Some(vec![serde_json::from_value(serde_json::json!({
                "name": crate::inject::INIT_CONTAINER, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit, "finishedAt": at,
                    "message": "iptables-nft-restore failed (exit status: 1): Warning: Extension owner revision 0 not supported, missing kernel module?"}}
            })).unwrap()]);
            p
        };
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let mut tally = MeshedPods::default();
        for p in [
            ended(1, &now),
            ended(0, &now),
            ended(1, "2026-01-01T00:00:00Z"),
            pod("Failed", false, false),
        ] {
            tally.count(&p);
        }
        let l = tally.init_failed_line().expect("one pod named");
        assert_eq!(l.verdict, Verdict::Fail);
        assert!(
            l.what.starts_with("1 meshed pod(s)") && l.what.contains("missing kernel module"),
            "{}",
            l.what
        );
        assert_eq!(tally.line().verdict, Verdict::Warn, "no pod running yet");
        assert!(MeshedPods::default().init_failed_line().is_none());
    }

    /// A namespace labelled for both meshes is named: its injected pods
    /// leave ambient without a word.
    #[test]
    fn namespaces_in_istio_s_ambient_mesh_too_are_named() {
        let ns = |name: &str, ambient: bool| -> Namespace {
            let mut labels = serde_json::json!({"strait.dev/inject": "enabled"});
            if ambient {
                labels["istio.io/dataplane-mode"] = "ambient".into();
            }
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "labels": labels}}),
            )
            .unwrap()
        };
        assert!(also_in_ambient(&[ns("a", false)]).is_none());
        let l = also_in_ambient(&[ns("a", false), ns("shop", true)]).unwrap();
        assert_eq!(l.verdict, Verdict::Warn);
        assert!(l.what.contains(": shop;"), "{}", l.what);
    }

    /// Routes and policies strait did not accept are named with its reason,
    /// a route once whatever its parents, with those refused; another
    /// controller's refusal of a route is not strait's to tell, nor is a
    /// refusal of an earlier generation.
    #[test]
    fn what_strait_did_not_accept_is_named() {
        use crate::kubernetes::Kind;
        let obj = |v: serde_json::Value| -> kube::api::DynamicObject {
            serde_json::from_value(v).unwrap()
        };
        let refused = |parent: &str, port: u16| {
            serde_json::json!({"controllerName": "strait.dev/controller",
                "parentRef": {"kind": "Service", "name": parent, "port": port},
                "conditions": [
                    {"type": "Accepted", "status": "False", "reason": "UnsupportedValue", "message": "ours"},
                    {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound", "message": "not this one"}]})
        };
        let route = obj(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop", "generation": 2},
            "status": {"parents": [
                {"controllerName": "example.io/gateway", "conditions": [{"type": "Accepted", "status": "False", "reason": "NotAllowed", "message": "theirs"}]},
                refused("web", 80),
                refused("api", 8080),
            ]},
        }));
        assert_eq!(
            not_accepted(Kind::HttpRoute, &route).as_deref(),
            Some(
                "shop/web (via Service web:80: UnsupportedValue: ours; via Service api:8080: UnsupportedValue: ours)"
            )
        );
        let policy = obj(serde_json::json!({
            "apiVersion": "policy.strait.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop", "generation": 3},
            "status": {"conditions": [{"type": "Accepted", "status": "False", "reason": "TargetNotFound", "message": "no Service wbe", "observedGeneration": 3}]},
        }));
        assert_eq!(
            not_accepted(Kind::AuthorizationPolicy, &policy).as_deref(),
            Some("shop/p (TargetNotFound: no Service wbe)")
        );
        // Fixed since: the refusal is of an earlier generation.
        let fixed = obj(serde_json::json!({
            "apiVersion": "policy.strait.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop", "generation": 4},
            "status": {"conditions": [{"type": "Accepted", "status": "False", "reason": "TargetNotFound", "message": "no Service wbe", "observedGeneration": 3}]},
        }));
        assert_eq!(not_accepted(Kind::AuthorizationPolicy, &fixed), None);
        let accepted = obj(serde_json::json!({
            "apiVersion": "policy.strait.dev/v1alpha1", "kind": "BackendPolicy",
            "metadata": {"name": "b", "namespace": "shop"},
            "status": {"conditions": [{"type": "Accepted", "status": "True"}]},
        }));
        assert_eq!(not_accepted(Kind::BackendPolicy, &accepted), None);
        let mut many = Named::default();
        for i in 0..7 {
            many.push_named(|| format!("HTTPRoute shop/r{i} (x: y)"));
        }
        let l = not_accepted_line(&many).unwrap();
        assert_eq!(l.verdict, Verdict::Warn);
        assert!(
            l.what.starts_with("7 route(s)") && l.what.contains(" and 2 more"),
            "{}",
            l.what
        );
        assert!(not_accepted_line(&Named::default()).is_none());
    }

    /// A LimitRange the injected proxy does not fit (20Mi requested under a
    /// 250Mi limit is a ratio of 12.5) refuses every meshed pod there, by
    /// an error naming no container: named, with what does not fit.
    #[test]
    fn limit_ranges_the_injected_proxy_does_not_fit_are_named() {
        let range = |ns: &str, limits: serde_json::Value| -> LimitRange {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "limits", "namespace": ns},
                "spec": {"limits": [limits]},
            }))
            .unwrap()
        };
        let none = Default::default();
        let mesh = crate::inject::ProxyResources::default();
        let fits = [
            range(
                "a",
                serde_json::json!({"type": "Container", "max": {"memory": "1Gi"}, "min": {"cpu": "1m"}}),
            ),
            range(
                "b",
                serde_json::json!({"type": "Pod", "max": {"memory": "1Gi"}}),
            ),
            range(
                "c",
                serde_json::json!({"type": "Container", "default": {"cpu": "500m"}, "maxLimitRequestRatio": {"cpu": "50"}}),
            ),
        ];
        assert!(limit_ranges_refusing(fits.iter(), &mesh, &none).is_none());
        let refusing = [
            range(
                "ratio",
                serde_json::json!({"type": "Container", "maxLimitRequestRatio": {"memory": "4"}}),
            ),
            range(
                "max",
                serde_json::json!({"type": "Container", "max": {"memory": "128Mi"}}),
            ),
            range(
                "min",
                serde_json::json!({"type": "Container", "min": {"cpu": "50m", "memory": "32Mi"}}),
            ),
            range(
                "cpu",
                serde_json::json!({"type": "Container", "default": {"cpu": "2"}, "maxLimitRequestRatio": {"cpu": "10"}}),
            ),
            range(
                "nolimit",
                serde_json::json!({"type": "Container", "maxLimitRequestRatio": {"cpu": "4"}}),
            ),
            range(
                "pod",
                serde_json::json!({"type": "Pod", "max": {"memory": "100Mi", "cpu": "2"}}),
            ),
        ];
        let l = limit_ranges_refusing(refusing.iter(), &mesh, &none).unwrap();
        assert_eq!(l.verdict, Verdict::Fail);
        for said in [
            "ratio/limits (memory limit 250Mi over request 20Mi above its maxLimitRequestRatio 4)",
            "max/limits (memory limit 250Mi above its max 128Mi)",
            "min/limits (cpu request 10m below its min 50m, memory request 20Mi below its min 32Mi)",
            "cpu/limits (cpu limit 2 over request 10m above its maxLimitRequestRatio 10)",
            "nolimit/limits (no cpu limit, which its maxLimitRequestRatio 4 needs)",
            "pod/limits (memory limit 250Mi above its pod max 100Mi alone)",
        ] {
            assert!(l.what.contains(said), "{said} not in {}", l.what);
        }
        // A namespace's ranges together: one's default is another's limit.
        let in_ns = |name: &str, limits: serde_json::Value| -> LimitRange {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "x"},
                "spec": {"limits": [limits]},
            }))
            .unwrap()
        };
        let together = [
            in_ns(
                "defaults",
                serde_json::json!({"type": "Container", "default": {"cpu": "500m"}}),
            ),
            in_ns(
                "ratio",
                serde_json::json!({"type": "Container", "maxLimitRequestRatio": {"cpu": "100"}}),
            ),
            in_ns(
                "pod",
                serde_json::json!({"type": "Pod", "max": {"cpu": "2"}}),
            ),
        ];
        assert!(limit_ranges_refusing(together.iter(), &mesh, &none).is_none());
        let clash = [
            in_ns(
                "defaults",
                serde_json::json!({"type": "Container", "default": {"cpu": "2"}}),
            ),
            in_ns(
                "max",
                serde_json::json!({"type": "Container", "max": {"cpu": "1"}}),
            ),
        ];
        let l = limit_ranges_refusing(clash.iter(), &mesh, &none).unwrap();
        assert!(
            l.what.contains("x/max (cpu limit 2 above its max 1)"),
            "{}",
            l.what
        );
        // The mesh's resources set to fit: nothing to say.
        let fitted = crate::inject::ProxyResources {
            proxy_cpu_request: Some("200m".into()),
            proxy_cpu_limit: Some("1".into()),
            proxy_memory_request: Some("64Mi".into()),
            proxy_memory_limit: Some("128Mi".into()),
        };
        assert!(limit_ranges_refusing(refusing[..2].iter(), &fitted, &none).is_none());
        // Meshed pods run there (annotated to fit): a warning.
        let running = ["max".to_string()].into_iter().collect();
        let l = limit_ranges_refusing(refusing[1..2].iter(), &mesh, &running).unwrap();
        assert_eq!(l.verdict, Verdict::Warn);
    }

    /// A labelled namespace that enforces `baseline` or `restricted` refuses
    /// every meshed pod; `privileged`, or no level, does not.
    #[test]
    fn namespaces_whose_pod_security_refuses_the_init_container_fail() {
        let ns = |name: &str, level: Option<&str>| -> Namespace {
            let mut labels = serde_json::json!({"strait.dev/inject": "enabled"});
            if let Some(l) = level {
                labels["pod-security.kubernetes.io/enforce"] = l.into();
            }
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "labels": labels}}),
            )
            .unwrap()
        };
        let none = Default::default();
        assert!(
            refusing_pod_security(&[ns("a", None), ns("b", Some("privileged"))], &none).is_none()
        );
        let mut unlabelled = ns("c", Some("restricted"));
        unlabelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove("strait.dev/inject");
        assert!(refusing_pod_security(&[unlabelled], &none).is_none());
        let l =
            refusing_pod_security(&[ns("a", None), ns("shop", Some("restricted"))], &none).unwrap();
        assert_eq!(l.verdict, Verdict::Fail);
        assert!(l.what.contains("shop (restricted)"), "{}", l.what);
        // Meshed pods run there: an exemption admits them.
        let running = ["shop".to_string()].into();
        assert!(refusing_pod_security(&[ns("shop", Some("restricted"))], &running).is_none());
    }

    /// The pods whose proxy is not ready are named, with what their mesh
    /// containers say: an init container that cannot write its rules and a
    /// proxy that is merely starting are told apart.
    #[test]
    fn pods_not_ready_are_named_with_why() {
        let mut crashing = pod("Pending", false, false);
        crashing.metadata.namespace = Some("shop".into());
        crashing.metadata.name = Some("web-1".into());
        let status = crashing.status.as_mut().unwrap();
        status.init_container_statuses = Some(vec![serde_json::from_value(serde_json::json!({
            "name": crate::inject::INIT_CONTAINER, "ready": false, "image": "", "imageID": "", "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "2026-12-06T10:00:00Z INFO starting\niptables-nft: Could not fetch rule set generation id\n\n"}},
        }))
        .unwrap()]);
        // Running, its startup probe not passed yet.
        let mut starting = pod("Running", false, false);
        starting.metadata.name = Some("web-2".into());
        starting.status.as_mut().unwrap().init_container_statuses =
            Some(vec![serde_json::from_value(serde_json::json!({
                "name": crate::inject::PROXY_CONTAINER, "ready": false, "image": "", "imageID": "", "restartCount": 2,
                "state": {"running": {}},
            }))
            .unwrap()]);
        // Never scheduled: the scheduler's reason.
        let mut pending = pod("Pending", false, false);
        pending.metadata.name = Some("web-3".into());
        pending.status.as_mut().unwrap().conditions = Some(vec![serde_json::from_value(serde_json::json!({
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "Pod not supported on Fargate: invalid SecurityContext fields: Capabilities added: NET_ADMIN",
        }))
        .unwrap()]);
        let mut tally = MeshedPods::default();
        for p in [pod("Running", true, false), crashing, starting, pending] {
            tally.count(&p);
        }
        let said = tally.line().what;
        assert!(
            said.contains("/web-3 (not scheduled: Unschedulable: Pod not supported on Fargate"),
            "{said}"
        );
        assert!(
            said.contains("shop/web-1 (strait-init: CrashLoopBackOff: iptables-nft: Could not fetch rule set generation id)"),
            "{said}"
        );
        assert!(
            said.contains("/web-2 (strait-proxy: running, not ready, 2 restart(s)"),
            "{said}"
        );
    }

    /// A CA certificate `cn` valid for `days`, signed by `by` (or itself).
    fn ca(
        cn: &str,
        days: i64,
        by: Option<&rcgen::Issuer<'static, rcgen::KeyPair>>,
    ) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        ca_of(&rcgen::PKCS_ECDSA_P256_SHA256, cn, days, by)
    }

    fn ca_of(
        alg: &'static rcgen::SignatureAlgorithm,
        cn: &str,
        days: i64,
        by: Option<&rcgen::Issuer<'static, rcgen::KeyPair>>,
    ) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
        let cert = match by {
            Some(by) => p.signed_by(&key, by).unwrap(),
            None => p.self_signed(&key).unwrap(),
        };
        (cert.pem(), rcgen::Issuer::new(p, key))
    }

    /// A rollout whose new pods cannot start hides behind the old ones'
    /// readiness: read as kubectl reads it, and not at all without an
    /// observed generation.
    #[test]
    fn an_unfinished_rollout_is_told() {
        let deployment = |status: serde_json::Value| -> Deployment {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "strait-controller", "generation": 2},
                "spec": {"replicas": 1, "selector": {}, "template": {}},
                "status": status,
            }))
            .unwrap()
        };
        // One replica, its successor crash-looping beside it.
        let stuck = deployment(serde_json::json!({
            "observedGeneration": 2, "replicas": 2, "updatedReplicas": 1,
            "readyReplicas": 1, "availableReplicas": 1,
        }));
        assert!(rolling_out(&stuck));
        // The new ReplicaSet's pods not even made (quota): zeros left out.
        let unmade = deployment(serde_json::json!({
            "observedGeneration": 2, "replicas": 1, "readyReplicas": 1, "availableReplicas": 1,
        }));
        assert!(rolling_out(&unmade));
        let done = deployment(serde_json::json!({
            "observedGeneration": 2, "replicas": 1, "updatedReplicas": 1,
            "readyReplicas": 1, "availableReplicas": 1,
        }));
        assert!(!rolling_out(&done));
        let unsaid = deployment(serde_json::json!({"replicas": 1, "readyReplicas": 1}));
        assert!(!rolling_out(&unsaid));
    }

    /// An issuer signed under the anchors is no issuer if the controller
    /// cannot sign with it: a key of another certificate, or no CA.
    #[test]
    fn an_issuer_the_controller_cannot_sign_with_fails() {
        let (_, root_ca) = ca("root.test", 3650, None);
        let signed = |is_ca: rcgen::IsCa, key: &rcgen::KeyPair| {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "issuer.test");
            p.is_ca = is_ca;
            p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
            p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
            p.signed_by(key, &root_ca).unwrap().pem()
        };
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ca_cert = signed(
            rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
            &key,
        );
        let l = issuer_key_line(&ca_cert, &key.serialize_pem());
        assert_eq!(l.verdict, Verdict::Ok, "{}", l.what);
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let l = issuer_key_line(&ca_cert, &other.serialize_pem());
        assert_eq!(l.verdict, Verdict::Fail, "{}", l.what);
        let leaf = signed(rcgen::IsCa::ExplicitNoCa, &key);
        let l = issuer_key_line(&leaf, &key.serialize_pem());
        assert_eq!(l.verdict, Verdict::Fail, "{}", l.what);
        assert!(l.what.contains("not a CA"), "{}", l.what);
    }

    /// Mid-rotation the bundle holds two anchors: the one the issuer is
    /// under is judged, not the first written; an expired one under no
    /// issuer is only told to be dropped.
    #[test]
    fn the_anchor_the_issuer_is_under_is_the_one_judged() {
        let (old, _) = ca("old.test", -1, None);
        let (new, new_ca) = ca("new.test", 400, None);
        let (issuer, _) = ca("issuer.test", 365, Some(&new_ca));
        let l = anchors_expiry(&format!("{old}{new}"), Some(&issuer));
        assert_eq!(l.verdict, Verdict::Warn, "{}", l.what);
        assert!(
            l.what.contains("CN=new.test) is valid") && l.what.contains("CN=old.test expired"),
            "{}",
            l.what
        );
        // The issuer still under the old one, which ends within the month,
        // written second: told, not hidden behind the first.
        let (old, old_ca) = ca("old.test", 10, None);
        let (issuer, _) = ca("issuer.test", 365, Some(&old_ca));
        let l = anchors_expiry(&format!("{new}{old}"), Some(&issuer));
        assert_eq!(l.verdict, Verdict::Warn, "{}", l.what);
        assert!(l.what.contains("(CN=old.test) expires in"), "{}", l.what);
        // No issuer to tell by: the earliest to end.
        let (gone, _) = ca("gone.test", -1, None);
        let l = anchors_expiry(&format!("{new}{gone}"), None);
        assert_eq!(l.verdict, Verdict::Fail, "{}", l.what);
        // One anchor, as most installs have: named as before.
        let l = anchors_expiry(&new, Some(&issuer));
        assert_eq!(l.verdict, Verdict::Ok, "{}", l.what);
        assert!(
            l.what.starts_with("the trust anchor is valid"),
            "{}",
            l.what
        );
    }

    /// The issuer's intermediates bound what it signs as much as it does:
    /// the earliest to end is the one told.
    #[test]
    fn an_intermediate_ending_before_the_issuer_is_told() {
        let (root, root_ca) = ca("root.test", 3650, None);
        let (mid, mid_ca) = ca("mid.test", 10, Some(&root_ca));
        let (issuer, _) = ca("issuer.test", 365, Some(&mid_ca));
        let chain = format!("{issuer}{mid}");
        let l = expiry("the issuer", &chain, true);
        assert_eq!(l.verdict, Verdict::Warn, "{}", l.what);
        assert!(
            l.what.contains("intermediate (CN=mid.test) expires in"),
            "{}",
            l.what
        );
        assert_eq!(expiry("the issuer", &issuer, true).verdict, Verdict::Ok);
        let (old_mid, old_mid_ca) = ca("mid.test", -1, Some(&root_ca));
        let (issuer, _) = ca("issuer.test", 365, Some(&old_mid_ca));
        let l = expiry("the issuer", &format!("{issuer}{old_mid}"), true);
        assert_eq!(l.verdict, Verdict::Fail, "{}", l.what);
        // The chain leads to the anchor; another anchor does not verify it.
        assert_eq!(chain_line(&chain, &root).verdict, Verdict::Ok);
        let (other_root, _) = ca("root.test", 3650, None);
        let l = chain_line(&chain, &other_root);
        assert_eq!(l.verdict, Verdict::Fail);
        assert!(
            l.what
                .starts_with("the issuer (CN=issuer.test) is not signed under"),
            "{}",
            l.what
        );
        // A bundle of old and new anchors, mid-rotation, holds the right one.
        assert_eq!(
            chain_line(&chain, &format!("{other_root}{root}")).verdict,
            Verdict::Ok
        );
        // An intermediate left out breaks the chain.
        assert_eq!(chain_line(&issuer_of(&chain), &root).verdict, Verdict::Fail);
    }

    /// The chain is built as the controller builds it: intermediates in any
    /// order, up to the first anchor met. An algorithm this check cannot
    /// verify (P-521) is not called a broken chain.
    #[test]
    fn the_chain_is_built_in_any_order_and_an_unknown_algorithm_is_not_a_failure() {
        let (root, root_ca) = ca("root.test", 3650, None);
        let (mid1, mid1_ca) = ca("mid1.test", 3650, Some(&root_ca));
        let (mid2, mid2_ca) = ca("mid2.test", 3650, Some(&mid1_ca));
        let (issuer, _) = ca("issuer.test", 365, Some(&mid2_ca));
        let l = chain_line(&format!("{issuer}{mid1}{mid2}"), &root);
        assert_eq!(l.verdict, Verdict::Ok, "{}", l.what);
        let l = chain_line(&format!("{issuer}{mid2}{mid1}{root}"), &mid1);
        assert_eq!(l.verdict, Verdict::Ok, "{}", l.what);
        let (big_root, big_ca) = ca_of(&rcgen::PKCS_ECDSA_P521_SHA512, "root.test", 3650, None);
        let (issuer, _) = ca("issuer.test", 365, Some(&big_ca));
        let l = chain_line(&issuer, &big_root);
        assert_eq!(l.verdict, Verdict::Warn, "{}", l.what);
        // An issuer of nobody's in the bundle fails, whatever algorithm the
        // other anchors use.
        let (_, stray_ca) = ca("stray.test", 3650, None);
        let (stray_issuer, _) = ca("issuer.test", 365, Some(&stray_ca));
        let l = chain_line(&stray_issuer, &format!("{big_root}{root}"));
        assert_eq!(l.verdict, Verdict::Fail, "{}", l.what);
        // The issuer itself among the anchors.
        let (issuer, _) = ca("issuer.test", 365, Some(&mid2_ca));
        assert_eq!(chain_line(&issuer, &issuer).verdict, Verdict::Ok);
        // Two intermediates of one name and key, cross-signed by an old root
        // gone from the bundle and the new one in it: the path that leads
        // to an anchor is found, whichever comes first.
        let (_, old_root_ca) = ca("root.test", 3650, None);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mid_params = || {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "mid.test");
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p
        };
        let cross = |by: &rcgen::Issuer<'static, rcgen::KeyPair>| {
            mid_params().signed_by(&key, by).unwrap().pem()
        };
        let (old_mid, new_mid) = (cross(&old_root_ca), cross(&root_ca));
        let mid_ca = rcgen::Issuer::new(mid_params(), key);
        let (issuer, _) = ca("issuer.test", 365, Some(&mid_ca));
        let l = chain_line(&format!("{issuer}{old_mid}{new_mid}"), &root);
        assert_eq!(l.verdict, Verdict::Ok, "{}", l.what);
        // Copies of one self-signed certificate that every copy verifies,
        // none an anchor: each is tried once, not every order of them.
        let (stray, _) = ca("stray.test", 3650, None);
        let started = std::time::Instant::now();
        let l = chain_line(&stray.repeat(MAX_CHAIN), &root);
        assert_eq!(l.verdict, Verdict::Fail, "{}", l.what);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            chain_line(&stray.repeat(MAX_CHAIN + 1), &root).verdict,
            Verdict::Fail
        );
    }

    /// The first certificate of a PEM chain.
    fn issuer_of(chain: &str) -> String {
        let end = "-----END CERTIFICATE-----";
        let at = chain.find(end).unwrap() + end.len();
        chain[..at].to_string()
    }

    /// What `strait install` generates passes; an issuer of another
    /// install, as after a rotation done out of order, fails.
    #[test]
    fn an_issuer_of_other_anchors_fails() {
        let a = crate::identity::ca::generate("cluster.local", Duration::from_secs(86400 * 365))
            .unwrap();
        let b = crate::identity::ca::generate("cluster.local", Duration::from_secs(86400 * 365))
            .unwrap();
        assert_eq!(
            chain_line(&a.issuer_cert_pem, &a.anchor_pem).verdict,
            Verdict::Ok
        );
        assert_eq!(
            chain_line(&b.issuer_cert_pem, &a.anchor_pem).verdict,
            Verdict::Fail
        );
        assert_eq!(chain_line("junk", &a.anchor_pem).verdict, Verdict::Fail);
    }

    /// A webhook without a caBundle is called under the API server's own
    /// roots and cannot be verified; a refused read is a warning.
    #[test]
    fn a_webhook_without_a_ca_bundle_fails_and_a_refused_read_warns() {
        let a = crate::identity::ca::generate("cluster.local", Duration::from_secs(86400)).unwrap();
        let pem = a.anchor_pem.trim_end().to_string();
        let anchors = Some(Some(format!("{pem}\n")));
        let config = |b: Option<&str>| WebhookClientConfig {
            ca_bundle: b.map(|b| k8s_openapi::ByteString(b.as_bytes().to_vec())),
            ..Default::default()
        };
        // The same certificate, written without the trailing newline.
        let both = ca_bundles([config(Some(&pem)), config(Some(&pem))].into_iter());
        let l = webhook_line(
            "w",
            Ok(Some(both)),
            anchors.as_ref(),
            None,
            "m",
            Verdict::Ok,
        );
        assert_eq!(l.verdict, Verdict::Ok);
        let other =
            crate::identity::ca::generate("cluster.local", Duration::from_secs(86400)).unwrap();
        let wrong = ca_bundles([config(Some(&other.anchor_pem))].into_iter());
        let l = webhook_line(
            "w",
            Ok(Some(wrong.clone())),
            anchors.as_ref(),
            None,
            "m",
            Verdict::Fail,
        );
        assert_eq!(l.verdict, Verdict::Fail);
        // Mid-rotation: old and new, in the other order, verify alike;
        // another CA beside them does too, said (a retired anchor still
        // trusted); a bundle missing one of them does not.
        let (old, new) = (pem.as_str(), other.anchor_pem.trim_end());
        let rotating = Some(Some(format!("{old}\n{new}\n")));
        for (bundle, want) in [
            (format!("{new}\n{old}\n"), Verdict::Ok),
            (
                format!("{new}\n{}{old}\n", a.issuer_cert_pem),
                Verdict::Warn,
            ),
            (new.to_string(), Verdict::Fail),
        ] {
            let b = ca_bundles([config(Some(&bundle))].into_iter());
            let l = webhook_line("w", Ok(Some(b)), rotating.as_ref(), None, "m", Verdict::Ok);
            assert_eq!(l.verdict, want, "{bundle}");
        }
        // The controller's own webhook certificate (cert-manager's): its CA
        // is the bundle, not the anchors; said, not failed.
        let own = Some("/etc/strait/webhook/tls.crt");
        let l = webhook_line(
            "w",
            Ok(Some(wrong)),
            anchors.as_ref(),
            own,
            "m",
            Verdict::Fail,
        );
        assert_eq!(l.verdict, Verdict::Warn, "{}", l.what);
        assert!(
            l.what
                .contains("--webhook-cert /etc/strait/webhook/tls.crt"),
            "{}",
            l.what
        );
        let one = ca_bundles([config(Some(&pem)), config(None)].into_iter());
        let l = webhook_line(
            "w",
            Ok(Some(one)),
            anchors.as_ref(),
            None,
            "m",
            Verdict::Fail,
        );
        assert_eq!(l.verdict, Verdict::Fail);
        let forbidden = kube::Error::Api(Box::new(
            kube::core::Status::failure("forbidden", "Forbidden").with_code(403),
        ));
        let l = webhook_line(
            "w",
            Err(forbidden),
            anchors.as_ref(),
            None,
            "m",
            Verdict::Fail,
        );
        assert_eq!(l.verdict, Verdict::Warn, "{}", l.what);
    }

    /// Routes are read at Gateway API's `v1` only: a CRD that does not
    /// serve it fails (HTTPRoute) or warns (GRPCRoute), as does a missing one.
    #[test]
    fn route_crds_must_serve_v1() {
        let crd = |versions: &[(&str, bool)], retry: bool| {
            let schema = if retry {
                serde_json::json!({"openAPIV3Schema": {"properties": {"retry": {}}}})
            } else {
                serde_json::json!({"openAPIV3Schema": {}})
            };
            let versions: Vec<serde_json::Value> = versions
                .iter()
                .map(|(name, served)| {
                    serde_json::json!({"name": name, "served": served, "storage": true, "schema": schema})
                })
                .collect();
            serde_json::from_value::<CustomResourceDefinition>(serde_json::json!({
                "metadata": {"name": "x"},
                "spec": {"group": "gateway.networking.k8s.io", "scope": "Namespaced",
                    "names": {"kind": "X", "plural": "x"}, "versions": versions},
            }))
            .unwrap()
        };
        let verdict = |l: Line| (l.verdict, l.what);
        let (v, what) = verdict(httproute_line(None));
        assert_eq!(v, Verdict::Fail);
        // Says what to run.
        assert!(
            what.contains("kubectl apply --server-side -f https://"),
            "{what}"
        );
        let (v, what) = verdict(httproute_line(Some(&crd(&[("v1beta1", true)], true))));
        assert_eq!(v, Verdict::Fail, "{what}");
        assert!(what.contains("does not serve v1"), "{what}");
        // Listed but no longer served.
        let off = crd(&[("v1", false), ("v1beta1", true)], true);
        assert_eq!(httproute_line(Some(&off)).verdict, Verdict::Fail);
        let standard = crd(&[("v1", true), ("v1beta1", true)], false);
        assert_eq!(httproute_line(Some(&standard)).verdict, Verdict::Warn);
        let experimental = crd(&[("v1", true)], true);
        assert_eq!(httproute_line(Some(&experimental)).verdict, Verdict::Ok);
        assert_eq!(grpcroute_line(None).verdict, Verdict::Warn);
        let (v, what) = verdict(grpcroute_line(Some(&crd(&[("v1alpha2", true)], false))));
        assert_eq!(v, Verdict::Warn, "{what}");
        assert!(what.contains("does not serve v1"), "{what}");
        let current = crd(&[("v1", true), ("v1alpha2", false)], false);
        assert_eq!(grpcroute_line(Some(&current)).verdict, Verdict::Ok);
    }

    /// A kubelet older than the API server is named: pods scheduled on it
    /// never start.
    #[test]
    fn an_old_kubelet_is_named() {
        let nodes = |vs: &[&str]| -> Vec<(String, String)> {
            (vs.iter().enumerate())
                .map(|(i, v)| (format!("node-{i}"), v.to_string()))
                .collect()
        };
        let ok = nodes_line(&nodes(&["v1.29.0", "v1.31.2-eks-1234", "v1.30.1+k3s1", ""]));
        assert_eq!(ok.verdict, Verdict::Ok, "{}", ok.what);
        let old = nodes_line(&nodes(&["v1.30.0", "v1.28.9-gke.100", "v1.27.3"]));
        assert_eq!(old.verdict, Verdict::Warn);
        assert!(
            old.what.starts_with(
                "2 node(s) run a kubelet older than 1.29 (node-1 v1.28.9-gke.100, node-2 v1.27.3)"
            ),
            "{}",
            old.what
        );
        let many = nodes_line(&nodes(&["v1.28.0"; 8]));
        assert!(
            many.what.contains("node-4 v1.28.0 and 3 more)"),
            "{}",
            many.what
        );
        assert_eq!(nodes_line(&[]).verdict, Verdict::Warn);
    }

    /// What an API server that lists two nodes a page at a time answers:
    /// `expiring` 410 Gone answers to the second page first (as after about
    /// five minutes of paging), each with a continue token to go on with when
    /// `inconsistent`, or 410 to the first page when `expiring` is `None`.
    /// With the requests it was sent.
    async fn kubelets_expiring(
        expiring: Option<usize>,
        inconsistent: bool,
    ) -> (Result<Vec<(String, String)>, String>, usize) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let requests = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let expired = std::sync::Arc::new(AtomicUsize::new(0));
        let api = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let query = req.uri().query().unwrap_or_default().to_string();
            let node = |name: &str| {
                format!(
                    r#"{{"metadata":{{"name":"{name}"}},"status":{{"nodeInfo":{{"kubeletVersion":"v1.30.0","architecture":"","bootID":"","containerRuntimeVersion":"","kernelVersion":"","kubeProxyVersion":"","machineID":"","operatingSystem":"","osImage":"","systemUUID":""}}}}}}"#
                )
            };
            let gone = |next: &str| {
                let token = if inconsistent {
                    format!(r#""continue":"{next}""#)
                } else {
                    String::new()
                };
                format!(
                    r#"{{"kind":"Status","apiVersion":"v1","metadata":{{{token}}},"status":"Failure","message":"The provided continue parameter is too old to display a consistent list result.","reason":"Expired","code":410}}"#
                )
            };
            let page_b = || {
                let b = node("node-b");
                (
                    200,
                    format!(
                        r#"{{"kind":"NodeList","apiVersion":"v1","metadata":{{}},"items":[{b}]}}"#
                    ),
                )
            };
            let (status, body) = if query.contains("continue=t2") {
                page_b()
            } else if !query.contains("continue=t1") {
                if expiring.is_none() {
                    (410, gone("t2"))
                } else {
                    let a = node("node-a");
                    (
                        200,
                        format!(
                            r#"{{"kind":"NodeList","apiVersion":"v1","metadata":{{"continue":"t1"}},"items":[{a}]}}"#
                        ),
                    )
                }
            } else if expired.fetch_add(1, Ordering::SeqCst) < expiring.unwrap_or(0) {
                (410, gone("t2"))
            } else {
                page_b()
            };
            std::future::ready(
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body.into_bytes())),
            )
        });
        let got = kubelets(&kube::Client::new(api, "default"))
            .await
            .map_err(|e| e.to_string());
        (got, requests.load(Ordering::SeqCst))
    }

    /// A list that outlives its continue token goes on with the token the
    /// 410 gives, or is read again from the start without one; what was read
    /// before is not counted twice, and a first page refused is not retried.
    #[tokio::test]
    async fn an_expired_list_goes_on_or_is_read_again_and_counted_once() {
        let names = |got: Result<Vec<(String, String)>, String>| -> Vec<String> {
            got.expect("listed").into_iter().map(|(n, _)| n).collect()
        };
        let both = vec!["node-a".to_string(), "node-b".to_string()];
        let (got, requests) = kubelets_expiring(Some(0), false).await;
        assert_eq!((names(got), requests), (both.clone(), 2));
        // Gone on from where it stopped, with the 410's token.
        let (got, requests) = kubelets_expiring(Some(1), true).await;
        assert_eq!((names(got), requests), (both.clone(), 3));
        // No token: from the start, twice at most.
        let (got, requests) = kubelets_expiring(Some(2), false).await;
        assert_eq!((names(got), requests), (both.clone(), 6));
        let (got, requests) = kubelets_expiring(Some(usize::MAX), false).await;
        let e = got.expect_err("given up on");
        assert!(e.contains("too old"), "{e}");
        assert_eq!(requests, 2 * (1 + LIST_EXPIRED as usize));
        // The first page itself refused: nothing to go on from.
        let (got, requests) = kubelets_expiring(None, true).await;
        assert!(got.is_err(), "{got:?}");
        assert_eq!(requests, 1);
    }

    /// Checks that could not be made are not passed: the last word says so,
    /// and a failure still fails.
    #[test]
    fn what_could_not_be_checked_is_not_called_working() {
        let refused = unread(
            "the issuer",
            &kube::Error::Api(
                kube::core::Status::failure("forbidden", "Forbidden")
                    .with_code(403)
                    .boxed(),
            ),
        );
        assert!(refused.unchecked && refused.verdict == Verdict::Warn);
        let ok = || line(Verdict::Ok, "the controller is ready (2 of 2 replicas)");
        assert_eq!(summary(&[ok()]).unwrap(), "strait is installed and working");
        let partly = summary(&[ok(), refused]).unwrap();
        assert!(partly.contains("1 check(s) could not be made"), "{partly}");
        assert!(summary(&[ok(), line(Verdict::Fail, "x")]).is_err());
    }

    #[test]
    fn calico_balancing_inside_pods_fails() {
        let verdict = |spec: serde_json::Value| calico_line(&spec).map(|l| l.verdict);
        assert_eq!(verdict(serde_json::json!({})), None, "iptables data plane");
        assert_eq!(verdict(serde_json::json!({"bpfEnabled": false})), None);
        for on in [
            serde_json::json!({"bpfEnabled": true}),
            serde_json::json!({"bpfEnabled": true, "bpfConnectTimeLoadBalancing": "TCP"}),
            serde_json::json!({"bpfEnabled": true, "bpfConnectTimeLoadBalancingEnabled": true}),
        ] {
            let l = calico_line(&on).unwrap();
            assert_eq!(l.verdict, Verdict::Fail, "{on}");
            assert!(
                l.what.contains("bpfConnectTimeLoadBalancing: Disabled"),
                "{}",
                l.what
            );
        }
        for off in [
            serde_json::json!({"bpfEnabled": true, "bpfConnectTimeLoadBalancing": "Disabled"}),
            serde_json::json!({"bpfEnabled": true, "bpfConnectTimeLoadBalancingEnabled": false}),
        ] {
            assert_eq!(verdict(off.clone()), Some(Verdict::Ok), "{off}");
        }
    }

    #[test]
    fn cilium_balancing_inside_pods_fails() {
        let config = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let verdict =
            |pairs: &[(&str, &str)]| cilium_line(&config(pairs)).map(|l| (l.verdict, l.what));
        // kube-proxy replacement balances at connect() by default.
        let (v, what) = verdict(&[("kube-proxy-replacement", "true")]).unwrap();
        assert_eq!(v, Verdict::Fail);
        assert!(what.contains("socketLB.hostNamespaceOnly=true"), "{what}");
        assert_eq!(
            verdict(&[
                ("kube-proxy-replacement", "strict"),
                ("bpf-lb-sock", "true")
            ])
            .unwrap()
            .0,
            Verdict::Fail
        );
        assert_eq!(
            verdict(&[("kube-proxy-replacement", "false"), ("bpf-lb-sock", "true")])
                .unwrap()
                .0,
            Verdict::Fail
        );
        assert_eq!(
            verdict(&[
                ("kube-proxy-replacement", "true"),
                ("bpf-lb-sock-hostns-only", "true")
            ])
            .unwrap()
            .0,
            Verdict::Ok
        );
        // No socket balancing: nothing to say.
        assert!(verdict(&[("kube-proxy-replacement", "false")]).is_none());
        assert_eq!(
            verdict(&[("kube-proxy-replacement", "true"), ("bpf-lb-sock", "false")])
                .unwrap()
                .0,
            Verdict::Fail,
            "the agent balances inside pods whatever bpf-lb-sock says"
        );
        assert!(verdict(&[]).is_none());
    }

    #[test]
    fn workloads_whose_meshed_pods_are_refused_are_named() {
        let rs = |name: &str, message: &str| -> ReplicaSet {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop"},
                "status": {"replicas": 0, "conditions": [{
                    "type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                    "message": message,
                }]},
            }))
            .unwrap()
        };
        let scc = rs(
            "web-5d9",
            "pods \"web-5d9-\" is forbidden: unable to validate against any security context constraint: [provider \"restricted-v2\": .initContainers[0].securityContext.capabilities.add: Invalid value: \"NET_ADMIN\": capability may not be added]",
        );
        let quota = rs(
            "db-7f2",
            "pods \"db-7f2-\" is forbidden: exceeded quota: compute",
        );
        // Its own container adds NET_ADMIN: the refusal is the app's.
        let mut vpn = rs(
            "vpn-1a2",
            "pods \"vpn-1a2-\" is forbidden: violates PodSecurity \"baseline:latest\": non-default capabilities (container \"vpn\" must not include \"NET_ADMIN\")",
        );
        vpn.spec = serde_json::from_value(serde_json::json!({
            "selector": {},
            "template": {"spec": {"containers": [{"name": "vpn",
                "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]}},
        }))
        .unwrap();
        let named: Vec<String> = [&scc, &quota, &vpn]
            .into_iter()
            .filter_map(refused_for_the_mesh)
            .collect();
        assert_eq!(
            named.len(),
            1,
            "a quota, or the app's own capability, is not the mesh's doing: {named:?}"
        );
        let mut refused = Named::default();
        named.iter().for_each(|r| refused.push_named(|| r.clone()));
        let l = refused_line(&refused).unwrap();
        assert_eq!(l.verdict, Verdict::Fail);
        assert!(l.what.contains("shop/web-5d9 (…"), "{}", l.what);
        assert!(l.what.contains("NET_ADMIN"), "{}", l.what);
        assert!(refused_line(&Named::default()).is_none());
    }

    #[test]
    fn native_sidecars_need_1_29() {
        assert!(supports_native_sidecars("1", "29"));
        assert!(supports_native_sidecars("1", "33+"));
        assert!(!supports_native_sidecars("1", "28"));
        assert!(!supports_native_sidecars("1", "27+"));
        assert!(supports_native_sidecars("", ""));
    }
}
