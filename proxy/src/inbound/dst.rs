//! Which port of the app an inbound request is for: the redirected connection's
//! original port, or the `strait-target-port` a peer proxy sent with the request.

use http::{HeaderValue, Request, Version, header};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::addr::{DestAddr, OwnAddrs, TargetPort};
use crate::defaults::{ORIG_PROTO_HEADER, TARGET_PORT_HEADER};
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
    /// Refuses this proxy's own ports.
    pub fn check(&self, port: TargetPort) -> Result<TargetPort, ProxyError> {
        if self.own.has_port(port.0) {
            return Err(ProxyError::Loop(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                port.0,
            ))));
        }
        Ok(port)
    }
}

#[derive(Clone, Debug)]
pub struct InboundDst {
    redirected: Option<TargetPort>,
    rules: TargetRules,
    app_ip: IpAddr,
}

impl InboundDst {
    pub fn new(redirected: Option<TargetPort>, rules: TargetRules, app_ip: IpAddr) -> Self {
        Self {
            redirected,
            rules,
            app_ip,
        }
    }
}

impl ChooseDst for InboundDst {
    fn choose<B>(&self, req: &mut Request<B>) -> Result<DestAddr, ProxyError> {
        let port = self.target(req)?;
        restore_version(req)?;
        Ok(app_addr(self.app_ip, port))
    }
}

/// A peer proxy carried an HTTP/1 request over HTTP/2: give the app HTTP/1 back,
/// with the Host header HTTP/1.1 requires.
fn restore_version<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    let Some(v) = req.headers_mut().remove(ORIG_PROTO_HEADER) else {
        return Ok(());
    };
    let version = match v.as_bytes() {
        b"HTTP/1.1" => Version::HTTP_11,
        b"HTTP/1.0" => Version::HTTP_10,
        _ => return Err(ProxyError::BadRequest("invalid strait-orig-proto header")),
    };
    if !req.headers().contains_key(header::HOST)
        && let Some(a) = req.uri().authority()
        && let Ok(h) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, h);
    }
    *req.version_mut() = version;
    Ok(())
}

impl InboundDst {
    fn target<B>(&self, req: &mut Request<B>) -> Result<TargetPort, ProxyError> {
        let carried = match req.headers_mut().remove(TARGET_PORT_HEADER) {
            Some(_) if !self.rules.trust_carried => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
                    .filter(|p| *p != 0)
                    .map(TargetPort)
                    .ok_or(ProxyError::BadRequest("invalid strait-target-port header"))?,
            ),
            None => None,
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
