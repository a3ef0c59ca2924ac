//! One behavioural suite, run against every backend.

use super::*;
use crate::x509::KeyAlgorithm;

fn suite(store: &dyn Store) {
    assert_eq!(store.revision().unwrap(), 0);

    // Writes bump the revision once per commit and are readable.
    let r1 = store
        .commit(
            Commit::new()
                .put(Table::Entries, "a", "1")
                .put(Table::Entries, "b", "2"),
        )
        .unwrap();
    assert_eq!(r1, 1);
    assert_eq!(
        store.get(Table::Entries, b"a").unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(store.get(Table::Agents, b"a").unwrap(), None);

    // A failed check writes nothing and does not bump the revision.
    let err = store
        .commit(
            Commit::new()
                .require_absent(Table::Entries, "a")
                .put(Table::Entries, "c", "3"),
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::CheckFailed(CheckFailure::Exists { .. })),
        "{err}"
    );
    assert_eq!(store.get(Table::Entries, b"c").unwrap(), None);
    assert_eq!(store.revision().unwrap(), 1);

    let err = store
        .commit(
            Commit::new()
                .require_exists(Table::JoinTokens, "t")
                .delete(Table::JoinTokens, "t"),
        )
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::CheckFailed(CheckFailure::Missing { .. })
    ));

    // Compare-and-swap on revision.
    let err = store
        .commit(Commit::new().at_revision(0).put(Table::Entries, "x", "y"))
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::CheckFailed(CheckFailure::Revision {
            expected: 0,
            actual: 1
        })
    ));
    let r2 = store
        .commit(
            Commit::new()
                .at_revision(1)
                .delete(Table::Entries, "b")
                .put(Table::Bundle, "td", "x"),
        )
        .unwrap();
    assert_eq!(r2, 2);

    // Compare-and-swap on one key's value.
    let err = store
        .commit(
            Commit::new()
                .require_equals(Table::Entries, "a", "stale")
                .put(Table::Entries, "a", "9"),
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::CheckFailed(CheckFailure::Changed { .. })),
        "{err}"
    );
    assert_eq!(
        store.get(Table::Entries, b"a").unwrap(),
        Some(b"1".to_vec())
    );
    let err = store
        .commit(
            Commit::new()
                .require_equals(Table::Entries, "missing", "x")
                .put(Table::Entries, "m", "1"),
        )
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::CheckFailed(CheckFailure::Changed { .. })
    ));

    // Consume-once: exactly one of two identical consuming commits wins.
    store
        .commit(Commit::new().put(Table::JoinTokens, "tok", "v"))
        .unwrap();
    let consume = || {
        Commit::new()
            .require_exists(Table::JoinTokens, "tok")
            .delete(Table::JoinTokens, "tok")
    };
    assert!(store.commit(consume()).is_ok());
    assert!(store.commit(consume()).is_err());

    // Scans are ordered, prefix-bounded and pageable.
    for k in ["p/1", "p/2", "p/3", "q/1"] {
        store
            .commit(Commit::new().put(Table::Agents, k, k))
            .unwrap();
    }
    let page = store.scan(Table::Agents, b"p/", None, 2).unwrap();
    let keys: Vec<&[u8]> = page.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(keys, [b"p/1".as_slice(), b"p/2"]);
    let page = store.scan(Table::Agents, b"p/", Some(b"p/2"), 10).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].0, b"p/3");

    // The event log records every change, in order.
    let EventsSince::Events(events) = store.events_since(0, 100).unwrap() else {
        panic!("not compacted yet");
    };
    let revisions: Vec<u64> = events.iter().map(|e| e.revision).collect();
    let now = store.revision().unwrap();
    assert_eq!(revisions, (1..=now).collect::<Vec<_>>());
    assert_eq!(
        events[1].changes,
        vec![
            Change {
                table: Table::Entries,
                key: b"b".to_vec(),
                deleted: true
            },
            Change {
                table: Table::Bundle,
                key: b"td".to_vec(),
                deleted: false
            },
        ]
    );
    let EventsSince::Events(tail) = store.events_since(now - 1, 100).unwrap() else {
        panic!()
    };
    assert_eq!(tail.len(), 1);
    let EventsSince::Events(limited) = store.events_since(0, 2).unwrap() else {
        panic!()
    };
    assert_eq!(limited.len(), 2);

    // Compaction: older readers are told to resync.
    store.compact_events(2).unwrap();
    assert_eq!(
        store.events_since(1, 10).unwrap(),
        EventsSince::Compacted { oldest: 3 }
    );
    let EventsSince::Events(after) = store.events_since(2, 100).unwrap() else {
        panic!()
    };
    assert_eq!(after.first().map(|e| e.revision), Some(3));

    // Empty commits check without writing.
    assert_eq!(store.commit(Commit::new().at_revision(now)).unwrap(), now);

    // Authorities are sealed: the raw table value does not contain the key.
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let record = AuthorityRecord {
        id: "auth-1".into(),
        kind: AuthorityKind::Jwt,
        state: SlotState::Active,
        cert_der: None,
        not_after: 123,
        key: key.clone(),
        upstream_chain: Vec::new(),
        upstream_roots: Vec::new(),
    };
    store.put_authority(&record).unwrap();
    let raw = store.get(Table::Authorities, b"auth-1").unwrap().unwrap();
    let pkcs8 = key.pkcs8_der();
    assert!(!raw.windows(16).any(|w| pkcs8.windows(16).any(|p| p == w)));
    assert_eq!(store.authorities().unwrap(), vec![record.clone()]);
    store.delete_authority("auth-1").unwrap();
    assert!(store.authorities().unwrap().is_empty());

    // Within one commit, the last write to a key wins.
    store
        .commit(
            Commit::new()
                .put(Table::JoinTokens, "t", "1")
                .put(Table::JoinTokens, "t", "2")
                .put(Table::JoinTokens, "u", "1")
                .delete(Table::JoinTokens, "u"),
        )
        .unwrap();
    assert_eq!(
        store.get(Table::JoinTokens, b"t").unwrap(),
        Some(b"2".to_vec())
    );
    assert_eq!(store.get(Table::JoinTokens, b"u").unwrap(), None);
}

