//! Parsing manifest files: multi-document YAML, `List` kinds, typed and validated
//! objects; errors name the document, object and field.

use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::HashMap;

use crate::defaults;
use crate::index::{
    ObjKey, PodInfo, ServiceInfo, SliceInfo, Snapshot, SnapshotBuilder, TokenDigest,
};
use crate::routes::RouteId;

/// A validated object, in the form the index takes.
#[derive(Clone, Debug)]
pub enum Object {
    Service(ObjKey, ServiceInfo),
    EndpointSlice(ObjKey, String, SliceInfo),
    Pod(ObjKey, PodInfo),
    /// A Node's name and zone.
    Node(String, Option<String>),
    /// A service-account token for the identity service (as a digest), and the
    /// service account it proves.
    Token(TokenDigest, ObjKey),
    /// Strait's authorization policy.
    Authorization(ObjKey, crate::authz::AuthorizationSpec),
    /// A Gateway API HTTPRoute or GRPCRoute with a Service among its parents.
    Route(RouteId, crate::routes::RouteSpec),
    /// Strait's backend policy: the Service it targets, its name, its spec.
    BackendPolicy(ObjKey, String, crate::backend_policy::BackendPolicySpec),
    /// Kinds strait reads but does not act on (HTTPRoutes of Gateways, ...).
    Other {
        kind: String,
        name: String,
    },
}

/// What identifies an object in the index: two files defining the same one
/// define one object, not two.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ObjId {
    Service(ObjKey),
    EndpointSlice(ObjKey, String),
    Pod(ObjKey),
    Node(String),
    Token(TokenDigest),
    Authorization(ObjKey),
    Route(RouteId),
    BackendPolicy(ObjKey, String),
}

impl std::fmt::Display for ObjId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjId::Service(k) => write!(f, "Service {k}"),
            ObjId::EndpointSlice(svc, name) => {
                write!(
                    f,
                    "EndpointSlice {}/{name} (of Service {})",
                    svc.namespace, svc.name
                )
            }
            ObjId::Pod(k) => write!(f, "Pod {k}"),
            ObjId::Node(n) => write!(f, "Node {n}"),
            ObjId::Token(_) => f.write_str("a service-account token Secret"),
            ObjId::Authorization(k) => write!(f, "AuthorizationPolicy {k}"),
            ObjId::Route(r) => r.fmt(f),
            ObjId::BackendPolicy(svc, name) => write!(
                f,
                "BackendPolicy {}/{name} (for Service {})",
                svc.namespace, svc.name
            ),
        }
    }
}

impl ObjId {
    pub fn remove_from(&self, snap: &mut Snapshot) {
        match self {
            ObjId::Service(k) => snap.remove_service(k),
            ObjId::EndpointSlice(svc, name) => snap.remove_slice(svc, name),
            ObjId::Pod(k) => snap.remove_pod(k),
            ObjId::Node(n) => snap.remove_node(n),
            ObjId::Token(d) => snap.remove_token(d),
            ObjId::Authorization(k) => snap.remove_authorization(k),
            ObjId::Route(r) => snap.remove_route(r),
            ObjId::BackendPolicy(svc, name) => snap.remove_backend_policy(svc, name),
        }
    }
}

impl Object {
    /// `None` for kinds the index does not hold.
    pub fn id(&self) -> Option<ObjId> {
        Some(match self {
            Object::Service(k, _) => ObjId::Service(k.clone()),
            Object::EndpointSlice(svc, name, _) => ObjId::EndpointSlice(svc.clone(), name.clone()),
            Object::Pod(k, _) => ObjId::Pod(k.clone()),
            Object::Node(n, _) => ObjId::Node(n.clone()),
            Object::Token(d, _) => ObjId::Token(*d),
            Object::Authorization(k, _) => ObjId::Authorization(k.clone()),
            Object::Route(r, _) => ObjId::Route(r.clone()),
            Object::BackendPolicy(svc, name, _) => ObjId::BackendPolicy(svc.clone(), name.clone()),
            Object::Other { .. } => return None,
        })
    }

    /// Whether `snap` already holds this object as it is: applying it again
    /// would change nothing a view is made of.
    pub fn is_in(&self, snap: &Snapshot) -> bool {
        match self {
            Object::Service(k, s) => snap.services.get(k) == Some(s),
            Object::EndpointSlice(svc, name, s) => {
                snap.slices.get(svc).and_then(|m| m.get(name)) == Some(s)
            }
            Object::Pod(k, p) => snap.pods.get(k) == Some(p),
            Object::Node(n, z) => snap.node_zones.get(n) == Some(z),
            Object::Token(d, sa) => snap.tokens.get(d) == Some(sa),
            Object::Authorization(k, a) => snap.authorizations.get(k) == Some(a),
            Object::Route(id, r) => snap.routes.get(id) == Some(r),
            Object::BackendPolicy(svc, name, p) => {
                snap.backend_policies.get(svc).and_then(|m| m.get(name)) == Some(p)
            }
            Object::Other { .. } => true,
        }
    }

