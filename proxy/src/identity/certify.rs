//! Getting and renewing the certificate: a CSR and the workload's token to the
//! control plane's identity service; renewal at about 70 % of the lifetime, with
//! jittered retries, so a certificate is replaced long before it expires.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use strait_api::v1 as api;
use strait_api::v1::identity_client::IdentityClient;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::Credentials;
use crate::control::Link;
use crate::control::backoff::Backoff;
use crate::defaults;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
enum CertifyError {
    #[error("cannot read --token-file {path}: {reason}")]
    Token { path: String, reason: String },
    #[error("the control plane refused the certificate request: {0}")]
    Refused(String),
    #[error("cannot reach the control plane for a certificate: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Creds(#[from] super::CredsError),
}

/// Keeps the proxy certified for as long as it runs.
pub async fn follow(
    link: Arc<Link>,
    creds: Arc<Credentials>,
    token_file: PathBuf,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::default();
    let mut first = true;
    // A controller out of reach for hours would otherwise log a warning
    // every 10 s, per proxy.
    let mut run = strait_otel::sampled::FailureRun::default();
    loop {
        // A client for this call only: kept through the renewal's wait, it
        // would hold an older certificate's connection open for most of a
        // lifetime.
        let certified = certify(
            &mut IdentityClient::new(link.channel()),
            &creds,
            &token_file,
        )
        .await;
        let delay = match certified {
            Ok((serial, valid_until)) => {
                backoff.reset();
                let failures = run.succeeded();
                if failures > 0 {
                    info!(identity = %creds.identity(), failures, "certificate request succeeded after failing");
                }
                // Moves the link to the new certificate now (a lazy channel:
                // no dial), so the one before is not kept for a call that may
                // not come; watches still on it hold it until they end.
                drop(link.channel());
                if !std::mem::take(&mut first) {
                    metrics.identity_renewals.inc();
                }
                let expiry = valid_until
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                metrics.certificate_expires(
                    creds.identity(),
                    i64::try_from(expiry.as_secs()).unwrap_or(i64::MAX),
                );
                let lifetime = valid_until
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                // Never a busy loop, whatever the certificate says.
                let renew = renew_after(lifetime).max(defaults::RENEW_AFTER_MIN);
                info!(identity = %creds.identity(), %serial, ?lifetime, renew_in = ?renew, "certificate installed");
                Some(renew)
            }
            Err(e) => {
                metrics.identity_failures.inc();
                let d = backoff.next_delay();
                let error = e.to_string();
                let warn = run.failed(&error);
                let failures = run.failures();
                if warn {
                    warn!(identity = %creds.identity(), %error, retry_in = ?d, failures, "certificate request failed");
                } else {
                    debug!(identity = %creds.identity(), %error, retry_in = ?d, failures, "certificate request failed");
                }
                tokio::time::sleep(d).await;
                None
            }
        };
        if let Some(renew) = delay {
            strait_api::clock::wall_clock_sleep(SystemTime::now() + renew, SystemTime::now).await;
        }
    }
}

/// When to renew a certificate that is valid for `lifetime` from now: at 65 to
/// 75 % of it, so proxies started together do not renew together.
pub fn renew_after(lifetime: Duration) -> Duration {
    let f = rand::rng().random_range(defaults::RENEW_AT_MIN..=defaults::RENEW_AT_MAX);
    lifetime.mul_f64(f)
}

async fn certify(
    client: &mut IdentityClient<Channel>,
    creds: &Credentials,
    token_file: &Path,
) -> Result<(String, SystemTime), CertifyError> {
    // Read every time: a projected token is rotated by the kubelet.
    let token = std::fs::read(token_file).map_err(|e| CertifyError::Token {
        path: token_file.display().to_string(),
        reason: e.to_string(),
    })?;
    let token = token.trim_ascii().to_vec();
    let req = api::CertifyRequest {
        identity: creds.identity().to_string(),
        token,
        csr_der: creds.csr_der()?,
    };
    let rsp = tokio::time::timeout(defaults::CERTIFY_TIMEOUT, client.certify(req))
        .await
        .map_err(|_| {
            CertifyError::Unreachable(format!("no answer in {:?}", defaults::CERTIFY_TIMEOUT))
        })?
        .map_err(|s| failed_call(&s))?
        .into_inner();
    let installed = creds.install(rsp.leaf_der, rsp.intermediates_der)?;
    Ok((installed.serial, installed.not_after))
}

/// A failed call: refused by the control plane, which looked at the request
/// (a bad token, an identity not this pod's), or not heard at all (the
/// network, the controller down or overloaded); said apart, so that an
/// operator chasing a network fault is not sent to look at policy.
fn failed_call(s: &tonic::Status) -> CertifyError {
    use tonic::Code;
    let what = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            CertifyError::Unreachable(what)
        }
        _ => CertifyError::Refused(what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_controller_not_heard_is_not_said_to_refuse() {
        let down = failed_call(&tonic::Status::unavailable("tcp connect error"));
        assert_eq!(
            down.to_string(),
            "cannot reach the control plane for a certificate: Unavailable: tcp connect error"
        );
        let refused = failed_call(&tonic::Status::permission_denied("token names another pod"));
        assert!(
            refused
                .to_string()
                .starts_with("the control plane refused the certificate request"),
            "{refused}"
        );
    }

    #[test]
    fn renewal_starts_at_about_seventy_percent() {
        for _ in 0..100 {
            let d = renew_after(Duration::from_secs(100));
            assert!((65.0..=75.0).contains(&d.as_secs_f64()), "{d:?}");
        }
    }
}
