//! The gRPC port over TLS when the controller issues certificates. Proxies send
//! their tokens over it and learn from it which identity each peer must present,
//! so it must be neither readable nor forgeable on the network. The controller's
//! certificate comes from its own CA, lives in memory only, and is renewed at half
//! its lifetime.

use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tracing::{debug, info};

use super::ca::Ca;
use super::issuer::Issuer;
use crate::defaults;
use crate::metrics::Metrics;
use strait_api::per_source::{PerSource, Share};

/// The controller's identity and the DNS name its certificate also carries.
#[derive(Clone, Debug)]
pub struct ServingName {
    pub identity: String,
    pub dns: String,
}

impl ServingName {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        ServingName {
            identity: format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"),
            dns: format!("{service_account}.{namespace}.svc"),
        }
    }
}

#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|c| c.clone())
    }
}

fn certified(ca: &Ca, name: &ServingName) -> anyhow::Result<(Arc<CertifiedKey>, SystemTime)> {
    let (leaf, key) = ca.serving_certificate(&name.identity, &name.dns)?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider.key_provider.load_private_key(der)?;
    let chain = std::iter::once(leaf.der)
        .chain(ca.chain_der())
        .map(CertificateDer::from)
        .collect();
    info!(identity = %name.identity, serial = %leaf.serial, "controller serving certificate issued");
    Ok((Arc::new(CertifiedKey::new(chain, signing)), leaf.not_after))
}

/// A TLS 1.3 acceptor (ALPN h2) with a certificate that renews itself for as
/// long as the returned acceptor is in use.
pub fn acceptor(ca: Arc<Issuer>, name: ServingName) -> anyhow::Result<TlsAcceptor> {
    let current = renewing(ca, name)?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_client_cert_verifier(Arc::new(ProofOfKey(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))))
    .with_cert_resolver(current);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The admission webhook's acceptor: the same renewing certificate (the API
