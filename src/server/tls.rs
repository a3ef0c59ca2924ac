//! The server's TLS identities: its own SVID, renewed whenever the
//! authorities change, for the node API (mTLS, agents verified against the
//! bundle) and the bundle endpoint's `https_spiffe` profile; and an
//! operator's certificate for the `https_web` profile.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use super::ServerError;
use crate::ca::X509SvidParams;
use crate::registry::SERVER_DNS_NAME;
use crate::spiffe::TrustDomain;
use crate::x509::{KeyAlgorithm, PrivateKey};

/// The acceptors made from one server SVID.
#[derive(Clone)]
pub(super) struct ServerTls {
    /// The node API: the SVID; agents present theirs (mTLS), but attestation
    /// needs none, so a client certificate is optional and each RPC decides.
    pub node: TlsAcceptor,
    /// HTTPS with the SVID and no client certificate (bundle endpoint).
    pub https: TlsAcceptor,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(chain: &[Vec<u8>]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    chain
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.clone()))
        .collect()
}

/// A fresh server SVID (its key lives only in this process) from the active
/// X.509 authority, for the rest of that authority's life, and the bundle's
/// roots to verify agents.
pub(super) fn server_tls(
    ca: &crate::ca::Authorities,
    td: &TrustDomain,
    now: SystemTime,
) -> Result<ServerTls, ServerError> {
    let err = |e: String| ServerError::ServerSvid(e);
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).map_err(|e| err(e.to_string()))?;
    let id = td
        .id_with_path("sigil/server")
        .map_err(|e| err(e.to_string()))?;
    let svid = ca
        .x509()
        .issue_for_private_key(
            &key,
            &X509SvidParams {
                spiffe_id: id,
                dns_names: vec![SERVER_DNS_NAME.to_string()],
                ttl: ca
                    .x509()
                    .not_after()
                    .duration_since(now)
                    .unwrap_or_default(),
            },
            now,
        )
        .map_err(|e| err(e.to_string()))?;
    let err = |e: String| ServerError::Transport(format!("node API TLS: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for der in ca.bundle().x509_authorities() {
        roots
            .add(rustls_pki_types::CertificateDer::from(der.clone()))
            .map_err(|e| err(e.to_string()))?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| err(e.to_string()))?;
    let key_der = || rustls_pki_types::PrivateKeyDer::Pkcs8(key.pkcs8_der().to_vec().into());
    let mut node = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(svid.chain()), key_der())
        .map_err(|e| err(e.to_string()))?;
    node.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ServerTls {
        node: TlsAcceptor::from(Arc::new(node)),
        https: https_acceptor(certs(svid.chain()), key_der()).map_err(err)?,
    })
}

/// HTTP/1.1 over TLS with `chain` and `key`, no client certificate.
fn https_acceptor(
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
) -> Result<TlsAcceptor, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The `https_web` profile: an operator's PEM certificate chain and key
/// (PKCS#8, SEC1 or PKCS#1), checked to match.
pub fn web_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    https_acceptor(chain, key)
}
