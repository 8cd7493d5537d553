//! Authorization of inbound requests: the verified peer identity against the
//! target port's policy, except the kubelet's probes, which pass in plaintext.
//! Denied requests get 403; every decision is counted by peer identity. The app learns the verified identity from `strait-client-id`
//! (removed from anything a client sent, so it cannot be forged).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::policy::PolicyRx;
use crate::addr::DestAddr;
use crate::defaults::CLIENT_ID_HEADER;
use crate::http::error::{CloseClient, error_response};
use crate::http::request_body::BodyFault;
use crate::http::{BoxBody, Dst};
use crate::identity::Identity;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::{Authorized, PeerMetrics};
use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use http::{HeaderValue, Request, Response, StatusCode};

/// One connection's authorization: its peer is fixed, so the header the app
/// is given and the decision counters are made once, not per request.
#[derive(Clone, Debug)]
pub struct AuthorizeLayer {
    peer: Option<Identity>,
    peer_header: Option<HeaderValue>,
    policy: PolicyRx,
    metrics: Arc<Metrics>,
    /// The connection's client, named when a request is refused.
    client: Option<crate::addr::ClientAddr>,
    /// What a response stream needs to be revoked: one per connection, so
    /// that a request pays one reference count for it.
    grant: Arc<Grant>,
    /// This peer's counters, decisions among them.
    counted: Arc<PeerMetrics>,
    /// From when no request of this connection is taken: its certificate's
    /// end, and the time an honest peer takes to see the GOAWAY sent then.
    refuse_from: Option<tokio::time::Instant>,
    /// The connection holds a place kept for the kubelet's probes: it is
    /// served probes only, each answer closing it.
    probes_only: bool,
}

impl AuthorizeLayer {
    /// `counted`: the caller's series (`Metrics::inbound_peer`).
    pub fn new(
        peer: Option<Identity>,
        policy: PolicyRx,
        metrics: Arc<Metrics>,
        counted: Arc<PeerMetrics>,
    ) -> Self {
        AuthorizeLayer {
            peer_header: peer
                .as_ref()
                .and_then(|p| HeaderValue::from_str(p.as_str()).ok()),
            grant: Arc::new(Grant {
                policy: policy.clone(),
                peer: peer.clone(),
                metrics: metrics.clone(),
            }),
            counted,
            peer,
            policy,
            metrics,
            refuse_from: None,
            client: None,
            probes_only: false,
        }
    }

    /// The connection holds a place kept for the kubelet's probes, past the
    /// limits other clients of its address met: anything else on it would
    /// keep that place from the next probe (the kubelet opens a connection
    /// per probe), so it is refused, and a probe's answer closes it.
    pub fn probes_only(mut self, probes_only: bool) -> Self {
        self.probes_only = probes_only;
        self
    }

    /// The connection's client, for the log line of a refusal.
    pub fn for_client(mut self, client: crate::addr::ClientAddr) -> Self {
        self.client = Some(client);
        self
    }

    /// Refuses requests once the peer's certificate has ended (`until`),
    /// past `PEER_EXPIRY_GRACE`. HTTP/2's graceful GOAWAY names the streams
    /// it will still take only once the peer answers its PING: a peer that
    /// never does could otherwise go on opening streams for ever.
    pub fn expiring(mut self, until: Option<tokio::time::Instant>) -> Self {
        self.refuse_from = until.map(|u| u + crate::defaults::PEER_EXPIRY_GRACE);
        self
    }

