//! The demo's tiny app: answers with its name and, when it has a backend, calls it
//! first (through its sidecar, with the request's path) and reports who served that
//! call. On request it fails a share of its requests, and a leaf app (one without a
//! backend) answers `/slow` late, so the mesh's retries, breaker and timeouts have
//! something to do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
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
/// Path prefix a leaf app answers only after `SLOW_DELAY`.
pub const SLOW_PATH: &str = "/slow";
/// Well past the demo route's 300 ms request timeout, so the proxy always cuts it.
const SLOW_DELAY: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, clap::Args)]
pub struct AppArgs {
    /// Address to serve on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// This instance's name, reported in responses.
    #[arg(long)]
    pub name: String,
    /// Base URL to call for each request (through the sidecar), e.g.
    /// http://127.0.1.1:15081; the request's path and query are sent there.
    #[arg(long)]
    pub backend: Option<Uri>,
    /// Share of requests (0-100) answered with `--fail-status` at once, spread
    /// evenly over the requests.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub fail_percent: u8,
    /// The status of a failed request.
    #[arg(long, default_value = "503", value_parser = parse_status)]
    pub fail_status: StatusCode,
}

fn parse_status(s: &str) -> Result<StatusCode, String> {
    s.parse::<u16>()
        .map_err(|e| e.to_string())
        .and_then(|n| StatusCode::from_u16(n).map_err(|e| e.to_string()))
}

/// Decides which requests fail: request `n` fails when the fractional part of
/// `n × φ` (Fibonacci hashing) falls below the percentage. The sequence is spread
/// evenly, so the share is exact over any run and, below about 38 %, two requests
/// in a row never both fail (the breaker ejects only an endpoint failing most of
/// its requests).
#[derive(Debug)]
struct Failures {
    percent: u8,
    served: AtomicU64,
}

impl Failures {
    fn next_fails(&self) -> bool {
        let n = self.served.fetch_add(1, Ordering::Relaxed);
        fails(n, self.percent)
    }
}

fn fails(n: u64, percent: u8) -> bool {
    let frac = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (u128::from(frac) * 100) >> 64 < u128::from(percent)
}

pub async fn run(args: AppArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let failures = Arc::new(Failures {
        percent: args.fail_percent,
        served: AtomicU64::new(0),
    });
    let args = Arc::new(args);
    loop {
        let (stream, _) = listener.accept().await?;
        let (args, client, failures) = (args.clone(), client.clone(), failures.clone());
        tokio::spawn(async move {
            let svc =
                service_fn(move |req| handle(args.clone(), client.clone(), failures.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A GET of `uri` carrying the caller's trace context, as any traced app
/// does: the proxies' spans of this call then join the incoming request's trace.
fn with_trace_context(incoming: &Request<Incoming>, uri: Uri) -> Request<Empty<Bytes>> {
    let mut out = Request::new(Empty::new());
    *out.uri_mut() = uri;
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = incoming.headers().get(name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// The backend's scheme and authority with the request's path and query.
fn backend_uri(base: &Uri, path: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
    let mut b = Uri::builder();
    if let Some(s) = base.scheme() {
        b = b.scheme(s.clone());
    }
    if let Some(a) = base.authority() {
        b = b.authority(a.clone());
    }
    b.path_and_query(path.map_or("/", PathAndQuery::as_str))
        .build()
}

async fn handle(
    args: Arc<AppArgs>,
    client: Client<HttpConnector, Empty<Bytes>>,
    failures: Arc<Failures>,
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
    if failures.next_fails() {
        status = args.fail_status;
    } else if let Some(base) = &args.backend {
        let start = Instant::now();
        match backend_uri(base, req.uri().path_and_query()) {
            Ok(uri) => match client.request(with_trace_context(&req, uri)).await {
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
    } else if req.uri().path().starts_with(SLOW_PATH) {
        tokio::time::sleep(SLOW_DELAY).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_the_asked_share_and_spread_evenly() {
        let failed: Vec<bool> = (0..1000).map(|n| fails(n, 30)).collect();
        let count = failed.iter().filter(|f| **f).count();
        assert!((295..=305).contains(&count), "{count} of 1000 failed");
        assert!(
            !failed.windows(2).any(|w| w[0] && w[1]),
            "two requests in a row failed"
        );
        assert!((0..1000).all(|n| fails(n, 100)));
        assert!(!(0..1000).any(|n| fails(n, 0)));
    }

    #[test]
    fn the_backend_gets_the_request_path() {
        let base: Uri = "http://127.0.1.1:15081/".parse().expect("a URI");
        let pq: PathAndQuery = "/slow?x=1".parse().expect("a path");
        let uri = backend_uri(&base, Some(&pq)).expect("a URI");
        assert_eq!(uri.to_string(), "http://127.0.1.1:15081/slow?x=1");
        let uri = backend_uri(&base, None).expect("a URI");
        assert_eq!(uri.to_string(), "http://127.0.1.1:15081/");
    }
}
