//! The controller's admin server: `/live`, `/ready` (once the index has loaded),
//! `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use strait_api::scrape::Scrapes;

use crate::metrics::Metrics;

/// Admin connections open at once at most: probes and scrapes need a few, and
/// in a pod the port listens beyond loopback, where other pods must not be able
/// to hold the process's file descriptors (those the API and webhook need too).
pub const MAX_CONNECTIONS: usize = 64;
/// Admin connections one address may hold: one pod cannot take every place
/// and starve the kubelet's probes, which would restart the controller and
/// take it out of its Service.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// Places kept for loopback and addresses holding fewer than two (the
/// kubelet's probes), which a few pods holding their share each would
/// otherwise leave none of.
pub const RESERVED_CONNECTIONS: usize = 16;
/// A connection that does not finish a request head in this time, idle ones
/// included, is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: watch::Receiver<bool>) {
    // Encoded off the serving threads, shared, a tenth of the time at most.
    let metrics = Arc::new(Scrapes::new(move |out| metrics.encode_into(out)));
    // Loopback, spared, is the controller's own pod.
    let admission = strait_api::per_source::Admission::new(
        MAX_CONNECTIONS,
        RESERVED_CONNECTIONS,
        MAX_CONNECTIONS_PER_SOURCE,
    );
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let place = match admission.admit(peer.ip().to_canonical()) {
            Ok(place) => place,
            Err(why) => {
                strait_otel::sampled!(warn, client = %peer, "admin {why}");
                continue;
            }
        };
        let (metrics, ready, h1) = (metrics.clone(), ready.clone(), h1.clone());
        tokio::spawn(async move {
            let _place = place;
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, ready) = (metrics.clone(), ready.clone());
                async move {
                    Ok::<_, Infallible>(
                        route(&metrics, &ready, req.method(), req.uri().path()).await,
                    )
                }
            });
            // A client that asks and never reads the answers would hold its
            // place for ever: hyper reads nothing while a write waits.
            let io = strait_api::write_deadline::WriteDeadline::new(stream, HEADER_READ_TIMEOUT);
            let _ = h1.serve_connection(TokioIo::new(io), svc).await;
        });
    }
}

async fn route(
    metrics: &Scrapes,
    ready: &watch::Receiver<bool>,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    let (status, body, ctype): (_, Bytes, _) = match (method, path) {
        (&Method::GET, "/live") => (StatusCode::OK, "live\n".into(), "text/plain"),
        (&Method::GET, "/ready") if *ready.borrow() => {
            (StatusCode::OK, "ready\n".into(), "text/plain")
        }
        (&Method::GET, "/ready") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready\n".into(),
            "text/plain",
        ),
        (&Method::GET, "/metrics") => match metrics.scrape().await {
            Ok(text) => (
                StatusCode::OK,
                text,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{e}\n").into(),
                "text/plain",
            ),
        },
        (_, "/live" | "/ready" | "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
            "text/plain",
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn live(addr: std::net::SocketAddr) -> bool {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            return false;
        };
        let req = b"GET /live HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
        if s.write_all(req).await.is_err() {
            return false;
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        out.starts_with(b"HTTP/1.1 200")
    }

    /// A client that pipelines requests and never reads the answers is cut
    /// off once a write has waited the limit, rather than holding its place.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_its_answers_is_cut_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_ready_tx, ready) = watch::channel(true);
        let metrics = Metrics::new();
        let one = metrics.encode().len();
        tokio::spawn(serve(listener, metrics, ready));
        // Far more answers than the sockets' buffers hold.
        let asked = 64 * 1024 * 1024 / one.max(1);
        let (mut rx, mut tx) = TcpStream::connect(addr).await.unwrap().into_split();
        tokio::spawn(async move {
            let req = b"GET /metrics HTTP/1.1\r\nhost: a\r\n\r\n";
            for _ in 0..asked {
                if tx.write_all(req).await.is_err() {
                    break;
                }
            }
            // Held open: the server is not told the client has finished.
            std::future::pending::<()>().await;
        });
        // Not read for longer than the limit (the paused clock runs on while
        // every task waits).
        tokio::time::sleep(HEADER_READ_TIMEOUT * 3).await;
        let mut answered = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let mut tail = Vec::new();
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&tail);
                    answered += text.matches("HTTP/1.1 200").count();
                    let keep = tail.len().saturating_sub(11);
                    tail.drain(..keep);
                }
            }
            if answered >= asked {
                break;
            }
        }
        assert!(answered > 0, "answered none");
        assert!(
            answered < asked,
            "every one of {asked} answers was written to a client that read none for {:?}",
            HEADER_READ_TIMEOUT * 3
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_and_a_freed_slot_serves() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_ready_tx, ready) = watch::channel(true);
        tokio::spawn(serve(listener, Metrics::new(), ready));
        assert!(live(addr).await);
        // Connections that never send a request hold every slot.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // Accepted in order, so one more finds none: closed at once.
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut b)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        held.pop();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !live(addr).await {
            assert!(tokio::time::Instant::now() < deadline, "no slot freed");
        }
    }
}
