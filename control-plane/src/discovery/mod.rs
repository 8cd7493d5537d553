//! The discovery service: a proxy watches a destination and gets its view, then a
//! new view whenever it changes. Views are computed once per change per destination
//! and shared by every proxy watching it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt};
use strait_api::v1 as api;
use strait_api::v1::discovery_server::Discovery;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::index::{DestKey, Snapshot, view::view};
use crate::metrics::{Metrics, WatchGuard};

type Update = Arc<api::DestinationUpdate>;

/// The current view of every watched destination.
#[derive(Debug)]
pub struct Views {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    entries: Mutex<HashMap<DestKey, watch::Sender<Update>>>,
    metrics: Arc<Metrics>,
}

impl Views {
    pub fn new(snapshot: watch::Receiver<Arc<Snapshot>>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Views {
            snapshot,
            entries: Mutex::default(),
            metrics,
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<DestKey, watch::Sender<Update>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self, key: DestKey) -> watch::Receiver<Update> {
        let mut entries = self.entries();
        if let Some(tx) = entries.get(&key) {
            return tx.subscribe();
        }
        let snap = self.snapshot.borrow().clone();
        let tx = watch::Sender::new(Arc::new(view(&snap, &key)));
        let rx = tx.subscribe();
        entries.insert(key, tx);
        self.metrics.watched_destinations.set(entries.len() as i64);
        rx
    }

    /// Recomputes every watched view on each new snapshot and pushes the changed ones.
    pub async fn run(self: Arc<Self>) {
        let mut rx = self.snapshot.clone();
        while rx.changed().await.is_ok() {
            let snap = rx.borrow_and_update().clone();
            let watched: Vec<(DestKey, watch::Sender<Update>)> = {
                let mut entries = self.entries();
                entries.retain(|_, tx| tx.receiver_count() > 0);
                self.metrics.watched_destinations.set(entries.len() as i64);
                entries
                    .iter()
                    .map(|(k, tx)| (k.clone(), tx.clone()))
                    .collect()
            };
            for (key, tx) in watched {
                let v = view(&snap, &key);
                if **tx.borrow() != v {
                    tx.send_replace(Arc::new(v));
                    self.metrics
                        .push_latency
                        .observe(snap.built.elapsed().as_secs_f64());
                }
            }
        }
    }
}

#[derive(Debug)]
pub struct DiscoveryService {
    views: Arc<Views>,
    metrics: Arc<Metrics>,
}

impl DiscoveryService {
    pub fn new(views: Arc<Views>, metrics: Arc<Metrics>) -> Self {
        DiscoveryService { views, metrics }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<api::DestinationUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        req: Request<api::WatchDestination>,
    ) -> Result<Response<UpdateStream>, Status> {
        let w = req.into_inner();
        let ns = if w.context_namespace.is_empty() {
            "default"
        } else {
            w.context_namespace.as_str()
        };
        let key = DestKey::parse(&w.destination, ns)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        debug!(destination = %w.destination, ?key, proxy = %w.proxy_id, "watch");
        let guard = WatchGuard::new(&self.metrics, "discovery");
        let rx = self.views.subscribe(key);
        let stream = WatchStream::new(rx).map(move |u| {
            let _alive = &guard;
            Ok((*u).clone())
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
