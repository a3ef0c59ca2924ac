//! `PrivateKey`: PKCS#8 key material that is zeroized on drop and never printed.

use std::fmt;

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, KeyPair,
};
use zeroize::Zeroizing;

/// Why key material could not be generated or loaded. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The random generator or ring refused to generate a key.
    #[error("could not generate a {0} key")]
    Generate(KeyAlgorithm),
    /// The bytes are not a PKCS#8 ECDSA P-256 or P-384 private key.
    #[error("not a PKCS#8 ECDSA P-256 or P-384 private key")]
    NotPkcs8,
    /// PEM input had no `PRIVATE KEY` block.
    #[error("PEM has no \"PRIVATE KEY\" block (found {found:?})")]
    NoPemKey {
        /// The PEM tags that were present.
        found: Vec<String>,
    },
    /// A CSR could not be built.
    #[error("could not build a CSR: {0}")]
    Csr(String),
    /// PEM input could not be decoded.
    #[error("bad PEM: {0}")]
    Pem(#[from] pem::PemError),
}

/// The signature algorithms Sigil generates keys for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    /// ECDSA on NIST P-256 with SHA-256 (the default).
    EcP256,
    /// ECDSA on NIST P-384 with SHA-384.
    EcP384,
}

impl KeyAlgorithm {
    fn ring_signing(self) -> &'static EcdsaSigningAlgorithm {
        match self {
            KeyAlgorithm::EcP256 => &ECDSA_P256_SHA256_FIXED_SIGNING,
            KeyAlgorithm::EcP384 => &ECDSA_P384_SHA384_FIXED_SIGNING,
        }
    }

    /// The rcgen signature algorithm for certificates signed with this key.
    pub(crate) fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyAlgorithm::EcP256 => "ec-p256",
            KeyAlgorithm::EcP384 => "ec-p384",
        })
    }
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ec-p256" | "p256" | "P-256" => Ok(KeyAlgorithm::EcP256),
            "ec-p384" | "p384" | "P-384" => Ok(KeyAlgorithm::EcP384),
            other => Err(format!(
                "unknown key algorithm {other:?} (expected ec-p256 or ec-p384)"
            )),
        }
    }
}

/// A private key in PKCS#8 DER. Zeroized on drop; `Debug` shows only its size.
#[derive(Clone)]
pub struct PrivateKey {
    algorithm: KeyAlgorithm,
    pkcs8: Zeroizing<Vec<u8>>,
}

impl PrivateKey {
    /// Generates a fresh key.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(algorithm.ring_signing(), &rng)
            .map_err(|_| KeyError::Generate(algorithm))?;
        Ok(PrivateKey {
            algorithm,
            pkcs8: Zeroizing::new(doc.as_ref().to_vec()),
        })
    }

    /// Loads a PKCS#8 DER key, detecting its curve.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        for algorithm in [KeyAlgorithm::EcP256, KeyAlgorithm::EcP384] {
            if EcdsaKeyPair::from_pkcs8(algorithm.ring_signing(), der, &rng).is_ok() {
                return Ok(PrivateKey {
                    algorithm,
                    pkcs8: Zeroizing::new(der.to_vec()),
                });
            }
        }
        Err(KeyError::NotPkcs8)
    }

    /// Loads the first `PRIVATE KEY` block of a PEM document.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        let blocks = pem::parse_many(text)?;
        let found: Vec<String> = blocks.iter().map(|b| b.tag().to_string()).collect();
        let block = blocks
            .into_iter()
            .find(|b| b.tag() == "PRIVATE KEY")
            .ok_or(KeyError::NoPemKey { found })?;
        let der = Zeroizing::new(block.into_contents());
        Self::from_pkcs8_der(&der)
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The PKCS#8 DER bytes (what the Workload API's `x509_svid_key` carries).
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The key as a PKCS#8 PEM document, zeroized on drop.
    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem::encode_config(
            &pem::Pem::new("PRIVATE KEY", self.pkcs8.as_slice().to_vec()),
            super::PEM_LF,
        ))
    }

    /// A ring signing key pair for this key.
    pub(crate) fn ring_key_pair(&self) -> Result<EcdsaKeyPair, KeyError> {
        EcdsaKeyPair::from_pkcs8(
            self.algorithm.ring_signing(),
            &self.pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|_| KeyError::NotPkcs8)
    }

    /// An rcgen key pair, for signing certificates and CSRs.
    pub(crate) fn rcgen_key_pair(&self) -> Result<rcgen::KeyPair, KeyError> {
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(self.pkcs8.as_slice());
        rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, self.algorithm.rcgen())
            .map_err(|_| KeyError::NotPkcs8)
    }

    /// Signs `message` with ECDSA (ASN.1 DER signature; SHA-256 for P-256,
    /// SHA-384 for P-384), as the x509pop challenge response.
    pub fn sign_asn1(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let alg = match self.algorithm {
            KeyAlgorithm::EcP256 => &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            KeyAlgorithm::EcP384 => &ring::signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        };
        let rng = SystemRandom::new();
        let pair =
            EcdsaKeyPair::from_pkcs8(alg, &self.pkcs8, &rng).map_err(|_| KeyError::NotPkcs8)?;
        pair.sign(&rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| KeyError::Generate(self.algorithm))
    }

    /// The uncompressed public point (`04 || X || Y`).
    pub fn public_key_point(&self) -> Result<Vec<u8>, KeyError> {
        Ok(self.ring_key_pair()?.public_key().as_ref().to_vec())
    }

    /// Builds a PKCS#10 CSR for `subject_uri` signed by this key. Agents use
    /// it; the server ignores the CSR's names and takes the ID from the entry.
    pub fn csr_der(&self, subject_uri: &str) -> Result<Vec<u8>, KeyError> {
        let key_pair = self.rcgen_key_pair()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uri = subject_uri
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| KeyError::Csr(e.to_string()))?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        let csr = params
            .serialize_request(&key_pair)
            .map_err(|e| KeyError::Csr(e.to_string()))?;
        Ok(csr.der().to_vec())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.algorithm)
            .field("len", &self.pkcs8.len())
            .finish_non_exhaustive()
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        // Compare public halves: equal keys have equal points, and nothing
        // secret-dependent is timed.
        self.algorithm == other.algorithm
            && matches!(
                (self.public_key_point(), other.public_key_point()),
                (Ok(a), Ok(b)) if a == b
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_and_reload() {
        for alg in [KeyAlgorithm::EcP256, KeyAlgorithm::EcP384] {
            let k = PrivateKey::generate(alg).unwrap();
            let again = PrivateKey::from_pkcs8_der(k.pkcs8_der()).unwrap();
            assert_eq!(again.algorithm(), alg);
            assert_eq!(again, k);
            let from_pem = PrivateKey::from_pem(&k.to_pem()).unwrap();
            assert_eq!(from_pem, k);
        }
    }

    #[test]
    fn debug_is_redacted() {
        let k = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
        let shown = format!("{k:?}");
        assert!(shown.contains("len"), "{shown}");
        // No run of key bytes, in any common rendering, appears.
        let der = k.pkcs8_der();
        assert!(!shown.contains(&format!("{:?}", &der[..8])));
        assert!(!shown.contains("PRIVATE"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            PrivateKey::from_pkcs8_der(b"nope"),
            Err(KeyError::NotPkcs8)
        ));
        let cert_pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            PrivateKey::from_pem(cert_pem),
            Err(KeyError::NoPemKey { .. })
        ));
    }
}
