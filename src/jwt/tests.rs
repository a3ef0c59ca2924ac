use super::*;
use serde_json::json;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn setup() -> (PrivateKey, JwtSigner, JwtKeySet) {
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let signer = JwtSigner::new("kid-1".into(), &key).unwrap();
    let public = JwtPublicKey::ec(EcCurve::P256, key.public_key_point().unwrap()).unwrap();
    let mut keys = JwtKeySet::new();
    keys.insert("kid-1".into(), public);
    (key, signer, keys)
}

/// Signs arbitrary header and claims with `key`, to build hostile tokens.
fn forge(key: &PrivateKey, header: Value, claims: Value) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key
        .ring_key_pair()
        .unwrap()
        .sign(&SystemRandom::new(), input.as_bytes())
        .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn id() -> SpiffeId {
    SpiffeId::new("spiffe://example.org/web").unwrap()
}

fn good_claims() -> Value {
    json!({"sub": "spiffe://example.org/web", "aud": ["a"], "exp": 1_800_000_100u64, "iat": 1_800_000_000u64})
}

#[test]
fn mint_then_validate() {
    let (_, signer, keys) = setup();
    let aud = vec!["a".to_string(), "b".to_string()];
    let token = signer
        .mint(&id(), &aud, Duration::from_secs(300), now(), None)
        .unwrap();
    let v = validate(&token, &td(), &keys, "b", now()).unwrap();
    assert_eq!(v.spiffe_id, id());
    assert_eq!(v.audience, aud);
    assert_eq!(v.expiry, 1_800_000_300);
    assert_eq!(v.claims["iat"], json!(1_800_000_000u64));
    // The header carries exactly alg, kid, typ.
    let header = decode_object(token.split('.').next().unwrap(), "header").unwrap();
    let names: Vec<&str> = header.keys().map(String::as_str).collect();
    assert_eq!(names, ["alg", "kid", "typ"]);
    assert_eq!(header["alg"], "ES256");
}

#[test]
fn es384_authority() {
    let key = PrivateKey::generate(KeyAlgorithm::EcP384).unwrap();
    let signer = JwtSigner::new("k384".into(), &key).unwrap();
    let mut keys = JwtKeySet::new();
    keys.insert(
        "k384".into(),
        JwtPublicKey::ec(EcCurve::P384, key.public_key_point().unwrap()).unwrap(),
    );
    let token = signer
        .mint(&id(), &["a".into()], Duration::from_secs(60), now(), None)
        .unwrap();
    assert!(validate(&token, &td(), &keys, "a", now()).is_ok());
}

#[test]
fn mint_needs_an_audience() {
    let (_, signer, _) = setup();
    assert_eq!(
        signer.mint(&id(), &[], Duration::from_secs(60), now(), None),
        Err(JwtError::NoAudience)
    );
}

#[test]
fn refuses_expired_and_not_yet_valid() {
    let (_, signer, keys) = setup();
    let token = signer
        .mint(&id(), &["a".into()], Duration::from_secs(60), now(), None)
        .unwrap();
    let later = now() + Duration::from_secs(61);
    assert!(matches!(
        validate(&token, &td(), &keys, "a", later),
        Err(JwtError::Expired { .. })
    ));
    let (key, _, keys) = setup();
    let mut claims = good_claims();
    claims["nbf"] = json!(1_800_000_050u64);
    let token = forge(&key, json!({"alg":"ES256","kid":"kid-1"}), claims);
    assert!(matches!(
        validate(&token, &td(), &keys, "a", now()),
        Err(JwtError::NotYetValid { .. })
    ));
}

#[test]
fn refuses_wrong_or_missing_audience() {
    let (key, signer, keys) = setup();
    let token = signer
        .mint(&id(), &["a".into()], Duration::from_secs(60), now(), None)
        .unwrap();
    assert!(matches!(
        validate(&token, &td(), &keys, "other", now()),
        Err(JwtError::AudienceMismatch { .. })
    ));
    let mut claims = good_claims();
    claims.as_object_mut().unwrap().remove("aud");
    let token = forge(&key, json!({"alg":"ES256","kid":"kid-1"}), claims);
    assert_eq!(
        validate(&token, &td(), &keys, "a", now()),
        Err(JwtError::MissingClaim("aud"))
    );
}

#[test]
fn refuses_missing_exp_and_bad_sub() {
    let (key, _, keys) = setup();
    let mut claims = good_claims();
    claims.as_object_mut().unwrap().remove("exp");
    let token = forge(&key, json!({"alg":"ES256","kid":"kid-1"}), claims);
    assert_eq!(
        validate(&token, &td(), &keys, "a", now()),
        Err(JwtError::MissingClaim("exp"))
    );
    let mut claims = good_claims();
    claims["sub"] = json!("not-an-id");
    let token = forge(&key, json!({"alg":"ES256","kid":"kid-1"}), claims);
    assert!(matches!(
        validate(&token, &td(), &keys, "a", now()),
        Err(JwtError::BadSubject(_))
    ));
    let mut claims = good_claims();
    claims["sub"] = json!("spiffe://other.org/web");
    let token = forge(&key, json!({"alg":"ES256","kid":"kid-1"}), claims);
    assert!(matches!(
        validate(&token, &td(), &keys, "a", now()),
        Err(JwtError::WrongTrustDomain { .. })
    ));
}

