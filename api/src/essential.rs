//! Tasks a process cannot do without: its listeners, its watches (of the
//! control plane, of the API server), its certificate's renewal, its admin
//! server. tokio keeps a process running when a task panics; one of these
//! gone, by a panic or a return nobody asked for, left the process serving
//! stale state, or nothing, while its probes still said ready and live. The
//! process stops instead, and is started again by its supervisor (the
//! kubelet), which lists and watches anew.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

use tokio::task::{Id, JoinSet};

/// The tasks; dropping this aborts those still running.
#[derive(Debug, Default)]
pub struct Essential {
    tasks: JoinSet<()>,
    names: HashMap<Id, &'static str>,
}

/// The first essential task to end, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ended {
    pub task: &'static str,
    pub panicked: bool,
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.panicked { "panicked" } else { "ended" };
        write!(f, "{} {how}", self.task)
    }
}

impl std::error::Error for Ended {}

impl Essential {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task`, named for the log when it ends (`the policy watch`).
    pub fn spawn<F>(&mut self, task: &'static str, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.tasks.spawn(f);
        self.names.insert(handle.id(), task);
    }

    /// The first task to end; pending for as long as every one runs (for
    /// ever with none).
    pub async fn ended(&mut self) -> Ended {
        let (id, panicked) = match self.tasks.join_next_with_id().await {
            None => return std::future::pending().await,
            Some(Ok((id, ()))) => (id, false),
            Some(Err(e)) => (e.id(), e.is_panic()),
        };
        Ended {
            task: self.names.remove(&id).unwrap_or("a task"),
            panicked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_first_task_to_end_is_named_with_how() {
        let mut e = Essential::new();
        e.spawn("the watch", std::future::pending());
        e.spawn("the renewal", async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            panic!("a certificate the issuer could not have sent");
        });
        e.spawn("the listener", async {
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let first = e.ended().await;
        assert_eq!(
            first,
            Ended {
                task: "the renewal",
                panicked: true
            }
        );
        assert_eq!(first.to_string(), "the renewal panicked");
        assert_eq!(e.ended().await.to_string(), "the listener ended");
        // The last one runs on: nothing more ends.
        let more = tokio::time::timeout(Duration::from_secs(3600), e.ended()).await;
        assert!(more.is_err(), "{more:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_task_nothing_ends() {
        let mut e = Essential::new();
        let r = tokio::time::timeout(Duration::from_secs(3600), e.ended()).await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn dropped_the_tasks_are_stopped() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut e = Essential::new();
        e.spawn("the holder", async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(e);
        // The task's sender is dropped with it.
        assert!(rx.await.is_err());
    }
}
