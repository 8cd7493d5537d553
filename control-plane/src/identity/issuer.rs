//! The issuer in force. `--issuer-cert` and `--issuer-key` are read again
//! every `ISSUER_RELOAD`: a Secret renewed in place (cert-manager's, or an
//! operator's `kubectl apply`) is signed with from then on, without a restart,
//! rather than the issuer it replaced signing ever shorter leaves until it
//! expires and every certificate under it with it. A new issuer is taken only
//! whole and usable (its key its certificate's, a CA, and chaining to
//! `--trust-anchors` as they read then); otherwise the one before stays, with a
//! warning. Proxies holding an older issuer's certificate prove themselves by
//! token until they renew (`caller.rs`); the controller's own serving
//! certificates are signed again at once (`serving.rs`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::ca::{Ca, CaError};

#[derive(Debug)]
pub struct Issuer {
    ca: watch::Sender<Arc<Ca>>,
    files: Option<Files>,
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    anchors: Option<PathBuf>,
    lifetime: Duration,
    /// The files as last taken: unchanged ones are not parsed again.
    taken: Mutex<(String, String)>,
}

/// Never the key the files held (`taken`): every service holding the
/// issuer derives `Debug`, and one such value logged would log it.
impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("anchors", &self.anchors)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// Why the files were not taken.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Issuer(#[from] CaError),
    #[error("{0}")]
    AnchorsUnreadable(String),
    #[error("--issuer-cert and --trust-anchors: {0}")]
    NotUnderAnchors(String),
}

impl Issuer {
    /// An issuer that never changes.
    pub fn fixed(ca: Ca) -> Arc<Self> {
        Arc::new(Issuer {
            ca: watch::Sender::new(Arc::new(ca)),
            files: None,
        })
    }

    /// The issuer of `cert` and `key`, which must chain to the anchors in
    /// `anchors` (if given), read again by `reload`.
    pub fn load(
        cert: &Path,
        key: &Path,
        anchors: Option<&Path>,
        lifetime: Duration,
    ) -> Result<Arc<Self>, Refused> {
        let read = Ca::read_files(cert, key)?;
        let ca = Ca::from_files_read(cert, key, &read, lifetime)?;
        check_anchors(&ca, anchors)?;
        Ok(Arc::new(Issuer {
            ca: watch::Sender::new(Arc::new(ca)),
            files: Some(Files {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                anchors: anchors.map(Path::to_path_buf),
                lifetime,
                taken: Mutex::new(read),
            }),
        }))
    }

    /// The issuer to sign with now.
    pub fn current(&self) -> Arc<Ca> {
        self.ca.borrow().clone()
    }

    /// Sees each issuer taken after this call.
    pub fn changes(&self) -> watch::Receiver<Arc<Ca>> {
        self.ca.subscribe()
    }

    /// Reads the files again: the new issuer if they changed and it is
    /// usable, `None` if they did not change, and an error (the issuer before
    /// staying) if what they hold cannot be used. Files caught between writes
    /// are an error this time and taken the next.
    pub fn reload(&self) -> Result<Option<Arc<Ca>>, Refused> {
        let Some(f) = &self.files else {
            return Ok(None);
        };
        let read = Ca::read_files(&f.cert, &f.key)?;
        if *f.taken.lock().unwrap_or_else(PoisonError::into_inner) == read {
            return Ok(None);
        }
        let ca = Ca::from_files_read(&f.cert, &f.key, &read, f.lifetime)?;
        check_anchors(&ca, f.anchors.as_deref())?;
        let ca = Arc::new(ca);
        *f.taken.lock().unwrap_or_else(PoisonError::into_inner) = read;
        self.ca.send_replace(ca.clone());
        Ok(Some(ca))
    }
}

/// Anchors the issuer does not chain to would be handed to every injected
/// proxy, and every mTLS handshake would fail.
fn check_anchors(ca: &Ca, anchors: Option<&Path>) -> Result<(), Refused> {
    let Some(path) = anchors else {
        return Ok(());
    };
    let pem =
        crate::inject::read_anchors("--trust-anchors", path).map_err(Refused::AnchorsUnreadable)?;
    ca.chains_to(&pem).map_err(Refused::NotUnderAnchors)
}

