//! x509pop node attestation, the domain half: the node's certificate must
//! chain (webpki) to a configured CA, and the node must prove possession of
//! its key by signing a fresh nonce. The server runs the exchange.

use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
    VerificationAlgorithm,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::public_key::PublicKey;

use crate::spiffe::Selector;

/// Bytes of the server's challenge nonce.
pub const NONCE_LEN: usize = 32;

/// Why a node's x509pop evidence is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509PopError {
    /// A configured CA cannot be used as a trust anchor (operator's fault).
    #[error("configured x509pop CA is unusable: {0}")]
    BadRoot(String),
    /// The node's certificate does not parse.
    #[error("agent certificate is malformed: {0}")]
    Malformed(String),
    /// It does not chain to a configured CA (or is expired, or not for client auth).
    #[error("certificate does not chain to a trusted CA: {0}")]
    Untrusted(String),
    /// Its key type cannot sign the challenge.
    #[error("unsupported certificate key type")]
    UnsupportedKey,
    /// The challenge signature does not verify.
    #[error("challenge signature does not verify with the certificate's key")]
    BadSignature,
}

/// The node's ID part: the SHA-256 of its certificate, hex.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The node selectors: `x509pop:subject:cn:<CN>` (if any) and
/// `x509pop:fingerprint:<hex>`.
pub fn selectors(leaf: &[u8]) -> Result<Vec<Selector>, X509PopError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| X509PopError::Malformed(e.to_string()))?;
    let mut out = Vec::new();
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
    {
        out.extend(Selector::from_parts("x509pop", &format!("subject:cn:{cn}")).ok());
    }
    out.extend(Selector::from_parts("x509pop", &format!("fingerprint:{}", fingerprint(leaf))).ok());
    Ok(out)
}

/// Checks the node's chain against the configured CAs at `now`.
pub fn verify_chain(
    roots: &[Vec<u8>],
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    now: std::time::SystemTime,
) -> Result<(), X509PopError> {
    let anchors = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(r.as_slice()))
                .map(|a| a.to_owned())
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| X509PopError::BadRoot(format!("{e:?}")))?;
    let leaf_der = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| X509PopError::Malformed(format!("{e:?}")))?;
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &inter,
        UnixTime::since_unix_epoch(secs),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| X509PopError::Untrusted(format!("{e:?}")))?;
    Ok(())
}

/// Checks the node signed `message` with its certificate's key.
pub fn verify_possession(
    leaf: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), X509PopError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| X509PopError::Malformed(e.to_string()))?;
    let spki = cert.public_key();
    let alg: &'static dyn VerificationAlgorithm = match spki.parsed() {
        Ok(PublicKey::EC(p)) if p.key_size() == 256 => &ECDSA_P256_SHA256_ASN1,
        Ok(PublicKey::EC(p)) if p.key_size() == 384 => &ECDSA_P384_SHA384_ASN1,
        Ok(PublicKey::RSA(_)) => &RSA_PKCS1_2048_8192_SHA256,
        _ => return Err(X509PopError::UnsupportedKey),
    };
    UnparsedPublicKey::new(alg, spki.subject_public_key.data.as_ref())
        .verify(message, signature)
        .map_err(|_| X509PopError::BadSignature)
}
