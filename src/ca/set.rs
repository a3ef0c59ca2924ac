//! The server's active authorities, loaded from the store or created on first
//! start, and the trust bundle they publish.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{CaError, JwtAuthority, X509Authority};
use crate::spiffe::TrustDomain;
use crate::store::{AuthorityKind, AuthorityRecord, Commit, SlotState, Store, StoreError, Table};
use crate::x509::{Bundle, KeyAlgorithm};

/// Why the authorities could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CaSetError {
    /// The store failed (including a wrong KEK).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored authority is unusable.
    #[error("stored authority {id}: {source}")]
    Authority {
        /// The authority ID.
        id: String,
        /// Why.
        source: CaError,
    },
    /// Creating an authority failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The data directory belongs to another trust domain.
    #[error(
        "the data directory holds authorities for trust domain {stored}, but the server is configured for {configured}"
    )]
    TrustDomainMismatch {
        /// In the store.
        stored: String,
        /// Configured.
        configured: String,
    },
}

/// What the CA set is created with.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Key algorithm for new authorities.
    pub key_algorithm: KeyAlgorithm,
    /// Lifetime of new authorities.
    pub ca_ttl: Duration,
}

/// The signing authorities in use and the bundle of every trusted one.
#[derive(Debug)]
pub struct CaSet {
    x509: X509Authority,
    jwt: JwtAuthority,
    bundle: Bundle,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl CaSet {
    /// Loads the active authorities; creates (and durably stores) any that
    /// are missing or expired. Publishes the bundle to the store.
    pub fn load_or_create(
        store: &dyn Store,
        opts: &CaOptions,
        now: SystemTime,
    ) -> Result<Self, CaSetError> {
        let mut bundle = Bundle::new(opts.trust_domain.clone());
        let mut x509 = None;
        let mut jwt = None;
        for record in store.authorities()? {
            if record.state == SlotState::Revoked || record.not_after <= secs(now) {
                continue;
            }
            let wrap = |source| CaSetError::Authority {
                id: record.id.clone(),
                source,
            };
            match record.kind {
                AuthorityKind::X509 => {
                    let cert = record.cert_der.clone().unwrap_or_default();
                    let a = X509Authority::from_parts(cert, record.key.clone()).map_err(wrap)?;
                    if a.trust_domain() != &opts.trust_domain {
                        return Err(CaSetError::TrustDomainMismatch {
                            stored: a.trust_domain().to_string(),
                            configured: opts.trust_domain.to_string(),
                        });
                    }
                    bundle
                        .add_x509_authority(a.cert_der())
                        .map_err(|e| wrap(CaError::BadAuthorityCert(e)))?;
                    if record.state == SlotState::Active {
                        x509 = Some(a);
                    }
                }
                AuthorityKind::Jwt => {
                    let not_after = UNIX_EPOCH + Duration::from_secs(record.not_after);
                    let a =
                        JwtAuthority::from_parts(record.id.clone(), record.key.clone(), not_after)
                            .map_err(wrap)?;
                    bundle.add_jwt_authority(a.kid().to_string(), a.public_key().clone());
                    if record.state == SlotState::Active {
                        jwt = Some(a);
                    }
                }
            }
        }
        let x509 = match x509 {
            Some(a) => a,
            None => {
                let a = X509Authority::self_signed(
                    &opts.trust_domain,
                    opts.key_algorithm,
                    opts.ca_ttl,
                    now,
                )?;
                store.put_authority(&AuthorityRecord {
                    id: a.id().to_string(),
                    kind: AuthorityKind::X509,
                    state: SlotState::Active,
                    cert_der: Some(a.cert_der().to_vec()),
                    not_after: secs(a.not_after()),
                    key: a.key().clone(),
                })?;
                tracing::info!(target: "sigil::audit", event = "authority_created", kind = "x509", id = a.id(), not_after = secs(a.not_after()));
                bundle
                    .add_x509_authority(a.cert_der())
                    .map_err(CaError::BadAuthorityCert)?;
                a
            }
        };
        let jwt = match jwt {
            Some(a) => a,
            None => {
                let a = JwtAuthority::generate(opts.key_algorithm, opts.ca_ttl, now)?;
                store.put_authority(&AuthorityRecord {
                    id: a.kid().to_string(),
                    kind: AuthorityKind::Jwt,
                    state: SlotState::Active,
                    cert_der: None,
                    not_after: secs(a.not_after()),
                    key: a.key().clone(),
                })?;
                tracing::info!(target: "sigil::audit", event = "authority_created", kind = "jwt", id = a.kid(), not_after = secs(a.not_after()));
                bundle.add_jwt_authority(a.kid().to_string(), a.public_key().clone());
                a
            }
        };
        publish_bundle(store, &mut bundle)?;
        Ok(CaSet { x509, jwt, bundle })
    }

    /// The X.509 authority that signs SVIDs.
    pub fn x509(&self) -> &X509Authority {
        &self.x509
    }

    /// The JWT authority that signs JWT-SVIDs.
    pub fn jwt(&self) -> &JwtAuthority {
        &self.jwt
    }

    /// The trust bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }
}

/// Stores the bundle under its trust domain, bumping `spiffe_sequence`
/// only when its authorities changed.
fn publish_bundle(store: &dyn Store, bundle: &mut Bundle) -> Result<(), CaSetError> {
    let key = bundle.trust_domain().name().as_bytes().to_vec();
    let previous = store
        .get(Table::Bundle, &key)?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| Bundle::from_jwks(bundle.trust_domain().clone(), &s).ok());
    bundle.set_refresh_hint(Some(300));
    if let Some(prev) = previous {
        bundle.set_sequence(prev.sequence());
        if prev.x509_authorities() == bundle.x509_authorities()
            && prev.jwt_authorities() == bundle.jwt_authorities()
        {
            return Ok(());
        }
        bundle.set_sequence(prev.sequence() + 1);
    } else {
        bundle.set_sequence(1);
    }
    store.commit(Commit::new().put(Table::Bundle, key, bundle.to_jwks().into_bytes()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn opts(td: &str) -> CaOptions {
        CaOptions {
            trust_domain: TrustDomain::new(td).unwrap(),
            key_algorithm: KeyAlgorithm::EcP256,
            ca_ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn creates_once_then_reloads() {
        let store = MemoryStore::new().unwrap();
        let now = SystemTime::now();
        let a = CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        let rev = store.revision().unwrap();
        let b = CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        assert_eq!(a.x509().id(), b.x509().id());
        assert_eq!(a.jwt().kid(), b.jwt().kid());
        assert_eq!(a.bundle(), b.bundle());
        assert_eq!(b.bundle().sequence(), 1);
        assert_eq!(store.revision().unwrap(), rev, "reloading writes nothing");
        assert_eq!(b.bundle().x509_authorities().len(), 1);
        assert_eq!(b.bundle().jwt_authorities().len(), 1);
    }

    #[test]
    fn expired_authorities_are_replaced_and_bundle_sequence_bumps() {
        let store = MemoryStore::new().unwrap();
        let now = SystemTime::now();
        let a = CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        let later = now + Duration::from_secs(7200);
        let b = CaSet::load_or_create(&store, &opts("example.org"), later).unwrap();
        assert_ne!(a.x509().id(), b.x509().id());
        assert_eq!(b.bundle().sequence(), 2);
        assert_eq!(
            b.bundle().x509_authorities().len(),
            1,
            "expired CA is not trusted"
        );
    }

    #[test]
    fn refuses_another_trust_domain() {
        let store = MemoryStore::new().unwrap();
        let now = SystemTime::now();
        CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        let err = CaSet::load_or_create(&store, &opts("other.org"), now).unwrap_err();
        assert!(
            matches!(err, CaSetError::TrustDomainMismatch { .. }),
            "{err}"
        );
    }
}
