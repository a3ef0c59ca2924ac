//! Table tests written from Istio's documented AuthorizationPolicy behaviour.

use std::path::Path;

use super::*;

fn set(yaml: &str) -> PolicySet {
    let mut s = PolicySet::default();
    parse_file(Path::new("test.yaml"), yaml, &mut s).unwrap();
    s
}

fn err(yaml: &str) -> PolicyError {
    let mut s = PolicySet::default();
    parse_file(Path::new("bad.yaml"), yaml, &mut s).unwrap_err()
}

fn req(src: &str, method: &str, path: &str) -> Request {
    Request {
        source_principal: (!src.is_empty()).then(|| src.to_string()),
        source_ip: Some("10.1.2.3".parse().unwrap()),
        destination_principal: Some("spiffe://cluster.local/ns/foo/sa/httpbin".into()),
        destination_labels: [("app".to_string(), "httpbin".to_string())].into(),
        destination_port: Some(8080),
        method: method.into(),
        path: path.into(),
        host: "httpbin.foo.svc".into(),
        ..Request::default()
    }
}

const SLEEP: &str = "spiffe://cluster.local/ns/foo/sa/sleep";
const OTHER: &str = "spiffe://cluster.local/ns/bar/sa/other";

fn decide(yaml: &str, r: &Request) -> Decision {
    Evaluator::new(set(yaml), "istio-system").evaluate(r)
}

const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: foo\n";

fn policy(spec: &str) -> String {
    format!("{HEAD}spec:\n{spec}")
}

#[test]
fn no_policy_allows_and_allow_nothing_denies() {
    assert!(decide("", &req(SLEEP, "GET", "/")).allow);
    let d = decide(&format!("{HEAD}spec: {{}}\n"), &req(SLEEP, "GET", "/"));
    assert!(!d.allow, "spec: {{}} with ALLOW allows nothing");
    assert!(
        d.explanation.iter().any(|e| e.contains("has no rules")),
        "{:?}",
        d.explanation
    );
    let d = decide(&policy("  rules:\n  - {}\n"), &req("", "DELETE", "/x"));
    assert!(d.allow, "rules: [{{}}] allows all");
    assert_eq!((d.policy.as_deref(), d.rule), (Some("foo/p"), Some(0)));
}

#[test]
fn deny_takes_precedence_over_allow() {
    let yaml = format!(
        "{}---\n{}",
        policy("  rules:\n  - {}\n"),
        policy(
            "  action: DENY\n  rules:\n  - to:\n    - operation:\n        methods: [\"DELETE\"]\n"
        )
        .replace("name: p", "name: d")
    );
    assert!(decide(&yaml, &req(SLEEP, "GET", "/")).allow);
    let d = decide(&yaml, &req(SLEEP, "DELETE", "/"));
    assert!(!d.allow);
    assert_eq!(d.status, 403);
    assert_eq!(d.policy.as_deref(), Some("foo/d"));
}

#[test]
fn sources_operations_and_not_forms() {
    let yaml = policy(
        "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/foo/sa/sleep\"]\n    to:\n    - operation:\n        methods: [\"GET\"]\n        notPaths: [\"/admin*\"]\n",
    );
    assert!(decide(&yaml, &req(SLEEP, "GET", "/data")).allow);
    let d = decide(&yaml, &req(SLEEP, "GET", "/admin/x"));
    assert!(!d.allow);
    assert!(
        d.explanation
            .iter()
            .any(|e| e.contains("paths") && e.contains("excluded")),
        "{:?}",
        d.explanation
    );
    let d = decide(&yaml, &req(OTHER, "GET", "/data"));
    assert!(!d.allow);
    assert!(
        d.explanation.iter().any(|e| e.contains("principals")),
        "{:?}",
        d.explanation
    );
    assert!(
        !decide(&yaml, &req(SLEEP, "POST", "/data")).allow,
        "fields in one operation are ANDed"
    );
    assert!(
        !decide(&yaml, &req("", "GET", "/data")).allow,
        "no peer principal"
    );

    let ns = policy("  rules:\n  - from:\n    - source:\n        notNamespaces: [\"bar\"]\n");
    assert!(decide(&ns, &req(SLEEP, "GET", "/")).allow);
    assert!(!decide(&ns, &req(OTHER, "GET", "/")).allow);
    // DENY with notPrincipals: ["*"] denies requests without mTLS.
    let no_mtls = policy(
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"*\"]\n",
    );
    assert!(!decide(&no_mtls, &req("", "GET", "/")).allow);
    assert!(decide(&no_mtls, &req(SLEEP, "GET", "/")).allow);
}

