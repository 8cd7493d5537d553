//! The watch of this workload's inbound policy. Its first answer is what makes the
//! proxy ready when it has a control plane: it proves the control plane knows it.

use std::sync::{Arc, Mutex, PoisonError};

use strait_api::v1 as api;
use strait_api::v1::inbound_policy_client::InboundPolicyClient;
use tokio::sync::watch;
use tracing::debug;

use super::backoff::Backoff;
use super::{Link, Workload};
use crate::inbound::policy::{InboundPolicy, parse};

/// Why the last watch of the policy failed, until one answers: what a proxy
/// that is not ready says (`/ready`), rather than leaving its user to guess
/// between a controller it cannot reach and one that refuses it.
#[derive(Clone, Debug, Default)]
pub struct LastFailure(Arc<Mutex<Option<String>>>);

impl LastFailure {
    pub fn get(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, why: Option<String>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = why;
    }
}

/// Logs a failed watch: always while no policy has come (the proxy is not
/// ready, and this is why), after only what is not a passing outage.
fn failed(known: bool, last: &LastFailure, e: &tonic::Status, what: &str) {
    // The controller's message, bounded: `/ready` shows it to its callers.
    let message: String = e.message().chars().take(256).collect();
    let why = format!("{what}: {:?}: {message}", e.code());
    if !known || e.code() != tonic::Code::Unavailable {
        strait_otel::sampled!(warn, error = %why, known_policy = known, "inbound policy watch failed; retrying");
    } else {
        debug!(error = %why, "inbound policy watch failed; keeping the last policy");
    }
    last.set(Some(why));
}

pub async fn follow(
    link: Arc<Link>,
    workload: Workload,
    tx: watch::Sender<Option<Arc<InboundPolicy>>>,
    last: LastFailure,
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
                            last.set(None);
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
                            failed(tx.borrow().is_some(), &last, &e, "stream failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => failed(tx.borrow().is_some(), &last, &e, "refused"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
