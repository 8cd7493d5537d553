//! HTTP clients for tests, and small helpers to build requests and read bodies.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::TestBody;

pub type HttpClient = Client<HttpConnector, TestBody>;

/// An HTTP/1.1 client with a keep-alive pool.
pub fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 client (prior knowledge).
pub fn http2() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// An HTTP/2 client (prior knowledge) whose connections come from `local`,
/// one of loopback's addresses (127.0.0.2…): another caller, as the proxy
/// sees it.
pub fn http2_from(local: std::net::IpAddr) -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_local_address(Some(local));
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(c)
}

pub fn body(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> TestBody {
    body(Bytes::new())
}

/// GET `url` and return status and body text.
pub async fn get(client: &HttpClient, url: &str) -> anyhow::Result<(http::StatusCode, String)> {
    let rsp = client.get(url.parse()?).await?;
    let status = rsp.status();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Opens a CONNECT tunnel over HTTP/2 (RFC 9113 §8.5) through `addr`, as
/// `curl --proxy-http2` would, and checks that bytes written into it come
/// back (the test backend echoes a tunnel). Panics, naming the step, if not.
pub async fn h2_connect_echoes(addr: std::net::SocketAddr) {
    let mut tunnel = h2_connect(addr).await;
    tunnel_echoes(&mut tunnel, b"raw tunnel bytes").await;
}

/// An HTTP/2 CONNECT tunnel through `addr` (to an echoing upstream), with the
/// connection that carries it.
pub async fn h2_connect(
    addr: std::net::SocketAddr,
) -> hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {
    use std::time::Duration;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("an HTTP/2 connection");
    tokio::spawn(conn);
    let req = http::Request::connect("example.test:443")
        .version(http::Version::HTTP_2)
        .body(empty())
        .expect("request");
    let rsp = send.send_request(req).await.expect("an answer");
    assert_eq!(rsp.status(), 200, "{:?}", rsp.headers());
    let tunnel = tokio::time::timeout(Duration::from_secs(5), hyper::upgrade::on(rsp))
        .await
        .expect("the tunnel within 5 s")
        .expect("a tunnel");
    hyper_util::rt::TokioIo::new(tunnel)
}

/// `bytes` written into `tunnel` come back.
pub async fn tunnel_echoes(
    tunnel: &mut hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>,
    bytes: &[u8],
) {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tunnel
        .write_all(bytes)
        .await
        .expect("written into the tunnel");
    let mut echoed = vec![0u8; bytes.len()];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut echoed))
        .await
        .expect("the echo within 5 s")
        .expect("the echo");
    assert_eq!(echoed, bytes);
}
