//! The Kubernetes source: watchers on the kinds strait reads, feeding the same
//! index as the manifests source, object by object.
//!
//! Each kind has its own watcher (kube-runtime: it lists, then watches from
//! the list's resourceVersion with bookmarks, resumes a dropped watch where it
//! was, relists on 410 Gone, and backs off on errors). Objects are turned into
//! the index's form in the watcher's task and the full objects dropped there,
//! so the controller holds only what the mesh uses (a Pod is its service
//! account, labels and inbound port). One task applies the changes to the
//! index and publishes it at most once per `MANIFEST_DEBOUNCE`, so a burst of
//! events costs one snapshot.

pub mod lease;
pub mod status;
pub mod tokens;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PartialObjectMeta};
use kube::runtime::utils::Backoff as _;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use prometheus_client::metrics::gauge::Gauge;
use strait_api::essential::Essential;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::defaults;
use crate::index::{Snapshot, SnapshotBuilder};
use crate::manifests::{ObjId, Object, parse_object};
use crate::metrics::Metrics;
use crate::source::Source;
use status::{StatusInput, Statuses};

/// The kinds strait watches. The optional ones are CRDs a cluster may not have
/// (Gateway API's, or strait's before `strait crds` is applied): their absence
/// is an empty list, reported once, not an error that holds readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    /// Only their zones, for topology-aware routing: their metadata is watched.
    Node,
    HttpRoute,
    GrpcRoute,
    AuthorizationPolicy,
    BackendPolicy,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Node,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::AuthorizationPolicy,
        Kind::BackendPolicy,
    ];

    /// The watch of this kind, as the log names it.
    fn watch_name(self) -> &'static str {
        match self {
            Kind::Service => "the Service watch",
            Kind::EndpointSlice => "the EndpointSlice watch",
            Kind::Pod => "the Pod watch",
            Kind::Node => "the Node watch",
            Kind::HttpRoute => "the HTTPRoute watch",
            Kind::GrpcRoute => "the GRPCRoute watch",
            Kind::AuthorizationPolicy => "the AuthorizationPolicy watch",
            Kind::BackendPolicy => "the BackendPolicy watch",
        }
    }

    /// The kind, as a metric's label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::BackendPolicy => "BackendPolicy",
        }
    }

    fn optional(self) -> bool {
        matches!(
            self,
            Kind::HttpRoute | Kind::GrpcRoute | Kind::AuthorizationPolicy | Kind::BackendPolicy
        )
    }

    /// Gateway API's route kinds, whose status is per parent.
    pub fn is_route(self) -> bool {
        matches!(self, Kind::HttpRoute | Kind::GrpcRoute)
    }

    /// Kinds the ClusterRole of an earlier release did not let the
    /// controller read: refused, they are as good as absent, rather than
    /// holding the whole index back during an upgrade.
    fn added_later(self) -> bool {
        self.is_route() || self == Kind::Node
    }

    /// The custom kinds, as the API serves them.
    pub fn resource(self) -> Option<ApiResource> {
        let (group, version, kind, plural) = match self {
            Kind::HttpRoute => ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
            Kind::GrpcRoute => ("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes"),
            Kind::AuthorizationPolicy => (
                "policy.strait.dev",
                "v1alpha1",
                "AuthorizationPolicy",
                "authorizationpolicies",
            ),
            Kind::BackendPolicy => (
                "policy.strait.dev",
                "v1alpha1",
                "BackendPolicy",
                "backendpolicies",
            ),
            _ => return None,
        };
        Some(ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, kind),
            plural,
        ))
    }
}

/// One object's change, already in the index's form.
#[derive(Debug)]
enum Change {
    /// The object as it is now: what it means to the index (`None`: nothing,
    /// such as an HTTPRoute of a Gateway), or why it is refused.
    Apply {
        kind: Kind,
        name: String,
        object: Box<Result<Option<Object>, String>>,
        /// What its status is computed from (custom kinds only).
        status: Option<Box<StatusInput>>,
        initial: bool,
        /// `metadata.uid`: which object of that name this is.
        uid: Option<String>,
    },
    Delete {
        kind: Kind,
        name: String,
    },
    /// A (re)list starts: objects not listed again by `Listed` are gone.
    Relist(Kind),
    Listed(Kind),
    /// The API does not serve this (optional) kind.
    Absent(Kind),
}

pub struct KubernetesSource {
    client: Client,
    trust_domain: String,
    metrics: Arc<Metrics>,
    statuses: watch::Sender<Statuses>,
}

impl KubernetesSource {
    /// `statuses` receives what the objects' statuses are computed from.
    pub fn new(
        client: Client,
        trust_domain: &str,
        metrics: Arc<Metrics>,
        statuses: watch::Sender<Statuses>,
    ) -> Self {
        KubernetesSource {
            client,
            trust_domain: trust_domain.to_string(),
            metrics,
            statuses,
        }
    }
}

impl Source for KubernetesSource {
    async fn run(self, tx: watch::Sender<Arc<Snapshot>>, clean: watch::Sender<bool>) {
        let (changes_tx, mut changes) = mpsc::channel::<Change>(1024);
        // A watch that ended (a panic) would leave its kind as it last was
        // for as long as the controller runs: the source ends with it, and
        // the controller stops.
        let mut watches = Essential::new();
        for kind in Kind::ALL {
            let (c, out) = (self.client.clone(), changes_tx.clone());
            let failing = self
                .metrics
                .watch_failing
                .get_or_create(&crate::metrics::KindLabels { kind: kind.label() })
                .clone();
            watches.spawn(kind.watch_name(), watch_kind(c, kind, out, failing));
        }
        drop(changes_tx);
        let mut index = Index::new(&self.trust_domain);
        let mut published = false;
        loop {
            let first = tokio::select! {
                c = changes.recv() => match c {
                    Some(c) => c,
                    None => break,
                },
                ended = watches.ended() => {
                    error!(watch = %ended, "a watch of the API server stopped");
                    break;
                }
            };
            let since = tokio::time::Instant::now();
            index.apply(first);
            // Whatever else has arrived within the debounce goes in the same snapshot.
            let deadline = tokio::time::Instant::now() + defaults::MANIFEST_DEBOUNCE;
            while let Ok(Some(c)) = tokio::time::timeout_at(deadline, changes.recv()).await {
                index.apply(c);
            }
            index.seal();
            let whole = index.listed.len() == Kind::ALL.len();
            if whole && index.dirty {
                let snap = index.publish(since);
                self.metrics.observe_snapshot(&snap);
                if tx.send(snap).is_err() {
                    break;
                }
                index.dirty = false;
                if !published {
                    published = true;
                    info!(
                        services = index.snap.services.len(),
                        endpoints = index.snap.endpoint_count(),
                        pods = index.snap.pods.len(),
                        "index loaded from the API server"
                    );
                }
            }
            // After the snapshot they are read against.
            if whole && index.statuses_dirty {
                self.statuses.send_replace(Arc::new(index.statuses.clone()));
                index.statuses_dirty = false;
            }
            clean.send_if_modified(|c| std::mem::replace(c, whole) != whole);
        }
    }
}

