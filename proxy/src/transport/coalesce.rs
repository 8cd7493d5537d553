//! Groups an HTTP/2 connection's writes until the runtime has run every task
//! that was ready, so that responses finished in one turn of the event loop
//! leave in one write (one TLS record, one system call, one wake-up of the peer).
//!
//! h2 writes any DATA frame of 256 bytes or more on its own: it flushes before it
//! buffers the next frame. Through a proxy, where responses finish together
//! because their upstream replies were read together, that made one write per
//! response. Here a flush with bytes pending is put off once: the bytes wait in
//! a buffer, the task is woken after the runtime next polls for I/O (tokio's
//! `yield_now`), and the first call after that writes them. A second flush in the
//! same turn adds to the same write.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before a write goes out whatever the turn: a TLS record's worth,
/// so a large body still streams.
const MAX_PENDING: usize = 16 * 1024;

pub struct Coalesced<T> {
    io: T,
    pending: Vec<u8>,
    /// Bytes of `pending` already written.
    written: usize,
    /// Set once a flush has been put off, until the turn has passed.
    turn: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    passed: Arc<TurnPassed>,
}

/// Woken by the runtime once it has polled for I/O after the put-off flush.
#[derive(Default)]
struct TurnPassed {
    passed: AtomicBool,
    task: AtomicWaker,
}

impl Wake for TurnPassed {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.passed.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<T> Coalesced<T> {
    pub fn new(io: T) -> Self {
        Coalesced {
            io,
            pending: Vec::new(),
            written: 0,
            turn: None,
            passed: Arc::default(),
        }
    }

    fn turn_passed(&self) -> bool {
        self.turn.is_some() && self.passed.passed.load(Ordering::Acquire)
    }

