//! The certificate authority: an issuer certificate and key (signed by a trust
//! anchor) that signs short-lived workload certificates carrying exactly one
//! SPIFFE URI SAN. Also generates a fresh anchor and issuer, for `strait demo` and
//! tests.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::defaults;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{flag} {path}: {reason}")]
    File {
        flag: &'static str,
        path: String,
        reason: String,
    },
    #[error("cannot generate certificates: {0}")]
    Generate(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("the CSR does not parse or its signature does not verify: {0}")]
    BadCsr(String),
    /// `asked`: the first few names, each cut short (a CSR may carry
    /// thousands, and the message is returned, logged and traced).
    #[error("the CSR asks for {count} names ({asked:?}); this token may only have {allowed}")]
    WrongName {
        count: usize,
        asked: Vec<String>,
        allowed: String,
    },
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("the issuer expires at {0}: too soon to sign anything; rotate the issuer")]
    IssuerExpiring(String),
}

/// A signed leaf.
#[derive(Debug)]
pub struct Leaf {
    pub der: Vec<u8>,
    pub serial: String,
    pub not_after: SystemTime,
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    issuer_der: CertificateDer<'static>,
    /// Certificates between the issuer and the anchor (an issuer under an
    /// intermediate), sent with every leaf.
    intermediates: Vec<CertificateDer<'static>>,
    /// No leaf outlives the issuer that signed it.
    issuer_not_after: SystemTime,
    lifetime: Duration,
}

