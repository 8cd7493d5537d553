//! Every default, limit and protocol name of the proxy, one line each with the reason
//! for its value. Flags in `cli` take their defaults from here.

use std::time::Duration;

/// Connections from other proxies (and plaintext clients where policy allows),
/// over IPv4 and IPv6 (IPv4 only where the kernel has no IPv6).
pub const INBOUND_ADDR: &str = "[::]:4143";
/// The app's outgoing connections, redirected here by iptables; loopback only.
pub const OUTBOUND_ADDR: &str = "127.0.0.1:4140";
/// Health, metrics and control; loopback only so nothing outside the pod reaches it.
pub const ADMIN_ADDR: &str = "127.0.0.1:4191";
/// The default ports of every proxy (outbound, inbound, admin): never an app's
/// target port, whichever ports this proxy itself listens on.
pub const MESH_PORTS: [u16; 3] = [4140, 4143, 4191];

/// `strait_api::DEFAULT_OPAQUE_PORTS` as the flag's default. They skip
/// protocol detection.
pub const OPAQUE_PORTS: &str = "25,587,2181,3306,4444,5432,6379,9300,11211";

/// How long to wait for the client's first bytes before connecting onward as for
/// opaque TCP, so that a server-speaks-first protocol on an undeclared port gets
/// its greeting through; a silent client that then speaks HTTP is still served as
/// HTTP (`outbound::silent`). 300 ms keeps the greeting's delay imperceptible to
/// humans and far inside database drivers' connect timeouts (seconds).
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(300);
/// Bytes read at most while detecting: an HTTP/1 request line still unfinished
/// here is taken for HTTP, and hyper caps the whole head (`MAX_HEADER_BYTES`).
pub const DETECT_MAX_BYTES: usize = 8 * 1024;

/// TCP connect to an upstream. Inside a cluster a healthy peer answers in
/// milliseconds; a second means it is gone.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Time a client has to send a complete HTTP/1 request head once it started one
/// (slowloris protection); answered with 408.
pub const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a request body may stall (no byte from the client); answered with 408.
pub const HTTP_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// An HTTP/1 keep-alive connection idle this long is closed silently. Longer than
/// the idle timeout of common client pools (Go: 90 s) so the client closes first
/// and never races a reuse against our close.
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// An opaque TCP stream with no bytes either way for this long is closed (as Istio).
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// TCP keepalive on every connection the proxy holds: probed after this long
/// without a byte, and again as often, `TCP_KEEPALIVE_PROBES` times, so that a
/// peer gone without a word (its node lost) is found in about 40 s, and
/// stateful middleboxes (a cloud NAT forgetting flows after 350 s) keep a
/// quiet stream's entry. Linkerd probes after 10 s too.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(10);
pub const TCP_KEEPALIVE_PROBES: u32 = 3;
/// How long sent bytes may go unacknowledged on a connection over the network
/// before it is given up (`TCP_USER_TIMEOUT`), for a peer gone while data was
/// in flight, which keepalive does not probe. Set, it also takes over from
/// keepalive's count of probes, so it is keepalive's 40 s: longer would find
/// a quiet dead peer later too. Linux applies it as well to a receiver that
/// keeps its window shut (Linkerd's is 30 s).
pub const TCP_USER_TIMEOUT: Duration =
    Duration::from_secs(TCP_KEEPALIVE.as_secs() * (1 + TCP_KEEPALIVE_PROBES as u64));
const _: () = assert!(TCP_USER_TIMEOUT.as_secs() == 40, "keepalive's give-up time");

