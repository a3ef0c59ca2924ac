//! `sigil policy check`: evaluates one request offline against a policy
//! directory and prints the decision with its explanation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::OutputFormat;
use super::admin::Output;
use crate::policy::{Evaluator, RemoteJwks, Request, load_ca_file, load_dir, split_path_query};
use crate::spiffe::SpiffeId;

/// `sigil policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Decide one request offline and explain the decision.
    #[command(
        after_help = "Example:\n  sigil policy check --policy-dir ./policies --principal spiffe://cluster.local/ns/foo/sa/sleep --destination spiffe://cluster.local/ns/foo/sa/httpbin --label app=httpbin --method GET --path /status/200"
    )]
    Check(CheckArgs),
}

/// `sigil policy check` flags.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Directory of policy YAML files.
    #[arg(long)]
    policy_dir: PathBuf,
    /// The caller's SPIFFE ID (omit for a plaintext caller).
    #[arg(long)]
    principal: Option<String>,
    /// The destination workload's SPIFFE ID (its namespace comes from /ns/<ns>/).
    #[arg(long)]
    destination: String,
    /// A destination label, k=v (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// HTTP method.
    #[arg(long)]
    method: String,
    /// HTTP path, with its query string if any.
    #[arg(long)]
    path: String,
    /// HTTP host.
    #[arg(long, default_value = "")]
    host: String,
    /// Destination port.
    #[arg(long)]
    port: Option<u16>,
    /// The caller's IP address.
    #[arg(long)]
    source_ip: Option<std::net::IpAddr>,
    /// A request header, k=v (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// A JWT, sent as `Authorization: Bearer <token>`.
    #[arg(long)]
    jwt: Option<String>,
    /// PEM CA certificates to trust for jwksUri HTTPS servers, beside the system's.
    #[arg(long)]
    jwks_ca_file: Option<PathBuf>,
    /// The mesh-wide root namespace (the same name as the server's flag).
    #[arg(
        long = "policy-root-namespace",
        alias = "root-namespace",
        default_value = "istio-system"
    )]
    root_namespace: String,
    /// The destination's namespace, when its SPIFFE ID has no `/ns/<ns>/`.
    #[arg(long)]
    destination_namespace: Option<String>,
    /// The destination's address (`destination.ip`).
    #[arg(long)]
    destination_ip: Option<std::net::IpAddr>,
    /// Proxies in front whose X-Forwarded-For entries are trusted for
    /// `remote.ip` (give the header with --header x-forwarded-for=...).
    #[arg(long = "policy-trusted-proxies", default_value_t = 0)]
    trusted_proxies: usize,
    /// The trust domain's bundle (SPIFFE JSON or PEM, e.g. from `sigil bundle
    /// show --format jwks`), for jwtRules that rely on its JWT keys.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

fn pairs(
    flag: &str,
    items: &[String],
    lowercase_keys: bool,
) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--{flag} {kv:?}: expected KEY=VALUE"))?;
            if k.is_empty() {
                bail!("--{flag} {kv:?}: empty key");
            }
            let k = if lowercase_keys {
                k.to_ascii_lowercase()
            } else {
                k.to_string()
            };
            Ok((k, v.to_string()))
        })
        .collect()
}

/// Runs `sigil policy ...`.
pub async fn run(cmd: PolicyCmd) -> anyhow::Result<()> {
    let PolicyCmd::Check(a) = cmd;
    let set = load_dir(&a.policy_dir)?;
    let roots = match &a.jwks_ca_file {
        Some(path) => load_ca_file(path)
            .map_err(|e| anyhow::anyhow!("--jwks-ca-file {}: {e}", path.display()))?,
        None => Vec::new(),
    };
    // jwksUri keys are fetched once, here; a failure shows in the decision.
    let jwks = Arc::new(RemoteJwks::new(&roots).map_err(|e| anyhow::anyhow!(e))?);
    jwks.track(&set.remote_jwks_urls());
    jwks.refresh_due().await;
    let principal = a
        .principal
        .as_deref()
        .map(|p| {
            SpiffeId::new(p)
                .map(|id| id.to_string())
                .with_context(|| format!("--principal {p:?}"))
        })
        .transpose()?;
    let destination = SpiffeId::new(&a.destination)
        .with_context(|| format!("--destination {:?}", a.destination))?;
    let (path, query) = split_path_query(&a.path);
    let mut headers = pairs("header", &a.headers, true)?;
    if let Some(token) = a.jwt {
        headers.insert("authorization".into(), format!("Bearer {token}"));
    }
    let remote_ip = crate::policy::remote_from_xff(
        headers.get("x-forwarded-for").map(String::as_str),
        a.trusted_proxies,
    );
    let request = Request {
        source_principal: principal,
        source_ip: a.source_ip,
        remote_ip,
        destination_ip: a.destination_ip,
        destination_ns: a.destination_namespace.clone(),
        destination_principal: Some(destination.to_string()),
        destination_labels: pairs("label", &a.labels, false)?,
        destination_port: a.port,
        method: a.method,
        path: path.clone().unwrap_or_default(),
        path_error: path.err(),
        host: a.host,
        headers,
        query,
        sni: None,
        auth: None,
    };
    let mut evaluator = Evaluator::new(set, a.root_namespace).with_remote_jwks(jwks);
    if let Some(path) = &a.bundle {
        let bundle = crate::server::federation::read_bundle_file(&destination.trust_domain(), path)
            .map_err(|e| anyhow::anyhow!("--bundle {}: {e}", path.display()))?;
        evaluator = evaluator.with_trust_bundle(bundle);
    }
    let d = evaluator.evaluate(&request);
    let printed = match a.output {
        OutputFormat::Json => Output::json(&json!({
            "decision": if d.allow { "allow" } else { "deny" },
            "status": d.status,
            "policy": d.policy,
            "rule": d.rule,
            "audit": d.audit,
            "explanation": d.explanation,
        })),
        OutputFormat::Text => {
            let head = match (&d.policy, d.rule) {
                (Some(p), Some(r)) => format!(
                    "{} ({}) by {p} rule {r}",
                    if d.allow { "ALLOW" } else { "DENY" },
                    d.status
                ),
                _ => format!("{} ({})", if d.allow { "ALLOW" } else { "DENY" }, d.status),
            };
            let mut lines = vec![head];
            lines.extend(d.explanation.iter().map(|e| format!("  - {e}")));
            Output::line(&lines.join("\n"))
        }
    };
    printed?;
    // A deny exits 1, so `policy check` can gate a script (errors exit 2).
    if !d.allow {
        std::process::exit(1);
    }
    Ok(())
}
