//! A stand-in for the Kubernetes API server, for the kinds strait uses, that
//! speaks its list/watch protocol as a real client (kube-rs) expects it:
//! resourceVersions on every object and list, watch event streams (one JSON
//! object per line) resumable from a resourceVersion, bookmarks, `410 Gone`
//! when asked to resume from a compacted version (so the client relists), and
//! watches the test can cut. Also TokenReview, `status` subresource patches
//! and Leases (get, create, update with optimistic concurrency).
//!
//! Tests change objects through [`KubeApi::apply`] and [`KubeApi::delete`], as
//! controllers and kubectl would.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

type Body = BoxBody<Bytes, Infallible>;

/// A collection the stand-in serves: (URL prefix, apiVersion, kind, plural).
const KINDS: &[(&str, &str, &str, &str)] = &[
    ("/api/v1", "v1", "Service", "services"),
    ("/api/v1", "v1", "Pod", "pods"),
    ("/api/v1", "v1", "Node", "nodes"),
    ("/api/v1", "v1", "Namespace", "namespaces"),
    ("/api/v1", "v1", "LimitRange", "limitranges"),
    (
        "/apis/discovery.k8s.io/v1",
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "endpointslices",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1",
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        "httproutes",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1",
        "gateway.networking.k8s.io/v1",
        "GRPCRoute",
        "grpcroutes",
    ),
    (
        "/apis/policy.strait.dev/v1alpha1",
        "policy.strait.dev/v1alpha1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "/apis/policy.strait.dev/v1alpha1",
        "policy.strait.dev/v1alpha1",
        "BackendPolicy",
        "backendpolicies",
    ),
    (
        "/apis/coordination.k8s.io/v1",
        "coordination.k8s.io/v1",
        "Lease",
        "leases",
    ),
    ("/api/v1", "v1", "ConfigMap", "configmaps"),
    ("/api/v1", "v1", "Secret", "secrets"),
    ("/apis/apps/v1", "apps/v1", "Deployment", "deployments"),
    ("/apis/apps/v1", "apps/v1", "ReplicaSet", "replicasets"),
    (
        "/apis/apiextensions.k8s.io/v1",
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
    ),
    (
        "/apis/admissionregistration.k8s.io/v1",
        "admissionregistration.k8s.io/v1",
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
    ),
    (
        "/apis/admissionregistration.k8s.io/v1",
        "admissionregistration.k8s.io/v1",
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
    ),
];

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    plural: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Objects by (plural, namespace, name).
    objects: BTreeMap<(&'static str, String, String), Value>,
    /// Every change, for watches that resume.
    log: Vec<Event>,
    /// Watches may not resume from a version older than this.
    compacted: u64,
    /// Kinds answered with 404 (a CRD not installed).
    absent: Vec<&'static str>,
    /// Kinds answered with 403 (the client's role does not name them).
    forbidden: Vec<&'static str>,
    tokens: HashMap<String, (String, String, String)>,
    lists: HashMap<&'static str, usize>,
    /// The most objects one list response of a collection carried.
    largest_page: HashMap<&'static str, usize>,
    watches: HashMap<&'static str, usize>,
    /// Lists and watches that asked for whole objects rather than metadata.
    whole_reads: HashMap<&'static str, usize>,
    status_patches: Vec<(String, String, Value)>,
}

/// A running stand-in.
pub struct KubeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    /// Bumped to end every open watch stream.
    cut: watch::Sender<u64>,
}

