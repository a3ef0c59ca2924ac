//! The certificate authority: the only code that holds signing keys. Issues
//! X509-SVIDs from CSRs and mints JWT-SVIDs, enforcing the SPIFFE rules.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use x509_parser::oid_registry::{
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, GeneralName, X509CertificationRequest};

pub mod rotation;
mod set;
mod upstream;

pub use set::{Authorities, AuthorityInfo, CaOptions, CaSet, CaSetError, kind_name, state_name};
pub use upstream::{Upstream, UpstreamChain, UpstreamError};

use crate::jwt::{EcCurve, JwtError, JwtPublicKey, JwtSigner};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::x509::{KeyAlgorithm, KeyError, PrivateKey};

use crate::x509::BACKDATE;

/// Why the CA refused to issue. `Csr*` variants are the caller's fault;
/// the rest are the authority's state or configuration.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CSR is not DER PKCS#10.
    #[error("CSR is malformed: {0}")]
    CsrMalformed(String),
    /// The CSR is signed with an algorithm outside the allow-list (e.g. SHA-1).
    #[error(
        "CSR signature algorithm {0} is not allowed (use ECDSA with SHA-256/384, RSA with SHA-256+, or Ed25519)"
    )]
    CsrUnsupportedAlgorithm(String),
    /// The CSR's signature does not verify with its own public key.
    #[error("CSR signature does not verify (proof of possession failed)")]
    CsrBadSignature,
    /// The CSR's key type cannot be put in a certificate.
    #[error("CSR public key is not supported: {0}")]
    CsrUnsupportedKey(String),
    /// A TTL of zero.
    #[error("TTL must be greater than zero")]
    ZeroTtl,
    /// The authority has expired.
    #[error("authority {id} expired at {not_after}s (now {now}s)")]
    AuthorityExpired {
        /// Authority ID.
        id: String,
        /// Its NotAfter, seconds since the epoch.
        not_after: u64,
        /// Now, seconds since the epoch.
        now: u64,
    },
    /// The ID to sign is outside the authority's trust domain.
    #[error("{id} is not in trust domain {trust_domain}")]
    WrongTrustDomain {
        /// The SPIFFE ID asked for.
        id: String,
        /// The authority's trust domain.
        trust_domain: String,
    },
    /// A DNS name that cannot go in a certificate.
    #[error("DNS name {0:?} is not valid")]
    BadDnsName(String),
    /// Key material problem.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A stored authority certificate is unusable.
    #[error("authority certificate is unusable: {0}")]
    BadAuthorityCert(String),
    /// rcgen refused to build the certificate.
    #[error("certificate signing failed: {0}")]
    Sign(String),
    /// JWT minting failed.
    #[error(transparent)]
    Jwt(#[from] JwtError),
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Sign("random number generator failed".into()))?;
    Ok(SerialNumber::from_slice(&bytes))
}

fn random_id(len: usize) -> Result<String, CaError> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Sign("random number generator failed".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// What to put in an X509-SVID. The CSR's own subject and SANs never count.
#[derive(Debug, Clone)]
pub struct X509SvidParams {
    /// The one URI SAN.
    pub spiffe_id: SpiffeId,
    /// Optional DNS SANs.
    pub dns_names: Vec<String>,
    /// Requested lifetime; capped at the authority's NotAfter.
    pub ttl: Duration,
}

/// A signed X509-SVID leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedX509 {
    spiffe_id: SpiffeId,
    /// Leaf first, then any intermediates up to (not including) a root.
    chain: Vec<Vec<u8>>,
    not_after: SystemTime,
}

impl IssuedX509 {
    /// The identity in the URI SAN.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }
    /// The leaf certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.chain[0]
    }
    /// The leaf and the intermediates a verifier needs, DER, leaf first.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }
    /// The certificate's NotAfter.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// A CSR whose proof of possession has been checked.
#[derive(Debug)]
pub struct VerifiedCsr {
    public_key: rcgen::SubjectPublicKeyInfo,
}

/// Parses a DER PKCS#10 CSR and verifies its signature with ring.
pub fn verify_csr(der: &[u8]) -> Result<VerifiedCsr, CaError> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CaError::CsrMalformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::CsrMalformed(format!(
            "{} trailing bytes after the CSR",
            rest.len()
        )));
    }
    let alg = &csr.signature_algorithm.algorithm;
    let allowed = [
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
        OID_SIG_ED25519,
    ];
    if !allowed.contains(alg) {
        return Err(CaError::CsrUnsupportedAlgorithm(alg.to_id_string()));
    }
    csr.verify_signature()
        .map_err(|_| CaError::CsrBadSignature)?;
    let public_key =
        rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|e| CaError::CsrUnsupportedKey(e.to_string()))?;
    Ok(VerifiedCsr { public_key })
}

