//! The webhook's certificate from files (`--webhook-cert`, `--webhook-key`: a
//! Secret mounted in the pod, cert-manager's say). Read again every
//! `WEBHOOK_CERT_RELOAD`: a renewed Secret is served without a restart, before
//! the certificate it replaces expires and every admission call fails (the
//! injector and the policy validator fail closed).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::info;

use crate::defaults;

/// The files' certificate as last read whole and valid.
#[derive(Debug)]
pub struct FromFiles {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
}

struct Loaded {
    certified: Arc<CertifiedKey>,
    /// The files' contents it was made of: unchanged files are not parsed again.
    read: (Vec<u8>, Vec<u8>),
}

/// Never the key file's contents (`read`).
impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for FromFiles {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.certified.clone())
    }
}

impl FromFiles {
    /// Reads the files, and keeps reading them for as long as the returned
    /// resolver is in use.
    pub fn watch(cert: &Path, key: &Path) -> anyhow::Result<Arc<Self>> {
        let read = read(cert, key)?;
        let certified = load(cert, key, &read)?;
        let files = Arc::new(FromFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Loaded { certified, read }),
        });
        tokio::spawn(reload_every(Arc::downgrade(&files)));
        Ok(files)
    }

    /// Takes the files again if they changed; `Ok(true)` if they did. What
    /// cannot be used (a key that is not the certificate's, the two caught
    /// between writes) is an error, and the certificate before stays.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let read = read(&self.cert, &self.key)?;
        if self.current.read().is_ok_and(|c| c.read == read) {
            return Ok(false);
        }
        let certified = load(&self.cert, &self.key, &read)?;
        if let Ok(mut c) = self.current.write() {
            *c = Loaded { certified, read };
        }
        info!(cert = %self.cert.display(), "webhook certificate reloaded");
        Ok(true)
    }
}

async fn reload_every(files: Weak<FromFiles>) {
    loop {
        tokio::time::sleep(defaults::WEBHOOK_CERT_RELOAD).await;
        let Some(files) = files.upgrade() else { return };
        if let Err(e) = files.reload() {
            strait_otel::sampled!(warn, error = %format!("{e:#}"), "cannot reload the webhook certificate; serving the one before");
        }
    }
}

fn read(cert: &Path, key: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let c = std::fs::read(cert)
        .map_err(|e| anyhow::anyhow!("--webhook-cert {}: {e}", cert.display()))?;
    let k =
        std::fs::read(key).map_err(|e| anyhow::anyhow!("--webhook-key {}: {e}", key.display()))?;
    Ok((c, k))
}

fn load(cert: &Path, key: &Path, (c, k): &(Vec<u8>, Vec<u8>)) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_slice_iter(c)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--webhook-cert {}: {e}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "--webhook-cert {}: no certificate in it",
        cert.display()
    );
    let der = PrivateKeyDer::from_pem_slice(k)
        .map_err(|e| anyhow::anyhow!("--webhook-key {}: {e}", key.display()))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| anyhow::anyhow!("--webhook-key {}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| anyhow::anyhow!("--webhook-cert/--webhook-key: {e}"))?;
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn leaf(files: &FromFiles) -> Vec<u8> {
        let c = files.current.read().unwrap();
        c.certified.cert[0].to_vec()
    }

    /// A renewed Secret (both files rewritten) is served without a restart;
    /// a key caught between writes, not the certificate's, is refused and
    /// the certificate before stays.
    #[tokio::test]
    async fn a_renewed_certificate_is_taken_without_a_restart() {
        let dir = std::env::temp_dir().join(format!("strait-webhook-cert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let (a_cert, a_key) = self_signed("strait.strait-system.svc");
        std::fs::write(&cert, &a_cert).unwrap();
        std::fs::write(&key, &a_key).unwrap();
        let files = FromFiles::watch(&cert, &key).unwrap();
        let first = leaf(&files);
        assert!(!files.reload().unwrap(), "unchanged files taken again");

        let (b_cert, b_key) = self_signed("strait.strait-system.svc");
        std::fs::write(&cert, &b_cert).unwrap();
        assert!(
            files.reload().is_err(),
            "a key that is not the certificate's"
        );
        assert_eq!(leaf(&files), first);
        std::fs::write(&key, &b_key).unwrap();
        assert!(files.reload().unwrap());
        assert_ne!(leaf(&files), first);
        let b = CertificateDer::pem_slice_iter(b_cert.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(leaf(&files), b.to_vec());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
