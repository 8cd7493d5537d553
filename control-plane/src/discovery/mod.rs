//! The discovery service: a proxy watches a destination and gets its view, then a
//! new view whenever it changes. Views are computed once per change per destination
//! (and per caller zone, for a Service with zone hints in force), and shared by
//! every proxy watching it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt};
use strait_api::v1 as api;
use strait_api::v1::discovery_server::Discovery;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::defaults;
use crate::identity::caller::{Authenticator, Caller};
use crate::identity::serving;
use crate::index::view;
use crate::index::{DestKey, Snapshot};
use crate::metrics::{Metrics, Watches};
use zones::{Found, Zone, Zones};

mod zones;

type Update = Arc<api::DestinationUpdate>;

/// A destination as seen from a zone (`None`: a caller of unknown zone).
type ViewKey = (DestKey, Option<String>);

/// The current view of every watched destination.
#[derive(Debug)]
pub struct Views {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    entries: Mutex<Entries>,
    metrics: Arc<Metrics>,
    zones: Zones,
}

#[derive(Debug)]
struct Entries {
    views: HashMap<ViewKey, watch::Sender<Update>>,
    /// Size at which views nobody watches any more are dropped, so that watches
    /// that come and go do not grow the map between index changes.
    prune_at: usize,
    /// The snapshot the last round recomputed the views from. A new watch's
    /// first view is built from it, not from a newer one a round under way
    /// has not reached: that round would push its older view over it.
    snap: Arc<Snapshot>,
}

/// The index version a view was computed from and when the index changed to
/// it, which are not part of what the view says.
type Stamp = (u64, Option<prost_types::Timestamp>);

fn stamp_of(u: &api::DestinationUpdate) -> Stamp {
    match &u.kind {
        Some(api::destination_update::Kind::Service(s)) => (s.version, s.changed_at),
        _ => (0, None),
    }
}

/// When `snap`'s index change happened, by this host's clock.
fn changed_at(snap: &Snapshot) -> Option<prost_types::Timestamp> {
    let at = std::time::SystemTime::now().checked_sub(snap.built.elapsed())?;
    Some(at.into())
}

fn set_stamp(u: &mut api::DestinationUpdate, (version, at): Stamp) {
    if let Some(api::destination_update::Kind::Service(s)) = &mut u.kind {
        s.version = version;
        s.changed_at = at;
    }
}

