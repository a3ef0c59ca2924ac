//! A real server and a real agent on temp sockets, with the `spiffe` crate
//! (an independent Workload API client) and raw gRPC calls as workloads.
//! The test process itself is the workload: entries select its uid.

use std::path::Path;
use std::time::Duration;

use sigil::agent::{AgentConfig, AgentHandle, Attestation};
use sigil::proto::admin as pa;
use sigil::proto::workload as pw;
use sigil::server::{ServerHandle, start};
use tonic::Code;

use crate::server::{admin, server_config, td};

pub(crate) fn my_uid() -> u32 {
    sigil::attest::current_uid().unwrap()
}

async fn start_agent(server: &ServerHandle, dir: &Path) -> AgentHandle {
    start_agent_with(server, dir, None).await
}

/// An agent attested with a fresh join token, optionally serving ext_authz.
pub(crate) async fn start_agent_with(
    server: &ServerHandle,
    dir: &Path,
    policy: Option<sigil::policy::PolicyConfig>,
) -> AgentHandle {
    let config = AgentConfig {
        policy,
        ..agent_config(server, dir).await
    };
    sigil::agent::start(config).await.unwrap()
}

/// The configuration of an agent in `dir` with a fresh join token.
pub(crate) async fn agent_config(server: &ServerHandle, dir: &Path) -> AgentConfig {
    let token = admin(server)
        .await
        .generate_token(pa::GenerateTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner()
        .token;
    AgentConfig {
        attestation: Some(Attestation::JoinToken(token)),
        ..AgentConfig::new(
            vec![server.node_addr().to_string()],
            server.bundle_pem().to_string(),
            td(),
            dir.join("api.sock"),
            dir.join("agent"),
        )
    }
}

/// Registers `spiffe_id` for this test process (its uid) under `agent`.
pub(crate) async fn register_me(server: &ServerHandle, spiffe_id: &str, agent: &AgentHandle) {
    admin(server)
        .await
        .create_entry(pa::EntryParams {
            spiffe_id: spiffe_id.into(),
            parent_id: agent.spiffe_id().to_string(),
            selectors: vec![format!("unix:uid:{}", my_uid())],
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Waits (generously) until `agent` holds at least `n` SVIDs.
pub(crate) async fn wait_for_svids(agent: &AgentHandle, n: usize) {
    let mut state = agent.state();
    tokio::time::timeout(Duration::from_secs(30), async {
        while state.borrow_and_update().svids.len() < n {
            state.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the agent never held {n} SVIDs"));
}

async fn register(
    server: &ServerHandle,
    id: &str,
    parent: &str,
    selector: String,
    ttl: i64,
) -> pa::EntryParams {
    let p = pa::EntryParams {
        spiffe_id: id.into(),
        parent_id: parent.into(),
        selectors: vec![selector],
        x509_ttl_seconds: ttl,
        ..Default::default()
    };
    admin(server).await.create_entry(p.clone()).await.unwrap();
    p
}

pub(crate) async fn raw_client(
    sock: &Path,
) -> pw::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel> {
    sigil::cli::connect_workload(sock).await.unwrap()
}

pub(crate) fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_crate_fetches_svid_bundle_and_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let agent = start_agent(&server, dir.path()).await;
    let parent = agent.spiffe_id().to_string();
    register(
        &server,
        "spiffe://example.org/web",
        &parent,
        format!("unix:uid:{}", my_uid()),
        0,
    )
    .await;
    wait_for_svids(&agent, 1).await;

    let endpoint = format!("unix://{}", agent.socket().display());
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let spiffe_td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = bundles.get(&spiffe_td).expect("bundle for example.org");
    assert_eq!(bundle.authorities().len(), 1);

    // The SVID chains to the bundle (checked with x509-parser, not our code).
    let leaf_der = svid.cert_chain()[0].as_bytes();
    let ca_der = bundle.authorities()[0].as_bytes();
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der).unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der).unwrap();
    leaf.verify_signature(Some(ca.public_key())).unwrap();

    let token = client.fetch_jwt_token(["backend"], None).await.unwrap();
    let validated = client.validate_jwt_token("backend", &token).await.unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    assert!(client.validate_jwt_token("other", &token).await.is_err());
    // The same audience is served from the agent's cache.
    assert_eq!(
        client.fetch_jwt_token(["backend"], None).await.unwrap(),
        token
    );

    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_audiences_are_bounded_at_agent_and_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let agent = start_agent(&server, dir.path()).await;
    let entry = register(
        &server,
        "spiffe://example.org/aud",
        &agent.spiffe_id().to_string(),
        format!("unix:uid:{}", my_uid()),
        0,
    )
    .await;
    wait_for_svids(&agent, 1).await;
    let mut c = raw_client(agent.socket()).await;
    let cases: [(Vec<String>, &str); 3] = [
        ((0..21).map(|i| format!("a{i}")).collect(), "at most 20"),
        (vec!["x".repeat(257)], "at most 256 bytes"),
        (vec![String::new()], "empty"),
    ];
    for (audience, says) in &cases {
        let s = c
            .fetch_jwtsvid(with_header(pw::JwtsvidRequest {
                audience: audience.clone(),
                spiffe_id: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(says), "{s:?}");
    }
    let s = c
        .validate_jwtsvid(with_header(pw::ValidateJwtsvidRequest {
            audience: "x".repeat(257),
            svid: "a.b.c".into(),
        }))
        .await
        .unwrap_err();
    assert!(s.message().contains("at most 256 bytes"), "{s:?}");
    let ok: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    c.fetch_jwtsvid(with_header(pw::JwtsvidRequest {
        audience: ok,
        spiffe_id: String::new(),
    }))
    .await
    .unwrap();

    // The server refuses them too, whoever asks.
    let id = crate::server::join(&server).await;
    let mut node = crate::server::agent_client(&server, &id).await;
    let entry_id = admin(&server)
        .await
        .list_entries(pa::ListEntriesRequest {
            spiffe_id: entry.spiffe_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries[0]
        .id
        .clone();
    let s = node
        .new_jwtsvid(sigil::proto::node::NewJwtsvidRequest {
            entry_id,
            audience: cases[0].0.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("at most 20"), "{s:?}");
    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_identity_and_wit_rules() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let agent = start_agent(&server, dir.path()).await;
    let parent = agent.spiffe_id().to_string();
    // Only an entry this process does not match.
    register(
        &server,
        "spiffe://example.org/not-me",
        &parent,
        "unix:uid:4242424".into(),
        0,
    )
    .await;
    wait_for_svids(&agent, 1).await;
    let mut c = raw_client(agent.socket()).await;

    let s = c
        .fetch_x509svid(tonic::Request::new(pw::X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = c
        .fetch_x509svid(with_header(pw::X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = c
        .fetch_jwtsvid(with_header(pw::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = c
        .fetch_witsvid(with_header(pw::WitsvidRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unimplemented);

    // gRPC health and reflection answer on the same socket.
    let ch = sigil::cli::unix_channel(agent.socket()).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "SpiffeWorkloadAPI".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1 as refl;
    let mut r = refl::server_reflection_client::ServerReflectionClient::new(ch);
    let req = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            refl::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut resp = r
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        msg.message_response
    else {
        panic!("{msg:?}")
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"SpiffeWorkloadAPI"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    // Only what this socket serves: not the server's node and admin APIs.
    assert!(!names.iter().any(|n| n.starts_with("sigil.")), "{names:?}");

    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_push_new_entries_and_rotations_but_never_foreign_entries() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let agent = start_agent(&server, dir.path()).await;
    let parent = agent.spiffe_id().to_string();
    let me = format!("unix:uid:{}", my_uid());
    register(
        &server,
        "spiffe://example.org/first",
        &parent,
        me.clone(),
        0,
    )
    .await;
    wait_for_svids(&agent, 1).await;
    let mut c = raw_client(agent.socket()).await;
    let mut stream = c
        .fetch_x509svid(with_header(pw::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    assert!(first.federated_bundles.is_empty());

    // An entry for this uid parented to another agent is never served.
    register(
        &server,
        "spiffe://example.org/foreign",
        "spiffe://example.org/sigil/agent/join_token/other",
        me.clone(),
        0,
    )
    .await;
    // A new entry of ours reaches the open stream within 1 s.
    register(
        &server,
        "spiffe://example.org/second",
        &parent,
        me.clone(),
        4,
    )
    .await;
    let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ids: Vec<&str> = next.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/first", "spiffe://example.org/second"],
        "default SVID first"
    );
    let second_cert = next.svids[1].x509_svid.clone();

    // The 4 s SVID rotates at about half-life and the new one is pushed.
    let rotated = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = stream.message().await.unwrap().unwrap();
            assert!(
                m.svids
                    .iter()
                    .all(|s| s.spiffe_id != "spiffe://example.org/foreign")
            );
            if let Some(s) = m
                .svids
                .iter()
                .find(|s| s.spiffe_id == "spiffe://example.org/second")
            {
                if s.x509_svid != second_cert {
                    return;
                }
            }
        }
    })
    .await;
    assert!(rotated.is_ok(), "no rotation arrived on the open stream");

    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_while_the_server_is_down_and_converges_after() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    let server = start(server_config(&sdir, vec![])).await.unwrap();
    let addr = server.node_addr();
    let agent = start_agent(&server, dir.path()).await;
    let parent = agent.spiffe_id().to_string();
    let me = format!("unix:uid:{}", my_uid());
    register(&server, "spiffe://example.org/one", &parent, me.clone(), 0).await;
    wait_for_svids(&agent, 1).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();

    // Server gone: fetches still succeed from the cache.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let endpoint = format!("unix://{}", agent.socket().display());
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    assert_eq!(
        client
            .fetch_x509_svid()
            .await
            .unwrap()
            .spiffe_id()
            .to_string(),
        "spiffe://example.org/one"
    );

    // Back on the same address and store: a new entry still arrives.
    let mut cfg = server_config(&sdir, vec![]);
    cfg.bind = addr;
    let server = start(cfg).await.unwrap();
    register(&server, "spiffe://example.org/two", &parent, me, 0).await;
    wait_for_svids(&agent, 2).await;
    let all = client.fetch_all_x509_svids().await.unwrap();
    assert_eq!(all.len(), 2);

    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_reuses_its_saved_identity() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let agent = start_agent(&server, dir.path()).await;
    let id = agent.spiffe_id().clone();
    agent.shutdown(Duration::from_secs(2)).await;
    let key = dir.path().join("agent/agent-svid.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // No token this time: the saved SVID is used.
    let again = sigil::agent::start(AgentConfig::new(
        vec![server.node_addr().to_string()],
        server.bundle_pem().to_string(),
        td(),
        dir.path().join("api.sock"),
        dir.path().join("agent"),
    ))
    .await
    .unwrap();
    assert_eq!(again.spiffe_id(), &id);
    register(
        &server,
        "spiffe://example.org/after-restart",
        id.as_str(),
        format!("unix:uid:{}", my_uid()),
        0,
    )
    .await;
    wait_for_svids(&again, 1).await;
    again.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_renews_its_svid_and_reattests_with_x509pop_after_expiry() {
    use sigil::{KeyAlgorithm, PrivateKey, SpiffeId, TrustDomain, X509Authority, X509SvidParams};
    use std::time::SystemTime;
    let dir = tempfile::tempdir().unwrap();
    let nodes = TrustDomain::new("nodes.example").unwrap();
    let node_ca = X509Authority::self_signed(
        &nodes,
        KeyAlgorithm::EcP256,
        Duration::from_secs(3600),
        SystemTime::now(),
    )
    .unwrap();
    let node_key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let node_cert = node_ca
        .issue_for_private_key(
            &node_key,
            &X509SvidParams {
                spiffe_id: SpiffeId::new("spiffe://nodes.example/n1").unwrap(),
                dns_names: vec![],
                ttl: Duration::from_secs(3600),
            },
            SystemTime::now(),
        )
        .unwrap()
        .cert_der()
        .to_vec();
    let mut cfg = server_config(&dir.path().join("s"), vec![node_ca.cert_der().to_vec()]);
    // Agent SVIDs live 3 s: the agent must renew them to keep working.
    cfg.options.agent_ttl = Duration::from_secs(3);
    let server = start(cfg).await.unwrap();
    let agent_config = || AgentConfig {
        attestation: Some(Attestation::X509Pop {
            chain: vec![node_cert.clone()],
            key: node_key.clone(),
        }),
        ..AgentConfig::new(
            vec![server.node_addr().to_string()],
            server.bundle_pem().to_string(),
            td(),
            dir.path().join("api.sock"),
            dir.path().join("agent"),
        )
    };
    let me = format!("unix:uid:{}", my_uid());

    // Renewal: a join-token agent cannot attest again, so past its first
    // SVID's expiry only a renewed SVID can still get entries signed.
    let joined = start_agent(&server, &dir.path().join("j")).await;
    let jid = joined.spiffe_id().to_string();
    register(&server, "spiffe://example.org/j1", &jid, me.clone(), 0).await;
    wait_for_svids(&joined, 1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    register(&server, "spiffe://example.org/j2", &jid, me.clone(), 0).await;
    wait_for_svids(&joined, 2).await;
    joined.shutdown(Duration::from_secs(2)).await;

    let agent = sigil::agent::start(agent_config()).await.unwrap();
    let id = agent.spiffe_id().to_string();
    assert!(
        id.starts_with("spiffe://example.org/sigil/agent/x509pop/"),
        "{id}"
    );
    register(&server, "spiffe://example.org/a", &id, me.clone(), 0).await;
    register(&server, "spiffe://example.org/b", &id, me.clone(), 0).await;
    wait_for_svids(&agent, 2).await;
    agent.shutdown(Duration::from_secs(2)).await;

    // Stopped long enough for the saved SVID to expire: restart re-attests.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let again = sigil::agent::start(agent_config()).await.unwrap();
    assert_eq!(
        again.spiffe_id().to_string(),
        id,
        "same node, same agent ID"
    );
    wait_for_svids(&again, 2).await;
    again.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_agent_restarted_with_a_new_join_token_attests_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let first = start_agent(&server, dir.path()).await;
    let old_id = first.spiffe_id().to_string();
    first.shutdown(Duration::from_secs(2)).await;
    admin(&server)
        .await
        .evict_agent(pa::AgentIdRequest {
            spiffe_id: old_id.clone(),
        })
        .await
        .unwrap();
    // Same data dir (the saved identity is still unexpired), a new token.
    let second = start_agent(&server, dir.path()).await;
    let mut state = second.state();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let agents = admin(&server)
                .await
                .list_agents(pa::ListAgentsRequest {})
                .await
                .unwrap()
                .into_inner()
                .agents;
            let saved = sigil::agent::saved_identity(&dir.path().join("agent"), &td());
            if agents.iter().any(|a| a.spiffe_id != old_id)
                && saved.is_some_and(|(id, _)| id.to_string() != old_id)
            {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), state.changed()).await;
        }
    })
    .await
    .expect("the agent never attested with its new token");
    second.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_while_the_server_is_down_serves_its_cached_svids() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let agent = start_agent(&server, dir.path()).await;
    let id = agent.spiffe_id().clone();
    register(
        &server,
        "spiffe://example.org/cached",
        id.as_str(),
        format!("unix:uid:{}", my_uid()),
        0,
    )
    .await;
    wait_for_svids(&agent, 1).await;
    agent.shutdown(Duration::from_secs(2)).await;
    let node_addr = server.node_addr().to_string();
    let bundle = server.bundle_pem().to_string();
    server.shutdown(Duration::from_secs(5)).await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in ["cache.json", "cache.kek"] {
        let mode = std::fs::metadata(dir.path().join("agent").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let cache = std::fs::read_to_string(dir.path().join("agent/cache.json")).unwrap();
    assert!(
        !cache.contains("PRIVATE KEY"),
        "keys are sealed in the cache"
    );

    let config = |data: &str, sock: &str| {
        AgentConfig::new(
            vec![node_addr.clone()],
            bundle.clone(),
            td(),
            dir.path().join(sock),
            dir.path().join(data),
        )
    };
    // The server is down: the restarted agent serves its cached SVID at once.
    let again = sigil::agent::start(config("agent", "again.sock"))
        .await
        .unwrap();
    let mut c = raw_client(again.socket()).await;
    let mut s = c
        .fetch_x509svid(with_header(pw::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert_eq!(first.svids[0].spiffe_id, "spiffe://example.org/cached");
    again.shutdown(Duration::from_secs(2)).await;

    // An agent with no cache and no server says so: Unavailable, not "denied".
    std::fs::create_dir_all(dir.path().join("bare")).unwrap();
    for f in ["agent-svid.pem", "agent-svid.key", "bundle.jwks"] {
        std::fs::copy(
            dir.path().join("agent").join(f),
            dir.path().join("bare").join(f),
        )
        .unwrap();
    }
    let bare = sigil::agent::start(config("bare", "bare.sock"))
        .await
        .unwrap();
    let mut c = raw_client(bare.socket()).await;
    let s = c
        .fetch_x509svid(with_header(pw::X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(s.message().contains("unreachable"), "{s:?}");
    bare.shutdown(Duration::from_secs(2)).await;
}
