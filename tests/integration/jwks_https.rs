//! `jwksUri: https://...`: a real local HTTPS server (its own CA) serves a
//! JWKS that the cache fetches, keeps, refreshes on rotation and keeps
//! through failures; the running server's ext_authz and `sigil policy check`
//! use it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use sigil::jwt::{EcCurve, JwtPublicKey, JwtSigner};
use sigil::policy::{Evaluator, RemoteJwks, Request, load_dir};
use sigil::{KeyAlgorithm, PrivateKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, ServerConfig};

const ISS: &str = "https://issuer.example";

/// A signing key and its one-key JWKS.
struct IdpKey {
    signer: JwtSigner,
    jwks: String,
}

fn idp_key(kid: &str) -> IdpKey {
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let p = JwtPublicKey::ec(EcCurve::P256, key.public_key_point().unwrap())
        .unwrap()
        .to_jwk();
    IdpKey {
        signer: JwtSigner::new(kid.into(), &key).unwrap(),
        jwks: serde_json::json!({"keys": [{"kty": p.kty, "crv": p.crv, "x": p.x, "y": p.y, "kid": kid}]})
            .to_string(),
    }
}

fn token(k: &IdpKey) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    k.signer
        .sign_claims(&serde_json::json!({"iss": ISS, "sub": "alice", "aud": "api", "iat": now, "exp": now + 300}))
        .unwrap()
}

/// A test HTTPS server answering every request with the current (status, body).
struct JwksServer {
    url: String,
    ca_pem: String,
    ca_der: Vec<u8>,
    answer: Arc<Mutex<(u16, String)>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(body: &str) -> JwksServer {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let tls =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![leaf.der().clone()],
                    rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
                )
                .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let answer = Arc::new(Mutex::new((200, body.to_string())));
        let hits = Arc::new(AtomicUsize::new(0));
        let (a, h) = (answer.clone(), hits.clone());
        let base = format!("https://{}", listener.local_addr().unwrap());
        let discovery = serde_json::json!({
            "issuer": base,
            "jwks_uri": format!("{base}/.well-known/jwks.json"),
        })
        .to_string();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, a, h) = (acceptor.clone(), a.clone(), h.clone());
                let discovery = discovery.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    // The OpenID configuration names the JWKS; every other
                    // path gets the current answer.
                    let (status, body) =
                        if req.starts_with(b"GET /.well-known/openid-configuration ") {
                            (200, discovery)
                        } else {
                            a.lock().unwrap().clone()
                        };
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        JwksServer {
            url,
            ca_pem: ca.pem(),
            ca_der: ca.der().to_vec(),
            answer,
            hits,
        }
    }

    fn answer(&self, status: u16, body: &str) {
        *self.answer.lock().unwrap() = (status, body.to_string());
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A RequestAuthentication on `url` plus a policy requiring alice's token.
fn write_policies(dir: &std::path::Path, url: &str) {
    std::fs::write(
        dir.join("jwt.yaml"),
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: idp\n  namespace: foo\nspec:\n  jwtRules:\n  - issuer: \"{ISS}\"\n    audiences: [\"api\"]\n    jwksUri: {url}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: need-alice\n  namespace: foo\nspec:\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"{ISS}/alice\"]\n"
        ),
    )
    .unwrap();
}

fn request(token: &str) -> Request {
    Request {
        destination_principal: Some("spiffe://example.org/ns/foo/sa/api".into()),
        method: "GET".into(),
        path: "/".into(),
        headers: [("authorization".to_string(), format!("Bearer {token}"))].into(),
        ..Request::default()
    }
}

