//! The node API service: attestation, signing and the push sync stream.
//! Every decision is written to the audit log (target `sigil::audit`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::ServerState;
use super::attestation::{attest, serial_hex};
use super::convert::{status, ts};
use crate::ca::{X509SvidParams, verify_csr};
use crate::proto::node::{self as pn, node_server::Node};
use crate::registry::{Entry, authorize, unix};
use crate::spiffe::SpiffeId;
use crate::store::{EventsSince, Table};
use crate::x509::svid_id;

/// Entries per snapshot page: far below gRPC's 4 MiB message limit.
pub const SNAPSHOT_PAGE: usize = 500;
/// Sync messages stay under this many encoded bytes (gRPC's default limit is 4 MiB).
pub const MAX_SYNC_MESSAGE: usize = 1024 * 1024;
/// Events read per wake-up of a sync stream.
const EVENT_BATCH: usize = 10_000;

type Sender<T> = mpsc::Sender<Result<T, Status>>;

/// SyncEntries streams one agent may hold open at once.
pub const MAX_SYNC_STREAMS_PER_AGENT: usize = 4;

/// One open sync stream of an agent; dropping it frees the place.
struct SyncSlot {
    state: Arc<ServerState>,
    agent: SpiffeId,
}

impl SyncSlot {
    fn take(state: Arc<ServerState>, agent: &SpiffeId) -> Result<Self, Status> {
        let mut open = state.sync_streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(agent.clone()).or_insert(0);
        if *n >= MAX_SYNC_STREAMS_PER_AGENT {
            return Err(Status::resource_exhausted(format!(
                "agent {agent} already has {MAX_SYNC_STREAMS_PER_AGENT} sync streams open"
            )));
        }
        *n += 1;
        drop(open);
        Ok(SyncSlot {
            state,
            agent: agent.clone(),
        })
    }
}

impl Drop for SyncSlot {
    fn drop(&mut self) {
        let mut open = self
            .state
            .sync_streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.agent);
            }
        }
    }
}

/// CSRs in one BatchNewX509SVID request, at most.
pub const MAX_BATCH: usize = 500;

