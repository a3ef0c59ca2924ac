#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Integration tests: one binary, real files and processes in temp dirs.

mod agent;
mod bundle_endpoint;
mod ca_crash;
mod cli;
mod ext_authz;
mod failover;
mod federation;
mod ha;
mod hardening;
mod interop;
mod istio_parity;
mod jwks_https;
mod limits;
mod openssl_verify;
mod operability;
mod rotation;
mod sds;
mod server;
mod store_crash;
mod svid_cache;
mod upstream;
mod workload_proto;

/// Polls `check` until it yields a value, giving up (with `what`) after a
/// generous 30 s: waits for an event, never asserts how fast it came.
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("gave up waiting: {what}"))
}
