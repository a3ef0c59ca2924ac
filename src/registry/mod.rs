//! The registry: registration entries, attested agents and join tokens, with
//! their validation and the authorization rules (who may get what). State
//! lives in the [`Store`]; every mutation is one atomic commit.

mod bundles;
mod entry;

pub use bundles::BundleError;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use entry::{Entry, EntryError, EntryParams, EntryValidation, MAX_HINT_LEN, SERVER_DNS_NAME};

use crate::spiffe::{Selector, SpiffeId, TrustDomain};
use crate::store::{CheckFailure, Commit, Store, StoreError, Table};

/// Why a registry operation failed, grouped by fault: the caller's input,
/// a missing or conflicting object, or the store.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A field is invalid; the message names it.
    #[error(transparent)]
    Invalid(#[from] EntryError),
    /// No such entry.
    #[error("entry {0:?} not found")]
    EntryNotFound(String),
    /// An identical entry (same SPIFFE ID, parent and selectors) exists.
    #[error("an entry with the same spiffe_id, parent_id and selectors already exists: {0}")]
    DuplicateEntry(String),
    /// No such agent.
    #[error("agent {0:?} not found")]
    AgentNotFound(String),
    /// A join token is unknown, used or expired (deliberately not saying which).
    #[error("join token is invalid, already used or expired")]
    BadToken,
    /// The agent is banned: nothing may change its record but an evict.
    #[error("agent {0} is banned")]
    AgentBanned(String),
    /// The agent's record changed (banned, evicted, renewed or re-attested)
    /// between reading it and writing it back; nothing was written.
    #[error("agent {0}'s record changed concurrently (banned, evicted or renewed); try again")]
    AgentChanged(String),
    /// A join token TTL of zero.
    #[error("ttl must be greater than zero")]
    ZeroTokenTtl,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record does not decode.
    #[error("corrupt {what} record: {reason}")]
    Corrupt {
        /// Which record.
        what: String,
        /// Why.
        reason: String,
    },
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// `spiffe://<td>/sigil/agent/<attestor>/<id>`.
    pub spiffe_id: SpiffeId,
    /// `join_token` or `x509pop`.
    pub attestor: String,
    /// Node selectors from attestation.
    pub selectors: Vec<Selector>,
    /// When it first attested (seconds since the epoch).
    pub attested_at: u64,
    /// Expiry of its current SVID.
    pub svid_expires_at: u64,
    /// Hex serial of its current SVID.
    pub svid_serial: String,
    /// Refused at once when true.
    pub banned: bool,
    /// The serial the last renewal superseded: still accepted until the agent
    /// first presents the new one, and never after `previous_until`.
    #[serde(default)]
    pub previous_serial: String,
    /// When the previous serial stops being accepted (seconds since the epoch).
    #[serde(default)]
    pub previous_until: u64,
}

impl AgentRecord {
    /// Whether an SVID with `serial` may act for this agent at `now` (seconds).
    pub fn accepts_serial(&self, serial: &str, now: u64) -> bool {
        serial == self.svid_serial
            || (!self.previous_serial.is_empty()
                && serial == self.previous_serial
                && now < self.previous_until)
    }
}

/// An agent's record as read, with its exact stored bytes for a compare-and-swap.
#[derive(Debug, Clone)]
pub struct AgentSnapshot {
    id: SpiffeId,
    /// The record, if the agent is known.
    pub record: Option<AgentRecord>,
    raw: Option<Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
struct TokenRecord {
    expires_at: u64,
    agent_id: SpiffeId,
}

/// A freshly generated join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The secret the agent presents (printed once, never stored in clear).
    pub token: String,
    /// The agent ID it will attest as.
    pub agent_id: SpiffeId,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 in hex, e.g. for token keys and certificate fingerprints.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest(&SHA256, data).as_ref())
}

fn random_token() -> Result<String, RegistryError> {
    Ok(hex(&random_bytes(16)?))
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Records are plain strings and numbers; serialization cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Key of the parent index: `p/<parent>\0<entry id>`.
fn parent_key(parent: &SpiffeId, entry_id: &str) -> Vec<u8> {
    format!("p/{parent}\0{entry_id}").into_bytes()
}

/// The parent index prefix of `parent`'s entries.
pub fn parent_prefix(parent: &SpiffeId) -> Vec<u8> {
    format!("p/{parent}\0").into_bytes()
}

/// Key of the uniqueness marker: `u/<sha256 of id, parent, selectors>`.
fn unique_key(e: &Entry) -> Vec<u8> {
    let mut material = format!("{}\n{}", e.spiffe_id, e.parent_id);
    for s in &e.selectors {
        material.push('\n');
        material.push_str(s.as_str());
    }
    format!("u/{}", sha256_hex(material.as_bytes())).into_bytes()
}

/// The registry over a store. Every commit it makes is announced on a
/// `watch` channel of the store revision, which push streams subscribe to.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    trust_domain: TrustDomain,
    validation: EntryValidation,
    revisions: Arc<watch::Sender<u64>>,
}

