//! strait's AuthorizationPolicy (`policy.strait.dev/v1alpha1`): which workloads it
//! applies to (a Service by `targetRef`, or a label `selector`), their mTLS mode,
//! and which identities (or namespaces) may call, optionally per port. Turned here
//! into the inbound policy each proxy watches.

use std::collections::{BTreeMap, BTreeSet};

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use strait_api::v1 as api;

use crate::index::{ObjKey, Snapshot};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    #[default]
    Permissive,
    Strict,
}

/// The object a policy applies to: a Service (group "" or "core").
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetRef {
    /// "" (or "core").
    #[serde(default)]
    pub group: String,
    /// Service.
    pub kind: String,
    /// The Service's name, in the policy's namespace.
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// Labels a pod must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Who may call: one workload identity, or every workload of a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub enum Allow {
    /// A workload identity:
    /// spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
    #[serde(rename = "identity")]
    Identity(String),
    /// Every workload of this namespace.
    #[serde(rename = "namespace")]
    Namespace(String),
}

/// The AuthorizationPolicy resource: which workloads (a Service by
/// `targetRef`, or pods by label `selector`), their mTLS mode, and who may call.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema, CustomResource)]
#[kube(
    group = "policy.strait.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    doc = "Which workloads a policy covers, their mTLS mode (STRICT or PERMISSIVE), and which identities may call them.",
    status = "crate::crds::PolicyStatus",
    shortname = "authz",
    category = "strait",
    printcolumn = r#"{"name":"mTLS","type":"string","jsonPath":".spec.mtls"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationSpec {
    /// The Service whose pods this policy covers; or `selector`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    /// The pods of the policy's namespace it covers, by label; or
    /// `targetRef`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// STRICT: only mTLS from the mesh; PERMISSIVE (the default): plaintext
    /// too, unless another policy covering the port says STRICT (STRICT wins).
    #[serde(default)]
    pub mtls: MtlsMode,
    /// The workload's own ports this applies to; empty for all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Who may call; empty: this policy sets only the mode (callers are those
    /// any policy covering the port lists, or, where none lists any, every
    /// identity of the mesh and, PERMISSIVE, plaintext).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Allow>,
}

pub use crate::spec::SpecError;

#[derive(Deserialize)]
struct Object {
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: AuthorizationSpec,
}

/// Parses and validates one AuthorizationPolicy object.
pub fn parse(v: &serde_json::Value) -> Result<(ObjKey, AuthorizationSpec), SpecError> {
    let o: Object = serde_path_to_error::deserialize(v).map_err(|e| SpecError {
        field: e.path().to_string(),
        reason: e.inner().to_string(),
    })?;
    let err = |field: &str, reason: String| SpecError {
        field: field.to_string(),
        reason,
    };
    let name = o
        .metadata
        .name
        .ok_or_else(|| err("metadata.name", "missing".into()))?;
    let key = ObjKey {
        namespace: o.metadata.namespace.unwrap_or_else(|| "default".into()),
        name,
    };
    let mut s = o.spec;
    // SPIFFE trust domains are lower case: an entry that spells one
    // otherwise names the same trust domain (and was taken before they were
    // checked, so refusing it now would seal its namespace on an upgrade).
    for a in &mut s.allow {
        if let Allow::Identity(id) = a
            && let Some(rest) = id.strip_prefix("spiffe://")
        {
            let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
            if td.bytes().any(|b| b.is_ascii_uppercase()) {
                *id = format!("spiffe://{}/{path}", td.to_ascii_lowercase());
            }
        }
    }
    match (&s.target_ref, &s.selector) {
        (Some(t), None) if t.kind == "Service" && (t.group.is_empty() || t.group == "core") => {}
        (Some(t), None) => {
            return Err(err(
                "spec.targetRef.kind",
                format!("{:?}: only Service can be targeted", t.kind),
            ));
        }
        (None, Some(sel)) => {
            // A label no pod can carry (`app: "*"`, as a glob) would select
            // nothing while the policy reads Accepted: its STRICT or allow
            // list would never apply.
            for (k, v) in &sel.match_labels {
                let field = format!("spec.selector.matchLabels[{k:?}]");
                if !crate::spec::label_key(k) {
                    return Err(err(&field, format!("{k:?} is not a label key")));
                }
                if !crate::spec::label_value(v) {
                    return Err(err(
                        &field,
                        format!(
                            "{v:?} is not a label value (selectors match values exactly: no wildcards)"
                        ),
                    ));
                }
            }
        }
        _ => {
            return Err(err(
                "spec",
                "exactly one of targetRef and selector is required".into(),
            ));
        }
    }
    if s.ports.contains(&0) {
        return Err(err("spec.ports", "0 is not a port".into()));
    }
    crate::spec::SpecError::at_most(
        "spec.ports",
        s.ports.len(),
        crate::defaults::MAX_POLICY_PORTS,
    )?;
    crate::spec::SpecError::at_most(
        "spec.allow",
        s.allow.len(),
        crate::defaults::MAX_POLICY_ALLOW,
    )?;
    for (i, a) in s.allow.iter().enumerate() {
        match a {
            Allow::Identity(id) if !valid_identity(id) => {
                return Err(err(
                    &format!("spec.allow[{i}].identity"),
                    format!(
                        "{id:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (no wildcards)"
                    ),
                ));
            }
            Allow::Namespace(ns) if !strait_api::identity::valid_part(ns) => {
                return Err(err(
                    &format!("spec.allow[{i}].namespace"),
                    format!("{ns:?} is not a namespace name"),
                ));
            }
            _ => {}
        }
    }
    Ok((key, s))
}

