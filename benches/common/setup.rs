//! What the server benches share: the trust domain, percentiles, an agent
//! attested with a join token, and bulk registration (entries written
//! straight through a registry in large atomic commits).

use std::time::{Duration, SystemTime};

use sigil::agent::{AgentIdentity, Attestation, attest, connect};
use sigil::proto::admin as pa;
use sigil::registry::{EntryParams, Registry};
use sigil::server::ServerHandle;
use sigil::{SpiffeId, TrustDomain};

/// The benches' trust domain.
pub fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// The `p` quantile of `sorted`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// An agent attested to `server` with a fresh join token.
pub async fn join(server: &ServerHandle) -> AgentIdentity {
    let mut admin = sigil::cli::connect_admin(server.admin_socket())
        .await
        .unwrap();
    let token = admin
        .generate_token(pa::GenerateTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut c = connect(&server.node_addr().to_string(), server.bundle_pem(), None)
        .await
        .unwrap();
    attest(&mut c, &td(), &Attestation::JoinToken(token))
        .await
        .unwrap()
}

/// Writes `n` entries through `registry` in commits of `batch`, spread over
/// 1,000 simulated agents, and `extra` more parented to `agent`. SPIFFE IDs
/// carry `tag`, so several loads into one store do not collide.
pub fn bulk_load(
    registry: &Registry,
    n: usize,
    agent: Option<&SpiffeId>,
    extra: usize,
    batch: usize,
    tag: &str,
) {
    let now = SystemTime::now();
    let mut pending = Vec::with_capacity(batch);
    for i in 0..n + extra {
        let parent = match agent {
            Some(a) if i >= n => a.to_string(),
            _ => format!(
                "spiffe://example.org/sigil/agent/join_token/sim{}",
                i % 1000
            ),
        };
        pending.push(EntryParams {
            spiffe_id: format!("spiffe://example.org/ns/bench{tag}/sa/w{i}"),
            parent_id: parent,
            selectors: vec![format!("unix:uid:{}", i % 60_000)],
            ..EntryParams::default()
        });
        if pending.len() == batch {
            registry
                .create_entries(std::mem::take(&mut pending), now)
                .unwrap();
        }
    }
    if !pending.is_empty() {
        registry.create_entries(pending, now).unwrap();
    }
}
