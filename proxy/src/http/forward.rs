//! The last service of every HTTP stack: sends the request to the address chosen by
//! the destination layer, over a pooled connection of the request's HTTP version,
//! streaming bodies both ways.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, Method, Request, Response, Uri, Version, header};
use tracing::debug;

use super::client::{ClientCache, ClientError, ConnectError, PoolPerCaller};
use super::conn_guard::ConnState;
use super::error::{KeepUnread, ProxyError, ReturnUnsent, Unsent};
use super::request_body::BodyFault;
use super::{
    BoxBody, ConnectBy, ConnectTimeout, Dst, ToPeer, first_frame, head_of, head_without_extensions,
    upgrade,
};
use crate::addr::{DestAddr, OwnAddrs};
use crate::defaults::{
    FIRST_BODY_FRAME_WAIT, ORIG_PROTO_HEADER, PROXY_ERROR_HEADER, TARGET_PORT_HEADER,
};
use crate::tcp::TcpConfig;
use crate::telemetry::{Direction, Metrics};
use crate::transport::Drain;

/// Set on the HTTP/1 requests hyper could upgrade (an `Upgrade` header, or
/// CONNECT): the connection, told when the request does upgrade it.
#[derive(Clone, Debug)]
pub struct UpgradeConn(pub Arc<ConnState>);

/// What forwarding needs: the upstream clients, the proxy's own addresses (never a
/// destination), and how upgraded streams are carried. Shared: the stacks above
/// clone it several times per request (retry, balancer, this call), and one
/// reference count is cheaper than the dozen its parts hold.
#[derive(Clone, Debug)]
pub struct Forward(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    clients: ClientCache,
    own: OwnAddrs,
    tcp: TcpConfig,
    metrics: Arc<Metrics>,
    drain: Drain,
    direction: Direction,
}

impl Forward {
    pub fn new(
        clients: ClientCache,
        own: OwnAddrs,
        tcp: TcpConfig,
        metrics: Arc<Metrics>,
        drain: Drain,
        direction: Direction,
    ) -> Self {
        Forward(Arc::new(Shared {
            clients,
            own,
            tcp,
            metrics,
            drain,
            direction,
        }))
    }

