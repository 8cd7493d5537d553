//! HTTP/1.1 upgrades (WebSocket) and CONNECT: once both sides agree, the two
//! connections are spliced and bytes flow untouched in both directions.

use http::{Method, Request, Response, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::tcp::TcpConfig;
use crate::telemetry::{Direction, Metrics};

/// True for `CONNECT` and for HTTP/1.1 requests asking to switch protocols,
/// other than to h2c. An `Upgrade: h2c` request goes on as the HTTP/1.1
/// request it is, its `Upgrade` dropped with the other hop-by-hop fields (a
/// server may always decline). Switched, the connection would be a tunnel of
/// HTTP/2 requests the proxy never reads, each free to carry a forged
/// `strait-client-id` and none decided by the policy; and the proxies speak
/// HTTP/2 between them anyway. Nor is an `Upgrade` the proxy cannot read
/// (bytes outside ASCII, where protocol names are tokens): an `h2c` could
/// hide in it from this check, for a lenient server to switch on.
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    if req.version() >= http::Version::HTTP_2 {
        // HTTP/2 has no Upgrade; its CONNECT makes the stream a tunnel
        // (RFC 9113 §8.5). An extended CONNECT (`:protocol`, RFC 8441) is
        // never offered by the proxy's servers.
        return req.method() == Method::CONNECT
            && req.extensions().get::<hyper::ext::Protocol>().is_none();
    }
    req.method() == Method::CONNECT
        || (req.headers().contains_key(header::UPGRADE)
            && req
                .headers()
                .get_all(header::UPGRADE)
                .iter()
                .all(|v| v.to_str().is_ok())
            && tokens(req.headers(), header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"))
            && !tokens(req.headers(), header::UPGRADE).any(|t| t.eq_ignore_ascii_case("h2c")))
}

/// The comma-separated tokens of every `name` field.
fn tokens(h: &http::HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    h.get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// In an upgrade request's extensions when a layer above may later withdraw
/// what it allowed (inbound authorization): resolves when it does, and the
/// tunnel is then closed.
#[derive(Clone)]
pub struct Revocation(
    pub std::sync::Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>,
);

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Revocation")
    }
}

/// In an accepted upgrade's response, and held by its splice: what must live
/// as long as the tunnel (the balancer puts the endpoint's in-flight count
/// there, so a WebSocket counts as load on its endpoint while it is open, as
/// an opaque stream does). Dropped once both the splice and the response are.
#[derive(Clone, Default)]
pub struct TunnelHold(std::sync::Arc<std::sync::Mutex<Vec<Box<dyn Send>>>>);

impl TunnelHold {
    pub fn keep(&self, v: impl Send + 'static) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(v));
    }
}

impl std::fmt::Debug for TunnelHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TunnelHold")
    }
}

/// An app's answer to CONNECT that is no tunnel, though 2xx: a status other
/// than 200, or a framed body (RFC 9110 forbids `Content-Length` and
/// `Transfer-Encoding` there), as an HTTP server that took CONNECT for a
/// request answers (Go's with a catch-all handler). Spliced, the caller's
/// next bytes would reach that server as requests the proxy never read:
/// unauthorized, and carrying whatever `strait-client-id` the caller wrote.
pub fn not_a_tunnel<B>(rsp: &Response<B>) -> bool {
    rsp.status().is_success()
        && (rsp.status() != StatusCode::OK
            || rsp.headers().contains_key(header::CONTENT_LENGTH)
            || rsp.headers().contains_key(header::TRANSFER_ENCODING))
}

/// Whether the upstream accepted the upgrade or tunnel.
pub fn accepted<B>(is_connect: bool, rsp: &Response<B>) -> bool {
    if is_connect {
        rsp.status().is_success()
    } else {
        rsp.status() == StatusCode::SWITCHING_PROTOCOLS
    }
}

/// hyper's upgraded connection does not reach its socket: a failed upgraded
/// stream is closed, not reset.
impl crate::tcp::Abort for TokioIo<hyper::upgrade::Upgraded> {
    fn abort(&self) {}
}

/// Copies bytes both ways between the client's and the upstream's upgraded
/// connections until both sides close, or nothing moves for the opaque-stream
/// idle timeout (an upgraded connection is an opaque stream from here on).
pub async fn splice(
    client: OnUpgrade,
    upstream: OnUpgrade,
    addr: std::net::SocketAddr,
    cfg: &TcpConfig,
    metrics: &Metrics,
    direction: Direction,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    crate::tcp::splice(
        TokioIo::new(client),
        TokioIo::new(upstream),
        &addr,
        cfg,
        metrics,
        direction,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(upgrade: &str) -> Request<()> {
        Request::builder()
            .uri("/")
            .header(header::CONNECTION, "keep-alive, Upgrade, HTTP2-Settings")
            .header(header::UPGRADE, upgrade)
            .header("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA")
            .body(())
            .unwrap()
    }

    #[test]
    fn an_upgrade_to_h2c_goes_on_as_http_1_without_it() {
        assert!(is_upgrade_request(&req("websocket")));
        for h2c in ["h2c", "H2C", "foo/1, h2c"] {
            let mut r = req(h2c);
            let keep = is_upgrade_request(&r);
            assert!(!keep, "{h2c}");
            crate::http::normalize::strip_hop_by_hop(r.headers_mut(), keep);
            let h = r.headers();
            assert!(
                !h.contains_key(header::UPGRADE)
                    && !h.contains_key(header::CONNECTION)
                    && !h.contains_key("http2-settings"),
                "{h:?}"
            );
        }
    }

    /// A protocol name is a token: an `Upgrade` value with bytes outside
    /// ASCII names nothing the proxy can read, and may hide an `h2c` from
    /// the check above (an app's server that splits it leniently would
    /// switch). Not an upgrade: the field is dropped.
    #[test]
    fn an_upgrade_the_proxy_cannot_read_is_dropped() {
        for value in [&b"h2c, \xff"[..], b"\xe9, websocket"] {
            let mut r = req("websocket");
            r.headers_mut().insert(
                header::UPGRADE,
                header::HeaderValue::from_bytes(value).unwrap(),
            );
            let keep = is_upgrade_request(&r);
            assert!(!keep, "{value:?}");
            crate::http::normalize::strip_hop_by_hop(r.headers_mut(), keep);
            assert!(!r.headers().contains_key(header::UPGRADE), "{value:?}");
        }
        // A second field that is readable does not make up for it.
        let mut r = req("websocket");
        r.headers_mut().append(
            header::UPGRADE,
            header::HeaderValue::from_bytes(b"h2c\x80").unwrap(),
        );
        assert!(!is_upgrade_request(&r));
    }
}
