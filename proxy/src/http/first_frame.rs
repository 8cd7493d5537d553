//! An HTTP/1 request goes to its upstream with the first frame of its body
//! beside its head.
//!
//! Between proxies a body rides HTTP/2 DATA frames that may arrive after the
//! request's HEADERS. Written alone, the head lets an app answer before any body
//! byte is there (an early 4xx, a handler that ignores the body); hyper, Go's
//! net/http and others then close the connection rather than wait for a body they
//! do not want, and the next request sent on that pooled connection fails. With
//! the first frame in the same write (and hyper's client adds any frames already
//! at hand) the app finds the body in its buffer, drains it, and keeps the
//! connection. A body larger than what has arrived still loses the connection
//! to such an app, as through any proxy that streams.
//!
//! Only a body of declared length waits: its client has it in hand. A body of
//! unknown length may be a stream that starts when the response does, and one
//! sent with `Expect: 100-continue` comes only once the upstream asks. The wait
//! is bounded, so a client that holds back even a declared body still has its
//! head delivered.
//!
//! `Forward` does not wait for a request whose retry counts on its body being
//! unread if no connection takes it (the outbound routes' connection retries).
//! That body comes from the app's own HTTP/1 connection, head and body in the
//! same read, so hyper's client finds it ready as it writes the head anyway.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::{BoxBody, BoxError};

/// The request, its body's first frame taken and put back in front of the rest
/// when it came within `wait`; as it was when it does not wait.
pub async fn with_first_frame(req: Request<BoxBody>, wait: Duration) -> Request<BoxBody> {
    if !waits(&req) {
        return req;
    }
    let (head, mut body) = req.into_parts();
    // Polled before the timer is armed: a frame already here costs no timer.
    let first = match tokio::time::timeout(wait, body.frame()).await {
        Ok(Some(first)) => first,
        Ok(None) | Err(_) => return Request::from_parts(head, body),
    };
    Request::from_parts(
        head,
        BoxBody::new(Primed {
            first: Some(first),
            rest: body,
        }),
    )
}

fn waits(req: &Request<BoxBody>) -> bool {
    let body = req.body();
    !body.is_end_stream()
        && body.size_hint().exact().is_some()
        && !req.headers().contains_key(header::EXPECT)
}

/// A body whose first frame was read ahead.
struct Primed {
    first: Option<Result<Frame<Bytes>, BoxError>>,
    rest: BoxBody,
}

impl Body for Primed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(first)),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead = match &self.first {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(ahead));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(ahead));
        }
        hint
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::http::boxed;
    use tokio::sync::mpsc;

    /// A body of declared length whose bytes come when the test sends them.
    struct Held {
        rx: mpsc::Receiver<Result<Bytes, BoxError>>,
        left: u64,
        /// Told when the body is first asked for a frame.
        asked: Option<tokio::sync::oneshot::Sender<()>>,
    }

    impl Body for Held {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if let Some(asked) = self.asked.take() {
                let _ = asked.send(());
            }
            self.rx.poll_recv(cx).map(|b| {
                b.map(|b| {
                    let b = b?;
                    self.left -= b.len() as u64;
                    Ok(Frame::data(b))
                })
            })
        }

        fn is_end_stream(&self) -> bool {
            self.left == 0
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.left)
        }
    }

    /// A body of declared length `len` and what sends its frames.
    pub(crate) fn held(len: u64) -> (mpsc::Sender<Result<Bytes, BoxError>>, BoxBody) {
        let (tx, _, body) = held_until_asked(len);
        (tx, body)
    }

    /// As `held`, and what tells when the body is first asked for a frame.
    pub(crate) fn held_until_asked(
        len: u64,
    ) -> (
        mpsc::Sender<Result<Bytes, BoxError>>,
        tokio::sync::oneshot::Receiver<()>,
        BoxBody,
    ) {
        let (tx, rx) = mpsc::channel(4);
        let (asked, asked_rx) = tokio::sync::oneshot::channel();
        let body = Held {
            rx,
            left: len,
            asked: Some(asked),
        };
        (tx, asked_rx, boxed(body))
    }

    #[tokio::test(start_paused = true)]
    async fn a_declared_body_s_first_frame_is_waited_for_and_kept_in_front() {
        let (tx, body) = held(5);
        let req = Request::post("/").body(body).unwrap();
        let sent = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(Ok(Bytes::from_static(b"he"))).await.unwrap();
            tx.send(Ok(Bytes::from_static(b"llo"))).await.unwrap();
        });
        let req = with_first_frame(req, Duration::from_millis(100)).await;
        // The first frame is in hand, so it counts in the length still to come.
        assert_eq!(req.body().size_hint().exact(), Some(5));
        assert!(!req.body().is_end_stream());
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        sent.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_held_back_past_the_wait_still_lets_the_head_go() {
        let (tx, body) = held(5);
        let req = Request::post("/").body(body).unwrap();
        let started = tokio::time::Instant::now();
        let req = with_first_frame(req, Duration::from_millis(100)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        tx.send(Ok(Bytes::from_static(b"hello"))).await.unwrap();
        drop(tx);
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
    }

    #[tokio::test(start_paused = true)]
    async fn streams_and_100_continue_are_not_held() {
        // Unknown length: a stream that may start only once the response does.
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = boxed(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        let req = Request::post("/").body(stream).unwrap();
        let started = tokio::time::Instant::now();
        let _req = with_first_frame(req, Duration::from_secs(1)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop(tx);

        // The upstream's 100 Continue is what lets the client send the body.
        let (_tx, body) = held(5);
        let req = Request::post("/")
            .header(header::EXPECT, "100-continue")
            .body(body)
            .unwrap();
        let _req = with_first_frame(req, Duration::from_secs(1)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_body_that_fails_first_fails_as_it_would_have() {
        let (tx, rx) = mpsc::channel(1);
        tx.send(Err("reset by the client".into())).await.unwrap();
        let body = boxed(Held {
            rx,
            left: 5,
            asked: None,
        });
        let req = with_first_frame(
            Request::post("/").body(body).unwrap(),
            Duration::from_secs(1),
        )
        .await;
        let err = req.into_body().collect().await.unwrap_err();
        assert_eq!(err.to_string(), "reset by the client");
    }
}