impl KubeApi {
    pub async fn start() -> KubeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            rv: 1000,
            ..State::default()
        }));
        let (events, _) = broadcast::channel(4096);
        let (cut, _) = watch::channel(0);
        let api = KubeApi {
            addr,
            state,
            events,
            cut,
        };
        let shared = (api.state.clone(), api.events.clone(), api.cut.subscribe());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (state, events, cut) = (shared.0.clone(), shared.1.clone(), shared.2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (state, events, cut) = (state.clone(), events.clone(), cut.clone());
                        async move { Ok::<_, Infallible>(handle(req, state, events, cut).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        api
    }

    /// A kubeconfig for this stand-in (plain HTTP, a bearer token).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: controller\n  user: {{token: controller-token}}\ncontexts:\n- name: test\n  context: {{cluster: stand-in, user: controller}}\ncurrent-context: test\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces an object (YAML or JSON of one object).
    pub fn apply(&self, yaml: &str) {
        let object: Value = serde_norway::from_str(yaml).expect("an object");
        let mut st = self.state.lock().expect("state");
        let (plural, _) = collection(&object).unwrap_or_else(|| {
            panic!(
                "the stand-in does not serve {} {}",
                object["apiVersion"], object["kind"]
            )
        });
        let (ns, name) = ns_name(&object);
        let key = (plural, ns, name);
        let old = st.objects.get(&key).cloned();
        st.rv += 1;
        let rv = st.rv;
        let mut object = object;
        let generation = match &old {
            Some(o) if o.get("spec") == object.get("spec") => o["metadata"]["generation"].clone(),
            Some(o) => json!(o["metadata"]["generation"].as_i64().unwrap_or(1) + 1),
            None => json!(1),
        };
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        meta["generation"] = generation;
        meta["uid"] = json!(format!("uid-{}-{}", key.1, key.2));
        if meta.get("namespace").is_none() {
            meta["namespace"] = json!("default");
        }
        // Status is the status subresource's: kept unless the object brings one.
        if object.get("status").is_none()
            && let Some(o) = &old
            && let Some(status) = o.get("status")
        {
            object["status"] = status.clone();
        }
        // What kubectl sends as stringData the API server stores as data.
        if let Some(sd) = object.as_object_mut().and_then(|m| m.remove("stringData"))
            && let Some(sd) = sd.as_object()
        {
            use base64_encode as b64;
            for (k, v) in sd {
                object["data"][k] = json!(b64(v.as_str().unwrap_or_default().as_bytes()));
            }
        }
        st.objects.insert(key, object.clone());
        let ev = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.record(&mut st, ev, plural, object);
    }

    pub fn delete(&self, api_version: &str, kind: &str, ns: &str, name: &str) {
        let mut st = self.state.lock().expect("state");
        let (plural, _) = collection(&json!({"apiVersion": api_version, "kind": kind}))
            .expect("a kind the stand-in serves");
        if let Some(mut object) = st
            .objects
            .remove(&(plural, ns.to_string(), name.to_string()))
        {
            st.rv += 1;
            object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            self.record(&mut st, "DELETED", plural, object);
        }
    }

    fn record(&self, st: &mut State, ev: &str, plural: &'static str, mut object: Value) {
        object["__event"] = json!(ev);
        let event = Event {
            rv: st.rv,
            plural,
            object,
        };
        st.log.push(event.clone());
        let _ = self.events.send(event);
    }

    /// Forgets the history: a watch resuming from any version handed out so
    /// far (bookmarks included) gets 410 Gone. Open watches are cut, so
    /// clients must resume, and relist.
    pub fn compact(&self) {
        {
            let mut st = self.state.lock().expect("state");
            st.rv += 1;
            st.compacted = st.rv;
            st.log.clear();
        }
        self.cut_watches();
    }

    /// Ends every open watch stream, as a restarting API server or a load
    /// balancer does; history is kept, so clients resume where they were.
    pub fn cut_watches(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Makes a kind unserved (404), as when its CRD is not installed.
    pub fn remove_kind(&self, plural: &'static str) {
        self.state.lock().expect("state").absent.push(plural);
    }

    /// Refuses the client every request of a kind (403), as RBAC does
    /// a role that does not name it.
    pub fn forbid_kind(&self, plural: &'static str) {
        self.state.lock().expect("state").forbidden.push(plural);
    }

    /// A token shaped as the kubelet's projected ones are (a JWT naming
    /// `audience`, expiring in an hour; unsigned, the review is the check).
    pub fn service_account_token(name: &str, audience: &str) -> String {
        use base64::Engine as _;
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 3600;
        let claims = json!({"aud": [audience], "exp": exp, "sub": name});
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256"}"#),
            b64(claims.to_string().as_bytes()),
            b64(name.as_bytes())
        )
    }

    /// A token TokenReview accepts for `audience`, proving namespace/service account.
    pub fn add_token(&self, token: &str, ns: &str, service_account: &str, audience: &str) {
        self.state.lock().expect("state").tokens.insert(
            token.to_string(),
            (
                ns.to_string(),
                service_account.to_string(),
                audience.to_string(),
            ),
        );
    }

    /// How many lists (not watches) of a collection were served.
    pub fn lists(&self, plural: &str) -> usize {
        let st = self.state.lock().expect("state");
        st.lists.get(plural).copied().unwrap_or(0)
    }

    /// How many lists and watches of a collection asked for whole objects
    /// rather than their metadata (`as=PartialObjectMetadata`).
    pub fn whole_reads(&self, plural: &str) -> usize {
        let st = self.state.lock().expect("state");
        st.whole_reads.get(plural).copied().unwrap_or(0)
    }

    /// The most objects of a collection one list response carried: a client
    /// that asks for pages gets none larger than it asked for.
    pub fn largest_page(&self, plural: &str) -> usize {
        let st = self.state.lock().expect("state");
        st.largest_page.get(plural).copied().unwrap_or(0)
    }

    /// How many watches of a collection were started.
    pub fn watches(&self, plural: &str) -> usize {
        let st = self.state.lock().expect("state");
        st.watches.get(plural).copied().unwrap_or(0)
    }

    /// An object as the stand-in holds it (its status included).
    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().expect("state");
        st.objects
            .iter()
            .find(|((p, n, m), _)| *p == plural && n == ns && m == name)
            .map(|(_, v)| v.clone())
    }

    /// Every status patch received: (field manager, request path, patch).
    pub fn status_patches(&self) -> Vec<(String, String, Value)> {
        self.state.lock().expect("state").status_patches.clone()
    }
}