    /// Puts the write off to the end of the runtime's turn; the task is woken then.
    fn defer(&mut self, cx: &mut Context<'_>) {
        self.passed.task.register(cx.waker());
        if self.turn.is_none() {
            self.passed.passed.store(false, Ordering::Release);
            let mut turn: Pin<Box<dyn Future<Output = ()> + Send + Sync>> =
                Box::pin(tokio::task::yield_now());
            let waker = Waker::from(self.passed.clone());
            // The first poll only hands the waker to the runtime.
            let _ = turn.as_mut().poll(&mut Context::from_waker(&waker));
            self.turn = Some(turn);
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
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
        self.turn = None;
        Poll::Ready(Ok(()))
    }

    fn poll_add(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.turn_passed() {
            std::task::ready!(self.poll_drain(cx))?;
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.pending.len() + len > MAX_PENDING {
            std::task::ready!(self.poll_drain(cx))?;
            if len >= MAX_PENDING {
                return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
            }
        }
        if self.pending.capacity() == 0 {
            // Sized once, never grown: at most MAX_PENDING is ever held.
            self.pending.reserve_exact(MAX_PENDING);
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
        let this = self.get_mut();
        // A connection's task reads first when polled: the put-off write goes
        // out now. If the socket is full it waits for room; reading goes on.
        if this.turn_passed()
            && let Poll::Ready(Err(e)) = this.poll_drain(cx)
        {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_add(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_add(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        if !this.turn_passed() {
            this.defer(cx);
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        std::task::ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// Records every write that reaches the socket; `room` bytes fit before it
    /// reports full, as a peer that stopped reading would.
    #[derive(Clone, Default)]
    struct Socket {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        room: Arc<Mutex<Option<usize>>>,
        shut: Arc<AtomicBool>,
    }

    impl Socket {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.writes.lock().unwrap().clone()
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

    /// What h2 does with three responses finished in one turn: each DATA frame
    /// written and flushed before the next.
    fn write_frames(io: &mut Coalesced<Socket>, cx: &mut Context<'_>, frames: &[&[u8]]) {
        for f in frames {
            let n = Pin::new(&mut *io).poll_write(cx, f);
            assert!(matches!(n, Poll::Ready(Ok(n)) if n == f.len()));
            assert!(Pin::new(&mut *io).poll_flush(cx).is_ready());
        }
    }

    /// Polls the connection as its task would once woken (it reads first) until
    /// the socket has seen a write.
    async fn until_written(io: &mut Coalesced<Socket>, socket: &Socket) {
        let polled = poll_fn(|cx| {
            let mut b = [0u8; 16];
            let _ = Pin::new(&mut *io).poll_read(cx, &mut ReadBuf::new(&mut b));
            if socket.writes().is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        });
        tokio::time::timeout(Duration::from_secs(5), polled)
            .await
            .expect("the put-off write never went out");
    }

    #[tokio::test]
    async fn flushes_in_one_turn_leave_in_one_write() {
        let socket = Socket::default();
        let mut io = Coalesced::new(socket.clone());
        poll_fn(|cx| {
            write_frames(&mut io, cx, &[b"first ", b"second ", b"third"]);
            Poll::Ready(())
        })
        .await;
        assert!(
            socket.writes().is_empty(),
            "nothing is written before the turn ends"
        );
        until_written(&mut io, &socket).await;
        assert_eq!(socket.writes(), vec![b"first second third".to_vec()]);
    }

    #[tokio::test]
    async fn a_lone_flush_is_written_without_further_traffic() {
        let socket = Socket::default();
        let mut io = Coalesced::new(socket.clone());
        poll_fn(|cx| {
            write_frames(&mut io, cx, &[b"only"]);
            Poll::Ready(())
        })
        .await;
        until_written(&mut io, &socket).await;
        assert_eq!(socket.writes(), vec![b"only".to_vec()]);
        // And the next turn starts afresh.
        poll_fn(|cx| {
            write_frames(&mut io, cx, &[b"next"]);
            Poll::Ready(())
        })
        .await;
        assert_eq!(socket.writes().len(), 1);
        let polled = poll_fn(|cx| {
            let mut b = [0u8; 16];
            let _ = Pin::new(&mut io).poll_read(cx, &mut ReadBuf::new(&mut b));
            if socket.writes().len() == 2 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        tokio::time::timeout(Duration::from_secs(5), polled)
            .await
            .unwrap();
        assert_eq!(socket.writes()[1], b"next");
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_pending_first() {
        let socket = Socket::default();
        let mut io = Coalesced::new(socket.clone());
        poll_fn(|cx| {
            write_frames(&mut io, cx, &[b"goaway"]);
            Poll::Ready(())
        })
        .await;
        tokio::io::AsyncWriteExt::shutdown(&mut io).await.unwrap();
        assert_eq!(socket.writes(), vec![b"goaway".to_vec()]);
        assert!(socket.shut.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_full_socket_holds_writes_back_and_loses_nothing() {
        let socket = Socket::default();
        *socket.room.lock().unwrap() = Some(0);
        let mut io = Coalesced::new(socket.clone());
        let chunk = vec![7u8; 4096];
        let mut accepted = 0;
        poll_fn(|cx| {
            loop {
                match Pin::new(&mut io).poll_write(cx, &chunk) {
                    Poll::Ready(Ok(n)) => accepted += n,
                    Poll::Pending => return Poll::Ready(()),
                    Poll::Ready(Err(e)) => panic!("{e}"),
                }
                assert!(accepted <= MAX_PENDING, "buffered past the bound");
            }
        })
        .await;
        assert_eq!(accepted, MAX_PENDING);
        // The peer reads again: everything accepted arrives, in order.
        *socket.room.lock().unwrap() = None;
        tokio::io::AsyncWriteExt::shutdown(&mut io).await.unwrap();
        let sent: usize = socket.writes().iter().map(Vec::len).sum();
        assert_eq!(sent, accepted);
    }

    #[tokio::test]
    async fn a_large_write_goes_straight_through_after_what_was_pending() {
        let socket = Socket::default();
        let mut io = Coalesced::new(socket.clone());
        let big = vec![1u8; MAX_PENDING + 1];
        poll_fn(|cx| {
            write_frames(&mut io, cx, &[b"head"]);
            assert!(matches!(Pin::new(&mut io).poll_write(cx, &big), Poll::Ready(Ok(n)) if n == big.len()));
            Poll::Ready(())
        })
        .await;
        let w = socket.writes();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0], b"head");
        assert_eq!(w[1].len(), big.len());
    }
}
