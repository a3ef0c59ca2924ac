//! CA slot transitions survive SIGKILL at any moment: a child process moves
//! authorities through prepare → activate → taint → revoke in a loop and is
//! killed at random points, 50 times; after every kill the store reopens as a
//! restarted server would and must show exactly one active authority per
//! kind, every authority ever published still held (unless revoked), and no
//! acknowledged transition lost.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

use crate::store_crash::{jitter_ms, run_until_killed};

use sigil::ca::{CaOptions, CaSet};
use sigil::store::{AuthorityKind, SlotState};
use sigil::{KeyAlgorithm, SledStore, TrustDomain};

const CHILD_ENV: &str = "SIGIL_CA_CRASH_CHILD_DIR";

fn opts() -> CaOptions {
    CaOptions {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        key_algorithm: KeyAlgorithm::EcP256,
        ca_ttl: Duration::from_secs(3600),
        upstream: None,
        refresh_hint: Duration::from_secs(300),
    }
}

fn open(dir: &std::path::Path) -> (SledStore, CaSet) {
    let store = SledStore::open_with_kek_file(&dir.join("data"), &dir.join("kek")).unwrap();
    let set = CaSet::load_or_create(&store, &opts(), SystemTime::now()).unwrap();
    (store, set)
}

/// Runs only inside the child process the parent test spawns.
#[test]
#[ignore = "spawned by ca_transitions_survive_sigkill"]
fn ca_crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let (store, set) = open(std::path::Path::new(&dir));
    let mut out = std::io::stdout();
    let mut ack = |what: &str, id: &str| {
        writeln!(out, "{what} {id}").unwrap();
        out.flush().unwrap();
    };
    loop {
        for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
            let now = SystemTime::now();
            let listed = set.current().list().to_vec();
            let of = |state| {
                listed
                    .iter()
                    .filter(move |a| a.kind == kind && a.state == state)
            };
            if let Some(old) = of(SlotState::Tainted).next() {
                set.revoke(&store, &old.id, now).unwrap();
                ack("revoked", &old.id);
            } else if let Some(old) = of(SlotState::Old).next() {
                set.taint(&store, &old.id, now).unwrap();
                ack("tainted", &old.id);
            } else if of(SlotState::Prepared).next().is_some() {
                let a = set.activate(&store, kind, now).unwrap();
                ack("activated", &a.id);
            } else {
                let p = set.prepare(&store, kind, now).unwrap();
                ack("prepared", &p.id);
            }
        }
    }
}

/// How far along the slots a state is.
fn rank(state: SlotState) -> u8 {
    match state {
        SlotState::Prepared => 0,
        SlotState::Active => 1,
        SlotState::Old => 2,
        SlotState::Tainted => 3,
        SlotState::Revoked => 4,
    }
}

#[test]
fn ca_transitions_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    // The furthest acknowledged state of every authority ever published.
    let mut acked: HashMap<String, SlotState> = HashMap::new();
    let mut transitions = 0;
    for round in 0..50 {
        let lines = run_until_killed(
            "ca_crash::ca_crash_child",
            CHILD_ENV,
            dir.path(),
            5 + jitter_ms(150),
        );
        for line in lines {
            let Some((what, id)) = line.split_once(' ') else {
                continue;
            };
            let state = match what {
                "prepared" => SlotState::Prepared,
                "activated" => SlotState::Active,
                "tainted" => SlotState::Tainted,
                "revoked" => SlotState::Revoked,
                _ => continue,
            };
            transitions += 1;
            let e = acked.entry(id.to_string()).or_insert(state);
            if rank(state) > rank(*e) {
                *e = state;
            }
        }

        // Restart as a server would.
        let (_store, set) = open(dir.path());
        let listed = set.current().list().to_vec();
        for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
            let active = listed
                .iter()
                .filter(|a| a.kind == kind && a.state == SlotState::Active)
                .count();
            assert_eq!(
                active, 1,
                "round {round}: {active} active {kind:?} authorities"
            );
        }
        for (id, state) in &acked {
            let held = listed.iter().find(|a| &a.id == id);
            let Some(held) = held else {
                panic!("round {round}: authority {id} ({state:?}) is gone");
            };
            assert!(
                rank(held.state) >= rank(*state),
                "round {round}: {id} acknowledged {state:?} but is {:?}",
                held.state
            );
        }
        // Every authority held and not revoked is in the bundle; no other is.
        let trusted = |kind| {
            listed
                .iter()
                .filter(|a| a.kind == kind && a.state != SlotState::Revoked)
                .count()
        };
        let bundle = set.bundle();
        assert_eq!(
            bundle.x509_authorities().len(),
            trusted(AuthorityKind::X509),
            "round {round}"
        );
        assert_eq!(
            bundle.jwt_authorities().len(),
            trusted(AuthorityKind::Jwt),
            "round {round}"
        );
        for a in listed.iter().filter(|a| a.kind == AuthorityKind::Jwt) {
            assert_eq!(
                bundle.jwt_authorities().contains_key(&a.id),
                a.state != SlotState::Revoked,
                "round {round}: {} ({:?})",
                a.id,
                a.state
            );
        }
    }
    assert!(
        transitions >= 50,
        "too few transitions to mean anything: {transitions}"
    );
}
