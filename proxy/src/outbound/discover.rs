//! Asks discovery what a request's destination is. A meshed Service: balance over
//! its endpoints and send to the chosen endpoint's proxy. Not meshed, or no answer
//! in time: pass through untouched.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use tracing::debug;

use crate::addr::DestAddr;
use crate::control::discovery::{Discovery, Resolved};
use crate::control::view::Resolution;
use crate::defaults;
use crate::http::body::GuardedBody;
use crate::http::error::{endpoint_failed, error_response};
use crate::http::{BoxBody, Dst, ToPeer, boxed};

#[derive(Clone, Debug)]
pub struct DiscoverLayer {
    discovery: Option<Arc<Discovery>>,
}

impl DiscoverLayer {
    pub fn new(discovery: Option<Arc<Discovery>>) -> Self {
        Self { discovery }
    }
}

impl<S> tower::Layer<S> for DiscoverLayer {
    type Service = Discover<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Discover {
            inner,
            discovery: self.discovery.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Discover<S> {
    inner: S,
    discovery: Option<Arc<Discovery>>,
}

impl<S, B> tower::Service<Request<B>> for Discover<S>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(discovery) = self.discovery.clone() else {
            return Box::pin(self.inner.call(req));
        };
        // The ready service goes with this request; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let Some(Dst(dest)) = req.extensions().get::<Dst>().cloned() else {
                return inner.call(req).await;
            };
            let Some(Resolved {
                resolution: Resolution::Service(svc),
                balancer,
            }) = discovery
                .resolve(&dest, defaults::DISCOVERY_FIRST_ANSWER_TIMEOUT)
                .await
            else {
                debug!(%dest, "not meshed, passing through");
                return inner.call(req).await;
            };
            let Some((ep, in_flight)) = balancer.pick(&svc.endpoints) else {
                return Ok(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("no endpoints for {}", svc.name),
                ));
            };
            req.extensions_mut()
                .insert(Dst(DestAddr::Socket(ep.connect_addr())));
            if let Some(p) = &ep.proxy {
                req.extensions_mut().insert(ToPeer {
                    target_port: ep.addr.port(),
                    identity: p.identity.clone(),
                });
            }
            let rsp = inner.call(req).await?;
            if endpoint_failed(&rsp) {
                in_flight.fail();
            } else {
                in_flight.observe();
            }
            Ok(rsp.map(|b| boxed(GuardedBody::new(b, in_flight))))
        })
    }
}
