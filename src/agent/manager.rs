//! The agent's control loop: hold a `SyncEntries` stream, sign SVIDs for new
//! and changed entries in batches, rotate at half-life, renew the agent SVID,
//! and keep serving what it has while the server is away.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tonic::transport::Channel;

use super::node_client::{self, AgentIdentity, Attestation, NodeClientError};
use super::persist;
use super::state::{Backoff, random_jitter, rotation_time, validity};
use crate::proto::node::{self as pn, node_client::NodeClient};
use crate::registry::Entry;
use crate::spiffe::{Selector, SpiffeId};
use crate::workload_api::{AgentState, CachedSvid};
use crate::x509::{Bundle, KeyAlgorithm, PrivateKey};

/// CSRs per `BatchNewX509SVID` call.
const SIGN_BATCH: usize = 100;
/// Most sync messages applied before one reconcile.
const COALESCE: usize = 1000;
/// How often the SVID cache is written to disk at most.
const CACHE_SAVE_EVERY: Duration = Duration::from_secs(5);
/// How often rotation and expiry are checked.
const TICK: Duration = Duration::from_millis(500);
/// The longest an agent goes without looking at every entry (a safety net:
/// a message, a workload coming or going, or an SVID coming due makes it
/// look at once). With a cap, also how stale a connected workload's "last
/// used" time may get.
const RECONCILE_AT_LEAST: Duration = Duration::from_secs(60);
/// A session connected at least this long resets the reconnect backoff.
const GOOD_SESSION: Duration = Duration::from_secs(10);

