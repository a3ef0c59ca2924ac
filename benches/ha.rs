//! High-availability harness: `sigil server`s (in-process) on one real
//! PostgreSQL (`initdb`-ed into a temp dir, fsync on), on a 2-worker runtime.
//!
//! 1. BatchNewX509SVID throughput through 1, 2 and 3 servers on one
//!    PostgreSQL, and through one server on sled, in the same run: the
//!    servers share this machine's cores, so the question is whether the
//!    datastore costs signing anything, not whether 3 servers sign 3x.
//! 2. Entry created through server A → delta on an agent stream held by
//!    server B, p50/p99 (target p99 ≤ 100 ms), against A → A in the same
//!    run, with many entries stored.
//! 3. Datastore operations (round trips; a commit is one transaction) per
//!    agent snapshot, per entry change (all servers together) and per
//!    signed SVID.
//! 4. Cold start of another replica with many entries stored: start →
//!    Health answered, then an agent's first full snapshot through it.
//!
//! Run: `cargo bench --bench ha` (`-- --quick` for smaller numbers).
//! Needs PostgreSQL's server binaries (Debian's `postgresql` package).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil::agent::{AgentIdentity, connect};
use sigil::proto::admin as pa;
use sigil::proto::node as pn;
use sigil::registry::{EntryValidation, Registry};
use sigil::server::{ServerConfig, ServerHandle, start};
use sigil::store::{Kek, PostgresStore, TempPostgres};
use sigil::{KeyAlgorithm, PrivateKey};

#[path = "common/setup.rs"]
mod setup;

use setup::{join, percentile, td};

type NodeClient = pn::node_client::NodeClient<tonic::transport::Channel>;

/// A server in `dir/name`, on `pg` when given, without per-agent limits
/// (the harness is one agent asking for a lot).
fn config(dir: &Path, name: &str, pg: Option<&TempPostgres>) -> ServerConfig {
    let mut c = ServerConfig::local(td(), &dir.join(name));
    c.kek_file = dir.join("kek");
    c.datastore = pg.map(|pg| pg.url("postgres"));
    c.options.agent_csr_rate = 0;
    c
}

/// Every datastore operation counted so far, by operation.
fn ops() -> std::collections::BTreeMap<String, u64> {
    let text = sigil::metrics::metrics().encode();
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("sigil_datastore_operations_total{op=\"") {
            let (op, n) = rest.split_once("\"} ").unwrap();
            out.insert(op.to_string(), n.parse().unwrap());
        }
    }
    out
}

fn ops_since(
    before: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    ops()
        .into_iter()
        .map(|(op, n)| {
            let d = n - before.get(&op).copied().unwrap_or(0);
            (op, d)
        })
        .filter(|(_, d)| *d > 0)
        .collect()
}

fn total(ops: &std::collections::BTreeMap<String, u64>) -> u64 {
    ops.values().sum()
}

