//! The controller's Prometheus metrics.

use std::net::IpAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::defaults::{self, METRICS_PREFIX};
use crate::index::Snapshot;
use strait_api::per_source::{PerSource, Share};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub service: &'static str,
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open watch streams, by gRPC service (discovery, inbound_policy).
    pub watches: Family<ServiceLabels, Gauge>,
    /// Destinations with at least one watcher (views computed once per change each).
    pub watched_destinations: Gauge,
    /// Watched views over `MAX_DISCOVERY_VIEW_BYTES`, sent without the routes
    /// that do not fit.
    pub views_cut: Gauge,
    pub push_latency: Histogram,
    pub index_services: Gauge,
    pub index_endpoints: Gauge,
    pub index_pods: Gauge,
    pub index_version: Gauge,
    pub reload_errors: Counter,
    pub certificates_issued: Counter,
    pub certify_refusals: Family<ReasonLabels, Counter>,
    /// Discovery and policy calls refused for want of a credential, by service and reason.
    pub api_refusals: Family<RefusalLabels, Counter>,
    /// Spans not delivered to the collector.
    pub trace_spans_dropped: Counter,
    /// 1 while the watch of a kind on the API server fails (retried with
    /// backoff, the index keeping what it last read of that kind).
    pub watch_failing: Family<KindLabels, Gauge>,
    /// When the issuer in force expires (registered only when issuing).
    issuer_expiry: Gauge<i64>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Self::issuing_until(None)
    }

    /// With `issuer_expiry` (Unix seconds) when the controller issues
    /// certificates: exported then only, so that no alert reads a missing
    /// issuer as one that expired in 1970.
    pub fn issuing_until(issuer_expiry: Option<i64>) -> Arc<Self> {
        let mut registry = Registry::with_prefix(METRICS_PREFIX);
        let m = Metrics {
            registry: Registry::default(),
            watches: Family::default(),
            watched_destinations: Gauge::default(),
            views_cut: Gauge::default(),
            push_latency: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            index_services: Gauge::default(),
            index_endpoints: Gauge::default(),
            index_pods: Gauge::default(),
            index_version: Gauge::default(),
            reload_errors: Counter::default(),
            certificates_issued: Counter::default(),
            certify_refusals: Family::default(),
            api_refusals: Family::default(),
            trace_spans_dropped: Counter::default(),
            watch_failing: Family::default(),
            issuer_expiry: Gauge::default(),
        };
        registry.register(
            "watches",
            "Open watch streams from proxies",
            m.watches.clone(),
        );
        registry.register(
            "watched_destinations",
            "Destinations watched by at least one proxy, once per zone their watchers are in",
            m.watched_destinations.clone(),
        );
        registry.register(
            "views_cut",
            "Watched destination views larger than a proxy may be sent (8 MiB encoded), sent without the routes that do not fit",
            m.views_cut.clone(),
        );
        registry.register(
            "push_latency_seconds",
            "Time from an index change to its update being handed to the proxies' streams",
            m.push_latency.clone(),
        );
        registry.register(
            "index_services",
            "Services in the index",
            m.index_services.clone(),
        );
        registry.register(
            "index_endpoints",
            "Endpoints in the index",
            m.index_endpoints.clone(),
        );
        registry.register("index_pods", "Pods in the index", m.index_pods.clone());
        registry.register(
            "index_version",
            "Version of the current index snapshot",
            m.index_version.clone(),
        );
        registry.register(
            "reload_errors",
            "Manifest files or objects rejected on reload",
            m.reload_errors.clone(),
        );
        registry.register(
            "identity_certificates_issued",
            "Workload certificates signed",
            m.certificates_issued.clone(),
        );
        registry.register(
            "identity_certify_refusals",
            "Certificate requests refused, by reason",
            m.certify_refusals.clone(),
        );
        registry.register(
            "api_refusals",
            "Discovery and inbound-policy calls refused (no or unknown credential, another workload's policy, an address past its share of watches), and gRPC connections closed at once (an address past its share), by service and reason",
            m.api_refusals.clone(),
        );
        registry.register(
            "watch_failing",
            "1 while the controller's watch of a kind on the Kubernetes API fails (retried with backoff; what was read of the kind stays in force meanwhile), by kind",
            m.watch_failing.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans not delivered to the collector: the export queue was full, or the collector failed or did not answer",
            m.trace_spans_dropped.clone(),
        );
        if let Some(at) = issuer_expiry {
            m.issuer_expiry.set(at);
            registry.register(
                "identity_issuer_expiration_timestamp_seconds",
                "When the issuer that signs workload certificates expires, in Unix seconds: rotate it before",
                m.issuer_expiry.clone(),
            );
        }
        Arc::new(Metrics { registry, ..m })
    }

    /// A new issuer was taken (its files renewed).
    pub fn issuer_expires_at(&self, at: i64) {
        self.issuer_expiry.set(at);
    }

    pub fn observe_snapshot(&self, s: &Snapshot) {
        self.index_services.set(s.services.len() as i64);
        self.index_endpoints.set(s.endpoint_count() as i64);
        self.index_pods.set(s.pods.len() as i64);
        self.index_version.set(s.version as i64);
    }

    pub fn certify_refused(&self, reason: &'static str) {
        self.certify_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn api_refused(&self, service: &'static str, reason: &'static str) {
        self.api_refusals
            .get_or_create(&RefusalLabels { service, reason })
            .inc();
    }

    pub fn encode(&self) -> String {
        self.encode_into(String::new())
    }

    /// The text appended to `out`.
    pub fn encode_into(&self, mut out: String) -> String {
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Admits watches: at most a share per source address, each counted while it
/// is open.
#[derive(Clone, Debug)]
pub struct Watches {
    metrics: Arc<Metrics>,
    per_source: PerSource,
    /// Of one view: each open watch keeps its latest view encoded and queued
    /// until its proxy reads it, so a caller that opened its whole share of
    /// watches on the largest Service, and read none, would hold that many
    /// copies of it.
    per_view: PerSource,
    /// Cancelled when the controller stops: every watch ends then, so that
    /// its connection can close and the server's graceful shutdown finish
    /// (watches never end on their own), and each proxy moves to a replica
    /// that stays.
    stopping: tokio_util::sync::CancellationToken,
}

impl Watches {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Watches {
            metrics,
            per_source: PerSource::sparing_loopback(defaults::WATCHES_PER_SOURCE),
            per_view: PerSource::sparing_loopback(defaults::WATCHES_PER_SOURCE_AND_VIEW),
            stopping: Default::default(),
        }
    }

    /// Ends every open watch, and any opened after.
    pub fn end_all(&self) {
        self.stopping.cancel();
    }

    /// A watch of `service` for a caller at `source`, of the view `what`
    /// (a hash of it), unless that address holds its share of watches, or of
    /// watches of that view, already.
    pub fn open(
        &self,
        service: &'static str,
        source: Option<IpAddr>,
        what: &impl std::hash::Hash,
    ) -> Result<WatchGuard, tonic::Status> {
        let what = {
            use std::hash::{BuildHasher, BuildHasherDefault};
            BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                .hash_one(what)
        };
        let Some(same) = self.per_view.take_of(source, what) else {
            self.metrics.api_refused(service, "too_many_watches");
            return Err(tonic::Status::resource_exhausted(format!(
                "{} watches of this are open from this address already",
                self.per_view.limit()
            )));
        };
        let Some(share) = self.per_source.take(source) else {
            self.metrics.api_refused(service, "too_many_watches");
            return Err(tonic::Status::resource_exhausted(format!(
                "{} watches are open from this address already",
                self.per_source.limit()
            )));
        };
        let g = self
            .metrics
            .watches
            .get_or_create(&ServiceLabels { service })
            .clone();
        g.inc();
        Ok(WatchGuard {
            open: g,
            _share: share,
            _same: same,
            stopping: self.stopping.clone(),
        })
    }
}

/// Counts an open watch, and holds its place among its source's, for as long
/// as it lives.
#[derive(Debug)]
pub struct WatchGuard {
    open: Gauge,
    _share: Share,
    _same: Share,
    stopping: tokio_util::sync::CancellationToken,
}

impl WatchGuard {
    /// Resolves when the controller stops: the watch's stream ends there.
    pub fn ended(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.stopping.clone().cancelled_owned()
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.open.dec();
    }
}
