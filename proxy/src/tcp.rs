//! Opaque TCP: connect to the destination and copy bytes both ways, preserving
//! half-close, until both sides finish or the stream is idle too long.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::addr::DestAddr;
use crate::dns::Names;
use crate::telemetry::metrics::DirectionLabels;
use crate::telemetry::{Direction, Metrics};
use crate::transport::connect;

#[derive(Clone, Debug)]
pub struct TcpConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Names resolved lately, shared by every stack that connects.
    pub names: Names,
    /// The proxy's shutdown: once it drains, a stream whose app has ended
    /// its side is cut after a quiet moment rather than waited on.
    pub drain: Option<crate::transport::drain::Drain>,
}

/// Connects to `dst` for an opaque stream; a failure is counted and logged.
pub async fn connect(
    dst: &DestAddr,
    cfg: &TcpConfig,
    metrics: &Metrics,
    direction: Direction,
) -> Option<TcpStream> {
    match dial(dst, cfg).await {
        Ok(s) => Some(s),
        Err((reason, e)) => {
            metrics.reject_tcp(direction, reason);
            // Sampled: a client can ask for a port nothing listens on at will.
            strait_otel::sampled!(warn, direction = direction.as_str(), %dst, error = %e, "opaque stream refused");
            None
        }
    }
}

/// Connects to `dst`; on failure, the reason (a metric label) and the error.
pub async fn dial(dst: &DestAddr, cfg: &TcpConfig) -> Result<TcpStream, (&'static str, String)> {
    dial_within(dst, cfg, cfg.connect_timeout).await
}