async fn create(server: &ServerHandle, spiffe_id: String, parent: &AgentIdentity) -> String {
    sigil::cli::connect_admin(server.admin_socket())
        .await
        .unwrap()
        .create_entry(pa::EntryParams {
            spiffe_id,
            parent_id: parent.spiffe_id.to_string(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

async fn client(server: &ServerHandle, agent: &AgentIdentity) -> NodeClient {
    connect(
        &server.node_addr().to_string(),
        server.bundle_pem(),
        Some(agent),
    )
    .await
    .unwrap()
}

/// SVIDs per second with `tasks` concurrent callers, each sending `batches`
/// batches of 32 CSRs round-robin over `clients`.
async fn sign_rate(clients: &[NodeClient], entry: &str, tasks: usize, batches: usize) -> f64 {
    let csrs: Vec<Vec<u8>> = (0..32)
        .map(|_| {
            PrivateKey::generate(KeyAlgorithm::EcP256)
                .unwrap()
                .csr_der("spiffe://example.org/x")
                .unwrap()
        })
        .collect();
    let request = pn::BatchNewX509svidRequest {
        params: csrs
            .iter()
            .map(|csr| pn::NewX509svidParams {
                entry_id: entry.to_string(),
                csr: csr.clone(),
            })
            .collect(),
    };
    let t = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let request = request.clone();
            tokio::spawn(async move {
                for _ in 0..batches {
                    let r = c
                        .batch_new_x509svid(request.clone())
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(r.results.iter().all(|x| x.code == 0), "{:?}", r.results[0]);
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    (tasks * batches * 32) as f64 / t.elapsed().as_secs_f64()
}

async fn signing(dir: &Path, cluster: &[ServerHandle], quick: bool) {
    let sled = start(config(dir, "sled", None)).await.unwrap();
    let sled_agent = join(&sled).await;
    let sled_entry = create(&sled, "spiffe://example.org/sign".into(), &sled_agent).await;
    let sled_client = vec![client(&sled, &sled_agent).await];

    let agent = join(&cluster[0]).await;
    let entry = create(&cluster[0], "spiffe://example.org/sign".into(), &agent).await;
    let mut clients = Vec::new();
    for s in cluster {
        clients.push(client(s, &agent).await);
    }
    let (tasks, batches) = (6, if quick { 20 } else { 80 });
    // Warm up every path once.
    sign_rate(&sled_client, &sled_entry, tasks, 2).await;
    sign_rate(&clients, &entry, tasks, 2).await;

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let before = ops();
    let mut pg_signed = 0;
    for _ in 0..3 {
        rates[0].push(sign_rate(&sled_client, &sled_entry, tasks, batches).await);
        for n in 1..=3 {
            rates[n].push(sign_rate(&clients[..n], &entry, tasks, batches).await);
            pg_signed += tasks * batches * 32;
        }
    }
    let signing_ops = ops_since(&before);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let sled_rate = median(&mut rates[0]);
    println!("== signing: BatchNewX509SVID, {tasks} callers x batches of 32, median of 3");
    println!("1 server on sled:        {sled_rate:>8.0} SVIDs/s");
    for (n, r) in rates.iter_mut().enumerate().skip(1) {
        let rate = median(r);
        println!(
            "{n} server(s) on PostgreSQL: {rate:>8.0} SVIDs/s  ratio to sled {:.2}",
            rate / sled_rate
        );
    }
    println!(
        "datastore operations per signed SVID: {:.3} {signing_ops:?}",
        total(&signing_ops) as f64 / pg_signed as f64
    );
    sled.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Writes `n` entries straight into the datastore (see `common/setup.rs`),
/// and `extra` more parented to `agent`.
fn bulk_load(pg: &TempPostgres, kek: &Path, n: usize, agent: &AgentIdentity, extra: usize) {
    let store =
        PostgresStore::connect(&pg.url("postgres"), Kek::load_or_create(kek).unwrap()).unwrap();
    let registry = Registry::new(Arc::new(store), td(), EntryValidation::default());
    setup::bulk_load(&registry, n, Some(&agent.spiffe_id), extra, 5000, "ha");
}

/// Opens a SyncEntries stream and reads its snapshot; returns the stream
/// and the number of entries in it.
async fn snapshot(c: &mut NodeClient) -> (tonic::Streaming<pn::SyncEntriesResponse>, usize) {
    let mut stream = c
        .sync_entries(pn::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    loop {
        let m = stream.message().await.unwrap().unwrap();
        match m.kind {
            Some(pn::sync_entries_response::Kind::Snapshot(p)) => {
                n += p.entries.len();
                if p.last {
                    return (stream, n);
                }
            }
            _ => continue,
        }
    }
}

/// Creates `samples` entries through `writer`, each waited for on `stream`.
async fn propagation(
    writer: &ServerHandle,
    agent: &AgentIdentity,
    stream: &mut tonic::Streaming<pn::SyncEntriesResponse>,
    samples: usize,
    name: &str,
) -> Vec<Duration> {
    let mut admin = sigil::cli::connect_admin(writer.admin_socket())
        .await
        .unwrap();
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        let t = Instant::now();
        admin
            .create_entry(pa::EntryParams {
                spiffe_id: format!("spiffe://example.org/ns/{name}/sa/n{i}"),
                parent_id: agent.spiffe_id.to_string(),
                selectors: vec!["unix:uid:7".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        loop {
            let m = stream.message().await.unwrap().unwrap();
            if matches!(m.kind, Some(pn::sync_entries_response::Kind::Delta(_))) {
                break;
            }
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

async fn propagation_and_cold_start(
    dir: &Path,
    pg: &TempPostgres,
    cluster: &[ServerHandle],
    entries: usize,
    samples: usize,
) {
    let agent = join(&cluster[0]).await;
    let t = Instant::now();
    bulk_load(pg, &dir.join("kek"), entries, &agent, 1000);
    println!(
        "== {entries} entries (+1,000 for the measured agent) bulk-loaded in {:?}",
        t.elapsed()
    );

    // Snapshot cost, through server B.
    let mut on_b = client(&cluster[1], &agent).await;
    let before = ops();
    let (mut stream_b, n) = snapshot(&mut on_b).await;
    assert_eq!(n, 1000);
    let snap_ops = ops_since(&before);
    println!(
        "agent snapshot of {n} entries: {} datastore operations {snap_ops:?}",
        total(&snap_ops)
    );

    // A → B, then A → A as the baseline, in the same run.
    let before = ops();
    let cross = propagation(&cluster[0], &agent, &mut stream_b, samples, "cross").await;
    let change_ops = ops_since(&before);
    let mut on_a = client(&cluster[0], &agent).await;
    let (mut stream_a, _) = snapshot(&mut on_a).await;
    drop(stream_b);
    let local = propagation(&cluster[0], &agent, &mut stream_a, samples, "local").await;
    println!(
        "entry created on A -> delta on B's stream ({samples} samples): p50 {:?} p99 {:?} max {:?} (target p99 <= 100 ms)",
        percentile(&cross, 0.5),
        percentile(&cross, 0.99),
        cross[cross.len() - 1]
    );
    println!(
        "entry created on A -> delta on A's stream (same run):       p50 {:?} p99 {:?} max {:?}",
        percentile(&local, 0.5),
        percentile(&local, 0.99),
        local[local.len() - 1]
    );
    println!(
        "ratio p99 cross-server / same-server: {:.2}",
        percentile(&cross, 0.99).as_secs_f64() / percentile(&local, 0.99).as_secs_f64()
    );
    println!(
        "datastore operations per entry change, 3 servers together: {:.1} {:?}",
        total(&change_ops) as f64 / samples as f64,
        change_ops
    );
    drop(stream_a);

    // A replica joining now.
    let t = Instant::now();
    let replica = start(config(dir, "replica", Some(pg))).await.unwrap();
    sigil::cli::connect_admin(replica.admin_socket())
        .await
        .unwrap()
        .health(pa::HealthRequest {})
        .await
        .unwrap();
    let ready = t.elapsed();
    let mut on_r = client(&replica, &agent).await;
    let t = Instant::now();
    let (_stream, n) = snapshot(&mut on_r).await;
    let first_snapshot = t.elapsed();
    println!(
        "cold start of a replica with {} entries stored: Health answered in {ready:?}; then an agent's snapshot of {n} entries in {first_snapshot:?}",
        entries + 1000 + 2 * samples
    );
    replica.shutdown(Duration::from_secs(5)).await.unwrap();
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pg = TempPostgres::start_durable().expect("PostgreSQL (Debian's postgresql package)");
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let mut cluster = Vec::new();
        for i in 0..3 {
            cluster.push(
                start(config(dir.path(), &format!("s{i}"), Some(&pg)))
                    .await
                    .unwrap(),
            );
        }
        signing(dir.path(), &cluster, quick).await;
        propagation_and_cold_start(
            dir.path(),
            &pg,
            &cluster,
            if quick { 100_000 } else { 1_000_000 },
            if quick { 100 } else { 300 },
        )
        .await;
        for s in cluster {
            s.shutdown(Duration::from_secs(5)).await.unwrap();
        }
    });
}
