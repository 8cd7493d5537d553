//! `strait-proxy init` in a network namespace makes it a meshed pod: the app's
//! connections leave through its proxy and connections to it arrive through it,
//! while the proxy's own traffic (by uid) and skipped ports go around.

use std::net::SocketAddr;
use std::time::Duration;

use strait_tests::netns::{self, Lan, Pod};
use strait_tests::process::{Proc, binary};
use strait_tests::wait;

const UID: u32 = 2102;
const APP_PORT: u16 = 8080;

/// A pod running the demo app on 0.0.0.0:8080 (calling `backend`, if any) and a
/// proxy as uid 2102 with its admin port open to the LAN.
struct MeshedPod {
    pod: Pod,
    _app: Proc,
    _proxy: Proc,
}

impl MeshedPod {
    async fn start(lan: &mut Lan, name: &str, backend: Option<SocketAddr>) -> MeshedPod {
        let pod = Self::spawn(lan, name, backend).await;
        // The app answers (through the proxy: port 8080 is redirected).
        let app_addr = pod.app();
        wait::until("the app", Duration::from_secs(10), || async move {
            matches!(wait::admin_get(app_addr, "/").await, Ok((200, _)))
        })
        .await;
        pod
    }

    /// As [`MeshedPod::start`], without waiting for its app to answer `/`.
    async fn spawn(lan: &mut Lan, name: &str, backend: Option<SocketAddr>) -> MeshedPod {
        Self::spawn_with(lan, name, backend, &[]).await
    }

    /// As [`MeshedPod::spawn`], with more flags for its proxy.
    async fn spawn_with(
        lan: &mut Lan,
        name: &str,
        backend: Option<SocketAddr>,
        proxy_args: &[&str],
    ) -> MeshedPod {
        let pod = lan.pod(name);
        pod.init(&["--skip-inbound-ports", "22"]);
        let mut app_args = vec![
            "demo-app".to_string(),
            format!("--listen=0.0.0.0:{APP_PORT}"),
            format!("--name={name}"),
        ];
        if let Some(b) = backend {
            app_args.push(format!("--backend=http://{b}"));
        }
        let app = pod.spawn_as(0, binary("strait"), &app_args);
        let mut args = vec!["--admin-addr=0.0.0.0:4191".to_string()];
        args.extend(proxy_args.iter().map(|a| a.to_string()));
        let mut proxy = pod.spawn_as(UID, binary("strait-proxy"), &args);
        proxy
            .ready(SocketAddr::from((pod.ip, 4191)), Duration::from_secs(10))
            .await;
        MeshedPod {
            pod,
            _app: app,
            _proxy: proxy,
        }
    }

    fn app(&self) -> SocketAddr {
        SocketAddr::from((self.pod.ip, APP_PORT))
    }

    /// The app's answer to `path`, once the app listens (before, the pod's
    /// proxy answers that its connection was refused).
    async fn answer(&self, path: &'static str) -> (u16, String) {
        let app = self.app();
        wait::until(
            "the app to listen",
            Duration::from_secs(10),
            || async move {
                matches!(wait::admin_get(app, path).await, Ok((_, b)) if !b.contains("refused"))
            },
        )
        .await;
        wait::admin_get(app, path).await.expect("request")
    }

