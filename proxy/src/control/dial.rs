//! Dialling the controller: one attempt at a time, and after a failure the
//! next not before a shared, jittered backoff. Every discovery watch and the
//! policy watch share one channel (one per certificate, all dialling through
//! the same gate), and each retries on its own schedule;
//! without the gate each retry while the controller is away would dial anew
//! (resolving its name, and with TLS handshaking), hundreds a second from one
//! proxy with many destinations, times every proxy, at the cluster's DNS and
//! the controller. An attempt that must wait waits (the channel queues the
//! calls behind it), so the proxy reconnects as soon as the backoff allows.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::ServiceExt as _;

use super::backoff::Backoff;

#[derive(Debug, Default)]
struct Gate {
    /// No attempt before then: the last one failed.
    not_before: Option<Instant>,
    backoff: Backoff,
}

type Shared = Arc<Mutex<Gate>>;

fn record(gate: &Shared, ok: bool) {
    let mut g = gate.lock().unwrap_or_else(|p| p.into_inner());
    if ok {
        // The backoff starts over only once the connection has lasted:
        // one that fails just after it is made is retried ever more slowly.
        g.not_before = None;
        g.backoff.connected();
    } else {
        let wait = g.backoff.next_delay();
        g.not_before = Some(Instant::now() + wait);
    }
}

/// An attempt under way: dropped before it ended (its caller gave up), it
/// counts as failed, or the next would dial at once.
struct Attempt(Option<Shared>);

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            record(&g, false);
        }
    }
}

/// The gate every channel to the controller dials through: a channel made
/// for a new certificate does not start the backoff over.
#[derive(Clone, Debug, Default)]
pub struct Dials(Shared);

/// A connector whose attempts after a failure wait for the gate.
#[derive(Clone, Debug)]
pub struct Gated<C> {
    inner: C,
    gate: Shared,
}

impl<C> Gated<C> {
    pub fn new(inner: C, dials: &Dials) -> Self {
        Gated {
            inner,
            gate: dials.0.clone(),
        }
    }
}

impl<C, R> tower::Service<http::Uri> for Gated<C>
where
    C: tower::Service<http::Uri, Response = R, Error = io::Error> + Clone + Send + 'static,
    C::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = R;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<R>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (gate, inner) = (self.gate.clone(), self.inner.clone());
        Box::pin(async move {
            let not_before = gate.lock().unwrap_or_else(|p| p.into_inner()).not_before;
            if let Some(at) = not_before {
                tokio::time::sleep_until(at).await;
            }
            let mut attempt = Attempt(Some(gate.clone()));
            let r = inner.oneshot(uri).await;
            attempt.0 = None;
            record(&gate, r.is_ok());
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;
    use tower::Service as _;

    /// Counts its dials; refuses them unless `up`, or never answers if `hang`.
    #[derive(Clone, Default)]
    struct Dialled {
        dials: Arc<AtomicUsize>,
        up: Arc<AtomicBool>,
        hang: Arc<AtomicBool>,
    }

    impl tower::Service<http::Uri> for Dialled {
        type Response = ();
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Uri) -> Self::Future {
            self.dials.fetch_add(1, Ordering::SeqCst);
            let (up, hang) = (
                self.up.load(Ordering::SeqCst),
                self.hang.load(Ordering::SeqCst),
            );
            Box::pin(async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                if up {
                    Ok(())
                } else {
                    Err(io::ErrorKind::ConnectionRefused.into())
                }
            })
        }
    }

    fn uri() -> http::Uri {
        "http://strait-controller:8090".parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failure_the_next_dial_waits_for_the_backoff() {
        let d = Dialled::default();
        let mut c = Gated::new(d.clone(), &Dials::default());
        assert!(c.call(uri()).await.is_err());
        assert_eq!(d.dials.load(Ordering::SeqCst), 1);
        // The next attempt waits its turn, then dials.
        let start = Instant::now();
        let next = tokio::spawn(c.call(uri()));
        tokio::task::yield_now().await;
        assert_eq!(d.dials.load(Ordering::SeqCst), 1, "not yet");
        d.up.store(true, Ordering::SeqCst);
        assert!(next.await.unwrap().is_ok());
        assert_eq!(d.dials.load(Ordering::SeqCst), 2);
        let waited = start.elapsed();
        assert!(
            waited >= crate::defaults::CONTROL_BACKOFF_MIN
                && waited <= crate::defaults::CONTROL_BACKOFF_MIN * 2,
            "{waited:?}"
        );
        // Up: every attempt dials at once.
        let start = Instant::now();
        for _ in 0..3 {
            assert!(c.call(uri()).await.is_ok());
        }
        assert_eq!(d.dials.load(Ordering::SeqCst), 5);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// A channel made for a new certificate dials through the gate of the
    /// one before: a failure there holds it back too, rather than starting
    /// the backoff over.
    #[tokio::test(start_paused = true)]
    async fn channels_of_one_link_share_the_backoff() {
        let d = Dialled::default();
        let dials = Dials::default();
        let mut older = Gated::new(d.clone(), &dials);
        assert!(older.call(uri()).await.is_err());
        d.up.store(true, Ordering::SeqCst);
        let mut newer = Gated::new(d.clone(), &dials);
        let start = Instant::now();
        assert!(newer.call(uri()).await.is_ok());
        let waited = start.elapsed();
        assert!(
            waited >= crate::defaults::CONTROL_BACKOFF_MIN,
            "dialled after {waited:?}"
        );
        assert_eq!(d.dials.load(Ordering::SeqCst), 2);
    }

    /// An attempt given up on (its caller's timeout) counts as failed.
    #[tokio::test(start_paused = true)]
    async fn an_attempt_dropped_unfinished_counts_as_failed() {
        let d = Dialled::default();
        d.hang.store(true, Ordering::SeqCst);
        let mut c = Gated::new(d.clone(), &Dials::default());
        let gave_up = tokio::time::timeout(Duration::from_secs(2), c.call(uri())).await;
        assert!(gave_up.is_err());
        let gate = c.gate.lock().unwrap().not_before;
        assert!(gate.is_some_and(|at| at > Instant::now()), "{gate:?}");
    }
}
