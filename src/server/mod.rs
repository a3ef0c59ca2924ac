//! `sigil server`: the composition root. Opens the store, loads or creates the
//! authorities, and serves the node API (TLS, mTLS for agents) and the admin
//! API (Unix socket, 0600) until told to shut down.

mod admin;
mod attestation;
pub mod bundle_endpoint;
pub mod convert;
pub mod federation;
pub mod limits;
mod node;
mod presence;
mod signing;
mod store_watch;
mod sync_hub;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Status;

pub use admin::AdminService;
pub use node::{MAX_SYNC_MESSAGE, MAX_SYNC_STREAMS_PER_AGENT, NodeService, SNAPSHOT_PAGE};

use crate::ca::{CaOptions, CaSet, CaSetError, IssuedX509, Upstream, VerifiedCsr, X509SvidParams};
use crate::config::{ConfigError, LogFormat, RawConfig};
use crate::policy::PolicyConfig;
use crate::proto::admin::admin_server::AdminServer;
use crate::proto::node::{self as pn, node_server::NodeServer};
use crate::registry::{EntryValidation, Registry};
use crate::runtime::{Clock, SystemClock};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::store::{Kek, SledStore, Store, StoreError};
use crate::x509::{KeyAlgorithm, certs_from_pem};

/// Default node API address.
pub const DEFAULT_BIND: &str = "127.0.0.1:8081";
/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/tmp/sigil-server/private/api.sock";
/// Config keys (and, with `-` for `_`, flags) of `sigil server`.
pub const SERVER_KEYS: &[&str] = &[
    "trust_domain",
    "data_dir",
    "bind",
    "admin_socket",
    "kek_file",
    "log_format",
    "ca_ttl",
    "default_x509_ttl",
    "default_jwt_ttl",
    "jwt_issuer",
    "agent_ttl",
    "x509pop_ca",
    "key_algorithm",
    "ext_authz_bind",
    "policy_dir",
    "policy_root_namespace",
    "jwks_ca_file",
    "policy_trusted_proxies",
    "upstream_cert",
    "upstream_key",
    "upstream_bundle",
    "bundle_bind",
    "bundle_profile",
    "bundle_cert",
    "bundle_key",
    "bundle_refresh_hint",
    "federation",
    "metrics_bind",
    "log_level",
    "agent_csr_rate",
    "agent_csr_burst",
    "datastore",
    "store_cache_mib",
];

/// Default `agent_csr_rate`: signings per second per agent.
pub const DEFAULT_AGENT_CSR_RATE: u32 = 1_000;
/// Default `agent_csr_burst`: an agent may re-sign this many at once (a
/// taint re-issues everything it holds).
pub const DEFAULT_AGENT_CSR_BURST: u32 = 10_000;

fn parse_count(v: &str) -> Result<u32, String> {
    v.trim()
        .parse::<u32>()
        .map_err(|_| "must be a whole number (e.g. 1000)".to_string())
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The authorities could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] CaSetError),
    /// Issuing the server's own SVID failed.
    #[error("cannot issue the server SVID: {0}")]
    ServerSvid(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// Address or socket path.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The ext_authz endpoint could not start.
    #[error(transparent)]
    ExtAuthz(#[from] crate::policy::ServeError),
    /// The gRPC transport failed.
    #[error("transport error: {0}")]
    Transport(String),
}

/// Tunables the services read.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// X509-SVID TTL for entries without one.
    pub default_x509_ttl: Duration,
    /// JWT-SVID TTL for entries without one.
    pub default_jwt_ttl: Duration,
    /// Agent SVID TTL.
    pub agent_ttl: Duration,
    /// x509pop trust anchors, DER (empty: x509pop disabled).
    pub x509pop_roots: Vec<Vec<u8>>,
    /// `iss` of minted JWT-SVIDs (none by default, as in SPIRE).
    pub jwt_issuer: Option<String>,
    /// The shortest wait between two polls of a federated peer (1 min;
    /// shorter only in tests).
    pub federation_poll_floor: Duration,
    /// X509-SVID CSRs (and JWT-SVIDs) each agent may have signed per second
    /// (0: no per-agent limit).
    pub agent_csr_rate: u32,
    /// How many of them an agent may ask for at once.
    pub agent_csr_burst: u32,
}

/// How long an agent's connection to the node API may live before the
/// server asks it to reconnect (HTTP/2 GOAWAY)...
pub const NODE_CONNECTION_AGE: Duration = Duration::from_secs(3600);
/// ...and how long its streams may then run on before the connection closes.
pub const NODE_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(60);

/// CSRs the server holds queued per signing thread before it answers
/// RESOURCE_EXHAUSTED (at ≈7k CSRs/s per core, about two seconds; ~5 MB).
pub const SIGNING_QUEUE_PER_WORKER: usize = 16_000;

/// Validated `sigil server` configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Where the sled store lives.
    pub data_dir: PathBuf,
    /// Node API address.
    pub bind: SocketAddr,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// KEK file.
    pub kek_file: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// Lifetime of new authorities.
    pub ca_ttl: Duration,
    /// Key algorithm of new authorities.
    pub key_algorithm: KeyAlgorithm,
    /// The upstream CA that signs the X.509 authorities, when configured.
    pub upstream: Option<Arc<Upstream>>,
    /// The SPIFFE bundle endpoint, when served.
    pub bundle_endpoint: Option<bundle_endpoint::BundleEndpointConfig>,
    /// The bundle's `spiffe_refresh_hint`.
    pub bundle_refresh_hint: Duration,
    /// Peer trust domains whose bundles are polled.
    pub federation: Vec<federation::FederationRelationship>,
    /// `/metrics`, `/live` and `/ready`, when served.
    pub metrics_bind: Option<SocketAddr>,
    /// Service tunables.
    pub options: ServerOptions,
    /// Envoy ext_authz, when served.
    pub policy: Option<PolicyConfig>,
    /// A shared PostgreSQL datastore (`postgres://USER@HOST:PORT/DB`) instead
    /// of the embedded sled store under `data_dir`.
    pub datastore: Option<String>,
    /// The embedded store's page cache, in MiB (sled's own default, 1 GiB,
    /// when unset).
    pub store_cache_mib: Option<u32>,
}

