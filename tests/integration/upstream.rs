//! An upstream CA made with the openssl CLI (a root and an intermediate, as
//! an operator's PKI would hand them over): Sigil's authorities become
//! intermediates under it, workloads get chains openssl verifies against the
//! upstream root, and rotation, taint and revoke keep working.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil::ca::Upstream;
use sigil::server::start;

use crate::agent::start_agent_with;
use crate::server::server_config;

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// root.pem/root.key, and mid.pem/mid.key signed by the root (PKCS#8 keys).
fn make_pki(dir: &Path) {
    for name in ["root", "mid"] {
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &format!("{name}.key"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root.key",
            "-subj",
            "/O=Example/CN=Example Root",
            "-days",
            "30",
            "-out",
            "root.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            "mid.key",
            "-subj",
            "/O=Example/CN=Example Mesh CA",
            "-out",
            "mid.csr",
        ],
    );
    std::fs::write(
        dir.join("mid.ext"),
        "basicConstraints=critical,CA:TRUE,pathlen:1\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "mid.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-set_serial",
            "2",
            "-days",
            "20",
            "-extfile",
            "mid.ext",
            "-out",
            "mid.pem",
        ],
    );
}

fn verify(dir: &Path) -> (bool, String) {
    let o = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(dir.join("bundle.pem"))
        .arg("-untrusted")
        .arg(dir.join("svid.pem"))
        .arg(dir.join("svid.pem"))
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn fetch(socket: &Path, out: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["workload", "fetch-x509", "--out"])
        .arg(out)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn pem_count(path: &Path) -> usize {
    sigil::x509::certs_from_pem(&std::fs::read_to_string(path).unwrap())
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_pki_signs_sigils_intermediates_and_openssl_verifies_the_chains() {
    if !crate::openssl_verify::openssl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_pki(&pki);

    // The flags are checked together, naming what is missing.
    let o = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["server", "--trust-domain", "example.org", "--upstream-cert"])
        .arg(pki.join("mid.pem"))
        .arg("--data-dir")
        .arg(dir.path().join("unused"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("upstream_key"), "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["server", "--trust-domain", "example.org", "--upstream-cert"])
        .arg(pki.join("mid.pem"))
        .arg("--upstream-key")
        .arg(pki.join("mid.key"))
        .arg("--data-dir")
        .arg(dir.path().join("unused"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--upstream-bundle"),
        "an intermediate upstream without its root: {err}"
    );
    assert!(
        !dir.path().join("unused").exists(),
        "a refused start wrote nothing"
    );

    let mut cfg = server_config(&dir.path().join("s"), vec![]);
    cfg.upstream = Some(Arc::new(
        Upstream::load(
            &pki.join("mid.pem"),
            &pki.join("mid.key"),
            Some(&pki.join("root.pem")),
            SystemTime::now(),
        )
        .unwrap(),
    ));
    let server = start(cfg).await.unwrap();
    let root = std::fs::read_to_string(pki.join("root.pem")).unwrap();
    assert_eq!(
        sigil::x509::certs_from_pem(server.bundle_pem()).unwrap(),
        sigil::x509::certs_from_pem(&root).unwrap(),
        "the bundle is the upstream root"
    );
    // The agent bootstraps from the upstream root; the server's TLS chain and
    // the agent's own chain both carry the intermediates.
    let agent = start_agent_with(&server, dir.path(), None).await;
    crate::agent::register_me(&server, "spiffe://example.org/upstream", &agent).await;
    let mut state = agent.state();
    tokio::time::timeout(Duration::from_secs(30), async {
        while state.borrow_and_update().svids.is_empty() {
            state.changed().await.unwrap();
        }
    })
    .await
    .expect("no SVID for the entry");
    let out = dir.path().join("svid");
    fetch(agent.socket(), &out);
    assert_eq!(
        pem_count(&out.join("svid.pem")),
        3,
        "leaf, Sigil's intermediate, the upstream CA"
    );
    assert_eq!(pem_count(&out.join("bundle.pem")), 1);
    let (ok, text) = verify(&out);
    assert!(ok, "openssl rejected the chain: {text}");

    let shown = crate::rotation::ca(server.admin_socket(), &["show", "--kind", "x509"]).1;
    let first = shown["authorities"][0].clone();
    assert_eq!(first["upstream"], true, "{shown}");
    let first = first["id"].as_str().unwrap().to_string();

    // A raw agent holding an SVID from the first intermediate, to check
    // that a revoked intermediate is refused although its root is trusted.
    let stale = crate::server::join(&server).await;

    // Rotate: the new intermediate signs; the bundle stays the root.
    for args in [
        vec!["prepare", "--kind", "x509"],
        vec!["activate", "--kind", "x509", "--force"],
    ] {
        let (ok, _, err) = crate::rotation::ca(server.admin_socket(), &args);
        assert!(ok, "{args:?}: {err}");
    }
    let (ok, _, err) = crate::rotation::ca(server.admin_socket(), &["taint", &first]);
    assert!(ok, "{err}");
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let reissued = {
                let s = state.borrow_and_update();
                !s.svids.is_empty() && s.svids.iter().all(|s| *s.issuer != *first)
            };
            if reissued {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), state.changed()).await;
        }
    })
    .await
    .expect("SVIDs from the tainted intermediate were not re-issued");
    let (ok, _, err) = crate::rotation::ca(server.admin_socket(), &["revoke", &first]);
    assert!(ok, "{err}");
    fetch(agent.socket(), &out);
    let (ok, text) = verify(&out);
    assert!(ok, "openssl rejected the re-issued chain: {text}");
    let leaf = sigil::x509::certs_from_pem(&std::fs::read_to_string(out.join("svid.pem")).unwrap())
        .unwrap();
    assert_ne!(sigil::x509::authority_key_id(&leaf[0]).unwrap(), first);
    assert_eq!(pem_count(&out.join("bundle.pem")), 1, "the root stays");

    let mut client = crate::server::agent_client(&server, &stale).await;
    let refused = client
        .sync_entries(sigil::proto::node::SyncEntriesRequest {
            resume_from_revision: 0,
        })
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("revoked authority"),
        "{refused:?}"
    );
    agent.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
