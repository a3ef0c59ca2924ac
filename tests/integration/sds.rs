//! Envoy SDS v3 on the agent's socket, driven by a client built on the
//! `envoy-types` types and tonic, following the xDS nonce rules step by step.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{BuildVersion, Node, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, SpiffeCertValidatorConfig, secret::Type as SecretType,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use sigil::proto::admin as pa;
use sigil::server::start;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::agent::start_agent_with;
use crate::server::{admin, server_config};

const TYPE: &str = sigil::workload_api::SECRET_TYPE;

fn envoy(major: u32, minor: u32) -> Option<Node> {
    Some(Node {
        id: "sidecar".into(),
        cluster: "api".into(),
        user_agent_name: "envoy".into(),
        user_agent_version_type: Some(
            envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: major,
                        minor_number: minor,
                        patch: 0,
                    }),
                    metadata: None,
                },
            ),
        ),
        ..Default::default()
    })
}

fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        type_url: TYPE.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn secrets(r: &DiscoveryResponse) -> Vec<Secret> {
    assert_eq!(r.type_url, TYPE);
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, TYPE);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    let mut n: Vec<String> = secrets(r).into_iter().map(|s| s.name).collect();
    n.sort();
    n
}

fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> String {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

/// The X.509 roots in a named validation context (SPIFFE validator or trusted_ca).
fn roots(r: &DiscoveryResponse, name: &str) -> usize {
    let s = secrets(r).into_iter().find(|s| s.name == name).unwrap();
    let Some(SecretType::ValidationContext(v)) = s.r#type else {
        panic!("{name} is not a validation context")
    };
    let pem = match &v.custom_validator_config {
        Some(c) => {
            assert_eq!(c.name, "envoy.tls.cert_validator.spiffe");
            let cfg = SpiffeCertValidatorConfig::decode(
                c.typed_config.as_ref().unwrap().value.as_slice(),
            )
            .unwrap();
            assert_eq!(cfg.trust_domains.len(), 1);
            assert_eq!(cfg.trust_domains[0].name, "example.org");
            inline(&cfg.trust_domains[0].trust_bundle)
        }
        None => inline(&v.trusted_ca),
    };
    sigil::x509::certs_from_pem(&pem).unwrap().len()
}

async fn next<T>(s: &mut Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("no SDS response")
        .unwrap()
        .unwrap()
}

/// Nothing more arrives for a while (the server had every chance to answer).
async fn silent<T>(s: &mut Streaming<T>) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(700), s.message()).await {
        panic!("unexpected SDS message: {:?}", m.map(|m| m.is_some()));
    }
}

