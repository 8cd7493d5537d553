//! The inbound path: connections to this pod. Terminate mTLS from peer proxies
//! (learning the peer's verified identity), learn the target port (from the
//! redirect, or carried by the peer proxy), detect the protocol, authorize against
//! this workload's policy, and forward to the app on 127.0.0.1:<target port>.

mod authorize;
pub mod dst;
mod opening;
pub mod policy;
mod settle;
mod unproven;
pub use unproven::unproven_share;

use std::sync::Arc;

use bytes::Bytes;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tower::layer::util::Stack;
use tracing::debug;

use self::authorize::AuthorizeLayer;
use self::settle::Settled;
use self::unproven::{Plaintext, Unproven};
use crate::addr::{ClientAddr, TargetPort};
use crate::defaults;
use crate::detect::Protocol;
use crate::http::dst::SetDstLayer;
use crate::http::server::ConnMeta;
use crate::http::stack::HttpStack;
use crate::identity::{Identity, tls};
use crate::proxy::{Detection, Shared};
use crate::telemetry::Direction;
use crate::telemetry::metrics::{Authorized, DirectionLabels, ReasonLabels};
use crate::transport::Accepted;
use crate::transport::orig_dst::orig_dst;

const DIRECTION: Direction = Direction::Inbound;

#[derive(Clone, Debug)]
pub struct Inbound {
    shared: Arc<Shared>,
    http: HttpStack,
    unproven: Unproven,
}

/// What the first bytes of a connection said before any detection.
enum First {
    /// A TLS ClientHello, to be answered when this proxy has an identity.
    Tls,
    /// Something else (or nothing within the detection timeout: a server-speaks-first
    /// protocol, which detection would only wait for again).
    Other { silent: bool },
}

impl Inbound {
    pub fn new(shared: Arc<Shared>) -> Self {
        let c = &shared.config;
        Inbound {
            http: HttpStack::new(shared.clone(), DIRECTION),
            unproven: Unproven::new(
                c.max_connections(),
                c.inbound_max_connections_per_source,
                shared.tls_server.is_some(),
            ),
            shared,
        }
    }

    /// Serves one accepted connection. Its future is what an idle connection
    /// costs, and the mTLS path is the larger (a TLS stream alone is 1.2 KiB),
    /// so each path's future is boxed once the first byte has chosen it: a
    /// plaintext client's connection holds none of the mTLS path.
    pub async fn handle(self: Arc<Self>, acc: Accepted) {
        let target = orig_dst(&acc.stream).map(|o| TargetPort(o.0.port()));
        let client = acc.client;
        let Some(server) = self.shared.tls_server.clone() else {
            let Some(held) = self.plaintext(client, target) else {
                return;
            };
            let probe_only = held.probe_only;
            return crate::boxed::pin(|| {
                self.serve(acc.stream, target, None, false, client, probe_only)
            })
            .await;
        };
        // Redirected to us: a client outside the mesh, since peer proxies dial
        // the inbound port itself, which is never redirected. TLS from it is
        // the app's own (an admission webhook's, an HTTPS endpoint's), carried
        // as TCP under the port's policy like any other bytes, and a port
        // declared opaque is not waited on here.
        if target.is_some() {
            let Some(held) = self.plaintext(client, target) else {
                return;
            };
            let probe_only = held.probe_only;
            return crate::boxed::pin(|| {
                self.serve(acc.stream, target, None, false, client, probe_only)
            })
            .await;
        }
        // Dialled directly: a peer proxy, whose handshake may start late (a
        // lost segment, a throttled CPU) and gets the handshake's time for it,
        // or a plaintext client of a mesh without redirection, for whom
        // nothing is settled before it speaks anyway. Silent all that time,
        // it is neither: closed, rather than held for a header timeout more.
        let opening = match self.unproven.opening(client.0.ip().to_canonical()) {
            Ok(opening) => opening,
            Err(refused) => return self.refuse(refused, client),
        };
        match first(&acc.stream, defaults::TLS_HANDSHAKE_TIMEOUT).await {
            Some(First::Tls) => {
                crate::boxed::pin(|| self.from_peer(acc.stream, server, target, client, opening))
                    .await
            }
            Some(First::Other { silent: false }) => {
                drop(opening);
                let Some(held) = self.plaintext(client, target) else {
                    return;
                };
                let probe_only = held.probe_only;
                crate::boxed::pin(|| {
                    self.serve(acc.stream, target, None, false, client, probe_only)
                })
                .await
            }
            Some(First::Other { silent: true }) => {
                self.shared.metrics.reject_tcp(DIRECTION, "silent");
                debug!(client = %client.0, "silent on the inbound port past the handshake timeout; closed");
            }
            None => {}
        }
    }

