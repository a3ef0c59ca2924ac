//! The PostgreSQL implementation of [`Store`], shared by several servers.
//!
//! - One row, `sigil_revision`, is taken `FOR UPDATE` by every commit: the
//!   commit's checks, writes, change record and the new revision land in one
//!   transaction, so revisions follow commit order with no gaps by
//!   construction (never inferred from a sequence).
//! - Each commit ends with `pg_notify('sigil_changes', revision)`; a listener
//!   on its own connection wakes this server when another one commits, and a
//!   poll of the revision every second covers a lost notification.
//! - Authorities are rows of their own (id, kind, state, sequence, sealed).
//! - Cluster-wide jobs run under session advisory locks ([`Store::try_lease`])
//!   held on a dedicated connection: a server that dies drops its leases.
//!
//! The [`Store`] trait is synchronous; this store runs its client on a small
//! runtime of its own and the calling thread waits for each answer.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::watch;

use super::pg_tls::MakeRustls;
use super::{
    AuthorityRecord, Check, Commit, Event, EventsSince, Kek, KeyValues, Store, StoreError, Table,
    advance, decode_changes, encode_changes, evaluate_checks, kek_check_value, verify_kek,
};

/// The schema version this build writes. A datastore one version ahead is
/// used as is (migrations are additive); further ahead is refused.
pub const PG_SCHEMA_VERSION: i32 = 1;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &["
CREATE TABLE sigil_revision (
    id smallint PRIMARY KEY CHECK (id = 1),
    revision bigint NOT NULL,
    compacted_through bigint NOT NULL
);
INSERT INTO sigil_revision VALUES (1, 0, 0);
CREATE TABLE sigil_kv (
    tbl smallint NOT NULL,
    key bytea NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (tbl, key)
);
CREATE TABLE sigil_authorities (
    id text COLLATE \"C\" PRIMARY KEY,
    kind text NOT NULL,
    state text NOT NULL,
    seq bigint NOT NULL,
    sealed bytea NOT NULL
);
CREATE TABLE sigil_events (
    revision bigint PRIMARY KEY,
    changes bytea NOT NULL
);
"];

/// The channel commits are announced on.
const CHANNEL: &str = "sigil_changes";
/// How often the revision is polled when no notification came.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// No store operation waits longer than this for the datastore.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Key of the advisory lock that serializes migrations.
const MIGRATION_LOCK: i64 = 0x5349_4749_4c00_0001;

/// A store on a PostgreSQL database shared by every server of a cluster.
pub struct PostgresStore {
    pool: Pool,
    config: tokio_postgres::Config,
    tls: MakeRustls,
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    kek: Kek,
    shown: String,
    revisions: watch::Sender<u64>,
    leases: Arc<tokio::sync::Mutex<Leases>>,
}

#[derive(Default)]
struct Leases {
    client: Option<tokio_postgres::Client>,
    held: HashSet<String>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("datastore", &self.shown)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's task would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn backend(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Backend(format!("PostgreSQL: {}", db.message())),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            StoreError::Backend(format!("PostgreSQL: {text}"))
        }
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => backend(e),
        other => StoreError::Backend(format!("PostgreSQL connection pool: {other}")),
    }
}

/// `url` with any password (in the user part or a `password` parameter)
/// replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "(an unreadable URL)".into();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if parsed.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn table_id(table: Table) -> i16 {
    table as i16
}

/// The authority ID a key names (authority IDs are hex or kid text).
fn authority_id(key: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(key).map_err(|_| StoreError::Corrupt {
        what: "authority key".into(),
        reason: "not UTF-8".into(),
    })
}

/// A lease's advisory-lock key: the first 8 bytes of SHA-256("sigil lease " + name).
fn lease_key(name: &str) -> i64 {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("sigil lease {name}").as_bytes(),
    );
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    i64::from_be_bytes(first)
}

/// The smallest key greater than every key starting with `prefix`, if any.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

async fn read<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    table: Table,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    let row = if table == Table::Authorities {
        client
            .query_opt(
                "SELECT sealed FROM sigil_authorities WHERE id = $1",
                &[&authority_id(key)?],
            )
            .await
    } else {
        client
            .query_opt(
                "SELECT value FROM sigil_kv WHERE tbl = $1 AND key = $2",
                &[&table_id(table), &key],
            )
            .await
    }
    .map_err(backend)?;
    Ok(row.map(|r| r.get(0)))
}

