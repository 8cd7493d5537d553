//! Who speaks first on a stream whose client has said nothing yet: the wait
//! the outbound and the inbound paths both make for a silent client, once the
//! connection onward is made.

use std::future::Future;
use std::pin::Pin;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Sleep;

/// What ended the wait for a first word.
pub enum First {
    Client(std::io::Result<usize>),
    /// Spoke, closed or failed: whichever, the stream is the server's.
    Server,
    Idle,
}

/// Waits for the client's first bytes (read into `said`), the server's (its
/// read, `server`), or `idle`. Both at once: the client's decide (HTTP stays
/// HTTP).
pub async fn first_word<C>(
    client: &mut C,
    said: &mut BytesMut,
    server: impl Future<Output = std::io::Result<usize>>,
    idle: Pin<&mut Sleep>,
) -> First
where
    C: AsyncRead + Unpin,
{
    tokio::select! {
        biased;
        r = client.read_buf(said) => First::Client(r),
        _ = server => First::Server,
        () = idle => First::Idle,
    }
}
