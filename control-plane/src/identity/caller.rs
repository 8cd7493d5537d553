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

use super::issuer::Issuer;
use super::serving::PeerCerts;
use super::tokens::{TokenError, Verifier};
use crate::index::{ObjKey, Snapshot, TokenDigest};
use crate::metrics::Metrics;

/// A proven service account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// When the credential that proved it expires (a certificate's notAfter,
    /// a token's `exp`); `None`: it does not.
    pub until: Option<std::time::SystemTime>,
    /// The manifests' token it proved itself with, if that is how: such a
    /// token has no expiry, and taking it out of the manifests revokes it.
    pub token: Option<TokenDigest>,
}

impl Caller {
    /// When a watch opened by `caller` ends: when the controller ends it
    /// (`watched`), when the caller's credential expires, or when the
    /// manifests' token it proved itself with is taken out of `snapshot` (or
    /// now names another account).
    pub fn watch_ends(
        caller: Option<&Caller>,
        snapshot: &watch::Receiver<Arc<Snapshot>>,
        watched: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let credential = caller.map(|c| c.credential_ends(snapshot.clone()));
        async move {
            match credential {
                Some(ends) => {
                    tokio::select! {
                        () = watched => {}
                        () = ends => {}
                    }
                }
                None => watched.await,
            }
        }
    }

    /// Resolves when the credential the caller proved itself with no longer
    /// proves it: expired, or revoked.
    fn credential_ends(
        &self,
        snapshot: watch::Receiver<Arc<Snapshot>>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let expired = self.expired();
        let revoked = self.revoked(snapshot);
        async move {
            tokio::select! {
                () = expired => {}
                () = revoked => {}
            }
        }
    }

