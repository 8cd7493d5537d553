//! An HTTP backend (HTTP/1.1 and HTTP/2) whose behaviour is chosen by the path:
//!
//! | path | behaviour |
//! | --- | --- |
//! | `/echo` | streams the request body back; `x-seen-*` headers say what arrived |
//! | `/count` | reads the whole body and answers its length |
//! | `/1k` | a fixed 1 KiB body (benchmarks) |
//! | `/bytes/N` | streams N bytes in 64 KiB chunks |
//! | `/sse` | one event at once, a second only after `release_sse()`, then ends |
//! | `/slow/MS` | answers after MS milliseconds |
//! | `/hold` | answers once `release_held()` is called (at once after it) |
//! | `/status/N` | answers status N |
//! | `/trailers` | a body followed by trailers |
//! | `/flaky/P` | 503 for P % of requests (spread evenly), else 200 |
//! | `/upload-flaky` | reads and records the body; 503 for every other upload, else 200 |
//! | `/ws` | WebSocket echo |
//! | `CONNECT` | 200, then echoes the tunnel's bytes |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::{BoxError, TestBody};

#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicUsize,
    pub requests: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub completed: AtomicUsize,
    sse_release: Notify,
    held: Notify,
    held_released: std::sync::atomic::AtomicBool,
    /// Added to every response: a backend that is slow on purpose.
    delay: std::sync::Mutex<Duration>,
    /// Every request answered with this status: a backend failing hard.
    fail_with: std::sync::Mutex<Option<StatusCode>>,
    /// Bodies received on `/upload-flaky`, in order.
    uploads: std::sync::Mutex<Vec<Bytes>>,
    flaky: AtomicUsize,
}

#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start() -> Backend {
        Self::start_on("127.0.0.1:0".parse().expect("addr")).await
    }

    pub async fn start_on(addr: SocketAddr) -> Backend {
        Self::start_with(addr, None).await
    }

    /// A backend whose HTTP/2 connections each take at most `streams`
    /// concurrent streams (hyper's default is 200).
    pub async fn start_h2_streams(streams: u32) -> Backend {
        Self::start_with("127.0.0.1:0".parse().expect("addr"), Some(streams)).await
    }

    async fn start_with(addr: SocketAddr, h2_streams: Option<u32>) -> Backend {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(s.clone(), req));
                    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    if let Some(n) = h2_streams {
                        b.http2().max_concurrent_streams(n);
                    }
                    let _ = b
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, stats, task }
    }

    /// A backend that answers every request after `delay`.
    pub async fn start_slow(delay: Duration) -> Backend {
        let b = Self::start().await;
        if let Ok(mut d) = b.stats.delay.lock() {
            *d = delay;
        }
        b
    }

    pub fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.stats.requests()
    }

    pub fn in_flight(&self) -> usize {
        self.stats.in_flight.load(Ordering::SeqCst)
    }

    /// Answers every request with `status` from now on (`None`: recovers).
    pub fn fail_with(&self, status: Option<u16>) {
        if let Ok(mut f) = self.stats.fail_with.lock() {
            *f = status.and_then(|s| StatusCode::from_u16(s).ok());
        }
    }

    /// The bodies `/upload-flaky` received, in order.
    pub fn uploads(&self) -> Vec<Bytes> {
        self.stats
            .uploads
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default()
    }

    /// Lets one `/sse` stream send its last event and end (now, or when it gets there).
    pub fn release_sse(&self) {
        self.stats.release_sse();
    }

    /// Answers every `/hold` request, waiting or still to come.
    pub fn release_held(&self) {
        self.stats.release_held();
    }
}

impl Stats {
    /// Lets one `/sse` stream send its last event (now, or when it gets there).
    pub fn release_sse(&self) {
        self.sse_release.notify_one();
    }

