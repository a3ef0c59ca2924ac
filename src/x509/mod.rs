//! X.509 material: private keys, certificate PEM helpers and trust bundles.

mod bundle;
mod key;

pub use bundle::{Bundle, BundleError};
pub use key::{KeyAlgorithm, KeyError, PrivateKey};

/// Why PEM certificate input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// Not decodable PEM.
    #[error("bad PEM: {0}")]
    Decode(String),
    /// A block that is not a `CERTIFICATE`.
    #[error("PEM block {index} is {tag:?}, expected \"CERTIFICATE\"")]
    Tag {
        /// Zero-based block index.
        index: usize,
        /// The block's tag.
        tag: String,
    },
    /// A block whose contents are not an X.509 certificate.
    #[error("PEM block {index} is not a valid X.509 certificate: {reason}")]
    Cert {
        /// Zero-based block index.
        index: usize,
        /// The parser's message.
        reason: String,
    },
    /// No certificate at all.
    #[error("no certificate found in PEM input")]
    Empty,
}

/// Parses every `CERTIFICATE` block of a PEM document into DER, checking each parses.
pub fn certs_from_pem(text: &str) -> Result<Vec<Vec<u8>>, PemError> {
    let blocks = pem::parse_many(text).map_err(|e| PemError::Decode(e.to_string()))?;
    if blocks.is_empty() {
        return Err(PemError::Empty);
    }
    blocks
        .into_iter()
        .enumerate()
        .map(|(index, b)| {
            if b.tag() != "CERTIFICATE" {
                return Err(PemError::Tag {
                    index,
                    tag: b.tag().to_string(),
                });
            }
            let der = b.into_contents();
            check_cert(&der).map_err(|reason| PemError::Cert { index, reason })?;
            Ok(der)
        })
        .collect()
}

/// A DNS name as certificates accept it (a domain rule the CA and the
/// registry share): labels of `[A-Za-z0-9-]`, an
/// optional leading `*.`, at most 253 bytes.
pub fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The AuthorityKeyIdentifier of a certificate (lowercase hex): the ID of
/// the authority that signed it.
pub fn authority_key_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => a
                .key_identifier
                .as_ref()
                .map(|k| k.0.iter().map(|b| format!("{b:02x}")).collect()),
            _ => None,
        })
}

/// How far NotBefore is backdated, to absorb clock skew between machines
/// (the CA backdates; the agent measures lifetimes knowing it).
pub const BACKDATE: std::time::Duration = std::time::Duration::from_secs(10);

/// Encodes DER certificates as concatenated PEM `CERTIFICATE` blocks.
pub fn certs_to_pem<'a>(ders: impl IntoIterator<Item = &'a Vec<u8>>) -> String {
    let blocks: Vec<pem::Pem> = ders
        .into_iter()
        .map(|d| pem::Pem::new("CERTIFICATE", d.clone()))
        .collect();
    pem::encode_many_config(&blocks, PEM_LF)
}

/// PEM as every tool writes it on Unix: LF line endings (the `pem` crate defaults to CRLF).
pub(crate) const PEM_LF: pem::EncodeConfig =
    pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);

/// Checks that `der` is exactly one well-formed X.509 certificate.
pub fn check_cert(der: &[u8]) -> Result<(), String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], _)) => Ok(()),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The SPIFFE ID in a certificate's single URI SAN.
pub fn svid_id(der: &[u8]) -> Result<crate::spiffe::SpiffeId, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("certificate has no subjectAltName")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris[..] {
        [uri] => crate::spiffe::SpiffeId::new(uri).map_err(|e| e.to_string()),
        _ => Err(format!(
            "certificate has {} URI SANs, expected exactly one",
            uris.len()
        )),
    }
}

/// The message an x509pop agent signs: a fixed label and the server's nonce,
/// so the key is never used to sign arbitrary server-chosen data.
pub fn x509pop_challenge_message(nonce: &[u8]) -> Vec<u8> {
    let mut m = b"sigil x509pop challenge v1\0".to_vec();
    m.extend_from_slice(nonce);
    m
}
