//! `strait`: the control plane and the CLI around it.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use strait_control_plane::controller::{Controller, ControllerArgs, FlagError};
use strait_control_plane::{demo, log};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "strait", version, about = "strait's control plane and CLI")]
struct Cli {
    /// Log filter, RUST_LOG syntax (`info,strait_control_plane=debug`); default
    /// `$STRAIT_LOG`, else `info` (`warn` for the processes `strait demo` runs).
    #[arg(long, global = true, env = "STRAIT_LOG_LEVEL", value_parser = log::parse_filter)]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, global = true, env = "STRAIT_LOG_FORMAT", value_enum, default_value_t = log::LogFormat::Text)]
    log_format: log::LogFormat,
    /// The same as `--log-format json` (kept for scripts that use it).
    #[arg(
        long,
        global = true,
        env = "STRAIT_LOG_JSON",
        hide = true,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the proxies: discovery, inbound policy and identity over gRPC.
    Controller(Box<ControllerArgs>),
    /// Run a whole mesh on this machine: a controller, demo services with their
    /// sidecars, and traffic between them, with a live table.
    Demo(demo::DemoArgs),
    /// Add the sidecar to the pods of workload YAML (Deployments, StatefulSets,
    /// DaemonSets, ReplicaSets, Jobs, CronJobs, Pods, Lists): `strait inject
    /// app.yaml | kubectl apply -f -`.
    Inject(strait_control_plane::inject::workloads::InjectArgs),
    /// Print every manifest a cluster needs (`strait install | kubectl apply -f -`),
    /// with a freshly generated trust anchor and issuer unless given.
    Install(strait_control_plane::install::InstallArgs),
    /// Print what `strait install` made, webhooks first, for `strait uninstall
    /// | kubectl delete --ignore-not-found -f -` (the CRDs, and with them every
    /// policy, are left: `strait crds | kubectl delete -f -` removes them);
    /// refused while meshed pods still run, unless `--force`.
    Uninstall(strait_control_plane::install::UninstallArgs),
    /// Check an installed strait: the API, CRDs, controller, injector, identity
    /// expiry and proxies, one line each; exits non-zero when a check fails.
    Check(strait_control_plane::check::CheckArgs),
    /// Print strait's CustomResourceDefinitions (`strait crds | kubectl apply -f -`).
    Crds,
    /// The demo's app (used by `strait demo`).
    #[command(hide = true)]
    DemoApp(demo::app::AppArgs),
}

/// Errors end the process with one line naming the cause, never a backtrace.
fn main() -> std::process::ExitCode {
    match start() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A flag's value that cannot work is a usage error, as clap's are.
            if e.downcast_ref::<FlagError>().is_some() {
                std::process::ExitCode::from(2)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn start() -> anyhow::Result<()> {
    strait_api::core_dumps::off();
    // Each connected proxy holds a descriptor or two, and the webhook, the
    // API server's client and the admin port draw on the same limit.
    strait_api::open_files::raise();
    let mut cli = Cli::parse();
    if cli.log_level.is_none() {
        cli.log_level = log::from_env().map_err(FlagError)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Controller(args) => {
                let json = cli.log_json || cli.log_format == log::LogFormat::Json;
                log::init(cli.log_level.as_deref(), json);
                let c = Controller::bind(*args).await?;
                c.run(async {
                    wait_for_signal().await;
                    tracing::info!("shutting down");
                })
                .await
            }
            Command::Demo(args) => {
                let log = demo::ChildLog {
                    level: cli.log_level,
                    json: cli.log_json || cli.log_format == log::LogFormat::Json,
                };
                demo::run(args, log).await
            }
            Command::Install(args) => {
                strait_control_plane::output::print(format_args!(
                    "{}",
                    strait_control_plane::install::run(&args).await?
                ));
                Ok(())
            }
            Command::Check(args) => strait_control_plane::check::run(&args).await,
            Command::Uninstall(args) => {
                strait_control_plane::output::print(format_args!(
                    "{}",
                    strait_control_plane::install::uninstall(&args).await?
                ));
                Ok(())
            }
            Command::Crds => {
                strait_control_plane::output::print(format_args!(
                    "{}",
                    strait_control_plane::crds::stream()?
                ));
                Ok(())
            }
            Command::Inject(args) => strait_control_plane::inject::workloads::run(&args).await,
            Command::DemoApp(args) => demo::app::run(args).await,
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
