//! The reference proxy pairs: HAProxy and nginx, each as a client-side and a
//! server-side proxy with TLS 1.3 and client certificates between them, one
//! thread/process each, keep-alive on every hop. Certificates come from openssl.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;
use tokio::process::{Child, Command};

pub struct Certs {
    pub dir: PathBuf,
}

async fn sh(cmd: &str, dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Certs {
    /// A CA, a server certificate for `b.test` (and 127.0.0.1) and a client certificate.
    pub async fn generate(dir: &Path) -> anyhow::Result<Certs> {
        std::fs::create_dir_all(dir)?;
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        sh(
            &format!(
                "openssl req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca"
            ),
            dir,
        )
        .await?;
        for (name, ext) in [
            (
                "server",
                "subjectAltName=DNS:b.test,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
            ),
            (
                "client",
                "subjectAltName=URI:spiffe://bench/ns/a/sa/a\nextendedKeyUsage=clientAuth",
            ),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext)?;
            sh(
                &format!("openssl req {ec} -keyout {name}.key -out {name}.csr -subj /CN={name}"),
                dir,
            )
            .await?;
            sh(
                &format!("openssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.crt -days 2 -extfile {name}.ext"),
                dir,
            )
            .await?;
            sh(&format!("cat {name}.crt {name}.key > {name}.pem"), dir).await?;
        }
        Ok(Certs {
            dir: dir.to_path_buf(),
        })
    }

    fn p(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }
}

/// Raises this process's open-file limit as far as it may (to 262,144, the hard
/// limit too when root): the reference proxies inherit it, and holding 10,000
/// idle connections through a pair takes about three descriptors each.
pub fn raise_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    const WANT: u64 = 262_144;
    let cur = getrlimit(Resource::Nofile);
    if cur.current.is_some_and(|c| c >= WANT) {
        return;
    }
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(WANT),
            maximum: Some(WANT.max(cur.maximum.unwrap_or(WANT))),
        },
    );
    if raised.is_err() {
        let hard = cur.maximum;
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: hard,
                maximum: hard,
            },
        );
    }
}

fn open_files() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20)
        .min(1 << 20)
}

/// Connections a reference proxy may take: the 10,000 idle connections of the
/// memory load and some to spare. HAProxy reserves two descriptors per
/// connection and without `strict-limits` goes on with the ones it has. nginx
/// writes about 420 bytes per `worker_connections` at start (4.5 MiB here),
/// which its RSS figures include.
fn maxconn() -> u64 {
    open_files().saturating_sub(100).min(11_000)
}

pub struct RefPair {
    pub name: &'static str,
    pub client: Child,
    pub server: Child,
    /// The client-side proxy's listeners for HTTP/1.1 and for HTTP/2 (prior knowledge).
    pub h1: SocketAddr,
    pub h2: SocketAddr,
}

fn spawn(bin: &str, args: &[String]) -> anyhow::Result<Child> {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!("starting {bin} (apt-get install haproxy nginx-light nghttp2-client)")
        })
}

pub fn haproxy(
    certs: &Certs,
    work: &Path,
    backend: SocketAddr,
    ports: [u16; 3],
) -> anyhow::Result<RefPair> {
    haproxy_http(certs, work, backend, ports, "haproxy-mtls", Hop::NoAlpn)
}

/// The HAProxy pair with HTTP/2 between its two proxies (ALPN `h2`), as strait
/// multiplexes requests between its own: the other pairs keep HTTP/1.1
/// keep-alive connections there, which spares them HPACK, stream state and flow
/// control. Context for the verdicts, not one of the references they are made
/// against.
pub fn haproxy_h2(
    certs: &Certs,
    work: &Path,
    backend: SocketAddr,
    ports: [u16; 3],
) -> anyhow::Result<RefPair> {
    haproxy_http(certs, work, backend, ports, "haproxy-h2-mtls", Hop::H2)
}

fn haproxy_http(
    certs: &Certs,
    work: &Path,
    backend: SocketAddr,
    [h1, h2, tls]: [u16; 3],
    name: &'static str,
    hop: Hop,
) -> anyhow::Result<RefPair> {
    haproxy_pair(
        certs,
        work,
        name,
        "mode http\n  option http-keep-alive\n  http-reuse always",
        &format!("bind 127.0.0.1:{h1}\n  bind 127.0.0.1:{h2} proto h2"),
        hop,
        tls,
        backend,
        (h1, h2),
    )
}

/// HAProxy in TCP mode: a client-side proxy at `ports[0]` opening an mTLS
/// connection (TLS 1.3, client certificate) to a server-side one at `ports[1]`
/// for every connection, which forwards to `backend`. `h1`/`h2` both name the
/// client side's listener.
pub fn haproxy_tcp(
    certs: &Certs,
    work: &Path,
    backend: SocketAddr,
    ports: [u16; 2],
) -> anyhow::Result<RefPair> {
    let [tcp, tls] = ports;
    haproxy_pair(
        certs,
        work,
        "haproxy-tcp-mtls",
        "mode tcp",
        &format!("bind 127.0.0.1:{tcp}"),
        Hop::NoAlpn,
        tls,
        backend,
        (tcp, tcp),
    )
}

