//! Requests on the gRPC port that have no answer yet, bounded per source
//! address. Until its handler answers, a request holds its headers and the
//! buffer its message is read into (reserved up to the message limit as soon
//! as the message's length arrives), and that is before anything has
//! authenticated the caller. Unbounded, one pod holding an unfinished message
//! on every stream of every connection it may open would make the controller
//! hold gigabytes. Past its share a request is answered at once with
//! `RESOURCE_EXHAUSTED`, which frees its stream; the server's request timeout
//! ends those whose message never completes. A watch is answered (its stream
//! of updates begins) once its caller is authenticated, so open watches do
//! not count here: they have their own bound.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt as _;
use futures_util::future::{Either, Inspect, Ready, ready};
use strait_api::per_source::PerSource;

use crate::identity::serving::PeerCerts;
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct UnansweredLayer {
    per_source: PerSource,
    metrics: Arc<Metrics>,
}

impl UnansweredLayer {
    pub fn new(per_source: PerSource, metrics: Arc<Metrics>) -> Self {
        UnansweredLayer {
            per_source,
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for UnansweredLayer {
    type Service = Unanswered<S>;
    fn layer(&self, inner: S) -> Unanswered<S> {
        Unanswered {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Unanswered<S> {
    inner: S,
    layer: UnansweredLayer,
}

type Held<F> = Inspect<F, Box<dyn FnOnce(&<F as std::future::Future>::Output) + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Unanswered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, Held<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let source = req.extensions().get::<PeerCerts>().and_then(|p| p.addr);
        let Some(share) = self.layer.per_source.take(source) else {
            self.layer.metrics.api_refused("grpc", "too_many_requests");
            strait_otel::sampled!(
                warn,
                source = %source.map_or_else(|| "unknown".into(), |s| s.to_string()),
                limit = self.layer.per_source.limit(),
                "refused a gRPC request: its address has that many unanswered already"
            );
            let status = tonic::Status::resource_exhausted(
                "too many requests from this address are waiting for an answer",
            );
            return Either::Left(ready(Ok(status.into_http())));
        };
        // The place is given back with the answer, or when the request is
        // dropped unanswered (its stream reset, its timeout passed).
        let give_back: Box<dyn FnOnce(&_) + Send> = Box::new(move |_| drop(share));
        Either::Right(self.inner.call(req).inspect(give_back))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::convert::Infallible;
    use std::future::Future;
    use std::net::IpAddr;

    use tower::{Layer as _, Service as _, ServiceExt as _};

    use super::*;

    fn from(addr: IpAddr) -> http::Request<()> {
        let mut req = http::Request::new(());
        req.extensions_mut().insert(PeerCerts {
            certs: None,
            addr: Some(addr),
        });
        req
    }

    fn grpc_status<B>(rsp: &http::Response<B>) -> Option<&str> {
        rsp.headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
    }

    /// Past its share a source is answered at once, without the handler;
    /// others are not affected, and a request given up frees its place.
    #[tokio::test]
    async fn a_source_past_its_share_of_unanswered_requests_is_refused_at_once() {
        let metrics = Metrics::new();
        let layer = UnansweredLayer::new(PerSource::new(2), metrics.clone());
        // A handler that never answers, as one still reading a message that
        // has not arrived.
        let stalled = tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<Result<http::Response<String>, Infallible>>()
        });
        let mut svc = layer.layer(stalled);
        let pod: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();

        let first = svc.ready().await.unwrap().call(from(pod));
        let second = svc.ready().await.unwrap().call(from(pod));
        let third = svc.ready().await.unwrap().call(from(pod)).await.unwrap();
        assert_eq!(grpc_status(&third), Some("8"), "RESOURCE_EXHAUSTED");
        let text = metrics.encode();
        assert!(
            text.contains("api_refusals_total{service=\"grpc\",reason=\"too_many_requests\"} 1"),
            "{text}"
        );

        // Another pod still gets to its handler (which holds it).
        let mut elsewhere = Box::pin(svc.ready().await.unwrap().call(from(other)));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(elsewhere.as_mut().poll(&mut cx).is_pending());

        // A request given up (its stream reset) gives its place back.
        drop(first);
        let mut again = Box::pin(svc.ready().await.unwrap().call(from(pod)));
        assert!(again.as_mut().poll(&mut cx).is_pending());
        drop(second);
    }

    /// An answered request gives its place back.
    #[tokio::test]
    async fn an_answer_gives_the_place_back() {
        let layer = UnansweredLayer::new(PerSource::new(1), Metrics::new());
        let ok = tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(String::new()))
        });
        let mut svc = layer.layer(ok);
        let pod: IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..3 {
            let rsp = svc.ready().await.unwrap().call(from(pod)).await.unwrap();
            assert_eq!(grpc_status(&rsp), None);
        }
    }
}
