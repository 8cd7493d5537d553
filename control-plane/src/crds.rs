//! strait's own resources (`policy.strait.dev/v1alpha1`) as CustomResourceDefinitions,
//! generated from the Rust types the controller parses them with, so the schema
//! users' `kubectl apply` is checked against cannot drift from what the
//! controller accepts. `strait crds` prints them; `deploy/crds/` holds the same.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::authz::AuthorizationPolicy;
use crate::backend_policy::BackendPolicy;

/// What the controller says of a policy: `Accepted` (valid, and its target
/// exists) and `ResolvedRefs`, each with a reason and the generation it saw.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Every CRD, one YAML document each, in a stable order.
pub fn render() -> Result<Vec<(String, String)>, serde_norway::Error> {
    [AuthorizationPolicy::crd(), BackendPolicy::crd()]
        .into_iter()
        .map(|mut crd| {
            keep_unknown_spec_fields(&mut crd);
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_norway::to_string(&crd)?;
            Ok((name, yaml))
        })
        .collect()
}

/// The API server drops fields a structural schema does not name before the
/// object is stored (and before admission), so a misspelt field (`mTLS:
/// STRICT`, `allowed:`) would reach the controller as a policy without it,
/// accepted and more open than meant, whenever the client does not ask for
/// strict field validation (Helm, GitOps controllers, `kubectl
/// --validate=false`). Kept, the field reaches the validating webhook
/// (`inject::validate`), which refuses the policy at apply by name; past it
/// (the webhook configuration removed), the controller refuses it, and a
/// refused AuthorizationPolicy closes its namespace rather than opening it.
fn keep_unknown_spec_fields(crd: &mut CustomResourceDefinition) {
    fn keep(schema: &mut JSONSchemaProps) {
        if let Some(props) = schema.properties.as_mut() {
            schema.x_kubernetes_preserve_unknown_fields = Some(true);
            props.values_mut().for_each(keep);
        }
        match schema.items.as_mut() {
            Some(JSONSchemaPropsOrArray::Schema(item)) => keep(item),
            Some(JSONSchemaPropsOrArray::Schemas(items)) => items.iter_mut().for_each(keep),
            None => {}
        }
    }
    for version in &mut crd.spec.versions {
        let spec = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("spec"));
        if let Some(spec) = spec {
            keep(spec);
        }
    }
}

/// Whether an installed CRD is one whose spec keeps unknown fields at every
/// level, as this release's do (those of earlier releases pruned them).
pub fn keeps_unknown_spec_fields(crd: &CustomResourceDefinition) -> bool {
    fn kept(schema: &JSONSchemaProps) -> bool {
        let here = schema.properties.as_ref().is_none_or(|props| {
            schema.x_kubernetes_preserve_unknown_fields == Some(true) && props.values().all(kept)
        });
        here && match schema.items.as_ref() {
            Some(JSONSchemaPropsOrArray::Schema(item)) => kept(item),
            Some(JSONSchemaPropsOrArray::Schemas(items)) => items.iter().all(kept),
            None => true,
        }
    }
    crd.spec.versions.iter().all(|v| {
        v.schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| s.properties.as_ref())
            .and_then(|p| p.get("spec"))
            .is_some_and(kept)
    })
}

