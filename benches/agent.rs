//! Agent load harness. The server runs in this process; the
//! agent runs as a separate `sigil agent` process so its memory is its own;
//! this process is the workload (entries select its uid).
//!
//! 1. First FetchX509SVID response from a warm cache: a burst of 1,000
//!    concurrent streams, then 200 new fetches while those 1,000 stay open.
//! 2. Rotation push: the entry changes, the agent re-signs, and every one of
//!    the 1,000 open streams receives the new SVID: p50/p99/max. 1,000 Envoy
//!    SDS streams (`default` and `ROOTCA`) are open too and measured alike.
//!    Then a CA authority is prepared: the new bundle on every open stream.
//! 3. Agent RSS holding 1 SVID, then 10,000 SVIDs.
//! 4. A taint: the old CA's 10,001 SVIDs re-issued by the agent.
//! 5. A fresh agent with no workload streams: RSS holding 1 SVID, then
//!    10,001 (the per-SVID cost).
//! 0. First, the `:authority` layer every Unix socket runs behind: the same
//!    health service accepted raw and through the layer, first-response
//!    latency with 1,000 streams open on each; and the layer's own cost per
//!    request, for a compliant client (bytes pass through) and a grpc-core
//!    client (the header block is re-encoded).
//!
//! Run: `cargo bench --bench agent` (`-- --quick`: 200 streams, 2,000 SVIDs;
//! `-- --fresh-only` runs only 5, `-- --burst-only` only 1).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

#[path = "common/perf.rs"]
mod perf;

// The harness's clients share the two cores with what they measure: they
// use the allocator `sigil` uses, so glibc's arena growth does not inflate
// their share (docs/benchmarks.md has figures with both).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient as SdsClient;
use sigil::TrustDomain;
use sigil::proto::admin as pa;
use sigil::proto::workload as pw;
use sigil::server::{ServerConfig, start};
use tokio::io::AsyncBufReadExt;

