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
        let (config, context) = match &self.kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path)?;
                has(&file, &path.display())?;
                let current = file.current_context.clone();
                (
                    kube::Config::from_custom_kubeconfig(file, &options).await?,
                    self.context.clone().or(current),
                )
            }
            None if self.context.is_some() => {
                has(
                    &Kubeconfig::read()?,
                    &"the kubeconfig (KUBECONFIG, else ~/.kube/config)",
                )?;
                (
                    kube::Config::from_kubeconfig(&options).await?,
                    self.context.clone(),
                )
            }
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
