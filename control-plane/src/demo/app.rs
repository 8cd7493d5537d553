//! The demo's tiny app: answers with its name and, when it has a backend, calls it
//! first (through its sidecar) and reports who served that call.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Header naming every workload that handled the request, outermost first.
pub const CHAIN_HEADER: &str = "x-demo-chain";
/// Header naming, per hop of the chain, the caller identity the inbound proxy
/// verified (mTLS) for that hop.
pub const CALLERS_HEADER: &str = "x-demo-callers";
/// Header with the backend call's latency in microseconds, as the app measured it.
pub const BACKEND_MICROS_HEADER: &str = "x-demo-backend-us";

#[derive(Clone, Debug, clap::Args)]
pub struct AppArgs {
    /// Address to serve on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// This instance's name, reported in responses.
    #[arg(long)]
    pub name: String,
    /// URL to call for each request (through the sidecar), e.g. http://127.0.1.1:15081/.
    #[arg(long)]
    pub backend: Option<String>,
}

pub async fn run(args: AppArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let (stream, _) = listener.accept().await?;
        let (args, client) = (args.clone(), client.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(args.clone(), client.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    args: AppArgs,
    client: Client<HttpConnector, Empty<Bytes>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut chain = args.name.clone();
    // Set by this pod's proxy from the peer's verified certificate.
    let mut callers = req
        .headers()
        .get("strait-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("plaintext")
        .to_string();
    let mut status = StatusCode::OK;
    let mut backend_us = None;
    if let Some(url) = &args.backend {
        let start = Instant::now();
        match url.parse() {
            Ok(uri) => match client.get(uri).await {
                Ok(rsp) => {
                    status = rsp.status();
                    if let Some(c) = rsp
                        .headers()
                        .get(CHAIN_HEADER)
                        .and_then(|v| v.to_str().ok())
                    {
                        chain = format!("{chain},{c}");
                    }
                    if let Some(c) = rsp
                        .headers()
                        .get(CALLERS_HEADER)
                        .and_then(|v| v.to_str().ok())
                    {
                        callers = format!("{callers},{c}");
                    }
                    let _ = rsp.into_body().collect().await;
                }
                Err(_) => status = StatusCode::BAD_GATEWAY,
            },
            Err(_) => status = StatusCode::INTERNAL_SERVER_ERROR,
        }
        backend_us = Some(start.elapsed().as_micros());
    }
    let mut rsp = Response::new(Full::new(Bytes::from(format!("{chain}\n"))));
    *rsp.status_mut() = status;
    if let Ok(v) = chain.parse() {
        rsp.headers_mut().insert(CHAIN_HEADER, v);
    }
    if let Ok(v) = callers.parse() {
        rsp.headers_mut().insert(CALLERS_HEADER, v);
    }
    if let Some(us) = backend_us.and_then(|u| u.to_string().parse().ok()) {
        rsp.headers_mut().insert(BACKEND_MICROS_HEADER, us);
    }
    Ok(rsp)
}
