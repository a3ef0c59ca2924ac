use super::*;
use crate::store::MemoryStore;

fn registry() -> Registry {
    Registry::new(
        Arc::new(MemoryStore::new().unwrap()),
        TrustDomain::new("example.org").unwrap(),
        EntryValidation::default(),
    )
}

fn params(id: &str, parent: &str) -> EntryParams {
    EntryParams {
        spiffe_id: id.into(),
        parent_id: parent.into(),
        selectors: vec!["unix:uid:1000".into()],
        ..EntryParams::default()
    }
}

const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/a";
const OTHER: &str = "spiffe://example.org/sigil/agent/join_token/b";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

#[test]
fn create_list_update_delete() {
    let r = registry();
    let e = r
        .create_entry(params("spiffe://example.org/web", AGENT), now())
        .unwrap();
    assert_eq!(e.id.len(), 32);
    assert_eq!(r.entry(&e.id).unwrap().unwrap(), e);
    let agent = SpiffeId::new(AGENT).unwrap();
    let other = SpiffeId::new(OTHER).unwrap();
    assert_eq!(
        r.entries_by_parent(&agent, None, 10).unwrap(),
        vec![e.clone()]
    );

    // Move it to another parent: the index follows.
    let moved = r
        .update_entry(&e.id, params("spiffe://example.org/web", OTHER))
        .unwrap();
    assert_eq!(moved.id, e.id);
    assert!(r.entries_by_parent(&agent, None, 10).unwrap().is_empty());
    assert_eq!(
        r.entries_by_parent(&other, None, 10).unwrap(),
        vec![moved.clone()]
    );
    assert_eq!(
        r.list_entries(None, None, None, None, usize::MAX)
            .unwrap()
            .0
            .len(),
        1
    );
    let sel = Selector::new("unix:uid:1000").unwrap();
    assert_eq!(
        r.list_entries(None, None, Some(&sel), None, usize::MAX)
            .unwrap()
            .0
            .len(),
        1
    );
    let nope = Selector::new("unix:uid:1").unwrap();
    assert!(
        r.list_entries(None, None, Some(&nope), None, usize::MAX)
            .unwrap()
            .0
            .is_empty()
    );

    r.delete_entry(&e.id).unwrap();
    assert!(r.entry(&e.id).unwrap().is_none());
    assert!(matches!(
        r.delete_entry(&e.id),
        Err(RegistryError::EntryNotFound(_))
    ));
    assert!(matches!(
        r.update_entry(&e.id, params("spiffe://example.org/web", OTHER)),
        Err(RegistryError::EntryNotFound(_))
    ));
    // After deletion the same entry may be created again.
    r.create_entry(params("spiffe://example.org/web", OTHER), now())
        .unwrap();
}

#[test]
fn duplicates_are_refused_even_with_reordered_selectors() {
    let r = registry();
    let mut p = params("spiffe://example.org/web", AGENT);
    p.selectors = vec!["unix:uid:1".into(), "unix:gid:2".into()];
    r.create_entry(p.clone(), now()).unwrap();
    p.selectors.reverse();
    assert!(matches!(
        r.create_entry(p.clone(), now()),
        Err(RegistryError::DuplicateEntry(_))
    ));
    p.selectors.push("unix:gid:3".into());
    r.create_entry(p, now()).unwrap();
}

#[test]
fn paging_by_parent() {
    let r = registry();
    for i in 0..25 {
        r.create_entry(params(&format!("spiffe://example.org/w{i}"), AGENT), now())
            .unwrap();
    }
    let agent = SpiffeId::new(AGENT).unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = r.entries_by_parent(&agent, after.as_deref(), 10).unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|e| e.id.clone());
        seen.extend(page.into_iter().map(|e| e.id));
    }
    assert_eq!(seen.len(), 25);
    let mut sorted = seen.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 25);
}