/// The smallest `store_cache_mib` taken.
pub const MIN_STORE_CACHE_MIB: u32 = 16;

impl ServerConfig {
    /// A server with every file under `dir` (store, KEK, admin socket), the
    /// node API on an ephemeral loopback port and default lifetimes: what
    /// `sigil dev` runs.
    pub fn local(trust_domain: TrustDomain, dir: &Path) -> Self {
        ServerConfig {
            trust_domain,
            data_dir: dir.join("data"),
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_socket: dir.join("admin.sock"),
            kek_file: dir.join("kek"),
            log_format: LogFormat::Text,
            ca_ttl: Duration::from_secs(24 * 3600),
            key_algorithm: KeyAlgorithm::EcP256,
            upstream: None,
            bundle_endpoint: None,
            bundle_refresh_hint: Duration::from_secs(300),
            federation: Vec::new(),
            metrics_bind: None,
            options: ServerOptions {
                default_x509_ttl: Duration::from_secs(3600),
                default_jwt_ttl: Duration::from_secs(300),
                agent_ttl: Duration::from_secs(3600),
                x509pop_roots: Vec::new(),
                jwt_issuer: None,
                federation_poll_floor: Duration::from_secs(60),
                agent_csr_rate: DEFAULT_AGENT_CSR_RATE,
                agent_csr_burst: DEFAULT_AGENT_CSR_BURST,
            },
            policy: None,
            datastore: None,
            store_cache_mib: None,
        }
    }

    /// Validates merged flags and file values; errors name the key.
    pub fn from_raw(raw: &RawConfig) -> Result<Self, ConfigError> {
        let trust_domain = raw.trust_domain("trust_domain")?;
        let data_dir = PathBuf::from(raw.string_or("data_dir", ".sigil/server")?);
        let kek_file = raw
            .get("kek_file")?
            .map_or_else(|| data_dir.join("kek"), PathBuf::from);
        let x509pop_roots = raw
            .parsed("x509pop_ca", None, |path| {
                let text =
                    std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
                certs_from_pem(&text).map_err(|e| e.to_string())
            })?
            .unwrap_or_default();
        let ca_ttl = raw.duration("ca_ttl", "24h")?;
        let options = ServerOptions {
            default_x509_ttl: raw.duration("default_x509_ttl", "1h")?,
            default_jwt_ttl: raw.duration("default_jwt_ttl", "5m")?,
            agent_ttl: raw.duration("agent_ttl", "1h")?,
            x509pop_roots,
            jwt_issuer: raw.parsed("jwt_issuer", None, |v| {
                if v.trim().is_empty() {
                    Err("must not be empty".to_string())
                } else {
                    Ok(v.to_string())
                }
            })?,
            federation_poll_floor: Duration::from_secs(60),
            agent_csr_rate: raw
                .parsed("agent_csr_rate", None, parse_count)?
                .unwrap_or(DEFAULT_AGENT_CSR_RATE),
            agent_csr_burst: raw
                .parsed("agent_csr_burst", None, |v| {
                    parse_count(v).and_then(|n| {
                        if n < node::MAX_BATCH as u32 {
                            Err(format!(
                                "must be at least {} (one full signing batch)",
                                node::MAX_BATCH
                            ))
                        } else {
                            Ok(n)
                        }
                    })
                })?
                .unwrap_or(DEFAULT_AGENT_CSR_BURST),
        };
        // SVID lifetimes must fit what an active authority always has left
        // (a sixth of its life): checked here, never silently capped later.
        let max = crate::ca::rotation::max_svid_ttl(ca_ttl);
        for (key, ttl) in [
            ("default_x509_ttl", options.default_x509_ttl),
            ("default_jwt_ttl", options.default_jwt_ttl),
            ("agent_ttl", options.agent_ttl),
        ] {
            if ttl > max {
                return Err(ConfigError::Invalid {
                    key,
                    value: crate::config::format_duration(ttl),
                    reason: format!(
                        "must be at most ca_ttl / 6 = {} (ca_ttl = {}), so the active authority can always sign it in full; raise ca_ttl or lower {key}",
                        crate::config::format_duration(max),
                        crate::config::format_duration(ca_ttl)
                    ),
                });
            }
        }
        Ok(ServerConfig {
            upstream: upstream_from_raw(raw)?,
            bundle_endpoint: bundle_endpoint_from_raw(raw)?,
            bundle_refresh_hint: refresh_hint_from_raw(raw, ca_ttl)?,
            federation: federation::relationships(&raw.tables("federation")?, &trust_domain)?,
            metrics_bind: match raw.get("metrics_bind")? {
                Some(_) => Some(raw.socket_addr("metrics_bind", "127.0.0.1:0")?),
                None => None,
            },
            policy: PolicyConfig::from_raw(raw)?,
            datastore: match raw.get("datastore")? {
                // Checked here so `--validate` catches it; the value shown in
                // an error has its password hidden.
                Some(url) => match crate::store::check_datastore_url(&url) {
                    Ok(()) => Some(url),
                    Err(reason) => {
                        return Err(ConfigError::Invalid {
                            key: "datastore",
                            value: crate::store::redact(&url),
                            reason,
                        });
                    }
                },
                None => None,
            },
            store_cache_mib: store_cache_from_raw(raw)?,
            bind: raw.socket_addr("bind", DEFAULT_BIND)?,
            admin_socket: PathBuf::from(raw.string_or("admin_socket", DEFAULT_ADMIN_SOCKET)?),
            log_format: raw
                .parsed("log_format", Some("text"), |v| v.parse())?
                .unwrap_or(LogFormat::Text),
            key_algorithm: raw
                .parsed("key_algorithm", Some("ec-p256"), |v| v.parse())?
                .unwrap_or(KeyAlgorithm::EcP256),
            options,
            trust_domain,
            data_dir,
            kek_file,
            ca_ttl,
        })
    }
}

