//! JWT-SVIDs: a small, strict JWS (compact) implementation over ring.
//!
//! The verification algorithm is chosen from the *key* found by `kid`, and the
//! token's `alg` must be one of the algorithms that key type allows. `none`,
//! `HS*` and anything outside {RS,ES,PS}{256,384,512} are refused before any
//! key is looked up.

mod key;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::EcdsaKeyPair;
use serde_json::{Map, Value};

pub use key::{EcCurve, JwkParams, JwtPublicKey};

use crate::spiffe::{IdError, SpiffeId, TrustDomain};
use crate::x509::{KeyAlgorithm, PrivateKey};

/// The JWS algorithms a JWT-SVID may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// ECDSA P-521 with SHA-512 (allowed by SPIFFE; ring cannot verify it).
    ES512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
}

impl Algorithm {
    /// Parses a JWS `alg` value against the allow-list.
    pub fn parse(alg: &str) -> Result<Self, JwtError> {
        Ok(match alg {
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "ES512" => Algorithm::ES512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            other => return Err(JwtError::DisallowedAlgorithm(other.to_string())),
        })
    }

    /// The JWS name, e.g. `ES256`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::ES512 => "ES512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
        }
    }
}

/// Why a JWT could not be minted or validated. Grouped as: the token is
/// malformed; the token is refused by policy; the signature or key is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// A request named no audience, an empty one, too many, or one too long.
    #[error("audience: {0}")]
    Audience(AudienceError),
    /// Not three dot-separated parts.
    #[error("token is not a JWS compact serialization (expected 3 dot-separated parts, got {0})")]
    NotCompact(usize),
    /// A part is not base64url.
    #[error("token {0} is not valid base64url")]
    Base64(&'static str),
    /// A part is not a JSON object.
    #[error("token {part} is not a JSON object: {reason}")]
    Json {
        /// `header` or `claims`.
        part: &'static str,
        /// The JSON parser's message.
        reason: String,
    },
    /// `alg` is missing, `none`, `HS*` or otherwise not allowed.
    #[error("algorithm {0:?} is not allowed (allowed: RS/ES/PS 256/384/512)")]
    DisallowedAlgorithm(String),
    /// ring has no verifier for an allowed algorithm.
    #[error("algorithm {0} is allowed by SPIFFE but not supported by Sigil")]
    UnsupportedAlgorithm(&'static str),
    /// A header other than `alg`, `kid`, `typ`.
    #[error("header {0:?} is not allowed in a JWT-SVID (only alg, kid, typ)")]
    UnexpectedHeader(String),
    /// `typ` is neither `JWT` nor `JOSE`.
    #[error("header typ {0:?} must be \"JWT\" or \"JOSE\"")]
    BadType(String),
    /// No `kid` header.
    #[error("token has no kid header")]
    MissingKid,
    /// The bundle has no JWT authority with this key ID.
    #[error("no JWT authority with key ID {0:?} in the bundle")]
    UnknownKid(String),
    /// The token's `alg` does not fit the key found by `kid`.
    #[error("algorithm {alg} does not match the {key} key with this kid")]
    AlgorithmKeyMismatch {
        /// The token's alg.
        alg: &'static str,
        /// The key's type.
        key: &'static str,
    },
    /// The signature does not verify.
    #[error("token signature is invalid")]
    BadSignature,
    /// A required claim is absent or of the wrong type.
    #[error("claim {0:?} is missing or has the wrong type")]
    MissingClaim(&'static str),
    /// `sub` is not a SPIFFE ID.
    #[error("claim \"sub\" is not a SPIFFE ID: {0}")]
    BadSubject(IdError),
    /// `sub` belongs to another trust domain than the bundle.
    #[error("subject {subject} is not in trust domain {bundle}")]
    WrongTrustDomain {
        /// The token's subject.
        subject: String,
        /// The bundle's trust domain.
        bundle: String,
    },
    /// The expected audience is not in `aud`.
    #[error("audience {expected:?} is not among the token's audiences {actual:?}")]
    AudienceMismatch {
        /// What the validator wanted.
        expected: String,
        /// What the token had.
        actual: Vec<String>,
    },
    /// `exp` is in the past.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// Expiry, seconds since the epoch.
        exp: u64,
        /// Now, seconds since the epoch.
        now: u64,
    },
    /// `nbf` is in the future.
    #[error("token is not valid before {nbf} (now {now})")]
    NotYetValid {
        /// Not-before, seconds since the epoch.
        nbf: u64,
        /// Now, seconds since the epoch.
        now: u64,
    },
    /// Minting was asked for no audience.
    #[error("a JWT-SVID needs at least one audience")]
    NoAudience,
    /// The signing key could not be used.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A set of JWT authorities by key ID.
pub type JwtKeySet = BTreeMap<String, JwtPublicKey>;

/// A validated JWT-SVID.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwt {
    /// The subject.
    pub spiffe_id: SpiffeId,
    /// Every audience in the token.
    pub audience: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub expiry: u64,
    /// All claims, as sent.
    pub claims: Map<String, Value>,
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How many audiences one JWT-SVID request may name.
pub const MAX_AUDIENCES: usize = 20;
/// The longest audience accepted, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 256;

/// What is wrong with a request's audiences.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AudienceError {
    /// None given.
    #[error("at least one audience is required")]
    Missing,
    /// An empty string.
    #[error("audiences must not be empty strings")]
    Empty,
    /// More than [`MAX_AUDIENCES`].
    #[error("{0} audiences given; at most {MAX_AUDIENCES} are allowed")]
    TooMany(usize),
    /// One longer than [`MAX_AUDIENCE_LEN`].
    #[error("an audience of {0} bytes; at most {MAX_AUDIENCE_LEN} bytes are allowed")]
    TooLong(usize),
}

/// Checks the audiences a caller asks for or validates against: 1 to
/// [`MAX_AUDIENCES`] non-empty strings of at most [`MAX_AUDIENCE_LEN`] bytes.
pub fn check_audiences(audiences: &[String]) -> Result<(), AudienceError> {
    if audiences.is_empty() {
        return Err(AudienceError::Missing);
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(AudienceError::TooMany(audiences.len()));
    }
    for a in audiences {
        if a.is_empty() {
            return Err(AudienceError::Empty);
        }
        if a.len() > MAX_AUDIENCE_LEN {
            return Err(AudienceError::TooLong(a.len()));
        }
    }
    Ok(())
}

/// A JWT signing key with its key ID; what the CA's JWT authority holds.
pub struct JwtSigner {
    kid: String,
    algorithm: Algorithm,
    key_pair: EcdsaKeyPair,
}

impl JwtSigner {
    /// Builds a signer from an ECDSA private key (ES256 for P-256, ES384 for P-384).
    pub fn new(kid: String, key: &PrivateKey) -> Result<Self, JwtError> {
        let key_pair = key
            .ring_key_pair()
            .map_err(|e| JwtError::Sign(e.to_string()))?;
        let algorithm = match key.algorithm() {
            KeyAlgorithm::EcP256 => Algorithm::ES256,
            KeyAlgorithm::EcP384 => Algorithm::ES384,
        };
        Ok(JwtSigner {
            kid,
            algorithm,
            key_pair,
        })
    }

    /// The key ID placed in every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Mints a JWT-SVID for `subject` with `aud`, `exp` = now + ttl, `iat` =
    /// now, and `iss` when `issuer` is given.
    pub fn mint(
        &self,
        subject: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
        issuer: Option<&str>,
    ) -> Result<String, JwtError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(JwtError::NoAudience);
        }
        check_audiences(audience).map_err(JwtError::Audience)?;
        let iat = unix_seconds(now);
        let mut claims = serde_json::json!({
            "sub": subject.as_str(),
            "aud": audience,
            "exp": iat.saturating_add(ttl.as_secs().max(1)),
            "iat": iat,
        });
        if let Some(iss) = issuer {
            claims["iss"] = iss.into();
        }
        self.sign_claims(&claims)
    }

    /// Signs arbitrary claims with this key (header `alg`, `kid`, `typ`).
    pub fn sign_claims(&self, claims: &Value) -> Result<String, JwtError> {
        let header = serde_json::json!({
            "alg": self.algorithm.name(),
            "kid": self.kid,
            "typ": "JWT",
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key_pair
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| JwtError::Sign("ECDSA signing failed".into()))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        ))
    }
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