    /// A plaintext connection's places (`unproven`), or none: refused,
    /// counted and logged. One to a port the kubelet probes may take of the
    /// places kept for probes.
    fn plaintext(&self, client: ClientAddr, target: Option<TargetPort>) -> Option<Plaintext> {
        let probed = || target.is_some_and(|t| policy::probed(&self.shared.policy, t.0));
        self.unproven
            .plaintext(client.0.ip().to_canonical(), probed)
            .inspect_err(|refused| self.refuse(*refused, client))
            .ok()
    }

    fn refuse(&self, refused: unproven::Refused, client: ClientAddr) {
        self.shared.metrics.reject_tcp(DIRECTION, refused.reason());
        // Sampled: each refusal is the client's doing, and counted.
        strait_otel::sampled!(
            warn,
            client = %client.0,
            reason = refused.reason(),
            "inbound connection refused: this address, or unauthenticated clients together, hold all they may"
        );
    }

    /// A connection that opened with a TLS handshake: a peer proxy, whose
    /// certificate must name a workload. `opening`: its address's place until
    /// it has.
    async fn from_peer(
        self: Arc<Self>,
        stream: TcpStream,
        server: Arc<rustls::ServerConfig>,
        target: Option<TargetPort>,
        client: ClientAddr,
        opening: unproven::Opening,
    ) {
        let s = &self.shared;
        let accept = tokio_rustls::TlsAcceptor::from(server)
            .accept(stream)
            .into_fallible();
        match tokio::time::timeout(defaults::TLS_HANDSHAKE_TIMEOUT, accept).await {
            Ok(Ok(stream)) => {
                let peer = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(tls::live_peer);
                let Some((peer, left)) = peer else {
                    // It chains to our anchors yet names no workload (not a
                    // proxy of ours), or a resumed session's has expired.
                    s.metrics.reject_tcp(DIRECTION, "no_peer_identity");
                    strait_otel::sampled!(warn, client = %client.0, "peer certificate carries no live workload identity; closed");
                    return;
                };
                // A proven peer is counted under the listener's cap only.
                drop(opening);
                let opaque = stream.get_ref().1.alpn_protocol() == Some(tls::ALPN_OPAQUE);
                // Boxed, so that the stages below move a pointer, not the stream.
                let stream = Box::new(stream);
                // HTTP is served on it while the peer's certificate vouches
                // for it: no new request once it has expired.
                let until = tokio::time::Instant::now() + left;
                if opaque {
                    return self.opaque_from_peer(stream, peer, until, client).await;
                }
                self.serve(stream, target, Some((peer, until)), false, client, false)
                    .await
            }
            Ok(Err((e, tcp))) => {
                s.metrics
                    .tls_handshake_failures
                    .get_or_create(&DirectionLabels {
                        direction: DIRECTION,
                    })
                    .inc();
                strait_otel::sampled!(warn, client = %client.0, error = %e, "mTLS handshake from peer failed");
                // Boxed: only this branch holds it, every connection's future would.
                Box::pin(linger(tcp)).await;
            }
            Err(_) => {
                s.metrics.reject_tcp(DIRECTION, "tls_handshake_timeout");
                debug!(client = %client.0, "mTLS handshake timed out");
            }
        }
    }

    /// An opaque stream carried by a peer proxy: its first two bytes are the
    /// target port.
    async fn opaque_from_peer<I>(
        self: Arc<Self>,
        mut stream: I,
        peer: Identity,
        until: tokio::time::Instant,
        client: ClientAddr,
    ) where
        I: AsyncRead + AsyncWrite + crate::tcp::Abort + Unpin + Send + 'static,
    {
        use tokio::io::AsyncReadExt;
        let read = tokio::time::timeout(defaults::TLS_HANDSHAKE_TIMEOUT, stream.read_u16());
        match read.await {
            Ok(Ok(port)) if port != 0 => {
                self.serve(
                    stream,
                    Some(TargetPort(port)),
                    Some((peer, until)),
                    true,
                    client,
                    false,
                )
                .await
            }
            _ => {
                self.shared.metrics.reject_tcp(DIRECTION, "no_target_port");
                strait_otel::sampled!(warn, client = %client.0, %peer, "opaque stream from peer proxy without a target port, closed");
            }
        }
    }

