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

/// Saves only the bundle (what a bundle change alters); run it off the async
/// workers, since it waits for the disk.
pub async fn save_bundle(dir: &Path, bundle: &crate::x509::Bundle) {
    let path = dir.join(BUNDLE);
    let jwks = bundle.to_jwks();
    let written = tokio::task::spawn_blocking(move || {
        crate::runtime::files::write_atomic(&path, jwks.as_bytes(), 0o644)
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot persist the bundle")
        }
        Err(e) => tracing::error!(error = %e, "the bundle writer failed"),
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

/// The entry and SVID caches, so an agent restarted while the server is down
/// serves every still-valid SVID at once. SVID keys are sealed (AES-256-GCM)
/// under `cache.kek`; both files are 0600.
const CACHE: &str = "cache.json";
const CACHE_KEK: &str = "cache.kek";

/// The file's layout. Written from borrowed entries (`E = &Entry`), so a
/// save copies no entry; read back owned (`E = Entry`).
#[derive(serde::Serialize, serde::Deserialize)]
struct CacheFile<E, S = Vec<SavedSvid<E>>> {
    /// Whose cache: another agent identity's cache is ignored.
    agent: String,
    revision: u64,
    entries: Vec<E>,
    svids: S,
    /// Federated bundles: trust domain name → SPIFFE bundle JSON.
    #[serde(default)]
    federated: std::collections::BTreeMap<String, String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedSvid<E> {
    entry: E,
    /// Base64 DER, leaf first.
    chain: Vec<String>,
    /// Base64 of the sealed PKCS#8 key.
    key: String,
}

/// What a saved cache restores.
pub struct Restored {
    /// The sync revision the entries are at.
    pub revision: u64,
    /// Entries by ID.
    pub entries: std::collections::BTreeMap<String, std::sync::Arc<crate::registry::Entry>>,
    /// Still-valid SVIDs by entry ID.
    pub svids: std::collections::HashMap<String, std::sync::Arc<crate::workload_api::CachedSvid>>,
    /// Federated bundles by trust domain name.
    pub federated: std::collections::BTreeMap<String, Bundle>,
}

/// The SVIDs as the file holds them, each sealed and encoded as it is
/// written (never all of them at once in memory).
struct SealedSvids<'a> {
    kek: &'a crate::store::Kek,
    svids: &'a std::collections::HashMap<String, std::sync::Arc<crate::workload_api::CachedSvid>>,
}

impl serde::Serialize for SealedSvids<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        use base64::engine::general_purpose::STANDARD;
        use serde::ser::{Error, SerializeSeq};
        let mut seq = serializer.serialize_seq(Some(self.svids.len()))?;
        for s in self.svids.values() {
            let sealed = self
                .kek
                .seal(s.entry.id.as_bytes(), s.key.pkcs8_der())
                .map_err(S::Error::custom)?;
            seq.serialize_element(&SavedSvid {
                entry: &*s.entry,
                chain: s.chain.iter().map(|c| STANDARD.encode(c)).collect(),
                key: STANDARD.encode(sealed),
            })?;
        }
        seq.end()
    }
}

/// Saves the caches; failures are logged (the agent keeps running).
pub fn save_cache(
    dir: &Path,
    agent: &crate::spiffe::SpiffeId,
    revision: u64,
    entries: &std::collections::BTreeMap<String, std::sync::Arc<crate::registry::Entry>>,
    svids: &std::collections::HashMap<String, std::sync::Arc<crate::workload_api::CachedSvid>>,
    federated: &std::collections::BTreeMap<String, Bundle>,
) {
    let result = (|| -> Result<(), String> {
        crate::runtime::files::private_dir(dir).map_err(|e| e.to_string())?;
        let kek =
            crate::store::Kek::load_or_create(&dir.join(CACHE_KEK)).map_err(|e| e.to_string())?;
        let svids = SealedSvids { kek: &kek, svids };
        let file = CacheFile {
            agent: agent.to_string(),
            revision,
            entries: entries.values().map(|e| &**e).collect(),
            svids,
            federated: federated
                .iter()
                .map(|(td, b)| (td.clone(), b.to_jwks()))
                .collect(),
        };
        // Streamed to the file: no second copy of the cache in memory.
        crate::runtime::files::write_atomic_with(&dir.join(CACHE), 0o600, |w| {
            serde_json::to_writer(w, &file).map_err(std::io::Error::other)
        })
        .map_err(|e| e.to_string())
    })();
    if let Err(e) = result {
        tracing::error!(dir = %dir.display(), error = %e, "cannot persist the SVID cache");
    }
}

/// Loads the caches saved for `agent`, dropping expired SVIDs; `None` when
/// there is none (or it belongs to another identity, or does not read back).
pub fn load_cache(dir: &Path, agent: &crate::spiffe::SpiffeId) -> Option<Restored> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    let text = std::fs::read(dir.join(CACHE)).ok()?;
    let file: CacheFile<crate::registry::Entry> = match serde_json::from_slice(&text) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable SVID cache");
            return None;
        }
    };
    if file.agent != agent.as_str() {
        return None;
    }
    let kek = crate::store::Kek::load_or_create(&dir.join(CACHE_KEK)).ok()?;
    let now = std::time::SystemTime::now();
    let mut svids = std::collections::HashMap::new();
    for s in file.svids {
        let restored = (|| {
            let chain: Vec<Vec<u8>> = s
                .chain
                .iter()
                .map(|c| STANDARD.decode(c).ok())
                .collect::<Option<_>>()?;
            let sealed = STANDARD.decode(&s.key).ok()?;
            let pkcs8 = kek.open(s.entry.id.as_bytes(), &sealed).ok()?;
            let key = PrivateKey::from_pkcs8_der(&pkcs8).ok()?;
            super::state::restore_svid(std::sync::Arc::new(s.entry.clone()), chain, key)
        })();
        match restored {
            Some(svid) if svid.not_after > now => {
                svids.insert(svid.entry.id.clone(), std::sync::Arc::new(svid));
            }
            Some(_) => {}
            None => {
                tracing::warn!(entry = ?s.entry.id, "ignoring a cached SVID that does not read back")
            }
        }
    }
    Some(Restored {
        revision: file.revision,
        entries: file
            .entries
            .into_iter()
            .map(|e| (e.id.clone(), std::sync::Arc::new(e)))
            .collect(),
        svids,
        federated: file
            .federated
            .iter()
            .filter_map(|(name, jwks)| {
                let td = TrustDomain::new(name).ok()?;
                Some((name.clone(), Bundle::from_jwks(td, jwks).ok()?))
            })
            .collect(),
    })
}