/// The proxies' own grammar: an entry they could not read must not get this far.
fn valid_identity(s: &str) -> bool {
    s.parse::<strait_api::identity::Identity>().is_ok()
}

/// The AuthorizationPolicies of one namespace.
pub fn in_namespace<'s>(
    snap: &'s Snapshot,
    namespace: &str,
) -> impl Iterator<Item = (&'s ObjKey, &'s AuthorizationSpec)> {
    let from = ObjKey {
        namespace: namespace.to_string(),
        name: String::new(),
    };
    let namespace = from.namespace.clone();
    snap.authorizations
        .range(from..)
        .take_while(move |(k, _)| k.namespace == namespace)
}

/// Whether a policy applies to a pod.
fn applies(snap: &Snapshot, key: &ObjKey, spec: &AuthorizationSpec, pod: &ObjKey) -> bool {
    if key.namespace != pod.namespace {
        return false;
    }
    if let Some(sel) = &spec.selector {
        let Some(p) = snap.pods.get(pod) else {
            return false;
        };
        return sel
            .match_labels
            .iter()
            .all(|(k, v)| p.labels.get(k) == Some(v));
    }
    if let Some(t) = &spec.target_ref {
        let svc = ObjKey {
            namespace: key.namespace.clone(),
            name: t.name.clone(),
        };
        return selects(snap, &svc, pod)
            || snap.slices.get(&svc).is_some_and(|slices| {
                slices
                    .values()
                    .any(|s| s.pods.binary_search(pod).is_ok() || unnamed_at(snap, s, pod))
            });
    }
    false
}

/// Whether the slice lists the pod's address without naming a pod, and the pod
/// is alone there: the pod the Service's callers reach (see `index::view`).
fn unnamed_at(snap: &Snapshot, slice: &crate::index::SliceInfo, pod: &ObjKey) -> bool {
    if slice.unnamed.is_empty() {
        return false;
    }
    snap.pods.get(pod).is_some_and(|p| {
        p.ips.iter().any(|ip| {
            slice.unnamed.binary_search(ip).is_ok()
                && snap.pod_at(*ip).is_some_and(|(k, _)| k == pod)
        })
    })
}

/// Whether the Service's selector picks the pod. Its slices list a new pod
/// only once Kubernetes has written them, after the pod's proxy may have
/// asked for its policy: by the selector the pod is covered from its first
/// answer. Slices still count, for a Service without a selector.
fn selects(snap: &Snapshot, svc: &ObjKey, pod: &ObjKey) -> bool {
    let (Some(s), Some(p)) = (snap.services.get(svc), snap.pods.get(pod)) else {
        return false;
    };
    // Kubernetes reads an empty selector as none: it picks no pod.
    !s.selector.is_empty() && s.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
}

/// What a pod's view may still take, in bytes of its entries, before it is
/// too large to send.
struct Budget(usize);

/// The view would pass `MAX_POLICY_VIEW_BYTES`.
struct TooLarge;

impl Budget {
    fn spend(&mut self, bytes: usize) -> Result<(), TooLarge> {
        self.0 = self.0.checked_sub(bytes).ok_or(TooLarge)?;
        Ok(())
    }
}

