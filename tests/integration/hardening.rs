//! Hostile neighbours and hostile input: connection floods must not take the
//! service away from everyone else, and attacker strings never reach the
//! audit log raw.

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use sigil::proto::admin as pa;
use sigil::server::start;
use tokio::io::AsyncReadExt;

use crate::agent::start_agent_with;
use crate::server::{admin, agent_client, join, server_config};
use sigil::agent::renew;

const FLOOD: usize = 1_100;

/// How many of `streams` the server closes within 10 s (waited on together).
async fn count_closed<S: AsyncReadExt + Unpin + Send + 'static>(streams: Vec<S>) -> usize {
    let mut set = tokio::task::JoinSet::new();
    for mut s in streams {
        set.spawn(async move { closed_by_peer(&mut s, Duration::from_secs(10)).await });
    }
    set.join_all().await.into_iter().filter(|c| *c).count()
}

/// Whether the server closed this connection (EOF or reset) within `wait`;
/// whatever it sent before (HTTP/2 SETTINGS) is skipped.
async fn closed_by_peer(stream: &mut (impl AsyncReadExt + Unpin), wait: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(wait, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_from_one_uid_does_not_starve_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("server"), vec![]))
        .await
        .unwrap();
    // Other users must be able to reach the socket's directory.
    let public = dir.path().join("public");
    let agent = start_agent_with(&server, &public, None).await;
    let sock = agent.socket().to_path_buf();

    // 1,100 idle connections from this uid: the first 256 are held, the rest
    // are closed at once instead of eating the agent's descriptors.
    let mut held = Vec::new();
    for _ in 0..FLOOD {
        held.push(tokio::net::UnixStream::connect(&sock).await.unwrap());
    }
    let excess = held.split_off(256);
    assert_eq!(
        count_closed(excess).await,
        FLOOD - 256,
        "connections over the per-uid cap are closed"
    );

    // Another uid still gets its SVID during the flood (needs root to switch).
    let other_uid = 65_534;
    use std::os::unix::fs::PermissionsExt;
    for d in [dir.path(), public.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    if sigil::attest::current_uid().unwrap() != 0 {
        eprintln!("not root: skipping the other-uid fetch");
    } else {
        admin(&server)
            .await
            .create_entry(pa::EntryParams {
                spiffe_id: "spiffe://example.org/neighbour".into(),
                parent_id: agent.spiffe_id().to_string(),
                selectors: vec![format!("unix:uid:{other_uid}")],
                ..Default::default()
            })
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = Instant::now();
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_sigil"))
                .args(["workload", "fetch-jwt", "--audience", "flood"])
                .env(
                    "SPIFFE_ENDPOINT_SOCKET",
                    format!("unix://{}", sock.display()),
                )
                .uid(other_uid)
                .gid(other_uid)
                .output()
                .unwrap();
            if out.status.success() {
                eprintln!("other uid's fetch during the flood took {:?}", t.elapsed());
                break;
            }
            // The entry may not have synced yet.
            assert!(
                Instant::now() < deadline,
                "other uid's fetch failed during the flood: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Held connections that never send a request are closed after the
    // first-request deadline (10 s), freeing the uid's places.
    assert!(closed_by_peer(&mut held[0], Duration::from_secs(30)).await);
    drop(held);
    let mut c = sigil::cli::connect_workload(&sock).await.unwrap();
    let mut req = tonic::Request::new(sigil::proto::workload::X509BundlesRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let status = c.fetch_x509_bundles(req).await.unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "served again: {status:?}"
    );

    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_handshakes_do_not_take_down_the_node_or_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path(), vec![])).await.unwrap();
    let agent = join(&server).await;
    let addr = server.node_addr();

    // 1,100 TCP connections from 127.0.0.2 that never start TLS.
    let mut held = Vec::new();
    for _ in 0..FLOOD {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        held.push(s.connect(addr).await.unwrap());
    }
    let excess = held.split_off(512);
    assert_eq!(
        count_closed(excess).await,
        FLOOD - 512,
        "connections over the per-address cap are closed"
    );

    // Meanwhile the admin API answers and a real agent renews over mTLS.
    admin(&server)
        .await
        .health(pa::HealthRequest {})
        .await
        .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["healthcheck", "--admin-socket"])
        .arg(server.admin_socket())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = Instant::now();
    let mut client = agent_client(&server, &agent).await;
    renew(&mut client, &agent).await.unwrap();
    eprintln!(
        "agent connect + renew during the flood took {:?}",
        t.elapsed()
    );
    join(&server).await;

    // A connection that never completes its handshake is dropped after 10 s.
    assert!(closed_by_peer(&mut held[0], Duration::from_secs(30)).await);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[test]
fn attacker_strings_are_logged_escaped() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let admin_sock = dir.path().join("admin.sock");
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args([
            "server",
            "--trust-domain",
            "example.org",
            "--bind",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--admin-socket")
        .arg(&admin_sock)
        .env("SIGIL_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let lines = lines.clone();
        let stderr = server.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(addr) = line.split("node_api=").nth(1) {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_string());
                }
                lines.lock().unwrap().push(line);
            }
        });
    }
    let node_api = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let token = std::process::Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["token", "generate", "--output", "json", "--admin-socket"])
        .arg(&admin_sock)
        .output()
        .unwrap();
    let token: serde_json::Value = serde_json::from_slice(&token.stdout).unwrap();
    let bundle = std::process::Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["bundle", "show", "--format", "pem", "--admin-socket"])
        .arg(&admin_sock)
        .output()
        .unwrap()
        .stdout;
    let bundle = String::from_utf8(bundle).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let td = sigil::TrustDomain::new("example.org").unwrap();
        let mut c = sigil::agent::connect(&node_api, &bundle, None)
            .await
            .unwrap();
        let id = sigil::agent::attest(
            &mut c,
            &td,
            &sigil::agent::Attestation::JoinToken(token["token"].as_str().unwrap().into()),
        )
        .await
        .unwrap();
        let mut c = sigil::agent::connect(&node_api, &bundle, Some(&id))
            .await
            .unwrap();
        let key = sigil::PrivateKey::generate(sigil::KeyAlgorithm::EcP256).unwrap();
        let forged = "x\nINFO sigil::audit: event=\"forged\"";
        let r = c
            .batch_new_x509svid(sigil::proto::node::BatchNewX509svidRequest {
                params: vec![sigil::proto::node::NewX509svidParams {
                    entry_id: forged.to_string(),
                    csr: key.csr_der("spiffe://example.org/x").unwrap(),
                }],
            })
            .await
            .unwrap();
        assert_ne!(r.into_inner().results[0].code, 0);
    });
    std::thread::sleep(Duration::from_millis(500));
    let _ = server.kill();
    let _ = server.wait();
    let lines = lines.lock().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("new_x509_svid") && l.contains("\\n")),
        "the deny is logged with the newline escaped: {lines:#?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("INFO sigil::audit: event=\"forged\"")),
        "an attacker string forged a log line: {lines:#?}"
    );
}
