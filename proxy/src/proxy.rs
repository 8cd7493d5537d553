//! The proxy as a whole: binds its listeners, serves them, and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use strait_api::essential::{Ended, Essential};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::addr::{ClientAddr, OwnAddrs};
use crate::admin::{self, AdminState};
use crate::cli::Config;
use crate::control::discovery::Discovery;
use crate::control::{self, ControlPlaneError, Workload};
use crate::defaults;
use crate::detect::{Protocol, detect_from};
use crate::http::client::ClientCache;
use crate::http::server::ServerConfig;
use crate::identity::{self, Credentials, Identity, TrustAnchors, tls};
use crate::inbound::Inbound;
use crate::inbound::policy::{InboundPolicy, PolicyRx};
use crate::outbound::Outbound;
use crate::tcp::TcpConfig;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::log::LogHandle;
use crate::telemetry::metrics::{DirectionLabels, ProtocolLabels};
use crate::telemetry::trace::Observe;
use crate::telemetry::{Direction, Metrics};
use crate::transport::connect::PeerTls;
use crate::transport::drain::{self, ShutdownHandle};
use crate::transport::listen::BindError;
use crate::transport::{Drain, DrainTrigger, Listener, PrefixedIo};

/// What every connection handler needs, shared.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub clients: ClientCache,
    pub drain: Drain,
    pub tcp: TcpConfig,
    pub http: ServerConfig,
    pub discovery: Option<Arc<Discovery>>,
    /// This proxy's credentials, when it takes part in mTLS.
    pub identity: Option<Arc<Credentials>>,
    /// mTLS to peer proxies, with `identity`.
    pub peer_tls: Option<PeerTls>,
    /// The TLS server side of the inbound listener, with `identity`.
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    /// This workload's inbound policy.
    pub policy: PolicyRx,
    /// Every address this proxy listens on: never a destination of its own traffic.
    pub own: OwnAddrs,
    /// Spans and access log, when either is on.
    pub observe: Option<Arc<Observe>>,
    /// Near the container's memory limit, new requests are shed.
    pub memory: crate::cgroup::Pressure,
}

/// The tracer (with `--otlp-endpoint`) and the access log (with `--access-log`).
fn observe(config: &Config, metrics: &Metrics) -> Result<Option<Arc<Observe>>, StartError> {
    let tracer = match &config.otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry::KeyValue;
            let cfg = strait_otel::ExportConfig {
                endpoint: endpoint.clone(),
                sampling: config.trace_sampling,
                service_name: config
                    .service_name
                    .clone()
                    .unwrap_or_else(|| config.service_account.clone()),
                resource: vec![
                    KeyValue::new("k8s.namespace.name", config.namespace.clone()),
                    KeyValue::new(
                        "k8s.pod.name",
                        config
                            .pod_name
                            .clone()
                            .or_else(|| std::env::var("HOSTNAME").ok())
                            .unwrap_or_default(),
                    ),
                    KeyValue::new("strait.service_account", config.service_account.clone()),
                    KeyValue::new("strait.proxy.version", env!("CARGO_PKG_VERSION")),
                ],
            };
            let r = strait_otel::Recorder::start(cfg, metrics.trace_spans_dropped.clone())
                .map_err(|e| StartError::Flag(e.to_string()))?;
            Some(r)
        }
        None => None,
    };
    let access_log = config
        .access_log
        .map(|f| AccessLog::start(f, metrics.access_log_dropped.clone()));
    if tracer.is_none() && access_log.is_none() {
        return Ok(None);
    }
    Ok(Some(Arc::new(Observe {
        tracer,
        never_start: config.trace_sampling == 0.0,
        access_log,
    })))
}

/// What the first bytes of a connection said.
pub enum Detection<I> {
    Known(Protocol, PrefixedIo<I>),
    /// Nothing at all within the detection timeout: a server-speaks-first
    /// protocol, or a client that connected ahead of its first request.
    Silent(I),
}

impl Shared {
    /// Detects the protocol of a new connection (or takes `opaque` as given) and
    /// returns the stream with the bytes read so far put back in front, or says
    /// the client stayed silent (counted only once the caller knows what it is).
    pub async fn detect_or_silence<I>(
        &self,
        mut stream: I,
        opaque: bool,
        direction: Direction,
        client: ClientAddr,
    ) -> Option<Detection<I>>
    where
        I: tokio::io::AsyncRead + Unpin,
    {
        if opaque {
            self.count_detected(direction, Protocol::Opaque);
            return Some(Detection::Known(
                Protocol::Opaque,
                PrefixedIo::new(Bytes::new(), stream),
            ));
        }
        let buf = BytesMut::with_capacity(1024);
        let d = self.read_first(&mut stream, buf, client).await?;
        if d.protocol == Protocol::Opaque && d.prefix.is_empty() {
            return Some(Detection::Silent(stream));
        }
        self.count_detected(direction, d.protocol);
        Some(Detection::Known(
            d.protocol,
            PrefixedIo::new(d.prefix.freeze(), stream),
        ))
    }

