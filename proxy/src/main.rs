#![deny(unsafe_code)]

mod heap;

use std::process::ExitCode;

use clap::Parser;
use strait_proxy::cli::{Action, Cli};
use strait_proxy::proxy::StartError;
use strait_proxy::telemetry::log;
use strait_proxy::{Config, Proxy};

/// Errors end the process with one line naming the cause, never a backtrace:
/// status 2 for what the flags said (as clap's own errors), 1 for the rest.
fn main() -> ExitCode {
    match start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let flags = matches!(
                e.downcast_ref::<StartError>(),
                Some(StartError::ControlPlane(_) | StartError::Identity(_) | StartError::Flag(_))
            );
            ExitCode::from(if flags { 2 } else { 1 })
        }
    }
}

fn start() -> anyhow::Result<()> {
    let config = match Cli::parse().into_action() {
        Action::Run(c) => *c,
        Action::Init(args) => {
            let rules = strait_proxy::init::run(&args)?;
            print!("{rules}");
            return Ok(());
        }
    };
    // One thread (the default) runs everything on the current thread: a sidecar
    // shares its pod's CPU, and cross-thread wake-ups cost more than they give.
    let rt = match config.threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(n))
            .enable_all()
            .build()?,
    };
    rt.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let log = log::init(&config.log_level, config.log_format)?;
    let proxy = Proxy::bind(config, Some(log)).await?;
    let handle = proxy.shutdown_handle();
    tokio::spawn(heap::return_freed(
        strait_proxy::defaults::HEAP_TRIM_INTERVAL,
    ));
    tokio::spawn(async move {
        wait_for_signal().await;
        handle.shutdown();
    });
    let clean = proxy.run().await;
    tracing::info!(clean, "stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; use POST /shutdown");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
