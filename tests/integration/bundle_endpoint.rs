//! The SPIFFE bundle endpoint fetched over HTTPS as a federating peer would:
//! verified (against the trust bundle and the server's identity, or Web PKI),
//! with ETag, 304 and max-age, byte-identical to `sigil bundle show`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sigil::proto::admin as pa;
use sigil::server::bundle_endpoint::{BundleEndpointConfig, BundleProfile};
use sigil::server::start;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

use crate::server::{admin, server_config};

/// One HTTP/1.1 request over TLS verified against `roots` for `name`:
/// (status, headers lowercased, body) and the server's leaf certificate.
async fn get(
    addr: std::net::SocketAddr,
    roots: &[Vec<u8>],
    name: &str,
    if_none_match: Option<&str>,
) -> (u16, Vec<(String, String)>, String, Vec<u8>) {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(rustls_pki_types::CertificateDer::from(r.clone()))
            .unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(
            rustls_pki_types::ServerName::try_from(name.to_string()).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let mut req = format!("GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n");
    if let Some(tag) = if_none_match {
        req.push_str(&format!("If-None-Match: {tag}\r\n"));
    }
    req.push_str("\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string(), leaf)
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
    h.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} header in {h:?}"))
}

fn bundle_show(socket: &Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["bundle", "show", "--format", "jwks", "--admin-socket"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_spiffe_serves_the_bundle_with_etags_and_follows_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(&dir.path().join("s"), vec![]);
    cfg.bundle_endpoint = Some(BundleEndpointConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        profile: BundleProfile::HttpsSpiffe,
    });
    let server = start(cfg).await.unwrap();
    let addr = server.bundle_addr().unwrap();
    let roots = sigil::x509::certs_from_pem(server.bundle_pem()).unwrap();

    // Verified against the bundle, and the certificate is the server's SVID.
    let (status, headers, body, leaf) = get(addr, &roots, "sigil-server", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        sigil::x509::svid_id(&leaf).unwrap().as_str(),
        "spiffe://example.org/sigil/server"
    );
    assert_eq!(header(&headers, "content-type"), "application/json");
    assert_eq!(header(&headers, "cache-control"), "max-age=300");
    assert_eq!(
        body.trim_end(),
        bundle_show(server.admin_socket()).trim_end()
    );
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["spiffe_refresh_hint"], 300);
    let etag = header(&headers, "etag").to_string();

    // Unchanged: 304 with no body.
    let (status, headers, body, _) = get(addr, &roots, "sigil-server", Some(&etag)).await;
    assert_eq!(status, 304);
    assert!(body.is_empty());
    assert_eq!(header(&headers, "etag"), etag);

    // A prepared authority changes the document and its tag.
    admin(&server)
        .await
        .prepare_authority(pa::AuthorityKindRequest {
            kind: "x509".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (body, new_tag) = crate::eventually("a new document after ca prepare", || async {
        let (status, headers, body, _) = get(addr, &roots, "sigil-server", Some(&etag)).await;
        (status == 200).then(|| (body, header(&headers, "etag").to_string()))
    })
    .await;
    assert_ne!(new_tag, etag);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let x509 = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .count();
    assert_eq!(x509, 2);
    assert_eq!(
        body.trim_end(),
        bundle_show(server.admin_socket()).trim_end()
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_web_serves_with_the_operators_certificate_and_bad_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::NoCa;
    let cert = params.self_signed(&key).unwrap();
    let (cert_file, key_file) = (dir.path().join("web.pem"), dir.path().join("web.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    let sigil = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sigil"))
            .args(["server", "--trust-domain", "example.org", "--data-dir"])
            .arg(dir.path().join("unused"))
            .args(args)
            .output()
            .unwrap()
    };
    for (args, says) in [
        (vec!["--bundle-profile", "https_web"], "needs --bundle-bind"),
        (
            vec![
                "--bundle-bind",
                "127.0.0.1:0",
                "--bundle-profile",
                "https_web",
            ],
            "bundle_cert is required",
        ),
        (
            vec![
                "--bundle-bind",
                "127.0.0.1:0",
                "--bundle-cert",
                "x.pem",
                "--bundle-key",
                "x.key",
            ],
            "https_web",
        ),
        (vec!["--bundle-refresh-hint", "3h"], "must be at most 2h"),
    ] {
        let o = sigil(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{args:?}: {err}");
    }
    assert!(
        !dir.path().join("unused").exists(),
        "refused starts write nothing"
    );

    let mut cfg = server_config(&dir.path().join("s"), vec![]);
    cfg.bundle_endpoint = Some(BundleEndpointConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        profile: BundleProfile::HttpsWeb {
            cert: cert_file,
            key: key_file,
        },
    });
    cfg.bundle_refresh_hint = Duration::from_secs(60);
    let server = start(cfg).await.unwrap();
    let (status, headers, body, leaf) = get(
        server.bundle_addr().unwrap(),
        &[cert.der().to_vec()],
        "localhost",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(leaf, cert.der().to_vec());
    assert_eq!(header(&headers, "cache-control"), "max-age=60");
    assert_eq!(
        body.trim_end(),
        bundle_show(server.admin_socket()).trim_end()
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