    /// Goes on detecting from the first bytes a client sent (`buf`), for at
    /// most the detection timeout; counts what it finds.
    pub async fn detect_more<I>(
        &self,
        mut stream: I,
        buf: BytesMut,
        direction: Direction,
        client: ClientAddr,
    ) -> Option<(Protocol, PrefixedIo<I>)>
    where
        I: tokio::io::AsyncRead + Unpin,
    {
        let d = self.read_first(&mut stream, buf, client).await?;
        self.count_detected(direction, d.protocol);
        Some((d.protocol, PrefixedIo::new(d.prefix.freeze(), stream)))
    }

    /// Reads until the protocol is known, or the detection timeout; `None`
    /// when the client closed or failed first.
    async fn read_first<I>(
        &self,
        stream: &mut I,
        buf: BytesMut,
        client: ClientAddr,
    ) -> Option<crate::detect::Detected>
    where
        I: tokio::io::AsyncRead + Unpin,
    {
        let d = detect_from(
            stream,
            buf,
            self.config.detect_timeout,
            defaults::DETECT_MAX_BYTES,
        );
        match d.await {
            Ok(Some(d)) => Some(d),
            // Half-closed without a word: a client that only reads (a server
            // that speaks first), carried as it would be without a proxy.
            Ok(None) => Some(crate::detect::Detected {
                protocol: crate::detect::Protocol::Opaque,
                prefix: BytesMut::new(),
            }),
            Err(e) => {
                debug!(client = %client.0, error = %e, "connection failed during detection");
                None
            }
        }
    }

    pub fn count_detected(&self, direction: Direction, protocol: Protocol) {
        self.metrics
            .protocol_detected
            .get_or_create(&ProtocolLabels {
                direction,
                protocol: protocol.as_str(),
            })
            .inc();
    }
}

/// The addresses the proxy actually listens on (ports may have been 0).
#[derive(Clone, Debug)]
pub struct Addrs {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    /// The outbound listener's port on IPv6 loopback, where it listens there too.
    pub outbound_v6: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// One per `--upstream`, in order.
    pub upstreams: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error("{0}")]
    Identity(String),
    #[error("{0}")]
    Flag(String),
}

