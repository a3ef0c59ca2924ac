#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Integration tests: one binary, real files and processes in temp dirs.

mod agent;
mod bundle_endpoint;
mod ca_crash;
mod cli;
mod ext_authz;
mod federation;
mod hardening;
mod interop;
mod istio_parity;
mod jwks_https;
mod openssl_verify;
mod operability;
mod rotation;
mod sds;
mod server;
mod store_crash;
mod upstream;
mod workload_proto;