impl Views {
    pub fn new(snapshot: watch::Receiver<Arc<Snapshot>>, metrics: Arc<Metrics>) -> Arc<Self> {
        let snap = snapshot.borrow().clone();
        Arc::new(Views {
            zones: Zones::new(snapshot.clone()),
            snapshot,
            entries: Mutex::new(Entries {
                views: HashMap::new(),
                prune_at: defaults::VIEWS_PRUNE_AT,
                snap,
            }),
            metrics,
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self, key: ViewKey) -> watch::Receiver<Update> {
        let mut entries = self.entries();
        if let Some(tx) = entries.views.get(&key) {
            return tx.subscribe();
        }
        if entries.views.len() >= entries.prune_at {
            entries.views.retain(|_, tx| tx.receiver_count() > 0);
            entries.prune_at = (entries.views.len() * 2).max(defaults::VIEWS_PRUNE_AT);
        }
        let snap = entries.snap.clone();
        let built = view::build(&snap, &key.0, key.1.as_deref());
        if built.cut {
            // Until the next round counts them all again.
            self.metrics.views_cut.inc();
        }
        let mut first = built.update;
        set_stamp(&mut first, (snap.version, changed_at(&snap)));
        let tx = watch::Sender::new(Arc::new(first));
        let rx = tx.subscribe();
        entries.views.insert(key, tx);
        self.metrics
            .watched_destinations
            .set(entries.views.len() as i64);
        rx
    }

    /// Recomputes every watched view on each new snapshot and pushes the
    /// changed ones. A round builds every watched view, tens of thousands of
    /// endpoints in a large mesh: it runs off the runtime's workers, which
    /// it would otherwise hold from TLS handshakes, new watches and the
    /// fail-closed webhook, and snapshots made meanwhile make one round.
    pub async fn run(self: Arc<Self>) {
        let mut rx = self.snapshot.clone();
        while rx.changed().await.is_ok() {
            let snap = rx.borrow_and_update().clone();
            let this = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || this.round(snap)).await
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }

    /// Recomputes every watched view from `snap` and pushes the changed ones.
    fn round(&self, snap: Arc<Snapshot>) {
        let watched: Vec<(ViewKey, watch::Sender<Update>)> = {
            let mut entries = self.entries();
            entries.snap = snap.clone();
            entries.views.retain(|_, tx| tx.receiver_count() > 0);
            self.metrics
                .watched_destinations
                .set(entries.views.len() as i64);
            entries
                .views
                .iter()
                .map(|(k, tx)| (k.clone(), tx.clone()))
                .collect()
        };
        let (views, mut pushed) = (watched.len(), 0i64);
        let stamp = (snap.version, changed_at(&snap));
        // Each destination's zone-less view, and whether every zone's is the
        // same, with the update that view makes once stamped: shared by the
        // watchers of every zone that changed.
        let mut any_zone = HashMap::<DestKey, (view::Built, Option<Update>)>::new();
        let mut cut = 0i64;
        for ((dest, zone), tx) in watched {
            // By name and by cluster IP, a Service is one view.
            let dest = view::canonical(&snap, &dest);
            let (common, next) = any_zone
                .entry(dest.clone())
                .or_insert_with(|| (view::build(&snap, &dest, None), None));
            let everywhere = !common.hinted;
            let old = tx.borrow().clone();
            // Compared as of the same version: a change elsewhere in the mesh
            // is not a change of this view, and is not pushed.
            let update = match zone {
                Some(z) if !everywhere => {
                    let built = view::build(&snap, &dest, Some(&z));
                    cut += i64::from(built.cut);
                    let mut v = built.update;
                    set_stamp(&mut v, stamp_of(&old));
                    (*old != v).then(|| {
                        set_stamp(&mut v, stamp);
                        Arc::new(v)
                    })
                }
                _ => {
                    cut += i64::from(common.cut);
                    let common = &mut common.update;
                    set_stamp(common, stamp_of(&old));
                    (*old != *common).then(|| {
                        next.get_or_insert_with(|| {
                            let mut v = common.clone();
                            set_stamp(&mut v, stamp);
                            Arc::new(v)
                        })
                        .clone()
                    })
                }
            };
            if let Some(u) = update {
                tx.send_replace(u);
                self.metrics
                    .push_latency
                    .observe(snap.built.elapsed().as_secs_f64());
                pushed += 1;
            }
        }
        self.metrics.views_cut.set(cut);
        // From the index change to the last view handed to the streams.
        crate::spans::record(
            "discovery.push",
            crate::spans::since(snap.built.into_std()),
            vec![
                opentelemetry::KeyValue::new("strait.index.version", snap.version as i64),
                opentelemetry::KeyValue::new("strait.views.watched", views as i64),
                opentelemetry::KeyValue::new("strait.views.pushed", pushed),
            ],
            None,
        );
    }
}

#[derive(Debug)]
pub struct DiscoveryService {
    views: Arc<Views>,
    watches: Watches,
    /// With identities on: only proxies of the mesh may watch.
    auth: Option<Authenticator>,
}

impl DiscoveryService {
    pub fn new(views: Arc<Views>, watches: Watches, auth: Option<Authenticator>) -> Self {
        DiscoveryService {
            views,
            watches,
            auth,
        }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<api::DestinationUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        req: Request<api::WatchDestination>,
    ) -> Result<Response<UpdateStream>, Status> {
        let caller = match &self.auth {
            Some(auth) => Some(auth.caller(&req, "discovery").await?),
            None => None,
        };
        let source = serving::source(&req);
        let w = req.into_inner();
        if w.destination.len() > defaults::MAX_DESTINATION_LEN {
            return Err(Status::invalid_argument(format!(
                "destination is longer than {} bytes",
                defaults::MAX_DESTINATION_LEN
            )));
        }
        let ns = match w.context_namespace.as_str() {
            "" => "default",
            // A view's key holds it: bounded as Kubernetes bounds the name.
            ns if crate::spec::dns_label(ns) => ns,
            _ => {
                return Err(Status::invalid_argument(
                    "context_namespace is not a Kubernetes namespace name",
                ));
            }
        };
        let key = DestKey::parse(&w.destination, ns)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The proxy's id is what it says: cut short and escaped.
        debug!(
            ?key,
            proxy = ?w.proxy_id.chars().take(100).collect::<String>(),
            "watch"
        );
        // A Service watched by its cluster IP (one of two, dual-stack) is
        // the view its name is: counted as it, against the address's share
        // of one view, or each spelling would hold that many more copies.
        let counted = match &key {
            DestKey::ClusterIp(sa) => self
                .views
                .snapshot
                .borrow()
                .by_cluster_ip
                .get(&sa.ip())
                .map(|svc| DestKey::Service {
                    svc: svc.clone(),
                    port: sa.port(),
                }),
            _ => None,
        };
        let guard = self
            .watches
            .open("discovery", source, counted.as_ref().unwrap_or(&key))?;
        let ended = Caller::watch_ends(caller.as_ref(), &self.views.snapshot, guard.ended());
        if let DestKey::External(_) = key {
            // Never a Service, whatever the index says: answered without keeping a
            // view, so made-up names cost nothing to hold. The stream stays open,
            // so the proxy notices a controller going away.
            let stream = futures_util::stream::once(async { Ok(view::not_meshed()) })
                .chain(futures_util::stream::pending())
                .map(move |u| {
                    let _alive = &guard;
                    u
                })
                .take_until(ended);
            return Ok(Response::new(Box::pin(stream)));
        }
        let zone = Zone::of(&self.views.snapshot.borrow(), source, caller.as_ref());
        let stream = match source.filter(|a| zone == Zone::Unknown && !a.is_loopback()) {
            // A caller whose zone is not known yet (its pod's address not
            // reported when its proxy first asks, its node not read yet).
            Some(addr) => {
                let lookup = self.views.zones.lookup(addr, caller.as_ref());
                follow(self.views.clone(), key, lookup).boxed()
            }
            None => WatchStream::new(self.views.subscribe((key, zone.known()))).boxed(),
        };
        let stream = stream
            .map(move |u| {
                let _alive = &guard;
                Ok((*u).clone())
            })
            .take_until(ended);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The views of `key` for a watch whose zone is not known yet: the
/// zone-less view until `lookup` finds it, then its zone's. What is not
/// found (an address that is no pod's, a pod on its node's network, a node
/// without a zone) stays zone-less.
fn follow(
    views: Arc<Views>,
    key: DestKey,
    lookup: watch::Receiver<Option<Found>>,
) -> impl Stream<Item = Update> + Send {
    struct Follow {
        views: Arc<Views>,
        key: DestKey,
        rx: watch::Receiver<Update>,
        /// Until the zone is found, or the lookup ends.
        lookup: Option<watch::Receiver<Option<Found>>>,
        /// A view to send now: the zone's, just subscribed to.
        fresh: bool,
        /// When the index change that made the zone known happened: the zone's
        /// view is sent as of then, not as of its own last change (which may
        /// be long before this watch started, and would read as lag).
        found_at: Option<prost_types::Timestamp>,
    }
    let rx = views.subscribe((key.clone(), None));
    let start = Follow {
        views,
        key,
        rx,
        lookup: Some(lookup),
        fresh: true,
        found_at: None,
    };
    futures_util::stream::unfold(start, |mut st| async move {
        loop {
            if std::mem::take(&mut st.fresh) {
                let mut u = st.rx.borrow_and_update().clone();
                if let Some(at) = st.found_at.take() {
                    let mut restamped = (*u).clone();
                    set_stamp(&mut restamped, (stamp_of(&u).0, Some(at)));
                    u = Arc::new(restamped);
                }
                return Some((u, st));
            }
            let Some(lookup) = st.lookup.as_mut() else {
                st.rx.changed().await.ok()?;
                let u = st.rx.borrow_and_update().clone();
                return Some((u, st));
            };
            tokio::select! {
                changed = st.rx.changed() => {
                    changed.ok()?;
                    let u = st.rx.borrow_and_update().clone();
                    return Some((u, st));
                }
                changed = lookup.changed() => {
                    let found = changed.ok().and_then(|()| lookup.borrow_and_update().clone());
                    st.lookup = None;
                    if let Some(Found { zone, at }) = found {
                        st.rx = st.views.subscribe((st.key.clone(), Some(zone)));
                        st.fresh = true;
                        st.found_at = at;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::serving::PeerCerts;

    fn watch_from(addr: &str, service: usize) -> Request<api::WatchDestination> {
        let mut req = Request::new(api::WatchDestination {
            destination: format!("svc-{service}.shop.svc.cluster.local:80"),
            context_namespace: "shop".into(),
            proxy_id: "web-0.shop".into(),
        });
        req.extensions_mut().insert(PeerCerts {
            certs: None,
            addr: Some(addr.parse().unwrap()),
        });
        req
    }

    /// A discovery service on an empty index, without identities.
    fn service() -> (watch::Sender<Arc<Snapshot>>, Arc<Metrics>, DiscoveryService) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::empty("cluster.local")));
        let metrics = Metrics::new();
        let svc = DiscoveryService::new(
            Views::new(rx, metrics.clone()),
            Watches::new(metrics.clone()),
            None,
        );
        (tx, metrics, svc)
    }

    /// A pod that opens watch after watch is refused past its share, and
    /// nobody else is: the controller's memory is not its to take.
    #[tokio::test]
    async fn one_address_holds_at_most_its_share_of_watches() {
        let (_tx, metrics, svc) = service();
        let mut open = Vec::new();
        for i in 0..defaults::WATCHES_PER_SOURCE {
            open.push(svc.watch(watch_from("10.0.0.7", i)).await.unwrap());
        }
        let refused = svc.watch(watch_from("10.0.0.7", 1)).await.err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("2048 watches"), "{refused:?}");
        assert!(svc.watch(watch_from("10.0.0.8", 1)).await.is_ok());
        assert!(svc.watch(watch_from("127.0.0.1", 1)).await.is_ok());
        // A watch that ends gives its place back.
        drop(open.pop());
        let again = svc.watch(watch_from("10.0.0.7", 1)).await.unwrap();
        let mut stream = again.into_inner();
        assert!(stream.next().await.unwrap().is_ok(), "answered");
        let text = metrics.encode();
        assert!(
            text.contains(
                "strait_controller_api_refusals_total{service=\"discovery\",reason=\"too_many_watches\"} 1"
            ),
            "{text}"
        );
    }

    /// Each watch holds its view, encoded, until its proxy reads it: one
    /// address cannot hold its whole share of watches on one (large) view.
    #[tokio::test]
    async fn one_address_holds_few_watches_of_one_view() {
        let (_tx, _, svc) = service();
        let mut open = Vec::new();
        for _ in 0..defaults::WATCHES_PER_SOURCE_AND_VIEW {
            open.push(svc.watch(watch_from("10.0.0.7", 1)).await.unwrap());
        }
        let refused = svc.watch(watch_from("10.0.0.7", 1)).await.err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("16 watches of this"),
            "{refused:?}"
        );
        // Another spelling of the same Service is the same view.
        let mut same = watch_from("10.0.0.7", 1);
        same.get_mut().destination = "svc-1.shop:80".into();
        assert!(svc.watch(same).await.is_err());
        assert!(svc.watch(watch_from("10.0.0.7", 2)).await.is_ok());
        assert!(svc.watch(watch_from("10.0.0.8", 1)).await.is_ok());
        assert!(svc.watch(watch_from("127.0.0.1", 1)).await.is_ok());
        drop(open.pop());
        assert!(svc.watch(watch_from("10.0.0.7", 1)).await.is_ok());
    }

    /// A Service watched by name and by its cluster IP is one view, and one
    /// share of watches.
    #[tokio::test]
    async fn a_service_by_its_cluster_ip_is_the_same_view_as_by_name() {
        let (tx, _, svc) = service();
        tx.send_replace(web_at(1, "10.0.0.1"));
        let to = |dest: &str| {
            let mut req = watch_from("10.0.0.7", 0);
            req.get_mut().destination = dest.into();
            req
        };
        let mut open = Vec::new();
        for _ in 0..defaults::WATCHES_PER_SOURCE_AND_VIEW {
            open.push(
                svc.watch(to("web.shop.svc.cluster.local:80"))
                    .await
                    .unwrap(),
            );
        }
        let refused = svc.watch(to("10.96.0.20:80")).await.err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // Another port is another view, and an address that is no Service's
        // is counted by itself.
        assert!(svc.watch(to("10.96.0.20:81")).await.is_ok());
        assert!(svc.watch(to("10.0.0.1:80")).await.is_ok());
        drop(open.pop());
        assert!(svc.watch(to("10.96.0.20:80")).await.is_ok());
    }

    /// Watched by name and by cluster IP, a Service's view is built once per
    /// change, and both watchers get that one update.
    #[test]
    fn a_service_by_name_and_by_cluster_ip_is_built_once_per_change() {
        let (_tx, rx) = watch::channel(web_at(1, "10.0.0.1"));
        let views = Views::new(rx, Metrics::new());
        let by_name = views.subscribe((DestKey::parse("web.shop:80", "shop").unwrap(), None));
        let by_ip = views.subscribe((DestKey::ClusterIp("10.96.0.20:80".parse().unwrap()), None));
        views.round(web_at(2, "10.0.0.2"));
        let (a, b) = (by_name.borrow().clone(), by_ip.borrow().clone());
        assert_eq!(endpoints(&a), (2, vec!["10.0.0.2:80".to_string()]));
        assert!(Arc::ptr_eq(&a, &b), "built twice");
    }

    /// A snapshot of one Service whose one endpoint is `addr`, at `version`.
    fn web_at(version: u64, addr: &str) -> Arc<Snapshot> {
        let yaml = format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec: {{clusterIP: 10.96.0.20, ports: [{{name: http, port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 80}}]
endpoints: [{{addresses: [{addr}]}}]
"#
        );
        let mut s = Snapshot::empty("cluster.local");
        for o in crate::manifests::parse_file(&yaml).unwrap() {
            o.insert_into(&mut s);
        }
        s.version = version;
        Arc::new(s)
    }

    fn endpoints(u: &api::DestinationUpdate) -> (u64, Vec<String>) {
        let Some(api::destination_update::Kind::Service(s)) = &u.kind else {
            return (0, Vec::new());
        };
        let addrs = s
            .backends
            .iter()
            .flat_map(|b| &b.endpoints)
            .filter_map(|e| e.addr.as_ref().map(|a| a.addr.clone()))
            .collect();
        (s.version, addrs)
    }

    /// A watched view too large to send is counted while it is, and the
    /// proxies watching it get one within the limit.
    #[test]
    fn a_watched_view_over_the_size_limit_is_counted_and_sent_within_it() {
        use crate::index::ObjKey;
        use crate::routes::RouteId;
        let big = |name: &str| {
            let id = RouteId::http(ObjKey {
                namespace: "shop".into(),
                name: name.into(),
            });
            (id, crate::index::view::tests::route_on(None, None, 3 << 20))
        };
        let mut s = (*web_at(1, "10.0.0.1")).clone();
        for name in ["a", "b", "c"] {
            let (id, spec) = big(name);
            s.add_route(id, spec);
        }
        let (tx, rx) = watch::channel(Arc::new(s));
        let metrics = Metrics::new();
        let views = Views::new(rx, metrics.clone());
        let key = (DestKey::parse("web.shop:80", "shop").unwrap(), None);
        let watching = views.subscribe(key);
        let gauge = |m: &Metrics| {
            m.encode()
                .lines()
                .find(|l| l.starts_with("strait_controller_views_cut "))
                .map(str::to_string)
        };
        assert_eq!(
            gauge(&metrics).as_deref(),
            Some("strait_controller_views_cut 1")
        );
        let sent = watching.borrow().clone();
        assert!(prost::Message::encoded_len(&*sent) <= defaults::MAX_DISCOVERY_VIEW_BYTES);
        let Some(api::destination_update::Kind::Service(svc)) = &sent.kind else {
            panic!("not a Service")
        };
        let routes: Vec<&str> = svc.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(routes, ["shop/a", "shop/b"]);
        assert_eq!(endpoints(&sent).1, ["10.0.0.1:80"]);
        // Once the routes that did not fit are gone, it is not counted.
        let mut s = (*web_at(2, "10.0.0.1")).clone();
        let (id, spec) = big("a");
        s.add_route(id, spec);
        tx.send_replace(Arc::new(s.clone()));
        views.round(Arc::new(s));
        assert_eq!(
            gauge(&metrics).as_deref(),
            Some("strait_controller_views_cut 0")
        );
    }

    /// A watch that starts while a round is recomputing the views from an
    /// older snapshot is never sent that older view after a newer one.
    #[test]
    fn a_new_watch_never_goes_back_to_an_older_view() {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::empty("cluster.local")));
        let views = Views::new(rx, Metrics::new());
        let (older, newer) = (web_at(1, "10.0.0.1"), web_at(2, "10.0.0.2"));
        // A round has taken `older` when `newer` is published and the watch starts.
        tx.send_replace(newer.clone());
        let key = DestKey::parse("web.shop:80", "shop").unwrap();
        let mut w = views.subscribe((key, None));
        let mut seen = vec![endpoints(&w.borrow_and_update())];
        views.round(older);
        seen.push(endpoints(&w.borrow_and_update()));
        views.round(newer);
        seen.push(endpoints(&w.borrow_and_update()));
        assert!(
            seen.windows(2).all(|p| p[0].0 <= p[1].0),
            "went back: {seen:?}"
        );
        assert_eq!(seen[2], (2, vec!["10.0.0.2:80".to_string()]));
    }

    /// What a watch keeps is bounded: a namespace that is no Kubernetes name
    /// (60 KB of it, say, on each of a pod's 2,048 watches) is refused.
    #[tokio::test]
    async fn a_context_namespace_that_is_no_name_is_refused() {
        let (_tx, _, svc) = service();
        for (ns, ok) in [("shop", true), ("", true), ("Shop", false)] {
            let mut req = watch_from("10.0.0.7", 1);
            req.get_mut().destination = "web:80".into();
            req.get_mut().context_namespace = ns.into();
            assert_eq!(svc.watch(req).await.is_ok(), ok, "{ns:?}");
        }
        let mut req = watch_from("10.0.0.7", 1);
        req.get_mut().destination = "web:80".into();
        req.get_mut().context_namespace = "a".repeat(60_000);
        let refused = svc.watch(req).await.err().unwrap();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    }
    /// The next update of a watch, within 5 s.
    async fn update(s: &mut UpdateStream) -> api::DestinationUpdate {
        tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
            .await
            .expect("an update")
            .unwrap()
            .unwrap()
    }

    /// A discovery service on `first`, without identities, its views kept
    /// up to date with the index sent on the returned sender.
    fn running(
        first: Arc<Snapshot>,
    ) -> (watch::Sender<Arc<Snapshot>>, Arc<Views>, DiscoveryService) {
        let (tx, rx) = watch::channel(first);
        let metrics = Metrics::new();
        let views = Views::new(rx, metrics.clone());
        tokio::spawn(views.clone().run());
        let svc = DiscoveryService::new(views.clone(), Watches::new(metrics), None);
        (tx, views, svc)
    }

    /// A watch of `dest` opened from `from`.
    async fn watch_of(svc: &DiscoveryService, from: &str, dest: &str) -> UpdateStream {
        let mut req = watch_from(from, 0);
        req.get_mut().destination = dest.into();
        svc.watch(req).await.unwrap().into_inner()
    }

    /// The index of a topology-aware Service (`api`) with an endpoint in
    /// each of two zones, a Service that is not (`plain`), nodes in both
    /// zones and one without a zone (`node-c`), and the pods `pods` (name,
    /// address, node).
    fn zoned(version: u64, pods: &[(&str, &str, &str)]) -> Arc<Snapshot> {
        let mut yaml = String::from(
            r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, annotations: {service.kubernetes.io/topology-mode: Auto}}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.0.1.1], zone: a, hints: {forZones: [{name: a}]}}
  - {addresses: [10.0.2.1], zone: b, hints: {forZones: [{name: b}]}}
---
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: a}}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, labels: {topology.kubernetes.io/zone: b}}
---
apiVersion: v1
kind: Node
metadata: {name: node-c}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {clusterIP: 10.96.0.31, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: plain-1, namespace: shop, labels: {kubernetes.io/service-name: plain}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.0.1.5], zone: a, hints: {forZones: [{name: a}]}}
"#,
        );
        for (name, ip, node) in pods {
            yaml += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{serviceAccountName: web, nodeName: {node}, containers: [{{name: web, image: web}}]}}\nstatus: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
            );
        }
        let mut s = Snapshot::empty("cluster.local");
        for o in crate::manifests::parse_file(&yaml).unwrap() {
            o.insert_into(&mut s);
        }
        s.version = version;
        Arc::new(s)
    }

    /// A proxy gets the endpoints meant for its pod's zone, found from the
    /// address it watches from; one whose pod the index does not hold yet
    /// gets them all, then its zone's once the pod is known, stamped with when
    /// that became known rather than with when its zone's view last changed.
    #[tokio::test]
    async fn a_watch_gets_the_endpoints_of_its_pods_zone() {
        // The index, and so every view of it, as of an hour ago.
        let hour = std::time::Duration::from_secs(3600);
        let mut first = Arc::try_unwrap(zoned(1, &[("web-0", "10.0.9.1", "node-a")])).unwrap();
        first.built -= hour;
        let (tx, _, svc) = running(Arc::new(first));
        let watch = |from: &'static str| watch_of(&svc, from, "api.shop:80");
        async fn next(s: &mut UpdateStream) -> Vec<String> {
            endpoints(&update(s).await).1
        }
        let mut in_a = watch("10.0.9.1").await;
        assert_eq!(next(&mut in_a).await, ["10.0.1.1:8080"]);
        let mut unknown = watch("10.0.9.2").await;
        assert_eq!(next(&mut unknown).await, ["10.0.1.1:8080", "10.0.2.1:8080"]);
        // Its pod is reported, on a node of zone a: whose view, watched by
        // `in_a`, has not changed for an hour.
        tx.send_replace(zoned(
            2,
            &[
                ("web-0", "10.0.9.1", "node-a"),
                ("web-1", "10.0.9.2", "node-a"),
            ],
        ));
        let found = update(&mut unknown).await;
        assert_eq!(endpoints(&found).1, ["10.0.1.1:8080"]);
        let Some(api::destination_update::Kind::Service(s)) = &found.kind else {
            panic!("{found:?}");
        };
        let at = std::time::SystemTime::try_from(s.changed_at.unwrap()).unwrap();
        let lag = std::time::SystemTime::now()
            .duration_since(at)
            .unwrap_or_default();
        assert!(lag < hour / 2, "read by the proxy as a lag of {lag:?}");
        // From the loopback address (a proxy beside a local controller): all.
        let mut local = watch("127.0.0.1").await;
        assert_eq!(next(&mut local).await, ["10.0.1.1:8080", "10.0.2.1:8080"]);
    }

    /// A caller's zone is looked for during `ZONE_LOOKUP` only: its pod
    /// reported after that leaves the watch on every endpoint, with no update.
    #[tokio::test(start_paused = true)]
    async fn a_zone_found_after_the_lookup_ends_is_not_followed() {
        let (tx, _, svc) = running(zoned(1, &[]));
        let mut unknown = watch_of(&svc, "10.0.9.2", "api.shop:80").await;
        assert_eq!(
            endpoints(&update(&mut unknown).await).1,
            ["10.0.1.1:8080", "10.0.2.1:8080"]
        );
        tokio::time::sleep(defaults::ZONE_LOOKUP + std::time::Duration::from_secs(1)).await;
        tx.send_replace(zoned(2, &[("web-1", "10.0.9.2", "node-b")]));
        let late = tokio::time::timeout(std::time::Duration::from_secs(60), unknown.next()).await;
        assert!(late.is_err(), "followed after the lookup ended: {late:?}");
    }

    /// A watch that joins an address's lookup late still waits the whole
    /// `ZONE_LOOKUP` for its zone, and the earlier watch with it; the lookup
    /// ends once that moved window is over.
    #[tokio::test(start_paused = true)]
    async fn a_watch_joining_a_lookup_late_waits_the_whole_window() {
        let t0 = tokio::time::Instant::now();
        let (tx, views, svc) = running(zoned(1, &[]));
        let mut first = watch_of(&svc, "10.0.9.2", "api.shop:80").await;
        let mut other = watch_of(&svc, "10.0.9.3", "api.shop:80").await;
        update(&mut first).await;
        update(&mut other).await;
        let most = defaults::ZONE_LOOKUP - std::time::Duration::from_secs(10);
        tokio::time::sleep(most).await;
        let mut late = watch_of(&svc, "10.0.9.2", "plain.shop:80").await;
        let mut other_late = watch_of(&svc, "10.0.9.3", "plain.shop:80").await;
        update(&mut late).await;
        update(&mut other_late).await;
        tokio::time::sleep(most).await;
        assert_eq!(
            views.zones.pending(),
            2,
            "ended before the late watches' window"
        );
        tx.send_replace(zoned(2, &[("web-1", "10.0.9.2", "node-b")]));
        assert_eq!(endpoints(&update(&mut first).await).1, ["10.0.2.1:8080"]);
        // The other address's zone never comes: its lookup ends with the
        // late watch's window, not before.
        assert_eq!(views.zones.pending(), 1);
        tokio::time::sleep(std::time::Duration::from_secs(9)).await;
        assert_eq!(views.zones.pending(), 1, "ended before its window");
        lookups_end(&views).await;
        let waited = t0.elapsed();
        assert!(
            waited <= most + defaults::ZONE_LOOKUP + std::time::Duration::from_secs(2),
            "ended {waited:?} in"
        );
    }

    /// `snap` with a second endpoint for `api` in each zone and one for `plain`.
    fn grown(snap: &Snapshot) -> Arc<Snapshot> {
        let yaml = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-2, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.0.1.2], zone: a, hints: {forZones: [{name: a}]}}
  - {addresses: [10.0.2.2], zone: b, hints: {forZones: [{name: b}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: plain-2, namespace: shop, labels: {kubernetes.io/service-name: plain}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.0.2.5], zone: b}
"#;
        let mut next = snap.clone();
        for o in crate::manifests::parse_file(yaml).unwrap() {
            o.insert_into(&mut next);
        }
        next.version += 1;
        next.built = tokio::time::Instant::now();
        Arc::new(next)
    }

    /// A change to a Service without zone hints in force is computed once,
    /// and the watchers of every zone get the same update; one with hints
    /// gives each zone its own.
    #[tokio::test]
    async fn a_destination_without_zone_hints_is_computed_once_for_every_zone() {
        let first = zoned(1, &[]);
        let (_tx, rx) = watch::channel(first.clone());
        let views = Views::new(rx, Metrics::new());
        let zones = [None, Some("a"), Some("b")];
        let watch = |dest: &str| -> Vec<watch::Receiver<Update>> {
            let dest = DestKey::parse(dest, "shop").unwrap();
            zones
                .iter()
                .map(|z| views.subscribe((dest.clone(), z.map(String::from))))
                .collect()
        };
        let (mut plain, mut api) = (watch("plain.shop:80"), watch("api.shop:80"));
        views.round(grown(&first));
        let seen = |rx: &mut watch::Receiver<Update>| -> (Update, Vec<String>) {
            assert!(rx.has_changed().unwrap(), "no update");
            let u = rx.borrow_and_update().clone();
            let eps = endpoints(&u).1;
            (u, eps)
        };
        let plain: Vec<_> = plain.iter_mut().map(seen).collect();
        for (u, eps) in &plain {
            assert_eq!(eps, &["10.0.1.5:8080", "10.0.2.5:8080"]);
            assert!(Arc::ptr_eq(u, &plain[0].0), "computed again for a zone");
        }
        let api: Vec<Vec<String>> = api.iter_mut().map(|rx| seen(rx).1).collect();
        assert_eq!(
            api,
            [
                vec![
                    "10.0.1.1:8080",
                    "10.0.1.2:8080",
                    "10.0.2.1:8080",
                    "10.0.2.2:8080"
                ],
                vec!["10.0.1.1:8080", "10.0.1.2:8080"],
                vec!["10.0.2.1:8080", "10.0.2.2:8080"],
            ]
        );
    }

    /// Until no lookup is under way, within 5 s.
    async fn lookups_end(views: &Views) {
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while views.zones.pending() > 0 {
                // A sleep, not a yield, so that a paused clock moves on and
                // the timeout can fire.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("lookups under way");
    }

    /// Every watch from an address whose zone is not known yet waits on one
    /// lookup of it, which ends as soon as its pod's node is known, with a
    /// zone or without one; a watch from a pod known to be of no zone starts
    /// no lookup.
    #[tokio::test]
    async fn the_watches_of_one_address_share_one_lookup_of_its_zone() {
        let (tx, views, svc) = running(zoned(1, &[]));
        let watch = |from: &'static str, dest: &'static str| watch_of(&svc, from, dest);
        let mut api = watch("10.0.9.2", "api.shop:80").await;
        let mut plain = watch("10.0.9.2", "plain.shop:80").await;
        let mut zoneless = watch("10.0.9.3", "api.shop:80").await;
        for s in [&mut api, &mut zoneless] {
            assert_eq!(
                endpoints(&update(s).await).1,
                ["10.0.1.1:8080", "10.0.2.1:8080"]
            );
        }
        assert_eq!(endpoints(&update(&mut plain).await).1, ["10.0.1.5:8080"]);
        assert_eq!(views.zones.pending(), 2, "one lookup per address");
        // One pod reported on a node of zone b, the other on a node without one.
        tx.send_replace(zoned(
            2,
            &[
                ("web-1", "10.0.9.2", "node-b"),
                ("web-2", "10.0.9.3", "node-c"),
            ],
        ));
        assert_eq!(endpoints(&update(&mut api).await).1, ["10.0.2.1:8080"]);
        assert_eq!(endpoints(&update(&mut plain).await).1, ["10.0.1.5:8080"]);
        lookups_end(&views).await;
        let mut again = watch("10.0.9.3", "plain.shop:80").await;
        assert_eq!(endpoints(&update(&mut again).await).1, ["10.0.1.5:8080"]);
        assert_eq!(views.zones.pending(), 0, "looked up again");
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(50), zoneless.next());
        assert!(quiet.await.is_err(), "a zone-less watch was sent an update");
    }

    /// The pod at a watch's address is its caller's only if the identity the
    /// caller proved is the pod's (a new pod may hold an address an old one
    /// had, before the index knows): otherwise its zone is not the caller's.
    #[test]
    fn a_pod_of_another_identity_at_the_address_gives_no_zone() {
        let snap = zoned(1, &[("web-1", "10.0.9.2", "node-b")]);
        let caller = |ns: &str, sa: &str| Caller {
            namespace: ns.into(),
            service_account: sa.into(),
            until: None,
            token: None,
        };
        let at = Some("10.0.9.2".parse().unwrap());
        let zone = |c: Option<&Caller>| Zone::of(&snap, at, c);
        assert_eq!(zone(Some(&caller("shop", "web"))), Zone::In("b".into()));
        assert_eq!(zone(Some(&caller("shop", "db"))), Zone::Unknown);
        assert_eq!(zone(Some(&caller("pay", "web"))), Zone::Unknown);
        assert_eq!(zone(None), Zone::In("b".into()));
    }
}