/// Two listeners configured on one address: named both, before either binds
/// (the kernel would only say "address in use" about the second).
fn check_claims(config: &Config) -> Result<(), StartError> {
    let mut claims: Vec<(String, std::net::SocketAddr)> = vec![
        ("--inbound-addr".into(), config.inbound_addr),
        ("--outbound-addr".into(), config.outbound_addr),
        ("--admin-addr".into(), config.admin_addr),
    ];
    claims.extend(
        config
            .upstreams
            .iter()
            .map(|u| (format!("--upstream {u}"), u.local)),
    );
    let overlap = |a: std::net::SocketAddr, b: std::net::SocketAddr| {
        a.port() == b.port()
            && a.port() != 0
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    for (i, (na, a)) in claims.iter().enumerate() {
        if let Some((nb, b)) = claims[i + 1..].iter().find(|(_, b)| overlap(*a, *b)) {
            return Err(StartError::Flag(format!(
                "{na} ({a}) and {nb} ({b}) claim the same address"
            )));
        }
    }
    if config.max_discovery_watches == 0 {
        return Err(StartError::Flag(
            "--max-discovery-watches 0 would watch no destination; give at least 1".into(),
        ));
    }
    if config.max_discovery_watches > crate::defaults::MAX_DISCOVERY_WATCHES_LIMIT {
        return Err(StartError::Flag(format!(
            "--max-discovery-watches {}: each watch is a stream on the proxy's one connection \
             to the controller, which takes 2,048 at once with the policy watch and \
             certificate requests; give at most {}",
            config.max_discovery_watches,
            crate::defaults::MAX_DISCOVERY_WATCHES_LIMIT
        )));
    }
    for (flag, n, zero_would) in [
        (
            "--max-connections",
            Some(config.max_connections()),
            "refuse every connection",
        ),
        (
            "--max-in-flight-requests",
            Some(config.max_in_flight_requests),
            "refuse every request",
        ),
        (
            "--inbound-max-connections-per-source",
            config.inbound_max_connections_per_source,
            "refuse every unauthenticated connection",
        ),
    ] {
        match n {
            Some(0) => {
                return Err(StartError::Flag(format!(
                    "{flag} 0 would {zero_would}; give at least 1"
                )));
            }
            // A limit is a semaphore's permits, which panic past 2^61: far
            // past what file descriptors allow, so a typo.
            Some(n) if n > crate::defaults::MAX_COUNT_FLAG => {
                return Err(StartError::Flag(format!(
                    "{flag} {n}: give at most {}",
                    crate::defaults::MAX_COUNT_FLAG
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// With --trust-anchors: this proxy's credentials (a fresh key, no certificate yet).
fn credentials(config: &Config) -> Result<Option<Arc<Credentials>>, StartError> {
    if config.trust_anchors.is_none() && config.trust_anchors_pem.is_none() {
        if config.token_file.is_some() {
            return Err(StartError::Identity(
                "--token-file needs --trust-anchors (mTLS is enabled by the trust anchors)".into(),
            ));
        }
        return Ok(None);
    }
    if config.token_file.is_none() || config.control_plane.is_none() {
        return Err(StartError::Identity(
            "--trust-anchors needs --token-file and --control-plane (certificates come from the control plane)".into(),
        ));
    }
    let anchors = match (&config.trust_anchors, &config.trust_anchors_pem) {
        (Some(path), _) => TrustAnchors::load(path).map_err(|e| e.to_string()),
        (None, Some(pem)) => {
            TrustAnchors::from_pem(pem.as_bytes()).map_err(|e| format!("--trust-anchors-pem: {e}"))
        }
        (None, None) => Err("no trust anchors".to_string()),
    }
    .map_err(StartError::Identity)?;
    let id = Identity::of(
        &config.trust_domain,
        &config.namespace,
        &config.service_account,
    )
    .map_err(|e| {
        StartError::Identity(format!(
            "--trust-domain/--namespace/--service-account do not make an identity: {e}"
        ))
    })?;
    let creds =
        Credentials::generate(id, anchors).map_err(|e| StartError::Identity(e.to_string()))?;
    Ok(Some(Arc::new(creds)))
}

/// The identity the control plane must present.
fn control_plane_identity(config: &Config) -> Result<Identity, StartError> {
    match &config.control_plane_identity {
        Some(s) => s
            .parse()
            .map_err(|e| StartError::Identity(format!("--control-plane-identity {s:?}: {e}"))),
        None => Identity::of(
            &config.trust_domain,
            defaults::CONTROL_PLANE_NAMESPACE,
            defaults::CONTROL_PLANE_SERVICE_ACCOUNT,
        )
        .map_err(|e| StartError::Identity(format!("--trust-domain: {e}"))),
    }
}

pub struct Proxy {
    control: Option<(Arc<control::Link>, Workload)>,
    policy_tx: watch::Sender<Option<Arc<InboundPolicy>>>,
    shared: Arc<Shared>,
    trigger: DrainTrigger,
    inbound: Listener,
    outbound: Listener,
    upstreams: Vec<(Listener, crate::addr::DestAddr)>,
    admin: tokio::net::TcpListener,
    addrs: Addrs,
    log: Option<LogHandle>,
    ready: watch::Sender<bool>,
}

impl Proxy {
    pub async fn bind(config: Config, log: Option<LogHandle>) -> Result<Self, StartError> {
        check_claims(&config)?;
        let identity = credentials(&config)?;
        let metrics = Metrics::new();
        let link_tls = match &identity {
            Some(c) => Some(control::LinkTls {
                creds: c.clone(),
                controller: control_plane_identity(&config)?,
                mismatches: metrics.tls_identity_mismatches.clone(),
            }),
            None => None,
        };
        let control = match &config.control_plane {
            Some(url) => {
                let pod = config
                    .pod_name
                    .clone()
                    .or_else(|| std::env::var("HOSTNAME").ok())
                    .unwrap_or_else(|| "unknown".into());
                let workload = Workload {
                    namespace: config.namespace.clone(),
                    pod,
                    trust_domain: config.trust_domain.clone(),
                    // Sent only where the controller can verify it: over TLS.
                    token_file: identity
                        .as_ref()
                        .and(config.token_file.clone())
                        .map(Arc::new),
                };
                Some((control::Link::new(url, link_tls)?, workload))
            }
            None => None,
        };
        crate::transport::connect::app_at(config.app_ip);
        let inbound =
            Listener::bind(config.inbound_addr, Direction::Inbound, "--inbound-addr").await?;
        let outbound = Listener::bind(config.outbound_addr, Direction::Outbound, "--outbound-addr")
            .await?
            .with_ipv6_loopback(config.outbound_addr.port() == 0)?;
        let mut upstreams = Vec::new();
        for u in &config.upstreams {
            let l = Listener::bind(u.local, Direction::Outbound, "--upstream").await?;
            upstreams.push((l, u.dest.clone()));
        }
        let admin =
            crate::transport::listen::bind(config.admin_addr).map_err(|source| BindError {
                addr: config.admin_addr,
                what: "--admin-addr",
                source,
            })?;
        let admin_addr = admin.local_addr().map_err(|source| BindError {
            addr: config.admin_addr,
            what: "--admin-addr",
            source,
        })?;
        let addrs = Addrs {
            inbound: inbound.local_addr(),
            outbound: outbound.local_addr(),
            outbound_v6: outbound.ipv6_loopback(),
            admin: admin_addr,
            upstreams: upstreams.iter().map(|(l, _)| l.local_addr()).collect(),
        };
        let tls_server = match &identity {
            Some(c) => {
                Some(tls::server_config(c).map_err(|e| StartError::Identity(format!("TLS: {e}")))?)
            }
            None => None,
        };
        let peer_tls = identity.as_ref().map(|c| {
            PeerTls::new(
                c.clone(),
                metrics.tls_identity_mismatches.clone(),
                metrics
                    .tls_handshake_failures
                    .get_or_create(&DirectionLabels {
                        direction: Direction::Outbound,
                    })
                    .clone(),
            )
        });
        // Without a control plane nothing restricts inbound traffic; with one,
        // nothing passes until its policy is known.
        let (policy_tx, policy) = watch::channel(
            control
                .is_none()
                .then(|| Arc::new(InboundPolicy::default())),
        );
        let (trigger, drain) = drain::channel();
        let discovery = control.as_ref().map(|(link, workload)| {
            Discovery::new(
                link.clone(),
                workload.clone(),
                metrics.discovery_lag.clone(),
                metrics.control_unreachable.clone(),
                config.max_discovery_watches,
                config.discovery_networks.clone(),
            )
        });
        let own =
            OwnAddrs::new(std::iter::once(addrs.outbound).chain(addrs.upstreams.iter().copied()))
                .with_public([addrs.inbound, addrs.admin], config.app_ip);
        let observe = observe(&config, &metrics)?;
        let shared = Arc::new(Shared {
            observe,
            memory: crate::cgroup::Pressure::of_own_cgroup(),
            own,
            discovery,
            identity,
            tls_server,
            policy,
            metrics,
            clients: ClientCache::new(config.connect_timeout, peer_tls.clone()),
            peer_tls,
            drain: drain.clone(),
            tcp: TcpConfig {
                connect_timeout: config.connect_timeout,
                idle_timeout: config.tcp_idle_timeout,
                names: Default::default(),
                drain: Some(drain),
            },
            http: ServerConfig::new(
                config.http_header_read_timeout,
                config.http_body_read_timeout,
                config.http_idle_timeout,
                config.max_in_flight_requests,
            ),
            config,
        });
        Ok(Proxy {
            control,
            policy_tx,
            shared,
            trigger,
            inbound,
            outbound,
            upstreams,
            admin,
            addrs,
            log,
            ready: watch::Sender::new(false),
        })
    }

    pub fn addrs(&self) -> &Addrs {
        &self.addrs
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Starts a graceful shutdown from anywhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.trigger.handle()
    }

    /// Serves until shutdown is asked for, or a task it cannot do without
    /// ends, then drains for at most the grace period.
    pub async fn run(self) -> Stopped {
        let Proxy {
            control,
            policy_tx,
            shared,
            trigger,
            inbound,
            outbound,
            upstreams,
            admin,
            addrs,
            log,
            ready,
        } = self;
        let max = shared.config.max_connections();
        let out = Arc::new(Outbound::new(shared.clone()));
        let inb = Arc::new(Inbound::new(shared.clone()));

        // Each one the proxy cannot serve without: should one end unasked (a
        // panic), the proxy stops rather than stay up serving stale state.
        let mut essential = Essential::new();
        {
            let out = out.clone();
            essential.spawn(
                "the outbound listener",
                outbound.serve(
                    shared.drain.clone(),
                    shared.metrics.clone(),
                    max,
                    move |acc| out.clone().handle(acc, None),
                ),
            );
        }
        for (l, dest) in upstreams {
            let out = out.clone();
            essential.spawn(
                "an upstream listener",
                l.serve(
                    shared.drain.clone(),
                    shared.metrics.clone(),
                    max,
                    move |acc| out.clone().handle(acc, Some(dest.clone())),
                ),
            );
        }
        essential.spawn(
            "the inbound listener",
            inbound.serve(
                shared.drain.clone(),
                shared.metrics.clone(),
                max,
                move |acc| inb.clone().handle(acc),
            ),
        );

        let policy_failure = control::policy::LastFailure::default();
        essential.spawn(
            "the admin server",
            admin::serve(
                admin,
                Arc::new(AdminState {
                    config: serde_json::to_value(&shared.config).unwrap_or_default(),
                    metrics: {
                        let m = shared.metrics.clone();
                        admin::Scrapes::new(move |out| m.encode_into(out))
                    },
                    log,
                    shutdown: trigger.handle(),
                    drain: shared.drain.clone(),
                    ready: ready.subscribe(),
                    identity: shared.identity.clone(),
                    tcp_probes: admin::TcpProbes {
                        ports: shared.config.tcp_probe_ports.clone(),
                        app_ip: shared.config.app_ip,
                    },
                    known: admin::known::Known {
                        discovery: shared.discovery.clone(),
                        policy: shared.policy.clone(),
                        policy_failure: policy_failure.clone(),
                    },
                }),
            ),
        );
        // With a control plane, ready once it has answered for this workload (and,
        // with mTLS, once the first certificate is in); without one, bound
        // listeners are all it takes.
        match control {
            Some((link, workload)) => {
                let mut rx = policy_tx.subscribe();
                essential.spawn(
                    "the inbound policy watch",
                    control::policy::follow(link.clone(), workload, policy_tx, policy_failure),
                );
                if let Some(creds) = &shared.identity
                    && let Some(token) = &shared.config.token_file
                {
                    essential.spawn(
                        "the certificate renewal",
                        identity::follow(
                            link,
                            creds.clone(),
                            token.clone(),
                            shared.metrics.clone(),
                        ),
                    );
                }
                let ready = ready.clone();
                let creds = shared.identity.clone();
                tokio::spawn(async move {
                    if rx.wait_for(Option::is_some).await.is_ok() {
                        if let Some(c) = creds {
                            c.certified().await;
                        }
                        info!("control plane answered; ready");
                        ready.send_replace(true);
                    }
                });
            }
            None => {
                ready.send_replace(true);
            }
        }
        info!(
            inbound = %addrs.inbound, outbound = %addrs.outbound,
            outbound_v6 = ?addrs.outbound_v6, admin = %addrs.admin,
            upstreams = ?addrs.upstreams, "proxy listening"
        );

        let failed = tokio::select! {
            biased;
            () = trigger.requested() => None,
            ended = essential.ended() => {
                error!(task = %ended, "the proxy cannot serve without it; stopping");
                trigger.drain();
                Some(ended)
            }
        };
        info!(grace = ?shared.config.shutdown_grace_period, in_flight = trigger.in_flight(), "draining");
        let clean = trigger.wait(shared.config.shutdown_grace_period).await;
        if clean {
            info!("drained");
        } else {
            warn!(
                left = trigger.in_flight(),
                "grace period over, closing what is left"
            );
            // Their requests' spans and access-log lines are queued as they
            // are dropped, before the flushes below.
            if !trigger.cut(defaults::TRACE_FLUSH_TIMEOUT).await {
                warn!(
                    left = trigger.in_flight(),
                    "connections still closing at exit"
                );
            }
        }
        drop(essential);
        // The last requests' spans leave before the process does, rather than
        // waiting for the next look.
        if let Some(t) = shared.observe.as_ref().and_then(|o| o.tracer.as_ref())
            && !t.flush(defaults::TRACE_FLUSH_TIMEOUT).await
        {
            warn!(within = ?defaults::TRACE_FLUSH_TIMEOUT, "the spans queued at exit could not be handed to the collector in time");
        }
        // And the last requests' access-log lines, the cancelled ones included.
        if let Some(l) = shared.observe.as_ref().and_then(|o| o.access_log.as_ref())
            && !l.flush(defaults::TRACE_FLUSH_TIMEOUT).await
        {
            warn!(within = ?defaults::TRACE_FLUSH_TIMEOUT, "the access-log lines queued at exit could not be written in time");
        }
        Stopped { clean, failed }
    }
}

/// How a proxy stopped.
#[derive(Debug)]
pub struct Stopped {
    /// Every connection finished within the grace period.
    pub clean: bool,
    /// The task whose end stopped it, when not asked to stop.
    pub failed: Option<Ended>,
}
