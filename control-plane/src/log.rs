//! Logging for the `strait` binary: RUST_LOG-style filters (`--log-level`, or
//! `STRAIT_LOG`), text or JSON (`--log-format`).

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Checks a filter when the flag is parsed, so a bad one is a flag error.
pub fn parse_filter(s: &str) -> Result<String, String> {
    EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// `STRAIT_LOG`, checked as `--log-level` is: a filter that does not parse is
/// a usage error rather than a silent `info`.
pub fn from_env() -> Result<Option<String>, String> {
    match std::env::var("STRAIT_LOG") {
        Ok(s) if !s.is_empty() => parse_filter(&s)
            .map(Some)
            .map_err(|e| format!("STRAIT_LOG {s:?}: {e}")),
        _ => Ok(None),
    }
}

pub fn init(level: Option<&str>, json: bool) {
    let filter = level
        .and_then(|l| EnvFilter::try_new(l).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, never in a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().flatten_event(true).try_init()
    } else {
        b.try_init()
    };
}
