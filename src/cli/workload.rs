//! `sigil workload ...`: a Workload API client that honours
//! `SPIFFE_ENDPOINT_SOCKET`, for scripts and for checking an agent by hand.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use tonic::transport::Channel;

use super::OutputFormat;
use super::admin::Output;
use crate::agent::DEFAULT_SOCKET;
use crate::proto::workload::{self as pw, spiffe_workload_api_client::SpiffeWorkloadApiClient};
use crate::workload_api::HEADER;
use crate::x509::{PrivateKey, certs_to_pem};

/// Where the Workload API is and how to print.
#[derive(Debug, Args, Clone)]
pub struct WorkloadArgs {
    /// The socket, as a path or unix:///path [default: $SPIFFE_ENDPOINT_SOCKET, else /tmp/sigil-agent/public/api.sock].
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

/// `sigil workload ...`
#[derive(Debug, Subcommand)]
pub enum WorkloadCmd {
    /// Fetch this process's X509-SVIDs (and write them with --out).
    #[command(
        after_help = "Example:\n  SPIFFE_ENDPOINT_SOCKET=unix:///tmp/sigil-agent/public/api.sock sigil workload fetch-x509 --out ./svid"
    )]
    FetchX509 {
        /// Write svid.pem, svid.key (0600) and bundle.pem here.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        args: WorkloadArgs,
    },
    /// Fetch a JWT-SVID.
    #[command(after_help = "Example:\n  sigil workload fetch-jwt --audience db --output json")]
    FetchJwt {
        /// Audience (repeatable).
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        /// Only this SPIFFE ID (default: every identity).
        #[arg(long)]
        spiffe_id: Option<String>,
        #[command(flatten)]
        args: WorkloadArgs,
    },
    /// Validate a JWT-SVID against the trust domain's JWT bundle.
    #[command(after_help = "Example:\n  sigil workload validate-jwt --audience db \"$TOKEN\"")]
    ValidateJwt {
        /// The audience the token must carry.
        #[arg(long)]
        audience: String,
        /// The token.
        token: String,
        #[command(flatten)]
        args: WorkloadArgs,
    },
    /// Print every X509-SVID update as it is pushed.
    #[command(after_help = "Example:\n  sigil workload watch --output json")]
    Watch(WorkloadArgs),
}

/// The socket path from a flag value or `SPIFFE_ENDPOINT_SOCKET` (`unix:///p`, `unix:/p` or a path).
pub fn socket_path(value: Option<&str>) -> anyhow::Result<PathBuf> {
    let v = value.unwrap_or(DEFAULT_SOCKET);
    let path = v
        .strip_prefix("unix://")
        .or_else(|| v.strip_prefix("unix:"))
        .unwrap_or(v);
    if v.starts_with("tcp:") {
        bail!("{v:?}: only unix sockets are supported");
    }
    if !path.starts_with('/') {
        bail!(
            "{v:?}: the socket must be an absolute path (e.g. unix:///tmp/sigil-agent/public/api.sock)"
        );
    }
    Ok(PathBuf::from(path))
}

/// Connects to a Workload API socket.
pub async fn connect(path: &Path) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    let channel = super::unix_channel(path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to the Workload API at {} (is the agent running?): {}",
            path.display(),
            crate::agent::error_chain(&e)
        )
    })?;
    Ok(SpiffeWorkloadApiClient::new(channel))
}

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(HEADER, tonic::metadata::MetadataValue::from_static("true"));
    r
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

fn split_certs(concat: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = concat;
    while !rest.is_empty() {
        match x509_parser::parse_x509_certificate(rest) {
            Ok((tail, _)) => {
                out.push(rest[..rest.len() - tail.len()].to_vec());
                rest = tail;
            }
            Err(_) => break,
        }
    }
    out
}

fn describe(svid: &pw::X509svid) -> serde_json::Value {
    let expires = split_certs(&svid.x509_svid).first().and_then(|c| {
        x509_parser::parse_x509_certificate(c)
            .ok()
            .map(|(_, x)| super::admin::rfc3339(x.validity().not_after.timestamp()))
    });
    json!({ "spiffe_id": svid.spiffe_id, "hint": svid.hint, "expires_at": expires })
}