/// Checks a datastore URL as far as it can be without connecting: the
/// scheme, tokio-postgres's parameters, a database name, and the TLS
/// parameters (reading `sslrootcert`). The error says what is wrong.
pub fn check_datastore_url(url: &str) -> Result<(), String> {
    parse_url(url).map(|_| ())
}

fn parse_url(url: &str) -> Result<(tokio_postgres::Config, MakeRustls), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("not a PostgreSQL URL; expected postgres://USER@HOST:PORT/DB".into());
    }
    let tls = super::pg_tls::settings(url)?;
    let mut config = tokio_postgres::Config::from_str(&tls.url).map_err(|e| e.to_string())?;
    config.ssl_mode(tls.mode);
    if config.get_dbname().is_none() {
        return Err("the URL names no database (…/DB)".into());
    }
    Ok((config, tls.tls))
}

impl PostgresStore {
    /// Connects to `url` (`postgres://USER@HOST:PORT/DB`; the password may
    /// also come from `PGPASSWORD`), brings the schema up to this build's
    /// version, and checks the KEK against the one the datastore was first
    /// used with.
    pub fn connect(url: &str, kek: Kek) -> Result<Self, StoreError> {
        let shown = redact(url);
        let refuse = |reason: String| StoreError::Datastore {
            datastore: shown.clone(),
            reason,
        };
        let (mut config, tls) = parse_url(url).map_err(&refuse)?;
        if config.get_password().is_none() {
            if let Ok(p) = std::env::var("PGPASSWORD") {
                config.password(p);
            }
        }
        config
            .application_name("sigil")
            .connect_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sigil-datastore")
            .enable_all()
            .build()
            .map_err(|e| refuse(format!("cannot start the datastore runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| refuse(e.to_string()))?;
        let store = PostgresStore {
            pool,
            config,
            tls,
            runtime: Some(runtime),
            handle,
            kek,
            shown: shown.clone(),
            revisions: watch::Sender::new(0),
            leases: Arc::default(),
        };
        store.migrate().map_err(|e| match e {
            StoreError::Backend(reason) => refuse(reason),
            other => other,
        })?;
        let revision = store.revision()?;
        store.revisions.send_replace(revision);
        store.handle.spawn(follow(
            store.pool.clone(),
            (store.config.clone(), store.tls.clone()),
            store.revisions.clone(),
        ));
        Ok(store)
    }

    /// The datastore URL without its password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Runs `f` (the operation `op`) on the store's runtime and waits for
    /// it (bounded).
    fn run<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        crate::metrics::metrics()
            .datastore_ops
            .get_or_create(&crate::metrics::label("op", op))
            .inc();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let out = match tokio::time::timeout(OP_TIMEOUT, f).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Backend(format!(
                    "PostgreSQL did not answer within {}s",
                    OP_TIMEOUT.as_secs()
                ))),
            };
            let _ = tx.send(out);
        });
        let wait = || {
            rx.recv()
                .map_err(|_| StoreError::Backend("the datastore runtime stopped".into()))?
        };
        // Called on a worker of a multi-threaded runtime (an RPC handler,
        // the sync hub), the wait tells tokio to move the worker's other
        // tasks elsewhere: a slow or unreachable database then stalls this
        // call only, not the tasks queued behind it.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let pool = self.pool.clone();
        let check = kek_check_value(&self.kek)?;
        let (found, kek_check) = self.run("migrate", async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(backend)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(backend)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS sigil_schema (
                    id smallint PRIMARY KEY CHECK (id = 1),
                    version integer NOT NULL,
                    kek_check bytea NOT NULL
                )",
            )
            .await
            .map_err(backend)?;
            let row = tx
                .query_opt("SELECT version, kek_check FROM sigil_schema", &[])
                .await
                .map_err(backend)?;
            let (found, kek_check): (i32, Vec<u8>) = match row {
                Some(r) => (r.get(0), r.get(1)),
                None => {
                    tx.execute("INSERT INTO sigil_schema VALUES (1, 0, $1)", &[&check])
                        .await
                        .map_err(backend)?;
                    (0, check)
                }
            };
            if found > PG_SCHEMA_VERSION + 1 {
                return Ok((found, kek_check));
            }
            for version in found..PG_SCHEMA_VERSION {
                let sql = MIGRATIONS[usize::try_from(version).unwrap_or_default()];
                tx.batch_execute(sql).await.map_err(backend)?;
                tx.execute("UPDATE sigil_schema SET version = $1", &[&(version + 1)])
                    .await
                    .map_err(backend)?;
                tracing::info!(version = version + 1, "datastore schema migrated");
            }
            tx.commit().await.map_err(backend)?;
            Ok((found, kek_check))
        })?;
        if found > PG_SCHEMA_VERSION + 1 {
            return Err(StoreError::SchemaSkew {
                found: u32::try_from(found).unwrap_or_default(),
                supported: u32::try_from(PG_SCHEMA_VERSION).unwrap_or_default(),
            });
        }
        if found == PG_SCHEMA_VERSION + 1 {
            tracing::warn!(
                found,
                supported = PG_SCHEMA_VERSION,
                "the datastore schema is one version newer than this build; upgrade this server"
            );
        }
        verify_kek(&self.kek, &kek_check)
    }
}

