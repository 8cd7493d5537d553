//! `strait demo`: a whole mesh on this machine. A controller reads
//! `deploy/examples/demo/`; each demo pod is an app process with its own
//! `strait-proxy` sidecar, on its own loopback address (127.0.1.x) so every proxy
//! keeps its real ports; a load client sends traffic through its sidecar and a live
//! table shows what the mesh did. The manifests' traffic policy shows at work: a
//! canary whose weight the demo shifts mid-run, retries that hide a flaky
//! endpoint, a timeout that cuts a slow path and a breaker that ejects a failing
//! endpoint.

pub mod app;
mod canary;
mod proxy_metrics;
mod table;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use canary::{Restored, RoutesFile};
use table::{Canary, Stats};

const CONTROLLER_GRPC: &str = "127.0.0.1:18090";
const CONTROLLER_ADMIN: &str = "127.0.0.1:19990";
/// The demo's apps' port on their loopback addresses (as services.yaml and
/// endpoints.yaml say): not 8080, which a developer's own server on all
/// addresses is likely to hold.
const APP_PORT: &str = "18080";
const NAMESPACE: &str = "demo";
/// web-0's proxy admin: its metrics count the retries, timeouts and ejections of
/// web's calls to api.
const WEB_PROXY_METRICS: &str = "http://127.0.1.1:4191/metrics";
/// How long the demo's trust anchor and issuer are valid: a demo left running
/// (no `--duration`) must not see every certificate expire under it, and they
/// go with the demo's directory when it ends.
const PKI_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// When the canary shifts without `--duration` (with it: at half of it).
const SHIFT_AFTER: Duration = Duration::from_secs(20);
/// One load request in this many goes to the slow path.
const SLOW_EVERY: u64 = 20;

/// A demo pod: its name, address, whether it runs the app and with which extra
/// flags, the app's backend (if it calls one) and the sidecar's `--upstream` for
/// it. Mirrors `deploy/examples/demo/`.
struct DemoPod {
    name: &'static str,
    /// Its `app` label: the service name its spans carry, as in a cluster.
    app_label: &'static str,
    service_account: &'static str,
    ip: &'static str,
    app: bool,
    app_args: &'static [&'static str],
    upstream: Option<(&'static str, &'static str)>,
}

const PODS: &[DemoPod] = &[
    DemoPod {
        name: "web-0",
        app_label: "web",
        service_account: "web",
        ip: "127.0.1.1",
        app: true,
        app_args: &[],
        upstream: Some(("15081", "api.demo.svc.cluster.local:80")),
    },
    DemoPod {
        name: "api-0",
        app_label: "api",
        service_account: "api",
        ip: "127.0.1.2",
        app: true,
        app_args: &[],
        upstream: None,
    },
    DemoPod {
        name: "api-1",
        app_label: "api",
        service_account: "api",
        ip: "127.0.1.3",
        app: true,
        app_args: &[],
        upstream: None,
    },
    // Flaky: 503 to 30 % of requests, which the route's retries hide.
    DemoPod {
        name: "api-2",
        app_label: "api",
        service_account: "api",
        ip: "127.0.1.4",
        app: true,
        app_args: &["--fail-percent=30"],
        upstream: None,
    },
    // Broken: 500 to every request, ejected by the breaker.
    DemoPod {
        name: "api-3",
        app_label: "api",
        service_account: "api",
        ip: "127.0.1.5",
        app: true,
        app_args: &["--fail-percent=100", "--fail-status=500"],
        upstream: None,
    },
    // The canary, behind Service api-v2.
    DemoPod {
        name: "api-v2-0",
        app_label: "api-v2",
        service_account: "api",
        ip: "127.0.1.6",
        app: true,
        app_args: &[],
        upstream: None,
    },
    DemoPod {
        name: "load-0",
        app_label: "load",
        service_account: "load",
        ip: "127.0.1.10",
        app: false,
        app_args: &[],
        upstream: Some(("15080", "web.demo.svc.cluster.local:80")),
    },
];

