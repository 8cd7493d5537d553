//! Dialling the controller: one attempt at a time, and after a failure none
//! until a shared, jittered backoff says. Every discovery watch and the policy
//! watch share one channel, and each retries on its own schedule; without the
//! gate each retry while the controller is away would dial anew (resolving its
//! name, and with TLS handshaking), hundreds a second from one proxy with
//! many destinations, times every proxy, at the cluster's DNS and the
//! controller.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::time::Instant;

use super::backoff::Backoff;

#[derive(Debug, Default)]
struct Gate {
    /// No attempt before then: the last one failed.
    not_before: Option<Instant>,
    backoff: Backoff,
}

/// A connector whose attempts after a failure wait for the gate: those made
/// before it opens fail at once, without touching the network.
#[derive(Clone, Debug)]
pub struct Gated<C> {
    inner: C,
    gate: Arc<Mutex<Gate>>,
}

impl<C> Gated<C> {
    pub fn new(inner: C) -> Self {
        Gated {
            inner,
            gate: Arc::default(),
        }
    }
}

impl<C, R> tower::Service<http::Uri> for Gated<C>
where
    C: tower::Service<http::Uri, Response = R, Error = io::Error>,
    C::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = R;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<R>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let now = Instant::now();
        {
            let gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = gate.not_before
                && at > now
            {
                let wait = at - now;
                return Box::pin(std::future::ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("the control plane was unreachable; next attempt in {wait:?}"),
                ))));
            }
        }
        let attempt = self.inner.call(uri);
        let gate = self.gate.clone();
        Box::pin(async move {
            let r = attempt.await;
            let mut g = gate.lock().unwrap_or_else(|p| p.into_inner());
            match &r {
                Ok(_) => {
                    g.not_before = None;
                    g.backoff.reset();
                }
                Err(_) => {
                    let wait = g.backoff.next_delay();
                    g.not_before = Some(Instant::now() + wait);
                }
            }
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::Service as _;

    #[derive(Clone)]
    struct Refused(Arc<AtomicUsize>, Arc<std::sync::atomic::AtomicBool>);

    impl tower::Service<http::Uri> for Refused {
        type Response = ();
        type Error = io::Error;
        type Future = std::future::Ready<io::Result<()>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Uri) -> Self::Future {
            self.0.fetch_add(1, Ordering::SeqCst);
            std::future::ready(if self.1.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(io::ErrorKind::ConnectionRefused.into())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failure_attempts_wait_for_the_backoff() {
        let (dials, up) = (Arc::default(), Arc::default());
        let mut c = Gated::new(Refused(Arc::clone(&dials), Arc::clone(&up)));
        let uri: http::Uri = "http://strait-controller:8090".parse().unwrap();
        for _ in 0..100 {
            assert!(c.call(uri.clone()).await.is_err());
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1, "one dial, then the gate");
        tokio::time::advance(crate::defaults::CONTROL_BACKOFF_MIN * 2).await;
        up.store(true, Ordering::SeqCst);
        assert!(c.call(uri.clone()).await.is_ok());
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        // Up again: every attempt dials.
        for _ in 0..3 {
            assert!(c.call(uri.clone()).await.is_ok());
        }
        assert_eq!(dials.load(Ordering::SeqCst), 5);
    }
}
