//! Remote JWKS for RequestAuthentication `jwksUri: https://...`.
//!
//! Each URL the loaded policies name is fetched over HTTPS (the system's
//! roots plus any configured CAs), cached, and refetched every
//! `refresh_every` (Istio's default: 20 minutes). A token naming a `kid` the
//! cached set lacks asks for an early refetch, at most once per `early_gap`
//! per URL, so an issuer's key rotation is picked up without letting random
//! `kid`s hammer the issuer. A failed fetch keeps the last good keys and is
//! retried with backoff (1 s doubling to 60 s). Evaluation never blocks on
//! the network: it reads whatever the cache holds.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::Uri;
use rustls_pki_types::CertificateDer;
use tokio::sync::{Notify, watch};
use tokio_rustls::rustls::{self, ClientConfig};

use super::parse_jwks;
use crate::jwt::JwtPublicKey;

/// Keys of one JWKS, each with its `kid` if any.
pub type JwksKeys = Arc<Vec<(Option<String>, JwtPublicKey)>>;

/// How long one fetch (connect, TLS, request, body) may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS body accepted.
const MAX_BODY: usize = 1 << 20;
/// Retry delay after the first failure; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Checks that `uri` is a URL Sigil will fetch a JWKS from: `https://` with
/// a host. Plain HTTP is refused: keys fetched without TLS could be swapped
/// in transit, and with them every token's authenticity.
pub fn check_url(uri: &str) -> Result<(), String> {
    https_url(uri).map(|_| ())
}

fn https_url(uri: &str) -> Result<Uri, String> {
    let parsed: Uri = uri.parse().map_err(|e| format!("not a URL: {e}"))?;
    match parsed.scheme_str() {
        Some("https") => {}
        Some("http") => {
            return Err(
                "plain http:// is refused: a JWKS fetched without TLS could be replaced in transit; use https://".into(),
            );
        }
        _ => return Err("expected an https:// URL or a file path".into()),
    }
    if parsed.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    Ok(parsed)
}

/// Reads a PEM file of CA certificates to trust for `jwksUri` servers, in
/// addition to the system's; each must be usable as a trust anchor.
pub fn load_ca_file(path: &std::path::Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let certs = crate::x509::certs_from_pem(&text).map_err(|e| e.to_string())?;
    for (i, der) in certs.iter().enumerate() {
        webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
            .map_err(|e| format!("certificate #{} is not a usable CA: {e:?}", i + 1))?;
    }
    Ok(certs)
}

#[derive(Debug)]
struct Slot {
    keys: Option<JwksKeys>,
    error: Option<String>,
    last_attempt: Option<Instant>,
    due: Instant,
    failures: u32,
}

/// The cache of remote JWKS, shared by every evaluator built from it.
#[derive(Debug)]
pub struct RemoteJwks {
    tls: Arc<ClientConfig>,
    no_roots: bool,
    refresh_every: Duration,
    early_gap: Duration,
    slots: Mutex<HashMap<String, Slot>>,
    /// Keys of URLs dropped by the last reload, still readable by a check
    /// that began on the previous evaluator; never refreshed.
    retired: Mutex<HashMap<String, JwksKeys>>,
    wake: Notify,
}

