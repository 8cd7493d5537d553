//! Steady background load for tests: a few keep-alive clients in a loop, counting
//! successes and failures (with the first failures' reasons, for the assertion).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::client;

pub struct Load {
    pub ok: Arc<AtomicUsize>,
    pub failed: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: &str, concurrency: usize) -> Load {
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..concurrency)
            .map(|_| {
                let (ok, failed, errors, stop) =
                    (ok.clone(), failed.clone(), errors.clone(), stop.clone());
                let url = url.to_string();
                tokio::spawn(async move {
                    let c = client::http1();
                    while !stop.load(Ordering::SeqCst) {
                        match client::get(&c, &url).await {
                            Ok((s, _)) if s.is_success() => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            other => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                if let Ok(mut e) = errors.lock()
                                    && e.len() < 5
                                {
                                    e.push(format!("{other:?}"));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            ok,
            failed,
            errors,
            stop,
            tasks,
        }
    }

    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops and returns (successes, failures, first failure reasons).
    pub async fn stop(self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        let errors = self.errors.lock().map(|e| e.clone()).unwrap_or_default();
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            errors,
        )
    }
}
