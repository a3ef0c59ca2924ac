//! The edge between protobuf and the domain: conversions, and the one place
//! domain errors become gRPC statuses.

use std::time::SystemTime;

use tonic::{Code, Status};

use crate::ca::CaError;
use crate::proto::{admin as pa, node as pn};
use crate::registry::{AgentRecord, AuthzError, Entry, EntryParams, RegistryError, unix};
use crate::store::StoreError;

/// Domain errors that can reach a gRPC caller.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Registry failure.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// CA failure.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Authorization failure.
    #[error(transparent)]
    Authz(#[from] AuthzError),
}

/// Maps an error to a status. Caller mistakes keep their message (it names
/// the field); internal failures are logged and reported without detail.
pub fn status(err: impl Into<ApiError>) -> Status {
    let err = err.into();
    let code = match &err {
        ApiError::Registry(e) => match e {
            RegistryError::Invalid(_) | RegistryError::ZeroTokenTtl => Code::InvalidArgument,
            RegistryError::EntryNotFound(_) | RegistryError::AgentNotFound(_) => Code::NotFound,
            RegistryError::DuplicateEntry(_) => Code::AlreadyExists,
            RegistryError::BadToken | RegistryError::AgentBanned(_) => Code::PermissionDenied,
            RegistryError::AgentChanged(_) => Code::Aborted,
            // The store failing to answer (a datastore that is down, a full
            // disk) is transient: clients retry Unavailable.
            RegistryError::Store(StoreError::Backend(_)) => Code::Unavailable,
            RegistryError::Store(_) | RegistryError::Corrupt { .. } => Code::Internal,
        },
        ApiError::Ca(e) => match e {
            CaError::CsrMalformed(_)
            | CaError::CsrUnsupportedAlgorithm(_)
            | CaError::CsrBadSignature
            | CaError::CsrUnsupportedKey(_)
            | CaError::ZeroTtl
            | CaError::WrongTrustDomain { .. }
            | CaError::BadDnsName(_)
            | CaError::Jwt(_) => Code::InvalidArgument,
            CaError::AuthorityExpired { .. } => Code::Unavailable,
            CaError::Key(_) | CaError::BadAuthorityCert(_) | CaError::Sign(_) => Code::Internal,
        },
        ApiError::Authz(e) => match e {
            AuthzError::NoSuchEntry(_) => Code::NotFound,
            AuthzError::NotParent { .. } => Code::PermissionDenied,
            AuthzError::Registry(RegistryError::Store(StoreError::Backend(_))) => Code::Unavailable,
            AuthzError::Registry(_) => Code::Internal,
        },
    };
    if code == Code::Internal {
        tracing::error!(error = %err, "internal error");
        return Status::internal("internal error; see the server log");
    }
    if code == Code::Unavailable {
        tracing::warn!(error = %err, "unavailable");
    }
    Status::new(code, err.to_string())
}

/// Seconds since the epoch, as the protos carry them.
pub fn ts(t: SystemTime) -> i64 {
    i64::try_from(unix(t)).unwrap_or(i64::MAX)
}

fn ttl_in(field: &str, v: i64) -> Result<Option<u64>, Status> {
    match v {
        0 => Ok(None),
        v if v < 0 => Err(Status::invalid_argument(format!(
            "{field}: {v} is negative (0 means the server default)"
        ))),
        v => Ok(u64::try_from(v).ok()),
    }
}

fn ttl_out(v: Option<u64>) -> i64 {
    v.and_then(|v| i64::try_from(v).ok()).unwrap_or(0)
}

impl From<&Entry> for pn::Entry {
    fn from(e: &Entry) -> Self {
        pn::Entry {
            id: e.id.clone(),
            spiffe_id: e.spiffe_id.to_string(),
            parent_id: e.parent_id.to_string(),
            selectors: e.selectors.iter().map(ToString::to_string).collect(),
            x509_ttl_seconds: ttl_out(e.x509_ttl),
            jwt_ttl_seconds: ttl_out(e.jwt_ttl),
            dns_names: e.dns_names.clone(),
            hint: e.hint.clone(),
            admin: e.admin,
            revision: 0,
            federates_with: e.federates_with.clone(),
            created_at_micros: i64::try_from(e.created_at_micros).unwrap_or(i64::MAX),
        }
    }
}

impl TryFrom<pa::EntryParams> for EntryParams {
    type Error = Status;
    fn try_from(p: pa::EntryParams) -> Result<Self, Status> {
        Ok(EntryParams {
            x509_ttl: ttl_in("x509_ttl", p.x509_ttl_seconds)?,
            jwt_ttl: ttl_in("jwt_ttl", p.jwt_ttl_seconds)?,
            spiffe_id: p.spiffe_id,
            parent_id: p.parent_id,
            selectors: p.selectors,
            dns_names: p.dns_names,
            hint: p.hint,
            admin: p.admin,
            federates_with: p.federates_with,
        })
    }
}

impl From<&AgentRecord> for pa::Agent {
    fn from(a: &AgentRecord) -> Self {
        pa::Agent {
            spiffe_id: a.spiffe_id.to_string(),
            attestor: a.attestor.clone(),
            selectors: a.selectors.iter().map(ToString::to_string).collect(),
            attested_at: i64::try_from(a.attested_at).unwrap_or(i64::MAX),
            svid_expires_at: i64::try_from(a.svid_expires_at).unwrap_or(i64::MAX),
            banned: a.banned,
        }
    }
}