#[test]
fn path_wildcards_hosts_ports_and_ip_blocks() {
    for (pattern, path, want) in [
        ("/api/*", "/api/v1", true),
        ("/api/*", "/apix", false),
        ("*.png", "/img/a.png", true),
        ("*", "/anything", true),
        ("/exact", "/exact", true),
        ("/exact", "/exact/", false),
    ] {
        let yaml = policy(&format!(
            "  rules:\n  - to:\n    - operation:\n        paths: [\"{pattern}\"]\n"
        ));
        assert_eq!(
            decide(&yaml, &req(SLEEP, "GET", path)).allow,
            want,
            "{pattern} vs {path}"
        );
    }
    let hosts = policy(
        "  rules:\n  - to:\n    - operation:\n        hosts: [\"HTTPBIN.foo.svc\"]\n        ports: [\"8080\"]\n",
    );
    assert!(
        decide(&hosts, &req(SLEEP, "GET", "/")).allow,
        "hosts are case-insensitive"
    );
    let mut r = req(SLEEP, "GET", "/");
    r.destination_port = Some(9090);
    assert!(!decide(&hosts, &r).allow);
    let ips = policy(
        "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/8\"]\n        notIpBlocks: [\"10.1.2.0/24\"]\n",
    );
    assert!(!decide(&ips, &req(SLEEP, "GET", "/")).allow);
    let mut r = req(SLEEP, "GET", "/");
    r.source_ip = Some("10.9.9.9".parse().unwrap());
    assert!(decide(&ips, &r).allow);
}

#[test]
fn conditions_headers_and_nested_claims() {
    let yaml = policy(
        "  rules:\n  - when:\n    - key: request.headers[X-Env]\n      values: [\"prod\"]\n    - key: request.auth.claims[realm][roles]\n      values: [\"admin\"]\n",
    );
    let mut r = req(SLEEP, "GET", "/");
    r.headers.insert("x-env".into(), "prod".into());
    assert!(
        !decide(&yaml, &r).allow,
        "no JWT: the claim condition fails"
    );
    let claims = serde_json::json!({"realm": {"roles": ["user", "admin"]}});
    r.auth = Some(RequestAuth {
        principal: "https://issuer/alice".into(),
        claims: claims.as_object().unwrap().clone(),
        ..RequestAuth::default()
    });
    let d = decide(&yaml, &r);
    assert!(d.allow, "{:?}", d.explanation);
    r.headers.insert("x-env".into(), "dev".into());
    assert!(!decide(&yaml, &r).allow);
    let rp = policy(
        "  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"https://issuer/*\"]\n",
    );
    let mut with_jwt = req(SLEEP, "GET", "/");
    with_jwt.auth = r.auth.clone();
    assert!(decide(&rp, &with_jwt).allow);
    assert!(!decide(&rp, &req(SLEEP, "GET", "/")).allow);
}

#[test]
fn scope_root_namespace_other_namespace_and_selector() {
    let root = policy("  action: DENY\n  rules:\n  - {}\n")
        .replace("namespace: foo", "namespace: istio-system");
    assert!(
        !decide(&root, &req(SLEEP, "GET", "/")).allow,
        "root namespace applies mesh-wide"
    );
    let other =
        policy("  action: DENY\n  rules:\n  - {}\n").replace("namespace: foo", "namespace: bar");
    assert!(
        decide(&other, &req(SLEEP, "GET", "/")).allow,
        "another namespace's policy does not apply"
    );
    let sel = policy(
        "  selector:\n    matchLabels:\n      app: other\n  action: DENY\n  rules:\n  - {}\n",
    );
    assert!(
        decide(&sel, &req(SLEEP, "GET", "/")).allow,
        "selector does not match the destination"
    );
    let sel = sel.replace("app: other", "app: httpbin");
    assert!(!decide(&sel, &req(SLEEP, "GET", "/")).allow);
}

#[test]
fn audit_and_dry_run_never_change_the_decision() {
    let audit = policy("  action: AUDIT\n  rules:\n  - {}\n");
    let d = decide(&audit, &req(SLEEP, "GET", "/"));
    assert!(d.allow && d.audit);
    let dry = policy("  action: DENY\n  rules:\n  - {}\n").replace(
        "  namespace: foo\n",
        "  namespace: foo\n  annotations:\n    istio.io/dry-run: \"true\"\n",
    );
    let d = decide(&dry, &req(SLEEP, "GET", "/"));
    assert!(d.allow);
    assert!(
        d.explanation.iter().any(|e| e.contains("dry-run")),
        "{:?}",
        d.explanation
    );
}

