//! Errors the proxy answers itself, each a clear status and a `strait-proxy-error`
//! header naming the cause.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};

use super::BoxBody;
use crate::addr::DestAddr;
use crate::defaults::PROXY_ERROR_HEADER;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("request loop: {0} is this proxy")]
    Loop(SocketAddr),
    #[error("target port {0} is a strait proxy's port, never an app's")]
    MeshPort(u16),
    #[error("the request body from the client was malformed or cut short")]
    ClientBody,
    #[error("the request body from the client stalled for {0:?}")]
    ClientBodyStalled(Duration),
    #[error("no longer authorized by the inbound policy")]
    Revoked,
    #[error("cannot resolve {name}: {reason}")]
    Resolve { name: DestAddr, reason: String },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    /// No connection to the endpoint within the share of the attempt's
    /// timeout a connect may have: sent elsewhere, but no verdict on the
    /// endpoint, whose connect may be only slow (it goes on for the next).
    #[error("no connection to {addr} within {after:?} of the attempt")]
    ConnectWait { addr: SocketAddr, after: Duration },
    #[error("connect to {addr} failed: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("upstream {addr} failed: {reason}")]
    Upstream { addr: SocketAddr, reason: String },
    /// The upstream did not process the request: it refused the stream, or
    /// its graceful GOAWAY named only earlier ones. Safe to send again, and
    /// nothing against the endpoint (it is busy, or going away).
    #[error("upstream {addr} {reason}")]
    Refused { addr: SocketAddr, reason: String },
    /// This proxy cannot present a valid certificate: nothing of the
    /// endpoint is learnt, and a retry would meet the same.
    #[error("{0}")]
    OwnCertificate(&'static str),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::Loop(_) => StatusCode::BAD_REQUEST,
            ProxyError::MeshPort(_) | ProxyError::Revoked => StatusCode::FORBIDDEN,
            ProxyError::ClientBody => StatusCode::BAD_REQUEST,
            ProxyError::ClientBodyStalled(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ConnectTimeout { .. } | ProxyError::ConnectWait { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Resolve { .. }
            | ProxyError::Connect { .. }
            | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::OwnCertificate(_) | ProxyError::Refused { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// A short reason for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::Loop(_) => "loop",
            ProxyError::MeshPort(_) => "mesh_port",
            ProxyError::ClientBody => "client_body",
            ProxyError::ClientBodyStalled(_) => "client_body_timeout",
            ProxyError::Revoked => "unauthorized",
            ProxyError::Resolve { .. } => "resolve",
            ProxyError::ConnectTimeout { .. } | ProxyError::ConnectWait { .. } => "connect_timeout",
            ProxyError::Connect { .. } => "connect",
            ProxyError::Upstream { .. } => "upstream",
            ProxyError::OwnCertificate(_) => "no_certificate",
            ProxyError::Refused { .. } => "refused",
        }
    }

    /// Whether the client failed the request (its body), whatever the upstream did.
    pub fn is_client_fault(&self) -> bool {
        matches!(
            self,
            ProxyError::ClientBody | ProxyError::ClientBodyStalled(_) | ProxyError::Revoked
        )
    }

    /// Whether the upstream failed us (rather than the request being refused):
    /// the balancer takes such an endpoint for a slow one.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::Resolve { .. }
                | ProxyError::ConnectTimeout { .. }
                | ProxyError::Connect { .. }
                | ProxyError::Upstream { .. }
        )
    }

    pub fn into_response(self) -> Response<BoxBody> {
        let mut text = self.to_string();
        // Said of a request none of which left (a refusal says it already):
        // a calling proxy may send it to another endpoint, as it would one
        // it could not connect to itself.
        if self.not_sent() && !matches!(self, ProxyError::Refused { .. }) {
            text.push(' ');
            text.push_str(NOT_SENT);
        }
        let mut rsp = error_response(self.reason(), self.status(), &text);
        if self.is_upstream_failure() {
            rsp.extensions_mut().insert(UpstreamFailure);
        }
        if self.not_sent() {
            rsp.extensions_mut().insert(RequestNotSent);
        }
        if matches!(
            self,
            ProxyError::Resolve { .. }
                | ProxyError::ConnectTimeout { .. }
                | ProxyError::Connect { .. }
        ) {
            rsp.extensions_mut().insert(CloseClient);
        }
        if matches!(self, ProxyError::ClientBody) {
            rsp.extensions_mut().insert(super::grpc::CALLER_CANCELLED);
        }
        if self.is_client_fault() {
            // The connection cannot be reused: the rest of the body is unread.
            rsp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            rsp.extensions_mut().insert(ClientFaulted);
            rsp.extensions_mut().insert(CloseClient);
        }
        // Refused here after an endpoint was picked (a bad Host, a loop): the
        // endpoint never saw the request, so its balancer learns nothing, and
        // a probe of an ejected endpoint does not re-admit it unasked.
        if matches!(
            self,
            ProxyError::BadRequest(_) | ProxyError::Loop(_) | ProxyError::OwnCertificate(_)
        ) {
            rsp.extensions_mut().insert(ClientFaulted);
        }
        if matches!(self, ProxyError::ConnectWait { .. }) {
            rsp.extensions_mut().insert(NoVerdict);
        }
        if matches!(self, ProxyError::Refused { .. }) {
            rsp.extensions_mut().insert(NotProcessed);
        }
        rsp
    }

    /// Whether the request failed before any of it was written upstream: it can
    /// always be sent again, to another endpoint.
    pub fn not_sent(&self) -> bool {
        matches!(
            self,
            ProxyError::Resolve { .. }
                | ProxyError::ConnectTimeout { .. }
                | ProxyError::ConnectWait { .. }
                | ProxyError::Connect { .. }
                | ProxyError::Refused { .. }
        )
    }
}

