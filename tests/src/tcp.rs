//! Plain TCP servers: an echo that honours half-close, a server-speaks-first
//! one that greets before the client says anything, and a silent sink.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Echoes everything; when the client half-closes, finishes echoing and then
/// half-closes too, so the client sees its own bytes followed by EOF.
pub async fn echo() -> SocketAddr {
    serve(None).await
}

/// Writes `banner` as soon as a client connects, then echoes.
pub async fn banner(banner: &'static [u8]) -> SocketAddr {
    serve(Some(banner)).await
}

async fn serve(banner: Option<&'static [u8]>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
    let addr = listener.local_addr().expect("tcp addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if let Some(b) = banner
                    && s.write_all(b).await.is_err()
                {
                    return;
                }
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// What a [`sink`] read on one connection, and how the connection ended.
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
    /// Reset (or failed) rather than closed.
    pub reset: bool,
}

/// Reads each connection to its end and says nothing: what each received
/// comes on the channel once it ends. An app that waits for a whole request
/// before it answers.
pub async fn sink() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    telling(false).await
}

/// Echoes each connection, and says on the channel how it ended: what came,
/// and whether it was reset rather than closed.
pub async fn echo_telling() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    telling(true).await
}

async fn telling(echo: bool) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
    let addr = listener.local_addr().expect("tcp addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut bytes = Vec::new();
                let mut buf = [0u8; 4096];
                let reset = loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break false,
                        Ok(n) => {
                            bytes.extend_from_slice(&buf[..n]);
                            if echo && s.write_all(&buf[..n]).await.is_err() {
                                break true;
                            }
                        }
                        Err(_) => break true,
                    }
                };
                if echo {
                    let _ = s.shutdown().await;
                }
                let _ = tx.send(Received { bytes, reset });
            });
        }
    });
    (addr, rx)
}

/// Reads once from each connection, then resets it: an app that fails
/// mid-stream.
pub async fn resetting() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
    let addr = listener.local_addr().expect("tcp addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.set_zero_linger();
            });
        }
    });
    addr
}

/// Resets each connection as soon as it is accepted, before a word: an app
/// that takes connections and drops them (overloaded, or shutting down).
pub async fn resetting_at_once() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
    let addr = listener.local_addr().expect("tcp addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_zero_linger();
        }
    });
    addr
}

/// An address whose connects hang: a listener that accepts nobody, its accept
/// queue filled, so the kernel drops further SYNs. Keep what is returned for
/// as long as the address must stall.
pub async fn stalling() -> (
    SocketAddr,
    Vec<tokio::net::TcpStream>,
    tokio::net::TcpListener,
) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut queued = Vec::new();
    loop {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(std::time::Duration::from_millis(200), connect).await {
            Ok(c) => queued.push(c.expect("connect")),
            Err(_) => break,
        }
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    (addr, queued, listener)
}

/// Reads `s` to its end, which must be a reset within `within`, not a clean
/// close: what was read before it is in the panic's message.
pub async fn ends_in_a_reset(
    s: &mut tokio::net::TcpStream,
    within: std::time::Duration,
    what: &str,
) {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, s.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{what}: no end within {within:?}"));
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "{what}: {got:?}"
    );
}
