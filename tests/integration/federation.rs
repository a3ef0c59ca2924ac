//! Two servers in one test: example.org federates with other.org by polling
//! its bundle endpoint (https_spiffe). A workload of example.org receives
//! other.org's bundle, verifies an other.org SVID with it, validates an
//! other.org JWT-SVID, and sees other.org's next authority after it rotates.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use sigil::agent::{AgentConfig, AgentHandle, Attestation};
use sigil::proto::admin as pa;
use sigil::proto::workload as pw;
use sigil::server::bundle_endpoint::{BundleEndpointConfig, BundleProfile};
use sigil::server::federation::{FederationProfile, FederationRelationship};
use sigil::server::{ServerConfig, ServerHandle, start};
use sigil::{Bundle, SpiffeId, TrustDomain};

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

async fn agent_of(server: &ServerHandle, td: &str, dir: &Path) -> AgentHandle {
    let mut admin = sigil::cli::connect_admin(server.admin_socket())
        .await
        .unwrap();
    let token = admin
        .generate_token(pa::GenerateTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner()
        .token;
    sigil::agent::start(AgentConfig {
        attestation: Some(Attestation::JoinToken(token)),
        ..AgentConfig::new(
            vec![server.node_addr().to_string()],
            server.bundle_pem().to_string(),
            TrustDomain::new(td).unwrap(),
            dir.join("api.sock"),
            dir.join("agent"),
        )
    })
    .await
    .unwrap()
}

async fn entry(server: &ServerHandle, id: &str, parent: &SpiffeId, federates_with: &[&str]) {
    let uid = sigil::attest::current_uid().unwrap();
    sigil::cli::connect_admin(server.admin_socket())
        .await
        .unwrap()
        .create_entry(pa::EntryParams {
            spiffe_id: id.into(),
            parent_id: parent.to_string(),
            selectors: vec![format!("unix:uid:{uid}")],
            federates_with: federates_with.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn der_certs(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der).unwrap();
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    out
}

fn sigil_cli(socket: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(args)
        .arg("--admin-socket")
        .arg(socket)
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trust_domains_federate_and_follow_each_others_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let other_td = TrustDomain::new("other.org").unwrap();

    // other.org serves its bundle endpoint with a 1 s refresh hint.
    let mut cfg_b = ServerConfig::local(other_td.clone(), &dir.path().join("b"));
    cfg_b.bundle_endpoint = Some(BundleEndpointConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        profile: BundleProfile::HttpsSpiffe,
    });
    cfg_b.bundle_refresh_hint = Duration::from_secs(1);
    let b = start(cfg_b).await.unwrap();

    // example.org polls it, bootstrapped with its current bundle.
    let mut cfg_a = ServerConfig::local(
        TrustDomain::new("example.org").unwrap(),
        &dir.path().join("a"),
    );
    cfg_a.options.federation_poll_floor = Duration::from_millis(200);
    cfg_a.federation = vec![FederationRelationship {
        trust_domain: other_td.clone(),
        bundle_url: format!("https://{}/", b.bundle_addr().unwrap()),
        profile: FederationProfile::HttpsSpiffe {
            endpoint_spiffe_id: SpiffeId::new("spiffe://other.org/sigil/server").unwrap(),
        },
        bootstrap: Some(Bundle::from_pem(other_td.clone(), b.bundle_pem()).unwrap()),
    }];
    let a = start(cfg_a).await.unwrap();

    let agent_a = agent_of(&a, "example.org", &dir.path().join("agent-a")).await;
    let agent_b = agent_of(&b, "other.org", &dir.path().join("agent-b")).await;
    entry(
        &a,
        "spiffe://example.org/client",
        agent_a.spiffe_id(),
        &["other.org"],
    )
    .await;
    entry(&b, "spiffe://other.org/server", agent_b.spiffe_id(), &[]).await;

    for agent in [&agent_a, &agent_b] {
        crate::agent::wait_for_svids(agent, 1).await;
    }

    // The client's stream carries other.org's bundle (keyed spiffe://other.org).
    let mut client_a = sigil::cli::connect_workload(agent_a.socket())
        .await
        .unwrap();
    let mut svids = client_a
        .fetch_x509svid(with_header(pw::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let (federated, own) = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let m = svids.message().await.unwrap().unwrap();
            if let Some(b) = m.federated_bundles.get("spiffe://other.org") {
                return (b.clone(), m.svids[0].bundle.clone());
            }
        }
    })
    .await
    .expect("other.org's bundle never reached the workload");
    assert_eq!(der_certs(&federated).len(), 1);

    // An other.org SVID verifies against it.
    let mut client_b = sigil::cli::connect_workload(agent_b.socket())
        .await
        .unwrap();
    let theirs = tokio::time::timeout(Duration::from_secs(30), async {
        let mut s = client_b
            .fetch_x509svid(with_header(pw::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().unwrap()
    })
    .await
    .unwrap();
    let chain = der_certs(&theirs.svids[0].x509_svid);
    sigil::attest::x509pop::verify_chain(
        &der_certs(&federated),
        &chain[0],
        &chain[1..],
        SystemTime::now(),
    )
    .expect("the other.org SVID verifies against the federated bundle");
    // And against our own bundle it does not.
    assert!(
        sigil::attest::x509pop::verify_chain(
            &der_certs(&own),
            &chain[0],
            &chain[1..],
            SystemTime::now()
        )
        .is_err()
    );

    // An other.org JWT-SVID validates at example.org's agent.
    let jwt = client_b
        .fetch_jwtsvid(with_header(pw::JwtsvidRequest {
            audience: vec!["example.org-client".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();
    let v = client_a
        .validate_jwtsvid(with_header(pw::ValidateJwtsvidRequest {
            audience: "example.org-client".into(),
            svid: jwt,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.spiffe_id, "spiffe://other.org/server");

    // SDS: ALL holds both trust domains; spiffe://other.org is a validation context.
    let mut sds = envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient::new(
        sigil::cli::unix_channel(agent_a.socket()).await.unwrap(),
    );
    let r = sds
        .fetch_secrets(
            envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
                resource_names: vec!["ALL".into(), "spiffe://other.org".into()],
                type_url: sigil::workload_api::SECRET_TYPE.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.resources.len(), 2);
    for any in &r.resources {
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
        use prost::Message;
        let secret = tls::Secret::decode(any.value.as_slice()).unwrap();
        let Some(tls::secret::Type::ValidationContext(v)) = secret.r#type else {
            panic!("{} is not a validation context", secret.name)
        };
        let config = tls::SpiffeCertValidatorConfig::decode(
            v.custom_validator_config
                .unwrap()
                .typed_config
                .unwrap()
                .value
                .as_slice(),
        )
        .unwrap();
        let mut names: Vec<String> = config.trust_domains.into_iter().map(|t| t.name).collect();
        names.sort();
        if secret.name == "ALL" {
            assert_eq!(names, ["example.org", "other.org"]);
        } else {
            assert_eq!(names, ["other.org"]);
        }
    }

    // The operator sees it.
    let (ok, out) = sigil_cli(a.admin_socket(), &["bundle", "list"]);
    assert!(ok && out.contains("other.org"), "{out}");
    let (ok, out) = sigil_cli(
        a.admin_socket(),
        &[
            "bundle",
            "show",
            "--trust-domain",
            "other.org",
            "--format",
            "pem",
        ],
    );
    assert!(ok && out.contains("BEGIN CERTIFICATE"), "{out}");
    let (ok, out) = sigil_cli(
        a.admin_socket(),
        &["bundle", "delete", "--trust-domain", "example.org"],
    );
    assert!(!ok && out.contains("own trust domain"), "{out}");
    // A bundle set by hand (PEM), listed, shown, deleted.
    let third = dir.path().join("third.pem");
    std::fs::write(&third, b.bundle_pem()).unwrap();
    let third_s = third.display().to_string();
    let (ok, out) = sigil_cli(
        a.admin_socket(),
        &[
            "bundle",
            "set",
            "--trust-domain",
            "third.org",
            "--file",
            &third_s,
            "--format",
            "pem",
        ],
    );
    assert!(ok && out.contains("Set the bundle of third.org"), "{out}");
    let (ok, out) = sigil_cli(a.admin_socket(), &["bundle", "list", "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["trust_domain"].as_str().unwrap())
        .collect();
    assert!(
        ok && names == ["example.org", "other.org", "third.org"],
        "{out}"
    );
    let (ok, out) = sigil_cli(
        a.admin_socket(),
        &[
            "bundle",
            "set",
            "--trust-domain",
            "third.org",
            "--file",
            "/nonexistent",
        ],
    );
    assert!(!ok && out.contains("/nonexistent"), "{out}");
    let (ok, out) = sigil_cli(
        a.admin_socket(),
        &["bundle", "delete", "--trust-domain", "third.org"],
    );
    assert!(ok, "{out}");
    let (ok, out) = sigil_cli(
        a.admin_socket(),
        &["bundle", "show", "--trust-domain", "third.org"],
    );
    assert!(
        !ok && out.contains("no bundle for trust domain third.org"),
        "{out}"
    );

    // other.org prepares its next authority: it reaches example.org's workload.
    sigil::cli::connect_admin(b.admin_socket())
        .await
        .unwrap()
        .prepare_authority(pa::AuthorityKindRequest {
            kind: "x509".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut bundles = client_a
        .fetch_x509_bundles(with_header(pw::X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let m = bundles.message().await.unwrap().unwrap();
            assert!(m.bundles.contains_key("spiffe://example.org"));
            if m.bundles
                .get("spiffe://other.org")
                .is_some_and(|b| der_certs(b).len() == 2)
            {
                return;
            }
        }
    })
    .await
    .expect("other.org's rotation never reached example.org's workload");

    agent_a.shutdown(Duration::from_secs(2)).await;
    agent_b.shutdown(Duration::from_secs(2)).await;
    a.shutdown(Duration::from_secs(5)).await.unwrap();
    b.shutdown(Duration::from_secs(5)).await.unwrap();
}
