//! strait's own resources (`policy.strait.dev/v1alpha1`) as CustomResourceDefinitions,
//! generated from the Rust types the controller parses them with, so the schema
//! users' `kubectl apply` is checked against cannot drift from what the
//! controller accepts. `strait crds` prints them; `deploy/crds/` holds the same.

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
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_norway::to_string(&crd)?;
            Ok((name, yaml))
        })
        .collect()
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
}