/// Reads the files again every `every` for as long as `issuer` is held
/// elsewhere, telling `taken` of each new issuer.
pub async fn reload_every(
    issuer: std::sync::Weak<Issuer>,
    every: Duration,
    taken: impl Fn(&Ca) + Send + 'static,
) {
    loop {
        tokio::time::sleep(every).await;
        let Some(issuer) = issuer.upgrade() else {
            return;
        };
        match issuer.reload() {
            Ok(Some(ca)) => {
                tracing::info!(
                    not_after = %humantime::format_rfc3339_seconds(ca.issuer_not_after()),
                    "issuer reloaded: signing with the new one"
                );
                taken(&ca);
            }
            Ok(None) => {}
            Err(e) => {
                strait_otel::sampled!(warn, error = %e, "cannot take the issuer's files again; signing with the one before");
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used)]
    use rcgen::KeyPair;

    use super::*;

    /// A trust anchor, as PEM and as what signs issuers under it.
    pub struct Anchor {
        pub pem: String,
        signer: rcgen::Issuer<'static, KeyPair>,
    }

    pub fn anchor(name: &str) -> Anchor {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = super::super::ca::ca_params(name, Duration::from_secs(3600), 1);
        let pem = params.self_signed(&key).unwrap().pem();
        Anchor {
            pem,
            signer: rcgen::Issuer::new(params, key),
        }
    }

    impl Anchor {
        /// A new issuer under this anchor: certificate and key, as PEM.
        pub fn issuer(&self) -> (String, String) {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let cert = super::super::ca::ca_params("identity", Duration::from_secs(3600), 0)
                .signed_by(&key, &self.signer)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    /// Files as a mounted Secret's: `tls.crt`, `tls.key` and `ca.crt`.
    pub struct Mounted(pub PathBuf);

    impl Mounted {
        pub fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("strait-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Mounted(dir)
        }
        pub fn write(&self, (cert, key): &(String, String), anchors: &str) {
            std::fs::write(self.0.join("tls.crt"), cert).unwrap();
            std::fs::write(self.0.join("tls.key"), key).unwrap();
            std::fs::write(self.0.join("ca.crt"), anchors).unwrap();
        }
        pub fn load(&self) -> Arc<Issuer> {
            Issuer::load(
                &self.0.join("tls.crt"),
                &self.0.join("tls.key"),
                Some(&self.0.join("ca.crt")),
                Duration::from_secs(60),
            )
            .unwrap()
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn der_of(pem: &str) -> Vec<u8> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    /// cert-manager renews the issuer's Secret in place: the controller signs
    /// with the new issuer from the next read, without a restart; what cannot
    /// be used (a key not the certificate's, an issuer under no anchor it was
    /// given) leaves the one before in force, until the files are right.
    #[test]
    fn a_renewed_issuer_is_taken_and_an_unusable_one_is_not() {
        let files = Mounted::new("issuer-reload");
        let (old, new) = (anchor("old-root"), anchor("new-root"));
        let first = old.issuer();
        files.write(&first, &old.pem);
        let issuer = files.load();
        let shown = format!("{issuer:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        let mut changes = issuer.changes();
        assert!(issuer.reload().unwrap().is_none(), "unchanged files");
        assert!(!changes.has_changed().unwrap());

        let renewed = old.issuer();
        files.write(&renewed, &old.pem);
        let taken = issuer.reload().unwrap().expect("the renewed issuer");
        assert_eq!(taken.issuer_der(), der_of(&renewed.0));
        assert_eq!(issuer.current().issuer_der(), der_of(&renewed.0));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();

        // Caught between writes: the new certificate, the old key.
        files.write(&(old.issuer().0, renewed.1.clone()), &old.pem);
        let e = issuer.reload().unwrap_err().to_string();
        assert!(
            e.contains("--issuer-key") && e.contains("does not belong"),
            "{e}"
        );
        // Under an anchor the proxies were not given.
        let elsewhere = new.issuer();
        files.write(&elsewhere, &old.pem);
        let e = issuer.reload().unwrap_err().to_string();
        assert!(e.contains("--trust-anchors"), "{e}");
        assert_eq!(issuer.current().issuer_der(), der_of(&renewed.0));
        assert!(!changes.has_changed().unwrap());

        // Rotating the anchors: both trusted, then the new issuer.
        files.write(&elsewhere, &format!("{}{}", old.pem, new.pem));
        issuer
            .reload()
            .unwrap()
            .expect("the issuer under the new anchor");
        assert_eq!(issuer.current().issuer_der(), der_of(&elsewhere.0));
    }

    /// The controller reads the files again on its own, and says when it took
    /// a new issuer (the expiry gauge follows).
    #[tokio::test(start_paused = true)]
    async fn the_files_are_read_again_every_few_seconds() {
        let files = Mounted::new("issuer-every");
        let root = anchor("root");
        files.write(&root.issuer(), &root.pem);
        let issuer = files.load();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(reload_every(
            Arc::downgrade(&issuer),
            Duration::from_secs(10),
            move |ca: &Ca| {
                let _ = tx.send(ca.issuer_der().to_vec());
            },
        ));
        let renewed = root.issuer();
        files.write(&renewed, &root.pem);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(rx.try_recv().is_err(), "read before its time");
        let taken = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
        assert_eq!(taken.unwrap().unwrap(), der_of(&renewed.0));
        assert_eq!(issuer.current().issuer_der(), der_of(&renewed.0));
    }
}
