//! The command line: clap definitions and dispatch. `anyhow` is used only
//! here and in `main.rs`.

mod admin;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{LogFormat, RawConfig};
use crate::server::{SERVER_KEYS, ServerConfig};

pub use admin::{Output, connect_admin};

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
    Server(ServerArgs),
    /// Join tokens for agent attestation.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Registration entries.
    Entry {
        #[command(subcommand)]
        cmd: admin::EntryCmd,
    },
    /// Attested agents.
    Agent {
        #[command(subcommand)]
        cmd: admin::AgentCmd,
    },
    /// The trust bundle.
    Bundle {
        #[command(subcommand)]
        cmd: admin::BundleCmd,
    },
    /// Operator-minted X509-SVIDs.
    X509 {
        #[command(subcommand)]
        cmd: admin::X509Cmd,
    },
    /// Operator-minted JWT-SVIDs.
    Jwt {
        #[command(subcommand)]
        cmd: admin::JwtCmd,
    },
    /// Exit 0 when the server answers on its admin socket.
    Healthcheck(admin::AdminArgs),
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Generate a single-use join token.
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
    /// PEM CA bundle that x509pop agent certificates must chain to.
    #[arg(long)]
    x509pop_ca: Option<String>,
    /// Key algorithm of new authorities: ec-p256 or ec-p384 [default: ec-p256].
    #[arg(long)]
    key_algorithm: Option<String>,
}

impl ServerArgs {
    fn into_config(self) -> anyhow::Result<ServerConfig> {
        let mut raw = RawConfig::load(self.config.as_deref(), SERVER_KEYS)?;
        raw.flag("trust_domain", self.trust_domain);
        raw.flag("data_dir", self.data_dir);
        raw.flag("bind", self.bind);
        raw.flag("admin_socket", self.admin_socket);
        raw.flag("kek_file", self.kek_file);
        raw.flag("log_format", self.log_format);
        raw.flag("ca_ttl", self.ca_ttl);
        raw.flag("default_x509_ttl", self.default_x509_ttl);
        raw.flag("default_jwt_ttl", self.default_jwt_ttl);
        raw.flag("agent_ttl", self.agent_ttl);
        raw.flag("x509pop_ca", self.x509pop_ca);
        raw.flag("key_algorithm", self.key_algorithm);
        Ok(ServerConfig::from_raw(&raw)?)
    }
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

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SIGIL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// How long in-flight RPCs get to finish after SIGINT/SIGTERM.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

async fn run_server(config: ServerConfig) -> anyhow::Result<()> {
    init_tracing(config.log_format);
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
            let config = args.into_config()?;
            runtime()?.block_on(run_server(config))
        }
        Command::Token {
            cmd: TokenCmd::Generate { ttl, admin },
        } => runtime()?.block_on(admin::token_generate(&admin, &ttl)),
        Command::Entry { cmd } => runtime()?.block_on(admin::entry(cmd)),
        Command::Agent { cmd } => runtime()?.block_on(admin::agent(cmd)),
        Command::Bundle { cmd } => runtime()?.block_on(admin::bundle(cmd)),
        Command::X509 { cmd } => runtime()?.block_on(admin::x509(cmd)),
        Command::Jwt { cmd } => runtime()?.block_on(admin::jwt(cmd)),
        Command::Healthcheck(args) => runtime()?.block_on(admin::healthcheck(&args)),
    }
}