/// Converts a synced entry at the edge; a malformed one is skipped and logged.
pub fn entry_from_proto(e: &pn::Entry) -> Result<Entry, String> {
    let spiffe_id = SpiffeId::new(&e.spiffe_id).map_err(|x| x.to_string())?;
    let parent_id = SpiffeId::new(&e.parent_id).map_err(|x| x.to_string())?;
    let selectors = e
        .selectors
        .iter()
        .map(|s| Selector::new(s).map_err(|x| x.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let ttl = |v: i64| u64::try_from(v).ok().filter(|v| *v > 0);
    Ok(Entry {
        id: e.id.clone(),
        spiffe_id,
        parent_id,
        selectors,
        x509_ttl: ttl(e.x509_ttl_seconds),
        jwt_ttl: ttl(e.jwt_ttl_seconds),
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        admin: e.admin,
        federates_with: e.federates_with.clone(),
        created_at_micros: u64::try_from(e.created_at_micros).unwrap_or(0),
    })
}

/// Why a server session ended.
#[derive(Debug)]
enum SessionEnd {
    /// Reconnect at once (e.g. the agent SVID was renewed).
    Reconnect,
    /// Shutting down.
    Shutdown,
}

/// The control loop's state.
pub struct Manager {
    /// The servers to use, in order; `current` is the one in use.
    pub(super) servers: Vec<String>,
    pub(super) current: usize,
    pub(super) identity: AgentIdentity,
    pub(super) attestation: Option<Attestation>,
    pub(super) data_dir: PathBuf,
    pub(super) entries: super::entries::Entries,
    pub(super) svids: HashMap<String, Arc<CachedSvid>>,
    pub(super) revision: u64,
    /// A bundle applied but not yet acknowledged to the server (its sequence).
    pub(super) ack_due: bool,
    /// The bundle changed and is not on disk yet.
    pub(super) bundle_unsaved: bool,
    /// The count of SVIDs signed by tainted authorities last acknowledged.
    pub(super) tainted_reported: u32,
    /// Authorities the server marked tainted (with the last bundle).
    pub(super) tainted: Arc<std::collections::BTreeSet<String>>,
    /// Federated bundles by trust domain name (with the last bundle).
    pub(super) federated: Arc<BTreeMap<String, Bundle>>,
    /// The SVID cache changed since it was last written to disk.
    pub(super) cache_dirty: bool,
    pub(super) cache_saved: Option<std::time::Instant>,
    /// The server asked us to hold signing requests until then
    /// (RESOURCE_EXHAUSTED with a retry-after).
    pub(super) sign_after: Option<std::time::Instant>,
    /// When a tick must reconcile again: at once while something due is
    /// unsigned, else when the first SVID held is due for rotation (none: no
    /// SVID held). In between, a tick costs nothing per entry...
    pub(super) reconcile_at: Option<SystemTime>,
    /// ...but it does at least every [`RECONCILE_AT_LEAST`] after the last
    /// (on the monotonic clock, whatever the wall clock does).
    pub(super) reconciled: std::time::Instant,
    /// When the current session connected (its sync stream opened).
    pub(super) connected_at: Option<std::time::Instant>,
    /// The SVID cache cap (`svid_cache_max`), if any.
    pub(super) svid_cache_max: Option<usize>,
    /// How often to ping the server (`server_keepalive`).
    pub(super) keepalive: Duration,
    /// How often to fetch every entry again (`full_sync_interval`)...
    pub(super) full_sync_every: Duration,
    /// ...and when next: a session opened after this asks for a snapshot
    /// instead of resuming. Any snapshot moves it on.
    pub(super) full_sync_at: tokio::time::Instant,
    /// The selectors of connected workloads (tracked only with a cap).
    pub(super) demand: Arc<crate::workload_api::Demand>,
    /// The `demand` generation the last reconcile planned for.
    pub(super) demand_seen: u64,
    /// When a connected workload last had each entry (with a cap).
    pub(super) last_used: HashMap<String, std::time::Instant>,
    pub(super) state: watch::Sender<Arc<AgentState>>,
    pub(super) client: watch::Sender<Option<NodeClient<Channel>>>,
    pub(super) shutdown: watch::Receiver<bool>,
}

impl Manager {
    fn bundle(&self) -> &Bundle {
        &self.identity.bundle
    }

    /// The server in use.
    fn server(&self) -> &str {
        self.servers
            .get(self.current)
            .or(self.servers.first())
            .map_or("", String::as_str)
    }

    /// Runs until shutdown: sessions with a server. A session that fails
    /// moves on to the next server of the list at once; once every server
    /// has failed in a row, it backs off (with jitter) before the next round.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut failed_in_row = 0usize;
        loop {
            match self.session().await {
                Ok(SessionEnd::Shutdown) => {
                    if std::mem::take(&mut self.bundle_unsaved) {
                        persist::save_bundle(&self.data_dir, &self.identity.bundle).await;
                    }
                    self.save_cache(true);
                    return;
                }
                Ok(SessionEnd::Reconnect) => {
                    backoff.reset();
                    failed_in_row = 0;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(server = %self.server(), error = %e, "server session ended; will retry");
                    // A session that got going starts a fresh round; one that
                    // failed within seconds (a server that cannot sign) does
                    // not, or a lone failing server would be retried at once.
                    let lasted = self.connected_at.take().map(|t| t.elapsed());
                    if lasted.is_some_and(|d| d >= GOOD_SESSION) {
                        backoff.reset();
                        failed_in_row = 0;
                    }
                    self.current = (self.current + 1) % self.servers.len().max(1);
                    failed_in_row += 1;
                    if failed_in_row < self.servers.len() {
                        self.client.send_replace(None);
                        continue;
                    }
                    failed_in_row = 0;
                }
            }
            self.client.send_replace(None);
            // Keep expiring what we hold while waiting to retry.
            let until = tokio::time::Instant::now() + backoff.next_delay();
            loop {
                self.expire();
                self.save_cache(false);
                tokio::select! {
                    _ = tokio::time::sleep_until(until.min(tokio::time::Instant::now() + TICK)) => {}
                    _ = self.shutdown.changed() => {
                        self.save_cache(true);
                        return;
                    }
                }
                if tokio::time::Instant::now() >= until {
                    break;
                }
            }
        }
    }

    async fn session(&mut self) -> Result<SessionEnd, NodeClientError> {
        if self.agent_svid_expired() {
            self.reattest().await?;
        }
        let mut client = node_client::connect_with(
            self.server(),
            &self.bundle().to_pem(),
            Some(&self.identity),
            self.keepalive,
        )
        .await?;
        // A full sync now and then: what the agent holds is then exactly the
        // server's, whatever a resume could not repair (a store restored from
        // a backup, whose revisions went on from an older point).
        let full = tokio::time::Instant::now() >= self.full_sync_at;
        let resume_from_revision = if full { 0 } else { self.revision };
        // The full sync asked for (by its due time): not asked again while
        // its snapshot is on the way; a snapshot moves `full_sync_at` on.
        let mut asked = full.then_some(self.full_sync_at);
        let opened = client
            .sync_entries(pn::SyncEntriesRequest {
                resume_from_revision,
            })
            .await;
        if let Err(s) = &opened {
            if matches!(
                s.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ) {
                crate::metrics::metrics()
                    .agent_refusals
                    .get_or_create(&crate::metrics::label("code", format!("{:?}", s.code())))
                    .inc();
            }
        }
        let mut stream = match opened {
            Ok(s) => s.into_inner(),
            // The server no longer knows this identity (evicted, or its SVID
            // superseded): attest again if we can, instead of looping.
            Err(s) if s.code() == tonic::Code::PermissionDenied && self.attestation.is_some() => {
                tracing::warn!(agent = %self.identity.spiffe_id, reason = ?s.message(), "the server refused the saved identity; attesting again");
                self.reattest().await?;
                return Ok(SessionEnd::Reconnect);
            }
            Err(s) => return Err(s.into()),
        };
        self.client.send_replace(Some(client.clone()));
        self.connected_at = Some(std::time::Instant::now());
        tracing::info!(server = %self.server(), agent = %self.identity.spiffe_id, resume_from = resume_from_revision, "connected to server");
        let mut pending: Option<BTreeMap<String, Arc<Entry>>> = None;
        let mut tick = tokio::time::interval(TICK);
        let rotate_agent_at = self.agent_rotation_time();
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let ended = || NodeClientError::Protocol("sync stream ended".into());
                    let mut ready = self.apply(msg?.ok_or_else(ended)?, &mut pending);
                    // Coalesce a burst of deltas into one reconcile: reconciling
                    // after each of n one-entry deltas would cost O(n²).
                    for _ in 0..COALESCE {
                        match tokio::time::timeout(Duration::ZERO, stream.message()).await {
                            Ok(msg) => ready = self.apply(msg?.ok_or_else(ended)?, &mut pending),
                            Err(_) => break,
                        }
                    }
                    if ready {
                        self.reconcile(&mut client).await?;
                    }
                    // Durable before acknowledged: a restarted agent
                    // still trusts what it told the server it has.
                    if std::mem::take(&mut self.bundle_unsaved) {
                        persist::save_bundle(&self.data_dir, &self.identity.bundle).await;
                    }
                    if std::mem::take(&mut self.ack_due) {
                        self.ack_bundle(&mut client).await;
                    }
                }
                _ = tick.tick() => {
                    self.save_cache(false);
                    if tokio::time::Instant::now() >= self.full_sync_at
                        && asked != Some(self.full_sync_at)
                    {
                        // A new stream on the same connection replaces this one.
                        tracing::info!(server = %self.server(), "full sync due: asking for a snapshot of every entry");
                        stream = client
                            .sync_entries(pn::SyncEntriesRequest {
                                resume_from_revision: 0,
                            })
                            .await?
                            .into_inner();
                        pending = None;
                        asked = Some(self.full_sync_at);
                        continue;
                    }
                    if SystemTime::now() >= rotate_agent_at || self.own_svid_tainted() {
                        self.identity = node_client::renew(&mut client, &self.identity).await?;
                        persist::save(&self.data_dir, &self.identity);
                        tracing::info!(agent = %self.identity.spiffe_id, expires_at = self.identity.expires_at, "agent SVID renewed");
                        return Ok(SessionEnd::Reconnect);
                    }
                    // A capped cache's plan follows the workloads connected,
                    // so it is looked at again when one comes or goes.
                    if self.demand.generation() != self.demand_seen
                        || self.reconcile_at.is_some_and(|t| SystemTime::now() >= t)
                        || self.reconciled.elapsed() >= RECONCILE_AT_LEAST
                    {
                        self.reconcile(&mut client).await?;
                    }
                    if self.tainted_svids() != self.tainted_reported {
                        self.ack_bundle(&mut client).await;
                    }
                }
                // A workload connected with entries that hold no SVID yet
                // (a capped cache signs them on demand).
                _ = self.demand.opened.notified(), if self.svid_cache_max.is_some() => {
                    self.reconcile(&mut client).await?;
                }
                _ = self.shutdown.changed() => return Ok(SessionEnd::Shutdown),
            }
        }
    }

    /// Tells the server which bundle this agent now trusts (best effort: a
    /// server without the RPC, or a failure, only delays `ca activate`).
    /// Also says how many SVIDs it still holds signed by tainted authorities
    /// (the progress `sigil ca show` reports).
    async fn ack_bundle(&mut self, client: &mut NodeClient<Channel>) {
        let sequence = self.identity.bundle.sequence();
        let tainted_svids = self.tainted_svids();
        let ack = pn::AckBundleRequest {
            sequence,
            tainted_svids,
        };
        match client.ack_bundle(ack).await {
            Ok(_) => self.tainted_reported = tainted_svids,
            Err(s) => {
                tracing::debug!(sequence, error = %s.message(), "could not acknowledge the bundle")
            }
        }
    }

    /// SVIDs held, the agent's own included, signed by a tainted authority.
    fn tainted_svids(&self) -> u32 {
        if self.tainted.is_empty() {
            return 0;
        }
        let workloads = self
            .svids
            .values()
            .filter(|s| self.tainted.contains(&*s.issuer))
            .count();
        u32::try_from(workloads + usize::from(self.own_svid_tainted())).unwrap_or(u32::MAX)
    }

    /// Whether the agent's own SVID was signed by a tainted authority.
    fn own_svid_tainted(&self) -> bool {
        !self.tainted.is_empty()
            && self
                .identity
                .cert_chain
                .first()
                .and_then(|c| crate::x509::authority_key_id(c))
                .is_some_and(|issuer| self.tainted.contains(&issuer))
    }

    fn agent_svid_expired(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.identity.expires_at <= i64::try_from(now).unwrap_or(i64::MAX)
    }

    fn agent_rotation_time(&self) -> SystemTime {
        match self.identity.cert_chain.first().and_then(|c| validity(c)) {
            Some((nb, na)) => {
                rotation_time((nb + crate::x509::BACKDATE).min(na), na, random_jitter())
            }
            None => SystemTime::now(),
        }
    }

    /// Attests again: with x509pop (any number of times) or with a join token
    /// given at start and not yet spent (once). An expired agent SVID cannot
    /// be renewed over mTLS, and an evicted agent must attest.
    async fn reattest(&mut self) -> Result<(), NodeClientError> {
        let Some(att) = self.attestation.clone() else {
            return Err(NodeClientError::Protocol(
                "the agent must attest again and has no unused attestation: join tokens are single-use, so start the agent with a new join token"
                    .into(),
            ));
        };
        if matches!(att, Attestation::JoinToken(_)) {
            self.attestation = None;
        }
        let pem = self.bundle().to_pem();
        let mut c = node_client::connect_with(self.server(), &pem, None, self.keepalive).await?;
        let td = self.bundle().trust_domain().clone();
        self.identity = node_client::attest(&mut c, &td, &att).await?;
        persist::save(&self.data_dir, &self.identity);
        self.revision = 0;
        tracing::info!(agent = %self.identity.spiffe_id, "attested again");
        Ok(())
    }

    /// Applies one sync message; true when a full view is ready to reconcile.
    fn apply(
        &mut self,
        msg: pn::SyncEntriesResponse,
        pending: &mut Option<BTreeMap<String, Arc<Entry>>>,
    ) -> bool {
        if !msg.bundle_jwks.is_empty() {
            self.ack_due = true;
            let tainted: std::collections::BTreeSet<String> =
                msg.tainted_authorities.iter().cloned().collect();
            if tainted != *self.tainted {
                if !tainted.is_empty() {
                    tracing::warn!(tainted = ?tainted, "the server marked authorities tainted; replacing what they signed");
                }
                self.tainted = Arc::new(tainted);
            }
            let federated: BTreeMap<String, Bundle> = msg
                .federated_bundles
                .iter()
                .filter_map(|(name, jwks)| {
                    let parsed = crate::spiffe::TrustDomain::new(name)
                        .map_err(|e| e.to_string())
                        .and_then(|td| {
                            Bundle::from_jwks(td, &String::from_utf8_lossy(jwks))
                                .map_err(|e| e.to_string())
                        });
                    match parsed {
                        Ok(b) => Some((name.clone(), b)),
                        Err(e) => {
                            tracing::warn!(trust_domain = %name, error = %e, "ignoring an unparsable federated bundle");
                            None
                        }
                    }
                })
                .collect();
            if federated != *self.federated {
                self.federated = Arc::new(federated);
            }
            let td = self.bundle().trust_domain().clone();
            match String::from_utf8(msg.bundle_jwks)
                .map_err(|e| e.to_string())
                .and_then(|j| Bundle::from_jwks(td, &j).map_err(|e| e.to_string()))
            {
                Ok(b) if b != self.identity.bundle => {
                    self.identity.bundle = b;
                    self.bundle_unsaved = true;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an unparsable bundle from the server")
                }
            }
        }
        let convert = |e: &pn::Entry| match entry_from_proto(e) {
            Ok(entry) => Some(entry),
            Err(err) => {
                tracing::warn!(entry = ?e.id, error = %err, "skipping malformed entry");
                None
            }
        };
        match msg.kind {
            Some(pn::sync_entries_response::Kind::Snapshot(page)) => {
                let acc = pending.get_or_insert_with(BTreeMap::new);
                for e in page.entries.iter().filter_map(convert) {
                    let e = shared(self.entries.get(&e.id), e);
                    acc.insert(e.id.clone(), e);
                }
                if !page.last {
                    return false;
                }
                // Applied as a difference, so what did not change stays shared.
                let next = pending.take().unwrap_or_default();
                let gone: Vec<String> = (self.entries.by_id().keys())
                    .filter(|id| !next.contains_key(*id))
                    .cloned()
                    .collect();
                let new = (next.keys())
                    .filter(|id| !self.entries.contains_key(id))
                    .count();
                if self.revision != 0 && (new > 0 || !gone.is_empty()) {
                    tracing::info!(
                        added = new,
                        removed = gone.len(),
                        from_revision = self.revision,
                        to_revision = msg.revision,
                        "a snapshot changed the entries held"
                    );
                }
                for id in gone {
                    self.entries.remove(&id);
                }
                for e in next.into_values() {
                    self.entries.insert(e);
                }
                self.full_sync_at = next_full_sync(self.full_sync_every);
            }
            Some(pn::sync_entries_response::Kind::Delta(d)) => {
                for id in &d.deleted {
                    self.entries.remove(id);
                }
                for e in d.upserted.iter().filter_map(convert) {
                    let e = shared(self.entries.get(&e.id), e);
                    self.entries.insert(e);
                }
            }
            None => {}
        }
        self.revision = msg.revision;
        true
    }

    /// Signs what is missing, changed or due for rotation; drops what is gone;
    /// publishes the result. Fails (ending the session, so the next server
    /// is tried) when signing failed by the server's fault; what was signed
    /// before that is kept and published.
    async fn reconcile(&mut self, client: &mut NodeClient<Channel>) -> Result<(), NodeClientError> {
        let now = SystemTime::now();
        self.demand_seen = self.demand.generation();
        let kept = self.svid_cache_max.map(|cap| self.cache_plan(cap));
        let keep = |id: &String| kept.as_ref().is_none_or(|k| k.contains(id));
        self.svids
            .retain(|id, s| self.entries.contains_key(id) && keep(id) && s.not_after > now);
        // With a cap, only the kept few are looked at.
        let candidates: Box<dyn Iterator<Item = &Arc<Entry>>> = match &kept {
            Some(k) => Box::new(k.iter().filter_map(|id| self.entries.get(id))),
            None => Box::new(self.entries.by_id().values()),
        };
        let due: Vec<Arc<Entry>> = candidates
            .filter(|e| self.needs_svid(e, now))
            .cloned()
            .collect();
        let held = self
            .sign_after
            .is_some_and(|t| std::time::Instant::now() < t);
        let mut failed = None;
        for chunk in due.chunks(SIGN_BATCH).take_while(|_| !held) {
            if let Err(e) = self.sign(client, chunk).await {
                let asked = match &e {
                    NodeClientError::Status(s) => crate::server::limits::retry_after(s),
                    _ => None,
                };
                if let Some(wait) = asked {
                    let wait = crate::server::limits::come_back_after(wait);
                    self.sign_after = Some(std::time::Instant::now() + wait);
                    tracing::info!(wait = ?wait, pending = due.len(), error = %e, "the server is busy; holding signing requests");
                    break;
                }
                tracing::warn!(error = %e, pending = due.len(), "signing SVIDs failed; will retry");
                failed = e.server_failing().then_some(e);
                break;
            }
        }
        if !due.is_empty() {
            tracing::info!(
                due = due.len(),
                holding = self.svids.len(),
                entries = self.entries.len(),
                "SVID cache updated"
            );
        }
        // Looked at again at the next tick while something due is still
        // unsigned (refused, or held back by the server); else once the first
        // SVID held is due (and at least every RECONCILE_AT_LEAST).
        self.reconcile_at = if due.iter().any(|e| self.needs_svid(e, now)) {
            Some(now)
        } else {
            self.svids.values().map(|s| s.rotate_at).min()
        };
        self.reconciled = std::time::Instant::now();
        self.publish();
        failed.map_or(Ok(()), Err)
    }

    /// Whether `e` needs an SVID signed: none held, or the one held no
    /// longer fits the entry, is due for rotation, or came from a tainted
    /// authority.
    fn needs_svid(&self, e: &Entry, now: SystemTime) -> bool {
        match self.svids.get(&e.id) {
            None => true,
            Some(s) => {
                !same_issuance(&s.entry, e)
                    || now >= s.rotate_at
                    || self.tainted.contains(&*s.issuer)
            }
        }
    }

    /// With `svid_cache_max`: the entries to hold SVIDs for. Those of
    /// connected workloads always (even past the cap, as SPIRE's LRU cache);
    /// then, up to the cap, the most recently used, those already held, and
    /// the oldest entries. Only the connected check looks at every entry;
    /// the rest works on the few used or held, and a partition by age.
    fn cache_plan(&mut self, cap: usize) -> std::collections::HashSet<String> {
        let connected = self.demand.selectors();
        let now = std::time::Instant::now();
        let mut kept = std::collections::HashSet::new();
        if !connected.is_empty() {
            for e in self.entries.by_id().values() {
                if connected
                    .iter()
                    .any(|have| crate::spiffe::is_subset(&e.selectors, have))
                {
                    self.last_used.insert(e.id.clone(), now);
                    kept.insert(e.id.clone());
                }
            }
        }
        self.last_used.retain(|id, _| self.entries.contains_key(id));
        let mut room = cap.saturating_sub(kept.len());
        let mut take = |e: &Arc<Entry>, room: &mut usize| {
            if *room > 0 && kept.insert(e.id.clone()) {
                *room -= 1;
            }
        };
        // The recently used, then those held.
        let rank = |e: &Arc<Entry>| {
            (
                std::cmp::Reverse(self.last_used.get(&e.id).copied()),
                !self.svids.contains_key(&e.id),
                e.created_at_micros,
            )
        };
        let mut preferred: Vec<&Arc<Entry>> = self
            .last_used
            .keys()
            .chain(self.svids.keys())
            .filter_map(|id| self.entries.get(id))
            .collect();
        preferred.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.id.cmp(&b.id)));
        for e in preferred {
            take(e, &mut room);
        }
        // Then the oldest entries.
        for e in self.entries.oldest_first() {
            if room == 0 {
                break;
            }
            take(e, &mut room);
        }
        kept
    }

    async fn sign(
        &mut self,
        client: &mut NodeClient<Channel>,
        entries: &[Arc<Entry>],
    ) -> Result<(), NodeClientError> {
        let mut keys = HashMap::new();
        let mut params = Vec::with_capacity(entries.len());
        for e in entries {
            let key = PrivateKey::generate(KeyAlgorithm::EcP256)?;
            params.push(pn::NewX509svidParams {
                entry_id: e.id.clone(),
                csr: key.csr_der(e.spiffe_id.as_str())?,
            });
            keys.insert(e.id.clone(), key);
        }
        let results = client
            .batch_new_x509svid(pn::BatchNewX509svidRequest { params })
            .await?
            .into_inner()
            .results;
        let received = SystemTime::now();
        for r in results {
            let (Some(entry), Some(key)) =
                (self.entries.get(&r.entry_id), keys.remove(&r.entry_id))
            else {
                continue;
            };
            if r.code != 0 {
                tracing::warn!(entry = ?r.entry_id, code = r.code, reason = ?r.message, "server refused to sign");
                continue;
            }
            let Some((not_before, not_after)) = r.cert_chain.first().and_then(|c| validity(c))
            else {
                tracing::warn!(entry = ?r.entry_id, "server returned an unparsable certificate");
                continue;
            };
            // Held for hours by thousands: no spare capacity (prost leaves
            // room for four certificates), the issuer ID shared.
            let mut chain = r.cert_chain;
            chain.shrink_to_fit();
            let svid = CachedSvid {
                issuer: crate::workload_api::issuer_of(&chain[0]),
                entry: entry.clone(),
                chain,
                key,
                not_before,
                not_after,
                // From receipt, not NotBefore: NotBefore is backdated for clock
                // skew, and half of a short lifetime measured from it is already past.
                rotate_at: rotation_time(received.max(not_before), not_after, random_jitter()),
            };
            self.svids.insert(r.entry_id.clone(), Arc::new(svid));
        }
        Ok(())
    }

    /// Drops SVIDs past their NotAfter (they are useless to workloads).
    fn expire(&mut self) {
        let now = SystemTime::now();
        let before = self.svids.len();
        self.svids.retain(|_, s| s.not_after > now);
        if before != self.svids.len() {
            self.publish();
        }
    }

    /// Writes the entry and SVID caches when they changed: at most every
    /// [`CACHE_SAVE_EVERY`], or at once when `now` (shutdown).
    fn save_cache(&mut self, now: bool) {
        let due = self
            .cache_saved
            .is_none_or(|t| t.elapsed() >= CACHE_SAVE_EVERY);
        if !self.cache_dirty || !(now || due) {
            return;
        }
        persist::save_cache(
            &self.data_dir,
            &self.identity.spiffe_id,
            self.revision,
            self.entries.by_id(),
            &self.svids,
            &self.federated,
        );
        self.cache_dirty = false;
        self.cache_saved = Some(std::time::Instant::now());
    }

    pub(super) fn publish(&mut self) {
        // The SVIDs in the entries' order, from the (often far fewer) SVIDs.
        let oldest_first =
            |a: &Entry, b: &Entry| (a.created_at_micros, &a.id).cmp(&(b.created_at_micros, &b.id));
        let mut svids: Vec<Arc<CachedSvid>> = self
            .svids
            .values()
            .filter(|s| self.entries.contains_key(&s.entry.id))
            .cloned()
            .collect();
        svids.sort_by(|a, b| oldest_first(&a.entry, &b.entry));
        let next = AgentState {
            bundle: Some(self.identity.bundle.clone()),
            entries: self.entries.listed(),
            svids,
            tainted: self.tainted.clone(),
            federated: self.federated.clone(),
        };
        let changed = self.state.send_if_modified(|cur| {
            let changed = !same_state(cur, &next);
            if changed {
                *cur = Arc::new(next);
            }
            changed
        });
        self.cache_dirty |= changed;
    }
}

