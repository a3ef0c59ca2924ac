//! An upstream authority on disk: an operator's CA certificate and key that
//! sign Sigil's X.509 authorities, which then are intermediates. The trust
//! bundle carries the upstream root(s) instead of Sigil's own certificates,
//! and every SVID chain carries the intermediate(s) a verifier needs.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{Issuer, KeyPair};
use zeroize::Zeroizing;

use crate::x509::certs_from_pem;

/// Why the upstream authority could not be loaded: the config key (named
/// like its flag), the file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{key} = {path:?}: {reason}")]
pub struct UpstreamError {
    /// `upstream_cert`, `upstream_key` or `upstream_bundle`.
    pub key: &'static str,
    /// The file.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl From<UpstreamError> for crate::config::ConfigError {
    fn from(e: UpstreamError) -> Self {
        crate::config::ConfigError::Invalid {
            key: e.key,
            value: e.path,
            reason: e.reason,
        }
    }
}

/// The certificates a Sigil intermediate hangs from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamChain {
    /// Certificates between the intermediate and a root, nearest first
    /// (empty when the upstream certificate is itself a root).
    pub chain: Vec<Vec<u8>>,
    /// The trust anchors that go in the bundle.
    pub roots: Vec<Vec<u8>>,
}

/// The upstream CA: its certificate (the issuer of Sigil's intermediates),
/// its key, the chain above it and the roots.
pub struct Upstream {
    issuer: Issuer<'static, KeyPair>,
    above: UpstreamChain,
    not_after: SystemTime,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("chain", &self.above.chain.len())
            .field("roots", &self.above.roots.len())
            .finish_non_exhaustive()
    }
}

const CERT: &str = "upstream_cert";
const KEY: &str = "upstream_key";
const BUNDLE: &str = "upstream_bundle";

