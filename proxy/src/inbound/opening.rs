//! An opaque stream to the app that turns out to be a request after all.
//!
//! Detection carries a stream that opens with control bytes as opaque at
//! once (binary protocols open so), unless a whole request line follows them
//! in what it read. Netty skips those bytes before a request line, so a
//! client that pauses after them would have its request, with a forged
//! `strait-client-id`, parsed by the app past the HTTP stack. The stream's
//! opening is read as it goes on to the app, and the stream is ended before
//! the bytes that would complete such a request line reach it.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::detect::{Opening, OpeningWatch};

pin_project_lite::pin_project! {
    pub struct GuardedOpening<I> {
        #[pin]
        inner: I,
        // The stream's opening, while it may yet become a request line;
        // `None` once it cannot.
        watch: Option<OpeningWatch>,
        refused: Counter,
    }
}

impl<I> GuardedOpening<I> {
    /// `refused` counts the streams ended.
    pub fn new(inner: I, max_bytes: usize, refused: Counter) -> Self {
        GuardedOpening {
            inner,
            watch: Some(OpeningWatch::new(max_bytes)),
            refused,
        }
    }

    /// A stream on a port declared opaque: never taken for HTTP.
    pub fn unguarded(inner: I) -> Self {
        GuardedOpening {
            inner,
            watch: None,
            refused: Counter::default(),
        }
    }
}

impl<I: AsyncRead> AsyncRead for GuardedOpening<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.inner.poll_read(cx, buf))?;
        let Some(watch) = this.watch else {
            return Poll::Ready(Ok(()));
        };
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return Poll::Ready(Ok(()));
        }
        match watch.feed(new) {
            Opening::Undecided => {}
            Opening::NotARequest => *this.watch = None,
            Opening::Request => {
                // Nothing of what completes the line reaches the app.
                buf.set_filled(before);
                this.refused.inc();
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "an HTTP request line after control bytes",
                )));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: crate::tcp::Abort> crate::tcp::Abort for GuardedOpening<I> {
    fn abort(&self) {
        self.inner.abort()
    }
}

/// The app has said something to the client: an HTTP/1 server says nothing
/// before a whole request head (an HTTP/2 server's first SETTINGS come here
/// only once the client's own bytes were found not to be HTTP, `settle`),
/// so the stream is something else (a SOCKS
/// tunnel may carry HTTP after its binary handshake, a server greets).
fn spoke(watch: &mut Option<OpeningWatch>, written: &std::io::Result<usize>) {
    if matches!(written, Ok(n) if *n > 0) {
        *watch = None;
    }
}

impl<I: AsyncWrite> AsyncWrite for GuardedOpening<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = ready!(this.inner.poll_write(cx, buf));
        spoke(this.watch, &r);
        Poll::Ready(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = ready!(this.inner.poll_write_vectored(cx, bufs));
        spoke(this.watch, &r);
        Poll::Ready(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Reads what the guard lets through until it ends the stream or the
    /// client closes.
    async fn through(chunks: &[&[u8]]) -> (Vec<u8>, bool, u64) {
        let (mut client, server) = tokio::io::duplex(1024);
        let refused = Counter::default();
        let mut g = GuardedOpening::new(server, 8192, refused.clone());
        let mut got = Vec::new();
        let mut ended = false;
        for c in chunks {
            client.write_all(c).await.unwrap();
            let mut b = [0u8; 512];
            match g.read(&mut b).await {
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
                    ended = true;
                    break;
                }
            }
        }
        (got, ended, refused.get())
    }

    #[tokio::test]
    async fn a_request_line_that_follows_control_bytes_late_never_reaches_the_app() {
        let (got, ended, refused) = through(&[
            b"\x00GET /admin HT",
            b"TP/1.1\r\nstrait-client-id: spiffe://x/ns/a/sa/admin\r\n\r\n",
        ])
        .await;
        assert!(ended, "the stream ends");
        assert_eq!(got, b"\x00GET /admin HT", "the line is never completed");
        assert_eq!(refused, 1);
        // One control byte at a time, then the line.
        let (got, ended, _) = through(&[b"\x00", b"\x01", b"GET / HTTP/1.1\n"]).await;
        assert!(ended);
        assert_eq!(got, b"\x00\x01");
    }

    /// Once the app has spoken, the stream is no HTTP request: a SOCKS5
    /// tunnel's binary handshake may be followed by HTTP.
    #[tokio::test]
    async fn a_stream_the_app_has_answered_is_carried_whatever_follows() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut g = GuardedOpening::new(server, 8192, Counter::default());
        let mut b = [0u8; 512];
        client.write_all(b"\x05\x01\x00").await.unwrap();
        assert_eq!(g.read(&mut b).await.unwrap(), 3);
        g.write_all(b"\x05\x00").await.unwrap();
        let connect = b"\x05\x01\x00\x01\x0a\x00\x01\x17\x1f\x90GET / HTTP/1.1\r\n\r\n";
        client.write_all(connect).await.unwrap();
        let n = g.read(&mut b).await.expect("carried");
        assert_eq!(&b[..n], connect);
    }

    #[tokio::test]
    async fn binary_protocols_are_carried_whole() {
        let frames: [&[u8]; 3] = [
            b"\x00\x00\x00\x05hello",
            b"\x00\x00\x00\x05world",
            b"GET / HTTP/1.1\r\n",
        ];
        let (got, ended, refused) = through(&frames).await;
        assert!(!ended, "carried");
        assert_eq!(got, frames.concat());
        assert_eq!(refused, 0);
    }
}