/// The index being built, and which object of the API each entry came from.
struct Index {
    snap: Snapshot,
    ids: HashMap<(Kind, String), ObjId>,
    /// The uid of the object each entry of `ids` came from. One of the same
    /// name with another uid is another object (deleted and created again,
    /// perhaps while no watch was open): refused, it does not keep its
    /// predecessor's last good form in force.
    uids: HashMap<(Kind, String), String>,
    statuses: HashMap<(Kind, String), StatusInput>,
    relisting: HashMap<Kind, HashSet<String>>,
    listed: HashSet<Kind>,
    dirty: bool,
    statuses_dirty: bool,
    /// AuthorizationPolicies refused with no good version to keep: their
    /// workloads would be open, so their namespaces are sealed while any is.
    refused_policies: HashSet<String>,
}

impl Index {
    /// The snapshot to serve for the changes first seen at `since`: numbered
    /// after the last one, and dated by that change, which is what push
    /// latency and the proxies' discovery lag are measured from (left as
    /// they were, they measured the controller's uptime).
    fn publish(&mut self, since: tokio::time::Instant) -> Arc<Snapshot> {
        self.snap.version += 1;
        self.snap.built = since;
        Arc::new(self.snap.clone())
    }

    fn new(trust_domain: &str) -> Self {
        Index {
            snap: Snapshot {
                every_pod_indexed: true,
                ..Snapshot::empty(trust_domain)
            },
            ids: HashMap::new(),
            uids: HashMap::new(),
            statuses: HashMap::new(),
            relisting: HashMap::new(),
            listed: HashSet::new(),
            dirty: true,
            statuses_dirty: true,
            refused_policies: HashSet::new(),
        }
    }

    /// Seals the namespaces of refused policies (and unseals the rest), as
    /// the next snapshot will carry them.
    fn seal(&mut self) {
        let sealed: BTreeSet<String> = self
            .refused_policies
            .iter()
            .filter_map(|n| n.split_once('/').map(|(ns, _)| ns.to_string()))
            .collect();
        if sealed != self.snap.sealed_namespaces {
            if !sealed.is_empty() {
                warn!(policies = ?self.refused_policies, namespaces = ?sealed, "AuthorizationPolicies refused with no last good version: every pod of their namespaces refuses every caller until they are fixed or deleted");
            }
            self.snap.sealed_namespaces = sealed;
            self.dirty = true;
        }
    }

    fn apply(&mut self, c: Change) {
        match c {
            Change::Apply {
                kind,
                name,
                object,
                status,
                initial,
                uid,
            } => {
                if initial && let Some(seen) = self.relisting.get_mut(&kind) {
                    seen.insert(name.clone());
                }
                match status {
                    // Statuses are published on their own: a status input
                    // changing (each write of strait's own moves its version)
                    // makes no snapshot.
                    Some(st) if self.statuses.get(&(kind, name.clone())) != Some(&*st) => {
                        self.statuses.insert((kind, name.clone()), *st);
                        self.statuses_dirty = true;
                    }
                    Some(_) => {}
                    // No longer strait's to report on (a route that lost its
                    // Service parents, its entries taken out): not kept.
                    None => {
                        if self.statuses.remove(&(kind, name.clone())).is_some() {
                            self.statuses_dirty = true;
                        }
                    }
                }
                match *object {
                    // A bad object keeps its last good form (or stays out),
                    // as a bad manifest does.
                    Err(e) => {
                        let key = (kind, name);
                        let another = uid
                            .as_ref()
                            .is_some_and(|u| self.uids.get(&key).is_some_and(|was| was != u));
                        if another {
                            warn!(?kind, object = %key.1, error = %e, "object rejected; it replaced another of its name, whose last good state is dropped");
                            self.forget(&key);
                        } else if kind == Kind::Pod {
                            // A Pod's phase and addresses are the kubelet's:
                            // its last good form would hold its addresses
                            // after it ended, taking the next pod given
                            // them out of the mesh (two claims of an
                            // address count as none).
                            warn!(?kind, object = %key.1, error = %e, "pod rejected; left out of its Services' endpoints until it is mended");
                            self.forget(&key);
                        } else {
                            warn!(?kind, object = %key.1, error = %e, "object rejected; its last good state stays in force");
                        }
                        if kind == Kind::AuthorizationPolicy && !self.ids.contains_key(&key) {
                            self.refused_policies.insert(key.1);
                        }
                    }
                    Ok(obj) => {
                        if kind == Kind::AuthorizationPolicy {
                            self.refused_policies.remove(&name);
                        }
                        let key = (kind, name);
                        // An update that changes nothing strait keeps (a Pod's
                        // status, a resync) makes no new snapshot: each one
                        // wakes every proxy's stream.
                        let unchanged = match &obj {
                            Some(obj) => {
                                obj.id().is_some_and(|id| self.ids.get(&key) == Some(&id))
                                    && obj.is_in(&self.snap)
                            }
                            // Not strait's (a route of Gateways only), as before.
                            None => !self.ids.contains_key(&key),
                        };
                        if unchanged {
                            if let Some(uid) = uid.filter(|_| self.ids.contains_key(&key)) {
                                self.uids.insert(key, uid);
                            }
                            return;
                        }
                        self.forget(&key);
                        if let Some(obj) = obj
                            && let Some(id) = obj.id()
                        {
                            obj.insert_into(&mut self.snap);
                            if let Some(uid) = uid {
                                self.uids.insert(key.clone(), uid);
                            }
                            self.ids.insert(key, id);
                        }
                        self.dirty = true;
                    }
                }
            }
            Change::Delete { kind, name } => {
                if kind == Kind::AuthorizationPolicy {
                    self.refused_policies.remove(&name);
                }
                if self.statuses.remove(&(kind, name.clone())).is_some() {
                    self.statuses_dirty = true;
                }
                self.forget(&(kind, name));
            }
            Change::Relist(kind) => {
                self.relisting.insert(kind, HashSet::new());
            }
            Change::Listed(kind) => {
                if let Some(seen) = self.relisting.remove(&kind) {
                    self.keep_only(kind, &seen);
                }
                self.listed.insert(kind);
                self.dirty = true;
            }
            Change::Absent(kind) => {
                // No such kind served (its CRD removed, and its objects with
                // it, their deletes perhaps missed while no watch was open),
                // or a route kind the controller may not read: none of it is
                // used, refused, or written status for. Not so strait's
                // policies: a passing 404 (an API server restarting, its CRDs
                // not served yet) would open what they guard; they stay in
                // force, and the namespaces of refused ones sealed, until a
                // list says they are gone.
                self.relisting.remove(&kind);
                if kind != Kind::AuthorizationPolicy && self.keep_only(kind, &HashSet::new()) {
                    self.dirty = true;
                }
                self.listed.insert(kind);
            }
        }
    }

