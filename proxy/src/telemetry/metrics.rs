//! Prometheus metrics (prometheus-client), registered once and shared by every
//! listener and layer.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::retain::Retained;
use crate::defaults::{METRICS_PREFIX, METRICS_RETAIN_IDLE};
use crate::http::grpc;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// The proxy's own identity: one series, once it has a certificate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub direction: Direction,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub direction: Direction,
    pub status_class: &'static str,
}

/// An inbound authorization decision, by the verified identity of the peer
/// ("unauthenticated" for plaintext).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub peer: String,
    pub protocol: &'static str,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub direction: Direction,
    pub reason: &'static str,
}

/// A route of a Service: names from configuration, so the label set is bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub service: String,
    pub route: String,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatusLabels {
    pub service: String,
    pub route: String,
    pub rule: String,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReasonLabels {
    pub service: String,
    pub route: String,
    pub rule: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteBackendLabels {
    pub service: String,
    pub route: String,
    pub rule: String,
    pub backend: String,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub service: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteBackendOnlyLabels {
    pub service: String,
    pub route: String,
    pub rule: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The calling proxy's verified identity, or `unauthenticated`.
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerStatusLabels {
    pub peer: String,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub direction: Direction,
    pub grpc_status: grpc::Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerGrpcLabels {
    pub peer: String,
    pub grpc_status: grpc::Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteGrpcLabels {
    pub service: String,
    pub route: String,
    pub rule: String,
    pub grpc_status: grpc::Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteBackendGrpcLabels {
    pub service: String,
    pub route: String,
    pub rule: String,
    pub backend: String,
    pub grpc_status: grpc::Label,
}

/// The `peer` label of a caller.
fn peer_label(peer: Option<&crate::identity::Identity>) -> String {
    peer.map_or_else(|| "unauthenticated".to_string(), |p| p.to_string())
}

fn peer_status(peer: &str, status_class: &'static str) -> PeerStatusLabels {
    PeerStatusLabels {
        peer: peer.to_string(),
        status_class,
    }
}

fn peer_grpc(peer: &str, grpc_status: grpc::Label) -> PeerGrpcLabels {
    PeerGrpcLabels {
        peer: peer.to_string(),
        grpc_status,
    }
}

/// The inbound counters of one calling identity, resolved once per connection.
#[derive(Debug)]
pub struct PeerMetrics {
    /// Made when the caller's first HTTP request counts: a caller of opaque
    /// streams only shows no HTTP series.
    http: OnceLock<PeerHttp>,
    http_families: PeerHttpFamilies,
    pub grpc: ByGrpcStatus,
    /// Authorization decisions (`Authorized` by deny, allow; then HTTP
    /// requests let in as the kubelet's probes), each series made when it
    /// first counts.
    authz: [OnceLock<Counter>; 5],
    authz_family: Family<AuthzLabels, Counter>,
    label: String,
}

/// A caller's HTTP requests, responses by status class and latency.
#[derive(Debug)]
pub struct PeerHttp {
    pub requests: Counter,
    pub responses: ByStatus,
    pub latency: Histogram,
}

#[derive(Debug)]
struct PeerHttpFamilies {
    requests: Family<PeerLabels, Counter>,
    responses: Family<PeerStatusLabels, Counter>,
    latency: Family<PeerLabels, Histogram, fn() -> Histogram>,
}

/// What an authorization decision was about: its `protocol` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authorized {
    /// An HTTP request.
    Http,
    /// An opaque TCP stream (or a connection not yet known to be HTTP).
    Tcp,
}

impl Authorized {
    const ALL: [Authorized; 2] = [Authorized::Http, Authorized::Tcp];

    fn label(self) -> &'static str {
        match self {
            Authorized::Http => "http",
            Authorized::Tcp => "tcp",
        }
    }
}

impl PeerMetrics {
    /// The caller's HTTP series, made on first use.
    pub fn http(&self) -> &PeerHttp {
        self.http.get_or_init(|| {
            let f = &self.http_families;
            let labels = PeerLabels {
                peer: self.label.clone(),
            };
            PeerHttp {
                requests: f.requests.get_or_create_owned(&labels),
                responses: STATUS_CLASSES.map(|status_class| {
                    f.responses
                        .get_or_create_owned(&peer_status(&self.label, status_class))
                }),
                latency: f.latency.get_or_create_owned(&labels),
            }
        })
    }

    /// Counts an authorization decision of this caller.
    pub fn authorized(&self, what: Authorized, allowed: bool) {
        self.authz[what as usize * 2 + usize::from(allowed)]
            .get_or_init(|| {
                self.authz_family.get_or_create_owned(&authz_labels(
                    self.label.clone(),
                    what,
                    allowed,
                ))
            })
            .inc();
    }
}

impl PeerMetrics {
    /// An HTTP request let in as one of the kubelet's probes: `decision="probe"`,
    /// apart from `allow`, so that plaintext callers other than the kubelet
    /// show (whether any remain, before a port goes STRICT).
    pub fn probe_admitted(&self) {
        self.authz[4]
            .get_or_init(|| {
                self.authz_family.get_or_create_owned(&AuthzLabels {
                    peer: self.label.clone(),
                    protocol: Authorized::Http.label(),
                    decision: "probe",
                })
            })
            .inc();
    }
}

fn authz_labels(peer: String, what: Authorized, allowed: bool) -> AuthzLabels {
    AuthzLabels {
        peer,
        protocol: what.label(),
        decision: if allowed { "allow" } else { "deny" },
    }
}

/// gRPC calls by status, each series made when it first counts: most
/// services never see a gRPC call, and their metrics stay as they were.
#[derive(Clone)]
pub struct ByGrpcStatus(Arc<GrpcCounters>);

struct GrpcCounters {
    counters: [OnceLock<Counter>; grpc::LABELS.len()],
    make: Box<dyn Fn(grpc::Label) -> Counter + Send + Sync>,
}

impl ByGrpcStatus {
    /// Counters of `family`, each labelled by `labels` with its status when
    /// first counted.
    fn of<L>(
        family: &Family<L, Counter>,
        labels: impl Fn(grpc::Label) -> L + Send + Sync + 'static,
    ) -> Self
    where
        L: Clone + std::hash::Hash + Eq + Send + Sync + 'static,
    {
        let family = family.clone();
        ByGrpcStatus(Arc::new(GrpcCounters {
            counters: Default::default(),
            make: Box::new(move |status| family.get_or_create_owned(&labels(status))),
        }))
    }

    /// `code` indexes `grpc::LABELS`.
    pub fn count(&self, code: usize) {
        let c = &self.0;
        c.counters[code]
            .get_or_init(|| (c.make)(grpc::LABELS[code]))
            .inc();
    }
}

impl grpc::OnStatus for ByGrpcStatus {
    fn status(self, code: usize) {
        self.count(code);
    }
}

// A call's status may come long after its request was routed (a stream ends,
// or its body is dropped): the call holds the route's and the caller's series,
// so that they are not swept from `/metrics` before it is counted, nor made
// again after.
impl grpc::OnStatus for Arc<RouteMetrics> {
    fn status(self, code: usize) {
        self.grpc.count(code);
    }
}

impl grpc::OnStatus for Arc<RouteBackendMetrics> {
    fn status(self, code: usize) {
        self.grpc.count(code);
    }
}

impl grpc::OnStatus for Arc<PeerMetrics> {
    fn status(self, code: usize) {
        self.grpc.count(code);
    }
}

impl std::fmt::Debug for ByGrpcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ByGrpcStatus")
    }
}

/// The status classes, in the order of `status_index`.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

pub fn status_index(status: http::StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// A counter per status class, resolved once per stage so that a request
/// increments without building labels.
pub type ByStatus = [Counter; 5];

/// Series made in their families when first used, then kept: a caller's
/// stages are built for every rule and backend of every Service it reaches
/// (and for its opaque destinations' default rule), most of which it never
/// uses, and a thousand callers of one Service exporting zeros for each would
/// be most of Prometheus's series. Resolved once, as the labels are built
/// only then.
#[derive(Clone)]
pub struct OnFirstUse<M>(Arc<FirstUse<M>>);

struct FirstUse<M> {
    made: OnceLock<M>,
    make: Box<dyn Fn() -> M + Send + Sync>,
}

impl<M> OnFirstUse<M> {
    pub fn new(make: impl Fn() -> M + Send + Sync + 'static) -> Self {
        OnFirstUse(Arc::new(FirstUse {
            made: OnceLock::new(),
            make: Box::new(make),
        }))
    }

    /// Already made: a series of no family, for tests.
    #[cfg(test)]
    pub fn made(m: M) -> Self
    where
        M: Clone + Send + Sync + 'static,
    {
        let first = OnFirstUse::new(move || m.clone());
        first.get();
        first
    }

    pub fn get(&self) -> &M {
        self.0.made.get_or_init(|| (self.0.make)())
    }
}

impl OnFirstUse<Counter> {
    pub fn inc(&self) {
        self.get().inc();
    }
}

impl<M> std::fmt::Debug for OnFirstUse<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.made.get().is_some() {
            "OnFirstUse(made)"
        } else {
            "OnFirstUse(not yet)"
        })
    }
}

/// A rule's or a backend's responses and latency, made together so that a
/// success rate has every class from its first response.
#[derive(Debug)]
pub struct Responses {
    pub responses: ByStatus,
    pub latency: Histogram,
}

impl Responses {
    pub fn observe(&self, status: http::StatusCode, seconds: f64) {
        self.latency.observe(seconds);
        self.responses[status_index(status)].inc();
    }
}

/// Each attempt's responses and latency on one backend of a route rule.
#[derive(Debug)]
pub struct RouteBackendMetrics {
    /// Each attempt sent: one its caller gave up on before an answer (its
    /// own timeout, a reset) has no response, and only this count shows it,
    /// so that a backend that hangs does not read as healthy.
    pub requests: OnFirstUse<Counter>,
    pub http: OnFirstUse<Responses>,
    /// Each gRPC attempt by its status: a canary failing every call in
    /// trailers answers HTTP 200.
    pub grpc: ByGrpcStatus,
}

impl Default for RouteBackendMetrics {
    /// Series of no family, for tests of the stages that count.
    fn default() -> Self {
        RouteBackendMetrics {
            requests: OnFirstUse::new(Counter::default),
            http: OnFirstUse::new(|| Responses {
                responses: Default::default(),
                latency: latency_histogram(),
            }),
            grpc: ByGrpcStatus::of(&Family::<GrpcLabels, Counter>::default(), |grpc_status| {
                GrpcLabels {
                    direction: Direction::Outbound,
                    grpc_status,
                }
            }),
        }
    }
}

/// What a rule does whose counters its first request brings, at 0: the
/// incident that first counts one is then seen by `rate()` and `increase()`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Configured {
    pub request_timeout: bool,
    pub backend_timeout: bool,
    /// Retries responses, not only requests never sent.
    pub retries_responses: bool,
}

