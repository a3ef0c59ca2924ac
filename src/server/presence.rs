//! What the servers of a cluster know of their agents, shared through the
//! store: which bundle each agent applied, and how many SVIDs signed by a
//! tainted authority it still holds. An agent talks to one server at a time,
//! so without this `ca show` (and the gate of `ca activate`) would count
//! only the agents of the server asked.
//!
//! Each server writes one row (`Table::Presence`, keyed by a random ID of
//! the process) when what it knows changed, at most once a second, and again
//! every few minutes so the "seen" times stay fresh. Readers merge the rows
//! with their own view (per agent: the latest time it was seen, the highest
//! bundle it acknowledged anywhere). Rows not
//! rewritten for an hour (servers that went away) are ignored, and deleted
//! by the next writer. With an embedded store there is one server and
//! nothing is written.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{RECENT_AGENT, ServerState};
use crate::registry::unix;
use crate::store::{Commit, Table};

/// How often a changed view is written.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// How often an unchanged view is rewritten (fresh "seen" times).
const REFRESH_EVERY: Duration = Duration::from_secs(300);

/// One agent as one server saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Sighting {
    /// The bundle sequence it applied.
    pub sequence: u64,
    /// SVIDs signed by a tainted authority it still held then.
    pub tainted_svids: u32,
    /// When it was last seen (seconds since the epoch).
    pub seen: u64,
}

/// One server's row.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    written_at: u64,
    agents: HashMap<String, Sighting>,
}

/// The sightings in the rows of the other servers of the cluster, fresher
/// than an hour; empty for an embedded store or when the store cannot be
/// read (the caller still has its own view).
pub(crate) fn others(state: &ServerState, now: SystemTime) -> HashMap<String, Sighting> {
    let store = state.registry.store();
    if store.changes().is_none() {
        return HashMap::new();
    }
    let rows = match store.scan(Table::Presence, b"", None, usize::MAX) {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the other servers' agents; counting this server's only");
            return HashMap::new();
        }
    };
    let horizon = unix(now).saturating_sub(RECENT_AGENT.as_secs());
    let mut merged: HashMap<String, Sighting> = HashMap::new();
    for (key, value) in rows {
        if key == state.server_id.as_bytes() {
            continue;
        }
        let Ok(report) = serde_json::from_slice::<Report>(&value) else {
            continue;
        };
        for (id, s) in report.agents.into_iter().filter(|(_, s)| s.seen >= horizon) {
            merge(&mut merged, id, s);
        }
    }
    merged
}

/// Adds a sighting of `id`: the agent was last seen at the latest of them,
/// has applied the highest bundle sequence any server heard of (an agent
/// that moved to another server may not acknowledge the same bundle again
/// there), and still holds the tainted SVIDs it reported with that
/// acknowledgement (the later report, for the same sequence).
pub(crate) fn merge(into: &mut HashMap<String, Sighting>, id: String, s: Sighting) {
    let Some(held) = into.get_mut(&id) else {
        into.insert(id, s);
        return;
    };
    if (s.sequence, s.seen) > (held.sequence, held.seen) {
        held.sequence = s.sequence;
        held.tainted_svids = s.tainted_svids;
    }
    held.seen = held.seen.max(s.seen);
}

/// Writes this server's row whenever its view changed (at most once a
/// second) and every few minutes regardless, until shutdown; then deletes
/// it. Only with a shared store.
pub(crate) async fn publish(state: Arc<ServerState>, mut shutdown: watch::Receiver<bool>) {
    if state.registry.store().changes().is_none() {
        return;
    }
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written = u64::MAX;
    let mut last_write = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        let generation = state.acks_generation.load(Ordering::Relaxed);
        let refresh = last_write.elapsed() >= REFRESH_EVERY;
        if generation == written && !refresh {
            continue;
        }
        let step = state.clone();
        let done = tokio::task::spawn_blocking(move || write(&step, refresh)).await;
        match done {
            Ok(Ok(())) => {
                written = generation;
                last_write = tokio::time::Instant::now();
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot share this server's agents; retrying"),
            Err(e) => tracing::warn!(error = %e, "presence task failed"),
        }
    }
    let store = state.registry.store().clone();
    let id = state.server_id.clone();
    let _ = tokio::task::spawn_blocking(move || {
        store.commit(Commit::new().delete(Table::Presence, id.into_bytes()))
    })
    .await;
}

/// When a row was written (read without the rest of it).
#[derive(Deserialize)]
struct Written {
    written_at: u64,
}

/// One write of this server's row; on a `refresh`, also drops the rows
/// nobody rewrote for an hour.
fn write(state: &ServerState, refresh: bool) -> Result<(), crate::store::StoreError> {
    let now = state.clock.now();
    let report = Report {
        written_at: unix(now),
        agents: state.own_sightings(now),
    };
    let value = serde_json::to_vec(&report).unwrap_or_default();
    let store = state.registry.store();
    let horizon = unix(now).saturating_sub(RECENT_AGENT.as_secs());
    let mut commit = Commit::new().put(Table::Presence, state.server_id.as_bytes().to_vec(), value);
    if refresh {
        for (key, value) in store.scan(Table::Presence, b"", None, usize::MAX)? {
            let stale =
                serde_json::from_slice::<Written>(&value).map_or(true, |r| r.written_at < horizon);
            if stale && key != state.server_id.as_bytes() {
                commit = commit.delete(Table::Presence, key);
            }
        }
    }
    store.commit(commit).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sightings_merge_to_the_latest_time_and_the_highest_bundle() {
        let s = |sequence, tainted_svids, seen| Sighting {
            sequence,
            tainted_svids,
            seen,
        };
        let mut m = HashMap::new();
        merge(&mut m, "a".into(), s(2, 5, 100));
        // Seen later by a server it did not acknowledge anything to.
        merge(&mut m, "a".into(), s(0, 0, 150));
        assert_eq!(m["a"], s(2, 5, 150));
        // A later report on the same bundle: fewer SVIDs left to re-issue.
        merge(&mut m, "a".into(), s(2, 1, 160));
        assert_eq!(m["a"], s(2, 1, 160));
        // An older report on an older bundle changes nothing.
        merge(&mut m, "a".into(), s(1, 9, 50));
        assert_eq!(m["a"], s(2, 1, 160));
        merge(&mut m, "b".into(), s(3, 0, 10));
        assert_eq!(m.len(), 2);
    }
}