    fn count(&self, decision: &Result<super::policy::Admitted, super::policy::Denied>) {
        match decision {
            Ok(super::policy::Admitted::Probe) => self.counted.probe_admitted(),
            d => self.counted.authorized(Authorized::Http, d.is_ok()),
        }
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    layer: AuthorizeLayer,
}

/// Counts a decision, in the caller's series (`Metrics::inbound_peer`).
pub fn count(metrics: &Metrics, peer: Option<&Identity>, what: Authorized, allowed: bool) {
    metrics.inbound_peer(peer).authorized(what, allowed);
}

impl<S, B> tower::Service<Request<B>> for Authorize<S>
where
    B: http_body::Body,
    S: tower::Service<Request<AdmittedBody<B>>, Response = Response<BoxBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    /// A refusal is ready at once; an allowed request is the inner future, not
    /// boxed again (one allocation less per inbound request).
    type Future = Either<Ready<Result<Response<BoxBody>, Infallible>>, Revocable<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let l = &self.layer;
        let port = match req.extensions().get::<Dst>() {
            Some(Dst(DestAddr::Socket(a))) => a.port(),
            _ => 0,
        };
        // For an upload, a receiver that has seen the policy this decision is
        // made under (marked first: a change after it is still noticed).
        let seen = (!req.body().is_end_stream()).then(|| {
            let mut rx = l.policy.clone();
            rx.mark_unchanged();
            rx
        });
        if l.refuse_from
            .is_some_and(|t| tokio::time::Instant::now() >= t)
        {
            self.layer.counted.authorized(Authorized::Http, false);
            strait_otel::sampled!(info, peer = ?l.peer, "request on a connection whose peer's certificate has ended; refused");
            let rsp = error_response(
                "unauthorized",
                StatusCode::FORBIDDEN,
                "peer certificate expired",
            );
            return Either::Left(ready(Ok(rsp)));
        }
        let decision = super::policy::check_request(&l.policy, port, l.peer.as_ref(), &req);
        // HTTP/1 is closed by its answer; an HTTP/2 connection (a gRPC
        // probe's) ends with its client.
        let close = l.probes_only && req.version() != http::Version::HTTP_2;
        if l.probes_only && !matches!(decision, Ok(super::policy::Admitted::Probe)) {
            l.metrics.reject_tcp(super::DIRECTION, "source_limit");
            let mut rsp = error_response(
                "connection_limit",
                StatusCode::SERVICE_UNAVAILABLE,
                "connection limit reached (not processed)",
            );
            if close {
                rsp.extensions_mut().insert(CloseClient);
            }
            return Either::Left(ready(Ok(rsp)));
        }
        l.count(&decision);
        if matches!(decision, Ok(super::policy::Admitted::Probe)) {
            crate::telemetry::trace::probe(&mut req);
        }
        let admitted = match decision {
            Ok(a) => a,
            Err(denied) => {
                // At info: the one trace of a refusal on this side, which
                // callers and their operators ask about. Sampled: a stranger
                // can cause as many as they like.
                let client = l.client.map(|c| c.0);
                let peer = l.peer.as_ref().map_or("unauthenticated", |p| p.as_str());
                strait_otel::sampled!(info, client = ?client, peer, port, %denied, "inbound request denied");
                let status = match denied {
                    super::policy::Denied::NoPolicyYet => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::FORBIDDEN,
                };
                let rsp = error_response("forbidden", status, &denied.to_string());
                return Either::Left(ready(Ok(rsp)));
            }
        };
        if admitted == super::policy::Admitted::Policy
            && crate::http::upgrade::is_upgrade_request(&req)
        {
            // A tunnel lives on after this decision: closed when a policy
            // change revokes it.
            let (policy, peer, metrics) = (l.policy.clone(), l.peer.clone(), l.metrics.clone());
            req.extensions_mut()
                .insert(crate::http::upgrade::Revocation(Arc::new(move || {
                    let (policy, peer, metrics) = (policy.clone(), peer.clone(), metrics.clone());
                    Box::pin(async move {
                        let denied = super::policy::revoked(policy, port, peer).await;
                        metrics.reject_tcp(super::DIRECTION, "unauthorized");
                        strait_otel::sampled!(info, %denied, "upgraded connection no longer authorized; closed");
                    })
                })));
        }
        let headers = req.headers_mut();
        remove_client_id(headers);
        if let Some(v) = &l.peer_header {
            headers.insert(CLIENT_ID_HEADER, v.clone());
        }
        // A probe is let in whatever the policy: nothing to revoke.
        let grant = (admitted == super::policy::Admitted::Policy).then(|| l.grant.clone());
        // Shared by both sides of the request, so a revocation is counted once.
        let fault = grant
            .as_ref()
            .filter(|_| seen.is_some())
            .and_then(|_| req.extensions().get::<BodyFault>().cloned());
        // An upload outlives the decision too: it goes on only while the
        // caller is still let in. A body already complete needs no watch.
        let watch = grant.as_ref().zip(seen).map(|(g, policy)| Watching {
            policy,
            grant: g.clone(),
            port,
            fault: fault.clone(),
            revoked: None,
            ended: false,
        });
        // Trailers reach the caller over HTTP/2 only (the caller's own
        // version, restored by now): hyper drops them on HTTP/1.1.
        let trailers = req.version() == http::Version::HTTP_2;
        let req = req.map(|inner| AdmittedBody { inner, watch });
        Either::Right(Revocable {
            inner: self.inner.call(req),
            grant: grant.map(|g| (g, port, fault)),
            trailers,
            close,
        })
    }
}

