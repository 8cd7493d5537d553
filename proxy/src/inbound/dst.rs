//! Which port of the app an inbound request is for: the redirected connection's
//! original port, or the `strait-target-port` a peer proxy sent with the request.

use http::{HeaderValue, Request, Version, header};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::addr::{DestAddr, OwnAddrs, TargetPort};
use crate::defaults::{self, ORIG_PROTO_HEADER, TARGET_PORT_HEADER};
use crate::http::client::PoolPerCaller;
use crate::http::dst::ChooseDst;
use crate::http::error::ProxyError;

/// The app in this pod, on its port.
pub fn app_addr(ip: IpAddr, p: TargetPort) -> DestAddr {
    DestAddr::Socket(SocketAddr::new(ip, p.0))
}

/// Which target ports a connection may ask for.
#[derive(Clone, Debug)]
pub struct TargetRules {
    /// This proxy's listeners (inbound, outbound, admin, upstream): their ports are
    /// never a target, or a caller could reach the admin server's `/shutdown` as
    /// "loopback", or use the outbound listener as an open proxy with this pod's
    /// identity.
    pub own: OwnAddrs,
    /// Whether a target port carried by the client (`strait-target-port`) is
    /// believed over the one the connection was redirected to (who may carry one
    /// is decided where the connection is accepted).
    pub trust_carried: bool,
}

impl TargetRules {
    /// Refuses this proxy's own ports, and the mesh's well-known proxy ports:
    /// where several proxies share a host (the demo, a node's host network), a
    /// request must not reach another proxy's admin server as "loopback".
    pub fn check(&self, port: TargetPort) -> Result<TargetPort, ProxyError> {
        if self.own.has_port(port.0) {
            return Err(ProxyError::Loop(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                port.0,
            ))));
        }
        if defaults::MESH_PORTS.contains(&port.0) {
            return Err(ProxyError::MeshPort(port.0));
        }
        Ok(port)
    }
}

/// A `strait-target-port` value: one header, decimal digits only (no sign, no
/// spaces), 1 to 65535.
fn carried_port(values: http::header::GetAll<'_, HeaderValue>) -> Result<TargetPort, ProxyError> {
    let bad = ProxyError::BadRequest("invalid strait-target-port header");
    let mut it = values.iter();
    let (Some(v), None) = (it.next(), it.next()) else {
        return Err(ProxyError::BadRequest(
            "more than one strait-target-port header",
        ));
    };
    let b = v.as_bytes();
    if b.is_empty() || b.len() > 5 || !b.iter().all(u8::is_ascii_digit) {
        return Err(bad);
    }
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .map(TargetPort)
        .ok_or(bad)
}

#[derive(Clone, Debug)]
pub struct InboundDst {
    redirected: Option<TargetPort>,
    rules: TargetRules,
    app_ip: IpAddr,
    /// The caller's address, for its own connections to an HTTP/2 app.
    caller: Option<PoolPerCaller>,
}

impl InboundDst {
    pub fn new(redirected: Option<TargetPort>, rules: TargetRules, app_ip: IpAddr) -> Self {
        Self {
            redirected,
            rules,
            app_ip,
            caller: None,
        }
    }

    /// Requests of the caller at `ip` go to an HTTP/2 app over connections
    /// of their own (`PoolPerCaller`).
    pub fn for_caller(self, ip: IpAddr) -> Self {
        Self {
            caller: Some(PoolPerCaller(ip)),
            ..self
        }
    }
}

impl ChooseDst for InboundDst {
    fn choose<B>(&self, req: &mut Request<B>) -> Result<DestAddr, ProxyError> {
        let port = self.target(req)?;
        restore_version(req, self.rules.trust_carried)?;
        if let Some(caller) = self.caller
            && req.version() == Version::HTTP_2
        {
            req.extensions_mut().insert(caller);
        }
        Ok(app_addr(self.app_ip, port))
    }
}