/// `store_cache_mib`: only for the embedded store (PostgreSQL keeps its own
/// cache), and at least [`MIN_STORE_CACHE_MIB`].
fn store_cache_from_raw(raw: &RawConfig) -> Result<Option<u32>, ConfigError> {
    let mib = raw.parsed("store_cache_mib", None, |v| {
        parse_count(v).and_then(|n| {
            if n < MIN_STORE_CACHE_MIB {
                Err(format!("must be at least {MIN_STORE_CACHE_MIB} (MiB)"))
            } else {
                Ok(n)
            }
        })
    })?;
    if let (Some(n), Some(_)) = (mib, raw.get("datastore")?) {
        return Err(ConfigError::Invalid {
            key: "store_cache_mib",
            value: n.to_string(),
            reason: "applies to the embedded store only, and `datastore` names PostgreSQL; remove one of them".into(),
        });
    }
    Ok(mib)
}

/// `bundle_refresh_hint`: 5m by default, or less when `ca_ttl` is short; an
/// explicit value must leave peers time to see a prepared authority.
fn refresh_hint_from_raw(raw: &RawConfig, ca_ttl: Duration) -> Result<Duration, ConfigError> {
    let max = crate::ca::rotation::max_refresh_hint(ca_ttl).max(Duration::from_secs(1));
    let Some(given) = raw.get("bundle_refresh_hint")? else {
        return Ok(Duration::from_secs(300).min(max));
    };
    let hint = raw.duration("bundle_refresh_hint", "5m")?;
    let bad = |reason: String| ConfigError::Invalid {
        key: "bundle_refresh_hint",
        value: given.clone(),
        reason,
    };
    if hint < Duration::from_secs(1) {
        return Err(bad("must be at least 1s".into()));
    }
    if hint > max {
        return Err(bad(format!(
            "must be at most {} (a quarter of the time between preparing and activating an authority with ca_ttl = {}), so peers see a new authority before it signs",
            crate::config::format_duration(max),
            crate::config::format_duration(ca_ttl)
        )));
    }
    Ok(hint)
}

/// `bundle_bind` with `bundle_profile` (`https_spiffe` by default) and, for
/// `https_web` only, `bundle_cert` and `bundle_key` (checked now).
fn bundle_endpoint_from_raw(
    raw: &RawConfig,
) -> Result<Option<bundle_endpoint::BundleEndpointConfig>, ConfigError> {
    use bundle_endpoint::{BundleEndpointConfig, BundleProfile};
    let cert = raw.get("bundle_cert")?;
    let key = raw.get("bundle_key")?;
    let profile = raw.get("bundle_profile")?;
    let Some(bind) = raw.get("bundle_bind")? else {
        for (k, v) in [
            ("bundle_profile", &profile),
            ("bundle_cert", &cert),
            ("bundle_key", &key),
        ] {
            if let Some(v) = v {
                return Err(ConfigError::Invalid {
                    key: k,
                    value: v.clone(),
                    reason: "needs --bundle-bind".into(),
                });
            }
        }
        return Ok(None);
    };
    let bind = raw.socket_addr("bundle_bind", &bind)?;
    let profile = match profile.as_deref().unwrap_or("https_spiffe") {
        "https_spiffe" => {
            if let Some(c) = cert.or(key) {
                return Err(ConfigError::Invalid {
                    key: "bundle_cert",
                    value: c,
                    reason: "--bundle-cert and --bundle-key are for --bundle-profile https_web (https_spiffe serves with the server SVID)".into(),
                });
            }
            BundleProfile::HttpsSpiffe
        }
        "https_web" => {
            let (Some(cert), Some(key)) = (cert, key) else {
                return Err(ConfigError::Missing {
                    key: "bundle_cert",
                    flag: "bundle-cert and --bundle-key (with --bundle-profile https_web)".into(),
                });
            };
            tls::web_acceptor(Path::new(&cert), Path::new(&key)).map_err(|reason| {
                ConfigError::Invalid {
                    key: "bundle_cert",
                    value: cert.clone(),
                    reason,
                }
            })?;
            BundleProfile::HttpsWeb {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }
        }
        other => {
            return Err(ConfigError::Invalid {
                key: "bundle_profile",
                value: other.to_string(),
                reason: "must be https_spiffe or https_web".into(),
            });
        }
    };
    Ok(Some(BundleEndpointConfig { bind, profile }))
}

/// `upstream_cert` and `upstream_key` (both or neither), and
/// `upstream_bundle` only with them.
fn upstream_from_raw(raw: &RawConfig) -> Result<Option<Arc<Upstream>>, ConfigError> {
    let cert = raw.get("upstream_cert")?;
    let key = raw.get("upstream_key")?;
    let bundle = raw.get("upstream_bundle")?;
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => {
            return match bundle {
                Some(b) => Err(ConfigError::Invalid {
                    key: "upstream_bundle",
                    value: b,
                    reason: "needs --upstream-cert and --upstream-key".into(),
                }),
                None => Ok(None),
            };
        }
        (None, Some(_)) => {
            return Err(ConfigError::Missing {
                key: "upstream_cert",
                flag: "upstream-cert (with --upstream-key)".into(),
            });
        }
        (Some(_), None) => {
            return Err(ConfigError::Missing {
                key: "upstream_key",
                flag: "upstream-key (with --upstream-cert)".into(),
            });
        }
    };
    let upstream = Upstream::load(
        Path::new(&cert),
        Path::new(&key),
        bundle.as_deref().map(Path::new),
        SystemTime::now(),
    )?;
    Ok(Some(Arc::new(upstream)))
}

/// What the server last heard from an agent (in memory: agents acknowledge
/// again on connect).
#[derive(Debug, Clone, Copy)]
struct AgentSeen {
    /// The last bundle sequence it applied.
    sequence: u64,
    /// SVIDs it still held, then, signed by tainted authorities.
    tainted_svids: u32,
    /// When it was last seen (ack or sync).
    seen: std::time::Instant,
}

