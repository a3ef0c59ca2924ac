//! Issued SVIDs checked by an independent verifier: `openssl verify -x509_strict`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use sigil::{
    Bundle, KeyAlgorithm, PrivateKey, SpiffeId, TrustDomain, X509Authority, X509SvidParams,
};

pub(crate) fn openssl_available() -> bool {
    let found = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        // CI installs openssl; never let a missing verifier pass silently there.
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl is required in CI"
        );
        eprintln!("skipping: openssl not installed");
    }
    found
}

fn verify(dir: &Path, purpose: &str) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(dir.join("bundle.pem"))
        .arg(dir.join("svid.pem"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn issue(ca: &X509Authority) -> Vec<u8> {
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let csr = key.csr_der("spiffe://example.org/ignored").unwrap();
    let params = X509SvidParams {
        spiffe_id: SpiffeId::new("spiffe://example.org/ns/default/sa/api").unwrap(),
        dns_names: vec!["api.example.org".into()],
        ttl: Duration::from_secs(3600),
    };
    ca.issue_from_csr(&csr, &params, SystemTime::now())
        .unwrap()
        .cert_der()
        .to_vec()
}

#[test]
fn openssl_accepts_svid_against_bundle_and_rejects_foreign_one() {
    if !openssl_available() {
        return;
    }
    let td = TrustDomain::new("example.org").unwrap();
    let dir = tempfile::tempdir().unwrap();
    for alg in [KeyAlgorithm::EcP256, KeyAlgorithm::EcP384] {
        let ca =
            X509Authority::self_signed(&td, alg, Duration::from_secs(86_400), SystemTime::now())
                .unwrap();
        let mut bundle = Bundle::new(td.clone());
        bundle.add_x509_authority(ca.cert_der()).unwrap();
        std::fs::write(dir.path().join("bundle.pem"), bundle.to_pem()).unwrap();
        let leaf = issue(&ca);
        std::fs::write(
            dir.path().join("svid.pem"),
            sigil::x509::certs_to_pem([&leaf]),
        )
        .unwrap();
        for purpose in ["sslclient", "sslserver"] {
            let (ok, out) = verify(dir.path(), purpose);
            assert!(ok, "openssl rejected our SVID ({alg}, {purpose}): {out}");
        }

        // An SVID from another authority of the same trust domain must fail.
        let other =
            X509Authority::self_signed(&td, alg, Duration::from_secs(86_400), SystemTime::now())
                .unwrap();
        let foreign = issue(&other);
        std::fs::write(
            dir.path().join("svid.pem"),
            sigil::x509::certs_to_pem([&foreign]),
        )
        .unwrap();
        let (ok, out) = verify(dir.path(), "sslclient");
        assert!(!ok, "openssl accepted a foreign SVID: {out}");
    }
}
