//! strait's control plane: the index of the mesh, its sources, the gRPC services
//! the proxies use, and the CLI around them.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod backend_policy;
pub mod check;
pub mod cluster;
pub mod controller;
pub mod crds;
pub mod defaults;
pub mod demo;
pub mod discovery;
pub mod identity;
pub mod index;
pub mod inject;
pub mod install;
pub mod kubernetes;
pub mod log;
pub mod manifests;
pub mod metrics;
pub mod output;
pub mod policy;
pub mod routes;
pub mod source;
pub mod spans;
pub mod spec;
pub mod unanswered;
