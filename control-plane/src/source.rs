//! Where the index comes from: manifest files or the Kubernetes API. Both
//! publish whole snapshots of the index, so everything downstream (views,
//! streams to proxies, identities) is the same whichever feeds it.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

use crate::index::Snapshot;

pub trait Source: Send + 'static {
    /// Publishes each new snapshot on `tx` until the receivers are gone.
    /// `clean` says whether the index is whole: every file loaded, or every
    /// initial list from the API server in. The controller is not ready
    /// before it first is.
    fn run(
        self,
        tx: watch::Sender<Arc<Snapshot>>,
        clean: watch::Sender<bool>,
    ) -> impl Future<Output = ()> + Send;
}
