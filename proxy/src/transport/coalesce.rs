//! Writes what an HTTP/2 connection produced in one poll of its task at once:
//! responses finished together leave in one write (one TLS record, one system
//! call, one wake-up of the peer) instead of one write each.
//!
//! h2 writes any DATA frame of 256 bytes or more on its own: it flushes before it
//! buffers the next frame. Through a proxy, where a poll of the connection finds
//! several responses ready because their upstream replies were read together,
//! that made one write per response. Here the connection's writes wait in a
//! buffer, and its flushes are noted rather than done while its task is being
//! polled inside [`FlushAfterPoll`]; once that poll returns, the buffer is
//! written and flushed. Nothing waits for another task or another turn of the
//! event loop, so a lone response goes out as soon as it did before.
//!
//! Outside a [`FlushAfterPoll`] poll a flush is done at once. The thread's
//! depth in such polls decides, so a connection must only be polled by the
//! task that wraps it (hyper polls each from its own task; nothing polls one
//! inline under another's).
//!
//! A connection future that ends in the same poll in which its last write found
//! the socket full gets one more try, when it is dropped; then the rest is lost.
//! h2's own shutdown writes everything first: only its ends on a broken socket,
//! an unexpected EOF or hyper's keep-alive timeout skip it.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before they are written whatever the poll: a TLS record's worth,
/// so a large body still streams.
const MAX_PENDING: usize = 16 * 1024;
/// Buffer kept between writes; a larger one, grown for a large poll, is freed.
const RETAIN: usize = 4 * 1024;

thread_local! {
    /// How deep this thread is in [`FlushAfterPoll`] polls.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    /// Connections that noted a flush in the polls under way.
    static NOTED: RefCell<Vec<Arc<dyn Finish>>> = const { RefCell::new(Vec::new()) };
}

/// The IO handed to hyper's HTTP/2: buffers writes, and while its task is in a
/// [`FlushAfterPoll`] poll, notes flushes for the end of that poll.
pub struct Coalesced<T: AsyncWrite + Unpin> {
    state: Arc<Mutex<State<T>>>,
}

struct State<T> {
    io: T,
    pending: Vec<u8>,
    /// Bytes of `pending` already written.
    written: usize,
    /// In `NOTED`, to be written when the poll ends.
    noted: bool,
    /// A write that failed after h2 had been told it was flushed, for the next
    /// write or flush to report.
    failed: Option<io::Error>,
}

