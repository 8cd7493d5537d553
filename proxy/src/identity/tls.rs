//! rustls between proxies: TLS 1.3 only, aws-lc-rs with the post-quantum hybrid key
//! exchange (X25519MLKEM768) preferred, a client certificate required both ways.
//! The client proxy accepts a peer only if its certificate chains to our anchors
//! and carries exactly the identity discovery promised for that endpoint.

use std::fmt;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{Credentials, Identity};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// An opaque TCP stream between proxies: the target port (2 bytes, big-endian)
/// comes first, then the app's bytes.
pub const ALPN_OPAQUE: &[u8] = b"strait-opaque/1";

/// The one provider in the process: aws-lc-rs, whose default key-exchange order
/// puts X25519MLKEM768 first.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The workload a peer's leaf names, while the leaf is valid. A resumed TLS
/// session carries the certificate of the handshake that made it, and rustls
/// does not verify it again: a leaf that expired since is refused here.
pub fn live_identity_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    live_peer(cert).map(|(id, _)| id)
}

/// As `live_identity_of`, with how long the leaf has left.
pub fn live_peer(cert: &CertificateDer<'_>) -> Option<(Identity, std::time::Duration)> {
    let not_after = super::creds::not_after(cert).ok()?;
    let left = not_after
        .duration_since(std::time::SystemTime::now())
        .ok()
        .filter(|d| !d.is_zero())?;
    Some((identity_of(cert)?, left))
}

/// The identity in a verified peer certificate: its one URI SAN, when that is a
/// workload identity.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut uris = ee.valid_uri_names();
    let first = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    first.parse().ok()
}

#[derive(Debug)]
struct Resolver(Arc<Credentials>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current()
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The inbound side: peers must present a certificate chaining to our anchors.
pub fn server_config(creds: &Arc<Credentials>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(
        creds.anchors.roots.clone(),
        creds.provider.clone(),
    )
    .build()
    .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(creds.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(BoundedChain(verifier)))
        .with_cert_resolver(Arc::new(Resolver(creds.clone())));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_OPAQUE.to_vec()];
    cfg.session_storage = Arc::new(SessionsOfOneCertificate {
        creds: creds.clone(),
        cache: Mutex::new(Sessions::of(creds.generation(), false)),
    });
    Ok(Arc::new(cfg))
}

/// As many as rustls keeps by default.
const RESUMABLE_SESSIONS: usize = 256;

fn fresh_sessions() -> Arc<dyn StoresServerSessions> {
    ServerSessionMemoryCache::new(RESUMABLE_SESSIONS)
}

/// The sessions peers may resume, while this proxy's certificate is the one
/// they were made with. A resumed session presents the certificate of the
/// handshake that made it, and hands on new tickets of it: after a renewal a
/// peer could go on resuming with the old certificate until, expired, it
/// refused it at every reconnect. A renewal starts anew, so each peer's next
/// connection is a full handshake, which presents the new one.
///
/// A handshake picks its certificate at the ClientHello and stores its
/// session at the client's Finished: one that picked the old certificate
/// just before a renewal would store it among the new one's. So for a
/// handshake's longest life after a renewal no session is stored (peers
/// resume again from their next full handshake).
#[derive(Debug)]
struct SessionsOfOneCertificate {
    creds: Arc<Credentials>,
    cache: Mutex<Sessions>,
}

/// The sessions of one generation of this proxy's certificate.
#[derive(Debug)]
struct Sessions {
    generation: u64,
    /// Until when a handshake that picked an earlier certificate may finish.
    settles_at: Option<tokio::time::Instant>,
    store: Arc<dyn StoresServerSessions>,
}

impl Sessions {
    /// `renewed`: a certificate before this one may still be in handshakes.
    fn of(generation: u64, renewed: bool) -> Self {
        Sessions {
            generation,
            settles_at: renewed
                .then(|| tokio::time::Instant::now() + crate::defaults::TLS_HANDSHAKE_TIMEOUT),
            store: fresh_sessions(),
        }
    }
}

impl SessionsOfOneCertificate {
    /// The current generation's sessions, and whether a handshake begun
    /// under the previous one may still be under way.
    fn current(&self) -> (Arc<dyn StoresServerSessions>, bool) {
        let generation = self.creds.generation();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.generation != generation {
            // Generation 0 held no certificate: nothing to have picked.
            *cache = Sessions::of(generation, cache.generation != 0);
        }
        let unsettled = cache
            .settles_at
            .is_some_and(|t| tokio::time::Instant::now() < t);
        (cache.store.clone(), unsettled)
    }
}

