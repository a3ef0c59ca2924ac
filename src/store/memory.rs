//! The in-memory implementation of [`Store`], for tests and `sigil dev --ephemeral` use.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{
    Commit, Event, EventsSince, Kek, KeyValues, Store, StoreError, Table, decode_changes,
    encode_changes, evaluate_checks,
};

#[derive(Default)]
struct Inner {
    revision: u64,
    tables: [BTreeMap<Vec<u8>, Vec<u8>>; Table::ALL.len()],
    events: BTreeMap<u64, Vec<u8>>,
    compacted_through: u64,
}

/// A store that lives in memory only, with an ephemeral KEK.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    kek: Kek,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Result<Self, StoreError> {
        Ok(MemoryStore {
            inner: Mutex::new(Inner::default()),
            kek: Kek::ephemeral()?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied commit
        // (writes are applied after every check), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.lock().revision)
    }

    fn commit(&self, commit: Commit) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let checked = evaluate_checks(commit.checks(), inner.revision, |table, key| {
            Ok::<_, StoreError>(inner.tables[table.index()].get(key).cloned())
        })?;
        checked.map_err(StoreError::CheckFailed)?;
        if commit.writes().is_empty() {
            return Ok(inner.revision);
        }
        for w in commit.writes() {
            let table = &mut inner.tables[w.table.index()];
            match &w.value {
                Some(v) => table.insert(w.key.clone(), v.clone()),
                None => table.remove(&w.key),
            };
        }
        inner.revision += 1;
        let revision = inner.revision;
        inner
            .events
            .insert(revision, encode_changes(commit.writes()));
        Ok(revision)
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().tables[table.index()].get(key).cloned())
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KeyValues, StoreError> {
        let inner = self.lock();
        Ok(inner.tables[table.index()]
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| after.is_none_or(|a| k.as_slice() > a))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn events_since(&self, after: u64, limit: usize) -> Result<EventsSince, StoreError> {
        let inner = self.lock();
        if after < inner.compacted_through {
            return Ok(EventsSince::Compacted {
                oldest: inner.compacted_through + 1,
            });
        }
        let events: Result<Vec<Event>, StoreError> = inner
            .events
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(r, bytes)| decode_changes(*r, bytes))
            .collect();
        Ok(EventsSince::Events(events?))
    }

    fn compact_events(&self, through: u64) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if through > inner.compacted_through {
            inner.compacted_through = through;
            inner.events = inner.events.split_off(&through.saturating_add(1));
        }
        Ok(())
    }

    fn kek(&self) -> &Kek {
        &self.kek
    }
}
