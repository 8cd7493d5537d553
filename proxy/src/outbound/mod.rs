//! The outbound path: the app's own connections. Learn where the app meant to go,
//! ask discovery what that is (an opaque port skips protocol detection), detect
//! the protocol, and send HTTP along its route (`http`) or carry opaque TCP to a
//! balanced endpoint (`opaque`); a client that says nothing at first is settled
//! by whoever speaks first (`silent`). Not meshed: pass through untouched.

pub mod backend;
mod dst;
pub mod http;
pub mod logical;
mod opaque;
pub mod route;
mod silent;

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
use crate::proxy::{Detection, Shared};
use crate::telemetry::Direction;
use crate::transport::orig_dst::orig_dst;
use crate::transport::{Accepted, PrefixedIo};

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

    /// Handles one connection; `fixed` is the destination of an `--upstream`
    /// listener. Its future is what an idle connection costs, so `self` is shared
    /// rather than copied into it, and the rare server-speaks-first path, the
    /// largest by far, is boxed.
    pub async fn handle(self: Arc<Self>, acc: Accepted, fixed: Option<DestAddr>) {
        let s = &self.shared;
        let dst = fixed.or_else(|| orig_dst(&acc.stream).map(|o| DestAddr::Socket(o.0)));
        let resolved = match &dst {
            Some(d) => self.resolve(d).await,
            None => None,
        };
        // The Service's word first (its appProtocol, a BackendPolicy's
        // opaquePorts), then this proxy's own list.
        let opaque = match &resolved {
            Some(Resolved {
                resolution: Resolution::Service(v),
                ..
            }) if v.opaque || v.http => v.opaque,
            _ => dst
                .as_ref()
                .is_some_and(|d| s.config.opaque_ports.contains(d.port())),
        };
        let detected = s.detect_or_silence(acc.stream, opaque, DIRECTION, acc.client);
        let (protocol, io) = match (detected.await, &dst) {
            (None, _) => return,
            (Some(Detection::Known(protocol, io)), _) => (protocol, io),
            (Some(Detection::Silent(stream)), Some(d)) => {
                let settled = crate::boxed::pin(|| {
                    silent::settle(
                        s,
                        &self.build,
                        stream,
                        d.clone(),
                        resolved.clone(),
                        acc.client,
                    )
                });
                match settled.await {
                    Some(http) => http,
                    None => return,
                }
            }
            (Some(Detection::Silent(stream)), None) => {
                let spoke = crate::boxed::pin(|| words_for_http(s, stream, acc.client));
                match spoke.await {
                    Some(http) => http,
                    None => return,
                }
            }
        };
        let meta = ConnMeta {
            direction: DIRECTION,
            client: acc.client,
            metrics: s.metrics.clone(),
            peer: None,
            caller: None,
            until: None,
            caller_share: false,
            one_destination: dst.is_some(),
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
                    strait_otel::sampled!(warn, client = %acc.client.0, "non-HTTP connection with no original destination, closed");
                }
            },
            // Each request resolves its destination afresh: the answer had
            // for detection is let go, not held (with its stages and
            // endpoints) for as long as the connection lives.
            Protocol::Http1 => {
                drop(resolved);
                self.http.serve(io, false, layers, &meta).await
            }
            Protocol::Http2 => {
                drop(resolved);
                self.http.serve(io, true, layers, &meta).await
            }
        }
    }
}

/// A client silent past detection on a connection made to this port itself
/// (HTTP naming its `Host`): one that opens connections ahead of use speaks
/// later. With nowhere else to go it has as long as an idle HTTP connection
/// has, and then is detected; silent that long, or gone, it is closed.
async fn words_for_http(
    s: &Shared,
    mut stream: tokio::net::TcpStream,
    client: crate::addr::ClientAddr,
) -> Option<(Protocol, PrefixedIo<tokio::net::TcpStream>)> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = bytes::BytesMut::with_capacity(1024);
    let read = tokio::time::timeout(s.config.http_idle_timeout, stream.read_buf(&mut buf));
    match read.await {
        Ok(Ok(n)) if n > 0 => s.detect_more(stream, buf, DIRECTION, client).await,
        // Gone without a word (a port check): nothing was refused.
        Ok(Ok(_)) => None,
        _ => {
            s.count_detected(DIRECTION, Protocol::Opaque);
            s.metrics.reject_tcp(DIRECTION, "no_destination");
            None
        }
    }
}