#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop by itself after this long and print a summary (e.g. 20s); default: until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// The demo's manifests.
    #[arg(long, default_value = "deploy/examples/demo")]
    pub manifests: PathBuf,
    /// OpenTelemetry collector (plaintext OTLP/gRPC, e.g. http://localhost:4317):
    /// every demo proxy and the controller send their spans there, the load
    /// client starts a trace per request, and the table shows the trace id of a
    /// recent slow one.
    #[arg(long, value_name = "URL", value_parser = crate::inject::otlp_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// Requests per second the load client sends (1 to 10000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rate: u32,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// How the demo's controller and proxies log, to the terminal above the
/// table: `strait`'s global `--log-level` and `--log-format`, warnings only
/// when no level is given.
#[derive(Clone, Debug, Default)]
pub struct ChildLog {
    pub level: Option<String>,
    pub json: bool,
}

impl ChildLog {
    /// `bin` run with `args`, logging as asked whatever the environment
    /// says (a `STRAIT_LOG_LEVEL` in it would otherwise win).
    fn command(&self, bin: &Path, args: &[String]) -> Command {
        let level = self.level.as_deref().unwrap_or("warn");
        let format = if self.json { "json" } else { "text" };
        let mut c = Command::new(bin);
        c.args(args)
            .env("STRAIT_LOG_LEVEL", level)
            .env("STRAIT_PROXY_LOG_LEVEL", level)
            .env("STRAIT_LOG_FORMAT", format)
            .env("STRAIT_PROXY_LOG_FORMAT", format)
            .env_remove("STRAIT_LOG_JSON");
        c
    }
}

fn forget(pids: &Mutex<Vec<u32>>, pid: Option<u32>) {
    if let (Some(pid), Ok(mut pids)) = (pid, pids.lock()) {
        pids.retain(|p| *p != pid);
    }
}

/// Writes to stdout; false once nobody reads it (`strait demo | head`),
/// which ends the demo through its cleanup rather than a panic.
fn say(text: std::fmt::Arguments) -> bool {
    crate::output::write(text).is_ok()
}

/// Turns true once the demo is asked to stop (a signal).
type Stop = tokio::sync::watch::Receiver<bool>;

struct Procs {
    running: Vec<(String, Child)>,
    log: ChildLog,
    /// The children's process ids, for a second signal to kill them without
    /// waiting for the cleanup.
    pids: Arc<Mutex<Vec<u32>>>,
    logs: Arc<Logs>,
}

/// The demo's processes' log lines, each to stderr as it comes, named by its
/// process. On a terminal, where each table clears the screen, the latest
/// are also shown under the table: a manifest edited while the demo runs and
/// refused must not be said for a moment and wiped.
#[derive(Debug, Default)]
struct Logs {
    tty: bool,
    latest: Mutex<std::collections::VecDeque<String>>,
}

impl Logs {
    /// Lines kept under the table.
    const LATEST: usize = 6;

    fn line(&self, who: &str, line: &str) {
        use std::io::Write;
        let line = format!("[{who}] {line}");
        let _ = writeln!(std::io::stderr(), "{line}");
        if self.tty
            && let Ok(mut latest) = self.latest.lock()
        {
            if latest.len() == Self::LATEST {
                latest.pop_front();
            }
            latest.push_back(line);
        }
    }

    /// What goes under the table: the latest lines, if any.
    fn under_table(&self) -> String {
        let latest = self.latest.lock().map(|l| l.clone()).unwrap_or_default();
        if latest.is_empty() {
            return String::new();
        }
        let lines: Vec<String> = latest.into_iter().collect();
        format!("latest log lines:\n{}\n", lines.join("\n"))
    }
}

