//! The sled implementation of [`Store`]: one tree per table plus `meta` and
//! `events`; each commit is one multi-tree transaction, flushed before return.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
/// Written by health probes (a write that proves the disk takes writes).
const META_PROBE: &[u8] = b"health_probe";

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
    /// The highest acknowledged revision, also kept outside sled: a store that
    /// opens behind it lost acknowledged changes (damage sled's own recovery
    /// would silently roll back), and is refused.
    mark: Mutex<(std::fs::File, u64)>,
}

/// The high-water mark file beside the sled database.
const MARK_FILE: &str = "revision.mark";

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

/// A key range of one tree: (tree index, from (inclusive), to (exclusive;
/// `None` is the end)).
type Piece = (usize, Vec<u8>, Option<Vec<u8>>);

/// Reads every record of every tree on all cores; the first failure, as a
/// message that names the tree. Trees are split into key ranges (see
/// [`split`]), so one large tree does not leave a core idle.
fn read_everything(trees: &[Tree]) -> Option<String> {
    let unreadable = |tree: &Tree, e: sled::Error| {
        format!(
            "tree {:?} is unreadable (corrupt?): {e}; restore it from a backup",
            String::from_utf8_lossy(&tree.name())
        )
    };
    let mut pieces = Vec::new();
    for (i, tree) in trees.iter().enumerate() {
        if let Err(e) = split(tree, i, Vec::new(), None, 2, &mut pieces) {
            return Some(unreadable(tree, e));
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        let reads: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    use std::sync::atomic::Ordering::Relaxed;
                    while !failed.load(Relaxed) {
                        let (i, from, to) = pieces.get(next.fetch_add(1, Relaxed))?;
                        let mut range = match to {
                            Some(to) => trees[*i].range(from.as_slice()..to.as_slice()),
                            None => trees[*i].range(from.as_slice()..),
                        };
                        if let Some(e) = range.find_map(Result::err) {
                            failed.store(true, Relaxed);
                            return Some(unreadable(&trees[*i], e));
                        }
                    }
                    None
                })
            })
            .collect();
        reads.into_iter().fold(None, |first, r| {
            let r = r
                .join()
                .unwrap_or_else(|_| Some("reading the store panicked".into()));
            first.or(r)
        })
    })
}

/// Splits the keys of `tree` in `from..to` into ranges, `depth` times over:
/// all its keys share the prefix of its first and last key, so the byte
/// after that prefix divides them.
fn split(
    tree: &Tree,
    index: usize,
    from: Vec<u8>,
    to: Option<Vec<u8>>,
    depth: u32,
    out: &mut Vec<Piece>,
) -> Result<(), sled::Error> {
    let mut range = match &to {
        Some(to) => tree.range(from.as_slice()..to.as_slice()),
        None => tree.range(from.as_slice()..),
    };
    let (Some(first), Some(last)) = (range.next().transpose()?, range.next_back().transpose()?)
    else {
        // Empty, or a single key.
        out.push((index, from, to));
        return Ok(());
    };
    let (first, last) = (first.0, last.0);
    let common = first
        .iter()
        .zip(last.iter())
        .take_while(|(a, b)| a == b)
        .count();
    // `first` may be the prefix itself (a shorter key sorts first).
    let (low, Some(&high)) = (first.get(common).copied().unwrap_or(0), last.get(common)) else {
        out.push((index, from, to));
        return Ok(());
    };
    if depth == 0 {
        out.push((index, from, to));
        return Ok(());
    }
    // Bounds between the pieces: the prefix and a byte after `low`, at most
    // 16 pieces per level.
    let bound = |b: u8| [&first[..common], &[b]].concat();
    let step = usize::from(high - low).div_ceil(16).max(1);
    let mut start = from;
    for b in (usize::from(low) + step..=usize::from(high)).step_by(step) {
        let end = bound(u8::try_from(b).unwrap_or(u8::MAX));
        split(
            tree,
            index,
            std::mem::replace(&mut start, end.clone()),
            Some(end),
            depth - 1,
            out,
        )?;
    }
    split(tree, index, start, to, depth - 1, out)
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, refusing a newer schema or a
    /// KEK other than the one the store was created with.
    pub fn open(dir: &Path, kek: Kek) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, kek, None)
    }

    /// [`open`](Self::open), with sled's page cache limited to
    /// `cache_bytes` (sled's default, 1 GiB, when `None`). The cache is most
    /// of a large store's memory: after the read at open, a server with a
    /// million entries held about 1.3 GB with the default and 0.5 GB with
    /// 64 MiB.
    pub fn open_with_cache(
        dir: &Path,
        kek: Kek,
        cache_bytes: Option<u64>,
    ) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: dir.to_path_buf(),
            reason,
        };
        crate::runtime::files::private_dir(dir).map_err(|e| open_err(e.to_string()))?;
        // sled panics on some damaged files (a truncated log, for one): turn
        // that into an error that says what is wrong, not a crash.
        let started = std::time::Instant::now();
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut config = sled::Config::new().path(dir.join("db"));
            if let Some(bytes) = cache_bytes {
                config = config.cache_capacity(bytes);
            }
            let db = config.open()?;
            let mut trees = vec![db.open_tree("meta")?, db.open_tree("events")?];
            for table in Table::ALL {
                trees.push(db.open_tree(table.name())?);
            }
            Ok::<_, sled::Error>((db, trees))
        }));
        let (db, trees) = match opened {
            Ok(Ok(t)) => t,
            // sled holds an exclusive lock on its files while open.
            Ok(Err(sled::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock") =>
            {
                return Err(open_err(
                    "another sigil process is using this data directory (stop it, or give this one its own --data-dir)".into(),
                ));
            }
            Ok(Err(e)) => return Err(open_err(format!("cannot open (corrupt?): {e}"))),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown failure");
                return Err(open_err(format!(
                    "the store is damaged (truncated or corrupt) and cannot be opened: {what}; restore it from a backup"
                )));
            }
        };
        let recovered = started.elapsed();
        // Read everything once: a damaged record fails here, at start, rather
        // than later on a request while health says all is well.
        let unreadable = read_everything(&trees);
        if let Some(reason) = unreadable {
            return Err(open_err(reason));
        }
        tracing::info!(
            recovery_ms = recovered.as_millis(),
            verify_ms = (started.elapsed() - recovered).as_millis(),
            "store opened"
        );
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
        let revision = u64_of(trees[META].get(META_REVISION)?);
        let mark_path = dir.join(MARK_FILE);
        let marked = std::fs::read(&mark_path)
            .ok()
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        if revision < marked {
            return Err(open_err(format!(
                "the store is at revision {revision} but revision {marked} was acknowledged: acknowledged changes are missing (damaged or truncated files?). Restore from a backup; if you restored an older copy on purpose, delete {} and start again",
                mark_path.display()
            )));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&mark_path)
            .map_err(|e| open_err(format!("{}: {e}", mark_path.display())))?;
        let store = SledStore {
            db,
            trees,
            kek,
            path: dir.to_path_buf(),
            mark: Mutex::new((file, 0)),
        };
        store.record_mark(revision)?;
        Ok(store)
    }

    /// Opens `dir` with the KEK file at `kek_path` (created if absent).
    pub fn open_with_kek_file(dir: &Path, kek_path: &Path) -> Result<Self, StoreError> {
        Self::open(dir, Kek::load_or_create(kek_path)?)
    }

    /// Raises the high-water mark to `revision` (after the flush that made it
    /// durable, so the mark is never ahead of the data).
    fn record_mark(&self, revision: u64) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let mut mark = self.mark.lock().unwrap_or_else(|p| p.into_inner());
        if revision > mark.1 || mark.1 == 0 {
            mark.0
                .write_all_at(&revision.to_be_bytes(), 0)
                .map_err(|e| StoreError::Open {
                    path: self.path.join(MARK_FILE),
                    reason: e.to_string(),
                })?;
            mark.1 = revision;
        }
        Ok(())
    }

    fn tree(&self, table: Table) -> &Tree {
        &self.trees[FIRST_TABLE + table.index()]
    }
}

