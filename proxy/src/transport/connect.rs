//! Connecting to upstreams, in one place for every protocol: TCP with our
//! timeout and TCP_NODELAY, then (to a peer proxy) TLS 1.3 that verifies the
//! identity discovery promised. One rustls client config per peer identity,
//! ALPN and certificate is kept, so connections to a peer resume their TLS
//! sessions, with the certificate in use.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::defaults;
use crate::identity::{Credentials, Identity, tls};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connect to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("mTLS to {addr}: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    /// This proxy has no certificate, or its own has expired: every peer
    /// would refuse it, so nothing is tried, and nothing is learnt of `addr`.
    #[error("{reason}")]
    OwnCertificate {
        addr: SocketAddr,
        reason: &'static str,
    },
}

/// Where this proxy reaches its own app when that is not loopback (an
/// injected pod's own address), set once at start: connections there face
/// the app, which cannot vanish without a word (`keepalive`).
static APP_IP: std::sync::OnceLock<std::net::IpAddr> = std::sync::OnceLock::new();

pub fn app_at(ip: std::net::IpAddr) {
    if !ip.is_loopback() {
        let _ = APP_IP.set(ip);
    }
}

/// Whether `addr` is this pod's own app (or anything on loopback).
fn faces_app(addr: SocketAddr) -> bool {
    addr.ip().is_loopback() || APP_IP.get() == Some(&addr.ip())
}

/// A TCP connection with our timeout, TCP_NODELAY and keepalive.
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout {
            addr,
            after: timeout,
        })?
        .map_err(|source| ConnectError::Io { addr, source })?;
    let _ = stream.set_nodelay(true);
    keepalive(&stream, !faces_app(addr));
    Ok(stream)
}

/// TCP keepalive (`defaults::TCP_KEEPALIVE`) and its bound on unacknowledged
/// data (`defaults::TCP_USER_TIMEOUT`). An app's own keepalive is answered by
/// this proxy's end of its connection, not by its peer: without the proxy's,
/// a stream to a peer gone without a word (its node lost) would stay open
/// until the idle timeout, an hour. Keepalive probes only a quiet
/// connection: one with bytes sent and unacknowledged (a query written to a
/// pooled database connection, a push to a subscriber) is retransmitted for
/// some 15 minutes unless the user timeout ends it. The user timeout also
/// ends a connection whose receiver keeps its window shut that long (Linux
/// since 5.11 and its stable updates), so it is set only on `network`
/// sockets (peers, upstreams, callers, the controller), never on those to
/// and from this pod's app, which cannot vanish and may stop reading. Set on
/// a listening socket, both hold for the connections it accepts.
pub fn keepalive<S: std::os::fd::AsFd>(socket: &S, network: bool) {
    let probes = socket2::TcpKeepalive::new()
        .with_time(crate::defaults::TCP_KEEPALIVE)
        .with_interval(crate::defaults::TCP_KEEPALIVE)
        .with_retries(crate::defaults::TCP_KEEPALIVE_PROBES);
    let s = socket2::SockRef::from(socket);
    let _ = s.set_tcp_keepalive(&probes);
    #[cfg(target_os = "linux")]
    if network {
        let _ = s.set_tcp_user_timeout(Some(crate::defaults::TCP_USER_TIMEOUT));
    }
}

/// A TCP connection to a host name (the control plane's), with our timeout.
pub async fn tcp_host(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {host}:{port} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    keepalive(&stream, true);
    Ok(stream)
}

/// The name sent as SNI to `peer`. rustls wants a DNS name, and Kubernetes
/// takes service-account names that make none (a dot-free part over 63
/// bytes); the peer is verified by its URI SAN, never by this name, and each
/// identity has its own config (and session cache), so a stand-in serves.
fn sni(peer: &Identity) -> ServerName<'static> {
    ServerName::try_from(peer.server_name())
        .unwrap_or_else(|_| ServerName::try_from(STAND_IN_SNI).expect("a DNS name"))
}

const STAND_IN_SNI: &str = "identity.strait.invalid";