    /// Serves a stream to the app. `peer`: a verified peer, and when its
    /// certificate ends. `probe_only`: in a place kept for the kubelet's
    /// probes (`Unproven::plaintext`). `silent`: its protocol is to be settled by
    /// whoever speaks first rather than detected (the client already said nothing
    /// for the detection timeout, or a peer proxy carried it as opaque).
    async fn serve<I>(
        self: Arc<Self>,
        io: I,
        target: Option<TargetPort>,
        peer: Option<(Identity, tokio::time::Instant)>,
        silent: bool,
        client: ClientAddr,
        probe_only: bool,
    ) where
        I: AsyncRead + AsyncWrite + crate::tcp::Abort + Unpin + Send + 'static,
    {
        // A verified peer, and when its certificate ends.
        let (peer, until) = peer.map_or((None, None), |(p, u)| (Some(p), Some(u)));
        let s = &self.shared;
        let rules = dst::TargetRules {
            own: s.own.clone(),
            // A verified peer names its port. A redirected plaintext client gets
            // the port it was redirected to. A plaintext client that dialled the
            // inbound port itself names its port only in a mesh without
            // identities (where peers look like that), or from this host (the
            // loopback mesh of tests and the demo): from elsewhere it could reach
            // ports the app binds to loopback only.
            trust_carried: peer.is_some()
                || (target.is_none()
                    && (s.identity.is_none() || client.0.ip().to_canonical().is_loopback())),
        };
        // Only a port declared opaque is carried without a look at its bytes: on
        // any other, HTTP goes through the HTTP stack, whatever came before it.
        // Not a plaintext client's on a port the kubelet probes that refuses
        // plaintext: carried unread, it would be refused whole, the kubelet's
        // probes with it (the pod never ready); read, only a probe gets through.
        // Nor in a place kept for the kubelet's probes, where only a probe
        // is served.
        let declared = !probe_only
            && target.is_some_and(|p| {
                s.config.inbound_opaque_ports().contains(p.0)
                    && !(peer.is_none()
                        && policy::probed(&s.policy, p.0)
                        && policy::check(&s.policy, p.0, None).is_err())
            });
        let detection = if silent && !declared {
            Detection::Silent(io)
        } else {
            let Some(d) = s.detect_or_silence(io, declared, DIRECTION, client).await else {
                return;
            };
            d
        };
        let (protocol, io, app_conn) = match detection {
            Detection::Known(protocol, io) => (protocol, io, None),
            Detection::Silent(io) => {
                // Authorized before a connection to the app is made for it, as
                // an opaque stream is: the port's policy decides HTTP alike.
                let app = match target.map(|p| rules.check(p)) {
                    Some(Ok(p)) => match policy::silent_client(&s.policy, p.0, peer.as_ref()) {
                        Ok(true) => Some(dst::app_addr(s.config.app_ip, p)),
                        // Only its words, if HTTP, lead on (a late probe).
                        Ok(false) => None,
                        Err(denied) => {
                            s.count_detected(DIRECTION, Protocol::Opaque);
                            authorize::count(&s.metrics, peer.as_ref(), Authorized::Tcp, false);
                            s.metrics.reject_tcp(DIRECTION, "unauthorized");
                            let peer = peer.as_ref().map_or("unauthenticated", |p| p.as_str());
                            strait_otel::sampled!(info, client = %client.0, peer, port = p.0, %denied, "inbound connection denied");
                            return;
                        }
                    },
                    _ => None,
                };
                match settle::settle(s, io, app, client, peer.is_some()).await {
                    Some(Settled::Http(protocol, io)) => (protocol, io, None),
                    Some(Settled::Opaque(io, up)) => (Protocol::Opaque, io, up),
                    None => return,
                }
            }
        };
        // The caller's series, once for the connection: its decisions and
        // its requests are counted there.
        let caller = s.metrics.inbound_peer(peer.as_ref());
        let meta = ConnMeta {
            direction: DIRECTION,
            client,
            metrics: s.metrics.clone(),
            peer: peer.clone(),
            caller: Some(caller.clone()),
            // In a place kept for the kubelet's probes, no request is taken
            // past the time a probe has to be sent: the connection is then
            // closed (HTTP/2: GOAWAY), whatever its client goes on sending.
            until: if probe_only {
                Some(tokio::time::Instant::now() + defaults::HTTP_HEADER_READ_TIMEOUT)
            } else {
                until
            },
            // An HTTP/1 connection carries one request at a time, and one
            // whose client stops reading is cut (`--http-body-read-timeout`):
            // the kubelet's probes are HTTP/1, and over HTTP/2 a client could
            // hold a thousand streams per connection on the probed port.
            caller_share: peer.is_some()
                || protocol != Protocol::Http1
                || !target.is_some_and(|p| policy::probed(&s.policy, p.0)),
            // Redirected (a client outside the mesh), or an opaque stream a
            // peer carried: one app port. A peer's own connection names the
            // port per request.
            one_destination: target.is_some(),
        };
        let layers = Stack::new(
            AuthorizeLayer::new(
                peer.clone(),
                s.policy.clone(),
                s.metrics.clone(),
                caller.clone(),
            )
            .for_client(client)
            .expiring(until)
            .probes_only(probe_only),
            SetDstLayer(
                dst::InboundDst::new(target, rules.clone(), s.config.app_ip)
                    .for_caller(client.0.ip().to_canonical()),
            ),
        );
        match protocol {
            // In a place kept for the kubelet's probes, which are HTTP.
            Protocol::Opaque if probe_only => {
                s.metrics
                    .reject_tcp(DIRECTION, unproven::Refused::Source.reason());
            }
            Protocol::Opaque => match target.map(|p| rules.check(p)) {
                Some(Err(e)) => {
                    s.metrics.reject_tcp(DIRECTION, "loop");
                    strait_otel::sampled!(warn, client = %client.0, error = %e, "opaque stream for the proxy's own port, closed");
                }
                Some(Ok(p)) => {
                    let decision = policy::check(&s.policy, p.0, peer.as_ref());
                    caller.authorized(Authorized::Tcp, decision.is_ok());
                    if let Err(denied) = decision {
                        s.metrics.reject_tcp(DIRECTION, "unauthorized");
                        let peer = peer.as_ref().map_or("unauthenticated", |p| p.as_str());
                        strait_otel::sampled!(info, client = %client.0, peer, port = p.0, %denied, "inbound connection denied");
                        return;
                    }
                    let app = dst::app_addr(s.config.app_ip, p);
                    let io = if declared {
                        opening::GuardedOpening::unguarded(io)
                    } else {
                        let refused = s.metrics.http_rejected.get_or_create(&ReasonLabels {
                            direction: DIRECTION,
                            reason: "malformed",
                        });
                        opening::GuardedOpening::new(
                            io,
                            defaults::DETECT_MAX_BYTES,
                            refused.clone(),
                        )
                    };
                    let (tcp, m) = (&s.tcp, &s.metrics);
                    // Made while settling, what the app said on it goes now;
                    // else made now.
                    let up = match app_conn {
                        Some(up) => up,
                        None => match crate::tcp::connect(&app, tcp, m, DIRECTION).await {
                            Some(up) => crate::transport::PrefixedIo::new(Bytes::new(), up),
                            None => {
                                // A plaintext client is reset, as the app's
                                // refusal is: one that wrote and half-closed
                                // must not read a clean end. A peer proxy gets
                                // the stream cut without a TLS close, which it
                                // reads as its endpoint's app down (a reset
                                // says the client's bytes were refused), and
                                // resets its own client.
                                if peer.is_none() {
                                    crate::tcp::Abort::abort(&io);
                                }
                                return;
                            }
                        },
                    };
                    // A stream cut when its caller's admission is revoked is
                    // reset on both sides: the app must not take what it got
                    // for all there was.
                    let revoked = policy::revoked(s.policy.clone(), p.0, peer.clone());
                    let ended = crate::tcp::splice_until(io, up, &app, tcp, m, DIRECTION, revoked);
                    if let Some(denied) = ended.await.stopped {
                        s.metrics.reject_tcp(DIRECTION, "unauthorized");
                        strait_otel::sampled!(info, client = %client.0, %denied, "open stream no longer authorized; reset");
                    }
                }
                None => {
                    s.metrics.reject_tcp(DIRECTION, "no_target_port");
                    strait_otel::sampled!(warn, client = %client.0, "non-HTTP connection that was not redirected carries no target port, closed");
                }
            },
            Protocol::Http1 => self.http.serve(io, false, layers, &meta).await,
            Protocol::Http2 => self.http.serve(io, true, layers, &meta).await,
        }
    }
}

/// Peeks at the first byte without consuming it.
async fn first(stream: &TcpStream, wait: std::time::Duration) -> Option<First> {
    let mut b = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut b)).await {
        Err(_) => Some(First::Other { silent: true }),
        Ok(Ok(0)) | Ok(Err(_)) => None,
        Ok(Ok(_)) if b[0] == defaults::TLS_HANDSHAKE_BYTE => Some(First::Tls),
        Ok(Ok(_)) => Some(First::Other { silent: false }),
    }
}
/// After a refused handshake, whose alert has been written: in TLS 1.3 the
/// client's handshake ended before ours and it sends its first request at
/// once, which a socket closed at once answers with a reset that can discard
/// the alert unread, leaving the client unable to say why it was refused (a
/// peer that does not trust its issuer yet). Our side is closed and what the
/// client sends read and dropped until it closes, for a moment at most.
async fn linger(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 1024];
    let mut left = defaults::REFUSED_HANDSHAKE_LINGER_BYTES;
    let _ = tokio::time::timeout(defaults::REFUSED_HANDSHAKE_LINGER, async {
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}