/// What an entry of the view counts for: its name and a little for its framing.
fn entry_bytes(name: &str) -> usize {
    name.len() + 8
}

#[cfg(test)]
thread_local! {
    /// Allow entries `Merged::add` has looked at, to show where merging stops.
    static VISITED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[derive(Clone, Default)]
struct Merged {
    strict: bool,
    allow: BTreeSet<(u8, String)>,
    /// What `allow` counts for against the bound.
    bytes: usize,
}

impl Merged {
    /// Only an entry not held yet is counted: a list repeated by many
    /// policies is in the view once, and does not close the pod.
    fn add(&mut self, spec: &AuthorizationSpec, budget: &mut Budget) -> Result<(), TooLarge> {
        self.strict |= spec.mtls == MtlsMode::Strict;
        for a in &spec.allow {
            #[cfg(test)]
            VISITED.with(|v| v.set(v.get() + 1));
            let entry = match a {
                Allow::Identity(i) => (0, i.clone()),
                Allow::Namespace(n) => (1, n.clone()),
            };
            let bytes = entry_bytes(&entry.1);
            if self.allow.insert(entry) {
                budget.spend(bytes)?;
                self.bytes += bytes;
            }
        }
        Ok(())
    }

    fn to_api(&self, port: u16) -> api::PortPolicy {
        api::PortPolicy {
            port: u32::from(port),
            mode: if self.strict {
                api::MtlsMode::Strict
            } else {
                api::MtlsMode::Permissive
            } as i32,
            allow: self
                .allow
                .iter()
                .map(|(t, v)| api::Authorization {
                    subject: Some(if *t == 0 {
                        api::authorization::Subject::Identity(api::WorkloadIdentity {
                            spiffe_id: v.clone(),
                        })
                    } else {
                        api::authorization::Subject::Namespace(v.clone())
                    }),
                })
                .collect(),
        }
    }
}

/// What decides a pod's inbound policy within one snapshot: its namespace,
/// which of that namespace's policies apply to it (by their place in
/// `in_namespace`), and its probes. The pods of one workload have the same,
/// so one answer serves them all.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyInputs {
    namespace: String,
    applying: Vec<usize>,
    probes: Vec<api::ProbeRoute>,
}

// Probe routes compare as plain values (no floats), whatever prost derives.
impl Eq for PolicyInputs {}

impl std::hash::Hash for PolicyInputs {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.namespace.hash(h);
        self.applying.hash(h);
        for p in &self.probes {
            (p.port, p.kind, &p.path).hash(h);
        }
    }
}

impl PolicyInputs {
    pub fn of(snap: &Snapshot, pod: &ObjKey) -> Self {
        let applying = in_namespace(snap, &pod.namespace)
            .enumerate()
            .filter(|(_, (key, spec))| applies(snap, key, spec, pod))
            .map(|(i, _)| i)
            .collect();
        PolicyInputs {
            namespace: pod.namespace.clone(),
            applying,
            probes: snap
                .pods
                .get(pod)
                .map(|p| p.probes.clone())
                .unwrap_or_default(),
        }
    }
}

/// The inbound policy of one pod: every policy that applies, merged (STRICT if any
/// says so; the union of their allow lists, empty meaning everyone).
pub fn workload_policy(snap: &Snapshot, pod: &ObjKey) -> api::WorkloadPolicy {
    policy_of(snap, &PolicyInputs::of(snap, pod), pod)
}

/// The inbound policy that `inputs` make in `snap`; `pod`, one that has
/// them, is named if it is too large.
pub fn policy_of(snap: &Snapshot, inputs: &PolicyInputs, pod: &ObjKey) -> api::WorkloadPolicy {
    let probes = inputs.probes.clone();
    if snap.sealed_namespaces.contains(&inputs.namespace) {
        return sealed(probes);
    }
    let mut applying = inputs.applying.iter().peekable();
    let specs = in_namespace(snap, &inputs.namespace)
        .enumerate()
        .filter(|(i, _)| applying.next_if_eq(&i).is_some())
        .map(|(_, (_, spec))| spec);
    match merge(specs) {
        Ok((default, ports)) => api::WorkloadPolicy {
            ports,
            default: Some(default),
            probes,
        },
        Err(TooLarge) => {
            strait_otel::sampled!(
                warn,
                pod = %pod,
                max = crate::defaults::MAX_POLICY_VIEW_BYTES,
                "the AuthorizationPolicies of this pod make an inbound policy too large to send: every caller is refused until they shrink (fewer ports per policy, namespace entries for many identities)"
            );
            sealed(probes)
        }
    }
}