    /// As `add_to`, moving the object in rather than copying it.
    pub fn insert_into(self, snap: &mut Snapshot) {
        match self {
            Object::Service(k, s) => snap.add_service(k, s),
            Object::EndpointSlice(svc, name, s) => snap.add_slice(svc, name, s),
            Object::Pod(k, p) => snap.add_pod(k, p),
            Object::Node(n, z) => snap.add_node(n, z),
            Object::Token(d, sa) => snap.add_token(d, sa),
            Object::Authorization(k, a) => snap.add_authorization(k, a),
            Object::Route(id, r) => snap.add_route(id, r),
            Object::BackendPolicy(svc, name, p) => snap.add_backend_policy(svc, name, p),
            Object::Other { .. } => {}
        }
    }

    pub fn add_to(&self, snap: &mut Snapshot) {
        match self {
            Object::Service(k, s) => snap.add_service(k.clone(), s.clone()),
            Object::EndpointSlice(svc, name, s) => {
                snap.add_slice(svc.clone(), name.clone(), s.clone())
            }
            Object::Pod(k, p) => snap.add_pod(k.clone(), p.clone()),
            Object::Node(n, z) => snap.add_node(n.clone(), z.clone()),
            Object::Token(d, sa) => snap.add_token(*d, sa.clone()),
            Object::Authorization(k, a) => snap.add_authorization(k.clone(), a.clone()),
            Object::Route(id, r) => snap.add_route(id.clone(), r.clone()),
            Object::BackendPolicy(svc, name, p) => {
                snap.add_backend_policy(svc.clone(), name.clone(), p.clone())
            }
            Object::Other { .. } => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("cannot read: {0}")]
    Io(String),
    #[error("document {doc}: not YAML: {reason}")]
    Yaml { doc: usize, reason: String },
    #[error("document {doc}: {what}: field {field}: {reason}")]
    Field {
        doc: usize,
        what: String,
        field: String,
        reason: String,
    },
    #[error("document {doc}: {0}", doc = .1)]
    Invalid(crate::index::ObjectError, usize),
    #[error("document {doc}: no apiVersion/kind")]
    NoKind { doc: usize },
    #[error(
        "document {doc}: {bytes} bytes, more than the {max} an object may hold (a List: {list})",
        list = defaults::MAX_LIST_BYTES
    )]
    TooLarge {
        doc: usize,
        bytes: usize,
        max: usize,
    },
    #[error(
        "the manifests come to {total} bytes, more than the {max} the controller reads in all; this file is not read"
    )]
    OverBudget { total: u64, max: u64 },
    /// A second definition of one object in one file: which one was meant
    /// cannot be told (`kubectl apply` takes the last, a first-wins reading
    /// the first), so neither is.
    #[error("document {doc}: {id} is defined again (first in document {first})")]
    Duplicate {
        doc: usize,
        first: usize,
        id: String,
    },
    /// Valid on its own, but names what the index does not hold.
    #[error("{route}: {error}")]
    Reference {
        route: RouteId,
        error: crate::spec::SpecError,
    },
}

/// strait's own API group: every kind in it must be one strait knows, at a
/// version it reads. A misspelt policy ignored would leave a workload open.
const STRAIT_GROUP: &str = "policy.strait.dev";
const STRAIT_VERSION: &str = "policy.strait.dev/v1alpha1";
const STRAIT_KINDS: [&str; 2] = ["AuthorizationPolicy", "BackendPolicy"];

/// Kinds strait reads but does not act on (yet), by (apiVersion, kind): accepted
/// quietly, as they sit beside the others in real manifests.
fn known(api_version: &str, kind: &str) -> bool {
    matches!(
        (api_version, kind),
        (
            "v1",
            "Service"
                | "Pod"
                | "Node"
                | "Secret"
                | "List"
                | "ServiceAccount"
                | "Namespace"
                | "ConfigMap"
        ) | ("discovery.k8s.io/v1", "EndpointSlice")
            | ("apps/v1", _)
            | (
                "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1",
                "HTTPRoute"
            )
            | (
                "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1alpha2",
                "GRPCRoute"
            )
            | (STRAIT_VERSION, _)
    )
}

/// Deserializes into `T`; errors name the field. With `secret`, the value is not
/// quoted: serde's messages quote it, and in a Secret it may be the token.
fn typed<T: serde::de::DeserializeOwned>(
    doc: usize,
    what: &str,
    v: serde_json::Value,
    secret: bool,
) -> Result<T, ParseError> {
    serde_path_to_error::deserialize(v).map_err(|e| ParseError::Field {
        doc,
        what: what.to_string(),
        field: e.path().to_string(),
        reason: if secret {
            "invalid value (not shown: a Secret holds credentials)".into()
        } else {
            e.inner().to_string()
        },
    })
}

/// Drops every field whose value is null (`rules:` with nothing after it), as
/// the API server does before defaulting an object: a manifest reads as the
/// object the cluster would keep. Nulls in lists stay, to be refused. The
/// YAML reader's depth limit bounds the recursion.
fn drop_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