/// server trusts the anchors through the webhook's `caBundle`), HTTP/1.1, no
/// client certificate.
pub fn webhook_acceptor(ca: Arc<Issuer>, name: ServingName) -> anyhow::Result<TlsAcceptor> {
    let current = renewing(ca, name)?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(current);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// A certificate for `name` that renews itself at half its lifetime, and at
/// once under a new issuer, for as long as the returned resolver is in use.
fn renewing(ca: Arc<Issuer>, name: ServingName) -> anyhow::Result<Arc<Current>> {
    renewing_by(ca, name, SystemTime::now)
}

/// As `renewing`, by the wall clock `now`: the certificate expires by it, and
/// a timer alone does not run while the machine sleeps (a paused VM), which
/// would renew it hours after it expired (every proxy's handshake, and the
/// API server's webhook calls, refused meanwhile).
fn renewing_by(
    issuer: Arc<Issuer>,
    name: ServingName,
    now: fn() -> SystemTime,
) -> anyhow::Result<Arc<Current>> {
    let mut changes = issuer.changes();
    let (first, mut not_after) = certified(&issuer.current(), &name)?;
    let current = Arc::new(Current(RwLock::new(first)));
    let renewing = Arc::downgrade(&current);
    tokio::spawn(async move {
        let mut failures = 0;
        loop {
            let left = not_after.duration_since(now()).unwrap_or_default();
            let due =
                strait_api::clock::wall_clock_sleep(now() + renewal_delay(left, failures), now);
            tokio::select! {
                () = due => {}
                // A new issuer: what the old one signed would end with it,
                // and proxies that trust only a new anchor refuse it.
                Ok(()) = changes.changed() => {}
            }
            let Some(current) = renewing.upgrade() else {
                return;
            };
            match certified(&issuer.current(), &name) {
                Ok((c, until)) => {
                    if let Ok(mut slot) = current.0.write() {
                        *slot = c;
                    }
                    not_after = until;
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    strait_otel::sampled!(warn, error = %e, "cannot renew the controller's serving certificate");
                }
            }
        }
    });
    Ok(current)
}

/// How long to wait before renewing a certificate with `left` to live, after
/// `failures` failed renewals in a row: at half its life, but a renewal that
/// keeps failing (the issuer about to expire, or expired) is retried ever less
/// often, up to `RENEWAL_RETRY_MAX` apart, rather than twice a second.
fn renewal_delay(left: Duration, failures: u32) -> Duration {
    let floor = Duration::from_millis(500);
    if failures == 0 {
        return (left / 2).max(floor);
    }
    let backoff = floor.saturating_mul(2u32.saturating_pow(failures.min(16)));
    backoff
        .min(RENEWAL_RETRY_MAX)
        .max((left / 2).min(RENEWAL_RETRY_MAX))
}

const RENEWAL_RETRY_MAX: Duration = Duration::from_secs(30);

/// Asks for a client certificate without requiring one, and checks only that
/// the client holds its key: whether the chain proves an identity is decided per
/// call (`caller.rs`), where a failed chain can fall back to the token.
#[derive(Debug)]
struct ProofOfKey(Arc<rustls::crypto::CryptoProvider>);

impl ClientCertVerifier for ProofOfKey {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // TLS 1.3 only on this port.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Accepted connections, each TLS handshake (with `tls`) on its own task,
/// bounded in time, so a slow or silent client delays nobody else. A source
/// address holding its share of connections already (`per_source`) has the
/// new one closed at once: handshakes and connections are bounded per pod.
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    per_source: PerSource,
    metrics: Arc<Metrics>,
) -> ReceiverStream<std::io::Result<Accepted>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, typically: let some close.
                        strait_otel::sampled!(warn, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let source = peer.ip().to_canonical();
            let Some(share) = per_source.take(Some(source)) else {
                metrics.api_refused("grpc", "too_many_connections");
                strait_otel::sampled!(
                    warn,
                    source = %peer.ip(),
                    limit = per_source.limit(),
                    "refused a connection to the gRPC port: its address holds its share already"
                );
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = tls.clone() else {
                let io = Either::Left(tcp);
                let accepted = Accepted::new(io, source, share);
                if tx.send(Ok(accepted)).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(defaults::TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => {
                        let io = Either::Right(Box::new(s));
                        let accepted = Accepted::new(io, source, share);
                        let _ = tx.send(Ok(accepted)).await;
                    }
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake on the gRPC port failed")
                    }
                    Err(_) => debug!(%peer, "TLS handshake on the gRPC port timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// An accepted connection, plaintext or TLS, holding its place among its
/// source's; each request on it carries the client's certificate chain, if it
/// presented one, and address, as a [`PeerCerts`] extension.
pub struct Accepted {
    io: Either<TcpStream, Box<TlsStream<TcpStream>>>,
    /// The address its share was counted for.
    source: std::net::IpAddr,
    _share: Share,
    /// Until the client's first bytes (HTTP/2's preface) come: a client
    /// that connects, or finishes its handshake, and says nothing is closed
    /// then. HTTP/2's PINGs begin only after the preface, and such a
    /// connection would hold its source's place, and a file, for good.
    first_bytes_by: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Accepted {
    fn new(
        io: Either<TcpStream, Box<TlsStream<TcpStream>>>,
        source: std::net::IpAddr,
        share: Share,
    ) -> Self {
        Accepted {
            io,
            source,
            _share: share,
            first_bytes_by: Some(Box::pin(tokio::time::sleep(
                defaults::GRPC_FIRST_BYTES_TIMEOUT,
            ))),
        }
    }
}

/// The certificates a client presented (its key was proven in the handshake;
/// the chain is not verified yet), and where it connected from.
#[derive(Clone, Debug, Default)]
pub struct PeerCerts {
    pub certs: Option<Arc<[CertificateDer<'static>]>>,
    pub addr: Option<std::net::IpAddr>,
}

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = PeerCerts;

    fn connect_info(&self) -> PeerCerts {
        let certs = match &self.io {
            Either::Left(_) => None,
            Either::Right(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
        };
        PeerCerts {
            certs,
            addr: Some(self.source),
        }
    }
}

/// Where the caller of `req` connected from, when known.
pub fn source<T>(req: &tonic::Request<T>) -> Option<std::net::IpAddr> {
    req.extensions().get::<PeerCerts>().and_then(|p| p.addr)
}

impl tokio::io::AsyncRead for Accepted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Some(by) = self.first_bytes_by.as_mut() {
            match &read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => self.first_bytes_by = None,
                Poll::Pending if by.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent nothing",
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

impl tokio::io::AsyncWrite for Accepted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;
    use tonic::transport::server::Connected;

    /// The controller's serving certificate is renewed by the wall clock:
    /// after the machine slept past its renewal time (a paused VM), within a
    /// step of waking, not when a timer that did not run would end.
    #[tokio::test(start_paused = true)]
    async fn the_serving_certificate_is_renewed_by_the_wall_clock() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::time::{Duration, SystemTime};
        static SLEPT: AtomicU64 = AtomicU64::new(0);
        fn now() -> SystemTime {
            SystemTime::now() + Duration::from_secs(SLEPT.load(Ordering::SeqCst))
        }
        let g =
            crate::identity::ca::generate("cluster.local", Duration::from_secs(86_400)).unwrap();
        let ca = crate::identity::ca::Ca::from_pem(
            &g.issuer_cert_pem,
            &g.issuer_key_pem,
            Duration::from_secs(3600),
        )
        .unwrap();
        let name = super::ServingName::new("cluster.local", "strait-system", "strait-controller");
        let current = super::renewing_by(Issuer::fixed(ca), name, now).unwrap();
        let first = current.0.read().unwrap().clone();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(Arc::ptr_eq(&first, &current.0.read().unwrap()));
        // A minute of timers, and the machine slept 50 minutes: past half
        // the hour's life.
        SLEPT.store(3000, Ordering::SeqCst);
        tokio::time::sleep(strait_api::clock::WALL_CLOCK_STEP + Duration::from_secs(1)).await;
        assert!(
            !Arc::ptr_eq(&first, &current.0.read().unwrap()),
            "not renewed within a step of waking"
        );
    }

    /// The controller's serving certificate is signed again as soon as a new
    /// issuer is taken, not at half its life: the old issuer's chain would
    /// last only as long as it, and a proxy that trusts only the new anchor
    /// (the end of a rotation) refuses it.
    #[tokio::test(start_paused = true)]
    async fn a_new_issuer_signs_the_serving_certificate_at_once() {
        use crate::identity::issuer::tests::{Mounted, anchor};
        let files = Mounted::new("serving-reissued");
        let (old, new) = (anchor("old-root"), anchor("new-root"));
        files.write(&old.issuer(), &old.pem);
        let issuer = files.load();
        let name = super::ServingName::new("cluster.local", "strait-system", "strait-controller");
        let current = super::renewing_by(issuer.clone(), name, std::time::SystemTime::now).unwrap();
        let chain_issuer = || current.0.read().unwrap().cert[1].to_vec();
        let before = chain_issuer();

        files.write(&new.issuer(), &format!("{}{}", old.pem, new.pem));
        let taken = issuer.reload().unwrap().expect("the new issuer");
        // Not a timer's wait: the renewal is due in half an hour.
        for _ in 0..100 {
            if chain_issuer() != before {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(chain_issuer(), taken.issuer_der());
    }

    /// A renewal is due at half the certificate's life; one that keeps
    /// failing is retried ever less often, 30 s apart at most.
    #[test]
    fn a_failing_renewal_backs_off() {
        use super::renewal_delay;
        use std::time::Duration;
        let s = Duration::from_secs;
        assert_eq!(renewal_delay(s(3600), 0), s(1800));
        assert_eq!(renewal_delay(s(0), 0), Duration::from_millis(500));
        let delays: Vec<_> = (1..=8).map(|n| renewal_delay(s(0), n)).collect();
        assert_eq!(delays[..3], [s(1), s(2), s(4)]);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert_eq!(delays[7], s(30));
        // A certificate with long to live is not retried sooner than 30 s.
        assert_eq!(renewal_delay(s(3600), 1), s(30));
    }

    use super::*;

    /// A pod past its share of connections has the next one closed before
    /// anything is read from it, and gets its place back when one closes.
    #[tokio::test]
    async fn a_source_past_its_share_of_connections_is_closed_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        let mut accepted = incoming(listener, None, PerSource::new(2), metrics.clone());
        fn within<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
            tokio::time::timeout(Duration::from_secs(10), f)
        }
        let (_a, _b) = (
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        );
        let first = within(accepted.next()).await.unwrap().unwrap().unwrap();
        let _second = within(accepted.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(first.connect_info().addr, Some(addr.ip()));

        let mut third = TcpStream::connect(addr).await.unwrap();
        let read = within(third.read(&mut [0u8; 1])).await.unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let text = metrics.encode();
        assert!(
            text.contains("api_refusals_total{service=\"grpc\",reason=\"too_many_connections\"} 1"),
            "{text}"
        );

        drop(first);
        let _d = TcpStream::connect(addr).await.unwrap();
        assert!(matches!(within(accepted.next()).await, Ok(Some(Ok(_)))));
    }

    /// A client that connects and sends nothing (no HTTP/2 preface, before
    /// which no PING can tell a live client from a dead one) is closed after
    /// `GRPC_FIRST_BYTES_TIMEOUT`, and gives its place back; one that speaks
    /// is read as long as it likes.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_says_nothing_is_closed() {
        use tokio::io::AsyncWriteExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener, None, PerSource::new(1), Metrics::new());
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut conn = accepted.next().await.unwrap().unwrap();
        let read = tokio::time::timeout(
            defaults::GRPC_FIRST_BYTES_TIMEOUT * 2,
            conn.read(&mut [0u8; 16]),
        )
        .await
        .expect("still open");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::TimedOut)
        );
        drop(conn);
        let mut speaking = TcpStream::connect(addr).await.unwrap();
        let mut conn = accepted.next().await.unwrap().unwrap();
        speaking.write_all(b"PRI").await.unwrap();
        let mut buf = [0u8; 3];
        conn.read_exact(&mut buf).await.unwrap();
        let quiet = tokio::time::timeout(
            defaults::GRPC_FIRST_BYTES_TIMEOUT * 3,
            conn.read(&mut [0u8; 1]),
        )
        .await;
        assert!(quiet.is_err(), "closed after it spoke: {quiet:?}");
    }
}
