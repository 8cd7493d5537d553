//! Time limits on an HTTP/1 connection that hyper cannot tell apart: a client that
//! started a request head and stalls (slowloris: answered 408 and closed) and a
//! keep-alive connection with nothing to do (closed silently after the idle timeout).
//!
//! The guard wraps the connection's IO. The per-connection service tells it whether
//! a request is in flight (`InFlightLayer`); when none is, the first bytes read start
//! the header timer and silence starts the idle timer.
//!
//! The guard also scans every request head as it is read (`request_scan`), and
//! notes which framing fields it names: hyper quietly drops `Content-Length` when
//! `Transfer-Encoding` is present (safe, per RFC 9112), but a request carrying both
//! is a smuggling attempt we refuse outright.

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
use super::request_scan::{BARE_LF, CONTENT_LENGTH, RequestScan, TRANSFER_ENCODING};
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
    /// Heads the scan found at fault, by their number on the connection, not
    /// yet served (hyper may read several before it serves the first).
    faults: std::sync::Mutex<std::collections::VecDeque<(usize, HeadFault)>>,
    /// Entries in `faults`: most connections never lock it.
    faulted: AtomicUsize,
    /// The connection's reader, woken when the last request in flight finishes so
    /// the idle timer starts even if hyper is not reading just then.
    reader: AtomicWaker,
    /// Streams taken over by an upgrade and still spliced: until the last ends,
    /// the connection holds its place under the listener's connection limit.
    tunnels: AtomicUsize,
    tunnels_done: tokio::sync::Notify,
    /// Inbound: the requests in flight of every connection from this one's
    /// address (`InFlightCap::of_source`).
    source: Option<Arc<AtomicUsize>>,
    /// Inbound, plaintext HTTP/1 to a port the kubelet probes: never shed
    /// for memory (a liveness probe refused would restart the app, which
    /// frees nothing of the proxy's).
    probes: bool,
    /// Outbound HTTP/2 to one destination: asked to close (GOAWAY) by an
    /// answer that its destination could not be reached (`ask_close`).
    close_on_unreachable: bool,
    /// A permit is kept until the server waits.
    close_asked: tokio::sync::Notify,
}

impl ConnState {
    /// A connection whose requests count toward its caller's share too.
    pub fn of_caller(source: Arc<AtomicUsize>) -> Self {
        ConnState {
            source: Some(source),
            ..ConnState::default()
        }
    }

    /// A connection that may carry the kubelet's probes.
    pub fn of_probes() -> Self {
        ConnState {
            probes: true,
            ..ConnState::default()
        }
    }

    /// A connection sent away by an answer that its one destination could
    /// not be reached (`ask_close`).
    pub fn closing_on_unreachable(mut self) -> Self {
        self.close_on_unreachable = true;
        self
    }
}

/// Heads at fault noted ahead of their serving.
const MAX_FAULTS: usize = 4;

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

impl HeadFault {
    /// What the scan's findings in a head amount to: a length or a coding
    /// alone is no fault.
    fn of(found: u8) -> Option<HeadFault> {
        if found & BARE_LF != 0 {
            Some(HeadFault::BareLf)
        } else if found & (CONTENT_LENGTH | TRANSFER_ENCODING) == CONTENT_LENGTH | TRANSFER_ENCODING
        {
            Some(HeadFault::ConflictingFraming)
        } else {
            None
        }
    }
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

    /// What the scan found at fault in the `n`th head of the connection.
    fn fault_of(&self, n: usize) -> Option<HeadFault> {
        if self.faulted.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        while faults.front().is_some_and(|&(at, _)| at < n) {
            faults.pop_front();
        }
        let found = match faults.front() {
            Some(&(at, fault)) if at == n => {
                faults.pop_front();
                Some(fault)
            }
            _ => None,
        };
        self.faulted.store(faults.len(), Ordering::Release);
        found
    }

    /// Whether a request is in flight on the connection.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// Whether a request is in flight or a stream it handed over (an HTTP/2
    /// CONNECT's tunnel, a stream of the connection itself) is still open.
    pub fn carrying(&self) -> bool {
        self.busy() || self.tunnels.load(Ordering::Acquire) > 0
    }

    pub fn header_timed_out(&self) -> bool {
        self.header_timed_out.load(Ordering::Acquire)
    }

    /// Asks the connection to go away once its streams are done: an app's
    /// HTTP/2 connection to a destination gone (a pod address after a
    /// rollout) would otherwise stay open and fail every request on it, where
    /// without the mesh the server's going away would have closed it, and the
    /// app (a gRPC channel balancing over a headless Service's pods) would
    /// have resolved its name again.
    pub fn ask_close(&self) {
        self.close_asked.notify_one();
    }

