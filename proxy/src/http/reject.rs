//! Answers for connections beyond the connection cap: 503 to an HTTP/1 client, a
//! close to anything else; never more than a brief look at the connection.

use std::convert::Infallible;
use std::time::Duration;

use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::error::error_response;
use crate::detect::{Protocol, detect};
use crate::transport::PrefixedIo;

const LOOK: Duration = Duration::from_millis(100);

pub async fn over_capacity(mut stream: TcpStream) {
    let Ok(Some(d)) = detect(&mut stream, LOOK, 4096).await else {
        return;
    };
    if d.protocol != Protocol::Http1 {
        return;
    }
    let io = TokioIo::new(PrefixedIo::new(d.prefix.freeze(), stream));
    let svc = service_fn(|_req| async {
        Ok::<_, Infallible>(error_response(
            "connection_limit",
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached",
        ))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(io, svc);
    let _ = tokio::time::timeout(LOOK * 10, conn).await;
}
