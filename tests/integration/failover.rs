//! An agent that lists several servers uses any of them and fails over: the
//! server it used goes away and another (here, the same store served on
//! another address) carries on.

use sigil::proto::admin as pa;
use sigil::server::start;

use crate::agent::{agent_config, my_uid, wait_for_svids};
use crate::server::{admin, server_config};

/// A loopback address nothing listens on (yet).
pub(crate) fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Registers `spiffe://example.org/<name>` for this process under `agent`.
async fn register(server: &sigil::server::ServerHandle, agent: &sigil::SpiffeId, name: &str) {
    admin(server)
        .await
        .create_entry(pa::EntryParams {
            spiffe_id: format!("spiffe://example.org/{name}"),
            parent_id: agent.to_string(),
            selectors: vec![format!("unix:uid:{}", my_uid())],
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_to_the_next_server_of_its_list() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let first = start(server_config(&data, vec![])).await.unwrap();
    let second_addr = free_addr();
    // A dead address first: attestation and sync move past it.
    let config = sigil::agent::AgentConfig {
        servers: vec![
            "127.0.0.1:1".into(),
            first.node_addr().to_string(),
            second_addr.to_string(),
        ],
        ..agent_config(&first, &dir.path().join("agent")).await
    };
    let agent = sigil::agent::start(config).await.unwrap();
    register(&first, agent.spiffe_id(), "before").await;
    wait_for_svids(&agent, 1).await;

    // The first server goes away; the same store comes back on the third
    // address of the agent's list.
    first
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let mut config = server_config(&data, vec![]);
    config.bind = second_addr;
    let second = start(config).await.unwrap();
    register(&second, agent.spiffe_id(), "after").await;
    wait_for_svids(&agent, 2).await;
}

#[test]
fn the_server_list_comes_from_repeated_flags_or_a_toml_array() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    let ca = sigil::X509Authority::self_signed(
        &sigil::TrustDomain::new("example.org").unwrap(),
        sigil::KeyAlgorithm::EcP256,
        std::time::Duration::from_secs(3600),
        std::time::SystemTime::now(),
    )
    .unwrap();
    std::fs::write(
        &bundle,
        pem::encode(&pem::Pem::new("CERTIFICATE", ca.cert_der().to_vec())),
    )
    .unwrap();
    let toml = dir.path().join("agent.toml");
    std::fs::write(
        &toml,
        format!(
            "server = [\"a.example:8081\", \"b.example:8081\"]\ntrust_bundle = {:?}\njoin_token = \"t\"\n",
            bundle.display().to_string()
        ),
    )
    .unwrap();
    let raw = sigil::config::RawConfig::load(Some(&toml), sigil::agent::AGENT_KEYS).unwrap();
    let config = sigil::agent::AgentConfig::from_raw(&raw).unwrap();
    assert_eq!(config.servers, ["a.example:8081", "b.example:8081"]);

    let mut raw = sigil::config::RawConfig::load(None, sigil::agent::AGENT_KEYS).unwrap();
    raw.flag("server", Some("a:1,,b:2".into()));
    raw.flag("trust_bundle", Some(bundle.display().to_string()));
    let err = sigil::agent::AgentConfig::from_raw(&raw)
        .unwrap_err()
        .to_string();
    assert!(err.contains("server") && err.contains("empty"), "{err}");
}
