//! Cross-client conformance: real `sigil` processes driven by clients that are
//! not built on tonic or h2 (py-spiffe and plain grpcio, both on grpc-core,
//! which send the socket path as the HTTP/2 `:authority`), with every
//! certificate parsed by Python `cryptography`, a strict DER parser.
//!
//! The clients live in a venv under the target directory, made on first use
//! from `tests/interop/requirements.txt` (`.ci/run` makes it up front).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/workload_clients.py"
);

/// The venv's python, created once per test run.
fn python() -> PathBuf {
    static READY: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = ready.as_ref() {
        return p.clone();
    }
    let venv = std::env::var_os("SIGIL_INTEROP_VENV").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop-venv"),
        PathBuf::from,
    );
    let py = venv.join("bin/python");
    let usable = |py: &Path| {
        Command::new(py)
            .args([
                "-c",
                "import spiffe, grpc, grpc_tools, cryptography, yaml, envoy.service.secret.v3.sds_pb2",
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !usable(&py) {
        let requirements = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/interop/requirements.txt"
        );
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(&py)
                .args(["-m", "pip", "install", "-q", "-r", requirements])
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && usable(&py),
            "could not build the interop venv at {} from {requirements}",
            venv.display()
        );
    }
    *ready = Some(py.clone());
    py
}

/// Runs one mode of the client script; panics with its output on failure.
fn clients(args: &[&str]) -> String {
    let o = Command::new(python())
        .arg(SCRIPT)
        .args(args)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "workload_clients.py {args:?}:\n{out}");
    assert!(out.contains("all checks passed"), "{out}");
    out
}

fn sigil() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sigil"));
    c.env_remove("SIGIL_ADMIN_SOCKET");
    c
}

