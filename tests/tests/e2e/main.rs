//! End-to-end tests: the real `strait` and `strait-proxy` binaries as separate
//! processes on loopback, configured through a manifests directory.
#![allow(clippy::unwrap_used)]

mod api_server;
mod bad_input;
mod bench;
mod demo;
mod discovery;
mod faults;
mod identity;
mod interception;
mod kubernetes;
mod observability;
mod pods;
mod traffic;
mod zones;
