//! Federated trust bundles: other trust domains' bundles, kept in the same
//! table as the server's own (keyed by trust domain name), set by an
//! operator (`sigil bundle set`) or by polling a peer's bundle endpoint.

use super::{Registry, RegistryError};
use crate::spiffe::TrustDomain;
use crate::store::{Commit, Table};
use crate::x509::Bundle;

/// Why a federated bundle was not stored; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The server's own bundle is managed by its authorities.
    #[error(
        "{0} is this server's own trust domain: its bundle comes from its authorities (see `sigil ca`)"
    )]
    OwnTrustDomain(String),
    /// A polled bundle older than the one held.
    #[error(
        "the bundle of {trust_domain} went backwards: spiffe_sequence {got} < {held} held; keeping {held}"
    )]
    SequenceBackwards {
        /// The peer.
        trust_domain: String,
        /// What arrived.
        got: u64,
        /// What is held.
        held: u64,
    },
    /// No bundle for this trust domain.
    #[error("no bundle for trust domain {0} (see `sigil bundle list`)")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl From<crate::store::StoreError> for BundleError {
    fn from(e: crate::store::StoreError) -> Self {
        BundleError::Registry(e.into())
    }
}

impl Registry {
    /// The bundle held for `td` (the server's own or a federated one).
    pub fn bundle(&self, td: &TrustDomain) -> Result<Option<Bundle>, RegistryError> {
        let Some(raw) = self.store().get(Table::Bundle, td.name().as_bytes())? else {
            return Ok(None);
        };
        let corrupt = |reason: String| RegistryError::Corrupt {
            what: format!("bundle {td}"),
            reason,
        };
        let text = String::from_utf8(raw).map_err(|e| corrupt(e.to_string()))?;
        Bundle::from_jwks(td.clone(), &text)
            .map(Some)
            .map_err(|e| corrupt(e.to_string()))
    }

    /// Every federated bundle, by trust domain name.
    pub fn federated_bundles(&self) -> Result<Vec<Bundle>, RegistryError> {
        let own = self.trust_domain().name().as_bytes().to_vec();
        let mut out = Vec::new();
        for (key, _) in self.store().scan(Table::Bundle, b"", None, usize::MAX)? {
            if key == own {
                continue;
            }
            let name = String::from_utf8_lossy(&key).into_owned();
            let td = TrustDomain::new(&name).map_err(|e| RegistryError::Corrupt {
                what: format!("bundle key {name:?}"),
                reason: e.to_string(),
            })?;
            out.extend(self.bundle(&td)?);
        }
        Ok(out)
    }

    /// Stores a federated bundle. `polled`: it came from the peer's
    /// endpoint, so a `spiffe_sequence` lower than the one held is refused
    /// (an operator's `bundle set` may replace anything). Returns whether
    /// the stored bundle changed.
    pub fn set_federated_bundle(&self, bundle: &Bundle, polled: bool) -> Result<bool, BundleError> {
        let td = bundle.trust_domain();
        if td == self.trust_domain() {
            return Err(BundleError::OwnTrustDomain(td.to_string()));
        }
        let key = td.name().as_bytes().to_vec();
        let raw = self.store().get(Table::Bundle, &key)?;
        let held = match &raw {
            Some(r) => Bundle::from_jwks(td.clone(), &String::from_utf8_lossy(r)).ok(),
            None => None,
        };
        if let Some(held) = &held {
            if held == bundle {
                return Ok(false);
            }
            if polled && bundle.sequence() < held.sequence() {
                return Err(BundleError::SequenceBackwards {
                    trust_domain: td.to_string(),
                    got: bundle.sequence(),
                    held: held.sequence(),
                });
            }
        }
        // Only over what was read: a concurrent writer makes this fail, not
        // silently lose its bundle.
        let commit = match raw {
            Some(r) => Commit::new().require_equals(Table::Bundle, key.clone(), r),
            None => Commit::new().require_absent(Table::Bundle, key.clone()),
        };
        self.store()
            .commit(commit.put(Table::Bundle, key, bundle.to_jwks().into_bytes()))?;
        self.notify_committed();
        Ok(true)
    }

    /// Removes a federated bundle.
    pub fn delete_federated_bundle(&self, td: &TrustDomain) -> Result<(), BundleError> {
        if td == self.trust_domain() {
            return Err(BundleError::OwnTrustDomain(td.to_string()));
        }
        let key = td.name().as_bytes().to_vec();
        if self.store().get(Table::Bundle, &key)?.is_none() {
            return Err(BundleError::NotFound(td.to_string()));
        }
        self.store()
            .commit(Commit::new().delete(Table::Bundle, key))?;
        self.notify_committed();
        Ok(())
    }
}
