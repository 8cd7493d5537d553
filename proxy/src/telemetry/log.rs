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
        let f = EnvFilter::try_new(filter).map_err(|e| LogError::BadFilter {
            filter: filter.to_string(),
            reason: e.to_string(),
        })?;
        self.inner.reload(f).map_err(|_| LogError::Gone)?;
        if let Ok(mut c) = self.current.lock() {
            *c = filter.to_string();
        }
        Ok(())
    }
}

/// Installs the global subscriber. The filter was validated when flags were parsed.
pub fn init(filter: &str, format: LogFormat) -> Result<LogHandle, LogError> {
    let f = EnvFilter::try_new(filter).map_err(|e| LogError::BadFilter {
        filter: filter.to_string(),
        reason: e.to_string(),
    })?;
    let (layer, handle) = reload::Layer::new(f);
    let registry = tracing_subscriber::registry().with(layer);
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
