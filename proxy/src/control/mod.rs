//! The proxy's side of the control plane: one gRPC channel, the discovery watches of
//! the destinations in use, and the watch of this workload's inbound policy. When
//! the control plane is unreachable the proxy keeps serving with what it last knew
//! and reconnects with jittered backoff.

pub mod backoff;
pub mod dial;
pub mod discovery;
pub mod policy;
pub mod view;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use prometheus_client::metrics::counter::Counter;
use tracing::warn;

use crate::defaults;
use crate::identity::{Credentials, Identity, tls};

/// Who this proxy is, as told to the control plane.
#[derive(Clone, Debug)]
pub struct Workload {
    pub namespace: String,
    pub pod: String,
    /// The mesh's trust domain: only its identities match namespace rules.
    pub trust_domain: String,
    /// With identities on: the service-account token that proves who we are.
    pub token_file: Option<Arc<std::path::PathBuf>>,
}

/// A channel whose calls carry this proxy's credential.
pub type AuthedChannel = InterceptedService<Channel, Credential>;

/// Puts the proxy's token on each discovery and policy call (`authorization:
/// Bearer`), read at each call since the kubelet rotates projected tokens. The
/// controller also accepts the workload certificate, which the TLS config
/// presents on connections made once there is one; the token keeps a
/// connection made before the first certificate usable.
#[derive(Clone, Debug)]
pub struct Credential(Option<Arc<std::path::PathBuf>>);

impl Credential {
    pub fn of(workload: &Workload) -> Self {
        Credential(workload.token_file.clone())
    }
}

impl tonic::service::Interceptor for Credential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(path) = &self.0 {
            // An unreadable token is reported by the certificate loop; the call
            // goes out without it and the controller says what is missing.
            if let Ok(t) = std::fs::read(path.as_path())
                && let Ok(mut v) = tonic::metadata::MetadataValue::try_from(
                    [b"Bearer ".as_slice(), t.trim_ascii()].concat(),
                )
            {
                v.set_sensitive(true);
                req.metadata_mut().insert("authorization", v);
            }
        }
        Ok(req)
    }
}

pub fn authed(channel: Channel, workload: &Workload) -> AuthedChannel {
    InterceptedService::new(channel, Credential::of(workload))
}

#[derive(Debug, thiserror::Error)]
#[error("invalid --control-plane {url:?}: {reason}")]
pub struct ControlPlaneError {
    pub url: String,
    pub reason: String,
}

/// How the proxy proves itself over TLS to the controller: its credentials, the
/// controller's identity, and where a mismatch is counted.
#[derive(Clone, Debug)]
pub struct LinkTls {
    pub creds: Arc<Credentials>,
    pub controller: Identity,
    pub mismatches: Counter,
}

/// The connection to the controller, made again for each new certificate.
///
/// A connection presents the certificate it was made with, and one made before
/// the first certificate presents none: calls on it are proved by the token
/// alone (a TokenReview at the controller, and a watch that ends when the token
/// does). So every call takes the channel of the current certificate, made on
/// first use after it is installed, with a TLS config of its own (a session
/// resumed from an earlier connection would carry that connection's client
/// certificate, or none). Watches on an older channel keep it until they end;
/// its connection closes with the last of them.
#[derive(Debug)]
pub struct Link {
    url: String,
    tls: Option<LinkTls>,
    dials: dial::Dials,
    /// The certificate generation the channel was made for, and the channel.
    current: Mutex<(u64, Channel)>,
}

impl Link {
    pub fn new(url: &str, tls: Option<LinkTls>) -> Result<Arc<Self>, ControlPlaneError> {
        let generation = tls.as_ref().map_or(0, |t| t.creds.generation());
        let dials = dial::Dials::default();
        let channel = Self::make(url, tls.as_ref(), &dials)?;
        Ok(Arc::new(Link {
            url: url.to_string(),
            tls,
            dials,
            current: Mutex::new((generation, channel)),
        }))
    }

