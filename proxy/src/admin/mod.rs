//! The admin server: health, metrics, the running configuration, the log filter,
//! and shutdown. Loopback by default; `/shutdown` refuses non-loopback callers
//! even when the admin address is widened.

pub mod known;

pub use strait_api::scrape::Scrapes;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::defaults;
use crate::telemetry::log::LogHandle;
use crate::transport::Drain;
use crate::transport::drain::ShutdownHandle;
use strait_api::write_deadline::WriteDeadline;

/// Bodies the admin server accepts (a log filter) are small.
const MAX_BODY: usize = 4 * 1024;

pub struct AdminState {
    /// The running configuration, as `GET /config` shows it.
    pub config: serde_json::Value,
    /// `/metrics`, encoded off the serving thread.
    pub metrics: Scrapes,
    pub log: Option<LogHandle>,
    pub shutdown: ShutdownHandle,
    pub drain: Drain,
    pub ready: watch::Receiver<bool>,
    /// With mTLS: a proxy whose certificate has expired is not ready (peers
    /// refuse it, so its pod is better out of its Services' endpoints).
    pub identity: Option<Arc<crate::identity::Credentials>>,
    /// The app ports `/probe/tcp/PORT` answers for, and where the app is.
    pub tcp_probes: TcpProbes,
    /// What `/config` shows of the proxy's state.
    pub known: known::Known,
}

#[derive(Clone, Debug)]
pub struct TcpProbes {
    pub ports: crate::addr::PortSet,
    pub app_ip: std::net::IpAddr,
}

impl TcpProbes {
    /// Whether the app accepts a connection on `port` within `timeout` (the
    /// probe's own, as the injector wrote it: `?timeout=5s`; 1 s, the
    /// kubelet's default, without), for the kubelet: the answer a `tcpSocket`
    /// probe of the port itself would have had without the proxy in front of
    /// it. Only the listed ports are tried, so the admin port, which other pods
    /// can reach, reveals nothing more than the probes the pod declared.
    async fn answer(&self, port: &str, query: Option<&str>) -> Response<Full<Bytes>> {
        let Some(port) = port.parse::<u16>().ok().filter(|p| self.ports.contains(*p)) else {
            return text(StatusCode::NOT_FOUND, "not a probed port\n");
        };
        let timeout = query
            .and_then(|q| q.strip_prefix("timeout="))
            .and_then(|t| t.strip_suffix('s'))
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|t| *t > 0)
            .map_or(PROBE_TIMEOUT, std::time::Duration::from_secs)
            .min(MAX_PROBE_TIMEOUT);
        let addr = std::net::SocketAddr::new(self.app_ip, port);
        let dial = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(timeout, dial).await {
            Ok(Ok(_)) => text(StatusCode::OK, format!("{addr} accepts connections\n")),
            Ok(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{addr}: {e}\n")),
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{addr}: no answer in {timeout:?}\n"),
            ),
        }
    }
}

