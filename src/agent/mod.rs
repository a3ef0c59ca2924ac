//! `sigil agent`: the composition root. Attests (or loads its persisted
//! identity), keeps entries and SVIDs in sync with the server, and serves the
//! SPIFFE Workload API on a Unix socket.

mod entries;
mod manager;
pub mod node_client;
mod persist;
mod state;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use crate::workload_api::{AgentState, CachedSvid};
pub use manager::entry_from_proto;
pub use node_client::{
    AgentIdentity, Attestation, NodeClientError, attest, connect, error_chain,
    explain_connect_error, renew,
};
pub use persist::saved_identity;
pub use state::{Backoff, rotation_time};

use crate::attest::UnixAttestor;
use crate::config::{ConfigError, LogFormat, RawConfig, format_duration};
use crate::policy::{PolicyConfig, serve_ext_authz};
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::workload_api::WorkloadApi;
use crate::x509::{Bundle, PrivateKey, certs_from_pem, svid_id};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;

/// How often an agent fetches every entry again, by default.
pub const DEFAULT_FULL_SYNC_INTERVAL: Duration = Duration::from_secs(30 * 60);

/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/tmp/sigil-agent/public/api.sock";
/// Config keys (and flags) of `sigil agent`.
pub const AGENT_KEYS: &[&str] = &[
    "server",
    "trust_bundle",
    "trust_domain",
    "join_token",
    "join_token_file",
    "x509pop_cert",
    "x509pop_key",
    "socket",
    "data_dir",
    "log_format",
    "unix_sha256",
    "ext_authz_bind",
    "policy_dir",
    "policy_root_namespace",
    "jwks_ca_file",
    "policy_trusted_proxies",
    "metrics_bind",
    "log_level",
    "svid_cache_max",
    "server_keepalive",
    "full_sync_interval",
];

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Attestation or the server failed.
    #[error(transparent)]
    Node(#[from] NodeClientError),
    /// The ext_authz endpoint could not start.
    #[error(transparent)]
    ExtAuthz(#[from] crate::policy::ServeError),
    /// The persisted identity is unreadable.
    #[error("persisted agent identity in {dir}: {reason}")]
    Persisted {
        /// The data dir.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// Nothing to attest with.
    #[error(
        "no saved agent identity in {0} and no --join-token or --x509pop-cert/--x509pop-key given"
    )]
    NoAttestation(PathBuf),
    /// The socket could not be bound.
    #[error("cannot listen on {path}: {reason}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Validated `sigil agent` configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Server node API addresses (`host:port`): the agent uses one and
    /// fails over to the next.
    pub servers: Vec<String>,
    /// Bootstrap trust bundle, PEM.
    pub trust_bundle_pem: String,
    /// The trust domain (from the bundle's CA unless given).
    pub trust_domain: TrustDomain,
    /// How to attest when there is no saved identity.
    pub attestation: Option<Attestation>,
    /// Workload API socket.
    pub socket: PathBuf,
    /// Where the agent identity is kept.
    pub data_dir: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// Workload attestor settings.
    pub unix: UnixAttestor,
    /// Envoy ext_authz beside the workloads, when served.
    pub policy: Option<PolicyConfig>,
    /// `/metrics`, `/live` and `/ready`, when served.
    pub metrics_bind: Option<SocketAddr>,
    /// At most this many X509-SVIDs cached (SVIDs of connected workloads
    /// always; the others up to the cap, most recently used first); none:
    /// an SVID for every entry.
    pub svid_cache_max: Option<usize>,
    /// How often the agent pings the server over its connection; a ping
    /// unanswered for as long (at most 20 s) drops the connection, and the
    /// agent reconnects or fails over.
    pub server_keepalive: Duration,
    /// How often the agent fetches every entry again instead of resuming
    /// from its revision (a safety net: it then holds exactly the server's
    /// entries, whatever a resume could not repair).
    pub full_sync_interval: Duration,
}