impl Store for SledStore {
    fn probe(&self) -> Result<(), StoreError> {
        // A real read and a real (flushed) write: a full disk or an I/O error
        // shows here, not only when an operator's change fails.
        let meta = &self.trees[META];
        meta.get(META_SCHEMA)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        meta.insert(META_PROBE, &now.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    fn size_on_disk(&self) -> Option<u64> {
        self.db.size_on_disk().ok()
    }

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
        self.record_mark(revision)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The ranges the store is read in cover every key exactly once, and a
    /// tree with varied keys is divided.
    #[test]
    fn split_ranges_cover_every_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .temporary(true)
            .path(dir.path())
            .open()
            .unwrap();
        let tree = db.open_tree("t").unwrap();
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for i in 0..3000u32 {
            keys.push(format!("p/spiffe://td/agent{}\0{i:08x}", i % 37).into_bytes());
            keys.push(format!("u/{:08x}", i.wrapping_mul(2_654_435_761)).into_bytes());
            keys.push(i.to_be_bytes().to_vec());
        }
        keys.push(Vec::new());
        keys.push(vec![0xff; 3]);
        for k in &keys {
            tree.insert(k, b"v").unwrap();
        }
        for depth in 0..3 {
            let mut pieces = Vec::new();
            split(&tree, 0, Vec::new(), None, depth, &mut pieces).unwrap();
            let mut seen: Vec<Vec<u8>> = Vec::new();
            for (_, from, to) in &pieces {
                let range = match to {
                    Some(to) => tree.range(from.as_slice()..to.as_slice()),
                    None => tree.range(from.as_slice()..),
                };
                seen.extend(range.map(|r| r.unwrap().0.to_vec()));
            }
            let mut want = keys.clone();
            want.sort();
            assert_eq!(seen, want, "depth {depth}");
            assert!(
                depth == 0 || pieces.len() > 2,
                "depth {depth}: {}",
                pieces.len()
            );
        }
        // Empty and single-key trees are one piece each.
        let empty = db.open_tree("e").unwrap();
        let mut pieces = Vec::new();
        split(&empty, 1, Vec::new(), None, 2, &mut pieces).unwrap();
        empty.insert(b"k", b"v").unwrap();
        split(&empty, 1, Vec::new(), None, 2, &mut pieces).unwrap();
        assert_eq!(pieces.len(), 2);
        assert_eq!(read_everything(&[tree, empty]), None);
    }
}
