//! Istio's security-task scenarios (tests/fixtures/istio/*): each one's
//! allowed and denied requests, decided by `sigil policy check` and by the
//! ext_authz endpoint of a running server, which must agree.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use sigil::policy::PolicyConfig;
use sigil::server::start;

use crate::server::server_config;

#[derive(Clone, Copy)]
enum Token {
    None,
    Valid,
    WithGroup,
    Expired,
    Forged,
}

struct Case {
    scenario: &'static str,
    name: &'static str,
    from: Option<&'static str>,
    to: &'static str,
    app: &'static str,
    method: &'static str,
    path: &'static str,
    port: u16,
    headers: &'static [(&'static str, &'static str)],
    token: Token,
    want: u16,
}

const PRODUCTPAGE: &str = "cluster.local/ns/default/sa/bookinfo-productpage";
const REVIEWS: &str = "cluster.local/ns/default/sa/bookinfo-reviews";
const SLEEP: &str = "cluster.local/ns/default/sa/sleep";
const FOO_SLEEP: &str = "cluster.local/ns/foo/sa/sleep";

fn case(
    scenario: &'static str,
    name: &'static str,
    from: Option<&'static str>,
    to: &'static str,
    app: &'static str,
    (method, path, port): (&'static str, &'static str, u16),
    want: u16,
) -> Case {
    Case {
        scenario,
        name,
        from,
        to,
        app,
        method,
        path,
        port,
        headers: &[],
        token: Token::None,
        want,
    }
}