/// The all-ports policy and each named port's. Each port's list repeats the
/// all-ports one, so the view grows as ports times entries, and policies per
/// namespace are not counted: a tenant's policies could make it hundreds of
/// MB, past what a proxy reads. Counted as it is built and given up as soon
/// as it passes the bound (the pod then closed rather than open), so what
/// merging holds stays within the bound, and its work within that and the
/// policies' own size.
fn merge<'s>(
    specs: impl Iterator<Item = &'s AuthorizationSpec>,
) -> Result<(api::PortPolicy, Vec<api::PortPolicy>), TooLarge> {
    let mut budget = Budget(crate::defaults::MAX_POLICY_VIEW_BYTES);
    let mut all_ports = Merged::default();
    let mut per_port: BTreeMap<u16, Vec<&AuthorizationSpec>> = BTreeMap::new();
    for spec in specs {
        if spec.ports.is_empty() {
            all_ports.add(spec, &mut budget)?;
        } else {
            for p in &spec.ports {
                per_port.entry(*p).or_default().push(spec);
            }
        }
    }
    let mut ports = Vec::with_capacity(per_port.len());
    for (port, specs) in per_port {
        budget.spend(all_ports.bytes)?;
        let mut m = all_ports.clone();
        for s in specs {
            m.add(s, &mut budget)?;
        }
        ports.push(m.to_api(port));
    }
    Ok((all_ports.to_api(0), ports))
}

