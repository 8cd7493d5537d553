//! Test helpers shared by every crate's tests: backends that echo, stream, stall
//! and fail on command; gRPC and TCP servers; clients; waiting on facts with a
//! deadline; running the built binaries.
#![forbid(unsafe_code)]

pub mod backend;
pub mod client;
pub mod grpc;
pub mod host;
pub mod kube_api;
pub mod load;
pub mod manifests;
pub mod mesh;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod pods;
pub mod process;
pub mod tcp;
pub mod wait;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;
