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
    filter(s).map(|_| s.to_string())
}

/// A RUST_LOG-style filter. Field values match as written, never as regular
/// expressions, whose automata grow exponentially with the pattern; a blank
/// filter, which would log nothing but errors, is refused.
fn filter(s: &str) -> Result<EnvFilter, String> {
    if s.trim().is_empty() {
        return Err("empty log filter (e.g. info, or strait_control_plane=debug,info)".into());
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(s)
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
        .and_then(|l| filter(l).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, never in a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // Other crates' lines a stranger can cause, sampled (h2's per frame).
    let others = strait_otel::sampled::OthersSampled::default();
    let _ = if json {
        b.json()
            .flatten_event(true)
            .finish()
            .with(others)
            .try_init()
    } else {
        b.finish().with(others).try_init()
    };
}

#[cfg(test)]
mod tests {
    /// As the proxy's: field values as written, and never blank.
    #[test]
    fn a_filter_is_read_as_written_and_never_blank() {
        let costly = format!("info,[{{x=/(a|b)*a{}/}}]=debug", "(a|b)".repeat(20));
        let t = std::time::Instant::now();
        assert!(super::parse_filter(&costly).is_ok());
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
        assert!(super::parse_filter("").is_err());
        assert!(super::parse_filter("info").is_ok());
    }
}
