//! Which cluster the CLI reads: kubectl's `--kubeconfig` and `--context`.
//! `strait install | kubectl --context prod apply -f -` must read prod's
//! install, not the current context's: another cluster's identity (or a new
//! one, where that cluster has none) would cut prod's proxies off.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// A `--context` the kubeconfig does not have.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoSuchContext(String);

#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterArgs {
    /// The kubeconfig file to read, as kubectl's (default: `KUBECONFIG`, else
    /// `~/.kube/config`, else the pod's in-cluster configuration).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use, as kubectl's (default: its current one).
    #[arg(long)]
    pub context: Option<String>,
}

impl ClusterArgs {
    /// Whether anything names a cluster: the flags, `KUBECONFIG`,
    /// `~/.kube/config`, or a pod's in-cluster configuration. kubectl would
    /// use it, so a configuration that cannot be read is an error rather than
    /// no cluster.
    pub fn named(&self) -> bool {
        let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
        self.kubeconfig.is_some()
            || self.context.is_some()
            || set("KUBECONFIG")
            || set("KUBERNETES_SERVICE_HOST")
            || std::env::var_os("HOME").is_some_and(|h| {
                std::path::Path::new(&h)
                    .join(".kube")
                    .join("config")
                    .exists()
            })
    }

    /// `client`, its failures but a misspelt context told as `cannot` says
    /// (with the way out of a cluster that cannot be read).
    pub async fn client_or(
        &self,
        cannot: impl Fn(&dyn std::fmt::Display) -> anyhow::Error,
    ) -> anyhow::Result<(kube::Client, String)> {
        self.client().await.map_err(|e| {
            if e.is::<NoSuchContext>() {
                e
            } else {
                cannot(&e)
            }
        })
    }

    /// A client of the cluster, and how to name it to the user (its server
    /// and context), so that reading the wrong one shows.
    pub async fn client(&self) -> anyhow::Result<(kube::Client, String)> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        // A context misspelt is said as such: kube's own error reads as no
        // configuration at all, and the advice after it (generate a new
        // identity) would be wrong.
        let has = |file: &Kubeconfig, at: &dyn std::fmt::Display| match &self.context {
            Some(c) if !file.contexts.iter().any(|n| n.name == *c) => Err(NoSuchContext(format!(
                "no context {c:?} in {at} (it has {})",
                file.contexts
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            _ => Ok(()),
        };
        let (mut config, context, file) = match &self.kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path)?;
                has(&file, &path.display())?;
                let current = file.current_context.clone();
                (
                    kube::Config::from_custom_kubeconfig(file.clone(), &options).await?,
                    self.context.clone().or(current),
                    Some(file),
                )
            }
            None if self.context.is_some() => {
                let file = Kubeconfig::read()?;
                has(&file, &"the kubeconfig (KUBECONFIG, else ~/.kube/config)")?;
                (
                    kube::Config::from_kubeconfig(&options).await?,
                    self.context.clone(),
                    Some(file),
                )
            }
            None => {
                let config = kube::Config::infer().await?;
                // The kubeconfig, if that is what kube read (not the pod's
                // own configuration, which it falls back to).
                let file = Kubeconfig::read().ok().filter(|f| {
                    context_cluster(f, None)
                        .and_then(|c| c.server.as_deref()?.parse::<http::Uri>().ok())
                        .is_some_and(|s| s.authority() == config.cluster_url.authority())
                });
                let current = file.as_ref().and_then(|k| k.current_context.clone());
                (config, current, file)
            }
        };
        // The proxy as kubectl picks it (kube reads `NO_PROXY` against the
        // proxy's own address): the cluster's `proxy-url`, else the
        // environment's, but for a loopback server or one `NO_PROXY` names.
        // In a pod (no kubeconfig), as kube has it.
        if let Some(file) = &file {
            let host = config.cluster_url.host().unwrap_or_default().to_string();
            let explicit = context_cluster(file, context.as_deref())
                .and_then(|c| c.proxy_url.clone())
                .filter(|p| !p.is_empty());
            let plain = config.cluster_url.scheme_str() == Some("http");
            config.proxy_url = match explicit {
                // kubectl refuses one it cannot read, rather than go direct.
                Some(explicit) => Some(explicit.parse().map_err(|e| {
                    anyhow::anyhow!("the kubeconfig's proxy-url {explicit:?} is not a URL: {e}")
                })?),
                None => env_proxy(plain).filter(|_| !local(&host) && !bypassed(&host)),
            };
        }
        let name = match context {
            Some(c) => format!("{} (context {c})", config.cluster_url),
            None => config.cluster_url.to_string(),
        };
        Ok((kube::Client::try_from(config)?, name))
    }
}

/// The cluster of `context` (else the current one) in the kubeconfig.
fn context_cluster<'a>(
    file: &'a Kubeconfig,
    context: Option<&str>,
) -> Option<&'a kube::config::Cluster> {
    let context = context.or(file.current_context.as_deref())?;
    let cluster = &file
        .contexts
        .iter()
        .find(|c| c.name == context)?
        .context
        .as_ref()?
        .cluster;
    file.clusters
        .iter()
        .find(|c| c.name == *cluster)?
        .cluster
        .as_ref()
}

