//! CA issuance benchmark. Prints throughput of the full CSR → X509-SVID path
//! and of its raw crypto floor (ring P-256 verify + rcgen sign) measured in
//! the same run, interleaved, and their ratio (target ≥ 0.80).
//! Also JWT-SVID mint and validate throughput.
//!
//! Run: `cargo bench --bench ca` (add `-- --quick` for a short run).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, IsCa, Issuer, KeyUsagePurpose, SanType};
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use sigil::jwt::{self, JwtKeySet};
use sigil::{
    JwtAuthority, KeyAlgorithm, PrivateKey, SpiffeId, TrustDomain, X509Authority, X509SvidParams,
};
use x509_parser::prelude::{FromDer, X509CertificationRequest};

/// Operations per second of `f`, run `n` times.
fn rate(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct RawInput {
    tbs: Vec<u8>,
    sig: Vec<u8>,
    point: Vec<u8>,
    spki: rcgen::SubjectPublicKeyInfo,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, per_round) = if quick { (3, 300) } else { (7, 2000) };
    let now = SystemTime::now();
    let td = TrustDomain::new("example.org").unwrap();
    let ca =
        X509Authority::self_signed(&td, KeyAlgorithm::EcP256, Duration::from_secs(86_400), now)
            .unwrap();
    let id = SpiffeId::new("spiffe://example.org/ns/default/sa/api").unwrap();
    let params = X509SvidParams {
        spiffe_id: id.clone(),
        dns_names: vec![],
        ttl: Duration::from_secs(3600),
    };

    // Distinct keys so nothing is accidentally cached.
    let csrs: Vec<Vec<u8>> = (0..64)
        .map(|_| {
            PrivateKey::generate(KeyAlgorithm::EcP256)
                .unwrap()
                .csr_der("spiffe://example.org/x")
                .unwrap()
        })
        .collect();
    let raw: Vec<RawInput> = csrs
        .iter()
        .map(|der| {
            let (_, csr) = X509CertificationRequest::from_der(der).unwrap();
            let info = &csr.certification_request_info;
            RawInput {
                tbs: info.raw.to_vec(),
                sig: csr.signature_value.data.to_vec(),
                point: info.subject_pki.subject_public_key.data.to_vec(),
                spki: rcgen::SubjectPublicKeyInfo::from_der(info.subject_pki.raw).unwrap(),
            }
        })
        .collect();

    // The floor: the same issuer key and certificate shape, no parsing or checks.
    let issuer_key = rcgen::KeyPair::try_from(ca.key().pkcs8_der()).unwrap();
    let issuer = Issuer::from_ca_cert_der(&ca.cert_der().into(), issuer_key).unwrap();
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = DistinguishedName::new();
    leaf.subject_alt_names = vec![SanType::URI(id.as_str().to_string().try_into().unwrap())];
    leaf.is_ca = IsCa::NoCa;
    leaf.custom_extensions = vec![sigil::ca::leaf_basic_constraints()];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.use_authority_key_identifier_extension = true;

    let mut raw_rates = Vec::new();
    let mut full_rates = Vec::new();
    for _ in 0..rounds {
        raw_rates.push(rate(per_round, |i| {
            let r = &raw[i % raw.len()];
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &r.point)
                .verify(&r.tbs, &r.sig)
                .unwrap();
            black_box(leaf.signed_by(&r.spki, &issuer).unwrap());
        }));
        full_rates.push(rate(per_round, |i| {
            black_box(
                ca.issue_from_csr(&csrs[i % csrs.len()], &params, now)
                    .unwrap(),
            );
        }));
    }
    let raw_rate = median(raw_rates);
    let full_rate = median(full_rates);
    println!("x509 raw floor (ring P-256 verify + rcgen sign): {raw_rate:>10.0} /s");
    println!("x509 CSR -> SVID (X509Authority::issue_from_csr): {full_rate:>10.0} /s");
    println!(
        "ratio issue_from_csr / raw floor: {:.3} (target >= 0.80)",
        full_rate / raw_rate
    );

    let jwt_auth =
        JwtAuthority::generate(KeyAlgorithm::EcP256, Duration::from_secs(86_400), now).unwrap();
    let mut keys = JwtKeySet::new();
    keys.insert(jwt_auth.kid().to_string(), jwt_auth.public_key().clone());
    let aud = vec!["backend".to_string()];
    let token = jwt_auth
        .mint(&id, &aud, Duration::from_secs(300), now, None)
        .unwrap();
    let mut mint_rates = Vec::new();
    let mut validate_rates = Vec::new();
    for _ in 0..rounds {
        mint_rates.push(rate(per_round * 2, |_| {
            black_box(
                jwt_auth
                    .mint(&id, &aud, Duration::from_secs(300), now, None)
                    .unwrap(),
            );
        }));
        validate_rates.push(rate(per_round * 2, |_| {
            black_box(jwt::validate(&token, &td, &keys, "backend", now).unwrap());
        }));
    }
    println!("jwt mint (ES256):     {:>10.0} /s", median(mint_rates));
    println!("jwt validate (ES256): {:>10.0} /s", median(validate_rates));
}