    /// Takes an object's entries out of the index, if it has any.
    fn forget(&mut self, key: &(Kind, String)) {
        self.uids.remove(key);
        if let Some(old) = self.ids.remove(key) {
            old.remove_from(&mut self.snap);
            self.dirty = true;
        }
    }

    /// Forgets every object of `kind` not in `seen`, with its status, and
    /// says whether the index changed.
    fn keep_only(&mut self, kind: Kind, seen: &HashSet<String>) -> bool {
        let gone: Vec<_> = self
            .ids
            .keys()
            .filter(|(k, n)| *k == kind && !seen.contains(n))
            .cloned()
            .collect();
        let changed = !gone.is_empty();
        for key in gone {
            self.forget(&key);
        }
        // Unsealing what they sealed is `seal`'s.
        if kind == Kind::AuthorizationPolicy {
            self.refused_policies.retain(|n| seen.contains(n));
        }
        let before = self.statuses.len();
        self.statuses
            .retain(|(k, n), _| *k != kind || seen.contains(n));
        self.statuses_dirty |= self.statuses.len() != before;
        changed
    }
}

fn name_of<K: Resource>(o: &K) -> String {
    format!(
        "{}/{}",
        o.meta().namespace.as_deref().unwrap_or("default"),
        o.meta().name.as_deref().unwrap_or("")
    )
}

async fn watch_kind(client: Client, kind: Kind, out: mpsc::Sender<Change>, failing: Gauge) {
    // The API server ends each watch within this (a bookmark keeps the
    // next one cheap), and one gone quiet is made again 5 s after: kube's
    // default (290 s) left the index frozen for five minutes behind an API
    // server lost without a word, while the replica read as ready.
    let config = watcher::Config::default().timeout(defaults::WATCH_TIMEOUT.as_secs() as u32);
    match kind {
        Kind::Service => {
            let api: Api<Service> = Api::all(client);
            run_watcher(api, config, kind, out, failing.clone(), |s| {
                let o = SnapshotBuilder::service(s)
                    .map(|(k, i)| Some(Object::Service(k, i)))
                    .map_err(|e| e.to_string());
                (o, None)
            })
            .await
        }
        Kind::EndpointSlice => {
            let api: Api<EndpointSlice> = Api::all(client);
            // Only slices that name their Service: others (written by other
            // tools, which Kubernetes allows) are not read at all.
            let config = config.labels(defaults::SERVICE_NAME_LABEL);
            run_watcher(api, config, kind, out, failing.clone(), |s| {
                (api_slice(s), None)
            })
            .await
        }
        Kind::Pod => {
            let api: Api<Pod> = Api::all(client);
            run_watcher(api, config, kind, out, failing.clone(), |p| {
                let o = SnapshotBuilder::pod(p)
                    .map(|(k, i)| Some(Object::Pod(k, i)))
                    .map_err(|e| e.to_string());
                (o, None)
            })
            .await
        }
        Kind::Node => {
            // Metadata only (kube asks for `PartialObjectMetadata` for this
            // type): a Node's status (its images, conditions) is most of it,
            // changes every few minutes, and none of it is used.
            let api: Api<PartialObjectMeta<Node>> = Api::all(client);
            run_watcher(api, config, kind, out, failing.clone(), |n| {
                let o = SnapshotBuilder::node(&n.metadata)
                    .map(|(name, zone)| Some(Object::Node(name, zone)))
                    .map_err(|e| e.to_string());
                (o, None)
            })
            .await
        }
        _ => {
            let Some(ar) = kind.resource() else { return };
            let api: Api<DynamicObject> = Api::all_with(client, &ar);
            let (api_version, kind_name) = (ar.api_version.clone(), ar.kind.clone());
            run_watcher(api, config, kind, out, failing.clone(), move |o| {
                let mut v = match serde_json::to_value(o) {
                    Ok(v) => v,
                    Err(e) => return (Err(e.to_string()), None),
                };
                // Watch events carry the type; a List's items may not.
                v["apiVersion"] = serde_json::Value::String(api_version.clone());
                v["kind"] = serde_json::Value::String(kind_name.clone());
                let parsed = parse_object(v.clone()).map_err(|e| e.to_string());
                let error = parsed.as_ref().err().cloned();
                let object = parsed.map(|mut objects| objects.pop().filter(|o| o.id().is_some()));
                // A route of Gateways only is not strait's to report on,
                // unless strait's entries from when it had a Service parent
                // are still there, to be taken out.
                let status = StatusInput::of(kind, &v, error);
                let ours =
                    !kind.is_route() || !status.targets.is_empty() || status.has_entries_of_ours();
                let status = ours.then(|| Box::new(status));
                (object, status)
            })
            .await
        }
    }
}

/// An EndpointSlice from the API server. One that names no Service is no
/// error there (another tool's; the watch asks for those that do, but its
/// label may be taken off): not kept, as a slice that was deleted.
fn api_slice(s: &EndpointSlice) -> Result<Option<Object>, String> {
    let named = s
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(defaults::SERVICE_NAME_LABEL));
    if !named {
        return Ok(None);
    }
    SnapshotBuilder::slice(s)
        .map(|(svc, name, i)| Some(Object::EndpointSlice(svc, name, i)))
        .map_err(|e| e.to_string())
}

