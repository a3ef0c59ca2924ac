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

    // The keepalive: 30 s unless set; zero is refused by name.
    let mut raw = sigil::config::RawConfig::load(Some(&toml), sigil::agent::AGENT_KEYS).unwrap();
    assert_eq!(
        sigil::agent::AgentConfig::from_raw(&raw)
            .unwrap()
            .server_keepalive,
        std::time::Duration::from_secs(30)
    );
    raw.flag("server_keepalive", Some("0s".into()));
    let err = sigil::agent::AgentConfig::from_raw(&raw)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server_keepalive") && err.contains("zero"),
        "{err}"
    );
}

/// A TCP relay to a server whose connections can be frozen: a frozen
/// connection stays open but passes nothing more either way, not even its
/// closing (a peer gone without a word: a host lost, a NAT entry dropped).
/// Connections opened after a freeze relay normally, to the server of the
/// moment (see [`Relay::retarget`]).
pub(crate) struct Relay {
    pub(crate) addr: std::net::SocketAddr,
    freezes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    to: std::sync::Arc<std::sync::Mutex<std::net::SocketAddr>>,
    /// Connections relayed so far.
    connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Bytes relayed from the server to the client so far.
    downstream: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    pub(crate) async fn start(to: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let freezes = std::sync::Arc::new(AtomicU64::new(0));
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            freezes: freezes.clone(),
            to: std::sync::Arc::new(std::sync::Mutex::new(to)),
            connections: std::sync::Arc::default(),
            downstream: std::sync::Arc::default(),
        };
        let target = relay.to.clone();
        let (connections, downstream) = (relay.connections.clone(), relay.downstream.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let to = *target.lock().unwrap();
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    continue;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let born = freezes.load(Ordering::SeqCst);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let up = std::sync::Arc::default();
                tokio::spawn(pump(client_read, server_write, born, freezes.clone(), up));
                let down = downstream.clone();
                tokio::spawn(pump(server_read, client_write, born, freezes.clone(), down));
            }
        });
        relay
    }

    /// Relays new connections to `to`.
    pub(crate) fn retarget(&self, to: std::net::SocketAddr) {
        *self.to.lock().unwrap() = to;
    }

    /// Freezes every connection open now.
    pub(crate) fn freeze(&self) {
        self.freezes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either ends, or forever holds both once the
/// connection (opened at freeze count `born`) is frozen; adds what it
/// copies to `copied`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    born: u64,
    freezes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    copied: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = from.read(&mut buf).await;
        if freezes.load(std::sync::atomic::Ordering::SeqCst) > born {
            // Hold both halves open and pass nothing.
            let _held = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        match read {
            Ok(n) if n > 0 => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                copied.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
            }
            _ => return,
        }
    }
}

