//! Graceful shutdown: a signal every connection task watches, and a tracker of
//! those tasks so shutdown can wait for in-flight work up to a grace period.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// Held by the one who decides to shut down.
#[derive(Debug)]
pub struct DrainTrigger {
    tx: watch::Sender<bool>,
    cut: watch::Sender<bool>,
    tracker: TaskTracker,
}

/// Held by every listener and connection task.
#[derive(Clone, Debug)]
pub struct Drain {
    rx: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
    tracker: TaskTracker,
}

pub fn channel() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(false);
    let (cut, cut_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    (
        DrainTrigger {
            tx,
            cut,
            tracker: tracker.clone(),
        },
        Drain {
            rx,
            cut: cut_rx,
            tracker,
        },
    )
}

impl DrainTrigger {
    /// Starts draining: listeners stop accepting, connections finish what they carry.
    pub fn drain(&self) {
        self.tx.send_replace(true);
        self.tracker.close();
    }

    pub fn is_draining(&self) -> bool {
        *self.tx.borrow()
    }

    /// Waits until draining has been asked for (by anyone holding a `Drain` handle).
    pub async fn requested(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Waits for every tracked task to finish, at most `grace`. True when all did.
    pub async fn wait(&self, grace: Duration) -> bool {
        self.drain();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Ends every task still running, dropping what it carries (so each
    /// request left records its end: its span, its access-log line), and
    /// waits at most `within` for them to be gone. True when all were.
    pub async fn cut(&self, within: Duration) -> bool {
        self.cut.send_replace(true);
        self.wait(within).await
    }

    /// Tasks still running.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }
}

impl Drain {
    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }

    /// Spawns a task that shutdown waits for, and ends once the grace
    /// period is over (`DrainTrigger::cut`).
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut cut = self.cut.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                () = fut => {}
                _ = cut.wait_for(|c| *c) => {}
            }
        });
    }
}

/// A handle that can start draining from anywhere (the admin server, signals).
#[derive(Clone, Debug)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl DrainTrigger {
    pub fn handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.tx.clone())
    }
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_tasks_up_to_the_grace_period() {
        let (trigger, drain) = channel();
        let d = drain.clone();
        drain.spawn(async move {
            d.signaled().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        assert!(
            !trigger.wait(Duration::from_secs(1)).await,
            "task outlives grace"
        );
        assert!(
            trigger.wait(Duration::from_secs(10)).await,
            "task finishes in grace"
        );
    }
}
