//! What the proxy tells operators: Prometheus metrics and logs.

pub mod log;
pub mod metrics;

pub use metrics::{Direction, Metrics};