fn collection(object: &Value) -> Option<(&'static str, &'static str)> {
    let (av, kind) = (object["apiVersion"].as_str()?, object["kind"].as_str()?);
    KINDS
        .iter()
        .find(|(_, a, k, _)| *a == av && *k == kind)
        .map(|(_, _, k, p)| (*p, *k))
}

fn ns_name(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or("default").to_string(),
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}

fn full(status: StatusCode, v: &Value) -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

/// What a path names: the collection, and the namespace, name and
/// subresource when given.
struct Target {
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn target(path: &str) -> Option<Target> {
    for (prefix, av, kind, plural) in KINDS {
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        let (namespace, rest) = match parts.as_slice() {
            ["namespaces", ns, rest @ ..] => (Some(ns.to_string()), rest.to_vec()),
            rest => (None, rest.to_vec()),
        };
        match rest.as_slice() {
            [p] if p == plural => {}
            [p, name] if p == plural => {
                return Some(Target {
                    api_version: av,
                    kind,
                    plural,
                    namespace,
                    name: Some(name.to_string()),
                    subresource: None,
                });
            }
            [p, name, sub] if p == plural => {
                return Some(Target {
                    api_version: av,
                    kind,
                    plural,
                    namespace,
                    name: Some(name.to_string()),
                    subresource: Some(sub.to_string()),
                });
            }
            _ => continue,
        }
        return Some(Target {
            api_version: av,
            kind,
            plural,
            namespace,
            name: None,
            subresource: None,
        });
    }
    None
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3D", "=").replace("%2C", ",")))
        .collect()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    cut: watch::Receiver<u64>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/version" {
        return full(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-stand-in", "gitCommit": "",
                    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
                    "compiler": "gc", "platform": "linux/amd64"}),
        );
    }
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" && req.method() == Method::POST {
        return token_review(req, &state).await;
    }
    let Some(t) = target(&path) else {
        return status(
            404,
            "NotFound",
            &format!("the server could not find {path}"),
        );
    };
    if state.lock().expect("state").absent.contains(&t.plural) {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    if state.lock().expect("state").forbidden.contains(&t.plural) {
        return status(
            403,
            "Forbidden",
            &format!("cannot list resource \"{}\"", t.plural),
        );
    }
    let q = query(&req);
    // `Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1`
    // (a list) or `as=PartialObjectMetadata` (a watch): metadata only.
    let shape = if req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
    {
        Shape::Metadata
    } else {
        Shape::Whole
    };
    if req.method() == Method::GET && t.name.is_none() && shape == Shape::Whole {
        *state
            .lock()
            .expect("state")
            .whole_reads
            .entry(t.plural)
            .or_default() += 1;
    }
    match (req.method().clone(), &t.name, t.subresource.as_deref()) {
        (Method::GET, None, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch_stream(&t, &q, shape, &state, &events, cut)
        }
        (Method::GET, None, None) => list(&t, &q, shape, &state),
        (Method::GET, Some(name), None) => {
            let st = state.lock().expect("state");
            // Cluster-scoped objects are kept under "default".
            let ns = t.namespace.clone().unwrap_or_else(|| "default".into());
            match st.objects.get(&(t.plural, ns, name.clone())) {
                Some(o) => full(StatusCode::OK, &clean(o)),
                None => status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", t.plural),
                ),
            }
        }
        (Method::POST, None, None) | (Method::PUT, Some(_), None) => {
            write(req, &t, &state, &events).await
        }
        (Method::PATCH, Some(name), Some("status")) => {
            let Ok(body) = req.into_body().collect().await else {
                return status(400, "BadRequest", "unreadable body");
            };
            let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return status(400, "BadRequest", "not JSON");
            };
            let ns = t.namespace.clone().unwrap_or_default();
            let mut st = state.lock().expect("state");
            let manager = q.get("fieldManager").cloned().unwrap_or_default();
            st.status_patches
                .push((manager, path.clone(), patch.clone()));
            let key = (t.plural, ns, name.clone());
            let Some(mut object) = st.objects.get(&key).cloned() else {
                return status(404, "NotFound", "not found");
            };
            // A resourceVersion in the patch makes it conditional.
            if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                && object["metadata"]["resourceVersion"].as_str() != Some(rv)
            {
                return status(409, "Conflict", "the object has been modified");
            }
            if let Some(s) = patch.get("status") {
                object["status"] = s.clone();
            }
            st.rv += 1;
            object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.objects.insert(key, object.clone());
            let ev = Event {
                rv: st.rv,
                plural: t.plural,
                object: with_event(object.clone(), "MODIFIED"),
            };
            st.log.push(ev.clone());
            let _ = events.send(ev);
            full(StatusCode::OK, &object)
        }
        _ => status(405, "MethodNotAllowed", "not served by the stand-in"),
    }
}