/// The server, without the per-agent signing limit: the agents here sign
/// 10,001 SVIDs several times within seconds (section 3, then the taint),
/// and the taint must time the re-issue, not the bucket refilling.
fn config(dir: &Path) -> ServerConfig {
    let mut c = ServerConfig::local(TrustDomain::new("example.org").unwrap(), dir);
    c.options.agent_csr_rate = 0;
    c
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "p50 {:?}  p99 {:?}  max {:?}",
        pct(&v, 0.5),
        pct(&v, 0.99),
        v[v.len() - 1]
    )
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn req() -> tonic::Request<pw::X509svidRequest> {
    let mut r = tonic::Request::new(pw::X509svidRequest {});
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// A `sigil agent` process, killed when dropped: a section that panics
/// leaves no agent running behind it.
struct AgentProcess(Child);

impl std::ops::Deref for AgentProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for AgentProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a `sigil agent` process (socket `<name>.sock`, data in `<name>`
/// under `dir`, where `bundle.pem` is): the child, its log lines, its token.
async fn spawn_agent(
    server: &sigil::server::ServerHandle,
    admin: &mut pa::admin_client::AdminClient<tonic::transport::Channel>,
    dir: &Path,
    name: &str,
) -> (
    AgentProcess,
    tokio::sync::mpsc::UnboundedReceiver<String>,
    pa::GenerateTokenResponse,
) {
    let token = admin
        .generate_token(pa::GenerateTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner();
    let mut agent: Child = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args([
            "agent",
            "--server",
            &server.node_addr().to_string(),
            "--join-token",
            &token.token,
        ])
        .arg("--trust-bundle")
        .arg(dir.join("bundle.pem"))
        .arg("--socket")
        .arg(dir.join(format!("{name}.sock")))
        .arg("--data-dir")
        .arg(dir.join(name))
        .env("SIGIL_LOG", "info,sigil::audit=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (line_tx, lines) = tokio::sync::mpsc::unbounded_channel();
    let stderr = tokio::process::ChildStderr::from_std(agent.stderr.take().unwrap()).unwrap();
    tokio::spawn(async move {
        let mut r = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(l)) = r.next_line().await {
            let _ = line_tx.send(l);
        }
    });
    (AgentProcess(agent), lines, token)
}

/// Creates `n` entries for `parent` that no workload here matches, 16 at
/// a time.
async fn create_unmatched(
    admin: &pa::admin_client::AdminClient<tonic::transport::Channel>,
    parent: &str,
    n: usize,
    tag: &str,
) {
    let mut batch = Vec::new();
    for i in 0..n {
        let mut a = admin.clone();
        let (parent, tag) = (parent.to_string(), tag.to_string());
        batch.push(tokio::spawn(async move {
            a.create_entry(pa::EntryParams {
                spiffe_id: format!("spiffe://example.org/ns/{tag}/sa/w{i}"),
                parent_id: parent,
                selectors: vec![format!("unix:uid:{}", 100_000 + i)],
                ..Default::default()
            })
            .await
            .unwrap();
        }));
        if batch.len() == 16 {
            for b in batch.drain(..) {
                b.await.unwrap();
            }
        }
    }
    for b in batch {
        b.await.unwrap();
    }
}

/// A fresh agent with nothing else going on (no workload streams, no
/// JWT-SVIDs): RSS holding 1 SVID, then `cached + 1`.
async fn fresh_agent_memory(
    server: &sigil::server::ServerHandle,
    admin: &mut pa::admin_client::AdminClient<tonic::transport::Channel>,
    dir: &Path,
    cached: usize,
) {
    let (fresh, mut fresh_lines, fresh_token) = spawn_agent(server, admin, dir, "fresh").await;
    create_unmatched(admin, &fresh_token.agent_id, 1, "fresh-one").await;
    wait_holding(&mut fresh_lines, 1).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let base = rss_kib(fresh.id());
    let idle_one = idle_cpu(fresh.id()).await;
    create_unmatched(admin, &fresh_token.agent_id, cached, "fresh").await;
    wait_holding(&mut fresh_lines, cached + 1).await;
    // Past one cache write (every 5 s), so its buffers count too.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let held = rss_kib(fresh.id());
    println!(
        "fresh agent RSS: {} MiB holding 1 SVID, {} MiB holding {} SVIDs: {:.2} KiB per SVID (target <= 2 KB)",
        base / 1024,
        held / 1024,
        cached + 1,
        (held.saturating_sub(base)) as f64 / cached as f64
    );
    let idle_held = idle_cpu(fresh.id()).await;
    println!(
        "  idle agent CPU (nothing changing, no workloads): {idle_one:?} per second holding 1 SVID, {idle_held:?} holding {} SVIDs",
        cached + 1
    );
}

/// The CPU an agent uses per second over 5 s.
async fn idle_cpu(pid: u32) -> Duration {
    let before = perf::threads_cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    (perf::threads_cpu_time(pid) - before) / 5
}

/// Waits for the agent's log to report it holds at least `n` SVIDs.
async fn wait_holding(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>, n: usize) {
    // The last lines, to show on failure what the agent was doing.
    let mut last = std::collections::VecDeque::new();
    let waited = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(line) = lines.recv().await {
            if let Some(h) = line.split("holding=").nth(1) {
                let held: usize = h.split_whitespace().next().unwrap().parse().unwrap();
                if held >= n {
                    return true;
                }
            }
            if last.len() == 20 {
                last.pop_front();
            }
            last.push_back(line);
        }
        false
    })
    .await;
    if waited != Ok(true) {
        let last: Vec<String> = last.into();
        panic!(
            "the agent never held {n} SVIDs ({}); its last log lines:\n{}",
            if waited.is_ok() { "it exited" } else { "300 s" },
            last.join("\n")
        );
    }
}

fn health_request() -> tonic_health::pb::HealthCheckRequest {
    tonic_health::pb::HealthCheckRequest {
        service: "bench".into(),
    }
}

/// First-response latency on a health service with `streams` Watch streams open.
async fn health_latency(path: &Path, layered: bool, streams: usize) -> Vec<Duration> {
    use tonic_health::pb::health_client::HealthClient;
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("bench", tonic_health::ServingStatus::Serving)
        .await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder().add_service(service);
    let stop = async {
        let _ = stop_rx.await;
    };
    let server = if layered {
        tokio::spawn(router.serve_with_incoming_shutdown(
            sigil::edge::unix_incoming("bench", listener, sigil::edge::ConnLimits::WORKLOAD),
            stop,
        ))
    } else {
        let raw = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tokio::spawn(router.serve_with_incoming_shutdown(raw, stop))
    };
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(HealthClient::new(
            sigil::cli::unix_channel(path).await.unwrap(),
        ));
    }
    let mut open = Vec::new();
    let n = clients.len();
    for i in 0..streams {
        let mut s = clients[i % n]
            .watch(health_request())
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().unwrap();
        open.push(s);
    }
    let mut samples = Vec::new();
    for _ in 0..1_000 {
        let t = Instant::now();
        clients[0].check(health_request()).await.unwrap();
        samples.push(t.elapsed());
    }
    drop(open);
    drop(clients);
    let _ = stop_tx.send(());
    let _ = server.await;
    samples
}

