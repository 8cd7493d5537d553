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
    let (config, cache_left_on, limits) = match Cli::parse().into_action() {
        Action::Run(mut c) => {
            let limits = fit_connection_limits(&mut c);
            // Before any thread or descriptor: the process may be replaced.
            let cache_left_on = if c.threads <= 1 {
                heap::without_thread_cache()
            } else {
                None
            };
            (*c, cache_left_on, limits)
        }
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
    strait_api::core_dumps::off();
    let open_files = strait_api::open_files::raise();
    let r = rt.block_on(run(config, open_files, cache_left_on, limits));
    // Drained: what is left is blocking work (a resolver call that hangs)
    // that must not hold the process past its grace period.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    r
}

/// Below this many open files the proxy warns at start.
const MIN_OPEN_FILES: u64 = 4096;

/// What fitting the connection limits to the container found, to be logged
/// once logging is up. Memory limits in bytes.
enum LimitNote {
    /// `--max-connections` not given: this many, what the limit holds.
    Lowered(u64, usize),
    /// Given, and more than the limit holds.
    Over(u64, usize),
    /// `--inbound-max-connections-per-source` above what the total lets one
    /// address hold (per source, total).
    PerSourceOver(usize, usize),
}

/// Sets `--max-connections`, when not given, to what the container's memory
/// limit holds, and says what a given limit cannot have.
fn fit_connection_limits(c: &mut Config) -> Vec<LimitNote> {
    use strait_proxy::cgroup;
    let mut notes = Vec::new();
    match (c.max_connections, cgroup::memory_limit()) {
        (None, Some(limit)) => {
            let n = cgroup::connections_within(limit);
            c.max_connections = Some(n);
            if n < strait_proxy::defaults::MAX_CONNECTIONS {
                notes.push(LimitNote::Lowered(limit, n));
            }
        }
        (Some(n), Some(limit)) if !cgroup::holds(limit, n) => notes.push(LimitNote::Over(limit, n)),
        _ => {}
    }
    let max = c.max_connections();
    c.max_connections = Some(max);
    // A per-source share given alone is bounded by the unproven share of the
    // (perhaps fitted) total: said, rather than cut unseen.
    let mtls = c.trust_anchors.is_some() || c.trust_anchors_pem.is_some();
    let share = if mtls {
        strait_proxy::inbound::unproven_share(max)
    } else {
        max
    };
    if let Some(p) = c.inbound_max_connections_per_source.filter(|p| *p > share) {
        notes.push(LimitNote::PerSourceOver(p, max));
    }
    notes
}

async fn run(
    config: Config,
    open_files: Option<u64>,
    cache_left_on: Option<String>,
    limits: Vec<LimitNote>,
) -> anyhow::Result<()> {
    let log = log::init(&config.log_level, config.log_format)?;
    for note in limits {
        match note {
            LimitNote::Lowered(limit, n) => tracing::info!(
                memory_limit_mib = limit >> 20,
                max_connections = n,
                "connections per listener limited to what the container's memory limit holds (--max-connections sets it)"
            ),
            LimitNote::Over(limit, n) => tracing::warn!(
                memory_limit_mib = limit >> 20,
                max_connections = n,
                "--max-connections is more than the container's memory limit holds (about 32 KiB per connection): a flood of connections could get the proxy killed"
            ),
            LimitNote::PerSourceOver(per_source, max) => tracing::warn!(
                per_source,
                max_connections = max,
                "--inbound-max-connections-per-source is more than --max-connections lets one address hold (three quarters of it with mTLS on): raise --max-connections with it"
            ),
        }
    }
    if let Some(why) = cache_left_on {
        // Memory a burst freed may stay resident (docs/configuration.md).
        tracing::info!("glibc's per-thread cache left on: {why}");
    }
    let max_connections = config.max_connections();
    let proxy = Proxy::bind(config, Some(log)).await?;
    // An opaque stream takes two descriptors (the client's and the
    // upstream's); a limit this low runs out at a few thousand connections.
    match open_files {
        Some(n) if n < MIN_OPEN_FILES => tracing::warn!(
            open_files = n,
            max_connections,
            "the open-file limit is low (the hard limit allows no more): past some {} opaque streams, connections fail",
            n / 2
        ),
        n => tracing::debug!(open_files = ?n, "open-file limit"),
    }
    let handle = proxy.shutdown_handle();
    tokio::spawn(heap::return_freed(
        strait_proxy::defaults::HEAP_TRIM_INTERVAL,
    ));
    // Near the memory limit, freed heap is handed back at once.
    strait_proxy::cgroup::on_pressure(heap::trim);
    tokio::spawn(async move {
        wait_for_signal().await;
        handle.shutdown();
    });
    let stopped = proxy.run().await;
    tracing::info!(clean = stopped.clean, "stopped");
    match stopped.failed {
        Some(ended) => Err(anyhow::Error::new(ended).context("stopped without being asked")),
        None => Ok(()),
    }
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
