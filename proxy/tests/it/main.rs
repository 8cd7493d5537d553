//! Integration tests of strait-proxy against real in-process servers and clients.
#![allow(clippy::unwrap_used)]

mod admin;
mod binary;
mod drain;
mod framing;
mod grpc;
mod hardening;
mod http1;
mod inbound;
mod support;
mod tcp;
mod trace;