/// `strait crds`: the CRDs as one multi-document stream.
pub fn stream() -> Result<String, serde_norway::Error> {
    Ok(render()?
        .into_iter()
        .map(|(_, yaml)| yaml)
        .collect::<Vec<_>>()
        .join("---\n"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `kubectl get strait` lists both kinds, and `kubectl explain` says
    /// what the fields a user writes first take.
    #[test]
    fn the_crds_are_a_category_and_explain_their_fields() {
        let stream = stream().unwrap();
        let crds: Vec<serde_json::Value> = stream
            .split("---\n")
            .map(|d| serde_norway::from_str(d).unwrap())
            .collect();
        assert_eq!(crds.len(), 2);
        for crd in &crds {
            assert_eq!(
                crd["spec"]["names"]["categories"],
                serde_json::json!(["strait"])
            );
        }
        let spec = |i: usize| {
            &crds[i]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        };
        let authz = &spec(0)["properties"];
        for at in [
            "/targetRef/properties/name",
            "/selector/properties/matchLabels",
            "/allow/items/properties/identity",
        ] {
            let d = authz
                .pointer(&format!("{at}/description"))
                .and_then(|d| d.as_str());
            assert!(d.is_some_and(|d| !d.is_empty()), "{at}");
        }
        assert!(
            authz
                .pointer("/allow/items/properties/identity/description")
                .unwrap()
                .as_str()
                .unwrap()
                .contains("spiffe://")
        );
        let bp = spec(1)["description"].as_str().unwrap();
        assert!(!bp.contains("parse"), "{bp}");
    }

    /// `deploy/crds/` is what `strait crds` prints: regenerate with
    /// `strait crds > deploy/crds/policy.strait.dev.yaml` when the types change.
    #[test]
    fn the_crds_in_deploy_are_generated_from_the_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/crds/policy.strait.dev.yaml"
        );
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == stream().unwrap(),
            "deploy/crds/policy.strait.dev.yaml differs from the types; run \
             `cargo run -p strait-control-plane --bin strait -- crds > deploy/crds/policy.strait.dev.yaml`"
        );
    }

    #[test]
    fn every_crd_has_a_status_subresource_and_a_structural_schema() {
        for (name, yaml) in render().unwrap() {
            let v: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
            let version = &v["spec"]["versions"][0];
            assert_eq!(version["name"], "v1alpha1", "{name}");
            assert!(version["subresources"]["status"].is_object(), "{name}");
            let schema = &version["schema"]["openAPIV3Schema"];
            assert_eq!(schema["type"], "object", "{name}");
            assert!(
                schema["properties"]["spec"]["properties"].is_object(),
                "{name}"
            );
        }
    }

    /// `strait check` tells this release's CRDs from an earlier release's,
    /// which pruned unknown fields.
    #[test]
    fn an_earlier_release_s_pruning_crd_is_told_apart() {
        let mut crd = AuthorizationPolicy::crd();
        assert!(!keeps_unknown_spec_fields(&crd));
        keep_unknown_spec_fields(&mut crd);
        assert!(keeps_unknown_spec_fields(&crd));
        // Kept at the top of the spec only (edited by hand): a misspelt
        // field of an allow entry would still be dropped.
        let allow = crd.spec.versions[0]
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("spec"))
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("allow"))
            .and_then(|a| a.items.as_mut());
        let Some(JSONSchemaPropsOrArray::Schema(item)) = allow else {
            panic!("allow is a list of objects")
        };
        item.x_kubernetes_preserve_unknown_fields = None;
        assert!(!keeps_unknown_spec_fields(&crd));
    }

    /// Every object of a spec keeps what its schema does not name, so the API
    /// server hands a misspelt field on to the controller to refuse.
    #[test]
    fn every_object_of_a_spec_keeps_fields_its_schema_does_not_name() {
        fn objects(v: &serde_json::Value, path: String, out: &mut Vec<(String, bool)>) {
            if let Some(props) = v["properties"].as_object() {
                out.push((
                    path.clone(),
                    v["x-kubernetes-preserve-unknown-fields"] == true,
                ));
                for (k, p) in props {
                    objects(p, format!("{path}.{k}"), out);
                }
            }
            if v["items"].is_object() {
                objects(&v["items"], format!("{path}[]"), out);
            }
        }
        for (name, yaml) in render().unwrap() {
            let v: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
            let spec = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
            let mut found = Vec::new();
            objects(spec, "spec".into(), &mut found);
            assert!(found.len() > 2, "{name}: {found:?}");
            let pruned: Vec<_> = found.iter().filter(|(_, kept)| !kept).collect();
            assert!(pruned.is_empty(), "{name}: pruned {pruned:?}");
        }
    }

    /// What the kept field then meets: the controller's parser, which names it.
    #[test]
    fn a_misspelt_field_is_refused_by_name() {
        let v = serde_json::json!({
            "apiVersion": "policy.strait.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"mTLS": "STRICT", "selector": {"matchLabels": {"app": "web"}}},
        });
        let e = crate::authz::parse(&v).unwrap_err();
        assert!(e.reason.contains("unknown field `mTLS`"), "{e:?}");
    }
}
