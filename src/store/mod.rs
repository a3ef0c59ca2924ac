//! Persistence. `Store` is a small transactional key-value interface with a
//! global revision and an event log, so a shared SQL backend can implement it
//! later. Every change goes through [`Store::commit`]: its checks (including
//! "the revision is still N") and writes apply atomically or not at all, so
//! callers never read-modify-write.
//!
//! CA private keys are sealed with AES-256-GCM under a key-encryption key
//! ([`Kek`]) before they reach any table.

mod memory;
mod pg_tls;
mod postgres;
mod seal;
mod sled_store;
mod temp_pg;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

pub use memory::MemoryStore;
pub use postgres::{PG_SCHEMA_VERSION, PostgresStore, check_datastore_url, redact};
pub use seal::{Kek, default_kek_path};
pub use sled_store::SledStore;
pub use temp_pg::TempPostgres;

use crate::x509::PrivateKey;

/// The on-disk schema this build writes and understands.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (locked, unreadable, corrupt).
    #[error("cannot open store at {path}: {reason}")]
    Open {
        /// The data directory.
        path: PathBuf,
        /// The underlying reason.
        reason: String,
    },
    /// Written by a newer Sigil.
    #[error(
        "store schema version {found} is newer than this build supports ({supported}); upgrade sigil"
    )]
    NewerSchema {
        /// Version found in `meta`.
        found: u32,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// The PostgreSQL datastore cannot be used.
    #[error("datastore {datastore}: {reason}")]
    Datastore {
        /// The datastore URL, password removed.
        datastore: String,
        /// Why.
        reason: String,
    },
    /// The datastore's schema is more than one version ahead of this build.
    #[error(
        "datastore schema version {found} is more than one version ahead of this build ({supported}); servers and schema must be within one version of each other: upgrade sigil"
    )]
    SchemaSkew {
        /// Version found in `sigil_schema`.
        found: u32,
        /// The version this build writes.
        supported: u32,
    },
    /// The KEK file is unusable.
    #[error("key-encryption key file {path}: {reason}")]
    Kek {
        /// The KEK file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The KEK is not the one this store was sealed with.
    #[error(
        "the key-encryption key from {kek} does not match this store (it was sealed with another KEK)"
    )]
    WrongKek {
        /// Where the KEK came from.
        kek: String,
    },
    /// A sealed value did not decrypt.
    #[error("cannot unseal {context} with the key-encryption key from {kek}")]
    Unseal {
        /// What was being unsealed.
        context: String,
        /// Where the KEK came from.
        kek: String,
    },
    /// A commit check did not hold; nothing was written.
    #[error("commit refused: {0}")]
    CheckFailed(CheckFailure),
    /// A stored value could not be decoded.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// What was being decoded.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// Random generation or AEAD failure.
    #[error("crypto failure: {0}")]
    Crypto(String),
    /// The backend failed.
    #[error("storage backend error: {0}")]
    Backend(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// Which check of a commit failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckFailure {
    /// The key was expected to exist.
    #[error("{table:?} key {key:?} does not exist")]
    Missing {
        /// Table.
        table: Table,
        /// Key (lossy UTF-8).
        key: String,
    },
    /// The key was expected to be absent.
    #[error("{table:?} key {key:?} already exists")]
    Exists {
        /// Table.
        table: Table,
        /// Key (lossy UTF-8).
        key: String,
    },
    /// The key no longer holds the value the caller read.
    #[error("{table:?} key {key:?} changed since it was read")]
    Changed {
        /// Table.
        table: Table,
        /// Key (lossy UTF-8).
        key: String,
    },
    /// The store moved past the expected revision.
    #[error("revision is {actual}, expected {expected}")]
    Revision {
        /// The revision the caller read.
        expected: u64,
        /// The current revision.
        actual: u64,
    },
}

/// Key-value pairs returned by a scan, in key order.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// Moves a revision watch forward to `to` (never back); tells watchers only
/// when it moved.
pub fn advance(revisions: &tokio::sync::watch::Sender<u64>, to: u64) {
    revisions.send_if_modified(|seen| {
        let newer = to > *seen;
        if newer {
            *seen = to;
        }
        newer
    });
}

/// The tables of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Registration entries by ID.
    Entries,
    /// Index: parent ID + entry ID → empty.
    EntriesByParent,
    /// Attested agents by SPIFFE ID.
    Agents,
    /// Join tokens by token hash.
    JoinTokens,
    /// The trust bundle and its sequence.
    Bundle,
    /// Sealed CA authorities by ID (write only through [`Store::put_authority`]).
    Authorities,
    /// What each server of a cluster knows of its agents (which bundle they
    /// applied), by server: so any server can report on the whole fleet.
    Presence,
}

