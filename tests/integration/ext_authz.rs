//! Envoy ext_authz v3 over real gRPC against the server, with hot reload.

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use sigil::policy::PolicyConfig;
use sigil::server::start;

use crate::server::server_config;

const ALLOW_GET: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: get-only\n  namespace: foo\nspec:\n  rules:\n  - from:\n    - source:\n        principals: [\"example.org/ns/foo/sa/sleep\"]\n    to:\n    - operation:\n        methods: [\"GET\"]\n";

pub(crate) fn check(method: &str, principal: &str, headers: &[(&str, &str)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                principal: principal.into(),
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "10.0.0.7".into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(40000)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            destination: Some(Peer {
                principal: "spiffe://example.org/ns/foo/sa/httpbin".into(),
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "10.0.0.8".into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: "/status/200?x=1".into(),
                    host: "httpbin.foo".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

pub(crate) fn header<'a>(r: &'a CheckResponse, name: &str) -> Option<&'a str> {
    let headers = match r.http_response.as_ref()? {
        HttpResponse::OkResponse(ok) => &ok.headers,
        HttpResponse::DeniedResponse(d) => &d.headers,
        _ => return None,
    };
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

pub(crate) fn code(r: &CheckResponse) -> i32 {
    r.status.as_ref().map_or(-1, |s| s.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_allows_denies_explains_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("allow.yaml"), ALLOW_GET).unwrap();
    let mut cfg = server_config(&dir.path().join("s"), vec![]);
    cfg.policy = Some(PolicyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        policies.clone(),
    ));
    let server = start(cfg).await.unwrap();
    let addr = format!("http://{}", server.ext_authz_addr().unwrap());
    let mut c = AuthorizationClient::connect(addr).await.unwrap();
    const SLEEP: &str = "spiffe://example.org/ns/foo/sa/sleep";

    let ok = c
        .check(check("GET", SLEEP, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&ok), 0);
    assert_eq!(header(&ok, "x-sigil-principal"), Some(SLEEP));

    // A client cannot smuggle identity headers upstream: the one Sigil sets
    // overwrites the client's, the one it does not set is removed.
    let forged = c
        .check(check(
            "GET",
            SLEEP,
            &[
                ("x-sigil-principal", "spiffe://example.org/ns/admin/sa/root"),
                ("x-sigil-request-principal", "https://evil/alice"),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(HttpResponse::OkResponse(okr)) = &forged.http_response else {
        panic!("{forged:?}")
    };
    let set = &okr.headers[0];
    assert_eq!(set.header.as_ref().unwrap().value, SLEEP);
    assert_eq!(
        set.append_action,
        envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32
    );
    assert_eq!(
        okr.headers_to_remove,
        vec!["x-sigil-request-principal".to_string()]
    );

    let denied = c
        .check(check("POST", SLEEP, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&denied), tonic::Code::PermissionDenied as i32);
    let Some(HttpResponse::DeniedResponse(d)) = &denied.http_response else {
        panic!("{denied:?}")
    };
    assert_eq!(d.status.as_ref().unwrap().code, 403);
    assert_eq!(header(&denied, "x-sigil-policy"), Some("default"));
    let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
    assert!(
        body["explanation"].to_string().contains("methods"),
        "{body}"
    );

    // A RequestAuthentication: a bad JWT is a 401.
    std::fs::write(
        policies.join("jwt.yaml"),
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\n  namespace: foo\nspec:\n  jwtRules:\n  - issuer: issuer.example\n",
    )
    .unwrap();
    let waiter = c.clone();
    let wait_until = |want: i32, req: CheckRequest| {
        let mut c = waiter.clone();
        async move {
            let t = Instant::now();
            loop {
                let r = c.check(req.clone()).await.unwrap().into_inner();
                if code(&r) == want {
                    return (t.elapsed(), r);
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "no reload after {:?}: {r:?}",
                    t.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let (took, r) = wait_until(
        tonic::Code::Unauthenticated as i32,
        check("GET", SLEEP, &[("authorization", "Bearer not.a.jwt")]),
    )
    .await;
    assert!(took < Duration::from_secs(1), "reload took {took:?}");
    let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else {
        panic!()
    };
    assert_eq!(d.status.as_ref().unwrap().code, 401);
    assert_eq!(header(&r, "x-sigil-policy"), Some("foo/jwt"));

    // A broken file keeps the last good set.
    std::fs::write(policies.join("broken.yaml"), "kind: [").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let still = c
        .check(check("GET", SLEEP, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&still), 0);

    // Fixed: a DENY takes effect.
    std::fs::remove_file(policies.join("broken.yaml")).unwrap();
    std::fs::write(
        policies.join("deny.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-all\n  namespace: foo\nspec:\n  action: DENY\n  rules:\n  - {}\n",
    )
    .unwrap();
    let (_, r) = wait_until(
        tonic::Code::PermissionDenied as i32,
        check("GET", SLEEP, &[]),
    )
    .await;
    assert_eq!(header(&r, "x-sigil-policy"), Some("foo/deny-all rule 0"));
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_to_start_with_a_bad_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("bad.yaml"),
        ALLOW_GET.replace("methods", "method"),
    )
    .unwrap();
    let mut cfg = server_config(&dir.path().join("s"), vec![]);
    cfg.policy = Some(PolicyConfig::new("127.0.0.1:0".parse().unwrap(), policies));
    let err = start(cfg).await.err().expect("must not start");
    assert!(err.to_string().contains("bad.yaml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_ext_authz_and_trusts_the_trust_domain_jwt_bundle() {
    // Not an https:// URL: the trust domain's own JWT bundle (an https://
    // issuer alone would mean OIDC discovery).
    const ISSUER: &str = "spiffe://example.org";
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("jwt.yaml"),
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: sigil-jwt\n  namespace: foo\nspec:\n  jwtRules:\n  - issuer: {ISSUER}\n    audiences: [\"httpbin\"]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: need-jwt\n  namespace: foo\nspec:\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"{ISSUER}/spiffe://example.org/ns/foo/*\"]\n"
        ),
    )
    .unwrap();
    let mut cfg = server_config(&dir.path().join("s"), vec![]);
    cfg.options.jwt_issuer = Some(ISSUER.into());
    let server = start(cfg).await.unwrap();
    let agent = crate::agent::start_agent_with(
        &server,
        dir.path(),
        Some(PolicyConfig::new("127.0.0.1:0".parse().unwrap(), policies)),
    )
    .await;
    let mint = |audience: &str| {
        let audience = vec![audience.to_string()];
        let server = &server;
        async move {
            let request = sigil::proto::admin::MintJwtsvidRequest {
                spiffe_id: "spiffe://example.org/ns/foo/sa/sleep".into(),
                audience,
                ttl_seconds: 300,
            };
            let mut admin = crate::server::admin(server).await;
            let minted = admin.mint_jwtsvid(request).await.unwrap();
            minted.into_inner().token
        }
    };
    let token = mint("httpbin").await;
    let mut c = AuthorizationClient::connect(format!("http://{}", agent.ext_authz_addr().unwrap()))
        .await
        .unwrap();
    let bearer = format!("Bearer {token}");
    let with_jwt = check("GET", "", &[("authorization", &bearer)]);
    // The bundle reaches the agent with its first sync.
    let t = Instant::now();
    let ok = loop {
        let r = c.check(with_jwt.clone()).await.unwrap().into_inner();
        if code(&r) == 0 {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never allowed: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        header(&ok, "x-sigil-request-principal"),
        Some("spiffe://example.org/spiffe://example.org/ns/foo/sa/sleep")
    );
    let none = c.check(check("GET", "", &[])).await.unwrap().into_inner();
    assert_eq!(code(&none), tonic::Code::PermissionDenied as i32);
    let wrong_aud = mint("other").await;
    let bearer = format!("Bearer {wrong_aud}");
    let r = c
        .check(check("GET", "", &[("authorization", &bearer)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), tonic::Code::Unauthenticated as i32);
    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
