//! A mesh of namespace pods, as in a cluster: the controller on the host
//! (issuing certificates, on the LAN's host address), and in each pod the
//! rules of `strait-proxy init`, a `strait-proxy` as uid 2102 with its own
//! service-account token, and whatever app the test runs there
//! ([`crate::netns::Pod::run`]). Services get virtual cluster IPs (10.96.0.x)
//! that exist only in the manifests: the outbound redirect catches them and
//! discovery resolves them, as kube-proxy's absence would demand.
//!
//! Needs root, iproute2, iptables (nft) and nsenter: [`PodMesh::start`] says
//! so (fails in CI, skips elsewhere).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::manifests::ManifestDir;
use crate::mesh::ControllerProc;
use crate::netns::{self, Lan, Pod};
use crate::pki::{Pki, token_secret};
use crate::process::{Proc, binary, free_port};
use crate::wait;

pub const NS: &str = "test";
/// The proxy's uid, as the injector runs it.
pub const PROXY_UID: u32 = 2102;
const TRUST_DOMAIN: &str = "cluster.local";
/// Where Services get their virtual addresses.
const CLUSTER_IPS: &str = "10.96.0.0/16";
/// Where dual-stack Services get their IPv6 ones.
const CLUSTER_IPS6: &str = "fd00:96::/112";

pub struct PodMesh {
    pub lan: Lan,
    pub dir: ManifestDir,
    /// Tokens and trust anchors, readable by the proxies' uid.
    files: PathBuf,
    pki: Pki,
    controller: Option<ControllerProc>,
    grpc: SocketAddr,
    cert_lifetime: Option<String>,
    cluster_ips: u8,
}

/// A pod of the mesh: its namespace, its proxy, and its identity.
pub struct MeshedPod {
    pub pod: Pod,
    pub service_account: String,
    pub proxy: Option<Proc>,
    /// Its `app` label: the name it was made with.
    app: String,
}

impl PodMesh {
    /// The controller on the host, no pods yet; `None` (after
    /// [`crate::host::missing`]) when this host cannot make pods.
    pub async fn start() -> Option<PodMesh> {
        Self::start_with(None).await
    }

    /// As [`PodMesh::start`], the controller issuing certificates that last
    /// `cert_lifetime` (proxies renew them at half-life).
    pub async fn start_with(cert_lifetime: Option<&str>) -> Option<PodMesh> {
        let lan = Lan::new()?;
        if !netns::have("iptables-nft-restore") || !netns::have("nsenter") {
            crate::host::missing("iptables (nft) and nsenter");
            return None;
        }
        let dir = ManifestDir::new();
        let pki = Pki::new();
        let files = std::env::temp_dir().join(format!(
            "strait-pods-{}-{}",
            std::process::id(),
            lan.host_ip()
        ));
        std::fs::create_dir_all(&files).expect("pod files dir");
        readable(&files, 0o755);
        let anchors = files.join("anchors.pem");
        std::fs::copy(pki.anchors(), &anchors).expect("copy trust anchors");
        readable(&anchors, 0o644);
        let grpc = SocketAddr::from((lan.host_ip(), free_port()));
        let controller =
            ControllerProc::start_with(dir.path(), grpc, Some(&pki), cert_lifetime).await;
        Some(PodMesh {
            lan,
            dir,
            files,
            pki,
            controller: Some(controller),
            grpc,
            cert_lifetime: cert_lifetime.map(str::to_string),
            cluster_ips: 0,
        })
    }

    /// The mesh's trust anchor and issuer (to make certificates of one's own).
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    pub fn controller(&self) -> &ControllerProc {
        self.controller.as_ref().expect("the controller runs")
    }

    /// Kills the controller (as a crash would).
    pub fn stop_controller(&mut self) {
        self.controller = None;
    }

    /// Starts the controller again, on the same address, manifests and issuer.
    pub async fn start_controller(&mut self) {
        self.controller = Some(
            ControllerProc::start_with(
                self.dir.path(),
                self.grpc,
                Some(&self.pki),
                self.cert_lifetime.as_deref(),
            )
            .await,
        );
    }