/// A server on this machine, which Go's HTTP client (kubectl's) never sends
/// through a proxy.
fn local(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The proxy the environment names, which kube takes where the kubeconfig
/// names none (`proxy-url`).
/// `HTTP_PROXY` for a server of plain HTTP, as Go reads them.
fn env_proxy(plain: bool) -> Option<http::Uri> {
    let names = match plain {
        true => ["HTTP_PROXY", "http_proxy"],
        false => ["HTTPS_PROXY", "https_proxy"],
    };
    let v = (names.iter()).find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))?;
    proxy_uri(&v)
}

/// A proxy as Go reads the environment's: one written without a scheme
/// (`proxy.corp:3128`, common in corporate setups) is `http://`, where kube
/// would refuse it and every command reading the cluster fail.
fn proxy_uri(v: &str) -> Option<http::Uri> {
    match v.parse::<http::Uri>() {
        Ok(u) if u.scheme().is_some() && u.host().is_some() => Some(u),
        _ => format!("http://{v}").parse().ok(),
    }
}

/// Whether `NO_PROXY` takes `host` away from the environment's proxy, as
/// kubectl reads it: `*`, an address, a network (`10.0.0.0/8`), or a domain
/// and its subdomains (`corp`, `.corp`). kube matches it against the proxy's
/// own address, not the server's, so a cluster listed there was still sent
/// through the proxy.
fn bypassed(host: &str) -> bool {
    let list = ["NO_PROXY", "no_proxy"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .unwrap_or_default();
    no_proxy_matches(&list, host)
}

fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let ip = host.parse::<std::net::IpAddr>().ok();
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            // A port, if any, is not compared: the server's is the API's own.
            if let Some(ip) = ip {
                let e = entry.trim_start_matches('[');
                let e = e.split(']').next().unwrap_or(e);
                let e = match e.split_once(':') {
                    Some((v4, port)) if !port.contains(':') => v4,
                    _ => e,
                };
                return e
                    .parse::<strait_api::net::IpNet>()
                    .is_ok_and(|net| net.contains(ip));
            }
            let name = entry.rsplit_once(':').map_or(entry, |(n, _)| n);
            // `.corp` and `*.corp`: its subdomains only; `corp`: it and them.
            let subdomains_only = name.starts_with('.') || name.starts_with("*.");
            let name = name
                .trim_start_matches('*')
                .trim_start_matches('.')
                .to_ascii_lowercase();
            !name.is_empty()
                && ((host == name && !subdomains_only) || host.ends_with(&format!(".{name}")))
        })
}

#[cfg(test)]
mod tests {
    use super::no_proxy_matches;

    /// The environment's proxy as Go (kubectl) reads it: with no scheme,
    /// `http://`.
    #[test]
    fn a_proxy_without_a_scheme_is_http() {
        for (v, want) in [
            ("proxy.corp:3128", "http://proxy.corp:3128/"),
            ("proxy", "http://proxy/"),
            ("10.0.0.1:3128", "http://10.0.0.1:3128/"),
            ("http://proxy.corp:3128", "http://proxy.corp:3128/"),
            ("https://proxy.corp", "https://proxy.corp/"),
            ("socks5://127.0.0.1:1080", "socks5://127.0.0.1:1080/"),
        ] {
            assert_eq!(super::proxy_uri(v).unwrap().to_string(), want, "{v}");
        }
    }

    /// kubectl sends nothing on this machine through a proxy.
    #[test]
    fn a_server_on_this_machine_is_local() {
        for host in ["localhost", "127.0.0.1", "127.1.2.3", "[::1]"] {
            assert!(super::local(host), "{host}");
        }
        assert!(!super::local("10.0.0.1") && !super::local("api.example"));
    }

    /// `NO_PROXY` as kubectl reads it, against the API server's host.
    #[test]
    fn no_proxy_names_hosts_domains_and_networks() {
        let list = "localhost, .corp.example,internal:6443, 10.0.0.0/8,fd00::/8, 192.168.1.7, 172.16.0.9:6443, [fd01::9]:443, lab";
        for host in [
            "localhost",
            "api.corp.example",
            "internal",
            "10.1.2.3",
            "[fd00::1]",
            "192.168.1.7",
            "172.16.0.9",
            "[fd01::9]",
            "lab",
            "k8s.lab",
        ] {
            assert!(no_proxy_matches(list, host), "{host}");
        }
        for host in [
            "api.example",
            "notcorp.example",
            "corp.example",
            "192.168.1.8",
            "11.0.0.1",
        ] {
            assert!(!no_proxy_matches(list, host), "{host}");
        }
        assert!(no_proxy_matches("*", "anything"));
        assert!(!no_proxy_matches("", "anything"));
    }
}