/// HTTP/2 bytes of `n` gRPC requests (HPACK-indexed as real clients send them).
fn h2_requests(authority: &str, n: usize) -> Vec<u8> {
    let mut enc = loona_hpack::Encoder::new();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    for i in 0..n {
        let stream = u32::try_from(2 * i + 1).unwrap();
        let headers: [(&[u8], &[u8]); 8] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", authority.as_bytes()),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
            (
                b"user-agent",
                b"grpc-python/1.85.3 grpc-c/51.0.0 (linux; chttp2)",
            ),
            (b"workload.spiffe.io", b"true"),
        ];
        let block = enc.encode(headers);
        for (kind, flags, payload) in [(1u8, 4u8, block), (0, 1, vec![0; 5])] {
            out.extend(&u32::try_from(payload.len()).unwrap().to_be_bytes()[1..]);
            out.extend([kind, flags]);
            out.extend(stream.to_be_bytes());
            out.extend(payload);
        }
    }
    out
}

/// The layer's processing cost per request, bytes in memory.
async fn layer_cost(authority: &str) -> Duration {
    use tokio::io::AsyncReadExt;
    const N: usize = 20_000;
    let input = h2_requests(authority, N);
    let mut out = Vec::with_capacity(input.len() * 2);
    let t = Instant::now();
    sigil::edge::AuthorityFix::new(&input[..])
        .read_to_end(&mut out)
        .await
        .unwrap();
    t.elapsed() / u32::try_from(N).unwrap()
}

