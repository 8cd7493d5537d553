//! strait-proxy: the per-pod sidecar of the strait mesh.
#![forbid(unsafe_code)]

pub mod addr;
pub mod admin;
pub mod balance;
pub mod boxed;
pub mod cgroup;
pub mod cli;
pub mod control;
pub mod defaults;
pub mod detect;
pub mod dns;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod outbound;
pub mod proxy;
pub mod retry;
pub mod tcp;
pub mod telemetry;
pub mod timeout;
pub mod transport;

pub use cli::Config;
pub use proxy::{Addrs, Proxy, Stopped};
