//! The request body as the client sends it. An HTTP/1 body that stalls (no byte
//! for the body read timeout) is ended, and whatever goes wrong while reading a
//! body (bad chunked framing, a reset, the stall) is marked as the client's
//! doing: the client is answered 400 or 408, never a 502 that blames the
//! upstream, and the balancer does not count it against the endpoint.
//!
//! The fault is recorded in a slot the request carries (`BodyFault`), because
//! the upstream client does not always say why it failed: over HTTP/2 a body
//! error only resets the stream. HTTP/2 bodies have no stall timeout: a gRPC
//! stream may rightly be quiet for long, and flow control bounds what a slow
//! client holds.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::BoxError;

/// The client's fault, as an error of its request body (also recorded in the
/// request's `BodyFault`, which is how `Forward` learns of it).
#[derive(Debug, thiserror::Error)]
pub enum ClientFault {
    #[error("the request body was malformed or cut short by the client")]
    Malformed(#[source] BoxError),
    #[error("the request body stalled for {0:?}")]
    Stalled(Duration),
}

const MALFORMED: u8 = 1;
const STALLED: u8 = 2;
/// Not the client's doing, but its own: the inbound policy stopped admitting
/// it while its body was still coming (see `inbound::authorize`).
const REVOKED: u8 = 3;
/// What the fault is, in the slot; a revocation counted once sets the rest.
const KIND: u8 = 0x7f;
const COUNTED: u8 = 0x80;

/// In a request's extensions when its body can fail: what `Forward` checks
/// when the upstream client reports an error.
#[derive(Clone, Debug)]
pub struct BodyFault(Arc<AtomicU8>, Duration);

impl BodyFault {
    /// The client's fault, if its body failed.
    pub fn fault(&self) -> Option<super::error::ProxyError> {
        match self.0.load(Ordering::Acquire) & KIND {
            MALFORMED => Some(super::error::ProxyError::ClientBody),
            STALLED => Some(super::error::ProxyError::ClientBodyStalled(self.1)),
            REVOKED => Some(super::error::ProxyError::Revoked),
            _ => None,
        }
    }

    /// Marks the request's admission revoked (an earlier fault of the
    /// client's stays what `Forward` answers); `false` if it was already, by
    /// the other side of the request: counted once.
    pub fn revoke(&self) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur & COUNTED == 0).then(|| {
                    let kind = if cur & KIND == 0 { REVOKED } else { cur & KIND };
                    kind | COUNTED
                })
            })
            .is_ok()
    }
}

pin_project_lite::pin_project! {
    pub struct RequestBody<B> {
        #[pin]
        inner: B,
        timeout: Option<Duration>,
        // Armed when the body first waits for the client, and re-armed after
        // each frame: allocated only for bodies that do wait.
        stall: Option<Pin<Box<Sleep>>>,
        armed: bool,
        fault: Option<Arc<AtomicU8>>,
    }
}

impl<B> RequestBody<B> {
    pub fn new(inner: B, timeout: Option<Duration>) -> Self {
        RequestBody {
            inner,
            timeout,
            stall: None,
            armed: false,
            fault: None,
        }
    }
}

impl<B: Body> RequestBody<B> {
    /// Wraps `req`'s body; `timeout` is the stall timeout (HTTP/1). A body that
    /// is already complete (most GETs) gets no fault slot: nothing to allocate.
    pub fn wrap(req: http::Request<B>, timeout: Option<Duration>) -> http::Request<Self> {
        if req.body().is_end_stream() {
            return req.map(|b| RequestBody::new(b, timeout));
        }
        let slot = Arc::new(AtomicU8::new(0));
        let (mut parts, body) = req.into_parts();
        parts
            .extensions
            .insert(BodyFault(slot.clone(), timeout.unwrap_or_default()));
        let mut b = RequestBody::new(body, timeout);
        b.fault = Some(slot);
        http::Request::from_parts(parts, b)
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = ClientFault;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientFault>>> {
        let this = self.project();
        let record = |kind: u8| {
            // The first fault stands (a revocation's among them), and so
            // does whether it was counted.
            if let Some(f) = this.fault.as_ref() {
                let _ = f.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                    (cur & KIND == 0).then_some(cur | kind)
                });
            }
        };
        match this.inner.poll_frame(cx) {
            Poll::Ready(f) => {
                *this.armed = false;
                Poll::Ready(f.map(|r| {
                    r.map_err(|e| {
                        record(MALFORMED);
                        ClientFault::Malformed(e.into())
                    })
                }))
            }
            Poll::Pending => {
                let Some(timeout) = *this.timeout else {
                    return Poll::Pending;
                };
                let deadline = tokio::time::Instant::now() + timeout;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !*this.armed {
                    stall.as_mut().reset(deadline);
                    *this.armed = true;
                }
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        record(STALLED);
                        Poll::Ready(Some(Err(ClientFault::Stalled(timeout))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    /// A body fed by hand, one data frame per send.
    fn channel() -> (
        tokio::sync::mpsc::Sender<Bytes>,
        impl Body<Data = Bytes, Error = BoxError>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        (tx, StreamBody::new(frames))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_ends_with_the_clients_fault() {
        let (tx, rx) = channel();
        let req = http::Request::post("/").body(rx).unwrap();
        let req = RequestBody::wrap(req, Some(Duration::from_secs(30)));
        let slot = req.extensions().get::<BodyFault>().cloned().unwrap();
        let mut body = std::pin::pin!(req.into_body());
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "a");
        let start = tokio::time::Instant::now();
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(e, ClientFault::Stalled(_)), "{e:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        // Found by Forward even when the upstream client says nothing of it.
        assert!(matches!(
            slot.fault(),
            Some(super::super::error::ProxyError::ClientBodyStalled(_))
        ));
        drop(tx);
    }

    /// A request revoked on both its sides, or failed first by its client,
    /// is counted once; the first fault is the one answered.
    #[tokio::test(start_paused = true)]
    async fn a_revocation_is_counted_once_and_the_first_fault_stands() {
        let (_tx, rx) = channel();
        let req = RequestBody::wrap(
            http::Request::post("/").body(rx).unwrap(),
            Some(Duration::from_secs(30)),
        );
        let slot = req.extensions().get::<BodyFault>().cloned().unwrap();
        assert!(slot.revoke(), "the first side counts");
        assert!(!slot.revoke(), "the other does not");
        // The body then stalls: the revocation stays the fault.
        let mut body = std::pin::pin!(req.into_body());
        assert!(body.frame().await.unwrap().is_err());
        assert!(matches!(
            slot.fault(),
            Some(super::super::error::ProxyError::Revoked)
        ));
        assert!(!slot.revoke());

        // Stalled first, then revoked: counted once, the stall answered.
        let (_tx, rx) = channel();
        let req = RequestBody::wrap(
            http::Request::post("/").body(rx).unwrap(),
            Some(Duration::from_secs(30)),
        );
        let slot = req.extensions().get::<BodyFault>().cloned().unwrap();
        let mut body = std::pin::pin!(req.into_body());
        assert!(body.frame().await.unwrap().is_err());
        assert!(slot.revoke());
        assert!(!slot.revoke());
        assert!(matches!(
            slot.fault(),
            Some(super::super::error::ProxyError::ClientBodyStalled(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn each_byte_restarts_the_clock() {
        let (tx, rx) = channel();
        let body = RequestBody::new(rx, Some(Duration::from_secs(30)));
        let sender = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
        });
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(all, "xxxxx");
        sender.await.unwrap();
    }
}
