//! `strait`: the control plane and the CLI around it.
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "strait",
    version,
    about = "strait's control plane and CLI (the controller arrives with discovery)"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