fn describe(v: &serde_json::Value) -> String {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("?");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or("default");
    format!("{kind} {ns}/{name}")
}

fn object(doc: usize, mut v: serde_json::Value, out: &mut Vec<Object>) -> Result<(), ParseError> {
    if v.is_null() {
        return Ok(());
    }
    drop_nulls(&mut v);
    let api_version = v
        .get("apiVersion")
        .and_then(|a| a.as_str())
        .unwrap_or_default()
        .to_string();
    let kind = v
        .get("kind")
        .and_then(|a| a.as_str())
        .unwrap_or_default()
        .to_string();
    if api_version.is_empty() || kind.is_empty() {
        return Err(ParseError::NoKind { doc });
    }
    let what = describe(&v);
    let invalid = |e| ParseError::Invalid(e, doc);
    let field = |e: crate::spec::SpecError| ParseError::Field {
        doc,
        what: what.clone(),
        field: e.field,
        reason: e.reason,
    };
    match (api_version.as_str(), kind.as_str()) {
        // `List` as kubectl writes it; typed lists (`PodList`) as the API
        // returns them.
        (_, k) if k.ends_with("List") && v.get("items").is_some_and(|i| i.is_array()) => {
            // Taken, not cloned: a List of Pods is most of a large mesh's YAML.
            let items = match v {
                serde_json::Value::Object(mut m) => m.remove("items"),
                _ => None,
            };
            // A typed list's items, as the API returns them, carry no type
            // of their own: it is the list's, less `List`.
            let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
            if let Some(serde_json::Value::Array(items)) = items {
                for mut item in items {
                    if let (Some(k), Some(m)) = (item_kind, item.as_object_mut()) {
                        m.entry("apiVersion")
                            .or_insert_with(|| api_version.clone().into());
                        m.entry("kind").or_insert_with(|| k.into());
                    }
                    object(doc, item, out)?;
                }
            }
        }
        ("v1", "Service") => {
            let s: Service = typed(doc, &what, v, false)?;
            let (k, info) = SnapshotBuilder::service(&s).map_err(invalid)?;
            out.push(Object::Service(k, info));
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let s: EndpointSlice = typed(doc, &what, v, false)?;
            let (svc, name, info) = SnapshotBuilder::slice(&s).map_err(invalid)?;
            out.push(Object::EndpointSlice(svc, name, info));
        }
        ("v1", "Pod") => {
            let p: Pod = typed(doc, &what, v, false)?;
            let (k, info) = SnapshotBuilder::pod(&p).map_err(invalid)?;
            out.push(Object::Pod(k, info));
        }
        ("v1", "Node") => {
            let n: Node = typed(doc, &what, v, false)?;
            let (name, zone) = SnapshotBuilder::node(&n.metadata).map_err(invalid)?;
            out.push(Object::Node(name, zone));
        }
        ("v1", "Secret") => {
            let s: Secret = typed(doc, &what, v, true)?;
            if let Some((digest, account)) = SnapshotBuilder::token(&s).map_err(invalid)? {
                out.push(Object::Token(digest, account));
            }
        }
        ("policy.strait.dev/v1alpha1", "AuthorizationPolicy") => {
            let (k, spec) = crate::authz::parse(&v).map_err(field)?;
            out.push(Object::Authorization(k, spec));
        }
        ("policy.strait.dev/v1alpha1", "BackendPolicy") => {
            let (k, target, spec) = crate::backend_policy::parse(&v).map_err(field)?;
            out.push(Object::BackendPolicy(target, k.name, spec));
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
            match crate::routes::parse(&v).map_err(field)? {
                Some((k, route)) => out.push(Object::Route(RouteId::http(k), route)),
                None => out.push(Object::Other { kind, name: what }),
            }
        }
        // GRPCRoute was v1alpha2 before Gateway API 1.1, with the same fields.
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1alpha2", "GRPCRoute") => {
            match crate::routes::parse_grpc(&v).map_err(field)? {
                Some((k, route)) => out.push(Object::Route(RouteId::grpc(k), route)),
                None => out.push(Object::Other { kind, name: what }),
            }
        }
        (a, k)
            if a.split('/').next() == Some(STRAIT_GROUP)
                && (a != STRAIT_VERSION || !STRAIT_KINDS.contains(&k)) =>
        {
            return Err(ParseError::Field {
                doc,
                what,
                field: "apiVersion/kind".into(),
                reason: format!(
                    "{a} {k} is not a strait kind (known: {} in {STRAIT_VERSION})",
                    STRAIT_KINDS.join(", ")
                ),
            });
        }
        (a, k) if known(a, k) => out.push(Object::Other { kind, name: what }),
        _ => {
            tracing::debug!(doc, %what, api_version, "ignoring a kind strait does not use");
        }
    }
    Ok(())
}