/// What a proxy's `strait-proxy-error` ends with when none of the request
/// left it: the peer proxy could not connect to its app (a pod whose app is
/// shutting down while its proxy still serves). The endpoint failed, but the
/// request may go to another one.
pub const NOT_SENT: &str = "(not sent)";

/// Marks an upstream's word that it did not process the request (it refused
/// the stream, or its GOAWAY came first), ours or a peer proxy's: the
/// endpoint is busy or going away, not failing, and its fast answer is no
/// measure of its cost. Passed over as one shedding load is.
#[derive(Clone, Copy, Debug)]
pub struct NotProcessed;

/// What a peer proxy's `strait-proxy-error` ends with when the request was
/// not processed: its app refused the stream (`ProxyError::Refused`), or the
/// peer was over its `--max-in-flight-requests`.
pub const NOT_PROCESSED: &str = "(not processed)";

/// Marks a response that says nothing of its endpoint, though the request
/// did not reach it (a connect waited for only part of an attempt).
#[derive(Clone, Copy, Debug)]
pub struct NoVerdict;

/// Marks a proxy's answer after which the client's HTTP/1 connection is
/// closed, should it be the one the client gets: the client's own fault (the
/// rest of its body unread), or a destination that could not be reached (no
/// retry got through). Without the mesh the server going away would have
/// closed the connection; a client holding it would otherwise fail every
/// request on it (a pod gone after a rollout, a Service made again
/// elsewhere) rather than connect and resolve its name again.
#[derive(Clone, Copy, Debug)]
pub struct CloseClient;

/// Whether an app's HTTP/2 connection is to go away after this answer: its
/// destination could not be reached (`CloseClient`), not the client's own
/// fault, which over HTTP/2 is its stream's alone.
pub fn destination_unreachable<B>(rsp: &Response<B>) -> bool {
    rsp.extensions().get::<CloseClient>().is_some()
        && rsp.extensions().get::<ClientFaulted>().is_none()
}

/// Marks a response the proxy made up because the request could not be sent at
/// all (no connection): safe to retry whatever the request.
#[derive(Clone, Copy, Debug)]
pub struct RequestNotSent;

/// The head of a request that was never sent, handed back on its error
/// response: a retry of a request that never reached a backend sends it again
/// without having copied it up front. Taken once.
#[derive(Clone, Debug)]
pub struct Unsent(Arc<Mutex<Option<http::request::Parts>>>);

impl Unsent {
    pub fn new(head: http::request::Parts) -> Self {
        Unsent(Arc::new(Mutex::new(Some(head))))
    }