impl AgentConfig {
    /// An agent of `servers` that trusts `trust_bundle_pem` at first
    /// contact, with its socket and data directory, and every other setting
    /// at its default (no attestation: a saved identity is used).
    pub fn new(
        servers: Vec<String>,
        trust_bundle_pem: String,
        trust_domain: TrustDomain,
        socket: PathBuf,
        data_dir: PathBuf,
    ) -> Self {
        AgentConfig {
            servers,
            trust_bundle_pem,
            trust_domain,
            attestation: None,
            socket,
            data_dir,
            log_format: LogFormat::Text,
            unix: UnixAttestor::default(),
            policy: None,
            metrics_bind: None,
            svid_cache_max: None,
            server_keepalive: node_client::DEFAULT_KEEPALIVE,
            full_sync_interval: DEFAULT_FULL_SYNC_INTERVAL,
        }
    }

    /// Validates merged flags and file values; errors name the key.
    pub fn from_raw(raw: &RawConfig) -> Result<Self, ConfigError> {
        let servers = raw.list("server")?;
        let bundle_path = raw.required("trust_bundle")?;
        let trust_bundle_pem =
            std::fs::read_to_string(&bundle_path).map_err(|e| ConfigError::Invalid {
                key: "trust_bundle",
                value: bundle_path.clone(),
                reason: format!("cannot read: {e}"),
            })?;
        let certs = certs_from_pem(&trust_bundle_pem).map_err(|e| ConfigError::Invalid {
            key: "trust_bundle",
            value: bundle_path.clone(),
            reason: e.to_string(),
        })?;
        let trust_domain = match raw.get("trust_domain")? {
            Some(_) => raw.trust_domain("trust_domain")?,
            None => certs
                .first()
                .and_then(|c| svid_id(c).ok())
                .map(|id| id.trust_domain())
                .ok_or_else(|| ConfigError::Invalid {
                    key: "trust_bundle",
                    value: bundle_path.clone(),
                    reason: "its CA names no trust domain (URI SAN); set trust_domain".into(),
                })?,
        };
        // The token from a file keeps it out of argv (visible to every user).
        let join_token = match (raw.get("join_token")?, raw.get("join_token_file")?) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "join_token_file",
                    value: "(set)".into(),
                    reason: "give either join_token or join_token_file, not both".into(),
                });
            }
            (Some(t), None) => Some(t),
            (None, Some(path)) => {
                let token = std::fs::read_to_string(&path).map_err(|e| ConfigError::Invalid {
                    key: "join_token_file",
                    value: path.clone(),
                    reason: e.to_string(),
                })?;
                let token = token.trim().to_string();
                if token.is_empty() {
                    return Err(ConfigError::Invalid {
                        key: "join_token_file",
                        value: path,
                        reason: "the file is empty".into(),
                    });
                }
                Some(token)
            }
            (None, None) => None,
        };
        let pop_cert = raw.get("x509pop_cert")?;
        let pop_key = raw.get("x509pop_key")?;
        let attestation = match (join_token, pop_cert, pop_key) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "join_token",
                    value: "(set)".into(),
                    reason: "give either join_token or x509pop_cert/x509pop_key, not both".into(),
                });
            }
            (Some(t), None, None) => Some(Attestation::JoinToken(t)),
            (None, Some(cert), Some(key)) => {
                let chain = std::fs::read_to_string(&cert)
                    .map_err(|e| e.to_string())
                    .and_then(|t| certs_from_pem(&t).map_err(|e| e.to_string()))
                    .map_err(|reason| ConfigError::Invalid {
                        key: "x509pop_cert",
                        value: cert.clone(),
                        reason,
                    })?;
                let key_pem = std::fs::read_to_string(&key).map_err(|e| ConfigError::Invalid {
                    key: "x509pop_key",
                    value: key.clone(),
                    reason: e.to_string(),
                })?;
                let key = PrivateKey::from_pem(&key_pem).map_err(|e| ConfigError::Invalid {
                    key: "x509pop_key",
                    value: key.clone(),
                    reason: e.to_string(),
                })?;
                Some(Attestation::X509Pop { chain, key })
            }
            (None, Some(_), None) => {
                return Err(ConfigError::Missing {
                    key: "x509pop_key",
                    flag: "x509pop-key".into(),
                });
            }
            (None, None, Some(_)) => {
                return Err(ConfigError::Missing {
                    key: "x509pop_cert",
                    flag: "x509pop-cert".into(),
                });
            }
            (None, None, None) => None,
        };
        let sha256 = raw
            .parsed("unix_sha256", Some("false"), |v| {
                v.parse::<bool>()
                    .map_err(|_| "expected true or false".to_string())
            })?
            .unwrap_or(false);
        Ok(AgentConfig {
            servers,
            trust_bundle_pem,
            trust_domain,
            attestation,
            socket: PathBuf::from(raw.string_or("socket", DEFAULT_SOCKET)?),
            data_dir: PathBuf::from(raw.string_or("data_dir", ".sigil/agent")?),
            log_format: raw
                .parsed("log_format", Some("text"), |v| v.parse())?
                .unwrap_or(LogFormat::Text),
            unix: UnixAttestor::with_sha256(sha256),
            policy: PolicyConfig::from_raw(raw)?,
            metrics_bind: match raw.get("metrics_bind")? {
                Some(_) => Some(raw.socket_addr("metrics_bind", "127.0.0.1:0")?),
                None => None,
            },
            svid_cache_max: raw.parsed("svid_cache_max", None, |v| {
                match v.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => {
                        Err("must be a whole number above 0 (leave it out for no limit)"
                            .to_string())
                    }
                }
            })?,
            server_keepalive: raw.duration(
                "server_keepalive",
                &format_duration(node_client::DEFAULT_KEEPALIVE),
            )?,
            full_sync_interval: raw.duration(
                "full_sync_interval",
                &format_duration(DEFAULT_FULL_SYNC_INTERVAL),
            )?,
        })
    }
}

