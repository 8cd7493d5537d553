//! The identity service: `Certify(csr, token)`. The token says who asks (a
//! service-account token from the manifests in local mode); the identity is
//! derived from it, a CSR for any other name is refused, and the leaf is
//! short-lived. Issuances are logged (sampled) with the identity, never the
//! token, and each one's span names its identity and serial.

pub mod ca;
pub mod caller;
pub mod issuer;
pub mod serving;
pub mod tokens;

use std::sync::Arc;

use strait_api::v1 as api;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use self::issuer::Issuer;
use crate::index::Snapshot;
use crate::metrics::Metrics;

#[derive(Debug)]
pub struct IdentityService {
    ca: Option<Arc<Issuer>>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    tokens: tokens::Verifier,
    metrics: Arc<Metrics>,
}

impl IdentityService {
    pub fn new(
        ca: Option<Arc<Issuer>>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        tokens: tokens::Verifier,
        metrics: Arc<Metrics>,
    ) -> Self {
        IdentityService {
            ca,
            snapshot,
            tokens,
            metrics,
        }
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics.certify_refused(reason);
        status
    }
}

#[tonic::async_trait]
impl strait_api::v1::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        req: Request<api::CertifyRequest>,
    ) -> Result<Response<api::CertifyResponse>, Status> {
        let started = std::time::SystemTime::now();
        let asked: String = req.get_ref().identity.chars().take(300).collect();
        let result = self.issue(req).await;
        let mut attrs = vec![opentelemetry::KeyValue::new("strait.identity.asked", asked)];
        if let Ok(rsp) = &result {
            attrs.push(opentelemetry::KeyValue::new(
                "strait.certificate.bytes",
                rsp.get_ref().leaf_der.len() as i64,
            ));
            // Every issuance's span names what was issued; the log line is
            // sampled.
            if let Some(Issued { identity, serial }) = rsp.extensions().get::<Issued>() {
                attrs.push(opentelemetry::KeyValue::new(
                    "strait.identity",
                    identity.clone(),
                ));
                attrs.push(opentelemetry::KeyValue::new(
                    "strait.certificate.serial",
                    serial.clone(),
                ));
            }
        }
        let error = result
            .as_ref()
            .err()
            .map(|s| format!("{:?}: {}", s.code(), s.message()));
        // Refusals are anyone's to cause: sampled as their log lines are, so
        // that junk calls cannot crowd issued certificates' spans out of the
        // export queue.
        static REFUSED: strait_otel::sampled::Budget = strait_otel::sampled::Budget::new();
        if error.is_none() || REFUSED.take().is_some() {
            crate::spans::record("identity.certify", started, attrs, error);
        }
        result
    }
}

impl IdentityService {
    async fn issue(
        &self,
        req: Request<api::CertifyRequest>,
    ) -> Result<Response<api::CertifyResponse>, Status> {
        let Some(ca) = self.ca.as_ref().map(|i| i.current()) else {
            return Err(self.refuse(
                "no_issuer",
                Status::failed_precondition(
                    "this controller issues no certificates: start it with --issuer-cert and --issuer-key",
                ),
            ));
        };
        let source = serving::source(&req);
        let r = req.into_inner();
        let trust_domain = self.snapshot.borrow().trust_domain.clone();
        let account = self.tokens.verify(&r.token, source).await;
        // What a caller asked for is untrusted text: logged short and escaped.
        let asked: String = r.identity.chars().take(300).collect();
        let account = match account {
            Ok(a) => a,
            Err(tokens::TokenError::Unknown) => {
                strait_otel::sampled!(warn, asked = ?asked, "certificate refused: unknown token");
                return Err(self.refuse(
                    "unknown_token",
                    Status::unauthenticated("the token proves no service account"),
                ));
            }
            Err(e @ tokens::TokenError::Unavailable(_)) => {
                strait_otel::sampled!(warn, asked = ?asked, error = %e, "certificate refused: the token cannot be checked now");
                return Err(self.refuse("token_unchecked", Status::unavailable(e.to_string())));
            }
        };
        let identity = match strait_api::identity::Identity::of(
            &trust_domain,
            &account.namespace,
            &account.name,
        ) {
            Ok(id) => id.to_string(),
            Err(e) => {
                // Validated when read; a token for an unnameable account is refused.
                strait_otel::sampled!(warn, error = %e, "certificate refused: the token's service account makes no identity");
                return Err(self.refuse(
                    "unknown_token",
                    Status::unauthenticated("the token proves no valid service account"),
                ));
            }
        };
        if r.identity != identity {
            strait_otel::sampled!(warn, asked = ?asked, token_for = %identity, "certificate refused: identity not the token's");
            return Err(self.refuse(
                "wrong_identity",
                Status::permission_denied(format!(
                    "asked for {asked:?}, the token is for {identity}"
                )),
            ));
        }
        let leaf = match ca.sign(&r.csr_der, &identity) {
            Ok(l) => l,
            Err(e) => {
                strait_otel::sampled!(warn, %identity, error = %e, "certificate refused");
                let (reason, status) = match e {
                    ca::SignError::Sign(_) => ("sign_failed", Status::internal(e.to_string())),
                    ca::SignError::IssuerExpiring(_) => (
                        "issuer_expiring",
                        Status::failed_precondition(e.to_string()),
                    ),
                    ca::SignError::BadCsr(_) => {
                        ("bad_csr", Status::invalid_argument(e.to_string()))
                    }
                    ca::SignError::WrongName { .. } => {
                        ("wrong_identity", Status::permission_denied(e.to_string()))
                    }
                };
                return Err(self.refuse(reason, status));
            }
        };
        let valid_until = prost_types::Timestamp::from(leaf.not_after);
        // Sampled: any pod with a token may ask as often as it likes (a
        // rollout asks once per pod); the count is in the metric.
        strait_otel::sampled!(info, %identity, serial = %leaf.serial, valid_until = %humantime::format_rfc3339_seconds(leaf.not_after), "certificate issued");
        self.metrics.certificates_issued.inc();
        let mut rsp = Response::new(api::CertifyResponse {
            leaf_der: leaf.der,
            intermediates_der: ca.chain_der(),
            valid_until: Some(valid_until),
        });
        rsp.extensions_mut().insert(Issued {
            identity: identity.to_string(),
            serial: leaf.serial.to_string(),
        });
        Ok(rsp)
    }
}

/// What a certificate was issued for, kept with the answer for its span
/// (never sent: tonic sends no extensions).
#[derive(Clone, Debug)]
struct Issued {
    identity: String,
    serial: String,
}