async fn run_watcher<K, F>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    out: mpsc::Sender<Change>,
    failing_gauge: Gauge,
    convert: F,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(&K) -> (Result<Option<Object>, String>, Option<Box<StatusInput>>),
{
    let mut absent = false;
    // Once the kind has been read, a 403 is an authorizer's passing refusal
    // (one restarting, its caches cold), not an earlier release's role:
    // retried, and what was read stays in force.
    let mut read_once = false;
    // Paced here rather than by the watcher's own backoff, which is reset by
    // any event: a relist announces itself (`Init`) before it lists, so a list
    // that failed every time was retried every second for ever, a full list
    // of the kind each time, from every replica. Only the watch's own events
    // reset it (a list that succeeds and a watch that then fails at once, as
    // from an API server behind the list's, is no progress), and two minutes
    // without an error.
    let mut backoff = watcher::DefaultBackoff::default();
    let mut events = std::pin::pin!(watcher::watcher(api.clone(), config.clone()));
    while let Some(ev) = events.next().await {
        if matches!(ev, Ok(Event::Apply(_) | Event::Delete(_))) {
            backoff.reset();
        }
        if matches!(ev, Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_))) {
            failing_gauge.set(0);
        }
        // A custom kind not served while its CRD is defined: an API server
        // starting (its CRDs' resources come after it answers). Taken for
        // absence, a controller starting then would go ready without any
        // policy and open every workload they guard, and one running would
        // take every route and backend policy off every proxy; retried
        // instead (not ready meanwhile, if not yet).
        let crd = if kind.optional()
            && matches!(&ev, Err(e @ watcher::Error::InitialListFailed(_)) if api_code(e) == Some(404))
        {
            crd_serving(api.clone().into_client(), kind).await
        } else {
            Crd::Missing
        };
        // A route CRD of an earlier Gateway API release, serving only other
        // versions than the one read here, is there for good: absent, not
        // waited on (that would keep the controller from ever going ready).
        // Strait's own policies are waited on whatever the reason: a
        // policy left unread would open what it guards.
        let not_served_yet = match &crd {
            Crd::Serves => true,
            Crd::ServesOnly(_) => !kind.is_route(),
            Crd::Missing => false,
        };
        // Once, as the watch's own failure is: repeats are at each backoff.
        if let (Crd::ServesOnly(versions), false) = (&crd, kind.is_route())
            && failing_gauge.get() == 0
        {
            warn!(
                ?kind,
                served = ?versions,
                wanted = kind.resource().map(|ar| ar.version),
                "the CRD does not serve the version this controller reads (CRDs of another release?); not ready until it does"
            );
        }
        let change = match ev {
            Ok(Event::Init) => Change::Relist(kind),
            Ok(Event::InitApply(o)) => {
                let (object, status) = convert(&o);
                Change::Apply {
                    kind,
                    name: name_of(&o),
                    object: Box::new(object),
                    status,
                    initial: true,
                    uid: o.meta().uid.clone(),
                }
            }
            Ok(Event::InitDone) => {
                absent = false;
                read_once = true;
                Change::Listed(kind)
            }
            Ok(Event::Apply(o)) => {
                let (object, status) = convert(&o);
                Change::Apply {
                    kind,
                    name: name_of(&o),
                    object: Box::new(object),
                    status,
                    initial: false,
                    uid: o.meta().uid.clone(),
                }
            }
            Ok(Event::Delete(o)) => Change::Delete {
                kind,
                name: name_of(&o),
            },
            // A route kind, or Nodes, the controller may not read (RBAC of a
            // release before it read GRPCRoutes or Nodes) is as good as absent: holding the
            // whole index back for it would stop every update. Not so for
            // strait's policies, whose absence would open workloads. Only a
            // list says so: a watch resumed after one may meet a passing 404
            // (an API server restarting, its CRDs not yet served), and taking
            // that for absence would forget refused policies that no event
            // brings back, opening their sealed namespaces.
            Err(e)
                if matches!(e, watcher::Error::InitialListFailed(_))
                    && !not_served_yet
                    && (kind.optional() && api_code(&e) == Some(404)
                        || kind.added_later() && !read_once && api_code(&e) == Some(403)) =>
            {
                // Refused, the kind's routes or zones are silently off: as a
                // failing watch, alerted on (a CRD not installed is not).
                if api_code(&e) == Some(403) {
                    failing_gauge.set(1);
                }
                if !absent {
                    absent = true;
                    if api_code(&e) == Some(403) {
                        warn!(
                            ?kind,
                            error = %e,
                            "not allowed to read this kind (the ClusterRole of an earlier release?); none are used until it is"
                        );
                    } else if let Crd::ServesOnly(versions) = &crd {
                        warn!(
                            ?kind,
                            served = ?versions,
                            "the CRD does not serve v1, the only version read (Gateway API before 1.1 for GRPCRoute, 1.0 for HTTPRoute); none are used until its CRDs are upgraded"
                        );
                    } else {
                        warn!(
                            ?kind,
                            "the API server does not serve this kind (CRD not installed?); none are used until it does"
                        );
                    }
                    if out.send(Change::Absent(kind)).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(backoff.next().unwrap_or(WATCH_BACKOFF_MAX)).await;
                continue;
            }
            Err(e) => {
                // The watcher resumes (or relists) after a backoff. The first
                // error after progress is a warning (403: RBAC; a kind not
                // served), repeats are not.
                if failing_gauge.set(1) == 1 {
                    debug!(?kind, error = %e, "watch failed again; retrying");
                } else {
                    warn!(?kind, error = %e, "watch failed; retrying with backoff");
                }
                tokio::time::sleep(backoff.next().unwrap_or(WATCH_BACKOFF_MAX)).await;
                // An optional kind's watch that meets a 404 is retried as a
                // list, which says whether the kind is gone (its CRD removed
                // while no watch was open, the deletes of its objects missed)
                // or was not served for a moment (and lists it again whole).
                if kind.optional() && api_code(&e) == Some(404) {
                    events.set(watcher::watcher(api.clone(), config.clone()));
                }
                continue;
            }
        };
        if out.send(change).await.is_err() {
            return;
        }
    }
}

/// The longest wait between a failed list or watch and the next: kube-rs's
/// default backoff's cap, as client-go's reflector's.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What `kind`'s CustomResourceDefinition says of the version read here.
enum Crd {
    /// It serves it (a 404 for it is an API server starting).
    Serves,
    /// It is there, serving only these versions.
    ServesOnly(Vec<String>),
    /// It is not there, or may not be read (a ClusterRole of a release
    /// before it could): as before, the kind's 404 taken for absence.
    Missing,
}

async fn crd_serving(client: Client, kind: Kind) -> Crd {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let Some(ar) = kind.resource() else {
        return Crd::Missing;
    };
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    match crds.get_opt(&format!("{}.{}", ar.plural, ar.group)).await {
        Ok(Some(crd)) => {
            let served = crd.spec.versions.iter().filter(|v| v.served);
            if served.clone().any(|v| v.name == ar.version) {
                Crd::Serves
            } else {
                Crd::ServesOnly(served.map(|v| v.name.clone()).collect())
            }
        }
        Ok(None) => Crd::Missing,
        Err(kube::Error::Api(s)) if s.code == 403 => Crd::Missing,
        Err(_) => Crd::Serves,
    }
}

