//! What the proxy tells operators: Prometheus metrics and logs.

pub mod access_log;
pub mod log;
pub mod metrics;
pub mod retain;
pub mod short_str;
pub mod trace;

pub use metrics::{Direction, Metrics};
