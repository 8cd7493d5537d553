//! The logical destination (a Service and port) and the stages built for it: its
//! route rules and its backends, each built once from discovery's view and kept
//! until the view changes. A new view rebuilds the stages but carries their state
//! over by target (a backend's endpoint latencies and ejections, a route's retry
//! budget), so no per-target state is lost to an update.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::retry::RetryBudget;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::http::{self as stack, RouteService};
use super::route::{PathMatch, Rule, Table};
use crate::balance::Endpoints;
use crate::control::view::ServiceView;
use crate::http::error::{KeepUnread, ReturnUnsent, error_response};
use crate::http::forward::Forward;
use crate::http::{BoxBody, BoxError, boxed};
use crate::retry::{BudgetConfig, ReplayBody};
use crate::telemetry::Metrics;
use crate::telemetry::metrics::RouteMetrics;

/// What building a destination's stages takes.
#[derive(Clone, Debug)]
pub struct Builder {
    pub forward: Forward,
    pub metrics: Arc<Metrics>,
    /// Request bodies up to this size are kept for retries.
    pub replay_limit: usize,
}

/// One destination's stages, rebuilt when its view changes.
#[derive(Debug, Default)]
pub struct Logical {
    current: Mutex<Option<Arc<Stages>>>,
    /// What the stages were first built with, to rebuild them as soon as a
    /// new view arrives rather than at the next request.
    builder: OnceLock<Builder>,
    /// The destination stopped being a meshed Service after views up to this
    /// version: a request that resolved one of them before gets stages of
    /// its own, not kept.
    gone_after: std::sync::atomic::AtomicU64,
}

struct RouteStage {
    rule: Rule,
    service: RouteService,
    /// Held for as long as `service` counts into it.
    metrics: Arc<RouteMetrics>,
    /// The counters of what this build of the rule does, made at its first
    /// request (`RouteMetrics::bring`).
    brought: std::sync::Once,
    budget: (BudgetConfig, Arc<RetryBudget>),
}

pub struct Stages {
    view: Arc<ServiceView>,
    table: Table,
    routes: Vec<RouteStage>,
    backends: HashMap<Arc<str>, Arc<Endpoints>>,
    replay_limit: usize,
    metrics: Arc<Metrics>,
    /// The series of requests no rule matches (`route="unmatched"`), made
    /// with the first: a route that 404s everything shows as failing, not
    /// as no traffic.
    unmatched: OnceLock<Arc<RouteMetrics>>,
}

impl std::fmt::Debug for Stages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stages")
            .field("service", &self.view.name)
            .field("version", &self.view.version)
            .finish()
    }
}

impl Logical {
    /// The stages for `view`: the current ones, or new ones built from it.
    pub fn stages(&self, view: &Arc<ServiceView>, b: &Builder) -> Arc<Stages> {
        self.builder.get_or_init(|| b.clone());
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = &*current
            && (Arc::ptr_eq(&s.view, view) || s.view.version > view.version)
        {
            // Current, or newer than the view a slow caller resolved earlier.
            return s.clone();
        }
        if view.version <= self.gone_after.load(std::sync::atomic::Ordering::Relaxed) {
            return Arc::new(Stages::build(view.clone(), None, b));
        }
        let s = Arc::new(Stages::build(view.clone(), current.as_deref(), b));
        *current = Some(s.clone());
        s
    }
}

impl Logical {
    /// A new view arrived: stages in use are rebuilt at once, so that
    /// requests already under way (a retry waiting out its backoff) find the
    /// new endpoints (`Endpoints::replacement`) rather than the old ones.
    pub fn refresh(&self, view: &Arc<ServiceView>) {
        if let Some(b) = self.builder.get() {
            self.stages(view, b);
        }
    }