/// The HTTP status of an error the API server answered.
fn api_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::index::ObjKey;
    use std::time::Duration;

    /// A slice that names no Service (another tool's) is not strait's: not
    /// kept, and no error logged at each of its updates.
    #[test]
    fn a_slice_that_names_no_service_is_not_read() {
        let slice = |labels: serde_json::Value| {
            serde_json::from_value::<EndpointSlice>(serde_json::json!({
                "metadata": {"namespace": "shop", "name": "web-abc", "labels": labels},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.0.1"]}],
            }))
            .unwrap()
        };
        assert!(matches!(api_slice(&slice(serde_json::json!({}))), Ok(None)));
        let named = slice(serde_json::json!({"kubernetes.io/service-name": "web"}));
        assert!(matches!(
            api_slice(&named),
            Ok(Some(Object::EndpointSlice(svc, name, _))) if svc.name == "web" && name == "web-abc"
        ));
    }

    /// A list the API server fails every time (overloaded, or a kind RBAC
    /// does not grant) is retried ever less often, up to 30 s apart, rather
    /// than about every second for as long as it fails.
    #[tokio::test(start_paused = true)]
    async fn a_list_that_keeps_failing_is_retried_ever_less_often() {
        let status = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"overloaded","reason":"InternalError","code":500}"#;
        let n = requests_in_two_minutes(move |_| (500, status)).await;
        // 0.8 s doubling to 30 s (with jitter) is about 9 tries in two minutes.
        assert!((4..=12).contains(&n), "{n} lists in two minutes");
    }

    /// Each watch asks the API server to end it within a minute, so a
    /// server lost without a word (its node gone, no FIN) freezes the index
    /// that long at most, not the five minutes of kube's default.
    #[tokio::test(start_paused = true)]
    async fn watches_ask_to_end_within_a_minute() {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = asked.clone();
        let api = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let query = req.uri().query().unwrap_or_default().to_string();
            let watch = query.contains("watch=true");
            seen.lock().unwrap().push(query);
            let list = r#"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[]}"#;
            async move {
                if watch {
                    std::future::pending::<()>().await;
                }
                http::Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(list.as_bytes().to_vec()))
            }
        });
        let (tx, _rx) = mpsc::channel(16);
        let run = watch_kind(
            Client::new(api, "default"),
            Kind::Service,
            tx,
            Gauge::default(),
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
        let asked = asked.lock().unwrap();
        let watches: Vec<_> = asked.iter().filter(|q| q.contains("watch=true")).collect();
        assert!(
            !watches.is_empty() && watches.iter().all(|q| q.contains("timeoutSeconds=55")),
            "{asked:?}"
        );
    }

    /// Nor is a list that succeeds followed by a watch that fails at once
    /// (`410 Gone`, as from an API server behind the list's) progress.
    #[tokio::test(start_paused = true)]
    async fn a_watch_that_fails_at_once_after_each_list_backs_off_too() {
        let list = r#"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[]}"#;
        // The watch's first event: its resourceVersion is too old.
        let gone = "{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Failure\",\"message\":\"too old\",\"reason\":\"Expired\",\"code\":410}}\n";
        let n = requests_in_two_minutes(move |watch| if watch { (200, gone) } else { (200, list) })
            .await;
        assert!((4..=30).contains(&n), "{n} requests in two minutes");
    }

    /// A watch that meets a 404 after its list (an API server that does not
    /// serve the CRD for a moment) is retried as a list: the kind is not taken
    /// for absent, which would forget its refused policies and open their
    /// namespaces. A list's 404 is absence.
    #[tokio::test(start_paused = true)]
    async fn only_a_list_says_a_kind_is_absent() {
        let list = r#"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[]}"#;
        let missing = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","code":404}"#;
        let kind = Kind::AuthorizationPolicy;
        let (_, changes) =
            watched_for_two_minutes(
                kind,
                move |watch| {
                    if watch { (404, missing) } else { (200, list) }
                },
            )
            .await;
        // Listed again (the 404 is retried as a list), never absent.
        assert_eq!(changes[..4], ["Relist", "Listed", "Relist", "Listed"]);
        assert!(!changes.iter().any(|c| c == "Absent"), "{changes:?}");
        let (_, changes) = watched_for_two_minutes(kind, move |_| (404, missing)).await;
        assert_eq!(changes[..2], ["Relist", "Absent"]);
        assert!(changes[2..].iter().all(|c| c == "Relist"), "{changes:?}");
    }

    /// An API server starting answers 404 for custom kinds while their CRDs
    /// are there: not absence, which would make the controller ready with no
    /// policy (opening what policies guard) and, on a controller running,
    /// take every route and backend policy off every proxy until a list
    /// came back.
    #[tokio::test(start_paused = true)]
    async fn kinds_not_served_while_their_crd_is_there_are_not_absent() {
        for kind in [
            Kind::AuthorizationPolicy,
            Kind::BackendPolicy,
            Kind::HttpRoute,
            Kind::GrpcRoute,
        ] {
            let version = kind.resource().unwrap().version;
            let changes = watched_with_crd_serving(kind, &version).await;
            assert!(!changes.is_empty(), "{kind:?}: no list tried");
            assert!(
                changes.iter().all(|c| c == "Relist"),
                "{kind:?}: {changes:?}"
            );
        }
    }

    /// Gateway API's CRDs of a release before the version read here (a
    /// GRPCRoute serving only v1alpha2, as before 1.1, or as another mesh's
    /// CRDs install it) are there for good: waited on, the controller would
    /// never go ready, refusing every pod the webhook injects. Strait's own
    /// policies of another version are waited on still: unread, they would
    /// open what they guard.
    #[tokio::test(start_paused = true)]
    async fn route_kinds_whose_crd_serves_another_version_are_absent() {
        for kind in [Kind::HttpRoute, Kind::GrpcRoute] {
            let changes = watched_with_crd_serving(kind, "v1alpha2").await;
            assert_eq!(changes[..2], ["Relist", "Absent"], "{kind:?}");
        }
        for kind in [Kind::AuthorizationPolicy, Kind::BackendPolicy] {
            let changes = watched_with_crd_serving(kind, "v1").await;
            assert!(
                !changes.is_empty() && changes.iter().all(|c| c == "Relist"),
                "{kind:?}: {changes:?}"
            );
        }
    }

    /// `kind` watched for two minutes while its list is a 404 and its CRD
    /// serves `version` only (and defines another, not served).
    async fn watched_with_crd_serving(kind: Kind, version: &str) -> Vec<String> {
        let missing = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","code":404}"#;
        let ar = kind.resource().unwrap();
        let name = format!("{}.{}", ar.plural, ar.group);
        let crd: &'static str = format!(
            r#"{{"apiVersion":"apiextensions.k8s.io/v1","kind":"CustomResourceDefinition","metadata":{{"name":"{name}"}},"spec":{{"group":"{}","names":{{"plural":"{}","kind":"{}"}},"scope":"Namespaced","versions":[{{"name":"{version}","served":true,"storage":true}},{{"name":"v0","served":false,"storage":false}}]}}}}"#,
            ar.group, ar.plural, ar.kind
        )
        .leak();
        let crd_path: &'static str = format!("/customresourcedefinitions/{name}").leak();
        let (_, changes) = watched_by_path_for_two_minutes(kind, move |path, _| {
            if path.ends_with(crd_path) {
                (200, crd)
            } else {
                (404, missing)
            }
        })
        .await;
        changes
    }

    /// A 403 on a relist of a kind already read (an authorizer restarting)
    /// is not an earlier release's role: taken for absence, it would take
    /// every route off every proxy until a list came back.
    #[tokio::test(start_paused = true)]
    async fn a_refused_relist_of_a_kind_already_read_is_not_absence() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let list = r#"{"kind":"HTTPRouteList","apiVersion":"gateway.networking.k8s.io/v1","metadata":{"resourceVersion":"7"},"items":[]}"#;
        // The watch's first event: its resourceVersion is too old.
        let gone = "{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Failure\",\"message\":\"too old\",\"reason\":\"Expired\",\"code\":410}}\n";
        let forbidden = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403}"#;
        let lists = Arc::new(AtomicUsize::new(0));
        let (_, changes) = watched_for_two_minutes(Kind::HttpRoute, move |watch| {
            if watch {
                (200, gone)
            } else if lists.fetch_add(1, Ordering::SeqCst) == 0 {
                (200, list)
            } else {
                (403, forbidden)
            }
        })
        .await;
        assert_eq!(changes[..2], ["Relist", "Listed"]);
        assert!(!changes.iter().any(|c| c == "Absent"), "{changes:?}");
        // Never read: an earlier release's role, as good as absent.
        let (_, changes) =
            watched_for_two_minutes(Kind::HttpRoute, move |_| (403, forbidden)).await;
        assert_eq!(changes[..2], ["Relist", "Absent"]);
    }

    /// A watch that fails says so in its kind's gauge until it reads again.
    #[tokio::test(start_paused = true)]
    async fn a_failing_watch_is_told_in_its_gauge() {
        let list = r#"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[]}"#;
        let broken = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"InternalError","code":500}"#;
        let failing = Gauge::default();
        watched_with_gauge(Kind::Service, move |_, _| (500, broken), failing.clone()).await;
        assert_eq!(failing.get(), 1, "failing");
        watched_with_gauge(
            Kind::Service,
            move |_, watch| if watch { (0, "") } else { (200, list) },
            failing.clone(),
        )
        .await;
        assert_eq!(failing.get(), 0, "read again");
    }

    /// Nodes are asked for as metadata, so the API server sends none of their
    /// status, and their zone is read from the labels that come back.
    #[tokio::test(start_paused = true)]
    async fn nodes_are_read_as_metadata_for_their_zone() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let list = r#"{"kind":"PartialObjectMetadataList","apiVersion":"meta.k8s.io/v1","metadata":{"resourceVersion":"7"},"items":[{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{"name":"node-a","resourceVersion":"7","labels":{"topology.kubernetes.io/zone":"a"}}}]}"#;
        let whole = Arc::new(AtomicUsize::new(0));
        let counted = whole.clone();
        let api = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let metadata = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
            if !metadata {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            let watch = req.uri().query().is_some_and(|q| q.contains("watch=true"));
            std::future::ready(
                http::Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(
                        if watch { "" } else { list }.as_bytes().to_vec(),
                    )),
            )
        });
        let (tx, mut rx) = mpsc::channel(16);
        let watching = tokio::spawn(watch_kind(
            Client::new(api, "default"),
            Kind::Node,
            tx,
            Gauge::default(),
        ));
        let node = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(c) = rx.recv().await {
                if let Change::Apply { object, .. } = c
                    && let Ok(Some(Object::Node(name, zone))) = *object
                {
                    return Some((name, zone));
                }
            }
            None
        })
        .await
        .expect("the node applied");
        watching.abort();
        assert_eq!(node, Some(("node-a".to_string(), Some("a".to_string()))));
        assert_eq!(whole.load(Ordering::SeqCst), 0, "a request for whole Nodes");
    }

    /// Requests a watcher of Services makes in two minutes of a paused clock
    /// against an API that answers `answer(is_watch)`.
    async fn requests_in_two_minutes(
        answer: impl Fn(bool) -> (u16, &'static str) + Clone + Send + Sync + 'static,
    ) -> usize {
        watched_for_two_minutes(Kind::Service, answer).await.0
    }

    /// As [`requests_in_two_minutes`], as the watcher of `kind`, with the
    /// changes it sent (their variants' names).
    async fn watched_for_two_minutes(
        kind: Kind,
        answer: impl Fn(bool) -> (u16, &'static str) + Clone + Send + Sync + 'static,
    ) -> (usize, Vec<String>) {
        watched_by_path_for_two_minutes(kind, move |_, watch| answer(watch)).await
    }

    /// As [`watched_for_two_minutes`], against an API that answers
    /// `answer(path, is_watch)`.
    async fn watched_by_path_for_two_minutes(
        kind: Kind,
        answer: impl Fn(&str, bool) -> (u16, &'static str) + Clone + Send + Sync + 'static,
    ) -> (usize, Vec<String>) {
        watched_with_gauge(kind, answer, Gauge::default()).await
    }

    /// As [`watched_by_path_for_two_minutes`], its failures told `failing`.
    async fn watched_with_gauge(
        kind: Kind,
        answer: impl Fn(&str, bool) -> (u16, &'static str) + Clone + Send + Sync + 'static,
        failing: Gauge,
    ) -> (usize, Vec<String>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let api = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let watch = req.uri().query().is_some_and(|q| q.contains("watch=true"));
            let (status, body) = answer(req.uri().path(), watch);
            let rsp = http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(kube::client::Body::from(body.as_bytes().to_vec()));
            // Status 0: an API server that never answers (a watch that
            // waits for changes that do not come).
            async move {
                if status == 0 {
                    std::future::pending::<()>().await;
                }
                rsp
            }
        });
        let client = Client::new(api, "default");
        let (tx, mut rx) = mpsc::channel(16);
        let drained = tokio::spawn(async move {
            let mut changes = Vec::new();
            while let Some(c) = rx.recv().await {
                let name = format!("{c:?}");
                changes.push(name[..name.find([' ', '(']).unwrap_or(name.len())].to_string());
            }
            changes
        });
        let run = run_watcher(
            Api::<Service>::all(client),
            watcher::Config::default(),
            kind,
            tx,
            failing,
            |_| (Ok(None), None),
        );
        assert!(
            tokio::time::timeout(Duration::from_secs(120), run)
                .await
                .is_err()
        );
        (requests.load(Ordering::SeqCst), drained.await.unwrap())
    }

    fn refused(kind: Kind, name: &str, initial: bool) -> Change {
        Change::Apply {
            kind,
            name: name.into(),
            object: Box::new(Err("spec.allow[0].identity: wildcards".into())),
            status: None,
            initial,
            uid: None,
        }
    }

    fn listed(index: &mut Index) {
        for k in Kind::ALL {
            index.apply(Change::Listed(k));
        }
    }

    /// A route no longer strait's to report on (its Service parents gone,
    /// its entries taken out) is no longer kept among the statuses.
    #[test]
    fn a_status_no_longer_reported_on_is_dropped() {
        let route = |status: Option<StatusInput>| Change::Apply {
            kind: Kind::HttpRoute,
            name: "shop/r".into(),
            object: Box::new(Ok(None)),
            status: status.map(Box::new),
            initial: false,
            uid: None,
        };
        let input = StatusInput::of(
            Kind::HttpRoute,
            &serde_json::json!({"metadata": {"namespace": "shop", "name": "r"},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}]}}),
            None,
        );
        let mut index = Index::new("cluster.local");
        listed(&mut index);
        index.apply(route(Some(input)));
        assert_eq!(index.statuses.len(), 1);
        index.statuses_dirty = false;
        index.apply(route(None));
        assert!(index.statuses.is_empty() && index.statuses_dirty);
    }

    /// A kind found no longer served (its CRD removed while no watch was
    /// open, its objects' deletes missed) is empty: its routes stop steering
    /// traffic and no status is written for them. Policies excepted.
    #[test]
    fn a_kind_no_longer_served_keeps_nothing() {
        let yaml = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{}]