#[test]
fn refuses_alg_none_and_hmac() {
    let (_, _, keys) = setup();
    let body = URL_SAFE_NO_PAD.encode(good_claims().to_string());
    for alg in ["none", "HS256", "HS512", "EdDSA", "es256"] {
        let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "kid": "kid-1"}).to_string());
        let token = format!("{header}.{body}.");
        assert_eq!(
            validate(&token, &td(), &keys, "a", now()),
            Err(JwtError::DisallowedAlgorithm(alg.into())),
            "{alg}"
        );
    }
}

#[test]
fn refuses_alg_that_does_not_fit_the_key() {
    // An RS256 token against an EC key must fail on the mismatch, never verify.
    let (key, _, keys) = setup();
    let token = forge(&key, json!({"alg":"RS256","kid":"kid-1"}), good_claims());
    assert!(matches!(
        validate(&token, &td(), &keys, "a", now()),
        Err(JwtError::AlgorithmKeyMismatch { .. })
    ));
    let token = forge(&key, json!({"alg":"ES384","kid":"kid-1"}), good_claims());
    assert!(matches!(
        validate(&token, &td(), &keys, "a", now()),
        Err(JwtError::AlgorithmKeyMismatch { .. })
    ));
}

#[test]
fn refuses_unknown_kid_missing_kid_and_extra_headers() {
    let (key, _, keys) = setup();
    let token = forge(&key, json!({"alg":"ES256","kid":"nope"}), good_claims());
    assert_eq!(
        validate(&token, &td(), &keys, "a", now()),
        Err(JwtError::UnknownKid("nope".into()))
    );
    let token = forge(&key, json!({"alg":"ES256"}), good_claims());
    assert_eq!(
        validate(&token, &td(), &keys, "a", now()),
        Err(JwtError::MissingKid)
    );
    let token = forge(
        &key,
        json!({"alg":"ES256","kid":"kid-1","jku":"https://evil"}),
        good_claims(),
    );
    assert_eq!(
        validate(&token, &td(), &keys, "a", now()),
        Err(JwtError::UnexpectedHeader("jku".into()))
    );
    let token = forge(
        &key,
        json!({"alg":"ES256","kid":"kid-1","typ":"at+jwt"}),
        good_claims(),
    );
    assert!(matches!(
        validate(&token, &td(), &keys, "a", now()),
        Err(JwtError::BadType(_))
    ));
    let token = forge(
        &key,
        json!({"alg":"ES256","kid":"kid-1","typ":"JOSE"}),
        good_claims(),
    );
    assert!(validate(&token, &td(), &keys, "a", now()).is_ok());
}

#[test]
fn refuses_tampering_and_other_signers() {
    let (_, signer, keys) = setup();
    let token = signer
        .mint(&id(), &["a".into()], Duration::from_secs(60), now(), None)
        .unwrap();
    // Swap in different claims under the original signature.
    let parts: Vec<&str> = token.split('.').collect();
    let evil = URL_SAFE_NO_PAD.encode(
        json!({"sub":"spiffe://example.org/admin","aud":["a"],"exp":1_900_000_000u64}).to_string(),
    );
    let tampered = format!("{}.{}.{}", parts[0], evil, parts[2]);
    assert_eq!(
        validate(&tampered, &td(), &keys, "a", now()),
        Err(JwtError::BadSignature)
    );
    // Flip one signature bit.
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[5] ^= 1;
    let flipped = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
    assert_eq!(
        validate(&flipped, &td(), &keys, "a", now()),
        Err(JwtError::BadSignature)
    );
    // Same kid, another key.
    let other = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let forged = forge(&other, json!({"alg":"ES256","kid":"kid-1"}), good_claims());
    assert_eq!(
        validate(&forged, &td(), &keys, "a", now()),
        Err(JwtError::BadSignature)
    );
}

#[test]
fn refuses_malformed() {
    let (_, _, keys) = setup();
    assert_eq!(
        validate("a.b", &td(), &keys, "a", now()),
        Err(JwtError::NotCompact(2))
    );
    assert_eq!(
        validate("!!.b.c", &td(), &keys, "a", now()),
        Err(JwtError::Base64("header"))
    );
    let arr = URL_SAFE_NO_PAD.encode("[1]");
    assert!(matches!(
        validate(&format!("{arr}.{arr}.x"), &td(), &keys, "a", now()),
        Err(JwtError::Json { part: "header", .. })
    ));
}

#[test]
fn jwk_round_trip() {
    let (_, _, keys) = setup();
    let k = &keys["kid-1"];
    assert_eq!(&JwtPublicKey::from_jwk(&k.to_jwk()).unwrap(), k);
    let bad = JwkParams {
        kty: "oct".into(),
        ..JwkParams::default()
    };
    assert!(JwtPublicKey::from_jwk(&bad).unwrap_err().contains("oct"));
}
