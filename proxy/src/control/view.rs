//! What discovery says of a destination, parsed from the wire once into the
//! types the outbound stack uses: backends with their endpoints and policy, and
//! the rules of the routes attached.

use std::net::SocketAddr;
use std::sync::Arc;

use strait_api::v1 as api;
use tracing::warn;

use crate::balance::BackendConfig;
use crate::identity::Identity;
use crate::outbound::route::{self, Rule};
use crate::retry::BudgetConfig;

#[derive(Clone, Debug)]
pub enum Resolution {
    /// Not a meshed Service: pass the traffic through untouched.
    NotMeshed,
    Service(Arc<ServiceView>),
}

#[derive(Debug)]
pub struct ServiceView {
    pub name: Arc<str>,
    /// This view's place among those received for its destination (later is
    /// higher), so a slow caller's older view never replaces a newer one.
    pub version: u64,
    /// The destination itself first: the default route's backend.
    pub backends: Vec<BackendView>,
    /// Every rule of every route attached, in the controller's order; empty:
    /// the default route.
    pub routes: Vec<Rule>,
    /// The retry budget of each of this Service's routes.
    pub budget: BudgetConfig,
    pub opaque: bool,
}

impl ServiceView {
    /// The backend of the default route (and of opaque streams).
    pub fn default_backend(&self) -> Option<&BackendView> {
        self.backends.first()
    }
}

#[derive(Debug)]
pub struct BackendView {
    pub name: Arc<str>,
    pub endpoints: Vec<Endpoint>,
    pub config: BackendConfig,
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

fn endpoints(service: &str, b: Vec<api::Endpoint>) -> Vec<Endpoint> {
    let mut out = Vec::with_capacity(b.len());
    for e in b {
        let addr = match e.addr.as_ref().map(|a| a.addr.parse::<SocketAddr>()) {
            Some(Ok(a)) => a,
            _ => {
                warn!(%service, addr = ?e.addr, "discovery sent an endpoint without a valid address; ignored");
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
                    warn!(%service, %addr, "discovery sent a meshed endpoint without a valid proxy port and identity; ignored");
                    continue;
                }
            }
        };
        out.push(Endpoint {
            addr,
            proxy,
            zone: e.zone,
        });
    }
    out
}

/// Parses an update. Endpoints and routes that do not parse are dropped with a
/// log line (the control plane should never send them; a proxy must not trust
/// that).
pub fn parse(update: api::DestinationUpdate) -> Resolution {
    let svc = match update.kind {
        Some(api::destination_update::Kind::Service(s)) => s,
        _ => return Resolution::NotMeshed,
    };
    let backends = svc
        .backends
        .into_iter()
        .map(|b| BackendView {
            endpoints: endpoints(&svc.name, b.endpoints),
            config: BackendConfig::parse(b.policy),
            name: b.name.into(),
        })
        .collect();
    let budget = BudgetConfig::parse(svc.policy.and_then(|p| p.retry_budget));
    Resolution::Service(Arc::new(ServiceView {
        routes: route::parse(&svc.name, svc.routes),
        name: svc.name.into(),
        version: svc.version,
        backends,
        budget,
        opaque: svc.opaque,
    }))
}