/// An ext_authz CheckRequest to the `foo/api` workload carrying `token`.
fn to_api(token: &str) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    let bearer = format!("Bearer {token}");
    let mut req = crate::ext_authz::check("GET", "", &[("authorization", &bearer)]);
    if let Some(dest) = req.attributes.as_mut().and_then(|a| a.destination.as_mut()) {
        dest.principal = "spiffe://example.org/ns/foo/sa/api".into();
    }
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_jwks_is_cached_refetched_on_rotation_and_kept_through_failures() {
    let a = idp_key("a");
    let idp = JwksServer::start(&a.jwks).await;
    let dir = tempfile::tempdir().unwrap();
    write_policies(dir.path(), &idp.url);
    let set = load_dir(dir.path()).unwrap();
    let cache = Arc::new(
        RemoteJwks::new(std::slice::from_ref(&idp.ca_der))
            .unwrap()
            .with_intervals(Duration::from_secs(3600), Duration::ZERO),
    );
    let added = cache.track(&set.remote_jwks_urls());
    assert_eq!(added, vec![idp.url.clone()]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(cache.clone().run(stop_rx));
    cache.settled(&added, Duration::from_secs(6)).await;
    let eval = Evaluator::new(set, "istio-system").with_remote_jwks(cache.clone());

    for _ in 0..20 {
        let d = eval.evaluate(&request(&token(&a)));
        assert!(d.allow, "{:?}", d.explanation);
        assert_eq!(
            d.request_principal.as_deref(),
            Some("https://issuer.example/alice")
        );
    }
    assert_eq!(idp.hits(), 1, "fetched once, then served from the cache");

    // The issuer rotates to key b: the first token asks for a refetch.
    let b = idp_key("b");
    idp.answer(200, &b.jwks);
    let first = eval.evaluate(&request(&token(&b)));
    assert_eq!(first.status, 401);
    assert!(
        first
            .explanation
            .iter()
            .any(|e| e.contains("refetch was requested")),
        "{:?}",
        first.explanation
    );
    let t = Instant::now();
    while !eval.evaluate(&request(&token(&b))).allow {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "rotation not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(idp.hits(), 2);
    assert_eq!(
        eval.evaluate(&request(&token(&a))).status,
        401,
        "key a is gone"
    );

    // The issuer fails: the last good keys stay in use.
    idp.answer(500, "oops");
    cache.kid_missing(&idp.url);
    crate::eventually("a refetch", || async { (idp.hits() >= 3).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(eval.evaluate(&request(&token(&b))).allow);

    // Unknown kids do not hammer the issuer: one early refetch per gap.
    idp.answer(200, &b.jwks);
    let limited = Arc::new(RemoteJwks::new(std::slice::from_ref(&idp.ca_der)).unwrap());
    limited.track(&[idp.url.clone()].into());
    tokio::spawn(limited.clone().run(stop_tx.subscribe()));
    limited
        .settled(std::slice::from_ref(&idp.url), Duration::from_secs(6))
        .await;
    let before = idp.hits();
    for _ in 0..50 {
        limited.kid_missing(&idp.url);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        idp.hits(),
        before,
        "an early refetch within 30 s of the last fetch"
    );

    // A reload that drops the URL: its keys stay readable for checks still
    // running on the old evaluator, until the next reload.
    limited.forget_others(&Default::default());
    assert!(limited.keys(&idp.url).is_ok());
    limited.forget_others(&Default::default());
    assert!(limited.keys(&idp.url).is_err());
    stop_tx.send_replace(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_failures_are_named_and_reject_tokens() {
    let a = idp_key("a");
    let idp = JwksServer::start(&a.jwks).await;
    let dir = tempfile::tempdir().unwrap();
    write_policies(dir.path(), &idp.url);
    let set = load_dir(dir.path()).unwrap();

    let key = &a;
    let error_for = |cache: RemoteJwks| {
        let set = set.clone();
        async move {
            let cache = Arc::new(cache);
            cache.track(&set.remote_jwks_urls());
            cache.refresh_due().await;
            let d = Evaluator::new(set, "istio-system")
                .with_remote_jwks(cache.clone())
                .evaluate(&request(&token(key)));
            assert_eq!(d.status, 401, "{:?}", d.explanation);
            d.explanation.join("; ")
        }
    };
    // A server certificate from a CA the cache does not trust.
    let e = error_for(RemoteJwks::new(&[]).unwrap()).await;
    // (Without system roots on this machine the cache says so instead.)
    assert!(
        (e.contains("TLS") || e.contains("no trusted CA")) && e.contains(&idp.url),
        "{e}"
    );
    idp.answer(404, "");
    let e = error_for(RemoteJwks::new(std::slice::from_ref(&idp.ca_der)).unwrap()).await;
    assert!(e.contains("HTTP status 404"), "{e}");
    idp.answer(200, "{\"nope\": 1}");
    let e = error_for(RemoteJwks::new(std::slice::from_ref(&idp.ca_der)).unwrap()).await;
    assert!(e.contains("\"keys\" array"), "{e}");

    // Nothing listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir2 = tempfile::tempdir().unwrap();
    write_policies(dir2.path(), &format!("https://{closed}/jwks"));
    let set2 = load_dir(dir2.path()).unwrap();
    let cache = Arc::new(RemoteJwks::new(&[]).unwrap());
    cache.track(&set2.remote_jwks_urls());
    cache.refresh_due().await;
    let e = cache.keys(&format!("https://{closed}/jwks")).unwrap_err();
    assert!(e.contains("cannot connect"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_ext_authz_and_policy_check_use_an_https_jwks_uri() {
    let a = idp_key("a");
    let idp = JwksServer::start(&a.jwks).await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    write_policies(&policies, &idp.url);
    let ca_file = dir.path().join("idp-ca.pem");
    std::fs::write(&ca_file, &idp.ca_pem).unwrap();

    let mut cfg = crate::server::server_config(&dir.path().join("s"), vec![]);
    cfg.policy = Some(sigil::policy::PolicyConfig {
        jwks_roots: sigil::policy::load_ca_file(&ca_file).unwrap(),
        ..sigil::policy::PolicyConfig::new("127.0.0.1:0".parse().unwrap(), policies.clone())
    });
    let server = sigil::server::start(cfg).await.unwrap();
    let mut c =
        AuthorizationClient::connect(format!("http://{}", server.ext_authz_addr().unwrap()))
            .await
            .unwrap();
    let ok = c.check(to_api(&token(&a))).await.unwrap().into_inner();
    assert_eq!(crate::ext_authz::code(&ok), 0, "{ok:?}");
    assert_eq!(
        crate::ext_authz::header(&ok, "x-sigil-request-principal"),
        Some("https://issuer.example/alice")
    );
    let forged = idp_key("a");
    let denied = c.check(to_api(&token(&forged))).await.unwrap().into_inner();
    assert_eq!(
        crate::ext_authz::code(&denied),
        tonic::Code::Unauthenticated as i32
    );
    assert_eq!(idp.hits(), 1);

    // Hot reload naming a new jwksUri: fetched before the new set applies.
    let c_key = idp_key("c");
    idp.answer(200, &c_key.jwks);
    write_policies(&policies, &format!("{}?v=2", idp.url));
    let req = to_api(&token(&c_key));
    crate::eventually("the reload naming the new jwksUri", || {
        let (mut c, req) = (c.clone(), req.clone());
        async move {
            let r = c.check(req).await.unwrap().into_inner();
            (crate::ext_authz::code(&r) == 0).then_some(())
        }
    })
    .await;
    assert_eq!(idp.hits(), 2, "only the new URL was fetched");
    server.shutdown(Duration::from_secs(5)).await.unwrap();

    // The CLI fetches the same JWKS once, trusting --jwks-ca-file.
    let check = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sigil"))
            .args(["policy", "check", "--policy-dir"])
            .arg(&policies)
            .args([
                "--destination",
                "spiffe://example.org/ns/foo/sa/api",
                "--method",
                "GET",
                "--path",
                "/",
                "--jwt",
                &token(&c_key),
                "--output",
                "json",
            ])
            .args(extra)
            .output()
            .unwrap();
        // 0 on allow, 1 on deny; never 2 (an error).
        assert!(
            matches!(o.status.code(), Some(0 | 1)),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let ca = ca_file.to_str().unwrap();
    let allowed = check(&["--jwks-ca-file", ca]);
    assert_eq!(allowed["decision"], "allow", "{allowed}");
    let untrusted = check(&[]);
    assert_eq!(untrusted["status"], 401, "{untrusted}");
    let why = untrusted["explanation"].to_string();
    assert!(
        why.contains("TLS") || why.contains("no trusted CA"),
        "{untrusted}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_only_rule_finds_its_keys_by_oidc_discovery() {
    let a = idp_key("a");
    let idp = JwksServer::start(&a.jwks).await;
    let issuer = idp
        .url
        .trim_end_matches("/.well-known/jwks.json")
        .to_string();
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: oidc\n  namespace: foo\nspec:\n  jwtRules:\n  - issuer: \"{issuer}\"\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: need-alice\n  namespace: foo\nspec:\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"{issuer}/alice\"]\n"
    );
    let mut set = sigil::policy::PolicySet::default();
    sigil::policy::parse_file(std::path::Path::new("oidc.yaml"), &yaml, &mut set).unwrap();
    let jwks = Arc::new(sigil::policy::RemoteJwks::new(std::slice::from_ref(&idp.ca_der)).unwrap());
    jwks.track(&set.remote_jwks_urls());
    jwks.refresh_due().await;
    assert!(idp.hits() >= 2, "the configuration, then the JWKS");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = a
        .signer
        .sign_claims(
            &serde_json::json!({"iss": issuer, "sub": "alice", "iat": now, "exp": now + 300}),
        )
        .unwrap();
    let mut r = sigil::policy::Request {
        source_principal: Some("spiffe://cluster.local/ns/foo/sa/sleep".into()),
        destination_principal: Some("spiffe://cluster.local/ns/foo/sa/api".into()),
        method: "GET".into(),
        path: "/".into(),
        ..Default::default()
    };
    r.headers
        .insert("authorization".into(), format!("Bearer {token}"));
    let d = sigil::policy::Evaluator::new(set, "istio-system")
        .with_remote_jwks(jwks)
        .evaluate(&r);
    assert!(d.allow, "{:?}", d.explanation);
    assert_eq!(
        d.request_principal.as_deref(),
        Some(format!("{issuer}/alice").as_str())
    );
}
