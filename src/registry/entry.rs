//! Registration entries and their validation. Errors name the field.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spiffe::{IdError, Selector, SelectorError, SpiffeId, TrustDomain};

/// The DNS name in the server's own SVID, which agents verify; no entry may claim it.
pub const SERVER_DNS_NAME: &str = "sigil-server";

/// Longest hint accepted, in bytes.
pub const MAX_HINT_LEN: usize = 1024;
/// Selectors, and DNS names, per entry at most.
pub const MAX_LIST_LEN: usize = 100;

/// A registration entry: "workloads under `parent_id` matching every
/// selector get `spiffe_id`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Random ID assigned by the server.
    pub id: String,
    /// The identity issued.
    pub spiffe_id: SpiffeId,
    /// The agent (or node alias) allowed to obtain it.
    pub parent_id: SpiffeId,
    /// Sorted, without duplicates; never empty.
    pub selectors: Vec<Selector>,
    /// X509-SVID TTL in seconds (`None`: server default).
    pub x509_ttl: Option<u64>,
    /// JWT-SVID TTL in seconds (`None`: server default).
    pub jwt_ttl: Option<u64>,
    /// DNS SANs for the X509-SVID.
    pub dns_names: Vec<String>,
    /// Hint passed to workloads to tell several SVIDs apart.
    pub hint: String,
    /// May use the admin API (reserved for future use by workloads).
    pub admin: bool,
    /// Trust domains (names) whose bundles the workload receives, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federates_with: Vec<String>,
    /// Creation time, microseconds since the epoch; orders a workload's
    /// SVIDs (the oldest entry gives the default SVID).
    pub created_at_micros: u64,
}

/// Unvalidated entry fields, as they arrive from the CLI or admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryParams {
    /// `--spiffe-id`.
    pub spiffe_id: String,
    /// `--parent-id`.
    pub parent_id: String,
    /// `--selector`, each `TYPE:VALUE`.
    pub selectors: Vec<String>,
    /// `--x509-ttl`, seconds.
    pub x509_ttl: Option<u64>,
    /// `--jwt-ttl`, seconds.
    pub jwt_ttl: Option<u64>,
    /// `--dns-name`.
    pub dns_names: Vec<String>,
    /// `--hint`.
    pub hint: String,
    /// `--admin`.
    pub admin: bool,
    /// `--federates-with`, trust domain names.
    pub federates_with: Vec<String>,
}

/// Server-wide bounds entries are validated against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryValidation {
    /// Largest X509-SVID TTL (the CA lifetime caps issuance anyway).
    pub max_x509_ttl: Duration,
    /// Largest JWT-SVID TTL.
    pub max_jwt_ttl: Duration,
}

