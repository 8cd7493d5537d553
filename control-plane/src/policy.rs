//! The inbound-policy service: a proxy watches its own workload. Until strait's
//! authorization policies are applied, every workload is PERMISSIVE with no
//! restrictions, which is what a proxy assumes of a mesh being adopted.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use strait_api::v1 as api;
use strait_api::v1::inbound_policy_server::InboundPolicy;
use tonic::{Request, Response, Status};

use crate::metrics::{Metrics, WatchGuard};

#[derive(Debug)]
pub struct InboundPolicyService {
    metrics: Arc<Metrics>,
}

impl InboundPolicyService {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
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
        let w = req.into_inner();
        if w.namespace.is_empty() {
            return Err(Status::invalid_argument("namespace is required"));
        }
        let guard = WatchGuard::new(&self.metrics, "inbound_policy");
        let policy = api::WorkloadPolicy {
            ports: Vec::new(),
            default: Some(api::PortPolicy {
                port: 0,
                mode: api::MtlsMode::Permissive as i32,
                allow: Vec::new(),
            }),
        };
        // The stream stays open: a proxy notices a controller going away.
        let stream = futures_util::stream::once(async move { Ok(policy) })
            .chain(futures_util::stream::pending())
            .map(move |p| {
                let _alive = &guard;
                p
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Identity issuance arrives with the certificate authority; until then the
/// service answers UNIMPLEMENTED so a proxy can tell it apart from a bad request.
#[derive(Debug, Default)]
pub struct IdentityService;

#[tonic::async_trait]
impl strait_api::v1::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        _: Request<api::CertifyRequest>,
    ) -> Result<Response<api::CertifyResponse>, Status> {
        Err(Status::unimplemented(
            "this controller does not issue certificates yet",
        ))
    }
}
