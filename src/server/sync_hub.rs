//! Routes each commit to the sync streams it concerns.
//!
//! One task reads the event log once per commit and hands each open
//! SyncEntries stream only what touches its agent: the IDs of its entries
//! that changed, a change to its own agent record (ban, evict, renewal), or a
//! bundle change (which concerns everyone). A change for one agent wakes that
//! agent's streams and no other, so a fleet of idle streams costs nothing per
//! commit.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::spiffe::SpiffeId;
use crate::store::{EventsSince, Store, Table};

/// Events read from the log per batch.
const BATCH: usize = 10_000;

/// What changed for one stream since it last looked.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// The log was read up to here when this was handed over (see
    /// [`SyncHub::route`] for why a batch is handed over whole).
    pub revision: u64,
    /// IDs of the agent's entries that were created, updated, moved or
    /// deleted (read their current state).
    pub entries: BTreeSet<String>,
    /// The trust bundle, a federated bundle or the authorities changed.
    pub bundle: bool,
    /// The agent's own record changed (check it again).
    pub agent: bool,
    /// The hub lost track (its log position was compacted away): send a
    /// fresh snapshot.
    pub resnapshot: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.entries.is_empty() && !self.bundle && !self.agent && !self.resnapshot
    }
}

/// One stream's mailbox.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until something is pending, then takes it.
    pub async fn next(&self) -> Pending {
        loop {
            let notified = self.notify.notified();
            {
                let mut p = self.lock();
                if !p.is_empty() {
                    crate::metrics::metrics().sync_wakeups.inc();
                    return std::mem::take(&mut *p);
                }
            }
            notified.await;
        }
    }
}

/// What one batch brings each stream it touches, by inbox address.
type Shares<'a> = HashMap<*const Inbox, (&'a Arc<Inbox>, Pending)>;

/// The open streams by agent ID.
#[derive(Debug, Default)]
pub(crate) struct SyncHub {
    streams: Mutex<HashMap<Vec<u8>, Vec<Arc<Inbox>>>>,
    /// The last revision routed that changed the authorities or a bundle
    /// (or after which the hub lost track): what the server's own view of
    /// the authorities follows when other servers share the store.
    bundle_changes: watch::Sender<u64>,
}

/// A registered stream; dropping it unregisters.
pub(crate) struct Subscription {
    hub: Arc<SyncHub>,
    agent: Vec<u8>,
    /// Where this stream's changes arrive.
    pub inbox: Arc<Inbox>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut streams = self.hub.lock();
        if let Some(list) = streams.get_mut(&self.agent) {
            list.retain(|i| !Arc::ptr_eq(i, &self.inbox));
            if list.is_empty() {
                streams.remove(&self.agent);
            }
        }
    }
}

impl SyncHub {
    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Vec<Arc<Inbox>>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a stream of `agent`. Register before reading the store's
    /// revision for the snapshot: every commit after that reaches the inbox.
    pub fn subscribe(self: &Arc<Self>, agent: &SpiffeId) -> Subscription {
        let inbox = Arc::new(Inbox::default());
        let key = agent.as_str().as_bytes().to_vec();
        self.lock()
            .entry(key.clone())
            .or_default()
            .push(inbox.clone());
        Subscription {
            hub: self.clone(),
            agent: key,
            inbox,
        }
    }

    /// Revisions at which the authorities or a bundle changed, as routed.
    pub fn bundle_changes(&self) -> watch::Receiver<u64> {
        self.bundle_changes.subscribe()
    }

