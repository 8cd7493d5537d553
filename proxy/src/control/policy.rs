//! The watch of this workload's inbound policy. Its first answer is what makes the
//! proxy ready when it has a control plane: it proves the control plane knows it.

use std::sync::Arc;

use strait_api::v1 as api;
use strait_api::v1::inbound_policy_client::InboundPolicyClient;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::backoff::Backoff;
use super::{Link, Workload};
use crate::inbound::policy::{InboundPolicy, parse};

pub async fn follow(
    link: Arc<Link>,
    workload: Workload,
    tx: watch::Sender<Option<Arc<InboundPolicy>>>,
) {
    let req = api::WatchWorkload {
        namespace: workload.namespace.clone(),
        pod: workload.pod.clone(),
        proxy_id: format!("{}.{}", workload.pod, workload.namespace),
    };
    let mut backoff = Backoff::default();
    loop {
        // The current certificate's channel at each watch (Link).
        let mut client = InboundPolicyClient::new(link.authed(&workload))
            .max_decoding_message_size(crate::defaults::CONTROL_MAX_MESSAGE_BYTES);
        match client.watch(req.clone()).await {
            Ok(rsp) => {
                let mut stream = rsp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(p)) => {
                            backoff.connected();
                            let p = Arc::new(parse(p, &workload.trust_domain));
                            tx.send_if_modified(|cur| {
                                if cur.as_deref() == Some(&*p) {
                                    return false;
                                }
                                *cur = Some(p);
                                true
                            });
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
