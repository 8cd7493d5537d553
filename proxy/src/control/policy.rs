//! The watch of this workload's inbound policy. Its first answer is what makes the
//! proxy ready when it has a control plane: it proves the control plane knows it.

use strait_api::v1 as api;
use strait_api::v1::inbound_policy_client::InboundPolicyClient;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{debug, warn};

use super::Workload;
use super::backoff::Backoff;

pub async fn follow(
    channel: Channel,
    workload: Workload,
    tx: watch::Sender<Option<api::WorkloadPolicy>>,
) {
    let mut client = InboundPolicyClient::new(channel);
    let req = api::WatchWorkload {
        namespace: workload.namespace.clone(),
        pod: workload.pod.clone(),
        proxy_id: format!("{}.{}", workload.pod, workload.namespace),
    };
    let mut backoff = Backoff::default();
    loop {
        match client.watch(req.clone()).await {
            Ok(rsp) => {
                let mut stream = rsp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(p)) => {
                            backoff.reset();
                            tx.send_replace(Some(p));
                        }
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %e.message(), "inbound policy stream failed; keeping the last policy");
                            break;
                        }
                    }
                }
            }
            Err(e) => debug!(error = %e.message(), "control plane unavailable"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
