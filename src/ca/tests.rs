//! Issued certificates are checked with x509-parser, not with the code that
//! built them, against every SPIFFE X509-SVID rule and the RFC 5280 ones.

use super::*;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::X509Certificate;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn authority() -> X509Authority {
    X509Authority::self_signed(
        &td(),
        KeyAlgorithm::EcP256,
        Duration::from_secs(86_400),
        now(),
    )
    .unwrap()
}

fn params(ttl: u64) -> X509SvidParams {
    X509SvidParams {
        spiffe_id: SpiffeId::new("spiffe://example.org/ns/default/sa/api").unwrap(),
        dns_names: vec![],
        ttl: Duration::from_secs(ttl),
    }
}

fn csr_for(key: &PrivateKey) -> Vec<u8> {
    // The CSR asks for another identity; the CA must ignore it.
    key.csr_der("spiffe://example.org/admin").unwrap()
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every rule an X509-SVID leaf must satisfy, checked independently.
fn assert_leaf_rules(der: &[u8], ca: &X509Authority, expected_id: &str) {
    let cert = parse(der);
    let ca_cert = parse(ca.cert_der());
    assert_eq!(
        uri_sans(&cert),
        vec![expected_id.to_string()],
        "exactly one URI SAN"
    );
    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca, "leaf must have cA=false");
    let ku = cert.key_usage().unwrap().expect("keyUsage present");
    assert!(ku.critical, "keyUsage must be critical");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    assert!(
        !ku.value.key_encipherment(),
        "EC leaf keys get no keyEncipherment"
    );
    let eku = cert.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    if cert.subject().iter().next().is_none() {
        assert!(
            san.critical,
            "URI SAN must be critical when the subject is empty"
        );
    }
    // Serial: positive and at least 128 bits of randomness (16 bytes; DER may add a 0x00).
    let serial = cert.raw_serial();
    let significant = serial.iter().skip_while(|b| **b == 0).count();
    assert!(
        significant >= 15 && serial.len() <= 17,
        "serial {serial:02x?}"
    );
    // AKI = issuer's SKI; issuer = CA subject.
    let aki = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.clone(),
            _ => None,
        })
        .expect("leaf has an AuthorityKeyIdentifier");
    assert_eq!(hex(aki.0), ca.id());
    assert_eq!(cert.issuer(), ca_cert.subject());
    assert!(cert.issuer().iter().next().is_some(), "non-empty issuer");
    // The signature verifies with the CA's key.
    cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    // Not after the CA.
    assert!(cert.validity().not_after <= ca_cert.validity().not_after);
}

#[test]
fn authority_certificate_meets_signing_cert_rules() {
    for alg in [KeyAlgorithm::EcP256, KeyAlgorithm::EcP384] {
        let ca = X509Authority::self_signed(&td(), alg, Duration::from_secs(3600), now()).unwrap();
        let cert = parse(ca.cert_der());
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(
            bc.value.ca && bc.critical,
            "critical basicConstraints cA=true"
        );
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign());
        assert_eq!(uri_sans(&cert), vec!["spiffe://example.org".to_string()]);
        assert!(cert.subject().iter().next().is_some(), "non-empty subject");
        let ski = cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(hex(k.0)),
                _ => None,
            })
            .expect("SubjectKeyIdentifier");
        assert_eq!(ski, ca.id());
        cert.verify_signature(None).unwrap();
        assert_eq!(
            cert.validity().not_before.timestamp(),
            1_800_000_000 - 10,
            "backdated 10 s"
        );
        assert_eq!(cert.validity().not_after.timestamp(), 1_800_000_000 + 3600);
    }
}

#[test]
fn issues_svid_from_csr_with_every_rule() {
    let ca = authority();
    for alg in [KeyAlgorithm::EcP256, KeyAlgorithm::EcP384] {
        let key = PrivateKey::generate(alg).unwrap();
        let svid = ca
            .issue_from_csr(&csr_for(&key), &params(3600), now())
            .unwrap();
        assert_leaf_rules(
            svid.cert_der(),
            &ca,
            "spiffe://example.org/ns/default/sa/api",
        );
        let cert = parse(svid.cert_der());
        // The certificate carries the CSR's key.
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_point().unwrap().as_slice()
        );
        assert_eq!(cert.validity().not_before.timestamp(), 1_800_000_000 - 10);
        assert_eq!(cert.validity().not_after.timestamp(), 1_800_000_000 + 3600);
        assert_eq!(svid.not_after(), now() + Duration::from_secs(3600));
    }
}