fn cases() -> Vec<Case> {
    let get = |p: &'static str| ("GET", p, 9080);
    let mut v = vec![
        // Authorization for HTTP traffic (bookinfo).
        case(
            "http",
            "anyone reads the product page",
            Some(SLEEP),
            "cluster.local/ns/default/sa/bookinfo-productpage",
            "productpage",
            get("/productpage"),
            200,
        ),
        case(
            "http",
            "nobody writes the product page",
            Some(SLEEP),
            "cluster.local/ns/default/sa/bookinfo-productpage",
            "productpage",
            ("POST", "/productpage", 9080),
            403,
        ),
        case(
            "http",
            "productpage reads details",
            Some(PRODUCTPAGE),
            "cluster.local/ns/default/sa/bookinfo-details",
            "details",
            get("/details/0"),
            200,
        ),
        case(
            "http",
            "sleep may not read details",
            Some(SLEEP),
            "cluster.local/ns/default/sa/bookinfo-details",
            "details",
            get("/details/0"),
            403,
        ),
        case(
            "http",
            "reviews reads ratings (serviceAccounts)",
            Some(REVIEWS),
            "cluster.local/ns/default/sa/bookinfo-ratings",
            "ratings",
            get("/ratings/0"),
            200,
        ),
        case(
            "http",
            "productpage may not read ratings",
            Some(PRODUCTPAGE),
            "cluster.local/ns/default/sa/bookinfo-ratings",
            "ratings",
            get("/ratings/0"),
            403,
        ),
        case(
            "http",
            "allow-nothing covers everything else",
            Some(SLEEP),
            "cluster.local/ns/default/sa/bookinfo-reviews",
            "reviews",
            get("/reviews/0"),
            403,
        ),
        // Explicit deny, with a dry-run policy.
        case(
            "deny",
            "GET without the admin token is denied",
            Some(FOO_SLEEP),
            "cluster.local/ns/foo/sa/httpbin",
            "httpbin",
            get("/ip"),
            403,
        ),
        case(
            "deny",
            "POST /ip: the dry-run DENY is only reported",
            Some(FOO_SLEEP),
            "cluster.local/ns/foo/sa/httpbin",
            "httpbin",
            ("POST", "/ip", 8000),
            200,
        ),
        case(
            "deny",
            "POST elsewhere: no ALLOW rule matches",
            Some(FOO_SLEEP),
            "cluster.local/ns/foo/sa/httpbin",
            "httpbin",
            ("POST", "/post", 8000),
            403,
        ),
        // Mutual TLS.
        case(
            "mtls",
            "strict mesh: plain text is refused",
            None,
            "cluster.local/ns/bar/sa/api",
            "api",
            get("/"),
            403,
        ),
        case(
            "mtls",
            "strict mesh: mTLS passes",
            Some(SLEEP),
            "cluster.local/ns/bar/sa/api",
            "api",
            get("/"),
            200,
        ),
        case(
            "mtls",
            "permissive namespace: plain text passes",
            None,
            "cluster.local/ns/legacy/sa/app",
            "app",
            get("/"),
            200,
        ),
        case(
            "mtls",
            "port-level DISABLE: plain text on 8081",
            None,
            "cluster.local/ns/foo/sa/httpbin",
            "httpbin",
            ("GET", "/", 8081),
            200,
        ),
        case(
            "mtls",
            "the same workload's other port stays strict",
            None,
            "cluster.local/ns/foo/sa/httpbin",
            "httpbin",
            ("GET", "/", 8000),
            403,
        ),
        // Authorization for TCP traffic (no HTTP attributes).
        case(
            "tcp",
            "port 9000 is allowed",
            Some(FOO_SLEEP),
            "cluster.local/ns/foo/sa/tcp-echo",
            "tcp-echo",
            ("", "", 9000),
            200,
        ),
        case(
            "tcp",
            "DENY with methods denies TCP on 9001",
            Some(FOO_SLEEP),
            "cluster.local/ns/foo/sa/tcp-echo",
            "tcp-echo",
            ("", "", 9001),
            403,
        ),
        case(
            "tcp",
            "ALLOW with methods never matches TCP on 9002",
            Some(FOO_SLEEP),
            "cluster.local/ns/foo/sa/tcp-echo",
            "tcp-echo",
            ("", "", 9002),
            403,
        ),
        case(
            "tcp",
            "an unlisted port is denied",
            Some(FOO_SLEEP),
            "cluster.local/ns/foo/sa/tcp-echo",
            "tcp-echo",
            ("", "", 9003),
            403,
        ),
    ];
    let mut admin = case(
        "deny",
        "GET /ip with the admin token is allowed",
        Some(FOO_SLEEP),
        "cluster.local/ns/foo/sa/httpbin",
        "httpbin",
        ("GET", "/ip", 8000),
        200,
    );
    admin.headers = &[("x-token", "admin")];
    v.push(admin);
    let mut admin_elsewhere = case(
        "deny",
        "GET /get with the admin token: only /ip is allowed",
        Some(FOO_SLEEP),
        "cluster.local/ns/foo/sa/httpbin",
        "httpbin",
        ("GET", "/get", 8000),
        403,
    );
    admin_elsewhere.headers = &[("x-token", "admin")];
    v.push(admin_elsewhere);
    // Ingress access control: remote.ip behind one trusted proxy.
    for (name, xff, want) in [
        ("a client in the allowed range", "203.0.113.7", 200),
        ("a client outside it", "198.51.100.9", 403),
        ("the blocked client inside it", "203.0.113.66", 403),
    ] {
        let mut c = case(
            "ingress",
            name,
            None,
            "cluster.local/ns/istio-system/sa/istio-ingressgateway",
            "istio-ingressgateway",
            ("GET", "/productpage", 8080),
            want,
        );
        c.headers = match xff {
            "203.0.113.7" => &[("x-forwarded-for", "203.0.113.7")],
            "198.51.100.9" => &[("x-forwarded-for", "198.51.100.9")],
            _ => &[("x-forwarded-for", "203.0.113.66")],
        };
        v.push(c);
    }
    // JWT.
    for (name, token, path, want) in [
        (
            "no token: denied, not unauthenticated",
            Token::None,
            "/ip",
            403,
        ),
        ("a valid token", Token::Valid, "/ip", 200),
        ("an expired token is 401", Token::Expired, "/ip", 401),
        (
            "a token signed by another key is 401",
            Token::Forged,
            "/ip",
            401,
        ),
        (
            "/headers needs the group claim",
            Token::Valid,
            "/headers",
            403,
        ),
        ("/headers with group1", Token::WithGroup, "/headers", 200),
    ] {
        let mut c = case(
            "jwt",
            name,
            Some(FOO_SLEEP),
            "cluster.local/ns/foo/sa/httpbin",
            "httpbin",
            ("GET", path, 8000),
            want,
        );
        c.token = token;
        v.push(c);
    }
    v
}