fn decode_object(part: &str, name: &'static str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Base64(name))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(JwtError::Json {
            part: name,
            reason: "not an object".into(),
        }),
        Err(e) => Err(JwtError::Json {
            part: name,
            reason: e.to_string(),
        }),
    }
}

/// A token split and decoded, but not yet verified.
#[derive(Debug)]
pub struct UnverifiedJwt<'a> {
    /// The algorithm, already checked against the allow-list.
    pub algorithm: Algorithm,
    /// The key ID (empty for a third-party token without one).
    pub kid: String,
    /// The claims (not yet trustworthy).
    pub claims: Map<String, Value>,
    signing_input: &'a str,
    signature: Vec<u8>,
}

impl<'a> UnverifiedJwt<'a> {
    /// Splits and decodes a compact JWS, enforcing the header rules.
    pub fn parse(token: &'a str) -> Result<Self, JwtError> {
        Self::parse_with(token, true)
    }

    /// Parses a third-party JWT (e.g. for RequestAuthentication): other
    /// headers and a missing `kid` are accepted, `crit` is not, and the
    /// algorithm allow-list still applies.
    pub fn parse_third_party(token: &'a str) -> Result<Self, JwtError> {
        Self::parse_with(token, false)
    }

    fn parse_with(token: &'a str, svid: bool) -> Result<Self, JwtError> {
        let parts: Vec<&str> = token.split('.').collect();
        let [header_b64, claims_b64, sig_b64] = parts[..] else {
            return Err(JwtError::NotCompact(parts.len()));
        };
        let header = decode_object(header_b64, "header")?;
        for name in header.keys() {
            let allowed = if svid {
                matches!(name.as_str(), "alg" | "kid" | "typ")
            } else {
                name != "crit"
            };
            if !allowed {
                return Err(JwtError::UnexpectedHeader(name.clone()));
            }
        }
        let algorithm = match header.get("alg") {
            Some(Value::String(a)) => Algorithm::parse(a)?,
            _ => return Err(JwtError::DisallowedAlgorithm(String::new())),
        };
        if svid {
            match header.get("typ") {
                None => {}
                Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
                Some(other) => return Err(JwtError::BadType(other.to_string())),
            }
        }
        let kid = match header.get("kid") {
            Some(Value::String(k)) if !k.is_empty() => k.clone(),
            _ if !svid => String::new(),
            _ => return Err(JwtError::MissingKid),
        };
        let claims = decode_object(claims_b64, "claims")?;
        let signature = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| JwtError::Base64("signature"))?;
        Ok(UnverifiedJwt {
            algorithm,
            kid,
            claims,
            signing_input: &token[..header_b64.len() + 1 + claims_b64.len()],
            signature,
        })
    }

    /// Verifies the signature with `key` (which must fit the token's alg).
    pub fn verify_signature(&self, key: &JwtPublicKey) -> Result<(), JwtError> {
        key.verify(
            self.algorithm,
            self.signing_input.as_bytes(),
            &self.signature,
        )
    }
}