    /// Hands one batch of events to the streams they concern. Each stream
    /// gets its share of the batch in one step, with the batch's revision: a
    /// stream that takes its inbox meanwhile sees all of it or none of it.
    /// (A stream skips a revision it has already sent, so a share handed
    /// over in parts would lose the later parts.)
    fn route(&self, events: &[crate::store::Event]) {
        let Some(revision) = events.last().map(|e| e.revision) else {
            return;
        };
        let streams = self.lock();
        // Each touched stream's share, by inbox address.
        let mut shares: Shares<'_> = HashMap::new();
        fn share<'s, 'a>(shares: &'s mut Shares<'a>, inbox: &'a Arc<Inbox>) -> &'s mut Pending {
            &mut shares
                .entry(Arc::as_ptr(inbox))
                .or_insert_with(|| (inbox, Pending::default()))
                .1
        }
        let mut everyone = false;
        for change in events.iter().flat_map(|e| &e.changes) {
            match change.table {
                Table::EntriesByParent => {
                    // `p/<parent>\0<entry id>`
                    let Some(rest) = change.key.strip_prefix(b"p/") else {
                        continue;
                    };
                    let Some(nul) = rest.iter().position(|b| *b == 0) else {
                        continue;
                    };
                    let (parent, id) = (&rest[..nul], &rest[nul + 1..]);
                    for inbox in streams.get(parent).into_iter().flatten() {
                        share(&mut shares, inbox)
                            .entries
                            .insert(String::from_utf8_lossy(id).into_owned());
                    }
                }
                Table::Agents => {
                    for inbox in streams.get(change.key.as_slice()).into_iter().flatten() {
                        share(&mut shares, inbox).agent = true;
                    }
                }
                Table::Bundle | Table::Authorities => everyone = true,
                Table::Entries | Table::JoinTokens | Table::Presence => {}
            }
        }
        if everyone {
            self.bundle_changes.send_replace(revision);
            for inbox in streams.values().flatten() {
                share(&mut shares, inbox).bundle = true;
            }
        }
        for (inbox, new) in shares.into_values() {
            let mut p = inbox.lock();
            p.entries.extend(new.entries);
            p.agent |= new.agent;
            p.bundle |= new.bundle;
            p.revision = p.revision.max(revision);
            drop(p);
            inbox.notify.notify_one();
        }
    }

    /// Tells every stream to start over from a snapshot.
    fn resnapshot_all(&self, revision: u64) {
        self.bundle_changes.send_replace(revision);
        for inbox in self.lock().values().flatten() {
            let mut p = inbox.lock();
            p.resnapshot = true;
            p.revision = p.revision.max(revision);
            drop(p);
            inbox.notify.notify_one();
        }
    }

    /// Follows the event log until shutdown. A read error is retried (never
    /// taken as "nothing changed for good", never as a deletion).
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        mut revisions: watch::Receiver<u64>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut retry = crate::runtime::backoff::Backoff::new(
            Duration::from_millis(50),
            Duration::from_secs(5),
        );
        let mut last = loop {
            match store.revision() {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(error = %e, "sync hub: reading the store revision");
                    tokio::time::sleep(retry.next_delay()).await;
                }
            }
        };
        loop {
            loop {
                match store.events_since(last, BATCH) {
                    Ok(EventsSince::Events(ev)) if ev.is_empty() => break,
                    Ok(EventsSince::Events(ev)) => {
                        self.route(&ev);
                        last = ev.last().map_or(last, |e| e.revision);
                        retry.reset();
                        // Caught up with what was announced: a later commit
                        // announces itself (saves a read of an empty tail).
                        if last >= *revisions.borrow() {
                            break;
                        }
                    }
                    Ok(EventsSince::Compacted { .. }) => match store.revision() {
                        Ok(now) => {
                            tracing::warn!(from = last, "sync hub fell behind compaction");
                            self.resnapshot_all(now);
                            last = now;
                        }
                        Err(e) => tracing::warn!(error = %e, "sync hub: reading the store"),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "sync hub: reading the event log; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(retry.next_delay()) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
            tokio::select! {
                changed = revisions.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::{Change, Event};

    fn agent(name: &str) -> SpiffeId {
        SpiffeId::new(&format!(
            "spiffe://example.org/sigil/agent/join_token/{name}"
        ))
        .unwrap()
    }

    fn event(revision: u64, changes: &[(Table, Vec<u8>)]) -> Event {
        Event {
            revision,
            changes: changes
                .iter()
                .map(|(table, key)| Change {
                    table: *table,
                    key: key.clone(),
                    deleted: false,
                })
                .collect(),
        }
    }

    fn take(s: &Subscription) -> Pending {
        std::mem::take(&mut *s.inbox.lock())
    }

    #[test]
    fn a_commit_reaches_only_the_streams_of_the_agents_it_concerns() {
        let hub = Arc::new(SyncHub::default());
        let (a, b) = (agent("a"), agent("b"));
        let (a1, a2, b1) = (hub.subscribe(&a), hub.subscribe(&a), hub.subscribe(&b));
        let index = |parent: &SpiffeId, id: &str| {
            let mut k = crate::registry::parent_prefix(parent);
            k.extend_from_slice(id.as_bytes());
            k
        };
        hub.route(&[
            event(
                5,
                &[
                    (Table::Entries, b"e1".to_vec()),
                    (Table::EntriesByParent, index(&a, "e1")),
                ],
            ),
            event(6, &[(Table::EntriesByParent, index(&a, "e2"))]),
        ]);
        for s in [&a1, &a2] {
            let p = take(s);
            assert_eq!(p.revision, 6);
            assert_eq!(p.entries.iter().collect::<Vec<_>>(), ["e1", "e2"]);
            assert!(!p.bundle && !p.agent && !p.resnapshot);
        }
        assert!(take(&b1).is_empty(), "b's stream was not touched");

        // The agent's own record (a ban, say) wakes only its streams.
        hub.route(&[event(7, &[(Table::Agents, b.as_str().as_bytes().to_vec())])]);
        assert!(take(&b1).agent);
        assert!(take(&a1).is_empty());

        // A bundle change concerns everyone.
        hub.route(&[event(8, &[(Table::Bundle, b"example.org".to_vec())])]);
        for s in [&a1, &a2, &b1] {
            let p = take(s);
            assert!(p.bundle && p.revision == 8);
        }

        // A closed stream leaves the hub; the last one takes its agent along.
        drop(b1);
        assert!(!hub.lock().contains_key(b.as_str().as_bytes()));
        drop(a1);
        assert_eq!(hub.lock()[a.as_str().as_bytes()].len(), 1);
        hub.resnapshot_all(9);
        assert!(take(&a2).resnapshot);
    }

    /// A stream may take its inbox at any moment, also while the hub is
    /// routing. It skips what carries a revision it has already sent (see
    /// `node::sync`), so every take must carry a newer revision than the
    /// take before it. An entry was once lost that way: handed over without
    /// its revision, or split from the rest of its commit.
    #[test]
    fn a_stream_taking_its_inbox_mid_route_skips_nothing() {
        let hub = Arc::new(SyncHub::default());
        let a = agent("a");
        let sub = hub.subscribe(&a);
        const N: u64 = 100_000;
        let router = {
            let hub = hub.clone();
            let a = a.clone();
            std::thread::spawn(move || {
                for revision in 1..=N {
                    // Three entries per commit, as a batch create makes.
                    let changes: Vec<_> = (0..3)
                        .map(|k| {
                            let mut key = crate::registry::parent_prefix(&a);
                            key.extend_from_slice(format!("{revision}-{k}").as_bytes());
                            (Table::EntriesByParent, key)
                        })
                        .collect();
                    hub.route(&[event(revision, &changes)]);
                }
            })
        };
        let (mut sent, mut last) = (0, 0);
        loop {
            // Finished before the take: then this take holds the rest.
            let finished = router.is_finished();
            let p = take(&sub);
            if finished && p.is_empty() {
                break;
            }
            if p.is_empty() {
                continue;
            }
            assert!(
                p.revision > last,
                "{:?} handed over at revision {} after revision {last} was sent: skipped",
                p.entries.first(),
                p.revision
            );
            for id in &p.entries {
                let at: u64 = id.split('-').next().unwrap().parse().unwrap();
                assert!(
                    at <= p.revision,
                    "{id} handed over at revision {}",
                    p.revision
                );
            }
            last = p.revision;
            sent += p.entries.len();
        }
        router.join().unwrap();
        assert_eq!(sent as u64, 3 * N, "every change was handed over once");
    }

    #[tokio::test]
    async fn a_pending_change_wakes_the_waiting_stream() {
        let hub = Arc::new(SyncHub::default());
        let a = agent("a");
        let s = hub.subscribe(&a);
        let mut key = crate::registry::parent_prefix(&a);
        key.extend_from_slice(b"e9");
        let waiting = {
            let inbox = s.inbox.clone();
            tokio::spawn(async move { inbox.next().await })
        };
        hub.route(&[event(3, &[(Table::EntriesByParent, key)])]);
        let p = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.entries.into_iter().collect::<Vec<_>>(), ["e9"]);
    }
}