/// One object as the Kubernetes API returns it (JSON), read exactly as the
/// same object in a manifest file would be.
pub fn parse_object(v: serde_json::Value) -> Result<Vec<Object>, ParseError> {
    let mut out = Vec::new();
    object(1, v, &mut out)?;
    Ok(out)
}

/// Parses every document of a file. All errors are returned, so one edit can fix
/// them all; any error rejects the whole file.
/// What makes two documents one object, as the API server names it: kind,
/// namespace and name. A BackendPolicy's and an EndpointSlice's ids also
/// carry their Service, which two definitions of one object may differ in.
#[derive(Debug, PartialEq, Eq, Hash)]
enum Named {
    Id(ObjId),
    Kind(&'static str, String, String),
}

impl Named {
    fn of(id: ObjId) -> Self {
        match id {
            ObjId::BackendPolicy(svc, name) => Named::Kind("BackendPolicy", svc.namespace, name),
            ObjId::EndpointSlice(svc, name) => Named::Kind("EndpointSlice", svc.namespace, name),
            other => Named::Id(other),
        }
    }
}

pub fn parse_file(text: &str) -> Result<Vec<Object>, Vec<ParseError>> {
    // Parsing costs tens of times a document's size: an oversized one is
    // refused before any of it is parsed.
    let oversized: Vec<ParseError> = documents(text)
        .enumerate()
        .filter_map(|(i, d)| {
            let max = max_bytes(d);
            (d.len() > max).then_some(ParseError::TooLarge {
                doc: i + 1,
                bytes: d.len(),
                max,
            })
        })
        .collect();
    if !oversized.is_empty() {
        return Err(oversized);
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<Named, usize> = HashMap::new();
    for (i, read) in json_documents(text, Reading::Strict).enumerate() {
        let doc = i + 1;
        match read {
            Ok(v) => {
                let before = out.len();
                if let Err(e) = object(doc, v, &mut out) {
                    errors.push(e);
                }
                for id in out[before..].iter().filter_map(Object::id) {
                    let shown = id.to_string();
                    if let Some(&first) = seen.get(&Named::of(id.clone())) {
                        errors.push(ParseError::Duplicate {
                            doc,
                            first,
                            id: shown,
                        });
                    } else {
                        seen.insert(Named::of(id), doc);
                    }
                }
            }
            Err(e) => {
                errors.push(ParseError::Yaml {
                    doc,
                    reason: e.to_string(),
                });
                // A syntax error leaves the rest of the stream unreadable.
                break;
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// What reading a stream may make, whatever its size: aliases that share a
/// block (a List of pods with one container spec) make more than its text,
/// and kubectl (go-yaml) allows some 400,000 values from them.
const MIN_MADE: usize = 1_000_000;

/// How documents are read: as the controller takes a file (`Strict`), or to
/// tell what a refused one would hold (`Lenient`: a key written twice is
/// the last one, a merge key a key like another).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reading {
    Strict,
    Lenient,
}

/// The documents of a YAML stream as JSON. Each value made counts one, and
/// a string or key its length more: read once, a stream makes at most twice
/// its bytes (or `MIN_MADE`), but through aliases, each read again in full.
/// An anchor of 20,000 values aliased 20,000 times is 140 kB of YAML and
/// four hundred million values, and a 700 kB string aliased 200,000 times
/// 140 GB, which would kill the controller for memory at every start (as the
/// API server's CVE-2019-11253).
pub(super) fn json_documents(
    text: &str,
    how: Reading,
) -> impl Iterator<Item = Result<serde_json::Value, serde_norway::Error>> + '_ {
    let budget = std::cell::Cell::new((2 * text.len()).max(MIN_MADE));
    serde_norway::Deserializer::from_str(text).map(move |de| {
        // An empty document still makes a value.
        budget.set(budget.get() + 16);
        serde::de::DeserializeSeed::deserialize(
            Json {
                budget: &budget,
                how,
            },
            de,
        )
    })
}

/// A YAML document as JSON, refusing (when `Strict`) what reading it
/// straight into `serde_json::Value` would take silently: a key written
/// twice in one mapping (the last would win: `mtls: STRICT` undone by a
/// second `mtls:` further down, which kubectl refuses), and merge keys
/// (`<<: *defaults`), whose fields would be dropped where kubectl merges
/// them; and (either way) more than the stream's budget.
#[derive(Clone, Copy)]
struct Json<'b> {
    budget: &'b std::cell::Cell<usize>,
    how: Reading,
}

impl Json<'_> {
    /// A value made, with `len` bytes of its own.
    fn made<E: serde::de::Error>(&self, len: usize) -> Result<(), E> {
        let left = self.budget.get().checked_sub(1 + len).ok_or_else(|| {
            E::custom("the file's aliases repeat too much: they make more than twice its size")
        })?;
        self.budget.set(left);
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Json<'_> {
    type Value = serde_json::Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// A mapping's key, counted as a string value.
struct Key<'b>(Json<'b>);

impl<'de> serde::de::DeserializeSeed<'de> for Key<'_> {
    type Value = String;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        let key = <String as serde::Deserialize>::deserialize(d)?;
        self.0.made(key.len())?;
        Ok(key)
    }
}

impl<'de> serde::de::Visitor<'de> for Json<'_> {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.made(0)?;
        Ok(v.into())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.made(0)?;
        Ok(v.into())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.made(0)?;
        Ok(v.into())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.made(0)?;
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.made(v.len())?;
        Ok(v.into())
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        self.made(v.len())?;
        Ok(v.into())
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        self.made(0)?;
        Ok(serde_json::Value::Null)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        self.made(0)?;
        Ok(serde_json::Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        serde::de::DeserializeSeed::deserialize(self, d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        self.made(0)?;
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(serde_json::Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error as _;
        self.made(0)?;
        let strict = self.how == Reading::Strict;
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key_seed(Key(self))? {
            if key == "<<" && strict {
                return Err(A::Error::custom(
                    "a YAML merge key (<<) is not read here: write its fields out",
                ));
            }
            let value = map.next_value_seed(self)?;
            if out.contains_key(&key) && strict {
                return Err(A::Error::custom(format!(
                    "field {key:?} is written twice in one mapping"
                )));
            }
            out.insert(key, value);
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// The most a document may hold to be parsed: a List's items together may
/// hold more than one object.
fn max_bytes(doc: &str) -> usize {
    if is_list(doc) {
        defaults::MAX_LIST_BYTES
    } else {
        defaults::MAX_OBJECT_BYTES
    }
}

/// The documents of a YAML stream, split at `---` lines as YAML does (a
/// marker at the start of a line); leading empty parts are skipped, so the
/// numbering is the parser's.
fn documents(text: &str) -> impl Iterator<Item = &str> {
    let mut starts = vec![0];
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("---")
            && (rest.trim().is_empty() || rest.starts_with([' ', '\t']))
        {
            starts.push(at);
        }
        at += line.len();
    }
    starts.push(text.len());
    let parts: Vec<&str> = starts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    parts.into_iter().filter(|d| {
        d.lines()
            .map(str::trim)
            .any(|l| !l.is_empty() && !l.starts_with('#') && l != "---")
    })
}

/// A List document (items of any number, each an object): `kind: List` as
/// kubectl writes it, or a typed list (`PodList`) as the API returns it, in
/// YAML or JSON (`"kind": "List",`), quoted or not.
fn is_list(doc: &str) -> bool {
    // JSON (as kubectl and the API write it, at any indentation, or on one
    // line with `kind` after `items`): the `kind` of the outermost object.
    let body = doc.trim_start();
    let body = match body.strip_prefix("---") {
        Some(rest) if rest.trim_start_matches([' ', '\t']).starts_with('{') => rest.trim_start(),
        Some(rest) => rest.split_once('\n').map_or("", |(_, r)| r).trim_start(),
        None => body,
    };
    if body.starts_with('{')
        && let Some(kind) = json_top_kind(body)
    {
        return kind.ends_with("List");
    }
    fn unquote(s: &str) -> &str {
        s.trim().trim_matches(|c| c == '"' || c == '\'')
    }
    // The document's own `kind`: at the top of YAML, or one level into
    // pretty-printed JSON; not one nested deeper (an embedded manifest).
    let top = |l: &&str| l.len() - l.trim_start().len() <= 2;
    doc.lines().filter(top).any(|l| {
        let l = l
            .split(" #")
            .next()
            .unwrap_or(l)
            .trim()
            .trim_end_matches(',');
        l.split_once(':')
            .is_some_and(|(k, v)| unquote(k) == "kind" && unquote(v).ends_with("List"))
    })
}

/// The string value of `kind` in the outermost object of the JSON `doc` (the
/// last, as the parser keeps), found without parsing the rest (a List may be
/// megabytes of items).
fn json_top_kind(doc: &str) -> Option<&str> {
    let b = doc.as_bytes();
    let (mut depth, mut i, mut value_of_kind) = (0usize, 0usize, false);
    let mut kind = None;
    while i < b.len() {
        let c = b[i];
        if value_of_kind && c != b'"' && !c.is_ascii_whitespace() {
            // Not a string: not JSON as written by kubectl or the API.
            return None;
        }
        match c {
            b'"' => {
                let start = i + 1;
                let mut end = start;
                while end < b.len() && b[end] != b'"' {
                    end += if b[end] == b'\\' { 2 } else { 1 };
                }
                let s = doc.get(start..end.min(b.len()))?;
                i = end + 1;
                if depth == 1 {
                    if value_of_kind {
                        kind = Some(s);
                        value_of_kind = false;
                        continue;
                    }
                    let rest = doc.get(i..)?.trim_start();
                    if s == "kind" && rest.starts_with(':') {
                        value_of_kind = true;
                        i = doc.len() - rest.len() + 1;
                    }
                }
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    kind
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_documents_are_refused_before_parsing() {
        let big = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\ndata: {{a: \"{}\"}}\n",
            "x".repeat(defaults::MAX_OBJECT_BYTES)
        );
        let text =
            format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: a}}\n---\n{big}");
        let e = parse_file(&text).unwrap_err();
        assert_eq!(e.len(), 1);
        let e = e[0].to_string();
        assert!(e.starts_with("document 2:") && e.contains("1572864"), "{e}");
        let list = format!(
            "apiVersion: v1\nkind: List\nitems: []\n# {}\n",
            "x".repeat(2 << 20)
        );
        assert!(parse_file(&list).is_ok(), "a List may be larger");
    }

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - addresses: [127.0.0.1]
    targetRef: {kind: Pod, name: web-0}
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Pod
    metadata:
      name: web-0
      namespace: shop
      annotations: {strait.dev/inbound-port: "4143"}
    spec:
      serviceAccountName: web
      containers: [{name: app, image: web}]
"#;

    #[test]
    fn reads_multi_document_files_and_lists() {
        let objs = parse_file(GOOD).unwrap();
        assert_eq!(objs.len(), 3);
        assert!(
            matches!(&objs[2], Object::Pod(k, p) if k.name == "web-0" && p.inbound_port == Some(4143))
        );
    }

    /// What kubectl would refuse or read otherwise is refused, saying why:
    /// a field written twice (the second `mtls` would have won) and a merge
    /// key (its fields would have been dropped). Keys that are numbers and
    /// anchors without merges read as ever.
    #[test]
    fn duplicate_fields_and_merge_keys_are_refused() {
        let twice = "apiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  mtls: STRICT\n  selector: {matchLabels: {app: web}}\n  mtls: PERMISSIVE\n";
        let e = parse_file(twice).unwrap_err()[0].to_string();
        assert!(e.contains("\"mtls\" is written twice"), "{e}");
        let merged = "apiVersion: v1\nkind: Service\nmetadata: {name: merged, <<: {namespace: shop}}\nspec: {ports: [{port: 80}]}\n";
        let e = parse_file(merged).unwrap_err()[0].to_string();
        assert!(e.contains("merge key"), "{e}");
        let anchored = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: shop, labels: &l {app: a}, annotations: *l}\nspec: {ports: [{port: 80}], selector: {80: x}}\n";
        assert!(parse_file(anchored).is_ok());
    }

    /// Aliases that repeat an anchor many times make far more values than
    /// the document has bytes: 16 kB of YAML made four million, so a file
    /// of 140 kB (under every size limit) four hundred million, enough to
    /// kill the controller for memory at each start. Refused, saying why.
    #[test]
    fn aliases_that_expand_past_the_document_are_refused() {
        let n = 2000;
        let bomb = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: bomb, namespace: shop}}\ndata: {{a: &a [{}], b: [{}]}}\n",
            vec!["x"; n].join(","),
            vec!["*a"; n].join(",")
        );
        assert!(bomb.len() < 16_000);
        let e = parse_file(&bomb).unwrap_err()[0].to_string();
        assert!(e.contains("aliases repeat too much"), "{e}");
        // A long string aliased many times: few values, many bytes.
        let long = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: long, namespace: shop}}\ndata: {{a: &a \"{}\", b: [{}]}}\n",
            "x".repeat(100_000),
            vec!["*a"; 100].join(",")
        );
        let e = parse_file(&long).unwrap_err()[0].to_string();
        assert!(e.contains("aliases repeat too much"), "{e}");
        // A few aliases are read as ever (the test above), and empty
        // documents take no other document's share.
        let sa = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, namespace: shop}\n";
        let stream = format!("---\n---\n# note\n---\n{GOOD}---\n{sa}");
        assert!(
            parse_file(&stream).is_ok(),
            "{:?}",
            parse_file(&stream).err()
        );
    }