    pub fn take(&self) -> Option<http::request::Parts> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Set on a request whose retry keeps no copy of it and counts on `Unsent`.
/// An HTTP/1 upstream's pool connects only once it holds the request, so the
/// forwarder copies the head itself for those.
#[derive(Clone, Copy, Debug)]
pub struct ReturnUnsent;

/// Set on a request whose body is too large to copy for a retry: its first
/// frame is not read ahead of the connection (as it is to spare an app the
/// head of a request whose body fails), so a request no connection took is
/// still unread, and can be sent whole to another endpoint.
#[derive(Clone, Copy, Debug)]
pub struct KeepUnread;

/// Marks a response to a request the client failed (its body was malformed or
/// stalled, its head refused before it was sent), or that this proxy could
/// not send for a fault of its own (no valid certificate): it says nothing
/// about the endpoint, good or bad, and a retry would meet the same.
#[derive(Clone, Copy, Debug)]
pub struct ClientFaulted;

/// Marks a response the proxy made up because the upstream could not be reached
/// or failed mid-request.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamFailure;

/// Whether a response says its endpoint is failing: this proxy could not reach it,
/// or the peer proxy in front of it could not reach its app.
pub fn endpoint_failed<B>(rsp: &Response<B>) -> bool {
    rsp.extensions().get::<UpstreamFailure>().is_some()
        || (matches!(
            rsp.status(),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ) && rsp.headers().contains_key(PROXY_ERROR_HEADER))
}

/// Marks a response the proxy made itself, with why in a word (the
/// `reason` of `http_proxy_errors_total`): what it answered in place of the
/// upstream, told apart from the upstream's own answers in the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyMade(pub &'static str);

/// A response generated by the proxy: the status, the reason in a header and
/// body, and `made` (a metric label) in its extensions.
pub fn error_response(made: &'static str, status: StatusCode, reason: &str) -> Response<BoxBody> {
    let mut rsp = Response::new(super::full(format!("{reason}\n")));
    rsp.extensions_mut().insert(ProxyMade(made));
    *rsp.status_mut() = status;
    // Reasons are our own text; anything not header-safe is replaced.
    let value =
        HeaderValue::from_str(reason).unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
    rsp.headers_mut().insert(PROXY_ERROR_HEADER, value);
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

/// Responses as the caller gets them: `redacted` where it is `unverified`.
pub fn redact_if(
    unverified: bool,
) -> impl Fn(Response<BoxBody>) -> Response<BoxBody> + Clone + Send + Sync + 'static {
    move |rsp| if unverified { redacted(rsp) } else { rsp }
}

/// A response the proxy made, as a caller it has not verified gets it: the
/// status alone, with its standard phrase for a body, and `proxy error`
/// (`(not processed)` where it was not) for the reason. Those name pod addresses, app ports and how
/// a port's policy is set (`connect to 10.42.1.17:8080 failed`, `port 8080
/// allows only listed identities`), which a client outside the mesh (a
/// NodePort's, an unmeshed ingress's, passing them on to the internet) has
/// no use for; meshed callers' proxies read them, and get them. As Linkerd,
/// which sends its error header to meshed peers only. An app's own
/// responses carry no such header here (forwarding removes any), so they
/// pass as they are.
fn redacted(mut rsp: Response<BoxBody>) -> Response<BoxBody> {
    let Some(reason) = rsp.headers_mut().remove(PROXY_ERROR_HEADER) else {
        return rsp;
    };
    // A calling proxy without an identity of its own (plaintext, to a
    // PERMISSIVE port) still reads that the answer is the proxy's, and
    // whether the request was processed: not where it failed.
    let said = |marker: &str| reason.as_bytes().ends_with(marker.as_bytes());
    rsp.headers_mut().insert(
        PROXY_ERROR_HEADER,
        HeaderValue::from_static(if said(NOT_PROCESSED) {
            "proxy error (not processed)"
        } else if said(NOT_SENT) {
            "proxy error (not sent)"
        } else {
            "proxy error"
        }),
    );
    rsp.headers_mut().remove("grpc-message");
    rsp.headers_mut().remove(http::header::CONTENT_LENGTH);
    // A HEAD's answer stays empty.
    if !http_body::Body::is_end_stream(rsp.body()) {
        let phrase = rsp.status().canonical_reason().unwrap_or("error");
        *rsp.body_mut() = super::full(format!("{phrase}\n"));
    }
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an unverified caller gets of the proxy's own answer: its status
    /// and phrase, not the addresses and policy in the reason; anything
    /// else passes untouched.
    #[tokio::test]
    async fn an_unverified_caller_gets_the_status_not_the_reason() {
        use http_body_util::BodyExt;
        let rsp = redacted(error_response(
            "connect",
            StatusCode::BAD_GATEWAY,
            "connect to 10.42.1.17:8080 failed: connection refused",
        ));
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(rsp.headers()[PROXY_ERROR_HEADER], "proxy error");
        assert_eq!(
            rsp.extensions().get::<ProxyMade>(),
            Some(&ProxyMade("connect"))
        );
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"Bad Gateway\n");
        // Whether it was processed is still said, for a calling proxy.
        let shed = redacted(error_response(
            "in_flight_limit",
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight (not processed)",
        ));
        assert_eq!(
            shed.headers()[PROXY_ERROR_HEADER],
            "proxy error (not processed)"
        );
        let app = Response::new(super::super::full("the app's own 502"));
        let app = redacted(app);
        let body = app.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"the app's own 502");
    }

    /// What the proxy refuses after picking an endpoint, the endpoint never
    /// saw: its balancer must learn nothing from it (a 400 read as a success
    /// would re-admit an ejected endpoint that answered no probe).
    #[test]
    fn a_request_refused_before_it_was_sent_says_nothing_of_the_endpoint() {
        for e in [
            ProxyError::BadRequest("invalid Host header"),
            ProxyError::Loop(SocketAddr::from(([127, 0, 0, 1], 4140))),
        ] {
            let rsp = e.into_response();
            assert_eq!(rsp.status(), StatusCode::BAD_REQUEST);
            assert!(rsp.extensions().get::<ClientFaulted>().is_some());
            assert!(!endpoint_failed(&rsp));
            assert!(!rsp.headers().contains_key(http::header::CONNECTION));
        }
        // Nor what this proxy could not send for want of a valid
        // certificate of its own: no peer would have taken it.
        let rsp =
            ProxyError::OwnCertificate("this proxy's certificate has expired").into_response();
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(rsp.extensions().get::<ClientFaulted>().is_some());
        assert!(rsp.extensions().get::<UpstreamFailure>().is_none());
    }
}