/// What a list or watch returns of each object.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Whole,
    /// `PartialObjectMetadata`: the object's metadata alone.
    Metadata,
}

impl Shape {
    fn of(self, object: &Value) -> Value {
        match self {
            Shape::Whole => clean(object),
            Shape::Metadata => json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": clean(object)["metadata"].clone(),
            }),
        }
    }
}

fn with_event(mut v: Value, ev: &str) -> Value {
    v["__event"] = json!(ev);
    v
}

/// The object as the API returns it (without the stand-in's bookkeeping).
fn clean(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("__event");
    }
    v
}

/// A list, in pages of `limit` items when asked (as kube's watcher does, 500
/// at a time), each page after the first named by the previous one's
/// `continue` token; a page's resourceVersion is that of the first.
fn list(
    t: &Target,
    q: &HashMap<String, String>,
    shape: Shape,
    state: &Mutex<State>,
) -> Response<Body> {
    let mut st = state.lock().expect("state");
    let (skip, rv) = match q.get("continue").and_then(|c| c.split_once('.')) {
        Some((skip, rv)) => (skip.parse().unwrap_or(0), rv.to_string()),
        None => {
            *st.lists.entry(t.plural).or_default() += 1;
            (0usize, st.rv.to_string())
        }
    };
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let mut matching = st
        .objects
        .iter()
        .filter(|((p, ns, _), _)| *p == t.plural && t.namespace.as_ref().is_none_or(|n| n == ns))
        .skip(skip);
    let items: Vec<Value> = matching
        .by_ref()
        .take(limit)
        .map(|(_, v)| shape.of(v))
        .collect();
    let more = matching.next().is_some();
    let largest = st.largest_page.entry(t.plural).or_default();
    *largest = (*largest).max(items.len());
    let mut metadata = json!({"resourceVersion": rv});
    if more {
        metadata["continue"] = json!(format!("{}.{rv}", skip + items.len()));
    }
    let (api_version, kind) = match shape {
        Shape::Whole => (t.api_version.to_string(), format!("{}List", t.kind)),
        Shape::Metadata => (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
        ),
    };
    full(
        StatusCode::OK,
        &json!({"apiVersion": api_version, "kind": kind,
                "metadata": metadata, "items": items}),
    )
}