    /// A Service on a new virtual cluster IP; `port` sends to the pods' `target`.
    pub fn service(&mut self, name: &str, port: u16, target: u16) -> SocketAddr {
        self.cluster_ips += 1;
        let ip = Ipv4Addr::new(10, 96, 0, self.cluster_ips);
        self.dir.write(
            &format!("svc-{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: main, port: {port}, targetPort: {target}}}]\n"
            ),
        );
        SocketAddr::from((ip, port))
    }

    /// A dual-stack Service (IPv4 first, as `PreferDualStack` makes it), with
    /// an EndpointSlice of each family listing `pods`: its IPv4 and IPv6
    /// addresses.
    pub fn dual_stack_service(
        &mut self,
        name: &str,
        port: u16,
        target: u16,
        pods: &[&MeshedPod],
    ) -> (SocketAddr, SocketAddr) {
        self.cluster_ips += 1;
        let n = self.cluster_ips;
        let (ip, ip6) = (
            Ipv4Addr::new(10, 96, 0, n),
            std::net::Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, u16::from(n)),
        );
        self.dir.write(
            &format!("svc-{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  clusterIP: {ip}\n  clusterIPs: [\"{ip}\", \"{ip6}\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: PreferDualStack\n  ports: [{{name: main, port: {port}, targetPort: {target}}}]\n"
            ),
        );
        self.endpoints(name, target, pods);
        let mut eps = String::new();
        for p in pods {
            let ip6 = p.pod.ip6.expect("a dual-stack pod");
            eps.push_str(&format!(
                "  - addresses: [\"{ip6}\"]\n    conditions: {{ready: true}}\n    targetRef: {{kind: Pod, name: {}}}\n",
                p.pod.name
            ));
        }
        self.dir.write(
            &format!("slice-{name}-v6.yaml"),
            &format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-v6\n  namespace: {NS}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv6\nports: [{{name: main, port: {target}}}]\nendpoints:\n{eps}"
            ),
        );
        (SocketAddr::from((ip, port)), SocketAddr::from((ip6, port)))
    }

    /// The Service's endpoints: `port` on each of `pods`.
    pub fn endpoints(&self, service: &str, port: u16, pods: &[&MeshedPod]) {
        let mut eps = String::new();
        for p in pods {
            eps.push_str(&format!(
                "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n    targetRef: {{kind: Pod, name: {}}}\n",
                p.pod.ip, p.pod.name
            ));
        }
        self.dir.write(
            &format!("slice-{service}.yaml"),
            &format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}\n  namespace: {NS}\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: main, port: {port}}}]\nendpoints:\n{eps}"
            ),
        );
    }

    /// Only meshed clients reach `service`: plaintext is refused.
    pub fn strict(&self, service: &str) {
        self.dir.write(
            &format!("policy-{service}.yaml"),
            &format!(
                "apiVersion: policy.strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {service}, namespace: {NS}}}\nspec:\n  targetRef: {{kind: Service, name: {service}}}\n  mtls: STRICT\n"
            ),
        );
    }

    /// A new pod running as `service_account`, with `init`'s rules and its proxy
    /// (with `extra` flags) ready; its app is up to the test.
    pub async fn pod(&mut self, name: &str, service_account: &str, extra: &[&str]) -> MeshedPod {
        let pod = self.lan.pod(name);
        pod.init(&[]);
        // Nothing a proxy passes through (a cluster IP it has no answer for yet)
        // leaves for the host: those addresses exist only in the manifests.
        let families = [
            ("iptables-nft", CLUSTER_IPS),
            ("ip6tables-nft", CLUSTER_IPS6),
        ];
        for (iptables, cluster_ips) in &families[..if pod.ip6.is_some() { 2 } else { 1 }] {
            let reject = pod
                .command(iptables)
                .args(["-A", "OUTPUT", "-d", cluster_ips, "-j", "REJECT"])
                .output()
                .expect(iptables);
            assert!(
                reject.status.success(),
                "{}",
                String::from_utf8_lossy(&reject.stderr)
            );
        }
        let token = format!("token-of-{service_account}");
        self.dir.write(
            &format!("token-{service_account}.yaml"),
            &token_secret(NS, service_account, &token),
        );
        let token_file = self.files.join(format!("{service_account}.token"));
        std::fs::write(&token_file, &token).expect("write token");
        readable(&token_file, 0o644);
        let mut p = MeshedPod {
            pod,
            service_account: service_account.to_string(),
            proxy: None,
            app: name.to_string(),
        };
        self.write_pod(&p, None);
        let args = self.proxy_args(&p, &token_file, extra);
        let admin = p.admin();
        let proxy = p
            .proxy
            .insert(p.pod.spawn_as(PROXY_UID, binary("strait-proxy"), &args));
        proxy.ready(admin, Duration::from_secs(20)).await;
        p
    }

    /// The pod's manifest, as the API server would have it, on `node`.
    fn write_pod(&self, p: &MeshedPod, node: Option<&str>) {
        let node = node
            .map(|n| format!("  nodeName: {n}\n"))
            .unwrap_or_default();
        let ip6 = p
            .pod
            .ip6
            .map(|ip6| format!(", {{ip: \"{ip6}\"}}"))
            .unwrap_or_default();
        self.dir.write(
            &format!("pod-{}.yaml", p.pod.name),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{app: {app}}}\n  annotations: {{strait.dev/inbound-port: \"4143\"}}\nspec:\n  serviceAccountName: {sa}\n{node}  containers: [{{name: app, image: app}}]\nstatus: {{phase: Running, podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}{ip6}]}}\n",
                name = p.pod.name,
                app = p.app,
                sa = p.service_account,
                ip = p.pod.ip,
            ),
        );
    }

    /// Schedules `p` on the node `node` of zone `zone` (the Node written too).
    pub fn place(&self, p: &MeshedPod, node: &str, zone: &str) {
        self.dir.write(
            &format!("node-{node}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  labels: {{topology.kubernetes.io/zone: {zone}}}\n"
            ),
        );
        self.write_pod(p, Some(node));
    }

    fn proxy_args(&self, p: &MeshedPod, token: &std::path::Path, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            // As injected.
            "--admin-addr=[::]:4191".to_string(),
            format!("--control-plane=https://{}", self.grpc),
            format!("--namespace={NS}"),
            format!("--pod-name={}", p.pod.name),
            format!("--service-account={}", p.service_account),
            format!("--token-file={}", token.display()),
            format!(
                "--trust-anchors={}",
                self.files.join("anchors.pem").display()
            ),
            format!("--app-ip={}", p.pod.ip),
        ];
        if !extra.iter().any(|a| a.starts_with("--log-level")) {
            args.push("--log-level=warn".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Restarts `p`'s proxy (the old one killed first).
    pub async fn restart_proxy(&self, p: &mut MeshedPod, extra: &[&str]) {
        // Gone, not just signalled: the new one binds the same ports.
        if let Some(mut old) = p.proxy.take() {
            let _ = old.child.kill().await;
        }
        let token = self.files.join(format!("{}.token", p.service_account));
        let args = self.proxy_args(p, &token, extra);
        let admin = p.admin();
        let proxy = p
            .proxy
            .insert(p.pod.spawn_as(PROXY_UID, binary("strait-proxy"), &args));
        proxy.ready(admin, Duration::from_secs(20)).await;
    }
}

impl PodMesh {
    /// Waits until `client`'s app gets 200 from `target` through the mesh
    /// (discovery, policy and certificates in place).
    pub async fn wait_reachable(&self, client: &MeshedPod, target: SocketAddr) {
        wait::until(
            &format!("{} reaching {target}", client.pod.name),
            Duration::from_secs(20),
            || {
                let answered = client.pod.run(move || async move {
                    crate::client::get(&crate::client::http1(), &format!("http://{target}/"))
                        .await
                        .is_ok_and(|(s, _)| s == 200)
                });
                answered.join()
            },
        )
        .await;
    }
}

impl Drop for PodMesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.files);
    }
}

impl MeshedPod {
    pub fn admin(&self) -> SocketAddr {
        SocketAddr::from((self.pod.ip, 4191))
    }

    /// `spiffe://cluster.local/ns/test/sa/<service account>`.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{NS}/sa/{}",
            self.service_account
        )
    }

    /// The sum of a metric's samples whose labels contain every one of `labels`
    /// (`peer="spiffe://…"`, …).
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let Ok((_, text)) = wait::admin_get(self.admin(), "/metrics").await else {
            return 0.0;
        };
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn readable(p: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
