//! Workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! parsed once at the edge. One grammar for both sides: what the controller
//! accepts in a policy or signs into a certificate is exactly what a proxy reads.

use std::fmt;
use std::str::FromStr;

/// Shared, not copied: identities ride on every request (the peer a request goes
/// to, the key of its connection pool), so a clone is a reference count.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    uri: std::sync::Arc<str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid workload identity {0:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
)]
pub struct IdentityError(pub String);

impl Identity {
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The identity as a shared string, for what keeps it (a span attribute)
    /// without a copy.
    pub fn as_shared(&self) -> &std::sync::Arc<str> {
        &self.uri
    }

    /// The identity of a service account.
    pub fn of(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &str {
        self.uri.split('/').nth(2).unwrap_or_default()
    }

    /// The namespace part (the identity was validated when parsed).
    pub fn namespace(&self) -> &str {
        self.uri.split('/').nth(4).unwrap_or_default()
    }

    /// The service-account part.
    pub fn service_account(&self) -> &str {
        self.uri.split('/').nth(6).unwrap_or_default()
    }

    /// A DNS name for the TLS handshake's SNI (rustls wants one; the peer is
    /// verified by its URI SAN, never by this name).
    pub fn server_name(&self) -> String {
        let p: Vec<&str> = self.uri.split('/').collect();
        match p.as_slice() {
            [_, _, td, "ns", ns, "sa", sa] => {
                format!("{sa}.{ns}.serviceaccount.identity.strait.{td}")
            }
            _ => "identity.strait.invalid".to_string(),
        }
    }
}

/// Whether `s` may be one part of an identity (trust domain, namespace, service
/// account): the characters of Kubernetes names and DNS labels, no wildcards,
/// and not `.` or `..`, which SPIFFE forbids as path segments (a verifier that
/// normalised the path would read another identity).
pub fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

/// Whether `s` may be a trust domain: as [`valid_part`], in lower case only,
/// as SPIFFE has it.
pub fn valid_trust_domain(s: &str) -> bool {
    valid_part(s) && !s.bytes().any(|b| b.is_ascii_uppercase())
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError(s.chars().take(300).collect());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa]
                if valid_trust_domain(td) && valid_part(ns) && valid_part(sa) =>
            {
                Ok(Identity { uri: s.into() })
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_workload_spiffe_ids_parse() {
        assert!(
            "spiffe://cluster.local/ns/shop/sa/web"
                .parse::<Identity>()
                .is_ok()
        );
        for bad in [
            "",
            "spiffe://cluster.local/ns/shop",
            "https://x/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/ns/a/sa/*",
            "spiffe://td/ns/a b/sa/c",
            "spiffe://cluster.local/ns/shop/sa/..",
            "spiffe://td/ns/./sa/web",
            "spiffe://Cluster.Local/ns/a/sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
        let id = Identity::of("cluster.local", "shop", "web").unwrap();
        assert_eq!(id.namespace(), "shop");
        assert_eq!(
            id.server_name(),
            "web.shop.serviceaccount.identity.strait.cluster.local"
        );
    }
}