#[test]
fn bad_documents_name_file_document_and_field() {
    let e = err(&format!(
        "{}---\n{}",
        policy("  rules:\n  - {}\n"),
        policy("  rules:\n  - from:\n    - source:\n        principalz: [\"x\"]\n")
    ));
    assert_eq!(e.document, 1);
    assert!(e.path.contains("rules[0].from[0].source"), "{e}");
    assert!(e.reason.contains("principalz"), "{e}");
    assert!(e.to_string().starts_with("bad.yaml: document 1:"), "{e}");

    let e = err(&policy("  action: CUSTOM\n"));
    assert_eq!(e.path, "spec.action");
    assert!(e.reason.contains("CUSTOM"));
    let e = err(&policy(
        "  rules:\n  - when:\n    - key: request.bogus\n      values: [\"x\"]\n",
    ));
    assert_eq!(e.path, "spec.rules[0].when[0].key");
    let e = err(&policy(
        "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/33\"]\n",
    ));
    assert_eq!(e.path, "spec.rules[0].from[0].source.ipBlocks[0]");
    let e = err(&policy(
        "  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n",
    ));
    assert_eq!(e.path, "spec.rules[0].to[0].operation.ports[0]");
    let e = err(&HEAD.replace("security.istio.io/v1", "networking.istio.io/v1"));
    assert_eq!(e.path, "apiVersion");
    let e = err(&format!("{HEAD}spec:\n  rules: []\nextra: 1\n"));
    assert!(e.reason.contains("extra"), "{e}");
}

#[test]
fn load_dir_reads_yaml_files_in_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        policy("  rules:\n  - {}\n").replace("name: p", "name: b"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("a.yml"),
        policy("  rules:\n  - {}\n").replace("name: p", "name: a"),
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
    let s = load_dir(dir.path()).unwrap();
    let names: Vec<&str> = s.authorization.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    std::fs::write(dir.path().join("c.yaml"), "kind: [").unwrap();
    let e = load_dir(dir.path()).unwrap_err();
    assert!(e.file.ends_with("c.yaml"), "{e}");
}

fn peer(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}---\n"
    )
}

#[test]
fn peer_authentication_precedence_and_port_levels() {
    let plaintext = req("", "GET", "/");
    let mtls = req(SLEEP, "GET", "/");
    // Nothing set: PERMISSIVE.
    assert!(decide("", &plaintext).allow);
    // Mesh STRICT denies plaintext, allows mTLS.
    let mesh = peer("default", "istio-system", "  mtls:\n    mode: STRICT\n");
    let d = decide(&mesh, &plaintext);
    assert!(!d.allow);
    assert_eq!(d.policy.as_deref(), Some("istio-system/default"));
    assert!(d.explanation[0].contains("STRICT"), "{:?}", d.explanation);
    assert!(decide(&mesh, &mtls).allow);
    // The namespace overrides the mesh; UNSET inherits.
    let ns_permissive = format!(
        "{mesh}{}",
        peer("ns", "foo", "  mtls:\n    mode: PERMISSIVE\n")
    );
    assert!(decide(&ns_permissive, &plaintext).allow);
    let ns_unset = format!("{mesh}{}", peer("ns", "foo", "  mtls:\n    mode: UNSET\n"));
    assert!(!decide(&ns_unset, &plaintext).allow);
    // Another namespace's policy does not apply.
    let other_ns = format!(
        "{mesh}{}",
        peer("ns", "bar", "  mtls:\n    mode: DISABLE\n")
    );
    assert!(!decide(&other_ns, &plaintext).allow);
    // The workload overrides the namespace; its port level overrides it.
    let wl = format!(
        "{ns_permissive}{}",
        peer(
            "wl",
            "foo",
            "  selector:\n    matchLabels:\n      app: httpbin\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    \"9090\":\n      mode: DISABLE\n",
        )
    );
    let d = decide(&wl, &plaintext);
    assert!(!d.allow);
    assert_eq!(d.policy.as_deref(), Some("foo/wl"));
    let mut on_9090 = plaintext.clone();
    on_9090.destination_port = Some(9090);
    assert!(decide(&wl, &on_9090).allow, "port-level DISABLE on 9090");
    let mut other_app = plaintext.clone();
    other_app
        .destination_labels
        .insert("app".into(), "other".into());
    assert!(
        decide(&wl, &other_app).allow,
        "the selector does not match: namespace PERMISSIVE"
    );
}