/// As [`dial`], within `timeout` (a backend's own connect timeout).
pub async fn dial_within(
    dst: &DestAddr,
    cfg: &TcpConfig,
    timeout: Duration,
) -> Result<TcpStream, (&'static str, String)> {
    // One deadline for the lookup and the connect, as HTTP's connects have.
    let deadline = tokio::time::Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let addr = cfg
        .names
        .resolve(dst, timeout)
        .await
        .map_err(|e| ("resolve", e.to_string()))?;
    let failed = match connect::tcp(addr, left()).await {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    // A name's next address, once, when the first refused (one of a name's
    // servers gone), as the app's own resolver and dialler would have tried
    // it: an opaque stream has no retry of its own. Not after a timeout,
    // which has used the time up.
    if matches!(dst, DestAddr::Name(_))
        && matches!(failed, connect::ConnectError::Io { .. })
        && let Ok(next) = cfg.names.resolve(dst, left()).await
        && next != addr
    {
        return connect::tcp(next, left())
            .await
            .map_err(|e| ("connect", e.to_string()));
    }
    Err(("connect", failed.to_string()))
}

/// A connection that can be reset rather than closed. When a stream fails
/// (one side reset it, or a peer proxy cut it without a TLS close), the other
/// side must not read a clean end: an app would take a truncated upload for
/// a whole one.
pub trait Abort {
    /// Makes the connection send a reset (RST) when it is dropped.
    fn abort(&self);
}

impl Abort for TcpStream {
    fn abort(&self) {
        let _ = self.set_zero_linger();
    }
}

impl<T: Abort + ?Sized> Abort for Box<T> {
    fn abort(&self) {
        (**self).abort()
    }
}

impl<T: Abort + ?Sized> Abort for &mut T {
    fn abort(&self) {
        (**self).abort()
    }
}

impl<T: Abort> Abort for tokio_rustls::client::TlsStream<T> {
    fn abort(&self) {
        self.get_ref().0.abort()
    }
}

impl<T: Abort> Abort for tokio_rustls::server::TlsStream<T> {
    fn abort(&self) {
        self.get_ref().0.abort()
    }
}

/// How a spliced stream ended.
#[derive(Debug)]
pub struct Spliced<S = std::convert::Infallible> {
    /// Bytes that reached the client from upstream.
    pub down: u64,
    /// What failed on the upstream's side, if anything did.
    pub upstream_failed: Option<std::io::ErrorKind>,
    /// What ended it, when `stop` did.
    pub stopped: Option<S>,
}

/// How long a clean close of a stream may take before it is dropped.
pub(crate) const CLOSE_WITHIN: Duration = Duration::from_millis(100);

/// Copies both ways between `client` and an already connected `upstream`.
/// When either side fails, the sides still open are reset.
pub async fn splice<I, U>(
    client: I,
    upstream: U,
    dst: &(dyn std::fmt::Display + Sync),
    cfg: &TcpConfig,
    metrics: &Metrics,
    direction: Direction,
) -> Spliced
where
    I: AsyncRead + AsyncWrite + Abort + Unpin,
    U: AsyncRead + AsyncWrite + Abort + Unpin,
{
    let never = std::future::pending::<std::convert::Infallible>();
    splice_until(client, upstream, dst, cfg, metrics, direction, never).await
}

/// As [`splice`], until `stop` (a policy revoked): then both sides are
/// reset, as a stream cut short.
pub async fn splice_until<I, U, S>(
    client: I,
    upstream: U,
    dst: &(dyn std::fmt::Display + Sync),
    cfg: &TcpConfig,
    metrics: &Metrics,
    direction: Direction,
    stop: impl std::future::Future<Output = S>,
) -> Spliced<S>
where
    I: AsyncRead + AsyncWrite + Abort + Unpin,
    U: AsyncRead + AsyncWrite + Abort + Unpin,
{
    let labels = DirectionLabels { direction };
    let activity = Arc::new(Activity::new());
    let mut client = Counted::new(
        client,
        Some(Metered {
            activity: activity.clone(),
            read: metrics.tcp_read_bytes.get_or_create(&labels).clone(),
            written: metrics.tcp_write_bytes.get_or_create(&labels).clone(),
        }),
    );
    // Metered on the client's side (both directions pass it); watched on both.
    let mut upstream = Counted::new(upstream, None);
    // A drain waits for the app's end (the app is gone by then), passed on
    // through the other side's write half: the client's inbound, the
    // upstream's outbound. The far side's end is the app's to answer.
    let app_ends = match direction {
        Direction::Inbound => &mut client.ends,
        Direction::Outbound => &mut upstream.ends,
    };
    *app_ends = Some(activity.clone());
    let mut sides = Sides {
        client,
        upstream,
        over: false,
    };
    let Sides {
        client, upstream, ..
    } = &mut sides;
    let mut ended = Spliced {
        down: 0,
        upstream_failed: None,
        stopped: None,
    };
    tokio::select! {
        // A revocation is acted on before any more bytes move.
        biased;
        s = stop => {
            ended.stopped = Some(s);
            client.inner.abort();
            upstream.inner.abort();
        }
        r = tokio::io::copy_bidirectional(client, upstream) => match r {
            Ok((up, down)) => debug!(direction = direction.as_str(), %dst, up, down, "opaque stream closed"),
            Err(e) => {
                debug!(direction = direction.as_str(), %dst, error = %e, "opaque stream failed; resetting it");
                ended.upstream_failed = upstream.failed;
                // A side whose end was already passed on (its write half
                // shut, what was sent before it flushed) keeps it, as far
                // as the kernel lets it: a socket closed with unread input
                // is reset whatever was asked.
                if !client.shut {
                    client.inner.abort();
                }
                if !upstream.shut {
                    upstream.inner.abort();
                }
            }
        },
        _ = activity.idle_for(cfg.idle_timeout) => {
            strait_otel::sampled!(info, direction = direction.as_str(), %dst, idle = ?cfg.idle_timeout, "opaque stream idle, closed");
            // Cleanly, both at once: a peer proxy resets its app's side of
            // a stream cut without a TLS close, and nothing failed here.
            use tokio::io::AsyncWriteExt as _;
            let closed = async { tokio::join!(client.shutdown(), upstream.shutdown()) };
            let _ = tokio::time::timeout(CLOSE_WITHIN, closed).await;
        }
        // Shutting down, once the app's side is over and nothing has moved
        // for a moment: the kubelet stops the proxy after its pod's app has
        // exited, which ended each of the app's streams. The other side (an
        // idle pooled client, waiting to be used) may not say it is done for
        // minutes, and would hold the shutdown until its grace period ends.
        // An answer still coming to an app that half-closed keeps it going.
        // The side still open is reset, as at the grace period's end (what
        // it sent was not all taken); the one the app's end was passed to
        // keeps it, and what the kernel has still to deliver of it.
        _ = app_ended_while_draining(cfg.drain.as_ref(), &activity) => {
            debug!(direction = direction.as_str(), %dst, "draining: a stream its app has ended, quiet since, cut");
            if !client.shut {
                client.inner.abort();
            }
            if !upstream.shut {
                upstream.inner.abort();
            }
        }
    }
    ended.down = client.written_here;
    sides.over = true;
    ended
}

/// How long a stream whose app has ended may go quiet, draining, before it
/// is cut.
const QUIET_AFTER_APP_END: Duration = Duration::from_secs(1);

/// Resolves once the proxy drains, the app's side of the stream has ended
/// and nothing has moved since for `QUIET_AFTER_APP_END`; never without a
/// drain.
async fn app_ended_while_draining(drain: Option<&crate::transport::drain::Drain>, a: &Activity) {
    match drain {
        Some(d) => {
            // The stream's own signal first: a stream whose app has not
            // ended waits on nothing shared.
            a.app_ended().await;
            d.signaled().await;
            a.idle_for(QUIET_AFTER_APP_END).await;
        }
        None => std::future::pending().await,
    }
}

/// Both sides of a stream while it is spliced. Dropped before its end (cut
/// when the grace period is over, or the process exits), it resets both:
/// each app must see that the stream was cut, not read a clean end.
struct Sides<I: Abort, U: Abort> {
    client: Counted<I>,
    upstream: Counted<U>,
    over: bool,
}

impl<I: Abort, U: Abort> Drop for Sides<I, U> {
    fn drop(&mut self) {
        if !self.over {
            self.client.inner.abort();
            self.upstream.inner.abort();
        }
    }
}

/// When bytes last moved, in milliseconds since the stream started, and
/// whether the app's side has ended.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    app_ended: std::sync::atomic::AtomicBool,
    ended: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            app_ended: Default::default(),
            ended: tokio::sync::Notify::new(),
        }
    }

    /// The app's end was passed on to the other side: the quiet a drain
    /// waits for counts from here.
    fn end(&self) {
        self.touch();
        self.app_ended.store(true, Ordering::Release);
        self.ended.notify_waiters();
    }

    async fn app_ended(&self) {
        loop {
            // Made before the look: a notification between the two is kept.
            let ended = self.ended.notified();
            if self.app_ended.load(Ordering::Acquire) {
                return;
            }
            ended.await;
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The byte counters and idle timer one side of a stream feeds.
struct Metered {
    activity: Arc<Activity>,
    read: Counter,
    written: Counter,
}

pin_project_lite::pin_project! {
    struct Counted<I> {
        #[pin]
        inner: I,
        metered: Option<Metered>,
        // Told when this side's write half is shut (the app's end passed on).
        ends: Option<Arc<Activity>>,
        // This stream's bytes written to this side.
        written_here: u64,
        // Its write half shut down: its end was passed on.
        shut: bool,
        // What failed on it, if anything did.
        failed: Option<std::io::ErrorKind>,
    }
}

impl<I> Counted<I> {
    fn new(inner: I, metered: Option<Metered>) -> Self {
        Counted {
            inner,
            metered,
            ends: None,
            written_here: 0,
            shut: false,
            failed: None,
        }
    }
}

/// Notes what failed.
fn noted<T>(
    failed: &mut Option<std::io::ErrorKind>,
    p: std::task::Poll<std::io::Result<T>>,
) -> std::task::Poll<std::io::Result<T>> {
    if let std::task::Poll::Ready(Err(e)) = &p {
        failed.get_or_insert(e.kind());
    }
    p
}

impl<I: AsyncRead> AsyncRead for Counted<I> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = noted(this.failed, this.inner.poll_read(cx, buf));
        let n = buf.filled().len() - before;
        if n > 0
            && let Some(m) = this.metered
        {
            m.read.inc_by(n as u64);
            m.activity.touch();
        }
        res
    }
}

