//! What an operator watches: `/metrics`, `/live` and `/ready` on server and
//! agent, gRPC health on the node API, `sigil healthcheck` for both, and
//! `--validate`.

use std::process::Command;
use std::time::Duration;

use sigil::proto::admin as pa;
use sigil::proto::workload as pw;
use sigil::server::start;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server::{admin, server_config, td};

/// One plain HTTP GET: (status, body).
pub(crate) async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

fn sigil(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(args)
        .env_remove("SIGIL_ADMIN_SOCKET")
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Waits until `/metrics` at `addr` contains every one of `wanted`.
async fn metrics_with(addr: std::net::SocketAddr, wanted: &[&str]) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        if wanted.iter().all(|w| body.contains(w)) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "missing {:?} in\n{body}",
            wanted
                .iter()
                .filter(|w| !body.contains(**w))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_on_server_and_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(&dir.path().join("s"), vec![]);
    cfg.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    let server = start(cfg).await.unwrap();
    let server_metrics = server.metrics_addr().unwrap();
    assert_eq!(http_get(server_metrics, "/live").await.0, 200);
    assert_eq!(
        http_get(server_metrics, "/ready").await,
        (200, "ready\n".into())
    );
    assert_eq!(http_get(server_metrics, "/nope").await.0, 404);

    let token = admin(&server)
        .await
        .generate_token(pa::GenerateTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner()
        .token;
    let agent = sigil::agent::start(sigil::agent::AgentConfig {
        attestation: Some(sigil::agent::Attestation::JoinToken(token)),
        metrics_bind: Some("127.0.0.1:0".parse().unwrap()),
        ..sigil::agent::AgentConfig::new(
            vec![server.node_addr().to_string()],
            server.bundle_pem().to_string(),
            td(),
            dir.path().join("api.sock"),
            dir.path().join("agent"),
        )
    })
    .await
    .unwrap();
    crate::agent::register_me(&server, "spiffe://example.org/metered", &agent).await;
    crate::agent::wait_for_svids(&agent, 1).await;
    // An open Workload API stream.
    let mut c = sigil::cli::connect_workload(agent.socket()).await.unwrap();
    let mut req = tonic::Request::new(pw::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = c.fetch_x509svid(req).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();

    metrics_with(
        server_metrics,
        &[
            "sigil_svids_issued_total{type=\"x509\"}",
            "sigil_attestations_total{attestor=\"join_token\",result=\"allow\"}",
            "sigil_authority_remaining_seconds{kind=\"x509\"}",
            "sigil_authorities{kind=\"jwt\",state=\"active\"} 1",
            "sigil_rpc_duration_seconds_count{service=\"sigil.node.v1.Node\",method=\"BatchNewX509SVID\",code=\"OK\"}",
            "sigil_rpc_duration_seconds_count{service=\"sigil.admin.v1.Admin\",method=\"CreateEntry\",code=\"OK\"}",
            "sigil_store_revision ",
            "sigil_store_size_bytes ",
            "sigil_sync_streams ",
            "sigil_sync_messages_total ",
        ],
    )
    .await;
    let agent_metrics = agent.metrics_addr().unwrap();
    metrics_with(
        agent_metrics,
        &[
            "sigil_workload_streams{api=\"workload\"} ",
            "sigil_cache_size{cache=\"svids\"} 1",
            "sigil_cache_size{cache=\"entries\"} 1",
            "sigil_rpc_duration_seconds_count{service=\"SpiffeWorkloadAPI\",method=\"FetchX509SVID\",code=\"OK\"}",
        ],
    )
    .await;
    assert_eq!(http_get(agent_metrics, "/ready").await.0, 200);

    // An unknown method never becomes a label value.
    let ch = sigil::cli::unix_channel(agent.socket()).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let _ = grpc
        .unary::<(), (), _>(
            tonic::Request::new(()),
            "/Made.Up/Method".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    let body = metrics_with(
        agent_metrics,
        &["service=\"unknown\",method=\"unknown\",code=\"Unimplemented\""],
    )
    .await;
    assert!(!body.contains("Made.Up"));

    // gRPC health on the node API (TLS), and `sigil healthcheck` for both.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(server.bundle_pem()))
        .domain_name("sigil-server");
    let node = tonic::transport::Endpoint::from_shared(format!("https://{}", server.node_addr()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let h = tonic_health::pb::health_client::HealthClient::new(node)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sigil.node.v1.Node".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let admin_socket = server.admin_socket().display().to_string();
    let (code, out) = sigil(&[
        "healthcheck",
        "--admin-socket",
        &admin_socket,
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((code, v["status"].as_str()), (0, Some("SERVING")), "{out}");
    assert!(
        v["x509_authority_expires_at"]
            .as_str()
            .unwrap()
            .ends_with('Z'),
        "{out}"
    );
    let agent_socket = agent.socket().display().to_string();
    let (code, out) = sigil(&["healthcheck", "--socket", &agent_socket, "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (code, v["status"].as_str(), v["target"].as_str()),
        (0, Some("SERVING"), Some("agent")),
        "{out}"
    );
    let missing = dir.path().join("no.sock").display().to_string();
    let (code, out) = sigil(&["healthcheck", "--socket", &missing, "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((code, v["status"].as_str()), (1, Some("UNKNOWN")), "{out}");
    let (code, out) = sigil(&["healthcheck", "--socket", &missing]);
    assert!(code == 1 && out.contains("Agent is not ready"), "{out}");

    drop(stream);
    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[test]
fn validate_checks_a_config_and_binds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.display().to_string();
    let (code, out) = sigil(&[
        "server",
        "--trust-domain",
        "example.org",
        "--data-dir",
        &data_s,
        "--bind",
        "127.0.0.1:1",
        "--metrics-bind",
        "127.0.0.1:1",
        "--log-level",
        "info,sigil::audit=warn",
        "--validate",
    ]);
    assert!(
        code == 0 && out.contains("configuration OK: server for example.org"),
        "{out}"
    );
    assert!(!data.exists(), "validate creates nothing");
    for (args, says) in [
        (vec!["--log-level", "loud=!"], "log_level"),
        (vec!["--metrics-bind", "nowhere"], "metrics_bind"),
        (
            vec!["--ca-ttl", "1h", "--default-x509-ttl", "1h"],
            "default_x509_ttl",
        ),
    ] {
        let mut all = vec![
            "server",
            "--trust-domain",
            "example.org",
            "--data-dir",
            &data_s,
            "--validate",
        ];
        all.extend(args.iter().copied());
        let (code, out) = sigil(&all);
        assert!(code != 0 && out.contains(says), "{args:?}: {out}");
    }
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, "not a bundle").unwrap();
    let bundle_s = bundle.display().to_string();
    let (code, out) = sigil(&[
        "agent",
        "--server",
        "127.0.0.1:1",
        "--trust-bundle",
        &bundle_s,
        "--join-token",
        "t",
        "--validate",
    ]);
    assert!(code != 0 && out.contains("trust_bundle"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_update_changes_only_what_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let socket = server.admin_socket().display().to_string();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--admin-socket", &socket, "--output", "json"]);
        let (code, out) = sigil(&all);
        (
            code,
            serde_json::from_str::<serde_json::Value>(&out)
                .unwrap_or(serde_json::Value::String(out)),
        )
    };
    let (code, created) = cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/patched",
        "--parent-id",
        "spiffe://example.org/sigil/agent/join_token/x",
        "--selector",
        "unix:uid:1000",
        "--jwt-ttl",
        "2m",
        "--dns-name",
        "a.example.org",
        "--hint",
        "h",
    ]);
    assert_eq!(code, 0, "{created}");
    let id = created[0]["id"].as_str().unwrap().to_string();

    let (code, e) = cli(&["entry", "update", "--id", &id, "--x509-ttl", "30m"]);
    assert_eq!(code, 0, "{e}");
    assert_eq!(e[0]["x509_ttl_seconds"], 1800);
    assert_eq!(e[0]["jwt_ttl_seconds"], 120, "untouched: {e}");
    assert_eq!(e[0]["dns_names"], serde_json::json!(["a.example.org"]));
    assert_eq!(e[0]["hint"], "h");

    let (code, e) = cli(&[
        "entry",
        "update",
        "--id",
        &id,
        "--clear-dns-names",
        "--jwt-ttl",
        "default",
    ]);
    assert_eq!(code, 0, "{e}");
    assert_eq!(e[0]["dns_names"], serde_json::json!([]));
    assert_eq!(e[0]["jwt_ttl_seconds"], 0);
    assert_eq!(e[0]["x509_ttl_seconds"], 1800);

    for (args, says) in [
        (
            vec!["entry", "update", "--id", id.as_str()],
            "nothing to update",
        ),
        (
            vec!["entry", "update", "--id", id.as_str(), "--x509-ttl", "0s"],
            "greater than zero",
        ),
        (
            vec!["entry", "update", "--id", "nope", "--hint", "x"],
            "not found",
        ),
    ] {
        let (code, out) = cli(&args);
        assert!(
            code != 0 && out.to_string().contains(says),
            "{args:?}: {out}"
        );
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[test]
fn every_config_key_is_in_the_examples_and_the_docs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
    for (keys, example) in [
        (sigil::server::SERVER_KEYS, "deploy/config/server.toml"),
        (sigil::agent::AGENT_KEYS, "deploy/config/agent.toml"),
    ] {
        let text = std::fs::read_to_string(root.join(example)).unwrap();
        for key in keys {
            let in_example = text.lines().any(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                l.starts_with(&format!("{key} =")) || l.starts_with(&format!("[[{key}]]"))
            });
            assert!(in_example, "{key} is missing from {example}");
            assert!(
                docs.contains(&format!("`{key}`")),
                "{key} is missing from docs/configuration.md"
            );
        }
        // The example itself loads (commented keys aside).
        sigil::config::RawConfig::load(Some(&root.join(example)), keys).unwrap();
    }
    let raw = sigil::config::RawConfig::load(
        Some(&root.join("deploy/config/server.toml")),
        sigil::server::SERVER_KEYS,
    )
    .unwrap();
    sigil::server::ServerConfig::from_raw(&raw)
        .expect("the server example is a valid configuration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_is_told_so() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_config(&dir.path().join("s"), vec![]);
    let data = cfg.data_dir.display().to_string();
    let server = start(cfg).await.unwrap();
    let other_socket = dir.path().join("other.sock").display().to_string();
    let (code, out) = sigil(&[
        "server",
        "--trust-domain",
        "example.org",
        "--data-dir",
        &data,
        "--bind",
        "127.0.0.1:0",
        "--admin-socket",
        &other_socket,
    ]);
    assert!(
        code != 0 && out.contains("another sigil process is using this data directory"),
        "{out}"
    );
    assert!(!out.contains("WouldBlock"), "{out}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Every flag a deployment example passes must exist in `sigil SUB --help`.
fn flags_exist(sub: &str, args: &[String], origin: &str) {
    let (_, help) = sigil(&[sub, "--help"]);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap();
        assert!(help.contains(flag), "{origin}: `sigil {sub}` has no {flag}");
    }
}

#[test]
fn deployment_examples_parse_and_use_real_flags_and_keys() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(root.join("deploy/kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let kind = v["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no kind", path.display()));
            assert!(
                v["apiVersion"].is_string() && v["metadata"]["name"].is_string(),
                "{}: {v}",
                path.display()
            );
            kinds.push(kind.to_string());
            // Embedded configs load with the daemon's keys.
            for (file, keys) in [
                ("server.toml", sigil::server::SERVER_KEYS),
                ("agent.toml", sigil::agent::AGENT_KEYS),
            ] {
                if let Some(toml) = v["data"][file].as_str() {
                    let f = tmp.path().join(file);
                    std::fs::write(&f, toml).unwrap();
                    sigil::config::RawConfig::load(Some(&f), keys)
                        .unwrap_or_else(|e| panic!("{}: {file}: {e}", path.display()));
                }
            }
            // Container arguments are real flags.
            let containers = v["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned();
            for c in containers.into_iter().flatten() {
                let args: Vec<String> = c["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str().map(str::to_string))
                    .collect();
                if let Some(sub) = args.first().filter(|s| *s == "server" || *s == "agent") {
                    flags_exist(sub, &args, &path.display().to_string());
                }
            }
        }
    }
    for want in [
        "StatefulSet",
        "DaemonSet",
        "Service",
        "ConfigMap",
        "Deployment",
    ] {
        assert!(
            kinds.iter().any(|k| k == want),
            "no {want} in deploy/kubernetes"
        );
    }

    for (unit, sub) in [
        ("sigil-server.service", "server"),
        ("sigil-agent.service", "agent"),
    ] {
        let text = std::fs::read_to_string(root.join("deploy/systemd").join(unit)).unwrap();
        let joined = text.replace("\\\n", " ");
        let mut section = String::new();
        let mut keys = Vec::new();
        for line in joined
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if line.starts_with('[') {
                section = line.to_string();
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{unit}: bad line {line:?}"));
            assert!(!section.is_empty(), "{unit}: {line:?} outside a section");
            keys.push((k.to_string(), v.to_string()));
        }
        let get = |k: &str| {
            keys.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let exec = get("ExecStart").unwrap();
        let args: Vec<String> = exec
            .split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect();
        assert_eq!(args[0], sub, "{unit}");
        flags_exist(sub, &args, unit);
        for required in [
            "StateDirectory",
            "RuntimeDirectory",
            "ProtectSystem",
            "LimitNOFILE",
        ] {
            assert!(get(required).is_some(), "{unit} lacks {required}");
        }
        assert!(
            get("ReadWritePaths").is_none(),
            "{unit}: ReadWritePaths may name a missing path"
        );
        assert!(!exec.contains("/tmp/"), "{unit} should not use /tmp");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_x509_out_writes_every_svid() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(&dir.path().join("s"), vec![]))
        .await
        .unwrap();
    let agent = crate::agent::start_agent_with(&server, dir.path(), None).await;
    let uid = sigil::attest::current_uid().unwrap();
    for (id, hint) in [
        ("spiffe://example.org/first", ""),
        ("spiffe://example.org/second", "db/primary"),
    ] {
        admin(&server)
            .await
            .create_entry(pa::EntryParams {
                spiffe_id: id.into(),
                parent_id: agent.spiffe_id().to_string(),
                selectors: vec![format!("unix:uid:{uid}")],
                hint: hint.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    crate::agent::wait_for_svids(&agent, 2).await;
    let out = dir.path().join("out");
    let socket = format!("unix://{}", agent.socket().display());
    let (code, printed) = sigil(&[
        "workload",
        "fetch-x509",
        "--out",
        out.to_str().unwrap(),
        "--socket",
        &socket,
    ]);
    assert_eq!(code, 0, "{printed}");
    let id_of = |file: &str| {
        let pem = std::fs::read_to_string(out.join(file)).unwrap();
        let certs = sigil::x509::certs_from_pem(&pem).unwrap();
        sigil::x509::svid_id(&certs[0]).unwrap().to_string()
    };
    assert_eq!(id_of("svid.pem"), "spiffe://example.org/first");
    assert_eq!(id_of("svid.db_primary.pem"), "spiffe://example.org/second");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("svid.db_primary.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(out.join("bundle.pem").exists());
    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[test]
fn completions_and_examples_in_help() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out) = sigil(&["completions", shell]);
        assert!(
            code == 0 && out.contains("sigil") && out.contains("healthcheck"),
            "{shell}: {out}"
        );
    }
    let (code, _) = sigil(&["completions", "tcsh"]);
    assert_ne!(code, 0);
    for cmd in [
        "server",
        "token",
        "entry",
        "agent",
        "dev",
        "policy",
        "workload",
        "bundle",
        "ca",
        "x509",
        "jwt",
        "healthcheck",
        "completions",
    ] {
        let (code, out) = sigil(&[cmd, "--help"]);
        assert!(
            code == 0 && out.contains("Example"),
            "`sigil {cmd} --help` has no example:\n{out}"
        );
    }
    for sub in [
        ["entry", "create"],
        ["entry", "show"],
        ["entry", "update"],
        ["entry", "delete"],
        ["agent", "list"],
        ["agent", "ban"],
        ["agent", "evict"],
        ["bundle", "show"],
        ["bundle", "list"],
        ["bundle", "set"],
        ["bundle", "delete"],
        ["ca", "show"],
        ["ca", "prepare"],
        ["ca", "activate"],
        ["ca", "taint"],
        ["ca", "revoke"],
        ["x509", "mint"],
        ["jwt", "mint"],
        ["token", "generate"],
        ["workload", "fetch-x509"],
        ["workload", "fetch-jwt"],
        ["workload", "validate-jwt"],
        ["workload", "watch"],
        ["policy", "check"],
    ] {
        let (code, out) = sigil(&[sub[0], sub[1], "--help"]);
        assert!(
            code == 0 && out.contains("Example"),
            "`sigil {} {} --help` has no example:\n{out}",
            sub[0],
            sub[1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_say_what_is_wrong_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(&dir.path().join("s"), vec![]);
    cfg.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    let server = start(cfg).await.unwrap();
    let other = sigil::X509Authority::self_signed(
        &td(),
        sigil::KeyAlgorithm::EcP256,
        Duration::from_secs(3600),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let wrong = dir.path().join("wrong.pem");
    std::fs::write(
        &wrong,
        sigil::x509::certs_to_pem([&other.cert_der().to_vec()]),
    )
    .unwrap();
    let right = dir.path().join("right.pem");
    std::fs::write(&right, server.bundle_pem()).unwrap();
    let base = dir.path().to_path_buf();
    let agent = move |addr: String, bundle: &std::path::Path| {
        let data = base.join("agent-data").display().to_string();
        let sock = base.join("a.sock").display().to_string();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sigil"))
            .args(["agent", "--server", &addr, "--trust-bundle"])
            .arg(bundle)
            .args([
                "--join-token",
                "unused",
                "--data-dir",
                &data,
                "--socket",
                &sock,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = tokio::task::spawn_blocking({
        let addr = server.node_addr().to_string();
        let wrong = wrong.clone();
        let agent = agent.clone();
        move || agent(addr, &wrong)
    })
    .await
    .unwrap();
    assert!(
        err.contains("the trust bundle does not match this server"),
        "{err}"
    );
    assert_eq!(err.matches("BadSignature").count(), 1, "said once: {err}");
    // The metrics port speaks plain HTTP, not the node API's TLS.
    let err = tokio::task::spawn_blocking({
        let addr = server.metrics_addr().unwrap().to_string();
        move || agent(addr, &right)
    })
    .await
    .unwrap();
    assert!(err.contains("does not speak TLS"), "{err}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[test]
fn a_server_that_cannot_bind_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = dir.path().join("data");
    let (code, out) = sigil(&[
        "server",
        "--trust-domain",
        "example.org",
        "--data-dir",
        data.to_str().unwrap(),
        "--bind",
        &addr,
        "--admin-socket",
        dir.path().join("admin.sock").to_str().unwrap(),
    ]);
    assert!(code != 0 && out.contains(&addr), "{out}");
    assert!(
        !data.exists(),
        "no store, KEK or CA created: {:?}",
        std::fs::read_dir(dir.path()).unwrap().collect::<Vec<_>>()
    );
}

#[test]
fn example_policies_load_and_decide_as_documented() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policies");
    let check = |principal: Option<&str>, dest: &str, label: &str, method: &str, path: &str| {
        let mut args = vec!["policy", "check", "--policy-dir", dir];
        if let Some(p) = principal {
            args.extend(["--principal", p]);
        }
        args.extend([
            "--destination",
            dest,
            "--label",
            label,
            "--method",
            method,
            "--path",
            path,
        ]);
        args.extend(["--output", "json"]);
        let (code, out) = sigil(&args);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
        assert_eq!(code, if v["decision"] == "allow" { 0 } else { 1 }, "{out}");
        v
    };
    let sleep = Some("spiffe://cluster.local/ns/foo/sa/sleep");
    let httpbin = "spiffe://cluster.local/ns/foo/sa/httpbin";
    let api = "spiffe://cluster.local/ns/foo/sa/api";
    let v = check(sleep, httpbin, "app=httpbin", "GET", "/status/200");
    assert_eq!(
        (v["decision"].as_str(), v["policy"].as_str()),
        (Some("allow"), Some("foo/httpbin-get")),
        "{v}"
    );
    assert_eq!(
        check(sleep, httpbin, "app=httpbin", "POST", "/status/200")["decision"],
        "deny"
    );
    assert_eq!(
        check(
            Some("spiffe://cluster.local/ns/foo/sa/other"),
            httpbin,
            "app=httpbin",
            "GET",
            "/headers"
        )["decision"],
        "deny"
    );
    let v = check(sleep, httpbin, "app=httpbin", "GET", "/admin");
    assert_eq!(
        (v["decision"].as_str(), v["policy"].as_str()),
        (Some("deny"), Some("foo/deny-admin")),
        "{v}"
    );
    assert_eq!(
        check(sleep, api, "app=api", "GET", "/items")["decision"],
        "allow"
    );
    assert_eq!(
        check(sleep, api, "app=api", "POST", "/items")["decision"],
        "deny"
    );
}

#[test]
fn small_messages_read_well() {
    let (code, out) = sigil(&["server", "--trust-domain", "", "--validate"]);
    assert!(code != 0 && out.contains("trust domain is empty"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x.yaml"), "a: [\n").unwrap();
    let (code, out) = sigil(&[
        "policy",
        "check",
        "--policy-dir",
        dir.path().to_str().unwrap(),
        "--destination",
        "spiffe://x/ns/a/sa/b",
        "--method",
        "GET",
        "--path",
        "/",
    ]);
    assert!(
        code == 2 && out.contains("document 0: not YAML") && !out.contains(": :"),
        "{out}"
    );
}

#[test]
fn a_stale_admin_socket_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let (code, out) = sigil(&["entry", "show", "--admin-socket", path.to_str().unwrap()]);
    assert!(code != 0 && out.contains("stale socket"), "{out}");
    assert_eq!(out.matches("Connection refused").count(), 0, "{out}");
}

#[test]
fn policy_check_reads_remote_ip_through_trusted_proxies() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: office\n  namespace: foo\nspec:\n  rules:\n  - from:\n    - source:\n        remoteIpBlocks: [\"203.0.113.0/24\"]\n",
    )
    .unwrap();
    let check = |hops: &str| {
        sigil(&[
            "policy",
            "check",
            "--policy-dir",
            dir.path().to_str().unwrap(),
            "--destination",
            "spiffe://cluster.local/ns/foo/sa/api",
            "--method",
            "GET",
            "--path",
            "/",
            "--source-ip",
            "10.0.0.2",
            "--header",
            "x-forwarded-for=203.0.113.7",
            "--policy-trusted-proxies",
            hops,
        ])
        .0
    };
    assert_eq!(
        check("1"),
        0,
        "the client behind one trusted proxy is in the block"
    );
    assert_eq!(
        check("0"),
        1,
        "without trusted proxies the peer (10.0.0.2) is the client"
    );
}
