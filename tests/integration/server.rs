//! The real server on a loopback port and temp dirs, driven through its node
//! API (TLS/mTLS) and admin socket.

use std::path::Path;
use std::time::{Duration, SystemTime};

use sigil::agent::{AgentIdentity, Attestation, attest, connect, renew};
use sigil::proto::admin as pa;
use sigil::proto::node as pn;
use sigil::server::{ServerConfig, ServerHandle, start};
use sigil::{KeyAlgorithm, PrivateKey, SpiffeId, TrustDomain, X509Authority, X509SvidParams};
use tonic::Code;

pub fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

pub fn server_config(dir: &Path, x509pop_roots: Vec<Vec<u8>>) -> ServerConfig {
    let mut c = ServerConfig::local(td(), dir);
    c.options.x509pop_roots = x509pop_roots;
    c
}

pub async fn admin(
    server: &ServerHandle,
) -> pa::admin_client::AdminClient<tonic::transport::Channel> {
    sigil::cli::connect_admin(server.admin_socket())
        .await
        .unwrap()
}

pub async fn join(server: &ServerHandle) -> AgentIdentity {
    let token = admin(server)
        .await
        .generate_token(pa::GenerateTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner()
        .token;
    attest_with(server, Attestation::JoinToken(token))
        .await
        .unwrap()
}

async fn attest_with(
    server: &ServerHandle,
    a: Attestation,
) -> Result<AgentIdentity, sigil::agent::NodeClientError> {
    let addr = server.node_addr().to_string();
    let mut c = connect(&addr, server.bundle_pem(), None).await?;
    attest(&mut c, &td(), &a).await
}

pub async fn agent_client(
    server: &ServerHandle,
    id: &AgentIdentity,
) -> pn::node_client::NodeClient<tonic::transport::Channel> {
    connect(
        &server.node_addr().to_string(),
        server.bundle_pem(),
        Some(id),
    )
    .await
    .unwrap()
}

pub async fn create_entry(server: &ServerHandle, spiffe_id: &str, parent: &SpiffeId) -> pn::Entry {
    admin(server)
        .await
        .create_entry(pa::EntryParams {
            spiffe_id: spiffe_id.into(),
            parent_id: parent.to_string(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn status_of<T: std::fmt::Debug>(r: Result<T, sigil::agent::NodeClientError>) -> tonic::Status {
    match r {
        Err(sigil::agent::NodeClientError::Status(s)) => s,
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_are_single_use_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let token = admin(&server)
        .await
        .generate_token(pa::GenerateTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner();
    let id = attest_with(&server, Attestation::JoinToken(token.token.clone()))
        .await
        .unwrap();
    assert_eq!(id.spiffe_id.as_str(), token.agent_id);
    let again = status_of(attest_with(&server, Attestation::JoinToken(token.token)).await);
    assert_eq!(again.code(), Code::PermissionDenied, "{again:?}");

    let short = admin(&server)
        .await
        .generate_token(pa::GenerateTokenRequest { ttl_seconds: 1 })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = status_of(attest_with(&server, Attestation::JoinToken(short.token)).await);
    assert_eq!(expired.code(), Code::PermissionDenied);
    let unknown = status_of(attest_with(&server, Attestation::JoinToken("nope".into())).await);
    assert_eq!(unknown.code(), Code::PermissionDenied);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_agents_cannot_both_use_one_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    for _ in 0..5 {
        let token = admin(&server)
            .await
            .generate_token(pa::GenerateTokenRequest { ttl_seconds: 600 })
            .await
            .unwrap()
            .into_inner()
            .token;
        let (a, b, c) = tokio::join!(
            attest_with(&server, Attestation::JoinToken(token.clone())),
            attest_with(&server, Attestation::JoinToken(token.clone())),
            attest_with(&server, Attestation::JoinToken(token.clone())),
        );
        let wins = [a.is_ok(), b.is_ok(), c.is_ok()]
            .iter()
            .filter(|w| **w)
            .count();
        assert_eq!(wins, 1);
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

fn node_ca() -> X509Authority {
    let nodes = TrustDomain::new("nodes.example").unwrap();
    X509Authority::self_signed(
        &nodes,
        KeyAlgorithm::EcP256,
        Duration::from_secs(86_400),
        SystemTime::now(),
    )
    .unwrap()
}

fn node_cert(ca: &X509Authority, key: &PrivateKey) -> Vec<u8> {
    let params = X509SvidParams {
        spiffe_id: SpiffeId::new("spiffe://nodes.example/node-1").unwrap(),
        dns_names: vec![],
        ttl: Duration::from_secs(3600),
    };
    ca.issue_for_private_key(key, &params, SystemTime::now())
        .unwrap()
        .cert_der()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_needs_a_trusted_chain_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = node_ca();
    let server = start(server_config(dir.path(), vec![ca.cert_der().to_vec()]))
        .await
        .unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let cert = node_cert(&ca, &key);

    let id = attest_with(
        &server,
        Attestation::X509Pop {
            chain: vec![cert.clone()],
            key: key.clone(),
        },
    )
    .await
    .unwrap();
    assert!(
        id.spiffe_id.path().starts_with("/sigil/agent/x509pop/"),
        "{}",
        id.spiffe_id
    );
    // Attesting again with the same certificate keeps the same agent ID.
    let again = attest_with(
        &server,
        Attestation::X509Pop {
            chain: vec![cert.clone()],
            key: key.clone(),
        },
    )
    .await
    .unwrap();
    assert_eq!(again.spiffe_id, id.spiffe_id);

    let wrong_key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let s = status_of(
        attest_with(
            &server,
            Attestation::X509Pop {
                chain: vec![cert.clone()],
                key: wrong_key,
            },
        )
        .await,
    );
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("challenge signature"), "{s:?}");

    let rogue_ca = node_ca();
    let rogue_cert = node_cert(&rogue_ca, &key);
    let s = status_of(
        attest_with(
            &server,
            Attestation::X509Pop {
                chain: vec![rogue_cert],
                key: key.clone(),
            },
        )
        .await,
    );
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("does not chain"), "{s:?}");

    // Listed agents carry the attestor and selectors.
    let agents = admin(&server)
        .await
        .list_agents(pa::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner();
    let a = agents
        .agents
        .iter()
        .find(|a| a.spiffe_id == id.spiffe_id.as_str())
        .unwrap();
    assert_eq!(a.attestor, "x509pop");
    assert!(
        a.selectors
            .iter()
            .any(|s| s.starts_with("x509pop:fingerprint:"))
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_is_refused_when_not_configured() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let ca = node_ca();
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let s = status_of(
        attest_with(
            &server,
            Attestation::X509Pop {
                chain: vec![node_cert(&ca, &key)],
                key,
            },
        )
        .await,
    );
    assert_eq!(s.code(), Code::FailedPrecondition);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_only_get_svids_for_their_own_entries() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let a = join(&server).await;
    let b = join(&server).await;
    let mine = create_entry(&server, "spiffe://example.org/mine", &a.spiffe_id).await;
    let theirs = create_entry(&server, "spiffe://example.org/theirs", &b.spiffe_id).await;
    let mut client = agent_client(&server, &a).await;

    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    // The CSR asks for another identity: the server must use the entry's.
    let csr = key.csr_der("spiffe://example.org/admin").unwrap();
    let req = pn::BatchNewX509svidRequest {
        params: vec![
            pn::NewX509svidParams {
                entry_id: mine.id.clone(),
                csr: csr.clone(),
            },
            pn::NewX509svidParams {
                entry_id: theirs.id.clone(),
                csr: csr.clone(),
            },
            pn::NewX509svidParams {
                entry_id: mine.id.clone(),
                csr: b"garbage".to_vec(),
            },
            pn::NewX509svidParams {
                entry_id: "missing".into(),
                csr,
            },
        ],
    };
    let results = client
        .batch_new_x509svid(req)
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].code, 0, "{:?}", results[0]);
    assert_eq!(results[0].spiffe_id, "spiffe://example.org/mine");
    let leaf = &results[0].cert_chain[0];
    assert_eq!(
        sigil::x509::svid_id(leaf).unwrap().as_str(),
        "spiffe://example.org/mine"
    );
    assert_eq!(
        results[1].code,
        Code::PermissionDenied as i32,
        "{:?}",
        results[1]
    );
    assert!(results[1].cert_chain.is_empty());
    assert_eq!(results[2].code, Code::InvalidArgument as i32);
    assert!(results[2].message.contains("CSR"), "{:?}", results[2]);
    assert_eq!(results[3].code, Code::NotFound as i32);

    let jwt = client
        .new_jwtsvid(pn::NewJwtsvidRequest {
            entry_id: mine.id.clone(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.spiffe_id, "spiffe://example.org/mine");
    let denied = client
        .new_jwtsvid(pn::NewJwtsvidRequest {
            entry_id: theirs.id.clone(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let no_aud = client
        .new_jwtsvid(pn::NewJwtsvidRequest {
            entry_id: mine.id.clone(),
            audience: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(no_aud.code(), Code::InvalidArgument);

    // Without a client certificate, signing RPCs are refused.
    let mut anonymous = connect(&server.node_addr().to_string(), server.bundle_pem(), None)
        .await
        .unwrap();
    let s = anonymous
        .batch_new_x509svid(pn::BatchNewX509svidRequest { params: vec![] })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);

    // Renewal gives a fresh SVID for the same agent.
    let renewed = renew(&mut client, &a).await.unwrap();
    assert_eq!(renewed.spiffe_id, a.spiffe_id);
    assert_ne!(renewed.cert_chain, a.cert_chain);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

async fn next(
    stream: &mut tonic::Streaming<pn::SyncEntriesResponse>,
) -> Result<Option<pn::SyncEntriesResponse>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("sync stream stalled")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banned_agent_is_refused_and_its_stream_ends() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let a = join(&server).await;
    let mut client = agent_client(&server, &a).await;
    let mut stream = client
        .sync_entries(pn::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await.unwrap().unwrap();
    assert!(matches!(
        first.kind,
        Some(pn::sync_entries_response::Kind::Snapshot(_))
    ));

    admin(&server)
        .await
        .ban_agent(pa::AgentIdRequest {
            spiffe_id: a.spiffe_id.to_string(),
        })
        .await
        .unwrap();
    let ended = next(&mut stream).await;
    match ended {
        Err(s) => assert_eq!(s.code(), Code::PermissionDenied, "{s:?}"),
        Ok(m) => panic!("stream went on after the ban: {m:?}"),
    }
    let s = client
        .batch_new_x509svid(pn::BatchNewX509svidRequest { params: vec![] })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("banned"), "{s:?}");
    let s = renew(&mut client, &a).await.unwrap_err();
    assert!(s.to_string().contains("banned"), "{s}");

    // Evicted: refused until it attests again.
    let b = join(&server).await;
    admin(&server)
        .await
        .evict_agent(pa::AgentIdRequest {
            spiffe_id: b.spiffe_id.to_string(),
        })
        .await
        .unwrap();
    let mut bc = agent_client(&server, &b).await;
    let s = bc
        .sync_entries(pn::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_another_trust_domain_is_refused_before_spending_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let token = admin(&server)
        .await
        .generate_token(pa::GenerateTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner()
        .token;
    let addr = server.node_addr().to_string();
    let mut c = connect(&addr, server.bundle_pem(), None).await.unwrap();
    let other = TrustDomain::new("other.org").unwrap();
    let e = attest(&mut c, &other, &Attestation::JoinToken(token.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("configured for trust domain other.org") && e.contains("serves example.org"),
        "{e}"
    );
    // The token was not consumed.
    attest(&mut c, &td(), &Attestation::JoinToken(token))
        .await
        .unwrap();
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[test]
fn the_event_log_keeps_only_the_last_events() {
    use sigil::store::{Commit, EventsSince, Store, Table};
    let store = sigil::MemoryStore::new().unwrap();
    for i in 0..sigil::server::KEEP_EVENTS + 10 {
        store
            .commit(Commit::new().put(Table::Entries, format!("k{}", i % 7), "v"))
            .unwrap();
    }
    assert_eq!(sigil::server::compact_once(&store).unwrap(), 10);
    assert!(matches!(
        store.events_since(5, 1).unwrap(),
        EventsSince::Compacted { .. }
    ));
    assert!(matches!(store.events_since(10, 1).unwrap(), EventsSince::Events(e) if e.len() == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_may_hold_only_a_few_sync_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let a = join(&server).await;
    let mut client = agent_client(&server, &a).await;
    let open = || pn::SyncEntriesRequest {
        resume_from_revision: 0,
    };
    let mut streams = Vec::new();
    for _ in 0..sigil::server::MAX_SYNC_STREAMS_PER_AGENT {
        streams.push(client.sync_entries(open()).await.unwrap().into_inner());
    }
    let s = client.sync_entries(open()).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    // Closing one frees its place.
    drop(streams.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while client.sync_entries(open()).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_capped_at_500_csrs() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let a = join(&server).await;
    let mut c = agent_client(&server, &a).await;
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let item = pn::NewX509svidParams {
        entry_id: "nope".into(),
        csr: key.csr_der("spiffe://example.org/x").unwrap(),
    };
    let s = c
        .batch_new_x509svid(pn::BatchNewX509svidRequest {
            params: vec![item.clone(); 501],
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("at most 500"), "{s:?}");
    let r = c
        .batch_new_x509svid(pn::BatchNewX509svidRequest {
            params: vec![item; 500],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 500);
    assert!(r.results.iter().all(|x| x.code == Code::NotFound as i32));
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_agent_svid_stops_working_once_the_new_one_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let old = join(&server).await;
    let mut old_client = agent_client(&server, &old).await;
    let new = renew(&mut old_client, &old).await.unwrap();
    let empty = || pn::BatchNewX509svidRequest { params: vec![] };
    // Until the agent switches, its old SVID still works (briefly).
    old_client.batch_new_x509svid(empty()).await.unwrap();
    let mut new_client = agent_client(&server, &new).await;
    new_client.batch_new_x509svid(empty()).await.unwrap();
    // Once the new SVID was presented, the old one is refused, even on a
    // fresh connection.
    let s = old_client.batch_new_x509svid(empty()).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("superseded"), "{s:?}");
    let s = agent_client(&server, &old)
        .await
        .batch_new_x509svid(empty())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    new_client.batch_new_x509svid(empty()).await.unwrap();
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

fn ids(entries: &[pn::Entry]) -> Vec<String> {
    let mut v: Vec<String> = entries.iter().map(|e| e.spiffe_id.clone()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pushes_changes_and_resumes_with_only_what_was_missed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let a = join(&server).await;
    let b = join(&server).await;
    let e1 = create_entry(&server, "spiffe://example.org/one", &a.spiffe_id).await;
    create_entry(&server, "spiffe://example.org/other", &b.spiffe_id).await;
    let mut client = agent_client(&server, &a).await;
    let mut stream = client
        .sync_entries(pn::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let snap = next(&mut stream).await.unwrap().unwrap();
    let Some(pn::sync_entries_response::Kind::Snapshot(page)) = &snap.kind else {
        panic!("{snap:?}")
    };
    assert!(page.last);
    assert_eq!(ids(&page.entries), ["spiffe://example.org/one"]);
    assert!(
        !snap.bundle_jwks.is_empty(),
        "the first page carries the bundle"
    );

    // Pushed: a new entry arrives on the open stream without polling.
    create_entry(&server, "spiffe://example.org/two", &a.spiffe_id).await;
    let delta = next(&mut stream).await.unwrap().unwrap();
    let Some(pn::sync_entries_response::Kind::Delta(d)) = &delta.kind else {
        panic!("{delta:?}")
    };
    assert_eq!(ids(&d.upserted), ["spiffe://example.org/two"]);
    let seen = delta.revision;
    drop(stream);

    // While disconnected: one new entry for A, one for B, one A entry deleted.
    create_entry(&server, "spiffe://example.org/three", &a.spiffe_id).await;
    create_entry(&server, "spiffe://example.org/other2", &b.spiffe_id).await;
    admin(&server)
        .await
        .delete_entry(pa::EntryIdRequest { id: e1.id.clone() })
        .await
        .unwrap();

    let mut resumed = client
        .sync_entries(pn::SyncEntriesRequest {
            resume_from_revision: seen,
        })
        .await
        .unwrap()
        .into_inner();
    let msg = next(&mut resumed).await.unwrap().unwrap();
    let Some(pn::sync_entries_response::Kind::Delta(d)) = &msg.kind else {
        panic!("resume must not resend a snapshot: {msg:?}")
    };
    assert_eq!(ids(&d.upserted), ["spiffe://example.org/three"]);
    assert_eq!(d.deleted, vec![e1.id.clone()]);
    // Nothing else is pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), resumed.message())
            .await
            .is_err(),
        "unexpected extra message"
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_paged() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let a = join(&server).await;
    let n = sigil::server::SNAPSHOT_PAGE * 2 + 7;
    let mut c = admin(&server).await;
    for i in 0..n {
        c.create_entry(pa::EntryParams {
            spiffe_id: format!("spiffe://example.org/w{i}"),
            parent_id: a.spiffe_id.to_string(),
            selectors: vec!["unix:uid:1".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut client = agent_client(&server, &a).await;
    let mut stream = client
        .sync_entries(pn::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut total = 0;
    let mut pages = 0;
    loop {
        let msg = next(&mut stream).await.unwrap().unwrap();
        let Some(pn::sync_entries_response::Kind::Snapshot(p)) = msg.kind else {
            panic!()
        };
        total += p.entries.len();
        pages += 1;
        if p.last {
            break;
        }
    }
    assert_eq!(total, n);
    assert_eq!(pages, 3);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_entries_are_paged_by_bytes_in_snapshots_deltas_and_listings() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let a = join(&server).await;
    let mut client = agent_client(&server, &a).await;
    let mut live = client
        .sync_entries(pn::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    next(&mut live).await.unwrap().unwrap();
    // 200 entries of ~25 KB each (100 DNS names of 240 bytes): 5 MB, more
    // than gRPC's 4 MiB message limit in one page.
    let n = 200;
    let mut c = admin(&server).await;
    let label = "a".repeat(60);
    let params: Vec<pa::EntryParams> = (0..n)
        .map(|i| pa::EntryParams {
            spiffe_id: format!("spiffe://example.org/big{i}"),
            parent_id: a.spiffe_id.to_string(),
            selectors: vec!["unix:uid:1".into()],
            dns_names: (0..100)
                .map(|d| format!("{label}.{label}.{label}.d{d}-{i}.example"))
                .collect(),
            ..Default::default()
        })
        .collect();
    for p in params {
        c.create_entry(p).await.unwrap();
    }
    // A live stream receives them as deltas, every message under 1 MiB.
    let mut got = 0;
    while got < n {
        let msg = next(&mut live).await.unwrap().unwrap();
        assert!(msg.encoded_len() <= sigil::server::MAX_SYNC_MESSAGE + 4096);
        if let Some(pn::sync_entries_response::Kind::Delta(d)) = msg.kind {
            got += d.upserted.len();
        }
    }
    // A fresh snapshot too.
    let mut snap = client
        .sync_entries(pn::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut total = 0;
    loop {
        let msg = next(&mut snap).await.unwrap().unwrap();
        assert!(msg.encoded_len() <= sigil::server::MAX_SYNC_MESSAGE + 4096);
        let Some(pn::sync_entries_response::Kind::Snapshot(p)) = msg.kind else {
            panic!()
        };
        total += p.entries.len();
        if p.last {
            break;
        }
    }
    assert_eq!(total, n);
    // Listing pages by bytes as well.
    let mut listed = 0;
    let mut pages = 0;
    let mut req = pa::ListEntriesRequest::default();
    loop {
        let page = c.list_entries(req.clone()).await.unwrap().into_inner();
        assert!(page.encoded_len() < 4 * 1024 * 1024);
        listed += page.entries.len();
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    assert_eq!(listed, n);
    assert!(pages >= 2, "{pages} pages");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_entries_agents_revision_and_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let a = join(&server).await;
    create_entry(&server, "spiffe://example.org/kept", &a.spiffe_id).await;
    let before = admin(&server)
        .await
        .health(pa::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    let bundle = server.bundle_pem().to_string();
    server.shutdown(Duration::from_secs(5)).await.unwrap();

    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let after = admin(&server)
        .await
        .health(pa::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.revision, before.revision);
    assert_eq!(
        after.x509_authority_expires_at,
        before.x509_authority_expires_at
    );
    assert_eq!(server.bundle_pem(), bundle, "same CA after restart");
    let entries = admin(&server)
        .await
        .list_entries(pa::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(ids(&entries), ["spiffe://example.org/kept"]);
    // The agent's SVID from before the restart still works.
    let mut client = agent_client(&server, &a).await;
    let mut stream = client
        .sync_entries(pn::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let snap = next(&mut stream).await.unwrap().unwrap();
    let Some(pn::sync_entries_response::Kind::Snapshot(p)) = snap.kind else {
        panic!()
    };
    assert_eq!(p.entries.len(), 1);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_socket_is_private_and_bad_input_changes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let mode = std::fs::metadata(server.admin_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let mut c = admin(&server).await;
    let before = c
        .health(pa::HealthRequest {})
        .await
        .unwrap()
        .into_inner()
        .revision;
    // An entry TTL above a sixth of the CA lifetime (24 h here) is refused.
    let s = c
        .create_entry(pa::EntryParams {
            spiffe_id: "spiffe://example.org/long".into(),
            parent_id: "spiffe://example.org/p".into(),
            selectors: vec!["unix:uid:1".into()],
            x509_ttl_seconds: 5 * 3600,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        s.message().contains("x509_ttl") && s.message().contains("14400s"),
        "{s:?}"
    );
    // TTLs that would overflow the clock, and IDs reserved for Sigil itself.
    let s = c
        .generate_token(pa::GenerateTokenRequest {
            ttl_seconds: i64::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("exceeds the maximum"), "{s:?}");
    let s = c
        .mint_x509svid(pa::MintX509svidRequest {
            spiffe_id: "spiffe://example.org/web".into(),
            ttl_seconds: i64::MAX,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(s.message().starts_with("ttl:"), "{s:?}");
    for reserved in [
        "spiffe://example.org/sigil/server",
        "spiffe://example.org/sigil/agent/join_token/x",
    ] {
        let s = c
            .mint_x509svid(pa::MintX509svidRequest {
                spiffe_id: reserved.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(s.message().contains("reserved"), "{s:?}");
        let s = c
            .mint_jwtsvid(pa::MintJwtsvidRequest {
                spiffe_id: reserved.into(),
                audience: vec!["a".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(s.message().contains("reserved"), "{s:?}");
    }
    let s = c
        .create_entry(pa::EntryParams {
            spiffe_id: "spiffe://example.org/x".into(),
            parent_id: "spiffe://example.org/p".into(),
            selectors: vec!["nocolon".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("selectors[0]"), "{s:?}");
    let s = c
        .create_entry(pa::EntryParams {
            spiffe_id: "spiffe://example.org/x".into(),
            parent_id: "spiffe://example.org/p".into(),
            selectors: vec!["unix:uid:1".into()],
            x509_ttl_seconds: -5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(s.message().starts_with("x509_ttl"), "{s:?}");
    let after = c
        .health(pa::HealthRequest {})
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert_eq!(before, after, "a refused request wrote something");

    // A second server on the same socket is refused with a clear error.
    let mut cfg = server_config(&dir.path().join("second"), vec![]);
    cfg.admin_socket = server.admin_socket().to_path_buf();
    let err = start(cfg)
        .await
        .err()
        .expect("second server must not start");
    assert!(err.to_string().contains("already listening"), "{err}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