/// Announces every revision another server commits: a LISTEN connection for
/// promptness, and a poll of the revision row every second in case a
/// notification is lost or the listener is reconnecting.
async fn follow(
    pool: Pool,
    (config, tls): (tokio_postgres::Config, MakeRustls),
    revisions: watch::Sender<u64>,
) {
    use futures_util::StreamExt;
    let publish = |r: u64| advance(&revisions, r);
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // (Re)connect the listener; without it, the poll alone carries on.
        let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
        let listener = match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(message)) = messages.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(n) = message {
                            if notes_tx.send(n.payload().parse::<u64>().ok()).is_err() {
                                return;
                            }
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => Some(client),
                    Err(e) => {
                        tracing::warn!(error = %backend(e), "cannot listen for datastore changes; polling");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %backend(e), "cannot connect the datastore listener; polling");
                None
            }
        };
        loop {
            tokio::select! {
                note = notes.recv(), if listener.is_some() => match note {
                    Some(Some(r)) => publish(r),
                    Some(None) => {}
                    None => break, // the listener's connection ended
                },
                _ = poll.tick() => {
                    if let Ok(client) = pool.get().await {
                        if let Ok(row) = client
                            .query_one("SELECT revision FROM sigil_revision WHERE id = 1", &[])
                            .await
                        {
                            publish(u64_of(row.get(0)));
                        }
                    }
                    if listener.is_none() {
                        break;
                    }
                }
            }
        }
    }
}

impl Store for PostgresStore {
    fn revision(&self) -> Result<u64, StoreError> {
        let pool = self.pool.clone();
        self.run("revision", async move {
            let client = pool.get().await.map_err(pool_error)?;
            let row = client
                .query_one("SELECT revision FROM sigil_revision WHERE id = 1", &[])
                .await
                .map_err(backend)?;
            Ok(u64_of(row.get(0)))
        })
    }

