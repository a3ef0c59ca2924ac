//! Prometheus metrics (names start `sigil_`), one registry per process, and
//! the `--metrics-bind` listener: `GET /metrics` (text exposition),
//! `GET /live` and `GET /ready`.
//!
//! Counters are bumped where things happen; gauges that mirror state (the
//! authorities, the store, cache sizes) are refreshed by the owner's hook
//! just before each scrape.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A label set.
pub type Labels = Vec<(&'static str, String)>;

fn new_histogram() -> Histogram {
    // 50 µs .. ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every metric Sigil exports.
pub struct Metrics {
    registry: Registry,
    /// `sigil_svids_issued_total{type="x509"|"jwt"}`.
    pub svids_issued: Family<Labels, Counter>,
    /// `sigil_attestations_total{attestor, result="allow"|"deny"}`.
    pub attestations: Family<Labels, Counter>,
    /// `sigil_authority_remaining_seconds{kind}`: the active authority's life left.
    pub authority_remaining: Family<Labels, Gauge<f64, AtomicU64>>,
    /// `sigil_authorities{kind, state}`: how many authorities in each slot state.
    pub authorities: Family<Labels, Gauge>,
    /// `sigil_workload_streams{api="workload"|"sds"}`: open streams.
    pub workload_streams: Family<Labels, Gauge>,
    /// `sigil_policy_decisions_total{decision}`.
    pub policy_decisions: Family<Labels, Counter>,
    /// `sigil_rpc_duration_seconds{service, method, code}`: to the response head.
    pub rpc_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// `sigil_store_revision`.
    pub store_revision: Gauge,
    /// `sigil_store_size_bytes`.
    pub store_size: Gauge,
    /// `sigil_sync_streams`: open agent sync streams (server).
    pub sync_streams: Gauge,
    /// `sigil_sync_messages_total`: messages pushed on sync streams (server).
    pub sync_messages: Counter,
    /// `sigil_sync_wakeups_total`: a sync stream woke with work to do (server).
    pub sync_wakeups: Counter,
    /// `sigil_cache_size{cache}`: entries, SVIDs and JWT-SVIDs held (agent).
    pub cache_size: Family<Labels, Gauge>,
    /// `sigil_connections_refused_total{listener}`: refused by connection limits.
    pub connections_refused: Family<Labels, Counter>,
    /// `sigil_agent_server_refusals_total{code}`: the server refused this
    /// agent (banned, evicted): it keeps serving cached SVIDs until they expire.
    pub agent_refusals: Family<Labels, Counter>,
    /// `sigil_cluster_lease_held{lease}`: 1 while this server holds a
    /// cluster-wide lease (shared datastore), else 0 (server).
    pub lease_held: Family<Labels, Gauge>,
    /// `sigil_datastore_drift`: differences the last periodic full diff
    /// found between this server's view of the authorities and the
    /// datastore (repaired when found) (server).
    pub datastore_drift: Gauge,
    /// `sigil_datastore_operations_total{op}`: calls into the shared
    /// datastore (each one round trip, or one transaction for `commit`).
    pub datastore_ops: Family<Labels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            svids_issued: Family::default(),
            attestations: Family::default(),
            authority_remaining: Family::default(),
            authorities: Family::default(),
            workload_streams: Family::default(),
            policy_decisions: Family::default(),
            rpc_duration: Family::new_with_constructor(new_histogram),
            store_revision: Gauge::default(),
            store_size: Gauge::default(),
            sync_streams: Gauge::default(),
            sync_messages: Counter::default(),
            sync_wakeups: Counter::default(),
            cache_size: Family::default(),
            connections_refused: Family::default(),
            agent_refusals: Family::default(),
            lease_held: Family::default(),
            datastore_drift: Gauge::default(),
            datastore_ops: Family::default(),
            registry: Registry::default(),
        };
        registry.register("sigil_svids_issued", "SVIDs signed", m.svids_issued.clone());
        registry.register(
            "sigil_attestations",
            "Node attestations by attestor and result",
            m.attestations.clone(),
        );
        registry.register(
            "sigil_authority_remaining_seconds",
            "Seconds left on the active authority, by kind",
            m.authority_remaining.clone(),
        );
        registry.register(
            "sigil_authorities",
            "Authorities by kind and slot state",
            m.authorities.clone(),
        );
        registry.register(
            "sigil_workload_streams",
            "Open Workload API and SDS streams",
            m.workload_streams.clone(),
        );
        registry.register(
            "sigil_policy_decisions",
            "ext_authz decisions by result",
            m.policy_decisions.clone(),
        );
        registry.register(
            "sigil_rpc_duration_seconds",
            "gRPC latency to the response head, by service, method and code",
            m.rpc_duration.clone(),
        );
        registry.register(
            "sigil_store_revision",
            "The store's global revision",
            m.store_revision.clone(),
        );
        registry.register(
            "sigil_store_size_bytes",
            "The store's size on disk",
            m.store_size.clone(),
        );
        registry.register(
            "sigil_sync_streams",
            "Open agent SyncEntries streams",
            m.sync_streams.clone(),
        );
        registry.register(
            "sigil_sync_messages",
            "Messages pushed on SyncEntries streams",
            m.sync_messages.clone(),
        );
        registry.register(
            "sigil_sync_wakeups",
            "Times a SyncEntries stream woke for a commit that concerns its agent",
            m.sync_wakeups.clone(),
        );
        registry.register(
            "sigil_cluster_lease_held",
            "1 while this server holds the cluster-wide lease, by lease",
            m.lease_held.clone(),
        );
        registry.register(
            "sigil_datastore_drift",
            "Differences the last full diff found between this server's authorities and the datastore",
            m.datastore_drift.clone(),
        );
        registry.register(
            "sigil_datastore_operations",
            "Calls into the shared PostgreSQL datastore, by operation",
            m.datastore_ops.clone(),
        );
        registry.register(
            "sigil_cache_size",
            "Items in the agent's caches",
            m.cache_size.clone(),
        );
        registry.register(
            "sigil_connections_refused",
            "Connections refused by the connection limits, by listener",
            m.connections_refused.clone(),
        );
        registry.register(
            "sigil_agent_server_refusals",
            "Times the server refused this agent (it keeps serving cached SVIDs until they expire)",
            m.agent_refusals.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// One label.
pub fn label(key: &'static str, value: impl Into<String>) -> Labels {
    vec![(key, value.into())]
}

/// Keeps a gauge raised while alive (an open stream).
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Raises `gauge` until dropped.
    pub fn new(gauge: Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// gRPC status codes as Prometheus label values.
fn code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "Cancelled",
        "2" => "Unknown",
        "3" => "InvalidArgument",
        "4" => "DeadlineExceeded",
        "5" => "NotFound",
        "6" => "AlreadyExists",
        "7" => "PermissionDenied",
        "8" => "ResourceExhausted",
        "9" => "FailedPrecondition",
        "10" => "Aborted",
        "11" => "OutOfRange",
        "12" => "Unimplemented",
        "13" => "Internal",
        "14" => "Unavailable",
        "15" => "DataLoss",
        "16" => "Unauthenticated",
        _ => "Unknown",
    }
}

/// A tower layer timing every gRPC call into `sigil_rpc_duration_seconds`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<Request<B>> for RpcMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            // A trailers-only answer (an error) carries the code in the head;
            // a normal one carries OK in its trailers.
            let code = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .map_or("OK", code_name),
                Err(_) => "Unknown",
            };
            let (service, method) = match (code, path.trim_start_matches('/').split_once('/')) {
                // Unknown paths are the client's choice: never a label value.
                ("Unimplemented", _) | (_, None) => ("unknown".to_string(), "unknown".to_string()),
                (_, Some((s, m))) => (s.to_string(), m.to_string()),
            };
            metrics()
                .rpc_duration
                .get_or_create(&vec![
                    ("service", service),
                    ("method", method),
                    ("code", code.to_string()),
                ])
                .observe(start.elapsed().as_secs_f64());
            res
        })
    }
}