/// Proxies trusted for X-Forwarded-For in a scenario.
fn trusted_proxies(scenario: &str) -> usize {
    usize::from(scenario == "ingress")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/istio")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(kind: Token) -> Option<String> {
    let key_pem = std::fs::read_to_string(fixtures().join("jwt/test-key.pem")).unwrap();
    let key = sigil::PrivateKey::from_pem(&key_pem).unwrap();
    let other = sigil::PrivateKey::generate(sigil::KeyAlgorithm::EcP256).unwrap();
    let iss = "testing@secure.istio.io";
    let claims = |exp: u64, groups: &[&str]| serde_json::json!({"iss": iss, "sub": iss, "exp": exp, "iat": now(), "groups": groups});
    let sign = |k: &sigil::PrivateKey, c: serde_json::Value| {
        sigil::jwt::JwtSigner::new("test".into(), k)
            .unwrap()
            .sign_claims(&c)
            .unwrap()
    };
    match kind {
        Token::None => None,
        Token::Valid => Some(sign(&key, claims(now() + 300, &["group2"]))),
        Token::WithGroup => Some(sign(&key, claims(now() + 300, &["group1", "group2"]))),
        Token::Expired => Some(sign(&key, claims(now() - 60, &[]))),
        Token::Forged => Some(sign(&other, claims(now() + 300, &[]))),
    }
}

fn cli_status(c: &Case, jwt: Option<&str>) -> u16 {
    let dir = fixtures().join(c.scenario);
    let to = format!("spiffe://{}", c.to);
    let label = format!("app={}", c.app);
    let port = c.port.to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sigil"));
    cmd.args(["policy", "check", "--policy-dir"])
        .arg(&dir)
        .args([
            "--destination",
            &to,
            "--label",
            &label,
            "--method",
            c.method,
            "--path",
            c.path,
        ])
        .args(["--port", &port, "--output", "json"])
        .args([
            "--policy-trusted-proxies",
            &trusted_proxies(c.scenario).to_string(),
        ]);
    if let Some(from) = c.from {
        cmd.args(["--principal", &format!("spiffe://{from}")]);
    }
    for (k, v) in c.headers {
        cmd.args(["--header", &format!("{k}={v}")]);
    }
    if let Some(t) = jwt {
        cmd.args(["--jwt", t]);
    }
    let o = cmd.output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("{}: {}", c.name, String::from_utf8_lossy(&o.stderr)));
    v["status"].as_u64().unwrap() as u16
}

fn check_request(c: &Case, jwt: Option<&str>) -> CheckRequest {
    let socket = |ip: &str, port: u16| {
        Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port.into())),
                ..Default::default()
            })),
        })
    };
    let mut headers: HashMap<String, String> = c
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Some(t) = jwt {
        headers.insert("authorization".into(), format!("Bearer {t}"));
    }
    let http = (!c.method.is_empty()).then(|| HttpRequest {
        method: c.method.into(),
        path: c.path.into(),
        host: format!("{}.svc", c.app),
        headers,
        ..Default::default()
    });
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                principal: c.from.map(|f| format!("spiffe://{f}")).unwrap_or_default(),
                address: socket("10.0.0.7", 40000),
                ..Default::default()
            }),
            destination: Some(Peer {
                principal: format!("spiffe://{}", c.to),
                labels: [("app".to_string(), c.app.to_string())].into(),
                address: socket("10.0.0.8", c.port),
                ..Default::default()
            }),
            request: http.map(|h| AttrRequest {
                http: Some(h),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_task_scenarios_decide_as_documented_in_cli_and_ext_authz() {
    let all = cases();
    let mut failures = Vec::new();
    for scenario in ["http", "deny", "mtls", "tcp", "jwt", "ingress"] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = server_config(&dir.path().join("s"), vec![]);
        let mut policy =
            PolicyConfig::new("127.0.0.1:0".parse().unwrap(), fixtures().join(scenario));
        policy.trusted_proxies = trusted_proxies(scenario);
        cfg.policy = Some(policy);
        let server = start(cfg).await.unwrap();
        let mut client =
            AuthorizationClient::connect(format!("http://{}", server.ext_authz_addr().unwrap()))
                .await
                .unwrap();
        for c in all.iter().filter(|c| c.scenario == scenario) {
            let jwt = token(c.token);
            let r = client
                .check(check_request(c, jwt.as_deref()))
                .await
                .unwrap()
                .into_inner();
            let got = match r.http_response {
                Some(HttpResponse::OkResponse(_)) => 200,
                Some(HttpResponse::DeniedResponse(d)) => d.status.map_or(0, |s| s.code as u16),
                _ => 0,
            };
            if got != c.want {
                failures.push(format!(
                    "{scenario}: {} — ext_authz {got}, want {}",
                    c.name, c.want
                ));
            }
            // TCP has no HTTP attributes for the CLI to express.
            if !c.method.is_empty() {
                let cli = cli_status(c, jwt.as_deref());
                if cli != c.want {
                    failures.push(format!(
                        "{scenario}: {} — policy check {cli}, want {}",
                        c.name, c.want
                    ));
                }
            }
        }
        server.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
