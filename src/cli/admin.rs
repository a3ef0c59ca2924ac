//! Admin commands: a client of the server's admin socket, printing text or JSON.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::OutputFormat;
use crate::config::parse_duration;
use crate::proto::admin::{self as pa, admin_client::AdminClient};
use crate::proto::node as pn;
use crate::server::DEFAULT_ADMIN_SOCKET;
use crate::spiffe::TrustDomain;
use crate::x509::{Bundle, PrivateKey, certs_to_pem};

/// Flags every admin command takes.
#[derive(Debug, Args, Clone)]
pub struct AdminArgs {
    /// The server's admin socket.
    #[arg(long, env = "SIGIL_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// `sigil healthcheck`: the server by default, or an agent.
#[derive(Debug, Args, Clone)]
pub struct HealthcheckArgs {
    /// Check the agent serving this Workload API socket instead of the server.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// The fields `entry update` may change: only those given change.
#[derive(Debug, Args, Clone)]
pub struct EntryPatch {
    /// A new SPIFFE ID.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// A new parent.
    #[arg(long)]
    parent_id: Option<String>,
    /// Replace the selectors (repeat for several).
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// X509-SVID TTL, or `default` for the server's default.
    #[arg(long)]
    x509_ttl: Option<String>,
    /// JWT-SVID TTL, or `default` for the server's default.
    #[arg(long)]
    jwt_ttl: Option<String>,
    /// Replace the DNS SANs (repeat for several).
    #[arg(long = "dns-name", conflicts_with = "clear_dns_names")]
    dns_names: Vec<String>,
    /// Remove every DNS SAN.
    #[arg(long)]
    clear_dns_names: bool,
    /// A new hint (`--hint ""` removes it).
    #[arg(long)]
    hint: Option<String>,
    /// Mark (true) or unmark (false) the entry as admin.
    #[arg(long)]
    admin: Option<bool>,
    /// Replace the federated trust domains (repeat for several).
    #[arg(long = "federates-with", conflicts_with = "clear_federates_with")]
    federates_with: Vec<String>,
    /// Remove every federated trust domain.
    #[arg(long)]
    clear_federates_with: bool,
}

impl EntryPatch {
    /// `current` with the given fields changed.
    fn apply(self, current: pn::Entry) -> anyhow::Result<pa::EntryParams> {
        let ttl = |flag: &str, v: Option<String>, old: i64| match v.as_deref() {
            None => Ok(old),
            Some("default") => Ok(0),
            Some(v) => {
                let secs = seconds(flag, Some(&v.to_string()))?;
                anyhow::ensure!(
                    secs > 0,
                    "--{flag} {v:?}: must be greater than zero (or `default`)"
                );
                Ok(secs)
            }
        };
        let changes = self.spiffe_id.is_some()
            || self.parent_id.is_some()
            || !self.selectors.is_empty()
            || self.x509_ttl.is_some()
            || self.jwt_ttl.is_some()
            || !self.dns_names.is_empty()
            || self.clear_dns_names
            || self.hint.is_some()
            || self.admin.is_some()
            || !self.federates_with.is_empty()
            || self.clear_federates_with;
        anyhow::ensure!(
            changes,
            "nothing to update: give at least one field to change (see --help)"
        );
        Ok(pa::EntryParams {
            x509_ttl_seconds: ttl("x509-ttl", self.x509_ttl, current.x509_ttl_seconds)?,
            jwt_ttl_seconds: ttl("jwt-ttl", self.jwt_ttl, current.jwt_ttl_seconds)?,
            spiffe_id: self.spiffe_id.unwrap_or(current.spiffe_id),
            parent_id: self.parent_id.unwrap_or(current.parent_id),
            selectors: if self.selectors.is_empty() {
                current.selectors
            } else {
                self.selectors
            },
            dns_names: match (self.clear_dns_names, self.dns_names.is_empty()) {
                (true, _) => Vec::new(),
                (false, true) => current.dns_names,
                (false, false) => self.dns_names,
            },
            hint: self.hint.unwrap_or(current.hint),
            admin: self.admin.unwrap_or(current.admin),
            federates_with: match (self.clear_federates_with, self.federates_with.is_empty()) {
                (true, _) => Vec::new(),
                (false, true) => current.federates_with,
                (false, false) => self.federates_with,
            },
        })
    }
}

/// Entry fields shared by create and update.
#[derive(Debug, Args, Clone)]
pub struct EntryFields {
    /// The SPIFFE ID to issue.
    #[arg(long)]
    spiffe_id: String,
    /// The agent (parent) allowed to obtain it.
    #[arg(long)]
    parent_id: String,
    /// TYPE:KEY:VALUE, e.g. unix:uid:1000 (repeat for several; all must match).
    #[arg(long = "selector", required = true)]
    selectors: Vec<String>,
    /// X509-SVID TTL (e.g. 1h) [default: server's default_x509_ttl].
    #[arg(long)]
    x509_ttl: Option<String>,
    /// JWT-SVID TTL (e.g. 5m) [default: server's default_jwt_ttl].
    #[arg(long)]
    jwt_ttl: Option<String>,
    /// DNS SAN to add (repeatable).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// Hint passed to workloads.
    #[arg(long, default_value = "")]
    hint: String,
    /// Mark the entry as admin.
    #[arg(long)]
    admin: bool,
    /// A trust domain whose bundle its workloads receive (repeatable).
    #[arg(long = "federates-with")]
    federates_with: Vec<String>,
}

/// `sigil entry ...`
#[derive(Debug, Subcommand)]
pub enum EntryCmd {
    /// Create an entry.
    #[command(
        after_help = "Example:\n  sigil entry create --spiffe-id spiffe://example.org/web --parent-id spiffe://example.org/sigil/agent/join_token/ID --selector unix:uid:1000 --x509-ttl 1h"
    )]
    Create {
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show entries (all of them when no filter is given).
    #[command(
        after_help = "Example:\n  sigil entry show --parent-id spiffe://example.org/sigil/agent/join_token/ID --output json"
    )]
    Show {
        /// Only this entry.
        #[arg(long)]
        id: Option<String>,
        /// Only entries with this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only entries with this parent.
        #[arg(long)]
        parent_id: Option<String>,
        /// Only entries with this selector.
        #[arg(long)]
        selector: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Change some of an entry's fields; the others stay as they are.
    #[command(
        after_help = "Examples:\n  sigil entry update --id ID --jwt-ttl 10m\n  sigil entry update --id ID --dns-name api.example.org --dns-name api\n  sigil entry update --id ID --clear-dns-names --x509-ttl default"
    )]
    Update {
        /// The entry to update.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        patch: EntryPatch,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete an entry.
    #[command(after_help = "Example:\n  sigil entry delete --id ID")]
    Delete {
        /// The entry to delete.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `sigil agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// List attested agents.
    #[command(after_help = "Example:\n  sigil agent list --output json")]
    List(AdminArgs),
    /// Ban an agent: refused at once, streams closed, re-attestation refused.
    #[command(
        after_help = "Example:\n  sigil agent ban spiffe://example.org/sigil/agent/join_token/ID"
    )]
    Ban {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Evict an agent: it must attest again.
    #[command(
        after_help = "Example:\n  sigil agent evict spiffe://example.org/sigil/agent/join_token/ID"
    )]
    Evict {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `sigil bundle ...`
#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Print a trust bundle: the server's own, or a federated one.
    #[command(after_help = "Example:\n  sigil bundle show --format jwks > bundle.json")]
    Show {
        /// A federated trust domain [default: the server's own].
        #[arg(long)]
        trust_domain: Option<String>,
        /// pem (X.509 authorities) or jwks (SPIFFE bundle format).
        #[arg(long, default_value = "pem", value_parser = ["pem", "jwks"])]
        format: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the bundles held: the server's own, then the federated ones.
    #[command(after_help = "Example:\n  sigil bundle list --output json")]
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Set (create or replace) a federated trust domain's bundle by hand.
    #[command(
        after_help = "Example:\n  sigil bundle set --trust-domain other.org --file other.org.json"
    )]
    Set {
        /// The federated trust domain.
        #[arg(long)]
        trust_domain: String,
        /// The bundle file.
        #[arg(long)]
        file: PathBuf,
        /// jwks (SPIFFE bundle JSON) or pem (X.509 authorities only).
        #[arg(long, default_value = "jwks", value_parser = ["jwks", "pem"])]
        format: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a federated trust domain's bundle.
    #[command(after_help = "Example:\n  sigil bundle delete --trust-domain other.org")]
    Delete {
        /// The federated trust domain.
        #[arg(long)]
        trust_domain: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `sigil ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// List the authorities with their state and validity.
    #[command(after_help = "Example:\n  sigil ca show --kind x509 --output json")]
    Show {
        /// Only this kind.
        #[arg(long, value_parser = ["x509", "jwt"])]
        kind: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Create a successor authority, published in the bundle but not signing yet.
    #[command(after_help = "Example:\n  sigil ca prepare --kind x509")]
    Prepare {
        /// Only this kind (default: both).
        #[arg(long, value_parser = ["x509", "jwt"])]
        kind: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make the prepared authority sign; the active one becomes old.
    #[command(after_help = "Example:\n  sigil ca activate --kind x509")]
    Activate {
        /// Only this kind (default: both).
        #[arg(long, value_parser = ["x509", "jwt"])]
        kind: Option<String>,
        /// Even if some recently active agents have not applied the bundle yet.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Mark an old authority compromised (what it signed is replaced).
    #[command(after_help = "Example:\n  sigil ca taint 4f2a...")]
    Taint {
        /// The authority ID (see `sigil ca show`).
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a tainted authority from the bundle everywhere.
    #[command(after_help = "Example:\n  sigil ca revoke 4f2a...")]
    Revoke {
        /// The authority ID (see `sigil ca show`).
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `sigil x509 ...`
#[derive(Debug, Subcommand)]
pub enum X509Cmd {
    /// Mint an X509-SVID and its key (the key is generated by the server and
    /// returned over the admin socket only).
    #[command(
        after_help = "Example:\n  sigil x509 mint --spiffe-id spiffe://example.org/batch --ttl 30m --out ./svid"
    )]
    Mint {
        /// The SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime [default: server's default_x509_ttl].
        #[arg(long)]
        ttl: Option<String>,
        /// DNS SAN (repeatable).
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Write svid.pem, svid.key (0600) and bundle.pem here instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `sigil jwt ...`
#[derive(Debug, Subcommand)]
pub enum JwtCmd {
    /// Mint a JWT-SVID.
    #[command(
        after_help = "Example:\n  sigil jwt mint --spiffe-id spiffe://example.org/batch --audience db --ttl 5m"
    )]
    Mint {
        /// The SPIFFE ID (subject).
        #[arg(long)]
        spiffe_id: String,
        /// Audience (repeatable, at least one).
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        /// Lifetime [default: server's default_jwt_ttl].
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Writes command results to stdout.
pub struct Output;

impl Output {
    pub(crate) fn line(text: &str) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}").context("cannot write to stdout")
    }

    pub(crate) fn json(value: &Value) -> anyhow::Result<()> {
        Self::line(&serde_json::to_string_pretty(value)?)
    }
}

async fn client(args: &AdminArgs) -> anyhow::Result<AdminClient<Channel>> {
    connect_admin(&args.admin_socket).await
}

/// Connects to a server's admin socket.
pub async fn connect_admin(path: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let path = path.to_path_buf();
    if !path.exists() {
        bail!(
            "admin socket {} does not exist: is `sigil server` running? (set --admin-socket or SIGIL_ADMIN_SOCKET)",
            path.display()
        );
    }
    let channel = super::unix_channel(&path).await.map_err(|e| {
        let why = crate::agent::error_chain(&e);
        if why.contains("Connection refused") {
            anyhow::anyhow!(
                "the admin socket {} exists but nothing answers on it: the server that made it has stopped (a stale socket); is `sigil server` running?",
                path.display()
            )
        } else {
            anyhow::anyhow!("cannot connect to the admin socket {}: {why}", path.display())
        }
    })?;
    Ok(AdminClient::new(channel))
}

/// Turns a gRPC status into an error whose text is the server's message.
fn rpc<T>(r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))
}

fn seconds(flag: &str, value: Option<&String>) -> anyhow::Result<i64> {
    value.map_or(Ok(0), |v| {
        let d = parse_duration(v).map_err(|e| anyhow::anyhow!("--{flag} {v:?}: {e}"))?;
        Ok(i64::try_from(d.as_secs())?)
    })
}

fn entry_params(f: &EntryFields) -> anyhow::Result<pa::EntryParams> {
    Ok(pa::EntryParams {
        spiffe_id: f.spiffe_id.clone(),
        parent_id: f.parent_id.clone(),
        selectors: f.selectors.clone(),
        x509_ttl_seconds: seconds("x509-ttl", f.x509_ttl.as_ref())?,
        jwt_ttl_seconds: seconds("jwt-ttl", f.jwt_ttl.as_ref())?,
        dns_names: f.dns_names.clone(),
        hint: f.hint.clone(),
        admin: f.admin,
        federates_with: f.federates_with.clone(),
    })
}

fn entry_json(e: &pn::Entry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors,
        "x509_ttl_seconds": e.x509_ttl_seconds,
        "jwt_ttl_seconds": e.jwt_ttl_seconds,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "admin": e.admin,
        "federates_with": e.federates_with,
    })
}

fn entry_text(e: &pn::Entry) -> String {
    let ttl = |v: i64| {
        if v == 0 {
            "default".to_string()
        } else {
            format!("{v}s")
        }
    };
    let mut s = format!(
        "Entry ID     : {}\nSPIFFE ID    : {}\nParent ID    : {}\nSelectors    : {}\nX509-SVID TTL: {}\nJWT-SVID TTL : {}",
        e.id,
        e.spiffe_id,
        e.parent_id,
        e.selectors.join(", "),
        ttl(e.x509_ttl_seconds),
        ttl(e.jwt_ttl_seconds),
    );
    if !e.dns_names.is_empty() {
        s.push_str(&format!("\nDNS names    : {}", e.dns_names.join(", ")));
    }
    if !e.hint.is_empty() {
        s.push_str(&format!("\nHint         : {}", e.hint));
    }
    if e.admin {
        s.push_str("\nAdmin        : true");
    }
    if !e.federates_with.is_empty() {
        s.push_str(&format!("\nFederates    : {}", e.federates_with.join(", ")));
    }
    s
}

fn print_entries(format: OutputFormat, entries: &[pn::Entry]) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => Output::json(&Value::Array(entries.iter().map(entry_json).collect())),
        OutputFormat::Text => {
            if entries.is_empty() {
                return Output::line("No entries.");
            }
            let text: Vec<String> = entries.iter().map(entry_text).collect();
            Output::line(&text.join("\n\n"))
        }
    }
}

fn agent_json(a: &pa::Agent) -> Value {
    json!({
        "spiffe_id": a.spiffe_id,
        "attestor": a.attestor,
        "selectors": a.selectors,
        "attested_at": a.attested_at,
        "svid_expires_at": rfc3339(a.svid_expires_at),
        "banned": a.banned,
    })
}

fn print_agent(format: OutputFormat, verb: &str, a: &pa::Agent) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => Output::json(&agent_json(a)),
        OutputFormat::Text => Output::line(&format!("{verb} {}", a.spiffe_id)),
    }
}

/// `sigil token generate`.
pub async fn token_generate(args: &AdminArgs, ttl: &str) -> anyhow::Result<()> {
    let ttl_seconds = seconds("ttl", Some(&ttl.to_string()))?;
    let t = rpc(client(args)
        .await?
        .generate_token(pa::GenerateTokenRequest { ttl_seconds })
        .await)?;
    match args.output {
        OutputFormat::Json => Output::json(&json!({
            "token": t.token, "agent_id": t.agent_id, "expires_at": rfc3339(t.expires_at),
        })),
        OutputFormat::Text => Output::line(&format!(
            "Token: {}\nAgent ID: {}\nExpires at: {}",
            t.token,
            t.agent_id,
            rfc3339(t.expires_at)
        )),
    }
}

/// `sigil entry ...`.
pub async fn entry(cmd: EntryCmd) -> anyhow::Result<()> {
    match cmd {
        EntryCmd::Create { fields, admin } => {
            let e = rpc(client(&admin)
                .await?
                .create_entry(entry_params(&fields)?)
                .await)?;
            print_entries(admin.output, std::slice::from_ref(&e))
        }
        EntryCmd::Update { id, patch, admin } => {
            let current = rpc(client(&admin)
                .await?
                .get_entry(pa::EntryIdRequest { id: id.clone() })
                .await)?;
            let req = pa::UpdateEntryRequest {
                id,
                params: Some(patch.apply(current)?),
            };
            let e = rpc(client(&admin).await?.update_entry(req).await)?;
            print_entries(admin.output, std::slice::from_ref(&e))
        }
        EntryCmd::Delete { id, admin } => {
            let r = rpc(client(&admin)
                .await?
                .delete_entry(pa::EntryIdRequest { id })
                .await)?;
            match admin.output {
                OutputFormat::Json => Output::json(&json!({ "deleted": r.id })),
                OutputFormat::Text => Output::line(&format!("Deleted entry {}", r.id)),
            }
        }
        EntryCmd::Show {
            id,
            spiffe_id,
            parent_id,
            selector,
            admin,
        } => {
            let mut c = client(&admin).await?;
            let entries = match id {
                Some(id) => vec![rpc(c.get_entry(pa::EntryIdRequest { id }).await)?],
                None => {
                    let mut req = pa::ListEntriesRequest {
                        spiffe_id: spiffe_id.unwrap_or_default(),
                        parent_id: parent_id.unwrap_or_default(),
                        selector: selector.unwrap_or_default(),
                        ..Default::default()
                    };
                    let mut all = Vec::new();
                    loop {
                        let page = rpc(c.list_entries(req.clone()).await)?;
                        all.extend(page.entries);
                        if page.next_page_token.is_empty() {
                            break all;
                        }
                        req.page_token = page.next_page_token;
                    }
                }
            };
            print_entries(admin.output, &entries)
        }
    }
}

/// `sigil agent list|ban|evict`.
pub async fn agent(cmd: AgentCmd) -> anyhow::Result<()> {
    match cmd {
        AgentCmd::List(admin) => {
            let agents = rpc(client(&admin)
                .await?
                .list_agents(pa::ListAgentsRequest {})
                .await)?
            .agents;
            match admin.output {
                OutputFormat::Json => {
                    Output::json(&Value::Array(agents.iter().map(agent_json).collect()))
                }
                OutputFormat::Text if agents.is_empty() => Output::line("No agents."),
                OutputFormat::Text => {
                    let lines: Vec<String> = agents
                        .iter()
                        .map(|a| {
                            format!(
                                "{}  attestor={} svid_expires_at={}{}",
                                a.spiffe_id,
                                a.attestor,
                                rfc3339(a.svid_expires_at),
                                if a.banned { " BANNED" } else { "" }
                            )
                        })
                        .collect();
                    Output::line(&lines.join("\n"))
                }
            }
        }
        AgentCmd::Ban { spiffe_id, admin } => {
            let a = rpc(client(&admin)
                .await?
                .ban_agent(pa::AgentIdRequest { spiffe_id })
                .await)?;
            print_agent(admin.output, "Banned", &a)
        }
        AgentCmd::Evict { spiffe_id, admin } => {
            let a = rpc(client(&admin)
                .await?
                .evict_agent(pa::AgentIdRequest { spiffe_id })
                .await)?;
            print_agent(admin.output, "Evicted", &a)
        }
    }
}

async fn fetch_bundle(admin: &AdminArgs) -> anyhow::Result<Bundle> {
    fetch_bundle_of(admin, String::new()).await
}

fn parse_bundle(r: pa::GetBundleResponse) -> anyhow::Result<Bundle> {
    let td = TrustDomain::new(&r.trust_domain)?;
    let jwks = String::from_utf8(r.bundle_jwks).context("bundle is not UTF-8")?;
    Ok(Bundle::from_jwks(td, &jwks)?)
}

async fn fetch_bundle_of(admin: &AdminArgs, trust_domain: String) -> anyhow::Result<Bundle> {
    let r = rpc(client(admin)
        .await?
        .get_bundle(pa::GetBundleRequest { trust_domain })
        .await)?;
    parse_bundle(r)
}

fn bundle_summary(b: &Bundle) -> Value {
    json!({
        "trust_domain": b.trust_domain().to_string(),
        "sequence": b.sequence(),
        "x509_authorities": b.x509_authorities().len(),
        "jwt_authorities": b.jwt_authorities().len(),
        "refresh_hint_seconds": b.refresh_hint(),
    })
}

/// `sigil bundle ...`.
pub async fn bundle(cmd: BundleCmd) -> anyhow::Result<()> {
    match cmd {
        BundleCmd::Show {
            trust_domain,
            format,
            admin,
        } => {
            let b = fetch_bundle_of(&admin, trust_domain.unwrap_or_default()).await?;
            let text = if format == "jwks" {
                b.to_jwks()
            } else {
                b.to_pem()
            };
            match admin.output {
                OutputFormat::Json => Output::json(&json!({
                    "trust_domain": b.trust_domain().to_string(),
                    "format": format,
                    "bundle": text,
                })),
                OutputFormat::Text => Output::line(text.trim_end()),
            }
        }
        BundleCmd::List { admin } => {
            let r = rpc(client(&admin)
                .await?
                .list_bundles(pa::ListBundlesRequest {})
                .await)?;
            let bundles = r
                .bundles
                .into_iter()
                .map(parse_bundle)
                .collect::<anyhow::Result<Vec<_>>>()?;
            match admin.output {
                OutputFormat::Json => {
                    Output::json(&Value::Array(bundles.iter().map(bundle_summary).collect()))
                }
                OutputFormat::Text => Output::line(
                    &bundles
                        .iter()
                        .map(|b| {
                            format!(
                                "{:<30} sequence {:<5} {} X.509, {} JWT authorities",
                                b.trust_domain().to_string(),
                                b.sequence(),
                                b.x509_authorities().len(),
                                b.jwt_authorities().len()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                ),
            }
        }
        BundleCmd::Set {
            trust_domain,
            file,
            format,
            admin,
        } => {
            let bundle = std::fs::read(&file)
                .with_context(|| format!("--file {}: cannot read", file.display()))?;
            let r = rpc(client(&admin)
                .await?
                .set_bundle(pa::SetBundleRequest {
                    trust_domain,
                    bundle,
                    format,
                })
                .await)?;
            let b = parse_bundle(r)?;
            match admin.output {
                OutputFormat::Json => Output::json(&bundle_summary(&b)),
                OutputFormat::Text => Output::line(&format!(
                    "Set the bundle of {}: sequence {}, {} X.509 and {} JWT authorities",
                    b.trust_domain(),
                    b.sequence(),
                    b.x509_authorities().len(),
                    b.jwt_authorities().len()
                )),
            }
        }
        BundleCmd::Delete {
            trust_domain,
            admin,
        } => {
            rpc(client(&admin)
                .await?
                .delete_bundle(pa::DeleteBundleRequest {
                    trust_domain: trust_domain.clone(),
                })
                .await)?;
            match admin.output {
                OutputFormat::Json => Output::json(&json!({"deleted": trust_domain})),
                OutputFormat::Text => {
                    Output::line(&format!("Deleted the bundle of {trust_domain}"))
                }
            }
        }
    }
}

/// `sigil ca ...`.
pub async fn ca(cmd: CaCmd) -> anyhow::Result<()> {
    let (admin, response) = match cmd {
        CaCmd::Show { kind, admin } => {
            let req = pa::AuthorityKindRequest {
                kind: kind.unwrap_or_default(),
                force: false,
            };
            let r = rpc(client(&admin).await?.list_authorities(req).await)?;
            (admin, r)
        }
        CaCmd::Prepare { kind, admin } => {
            let req = pa::AuthorityKindRequest {
                kind: kind.unwrap_or_default(),
                force: false,
            };
            let r = rpc(client(&admin).await?.prepare_authority(req).await)?;
            (admin, r)
        }
        CaCmd::Activate { kind, force, admin } => {
            let req = pa::AuthorityKindRequest {
                kind: kind.unwrap_or_default(),
                force,
            };
            let r = rpc(client(&admin).await?.activate_authority(req).await)?;
            (admin, r)
        }
        CaCmd::Taint { id, admin } => {
            let r = rpc(client(&admin)
                .await?
                .taint_authority(pa::AuthorityIdRequest { id })
                .await)?;
            (admin, r)
        }
        CaCmd::Revoke { id, admin } => {
            let r = rpc(client(&admin)
                .await?
                .revoke_authority(pa::AuthorityIdRequest { id })
                .await)?;
            (admin, r)
        }
    };
    match admin.output {
        OutputFormat::Json => Output::json(&json!({
            "authorities": response.authorities.iter().map(|a| json!({
                "kind": a.kind, "id": a.id, "state": a.state,
                "not_before": rfc3339(a.not_before), "not_after": rfc3339(a.not_after),
                "upstream": a.upstream,
            })).collect::<Vec<_>>(),
            "bundle_sequence": response.bundle_sequence,
            "agents": {
                "recent": response.agents_recent,
                "current": response.agents_current,
                "reissuing": response.agents_reissuing,
                "svids_to_reissue": response.svids_to_reissue,
            },
        })),
        OutputFormat::Text => {
            let mut lines: Vec<String> = response
                .authorities
                .iter()
                .map(|a| {
                    format!(
                        "{:<5} {:<9} {}  {} .. {}",
                        a.kind,
                        a.state,
                        a.id,
                        rfc3339(a.not_before),
                        rfc3339(a.not_after)
                    )
                })
                .collect();
            lines.push(format!(
                "bundle sequence {}: {} of {} agents seen in the last hour have it",
                response.bundle_sequence, response.agents_current, response.agents_recent
            ));
            if response.authorities.iter().any(|a| a.state == "tainted") {
                lines.push(match response.agents_reissuing {
                    0 if response.agents_current == response.agents_recent => {
                        "taint: every agent has replaced what the tainted authorities signed".into()
                    }
                    n => format!(
                        "taint: {n} agents still re-issuing ({} SVIDs left), {} not yet heard from",
                        response.svids_to_reissue,
                        response.agents_recent - response.agents_current
                    ),
                });
            }
            Output::line(&lines.join("\n"))
        }
    }
}

/// Seconds since the epoch as RFC 3339 (UTC).
pub(crate) fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// `sigil x509 mint`.
pub async fn x509(cmd: X509Cmd) -> anyhow::Result<()> {
    let X509Cmd::Mint {
        spiffe_id,
        ttl,
        dns_names,
        out,
        admin,
    } = cmd;
    let req = pa::MintX509svidRequest {
        spiffe_id,
        ttl_seconds: seconds("ttl", ttl.as_ref())?,
        dns_names,
    };
    let r = rpc(client(&admin).await?.mint_x509svid(req).await)?;
    let bundle = fetch_bundle(&admin).await?;
    let cert_pem = certs_to_pem(&r.cert_chain);
    let key = PrivateKey::from_pkcs8_der(&r.private_key)?;
    let key_pem = key.to_pem();
    if let Some(dir) = out {
        super::write_svid_files(&dir, &cert_pem, &key_pem, &bundle.to_pem())?;
        return match admin.output {
            OutputFormat::Json => Output::json(&json!({
                "svid": dir.join("svid.pem"), "key": dir.join("svid.key"),
                "bundle": dir.join("bundle.pem"), "expires_at": rfc3339(r.expires_at),
            })),
            OutputFormat::Text => Output::line(&format!(
                "Wrote {0}/svid.pem, {0}/svid.key and {0}/bundle.pem (expires at {1})",
                dir.display(),
                rfc3339(r.expires_at)
            )),
        };
    }
    match admin.output {
        OutputFormat::Json => Output::json(&json!({
            "svid": cert_pem, "key": key_pem.as_str(), "bundle": bundle.to_pem(), "expires_at": rfc3339(r.expires_at),
        })),
        OutputFormat::Text => Output::line(&format!("{cert_pem}{}", key_pem.as_str())),
    }
}

/// `sigil jwt mint`.
pub async fn jwt(cmd: JwtCmd) -> anyhow::Result<()> {
    let JwtCmd::Mint {
        spiffe_id,
        audience,
        ttl,
        admin,
    } = cmd;
    let req = pa::MintJwtsvidRequest {
        spiffe_id,
        audience,
        ttl_seconds: seconds("ttl", ttl.as_ref())?,
    };
    let r = rpc(client(&admin).await?.mint_jwtsvid(req).await)?;
    match admin.output {
        OutputFormat::Json => {
            Output::json(&json!({ "token": r.token, "expires_at": rfc3339(r.expires_at) }))
        }
        OutputFormat::Text => Output::line(&r.token),
    }
}

/// `sigil healthcheck`.
pub async fn healthcheck(args: &HealthcheckArgs) -> anyhow::Result<()> {
    let (status, mut details) = match &args.socket {
        Some(socket) => agent_health(socket).await,
        None => server_health(&args.admin).await,
    };
    details["status"] = json!(status);
    match (args.admin.output, &args.socket, status) {
        (OutputFormat::Json, _, _) => Output::json(&details)?,
        (OutputFormat::Text, Some(s), "SERVING") => {
            Output::line(&format!("Agent is ready ({}).", s.display()))?
        }
        (OutputFormat::Text, None, "SERVING") => Output::line(&format!(
            "Server is ready (trust domain {}).",
            details["trust_domain"].as_str().unwrap_or("")
        ))?,
        (OutputFormat::Text, _, _) => {
            // Not ready is a failure: said on stderr, like every error.
            let _ = writeln!(
                std::io::stderr(),
                "{} is not ready: {}",
                if args.socket.is_some() {
                    "Agent"
                } else {
                    "Server"
                },
                details["reason"].as_str().unwrap_or("unknown")
            );
        }
    }
    if status == "SERVING" {
        Ok(())
    } else {
        std::process::exit(1)
    }
}

/// The server's Health RPC: a store probe, the rotation schedule.
async fn server_health(admin: &AdminArgs) -> (&'static str, Value) {
    let answer = match client(admin).await {
        Ok(mut c) => c.health(pa::HealthRequest {}).await.map_err(|s| {
            (
                if s.code() == tonic::Code::Unavailable {
                    "NOT_SERVING"
                } else {
                    "UNKNOWN"
                },
                s.message().to_string(),
            )
        }),
        Err(e) => Err(("UNKNOWN", format!("{e:#}"))),
    };
    match answer {
        Ok(h) => {
            let h = h.into_inner();
            (
                "SERVING",
                json!({
                    "target": "server",
                    "trust_domain": h.trust_domain,
                    "revision": h.revision,
                    "x509_authority_expires_at": rfc3339(h.x509_authority_expires_at),
                }),
            )
        }
        Err((status, reason)) => (status, json!({"target": "server", "reason": reason})),
    }
}

/// The agent's gRPC health on its Workload API socket.
async fn agent_health(socket: &std::path::Path) -> (&'static str, Value) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let path = socket.display().to_string();
    let checked = match super::unix_channel(socket).await {
        Ok(ch) => tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|s| s.message().to_string()),
        Err(e) => Err(format!("cannot connect to {path}: {e}")),
    };
    match checked.map(|r| r.into_inner().status) {
        Ok(s) if s == ServingStatus::Serving as i32 => {
            ("SERVING", json!({"target": "agent", "socket": path}))
        }
        Ok(_) => (
            "NOT_SERVING",
            json!({"target": "agent", "socket": path, "reason": "the agent reports not serving (no bundle yet, or the server is unreachable and it has no cached SVID)"}),
        ),
        Err(reason) => (
            "UNKNOWN",
            json!({"target": "agent", "socket": path, "reason": reason}),
        ),
    }
}
