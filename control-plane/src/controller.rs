//! `strait controller`: the index, its source, and the gRPC services the proxies use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use strait_api::v1::discovery_server::DiscoveryServer;
use strait_api::v1::identity_server::IdentityServer;
use strait_api::v1::inbound_policy_server::InboundPolicyServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

use crate::discovery::{DiscoveryService, Views};
use crate::index::Snapshot;
use crate::manifests::ManifestSource;
use crate::metrics::Metrics;
use crate::policy::{IdentityService, InboundPolicyService};
use crate::{admin, defaults};

#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// Read Services, EndpointSlices, Pods and policies from the YAML files in DIR
    /// (re-read on change), instead of the Kubernetes API.
    #[arg(long, env = "STRAIT_MANIFESTS", value_name = "DIR")]
    pub manifests: PathBuf,
    /// gRPC address the proxies connect to.
    #[arg(long, env = "STRAIT_GRPC_ADDR", default_value = defaults::GRPC_ADDR)]
    pub grpc_addr: SocketAddr,
    /// Admin server: /live, /ready, /metrics.
    #[arg(long, env = "STRAIT_ADMIN_ADDR", default_value = defaults::ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Trust domain of workload identities.
    #[arg(long, env = "STRAIT_TRUST_DOMAIN", default_value = defaults::TRUST_DOMAIN)]
    pub trust_domain: String,
}

/// A running controller's addresses, for tests and the demo.
#[derive(Clone, Debug)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

pub struct Controller {
    args: ControllerArgs,
    grpc: TcpListener,
    admin: TcpListener,
    pub bound: Bound,
}

impl Controller {
    pub async fn bind(args: ControllerArgs) -> anyhow::Result<Self> {
        if !args.manifests.is_dir() {
            anyhow::bail!("--manifests {}: not a directory", args.manifests.display());
        }
        let grpc = TcpListener::bind(args.grpc_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on --grpc-addr {}: {e}", args.grpc_addr))?;
        let admin = TcpListener::bind(args.admin_addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on --admin-addr {}: {e}", args.admin_addr)
        })?;
        let bound = Bound {
            grpc: grpc.local_addr()?,
            admin: admin.local_addr()?,
        };
        Ok(Controller {
            args,
            grpc,
            admin,
            bound,
        })
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let metrics = Metrics::new();
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::empty(&self.args.trust_domain)));
        let (ready_tx, ready_rx) = watch::channel(false);

        let mut source = ManifestSource::new(
            &self.args.manifests,
            &self.args.trust_domain,
            metrics.clone(),
        );
        // The first full read happens before serving, so no proxy sees an empty mesh.
        if let Some(s) = source.scan() {
            metrics.observe_snapshot(&s);
            info!(
                services = s.services.len(),
                endpoints = s.endpoint_count(),
                pods = s.pods.len(),
                "index loaded"
            );
            snap_tx.send_replace(Arc::new(s));
        }
        tokio::spawn(source.run(snap_tx));

        let views = Views::new(snap_rx, metrics.clone());
        tokio::spawn(views.clone().run());
        tokio::spawn(admin::serve(self.admin, metrics.clone(), ready_rx));
        ready_tx.send_replace(true);
        info!(grpc = %self.bound.grpc, admin = %self.bound.admin, manifests = %self.args.manifests.display(), "controller ready");

        tonic::transport::Server::builder()
            // Notice proxies that vanished without closing their streams.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(DiscoveryServer::new(DiscoveryService::new(
                views,
                metrics.clone(),
            )))
            .add_service(InboundPolicyServer::new(InboundPolicyService::new(
                metrics.clone(),
            )))
            .add_service(IdentityServer::new(IdentityService))
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.grpc), shutdown)
            .await?;
        Ok(())
    }
}