impl<I: AsyncWrite> AsyncWrite for Counted<I> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.project();
        let res = noted(this.failed, this.inner.poll_write(cx, buf));
        if let std::task::Poll::Ready(Ok(n)) = res {
            *this.written_here += n as u64;
            if let Some(m) = this.metered {
                m.written.inc_by(n as u64);
                m.activity.touch();
            }
        }
        res
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        noted(this.failed, this.inner.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let res = noted(this.failed, this.inner.poll_shutdown(cx));
        if let std::task::Poll::Ready(Ok(())) = res {
            *this.shut = true;
            if let Some(a) = this.ends {
                a.end();
            }
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A name one of whose addresses refuses connections is reached at the
    /// other, every time: an opaque stream has no retry of its own.
    #[tokio::test]
    async fn a_name_s_next_address_is_tried_when_one_refuses() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_addr = open.local_addr().unwrap();
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = open.accept().await {
                held.push(s);
            }
        });
        let cfg = TcpConfig {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            names: Names::with_resolver(Arc::new(move |_: &str, _| Ok(vec![closed, open_addr]))),
            drain: None,
        };
        let db: DestAddr = "db.example:5432".parse().unwrap();
        for i in 0..4 {
            let s = dial(&db, &cfg).await;
            assert!(s.is_ok(), "connection {i}: {:?}", s.err());
        }
    }

    /// A client and an upstream on loopback, the proxy's two ends of each,
    /// and the splice between those running.
    async fn spliced<S: Send + 'static>(
        idle: Duration,
        stop: impl std::future::Future<Output = S> + Send + 'static,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Spliced<S>>) {
        spliced_with(idle, stop, None).await
    }

    /// As `spliced`, with the proxy's drain.
    async fn spliced_with<S: Send + 'static>(
        idle: Duration,
        stop: impl std::future::Future<Output = S> + Send + 'static,
        drain: Option<crate::transport::drain::Drain>,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Spliced<S>>) {
        let pair = async || {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let near = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (far, _) = l.accept().await.unwrap();
            (near, far)
        };
        let (client, proxy_client) = pair().await;
        let (proxy_upstream, upstream) = pair().await;
        let cfg = TcpConfig {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: idle,
            names: Default::default(),
            drain,
        };
        let task = tokio::spawn(async move {
            let m = Metrics::new();
            let dst = "upstream";
            splice_until(
                proxy_client,
                proxy_upstream,
                &dst,
                &cfg,
                &m,
                Direction::Outbound,
                stop,
            )
            .await
        });
        (client, upstream, task)
    }

    /// How a peer's connection ends: cleanly (EOF) or reset.
    async fn ends_cleanly(s: &mut TcpStream) -> bool {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest));
        read.await.expect("the connection ends").is_ok()
    }

    #[tokio::test]
    async fn a_failure_resets_the_other_side_and_a_clean_end_stays_clean() {
        // The client resets: the upstream sees a reset, not a clean end.
        let never = std::future::pending::<()>();
        let (mut client, mut upstream, task) = spliced(Duration::from_secs(60), never).await;
        client.write_all(b"part").await.unwrap();
        let mut got = [0u8; 4];
        upstream.read_exact(&mut got).await.unwrap();
        client.set_zero_linger().unwrap();
        drop(client);
        assert!(
            !ends_cleanly(&mut upstream).await,
            "the upstream saw a clean end"
        );
        assert!(task.await.unwrap().stopped.is_none());

        // Both close cleanly: both see clean ends.
        let never = std::future::pending::<()>();
        let (mut client, mut upstream, task) = spliced(Duration::from_secs(60), never).await;
        client.write_all(b"whole").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"whole");
        upstream.shutdown().await.unwrap();
        assert!(ends_cleanly(&mut client).await);
        let ended = task.await.unwrap();
        assert_eq!(ended.upstream_failed, None);
    }

    #[tokio::test]
    async fn an_idle_stream_closes_cleanly_and_a_stopped_one_is_reset() {
        let never = std::future::pending::<()>();
        let (mut client, mut upstream, _task) = spliced(Duration::from_millis(200), never).await;
        assert!(
            ends_cleanly(&mut upstream).await,
            "idle: the upstream was reset"
        );
        assert!(
            ends_cleanly(&mut client).await,
            "idle: the client was reset"
        );

        let (stop, stopped) = tokio::sync::oneshot::channel::<&'static str>();
        let stopped = async move { stopped.await.unwrap_or("dropped") };
        let (mut client, mut upstream, task) = spliced(Duration::from_secs(60), stopped).await;
        client.write_all(b"part").await.unwrap();
        let mut got = [0u8; 4];
        upstream.read_exact(&mut got).await.unwrap();
        stop.send("revoked").unwrap();
        assert_eq!(task.await.unwrap().stopped, Some("revoked"));
        assert!(
            !ends_cleanly(&mut upstream).await,
            "stopped: the upstream saw a clean end"
        );
        assert!(
            !ends_cleanly(&mut client).await,
            "stopped: the client saw a clean end"
        );
    }

    /// Draining, a stream carries on while its app's side is open, the far
    /// side's end passed on; once the app's side ends (the app, gone before
    /// its proxy is stopped) and nothing moves for a moment, it is cut,
    /// though the far side (an idle pooled client, inbound) says nothing.
    /// Outbound here: the app is the client.
    #[tokio::test]
    async fn draining_cuts_a_stream_once_its_app_has_ended() {
        let (trigger, drain) = crate::transport::drain::channel();
        let never = std::future::pending::<()>();
        let (mut app, mut far, task) =
            spliced_with(Duration::from_secs(60), never, Some(drain)).await;
        trigger.drain();
        far.shutdown().await.unwrap();
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).await.unwrap();
        app.write_all(b"more").await.unwrap();
        let mut got = [0u8; 4];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"more", "draining, the app's side carries on");
        app.shutdown().await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(
            ended
                .expect("cut once the app ended")
                .unwrap()
                .upstream_failed
                .is_none()
        );
    }

    /// An app that half-closes and waits for its answer gets it whole while
    /// the proxy drains: the far side's answer, 200 ms in coming, keeps the
    /// stream.
    #[tokio::test]
    async fn draining_leaves_an_answer_on_its_way_to_the_app() {
        let (trigger, drain) = crate::transport::drain::channel();
        let never = std::future::pending::<()>();
        let (mut app, mut far, task) =
            spliced_with(Duration::from_secs(60), never, Some(drain)).await;
        trigger.drain();
        app.write_all(b"ask").await.unwrap();
        app.shutdown().await.unwrap();
        let mut asked = Vec::new();
        far.read_to_end(&mut asked).await.unwrap();
        assert_eq!(asked, b"ask");
        // The far side's time to answer.
        tokio::time::sleep(Duration::from_millis(200)).await;
        far.write_all(&[7u8; 65536]).await.unwrap();
        far.shutdown().await.unwrap();
        let mut answer = Vec::new();
        app.read_to_end(&mut answer)
            .await
            .expect("the answer, not a reset");
        assert_eq!(answer.len(), 65536);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ended with both sides")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timer_restarts_on_activity() {
        let a = Activity::new();
        tokio::time::advance(Duration::from_secs(30)).await;
        a.touch();
        let start = Instant::now();
        a.idle_for(Duration::from_secs(60)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }
}