fn bad(key: &'static str, path: &Path, reason: impl ToString) -> UpstreamError {
    UpstreamError {
        key,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn read(key: &'static str, path: &Path) -> Result<Zeroizing<String>, UpstreamError> {
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| bad(key, path, format!("cannot read: {e}")))
}

impl Upstream {
    /// Loads the upstream CA from PEM files. `cert` holds the upstream CA
    /// certificate first, optionally followed by the certificates above it;
    /// `key` its PKCS#8 private key; `bundle`, when the upstream is itself an
    /// intermediate, the root(s). Checks that the key matches, that the
    /// certificate may sign certificates and is valid at `now`, and that
    /// without a bundle it is a self-signed root.
    pub fn load(
        cert: &Path,
        key: &Path,
        bundle: Option<&Path>,
        now: SystemTime,
    ) -> Result<Self, UpstreamError> {
        let certs =
            certs_from_pem(&read(CERT, cert)?).map_err(|e| bad(CERT, cert, e.to_string()))?;
        let key_pair = KeyPair::from_pem(&read(KEY, key)?).map_err(|e| {
            bad(
                KEY,
                key,
                format!(
                    "not a PKCS#8 private key ({e}); convert one with `openssl pkcs8 -topk8 -nocrypt`"
                ),
            )
        })?;
        let upstream = &certs[0];
        let (_, parsed) = x509_parser::parse_x509_certificate(upstream)
            .map_err(|e| bad(CERT, cert, e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key_pair.public_key_raw() {
            return Err(bad(
                KEY,
                key,
                format!(
                    "the key does not match the certificate in {}",
                    cert.display()
                ),
            ));
        }
        if !parsed.is_ca() {
            return Err(bad(
                CERT,
                cert,
                "not a CA certificate (basicConstraints cA is false)",
            ));
        }
        if let Ok(Some(usage)) = parsed.key_usage() {
            if !usage.value.key_cert_sign() {
                return Err(bad(CERT, cert, "its keyUsage does not allow keyCertSign"));
            }
        }
        let not_after = UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0),
            );
        if not_after <= now {
            return Err(bad(
                CERT,
                cert,
                format!("expired at {}", parsed.validity().not_after),
            ));
        }
        let self_signed =
            parsed.subject() == parsed.issuer() && parsed.verify_signature(None).is_ok();
        let above = match bundle {
            Some(path) => {
                let roots = certs_from_pem(&read(BUNDLE, path)?)
                    .map_err(|e| bad(BUNDLE, path, e.to_string()))?;
                // What the cert file holds that is not a root travels in chains.
                let chain = certs
                    .iter()
                    .filter(|c| !roots.contains(c))
                    .cloned()
                    .collect();
                UpstreamChain { chain, roots }
            }
            None if self_signed => UpstreamChain {
                chain: Vec::new(),
                roots: vec![upstream.clone()],
            },
            None => {
                return Err(bad(
                    CERT,
                    cert,
                    "not self-signed: give its root certificate(s) with --upstream-bundle",
                ));
            }
        };
        let issuer = Issuer::from_ca_cert_der(&upstream.as_slice().into(), key_pair)
            .map_err(|e| bad(CERT, cert, e.to_string()))?;
        Ok(Upstream {
            issuer,
            above,
            not_after,
        })
    }

    /// The issuer that signs intermediates.
    pub(super) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// The chain above an intermediate it signs, and the roots.
    pub fn chain(&self) -> &UpstreamChain {
        &self.above
    }

    /// The upstream certificate's NotAfter: no intermediate outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ca::{X509Authority, X509SvidParams};
    use crate::spiffe::{SpiffeId, TrustDomain};
    use crate::x509::{KeyAlgorithm, PrivateKey, certs_to_pem};
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    /// A CA certificate named `cn` (self-signed without `issuer`), its key.
    fn ca(
        cn: &str,
        issuer: Option<&Issuer<'static, KeyPair>>,
        constraint: BasicConstraints,
        days: u64,
    ) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(constraint);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = (now() - Duration::from_secs(3600)).into();
        p.not_after = (now() + Duration::from_secs(days * 86_400)).into();
        let cert = match issuer {
            Some(i) => p.signed_by(&key, i).unwrap(),
            None => p.self_signed(&key).unwrap(),
        };
        (cert.der().to_vec(), key)
    }

    fn issuer(der: &[u8], key: KeyPair) -> Issuer<'static, KeyPair> {
        Issuer::from_ca_cert_der(&der.into(), key).unwrap()
    }

    struct Files(tempfile::TempDir);

    impl Files {
        fn new() -> Self {
            Files(tempfile::tempdir().unwrap())
        }
        fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
            let p = self.0.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
        fn certs(&self, name: &str, ders: &[&Vec<u8>]) -> std::path::PathBuf {
            self.write(name, &certs_to_pem(ders.iter().copied()))
        }
    }

    fn sign_svid(a: &X509Authority) -> crate::ca::IssuedX509 {
        let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
        let params = X509SvidParams {
            spiffe_id: SpiffeId::new("spiffe://example.org/w").unwrap(),
            dns_names: vec![],
            ttl: Duration::from_secs(600),
        };
        a.issue_for_private_key(&key, &params, now()).unwrap()
    }

    /// A self-signed upstream root valid around `at`, loaded from files.
    pub(crate) fn root_upstream(at: SystemTime) -> (Upstream, Vec<u8>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "Test Upstream Root");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.not_before = (at - Duration::from_secs(3600)).into();
        p.not_after = (at + Duration::from_secs(3650 * 86_400)).into();
        let root = p.self_signed(&key).unwrap().der().to_vec();
        let f = Files::new();
        let cert = f.certs("root.pem", &[&root]);
        let key = f.write("root.key", &key.serialize_pem());
        (Upstream::load(&cert, &key, None, at).unwrap(), root)
    }

    #[test]
    fn a_root_upstream_signs_intermediates_whose_svids_chain_to_it() {
        let (root, root_key) = ca("Upstream Root", None, BasicConstraints::Unconstrained, 3650);
        let f = Files::new();
        let cert = f.certs("root.pem", &[&root]);
        let key = f.write("root.key", &root_key.serialize_pem());
        let up = Upstream::load(&cert, &key, None, now()).unwrap();
        assert_eq!(up.chain().roots, vec![root.clone()]);
        assert!(up.chain().chain.is_empty());

        let td = TrustDomain::new("example.org").unwrap();
        let a = X509Authority::signed_by_upstream(
            &td,
            KeyAlgorithm::EcP256,
            Duration::from_secs(86_400),
            now(),
            &up,
        )
        .unwrap();
        assert_eq!(a.roots().collect::<Vec<_>>(), vec![root.as_slice()]);
        let svid = sign_svid(&a);
        assert_eq!(svid.chain().len(), 2, "leaf and intermediate");
        assert_eq!(svid.chain()[1], a.cert_der());
        crate::attest::x509pop::verify_chain(&[root], svid.cert_der(), &svid.chain()[1..], now())
            .unwrap();
        // Its SKI is its ID; it may sign leaves only.
        let (_, inter) = x509_parser::parse_x509_certificate(a.cert_der()).unwrap();
        let bc = inter.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca && bc.path_len_constraint == Some(0));
    }

    #[test]
    fn an_intermediate_upstream_needs_its_roots_and_rides_in_every_chain() {
        let (root, root_key) = ca("Root", None, BasicConstraints::Unconstrained, 3650);
        let root_issuer = issuer(&root, root_key);
        let (mid, mid_key) = ca(
            "Mid",
            Some(&root_issuer),
            BasicConstraints::Constrained(1),
            30,
        );
        let f = Files::new();
        let cert = f.certs("mid.pem", &[&mid]);
        let key = f.write("mid.key", &mid_key.serialize_pem());
        let err = Upstream::load(&cert, &key, None, now()).unwrap_err();
        assert!(err.to_string().contains("--upstream-bundle"), "{err}");
        assert_eq!(err.key, "upstream_cert");

        let roots = f.certs("roots.pem", &[&root]);
        let up = Upstream::load(&cert, &key, Some(&roots), now()).unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        // Asked for 90 days, it ends with the upstream certificate (30 days).
        let a = X509Authority::signed_by_upstream(
            &td,
            KeyAlgorithm::EcP256,
            Duration::from_secs(90 * 86_400),
            now(),
            &up,
        )
        .unwrap();
        assert_eq!(a.not_after(), up.not_after());
        let svid = sign_svid(&a);
        assert_eq!(
            svid.chain().len(),
            3,
            "leaf, Sigil's intermediate, the upstream"
        );
        assert_eq!(svid.chain()[2], mid);
        crate::attest::x509pop::verify_chain(&[root], svid.cert_der(), &svid.chain()[1..], now())
            .unwrap();
    }

    #[test]
    fn unusable_upstreams_are_refused_with_the_reason() {
        let f = Files::new();
        let (root, root_key) = ca("Root", None, BasicConstraints::Unconstrained, 3650);
        let (other, _) = ca("Other", None, BasicConstraints::Unconstrained, 3650);
        let cert = f.certs("root.pem", &[&root]);
        let key = f.write("root.key", &root_key.serialize_pem());
        let td = TrustDomain::new("example.org").unwrap();
        let load = |c: &Path, k: &Path, b: Option<&Path>, at| {
            Upstream::load(c, k, b, at)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };

        let other_key = f.write(
            "other.key",
            &KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .unwrap()
                .serialize_pem(),
        );
        assert!(load(&cert, &other_key, None, now()).contains("does not match"));
        let missing = f.0.path().join("missing.pem");
        assert!(load(&missing, &key, None, now()).contains("cannot read"));
        let junk = f.write(
            "junk.key",
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        );
        assert!(load(&cert, &junk, None, now()).contains("PKCS#8"));
        let later = now() + Duration::from_secs(3651 * 86_400);
        assert!(load(&cert, &key, None, later).contains("expired"));

        // A leaf cannot be an upstream CA.
        let root_issuer = issuer(&root, KeyPair::from_pem(&root_key.serialize_pem()).unwrap());
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "leaf");
        p.not_before = (now() - Duration::from_secs(60)).into();
        p.not_after = (now() + Duration::from_secs(86_400)).into();
        let leaf = p.signed_by(&leaf_key, &root_issuer).unwrap().der().to_vec();
        let leaf_cert = f.certs("leaf.pem", &[&leaf]);
        let leaf_key = f.write("leaf.key", &leaf_key.serialize_pem());
        let roots = f.certs("roots.pem", &[&root]);
        assert!(load(&leaf_cert, &leaf_key, Some(&roots), now()).contains("not a CA"));

        // An upstream whose path length forbids another CA below it: the
        // intermediate is minted, fails the check against the roots, and is
        // never used.
        let (mid, mid_key) = ca(
            "Mid",
            Some(&root_issuer),
            BasicConstraints::Constrained(0),
            30,
        );
        let mid_cert = f.certs("mid.pem", &[&mid]);
        let mid_key = f.write("mid.key", &mid_key.serialize_pem());
        let up = Upstream::load(&mid_cert, &mid_key, Some(&roots), now()).unwrap();
        let err = X509Authority::signed_by_upstream(
            &td,
            KeyAlgorithm::EcP256,
            Duration::from_secs(86_400),
            now(),
            &up,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("does not verify against the upstream roots"),
            "{err}"
        );

        // Roots that are not the upstream's: refused the same way.
        let wrong = f.certs("wrong.pem", &[&other]);
        let up = Upstream::load(&mid_cert, &mid_key, Some(&wrong), now()).unwrap();
        assert!(
            X509Authority::signed_by_upstream(
                &td,
                KeyAlgorithm::EcP256,
                Duration::from_secs(86_400),
                now(),
                &up
            )
            .is_err()
        );
    }
}