/// What the client side offers the server side in ALPN: nothing (HTTP/1.1, or
/// TCP mode's bytes) or `h2`.
#[derive(Clone, Copy)]
enum Hop {
    NoAlpn,
    H2,
}

/// Two HAProxies, one thread each: the client side (`binds`) connects over TLS
/// 1.3 with a client certificate to the server side on `tls`, which forwards
/// to `backend`.
#[allow(clippy::too_many_arguments)]
fn haproxy_pair(
    certs: &Certs,
    work: &Path,
    name: &'static str,
    mode: &str,
    binds: &str,
    hop: Hop,
    tls: u16,
    backend: SocketAddr,
    (h1, h2): (u16, u16),
) -> anyhow::Result<RefPair> {
    let common = format!(
        "global\n  nbthread 1\n  maxconn {}\n  no strict-limits\ndefaults\n  {mode}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
        maxconn()
    );
    // HAProxy 2.6 gives an HTTP/1.1 response that came over HTTP/2 an empty
    // reason phrase, which h2load counts as a failure: restore "OK".
    let (alpn_out, alpn_in, reason) = match hop {
        Hop::NoAlpn => ("", "", ""),
        Hop::H2 => (
            " alpn h2",
            " alpn h2,http/1.1",
            "http-response set-status 200 if { status 200 }\n  ",
        ),
    };
    let client = format!(
        "{common}frontend fa\n  {binds}\n  {reason}default_backend ba\nbackend ba\n  server b 127.0.0.1:{tls} ssl crt {} ca-file {} verify required verifyhost b.test sni str(b.test) ssl-min-ver TLSv1.3{alpn_out}\n",
        certs.p("client.pem"),
        certs.p("ca.pem")
    );
    let server = format!(
        "{common}frontend fb\n  bind 127.0.0.1:{tls} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3{alpn_in}\n  default_backend bb\nbackend bb\n  server app {backend}\n",
        certs.p("server.pem"),
        certs.p("ca.pem")
    );
    let (cf, sf) = (
        work.join(format!("{name}-a.cfg")),
        work.join(format!("{name}-b.cfg")),
    );
    std::fs::write(&cf, client)?;
    std::fs::write(&sf, server)?;
    let run = |f: &Path| {
        spawn(
            "haproxy",
            &["-db".into(), "-f".into(), f.display().to_string()],
        )
    };
    Ok(RefPair {
        name,
        server: run(&sf)?,
        client: run(&cf)?,
        h1: SocketAddr::from(([127, 0, 0, 1], h1)),
        h2: SocketAddr::from(([127, 0, 0, 1], h2)),
    })
}

pub fn nginx(
    certs: &Certs,
    work: &Path,
    backend: SocketAddr,
    ports: [u16; 3],
) -> anyhow::Result<RefPair> {
    let [h1, h2, tls] = ports;
    let w = work.display();
    let head = |n: &str| {
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {w}/nginx-{n}.pid;\nerror_log {w}/nginx-{n}.log error;\nworker_rlimit_nofile {};\nevents {{ worker_connections {}; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {w}/tmp-{n};\n  proxy_temp_path {w}/ptmp-{n};\n  keepalive_requests 1000000;\n",
            open_files(),
            maxconn()
        )
    };
    let client = format!(
        "{}  upstream b {{ server 127.0.0.1:{tls}; keepalive 64; keepalive_requests 1000000; keepalive_timeout 300s; }}\n  server {{\n    listen 127.0.0.1:{h1};\n    listen 127.0.0.1:{h2} http2;\n    location / {{\n      proxy_pass https://b;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_ssl_certificate {};\n      proxy_ssl_certificate_key {};\n      proxy_ssl_trusted_certificate {};\n      proxy_ssl_verify on;\n      proxy_ssl_name b.test;\n      proxy_ssl_server_name on;\n      proxy_ssl_protocols TLSv1.3;\n      proxy_ssl_session_reuse on;\n    }}\n  }}\n}}\n",
        head("a"),
        certs.p("client.crt"),
        certs.p("client.key"),
        certs.p("ca.pem")
    );
    let server = format!(
        "{}  upstream app {{ server {backend}; keepalive 64; keepalive_requests 1000000; keepalive_timeout 300s; }}\n  server {{\n    listen 127.0.0.1:{tls} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_client_certificate {};\n    ssl_verify_client on;\n    ssl_protocols TLSv1.3;\n    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        head("b"),
        certs.p("server.crt"),
        certs.p("server.key"),
        certs.p("ca.pem")
    );
    let (cf, sf) = (work.join("nginx-a.conf"), work.join("nginx-b.conf"));
    std::fs::write(&cf, client)?;
    std::fs::write(&sf, server)?;
    let args = |f: &Path| {
        vec![
            "-p".to_string(),
            w.to_string(),
            "-c".into(),
            f.display().to_string(),
        ]
    };
    Ok(RefPair {
        name: "nginx-mtls",
        server: spawn("nginx", &args(&sf))?,
        client: spawn("nginx", &args(&cf))?,
        h1: SocketAddr::from(([127, 0, 0, 1], h1)),
        h2: SocketAddr::from(([127, 0, 0, 1], h2)),
    })
}
