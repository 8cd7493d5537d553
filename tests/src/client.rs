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
