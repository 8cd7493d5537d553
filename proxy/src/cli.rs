//! Command line: every flag is also an environment variable (`--inbound-addr` is
//! `STRAIT_PROXY_INBOUND_ADDR`); a bad value exits non-zero naming the flag.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::addr::{PortSet, Upstream};
use crate::defaults;

#[derive(Debug, Parser)]
#[command(
    name = "strait-proxy",
    version,
    about = "strait's sidecar proxy: mTLS, retries, timeouts and load balancing for every pod",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no subcommand is given).
    Run(Box<Config>),
    /// Write the iptables rules that redirect this pod's TCP through its proxy.
    Init(crate::init::InitArgs),
}

/// What the command line asks for.
pub enum Action {
    Run(Box<Config>),
    Init(crate::init::InitArgs),
}

impl Cli {
    pub fn into_action(self) -> Action {
        match self.command {
            Some(Command::Run(c)) => Action::Run(c),
            Some(Command::Init(a)) => Action::Init(a),
            None => Action::Run(Box::new(self.run)),
        }
    }
}

/// The proxy's running configuration; `/config` on the admin server shows it.
#[derive(Clone, Debug, Args, Serialize)]
pub struct Config {
    /// Listener for connections from other proxies and meshed-in clients.
    #[arg(long, env = "STRAIT_PROXY_INBOUND_ADDR", default_value = defaults::INBOUND_ADDR)]
    pub inbound_addr: SocketAddr,

    /// Listener for the app's outgoing connections (iptables redirects them here).
    #[arg(long, env = "STRAIT_PROXY_OUTBOUND_ADDR", default_value = defaults::OUTBOUND_ADDR)]
    pub outbound_addr: SocketAddr,

    /// Admin server: /live, /ready, /metrics, /config, /log-level, /shutdown (changes
    /// of state answer loopback callers only).
    #[arg(long, env = "STRAIT_PROXY_ADMIN_ADDR", default_value = defaults::ADMIN_ADDR)]
    pub admin_addr: SocketAddr,