/// When the next full sync is due: `every` from now, ±10 % so a fleet
/// started together spreads its snapshots.
pub(super) fn next_full_sync(every: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + every.mul_f64(1.0 + 0.1 * random_jitter())
}

/// The entry as held: the copy already held when it is unchanged (one copy
/// is shared by the entry map, the SVID issued for it and the published
/// state), else a new one.
fn shared(held: Option<&Arc<Entry>>, e: Entry) -> Arc<Entry> {
    match held {
        Some(h) if **h == e => h.clone(),
        _ => Arc::new(e),
    }
}

/// Whether an SVID issued for `old` still fits `new` (same fields that go in the certificate).
fn same_issuance(old: &Entry, new: &Entry) -> bool {
    old.spiffe_id == new.spiffe_id
        && old.dns_names == new.dns_names
        && old.x509_ttl == new.x509_ttl
        && old.selectors == new.selectors
        && old.hint == new.hint
}

fn same_state(a: &AgentState, b: &AgentState) -> bool {
    a.tainted == b.tainted
        && a.federated == b.federated
        && a.bundle == b.bundle
        && (a.entries.ptr_eq(&b.entries)
            || (a.entries.len() == b.entries.len()
                && (a.entries.iter().zip(b.entries.iter()))
                    .all(|(x, y)| Arc::ptr_eq(x, y) || x == y)))
        && a.svids.len() == b.svids.len()
        && a.svids.iter().zip(&b.svids).all(|(x, y)| Arc::ptr_eq(x, y))
}
