//! Waiting on facts, with a deadline, instead of sleeping.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Polls `check` until it returns true; fails after `within`.
pub async fn until<F, Fut>(what: &str, within: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        until_or(within, check).await,
        "timed out after {within:?} waiting for {what}"
    );
}

/// Polls `check` until it returns true (true) or `within` passes (false).
pub async fn until_or<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A GET to an admin endpoint; returns (status, body). Plain HTTP/1.0 so it works
/// against any admin server without a client pool.
pub async fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    admin_request(addr, "GET", path, "").await
}

pub async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until `/ready` on the admin address answers 200.
pub async fn ready(admin: SocketAddr, within: Duration) {
    ready_unless(admin, within, || None).await
}

/// As `ready`, but fails as soon as `exited` says how the process that was to
/// answer ended: a child that cannot start (a port taken, a bad flag) fails
/// its test at once, not after the whole wait.
pub async fn ready_unless(
    admin: SocketAddr,
    within: Duration,
    mut exited: impl FnMut() -> Option<String>,
) {
    until(&format!("{admin}/ready"), within, || {
        if let Some(how) = exited() {
            panic!(
                "the process to answer {admin}/ready exited before it was ready ({how}); its output is above"
            );
        }
        async move { matches!(admin_get(admin, "/ready").await, Ok((200, _))) }
    })
    .await
}
