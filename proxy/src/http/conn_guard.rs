//! Time limits on an HTTP/1 connection that hyper cannot tell apart: a client that
//! started a request head and stalls (slowloris: answered 408 and closed) and a
//! keep-alive connection with nothing to do (closed silently after the idle timeout).
//!
//! The guard wraps the connection's IO. The per-connection service tells it whether
//! a request is in flight (`InFlightLayer`); when none is, the first bytes read start
//! the header timer and silence starts the idle timer.
//!
//! While a head is read, the guard also notes which framing fields it names: hyper
//! quietly drops `Content-Length` when `Transfer-Encoding` is present (safe, per RFC
//! 9112), but a request carrying both is a smuggling attempt we refuse outright.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::body::GuardedBody;
use tokio::time::{Instant, Sleep};

const RESPONSE_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\nstrait-proxy-error: request header read timed out\r\n\r\n";

/// Shared between the IO guard and the connection's service.
#[derive(Debug, Default)]
pub struct ConnState {
    in_flight: AtomicUsize,
    /// Requests that reached the service so far: a change means the head being
    /// timed was complete, whatever happened since.
    served: AtomicUsize,
    /// After an upgrade (WebSocket, CONNECT) the stream is no longer HTTP.
    upgraded: AtomicBool,
    header_timed_out: AtomicBool,
    /// Framing fields seen in the head being read (CONTENT_LENGTH | TRANSFER_ENCODING).
    framing: std::sync::atomic::AtomicU8,
    /// The connection's reader, woken when the last request in flight finishes so
    /// the idle timer starts even if hyper is not reading just then.
    reader: AtomicWaker,
    /// Streams taken over by an upgrade and still spliced: until the last ends,
    /// the connection holds its place under the listener's connection limit.
    tunnels: AtomicUsize,
    tunnels_done: tokio::sync::Notify,
}

/// An upgraded stream of a connection, open while this is alive.
#[derive(Debug)]
pub struct Tunnel(Arc<ConnState>);

impl Drop for Tunnel {
    fn drop(&mut self) {
        if self.0.tunnels.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A permit is stored if no one waits yet: the waiter sees it.
            self.0.tunnels_done.notify_one();
        }
    }
}

const CONTENT_LENGTH: u8 = 1;
const TRANSFER_ENCODING: u8 = 2;
const BARE_LF: u8 = 4;

/// Put on a request whose head the scan found at fault: what hyper reads
/// leniently and another parser might read otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadFault {
    /// Both Content-Length and Transfer-Encoding (hyper drops the former).
    ConflictingFraming,
    /// A line ended by LF alone (RFC 9112 §2.2 lets a recipient accept it; a
    /// proxy that did would pass on what the next hop may split differently).
    BareLf,
}

impl ConnState {
    pub fn mark_upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    /// A stream this connection hands over to an upgrade (WebSocket, CONNECT).
    pub fn tunnel(self: &Arc<Self>) -> Tunnel {
        self.tunnels.fetch_add(1, Ordering::AcqRel);
        Tunnel(self.clone())
    }

    /// Resolves once no stream this connection handed over is still open.
    pub async fn tunnels_closed(&self) {
        while self.tunnels.load(Ordering::Acquire) > 0 {
            self.tunnels_done.notified().await;
        }
    }

    pub fn header_timed_out(&self) -> bool {
        self.header_timed_out.load(Ordering::Acquire)
    }

