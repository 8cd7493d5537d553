//! Every default and well-known name of the control plane, with why.

/// gRPC for the proxies (discovery, inbound policy, identity).
pub const GRPC_ADDR: &str = "[::]:8090";
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
/// A node's zone, as Kubernetes labels nodes and EndpointSlices report it.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// A Service's request for topology-aware routing (`Auto`), and its name
/// before Kubernetes 1.27.
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
pub const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";
/// How long after a watch opens the controller looks for the watching pod
/// (to know its zone) when its address is not in the index yet.
pub const ZONE_LOOKUP: std::time::Duration = std::time::Duration::from_secs(120);
/// Zone hints per endpoint at most (the API server allows 8).
pub const MAX_ZONE_HINTS: usize = 8;

/// The manifests directory is watched with inotify; a change is applied after this
/// quiet period, so an editor's burst of writes becomes one reload.
pub const MANIFEST_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(10);
/// The longest a reload waits for writes to stop.
pub const MANIFEST_DEBOUNCE_MAX: std::time::Duration = std::time::Duration::from_secs(1);
/// A manifest that suddenly holds nothing is applied only once it stayed empty
/// this long: `cmd > file` truncates the file before `cmd` writes it, and a
/// `kustomize build` or `kubectl get -o yaml` takes seconds. Meanwhile the
/// file's last objects stay, AuthorizationPolicies among them.
pub const MANIFEST_EMPTY_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest manifest file read (a whole namespace's worth of objects fits).
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;
/// One document of a manifest: Kubernetes keeps no object larger (etcd's
/// default request limit); a `List` of objects may be larger.
pub const MAX_OBJECT_BYTES: usize = 1536 * 1024;
pub const MAX_LIST_BYTES: usize = 16 * 1024 * 1024;
/// All manifest files together: a file that would take the total past this is
/// refused (its last good objects stay), so a directory cannot grow the
/// controller without bound.
pub const MAX_MANIFESTS_TOTAL_BYTES: u64 = 256 * 1024 * 1024;

/// Per-object limits, so that one object cannot cost the controller (and every
/// proxy watching it) without bound. Kubernetes' own where it has one.
pub const MAX_SERVICE_PORTS: usize = 256;
/// A Service has at most two cluster IPs (one per IP family).
pub const MAX_CLUSTER_IPS: usize = 2;
/// EndpointSlice: Kubernetes allows 1000 endpoints per slice and 100
/// addresses per endpoint. Its slices carry every port of their Service, so
/// they take as many TCP ports as a Service may have here.
pub const MAX_SLICE_ENDPOINTS: usize = 1000;
pub const MAX_SLICE_PORTS: usize = MAX_SERVICE_PORTS;
pub const MAX_ENDPOINT_ADDRESSES: usize = 100;
/// HTTPRoute, as Gateway API's CRD validation: rules per route, and per rule
/// its matches, filters and backendRefs; headers and query params per match.
pub const MAX_ROUTE_RULES: usize = 16;
pub const MAX_RULE_MATCHES: usize = 64;
pub const MAX_RULE_FILTERS: usize = 16;
pub const MAX_RULE_BACKENDS: usize = 16;
pub const MAX_MATCH_VALUES: usize = 16;
pub const MAX_ROUTE_PARENTS: usize = 32;
/// Regular expressions per route (Gateway API sets no limit of its own): each
/// is compiled here and in every client proxy.
pub const MAX_ROUTE_REGEXES: usize = 64;
/// AuthorizationPolicy: entries of `allow`, and ports.
pub const MAX_POLICY_ALLOW: usize = 1024;
pub const MAX_POLICY_PORTS: usize = 256;
/// The largest inbound policy a pod's view may be (about, in bytes of its
/// entries): policies that would make it larger close the pod instead. Well
/// under the 32 MiB a proxy reads, and far over what real policies make.
pub const MAX_POLICY_VIEW_BYTES: usize = 4 * 1024 * 1024;
/// A pod's kubelet probes kept for its policy, and the longest path: beyond
/// them a probe is not let through (and fails as before).
pub const MAX_PROBE_ROUTES: usize = 64;
pub const MAX_PROBE_PATH: usize = 1024;
/// What the kubelet's gRPC probes call.
pub const GRPC_HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
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
/// The longest `--cert-lifetime` accepted: a workload certificate is meant to be
/// short-lived, and no leaf outlives its issuer anyway.
pub const MAX_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);
/// The issuer signs nothing once it has less than this left to live.
pub const ISSUER_MIN_REMAINING: std::time::Duration = std::time::Duration::from_secs(60);
/// Certificates are back-dated this much, so a peer whose clock is slightly behind
/// still accepts a brand-new one.
pub const CERT_BACKDATE: std::time::Duration = std::time::Duration::from_secs(60);
/// Trust anchors and issuers made here (`strait install`, the demo) are
/// back-dated this much: they are made on the installer's machine, whose
/// clock may be minutes ahead of the cluster's (a kind cluster in a VM that
/// lags its host after a sleep), and an issuer not yet valid stops the
/// controller and fails every chain under it.
pub const CA_BACKDATE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Where the controller runs, for its own identity.
pub const CONTROLLER_NAMESPACE: &str = "strait-system";
/// Namespaces of the cluster's own no webhook of the mesh's sees (beside the
/// mesh's own): DNS and the API server's leases, which the controller, and
/// so every proxy, waits for.
pub const SYSTEM_NAMESPACES: [&str; 2] = ["kube-system", "kube-node-lease"];
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "strait-controller";

