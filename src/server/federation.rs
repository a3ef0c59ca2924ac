//! Federation: the server polls each peer trust domain's bundle endpoint and
//! keeps its bundle, which agents hand to the workloads whose entries
//! federate with that domain.
//!
//! Each relationship (a `[[federation]]` table in the config file) names the
//! peer's trust domain, its `bundle_url` and how to authenticate it:
//! `https_spiffe` verifies the endpoint's certificate against the peer's own
//! bundle (bootstrapped from `bundle_file` or `sigil bundle set`, then kept
//! current by polling) and its SPIFFE ID; `https_web` uses Web PKI. A peer
//! is polled every quarter of its refresh hint (±10 %, at least a minute),
//! with backoff on errors; a failure keeps the last good bundle, and a
//! bundle whose `spiffe_sequence` goes backwards is refused.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::Uri;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::watch;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, SignatureScheme};

use super::ServerState;
use crate::config::ConfigError;
use crate::runtime::backoff::{Backoff, random_jitter};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::x509::Bundle;

/// How a peer's bundle endpoint is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FederationProfile {
    /// Its certificate chains to the peer's bundle and names this SPIFFE ID.
    HttpsSpiffe {
        /// `endpoint_spiffe_id`.
        endpoint_spiffe_id: SpiffeId,
    },
    /// Web PKI (system roots), host name checked.
    HttpsWeb,
}

/// One `[[federation]]` table.
#[derive(Debug, Clone)]
pub struct FederationRelationship {
    /// The peer trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint (`https://`).
    pub bundle_url: String,
    /// How to authenticate it.
    pub profile: FederationProfile,
    /// A bundle to start from when none is held yet.
    pub bootstrap: Option<Bundle>,
}

/// The table as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelationship {
    trust_domain: String,
    bundle_url: String,
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    endpoint_spiffe_id: Option<String>,
    #[serde(default)]
    bundle_file: Option<PathBuf>,
}

/// Reads a bundle file: SPIFFE bundle JSON, or PEM certificates.
pub fn read_bundle_file(td: &TrustDomain, path: &std::path::Path) -> Result<Bundle, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    if text.trim_start().starts_with('{') {
        Bundle::from_jwks(td.clone(), &text).map_err(|e| e.to_string())
    } else {
        Bundle::from_pem(td.clone(), &text).map_err(|e| e.to_string())
    }
}

/// Parses and checks the `federation` tables; errors name the table and field.
pub fn relationships(
    tables: &[toml::Value],
    own: &TrustDomain,
) -> Result<Vec<FederationRelationship>, ConfigError> {
    let mut out: Vec<FederationRelationship> = Vec::new();
    for (i, value) in tables.iter().enumerate() {
        let bad = |reason: String| ConfigError::Invalid {
            key: "federation",
            value: format!("[{i}]"),
            reason,
        };
        let raw: RawRelationship = value
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.message().to_string()))?;
        let td =
            TrustDomain::new(&raw.trust_domain).map_err(|e| bad(format!("trust_domain: {e}")))?;
        if &td == own {
            return Err(bad(format!(
                "trust_domain: {td} is this server's own trust domain"
            )));
        }
        if out.iter().any(|r| r.trust_domain == td) {
            return Err(bad(format!("trust_domain: {td} is listed twice")));
        }
        https_url(&raw.bundle_url).map_err(|e| bad(format!("bundle_url: {e}")))?;
        let profile = match (
            raw.profile.as_deref().unwrap_or("https_spiffe"),
            raw.endpoint_spiffe_id,
        ) {
            ("https_spiffe", Some(id)) => {
                let id = SpiffeId::new(&id).map_err(|e| bad(format!("endpoint_spiffe_id: {e}")))?;
                if !id.is_member_of(&td) {
                    return Err(bad(format!(
                        "endpoint_spiffe_id: {id} is not in trust domain {td}"
                    )));
                }
                FederationProfile::HttpsSpiffe {
                    endpoint_spiffe_id: id,
                }
            }
            ("https_spiffe", None) => {
                return Err(bad(
                    "endpoint_spiffe_id is required with profile https_spiffe (e.g. spiffe://<td>/sigil/server)".into(),
                ));
            }
            ("https_web", None) => FederationProfile::HttpsWeb,
            ("https_web", Some(_)) => {
                return Err(bad(
                    "endpoint_spiffe_id is only for profile https_spiffe".into()
                ));
            }
            (other, _) => {
                return Err(bad(format!(
                    "profile: {other:?} is not https_spiffe or https_web"
                )));
            }
        };
        let bootstrap = raw
            .bundle_file
            .as_ref()
            .map(|p| {
                read_bundle_file(&td, p)
                    .map_err(|e| bad(format!("bundle_file {}: {e}", p.display())))
            })
            .transpose()?;
        out.push(FederationRelationship {
            trust_domain: td,
            bundle_url: raw.bundle_url,
            profile,
            bootstrap,
        });
    }
    Ok(out)
}