    async fn forward<B>(self, mut req: Request<B>) -> Result<Response<BoxBody>, Failed>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<super::BoxError>,
    {
        let Some(Dst(dst)) = req.extensions_mut().remove::<Dst>() else {
            return Err(ProxyError::BadRequest("no destination for request").into());
        };
        // Taken off the request, not read: a request handed back unsent may be
        // sent next to an endpoint with neither.
        let connect_timeout = req.extensions_mut().remove::<ConnectTimeout>().map(|t| t.0);
        let connect_by = req.extensions_mut().remove::<ConnectBy>();
        let to_peer = req.extensions_mut().remove::<ToPeer>();
        let caller = req.extensions_mut().remove::<PoolPerCaller>();
        let is_connect = req.method() == Method::CONNECT;
        let is_upgrade = upgrade::is_upgrade_request(&req);
        let grpc = super::grpc::is_call(&req);
        // A retry counts on getting the request back if it cannot be sent
        // (upgrades and CONNECT are never retried).
        let hand_back =
            req.extensions().get::<ReturnUnsent>().is_some() && !is_connect && !is_upgrade;
        let timeout = connect_timeout.unwrap_or(self.0.tcp.connect_timeout);
        let addr = match self.0.tcp.names.resolve(&dst, timeout).await {
            Ok(addr) => addr,
            Err(e) => return Err(Failed::unsent(e, req, hand_back)),
        };
        // A name resolved to one of our listeners (`Host: localhost:4140`) would
        // come straight back. A peer proxy's inbound is exempt: a pod calling its
        // own Service goes through its own inbound.
        if to_peer.is_none() && self.0.own.contains(addr) {
            return Err(ProxyError::Loop(addr).into());
        }
        let version = req.version();
        // Between proxies, every request rides one multiplexed HTTP/2 connection per
        // peer (upgrades excepted: they need HTTP/1.1 end to end).
        let h2 = match &to_peer {
            Some(_) => !is_upgrade,
            None => version == Version::HTTP_2,
        };
        // A bad Host is refused before any client or connection is had for it.
        let app_authority = if is_connect {
            None
        } else {
            app_authority(&req)?
        };
        // An app's HTTP/1 request in absolute form (`GET http://host/x`),
        // passed through: it was sent to an HTTP forward proxy, which needs
        // that form (RFC 9112 §3.2.2) and gets it. (Between proxies the form
        // is not carried: a forward proxy in the mesh gets origin form.)
        let forward_proxy = self.0.direction == Direction::Outbound
            && to_peer.is_none()
            && !h2
            && !is_connect
            && !is_upgrade
            && req.uri().scheme().is_some()
            && req.uri().authority().is_some_and(|a| !names(&dst, a));
        let upstream = self.0.clients.get(
            addr,
            h2,
            to_peer.as_ref().map(|p| &p.identity),
            connect_timeout,
            caller,
            forward_proxy,
        );
        // An HTTP/1 pool connects only once it has the request: keep its head.
        let head = (hand_back && !h2).then(|| head_of(&req));
        // To a peer proxy, which may answer that its app took none of it
        // (`NOT_SENT`, `NOT_PROCESSED`): the head of a request without a
        // body, which needs no copy to go again (its extensions are moved in
        // as it is sent, not copied).
        let bodiless = req.body().is_end_stream();
        let mut peer_head = (hand_back && h2 && to_peer.is_some() && bodiless)
            .then(|| head_without_extensions(&req));
        // Over HTTP/2, connected before the request is changed or given up: a
        // request that cannot be sent goes back whole.
        let ready = match connect_by {
            Some(by) => match tokio::time::timeout_at(by.at, upstream.client.ready()).await {
                Ok(r) => r,
                Err(_) => {
                    let waited = ProxyError::ConnectWait {
                        addr,
                        after: by.after,
                    };
                    return Err(Failed::unsent(waited, req, hand_back));
                }
            },
            None => upstream.client.ready().await,
        };
        let ready = match ready {
            Ok(ready) => ready,
            Err(e) => return Err(Failed::unsent(client_error(e, addr), req, hand_back)),
        };
        let client_upgrade = is_upgrade.then(|| hyper::upgrade::on(&mut req));
        let revocation = is_upgrade
            .then(|| req.extensions_mut().remove::<upgrade::Revocation>())
            .flatten();
        let mut target = (!is_connect)
            .then(|| upstream_target(&req, app_authority, addr, upstream.authority.as_ref(), h2))
            .transpose()?;
        // To a forward proxy the target names the origin, not the proxy
        // (host and port: never userinfo).
        if forward_proxy
            && let Some(t) = target.as_mut()
            && let Some(origin) = req
                .uri()
                .authority()
                .and_then(|a| Authority::try_from(super::host_port(a)).ok())
        {
            t.authority = origin;
            if let Some(scheme) = req.uri().scheme() {
                t.scheme = scheme.clone();
            }
        }
        // Recorded to be undone should HTTP/2 still hand the request back (its
        // connection closed first, and no other could be had).
        let edits = edit_for_upstream(&mut req, to_peer.as_ref(), h2, target, hand_back && h2);
        // CONNECT over HTTP/2 goes to a peer as HTTP/1.1's (tunnels take
        // HTTP/1.1 between proxies), which names its authority in Host; and
        // HTTP/1.0's (Python's before 3.12, `openssl s_client -proxy`) as
        // HTTP/1.1's too, which hyper's client refused to send, failing it
        // as the upstream's fault. The client is answered in its version.
        if is_connect && !h2 && version != Version::HTTP_11 {
            *req.version_mut() = Version::HTTP_11;
            if let Some(host) = req.uri().authority().map(|a| a.as_str().to_owned())
                && !req.headers().contains_key(header::HOST)
                && let Ok(v) = HeaderValue::from_str(&host)
            {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        let conn = req.extensions_mut().remove::<UpgradeConn>();
        let keep_unread = req.extensions().get::<KeepUnread>().is_some();
        let body_fault = req.extensions().get::<BodyFault>().cloned();
        let mut req = req.map(super::boxed);
        // Not when a retry counts on getting the body back unread should no
        // connection take the request (an HTTP/1 pool connects as it sends).
        if !h2 && !is_upgrade && !is_connect && !hand_back && !keep_unread {
            req = first_frame::with_first_frame(req, FIRST_BODY_FRAME_WAIT).await;
            // A body that failed while waited for is the client's fault, and
            // the app is spared the head of a request that cannot finish.
            if let Some(fault) = body_fault.as_ref().and_then(|f| f.fault()) {
                return Err(fault.into());
            }
        }
        if !h2 && !is_upgrade && !is_connect {
            chunk_a_get_s_body(&mut req);
            // HTTP/1.0 closes after each response unless asked not to: the
            // connection to the upstream is this proxy's to keep. (A request
            // that comes back unsent comes back as the head kept before
            // these changes.)
            if version == Version::HTTP_10 {
                req.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
            }
        }
        if let Some(h) = peer_head.as_mut() {
            h.extensions = std::mem::take(req.extensions_mut());
        }
        let sent = ready.send(req).await;
        // A call the upstream reset before answering is answered as its
        // gRPC client would read the reset, not as the proxy's failure.
        if grpc
            && let Err(e) = &sent
            && body_fault.as_ref().and_then(|f| f.fault()).is_none()
            && let Some(answer) = super::grpc::upstream_reset(&e.error)
                .and_then(|reason| super::grpc::reset_answer(reason, addr))
        {
            return Ok(answer);
        }
        let mut rsp = sent.map_err(|e| {
            // The client's body failed: its fault, whatever the upstream
            // client made of it (over HTTP/2, a reset stream).
            if let Some(fault) = body_fault.and_then(|f| f.fault()) {
                return Failed::from(fault);
            }
            let error = client_error(e.error, addr);
            let unsent = match (e.unsent, edits) {
                (Some(req), Some(edits)) => {
                    let (mut head, _) = req.into_parts();
                    edits.undo(&mut head);
                    // Moved into the peer's copy as it was sent.
                    if let Some(kept) = peer_head.take() {
                        head.extensions = kept.extensions;
                    }
                    Some(head)
                }
                _ => head,
            };
            Failed {
                unsent: unsent.filter(|_| error.not_sent()),
                error,
            }
        })?;
        // On the inbound side, where what is spliced reaches the app
        // unauthorized: a client going out through an egress proxy that
        // frames its answer (which clients are told to ignore) is not
        // refused.
        if is_connect && self.0.direction == Direction::Inbound && upgrade::not_a_tunnel(&rsp) {
            // Nothing is spliced, and the caller's connection stays HTTP,
            // read by this proxy.
            return Err(ProxyError::Upstream {
                addr,
                reason: "answered CONNECT as a request (a 2xx other than 200, or with a body's framing): not a tunnel".into(),
            }
            .into());
        }
        // An HTTP/1 head over the limit a request's has could not cross the
        // HTTP/2 hop between proxies: refused there, it would read as a
        // broken connection (and past about 112 KB fail every stream on
        // it). hyper's read buffer bounds it only roughly.
        if !h2 && head_bytes(rsp.headers()) > crate::defaults::MAX_HEADER_BYTES {
            return Err(ProxyError::Upstream {
                addr,
                reason: "sent a response head over 64 KiB or 100 fields".into(),
            }
            .into());
        }
        *rsp.version_mut() = version;
        // Only a peer proxy speaks for the mesh: an app's or an outside
        // server's own field would pass for one of ours, counting against its
        // endpoint as unreachable and reaching the client as the proxy's word.
        if to_peer.is_none() {
            rsp.headers_mut().remove(PROXY_ERROR_HEADER);
        } else if let Some(said) = peer_says_unsent(&rsp) {
            // The peer's app refused it unprocessed: as if refused here (and
            // passed over). Or the peer could not reach its app: sent
            // elsewhere if it had no body (one with a body has gone to the
            // peer, and is retried only by a route's codes, from its copy),
            // counted against the endpoint either way.
            let unprocessed = said == super::error::NOT_PROCESSED;
            if unprocessed {
                rsp.extensions_mut().insert(super::error::NotProcessed);
            }
            if let Some(head) = peer_head.take() {
                rsp.extensions_mut().insert(super::error::RequestNotSent);
                rsp.extensions_mut().insert(Unsent::new(head));
            } else if unprocessed || bodiless {
                // A route that retries keeps its own copy.
                rsp.extensions_mut().insert(super::error::RequestNotSent);
            }
        }
        if let Some(client_upgrade) = client_upgrade
            && upgrade::accepted(is_connect, &rsp)
        {
            let tunnel = conn.as_ref().map(|UpgradeConn(conn)| {
                conn.mark_upgraded();
                conn.tunnel()
            });
            let upstream_upgrade = hyper::upgrade::on(&mut rsp);
            let (tcp, metrics, direction) =
                (self.0.tcp.clone(), self.0.metrics.clone(), self.0.direction);
            let hold = upgrade::TunnelHold::default();
            rsp.extensions_mut().insert(hold.clone());
            self.0.drain.spawn(async move {
                // The client's connection counts as open until the splice ends,
                // and so does what the layers above keep in the hold.
                let _tunnel = tunnel;
                let _hold = hold;
                let splice = upgrade::splice(
                    client_upgrade,
                    upstream_upgrade,
                    addr,
                    &tcp,
                    &metrics,
                    direction,
                );
                match revocation {
                    Some(revoked) => {
                        tokio::select! {
                            () = splice => {}
                            () = (revoked.0)() => {}
                        }
                    }
                    None => splice.await,
                }
            });
        }
        let rsp = rsp.map(super::boxed);
        Ok(if grpc {
            super::grpc::rescued(rsp, addr, upstream_failure)
        } else {
            rsp
        })
    }
}

/// Why a request was not forwarded, and its head when it never left: the error
/// response carries it back (`Unsent`) for a retry.
struct Failed {
    error: ProxyError,
    unsent: Option<http::request::Parts>,
}

impl From<ProxyError> for Failed {
    fn from(error: ProxyError) -> Self {
        Failed {
            error,
            unsent: None,
        }
    }
}

impl Failed {
    fn unsent<B>(error: ProxyError, req: Request<B>, hand_back: bool) -> Self {
        Failed {
            unsent: (hand_back && error.not_sent()).then(|| req.into_parts().0),
            error,
        }
    }

    fn into_response(self) -> Response<BoxBody> {
        debug!(error = ?self.error, "request failed in the proxy");
        let mut rsp = self.error.into_response();
        if let Some(head) = self.unsent {
            rsp.extensions_mut().insert(Unsent::new(head));
        }
        rsp
    }
}

/// Changes a request for its upstream: what a peer proxy needs to restore it
/// for its app (the target port; the original HTTP version when it rides
/// HTTP/2), and the request target. With `record`, returns what to undo.
fn edit_for_upstream<B>(
    req: &mut Request<B>,
    to_peer: Option<&ToPeer>,
    h2: bool,
    target: Option<UpstreamTarget>,
    record: bool,
) -> Option<Edits> {
    let version = req.version();
    let mut edits = record.then(|| Edits {
        uri: req.uri().clone(),
        version,
        target_port: None,
        orig_proto: None,
    });
    if let Some(peer) = to_peer {
        let was = set_header(req, TARGET_PORT_HEADER, peer.target_port.clone(), record);
        if let Some(e) = &mut edits {
            e.target_port = Some(was);
        }
        if h2 && version != Version::HTTP_2 {
            let orig = if version == Version::HTTP_10 {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            };
            let was = set_header(
                req,
                ORIG_PROTO_HEADER,
                HeaderValue::from_static(orig),
                record,
            );
            if let Some(e) = &mut edits {
                e.orig_proto = Some(was);
            }
            *req.version_mut() = Version::HTTP_2;
        } else if req.headers().contains_key(ORIG_PROTO_HEADER) {
            // Only this proxy says what a request was: one the app (or a
            // client whose headers it passes on) marked would be sent on
            // by the peer as HTTP/1.0, its body cut.
            let headers = req.headers_mut();
            if let Some(e) = &mut edits {
                e.orig_proto = Some(headers.get_all(ORIG_PROTO_HEADER).iter().cloned().collect());
            }
            headers.remove(ORIG_PROTO_HEADER);
        }
    }
    if let Some(target) = target {
        target.apply(req);
    }
    edits
}

/// hyper frames a GET's or HEAD's body of unknown length as none at all
/// (rather than send an empty chunked one): the body a client sent chunked
/// (Go's client does, for a GET whose length it does not know) would be
/// dropped. Said chunked, it goes as it came.
fn chunk_a_get_s_body<B: http_body::Body>(req: &mut Request<B>) {
    if matches!(*req.method(), Method::GET | Method::HEAD)
        && !req.headers().contains_key(header::CONTENT_LENGTH)
        && !req.body().is_end_stream()
        && req.body().size_hint().exact() != Some(0)
    {
        req.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}

/// Sets a header; with `record`, returns every value it had (none, normally:
/// these are strait's own headers, but an app may send them).
fn set_header<B>(
    req: &mut Request<B>,
    name: HeaderName,
    value: HeaderValue,
    record: bool,
) -> Vec<HeaderValue> {
    let headers = req.headers_mut();
    let was = if record && headers.contains_key(&name) {
        headers.get_all(&name).iter().cloned().collect()
    } else {
        Vec::new()
    };
    headers.insert(name, value);
    was
}

/// What the forwarder changed in a request for its upstream.
struct Edits {
    uri: Uri,
    version: Version,
    /// The values the strait headers replaced, when they were set.
    target_port: Option<Vec<HeaderValue>>,
    orig_proto: Option<Vec<HeaderValue>>,
}

impl Edits {
    fn undo(self, head: &mut http::request::Parts) {
        head.uri = self.uri;
        head.version = self.version;
        for (name, was) in [
            (TARGET_PORT_HEADER, self.target_port),
            (ORIG_PROTO_HEADER, self.orig_proto),
        ] {
            if let Some(was) = was {
                head.headers.remove(&name);
                for v in was {
                    head.headers.append(name.clone(), v);
                }
            }
        }
    }
}

impl<B> tower::Service<Request<B>> for Forward
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<super::BoxError>,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Response<BoxBody>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        crate::boxed::future(|| async move {
            Ok(this
                .forward(req)
                .await
                .unwrap_or_else(Failed::into_response))
        })
    }
}

/// hyper's client wants `scheme://authority/path`. Over HTTP/2 the authority is
/// the one the app addressed (Host or :authority), so virtual hosting survives
/// the hop. Over HTTP/1 it never reaches the wire (the request line is
/// origin-form and the app's Host header is kept), so it names the connection's
/// address instead: the pool is then one per upstream, not one per Host value.
fn upstream_target<B>(
    req: &Request<B>,
    app_authority: Option<Authority>,
    addr: SocketAddr,
    addr_authority: Option<&Authority>,
    h2: bool,
) -> Result<UpstreamTarget, ProxyError> {
    let addr_authority = || match addr_authority {
        Some(a) => Ok(a.clone()),
        None => Authority::try_from(addr.to_string())
            .map_err(|_| ProxyError::BadRequest("invalid request target")),
    };
    if h2 {
        // A request that named no host (HTTP/1.0 without `Host`) was given
        // its connection's destination by the outbound side
        // (`outbound::dst`), since the peer writes `:authority` into the
        // app's `Host`; the connection's address is the last resort.
        let authority = match app_authority {
            // Never the userinfo an absolute-form target may carry: HTTP/2
            // forbids it in `:authority` (RFC 9113 §8.3.1).
            Some(a) if a.as_str().contains('@') => Authority::try_from(super::host_port(&a))
                .map_err(|_| ProxyError::BadRequest("invalid request target"))?,
            Some(a) => a,
            None => addr_authority()?,
        };
        return Ok(UpstreamTarget {
            scheme: Scheme::HTTP,
            authority,
            host: None,
        });
    }
    // An absolute-form request line named the host: HTTP/1.1 wants it in
    // Host (host and port only: never the userinfo an authority may carry).
    let host = match &app_authority {
        Some(a) if !req.headers().contains_key(header::HOST) => {
            HeaderValue::from_str(&super::host_port(a)).ok()
        }
        _ => None,
    };
    Ok(UpstreamTarget {
        scheme: Scheme::HTTP,
        authority: addr_authority()?,
        host,
    })
}

/// Whether `dst` is the origin `a` names: the request's own target, which
/// this proxy reaches itself (absolute form sent straight to the outbound
/// port), not a forward proxy's address.
fn names(dst: &DestAddr, a: &Authority) -> bool {
    let port = a.port_u16().unwrap_or(80);
    let host = a.host().trim_start_matches('[').trim_end_matches(']');
    match dst {
        DestAddr::Name(n) => n.port() == port && n.host().eq_ignore_ascii_case(host),
        DestAddr::Socket(sa) => {
            sa.port() == port
                && host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip == sa.ip())
        }
    }
}