/// Signs one batch (on a signing thread): each item is authorized (the entry
/// is parented to `agent`) and signed on its own. Denials are logged once for
/// the batch, with the first few reasons.
fn sign_batch(
    state: &ServerState,
    agent: &SpiffeId,
    params: &[pn::NewX509svidParams],
) -> Vec<pn::X509svidResult> {
    let now = state.clock.now();
    let mut denied: Vec<(String, String)> = Vec::new();
    // The batch's entries, read together (one trip to a shared datastore).
    let mut ids: Vec<&str> = params.iter().map(|p| p.entry_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let entries: HashMap<&str, Result<Entry, Status>> = match state.registry.entries(&ids) {
        Ok(found) => ids
            .iter()
            .zip(found)
            .map(|(id, e)| (*id, authorize(agent, id, e).map_err(status)))
            .collect(),
        Err(e) => {
            let s = status(e);
            ids.iter().map(|id| (*id, Err(s.clone()))).collect()
        }
    };
    let results = params
        .iter()
        .map(|p| {
            let outcome = entries[p.entry_id.as_str()]
                .clone()
                .and_then(|entry| {
                    let params = X509SvidParams {
                        spiffe_id: entry.spiffe_id.clone(),
                        dns_names: entry.dns_names.clone(),
                        ttl: entry
                            .x509_ttl
                            .map_or(state.options.default_x509_ttl, Duration::from_secs),
                    };
                    state
                        .ca
                        .x509()
                        .issue_from_csr(&p.csr, &params, now)
                        .map_err(status)
                });
            match outcome {
                Ok(svid) => {
                    svid_issued("x509");
                    tracing::info!(target: "sigil::audit", event = "new_x509_svid", caller = %agent, decision = "allow", subject = %svid.spiffe_id(), entry = ?p.entry_id);
                    pn::X509svidResult {
                        entry_id: p.entry_id.clone(),
                        code: 0,
                        message: String::new(),
                        spiffe_id: svid.spiffe_id().to_string(),
                        cert_chain: svid.chain().to_vec(),
                        expires_at: ts(svid.not_after()),
                    }
                }
                Err(s) => {
                    denied.push((p.entry_id.clone(), s.message().to_string()));
                    pn::X509svidResult {
                        entry_id: p.entry_id.clone(),
                        code: s.code() as i32,
                        message: s.message().to_string(),
                        ..Default::default()
                    }
                }
            }
        })
        .collect();
    if !denied.is_empty() {
        let first: Vec<_> = denied.iter().take(5).collect();
        tracing::warn!(target: "sigil::audit", event = "new_x509_svid", caller = %agent, decision = "deny", denied = denied.len(), of = params.len(), first = ?first);
    }
    results
}

/// How long an agent's superseded SVID is still accepted after a renewal, at
/// most (it stops as soon as the agent presents the new one).
const PREVIOUS_SERIAL_GRACE: Duration = Duration::from_secs(5);

/// The node API.
pub struct NodeService {
    state: Arc<ServerState>,
}

impl NodeService {
    /// A service over the shared server state.
    pub fn new(state: Arc<ServerState>) -> Self {
        NodeService { state }
    }
}

/// Counts one signed SVID of `kind` (`x509` or `jwt`).
pub(super) fn svid_issued(kind: &str) {
    crate::metrics::metrics()
        .svids_issued
        .get_or_create(&crate::metrics::label("type", kind))
        .inc();
}

/// The agent behind an mTLS request: who it is, and the SVID it presented.
pub(super) struct Caller {
    id: SpiffeId,
    /// The SVID's expiry (seconds since the epoch).
    not_after: i64,
    /// The SVID's serial (hex): only the agent's current one is accepted.
    serial: String,
}

/// The agent behind an mTLS request: its SVID verified by TLS and still
/// valid, its record present and not banned, and the SVID not superseded.
fn caller<T>(state: &ServerState, req: &Request<T>, rpc: &str) -> Result<Caller, Status> {
    let found = authenticate(state, req);
    if let Err(s) = &found {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let presented = req
            .peer_certs()
            .and_then(|c| c.first().and_then(|l| svid_id(l).ok()))
            .map(|id| id.to_string())
            .unwrap_or_default();
        tracing::warn!(target: "sigil::audit", event = rpc, caller = %peer, subject = %presented, decision = "deny", reason = s.message());
    }
    found
}

fn authenticate<T>(state: &ServerState, req: &Request<T>) -> Result<Caller, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated("this RPC requires the agent SVID as TLS client certificate")
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let id =
        svid_id(leaf).map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    // TLS checks validity only at the handshake; a long-lived connection must
    // not outlive the SVID it was opened with.
    let (not_after, serial) = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| (c.validity().not_after.timestamp(), c.raw_serial_as_string()))
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    let now = i64::try_from(unix(state.clock.now())).unwrap_or(i64::MAX);
    if not_after <= now {
        return Err(Status::unauthenticated(format!(
            "the agent SVID of {id} expired at {not_after}; renew or attest again"
        )));
    }
    // TLS verified the chain against the bundle's roots; an intermediate
    // signed by an upstream root stays valid there after it is revoked.
    if let Some(issuer) = crate::x509::authority_key_id(leaf) {
        let revoked = state
            .ca
            .current()
            .list()
            .iter()
            .any(|a| a.id == issuer && a.state == crate::store::SlotState::Revoked);
        if revoked {
            return Err(Status::unauthenticated(format!(
                "the agent SVID of {id} was signed by revoked authority {issuer}; attest again"
            )));
        }
    }
    state.check_agent(&id, &serial)?;
    Ok(Caller {
        id,
        not_after,
        serial,
    })
}

#[tonic::async_trait]
impl Node for NodeService {
    type AttestAgentStream = ReceiverStream<Result<pn::AttestAgentResponse, Status>>;

