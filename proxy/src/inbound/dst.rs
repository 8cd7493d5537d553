//! Which port of the app an inbound request is for: the redirected connection's
//! original port, or the `strait-target-port` a peer proxy sent with the request.

use http::Request;
use std::net::{Ipv4Addr, SocketAddr};

use crate::addr::{DestAddr, TargetPort};
use crate::defaults::TARGET_PORT_HEADER;
use crate::http::dst::ChooseDst;
use crate::http::error::ProxyError;

/// The app listens on loopback in its own pod.
pub fn app_addr(p: TargetPort) -> DestAddr {
    DestAddr::Socket(SocketAddr::from((Ipv4Addr::LOCALHOST, p.0)))
}

#[derive(Clone, Debug)]
pub struct InboundDst {
    redirected: Option<TargetPort>,
    /// The inbound listener's own port, never a valid target.
    own_port: u16,
}

impl InboundDst {
    pub fn new(redirected: Option<TargetPort>, own_port: u16) -> Self {
        Self {
            redirected,
            own_port,
        }
    }
}

impl ChooseDst for InboundDst {
    fn choose<B>(&self, req: &mut Request<B>) -> Result<DestAddr, ProxyError> {
        self.target(req).map(app_addr)
    }
}

impl InboundDst {
    fn target<B>(&self, req: &mut Request<B>) -> Result<TargetPort, ProxyError> {
        let carried = match req.headers_mut().remove(TARGET_PORT_HEADER) {
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
            "no target port: not redirected and no strait-target-port header",
        ))?;
        if port.0 == self.own_port {
            return Err(ProxyError::Loop(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                port.0,
            ))));
        }
        Ok(port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carried_port_wins_and_is_removed() {
        let l = InboundDst::new(Some(TargetPort(80)), 4143);
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
        let l = InboundDst::new(None, 4143);
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
}