/// A TLS handshake on the gRPC port must finish within this.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a client of the gRPC port has, once connected (and past its TLS
/// handshake), to send its first bytes.
pub const GRPC_FIRST_BYTES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest destination a proxy may watch: a DNS name (253) and a port, with room.
pub const MAX_DESTINATION_LEN: usize = 300;
/// Views of destinations are dropped when nobody watches them, on every index
/// change and whenever the map grows past this (then twice its live size).
pub const VIEWS_PRUNE_AT: usize = 1024;
/// Streams one proxy connection may hold: its discovery watches (the proxy keeps
/// at most 1,000 by default, `MAX_PROXY_DISCOVERY_WATCHES` at most), its policy
/// watch and certificate requests, with room.
pub const GRPC_MAX_CONCURRENT_STREAMS: u32 = 2048;
/// Streams a connection may make h2 reset for its own errors (a window
/// overflowed, a frame on a closed stream) before it is sent away with
/// `GOAWAY(ENHANCE_YOUR_CALM)`. tonic turns hyper's cap off unless given
/// one: each reset is queued for a client that need not read, which any pod
/// could grow without bound before proving anything (RUSTSEC-2024-0003,
/// MadeYouReset).
/// The proxy's listeners keep the same 1,024; a proxy's calls send their
/// message with the head and never draw one.
pub const GRPC_MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// h2's own default, given so that no later tonic can lift it as it does
/// the cap above.
pub const GRPC_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// The most discovery watches a proxy may be set to keep (the proxy's own
/// bound, `strait.dev/proxy-max-discovery-watches`'s): they share its
/// connection's `GRPC_MAX_CONCURRENT_STREAMS` with its policy watch and
/// certificate requests, and a call beyond them would wait, unanswered.
pub const MAX_PROXY_DISCOVERY_WATCHES: usize = 2000;
/// Watches (discovery and policy) one source address may hold open at once:
/// one connection's worth, twice what one proxy keeps. Loopback is not counted.
pub const WATCHES_PER_SOURCE: usize = 2048;
/// Watches of one view (one destination, one pod's policy) one source address
/// may hold open at once: a proxy keeps one, and another while it
/// reconnects; a few proxies behind one address (VMs behind NAT) more.
pub const WATCHES_PER_SOURCE_AND_VIEW: usize = 16;
/// Connections to the gRPC port one source address may hold open (or be
/// handshaking) at once: a proxy needs one per certificate its open watches
/// were made under (two or three around a renewal), and another while it
/// reconnects. Loopback is not counted.
pub const GRPC_CONNECTIONS_PER_SOURCE: usize = 32;
/// Largest gRPC message accepted: a CSR and a token are a few KiB.
pub const GRPC_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// How often `--issuer-cert`/`--issuer-key` are read again for a renewed issuer.
pub const ISSUER_RELOAD: std::time::Duration = std::time::Duration::from_secs(10);
/// How often `--webhook-cert`/`--webhook-key` are read again for a renewed
/// certificate.
pub const WEBHOOK_CERT_RELOAD: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the API server keeps one watch of the controller's before it
/// ends it, and the controller watches again (from where it was: bookmarks).
pub const WATCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(55);
/// The longest the controller waits on the API server without a byte: a
/// watch ends within `WATCH_TIMEOUT`, so only a server gone silent (its node
/// lost, its connection with it) goes quieter.
pub const API_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(75);
/// How long a stopping controller waits for the injector's reviews in flight.
pub const WEBHOOK_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a stopping controller waits, once it has ended the watches, for
/// its gRPC connections to close; those still open then are cut. A client
/// that reads nothing (its flow-control window shut) holds its stream's last
/// message, and so the graceful close, for ever otherwise. With the
/// longest `--shutdown-delay` (8 s) it fits the pod's 30 s grace period.
pub const GRPC_DRAIN_TIMEOUT: std::time::Duration = GRPC_REQUEST_TIMEOUT;
/// How long a stopping controller tries to give its status writer's lease up.
pub const LEASE_RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Requests one source address may have waiting for an answer at once (a
/// certificate, or a watch not yet authenticated): each holds its headers and
/// up to a message's buffer. A proxy sends a few at start, one per new
/// destination after. Loopback is not counted.
pub const GRPC_UNANSWERED_PER_SOURCE: usize = 64;
/// A request must be received and answered (a watch: authenticated and its
/// stream begun) within this; a message that never completes is dropped then.
pub const GRPC_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// Request headers per stream at most: a token is about 1 KiB.
pub const GRPC_MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// What a client may send ahead on one stream and on a connection: requests
/// are small, and unread data is held in memory.
pub const GRPC_STREAM_WINDOW_BYTES: u32 = 64 * 1024;
pub const GRPC_CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;

/// HTTPRoute annotation listing the grpc-status values its rules retry (names or
/// numbers, comma separated): Gateway API's `retry` knows only HTTP statuses.
pub const RETRY_GRPC_CODES_ANNOTATION: &str = "retry.strait.dev/grpc-codes";
/// Retries of a rule that has no `retry` of its own but whose route asks for gRPC
/// retries by annotation: one is rarely enough, more multiplies load in an outage.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// Most retries a rule may ask for (the proxies cap them too): beyond this,
/// retries turn a partial outage into a full one.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// HTTP statuses a rule may retry (Gateway API: client and server errors only).
pub const RETRY_STATUS_CODES: std::ops::RangeInclusive<u32> = 400..=599;
/// Largest backendRef weight (Gateway API's own bound).
pub const MAX_BACKEND_WEIGHT: u32 = 1_000_000;
/// Status of a RequestRedirect that does not give one (Gateway API's default).
pub const DEFAULT_REDIRECT_STATUS: u32 = 302;
/// Compiled size limit of a route's regular expressions: the proxies' own, so a
/// pattern they could not compile is refused here and never reaches them.
pub const ROUTE_REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Service port `appProtocol` values that are HTTP (or carried over HTTP): any
/// other value makes the port opaque, as the protocol is not one strait can route.
/// `http2` and `grpc-web` are Istio's names, on Services written for it. Not
/// `https` nor `kubernetes.io/wss`: the app's own TLS, which no proxy reads (as
/// Istio has them), so no route could apply there.
pub const HTTP_APP_PROTOCOLS: [&str; 8] = [
    "",
    "http",
    "h2c",
    "http2",
    "kubernetes.io/h2c",
    "grpc",
    "grpc-web",
    "kubernetes.io/ws",
];
/// Bounds of a retry budget's `ttl`: shorter reacts to noise, longer remembers
/// traffic long gone (the proxies clamp to the same range).
pub const RETRY_BUDGET_TTL: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(60);
/// Largest `minRetriesPerSecond` of a retry budget: more is no budget at all.
pub const MAX_RETRY_BUDGET_MIN_PER_SECOND: u32 = 10_000;

/// The proxy's image (`strait.dev/proxy-image` overrides it per pod), tagged with
/// this release.
pub const PROXY_IMAGE_REPO: &str = "ghcr.io/strait-dev/strait-proxy";
pub const CONTROLLER_IMAGE_REPO: &str = "ghcr.io/strait-dev/strait";
pub fn proxy_image() -> String {
    format!("{PROXY_IMAGE_REPO}:v{}", env!("CARGO_PKG_VERSION"))
}
pub fn controller_image() -> String {
    format!("{CONTROLLER_IMAGE_REPO}:v{}", env!("CARGO_PKG_VERSION"))
}
/// Where injected proxies find the controller: its Service in its namespace.
pub const CONTROL_PLANE_URL: &str = "https://strait-controller.strait-system.svc:8090";
/// The audience of the projected ServiceAccount tokens proxies present: a token
/// minted for another audience (the API server's own) is never accepted.
pub const TOKEN_AUDIENCE: &str = "identity.strait.dev";
/// The proxy's uid and admin port, as `strait-proxy init` and its probes know them.
pub const PROXY_UID: u32 = 2102;
pub const PROXY_ADMIN_PORT: u16 = 4191;
/// The proxy's outbound, inbound and admin ports: never an app's, so never a
/// destination reached through a pod's proxy.
pub const MESH_PORTS: [u16; 3] = [PROXY_OUTBOUND_PORT, DEFAULT_INBOUND_PORT, PROXY_ADMIN_PORT];
/// Where the injected proxy takes the app's redirected connections.
pub const PROXY_OUTBOUND_PORT: u16 = 4140;
/// Where the controller serves the admission webhook (its Service maps 443 here).
pub const WEBHOOK_ADDR: &str = "[::]:8443";
/// An AdmissionReview larger than this is refused (a Pod is at most ~1.5 MiB in etcd).
pub const MAX_ADMISSION_REVIEW_BYTES: usize = 4 * 1024 * 1024;
/// And one of more values than this (some 25 MiB read, however small they
/// are; a pod with 20,000 environment variables holds 80,000).
pub const MAX_ADMISSION_REVIEW_VALUES: usize = 500_000;
/// Connections the webhook serves at once (the API server needs a handful).
pub const WEBHOOK_MAX_CONNECTIONS: usize = 256;
/// Bytes of AdmissionReviews the webhook holds at once, whatever the number
/// of connections: eight of the largest, well inside the controller's memory.
pub const WEBHOOK_BODY_BUDGET: usize = 8 * MAX_ADMISSION_REVIEW_BYTES;
/// TokenReviews in flight at once, and how long one may take once sent:
/// with the wait for a turn below, less than a proxy waits for its call (5 s).
pub const TOKEN_REVIEWS_IN_FLIGHT: usize = 32;
pub const TOKEN_REVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// How long a token waits for one of the reviews in flight before it is
/// told the controller is busy: with the review's own time, within a
/// proxy's deadline for its call.
pub const TOKEN_REVIEW_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a proxy ejects an endpoint the first time when a BackendPolicy's
/// `outlierDetection` gives no `baseEjectionTime` (the proxy's own default).
pub const BREAKER_BASE_EJECTION: std::time::Duration = std::time::Duration::from_secs(5);

/// Certificates after the issuer in `--issuer-cert`: proxies refuse a chain
/// of more than six after a leaf (webpki's bound on a path), and present
/// the issuer and these.
pub const MAX_ISSUER_CHAIN: usize = 5;

/// The largest view of a destination sent, encoded: a quarter of the 32 MiB
/// a proxy reads, as every watch holds its view encoded until its proxy reads
/// it. A larger one is sent without the routes that do not fit.
pub const MAX_DISCOVERY_VIEW_BYTES: usize = 8 * 1024 * 1024;
/// Routes served on one Service port at most (Gateway API sets no limit):
/// every calling proxy holds and matches them all, and a port's routes are
/// a few dozen where teams or paths split it. The oldest are served.
pub const MAX_ROUTES_PER_PARENT: usize = 256;
