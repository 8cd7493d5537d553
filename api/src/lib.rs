//! The gRPC protocol between strait proxies and the strait control plane
//! (package `strait.api.v1`): discovery, inbound policy and identity.

pub mod clock;
pub mod core_dumps;
pub mod essential;
pub mod identity;
pub mod listen;
pub mod net;
pub mod open_files;
pub mod per_source;
pub mod scrape;
pub mod write_deadline;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("strait.api.v1");
}

#[cfg(feature = "testing")]
pub mod testing {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("strait.testing.v1");
}
