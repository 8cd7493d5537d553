//! Where an outbound request goes: the connection's destination when it has one
//! (redirected, or an `--upstream` listener), else the request's authority (HTTP
//! sent straight to the outbound port).

use http::{Request, header};

use crate::addr::{DestAddr, OwnAddrs};
use crate::http::dst::ChooseDst;
use crate::http::error::ProxyError;

#[derive(Clone, Debug)]
pub struct OutboundDst {
    fixed: Option<DestAddr>,
    own: OwnAddrs,
}

impl OutboundDst {
    pub fn new(fixed: Option<DestAddr>, own: OwnAddrs) -> Self {
        Self { fixed, own }
    }
}

impl ChooseDst for OutboundDst {
    fn choose<B>(&self, req: &mut Request<B>) -> Result<DestAddr, ProxyError> {
        let dst = match &self.fixed {
            Some(d) => {
                name_the_host(req, d);
                d.clone()
            }
            None => authority_dst(req)?,
        };
        if let DestAddr::Socket(a) = dst
            && self.own.contains(a)
        {
            return Err(ProxyError::Loop(a));
        }
        Ok(dst)
    }
}

/// A request that names no host (HTTP/1.0 without `Host`) names the address
/// its connection was made to: between the proxies it must name one, and the
/// app would otherwise be told the peer proxy's own address and port.
fn name_the_host<B>(req: &mut Request<B>, dst: &DestAddr) {
    if req.uri().authority().is_none()
        && !req.headers().contains_key(header::HOST)
        && let Ok(host) = http::HeaderValue::from_str(&dst.to_string())
    {
        req.headers_mut().insert(header::HOST, host);
    }
}

fn authority_dst<B>(req: &Request<B>) -> Result<DestAddr, ProxyError> {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str().to_string(),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or(ProxyError::BadRequest(
                "no Host header and no original destination",
            ))?
            .to_string(),
    };
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority
    } else if authority.starts_with('[') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority
    };
    with_port
        .parse()
        .map_err(|_| ProxyError::BadRequest("invalid Host header"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str) -> Request<()> {
        Request::builder()
            .uri("/")
            .header("host", host)
            .body(())
            .unwrap()
    }

    /// HTTP/1.0 without `Host`: the address the app's connection was made
    /// to, as HTTP/1.1's `Host` would name it; a `Host` given is kept.
    #[test]
    fn a_request_naming_no_host_names_its_connection_s_destination() {
        let fixed: DestAddr = "10.96.0.20:80".parse().unwrap();
        let l = OutboundDst::new(Some(fixed), OwnAddrs::new([]));
        let mut bare = Request::get("/")
            .version(http::Version::HTTP_10)
            .body(())
            .unwrap();
        l.choose(&mut bare).unwrap();
        assert_eq!(bare.headers()[header::HOST], "10.96.0.20:80");
        let mut named = req("web.shop");
        l.choose(&mut named).unwrap();
        assert_eq!(named.headers()[header::HOST], "web.shop");
    }

    #[test]
    fn host_header_gives_the_destination() {
        let l = OutboundDst::new(None, OwnAddrs::new(["127.0.0.1:4140".parse().unwrap()]));
        assert_eq!(
            l.choose(&mut req("web.default:8080")).unwrap().to_string(),
            "web.default:8080"
        );
        assert_eq!(
            l.choose(&mut req("example")).unwrap().to_string(),
            "example:80"
        );
        assert_eq!(
            l.choose(&mut req("127.0.0.1:9")).unwrap().to_string(),
            "127.0.0.1:9"
        );
        assert!(matches!(
            l.choose(&mut req("127.0.0.1:4140")),
            Err(ProxyError::Loop(_))
        ));
        assert!(matches!(
            l.choose(&mut req("bad host")),
            Err(ProxyError::BadRequest(_))
        ));
    }
}