#[test]
fn peer_authentication_errors() {
    let e = err(&peer("p", "foo", "  mtls:\n    mode: MUTUAL\n"));
    assert_eq!(e.path, "spec.mtls.mode");
    let e = err(&peer(
        "p",
        "foo",
        "  portLevelMtls:\n    \"80\":\n      mode: STRICT\n",
    ));
    assert_eq!(e.path, "spec.portLevelMtls");
    let e = err(&peer(
        "p",
        "foo",
        "  selector:\n    matchLabels:\n      a: b\n  portLevelMtls:\n    \"http\":\n      mode: STRICT\n",
    ));
    assert_eq!(e.path, "spec.portLevelMtls[http]");
    let e = err(&peer(
        "p",
        "foo",
        "  mtls:\n    mode: STRICT\n    extra: 1\n",
    ));
    assert!(e.path.starts_with("spec.mtls"), "{e}");
}

mod jwt_rules {
    use super::*;
    use crate::jwt::{EcCurve, JwtPublicKey, JwtSigner};
    use crate::x509::{KeyAlgorithm, PrivateKey};
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use std::time::{SystemTime, UNIX_EPOCH};

    pub(super) const ISS: &str = "https://issuer.example";

    pub(super) struct Keys {
        signer: JwtSigner,
        pub(super) jwks: String,
    }

    pub(super) fn keys(kid: &str) -> Keys {
        let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
        let public = JwtPublicKey::ec(EcCurve::P256, key.public_key_point().unwrap()).unwrap();
        let p = public.to_jwk();
        let jwks = serde_json::json!({"keys": [{
            "kty": p.kty, "crv": p.crv, "x": p.x, "y": p.y, "kid": kid, "use": "sig", "alg": "ES256"
        }]})
        .to_string();
        Keys {
            signer: JwtSigner::new(kid.into(), &key).unwrap(),
            jwks,
        }
    }

    pub(super) fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    pub(super) fn token(k: &Keys, iss: &str, aud: &str, exp: u64) -> String {
        k.signer
            .sign_claims(&serde_json::json!({"iss": iss, "sub": "alice", "aud": aud, "exp": exp, "iat": now()}))
            .unwrap()
    }