/// Recently seen agents against one bundle sequence (for `ca show`).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AgentsView {
    /// Seen in the last hour.
    pub recent: u32,
    /// Of those, have applied the sequence.
    pub current: u32,
    /// Of those, still hold SVIDs signed by a tainted authority.
    pub reissuing: u32,
    /// How many such SVIDs, in all.
    pub svids_to_reissue: u32,
}

/// State shared by the services.
pub struct ServerState {
    registry: Registry,
    ca: CaSet,
    clock: Arc<dyn Clock>,
    options: ServerOptions,
    shutdown: watch::Receiver<bool>,
    /// Per agent: the last bundle it acknowledged and when it was seen.
    bundle_acks: std::sync::Mutex<std::collections::HashMap<SpiffeId, AgentSeen>>,
    /// Bumped when `bundle_acks` learns something the other servers of a
    /// cluster should hear (a new agent, a new acknowledgement).
    acks_generation: std::sync::atomic::AtomicU64,
    /// This process among the servers of a cluster (random, per start).
    server_id: String,
    /// The last failure of the rotation schedule, until a step succeeds
    /// (health is unready meanwhile).
    rotation_error: std::sync::Mutex<Option<String>>,
    /// Open SyncEntries streams per agent (capped: a runaway or hostile agent
    /// cannot pin unbounded server tasks).
    sync_streams: std::sync::Mutex<std::collections::HashMap<SpiffeId, usize>>,
    /// `tainted_authorities` as of a store revision.
    tainted_cache: std::sync::Mutex<(u64, Vec<String>)>,
    /// Signing runs on its own threads, one batch per core at a time, so a
    /// flood of CSRs never stalls the async workers that serve health,
    /// attestation and sync.
    signers: signing::SigningPool,
    /// Whether the store can be read (from the readiness probe's reads):
    /// while it cannot, sync streams end, so agents move to another server.
    store_watch: store_watch::StoreWatch,
    /// Hands each commit to the sync streams it concerns.
    sync_hub: Arc<sync_hub::SyncHub>,
    /// Per-agent signing rate and the bound on queued CSRs.
    limits: Arc<limits::SigningLimits>,
    /// The per-stream tasks (attestation, sync): awaited on shutdown, as
    /// they hold this state and so the store.
    tasks: tokio_util::task::TaskTracker,
}

impl ServerState {
    /// Refuses an agent ID that is not an agent, unknown (evicted) or banned.
    fn check_agent(&self, id: &SpiffeId, serial: &str) -> Result<(), Status> {
        if !id.is_member_of(self.registry.trust_domain()) || !id.path().starts_with("/sigil/agent/")
        {
            return Err(Status::permission_denied(format!(
                "{id} is not an agent identity"
            )));
        }
        let now = crate::registry::unix(self.clock.now());
        match self.registry.agent(id).map_err(convert::status)? {
            None => Err(Status::permission_denied(format!(
                "agent {id} is not attested (evicted?); attest again"
            ))),
            Some(a) if a.banned => Err(Status::permission_denied(format!("agent {id} is banned"))),
            Some(a) if !a.accepts_serial(serial, now) => Err(Status::permission_denied(format!(
                "agent {id}: SVID serial {serial} was superseded by a renewal; use the current SVID"
            ))),
            Some(a) => {
                if serial == a.svid_serial && !a.previous_serial.is_empty() {
                    self.registry
                        .confirm_agent_serial(id, serial)
                        .map_err(convert::status)?;
                }
                Ok(())
            }
        }
    }

    fn issue_agent_svid(&self, csr: &VerifiedCsr, id: &SpiffeId) -> Result<IssuedX509, Status> {
        let params = X509SvidParams {
            spiffe_id: id.clone(),
            dns_names: Vec::new(),
            ttl: self.options.agent_ttl,
        };
        self.ca
            .x509()
            .issue(csr, &params, self.clock.now())
            .map_err(convert::status)
    }

    fn agent_svid(&self, id: &SpiffeId, svid: &IssuedX509) -> pn::AgentSvid {
        pn::AgentSvid {
            spiffe_id: id.to_string(),
            cert_chain: svid.chain().to_vec(),
            expires_at: convert::ts(svid.not_after()),
            bundle_jwks: self.bundle_jwks(),
        }
    }