/// The counters of one route rule, resolved when the route is built and
/// each made when first used.
#[derive(Debug)]
pub struct RouteMetrics {
    pub requests: OnFirstUse<Counter>,
    pub http: OnFirstUse<Responses>,
    pub retry: crate::retry::RetryMetrics,
    pub request_timeouts: OnFirstUse<Counter>,
    pub backend_timeouts: OnFirstUse<Counter>,
    pub grpc: ByGrpcStatus,
}

impl RouteMetrics {
    /// Makes the counters of what the rule does, at 0 (every rule retries
    /// requests never sent): called on the first request of each build of
    /// the rule's stage, since an edit of the route may add a timeout to a
    /// rule whose series are kept.
    pub fn bring(&self, configured: Configured) {
        self.retry.retries.get();
        self.retry.budget_exhausted.get();
        if configured.retries_responses {
            self.retry.body_too_large.get();
            self.retry.body_unfinished.get();
        }
        if configured.request_timeout {
            self.request_timeouts.get();
        }
        if configured.backend_timeout {
            self.backend_timeouts.get();
        }
    }
}

/// Latency buckets in seconds: fine below a millisecond, where a proxy lives.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub tcp_open: Family<DirectionLabels, Gauge>,
    pub tcp_accepted: Family<DirectionLabels, Counter>,
    pub tcp_rejected: Family<ReasonLabels, Counter>,
    pub tcp_read_bytes: Family<DirectionLabels, Counter>,
    pub tcp_write_bytes: Family<DirectionLabels, Counter>,
    pub protocol_detected: Family<ProtocolLabels, Counter>,
    pub http_requests: Family<DirectionLabels, Counter>,
    pub http_requests_cancelled: Family<DirectionLabels, Counter>,
    pub http_responses: Family<StatusLabels, Counter>,
    pub http_response_latency: Family<DirectionLabels, Histogram, fn() -> Histogram>,
    pub http_rejected: Family<ReasonLabels, Counter>,
    pub http_proxy_errors: Family<ReasonLabels, Counter>,
    pub grpc_responses: Family<GrpcLabels, Counter>,
    /// No series until the first certificate: a proxy without one exports
    /// nothing rather than an expiry in 1970.
    identity_cert_expiry: Family<IdentityLabels, Gauge>,
    pub identity_renewals: Counter,
    pub identity_failures: Counter,
    pub tls_identity_mismatches: Counter,
    /// Spans ended but not delivered to the collector (queue full, export failed).
    pub trace_spans_dropped: Counter,
    /// Access-log lines dropped because stdout did not keep up.
    pub access_log_dropped: Counter,
    /// From an index change at the controller to its update's receipt here.
    pub discovery_lag: Histogram,
    pub control_unreachable: Gauge,
    pub tls_handshake_failures: Family<DirectionLabels, Counter>,
    pub inbound_authz: Family<AuthzLabels, Counter>,
    pub route_requests: Family<RouteLabels, Counter>,
    pub route_responses: Family<RouteStatusLabels, Counter>,
    pub route_grpc_responses: Family<RouteGrpcLabels, Counter>,
    pub route_latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub route_retries: Family<RouteLabels, Counter>,
    pub route_retries_skipped: Family<RouteReasonLabels, Counter>,
    pub route_timeouts: Family<RouteReasonLabels, Counter>,
    pub backend_requests: Family<RouteBackendOnlyLabels, Counter>,
    pub backend_responses: Family<RouteBackendLabels, Counter>,
    pub backend_grpc_responses: Family<RouteBackendGrpcLabels, Counter>,
    pub backend_latency: Family<RouteBackendOnlyLabels, Histogram, fn() -> Histogram>,
    pub inbound_peer_requests: Family<PeerLabels, Counter>,
    pub inbound_peer_responses: Family<PeerStatusLabels, Counter>,
    pub inbound_peer_grpc_responses: Family<PeerGrpcLabels, Counter>,
    pub inbound_peer_latency: Family<PeerLabels, Histogram, fn() -> Histogram>,
    pub backend_ejections: Family<BackendLabels, Counter>,
    pub backend_ejected: Family<BackendLabels, Gauge>,
    /// The `inbound_peer_*` series of each caller, while in use and for
    /// `METRICS_RETAIN_IDLE` after.
    peers: Retained<Option<crate::identity::Identity>, PeerMetrics>,
    /// The series of route rules, their backends and breakers, while stages
    /// of the configuration use them and for `METRICS_RETAIN_IDLE` after: a
    /// route or Service deleted leaves `/metrics`.
    routes: Retained<RouteLabels, RouteMetrics>,
    route_backends: Retained<RouteBackendOnlyLabels, RouteBackendMetrics>,
    backends: Retained<BackendLabels, crate::balance::BackendMetrics>,
}