/// The agent's metrics gauges and readiness: it has a bundle, and either
/// a session with the server or cached SVIDs to serve without one.
fn agent_probes(
    state: watch::Receiver<Arc<AgentState>>,
    client: watch::Receiver<
        Option<crate::proto::node::node_client::NodeClient<tonic::transport::Channel>>,
    >,
) -> crate::metrics::Probes {
    let for_refresh = state.clone();
    crate::metrics::Probes {
        refresh: Box::new(move || {
            let s = for_refresh.borrow().clone();
            let m = crate::metrics::metrics();
            for (cache, n) in [("entries", s.entries.len()), ("svids", s.svids.len())] {
                m.cache_size
                    .get_or_create(&crate::metrics::label("cache", cache))
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }),
        ready: Arc::new(move || {
            let s = state.borrow().clone();
            if s.bundle.is_none() {
                return Err("no trust bundle yet".into());
            }
            if client.borrow().is_none() && s.svids.is_empty() {
                return Err("the server is unreachable and no cached SVID can be served".into());
            }
            Ok(())
        }),
    }
}

/// A running agent.
pub struct AgentHandle {
    spiffe_id: SpiffeId,
    socket: PathBuf,
    ext_authz_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    state: watch::Receiver<Arc<AgentState>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl AgentHandle {
    /// The metrics listener's address, when served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    /// The agent's own SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }
    /// The ext_authz address, when served.
    pub fn ext_authz_addr(&self) -> Option<SocketAddr> {
        self.ext_authz_addr
    }
    /// The Workload API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
    /// A receiver of the published state (for `sigil dev` and tests).
    pub fn state(&self) -> watch::Receiver<Arc<AgentState>> {
        self.state.clone()
    }

    /// Stops serving and syncing.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(grace, t).await.is_err() {
                abort.abort();
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn bind_socket(path: &Path) -> Result<UnixListener, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    // World-connectable by design: the agent decides by peer credentials.
    let listener =
        crate::edge::bind_unix(path, 0o777, 0o755).map_err(|reason| AgentError::Socket {
            path: path.to_path_buf(),
            reason,
        })?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(meta) = dir.and_then(|d| std::fs::metadata(d).ok()) {
        if meta.permissions().mode() & 0o001 == 0 {
            tracing::warn!(socket = %path.display(), "the socket's directory is not searchable by other users; only this user's workloads can connect");
        }
    }
    Ok(listener)
}

/// The trust bundle as it syncs, for policies whose JWT rules name no JWKS.
fn bundle_updates(
    mut states: watch::Receiver<Arc<AgentState>>,
    mut shutdown: watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> watch::Receiver<Option<Bundle>> {
    let (tx, rx) = watch::channel(states.borrow_and_update().bundle.clone());
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = states.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
            let bundle = states.borrow_and_update().bundle.clone();
            tx.send_if_modified(|current| {
                let changed = *current != bundle;
                *current = bundle;
                changed
            });
        }
    }));
    rx
}