impl Registry {
    /// The bounds entries are validated against.
    pub fn validation(&self) -> &EntryValidation {
        &self.validation
    }

    /// A registry over `store` for `trust_domain`.
    pub fn new(
        store: Arc<dyn Store>,
        trust_domain: TrustDomain,
        validation: EntryValidation,
    ) -> Self {
        let revision = store.revision().unwrap_or(0);
        Registry {
            store,
            trust_domain,
            validation,
            revisions: Arc::new(watch::Sender::new(revision)),
        }
    }

    /// A receiver that sees the store revision after every registry commit.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    /// Wakes subscribers after a commit made outside the registry (the CA's
    /// authority transitions, which change the bundle agents sync).
    pub fn notify_committed(&self) {
        if let Ok(revision) = self.store.revision() {
            self.notify_revision(revision);
        }
    }

    /// Announces `revision`, known to be committed (by another server of a
    /// cluster), if it is newer than the last one announced.
    pub fn notify_revision(&self, revision: u64) {
        crate::store::advance(&self.revisions, revision);
    }

    fn commit(&self, commit: Commit) -> Result<u64, StoreError> {
        let revision = self.store.commit(commit)?;
        self.notify_revision(revision);
        Ok(revision)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The agent ID for an attestor and a node ID.
    pub fn agent_id(&self, attestor: &str, node: &str) -> Result<SpiffeId, RegistryError> {
        self.trust_domain
            .id_with_path(&format!("sigil/agent/{attestor}/{node}"))
            .map_err(|e| {
                RegistryError::Invalid(EntryError::SpiffeId {
                    field: "agent_id",
                    source: e,
                })
            })
    }

    /// Creates an entry and returns it with its new ID.
    pub fn create_entry(
        &self,
        params: EntryParams,
        now: SystemTime,
    ) -> Result<Entry, RegistryError> {
        let mut created = self.create_entries(vec![params], now)?;
        created
            .pop()
            .ok_or_else(|| RegistryError::EntryNotFound("(just created)".into()))
    }

    /// Creates several entries in one atomic commit: all of them, or none
    /// when any is invalid or a duplicate.
    pub fn create_entries(
        &self,
        params: Vec<EntryParams>,
        now: SystemTime,
    ) -> Result<Vec<Entry>, RegistryError> {
        let mut commit = Commit::new();
        let mut entries = Vec::with_capacity(params.len());
        let mut uniques = std::collections::HashSet::new();
        let micros = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        for (i, p) in params.into_iter().enumerate() {
            let mut entry = p.validate(&self.trust_domain, &self.validation)?;
            entry.id = random_token()?;
            // The batch position keeps entries of one batch in their given order.
            entry.created_at_micros = micros.saturating_add(i as u64);
            let unique = unique_key(&entry);
            if !uniques.insert(unique.clone()) {
                return Err(RegistryError::DuplicateEntry(entry.spiffe_id.to_string()));
            }
            commit = commit
                .require_absent(Table::EntriesByParent, unique.clone())
                .put(Table::Entries, entry.id.as_bytes(), encode(&entry))
                .put(
                    Table::EntriesByParent,
                    parent_key(&entry.parent_id, &entry.id),
                    Vec::new(),
                )
                .put(Table::EntriesByParent, unique, entry.id.as_bytes());
            entries.push(entry);
        }
        match self.commit(commit) {
            Ok(_) => Ok(entries),
            Err(StoreError::CheckFailed(CheckFailure::Exists { key, .. })) => {
                let dup = entries
                    .iter()
                    .find(|e| String::from_utf8_lossy(&unique_key(e)) == key)
                    .map_or_else(|| key.clone(), |e| e.spiffe_id.to_string());
                Err(RegistryError::DuplicateEntry(dup))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces an entry's fields (the ID stays).
    pub fn update_entry(&self, id: &str, params: EntryParams) -> Result<Entry, RegistryError> {
        let validated = params.validate(&self.trust_domain, &self.validation)?;
        // The index keys depend on the old entry: commit only if the entry
        // still holds what we read (compare-and-swap on its value), retrying
        // if a concurrent update got there first.
        for _ in 0..8 {
            let (old, old_bytes) = self.entry_with_bytes(id)?;
            let mut entry = validated.clone();
            entry.id = old.id.clone();
            entry.created_at_micros = old.created_at_micros;
            let old_unique = unique_key(&old);
            let new_unique = unique_key(&entry);
            let mut commit = Commit::new()
                .require_equals(Table::Entries, id.as_bytes(), old_bytes)
                .delete(Table::EntriesByParent, parent_key(&old.parent_id, id))
                .put(Table::Entries, id.as_bytes(), encode(&entry))
                .put(
                    Table::EntriesByParent,
                    parent_key(&entry.parent_id, id),
                    Vec::new(),
                );
            if old_unique != new_unique {
                commit = commit
                    .require_absent(Table::EntriesByParent, new_unique.clone())
                    .delete(Table::EntriesByParent, old_unique)
                    .put(Table::EntriesByParent, new_unique, id.as_bytes());
            }
            match self.commit(commit) {
                Ok(_) => return Ok(entry),
                Err(StoreError::CheckFailed(CheckFailure::Exists { .. })) => {
                    return Err(RegistryError::DuplicateEntry(entry.spiffe_id.to_string()));
                }
                Err(StoreError::CheckFailed(CheckFailure::Changed { .. })) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RegistryError::Store(StoreError::Backend(
            "entry update kept conflicting with concurrent updates of the same entry; retry".into(),
        )))
    }

    fn entry_with_bytes(&self, id: &str) -> Result<(Entry, Vec<u8>), RegistryError> {
        let bytes = self
            .store
            .get(Table::Entries, id.as_bytes())?
            .ok_or_else(|| RegistryError::EntryNotFound(id.to_string()))?;
        Ok((decode(&format!("entry {id}"), &bytes)?, bytes))
    }

    /// Deletes an entry.
    pub fn delete_entry(&self, id: &str) -> Result<Entry, RegistryError> {
        for _ in 0..8 {
            let (old, old_bytes) = self.entry_with_bytes(id)?;
            let commit = Commit::new()
                .require_equals(Table::Entries, id.as_bytes(), old_bytes)
                .delete(Table::Entries, id.as_bytes())
                .delete(Table::EntriesByParent, parent_key(&old.parent_id, id))
                .delete(Table::EntriesByParent, unique_key(&old));
            match self.commit(commit) {
                Ok(_) => return Ok(old),
                Err(StoreError::CheckFailed(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RegistryError::Store(StoreError::Backend(
            "entry delete kept conflicting with concurrent updates of the same entry; retry".into(),
        )))
    }

    /// One entry by ID.
    pub fn entry(&self, id: &str) -> Result<Option<Entry>, RegistryError> {
        self.store
            .get(Table::Entries, id.as_bytes())?
            .map(|b| decode(&format!("entry {id}"), &b))
            .transpose()
    }

    /// Several entries by ID, in the same order (`None` where there is
    /// none), read together.
    pub fn entries(&self, ids: &[&str]) -> Result<Vec<Option<Entry>>, RegistryError> {
        let keys: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes()).collect();
        self.store
            .get_many(Table::Entries, &keys)?
            .into_iter()
            .zip(ids)
            .map(|(b, id)| b.map(|b| decode(&format!("entry {id}"), &b)).transpose())
            .collect()
    }

    /// Up to `limit` entries parented to `parent`, after entry ID `after` (paging).
    pub fn entries_by_parent(
        &self,
        parent: &SpiffeId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, RegistryError> {
        let prefix = parent_prefix(parent);
        let after_key = after.map(|a| parent_key(parent, a));
        let keys = self
            .store
            .scan(Table::EntriesByParent, &prefix, after_key.as_deref(), limit)?;
        let ids: Vec<String> = keys
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        Ok(self.entries(&ids)?.into_iter().flatten().collect())
    }

    /// Up to `limit` entries matching the filters (every entry when none is
    /// given), in entry-ID order after `after`, and whether more may follow.
    pub fn list_entries(
        &self,
        spiffe_id: Option<&SpiffeId>,
        parent_id: Option<&SpiffeId>,
        selector: Option<&Selector>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Entry>, bool), RegistryError> {
        let wanted = |e: &Entry| {
            spiffe_id.is_none_or(|id| &e.spiffe_id == id)
                && selector.is_none_or(|s| e.selectors.contains(s))
        };
        let mut out = Vec::new();
        let mut cursor = after.map(str::to_string);
        // Scan in batches: filters may skip many entries between matches.
        let batch = limit.clamp(1, 1000);
        loop {
            let scanned: Vec<Entry> = match parent_id {
                Some(p) => self.entries_by_parent(p, cursor.as_deref(), batch)?,
                None => self
                    .store
                    .scan(
                        Table::Entries,
                        b"",
                        cursor.as_deref().map(str::as_bytes),
                        batch,
                    )?
                    .into_iter()
                    .map(|(k, v)| decode(&format!("entry {}", String::from_utf8_lossy(&k)), &v))
                    .collect::<Result<_, _>>()?,
            };
            let exhausted = scanned.len() < batch;
            for e in scanned {
                cursor = Some(e.id.clone());
                if wanted(&e) {
                    out.push(e);
                    if out.len() == limit {
                        return Ok((out, true));
                    }
                }
            }
            if exhausted {
                return Ok((out, false));
            }
        }
    }

    /// Generates a single-use join token valid for `ttl`.
    pub fn generate_token(
        &self,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<JoinToken, RegistryError> {
        if ttl.is_zero() {
            return Err(RegistryError::ZeroTokenTtl);
        }
        let token = random_token()?;
        let hash = sha256_hex(token.as_bytes());
        let agent_id = self.agent_id("join_token", &hash[..32])?;
        let expires_at = unix(now.checked_add(ttl).ok_or(RegistryError::ZeroTokenTtl)?);
        let record = TokenRecord {
            expires_at,
            agent_id: agent_id.clone(),
        };
        self.commit(Commit::new().put(Table::JoinTokens, hash.as_bytes(), encode(&record)))?;
        Ok(JoinToken {
            token,
            agent_id,
            expires_at,
        })
    }

    /// Consumes a join token atomically: of two racing callers, one wins.
    /// Returns the agent ID it attests as.
    pub fn consume_token(&self, token: &str, now: SystemTime) -> Result<SpiffeId, RegistryError> {
        let hash = sha256_hex(token.as_bytes());
        let record: TokenRecord = match self.store.get(Table::JoinTokens, hash.as_bytes())? {
            Some(b) => decode("join token", &b)?,
            None => return Err(RegistryError::BadToken),
        };
        let consume = Commit::new()
            .require_exists(Table::JoinTokens, hash.as_bytes())
            .delete(Table::JoinTokens, hash.as_bytes());
        match self.commit(consume) {
            Ok(_) => {}
            Err(StoreError::CheckFailed(_)) => return Err(RegistryError::BadToken),
            Err(e) => return Err(e.into()),
        }
        // An expired token is consumed too: it can never be used again.
        if record.expires_at <= unix(now) {
            return Err(RegistryError::BadToken);
        }
        Ok(record.agent_id)
    }

    /// Records (or replaces) an attested agent unconditionally. Only for
    /// setting up state (tests, benches): the node API goes through
    /// [`Registry::replace_agent`], which never writes over a ban or an evict.
    pub fn put_agent(&self, agent: &AgentRecord) -> Result<u64, RegistryError> {
        Ok(self.commit(Commit::new().put(
            Table::Agents,
            agent.spiffe_id.as_str().as_bytes(),
            encode(agent),
        ))?)
    }

    /// An agent's record as stored now, to change it with a compare-and-swap.
    pub fn agent_snapshot(&self, id: &SpiffeId) -> Result<AgentSnapshot, RegistryError> {
        let raw = self.store.get(Table::Agents, id.as_str().as_bytes())?;
        let record = raw
            .as_deref()
            .map(|b| decode(&format!("agent {id}"), b))
            .transpose()?;
        Ok(AgentSnapshot {
            id: id.clone(),
            record,
            raw,
        })
    }

    /// Writes `agent` only if the stored record is still exactly what `seen`
    /// read (or still absent), and was not banned. A ban, an evict or another
    /// renewal in between makes this fail with nothing written.
    pub fn replace_agent(
        &self,
        seen: &AgentSnapshot,
        agent: &AgentRecord,
    ) -> Result<u64, RegistryError> {
        if seen.record.as_ref().is_some_and(|r| r.banned) {
            return Err(RegistryError::AgentBanned(seen.id.to_string()));
        }
        let key = seen.id.as_str().as_bytes();
        let commit = match &seen.raw {
            None => Commit::new().require_absent(Table::Agents, key),
            Some(raw) => Commit::new().require_equals(Table::Agents, key, raw.clone()),
        };
        match self.commit(commit.put(Table::Agents, key, encode(agent))) {
            Err(StoreError::CheckFailed(_)) => {
                Err(RegistryError::AgentChanged(seen.id.to_string()))
            }
            other => Ok(other?),
        }
    }

    /// Applies `change` to an agent's record with a compare-and-swap,
    /// re-reading and retrying when another writer got in first.
    fn change_agent(
        &self,
        id: &SpiffeId,
        change: impl Fn(AgentRecord) -> Option<AgentRecord>,
    ) -> Result<AgentRecord, RegistryError> {
        loop {
            let seen = self.agent_snapshot(id)?;
            let (Some(record), Some(raw)) = (seen.record, seen.raw) else {
                return Err(RegistryError::AgentNotFound(id.to_string()));
            };
            let key = id.as_str().as_bytes();
            let check = Commit::new().require_equals(Table::Agents, key, raw);
            let commit = match change(record.clone()) {
                Some(new) => check.put(Table::Agents, key, encode(&new)),
                None => check.delete(Table::Agents, key),
            };
            match self.commit(commit) {
                Ok(_) => return Ok(record),
                Err(StoreError::CheckFailed(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One agent.
    pub fn agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, RegistryError> {
        self.store
            .get(Table::Agents, id.as_str().as_bytes())?
            .map(|b| decode(&format!("agent {id}"), &b))
            .transpose()
    }

    /// Every agent.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, RegistryError> {
        self.store
            .scan(Table::Agents, b"", None, usize::MAX)?
            .into_iter()
            .map(|(_, v)| decode("agent", &v))
            .collect()
    }

    /// The agent presented its current SVID: the superseded one is no longer
    /// accepted. Best effort: a concurrent change simply wins.
    pub fn confirm_agent_serial(&self, id: &SpiffeId, serial: &str) -> Result<(), RegistryError> {
        let seen = self.agent_snapshot(id)?;
        let Some(mut record) = seen.record.clone() else {
            return Ok(());
        };
        if record.svid_serial != serial || record.previous_serial.is_empty() {
            return Ok(());
        }
        record.previous_serial.clear();
        record.previous_until = 0;
        match self.replace_agent(&seen, &record) {
            Err(RegistryError::AgentChanged(_) | RegistryError::AgentBanned(_)) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Marks an agent banned: refused at once, now and on re-attestation.
    pub fn ban_agent(&self, id: &SpiffeId) -> Result<AgentRecord, RegistryError> {
        let before = self.change_agent(id, |mut a| {
            a.banned = true;
            Some(a)
        })?;
        Ok(AgentRecord {
            banned: true,
            ..before
        })
    }

    /// Forgets an agent: it must attest again.
    pub fn evict_agent(&self, id: &SpiffeId) -> Result<AgentRecord, RegistryError> {
        self.change_agent(id, |_| None)
    }

    /// The rule of the node API: an agent may obtain SVIDs only for entries
    /// parented to it, and only while it is known and not banned.
    pub fn authorize_agent_entry(
        &self,
        agent: &SpiffeId,
        entry_id: &str,
    ) -> Result<Entry, AuthzError> {
        authorize(
            agent,
            entry_id,
            self.entry(entry_id).map_err(AuthzError::Registry)?,
        )
    }
}

/// Whether `agent` may have the SVID of entry `entry_id`, read as `entry`.
pub fn authorize(
    agent: &SpiffeId,
    entry_id: &str,
    entry: Option<Entry>,
) -> Result<Entry, AuthzError> {
    let entry = entry.ok_or_else(|| AuthzError::NoSuchEntry(entry_id.to_string()))?;
    if &entry.parent_id != agent {
        return Err(AuthzError::NotParent {
            entry: entry_id.to_string(),
            agent: agent.to_string(),
        });
    }
    Ok(entry)
}

/// Why an agent may not have an entry's SVID.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// No such entry.
    #[error("entry {0:?} not found")]
    NoSuchEntry(String),
    /// The entry has another parent.
    #[error("entry {entry} is not parented to {agent}")]
    NotParent {
        /// Entry ID.
        entry: String,
        /// The caller.
        agent: String,
    },
    /// The store failed.
    #[error(transparent)]
    Registry(RegistryError),
}

/// Random bytes from the system generator (nonces).
pub fn random_bytes(len: usize) -> Result<Vec<u8>, RegistryError> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new().fill(&mut bytes).map_err(|_| {
        RegistryError::Store(StoreError::Crypto("random number generator failed".into()))
    })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests;
