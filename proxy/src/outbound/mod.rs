//! The outbound path: the app's own connections. Learn where the app meant to go,
//! detect the protocol, and forward (until discovery: pass through untouched).

mod discover;
mod dst;

use std::net::SocketAddr;
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
use crate::proxy::Shared;
use crate::telemetry::Direction;
use crate::transport::Accepted;
use crate::transport::orig_dst::orig_dst;

const DIRECTION: Direction = Direction::Outbound;

#[derive(Clone, Debug)]
pub struct Outbound {
    shared: Arc<Shared>,
    http: HttpStack,
    /// Our own listeners: a request addressed to one of them would loop.
    own_addrs: Arc<Vec<SocketAddr>>,
}

impl Outbound {
    pub fn new(shared: Arc<Shared>, own_addrs: Vec<SocketAddr>) -> Self {
        Outbound {
            http: HttpStack::new(shared.clone(), DIRECTION),
            shared,
            own_addrs: Arc::new(own_addrs),
        }
    }

    /// Handles one connection. `fixed` is the destination of an `--upstream` listener.
    pub async fn handle(self, acc: Accepted, fixed: Option<DestAddr>) {
        let s = &self.shared;
        let dst = fixed.or_else(|| orig_dst(&acc.stream, acc.local).map(|o| DestAddr::Socket(o.0)));
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
            SetDstLayer(dst::OutboundDst::new(dst.clone(), self.own_addrs.clone())),
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

    /// Opaque TCP: to a balanced endpoint of a meshed Service, else as addressed.
    /// (Until streams are carried over mTLS, the endpoint is dialled directly.)
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
            let Some((ep, _in_flight)) = balancer.pick(&svc.endpoints) else {
                s.metrics.reject_tcp(DIRECTION, "no_endpoints");
                warn!(service = %svc.name, "no endpoints; opaque stream closed");
                return;
            };
            let to = DestAddr::Socket(ep.addr);
            return crate::tcp::forward(io, &to, &s.tcp, &s.metrics, DIRECTION).await;
        }
        crate::tcp::forward(io, &dst, &s.tcp, &s.metrics, DIRECTION).await
    }
}