impl StoresServerSessions for SessionsOfOneCertificate {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let (store, unsettled) = self.current();
        !unsettled && store.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.current().0.get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.current().0.take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The outbound side, for one peer identity.
pub fn client_config(
    creds: &Arc<Credentials>,
    peer: Identity,
    alpn: &[u8],
    mismatches: Counter,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let verifier = PeerVerifier {
        creds: creds.clone(),
        expected: peer,
        mismatches,
    };
    let mut cfg = ClientConfig::builder_with_provider(creds.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(Resolver(creds.clone())));
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

#[derive(Debug, thiserror::Error)]
#[error("peer presented identity {got}, discovery promised {want}")]
pub struct IdentityMismatch {
    pub got: String,
    pub want: Identity,
}

/// A handshake error as a reader should see it: an identity mismatch in its
/// own words rather than nested inside rustls' debug output.
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    let Some(inner) = e.get_ref() else {
        return e.to_string();
    };
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other)))) =
        inner.downcast_ref::<rustls::Error>()
        && let Some(m) = other.downcast_ref::<IdentityMismatch>()
    {
        return m.to_string();
    }
    inner.to_string()
}

/// What a caller is told of a peer proxy that refused this proxy's
/// certificate (with the alert).
pub const REFUSED_OUR_CERTIFICATE: &str = "the peer refused this proxy's certificate";

/// The alert a peer proxy refused this proxy's certificate with, if `e` is
/// one. In TLS 1.3 the client's handshake ends before the server has checked
/// the client's certificate: a refusal (a peer that does not trust the issuer
/// yet, mid-rotation) arrives as the alert on the first read, failing the
/// connection's requests rather than the handshake.
pub fn refused_our_certificate(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    use rustls::AlertDescription as A;
    let Some(rustls::Error::AlertReceived(alert)) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return None;
    };
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
            // A chain whose issuer's name a trusted anchor has, but not its
            // key: a rotation that kept the issuer's name.
            | A::DecryptError
    )
    .then_some(*alert)
}

/// At most this many certificates besides the leaf in a peer's chain:
/// webpki's own bound on a path's intermediates, so no chain it could
/// verify is refused (ours has the issuer, a user's CA a few more, perhaps
/// the root sent along). Anyone who reaches a port can send a chain, and
/// webpki searches the certificates it is given for a path: a dozen
/// self-issued CAs of one name take it to its 200,000-step cap, tenths of a
/// second of CPU per handshake; six, some two thousand, milliseconds.
const MAX_CHAIN_INTERMEDIATES: usize = 6;

fn bounded(intermediates: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
    if intermediates.len() > MAX_CHAIN_INTERMEDIATES {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
    }
    Ok(())
}

