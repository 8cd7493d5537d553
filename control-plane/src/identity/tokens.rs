//! Who a token proves: the one question `Certify` and the API's callers ask of
//! a service-account token. In local mode the manifests list the tokens (as
//! digests); in a cluster the API server answers, through a TokenReview.

use std::sync::Arc;

use tokio::sync::watch;

use crate::index::{ObjKey, Snapshot, TokenDigest};
use crate::kubernetes::tokens::TokenReviewer;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token proves no service account")]
    Unknown,
    #[error("the token could not be checked: {0}")]
    Unavailable(String),
}

/// Where tokens are checked.
#[derive(Clone, Debug)]
pub enum Verifier {
    /// The service-account token Secrets of the manifests.
    Manifests(watch::Receiver<Arc<Snapshot>>),
    /// The API server's TokenReview.
    Kubernetes(Box<TokenReviewer>),
}

impl Verifier {
    /// The service account (namespace and name) `token` proves; `source` is
    /// the address the caller connected from.
    pub async fn verify(
        &self,
        token: &[u8],
        source: Option<std::net::IpAddr>,
    ) -> Result<ObjKey, TokenError> {
        let token = token.trim_ascii();
        match self {
            Verifier::Manifests(snap) => snap
                .borrow()
                .tokens
                .get(&TokenDigest::of(token))
                .cloned()
                .ok_or(TokenError::Unknown),
            Verifier::Kubernetes(r) => r.review(token, source).await,
        }
    }
}
