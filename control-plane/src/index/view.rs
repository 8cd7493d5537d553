//! What a proxy sees of one destination: computed from a snapshot, once per change
//! for every proxy watching it.

use std::net::SocketAddr;

use strait_api::v1 as api;

use super::{ObjKey, Snapshot};
use crate::defaults;

/// A destination as a proxy names it, normalised so that every spelling of the same
/// Service shares one view.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestKey {
    Service {
        svc: ObjKey,
        port: u16,
    },
    ClusterIp(SocketAddr),
    /// A name that is not a cluster Service name: never meshed.
    External(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseDestError {
    #[error("destination {0:?} is not HOST:PORT")]
    NoPort(String),
}

impl DestKey {
    /// Parses `svc.ns.svc.cluster.local:port`, the short forms `svc:port`,
    /// `svc.ns:port`, `svc.ns.svc:port` (resolved against `namespace`), or
    /// `cluster-ip:port`.
    pub fn parse(dest: &str, namespace: &str) -> Result<DestKey, ParseDestError> {
        let no_port = || ParseDestError::NoPort(dest.to_string());
        if let Ok(sa) = dest.parse::<SocketAddr>() {
            return Ok(DestKey::ClusterIp(sa));
        }
        let (host, port) = dest.rsplit_once(':').ok_or_else(no_port)?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(no_port)?;
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let labels: Vec<&str> = host.split('.').collect();
        let domain: Vec<&str> = defaults::CLUSTER_DOMAIN.split('.').collect();
        let (name, ns) = match labels.as_slice() {
            [svc] => (*svc, namespace),
            [svc, ns] => (*svc, *ns),
            [svc, ns, "svc"] => (*svc, *ns),
            [svc, ns, "svc", rest @ ..] if rest == domain.as_slice() => (*svc, *ns),
            _ => return Ok(DestKey::External(format!("{host}:{port}"))),
        };
        if name.is_empty() || ns.is_empty() {
            return Ok(DestKey::External(format!("{host}:{port}")));
        }
        Ok(DestKey::Service {
            svc: ObjKey {
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            port,
        })
    }
}

pub fn not_meshed() -> api::DestinationUpdate {
    api::DestinationUpdate {
        kind: Some(api::destination_update::Kind::NotMeshed(api::NotMeshed {})),
    }
}

/// The view of `key` in `snap`. Only ready endpoints are included, in a stable order
/// so that equal views compare equal.
pub fn view(snap: &Snapshot, key: &DestKey) -> api::DestinationUpdate {
    let (svc, port) = match key {
        DestKey::Service { svc, port } => (svc.clone(), *port),
        DestKey::ClusterIp(sa) => match snap.by_cluster_ip.get(&sa.ip()) {
            Some(svc) => (svc.clone(), sa.port()),
            None => return not_meshed(),
        },
        DestKey::External(_) => return not_meshed(),
    };
    let Some(info) = snap.services.get(&svc) else {
        return not_meshed();
    };
    let Some(sp) = info.ports.iter().find(|p| p.port == port) else {
        return not_meshed();
    };
    let port_name = sp.name.clone().unwrap_or_default();
    let mut endpoints = Vec::new();
    for slice in snap.slices.get(&svc).into_iter().flat_map(|s| s.values()) {
        let Some((_, target)) = slice.ports.iter().find(|(n, _)| *n == port_name) else {
            continue;
        };
        for e in slice.endpoints.iter().filter(|e| e.ready) {
            let pod = e
                .pod
                .as_ref()
                .and_then(|k| snap.pods.get(k).map(|p| (k, p)));
            let (proxy_port, identity, labels) = match pod {
                Some((k, p)) if p.inbound_port.is_some() => (
                    u32::from(p.inbound_port.unwrap_or(defaults::DEFAULT_INBOUND_PORT)),
                    Some(api::WorkloadIdentity {
                        spiffe_id: format!(
                            "spiffe://{}/ns/{}/sa/{}",
                            snap.trust_domain, k.namespace, p.service_account
                        ),
                    }),
                    p.labels.clone().into_iter().collect(),
                ),
                Some((_, p)) => (0, None, p.labels.clone().into_iter().collect()),
                None => (0, None, Default::default()),
            };
            endpoints.push(api::Endpoint {
                addr: Some(api::SocketAddress {
                    addr: SocketAddr::new(e.addr, *target).to_string(),
                }),
                proxy_port,
                identity,
                weight: 1,
                zone: e.zone.clone().unwrap_or_default(),
                labels,
            });
        }
    }
    endpoints.sort_by(|a, b| {
        a.addr
            .as_ref()
            .map(|x| &x.addr)
            .cmp(&b.addr.as_ref().map(|x| &x.addr))
    });
    endpoints.dedup_by(|a, b| a.addr == b.addr);
    let name = format!(
        "{}.{}.svc.{}:{}",
        svc.name,
        svc.namespace,
        defaults::CLUSTER_DOMAIN,
        port
    );
    api::DestinationUpdate {
        kind: Some(api::destination_update::Kind::Service(api::Service {
            name: name.clone(),
            version: snap.version,
            backends: vec![api::Backend { name, endpoints }],
            routes: Vec::new(),
            policy: None,
            opaque: false,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, port: u16) -> DestKey {
        DestKey::Service {
            svc: ObjKey {
                namespace: ns.into(),
                name: name.into(),
            },
            port,
        }
    }

    #[test]
    fn every_spelling_of_a_service_is_one_key() {
        for d in [
            "web:80",
            "web.shop:80",
            "web.shop.svc:80",
            "web.shop.svc.cluster.local:80",
            "WEB.shop.svc.cluster.local.:80",
        ] {
            assert_eq!(
                DestKey::parse(d, "shop").unwrap(),
                svc("shop", "web", 80),
                "{d}"
            );
        }
        assert_eq!(
            DestKey::parse("web:80", "other").unwrap(),
            svc("other", "web", 80)
        );
        assert_eq!(
            DestKey::parse("10.96.0.10:53", "x").unwrap(),
            DestKey::ClusterIp("10.96.0.10:53".parse().unwrap())
        );
        assert_eq!(
            DestKey::parse("api.example.com:443", "x").unwrap(),
            DestKey::External("api.example.com:443".into())
        );
        assert!(DestKey::parse("web", "x").is_err());
        assert!(DestKey::parse("web:http", "x").is_err());
    }
}
