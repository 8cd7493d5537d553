//! `strait controller`: the index, its source, and the gRPC services the proxies use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use strait_api::listen;
use strait_api::v1::discovery_server::DiscoveryServer;
use strait_api::v1::identity_server::IdentityServer;
use strait_api::v1::inbound_policy_server::InboundPolicyServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::discovery::{DiscoveryService, Views};
use crate::identity::IdentityService;
use crate::identity::caller::Authenticator;
use crate::identity::issuer::Issuer;
use crate::identity::serving::{self, ServingName};
use crate::identity::tokens::Verifier;
use crate::index::Snapshot;
use crate::inject::Settings;
use crate::inject::webhook::{self, FailurePolicy};
use crate::kubernetes::KubernetesSource;
use crate::kubernetes::lease::{self, LeaseConfig};
use crate::kubernetes::status::{self, Statuses};
use crate::kubernetes::tokens::TokenReviewer;
use crate::manifests::ManifestSource;
use crate::metrics::{Metrics, Watches};
use crate::policy::InboundPolicyService;
use crate::source::Source;
use crate::unanswered::UnansweredLayer;
use crate::{admin, defaults};
use strait_api::essential::Essential;
use strait_api::per_source::PerSource;

#[derive(Clone, Debug, clap::Args)]
// Every controller flag is also a `STRAIT_*` variable, these shared with
// `install` and `inject` too, which take no variables.
#[command(
    mut_arg("proxy_cpu_request", |a| a.env("STRAIT_PROXY_CPU_REQUEST")),
    mut_arg("proxy_cpu_limit", |a| a.env("STRAIT_PROXY_CPU_LIMIT")),
    mut_arg("proxy_memory_request", |a| a.env("STRAIT_PROXY_MEMORY_REQUEST")),
    mut_arg("proxy_memory_limit", |a| a.env("STRAIT_PROXY_MEMORY_LIMIT"))
)]
pub struct ControllerArgs {
    /// Read Services, EndpointSlices, Pods, Secrets and policies from the YAML files
    /// in DIR (re-read on change), instead of the Kubernetes API. Repeatable (or
    /// comma-separated): the directories are read as one set.
    #[arg(
        long,
        env = "STRAIT_MANIFESTS",
        value_name = "DIR",
        value_delimiter = ','
    )]
    pub manifests: Vec<PathBuf>,
    /// Watch the Kubernetes API (in-cluster config, or KUBECONFIG) for Services,
    /// EndpointSlices, Pods, HTTPRoutes and strait's policies, and check tokens
    /// with TokenReview. The default when neither this nor --manifests is given
    /// and the controller runs in a pod.
    #[arg(
        long,
        env = "STRAIT_KUBERNETES",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub kubernetes: bool,
    /// gRPC address the proxies connect to.
    #[arg(long, env = "STRAIT_GRPC_ADDR", default_value = defaults::GRPC_ADDR)]
    pub grpc_addr: SocketAddr,
    /// Admin server: /live, /ready, /metrics.
    #[arg(long, env = "STRAIT_ADMIN_ADDR", default_value = defaults::ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Trust domain of workload identities.
    #[arg(long, env = "STRAIT_TRUST_DOMAIN", default_value = defaults::TRUST_DOMAIN)]
    pub trust_domain: String,
    /// PEM certificate of the issuer that signs workload certificates (signed by a
    /// trust anchor the proxies trust). Without it, no certificates are issued.
    #[arg(
        long,
        env = "STRAIT_ISSUER_CERT",
        value_name = "FILE",
        requires = "issuer_key"
    )]
    pub issuer_cert: Option<PathBuf>,
    /// PEM private key of the issuer.
    #[arg(
        long,
        env = "STRAIT_ISSUER_KEY",
        value_name = "FILE",
        requires = "issuer_cert"
    )]
    pub issuer_key: Option<PathBuf>,
    /// Namespace the controller runs in: with --service-account, its own identity
    /// (spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT), which its gRPC port
    /// presents over TLS whenever it issues certificates.
    #[arg(long, env = "STRAIT_NAMESPACE", default_value = defaults::CONTROLLER_NAMESPACE)]
    pub namespace: String,
    /// Service account the controller runs as (see --namespace).
    #[arg(long, env = "STRAIT_SERVICE_ACCOUNT", default_value = defaults::CONTROLLER_SERVICE_ACCOUNT)]
    pub service_account: String,
    /// OpenTelemetry collector (OTLP/gRPC, e.g. http://otel-collector:4317) for the
    /// controller's own spans: manifest reloads, pushes to proxies, certificates.
    #[arg(long, env = "STRAIT_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Serve the sidecar injector (a mutating admission webhook, HTTPS) here,
    /// e.g. [::]:8443. Its certificate is --webhook-cert/--webhook-key, or
    /// else one the issuer signs for the controller's Service name.
    #[arg(long, env = "STRAIT_WEBHOOK_ADDR", requires = "trust_anchors")]
    pub webhook_addr: Option<SocketAddr>,
    /// PEM certificate chain the webhook presents (e.g. from a mounted Secret).
    #[arg(
        long,
        env = "STRAIT_WEBHOOK_CERT",
        value_name = "FILE",
        requires = "webhook_key"
    )]
    pub webhook_cert: Option<PathBuf>,
    /// PEM private key of --webhook-cert.
    #[arg(
        long,
        env = "STRAIT_WEBHOOK_KEY",
        value_name = "FILE",
        requires = "webhook_cert"
    )]
    pub webhook_key: Option<PathBuf>,
    /// What the webhook does with a pod that asks for the proxy and cannot have it
    /// (a bad annotation): refuse it with the reason, or admit it unmeshed with a
    /// warning.
    #[arg(long, env = "STRAIT_WEBHOOK_FAILURE_POLICY", value_enum, default_value_t = FailurePolicy::Fail)]
    pub webhook_failure_policy: FailurePolicy,
    /// The mesh's trust anchors (PEM): injected proxies are given them.
    #[arg(long, env = "STRAIT_TRUST_ANCHORS", value_name = "FILE")]
    pub trust_anchors: Option<PathBuf>,
    /// The proxy image injected pods run (default: this release's).
    #[arg(long, env = "STRAIT_PROXY_IMAGE", value_name = "IMAGE", value_parser = crate::inject::image)]
    pub proxy_image: Option<String>,
    /// The iptables backend injected pods' init containers write with: the one
    /// the nodes' kube-proxy uses.
    #[arg(long, env = "STRAIT_PROXY_IPTABLES_MODE", value_enum, default_value_t = crate::inject::IptablesMode::Nft)]
    pub proxy_iptables_mode: crate::inject::IptablesMode,

    /// The OpenTelemetry collector (plaintext OTLP/gRPC,
    /// `http://collector:4317`) every injected proxy exports spans to; a pod's
    /// `strait.dev/proxy-otlp-endpoint` overrides it.
    #[arg(long, env = "STRAIT_PROXY_OTLP_ENDPOINT", value_name = "URL", value_parser = crate::inject::otlp_endpoint)]
    pub proxy_otlp_endpoint: Option<String>,
    /// Share of new traces injected proxies record (0.0 to 1.0; callers'
    /// sampled traces are always followed); default the proxy's, 1.0.
    #[arg(long, env = "STRAIT_PROXY_TRACE_SAMPLING", value_name = "RATIO", value_parser = crate::inject::sampling_ratio)]
    pub proxy_trace_sampling: Option<String>,
    /// Injected proxies' access log on their stdout.
    #[arg(long, env = "STRAIT_PROXY_ACCESS_LOG", value_enum)]
    pub proxy_access_log: Option<crate::inject::AccessLog>,
    #[command(flatten)]
    pub proxy_resources: crate::inject::ProxyResources,
    /// This replica's name, recorded in the status writers' Lease (default:
    /// $HOSTNAME, the pod's name, or a random one).
    #[arg(long, env = "STRAIT_POD_NAME", value_parser = pod_name)]
    pub pod_name: Option<String>,
    /// With --kubernetes: how long the status writer's Lease lasts unrenewed;
    /// another replica takes over writing after it.
    #[arg(long, env = "STRAIT_LEASE_DURATION", default_value = "15s", value_parser = parse_lease)]
    pub lease_duration: Duration,
    /// Lifetime of workload certificates (proxies renew at about 70 % of it).
    #[arg(long, env = "STRAIT_CERT_LIFETIME", default_value = defaults::CERT_LIFETIME, value_parser = parse_lifetime)]
    pub cert_lifetime: Duration,
    /// After SIGTERM, how long the controller still serves the injector and
    /// the proxies (not ready, and no longer writing status) before it stops:
    /// the API server and the nodes stop sending it calls meanwhile.
    #[arg(long, env = "STRAIT_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_shutdown_delay)]
    pub shutdown_delay: Duration,
}

