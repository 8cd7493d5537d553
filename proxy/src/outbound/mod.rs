//! The outbound path: the app's own connections. Learn where the app meant to go,
//! detect the protocol, and forward (until discovery: pass through untouched).

mod discover;
mod dst;

use std::sync::Arc;

use tower::layer::util::Stack;
use tracing::warn;

use self::discover::DiscoverLayer;

use crate::addr::DestAddr;
use crate::control::discovery::Resolved;
use crate::control::view::Resolution;
use crate::detect::Protocol;
use crate::http::dst::SetDstLayer;
use crate::http::server::ConnMeta;
use crate::http::stack::HttpStack;
use crate::identity::tls;
use crate::proxy::Shared;
use crate::telemetry::Direction;
use crate::transport::Accepted;
use crate::transport::orig_dst::orig_dst;

const DIRECTION: Direction = Direction::Outbound;

#[derive(Clone, Debug)]
pub struct Outbound {
    shared: Arc<Shared>,
    http: HttpStack,
}

impl Outbound {
    pub fn new(shared: Arc<Shared>) -> Self {
        Outbound {
            http: HttpStack::new(shared.clone(), DIRECTION),
            shared,
        }
    }

    /// Handles one connection. `fixed` is the destination of an `--upstream` listener.
    pub async fn handle(self, acc: Accepted, fixed: Option<DestAddr>) {
        let s = &self.shared;
        let dst = fixed.or_else(|| orig_dst(&acc.stream).map(|o| DestAddr::Socket(o.0)));
        let opaque = dst
            .as_ref()
            .is_some_and(|d| s.config.opaque_ports.contains(d.port()));
        let Some((protocol, io)) = s.detect(acc.stream, opaque, DIRECTION, acc.client).await else {
            return;
        };
        let meta = ConnMeta {
            direction: DIRECTION,
            client: acc.client,
            metrics: s.metrics.clone(),
        };
        let dst_layer = Stack::new(
            DiscoverLayer::new(s.discovery.clone()),
            SetDstLayer(dst::OutboundDst::new(dst.clone(), s.own.clone())),
        );
        match protocol {
            Protocol::Opaque => match dst {
                Some(d) => self.opaque(io, d).await,
                None => {
                    s.metrics.reject_tcp(DIRECTION, "no_destination");
                    warn!(client = %acc.client.0, "non-HTTP connection with no original destination, closed");
                }
            },
            Protocol::Http1 => self.http.serve(io, false, dst_layer, &meta).await,
            Protocol::Http2 => self.http.serve(io, true, dst_layer, &meta).await,
        }
    }

    /// Opaque TCP: to a balanced endpoint of a meshed Service (over mTLS to its
    /// proxy when both sides have identities), else as addressed.
    async fn opaque<I>(&self, io: I, dst: DestAddr)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let s = &self.shared;
        let resolved = match &s.discovery {
            Some(d) => {
                d.resolve(&dst, crate::defaults::DISCOVERY_FIRST_ANSWER_TIMEOUT)
                    .await
            }
            None => None,
        };
        if let Some(Resolved {
            resolution: Resolution::Service(svc),
            balancer,
        }) = resolved
        {
            let Some((ep, in_flight)) = balancer.pick(&svc.endpoints) else {
                s.metrics.reject_tcp(DIRECTION, "no_endpoints");
                warn!(service = %svc.name, "no endpoints; opaque stream closed");
                return;
            };
            if let (Some(peer), Some(creds)) = (&ep.proxy, &s.identity) {
                return self.opaque_over_mtls(io, ep, peer, creds, &in_flight).await;
            }
            let to = DestAddr::Socket(ep.addr);
            return crate::tcp::forward(io, &to, &s.tcp, &s.metrics, DIRECTION).await;
        }
        crate::tcp::forward(io, &dst, &s.tcp, &s.metrics, DIRECTION).await
    }

    /// One mTLS connection to the peer proxy per stream (ALPN `strait-opaque/1`),
    /// the target port first, then the app's bytes both ways. The peer must
    /// present the identity discovery gave; there is no plaintext fallback.
    async fn opaque_over_mtls<I>(
        &self,
        io: I,
        ep: &crate::control::view::Endpoint,
        peer: &crate::control::view::PeerProxy,
        creds: &std::sync::Arc<crate::identity::Credentials>,
        in_flight: &crate::balance::InFlight,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::AsyncWriteExt;
        let s = &self.shared;
        let addr = ep.connect_addr();
        let failed = |reason: &'static str, error: String| {
            in_flight.fail();
            s.metrics.reject_tcp(DIRECTION, reason);
            warn!(peer = %addr, identity = %peer.identity, %error, "opaque stream to peer proxy refused");
        };
        let cfg = match tls::client_config(
            creds,
            peer.identity.clone(),
            tls::ALPN_OPAQUE,
            s.metrics.tls_identity_mismatches.clone(),
        ) {
            Ok(c) => c,
            Err(e) => return failed("tls", e.to_string()),
        };
        let tcp = match crate::http::client::connect(addr, s.tcp.connect_timeout).await {
            Ok(t) => t,
            Err(e) => return failed("connect", e.to_string()),
        };
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let handshake = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp);
        let mut stream = match tokio::time::timeout(s.tcp.connect_timeout, handshake).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                s.metrics
                    .tls_handshake_failures
                    .get_or_create(&crate::telemetry::metrics::DirectionLabels {
                        direction: DIRECTION,
                    })
                    .inc();
                return failed("tls", tls::describe_handshake_error(&e));
            }
            Err(_) => return failed("tls", "handshake timed out".into()),
        };
        // Flushed at once: a server-speaks-first app waits on it.
        let preamble = ep.addr.port().to_be_bytes();
        if let Err(e) = async {
            stream.write_all(&preamble).await?;
            stream.flush().await
        }
        .await
        {
            return failed("connect", e.to_string());
        }
        in_flight.observe();
        crate::tcp::splice(io, stream, &addr, &s.tcp, &s.metrics, DIRECTION).await
    }
}
