//! A client that says nothing within the detection timeout. It is either a
//! server-speaks-first protocol waiting for its greeting, or a client that
//! connected ahead of its first request: HTTP clients' pools do (hyper's when a
//! connection it was opening is no longer needed, Go's and Java's warm pools).
//! Waiting longer would stall the first; taking the connection for opaque TCP
//! would carry the second's requests past their routes (weights, retries,
//! timeouts), pinned to one endpoint for the connection's life.
//!
//! So the opaque stream's connection is made at once, and whoever speaks first
//! decides. The server: the stream is opaque (unless what it said is an HTTP/2
//! server's SETTINGS, sent before it reads a client's preface: then the client
//! still decides). The client: its bytes are
//! detected as any client's are, and when they are HTTP the connection made for
//! nothing is closed unused. When no connection can be made, the client is
//! closed as an opaque stream's would be, unless its Service has HTTP routes.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::DIRECTION;
use super::logical::Builder;
use super::opaque;
use crate::addr::{ClientAddr, DestAddr};
use crate::control::discovery::Resolved;
use crate::control::view::Resolution;
use crate::detect::Protocol;
use crate::proxy::Shared;
use crate::transport::PrefixedIo;
use crate::transport::first_word::{First, first_word, unless_http2_settings};

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
    I: AsyncRead + AsyncWrite + crate::tcp::Abort + Unpin,
{
    let mut said = BytesMut::with_capacity(1024);
    let mut greeting = BytesMut::new();
    let started = tokio::time::Instant::now();
    let mut idle = std::pin::pin!(tokio::time::sleep_until(started + s.tcp.idle_timeout));
    // The client may speak while the connection onward is being made: then it
    // is not waited for (its route may not even lead there).
    let ahead = opaque::Ahead::OfASilentClient;
    let mut connect = std::pin::pin!(opaque::connect(s, b, dst.clone(), resolved.clone(), ahead));
    let connected = first_word(&mut io, &mut said, connect.as_mut(), idle.as_mut()).await;
    let (first, up, refused) = match connected {
        First::Server(Ok(mut up)) => {
            let spoke = up.read_buf(&mut greeting);
            let first = first_word(&mut io, &mut said, spoke, idle.as_mut())
                .await
                .ended();
            let first =
                unless_http2_settings(first, &greeting, &mut io, &mut said, idle.as_mut()).await;
            (first, Some(up), None)
        }
        // No endpoint, or refused. A Service with HTTP routes is declared HTTP
        // (it may have no endpoints of its own): its client is waited for.
        // Anything else fails at once, as an opaque stream that cannot connect
        // does, so a client waiting for a greeting is not left hanging.
        First::Server(Err(refused)) => {
            if !routed(resolved.as_ref()) {
                s.count_detected(DIRECTION, Protocol::Opaque);
                io.abort();
                refused.report(s);
                return None;
            }
            debug!(%dst, "no connection onward for a silent client of a routed Service; waiting for it to speak");
            // As long as an HTTP server keeps an idle connection open, not an
            // opaque stream's hour: a client waiting for a greeting (a
            // server-speaks-first protocol on another port of the Service)
            // learns it will get none.
            let wait = started + s.config.http_idle_timeout;
            if wait < idle.deadline() {
                idle.as_mut().reset(wait);
            }
            let never = std::future::pending::<()>();
            let first = first_word(&mut io, &mut said, never, idle.as_mut()).await;
            (first.ended(), None, Some(refused))
        }
        first => (first.ended(), None, None),
    };
    match first {
        First::Client(Ok(n)) if n > 0 => {}
        // Closed (or half-closed) without a word, or the server spoke first:
        // carried as opaque, as the client would see it without a proxy.
        First::Client(Ok(_)) | First::Server(()) => {
            s.count_detected(DIRECTION, Protocol::Opaque);
            match (up, refused) {
                (Some(up), _) => {
                    // A greeting shows the endpoint works; a close without
                    // one (the server's or the client's) shows nothing.
                    if !greeting.is_empty() {
                        up.used();
                    }
                    up.splice(s, io, greeting.freeze()).await
                }
                (None, Some(refused)) => {
                    io.abort();
                    refused.report(s);
                }
                // The connection onward was still being made: finish it.
                (None, None) => match connect.await {
                    Ok(up) => up.splice(s, io, Bytes::new()).await,
                    Err(refused) => {
                        io.abort();
                        refused.report(s);
                    }
                },
            }
            return None;
        }
        First::Idle => {
            s.count_detected(DIRECTION, Protocol::Opaque);
            let idle = idle.deadline().saturating_duration_since(started);
            strait_otel::sampled!(info, direction = DIRECTION.as_str(), %dst, ?idle, "opaque stream idle, closed");
            if let Some(up) = up {
                up.close().await;
            }
            if let Some(refused) = refused {
                refused.report(s);
            }
            return None;
        }
        First::Client(Err(e)) => {
            // Counted as it was before anything else happened: opaque, at the timeout.
            s.count_detected(DIRECTION, Protocol::Opaque);
            debug!(client = %client.0, error = %e, "connection failed during detection");
            drop(up);
            if let Some(refused) = refused {
                refused.report(s);
            }
            return None;
        }
    }
    let Some((protocol, io)) = s.detect_more(io, said, DIRECTION, client).await else {
        drop(up);
        return None;
    };
    if protocol != Protocol::Opaque {
        // The connection made for nothing closes unused, cleanly: a peer
        // proxy resets the app's side of a stream cut without a word.
        if let Some(up) = up {
            up.close().await;
        }
        return Some((protocol, io));
    }
    match (up, refused) {
        // Opaque: the connect is what an opaque stream is judged by. What
        // the server said first (an HTTP/2 server's SETTINGS) goes first.
        (Some(up), _) => {
            up.used();
            up.splice(s, io, greeting.freeze()).await
        }
        // The client spoke while the connection onward was being made: finish it.
        (None, None) => match connect.await {
            Ok(up) => {
                up.used();
                up.splice(s, io, Bytes::new()).await
            }
            Err(refused) => refused.report(s),
        },
        // Refused while the client was silent: try again, now that it is opaque.
        (None, Some(_)) => opaque::forward(s, b, io, dst, resolved).await,
    }
    None
}

/// The destination is a Service with HTTP routes.
fn routed(resolved: Option<&Resolved>) -> bool {
    matches!(resolved, Some(Resolved { resolution: Resolution::Service(v), .. }) if v.attached)
}