fn admin(socket: &Path, args: &[&str]) -> Output {
    let o = sigil()
        .args(args)
        .arg("--admin-socket")
        .arg(socket)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "sigil {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Kills the process when the test ends, however it ends.
struct Killed(Child);

/// Starts a `sigil` process whose log (stderr) the test reads.
fn spawn_logged(cmd: &mut Command) -> Killed {
    Killed(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the child's stderr until a line contains `marker`; returns that line.
fn wait_for_line(child: &mut Child, marker: &str) -> String {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = marker.to_string();
    std::thread::spawn(move || {
        let mut found = false;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if !found && line.contains(&wanted) {
                found = true;
                let _ = tx.send(line);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no log line containing {marker:?} within 60 s"))
}

fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn my_user() -> (u32, String) {
    let uid = sigil::attest::current_uid().unwrap();
    (uid, sigil::attest::user_name(uid))
}

/// Every PEM file Sigil wrote, parsed strictly, with LF line endings.
fn strict_certs(files: &[PathBuf]) {
    let mut args = vec!["certs".to_string()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    clients(&args);
}

#[test]
fn python_clients_against_sigil_dev() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut dev = spawn_logged(
        sigil()
            .args(["dev", "--data-dir"])
            .arg(dir.path().join("dev"))
            .arg("--socket")
            .arg(&sock),
    );
    wait_for_line(&mut dev.0, "SVID cache updated");
    let (_, name) = my_user();
    let id = format!("spiffe://example.org/user/{name}");
    let sock_s = sock.display().to_string();
    let out = clients(&["py-spiffe", &sock_s, &id]);
    assert!(
        out.contains("py-spiffe: the SVID chains to the bundle"),
        "{out}"
    );
    clients(&["grpcio", &sock_s, &id]);
    let out = clients(&["sds", &sock_s, &id]);
    assert!(out.contains("ok: DeltaSecrets"), "{out}");

    // The files `sigil workload fetch-x509` writes, and the dev agent's own SVID.
    let out_dir = dir.path().join("svid");
    let o = sigil()
        .args(["workload", "fetch-x509", "--out"])
        .arg(&out_dir)
        .env("SPIFFE_ENDPOINT_SOCKET", format!("unix://{sock_s}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut files: Vec<PathBuf> = ["svid.pem", "bundle.pem", "svid.key"]
        .iter()
        .map(|f| out_dir.join(f))
        .collect();
    let agent_files = find_files(&dir.path().join("dev"), "agent-svid");
    assert!(
        !agent_files.is_empty(),
        "the dev agent keeps its SVID on disk"
    );
    files.extend(agent_files);
    strict_certs(&files);
}

fn find_files(root: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn python_clients_against_server_and_agent() {
    let dir = tempfile::tempdir().unwrap();
    let admin_sock = dir.path().join("admin.sock");
    let mut server = spawn_logged(
        sigil()
            .args(["server", "--trust-domain", "interop.test"])
            .args(["--bind", "127.0.0.1:0", "--log-format", "json"])
            .arg("--data-dir")
            .arg(dir.path().join("server"))
            .arg("--admin-socket")
            .arg(&admin_sock),
    );
    let ready = wait_for_line(&mut server.0, "sigil server ready");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let node_api = ready["fields"]["node_api"].as_str().unwrap().to_string();

    // The admin socket speaks to grpcio too.
    clients(&["admin", &admin_sock.display().to_string(), "interop.test"]);

    let bundle = dir.path().join("bundle.pem");
    let o = admin(&admin_sock, &["bundle", "show", "--format", "pem"]);
    std::fs::write(&bundle, &o.stdout).unwrap();
    let o = admin(&admin_sock, &["token", "generate", "--output", "json"]);
    let token: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let agent_id = token["agent_id"].as_str().unwrap().to_string();

    // Two entries share a hint: each response must carry it once.
    let (uid, _) = my_user();
    let selector = format!("unix:uid:{uid}");
    let mut entry_ids = Vec::new();
    for (path, hint) in [("web", "internal"), ("web-b", "internal"), ("web-c", "")] {
        let id = format!("spiffe://interop.test/{path}");
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--parent-id",
            &agent_id,
            "--selector",
            &selector,
            "--output",
            "json",
        ];
        if !hint.is_empty() {
            args.extend(["--hint", hint]);
        }
        let o = admin(&admin_sock, &args);
        let created: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        entry_ids.push(created[0]["id"].as_str().unwrap().to_string());
        // Creation order decides the default SVID; keep timestamps apart.
        std::thread::sleep(Duration::from_millis(5));
    }

    let sock = dir.path().join("agent/api.sock");
    // The token from a file: it never shows in the process list.
    let token_file = dir.path().join("join-token");
    std::fs::write(&token_file, token["token"].as_str().unwrap()).unwrap();
    let mut agent = spawn_logged(
        sigil()
            .args(["agent", "--server", &node_api, "--join-token-file"])
            .arg(&token_file)
            .arg("--trust-bundle")
            .arg(&bundle)
            .arg("--data-dir")
            .arg(dir.path().join("agent-data"))
            .arg("--socket")
            .arg(&sock),
    );
    wait_for_line(&mut agent.0, "SVID cache updated");
    wait_for_path(&sock);
    let sock_s = sock.display().to_string();
    clients(&["py-spiffe", &sock_s, "spiffe://interop.test/web"]);
    let out = clients(&["grpcio", &sock_s, "spiffe://interop.test/web"]);
    assert!(out.contains("JWT-SVID hints unique"), "{out}");

    // Certificates made by every other path: x509 mint, the agent's and the
    // server's SVIDs (the latter as presented on the node API).
    let mint = dir.path().join("mint");
    admin(
        &admin_sock,
        &[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://interop.test/minted",
            "--out",
            &mint.display().to_string(),
        ],
    );
    let mut files: Vec<PathBuf> = ["svid.pem", "svid.key", "bundle.pem"]
        .iter()
        .map(|f| mint.join(f))
        .collect();
    files.extend(find_files(&dir.path().join("agent-data"), "agent-svid"));
    files.push(bundle.clone());
    strict_certs(&files);
    clients(&["server-cert", &node_api]);

    // No identity left: PermissionDenied on every call.
    for id in &entry_ids {
        admin(&admin_sock, &["entry", "delete", "--id", id]);
    }
    clients(&["denied", &sock_s]);
}

#[test]
fn envoy_examples_parse_against_envoys_protos() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy");
    let examples: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    assert!(!examples.is_empty(), "no examples in {}", dir.display());
    let mut args = vec!["envoy-config"];
    args.extend(examples.iter().map(String::as_str));
    let out = clients(&args);
    assert_eq!(
        out.matches("a valid Envoy v3 bootstrap").count(),
        examples.len(),
        "{out}"
    );
}