/// A server in `dir/server`, a relay to it, and an agent in `dir/agent` that
/// reaches the server only through the relay, with `tune` applied to its
/// configuration.
async fn agent_behind_relay(
    dir: &std::path::Path,
    tune: impl FnOnce(&mut sigil::agent::AgentConfig),
) -> (
    sigil::server::ServerHandle,
    Relay,
    sigil::agent::AgentHandle,
) {
    let server = start(server_config(&dir.join("server"), vec![]))
        .await
        .unwrap();
    let relay = Relay::start(server.node_addr()).await;
    let mut config = sigil::agent::AgentConfig {
        servers: vec![relay.addr.to_string()],
        ..agent_config(&server, &dir.join("agent")).await
    };
    tune(&mut config);
    let agent = sigil::agent::start(config).await.unwrap();
    (server, relay, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_leaves_a_connection_that_went_silent() {
    let dir = tempfile::tempdir().unwrap();
    let (server, relay, agent) = agent_behind_relay(dir.path(), |c| {
        c.server_keepalive = std::time::Duration::from_secs(1);
    })
    .await;
    register(&server, agent.spiffe_id(), "before").await;
    wait_for_svids(&agent, 1).await;

    // The agent's connection goes silent: the entry registered now reaches
    // the agent only if it notices (its pings go unanswered) and reconnects.
    // Without pings it would wait on its sync stream forever (the server's
    // own pings close its end, but that close never arrives either).
    relay.freeze();
    register(&server, agent.spiffe_id(), "after").await;
    wait_for_svids(&agent, 2).await;
}

/// Waits until the agent holds SVIDs for exactly `names` (under
/// `spiffe://example.org/`).
async fn wait_for_exactly(agent: &sigil::agent::AgentHandle, names: &[&str]) {
    let want: std::collections::BTreeSet<String> = names
        .iter()
        .map(|n| format!("spiffe://example.org/{n}"))
        .collect();
    let mut state = agent.state();
    let held = |s: &sigil::agent::AgentState| -> std::collections::BTreeSet<String> {
        s.svids
            .iter()
            .map(|v| v.entry.spiffe_id.to_string())
            .collect()
    };
    let waited = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while held(&state.borrow_and_update()) != want {
            state.changed().await.unwrap();
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "the agent holds {:?}, not {want:?}",
        held(&state.borrow())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_repairs_what_resuming_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("server");
    let (first, relay, agent) = agent_behind_relay(dir.path(), |c| {
        c.full_sync_interval = std::time::Duration::from_secs(2);
    })
    .await;
    register(&first, agent.spiffe_id(), "a").await;
    wait_for_exactly(&agent, &["a"]).await;

    // A backup of the store, then more changes the agent follows.
    first
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let backup = dir.path().join("backup");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(home.join("data"))
        .arg(&backup)
        .status()
        .unwrap();
    assert!(copied.success());
    let second = start(server_config(&home, vec![])).await.unwrap();
    relay.retarget(second.node_addr());
    register(&second, agent.spiffe_id(), "b").await;
    register(&second, agent.spiffe_id(), "c").await;
    wait_for_exactly(&agent, &["a", "b", "c"]).await;
    second
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();

    // The store is restored from the backup and goes on from there while the
    // agent is away: its revisions pass the agent's again, so a resume would
    // keep b and c (gone) and miss e (made at a revision the agent had seen).
    std::fs::remove_dir_all(home.join("data")).unwrap();
    std::fs::rename(&backup, home.join("data")).unwrap();
    let third = start(server_config(&home, vec![])).await.unwrap();
    register(&third, agent.spiffe_id(), "e").await;
    let other = sigil::SpiffeId::new("spiffe://example.org/sigil/agent/join_token/other").unwrap();
    for i in 0..20 {
        register(&third, &other, &format!("filler{i}")).await;
    }
    register(&third, agent.spiffe_id(), "d").await;
    relay.retarget(third.node_addr());
    wait_for_exactly(&agent, &["a", "d", "e"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_agent_fetches_every_entry_again_on_its_connection() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (server, relay, agent) = agent_behind_relay(dir.path(), |c| {
        c.full_sync_interval = std::time::Duration::from_secs(1);
    })
    .await;
    // 40 entries: a snapshot of them is several KiB, where an idle
    // connection carries a few hundred bytes of pings in the same time.
    for i in 0..40 {
        register(
            &server,
            agent.spiffe_id(),
            &format!("ns/default/sa/workload-{i:02}"),
        )
        .await;
    }
    wait_for_svids(&agent, 40).await;

    let (connections, before) = (
        relay.connections.load(Ordering::SeqCst),
        relay.downstream.load(Ordering::SeqCst),
    );
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let sent = relay.downstream.load(Ordering::SeqCst) - before;
    assert_eq!(
        relay.connections.load(Ordering::SeqCst),
        connections,
        "a full sync must not reconnect"
    );
    // A snapshot of the 40 entries is about 5 KiB (about 4 of them came in
    // 5 s when this was written); without full syncs, nothing at all.
    assert!(
        sent > 4 * 1024,
        "only {sent} bytes reached the agent in 5 s"
    );
}