#[test]
fn validation_names_the_field() {
    let r = registry();
    let cases: Vec<(EntryParams, &str)> = vec![
        (params("spiffe://example.org/a/", AGENT), "spiffe_id"),
        (params("spiffe://other.org/a", AGENT), "spiffe_id"),
        (params("spiffe://example.org", AGENT), "spiffe_id"),
        (
            params("spiffe://example.org/sigil/agent/x", AGENT),
            "spiffe_id",
        ),
        (params("spiffe://example.org/a", "nope"), "parent_id"),
        (
            params("spiffe://example.org/a", "spiffe://other.org/x"),
            "parent_id",
        ),
        (
            EntryParams {
                selectors: vec![],
                ..params("spiffe://example.org/a", AGENT)
            },
            "selectors",
        ),
        (
            EntryParams {
                selectors: vec!["bad".into()],
                ..params("spiffe://example.org/a", AGENT)
            },
            "selectors[0]",
        ),
        (
            EntryParams {
                x509_ttl: Some(0),
                ..params("spiffe://example.org/a", AGENT)
            },
            "x509_ttl",
        ),
        (
            EntryParams {
                jwt_ttl: Some(10 * 86_400),
                ..params("spiffe://example.org/a", AGENT)
            },
            "jwt_ttl",
        ),
        (
            EntryParams {
                hint: "h".repeat(1025),
                ..params("spiffe://example.org/a", AGENT)
            },
            "hint",
        ),
        (
            EntryParams {
                dns_names: vec!["a b".into()],
                ..params("spiffe://example.org/a", AGENT)
            },
            "dns_names[0]",
        ),
    ];
    for (p, field) in cases {
        let err = r.create_entry(p.clone(), now()).unwrap_err().to_string();
        assert!(err.starts_with(field), "{p:?}: {err}");
    }
    assert!(
        r.list_entries(None, None, None, None, usize::MAX)
            .unwrap()
            .0
            .is_empty(),
        "nothing written"
    );
    let ok = EntryParams {
        hint: "h".repeat(1024),
        ..params("spiffe://example.org/a", AGENT)
    };
    r.create_entry(ok, now()).unwrap();
}

#[test]
fn join_tokens_are_single_use_and_expire() {
    let r = registry();
    let t = r.generate_token(Duration::from_secs(600), now()).unwrap();
    assert!(t.agent_id.path().starts_with("/sigil/agent/join_token/"));
    assert!(
        !t.agent_id.as_str().contains(&t.token),
        "the agent ID must not reveal the token"
    );
    assert_eq!(r.consume_token(&t.token, now()).unwrap(), t.agent_id);
    assert!(matches!(
        r.consume_token(&t.token, now()),
        Err(RegistryError::BadToken)
    ));
    let t = r.generate_token(Duration::from_secs(60), now()).unwrap();
    let late = now() + Duration::from_secs(61);
    assert!(matches!(
        r.consume_token(&t.token, late),
        Err(RegistryError::BadToken)
    ));
    assert!(matches!(
        r.consume_token("unknown", now()),
        Err(RegistryError::BadToken)
    ));
    assert!(matches!(
        r.generate_token(Duration::ZERO, now()),
        Err(RegistryError::ZeroTokenTtl)
    ));
}

