//! Certificates for tests: a trust anchor and issuer as `strait install` would make
//! them, service-account token Secrets, and a TLS client that presents any
//! certificate we craft (valid, expired, from another CA) to a proxy's inbound port.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use strait_control_plane::identity::ca;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::manifests::ManifestDir;

/// An anchor and issuer, written to files in a directory of their own.
pub struct Pki {
    pub generated: ca::Generated,
    pub dir: ManifestDir,
}

impl Pki {
    pub fn new() -> Pki {
        let generated =
            ca::generate("cluster.local", Duration::from_secs(24 * 3600)).expect("generate CA");
        let dir = ManifestDir::new();
        dir.write("anchors.pem", &generated.anchor_pem);
        dir.write("issuer.crt", &generated.issuer_cert_pem);
        dir.write("issuer.key", &generated.issuer_key_pem);
        Pki { generated, dir }
    }

    pub fn issuer_cert(&self) -> PathBuf {
        self.dir.path().join("issuer.crt")
    }

    pub fn issuer_key(&self) -> PathBuf {
        self.dir.path().join("issuer.key")
    }

    /// `strait install`'s flags that give it this identity.
    pub fn install_flags(&self) -> [String; 3] {
        [
            format!("--identity-trust-anchors-file={}", self.anchors().display()),
            format!(
                "--identity-issuer-certificate-file={}",
                self.issuer_cert().display()
            ),
            format!("--identity-issuer-key-file={}", self.issuer_key().display()),
        ]
    }

    /// The issuer's certificate, DER.
    pub fn issuer_der(&self) -> Vec<u8> {
        CertificateDer::from_pem_slice(self.generated.issuer_cert_pem.as_bytes())
            .expect("issuer pem")
            .to_vec()
    }

    pub fn anchors(&self) -> PathBuf {
        self.dir.path().join("anchors.pem")
    }

