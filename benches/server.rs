//! Server load harness. Everything runs on one tokio thread, so
//! rates are per core, with client costs included (conservative).
//!
//! 1. BatchNewX509SVID through the real gRPC server (mTLS) vs the in-process
//!    CSR → SVID cost measured in the same run: ratio (target ≥ 0.80).
//! 2. With 100,000 entries stored: entry created (admin API) → delta received
//!    on a subscribed agent's SyncEntries stream, p50/p99 (target p99 ≤ 1 s).
//! 3. Server cold start (open store, load CA, listen, answer health) with
//!    100,000 and 500,000 entries.
//! 4. On a 2-worker runtime: admin Health latency while 17,000 CSRs arrive at
//!    once (34 concurrent batches of 500, the per-request cap).
//! 6. The bundle endpoint (https_spiffe) on a 2-worker runtime: GET /
//!    requests/s over 8 keep-alive TLS connections, full answers (200) and
//!    `If-None-Match` revalidations (304), client in the same process.
//! 5. On a 2-worker runtime with 100 real agents (in-process): `ca prepare`
//!    returned → half, then all of the agents have acknowledged the new
//!    bundle (as `ca show` reports it), over several rotations.
//!
//! Run: `cargo bench --bench server` (`-- --quick` for smaller numbers).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sigil::agent::{Attestation, connect};
use sigil::proto::admin as pa;
use sigil::proto::node as pn;
use sigil::registry::{EntryValidation, Registry};
use sigil::server::{ServerConfig, start};
use sigil::store::Kek;
#[path = "common/setup.rs"]
mod setup;

use setup::{join, percentile, td};

use sigil::{
    KeyAlgorithm, PrivateKey, SledStore, SpiffeId, TrustDomain, X509Authority, X509SvidParams,
};

fn config(dir: &Path) -> ServerConfig {
    ServerConfig::local(TrustDomain::new("example.org").unwrap(), dir)
}

/// Writes `n` entries straight into the sled store under `dir` (see
/// `common/setup.rs`).
fn bulk_load(dir: &Path, n: usize, agent: Option<&SpiffeId>, extra: usize) {
    let kek = Kek::load_or_create(&dir.join("kek")).unwrap();
    let store = Arc::new(SledStore::open(&dir.join("data"), kek).unwrap());
    let registry = Registry::new(store, td(), EntryValidation::default());
    setup::bulk_load(&registry, n, agent, extra, 2000, "");
}