/// Reads `aud` as a list, whether it was sent as a string or an array.
pub fn audiences(claims: &Map<String, Value>) -> Result<Vec<String>, JwtError> {
    match claims.get("aud") {
        Some(Value::String(a)) => Ok(vec![a.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .filter(|v| !v.is_empty())
            .ok_or(JwtError::MissingClaim("aud")),
        _ => Err(JwtError::MissingClaim("aud")),
    }
}

/// Checks `exp` (required) and `nbf` (optional) against `now`.
pub fn check_time(claims: &Map<String, Value>, now: SystemTime) -> Result<u64, JwtError> {
    let now = unix_seconds(now);
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(JwtError::MissingClaim("exp"))?;
    if exp <= now {
        return Err(JwtError::Expired { exp, now });
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_u64().ok_or(JwtError::MissingClaim("nbf"))?;
        if nbf > now {
            return Err(JwtError::NotYetValid { nbf, now });
        }
    }
    Ok(exp)
}

/// Validates a JWT-SVID: signature by a JWT authority of `trust_domain`,
/// subject in that trust domain, `audience` present, not expired.
pub fn validate(
    token: &str,
    trust_domain: &TrustDomain,
    keys: &JwtKeySet,
    audience: &str,
    now: SystemTime,
) -> Result<ValidatedJwt, JwtError> {
    let jwt = UnverifiedJwt::parse(token)?;
    let key = keys
        .get(&jwt.kid)
        .ok_or_else(|| JwtError::UnknownKid(jwt.kid.clone()))?;
    jwt.verify_signature(key)?;
    let claims = jwt.claims;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingClaim("sub"))?;
    let spiffe_id = SpiffeId::new(sub).map_err(JwtError::BadSubject)?;
    if !spiffe_id.is_member_of(trust_domain) {
        return Err(JwtError::WrongTrustDomain {
            subject: spiffe_id.to_string(),
            bundle: trust_domain.to_string(),
        });
    }
    let audience_list = audiences(&claims)?;
    if !audience_list.iter().any(|a| a == audience) {
        return Err(JwtError::AudienceMismatch {
            expected: audience.to_string(),
            actual: audience_list,
        });
    }
    let expiry = check_time(&claims, now)?;
    Ok(ValidatedJwt {
        spiffe_id,
        audience: audience_list,
        expiry,
        claims,
    })
}

#[cfg(test)]
mod tests;
