//! CA rotation as operators drive it: `sigil ca` against a real server, and
//! a real agent that keeps working across prepare, activate, taint, revoke.

use std::process::Command;
use std::time::Duration;

use sigil::proto::admin as pa;
use sigil::proto::workload as pw;
use sigil::server::start;

use crate::agent::start_agent_with;
use crate::server::{admin, server_config};

pub(crate) fn ca(socket: &std::path::Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .arg("ca")
        .args(args)
        .args(["--output", "json", "--admin-socket"])
        .arg(socket)
        .env_remove("SIGIL_ADMIN_SOCKET")
        .output()
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    // With --output json an error comes as {"error": ...} on stdout.
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stderr),
        json["error"].as_str().unwrap_or_default()
    );
    (o.status.success(), json, err)
}

fn states(v: &serde_json::Value, kind: &str) -> Vec<(String, String)> {
    v["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == kind)
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_string(),
                a["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn x509_bundle_len(c: &pw::X509BundlesResponse) -> usize {
    // DER certificates, concatenated: count the top-level SEQUENCEs.
    let mut rest = c.bundles.values().next().unwrap().as_slice();
    let mut n = 0;
    while rest.len() > 4 {
        let len = usize::from(rest[2]) << 8 | usize::from(rest[3]);
        rest = &rest[(4 + len).min(rest.len())..];
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_rotate_the_ca_and_agents_follow() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let sock = server.admin_socket().to_path_buf();
    let agent = start_agent_with(&server, dir.path(), None).await;
    crate::agent::register_me(&server, "spiffe://example.org/rotating", &agent).await;

    let (ok, shown, err) = ca(&sock, &["show"]);
    assert!(ok, "{err}");
    let x509 = states(&shown, "x509");
    assert_eq!(x509.len(), 1);
    assert_eq!(x509[0].1, "active");
    let first = x509[0].0.clone();
    assert!(
        shown["authorities"][0]["not_after"]
            .as_str()
            .unwrap()
            .ends_with('Z'),
        "RFC 3339: {shown}"
    );

    // Bad transitions are refused, say why, and change nothing.
    for (args, says) in [
        (vec!["activate", "--kind", "x509"], "no prepared x509"),
        (vec!["taint", first.as_str()], "only an old authority"),
        (vec!["revoke", first.as_str()], "only a tainted authority"),
        (vec!["taint", "nope"], "no authority"),
    ] {
        let (ok, _, err) = ca(&sock, &args);
        assert!(!ok && err.contains(says), "{args:?}: {err}");
    }

    // Prepare: the workload's bundle grows to two CAs, pushed (no polling).
    let (ok, prepared, err) = ca(&sock, &["prepare", "--kind", "x509"]);
    assert!(ok, "{err}");
    let second = states(&prepared, "x509")[0].0.clone();
    let mut c = sigil::cli::connect_workload(agent.socket()).await.unwrap();
    let mut req = tonic::Request::new(pw::X509BundlesRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut bundles = c.fetch_x509_bundles(req).await.unwrap().into_inner();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let m = bundles.message().await.unwrap().unwrap();
            if x509_bundle_len(&m) == 2 {
                return;
            }
        }
    })
    .await
    .expect("the prepared CA never reached the workload's bundle");

    // An agent that syncs but has not applied the new bundle holds the
    // activation back; --force overrides.
    let silent = crate::server::join(&server).await;
    let mut silent_client = crate::server::agent_client(&server, &silent).await;
    let _silent_stream = silent_client
        .sync_entries(sigil::proto::node::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap();
    let (ok, _, err) = ca(&sock, &["activate", "--kind", "x509"]);
    assert!(
        !ok && err.contains("have not applied bundle sequence"),
        "{err}"
    );
    // The real agent acknowledges the bundle it applied; the silent one never does.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, shown, _) = ca(&sock, &["show"]);
        assert_eq!(shown["agents"]["recent"], 2, "{shown}");
        if shown["agents"]["current"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never acknowledged: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Activate: new SVIDs chain to the new CA; the agent keeps talking to the
    // server (whose TLS certificate now comes from the new CA too).
    let (ok, _, err) = ca(&sock, &["activate", "--kind", "x509", "--force"]);
    assert!(ok, "{err}");
    let (_, shown, _) = ca(&sock, &["show", "--kind", "x509"]);
    let now = states(&shown, "x509");
    assert!(now.contains(&(first.clone(), "old".into())), "{now:?}");
    assert!(now.contains(&(second.clone(), "active".into())), "{now:?}");
    crate::agent::register_me(&server, "spiffe://example.org/after-rotation", &agent).await;
    let mut state = agent.state();
    let issued_by = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let found = state
                .borrow_and_update()
                .svids
                .iter()
                .find(|s| s.entry.spiffe_id.as_str() == "spiffe://example.org/after-rotation")
                .map(|s| s.chain[0].clone());
            if let Some(leaf) = found {
                return leaf;
            }
            state.changed().await.unwrap();
        }
    })
    .await
    .expect("no SVID after rotation");
    let (_, leaf) = x509_parser::parse_x509_certificate(&issued_by).unwrap();
    let aki = leaf
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => a
                .key_identifier
                .as_ref()
                .map(|k| k.0.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            _ => None,
        })
        .unwrap();
    assert_eq!(aki, second, "signed by the new active authority");

    // Taint the old one: the agent re-issues what it signed at once (the
    // workload's SVIDs and its own), without waiting for half-life.
    let (ok, _, err) = ca(&sock, &["taint", &first]);
    assert!(ok, "{err}");
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let all_new = state
                .borrow_and_update()
                .svids
                .iter()
                .all(|s| *s.issuer == *second);
            let own = sigil::x509::certs_from_pem(
                &std::fs::read_to_string(dir.path().join("agent/agent-svid.pem")).unwrap(),
            )
            .unwrap();
            if all_new && sigil::x509::authority_key_id(&own[0]).as_deref() == Some(second.as_str())
            {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), state.changed()).await;
        }
    })
    .await
    .expect("SVIDs signed by the tainted authority were not re-issued");
    // Progress: the real agent reports none left; an agent that says it still
    // holds 7 shows up as re-issuing.
    let (_, shown, _) = ca(&sock, &["show"]);
    let sequence = shown["bundle_sequence"].as_u64().unwrap();
    silent_client
        .ack_bundle(sigil::proto::node::AckBundleRequest {
            sequence,
            tainted_svids: 7,
        })
        .await
        .unwrap();
    let shown = crate::eventually("both agents acknowledging the taint", || async {
        let (_, shown, _) = ca(&sock, &["show"]);
        (shown["agents"]["current"] == 2).then_some(shown)
    })
    .await;
    assert_eq!(shown["agents"]["reissuing"], 1, "{shown}");
    assert_eq!(shown["agents"]["svids_to_reissue"], 7, "{shown}");
    let text = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["ca", "show", "--admin-socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("taint: 1 agents still re-issuing (7 SVIDs left), 0 not yet heard from"),
        "{text}"
    );
    // Then revoke it: it leaves the workload's bundle.
    let (ok, _, err) = ca(&sock, &["revoke", &first]);
    assert!(ok, "{err}");
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let m = bundles.message().await.unwrap().unwrap();
            if x509_bundle_len(&m) == 1 {
                return;
            }
        }
    })
    .await
    .expect("the revoked CA never left the workload's bundle");
    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_rotates_on_its_own_and_an_agent_keeps_its_identity() {
    // A 12 s CA: prepared under 6 s left, active under 2 s left, ticks every 1 s.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(&dir.path().join("s"), vec![]);
    cfg.ca_ttl = Duration::from_secs(12);
    cfg.options.default_x509_ttl = Duration::from_secs(2);
    cfg.options.default_jwt_ttl = Duration::from_secs(2);
    cfg.options.agent_ttl = Duration::from_secs(2);
    let server = start(cfg).await.unwrap();
    let first = server_ca(&server).await;
    let agent = start_agent_with(&server, dir.path(), None).await;
    crate::agent::register_me(&server, "spiffe://example.org/scheduled", &agent).await;
    // Wait for two activations (two full hand-overs), generously.
    let mut seen = vec![first];
    tokio::time::timeout(Duration::from_secs(60), async {
        while seen.len() < 3 {
            let now = server_ca(&server).await;
            if !seen.contains(&now) {
                seen.push(now);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the schedule did not rotate twice");
    admin(&server)
        .await
        .health(pa::HealthRequest {})
        .await
        .expect("healthy after rotations");
    // The workload still gets a current SVID through the agent.
    let mut c = sigil::cli::connect_workload(agent.socket()).await.unwrap();
    let mut req = tonic::Request::new(pw::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        let mut s = c.fetch_x509svid(req).await.unwrap().into_inner();
        s.message().await.unwrap().unwrap()
    })
    .await
    .expect("no SVID after rotations");
    assert_eq!(got.svids[0].spiffe_id, "spiffe://example.org/scheduled");
    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The active X.509 authority's ID, from the admin API.
async fn server_ca(server: &sigil::server::ServerHandle) -> String {
    admin(server)
        .await
        .list_authorities(pa::AuthorityKindRequest {
            kind: "x509".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .authorities
        .into_iter()
        .find(|a| a.state == "active")
        .unwrap()
        .id
}

/// The workload SVIDs' issuers and the agent's own SVID issuer, once every
/// one of them is `issuer`.
async fn wait_all_signed_by(
    agent: &sigil::agent::AgentHandle,
    dir: &std::path::Path,
    issuer: &str,
) {
    let mut state = agent.state();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let workloads = {
                let s = state.borrow_and_update();
                !s.svids.is_empty() && s.svids.iter().all(|s| *s.issuer == *issuer)
            };
            let own = std::fs::read_to_string(dir.join("agent/agent-svid.pem"))
                .ok()
                .and_then(|p| sigil::x509::certs_from_pem(&p).ok())
                .and_then(|c| sigil::x509::authority_key_id(&c[0]));
            if workloads && own.as_deref() == Some(issuer) {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), state.changed()).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not everything was re-issued by {issuer}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_mid_rotation_and_an_agent_restarted_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let bootstrap = server.bundle_pem().to_string();
    let node_addr = server.node_addr();
    let agent = start_agent_with(&server, dir.path(), None).await;
    crate::agent::register_me(&server, "spiffe://example.org/survivor", &agent).await;
    let first = server_ca(&server).await;
    wait_all_signed_by(&agent, dir.path(), &first).await;
    let (ok, prepared, err) = ca(server.admin_socket(), &["prepare", "--kind", "x509"]);
    assert!(ok, "{err}");
    let second = states(&prepared, "x509")[0].0.clone();

    // The server stops between prepare and activate, and comes back on the
    // same address with the slots as they were.
    server.shutdown(Duration::from_secs(5)).await.unwrap();
    // The old accept loop lets go of the port just after shutdown returns.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let server = loop {
        let mut cfg = server_config(&dir.path().join("s"), vec![]);
        cfg.bind = node_addr;
        match start(cfg).await {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("restart: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let (_, shown, _) = ca(server.admin_socket(), &["show", "--kind", "x509"]);
    let mut slots = states(&shown, "x509");
    slots.sort();
    let mut expected = vec![
        (first.clone(), "active".to_string()),
        (second.clone(), "prepared".to_string()),
    ];
    expected.sort();
    assert_eq!(slots, expected);

    // Finish the rotation and retire the first CA entirely; the agent
    // reconnects by itself and replaces everything the first CA signed.
    for args in [
        vec!["activate", "--kind", "x509", "--force"],
        vec!["taint", first.as_str()],
    ] {
        let (ok, _, err) = ca(server.admin_socket(), &args);
        assert!(ok, "{args:?}: {err}");
    }
    wait_all_signed_by(&agent, dir.path(), &second).await;
    let (ok, _, err) = ca(server.admin_socket(), &["revoke", &first]);
    assert!(ok, "{err}");
    // The revocation's bundle reaches the agent (it acknowledges it).
    crate::eventually("the agent acknowledges the revocation's bundle", || {
        let (_, shown, _) = ca(server.admin_socket(), &["show"]);
        let agents = &shown["agents"];
        let done = agents["current"] == agents["recent"] && agents["recent"] == 1;
        async move { done.then_some(()) }
    })
    .await;
    agent.shutdown(Duration::from_secs(2)).await;

    // Restarted with its original bootstrap bundle (the revoked CA only),
    // the agent trusts the server through the bundle it saved.
    let agent = sigil::agent::start(sigil::agent::AgentConfig::new(
        vec![node_addr.to_string()],
        bootstrap,
        crate::server::td(),
        dir.path().join("api.sock"),
        dir.path().join("agent"),
    ))
    .await
    .unwrap();
    crate::agent::register_me(&server, "spiffe://example.org/after-restart", &agent).await;
    let mut state = agent.state();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let found = state.borrow_and_update().svids.iter().any(|s| {
                s.entry.spiffe_id.as_str() == "spiffe://example.org/after-restart"
                    && *s.issuer == *second
            });
            if found {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), state.changed()).await;
        }
    })
    .await
    .expect("the restarted agent did not reach the rotated server");
    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