async fn entry(server: &sigil::server::ServerHandle, id: &str, parent: &str) -> String {
    let uid = sigil::attest::current_uid().unwrap();
    admin(server)
        .await
        .create_entry(pa::EntryParams {
            spiffe_id: id.into(),
            parent_id: parent.into(),
            selectors: vec![format!("unix:uid:{uid}")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_streams_follow_the_xds_rules_and_push_on_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let agent = start_agent_with(&server, dir.path(), None).await;
    let parent = agent.spiffe_id().to_string();
    entry(&server, "spiffe://example.org/envoy", &parent).await;
    crate::agent::wait_for_svids(&agent, 1).await;
    let channel = sigil::cli::unix_channel(agent.socket()).await.unwrap();
    let mut client = SecretDiscoveryServiceClient::new(channel);

    // The first request, carrying a nonce from some earlier stream, is served.
    let (tx, rx) = mpsc::channel(8);
    let mut first = request(
        &["default", "ROOTCA", "spiffe://example.org/later"],
        "7",
        "nonce-of-a-dead-stream",
    );
    first.node = envoy(1, 30);
    tx.send(first).await.unwrap();
    let mut stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r1 = next(&mut stream).await;
    assert_eq!(
        names(&r1),
        ["ROOTCA", "default"],
        "the unknown name is left out"
    );
    assert!(!r1.nonce.is_empty());
    let default = secrets(&r1)
        .into_iter()
        .find(|s| s.name == "default")
        .unwrap();
    let Some(SecretType::TlsCertificate(tls)) = default.r#type else {
        panic!("default is not a TLS certificate")
    };
    let chain = sigil::x509::certs_from_pem(&inline(&tls.certificate_chain)).unwrap();
    assert_eq!(
        sigil::x509::svid_id(&chain[0]).unwrap().as_str(),
        "spiffe://example.org/envoy"
    );
    assert!(inline(&tls.private_key).starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(roots(&r1, "ROOTCA"), 1);

    // ACK: nothing more. A stale nonce (even with other names): ignored.
    let names1 = ["default", "ROOTCA", "spiffe://example.org/later"];
    tx.send(request(&names1, &r1.version_info, &r1.nonce))
        .await
        .unwrap();
    tx.send(request(&["default"], &r1.version_info, "stale"))
        .await
        .unwrap();
    silent(&mut stream).await;
    // NACK with the same names: logged, not answered with the same version.
    let mut nack = request(&names1, &r1.version_info, &r1.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "certificate rejected".into(),
        details: vec![],
    });
    tx.send(nack.clone()).await.unwrap();
    silent(&mut stream).await;

    // The unknown name appears once its entry exists.
    let later = entry(&server, "spiffe://example.org/later", &parent).await;
    let r2 = next(&mut stream).await;
    assert_eq!(
        names(&r2),
        ["ROOTCA", "default", "spiffe://example.org/later"]
    );
    assert_ne!(r2.version_info, r1.version_info);
    assert_ne!(r2.nonce, r1.nonce);
    tx.send(request(&names1, &r2.version_info, &r2.nonce))
        .await
        .unwrap();

    // A bundle change (a prepared CA) is pushed.
    admin(&server)
        .await
        .prepare_authority(pa::AuthorityKindRequest {
            kind: "x509".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let r3 = next(&mut stream).await;
    assert_eq!(roots(&r3, "ROOTCA"), 2);
    tx.send(request(&names1, &r3.version_info, &r3.nonce))
        .await
        .unwrap();

    // An SVID rotation (the entry changes) is pushed.
    admin(&server)
        .await
        .update_entry(pa::UpdateEntryRequest {
            id: later.clone(),
            params: Some(pa::EntryParams {
                spiffe_id: "spiffe://example.org/later".into(),
                parent_id: parent.clone(),
                selectors: vec![format!(
                    "unix:uid:{}",
                    sigil::attest::current_uid().unwrap()
                )],
                dns_names: vec!["later.example.org".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let r4 = next(&mut stream).await;
    let later_cert = |r: &DiscoveryResponse| {
        let s = secrets(r)
            .into_iter()
            .find(|s| s.name == "spiffe://example.org/later")
            .unwrap();
        let Some(SecretType::TlsCertificate(t)) = s.r#type else {
            panic!()
        };
        inline(&t.certificate_chain)
    };
    assert_ne!(later_cert(&r4), later_cert(&r2), "a new certificate");

    // A NACK that also changes the names: the new names are served.
    let mut nack = request(&["default"], &r4.version_info, &r4.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "no".into(),
        details: vec![],
    });
    tx.send(nack).await.unwrap();
    let r5 = next(&mut stream).await;
    assert_eq!(names(&r5), ["default"]);

    // FetchSecrets; an Envoy older than 1.18 gets trusted_ca.
    let mut fetch = request(&["ROOTCA", "spiffe://example.org/nope"], "", "");
    fetch.node = envoy(1, 17);
    let f = client.fetch_secrets(fetch).await.unwrap().into_inner();
    assert_eq!(names(&f), ["ROOTCA"]);
    let s = secrets(&f).remove(0);
    let Some(SecretType::ValidationContext(v)) = s.r#type else {
        panic!()
    };
    assert!(v.custom_validator_config.is_none());
    assert_eq!(
        sigil::x509::certs_from_pem(&inline(&v.trusted_ca))
            .unwrap()
            .len(),
        2
    );
    // No names: everything the workload may have.
    let all = client
        .fetch_secrets(request(&[], "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        names(&all),
        [
            "spiffe://example.org",
            "spiffe://example.org/envoy",
            "spiffe://example.org/later"
        ]
    );

    // After an agent restart, Envoy reconnects with the old stream's nonce
    // and version: it is served at once.
    drop(tx);
    agent.shutdown(Duration::from_secs(2)).await;
    let agent = sigil::agent::start(sigil::agent::AgentConfig::new(
        vec![server.node_addr().to_string()],
        server.bundle_pem().to_string(),
        crate::server::td(),
        dir.path().join("api.sock"),
        dir.path().join("agent"),
    ))
    .await
    .unwrap();
    let mut client =
        SecretDiscoveryServiceClient::new(sigil::cli::unix_channel(agent.socket()).await.unwrap());
    let (tx, rx) = mpsc::channel(8);
    let mut again = request(&["default"], &r5.version_info, &r5.nonce);
    again.node = envoy(1, 30);
    tx.send(again).await.unwrap();
    let mut stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&next(&mut stream).await), ["default"]);

    // DeltaSecrets: subscribe, then a name that appears later, then removal.
    let (dtx, drx) = mpsc::channel(8);
    dtx.send(DeltaDiscoveryRequest {
        node: envoy(1, 30),
        type_url: TYPE.into(),
        resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut delta = client
        .delta_secrets(ReceiverStream::new(drx))
        .await
        .unwrap()
        .into_inner();
    let d1 = next(&mut delta).await;
    let mut got: Vec<&str> = d1.resources.iter().map(|r| r.name.as_str()).collect();
    got.sort();
    assert_eq!(got, ["ROOTCA", "default"]);
    assert!(d1.resources.iter().all(|r| !r.version.is_empty()));
    dtx.send(DeltaDiscoveryRequest {
        type_url: TYPE.into(),
        response_nonce: d1.nonce.clone(),
        resource_names_subscribe: vec!["spiffe://example.org/third".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    silent(&mut delta).await;
    let third = entry(
        &server,
        "spiffe://example.org/third",
        agent.spiffe_id().as_str(),
    )
    .await;
    let d2 = next(&mut delta).await;
    assert_eq!(
        d2.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["spiffe://example.org/third"],
        "only what changed"
    );
    admin(&server)
        .await
        .delete_entry(pa::EntryIdRequest { id: third })
        .await
        .unwrap();
    let d3 = next(&mut delta).await;
    assert_eq!(d3.removed_resources, ["spiffe://example.org/third"]);
    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