#[test]
fn memory_store_semantics() {
    suite(&MemoryStore::new().unwrap());
}

#[test]
fn sled_store_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::load_or_create(&dir.path().join("kek")).unwrap();
    suite(&SledStore::open(&dir.path().join("data"), kek).unwrap());
}

#[test]
fn sled_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let kek_path = dir.path().join("kek");
    let data = dir.path().join("data");
    let key = PrivateKey::generate(KeyAlgorithm::EcP384).unwrap();
    {
        let s = SledStore::open_with_kek_file(&data, &kek_path).unwrap();
        s.commit(Commit::new().put(Table::Entries, "e", "v"))
            .unwrap();
        s.put_authority(&AuthorityRecord {
            id: "x".into(),
            kind: AuthorityKind::X509,
            state: SlotState::Prepared,
            cert_der: Some(vec![1, 2, 3]),
            not_after: 9,
            key: key.clone(),
            upstream_chain: Vec::new(),
            upstream_roots: Vec::new(),
        })
        .unwrap();
    }
    let s = SledStore::open_with_kek_file(&data, &kek_path).unwrap();
    assert_eq!(s.revision().unwrap(), 2);
    assert_eq!(s.get(Table::Entries, b"e").unwrap(), Some(b"v".to_vec()));
    let auths = s.authorities().unwrap();
    assert_eq!(auths.len(), 1);
    assert_eq!(auths[0].key, key);
    assert_eq!(auths[0].state, SlotState::Prepared);
}

#[test]
fn sled_store_refuses_wrong_kek() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    drop(SledStore::open_with_kek_file(&data, &dir.path().join("kek-a")).unwrap());
    let err = SledStore::open_with_kek_file(&data, &dir.path().join("kek-b")).unwrap_err();
    assert!(matches!(err, StoreError::WrongKek { .. }), "{err}");
    assert!(err.to_string().contains("kek-b"), "{err}");
}