    /// Resolves once the connection served nothing for a whole `idle` period:
    /// no request in flight, and none arrived. (For HTTP/2, where the streams of a
    /// connection are served by one service and no IO guard sees the heads.)
    pub async fn idle_for(&self, idle: Duration) {
        let mut seen = self.served.load(Ordering::Acquire);
        loop {
            tokio::time::sleep(idle).await;
            let served = self.served.load(Ordering::Acquire);
            if served == seen && self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            seen = served;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Busy,
    Idle,
    Head,
}

pin_project_lite::pin_project! {
    pub struct GuardedIo<T> {
        #[pin]
        inner: T,
        state: Arc<ConnState>,
        phase: Phase,
        seen: usize,
        scan: HeadScan,
        timer: Pin<Box<Sleep>>,
        header_timeout: Duration,
        idle_timeout: Duration,
    }
}

impl<T> GuardedIo<T> {
    pub fn new(
        inner: T,
        state: Arc<ConnState>,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        GuardedIo {
            inner,
            state,
            phase: Phase::Busy,
            seen: 0,
            scan: HeadScan::default(),
            timer: Box::pin(tokio::time::sleep(idle_timeout)),
            header_timeout,
            idle_timeout,
        }
    }
}

impl<T: AsyncRead + AsyncWrite> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        this.state.reader.register(cx.waker());
        let before = buf.filled().len();
        let res = this.inner.as_mut().poll_read(cx, buf);
        if this.state.upgraded.load(Ordering::Acquire) {
            return res;
        }
        let got = buf.filled().len() > before;
        if this.state.in_flight.load(Ordering::Acquire) > 0 {
            *this.phase = Phase::Busy;
            return res;
        }
        let served = this.state.served.load(Ordering::Acquire);
        if served != *this.seen {
            *this.seen = served;
            *this.phase = Phase::Busy;
        }
        if got && *this.phase != Phase::Head {
            *this.phase = Phase::Head;
            // A new head: every request of a keep-alive connection is scanned.
            *this.scan = HeadScan::default();
            this.timer
                .as_mut()
                .reset(Instant::now() + *this.header_timeout);
        } else if *this.phase == Phase::Busy {
            *this.phase = Phase::Idle;
            this.timer
                .as_mut()
                .reset(Instant::now() + *this.idle_timeout);
        }
        if got && *this.phase == Phase::Head {
            let found = this.scan.feed(&buf.filled()[before..]);
            if found != 0 {
                this.state.framing.fetch_or(found, Ordering::AcqRel);
            }
        }
        if res.is_ready() {
            return res;
        }
        ready!(this.timer.as_mut().poll(cx));
        match *this.phase {
            Phase::Head => {
                this.state.header_timed_out.store(true, Ordering::Release);
                // Best effort: a stalled client's socket buffer has room for this.
                let _ = this.inner.as_mut().poll_write(cx, RESPONSE_408);
                let _ = this.inner.as_mut().poll_flush(cx);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request header read timed out",
                )))
            }
            // Idle: report EOF, hyper closes the connection quietly.
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Marks a request in flight from the moment it reaches the service until its
/// response body is finished (or dropped), and its request body too: an app may
/// answer before it has read the body, which the client goes on sending, and
/// those bytes are not the next request's head (nor its to time out).
#[derive(Clone, Debug)]
pub struct InFlightLayer {
    state: Arc<ConnState>,
}

impl InFlightLayer {
    pub fn new(state: Arc<ConnState>) -> Self {
        Self { state }
    }
}

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;
    fn layer(&self, inner: S) -> Self::Service {
        InFlight {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct InFlight<S> {
    inner: S,
    state: Arc<ConnState>,
}

#[derive(Debug)]
pub struct Guard(Arc<ConnState>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
    }
}

pub type InFlightBody<B> = GuardedBody<B, Guard>;

impl<S, B, RB> tower::Service<Request<B>> for InFlight<S>
where
    S: tower::Service<Request<InFlightBody<B>>, Response = Response<RB>>,
    S::Future: Send + 'static,
    B: http_body::Body,
{
    type Response = Response<InFlightBody<RB>>;
    type Error = S::Error;
    type Future = InFlightFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let found = self.state.framing.swap(0, Ordering::AcqRel);
        if found & BARE_LF != 0 {
            req.extensions_mut().insert(HeadFault::BareLf);
        } else if found & (CONTENT_LENGTH | TRANSFER_ENCODING) == CONTENT_LENGTH | TRANSFER_ENCODING
        {
            req.extensions_mut().insert(HeadFault::ConflictingFraming);
        }
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        self.state.served.fetch_add(1, Ordering::AcqRel);
        let guard = Guard(self.state.clone());
        // Most requests have no body to wait for: no second count.
        let reading = (!req.body().is_end_stream()).then(|| {
            self.state.in_flight.fetch_add(1, Ordering::AcqRel);
            Guard(self.state.clone())
        });
        let req = req.map(|b| GuardedBody::maybe(b, reading));
        InFlightFuture {
            inner: self.inner.call(req),
            guard: Some(guard),
        }
    }
}