/// `reason` labels of `route_retries_skipped`.
const RETRY_SKIPPED: [&str; 3] = ["budget_exhausted", "body_too_large", "body_unfinished"];
/// `reason` labels of `route_timeouts`.
const TIMEOUTS: [&str; 2] = ["request", "backend_request"];

fn route_reason(l: &RouteLabels, reason: &'static str) -> RouteReasonLabels {
    RouteReasonLabels {
        service: l.service.clone(),
        route: l.route.clone(),
        rule: l.rule.clone(),
        reason,
    }
}

fn route_status(l: &RouteLabels, status_class: &'static str) -> RouteStatusLabels {
    RouteStatusLabels {
        service: l.service.clone(),
        route: l.route.clone(),
        rule: l.rule.clone(),
        status_class,
    }
}

fn route_grpc(l: &RouteLabels, grpc_status: grpc::Label) -> RouteGrpcLabels {
    RouteGrpcLabels {
        service: l.service.clone(),
        route: l.route.clone(),
        rule: l.rule.clone(),
        grpc_status,
    }
}

fn route_backend_grpc(
    l: &RouteBackendOnlyLabels,
    grpc_status: grpc::Label,
) -> RouteBackendGrpcLabels {
    RouteBackendGrpcLabels {
        service: l.service.clone(),
        route: l.route.clone(),
        rule: l.rule.clone(),
        backend: l.backend.clone(),
        grpc_status,
    }
}