    /// LOCAL=DEST: listen on LOCAL and send every connection to DEST
    /// (e.g. 127.0.0.1:15432=db.default.svc.cluster.local:5432). Repeatable; in the
    /// environment, comma-separated.
    #[arg(
        long = "upstream",
        env = "STRAIT_PROXY_UPSTREAM",
        value_name = "LOCAL=DEST",
        value_delimiter = ','
    )]
    #[serde(serialize_with = "ser_display_vec")]
    pub upstreams: Vec<Upstream>,

    /// The address the inbound side reaches its app on (the app's port comes with
    /// each connection).
    #[arg(long, env = "STRAIT_PROXY_APP_IP", default_value = "127.0.0.1")]
    pub app_ip: std::net::IpAddr,

    /// The control plane's gRPC address (e.g. https://strait-controller.strait-system.svc:8090).
    /// Without it, every destination is passed through. Must be https:// with
    /// --trust-anchors: the token and discovery answers never travel in the clear.
    #[arg(long, env = "STRAIT_PROXY_CONTROL_PLANE", value_name = "URL")]
    #[serde(serialize_with = "ser_url")]
    pub control_plane: Option<String>,

    /// The identity the control plane must present over https:// (default:
    /// spiffe://<trust-domain>/ns/strait-system/sa/strait-controller).
    #[arg(
        long,
        env = "STRAIT_PROXY_CONTROL_PLANE_IDENTITY",
        value_name = "SPIFFE-ID"
    )]
    pub control_plane_identity: Option<String>,

    /// The namespace of this proxy's workload (short destination names resolve in it).
    #[arg(long, env = "STRAIT_PROXY_NAMESPACE", default_value = defaults::NAMESPACE)]
    pub namespace: String,

    /// The name of this proxy's pod (defaults to $HOSTNAME, as in a pod).
    #[arg(long, env = "STRAIT_PROXY_POD_NAME")]
    pub pod_name: Option<String>,

    /// Ports that skip protocol detection and are carried as opaque TCP
    /// (comma-separated, ranges allowed; empty for none).
    #[arg(long, env = "STRAIT_PROXY_OPAQUE_PORTS", default_value = defaults::OPAQUE_PORTS)]
    #[serde(serialize_with = "ser_display")]
    pub opaque_ports: PortSet,

    /// This workload's own ports carried as opaque TCP inbound, in place of
    /// --opaque-ports there (the injector's from `strait.dev/opaque-ports`):
    /// what the pod serves, not the port numbers it calls elsewhere.
    #[arg(long, env = "STRAIT_PROXY_INBOUND_OPAQUE_PORTS")]
    #[serde(serialize_with = "ser_opt_display")]
    pub inbound_opaque_ports: Option<PortSet>,

    /// App ports the admin server reports on at `/probe/tcp/PORT`: 200 when the app
    /// accepts a connection there, 503 when not. The injector points the app's
    /// `tcpSocket` probes there, since a probe of the port itself would reach this
    /// proxy, which accepts whether or not the app listens.
    #[arg(long, env = "STRAIT_PROXY_TCP_PROBE_PORTS", default_value = "")]
    #[serde(serialize_with = "ser_display")]
    pub tcp_probe_ports: PortSet,

    /// How long to wait for a client's first bytes before connecting onward, so that
    /// a server that speaks first can (its greeting comes this much later).
    #[arg(long, env = "STRAIT_PROXY_DETECT_TIMEOUT", default_value = "300ms", value_parser = parse_timeout)]
    #[serde(serialize_with = "ser_duration")]
    pub detect_timeout: Duration,

    /// Timeout of a TCP connect to an upstream.
    #[arg(long, env = "STRAIT_PROXY_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_timeout)]
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,

    /// Request bodies up to this many bytes are kept while sent so that a retry can
    /// send them again; larger bodies stream through and are never replayed.
    #[arg(
        long,
        env = "STRAIT_PROXY_MAX_REPLAY_BODY_BYTES",
        default_value = "65536"
    )]
    pub max_replay_body_bytes: usize,

    /// Time a client has to finish sending an HTTP/1 request head (answered with 408).
    #[arg(long, env = "STRAIT_PROXY_HTTP_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    #[serde(serialize_with = "ser_duration")]
    pub http_header_read_timeout: Duration,

    /// Time a request body may go without a byte from the client before the
    /// request is cut with 408 (an upload that stalls holds the upstream too);
    /// also how long an answer may wait on a client that reads none of it
    /// (HTTP/1 or HTTP/2) before the connection is closed.
    #[arg(long, env = "STRAIT_PROXY_HTTP_BODY_READ_TIMEOUT", default_value = "30s", value_parser = parse_timeout)]
    #[serde(serialize_with = "ser_duration")]
    pub http_body_read_timeout: Duration,

    /// An idle HTTP/1 keep-alive connection is closed after this long, and an
    /// HTTP/2 connection with no stream gets GOAWAY.
    #[arg(long, env = "STRAIT_PROXY_HTTP_IDLE_TIMEOUT", default_value = "120s", value_parser = parse_timeout)]
    #[serde(serialize_with = "ser_duration")]
    pub http_idle_timeout: Duration,

    /// An opaque TCP stream with no traffic either way is closed after this long.
    #[arg(long, env = "STRAIT_PROXY_TCP_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_timeout)]
    #[serde(serialize_with = "ser_duration")]
    pub tcp_idle_timeout: Duration,

    /// Connections open at once per listener; more get 503 or are closed.
    /// Default: 20,000, or fewer where the container's memory limit (its
    /// cgroup's) would not hold that many.
    #[arg(long, env = "STRAIT_PROXY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Requests in flight at once in each direction (inbound, outbound); more
    /// are answered 503 at once (shed) rather than queued.
    #[arg(long, env = "STRAIT_PROXY_MAX_IN_FLIGHT_REQUESTS", default_value_t = defaults::MAX_IN_FLIGHT_REQUESTS)]
    pub max_in_flight_requests: usize,

    /// Destinations whose discovery answers are watched at once (and answers
    /// kept of those dropped); beyond it the least recently used is dropped.
    /// Raise it for an app that dials more distinct addresses than this in
    /// turn (an ingress controller balancing over many pods itself).
    #[arg(long, env = "STRAIT_PROXY_MAX_DISCOVERY_WATCHES", default_value_t = defaults::MAX_DISCOVERY_WATCHES)]
    pub max_discovery_watches: usize,

    /// Networks whose addresses discovery is asked about (comma-separated
    /// CIDRs; every address by default); a connection to an address outside
    /// them passes through at once, unmeshed. Narrowed, they must hold the
    /// cluster's pod, Service and node ranges. Link-local addresses never
    /// are asked about.
    #[arg(
        long,
        env = "STRAIT_PROXY_DISCOVERY_NETWORKS",
        value_delimiter = ',',
        value_name = "CIDR",
        default_value = defaults::DISCOVERY_NETWORKS
    )]
    #[serde(serialize_with = "ser_display_vec")]
    pub discovery_networks: Vec<crate::addr::IpNet>,

    /// Inbound connections one address may hold at once until they prove a
    /// mesh identity; a verified peer's are not counted. Default: a quarter of
    /// --max-connections.
    #[arg(long, env = "STRAIT_PROXY_INBOUND_MAX_CONNECTIONS_PER_SOURCE")]
    pub inbound_max_connections_per_source: Option<usize>,

    /// On SIGTERM or POST /shutdown: how long in-flight requests may take to finish.
    #[arg(long, env = "STRAIT_PROXY_SHUTDOWN_GRACE_PERIOD", default_value = "25s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_grace_period: Duration,

    /// The service account this workload runs as: its identity is
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
    #[arg(long, env = "STRAIT_PROXY_SERVICE_ACCOUNT", default_value = defaults::SERVICE_ACCOUNT)]
    pub service_account: String,

    /// Trust domain of workload identities.
    #[arg(long, env = "STRAIT_PROXY_TRUST_DOMAIN", default_value = defaults::TRUST_DOMAIN)]
    pub trust_domain: String,

    /// PEM bundle of the trust anchors peers' certificates must chain to (several
    /// anchors may be listed, to rotate them). Enables mTLS between proxies; needs
    /// --token-file and --control-plane.
    #[arg(long, env = "STRAIT_PROXY_TRUST_ANCHORS", value_name = "FILE")]
    pub trust_anchors: Option<std::path::PathBuf>,

    /// The trust anchors as PEM text rather than a file (the injector sets this:
    /// a pod in any namespace gets them without a ConfigMap of its own).
    #[arg(
        long,
        env = "STRAIT_PROXY_TRUST_ANCHORS_PEM",
        value_name = "PEM",
        conflicts_with = "trust_anchors",
        hide_env_values = true
    )]
    #[serde(skip)]
    pub trust_anchors_pem: Option<String>,

    /// File holding the token that proves this workload's service account to the
    /// control plane's identity service (re-read at every renewal).
    #[arg(long, env = "STRAIT_PROXY_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,

    /// Worker threads. A sidecar shares its pod's CPU: one thread avoids cross-thread
    /// wake-ups on every request; more only pay off under a CPU limit above one core.
    #[arg(long, env = "STRAIT_PROXY_THREADS", default_value_t = defaults::THREADS, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,

    /// Log filter, RUST_LOG syntax (e.g. "info,strait_proxy=debug"); changeable at
    /// run time with PUT /log-level.
    #[arg(long, env = "STRAIT_PROXY_LOG_LEVEL", default_value = "info", value_parser = parse_log_filter)]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "STRAIT_PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// OpenTelemetry collector (OTLP/gRPC, e.g. http://otel-collector:4317): a client
    /// span for every sampled outbound request, a server span for every inbound one.
    /// Without it, no span is made.
    #[arg(long, env = "STRAIT_PROXY_OTLP_ENDPOINT", value_name = "URL")]
    #[serde(serialize_with = "ser_url")]
    pub otlp_endpoint: Option<String>,

    /// Share of new traces recorded (0.0 to 1.0). A request whose caller sent a
    /// sampled trace context is always recorded, one whose caller did not sample
    /// never is.
    #[arg(long, env = "STRAIT_PROXY_TRACE_SAMPLING", default_value_t = 1.0, value_parser = parse_ratio)]
    pub trace_sampling: f64,

    /// `service.name` of this proxy's spans; default: the service account.
    #[arg(long, env = "STRAIT_PROXY_SERVICE_NAME")]
    pub service_name: Option<String>,

    /// One line per HTTP request (method, authority, path, status, duration, route,
    /// peer identity, trace id) on stdout, as text or JSON; off by default.
    #[arg(long, env = "STRAIT_PROXY_ACCESS_LOG", value_enum)]
    pub access_log: Option<LogFormat>,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio from 0.0 to 1.0")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// The ports carried as opaque TCP inbound.
    pub fn inbound_opaque_ports(&self) -> &PortSet {
        self.inbound_opaque_ports
            .as_ref()
            .unwrap_or(&self.opaque_ports)
    }

    /// Connections open at once per listener (`--max-connections`).
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or(defaults::MAX_CONNECTIONS)
    }

    /// The defaults, with every listener on an ephemeral loopback port: for tests
    /// and embedding.
    pub fn loopback() -> Self {
        let cli = Cli::parse_from([
            "strait-proxy",
            "--inbound-addr=127.0.0.1:0",
            "--outbound-addr=127.0.0.1:0",
            "--admin-addr=127.0.0.1:0",
        ]);
        match cli.into_action() {
            Action::Run(c) => *c,
            Action::Init(_) => unreachable!("no subcommand was given"),
        }
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 300ms, 10s, 1h)"))?;
    // Timers add these to "now": an absurd value must be refused here, not
    // overflow a deadline later.
    if d > defaults::MAX_DURATION_FLAG {
        return Err(format!(
            "at most {}",
            humantime::format_duration(defaults::MAX_DURATION_FLAG)
        ));
    }
    Ok(d)
}

