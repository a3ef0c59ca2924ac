//! The agent's identity on disk, so a restart needs no new join token:
//! `agent-svid.pem` (chain), `agent-svid.key` (0600) and `bundle.jwks`.

use std::path::Path;

use super::node_client::AgentIdentity;
use crate::spiffe::TrustDomain;
use crate::x509::{Bundle, PrivateKey, certs_from_pem, certs_to_pem, svid_id};

const SVID: &str = "agent-svid.pem";
const KEY: &str = "agent-svid.key";
const BUNDLE: &str = "bundle.jwks";

/// Saves the identity; failures are logged (the agent keeps running).
pub fn save(dir: &Path, id: &AgentIdentity) {
    use crate::runtime::files::{private_dir, write_atomic};
    let result = private_dir(dir)
        .and_then(|()| write_atomic(&dir.join(KEY), id.key.to_pem().as_bytes(), 0o600))
        .and_then(|()| {
            write_atomic(
                &dir.join(SVID),
                certs_to_pem(&id.cert_chain).as_bytes(),
                0o644,
            )
        })
        .and_then(|()| write_atomic(&dir.join(BUNDLE), id.bundle.to_jwks().as_bytes(), 0o644));
    if let Err(e) = result {
        tracing::error!(dir = %dir.display(), error = %e, "cannot persist the agent identity");
    }
}

/// Loads a saved identity, if there is a complete one.
pub fn load(dir: &Path, td: &TrustDomain) -> Result<Option<AgentIdentity>, String> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let (Ok(svid), Ok(key), Ok(bundle)) = (read(SVID), read(KEY), read(BUNDLE)) else {
        return Ok(None);
    };
    let chain = certs_from_pem(&svid).map_err(|e| format!("{SVID}: {e}"))?;
    let key = PrivateKey::from_pem(&key).map_err(|e| format!("{KEY}: {e}"))?;
    let bundle = Bundle::from_jwks(td.clone(), &bundle).map_err(|e| format!("{BUNDLE}: {e}"))?;
    let leaf = chain.first().ok_or(format!("{SVID}: empty"))?;
    let spiffe_id = svid_id(leaf).map_err(|e| format!("{SVID}: {e}"))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("{SVID}: {e}"))?;
    let expires_at = cert.validity().not_after.timestamp();
    Ok(Some(AgentIdentity {
        spiffe_id,
        cert_chain: chain,
        key,
        expires_at,
        bundle,
    }))
}

/// The saved agent's ID and SVID expiry (seconds since the epoch), if any.
pub fn saved_identity(dir: &Path, td: &TrustDomain) -> Option<(crate::spiffe::SpiffeId, i64)> {
    load(dir, td)
        .ok()
        .flatten()
        .map(|id| (id.spiffe_id, id.expires_at))
}
