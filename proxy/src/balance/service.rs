//! The balancer of one backend as a service: picks an endpoint, sends the
//! request to it (to its proxy over mTLS when it is meshed), and tells the
//! endpoint's state how it went.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response, StatusCode};

use super::{Avoid, Endpoints, InFlight, PickError, ServedBy};
use crate::addr::DestAddr;
use crate::http::body::GuardedBody;
use crate::http::error::{
    ClientFaulted, NoVerdict, NotProcessed, UpstreamFailure, endpoint_failed, error_response,
};
use crate::http::{BoxBody, Dst, boxed};

/// Balances over `endpoints`, sending through `inner` (the endpoint stack).
#[derive(Clone, Debug)]
pub struct Balance<S> {
    endpoints: Arc<Endpoints>,
    inner: S,
    /// The route's per-attempt timeout, which sits above: a request it gives
    /// up on counts as the endpoint's failure.
    attempt_timeout: Option<Duration>,
}

impl<S> Balance<S> {
    pub fn new(endpoints: Arc<Endpoints>, inner: S, attempt_timeout: Option<Duration>) -> Self {
        Balance {
            endpoints,
            inner,
            attempt_timeout,
        }
    }
}

impl<S, B> tower::Service<Request<B>> for Balance<S>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<BoxBody>, Infallible>>, BalanceFuture<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Taken before the timeout above starts its clock (it calls us first),
        // so an attempt it gave up on is always past this. For a request with
        // a body, only if told when it ends: the clock runs while a client
        // uploads, and a client that trickles its body must not eject the
        // endpoint (`InFlight` judges by when it ended).
        let sent = req.body().is_end_stream();
        let body_end = (!sent)
            .then(|| req.extensions().get::<crate::retry::BodyEnd>().cloned())
            .flatten();
        let deadline = self
            .attempt_timeout
            .filter(|_| sent || body_end.is_some())
            .map(|t| tokio::time::Instant::now() + t);
        // A retry may come after discovery changed the endpoints: it goes to
        // the current ones, not to those of when its request began.
        let replacement = self.endpoints.replacement();
        let endpoints = replacement.as_ref().unwrap_or(&self.endpoints);
        let avoid = req
            .extensions()
            .get::<Avoid>()
            .map_or(&[][..], |a| &a.0[..]);
        let mut in_flight = match endpoints.pick(req.headers(), avoid) {
            Ok(f) => f,
            Err(e) => {
                let (status, reason) = match e {
                    PickError::NoEndpoints => (StatusCode::SERVICE_UNAVAILABLE, "no endpoints"),
                };
                tracing::debug!(backend = %endpoints.name(), reason, "no endpoint for request");
                let rsp = error_response(
                    "no_endpoints",
                    status,
                    &format!("{reason} for {}", endpoints.name()),
                );
                return Either::Left(ready(Ok(rsp)));
            }
        };
        if let Some(d) = deadline {
            in_flight.give_up_at(d, body_end);
        }
        let ep = in_flight.endpoint();
        let served_by = ep.addr;
        if let Some(p) = req.extensions().get::<super::Picked>() {
            p.set(served_by);
        }
        // Dst is replaced in place, not boxed again; a request the forwarder
        // handed back for a retry comes without one.
        let dst = Dst(DestAddr::Socket(ep.connect_addr()));
        match req.extensions_mut().get_mut::<Dst>() {
            Some(d) => *d = dst,
            None => {
                req.extensions_mut().insert(dst);
            }
        }
        if let Some(p) = in_flight.to_peer() {
            req.extensions_mut().insert(p.clone());
        }
        if let Some(n) = crate::telemetry::trace::notes(&req) {
            n.with(|n| {
                n.endpoint = Some(served_by);
                n.peer = ep.proxy.as_ref().map(|p| p.identity.clone());
            });
        }
        if let Some(t) = endpoints.config().connect_timeout {
            req.extensions_mut().insert(crate::http::ConnectTimeout(t));
        }
        if let Some(t) = self.attempt_timeout {
            // A quarter of the attempt left to answer it unsent.
            let after = t * 3 / 4;
            req.extensions_mut().insert(crate::http::ConnectBy {
                at: tokio::time::Instant::now() + after,
                after,
            });
        }
        // The ready service goes with this request; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(BalanceFuture {
            inner: inner.call(req),
            in_flight: Some(in_flight),
            served_by,
        })
    }
}

pin_project_lite::pin_project! {
    /// A request on its way to the endpoint picked for it; on its response the
    /// endpoint's state learns how it went. Named rather than boxed: the
    /// balancer is on every request's path.
    pub struct BalanceFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
        served_by: SocketAddr,
    }
}

impl<F> Future for BalanceFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, Infallible>>,
{
    type Output = Result<Response<BoxBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut rsp = std::task::ready!(this.inner.poll(cx))?;
        let Some(in_flight) = this.in_flight.take() else {
            // Only if the inner future answered twice.
            return Poll::Pending;
        };
        if rsp.extensions().get::<NotProcessed>().is_some() {
            // Refused unprocessed (at its stream limit, or going away): a
            // fast answer that is no measure of its cost.
            in_flight.shed();
        } else if rsp.extensions().get::<NoVerdict>().is_some() {
            // The endpoint's connect was waited for only part of an attempt:
            // no verdict, but the wait goes into its latency, so that one
            // whose connects hang (a node gone) is picked less.
            in_flight.waited();
        } else if rsp.extensions().get::<ClientFaulted>().is_some() {
            // The client broke its own request: nothing learnt of the endpoint.
            in_flight.no_verdict();
        } else if rsp.extensions().get::<UpstreamFailure>().is_some() {
            in_flight.unreachable();
        } else if endpoint_failed(&rsp) {
            in_flight.app_unreachable();
        } else if rsp.status() == StatusCode::TOO_MANY_REQUESTS
            || crate::http::grpc::shed(rsp.headers())
        {
            in_flight.shed();
        } else if rsp.status().is_server_error() || crate::http::grpc::server_failed(rsp.headers())
        {
            in_flight.failed();
        } else {
            in_flight.success();
        }
        if ServedBy::worth_noting(&rsp) {
            rsp.extensions_mut().insert(ServedBy(*this.served_by));
        }
        if let Some(hold) = rsp.extensions().get::<crate::http::upgrade::TunnelHold>() {
            // A tunnel is load on its endpoint for as long as it is open.
            hold.keep(in_flight);
            return Poll::Ready(Ok(rsp));
        }
        Poll::Ready(Ok(rsp.map(|b| boxed(GuardedBody::new(b, in_flight)))))
    }
}
