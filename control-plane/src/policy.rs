//! The inbound-policy service: a proxy watches its own workload and receives its
//! mTLS mode and authorization rules, computed from strait's AuthorizationPolicies
//! that apply to its pod, and again whenever they change. Pods that the same
//! policies apply to (a workload's) share one answer, computed once per change.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use futures_util::{Stream, StreamExt as _};
use strait_api::v1 as api;
use strait_api::v1::inbound_policy_server::InboundPolicy;
use tokio::sync::{OnceCell, watch};
use tonic::{Request, Response, Status};

use crate::authz::{PolicyInputs, policy_of};
use crate::identity::caller::{Authenticator, may_watch_pod};
use crate::identity::serving;
use crate::index::{ObjKey, Snapshot};
use crate::metrics::Watches;

#[derive(Debug)]
pub struct InboundPolicyService {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    watches: Watches,
    /// With identities on: a proxy may watch only its own workload's policy.
    auth: Option<Authenticator>,
    /// Every pod appears in the index (the API server's), so a pod not there
    /// yet is waited for rather than answered with the open default.
    wait_for_pods: bool,
    answers: Arc<Answers>,
}

impl InboundPolicyService {
    pub fn new(
        snapshot: watch::Receiver<Arc<Snapshot>>,
        watches: Watches,
        auth: Option<Authenticator>,
        wait_for_pods: bool,
    ) -> Self {
        Self {
            snapshot,
            watches,
            auth,
            wait_for_pods,
            answers: Arc::default(),
        }
    }
}

type Answer = Arc<api::WorkloadPolicy>;

/// The answers of the latest snapshot, shared by every watch: the pods of one
/// workload get one answer, computed once per index change and held once,
/// however many of them watch.
#[derive(Debug, Default)]
struct Answers {
    round: Mutex<Round>,
    #[cfg(test)]
    computed: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Default)]
struct Round {
    /// The snapshot `answers` are of. Weak, so as not to keep an old
    /// snapshot's contents; its allocation stays while this is held, so no
    /// other snapshot can be at the same address.
    snap: Weak<Snapshot>,
    /// Each filled by the first watch that asks: the others wait for it.
    answers: HashMap<PolicyInputs, Arc<OnceCell<Answer>>>,
    /// The previous snapshot's: an answer that has not changed is handed out
    /// again, so a watch sees it is the same by address, not by comparing it.
    before: HashMap<PolicyInputs, Answer>,
}

impl Answers {
    async fn of(&self, snap: &Arc<Snapshot>, pod: &ObjKey) -> Answer {
        let inputs = PolicyInputs::of(snap, pod);
        // Only the index's pods are kept: a caller names the namespace of
        // an unknown one, and would grow the map with each it names until
        // the index next changes.
        if !snap.pods.contains_key(pod) {
            #[cfg(test)]
            self.computed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Arc::new(policy_of(snap, &inputs, pod));
        }
        let (cell, before) = {
            let mut round = self.round.lock().unwrap_or_else(PoisonError::into_inner);
            if round.snap.as_ptr() != Arc::as_ptr(snap) {
                let before = std::mem::take(&mut round.answers)
                    .into_iter()
                    .filter_map(|(k, cell)| Some((k, cell.get()?.clone())))
                    .collect();
                *round = Round {
                    snap: Arc::downgrade(snap),
                    answers: HashMap::new(),
                    before,
                };
            }
            let before = round.before.get(&inputs).cloned();
            let cell = round.answers.entry(inputs.clone()).or_default().clone();
            (cell, before)
        };
        cell.get_or_init(|| async {
            #[cfg(test)]
            self.computed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = policy_of(snap, &inputs, pod);
            match before {
                Some(b) if *b == p => b,
                _ => Arc::new(p),
            }
        })
        .await
        .clone()
    }
}

/// Whether `pod`'s policy cannot be told yet: the index does not know the pod,
/// and a policy of its namespace might name it by its labels. Answered then,
/// the proxy would go ready with the open default (PERMISSIVE, everyone
/// allowed), and its app start before the policy that applies arrives.
fn unknown_yet(snap: &Snapshot, pod: &ObjKey) -> bool {
    !snap.pods.contains_key(pod)
        && crate::authz::in_namespace(snap, &pod.namespace)
            .next()
            .is_some()
}