    #[test]
    fn errors_name_the_object_and_field() {
        let bad = GOOD.replace("port: 80,", "port: eighty,");
        let errs = parse_file(&bad).unwrap_err();
        let msg = errs[0].to_string();
        assert!(
            msg.contains("Service shop/web") && msg.contains("spec.ports"),
            "{msg}"
        );

        let bad = GOOD.replace("\"4143\"", "\"many\"");
        let msg = parse_file(&bad).unwrap_err()[0].to_string();
        assert!(
            msg.contains("strait.dev/inbound-port") && msg.contains("shop/web-0"),
            "{msg}"
        );

        let bad = GOOD.replace("labels: {kubernetes.io/service-name: web}", "labels: {}");
        let msg = parse_file(&bad).unwrap_err()[0].to_string();
        assert!(msg.contains("kubernetes.io/service-name"), "{msg}");

        let msg = parse_file("kind: [oops").unwrap_err()[0].to_string();
        assert!(msg.contains("not YAML"), "{msg}");
    }

    #[test]
    fn one_object_twice_in_a_file_is_refused_naming_both_documents() {
        let svc = |ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: a}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
            )
        };
        let text = format!("{}---\n{}", svc("10.96.0.1"), svc("10.96.0.2"));
        let e = parse_file(&text).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        let e = e[0].to_string();
        assert!(
            e.contains("document 2") && e.contains("first in document 1"),
            "{e}"
        );
        // In one List too.
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}\n",
            "{apiVersion: v1, kind: Service, metadata: {name: web, namespace: a}, spec: {ports: [{port: 80}]}}",
            "{apiVersion: v1, kind: Service, metadata: {name: web, namespace: a}, spec: {ports: [{port: 81}]}}",
        );
        assert!(parse_file(&list).is_err());
        // One BackendPolicy twice, each time for another Service.
        let policy = |target: &str| {
            format!(
                "apiVersion: policy.strait.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: p, namespace: a}}\nspec: {{targetRef: {{kind: Service, name: {target}}}, connectTimeout: 1s}}\n"
            )
        };
        let e = parse_file(&format!("{}---\n{}", policy("web"), policy("api"))).unwrap_err();
        assert!(e[0].to_string().contains("first in document 1"), "{e:?}");
        // Two of one name in two namespaces are two objects.
        let other = policy("web").replace("namespace: a", "namespace: b");
        assert!(parse_file(&format!("{}---\n{other}", policy("web"))).is_ok());
    }

    /// `kubectl get -o json` writes a List pretty-printed; the API a typed
    /// one (`ServiceList`). Both are Lists, with a List's size limit.
    #[test]
    fn lists_as_kubectl_and_the_api_write_them_are_lists() {
        let items: Vec<serde_json::Value> = (0..8000)
            .map(|i| {
                serde_json::json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": format!("svc-{i}"), "namespace": "shop",
                                 "annotations": {"note": "x".repeat(160)}},
                    "spec": {"ports": [{"port": 80}]},
                })
            })
            .collect();
        // The API's typed lists leave the items' type out.
        let untyped: Vec<serde_json::Value> = items
            .iter()
            .cloned()
            .map(|mut i| {
                let m = i.as_object_mut().unwrap();
                m.remove("apiVersion");
                m.remove("kind");
                i
            })
            .collect();
        // Pretty-printed at two or four spaces, or on one line with `kind`
        // after `items` (as kubectl and the API write them).
        let four = |v: &serde_json::Value| {
            use serde::Serialize as _;
            let mut out = Vec::new();
            let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
            v.serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt))
                .unwrap();
            String::from_utf8(out).unwrap()
        };
        for (kind, items) in [("List", &items), ("ServiceList", &untyped)] {
            let list = serde_json::json!({"apiVersion": "v1", "kind": kind, "items": items});
            for doc in [
                serde_json::to_string_pretty(&list).unwrap(),
                four(&list),
                // Keys in order: `kind` after `items`.
                serde_json::to_string(&list).unwrap(),
            ] {
                assert!(doc.len() > defaults::MAX_OBJECT_BYTES, "{}", doc.len());
                let objects = parse_file(&doc).unwrap();
                assert_eq!(objects.len(), 8000, "{kind}");
            }
        }
        // A `kind` inside the items is not the document's; of two, the last
        // is (as parsed).
        assert!(!is_list(
            r#"{"items": [{"kind": "PodList"}], "kind": "Pod"}"#
        ));
        assert!(!is_list(r#"{"kind": "List", "kind": "ConfigMap"}"#));
        assert!(is_list("---\n{\"kind\": \"List\", \"items\": []}"));
        assert!(is_list("--- {\"kind\": \"List\", \"items\": []}"));
        // YAML in flow style is YAML: read as before.
        assert!(is_list("{\n  kind: List,\n  items: []\n}"));
    }

    #[test]
    fn objects_over_a_limit_are_refused_naming_the_limit() {
        let ports: String = (1..=300)
            .map(|p| format!("  - {{name: p{p}, port: {p}}}\n"))
            .collect();
        let svc = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: shop}}\nspec:\n  ports:\n{ports}"
        );
        let e = parse_file(&svc).unwrap_err().remove(0).to_string();
        assert!(
            e.contains("Service shop/big")
                && e.contains("spec.ports")
                && e.contains("300 entries, more than the limit of 256"),
            "{e}"
        );
        let addrs: String = (0..101).map(|i| format!("\"10.0.0.{i}\", ")).collect();
        let slice = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s\n  namespace: shop\n  labels: {{kubernetes.io/service-name: big}}\naddressType: IPv4\nendpoints:\n  - addresses: [{addrs}]\n"
        );
        let e = parse_file(&slice).unwrap_err().remove(0).to_string();
        assert!(
            e.contains("endpoints[0].addresses") && e.contains("limit of 100"),
            "{e}"
        );
        let rules: String = (0..17)
            .map(|_| "  - backendRefs: [{name: big, port: 80}]\n")
            .collect();
        let route = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: big}}]\n  rules:\n{rules}"
        );
        let e = parse_file(&route).unwrap_err().remove(0).to_string();
        assert!(e.contains("spec.rules") && e.contains("limit of 16"), "{e}");
    }

    /// Kubernetes copies all of a Service's ports into each of its slices,
    /// UDP and SCTP too: only the TCP ones the mesh carries count against
    /// the limits. A slice refused over its UDP ports left the Service with
    /// no endpoints, and its pods outside their `targetRef` policy.
    #[test]
    fn only_tcp_ports_count_against_the_port_limits() {
        let ports = |n: u16, protocol: &str| -> String {
            (1..=n)
                .map(|p| format!("  - {{name: {protocol}{p}, port: {p}, protocol: {protocol}}}\n"))
                .collect()
        };
        let (tcp, udp) = (ports(200, "TCP"), ports(200, "UDP"));
        let docs = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: shop}}\nspec:\n  ports:\n{tcp}{udp}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-1\n  namespace: shop\n  labels: {{kubernetes.io/service-name: dns}}\naddressType: IPv4\nports:\n{tcp}{udp}endpoints:\n  - addresses: [10.0.0.1]\n"
        );
        let mut snap = crate::index::Snapshot::empty("cluster.local");
        for o in parse_file(&docs).unwrap() {
            o.insert_into(&mut snap);
        }
        let svc = crate::index::ObjKey {
            namespace: "shop".into(),
            name: "dns".into(),
        };
        assert_eq!(snap.services[&svc].ports.len(), 200);
        let slice = &snap.slices[&svc]["dns-1"];
        assert_eq!((slice.ports.len(), slice.endpoints.len()), (200, 1));

        let slice = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s\n  namespace: shop\n  labels: {{kubernetes.io/service-name: big}}\naddressType: IPv4\nports:\n{}endpoints: []\n",
            ports(300, "TCP")
        );
        let e = parse_file(&slice).unwrap_err().remove(0).to_string();
        assert!(
            e.contains("EndpointSlice shop/s")
                && e.contains("300 entries, more than the limit of 256"),
            "{e}"
        );
    }

    #[test]
    fn a_misspelt_strait_kind_is_an_error_not_ignored() {
        for (api, kind) in [
            ("policy.strait.dev/v1alpha1", "AuthorizationPolicies"),
            ("policy.strait.dev/v1", "AuthorizationPolicy"),
        ] {
            let doc = format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: a, namespace: b}}\nspec: {{}}\n"
            );
            let msg = parse_file(&doc).unwrap_err()[0].to_string();
            assert!(msg.contains("not a strait kind"), "{msg}");
        }
    }

    #[test]
    fn a_bad_secret_is_reported_without_its_value() {
        let doc = "apiVersion: v1\nkind: Secret\nmetadata: {name: t, namespace: a}\ntype: kubernetes.io/service-account-token\nstringData: {token: 20240101123456}\n";
        let msg = parse_file(doc).unwrap_err()[0].to_string();
        assert!(
            msg.contains("Secret a/t") && !msg.contains("20240101123456"),
            "{msg}"
        );
    }

    #[test]
    fn routes_and_backend_policies_are_read_and_their_errors_name_the_object() {
        let doc = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{matches: [{path: {type: RegularExpression, value: "/a["}}]}]