/// What the metrics listener asks its owner.
pub struct Probes {
    /// Refreshes the state-mirroring gauges before a scrape.
    pub refresh: Box<dyn Fn() + Send + Sync>,
    /// Ready to serve, or why not.
    pub ready: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn answer<B>(probes: &Probes, req: &Request<B>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            (probes.refresh)();
            let mut r = text(StatusCode::OK, metrics().encode());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => match (probes.ready)() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /live or /ready\n".into(),
        ),
    }
}

/// Keeps gRPC health (`grpc.health.v1`) in step with `ready`: the overall
/// status (`""`) and each of `services`, rechecked every second and
/// whenever `wake` changes, until `shutdown`.
pub async fn follow_readiness<T: Send + Sync + 'static>(
    ready: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    reporter: tonic_health::server::HealthReporter,
    services: Vec<String>,
    mut wake: Option<watch::Receiver<T>>,
    mut shutdown: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let mut last = None;
    loop {
        let now = ready();
        if last.as_ref() != Some(&now) {
            let status = match &now {
                Ok(()) => ServingStatus::Serving,
                // Not ready while starting is expected: a warning only
                // when a ready process stops being ready.
                Err(why) if last.is_none() => {
                    tracing::info!(reason = %why, "not ready yet");
                    ServingStatus::NotServing
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "not ready");
                    ServingStatus::NotServing
                }
            };
            reporter.set_service_status("", status).await;
            for s in &services {
                reporter.set_service_status(s, status).await;
            }
            last = Some(now);
        }
        let woken = async {
            match wake.as_mut() {
                Some(w) => {
                    if w.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = woken => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Binds `addr` for `/metrics`, `/live` and `/ready` (plain HTTP/1.1);
/// serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    probes: Probes,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    serve_on(TcpListener::bind(addr).await?, probes, shutdown)
}

/// As [`serve`], on a listener bound earlier.
pub fn serve_on(
    listener: TcpListener,
    probes: Probes,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let bound = listener.local_addr()?;
    let probes = Arc::new(probes);
    let serving = async move {
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let probes = probes.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let r = answer(&probes, &req);
                        async move { Ok::<_, Infallible>(r) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    };
    Ok((bound, serving))
}