    /// The destination is no longer a meshed Service (deleted, its port
    /// removed, made an ExternalName) as of the update numbered `version`:
    /// its stages go once requests under way let go of them, and with them
    /// their metric series and their share of the ejected-endpoints gauge,
    /// which callers still dialling the old address would otherwise keep.
    pub fn clear(&self, version: u64) {
        self.gone_after
            .fetch_max(version, std::sync::atomic::Ordering::Relaxed);
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

impl Stages {
    fn build(view: Arc<ServiceView>, prev: Option<&Stages>, b: &Builder) -> Stages {
        tracing::debug!(service = %view.name, version = view.version, "building the stages of a destination");
        let mut backends = HashMap::new();
        for bv in &view.backends {
            let old = prev.and_then(|p| p.backends.get(&bv.name));
            let eps = Endpoints::new(
                bv.name.clone(),
                &bv.endpoints,
                bv.config.clone(),
                old.map(|e| &**e),
                b.metrics.backend(&view.name, &bv.name),
            );
            backends.insert(bv.name.clone(), eps);
        }
        let rules: Vec<Rule> = if view.attached {
            view.routes.clone()
        } else {
            let default = view
                .default_backend()
                .map_or_else(|| view.name.clone(), |b| b.name.clone());
            vec![Rule::default_for(default)]
        };
        let table = Table::new(&rules);
        let routes = rules
            .into_iter()
            .map(|rule| {
                // A route keeps its budget (its recent requests and retries)
                // while its budget's settings stay the same.
                let budget = prev
                    .and_then(|p| {
                        p.routes.iter().find(|r| {
                            r.rule.route == rule.route
                                && r.rule.rule == rule.rule
                                && r.budget.0 == view.budget
                        })
                    })
                    .map(|r| r.budget.clone())
                    .unwrap_or_else(|| (view.budget.clone(), Arc::new(view.budget.build())));
                let metrics = b.metrics.route(&view.name, &rule.route, &rule.rule);
                let service = stack::route(&view.name, &rule, &backends, &budget.1, &metrics, b);
                RouteStage {
                    rule,
                    service,
                    metrics,
                    brought: std::sync::Once::new(),
                    budget,
                }
            })
            .collect();
        Stages {
            view,
            table,
            routes,
            backends,
            replay_limit: b.replay_limit,
            metrics: b.metrics.clone(),
            unmatched: OnceLock::new(),
        }
    }

    /// The endpoints of the default backend (opaque streams go there).
    pub fn default_backend(&self) -> Option<&Arc<Endpoints>> {
        let name = &self.view.default_backend()?.name;
        self.backends.get(name)
    }

    /// Sends a request along the rule it matches.
    pub async fn serve<B>(self: Arc<Self>, req: Request<B>) -> Response<BoxBody>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // The matched prefix is borrowed from the table this future owns.
        let selected = self.table.select(&req).map(|(i, m)| {
            let prefix = match &m.path {
                PathMatch::Prefix(p) => Some(p.as_str()),
                _ => None,
            };
            (i, prefix)
        });
        let Some((i, prefix)) = selected else {
            // Routes are attached and none matches: Gateway API says 404.
            let m = self
                .unmatched
                .get_or_init(|| self.metrics.route(&self.view.name, "unmatched", ""));
            m.requests.inc();
            let grpc = crate::http::grpc::is_call(&req)
                .then(|| crate::http::grpc::UntilAnswered::new(m.clone()));
            let rsp = error_response(
                "no_route",
                StatusCode::NOT_FOUND,
                "no route matches the request",
            );
            m.http.get().observe(rsp.status(), 0.0);
            return crate::http::grpc::UntilAnswered::respond(grpc, rsp);
        };
        let stage = &self.routes[i];
        if let Some(n) = crate::telemetry::trace::notes(&req) {
            let r = &stage.rule;
            n.with(|n| n.route = Some((self.view.name.clone(), r.route.clone(), r.rule.clone())));
        }
        let m = &stage.metrics;
        m.requests.inc();
        stage.brought.call_once(|| {
            m.bring(crate::telemetry::metrics::Configured {
                request_timeout: stage.rule.request_timeout.is_some(),
                backend_timeout: stage.rule.backend_timeout.is_some(),
                retries_responses: stage.rule.retry.retries_responses(),
            })
        });
        // A gRPC call whose caller goes away before the head is counted
        // `cancelled` as this future is dropped.
        let grpc = crate::http::grpc::is_call(&req)
            .then(|| crate::http::grpc::UntilAnswered::new(m.clone()));
        let start = Instant::now();
        let mut req = req.map(boxed);
        let in_flight = stage.rule.request_timeout.is_some().then(|| {
            let a = crate::outbound::backend::InFlight::default();
            req.extensions_mut().insert(a.clone());
            a
        });
        let mut rsp = match stage.rule.filters.on_request(&mut req, prefix) {
            Err(redirect) => *redirect,
            Ok(()) => {
                // A rule that retries only requests never sent needs no copy of
                // the body: an unsent body is still whole.
                let keep = if stage.rule.retry.retries_responses() {
                    if stage.rule.backend_timeout.is_some() {
                        // The 504 of an attempt that timed out is made above
                        // the balancer, which no longer answers for it: the
                        // endpoint it picked is noted here for the retry to
                        // avoid.
                        req.extensions_mut()
                            .insert(crate::balance::Picked::default());
                    }
                    self.replay_limit
                } else {
                    // Retried only if it never left, and then handed back.
                    req.extensions_mut().insert(ReturnUnsent);
                    0
                };
                let mut req = req.map(|body| ReplayBody::new(body, keep));
                if stage.rule.backend_timeout.is_some()
                    && let Some(end) = req.body().end_noted()
                {
                    // For the balancer: a timed-out attempt whose body was
                    // sent in time is the endpoint's failure.
                    req.extensions_mut().insert(end);
                }
                if keep > 0 && req.body().too_large() {
                    req.extensions_mut().insert(KeepUnread);
                }
                let mut svc = stage.service.clone();
                match svc.ready().await {
                    Ok(svc) => match svc.call(req).await {
                        Ok(rsp) => rsp,
                        Err(never) => match never {},
                    },
                    Err(never) => match never {},
                }
            }
        };
        if let Some(a) = &in_flight
            && rsp
                .extensions()
                .get::<crate::timeout::TimedOut>()
                .is_some_and(|t| t.0 == crate::timeout::Kind::Request)
        {
            a.timed_out(&rsp);
        }
        stage.rule.filters.on_response(&mut rsp);
        m.http
            .get()
            .observe(rsp.status(), start.elapsed().as_secs_f64());
        crate::http::grpc::UntilAnswered::respond(grpc, rsp)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use strait_api::v1 as api;

    use super::*;
    use crate::control::view::Resolution;

    fn builder() -> (Builder, crate::transport::DrainTrigger) {
        let (trigger, drain) = crate::transport::drain::channel();
        let forward = Forward::new(
            crate::http::client::ClientCache::new(Duration::from_secs(1), None),
            crate::addr::OwnAddrs::new([]),
            crate::tcp::TcpConfig {
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(10),
                names: Default::default(),
                drain: None,
            },
            Metrics::new(),
            drain,
            crate::telemetry::Direction::Outbound,
        );
        let b = Builder {
            forward,
            metrics: Metrics::new(),
            replay_limit: 0,
        };
        (b, trigger)
    }

    fn view(version: u64) -> Arc<ServiceView> {
        let update = api::DestinationUpdate {
            kind: Some(api::destination_update::Kind::Service(api::Service {
                name: "web.shop.svc.cluster.local:80".into(),
                version,
                backends: vec![api::Backend {
                    name: "web.shop.svc.cluster.local:80".into(),
                    endpoints: vec![api::Endpoint {
                        addr: Some(api::SocketAddress {
                            addr: "10.0.0.1:8080".into(),
                        }),
                        weight: 1,
                        ..Default::default()
                    }],
                    policy: None,
                }],
                ..Default::default()
            })),
        };
        match crate::control::view::parse(update, None).unwrap() {
            Resolution::Service(v) => v,
            Resolution::NotMeshed => panic!("a Service"),
        }
    }

    /// A Service deleted (or its port, or made an ExternalName) while
    /// callers still dial its old address: its stages go, and with them
    /// their metric series and their share of the ejected-endpoints gauge.
    /// A request that resolved the old view before gets stages of its own,
    /// not kept; the Service back is kept again.
    #[tokio::test]
    async fn a_destination_no_longer_meshed_lets_its_stages_go() {
        let (b, _drain) = builder();
        let l = Logical::default();
        let kept = |s: Arc<Stages>| {
            let weak = Arc::downgrade(&s);
            drop(s);
            weak.upgrade().is_some()
        };
        assert!(kept(l.stages(&view(1), &b)));
        l.clear(1);
        assert!(l.current.lock().unwrap().is_none());
        assert!(!kept(l.stages(&view(1), &b)), "an old view's stages kept");
        assert!(kept(l.stages(&view(2), &b)), "the Service back");
    }
}