/// Admin connections open at once at most: probes and scrapes need a few, and
/// the port may be reachable from other pods, which must not be able to hold
/// the process's file descriptors (those the data path needs too).
pub const MAX_CONNECTIONS: usize = 64;
/// Admin connections one address may hold: another pod cannot take every
/// place and starve the kubelet's probes (which would restart the proxy, and
/// the app whose TCP probes come here).
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// Places of `MAX_CONNECTIONS` kept for loopback and addresses holding
/// fewer than two (the kubelet's probes): see `Admission`.
pub const RESERVED_CONNECTIONS: usize = 16;
/// A TCP probe's wait for the app without a timeout of its own (the kubelet's
/// default), and the longest any may ask for.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let admission = strait_api::per_source::Admission::new(
        MAX_CONNECTIONS,
        RESERVED_CONNECTIONS,
        MAX_CONNECTIONS_PER_SOURCE,
    );
    let mut h1 = hyper::server::conn::http1::Builder::new();
    // A connection that does not finish a request head in time, idle ones
    // included, is closed.
    h1.timer(TokioTimer::new())
        .header_read_timeout(defaults::HTTP_HEADER_READ_TIMEOUT);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                strait_otel::sampled!(warn, error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let place = match admission.admit(peer.ip().to_canonical()) {
            Ok(place) => place,
            Err(why) => {
                strait_otel::sampled!(warn, client = %peer, "admin {why}");
                continue;
            }
        };
        let state = state.clone();
        let h1 = h1.clone();
        tokio::spawn(async move {
            let _place = place;
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, peer, req).await) }
            });
            // A client that asks and never reads the answers would hold its
            // place for ever: hyper reads nothing while a write waits.
            let io = WriteDeadline::new(stream, defaults::HTTP_HEADER_READ_TIMEOUT);
            if let Err(e) = h1.serve_connection(TokioIo::new(io), svc).await {
                debug!(error = %e, "admin connection ended");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whatever changes the proxy's state answers loopback callers only: the admin
/// port may be bound off loopback for the kubelet's probes.
/// `Some` is the refusal to answer.
fn loopback_only(peer: std::net::SocketAddr, what: &str) -> Option<Response<Full<Bytes>>> {
    if peer.ip().to_canonical().is_loopback() {
        return None;
    }
    strait_otel::sampled!(warn, client = %peer, "refused {what} from a non-loopback address");
    Some(text(
        StatusCode::FORBIDDEN,
        format!("{what} is accepted only from loopback\n"),
    ))
}

async fn route(
    state: &AdminState,
    peer: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (Method::GET, p) if p.starts_with("/probe/tcp/") => {
            let port = &p["/probe/tcp/".len()..];
            state.tcp_probes.answer(port, req.uri().query()).await
        }
        (Method::GET, "/ready") => {
            if state.drain.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if state.identity.as_ref().is_some_and(|c| c.expired()) {
                text(StatusCode::SERVICE_UNAVAILABLE, "certificate expired\n")
            } else if *state.ready.borrow() {
                text(StatusCode::OK, "ready\n")
            } else {
                let why = state.known.waiting_for(state.identity.as_deref());
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: waiting for {why}\n"),
                )
            }
        }
        (Method::GET, "/metrics") => match state.metrics.scrape().await {
            Ok(body) => {
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        (Method::GET, "/config") => {
            // The filter in force, which `PUT /log-level` may have changed.
            let mut config = state.config.clone();
            if let Some(c) = config.as_object_mut() {
                if let Some(l) = &state.log {
                    c.insert("log_level".into(), l.current().into());
                }
                // Which services this pod calls, their endpoints and who may
                // call it: for the pod itself (and `kubectl port-forward`),
                // not for every pod that can reach the admin port.
                let known = if peer.ip().to_canonical().is_loopback() {
                    state.known.json(state.identity.as_deref())
                } else {
                    "shown to loopback callers only".into()
                };
                c.insert("state".into(), known);
            }
            let json = serde_json::to_string_pretty(&config).unwrap_or_default();
            let mut r = text(StatusCode::OK, format!("{json}\n"));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        (Method::GET, "/log-level") => match &state.log {
            Some(l) => text(StatusCode::OK, format!("{}\n", l.current())),
            None => text(
                StatusCode::NOT_FOUND,
                "logging is not managed by this proxy\n",
            ),
        },
        (Method::PUT, "/log-level") => {
            // Trace logging costs tens of KB a request, and silence hides an
            // attack: changing the filter is the pod's own business.
            if let Some(refused) = loopback_only(peer, "changing the log level") {
                return refused;
            }
            let Some(log) = &state.log else {
                return text(
                    StatusCode::NOT_FOUND,
                    "logging is not managed by this proxy\n",
                );
            };
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "log filter too large\n"),
            };
            let Ok(filter) = std::str::from_utf8(&body) else {
                return text(StatusCode::BAD_REQUEST, "log filter is not UTF-8\n");
            };
            match log.set(filter.trim()) {
                Ok(()) => {
                    info!(filter = filter.trim(), "log filter changed");
                    text(StatusCode::OK, format!("{}\n", filter.trim()))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (Method::POST, "/shutdown") => {
            if let Some(refused) = loopback_only(peer, "shutdown") {
                return refused;
            }
            info!(client = %peer, "shutdown requested");
            state.shutdown.shutdown();
            text(StatusCode::OK, "shutting down\n")
        }
        (_, "/live" | "/ready" | "/metrics" | "/config" | "/log-level" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_changes_answer_loopback_only() {
        for ok in [
            "127.0.0.1:1",
            "127.0.1.7:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(loopback_only(ok.parse().unwrap(), "x").is_none(), "{ok}");
        }
        for refused in ["10.0.0.5:1", "[fd00::1]:1", "[::ffff:10.0.0.5]:1"] {
            let r = loopback_only(refused.parse().unwrap(), "changing the log level").unwrap();
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{refused}");
        }
    }
}