    pub async fn close_asked(&self) {
        self.close_asked.notified().await;
    }

    /// Resolves once the connection served nothing for a whole `idle` period:
    /// no request in flight or tunnel open, and none arrived. (For HTTP/2, where the streams of a
    /// connection are served by one service and no IO guard sees the heads.)
    pub async fn idle_for(&self, idle: Duration) {
        let mut seen = self.served.load(Ordering::Acquire);
        loop {
            tokio::time::sleep(idle).await;
            let served = self.served.load(Ordering::Acquire);
            if served == seen && !self.carrying() {
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
        scan: RequestScan,
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
            scan: RequestScan::default(),
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
        if got {
            let state = &**this.state;
            this.scan.feed(&buf.filled()[before..], |n, found| {
                // Faults only: heads that merely carry a length must not fill
                // the queue ahead of one that is at fault.
                if let Some(fault) = HeadFault::of(found) {
                    let mut faults = state.faults.lock().unwrap_or_else(|p| p.into_inner());
                    // The first served is refused and closes the connection:
                    // a few are kept, never one per head of a large read.
                    if faults.len() < MAX_FAULTS {
                        faults.push_back((n, fault));
                        state.faulted.store(faults.len(), Ordering::Release);
                    }
                }
            });
        }
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
            this.timer
                .as_mut()
                .reset(Instant::now() + *this.header_timeout);
        } else if *this.phase == Phase::Busy {
            *this.phase = Phase::Idle;
            this.timer
                .as_mut()
                .reset(Instant::now() + *this.idle_timeout);
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

/// Requests in flight across every connection of a direction, and how many
/// may be: past it a request is marked `OverCap`, and answered 503 without
/// going further (`normalize`). Inbound, one caller's address may hold a
/// quarter of them, as of the listener's connections: HTTP/2 lets a client
/// keep a thousand streams open per connection for as long as it likes (it
/// need only give no flow-control window), and one that did so over a few
/// connections would otherwise have every other caller, and the kubelet's
/// probes, answered 503.
#[derive(Debug)]
pub struct InFlightCap {
    count: AtomicUsize,
    max: usize,
    per_source: usize,
    /// Near the container's memory limit: new requests shed too.
    pressure: crate::cgroup::Pressure,
    /// Each address's count, shared by its connections while any is open.
    sources: std::sync::Mutex<Sources>,
}

#[derive(Debug, Default)]
struct Sources {
    counts: std::collections::HashMap<std::net::IpAddr, std::sync::Weak<AtomicUsize>>,
    /// Entries when those of closed callers were last let go.
    pruned_at: usize,
}

impl InFlightCap {
    pub fn new(max: usize) -> Arc<Self> {
        Self::with_pressure(max, crate::cgroup::Pressure::default())
    }

    pub fn with_pressure(max: usize, pressure: crate::cgroup::Pressure) -> Arc<Self> {
        Arc::new(InFlightCap {
            count: AtomicUsize::new(0),
            max,
            per_source: (max / 4).max(1),
            pressure,
            sources: Default::default(),
        })
    }

    /// The count of `source`'s requests in flight, looked up once per
    /// connection (`ConnState::of_caller`).
    pub fn of_source(&self, source: std::net::IpAddr) -> Arc<AtomicUsize> {
        let source = source.to_canonical();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = sources.counts.get(&source).and_then(|w| w.upgrade()) {
            return count;
        }
        // Callers gone leave their entries: let them go as often as the
        // map doubles, so that it holds at most twice the callers connected.
        if sources.counts.len() >= 2 * sources.pruned_at.max(64) {
            sources.counts.retain(|_, w| w.strong_count() > 0);
            sources.pruned_at = sources.counts.len();
        }
        let count = Arc::new(AtomicUsize::new(0));
        sources.counts.insert(source, Arc::downgrade(&count));
        count
    }
}

/// On a request that came past its direction's `InFlightCap`, or past its
/// caller's share of it, or while the proxy is near its memory limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverCap {
    Direction,
    Caller,
    Memory,
}

/// Marks a request in flight from the moment it reaches the service until its
/// response body is finished (or dropped), and its request body too: an app may
/// answer before it has read the body, which the client goes on sending, and
/// those bytes are not the next request's head (nor its to time out). The
/// request also counts against its direction's cap until its response ends.
#[derive(Clone, Debug)]
pub struct InFlightLayer {
    state: Arc<ConnState>,
    cap: Arc<InFlightCap>,
}

impl InFlightLayer {
    pub fn new(state: Arc<ConnState>, cap: Arc<InFlightCap>) -> Self {
        Self { state, cap }
    }
}

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;
    fn layer(&self, inner: S) -> Self::Service {
        InFlight {
            inner,
            state: self.state.clone(),
            cap: self.cap.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct InFlight<S> {
    inner: S,
    state: Arc<ConnState>,
    cap: Arc<InFlightCap>,
}

/// A request (or its body) in flight on its connection; the response's also
/// holds the request's place under its direction's cap.
#[derive(Debug)]
pub struct Guard(Arc<ConnState>, Option<Arc<InFlightCap>>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
        if let Some(cap) = &self.1 {
            cap.count.fetch_sub(1, Ordering::AcqRel);
            if let Some(source) = &self.0.source {
                source.fetch_sub(1, Ordering::AcqRel);
            }
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
        // Requests reach the service in the order their heads were read.
        let n = self.state.served.fetch_add(1, Ordering::AcqRel);
        if let Some(fault) = self.state.fault_of(n) {
            req.extensions_mut().insert(fault);
        }
        // Both counted whatever either says: the guard gives both back.
        let over_direction = self.cap.count.fetch_add(1, Ordering::AcqRel) >= self.cap.max;
        let over_caller = (self.state.source.as_ref())
            .is_some_and(|s| s.fetch_add(1, Ordering::AcqRel) >= self.cap.per_source);
        if over_direction {
            req.extensions_mut().insert(OverCap::Direction);
        } else if over_caller {
            req.extensions_mut().insert(OverCap::Caller);
        } else if !self.state.probes && self.cap.pressure.is_high() {
            req.extensions_mut().insert(OverCap::Memory);
        }
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = Guard(self.state.clone(), Some(self.cap.clone()));
        // Most requests have no body to wait for: no second count.
        let reading = (!req.body().is_end_stream()).then(|| {
            self.state.in_flight.fetch_add(1, Ordering::AcqRel);
            Guard(self.state.clone(), None)
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
        if let (Ok(rsp), Some(Guard(state, _))) = (&out, &guard)
            && state.close_on_unreachable
            && super::error::destination_unreachable(rsp)
        {
            state.ask_close();
        }
        Poll::Ready(out.map(|rsp| rsp.map(|inner| GuardedBody::maybe(inner, guard))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A caller's connections share one count (an IPv4 caller seen through
    /// a dual-stack socket too), and the counts of callers gone are let go.
    #[test]
    fn a_caller_s_connections_share_its_count() {
        let cap = InFlightCap::new(8);
        let a = cap.of_source("10.0.0.1".parse().unwrap());
        let mapped = cap.of_source("::ffff:10.0.0.1".parse().unwrap());
        assert!(Arc::ptr_eq(&a, &mapped));
        assert!(!Arc::ptr_eq(
            &a,
            &cap.of_source("10.0.0.2".parse().unwrap())
        ));
        for i in 0..1000u32 {
            drop(cap.of_source(std::net::Ipv4Addr::from(0x0b00_0000 + i).into()));
        }
        let held = cap.sources.lock().unwrap().counts.len();
        assert!(held <= 128, "{held} entries kept for callers gone");
        assert!(Arc::ptr_eq(&a, &cap.of_source("10.0.0.1".parse().unwrap())));
    }

    /// Near the memory limit every new request is marked to be shed
    /// (answered 503, not processed) but the kubelet's probes; otherwise
    /// none is.
    #[tokio::test]
    async fn requests_are_shed_while_memory_is_near_its_limit() {
        use http_body_util::Empty;
        for (high, probes) in [(false, false), (true, false), (true, true)] {
            let cap = InFlightCap::with_pressure(8, crate::cgroup::Pressure::fixed(high));
            let seen = Arc::new(std::sync::Mutex::new(None));
            let svc = {
                let seen = seen.clone();
                tower::service_fn(move |req: Request<InFlightBody<Empty<bytes::Bytes>>>| {
                    *seen.lock().unwrap() = req.extensions().get::<OverCap>().copied();
                    async {
                        Ok::<_, std::convert::Infallible>(Response::new(
                            Empty::<bytes::Bytes>::new(),
                        ))
                    }
                })
            };
            let state = match probes {
                true => ConnState::of_probes(),
                false => ConnState::default(),
            };
            let svc = tower::Layer::layer(&InFlightLayer::new(Arc::new(state), cap), svc);
            tower::ServiceExt::oneshot(svc, Request::new(Empty::new()))
                .await
                .unwrap();
            let shed = high && !probes;
            assert_eq!(*seen.lock().unwrap(), shed.then_some(OverCap::Memory));
        }
    }

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

    type Faults = Arc<std::sync::Mutex<Vec<Option<HeadFault>>>>;

    /// An HTTP/1 connection served by hyper behind the guard, answering every
    /// request at once (its body read as it comes, by another task) and noting
    /// what the scan found at fault in its head.
    fn serve() -> (
        tokio::io::DuplexStream,
        Faults,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ) {
        use http_body_util::{BodyExt, Full};
        use hyper::body::Incoming;

        let (client, server) = tokio::io::duplex(4096);
        let state = Arc::new(ConnState::default());
        let io = GuardedIo::new(
            server,
            state.clone(),
            Duration::from_secs(10),
            Duration::from_secs(120),
        );
        let faults = Faults::default();
        let svc = {
            let faults = faults.clone();
            tower::service_fn(move |req: Request<InFlightBody<Incoming>>| {
                faults
                    .lock()
                    .unwrap()
                    .push(req.extensions().get::<HeadFault>().copied());
                tokio::spawn(req.into_body().collect());
                async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                        bytes::Bytes::from_static(b"early"),
                    )))
                }
            })
        };
        let svc = tower::Layer::layer(&InFlightLayer::new(state, InFlightCap::new(8)), svc);
        let conn = hyper::server::conn::http1::Builder::new().serve_connection(
            hyper_util::rt::TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(svc),
        );
        (client, faults, tokio::spawn(conn))
    }

    /// A response head, then its 5-byte body.
    async fn response(client: &mut tokio::io::DuplexStream) -> String {
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            client.read_exact(&mut b).await.unwrap();
            got.push(b[0]);
        }
        let mut body = [0u8; 5];
        client.read_exact(&mut body).await.unwrap();
        String::from_utf8(got).unwrap()
    }

    /// A request sent right behind another, in the same read as its head or
    /// its body, is scanned as well: hyper serves it from its own buffer,
    /// without reading again.
    #[tokio::test]
    async fn a_pipelined_request_is_scanned_too() {
        for (second, fault) in [
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                HeadFault::ConflictingFraming,
            ),
            ("GET / HTTP/1.1\r\nHost: a\nx: 1\r\n\r\n", HeadFault::BareLf),
        ] {
            for first in [
                "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nab\n",
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab\n\r\n0\r\n\r\n",
            ] {
                let (mut client, faults, served) = serve();
                client
                    .write_all(format!("{first}{second}").as_bytes())
                    .await
                    .unwrap();
                for _ in 0..2 {
                    let r = tokio::time::timeout(Duration::from_secs(5), response(&mut client))
                        .await
                        .expect("a response");
                    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
                }
                assert_eq!(*faults.lock().unwrap(), vec![None, Some(fault)], "{first}");
                drop(client);
                let _ = served.await;
            }
            // Behind heads that only carry a length, more than the faults
            // kept at once: they take no place, and the fault is still found.
            let (mut client, faults, served) = serve();
            let sized = "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n".repeat(MAX_FAULTS);
            client
                .write_all(format!("{sized}{second}").as_bytes())
                .await
                .unwrap();
            for _ in 0..=MAX_FAULTS {
                let r = tokio::time::timeout(Duration::from_secs(5), response(&mut client))
                    .await
                    .expect("a response");
                assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            }
            let mut expected = vec![None; MAX_FAULTS];
            expected.push(Some(fault));
            assert_eq!(*faults.lock().unwrap(), expected, "{second}");
            drop(client);
            let _ = served.await;
        }
    }

    /// An app may answer before it reads the request body; the client then
    /// sends the rest of it. Those bytes are the body, not the next head: the
    /// next request must not inherit what scanning them would find (a bare LF
    /// in a text body made it a 400), nor their header timer.
    #[tokio::test]
    async fn a_body_read_after_its_response_is_not_taken_for_the_next_head() {
        let (mut client, faults, served) = serve();
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n")
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), response(&mut client))
            .await
            .expect("first response");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        // The body after its response, lines ended by LF alone, and the
        // next request.
        client
            .write_all(b"line1\nline2\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let second = tokio::time::timeout(Duration::from_secs(5), response(&mut client))
            .await
            .expect("second response");
        assert!(second.starts_with("HTTP/1.1 200"), "{second}");
        assert_eq!(*faults.lock().unwrap(), vec![None, None]);
        drop(client);
        let _ = served.await;
    }
}