fn parse_shutdown_delay(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 5s)"))?;
    // With the drain after it (up to the 15 s request timeout, the
    // injector's 5 s alongside), within the pod's default 30 s grace period.
    if d > Duration::from_secs(8) {
        return Err(
            "at most 8s (with the drain after it, within the pod's 30 s grace period)".into(),
        );
    }
    Ok(d)
}

fn parse_lease(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 15s)"))?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(300) {
        return Err("a lease lasts 1s to 5m".into());
    }
    // The Lease records whole seconds, which followers wait for.
    if d.subsec_nanos() != 0 {
        return Err("a lease lasts whole seconds".into());
    }
    Ok(d)
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 24h, 1h, 10s)"))?;
    // A proxy renews at 65 % of its certificate's life at the soonest, and no
    // sooner than a second after the last; the certificate's end is written
    // in whole seconds, so one issued for less than 3s may end first.
    if d < Duration::from_secs(3) {
        return Err(
            "a certificate must live at least 3s (its proxy renews it at two thirds of its life or so, and no sooner than 1s)".into(),
        );
    }
    if d > defaults::MAX_CERT_LIFETIME {
        return Err(format!(
            "a workload certificate may live at most {}",
            humantime::format_duration(defaults::MAX_CERT_LIFETIME)
        ));
    }
    Ok(d)
}