/// An X.509 signing authority: its certificate and sealed-at-rest key.
pub struct X509Authority {
    id: String,
    trust_domain: TrustDomain,
    cert_der: Vec<u8>,
    key: PrivateKey,
    issuer: Issuer<'static, KeyPair>,
    not_before: SystemTime,
    not_after: SystemTime,
    /// Set when an upstream authority signed it (then it is an intermediate).
    upstream: Option<UpstreamChain>,
}

impl std::fmt::Debug for X509Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Authority")
            .field("id", &self.id)
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &secs(self.not_after))
            .finish_non_exhaustive()
    }
}

impl X509Authority {
    /// Creates a self-signed root for `trust_domain` valid for `ttl` from `now`.
    pub fn self_signed(
        trust_domain: &TrustDomain,
        algorithm: KeyAlgorithm,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let not_after = now.checked_add(ttl).ok_or(CaError::ZeroTtl)?;
        let (params, key, key_pair) =
            authority_params(trust_domain, algorithm, ttl, now, not_after)?;
        let cert = params
            .self_signed(&key_pair)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Self::from_parts(cert.der().to_vec(), key, None)
    }

    /// Creates an intermediate for `trust_domain` signed by `upstream`, valid
    /// for `ttl` from `now` but never past the upstream certificate, and
    /// checks that an SVID it signs verifies against the upstream roots
    /// before anything uses it.
    pub fn signed_by_upstream(
        trust_domain: &TrustDomain,
        algorithm: KeyAlgorithm,
        ttl: Duration,
        now: SystemTime,
        upstream: &Upstream,
    ) -> Result<Self, CaError> {
        let not_after = now
            .checked_add(ttl)
            .ok_or(CaError::ZeroTtl)?
            .min(upstream.not_after());
        if not_after <= now {
            return Err(CaError::BadAuthorityCert(
                "the upstream certificate has expired".into(),
            ));
        }
        let (mut params, key, key_pair) =
            authority_params(trust_domain, algorithm, ttl, now, not_after)?;
        // It signs SVIDs only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = params
            .signed_by(&key_pair, upstream.issuer())
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let authority = Self::from_parts(cert.der().to_vec(), key, Some(upstream.chain().clone()))?;
        authority.verify_against_roots(now)?;
        Ok(authority)
    }

    /// Signs a throwaway SVID and verifies its chain (webpki, as a TLS peer
    /// would) against the roots this authority publishes.
    pub fn verify_against_roots(&self, now: SystemTime) -> Result<(), CaError> {
        let probe = PrivateKey::generate(KeyAlgorithm::EcP256)?;
        let id = SpiffeId::new(&format!("{}/sigil/upstream-check", self.trust_domain.id()))
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let params = X509SvidParams {
            spiffe_id: id,
            dns_names: Vec::new(),
            ttl: Duration::from_secs(60),
        };
        let svid = self.issue_for_private_key(&probe, &params, now)?;
        let roots: Vec<Vec<u8>> = self.roots().map(<[u8]>::to_vec).collect();
        crate::attest::x509pop::verify_chain(&roots, svid.cert_der(), &svid.chain[1..], now)
            .map_err(|e| {
                CaError::BadAuthorityCert(format!(
                    "an SVID it signs does not verify against the upstream roots: {e}"
                ))
            })
    }

