//! Policy decisions in-process with 1,000 AuthorizationPolicies (target:
//! ≥ 50k decisions/s/core, p99 ≤ 100 µs). 100 namespaces × 10 policies, a
//! mesh-wide DENY in the root namespace, and requests that are allowed by the
//! last rule of their namespace's last policy, or denied by default after
//! every candidate rule was tried and explained.
//!
//! Run: `cargo bench --bench policy`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use sigil::policy::{Evaluator, PolicySet, Request, parse_file};

/// `new_fields`: the second rule also names `serviceAccounts`,
/// `remoteIpBlocks` and a `destination.ip` condition (Istio parity fields).
fn yaml(new_fields: bool) -> String {
    let mut y = String::new();
    y.push_str("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-debug\n  namespace: istio-system\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/debug/*\"]\n");
    for ns in 0..100 {
        for p in 0..10 {
            let extra = if new_fields {
                format!(
                    "    - key: destination.ip\n      values: [\"10.0.0.0/8\"]\n    - key: remote.ip\n      values: [\"192.168.0.0/16\"]\n    - key: source.principal\n      notValues: [\"cluster.local/ns/ns{ns}/sa/blocked\"]\n"
                )
            } else {
                String::new()
            };
            let _ = write!(
                y,
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p{p}\n  namespace: ns{ns}\nspec:\n  selector:\n    matchLabels:\n      app: svc{p}\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/ns{ns}/sa/client{p}\"]\n    to:\n    - operation:\n        methods: [\"GET\", \"HEAD\"]\n        paths: [\"/api/v{p}/*\"]\n  - from:\n    - source:\n        namespaces: [\"ns{ns}\"]\n    to:\n    - operation:\n        methods: [\"POST\"]\n        paths: [\"/items\", \"/orders/*\"]\n    when:\n    - key: request.headers[x-tenant]\n      values: [\"t{p}\"]\n{extra}"
            );
        }
    }
    y
}

fn request(ns: usize, p: usize, allowed: bool) -> Request {
    let mut r = Request {
        source_principal: Some(format!("spiffe://cluster.local/ns/ns{ns}/sa/caller")),
        destination_principal: Some(format!("spiffe://cluster.local/ns/ns{ns}/sa/svc{p}")),
        destination_labels: [("app".to_string(), format!("svc{p}"))].into(),
        destination_port: Some(8080),
        method: "POST".into(),
        path: "/orders/42".into(),
        host: "svc.example".into(),
        source_ip: Some("192.168.1.2".parse().unwrap()),
        destination_ip: Some("10.1.2.3".parse().unwrap()),
        ..Request::default()
    };
    r.headers.insert(
        "x-tenant".into(),
        if allowed {
            format!("t{p}")
        } else {
            "other".into()
        },
    );
    r
}