    pub(super) fn request_auth(jwks: &str, extra: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\n  namespace: foo\nspec:\n  jwtRules:\n  - issuer: \"{ISS}\"\n    audiences: [\"api\"]\n    jwks: '{jwks}'\n{extra}---\n"
        )
    }

    pub(super) fn with_bearer(t: &str) -> Request {
        let mut r = req(SLEEP, "GET", "/");
        r.headers
            .insert("authorization".into(), format!("Bearer {t}"));
        r
    }

    #[test]
    fn valid_token_sets_the_request_principal() {
        let k = keys("k1");
        let require = policy(
            "  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"https://issuer.example/alice\"]\n",
        );
        let yaml = format!("{}{require}", request_auth(&k.jwks, ""));
        let d = decide(&yaml, &with_bearer(&token(&k, ISS, "api", now() + 60)));
        assert!(d.allow, "{:?}", d.explanation);
        // No token: passes authentication, but the policy requires a principal.
        let d = decide(&yaml, &req(SLEEP, "GET", "/"));
        assert!(!d.allow);
        assert_eq!(d.status, 403);
        // A missing token with no policy requiring one is fine.
        assert!(decide(&request_auth(&k.jwks, ""), &req(SLEEP, "GET", "/")).allow);
    }

    #[test]
    fn invalid_tokens_are_401() {
        let k = keys("k1");
        let yaml = request_auth(&k.jwks, "");
        let good = token(&k, ISS, "api", now() + 60);
        let cases: Vec<(String, &str)> = vec![
            (token(&k, ISS, "api", now() - 5), "expired"),
            (token(&k, ISS, "other", now() + 60), "audiences"),
            (
                token(&k, "https://evil.example", "api", now() + 60),
                "issuer",
            ),
            (token(&keys("k2"), ISS, "api", now() + 60), "kid"),
            (token(&keys("k1"), ISS, "api", now() + 60), "signature"),
            (
                {
                    let parts: Vec<&str> = good.split('.').collect();
                    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1"}"#);
                    format!("{header}.{}.", parts[1])
                },
                "not allowed",
            ),
            (
                {
                    let parts: Vec<&str> = good.split('.').collect();
                    let claims = URL_SAFE_NO_PAD.encode(
                        serde_json::json!({"iss": ISS, "sub": "admin", "aud": "api", "exp": now() + 60}).to_string(),
                    );
                    format!("{}.{claims}.{}", parts[0], parts[2])
                },
                "signature",
            ),
        ];
        for (t, why) in cases {
            let d = decide(&yaml, &with_bearer(&t));
            assert!(!d.allow, "{why}");
            assert_eq!(d.status, 401, "{why}");
            assert_eq!(d.policy.as_deref(), Some("foo/jwt"));
            assert!(d.explanation[0].contains(why), "{why}: {:?}", d.explanation);
        }
        assert!(decide(&yaml, &with_bearer(&good)).allow);
    }

    #[test]
    fn token_locations_and_key_sources() {
        let k = keys("k1");
        let t = token(&k, ISS, "api", now() + 60);
        let yaml = request_auth(
            &k.jwks,
            "    fromHeaders:\n    - name: X-Jwt\n      prefix: \"Token \"\n    fromParams: [\"jwt\"]\n",
        );
        let mut r = req(SLEEP, "GET", "/");
        r.headers.insert(
            "x-jwt".into(),
            format!("Token {}", token(&k, ISS, "other", now() + 60)),
        );
        assert_eq!(decide(&yaml, &r).status, 401, "the custom header is read");
        let mut r = req(SLEEP, "GET", "/");
        r.query
            .insert("jwt".into(), token(&k, ISS, "other", now() + 60));
        assert_eq!(decide(&yaml, &r).status, 401, "the custom param is read");
        // Defaults: Authorization: Bearer and access_token.
        let plain = request_auth(&k.jwks, "");
        let mut r = req(SLEEP, "GET", "/");
        r.query
            .insert("access_token".into(), token(&k, ISS, "other", now() + 60));
        assert_eq!(decide(&plain, &r).status, 401);

        // jwksUri: a file next to the policy.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keys.json"), &k.jwks).unwrap();
        let file_yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\n  namespace: foo\nspec:\n  jwtRules:\n  - issuer: \"{ISS}\"\n    jwksUri: keys.json\n"
        );
        std::fs::write(dir.path().join("ra.yaml"), &file_yaml).unwrap();
        let loaded = load_dir(dir.path()).unwrap();
        assert!(
            Evaluator::new(loaded, "istio-system")
                .evaluate(&with_bearer(&t))
                .allow
        );
        // jwksUri over HTTPS is fetched by a cache; plain HTTP is refused.
        let remote = set(&file_yaml.replace("keys.json", "https://idp.example/jwks"));
        assert_eq!(
            remote.request[0].rules[0].jwks,
            JwksSource::Remote("https://idp.example/jwks".into())
        );
        assert_eq!(
            remote.remote_jwks_urls().into_iter().collect::<Vec<_>>(),
            vec!["https://idp.example/jwks".to_string()]
        );
        let d = Evaluator::new(remote, "istio-system").evaluate(&with_bearer(&t));
        assert_eq!(d.status, 401, "no cache, no keys: {:?}", d.explanation);
        for bad in [
            "http://idp.example/jwks",
            "ftp://idp.example/jwks",
            "https:///jwks",
        ] {
            let e = err(&file_yaml.replace("keys.json", bad));
            assert_eq!(e.path, "spec.jwtRules[0].jwksUri", "{bad}");
            assert!(e.to_string().contains(bad), "{e}");
        }

        // Issuer only, an https:// issuer: OIDC discovery (as Istio).
        let discovered = file_yaml.replace("    jwksUri: keys.json\n", "");
        assert!(
            set(&discovered)
                .remote_jwks_urls()
                .contains("oidc-discovery:https://issuer.example"),
            "{:?}",
            set(&discovered).remote_jwks_urls()
        );
        // Issuer only, not a URL: the trust domain's JWT bundle.
        let td_yaml = discovered.replace(ISS, "spiffe://cluster.local");
        let mut bundle =
            crate::x509::Bundle::new(crate::spiffe::TrustDomain::new("cluster.local").unwrap());
        let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
        bundle.add_jwt_authority(
            "td".into(),
            JwtPublicKey::ec(EcCurve::P256, key.public_key_point().unwrap()).unwrap(),
        );
        let td_signer = Keys {
            signer: JwtSigner::new("td".into(), &key).unwrap(),
            jwks: String::new(),
        };
        let td_token = token(&td_signer, "spiffe://cluster.local", "api", now() + 60);
        let without =
            Evaluator::new(set(&td_yaml), "istio-system").evaluate(&with_bearer(&td_token));
        assert_eq!(without.status, 401, "{:?}", without.explanation);
        let with = Evaluator::new(set(&td_yaml), "istio-system")
            .with_trust_bundle(bundle)
            .evaluate(&with_bearer(&td_token));
        assert!(with.allow, "{:?}", with.explanation);
    }
}