/// Client configs by peer and ALPN, each with the certificate generation it
/// was built under.
type ConfigCache = Arc<Mutex<HashMap<(Identity, &'static [u8]), (u64, Arc<ClientConfig>)>>>;

/// What mTLS to peer proxies needs: our credentials, the counters of failures,
/// and the client configs already built.
#[derive(Clone, Debug)]
pub struct PeerTls {
    creds: Arc<Credentials>,
    mismatches: Counter,
    handshake_failures: Counter,
    configs: ConfigCache,
}

impl PeerTls {
    pub fn new(creds: Arc<Credentials>, mismatches: Counter, handshake_failures: Counter) -> Self {
        PeerTls {
            creds,
            mismatches,
            handshake_failures,
            configs: Arc::default(),
        }
    }

    /// Outbound handshake failures: a refusal that comes after the
    /// handshake (TLS 1.3) counts there too.
    pub fn handshake_failures(&self) -> Counter {
        self.handshake_failures.clone()
    }

    /// The client config for `peer` speaking `alpn`, built once per
    /// certificate: a config keeps the sessions it may resume, and a resumed
    /// session presents the certificate of the handshake that made it, so
    /// after a renewal the peer would go on seeing the old one, and refuse
    /// it once expired, at every reconnect.
    fn config(&self, peer: &Identity, alpn: &'static [u8]) -> Result<Arc<ClientConfig>, String> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.creds.generation();
        if let Some((g, c)) = configs.get(&(peer.clone(), alpn))
            && *g == generation
        {
            return Ok(c.clone());
        }
        let c = tls::client_config(&self.creds, peer.clone(), alpn, self.mismatches.clone())
            .map_err(|e| e.to_string())?;
        if configs.len() >= defaults::MAX_PEER_TLS_CONFIGS {
            // Bounded: identities come from discovery, but a pod talks to few.
            // Those of an older certificate go first.
            configs.retain(|_, (g, _)| *g == generation);
            if configs.len() >= defaults::MAX_PEER_TLS_CONFIGS {
                configs.clear();
            }
        }
        configs.insert((peer.clone(), alpn), (generation, c.clone()));
        Ok(c)
    }

    /// Why this proxy cannot prove its identity to a peer now, if it cannot:
    /// it has no certificate yet (started while the control plane was out of
    /// reach), or its own has expired (not renewed in time). A peer would
    /// refuse the handshake, which would be taken for the peer's failure,
    /// and healthy endpoints ejected for what is this proxy's.
    pub fn own_certificate_problem(&self) -> Option<&'static str> {
        if self.creds.current().is_none() {
            Some("this proxy has no certificate yet: the control plane has not issued one")
        } else if self.creds.expired() {
            Some("this proxy's certificate has expired: the control plane has not renewed it")
        } else {
            None
        }
    }

    /// An mTLS connection to the peer proxy at `addr`, which must present `peer`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer: &Identity,
        alpn: &'static [u8],
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, ConnectError> {
        if let Some(reason) = self.own_certificate_problem() {
            return Err(ConnectError::OwnCertificate { addr, reason });
        }
        let tls_err = |reason: String| ConnectError::Tls { addr, reason };
        let config = self.config(peer, alpn).map_err(tls_err)?;
        let name = sni(peer);
        // One deadline for the TCP connect and the handshake together: the
        // connect timeout bounds the whole (not twice it).
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = tcp(addr, timeout).await?;
        let handshake = TlsConnector::from(config).connect(name, stream);
        match tokio::time::timeout_at(deadline, handshake).await {
            // A resumed session brings back the server's leaf from the
            // handshake that made it, unverified: one expired since is refused.
            Ok(Ok(s))
                if s.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(tls::live_identity_of)
                    .is_none() =>
            {
                self.handshake_failures.inc();
                Err(tls_err("the peer's certificate has expired".into()))
            }
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => {
                self.handshake_failures.inc();
                let reason = tls::describe_handshake_error(&e);
                // Any endpoint a Service lists can fail every handshake:
                // counted each time, logged as a sample.
                strait_otel::sampled!(warn, peer = %addr, identity = %peer, error = %reason, "mTLS handshake with peer proxy failed");
                Err(tls_err(reason))
            }
            Err(_) => {
                self.handshake_failures.inc();
                Err(ConnectError::Timeout {
                    addr,
                    after: timeout,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair,
    };

    /// A root CA, and its certificate's PEM.
    fn test_root() -> (Issuer<'static, KeyPair>, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        (Issuer::new(params, key), pem)
    }

    /// Signs `creds`'s request with `by`, installs the leaf, and returns it.
    fn install_signed(creds: &Credentials, by: &Issuer<'_, KeyPair>) -> Vec<u8> {
        let mut csr =
            CertificateSigningRequestParams::from_der(&creds.csr_der().unwrap().into()).unwrap();
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = csr.signed_by(by).unwrap().der().to_vec();
        creds.install(leaf.clone(), Vec::new()).unwrap();
        leaf
    }

    #[test]
    fn every_identity_has_a_server_name() {
        let id = |sa: &str| Identity::of("cluster.local", "shop", sa).unwrap();
        assert_eq!(
            sni(&id("web")).to_str(),
            "web.shop.serviceaccount.identity.strait.cluster.local"
        );
        for sa in ["a".repeat(64), format!("{}.b", "a".repeat(200))] {
            assert_eq!(sni(&id(&sa)).to_str(), STAND_IN_SNI, "{sa}");
        }
    }

    /// Without a certificate of its own, the proxy does not dial a peer only
    /// to be refused: the error names this proxy, not the peer.
    #[tokio::test]
    async fn no_certificate_of_its_own_is_no_peers_failure() {
        let root_key = rcgen::KeyPair::generate().unwrap();
        let mut root_params = rcgen::CertificateParams::default();
        root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root_cert = root_params.self_signed(&root_key).unwrap();
        let anchors = crate::identity::TrustAnchors::from_pem(root_cert.pem().as_bytes()).unwrap();
        let me = Identity::of("cluster.local", "shop", "web").unwrap();
        let creds = Arc::new(Credentials::generate(me.clone(), anchors).unwrap());
        let failures = Counter::default();
        let tls = PeerTls::new(creds, Counter::default(), failures.clone());
        // Something listens: a dial would have got a connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let e = tls
            .connect(addr, &me, tls::ALPN_H2, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::OwnCertificate { .. }), "{e:?}");
        assert!(
            e.to_string().contains("this proxy has no certificate"),
            "{e}"
        );
        assert_eq!(failures.get(), 0, "no handshake failed");
        let nothing = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        assert!(nothing.is_err(), "no connection was made");
    }

    /// After a renewal, new connections are made with a new client config:
    /// the old one's resumable sessions would present the old certificate.
    #[test]
    fn a_renewal_makes_new_client_configs() {
        use rcgen::{CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair};
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = CertificateParams::default();
        root_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root_cert = root_params.self_signed(&root_key).unwrap();
        let root = Issuer::new(root_params, root_key);
        let anchors = crate::identity::TrustAnchors::from_pem(root_cert.pem().as_bytes()).unwrap();
        let me = Identity::of("cluster.local", "shop", "web").unwrap();
        let creds = Arc::new(Credentials::generate(me.clone(), anchors).unwrap());
        let tls = PeerTls::new(creds.clone(), Counter::default(), Counter::default());
        let install = || {
            let csr = CertificateSigningRequestParams::from_der(&creds.csr_der().unwrap().into())
                .unwrap();
            let leaf = csr.signed_by(&root).unwrap();
            creds.install(leaf.der().to_vec(), Vec::new()).unwrap();
        };
        install();
        let first = tls.config(&me, tls::ALPN_H2).unwrap();
        assert!(Arc::ptr_eq(&first, &tls.config(&me, tls::ALPN_H2).unwrap()));
        install();
        let renewed = tls.config(&me, tls::ALPN_H2).unwrap();
        assert!(
            !Arc::ptr_eq(&first, &renewed),
            "built again after the renewal"
        );
        assert!(Arc::ptr_eq(
            &renewed,
            &tls.config(&me, tls::ALPN_H2).unwrap()
        ));
    }

    /// A peer that does not trust this proxy's issuer (its anchors not yet
    /// rotated) refuses its certificate only after the client's handshake
    /// has ended, in TLS 1.3: the refusal comes as an alert on the first
    /// read, and is known for what it is there.
    #[tokio::test]
    async fn a_peer_refusing_our_certificate_is_known_by_its_alert() {
        use tokio::io::AsyncReadExt;
        let ((old, old_pem), (new, new_pem)) = (test_root(), test_root());
        let anchors = |pem: &str| crate::identity::TrustAnchors::from_pem(pem.as_bytes()).unwrap();
        // The peer trusts the old issuer only; this proxy, renewed by the new
        // one, trusts both.
        let web = Identity::of("cluster.local", "shop", "web").unwrap();
        let server = Arc::new(Credentials::generate(web.clone(), anchors(&old_pem)).unwrap());
        install_signed(&server, &old);
        let me = Identity::of("cluster.local", "shop", "client").unwrap();
        let both = format!("{old_pem}{new_pem}");
        let client = Arc::new(Credentials::generate(me, anchors(&both)).unwrap());
        install_signed(&client, &new);

        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&server).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let failures = Counter::default();
        let tls = PeerTls::new(client, Counter::default(), failures.clone());
        let mut s = tls
            .connect(addr, &web, tls::ALPN_H2, Duration::from_secs(5))
            .await
            .expect("the client's side of a TLS 1.3 handshake ends first");
        let e = s.read(&mut [0u8; 1]).await.unwrap_err();
        // Both roots have rcgen's default name, as a rotation that keeps the
        // issuer's name: the peer finds a root of that name whose key did not
        // sign, and says so with a decrypt_error alert (unknown_ca otherwise).
        assert_eq!(
            tls::refused_our_certificate(&e),
            Some(rustls::AlertDescription::DecryptError),
            "{e:?}"
        );
    }

    /// A peer whose certificate names the identity asked for but was issued
    /// under no anchor this proxy trusts (a self-made CA, another mesh's) is
    /// refused before a byte is sent: else anyone answering on an endpoint's
    /// address with a certificate naming the right SPIFFE ID got its traffic.
    #[tokio::test]
    async fn a_peer_issued_under_no_trusted_anchor_is_refused() {
        let ((ours, ours_pem), (other, other_pem)) = (test_root(), test_root());
        let anchors = |pem: &str| crate::identity::TrustAnchors::from_pem(pem.as_bytes()).unwrap();
        let web = Identity::of("cluster.local", "shop", "web").unwrap();
        let server = Arc::new(Credentials::generate(web.clone(), anchors(&other_pem)).unwrap());
        install_signed(&server, &other);
        let me = Identity::of("cluster.local", "shop", "client").unwrap();
        let client = Arc::new(Credentials::generate(me, anchors(&ours_pem)).unwrap());
        install_signed(&client, &ours);

        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&server).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.is_ok()
        });
        let (mismatches, failures) = (Counter::default(), Counter::default());
        let tls = PeerTls::new(client, mismatches.clone(), failures.clone());
        let e = tls
            .connect(addr, &web, tls::ALPN_H2, Duration::from_secs(5))
            .await
            .expect_err("a certificate under an untrusted issuer");
        assert!(matches!(e, ConnectError::Tls { .. }), "{e:?}");
        // Both roots have rcgen's default name: the one trusted did not sign.
        assert!(e.to_string().contains("invalid peer certificate"), "{e}");
        assert_eq!(failures.get(), 1, "counted as a handshake failure");
        assert_eq!(mismatches.get(), 0, "not taken for another identity");
        assert!(!served.await.unwrap(), "the server saw the handshake fail");
    }

    /// After a peer renews, a caller that resumed sessions with it gets its
    /// new certificate at the next connection: a resumed session would
    /// present the old one (and hand on tickets of it), until, expired, the
    /// caller refused it at every reconnect.
    #[tokio::test]
    async fn a_peer_s_renewal_reaches_callers_that_resumed_with_it() {
        use rustls::HandshakeKind;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (root, root_pem) = test_root();
        let anchors = || crate::identity::TrustAnchors::from_pem(root_pem.as_bytes()).unwrap();
        let install = |creds: &Credentials| install_signed(creds, &root);
        let web = Identity::of("cluster.local", "shop", "web").unwrap();
        let server = Arc::new(Credentials::generate(web.clone(), anchors()).unwrap());
        let me = Identity::of("cluster.local", "shop", "client").unwrap();
        let client = Arc::new(Credentials::generate(me, anchors()).unwrap());
        install(&client);
        let first = install(&server);

        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&server).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = acceptor.accept(tcp).await {
                        let _ = s.write_all(b"x").await;
                        let _ = s.read(&mut [0u8; 1]).await;
                    }
                });
            }
        });
        let tls = PeerTls::new(client, Counter::default(), Counter::default());
        let connect = || async {
            let mut s = tls
                .connect(addr, &web, tls::ALPN_OPAQUE, Duration::from_secs(5))
                .await
                .unwrap();
            // Read past the session tickets, which come first.
            s.read_exact(&mut [0u8; 1]).await.unwrap();
            let conn = &s.get_ref().1;
            let leaf = conn.peer_certificates().unwrap()[0].to_vec();
            (leaf, conn.handshake_kind())
        };
        assert_eq!(connect().await, (first.clone(), Some(HandshakeKind::Full)));
        assert_eq!(connect().await, (first, Some(HandshakeKind::Resumed)));
        let renewed = install(&server);
        assert_eq!(connect().await.0, renewed, "the old certificate came back");
        assert_eq!(connect().await.0, renewed);
    }
}