/// A peer proxy carried an HTTP/1 request over HTTP/2: give the app HTTP/1 back,
/// with the Host header HTTP/1.1 requires. From anyone else, or on HTTP/1
/// itself, the header is dropped rather than obeyed: it would turn a chunked
/// request into an HTTP/1.0 head without its body.
fn restore_version<B>(req: &mut Request<B>, from_peer: bool) -> Result<(), ProxyError> {
    let Some(v) = req.headers_mut().remove(ORIG_PROTO_HEADER) else {
        return Ok(());
    };
    if !from_peer || req.version() != Version::HTTP_2 {
        return Ok(());
    }
    let version = match v.as_bytes() {
        b"HTTP/1.1" => Version::HTTP_11,
        b"HTTP/1.0" => Version::HTTP_10,
        _ => return Err(ProxyError::BadRequest("invalid strait-orig-proto header")),
    };
    // Host and port only: user info (`user:password@`) never reaches the
    // app as its Host.
    if !req.headers().contains_key(header::HOST)
        && let Some(a) = req.uri().authority()
        && let Ok(h) = HeaderValue::from_str(&crate::http::host_port(a))
    {
        req.headers_mut().insert(header::HOST, h);
    }
    *req.version_mut() = version;
    Ok(())
}

impl InboundDst {
    fn target<B>(&self, req: &mut Request<B>) -> Result<TargetPort, ProxyError> {
        let carried = if !req.headers().contains_key(TARGET_PORT_HEADER) {
            None
        } else if self.rules.trust_carried {
            let p = carried_port(req.headers().get_all(TARGET_PORT_HEADER))?;
            req.headers_mut().remove(TARGET_PORT_HEADER);
            Some(p)
        } else {
            req.headers_mut().remove(TARGET_PORT_HEADER);
            None
        };
        let port = carried.or(self.redirected).ok_or(ProxyError::BadRequest(
            "no target port: not redirected and no strait-target-port header from a peer proxy",
        ))?;
        self.rules.check(port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(trust_carried: bool) -> TargetRules {
        TargetRules {
            own: OwnAddrs::new(
                [4143, 4140, 4191].map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p))),
            ),
            trust_carried,
        }
    }

    #[test]
    fn carried_port_wins_and_is_removed() {
        let l = InboundDst::new(
            Some(TargetPort(80)),
            rules(true),
            Ipv4Addr::LOCALHOST.into(),
        );
        let mut r = Request::builder()
            .header(TARGET_PORT_HEADER, "8080")
            .body(())
            .unwrap();
        assert_eq!(l.target(&mut r).unwrap(), TargetPort(8080));
        assert!(r.headers().get(TARGET_PORT_HEADER).is_none());
        let mut r = Request::builder().body(()).unwrap();
        assert_eq!(l.target(&mut r).unwrap(), TargetPort(80));
    }

    #[test]
    fn only_a_peer_over_http2_restores_http1() {
        let request = |version| {
            Request::builder()
                .version(version)
                .uri("http://web:8080/")
                .header(ORIG_PROTO_HEADER, "HTTP/1.0")
                .body(())
                .unwrap()
        };
        let choose = |trusted: bool, version| {
            let l = InboundDst::new(
                Some(TargetPort(80)),
                rules(trusted),
                Ipv4Addr::LOCALHOST.into(),
            );
            let mut r = request(version);
            l.choose(&mut r).unwrap();
            assert!(!r.headers().contains_key(ORIG_PROTO_HEADER));
            r.version()
        };
        assert_eq!(choose(true, Version::HTTP_2), Version::HTTP_10);
        assert_eq!(
            choose(false, Version::HTTP_2),
            Version::HTTP_2,
            "not a peer"
        );
        assert_eq!(
            choose(true, Version::HTTP_11),
            Version::HTTP_11,
            "a chunked HTTP/1.1 request stays HTTP/1.1"
        );
        // The Host made from `:authority` carries no user info.
        let l = InboundDst::new(
            Some(TargetPort(80)),
            rules(true),
            Ipv4Addr::LOCALHOST.into(),
        );
        let mut r = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://user:secret@web:8080/")
            .header(ORIG_PROTO_HEADER, "HTTP/1.1")
            .body(())
            .unwrap();
        l.choose(&mut r).unwrap();
        assert_eq!(r.headers()[http::header::HOST], "web:8080");
    }

    #[test]
    fn missing_bad_or_looping_ports_are_refused() {
        let l = InboundDst::new(None, rules(true), Ipv4Addr::LOCALHOST.into());
        let mut r = Request::builder().body(()).unwrap();
        assert!(matches!(l.target(&mut r), Err(ProxyError::BadRequest(_))));
        let mut r = Request::builder()
            .header(TARGET_PORT_HEADER, "x")
            .body(())
            .unwrap();
        assert!(matches!(l.target(&mut r), Err(ProxyError::BadRequest(_))));
        let mut r = Request::builder()
            .header(TARGET_PORT_HEADER, "4143")
            .body(())
            .unwrap();
        assert!(matches!(l.target(&mut r), Err(ProxyError::Loop(_))));
    }

    #[test]
    fn signed_spaced_or_repeated_ports_are_refused_and_mesh_ports_too() {
        let l = InboundDst::new(None, rules(true), Ipv4Addr::LOCALHOST.into());
        for bad in ["+18080", "-1", " 8080", "0", "65536", "8080 ", "0x50", ""] {
            let mut r = Request::builder()
                .header(TARGET_PORT_HEADER, bad)
                .body(())
                .unwrap();
            assert!(
                matches!(l.target(&mut r), Err(ProxyError::BadRequest(_))),
                "{bad:?}"
            );
        }
        let mut r = Request::builder()
            .header(TARGET_PORT_HEADER, "8080")
            .header(TARGET_PORT_HEADER, "8081")
            .body(())
            .unwrap();
        assert!(matches!(l.target(&mut r), Err(ProxyError::BadRequest(_))));
        // Another proxy's ports on a shared host (ours are 4143/4140/4191 here,
        // so take a proxy whose own differ).
        let other = TargetRules {
            own: OwnAddrs::new([SocketAddr::from((Ipv4Addr::LOCALHOST, 5000))]),
            trust_carried: true,
        };
        let l = InboundDst::new(None, other, Ipv4Addr::LOCALHOST.into());
        for port in ["4191", "4140", "4143"] {
            let mut r = Request::builder()
                .header(TARGET_PORT_HEADER, port)
                .body(())
                .unwrap();
            assert!(
                matches!(l.target(&mut r), Err(ProxyError::MeshPort(_))),
                "{port}"
            );
        }
    }

    #[test]
    fn the_proxys_own_ports_are_never_a_target() {
        for port in ["4191", "4140"] {
            let l = InboundDst::new(None, rules(true), Ipv4Addr::LOCALHOST.into());
            let mut r = Request::builder()
                .header(TARGET_PORT_HEADER, port)
                .body(())
                .unwrap();
            assert!(
                matches!(l.target(&mut r), Err(ProxyError::Loop(_))),
                "{port}"
            );
        }
        let l = InboundDst::new(
            Some(TargetPort(4191)),
            rules(false),
            Ipv4Addr::LOCALHOST.into(),
        );
        let mut r = Request::builder().body(()).unwrap();
        assert!(matches!(l.target(&mut r), Err(ProxyError::Loop(_))));
    }

    #[test]
    fn a_redirected_plaintext_client_cannot_choose_its_port() {
        let l = InboundDst::new(
            Some(TargetPort(80)),
            rules(false),
            Ipv4Addr::LOCALHOST.into(),
        );
        let mut r = Request::builder()
            .header(TARGET_PORT_HEADER, "6379")
            .body(())
            .unwrap();
        assert_eq!(l.target(&mut r).unwrap(), TargetPort(80));
        assert!(r.headers().get(TARGET_PORT_HEADER).is_none());
        let l = InboundDst::new(None, rules(false), Ipv4Addr::LOCALHOST.into());
        let mut r = Request::builder()
            .header(TARGET_PORT_HEADER, "8080")
            .body(())
            .unwrap();
        assert!(matches!(l.target(&mut r), Err(ProxyError::BadRequest(_))));
    }
}
