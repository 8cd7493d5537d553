//! OpenTelemetry for strait's binaries: spans exported over OTLP/gRPC through a
//! bounded queue off the request path (`export`), and the trace context carried
//! in HTTP headers, W3C and B3 (`propagate`); and log lines that strangers can
//! cause, sampled (`sampled!`).
// One system call is allowed where it stands (`background`).
#![deny(unsafe_code)]

mod background;
mod otlp;

pub mod export;
pub mod propagate;
pub mod sampled;

pub use export::{ExportConfig, Exporter, Recorder};
pub use opentelemetry;
pub use opentelemetry_sdk;
pub use otlp::{Record, SpanWriter};