type PolicyStream = Pin<Box<dyn Stream<Item = Result<api::WorkloadPolicy, Status>> + Send>>;

#[tonic::async_trait]
impl InboundPolicy for InboundPolicyService {
    type WatchStream = PolicyStream;

    async fn watch(
        &self,
        req: Request<api::WatchWorkload>,
    ) -> Result<Response<PolicyStream>, Status> {
        let caller = match &self.auth {
            Some(auth) => Some((auth.clone(), auth.caller(&req, "inbound_policy").await?)),
            None => None,
        };
        let source = serving::source(&req);
        let w = req.into_inner();
        if w.namespace.is_empty() {
            return Err(Status::invalid_argument("namespace is required"));
        }
        // Names as Kubernetes has them, so that what a watch holds (and clones
        // at every change) is bounded by more than the message size.
        if !crate::spec::dns_label(&w.namespace) {
            return Err(Status::invalid_argument(
                "namespace is not a Kubernetes name",
            ));
        }
        // A pod name outside Kubernetes is the host's name (`$HOSTNAME`),
        // which need not be one Kubernetes would take: only its length counts.
        if w.pod.len() > 253 {
            return Err(Status::invalid_argument("pod name longer than 253 bytes"));
        }
        let pod = ObjKey {
            namespace: w.namespace,
            name: w.pod,
        };
        if let Some((auth, c)) = &caller {
            may_watch_pod(&self.snapshot.borrow(), c, &pod, source)
                .inspect_err(|r| auth.refused("inbound_policy", r))?;
        }
        let guard = self.watches.open("inbound_policy", source, &pod)?;
        let ended = crate::identity::caller::Caller::watch_ends(
            caller.as_ref().map(|(_, c)| c),
            &self.snapshot,
            guard.ended(),
        );
        let rx = self.snapshot.clone();
        let wait_for_pods = self.wait_for_pods;
        let answers = self.answers.clone();
        // The policy now, then again whenever the index changes it. The stream
        // stays open, so a proxy notices a controller going away.
        let stream = futures_util::stream::unfold(
            // `last`: the last answer, and whether the pod was in the index then.
            (rx, None::<(Answer, bool)>, guard, true, false),
            move |(mut rx, last, guard, first, refused)| {
                let (pod, caller, answers) = (pod.clone(), caller.clone(), answers.clone());
                async move {
                    if refused {
                        return None;
                    }
                    if !first && rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    loop {
                        let snap = rx.borrow_and_update().clone();
                        // The pod may appear, or change hands, after the watch began.
                        if let Some((auth, c)) = &caller
                            && let Err(r) = may_watch_pod(&snap, c, &pod, source)
                        {
                            auth.refused("inbound_policy", &r);
                            return Some((Err(r.into()), (rx, last, guard, false, true)));
                        }
                        // Unknown after an answer given while it was known: deleted
                        // (force-deleted pods run on through their grace period) or
                        // lost in a relist. Its last answer stands rather than the
                        // open default. A pod never known waits only for its first.
                        let known_once = last.as_ref().is_none_or(|(_, known)| *known);
                        if wait_for_pods && known_once && unknown_yet(&snap, &pod) {
                            if rx.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                            continue;
                        }
                        let p = answers.of(&snap, &pod).await;
                        let same = last
                            .as_ref()
                            .is_some_and(|(l, _)| Arc::ptr_eq(l, &p) || **l == *p);
                        if !same {
                            let known = snap.pods.contains_key(&pod);
                            return Some((
                                Ok((*p).clone()),
                                (rx, Some((p, known)), guard, false, false),
                            ));
                        }
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            },
        )
        .take_until(ended);
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use futures_util::StreamExt;

    use super::*;
    use crate::index::PodInfo;
    use crate::metrics::Metrics;

    fn key(name: &str) -> ObjKey {
        ObjKey {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    async fn watch(
        wait_for_pods: bool,
        snap: Snapshot,
    ) -> (watch::Sender<Arc<Snapshot>>, PolicyStream) {
        let (tx, rx) = watch::channel(Arc::new(snap));
        let svc = InboundPolicyService::new(rx, Watches::new(Metrics::new()), None, wait_for_pods);
        let req = Request::new(api::WatchWorkload {
            namespace: "shop".into(),
            pod: "web-0".into(),
            proxy_id: "web-0.shop".into(),
        });
        let stream = svc.watch(req).await.unwrap().into_inner();
        (tx, stream)
    }

    /// The pods of one workload get one answer between them, computed once
    /// per index change and held once, however many of them watch.
    #[tokio::test]
    async fn the_pods_of_one_workload_share_one_policy() {
        let pod = |app: &str| PodInfo {
            inbound_port: Some(4143),
            service_account: app.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            probes: Vec::new(),
            ips: Vec::new(),
            skip_inbound: Vec::new(),
            opaque: Vec::new(),
            node: None,
            host_ports: Vec::new(),
            deleting: false,
        };
        let policy = |name: &str, spec: serde_json::Value| {
            crate::authz::parse(&serde_json::json!({
                "apiVersion": "policy.strait.dev/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": "shop"}, "spec": spec,
            }))
            .unwrap()
        };
        let mut snap = Snapshot::empty("cluster.local");
        for (name, app) in [
            ("web-0", "web"),
            ("web-1", "web"),
            ("web-2", "web"),
            ("db-0", "db"),
        ] {
            snap.pods.insert(key(name), pod(app));
        }
        let (k, s) = policy(
            "web",
            serde_json::json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": "STRICT"}),
        );
        snap.authorizations.insert(k, s);
        let (tx, rx) = watch::channel(Arc::new(snap.clone()));
        let svc = InboundPolicyService::new(rx, Watches::new(Metrics::new()), None, true);
        let mut streams = Vec::new();
        for name in ["web-0", "web-1", "web-2", "db-0"] {
            let req = Request::new(api::WatchWorkload {
                namespace: "shop".into(),
                pod: name.into(),
                proxy_id: format!("{name}.shop"),
            });
            streams.push(svc.watch(req).await.unwrap().into_inner());
        }
        let mut modes = Vec::new();
        for s in &mut streams {
            modes.push(s.next().await.unwrap().unwrap().default.unwrap().mode);
        }
        let (strict, permissive) = (
            api::MtlsMode::Strict as i32,
            api::MtlsMode::Permissive as i32,
        );
        assert_eq!(modes, [strict, strict, strict, permissive]);
        let computed = || {
            svc.answers
                .computed
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        // One for the web pods, one for db.
        assert_eq!(computed(), 2);
        let current = svc.snapshot.borrow().clone();
        let (a, b) = (
            svc.answers.of(&current, &key("web-0")).await,
            svc.answers.of(&current, &key("web-2")).await,
        );
        assert!(Arc::ptr_eq(&a, &b), "web-0 and web-2 hold two copies");

        // A change that reaches every web pod is computed once for all of them.
        let (k, s) = policy(
            "web-callers",
            serde_json::json!({"selector": {"matchLabels": {"app": "web"}},
                               "allow": [{"namespace": "front"}]}),
        );
        snap.authorizations.insert(k, s);
        tx.send_replace(Arc::new(snap));
        for s in &mut streams[..3] {
            let p = s.next().await.unwrap().unwrap().default.unwrap();
            assert_eq!(p.allow.len(), 1);
        }
        assert_eq!(computed(), 3);
    }

    /// A new pod behind a Service with a `targetRef` policy is answered with
    /// that policy the first time, before any EndpointSlice lists it: the
    /// proxy goes ready closed, never on the open default.
    #[tokio::test]
    async fn a_new_pod_of_a_target_ref_service_is_first_answered_with_its_policy() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
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
        snap.pods.insert(
            key("web-0"),
            PodInfo {
                inbound_port: Some(4143),
                service_account: "web".into(),
                labels: [("app".to_string(), "web".to_string())].into(),
                probes: Vec::new(),
                ips: Vec::new(),
                skip_inbound: Vec::new(),
                opaque: Vec::new(),
                node: None,
                host_ports: Vec::new(),
                deleting: false,
            },
        );
        assert!(snap.slices.is_empty());
        let (_tx, mut stream) = watch(true, snap).await;
        let first = stream.next().await.unwrap().unwrap().default.unwrap();
        assert_eq!(first.mode, api::MtlsMode::Strict as i32);
        assert_eq!(first.allow.len(), 1, "{:?}", first.allow);
    }

    /// A caller names the namespace it watches: the answers of pods the
    /// index does not know are not kept, or each name it tried would stay
    /// held until the index next changed.
    #[tokio::test]
    async fn answers_for_pods_the_index_does_not_know_are_not_kept() {
        let (_tx, rx) = watch::channel(Arc::new(Snapshot::empty("cluster.local")));
        let svc = InboundPolicyService::new(rx, Watches::new(Metrics::new()), None, true);
        for i in 0..100 {
            let req = Request::new(api::WatchWorkload {
                namespace: format!("made-up-{i}"),
                pod: "web-0".into(),
                proxy_id: "web-0.shop".into(),
            });
            let mut stream = svc.watch(req).await.unwrap().into_inner();
            let p = stream.next().await.unwrap().unwrap();
            assert_eq!(p.default.unwrap().mode, api::MtlsMode::Permissive as i32);
        }
        let held = svc.answers.round.lock().unwrap().answers.len();
        assert_eq!(held, 0, "answers held for pods nobody knows");
    }

    #[tokio::test]
    async fn names_that_kubernetes_would_not_take_are_refused() {
        let (_tx, rx) = watch::channel(Arc::new(Snapshot::empty("cluster.local")));
        let svc = InboundPolicyService::new(rx, Watches::new(Metrics::new()), None, false);
        for (namespace, pod, ok) in [
            ("shop", "web-0", true),
            ("shop", "", true),
            ("Shop", "web-0", false),
            ("shop", "Johns-MacBook.local", true),
            ("shop", &*"a".repeat(60_000), false),
        ] {
            let req = Request::new(api::WatchWorkload {
                namespace: namespace.into(),
                pod: pod.into(),
                proxy_id: "web-0.shop".into(),
            });
            let got = svc.watch(req).await.map(|_| ()).map_err(|e| e.code());
            let want = if ok {
                Ok(())
            } else {
                Err(tonic::Code::InvalidArgument)
            };
            assert_eq!(got, want, "{namespace:?} {:.20}", pod);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_not_indexed_yet_waits_for_its_policy_rather_than_going_open() {
        let mut snap = Snapshot::empty("cluster.local");
        let policy = serde_json::json!({
            "apiVersion": "policy.strait.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": "STRICT"}
        });
        let (k, spec) = crate::authz::parse(&policy).unwrap();
        snap.authorizations.insert(k, spec);
        let (tx, mut stream) = watch(true, snap.clone()).await;
        let first = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;
        assert!(
            first.is_err(),
            "answered before the pod was known: {first:?}"
        );
        // The pod appears, labelled as the policy selects: STRICT from the first answer.
        snap.pods.insert(
            key("web-0"),
            PodInfo {
                inbound_port: Some(4143),
                service_account: "web".into(),
                labels: [("app".to_string(), "web".to_string())].into(),
                probes: Vec::new(),
                ips: Vec::new(),
                skip_inbound: Vec::new(),
                opaque: Vec::new(),
                node: None,
                host_ports: Vec::new(),
                deleting: false,
            },
        );
        tx.send_replace(Arc::new(snap.clone()));
        let p = stream.next().await.unwrap().unwrap();
        assert_eq!(p.default.unwrap().mode, api::MtlsMode::Strict as i32);

        // Deleted while its containers still run (force-deleted): the last
        // answer stands, not the open default.
        let mut gone = snap.clone();
        gone.pods.clear();
        tx.send_replace(Arc::new(gone));
        let next = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;
        assert!(next.is_err(), "answered for a pod gone: {next:?}");

        // Without policies in its namespace, an unknown pod's answer is the
        // open default at once: nothing could narrow it.
        let (tx, mut stream) = watch(true, Snapshot::empty("cluster.local")).await;
        let p = stream.next().await.unwrap().unwrap();
        assert_eq!(p.default.unwrap().mode, api::MtlsMode::Permissive as i32);
        // Never known, it is not held at that answer: its namespace closing
        // (a policy refused) reaches it.
        let mut closed = snap.clone();
        closed.pods.clear();
        closed.sealed_namespaces.insert("shop".into());
        tx.send_replace(Arc::new(closed));
        let p = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("the closed namespace reaches a pod never known")
            .unwrap()
            .unwrap();
        assert_eq!(p.default.unwrap().mode, api::MtlsMode::Strict as i32);
        // Nor does a mesh described in files wait: its pods need not be listed.
        snap.pods.clear();
        let (_tx, mut stream) = watch(false, snap).await;
        assert!(stream.next().await.unwrap().is_ok());
    }
}