// Never prints the key.
impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl Ca {
    pub fn load(cert: &Path, key: &Path, lifetime: Duration) -> Result<Self, CaError> {
        Self::from_files_read(cert, key, &Self::read_files(cert, key)?, lifetime)
    }

    /// The issuer's files as they are now: certificate (and chain), then key.
    pub fn read_files(cert: &Path, key: &Path) -> Result<(String, String), CaError> {
        let read = |flag: &'static str, p: &Path| {
            std::fs::read_to_string(p).map_err(|e| CaError::File {
                flag,
                path: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        Ok((read("--issuer-cert", cert)?, read("--issuer-key", key)?))
    }

    /// The issuer of what `read_files` read from `cert` and `key`, its
    /// errors naming the file at fault.
    pub fn from_files_read(
        cert: &Path,
        key: &Path,
        (cert_pem, key_pem): &(String, String),
        lifetime: Duration,
    ) -> Result<Self, CaError> {
        Self::from_pem(cert_pem, key_pem, lifetime).map_err(|(flag, reason)| CaError::File {
            flag,
            path: if flag == "--issuer-key" { key } else { cert }
                .display()
                .to_string(),
            reason,
        })
    }

    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        lifetime: Duration,
    ) -> Result<Self, (&'static str, String)> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            (
                "--issuer-key",
                format!("expected a PEM private key (-----BEGIN PRIVATE KEY-----): {e}"),
            )
        })?;
        let mut chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                (
                    "--issuer-cert",
                    format!("expected PEM certificates (-----BEGIN CERTIFICATE-----): {e}"),
                )
            })?
            .into_iter();
        let issuer_der = chain.next().ok_or((
            "--issuer-cert",
            "expected a PEM certificate (-----BEGIN CERTIFICATE-----), found none".to_string(),
        ))?;
        let intermediates: Vec<CertificateDer<'static>> = chain.collect();
        // Proxies present the issuer and these after their leaf, and take at
        // most six certificates there (a path's bound): more, and every
        // handshake between them would fail, unsaid.
        if intermediates.len() > defaults::MAX_ISSUER_CHAIN {
            return Err((
                "--issuer-cert",
                format!(
                    "{} certificates after the issuer; proxies take at most {} (the root need not be sent: their trust anchors hold it)",
                    intermediates.len(),
                    defaults::MAX_ISSUER_CHAIN
                ),
            ));
        }
        // A key that is not the certificate's would sign leaves nobody can verify.
        let (_, cert) = x509_parser::parse_x509_certificate(&issuer_der)
            .map_err(|e| ("--issuer-cert", e.to_string()))?;
        if cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err((
                "--issuer-key",
                "this key does not belong to the --issuer-cert certificate".into(),
            ));
        }
        if !cert.is_ca() {
            return Err(("--issuer-cert", "not a CA certificate".into()));
        }
        let validity = cert.validity();
        let secs = |t: &x509_parser::time::ASN1Time| {
            u64::try_from(t.timestamp())
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        let not_before = secs(&validity.not_before);
        // A leaf verifies only while every certificate of its chain is
        // valid: an intermediate ending before the issuer ends them all.
        let mut issuer_not_after = secs(&validity.not_after);
        for der in &intermediates {
            let (_, c) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| ("--issuer-cert", format!("a certificate of its chain: {e}")))?;
            // A root sent along is a trust anchor, whose dates rustls does
            // not check: it bounds no proxy's leaf. (The API server, in Go,
            // does check it for the webhook's certificate; `strait check`
            // warns of an anchor's expiry.) A root signs itself: one only
            // named by itself (a key rollover's) is an intermediate.
            let root = c.subject() == c.issuer() && c.verify_signature(None).is_ok();
            if !root {
                issuer_not_after = issuer_not_after.min(secs(&c.validity().not_after));
            }
        }
        let now = SystemTime::now();
        if issuer_not_after <= now {
            return Err((
                "--issuer-cert",
                format!(
                    "expired at {} (the issuer, or a certificate of its chain)",
                    humantime::format_rfc3339_seconds(issuer_not_after)
                ),
            ));
        }
        if not_before > now + defaults::CERT_BACKDATE {
            return Err((
                "--issuer-cert",
                format!(
                    "not valid before {}, {} from now by this machine's clock: is the clock of the machine that made it ahead of this one's? It is taken once it is valid",
                    humantime::format_rfc3339_seconds(not_before),
                    humantime::format_duration(Duration::from_secs(
                        not_before.duration_since(now).unwrap_or_default().as_secs()
                    )),
                ),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&issuer_der, key)
            .map_err(|e| ("--issuer-cert", e.to_string()))?;
        let ca = Ca {
            issuer,
            issuer_der,
            intermediates,
            issuer_not_after,
            lifetime,
        };
        ca.probe().map_err(|e| ("--issuer-cert", e))?;
        Ok(ca)
    }

    /// Signs a throw-away leaf and verifies it against the issuer, as a proxy
    /// would: an issuer whose name rcgen cannot reproduce exactly (repeated
    /// attributes such as two OUs) would otherwise sign leaves nobody accepts.
    fn probe(&self) -> Result<(), String> {
        let anchor = webpki::anchor_from_trusted_cert(&self.issuer_der)
            .map_err(|e| format!("unusable as a trust anchor: {e}"))?;
        self.verify_probe(&[anchor], &[]).map_err(|e| format!("certificates it signs would not verify against it ({e}); is its subject name unusual (repeated attributes)?"))
    }

    /// Whether the leaves this issuer signs verify against the trust anchors
    /// in `anchors_pem`, with the chain sent along, as the proxies will check
    /// them: an issuer from another PKI would install fine and then fail every
    /// mTLS handshake, and the webhook's TLS with them.
    pub fn chains_to(&self, anchors_pem: &str) -> Result<(), String> {
        let anchors_der: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(anchors_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("the trust anchors do not parse: {e}"))?;
        let anchors = anchors_der
            .iter()
            .map(|a| webpki::anchor_from_trusted_cert(a).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("a trust anchor is unusable: {e}"))?;
        if anchors.is_empty() {
            return Err("no certificate among the trust anchors".into());
        }
        let chain: Vec<CertificateDer<'static>> = self
            .chain_der()
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        self.verify_probe(&anchors, &chain)
            .map_err(|e| format!("certificates it signs do not verify against the trust anchors ({e}): is the issuer signed by one of them?"))
    }

    /// Signs a throw-away leaf and verifies it against `anchors`, with
    /// `chain` as the intermediates.
    fn verify_probe(
        &self,
        anchors: &[rustls_pki_types::TrustAnchor<'_>],
        chain: &[CertificateDer<'_>],
    ) -> Result<(), String> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let uri = rcgen::string::Ia5String::try_from("spiffe://probe/ns/probe/sa/probe")
            .map_err(|e| e.to_string())?;
        let leaf = self
            .issue(&key, vec![SanType::URI(uri)])
            .map_err(|e| e.to_string())?;
        let der = CertificateDer::from(leaf.der);
        let ee = webpki::EndEntityCert::try_from(&der).map_err(|e| e.to_string())?;
        // Both ends of a proxy's handshake check the leaf, each for its own
        // use, and so does webpki each intermediate's extended key usage: an
        // issuer for client authentication only would pass one and have
        // every proxy refuse every peer.
        for (usage, role) in [
            (webpki::KeyUsage::client_auth(), "client"),
            (webpki::KeyUsage::server_auth(), "server"),
        ] {
            ee.verify_for_usage(
                rustls::crypto::aws_lc_rs::default_provider()
                    .signature_verification_algorithms
                    .all,
                anchors,
                chain,
                rustls_pki_types::UnixTime::now(),
                usage,
                None,
                None,
            )
            .map_err(|e| format!("as a TLS {role}: {e:?}"))?;
        }
        Ok(())
    }

    /// When the issuer expires: no leaf outlives it.
    pub fn issuer_not_after(&self) -> SystemTime {
        self.issuer_not_after
    }

    /// The issuer's certificate, sent with every leaf.
    pub fn issuer_der(&self) -> &[u8] {
        &self.issuer_der
    }

    /// What a leaf's holder presents after the leaf: the issuer and any
    /// intermediates above it.
    pub fn chain_der(&self) -> Vec<Vec<u8>> {
        std::iter::once(&self.issuer_der)
            .chain(&self.intermediates)
            .map(|c| c.to_vec())
            .collect()
    }

    /// Signs a leaf for `identity` with the CSR's public key, if the CSR asks for
    /// exactly that identity and nothing else. The leaf carries only what we put
    /// in it: the SAN, the usages, the validity; nothing else is copied.
    pub fn sign(&self, csr_der: &[u8], identity: &str) -> Result<Leaf, SignError> {
        // The key's type first, from the request as written: verifying an
        // RSA request's signature costs the controller more than refusing it.
        check_key_type(csr_der)?;
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into())
            .map_err(|e| SignError::BadCsr(e.to_string()))?;
        // Signed with the algorithm matching the key: rcgen takes the leaf's
        // key algorithm from the request's signature, so a P-256 key signed
        // with SHA-384 would yield a leaf whose key and algorithm disagree.
        let alg = csr.public_key.algorithm();
        if *alg != rcgen::PKCS_ECDSA_P256_SHA256 && *alg != rcgen::PKCS_ED25519 {
            return Err(bad_key());
        }
        let sans = &csr.params.subject_alt_names;
        let only_ours = matches!(sans.as_slice(), [SanType::URI(u)] if u.as_str() == identity);
        if !only_ours {
            const SHOWN: usize = 4;
            const SHOWN_CHARS: usize = 256;
            let asked = sans
                .iter()
                .take(SHOWN)
                .map(|s| {
                    let name = match s {
                        SanType::URI(u) => u.as_str().to_string(),
                        other => format!("{other:?}"),
                    };
                    name.chars().take(SHOWN_CHARS).collect()
                })
                .collect();
            return Err(SignError::WrongName {
                count: sans.len(),
                asked,
                allowed: identity.to_string(),
            });
        }
        let uri = rcgen::string::Ia5String::try_from(identity)
            .map_err(|e| SignError::Sign(e.to_string()))?;
        self.issue(&csr.public_key, vec![SanType::URI(uri)])
    }

    /// The controller's own serving certificate: its identity as the URI SAN and
    /// `dns_name`, so that standard gRPC tools can verify it too. The key stays in
    /// the controller's memory, like a proxy's.
    pub fn serving_certificate(
        &self,
        identity: &str,
        dns_name: &str,
    ) -> Result<(Leaf, KeyPair), SignError> {
        let e = |e: rcgen::Error| SignError::Sign(e.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(e)?;
        let uri = rcgen::string::Ia5String::try_from(identity).map_err(e)?;
        let dns = rcgen::string::Ia5String::try_from(dns_name).map_err(e)?;
        let leaf = self.issue(&key, vec![SanType::URI(uri), SanType::DnsName(dns)])?;
        Ok((leaf, key))
    }

    /// Signs a leaf for `public` carrying exactly `sans`, the usages and the
    /// validity; nothing else.
    fn issue(&self, public: &impl PublicKeyData, sans: Vec<SanType>) -> Result<Leaf, SignError> {
        let now = SystemTime::now();
        // Leaves cut ever shorter by an expiring issuer would have every proxy
        // renewing in lockstep, ever faster: refuse instead, loudly.
        if self.issuer_not_after < now + defaults::ISSUER_MIN_REMAINING {
            return Err(SignError::IssuerExpiring(
                humantime::format_rfc3339_seconds(self.issuer_not_after).to_string(),
            ));
        }
        let not_after = (now + self.lifetime).min(self.issuer_not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.not_before = (now - defaults::CERT_BACKDATE).into();
        params.not_after = not_after.into();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serial = random_serial();
        let serial_hex = serial
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params.serial_number = Some(serial);
        let cert = params
            .signed_by(public, &self.issuer)
            .map_err(|e| SignError::Sign(e.to_string()))?;
        Ok(Leaf {
            der: cert.der().to_vec(),
            serial: serial_hex,
            not_after,
        })
    }
}

/// An ECDSA P-256 or Ed25519 key (those proxies generate), as the request's
/// SubjectPublicKeyInfo says, before its signature is checked.
fn check_key_type(csr_der: &[u8]) -> Result<(), SignError> {
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
    use x509_parser::prelude::FromDer;
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
        .map_err(|e| SignError::BadCsr(e.to_string()))?;
    let spki = &req.certification_request_info.subject_pki.algorithm;
    let curve = spki.parameters.as_ref().and_then(|p| p.as_oid().ok());
    let ok = spki.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_EC_P256)
        || spki.algorithm == OID_SIG_ED25519;
    if ok { Ok(()) } else { Err(bad_key()) }
}

fn bad_key() -> SignError {
    SignError::BadCsr("the key must be ECDSA P-256 (signed with SHA-256) or Ed25519".into())
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    // Positive, and never a leading zero byte (DER integers are minimal).
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

/// A freshly generated trust anchor and an issuer it signed, as PEM.
#[derive(Clone)]
pub struct Generated {
    pub anchor_pem: String,
    pub issuer_cert_pem: String,
    pub issuer_key_pem: String,
}

impl std::fmt::Debug for Generated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Generated(..)")
    }
}