/// Runs a `sigil workload` command.
pub async fn run(cmd: WorkloadCmd) -> anyhow::Result<()> {
    match cmd {
        WorkloadCmd::FetchX509 { out, args } => {
            let mut c = connect(&socket_path(args.socket.as_deref())?).await?;
            let mut stream = c
                .fetch_x509svid(request(pw::X509svidRequest {}))
                .await
                .map_err(status)?
                .into_inner();
            let resp = stream
                .message()
                .await
                .map_err(status)?
                .context("the agent sent no SVID")?;
            let first = resp.svids.first().context("the agent sent no SVID")?;
            if let Some(dir) = out {
                let key = PrivateKey::from_pkcs8_der(&first.x509_svid_key)?;
                super::write_svid_files(
                    &dir,
                    &certs_to_pem(&split_certs(&first.x509_svid)),
                    &key.to_pem(),
                    &certs_to_pem(&split_certs(&first.bundle)),
                )?;
                // The default SVID is svid.pem; every other one is
                // svid.<hint or index>.pem with its key beside it.
                for (i, s) in resp.svids.iter().enumerate().skip(1) {
                    let name: String = if s.hint.is_empty() {
                        i.to_string()
                    } else {
                        s.hint
                            .chars()
                            .map(|c| {
                                if c.is_ascii_alphanumeric() || "-_".contains(c) {
                                    c
                                } else {
                                    '_'
                                }
                            })
                            .collect()
                    };
                    let key = PrivateKey::from_pkcs8_der(&s.x509_svid_key)?;
                    for (file, data, mode) in [
                        (format!("svid.{name}.key"), key.to_pem().to_string(), 0o600),
                        (
                            format!("svid.{name}.pem"),
                            certs_to_pem(&split_certs(&s.x509_svid)),
                            0o644,
                        ),
                    ] {
                        let path = dir.join(&file);
                        crate::runtime::files::write_atomic(&path, data.as_bytes(), mode)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                    }
                }
            }
            match args.output {
                OutputFormat::Json => Output::json(&serde_json::Value::Array(
                    resp.svids.iter().map(describe).collect(),
                )),
                OutputFormat::Text => {
                    let lines: Vec<String> = resp
                        .svids
                        .iter()
                        .map(|s| {
                            format!(
                                "SPIFFE ID: {}  expires_at: {}",
                                s.spiffe_id,
                                describe(s)["expires_at"].as_str().unwrap_or_default()
                            )
                        })
                        .collect();
                    Output::line(&lines.join("\n"))
                }
            }
        }
        WorkloadCmd::FetchJwt {
            audience,
            spiffe_id,
            args,
        } => {
            let mut c = connect(&socket_path(args.socket.as_deref())?).await?;
            let r = c
                .fetch_jwtsvid(request(pw::JwtsvidRequest {
                    audience,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                }))
                .await
                .map_err(status)?
                .into_inner();
            match args.output {
                OutputFormat::Json => Output::json(&serde_json::Value::Array(
                    r.svids.iter().map(|s| json!({ "spiffe_id": s.spiffe_id, "token": s.svid, "hint": s.hint })).collect(),
                )),
                OutputFormat::Text => {
                    let lines: Vec<String> = r
                        .svids
                        .iter()
                        .map(|s| format!("SPIFFE ID: {}\nToken: {}", s.spiffe_id, s.svid))
                        .collect();
                    Output::line(&lines.join("\n"))
                }
            }
        }
        WorkloadCmd::ValidateJwt {
            audience,
            token,
            args,
        } => {
            let mut c = connect(&socket_path(args.socket.as_deref())?).await?;
            let r = c
                .validate_jwtsvid(request(pw::ValidateJwtsvidRequest {
                    audience,
                    svid: token,
                }))
                .await
                .map_err(status)?
                .into_inner();
            match args.output {
                OutputFormat::Json => {
                    Output::json(&json!({ "valid": true, "spiffe_id": r.spiffe_id }))
                }
                OutputFormat::Text => Output::line(&format!("Valid JWT-SVID for {}", r.spiffe_id)),
            }
        }
        WorkloadCmd::Watch(args) => {
            // Runs until interrupted: when the agent goes away (restart,
            // crash), says so on stderr and reconnects with backoff.
            let path = socket_path(args.socket.as_deref())?;
            let mut backoff = crate::runtime::backoff::Backoff::new(
                std::time::Duration::from_millis(200),
                std::time::Duration::from_secs(10),
            );
            loop {
                let ended = watch_once(&path, args.output).await;
                let why = match ended {
                    Ok(()) => "the agent closed the stream".to_string(),
                    Err(e) => format!("{e:#}"),
                };
                let delay = backoff.next_delay();
                let _ = writeln!(
                    std::io::stderr(),
                    "watch: {why}; reconnecting in {:.1}s",
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One watch session: prints every update until the stream ends.
async fn watch_once(path: &std::path::Path, output: OutputFormat) -> anyhow::Result<()> {
    let mut c = connect(path).await?;
    let mut stream = c
        .fetch_x509svid(request(pw::X509svidRequest {}))
        .await
        .map_err(status)?
        .into_inner();
    while let Some(resp) = stream.message().await.map_err(status)? {
        let svids: Vec<serde_json::Value> = resp.svids.iter().map(describe).collect();
        match output {
            OutputFormat::Json => Output::line(&serde_json::to_string(&svids)?)?,
            OutputFormat::Text => {
                let ids: Vec<String> = svids
                    .iter()
                    .map(|s| {
                        format!(
                            "{} (expires_at {})",
                            s["spiffe_id"].as_str().unwrap_or_default(),
                            s["expires_at"].as_str().unwrap_or_default()
                        )
                    })
                    .collect();
                Output::line(&format!("update: {}", ids.join(", ")))?;
            }
        }
    }
    Ok(())
}