/// How often heap freed since is handed back to the kernel (`malloc_trim`), so
/// a burst's memory leaves within this time of its end.
pub const HEAP_TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Connections open at once per listener; beyond this new ones get 503 (HTTP) or
/// are closed. Bounds memory against floods.
pub const MAX_CONNECTIONS: usize = 20_000;
/// Where the container has a memory limit, `--max-connections` by default is
/// at most what fits in it: this much kept for the proxy itself, and this
/// much per connection of a full listener (an idle HTTP/1 keep-alive
/// connection holds about 17 KiB, hyper's two buffers and its task). A
/// flood the limits allow must not get the proxy OOM-killed.
pub const MEMORY_RESERVE: u64 = 32 << 20;
pub const MEMORY_PER_CONNECTION: u64 = 32 << 10;
/// And at least this many, however low the limit.
pub const MIN_MAX_CONNECTIONS: usize = 256;
/// How often the cgroup's memory use is read, to shed new requests near the
/// limit (`cgroup::Pressure`): a slow upload holds at most a stream's window,
/// so between two reads a burst adds little.
pub const MEMORY_PRESSURE_EVERY: Duration = Duration::from_millis(100);
/// Requests in flight at once per direction: each may hold a connection to
/// the app (HTTP/1 takes one per request), so peers' multiplexed streams
/// (1,000 per connection) cannot take every file descriptor the proxy has,
/// its admin port's included. As Linkerd's default.
pub const MAX_IN_FLIGHT_REQUESTS: usize = 100_000;
/// Connections beyond the cap that may be held briefly to be told 503.
pub const MAX_REJECTING_CONNECTIONS: usize = 256;

/// Request header fields per HTTP/1 message (hyper's default; beyond it: 431).
pub const MAX_HEADERS: usize = 100;
/// Bytes of an HTTP/1 request head or HTTP/2 header list (beyond it: 431).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// hyper's HTTP/1 read and write buffers grow to about this at most (its
/// default is about 408 KiB). A body chunk is what one read returned, so an
/// app's fast upload came in chunks of up to half a MiB, two or three held per
/// upload on the way to a slower peer, and a slow download queued 408 KiB: a
/// few hundred transfers filled the sidecar's memory. Above `MAX_HEADER_BYTES`, since a
/// head must fit in the buffer whole.
pub const HTTP1_MAX_BUF_BYTES: usize = MAX_HEADER_BYTES + 16 * 1024;
/// The same head as HTTP/2 counts it (RFC 9113 §6.5.2: each field's name and
/// value and 32 bytes, the pseudo-headers among them), with room for what
/// the hop between proxies adds (`strait-target-port`, `strait-orig-proto`,
/// `traceparent`, `:authority` beside `host`): a head an app may send over
/// HTTP/1 is taken whole by the peer proxy, not refused 431 in the mesh only.
pub const H2_MAX_HEADER_LIST_BYTES: usize = MAX_HEADER_BYTES + (MAX_HEADERS + 8) * 32 + 1024;

