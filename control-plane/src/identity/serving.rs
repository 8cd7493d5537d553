//! The gRPC port over TLS when the controller issues certificates. Proxies send
//! their tokens over it and learn from it which identity each peer must present,
//! so it must be neither readable nor forgeable on the network. The controller's
//! certificate comes from its own CA, lives in memory only, and is renewed at half
//! its lifetime.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use super::ca::Ca;
use crate::defaults;

/// The controller's identity and the DNS name its certificate also carries.
#[derive(Clone, Debug)]
pub struct ServingName {
    pub identity: String,
    pub dns: String,
}

impl ServingName {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        ServingName {
            identity: format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"),
            dns: format!("{service_account}.{namespace}.svc"),
        }
    }
}

#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|c| c.clone())
    }
}

fn certified(ca: &Ca, name: &ServingName) -> anyhow::Result<(Arc<CertifiedKey>, SystemTime)> {
    let (leaf, key) = ca.serving_certificate(&name.identity, &name.dns)?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider.key_provider.load_private_key(der)?;
    let chain = std::iter::once(leaf.der)
        .chain(ca.chain_der())
        .map(CertificateDer::from)
        .collect();
    info!(identity = %name.identity, serial = %leaf.serial, "controller serving certificate issued");
    Ok((Arc::new(CertifiedKey::new(chain, signing)), leaf.not_after))
}

/// A TLS 1.3 acceptor (ALPN h2) with a certificate that renews itself for as
/// long as the returned acceptor is in use.
pub fn acceptor(ca: Arc<Ca>, name: ServingName) -> anyhow::Result<TlsAcceptor> {
    let (first, mut not_after) = certified(&ca, &name)?;
    let current = Arc::new(Current(RwLock::new(first)));
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_cert_resolver(current.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let renewing = Arc::downgrade(&current);
    tokio::spawn(async move {
        loop {
            let left = not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep((left / 2).max(Duration::from_millis(500))).await;
            let Some(current) = renewing.upgrade() else {
                return;
            };
            match certified(&ca, &name) {
                Ok((c, until)) => {
                    if let Ok(mut slot) = current.0.write() {
                        *slot = c;
                    }
                    not_after = until;
                }
                Err(e) => warn!(error = %e, "cannot renew the controller's serving certificate"),
            }
        }
    });
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Accepted connections, each handshake on its own task (bounded in time) so a
/// slow or silent client delays nobody else.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, typically: let some close.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(defaults::TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake on the gRPC port failed")
                    }
                    Err(_) => debug!(%peer, "TLS handshake on the gRPC port timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
