//! The inbound path: connections to this pod. Learn the target port (from the
//! redirect, or carried by the peer proxy), detect the protocol, and forward to
//! the app on 127.0.0.1:<target port>.

mod dst;

use std::sync::Arc;

use tracing::warn;

use crate::addr::TargetPort;
use crate::detect::Protocol;
use crate::http::dst::SetDstLayer;
use crate::http::server::ConnMeta;
use crate::http::stack::HttpStack;
use crate::proxy::Shared;
use crate::telemetry::Direction;
use crate::transport::Accepted;
use crate::transport::orig_dst::orig_dst;

const DIRECTION: Direction = Direction::Inbound;

#[derive(Clone, Debug)]
pub struct Inbound {
    shared: Arc<Shared>,
    http: HttpStack,
}

impl Inbound {
    pub fn new(shared: Arc<Shared>) -> Self {
        Inbound {
            http: HttpStack::new(shared.clone(), DIRECTION),
            shared,
        }
    }

    pub async fn handle(self, acc: Accepted) {
        let s = &self.shared;
        let target = orig_dst(&acc.stream, acc.local).map(|o| TargetPort(o.0.port()));
        let opaque = target.is_some_and(|p| s.config.opaque_ports.contains(p.0));
        let Some((protocol, io)) = s.detect(acc.stream, opaque, DIRECTION, acc.client).await else {
            return;
        };
        let meta = ConnMeta {
            direction: DIRECTION,
            client: acc.client,
            metrics: s.metrics.clone(),
        };
        let dst_layer = SetDstLayer(dst::InboundDst::new(
            target,
            acc.local.port(),
            s.config.app_ip,
        ));
        match protocol {
            Protocol::Opaque => match target {
                Some(p) => {
                    crate::tcp::forward(
                        io,
                        &dst::app_addr(s.config.app_ip, p),
                        &s.tcp,
                        &s.metrics,
                        DIRECTION,
                    )
                    .await
                }
                None => {
                    s.metrics.reject_tcp(DIRECTION, "no_target_port");
                    warn!(client = %acc.client.0, "non-HTTP connection that was not redirected carries no target port, closed");
                }
            },
            Protocol::Http1 => self.http.serve(io, false, dst_layer, &meta).await,
            Protocol::Http2 => self.http.serve(io, true, dst_layer, &meta).await,
        }
    }
}