async fn authority_layer(dir: &Path, streams: usize) {
    for round in 1..=2 {
        let layered = health_latency(&dir.join("layer.sock"), true, streams).await;
        let raw = health_latency(&dir.join("raw.sock"), false, streams).await;
        println!(
            "round {round}: health Check with {streams} Watch streams open, 1,000 calls: without the :authority layer {}; with it {}",
            summary(raw),
            summary(layered)
        );
    }
    println!(
        ":authority layer per request: compliant client (pass-through) {:?}, grpc-core client (socket-path authority, re-encoded) {:?}",
        layer_cost("localhost").await,
        layer_cost("tmp%2Fsigil-agent%2Fpublic%2Fapi.sock").await
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (streams, cached) = if quick { (200, 2_000) } else { (1_000, 10_000) };
    let dir = tempfile::tempdir().unwrap();
    if std::env::args().any(|a| a == "--fresh-only") {
        let server = start(config(dir.path())).await.unwrap();
        let mut admin = sigil::cli::connect_admin(server.admin_socket())
            .await
            .unwrap();
        std::fs::write(dir.path().join("bundle.pem"), server.bundle_pem()).unwrap();
        fresh_agent_memory(&server, &mut admin, dir.path(), cached).await;
        return;
    }
    if !std::env::args().any(|a| a == "--burst-only") {
        authority_layer(dir.path(), streams).await;
    }
    let server = start(config(dir.path())).await.unwrap();
    let mut admin = sigil::cli::connect_admin(server.admin_socket())
        .await
        .unwrap();
    std::fs::write(dir.path().join("bundle.pem"), server.bundle_pem()).unwrap();
    let sock = dir.path().join("agent.sock");
    let (mut agent, mut lines, token) = spawn_agent(&server, &mut admin, dir.path(), "agent").await;
    let uid = sigil::attest::current_uid().unwrap();
    let entry = admin
        .create_entry(pa::EntryParams {
            spiffe_id: "spiffe://example.org/bench".into(),
            parent_id: token.agent_id.clone(),
            selectors: vec![format!("unix:uid:{uid}")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    wait_holding(&mut lines, 1).await;
    let rss_one = rss_kib(agent.id());

    // 1. A burst of concurrent streams over 100 connections.
    let mut channels = Vec::new();
    for _ in 0..100 {
        channels.push(sigil::cli::connect_workload(&sock).await.unwrap());
    }
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel();
    let (push_tx, mut push_rx) = tokio::sync::mpsc::unbounded_channel();
    let (bundle_tx, mut bundle_rx) = tokio::sync::mpsc::unbounded_channel();
    // SIGIL_AGENT_PERF=<file>: record the agent with `perf` during the burst.
    let perf = perf::Recording::start("SIGIL_AGENT_PERF", agent.id(), 2999);
    let (agent_cpu, own_cpu) = (
        perf::threads_cpu_time(agent.id()),
        perf::threads_cpu_time(std::process::id()),
    );
    let burst_start = Instant::now();
    for i in 0..streams {
        let mut c = channels[i % channels.len()].clone();
        let first_tx = first_tx.clone();
        let push_tx = push_tx.clone();
        let bundle_tx = bundle_tx.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let mut s = c.fetch_x509svid(req()).await.unwrap().into_inner();
            s.message().await.unwrap().unwrap();
            first_tx.send(t.elapsed()).unwrap();
            // Then wait for the pushed rotation, then for the bundle change
            // (a prepared CA authority). A stream that ends first drops its
            // sender, and the section waiting for it fails there (with
            // `--burst-only` the agent is gone by then, by design).
            let Ok(Some(_)) = s.message().await else {
                return;
            };
            push_tx.send(Instant::now()).unwrap();
            let Ok(Some(_)) = s.message().await else {
                return;
            };
            bundle_tx.send(Instant::now()).unwrap();
        });
    }
    // Only the streams hold senders now: one that ends early fails the wait.
    drop((push_tx, bundle_tx));
    let mut burst = Vec::new();
    for _ in 0..streams {
        burst.push(first_rx.recv().await.unwrap());
    }
    let burst_total = burst_start.elapsed();
    let agent_cpu = perf::threads_cpu_time(agent.id()) - agent_cpu;
    let own_cpu = perf::threads_cpu_time(std::process::id()) - own_cpu;
    perf.stop();
    println!(
        "first FetchX509SVID response, burst of {streams} concurrent streams (all opened at once, {burst_total:?} in total): {}",
        summary(burst)
    );
    println!(
        "  CPU during the burst: agent {agent_cpu:?} ({:?} per stream), this harness (clients and server) {own_cpu:?}",
        agent_cpu / streams as u32
    );

    let mut warm = Vec::new();
    let mut c = channels[0].clone();
    for _ in 0..200 {
        let t = Instant::now();
        let mut s = c.fetch_x509svid(req()).await.unwrap().into_inner();
        s.message().await.unwrap().unwrap();
        warm.push(t.elapsed());
    }
    println!(
        "first FetchX509SVID response with {streams} streams open, 200 new fetches one at a time: {}",
        summary(warm)
    );
    if std::env::args().any(|a| a == "--burst-only") {
        let _ = agent.kill();
        return;
    }

    // SDS streams, as Envoy opens them, over 100 more connections.
    let (sds_ready_tx, mut sds_ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let (sds_push_tx, mut sds_push_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut sds_clients = Vec::new();
    for _ in 0..100 {
        sds_clients.push(SdsClient::new(
            sigil::cli::unix_channel(&sock).await.unwrap(),
        ));
    }
    for i in 0..streams {
        let mut c = sds_clients[i % sds_clients.len()].clone();
        let (ready, push) = (sds_ready_tx.clone(), sds_push_tx.clone());
        tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(DiscoveryRequest {
                resource_names: vec!["default".into(), "ROOTCA".into()],
                type_url: sigil::workload_api::SECRET_TYPE.into(),
                ..Default::default()
            })
            .await
            .unwrap();
            let mut s = c
                .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let first = s.message().await.unwrap().unwrap();
            // ACK, as Envoy does.
            tx.send(DiscoveryRequest {
                version_info: first.version_info.clone(),
                resource_names: vec!["default".into(), "ROOTCA".into()],
                type_url: sigil::workload_api::SECRET_TYPE.into(),
                response_nonce: first.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
            ready.send(()).unwrap();
            s.message().await.unwrap().unwrap();
            push.send(Instant::now()).unwrap();
            drop(tx);
        });
    }
    for _ in 0..streams {
        sds_ready_rx.recv().await.unwrap();
    }

    // 2. Rotation: change the entry's TTL; the agent re-signs and pushes.
    let t = Instant::now();
    admin
        .update_entry(pa::UpdateEntryRequest {
            id: entry.id.clone(),
            params: Some(pa::EntryParams {
                spiffe_id: entry.spiffe_id.clone(),
                parent_id: entry.parent_id.clone(),
                selectors: entry.selectors.clone(),
                x509_ttl_seconds: 1800,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mut pushed = Vec::new();
    for _ in 0..streams {
        pushed.push(push_rx.recv().await.unwrap().duration_since(t));
    }
    println!(
        "rotation pushed to {streams} open streams (entry update -> new SVID on each stream): {}",
        summary(pushed)
    );
    let mut sds_pushed = Vec::new();
    for _ in 0..streams {
        sds_pushed.push(sds_push_rx.recv().await.unwrap().duration_since(t));
    }
    println!(
        "rotation pushed to {streams} open SDS streams (same update -> new secret on each; Workload API streams open too): {}",
        summary(sds_pushed)
    );

    // 2b. A CA authority prepared: the new bundle reaches every open stream.
    let t = Instant::now();
    admin
        .prepare_authority(pa::AuthorityKindRequest {
            kind: "x509".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut bundled = Vec::new();
    for _ in 0..streams {
        bundled.push(bundle_rx.recv().await.unwrap().duration_since(t));
    }
    println!(
        "bundle change pushed to {streams} open streams (ca prepare -> new bundle on each stream): {}",
        summary(bundled)
    );

    // JWT-SVID cache: 20,000 distinct audiences must not grow the agent
    // without bound (the cache holds 4,096 tokens at most).
    let before = rss_kib(agent.id());
    let jwt_requests = if quick { 5_000 } else { 20_000 };
    let mut c = channels[0].clone();
    for i in 0..jwt_requests {
        let mut r = tonic::Request::new(pw::JwtsvidRequest {
            audience: vec![format!("audience-{i}-{}", "x".repeat(200))],
            spiffe_id: String::new(),
        });
        r.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        c.fetch_jwtsvid(r).await.unwrap();
    }
    println!(
        "agent RSS after {jwt_requests} JWT-SVIDs with distinct ~210-byte audiences: {} MiB -> {} MiB",
        before / 1024,
        rss_kib(agent.id()) / 1024
    );

    // 3. Memory with many cached SVIDs (entries the workload does not match).
    create_unmatched(&admin, &token.agent_id, cached, "bench").await;
    let t = Instant::now();
    wait_holding(&mut lines, cached + 1).await;
    let signed_in = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_many = rss_kib(agent.id());
    println!(
        "agent RSS: {} MiB holding 1 SVID, {} MiB holding {} SVIDs (last SVIDs signed {signed_in:?} after the last entry was created)",
        rss_one / 1024,
        rss_many / 1024,
        cached + 1
    );

    // 5. A fresh agent with nothing else going on.
    fresh_agent_memory(&server, &mut admin, dir.path(), cached).await;

    // 4. Taint: activate the prepared CA, taint the old one, and time until
    //    the agent has re-issued every SVID it held (it logs each batch).
    let old = admin
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
        .id;
    admin
        .activate_authority(pa::AuthorityKindRequest {
            kind: "x509".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    while lines.try_recv().is_ok() {}
    let t = Instant::now();
    admin
        .taint_authority(pa::AuthorityIdRequest { id: old })
        .await
        .unwrap();
    let mut reissued = 0;
    tokio::time::timeout(Duration::from_secs(300), async {
        while reissued < cached + 1 {
            let line = lines.recv().await.expect("agent exited");
            if let Some(d) = line.split("due=").nth(1) {
                reissued += d
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse::<usize>()
                    .unwrap();
            }
        }
    })
    .await
    .expect("the agent never re-issued its SVIDs after the taint");
    println!(
        "taint -> all {} SVIDs on one agent re-issued in {:?}",
        cached + 1,
        t.elapsed()
    );
    let _ = agent.kill();
    let _ = agent.wait();

    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