/// What reflection lists on the workload socket: only what it serves (the
/// Workload API and health), not the server's node and admin services.
fn workload_descriptors() -> prost_types::FileDescriptorSet {
    use prost::Message;
    let mut set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .unwrap_or_default();
    set.file.retain(|f| !f.package().starts_with("sigil."));
    set
}

/// Attests with the first server of the list that answers.
async fn attest_any(config: &AgentConfig, att: &Attestation) -> Result<AgentIdentity, AgentError> {
    let mut last = None;
    for (i, server) in config.servers.iter().enumerate() {
        match node_client::connect_with(
            server,
            &config.trust_bundle_pem,
            None,
            config.server_keepalive,
        )
        .await
        {
            Ok(mut c) => return Ok(attest(&mut c, &config.trust_domain, att).await?),
            // The last one's error is the answer, said once.
            Err(e) if i + 1 == config.servers.len() => last = Some(e),
            Err(e) => {
                tracing::warn!(server = %server, error = %e, "cannot reach this server; trying the next");
            }
        }
    }
    Err(last.map(AgentError::from).unwrap_or_else(|| {
        AgentError::Config(ConfigError::Missing {
            key: "server",
            flag: "server".into(),
        })
    }))
}

/// Loads or obtains the agent identity, then starts syncing and serving.
pub async fn start(config: AgentConfig) -> Result<AgentHandle, AgentError> {
    crate::runtime::files::private_umask();
    if let Some(limit) = crate::edge::raise_fd_limit() {
        tracing::debug!(open_files = limit, "open-file limit");
    }
    // Bind first: a start that cannot serve must not spend a join token or
    // attest an agent it will never run.
    let listener = bind_socket(&config.socket)?;
    let metrics_listener = match config.metrics_bind {
        Some(addr) => {
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| AgentError::Socket {
                        path: PathBuf::from(addr.to_string()),
                        reason: format!("metrics_bind: {e}"),
                    })?,
            )
        }
        None => None,
    };
    let saved = persist::load(&config.data_dir, &config.trust_domain).map_err(|reason| {
        AgentError::Persisted {
            dir: config.data_dir.clone(),
            reason,
        }
    })?;
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
    .unwrap_or(i64::MAX);
    // A join token is single-use: once spent here, the manager may not use it
    // again. Unspent (a saved identity was loaded), it stays available for
    // when the server refuses that identity (evicted).
    let mut unspent = config.attestation.clone();
    let identity = match saved {
        Some(id) if id.expires_at > now || config.attestation.is_none() => {
            tracing::info!(agent = %id.spiffe_id, "loaded the saved agent identity");
            id
        }
        _ => {
            if matches!(unspent, Some(Attestation::JoinToken(_))) {
                unspent = None;
            }
            let att = config
                .attestation
                .as_ref()
                .ok_or_else(|| AgentError::NoAttestation(config.data_dir.clone()))?;
            let id = attest_any(&config, att).await?;
            persist::save(&config.data_dir, &id);
            tracing::info!(agent = %id.spiffe_id, "attested to the server");
            id
        }
    };
    let demand = crate::workload_api::Demand::new(config.svid_cache_max.is_some());
    let (state_tx, state_rx) = watch::channel(Arc::new(AgentState::default()));
    let (client_tx, client_rx) = watch::channel(None);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let spiffe_id = identity.spiffe_id.clone();
    // What the last run held: served at once, even with the server down.
    let restored = persist::load_cache(&config.data_dir, &identity.spiffe_id);
    if let Some(r) = &restored {
        tracing::info!(
            entries = r.entries.len(),
            svids = r.svids.len(),
            revision = r.revision,
            "restored the saved entry and SVID caches"
        );
    }
    let restored = restored.unwrap_or(persist::Restored {
        revision: 0,
        entries: BTreeMap::new(),
        svids: HashMap::new(),
        federated: BTreeMap::new(),
    });
    let mut manager = manager::Manager {
        servers: config.servers.clone(),
        // A random first server, so a fleet spreads over the list.
        current: crate::registry::random_bytes(1)
            .ok()
            .map_or(0, |b| usize::from(b[0]) % config.servers.len().max(1)),
        identity,
        attestation: unspent,
        data_dir: config.data_dir.clone(),
        entries: restored.entries.into_values().collect(),
        svids: restored.svids,
        revision: restored.revision,
        tainted: Arc::default(),
        federated: Arc::new(restored.federated),
        ack_due: false,
        tainted_reported: 0,
        bundle_unsaved: false,
        cache_dirty: false,
        cache_saved: None,
        sign_after: None,
        reconcile_at: Some(std::time::UNIX_EPOCH),
        reconciled: std::time::Instant::now(),
        connected_at: None,
        svid_cache_max: config.svid_cache_max,
        keepalive: config.server_keepalive,
        full_sync_every: config.full_sync_interval,
        full_sync_at: manager::next_full_sync(config.full_sync_interval),
        demand: demand.clone(),
        demand_seen: 0,
        last_used: HashMap::new(),
        state: state_tx,
        client: client_tx,
        shutdown: shutdown_rx.clone(),
    };
    manager.publish();
    let sync_task = tokio::spawn(manager.run());
    let client_for_probes = client_rx.clone();
    let api = WorkloadApi::new(
        state_rx.clone(),
        client_rx,
        config.unix.clone(),
        shutdown_rx.clone(),
        demand.clone(),
    );
    let sds = crate::workload_api::Sds::new(
        state_rx.clone(),
        config.unix.clone(),
        shutdown_rx.clone(),
        demand,
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    let probes = agent_probes(state_rx.clone(), client_for_probes.clone());
    let readiness = tokio::spawn(crate::metrics::follow_readiness(
        probes.ready.clone(),
        health,
        vec![
            "SpiffeWorkloadAPI".into(),
            "envoy.service.secret.v3.SecretDiscoveryService".into(),
        ],
        Some(client_for_probes),
        shutdown_rx.clone(),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(workload_descriptors())
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AgentError::Socket {
            path: config.socket.clone(),
            reason: format!("reflection service: {e}"),
        })?;
    let mut shutdown = shutdown_rx.clone();
    let limits = crate::edge::ConnLimits::WORKLOAD;
    let serve = limits
        .server_builder()
        .layer(
            tower::ServiceBuilder::new()
                .layer(crate::metrics::RpcMetricsLayer)
                .layer(crate::edge::PeerCallerLayer),
        )
        .add_service(health_service)
        .add_service(reflection)
        .add_service(SpiffeWorkloadApiServer::new(api))
        .add_service(SecretDiscoveryServiceServer::new(sds))
        .serve_with_incoming_shutdown(
            crate::edge::unix_incoming("workload", listener, limits),
            async move {
                while !*shutdown.borrow() {
                    if shutdown.changed().await.is_err() {
                        return;
                    }
                }
            },
        );
    let serve_task = tokio::spawn(async move {
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "workload API server failed");
        }
    });
    let mut tasks = vec![sync_task, serve_task, readiness];
    let mut ext_authz_addr = None;
    if let Some(policy) = &config.policy {
        let (addr, ext_authz) = serve_ext_authz(
            policy,
            bundle_updates(state_rx.clone(), shutdown_rx.clone(), &mut tasks),
            shutdown_rx.clone(),
        )
        .await?;
        ext_authz_addr = Some(addr);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = ext_authz.await {
                tracing::error!(error = %e, "ext_authz server failed");
            }
        }));
    }
    let mut metrics_addr = None;
    if let Some(listener) = metrics_listener {
        let (bound, serving) = crate::metrics::serve_on(listener, probes, shutdown_rx.clone())
            .map_err(|e| AgentError::Socket {
                path: PathBuf::from("metrics_bind"),
                reason: e.to_string(),
            })?;
        metrics_addr = Some(bound);
        tasks.push(tokio::spawn(serving));
    }
    tracing::info!(agent = %spiffe_id, socket = %config.socket.display(), servers = ?config.servers, "sigil agent ready");
    Ok(AgentHandle {
        spiffe_id,
        socket: config.socket,
        ext_authz_addr,
        metrics_addr,
        state: state_rx,
        shutdown: shutdown_tx,
        tasks,
    })
}