fn https_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err("must be an https:// URL".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    Ok(uri)
}

/// Verifies a bundle endpoint's certificate the SPIFFE way: it chains to
/// the peer's bundle and its URI SAN is the expected SPIFFE ID (the host
/// name does not matter).
#[derive(Debug)]
struct SpiffeEndpointVerifier {
    roots: Vec<rustls_pki_types::TrustAnchor<'static>>,
    id: SpiffeId,
    signatures: crate::runtime::https::HandshakeSignatures,
}

impl ServerCertVerifier for SpiffeEndpointVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("bad certificate: {e:?}")))?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::General(format!("does not chain to the peer's bundle: {e:?}"))
        })?;
        let id = crate::x509::svid_id(end_entity).map_err(rustls::Error::General)?;
        if id != self.id {
            return Err(rustls::Error::General(format!(
                "the endpoint presents {id}, expected {}",
                self.id
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// The TLS client for one poll.
fn client_config(
    state: &ServerState,
    rel: &FederationRelationship,
) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    Ok(match &rel.profile {
        FederationProfile::HttpsWeb => builder
            .with_root_certificates(crate::runtime::https::web_pki_roots(&[])?)
            .with_no_client_auth(),
        FederationProfile::HttpsSpiffe { endpoint_spiffe_id } => {
            let held = state
                .registry
                .bundle(&rel.trust_domain)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!(
                        "no bundle of {} to verify its endpoint with: give bundle_file, or `sigil bundle set --trust-domain {}`",
                        rel.trust_domain, rel.trust_domain
                    )
                })?;
            let roots = held
                .x509_authorities()
                .iter()
                .map(|der| {
                    webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                        .map(|a| a.to_owned())
                        .map_err(|e| format!("the held bundle of {}: {e:?}", rel.trust_domain))
                })
                .collect::<Result<Vec<_>, _>>()?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SpiffeEndpointVerifier {
                    roots,
                    id: endpoint_spiffe_id.clone(),
                    signatures: crate::runtime::https::HandshakeSignatures(provider),
                }))
                .with_no_client_auth()
        }
    })
}

/// The largest bundle document accepted.
const MAX_BUNDLE: usize = 1 << 20;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The poll period when the peer's bundle has no refresh hint.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// Fetches the peer's bundle once and stores it if it changed; the peer's
/// refresh hint.
async fn poll_once(state: &ServerState, rel: &FederationRelationship) -> Result<Duration, String> {
    let tls = Arc::new(client_config(state, rel)?);
    let uri = https_url(&rel.bundle_url)?;
    let body = tokio::time::timeout(
        FETCH_TIMEOUT,
        crate::runtime::https::get(tls, &uri, MAX_BUNDLE),
    )
    .await
    .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??;
    let text = String::from_utf8(body).map_err(|_| "the bundle is not UTF-8".to_string())?;
    let bundle = Bundle::from_jwks(rel.trust_domain.clone(), &text)
        .map_err(|e| format!("not a SPIFFE bundle: {e}"))?;
    if state
        .registry
        .set_federated_bundle(&bundle, true)
        .map_err(|e| e.to_string())?
    {
        tracing::info!(target: "sigil::audit", event = "federated_bundle", trust_domain = %rel.trust_domain, sequence = bundle.sequence(), x509 = bundle.x509_authorities().len(), jwt = bundle.jwt_authorities().len(), "federated bundle updated");
    }
    Ok(bundle
        .refresh_hint()
        .map_or(DEFAULT_REFRESH, Duration::from_secs))
}

