//! The validating admission webhook for `policy.strait.dev`: a policy the
//! controller would refuse is refused at apply, with the controller's reason.
//!
//! The CRDs keep fields their schemas do not name (`crds.rs`), so a misspelt
//! field (`mTLS: STRICT`) reaches this check whatever the client, rather than
//! being dropped by the API server for clients that do not ask for strict
//! field validation (Helm, GitOps controllers), which would store a policy
//! more open than meant.

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use serde_json::Value;
use tracing::debug;

use crate::spec::SpecError;

pub const PATH: &str = "/validate";

/// The group whose kinds are checked; anything else sent here is admitted.
const GROUP: &str = "policy.strait.dev";

/// Checks `object`, the request's object (`old`, the stored one an update
/// replaces), as `webhook::read` took them out of the review.
pub fn respond(
    req: &AdmissionRequest<DynamicObject>,
    object: Option<Value>,
    old: Option<&Value>,
) -> AdmissionResponse {
    let rsp = AdmissionResponse::from(req);
    let Some(mut v) = object.filter(|_| req.kind.group == GROUP) else {
        return rsp;
    };
    // Written into below, which JSON other than an object would not take.
    if !v.is_object() || !v.get("metadata").is_none_or(Value::is_object) {
        return rsp.deny("the object cannot be read");
    }
    // A change that leaves the spec as it was (a label, a finalizer taken off
    // so that a delete completes) is not held up by a spec stored before it
    // was checked here (an earlier release, the webhook away). The parsers
    // read nothing else that may change.
    if req.operation == Operation::Update && old.is_some_and(|old| old.get("spec") == v.get("spec"))
    {
        return rsp;
    }
    // As the controller will see it once stored: a generated name is not
    // made yet at admission, and the namespace is the request's.
    let meta = &mut v["metadata"];
    if meta
        .get("name")
        .is_none_or(|n| n.as_str().is_none_or(str::is_empty))
    {
        meta["name"] = meta
            .get("generateName")
            .cloned()
            .unwrap_or_else(|| serde_json::Value::String(req.name.clone()));
    }
    if let Some(ns) = &req.namespace {
        meta["namespace"] = serde_json::Value::String(ns.clone());
    }
    let checked: Result<(), SpecError> = match req.kind.kind.as_str() {
        "AuthorizationPolicy" => crate::authz::parse(&v).map(drop),
        "BackendPolicy" => crate::backend_policy::parse(&v).map(drop),
        _ => Ok(()),
    };
    let what = format!(
        "{} {}/{}",
        req.kind.kind,
        req.namespace.as_deref().unwrap_or("default"),
        v["metadata"]["name"].as_str().unwrap_or_default()
    );
    match checked {
        Ok(()) => {
            debug!(object = %what, "valid");
            rsp
        }
        Err(e) => {
            let reason = format!("strait refuses {what}: {}: {}", e.field, e.reason);
            strait_otel::sampled!(
                info,
                reason = super::clipped(&reason),
                "refused at admission"
            );
            rsp.deny(reason)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::{Value, json};

    use super::*;

    /// The request to create `object`, its answer.
    fn create(kind: &str, object: Value) -> AdmissionResponse {
        let (req, object) = request(kind, object);
        respond(&req, object, None)
    }

    fn request(kind: &str, object: Value) -> (AdmissionRequest<DynamicObject>, Option<Value>) {
        let review = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "9b1f3c1e-0d7a-4a8e-bb64-2f8f5b7c4d11",
                "kind": {"group": GROUP, "version": "v1alpha1", "kind": kind},
                "resource": {"group": GROUP, "version": "v1alpha1", "resource": "policies"},
                "namespace": "shop", "operation": "CREATE",
                "userInfo": {"username": "alice"},
                "object": object,
            }
        });
        let r = crate::inject::webhook::read(&serde_json::to_vec(&review).unwrap()).unwrap();
        (r.req, r.object)
    }

    fn authz(spec: Value) -> Value {
        json!({"apiVersion": "policy.strait.dev/v1alpha1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "web"}, "spec": spec})
    }

    /// A misspelt field, which the API server would otherwise have dropped
    /// into a more open policy, is refused by name; the right spelling passes.
    #[test]
    fn a_policy_the_controller_would_refuse_is_refused_by_name() {
        let typo = authz(json!({"selector": {"matchLabels": {"app": "web"}}, "mTLS": "STRICT"}));
        let rsp = create("AuthorizationPolicy", typo);
        assert!(!rsp.allowed);
        let msg = rsp.result.message;
        assert!(
            msg.contains("AuthorizationPolicy shop/web") && msg.contains("unknown field `mTLS`"),
            "{msg}"
        );

        let right = authz(json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": "STRICT"}));
        assert!(create("AuthorizationPolicy", right).allowed);

        let both = authz(json!({"selector": {}, "targetRef": {"kind": "Service", "name": "web"}}));
        let rsp = create("AuthorizationPolicy", both);
        assert!(
            !rsp.allowed && rsp.result.message.contains("exactly one of"),
            "{rsp:?}"
        );

        let backend = json!({"apiVersion": "policy.strait.dev/v1alpha1", "kind": "BackendPolicy",
            "metadata": {"name": "web"},
            "spec": {"targetRef": {"kind": "Service", "name": "web"}, "opaquePorts": [0]}});
        let rsp = create("BackendPolicy", backend);
        assert!(
            !rsp.allowed && rsp.result.message.contains("spec.opaquePorts[0]"),
            "{rsp:?}"
        );
    }

    /// `generateName` objects have no name yet at admission: checked all
    /// the same, not refused for it.
    #[test]
    fn a_generated_name_is_checked_not_refused() {
        let mut v = authz(json!({"selector": {"matchLabels": {"app": "web"}}}));
        v["metadata"] = json!({"generateName": "web-"});
        assert!(create("AuthorizationPolicy", v.clone()).allowed);
        v["spec"]["allowed"] = json!([]);
        assert!(!create("AuthorizationPolicy", v).allowed);
    }

    /// A policy stored invalid (before the webhook) can still be labelled,
    /// and deleted with its finalizers taken off; its spec cannot be changed
    /// to another invalid one, while it is being deleted included.
    #[test]
    fn a_stored_invalid_policy_is_not_held_up_but_its_spec_is_still_checked() {
        let bad = authz(json!({"selector": {}, "targetRef": {"kind": "Service", "name": "web"}}));
        let update = |old: &Value, new: &Value| {
            let (mut req, new) = request("AuthorizationPolicy", new.clone());
            req.operation = Operation::Update;
            respond(&req, new, Some(old))
        };
        let mut labelled = bad.clone();
        labelled["metadata"]["labels"] = json!({"team": "a"});
        assert!(update(&bad, &labelled).allowed);
        let mut deleting = bad.clone();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        deleting["metadata"]["finalizers"] = json!(["example.com/keep"]);
        let mut done = deleting.clone();
        done["metadata"]["finalizers"] = json!([]);
        assert!(update(&deleting, &done).allowed);
        // Being deleted is no way past the check for a new spec.
        let mut edited = deleting.clone();
        edited["spec"]["ports"] = json!([0]);
        assert!(!update(&deleting, &edited).allowed);
        let mut changed = bad.clone();
        changed["spec"]["ports"] = json!([0]);
        assert!(!update(&bad, &changed).allowed);
    }

    /// Kinds of other groups sent here pass untouched.
    #[test]
    fn other_kinds_pass() {
        let (mut req, object) = request(
            "Pod",
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p"}, "spec": {"bogus": true}}),
        );
        req.kind.group = String::new();
        assert!(respond(&req, object, None).allowed);
    }
}