/// The same decisions through the real ext_authz gRPC service on loopback:
/// one current-thread runtime (client and server on one core), 32 in flight.
fn grpc(eval: Evaluator, requests: &[(Request, bool)]) {
    use envoy_types::pb::envoy::config::core::v3::{
        Address, SocketAddress, address, socket_address,
    };
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Peer, Request as AttrRequest,
    };
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    let checks: Vec<CheckRequest> = requests
        .iter()
        .map(|(r, _)| CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    principal: r.source_principal.clone().unwrap_or_default(),
                    ..Default::default()
                }),
                destination: Some(Peer {
                    principal: r.destination_principal.clone().unwrap_or_default(),
                    labels: r.destination_labels.clone().into_iter().collect(),
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "10.0.0.1".into(),
                            port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
                request: Some(AttrRequest {
                    http: Some(HttpRequest {
                        method: r.method.clone(),
                        path: r.path.clone(),
                        host: r.host.clone(),
                        headers: r.headers.clone().into_iter().collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(eval));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(envoy_types::ext_authz::v3::pb::AuthorizationServer::new(sigil::policy::ExtAuthz::new(rx, 0)))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
        );
        let client = AuthorizationClient::connect(format!("http://{addr}")).await.unwrap();
        let n = 40_000;
        let in_flight = 32;
        let checks = std::sync::Arc::new(checks);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..in_flight {
            let mut c = client.clone();
            let checks = checks.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for i in (w..n).step_by(in_flight) {
                    let t = Instant::now();
                    c.check(checks[i % checks.len()].clone()).await.unwrap();
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let total = start.elapsed();
        lat.sort();
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
        println!(
            "ext_authz Check over gRPC (loopback, client and server on one core, {in_flight} in flight): {:.0}/s; p50 {:?} p99 {:?}",
            n as f64 / total.as_secs_f64(),
            pct(0.5),
            pct(0.99)
        );
    });
}

/// In-process decisions per second over `requests` (each timed), printed.
fn in_process(label: &str, eval: &Evaluator, requests: &[(Request, bool)]) -> f64 {
    for (r, allowed) in requests {
        assert_eq!(eval.evaluate(r).allow, *allowed);
    }
    let n = 400_000;
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let (r, _) = &requests[i % requests.len()];
        let t = Instant::now();
        std::hint::black_box(eval.evaluate(r));
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    let rate = n as f64 / total.as_secs_f64();
    println!(
        "policy decisions, 1,001 policies{label}, half allowed / half default-denied with explanations: {rate:.0}/s on one core; p50 {:?} p99 {:?} max {:?}",
        pct(0.5),
        pct(0.99),
        lat.last().copied().unwrap_or(Duration::ZERO)
    );
    rate
}

/// Decisions that carry a JWT: every token new (signature verified each
/// time) against tokens seen before (the verified-token cache).
fn jwt_decisions(quick: bool) {
    use sigil::jwt::{EcCurve, JwtPublicKey, JwtSigner};
    let key = sigil::PrivateKey::generate(sigil::KeyAlgorithm::EcP256).unwrap();
    let p = JwtPublicKey::ec(EcCurve::P256, key.public_key_point().unwrap())
        .unwrap()
        .to_jwk();
    let jwks = format!(
        "{{\"keys\":[{{\"kty\":\"{}\",\"crv\":\"{}\",\"x\":\"{}\",\"y\":\"{}\",\"kid\":\"k\"}}]}}",
        p.kty,
        p.crv.unwrap_or_default(),
        p.x.unwrap_or_default(),
        p.y.unwrap_or_default()
    );
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\n  namespace: ns0\nspec:\n  jwtRules:\n  - issuer: https://idp.example\n    jwks: '{jwks}'\n---\n{}",
        yaml(false)
    );
    let mut set = PolicySet::default();
    parse_file(Path::new("jwt.yaml"), &yaml, &mut set).unwrap();
    let signer = JwtSigner::new("k".into(), &key).unwrap();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let n = if quick { 2_000 } else { 20_000 };
    let requests: Vec<Request> = (0..n)
        .map(|i| {
            let t = signer
                .sign_claims(&serde_json::json!({"iss": "https://idp.example", "sub": format!("user{i}"), "exp": exp}))
                .unwrap();
            let mut r = request(0, i % 10, true);
            r.headers.insert("authorization".into(), format!("Bearer {t}"));
            r
        })
        .collect();
    let eval = Evaluator::new(set, "istio-system");
    let start = Instant::now();
    for r in &requests {
        std::hint::black_box(eval.evaluate(r));
    }
    let uncached = n as f64 / start.elapsed().as_secs_f64();
    let repeats = if quick { 20_000 } else { 400_000 };
    let start = Instant::now();
    for i in 0..repeats {
        std::hint::black_box(eval.evaluate(&requests[i % 1000.min(n)]));
    }
    let cached = repeats as f64 / start.elapsed().as_secs_f64();
    println!(
        "decisions with a JWT, one core: first sight (signature verified) {uncached:.0}/s; seen before (verified-token cache) {cached:.0}/s; ratio {:.1}",
        cached / uncached
    );
}

fn main() {
    let requests: Vec<(Request, bool)> = (0..1000)
        .map(|i| {
            let allowed = i % 2 == 0;
            (request(i % 100, i % 10, allowed), allowed)
        })
        .collect();
    let load = |new_fields: bool| {
        let mut set = PolicySet::default();
        parse_file(Path::new("bench.yaml"), &yaml(new_fields), &mut set).unwrap();
        assert_eq!(set.authorization.len(), 1001);
        Evaluator::new(set, "istio-system")
    };
    let eval = load(false);
    let base = in_process("", &eval, &requests);
    let with_new = in_process(
        " (the allowing rule also checks destination.ip, remote.ip and a notValues condition)",
        &load(true),
        &requests,
    );
    println!(
        "ratio with the new fields / without: {:.3} (same run)",
        with_new / base
    );
    jwt_decisions(std::env::args().any(|a| a == "--quick"));
    grpc(eval, &requests);
}
