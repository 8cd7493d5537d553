//! The weighted choice of a route rule's backends (`backendRefs[].weight`):
//! canaries and blue/green. A weight of 0 gets no traffic; a rule whose
//! backends all weigh 0, or that has none, answers 500, and so does the share
//! of a backend that does not resolve (Gateway API).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response, StatusCode};
use rand::Rng;

use crate::http::BoxBody;
use crate::http::error::error_response;
use crate::telemetry::metrics::{RouteBackendMetrics, status_index};

#[derive(Debug)]
pub struct WeightedBackend<S> {
    pub weight: u32,
    /// `None`: the backendRef does not resolve (its Service, or that port of
    /// it, does not exist); its share of requests gets 500.
    pub service: Option<S>,
    /// Each attempt's responses and time to response headers.
    pub metrics: Arc<RouteBackendMetrics>,
    /// The backend's Service name, for spans and access logs.
    pub name: Arc<str>,
}

#[derive(Debug)]
pub struct Split<S> {
    backends: Arc<[WeightedBackend<S>]>,
    total: u64,
}

impl<S> Clone for Split<S> {
    fn clone(&self) -> Self {
        Split {
            backends: self.backends.clone(),
            total: self.total,
        }
    }
}

impl<S> Split<S> {
    pub fn new(backends: Vec<WeightedBackend<S>>) -> Self {
        let total = backends.iter().map(|b| u64::from(b.weight)).sum();
        Split {
            backends: backends.into(),
            total,
        }
    }

    fn choose(&self) -> Option<&WeightedBackend<S>> {
        if self.total == 0 {
            return None;
        }
        let mut x = rand::rng().random_range(0..self.total);
        self.backends.iter().find(|b| {
            let w = u64::from(b.weight);
            if x < w {
                true
            } else {
                x -= w;
                false
            }
        })
    }
}

impl<S, B> tower::Service<Request<B>> for Split<S>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>, Error = Infallible> + Clone,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<BoxBody>, Infallible>>, SplitFuture<S::Future>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Backends are always ready: they only pick an endpoint and forward
        // (their balancer and forwarder never hold a request back in
        // `poll_ready`), so `call` calls the chosen one directly.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(b) = self.choose() else {
            let rsp = unresolved("no backend for route");
            return Either::Left(ready(Ok(rsp)));
        };
        if let Some(n) = crate::telemetry::trace::notes(&req) {
            n.with(|n| n.backend = Some(b.name.clone()));
        }
        let grpc = crate::http::grpc::is_call(&req);
        b.metrics.requests.inc();
        // No attempt is made, so none is timed.
        let Some(mut svc) = b.service.clone() else {
            let mut rsp = unresolved(&not_found(&b.name));
            b.metrics.http.get().responses[status_index(rsp.status())].inc();
            if grpc {
                rsp = crate::http::grpc::on_status(rsp, b.metrics.clone());
            }
            return Either::Left(ready(Ok(rsp)));
        };
        let start = tokio::time::Instant::now();
        let attempt = req.extensions().get::<InFlight>().cloned();
        if let Some(a) = &attempt {
            a.began(Attempt {
                metrics: b.metrics.clone(),
                start,
                grpc,
            });
        }
        Either::Right(SplitFuture {
            inner: svc.call(req),
            metrics: b.metrics.clone(),
            start,
            grpc,
            attempt,
        })
    }
}

pin_project_lite::pin_project! {
    /// A request sent to the backend the split chose, counted by status and
    /// timed per attempt when its response comes. Named rather than boxed: every
    /// attempt passes here.
    pub struct SplitFuture<F> {
        #[pin]
        inner: F,
        metrics: Arc<RouteBackendMetrics>,
        start: tokio::time::Instant,
        grpc: bool,
        attempt: Option<InFlight>,
    }
}

impl<F> Future for SplitFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, Infallible>>,
{
    type Output = Result<Response<BoxBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let rsp = std::task::ready!(this.inner.poll(cx))?;
        if let Some(a) = this.attempt {
            a.answered();
        }
        (this.metrics.http.get()).observe(rsp.status(), this.start.elapsed().as_secs_f64());
        let rsp = match *this.grpc {
            true => crate::http::grpc::on_status(rsp, this.metrics.clone()),
            false => rsp,
        };
        Poll::Ready(Ok(rsp))
    }
}

/// On a request whose rule has a request timeout: the attempt in flight and
/// its backend. When the timeout answers for it (the attempt dropped
/// unanswered), its 504 is that backend's too, as Envoy counts a route's
/// timeout against the cluster chosen: a backend that hangs would otherwise
/// look healthy in the series canary analysis compares.
#[derive(Clone, Debug, Default)]
pub struct InFlight(Arc<Mutex<Option<Attempt>>>);

#[derive(Debug)]
pub struct Attempt {
    metrics: Arc<RouteBackendMetrics>,
    start: tokio::time::Instant,
    grpc: bool,
}

impl InFlight {
    fn began(&self, a: Attempt) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(a);
    }

    fn answered(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    /// The request's timeout answered `rsp` while an attempt was in flight:
    /// counted against its backend, as its answer.
    pub fn timed_out(&self, rsp: &Response<BoxBody>) {
        let Some(a) = self.0.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            return;
        };
        (a.metrics.http.get()).observe(rsp.status(), a.start.elapsed().as_secs_f64());
        if a.grpc {
            let crate::http::grpc::Code(code) = crate::http::grpc::DEADLINE_EXCEEDED;
            a.metrics.grpc.count(usize::from(code));
        }
    }
}

