//! The outbound path: the app's own connections. Learn where the app meant to go,
//! detect the protocol, and forward (until discovery: pass through untouched).

mod dst;

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::warn;

use crate::addr::DestAddr;
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
        let dst_layer = SetDstLayer(dst::OutboundDst::new(dst.clone(), self.own_addrs.clone()));
        match protocol {
            Protocol::Opaque => match dst {
                Some(d) => crate::tcp::forward(io, &d, &s.tcp, &s.metrics, DIRECTION).await,
                None => {
                    s.metrics.reject_tcp(DIRECTION, "no_destination");
                    warn!(client = %acc.client.0, "non-HTTP connection with no original destination, closed");
                }
            },
            Protocol::Http1 => self.http.serve(io, false, dst_layer, &meta).await,
            Protocol::Http2 => self.http.serve(io, true, dst_layer, &meta).await,
        }
    }
}
