//! The outbound path: the app's own connections. Learn where the app meant to go,
//! ask discovery what that is (an opaque port skips protocol detection), detect
//! the protocol, and send HTTP along its route (`http`) or carry opaque TCP to a
//! balanced endpoint (`opaque`). Not meshed: pass through untouched.

pub mod backend;
mod dst;
pub mod http;
pub mod logical;
mod opaque;
pub mod route;

use std::sync::Arc;

use tower::layer::util::Stack;

use self::http::RouterLayer;
use self::logical::Builder;
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
    build: Builder,
}

impl Outbound {
    pub fn new(shared: Arc<Shared>) -> Self {
        let http = HttpStack::new(shared.clone(), DIRECTION);
        Outbound {
            build: Builder {
                forward: http.forward().clone(),
                metrics: shared.metrics.clone(),
                replay_limit: shared.config.max_replay_body_bytes,
            },
            http,
            shared,
        }
    }

    /// Discovery's answer for a connection's destination, waiting (boundedly)
    /// for the first one.
    async fn resolve(&self, dst: &DestAddr) -> Option<Resolved> {
        let d = self.shared.discovery.as_ref()?;
        d.resolve(dst, crate::defaults::DISCOVERY_FIRST_ANSWER_TIMEOUT)
            .await
    }

    /// Handles one connection. `fixed` is the destination of an `--upstream` listener.
    pub async fn handle(self, acc: Accepted, fixed: Option<DestAddr>) {
        let s = &self.shared;
        let dst = fixed.or_else(|| orig_dst(&acc.stream).map(|o| DestAddr::Socket(o.0)));
        let resolved = match &dst {
            Some(d) => self.resolve(d).await,
            None => None,
        };
        let opaque = dst
            .as_ref()
            .is_some_and(|d| s.config.opaque_ports.contains(d.port()))
            || matches!(&resolved, Some(Resolved { resolution: Resolution::Service(v), .. }) if v.opaque);
        let Some((protocol, io)) = s.detect(acc.stream, opaque, DIRECTION, acc.client).await else {
            return;
        };
        let meta = ConnMeta {
            direction: DIRECTION,
            client: acc.client,
            metrics: s.metrics.clone(),
            peer: None,
        };
        let layers = Stack::new(
            RouterLayer::new(s.discovery.clone(), self.build.clone()),
            SetDstLayer(dst::OutboundDst::new(dst.clone(), s.own.clone())),
        );
        match protocol {
            Protocol::Opaque => match dst {
                Some(d) => opaque::forward(&self.shared, &self.build, io, d, resolved).await,
                None => {
                    s.metrics.reject_tcp(DIRECTION, "no_destination");
                    crate::sampled!(warn, client = %acc.client.0, "non-HTTP connection with no original destination, closed");
                }
            },
            Protocol::Http1 => self.http.serve(io, false, layers, &meta).await,
            Protocol::Http2 => self.http.serve(io, true, layers, &meta).await,
        }
    }
}
