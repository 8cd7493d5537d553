//! The outbound HTTP path, in the order a request runs through it:
//!
//! logical destination (`Router`: discovery's view of the Service)
//!   -> route rule (`route::Table`, filters)
//!   -> request timeout (all attempts together)
//!   -> retry (body replay, budget; a retry re-enters the split and the balancer)
//!   -> backend (weighted split of the rule's backendRefs)
//!   -> backend request timeout (each attempt)
//!   -> balancer of the backend (P2C peak-EWMA, round robin or hashing; ejection)
//!   -> endpoint (`Forward`: to the peer proxy over mTLS, or to the workload).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::retry::RetryBudget;
use http::{Request, Response};
use tower::{Layer, Service, ServiceBuilder};

use super::backend::{Split, WeightedBackend};
use super::logical::Builder;
use super::route::Rule;
use crate::balance::{Balance, Endpoints};
use crate::control::discovery::{Discovery, Resolved};
use crate::control::view::Resolution;
use crate::defaults;
use crate::http::forward::Forward;
use crate::http::{BoxBody, BoxError, Dst};
use crate::retry::Policy;
use crate::telemetry::metrics::RouteMetrics;
use crate::timeout::{self, Timeout, TimeoutLayer};

/// A backend as a route rule uses it: its own timeout per attempt, above the
/// backend's balancer.
pub type BackendService = Timeout<Balance<Forward>>;
/// A route rule's stack, from its request timeout down.
pub type RouteService = Timeout<tower::retry::Retry<Policy, Split<BackendService>>>;

/// Builds the stack of one route rule over the backends of its Service.
pub fn route(
    service: &str,
    rule: &Rule,
    backends: &HashMap<Arc<str>, Arc<Endpoints>>,
    budget: &Arc<RetryBudget>,
    metrics: &RouteMetrics,
    b: &Builder,
) -> RouteService {
    let split = Split::new(
        rule.backends
            .iter()
            .map(|(name, weight)| {
                // A backend discovery did not describe does not resolve (its
                // Service is gone): its share gets 500, as Gateway API asks.
                // One described without endpoints answers 503.
                let stack = backends.get(name).map(|endpoints| {
                    ServiceBuilder::new()
                        .layer(TimeoutLayer::new(
                            rule.backend_timeout,
                            timeout::Kind::Backend,
                            metrics.backend_timeouts.clone(),
                        ))
                        .service(Balance::new(
                            endpoints.clone(),
                            b.forward.clone(),
                            rule.backend_timeout,
                        ))
                });
                WeightedBackend {
                    weight: *weight,
                    service: stack,
                    metrics: b
                        .metrics
                        .route_backend(service, &rule.route, &rule.rule, name),
                    name: name.clone(),
                }
            })
            .collect(),
    );
    ServiceBuilder::new()
        .layer(TimeoutLayer::new(
            rule.request_timeout,
            timeout::Kind::Request,
            metrics.request_timeouts.clone(),
        ))
        .layer(tower::retry::RetryLayer::new(
            Policy::new(rule.retry.clone(), budget.clone(), metrics.retry.clone())
                .with_timeout(rule.request_timeout),
        ))
        .service(split)
}

/// Asks discovery what a request's destination is. A meshed Service: its
/// stages. Not meshed, or no answer in time: straight to `Forward`, untouched.
#[derive(Clone, Debug)]
pub struct Router {
    discovery: Option<Arc<Discovery>>,
    build: Builder,
    passthrough: Forward,
}

#[derive(Clone, Debug)]
pub struct RouterLayer {
    discovery: Option<Arc<Discovery>>,
    build: Builder,
}

impl RouterLayer {
    pub fn new(discovery: Option<Arc<Discovery>>, build: Builder) -> Self {
        RouterLayer { discovery, build }
    }
}

impl Layer<Forward> for RouterLayer {
    type Service = Router;
    fn layer(&self, passthrough: Forward) -> Router {
        Router {
            discovery: self.discovery.clone(),
            build: self.build.clone(),
            passthrough,
        }
    }
}

impl<B> Service<Request<B>> for Router
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Response<BoxBody>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let (Some(n), Some(Dst(dest))) = (
            crate::telemetry::trace::notes(&req),
            req.extensions().get::<Dst>(),
        ) {
            n.with(|n| n.destination = Some(dest.clone()));
        }
        let Some(discovery) = self.discovery.clone() else {
            return self.passthrough.call(req);
        };
        let build = self.build.clone();
        let mut passthrough = self.passthrough.clone();
        crate::boxed::future(|| async move {
            let resolved = match req.extensions().get::<Dst>() {
                Some(Dst(dest)) => {
                    discovery
                        .resolve(dest, defaults::DISCOVERY_FIRST_ANSWER_TIMEOUT)
                        .await
                }
                None => None,
            };
            match resolved {
                Some(Resolved {
                    resolution: Resolution::Service(view),
                    logical,
                }) => Ok(logical.stages(&view, &build).serve(req).await),
                _ => passthrough.call(req).await,
            }
        })
    }
}