#[test]
fn agents_ban_evict_and_entry_authorization() {
    let r = registry();
    let agent = SpiffeId::new(AGENT).unwrap();
    let record = AgentRecord {
        spiffe_id: agent.clone(),
        attestor: "join_token".into(),
        selectors: vec![],
        attested_at: 1,
        svid_expires_at: 2,
        svid_serial: "00".into(),
        banned: false,
        previous_serial: String::new(),
        previous_until: 0,
    };
    r.put_agent(&record).unwrap();
    assert!(r.ban_agent(&agent).unwrap().banned);
    assert!(r.agent(&agent).unwrap().unwrap().banned);
    r.evict_agent(&agent).unwrap();
    assert!(r.agent(&agent).unwrap().is_none());
    assert!(matches!(
        r.evict_agent(&agent),
        Err(RegistryError::AgentNotFound(_))
    ));

    let mine = r
        .create_entry(params("spiffe://example.org/mine", AGENT), now())
        .unwrap();
    let theirs = r
        .create_entry(params("spiffe://example.org/theirs", OTHER), now())
        .unwrap();
    assert_eq!(
        r.authorize_agent_entry(&agent, &mine.id).unwrap().id,
        mine.id
    );
    assert!(matches!(
        r.authorize_agent_entry(&agent, &theirs.id),
        Err(AuthzError::NotParent { .. })
    ));
    assert!(matches!(
        r.authorize_agent_entry(&agent, "missing"),
        Err(AuthzError::NoSuchEntry(_))
    ));
}

#[test]
fn batch_create_is_all_or_nothing() {
    let r = registry();
    r.create_entry(params("spiffe://example.org/taken", AGENT), now())
        .unwrap();
    let batch = vec![
        params("spiffe://example.org/new1", AGENT),
        params("spiffe://example.org/taken", AGENT),
    ];
    let err = r.create_entries(batch, now()).unwrap_err();
    assert!(
        err.to_string().contains("spiffe://example.org/taken"),
        "{err}"
    );
    assert_eq!(
        r.list_entries(None, None, None, None, usize::MAX)
            .unwrap()
            .0
            .len(),
        1,
        "nothing from the batch landed"
    );
    let twice = vec![
        params("spiffe://example.org/a", AGENT),
        params("spiffe://example.org/a", AGENT),
    ];
    assert!(matches!(
        r.create_entries(twice, now()),
        Err(RegistryError::DuplicateEntry(_))
    ));
    let ok = (0..10)
        .map(|i| params(&format!("spiffe://example.org/b{i}"), AGENT))
        .collect();
    assert_eq!(r.create_entries(ok, now()).unwrap().len(), 10);
}

#[test]
fn updates_succeed_while_other_writes_move_the_revision() {
    let r = registry();
    let e = r
        .create_entry(params("spiffe://example.org/web", AGENT), now())
        .unwrap();
    let churn = {
        let r = r.clone();
        std::thread::spawn(move || {
            for i in 0..400 {
                let agent = AgentRecord {
                    spiffe_id: SpiffeId::new(&format!("{OTHER}{i}")).unwrap(),
                    attestor: "join_token".into(),
                    selectors: vec![],
                    attested_at: 0,
                    svid_expires_at: 0,
                    svid_serial: String::new(),
                    banned: false,
                    previous_serial: String::new(),
                    previous_until: 0,
                };
                r.put_agent(&agent).unwrap();
            }
        })
    };
    for i in 0..100 {
        let mut p = params("spiffe://example.org/web", AGENT);
        p.hint = format!("h{i}");
        r.update_entry(&e.id, p).unwrap();
    }
    churn.join().unwrap();
    assert_eq!(r.entry(&e.id).unwrap().unwrap().hint, "h99");
    let agent = SpiffeId::new(AGENT).unwrap();
    assert_eq!(
        r.entries_by_parent(&agent, None, 10).unwrap().len(),
        1,
        "index intact"
    );
}

fn agent_record(id: &SpiffeId, serial: &str) -> AgentRecord {
    AgentRecord {
        spiffe_id: id.clone(),
        attestor: "x509pop".into(),
        selectors: vec![],
        attested_at: 1,
        svid_expires_at: 2,
        svid_serial: serial.into(),
        banned: false,
        previous_serial: String::new(),
        previous_until: 0,
    }
}