pin_project_lite::pin_project! {
    /// The request's future; its response body holds the guard until it ends.
    pub struct InFlightFuture<F> {
        #[pin]
        inner: F,
        guard: Option<Guard>,
    }
}

impl<F, RB, E> Future for InFlightFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<InFlightBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        // Released now if there is no body to hold it.
        let guard = this.guard.take();
        Poll::Ready(out.map(|rsp| rsp.map(|inner| GuardedBody::maybe(inner, guard))))
    }
}

/// Finds the field names of a request head as its bytes arrive, however they are
/// split, and stops at the blank line that ends the head.
#[derive(Debug, Default)]
struct HeadScan {
    /// Lower-cased start of the current line, up to the longest name we look for.
    name: [u8; 18],
    len: usize,
    /// The current line is past its name (or too long to be one we look for).
    in_value: bool,
    done: bool,
    /// Bytes seen on the current line, to recognise the empty line.
    line_bytes: usize,
    /// The previous byte was CR.
    cr: bool,
    /// The request line has begun: empty lines before it are skipped, as
    /// hyper skips them, rather than taken for the end of the head.
    started: bool,
}

impl HeadScan {
    fn feed(&mut self, bytes: &[u8]) -> u8 {
        let mut found = 0;
        for &b in bytes {
            if self.done {
                break;
            }
            let cr = std::mem::replace(&mut self.cr, b == b'\r');
            match b {
                b'\n' => {
                    if !cr {
                        found |= BARE_LF;
                    }
                    let empty = self.line_bytes == 0
                        || (self.line_bytes == 1 && self.len == 1 && self.name[0] == b'\r');
                    if empty && self.started {
                        self.done = true;
                    }
                    self.len = 0;
                    self.line_bytes = 0;
                    self.in_value = false;
                }
                _ => {
                    self.line_bytes += 1;
                    if b != b'\r' {
                        self.started = true;
                    }
                    if self.in_value {
                        continue;
                    }
                    if b == b':' {
                        match &self.name[..self.len] {
                            b"content-length" => found |= CONTENT_LENGTH,
                            b"transfer-encoding" => found |= TRANSFER_ENCODING,
                            _ => {}
                        }
                        self.in_value = true;
                    } else if self.len < self.name.len() {
                        self.name[self.len] = b.to_ascii_lowercase();
                        self.len += 1;
                    } else {
                        self.in_value = true;
                    }
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn head_scan_finds_framing_fields_across_splits_and_stops_at_the_body() {
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\ncontent-length: 9\r\n";
        for split in 1..head.len() {
            let mut s = HeadScan::default();
            let f = s.feed(&head[..split]) | s.feed(&head[split..]);
            assert_eq!(f, CONTENT_LENGTH | TRANSFER_ENCODING, "split at {split}");
        }
        let mut s = HeadScan::default();
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\r\nx-a: content-length:\r\n\r\ntransfer-encoding: x\r\n"),
            0
        );
        let mut s = HeadScan::default();
        assert_eq!(
            s.feed(b"POST / HTTP/1.1\r\ncontent-length: 1\r\n\r\n"),
            CONTENT_LENGTH
        );
        let head = b"GET / HTTP/1.1\r\nHost: a\nx: b\r\n\r\n";
        for split in 1..head.len() {
            let mut s = HeadScan::default();
            let f = s.feed(&head[..split]) | s.feed(&head[split..]);
            assert_eq!(f, BARE_LF, "split at {split}");
        }
        let mut s = HeadScan::default();
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\r\n\r\nbody\n\n"),
            0,
            "only the head"
        );
        // Empty lines before the request line do not end the scan.
        let mut s = HeadScan::default();
        assert_eq!(
            s.feed(b"\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n"),
            CONTENT_LENGTH | TRANSFER_ENCODING
        );
        let mut s = HeadScan::default();
        assert_eq!(
            s.feed(b"\r\nGET / HTTP/1.1\r\nhost: a\nx: 1\r\n\r\n"),
            BARE_LF
        );
    }

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_stalled_request_head_gets_408() {
        let (mut client, server) = tokio::io::duplex(4096);
        let state = Arc::new(ConnState::default());
        let mut io = GuardedIo::new(
            server,
            state.clone(),
            Duration::from_secs(10),
            Duration::from_secs(120),
        );
        client.write_all(b"GET / HTTP/1.1\r\nHos").await.unwrap();
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(n, 19);
        let start = Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert!(state.header_timed_out());
        let mut rsp = vec![0u8; RESPONSE_408.len()];
        client.read_exact(&mut rsp).await.unwrap();
        assert!(rsp.starts_with(b"HTTP/1.1 408"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_silently() {
        let (mut client, server) = tokio::io::duplex(4096);
        let state = Arc::new(ConnState::default());
        let mut io = GuardedIo::new(
            server,
            state,
            Duration::from_secs(10),
            Duration::from_secs(120),
        );
        let mut buf = [0u8; 64];
        let start = Instant::now();
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        assert_eq!(start.elapsed(), Duration::from_secs(120));
        drop(io);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing is written to an idle client");
    }

    #[tokio::test(start_paused = true)]
    async fn no_timer_while_a_request_is_in_flight() {
        let (mut client, server) = tokio::io::duplex(4096);
        let state = Arc::new(ConnState::default());
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        let mut io = GuardedIo::new(
            server,
            state,
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            io.read(&mut buf).await.map(|n| buf[..n].to_vec())
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        client.write_all(b"late").await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), b"late");
    }

    /// An app may answer before it reads the request body; the client then
    /// sends the rest of it. Those bytes are the body, not the next head: the
    /// next request must not inherit what scanning them would find (a bare LF
    /// in a text body made it a 400), nor their header timer.
    #[tokio::test]
    async fn a_body_read_after_its_response_is_not_taken_for_the_next_head() {
        use http_body_util::{BodyExt, Full};
        use hyper::body::Incoming;
        use std::sync::Mutex;

        let (mut client, server) = tokio::io::duplex(4096);
        let state = Arc::new(ConnState::default());
        let io = GuardedIo::new(
            server,
            state.clone(),
            Duration::from_secs(10),
            Duration::from_secs(120),
        );
        let faults = Arc::new(Mutex::new(Vec::new()));
        let svc = {
            let faults = faults.clone();
            tower::service_fn(move |req: Request<InFlightBody<Incoming>>| {
                faults
                    .lock()
                    .unwrap()
                    .push(req.extensions().get::<HeadFault>().copied());
                // Answered at once; the body is read as it comes, by another task.
                tokio::spawn(req.into_body().collect());
                async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                        bytes::Bytes::from_static(b"early"),
                    )))
                }
            })
        };
        let svc = tower::Layer::layer(&InFlightLayer::new(state), svc);
        let conn = hyper::server::conn::http1::Builder::new().serve_connection(
            hyper_util::rt::TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(svc),
        );
        let served = tokio::spawn(conn);

        async fn head(client: &mut tokio::io::DuplexStream) -> String {
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            while !got.ends_with(b"\r\n\r\n") {
                client.read_exact(&mut b).await.unwrap();
                got.push(b[0]);
            }
            String::from_utf8(got).unwrap()
        }
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n")
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), head(&mut client))
            .await
            .expect("first response");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        let mut early = [0u8; 5];
        client.read_exact(&mut early).await.unwrap();
        // The body after its response, lines ended by LF alone, and the
        // next request.
        client
            .write_all(b"line1\nline2\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let second = tokio::time::timeout(Duration::from_secs(5), head(&mut client))
            .await
            .expect("second response");
        assert!(second.starts_with("HTTP/1.1 200"), "{second}");
        assert_eq!(*faults.lock().unwrap(), vec![None, None]);
        drop(client);
        let _ = served.await;
    }
}