    /// A leaf for `identity` signed by this issuer, valid from `from` to `until`.
    pub fn leaf(&self, identity: &str, from: SystemTime, until: SystemTime) -> Leaf {
        let issuer_key = KeyPair::from_pem(&self.generated.issuer_key_pem).expect("issuer key");
        let issuer =
            Issuer::from_ca_cert_pem(&self.generated.issuer_cert_pem, issuer_key).expect("issuer");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(identity.try_into().expect("uri"))];
        p.not_before = from.into();
        p.not_after = until.into();
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let cert = p.signed_by(&key, &issuer).expect("sign leaf");
        let issuer_der = CertificateDer::from_pem_slice(self.generated.issuer_cert_pem.as_bytes())
            .expect("issuer pem");
        Leaf {
            chain: vec![cert.der().clone(), issuer_der],
            key: PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// A Secret holding a service-account token, as Kubernetes makes them.
pub fn token_secret(ns: &str, service_account: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/service-account-token\nmetadata:\n  name: {service_account}-token\n  namespace: {ns}\n  annotations: {{kubernetes.io/service-account.name: {service_account}}}\nstringData: {{token: \"{token}\"}}\n"
    )
}

/// Writes `token` to a file of its own in `dir`; returns the path.
pub fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(format!("{name}.token"));
    std::fs::write(&p, token).expect("write token");
    p
}

/// The name the controller's serving certificate carries beside its SPIFFE
/// identity (with the default --namespace and --service-account).
pub const CONTROLLER_DNS_NAME: &str = "strait-controller.strait-system.svc";

/// A gRPC channel to a controller that issues certificates (its port is TLS-only),
/// verified the way a standard gRPC tool would: the chain against `anchors_pem`
/// and the DNS name in the certificate.
pub async fn controller_channel(
    grpc: std::net::SocketAddr,
    anchors_pem: &str,
) -> tonic::transport::Channel {
    controller_channel_as(grpc, anchors_pem, None).await
}

/// As [`controller_channel`], presenting `client` as the TLS client certificate.
pub async fn controller_channel_as(
    grpc: std::net::SocketAddr,
    anchors_pem: &str,
    client: Option<Leaf>,
) -> tonic::transport::Channel {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(anchors_pem.as_bytes()) {
        roots.add(c.expect("anchor PEM")).expect("anchor");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some(l) => cfg
            .with_client_auth_cert(l.chain, l.key)
            .expect("client certificate"),
        None => cfg.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    tonic::transport::Endpoint::from_shared(format!("https://{grpc}"))
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(grpc).await?;
                let name =
                    ServerName::try_from(CONTROLLER_DNS_NAME).map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .expect("TLS channel to the controller")
}

/// Accepts any server certificate: these tests check the server's side, and
/// record what it presented.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a TLS client saw of a proxy's inbound port.
#[derive(Debug)]
pub struct Seen {
    /// The first line of the HTTP response, if one came.
    pub status_line: Option<String>,
    /// Serial of the certificate the proxy presented (hex).
    pub server_serial: Option<String>,
    /// The key exchange group negotiated.
    pub kx: Option<String>,
    /// The certificate that signed the proxy's (DER), as presented.
    pub server_issuer: Option<Vec<u8>>,
}

/// A TLS client as a peer proxy holding `leaf` is, offering `alpn`; it
/// accepts any server certificate (the server's side is under test).
fn peer_client(leaf: Leaf, alpn: &[u8]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(leaf.chain, leaf.key)
        .expect("client cert");
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

/// Opens TLS to `inbound` presenting `leaf` and sends one HTTP/1.1 request for the
/// app's `target_port`.
pub async fn request_over_tls(
    inbound: std::net::SocketAddr,
    leaf: Leaf,
    target_port: u16,
    path: &str,
) -> Seen {
    let cfg = peer_client(leaf, b"http/1.1");
    let tcp = TcpStream::connect(inbound).await.expect("connect inbound");
    let name = ServerName::try_from("web.test.serviceaccount.identity.strait.cluster.local")
        .expect("name");
    let mut seen = Seen {
        status_line: None,
        server_serial: None,
        kx: None,
        server_issuer: None,
    };
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
    else {
        return seen;
    };
    {
        let conn = tls.get_ref().1;
        seen.kx = conn
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()));
        seen.server_serial = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| {
                let ee = webpki::EndEntityCert::try_from(c).ok()?;
                Some(ee.serial().iter().map(|b| format!("{b:02x}")).collect())
            });
        seen.server_issuer = conn
            .peer_certificates()
            .and_then(|c| c.get(1))
            .map(|c| c.to_vec());
    }
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: web\r\nstrait-target-port: {target_port}\r\nconnection: close\r\n\r\n"
    );
    if tls.write_all(req.as_bytes()).await.is_err() {
        return seen;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    seen.status_line = text
        .lines()
        .next()
        .filter(|l| l.starts_with("HTTP/"))
        .map(str::to_string);
    seen
}

/// Opens TLS to `inbound` presenting `leaf` and offering `alpn`, writes `bytes`,
/// and returns all that comes back until the server closes (within 5 s): what a
/// peer proxy holding `leaf` could send, byte for byte.
pub async fn exchange_over_tls(
    inbound: std::net::SocketAddr,
    leaf: Leaf,
    alpn: &[u8],
    bytes: &[u8],
) -> Vec<u8> {
    exchange_over_tls_after(inbound, leaf, alpn, bytes, Duration::ZERO).await
}

/// As [`exchange_over_tls`], writing `parts` with `gap` between them: a
/// client that pauses.
pub async fn exchange_over_tls_in_parts(
    inbound: std::net::SocketAddr,
    leaf: Leaf,
    alpn: &[u8],
    parts: &[&[u8]],
    gap: Duration,
) -> Vec<u8> {
    let cfg = peer_client(leaf, alpn);
    let tcp = TcpStream::connect(inbound).await.expect("connect inbound");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(peer_name(), tcp)
        .await
        .expect("TLS to the inbound port");
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        // The stream may have been ended already: what came back tells.
        if tls.write_all(p).await.is_err() {
            break;
        }
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    buf
}

fn peer_name() -> ServerName<'static> {
    ServerName::try_from("web.test.serviceaccount.identity.strait.cluster.local").expect("name")
}

/// As [`exchange_over_tls`], the handshake starting `pause` after the connect:
/// a peer whose ClientHello is late (a lost segment, a throttled CPU).
pub async fn exchange_over_tls_after(
    inbound: std::net::SocketAddr,
    leaf: Leaf,
    alpn: &[u8],
    bytes: &[u8],
    pause: Duration,
) -> Vec<u8> {
    let cfg = peer_client(leaf, alpn);
    let tcp = TcpStream::connect(inbound).await.expect("connect inbound");
    tokio::time::sleep(pause).await;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(peer_name(), tcp)
        .await
        .expect("TLS to the inbound port");
    tls.write_all(bytes).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    buf
}

/// A certificate signing request for `identity` (a fresh key), as a proxy sends.
pub fn csr(identity: &str) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(identity.try_into().expect("a URI"))];
    p.serialize_request(&key).expect("csr").der().to_vec()
}
