//! Route timeouts as a layer (tower's `Timeout`): `timeouts.request` above the
//! retries covers every attempt together, `timeouts.backendRequest` below them
//! covers each attempt. Both run until the response headers: a stream that has
//! started is not cut. On expiry the proxy answers 504 with `strait-proxy-error`
//! naming the timeout and its limit.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;

use crate::http::BoxBody;
use crate::http::error::error_response;
use crate::telemetry::metrics::OnFirstUse;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Request,
    Backend,
}

impl Kind {
    fn reason(self) -> &'static str {
        match self {
            Kind::Request => "request timeout",
            Kind::Backend => "backend request timeout",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Request => "request_timeout",
            Kind::Backend => "backend_request_timeout",
        }
    }
}

/// A timeout, or none (`after: None` passes requests through untouched).
#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    after: Option<Duration>,
    kind: Kind,
    expired: OnFirstUse<Counter>,
}

impl TimeoutLayer {
    pub fn new(after: Option<Duration>, kind: Kind, expired: OnFirstUse<Counter>) -> Self {
        TimeoutLayer {
            after,
            kind,
            expired,
        }
    }
}

impl<S> tower::Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner: match self.after {
                Some(d) => Inner::Timed(tower::timeout::Timeout::new(inner, d), d),
                None => Inner::Untimed(inner),
            },
            kind: self.kind,
            expired: self.expired.clone(),
        }
    }
}

#[derive(Clone, Debug)]
enum Inner<S> {
    /// With its limit, for the answer to name.
    Timed(tower::timeout::Timeout<S>, Duration),
    Untimed(S),
}

#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: Inner<S>,
    kind: Kind,
    expired: OnFirstUse<Counter>,
}

pin_project! {
    #[project = TimeoutFutureProj]
    pub enum TimeoutFuture<T, U> {
        Timed { #[pin] f: T, kind: Kind, after: Duration, expired: OnFirstUse<Counter> },
        Untimed { #[pin] f: U },
    }
}

impl<S, Req> tower::Service<Req> for Timeout<S>
where
    S: tower::Service<Req, Response = Response<BoxBody>, Error = std::convert::Infallible>,
{
    type Response = Response<BoxBody>;
    type Error = std::convert::Infallible;
    type Future = TimeoutFuture<tower::timeout::future::ResponseFuture<S::Future>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match &mut self.inner {
            // Our services are always ready; an error here cannot happen.
            Inner::Timed(t, _) => t.poll_ready(cx).map(|_| Ok(())),
            Inner::Untimed(s) => s.poll_ready(cx),
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match &mut self.inner {
            Inner::Timed(t, after) => TimeoutFuture::Timed {
                f: t.call(req),
                kind: self.kind,
                after: *after,
                expired: self.expired.clone(),
            },
            Inner::Untimed(s) => TimeoutFuture::Untimed { f: s.call(req) },
        }
    }
}

impl<T, U> Future for TimeoutFuture<T, U>
where
    T: Future<Output = Result<Response<BoxBody>, tower::BoxError>>,
    U: Future<Output = Result<Response<BoxBody>, std::convert::Infallible>>,
{
    type Output = Result<Response<BoxBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            TimeoutFutureProj::Untimed { f } => f.poll(cx),
            TimeoutFutureProj::Timed {
                f,
                kind,
                after,
                expired,
            } => {
                Poll::Ready(Ok(match ready!(f.poll(cx)) {
                    Ok(rsp) => rsp,
                    Err(_) => {
                        expired.inc();
                        // The limit that fired, as the route gives it.
                        let reason = format!(
                            "{} after {}",
                            kind.reason(),
                            humantime::format_duration(*after)
                        );
                        let mut rsp =
                            error_response(kind.label(), StatusCode::GATEWAY_TIMEOUT, &reason);
                        rsp.extensions_mut().insert(TimedOut(*kind));
                        rsp.extensions_mut()
                            .insert(crate::http::grpc::DEADLINE_EXCEEDED);
                        rsp
                    }
                }))
            }
        }
    }
}

/// Marks a response the proxy answered because a timeout expired.
#[derive(Clone, Copy, Debug)]
pub struct TimedOut(pub Kind);

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Service, ServiceExt};

    #[tokio::test(start_paused = true)]
    async fn a_stalled_backend_gets_a_504_at_the_deadline() {
        let stall = tower::service_fn(|_: ()| async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, std::convert::Infallible>(Response::new(crate::http::empty()))
        });
        let expired = Counter::default();
        let mut svc = tower::Layer::layer(
            &TimeoutLayer::new(
                Some(Duration::from_millis(200)),
                Kind::Request,
                OnFirstUse::made(expired.clone()),
            ),
            stall,
        );
        let start = tokio::time::Instant::now();
        let rsp = svc.ready().await.unwrap().call(()).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            rsp.headers()["strait-proxy-error"],
            "request timeout after 200ms"
        );
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        assert_eq!(expired.get(), 1);
    }
}
