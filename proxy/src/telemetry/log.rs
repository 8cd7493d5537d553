//! Logging with `tracing`: RUST_LOG-style filters, text or JSON, and a handle to
//! change the filter at run time (PUT /log-level).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::cli::LogFormat;

#[derive(Clone)]
pub struct LogHandle {
    inner: reload::Handle<EnvFilter, Registry>,
    current: std::sync::Arc<std::sync::Mutex<String>>,
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle")
            .field("current", &self.current())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter {filter:?}: {reason}")]
    BadFilter { filter: String, reason: String },
    #[error("the logger is gone")]
    Gone,
}

impl LogHandle {
    pub fn current(&self) -> String {
        self.current.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn set(&self, filter: &str) -> Result<(), LogError> {
        let f = parse(filter).map_err(|reason| LogError::BadFilter {
            filter: filter.to_string(),
            reason,
        })?;
        // Held across the reload: two callers at once on two threads would
        // otherwise leave one's filter in force and the other's reported.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.reload(f).map_err(|_| LogError::Gone)?;
        *current = filter.to_string();
        Ok(())
    }
}

/// A RUST_LOG-style filter, as the flag, the environment and `PUT
/// /log-level` take it. Field values (`[{user=/a.*b/}]`) match as written,
/// never as regular expressions: a pattern's automaton grows exponentially
/// with it, built on the serving thread (13 s and hundreds of MiB for 150
/// bytes). A blank filter, which would log nothing but errors, is refused.
pub fn parse(filter: &str) -> Result<EnvFilter, String> {
    if filter.trim().is_empty() {
        return Err("empty log filter (e.g. info, or strait_proxy=debug,info)".into());
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(filter)
        .map_err(|e| e.to_string())
}

/// Installs the global subscriber. The filter was validated when flags were parsed.
pub fn init(filter: &str, format: LogFormat) -> Result<LogHandle, LogError> {
    let f = parse(filter).map_err(|reason| LogError::BadFilter {
        filter: filter.to_string(),
        reason,
    })?;
    let (layer, handle) = reload::Layer::new(f);
    let registry = tracing_subscriber::registry()
        .with(layer)
        .with(strait_otel::sampled::OthersSampled::default());
    let res = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    // Colour codes only for a person at a terminal, never in a
                    // file or a log collector.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // Already installed (tests embedding several proxies): keep the first one.
    let _ = res;
    Ok(LogHandle {
        inner: handle,
        current: std::sync::Arc::new(std::sync::Mutex::new(filter.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field value is matched as written: a pattern whose automaton would
    /// take seconds and hundreds of MiB to build (on the thread that serves
    /// requests, from `PUT /log-level`) costs nothing. A blank filter, which
    /// would silence everything but errors, is refused.
    #[test]
    fn a_filter_is_read_as_written_and_never_blank() {
        let costly = format!("info,[{{x=/(a|b)*a{}/}}]=debug", "(a|b)".repeat(20));
        let t = std::time::Instant::now();
        assert!(parse(&costly).is_ok());
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
        for blank in ["", "  ", "\n"] {
            assert!(parse(blank).is_err(), "{blank:?}");
        }
        assert!(parse("info,strait_proxy=debug").is_ok());
        assert!(parse("strait_proxy=loud").is_err());
    }
}