#[test]
fn serials_differ() {
    let ca = authority();
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let a = ca.issue_for_private_key(&key, &params(60), now()).unwrap();
    let b = ca.issue_for_private_key(&key, &params(60), now()).unwrap();
    assert_ne!(
        parse(a.cert_der()).raw_serial(),
        parse(b.cert_der()).raw_serial()
    );
}

#[test]
fn not_after_is_capped_at_the_authority() {
    let ca = authority();
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let svid = ca
        .issue_for_private_key(&key, &params(10 * 86_400), now())
        .unwrap();
    let cert = parse(svid.cert_der());
    assert_eq!(
        cert.validity().not_after.timestamp(),
        parse(ca.cert_der()).validity().not_after.timestamp()
    );
    assert_eq!(svid.not_after(), ca.not_after());
}

#[test]
fn dns_names_are_added_and_validated() {
    let ca = authority();
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let mut p = params(60);
    p.dns_names = vec!["api.example.org".into()];
    let svid = ca.issue_for_private_key(&key, &p, now()).unwrap();
    let cert = parse(svid.cert_der());
    let dns: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(dns, ["api.example.org"]);
    assert_eq!(uri_sans(&cert).len(), 1);
    p.dns_names = vec!["bad name".into()];
    assert!(matches!(
        ca.issue_for_private_key(&key, &p, now()),
        Err(CaError::BadDnsName(n)) if n == "bad name"
    ));
}

#[test]
fn refuses_bad_csrs() {
    let ca = authority();
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let mut csr = csr_for(&key);
    assert!(matches!(
        ca.issue_from_csr(b"garbage", &params(60), now()),
        Err(CaError::CsrMalformed(_))
    ));
    // Flip a bit in the signature (the last byte): proof of possession fails.
    let last = csr.len() - 1;
    csr[last] ^= 1;
    let err = ca.issue_from_csr(&csr, &params(60), now()).unwrap_err();
    assert!(matches!(err, CaError::CsrBadSignature), "{err}");
    assert!(err.to_string().contains("proof of possession"));
    let mut trailing = csr_for(&key);
    trailing.push(0);
    assert!(matches!(
        ca.issue_from_csr(&trailing, &params(60), now()),
        Err(CaError::CsrMalformed(m)) if m.contains("trailing")
    ));
}

#[test]
fn refuses_zero_ttl_foreign_ids_and_expired_authority() {
    let ca = authority();
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    assert!(matches!(
        ca.issue_for_private_key(&key, &params(0), now()),
        Err(CaError::ZeroTtl)
    ));
    let mut p = params(60);
    p.spiffe_id = SpiffeId::new("spiffe://other.org/x").unwrap();
    assert!(matches!(
        ca.issue_for_private_key(&key, &p, now()),
        Err(CaError::WrongTrustDomain { .. })
    ));
    let later = now() + Duration::from_secs(86_400 * 2);
    assert!(matches!(
        ca.issue_for_private_key(&key, &params(60), later),
        Err(CaError::AuthorityExpired { .. })
    ));
}

#[test]
fn authority_reloads_from_parts_and_rejects_mismatched_key() {
    let ca = authority();
    let again = X509Authority::from_parts(ca.cert_der().to_vec(), ca.key().clone(), None).unwrap();
    assert_eq!(again.id(), ca.id());
    assert_eq!(again.trust_domain(), &td());
    assert_eq!(again.not_after(), ca.not_after());
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let svid = again
        .issue_for_private_key(&key, &params(60), now())
        .unwrap();
    assert_leaf_rules(
        svid.cert_der(),
        &ca,
        "spiffe://example.org/ns/default/sa/api",
    );
    let other = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    assert!(matches!(
        X509Authority::from_parts(ca.cert_der().to_vec(), other, None),
        Err(CaError::BadAuthorityCert(m)) if m.contains("does not match")
    ));
    // A leaf is not an authority.
    assert!(X509Authority::from_parts(svid.cert_der().to_vec(), key, None).is_err());
}

