//! The `sigil` binary as a user runs it: config errors, admin commands,
//! exit codes and graceful shutdown on SIGTERM.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sigil() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sigil"));
    c.env_remove("SIGIL_ADMIN_SOCKET");
    c
}

fn run(args: &[&str], socket: &Path) -> Output {
    sigil()
        .args(args)
        .arg("--admin-socket")
        .arg(socket)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn wait_for_socket(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("server exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "server did not create {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "trust_domain = \"example.org\"\nca_ttl = \"3x\"\n").unwrap();
    let o = sigil()
        .args(["server", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ca_ttl = \"3x\""), "{}", stderr(&o));

    std::fs::write(&cfg, "trust_domain = \"example.org\"\nca_tll = \"3h\"\n").unwrap();
    let o = sigil()
        .args(["server", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown key \"ca_tll\""),
        "{}",
        stderr(&o)
    );

    // SVID TTLs must fit a sixth of the CA's lifetime: refused, not capped.
    let o = sigil()
        .args(["server", "--trust-domain", "example.org", "--ca-ttl", "3h"])
        .arg("--data-dir")
        .arg(dir.path().join("short"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("default_x509_ttl = \"1h\"") && stderr(&o).contains("ca_ttl / 6 = 30m"),
        "{}",
        stderr(&o)
    );

    let o = sigil()
        .args(["server", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--trust-domain"), "{}", stderr(&o));

    // A datastore URL is checked by --validate (its TLS root file read), and
    // its password never shows. The embedded store's cache is a whole number
    // of MiB, at least 16, and not with a PostgreSQL datastore (which keeps
    // its own). Each refusal names the key.
    let refused: [(&[&str], &str, &str); 7] = [
        (
            &["--datastore", "mysql://sigil@db/sigil"],
            "datastore",
            "expected postgres://",
        ),
        (
            &["--datastore", "postgres://sigil:hunter2@db:5432"],
            "datastore",
            "names no database",
        ),
        (
            &[
                "--datastore",
                "postgres://sigil:hunter2@db/sigil?sslmode=allow",
            ],
            "datastore",
            "sslmode=allow",
        ),
        (
            &[
                "--datastore",
                "postgres://sigil:hunter2@db/sigil?sslmode=verify-full&sslrootcert=/nonexistent/db-ca.pem",
            ],
            "datastore",
            "/nonexistent/db-ca.pem",
        ),
        (
            &["--store-cache-mib", "lots"],
            "store_cache_mib",
            "whole number",
        ),
        (
            &["--store-cache-mib", "8"],
            "store_cache_mib",
            "at least 16",
        ),
        (
            &[
                "--store-cache-mib",
                "64",
                "--datastore",
                "postgres://sigil@db/sigil",
            ],
            "store_cache_mib",
            "embedded store only",
        ),
    ];
    for (args, key, want) in refused {
        let o = sigil()
            .args(["server", "--validate", "--trust-domain", "example.org"])
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        let e = stderr(&o);
        assert!(e.contains(key) && e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("hunter2"), "{args:?}: {e}");
    }
    let o = sigil()
        .args(["server", "--validate", "--trust-domain", "example.org"])
        .args(["--store-cache-mib", "64", "--data-dir"])
        .arg(dir.path().join("cache"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let o = sigil()
        .args(["server", "--trust-domain", "Bad Domain!"])
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains("trust_domain = \"Bad Domain!\""),
        "{}",
        stderr(&o)
    );
    // ext_authz keys go together, for the server and the agent alike.
    for (flag, value, want) in [
        (
            "--policy-root-namespace",
            "x",
            "--policy-dir (required with policy_root_namespace)",
        ),
        ("--jwt-issuer", " ", "jwt_issuer"),
    ] {
        let o = sigil()
            .args(["server", "--trust-domain", "example.org", flag, value])
            .output()
            .unwrap();
        assert!(stderr(&o).contains(want), "{flag}: {}", stderr(&o));
    }
    let bundle = dir.path().join("bundle.pem");
    let ca = rcgen::generate_simple_self_signed(vec!["x".to_string()]).unwrap();
    std::fs::write(&bundle, ca.cert.pem()).unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let agent = |extra: &[&std::ffi::OsStr]| {
        sigil()
            .args([
                "agent",
                "--server",
                "127.0.0.1:1",
                "--trust-domain",
                "example.org",
            ])
            .arg("--trust-bundle")
            .arg(&bundle)
            .args(["--ext-authz-bind", "127.0.0.1:0"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = agent(&[]);
    assert!(stderr(&o).contains("--policy-dir"), "{}", stderr(&o));
    let o = agent(&[
        "--policy-dir".as_ref(),
        "/tmp".as_ref(),
        "--jwks-ca-file".as_ref(),
        empty.as_os_str(),
    ]);
    assert!(
        stderr(&o).contains("jwks_ca_file") && stderr(&o).contains("no certificate found"),
        "{}",
        stderr(&o)
    );
    // The join token: from a file or the environment, not both, never empty.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "abc\n").unwrap();
    let both = sigil()
        .args([
            "agent",
            "--server",
            "127.0.0.1:1",
            "--trust-domain",
            "example.org",
        ])
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--join-token-file")
        .arg(&token_file)
        .env("SIGIL_JOIN_TOKEN", "secret")
        .output()
        .unwrap();
    assert!(
        stderr(&both).contains("join_token_file") && stderr(&both).contains("not both"),
        "{}",
        stderr(&both)
    );
    let o = sigil()
        .args([
            "agent",
            "--server",
            "127.0.0.1:1",
            "--trust-domain",
            "example.org",
        ])
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--join-token-file")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(stderr(&o).contains("the file is empty"), "{}", stderr(&o));
}

#[test]
fn admin_commands_against_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let cfg = dir.path().join("server.toml");
    // The file sets one TTL, a flag overrides another key.
    std::fs::write(
        &cfg,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nbind = \"127.0.0.1:0\"\ndefault_jwt_ttl = \"2m\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let o = run(&["healthcheck"], &socket);
    assert!(!o.status.success(), "healthcheck must fail with no server");
    assert!(
        stderr(&o).contains("is `sigil server` running?"),
        "{}",
        stderr(&o)
    );

    let mut server = sigil()
        .args(["server", "--config"])
        .arg(&cfg)
        .arg("--admin-socket")
        .arg(&socket)
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&socket, &mut server);

    assert!(run(&["healthcheck"], &socket).status.success());
    let o = run(
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            "spiffe://example.org/sigil/agent/join_token/x",
            "--selector",
            "unix:uid:1000",
            "--selector",
            "unix:gid:50",
            "--x509-ttl",
            "10m",
            "--output",
            "json",
        ],
        &socket,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let created: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(created[0]["x509_ttl_seconds"], 600);

    let o = run(
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/web2",
            "--parent-id",
            "spiffe://example.org/sigil/agent/join_token/x",
            "--selector",
            "nocolon",
        ],
        &socket,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("selectors[0]"), "{}", stderr(&o));
    let o = run(
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/web2",
            "--parent-id",
            "spiffe://example.org/sigil/agent/join_token/x",
            "--selector",
            "unix:uid:1",
            "--jwt-ttl",
            "5q",
        ],
        &socket,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--jwt-ttl"), "{}", stderr(&o));

    let o = run(&["entry", "show", "--output", "json"], &socket);
    let all: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        all.as_array().unwrap().len(),
        1,
        "the refused entries changed nothing"
    );

    let o = run(
        &["token", "generate", "--ttl", "1m", "--output", "json"],
        &socket,
    );
    let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(t["token"].as_str().unwrap().len(), 32);

    let o = run(&["bundle", "show", "--format", "jwks"], &socket);
    let jwks: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);

    let o = run(
        &[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--audience",
            "db",
            "--output",
            "json",
        ],
        &socket,
    );
    let minted: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let expires = time::OffsetDateTime::parse(
        minted["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp();
    let ttl = expires
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!(
        (100..=120).contains(&ttl),
        "default_jwt_ttl from the config file: {ttl}"
    );

    // SIGTERM: the server drains and exits 0, removing its socket.
    let pid = server.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "server did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(!socket.exists());
    let mut log = String::new();
    std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut log).unwrap();
    // JSON audit lines for the admin changes.
    // The caller is the admin socket's peer: this test's uid.
    let caller = format!("\"caller\":\"uid={}", sigil::attest::current_uid().unwrap());
    assert!(
        log.lines().any(|l| l.contains("\"event\":\"create_entry\"")
            && l.contains("\"decision\":\"deny\"")
            && l.contains(&caller)),
        "{log}"
    );
}

#[test]
fn dev_then_workload_fetch_as_the_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // dev prints its instructions once the caller's SVID is ready.
    let (mut dev, printed) = start_dev(&dir.path().join("dev"), &sock);
    let export = format!("unix://{}", sock.display());
    assert!(
        printed.contains(&format!("export SPIFFE_ENDPOINT_SOCKET={export}")),
        "{printed}"
    );

    let svid_dir = dir.path().join("svid");
    // A key file left world-readable by something else must not stay so.
    std::fs::create_dir_all(&svid_dir).unwrap();
    std::fs::write(svid_dir.join("svid.key"), "old").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            svid_dir.join("svid.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    let o = sigil()
        .args(["workload", "fetch-x509", "--out"])
        .arg(&svid_dir)
        .env("SPIFFE_ENDPOINT_SOCKET", &export)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let uid = sigil::attest::current_uid().unwrap();
    let name = sigil::attest::user_name(uid);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("spiffe://example.org/user/{name}")),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(svid_dir.join("svid.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // An independent parser: the written SVID chains to the written bundle.
    let svid =
        sigil::x509::certs_from_pem(&std::fs::read_to_string(svid_dir.join("svid.pem")).unwrap())
            .unwrap();
    let bundle =
        sigil::x509::certs_from_pem(&std::fs::read_to_string(svid_dir.join("bundle.pem")).unwrap())
            .unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&svid[0]).unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(&bundle[0]).unwrap();
    leaf.verify_signature(Some(ca.public_key())).unwrap();
    let key =
        sigil::PrivateKey::from_pem(&std::fs::read_to_string(svid_dir.join("svid.key")).unwrap())
            .unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_point().unwrap().as_slice()
    );

    let o = sigil()
        .args(["workload", "fetch-jwt", "--audience", "demo", "--socket"])
        .arg(&export)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Text output names the SVID's ID beside its token.
    let printed = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        printed.contains("SPIFFE ID: spiffe://example.org/user/"),
        "{printed}"
    );
    let token = printed
        .lines()
        .find_map(|l| l.strip_prefix("Token: "))
        .unwrap()
        .trim()
        .to_string();
    let o = sigil()
        .args([
            "workload",
            "validate-jwt",
            "--audience",
            "demo",
            &token,
            "--socket",
        ])
        .arg(&export)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = sigil()
        .args([
            "workload",
            "validate-jwt",
            "--audience",
            "nope",
            &token,
            "--socket",
        ])
        .arg(&export)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("audience"), "{}", stderr(&o));

    let pid = dev.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while dev.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "sigil dev did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!sock.exists(), "the workload socket is removed on shutdown");
}

#[test]
fn policy_check_explains_and_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata:\n  name: get-only\n  namespace: foo\nspec:\n  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n",
    )
    .unwrap();
    let check = |method: &str| {
        let o = sigil()
            .args(["policy", "check", "--policy-dir"])
            .arg(dir.path())
            .args([
                "--principal",
                "spiffe://cluster.local/ns/foo/sa/sleep",
                "--destination",
                "spiffe://cluster.local/ns/foo/sa/httpbin",
                "--method",
                method,
                "--path",
                "/",
                "--output",
                "json",
            ])
            .output()
            .unwrap();
        let v = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap();
        // It gates scripts: 0 on allow, 1 on deny.
        let expected = if v["decision"] == "allow" { 0 } else { 1 };
        assert_eq!(o.status.code(), Some(expected), "{}", stderr(&o));
        v
    };
    let allow = check("GET");
    assert_eq!(allow["decision"], "allow");
    assert_eq!(allow["status"], 200);
    assert_eq!(allow["policy"], "foo/get-only");
    assert_eq!(allow["rule"], 0);
    let deny = check("POST");
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["status"], 403);
    assert!(
        deny["explanation"].to_string().contains("methods"),
        "{deny}"
    );

    std::fs::write(
        dir.path().join("q.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: bad\nspec:\n  rules:\n  - to:\n    - operation:\n        method: [\"GET\"]\n",
    )
    .unwrap();
    let o = sigil()
        .args(["policy", "check", "--policy-dir"])
        .arg(dir.path())
        .args([
            "--destination",
            "spiffe://x/ns/foo/sa/y",
            "--method",
            "GET",
            "--path",
            "/",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "an error, not a deny");
    let e = stderr(&o);
    assert!(
        e.contains("q.yaml") && e.contains("document 0") && e.contains("rules[0].to[0].operation"),
        "{e}"
    );
    // --bundle must read; --policy-root-namespace is the server's flag name.
    let o = sigil()
        .args(["policy", "check", "--policy-dir"])
        .arg(dir.path())
        .args([
            "--destination",
            "spiffe://x/ns/foo/sa/y",
            "--method",
            "GET",
            "--path",
            "/",
        ])
        .args([
            "--policy-root-namespace",
            "mesh",
            "--bundle",
            "/nonexistent.json",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("q.yaml") || stderr(&o).contains("--bundle"),
        "{}",
        stderr(&o)
    );
    // With --output json the error is JSON too.
    let o = sigil()
        .args(["policy", "check", "--policy-dir"])
        .arg(dir.path())
        .args([
            "--destination",
            "spiffe://x/ns/foo/sa/y",
            "--method",
            "GET",
            "--path",
            "/",
        ])
        .args(["--output", "json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("q.yaml"), "{v}");
}

/// Starts `sigil dev` and waits for its instructions; returns the process
/// and what it printed.
fn start_dev(data: &Path, sock: &Path) -> (Child, String) {
    let mut dev = sigil()
        .args(["dev", "--data-dir"])
        .arg(data)
        .arg("--socket")
        .arg(sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read on a thread: a blocking read cannot time out, a channel can.
    let out = std::io::BufReader::new(dev.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(out) {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut printed = String::new();
    while !printed.contains("Stop with Ctrl-C") {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                printed.push_str(&line);
                printed.push('\n');
            }
            Err(_) => panic!("sigil dev exited or stalled after printing: {printed}"),
        }
    }
    (dev, printed)
}

#[test]
fn dev_comes_back_up_after_its_saved_agent_svid_expired() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let sock = dir.path().join("api.sock");
    let (mut dev, _) = start_dev(&data, &sock);
    let _ = dev.kill();
    let _ = dev.wait();
    // Make the saved agent SVID look expired (as after an hour away).
    let svid = data.join("agent/agent-svid.pem");
    let saved = sigil::x509::certs_from_pem(&std::fs::read_to_string(&svid).unwrap()).unwrap();
    let id = sigil::x509::svid_id(&saved[0]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.as_str().try_into().unwrap())];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 2);
    std::fs::write(&svid, params.self_signed(&key).unwrap().pem()).unwrap();

    let (mut dev, _) = start_dev(&data, &sock);
    let o = sigil()
        .args(["workload", "fetch-jwt", "--audience", "x"])
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", sock.display()),
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let _ = dev.kill();
    let _ = dev.wait();
}