#[test]
fn sled_store_refuses_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let kek = dir.path().join("kek");
    drop(SledStore::open_with_kek_file(&data, &kek).unwrap());
    {
        // sled's background flusher lets go of the file lock shortly after
        // the store is dropped: wait for it (generously).
        let db = (0..500)
            .find_map(|_| {
                sled::open(data.join("db")).map_or_else(
                    |_| {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        None
                    },
                    Some,
                )
            })
            .expect("the dropped store never released its lock");
        let meta = db.open_tree("meta").unwrap();
        meta.insert(META_SCHEMA_FOR_TEST, &(SCHEMA_VERSION + 1).to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open_with_kek_file(&data, &kek).unwrap_err();
    assert!(
        matches!(err, StoreError::NewerSchema { found, supported } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade sigil"));
}

const META_SCHEMA_FOR_TEST: &[u8] = b"schema_version";

#[test]
fn concurrent_consumers_of_one_key_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::load_or_create(&dir.path().join("kek")).unwrap();
    let store = std::sync::Arc::new(SledStore::open(&dir.path().join("d"), kek).unwrap());
    for round in 0..20 {
        let key = format!("tok{round}");
        store
            .commit(Commit::new().put(Table::JoinTokens, key.as_str(), "v"))
            .unwrap();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                let key = key.clone();
                std::thread::spawn(move || {
                    store
                        .commit(
                            Commit::new()
                                .require_exists(Table::JoinTokens, key.as_str())
                                .delete(Table::JoinTokens, key.as_str()),
                        )
                        .is_ok()
                })
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|won| *won)
            .count();
        assert_eq!(wins, 1, "round {round}: {wins} consumers won");
    }
}

/// A throwaway PostgreSQL for the tests below. Without PostgreSQL installed
/// they fail (CI installs it), unless SIGIL_SKIP_POSTGRES=1 says to skip.
fn temp_pg() -> Option<TempPostgres> {
    if std::env::var_os("SIGIL_SKIP_POSTGRES").is_some() {
        return None;
    }
    Some(TempPostgres::start().unwrap())
}

fn pg_store(pg: &TempPostgres, kek: &std::path::Path) -> Result<PostgresStore, StoreError> {
    PostgresStore::connect(&pg.url("postgres"), Kek::load_or_create(kek).unwrap())
}

#[test]
fn postgres_store_semantics_schema_kek_leases_and_change_feed() {
    let Some(pg) = temp_pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    let store = pg_store(&pg, &kek).unwrap();
    suite(&store);
    // One row per authority, with its labels readable by an operator.
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let record = AuthorityRecord {
        id: "auth-9".into(),
        kind: AuthorityKind::Jwt,
        state: SlotState::Tainted,
        cert_der: None,
        not_after: 9,
        key,
        upstream_chain: Vec::new(),
        upstream_roots: Vec::new(),
    };
    let r = store.put_authority(&record).unwrap();
    assert_eq!(
        pg.sql(
            "postgres",
            "SELECT id, kind, state, seq FROM sigil_authorities"
        )
        .unwrap(),
        format!("auth-9|jwt|tainted|{r}")
    );
    assert_eq!(
        pg.sql("postgres", "SELECT version FROM sigil_schema")
            .unwrap(),
        PG_SCHEMA_VERSION.to_string()
    );

    // A second server on the same datastore sees the first one's commits,
    // announced on its change feed.
    let other = pg_store(&pg, &kek).unwrap();
    let mut changes = other.changes().unwrap();
    let before = *changes.borrow_and_update();
    let r = store
        .commit(Commit::new().put(Table::Entries, "from-a", "1"))
        .unwrap();
    assert!(r > before);
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                changes.wait_for(|seen| *seen >= r),
            )
            .await
            .expect("the commit was never announced to the other store")
            .map(|_| ())
        })
        .unwrap();
    assert_eq!(
        other.get(Table::Entries, b"from-a").unwrap(),
        Some(b"1".to_vec())
    );

    // A lease has one holder until its session ends.
    assert!(store.try_lease("job").unwrap());
    assert!(store.try_lease("job").unwrap(), "a holder keeps its lease");
    assert!(!other.try_lease("job").unwrap());
    assert!(other.try_lease("another-job").unwrap());
    drop(store);
    // The session ends as the store drops; PostgreSQL frees its locks when
    // it notices (waited for, generously).
    let freed = (0..600).any(|_| {
        other.try_lease("job").unwrap() || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            false
        }
    });
    assert!(freed, "the lease never freed");

    // Another KEK is refused, naming the problem.
    let err = pg_store(&pg, &dir.path().join("other-kek")).unwrap_err();
    assert!(matches!(err, StoreError::WrongKek { .. }), "{err}");

    // A schema one version ahead is used (migrations are additive); two
    // versions ahead is refused with a message that says what to do.
    pg.sql(
        "postgres",
        &format!(
            "UPDATE sigil_schema SET version = {}",
            PG_SCHEMA_VERSION + 1
        ),
    )
    .unwrap();
    pg_store(&pg, &kek).unwrap();
    pg.sql(
        "postgres",
        &format!(
            "UPDATE sigil_schema SET version = {}",
            PG_SCHEMA_VERSION + 2
        ),
    )
    .unwrap();
    let err = pg_store(&pg, &kek).unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaSkew { .. }) && err.to_string().contains("upgrade sigil"),
        "{err}"
    );
}