    /// Rebuilds an authority from its stored certificate and key, checking
    /// they match; `upstream` when an upstream authority signed it.
    pub fn from_parts(
        cert_der: Vec<u8>,
        key: PrivateKey,
        upstream: Option<UpstreamChain>,
    ) -> Result<Self, CaError> {
        let bad = |m: &str| CaError::BadAuthorityCert(m.to_string());
        let (_, cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| bad(&e.to_string()))?;
        if !cert.is_ca() {
            return Err(bad("not a CA certificate (basicConstraints cA is false)"));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_point()? {
            return Err(bad("private key does not match the certificate"));
        }
        let uri = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
            })
            .ok_or_else(|| bad("no URI SAN naming the trust domain"))?;
        let trust_domain = TrustDomain::new(&uri).map_err(|e| bad(&e.to_string()))?;
        let id = cert
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(ski) => {
                    Some(hex(ski.0))
                }
                _ => None,
            })
            .ok_or_else(|| bad("no SubjectKeyIdentifier"))?;
        let not_before = UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(cert.validity().not_before.timestamp()).unwrap_or_default(),
            );
        let not_after = UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(cert.validity().not_after.timestamp()).unwrap_or_default(),
            );
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key.rcgen_key_pair()?)
            .map_err(|e| bad(&e.to_string()))?;
        Ok(X509Authority {
            id,
            trust_domain,
            cert_der,
            key,
            issuer,
            not_before,
            not_after,
            upstream,
        })
    }

    /// The certificates it publishes as trust anchors: its own when
    /// self-signed, else the upstream roots.
    pub fn roots(&self) -> impl Iterator<Item = &[u8]> {
        let own = std::slice::from_ref(&self.cert_der);
        match &self.upstream {
            Some(u) => u.roots.as_slice(),
            None => own,
        }
        .iter()
        .map(Vec::as_slice)
    }

    /// The chain above it when an upstream authority signed it.
    pub fn upstream(&self) -> Option<&UpstreamChain> {
        self.upstream.as_ref()
    }

    /// The authority's ID: its SubjectKeyIdentifier in hex.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The trust domain it signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    /// Its certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
    /// Its private key (for sealing into the store; never for logging).
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }
    /// Its NotBefore.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }
    /// Its NotAfter.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Verifies a CSR and issues an X509-SVID for its key.
    pub fn issue_from_csr(
        &self,
        csr_der: &[u8],
        params: &X509SvidParams,
        now: SystemTime,
    ) -> Result<IssuedX509, CaError> {
        let csr = verify_csr(csr_der)?;
        self.issue(&csr, params, now)
    }

    /// Issues an X509-SVID for an already verified CSR.
    pub fn issue(
        &self,
        csr: &VerifiedCsr,
        params: &X509SvidParams,
        now: SystemTime,
    ) -> Result<IssuedX509, CaError> {
        self.issue_for_key(&csr.public_key, params, now)
    }

    /// Issues an X509-SVID for a public key generated in this process (the
    /// server's own SVID, operator-minted SVIDs).
    pub fn issue_for_private_key(
        &self,
        key: &PrivateKey,
        params: &X509SvidParams,
        now: SystemTime,
    ) -> Result<IssuedX509, CaError> {
        self.issue_for_key(&key.rcgen_key_pair()?, params, now)
    }

    fn issue_for_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        params: &X509SvidParams,
        now: SystemTime,
    ) -> Result<IssuedX509, CaError> {
        if params.ttl.is_zero() {
            return Err(CaError::ZeroTtl);
        }
        if now >= self.not_after {
            return Err(CaError::AuthorityExpired {
                id: self.id.clone(),
                not_after: secs(self.not_after),
                now: secs(now),
            });
        }
        if !params.spiffe_id.is_member_of(&self.trust_domain) {
            return Err(CaError::WrongTrustDomain {
                id: params.spiffe_id.to_string(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        let mut sans = vec![uri_san(&params.spiffe_id)?];
        for name in &params.dns_names {
            let ia5 = name
                .clone()
                .try_into()
                .ok()
                .filter(|_| crate::x509::valid_dns_name(name))
                .ok_or_else(|| CaError::BadDnsName(name.clone()))?;
            sans.push(SanType::DnsName(ia5));
        }
        // A TTL past the authority's end (even one overflowing the clock) ends with it.
        let not_after = now
            .checked_add(params.ttl)
            .map_or(self.not_after, |t| t.min(self.not_after));
        let mut cert = CertificateParams::default();
        // Empty subject: the identity lives in the (then critical) URI SAN.
        cert.distinguished_name = DistinguishedName::new();
        cert.subject_alt_names = sans;
        cert.is_ca = IsCa::NoCa;
        cert.custom_extensions = vec![leaf_basic_constraints()];
        cert.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        cert.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        cert.serial_number = Some(random_serial()?);
        cert.not_before = (now - BACKDATE).max(self.not_before).into();
        cert.not_after = not_after.into();
        cert.use_authority_key_identifier_extension = true;
        let signed = cert
            .signed_by(public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        // The certificate encodes whole seconds; report what it says.
        let not_after = UNIX_EPOCH + Duration::from_secs(secs(not_after));
        let mut chain = vec![signed.der().to_vec()];
        if let Some(up) = &self.upstream {
            chain.push(self.cert_der.clone());
            chain.extend(up.chain.iter().cloned());
        }
        Ok(IssuedX509 {
            spiffe_id: params.spiffe_id.clone(),
            chain,
            not_after,
        })
    }
}

/// The certificate of a new X.509 authority (before it is signed), its key,
/// and the key as rcgen uses it.
fn authority_params(
    trust_domain: &TrustDomain,
    algorithm: KeyAlgorithm,
    ttl: Duration,
    now: SystemTime,
    not_after: SystemTime,
) -> Result<(CertificateParams, PrivateKey, KeyPair), CaError> {
    if ttl.is_zero() {
        return Err(CaError::ZeroTtl);
    }
    let key = PrivateKey::generate(algorithm)?;
    let key_pair = key.rcgen_key_pair()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Sigil");
    dn.push(
        DnType::CommonName,
        format!("Sigil X.509 authority for {trust_domain}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![uri_san(&trust_domain.id())?];
    params.serial_number = Some(random_serial()?);
    params.not_before = (now - BACKDATE).into();
    params.not_after = not_after.into();
    params.use_authority_key_identifier_extension = true;
    Ok((params, key, key_pair))
}

/// A critical basicConstraints with cA false, encoded as DER requires: an empty
/// SEQUENCE. (rcgen's `ExplicitNoCa` writes the DEFAULT `cA FALSE`, which strict
/// parsers such as Python `cryptography` refuse.)
pub fn leaf_basic_constraints() -> rcgen::CustomExtension {
    const BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
    let mut ext = rcgen::CustomExtension::from_oid_content(BASIC_CONSTRAINTS, vec![0x30, 0x00]);
    ext.set_criticality(true);
    ext
}

fn uri_san(id: &SpiffeId) -> Result<SanType, CaError> {
    let ia5 = id
        .as_str()
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?;
    Ok(SanType::URI(ia5))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A JWT signing authority.
#[derive(Debug)]
pub struct JwtAuthority {
    key: PrivateKey,
    signer: JwtSigner,
    public_key: JwtPublicKey,
    not_after: SystemTime,
}

impl JwtAuthority {
    /// Generates a new JWT authority with a random key ID.
    pub fn generate(
        algorithm: KeyAlgorithm,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        if ttl.is_zero() {
            return Err(CaError::ZeroTtl);
        }
        let key = PrivateKey::generate(algorithm)?;
        let not_after = UNIX_EPOCH + Duration::from_secs(secs(now.checked_add(ttl).unwrap_or(now)));
        Self::from_parts(random_id(24)?, key, not_after)
    }

    /// Rebuilds an authority from stored parts.
    pub fn from_parts(
        kid: String,
        key: PrivateKey,
        not_after: SystemTime,
    ) -> Result<Self, CaError> {
        let curve = match key.algorithm() {
            KeyAlgorithm::EcP256 => EcCurve::P256,
            KeyAlgorithm::EcP384 => EcCurve::P384,
        };
        let public_key =
            JwtPublicKey::ec(curve, key.public_key_point()?).map_err(CaError::BadAuthorityCert)?;
        let signer = JwtSigner::new(kid, &key)?;
        Ok(JwtAuthority {
            key,
            signer,
            public_key,
            not_after,
        })
    }

    /// The key ID.
    pub fn kid(&self) -> &str {
        self.signer.kid()
    }
    /// The public key, for bundles.
    pub fn public_key(&self) -> &JwtPublicKey {
        &self.public_key
    }
    /// The private key (for sealing into the store).
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }
    /// When the authority stops being usable.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Mints a JWT-SVID; `exp` is capped at the authority's expiry.
    pub fn mint(
        &self,
        subject: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
        issuer: Option<&str>,
    ) -> Result<String, CaError> {
        if ttl.is_zero() {
            return Err(CaError::ZeroTtl);
        }
        if now >= self.not_after {
            return Err(CaError::AuthorityExpired {
                id: self.kid().to_string(),
                not_after: secs(self.not_after),
                now: secs(now),
            });
        }
        let remaining = self.not_after.duration_since(now).unwrap_or_default();
        Ok(self
            .signer
            .mint(subject, audience, ttl.min(remaining), now, issuer)?)
    }
}

#[cfg(test)]
mod tests;