impl Table {
    /// Every table, in a fixed order (the sled tree order).
    pub const ALL: [Table; 7] = [
        Table::Entries,
        Table::EntriesByParent,
        Table::Agents,
        Table::JoinTokens,
        Table::Bundle,
        Table::Authorities,
        Table::Presence,
    ];

    /// The table's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Table::Entries => "entries",
            Table::EntriesByParent => "entries_by_parent",
            Table::Agents => "agents",
            Table::JoinTokens => "join_tokens",
            Table::Bundle => "bundle",
            Table::Authorities => "authorities",
            Table::Presence => "presence",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn from_index(i: u8) -> Option<Table> {
        Table::ALL.get(usize::from(i)).copied()
    }
}

/// One precondition of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The key must exist.
    Exists(Table, Vec<u8>),
    /// The key must not exist.
    Absent(Table, Vec<u8>),
    /// The key must hold exactly this value (compare-and-swap on one key).
    Equals(Table, Vec<u8>, Vec<u8>),
    /// The global revision must still be this.
    Revision(u64),
}

/// One write of a commit; `value: None` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// Table.
    pub table: Table,
    /// Key.
    pub key: Vec<u8>,
    /// New value, or `None` to delete.
    pub value: Option<Vec<u8>>,
}

/// An atomic unit of change: every check holds and every write lands, or nothing does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    checks: Vec<Check>,
    writes: Vec<Write>,
}

impl Commit {
    /// An empty commit.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets `key` to `value`.
    pub fn put(mut self, table: Table, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        self.writes.push(Write {
            table,
            key: key.into(),
            value: Some(value.into()),
        });
        self
    }
    /// Deletes `key`.
    pub fn delete(mut self, table: Table, key: impl Into<Vec<u8>>) -> Self {
        self.writes.push(Write {
            table,
            key: key.into(),
            value: None,
        });
        self
    }
    /// Requires `key` to exist.
    pub fn require_exists(mut self, table: Table, key: impl Into<Vec<u8>>) -> Self {
        self.checks.push(Check::Exists(table, key.into()));
        self
    }
    /// Requires `key` to be absent.
    pub fn require_absent(mut self, table: Table, key: impl Into<Vec<u8>>) -> Self {
        self.checks.push(Check::Absent(table, key.into()));
        self
    }
    /// Requires `key` to still hold `value`.
    pub fn require_equals(
        mut self,
        table: Table,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Self {
        self.checks
            .push(Check::Equals(table, key.into(), value.into()));
        self
    }
    /// Requires the store to still be at `revision`.
    pub fn at_revision(mut self, revision: u64) -> Self {
        self.checks.push(Check::Revision(revision));
        self
    }
    /// The checks.
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }
    /// The writes.
    pub fn writes(&self) -> &[Write] {
        &self.writes
    }
}

/// One changed key, as recorded in the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Table.
    pub table: Table,
    /// Key.
    pub key: Vec<u8>,
    /// True if the key was deleted (else it was set; read its current value).
    pub deleted: bool,
}

/// The changes of one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The revision the commit produced.
    pub revision: u64,
    /// What it changed.
    pub changes: Vec<Change>,
}

/// The answer to "what changed after revision N?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsSince {
    /// The events, oldest first (at most the limit asked for).
    Events(Vec<Event>),
    /// The log no longer reaches back that far: resync from a snapshot.
    Compacted {
        /// The oldest revision still in the log.
        oldest: u64,
    },
}

/// Encodes the changes of an event compactly: `table u8 | deleted u8 | len u32 | key`.
fn encode_changes(writes: &[Write]) -> Vec<u8> {
    let mut out = Vec::new();
    for w in writes {
        out.push(w.table as u8);
        out.push(u8::from(w.value.is_none()));
        out.extend_from_slice(&(w.key.len() as u32).to_be_bytes());
        out.extend_from_slice(&w.key);
    }
    out
}

fn decode_changes(revision: u64, mut bytes: &[u8]) -> Result<Event, StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: format!("event {revision}"),
        reason: "truncated or unknown table".into(),
    };
    let mut changes = Vec::new();
    while !bytes.is_empty() {
        let [t, d, l0, l1, l2, l3, rest @ ..] = bytes else {
            return Err(corrupt());
        };
        let len = u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize;
        let key = rest.get(..len).ok_or_else(corrupt)?;
        changes.push(Change {
            table: Table::from_index(*t).ok_or_else(corrupt)?,
            key: key.to_vec(),
            deleted: *d == 1,
        });
        bytes = &rest[len..];
    }
    Ok(Event { revision, changes })
}

