//! The CLI and the cluster: which one it reads (kubectl's `--kubeconfig` and
//! `--context`), and where its output goes.
//! `strait install | kubectl --context prod apply -f -` must read prod's
//! install, not the current context's: another cluster's identity (or a new
//! one, where that cluster has none) would cut prod's proxies off.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};

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

    /// A client of the cluster, and how to name it to the user (its server
    /// and context), so that reading the wrong one shows.
    pub async fn client(&self) -> anyhow::Result<(kube::Client, String)> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let (config, context) = match &self.kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path)?;
                let current = file.current_context.clone();
                (
                    kube::Config::from_custom_kubeconfig(file, &options).await?,
                    self.context.clone().or(current),
                )
            }
            None if self.context.is_some() => (
                kube::Config::from_kubeconfig(&options).await?,
                self.context.clone(),
            ),
            None => (
                kube::Config::infer().await?,
                Kubeconfig::read().ok().and_then(|k| k.current_context),
            ),
        };
        let name = match context {
            Some(c) => format!("{} (context {c})", config.cluster_url),
            None => config.cluster_url.to_string(),
        };
        Ok((kube::Client::try_from(config)?, name))
    }
}

/// Writes a command's output to stdout. A reader that went away (`strait
/// check | head -3`) ends the process quietly, with the status a process
/// killed by SIGPIPE has, as a C or Go tool's would: Rust's `print!` would
/// panic instead.
pub fn print(text: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(text).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(128 + 13);
        }
        eprintln!("error: writing the output: {e}");
        std::process::exit(1);
    }
}