#[test]
fn paths_are_normalized_before_matching_so_tricks_do_not_bypass_deny() {
    for (raw, want) in [
        ("/admin", Ok("/admin")),
        ("//admin", Ok("/admin")),
        ("/./admin", Ok("/admin")),
        ("/public/../admin", Ok("/admin")),
        ("/../../admin", Ok("/admin")),
        ("/%61dmin", Ok("/admin")),
        ("/admin;x=1", Ok("/admin")),
        ("/admin;x=1/users", Ok("/admin/users")),
        ("/a/b/", Ok("/a/b/")),
        ("/a/b/.", Ok("/a/b/")),
        ("/a/%7e/%c3%a9", Ok("/a/~/%C3%A9")),
        ("/", Ok("/")),
        ("/admin%2Fusers", Err("encoded separator")),
        ("/admin%2fusers", Err("encoded separator")),
        ("/admin%5cusers", Err("encoded separator")),
        ("/admin\\users", Err("backslash")),
        ("/bad%zz", Err("percent-escape")),
        ("admin", Err("does not start")),
    ] {
        match (normalize_path(raw), want) {
            (Ok(got), Ok(w)) => assert_eq!(got, w, "{raw}"),
            (Err(e), Err(w)) => assert!(e.contains(w), "{raw}: {e}"),
            (got, w) => panic!("{raw}: got {got:?}, want {w:?}"),
        }
    }

    let deny = format!(
        "{HEAD}spec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin*\"]\n"
    );
    for raw in [
        "//admin",
        "/./admin",
        "/public/../admin",
        "/%61dmin",
        "/admin;x=1",
    ] {
        let (path, _) = split_path_query(raw);
        let mut r = req(SLEEP, "GET", "");
        r.path = path.unwrap();
        assert!(!decide(&deny, &r).allow, "{raw} got past DENY /admin*");
    }
    let (path, _) = split_path_query("/admin%2Fusers?x=1");
    let mut r = req(SLEEP, "GET", "");
    r.path_error = path.err();
    let d = decide(&deny, &r);
    assert_eq!((d.allow, d.status), (false, 400), "{d:?}");
    assert!(d.explanation[0].contains("encoded separator"), "{d:?}");
}

#[test]
fn uri_templates_are_refused_at_load() {
    for t in ["/api/{*}/x", "/files/{**}"] {
        let e = err(&policy(&format!(
            "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"{t}\"]\n"
        )))
        .to_string();
        assert!(
            e.contains("spec.rules[0].to[0].operation.paths[0]") && e.contains("URI templates"),
            "{e}"
        );
    }
}

#[test]
fn kubectl_exports_load_with_their_metadata_and_lists() {
    let exported = r#"apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"security.istio.io/v1"}
    creationTimestamp: "2026-01-02T03:04:05Z"
    generation: 3
    name: get-only
    namespace: foo
    resourceVersion: "123456"
    uid: 0d3c8f5e-1111-2222-3333-444455556666
    managedFields:
    - manager: kubectl-client-side-apply
      operation: Update
  spec:
    rules:
    - to:
      - operation:
          methods: ["GET"]
  status:
    validationMessages: []
"#;
    let s = set(exported);
    assert_eq!(s.authorization.len(), 1);
    assert!(
        Evaluator::new(s, "istio-system")
            .evaluate(&req(SLEEP, "GET", "/"))
            .allow
    );
    // Unknown fields inside spec are still refused, with the item's path.
    let bad = exported.replace("methods: [\"GET\"]", "method: [\"GET\"]");
    let e = err(&bad);
    assert!(e.path.starts_with("items[0].spec.rules[0]"), "{e}");
}