    fn make(
        url: &str,
        tls: Option<&LinkTls>,
        dials: &dial::Dials,
    ) -> Result<Channel, ControlPlaneError> {
        let config = match tls {
            Some(t) => Some(
                tls::client_config(
                    &t.creds,
                    t.controller.clone(),
                    tls::ALPN_H2,
                    t.mismatches.clone(),
                )
                .map_err(|e| ControlPlaneError {
                    url: url.to_string(),
                    reason: format!("TLS: {e}"),
                })?,
            ),
            None => None,
        };
        channel(url, config, dials)
    }

    /// The channel for a call made now.
    pub fn channel(&self) -> Channel {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = &self.tls {
            let generation = t.creds.generation();
            if current.0 != generation {
                // The URL and the config were accepted when the link was made.
                match Self::make(&self.url, Some(t), &self.dials) {
                    Ok(c) => *current = (generation, c),
                    Err(e) => warn!(error = %e, "keeping the control-plane connection"),
                }
            }
        }
        current.1.clone()
    }

    /// A channel whose calls carry `workload`'s token.
    pub fn authed(&self, workload: &Workload) -> AuthedChannel {
        authed(self.channel(), workload)
    }
}

/// A lazily connected channel: the proxy starts (and serves pass-through traffic)
/// whether or not the control plane is up yet. With `tls` (the proxy has trust
/// anchors) the URL must be https:// and the controller must present the identity
/// the TLS config expects; without, it must be http://.
fn channel(
    url: &str,
    tls: Option<Arc<ClientConfig>>,
    dials: &dial::Dials,
) -> Result<Channel, ControlPlaneError> {
    let err = |reason: &str| ControlPlaneError {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| err(&e.to_string()))?;
    // A missing port would be 443 (or 80), where no controller listens:
    // the proxy would never go ready, for no reason it could give.
    if uri.host().is_none() || uri.port_u16().is_none() {
        return Err(err(
            "expected https://HOST:PORT (the controller's gRPC port, 8090)",
        ));
    }
    // No connect timeout here: the connector bounds its attempt itself, and
    // one that waits its turn behind the gate (dial.rs) must not be cut off.
    let endpoint = Endpoint::from(uri.clone())
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    match (uri.scheme_str(), tls) {
        (Some("https"), Some(config)) => {
            Ok(endpoint.connect_with_connector_lazy(dial::Gated::new(
                TlsConnect {
                    config: Some(config),
                    timeout: defaults::CONTROL_CONNECT_TIMEOUT,
                },
                dials,
            )))
        }
        (Some("http"), None) => Ok(endpoint.connect_with_connector_lazy(dial::Gated::new(
            TlsConnect {
                config: None,
                timeout: defaults::CONTROL_CONNECT_TIMEOUT,
            },
            dials,
        ))),
        (Some("http"), Some(_)) => Err(err(
            "with --trust-anchors the control plane must be https://: the token and the identities of peers must not travel in the clear",
        )),
        (Some("https"), None) => Err(err(
            "https:// needs --trust-anchors to verify the control plane",
        )),
        _ => Err(err("expected http:// or https://")),
    }
}

/// Connects to the control plane over TLS 1.3, verifying its identity (the
/// client config's verifier checks the chain and the SPIFFE URI); without a
/// config (no trust anchors: tests, the demo), in plaintext.
#[derive(Clone)]
struct TlsConnect {
    config: Option<Arc<ClientConfig>>,
    timeout: Duration,
}

impl tower::Service<http::Uri> for TlsConnect {
    type Response = TokioIo<Either<TcpStream, TlsStream<TcpStream>>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (config, timeout) = (self.config.clone(), self.timeout);
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_string();
            let port = uri
                .port_u16()
                .unwrap_or(if config.is_some() { 443 } else { 80 });
            let timed_out = || {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connecting to the control plane timed out",
                )
            };
            // One deadline for the connect and the handshake together.
            let deadline = tokio::time::Instant::now() + timeout;
            let tcp = crate::transport::connect::tcp_host(&host, port, timeout).await?;
            let Some(config) = config else {
                return Ok(TokioIo::new(Either::Left(tcp)));
            };
            let name = ServerName::try_from(host).map_err(io::Error::other)?;
            let tls =
                tokio::time::timeout_at(deadline, TlsConnector::from(config).connect(name, tcp))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e| {
                        io::Error::other(crate::identity::tls::describe_handshake_error(&e))
                    })?;
            Ok(TokioIo::new(Either::Right(tls)))
        })
    }
}