/// What kind of key an authority holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Zeroize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityKind {
    /// Signs X509-SVIDs.
    X509,
    /// Signs JWT-SVIDs.
    Jwt,
}

/// Where an authority is in its life (prepare → activate → retire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Zeroize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// Retired from signing, still trusted until it expires.
    Old,
    /// Marked compromised: replace what it signed.
    Tainted,
    /// Removed from the bundle.
    Revoked,
}

/// A CA authority as the store keeps it (sealed as a whole at rest).
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorityRecord {
    /// The authority ID (SKI hex for X.509, kid for JWT).
    pub id: String,
    /// X.509 or JWT.
    pub kind: AuthorityKind,
    /// Lifecycle state.
    pub state: SlotState,
    /// The certificate, DER (X.509 authorities only).
    pub cert_der: Option<Vec<u8>>,
    /// Expiry, seconds since the epoch.
    pub not_after: u64,
    /// The private key.
    pub key: PrivateKey,
    /// When an upstream authority signed this one: the certificates between
    /// it and a root, nearest first.
    pub upstream_chain: Vec<Vec<u8>>,
    /// When an upstream authority signed this one: the roots it publishes
    /// (empty for a self-signed authority).
    pub upstream_roots: Vec<Vec<u8>>,
}

/// The plaintext form of a sealed record; wiped when dropped.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct SealedForm {
    id: String,
    kind: AuthorityKind,
    state: SlotState,
    cert_der: Option<Vec<u8>>,
    not_after: u64,
    key_pkcs8: Vec<u8>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    upstream_chain: Vec<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    upstream_roots: Vec<Vec<u8>>,
}

impl AuthorityRecord {
    fn context(id: &str) -> Vec<u8> {
        format!("authority:{id}").into_bytes()
    }

    fn seal(&self, kek: &Kek) -> Result<Vec<u8>, StoreError> {
        let form = SealedForm {
            id: self.id.clone(),
            kind: self.kind,
            state: self.state,
            cert_der: self.cert_der.clone(),
            not_after: self.not_after,
            key_pkcs8: self.key.pkcs8_der().to_vec(),
            upstream_chain: self.upstream_chain.clone(),
            upstream_roots: self.upstream_roots.clone(),
        };
        let plain = zeroize::Zeroizing::new(
            serde_json::to_vec(&form).map_err(|e| StoreError::Crypto(e.to_string()))?,
        );
        kek.seal(&Self::context(&self.id), &plain)
    }

    fn unseal(kek: &Kek, id: &[u8], sealed: &[u8]) -> Result<Self, StoreError> {
        let id = String::from_utf8_lossy(id).into_owned();
        let plain = kek.open(&Self::context(&id), sealed)?;
        let corrupt = |reason: String| StoreError::Corrupt {
            what: format!("authority {id}"),
            reason,
        };
        let form: SealedForm =
            serde_json::from_slice(&plain).map_err(|e| corrupt(e.to_string()))?;
        let key =
            PrivateKey::from_pkcs8_der(&form.key_pkcs8).map_err(|e| corrupt(e.to_string()))?;
        Ok(AuthorityRecord {
            id: form.id.clone(),
            kind: form.kind,
            state: form.state,
            cert_der: form.cert_der.clone(),
            not_after: form.not_after,
            key,
            upstream_chain: form.upstream_chain.clone(),
            upstream_roots: form.upstream_roots.clone(),
        })
    }
}

/// The persistence interface. Implementations must make every acknowledged
/// commit durable before returning.
pub trait Store: Send + Sync {
    /// The current global revision (0 for a new store).
    fn revision(&self) -> Result<u64, StoreError>;

    /// Applies `commit` atomically and returns the new revision. An empty
    /// commit (no writes) only evaluates its checks and returns the current
    /// revision.
    fn commit(&self, commit: Commit) -> Result<u64, StoreError>;

