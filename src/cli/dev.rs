//! `sigil dev`: a server and an agent in one process on an embedded store,
//! with the calling user registered, for trying Sigil on one machine.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::admin::Output;
use crate::agent::{AgentConfig, Attestation, DEFAULT_SOCKET};
use crate::attest::{current_uid, user_name};
use crate::config::LogFormat;
use crate::proto::admin as pa;
use crate::server::ServerConfig;
use crate::spiffe::TrustDomain;

/// `sigil dev` flags.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the embedded store and the agent identity live.
    #[arg(long, default_value = ".sigil/dev")]
    data_dir: PathBuf,
    /// Workload API socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// The trust domain (a data directory keeps the one it was created with).
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
}

/// Runs the server and agent until SIGINT/SIGTERM.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let log_format: LogFormat = args.log_format.parse().map_err(anyhow::Error::msg)?;
    super::init_tracing(
        log_format,
        &std::env::var("SIGIL_LOG").unwrap_or_else(|_| "info".into()),
    );
    let td = TrustDomain::new(&args.trust_domain)
        .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
    let data_dir = std::path::absolute(&args.data_dir).context("bad --data-dir")?;
    let mut server_config = ServerConfig::local(td.clone(), &data_dir.join("server"));
    server_config.log_format = log_format;
    let server = crate::server::start(server_config).await?;
    let mut admin = super::connect_admin(server.admin_socket()).await?;

    // Reuse the saved agent while its SVID has time left; otherwise (first
    // run, or a run after it expired) attest a new agent with a fresh token, so
    // dev mode always comes back up.
    let agent_dir = data_dir.join("agent");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let saved_agent = crate::agent::saved_identity(&agent_dir, &td)
        .filter(|(_, expires_at)| u64::try_from(*expires_at).unwrap_or(0) > now + 60)
        .map(|(id, _)| id);
    let (agent_id, attestation) = match saved_agent {
        Some(id) => (id, None),
        None => {
            let t = admin
                .generate_token(pa::GenerateTokenRequest { ttl_seconds: 600 })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            (
                crate::spiffe::SpiffeId::new(&t.agent_id)?,
                Some(Attestation::JoinToken(t.token)),
            )
        }
    };

    let uid = current_uid().context("cannot read the current uid from /proc/self/status")?;
    let name: String = user_name(uid)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let workload_id = format!("{}/user/{name}", td.id());
    // Entries of earlier dev agents for the same user are stale: drop them;
    // an entry for this agent is kept (so a restart audits no refused create).
    let selector = format!("unix:uid:{uid}");
    let listed = admin
        .list_entries(pa::ListEntriesRequest {
            spiffe_id: workload_id.clone(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let mut registered = false;
    for e in &listed.entries {
        if e.parent_id == agent_id.as_str() && e.selectors == [selector.clone()] {
            registered = true;
        } else if e.parent_id != agent_id.as_str() {
            admin
                .delete_entry(pa::EntryIdRequest { id: e.id.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        }
    }
    if !registered {
        admin
            .create_entry(pa::EntryParams {
                spiffe_id: workload_id.clone(),
                parent_id: agent_id.to_string(),
                selectors: vec![selector],
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow::anyhow!("cannot register {workload_id}: {}", s.message()))?;
    }

    let agent = crate::agent::start(AgentConfig {
        attestation,
        log_format,
        ..AgentConfig::new(
            vec![server.node_addr().to_string()],
            server.bundle_pem().to_string(),
            td,
            args.socket.clone(),
            agent_dir,
        )
    })
    .await?;

    // Wait until the user's SVID is ready, so the printed command works at once.
    let mut state = agent.state();
    let ready = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if state
                .borrow_and_update()
                .svids
                .iter()
                .any(|s| s.entry.spiffe_id.as_str() == workload_id)
            {
                return;
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    if ready.is_err() {
        tracing::warn!(
            "the SVID for {workload_id} is not ready yet; fetches may fail for a moment"
        );
    }
    let socket = args.socket.display();
    let sigil = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "sigil".into());
    Output::line(&format!(
        "\nSigil dev is running: server on {node}, agent on {socket}.\n\
         Registered {workload_id} for unix:uid:{uid} ({name}).\n\n\
         In another shell:\n\
         \x20 export SPIFFE_ENDPOINT_SOCKET=unix://{socket}\n\
         \x20 {sigil} workload fetch-x509 --out ./svid   # writes svid.pem, svid.key, bundle.pem\n\
         \x20 {sigil} workload fetch-jwt --audience demo\n\n\
         Admin commands: SIGIL_ADMIN_SOCKET={admin_sock} {sigil} entry show\n\
         Stop with Ctrl-C.",
        node = server.node_addr(),
        admin_sock = server.admin_socket().display(),
    ))?;

    super::shutdown_signal().await?;
    tracing::info!("shutting down");
    agent.shutdown(super::DRAIN_LIMIT).await;
    server.shutdown(super::DRAIN_LIMIT).await?;
    Ok(())
}
