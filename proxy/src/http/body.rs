//! A body that holds a value until the body ends or is dropped: how a layer learns
//! that a response is finished (in-flight counts, load-balancer accounting).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

pin_project_lite::pin_project! {
    pub struct GuardedBody<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> GuardedBody<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        GuardedBody {
            inner,
            guard: Some(guard),
        }
    }

    /// A guard that may already be gone (its future was polled again after it
    /// completed): the body is then unguarded rather than a panic.
    pub fn maybe(inner: B, guard: Option<G>) -> Self {
        GuardedBody { inner, guard }
    }
}

impl<B: http_body::Body, G> http_body::Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let res = ready!(this.inner.poll_frame(cx));
        if res.is_none() {
            this.guard.take();
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
