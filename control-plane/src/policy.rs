//! The inbound-policy service: a proxy watches its own workload and receives its
//! mTLS mode and authorization rules, computed from strait's AuthorizationPolicies
//! that apply to its pod, and again whenever they change.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use strait_api::v1 as api;
use strait_api::v1::inbound_policy_server::InboundPolicy;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::authz::workload_policy;
use crate::identity::caller::{Authenticator, may_watch_pod};
use crate::index::{ObjKey, Snapshot};
use crate::metrics::{Metrics, WatchGuard};

#[derive(Debug)]
pub struct InboundPolicyService {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    /// With identities on: a proxy may watch only its own workload's policy.
    auth: Option<Authenticator>,
}

impl InboundPolicyService {
    pub fn new(
        snapshot: watch::Receiver<Arc<Snapshot>>,
        metrics: Arc<Metrics>,
        auth: Option<Authenticator>,
    ) -> Self {
        Self {
            snapshot,
            metrics,
            auth,
        }
    }
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
        let w = req.into_inner();
        if w.namespace.is_empty() {
            return Err(Status::invalid_argument("namespace is required"));
        }
        let pod = ObjKey {
            namespace: w.namespace,
            name: w.pod,
        };
        if let Some((auth, c)) = &caller {
            may_watch_pod(&self.snapshot.borrow(), c, &pod)
                .inspect_err(|r| auth.refused("inbound_policy", r))?;
        }
        let guard = WatchGuard::new(&self.metrics, "inbound_policy");
        let rx = self.snapshot.clone();
        // The policy now, then again whenever the index changes it. The stream
        // stays open, so a proxy notices a controller going away.
        let stream = futures_util::stream::unfold(
            (rx, None::<api::WorkloadPolicy>, guard, true, false),
            move |(mut rx, last, guard, first, refused)| {
                let (pod, caller) = (pod.clone(), caller.clone());
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
                            && let Err(r) = may_watch_pod(&snap, c, &pod)
                        {
                            auth.refused("inbound_policy", &r);
                            return Some((Err(r.into()), (rx, last, guard, false, true)));
                        }
                        let p = workload_policy(&snap, &pod);
                        if last.as_ref() != Some(&p) {
                            return Some((Ok(p.clone()), (rx, Some(p), guard, false, false)));
                        }
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
