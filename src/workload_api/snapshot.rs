//! The agent's published state as the Workload API reads it: entries, the
//! SVIDs held for them, and the bundle. The agent publishes it through a
//! `watch` channel; this module owns the type so the API depends on nothing
//! of the agent's internals.

use std::sync::Arc;
use std::time::SystemTime;

use crate::registry::Entry;
use crate::spiffe::{Selector, is_subset};
use crate::x509::{Bundle, PrivateKey};

/// An X509-SVID the agent holds for one entry. The key never leaves the agent
/// except to the workload entitled to it.
#[derive(Debug, Clone)]
pub struct CachedSvid {
    /// The entry it was issued for (as it was at issuance).
    pub entry: Arc<Entry>,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The private key.
    pub key: PrivateKey,
    /// Certificate NotBefore.
    pub not_before: SystemTime,
    /// Certificate NotAfter.
    pub not_after: SystemTime,
    /// When the agent replaces it.
    pub rotate_at: SystemTime,
    /// The ID of the authority that signed it (the leaf's AuthorityKeyIdentifier),
    /// shared with the other SVIDs it signed (see [`issuer_of`]).
    pub issuer: Arc<str>,
}

/// The ID of the authority that signed `leaf`, one allocation shared by all
/// the SVIDs it signed: a handful of authorities sign thousands of SVIDs.
/// IDs no SVID holds any more are dropped as new ones arrive.
pub fn issuer_of(leaf: &[u8]) -> Arc<str> {
    static KNOWN: std::sync::Mutex<Vec<Arc<str>>> = std::sync::Mutex::new(Vec::new());
    let id = crate::x509::authority_key_id(leaf).unwrap_or_default();
    let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = known.iter().find(|k| ***k == *id) {
        return k.clone();
    }
    known.retain(|k| Arc::strong_count(k) > 1);
    let k: Arc<str> = id.into();
    known.push(k.clone());
    k
}

/// An entry ordered by age: creation time, then ID (the oldest entry gives a
/// workload its default SVID).
#[derive(Debug, Clone)]
pub struct ByAge(pub Arc<Entry>);

impl ByAge {
    fn key(&self) -> (u64, &str) {
        (self.0.created_at_micros, &self.0.id)
    }
}

impl PartialEq for ByAge {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for ByAge {}

impl PartialOrd for ByAge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByAge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// Entries oldest first, as a persistent ordered set: the agent publishes a
/// copy after every change for nothing (the copies share their nodes), and
/// changes one entry in O(log n), so a delta never costs the whole list.
#[derive(Debug, Clone, Default)]
pub struct EntryList(pub imbl::OrdSet<ByAge>);

impl EntryList {
    /// The entries, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.0.iter().map(|e| &e.0)
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether both are the same copy (nothing changed in between).
    pub fn ptr_eq(&self, other: &Self) -> bool {
        self.0.ptr_eq(&other.0)
    }
}

/// The agent's view, as workloads see it.
#[derive(Debug, Clone, Default)]
pub struct AgentState {
    /// The trust bundle (absent until first synced).
    pub bundle: Option<Bundle>,
    /// Entries parented to this agent, oldest first.
    pub entries: EntryList,
    /// SVIDs by entry, in the same order as `entries`.
    pub svids: Vec<Arc<CachedSvid>>,
    /// Authorities the server marked tainted: nothing they signed is served
    /// from a cache.
    pub tainted: Arc<std::collections::BTreeSet<String>>,
    /// Federated bundles by trust domain name.
    pub federated: Arc<std::collections::BTreeMap<String, Bundle>>,
}

impl AgentState {
    /// The federated bundles a workload with `selectors` may have: those its
    /// entries federate with, by trust domain name.
    pub fn federated_for(&self, selectors: &[Selector]) -> Vec<&Bundle> {
        let wanted: std::collections::BTreeSet<&str> = self
            .entries_for(selectors)
            .flat_map(|e| e.federates_with.iter().map(String::as_str))
            .collect();
        wanted
            .into_iter()
            .filter_map(|td| self.federated.get(td))
            .collect()
    }

    /// The workload's own bundle, then the federated ones it may have.
    pub fn bundles_for(&self, selectors: &[Selector]) -> Vec<&Bundle> {
        self.bundle
            .iter()
            .chain(self.federated_for(selectors))
            .collect()
    }

    /// Entries a workload with `selectors` is entitled to: every selector of
    /// the entry must be among the workload's. Oldest first.
    pub fn entries_for<'a>(&'a self, selectors: &'a [Selector]) -> impl Iterator<Item = &'a Entry> {
        self.entries
            .iter()
            .map(|e| &**e)
            .filter(move |e| is_subset(&e.selectors, selectors))
    }

    /// The SVIDs for a workload: entitled entries only, the oldest entry first
    /// (the default identity), and at most one SVID per non-empty hint.
    pub fn svids_for(&self, selectors: &[Selector]) -> Vec<Arc<CachedSvid>> {
        let mut hints = std::collections::HashSet::new();
        self.svids
            .iter()
            .filter(|s| is_subset(&s.entry.selectors, selectors))
            .filter(|s| s.entry.hint.is_empty() || hints.insert(s.entry.hint.clone()))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{X509Authority, X509SvidParams};
    use crate::spiffe::{SpiffeId, TrustDomain};
    use crate::x509::KeyAlgorithm;
    use std::time::Duration;

    fn leaf(ca: &X509Authority) -> Vec<u8> {
        let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
        let params = X509SvidParams {
            spiffe_id: SpiffeId::new("spiffe://example.org/w").unwrap(),
            dns_names: vec![],
            ttl: Duration::from_secs(60),
        };
        let issued = ca
            .issue_for_private_key(&key, &params, SystemTime::now())
            .unwrap();
        issued.chain()[0].clone()
    }

    #[test]
    fn svids_of_one_authority_share_its_id_and_others_do_not() {
        let td = TrustDomain::new("example.org").unwrap();
        let ca = |_| {
            X509Authority::self_signed(
                &td,
                KeyAlgorithm::EcP256,
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .unwrap()
        };
        let (a, b) = (ca(1), ca(2));
        let first = issuer_of(&leaf(&a));
        let second = issuer_of(&leaf(&a));
        assert!(Arc::ptr_eq(&first, &second), "one allocation per authority");
        assert_eq!(*first, *a.id());
        let other = issuer_of(&leaf(&b));
        assert_eq!(*other, *b.id());
        assert_ne!(first, other);
    }
}
