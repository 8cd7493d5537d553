//! Request and response hygiene between hops (RFC 9110 §7.6.1): hop-by-hop headers
//! are removed, and ambiguous message framing (request smuggling) is refused.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, StatusCode};
use tracing::info;

use super::BoxBody;
use super::conn_guard::ConflictingFraming;
use super::error::error_response;
use super::upgrade;
use crate::telemetry::{Direction, Metrics};

#[derive(Clone, Debug)]
pub struct NormalizeLayer {
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl NormalizeLayer {
    pub fn new(metrics: Arc<Metrics>, direction: Direction) -> Self {
        Self { metrics, direction }
    }
}

impl<S> tower::Layer<S> for NormalizeLayer {
    type Service = Normalize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Normalize {
            inner,
            metrics: self.metrics.clone(),
            direction: self.direction,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Normalize<S> {
    inner: S,
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl<S, B> tower::Service<Request<B>> for Normalize<S>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let h = req.headers();
        let conflicting = req.extensions().get::<ConflictingFraming>().is_some()
            || (h.contains_key(header::TRANSFER_ENCODING)
                && h.contains_key(header::CONTENT_LENGTH));
        if conflicting {
            // hyper would frame by Transfer-Encoding; a peer that frames by
            // Content-Length would see a different request. Refuse both readings.
            self.metrics.reject_http(self.direction, "smuggling");
            info!(
                direction = self.direction.as_str(),
                uri = %req.uri(),
                "refused request with both Content-Length and Transfer-Encoding"
            );
            let mut rsp = error_response(
                StatusCode::BAD_REQUEST,
                "conflicting Content-Length and Transfer-Encoding",
            );
            rsp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return Box::pin(async move { Ok(rsp) });
        }
        let keep_upgrade = upgrade::is_upgrade_request(&req);
        strip_hop_by_hop(req.headers_mut(), keep_upgrade);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut rsp = fut.await?;
            let keep = rsp.status() == StatusCode::SWITCHING_PROTOCOLS;
            strip_hop_by_hop(rsp.headers_mut(), keep);
            Ok(rsp)
        })
    }
}

static HOP_BY_HOP: [HeaderName; 5] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
];

/// Removes the fields that describe one connection rather than the message: those
/// named by `Connection`, and the standard hop-by-hop set. An upgrade keeps
/// `Connection: upgrade` and `Upgrade`, which the next hop needs to upgrade too;
/// `TE: trailers` is kept because gRPC over HTTP/2 requires it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if keep_upgrade && n == header::UPGRADE {
            continue;
        }
        headers.remove(n);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in &HOP_BY_HOP {
        if (keep_upgrade && n == header::UPGRADE) || (te_trailers && n == header::TE) {
            continue;
        }
        headers.remove(n);
    }
    if keep_upgrade {
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
    } else {
        headers.remove(header::CONNECTION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn removes_hop_by_hop_and_connection_named_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn keeps_upgrade_and_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::TE], "trailers");
    }
}