    fn commit(&self, commit: Commit) -> Result<u64, StoreError> {
        let pool = self.pool.clone();
        // The labels of each authority written, read here (the KEK stays
        // with the store); the sealed value is what is stored.
        let mut labels = HashMap::new();
        for w in commit.writes() {
            if let (Table::Authorities, Some(value)) = (w.table, &w.value) {
                let record = AuthorityRecord::unseal(&self.kek, &w.key, value)?;
                labels.insert(
                    w.key.clone(),
                    (
                        crate::ca::kind_name(record.kind),
                        crate::ca::state_name(record.state),
                    ),
                );
            }
        }
        let revision = self.run("commit", async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(backend)?;
            let row = tx
                .query_one(
                    "SELECT revision FROM sigil_revision WHERE id = 1 FOR UPDATE",
                    &[],
                )
                .await
                .map_err(backend)?;
            let current = u64_of(row.get(0));
            // Read what the checks look at, under the revision lock.
            let mut seen = Vec::new();
            for check in commit.checks() {
                if let Check::Exists(t, k) | Check::Absent(t, k) | Check::Equals(t, k, _) = check {
                    seen.push((*t, k.clone(), read(&*tx, *t, k).await?));
                }
            }
            let verdict = evaluate_checks(commit.checks(), current, |t, k| {
                Ok::<_, StoreError>(
                    seen.iter()
                        .find(|(st, sk, _)| *st == t && sk.as_slice() == k)
                        .and_then(|(_, _, v)| v.clone()),
                )
            })?;
            if let Err(failure) = verdict {
                return Err(StoreError::CheckFailed(failure));
            }
            if commit.writes().is_empty() {
                return Ok(current);
            }
            let next = current + 1;
            // The last write to each key wins; the rest of the table
            // writes go in two statements, whatever the commit's size.
            let mut last: HashMap<(Table, &[u8]), Option<&Vec<u8>>> = HashMap::new();
            let mut order = Vec::new();
            for w in commit.writes() {
                if last.insert((w.table, &w.key), w.value.as_ref()).is_none() {
                    order.push((w.table, w.key.as_slice()));
                }
            }
            let (mut put_tbl, mut put_key, mut put_value) = (Vec::new(), Vec::new(), Vec::new());
            let (mut del_tbl, mut del_key) = (Vec::new(), Vec::new());
            for (table, key) in order {
                let value = last[&(table, key)];
                match (value, table) {
                    (Some(value), Table::Authorities) => {
                        let (kind, state) = labels.get(key).copied().unwrap_or_default();
                        tx.execute(
                            "INSERT INTO sigil_authorities (id, kind, state, seq, sealed)
                             VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (id) DO UPDATE SET kind = $2, state = $3, seq = $4, sealed = $5",
                            &[&authority_id(key)?, &kind, &state, &i64_of(next), value],
                        )
                        .await
                        .map_err(backend)?;
                    }
                    (None, Table::Authorities) => {
                        tx.execute(
                            "DELETE FROM sigil_authorities WHERE id = $1",
                            &[&authority_id(key)?],
                        )
                        .await
                        .map_err(backend)?;
                    }
                    (Some(value), table) => {
                        put_tbl.push(table_id(table));
                        put_key.push(key);
                        put_value.push(value.as_slice());
                    }
                    (None, table) => {
                        del_tbl.push(table_id(table));
                        del_key.push(key);
                    }
                }
            }
            if !put_key.is_empty() {
                tx.execute(
                    "INSERT INTO sigil_kv (tbl, key, value)
                     SELECT * FROM UNNEST($1::smallint[], $2::bytea[], $3::bytea[])
                     ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value",
                    &[&put_tbl, &put_key, &put_value],
                )
                .await
                .map_err(backend)?;
            }
            if !del_key.is_empty() {
                tx.execute(
                    "DELETE FROM sigil_kv WHERE (tbl, key) IN
                     (SELECT * FROM UNNEST($1::smallint[], $2::bytea[]))",
                    &[&del_tbl, &del_key],
                )
                .await
                .map_err(backend)?;
            }
            tx.execute(
                "INSERT INTO sigil_events (revision, changes) VALUES ($1, $2)",
                &[&i64_of(next), &encode_changes(commit.writes())],
            )
            .await
            .map_err(backend)?;
            tx.execute(
                "UPDATE sigil_revision SET revision = $1 WHERE id = 1",
                &[&i64_of(next)],
            )
            .await
            .map_err(backend)?;
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &next.to_string()],
            )
            .await
            .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            Ok(next)
        })?;
        advance(&self.revisions, revision);
        Ok(revision)
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let pool = self.pool.clone();
        let key = key.to_vec();
        self.run("get", async move {
            let client = pool.get().await.map_err(pool_error)?;
            read(&**client, table, &key).await
        })
    }

    fn get_many(&self, table: Table, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if table == Table::Authorities || keys.len() < 2 {
            return keys.iter().map(|k| self.get(table, k)).collect();
        }
        let pool = self.pool.clone();
        let wanted: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        let mut found: HashMap<Vec<u8>, Vec<u8>> = self.run("get_many", async move {
            let client = pool.get().await.map_err(pool_error)?;
            let statement = client
                .prepare_cached("SELECT key, value FROM sigil_kv WHERE tbl = $1 AND key = ANY($2)")
                .await
                .map_err(backend)?;
            let rows = client
                .query(&statement, &[&table_id(table), &wanted])
                .await
                .map_err(backend)?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })?;
        Ok(keys.iter().map(|k| found.remove(*k)).collect())
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KeyValues, StoreError> {
        let pool = self.pool.clone();
        let prefix = prefix.to_vec();
        let after = after.map(<[u8]>::to_vec);
        if table == Table::Authorities {
            // A handful of rows: read them all, filter here.
            let keep = move |k: &[u8]| {
                k.starts_with(&prefix) && after.as_ref().is_none_or(|a| k > a.as_slice())
            };
            return self.run("scan", async move {
                let client = pool.get().await.map_err(pool_error)?;
                let rows = client
                    .query("SELECT id, sealed FROM sigil_authorities ORDER BY id", &[])
                    .await
                    .map_err(backend)?;
                Ok(rows
                    .into_iter()
                    .map(|r| (r.get::<_, String>(0).into_bytes(), r.get::<_, Vec<u8>>(1)))
                    .filter(|(k, _)| keep(k))
                    .take(limit)
                    .collect())
            });
        }
        // Index range: from the prefix (or strictly after `after`, when that
        // is further on) to the end of the prefix.
        let (lower, strict) = match &after {
            Some(a) if a.as_slice() >= prefix.as_slice() => (a.clone(), true),
            _ => (prefix.clone(), false),
        };
        let upper = prefix_end(&prefix);
        let sql = format!(
            "SELECT key, value FROM sigil_kv WHERE tbl = $1 AND key {} $2{} ORDER BY key LIMIT $3",
            if strict { ">" } else { ">=" },
            if upper.is_some() { " AND key < $4" } else { "" },
        );
        let limit = i64_of(limit as u64);
        self.run("scan", async move {
            let client = pool.get().await.map_err(pool_error)?;
            let statement = client.prepare_cached(&sql).await.map_err(backend)?;
            let t = table_id(table);
            let rows = match &upper {
                Some(u) => client.query(&statement, &[&t, &lower, &limit, u]).await,
                None => client.query(&statement, &[&t, &lower, &limit]).await,
            }
            .map_err(backend)?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
                .collect())
        })
    }

    fn events_since(&self, after: u64, limit: usize) -> Result<EventsSince, StoreError> {
        let pool = self.pool.clone();
        self.run("events_since", async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            // One snapshot: the horizon and the events agree.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(backend)?;
            let row = tx
                .query_one(
                    "SELECT compacted_through FROM sigil_revision WHERE id = 1",
                    &[],
                )
                .await
                .map_err(backend)?;
            let compacted = u64_of(row.get(0));
            if after < compacted {
                return Ok(EventsSince::Compacted {
                    oldest: compacted + 1,
                });
            }
            let rows = tx
                .query(
                    "SELECT revision, changes FROM sigil_events WHERE revision > $1
                     ORDER BY revision LIMIT $2",
                    &[&i64_of(after), &i64_of(limit as u64)],
                )
                .await
                .map_err(backend)?;
            let events = rows
                .iter()
                .map(|r| decode_changes(u64_of(r.get(0)), r.get::<_, &[u8]>(1)))
                .collect::<Result<Vec<Event>, _>>()?;
            tx.commit().await.map_err(backend)?;
            Ok(EventsSince::Events(events))
        })
    }

    fn size_on_disk(&self) -> Option<u64> {
        let pool = self.pool.clone();
        self.run("size", async move {
            let client = pool.get().await.map_err(pool_error)?;
            let row = client
                .query_one("SELECT pg_database_size(current_database())", &[])
                .await
                .map_err(backend)?;
            Ok(u64_of(row.get(0)))
        })
        .ok()
    }

    fn compact_events(&self, through: u64) -> Result<(), StoreError> {
        let pool = self.pool.clone();
        self.run("compact", async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(backend)?;
            let moved = tx
                .execute(
                    "UPDATE sigil_revision SET compacted_through = $1
                     WHERE id = 1 AND compacted_through < $1",
                    &[&i64_of(through)],
                )
                .await
                .map_err(backend)?;
            if moved == 1 {
                tx.execute(
                    "DELETE FROM sigil_events WHERE revision <= $1",
                    &[&i64_of(through)],
                )
                .await
                .map_err(backend)?;
            }
            tx.commit().await.map_err(backend)
        })
    }

    fn kek(&self) -> &Kek {
        &self.kek
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.revisions.subscribe())
    }

    fn try_lease(&self, name: &str) -> Result<bool, StoreError> {
        let leases = self.leases.clone();
        let config = self.config.clone();
        let tls = self.tls.clone();
        let name = name.to_string();
        self.run("lease", async move {
            let mut leases = leases.lock().await;
            let Leases { client, held } = &mut *leases;
            let client = match client {
                Some(c) if !c.is_closed() => c,
                _ => {
                    // A new session holds nothing: leases held on the old
                    // one went with it.
                    held.clear();
                    let (c, connection) = config.connect(tls).await.map_err(backend)?;
                    tokio::spawn(connection);
                    client.insert(c)
                }
            };
            if held.contains(&name) {
                // Still ours while the session lives: prove it does.
                client.simple_query("").await.map_err(backend)?;
                return Ok(true);
            }
            let row = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&lease_key(&name)])
                .await
                .map_err(backend)?;
            let won: bool = row.get(0);
            if won {
                held.insert(name);
            }
            Ok(won)
        })
    }
}
