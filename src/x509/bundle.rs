//! `Bundle`: a trust domain's X.509 and JWT authorities, as a SPIFFE JWKS
//! document or as PEM.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::{PemError, certs_from_pem, certs_to_pem, check_cert};
use crate::jwt::{JwkParams, JwtKeySet, JwtPublicKey};
use crate::spiffe::TrustDomain;

const USE_X509: &str = "x509-svid";
const USE_JWT: &str = "jwt-svid";

/// Why a bundle document was refused. Key errors name the key's index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Not JSON, or `keys` is missing or of the wrong type.
    #[error("bundle is not a SPIFFE JWKS document: {0}")]
    Json(String),
    /// A key's `use` is neither `x509-svid` nor `jwt-svid`.
    #[error("keys[{index}]: use {value:?} is not \"x509-svid\" or \"jwt-svid\"")]
    Use {
        /// Index in `keys`.
        index: usize,
        /// The `use` found (empty if absent).
        value: String,
    },
    /// An X.509 authority without exactly one `x5c` certificate.
    #[error("keys[{index}]: an x509-svid key needs exactly one x5c certificate, found {count}")]
    X5cCount {
        /// Index in `keys`.
        index: usize,
        /// How many were present.
        count: usize,
    },
    /// An `x5c` entry that is not a base64 DER certificate.
    #[error("keys[{index}]: x5c is not a valid certificate: {reason}")]
    Cert {
        /// Index in `keys`.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A JWT authority without `kid`.
    #[error("keys[{index}]: a jwt-svid key needs a non-empty kid")]
    MissingKid {
        /// Index in `keys`.
        index: usize,
    },
    /// Two JWT authorities with one `kid`.
    #[error("keys[{index}]: duplicate kid {kid:?}")]
    DuplicateKid {
        /// Index in `keys`.
        index: usize,
        /// The repeated key ID.
        kid: String,
    },
    /// A JWT authority whose key members are wrong.
    #[error("keys[{index}]: {reason}")]
    Key {
        /// Index in `keys`.
        index: usize,
        /// Which member is wrong and how.
        reason: String,
    },
    /// PEM input refused.
    #[error(transparent)]
    Pem(#[from] PemError),
}

/// The authorities of one trust domain. Equal bundles encode identically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<Vec<u8>>,
    jwt_authorities: JwtKeySet,
    sequence: u64,
    refresh_hint: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct JwksDoc {
    keys: Vec<Jwk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Serialize, Deserialize, Default)]
struct Jwk {
    kty: String,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    use_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x5c: Option<Vec<String>>,
}

impl Jwk {
    fn from_params(p: JwkParams, use_: &str) -> Self {
        Jwk {
            kty: p.kty,
            use_: Some(use_.to_string()),
            crv: p.crv,
            x: p.x,
            y: p.y,
            n: p.n,
            e: p.e,
            ..Jwk::default()
        }
    }

    fn params(&self) -> JwkParams {
        JwkParams {
            kty: self.kty.clone(),
            crv: self.crv.clone(),
            x: self.x.clone(),
            y: self.y.clone(),
            n: self.n.clone(),
            e: self.e.clone(),
        }
    }
}

impl Bundle {
    /// An empty bundle for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Bundle {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: JwtKeySet::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    /// The trust domain these authorities belong to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// X.509 authority certificates, DER, in insertion order.
    pub fn x509_authorities(&self) -> &[Vec<u8>] {
        &self.x509_authorities
    }

    /// JWT authorities by key ID.
    pub fn jwt_authorities(&self) -> &JwtKeySet {
        &self.jwt_authorities
    }

    /// The `spiffe_sequence` number.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The `spiffe_refresh_hint`, in seconds.
    pub fn refresh_hint(&self) -> Option<u64> {
        self.refresh_hint
    }

    /// Sets the sequence number.
    pub fn set_sequence(&mut self, sequence: u64) {
        self.sequence = sequence;
    }

    /// Sets the refresh hint, in seconds.
    pub fn set_refresh_hint(&mut self, seconds: Option<u64>) {
        self.refresh_hint = seconds;
    }