    /// Answers every `/hold` request, waiting or still to come.
    pub fn release_held(&self) {
        self.held_released.store(true, Ordering::SeqCst);
        self.held.notify_waiters();
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn seen_headers(req: &Request<Incoming>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let version = format!("{:?}", req.version());
    h.insert(
        "x-seen-version",
        HeaderValue::from_str(&version).expect("version"),
    );
    let host = req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if let Some(host) = host {
        h.insert("x-seen-host", host);
    }
    let names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
    if let Ok(v) = HeaderValue::from_str(&names.join(",")) {
        h.insert("x-seen-headers", v);
    }
    h
}

async fn handle(
    stats: Arc<Stats>,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    stats.requests.fetch_add(1, Ordering::SeqCst);
    let delay = stats.delay.lock().map(|d| *d).unwrap_or_default();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let seen = seen_headers(&req);
    let path = req.uri().path().to_string();
    let failing = stats.fail_with.lock().ok().and_then(|f| *f);
    let mut rsp = if let Some(code) = failing {
        status(code, "failing on command")
    } else if req.method() == Method::CONNECT {
        tunnel_echo(req)
    } else if path == "/client-id" {
        // What the inbound proxy said about the caller.
        let id = req
            .headers()
            .get("strait-client-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        Response::new(full(id))
    } else if path == "/trace-context" {
        // The trace context the app was handed, as the next hop would see it.
        let h = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        Response::new(full(format!(
            "traceparent={}\nb3={}\nx-b3-traceid={}\nx-b3-spanid={}\n",
            h("traceparent"),
            h("b3"),
            h("x-b3-traceid"),
            h("x-b3-spanid")
        )))
    } else if path == "/echo" {
        Response::new(req.into_body().map_err(|e| Box::new(e) as BoxError).boxed())
    } else if path == "/count" {
        let mut n = 0u64;
        let mut body = req.into_body();
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(e) => return Ok(status(StatusCode::BAD_REQUEST, e.to_string())),
            }
        }
        Response::new(full(n.to_string()))
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0);
        let chunks = futures_util::stream::unfold(n, |left| async move {
            (left > 0).then(|| {
                let c = left.min(64 * 1024);
                (
                    Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'x'; c]))),
                    left - c,
                )
            })
        });
        Response::new(BodyExt::boxed(StreamBody::new(chunks)))
    } else if path == "/sse" {
        let s = stats.clone();
        let events = futures_util::stream::unfold(0u8, move |i| {
            let s = s.clone();
            async move {
                match i {
                    0 => Some((
                        Ok::<_, BoxError>(Frame::data(Bytes::from("data: first\n\n"))),
                        1,
                    )),
                    1 => {
                        s.sse_release.notified().await;
                        Some((Ok(Frame::data(Bytes::from("data: last\n\n"))), 2))
                    }
                    _ => None,
                }
            }
        });
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(events)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        stats.in_flight.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        Response::new(full("slow"))
    } else if path == "/hold" {
        stats.in_flight.fetch_add(1, Ordering::SeqCst);
        let released = stats.held.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        if !stats.held_released.load(Ordering::SeqCst) {
            released.await;
        }
        stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        Response::new(full("held"))
    } else if let Some(code) = path.strip_prefix("/status/") {
        status(
            code.parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST),
            "",
        )
    } else if let Some(p) = path.strip_prefix("/flaky/") {
        let p: usize = p.parse().unwrap_or(0);
        let n = stats.flaky.fetch_add(1, Ordering::SeqCst);
        // A multiplicative hash spreads the failures: never a long run of them.
        if n.wrapping_mul(2_654_435_761) % 100 < p {
            status(StatusCode::SERVICE_UNAVAILABLE, "flaky")
        } else {
            Response::new(full("ok"))
        }
    } else if path == "/upload-flaky" {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return Ok(status(StatusCode::BAD_REQUEST, e.to_string())),
        };
        let n = match stats.uploads.lock() {
            Ok(mut u) => {
                u.push(body.clone());
                u.len()
            }
            Err(_) => 0,
        };
        if n % 2 == 1 {
            status(StatusCode::SERVICE_UNAVAILABLE, "try again")
        } else {
            Response::new(full(body.len().to_string()))
        }
    } else if path == "/1k" {
        Response::new(full(Bytes::from_static(&[b'x'; 1024])))
    } else if path == "/trailers" {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
        let frames = futures_util::stream::iter(vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from("body"))),
            Ok(Frame::trailers(trailers)),
        ]);
        Response::new(BodyExt::boxed(StreamBody::new(frames)))
    } else if path == "/ws" {
        websocket_echo(req)
    } else {
        Response::new(full("ok"))
    };
    rsp.headers_mut().extend(seen);
    stats.completed.fetch_add(1, Ordering::SeqCst);
    Ok(rsp)
}

fn status(code: StatusCode, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = code;
    r
}

fn websocket_echo(mut req: Request<Incoming>) -> Response<TestBody> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return status(StatusCode::BAD_REQUEST, "not a websocket request");
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    // The first subprotocol the client offers is taken, as a server that
    // speaks them all would (GraphQL's `graphql-transport-ws`, say).
    let subprotocol = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|p| HeaderValue::from_str(p.trim()).ok());
    let mut r = status(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = r.headers_mut();
    if let Some(p) = subprotocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("accept key"),
    );
    r
}

fn tunnel_echo(mut req: Request<Incoming>) -> Response<TestBody> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let io = TokioIo::new(upgraded);
        let (mut r, mut w) = tokio::io::split(io);
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    status(StatusCode::OK, "")
}
