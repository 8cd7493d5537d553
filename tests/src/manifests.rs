//! A manifests directory for a test controller, written the way a user would write
//! Kubernetes YAML.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory, removed on drop.
pub struct ManifestDir {
    path: PathBuf,
}

impl Default for ManifestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl ManifestDir {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "strait-manifests-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).expect("create manifests dir");
        ManifestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a file atomically (write then rename), as editors and kubectl-like
    /// tools do, so the controller never reads half a file.
    pub fn write(&self, name: &str, yaml: &str) {
        let tmp = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write manifest");
        std::fs::rename(&tmp, self.path.join(name)).expect("rename manifest");
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.path.join(name)).expect("remove manifest");
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub fn service(ns: &str, name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: [{{name: http, port: {port}}}]\n"
    )
}

/// An EndpointSlice with one endpoint (the app at `app`), backed by Pod `pod`.
pub fn endpoint(ns: &str, svc: &str, pod: &str, app: SocketAddr) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-{pod}\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints:\n  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n    targetRef: {{kind: Pod, name: {pod}}}\n",
        app.port(),
        app.ip()
    )
}

/// A Pod without a proxy: what an endpoint's `targetRef` names. From the API
/// server, an endpoint whose pod the controller has not seen is left out.
pub fn unmeshed_pod(ns: &str, pod: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {ns}\nspec:\n  containers: [{{name: app, image: app}}]\n"
    )
}

/// A meshed Pod whose proxy's inbound listener is on `inbound_port`.
pub fn meshed_pod(ns: &str, pod: &str, service_account: &str, inbound_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {ns}\n  annotations: {{strait.dev/inbound-port: \"{inbound_port}\"}}\nspec:\n  serviceAccountName: {service_account}\n  containers: [{{name: app, image: app}}]\n"
    )
}