pub(super) fn ca_params(cn: &str, validity: Duration, path_len: u8) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = (now - defaults::CA_BACKDATE).into();
    p.not_after = (now + validity).into();
    p.serial_number = Some(random_serial());
    p
}

/// A trust anchor (valid for `validity`) and an issuer signed by it.
pub fn generate(trust_domain: &str, validity: Duration) -> Result<Generated, CaError> {
    let g = |e: rcgen::Error| CaError::Generate(e.to_string());
    let anchor_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(g)?;
    let anchor_params = ca_params(&format!("root.{trust_domain}"), validity, 1);
    let anchor = anchor_params.self_signed(&anchor_key).map_err(g)?;
    let anchor_issuer = Issuer::new(anchor_params, anchor_key);
    let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(g)?;
    let issuer = ca_params(&format!("identity.{trust_domain}"), validity, 0)
        .signed_by(&issuer_key, &anchor_issuer)
        .map_err(g)?;
    Ok(Generated {
        anchor_pem: anchor.pem(),
        issuer_cert_pem: issuer.pem(),
        issuer_key_pem: issuer_key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn ca() -> Ca {
        let g = generate("cluster.local", Duration::from_secs(3600)).unwrap();
        Ca::from_pem(
            &g.issuer_cert_pem,
            &g.issuer_key_pem,
            Duration::from_secs(60),
        )
        .unwrap()
    }

    fn csr(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn signs_exactly_the_proven_identity_for_the_configured_lifetime() {
        let ca = ca();
        let a = ca.sign(&csr(vec![uri(WEB)]), WEB).unwrap();
        let b = ca.sign(&csr(vec![uri(WEB)]), WEB).unwrap();
        assert_ne!(a.serial, b.serial, "every leaf gets its own serial");
        let left = a.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(55) && left <= Duration::from_secs(60));
        let needle = WEB.as_bytes();
        assert!(a.der.windows(needle.len()).any(|w| w == needle));
    }

    /// An issuer is checked against the anchors proxies will be given: its
    /// own root's pass, another PKI's are refused with a reason.
    #[test]
    fn an_issuer_is_checked_against_the_anchors_it_is_installed_with() {
        let mine = generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let other = generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let ca = Ca::from_pem(
            &mine.issuer_cert_pem,
            &mine.issuer_key_pem,
            Duration::from_secs(60),
        )
        .unwrap();
        ca.chains_to(&mine.anchor_pem).unwrap();
        // A bundle mid-rotation, the old root among others.
        ca.chains_to(&format!("{}{}", other.anchor_pem, mine.anchor_pem))
            .unwrap();
        let e = ca.chains_to(&other.anchor_pem).unwrap_err();
        assert!(e.contains("do not verify against the trust anchors"), "{e}");
        assert!(ca.chains_to("no certificate").is_err());
    }

    /// An issuer (an intermediate under the anchors) whose extended key
    /// usage admits client authentication only signs leaves every proxy
    /// would refuse as a server: refused at start, naming the role.
    #[test]
    fn an_issuer_for_one_tls_role_only_is_refused() {
        let anchor_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let anchor_params = ca_params("root.cluster.local", Duration::from_secs(3600), 1);
        let anchor = anchor_params.self_signed(&anchor_key).unwrap();
        let anchor_issuer = Issuer::new(anchor_params, anchor_key);
        let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = ca_params("identity.cluster.local", Duration::from_secs(3600), 0);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = params.signed_by(&issuer_key, &anchor_issuer).unwrap();
        let ca = Ca::from_pem(
            &issuer.pem(),
            &issuer_key.serialize_pem(),
            Duration::from_secs(60),
        )
        .unwrap();
        let e = ca.chains_to(&anchor.pem()).unwrap_err();
        assert!(e.contains("as a TLS server"), "{e}");
    }

    #[test]
    fn refuses_any_other_or_additional_name() {
        let ca = ca();
        let other = "spiffe://cluster.local/ns/shop/sa/admin";
        for sans in [
            vec![uri(other)],
            vec![uri(WEB), uri(other)],
            vec![uri(WEB), SanType::DnsName("web.shop".try_into().unwrap())],
            vec![],
        ] {
            assert!(matches!(
                ca.sign(&csr(sans.clone()), WEB),
                Err(SignError::WrongName { .. })
            ));
        }
    }

    /// What a refusal says of the names asked for is bounded, however many
    /// and however long: it is returned, logged and traced.
    #[test]
    fn a_refusal_names_a_few_names_only() {
        let long = format!("{}.shop", "a".repeat(250));
        let mut sans = vec![uri(WEB)];
        sans.extend((0..2000).map(|i| SanType::DnsName(format!("{i}{long}").try_into().unwrap())));
        let e = ca().sign(&csr(sans), WEB).unwrap_err();
        let SignError::WrongName { count, asked, .. } = &e else {
            panic!("{e:?}");
        };
        assert_eq!((*count, asked.len()), (2001, 4));
        assert!(e.to_string().len() < 2048, "{}", e.to_string().len());
    }

    #[test]
    fn refuses_a_csr_whose_signature_does_not_verify() {
        let mut der = csr(vec![uri(WEB)]);
        let last = der.len() - 1;
        der[last] ^= 0xff;
        assert!(matches!(ca().sign(&der, WEB), Err(SignError::BadCsr(_))));
        assert!(matches!(ca().sign(b"junk", WEB), Err(SignError::BadCsr(_))));
    }

    #[test]
    fn a_key_that_does_not_match_the_issuer_is_refused_at_load() {
        let a = generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let b = generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let err = Ca::from_pem(
            &a.issuer_cert_pem,
            &b.issuer_key_pem,
            Duration::from_secs(60),
        )
        .unwrap_err();
        assert_eq!(err.0, "--issuer-key", "{err:?}");
    }

    #[test]
    fn refuses_a_key_proxies_do_not_use() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![uri(WEB)];
        let mut der = p.serialize_request(&key).unwrap().der().to_vec();
        assert!(matches!(ca().sign(&der, WEB), Err(SignError::BadCsr(_))));
        // Refused for its key before its signature is checked (an RSA
        // request's costs more to verify than to refuse): a broken
        // signature is not what is said.
        let last = der.len() - 1;
        der[last] ^= 0xff;
        match ca().sign(&der, WEB) {
            Err(SignError::BadCsr(why)) => assert!(why.contains("the key must be"), "{why}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    /// A self-signed CA valid from `from` to `to` (relative to now), as PEM.
    fn issuer_valid(from: Duration, to: Duration, past: bool) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = ca_params("identity.test", Duration::from_secs(1), 0);
        let now = SystemTime::now();
        if past {
            p.not_before = (now - from).into();
            p.not_after = (now - to).into();
        } else {
            p.not_after = (now + to).into();
        }
        (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    /// An identity made on a machine whose clock is minutes ahead of the
    /// cluster's is valid there at once.
    #[test]
    fn a_generated_identity_is_valid_to_a_clock_behind() {
        let g = generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3590);
        for pem in [&g.anchor_pem, &g.issuer_cert_pem] {
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
            let from = SystemTime::UNIX_EPOCH
                + Duration::from_secs(c.validity().not_before.timestamp() as u64);
            assert!(from <= an_hour_ago, "{pem}");
        }
        // One not yet valid here says why it may be.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = ca_params("identity.test", Duration::from_secs(7200), 0);
        p.not_before = (SystemTime::now() + Duration::from_secs(600)).into();
        let cert = p.self_signed(&key).unwrap().pem();
        let err = Ca::from_pem(&cert, &key.serialize_pem(), Duration::from_secs(60)).unwrap_err();
        assert!(
            err.1.contains("clock of the machine that made it"),
            "{err:?}"
        );
    }

    #[test]
    fn an_expired_issuer_is_refused_at_load() {
        let (cert, key) = issuer_valid(Duration::from_secs(7200), Duration::from_secs(3600), true);
        let err = Ca::from_pem(&cert, &key, Duration::from_secs(60)).unwrap_err();
        assert!(err.1.contains("expired"), "{err:?}");
    }

    #[test]
    fn no_leaf_outlives_its_issuer() {
        let (cert, key) = issuer_valid(Duration::ZERO, Duration::from_secs(90), false);
        let ca = Ca::from_pem(&cert, &key, Duration::from_secs(3600)).unwrap();
        let leaf = ca.sign(&csr(vec![uri(WEB)]), WEB).unwrap();
        assert!(
            leaf.not_after <= SystemTime::now() + Duration::from_secs(90),
            "the leaf ends with its issuer"
        );
    }

    #[test]
    fn no_leaf_outlives_an_intermediate_of_the_issuer_s_chain() {
        // A root, an intermediate with 90 s left, and a year-long issuer under it.
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let root_params = ca_params("root.test", Duration::from_secs(365 * 86400), 2);
        let root = Issuer::new(root_params, root_key);
        let mid_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mid_params = ca_params("mid.test", Duration::from_secs(90), 1);
        let mid = mid_params.signed_by(&mid_key, &root).unwrap();
        let mid_issuer = Issuer::new(mid_params, mid_key);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issuer = ca_params("identity.test", Duration::from_secs(365 * 86400), 0)
            .signed_by(&key, &mid_issuer)
            .unwrap();
        let chain = format!("{}{}", issuer.pem(), mid.pem());
        let ca = Ca::from_pem(&chain, &key.serialize_pem(), Duration::from_secs(3600)).unwrap();
        assert!(ca.issuer_not_after() <= SystemTime::now() + Duration::from_secs(90));
        let leaf = ca.sign(&csr(vec![uri(WEB)]), WEB).unwrap();
        assert!(
            leaf.not_after <= SystemTime::now() + Duration::from_secs(90),
            "the leaf ends with the intermediate"
        );
    }

    /// A self-issued intermediate (a key rollover's: named by itself, signed
    /// by the old key) bounds leaves as any intermediate does; only a root,
    /// which signs itself, does not.
    #[test]
    fn a_self_issued_intermediate_bounds_leaves_too() {
        let old_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let old_root = Issuer::new(
            ca_params("root.test", Duration::from_secs(365 * 86400), 2),
            old_key,
        );
        let new_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let rollover_params = ca_params("root.test", Duration::from_secs(90), 1);
        let rollover = rollover_params.signed_by(&new_key, &old_root).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issuer = ca_params("identity.test", Duration::from_secs(365 * 86400), 0)
            .signed_by(&key, &Issuer::new(rollover_params, new_key))
            .unwrap();
        let chain = format!("{}{}", issuer.pem(), rollover.pem());
        let ca = Ca::from_pem(&chain, &key.serialize_pem(), Duration::from_secs(3600)).unwrap();
        assert!(ca.issuer_not_after() <= SystemTime::now() + Duration::from_secs(90));
    }

    /// A chain longer than proxies take is refused at load, not left to
    /// fail every handshake between them.
    #[test]
    fn a_chain_longer_than_proxies_take_is_refused() {
        let (cert, key) = issuer_valid(Duration::ZERO, Duration::from_secs(3600), false);
        let extra = |n: usize| {
            (0..n)
                .map(|_| issuer_valid(Duration::ZERO, Duration::from_secs(3600), false).0)
                .collect::<String>()
        };
        let long = format!("{cert}{}", extra(defaults::MAX_ISSUER_CHAIN + 1));
        let err = Ca::from_pem(&long, &key, Duration::from_secs(60)).unwrap_err();
        assert!(err.1.contains("proxies take at most 5"), "{err:?}");
        let fits = format!("{cert}{}", extra(defaults::MAX_ISSUER_CHAIN));
        let ok = Ca::from_pem(&fits, &key, Duration::from_secs(60));
        assert!(
            !ok.as_ref().is_err_and(|e| e.1.contains("proxies take")),
            "{:?}",
            ok.err()
        );
    }

    #[test]
    fn an_issuer_about_to_expire_signs_nothing() {
        let (cert, key) = issuer_valid(Duration::ZERO, Duration::from_secs(90), false);
        let ca = Ca::from_pem(&cert, &key, Duration::from_secs(3600)).unwrap();
        // 90 s left is enough; what is left once under the floor is not.
        assert!(ca.sign(&csr(vec![uri(WEB)]), WEB).is_ok());
        let (cert, key) = issuer_valid(Duration::ZERO, Duration::from_secs(20), false);
        let ca = Ca::from_pem(&cert, &key, Duration::from_secs(3600));
        assert!(
            matches!(ca, Err((_, ref r)) if r.contains("too soon")),
            "refused at load already: {:?}",
            ca.err()
        );
    }
}
