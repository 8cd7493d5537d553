//! The `--manifests DIR` source: the same Kubernetes objects one would apply to a
//! cluster, read from YAML files and re-read when they change.
//!
//! A file that fails to parse, or holds an object that fails validation, is reported
//! (file, object, field) and keeps its last good objects: nothing half-applied ever
//! reaches a proxy.

mod parse;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::{error, info, warn};

pub use parse::{Object, ParseError, parse_file};

use crate::defaults;
use crate::index::{Snapshot, SnapshotBuilder};
use crate::metrics::Metrics;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    objects: Vec<Object>,
}

/// Reads a directory of manifests into snapshots.
#[derive(Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    version: u64,
    trust_domain: String,
    metrics: Arc<Metrics>,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>, trust_domain: &str, metrics: Arc<Metrics>) -> Self {
        ManifestSource {
            dir: dir.into(),
            files: BTreeMap::new(),
            version: 0,
            trust_domain: trust_domain.to_string(),
            metrics,
        }
    }

    /// Re-reads changed files; returns a new snapshot when anything changed.
    pub fn scan(&mut self) -> Option<Snapshot> {
        let mut seen = Vec::new();
        let mut changed = false;
        let mut paths = Vec::new();
        if let Err(e) = list_yaml(&self.dir, &mut paths) {
            warn!(dir = %self.dir.display(), error = %e, "cannot read manifests directory");
            return None;
        }
        for path in paths {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = Stamp {
                modified: meta.modified().ok(),
                len: meta.len(),
            };
            seen.push(path.clone());
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| vec![ParseError::Io(e.to_string())])
                .and_then(|text| parse_file(&text));
            match parsed {
                Ok(objects) => {
                    info!(file = %path.display(), objects = objects.len(), "manifest loaded");
                    self.files.insert(path, FileState { stamp, objects });
                    changed = true;
                }
                Err(errors) => {
                    for e in &errors {
                        error!(file = %path.display(), error = %e, "manifest rejected; its last good objects stay in force");
                    }
                    self.metrics.reload_errors.inc();
                    // Remember the stamp so the same broken file is reported once.
                    let objects = self
                        .files
                        .remove(&path)
                        .map(|f| f.objects)
                        .unwrap_or_default();
                    self.files.insert(path, FileState { stamp, objects });
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        if self.files.len() != before {
            info!("manifest files removed");
            changed = true;
        }
        if !changed && self.version > 0 {
            return None;
        }
        self.version += 1;
        let mut b = SnapshotBuilder::new(self.version, &self.trust_domain);
        for obj in self.files.values().flat_map(|f| f.objects.iter()) {
            obj.add_to(&mut b);
        }
        Some(b.build())
    }

    /// Rescans on every change the filesystem reports (debounced) and every
    /// `MANIFEST_SCAN_INTERVAL`, publishing each new snapshot.
    pub async fn run(mut self, tx: watch::Sender<Arc<Snapshot>>) {
        let (ev_tx, mut events) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = ev_tx.try_send(());
            }
        })
        .and_then(|mut w| {
            notify::Watcher::watch(&mut w, &self.dir, notify::RecursiveMode::Recursive)?;
            Ok(w)
        });
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot watch manifests for changes; rescanning every second");
                None
            }
        };
        let mut tick = tokio::time::interval(defaults::MANIFEST_SCAN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(()) = events.recv() => {
                    tokio::time::sleep(defaults::MANIFEST_DEBOUNCE).await;
                    while events.try_recv().is_ok() {}
                }
            }
            if let Some(s) = self.scan() {
                self.metrics.observe_snapshot(&s);
                info!(
                    version = s.version,
                    services = s.services.len(),
                    endpoints = s.endpoint_count(),
                    pods = s.pods.len(),
                    "index updated"
                );
                tx.send_replace(Arc::new(s));
            }
        }
    }
}

fn list_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            list_yaml(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}