#[test]
fn service_accounts_remote_ips_and_ip_conditions() {
    let yaml = policy(
        "  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"foo/sleep\"]\n        remoteIpBlocks: [\"203.0.113.0/24\"]\n    when:\n    - key: destination.ip\n      values: [\"10.0.0.0/8\"]\n",
    );
    let mut r = req(SLEEP, "GET", "/");
    r.destination_ip = Some("10.9.9.9".parse().unwrap());
    r.remote_ip = Some("203.0.113.7".parse().unwrap());
    assert!(decide(&yaml, &r).allow);
    // Another service account, another client, or another destination: no.
    assert!(!decide(&yaml, &req(OTHER, "GET", "/")).allow);
    let mut far = r.clone();
    far.remote_ip = Some("198.51.100.1".parse().unwrap());
    assert!(!decide(&yaml, &far).allow);
    let mut elsewhere = r.clone();
    elsewhere.destination_ip = Some("192.168.0.1".parse().unwrap());
    assert!(!decide(&yaml, &elsewhere).allow);
    // With no trusted proxy, remote.ip is the peer.
    assert_eq!(remote_from_xff(Some("203.0.113.7, 10.0.0.2"), 0), None);
    assert_eq!(
        remote_from_xff(Some("203.0.113.7, 10.0.0.2"), 1),
        Some("10.0.0.2".parse().unwrap())
    );
    assert_eq!(
        remote_from_xff(Some("203.0.113.7, 10.0.0.2"), 2),
        Some("203.0.113.7".parse().unwrap())
    );
    assert_eq!(remote_from_xff(Some("203.0.113.7"), 3), None);
    let deny = policy(
        "  action: DENY\n  rules:\n  - when:\n    - key: remote.ip\n      values: [\"203.0.113.0/24\"]\n",
    );
    let mut peer_only = req(SLEEP, "GET", "/");
    peer_only.source_ip = Some("203.0.113.9".parse().unwrap());
    assert!(
        !decide(&deny, &peer_only).allow,
        "remote.ip falls back to the peer"
    );
    let e = err(&policy(
        "  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"sleep\"]\n",
    ));
    assert!(e.to_string().contains("NAMESPACE/SERVICE_ACCOUNT"), "{e}");
}

#[test]
fn what_cannot_be_honoured_is_refused_by_name() {
    for (spec, path, says) in [
        (
            "  targetRefs:\n  - kind: Gateway\n    name: gw\n",
            "spec.targetRefs",
            "selector",
        ),
        (
            "  rules:\n  - from:\n    - source:\n        trustDomains: [\"td\"]\n",
            "trustDomains",
            "deprecated",
        ),
        (
            "  rules:\n  - when:\n    - key: experimental.envoy.filters.network.mysql_proxy[db.table]\n      values: [\"t\"]\n",
            "when[0].key",
            "experimental.envoy.filters",
        ),
    ] {
        let e = err(&policy(spec));
        assert!(e.path.contains(path) && e.to_string().contains(says), "{e}");
    }
}

#[test]
fn peer_authentication_precedence_follows_istio() {
    let pa = |name: &str, ns: &str, created: Option<&str>, extra: &str, mode: &str| {
        let ts = created.map_or(String::new(), |c| format!("  creationTimestamp: \"{c}\"\n"));
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\n{ts}spec:\n{extra}  mtls:\n    mode: {mode}\n"
        )
    };
    // Two namespace-wide policies: the oldest wins, whatever the file order.
    let yaml = format!(
        "{}---\n{}",
        pa("newer", "foo", Some("2026-02-01T00:00:00Z"), "", "DISABLE"),
        pa("older", "foo", Some("2026-01-01T00:00:00Z"), "", "STRICT")
    );
    let (mode, by) = Evaluator::new(set(&yaml), "istio-system").mtls_mode(&req(SLEEP, "GET", "/"));
    assert_eq!((mode, by.as_deref()), (MtlsMode::Strict, Some("foo/older")));
    // A selector policy in the root namespace is ignored.
    let yaml = pa(
        "rooted",
        "istio-system",
        None,
        "  selector:\n    matchLabels:\n      app: httpbin\n",
        "STRICT",
    );
    let (mode, by) = Evaluator::new(set(&yaml), "istio-system").mtls_mode(&req(SLEEP, "GET", "/"));
    assert_eq!((mode, by), (MtlsMode::Permissive, None));
}

mod jwt_outputs {
    use super::jwt_rules::{ISS, keys, now, request_auth, token, with_bearer};
    use super::*;