async fn signing_throughput(quick: bool) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await.unwrap();
    let agent = join(&server).await;
    let mut admin = sigil::cli::connect_admin(server.admin_socket())
        .await
        .unwrap();
    let entry = admin
        .create_entry(pa::EntryParams {
            spiffe_id: "spiffe://example.org/ns/default/sa/api".into(),
            parent_id: agent.spiffe_id.to_string(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let csrs: Vec<Vec<u8>> = (0..64)
        .map(|_| {
            PrivateKey::generate(KeyAlgorithm::EcP256)
                .unwrap()
                .csr_der("spiffe://example.org/x")
                .unwrap()
        })
        .collect();
    let mut client = connect(
        &server.node_addr().to_string(),
        server.bundle_pem(),
        Some(&agent),
    )
    .await
    .unwrap();
    let batch = 32;
    let batches = if quick { 10 } else { 60 };
    let request = pn::BatchNewX509svidRequest {
        params: csrs[..batch]
            .iter()
            .map(|csr| pn::NewX509svidParams {
                entry_id: entry.id.clone(),
                csr: csr.clone(),
            })
            .collect(),
    };
    // In-process baseline: the same CSRs, an authority of the same kind.
    let ca = X509Authority::self_signed(
        &td(),
        KeyAlgorithm::EcP256,
        Duration::from_secs(86_400),
        SystemTime::now(),
    )
    .unwrap();
    let params = X509SvidParams {
        spiffe_id: SpiffeId::new("spiffe://example.org/ns/default/sa/api").unwrap(),
        dns_names: vec![],
        ttl: Duration::from_secs(3600),
    };
    let mut grpc_rates = Vec::new();
    let mut local_rates = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..batches {
            let r = client
                .batch_new_x509svid(request.clone())
                .await
                .unwrap()
                .into_inner();
            assert!(r.results.iter().all(|x| x.code == 0));
        }
        grpc_rates.push((batches * batch) as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..batches {
            for csr in &csrs[..batch] {
                std::hint::black_box(ca.issue_from_csr(csr, &params, SystemTime::now()).unwrap());
            }
        }
        local_rates.push((batches * batch) as f64 / t.elapsed().as_secs_f64());
    }
    grpc_rates.sort_by(f64::total_cmp);
    local_rates.sort_by(f64::total_cmp);
    let (g, l) = (grpc_rates[2], local_rates[2]);
    println!("BatchNewX509SVID via gRPC+mTLS (batches of {batch}): {g:>8.0} SVIDs/s");
    println!("in-process issue_from_csr (same CSRs):             {l:>8.0} SVIDs/s");
    println!("ratio gRPC / in-process: {:.3} (target >= 0.80)", g / l);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

async fn propagation_latency(entries: usize, samples: usize) {
    let dir = tempfile::tempdir().unwrap();
    // Start once to create the CA and attest an agent, then bulk-load.
    let server = start(config(dir.path())).await.unwrap();
    let agent = join(&server).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
    bulk_load(dir.path(), entries, Some(&agent.spiffe_id), 100);

    let server = start(config(dir.path())).await.unwrap();
    let mut admin = sigil::cli::connect_admin(server.admin_socket())
        .await
        .unwrap();
    let mut client = connect(
        &server.node_addr().to_string(),
        server.bundle_pem(),
        Some(&agent),
    )
    .await
    .unwrap();
    let mut stream = client
        .sync_entries(pn::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut snapshot = 0;
    loop {
        let m = stream.message().await.unwrap().unwrap();
        let Some(pn::sync_entries_response::Kind::Snapshot(p)) = m.kind else {
            panic!()
        };
        snapshot += p.entries.len();
        if p.last {
            break;
        }
    }
    assert_eq!(snapshot, 100);
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        let t = Instant::now();
        admin
            .create_entry(pa::EntryParams {
                spiffe_id: format!("spiffe://example.org/ns/new/sa/n{i}"),
                parent_id: agent.spiffe_id.to_string(),
                selectors: vec!["unix:uid:7".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let m = stream.message().await.unwrap().unwrap();
        assert!(matches!(
            m.kind,
            Some(pn::sync_entries_response::Kind::Delta(_))
        ));
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "entry created -> delta on agent stream, {entries} entries stored, {samples} samples: p50 {:?}  p99 {:?}  max {:?}",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat[lat.len() - 1]
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

async fn cold_start(entries: usize) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await.unwrap();
    server.shutdown(Duration::from_secs(5)).await.unwrap();
    let t = Instant::now();
    bulk_load(dir.path(), entries, None, 0);
    let load = t.elapsed();
    let size: u64 = walk_size(&dir.path().join("data"));
    let t = Instant::now();
    let server = start(config(dir.path())).await.unwrap();
    let mut admin = sigil::cli::connect_admin(server.admin_socket())
        .await
        .unwrap();
    admin.health(pa::HealthRequest {}).await.unwrap();
    let ready = t.elapsed();
    // First snapshot of one simulated agent's share (entries / 1000).
    println!(
        "cold start with {entries} entries: ready in {ready:?} (bulk load took {load:?}, store {} MiB)",
        size / (1024 * 1024)
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

fn walk_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let m = e.metadata().unwrap();
                    if m.is_dir() {
                        walk_size(&e.path())
                    } else {
                        m.len()
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

async fn health_during_csr_storm(quick: bool) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await.unwrap();
    let agent = join(&server).await;
    let mut admin = sigil::cli::connect_admin(server.admin_socket())
        .await
        .unwrap();
    let entry = admin
        .create_entry(pa::EntryParams {
            spiffe_id: "spiffe://example.org/ns/default/sa/storm".into(),
            parent_id: agent.spiffe_id.to_string(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let csr = PrivateKey::generate(KeyAlgorithm::EcP256)
        .unwrap()
        .csr_der("spiffe://example.org/x")
        .unwrap();
    let batches = if quick { 8 } else { 34 };
    let request = pn::BatchNewX509svidRequest {
        params: vec![
            pn::NewX509svidParams {
                entry_id: entry.id.clone(),
                csr,
            };
            500
        ],
    };
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(
            connect(
                &server.node_addr().to_string(),
                server.bundle_pem(),
                Some(&agent),
            )
            .await
            .unwrap(),
        );
    }
    let t = Instant::now();
    let mut storm = tokio::task::JoinSet::new();
    for i in 0..batches {
        let mut c = clients[i % clients.len()].clone();
        let req = request.clone();
        storm.spawn(async move {
            c.batch_new_x509svid(req)
                .await
                .unwrap()
                .into_inner()
                .results
                .len()
        });
    }
    let mut health = Vec::new();
    while !storm.is_empty() {
        let h = Instant::now();
        admin.health(pa::HealthRequest {}).await.unwrap();
        health.push(h.elapsed());
        while let Some(done) = storm.try_join_next() {
            assert_eq!(done.unwrap(), 500);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drained = t.elapsed();
    health.sort();
    println!(
        "{} CSRs at once ({batches} batches of 500): drained in {drained:?} ({:.0} SVIDs/s); admin Health meanwhile ({} calls): p50 {:?}, p99 {:?}, max {:?}",
        batches * 500,
        (batches * 500) as f64 / drained.as_secs_f64(),
        health.len(),
        percentile(&health, 0.5),
        percentile(&health, 0.99),
        health[health.len() - 1]
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// What `ca show` says: (bundle sequence, agents current).
async fn bundle_progress(
    admin: &mut pa::admin_client::AdminClient<tonic::transport::Channel>,
) -> (u64, u32) {
    let r = admin
        .list_authorities(pa::AuthorityKindRequest::default())
        .await
        .unwrap()
        .into_inner();
    (r.bundle_sequence, r.agents_current)
}

async fn prepare_acknowledged(agents: usize, rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(&dir.path().join("server"))).await.unwrap();
    let mut admin = sigil::cli::connect_admin(server.admin_socket())
        .await
        .unwrap();
    let mut running = Vec::new();
    for i in 0..agents {
        let token = admin
            .generate_token(pa::GenerateTokenRequest { ttl_seconds: 600 })
            .await
            .unwrap()
            .into_inner()
            .token;
        let d = dir.path().join(format!("agent{i}"));
        running.push(
            sigil::agent::start(sigil::agent::AgentConfig {
                attestation: Some(Attestation::JoinToken(token)),
                ..sigil::agent::AgentConfig::new(
                    vec![server.node_addr().to_string()],
                    server.bundle_pem().to_string(),
                    td(),
                    d.join("api.sock"),
                    d.join("data"),
                )
            })
            .await
            .unwrap(),
        );
    }
    // Every agent is connected and has acknowledged the current bundle.
    while bundle_progress(&mut admin).await.1 < agents as u32 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut rpc, mut half, mut all) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        admin
            .prepare_authority(pa::AuthorityKindRequest {
                kind: "x509".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        rpc.push(t.elapsed());
        let t = Instant::now();
        let mut half_at = None;
        loop {
            let (_, current) = bundle_progress(&mut admin).await;
            if half_at.is_none() && current as usize >= agents / 2 {
                half_at = Some(t.elapsed());
            }
            if current as usize == agents {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        all.push(t.elapsed());
        half.push(half_at.unwrap());
        admin
            .activate_authority(pa::AuthorityKindRequest {
                kind: "x509".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    rpc.sort();
    half.sort();
    all.sort();
    println!(
        "`ca prepare` RPC (new key, commit flushed): p50 {:?}, max {:?}",
        percentile(&rpc, 0.5),
        rpc.last().unwrap()
    );
    println!(
        "`ca prepare` returned -> acknowledged by {agents} agents ({rounds} rotations): half p50 {:?}, all p50 {:?}, all max {:?}",
        percentile(&half, 0.5),
        percentile(&all, 0.5),
        all.last().unwrap()
    );
    for a in running {
        a.shutdown(Duration::from_secs(2)).await;
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

async fn bundle_endpoint_rate(requests_per_conn: usize) {
    use http_body_util::{BodyExt, Empty};
    use tokio_rustls::rustls;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.bundle_endpoint = Some(sigil::server::bundle_endpoint::BundleEndpointConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        profile: sigil::server::bundle_endpoint::BundleProfile::HttpsSpiffe,
    });
    let server = start(cfg).await.unwrap();
    let addr = server.bundle_addr().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for der in sigil::x509::certs_from_pem(server.bundle_pem()).unwrap() {
        roots.add(der.into()).unwrap();
    }
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    for revalidate in [false, true] {
        let start_at = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let tls = tls.clone();
            tasks.push(tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect("sigil-server".try_into().unwrap(), tcp)
                    .await
                    .unwrap();
                let (mut send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let mut etag = None::<String>;
                for _ in 0..requests_per_conn {
                    let mut req = hyper::Request::get("/").header("host", "sigil-server");
                    if let (true, Some(tag)) = (revalidate, &etag) {
                        req = req.header("if-none-match", tag.as_str());
                    }
                    let resp = send
                        .send_request(req.body(Empty::<bytes::Bytes>::new()).unwrap())
                        .await
                        .unwrap();
                    let expected = if revalidate && etag.is_some() {
                        304
                    } else {
                        200
                    };
                    assert_eq!(resp.status().as_u16(), expected);
                    etag = resp
                        .headers()
                        .get("etag")
                        .map(|v| v.to_str().unwrap().to_string());
                    resp.into_body().collect().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rate = (8 * requests_per_conn) as f64 / start_at.elapsed().as_secs_f64();
        println!(
            "bundle endpoint GET / over 8 keep-alive TLS connections, {}: {rate:>8.0} requests/s",
            if revalidate {
                "If-None-Match (304)"
            } else {
                "full answers (200)"
            }
        );
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let two_workers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    two_workers.block_on(bundle_endpoint_rate(if quick { 500 } else { 5_000 }));
    two_workers.block_on(prepare_acknowledged(100, if quick { 3 } else { 20 }));
    two_workers.block_on(health_during_csr_storm(quick));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        signing_throughput(quick).await;
        propagation_latency(
            if quick { 10_000 } else { 100_000 },
            if quick { 50 } else { 300 },
        )
        .await;
        for n in if quick {
            vec![10_000]
        } else {
            vec![100_000, 500_000]
        } {
            cold_start(n).await;
        }
    });
}