    /// Adds an X.509 authority (ignored if already present).
    pub fn add_x509_authority(&mut self, der: &[u8]) -> Result<(), String> {
        check_cert(der)?;
        if !self.x509_authorities.iter().any(|c| c == der) {
            self.x509_authorities.push(der.to_vec());
        }
        Ok(())
    }

    /// Removes an X.509 authority; true if it was present.
    pub fn remove_x509_authority(&mut self, der: &[u8]) -> bool {
        let before = self.x509_authorities.len();
        self.x509_authorities.retain(|c| c != der);
        before != self.x509_authorities.len()
    }

    /// Adds or replaces a JWT authority.
    pub fn add_jwt_authority(&mut self, kid: String, key: JwtPublicKey) {
        self.jwt_authorities.insert(kid, key);
    }

    /// Removes a JWT authority; true if it was present.
    pub fn remove_jwt_authority(&mut self, kid: &str) -> bool {
        self.jwt_authorities.remove(kid).is_some()
    }

    /// The X.509 authorities as concatenated DER (the Workload API `bundle` field).
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The X.509 authorities as PEM.
    pub fn to_pem(&self) -> String {
        certs_to_pem(&self.x509_authorities)
    }

    /// A bundle holding the X.509 authorities of a PEM document.
    pub fn from_pem(trust_domain: TrustDomain, text: &str) -> Result<Self, BundleError> {
        let mut bundle = Bundle::new(trust_domain);
        bundle.x509_authorities = certs_from_pem(text)?;
        Ok(bundle)
    }

    /// The SPIFFE bundle JWKS document.
    pub fn to_jwks(&self) -> String {
        let mut keys = Vec::new();
        for der in &self.x509_authorities {
            let params = cert_public_key(der).map(|k| k.to_jwk()).unwrap_or_default();
            let mut jwk = Jwk::from_params(params, USE_X509);
            jwk.x5c = Some(vec![STANDARD.encode(der)]);
            keys.push(jwk);
        }
        for (kid, key) in &self.jwt_authorities {
            let mut jwk = Jwk::from_params(key.to_jwk(), USE_JWT);
            jwk.kid = Some(kid.clone());
            keys.push(jwk);
        }
        let doc = JwksDoc {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: self.refresh_hint,
        };
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }

    /// Parses a SPIFFE bundle JWKS document.
    pub fn from_jwks(trust_domain: TrustDomain, json: &str) -> Result<Self, BundleError> {
        let doc: JwksDoc =
            serde_json::from_str(json).map_err(|e| BundleError::Json(e.to_string()))?;
        let mut bundle = Bundle::new(trust_domain);
        bundle.sequence = doc.spiffe_sequence.unwrap_or(0);
        bundle.refresh_hint = doc.spiffe_refresh_hint;
        for (index, jwk) in doc.keys.iter().enumerate() {
            match jwk.use_.as_deref() {
                Some(USE_X509) => {
                    let x5c = jwk.x5c.as_deref().unwrap_or_default();
                    let [cert] = x5c else {
                        return Err(BundleError::X5cCount {
                            index,
                            count: x5c.len(),
                        });
                    };
                    let der = STANDARD.decode(cert).map_err(|_| BundleError::Cert {
                        index,
                        reason: "not base64".into(),
                    })?;
                    bundle
                        .add_x509_authority(&der)
                        .map_err(|reason| BundleError::Cert { index, reason })?;
                }
                Some(USE_JWT) => {
                    let kid = match jwk.kid.as_deref() {
                        Some(k) if !k.is_empty() => k.to_string(),
                        _ => return Err(BundleError::MissingKid { index }),
                    };
                    let key = JwtPublicKey::from_jwk(&jwk.params())
                        .map_err(|reason| BundleError::Key { index, reason })?;
                    if bundle.jwt_authorities.insert(kid.clone(), key).is_some() {
                        return Err(BundleError::DuplicateKid { index, kid });
                    }
                }
                other => {
                    return Err(BundleError::Use {
                        index,
                        value: other.unwrap_or_default().to_string(),
                    });
                }
            }
        }
        Ok(bundle)
    }
}

fn cert_public_key(der: &[u8]) -> Option<JwtPublicKey> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    JwtPublicKey::from_spki(cert.public_key()).ok()
}