/// Concurrent streams per HTTP/2 connection: plenty for gRPC fan-in, bounded memory.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Streams a client may open and reset before we answer them; beyond this the
/// connection is closed (CVE-2023-44487, rapid reset).
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 50;
/// Streams we may reset for protocol errors before closing the connection.
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// HTTP/2 flow-control windows: what one connection (and one stream) may have in
/// flight unacknowledged; the bound on buffered bytes per connection. Bytes a
/// slow reader leaves unread hold window of the connection as well as of their
/// stream (h2 gives both back only as they are read), so the connection's is
/// 32 streams' worth: it takes that many stalled downloads or uploads, not
/// four, before the connection's other streams wait too. A stream's window
/// still carries 256 KiB per round trip (a quarter of a gigabyte a second at
/// 1 ms).
pub const H2_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// Bytes of a response an HTTP/2 stream may hold ready for a client that
/// does not take them (hyper's default is 400 KiB), give or take the one body
/// chunk hyper sends whole once there is room: a client that grants itself
/// huge windows and stops reading could otherwise have a connection's
/// thousand streams hold 400 MiB.
pub const H2_MAX_SEND_BUF: usize = 64 * 1024;
/// HTTP/2 PING interval and timeout, to notice dead clients on idle
/// connections (the server's). As a client, only peer proxies are pinged
/// (below; `http::client::keepalive_for` says why).
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The same for connections to peer proxies (mTLS): one whose node died (no
/// reset ever comes) stops taking requests within 15 s, not 40.
pub const H2_PEER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const H2_PEER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP/2 connection to an upstream (a peer proxy, or an app speaking HTTP/2)
/// is closed once a check this often finds it was unused since the last one:
/// no new request, and no stream open (so 10–20 s after its last use).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle pooled HTTP/1 connection to an app is not used past this (Linkerd's
/// 3 s): under the keep-alive timeout of common app servers (Node.js and
/// uvicorn 5 s, nginx 75 s), so a request is not sent on a connection such an
/// app is closing for idleness. Sent on one, it would get a 502: the app never
/// reads it, and it was written, so the proxy cannot know it is safe to resend.
/// (hyper resends only requests the close beat to the socket.) Apps with a
/// shorter keep-alive (gunicorn's async workers, 2 s) can still meet the race.
pub const HTTP1_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle HTTP/1 connections kept per upstream: all of them, until
/// `HTTP1_POOL_IDLE_TIMEOUT` (as Linkerd's inbound). A cap closed what a burst
/// above it had opened, only to open them again at the next burst: a
/// handshake each time, and the proxy left holding every closed
/// connection's TIME_WAIT, which all its callers' connections to one app port
/// share (some 28,000 ports a minute). The connections in use are bounded by
/// `--max-in-flight-requests`.
pub const POOL_MAX_IDLE_PER_HOST: usize = usize::MAX;
/// HTTP/2 connections opened to one upstream when every open one is at the
/// peer's concurrent-stream limit; past this, requests wait for a stream.
pub const H2_MAX_CONNECTIONS_PER_UPSTREAM: usize = 16;
/// After another connection to an upstream failed to open, how long requests
/// queue on the open ones instead of trying again.
pub const H2_CONNECT_BACKOFF: Duration = Duration::from_secs(1);
/// Upstream addresses for which a connection pool is kept, and apart as many
/// inbound callers with HTTP/2 connections of their own to the app; beyond
/// this the least recently used eighth of them is dropped.
pub const MAX_CLIENT_POOLS: usize = 4096;
/// Largest message taken from the controller's streams. gRPC's default of
/// 4 MiB is a Service of some 40,000 endpoints, or one AuthorizationPolicy
/// of a hundred ports and a thousand identities (the all-ports entries are
/// repeated in each port's); past it a proxy's view would freeze for good.
pub const CONTROL_MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// Kubernetes' default terminationGracePeriodSeconds is 30 s; drain a bit less.
pub const SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(25);

/// After an inbound peer's certificate ends, how long its connection's
/// requests are still taken: those that raced the GOAWAY sent then. Past it,
/// each is refused (a peer that ignores the GOAWAY).
pub const PEER_EXPIRY_GRACE: Duration = Duration::from_secs(5);
/// After the drain, the last requests' spans get this long to reach the
/// collector before the process exits (still within Kubernetes' 30 s).
pub const TRACE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Retries of a request that never reached a backend (connection refused or
/// timed out) on routes without a retry policy: always safe, and enough to step
/// over a dead endpoint or two.
pub const CONNECT_RETRIES: u32 = 2;
/// The most retries a route may ask for (GEP-1731 leaves it open): beyond a few,
/// retries only multiply an outage.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// Backoff base of a route retry policy that names none (Envoy's default).
pub const RETRY_BACKOFF: Duration = Duration::from_millis(25);
/// The longest wait between two attempts, whatever the backoff base says.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);
/// Retry budget unless a BackendPolicy says otherwise (as Linkerd): retries at
/// most 20 % of recent requests, plus 10 a second so that low traffic can still
/// retry, counted over 10 s.
pub const RETRY_BUDGET_RATIO: f32 = 0.2;
pub const RETRY_BUDGET_MIN_PER_SECOND: u32 = 10;
pub const RETRY_BUDGET_TTL: Duration = Duration::from_secs(10);
/// tower's budget takes the floor times the TTL as its reserve: bounded.
pub const MAX_RETRY_BUDGET_MIN_PER_SECOND: u32 = 100_000;
/// How long a request to an HTTP/1 upstream waits for the first frame of a body
/// of declared length, so that it is written with the head (`first_frame`).
pub const FIRST_BODY_FRAME_WAIT: Duration = Duration::from_millis(100);
/// Request bodies up to this size are kept while sent, so a retry can send them
/// again; larger ones stream and are never retried (after their first byte).
pub const MAX_REPLAY_BODY_BYTES: usize = 64 * 1024;

/// Consecutive failures (5xx, connection errors) that eject an endpoint unless a
/// BackendPolicy says otherwise (Envoy's consecutive_5xx).
pub const BREAKER_CONSECUTIVE_FAILURES: u32 = 5;
/// The first ejection's length; each one in a row doubles it, up to the max.
pub const BREAKER_BASE_EJECTION: Duration = Duration::from_secs(5);
pub const BREAKER_MAX_EJECTION: Duration = Duration::from_secs(300);
/// At most half of a backend's endpoints are ejected at once: ejecting them all
/// would turn a partial outage into a total one.
pub const BREAKER_MAX_EJECTED_PERCENT: u32 = 50;

/// TLS client configs kept per peer identity (and ALPN), so sessions resume. A
/// pod talks to a few identities; the bound holds against anything else.
pub const MAX_PEER_TLS_CONFIGS: usize = 1024;

/// Set by a proxy on requests to a peer proxy: the port of the app in the peer pod.
pub const TARGET_PORT_HEADER: http::HeaderName =
    http::HeaderName::from_static("strait-target-port");
/// Set on responses the proxy itself generates, naming why.
pub const PROXY_ERROR_HEADER: http::HeaderName =
    http::HeaderName::from_static("strait-proxy-error");

/// How long the series of a caller (`inbound_peer_*`) stay after its last
/// connection closes: long enough for any scrape interval to see their last
/// counts, short enough that callers gone for good leave `/metrics`.
pub const METRICS_RETAIN_IDLE: Duration = Duration::from_secs(10 * 60);

/// Prefix of every metric the proxy exports.
pub const METRICS_PREFIX: &str = "strait_proxy";

/// Control-plane reconnects: jittered, from 100 ms up to 10 s between attempts.
pub const CONTROL_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const CONTROL_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long the first request to a new destination waits for discovery's first
/// answer before the destination is treated as not meshed (passed through).
pub const DISCOVERY_FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// As long, at most, while the controller is known to be out of reach (a
/// watch's call failed to reach it and none has got through since): long
/// enough for a blip (a replica going away, reconnected to in 100–200 ms),
/// not the whole wait for every new destination through an outage, whose
/// own failed call would come too late to end it, queued behind every other
/// watch's reconnect.
pub const DISCOVERY_WAIT_WHILE_UNREACHABLE: Duration = Duration::from_millis(500);
/// Addresses discovery is asked about (`--discovery-networks`): every one
/// (but link-local ones) unless narrowed to a cluster's pod and Service
/// ranges, after which a connection to any other address (the internet, a
/// cloud API) passes through at once, as Linkerd's `clusterNetworks` have
/// it. Not narrowed by default: clusters put pods and Services outside the
/// private ranges too (GKE's default Service range is 34.118.224.0/20), and
/// a meshed Service's address not asked about would lose its mTLS.
pub const DISCOVERY_NETWORKS: &str = "0.0.0.0/0,::/0";
/// Destinations watched at once; beyond this the least recently used is dropped.
/// A pod rarely talks to more than a few hundred Services; the cap bounds memory
/// and the controller's streams against a flood of made-up names.
pub const MAX_DISCOVERY_WATCHES: usize = 1000;
/// The most `--max-discovery-watches` may be: every watch is a stream on the
/// proxy's one connection to the controller, which takes 2,048 at once
/// (the controller's `GRPC_MAX_CONCURRENT_STREAMS`) with the policy watch and
/// certificate requests. A watch beyond would wait for a place unanswered,
/// and a certificate renewal behind it.
pub const MAX_DISCOVERY_WATCHES_LIMIT: usize = 2000;
/// A destination no request used for this long stops being watched.
pub const DISCOVERY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Latency assumed of an endpoint before any response from it. Low, so a new
/// endpoint is tried at once (one response replaces the guess); a high guess
/// would leave a new, equally fast endpoint idle until the guess decayed.
pub const BALANCER_DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Latency recorded for an endpoint that failed (connection refused, its proxy
/// could not reach its app): as slow as a connect timeout, so that it loses every
/// comparison with a working endpoint until the penalty decays (tens of seconds),
/// when one request tries it again.
pub const BALANCER_FAILURE_PENALTY: Duration = CONNECT_TIMEOUT;
/// Time constant of the latency average: how long good answers take to restore
/// an endpoint that was slow.
pub const BALANCER_EWMA_DECAY: Duration = Duration::from_secs(10);

/// Set on requests between proxies: the HTTP version the app spoke, restored by
/// the peer proxy towards its app.
pub const ORIG_PROTO_HEADER: http::HeaderName = http::HeaderName::from_static("strait-orig-proto");

/// The namespace this proxy's workload runs in, when not told.
pub const NAMESPACE: &str = "default";

/// Worker threads of the proxy's runtime (see `--threads`).
pub const THREADS: u16 = 1;

/// Certificates are renewed at 65 to 75 % of their lifetime (jittered, so proxies
/// started together do not renew together), leaving a quarter of it for retries.
pub const RENEW_AT_MIN: f64 = 0.65;
pub const RENEW_AT_MAX: f64 = 0.75;
/// A certificate is never renewed sooner than this after the last one, whatever
/// its lifetime says (a leaf cut short by an expiring issuer, a clock gone wrong).
pub const RENEW_AFTER_MIN: Duration = Duration::from_secs(1);
/// How long a certificate request may take before it is retried.
pub const CERTIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer has this long to finish its TLS handshake (as the HTTP header timeout).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, and for how many bytes, a connection whose handshake was
/// refused is read from after the alert, so that the client reads the alert
/// rather than meet a reset (`inbound::linger`).
pub const REFUSED_HANDSHAKE_LINGER: Duration = Duration::from_secs(1);
pub const REFUSED_HANDSHAKE_LINGER_BYTES: usize = 64 * 1024;
/// The service account of this workload, when not told (as Kubernetes' default).
pub const SERVICE_ACCOUNT: &str = "default";
/// The trust domain of workload identities, as Kubernetes' default cluster domain.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The first byte of a TLS record carrying a handshake (a ClientHello).
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;
/// Set by the inbound proxy on requests to its app: the verified identity of the
/// calling workload (removed from whatever a client sent).
pub const CLIENT_ID_HEADER: http::HeaderName = http::HeaderName::from_static("strait-client-id");

/// Where the controller runs unless --control-plane-identity says otherwise.
pub const CONTROL_PLANE_NAMESPACE: &str = "strait-system";
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "strait-controller";

/// Connecting (TCP and TLS) to the control plane.
pub const CONTROL_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The largest count a limit flag takes (connections, requests in flight):
/// each connection holds a file descriptor and buffers, so more is a typo.
pub const MAX_COUNT_FLAG: usize = 10_000_000;

/// The longest duration any flag takes (a year): longer is a typo, and deadlines
/// computed from it must not overflow.
pub const MAX_DURATION_FLAG: Duration = Duration::from_secs(366 * 24 * 3600);

/// The uid the injected sidecar runs as; `strait-proxy init` exempts its traffic
/// from redirection (the proxy's own connections would otherwise loop back to it).
pub const PROXY_UID: u32 = 2102;
/// The inbound and outbound listener ports that `strait-proxy init` redirects to
/// (the ports of `INBOUND_ADDR` and `OUTBOUND_ADDR`).
pub const INBOUND_PORT: u16 = 4143;
pub const OUTBOUND_PORT: u16 = 4140;
/// The admin port: the kubelet's probes reach it directly, never through the proxy.
pub const ADMIN_PORT: u16 = 4191;