impl Procs {
    fn spawn(&mut self, what: &str, bin: &Path, args: &[String]) -> anyhow::Result<()> {
        let mut child = self
            .log
            .command(bin, args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // A group of its own: Ctrl-C at the terminal signals the whole
            // foreground group, and would stop every child at once, the
            // controller under its proxies and web-0's proxy before the
            // summary reads its counters. The demo alone is signalled, and
            // stops them in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {what} ({})", bin.display()))?;
        if let (Some(pid), Ok(mut pids)) = (child.id(), self.pids.lock()) {
            pids.push(pid);
        }
        if let Some(stderr) = child.stderr.take() {
            use tokio::io::{AsyncBufReadExt, AsyncReadExt};
            let (logs, who) = (self.logs.clone(), what.to_string());
            // Read to the end whatever comes (a line cut at 16 KiB, bytes
            // not UTF-8 replaced): a pipe left unread would block the child.
            tokio::spawn(async move {
                let mut r = tokio::io::BufReader::new(stderr);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match (&mut r).take(16 << 10).read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => logs.line(&who, &String::from_utf8_lossy(line.trim_ascii_end())),
                    }
                }
            });
        }
        self.running.push((what.to_string(), child));
        Ok(())
    }

    /// Fails if any process has exited.
    fn check(&mut self) -> anyhow::Result<()> {
        for (what, c) in &mut self.running {
            // Forgotten while it may be reaped (its pid may be reused then),
            // and remembered again if it runs on.
            let pid = c.id();
            forget(&self.pids, pid);
            let status = c.try_wait()?;
            if let (None, Some(pid), Ok(mut pids)) = (&status, pid, self.pids.lock()) {
                pids.push(pid);
            }
            if let Some(status) = status {
                anyhow::bail!("{what} exited ({status}); see its log lines above");
            }
        }
        Ok(())
    }

    /// Last started first, each gone before the next: the proxies stop
    /// before the controller they stream from, so none warns that its
    /// streams were cut.
    async fn stop(&mut self) {
        for (_, c) in self.running.iter_mut().rev() {
            forget(&self.pids, c.id());
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

async fn ready(admin: &str, procs: &mut Procs, stop: &Stop) -> anyhow::Result<()> {
    let addr: SocketAddr = admin.parse()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        anyhow::ensure!(!*stop.borrow(), "stopped before the mesh was ready");
        procs.check()?;
        if let Ok(r) = client.get(format!("http://{addr}/ready").parse()?).await
            && r.status().is_success()
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{admin}/ready did not answer 200 within 20s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(args: DemoArgs, log: ChildLog) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let dir = me.parent().context("locating the strait binary")?;
    let proxy = dir.join("strait-proxy");
    anyhow::ensure!(
        proxy.exists(),
        "strait-proxy not found next to {}; build the whole workspace (cargo build --release)",
        me.display()
    );
    anyhow::ensure!(
        args.manifests.is_dir(),
        "--manifests {}: not a directory (run from the repository root, or pass --manifests)",
        args.manifests.display()
    );
    free(&listen_addrs())?;
    // Listening before anything starts, so that Ctrl-C, SIGTERM or a closed
    // terminal (SIGHUP) at any point ends the demo through its cleanup: the
    // processes stopped, routes.yaml restored, the keys' directory removed.
    // The default action of each would kill the demo and leave them all.
    use tokio::signal::unix::{SignalKind, signal};
    let (stopped, stop) = tokio::sync::watch::channel(false);
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let work = Workdir::new()?;
    let mut routes = RoutesFile::new(&args.manifests);
    if routes.left_shifted() {
        eprintln!(
            "warning: {} holds the demo's shifted split (api {} / api-v2 {}), as a demo that was killed leaves it; the demo will not shift it (`git checkout {}` puts it back)",
            routes.path().display(),
            100 - canary::WEIGHT_AFTER,
            canary::WEIGHT_AFTER,
            routes.path().display()
        );
    }
    let pids: Arc<Mutex<Vec<u32>>> = Arc::default();
    let children = pids.clone();
    let (mut undo, work_path) = (routes.clone(), work.path.clone());
    tokio::spawn(async move {
        for _ in 0..2 {
            let signal = tokio::select! {
                _ = int.recv() => rustix::process::Signal::INT,
                _ = term.recv() => rustix::process::Signal::TERM,
                _ = hup.recv() => rustix::process::Signal::HUP,
            };
            if stopped.send_replace(true) {
                // Asked twice: the cleanup is not waited for, but what it
                // would undo is not left behind: the processes, the shifted
                // routes.yaml, the directory with the issuer's key (exit runs
                // no destructors).
                let pids: Vec<_> = children
                    .lock()
                    .map(|p| p.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|pid| rustix::process::Pid::from_raw(pid as i32))
                    .collect();
                for &pid in &pids {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
                // Gone before the demo is, their addresses with them: a demo
                // started next finds them free.
                for pid in pids {
                    let _ =
                        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
                }
                let _ = undo.restore();
                let _ = std::fs::remove_dir_all(&work_path);
                std::process::exit(128 + signal.as_raw());
            }
        }
    });
    let mut procs = Procs {
        running: Vec::new(),
        log,
        pids: pids.clone(),
        logs: Arc::new(Logs {
            tty: std::io::stdout().is_terminal(),
            ..Logs::default()
        }),
    };
    let result = run_mesh(&args, &work, &me, &proxy, &mut procs, &mut routes, stop).await;
    let restored = routes.restore();
    procs.stop().await;
    let shipped = canary::WEIGHT_BEFORE;
    match restored {
        Ok(Restored::Nothing) => {}
        Ok(Restored::Original) => {
            say(format_args!(
                "restored {} (api {} / api-v2 {shipped})\n",
                routes.path().display(),
                100 - shipped
            ));
        }
        Ok(Restored::LeftEdited) => {
            say(format_args!(
                "left {} as it is: it changed after the demo's shift (it had api {} / api-v2 {shipped})\n",
                routes.path().display(),
                100 - shipped
            ));
        }
        Err(e) => {
            let e = e.context(format!("restoring {}", routes.path().display()));
            if result.is_ok() {
                return Err(e);
            }
            eprintln!("{e:#}");
        }
    }
    result
}

/// Every address the demo's processes listen on: the controller's, and each
/// pod's app, sidecar and `--upstream` ports.
fn listen_addrs() -> Vec<String> {
    let mut addrs = vec![CONTROLLER_GRPC.to_string(), CONTROLLER_ADMIN.to_string()];
    for pod in PODS {
        let ports = [Some("4143"), Some("4140"), Some("4191")];
        let app = pod.app.then_some(APP_PORT);
        let upstream = pod.upstream.map(|(port, _)| port);
        for port in ports.into_iter().chain([app, upstream]).flatten() {
            addrs.push(format!("{}:{port}", pod.ip));
        }
    }
    addrs
}

/// Fails, naming the first address something else listens on: found here,
/// before anything starts, rather than as one child's exit among many (or,
/// for a demo still running, its processes answering the new one's readiness
/// checks). A listener on the wildcard address takes the port of every
/// loopback address too.
fn free(addrs: &[String]) -> anyhow::Result<()> {
    for a in addrs {
        let addr: SocketAddr = a.parse()?;
        std::net::TcpListener::bind(addr).with_context(|| {
            format!(
                "the demo listens on {a}, which is taken (another demo still running? a server on all addresses, 0.0.0.0, at that port takes it too; `ss -ltnp` names what holds it)"
            )
        })?;
    }
    Ok(())
}

/// What `strait install` would create in a cluster: a fresh trust anchor and
/// issuer, and a service-account token per workload (as Secrets in a second
/// manifests directory for the controller, as files for the proxies). Removed when
/// the demo ends; the demo's own manifests are read where they are, so editing
/// them changes the running mesh.
struct Workdir {
    path: PathBuf,
}

impl Workdir {
    fn new() -> anyhow::Result<Self> {
        // A name no other user can guess and a directory only its owner can
        // enter, made here and not found: a directory someone made first in
        // the shared temp directory would hand them the issuer's key, or the
        // controller tokens of their choosing.
        use std::os::unix::fs::DirBuilderExt as _;
        let mut b = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
        let suffix: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let path = std::env::temp_dir().join(format!("strait-demo-{suffix}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let w = Workdir { path };
        let m = w.manifests();
        std::fs::create_dir(&m).with_context(|| format!("creating {}", m.display()))?;
        let pki = crate::identity::ca::generate("cluster.local", PKI_VALIDITY)?;
        std::fs::write(w.path.join("anchors.pem"), &pki.anchor_pem)?;
        std::fs::write(w.path.join("issuer.crt"), &pki.issuer_cert_pem)?;
        write_private(&w.path.join("issuer.key"), &pki.issuer_key_pem)?;
        let mut secrets = String::new();
        let mut accounts: Vec<&str> = PODS.iter().map(|p| p.service_account).collect();
        accounts.sort_unstable();
        accounts.dedup();
        for sa in accounts {
            let mut b = [0u8; 24];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
            let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
            write_private(&w.token_file(sa), &token)?;
            secrets.push_str(&format!(
                "---\napiVersion: v1\nkind: Secret\ntype: kubernetes.io/service-account-token\nmetadata:\n  name: {sa}-token\n  namespace: {NAMESPACE}\n  annotations: {{kubernetes.io/service-account.name: {sa}}}\nstringData: {{token: \"{token}\"}}\n"
            ));
        }
        write_private(&m.join("tokens.yaml"), &secrets)?;
        Ok(w)
    }

    fn manifests(&self) -> PathBuf {
        self.path.join("manifests")
    }

    fn token_file(&self, sa: &str) -> PathBuf {
        self.path.join(format!("{sa}.token"))
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

async fn run_mesh(
    args: &DemoArgs,
    work: &Workdir,
    me: &Path,
    proxy: &Path,
    procs: &mut Procs,
    routes: &mut RoutesFile,
    mut stop: Stop,
) -> anyhow::Result<()> {
    let _ = say(format_args!(
        "starting the controller on {CONTROLLER_GRPC} with {}\n",
        args.manifests.display()
    ));
    procs.spawn(
        "controller",
        me,
        &[
            "controller".into(),
            format!("--manifests={}", args.manifests.display()),
            format!("--manifests={}", work.manifests().display()),
            format!("--grpc-addr={CONTROLLER_GRPC}"),
            format!("--admin-addr={CONTROLLER_ADMIN}"),
            format!("--issuer-cert={}", work.path.join("issuer.crt").display()),
            format!("--issuer-key={}", work.path.join("issuer.key").display()),
        ]
        .into_iter()
        .chain(
            args.otlp_endpoint
                .iter()
                .map(|e| format!("--otlp-endpoint={e}")),
        )
        .collect::<Vec<_>>(),
    )?;
    ready(CONTROLLER_ADMIN, procs, &stop).await?;

    for pod in PODS {
        if pod.app {
            let mut a = vec![
                "demo-app".to_string(),
                format!("--listen={}:{APP_PORT}", pod.ip),
                format!("--name={}", pod.name),
            ];
            a.extend(pod.app_args.iter().map(|s| s.to_string()));
            if let Some((port, _)) = pod.upstream {
                a.push(format!("--backend=http://{}:{port}", pod.ip));
            }
            procs.spawn(&format!("{} app", pod.name), me, &a)?;
        }
        let mut a = vec![
            format!("--inbound-addr={}:4143", pod.ip),
            format!("--outbound-addr={}:4140", pod.ip),
            format!("--admin-addr={}:4191", pod.ip),
            format!("--control-plane=https://{CONTROLLER_GRPC}"),
            format!("--namespace={NAMESPACE}"),
            format!("--pod-name={}", pod.name),
            format!("--app-ip={}", pod.ip),
            format!("--service-account={}", pod.service_account),
            format!(
                "--trust-anchors={}",
                work.path.join("anchors.pem").display()
            ),
            format!(
                "--token-file={}",
                work.token_file(pod.service_account).display()
            ),
        ];
        if let Some(e) = &args.otlp_endpoint {
            a.push(format!("--otlp-endpoint={e}"));
            a.push(format!("--service-name={}", pod.app_label));
        }
        if let Some((port, dest)) = pod.upstream {
            a.push(format!("--upstream={}:{port}={dest}", pod.ip));
        }
        procs.spawn(&format!("{} proxy", pod.name), proxy, &a)?;
    }
    for pod in PODS {
        ready(&format!("{}:4191", pod.ip), procs, &stop).await?;
    }
    let _ = say(format_args!(
        "mesh ready: {} pods, each with a strait-proxy sidecar holding a certificate for its service account; proxies talk mTLS\n",
        PODS.len()
    ));

    let metrics_client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let metrics_url: http::Uri = WEB_PROXY_METRICS.parse()?;
    let shift_at = args.duration.map_or(SHIFT_AFTER, |d| d / 2);
    let mut canary = if routes.can_shift() {
        Canary::Planned {
            from: canary::WEIGHT_BEFORE,
            to: canary::WEIGHT_AFTER,
            at: shift_at,
        }
    } else {
        Canary::AsConfigured
    };

    let stats = Arc::new(Mutex::new(Stats::default()));
    let traced = args.otlp_endpoint.is_some();
    let load = tokio::spawn(drive(args.rate, stats.clone(), traced));
    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    // What the shift did, under every table from then on: on a terminal each
    // table clears the screen, and a shift that failed must not be seen for a
    // second and then read as weights left as configured.
    let mut shifted: Option<String> = None;
    let outcome = loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = procs.check() {
                    break Err(e);
                }
                if let Canary::Planned { from, to, at } = canary
                    && start.elapsed() >= at
                {
                    let (next, line) = shift(routes, from, to, start.elapsed());
                    canary = next;
                    shifted = Some(line);
                }
                let (s, slowest) = stats
                    .lock()
                    .map(|mut s| (s.take_window(), s.slowest.take()))
                    .unwrap_or_default();
                let counters = proxy_metrics::fetch(&metrics_client, &metrics_url).await;
                let mut text = table::live(&s, counters, canary, start.elapsed(), args.rate, tty);
                if let Some((micros, trace)) = slowest.filter(|_| traced) {
                    text += &format!(
                        "slowest request of the last second: {:.1} ms, trace {trace} (look it up in your tracing backend)\n",
                        micros as f64 / 1000.0
                    );
                }
                if let Some(line) = &shifted {
                    text += &format!("{line}\n");
                }
                text += &procs.logs.under_table();
                // Nobody reads any more (`strait demo | head`): the demo ends
                // through its cleanup.
                if !say(format_args!("{text}")) {
                    break Ok(());
                }
                if args.duration.is_some_and(|d| start.elapsed() >= d) {
                    break Ok(());
                }
            }
            // A signal ends the demo through the summary.
            _ = stop.changed() => break Ok(()),
        }
    };
    load.abort();
    // Taken together, so the rates are of the requests counted.
    let elapsed = start.elapsed();
    let total = stats.lock().map(|mut s| s.take_total()).unwrap_or_default();
    let counters = proxy_metrics::fetch(&metrics_client, &metrics_url).await;
    let mut text = table::summary(&total, counters, canary, elapsed);
    if let Some(line) = shifted {
        text += &format!("{line}\n");
    }
    let _ = say(format_args!("{text}"));
    outcome?;
    anyhow::ensure!(
        total.ok_requests() > 0,
        "no request succeeded through the mesh"
    );
    Ok(())
}

/// Shifts the canary's weight in routes.yaml: the canary state from now on, and
/// the line that says what happened.
fn shift(routes: &mut RoutesFile, from: u32, to: u32, at: Duration) -> (Canary, String) {
    let file = routes.path().display().to_string();
    match routes.shift() {
        Ok(true) => (
            Canary::Shifted { from, to, at },
            format!(
                "canary shift: rewrote {file} with api {} / api-v2 {to} (was {} / {from}); the controller sends it to the proxies, and the demo puts the file back when it ends",
                100 - to,
                100 - from
            ),
        ),
        Ok(false) => (
            Canary::AsConfigured,
            format!(
                "canary shift: {file} no longer holds api {} / api-v2 {from}; left as it is",
                100 - from
            ),
        ),
        Err(e) => (
            Canary::AsConfigured,
            format!("canary shift: could not rewrite {file}: {e:#}"),
        ),
    }
}

/// Sends `rate` requests per second through the load pod's sidecar, one in
/// `SLOW_EVERY` to the slow path.
async fn drive(rate: u32, stats: Arc<Mutex<Stats>>, traced: bool) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let (Ok(fast), Ok(slow)) = (
        "http://127.0.1.10:15080/".parse::<http::Uri>(),
        format!("http://127.0.1.10:15080{}", app::SLOW_PATH).parse::<http::Uri>(),
    ) else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    for n in 1u64.. {
        tick.tick().await;
        let url = if n % SLOW_EVERY == 0 { &slow } else { &fast };
        let (client, url, stats) = (client.clone(), url.clone(), stats.clone());
        // As a traced app would: a new trace per request, sampled.
        let trace = traced.then(|| {
            use rand::RngCore;
            let mut ids = [0u8; 24];
            rand::rng().fill_bytes(&mut ids);
            let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
            (hex(&ids[..16]), hex(&ids[16..]))
        });
        tokio::spawn(async move {
            let start = Instant::now();
            let mut req = http::Request::new(Empty::new());
            *req.uri_mut() = url;
            if let Some((trace, span)) = &trace
                && let Ok(v) = http::HeaderValue::try_from(format!("00-{trace}-{span}-01"))
            {
                req.headers_mut().insert("traceparent", v);
            }
            let r = client.request(req).await;
            let (ok, chain, callers, backend_us) = match r {
                Ok(rsp) => {
                    let ok = rsp.status().is_success();
                    let h = rsp.headers();
                    let chain = h
                        .get(app::CHAIN_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let callers = h
                        .get(app::CALLERS_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let us = h
                        .get(app::BACKEND_MICROS_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    let _ = rsp.into_body().collect().await;
                    (ok, chain, callers, us)
                }
                Err(_) => (false, String::new(), String::new(), None),
            };
            let micros = start.elapsed().as_micros() as u64;
            if let Ok(mut s) = stats.lock() {
                s.record(ok, micros, &chain, &callers, backend_us);
                if let Some((trace, _)) = trace
                    && s.slowest.as_ref().is_none_or(|(us, _)| micros > *us)
                {
                    s.slowest = Some((micros, trace));
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a terminal the latest lines, named by their process, are kept to
    /// be shown under each table, which clears the screen; elsewhere none
    /// are (each went to stderr as it came, and stays).
    #[test]
    fn the_latest_log_lines_go_under_the_table_on_a_terminal() {
        let logs = Logs {
            tty: true,
            ..Logs::default()
        };
        assert_eq!(logs.under_table(), "");
        for i in 0..10 {
            logs.line("controller", &format!("line {i}"));
        }
        let under = logs.under_table();
        assert!(
            under.starts_with("latest log lines:\n[controller] line 4\n"),
            "{under}"
        );
        assert!(under.ends_with("[controller] line 9\n"), "{under}");
        assert_eq!(under.lines().count(), 1 + Logs::LATEST);
        let piped = Logs::default();
        piped.line("controller", "line");
        assert_eq!(piped.under_table(), "");
    }

    fn envs(c: &Command) -> Vec<(String, Option<String>)> {
        c.as_std()
            .get_envs()
            .map(|(k, v)| {
                let s = |o: &std::ffi::OsStr| o.to_string_lossy().into_owned();
                (s(k), v.map(s))
            })
            .collect()
    }

    /// The demo's pods are the manifests' pods: names, addresses, service
    /// accounts and `app` labels (the canary's spans are named `api-v2`).
    #[test]
    fn the_demo_pods_mirror_the_manifests() {
        let text = include_str!("../../../deploy/examples/demo/pods.yaml");
        let list: serde_norway::Value = serde_norway::from_str(text).expect("pods.yaml");
        let items = list["items"].as_sequence().expect("items");
        assert_eq!(items.len(), PODS.len());
        for (item, pod) in items.iter().zip(PODS) {
            let s = |v: &serde_norway::Value| v.as_str().unwrap_or_default().to_string();
            assert_eq!(s(&item["metadata"]["name"]), pod.name);
            assert_eq!(
                s(&item["metadata"]["labels"]["app"]),
                pod.app_label,
                "{}",
                pod.name
            );
            assert_eq!(s(&item["spec"]["serviceAccountName"]), pod.service_account);
            assert_eq!(s(&item["status"]["podIP"]), pod.ip);
        }
    }

    /// An address in use is named before anything starts.
    #[test]
    fn an_address_in_use_is_named_up_front() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let addr = taken.local_addr().expect("its address").to_string();
        let free_one = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
            l.local_addr().expect("its address").to_string()
        };
        free(std::slice::from_ref(&free_one)).expect("a free address");
        let e = free(&[free_one, addr.clone()]).expect_err("taken");
        assert!(format!("{e:#}").contains(&addr), "{e:#}");
        assert_eq!(listen_addrs().len(), 2 + 7 * 3 + 6 + 2);
    }

    /// A demo left running for days keeps an issuer that can sign.
    #[test]
    fn the_demos_issuer_outlives_a_long_run() {
        let w = Workdir::new().expect("a work directory");
        let read = |f: &str| std::fs::read_to_string(w.path.join(f)).expect(f);
        let ca = crate::identity::ca::Ca::from_pem(
            &read("issuer.crt"),
            &read("issuer.key"),
            Duration::from_secs(60),
        )
        .expect("the demo's issuer");
        let week = std::time::SystemTime::now() + Duration::from_secs(7 * 24 * 3600);
        assert!(ca.issuer_not_after() > week);
    }

    /// `strait --log-level debug --log-format json demo` reaches every
    /// process; without them they log warnings only, as text.
    #[test]
    fn the_log_flags_reach_the_demos_processes() {
        let bin = Path::new("strait-proxy");
        let quiet = envs(&ChildLog::default().command(bin, &[]));
        let set = |k: &str, v: &str| (k.to_string(), Some(v.to_string()));
        assert!(
            quiet.contains(&set("STRAIT_PROXY_LOG_LEVEL", "warn")),
            "{quiet:?}"
        );
        assert!(
            quiet.contains(&set("STRAIT_LOG_FORMAT", "text")),
            "{quiet:?}"
        );
        let asked = ChildLog {
            level: Some("debug".into()),
            json: true,
        };
        let loud = envs(&asked.command(bin, &[]));
        for want in [
            set("STRAIT_LOG_LEVEL", "debug"),
            set("STRAIT_PROXY_LOG_LEVEL", "debug"),
            set("STRAIT_LOG_FORMAT", "json"),
            set("STRAIT_PROXY_LOG_FORMAT", "json"),
        ] {
            assert!(loud.contains(&want), "{want:?} not in {loud:?}");
        }
    }
}
