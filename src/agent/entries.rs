//! The agent's registration entries, held by ID and kept in publication
//! order (oldest first: creation time, then ID) in a persistent set, so a
//! delta costs the entries it touches, not a sort or a copy of all of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::registry::Entry;
use crate::workload_api::{ByAge, EntryList};

/// The entries parented to this agent.
#[derive(Debug, Default)]
pub struct Entries {
    by_id: BTreeMap<String, Arc<Entry>>,
    by_age: EntryList,
}

impl Entries {
    /// The entry with this ID.
    pub fn get(&self, id: &str) -> Option<&Arc<Entry>> {
        self.by_id.get(id)
    }

    /// Whether an entry with this ID is held.
    pub fn contains_key(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// The entries by ID.
    pub fn by_id(&self) -> &BTreeMap<String, Arc<Entry>> {
        &self.by_id
    }

    /// The entries, oldest first.
    pub fn oldest_first(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.by_age.iter()
    }

    /// Adds or replaces an entry. Handing back the very entry held changes
    /// nothing.
    pub fn insert(&mut self, entry: Arc<Entry>) {
        if self
            .by_id
            .get(&entry.id)
            .is_some_and(|h| Arc::ptr_eq(h, &entry))
        {
            return;
        }
        if let Some(old) = self.by_id.insert(entry.id.clone(), entry.clone()) {
            self.by_age.0.remove(&ByAge(old));
        }
        self.by_age.0.insert(ByAge(entry));
    }

    /// Removes an entry, if held.
    pub fn remove(&mut self, id: &str) {
        if let Some(old) = self.by_id.remove(id) {
            self.by_age.0.remove(&ByAge(old));
        }
    }

    /// The entries oldest first, to publish: a copy that shares everything
    /// with this one (and with earlier copies) but never changes.
    pub fn listed(&self) -> EntryList {
        self.by_age.clone()
    }
}

impl FromIterator<Arc<Entry>> for Entries {
    fn from_iter<I: IntoIterator<Item = Arc<Entry>>>(iter: I) -> Self {
        let mut entries = Entries::default();
        for e in iter {
            entries.insert(e);
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, created: u64, ttl: u64) -> Arc<Entry> {
        let spiffe_id = crate::spiffe::SpiffeId::new("spiffe://example.org/w").unwrap();
        Arc::new(Entry {
            id: id.into(),
            spiffe_id: spiffe_id.clone(),
            parent_id: spiffe_id,
            selectors: Vec::new(),
            x509_ttl: Some(ttl),
            jwt_ttl: None,
            dns_names: Vec::new(),
            hint: String::new(),
            admin: false,
            federates_with: Vec::new(),
            created_at_micros: created,
        })
    }

    fn ids(e: &Entries) -> Vec<String> {
        e.oldest_first().map(|e| e.id.clone()).collect()
    }

    #[test]
    fn kept_in_age_order_through_inserts_replacements_and_removals() {
        let mut e: Entries = [entry("c", 5, 1), entry("a", 9, 1), entry("b", 5, 1)]
            .into_iter()
            .collect();
        assert_eq!(ids(&e), ["b", "c", "a"]);
        // A replacement with another creation time moves; the old place goes.
        e.insert(entry("a", 1, 2));
        assert_eq!(ids(&e), ["a", "b", "c"]);
        assert_eq!(e.get("a").map(|a| a.x509_ttl), Some(Some(2)));
        e.remove("b");
        e.remove("missing");
        assert_eq!(ids(&e), ["a", "c"]);
        assert_eq!(e.len(), 2);
        let listed = e.listed();
        let listed: Vec<&str> = listed.iter().map(|x| x.id.as_str()).collect();
        assert_eq!(listed, ["a", "c"]);
    }

    #[test]
    fn the_list_is_shared_until_something_changes() {
        let mut e: Entries = [entry("a", 1, 1), entry("b", 2, 1)].into_iter().collect();
        let first = e.listed();
        assert!(first.ptr_eq(&e.listed()));
        // The same entry handed back: no change.
        let a = e.get("a").cloned().unwrap();
        e.insert(a);
        e.remove("missing");
        assert!(first.ptr_eq(&e.listed()));
        // An equal but new copy is a change (the published state compares by pointer).
        e.insert(entry("a", 1, 1));
        let second = e.listed();
        assert!(!first.ptr_eq(&second));
        e.remove("b");
        assert_eq!(e.listed().len(), 1);
        assert_eq!(second.len(), 2, "a list handed out never changes");
    }
}