/// A timeout: a duration, and not zero, which would end at once every
/// connection, request or stream it applies to.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0 (a timeout of 0 would end everything at once)".into());
    }
    Ok(d)
}

fn parse_log_filter(s: &str) -> Result<String, String> {
    crate::telemetry::log::parse(s).map(|_| s.to_string())
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

fn ser_opt_display<T: std::fmt::Display, S: serde::Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&v.to_string()),
        None => s.serialize_none(),
    }
}

/// A URL as `/config` shows it: credentials written into it
/// (`user:password@`) are replaced, since the admin port answers other pods
/// (the kubelet's probes, Prometheus).
fn ser_url<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&without_userinfo(u)),
        None => s.serialize_none(),
    }
}

/// A URL as `/config` shows it: without its userinfo or its query (an API
/// key in `?api_key=`), either of which may be a credential.
fn without_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let mut shown: std::borrow::Cow<'_, str> = match url[start..end].rfind('@') {
        Some(at) => format!("{}redacted@{}", &url[..start], &url[start + at + 1..]).into(),
        None => url.into(),
    };
    if let Some(q) = shown.find('?') {
        let fragment = shown[q..].find('#').map(|f| q + f);
        let rest = fragment.map_or(String::new(), |f| shown[f..].to_string());
        shown = format!("{}?redacted{rest}", &shown[..q]).into();
    }
    shown
}