#[test]
fn a_renewal_or_attestation_never_writes_over_a_ban_or_an_evict() {
    let r = registry();
    let agent = SpiffeId::new(AGENT).unwrap();
    r.put_agent(&agent_record(&agent, "01")).unwrap();

    // Renewal read the record, then a ban landed before it wrote back.
    let seen = r.agent_snapshot(&agent).unwrap();
    r.ban_agent(&agent).unwrap();
    assert!(matches!(
        r.replace_agent(&seen, &agent_record(&agent, "02")),
        Err(RegistryError::AgentChanged(_))
    ));
    assert!(r.agent(&agent).unwrap().unwrap().banned, "the ban stands");
    // Read after the ban: refused outright.
    let seen = r.agent_snapshot(&agent).unwrap();
    assert!(matches!(
        r.replace_agent(&seen, &agent_record(&agent, "03")),
        Err(RegistryError::AgentBanned(_))
    ));

    // An evict between read and write: the agent stays forgotten.
    r.evict_agent(&agent).unwrap();
    r.put_agent(&agent_record(&agent, "04")).unwrap();
    let seen = r.agent_snapshot(&agent).unwrap();
    r.evict_agent(&agent).unwrap();
    assert!(r.replace_agent(&seen, &agent_record(&agent, "05")).is_err());
    assert!(r.agent(&agent).unwrap().is_none(), "the evict stands");

    // Attestation creates only what is still absent.
    let seen = r.agent_snapshot(&agent).unwrap();
    r.put_agent(&agent_record(&agent, "06")).unwrap();
    assert!(r.replace_agent(&seen, &agent_record(&agent, "07")).is_err());
    assert_eq!(r.agent(&agent).unwrap().unwrap().svid_serial, "06");
}

#[test]
fn renewals_racing_a_ban_never_undo_it() {
    // The review's reproduction: renewals in a loop while the ban lands.
    for round in 0..40 {
        let r = registry();
        let agent = SpiffeId::new(&format!("{AGENT}{round}")).unwrap();
        r.put_agent(&agent_record(&agent, "00")).unwrap();
        let renewer = {
            let (r, agent) = (r.clone(), agent.clone());
            std::thread::spawn(move || {
                for i in 0..200 {
                    let seen = r.agent_snapshot(&agent).unwrap();
                    let Some(mut rec) = seen.record.clone() else {
                        return;
                    };
                    rec.svid_serial = format!("{i:04}");
                    let _ = r.replace_agent(&seen, &rec);
                }
            })
        };
        r.ban_agent(&agent).unwrap();
        renewer.join().unwrap();
        assert!(
            r.agent(&agent).unwrap().unwrap().banned,
            "round {round}: a renewal undid the ban"
        );
    }
}

#[test]
fn a_superseded_agent_svid_is_accepted_only_briefly() {
    let r = registry();
    let agent = SpiffeId::new(AGENT).unwrap();
    let mut rec = agent_record(&agent, "new");
    rec.previous_serial = "old".into();
    rec.previous_until = 100;
    r.put_agent(&rec).unwrap();
    assert!(rec.accepts_serial("new", 99));
    assert!(
        rec.accepts_serial("old", 99),
        "within the grace, before the new one is seen"
    );
    assert!(!rec.accepts_serial("old", 100), "never after the grace");
    assert!(!rec.accepts_serial("older", 50));
    // Presenting the new SVID retires the old one at once.
    r.confirm_agent_serial(&agent, "new").unwrap();
    let stored = r.agent(&agent).unwrap().unwrap();
    assert!(!stored.accepts_serial("old", 99));
    assert!(stored.accepts_serial("new", 99));
}