    #[test]
    fn token_from_a_cookie_outputs_and_removal() {
        let k = keys("k1");
        let extra = "    fromCookies: [\"session\"]\n    outputPayloadToHeader: x-jwt-payload\n    outputClaimToHeaders:\n    - header: x-user\n      claim: sub\n";
        let yaml = request_auth(&k.jwks, extra);
        let t = token(&k, ISS, "api", now() + 60);
        let mut r = req(SLEEP, "GET", "/");
        r.headers
            .insert("cookie".into(), format!("theme=dark; session={t}"));
        let d = decide(&yaml, &r);
        assert!(d.allow, "{:?}", d.explanation);
        assert_eq!(
            d.request_principal.as_deref(),
            Some("https://issuer.example/alice")
        );
        let set: std::collections::BTreeMap<_, _> = d.rewrite.set_headers.iter().cloned().collect();
        assert_eq!(set.get("x-user").map(String::as_str), Some("alice"));
        assert_eq!(
            set.get("x-jwt-payload").map(String::as_str),
            t.split('.').nth(1),
            "the base64url payload"
        );
        // The token cookie is removed, the others kept.
        assert_eq!(set.get("cookie").map(String::as_str), Some("theme=dark"));

        // From a header: removed unless forwardOriginalToken.
        let d = decide(&request_auth(&k.jwks, ""), &with_bearer(&t));
        assert_eq!(d.rewrite.remove_headers, ["authorization"]);
        let d = decide(
            &request_auth(&k.jwks, "    forwardOriginalToken: true\n"),
            &with_bearer(&t),
        );
        assert!(d.rewrite.remove_headers.is_empty());
        // A denied request changes nothing upstream.
        let deny = policy("  action: DENY\n  rules:\n  - {}\n");
        let d = decide(
            &format!("{}{deny}", request_auth(&k.jwks, "")),
            &with_bearer(&t),
        );
        assert!(!d.allow && d.rewrite == Rewrite::default());
    }
}

#[test]
fn tcp_requests_follow_istios_http_only_field_rules() {
    let mut tcp = req(SLEEP, "", "");
    tcp.host = String::new();
    // ALLOW with methods: never matches TCP, so nothing is allowed.
    let allow = policy("  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n");
    let d = decide(&allow, &tcp);
    assert!(!d.allow);
    assert!(
        d.explanation
            .iter()
            .any(|e| e.contains("HTTP-only") && e.contains("TCP")),
        "{:?}",
        d.explanation
    );
    assert!(decide(&allow, &req(SLEEP, "GET", "/")).allow);
    // DENY with paths and a port: on TCP the paths are ignored, so it denies.
    let deny = format!(
        "{}---\n{}",
        policy("  rules:\n  - {}\n"),
        policy("  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"8080\"]\n        paths: [\"/admin\"]\n")
            .replace("name: p", "name: d")
    );
    let d = decide(&deny, &tcp);
    assert!(!d.allow && d.policy.as_deref() == Some("foo/d"), "{d:?}");
    assert!(
        decide(&deny, &req(SLEEP, "GET", "/public")).allow,
        "HTTP: paths apply"
    );
}

#[test]
fn an_unknown_destination_namespace_denies_with_a_reason() {
    let yaml = policy("  rules:\n  - {}\n");
    let mut r = req(SLEEP, "GET", "/");
    r.destination_principal = Some("spiffe://cluster.local/web".into());
    let d = decide(&yaml, &r);
    assert!(!d.allow);
    assert!(d.explanation[0].contains("namespace is unknown"), "{d:?}");
    // Given explicitly (context extension / flag), or by a label: decided.
    let mut explicit = r.clone();
    explicit.destination_ns = Some("foo".into());
    assert!(decide(&yaml, &explicit).allow);
    let mut labelled = r.clone();
    labelled
        .destination_labels
        .insert("namespace".into(), "foo".into());
    assert!(decide(&yaml, &labelled).allow);
    // With no namespaced policy there is nothing to scope.
    assert!(decide("", &r).allow);
}

mod verified_tokens {
    use super::jwt_rules::{ISS, keys, now, request_auth, token, with_bearer};
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_repeated_token_decides_the_same_and_time_is_still_checked() {
        let k = keys("k1");
        let yaml = request_auth(&k.jwks, "");
        let eval = Evaluator::new(set(&yaml), "istio-system");
        let t = token(&k, ISS, "api", now() + 60);
        for _ in 0..3 {
            let d = eval.evaluate(&with_bearer(&t));
            assert!(d.allow, "{:?}", d.explanation);
            assert_eq!(
                d.request_principal.as_deref(),
                Some("https://issuer.example/alice")
            );
        }
        // Cached or not, a token past its exp is refused.
        let later = SystemTime::now() + Duration::from_secs(120);
        let d = eval.evaluate_at(&with_bearer(&t), later);
        assert_eq!(d.status, 401, "{:?}", d.explanation);
        // A tampered token (another digest) is verified, and fails.
        let mut parts: Vec<&str> = t.split('.').collect();
        let other = token(&keys("k2"), ISS, "api", now() + 60);
        parts[2] = other.split('.').nth(2).unwrap();
        let d = eval.evaluate(&with_bearer(&parts.join(".")));
        assert_eq!(d.status, 401);
    }
}
