//! `svid_cache_max`: an agent caps the SVIDs it holds, always keeps those of
//! connected workloads, and signs a workload's SVID on demand when the cap
//! left it out.

use std::time::Duration;

use sigil::proto::admin as pa;
use sigil::proto::workload as pw;
use sigil::server::start;

use crate::agent::{agent_config, my_uid, raw_client, with_header};
use crate::server::{admin, server_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_cache_signs_a_connected_workloads_svid_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("server"), vec![]))
        .await
        .unwrap();
    let config = sigil::agent::AgentConfig {
        svid_cache_max: Some(3),
        ..agent_config(&server, &dir.path().join("agent")).await
    };
    let agent = sigil::agent::start(config).await.unwrap();
    let mut admin = admin(&server).await;
    let entry = |id: String, uid: u32| pa::EntryParams {
        spiffe_id: id,
        parent_id: agent.spiffe_id().to_string(),
        selectors: vec![format!("unix:uid:{uid}")],
        ..Default::default()
    };
    // Six entries no workload here has: only three are signed.
    for i in 0..6 {
        admin
            .create_entry(entry(format!("spiffe://example.org/idle/{i}"), 100_000 + i))
            .await
            .unwrap();
    }
    let mine = admin
        .create_entry(entry("spiffe://example.org/mine".into(), my_uid()))
        .await
        .unwrap()
        .into_inner();
    let mut state = agent.state();
    crate::eventually("the agent holds 7 entries and 3 SVIDs", || {
        let s = state.borrow_and_update().clone();
        async move { (s.entries.len() == 7 && s.svids.len() == 3).then_some(()) }
    })
    .await;
    let holds_mine =
        |s: &sigil::workload_api::AgentState| s.svids.iter().any(|v| v.entry.id == mine.id);
    assert!(
        !holds_mine(&state.borrow()),
        "the newest entry, with no workload connected, is beyond the cap"
    );

    // This process connects: its SVID is signed for it and served.
    let mut client = raw_client(agent.socket()).await;
    let mut stream = client
        .fetch_x509svid(with_header(pw::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.svids.len(), 1);
    assert_eq!(first.svids[0].spiffe_id, "spiffe://example.org/mine");
    // Still at the cap: an idle SVID made room.
    crate::eventually("the agent holds 3 SVIDs, the workload's among them", || {
        let s = state.borrow_and_update().clone();
        async move { (s.svids.len() == 3 && holds_mine(&s)).then_some(()) }
    })
    .await;
}
