//! A child process writes to a sled store and is SIGKILLed at random points,
//! over and over. Every write it reported as acknowledged must survive.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sigil::store::{AuthorityKind, AuthorityRecord, Commit, SlotState, Table};
use sigil::{KeyAlgorithm, PrivateKey, SledStore, Store};

const CHILD_ENV: &str = "SIGIL_CRASH_CHILD_DIR";

fn entry_key(i: u64) -> String {
    format!("k{i:010}")
}

/// Runs only inside the child process the parent test spawns.
#[test]
#[ignore = "spawned by store_survives_sigkill"]
fn store_crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let store = SledStore::open_with_kek_file(&dir.join("data"), &dir.join("kek")).unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
    let mut i = store.revision().unwrap();
    let mut out = std::io::stdout();
    loop {
        if i % 7 == 0 {
            let record = AuthorityRecord {
                id: format!("auth{i}"),
                kind: AuthorityKind::Jwt,
                state: SlotState::Active,
                cert_der: None,
                not_after: i,
                key: key.clone(),
                upstream_chain: Vec::new(),
                upstream_roots: Vec::new(),
            };
            store.put_authority(&record).unwrap();
            writeln!(out, "ack-auth {i}").unwrap();
        } else {
            store
                .commit(Commit::new().put(Table::Entries, entry_key(i), i.to_be_bytes().to_vec()))
                .unwrap();
            writeln!(out, "ack {i}").unwrap();
        }
        out.flush().unwrap();
        i += 1;
    }
}

/// Runs the ignored test `child` of this binary (with `env` naming `dir`),
/// waits for its first line, lets it run `ms` more, SIGKILLs it, and returns
/// every line it printed (its acknowledgements).
pub(crate) fn run_until_killed(
    child: &str,
    env: &str,
    dir: &std::path::Path,
    ms: u64,
) -> Vec<String> {
    let mut process = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", child, "--nocapture"])
        .env(env, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = process.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("child never acknowledged");
    let mut lines = vec![first];
    std::thread::sleep(Duration::from_millis(ms));
    process.kill().unwrap(); // SIGKILL
    process.wait().unwrap();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    lines
}

pub(crate) fn jitter_ms(max: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u64::from(nanos) % max
}

#[test]
fn store_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: Vec<u64> = Vec::new();
    let mut acked_auth: Vec<u64> = Vec::new();
    for round in 0..8 {
        let lines = run_until_killed(
            "store_crash::store_crash_child",
            CHILD_ENV,
            dir.path(),
            20 + jitter_ms(300),
        );
        for line in lines {
            if let Some(n) = line.strip_prefix("ack ") {
                acked.push(n.parse().unwrap());
            } else if let Some(n) = line.strip_prefix("ack-auth ") {
                acked_auth.push(n.parse().unwrap());
            }
        }

        let store =
            SledStore::open_with_kek_file(&dir.path().join("data"), &dir.path().join("kek"))
                .unwrap_or_else(|e| panic!("round {round}: store does not reopen: {e}"));
        for i in &acked {
            assert_eq!(
                store.get(Table::Entries, entry_key(*i).as_bytes()).unwrap(),
                Some(i.to_be_bytes().to_vec()),
                "round {round}: acknowledged write {i} lost"
            );
        }
        let auths: Vec<String> = store
            .authorities()
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect();
        for i in &acked_auth {
            assert!(
                auths.contains(&format!("auth{i}")),
                "round {round}: authority {i} lost"
            );
        }
        let last = acked.iter().chain(&acked_auth).max().copied().unwrap_or(0);
        assert!(
            store.revision().unwrap() >= last,
            "round {round}: revision went back"
        );
    }
    assert!(
        acked.len() > 8,
        "too few writes to mean anything: {}",
        acked.len()
    );
}

/// A store file damaged on disk is refused at open with a clear error (never
/// a panic, never a healthy-looking server that fails its reads later).
#[test]
fn a_damaged_store_is_refused_at_open() {
    for damage in ["truncate", "overwrite"] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        {
            let store = SledStore::open_with_kek_file(&data, &dir.path().join("kek")).unwrap();
            for i in 0..2000u64 {
                store
                    .commit(Commit::new().put(Table::Entries, entry_key(i), vec![b'x'; 200]))
                    .unwrap();
            }
        }
        // The biggest file in the store holds the data.
        let mut files: Vec<(u64, std::path::PathBuf)> = Vec::new();
        let mut dirs = vec![data.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    dirs.push(e.path());
                } else {
                    files.push((meta.len(), e.path()));
                }
            }
        }
        files.sort();
        let (len, file) = files.last().unwrap().clone();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        match damage {
            "truncate" => f.set_len(len / 2).unwrap(),
            _ => {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&vec![0xA5; (len / 2) as usize], len / 4)
                    .unwrap();
            }
        }
        drop(f);
        let opened = std::panic::catch_unwind(|| {
            SledStore::open_with_kek_file(&data, &dir.path().join("kek")).map(|s| {
                // Whatever opened must read back every entry intact.
                (0..2000u64).all(|i| {
                    s.get(Table::Entries, entry_key(i).as_bytes())
                        .ok()
                        .flatten()
                        .is_some_and(|v| v == vec![b'x'; 200])
                })
            })
        });
        match opened {
            Err(_) => panic!("{damage}: opening a damaged store panicked"),
            Ok(Ok(intact)) => assert!(intact, "{damage}: opened, but entries are lost"),
            Ok(Err(e)) => {
                let e = e.to_string();
                assert!(e.contains(&data.display().to_string()), "{damage}: {e}");
            }
        }
    }
}
