//! A stream whose protocol its first bytes did not tell: a client that said
//! nothing within the detection timeout, or an opaque stream a peer proxy
//! carried to a port this workload did not declare opaque. Either may be a
//! server-speaks-first protocol waiting for its greeting, or a client about to
//! speak HTTP. Carried raw, that HTTP would reach the app past the HTTP stack
//! and whatever `strait-client-id` it claimed with it.
//!
//! So, as outbound (`outbound::silent`), the connection to the app is made at
//! once and whoever speaks first decides. The app: the stream is opaque, with
//! the app's greeting (not an HTTP/2 server's SETTINGS, sent before it reads
//! a client's preface: then the client still decides). The client: its bytes are detected as any client's are,
//! and when they are HTTP the connection made for nothing is closed unused.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::TcpStream;
use tracing::debug;

use super::DIRECTION;
use crate::addr::{ClientAddr, DestAddr};
use crate::detect::Protocol;
use crate::proxy::Shared;
use crate::transport::PrefixedIo;
use crate::transport::first_word::{First, first_word, unless_http2_settings};

/// How the stream turned out.
pub(super) enum Settled<I> {
    Http(Protocol, PrefixedIo<I>),
    /// Opaque; with the connection to the app, when it was made, and what the
    /// app said on it.
    Opaque(PrefixedIo<I>, Option<PrefixedIo<TcpStream>>),
}

/// Waits for whoever speaks first; `app` is where an opaque stream goes (none
/// when the client named no port: only its own words can say where);
/// `proven`: the client is a verified peer.
pub(super) async fn settle<I>(
    s: &Shared,
    mut io: I,
    app: Option<DestAddr>,
    client: ClientAddr,
    proven: bool,
) -> Option<Settled<I>>
where
    I: AsyncRead + crate::tcp::Abort + Unpin,
{
    let mut said = BytesMut::with_capacity(1024);
    let mut greeting = BytesMut::new();
    // With no app to connect to, only the client's words can lead anywhere,
    // and only HTTP's: it has as long to start as an HTTP client has for its
    // head, not an opaque stream's idle time (an hour of a connection slot,
    // for anyone who connects and says nothing).
    // A client outside the mesh, with the app silent too, waits as long as
    // an HTTP server keeps an idle connection, not an opaque stream's hour:
    // a server-speaks-first protocol greets at once, and a port whose
    // clients and server both wait longer is declared opaque.
    let wait = match app {
        Some(_) if proven => s.tcp.idle_timeout,
        Some(_) => s.tcp.idle_timeout.min(s.config.http_idle_timeout),
        None => s.config.http_header_read_timeout,
    };
    let mut idle = std::pin::pin!(tokio::time::sleep(wait));
    let connect = async {
        match &app {
            Some(a) => crate::tcp::connect(a, &s.tcp, &s.metrics, DIRECTION).await,
            None => std::future::pending().await,
        }
    };
    let (first, up) = match first_word(&mut io, &mut said, connect, idle.as_mut()).await {
        First::Server(Some(mut up)) => {
            let spoke = up.read_buf(&mut greeting);
            let first = first_word(&mut io, &mut said, spoke, idle.as_mut())
                .await
                .ended();
            let first =
                unless_http2_settings(first, &greeting, &mut io, &mut said, idle.as_mut()).await;
            (first, Some(up))
        }
        // Refused (counted and logged), as an opaque stream to it would be: a
        // client waiting for a greeting is not left hanging.
        First::Server(None) => {
            s.count_detected(DIRECTION, Protocol::Opaque);
            // A plaintext client is reset, as the app's refusal is; a peer
            // proxy reads the stream cut without a TLS close (see `serve`).
            if !proven {
                io.abort();
            }
            return None;
        }
        first => (first.ended(), None),
    };
    match first {
        First::Client(Ok(n)) if n > 0 => {}
        // Closed (or half-closed) without a word, or the app spoke first:
        // opaque, as the client would see it without a proxy.
        First::Client(Ok(_)) | First::Server(()) => {
            s.count_detected(DIRECTION, Protocol::Opaque);
            // Gone without a word, with no app it could have meant (a port
            // check of the inbound port): nothing to carry, nothing refused.
            app.as_ref()?;
            let up = up.map(|up| PrefixedIo::new(greeting.freeze(), up));
            return Some(Settled::Opaque(PrefixedIo::new(Bytes::new(), io), up));
        }
        First::Idle => {
            s.count_detected(DIRECTION, Protocol::Opaque);
            strait_otel::sampled!(info, direction = DIRECTION.as_str(), client = %client.0, idle = ?wait, "client silent, closed");
            return None;
        }
        First::Client(Err(e)) => {
            s.count_detected(DIRECTION, Protocol::Opaque);
            debug!(client = %client.0, error = %e, "connection failed during detection");
            return None;
        }
    }
    let (protocol, io) = s.detect_more(io, said, DIRECTION, client).await?;
    if protocol != Protocol::Opaque {
        // The connection made for nothing closes unused.
        return Some(Settled::Http(protocol, io));
    }
    // What the app said first (an HTTP/2 server's SETTINGS) goes first.
    let up = up.map(|up| PrefixedIo::new(greeting.freeze(), up));
    Some(Settled::Opaque(io, up))
}