#[test]
fn jwt_authority_mints_validatable_tokens_capped_at_expiry() {
    let auth =
        JwtAuthority::generate(KeyAlgorithm::EcP256, Duration::from_secs(600), now()).unwrap();
    let mut keys = crate::jwt::JwtKeySet::new();
    keys.insert(auth.kid().to_string(), auth.public_key().clone());
    let id = SpiffeId::new("spiffe://example.org/web").unwrap();
    let token = auth
        .mint(&id, &["aud".into()], Duration::from_secs(3600), now(), None)
        .unwrap();
    let v = crate::jwt::validate(&token, &td(), &keys, "aud", now()).unwrap();
    assert_eq!(v.spiffe_id, id);
    assert_eq!(v.expiry, 1_800_000_600, "capped at the authority's expiry");
    let reloaded =
        JwtAuthority::from_parts(auth.kid().into(), auth.key().clone(), auth.not_after()).unwrap();
    assert_eq!(reloaded.public_key(), auth.public_key());
    assert!(matches!(
        auth.mint(
            &id,
            &["a".into()],
            Duration::from_secs(1),
            now() + Duration::from_secs(601),
            None
        ),
        Err(CaError::AuthorityExpired { .. })
    ));
}

#[test]
fn bundle_jwks_and_pem_round_trip() {
    let a = authority();
    let b = X509Authority::self_signed(&td(), KeyAlgorithm::EcP384, Duration::from_secs(60), now())
        .unwrap();
    let jwt = JwtAuthority::generate(KeyAlgorithm::EcP256, Duration::from_secs(60), now()).unwrap();
    let mut bundle = crate::x509::Bundle::new(td());
    bundle.add_x509_authority(a.cert_der()).unwrap();
    bundle.add_x509_authority(b.cert_der()).unwrap();
    bundle.add_x509_authority(a.cert_der()).unwrap();
    assert_eq!(bundle.x509_authorities().len(), 2, "duplicates are ignored");
    bundle.add_jwt_authority(jwt.kid().into(), jwt.public_key().clone());
    bundle.set_sequence(7);
    bundle.set_refresh_hint(Some(300));

    let jwks = bundle.to_jwks();
    let doc: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    assert_eq!(doc["spiffe_sequence"], 7);
    assert_eq!(doc["spiffe_refresh_hint"], 300);
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    for k in &keys[..2] {
        assert_eq!(k["use"], "x509-svid");
        assert_eq!(k["x5c"].as_array().unwrap().len(), 1);
        assert!(k.get("kid").is_none(), "X.509 authorities carry no kid");
        assert_eq!(k["kty"], "EC");
    }
    assert_eq!(keys[2]["use"], "jwt-svid");
    assert_eq!(keys[2]["kid"], jwt.kid());
    assert!(keys[2].get("x5c").is_none());
    assert_eq!(crate::x509::Bundle::from_jwks(td(), &jwks).unwrap(), bundle);

    let pem = bundle.to_pem();
    let from_pem = crate::x509::Bundle::from_pem(td(), &pem).unwrap();
    assert_eq!(from_pem.x509_authorities(), bundle.x509_authorities());
    assert_eq!(from_pem.to_pem(), pem);
}

#[test]
fn bundle_parsing_errors_name_the_key() {
    use crate::x509::{Bundle, BundleError};
    let e = Bundle::from_jwks(td(), "{}").unwrap_err();
    assert!(
        matches!(&e, BundleError::Json(m) if m.contains("keys")),
        "{e}"
    );
    let e = Bundle::from_jwks(td(), r#"{"keys":[{"kty":"EC","use":"sig"}]}"#).unwrap_err();
    assert_eq!(
        e,
        BundleError::Use {
            index: 0,
            value: "sig".into()
        }
    );
    let e = Bundle::from_jwks(td(), r#"{"keys":[{"kty":"EC","use":"x509-svid"}]}"#).unwrap_err();
    assert_eq!(e, BundleError::X5cCount { index: 0, count: 0 });
    let e = Bundle::from_jwks(
        td(),
        r#"{"keys":[{"kty":"EC","use":"x509-svid","x5c":["AAAA"]}]}"#,
    )
    .unwrap_err();
    assert!(matches!(e, BundleError::Cert { index: 0, .. }));
    let e = Bundle::from_jwks(
        td(),
        r#"{"keys":[{"kty":"EC","use":"jwt-svid","crv":"P-256"}]}"#,
    )
    .unwrap_err();
    assert_eq!(e, BundleError::MissingKid { index: 0 });
    let e = Bundle::from_jwks(
        td(),
        r#"{"keys":[{"kty":"EC","use":"jwt-svid","kid":"k","crv":"P-256","x":"AA","y":"AA"}]}"#,
    )
    .unwrap_err();
    assert!(
        matches!(&e, BundleError::Key { index: 0, reason } if reason.contains("32 bytes")),
        "{e}"
    );
    let e = Bundle::from_pem(
        td(),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("expected \"CERTIFICATE\""), "{e}");
}