    /// Notes that `agent` has applied bundle `sequence` and still holds
    /// `tainted_svids` signed by tainted authorities (or, with `None`, was
    /// seen without saying).
    fn note_agent(&self, agent: &SpiffeId, ack: Option<(u64, u32)>) {
        let mut acks = self.bundle_acks.lock().unwrap_or_else(|p| p.into_inner());
        // Agents come and go (a join token makes a new ID each time): forget
        // those not seen for a while, so the map stays the fleet's size.
        if acks.len() >= 1024 && acks.len().is_power_of_two() {
            acks.retain(|_, a| a.seen.elapsed() < RECENT_AGENT);
        }
        let now = std::time::Instant::now();
        let mut changed = !acks.contains_key(agent);
        let entry = acks.entry(agent.clone()).or_insert(AgentSeen {
            sequence: 0,
            tainted_svids: 0,
            seen: now,
        });
        if let Some((sequence, tainted)) = ack {
            if sequence >= entry.sequence {
                changed |= (sequence, tainted) != (entry.sequence, entry.tainted_svids);
                entry.sequence = sequence;
                entry.tainted_svids = tainted;
            }
        }
        entry.seen = now;
        if changed {
            self.acks_generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The agents this server saw in the last hour, as it saw them.
    fn own_sightings(
        &self,
        now: SystemTime,
    ) -> std::collections::HashMap<String, presence::Sighting> {
        let acks = self.bundle_acks.lock().unwrap_or_else(|p| p.into_inner());
        acks.iter()
            .filter(|(_, a)| a.seen.elapsed() < RECENT_AGENT)
            .map(|(id, a)| {
                let seen = now.checked_sub(a.seen.elapsed()).unwrap_or(now);
                (
                    id.to_string(),
                    presence::Sighting {
                        sequence: a.sequence,
                        tainted_svids: a.tainted_svids,
                        seen: crate::registry::unix(seen),
                    },
                )
            })
            .collect()
    }

    /// The agents seen in the last hour, by this server or (with a shared
    /// store) any other server of the cluster, against bundle `sequence`.
    fn agents_with_bundle(&self, sequence: u64) -> AgentsView {
        let now = self.clock.now();
        let mut agents = presence::others(self, now);
        for (id, s) in self.own_sightings(now) {
            presence::merge(&mut agents, id, s);
        }
        let mut view = AgentsView::default();
        for a in agents.values() {
            view.recent += 1;
            if a.sequence >= sequence {
                view.current += 1;
                if a.tainted_svids > 0 {
                    view.reissuing += 1;
                    view.svids_to_reissue = view.svids_to_reissue.saturating_add(a.tainted_svids);
                }
            }
        }
        view
    }

    /// The tainted (and revoked) authorities as committed in the store at
    /// revision `seen` or later: read there, like the bundle, so a stream
    /// woken by the taint's commit sees it. Reading means unsealing every
    /// authority, so the list is cached per revision: a commit wakes every
    /// agent's stream, and only the first reads.
    fn tainted_authorities(&self, seen: u64) -> Vec<String> {
        let mut cache = self.tainted_cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 >= seen && seen > 0 {
            return cache.1.clone();
        }
        let store = self.registry.store();
        // The revision first: the list read after it is at least that new.
        let Ok(revision) = store.revision() else {
            return Vec::new();
        };
        let list: Vec<String> = store
            .authorities()
            .map(|all| {
                all.into_iter()
                    // A revoked intermediate is not in the bundle to leave
                    // it: agents drop what it signed as for a tainted one.
                    .filter(|a| {
                        a.state == crate::store::SlotState::Tainted
                            || a.state == crate::store::SlotState::Revoked
                    })
                    .map(|a| a.id)
                    .collect()
            })
            .unwrap_or_default();
        *cache = (revision, list.clone());
        list
    }

    /// Every federated bundle as committed (trust domain name → JWKS).
    fn federated_jwks(&self) -> std::collections::HashMap<String, Vec<u8>> {
        let own = self.registry.trust_domain().name().as_bytes();
        self.registry
            .store()
            .scan(crate::store::Table::Bundle, b"", None, usize::MAX)
            .map(|all| {
                all.into_iter()
                    .filter(|(k, _)| k.as_slice() != own)
                    .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The bundle as committed in the store: what a sync stream woken by a
    /// commit must send (the CA's in-memory view may lag that commit).
    fn bundle_jwks(&self) -> Vec<u8> {
        let key = self.registry.trust_domain().name().as_bytes();
        match self.registry.store().get(crate::store::Table::Bundle, key) {
            Ok(Some(jwks)) => jwks,
            _ => self.ca.bundle().to_jwks().into_bytes(),
        }
    }
}

/// A running server.
pub struct ServerHandle {
    node_addr: SocketAddr,
    ext_authz_addr: Option<SocketAddr>,
    bundle_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    admin_socket: PathBuf,
    bundle_pem: String,
    trust_domain: TrustDomain,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl ServerHandle {
    /// The node API's bound address (useful with port 0).
    pub fn node_addr(&self) -> SocketAddr {
        self.node_addr
    }
    /// The ext_authz address, when served.
    pub fn ext_authz_addr(&self) -> Option<SocketAddr> {
        self.ext_authz_addr
    }
    /// The metrics listener's address, when served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    /// The bundle endpoint's address, when served.
    pub fn bundle_addr(&self) -> Option<SocketAddr> {
        self.bundle_addr
    }
    /// The admin socket path.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }
    /// The trust bundle's X.509 authorities, PEM (what agents bootstrap with).
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }
    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Stops accepting, lets in-flight RPCs finish for up to `grace`, then stops.
    pub async fn shutdown(self, grace: Duration) -> Result<(), ServerError> {
        let _ = self.shutdown.send(true);
        let abort = self.task.abort_handle();
        let result = match tokio::time::timeout(grace, self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(ServerError::Transport(join.to_string())),
            Err(_) => {
                tracing::warn!(
                    grace_secs = grace.as_secs(),
                    "drain time limit reached; stopping"
                );
                abort.abort();
                Ok(())
            }
        };
        let _ = std::fs::remove_file(&self.admin_socket);
        result
    }

    /// Waits until the server stops by itself (a transport error).
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(join) => Err(ServerError::Transport(join.to_string())),
        }
    }
}

fn bind_admin_socket(path: &Path) -> Result<UnixListener, ServerError> {
    crate::edge::bind_unix(path, 0o600, 0o700).map_err(|reason| ServerError::Bind {
        addr: path.display().to_string(),
        reason,
    })
}

/// Runs the CA rotation schedule every `every` until shutdown, in a
/// supervised loop: a failed step is logged, makes health unready, and is
/// retried with backoff (doubling to 60 s); it never ends the task.
async fn rotate_authorities(
    state: Arc<ServerState>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut delay = every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
        let step = state.clone();
        let result = tokio::task::spawn_blocking(move || {
            let store = step.registry.store().clone();
            // One server of a cluster runs the schedule; the others follow
            // what it commits.
            if !holds_lease(store.as_ref(), LEASE_ROTATION)? {
                return Ok(Vec::new());
            }
            step.ca.tick(store.as_ref(), step.clock.now())
        })
        .await;
        let failure = match result {
            Ok(Ok(done)) => {
                if !done.is_empty() {
                    state.registry.notify_committed();
                }
                for what in done {
                    tracing::info!(target: "sigil::audit", event = "ca_rotation", what = %what);
                }
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(format!("rotation task failed: {e}")),
        };
        let mut last = state
            .rotation_error
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match failure {
            None => {
                *last = None;
                delay = every;
            }
            Some(why) => {
                tracing::error!(error = %why, retry_in = ?delay.saturating_mul(2).min(Duration::from_secs(60)), "CA rotation step failed; health is unready until it succeeds");
                *last = Some(why);
                delay = delay
                    .saturating_mul(2)
                    .clamp(Duration::from_secs(1), Duration::from_secs(60));
            }
        }
    }
}

/// How often the rotation schedule runs: a hundredth of the CA lifetime,
/// between 1 s and 60 s.
fn rotation_interval(ca_ttl: Duration) -> Duration {
    (ca_ttl / 100).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// An agent seen this recently counts for `ca show` and the activate gate.
const RECENT_AGENT: Duration = Duration::from_secs(3600);

/// Events kept for agents to resume from; older ones are compacted away (an
/// agent further behind gets a snapshot).
pub const KEEP_EVENTS: u64 = 100_000;
/// How often the event log is compacted.
const COMPACT_EVERY: Duration = Duration::from_secs(600);

/// Drops events older than the last [`KEEP_EVENTS`]; returns the horizon.
pub fn compact_once(store: &dyn Store) -> Result<u64, crate::store::StoreError> {
    let through = store.revision()?.saturating_sub(KEEP_EVENTS);
    store.compact_events(through)?;
    Ok(through)
}

/// Compacts the event log on a schedule until shutdown; failures are logged
/// and retried at the next tick.
async fn compact_events(state: Arc<ServerState>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(COMPACT_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let store = state.registry.store().clone();
        let done = tokio::task::spawn_blocking(move || {
            if holds_lease(store.as_ref(), LEASE_COMPACTION)? {
                compact_once(store.as_ref())
            } else {
                Ok(0)
            }
        })
        .await;
        match done {
            Ok(Ok(through)) if through > 0 => tracing::info!(through, "event log compacted"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "event log compaction failed; will retry"),
            Err(e) => tracing::error!(error = %e, "event log compaction task failed; will retry"),
        }
    }
}

/// The lease under which one server of a cluster runs the CA schedule.
pub const LEASE_ROTATION: &str = "ca-rotation";
/// The lease under which one server of a cluster compacts the event log.
pub const LEASE_COMPACTION: &str = "event-compaction";
/// The lease under which one server of a cluster polls federated bundles.
pub const LEASE_FEDERATION: &str = "federation";

/// Whether this server holds `lease` (taking it when free); the answer is
/// also the `sigil_cluster_lease_held` gauge.
pub(crate) fn holds_lease(
    store: &dyn Store,
    lease: &str,
) -> Result<bool, crate::store::StoreError> {
    let held = store.try_lease(lease);
    crate::metrics::metrics()
        .lease_held
        .get_or_create(&crate::metrics::label("lease", lease))
        .set(i64::from(matches!(held, Ok(true))));
    held
}

/// How often a server of a cluster diffs its view of the authorities
/// against the datastore in full.
const DRIFT_CHECK_EVERY: Duration = Duration::from_secs(60);

/// With a shared datastore: hands other servers' commits to this server's
/// sync hub (which routes them to the streams), reloads the authorities when
/// the hub routed a change to them or to a bundle, and every minute diffs the
/// authorities in full (the drift metric). A reload that fails is retried a
/// second later; a failed read never reads as a deletion.
async fn follow_datastore(state: Arc<ServerState>, mut shutdown: watch::Receiver<bool>) {
    let Some(mut changes) = state.registry.store().changes() else {
        return;
    };
    let mut authorities = state.sync_hub.bundle_changes();
    let mut full = tokio::time::interval(DRIFT_CHECK_EVERY);
    full.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = false;
    loop {
        let diff = tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let revision = *changes.borrow_and_update();
                state.registry.notify_revision(revision);
                continue;
            }
            changed = authorities.changed() => {
                if changed.is_err() {
                    return;
                }
                authorities.borrow_and_update();
                false
            }
            () = tokio::time::sleep(Duration::from_secs(1)), if retry => false,
            _ = full.tick() => true,
            _ = shutdown.changed() => return,
        };
        let step = state.clone();
        let done = tokio::task::spawn_blocking(move || {
            step.ca
                .reload(step.registry.store().as_ref(), step.clock.now())
        })
        .await;
        retry = !matches!(done, Ok(Ok(_)));
        match done {
            Ok(Ok(differ)) if diff => {
                crate::metrics::metrics()
                    .datastore_drift
                    .set(i64::try_from(differ).unwrap_or(i64::MAX));
                if differ > 0 {
                    tracing::warn!(
                        differ,
                        "the authorities had drifted from the datastore; reloaded"
                    );
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot reload the authorities; retrying"),
            Err(e) => tracing::warn!(error = %e, "datastore follower task failed"),
        }
    }
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The server's metrics gauges and readiness: the store readable, the
/// active X.509 authority valid, the rotation schedule not failing.
fn server_probes(state: Arc<ServerState>) -> crate::metrics::Probes {
    let for_refresh = state.clone();
    crate::metrics::Probes {
        refresh: Box::new(move || {
            let m = crate::metrics::metrics();
            let store = for_refresh.registry.store();
            if let Ok(r) = store.revision() {
                m.store_revision.set(i64::try_from(r).unwrap_or(i64::MAX));
            }
            if let Some(size) = store.size_on_disk() {
                m.store_size.set(i64::try_from(size).unwrap_or(i64::MAX));
            }
            let now = for_refresh.clock.now();
            let current = for_refresh.ca.current();
            m.authorities.clear();
            for a in current.list() {
                let kind = match a.kind {
                    crate::store::AuthorityKind::X509 => "x509",
                    crate::store::AuthorityKind::Jwt => "jwt",
                };
                m.authorities
                    .get_or_create(&vec![
                        ("kind", kind.to_string()),
                        ("state", crate::ca::state_name(a.state).to_string()),
                    ])
                    .inc();
                if a.state == crate::store::SlotState::Active {
                    let left = a.not_after.duration_since(now).unwrap_or_default();
                    m.authority_remaining
                        .get_or_create(&crate::metrics::label("kind", kind))
                        .set(left.as_secs_f64());
                }
            }
        }),
        ready: Arc::new(move || {
            // Read first, whatever else fails: the store watch follows it.
            let read = state.registry.store().revision();
            state.store_watch.observe(&read, std::time::Instant::now());
            if let Some(why) = state
                .rotation_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return Err(format!("CA rotation is failing: {why}"));
            }
            read.map_err(|e| format!("the store cannot be read: {e}"))?;
            if state.ca.x509().not_after() <= state.clock.now() {
                return Err("the active X.509 authority has expired".into());
            }
            Ok(())
        }),
    }
}

/// What follows the authorities: watch senders the services read from.
struct Followers {
    /// The node API's TLS (server SVID and agent roots).
    node_tls: watch::Sender<tokio_rustls::TlsAcceptor>,
    /// HTTPS with the server SVID (the bundle endpoint's `https_spiffe`).
    spiffe_tls: watch::Sender<tokio_rustls::TlsAcceptor>,
    /// The ext_authz bundle.
    bundle: watch::Sender<Option<crate::Bundle>>,
    /// The bundle endpoint's document.
    document: watch::Sender<Arc<bundle_endpoint::Document>>,
}

/// The bundle as committed, as `sigil bundle show` prints it.
fn stored_document(state: &ServerState) -> Arc<bundle_endpoint::Document> {
    let td = state.registry.trust_domain().clone();
    let stored = String::from_utf8(state.bundle_jwks())
        .ok()
        .and_then(|j| crate::Bundle::from_jwks(td, &j).ok());
    match stored {
        Some(b) => bundle_endpoint::Document::of(&b),
        None => bundle_endpoint::Document::of(&state.ca.bundle()),
    }
}

/// Keeps what depends on the authorities current.
async fn follow_authorities(
    state: Arc<ServerState>,
    followers: Followers,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = state.ca.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
        let now = state.clock.now();
        let current = changes.borrow_and_update().clone();
        match tls::server_tls(&current, state.registry.trust_domain(), now) {
            Ok(t) => {
                followers.node_tls.send_replace(t.node);
                followers.spiffe_tls.send_replace(t.https);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot renew the server's TLS after an authority change")
            }
        }
        followers
            .bundle
            .send_replace(Some((**current.bundle()).clone()));
        followers.document.send_replace(stored_document(&state));
    }
}

/// Opens the store and authorities, binds both listeners and starts serving.
pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    crate::runtime::files::private_umask();
    if let Some(limit) = crate::edge::raise_fd_limit() {
        tracing::debug!(open_files = limit, "open-file limit");
    }
    // Bind before creating any state: a start that cannot serve leaves no
    // KEK, store or CA behind.
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|e| ServerError::Bind {
            addr: config.bind.to_string(),
            reason: e.to_string(),
        })?;
    let node_addr = listener.local_addr().map_err(|e| ServerError::Bind {
        addr: config.bind.to_string(),
        reason: e.to_string(),
    })?;
    let kek = Kek::load_or_create(&config.kek_file)?;
    let store: Arc<dyn Store> = match &config.datastore {
        Some(url) => {
            let pg = crate::store::PostgresStore::connect(url, kek)?;
            tracing::info!(datastore = %pg.shown(), "using the shared PostgreSQL datastore");
            Arc::new(pg)
        }
        None => Arc::new(SledStore::open_with_cache(
            &config.data_dir,
            kek,
            config.store_cache_mib.map(|m| u64::from(m) << 20),
        )?),
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now();
    let ca = CaSet::load_or_create(
        store.as_ref(),
        &CaOptions {
            trust_domain: config.trust_domain.clone(),
            key_algorithm: config.key_algorithm,
            ca_ttl: config.ca_ttl,
            upstream: config.upstream.clone(),
            refresh_hint: config.bundle_refresh_hint,
        },
        now,
    )?;
    let registry = Registry::new(
        store.clone(),
        config.trust_domain.clone(),
        EntryValidation::for_ca_ttl(config.ca_ttl),
    );

    let bundle_pem = ca.bundle().to_pem();
    let first_tls = tls::server_tls(&ca.current(), &config.trust_domain, now)?;
    let (tls_tx, tls_rx) = watch::channel(first_tls.node);
    let (spiffe_tls_tx, spiffe_tls_rx) = watch::channel(first_tls.https);

    let admin_listener = bind_admin_socket(&config.admin_socket)?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bundle_for_policies = ca.bundle().clone();
    let state = Arc::new(ServerState {
        store_watch: store_watch::StoreWatch::default(),
        registry,
        ca,
        clock,
        options: config.options.clone(),
        shutdown: shutdown_rx.clone(),
        sync_streams: std::sync::Mutex::default(),
        tainted_cache: std::sync::Mutex::default(),
        rotation_error: std::sync::Mutex::default(),
        bundle_acks: std::sync::Mutex::default(),
        acks_generation: std::sync::atomic::AtomicU64::new(0),
        server_id: crate::registry::random_bytes(8)
            .map(|b| crate::registry::hex(&b))
            .unwrap_or_else(|_| format!("pid-{}", std::process::id())),
        signers: signing::SigningPool::new(workers).map_err(|e| {
            ServerError::Transport(format!("cannot start the signing threads: {e}"))
        })?,
        sync_hub: Arc::default(),
        tasks: tokio_util::task::TaskTracker::new(),
        limits: Arc::new(limits::SigningLimits::new(
            config.options.agent_csr_rate,
            config.options.agent_csr_burst,
            SIGNING_QUEUE_PER_WORKER * workers,
            workers,
        )),
    });
    // Its own task (it reads the log while the listeners accept), awaited
    // with the rest on shutdown: it holds the store.
    let sync_hub = tokio::spawn(state.sync_hub.clone().run(
        state.registry.store().clone(),
        state.registry.subscribe(),
        shutdown_rx.clone(),
    ));
    let sync_hub = async move {
        let _ = sync_hub.await;
    };
    let stream_tasks = state.tasks.clone();
    let state_for_compaction = state.clone();
    let state_for_follow = state.clone();
    let state_for_rotation = state.clone();
    let probes = server_probes(state.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let readiness = crate::metrics::follow_readiness(
        probes.ready.clone(),
        health_reporter,
        vec!["sigil.node.v1.Node".into()],
        None::<watch::Receiver<()>>,
        shutdown_rx.clone(),
    );
    let node_limits = crate::edge::ConnLimits::NODE;
    let node_server = node_limits
        .server_builder()
        // Agents reconnect now and then (resuming their sync), so a fleet
        // spreads again over the servers it lists after one was down.
        .max_connection_age(NODE_CONNECTION_AGE)
        .max_connection_age_grace(NODE_CONNECTION_AGE_GRACE)
        .layer(crate::metrics::RpcMetricsLayer)
        .add_service(health_service)
        .add_service(NodeServer::new(NodeService::new(state.clone())))
        .serve_with_incoming_shutdown(
            crate::edge::tls_incoming("node", listener, tls_rx, node_limits),
            wait_for(shutdown_rx.clone()),
        );
    let admin_limits = crate::edge::ConnLimits::ADMIN;
    let admin_server = admin_limits
        .server_builder()
        .layer(
            tower::ServiceBuilder::new()
                .layer(crate::metrics::RpcMetricsLayer)
                .layer(crate::edge::PeerCallerLayer),
        )
        .add_service(AdminServer::new(AdminService::new(state)))
        .serve_with_incoming_shutdown(
            crate::edge::unix_incoming("admin", admin_listener, admin_limits),
            wait_for(shutdown_rx.clone()),
        );
    let (bundle_tx, bundle_rx) = watch::channel(Some((*bundle_for_policies).clone()));
    let (ext_authz_addr, ext_authz_server) = match &config.policy {
        Some(policy) => {
            let (addr, serving) =
                crate::policy::serve_ext_authz(policy, bundle_rx, shutdown_rx.clone()).await?;
            (Some(addr), Some(serving))
        }
        None => (None, None),
    };
    let (document_tx, document_rx) = watch::channel(stored_document(&state_for_follow));
    let (bundle_addr, bundle_server) = match &config.bundle_endpoint {
        Some(endpoint) => {
            let listener =
                TcpListener::bind(endpoint.bind)
                    .await
                    .map_err(|e| ServerError::Bind {
                        addr: endpoint.bind.to_string(),
                        reason: e.to_string(),
                    })?;
            let addr = listener.local_addr().map_err(|e| ServerError::Bind {
                addr: endpoint.bind.to_string(),
                reason: e.to_string(),
            })?;
            let tls = match &endpoint.profile {
                bundle_endpoint::BundleProfile::HttpsSpiffe => spiffe_tls_rx,
                bundle_endpoint::BundleProfile::HttpsWeb { cert, key } => {
                    watch::channel(tls::web_acceptor(cert, key).map_err(|reason| {
                        ServerError::Bind {
                            addr: endpoint.bind.to_string(),
                            reason,
                        }
                    })?)
                    .1
                }
            };
            tracing::info!(addr = %addr, profile = ?endpoint.profile, "serving the bundle endpoint");
            let serving = bundle_endpoint::serve(listener, tls, document_rx, shutdown_rx.clone());
            (Some(addr), Some(serving))
        }
        None => (None, None),
    };
    let pollers: Vec<_> = config
        .federation
        .iter()
        .map(|rel| {
            tokio::spawn(federation::run(
                state_for_follow.clone(),
                rel.clone(),
                config.options.federation_poll_floor,
                shutdown_rx.clone(),
            ))
        })
        .collect();
    let federation = async move {
        for p in pollers {
            let _ = p.await;
        }
    };
    let (metrics_addr, metrics_server) = match config.metrics_bind {
        Some(addr) => {
            let (bound, serving) = crate::metrics::serve(addr, probes, shutdown_rx.clone())
                .await
                .map_err(|e| ServerError::Bind {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
            (Some(bound), Some(serving))
        }
        None => (None, None),
    };
    let metrics_task = async move {
        if let Some(m) = metrics_server {
            m.await;
        }
    };
    let follower = follow_authorities(
        state_for_follow,
        Followers {
            node_tls: tls_tx,
            spiffe_tls: spiffe_tls_tx,
            bundle: bundle_tx,
            document: document_tx,
        },
        shutdown_rx.clone(),
    );
    let datastore = follow_datastore(state_for_compaction.clone(), shutdown_rx.clone());
    let presence = presence::publish(state_for_compaction.clone(), shutdown_rx.clone());
    let compactor = compact_events(state_for_compaction, shutdown_rx.clone());
    let rotator = rotate_authorities(
        state_for_rotation,
        rotation_interval(config.ca_ttl),
        shutdown_rx.clone(),
    );
    let task = tokio::spawn(async move {
        let ext_authz = async {
            match ext_authz_server {
                Some(s) => s.await,
                None => Ok(()),
            }
        };
        let bundle_endpoint = async {
            if let Some(s) = bundle_server {
                s.await;
            }
        };
        // The background jobs end on shutdown too, and are awaited, so the
        // store is closed when the server says it stopped.
        let ((), (), (), (), node, admin, authz, (), (), (), (), (), ()) = tokio::join!(
            readiness,
            sync_hub,
            datastore,
            presence,
            node_server,
            admin_server,
            ext_authz,
            compactor,
            follower,
            rotator,
            bundle_endpoint,
            federation,
            metrics_task
        );
        stream_tasks.close();
        stream_tasks.wait().await;
        node.and(admin)
            .and(authz)
            .map_err(|e| ServerError::Transport(e.to_string()))
    });
    tracing::info!(
        trust_domain = %config.trust_domain,
        node_api = %node_addr,
        admin_socket = %config.admin_socket.display(),
        data_dir = %config.data_dir.display(),
        "sigil server ready"
    );
    Ok(ServerHandle {
        node_addr,
        ext_authz_addr,
        bundle_addr,
        metrics_addr,
        admin_socket: config.admin_socket,
        bundle_pem,
        trust_domain: config.trust_domain,
        shutdown: shutdown_tx,
        task,
    })
}