fn ser_display_vec<T: std::fmt::Display, S: serde::Serializer>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(ToString::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_shows_urls_without_their_credentials() {
        for (url, shown) in [
            ("https://strait:8090", "https://strait:8090"),
            ("http://otel:4317/", "http://otel:4317/"),
            (
                "https://u:p%40ss@strait:8090/x",
                "https://redacted@strait:8090/x",
            ),
            ("http://tok@en@otel:4317", "http://redacted@otel:4317"),
            ("http://otel:4317/a@b", "http://otel:4317/a@b"),
            ("u:p@otel:4317", "redacted@otel:4317"),
            (
                "http://otel:4317/?api_key=s3cr3t",
                "http://otel:4317/?redacted",
            ),
            (
                "http://u:p@otel:4317?k=v#frag",
                "http://redacted@otel:4317?redacted#frag",
            ),
        ] {
            assert_eq!(without_userinfo(url), shown, "{url}");
        }
        let mut c = Config::loopback();
        c.control_plane = Some("https://user:secret@strait:8090".into());
        c.otlp_endpoint = Some("http://key@otel:4317".into());
        let shown = serde_json::to_string(&c).unwrap();
        assert!(
            !shown.contains("secret") && !shown.contains("key@"),
            "{shown}"
        );
        assert!(shown.contains("https://redacted@strait:8090"), "{shown}");
    }

    fn config(cli: Cli) -> Config {
        match cli.into_action() {
            Action::Run(c) => *c,
            Action::Init(_) => panic!("not a run command line"),
        }
    }

    impl Cli {
        fn into_config_for_test(self) -> Config {
            config(self)
        }
    }

    #[test]
    fn defaults_match_the_documented_ports() {
        let c = Cli::parse_from(["strait-proxy"]).into_config_for_test();
        assert_eq!(c.inbound_addr.to_string(), "[::]:4143");
        assert_eq!(c.outbound_addr.to_string(), "127.0.0.1:4140");
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:4191");
        assert!(c.opaque_ports.contains(5432) && c.opaque_ports.contains(6379));
        assert!(
            c.opaque_ports.contains(2181),
            "ZooKeeper's bare four-letter words"
        );
        assert_eq!(c.inbound_opaque_ports(), &c.opaque_ports);
        // The list the controller reckons callers carry as TCP.
        let listed: Vec<String> = strait_api::DEFAULT_OPAQUE_PORTS
            .iter()
            .map(u16::to_string)
            .collect();
        assert_eq!(defaults::OPAQUE_PORTS, listed.join(","));
        assert_eq!(c.detect_timeout, defaults::DETECT_TIMEOUT);
        assert_eq!(c.shutdown_grace_period, defaults::SHUTDOWN_GRACE_PERIOD);
        assert_eq!(
            c.http_header_read_timeout,
            defaults::HTTP_HEADER_READ_TIMEOUT
        );
        assert_eq!(c.http_idle_timeout, defaults::HTTP_IDLE_TIMEOUT);
        assert_eq!(c.http_body_read_timeout, defaults::HTTP_BODY_READ_TIMEOUT);
        assert_eq!(c.tcp_idle_timeout, defaults::TCP_IDLE_TIMEOUT);
        assert_eq!(c.connect_timeout, defaults::CONNECT_TIMEOUT);
        assert_eq!(c.max_replay_body_bytes, defaults::MAX_REPLAY_BODY_BYTES);
    }

    #[test]
    fn run_subcommand_and_repeated_upstreams() {
        let c = Cli::parse_from([
            "strait-proxy",
            "run",
            "--upstream",
            "127.0.0.1:1=a.b:80",
            "--upstream=127.0.0.1:2=127.0.0.1:81",
            "--opaque-ports=",
        ])
        .into_config_for_test();
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.opaque_ports, PortSet::default());
    }

    #[test]
    fn a_bad_value_names_the_flag() {
        let err = Cli::try_parse_from(["strait-proxy", "--inbound-addr", "nope"]).unwrap_err();
        assert!(err.to_string().contains("--inbound-addr"), "{err}");
        let err = Cli::try_parse_from(["strait-proxy", "--detect-timeout", "soon"]).unwrap_err();
        assert!(err.to_string().contains("--detect-timeout"), "{err}");
        let err = Cli::try_parse_from(["strait-proxy", "--upstream", "x"]).unwrap_err();
        assert!(err.to_string().contains("--upstream"), "{err}");
        let err = Cli::try_parse_from(["strait-proxy", "--log-level", "a=b=c"]).unwrap_err();
        assert!(err.to_string().contains("--log-level"), "{err}");
        let err =
            Cli::try_parse_from(["strait-proxy", "--tcp-idle-timeout", "1000000000y"]).unwrap_err();
        assert!(err.to_string().contains("--tcp-idle-timeout"), "{err}");
    }

    /// A timeout of 0 would close every stream or fail every connect at
    /// once: refused, naming the flag. A grace period of 0 means stop now.
    #[test]
    fn a_timeout_of_zero_is_refused() {
        for flag in [
            "--detect-timeout",
            "--connect-timeout",
            "--http-header-read-timeout",
            "--http-body-read-timeout",
            "--http-idle-timeout",
            "--tcp-idle-timeout",
        ] {
            let err = Cli::try_parse_from(["strait-proxy", flag, "0s"]).unwrap_err();
            assert!(err.to_string().contains(flag), "{err}");
            assert!(err.to_string().contains("more than 0"), "{err}");
        }
        let c = Cli::parse_from(["strait-proxy", "--shutdown-grace-period", "0s"])
            .into_config_for_test();
        assert!(c.shutdown_grace_period.is_zero());
    }
}
