//! The server's authorities in their slots (prepared → active → old →
//! tainted → revoked), loaded from the store or created on first start, and
//! the trust bundle they publish. Every transition is one compare-and-swap
//! commit (the records it changes must be exactly as read, and the bundle
//! changes in the same commit), flushed before it is acknowledged; readers
//! see a consistent snapshot, and followers subscribe to changes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::rotation::{Validity, should_activate, should_drop, should_prepare};
use super::{CaError, JwtAuthority, Upstream, UpstreamChain, X509Authority};
use crate::spiffe::TrustDomain;
use crate::store::{AuthorityKind, AuthorityRecord, Commit, SlotState, Store, StoreError, Table};
use crate::x509::{Bundle, KeyAlgorithm};

/// Why the authorities could not be loaded, created or moved.
#[derive(Debug, thiserror::Error)]
pub enum CaSetError {
    /// The store failed (including a wrong KEK).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored authority is unusable.
    #[error("stored authority {id}: {source}")]
    Authority {
        /// The authority ID.
        id: String,
        /// Why.
        source: CaError,
    },
    /// Creating an authority failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The data directory belongs to another trust domain.
    #[error(
        "the data directory holds authorities for trust domain {stored}, but the server is configured for {configured}"
    )]
    TrustDomainMismatch {
        /// In the store.
        stored: String,
        /// Configured.
        configured: String,
    },
    /// No authority with this ID.
    #[error("no authority {0:?} (see `sigil ca show`)")]
    NotFound(String),
    /// The transition is not allowed from the authority's state; nothing changed.
    #[error("{0}")]
    Refused(String),
    /// Another transition changed the authorities meanwhile; nothing changed.
    #[error("the authorities changed concurrently; try again")]
    Conflict,
}

/// What the CA set is created with.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Key algorithm for new authorities.
    pub key_algorithm: KeyAlgorithm,
    /// Lifetime of new authorities.
    pub ca_ttl: Duration,
    /// When set, new X.509 authorities are intermediates signed by it.
    pub upstream: Option<Arc<Upstream>>,
    /// The bundle's `spiffe_refresh_hint`.
    pub refresh_hint: Duration,
}

/// One authority as `sigil ca show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityInfo {
    /// X.509 or JWT.
    pub kind: AuthorityKind,
    /// SubjectKeyIdentifier (hex) or kid.
    pub id: String,
    /// Its slot state.
    pub state: SlotState,
    /// Validity start.
    pub not_before: SystemTime,
    /// Validity end.
    pub not_after: SystemTime,
    /// Signed by an upstream authority (an intermediate).
    pub upstream: bool,
}