    /// HTTP requests this pod's proxy received in one direction.
    async fn requests(&self, direction: &str) -> f64 {
        let admin = SocketAddr::from((self.pod.ip, 4191));
        let (_, text) = wait::admin_get(admin, "/metrics").await.expect("metrics");
        let label = format!("direction=\"{direction}\"");
        text.lines()
            .filter(|l| l.starts_with("strait_proxy_http_requests_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A LAN for pods, with the tools `init` needs (or a printed reason why not).
fn lan() -> Option<Lan> {
    let lan = Lan::new()?;
    if !netns::have("iptables-nft-restore") || !netns::have("nsenter") {
        strait_tests::host::missing("iptables (nft) and nsenter");
        return None;
    }
    Some(lan)
}

#[tokio::test]
async fn init_rules_send_a_pods_traffic_in_and_out_through_its_proxy() {
    let Some(mut lan) = lan() else { return };
    let server = MeshedPod::start(&mut lan, "server", None).await;
    let client = MeshedPod::start(&mut lan, "client", Some(server.app())).await;

    // From the host: into the client pod (inbound), out to the server pod
    // (the client's outbound), into the server pod (the server's inbound).
    let before = (
        client.requests("inbound").await,
        client.requests("outbound").await,
        server.requests("inbound").await,
    );
    let (status, body) = wait::admin_get(client.app(), "/").await.expect("request");
    assert_eq!((status, body.trim()), (200, "client,server"));
    let after = (
        client.requests("inbound").await,
        client.requests("outbound").await,
        server.requests("inbound").await,
    );
    assert_eq!(
        after.0 - before.0,
        1.0,
        "host -> client went through the client's proxy"
    );
    assert_eq!(
        after.1 - before.1,
        1.0,
        "client -> server left through the client's proxy"
    );
    assert_eq!(
        after.2 - before.2,
        1.0,
        "client -> server arrived through the server's proxy"
    );
    assert_eq!(
        server.requests("outbound").await,
        0.0,
        "the server app called no one"
    );

    // The proxies' own connections were not redirected back to them (uid
    // 2102), or the request would have looped and failed. A second init
    // leaves one set of rules.
    client.pod.init(&[]);
    let save = client
        .pod
        .command("iptables-nft-save")
        .args(["-t", "nat"])
        .output()
        .expect("iptables-nft-save");
    let rules = String::from_utf8_lossy(&save.stdout);
    assert_eq!(rules.matches("-j STRAIT_OUTBOUND").count(), 1, "{rules}");
    assert_eq!(rules.matches("-j STRAIT_INBOUND").count(), 1, "{rules}");
    let (status, _) = wait::admin_get(client.app(), "/").await.expect("request");
    assert_eq!(status, 200);
    assert_eq!(client.requests("outbound").await, after.1 + 1.0);
}

/// A meshed pod reaches another pod's proxy admin port (a meshed Prometheus
/// scraping `:4191`): that port is its own proxy's too, but not at that address.
#[tokio::test]
async fn a_meshed_pod_reaches_another_pods_admin_port() {
    let Some(mut lan) = lan() else { return };
    let server = MeshedPod::start(&mut lan, "server", None).await;
    let server_admin = SocketAddr::from((server.pod.ip, 4191));
    // Its app asks the server's admin server for the path it is asked.
    let scraper = MeshedPod::spawn(&mut lan, "scraper", Some(server_admin)).await;
    let (status, body) = scraper.answer("/ready").await;
    assert_eq!((status, body.trim()), (200, "scraper"));
    assert!(
        scraper.requests("outbound").await >= 1.0,
        "through its proxy"
    );
}

/// A pod whose network already has another mesh's interception rules (its
/// namespace enrolled in Istio's ambient mesh, which admission cannot see) is
/// refused by `init`, naming the chain, with none of strait's rules written;
/// also where the other mesh wrote them with the other iptables backend
/// (Istio takes legacy on nodes without nft rules), which the kernel runs too.
#[tokio::test]
async fn init_refuses_a_pod_another_mesh_already_intercepts() {
    let Some(mut lan) = lan() else { return };
    for backend in ["nft", "legacy"] {
        refused_over_another_mesh(&mut lan, backend);
    }
}

fn refused_over_another_mesh(lan: &mut Lan, backend: &str) {
    let pod = lan.pod(&format!("ambient-{backend}"));
    // What istio-cni writes for an ambient pod, in short.
    let istio = "*nat\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";
    let mut restore = pod
        .command(format!("iptables-{backend}-restore"))
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    restore
        .stdin
        .take()
        .unwrap()
        .write_all(istio.as_bytes())
        .unwrap();
    assert!(restore.wait().unwrap().success());

    let out = pod
        .command(binary("strait-proxy"))
        .arg("init")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "init went on over {backend}: {err}");
    assert!(
        err.contains("another mesh's interception rules (chain ISTIO_OUTPUT)"),
        "{backend}: {err}"
    );
    let save = pod
        .command("iptables-nft-save")
        .args(["-t", "nat"])
        .output()
        .unwrap();
    let save = String::from_utf8_lossy(&save.stdout);
    assert!(
        !save.contains("STRAIT_"),
        "strait's rules were written: {save}"
    );
}

/// In a pod the inbound side dials the app on the pod's address (as the
/// injector configures it): a port the app binds to loopback only is not
/// reachable from other pods through the mesh, one bound to every address is.
#[tokio::test]
async fn a_port_the_app_binds_to_loopback_only_stays_private_to_the_pod() {
    let Some(mut lan) = lan() else { return };
    let pod = lan.pod("server");
    pod.init(&[]);
    let app = |listen: &str, name: &str| {
        pod.spawn_as(
            0,
            binary("strait"),
            &[
                "demo-app".into(),
                format!("--listen={listen}"),
                format!("--name={name}"),
            ],
        )
    };
    let _private = app("127.0.0.1:8080", "private");
    let _public = app("0.0.0.0:8081", "public");
    let app_ip = format!("--app-ip={}", pod.ip);
    let mut proxy = pod.spawn_as(
        UID,
        binary("strait-proxy"),
        &["--admin-addr=0.0.0.0:4191".into(), app_ip],
    );
    proxy
        .ready(SocketAddr::from((pod.ip, 4191)), Duration::from_secs(10))
        .await;
    let public = SocketAddr::from((pod.ip, 8081));
    wait::until(
        "the public app through the proxy",
        Duration::from_secs(10),
        || async move { matches!(wait::admin_get(public, "/").await, Ok((200, _))) },
    )
    .await;
    let (status, body) = wait::admin_get(public, "/").await.unwrap();
    assert_eq!((status, body.trim()), (200, "public"));
    // The private app is up (it answers inside the pod), yet through the mesh
    // its port is refused.
    let inside = || {
        pod.command("bash")
            .args(["-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("private"))
    };
    wait::until(
        "the private app inside the pod",
        Duration::from_secs(10),
        || async { inside() },
    )
    .await;
    let (status, _) = wait::admin_get(SocketAddr::from((pod.ip, 8080)), "/")
        .await
        .unwrap();
    assert_eq!(
        status, 502,
        "a loopback-only port is not reachable through the mesh"
    );
}

/// An inbound listener on `[::]` (to take IPv6 connections too) still knows
/// where redirected IPv4 connections were going, which reach it with
/// IPv4-mapped addresses.
#[tokio::test]
async fn an_inbound_listener_on_every_family_serves_redirected_ipv4() {
    let Some(mut lan) = lan() else { return };
    let server =
        MeshedPod::spawn_with(&mut lan, "server", None, &["--inbound-addr=[::]:4143"]).await;
    let (status, body) = server.answer("/").await;
    assert_eq!((status, body.trim()), (200, "server"));
    assert!(server.requests("inbound").await >= 1.0, "through its proxy");
}

/// A client outside the mesh that connects to an app port and says nothing,
/// to an app that says nothing either, is closed after the HTTP idle timeout,
/// not held for an opaque stream's hour: anyone who reaches the pod could
/// otherwise keep its connections open at no cost.
#[tokio::test]
async fn a_silent_client_from_outside_the_mesh_is_closed_after_the_http_idle_timeout() {
    use tokio::io::AsyncReadExt;
    let Some(mut lan) = lan() else { return };
    let server = MeshedPod::spawn_with(&mut lan, "server", None, &["--http-idle-timeout=2s"]).await;
    server.answer("/").await;
    let mut silent = tokio::net::TcpStream::connect(server.app()).await.unwrap();
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent client is still held after 30 s: {closed:?}"
    );
}

/// A client outside the mesh whose connection to a pod port nothing listens on
/// is reset, as the app's own kernel would have refused it: a client that wrote
/// and half-closed (`echo data | nc -N pod 9999`) must not read a clean, empty
/// answer and take it for the server's. The same for one that waits to be
/// greeted.
#[tokio::test]
async fn a_client_from_outside_the_mesh_to_a_port_nothing_listens_on_is_reset() {
    use tokio::io::AsyncWriteExt;
    let Some(mut lan) = lan() else { return };
    let server = MeshedPod::start(&mut lan, "server", None).await;
    let closed_port = SocketAddr::from((server.pod.ip, 9999));

    let mut writer = tokio::net::TcpStream::connect(closed_port).await.unwrap();
    writer.write_all(&[0u8, 1, 2, 3, 255]).await.unwrap();
    writer.shutdown().await.unwrap();
    let within = Duration::from_secs(10);
    strait_tests::tcp::ends_in_a_reset(&mut writer, within, "a client that wrote").await;

    // Silent: the proxy tries the app once the detection wait is over.
    let mut waiting = tokio::net::TcpStream::connect(closed_port).await.unwrap();
    strait_tests::tcp::ends_in_a_reset(&mut waiting, within, "a client waiting to be greeted")
        .await;
}

/// A pod's address on its link (`fe80::…`), once usable (its duplicate
/// address detection over), and its interface's index there.
async fn link_local(pod: &Pod) -> (std::net::Ipv6Addr, u32) {
    let shown = || {
        let out = pod
            .command("ip")
            .args(["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait::until(
        "a usable link-local address",
        Duration::from_secs(10),
        || {
            let s = shown();
            async move { s.contains("inet6 fe80") && !s.contains("tentative") }
        },
    )
    .await;
    let s = shown();
    let index: u32 = s.split(':').next().unwrap().trim().parse().unwrap();
    let addr = s
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    (addr, index)
}

/// On a node that cannot load the IPv6 nat rules (no `ip6table_nat`), a pod
/// with only link-local IPv6 starts without them; a neighbour on its link
/// (a bridge CNI's) could then reach the app at that address around the
/// proxy. Its new connections are refused in the filter table instead.
#[tokio::test]
async fn a_pods_link_local_ipv6_is_closed_where_the_ipv6_nat_rules_cannot_load() {
    let Some(mut lan) = lan() else { return };
    let pod = lan.pod("v6-no-nat");
    let neighbour = lan.pod("v6-neighbour");
    // Link-local IPv6 only, as on an IPv4 cluster.
    if let Some(ip6) = pod.ip6 {
        let cidr = format!("{ip6}/64");
        let out = pod
            .command("ip")
            .args(["-6", "addr", "del", &cidr, "dev", "eth0"])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let (target, _) = link_local(&pod).await;
    let (_, index) = link_local(&neighbour).await;
    let _app = pod.run(|| async {
        let listener = tokio::net::TcpListener::bind("[::]:8080").await.unwrap();
        loop {
            let _ = listener.accept().await;
        }
    });
    let reach = || {
        neighbour
            .run(move || async move {
                let to = std::net::SocketAddrV6::new(target, 8080, 0, index);
                tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to))
                    .await
                    .is_ok_and(|c| c.is_ok())
            })
            .join()
    };
    wait::until(
        "the app reached over the link",
        Duration::from_secs(10),
        &reach,
    )
    .await;

    // ip6tables whose nat table cannot be loaded, as on such a node.
    let real = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v ip6tables-nft-restore"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("strait-no-nat6-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("ip6tables-nft-restore");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\ninput=$(cat)\ncase \"$input\" in *'*nat'*) echo \"can't initialize ip6tables table 'nat'\" >&2; exit 1;; esac\nprintf '%s\\n' \"$input\" | exec {} \"$@\"\n",
            real.trim()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap());
    let out = pod
        .command(binary("strait-proxy"))
        .arg("init")
        .env("PATH", &path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !reach().await,
        "the neighbour still reaches the app around the proxy"
    );
    assert!(err.contains("IPv6 connections to it are refused"), "{err}");
}

/// The proxy image's iptables stage gathers the commands `init` runs and the
/// libraries and extensions they load, on Debian as that stage's base is, by
/// what its packages say rather than a tool a slim image lacks: run here (CI's
/// host is Debian with iptables) into a temporary tree in place of `/out`, with
/// only the commands of Debian's essential packages, as a slim image has.
#[test]
fn the_image_s_iptables_stage_gathers_what_init_runs() {
    let dockerfile = include_str!("../../../deploy/docker/strait-proxy.Dockerfile");
    let run = dockerfile
        .split("AS iptables\nRUN ")
        .nth(1)
        .and_then(|s| s.split("\n\n").next())
        .expect("the iptables stage's RUN")
        .replace("\\\n", " ");
    let (_, gather) = run
        .split_once("--no-install-recommends iptables")
        .expect("the stage installs iptables");
    let gather = gather
        .trim_start()
        .strip_prefix("&&")
        .expect("then gathers");
    let debian = std::process::Command::new("dpkg")
        .args(["-L", "libxtables12"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !debian || !std::path::Path::new("/usr/sbin/xtables-legacy-multi").exists() {
        strait_tests::host::missing("Debian's iptables package (nft and legacy)");
        return;
    }
    let out = std::env::temp_dir().join(format!("strait-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let script = gather.replace("/out", &out.display().to_string());
    let ran = std::process::Command::new("/bin/sh")
        .args(["-ec", &script])
        .env("PATH", essential_commands(&out))
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    for cmd in [
        "xtables-nft-multi",
        "xtables-legacy-multi",
        "ip6tables-nft-restore",
    ] {
        assert!(out.join("usr/sbin").join(cmd).exists(), "{cmd}");
    }
    let libs: Vec<_> = std::fs::read_dir(out.join("usr/lib"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        libs.len() == 1 && libs[0].display().to_string().ends_with("-linux-gnu"),
        "{libs:?}"
    );
    for ext in ["libxt_owner.so", "libxt_REDIRECT.so"] {
        assert!(libs[0].join("xtables").join(ext).exists(), "{ext}");
    }
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_dir_all(out.with_extension("bin")).unwrap();
}

/// A directory (beside `out`) of links to the commands of this host's
/// essential packages, for a `PATH` with no others.
fn essential_commands(out: &std::path::Path) -> std::path::PathBuf {
    let bin = out.with_extension("bin");
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).unwrap();
    let query = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Essential}\\n"])
        .output()
        .unwrap();
    let essential = String::from_utf8(query.stdout).unwrap();
    for pkg in essential.lines().filter_map(|l| l.strip_suffix(" yes")) {
        let files = std::process::Command::new("dpkg")
            .args(["-L", pkg])
            .output()
            .unwrap();
        for f in String::from_utf8_lossy(&files.stdout).lines() {
            let path = std::path::Path::new(f);
            let dir = path.parent().and_then(|d| d.to_str()).unwrap_or("");
            if dir.ends_with("/bin") || dir.ends_with("/sbin") {
                let _ = std::os::unix::fs::symlink(path, bin.join(path.file_name().unwrap()));
            }
        }
    }
    bin
}