/// A flag's value that cannot work: the process exits 2, as for flags clap
/// refuses itself.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FlagError(pub String);

/// A running controller's addresses, for tests and the demo.
#[derive(Clone, Debug)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub webhook: Option<SocketAddr>,
}

/// The injector, ready to serve.
struct Webhook {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    settings: Arc<Settings>,
}

/// Where the index comes from.
enum Feed {
    Manifests,
    Kubernetes(kube::Client),
}

pub struct Controller {
    args: ControllerArgs,
    feed: Feed,
    ca: Option<Arc<Issuer>>,
    grpc: TcpListener,
    admin: TcpListener,
    webhook: Option<Webhook>,
    pub bound: Bound,
}

impl Controller {
    pub async fn bind(args: ControllerArgs) -> anyhow::Result<Self> {
        args.proxy_resources.check().map_err(FlagError)?;
        if !strait_api::identity::valid_trust_domain(&args.trust_domain) {
            return Err(FlagError(format!(
                "--trust-domain {:?}: not a trust domain (lower-case letters, digits, '-', '.', '_')",
                args.trust_domain
            ))
            .into());
        }
        for (flag, v) in [
            ("--namespace", &args.namespace),
            ("--service-account", &args.service_account),
        ] {
            if !strait_api::identity::valid_part(v) {
                return Err(FlagError(format!(
                    "{flag} {v:?}: not usable in an identity (letters, digits, '-', '.', '_')"
                ))
                .into());
            }
        }
        let feed = Self::feed(&args).await?;
        for dir in &args.manifests {
            if !dir.is_dir() {
                return Err(
                    FlagError(format!("--manifests {}: not a directory", dir.display())).into(),
                );
            }
        }
        if args.grpc_addr == args.admin_addr && args.grpc_addr.port() != 0 {
            return Err(FlagError(format!(
                "--grpc-addr and --admin-addr both claim {}",
                args.grpc_addr
            ))
            .into());
        }
        let ca = match (&args.issuer_cert, &args.issuer_key) {
            (Some(c), Some(k)) => Some(
                Issuer::load(c, k, args.trust_anchors.as_deref(), args.cert_lifetime)
                    .map_err(|e| FlagError(e.to_string()))?,
            ),
            _ => None,
        };
        // `[::]` (as installed) is both families, or IPv4 where the node has
        // no IPv6: the kubelet probes the pod's first address, either.
        let grpc = listen::bind(args.grpc_addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on --grpc-addr {}: {e}", args.grpc_addr))?;
        let admin = listen::bind(args.admin_addr).map_err(|e| {
            anyhow::anyhow!("cannot listen on --admin-addr {}: {e}", args.admin_addr)
        })?;
        let webhook = match args.webhook_addr {
            Some(addr) => Some(Self::webhook(&args, ca.as_ref(), addr).await?),
            None => None,
        };
        let bound = Bound {
            grpc: grpc.local_addr()?,
            admin: admin.local_addr()?,
            webhook: webhook
                .as_ref()
                .map(|w| w.listener.local_addr())
                .transpose()?,
        };
        Ok(Controller {
            args,
            feed,
            ca,
            grpc,
            admin,
            webhook,
            bound,
        })
    }

    /// --manifests, --kubernetes, or (with neither) Kubernetes when in a pod.
    async fn feed(args: &ControllerArgs) -> anyhow::Result<Feed> {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        // Checked here rather than by clap, which takes an environment
        // variable set to false (`STRAIT_KUBERNETES=false`) as the flag given.
        if args.kubernetes && !args.manifests.is_empty() {
            return Err(FlagError("--manifests and --kubernetes: give one".into()).into());
        }
        if !args.manifests.is_empty() {
            return Ok(Feed::Manifests);
        }
        if !args.kubernetes && !in_cluster {
            return Err(FlagError(
                "say where the mesh is described: --manifests DIR (YAML files on this machine) or --kubernetes (the API server, from in-cluster config or KUBECONFIG)".into(),
            )
            .into());
        }
        let unusable = |e: &dyn std::fmt::Display| {
            FlagError(format!(
                "--kubernetes: no usable Kubernetes configuration (in-cluster, or KUBECONFIG): {e}"
            ))
        };
        let mut config = kube::Config::infer().await.map_err(|e| unusable(&e))?;
        // An API server gone without a word (its node lost) would hold a
        // list, or a watch re-made on its pooled connection, for as long as
        // the kernel retransmits (some 15 minutes), the index frozen
        // meanwhile. Watches end within `defaults::WATCH_TIMEOUT`, so no
        // answer goes quieter than this on a server that is there.
        config.read_timeout = Some(defaults::API_READ_TIMEOUT);
        // Counted from the request, not from when a pooled connection was
        // last read.
        config.reset_reader_on_write = true;
        let client = kube::Client::try_from(config).map_err(|e| unusable(&e))?;
        Ok(Feed::Kubernetes(client))
    }

    async fn webhook(
        args: &ControllerArgs,
        ca: Option<&Arc<Issuer>>,
        addr: SocketAddr,
    ) -> anyhow::Result<Webhook> {
        let anchors_file = args.trust_anchors.as_ref().ok_or_else(|| {
            FlagError(
                "--webhook-addr needs --trust-anchors (injected proxies are given them)".into(),
            )
        })?;
        let anchors =
            crate::inject::read_anchors("--trust-anchors", anchors_file).map_err(FlagError)?;
        // The proxies it injects ask this controller for their certificates,
        // over TLS: without an issuer none would ever be ready, and their
        // pods' apps never start.
        let ca = ca.ok_or_else(|| {
            FlagError(
                "--webhook-addr needs --issuer-cert/--issuer-key: the proxies it injects get their certificates from this controller (--webhook-cert/--webhook-key are the webhook's own)".into(),
            )
        })?;
        let acceptor = match (&args.webhook_cert, &args.webhook_key) {
            (Some(c), Some(k)) => {
                webhook::acceptor_from_files(c, k).map_err(|e| FlagError(format!("{e:#}")))?
            }
            _ => serving::webhook_acceptor(
                ca.clone(),
                ServingName::new(&args.trust_domain, &args.namespace, &args.service_account),
            )?,
        };
        let mut settings = Settings::new(anchors, &args.trust_domain, args.proxy_image.as_deref());
        settings.iptables_mode = args.proxy_iptables_mode;
        settings.telemetry = crate::inject::Telemetry {
            proxy_otlp_endpoint: args.proxy_otlp_endpoint.clone(),
            proxy_trace_sampling: args.proxy_trace_sampling.clone(),
            proxy_access_log: args.proxy_access_log,
        };
        settings.proxy_resources = args.proxy_resources.clone();
        if let Some(why) = settings.earlier_proxy() {
            warn!("{why}");
        }
        settings.controller_at(
            &args.namespace,
            &args.service_account,
            args.grpc_addr.port(),
        );
        let listener = listen::bind(addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on --webhook-addr {addr}: {e}"))?;
        Ok(Webhook {
            listener,
            acceptor,
            settings: Arc::new(settings),
        })
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let metrics = Metrics::issuing_until(self.ca.as_ref().map(|i| unix_secs(&i.current())));
        if let Some(issuer) = &self.ca {
            let m = metrics.clone();
            tokio::spawn(crate::identity::issuer::reload_every(
                Arc::downgrade(issuer),
                defaults::ISSUER_RELOAD,
                move |ca| m.issuer_expires_at(unix_secs(ca)),
            ));
        }
        if let Some(endpoint) = &self.args.otlp_endpoint {
            let exporter = strait_otel::Exporter::start(
                strait_otel::ExportConfig {
                    endpoint: endpoint.clone(),
                    // Every reload, push and certificate: a handful a minute.
                    sampling: 1.0,
                    service_name: "strait-controller".into(),
                    resource: vec![
                        opentelemetry::KeyValue::new(
                            "k8s.namespace.name",
                            self.args.namespace.clone(),
                        ),
                        opentelemetry::KeyValue::new("strait.version", env!("CARGO_PKG_VERSION")),
                    ],
                },
                crate::spans::SCOPE,
                metrics.trace_spans_dropped.clone(),
            )
            .map_err(|e| FlagError(e.to_string()))?;
            exporter.install_global();
            info!(%endpoint, "exporting spans");
        }
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::empty(&self.args.trust_domain)));
        let (ready_tx, ready_rx) = watch::channel(false);

        let (clean_tx, mut clean_rx) = watch::channel(false);
        // Cancelled at SIGTERM: the status writer's election gives its lease
        // up (rather than leave the other replicas to wait out its duration),
        // and the injector keeps no connection alive.
        let stopping = tokio_util::sync::CancellationToken::new();
        let mut election = None;
        // What the controller cannot serve without: should one end unasked (a
        // panic), it stops, and its restart lists everything anew, rather
        // than serving the mesh's state as it was for as long as it runs.
        let mut essential = Essential::new();
        let tokens = match &self.feed {
            Feed::Manifests => {
                let mut source = ManifestSource::new(
                    self.args.manifests.clone(),
                    &self.args.trust_domain,
                    metrics.clone(),
                );
                // The first full read happens before serving, so no proxy sees an empty mesh.
                if let Some(s) = source.scan() {
                    metrics.observe_snapshot(&s);
                    info!(
                        services = s.services.len(),
                        endpoints = s.endpoint_count(),
                        pods = s.pods.len(),
                        "index loaded"
                    );
                    snap_tx.send_replace(Arc::new(s));
                }
                // A directory not filled yet (a git-sync's first sync, a
                // ConfigMap still to come) serves an empty mesh: said, since
                // every pod then gets the open default policy.
                if source.file_count() == 0 {
                    warn!(dirs = ?self.args.manifests, "no manifest files found: serving an empty mesh until some are written");
                }
                clean_tx.send_replace(source.is_clean());
                essential.spawn("the manifest reader", source.run(snap_tx, clean_tx));
                Verifier::manifests(snap_rx.clone())
            }
            Feed::Kubernetes(client) => {
                let (statuses_tx, statuses_rx) = watch::channel(Statuses::default());
                let source = KubernetesSource::new(
                    client.clone(),
                    &self.args.trust_domain,
                    metrics.clone(),
                    statuses_tx,
                );
                essential.spawn("the API server watches", source.run(snap_tx, clean_tx));
                let identity = self
                    .args
                    .pod_name
                    .clone()
                    .or_else(|| std::env::var("HOSTNAME").ok())
                    // Random rather than the pid, which is 1 in every
                    // container: two replicas of one name would both take
                    // the lease for theirs, and both write.
                    .unwrap_or_else(|| format!("strait-controller-{:016x}", rand::random::<u64>()));
                let (leader_tx, leader_rx) = watch::channel(false);
                election = Some(tokio::spawn(lease::elect(
                    client.clone(),
                    LeaseConfig {
                        namespace: self.args.namespace.clone(),
                        identity: identity.clone(),
                        duration: self.args.lease_duration,
                    },
                    clean_rx.clone(),
                    leader_tx,
                    stopping.clone(),
                )));
                essential.spawn(
                    "the status writer",
                    status::write(
                        client.clone(),
                        identity,
                        statuses_rx,
                        snap_rx.clone(),
                        leader_rx,
                    ),
                );
                Verifier::Kubernetes(Box::new(TokenReviewer::new(client.clone())))
            }
        };

        let views = Views::new(snap_rx.clone(), metrics.clone());
        essential.spawn("the discovery views", views.clone().run());
        essential.spawn(
            "the admin server",
            admin::serve(self.admin, metrics.clone(), ready_rx),
        );
        // From SIGTERM the injector keeps no connection alive (reviews in
        // flight answered, then closed), so the API server's next calls open
        // new ones, which reach a replica that stays once this pod has left
        // the Service; after the shutdown delay it stops, as the gRPC server.
        let stop_webhook = tokio_util::sync::CancellationToken::new();
        let mut injector = None;
        if let Some(w) = self.webhook {
            info!(addr = %self.bound.webhook.map(|a| a.to_string()).unwrap_or_default(), "serving the sidecar injector");
            let serving = webhook::serve(
                w.listener,
                w.acceptor,
                w.settings,
                self.args.webhook_failure_policy,
                stopping.clone(),
                stop_webhook.clone(),
            );
            // Awaited at the end, for its drain; essential until then: the
            // webhook fails closed, and a controller without it would refuse
            // every pod of the labelled namespaces while it says ready.
            let (up, gone) = tokio::sync::oneshot::channel::<()>();
            injector = Some(tokio::spawn(async move {
                let _up = up;
                serving.await;
            }));
            essential.spawn("the admission webhook", async move {
                let _ = gone.await;
            });
        }
        // A controller that starts on broken manifests has no last good state for
        // them: a policy among them would be missing, and the workloads it guards
        // open. It serves nobody (and is not ready) until they load; proxies keep
        // what they knew meanwhile, from the controller this one replaces.
        let mut shutdown = Box::pin(shutdown);
        if !*clean_rx.borrow() {
            match self.feed {
                Feed::Manifests => warn!(
                    "some manifests were rejected (see above); not serving until every file loads"
                ),
                Feed::Kubernetes(_) => info!("waiting for the initial lists from the API server"),
            }
            tokio::select! {
                r = clean_rx.wait_for(|c| *c) => if r.is_err() {
                    anyhow::bail!("the source of the mesh's state stopped");
                },
                ended = essential.ended() => return Err(anyhow::Error::new(ended)),
                _ = &mut shutdown => {
                    stopping.cancel();
                    if let Some(e) = election {
                        let _ = tokio::time::timeout(defaults::LEASE_RELEASE_TIMEOUT, e).await;
                    }
                    return Ok(());
                }
            }
            info!("every manifest loads now");
        }
        ready_tx.send_replace(true);
        info!(grpc = %self.bound.grpc, admin = %self.bound.admin, manifests = ?self.args.manifests, issues_certificates = self.ca.is_some(), "controller ready");

        let auth = self.ca.as_ref().map(|ca| {
            Authenticator::new(ca.clone(), snap_rx.clone(), tokens.clone(), metrics.clone())
        });
        // Watches and connections are bounded per source address, so one pod
        // cannot hold what every other proxy needs.
        let watches = Watches::new(metrics.clone());
        let ending = watches.clone();
        let unanswered = UnansweredLayer::new(
            PerSource::sparing_loopback(defaults::GRPC_UNANSWERED_PER_SOURCE),
            metrics.clone(),
        );
        let router = tonic::transport::Server::builder()
            // Notice proxies that vanished without closing their streams.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // Bounded per connection: streams, and the size of what a client
            // sends, read or not yet.
            .max_concurrent_streams(Some(defaults::GRPC_MAX_CONCURRENT_STREAMS))
            .http2_max_local_error_reset_streams(Some(defaults::GRPC_MAX_LOCAL_ERROR_RESETS))
            .http2_max_pending_accept_reset_streams(Some(defaults::GRPC_MAX_PENDING_ACCEPT_RESETS))
            .http2_max_header_list_size(defaults::GRPC_MAX_HEADER_LIST_BYTES)
            .initial_stream_window_size(defaults::GRPC_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(defaults::GRPC_CONNECTION_WINDOW_BYTES)
            // Bounded in time and per source address: requests still waiting
            // for an answer, which hold memory before anyone is authenticated.
            .timeout(defaults::GRPC_REQUEST_TIMEOUT)
            .layer(unanswered)
            .add_service(
                DiscoveryServer::new(DiscoveryService::new(views, watches.clone(), auth.clone()))
                    .max_decoding_message_size(defaults::GRPC_MAX_MESSAGE_BYTES),
            )
            .add_service(
                InboundPolicyServer::new(InboundPolicyService::new(
                    snap_rx.clone(),
                    watches,
                    auth,
                    matches!(self.feed, Feed::Kubernetes(_)),
                ))
                .max_decoding_message_size(defaults::GRPC_MAX_MESSAGE_BYTES),
            )
            .add_service(
                IdentityServer::new(IdentityService::new(
                    self.ca.clone(),
                    snap_rx,
                    tokens,
                    metrics.clone(),
                ))
                .max_decoding_message_size(defaults::GRPC_MAX_MESSAGE_BYTES),
            );
        // Issuing certificates means proxies send tokens: the port is TLS-only then.
        let tls = match &self.ca {
            Some(ca) => {
                let name = ServingName::new(
                    &self.args.trust_domain,
                    &self.args.namespace,
                    &self.args.service_account,
                );
                Some(serving::acceptor(ca.clone(), name)?)
            }
            None => None,
        };
        let per_source = PerSource::sparing_loopback(defaults::GRPC_CONNECTIONS_PER_SOURCE);
        let incoming = serving::incoming(self.grpc, tls, per_source, metrics);
        // Stopping ends the watches, which never end on their own: their
        // connections then close, and the proxies re-watch from a replica
        // that stays, rather than this one being killed mid-stream.
        //
        // First the controller says it is not ready and gives its status
        // lease up, then serves on for the delay: a terminating pod leaves
        // its Service's endpoints a moment after, and the fail-closed
        // webhook's calls (and proxies' reconnections) still arrive here
        // until then.
        let delay = self.args.shutdown_delay;
        let signalled = stopping.clone();
        let stop_injector = stop_webhook.clone();
        let draining = tokio_util::sync::CancellationToken::new();
        let drain_started = draining.clone();
        let failed = Arc::new(std::sync::OnceLock::new());
        let failure = failed.clone();
        // Handed back, so that they run on while the connections drain.
        let (keep_tx, _kept) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            tokio::select! {
                biased;
                () = &mut shutdown => {}
                ended = essential.ended() => {
                    error!(task = %ended, "the controller cannot serve without it; stopping");
                    let _ = failure.set(ended);
                }
            }
            let _ = keep_tx.send(essential);
            ready_tx.send_replace(false);
            signalled.cancel();
            info!(delay = ?delay, "stopping: serving on, not ready, for the shutdown delay");
            tokio::time::sleep(delay).await;
            ending.end_all();
            stop_injector.cancel();
            drain_started.cancel();
        };
        let served = router.serve_with_incoming_shutdown(incoming, shutdown);
        // The graceful close waits for every stream to end, and one whose
        // client reads nothing never does: bounded, so that the controller
        // exits within its grace period rather than being killed.
        let drain_deadline = async {
            draining.cancelled().await;
            tokio::time::sleep(defaults::GRPC_DRAIN_TIMEOUT).await;
        };
        let served = tokio::select! {
            served = served => served,
            () = drain_deadline => {
                warn!(after = ?defaults::GRPC_DRAIN_TIMEOUT, "gRPC connections still open after the watches ended (a client reading nothing); cut");
                Ok(())
            }
        };
        stopping.cancel();
        stop_webhook.cancel();
        if let Some(e) = election {
            let _ = tokio::time::timeout(defaults::LEASE_RELEASE_TIMEOUT, e).await;
        }
        if let Some(i) = injector {
            let _ = tokio::time::timeout(defaults::WEBHOOK_DRAIN_TIMEOUT, i).await;
        }
        served?;
        match failed.get() {
            Some(ended) => Err(anyhow::Error::new(*ended).context("stopped without being asked")),
            None => Ok(()),
        }
    }
}

/// When the issuer expires, in Unix seconds.
fn unix_secs(ca: &crate::identity::ca::Ca) -> i64 {
    let at = ca.issuer_not_after().duration_since(std::time::UNIX_EPOCH);
    at.map_or(0, |d| d.as_secs() as i64)
}

/// `--pod-name`: the Lease's holder. Empty would be every such replica's
/// name at once, and each would take the Lease as its own: two writers.
fn pod_name(v: &str) -> Result<String, String> {
    if v.trim().is_empty() {
        return Err("empty: give the pod's name (the chart sets it from metadata.name), or leave it unset for $HOSTNAME".into());
    }
    Ok(v.to_string())
}
