//! Bulk registration for the benches: entries written straight through a
//! registry in large atomic commits.

use std::time::SystemTime;

use sigil::SpiffeId;
use sigil::registry::{EntryParams, Registry};

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
