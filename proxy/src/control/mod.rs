//! The proxy's side of the control plane: one gRPC channel, the discovery watches of
//! the destinations in use, and the watch of this workload's inbound policy. When
//! the control plane is unreachable the proxy keeps serving with what it last knew
//! and reconnects with jittered backoff.

pub mod backoff;
pub mod discovery;
pub mod policy;
pub mod view;

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Who this proxy is, as told to the control plane.
#[derive(Clone, Debug)]
pub struct Workload {
    pub namespace: String,
    pub pod: String,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid --control-plane {url:?}: {reason}")]
pub struct ControlPlaneError {
    pub url: String,
    pub reason: String,
}

/// A lazily connected channel: the proxy starts (and serves pass-through traffic)
/// whether or not the control plane is up yet.
pub fn channel(url: &str) -> Result<Channel, ControlPlaneError> {
    let err = |reason: String| ControlPlaneError {
        url: url.to_string(),
        reason,
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| err(e.to_string()))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(err("expected http://HOST:PORT".into()));
    }
    Ok(Endpoint::from(uri)
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}
