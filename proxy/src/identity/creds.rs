//! The proxy's credentials: a private key generated in memory at start (never
//! written anywhere, never shown by the admin server) and the current certificate
//! for it. A new certificate replaces the old one for new connections; open
//! connections keep the one they shook hands with.

use std::fmt;
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tokio::sync::watch;

use super::{Identity, TrustAnchors};

#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error("cannot generate a private key: {0}")]
    Key(String),
    #[error("cannot build a certificate signing request: {0}")]
    Csr(String),
    #[error("the control plane returned a certificate that does not verify: {0}")]
    Untrusted(String),
    #[error("the control plane returned a certificate for {got:?}, this proxy is {want}")]
    WrongIdentity { got: Vec<String>, want: Identity },
    #[error("the control plane returned a certificate for another key")]
    WrongKey,
}

/// What was installed, for logs and metrics.
#[derive(Clone, Debug)]
pub struct Installed {
    pub serial: String,
    /// The certificate's own notAfter: renewal is timed by it, whatever else the
    /// control plane said.
    pub not_after: std::time::SystemTime,
}

pub struct Credentials {
    identity: Identity,
    key: KeyPair,
    signing_key: Arc<dyn rustls::sign::SigningKey>,
    pub(crate) anchors: TrustAnchors,
    pub(crate) provider: Arc<CryptoProvider>,
    current: watch::Sender<Option<Arc<CertifiedKey>>>,
    /// The current certificate's notAfter, in seconds since the epoch (0:
    /// none yet).
    not_after: std::sync::atomic::AtomicU64,
    /// Certificates installed so far: what was built for one (client
    /// configs, whose resumable sessions carry it) is built again.
    generation: std::sync::atomic::AtomicU64,
}

// Never prints the key.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("anchors", &self.anchors.len())
            .field("certified", &self.current.borrow().is_some())
            .finish()
    }
}

impl Credentials {
    pub fn generate(identity: Identity, anchors: TrustAnchors) -> Result<Self, CredsError> {
        let provider = super::tls::provider();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CredsError::Key(e.to_string()))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| CredsError::Key(e.to_string()))?;
        Ok(Credentials {
            identity,
            key,
            signing_key,
            anchors,
            provider,
            current: watch::Sender::new(None),
            not_after: Default::default(),
            generation: Default::default(),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// A CSR for our key, asking for exactly our identity as its URI SAN.
    pub fn csr_der(&self) -> Result<Vec<u8>, CredsError> {
        let uri = rcgen::string::Ia5String::try_from(self.identity.as_str())
            .map_err(|e| CredsError::Csr(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&self.key)
            .map_err(|e| CredsError::Csr(e.to_string()))?;
        Ok(csr.der().to_vec())
    }

    /// Checks a certificate from the control plane as any peer would (chains to our
    /// anchors, carries our identity and nothing else, is for our key) and makes it
    /// the one new connections present.
    pub fn install(
        &self,
        leaf: Vec<u8>,
        intermediates: Vec<Vec<u8>>,
    ) -> Result<Installed, CredsError> {
        let leaf = CertificateDer::from(leaf);
        let intermediates: Vec<CertificateDer<'static>> = intermediates
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let ee = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|e| CredsError::Untrusted(e.to_string()))?;
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            ee.verify_for_usage(
                self.provider.signature_verification_algorithms.all,
                &self.anchors.anchors,
                &intermediates,
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .map_err(|e| CredsError::Untrusted(why_untrusted(&e)))?;
        }
        let uris: Vec<String> = ee.valid_uri_names().map(str::to_string).collect();
        if uris.len() != 1 || uris[0] != self.identity.as_str() {
            return Err(CredsError::WrongIdentity {
                got: uris,
                want: self.identity.clone(),
            });
        }
        let serial = hex(ee.serial());
        let not_after = not_after(&leaf)?;
        let mut chain = vec![leaf];
        chain.extend(intermediates);
        let certified = CertifiedKey::new(chain, self.signing_key.clone());
        certified.keys_match().map_err(|_| CredsError::WrongKey)?;
        self.current.send_replace(Some(Arc::new(certified)));
        self.not_after
            .store(epoch_secs(not_after), std::sync::atomic::Ordering::Relaxed);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(Installed { serial, not_after })
    }

    /// Whether the certificate new connections present has expired (renewals
    /// failing for its whole lifetime): every peer refuses it.
    pub fn expired(&self) -> bool {
        let t = self.not_after.load(std::sync::atomic::Ordering::Relaxed);
        t != 0 && epoch_secs(std::time::SystemTime::now()) > t
    }

    /// The current certificate's notAfter, once there is one.
    pub fn valid_until(&self) -> Option<std::time::SystemTime> {
        match self.not_after.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            t => std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(t)),
        }
    }

    /// How many certificates have been installed.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The certificate new connections present, once there is one.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.borrow().clone()
    }

    /// Resolves once a certificate is installed.
    pub async fn certified(&self) {
        let mut rx = self.current.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }
}

fn epoch_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn not_after(leaf: &[u8]) -> Result<std::time::SystemTime, CredsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| CredsError::Untrusted(format!("unreadable certificate: {e}")))?;
    let secs = u64::try_from(cert.validity().not_after.timestamp())
        .map_err(|_| CredsError::Untrusted("notAfter before 1970".into()))?;
    Ok(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// Why a certificate from the control plane does not verify. One not valid
/// yet, or expired, when just issued says the clocks disagree: this proxy
/// would refuse every certificate, and never be ready, until they agree.
fn why_untrusted(e: &webpki::Error) -> String {
    match e {
        webpki::Error::CertNotValidYet { .. } => {
            format!("{e} (is this node's clock behind the control plane's?)")
        }
        webpki::Error::CertExpired { .. } => {
            format!("{e} (is this node's clock ahead of the control plane's?)")
        }
        _ => e.to_string(),
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateSigningRequestParams, IsCa, Issuer};

    /// A certificate issued by a controller whose clock is far ahead:
    /// refused, and the refusal points at the clocks.
    #[test]
    fn a_certificate_not_valid_yet_points_at_the_clocks() {
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = CertificateParams::default();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root_params.self_signed(&root_key).unwrap();
        let root = Issuer::new(root_params, root_key);
        let anchors = TrustAnchors::from_pem(root_cert.pem().as_bytes()).unwrap();
        let me = Identity::of("cluster.local", "shop", "web").unwrap();
        let creds = Credentials::generate(me, anchors).unwrap();
        let mut csr =
            CertificateSigningRequestParams::from_der(&creds.csr_der().unwrap().into()).unwrap();
        csr.params.not_before = rcgen::date_time_ymd(2999, 1, 1);
        csr.params.not_after = rcgen::date_time_ymd(2999, 1, 2);
        let leaf = csr.signed_by(&root).unwrap();
        let e = creds.install(leaf.der().to_vec(), Vec::new()).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("not valid yet") || e.contains("NotValidYet"),
            "{e}"
        );
        assert!(e.contains("clock behind"), "{e}");
    }
}
