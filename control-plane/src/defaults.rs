//! Every default and well-known name of the control plane, with why.

/// gRPC for the proxies (discovery, inbound policy, identity).
pub const GRPC_ADDR: &str = "0.0.0.0:8090";
/// Health and metrics; loopback by default (as Linkerd's 9990).
pub const ADMIN_ADDR: &str = "127.0.0.1:9990";

/// The trust domain of workload identities, as Kubernetes' default cluster domain.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The cluster DNS suffix of Service names.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Annotation the injector puts on a meshed Pod: the port of its proxy's inbound
/// listener. Its presence is what makes a Pod meshed.
pub const INBOUND_PORT_ANNOTATION: &str = "strait.dev/inbound-port";
/// The default inbound port, when the annotation is present but empty.
pub const DEFAULT_INBOUND_PORT: u16 = 4143;
/// Label every EndpointSlice carries naming its Service (set by Kubernetes).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The manifests directory is watched with inotify; a change is applied after this
/// quiet period, so an editor's burst of writes becomes one reload.
pub const MANIFEST_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(10);
/// And rescanned this often regardless (files compared by modification time and
/// size), for filesystems that do not report changes.
pub const MANIFEST_SCAN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Prefix of every metric the controller exports.
pub const METRICS_PREFIX: &str = "strait_controller";

/// The Secret type Kubernetes gives long-lived service-account tokens; in local
/// mode these are the tokens the identity service accepts.
pub const SA_TOKEN_SECRET_TYPE: &str = "kubernetes.io/service-account-token";
/// The annotation naming the service account such a Secret's token is for.
pub const SA_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";

/// Lifetime of workload certificates: short, so a leaked one is soon useless;
/// proxies renew at about 70 % of it.
pub const CERT_LIFETIME: &str = "24h";
/// Certificates are back-dated this much, so a peer whose clock is slightly behind
/// still accepts a brand-new one.
pub const CERT_BACKDATE: std::time::Duration = std::time::Duration::from_secs(60);

/// Where the controller runs, for its own identity.
pub const CONTROLLER_NAMESPACE: &str = "strait-system";
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "strait-controller";

/// A TLS handshake on the gRPC port must finish within this.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
