//! Trust anchors: the roots every peer certificate must chain to. A bundle may hold
//! several, so that anchors can be rotated (old and new trusted side by side).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};

#[derive(Debug, thiserror::Error)]
pub enum AnchorsError {
    #[error("--trust-anchors {path}: {reason}")]
    File { path: String, reason: String },
}

#[derive(Clone, Debug)]
pub struct TrustAnchors {
    pub(crate) anchors: Arc<Vec<TrustAnchor<'static>>>,
    /// The same anchors, as rustls wants them for verifying clients.
    pub(crate) roots: Arc<rustls::RootCertStore>,
}

impl TrustAnchors {
    pub fn load(path: &Path) -> Result<Self, AnchorsError> {
        let err = |reason: String| AnchorsError::File {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        Self::from_pem(&pem).map_err(err)
    }

    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let mut anchors = Vec::new();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|e| format!("not a usable trust anchor: {e}"))?
                .to_owned();
            roots
                .add(cert)
                .map_err(|e| format!("not a usable trust anchor: {e}"))?;
            anchors.push(anchor);
        }
        if anchors.is_empty() {
            return Err(
                "expected PEM certificates (-----BEGIN CERTIFICATE-----), found none".into(),
            );
        }
        Ok(TrustAnchors {
            anchors: Arc::new(anchors),
            roots: Arc::new(roots),
        })
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }
}
