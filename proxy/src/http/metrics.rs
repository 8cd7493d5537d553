//! Request metrics as a layer: requests, responses by status class, and the time
//! to response headers, per direction; gRPC calls by their status.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::{Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use super::{BoxBody, grpc};
use crate::telemetry::metrics::{
    ByGrpcStatus, DirectionLabels, PeerMetrics, ReasonLabels, StatusLabels, status_class,
    status_index,
};
use crate::telemetry::{Direction, Metrics};

/// Shared: every request clones it twice (hyper's service per request, and
/// the future), and one reference count is cheaper than the half dozen to a
/// dozen its counters hold.
#[derive(Clone, Debug)]
pub struct RequestMetricsLayer(Arc<Counters>);

#[derive(Clone, Debug)]
struct Counters {
    metrics: Arc<Metrics>,
    direction: Direction,
    requests: Counter,
    /// Requests dropped before their response head (the caller went away,
    /// or its timeout cancelled them): no response is counted for them.
    cancelled: Counter,
    latency: Histogram,
    /// The responses counter of each status class, looked up in the family on
    /// first use (a series appears once it counts) and kept: a request then
    /// takes no lock and builds no labels.
    responses: Arc<[OnceLock<Counter>; 5]>,
    grpc: ByGrpcStatus,
    /// Inbound: the caller's counters, for this connection.
    peer: Option<Arc<PeerMetrics>>,
}

impl RequestMetricsLayer {
    pub fn new(metrics: Arc<Metrics>, direction: Direction) -> Self {
        let labels = DirectionLabels { direction };
        let requests = metrics.http_requests.get_or_create(&labels).clone();
        let cancelled = metrics
            .http_requests_cancelled
            .get_or_create(&labels)
            .clone();
        let latency = metrics.http_response_latency.get_or_create(&labels).clone();
        Self(Arc::new(Counters {
            grpc: metrics.grpc(direction),
            metrics,
            direction,
            requests,
            cancelled,
            latency,
            responses: Arc::default(),
            peer: None,
        }))
    }

    /// For one inbound connection: also counted by the caller's identity.
    pub fn for_peer(&self, caller: Option<&Arc<PeerMetrics>>) -> Self {
        let Some(caller) = caller else {
            return self.clone();
        };
        let mut c = (*self.0).clone();
        c.peer = Some(caller.clone());
        Self(Arc::new(c))
    }
}

impl<S> tower::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RequestMetrics<S> {
    inner: S,
    layer: RequestMetricsLayer,
}

impl<S, B> tower::Service<Request<B>> for RequestMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let start = Instant::now();
        self.layer.0.requests.inc();
        if let Some(p) = &self.layer.0.peer {
            p.http().requests.inc();
        }
        let grpc = grpc::is_call(&req).then(|| {
            grpc::UntilAnswered::new((self.layer.0.grpc.clone(), self.layer.0.peer.clone()))
        });
        MetricsFuture {
            grpc,
            inner: self.inner.call(req),
            start,
            layer: self.layer.clone(),
            answered: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// The request's future, timed to its response head and counted by status.
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        layer: RequestMetricsLayer,
        // A gRPC call's counters, told `cancelled` if the caller goes away
        // before the response head.
        grpc: Option<grpc::UntilAnswered<(ByGrpcStatus, Option<Arc<PeerMetrics>>)>>,
        answered: bool,
    }

    impl<F> PinnedDrop for MetricsFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped unanswered: the caller went away (a timeout of its
            // own, a reset stream), which no response series shows.
            if !this.answered {
                this.layer.0.cancelled.inc();
            }
        }
    }
}

impl<F, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        *this.answered = true;
        let grpc = this.grpc.take();
        let rsp = match out {
            Ok(rsp) => rsp,
            Err(e) => {
                // No response: the call ended without a status.
                if let Some(counters) = grpc.and_then(grpc::UntilAnswered::answered) {
                    grpc::OnStatus::status(counters, grpc::NONE);
                }
                return Poll::Ready(Err(e));
            }
        };
        let layer = &*this.layer.0;
        // Its own answers (an error, a refusal) the proxy tells apart from
        // the upstream's by why; rare, so looked up by label when they come,
        // and looked for only among errors (every one is 4xx or 5xx).
        if rsp.status().as_u16() >= 400
            && let Some(made) = rsp.extensions().get::<super::error::ProxyMade>()
        {
            layer
                .metrics
                .http_proxy_errors
                .get_or_create(&ReasonLabels {
                    direction: layer.direction,
                    reason: made.0,
                })
                .inc();
            // A 5xx the proxy made (connect refused or timed out, no
            // endpoints, a route's timeout) is what an engineer asks a
            // proxy's log about first; 4xx are the client's, and logged
            // where they are decided. Sampled per reason.
            if rsp.status().is_server_error() {
                let why = rsp.headers().get(crate::defaults::PROXY_ERROR_HEADER);
                strait_otel::sampled_by!(
                    made.0,
                    info,
                    direction = layer.direction.as_str(),
                    reason = made.0,
                    status = rsp.status().as_u16(),
                    error = why.and_then(|v| v.to_str().ok()).unwrap_or(""),
                    "request answered by the proxy"
                );
            }
        }
        let took = this.start.elapsed().as_secs_f64();
        layer.latency.observe(took);
        if let Some(p) = &layer.peer {
            let p = p.http();
            p.latency.observe(took);
            p.responses[status_index(rsp.status())].inc();
        }
        layer.responses[status_index(rsp.status())]
            .get_or_init(|| {
                layer
                    .metrics
                    .http_responses
                    .get_or_create(&StatusLabels {
                        direction: layer.direction,
                        status_class: status_class(rsp.status()),
                    })
                    .clone()
            })
            .inc();
        Poll::Ready(Ok(grpc::UntilAnswered::respond(grpc, rsp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer as _, Service as _};

    /// A request dropped before its response head (its caller's timeout
    /// cancelled it) is counted as cancelled, and one answered is not: the
    /// callee's response series alone would show neither.
    #[tokio::test]
    async fn a_request_dropped_unanswered_is_counted_cancelled() {
        let metrics = Metrics::new();
        let layer = RequestMetricsLayer::new(metrics.clone(), Direction::Inbound);
        let mut slow = layer.layer(tower::service_fn(|_: Request<()>| {
            std::future::pending::<Result<Response<BoxBody>, std::convert::Infallible>>()
        }));
        let mut quick = layer.layer(tower::service_fn(|_: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(super::super::empty()))
        }));
        let cancelled = || {
            metrics
                .http_requests_cancelled
                .get_or_create(&DirectionLabels {
                    direction: Direction::Inbound,
                })
                .get()
        };
        drop(slow.call(Request::new(())));
        assert_eq!(cancelled(), 1);
        quick.call(Request::new(())).await.unwrap();
        assert_eq!(cancelled(), 1, "an answered request is not cancelled");
    }
}