/// Polls one peer until shutdown.
pub(super) async fn run(
    state: Arc<ServerState>,
    rel: FederationRelationship,
    floor: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Some(b) = &rel.bootstrap {
        match state.registry.bundle(&rel.trust_domain) {
            Ok(None) => {
                if let Err(e) = state.registry.set_federated_bundle(b, false) {
                    tracing::error!(trust_domain = %rel.trust_domain, error = %e, "cannot store the bootstrap bundle");
                }
            }
            Ok(Some(_)) => {}
            Err(e) => {
                tracing::error!(trust_domain = %rel.trust_domain, error = %e, "cannot read the held bundle")
            }
        }
    }
    let mut errors = Backoff::new(Duration::from_secs(1), floor.max(Duration::from_secs(1)));
    loop {
        // One server of a cluster polls; the others serve what it stores.
        let store = state.registry.store().clone();
        let leader = tokio::task::spawn_blocking(move || {
            super::holds_lease(store.as_ref(), super::LEASE_FEDERATION)
        })
        .await;
        if let Ok(Ok(false)) = leader {
            tokio::select! {
                () = tokio::time::sleep(floor.max(Duration::from_secs(1))) => continue,
                _ = shutdown.changed() => return,
            }
        }
        let wait = match poll_once(&state, &rel).await {
            Ok(hint) => {
                errors.reset();
                (hint / 4).max(floor).mul_f64(1.0 + random_jitter() / 10.0)
            }
            Err(e) => {
                tracing::warn!(trust_domain = %rel.trust_domain, url = %rel.bundle_url, error = %e, "federation: polling the peer's bundle failed; keeping the last good bundle");
                errors.next_delay()
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<FederationRelationship>, String> {
        let table: toml::Table = text.parse().unwrap();
        let tables = match table.get("federation") {
            Some(toml::Value::Array(a)) => a.clone(),
            _ => Vec::new(),
        };
        relationships(&tables, &TrustDomain::new("example.org").unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn federation_tables_are_checked_field_by_field() {
        let ok = parse(
            r#"
[[federation]]
trust_domain = "other.org"
bundle_url = "https://other.example:8443/"
endpoint_spiffe_id = "spiffe://other.org/sigil/server"

[[federation]]
trust_domain = "web.org"
bundle_url = "https://bundles.web.org/"
profile = "https_web"
"#,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].profile, FederationProfile::HttpsWeb);
        for (text, says) in [
            (
                "trust_domain = \"example.org\"\nbundle_url = \"https://x/\"\nendpoint_spiffe_id = \"spiffe://example.org/s\"",
                "own trust domain",
            ),
            (
                "trust_domain = \"other.org\"\nbundle_url = \"http://x/\"\nendpoint_spiffe_id = \"spiffe://other.org/s\"",
                "https://",
            ),
            (
                "trust_domain = \"other.org\"\nbundle_url = \"https://x/\"",
                "endpoint_spiffe_id is required",
            ),
            (
                "trust_domain = \"other.org\"\nbundle_url = \"https://x/\"\nendpoint_spiffe_id = \"spiffe://third.org/s\"",
                "not in trust domain other.org",
            ),
            (
                "trust_domain = \"other.org\"\nbundle_url = \"https://x/\"\nprofile = \"https_web\"\nendpoint_spiffe_id = \"spiffe://other.org/s\"",
                "only for profile https_spiffe",
            ),
            (
                "trust_domain = \"other.org\"\nbundle_url = \"https://x/\"\nprofile = \"ftp\"",
                "not https_spiffe or https_web",
            ),
            (
                "trust_domain = \"other.org\"\nbundle_url = \"https://x/\"\nprofile = \"https_web\"\ncolour = \"red\"",
                "unknown field",
            ),
            (
                "trust_domain = \"other.org\"\nbundle_url = \"https://x/\"\nprofile = \"https_web\"\nbundle_file = \"/nonexistent\"",
                "bundle_file /nonexistent: cannot read",
            ),
        ] {
            let err = parse(&format!("[[federation]]\n{text}\n")).unwrap_err();
            assert!(
                err.contains(says) && err.starts_with("federation = \"[0]\""),
                "{text}: {err}"
            );
        }
        let twice = "[[federation]]\ntrust_domain = \"web.org\"\nbundle_url = \"https://x/\"\nprofile = \"https_web\"\n";
        let err = parse(&format!("{twice}{twice}")).unwrap_err();
        assert!(err.contains("listed twice"), "{err}");
    }
}