/// STRICT, allowing an entry that names nobody: every caller refused, on
/// every proxy version (an unreadable entry narrows access).
fn sealed(probes: Vec<api::ProbeRoute>) -> api::WorkloadPolicy {
    api::WorkloadPolicy {
        ports: vec![],
        default: Some(api::PortPolicy {
            port: 0,
            mode: api::MtlsMode::Strict as i32,
            allow: vec![api::Authorization { subject: None }],
        }),
        probes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot with one pod, `shop/web-0`, and no policy.
    fn with_web_pod() -> (Snapshot, ObjKey) {
        let mut snap = Snapshot::empty("cluster.local");
        let pod = ObjKey {
            namespace: "shop".into(),
            name: "web-0".into(),
        };
        snap.pods.insert(
            pod.clone(),
            crate::index::PodInfo {
                inbound_port: Some(4143),
                service_account: "web".into(),
                labels: Default::default(),
                probes: Vec::new(),
                ips: Vec::new(),
                skip_inbound: Vec::new(),
                opaque: Vec::new(),
                node: None,
                host_ports: Vec::new(),
                deleting: false,
            },
        );
        (snap, pod)
    }

    /// A tenant's policies cannot make a pod's view grow as ports times
    /// entries without bound: past the bound the pod refuses every caller.
    #[test]
    fn a_view_too_large_to_send_closes_the_pod_rather_than_growing() {
        let (mut snap, pod) = with_web_pod();
        let policy = |name: &str, spec: serde_json::Value| {
            parse(&serde_json::json!({
                "apiVersion": "policy.strait.dev/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": "shop"}, "spec": spec,
            }))
            .unwrap()
        };
        let many: Vec<serde_json::Value> = (0..1024)
            .map(|i| serde_json::json!({"identity": format!("spiffe://cluster.local/ns/callers/sa/{:0>60}", i)}))
            .collect();
        let (k, s) = policy(
            "everyone-listed",
            serde_json::json!({"selector": {}, "allow": many}),
        );
        snap.authorizations.insert(k, s);
        let small = workload_policy(&snap, &pod);
        assert_eq!(small.default.as_ref().unwrap().allow.len(), 1024);
        // The same list again for each of 256 ports: about 25 MB unbounded.
        let ports: Vec<u16> = (1..=256).collect();
        let (k, s) = policy(
            "ports",
            serde_json::json!({"selector": {}, "ports": ports, "mtls": "STRICT"}),
        );
        snap.authorizations.insert(k, s);
        let view = workload_policy(&snap, &pod);
        assert!(view.ports.is_empty(), "{} ports", view.ports.len());
        let default = view.default.unwrap();
        assert_eq!(default.mode, api::MtlsMode::Strict as i32);
        assert_eq!(default.allow, [api::Authorization { subject: None }]);

        // Many policies repeating one list on a few ports are counted as the
        // view they make (the list once per port), not as their sum.
        snap.authorizations.clear();
        for team in 0..40 {
            let (k, s) = policy(
                &format!("team-{team}"),
                serde_json::json!({"selector": {}, "ports": [8080, 9090], "allow": many}),
            );
            snap.authorizations.insert(k, s);
        }
        let view = workload_policy(&snap, &pod);
        assert_eq!(view.ports.len(), 2);
        assert!(view.ports.iter().all(|p| p.allow.len() == 1024));
    }

    /// Merging stops as soon as the view passes the bound: what the
    /// controller spends on a pod's policy does not grow with how many
    /// policies a tenant makes, and a view just under the bound is whole.
    #[test]
    fn merging_stops_once_the_view_is_too_large() {
        let (mut snap, pod) = with_web_pod();
        // Each entry counts for 100 bytes, each policy for 102,400: 40 of
        // them fit under 4 MiB, 41 do not.
        let entry = 100;
        let team = |t: usize| AuthorizationSpec {
            target_ref: None,
            selector: Some(Selector::default()),
            mtls: MtlsMode::Permissive,
            ports: Vec::new(),
            allow: (0..crate::defaults::MAX_POLICY_ALLOW)
                .map(|i| {
                    let sa = format!("{:0>55}", t * crate::defaults::MAX_POLICY_ALLOW + i);
                    Allow::Identity(format!("spiffe://cluster.local/ns/callers/sa/{sa}"))
                })
                .collect(),
        };
        let add = |snap: &mut Snapshot, teams: std::ops::Range<usize>| {
            for t in teams {
                let key = ObjKey {
                    namespace: "shop".into(),
                    name: format!("team-{t:03}"),
                };
                snap.authorizations.insert(key, team(t));
            }
        };
        assert_eq!(
            entry_bytes(&format!("spiffe://cluster.local/ns/callers/sa/{:0>55}", 0)),
            entry
        );
        add(&mut snap, 0..40);
        let whole = workload_policy(&snap, &pod).default.unwrap();
        assert_eq!(whole.allow.len(), 40 * crate::defaults::MAX_POLICY_ALLOW);
        assert_eq!(whole.mode, api::MtlsMode::Permissive as i32);

        // 100 such policies: about 10 MB of entries, every one applying.
        add(&mut snap, 40..100);
        VISITED.with(|v| v.set(0));
        let view = workload_policy(&snap, &pod);
        let default = view.default.unwrap();
        assert_eq!(default.mode, api::MtlsMode::Strict as i32);
        assert_eq!(default.allow, [api::Authorization { subject: None }]);
        // Given up at the first entry past the bound, not after all 102,400.
        let visited = VISITED.with(|v| v.get());
        assert_eq!(
            visited,
            crate::defaults::MAX_POLICY_VIEW_BYTES / entry + 1,
            "entries merged"
        );
    }

    /// A pod's policies are its namespace's and no other's, however close
    /// their names sort.
    #[test]
    fn only_the_pods_own_namespace_counts() {
        let mut snap = Snapshot::empty("cluster.local");
        for ns in ["sho", "shop", "shop-2", "shopa"] {
            let (k, s) = parse(&serde_json::json!({
                "apiVersion": "policy.strait.dev/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "a", "namespace": ns},
                "spec": {"selector": {}, "allow": [{"namespace": ns}]},
            }))
            .unwrap();
            snap.authorizations.insert(k, s);
        }
        let names: Vec<&str> = in_namespace(&snap, "shop")
            .map(|(k, _)| k.namespace.as_str())
            .collect();
        assert_eq!(names, ["shop"]);
        assert_eq!(in_namespace(&snap, "web").count(), 0);
    }

    /// A `targetRef` policy covers the Service's pods whatever their
    /// slices' address type: an IPv6-only Service's pods were left open.
    #[test]
    fn a_target_ref_policy_covers_the_pods_of_an_ipv6_only_service() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["fd00::9"], targetRef: {kind: Pod, name: web-0}}]