impl Default for EntryValidation {
    fn default() -> Self {
        EntryValidation {
            max_x509_ttl: Duration::from_secs(30 * 24 * 3600),
            max_jwt_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl EntryValidation {
    /// The bounds for a server whose authorities live `ca_ttl`: no TTL above a
    /// sixth of it (what an active authority always has left), so an SVID is
    /// never silently cut short.
    pub fn for_ca_ttl(ca_ttl: Duration) -> Self {
        let d = EntryValidation::default();
        let cap = crate::ca::rotation::max_svid_ttl(ca_ttl);
        EntryValidation {
            max_x509_ttl: d.max_x509_ttl.min(cap),
            max_jwt_ttl: d.max_jwt_ttl.min(cap),
        }
    }
}

/// What is wrong with an entry's fields. Every variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Not a SPIFFE ID.
    #[error("{field}: {source}")]
    SpiffeId {
        /// The field.
        field: &'static str,
        /// Why.
        source: IdError,
    },
    /// A SPIFFE ID outside the server's trust domain.
    #[error("{field}: {id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The field.
        field: &'static str,
        /// The ID.
        id: String,
        /// The server's trust domain.
        trust_domain: String,
    },
    /// A workload ID in the space reserved for agents and the server.
    #[error("spiffe_id: {0} is reserved for Sigil's own agents and server (/sigil/...)")]
    ReservedId(String),
    /// The trust domain's own ID (no path) as a workload ID.
    #[error("spiffe_id: {0} has no path; a workload ID needs one")]
    NoPath(String),
    /// No selectors.
    #[error("selectors: at least one selector is required")]
    NoSelectors,
    /// A bad selector.
    #[error("selectors[{index}]: {source}")]
    Selector {
        /// Index in the list.
        index: usize,
        /// Why.
        source: SelectorError,
    },
    /// A TTL out of bounds.
    #[error("{field}: {value}s is out of bounds (1s..={max}s)")]
    Ttl {
        /// The field.
        field: &'static str,
        /// The value given.
        value: u64,
        /// The maximum.
        max: u64,
    },
    /// The hint is too long.
    #[error("hint: {len} bytes is more than the maximum of {MAX_HINT_LEN}")]
    HintTooLong {
        /// Its length.
        len: usize,
    },
    /// More selectors or DNS names than [`MAX_LIST_LEN`].
    #[error("{field}: {count} given; at most {MAX_LIST_LEN} are allowed")]
    TooMany {
        /// The field.
        field: &'static str,
        /// How many were given.
        count: usize,
    },
    /// A `federates_with` value that is not another trust domain.
    #[error("federates_with[{index}]: {reason}")]
    FederatesWith {
        /// Index in the list.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A DNS name that cannot go in a certificate.
    #[error("dns_names[{index}]: {name:?} is not a valid DNS name or is reserved")]
    DnsName {
        /// Index in the list.
        index: usize,
        /// The name.
        name: String,
    },
}

fn parse_id(field: &'static str, value: &str, td: &TrustDomain) -> Result<SpiffeId, EntryError> {
    let id = SpiffeId::new(value).map_err(|source| EntryError::SpiffeId { field, source })?;
    if !id.is_member_of(td) {
        return Err(EntryError::ForeignTrustDomain {
            field,
            id: id.to_string(),
            trust_domain: td.to_string(),
        });
    }
    Ok(id)
}

fn check_ttl(field: &'static str, ttl: Option<u64>, max: Duration) -> Result<(), EntryError> {
    match ttl {
        Some(v) if v == 0 || v > max.as_secs() => Err(EntryError::Ttl {
            field,
            value: v,
            max: max.as_secs(),
        }),
        _ => Ok(()),
    }
}

impl EntryParams {
    /// Validates every field against `td` and `bounds`. The returned entry
    /// has no ID and creation time yet.
    pub fn validate(
        &self,
        td: &TrustDomain,
        bounds: &EntryValidation,
    ) -> Result<Entry, EntryError> {
        let spiffe_id = parse_id("spiffe_id", &self.spiffe_id, td)?;
        if spiffe_id.path().is_empty() {
            return Err(EntryError::NoPath(spiffe_id.to_string()));
        }
        if spiffe_id.path() == "/sigil" || spiffe_id.path().starts_with("/sigil/") {
            return Err(EntryError::ReservedId(spiffe_id.to_string()));
        }
        let parent_id = parse_id("parent_id", &self.parent_id, td)?;
        if self.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        for (field, count) in [
            ("selectors", self.selectors.len()),
            ("dns_names", self.dns_names.len()),
            ("federates_with", self.federates_with.len()),
        ] {
            if count > MAX_LIST_LEN {
                return Err(EntryError::TooMany { field, count });
            }
        }
        let mut selectors = self
            .selectors
            .iter()
            .enumerate()
            .map(|(index, s)| {
                Selector::new(s)
                    .and_then(|sel| sel.check_known().map(|()| sel))
                    .map_err(|source| EntryError::Selector { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        selectors.sort();
        selectors.dedup();
        check_ttl("x509_ttl", self.x509_ttl, bounds.max_x509_ttl)?;
        check_ttl("jwt_ttl", self.jwt_ttl, bounds.max_jwt_ttl)?;
        if self.hint.len() > MAX_HINT_LEN {
            return Err(EntryError::HintTooLong {
                len: self.hint.len(),
            });
        }
        for (index, name) in self.dns_names.iter().enumerate() {
            if !crate::x509::valid_dns_name(name) || name.eq_ignore_ascii_case(SERVER_DNS_NAME) {
                return Err(EntryError::DnsName {
                    index,
                    name: name.clone(),
                });
            }
        }
        let mut federates_with = self
            .federates_with
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let bad = |reason: String| EntryError::FederatesWith { index, reason };
                let other = TrustDomain::new(name).map_err(|e| bad(e.to_string()))?;
                if &other == td {
                    return Err(bad(format!("{name:?} is this server's own trust domain")));
                }
                Ok(other.name().to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        federates_with.sort();
        federates_with.dedup();
        Ok(Entry {
            id: String::new(),
            spiffe_id,
            parent_id,
            selectors,
            x509_ttl: self.x509_ttl,
            jwt_ttl: self.jwt_ttl,
            dns_names: self.dns_names.clone(),
            hint: self.hint.clone(),
            admin: self.admin,
            federates_with,
            created_at_micros: 0,
        })
    }
}

impl From<&Entry> for EntryParams {
    fn from(e: &Entry) -> Self {
        EntryParams {
            spiffe_id: e.spiffe_id.to_string(),
            parent_id: e.parent_id.to_string(),
            selectors: e.selectors.iter().map(ToString::to_string).collect(),
            x509_ttl: e.x509_ttl,
            jwt_ttl: e.jwt_ttl,
            dns_names: e.dns_names.clone(),
            hint: e.hint.clone(),
            admin: e.admin,
            federates_with: e.federates_with.clone(),
        }
    }
}