/// What [`FlushAfterPoll`] does with a noted connection when its poll ends.
trait Finish: Send + Sync {
    fn finish(&self, cx: &mut Context<'_>);
}

impl<T: AsyncWrite + Unpin + Send> Finish for Mutex<State<T>> {
    fn finish(&self, cx: &mut Context<'_>) {
        let mut st = lock(self);
        st.noted = false;
        // Pending (the socket is full) leaves the task's waker with the socket:
        // when there is room the connection is polled, h2 flushes, and the rest
        // is noted again.
        match st.poll_drain(cx) {
            Poll::Ready(Ok(())) => match Pin::new(&mut st.io).poll_flush(cx) {
                Poll::Ready(Err(e)) => st.fail(e, cx),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            },
            Poll::Ready(Err(e)) => st.fail(e, cx),
            Poll::Pending => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic mid-write leaves bytes, not broken invariants: carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    pub fn new(io: T) -> Self {
        Coalesced {
            state: Arc::new(Mutex::new(State {
                io,
                pending: Vec::new(),
                written: 0,
                noted: false,
                failed: None,
            })),
        }
    }
}

impl<T: AsyncWrite + Unpin> State<T> {
    /// h2 took these bytes as flushed: it learns of the failure at its next
    /// write or flush, so its task is woken to make one.
    fn fail(&mut self, e: io::Error, cx: &mut Context<'_>) {
        self.failed = Some(e);
        cx.waker().wake_by_ref();
    }

    /// One write that does not wait, for a connection being dropped.
    fn drop_write(&mut self) {
        if self.written < self.pending.len() {
            let mut cx = Context::from_waker(Waker::noop());
            if let Poll::Ready(Ok(())) = self.poll_drain(&mut cx) {
                let _ = Pin::new(&mut self.io).poll_flush(&mut cx);
            }
        }
    }

    /// Writes out what is pending.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.pending[self.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        self.pending.clear();
        if self.pending.capacity() > RETAIN {
            self.pending = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_add(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.pending.len() + len > MAX_PENDING {
            std::task::ready!(self.poll_drain(cx))?;
            if len >= MAX_PENDING {
                return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
            }
        }
        if self.pending.capacity() == 0 {
            self.pending.reserve(RETAIN);
        }
        for b in bufs {
            self.pending.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.state).io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin + Send + 'static> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        lock(&self.state).poll_add(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        lock(&self.state).poll_add(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = lock(&self.state);
        if let Some(e) = st.failed.take() {
            return Poll::Ready(Err(e));
        }
        if st.pending.is_empty() {
            return Pin::new(&mut st.io).poll_flush(cx);
        }
        if DEPTH.get() > 0 {
            if !st.noted {
                st.noted = true;
                let noted: Arc<dyn Finish> = self.state.clone();
                NOTED.with_borrow_mut(|n| n.push(noted));
            }
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(st.poll_drain(cx))?;
        Pin::new(&mut st.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = lock(&self.state);
        if let Some(e) = st.failed.take() {
            return Poll::Ready(Err(e));
        }
        std::task::ready!(st.poll_drain(cx))?;
        std::task::ready!(Pin::new(&mut st.io).poll_flush(cx))?;
        Pin::new(&mut st.io).poll_shutdown(cx)
    }
}

/// hyper and h2 drop a connection without shutting it down on some ends (an
/// unexpected EOF, an I/O error, a CONNECT with a body): what they took as
/// flushed gets one write that does not wait. (A noted connection is written by
/// the poll that noted it, which holds it until then.)
impl<T: AsyncWrite + Unpin> Drop for Coalesced<T> {
    fn drop(&mut self) {
        if let Some(st) = Arc::get_mut(&mut self.state) {
            let st = st.get_mut().unwrap_or_else(|e| e.into_inner());
            st.drop_write();
        }
    }
}

pin_project_lite::pin_project! {
    /// Polls a task's future, then writes and flushes every [`Coalesced`]
    /// connection that flushed meanwhile.
    pub struct FlushAfterPoll<F> {
        #[pin]
        inner: F,
    }
}

impl<F> FlushAfterPoll<F> {
    pub fn new(inner: F) -> Self {
        FlushAfterPoll { inner }
    }

    pub fn inner(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().inner
    }
}

impl<F: Future> Future for FlushAfterPoll<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        /// Ends the poll: the depth is restored, and what was noted under it
        /// written (or, if the poll panicked, dropped from the list).
        struct End<'a, 'b> {
            start: usize,
            cx: &'a mut Context<'b>,
        }
        impl Drop for End<'_, '_> {
            fn drop(&mut self) {
                DEPTH.set(DEPTH.get() - 1);
                // Should a write panic, the connections after it are dropped
                // from the list with it rather than left for another poll.
                struct Truncate(usize);
                impl Drop for Truncate {
                    fn drop(&mut self) {
                        NOTED.with_borrow_mut(|n| n.truncate(self.0));
                    }
                }
                let _truncate = Truncate(self.start);
                if std::thread::panicking() {
                    return;
                }
                while let Some(c) =
                    NOTED.with_borrow_mut(|n| if n.len() > self.start { n.pop() } else { None })
                {
                    c.finish(self.cx);
                }
            }
        }
        let start = NOTED.with_borrow(|n| n.len());
        DEPTH.set(DEPTH.get() + 1);
        let end = End { start, cx };
        self.project().inner.poll(&mut *end.cx)
    }
}

/// hyper's executor for HTTP/2 client connections: tokio's, each task in a
/// [`FlushAfterPoll`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FlushAfterPollExecutor;

impl<F> hyper::rt::Executor<F> for FlushAfterPollExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(FlushAfterPoll::new(fut));
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::client::conn::http2::SendRequest;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Records every write that reaches the socket. With `room` set, that many
    /// bytes fit before it reports full, as a peer that stopped reading would.
    #[derive(Clone, Default)]
    struct Socket {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        room: Arc<Mutex<Option<usize>>>,
        broken: Arc<AtomicBool>,
        shut: Arc<AtomicBool>,
    }

    impl Socket {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.writes.lock().unwrap().clone()
        }

        fn sent(&self) -> Vec<u8> {
            self.writes().concat()
        }
    }

    impl AsyncRead for Socket {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.broken.load(Ordering::SeqCst) {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            let mut room = self.room.lock().unwrap();
            let n = match *room {
                Some(0) => return Poll::Pending,
                Some(r) => r.min(buf.len()),
                None => buf.len(),
            };
            if let Some(r) = room.as_mut() {
                *r -= n;
            }
            self.writes.lock().unwrap().push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut.store(true, Ordering::SeqCst);
            Poll::Ready(Ok(()))
        }
    }

    /// What h2 does with responses it finds ready in one poll: each DATA frame
    /// written (vectored: head and payload) and flushed before the next.
    fn write_frames(io: &mut Coalesced<Socket>, cx: &mut Context<'_>, frames: &[&[u8]]) {
        for f in frames {
            let (head, payload) = f.split_at(f.len() / 2);
            let bufs = [io::IoSlice::new(head), io::IoSlice::new(payload)];
            let n = Pin::new(&mut *io).poll_write_vectored(cx, &bufs);
            assert!(matches!(n, Poll::Ready(Ok(n)) if n == f.len()));
            assert!(matches!(
                Pin::new(&mut *io).poll_flush(cx),
                Poll::Ready(Ok(()))
            ));
        }
    }

    #[tokio::test]
    async fn flushes_in_one_poll_leave_in_one_write_when_it_ends() {
        let socket = Socket::default();
        let mut io = Coalesced::new(socket.clone());
        FlushAfterPoll::new(poll_fn(|cx| {
            write_frames(&mut io, cx, &[b"first ", b"second ", b"third"]);
            assert!(socket.writes().is_empty(), "written before the poll ended");
            Poll::Ready(())
        }))
        .await;
        assert_eq!(socket.writes(), vec![b"first second third".to_vec()]);
        // The next poll starts afresh.
        FlushAfterPoll::new(poll_fn(|cx| {
            write_frames(&mut io, cx, &[b"next"]);
            Poll::Ready(())
        }))
        .await;
        assert_eq!(socket.writes()[1], b"next");
    }

    #[tokio::test]
    async fn outside_a_flushing_poll_each_flush_writes() {
        let socket = Socket::default();
        let mut io = Coalesced::new(socket.clone());
        poll_fn(|cx| {
            write_frames(&mut io, cx, &[b"one", b"two"]);
            Poll::Ready(())
        })
        .await;
        assert_eq!(socket.writes(), vec![b"one".to_vec(), b"two".to_vec()]);
    }

    #[tokio::test]
    async fn a_write_failing_after_the_poll_is_reported_by_the_next_write() {
        let socket = Socket::default();
        socket.broken.store(true, Ordering::SeqCst);
        let mut io = Coalesced::new(socket.clone());
        FlushAfterPoll::new(poll_fn(|cx| {
            write_frames(&mut io, cx, &[b"lost"]);
            Poll::Ready(())
        }))
        .await;
        let err = io.write(b"more").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_pending_first() {
        let socket = Socket::default();
        let mut io = Coalesced::new(socket.clone());
        io.write_all(b"goaway").await.unwrap();
        assert!(socket.writes().is_empty());
        io.shutdown().await.unwrap();
        assert_eq!(socket.sent(), b"goaway");
        assert!(socket.shut.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn dropped_without_shutdown_it_still_writes_what_it_took() {
        let socket = Socket::default();
        let mut io = Coalesced::new(socket.clone());
        io.write_all(b"last reply").await.unwrap();
        drop(io);
        assert_eq!(socket.sent(), b"last reply");
    }

    #[tokio::test]
    async fn a_slow_socket_holds_writes_back_and_loses_or_reorders_nothing() {
        let socket = Socket::default();
        *socket.room.lock().unwrap() = Some(5000);
        let mut io = Coalesced::new(socket.clone());
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut accepted = 0;
        poll_fn(|cx| {
            loop {
                let end = (accepted + 3000).min(data.len());
                match Pin::new(&mut io).poll_write(cx, &data[accepted..end]) {
                    Poll::Ready(Ok(n)) => accepted += n,
                    Poll::Pending => return Poll::Ready(()),
                    Poll::Ready(Err(e)) => panic!("{e}"),
                }
                assert!(
                    lock(&io.state).pending.len() <= MAX_PENDING,
                    "buffered past the bound"
                );
            }
        })
        .await;
        assert!(accepted < data.len(), "a full socket pushes back");
        // The peer reads again, a little at a time.
        while accepted < data.len() {
            *socket.room.lock().unwrap() = Some(777);
            let end = (accepted + 3000).min(data.len());
            let polled =
                poll_fn(|cx| Poll::Ready(Pin::new(&mut io).poll_write(cx, &data[accepted..end])));
            if let Poll::Ready(Ok(n)) = polled.await {
                accepted += n;
            }
        }
        *socket.room.lock().unwrap() = None;
        io.shutdown().await.unwrap();
        assert!(socket.sent() == data, "bytes lost or out of order");
    }

    #[tokio::test]
    async fn a_large_write_goes_straight_through_after_what_was_pending() {
        let socket = Socket::default();
        let mut io = Coalesced::new(socket.clone());
        let big = vec![1u8; MAX_PENDING + 1];
        io.write_all(b"head").await.unwrap();
        io.write_all(&big).await.unwrap();
        let w = socket.writes();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0], b"head");
        assert_eq!(w[1].len(), big.len());
    }

    /// Counts the writes below the adapter, on a real connection.
    struct Counted {
        io: tokio::io::DuplexStream,
        writes: Arc<AtomicUsize>,
        broken: Arc<AtomicBool>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.broken.load(Ordering::SeqCst) {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            let r = Pin::new(&mut self.io).poll_write(cx, buf);
            if r.is_ready() {
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
            r
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// An HTTP/2 server and client, both on the adapter as the proxy uses them,
    /// over a pipe that holds `pipe` bytes. The server's handlers (hyper runs
    /// each in a task of its own) wait for `gate`, then answer `body` bytes.
    /// Returns the client, a count of the server's writes and a switch that
    /// breaks the server's socket.
    async fn h2_pair(
        gate: Arc<tokio::sync::Semaphore>,
        arrived: Arc<AtomicUsize>,
        pipe: usize,
        body: usize,
    ) -> (SendRequest<Full<Bytes>>, Arc<AtomicUsize>, Arc<AtomicBool>) {
        let (client, server) = tokio::io::duplex(pipe);
        let writes = Arc::new(AtomicUsize::new(0));
        let broken = Arc::new(AtomicBool::new(false));
        let server = Coalesced::new(Counted {
            io: server,
            writes: writes.clone(),
            broken: broken.clone(),
        });
        let svc = hyper::service::service_fn(move |_: http::Request<hyper::body::Incoming>| {
            let (gate, arrived) = (gate.clone(), arrived.clone());
            async move {
                arrived.fetch_add(1, Ordering::SeqCst);
                gate.acquire().await.unwrap().forget();
                let body = Full::new(Bytes::from(vec![b'x'; body]));
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            }
        });
        tokio::spawn(FlushAfterPoll::new(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server), svc),
        ));
        let client = TokioIo::new(Coalesced::new(client));
        let (send, conn) = hyper::client::conn::http2::handshake(FlushAfterPollExecutor, client)
            .await
            .unwrap();
        tokio::spawn(conn);
        (send, writes, broken)
    }

    async fn get(mut send: SendRequest<Full<Bytes>>) -> usize {
        let req = http::Request::get("http://test/")
            .body(Full::default())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes().len()
    }

    #[tokio::test]
    async fn responses_finished_together_by_their_own_tasks_leave_in_one_write() {
        const N: usize = 8;
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let arrived = Arc::new(AtomicUsize::new(0));
        let (send, writes, _) = h2_pair(gate.clone(), arrived.clone(), 1 << 20, 1024).await;
        let gets: Vec<_> = (0..N).map(|_| tokio::spawn(get(send.clone()))).collect();
        tokio::time::timeout(Duration::from_secs(5), async {
            while arrived.load(Ordering::SeqCst) < N {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every request arrives");
        let before = writes.load(Ordering::SeqCst);
        gate.add_permits(N);
        for g in gets {
            assert_eq!(g.await.unwrap(), 1024);
        }
        // h2 alone writes each 1 KiB DATA frame by itself: N writes or more.
        let made = writes.load(Ordering::SeqCst) - before;
        assert!(made <= 2, "{N} responses took {made} writes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_response_arrives_whole_through_a_full_pipe_on_many_threads() {
        let gate = Arc::new(tokio::sync::Semaphore::new(
            tokio::sync::Semaphore::MAX_PERMITS,
        ));
        let arrived = Arc::new(AtomicUsize::new(0));
        // 40 KiB responses through a pipe that holds 4 KiB: writes wait for room.
        let (send, _, _) = h2_pair(gate, arrived, 4096, 40 * 1024).await;
        for _ in 0..10 {
            let one = tokio::time::timeout(Duration::from_secs(5), get(send.clone()));
            assert_eq!(one.await.expect("a lone response was held back"), 40 * 1024);
        }
        let many: Vec<_> = (0..50).map(|_| tokio::spawn(get(send.clone()))).collect();
        for g in many {
            let got = tokio::time::timeout(Duration::from_secs(10), g).await;
            assert_eq!(got.expect("a response was held back").unwrap(), 40 * 1024);
        }
    }

    #[tokio::test]
    async fn a_socket_that_breaks_after_the_poll_fails_the_request_promptly() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let arrived = Arc::new(AtomicUsize::new(0));
        let (send, _, broken) = h2_pair(gate.clone(), arrived.clone(), 1 << 20, 1024).await;
        let mut send2 = send.clone();
        let got = tokio::spawn(async move {
            let req = http::Request::get("http://test/")
                .body(Full::default())
                .unwrap();
            send2.send_request(req).await.map(|_| ())
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while arrived.load(Ordering::SeqCst) < 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the request arrives");
        // The response is noted, then its write fails: h2 must hear of it and
        // end the connection, rather than wait for a keep-alive to notice.
        broken.store(true, Ordering::SeqCst);
        gate.add_permits(1);
        let ended = tokio::time::timeout(Duration::from_secs(5), got).await;
        assert!(ended.expect("the request hung").unwrap().is_err());
    }
}
