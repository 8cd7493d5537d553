//! HTTP/1.1 upgrades (WebSocket) and CONNECT: once both sides agree, the two
//! connections are spliced and bytes flow untouched in both directions.

use http::{Method, Request, Response, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::tcp::TcpConfig;
use crate::telemetry::{Direction, Metrics};

/// True for `CONNECT` and for HTTP/1.1 requests asking to switch protocols.
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    if req.version() >= http::Version::HTTP_2 {
        return false;
    }
    req.method() == Method::CONNECT
        || (req.headers().contains_key(header::UPGRADE)
            && req
                .headers()
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
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

/// Whether the upstream accepted the upgrade or tunnel.
pub fn accepted<B>(is_connect: bool, rsp: &Response<B>) -> bool {
    if is_connect {
        rsp.status().is_success()
    } else {
        rsp.status() == StatusCode::SWITCHING_PROTOCOLS
    }
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
    .await
}
