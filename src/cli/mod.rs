//! The command line: clap definitions and dispatch. `anyhow` is used only
//! here and in `main.rs`.

mod admin;
mod dev;
mod policy;
mod workload;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::agent::{AGENT_KEYS, AgentConfig};
use crate::config::{LogFormat, RawConfig};
use crate::server::{SERVER_KEYS, ServerConfig};

pub use admin::{Output, connect_admin};
pub use workload::{connect as connect_workload, socket_path};

/// Sigil: a SPIFFE certificate authority.
#[derive(Debug, Parser)]
#[command(name = "sigil", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: CA, registry, node API and admin API.
    #[command(
        after_help = "Examples:\n  sigil server --trust-domain example.org --data-dir /var/lib/sigil\n  sigil server --config /etc/sigil/server.toml --validate\n  sigil server --config server.toml --metrics-bind 127.0.0.1:9091 --bundle-bind 0.0.0.0:8443"
    )]
    Server(Box<ServerArgs>),
    /// Join tokens for agent attestation.
    #[command(after_help = "Example:\n  sigil token generate --ttl 10m")]
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Registration entries.
    #[command(
        after_help = "Examples:\n  sigil entry create --spiffe-id spiffe://example.org/web \\\n      --parent-id spiffe://example.org/sigil/agent/join_token/ID --selector unix:uid:1000\n  sigil entry show --spiffe-id spiffe://example.org/web --output json\n  sigil entry update --id ID --jwt-ttl 10m\n  sigil entry delete --id ID"
    )]
    Entry {
        #[command(subcommand)]
        cmd: admin::EntryCmd,
    },
    /// Run the agent (with --server ...), or manage agents (list, ban, evict).
    #[command(
        args_conflicts_with_subcommands = true,
        after_help = "Examples:\n  sigil agent --server 127.0.0.1:8081 --trust-bundle bundle.pem --join-token-file token\n  sigil agent --config /etc/sigil/agent.toml --validate\n  sigil agent list\n  sigil agent ban spiffe://example.org/sigil/agent/join_token/ID"
    )]
    Agent {
        #[command(subcommand)]
        cmd: Option<admin::AgentCmd>,
        #[command(flatten)]
        run: Box<AgentArgs>,
    },
    /// A server and an agent in one process, registering the calling user.
    #[command(
        after_help = "Example:\n  sigil dev --data-dir .sigil/dev --trust-domain example.org"
    )]
    Dev(dev::DevArgs),
    /// Istio-style authorization policies.
    #[command(
        after_help = "Example:\n  sigil policy check --policy-dir ./policies --principal spiffe://cluster.local/ns/foo/sa/sleep \\\n      --destination spiffe://cluster.local/ns/foo/sa/httpbin --method GET --path /api"
    )]
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// A Workload API client (honours SPIFFE_ENDPOINT_SOCKET).
    #[command(
        after_help = "Examples:\n  sigil workload fetch-x509 --out ./svid\n  sigil workload fetch-jwt --audience db\n  sigil workload validate-jwt --audience db TOKEN\n  sigil workload watch"
    )]
    Workload {
        #[command(subcommand)]
        cmd: workload::WorkloadCmd,
    },
    /// Trust bundles: this trust domain's and federated ones.
    #[command(
        after_help = "Examples:\n  sigil bundle show --format jwks\n  sigil bundle list\n  sigil bundle set --trust-domain other.org --file other.json\n  sigil bundle delete --trust-domain other.org"
    )]
    Bundle {
        #[command(subcommand)]
        cmd: admin::BundleCmd,
    },
    /// CA authorities: show, prepare, activate, taint, revoke.
    #[command(
        after_help = "Examples:\n  sigil ca show --output json\n  sigil ca prepare --kind x509 && sigil ca activate --kind x509\n  sigil ca taint ID && sigil ca revoke ID"
    )]
    Ca {
        #[command(subcommand)]
        cmd: admin::CaCmd,
    },
    /// Operator-minted X509-SVIDs.
    #[command(
        after_help = "Example:\n  sigil x509 mint --spiffe-id spiffe://example.org/batch --ttl 1h --out ./svid"
    )]
    X509 {
        #[command(subcommand)]
        cmd: admin::X509Cmd,
    },
    /// Operator-minted JWT-SVIDs.
    #[command(
        after_help = "Example:\n  sigil jwt mint --spiffe-id spiffe://example.org/batch --audience db"
    )]
    Jwt {
        #[command(subcommand)]
        cmd: admin::JwtCmd,
    },
    /// Exit 0 when the server (admin socket) or an agent (--socket) is ready.
    #[command(
        after_help = "Examples:\n  sigil healthcheck\n  sigil healthcheck --socket /tmp/sigil-agent/public/api.sock --output json"
    )]
    Healthcheck(admin::HealthcheckArgs),
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  sigil completions bash > /etc/bash_completion.d/sigil")]
    Completions {
        /// bash, zsh or fish.
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Generate a single-use join token.
    #[command(after_help = "Example:\n  sigil token generate --ttl 10m --output json")]
    Generate {
        /// How long the token is valid (e.g. 90s, 10m, 1h).
        #[arg(long, default_value = "10m")]
        ttl: String,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
}

/// `sigil server` flags; each has a config-file key of the same name.
#[derive(Debug, Args)]
struct ServerArgs {
    /// TOML config file (keys named like the flags, with `_`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Trust domain, e.g. example.org.
    #[arg(long)]
    trust_domain: Option<String>,
    /// Directory of the sled store [default: .sigil/server].
    #[arg(long)]
    data_dir: Option<String>,
    /// Node API address [default: 127.0.0.1:8081].
    #[arg(long)]
    bind: Option<String>,
    /// Admin API socket [default: /tmp/sigil-server/private/api.sock].
    #[arg(long, env = "SIGIL_ADMIN_SOCKET")]
    admin_socket: Option<String>,
    /// Key-encryption key file, created 0600 if absent [default: DATA_DIR/kek].
    #[arg(long)]
    kek_file: Option<String>,
    /// Shared PostgreSQL datastore, postgres://USER@HOST:PORT/DB (password
    /// from PGPASSWORD), for several servers of one cluster [default: the
    /// embedded store under --data-dir].
    #[arg(long)]
    datastore: Option<String>,
    /// Log format [default: text].
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Lifetime of new CA authorities [default: 24h].
    #[arg(long)]
    ca_ttl: Option<String>,
    /// X509-SVID TTL for entries without one [default: 1h].
    #[arg(long)]
    default_x509_ttl: Option<String>,
    /// JWT-SVID TTL for entries without one [default: 5m].
    #[arg(long)]
    default_jwt_ttl: Option<String>,
    /// Agent SVID TTL [default: 1h].
    #[arg(long)]
    agent_ttl: Option<String>,
    /// `iss` claim of minted JWT-SVIDs (e.g. for RequestAuthentication) [default: none].
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// PEM CA bundle that x509pop agent certificates must chain to.
    #[arg(long)]
    x509pop_ca: Option<String>,
    /// Key algorithm of new authorities: ec-p256 or ec-p384 [default: ec-p256].
    #[arg(long)]
    key_algorithm: Option<String>,
    /// Upstream CA certificate (PEM; may be followed by the chain above it):
    /// Sigil's X.509 authorities become intermediates it signs.
    #[arg(long)]
    upstream_cert: Option<String>,
    /// The upstream CA's private key (PEM, PKCS#8).
    #[arg(long)]
    upstream_key: Option<String>,
    /// The root certificate(s) when the upstream CA is itself an intermediate (PEM).
    #[arg(long)]
    upstream_bundle: Option<String>,
    /// Serve the SPIFFE bundle endpoint (GET /, HTTPS) here, e.g. 127.0.0.1:8443.
    #[arg(long)]
    bundle_bind: Option<String>,
    /// https_spiffe (the server SVID) or https_web (--bundle-cert/--bundle-key) [default: https_spiffe].
    #[arg(long, value_parser = ["https_spiffe", "https_web"])]
    bundle_profile: Option<String>,
    /// PEM certificate chain for --bundle-profile https_web.
    #[arg(long)]
    bundle_cert: Option<String>,
    /// PEM private key for --bundle-profile https_web.
    #[arg(long)]
    bundle_key: Option<String>,
    /// The bundle's spiffe_refresh_hint (and the endpoint's max-age)
    /// [default: 5m, or less for a short ca_ttl].
    #[arg(long)]
    bundle_refresh_hint: Option<String>,
    /// Serve /metrics (Prometheus), /live and /ready here, e.g. 127.0.0.1:9090.
    #[arg(long)]
    metrics_bind: Option<String>,
    /// Log filter: a level (error, warn, info, debug, trace) or directives
    /// such as `info,sigil::audit=warn` [default: info].
    #[arg(long, env = "SIGIL_LOG")]
    log_level: Option<String>,
    /// X509-SVID CSRs and JWT-SVIDs each agent may have signed per second;
    /// above it the server answers RESOURCE_EXHAUSTED with a retry-after
    /// (0: no per-agent limit) [default: 1000].
    #[arg(long)]
    agent_csr_rate: Option<String>,
    /// How many signings an agent may ask for at once (at least 500)
    /// [default: 10000].
    #[arg(long)]
    agent_csr_burst: Option<String>,
    /// The embedded store's page cache in MiB (at least 16; not with
    /// --datastore) [default: sled's, 1024].
    #[arg(long)]
    store_cache_mib: Option<String>,
    /// Check the configuration (reading every file it names), bind nothing, exit.
    #[arg(long)]
    validate: bool,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// The ext_authz flags of `sigil server` and `sigil agent`.
#[derive(Debug, Args)]
struct PolicyArgs {
    /// Serve Envoy ext_authz v3 here [default with --policy-dir: 127.0.0.1:9191].
    #[arg(long)]
    ext_authz_bind: Option<String>,
    /// Directory of Istio-style policy YAML, reloaded on change; turns ext_authz on.
    #[arg(long)]
    policy_dir: Option<String>,
    /// The policies' mesh-wide root namespace [default: istio-system].
    #[arg(long)]
    policy_root_namespace: Option<String>,
    /// PEM CA certificates to trust for jwksUri HTTPS servers, beside the system's.
    #[arg(long)]
    jwks_ca_file: Option<String>,
    /// Proxies in front of Envoy whose X-Forwarded-For entries are trusted for
    /// remote.ip and remoteIpBlocks [default: 0, the peer is the client].
    #[arg(long)]
    policy_trusted_proxies: Option<String>,
}

impl PolicyArgs {
    fn apply(self, raw: &mut RawConfig) {
        raw.flag("ext_authz_bind", self.ext_authz_bind);
        raw.flag("policy_dir", self.policy_dir);
        raw.flag("policy_root_namespace", self.policy_root_namespace);
        raw.flag("jwks_ca_file", self.jwks_ca_file);
        raw.flag("policy_trusted_proxies", self.policy_trusted_proxies);
    }
}

/// What both daemons take besides their own configuration.
struct Run {
    log_filter: String,
    validate: bool,
}

/// `log_level`, checked.
fn log_filter(raw: &RawConfig) -> Result<String, crate::config::ConfigError> {
    let level = raw.get("log_level")?.unwrap_or_else(|| "info".into());
    tracing_subscriber::EnvFilter::try_new(&level).map_err(|e| {
        crate::config::ConfigError::Invalid {
            key: "log_level",
            value: level.clone(),
            reason: format!("{e} (e.g. info, or info,sigil::audit=warn)"),
        }
    })?;
    Ok(level)
}

impl ServerArgs {
    fn into_config(self) -> anyhow::Result<(ServerConfig, Run)> {
        let mut raw = RawConfig::load(self.config.as_deref(), SERVER_KEYS)?;
        raw.flag("trust_domain", self.trust_domain);
        raw.flag("data_dir", self.data_dir);
        raw.flag("bind", self.bind);
        raw.flag("admin_socket", self.admin_socket);
        raw.flag("kek_file", self.kek_file);
        raw.flag("datastore", self.datastore);
        raw.flag("log_format", self.log_format);
        raw.flag("ca_ttl", self.ca_ttl);
        raw.flag("default_x509_ttl", self.default_x509_ttl);
        raw.flag("default_jwt_ttl", self.default_jwt_ttl);
        raw.flag("agent_ttl", self.agent_ttl);
        raw.flag("x509pop_ca", self.x509pop_ca);
        raw.flag("jwt_issuer", self.jwt_issuer);
        raw.flag("key_algorithm", self.key_algorithm);
        raw.flag("upstream_cert", self.upstream_cert);
        raw.flag("upstream_key", self.upstream_key);
        raw.flag("upstream_bundle", self.upstream_bundle);
        raw.flag("bundle_bind", self.bundle_bind);
        raw.flag("bundle_profile", self.bundle_profile);
        raw.flag("bundle_cert", self.bundle_cert);
        raw.flag("bundle_key", self.bundle_key);
        raw.flag("bundle_refresh_hint", self.bundle_refresh_hint);
        raw.flag("metrics_bind", self.metrics_bind);
        raw.flag("log_level", self.log_level);
        raw.flag("agent_csr_rate", self.agent_csr_rate);
        raw.flag("agent_csr_burst", self.agent_csr_burst);
        raw.flag("store_cache_mib", self.store_cache_mib);
        self.policy.apply(&mut raw);
        let run = Run {
            log_filter: log_filter(&raw)?,
            validate: self.validate,
        };
        Ok((ServerConfig::from_raw(&raw)?, run))
    }
}

/// `sigil agent` flags; each has a config-file key of the same name.
#[derive(Debug, Args)]
struct AgentArgs {
    /// TOML config file (keys named like the flags, with `_`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The server's node API, HOST:PORT; repeat it for several servers of
    /// one cluster (the agent uses one and fails over to the next).
    #[arg(long)]
    server: Vec<String>,
    /// PEM bundle to trust the server with on first contact.
    #[arg(long)]
    trust_bundle: Option<String>,
    /// Trust domain [default: from the trust bundle's CA].
    #[arg(long)]
    trust_domain: Option<String>,
    /// Attest with this single-use join token (visible in the process list:
    /// prefer --join-token-file or the environment).
    #[arg(long, env = "SIGIL_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Attest with the join token read from this file.
    #[arg(long)]
    join_token_file: Option<String>,
    /// Attest with x509pop: the node certificate chain (PEM).
    #[arg(long)]
    x509pop_cert: Option<String>,
    /// Attest with x509pop: the node certificate's key (PEM).
    #[arg(long)]
    x509pop_key: Option<String>,
    /// Workload API socket [default: /tmp/sigil-agent/public/api.sock].
    #[arg(long)]
    socket: Option<String>,
    /// Where the agent keeps its identity [default: .sigil/agent].
    #[arg(long)]
    data_dir: Option<String>,
    /// Log format [default: text].
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Add unix:sha256 selectors (hashes the caller's executable).
    #[arg(long)]
    unix_sha256: bool,
    /// Serve /metrics (Prometheus), /live and /ready here, e.g. 127.0.0.1:9090.
    #[arg(long)]
    metrics_bind: Option<String>,
    /// Log filter: a level (error, warn, info, debug, trace) or directives
    /// such as `info,sigil::audit=warn` [default: info].
    #[arg(long, env = "SIGIL_LOG")]
    log_level: Option<String>,
    /// Cache at most this many X509-SVIDs: connected workloads' always, the
    /// rest most recently used first; others are signed when a workload
    /// asks [default: no limit].
    #[arg(long)]
    svid_cache_max: Option<String>,
    /// Ping the server this often over the agent's connection; an unanswered
    /// ping (for as long, at most 20s) drops it and the agent reconnects
    /// [default: 30s].
    #[arg(long)]
    server_keepalive: Option<String>,
    /// Fetch every entry from the server again this often, instead of
    /// resuming from the last change seen [default: 30m].
    #[arg(long)]
    full_sync_interval: Option<String>,
    /// Check the configuration (reading every file it names), bind nothing, exit.
    #[arg(long)]
    validate: bool,
    #[command(flatten)]
    policy: PolicyArgs,
}

impl AgentArgs {
    fn into_config(self) -> anyhow::Result<(AgentConfig, Run)> {
        let mut raw = RawConfig::load(self.config.as_deref(), AGENT_KEYS)?;
        raw.flag(
            "server",
            (!self.server.is_empty()).then(|| self.server.join(",")),
        );
        raw.flag("trust_bundle", self.trust_bundle);
        raw.flag("trust_domain", self.trust_domain);
        raw.flag("join_token", self.join_token);
        raw.flag("join_token_file", self.join_token_file);
        raw.flag("x509pop_cert", self.x509pop_cert);
        raw.flag("x509pop_key", self.x509pop_key);
        raw.flag("socket", self.socket);
        raw.flag("data_dir", self.data_dir);
        raw.flag("log_format", self.log_format);
        raw.flag("unix_sha256", self.unix_sha256.then(|| "true".to_string()));
        raw.flag("metrics_bind", self.metrics_bind);
        raw.flag("log_level", self.log_level);
        raw.flag("svid_cache_max", self.svid_cache_max);
        raw.flag("server_keepalive", self.server_keepalive);
        raw.flag("full_sync_interval", self.full_sync_interval);
        self.policy.apply(&mut raw);
        let run = Run {
            log_filter: log_filter(&raw)?,
            validate: self.validate,
        };
        Ok((AgentConfig::from_raw(&raw)?, run))
    }
}

async fn run_agent(config: AgentConfig, log_filter: &str) -> anyhow::Result<()> {
    init_tracing(config.log_format, log_filter);
    let handle = crate::agent::start(config).await?;
    shutdown_signal().await?;
    tracing::info!("shutdown signal received; stopping");
    handle.shutdown(DRAIN_LIMIT).await;
    Ok(())
}

/// A gRPC channel over a Unix socket.
pub async fn unix_channel(
    path: &std::path::Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://sigil.local")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

/// Writes a file readable only by its owner (keys).
/// Writes an SVID's files into `dir`: `svid.pem` and `bundle.pem` (0644) and
/// `svid.key` (0600 whatever was there before), each replaced atomically.
pub(crate) fn write_svid_files(
    dir: &std::path::Path,
    svid_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> anyhow::Result<()> {
    use crate::runtime::files::write_atomic;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, data, mode) in [
        ("svid.key", key_pem, 0o600),
        ("svid.pem", svid_pem, 0o644),
        ("bundle.pem", bundle_pem, 0o644),
    ] {
        let path = dir.join(name);
        write_atomic(&path, data.as_bytes(), mode)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Output format of admin commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Human-readable.
    #[default]
    Text,
    /// JSON.
    Json,
}

/// Logs to stderr in `format`, filtered by `filter` (checked already).
pub(crate) fn init_tracing(format: LogFormat, filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub(crate) async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// How long in-flight RPCs get to finish after SIGINT/SIGTERM.
pub(crate) const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

async fn run_server(config: ServerConfig, log_filter: &str) -> anyhow::Result<()> {
    init_tracing(config.log_format, log_filter);
    let mut handle = crate::server::start(config).await?;
    tokio::select! {
        r = shutdown_signal() => {
            r?;
            tracing::info!("shutdown signal received; draining");
            handle.shutdown(DRAIN_LIMIT).await?;
        }
        r = handle.wait() => r?,
    }
    Ok(())
}

/// Parses the command line and runs it. Configuration is validated before
/// the runtime starts.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
    };
    match cli.command {
        Command::Server(args) => {
            let (config, run) = args.into_config()?;
            if run.validate {
                return admin::Output::line(&format!(
                    "configuration OK: server for {} (node API {}, data in {})",
                    config.trust_domain,
                    config.bind,
                    config.datastore.as_deref().map_or_else(
                        || config.data_dir.display().to_string(),
                        crate::store::redact
                    )
                ));
            }
            runtime()?.block_on(run_server(config, &run.log_filter))
        }
        Command::Token {
            cmd: TokenCmd::Generate { ttl, admin },
        } => runtime()?.block_on(admin::token_generate(&admin, &ttl)),
        Command::Entry { cmd } => runtime()?.block_on(admin::entry(cmd)),
        Command::Agent { cmd: Some(cmd), .. } => runtime()?.block_on(admin::agent(cmd)),
        Command::Agent { cmd: None, run } => {
            let (config, run) = run.into_config()?;
            if run.validate {
                return admin::Output::line(&format!(
                    "configuration OK: agent of {} (server {}, socket {})",
                    config.trust_domain,
                    config.servers.join(", "),
                    config.socket.display()
                ));
            }
            runtime()?.block_on(run_agent(config, &run.log_filter))
        }
        Command::Dev(args) => runtime()?.block_on(dev::run(args)),
        Command::Workload { cmd } => runtime()?.block_on(workload::run(cmd)),
        Command::Policy { cmd } => runtime()?.block_on(policy::run(cmd)),
        Command::Bundle { cmd } => runtime()?.block_on(admin::bundle(cmd)),
        Command::Ca { cmd } => runtime()?.block_on(admin::ca(cmd)),
        Command::X509 { cmd } => runtime()?.block_on(admin::x509(cmd)),
        Command::Jwt { cmd } => runtime()?.block_on(admin::jwt(cmd)),
        Command::Healthcheck(args) => runtime()?.block_on(admin::healthcheck(&args)),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let shell = match shell.as_str() {
                "zsh" => clap_complete::Shell::Zsh,
                "fish" => clap_complete::Shell::Fish,
                _ => clap_complete::Shell::Bash,
            };
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sigil", &mut out);
            admin::Output::line(String::from_utf8_lossy(&out).trim_end())
        }
    }
}