    /// Reads one key.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Reads several keys, answering in the same order. The default reads
    /// them one by one; a store across a network reads them in one trip.
    fn get_many(&self, table: Table, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|k| self.get(table, k)).collect()
    }

    /// Reads up to `limit` keys starting with `prefix`, in key order,
    /// strictly after `after` when given (for paging).
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KeyValues, StoreError>;

    /// Events with revision > `after`, oldest first, at most `limit`.
    fn events_since(&self, after: u64, limit: usize) -> Result<EventsSince, StoreError>;

    /// Bytes on disk, when the backend knows (metrics).
    fn size_on_disk(&self) -> Option<u64> {
        None
    }

    /// Checks the store can be read and written now (health). The default
    /// reads the revision.
    fn probe(&self) -> Result<(), StoreError> {
        self.revision().map(|_| ())
    }

    /// Revisions committed by anyone sharing this store (other servers of a
    /// cluster), for a store that is shared; `None` for an embedded one,
    /// whose only writer is this process.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Whether this process holds the cluster-wide lease `name`, taking it
    /// if it is free. A lease is held until the process (or its datastore
    /// session) ends. An embedded store has one server: always true.
    fn try_lease(&self, _name: &str) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Drops events with revision ≤ `through`.
    fn compact_events(&self, through: u64) -> Result<(), StoreError>;

    /// The key-encryption key authorities are sealed with.
    fn kek(&self) -> &Kek;

    /// Seals and stores an authority (insert or replace); durable on return.
    fn put_authority(&self, record: &AuthorityRecord) -> Result<u64, StoreError> {
        let sealed = record.seal(self.kek())?;
        self.commit(Commit::new().put(Table::Authorities, record.id.as_bytes(), sealed))
    }

    /// Removes an authority.
    fn delete_authority(&self, id: &str) -> Result<u64, StoreError> {
        self.commit(Commit::new().delete(Table::Authorities, id.as_bytes()))
    }

    /// Every authority with its stored bytes, for compare-and-swap transitions.
    fn authorities_raw(&self) -> Result<Vec<(AuthorityRecord, Vec<u8>)>, StoreError> {
        self.scan(Table::Authorities, b"", None, usize::MAX)?
            .into_iter()
            .map(|(k, v)| AuthorityRecord::unseal(self.kek(), &k, &v).map(|r| (r, v)))
            .collect()
    }

    /// `record` sealed as it is stored, to write in a commit.
    fn seal_authority(&self, record: &AuthorityRecord) -> Result<Vec<u8>, StoreError> {
        record.seal(self.kek())
    }

    /// Every stored authority, unsealed.
    fn authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError> {
        self.scan(Table::Authorities, b"", None, usize::MAX)?
            .into_iter()
            .map(|(k, v)| AuthorityRecord::unseal(self.kek(), &k, &v))
            .collect()
    }
}

/// The KEK check value stored in `meta`, proving which KEK sealed this store.
const KEK_CHECK_CONTEXT: &[u8] = b"kek-check";
const KEK_CHECK_PLAINTEXT: &[u8] = b"sigil key-encryption key check";

fn kek_check_value(kek: &Kek) -> Result<Vec<u8>, StoreError> {
    kek.seal(KEK_CHECK_CONTEXT, KEK_CHECK_PLAINTEXT)
}

fn verify_kek(kek: &Kek, stored: &[u8]) -> Result<(), StoreError> {
    match kek.open(KEK_CHECK_CONTEXT, stored) {
        Ok(p) if p.as_slice() == KEK_CHECK_PLAINTEXT => Ok(()),
        _ => Err(StoreError::WrongKek {
            kek: kek.source().to_string(),
        }),
    }
}

fn check_failure_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

#[cfg(test)]
mod tests;

/// Evaluates a commit's checks against the current revision and a key-existence
/// lookup. Shared by every backend so they agree on semantics.
fn evaluate_checks<E>(
    checks: &[Check],
    revision: u64,
    mut get: impl FnMut(Table, &[u8]) -> Result<Option<Vec<u8>>, E>,
) -> Result<Result<(), CheckFailure>, E> {
    for check in checks {
        let failure = match check {
            Check::Revision(expected) if *expected != revision => Some(CheckFailure::Revision {
                expected: *expected,
                actual: revision,
            }),
            Check::Exists(table, key) if get(*table, key)?.is_none() => {
                Some(CheckFailure::Missing {
                    table: *table,
                    key: check_failure_key(key),
                })
            }
            Check::Absent(table, key) if get(*table, key)?.is_some() => {
                Some(CheckFailure::Exists {
                    table: *table,
                    key: check_failure_key(key),
                })
            }
            Check::Equals(table, key, value) if get(*table, key)?.as_ref() != Some(value) => {
                Some(CheckFailure::Changed {
                    table: *table,
                    key: check_failure_key(key),
                })
            }
            _ => None,
        };
        if let Some(f) = failure {
            return Ok(Err(f));
        }
    }
    Ok(Ok(()))
}
