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
use crate::index::Snapshot;
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
    dirs: Vec<PathBuf>,
    files: BTreeMap<PathBuf, FileState>,
    /// The index as of the last scan; each scan applies only what changed.
    current: Snapshot,
    metrics: Arc<Metrics>,
}

type Parsed = Result<Vec<Object>, Vec<ParseError>>;

fn read_and_parse(path: &Path) -> Parsed {
    std::fs::read_to_string(path)
        .map_err(|e| vec![ParseError::Io(e.to_string())])
        .and_then(|text| parse_file(&text))
}

/// Parses files on every core: the first load of a large mesh is mostly YAML.
fn parse_all(paths: &[PathBuf]) -> Vec<Parsed> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(paths.len().max(1));
    if threads <= 1 || paths.len() < 4 {
        return paths.iter().map(|p| read_and_parse(p)).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(|p| read_and_parse(p)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![Err(vec![ParseError::Io("parser thread panicked".into())])]
                })
            })
            .collect()
    })
}

impl ManifestSource {
    /// A source over the YAML files of every directory in `dirs`, read as one set.
    pub fn new(dirs: Vec<PathBuf>, trust_domain: &str, metrics: Arc<Metrics>) -> Self {
        ManifestSource {
            dirs,
            files: BTreeMap::new(),
            current: Snapshot::empty(trust_domain),
            metrics,
        }
    }

    /// Re-reads changed files and applies only what they changed; returns a new
    /// snapshot when anything did.
    pub fn scan(&mut self) -> Option<Snapshot> {
        let mut paths = Vec::new();
        for dir in &self.dirs {
            if let Err(e) = list_yaml(dir, &mut paths) {
                // Unreadable now, perhaps back later: its files' objects stay in force.
                warn!(dir = %dir.display(), error = %e, "cannot read manifests directory");
                return None;
            }
        }
        let mut todo = Vec::new();
        for path in &paths {
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            let stamp = Stamp {
                modified: meta.modified().ok(),
                len: meta.len(),
            };
            if self.files.get(path).is_none_or(|f| f.stamp != stamp) {
                todo.push((path.clone(), stamp));
            }
        }
        let mut changed = self.current.version == 0;
        let to_parse: Vec<PathBuf> = todo.iter().map(|(p, _)| p.clone()).collect();
        for ((path, stamp), parsed) in todo.into_iter().zip(parse_all(&to_parse)) {
            match parsed {
                Ok(objects) => {
                    info!(file = %path.display(), objects = objects.len(), "manifest loaded");
                    if let Some(old) = self.files.remove(&path) {
                        for o in &old.objects {
                            o.remove_from(&mut self.current);
                        }
                    }
                    for o in &objects {
                        o.add_to(&mut self.current);
                    }
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
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !paths.contains(p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(old) = self.files.remove(&path) {
                info!(file = %path.display(), "manifest removed");
                for o in &old.objects {
                    o.remove_from(&mut self.current);
                }
                changed = true;
            }
        }
        if !changed {
            return None;
        }
        self.current.version += 1;
        self.current.built = tokio::time::Instant::now();
        Some(self.current.clone())
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
            for dir in &self.dirs {
                notify::Watcher::watch(&mut w, dir, notify::RecursiveMode::Recursive)?;
            }
            Ok(w)
        });
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "cannot watch manifests for changes; rescanning every second");
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

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: a}\nspec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}\n";

    fn slice(addr: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: a, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [\"{addr}\"]}}]\n"
        )
    }

    fn addrs(s: &Snapshot) -> Vec<String> {
        s.slices
            .values()
            .flat_map(|m| m.values().cloned().collect::<Vec<_>>())
            .flat_map(|sl| sl.endpoints.into_iter().map(|e| e.addr.to_string()))
            .collect()
    }

    #[test]
    fn changes_apply_per_file_and_broken_files_keep_their_last_good_objects() {
        let dir = std::env::temp_dir().join(format!("strait-scan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
        std::fs::write(dir.join("slice.yaml"), slice("10.0.0.1")).unwrap();
        let metrics = Metrics::new();
        let mut src = ManifestSource::new(vec![dir.clone()], "cluster.local", metrics.clone());
        let s1 = src.scan().unwrap();
        assert_eq!(
            (s1.version, s1.services.len(), addrs(&s1)),
            (1, 1, vec!["10.0.0.1".to_string()])
        );
        assert!(src.scan().is_none(), "nothing changed");

        // A replaced endpoint: the old one is gone, not merged.
        std::fs::write(dir.join("slice.yaml"), slice("10.0.0.22")).unwrap();
        let s2 = src.scan().unwrap();
        assert_eq!(addrs(&s2), vec!["10.0.0.22".to_string()]);
        assert_eq!(
            addrs(&s1),
            vec!["10.0.0.1".to_string()],
            "earlier snapshots are untouched"
        );

        // A broken edit changes nothing and is counted.
        std::fs::write(dir.join("slice.yaml"), slice("not-an-ip")).unwrap();
        assert!(src.scan().is_none());
        assert_eq!(metrics.reload_errors.get(), 1);

        // A removed file takes its objects with it.
        std::fs::remove_file(dir.join("svc.yaml")).unwrap();
        let s3 = src.scan().unwrap();
        assert!(s3.services.is_empty() && s3.by_cluster_ip.is_empty());
        assert_eq!(addrs(&s3), vec!["10.0.0.22".to_string()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