#[test]
fn selectors_of_known_types_are_checked_and_unknown_types_refused() {
    let r = registry();
    let bad = [
        ("unix:uid:abc", "must be a number"),
        ("unix:uid:-1", "must be a number"),
        ("unix:foo:1", "unix selectors are"),
        ("unix:path:relative", "absolute"),
        ("unix:sha256:abc", "64 lowercase hex"),
        ("k8s:ns:x", "unknown"),
        ("x509pop:subject:cn:", "x509pop selectors are"),
    ];
    for (sel, says) in bad {
        let mut p = params("spiffe://example.org/web", AGENT);
        p.selectors = vec![sel.into()];
        let e = r.create_entry(p, now()).unwrap_err().to_string();
        assert!(
            e.starts_with("selectors[0]") && e.contains(says),
            "{sel}: {e}"
        );
    }
    for good in [
        "unix:uid:0",
        "unix:gid:4294967295",
        "unix:user:www-data",
        "unix:path:/usr/bin/app",
        "x509pop:subject:cn:node-1",
    ] {
        let mut p = params(&format!("spiffe://example.org/ok/{}", good.len()), AGENT);
        p.selectors = vec![good.into()];
        r.create_entry(p, now())
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    let mut p = params("spiffe://example.org/many", AGENT);
    p.selectors = (0..101).map(|i| format!("unix:uid:{i}")).collect();
    let e = r.create_entry(p, now()).unwrap_err().to_string();
    assert!(e.contains("selectors: 101 given; at most 100"), "{e}");
    let mut p = params("spiffe://example.org/many", AGENT);
    p.dns_names = (0..101).map(|i| format!("h{i}.example.org")).collect();
    let e = r.create_entry(p, now()).unwrap_err().to_string();
    assert!(e.contains("dns_names: 101 given; at most 100"), "{e}");
}

#[test]
fn listing_is_paged_in_id_order_with_filters() {
    let r = registry();
    for i in 0..25 {
        let mut p = params(
            &format!("spiffe://example.org/w{i}"),
            if i % 2 == 0 { AGENT } else { OTHER },
        );
        p.selectors = vec![format!("unix:uid:{}", i % 3)];
        r.create_entry(p, now()).unwrap();
    }
    let sel = Selector::new("unix:uid:0").unwrap();
    for (parent, selector, want) in [
        (None, None, 25),
        (Some(SpiffeId::new(AGENT).unwrap()), None, 13),
        (None, Some(&sel), 9),
    ] {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, more) = r
                .list_entries(None, parent.as_ref(), selector, after.as_deref(), 4)
                .unwrap();
            assert!(page.len() <= 4);
            after = page.last().map(|e| e.id.clone());
            seen.extend(page.into_iter().map(|e| e.id));
            if !more {
                break;
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(seen, sorted, "in order, no repeats");
        assert_eq!(seen.len(), want, "{parent:?} {selector:?}");
    }
}

#[test]
fn federated_bundles_refuse_going_backwards_and_the_own_trust_domain() {
    use crate::registry::BundleError;
    let registry = registry();
    let other = TrustDomain::new("other.org").unwrap();
    let mut b = crate::x509::Bundle::new(other.clone());
    b.set_sequence(5);
    assert!(registry.set_federated_bundle(&b, true).unwrap());
    assert!(
        !registry.set_federated_bundle(&b, true).unwrap(),
        "unchanged"
    );
    let mut older = b.clone();
    older.set_sequence(4);
    older.set_refresh_hint(Some(60));
    let err = registry.set_federated_bundle(&older, true).unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::SequenceBackwards {
                got: 4,
                held: 5,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        registry.bundle(&other).unwrap().unwrap().sequence(),
        5,
        "kept"
    );
    // An operator may set anything.
    assert!(registry.set_federated_bundle(&older, false).unwrap());
    assert_eq!(registry.federated_bundles().unwrap(), vec![older]);
    let own = crate::x509::Bundle::new(TrustDomain::new("example.org").unwrap());
    assert!(matches!(
        registry.set_federated_bundle(&own, false).unwrap_err(),
        BundleError::OwnTrustDomain(_)
    ));
    registry.delete_federated_bundle(&other).unwrap();
    assert!(registry.federated_bundles().unwrap().is_empty());
    assert!(matches!(
        registry.delete_federated_bundle(&other).unwrap_err(),
        BundleError::NotFound(_)
    ));
}
