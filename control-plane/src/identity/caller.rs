//! Who calls the discovery and inbound-policy APIs. With identities on (the
//! controller issues certificates) only proxies of the mesh are answered: a
//! caller proves its service account with a workload certificate from our CA,
//! presented as its TLS client certificate, or with its service-account token in
//! the `authorization` metadata (`Bearer <token>`), which is all a proxy has
//! before its first certificate. Without identities the port is plaintext and
//! anyone who reaches it is answered (docs/security.md says what that exposes).
//!
//! The TLS layer only checks that a client holds the key of the certificate it
//! presents; the chain is checked here, so that a proxy still holding a leaf from
//! a previous issuer can connect and prove itself with its token.

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, UnixTime};
use strait_api::identity::Identity;
use tokio::sync::watch;
use tonic::Request;

use super::ca::Ca;
use super::serving::PeerCerts;
use super::tokens::{TokenError, Verifier};
use crate::index::{ObjKey, Snapshot};
use crate::metrics::Metrics;

/// A proven service account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
}

/// Why a call was refused, as the caller is told it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error(
        "no credential: present a workload certificate from this mesh or a service-account token (authorization: Bearer)"
    )]
    NoCredential,
    #[error("the token proves no service account")]
    UnknownToken,
    #[error("the token cannot be checked now: {0}")]
    TokenUnchecked(String),
    #[error("the client certificate does not verify against this controller's issuer: {0}")]
    BadCertificate(String),
    #[error("{0}")]
    NotYours(String),
}

impl Refused {
    fn reason(&self) -> &'static str {
        match self {
            Refused::NoCredential => "no_credential",
            Refused::UnknownToken => "unknown_token",
            Refused::TokenUnchecked(_) => "token_unchecked",
            Refused::BadCertificate(_) => "bad_certificate",
            Refused::NotYours(_) => "not_own_workload",
        }
    }
}

impl From<Refused> for tonic::Status {
    fn from(r: Refused) -> Self {
        match r {
            Refused::NotYours(_) => tonic::Status::permission_denied(r.to_string()),
            Refused::TokenUnchecked(_) => tonic::Status::unavailable(r.to_string()),
            _ => tonic::Status::unauthenticated(r.to_string()),
        }
    }
}

/// Checks callers; `None` where the controller runs without identities.
#[derive(Clone, Debug)]
pub struct Authenticator {
    ca: Arc<Ca>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    tokens: Verifier,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    pub fn new(
        ca: Arc<Ca>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        tokens: Verifier,
        metrics: Arc<Metrics>,
    ) -> Self {
        Authenticator {
            ca,
            snapshot,
            tokens,
            metrics,
        }
    }

    /// The caller of `req`, or why it is refused (counted by reason and service).
    pub async fn caller<T>(
        &self,
        req: &Request<T>,
        service: &'static str,
    ) -> Result<Caller, Refused> {
        self.prove(req)
            .await
            .inspect_err(|r| self.refused(service, r))
    }

    pub fn refused(&self, service: &'static str, r: &Refused) {
        self.metrics.api_refused(service, r.reason());
    }

    async fn prove<T>(&self, req: &Request<T>) -> Result<Caller, Refused> {
        let certs = req
            .extensions()
            .get::<PeerCerts>()
            .and_then(|c| c.certs.clone());
        let trust_domain = self.snapshot.borrow().trust_domain.clone();
        let by_cert = match certs.as_deref() {
            Some([leaf, intermediates @ ..]) => {
                Some(self.verify(leaf, intermediates, &trust_domain))
            }
            _ => None,
        };
        // A certificate that proves an identity is enough; one that does not
        // (an old issuer's, say) leaves the token to decide.
        if let Some(Ok(c)) = by_cert {
            return Ok(c);
        }
        match bearer(req) {
            Some(token) => match self.tokens.verify(token, super::serving::source(req)).await {
                Ok(k) => Ok(Caller {
                    namespace: k.namespace,
                    service_account: k.name,
                }),
                Err(TokenError::Unknown) => Err(Refused::UnknownToken),
                Err(TokenError::Unavailable(e)) => Err(Refused::TokenUnchecked(e)),
            },
            None => Err(match by_cert {
                Some(Err(e)) => e,
                _ => Refused::NoCredential,
            }),
        }
    }

    fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'static>],
        trust_domain: &str,
    ) -> Result<Caller, Refused> {
        let bad = |e: String| Refused::BadCertificate(e);
        let issuer = CertificateDer::from(self.ca.issuer_der());
        let anchor = webpki::anchor_from_trusted_cert(&issuer).map_err(|e| bad(e.to_string()))?;
        let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| bad(e.to_string()))?;
        ee.verify_for_usage(
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .all,
            &[anchor],
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| bad(format!("{e:?}")))?;
        let mut uris = ee.valid_uri_names();
        let id: Identity = match (uris.next(), uris.next()) {
            (Some(uri), None) => uri
                .parse()
                .map_err(|e: strait_api::identity::IdentityError| bad(e.to_string()))?,
            _ => return Err(bad("expected exactly one URI SAN".into())),
        };
        if id.trust_domain() != trust_domain {
            return Err(bad(format!("{id} is not of trust domain {trust_domain}")));
        }
        Ok(Caller {
            namespace: id.namespace().to_string(),
            service_account: id.service_account().to_string(),
        })
    }
}

/// Whether `caller` may watch the inbound policy of `pod`: a pod of its own
/// namespace that runs as its own service account (or that the index does not
/// know yet, which gets the namespace's defaults until it appears).
pub fn may_watch_pod(snap: &Snapshot, caller: &Caller, pod: &ObjKey) -> Result<(), Refused> {
    if pod.namespace != caller.namespace {
        return Err(Refused::NotYours(format!(
            "pod {}/{} is not in the caller's namespace {}",
            pod.namespace, pod.name, caller.namespace
        )));
    }
    match snap.pods.get(pod) {
        Some(p) if p.service_account != caller.service_account => Err(Refused::NotYours(format!(
            "pod {}/{} runs as service account {}, the caller as {}",
            pod.namespace, pod.name, p.service_account, caller.service_account
        ))),
        _ => Ok(()),
    }
}

/// The token of an `authorization: Bearer <token>` metadata entry.
fn bearer<T>(req: &Request<T>) -> Option<&[u8]> {
    let v = req.metadata().get("authorization")?.as_bytes();
    let t = v.strip_prefix(b"Bearer ")?.trim_ascii();
    (!t.is_empty()).then_some(t)
}