/// A head's size as its fields' names and values.
fn head_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len())
        .sum()
}

/// The authority the app addressed: the URI's (absolute form, HTTP/2), else
/// the Host header's.
fn app_authority<B>(req: &Request<B>) -> Result<Option<Authority>, ProxyError> {
    match req.uri().authority() {
        Some(a) => Ok(Some(a.clone())),
        None => match req.headers().get(header::HOST) {
            Some(h) => Authority::try_from(h.as_bytes())
                .map(Some)
                .map_err(|_| ProxyError::BadRequest("invalid Host header")),
            None => Ok(None),
        },
    }
}

/// The request target for the upstream, worked out (and any error found)
/// before a connection is made for it.
struct UpstreamTarget {
    /// `http`, but for a forward proxy's request: the scheme the app gave
    /// (`https://` has the proxy open TLS to the origin).
    scheme: Scheme,
    authority: Authority,
    /// A Host header to add (HTTP/1.1 from an absolute-form request line).
    host: Option<HeaderValue>,
}

impl UpstreamTarget {
    fn apply<B>(self, req: &mut Request<B>) {
        if let Some(host) = self.host {
            req.headers_mut().insert(header::HOST, host);
        }
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(self.scheme);
        parts.authority = Some(self.authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        // Scheme, authority and path are all set: this cannot fail.
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

fn client_error(e: ClientError, addr: SocketAddr) -> ProxyError {
    let connect = |c: &ConnectError| match c {
        ConnectError::Timeout { after, .. } => ProxyError::ConnectTimeout {
            addr,
            after: *after,
        },
        ConnectError::Io { source, .. } => ProxyError::Connect {
            addr,
            // The kind in plain words ("connection refused"), not the OS's text.
            reason: match source.kind() {
                std::io::ErrorKind::Other => "connection error".to_string(),
                k => k.to_string(),
            },
        },
        ConnectError::Tls { reason, .. } => ProxyError::Connect {
            addr,
            reason: format!("mTLS: {reason}"),
        },
        ConnectError::OwnCertificate { reason, .. } => ProxyError::OwnCertificate(reason),
    };
    let e = match e {
        ClientError::Connect(c) => return connect(&c),
        ClientError::Http(e) => Box::new(e) as Box<dyn std::error::Error + 'static>,
        ClientError::Pooled(e) => Box::new(e),
    };
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(c) = s.downcast_ref::<ConnectError>() {
            return connect(c);
        }
        src = s.source();
    }
    if unprocessed(e.as_ref()) {
        return ProxyError::Refused {
            addr,
            reason: upstream_failure(e.as_ref()).into_owned(),
        };
    }
    ProxyError::Upstream {
        addr,
        reason: upstream_failure(e.as_ref()).into_owned(),
    }
}

/// Whether a peer proxy's answer says its app did not process the request
/// (`NOT_PROCESSED`: its app refused the stream, or the peer shed it, 503),
/// or never got any of it (`NOT_SENT`: the peer could not connect to it,
/// 502 or 504), and which. The status first: most answers are read no further.
fn peer_says_unsent<B>(rsp: &Response<B>) -> Option<&'static str> {
    use super::error::{NOT_PROCESSED, NOT_SENT};
    use http::StatusCode;
    let marker = match rsp.status() {
        StatusCode::SERVICE_UNAVAILABLE => NOT_PROCESSED,
        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => NOT_SENT,
        _ => return None,
    };
    let said = rsp.headers().get(PROXY_ERROR_HEADER)?.as_bytes();
    said.ends_with(marker.as_bytes()).then_some(marker)
}

/// Whether the upstream said it did not process the request (RFC 9113 §8.7):
/// it refused the stream (over its concurrent-stream limit), or a graceful
/// GOAWAY named only earlier streams (shutting down, max connection age).
fn unprocessed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            let reason = h2.reason();
            return h2.is_remote()
                && ((h2.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM))
                    || (h2.is_go_away() && reason == Some(h2::Reason::NO_ERROR)));
        }
        cur = e.source();
    }
    false
}

