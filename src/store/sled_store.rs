//! The sled implementation of [`Store`]: one tree per table plus `meta` and
//! `events`; each commit is one multi-tree transaction, flushed before return.

use std::ops::Bound;
use std::path::{Path, PathBuf};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::{Db, Tree};

use super::{
    Commit, EventsSince, Kek, KeyValues, SCHEMA_VERSION, Store, StoreError, Table, decode_changes,
    encode_changes, evaluate_checks, kek_check_value, verify_kek,
};

const META_SCHEMA: &[u8] = b"schema_version";
const META_REVISION: &[u8] = b"revision";
const META_KEK_CHECK: &[u8] = b"kek_check";
const META_COMPACTED: &[u8] = b"events_compacted_through";

// Tree order inside `trees`: meta, events, then `Table::ALL`.
const META: usize = 0;
const EVENTS: usize = 1;
const FIRST_TABLE: usize = 2;

/// A sled-backed store in a data directory.
pub struct SledStore {
    db: Db,
    trees: Vec<Tree>,
    kek: Kek,
    path: PathBuf,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn u64_of(bytes: Option<sled::IVec>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, refusing a newer schema or a
    /// KEK other than the one the store was created with.
    pub fn open(dir: &Path, kek: Kek) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: dir.to_path_buf(),
            reason,
        };
        crate::runtime::files::private_dir(dir).map_err(|e| open_err(e.to_string()))?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            .open()
            .map_err(|e| open_err(e.to_string()))?;
        let mut trees = vec![db.open_tree("meta")?, db.open_tree("events")?];
        for table in Table::ALL {
            trees.push(db.open_tree(table.name())?);
        }
        let meta = &trees[META];
        match meta.get(META_SCHEMA)? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| open_err("meta schema_version is corrupt".into()))?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
            None => {
                meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
            }
        }
        match meta.get(META_KEK_CHECK)? {
            Some(check) => verify_kek(&kek, &check)?,
            None => {
                meta.insert(META_KEK_CHECK, kek_check_value(&kek)?)?;
            }
        }
        db.flush()?;
        Ok(SledStore {
            db,
            trees,
            kek,
            path: dir.to_path_buf(),
        })
    }

    /// Opens `dir` with the KEK file at `kek_path` (created if absent).
    pub fn open_with_kek_file(dir: &Path, kek_path: &Path) -> Result<Self, StoreError> {
        Self::open(dir, Kek::load_or_create(kek_path)?)
    }

    fn tree(&self, table: Table) -> &Tree {
        &self.trees[FIRST_TABLE + table.index()]
    }
}

impl Store for SledStore {
    fn revision(&self) -> Result<u64, StoreError> {
        Ok(u64_of(self.trees[META].get(META_REVISION)?))
    }

    fn commit(&self, commit: Commit) -> Result<u64, StoreError> {
        let result = self.trees.as_slice().transaction(|t| {
            let revision = u64_of(t[META].get(META_REVISION)?);
            let checked = evaluate_checks(commit.checks(), revision, |table, key| {
                Ok::<_, ConflictableTransactionError<StoreError>>(
                    t[FIRST_TABLE + table.index()].get(key)?.map(|v| v.to_vec()),
                )
            })?;
            if let Err(failure) = checked {
                return Err(ConflictableTransactionError::Abort(
                    StoreError::CheckFailed(failure),
                ));
            }
            if commit.writes().is_empty() {
                return Ok(revision);
            }
            for w in commit.writes() {
                let tree = &t[FIRST_TABLE + w.table.index()];
                match &w.value {
                    Some(v) => tree.insert(w.key.as_slice(), v.as_slice())?,
                    None => tree.remove(w.key.as_slice())?,
                };
            }
            let next = revision + 1;
            t[META].insert(META_REVISION, &next.to_be_bytes())?;
            t[EVENTS].insert(&next.to_be_bytes(), encode_changes(commit.writes()))?;
            Ok(next)
        });
        let revision = match result {
            Ok(r) => r,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        // Durable before acknowledged.
        self.db.flush()?;
        Ok(revision)
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(table).get(key)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KeyValues, StoreError> {
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_vec()),
            _ => Bound::Included(prefix.to_vec()),
        };
        let mut out = Vec::new();
        for item in self.tree(table).range((start, Bound::Unbounded)) {
            let (k, v) = item?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn events_since(&self, after: u64, limit: usize) -> Result<EventsSince, StoreError> {
        let compacted = u64_of(self.trees[META].get(META_COMPACTED)?);
        if after < compacted {
            return Ok(EventsSince::Compacted {
                oldest: compacted + 1,
            });
        }
        let start = after.saturating_add(1).to_be_bytes();
        let mut events = Vec::new();
        for item in self.trees[EVENTS].range(start..).take(limit) {
            let (k, v) = item?;
            let revision = u64_of(Some(k));
            events.push(decode_changes(revision, &v)?);
        }
        Ok(EventsSince::Events(events))
    }

    fn compact_events(&self, through: u64) -> Result<(), StoreError> {
        let meta = &self.trees[META];
        let current = u64_of(meta.get(META_COMPACTED)?);
        if through <= current {
            return Ok(());
        }
        // Record the horizon first: a crash midway leaves extra events, never a gap.
        meta.insert(META_COMPACTED, &through.to_be_bytes())?;
        let events = &self.trees[EVENTS];
        for item in events.range(..=through.to_be_bytes()) {
            let (k, _) = item?;
            events.remove(k)?;
        }
        self.db.flush()?;
        Ok(())
    }

    fn kek(&self) -> &Kek {
        &self.kek
    }
}
