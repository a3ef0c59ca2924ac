//! Several servers on one PostgreSQL (a real one, from the machine's
//! packages, `initdb`-ed into a temp dir on a loopback port): agents that
//! list several servers, admin commands answered by any of them, a server
//! SIGKILLed during writes, the rotation leader killed mid-rotation, the
//! database restarted under load, a server cut off from the database, and
//! the schema version check.
//!
//! `SIGIL_SKIP_POSTGRES=1` skips these on a machine without PostgreSQL;
//! otherwise a missing PostgreSQL fails them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sigil::agent::{AgentConfig, AgentHandle};
use sigil::proto::admin as pa;
use sigil::server::{ServerConfig, ServerHandle, start};
use sigil::store::TempPostgres;

use crate::agent::{agent_config, my_uid, wait_for_svids};
use crate::eventually;
use crate::operability::http_get;
use crate::server::{admin, server_config};

fn temp_pg() -> Option<TempPostgres> {
    if std::env::var_os("SIGIL_SKIP_POSTGRES").is_some() {
        return None;
    }
    Some(TempPostgres::start().unwrap())
}

/// The configuration of cluster member `name`: its own dir and admin
/// socket, the shared datastore and KEK.
fn member(dir: &Path, name: &str, pg: &TempPostgres) -> ServerConfig {
    let mut c = server_config(&dir.join(name), vec![]);
    c.datastore = Some(pg.url("postgres"));
    c.kek_file = dir.join("kek");
    c
}

/// An agent in `dir/name` that lists `servers` and attests with a token made
/// on `token_from`.
async fn agent_on(
    dir: &Path,
    name: &str,
    token_from: &ServerHandle,
    servers: &[&ServerHandle],
) -> AgentHandle {
    let config = AgentConfig {
        servers: servers.iter().map(|s| s.node_addr().to_string()).collect(),
        ..agent_config(token_from, &dir.join(name)).await
    };
    sigil::agent::start(config).await.unwrap()
}

type SyncStream = tonic::Streaming<sigil::proto::node::SyncEntriesResponse>;

