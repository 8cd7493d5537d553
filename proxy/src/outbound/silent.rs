//! A client that says nothing within the detection timeout. It is either a
//! server-speaks-first protocol waiting for its greeting, or a client that
//! connected ahead of its first request: HTTP clients' pools do (hyper's when a
//! connection it was opening is no longer needed, Go's and Java's warm pools).
//! Waiting longer would stall the first; taking the connection for opaque TCP
//! would carry the second's requests past their routes (weights, retries,
//! timeouts), pinned to one endpoint for the connection's life.
//!
//! So the opaque stream's connection is made at once, and whoever speaks first
//! decides. The server: the stream is opaque. The client: its bytes are
//! detected as any client's are, and when they are HTTP the connection made for
//! nothing is closed unused.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::DIRECTION;
use super::logical::Builder;
use super::opaque;
use crate::addr::{ClientAddr, DestAddr};
use crate::control::discovery::Resolved;
use crate::detect::Protocol;
use crate::proxy::Shared;
use crate::transport::PrefixedIo;

/// Who spoke first.
enum First {
    Client(std::io::Result<usize>),
    Server,
}

/// Carries a silent client's stream to its end when it turns out opaque, or
/// returns it, with what it said, when it is HTTP.
pub async fn settle<I>(
    s: &Shared,
    b: &Builder,
    mut io: I,
    dst: DestAddr,
    resolved: Option<Resolved>,
    client: ClientAddr,
) -> Option<(Protocol, PrefixedIo<I>)>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    // Without a connection (no endpoint, refused), there is no server to speak:
    // wait for the client, as an unmeshed client would wait on its own socket.
    let mut up = opaque::connect(s, b, dst.clone(), resolved.clone()).await;
    let mut said = BytesMut::with_capacity(1024);
    let mut greeting = BytesMut::new();
    let idle = tokio::time::sleep(s.tcp.idle_timeout);
    let first = match &mut up {
        Some(u) => tokio::select! {
            // Both at once: the client's bytes decide (HTTP stays HTTP).
            biased;
            r = io.read_buf(&mut said) => First::Client(r),
            // Spoke, closed or failed: whichever, the stream is the server's.
            _ = u.read_buf(&mut greeting) => First::Server,
            () = idle => return None,
        },
        None => tokio::select! {
            r = io.read_buf(&mut said) => First::Client(r),
            () = idle => return None,
        },
    };
    match first {
        First::Server => {
            s.count_detected(DIRECTION, Protocol::Opaque);
            if let Some(u) = up {
                u.splice(s, io, greeting.freeze()).await;
            }
            return None;
        }
        First::Client(Ok(0) | Err(_)) => return None,
        First::Client(Ok(_)) => {}
    }
    let (protocol, io) = s.detect_more(io, said, DIRECTION, client).await?;
    if protocol != Protocol::Opaque {
        return Some((protocol, io));
    }
    match up {
        Some(u) => u.splice(s, io, Bytes::new()).await,
        None => opaque::forward(s, b, io, dst, resolved).await,
    }
    None
}
