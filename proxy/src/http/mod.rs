//! HTTP: serving connections (HTTP/1.1 and HTTP/2 with hyper), the layers every
//! request passes (metrics, normalization), and forwarding to an upstream.

pub mod body;
pub mod client;
pub mod conn_guard;
pub mod dst;
pub mod error;
pub mod first_frame;
pub mod forward;
pub mod grpc;
pub mod metrics;
pub mod normalize;
pub mod reject;
pub mod request_body;
mod request_scan;
pub mod server;
pub mod stack;
pub mod upgrade;

use bytes::Bytes;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type that flows through the proxy: streamed, never buffered whole.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// An authority's host and port, without the user info (`user:password@`)
/// it may carry: what becomes a `Host` header or a log field.
pub fn host_port(a: &http::uri::Authority) -> String {
    match a.port() {
        Some(p) => format!("{}:{}", a.host(), p.as_str()),
        None => a.host().to_string(),
    }
}

pub fn empty() -> BoxBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> BoxBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(b.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn boxed<B>(body: B) -> BoxBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    body.map_err(Into::into).boxed_unsync()
}

/// A copy of a request's head: what is needed to send it again with a body of
/// the caller's.
pub fn head_of<B>(req: &http::Request<B>) -> http::request::Parts {
    let mut head = head_without_extensions(req);
    head.extensions = req.extensions().clone();
    head
}

/// A request's head but its extensions, which the caller moves in.
pub fn head_without_extensions<B>(req: &http::Request<B>) -> http::request::Parts {
    let mut r = http::Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r.into_parts().0
}

/// Where a request goes; set by the direction's destination layer, read by `Forward`.
#[derive(Clone, Debug)]
pub struct Dst(pub crate::addr::DestAddr);

/// Set when `Dst` is a peer proxy: the app's port in the peer pod, and the identity
/// discovery promised for it.
#[derive(Clone, Debug)]
pub struct ToPeer {
    /// The app's port as the `strait-target-port` value, made once per
    /// endpoint rather than formatted for every request.
    pub target_port: http::HeaderValue,
    pub identity: crate::identity::Identity,
}

impl ToPeer {
    pub fn new(target_port: u16, identity: crate::identity::Identity) -> Self {
        ToPeer {
            target_port: http::HeaderValue::from(target_port),
            identity,
        }
    }
}

/// A connect timeout for this request's upstream other than the proxy's default
/// (a backend policy's `connectTimeout`).
#[derive(Clone, Copy, Debug)]
pub struct ConnectTimeout(pub std::time::Duration);

/// When this request stops waiting for a connection to its endpoint: within
/// its route's per-attempt timeout, so that an endpoint that never answers a
/// connect (a lost node) fails the attempt as unsent, to be retried on
/// another, rather than as an attempt timed out. The connect itself goes on
/// for the requests after.
#[derive(Clone, Copy, Debug)]
pub struct ConnectBy {
    pub at: tokio::time::Instant,
    pub after: std::time::Duration,
}