    async fn attest_agent(
        &self,
        req: Request<Streaming<pn::AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(2);
        let state = self.state.clone();
        self.state.tasks.spawn(async move {
            let mut tried = "unknown";
            let outcome = attest(&state, &mut inbound, &tx, &mut tried).await;
            let result = if outcome.is_ok() { "allow" } else { "deny" };
            crate::metrics::metrics()
                .attestations
                .get_or_create(&vec![
                    ("attestor", tried.to_string()),
                    ("result", result.to_string()),
                ])
                .inc();
            let reply = match outcome {
                Ok((resp, attestor)) => {
                    let id = resp.spiffe_id.clone();
                    tracing::info!(target: "sigil::audit", event = "attest_agent", caller = %peer, decision = "allow", subject = %id, attestor);
                    Ok(pn::AttestAgentResponse {
                        step: Some(pn::attest_agent_response::Step::Result(resp)),
                    })
                }
                Err(s) => {
                    tracing::warn!(target: "sigil::audit", event = "attest_agent", caller = %peer, decision = "deny", attestor = tried, reason = s.message());
                    Err(s)
                }
            };
            // The agent may have hung up; nothing more to do then.
            let _ = tx.send(reply).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew_agent(
        &self,
        req: Request<pn::RenewAgentRequest>,
    ) -> Result<Response<pn::RenewAgentResponse>, Status> {
        let state = &self.state;
        let id = caller(state, &req, "renew_agent")?.id;
        let csr = verify_csr(&req.get_ref().csr).map_err(status)?;
        let seen = state.registry.agent_snapshot(&id).map_err(status)?;
        let Some(mut record) = seen.record.clone() else {
            return Err(Status::permission_denied(format!(
                "agent {id} is not attested"
            )));
        };
        let svid = state.issue_agent_svid(&csr, &id)?;
        record.svid_expires_at = unix(svid.not_after());
        // The old SVID stays usable only until the agent presents the new one.
        record.previous_serial =
            std::mem::replace(&mut record.svid_serial, serial_hex(svid.cert_der()));
        record.previous_until = unix(state.clock.now()) + PREVIOUS_SERIAL_GRACE.as_secs();
        // Never over a ban or an evict that landed while signing.
        state
            .registry
            .replace_agent(&seen, &record)
            .map_err(status)?;
        tracing::info!(target: "sigil::audit", event = "renew_agent", caller = %id, decision = "allow", expires_at = record.svid_expires_at);
        Ok(Response::new(pn::RenewAgentResponse {
            svid: Some(state.agent_svid(&id, &svid)),
        }))
    }

    async fn batch_new_x509svid(
        &self,
        req: Request<pn::BatchNewX509svidRequest>,
    ) -> Result<Response<pn::BatchNewX509svidResponse>, Status> {
        let state = self.state.clone();
        let agent = caller(&state, &req, "new_x509_svid")?.id;
        let params = req.into_inner().params;
        if params.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "params: {} items; at most {MAX_BATCH} per request",
                params.len()
            )));
        }
        // Queue room first, then the agent's tokens: a refusal by the queue
        // costs the agent nothing.
        let limits = &state.limits;
        let admitted = limits
            .admit(params.len())
            .and_then(|a| {
                limits
                    .take(&agent, params.len(), std::time::Instant::now())
                    .map(|()| a)
            })
            .inspect_err(|s| {
                tracing::warn!(target: "sigil::audit", event = "new_x509_svid", caller = %agent, decision = "deny", csrs = params.len(), reason = s.message());
            })?;
        let signing = state.clone();
        let results = state
            .signers
            .run(move || {
                let started = super::limits::thread_cpu_time();
                let results = sign_batch(&signing, &agent, &params);
                let used = super::limits::thread_cpu_time().saturating_sub(started);
                signing.limits.record(params.len(), used);
                // Its place in the queue is free once signed (or, when the
                // agent has gone, once dropped unsigned).
                drop(admitted);
                results
            })
            .await
            .ok_or_else(|| Status::internal("signing failed; see the server log"))?;
        Ok(Response::new(pn::BatchNewX509svidResponse { results }))
    }

    async fn new_jwtsvid(
        &self,
        req: Request<pn::NewJwtsvidRequest>,
    ) -> Result<Response<pn::NewJwtsvidResponse>, Status> {
        let state = &self.state;
        let agent = caller(state, &req, "new_jwt_svid")?.id;
        let r = req.get_ref();
        let decision = (|| -> Result<pn::NewJwtsvidResponse, Status> {
            state.limits.take(&agent, 1, std::time::Instant::now())?;
            crate::jwt::check_audiences(&r.audience)
                .map_err(|e| Status::invalid_argument(format!("audience: {e}")))?;
            let entry = state
                .registry
                .authorize_agent_entry(&agent, &r.entry_id)
                .map_err(status)?;
            let ttl = entry
                .jwt_ttl
                .map_or(state.options.default_jwt_ttl, Duration::from_secs);
            let now = state.clock.now();
            let token = state
                .ca
                .jwt()
                .mint(
                    &entry.spiffe_id,
                    &r.audience,
                    ttl,
                    now,
                    state.options.jwt_issuer.as_deref(),
                )
                .map_err(status)?;
            let exp = ts(now.checked_add(ttl).unwrap_or(now)).min(ts(state.ca.jwt().not_after()));
            Ok(pn::NewJwtsvidResponse {
                spiffe_id: entry.spiffe_id.to_string(),
                token,
                expires_at: exp,
            })
        })();
        match &decision {
            Ok(resp) => {
                svid_issued("jwt");
                tracing::info!(target: "sigil::audit", event = "new_jwt_svid", caller = %agent, decision = "allow", subject = %resp.spiffe_id, entry = ?r.entry_id, audiences = r.audience.len())
            }
            Err(s) => {
                tracing::warn!(target: "sigil::audit", event = "new_jwt_svid", caller = %agent, decision = "deny", entry = ?r.entry_id, reason = s.message())
            }
        }
        decision.map(Response::new)
    }

    async fn fetch_bundle(
        &self,
        _req: Request<pn::FetchBundleRequest>,
    ) -> Result<Response<pn::FetchBundleResponse>, Status> {
        Ok(Response::new(pn::FetchBundleResponse {
            bundle_jwks: self.state.ca.bundle().to_jwks().into_bytes(),
        }))
    }

    async fn ack_bundle(
        &self,
        req: Request<pn::AckBundleRequest>,
    ) -> Result<Response<pn::AckBundleResponse>, Status> {
        let agent = caller(&self.state, &req, "ack_bundle")?.id;
        let ack = req.get_ref();
        self.state
            .note_agent(&agent, Some((ack.sequence, ack.tainted_svids)));
        Ok(Response::new(pn::AckBundleResponse {}))
    }

    type SyncEntriesStream = ReceiverStream<Result<pn::SyncEntriesResponse, Status>>;

    async fn sync_entries(
        &self,
        req: Request<pn::SyncEntriesRequest>,
    ) -> Result<Response<Self::SyncEntriesStream>, Status> {
        let Caller {
            id: agent,
            not_after: expires,
            serial,
        } = caller(&self.state, &req, "sync_entries")?;
        let resume = req.get_ref().resume_from_revision;
        if let Some(why) = self.state.store_watch.down() {
            return Err(super::store_watch::unavailable(&why));
        }
        let slot = SyncSlot::take(self.state.clone(), &agent)?;
        self.state.note_agent(&agent, None);
        let (tx, rx) = mpsc::channel(8);
        let state = self.state.clone();
        tracing::info!(target: "sigil::audit", event = "sync_entries", caller = %agent, decision = "allow", resume_from = resume);
        self.state.tasks.spawn(async move {
            let _slot = slot;
            let _open =
                crate::metrics::GaugeGuard::new(crate::metrics::metrics().sync_streams.clone());
            if let Err(s) = sync(&state, (&agent, &serial), resume, expires, &tx).await {
                tracing::info!(agent = %agent, reason = s.message(), "sync stream closed");
                let _ = tx.send(Err(s)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The sync stream: a paged snapshot (or the missed deltas), then a delta
/// for every commit that touches this agent's entries or the bundle.
///
/// The stream registers with the server's [`SyncHub`](super::sync_hub),
/// which reads each commit once and hands this stream only the IDs of its
/// agent's entries that changed; other agents' commits never wake it. Every
/// create, update, move and delete of an entry rewrites its parent index key
/// `p/<parent>\0<id>`, so those keys give the net effect, and the current
/// state of each ID is read before it is sent.
async fn sync(
    state: &ServerState,
    (agent, serial): (&SpiffeId, &str),
    resume: u64,
    expires: i64,
    tx: &Sender<pn::SyncEntriesResponse>,
) -> Result<(), Status> {
    // The stream ends when the SVID it was opened with expires; the agent
    // reconnects with its renewed one.
    let left = u64::try_from(expires)
        .unwrap_or(0)
        .saturating_sub(unix(state.clock.now()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(left);
    // Registered before the revision is read: every later commit arrives.
    let sub = state.sync_hub.subscribe(agent);
    let mut shutdown = state.shutdown.clone();
    let mut store_down = state.store_watch.subscribe();
    let mut last = match catch_up(state, agent, resume)? {
        Some((ids, bundle, upto)) => {
            if !send_delta(state, agent, ids, bundle, (resume, upto), tx).await? {
                return Ok(());
            }
            upto
        }
        None => send_snapshot(state, agent, tx).await?,
    };
    loop {
        state.check_agent(agent, serial)?;
        let pending = tokio::select! {
            p = sub.inbox.next() => p,
            _ = shutdown.changed() => return Err(Status::unavailable("server is shutting down")),
            Ok(down) = store_down.wait_for(Option::is_some) => {
                return Err(super::store_watch::unavailable(down.as_deref().unwrap_or_default()));
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(Status::unauthenticated("the agent SVID this stream was opened with has expired"));
            }
            _ = tx.closed() => return Ok(()),
        };
        if pending.resnapshot {
            last = send_snapshot(state, agent, tx).await?;
            continue;
        }
        // Already covered by the snapshot or the catch-up.
        if pending.revision <= last {
            continue;
        }
        let before = std::mem::replace(&mut last, pending.revision);
        if !send_delta(
            state,
            agent,
            pending.entries,
            pending.bundle,
            (before, last),
            tx,
        )
        .await?
        {
            return Ok(());
        }
    }
}

/// What changed for `agent` after `resume`, read from the event log: the
/// entry IDs, whether the bundle changed, and the revision read up to. None
/// when the agent must start from a snapshot (no resume point, or the log no
/// longer reaches back to it).
type CaughtUp = (BTreeSet<String>, bool, u64);

fn catch_up(
    state: &ServerState,
    agent: &SpiffeId,
    resume: u64,
) -> Result<Option<CaughtUp>, Status> {
    let store = state.registry.store();
    let store_err = |e| status(crate::registry::RegistryError::from(e));
    if resume == 0 || resume > store.revision().map_err(store_err)? {
        return Ok(None);
    }
    let prefix = crate::registry::parent_prefix(agent);
    let (mut ids, mut bundle, mut last) = (BTreeSet::new(), false, resume);
    loop {
        let events = match store.events_since(last, EVENT_BATCH).map_err(store_err)? {
            EventsSince::Events(ev) if ev.is_empty() => return Ok(Some((ids, bundle, last))),
            EventsSince::Events(ev) => ev,
            EventsSince::Compacted { .. } => return Ok(None),
        };
        for change in events.iter().flat_map(|e| &e.changes) {
            match change.table {
                Table::EntriesByParent => {
                    if let Some(id) = change.key.strip_prefix(prefix.as_slice()) {
                        ids.insert(String::from_utf8_lossy(id).into_owned());
                    }
                }
                Table::Bundle | Table::Authorities => bundle = true,
                _ => {}
            }
        }
        last = events.last().map_or(last, |e| e.revision);
    }
}

/// Sends the current state of `ids` (upserted if still this agent's, else
/// deleted), with the bundle when it changed. Returns false when the agent
/// has gone away. `before` is the revision the agent had; `last` the one
/// this delta brings it to.
async fn send_delta(
    state: &ServerState,
    agent: &SpiffeId,
    ids: BTreeSet<String>,
    bundle_changed: bool,
    (before, last): (u64, u64),
    tx: &Sender<pn::SyncEntriesResponse>,
) -> Result<bool, Status> {
    let mut upserted = Vec::new();
    let mut deleted = Vec::new();
    let ids: Vec<String> = ids.into_iter().collect();
    let wanted: Vec<&str> = ids.iter().map(String::as_str).collect();
    let found = state.registry.entries(&wanted).map_err(status)?;
    for (id, entry) in ids.iter().zip(found) {
        match entry {
            Some(e) if &e.parent_id == agent => upserted.push(pn::Entry::from(&e)),
            _ => deleted.push(id.clone()),
        }
    }
    if upserted.is_empty() && deleted.is_empty() && !bundle_changed {
        return Ok(true);
    }
    // Large deltas go in several messages. All but the final one carry the
    // revision before this batch, so an agent cut off midway resumes from
    // there and receives the rest again.
    let chunks = by_size(upserted);
    let n = chunks.len();
    let mut deleted = Some(deleted);
    for (i, upserted) in chunks.into_iter().enumerate() {
        let final_part = i + 1 == n;
        let with_bundle = bundle_changed && final_part;
        let msg = pn::SyncEntriesResponse {
            revision: if final_part { last } else { before },
            kind: Some(pn::sync_entries_response::Kind::Delta(pn::Delta {
                upserted,
                deleted: if final_part {
                    deleted.take().unwrap_or_default()
                } else {
                    Vec::new()
                },
            })),
            bundle_jwks: if with_bundle {
                state.bundle_jwks()
            } else {
                Vec::new()
            },
            tainted_authorities: if with_bundle {
                state.tainted_authorities(last)
            } else {
                Vec::new()
            },
            federated_bundles: if with_bundle {
                state.federated_jwks()
            } else {
                Default::default()
            },
        };
        crate::metrics::metrics().sync_messages.inc();
        if tx.send(Ok(msg)).await.is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn send_snapshot(
    state: &ServerState,
    agent: &SpiffeId,
    tx: &Sender<pn::SyncEntriesResponse>,
) -> Result<u64, Status> {
    // Entries changed while paging are re-sent as deltas from this revision.
    let revision = state
        .registry
        .store()
        .revision()
        .map_err(|e| status(crate::registry::RegistryError::from(e)))?;
    let mut after: Option<String> = None;
    let mut first = true;
    loop {
        let page = state
            .registry
            .entries_by_parent(agent, after.as_deref(), SNAPSHOT_PAGE)
            .map_err(status)?;
        let last_page = page.len() < SNAPSHOT_PAGE;
        after = page.last().map(|e| e.id.clone());
        let chunks = by_size(page.iter().map(pn::Entry::from).collect());
        let n = chunks.len();
        for (i, entries) in chunks.into_iter().enumerate() {
            let msg = pn::SyncEntriesResponse {
                revision,
                kind: Some(pn::sync_entries_response::Kind::Snapshot(
                    pn::SnapshotPage {
                        entries,
                        last: last_page && i + 1 == n,
                    },
                )),
                bundle_jwks: if first {
                    state.bundle_jwks()
                } else {
                    Vec::new()
                },
                tainted_authorities: if first {
                    state.tainted_authorities(revision)
                } else {
                    Vec::new()
                },
                federated_bundles: if first {
                    state.federated_jwks()
                } else {
                    Default::default()
                },
            };
            first = false;
            crate::metrics::metrics().sync_messages.inc();
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(revision);
            }
        }
        if last_page {
            return Ok(revision);
        }
    }
}

/// Splits entries into messages of at most [`MAX_SYNC_MESSAGE`] encoded bytes
/// (one entry per message when an entry alone is larger), never none.
fn by_size(entries: Vec<pn::Entry>) -> Vec<Vec<pn::Entry>> {
    let mut chunks = vec![Vec::new()];
    let mut bytes = 0;
    for e in entries {
        let len = prost::Message::encoded_len(&e) + 8;
        if bytes + len > MAX_SYNC_MESSAGE && chunks.last().is_some_and(|c| !c.is_empty()) {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += len;
        if let Some(c) = chunks.last_mut() {
            c.push(e);
        }
    }
    chunks
}