impl RemoteJwks {
    /// A cache trusting the system's roots plus `extra_roots` (DER). Fails
    /// only on an unusable extra root.
    pub fn new(extra_roots: &[Vec<u8>]) -> Result<Self, String> {
        let roots = crate::runtime::https::web_pki_roots(extra_roots)
            .map_err(|e| format!("extra JWKS CA certificate {e}"))?;
        let no_roots = roots.is_empty();
        if no_roots {
            tracing::warn!(
                "no CA certificates to verify jwksUri servers with: none in the system store and none configured"
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(RemoteJwks {
            tls: Arc::new(tls),
            no_roots,
            refresh_every: Duration::from_secs(20 * 60),
            early_gap: Duration::from_secs(30),
            slots: Mutex::new(HashMap::new()),
            retired: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        })
    }

    /// Sets the refresh period and the minimum gap between early refetches.
    pub fn with_intervals(mut self, refresh_every: Duration, early_gap: Duration) -> Self {
        self.refresh_every = refresh_every;
        self.early_gap = early_gap;
        self
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached keys of `url`, or why there are none.
    pub fn keys(&self, url: &str) -> Result<JwksKeys, String> {
        match self.slots().get(url) {
            Some(Slot {
                keys: Some(keys), ..
            }) => Ok(keys.clone()),
            None if let Some(keys) = self.retired().get(url) => Ok(keys.clone()),
            Some(Slot { error: Some(e), .. }) => {
                Err(format!("the JWKS from {url} could not be fetched: {e}"))
            }
            _ => Err(format!("the JWKS from {url} has not been fetched yet")),
        }
    }

    /// A token named a `kid` that `url`'s cached keys lack: refetch early,
    /// unless the last attempt was less than `early_gap` ago. True when a
    /// refetch is now due.
    pub fn kid_missing(&self, url: &str) -> bool {
        let now = Instant::now();
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(url)
            && slot.due > now
            && slot
                .last_attempt
                .is_none_or(|t| now.duration_since(t) >= self.early_gap)
        {
            slot.due = now;
            drop(slots);
            self.wake.notify_one();
            return true;
        }
        false
    }

    /// Adds `urls` not yet held, due now, and returns them. (Call
    /// [`Self::forget_others`] once no evaluator reads the old ones.)
    pub fn track(&self, urls: &BTreeSet<String>) -> Vec<String> {
        let now = Instant::now();
        let mut slots = self.slots();
        let added: Vec<String> = urls
            .iter()
            .filter(|u| !slots.contains_key(*u))
            .cloned()
            .collect();
        let retired = self.retired();
        for url in &added {
            slots.insert(
                url.clone(),
                Slot {
                    // A URL named again keeps its last keys while refetched.
                    keys: retired.get(url).cloned(),
                    error: None,
                    last_attempt: None,
                    due: now,
                    failures: 0,
                },
            );
        }
        drop(retired);
        drop(slots);
        if !added.is_empty() {
            self.wake.notify_one();
        }
        added
    }

    /// Stops refreshing every URL not in `urls`. Their keys stay readable
    /// until the next call, for checks still running on the old evaluator.
    pub fn forget_others(&self, urls: &BTreeSet<String>) {
        let mut slots = self.slots();
        let dropped: Vec<String> = slots
            .keys()
            .filter(|u| !urls.contains(*u))
            .cloned()
            .collect();
        let retired = dropped
            .into_iter()
            .filter_map(|u| slots.remove(&u).and_then(|s| s.keys).map(|k| (u, k)))
            .collect();
        drop(slots);
        *self.retired() = retired;
    }

    fn retired(&self) -> MutexGuard<'_, HashMap<String, JwksKeys>> {
        self.retired.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches every URL that is due, concurrently, and records the results.
    pub async fn refresh_due(&self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .slots()
            .iter_mut()
            .filter(|(_, s)| s.due <= now)
            .map(|(url, s)| {
                s.last_attempt = Some(now);
                url.clone()
            })
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for url in due {
            let tls = self.tls.clone();
            let no_roots = self.no_roots;
            tasks.spawn(async move {
                let result = if no_roots {
                    Err(
                        "no trusted CA certificates (none in the system store; set jwks_ca_file)"
                            .into(),
                    )
                } else {
                    fetch(tls, &url).await
                };
                (url, result)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let Ok((url, result)) = joined else { continue };
            self.record(&url, result);
        }
    }

    fn record(&self, url: &str, result: Result<Vec<(Option<String>, JwtPublicKey)>, String>) {
        let now = Instant::now();
        let mut slots = self.slots();
        let Some(slot) = slots.get_mut(url) else {
            return; // no longer named by any policy
        };
        match result {
            Ok(keys) => {
                tracing::info!(%url, keys = keys.len(), "JWKS fetched");
                slot.keys = Some(Arc::new(keys));
                slot.error = None;
                slot.failures = 0;
                slot.due = now + self.refresh_every;
            }
            Err(e) => {
                slot.failures += 1;
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << (slot.failures - 1).min(6))
                    .min(MAX_BACKOFF);
                tracing::warn!(
                    %url,
                    error = %e,
                    retry_in = ?backoff,
                    keeping_cached_keys = slot.keys.is_some(),
                    "JWKS fetch failed"
                );
                slot.error = Some(e);
                slot.due = now + backoff;
            }
        }
    }

    /// Waits (at most `limit`) until each of `urls` has keys or an error.
    pub async fn settled(&self, urls: &[String], limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let pending = {
                let slots = self.slots();
                urls.iter().any(|u| {
                    slots
                        .get(u)
                        .is_some_and(|s| s.keys.is_none() && s.error.is_none())
                })
            };
            if !pending {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Keeps the cache fresh until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            self.refresh_due().await;
            let next = self.slots().values().map(|s| s.due).min();
            let sleep = next.map_or(self.refresh_every, |due| {
                due.saturating_duration_since(Instant::now())
            });
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Fetches and parses the JWKS at `url`; an `oidc-discovery:<issuer>`
/// first reads the issuer's OpenID configuration for its `jwks_uri`.
async fn fetch(
    tls: Arc<ClientConfig>,
    url: &str,
) -> Result<Vec<(Option<String>, JwtPublicKey)>, String> {
    let url = match url.strip_prefix(super::model::OIDC_PREFIX) {
        Some(issuer) => discover(tls.clone(), issuer).await?,
        None => url.to_string(),
    };
    let body = tokio::time::timeout(FETCH_TIMEOUT, get(tls, &url))
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??;
    let text = String::from_utf8(body).map_err(|_| "the body is not UTF-8".to_string())?;
    parse_jwks(&text)
}

/// The `jwks_uri` of `issuer`'s OpenID configuration (an https:// URL).
async fn discover(tls: Arc<ClientConfig>, issuer: &str) -> Result<String, String> {
    let config = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let body = tokio::time::timeout(FETCH_TIMEOUT, get(tls, &config))
        .await
        .map_err(|_| format!("{config}: no answer within {FETCH_TIMEOUT:?}"))?
        .map_err(|e| format!("OIDC discovery at {config}: {e}"))?;
    let doc: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("{config}: not JSON: {e}"))?;
    let uri = doc
        .get("jwks_uri")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| format!("{config} has no jwks_uri"))?;
    check_url(uri).map_err(|e| format!("{config}: jwks_uri {uri:?}: {e}"))?;
    Ok(uri.to_string())
}

/// One HTTPS GET; the body of a 200 answer.
async fn get(tls: Arc<ClientConfig>, url: &str) -> Result<Vec<u8>, String> {
    crate::runtime::https::get(tls, &https_url(url)?, MAX_BODY).await
}