/// A sync stream of `agent` on `server`, its first snapshot page read.
async fn open_sync(server: &ServerHandle, agent: &sigil::agent::AgentIdentity) -> SyncStream {
    let mut stream = crate::server::agent_client(server, agent)
        .await
        .sync_entries(sigil::proto::node::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    stream
}

/// The status `stream` ends with, within `within` (`what` says what was
/// expected, for the failure message).
async fn stream_end(stream: &mut SyncStream, within: Duration, what: &str) -> tonic::Status {
    tokio::time::timeout(within, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the sync stream ended without saying why"),
                Err(status) => return status,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"))
}

async fn register(server: &ServerHandle, agent: &AgentHandle, name: &str) -> String {
    admin(server)
        .await
        .create_entry(pa::EntryParams {
            spiffe_id: format!("spiffe://example.org/{name}"),
            parent_id: agent.spiffe_id().to_string(),
            selectors: vec![format!("unix:uid:{}", my_uid())],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

fn svid_ids(agent: &AgentHandle) -> BTreeSet<String> {
    agent
        .state()
        .borrow()
        .svids
        .iter()
        .map(|s| s.entry.spiffe_id.to_string())
        .collect()
}

/// Every entry ID a server lists.
async fn entry_ids(socket: &Path) -> BTreeSet<String> {
    let mut c = sigil::cli::connect_admin(socket).await.unwrap();
    let mut ids = BTreeSet::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list_entries(pa::ListEntriesRequest {
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.entries.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

/// What `entry show`, `bundle show` and `ca show` say on one server, less
/// the agent counts (each server counts the agents it saw itself).
async fn cluster_view(socket: &Path) -> (BTreeSet<String>, Vec<u8>, Vec<(String, String)>) {
    let mut c = sigil::cli::connect_admin(socket).await.unwrap();
    let bundle = c
        .get_bundle(pa::GetBundleRequest::default())
        .await
        .unwrap()
        .into_inner()
        .bundle_jwks;
    let authorities = authorities(socket).await;
    (entry_ids(socket).await, bundle, authorities)
}

async fn authorities(socket: &Path) -> Vec<(String, String)> {
    let mut c = sigil::cli::connect_admin(socket).await.unwrap();
    let r = c
        .list_authorities(pa::AuthorityKindRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut v: Vec<(String, String)> = r
        .authorities
        .into_iter()
        .map(|a| (format!("{}:{}", a.kind, a.id), a.state))
        .collect();
    v.sort();
    v
}

/// Waits until `read` of every server's admin socket gives `want`.
async fn on_every<T, F, Fut>(servers: &[&ServerHandle], what: &str, want: T, read: F)
where
    T: PartialEq + Clone,
    F: Fn(PathBuf) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    for s in servers {
        let socket = s.admin_socket().to_path_buf();
        eventually(what, || {
            let got = read(socket.clone());
            let want = want.clone();
            async move { (got.await == want).then_some(()) }
        })
        .await;
    }
}

/// What `ca show` says of the agents on one server: (seen in the last
/// hour, of those on the current bundle).
async fn fleet(socket: &Path) -> (u32, u32) {
    let r = sigil::cli::connect_admin(socket)
        .await
        .unwrap()
        .list_authorities(pa::AuthorityKindRequest::default())
        .await
        .unwrap()
        .into_inner();
    (r.agents_recent, r.agents_current)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_and_two_agents_share_one_cluster() {
    let Some(pg) = temp_pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s1 = start(member(dir.path(), "s1", &pg)).await.unwrap();
    let s2 = start(member(dir.path(), "s2", &pg)).await.unwrap();
    let s3 = start(member(dir.path(), "s3", &pg)).await.unwrap();
    // One authority set for the cluster: the servers that joined signed
    // nothing of their own.
    assert_eq!(s1.bundle_pem(), s3.bundle_pem());

    // Tokens made on one server attest on another.
    let a = agent_on(dir.path(), "a", &s3, &[&s1, &s2]).await;
    let b = agent_on(dir.path(), "b", &s1, &[&s3, &s2]).await;

    // Entries written on each server reach the agent they are parented to,
    // whichever server that agent syncs with, and only that agent.
    let a1 = register(&s1, &a, "a1").await;
    register(&s2, &b, "b1").await;
    register(&s3, &a, "a2").await;
    register(&s2, &b, "b2").await;
    wait_for_svids(&a, 2).await;
    wait_for_svids(&b, 2).await;
    let ids = |names: &[&str]| -> BTreeSet<String> {
        names
            .iter()
            .map(|n| format!("spiffe://example.org/{n}"))
            .collect()
    };
    assert_eq!(svid_ids(&a), ids(&["a1", "a2"]));
    assert_eq!(svid_ids(&b), ids(&["b1", "b2"]));

    // A deletion on another server reaches the agent too.
    admin(&s3)
        .await
        .delete_entry(pa::EntryIdRequest { id: a1 })
        .await
        .unwrap();
    eventually("the deletion reaches agent a", || async {
        (svid_ids(&a) == ids(&["a2"])).then_some(())
    })
    .await;

    // `entry show`, `bundle show` and `ca show` agree on every server.
    let first = cluster_view(s1.admin_socket()).await;
    assert_eq!(first.0.len(), 3);
    on_every(
        &[&s2, &s3],
        "every server shows the same cluster",
        first,
        |p| async move { cluster_view(&p).await },
    )
    .await;

    // `ca show` counts the whole fleet on every server, though each agent
    // talks to one server.
    on_every(
        &[&s1, &s2, &s3],
        "every server counts both agents",
        (2, 2),
        |p| async move { fleet(&p).await },
    )
    .await;

    // A forced rotation on one server shows on the others.
    admin(&s2)
        .await
        .prepare_authority(pa::AuthorityKindRequest {
            kind: "x509".into(),
            force: false,
        })
        .await
        .unwrap();
    let prepared = authorities(s2.admin_socket()).await;
    assert!(prepared.iter().any(|(_, state)| state == "prepared"));
    on_every(
        &[&s1, &s3],
        "the successor shows on every server",
        prepared,
        |p| async move { authorities(&p).await },
    )
    .await;

    // ... and both agents' acknowledgement of the new bundle is counted
    // everywhere, whichever server each one told.
    on_every(
        &[&s1, &s2, &s3],
        "both agents on the new bundle",
        (2, 2),
        |p| async move { fleet(&p).await },
    )
    .await;

    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
    for s in [s1, s2, s3] {
        s.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

/// A `sigil server` process of the cluster (killed on drop).
struct ServerProcess {
    child: Child,
    admin: PathBuf,
    log: PathBuf,
}

impl ServerProcess {
    fn spawn(dir: &Path, name: &str, pg: &TempPostgres, extra: &[&str]) -> Self {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).unwrap();
        let admin = home.join("admin.sock");
        let log = home.join("server.log");
        let child = Command::new(env!("CARGO_BIN_EXE_sigil"))
            .arg("server")
            .args(["--trust-domain", "example.org", "--bind", "127.0.0.1:0"])
            .arg("--datastore")
            .arg(pg.url("postgres"))
            .arg("--kek-file")
            .arg(dir.join("kek"))
            .arg("--data-dir")
            .arg(home.join("data"))
            .arg("--admin-socket")
            .arg(&admin)
            .args(extra)
            .env_remove("SIGIL_ADMIN_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        ServerProcess { child, admin, log }
    }

    /// Waits until the server answers Health.
    async fn ready(&mut self) {
        for _ in 0..600 {
            if let Ok(mut c) = sigil::cli::connect_admin(&self.admin).await
                && c.health(pa::HealthRequest {}).await.is_ok()
            {
                return;
            }
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the server never became ready:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn kill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The parent of the entries the write loads register (no agent needs them).
const LOAD_PARENT: &str = "spiffe://example.org/node";

/// An entry of a write load.
fn load_entry(spiffe_id: String) -> pa::EntryParams {
    pa::EntryParams {
        spiffe_id,
        parent_id: LOAD_PARENT.into(),
        selectors: vec!["unix:uid:1000".into()],
        ..Default::default()
    }
}

/// Creates entries through `socket` until a create fails; records each one
/// the server acknowledged.
async fn write_until_error(socket: PathBuf, writer: usize, acked: Arc<Mutex<Vec<String>>>) {
    let Ok(mut c) = sigil::cli::connect_admin(&socket).await else {
        return;
    };
    for i in 0.. {
        let created = c
            .create_entry(load_entry(format!("spiffe://example.org/w{writer}/e{i}")))
            .await;
        match created {
            Ok(e) => acked.lock().unwrap().push(e.into_inner().id),
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_during_writes_loses_nothing_it_acknowledged() {
    let Some(pg) = temp_pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let survivor = start(member(dir.path(), "survivor", &pg)).await.unwrap();
    let mut victim = ServerProcess::spawn(dir.path(), "victim", &pg, &[]);
    victim.ready().await;

    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(write_until_error(victim.admin.clone(), w, acked.clone())))
        .collect();
    eventually("the victim acknowledged some writes", || async {
        (acked.lock().unwrap().len() >= 100).then_some(())
    })
    .await;
    victim.kill();
    for w in writers {
        w.await.unwrap();
    }

    // Everything the dead server acknowledged is there, read through the
    // survivor; and the survivor carries on writing.
    let acked: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let listed = entry_ids(survivor.admin_socket()).await;
    let lost: Vec<_> = acked.difference(&listed).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    crate::server::create_entry(
        &survivor,
        "spiffe://example.org/after",
        &sigil::SpiffeId::new(LOAD_PARENT).unwrap(),
    )
    .await;
    survivor.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The `sigil_cluster_lease_held` gauge of `lease` at `metrics`.
async fn holds(metrics: std::net::SocketAddr, lease: &str) -> bool {
    let (_, body) = http_get(metrics, "/metrics").await;
    body.contains(&format!("sigil_cluster_lease_held{{lease=\"{lease}\"}} 1"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotation_leader_killed_mid_rotation_another_server_completes_it() {
    let Some(pg) = temp_pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    // A 60 s authority: a successor is prepared after 30 s and activated
    // after 50 s. The leader is the first server up.
    let short = [
        "--ca-ttl",
        "60s",
        "--default-x509-ttl",
        "10s",
        "--default-jwt-ttl",
        "10s",
        "--agent-ttl",
        "10s",
    ];
    let metrics = crate::failover::free_addr();
    let metrics_flag = metrics.to_string();
    let mut leader_args = short.to_vec();
    leader_args.extend(["--metrics-bind", &metrics_flag]);
    let mut leader = ServerProcess::spawn(dir.path(), "leader", &pg, &leader_args);
    leader.ready().await;
    eventually("the first server takes the rotation lease", || async {
        holds(metrics, "ca-rotation").await.then_some(())
    })
    .await;

    let mut config = member(dir.path(), "follower", &pg);
    config.ca_ttl = Duration::from_secs(60);
    config.options.default_x509_ttl = Duration::from_secs(10);
    config.options.default_jwt_ttl = Duration::from_secs(10);
    config.options.agent_ttl = Duration::from_secs(10);
    let follower = start(config).await.unwrap();
    let socket = follower.admin_socket().to_path_buf();
    let before = authorities(&socket).await;

    // The leader prepares (the follower sees it), then dies.
    let prepared = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            if let Some((id, _)) = authorities(&socket)
                .await
                .into_iter()
                .find(|(id, state)| id.starts_with("x509:") && state == "prepared")
            {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the leader never prepared a successor");
    assert!(!before.iter().any(|(id, _)| *id == prepared));
    leader.kill();

    // The follower takes the lease and activates the successor the leader
    // prepared (it does not prepare one of its own).
    let after = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            let now = authorities(&socket).await;
            if now.iter().any(|(id, s)| *id == prepared && s == "active") {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the follower never activated {prepared}: {:?}\nleader log:\n{}",
            before,
            std::fs::read_to_string(&leader.log).unwrap_or_default()
        )
    });
    let x509: Vec<_> = after
        .iter()
        .filter(|(id, _)| id.starts_with("x509:"))
        .collect();
    assert_eq!(x509.len(), 2, "one root per rotation: {after:?}");
    follower.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `sigil healthcheck` against `socket`: whether it passed.
fn healthcheck(socket: &Path) -> bool {
    Command::new(env!("CARGO_BIN_EXE_sigil"))
        .arg("healthcheck")
        .arg("--admin-socket")
        .arg(socket)
        .env_remove("SIGIL_ADMIN_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Creates entries through `server` until told to stop, riding out errors;
/// returns the IDs acknowledged.
async fn write_through_outage(
    socket: PathBuf,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<String> {
    let mut c = sigil::cli::connect_admin(&socket).await.unwrap();
    let mut acked = Vec::new();
    for i in 0.. {
        if *stop.borrow() {
            break;
        }
        let created = c
            .create_entry(load_entry(format!("spiffe://example.org/load/{i}")))
            .await;
        match created {
            Ok(e) => acked.push(e.into_inner().id),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load() {
    let Some(mut pg) = temp_pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s1 = start(member(dir.path(), "s1", &pg)).await.unwrap();
    let s2 = start(member(dir.path(), "s2", &pg)).await.unwrap();
    let a = agent_on(dir.path(), "a", &s1, &[&s2, &s1]).await;
    register(&s1, &a, "before").await;
    wait_for_svids(&a, 1).await;
    // A sync stream held on s1 by another agent, to see it end.
    let probe = crate::server::join(&s1).await;
    let mut held = open_sync(&s1, &probe).await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(write_through_outage(
        s1.admin_socket().to_path_buf(),
        stopped,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| pg.stop()).unwrap();

    // While the datastore is down the servers say so.
    let socket = s1.admin_socket().to_path_buf();
    eventually("healthcheck fails while PostgreSQL is down", || {
        let socket = socket.clone();
        async move {
            (!tokio::task::spawn_blocking(move || healthcheck(&socket))
                .await
                .unwrap())
            .then_some(())
        }
    })
    .await;

    // Admin calls answer UNAVAILABLE (retryable) with the datastore's own
    // error, not "internal".
    let e = admin(&s2)
        .await
        .list_entries(pa::ListEntriesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("PostgreSQL") && e.message().contains("connect"),
        "{e:?}"
    );

    // A datastore that cannot be read is not an empty one: the agent keeps
    // the SVID it holds.
    assert!(svid_ids(&a).contains("spiffe://example.org/before"));
    // A server that cannot read its store ends its sync streams (so agents
    // try another server), once its reads have failed for 10 s.
    let ended = stream_end(
        &mut held,
        Duration::from_secs(60),
        "a sync stream stayed open while the database was down",
    )
    .await;
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(
        ended.message().contains("cannot read its store"),
        "{ended:?}"
    );
    assert!(svid_ids(&a).contains("spiffe://example.org/before"));

    // ... and recover by themselves when it returns.
    tokio::task::block_in_place(|| pg.resume()).unwrap();
    for s in [&s1, &s2] {
        let socket = s.admin_socket().to_path_buf();
        eventually("healthcheck passes again", || {
            let socket = socket.clone();
            async move {
                tokio::task::spawn_blocking(move || healthcheck(&socket))
                    .await
                    .unwrap()
                    .then_some(())
            }
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    let acked: BTreeSet<String> = load.await.unwrap().into_iter().collect();
    assert!(!acked.is_empty());
    let listed = entry_ids(s2.admin_socket()).await;
    let lost: Vec<_> = acked.difference(&listed).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");

    // The change feed came back, and the servers take sync streams again: an
    // entry written on one server reaches the agent through the other.
    register(&s1, &a, "after").await;
    wait_for_svids(&a, 2).await;
    a.shutdown(Duration::from_secs(5)).await;
    s1.shutdown(Duration::from_secs(5)).await.unwrap();
    s2.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_version_and_the_kek_are_checked_at_start() {
    let Some(pg) = temp_pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let first = start(member(dir.path(), "first", &pg)).await.unwrap();
    first.shutdown(Duration::from_secs(5)).await.unwrap();
    let supported = sigil::store::PG_SCHEMA_VERSION;

    // One version ahead (a newer server migrated additively): still served.
    pg.sql(
        "postgres",
        &format!("UPDATE sigil_schema SET version = {}", supported + 1),
    )
    .unwrap();
    let newer = start(member(dir.path(), "newer", &pg)).await.unwrap();
    newer.shutdown(Duration::from_secs(5)).await.unwrap();

    // Two ahead: refused, naming both versions, and nothing changed.
    pg.sql(
        "postgres",
        &format!("UPDATE sigil_schema SET version = {}", supported + 2),
    )
    .unwrap();
    let e = start(member(dir.path(), "skewed", &pg))
        .await
        .err()
        .expect("a server two schema versions behind must not start")
        .to_string();
    assert!(
        e.contains(&format!("{}", supported + 2)) && e.contains(&format!("{supported}")),
        "{e}"
    );
    let version = pg
        .sql("postgres", "SELECT version FROM sigil_schema")
        .unwrap();
    assert_eq!(version.trim(), format!("{}", supported + 2));
    pg.sql(
        "postgres",
        &format!("UPDATE sigil_schema SET version = {supported}"),
    )
    .unwrap();

    // Another KEK cannot unseal the cluster's keys: refused at start.
    let mut other = member(dir.path(), "other", &pg);
    other.kek_file = dir.path().join("other-kek");
    let e = start(other)
        .await
        .err()
        .expect("a server with another KEK must not start")
        .to_string();
    assert!(e.to_lowercase().contains("kek"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_starting_together_create_one_authority_set() {
    let Some(pg) = temp_pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    sigil::store::Kek::load_or_create(&dir.path().join("kek")).unwrap();
    // Three processes race to create the first authorities of an empty
    // datastore: one of each kind may come out.
    let mut servers: Vec<_> = ["p1", "p2", "p3"]
        .iter()
        .map(|n| ServerProcess::spawn(dir.path(), n, &pg, &[]))
        .collect();
    for s in &mut servers {
        s.ready().await;
    }
    let first = authorities(&servers[0].admin).await;
    let active = |v: &[(String, String)], kind: &str| {
        v.iter()
            .filter(|(id, s)| id.starts_with(kind) && s == "active")
            .count()
    };
    assert_eq!(active(&first, "x509:"), 1, "{first:?}");
    assert_eq!(active(&first, "jwt:"), 1, "{first:?}");
    assert_eq!(first.len(), 2, "{first:?}");
    for s in &servers[1..] {
        assert_eq!(authorities(&s.admin).await, first);
    }

    // Two operators preparing at once on two servers: one successor.
    let prepare = |socket: PathBuf| async move {
        sigil::cli::connect_admin(&socket)
            .await
            .unwrap()
            .prepare_authority(pa::AuthorityKindRequest {
                kind: "x509".into(),
                force: false,
            })
            .await
    };
    let (a, b) = tokio::join!(
        prepare(servers[0].admin.clone()),
        prepare(servers[1].admin.clone())
    );
    assert!(a.is_ok() || b.is_ok(), "{a:?} {b:?}");
    // The third server learns of it through the change feed.
    let third = servers[2].admin.clone();
    let after = eventually("the successor shows on the third server", || {
        let third = third.clone();
        async move {
            let now = authorities(&third).await;
            now.iter().any(|(_, s)| s == "prepared").then_some(now)
        }
    })
    .await;
    let prepared = after.iter().filter(|(_, s)| s == "prepared").count();
    assert_eq!(prepared, 1, "{after:?} ({a:?}, {b:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_on_one_server_closes_the_agents_stream_on_another() {
    let Some(pg) = temp_pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s1 = start(member(dir.path(), "s1", &pg)).await.unwrap();
    let s2 = start(member(dir.path(), "s2", &pg)).await.unwrap();
    // Attested through s1, syncing with s2.
    let agent = crate::server::join(&s1).await;
    let mut stream = open_sync(&s2, &agent).await;

    admin(&s1)
        .await
        .ban_agent(pa::AgentIdRequest {
            spiffe_id: agent.spiffe_id.to_string(),
        })
        .await
        .unwrap();
    let status = stream_end(
        &mut stream,
        Duration::from_secs(30),
        "the banned agent's stream on the other server stayed open",
    )
    .await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // And s2 refuses it from then on.
    let e = crate::server::agent_client(&s2, &agent)
        .await
        .batch_new_x509svid(sigil::proto::node::BatchNewX509svidRequest { params: vec![] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    s1.shutdown(Duration::from_secs(5)).await.unwrap();
    s2.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A server cut off from the database (its connections to it go silent, new
/// ones fail) ends its agents' sync streams with UNAVAILABLE once its reads
/// have failed for 10 s, and an agent that lists another server of
/// the cluster moves there: an entry registered after the cut reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cut_off_from_the_database_sends_its_agents_to_another() {
    let Some(pg) = temp_pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let database = format!("127.0.0.1:{}", pg.port()).parse().unwrap();
    let relay = crate::failover::Relay::start(database).await;
    let mut config = member(dir.path(), "cut", &pg);
    config.datastore = Some(format!("postgres://sigil@{}/postgres", relay.addr));
    let cut = start(config).await.unwrap();
    // The other server starts once the agent syncs with `cut` (an agent
    // starts at a random server of its list), on an address kept for it.
    let unused = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let mut config = member(dir.path(), "other", &pg);
    config.bind = unused();
    let agent = sigil::agent::start(AgentConfig {
        servers: vec![cut.node_addr().to_string(), config.bind.to_string()],
        ..agent_config(&cut, &dir.path().join("a")).await
    })
    .await
    .unwrap();
    register(&cut, &agent, "before").await;
    wait_for_svids(&agent, 1).await;
    let other = start(config).await.unwrap();

    // Nothing listens on the relay's new target: connections made after
    // the cut fail, and those open before it pass nothing more.
    relay.retarget(unused());
    relay.freeze();
    register(&other, &agent, "after").await;
    // 10 s of failed reads (a read may itself wait 10 s), then the move.
    let mut state = agent.state();
    tokio::time::timeout(Duration::from_secs(90), async {
        while state.borrow_and_update().svids.len() < 2 {
            state.changed().await.unwrap();
        }
    })
    .await
    .expect("the agent never got the entry registered after its server was cut off");
    let names = ["after", "before"].map(|n| format!("spiffe://example.org/{n}"));
    assert_eq!(svid_ids(&agent), BTreeSet::from(names));
    other.shutdown(Duration::from_secs(5)).await.unwrap();
    let _ = cut.shutdown(Duration::from_secs(1)).await;
}
