//! Plain TCP servers: an echo that honours half-close, and a server-speaks-first
//! one that greets before the client says anything.

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
