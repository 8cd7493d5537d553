//! What the proxy tells operators: Prometheus metrics and logs.

pub mod log;
pub mod metrics;
pub mod sampled;

pub use metrics::{Direction, Metrics};