---
apiVersion: policy.strait.dev/v1alpha1
kind: BackendPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  retryBudget: {ratio: 2, minRetriesPerSecond: 1}
"#;
        let errs = parse_file(doc).unwrap_err();
        let msgs: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            msgs[0].contains("HTTPRoute shop/web")
                && msgs[0].contains("spec.rules[0].matches[0].path.value"),
            "{msgs:?}"
        );
        assert!(
            msgs[1].contains("BackendPolicy shop/web")
                && msgs[1].contains("spec.retryBudget.ratio"),
            "{msgs:?}"
        );

        let good = doc.replace("/a[", "/a").replace("ratio: 2", "ratio: 0.5");
        let objs = parse_file(&good).unwrap();
        assert!(matches!(&objs[0], Object::Route(r, _) if r.key.name == "web"));
        assert!(
            matches!(&objs[1], Object::BackendPolicy(svc, name, _) if svc.name == "web" && name == "web")
        );
        // A Gateway's route is not strait's: read, not indexed.
        let gateway = good.replace(r#"{group: "", kind: Service, name: web}"#, "{name: gw}");
        assert!(matches!(
            &parse_file(&gateway).unwrap()[0],
            Object::Other { .. }
        ));
    }

    /// A field written with no value (`rules:`) is null, which the API server
    /// drops before defaulting it: from manifests it is as if not written,
    /// rather than refused for not being a list.
    #[test]
    fn a_field_without_a_value_is_not_written() {
        let doc = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop, labels: }
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: }]
  rules:
"#;
        let objs = parse_file(doc).unwrap();
        let Object::Route(_, r) = &objs[0] else {
            panic!("a route: {objs:?}");
        };
        // The CRD's default rule, as for `rules` not written.
        assert_eq!(r.rules.len(), 1, "{r:?}");
        assert!(r.rules[0].backends.is_empty());
        // A null in a list is no field left out: still refused.
        let item = doc.replace("rules:", "rules: [null]");
        let errs = parse_file(&item).unwrap_err();
        assert!(errs[0].to_string().contains("spec.rules[0]"), "{errs:?}");
    }
}