"#;
        let value = serde_json::json!({"metadata": {"namespace": "shop", "name": "r"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}]}});
        let obj = crate::manifests::parse_file(yaml).unwrap().remove(0);
        let mut index = Index::new("cluster.local");
        listed(&mut index);
        index.apply(Change::Apply {
            kind: Kind::HttpRoute,
            name: "shop/r".into(),
            object: Box::new(Ok(Some(obj))),
            status: Some(Box::new(StatusInput::of(Kind::HttpRoute, &value, None))),
            initial: false,
            uid: None,
        });
        assert_eq!((index.snap.routes.len(), index.statuses.len()), (1, 1));
        index.dirty = false;
        index.apply(Change::Relist(Kind::HttpRoute));
        index.apply(Change::Absent(Kind::HttpRoute));
        assert!(index.snap.routes.is_empty(), "the route still steers");
        assert!(index.statuses.is_empty() && index.statuses_dirty);
        assert!(index.dirty);

        // strait's policies stay in force: the 404 may be an API server's
        // passing one, and their absence would open what they guard.
        let policy = "apiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: lock, namespace: shop}\nspec: {selector: {}, mtls: STRICT}\n";
        let obj = crate::manifests::parse_file(policy).unwrap().remove(0);
        index.apply(Change::Apply {
            kind: Kind::AuthorizationPolicy,
            name: "shop/lock".into(),
            object: Box::new(Ok(Some(obj))),
            status: None,
            initial: false,
            uid: None,
        });
        index.apply(Change::Relist(Kind::AuthorizationPolicy));
        index.apply(Change::Absent(Kind::AuthorizationPolicy));
        assert_eq!(index.snap.authorizations.len(), 1);
    }

    /// An update that changes nothing the index keeps (a Pod's status moving
    /// on, a resync) makes no new snapshot; one that does, does.
    #[test]
    fn an_update_that_changes_nothing_kept_makes_no_snapshot() {
        let pod = |ready: bool, ip: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-0, namespace: shop, annotations: {{strait.dev/inbound-port: \"4143\"}}}}\nspec: {{serviceAccountName: web, containers: [{{name: web, image: web}}]}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}], conditions: [{{type: Ready, status: \"{}\"}}]}}\n",
                if ready { "True" } else { "False" }
            );
            let obj = crate::manifests::parse_file(&yaml).unwrap().remove(0);
            Change::Apply {
                kind: Kind::Pod,
                name: "shop/web-0".into(),
                object: Box::new(Ok(Some(obj))),
                status: None,
                initial: false,
                uid: None,
            }
        };
        let mut index = Index::new("cluster.local");
        listed(&mut index);
        index.apply(pod(false, "10.1.0.9"));
        assert!(index.dirty);
        index.dirty = false;
        // Readiness is the EndpointSlice's to say: nothing kept of the Pod moved.
        index.apply(pod(true, "10.1.0.9"));
        assert!(!index.dirty, "a Pod status update made a snapshot");
        index.apply(pod(true, "10.1.0.10"));
        assert!(index.dirty, "a new address made none");
        index.dirty = false;
        // A route of Gateways only, updated (a Gateway controller writing its
        // status): nothing of it is held, nothing changes.
        index.apply(Change::Apply {
            kind: Kind::HttpRoute,
            name: "shop/gateway-only".into(),
            object: Box::new(Ok(None)),
            status: None,
            initial: false,
            uid: None,
        });
        assert!(!index.dirty, "a route of Gateways only made a snapshot");
    }

    /// A pod made invalid in place (an annotation edited on a running pod)
    /// keeps no last good form: that form would keep its address after the
    /// pod ended, and the next pod given the address, in any namespace,
    /// would be left out of its Services and answered as unmeshed.
    #[test]
    fn a_pod_refused_keeps_no_last_good_form() {
        let pod = |name: &str, ns: &str, inbound: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, annotations: {{strait.dev/inbound-port: \"{inbound}\"}}}}\nspec: {{serviceAccountName: web, containers: [{{name: web, image: web}}]}}\nstatus: {{phase: Running, podIP: 10.1.0.9, podIPs: [{{ip: 10.1.0.9}}]}}\n",
            );
            Change::Apply {
                kind: Kind::Pod,
                name: format!("{ns}/{name}"),
                object: Box::new(
                    crate::manifests::parse_file(&yaml)
                        .map(|mut objects| Some(objects.remove(0)))
                        .map_err(|e| format!("{e:?}")),
                ),
                status: None,
                initial: false,
                uid: Some(format!("{ns}-{name}")),
            }
        };
        let ip: std::net::IpAddr = "10.1.0.9".parse().unwrap();
        let mut index = Index::new("cluster.local");
        listed(&mut index);
        index.apply(pod("job-0", "a", "4143"));
        index.apply(pod("job-0", "a", "not a port"));
        index.seal();
        assert!(
            index.snap.pod_at(ip).is_none(),
            "the refused pod holds its address"
        );
        // The pod ends unseen (its updates all refused); the address goes to
        // another namespace's pod, which is that address's pod.
        index.apply(pod("web-0", "b", "4143"));
        index.seal();
        let (key, _) = index.snap.pod_at(ip).expect("the address's new pod");
        assert_eq!(key.to_string(), "b/web-0");
    }

    /// Each snapshot served is numbered after the last and dated by the
    /// change that made it, not by when the index was first built.
    #[tokio::test(start_paused = true)]
    async fn a_published_snapshot_is_numbered_and_dated_by_its_change() {
        let mut index = Index::new("cluster.local");
        listed(&mut index);
        tokio::time::advance(Duration::from_secs(600)).await;
        let changed = tokio::time::Instant::now();
        let first = index.publish(changed);
        assert_eq!((first.version, first.built), (1, changed));
        tokio::time::advance(Duration::from_secs(5)).await;
        let second = index.publish(tokio::time::Instant::now());
        assert_eq!(second.version, 2);
        assert_eq!(second.built.elapsed(), Duration::ZERO);
    }

    /// A policy deleted and created again, invalid, while no watch was open
    /// (the relist after a 410 sees only the new one) is another object: the
    /// deleted one's last good form does not stay in force for it.
    #[test]
    fn an_object_refused_under_a_new_uid_does_not_keep_its_predecessors_form() {
        let policy = "apiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web, namespace: shop}\nspec: {selector: {}, mtls: PERMISSIVE, allow: [{namespace: shop}]}\n";
        let good = |uid: &str| Change::Apply {
            kind: Kind::AuthorizationPolicy,
            name: "shop/web".into(),
            object: Box::new(Ok(Some(
                crate::manifests::parse_file(policy).unwrap().remove(0),
            ))),
            status: None,
            initial: false,
            uid: Some(uid.into()),
        };
        let bad = |uid: &str| Change::Apply {
            kind: Kind::AuthorizationPolicy,
            name: "shop/web".into(),
            object: Box::new(Err("spec.allow[0].identity: wildcards".into())),
            status: None,
            initial: true,
            uid: Some(uid.into()),
        };
        let mut index = Index::new("cluster.local");
        listed(&mut index);
        index.apply(good("uid-1"));
        // The same object made invalid keeps its last good form.
        index.apply(Change::Relist(Kind::AuthorizationPolicy));
        index.apply(bad("uid-1"));
        index.apply(Change::Listed(Kind::AuthorizationPolicy));
        index.seal();
        assert_eq!(index.snap.authorizations.len(), 1);
        assert!(index.snap.sealed_namespaces.is_empty());
        // Another of its name, invalid: nothing to fall back on, so sealed.
        index.apply(Change::Relist(Kind::AuthorizationPolicy));
        index.apply(bad("uid-2"));
        index.apply(Change::Listed(Kind::AuthorizationPolicy));
        index.seal();
        assert!(
            index.snap.authorizations.is_empty(),
            "the deleted policy is in force"
        );
        assert_eq!(index.snap.sealed_namespaces.len(), 1);
        // Made valid, it is in force and the namespace opens.
        index.apply(good("uid-2"));
        index.seal();
        assert_eq!(index.snap.authorizations.len(), 1);
        assert!(index.snap.sealed_namespaces.is_empty());
    }

    #[test]
    fn a_refused_authorization_policy_with_nothing_to_fall_back_on_seals_its_namespace() {
        let mut index = Index::new("cluster.local");
        index.apply(Change::Relist(Kind::AuthorizationPolicy));
        index.apply(refused(Kind::AuthorizationPolicy, "shop/web", true));
        // Other kinds refused are just left out: they open nothing.
        index.apply(refused(Kind::BackendPolicy, "shop/db", true));
        listed(&mut index);
        index.seal();
        let sealed = |index: &Index| {
            index
                .snap
                .sealed_namespaces
                .iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(sealed(&index), ["shop"]);
        // Its namespace's pods refuse every caller; other namespaces are as
        // their own policies say.
        let shop = crate::authz::workload_policy(
            &index.snap,
            &ObjKey {
                namespace: "shop".into(),
                name: "web-0".into(),
            },
        );
        let default = shop.default.unwrap();
        assert_eq!(default.mode, strait_api::v1::MtlsMode::Strict as i32);
        assert_eq!(
            default.allow,
            [strait_api::v1::Authorization { subject: None }]
        );
        let other = crate::authz::workload_policy(
            &index.snap,
            &ObjKey {
                namespace: "web".into(),
                name: "web-0".into(),
            },
        );
        assert_eq!(
            other.default.unwrap().mode,
            strait_api::v1::MtlsMode::Permissive as i32
        );
        // Deleted, or gone at a relist: the namespace opens again.
        index.apply(Change::Relist(Kind::AuthorizationPolicy));
        index.apply(Change::Listed(Kind::AuthorizationPolicy));
        index.seal();
        assert!(sealed(&index).is_empty());
        index.apply(refused(Kind::AuthorizationPolicy, "shop/web", false));
        index.seal();
        assert_eq!(sealed(&index), ["shop"]);
        index.apply(Change::Delete {
            kind: Kind::AuthorizationPolicy,
            name: "shop/web".into(),
        });
        index.seal();
        assert!(sealed(&index).is_empty());
        // Reported absent (perhaps an API server's passing 404): what it
        // sealed stays sealed until a list says otherwise.
        index.apply(refused(Kind::AuthorizationPolicy, "shop/web", false));
        index.apply(Change::Absent(Kind::AuthorizationPolicy));
        index.seal();
        assert_eq!(sealed(&index), ["shop"]);
        index.apply(Change::Relist(Kind::AuthorizationPolicy));
        index.apply(Change::Listed(Kind::AuthorizationPolicy));
        index.seal();
        assert!(sealed(&index).is_empty());
    }
}