/// Why a backend has no service, by the name the controller gave it: a
/// reference it could not resolve is named for what it lacks,
/// `ReferenceGrant/<ns>/<name>` or `<group>/<Kind>/<ns>/<name>` (a
/// Service's name has no `/`).
fn not_found(name: &str) -> String {
    if let Some(svc) = name.strip_prefix("ReferenceGrant/") {
        return format!("backend {svc} is in another namespace, and no ReferenceGrant allows it");
    }
    let mut parts = name.rsplitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(svc), Some(ns), Some(kind)) => format!(
            "backend {ns}/{svc} is a {}, not a Service",
            kind.trim_start_matches('/')
        ),
        _ => format!("backend {name} not found"),
    }
}

/// A request a rule has no backend for: 500, as Gateway API asks, and to a
/// gRPC caller UNAVAILABLE, as its GRPCRoute asks (a 500 reads as UNKNOWN).
fn unresolved(reason: &str) -> Response<BoxBody> {
    let mut rsp = error_response("no_backend", StatusCode::INTERNAL_SERVER_ERROR, reason);
    rsp.extensions_mut().insert(crate::http::grpc::UNAVAILABLE);
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_split_traffic_and_zero_gets_none() {
        let split = Split::new(
            [(90, "v1"), (10, "v2"), (0, "v3")]
                .into_iter()
                .map(|(weight, service)| WeightedBackend {
                    weight,
                    service: Some(service),
                    metrics: Default::default(),
                    name: service.into(),
                })
                .collect(),
        );
        let mut counts = std::collections::HashMap::new();
        for _ in 0..10_000 {
            *counts
                .entry(split.choose().unwrap().service.unwrap())
                .or_insert(0) += 1;
        }
        let v2 = counts.get("v2").copied().unwrap_or(0);
        assert!((800..1200).contains(&v2), "{counts:?}");
        assert!(!counts.contains_key("v3"), "{counts:?}");
        let none: Split<&str> = Split::new(vec![]);
        assert!(none.choose().is_none());
    }

    /// The 500 says which backend, and why a reference went unresolved.
    #[test]
    fn an_unresolved_backend_is_named_with_what_it_lacks() {
        assert_eq!(
            not_found("web.shop.svc.cluster.local:80"),
            "backend web.shop.svc.cluster.local:80 not found"
        );
        // As the controller names them (`routes::Rule::to_api`).
        assert_eq!(
            not_found("ReferenceGrant/pay/api"),
            "backend pay/api is in another namespace, and no ReferenceGrant allows it"
        );
        assert_eq!(
            not_found("multicluster.x-k8s.io/ServiceImport/shop/api"),
            "backend shop/api is a multicluster.x-k8s.io/ServiceImport, not a Service"
        );
        assert_eq!(
            not_found("/Pod/shop/api"),
            "backend shop/api is a Pod, not a Service"
        );
    }

    /// The share of a backend that does not resolve is answered 500 and
    /// counted under it; the others are served.
    #[tokio::test]
    async fn a_backend_that_does_not_resolve_answers_its_share_500() {
        use tower::Service as _;
        let ok = tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(crate::http::full("ok")))
        });
        let backend = |weight, service| WeightedBackend {
            weight,
            service,
            metrics: Default::default(),
            name: "b".into(),
        };
        let mut split = Split::new(vec![backend(1, None), backend(1, Some(ok))]);
        let mut statuses = std::collections::HashMap::new();
        for _ in 0..200 {
            let rsp = split.call(Request::new(())).await.unwrap();
            if rsp.status() == StatusCode::INTERNAL_SERVER_ERROR {
                assert_eq!(
                    rsp.headers()[crate::defaults::PROXY_ERROR_HEADER],
                    "backend b not found"
                );

                assert_eq!(crate::http::grpc::retry_code(&rsp), Some(14), "UNAVAILABLE");
            }
            *statuses.entry(rsp.status().as_u16()).or_insert(0) += 1;
        }
        let failed = statuses.get(&500).copied().unwrap_or(0);
        assert!((50..150).contains(&failed), "{statuses:?}");
        assert_eq!(statuses.get(&200).copied().unwrap_or(0), 200 - failed);
        let counted = split.backends[0].metrics.http.get().responses
            [status_index(StatusCode::INTERNAL_SERVER_ERROR)]
        .get();
        assert_eq!(counted, failed as u64);
    }

    /// A canary failing every gRPC call (trailers-only UNAVAILABLE, HTTP
    /// 200) shows in its own backend's series by `grpc_status`, not as 2xx
    /// alone.
    #[tokio::test]
    async fn each_backend_counts_its_grpc_statuses() {
        use tower::Service as _;
        let metrics = crate::telemetry::Metrics::new();
        let failing = tower::service_fn(|_: Request<()>| async {
            let mut rsp = Response::new(crate::http::empty());
            rsp.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            rsp.headers_mut()
                .insert("grpc-status", "14".parse().unwrap());
            Ok::<_, Infallible>(rsp)
        });
        let mut split = Split::new(vec![WeightedBackend {
            weight: 1,
            service: Some(failing),
            metrics: metrics.route_backend("web:80", "shop/web", "0", "web-canary"),
            name: "web-canary".into(),
        }]);
        for _ in 0..3 {
            let call = Request::builder()
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let rsp = split.call(call).await.unwrap();
            assert_eq!(rsp.status(), StatusCode::OK);
        }
        let text = metrics.encode();
        let line = "strait_proxy_backend_grpc_responses_total{service=\"web:80\",route=\"shop/web\",rule=\"0\",backend=\"web-canary\",grpc_status=\"14\"} 3";
        assert!(text.contains(line), "{text}");
    }
}
