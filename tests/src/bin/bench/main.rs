//! strait's benchmarks. `bench controller-scale` measures the control plane at
//! scale; `bench proxy` measures the proxy pair against a direct connection and
//! reference proxies. Results go to stdout (markdown) and `--out` (JSON).
#![allow(clippy::unwrap_used)]

mod controller_scale;
mod load;
mod plot;
mod proxy;
mod refs;
mod soak;
mod stats;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bench", about = "strait's benchmarks")]
struct Cli {
    #[command(subcommand)]
    what: What,
    /// Where to write the JSON results.
    #[arg(long, global = true, default_value = "docs/bench")]
    out: PathBuf,
    /// A seconds-long smoke run that keeps the harness working.
    #[arg(long, global = true)]
    quick: bool,
}

#[derive(Subcommand)]
enum What {
    /// The strait proxy pair against a direct connection and HAProxy and nginx mTLS pairs.
    Proxy {
        /// How many times every scenario and load is run, interleaved.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Only these loads (by label, e.g. "h1 1000/s"); repeatable.
        #[arg(long = "load")]
        loads: Vec<String>,
        /// Only these scenarios (by name, e.g. "strait-mtls-traced"), beside
        /// "direct", which every latency is measured against; repeatable.
        #[arg(long = "scenario")]
        scenarios: Vec<String>,
        /// Also run the mTLS pair with the `strait-proxy` in DIR (another build,
        /// e.g. of the previous commit) as "strait-mtls-before", interleaved with
        /// the others, to measure a change.
        #[arg(long, value_name = "DIR")]
        baseline: Option<PathBuf>,
        /// Also run the mTLS pair exporting a span per request (100 % sampling)
        /// to an in-process collector, as "strait-mtls-traced".
        #[arg(long)]
        with_tracing: bool,
    },
    /// Starts the strait mTLS pair and the HAProxy mTLS pairs in front of the
    /// backend and keeps them up until interrupted, printing their addresses and
    /// pids: to profile them by hand under a load of one's own.
    Pair {
        /// Also start a pair exporting a span per request to an in-process collector.
        #[arg(long)]
        with_tracing: bool,
    },
    /// Prints the tables of a `bench proxy` run again from its JSON.
    Report {
        /// The JSON a run wrote (e.g. docs/bench/proxy.json).
        from: PathBuf,
        /// Also redraw its plots into DIR. Only when asked: the plots the
        /// benchmark page shows are the full run's, and a report of another
        /// run drawn over them would put its figures beside the full run's
        /// tables.
        #[arg(long, value_name = "DIR")]
        plots: Option<PathBuf>,
    },
    /// A long run of mixed traffic through an mTLS pair while endpoints churn,
    /// sampling every process's memory and open files (not in CI).
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        /// Requests per second (a GET, a 4 KiB POST echoed, a 64 KiB download).
        #[arg(long, default_value_t = 300)]
        rate: u64,
        /// Seconds between endpoint replacements.
        #[arg(long, default_value_t = 30)]
        churn_every: u64,
    },
    /// The controller with many Services and endpoints and many watching proxies.
    ControllerScale {
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        endpoints_per_service: usize,
        #[arg(long, default_value_t = 1_000)]
        watches: usize,
        #[arg(long, default_value_t = 100)]
        watched_services: usize,
        #[arg(long, default_value_t = 50)]
        changes: usize,
        /// Only write the manifests into DIR and exit (to profile the controller
        /// on them by hand).
        #[arg(long, value_name = "DIR")]
        write_only: Option<PathBuf>,
        /// Run the controller on the API server stand-in (`--kubernetes`), the
        /// objects created and changed through it one by one.
        #[arg(long)]
        kubernetes: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.out)?;
    match cli.what {
        What::Proxy {
            rounds,
            loads,
            scenarios,
            baseline,
            with_tracing,
        } => {
            // Only a full run (every load and pair, the traced one with
            // them) is the page's: another writes its JSON beside it and
            // draws no plot over its plots.
            let full = !cli.quick
                && with_tracing
                && loads.is_empty()
                && scenarios.is_empty()
                && baseline.is_none();
            let r = proxy::run(
                cli.quick,
                if cli.quick { 1 } else { rounds },
                &loads,
                &scenarios,
                baseline.map(|d| d.join("strait-proxy")),
                with_tracing,
            )
            .await?;
            println!("{}", proxy::markdown(&r));
            let name = match (cli.quick, full) {
                (true, _) => "proxy-quick.json",
                (false, true) => "proxy.json",
                (false, false) => "proxy-partial.json",
            };
            std::fs::write(cli.out.join(name), serde_json::to_string_pretty(&r)?)?;
            if full {
                for p in plot::write(&r, &cli.out)? {
                    eprintln!("wrote {}", p.display());
                }
            }
        }
        What::Pair { with_tracing } => {
            proxy::hold(with_tracing).await?;
        }
        What::Soak {
            minutes,
            rate,
            churn_every,
        } => {
            let p = soak::Params {
                duration: if cli.quick {
                    std::time::Duration::from_secs(20)
                } else {
                    std::time::Duration::from_secs(minutes * 60)
                },
                sample_every: std::time::Duration::from_secs(if cli.quick { 5 } else { 30 }),
                churn_every: std::time::Duration::from_secs(if cli.quick {
                    6
                } else {
                    churn_every
                }),
                rate,
            };
            let r = soak::run(p).await?;
            println!("{}", soak::markdown(&r));
            std::fs::write(cli.out.join("soak.json"), serde_json::to_string_pretty(&r)?)?;
        }
        What::Report { from, plots } => {
            let r: proxy::Results = serde_json::from_str(&std::fs::read_to_string(&from)?)?;
            println!("{}", proxy::markdown(&r));
            if let Some(dir) = plots {
                for p in plot::write(&r, &dir)? {
                    eprintln!("wrote {}", p.display());
                }
            }
        }
        What::ControllerScale {
            services,
            endpoints_per_service,
            watches,
            watched_services,
            changes,
            write_only,
            kubernetes,
        } => {
            let p = if cli.quick {
                controller_scale::Params {
                    services: 200,
                    endpoints_per_service: 5,
                    watches: 50,
                    watched_services: 10,
                    changes: 5,
                    kubernetes,
                }
            } else {
                controller_scale::Params {
                    services,
                    endpoints_per_service,
                    watches,
                    watched_services,
                    changes,
                    kubernetes,
                }
            };
            if let Some(dir) = write_only {
                std::fs::create_dir_all(&dir)?;
                let bytes = controller_scale::write_manifests(&p, &dir)?;
                eprintln!("wrote {bytes} bytes of manifests to {}", dir.display());
                return Ok(());
            }
            let r = controller_scale::run(p).await?;
            println!("{}", controller_scale::markdown(&r));
            let name = match (cli.quick, kubernetes) {
                (true, false) => "controller-scale-quick.json",
                (true, true) => "controller-scale-kubernetes-quick.json",
                (false, false) => "controller-scale.json",
                (false, true) => "controller-scale-kubernetes.json",
            };
            std::fs::write(cli.out.join(name), serde_json::to_string_pretty(&r)?)?;
        }
    }
    Ok(())
}
