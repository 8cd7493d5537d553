//! The request body as the client sends it. A body that stalls (no byte for the
//! body read timeout) is ended, and whatever goes wrong while reading it (bad
//! chunked framing, a reset, the stall) is marked as the client's doing: the
//! client is answered 400 or 408, never a 502 that blames the upstream, and the
//! balancer does not count it against the endpoint.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::BoxError;

/// The client's fault, as an error of its request body. Found again in the
/// upstream client's error chain by `ClientFault::find`.
#[derive(Debug, thiserror::Error)]
pub enum ClientFault {
    #[error("the request body was malformed or cut short by the client")]
    Malformed(#[source] BoxError),
    #[error("the request body stalled for {0:?}")]
    Stalled(Duration),
}

impl ClientFault {
    /// The client fault behind an error, if it was one.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientFault> {
        let mut cur = Some(e);
        while let Some(e) = cur {
            if let Some(f) = e.downcast_ref::<ClientFault>() {
                return Some(f);
            }
            cur = e.source();
        }
        None
    }
}

pin_project_lite::pin_project! {
    pub struct RequestBody<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        // Armed when the body first waits for the client, and re-armed after
        // each frame: allocated only for bodies that do wait.
        stall: Option<Pin<Box<Sleep>>>,
        armed: bool,
    }
}

impl<B> RequestBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        RequestBody {
            inner,
            timeout,
            stall: None,
            armed: false,
        }
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
        match this.inner.poll_frame(cx) {
            Poll::Ready(f) => {
                *this.armed = false;
                Poll::Ready(f.map(|r| r.map_err(|e| ClientFault::Malformed(e.into()))))
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + *this.timeout;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !*this.armed {
                    stall.as_mut().reset(deadline);
                    *this.armed = true;
                }
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(ClientFault::Stalled(*this.timeout)))),
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
        let mut body = std::pin::pin!(RequestBody::new(rx, Duration::from_secs(30)));
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "a");
        let start = tokio::time::Instant::now();
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(e, ClientFault::Stalled(_)), "{e:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn each_byte_restarts_the_clock() {
        let (tx, rx) = channel();
        let body = RequestBody::new(rx, Duration::from_secs(30));
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

    #[test]
    fn the_fault_is_found_through_wrapping_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] ClientFault);
        let e = Outer(ClientFault::Stalled(Duration::from_secs(1)));
        assert!(matches!(
            ClientFault::find(&e),
            Some(ClientFault::Stalled(_))
        ));
    }
}
