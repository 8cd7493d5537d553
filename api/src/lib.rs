//! The gRPC protocol between strait proxies and the strait control plane
//! (package `strait.api.v1`): discovery, inbound policy and identity.

pub mod clock;
pub mod codec;
pub mod core_dumps;
pub mod essential;
pub mod identity;
pub mod listen;
pub mod net;
pub mod open_files;
pub mod per_source;
pub mod scrape;
pub mod write_deadline;

/// Ports whose protocols speak first from the server or are never HTTP: SMTP (25, 587),
/// ZooKeeper (2181: its four-letter words, `mntr`, are sent bare and read
/// as an HTTP method left waiting), MySQL (3306), SQL Server/others (4444),
/// PostgreSQL (5432), Redis (6379), Elasticsearch transport (9300), memcached
/// (11211). Callers carry them as TCP without protocol detection (the proxy's
/// default `--opaque-ports`), so a route's status says it is not served on
/// such a Service port unless the port's `appProtocol` says HTTP.
pub const DEFAULT_OPAQUE_PORTS: [u16; 9] = [25, 587, 2181, 3306, 4444, 5432, 6379, 9300, 11211];

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("strait.api.v1");
}

#[cfg(feature = "testing")]
pub mod testing {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("strait.testing.v1");
}