    /// Resolves when the manifests no longer give the caller's token to its
    /// account; never for a caller not proven by a manifests' token, nor once
    /// the snapshot can no longer change.
    fn revoked(
        &self,
        mut snapshot: watch::Receiver<Arc<Snapshot>>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let token = self.token;
        let account = ObjKey {
            namespace: self.namespace.clone(),
            name: self.service_account.clone(),
        };
        async move {
            let Some(digest) = token else {
                return std::future::pending().await;
            };
            loop {
                if snapshot.borrow_and_update().tokens.get(&digest) != Some(&account) {
                    return;
                }
                if snapshot.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// Resolves when the caller's credential expires. A watch opened with it
    /// ends then, and the proxy watches again with the credential it holds
    /// now: a watch is not served on a retired certificate or a stolen
    /// token for as long as its connection stays open.
    pub fn expired(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let until = self.until;
        async move {
            match until {
                Some(t) => {
                    let left = t
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or_default();
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending().await,
            }
        }
    }
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
    ca: Arc<Issuer>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    tokens: Verifier,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    pub fn new(
        ca: Arc<Issuer>,
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
        // Only the leaf: our issuer signs leaves itself, so what else a
        // client sends is never needed, and given to the path search it is
        // work of the client's choosing (a dozen self-issued CAs of one name
        // take webpki to its 200,000-step cap on every call).
        let by_cert = certs
            .as_deref()
            .and_then(<[_]>::first)
            .map(|leaf| self.verify(leaf, &trust_domain));
        // A certificate that proves an identity is enough; one that does not
        // (an old issuer's, say) leaves the token to decide.
        if let Some(Ok(c)) = by_cert {
            return Ok(c);
        }
        match bearer(req) {
            Some(token) => match self.tokens.verify(token, super::serving::source(req)).await {
                Ok(k) => {
                    // As the API server checked it; a manifest's token is
                    // known by its digest, whatever its claims say.
                    let (until, digest) = match &self.tokens {
                        Verifier::Kubernetes(_) => (crate::kubernetes::tokens::expiry(token), None),
                        Verifier::Manifests(..) => (None, Some(TokenDigest::of(token))),
                    };
                    // A review answered (or cached) a moment before the
                    // token's end proves nothing past it.
                    if until.is_some_and(|t| t <= std::time::SystemTime::now()) {
                        return Err(Refused::UnknownToken);
                    }
                    Ok(Caller {
                        namespace: k.namespace,
                        service_account: k.name,
                        until,
                        token: digest,
                    })
                }
                Err(TokenError::Unknown) => Err(Refused::UnknownToken),
                Err(TokenError::Unavailable(e)) => Err(Refused::TokenUnchecked(e)),
            },
            None => Err(match by_cert {
                Some(Err(e)) => e,
                _ => Refused::NoCredential,
            }),
        }
    }

    fn verify(&self, leaf: &CertificateDer<'_>, trust_domain: &str) -> Result<Caller, Refused> {
        let bad = |e: String| Refused::BadCertificate(e);
        let ca = self.ca.current();
        let issuer = CertificateDer::from(ca.issuer_der());
        let anchor = webpki::anchor_from_trusted_cert(&issuer).map_err(|e| bad(e.to_string()))?;
        let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| bad(e.to_string()))?;
        ee.verify_for_usage(
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .all,
            &[anchor],
            &[],
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
        let until = x509_parser::parse_x509_certificate(leaf)
            .ok()
            .and_then(|(_, c)| u64::try_from(c.validity().not_after.timestamp()).ok())
            .and_then(|s| std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(s)));
        // webpki reads the time in whole seconds: a leaf in its last second
        // would open a watch that ends at once.
        if until.is_none_or(|t| t <= std::time::SystemTime::now()) {
            return Err(bad("expired".into()));
        }
        Ok(Caller {
            namespace: id.namespace().to_string(),
            service_account: id.service_account().to_string(),
            until,
            token: None,
        })
    }
}

/// Whether `caller`, calling from `source`, may watch the inbound policy of
/// `pod`: a pod of its own namespace that runs as its own service account
/// (or that the index does not know yet, which gets the namespace's defaults
/// until it appears), and, when `source` is a pod's address, that pod. Pods
/// of one account share what proves it (a token's account, a certificate's
/// identity), and a proxy calls from its own pod's address: one calling from
/// another pod's asks for a policy not its own (who may call the other pod,
/// on which ports). An address no pod holds (a node's, after SNAT), and
/// loopback (a machine's proxies outside Kubernetes), prove nothing either way.
pub fn may_watch_pod(
    snap: &Snapshot,
    caller: &Caller,
    pod: &ObjKey,
    source: Option<std::net::IpAddr>,
) -> Result<(), Refused> {
    if pod.namespace != caller.namespace {
        return Err(Refused::NotYours(format!(
            "pod {}/{} is not in the caller's namespace {}",
            pod.namespace, pod.name, caller.namespace
        )));
    }
    // Not which account the pod runs as: that is not the caller's to learn.
    if snap
        .pods
        .get(pod)
        .is_some_and(|p| p.service_account != caller.service_account)
    {
        return Err(Refused::NotYours(format!(
            "pod {}/{} does not run as the caller's service account {}",
            pod.namespace, pod.name, caller.service_account
        )));
    }
    // Loopback is every local process's, whatever a manifest's pod claims.
    if let Some((at, _)) = source
        .filter(|s| !s.is_loopback())
        .and_then(|s| snap.pod_at(s))
        && at != pod
    {
        return Err(Refused::NotYours(format!(
            "the caller's address is pod {}/{}'s, not pod {}/{}'s",
            at.namespace, at.name, pod.namespace, pod.name
        )));
    }
    Ok(())
}

/// The token of an `authorization: Bearer <token>` metadata entry.
fn bearer<T>(req: &Request<T>) -> Option<&[u8]> {
    let v = req.metadata().get("authorization")?.as_bytes();
    let t = v.strip_prefix(b"Bearer ")?.trim_ascii();
    (!t.is_empty()).then_some(t)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use rcgen::{CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType};

    use super::super::ca::Ca;

    use super::*;

    fn authenticator() -> (Authenticator, Issuer<'static, KeyPair>) {
        let g = super::super::ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let ca = Ca::from_pem(
            &g.issuer_cert_pem,
            &g.issuer_key_pem,
            Duration::from_secs(60),
        );
        let issuer_key = KeyPair::from_pem(&g.issuer_key_pem).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&g.issuer_cert_pem, issuer_key).unwrap();
        let (_, rx) = watch::channel(Arc::new(Snapshot::empty("cluster.local")));
        let auth = Authenticator::new(
            super::super::issuer::Issuer::fixed(ca.unwrap()),
            rx.clone(),
            Verifier::manifests(rx),
            Metrics::new(),
        );
        (auth, issuer)
    }

    fn leaf(issuer: &Issuer<'_, KeyPair>) -> CertificateDer<'static> {
        leaf_until(
            issuer,
            std::time::SystemTime::now() + Duration::from_secs(3600),
        )
    }

    fn leaf_until(
        issuer: &Issuer<'_, KeyPair>,
        until: std::time::SystemTime,
    ) -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        p.not_after = until.into();
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap(),
        )];
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, issuer).unwrap().der().clone()
    }

    fn presenting(certs: Vec<CertificateDer<'static>>) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut().insert(PeerCerts {
            certs: Some(certs.into()),
            addr: None,
        });
        req
    }

    /// A client's chain costs the controller one signature check, however
    /// many certificates it sends: a dozen self-issued CAs of one name sent
    /// with a leaf they issue, once searched for a path on every call, are
    /// not looked at; a leaf of ours is proven with or without extras.
    #[tokio::test]
    async fn a_clients_chain_is_not_searched() {
        let (auth, ours) = authenticator();
        let named_x = || {
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "X");
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p
        };
        let mut cas = Vec::new();
        let mut first = None;
        for _ in 0..12 {
            let key = KeyPair::generate().unwrap();
            cas.push(named_x().self_signed(&key).unwrap().der().clone());
            first.get_or_insert(key);
        }
        let x = Issuer::new(named_x(), first.unwrap());
        let mut chain = vec![leaf(&x)];
        chain.extend(cas.iter().cloned());
        let started = std::time::Instant::now();
        let e = auth
            .caller(&presenting(chain), "discovery")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Refused::BadCertificate(m) if m.contains("UnknownIssuer")),
            "{e:?} after {:?}",
            started.elapsed()
        );

        let mut chain = vec![leaf(&ours)];
        chain.extend(cas);
        let c = auth.caller(&presenting(chain), "discovery").await.unwrap();
        assert_eq!(
            (c.namespace.as_str(), c.service_account.as_str()),
            ("shop", "web")
        );
    }

    /// A proxy may watch its own pod's policy, not that of another pod of
    /// its service account: the address it calls from is its pod's. The
    /// refusal of another account's pod does not say which account it is.
    #[test]
    fn a_caller_may_watch_its_own_pod_s_policy_only() {
        let mut snap = Snapshot::empty("cluster.local");
        let pod = |name: &str, sa: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{serviceAccountName: {sa}, containers: [{{name: a, image: a}}]}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n---\n"
            )
        };
        let yaml = pod("web-0", "default", "10.0.0.7")
            + &pod("pay-0", "default", "10.0.0.8")
            + &pod("db-0", "db", "10.0.0.9")
            + &pod("local-0", "default", "127.0.0.1");
        for o in crate::manifests::parse_file(&yaml).unwrap() {
            o.insert_into(&mut snap);
        }
        let caller = Caller {
            namespace: "shop".into(),
            service_account: "default".into(),
            until: None,
            token: None,
        };
        let key = |name: &str| ObjKey {
            namespace: "shop".into(),
            name: name.into(),
        };
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        let may = |pod: &str, source| may_watch_pod(&snap, &caller, &key(pod), source);
        assert!(may("web-0", ip("10.0.0.7")).is_ok());
        let Err(Refused::NotYours(why)) = may("pay-0", ip("10.0.0.7")) else {
            panic!("another pod's policy");
        };
        assert!(why.contains("web-0"), "{why}");
        // From an address no pod holds, or none known: the account decides.
        assert!(may("pay-0", ip("10.1.0.1")).is_ok());
        assert!(may("pay-0", None).is_ok());
        assert!(may("new-0", ip("10.1.0.1")).is_ok(), "not known yet");
        // Loopback is every local proxy's, whichever pod a manifest gives it.
        assert!(may("pay-0", ip("127.0.0.1")).is_ok());
        let Err(Refused::NotYours(why)) = may("db-0", ip("10.0.0.9")) else {
            panic!("another account's pod");
        };
        assert!(!why.contains("as db") && !why.contains(" db,"), "{why}");
    }

    /// A discovery watch lasts as long as the credential it was opened
    /// with: a certificate's notAfter ends it, and the proxy watches again
    /// with what it holds then.
    #[tokio::test(start_paused = true)]
    async fn a_watch_ends_when_its_credential_expires() {
        use futures_util::StreamExt;
        use strait_api::v1::discovery_server::Discovery;
        let (auth, ours) = authenticator();
        let (_, rx) = watch::channel(Arc::new(Snapshot::empty("cluster.local")));
        let metrics = Metrics::new();
        let svc = crate::discovery::DiscoveryService::new(
            crate::discovery::Views::new(rx, metrics.clone()),
            crate::metrics::Watches::new(metrics),
            Some(auth),
        );
        let until = std::time::SystemTime::now() + Duration::from_secs(30);
        let mut req = Request::new(strait_api::v1::WatchDestination {
            destination: "web.shop.svc.cluster.local:80".into(),
            context_namespace: "shop".into(),
            proxy_id: "web-0.shop".into(),
        });
        req.extensions_mut().insert(PeerCerts {
            certs: Some(vec![leaf_until(&ours, until)].into()),
            addr: None,
        });
        let mut stream = svc.watch(req).await.unwrap().into_inner();
        assert!(stream.next().await.unwrap().is_ok(), "answered");
        let started = tokio::time::Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(3600), stream.next())
            .await
            .expect("the watch outlived its certificate");
        assert!(end.is_none(), "{end:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(28) && took <= Duration::from_secs(31),
            "{took:?}"
        );
    }

    /// A manifests' token has no expiry: a watch opened with it lasts until
    /// the token is taken out of the manifests, not for as long as its
    /// connection stays open.
    #[tokio::test(start_paused = true)]
    async fn a_watch_ends_when_its_token_is_taken_out_of_the_manifests() {
        use futures_util::StreamExt;
        use strait_api::v1::discovery_server::Discovery;
        use strait_api::v1::inbound_policy_server::InboundPolicy;
        let (auth, _) = authenticator();
        let web = ObjKey {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let db = ObjKey {
            namespace: "shop".into(),
            name: "db".into(),
        };
        let mut snap = Snapshot::empty("cluster.local");
        snap.tokens
            .insert(TokenDigest::of(b"web-token"), web.clone());
        let (tx, rx) = watch::channel(Arc::new(snap.clone()));
        let auth = Authenticator {
            snapshot: rx.clone(),
            tokens: Verifier::manifests(rx.clone()),
            ..auth
        };
        let metrics = Metrics::new();
        let svc = crate::discovery::DiscoveryService::new(
            crate::discovery::Views::new(rx, metrics.clone()),
            crate::metrics::Watches::new(metrics),
            Some(auth.clone()),
        );
        let watch = || {
            let mut req = Request::new(strait_api::v1::WatchDestination {
                destination: "web.shop.svc.cluster.local:80".into(),
                context_namespace: "shop".into(),
                proxy_id: "web-0.shop".into(),
            });
            req.metadata_mut()
                .insert("authorization", "Bearer web-token".parse().unwrap());
            svc.watch(req)
        };
        let mut stream = watch().await.unwrap().into_inner();
        assert!(stream.next().await.unwrap().is_ok(), "answered");

        // Another account's token comes and goes: the watch stays.
        snap.tokens.insert(TokenDigest::of(b"db-token"), db.clone());
        tx.send_replace(Arc::new(snap.clone()));
        let open = tokio::time::timeout(Duration::from_secs(3600), stream.next()).await;
        assert!(
            !matches!(open, Ok(None)),
            "ended on another token: {open:?}"
        );

        // Its own token now names another account: revoked for this one.
        snap.tokens
            .insert(TokenDigest::of(b"web-token"), db.clone());
        tx.send_replace(Arc::new(snap.clone()));
        let end = tokio::time::timeout(Duration::from_secs(1), stream.next())
            .await
            .expect("the watch outlived its token");
        assert!(end.is_none(), "{end:?}");

        // Taken out: a new watch is refused, one opened before ends.
        snap.tokens
            .insert(TokenDigest::of(b"web-token"), web.clone());
        tx.send_replace(Arc::new(snap.clone()));
        let mut stream = watch().await.unwrap().into_inner();
        assert!(stream.next().await.unwrap().is_ok(), "answered again");
        // The pod's inbound policy, watched with the same token.
        let policy = crate::policy::InboundPolicyService::new(
            tx.subscribe(),
            crate::metrics::Watches::new(Metrics::new()),
            Some(auth),
            false,
        );
        let mut req = Request::new(strait_api::v1::WatchWorkload {
            namespace: "shop".into(),
            pod: "web-0".into(),
            proxy_id: "web-0.shop".into(),
        });
        req.metadata_mut()
            .insert("authorization", "Bearer web-token".parse().unwrap());
        let mut inbound = InboundPolicy::watch(&policy, req)
            .await
            .unwrap()
            .into_inner();
        assert!(inbound.next().await.unwrap().is_ok(), "policy answered");
        snap.tokens.remove(&TokenDigest::of(b"web-token"));
        tx.send_replace(Arc::new(snap.clone()));
        let end = tokio::time::timeout(Duration::from_secs(1), stream.next())
            .await
            .expect("the watch outlived its token");
        assert!(end.is_none(), "{end:?}");
        let end = tokio::time::timeout(Duration::from_secs(1), inbound.next())
            .await
            .expect("the inbound policy watch outlived its token");
        assert!(end.is_none(), "{end:?}");
        let refused = watch().await.map(|_| ()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }

    #[test]
    fn a_tokens_expiry_is_its_exp() {
        use base64::Engine as _;
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"aud":["strait"],"exp":1700000000}"#);
        let token = format!("e30.{claims}.sig");
        assert_eq!(
            crate::kubernetes::tokens::expiry(token.as_bytes()),
            Some(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(crate::kubernetes::tokens::expiry(b"a-secret-token"), None);
    }
}
