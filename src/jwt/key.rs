//! `JwtPublicKey`: a verification key from a JWKS, with the algorithm family
//! fixed by its key type.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey as ParsedKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::{Algorithm, JwtError};

/// The elliptic curves a JWT authority key may be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcCurve {
    /// NIST P-256.
    P256,
    /// NIST P-384.
    P384,
    /// NIST P-521.
    P521,
}

impl EcCurve {
    /// The JWK `crv` name.
    pub fn name(self) -> &'static str {
        match self {
            EcCurve::P256 => "P-256",
            EcCurve::P384 => "P-384",
            EcCurve::P521 => "P-521",
        }
    }

    fn coordinate_len(self) -> usize {
        match self {
            EcCurve::P256 => 32,
            EcCurve::P384 => 48,
            EcCurve::P521 => 66,
        }
    }

    fn from_name(crv: &str) -> Option<Self> {
        match crv {
            "P-256" => Some(EcCurve::P256),
            "P-384" => Some(EcCurve::P384),
            "P-521" => Some(EcCurve::P521),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Material {
    Ec { curve: EcCurve, point: Vec<u8> },
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

/// A public key that verifies JWT-SVIDs (or, inside an X.509 authority JWK,
/// describes the certificate's key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtPublicKey {
    material: Material,
}

/// The key-type members of a JWK, base64url-encoded as they appear in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JwkParams {
    /// `kty`: `EC` or `RSA`.
    pub kty: String,
    /// `crv` (EC).
    pub crv: Option<String>,
    /// `x` (EC).
    pub x: Option<String>,
    /// `y` (EC).
    pub y: Option<String>,
    /// `n` (RSA).
    pub n: Option<String>,
    /// `e` (RSA).
    pub e: Option<String>,
}

fn b64(field: &'static str, value: Option<&String>) -> Result<Vec<u8>, String> {
    let v = value.ok_or_else(|| format!("missing \"{field}\""))?;
    URL_SAFE_NO_PAD
        .decode(v)
        .map_err(|_| format!("\"{field}\" is not base64url"))
}

impl JwtPublicKey {
    /// An EC key from its uncompressed point `04 || X || Y`.
    pub fn ec(curve: EcCurve, point: Vec<u8>) -> Result<Self, String> {
        let len = curve.coordinate_len();
        if point.len() != 1 + 2 * len || point[0] != 4 {
            return Err(format!("not an uncompressed {} point", curve.name()));
        }
        Ok(JwtPublicKey {
            material: Material::Ec { curve, point },
        })
    }

    /// Reads the key members of a JWK; the error names the bad member.
    pub fn from_jwk(p: &JwkParams) -> Result<Self, String> {
        match p.kty.as_str() {
            "EC" => {
                let crv = p.crv.as_deref().ok_or("missing \"crv\"")?;
                let curve =
                    EcCurve::from_name(crv).ok_or_else(|| format!("unsupported crv {crv:?}"))?;
                let x = b64("x", p.x.as_ref())?;
                let y = b64("y", p.y.as_ref())?;
                let len = curve.coordinate_len();
                if x.len() != len || y.len() != len {
                    return Err(format!("\"x\"/\"y\" must be {len} bytes for {crv}"));
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Self::ec(curve, point)
            }
            "RSA" => Ok(JwtPublicKey {
                material: Material::Rsa {
                    n: b64("n", p.n.as_ref())?,
                    e: b64("e", p.e.as_ref())?,
                },
            }),
            other => Err(format!("unsupported kty {other:?} (expected EC or RSA)")),
        }
    }

    /// The JWK members describing this key.
    pub fn to_jwk(&self) -> JwkParams {
        match &self.material {
            Material::Ec { curve, point } => {
                let len = curve.coordinate_len();
                JwkParams {
                    kty: "EC".into(),
                    crv: Some(curve.name().into()),
                    x: Some(URL_SAFE_NO_PAD.encode(&point[1..=len])),
                    y: Some(URL_SAFE_NO_PAD.encode(&point[1 + len..])),
                    ..JwkParams::default()
                }
            }
            Material::Rsa { n, e } => JwkParams {
                kty: "RSA".into(),
                n: Some(URL_SAFE_NO_PAD.encode(n)),
                e: Some(URL_SAFE_NO_PAD.encode(e)),
                ..JwkParams::default()
            },
        }
    }

    /// Reads a DER SubjectPublicKeyInfo (from a certificate or `PUBLIC KEY` PEM).
    pub fn from_spki_der(der: &[u8]) -> Result<Self, String> {
        let (_, spki) = SubjectPublicKeyInfo::from_der(der)
            .map_err(|e| format!("bad SubjectPublicKeyInfo: {e}"))?;
        Self::from_spki(&spki)
    }

    /// Reads an already parsed SubjectPublicKeyInfo.
    pub fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, String> {
        match spki.parsed() {
            Ok(ParsedKey::EC(point)) => {
                let curve = match point.key_size() {
                    256 => EcCurve::P256,
                    384 => EcCurve::P384,
                    521 => EcCurve::P521,
                    bits => return Err(format!("unsupported EC key size {bits}")),
                };
                Self::ec(curve, point.data().to_vec())
            }
            Ok(ParsedKey::RSA(rsa)) => Ok(JwtPublicKey {
                material: Material::Rsa {
                    n: strip_zeros(rsa.modulus).to_vec(),
                    e: strip_zeros(rsa.exponent).to_vec(),
                },
            }),
            Ok(_) => Err("unsupported public key type (expected EC or RSA)".into()),
            Err(e) => Err(format!("bad public key: {e}")),
        }
    }

    /// A short name of the key type, for error messages.
    pub fn kind(&self) -> &'static str {
        match &self.material {
            Material::Ec { curve, .. } => curve.name(),
            Material::Rsa { .. } => "RSA",
        }
    }

    /// Verifies `sig` over `msg` with `alg`, refusing an alg that does not fit the key.
    pub fn verify(&self, alg: Algorithm, msg: &[u8], sig: &[u8]) -> Result<(), JwtError> {
        let mismatch = || JwtError::AlgorithmKeyMismatch {
            alg: alg.name(),
            key: self.kind(),
        };
        match &self.material {
            Material::Ec { curve, point } => {
                let verifier: &'static signature::EcdsaVerificationAlgorithm = match (alg, curve) {
                    (Algorithm::ES256, EcCurve::P256) => &signature::ECDSA_P256_SHA256_FIXED,
                    (Algorithm::ES384, EcCurve::P384) => &signature::ECDSA_P384_SHA384_FIXED,
                    (Algorithm::ES512, EcCurve::P521) => {
                        return Err(JwtError::UnsupportedAlgorithm("ES512"));
                    }
                    _ => return Err(mismatch()),
                };
                UnparsedPublicKey::new(verifier, point)
                    .verify(msg, sig)
                    .map_err(|_| JwtError::BadSignature)
            }
            Material::Rsa { n, e } => {
                let params: &'static signature::RsaParameters = match alg {
                    Algorithm::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Algorithm::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Algorithm::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Algorithm::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Algorithm::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Algorithm::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return Err(mismatch()),
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .map_err(|_| JwtError::BadSignature)
            }
        }
    }
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}