/// What went wrong with an upstream, in our words: library errors describe
/// their own state, which tells the reader of `strait-proxy-error` nothing.
fn upstream_failure(e: &(dyn std::error::Error + 'static)) -> std::borrow::Cow<'static, str> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && let Some(reason) = h2.reason()
        {
            return match (h2.is_remote(), h2.is_go_away(), reason) {
                (true, false, h2::Reason::REFUSED_STREAM) => {
                    format!("refused the stream {}", super::error::NOT_PROCESSED).into()
                }
                (true, false, _) => format!("reset the stream ({reason:?})").into(),
                (true, true, h2::Reason::NO_ERROR) => format!(
                    "closed the connection (GOAWAY NO_ERROR) {}",
                    super::error::NOT_PROCESSED
                )
                .into(),
                (true, true, _) => format!("closed the connection (GOAWAY {reason:?})").into(),
                (false, ..) => "broke the HTTP/2 protocol".into(),
            };
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return "closed the connection before a complete response".into();
            }
            if h.is_parse_too_large() {
                return "sent a response head over 64 KiB or 100 fields".into();
            }
            if h.is_parse() || h.is_parse_status() {
                return "sent a malformed response".into();
            }
            if h.is_timeout() {
                return "timed out".into();
            }
            if h.is_canceled() || h.is_closed() {
                return "closed the connection".into();
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionReset => "reset the connection",
                std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::BrokenPipe => {
                    "closed the connection"
                }
                std::io::ErrorKind::TimedOut => "timed out",
                _ => "connection error",
            }
            .into();
        }
        cur = e.source();
    }
    "failed mid-request".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer proxy's "not processed" is read as such (its app refused the
    /// stream, or the peer was over its in-flight cap), and its "not sent"
    /// (it could not connect to its app), and only those: its other 503s
    /// and 502s are its app failing.
    #[test]
    fn a_peer_s_answer_that_its_app_took_nothing_is_told_apart() {
        use super::super::error::{NOT_PROCESSED, NOT_SENT};
        let answer = |status: http::StatusCode, reason: &str| {
            let mut rsp = Response::new(());
            *rsp.status_mut() = status;
            rsp.headers_mut()
                .insert(PROXY_ERROR_HEADER, HeaderValue::from_str(reason).unwrap());
            rsp
        };
        // As the peer makes them.
        let made = |e: ProxyError| {
            let rsp = e.into_response();
            let reason = rsp.headers()[PROXY_ERROR_HEADER]
                .to_str()
                .unwrap()
                .to_owned();
            peer_says_unsent(&answer(rsp.status(), &reason))
        };
        let app: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            made(ProxyError::Refused {
                addr: app,
                reason: format!("refused the stream {NOT_PROCESSED}"),
            }),
            Some(NOT_PROCESSED)
        );
        assert_eq!(
            made(ProxyError::Connect {
                addr: app,
                reason: "connection refused".into(),
            }),
            Some(NOT_SENT)
        );
        assert_eq!(
            made(ProxyError::ConnectTimeout {
                addr: app,
                after: Duration::from_secs(1),
            }),
            Some(NOT_SENT)
        );
        // The app failed it mid-request: some of it may have been done.
        assert_eq!(
            made(ProxyError::Upstream {
                addr: app,
                reason: "reset the stream (CANCEL)".into(),
            }),
            None
        );
        // A peer over its in-flight cap refused it before anything was done.
        assert_eq!(
            peer_says_unsent(&answer(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "too many requests in flight (not processed)"
            )),
            Some(NOT_PROCESSED)
        );
        assert_eq!(
            peer_says_unsent(&answer(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "no endpoints for web.shop:80"
            )),
            None
        );
        // Only with the status it comes with.
        assert_eq!(
            peer_says_unsent(&answer(
                http::StatusCode::OK,
                "connect to x failed (not sent)"
            )),
            None
        );
    }
    use crate::addr::DestAddr;
    use crate::identity::Identity;
    use std::time::Duration;

    fn forwarder() -> (Forward, crate::transport::DrainTrigger) {
        forwarder_to(Direction::Outbound)
    }

    fn forwarder_to(direction: Direction) -> (Forward, crate::transport::DrainTrigger) {
        let (trigger, drain) = crate::transport::drain::channel();
        let forward = Forward::new(
            ClientCache::new(Duration::from_secs(1), None),
            OwnAddrs::new([]),
            TcpConfig {
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(10),
                names: Default::default(),
                drain: None,
            },
            Metrics::new(),
            drain,
            direction,
        );
        (forward, trigger)
    }

    fn request(dead: SocketAddr, to_peer: bool, hand_back: bool) -> Request<BoxBody> {
        let mut req = Request::get("/orders?id=7")
            .header(header::HOST, "web")
            .header("x-app", "kept")
            .body(crate::http::empty())
            .unwrap();
        req.extensions_mut().insert(Dst(DestAddr::Socket(dead)));
        if hand_back {
            req.extensions_mut().insert(ReturnUnsent);
        }
        if to_peer {
            req.extensions_mut().insert(ToPeer::new(
                8080,
                Identity::of("cluster.local", "test", "web").unwrap(),
            ));
            req.extensions_mut()
                .insert(ConnectTimeout(Duration::from_millis(500)));
        }
        req
    }

    #[tokio::test]
    async fn a_request_that_cannot_be_sent_comes_back_as_it_came() {
        // Nothing listens on a port just freed.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        // HTTP/2 to a peer proxy (connected before the request is changed), and
        // HTTP/1 to a plain endpoint (its head copied first).
        for to_peer in [true, false] {
            let (forward, _drain) = forwarder();
            let rsp = tower::ServiceExt::oneshot(forward, request(dead, to_peer, true))
                .await
                .unwrap();
            assert_eq!(rsp.status(), http::StatusCode::BAD_GATEWAY, "{to_peer}");
            let head = rsp
                .extensions()
                .get::<Unsent>()
                .and_then(Unsent::take)
                .expect("the request handed back");
            assert_eq!(head.uri, "/orders?id=7", "{to_peer}");
            assert_eq!(head.version, Version::HTTP_11);
            assert_eq!(head.headers["x-app"], "kept");
            assert_eq!(head.headers[header::HOST], "web");
            assert!(!head.headers.contains_key(TARGET_PORT_HEADER));
            assert!(!head.headers.contains_key(ORIG_PROTO_HEADER));
            // What the balancer set for this endpoint is gone: the next may differ.
            assert!(head.extensions.get::<Dst>().is_none());
            assert!(head.extensions.get::<ToPeer>().is_none());
            assert!(head.extensions.get::<ConnectTimeout>().is_none());
            assert!(head.extensions.get::<ReturnUnsent>().is_some());

            // Unasked, nothing is kept.
            let (forward, _drain) = forwarder();
            let rsp = tower::ServiceExt::oneshot(forward, request(dead, to_peer, false))
                .await
                .unwrap();
            assert_eq!(rsp.status(), http::StatusCode::BAD_GATEWAY);
            assert!(rsp.extensions().get::<Unsent>().is_none());
        }
    }

    /// A peer that never answers a connect (its node gone) fails the request
    /// as unsent by its attempt's connect deadline, not by the (longer)
    /// connect timeout: the retry above sends it elsewhere.
    #[tokio::test]
    async fn a_connect_that_hangs_hands_the_request_back_by_the_attempts_deadline() {
        // A listener whose accept queue is full drops further SYNs.
        let full = tokio::net::TcpSocket::new_v4().unwrap();
        full.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let full = full.listen(0).unwrap();
        let addr = full.local_addr().unwrap();
        let _queued = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (forward, _drain) = forwarder();
        let mut req = request(addr, true, true);
        req.extensions_mut()
            .insert(ConnectTimeout(Duration::from_secs(30)));
        let after = Duration::from_millis(300);
        req.extensions_mut().insert(ConnectBy {
            at: tokio::time::Instant::now() + after,
            after,
        });
        let started = std::time::Instant::now();
        let rsp = tokio::time::timeout(
            Duration::from_secs(10),
            tower::ServiceExt::oneshot(forward, req),
        )
        .await
        .expect("answered by the attempt's deadline")
        .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(rsp.status(), http::StatusCode::GATEWAY_TIMEOUT);
        let head = rsp.extensions().get::<Unsent>().and_then(Unsent::take);
        assert!(
            head.is_some(),
            "the request handed back, to be sent elsewhere"
        );
        // A slow connect is not yet a failed endpoint.
        assert!(
            rsp.extensions()
                .get::<crate::http::error::NoVerdict>()
                .is_some()
        );
        assert!(
            rsp.extensions()
                .get::<crate::http::error::UpstreamFailure>()
                .is_none()
        );
    }

    /// An app that answers CONNECT 200 with a framed (empty) body, or 204,
    /// has taken it for a request, not opened a tunnel: nothing is spliced
    /// into it. Going out, an egress proxy's framed answer is a tunnel.
    #[tokio::test]
    async fn a_connect_answered_as_a_request_is_no_tunnel() {
        let framed = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        let established = "HTTP/1.1 200 Connection established\r\n\r\n";
        for (answer, direction, tunnel) in [
            (framed, Direction::Inbound, false),
            (chunked, Direction::Inbound, false),
            ("HTTP/1.1 204 No Content\r\n\r\n", Direction::Inbound, false),
            (established, Direction::Inbound, true),
            (framed, Direction::Outbound, true),
        ] {
            let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = app.local_addr().unwrap();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let (mut s, _) = app.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                s.write_all(answer.as_bytes()).await.unwrap();
                let _ = s.read(&mut buf).await;
            });
            let (forward, _drain) = forwarder_to(direction);
            let mut req = Request::connect("web:8080")
                .header(header::HOST, "web:8080")
                .body(crate::http::empty())
                .unwrap();
            req.extensions_mut().insert(Dst(DestAddr::Socket(addr)));
            let rsp = tower::ServiceExt::oneshot(forward, req).await.unwrap();
            if tunnel {
                assert!(rsp.status().is_success(), "{answer:?} {direction:?}");
            } else {
                assert_eq!(rsp.status(), http::StatusCode::BAD_GATEWAY, "{answer:?}");
            }
        }
    }

    /// An HTTP/1.0 CONNECT (Python's before 3.12 through a forward proxy) is
    /// tunnelled as HTTP/1.1's, in both directions: it was answered 502, and
    /// counted against the endpoint.
    #[tokio::test]
    async fn an_http10_connect_is_tunnelled() {
        for direction in [Direction::Inbound, Direction::Outbound] {
            let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = app.local_addr().unwrap();
            let (head_tx, head_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let (mut s, _) = app.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let _ = head_tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = s.read(&mut buf).await;
            });
            let (forward, _drain) = forwarder_to(direction);
            let mut req = Request::connect("web:8080")
                .version(Version::HTTP_10)
                .body(crate::http::empty())
                .unwrap();
            req.extensions_mut().insert(Dst(DestAddr::Socket(addr)));
            let rsp = tower::ServiceExt::oneshot(forward, req).await.unwrap();
            assert_eq!(rsp.status(), http::StatusCode::OK, "{direction:?}");
            assert_eq!(rsp.version(), Version::HTTP_10, "{direction:?}");
            let head = head_rx.await.unwrap();
            assert!(
                head.starts_with("CONNECT web:8080 HTTP/1.1\r\n"),
                "{direction:?}: {head:?}"
            );
        }
    }

    /// An HTTP/1 app that answers as soon as it has a head, saying whether the
    /// body had come with it (an app that answers early keeps its connection
    /// only if it can drain the body from what it has read).
    async fn early_answering_app() -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let end = loop {
                let n = conn.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed before a whole head");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
            };
            let with_head = String::from_utf8_lossy(&buf[end..]).into_owned();
            let rsp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{with_head}",
                with_head.len()
            );
            conn.write_all(rsp.as_bytes()).await.unwrap();
        });
        addr
    }

    /// A 5-byte upload to `app`.
    fn upload(app: SocketAddr, body: BoxBody) -> Request<BoxBody> {
        let mut req = Request::post("/upload")
            .header(header::HOST, "app")
            .header(header::CONTENT_LENGTH, "5")
            .body(body)
            .unwrap();
        req.extensions_mut().insert(Dst(DestAddr::Socket(app)));
        req
    }

    #[tokio::test]
    async fn an_http1_request_s_body_goes_with_its_head() {
        use http_body_util::BodyExt;
        let app = early_answering_app().await;
        // The body's bytes come a little after the forwarder first asks for
        // them, as DATA frames trail HEADERS between proxies: well within the
        // wait, long enough for an app to have read a head written alone.
        let (tx, asked, body) = crate::http::first_frame::tests::held_until_asked(5);
        let req = upload(app, body);
        tokio::spawn(async move {
            asked.await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send(Ok(bytes::Bytes::from_static(b"hello"))).await
        });
        let (forward, _drain) = forwarder();
        let rsp = tower::ServiceExt::oneshot(forward, req).await.unwrap();
        assert_eq!(rsp.status(), http::StatusCode::OK);
        let seen = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(seen, "hello", "the app had the body with the head");
    }

    /// Go's client sends a GET's body of unknown length chunked (as
    /// Elasticsearch's search clients do): it reaches an HTTP/1 app chunked,
    /// not dropped for a GET's usual lack of one.
    #[tokio::test]
    async fn a_chunked_get_body_reaches_an_http1_app() {
        use http_body_util::BodyExt;
        let app = early_answering_app().await;
        let chunks = futures_util::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(
            bytes::Bytes::from_static(b"hello"),
        ))]);
        let mut req = Request::get("/_search")
            .header(header::HOST, "app")
            .body(crate::http::boxed(http_body_util::StreamBody::new(chunks)))
            .unwrap();
        req.extensions_mut().insert(Dst(DestAddr::Socket(app)));
        let (forward, _drain) = forwarder();
        let rsp = tower::ServiceExt::oneshot(forward, req).await.unwrap();
        assert_eq!(rsp.status(), http::StatusCode::OK);
        let seen = rsp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&seen).starts_with("5\r\nhello\r\n"),
            "the app read {seen:?} after the head"
        );
        // A GET without a body stays without one, and unframed.
        let mut get = Request::get("/").body(crate::http::empty()).unwrap();
        chunk_a_get_s_body(&mut get);
        assert!(get.headers().get(header::TRANSFER_ENCODING).is_none());
    }

    /// A legacy server's head that a client reads when talking to it
    /// directly (whitespace before a colon, a folded header) is passed on
    /// mended, not answered 502 against a healthy endpoint.
    #[tokio::test]
    async fn a_legacy_response_head_is_mended_not_refused() {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await.unwrap();
            tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Folded: a\r\n b\r\nServer : legacy\r\n\r\nok")
                .await
                .unwrap();
            let _ = tcp.read(&mut buf).await;
        });
        let mut req = Request::get("/")
            .header(header::HOST, "app")
            .body(crate::http::empty())
            .unwrap();
        req.extensions_mut().insert(Dst(DestAddr::Socket(app)));
        let (forward, _drain) = forwarder();
        let rsp = tower::ServiceExt::oneshot(forward, req).await.unwrap();
        assert_eq!(rsp.status(), http::StatusCode::OK);
        assert_eq!(rsp.headers()["x-folded"], "a b");
        assert_eq!(rsp.headers()["server"], "legacy");
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }

    #[tokio::test]
    async fn a_body_that_fails_before_the_head_goes_never_reaches_the_app() {
        use futures_util::FutureExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        let (tx, body) = crate::http::first_frame::tests::held(5);
        tx.send(Err("bad chunk".into())).await.unwrap();
        let req = crate::http::request_body::RequestBody::wrap(upload(app, body), None);
        let (forward, _drain) = forwarder();
        let rsp = tower::ServiceExt::oneshot(forward, req).await.unwrap();
        assert_eq!(rsp.status(), http::StatusCode::BAD_REQUEST);
        // A connection the pool had made would be waiting to be accepted.
        assert!(
            listener.accept().now_or_never().is_none(),
            "the app was connected to"
        );
    }

    #[tokio::test]
    async fn an_http1_connection_idle_for_an_apps_keep_alive_is_not_used_again() {
        use crate::defaults::HTTP1_POOL_IDLE_TIMEOUT;
        // An app that counts the connections it accepts (Node.js and uvicorn
        // would close one of them after 5 s idle).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let svc = hyper::service::service_fn(|_| async {
                    Ok::<_, Infallible>(Response::new(crate::http::full("ok")))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
                );
            }
        });
        let (forward, _drain) = forwarder();
        let get = || {
            let mut req = Request::get("/")
                .header(header::HOST, "app")
                .body(crate::http::empty())
                .unwrap();
            req.extensions_mut().insert(Dst(DestAddr::Socket(app)));
            let forward = forward.clone();
            async move {
                use http_body_util::BodyExt;
                let rsp = tower::ServiceExt::oneshot(forward, req).await.unwrap();
                assert_eq!(rsp.status(), http::StatusCode::OK);
                // Read to the end, so the connection goes back to the pool.
                rsp.into_body().collect().await.unwrap();
            }
        };
        get().await;
        get().await;
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "kept alive"
        );
        // Idle past the pool's limit, still short of the app's. The pool reads
        // tokio's clock.
        assert!(HTTP1_POOL_IDLE_TIMEOUT < Duration::from_secs(5));
        tokio::time::pause();
        tokio::time::advance(HTTP1_POOL_IDLE_TIMEOUT + Duration::from_millis(200)).await;
        tokio::time::resume();
        get().await;
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "a new connection after the pool's idle limit"
        );
    }

    /// The authority an HTTP/2 request to a peer carries.
    fn target_of<B>(req: &Request<B>, addr: SocketAddr) -> String {
        let target = upstream_target(req, app_authority(req).unwrap(), addr, None, true).unwrap();
        target.authority.to_string()
    }

    #[test]
    fn what_is_changed_for_a_peer_is_recorded_and_undone_whole() {
        // HTTP/1.0, with two values of a strait header the app sent itself.
        let mut req = Request::get("/a?b=1")
            .version(Version::HTTP_10)
            .header(header::HOST, "web:8080")
            .header(TARGET_PORT_HEADER, "9")
            .header(TARGET_PORT_HEADER, "10")
            .header("x-app", "kept")
            .body(())
            .unwrap();
        let original = head_of(&req);
        let peer = ToPeer::new(8080, Identity::of("cluster.local", "test", "web").unwrap());
        let addr: SocketAddr = "10.0.0.7:4143".parse().unwrap();
        let target = upstream_target(&req, app_authority(&req).unwrap(), addr, None, true).unwrap();
        let edits = edit_for_upstream(&mut req, Some(&peer), true, Some(target), true)
            .expect("the edits recorded");
        // As the peer proxy gets it.
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri(), "http://web:8080/a?b=1");
        assert_eq!(req.headers()[ORIG_PROTO_HEADER], "HTTP/1.0");
        let ports: Vec<_> = req.headers().get_all(TARGET_PORT_HEADER).iter().collect();
        assert_eq!(ports, ["8080"]);
        // Handed back: as the app sent it.
        let (mut head, ()) = req.into_parts();
        edits.undo(&mut head);
        assert_eq!(head.uri, original.uri);
        assert_eq!(head.version, Version::HTTP_10);
        assert_eq!(head.headers, original.headers);

        // HTTP/1.0 without `Host` (which the outbound side names, see
        // `outbound::dst`): the connection's address, as a last resort.
        let bare = Request::get("/a")
            .version(Version::HTTP_10)
            .body(())
            .unwrap();
        assert_eq!(target_of(&bare, addr), "10.0.0.7:4143");
        // An absolute-form target's userinfo stops here: HTTP/2 forbids it
        // in `:authority`.
        let with_userinfo = Request::get("http://user:secret@web:81/x")
            .body(())
            .unwrap();
        assert_eq!(target_of(&with_userinfo, addr), "web:81");

        // Not asked to record: nothing is kept.
        let mut req = Request::get("/a").body(()).unwrap();
        assert!(edit_for_upstream(&mut req, Some(&peer), true, None, false).is_none());
        assert_eq!(req.headers()[TARGET_PORT_HEADER], "8080");

        // An HTTP/2 request that claims to have been HTTP/1.0 (the app's
        // own header, or its client's passed on) does not reach the peer
        // so: the peer would send it on as HTTP/1.0 and cut its body.
        let mut req = Request::post("/a")
            .version(Version::HTTP_2)
            .header(ORIG_PROTO_HEADER, "HTTP/1.0")
            .body(())
            .unwrap();
        let original = head_of(&req);
        let edits = edit_for_upstream(&mut req, Some(&peer), true, None, true).unwrap();
        assert!(!req.headers().contains_key(ORIG_PROTO_HEADER));
        let (mut head, ()) = req.into_parts();
        edits.undo(&mut head);
        assert_eq!(head.headers, original.headers, "handed back whole");
    }
}
