//! The controller's own spans (with `--otlp-endpoint`): one per manifest reload
//! that changed the index or was refused, one per index change pushed to the
//! proxies, one per certificate request. Through the global tracer provider,
//! which does nothing until one is installed.

use std::time::SystemTime;

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, Status, Tracer as _};

/// The instrumentation scope of the controller's spans.
pub const SCOPE: &str = "strait-controller";

/// Records a finished piece of work that began at `start`.
pub fn record(name: &'static str, start: SystemTime, attrs: Vec<KeyValue>, error: Option<String>) {
    let tracer = opentelemetry::global::tracer(SCOPE);
    let mut span = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attrs)
        .start(&tracer);
    if let Some(e) = error {
        span.set_status(Status::error(e));
    }
    span.end();
}

/// When something measured by an `Instant` began, on the wall clock.
pub fn since(started: std::time::Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(started.elapsed())
        .unwrap_or_else(SystemTime::now)
}