fn route_backend_status(
    l: &RouteBackendOnlyLabels,
    status_class: &'static str,
) -> RouteBackendLabels {
    RouteBackendLabels {
        service: l.service.clone(),
        route: l.route.clone(),
        rule: l.rule.clone(),
        backend: l.backend.clone(),
        status_class,
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix(METRICS_PREFIX);
        let m = Metrics {
            tcp_open: Family::default(),
            tcp_accepted: Family::default(),
            tcp_rejected: Family::default(),
            tcp_read_bytes: Family::default(),
            tcp_write_bytes: Family::default(),
            protocol_detected: Family::default(),
            http_requests: Family::default(),
            http_requests_cancelled: Family::default(),
            http_responses: Family::default(),
            http_response_latency: Family::new_with_constructor(latency_histogram),
            http_rejected: Family::default(),
            http_proxy_errors: Family::default(),
            grpc_responses: Family::default(),
            identity_cert_expiry: Family::default(),
            identity_renewals: Counter::default(),
            identity_failures: Counter::default(),
            tls_identity_mismatches: Counter::default(),
            trace_spans_dropped: Counter::default(),
            access_log_dropped: Counter::default(),
            discovery_lag: latency_histogram(),
            control_unreachable: Gauge::default(),
            tls_handshake_failures: Family::default(),
            inbound_authz: Family::default(),
            route_requests: Family::default(),
            route_responses: Family::default(),
            route_grpc_responses: Family::default(),
            route_latency: Family::new_with_constructor(latency_histogram),
            route_retries: Family::default(),
            route_retries_skipped: Family::default(),
            route_timeouts: Family::default(),
            backend_requests: Family::default(),
            backend_responses: Family::default(),
            backend_grpc_responses: Family::default(),
            backend_latency: Family::new_with_constructor(latency_histogram),
            inbound_peer_requests: Family::default(),
            inbound_peer_responses: Family::default(),
            inbound_peer_grpc_responses: Family::default(),
            inbound_peer_latency: Family::new_with_constructor(latency_histogram),
            backend_ejections: Family::default(),
            backend_ejected: Family::default(),
            peers: Retained::new(METRICS_RETAIN_IDLE),
            routes: Retained::new(METRICS_RETAIN_IDLE),
            route_backends: Retained::new(METRICS_RETAIN_IDLE),
            backends: Retained::new(METRICS_RETAIN_IDLE),
            registry: Registry::default(),
        };
        registry.register(
            "tcp_open_connections",
            "TCP connections open now",
            m.tcp_open.clone(),
        );
        registry.register(
            "tcp_connections",
            "TCP connections accepted",
            m.tcp_accepted.clone(),
        );
        registry.register(
            "tcp_rejected_connections",
            "TCP connections refused or closed by the proxy, by reason",
            m.tcp_rejected.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from clients",
            m.tcp_read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to clients",
            m.tcp_write_bytes.clone(),
        );
        registry.register(
            "protocol_detected_connections",
            "Connections by detected protocol (http1, http2, opaque)",
            m.protocol_detected.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests received",
            m.http_requests.clone(),
        );
        registry.register(
            "http_requests_cancelled",
            "HTTP requests whose caller went away before the response head",
            m.http_requests_cancelled.clone(),
        );
        registry.register(
            "http_responses",
            "HTTP responses sent, by status class",
            m.http_responses.clone(),
        );
        registry.register(
            "http_response_latency_seconds",
            "Time from request received to response headers sent",
            m.http_response_latency.clone(),
        );
        registry.register(
            "http_rejected_requests",
            "HTTP requests refused by the proxy before forwarding, by reason",
            m.http_rejected.clone(),
        );
        registry.register(
            "http_proxy_errors",
            "Responses the proxy made itself in place of the upstream's, by reason",
            m.http_proxy_errors.clone(),
        );
        registry.register(
            "grpc_responses",
            "gRPC calls by grpc-status (from the trailers, the head, or the HTTP status as a gRPC client reads it; `none`: ended without one)",
            m.grpc_responses.clone(),
        );
        registry.register(
            "identity_cert_expiration_timestamp_seconds",
            "When this proxy's current certificate expires (Unix time)",
            m.identity_cert_expiry.clone(),
        );
        registry.register(
            "identity_certificate_renewals",
            "Certificates renewed after the first one",
            m.identity_renewals.clone(),
        );
        registry.register(
            "identity_certificate_failures",
            "Failed certificate requests",
            m.identity_failures.clone(),
        );
        registry.register(
            "tls_identity_mismatches",
            "Peer proxies that presented another identity than discovery promised",
            m.tls_identity_mismatches.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans not delivered to the collector: the export queue was full, or the collector failed or did not answer",
            m.trace_spans_dropped.clone(),
        );
        registry.register(
            "control_discovery_lag_seconds",
            "From an index change at the controller to its discovery update's receipt by this proxy (after a watch's first answer; clocks as they are)",
            m.discovery_lag.clone(),
        );
        registry.register(
            "control_unreachable",
            "1 while discovery finds the controller out of reach (no call answered since one failed)",
            m.control_unreachable.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because stdout did not keep up",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes with peer proxies that failed",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "inbound_authorizations",
            "Inbound requests and connections allowed or denied by policy, by peer identity",
            m.inbound_authz.clone(),
        );
        registry.register(
            "route_requests",
            "Outbound HTTP requests per route rule of a Service (route \"default\": no HTTPRoute)",
            m.route_requests.clone(),
        );
        registry.register(
            "route_responses",
            "Outbound HTTP responses per route rule, by status class, after retries",
            m.route_responses.clone(),
        );
        registry.register(
            "route_grpc_responses",
            "Outbound gRPC calls per route rule, by grpc-status, after retries",
            m.route_grpc_responses.clone(),
        );
        registry.register(
            "route_response_latency_seconds",
            "Time from request to response headers per route rule, retries included",
            m.route_latency.clone(),
        );
        registry.register(
            "route_retries",
            "Retries sent per route rule",
            m.route_retries.clone(),
        );
        registry.register(
            "route_retries_skipped",
            "Retryable responses not retried, by reason (budget_exhausted, body_too_large, body_unfinished)",
            m.route_retries_skipped.clone(),
        );
        registry.register(
            "route_timeouts",
            "Requests cut by a route timeout, by kind (request, backend_request)",
            m.route_timeouts.clone(),
        );
        registry.register(
            "backend_requests",
            "Attempts sent per route rule and backend; those without a response were given up by their caller",
            m.backend_requests.clone(),
        );
        registry.register(
            "backend_responses",
            "Responses per attempt, by route rule, backend and status class",
            m.backend_responses.clone(),
        );
        registry.register(
            "backend_grpc_responses",
            "gRPC calls per attempt, by route rule, backend and grpc-status",
            m.backend_grpc_responses.clone(),
        );
        registry.register(
            "backend_response_latency_seconds",
            "Each attempt's time to response headers, by service, route, rule and backend",
            m.backend_latency.clone(),
        );
        registry.register(
            "inbound_peer_requests",
            "Inbound HTTP requests by the caller's verified identity (`unauthenticated` for plaintext)",
            m.inbound_peer_requests.clone(),
        );
        registry.register(
            "inbound_peer_responses",
            "Inbound HTTP responses by the caller's verified identity and status class",
            m.inbound_peer_responses.clone(),
        );
        registry.register(
            "inbound_peer_grpc_responses",
            "Inbound gRPC calls by the caller's verified identity and grpc-status",
            m.inbound_peer_grpc_responses.clone(),
        );
        registry.register(
            "inbound_peer_response_latency_seconds",
            "Inbound time to response headers by the caller's verified identity",
            m.inbound_peer_latency.clone(),
        );
        registry.register(
            "backend_ejections",
            "Endpoints ejected by the circuit breaker, per backend",
            m.backend_ejections.clone(),
        );
        registry.register(
            "backend_ejected_endpoints",
            "Endpoints of a backend ejected now",
            m.backend_ejected.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        self.encode_into(String::with_capacity(8 * 1024))
    }

    /// The text appended to `out`.
    pub fn encode_into(&self, mut out: String) -> String {
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        // After encoding: what a series counted before it goes is scraped.
        self.forget_idle(std::time::Instant::now());
        out
    }

    /// Removes the series (of callers, routes, backends) nobody has held since
    /// a sweep at least `METRICS_RETAIN_IDLE` before `now`.
    pub fn forget_idle(&self, now: std::time::Instant) {
        self.peers.sweep(now, |k| self.remove_peer(k));
        self.routes.sweep(now, |k| self.remove_route(k));
        self.route_backends
            .sweep(now, |k| self.remove_route_backend(k));
        self.backends.sweep(now, |k| self.remove_backend(k));
    }

    /// Removes a caller's series (the ones `inbound_peer` makes).
    fn remove_peer(&self, peer: &Option<crate::identity::Identity>) {
        let peer = peer_label(peer.as_ref());
        let labels = PeerLabels { peer: peer.clone() };
        self.inbound_peer_requests.remove(&labels);
        self.inbound_peer_latency.remove(&labels);
        for status_class in STATUS_CLASSES {
            self.inbound_peer_responses
                .remove(&peer_status(&peer, status_class));
        }
        for grpc_status in grpc::LABELS {
            self.inbound_peer_grpc_responses
                .remove(&peer_grpc(&peer, grpc_status));
        }
        for protocol in Authorized::ALL {
            for allowed in [false, true] {
                self.inbound_authz
                    .remove(&authz_labels(peer.clone(), protocol, allowed));
            }
        }
        self.inbound_authz.remove(&AuthzLabels {
            peer,
            protocol: Authorized::Http.label(),
            decision: "probe",
        });
    }

    /// Removes a route rule's series (the ones `route` makes).
    fn remove_route(&self, l: &RouteLabels) {
        self.route_requests.remove(l);
        self.route_latency.remove(l);
        self.route_retries.remove(l);
        for reason in RETRY_SKIPPED {
            self.route_retries_skipped.remove(&route_reason(l, reason));
        }
        for reason in TIMEOUTS {
            self.route_timeouts.remove(&route_reason(l, reason));
        }
        for status_class in STATUS_CLASSES {
            self.route_responses.remove(&route_status(l, status_class));
        }
        for grpc_status in grpc::LABELS {
            self.route_grpc_responses
                .remove(&route_grpc(l, grpc_status));
        }
    }

    fn remove_route_backend(&self, l: &RouteBackendOnlyLabels) {
        self.backend_requests.remove(l);
        self.backend_latency.remove(l);
        for status_class in STATUS_CLASSES {
            self.backend_responses
                .remove(&route_backend_status(l, status_class));
        }
        for grpc_status in grpc::LABELS {
            self.backend_grpc_responses
                .remove(&route_backend_grpc(l, grpc_status));
        }
    }

    fn remove_backend(&self, l: &BackendLabels) {
        self.backend_ejections.remove(l);
        self.backend_ejected.remove(l);
    }

    /// The proxy's current certificate, for `identity`, expires at `unix`
    /// (seconds).
    pub fn certificate_expires(&self, identity: &crate::identity::Identity, unix: i64) {
        let labels = IdentityLabels {
            identity: identity.to_string(),
        };
        self.identity_cert_expiry.get_or_create(&labels).set(unix);
    }

    /// gRPC calls in `direction`, by status.
    pub fn grpc(&self, direction: Direction) -> ByGrpcStatus {
        ByGrpcStatus::of(&self.grpc_responses, move |grpc_status| GrpcLabels {
            direction,
            grpc_status,
        })
    }

    /// The counters of one route rule of `service`, shared by the stages
    /// that serve it.
    pub fn route(&self, service: &str, route: &str, rule: &str) -> Arc<RouteMetrics> {
        let labels = RouteLabels {
            service: service.to_string(),
            route: route.to_string(),
            rule: rule.to_string(),
        };
        self.routes.get(
            labels,
            |labels| {
                // Owned: a family's read guard held to the end of a statement would
                // block a second insert into the same family in that statement.
                let skipped = |r| {
                    let (family, labels) =
                        (self.route_retries_skipped.clone(), route_reason(labels, r));
                    OnFirstUse::new(move || family.get_or_create_owned(&labels))
                };
                let timeouts = |r| {
                    let (family, labels) = (self.route_timeouts.clone(), route_reason(labels, r));
                    OnFirstUse::new(move || family.get_or_create_owned(&labels))
                };
                let retries = {
                    let (family, labels) = (self.route_retries.clone(), labels.clone());
                    OnFirstUse::new(move || family.get_or_create_owned(&labels))
                };
                let retry = crate::retry::RetryMetrics {
                    retries,
                    budget_exhausted: skipped(RETRY_SKIPPED[0]),
                    body_too_large: skipped(RETRY_SKIPPED[1]),
                    body_unfinished: skipped(RETRY_SKIPPED[2]),
                };
                let grpc = ByGrpcStatus::of(&self.route_grpc_responses, {
                    let labels = labels.clone();
                    move |grpc_status| route_grpc(&labels, grpc_status)
                });
                let requests = {
                    let (family, labels) = (self.route_requests.clone(), labels.clone());
                    OnFirstUse::new(move || family.get_or_create_owned(&labels))
                };
                let http = {
                    let responses = self.route_responses.clone();
                    let latency = self.route_latency.clone();
                    let labels = labels.clone();
                    OnFirstUse::new(move || Responses {
                        responses: STATUS_CLASSES.map(|status_class| {
                            responses.get_or_create_owned(&route_status(&labels, status_class))
                        }),
                        latency: latency.get_or_create_owned(&labels),
                    })
                };
                RouteMetrics {
                    requests,
                    http,
                    retry,
                    request_timeouts: timeouts(TIMEOUTS[0]),
                    backend_timeouts: timeouts(TIMEOUTS[1]),
                    grpc,
                }
            },
            |k| self.remove_route(k),
        )
    }

    /// Responses and latency of `backend` on one route rule.
    pub fn route_backend(
        &self,
        service: &str,
        route: &str,
        rule: &str,
        backend: &str,
    ) -> Arc<RouteBackendMetrics> {
        let labels = RouteBackendOnlyLabels {
            service: service.to_string(),
            route: route.to_string(),
            rule: rule.to_string(),
            backend: backend.to_string(),
        };
        self.route_backends.get(
            labels,
            |labels| RouteBackendMetrics {
                requests: {
                    let (family, labels) = (self.backend_requests.clone(), labels.clone());
                    OnFirstUse::new(move || family.get_or_create_owned(&labels))
                },
                http: {
                    let responses = self.backend_responses.clone();
                    let latency = self.backend_latency.clone();
                    let labels = labels.clone();
                    OnFirstUse::new(move || Responses {
                        responses: STATUS_CLASSES.map(|status_class| {
                            responses
                                .get_or_create_owned(&route_backend_status(&labels, status_class))
                        }),
                        latency: latency.get_or_create_owned(&labels),
                    })
                },
                grpc: ByGrpcStatus::of(&self.backend_grpc_responses, {
                    let labels = labels.clone();
                    move |grpc_status| route_backend_grpc(&labels, grpc_status)
                }),
            },
            |k| self.remove_route_backend(k),
        )
    }

    /// The inbound counters of one caller, shared by its connections; kept
    /// for `METRICS_RETAIN_IDLE` after the last one closes.
    pub fn inbound_peer(&self, peer: Option<&crate::identity::Identity>) -> Arc<PeerMetrics> {
        self.peers.get(
            peer.cloned(),
            |peer| {
                let peer = peer_label(peer.as_ref());
                PeerMetrics {
                    http: OnceLock::new(),
                    http_families: PeerHttpFamilies {
                        requests: self.inbound_peer_requests.clone(),
                        responses: self.inbound_peer_responses.clone(),
                        latency: self.inbound_peer_latency.clone(),
                    },
                    grpc: ByGrpcStatus::of(&self.inbound_peer_grpc_responses, {
                        let peer = peer.clone();
                        move |grpc_status| peer_grpc(&peer, grpc_status)
                    }),
                    authz: Default::default(),
                    authz_family: self.inbound_authz.clone(),
                    label: peer,
                }
            },
            |k| self.remove_peer(k),
        )
    }

    /// The breaker counters of `backend`.
    pub fn backend(&self, service: &str, backend: &str) -> Arc<crate::balance::BackendMetrics> {
        let labels = BackendLabels {
            service: service.to_string(),
            backend: backend.to_string(),
        };
        self.backends.get(
            labels,
            |labels| {
                let (ejections, ejected) =
                    (self.backend_ejections.clone(), self.backend_ejected.clone());
                let labels = labels.clone();
                crate::balance::BackendMetrics::new(move || crate::balance::BreakerSeries {
                    ejections: ejections.get_or_create_owned(&labels),
                    ejected: ejected.get_or_create_owned(&labels),
                })
            },
            |k| self.remove_backend(k),
        )
    }

    pub fn reject_tcp(&self, direction: Direction, reason: &'static str) {
        self.tcp_rejected
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    pub fn reject_http(&self, direction: Direction, reason: &'static str) {
        self.http_rejected
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy without a certificate exports no expiry, not one in 1970.
    #[test]
    fn certificate_expiry_is_absent_until_there_is_one() {
        let m = Metrics::new();
        let name = "strait_proxy_identity_cert_expiration_timestamp_seconds";
        let series = |text: &str| text.lines().filter(|l| l.starts_with(name)).count();
        assert_eq!(series(&m.encode()), 0, "{}", m.encode());
        let id = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        m.certificate_expires(&id, 1_900_000_000);
        let text = m.encode();
        let want =
            format!("{name}{{identity=\"spiffe://cluster.local/ns/shop/sa/web\"}} 1900000000\n");
        assert!(text.contains(&want), "{text}");
    }

    /// Callers that stopped calling leave `/metrics` once their series have
    /// been idle for `METRICS_RETAIN_IDLE`; callers still connected stay.
    #[test]
    fn a_caller_gone_for_the_retention_leaves_metrics() {
        use std::time::Instant;
        let m = Metrics::new();
        let gone: crate::identity::Identity = "spiffe://cluster.local/ns/ci-4711/sa/tests"
            .parse()
            .unwrap();
        let stays: crate::identity::Identity =
            "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let series = |text: &str, who: &str| {
            text.lines()
                .filter(|l| !l.starts_with('#') && l.contains(who))
                .count()
        };
        let held = m.inbound_peer(Some(&stays));
        held.http().requests.inc();
        {
            let conn = m.inbound_peer(Some(&gone));
            let http = conn.http();
            http.requests.inc();
            http.responses[1].inc();
            http.latency.observe(0.001);
            grpc::OnStatus::status(conn.grpc.clone(), 0);
            conn.authorized(Authorized::Http, true);
            // An opaque stream of the same caller: its decision in the same series.
            m.inbound_peer(Some(&gone))
                .authorized(Authorized::Tcp, false);
            // A second connection of the same caller counts in the same series.
            m.inbound_peer(Some(&gone)).http().requests.inc();
            // The kubelet's probes, of no identity, gone likewise.
            m.inbound_peer(None).probe_admitted();
        }
        // Before the scrape that finds them idle, whenever it runs.
        let t0 = Instant::now();
        let text = m.encode();
        assert!(
            text.contains("strait_proxy_inbound_peer_requests_total{peer=\"spiffe://cluster.local/ns/ci-4711/sa/tests\"} 2"),
            "{text}"
        );
        assert!(series(&text, "ci-4711") > 3, "{text}");
        for decision in [
            r#"protocol="http",decision="allow"} 1"#,
            r#"protocol="tcp",decision="deny"} 1"#,
        ] {
            assert!(text.contains(decision), "{decision}: {text}");
        }

        m.forget_idle(t0 + METRICS_RETAIN_IDLE - std::time::Duration::from_secs(1));
        assert!(series(&m.encode(), "ci-4711") > 3, "kept for the retention");
        m.forget_idle(t0 + METRICS_RETAIN_IDLE * 2);
        let text = m.encode();
        assert_eq!(series(&text, "ci-4711"), 0, "{text}");
        assert_eq!(series(&text, "unauthenticated"), 0, "{text}");
        assert!(
            text.contains("strait_proxy_inbound_peer_requests_total{peer=\"spiffe://cluster.local/ns/shop/sa/web\"} 1"),
            "a caller still connected keeps its series: {text}"
        );

        // Back again: counted from zero in new series.
        m.inbound_peer(Some(&gone)).http().requests.inc();
        let text = m.encode();
        assert!(
            text.contains("strait_proxy_inbound_peer_requests_total{peer=\"spiffe://cluster.local/ns/ci-4711/sa/tests\"} 1"),
            "{text}"
        );
        drop(held);
    }

    /// A caller of opaque streams only shows its decisions, not HTTP series
    /// that would stay at zero.
    #[test]
    fn a_caller_of_opaque_streams_only_has_no_http_series() {
        let m = Metrics::new();
        let db: crate::identity::Identity =
            "spiffe://cluster.local/ns/db/sa/client".parse().unwrap();
        let conn = m.inbound_peer(Some(&db));
        conn.authorized(Authorized::Tcp, true);
        let text = m.encode();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains("ns/db/sa/client"))
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(
            lines[0].starts_with("strait_proxy_inbound_authorizations_total{")
                && lines[0].ends_with(r#"protocol="tcp",decision="allow"} 1"#),
            "{text}"
        );
        conn.http().requests.inc();
        assert!(
            m.encode().contains(
                "strait_proxy_inbound_peer_requests_total{peer=\"spiffe://cluster.local/ns/db/sa/client\"} 1"
            ),
            "an HTTP request makes them"
        );
    }

    /// A route rule, backend or Service the configuration no longer has
    /// leaves `/metrics` once no stage has used it for the retention; the
    /// ones still configured stay, and stages built again share the series.
    #[test]
    fn series_of_a_route_no_longer_configured_leave_metrics() {
        use std::time::{Duration, Instant};
        let m = Metrics::new();
        let series = |text: &str, service: &str| {
            let label = format!("service=\"{service}\"");
            text.lines()
                .filter(|l| !l.starts_with('#') && l.contains(&label))
                .count()
        };
        // The stages of the configuration in force.
        let kept = (
            m.route("web:80", "shop/web", "0"),
            m.route_backend("web:80", "shop/web", "0", "web-v1"),
            m.backend("web:80", "web-v1"),
        );
        kept.0.requests.inc();
        kept.0.http.get().observe(http::StatusCode::OK, 0.001);
        {
            // Stages of a Service since deleted.
            let (route, backend, breaker) = (
                m.route("old:80", "shop/old", "0"),
                m.route_backend("old:80", "shop/old", "0", "old"),
                m.backend("old:80", "old"),
            );
            route.requests.inc();
            route.retry.budget_exhausted.inc();
            route.request_timeouts.inc();
            route.http.get().responses[1].inc();
            grpc::OnStatus::status(route.grpc.clone(), 0);
            backend.http.get().responses[1].inc();
            backend.http.get().latency.observe(0.001);
            breaker.get().ejections.inc();
            breaker.get().ejected.set(1);
            breaker.get().ejected.set(0);
            // A rebuild of the same configuration shares them.
            let again = m.route("old:80", "shop/old", "0");
            again.requests.inc();
            assert!(Arc::ptr_eq(&route, &again));
        }
        // Before the scrape that finds them idle, whenever it runs.
        let t0 = Instant::now();
        let text = m.encode();
        assert!(
            text.contains("strait_proxy_route_requests_total{service=\"old:80\",route=\"shop/old\",rule=\"0\"} 2"),
            "{text}"
        );
        let before = series(&text, "old:80");
        assert!(before >= 10, "{before}: {text}");

        m.forget_idle(t0 + METRICS_RETAIN_IDLE - Duration::from_secs(1));
        assert_eq!(
            series(&m.encode(), "old:80"),
            before,
            "kept for the retention"
        );
        m.forget_idle(t0 + METRICS_RETAIN_IDLE * 2);
        let text = m.encode();
        assert_eq!(series(&text, "old:80"), 0, "{text}");
        assert!(
            text.contains("strait_proxy_route_requests_total{service=\"web:80\",route=\"shop/web\",rule=\"0\"} 1"),
            "a route in force keeps its series: {text}"
        );
        assert!(series(&text, "web:80") >= 5, "{text}");
        drop(kept);
    }

    /// A rule, a backend or a retry counter no request has used exports
    /// nothing: a caller builds stages for every rule and backend of each
    /// Service it reaches (and for its opaque destinations), and a thousand
    /// callers each exporting zeros for all of them would be most of
    /// Prometheus's series. A rule's first request brings its responses by
    /// every class and its latency, so that a success rate has them all.
    #[test]
    fn series_are_made_by_their_first_use() {
        let m = Metrics::new();
        let (used, unused) = (
            m.route("web:80", "shop/web", "0"),
            m.route("web:80", "shop/web", "1"),
        );
        let backends = (
            m.route_backend("web:80", "shop/web", "0", "web-v1"),
            m.route_backend("web:80", "shop/web", "0", "web-v2"),
        );
        let text = m.encode();
        assert!(!text.contains("shop/web"), "{text}");
        used.requests.inc();
        used.http.get().observe(http::StatusCode::OK, 0.001);
        backends.0.http.get().observe(http::StatusCode::OK, 0.001);
        let text = m.encode();
        let lines = |needle: &str| {
            text.lines()
                .filter(|l| !l.starts_with('#') && l.contains(needle))
                .count()
        };
        assert!(text.contains("strait_proxy_route_requests_total{service=\"web:80\",route=\"shop/web\",rule=\"0\"} 1"), "{text}");
        assert_eq!(lines("rule=\"1\""), 0, "{text}");
        assert_eq!(lines("backend=\"web-v2\""), 0, "{text}");
        assert_eq!(lines("rule=\"0\",status_class="), 5, "every class: {text}");
        assert_eq!(lines("route_retries"), 0, "no retry made: {text}");
        assert_eq!(lines("route_timeouts"), 0, "no timeout: {text}");
        // Counted through the stage: what the rule does is there at 0.
        let timed = m.route("web:80", "shop/web", "2");
        timed.requests.inc();
        timed.bring(Configured::default());
        // The route edited to add a timeout: the same series, brought again.
        m.route("web:80", "shop/web", "2").bring(Configured {
            request_timeout: true,
            ..Configured::default()
        });
        let text = m.encode();
        assert!(text.contains("strait_proxy_route_timeouts_total{service=\"web:80\",route=\"shop/web\",rule=\"2\",reason=\"request\"} 0"), "{text}");
        assert!(text.contains("strait_proxy_route_retries_total{service=\"web:80\",route=\"shop/web\",rule=\"2\"} 0"), "{text}");
        assert!(
            !text.contains("rule=\"2\",reason=\"backend_request\""),
            "{text}"
        );
        // A backend's breaker: built for every backend resolved, exported
        // from its first pick, at 0.
        let breaker = m.backend("web:80", "web-v1");
        assert!(!m.encode().contains("backend_eject"), "unused");
        breaker.get();
        let text = m.encode();
        assert!(
            text.contains(
                "strait_proxy_backend_ejections_total{service=\"web:80\",backend=\"web-v1\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "strait_proxy_backend_ejected_endpoints{service=\"web:80\",backend=\"web-v1\"} 0"
            ),
            "{text}"
        );
        drop((unused, backends, timed, breaker));
    }

    /// A gRPC call's status may come long after its request was routed (a
    /// stream that outlives the destination's stages, or a route deleted
    /// meanwhile): it is counted in the series the request was, which stay
    /// until then and leave after.
    #[test]
    fn a_grpc_call_keeps_its_route_and_caller_series_until_its_status() {
        use std::time::{Duration, Instant};
        let m = Metrics::new();
        let caller: crate::identity::Identity = "spiffe://cluster.local/ns/ci-4711/sa/tests"
            .parse()
            .unwrap();
        let series = |text: &str| {
            text.lines()
                .filter(|l| !l.starts_with('#') && (l.contains("old:80") || l.contains("ci-4711")))
                .count()
        };
        // What the call's response body holds once its stages are gone.
        let call = (
            m.route("old:80", "shop/old", "0"),
            (
                m.route_backend("old:80", "shop/old", "0", "old-v2"),
                Some(m.inbound_peer(Some(&caller))),
            ),
        );
        let t0 = Instant::now();
        let before = series(&m.encode());
        for minutes in [10, 20, 30, 40] {
            m.forget_idle(t0 + Duration::from_secs(60 * minutes));
        }
        assert_eq!(series(&m.encode()), before, "kept while the call is open");

        grpc::OnStatus::status(call, 0);
        let text = m.encode();
        for counted in [
            "strait_proxy_route_grpc_responses_total{service=\"old:80\",route=\"shop/old\",rule=\"0\",grpc_status=\"0\"} 1",
            "strait_proxy_backend_grpc_responses_total{service=\"old:80\",route=\"shop/old\",rule=\"0\",backend=\"old-v2\",grpc_status=\"0\"} 1",
            "strait_proxy_inbound_peer_grpc_responses_total{peer=\"spiffe://cluster.local/ns/ci-4711/sa/tests\",grpc_status=\"0\"} 1",
        ] {
            assert!(text.contains(counted), "{counted}: {text}");
        }
        let t1 = Instant::now();
        m.forget_idle(t1);
        m.forget_idle(t1 + METRICS_RETAIN_IDLE);
        let text = m.encode();
        assert_eq!(series(&text), 0, "nothing left behind: {text}");
    }

    #[test]
    fn route_and_backend_counters_resolve_twice_over() {
        let m = Metrics::new();
        for _ in 0..2 {
            let r = m.route("web:80", "ns/web", "0");
            r.requests.inc();
            r.retry.budget_exhausted.inc();
            m.route_backend("web:80", "ns/web", "0", "v1")
                .http
                .get()
                .responses[1]
                .inc();
            m.backend("web:80", "v1").get().ejections.inc();
        }
        let text = m.encode();
        assert!(text.contains("strait_proxy_route_requests_total{service=\"web:80\",route=\"ns/web\",rule=\"0\"} 2"), "{text}");
        assert!(text.contains("reason=\"budget_exhausted\"} 2"), "{text}");
        assert!(
            text.contains(
                "strait_proxy_backend_ejections_total{service=\"web:80\",backend=\"v1\"} 2"
            ),
            "{text}"
        );
    }
}

pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Counts a connection as open for as long as it lives.
#[derive(Debug)]
pub struct OpenConnection {
    gauge: Gauge,
}

/// A listener's connection counters, looked up once rather than per connection.
#[derive(Clone, Debug)]
pub struct ConnectionCounters {
    accepted: Counter,
    open: Gauge,
}

impl ConnectionCounters {
    pub fn new(metrics: &Metrics, direction: Direction) -> Self {
        let labels = DirectionLabels { direction };
        ConnectionCounters {
            accepted: metrics.tcp_accepted.get_or_create(&labels).clone(),
            open: metrics.tcp_open.get_or_create(&labels).clone(),
        }
    }

    /// Counts a connection accepted, and open until the returned guard drops.
    pub fn accepted(&self) -> OpenConnection {
        self.accepted.inc();
        self.open.inc();
        OpenConnection {
            gauge: self.open.clone(),
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