#[test]
fn postgres_concurrent_commits_get_gap_free_revisions_in_commit_order() {
    let Some(pg) = temp_pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    let stores: Vec<_> = (0..3)
        .map(|_| std::sync::Arc::new(pg_store(&pg, &kek).unwrap()))
        .collect();
    let handles: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(i, store)| {
            let store = store.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|n| {
                        store
                            .commit(Commit::new().put(Table::Entries, format!("{i}/{n}"), "v"))
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (1..=150).collect::<Vec<_>>());
    let EventsSince::Events(events) = stores[0].events_since(0, 1000).unwrap() else {
        panic!("compacted");
    };
    let revisions: Vec<u64> = events.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, all);
    // Same consumer-race as on sled: one winner per key across servers.
    stores[0]
        .commit(Commit::new().put(Table::JoinTokens, "tok", "v"))
        .unwrap();
    let wins = stores
        .iter()
        .map(|s| {
            let s = s.clone();
            std::thread::spawn(move || {
                s.commit(
                    Commit::new()
                        .require_exists(Table::JoinTokens, "tok")
                        .delete(Table::JoinTokens, "tok"),
                )
                .is_ok()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|won| *won)
        .count();
    assert_eq!(wins, 1);
}

#[test]
fn postgres_over_tls_checks_the_server_as_sslmode_says() {
    use crate::ca::{X509Authority, X509SvidParams};
    let Some(mut pg) = temp_pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    let td = crate::TrustDomain::new("example.org").unwrap();
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    let ca = X509Authority::self_signed(&td, KeyAlgorithm::EcP256, day, now).unwrap();
    let other = X509Authority::self_signed(&td, KeyAlgorithm::EcP256, day, now).unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let params = X509SvidParams {
        spiffe_id: crate::SpiffeId::new("spiffe://example.org/postgres").unwrap(),
        dns_names: vec!["localhost".into()],
        ttl: std::time::Duration::from_secs(3600),
    };
    let leaf = ca
        .issue_from_csr(
            &key.csr_der("spiffe://example.org/postgres").unwrap(),
            &params,
            now,
        )
        .unwrap();
    pg.enable_tls(&crate::x509::certs_to_pem(leaf.chain()), &key.to_pem())
        .unwrap();
    let roots = |name: &str, der: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, crate::x509::certs_to_pem([&der.to_vec()])).unwrap();
        path.display().to_string()
    };
    let ours = roots("ca.pem", ca.cert_der());
    let theirs = roots("other.pem", other.cert_der());
    let url =
        |host: &str, query: &str| format!("postgres://sigil@{host}:{}/postgres?{query}", pg.port());
    let connect =
        |url: String| PostgresStore::connect(&url, Kek::load_or_create(&kek).unwrap()).map(|_| ());
    let tls_sessions = || {
        pg.sql(
            "postgres",
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE ssl AND application_name = 'sigil'",
        )
        .unwrap()
    };

    // The name and the chain are checked, and the sessions are encrypted.
    let store = PostgresStore::connect(
        &url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ours}"),
        ),
        Kek::load_or_create(&kek).unwrap(),
    )
    .unwrap();
    assert_ne!(tls_sessions().trim(), "0");
    store
        .commit(Commit::new().put(Table::Entries, "over-tls", "1"))
        .unwrap();
    drop(store);

    // verify-full refuses a certificate that does not name the host;
    // verify-ca takes it.
    let e = connect(url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ours}"),
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("certificate"), "{e}");
    connect(url(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ours}"),
    ))
    .unwrap();
    // Another CA is refused, with require too once a root file is given
    // (as libpq does); require alone encrypts without checking.
    for mode in ["verify-ca", "require"] {
        let e = connect(url(
            "localhost",
            &format!("sslmode={mode}&sslrootcert={theirs}"),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("certificate"), "{mode}: {e}");
    }
    connect(url("localhost", "sslmode=require")).unwrap();
    connect(url("localhost", "sslmode=disable")).unwrap();

    // A password login bound to the TLS channel (SCRAM-SHA-256-PLUS, with
    // tls-server-end-point): it succeeds only if the binding is right.
    let hba = pg.dir().join("data/pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host all scram 0.0.0.0/0 scram-sha-256\nhost all scram ::/0 scram-sha-256\n{rules}"
        ),
    )
    .unwrap();
    pg.sql("postgres", "CREATE ROLE scram LOGIN PASSWORD 'pw'")
        .unwrap();
    pg.sql("postgres", "CREATE DATABASE scram OWNER scram")
        .unwrap();
    pg.sql("postgres", "SELECT pg_reload_conf()").unwrap();
    let bound = format!(
        "postgres://scram:pw@localhost:{}/scram?sslmode=verify-full&sslrootcert={ours}&channel_binding=require",
        pg.port()
    );
    PostgresStore::connect(&bound, Kek::load_or_create(&kek).unwrap()).unwrap();
    let e = PostgresStore::connect(
        &bound.replace(":pw@", ":wrong@"),
        Kek::load_or_create(&kek).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("password"), "{e}");
    assert!(!e.contains("wrong"), "the password shows: {e}");
}

#[test]
fn datastore_urls_are_shown_without_passwords() {
    assert_eq!(
        redact("postgres://sigil:s3cret@db:5432/sigil?sslmode=require"),
        "postgres://sigil:***@db:5432/sigil?sslmode=require"
    );
    assert_eq!(
        redact("postgresql://db/sigil?user=sigil&password=s3cret"),
        "postgresql://db/sigil?user=sigil&password=***"
    );
    assert_eq!(
        redact("postgres://sigil@db/sigil"),
        "postgres://sigil@db/sigil"
    );
    assert!(!redact("postgres://a:hunter2@[::1:5432/x").contains("hunter2"));
}
