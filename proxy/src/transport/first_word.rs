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

/// The server's side decided `first` with `greeting`: unless that is an
/// HTTP/2 server's SETTINGS, then the client's first bytes (or `idle`) are
/// waited for still.
pub async fn unless_http2_settings<C>(
    first: First<()>,
    greeting: &[u8],
    client: &mut C,
    said: &mut BytesMut,
    idle: Pin<&mut Sleep>,
) -> First<()>
where
    C: AsyncRead + Unpin,
{
    if matches!(first, First::Server(())) && http2_server_settings(greeting) {
        return first_word(client, said, std::future::pending::<()>(), idle).await;
    }
    first
}

/// Whether a server's first bytes are an HTTP/2 server's SETTINGS frame
/// (a length that is a multiple of 6, type 4, no flags, stream 0). An HTTP/2
/// server (h2, grpc-go, Netty) sends it as soon as it accepts, then waits for
/// the client's preface: that is no greeting of a server-speaks-first
/// protocol, and the client's words must still decide, or its HTTP/2 would
/// pass raw, past the HTTP stack, with whatever `strait-client-id` it claims.
pub fn http2_server_settings(greeting: &[u8]) -> bool {
    match greeting {
        [l0, l1, l2, 4, 0, 0, 0, 0, 0, ..] => {
            u32::from_be_bytes([0, *l0, *l1, *l2]).is_multiple_of(6)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http2_server_s_settings_are_told_from_greetings() {
        // h2's first frame: SETTINGS with three settings.
        assert!(http2_server_settings(&[0, 0, 18, 4, 0, 0, 0, 0, 0, 0, 3]));
        assert!(http2_server_settings(&[0, 0, 0, 4, 0, 0, 0, 0, 0]));
        for greeting in [
            &b"220 smtp.test ESMTP\r\n"[..],
            // MySQL's handshake: a 3-byte length, sequence 0.
            &[74, 0, 0, 0, 10, b'8', b'.', b'0', b'.', b'3'][..],
            // A SETTINGS ACK, a frame on a stream, a length not of settings.
            &[0, 0, 0, 4, 1, 0, 0, 0, 0][..],
            &[0, 0, 6, 4, 0, 0, 0, 0, 1][..],
            &[0, 0, 7, 4, 0, 0, 0, 0, 0][..],
            // Too short to tell.
            &[0, 0, 0, 4][..],
        ] {
            assert!(!http2_server_settings(greeting), "{greeting:?}");
        }
    }
}
