//! Request metrics as a layer: requests, responses by status class, and the time
//! to response headers, per direction.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use crate::telemetry::metrics::{DirectionLabels, StatusLabels, status_class};
use crate::telemetry::{Direction, Metrics};

#[derive(Clone, Debug)]
pub struct RequestMetricsLayer {
    metrics: Arc<Metrics>,
    direction: Direction,
    requests: Counter,
    latency: Histogram,
}

impl RequestMetricsLayer {
    pub fn new(metrics: Arc<Metrics>, direction: Direction) -> Self {
        let labels = DirectionLabels { direction };
        let requests = metrics.http_requests.get_or_create(&labels).clone();
        let latency = metrics.http_response_latency.get_or_create(&labels).clone();
        Self {
            metrics,
            direction,
            requests,
            latency,
        }
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

impl<S, B, RB> tower::Service<Request<B>> for RequestMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let start = Instant::now();
        self.layer.requests.inc();
        let layer = self.layer.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let rsp = fut.await?;
            layer.latency.observe(start.elapsed().as_secs_f64());
            layer
                .metrics
                .http_responses
                .get_or_create(&StatusLabels {
                    direction: layer.direction,
                    status_class: status_class(rsp.status()),
                })
                .inc();
            Ok(rsp)
        })
    }
}