/// A client certificate verifier that refuses long chains before searching
/// them.
#[derive(Debug)]
struct BoundedChain(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for BoundedChain {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        bounded(intermediates)?;
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

struct PeerVerifier {
    creds: Arc<Credentials>,
    expected: Identity,
    mismatches: Counter,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        bounded(intermediates)?;
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        ee.verify_for_usage(
            self.creds.provider.signature_verification_algorithms.all,
            &self.creds.anchors.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        let uris: Vec<&str> = ee.valid_uri_names().collect();
        if uris != [self.expected.as_str()] {
            self.mismatches.inc();
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(IdentityMismatch {
                    got: uris.join(","),
                    want: self.expected.clone(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.3 only between proxies.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.creds.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.creds
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let c = match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a renewal no session is kept for as long as a handshake that
    /// picked the old certificate could still finish (and store its own,
    /// which resumed would present the old certificate on); then they are.
    #[tokio::test(start_paused = true)]
    async fn sessions_are_not_kept_while_a_handshake_of_the_old_certificate_may_finish() {
        let root_key = rcgen::KeyPair::generate().unwrap();
        let mut root_params = rcgen::CertificateParams::default();
        root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root_cert = root_params.self_signed(&root_key).unwrap();
        let root = rcgen::Issuer::new(root_params, root_key);
        let anchors = crate::identity::TrustAnchors::from_pem(root_cert.pem().as_bytes()).unwrap();
        let web = Identity::of("cluster.local", "shop", "web").unwrap();
        let creds = Arc::new(Credentials::generate(web, anchors).unwrap());
        let install = || {
            let csr =
                rcgen::CertificateSigningRequestParams::from_der(&creds.csr_der().unwrap().into())
                    .unwrap();
            let leaf = csr.signed_by(&root).unwrap().der().to_vec();
            creds.install(leaf, Vec::new()).unwrap();
        };
        install();
        let sessions = SessionsOfOneCertificate {
            creds: creds.clone(),
            cache: Mutex::new(Sessions::of(creds.generation(), false)),
        };
        // The first certificate: nothing before it.
        assert!(sessions.put(b"a".to_vec(), b"1".to_vec()));
        assert_eq!(sessions.get(b"a"), Some(b"1".to_vec()));
        // Renewed: a handshake that picked the old certificate may finish.
        install();
        assert!(!sessions.put(b"b".to_vec(), b"2".to_vec()));
        assert_eq!(sessions.get(b"a"), None, "the old certificate's are gone");
        tokio::time::advance(crate::defaults::TLS_HANDSHAKE_TIMEOUT).await;
        assert!(sessions.put(b"c".to_vec(), b"3".to_vec()));
        assert_eq!(sessions.get(b"b"), None);
        assert_eq!(sessions.get(b"c"), Some(b"3".to_vec()));
    }

    /// A leaf for web: expired in 2020, or valid until rcgen's far future.
    fn leaf(expired: bool) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap(),
        )];
        if expired {
            p.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        p.self_signed(&key).unwrap().der().clone()
    }

    /// A peer's chain is refused unsearched when longer than any of ours:
    /// a dozen self-issued CAs of one name, sent by anyone who reaches the
    /// inbound port, cost webpki's whole path search each handshake.
    #[test]
    fn a_long_chain_is_refused_before_it_is_searched() {
        use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca = |cn: &str| {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p
        };
        let root_key = KeyPair::generate().unwrap();
        let root = ca("root").self_signed(&root_key).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.der().clone()).unwrap();
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
        let verifier = BoundedChain(inner);
        let leaf_of = |issuer: &Issuer<'_, KeyPair>| {
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![rcgen::SanType::URI(
                "spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap(),
            )];
            p.signed_by(&KeyPair::generate().unwrap(), issuer)
                .unwrap()
                .der()
                .clone()
        };
        let mut xs = Vec::new();
        let mut x_key = None;
        for _ in 0..12 {
            let key = KeyPair::generate().unwrap();
            xs.push(ca("X").self_signed(&key).unwrap().der().clone());
            x_key.get_or_insert(key);
        }
        let leaf = leaf_of(&Issuer::new(ca("X"), x_key.unwrap()));
        let e = verifier
            .verify_client_cert(&leaf, &xs, UnixTime::now())
            .unwrap_err();
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
        // As many as a path may have are searched, and cheaply refused.
        let started = std::time::Instant::now();
        let e = verifier
            .verify_client_cert(&leaf, &xs[..MAX_CHAIN_INTERMEDIATES], UnixTime::now())
            .unwrap_err();
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            "after {:?}",
            started.elapsed()
        );
        // Ours: a leaf of an issuer under the root, the issuer sent along.
        let issuer_key = KeyPair::generate().unwrap();
        let root_issuer = Issuer::new(ca("root"), root_key);
        let issuer_cert = ca("issuer").signed_by(&issuer_key, &root_issuer).unwrap();
        let leaf = leaf_of(&Issuer::new(ca("issuer"), issuer_key));
        verifier
            .verify_client_cert(&leaf, &[issuer_cert.der().clone()], UnixTime::now())
            .unwrap();
    }

    /// A resumed session brings back the leaf of its first handshake: once
    /// that has expired, it names nobody.
    #[test]
    fn an_expired_leaf_names_no_live_identity() {
        assert_eq!(
            live_identity_of(&leaf(false)).map(|i| i.to_string()),
            Some("spiffe://cluster.local/ns/shop/sa/web".to_string())
        );
        let expired = leaf(true);
        assert!(identity_of(&expired).is_some());
        assert!(live_identity_of(&expired).is_none());
    }
}
