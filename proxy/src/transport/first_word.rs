//! Who speaks first on a stream whose client has said nothing yet: the wait
//! the outbound and the inbound paths both make for a silent client, once the
//! connection onward is made.

use std::future::Future;
use std::pin::Pin;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Sleep;

/// What ended the wait for a first word.
pub enum First<T> {
    Client(std::io::Result<usize>),
    /// The server's side finished first: connected, or (once connected) it
    /// spoke, closed or failed, and whichever it was, the stream is the server's.
    Server(T),
    Idle,
}

impl<T> First<T> {
    /// What ended the wait, whatever the server's side gave.
    pub fn ended(self) -> First<()> {
        match self {
            First::Client(r) => First::Client(r),
            First::Server(_) => First::Server(()),
            First::Idle => First::Idle,
        }
    }
}

/// Waits for the client's first bytes (read into `said`), the server's side
/// (the connection onward being made, or once made its first read), or
/// `idle`. Both at once: the client's bytes decide (HTTP stays HTTP).
pub async fn first_word<C, F>(
    client: &mut C,
    said: &mut BytesMut,
    server: F,
    idle: Pin<&mut Sleep>,
) -> First<F::Output>
where
    C: AsyncRead + Unpin,
    F: Future,
{
    tokio::select! {
        biased;
        r = client.read_buf(said) => First::Client(r),
        out = server => First::Server(out),
        () = idle => First::Idle,
    }
}
