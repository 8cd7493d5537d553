//! What discovery says of a destination, parsed from the wire once.

use std::net::SocketAddr;
use std::sync::Arc;

use strait_api::v1 as api;
use tracing::warn;

use crate::identity::Identity;

#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    /// Not a meshed Service: pass the traffic through untouched.
    NotMeshed,
    Service(Arc<ServiceView>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceView {
    pub name: String,
    pub version: u64,
    pub endpoints: Vec<Endpoint>,
    pub opaque: bool,
}

/// The peer proxy in front of a meshed endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerProxy {
    pub port: u16,
    pub identity: Identity,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The workload's own address (pod IP and target port).
    pub addr: SocketAddr,
    pub proxy: Option<PeerProxy>,
    pub zone: String,
}

impl Endpoint {
    /// Where the client proxy connects: the peer proxy's inbound port when meshed.
    pub fn connect_addr(&self) -> SocketAddr {
        match &self.proxy {
            Some(p) => SocketAddr::new(self.addr.ip(), p.port),
            None => self.addr,
        }
    }
}

/// Parses an update; endpoints that do not parse are dropped with a log line (the
/// control plane should never send them; a proxy must not trust that).
pub fn parse(update: api::DestinationUpdate) -> Resolution {
    let svc = match update.kind {
        Some(api::destination_update::Kind::Service(s)) => s,
        _ => return Resolution::NotMeshed,
    };
    let mut endpoints = Vec::new();
    for b in svc.backends {
        for e in b.endpoints {
            let addr = match e.addr.as_ref().map(|a| a.addr.parse::<SocketAddr>()) {
                Some(Ok(a)) => a,
                _ => {
                    warn!(service = %svc.name, addr = ?e.addr, "discovery sent an endpoint without a valid address; ignored");
                    continue;
                }
            };
            let proxy = if e.proxy_port == 0 {
                None
            } else {
                let port = u16::try_from(e.proxy_port).ok();
                let identity = e.identity.as_ref().map(|i| i.spiffe_id.parse::<Identity>());
                match (port, identity) {
                    (Some(port), Some(Ok(identity))) => Some(PeerProxy { port, identity }),
                    _ => {
                        warn!(service = %svc.name, %addr, "discovery sent a meshed endpoint without a valid proxy port and identity; ignored");
                        continue;
                    }
                }
            };
            endpoints.push(Endpoint {
                addr,
                proxy,
                zone: e.zone,
            });
        }
    }
    Resolution::Service(Arc::new(ServiceView {
        name: svc.name,
        version: svc.version,
        endpoints,
        opaque: svc.opaque,
    }))
}