impl AuthorityInfo {
    /// Its validity, for the rotation schedule.
    pub fn validity(&self) -> Validity {
        Validity {
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

/// A consistent view of the authorities at one moment.
#[derive(Debug)]
pub struct Authorities {
    x509: Arc<X509Authority>,
    jwt: Arc<JwtAuthority>,
    bundle: Arc<Bundle>,
    listed: Vec<AuthorityInfo>,
}

impl Authorities {
    /// The X.509 authority that signs SVIDs.
    pub fn x509(&self) -> &Arc<X509Authority> {
        &self.x509
    }

    /// The JWT authority that signs JWT-SVIDs.
    pub fn jwt(&self) -> &Arc<JwtAuthority> {
        &self.jwt
    }

    /// The trust bundle: every prepared, active, old and tainted authority.
    pub fn bundle(&self) -> &Arc<Bundle> {
        &self.bundle
    }

    /// Every authority not yet dropped, X.509 first, oldest first.
    pub fn list(&self) -> &[AuthorityInfo] {
        &self.listed
    }
}

/// The signing authorities in use, the bundle of every trusted one, and the
/// transitions between slots.
#[derive(Debug)]
pub struct CaSet {
    opts: CaOptions,
    current: watch::Sender<Arc<Authorities>>,
    /// Transitions run one at a time in this process (the store's
    /// compare-and-swap guards against other writers).
    transitions: Mutex<()>,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The kind's name as `sigil ca show` prints it.
pub fn kind_name(kind: AuthorityKind) -> &'static str {
    match kind {
        AuthorityKind::X509 => "x509",
        AuthorityKind::Jwt => "jwt",
    }
}

/// A stored authority, parsed (a handful live briefly per transition, so
/// their size does not matter).
#[allow(clippy::large_enum_variant)]
enum Parsed {
    X509(X509Authority),
    Jwt(JwtAuthority),
}

struct Loaded {
    record: AuthorityRecord,
    raw: Vec<u8>,
    parsed: Parsed,
    info: AuthorityInfo,
}

fn parse(
    record: &AuthorityRecord,
    opts: &CaOptions,
) -> Result<(Parsed, AuthorityInfo), CaSetError> {
    let wrap = |source| CaSetError::Authority {
        id: record.id.clone(),
        source,
    };
    let not_after = UNIX_EPOCH + Duration::from_secs(record.not_after);
    let (parsed, not_before, upstream) = match record.kind {
        AuthorityKind::X509 => {
            let cert = record.cert_der.clone().unwrap_or_default();
            let upstream = (!record.upstream_roots.is_empty()).then(|| UpstreamChain {
                chain: record.upstream_chain.clone(),
                roots: record.upstream_roots.clone(),
            });
            let a = X509Authority::from_parts(cert, record.key.clone(), upstream).map_err(wrap)?;
            if a.trust_domain() != &opts.trust_domain {
                return Err(CaSetError::TrustDomainMismatch {
                    stored: a.trust_domain().to_string(),
                    configured: opts.trust_domain.to_string(),
                });
            }
            let (nb, up) = (a.not_before(), a.upstream().is_some());
            (Parsed::X509(a), nb, up)
        }
        AuthorityKind::Jwt => {
            let a = JwtAuthority::from_parts(record.id.clone(), record.key.clone(), not_after)
                .map_err(wrap)?;
            // JWT keys carry no NotBefore: they were made with ca_ttl.
            let nb = not_after.checked_sub(opts.ca_ttl).unwrap_or(UNIX_EPOCH);
            (Parsed::Jwt(a), nb, false)
        }
    };
    let info = AuthorityInfo {
        kind: record.kind,
        id: record.id.clone(),
        state: record.state,
        not_before,
        not_after,
        upstream,
    };
    Ok((parsed, info))
}

fn load(store: &dyn Store, opts: &CaOptions) -> Result<Vec<Loaded>, CaSetError> {
    let mut out = Vec::new();
    for (record, raw) in store.authorities_raw()? {
        let (parsed, info) = parse(&record, opts)?;
        out.push(Loaded {
            record,
            raw,
            parsed,
            info,
        });
    }
    sort_loaded(&mut out);
    Ok(out)
}

/// X.509 first, then by age, then by ID: the order of `ca show` and the bundle.
fn sort_loaded(loaded: &mut [Loaded]) {
    loaded.sort_by_key(|l| {
        (
            l.info.kind != AuthorityKind::X509,
            l.info.not_before,
            l.info.id.clone(),
        )
    });
}

/// Whether an authority belongs in the bundle at `now`.
fn trusted(info: &AuthorityInfo, now: SystemTime) -> bool {
    info.state != SlotState::Revoked && !should_drop(now, info.validity())
}

fn bundle_of(td: &TrustDomain, loaded: &[Loaded], now: SystemTime) -> Result<Bundle, CaSetError> {
    let mut bundle = Bundle::new(td.clone());
    for l in loaded.iter().filter(|l| trusted(&l.info, now)) {
        match &l.parsed {
            Parsed::X509(a) => {
                for root in a.roots() {
                    bundle
                        .add_x509_authority(root)
                        .map_err(|e| CaSetError::Ca(CaError::BadAuthorityCert(e)))?;
                }
            }
            Parsed::Jwt(a) => bundle.add_jwt_authority(a.kid().to_string(), a.public_key().clone()),
        }
    }
    Ok(bundle)
}

/// A store key and value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// The trust domain's bundle as stored, read once per transition.
struct StoredBundle {
    key: Vec<u8>,
    raw: Option<Vec<u8>>,
}

impl StoredBundle {
    fn read(store: &dyn Store, td: &TrustDomain) -> Result<Self, CaSetError> {
        let key = td.name().as_bytes().to_vec();
        let raw = store.get(Table::Bundle, &key)?;
        Ok(StoredBundle { key, raw })
    }

    /// `commit`, valid only while the stored bundle is still the one read:
    /// two servers of a cluster changing the authorities at once conflict
    /// here (the loser retries or is told), instead of both landing.
    fn guard(&self, commit: Commit) -> Commit {
        match &self.raw {
            Some(raw) => commit.require_equals(Table::Bundle, self.key.clone(), raw.clone()),
            None => commit.require_absent(Table::Bundle, self.key.clone()),
        }
    }
}

/// The bundle write for a commit, with `spiffe_sequence` bumped when the
/// authorities changed; `None` when the stored bundle is already this one.
fn bundle_write(
    stored: &StoredBundle,
    bundle: &mut Bundle,
    refresh_hint: Duration,
) -> Result<Option<KeyValue>, CaSetError> {
    let key = stored.key.clone();
    let previous = stored
        .raw
        .clone()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| Bundle::from_jwks(bundle.trust_domain().clone(), &s).ok());
    bundle.set_refresh_hint(Some(refresh_hint.as_secs().max(1)));
    match previous {
        Some(prev) => {
            bundle.set_sequence(prev.sequence());
            let sorted = |b: &Bundle| {
                let mut v = b.x509_authorities().to_vec();
                v.sort();
                v
            };
            if sorted(&prev) == sorted(bundle)
                && prev.jwt_authorities() == bundle.jwt_authorities()
                && prev.refresh_hint() == bundle.refresh_hint()
            {
                return Ok(None);
            }
            bundle.set_sequence(prev.sequence() + 1);
        }
        None => bundle.set_sequence(1),
    }
    Ok(Some((key, bundle.to_jwks().into_bytes())))
}

/// Adds to `commit` the active authority of `kind` moving to old (checked
/// unchanged since `loaded` was read).
fn retire_active(
    store: &dyn Store,
    loaded: &[Loaded],
    kind: AuthorityKind,
    mut commit: Commit,
) -> Result<Commit, CaSetError> {
    for l in loaded
        .iter()
        .filter(|l| l.info.kind == kind && l.info.state == SlotState::Active)
    {
        let mut old = l.record.clone();
        old.state = SlotState::Old;
        commit = commit
            .require_equals(Table::Authorities, old.id.as_bytes(), l.raw.clone())
            .put(
                Table::Authorities,
                old.id.as_bytes(),
                store.seal_authority(&old)?,
            );
    }
    Ok(commit)
}

/// A new authority of `kind` in `state`, as a record.
fn create(
    opts: &CaOptions,
    kind: AuthorityKind,
    state: SlotState,
    now: SystemTime,
) -> Result<AuthorityRecord, CaSetError> {
    Ok(match kind {
        AuthorityKind::X509 => {
            let (td, alg, ttl) = (&opts.trust_domain, opts.key_algorithm, opts.ca_ttl);
            let a = match &opts.upstream {
                Some(up) => X509Authority::signed_by_upstream(td, alg, ttl, now, up)?,
                None => X509Authority::self_signed(td, alg, ttl, now)?,
            };
            let up = a.upstream().cloned().unwrap_or_default();
            AuthorityRecord {
                id: a.id().to_string(),
                kind,
                state,
                cert_der: Some(a.cert_der().to_vec()),
                not_after: secs(a.not_after()),
                key: a.key().clone(),
                upstream_chain: up.chain,
                upstream_roots: up.roots,
            }
        }
        AuthorityKind::Jwt => {
            let a = JwtAuthority::generate(opts.key_algorithm, opts.ca_ttl, now)?;
            AuthorityRecord {
                id: a.kid().to_string(),
                kind,
                state,
                cert_der: None,
                not_after: secs(a.not_after()),
                key: a.key().clone(),
                upstream_chain: Vec::new(),
                upstream_roots: Vec::new(),
            }
        }
    })
}

impl CaSet {
    /// Loads the authorities; when a kind has no usable active authority,
    /// promotes its prepared one or creates one (durably). Publishes the bundle.
    pub fn load_or_create(
        store: &dyn Store,
        opts: &CaOptions,
        now: SystemTime,
    ) -> Result<Self, CaSetError> {
        for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
            // Servers of a cluster starting at once: nothing may have been
            // committed since the authorities were read (else read again),
            // so one of them creates the authority and the others load it.
            let mut attempts = 0;
            loop {
                attempts += 1;
                match Self::ensure_active(store, opts, kind, now) {
                    Err(CaSetError::Store(StoreError::CheckFailed(_))) if attempts < 20 => continue,
                    other => break other?,
                }
            }
        }
        let set = CaSet {
            opts: opts.clone(),
            current: watch::Sender::new(Arc::new(Self::snapshot(store, opts, now, true)?)),
            transitions: Mutex::new(()),
        };
        Ok(set)
    }

    /// Makes sure `kind` has a usable active authority: promotes the
    /// prepared one or creates one (one commit, valid only if nothing was
    /// committed since the authorities were read).
    fn ensure_active(
        store: &dyn Store,
        opts: &CaOptions,
        kind: AuthorityKind,
        now: SystemTime,
    ) -> Result<(), CaSetError> {
        let revision = store.revision()?;
        let loaded = load(store, opts)?;
        let usable = |l: &&Loaded, state| {
            l.info.kind == kind && l.info.state == state && l.info.not_after > now
        };
        if loaded.iter().any(|l| usable(&l, SlotState::Active)) {
            return Ok(());
        }
        // An expired active authority retires.
        let mut commit = retire_active(store, &loaded, kind, Commit::new().at_revision(revision))?;
        let (id, record) = match loaded.iter().find(|l| usable(l, SlotState::Prepared)) {
            Some(p) => {
                let mut r = p.record.clone();
                r.state = SlotState::Active;
                commit = commit.require_equals(Table::Authorities, r.id.as_bytes(), p.raw.clone());
                (r.id.clone(), r)
            }
            None => {
                let r = create(opts, kind, SlotState::Active, now)?;
                commit = commit.require_absent(Table::Authorities, r.id.as_bytes());
                (r.id.clone(), r)
            }
        };
        commit = commit.put(
            Table::Authorities,
            id.as_bytes(),
            store.seal_authority(&record)?,
        );
        store.commit(commit)?;
        tracing::info!(target: "sigil::audit", event = "authority_activated", decision = "allow", subject = %id, kind = kind_name(kind), not_after = record.not_after);
        Ok(())
    }

    /// Reads the authorities back (and, with `publish`, stores the bundle if
    /// it changed, e.g. an authority aged out).
    fn snapshot(
        store: &dyn Store,
        opts: &CaOptions,
        now: SystemTime,
        publish: bool,
    ) -> Result<Authorities, CaSetError> {
        let loaded = load(store, opts)?;
        let mut bundle = bundle_of(&opts.trust_domain, &loaded, now)?;
        let stored = StoredBundle::read(store, &opts.trust_domain)?;
        if let Some((key, value)) = bundle_write(&stored, &mut bundle, opts.refresh_hint)? {
            if publish {
                // Another server publishing the same change first is fine.
                match store.commit(stored.guard(Commit::new()).put(Table::Bundle, key, value)) {
                    Ok(_) | Err(StoreError::CheckFailed(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let mut x509 = None;
        let mut jwt = None;
        let mut listed = Vec::new();
        for l in loaded {
            if l.info.state == SlotState::Active {
                match l.parsed {
                    Parsed::X509(a) => x509 = Some(Arc::new(a)),
                    Parsed::Jwt(a) => jwt = Some(Arc::new(a)),
                }
            }
            if l.info.state == SlotState::Revoked || trusted(&l.info, now) {
                listed.push(l.info);
            }
        }
        let missing = |k| CaSetError::Refused(format!("no active {k} authority in the store"));
        Ok(Authorities {
            x509: x509.ok_or_else(|| missing("x509"))?,
            jwt: jwt.ok_or_else(|| missing("jwt"))?,
            bundle: Arc::new(bundle),
            listed,
        })
    }

    /// The authorities now.
    pub fn current(&self) -> Arc<Authorities> {
        self.current.borrow().clone()
    }

    /// Changes to the authorities (every transition publishes a new view).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Authorities>> {
        self.current.subscribe()
    }

    /// The X.509 authority that signs SVIDs now.
    pub fn x509(&self) -> Arc<X509Authority> {
        self.current.borrow().x509.clone()
    }

    /// The JWT authority that signs JWT-SVIDs now.
    pub fn jwt(&self) -> Arc<JwtAuthority> {
        self.current.borrow().jwt.clone()
    }

    /// The trust bundle now.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.current.borrow().bundle.clone()
    }

    /// Commits one transition and publishes the new view.
    fn apply(&self, store: &dyn Store, commit: Commit, now: SystemTime) -> Result<(), CaSetError> {
        match store.commit(commit) {
            Ok(_) => {}
            Err(StoreError::CheckFailed(_)) => return Err(CaSetError::Conflict),
            Err(e) => return Err(e.into()),
        }
        let next = Self::snapshot(store, &self.opts, now, false)?;
        self.current.send_replace(Arc::new(next));
        Ok(())
    }

    /// Adds `commit` the bundle as it will be once `loaded` changed so.
    fn with_bundle(
        &self,
        store: &dyn Store,
        commit: Commit,
        after: &[Loaded],
        now: SystemTime,
        force: bool,
    ) -> Result<Commit, CaSetError> {
        let mut bundle = bundle_of(&self.opts.trust_domain, after, now)?;
        let stored = StoredBundle::read(store, &self.opts.trust_domain)?;
        let commit = stored.guard(commit);
        let write = match bundle_write(&stored, &mut bundle, self.opts.refresh_hint)? {
            None if force => {
                bundle.set_sequence(bundle.sequence() + 1);
                Some((
                    bundle.trust_domain().name().as_bytes().to_vec(),
                    bundle.to_jwks().into_bytes(),
                ))
            }
            other => other,
        };
        Ok(match write {
            Some((key, value)) => commit.put(Table::Bundle, key, value),
            None => commit,
        })
    }

    /// Prepares a successor of `kind`: a new authority published in the
    /// bundle at once (same commit), not yet signing.
    pub fn prepare(
        &self,
        store: &dyn Store,
        kind: AuthorityKind,
        now: SystemTime,
    ) -> Result<AuthorityInfo, CaSetError> {
        let _one = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        let mut loaded = load(store, &self.opts)?;
        if let Some(p) = loaded
            .iter()
            .find(|l| l.info.kind == kind && l.info.state == SlotState::Prepared)
        {
            return Err(CaSetError::Refused(format!(
                "a {} authority is already prepared ({}); activate it first",
                kind_name(kind),
                p.info.id
            )));
        }
        let record = create(&self.opts, kind, SlotState::Prepared, now)?;
        let (parsed, info) = parse(&record, &self.opts)?;
        let commit = Commit::new()
            .require_absent(Table::Authorities, record.id.as_bytes())
            .put(
                Table::Authorities,
                record.id.as_bytes(),
                store.seal_authority(&record)?,
            );
        loaded.push(Loaded {
            raw: Vec::new(),
            record,
            parsed,
            info: info.clone(),
        });
        sort_loaded(&mut loaded);
        let commit = self.with_bundle(store, commit, &loaded, now, false)?;
        self.apply(store, commit, now)?;
        tracing::info!(target: "sigil::audit", event = "authority_prepared", decision = "allow", subject = %info.id, kind = kind_name(kind));
        Ok(info)
    }

    /// Makes the prepared authority of `kind` the one that signs; the active
    /// one becomes old (still trusted until it expires).
    pub fn activate(
        &self,
        store: &dyn Store,
        kind: AuthorityKind,
        now: SystemTime,
    ) -> Result<AuthorityInfo, CaSetError> {
        let _one = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        let loaded = load(store, &self.opts)?;
        let Some(prepared) = loaded
            .iter()
            .find(|l| l.info.kind == kind && l.info.state == SlotState::Prepared)
        else {
            return Err(CaSetError::Refused(format!(
                "no prepared {} authority to activate; run `sigil ca prepare --kind {}` first",
                kind_name(kind),
                kind_name(kind)
            )));
        };
        if prepared.info.not_after <= now {
            return Err(CaSetError::Refused(format!(
                "the prepared authority {} has expired",
                prepared.info.id
            )));
        }
        let mut commit = retire_active(store, &loaded, kind, Commit::new())?;
        let mut active = prepared.record.clone();
        active.state = SlotState::Active;
        commit = commit
            .require_equals(
                Table::Authorities,
                active.id.as_bytes(),
                prepared.raw.clone(),
            )
            .put(
                Table::Authorities,
                active.id.as_bytes(),
                store.seal_authority(&active)?,
            );
        self.apply(store, commit, now)?;
        tracing::info!(target: "sigil::audit", event = "authority_activated", decision = "allow", subject = %active.id, kind = kind_name(kind));
        Ok(AuthorityInfo {
            state: SlotState::Active,
            ..prepared.info.clone()
        })
    }

    /// Marks an old authority compromised: still in the bundle (so nothing
    /// breaks at once), while everything it signed is replaced; then revoke it.
    pub fn taint(
        &self,
        store: &dyn Store,
        id: &str,
        now: SystemTime,
    ) -> Result<AuthorityInfo, CaSetError> {
        self.move_one(
            store,
            id,
            SlotState::Old,
            SlotState::Tainted,
            now,
            "tainted",
            "only an old authority can be tainted (activate its successor first)",
        )
    }

    /// Removes a tainted authority from the bundle everywhere.
    pub fn revoke(
        &self,
        store: &dyn Store,
        id: &str,
        now: SystemTime,
    ) -> Result<AuthorityInfo, CaSetError> {
        self.move_one(
            store,
            id,
            SlotState::Tainted,
            SlotState::Revoked,
            now,
            "revoked",
            "only a tainted authority can be revoked (taint it first)",
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn move_one(
        &self,
        store: &dyn Store,
        id: &str,
        from: SlotState,
        to: SlotState,
        now: SystemTime,
        event: &str,
        rule: &str,
    ) -> Result<AuthorityInfo, CaSetError> {
        let _one = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        let mut loaded = load(store, &self.opts)?;
        let Some(at) = loaded.iter().position(|l| l.info.id == id) else {
            return Err(CaSetError::NotFound(id.to_string()));
        };
        if loaded[at].info.state != from {
            return Err(CaSetError::Refused(format!(
                "{id} is {}: {rule}",
                state_name(loaded[at].info.state)
            )));
        }
        let mut record = loaded[at].record.clone();
        record.state = to;
        let commit = Commit::new()
            .require_equals(Table::Authorities, id.as_bytes(), loaded[at].raw.clone())
            .put(
                Table::Authorities,
                id.as_bytes(),
                store.seal_authority(&record)?,
            );
        loaded[at].info.state = to;
        // A taint leaves the bundle's keys as they are, but agents must hear
        // of it: the bundle is rewritten with its sequence bumped.
        let commit = self.with_bundle(store, commit, &loaded, now, to == SlotState::Tainted)?;
        self.apply(store, commit, now)?;
        tracing::warn!(target: "sigil::audit", event = "authority_state", decision = "allow", subject = %id, state = event);
        Ok(loaded[at].info.clone())
    }
}

impl CaSet {
    /// Reads the authorities back from the store, where another server of
    /// the cluster may have changed them; publishes a new view only when it
    /// differs. Returns how many authorities differed (plus one when the
    /// bundle's sequence did).
    pub fn reload(&self, store: &dyn Store, now: SystemTime) -> Result<usize, CaSetError> {
        let _one = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        let next = Self::snapshot(store, &self.opts, now, false)?;
        let current = self.current();
        let mut differ = next
            .listed
            .iter()
            .filter(|a| !current.listed.contains(a))
            .count()
            + current
                .listed
                .iter()
                .filter(|a| !next.listed.iter().any(|n| n.id == a.id))
                .count();
        if next.bundle.sequence() != current.bundle.sequence() {
            differ += 1;
        }
        if differ > 0 {
            self.current.send_replace(Arc::new(next));
        }
        Ok(differ)
    }

    /// One step of the automatic schedule at `now`, per kind: activate a
    /// successor prepared on an earlier step once the active authority is
    /// down to its last sixth, else prepare one once it is down to its last
    /// half; never both in one step. Also drops authorities expired past the
    /// grace from the bundle. Returns what it did (for the log).
    pub fn tick(&self, store: &dyn Store, now: SystemTime) -> Result<Vec<String>, CaSetError> {
        let mut done = Vec::new();
        for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
            let current = self.current();
            let of_kind = |state| {
                current
                    .list()
                    .iter()
                    .find(|a| a.kind == kind && a.state == state)
                    .cloned()
            };
            let Some(active) = of_kind(SlotState::Active) else {
                continue;
            };
            let prepared = of_kind(SlotState::Prepared);
            if prepared.is_some() && should_activate(now, active.validity()) {
                let a = self.activate(store, kind, now)?;
                done.push(format!("activated {} authority {}", kind_name(kind), a.id));
            } else if prepared.is_none() && should_prepare(now, active.validity()) {
                let p = self.prepare(store, kind, now)?;
                done.push(format!("prepared {} authority {}", kind_name(kind), p.id));
            }
        }
        // Age expired authorities out of the bundle (and the view).
        let _one = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        let next = Self::snapshot(store, &self.opts, now, true)?;
        if next.bundle.sequence() != self.current().bundle.sequence()
            || next.listed != self.current().listed
        {
            done.push("refreshed the bundle".into());
        }
        self.current.send_replace(Arc::new(next));
        Ok(done)
    }
}

/// The state's name as `sigil ca show` prints it.
pub fn state_name(state: SlotState) -> &'static str {
    match state {
        SlotState::Prepared => "prepared",
        SlotState::Active => "active",
        SlotState::Old => "old",
        SlotState::Tainted => "tainted",
        SlotState::Revoked => "revoked",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn opts(td: &str) -> CaOptions {
        CaOptions {
            trust_domain: TrustDomain::new(td).unwrap(),
            key_algorithm: KeyAlgorithm::EcP256,
            ca_ttl: Duration::from_secs(3600),
            upstream: None,
            refresh_hint: Duration::from_secs(300),
        }
    }

    #[test]
    fn creates_once_then_reloads() {
        let store = MemoryStore::new().unwrap();
        let now = SystemTime::now();
        let a = CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        let rev = store.revision().unwrap();
        let b = CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        assert_eq!(a.x509().id(), b.x509().id());
        assert_eq!(a.jwt().kid(), b.jwt().kid());
        assert_eq!(a.bundle(), b.bundle());
        assert_eq!(b.bundle().sequence(), 1);
        assert_eq!(store.revision().unwrap(), rev, "reloading writes nothing");
        assert_eq!(b.bundle().x509_authorities().len(), 1);
        assert_eq!(b.bundle().jwt_authorities().len(), 1);
    }

    #[test]
    fn expired_authorities_are_replaced_and_bundle_sequence_bumps() {
        let store = MemoryStore::new().unwrap();
        let now = SystemTime::now();
        let a = CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        let later = now + Duration::from_secs(7200);
        let b = CaSet::load_or_create(&store, &opts("example.org"), later).unwrap();
        assert_ne!(a.x509().id(), b.x509().id());
        assert_eq!(b.bundle().sequence(), 2);
        assert_eq!(
            b.bundle().x509_authorities().len(),
            1,
            "expired CA is not trusted"
        );
    }

    #[test]
    fn refuses_another_trust_domain() {
        let store = MemoryStore::new().unwrap();
        let now = SystemTime::now();
        CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        let err = CaSet::load_or_create(&store, &opts("other.org"), now).unwrap_err();
        assert!(
            matches!(err, CaSetError::TrustDomainMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn slots_move_prepare_activate_taint_revoke_and_bad_moves_change_nothing() {
        let store = MemoryStore::new().unwrap();
        let now = SystemTime::now();
        let set = CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        let first = set.x509().id().to_string();
        let seq = set.bundle().sequence();
        let refused = |r: Result<AuthorityInfo, CaSetError>, says: &str| {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        };
        // Nothing prepared: activate is refused, changing nothing.
        let rev = store.revision().unwrap();
        refused(
            set.activate(&store, AuthorityKind::X509, now),
            "no prepared x509",
        );
        refused(set.taint(&store, &first, now), "only an old authority");
        refused(set.revoke(&store, &first, now), "only a tainted authority");
        refused(set.taint(&store, "nope", now), "no authority \"nope\"");
        assert_eq!(store.revision().unwrap(), rev, "refusals write nothing");

        // Prepare: in the bundle at once (sequence bumped), not signing.
        let p = set.prepare(&store, AuthorityKind::X509, now).unwrap();
        assert_eq!(p.state, SlotState::Prepared);
        assert_eq!(set.bundle().x509_authorities().len(), 2);
        assert_eq!(set.bundle().sequence(), seq + 1);
        assert_eq!(set.x509().id(), first);
        refused(
            set.prepare(&store, AuthorityKind::X509, now),
            "already prepared",
        );

        // A restart mid-rotation keeps the slots as they are.
        let again = CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        assert_eq!(again.x509().id(), first);
        assert_eq!(again.bundle().x509_authorities().len(), 2);

        // Activate: the prepared one signs, the old one stays trusted.
        set.activate(&store, AuthorityKind::X509, now).unwrap();
        assert_eq!(set.x509().id(), p.id);
        let states: Vec<(String, SlotState)> = set
            .current()
            .list()
            .iter()
            .filter(|a| a.kind == AuthorityKind::X509)
            .map(|a| (a.id.clone(), a.state))
            .collect();
        assert!(
            states.contains(&(first.clone(), SlotState::Old)),
            "{states:?}"
        );
        assert!(
            states.contains(&(p.id.clone(), SlotState::Active)),
            "{states:?}"
        );
        assert_eq!(set.bundle().x509_authorities().len(), 2);

        // Taint the old one (still trusted), then revoke it (gone, sequence bumped).
        refused(set.revoke(&store, &first, now), "only a tainted authority");
        refused(set.taint(&store, &p.id, now), "is active");
        set.taint(&store, &first, now).unwrap();
        assert_eq!(set.bundle().x509_authorities().len(), 2);
        let before = set.bundle().sequence();
        set.revoke(&store, &first, now).unwrap();
        assert_eq!(set.bundle().x509_authorities().len(), 1);
        assert_eq!(set.bundle().sequence(), before + 1);
        // The stored bundle is what agents sync: it moved too.
        let stored = store.get(Table::Bundle, b"example.org").unwrap().unwrap();
        let stored = Bundle::from_jwks(
            TrustDomain::new("example.org").unwrap(),
            &String::from_utf8(stored).unwrap(),
        )
        .unwrap();
        assert_eq!(stored.x509_authorities(), set.bundle().x509_authorities());
        assert_eq!(stored.sequence(), set.bundle().sequence());

        // JWT authorities move the same way.
        let kid = set.jwt().kid().to_string();
        let pj = set.prepare(&store, AuthorityKind::Jwt, now).unwrap();
        assert_eq!(set.bundle().jwt_authorities().len(), 2);
        set.activate(&store, AuthorityKind::Jwt, now).unwrap();
        assert_eq!(set.jwt().kid(), pj.id);
        set.taint(&store, &kid, now).unwrap();
        set.revoke(&store, &kid, now).unwrap();
        assert_eq!(set.bundle().jwt_authorities().len(), 1);
    }

    #[test]
    fn moving_to_an_upstream_root_and_rotating_its_intermediates() {
        let store = MemoryStore::new().unwrap();
        let now = SystemTime::now();
        let set = CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        let own_root = set.x509().cert_der().to_vec();
        let first = set.x509().id().to_string();

        // Restarted with an upstream: the self-signed authority keeps signing
        // (agents do not trust the upstream root yet).
        let (up, upstream_root) = crate::ca::upstream::tests::root_upstream(now);
        let with_up = CaOptions {
            upstream: Some(Arc::new(up)),
            ..opts("example.org")
        };
        let set = CaSet::load_or_create(&store, &with_up, now).unwrap();
        assert_eq!(set.x509().id(), first);
        assert_eq!(
            set.bundle().x509_authorities(),
            std::slice::from_ref(&own_root)
        );

        // Prepare: an intermediate; the bundle gains the upstream root.
        let p = set.prepare(&store, AuthorityKind::X509, now).unwrap();
        assert!(p.upstream);
        let mut roots = set.bundle().x509_authorities().to_vec();
        roots.sort();
        let mut expected = vec![own_root.clone(), upstream_root.clone()];
        expected.sort();
        assert_eq!(roots, expected);
        set.activate(&store, AuthorityKind::X509, now).unwrap();
        assert!(set.x509().upstream().is_some());

        // Retire the self-signed root for good: it leaves the bundle.
        set.taint(&store, &first, now).unwrap();
        set.revoke(&store, &first, now).unwrap();
        assert_eq!(
            set.bundle().x509_authorities(),
            std::slice::from_ref(&upstream_root)
        );

        // Intermediates rotate, taint and revoke like any authority; the
        // upstream root stays (the active intermediate still needs it).
        let second = set.x509().id().to_string();
        set.prepare(&store, AuthorityKind::X509, now).unwrap();
        set.activate(&store, AuthorityKind::X509, now).unwrap();
        set.taint(&store, &second, now).unwrap();
        let seq = set.bundle().sequence();
        set.revoke(&store, &second, now).unwrap();
        assert_eq!(
            set.bundle().x509_authorities(),
            std::slice::from_ref(&upstream_root)
        );
        let listed = set.current().list().to_vec();
        let revoked = listed.iter().find(|a| a.id == second).unwrap();
        assert_eq!(
            (revoked.state, revoked.upstream),
            (SlotState::Revoked, true)
        );
        assert!(set.bundle().sequence() >= seq);

        // A restart reads the chains back.
        let again = CaSet::load_or_create(&store, &with_up, now).unwrap();
        assert_eq!(again.x509().upstream(), set.x509().upstream());
        assert_eq!(again.bundle().x509_authorities(), [upstream_root]);
    }

    #[test]
    fn an_expired_active_authority_hands_over_to_the_prepared_one_at_start() {
        let store = MemoryStore::new().unwrap();
        let now = SystemTime::now();
        let set = CaSet::load_or_create(&store, &opts("example.org"), now).unwrap();
        let later = now + Duration::from_secs(1800);
        let p = set.prepare(&store, AuthorityKind::X509, later).unwrap();
        // The first authority (1 h) has expired; the prepared one (from +30 min) has not.
        let restart = now + Duration::from_secs(3700);
        let again = CaSet::load_or_create(&store, &opts("example.org"), restart).unwrap();
        assert_eq!(again.x509().id(), p.id);
        let active = again
            .current()
            .list()
            .iter()
            .filter(|a| a.kind == AuthorityKind::X509 && a.state == SlotState::Active)
            .count();
        assert_eq!(active, 1, "exactly one active authority");
    }

    #[test]
    fn ten_lifetimes_of_scheduled_rotation_never_break_trust() {
        // Tick every 1/20 of a lifetime for 10 lifetimes. At every step:
        // exactly one active authority per kind; the active one always has
        // at least a sixth of its life left; every SVID issued at any earlier
        // step that has not expired verifies against the bundle now; and the
        // new SVID verifies against the previous step's bundle (two workloads
        // whose bundles are a step apart still trust each other).
        let store = MemoryStore::new().unwrap();
        let life = Duration::from_secs(3600);
        let start = SystemTime::now();
        let set = CaSet::load_or_create(&store, &opts("example.org"), start).unwrap();
        let step = life / 20;
        let key = crate::x509::PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
        let params = crate::ca::X509SvidParams {
            spiffe_id: crate::spiffe::SpiffeId::new("spiffe://example.org/w").unwrap(),
            dns_names: vec![],
            ttl: life / 6,
        };
        let mut issued: Vec<(Vec<u8>, SystemTime)> = Vec::new();
        let mut activations = 0;
        let mut previous_roots: Option<Vec<Vec<u8>>> = None;
        let mut t = start;
        for _ in 0..200 {
            t += step;
            let log = set.tick(&store, t).unwrap();
            assert!(
                !(log.iter().any(|l| l.starts_with("prepared x509"))
                    && log.iter().any(|l| l.starts_with("activated x509"))),
                "prepare and activate in one step: {log:?}"
            );
            activations += log
                .iter()
                .filter(|l| l.starts_with("activated x509"))
                .count();
            let current = set.current();
            for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
                let active = current
                    .list()
                    .iter()
                    .filter(|a| a.kind == kind && a.state == SlotState::Active)
                    .count();
                assert_eq!(active, 1, "{kind:?} at {t:?}");
            }
            let left = set.x509().not_after().duration_since(t).unwrap();
            assert!(left >= life / 6 - step, "the active CA has {left:?} left");
            let svid = set.x509().issue_for_private_key(&key, &params, t).unwrap();
            // A peer whose bundle is one step old (it has not seen this step's
            // update yet) must already trust the SVID: the signing authority
            // was published a step before it signed anything.
            if let Some(previous) = &previous_roots {
                let (_, leaf) = x509_parser::parse_x509_certificate(svid.cert_der()).unwrap();
                let trusted = previous.iter().any(|r: &Vec<u8>| {
                    let (_, ca) = x509_parser::parse_x509_certificate(r).unwrap();
                    leaf.verify_signature(Some(ca.public_key())).is_ok()
                });
                assert!(
                    trusted,
                    "a fresh SVID is not trusted by last step's bundle at {t:?}"
                );
            }
            previous_roots = Some(current.bundle().x509_authorities().to_vec());
            assert!(
                svid.not_after() >= t + life / 6 - Duration::from_secs(1),
                "SVID cut short"
            );
            issued.push((svid.cert_der().to_vec(), svid.not_after()));
            let roots: Vec<_> = current
                .bundle()
                .x509_authorities()
                .iter()
                .map(|d| x509_parser::parse_x509_certificate(d).unwrap().1)
                .collect();
            for (der, not_after) in issued.iter().filter(|(_, na)| *na > t) {
                let (_, leaf) = x509_parser::parse_x509_certificate(der).unwrap();
                assert!(
                    roots
                        .iter()
                        .any(|r| leaf.verify_signature(Some(r.public_key())).is_ok()),
                    "an unexpired SVID (until {not_after:?}) no longer verifies at {t:?}"
                );
            }
        }
        assert!(activations >= 9, "{activations} rotations in 10 lifetimes");
        assert!(
            set.bundle().x509_authorities().len() <= 4,
            "expired authorities leave the bundle"
        );
    }
}
