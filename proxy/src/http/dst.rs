//! Sets each request's destination (`Dst`) by a direction-specific rule, or answers
//! the proxy's own error when the rule refuses the request.

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};

use super::error::ProxyError;
use super::{BoxBody, Dst};
use crate::addr::DestAddr;

/// How a direction picks where a request goes.
pub trait ChooseDst: Clone {
    fn choose<B>(&self, req: &mut Request<B>) -> Result<DestAddr, ProxyError>;
}

#[derive(Clone, Debug)]
pub struct SetDstLayer<C>(pub C);

impl<S, C: ChooseDst> tower::Layer<S> for SetDstLayer<C> {
    type Service = SetDst<S, C>;
    fn layer(&self, inner: S) -> Self::Service {
        SetDst {
            inner,
            choose: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SetDst<S, C> {
    inner: S,
    choose: C,
}

impl<S, C, B> tower::Service<Request<B>> for SetDst<S, C>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>>,
    C: ChooseDst,
{
    type Response = Response<BoxBody>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<BoxBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.choose.choose(&mut req) {
            Ok(d) => {
                req.extensions_mut().insert(Dst(d));
                Either::Left(self.inner.call(req))
            }
            Err(e) => {
                // The path only: a query or userinfo may hold credentials.
                strait_otel::sampled!(info, error = %e, path = %ShortPath(req.uri()), "request refused");
                Either::Right(ready(Ok(e.into_response())))
            }
        }
    }
}

/// A URI's path, cut to the log's field bound.
struct ShortPath<'a>(&'a http::Uri);

impl std::fmt::Display for ShortPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.0.path();
        let mut end = p.len().min(crate::telemetry::access_log::MAX_FIELD);
        while !p.is_char_boundary(end) {
            end -= 1;
        }
        f.write_str(&p[..end])
    }
}