---
apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  mtls: STRICT
  allow: [{identity: spiffe://cluster.local/ns/shop/sa/client}]
"#;
        let mut snap = Snapshot::empty("cluster.local");
        for o in crate::manifests::parse_file(yaml).unwrap() {
            o.insert_into(&mut snap);
        }
        let of = |name: &str| {
            workload_policy(
                &snap,
                &ObjKey {
                    namespace: "shop".into(),
                    name: name.into(),
                },
            )
            .default
            .unwrap()
        };
        let web = of("web-0");
        assert_eq!(web.mode, api::MtlsMode::Strict as i32);
        assert_eq!(web.allow.len(), 1, "{:?}", web.allow);
        // A pod the Service does not name is not covered.
        assert_eq!(of("other-0").mode, api::MtlsMode::Permissive as i32);
    }

    /// A new pod is covered by its Service's `targetRef` policy from its
    /// first answer: Kubernetes lists it in a slice only later, and until
    /// then its proxy went ready on the open default.
    #[test]
    fn a_target_ref_policy_covers_a_pod_its_service_selects_before_a_slice_lists_it() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: by-hand, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  mtls: STRICT
---
apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: by-hand, namespace: shop}
spec:
  targetRef: {kind: Service, name: by-hand}
  mtls: STRICT
"#;
        let (mut snap, _) = with_web_pod();
        for o in crate::manifests::parse_file(yaml).unwrap() {
            o.insert_into(&mut snap);
        }
        let labelled = |app: &str| crate::index::PodInfo {
            labels: [("app".to_string(), app.to_string())].into(),
            ..snap.pods.values().next().unwrap().clone()
        };
        let pod = |ns: &str, name: &str| ObjKey {
            namespace: ns.into(),
            name: name.into(),
        };
        let (web, other, elsewhere) = (labelled("web"), labelled("other"), labelled("web"));
        snap.pods.insert(pod("shop", "web-1"), web);
        snap.pods.insert(pod("shop", "other-0"), other);
        snap.pods.insert(pod("front", "web-0"), elsewhere);
        let mode = |p: ObjKey| workload_policy(&snap, &p).default.unwrap().mode;
        let (strict, permissive) = (
            api::MtlsMode::Strict as i32,
            api::MtlsMode::Permissive as i32,
        );
        assert_eq!(mode(pod("shop", "web-1")), strict, "no slice lists it yet");
        assert_eq!(mode(pod("shop", "other-0")), permissive);
        // The selector picks pods of the Service's own namespace only.
        assert_eq!(mode(pod("front", "web-0")), permissive);
        // A Service without a selector picks no pod: its slices decide. The
        // unlabelled `shop/web-0` is in none of them.
        assert_eq!(mode(pod("shop", "web-0")), permissive);
        // Listed in one of them (among others), a pod is covered.
        let slice = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: by-hand-1, namespace: shop, labels: {kubernetes.io/service-name: by-hand}}
addressType: IPv4
ports: [{name: http, port: 80}]
endpoints:
  - {addresses: ["10.0.0.9"], targetRef: {kind: Pod, name: zz-9}}
  - {addresses: ["10.0.0.8"], targetRef: {kind: Pod, name: other-0}}
  - {addresses: ["10.0.0.1"], targetRef: {kind: Pod, name: aa-1}}
"#;
        for o in crate::manifests::parse_file(slice).unwrap() {
            o.insert_into(&mut snap);
        }
        let mode = |p: ObjKey| workload_policy(&snap, &p).default.unwrap().mode;
        assert_eq!(mode(pod("shop", "other-0")), strict);
        assert_eq!(mode(pod("shop", "web-0")), permissive);
    }

    /// Endpoints an operator writes for a Service without a selector may
    /// name no pod (Patroni's leader Endpoints): the pod alone at such an
    /// address is what the Service reaches, and its `targetRef` policy covers
    /// it, as it covers a pod a slice names.
    #[test]
    fn a_target_ref_policy_covers_the_pod_at_an_endpoint_naming_none() {
        let others = r#"
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, annotations: {strait.dev/inbound-port: "4143"}}
spec: {serviceAccountName: db, containers: [{name: db, image: db}]}
status: {phase: Running, podIP: 10.1.0.10, podIPs: [{ip: 10.1.0.10}]}
---
apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-leader, namespace: shop}
spec:
  targetRef: {kind: Service, name: db-leader}
  mtls: STRICT