/// What a connection's requests are admitted under, kept for their bodies
/// and responses.
#[derive(Debug)]
struct Grant {
    policy: PolicyRx,
    peer: Option<Identity>,
    metrics: Arc<Metrics>,
}

impl Grant {
    /// Counts a revocation, once per request whichever side saw it first.
    fn count_revoked(&self, fault: Option<&BodyFault>, denied: &super::policy::Denied, what: &str) {
        if fault.is_none_or(BodyFault::revoke) {
            self.metrics.reject_http(super::DIRECTION, "unauthorized");
            strait_otel::sampled!(info, %denied, "{what} no longer authorized; ended");
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body bound to its request's admission: nothing of it goes on
    /// once a policy change refuses its caller, whether frames still come or
    /// the body waits. It then ends with an error, marked in the request's
    /// `BodyFault` so that `Forward` answers 403 if the app has not answered.
    pub struct AdmittedBody<B> {
        #[pin]
        inner: B,
        // None: a probe's, or complete already.
        watch: Option<Watching>,
    }
}

struct Watching {
    /// Its own receiver: a frame pays one atomic load while nothing changed.
    policy: PolicyRx,
    grant: Arc<Grant>,
    port: u16,
    fault: Option<BodyFault>,
    /// Made once the body first waits: a change must end a quiet upload too.
    revoked:
        Option<std::pin::Pin<Box<dyn std::future::Future<Output = super::policy::Denied> + Send>>>,
    ended: bool,
}

impl Watching {
    /// The policy in force, if it changed since last looked at, refuses.
    fn refused(&mut self) -> Option<super::policy::Denied> {
        if !self.policy.has_changed().unwrap_or(false) {
            return None;
        }
        self.policy.mark_unchanged();
        super::policy::check(&self.policy, self.port, self.grant.peer.as_ref()).err()
    }

    fn end(&mut self, denied: &super::policy::Denied) -> crate::http::BoxError {
        self.ended = true;
        self.revoked = None;
        self.grant
            .count_revoked(self.fault.as_ref(), denied, "request body");
        "no longer authorized by the inbound policy".into()
    }
}

impl<B> http_body::Body for AdmittedBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<crate::http::BoxError>,
{
    type Data = Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let Some(w) = this.watch.as_mut() else {
            return this.inner.poll_frame(cx).map(clean).map_err(Into::into);
        };
        if w.ended {
            // Nothing after the end, were it asked again.
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            // Every frame, the body's end too: an upload finished by a
            // caller no longer let in is not complete at the app.
            Poll::Ready(f) => {
                if let Some(denied) = w.refused() {
                    return Poll::Ready(Some(Err(w.end(&denied))));
                }
                Poll::Ready(clean(f).map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let revoked = w.revoked.get_or_insert_with(|| {
                    Box::pin(super::policy::revoked(
                        w.policy.clone(),
                        w.port,
                        w.grant.peer.clone(),
                    ))
                });
                let Poll::Ready(denied) = revoked.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                Poll::Ready(Some(Err(w.end(&denied))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.watch.as_ref().is_some_and(|w| w.ended) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.watch.as_ref().is_some_and(|w| w.ended) {
            return http_body::SizeHint::with_exact(0);
        }
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// An allowed request's response: one whose body has no known end (a gRPC
    /// stream, server-sent events, a long download) outlives the decision
    /// that admitted it, so it is ended when a policy change revokes it, as
    /// opaque streams and upgraded connections are. A body of known length
    /// is left as it is: no cost on the common response.
    pub struct Revocable<F> {
        #[pin]
        inner: F,
        grant: Option<(Arc<Grant>, u16, Option<BodyFault>)>,
        // Whether the caller can be sent trailers.
        trailers: bool,
        // Whether the connection closes after this answer.
        close: bool,
    }
}

impl<F> std::future::Future for Revocable<F>
where
    F: std::future::Future<Output = Result<Response<BoxBody>, Infallible>>,
{
    type Output = Result<Response<BoxBody>, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        use http_body::Body as _;
        let this = self.project();
        let Ok(mut rsp) = std::task::ready!(this.inner.poll(cx));
        // Said in the response head (`Connection: close`) as it is written.
        if *this.close {
            rsp.extensions_mut().insert(CloseClient);
        }
        let open_ended = !rsp.body().is_end_stream() && rsp.body().size_hint().exact().is_none();
        let Some((g, port, fault)) = this.grant.take().filter(|_| open_ended) else {
            return Poll::Ready(Ok(rsp));
        };
        let revoked = Box::pin(async move {
            let denied = super::policy::revoked(g.policy.clone(), port, g.peer.clone()).await;
            g.count_revoked(fault.as_ref(), &denied, "response stream");
        });
        // A gRPC call that has its status already (in the head) is not sent
        // a second one.
        let grpc = (*this.trailers
            && crate::http::grpc::is_grpc(rsp.headers())
            && !rsp.headers().contains_key("grpc-status"))
        .then(Default::default);
        Poll::Ready(Ok(rsp.map(|body| {
            BoxBody::new(RevocableBody {
                inner: body,
                revoked: Some(revoked),
                grpc,
            })
        })))
    }
}

/// A response body ended, with an error (the stream reset, the connection
/// closed), once its request's admission is revoked. A gRPC call over
/// HTTP/2 between messages ends instead with its status, PERMISSION_DENIED,
/// as its client would have been answered at the start.
struct RevocableBody {
    inner: BoxBody,
    revoked: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    grpc: Option<crate::http::grpc::Messages>,
}

/// The trailers a revoked gRPC call ends with.
fn permission_denied() -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("7"));
    t.insert(
        "grpc-message",
        HeaderValue::from_static("no longer authorized by the inbound policy"),
    );
    t
}

impl http_body::Body for RevocableBody {
    type Data = bytes::Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let Some(r) = self.revoked.as_mut() else {
            // Ended: nothing more of it reaches the caller.
            return Poll::Ready(None);
        };
        if r.as_mut().poll(cx).is_ready() {
            self.revoked = None;
            if self.grpc.as_ref().is_some_and(|m| m.between()) {
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(permission_denied()))));
            }
            return Poll::Ready(Some(Err(
                "no longer authorized by the inbound policy".into()
            )));
        }
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        if let (Some(m), Some(Ok(f))) = (self.grpc.as_mut(), &frame)
            && let Some(data) = f.data_ref()
        {
            m.advance(data);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.revoked.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.revoked.is_none() {
            return http_body::SizeHint::with_exact(0);
        }
        self.inner.size_hint()
    }
}

/// Trailers claim no identity either: HTTP/1 carries those a request's
/// `Trailer` field names, HTTP/2 any, and some servers merge them into the
/// request's fields.
fn clean<E>(
    f: Option<Result<http_body::Frame<Bytes>, E>>,
) -> Option<Result<http_body::Frame<Bytes>, E>> {
    f.map(|r| {
        r.map(|mut frame| {
            if let Some(t) = frame.trailers_mut() {
                remove_client_id(t);
            }
            frame
        })
    })
}

/// Removes every spelling of `strait-client-id` a client may have sent, including
/// `strait_client_id`, which CGI-style servers (Rack, WSGI, PHP) read as the same
/// variable as the real header.
fn remove_client_id(headers: &mut http::HeaderMap) {
    let id = CLIENT_ID_HEADER;
    let id = id.as_str();
    let lookalikes: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.len() == id.len()
                && k.bytes()
                    .zip(id.bytes())
                    .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
        })
        .cloned()
        .collect();
    for k in lookalikes {
        // All its values: a client may repeat the header.
        headers.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::policy::{Allow, InboundPolicy, Mode, PortPolicy, Probe};
    use http_body_util::BodyExt as _;
    use std::time::Duration;
    use tower::{Layer as _, Service as _};

    /// The layer a connection from `peer` gets, with metrics of its own.
    fn layer_for(peer: Option<Identity>, policy: PolicyRx) -> AuthorizeLayer {
        let metrics = Metrics::new();
        let counted = metrics.inbound_peer(peer.as_ref());
        AuthorizeLayer::new(peer, policy, metrics, counted)
    }

    /// STRICT, allowing `who` only (and `probes`).
    fn strict_for(who: &str, probes: Vec<Probe>) -> Option<Arc<InboundPolicy>> {
        Some(Arc::new(InboundPolicy {
            ports: Default::default(),
            default: PortPolicy {
                mode: Mode::Strict,
                allow: vec![Allow::Identity(who.parse().unwrap())],
                trust_domain: Some("td".into()),
            },
            probes,
        }))
    }

    type Empty = http_body_util::Empty<Bytes>;

    /// An app answering one request with a response of no known length
    /// (of the given content type), whose frames the test sends.
    fn streaming_app(
        content_type: Option<&'static str>,
    ) -> (
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        impl tower::Service<
            Request<AdmittedBody<Empty>>,
            Response = Response<BoxBody>,
            Error = Infallible,
            Future: Send + 'static,
        >,
    ) {
        use futures_util::StreamExt as _;
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let frames = std::sync::Mutex::new(Some(frames));
        let app = tower::service_fn(move |_: Request<AdmittedBody<Empty>>| {
            let frames = frames.lock().unwrap().take().unwrap();
            let body = http_body_util::StreamBody::new(
                tokio_stream::wrappers::UnboundedReceiverStream::new(frames)
                    .map(|b| Ok::<_, crate::http::BoxError>(http_body::Frame::data(b))),
            );
            let mut rsp = Response::new(BoxBody::new(body));
            if let Some(ct) = content_type {
                rsp.headers_mut()
                    .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
            }
            std::future::ready(Ok::<_, Infallible>(rsp))
        });
        (tx, app)
    }

    /// Trailers claim no identity: HTTP/1 forwards those the request's
    /// `Trailer` field names, and some servers merge them into its fields.
    #[tokio::test]
    async fn a_client_id_in_trailers_never_reaches_the_app() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert(CLIENT_ID_HEADER, HeaderValue::from_static("spiffe://td/x"));
        trailers.insert(
            "strait_client_id",
            HeaderValue::from_static("spiffe://td/x"),
        );
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = vec![
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"body"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let body = AdmittedBody { inner, watch: None };
        let got = body.collect().await.unwrap();
        let t = got.trailers().cloned().expect("trailers");
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(got.to_bytes(), "body");
    }

    /// No request is taken on a connection once its peer's certificate has
    /// ended (and the grace for the GOAWAY to reach it): one that goes on
    /// opening streams is refused.
    #[tokio::test(start_paused = true)]
    async fn no_request_is_taken_past_the_peers_certificate() {
        let who = "spiffe://td/ns/a/sa/web";
        let (_policy, rx) = tokio::sync::watch::channel(strict_for(who, vec![]));
        let app = tower::service_fn(|_: Request<AdmittedBody<Empty>>| {
            std::future::ready(Ok::<_, Infallible>(Response::new(BoxBody::default())))
        });
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut svc = layer_for(Some(who.parse().unwrap()), rx)
            .expiring(Some(until))
            .layer(app);
        let request = || {
            let mut r = Request::get("/").body(Empty::new()).unwrap();
            r.extensions_mut().insert(crate::http::Dst(DestAddr::Socket(
                "127.0.0.1:8080".parse().unwrap(),
            )));
            r
        };
        assert_eq!(svc.call(request()).await.unwrap().status(), StatusCode::OK);
        // Within the grace: a stream that raced the GOAWAY.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(svc.call(request()).await.unwrap().status(), StatusCode::OK);
        tokio::time::advance(crate::defaults::PEER_EXPIRY_GRACE).await;
        let rsp = svc.call(request()).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            rsp.headers()["strait-proxy-error"],
            "peer certificate expired"
        );
    }

    /// A streaming response is ended when a change of policy refuses its
    /// caller; a kubelet probe's, let in whatever the policy, is not.
    #[tokio::test]
    async fn a_response_stream_is_revoked_with_its_caller_and_a_probe_s_is_not() {
        let allowing = |who: &str| {
            strict_for(
                who,
                vec![Probe {
                    port: 8080,
                    grpc: false,
                    target: "/events".into(),
                }],
            )
        };
        let (policy, rx) = tokio::sync::watch::channel(allowing("spiffe://td/ns/a/sa/web"));
        let open = |peer: Option<&str>| {
            let (tx, app) = streaming_app(None);
            let peer = peer.map(|p| p.parse().unwrap());
            let svc = layer_for(peer, rx.clone()).layer(app);
            (tx, svc)
        };
        let request = || {
            let mut r = Request::get("/events")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            r.extensions_mut().insert(crate::http::Dst(DestAddr::Socket(
                "127.0.0.1:8080".parse().unwrap(),
            )));
            r
        };
        let (caller_tx, mut caller) = open(Some("spiffe://td/ns/a/sa/web"));
        let (probe_tx, mut probe) = open(None);
        let mut from_caller = caller.call(request()).await.unwrap().into_body();
        let mut from_probe = probe.call(request()).await.unwrap().into_body();
        caller_tx.send(Bytes::from_static(b"one")).unwrap();
        probe_tx.send(Bytes::from_static(b"one")).unwrap();
        assert!(from_caller.frame().await.unwrap().is_ok());
        assert!(from_probe.frame().await.unwrap().is_ok());

        // The caller is no longer allowed: its stream ends; the probe's goes on.
        policy.send_replace(allowing("spiffe://td/ns/a/sa/other"));
        assert!(
            from_caller.frame().await.unwrap().is_err(),
            "still streaming"
        );
        probe_tx.send(Bytes::from_static(b"two")).unwrap();
        let frame = from_probe.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "two");
    }

    /// A connection in a place kept for the kubelet's probes is served its
    /// probe and closed; anything else on it is refused, so that an ordinary
    /// client of the node's address (forwarded traffic) gives the place back
    /// at once rather than keep it from the next probe.
    #[tokio::test]
    async fn a_connection_in_a_probe_s_place_is_served_a_probe_and_closed() {
        // The default policy (plaintext allowed), so only the place decides.
        let policy = Some(Arc::new(InboundPolicy {
            ports: Default::default(),
            default: PortPolicy {
                mode: Mode::Permissive,
                allow: Vec::new(),
                trust_domain: Some("td".into()),
            },
            probes: vec![Probe {
                port: 8080,
                grpc: false,
                target: "/healthz".into(),
            }],
        }));
        let (_tx, rx) = tokio::sync::watch::channel(policy);
        let app = tower::service_fn(|_: Request<AdmittedBody<Empty>>| {
            std::future::ready(Ok::<_, Infallible>(Response::new(crate::http::full("ok"))))
        });
        let mut svc = layer_for(None, rx.clone()).probes_only(true).layer(app);
        let request = |path: &str| {
            let mut r = Request::get(path)
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            r.extensions_mut().insert(crate::http::Dst(DestAddr::Socket(
                "127.0.0.1:8080".parse().unwrap(),
            )));
            r
        };
        let probe = svc.call(request("/healthz")).await.unwrap();
        assert_eq!(probe.status(), StatusCode::OK);
        assert!(probe.extensions().get::<CloseClient>().is_some());
        let other = svc.call(request("/orders")).await.unwrap();
        assert_eq!(other.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(other.extensions().get::<CloseClient>().is_some());
        assert_eq!(
            other.headers()["strait-proxy-error"],
            "connection limit reached (not processed)"
        );
        // In an ordinary place, the same request is the app's.
        let mut svc =
            layer_for(None, rx).layer(tower::service_fn(|_: Request<AdmittedBody<Empty>>| {
                std::future::ready(Ok::<_, Infallible>(Response::new(crate::http::full("ok"))))
            }));
        let rsp = svc.call(request("/orders")).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        assert!(rsp.extensions().get::<CloseClient>().is_none());
    }

    /// Through the layer: a gRPC caller over HTTP/2 is told PERMISSION_DENIED;
    /// one over HTTP/1.1, to whom hyper would not send trailers, is cut off
    /// as before rather than shown a stream that ended cleanly.
    #[tokio::test]
    async fn a_grpc_status_is_sent_only_where_trailers_can_go() {
        let allowing = |who: &str| strict_for(who, vec![]);
        let (policy, rx) = tokio::sync::watch::channel(allowing("spiffe://td/ns/a/sa/web"));
        let call = |version: http::Version| {
            let (tx, app) = streaming_app(Some("application/grpc"));
            let peer = Some("spiffe://td/ns/a/sa/web".parse().unwrap());
            let mut svc = layer_for(peer, rx.clone()).layer(app);
            let mut req = Request::post("/pkg.Svc/Watch")
                .version(version)
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            req.extensions_mut()
                .insert(crate::http::Dst(DestAddr::Socket(
                    "127.0.0.1:8080".parse().unwrap(),
                )));
            async move { (tx, svc.call(req).await.unwrap().into_body()) }
        };
        let (h2_tx, mut h2) = call(http::Version::HTTP_2).await;
        let (h1_tx, mut h1) = call(http::Version::HTTP_11).await;
        for (tx, body) in [(&h2_tx, &mut h2), (&h1_tx, &mut h1)] {
            tx.send(Bytes::from_static(b"\0\0\0\0\x01x")).unwrap();
            assert!(body.frame().await.unwrap().is_ok());
        }
        policy.send_replace(allowing("spiffe://td/ns/a/sa/other"));
        let end = h2.frame().await.unwrap().unwrap();
        assert_eq!(end.into_trailers().unwrap()["grpc-status"], "7");
        assert!(h1.frame().await.unwrap().is_err(), "HTTP/1.1: reset");
    }

    /// A revoked gRPC call between messages ends with PERMISSION_DENIED in
    /// its trailers; one cut mid-message can only be reset.
    #[tokio::test]
    async fn a_revoked_grpc_stream_ends_with_permission_denied_between_messages() {
        async fn revoked_after(sent: &[&'static [u8]]) -> Result<http_body::Frame<Bytes>, ()> {
            use futures_util::StreamExt as _;
            let (tx, frames) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
            let (revoke, revoked) = tokio::sync::oneshot::channel::<()>();
            let inner = http_body_util::StreamBody::new(
                tokio_stream::wrappers::UnboundedReceiverStream::new(frames)
                    .map(|b| Ok::<_, crate::http::BoxError>(http_body::Frame::data(b))),
            );
            let mut body = RevocableBody {
                inner: BoxBody::new(inner),
                revoked: Some(Box::pin(async move {
                    let _ = revoked.await;
                })),
                grpc: Some(Default::default()),
            };
            for s in sent {
                tx.send(Bytes::from_static(s)).unwrap();
                assert!(body.frame().await.unwrap().is_ok());
            }
            revoke.send(()).unwrap();
            let last = body.frame().await.unwrap().map_err(drop);
            assert!(body.frame().await.is_none(), "nothing after the end");
            last
        }
        // Two whole messages, the first split across frames.
        let end = revoked_after(&[b"\0\0\0", b"\0\x03abc\0\0\0\0\0"])
            .await
            .expect("trailers");
        let trailers = end.into_trailers().expect("trailers, not data");
        assert_eq!(trailers["grpc-status"], "7");
        // Cut inside a message's length prefix, then inside a message.
        assert!(revoked_after(&[b"\0\0"]).await.is_err());
        assert!(revoked_after(&[b"\0\0\0\0\x05ab"]).await.is_err());
    }

    /// An upload through the layer, admitted as `web` under `rx`: its frames'
    /// sender, and the request as the app gets it.
    async fn upload(
        rx: PolicyRx,
    ) -> (
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        http::request::Parts,
        AdmittedBody<crate::http::request_body::RequestBody<BoxBody>>,
    ) {
        use crate::http::request_body::RequestBody;
        use futures_util::StreamExt as _;
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let upload = BoxBody::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(frames)
                .map(|b| Ok::<_, crate::http::BoxError>(http_body::Frame::data(b))),
        ));
        let mut req = Request::post("/upload").body(upload).unwrap();
        req.extensions_mut()
            .insert(crate::http::Dst(DestAddr::Socket(
                "127.0.0.1:8080".parse().unwrap(),
            )));
        let req = RequestBody::wrap(req, None);
        // The app keeps the request, to read its body as it comes.
        let (to_app, at_app) = tokio::sync::oneshot::channel();
        let to_app = std::sync::Mutex::new(Some(to_app));
        let app = tower::service_fn(move |req| {
            let _ = to_app.lock().unwrap().take().unwrap().send(req);
            ready(Ok::<_, Infallible>(Response::new(crate::http::empty())))
        });
        let peer = Some("spiffe://td/ns/a/sa/web".parse().unwrap());
        let mut svc = layer_for(peer, rx).layer(app);
        let rsp = svc.call(req).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        let (head, body) = at_app.await.unwrap().into_parts();
        (tx, head, body)
    }

    /// An upload admitted before a change of policy refuses its caller goes
    /// no further, whether more of it comes, it ends, or it goes quiet; the
    /// request is marked so that its caller is answered 403.
    #[tokio::test]
    async fn an_upload_stops_when_its_caller_is_no_longer_allowed() {
        let allowing = |who: &str| strict_for(who, vec![]);
        let (policy, rx) = tokio::sync::watch::channel(allowing("spiffe://td/ns/a/sa/web"));
        for then in ["more", "the end", "nothing"] {
            policy.send_replace(allowing("spiffe://td/ns/a/sa/web"));
            let (tx, head, mut body) = upload(rx.clone()).await;
            tx.send(Bytes::from_static(b"one")).unwrap();
            let first = body.frame().await.unwrap().unwrap();
            assert_eq!(first.into_data().unwrap(), "one");

            policy.send_replace(allowing("spiffe://td/ns/a/sa/other"));
            match then {
                "more" => tx.send(Bytes::from_static(b"two")).unwrap(),
                "the end" => drop(tx),
                _ => std::mem::forget(tx),
            }
            let refused = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
                .await
                .unwrap_or_else(|_| panic!("{then}: still waiting"));
            assert!(
                refused.as_ref().is_some_and(Result::is_err),
                "{then}: went on as {refused:?}"
            );
            assert!(body.frame().await.is_none(), "{then}: more after the end");
            let fault = head.extensions.get::<BodyFault>().unwrap().fault().unwrap();
            assert_eq!(fault.into_response().status(), StatusCode::FORBIDDEN);
        }
    }

    #[test]
    fn every_spelling_of_the_client_id_header_is_removed() {
        let mut h = http::HeaderMap::new();
        h.insert(CLIENT_ID_HEADER, HeaderValue::from_static("forged"));
        h.insert("strait_client_id", HeaderValue::from_static("forged"));
        h.insert("strait-client_id", HeaderValue::from_static("forged"));
        h.insert("strait-client-ids", HeaderValue::from_static("kept"));
        remove_client_id(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("strait-client-ids"));
    }
}