/// Creates (POST) or replaces (PUT, with the caller's resourceVersion checked).
async fn write(
    req: Request<Incoming>,
    t: &Target,
    state: &Mutex<State>,
    events: &broadcast::Sender<Event>,
) -> Response<Body> {
    let creating = req.method() == Method::POST;
    let Ok(body) = req.into_body().collect().await else {
        return status(400, "BadRequest", "unreadable body");
    };
    let Ok(mut object) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return status(400, "BadRequest", "not JSON");
    };
    let ns = t.namespace.clone().unwrap_or_else(|| "default".into());
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let key = (t.plural, ns.clone(), name.clone());
    let mut st = state.lock().expect("state");
    match (creating, st.objects.get(&key)) {
        (true, Some(_)) => {
            return status(
                409,
                "AlreadyExists",
                &format!("{} \"{name}\" already exists", t.plural),
            );
        }
        (false, None) => {
            return status(
                404,
                "NotFound",
                &format!("{} \"{name}\" not found", t.plural),
            );
        }
        (false, Some(current)) => {
            if object["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
        }
        (true, None) => {}
    }
    st.rv += 1;
    object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    object["metadata"]["namespace"] = json!(ns);
    object["apiVersion"] = json!(t.api_version);
    object["kind"] = json!(t.kind);
    st.objects.insert(key, object.clone());
    let ev = Event {
        rv: st.rv,
        plural: t.plural,
        object: with_event(object.clone(), if creating { "ADDED" } else { "MODIFIED" }),
    };
    st.log.push(ev.clone());
    let _ = events.send(ev);
    full(
        if creating {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        &object,
    )
}

fn watch_stream(
    t: &Target,
    q: &HashMap<String, String>,
    shape: Shape,
    state: &Mutex<State>,
    events: &broadcast::Sender<Event>,
    mut cut: watch::Receiver<u64>,
) -> Response<Body> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(256);
    let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
    let (plural, kind, api_version) = (t.plural, t.kind, t.api_version);
    let mut backlog = Vec::new();
    let mut live;
    {
        let mut st = state.lock().expect("state");
        *st.watches.entry(plural).or_default() += 1;
        cut.mark_unchanged();
        live = events.subscribe();
        if from != 0 && from < st.compacted {
            backlog.push(line(json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from} ({})", st.compacted),
                "reason": "Expired", "code": 410}})));
            let _ = tx.try_send(backlog.remove(0));
            drop(tx);
            return streaming(rx);
        }
        for e in st.log.iter().filter(|e| e.plural == plural && e.rv > from) {
            backlog.push(line(event_json(e, shape)));
        }
    }
    let mut rv = from;
    tokio::spawn(async move {
        for b in backlog {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            // A cut ends the stream before anything that happened after it.
            tokio::select! {
                biased;
                _ = cut.changed() => return,
                e = live.recv() => match e {
                    Ok(e) if e.plural == plural && e.rv > from => {
                        rv = rv.max(e.rv);
                        if tx.send(line(event_json(&e, shape))).await.is_err() { return; }
                    }
                    Ok(e) => rv = rv.max(e.rv),
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks && rv > 0 => {
                    let b = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                                   "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(line(b)).await.is_err() { return; }
                }
                _ = &mut end => return,
            }
        }
    });
    streaming(rx)
}

fn event_json(e: &Event, shape: Shape) -> Value {
    let ev = e.object["__event"]
        .as_str()
        .unwrap_or("MODIFIED")
        .to_string();
    json!({"type": ev, "object": shape.of(&e.object)})
}

fn streaming(rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>) -> Response<Body> {
    let mut rsp = Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed());
    rsp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

async fn token_review(req: Request<Incoming>, state: &Mutex<State>) -> Response<Body> {
    let Ok(body) = req.into_body().collect().await else {
        return status(400, "BadRequest", "unreadable body");
    };
    let Ok(review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return status(400, "BadRequest", "not JSON");
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<&str> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let st = state.lock().expect("state");
    let status_ = match st.tokens.get(token) {
        Some((ns, sa, aud)) if wanted.is_empty() || wanted.contains(&aud.as_str()) => json!({
            "authenticated": true,
            "user": {"username": format!("system:serviceaccount:{ns}:{sa}"), "uid": "u1",
                     "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}")]},
            "audiences": [aud],
        }),
        Some(_) => json!({"authenticated": false, "error": "token audiences are invalid"}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    full(
        StatusCode::CREATED,
        &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "metadata": {"creationTimestamp": null}, "spec": review["spec"], "status": status_}),
    )
}

/// Standard base64 (Secret data), as the API server stores it.
fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}