"#;
        let yaml = format!(
            "{}---\n{others}",
            crate::index::view::tests::LEADER_NAMING_NO_POD
        );
        let mode = shop_modes(&yaml);
        assert_eq!(mode("db-0"), api::MtlsMode::Strict as i32);
        assert_eq!(mode("db-1"), api::MtlsMode::Permissive as i32);
    }

    /// The mTLS mode each pod of `shop` (by name) gets, with `yaml` applied.
    fn shop_modes(yaml: &str) -> impl Fn(&str) -> i32 {
        let mut snap = Snapshot::empty("cluster.local");
        for o in crate::manifests::parse_file(yaml).unwrap() {
            o.insert_into(&mut snap);
        }
        move |name| {
            let pod = ObjKey {
                namespace: "shop".into(),
                name: name.into(),
            };
            workload_policy(&snap, &pod).default.unwrap().mode
        }
    }

    /// A selector's labels are all required, as a Kubernetes label selector's
    /// are: `{app: web, tier: canary}` covers the canary pods only, not every
    /// `app: web` pod (which it would open or seal).
    #[test]
    fn a_selector_covers_pods_with_all_its_labels() {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}, annotations: {strait.dev/inbound-port: "4143"}}
spec: {serviceAccountName: web, containers: [{name: web, image: web}]}
status: {phase: Running, podIP: 10.1.0.1, podIPs: [{ip: 10.1.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-canary-0, namespace: shop, labels: {app: web, tier: canary}, annotations: {strait.dev/inbound-port: "4143"}}
spec: {serviceAccountName: web, containers: [{name: web, image: web}]}
status: {phase: Running, podIP: 10.1.0.2, podIPs: [{ip: 10.1.0.2}]}
---
apiVersion: policy.strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: canary, namespace: shop}
spec:
  selector: {matchLabels: {app: web, tier: canary}}
  mtls: STRICT
"#;
        let mode = shop_modes(yaml);
        assert_eq!(mode("web-canary-0"), api::MtlsMode::Strict as i32);
        assert_eq!(mode("web-0"), api::MtlsMode::Permissive as i32);
    }

    #[test]
    fn policies_need_one_target_and_valid_identities() {
        let v = serde_json::json!({
            "apiVersion": "policy.strait.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": "STRICT",
                     "allow": [{"identity": "spiffe://cluster.local/ns/shop/sa/client"}, {"namespace": "ops"}]}
        });
        let (k, s) = parse(&v).unwrap();
        assert_eq!(k.name, "web");
        assert_eq!(s.mtls, MtlsMode::Strict);
        assert_eq!(s.allow.len(), 2);

        let mut bad = v.clone();
        bad["spec"]["allow"][0]["identity"] = "web".into();
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.field, "spec.allow[0].identity");
        // What the proxies could not read (and would have to ignore) is refused here.
        bad["spec"]["allow"][0]["identity"] = "spiffe://cluster.local/ns/shop/sa/*".into();
        assert_eq!(parse(&bad).unwrap_err().field, "spec.allow[0].identity");
        // A trust domain spelt in capitals is the same one, not a refusal.
        let mut upper = v.clone();
        upper["spec"]["allow"][0]["identity"] = "spiffe://Cluster.Local/ns/shop/sa/client".into();
        let (_, s) = parse(&upper).unwrap();
        assert!(
            matches!(&s.allow[0], Allow::Identity(id) if id == "spiffe://cluster.local/ns/shop/sa/client")
        );
        let mut bad = v.clone();
        bad["spec"]["allow"][1]["namespace"] = "*".into();
        assert_eq!(parse(&bad).unwrap_err().field, "spec.allow[1].namespace");

        let mut bad = v.clone();
        bad["spec"]["mtls"] = "SOMETIMES".into();
        assert!(parse(&bad).unwrap_err().field.contains("mtls"));

        let mut bad = v.clone();
        bad["spec"]["targetRef"] = serde_json::json!({"kind": "Service", "name": "web"});
        assert_eq!(parse(&bad).unwrap_err().field, "spec");

        // A selector no pod's labels can match is refused, naming the label.
        for (k, val) in [("app", "*"), ("my app", "web")] {
            let mut bad = v.clone();
            bad["spec"]["selector"]["matchLabels"] = serde_json::json!({k: val});
            let e = parse(&bad).unwrap_err();
            assert_eq!(
                e.field,
                format!("spec.selector.matchLabels[{k:?}]"),
                "{e:?}"
            );
        }
    }
}
