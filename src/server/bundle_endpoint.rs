//! The SPIFFE bundle endpoint: `GET /` over HTTPS returns the trust
//! domain's bundle in the SPIFFE bundle format, the same bytes as `sigil
//! bundle show --format jwks`. Peers (federation) and proxies poll it; an
//! `ETag` and `Cache-Control: max-age` (the refresh hint) keep that cheap.
//!
//! Profiles: `https_spiffe` serves with the server's own SVID (peers verify
//! it against the bundle they already hold and the server's SPIFFE ID);
//! `https_web` with an operator's certificate and key (verified by Web PKI).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_stream::StreamExt;

use crate::edge::ConnLimits;
use crate::x509::Bundle;

/// How the endpoint authenticates itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleProfile {
    /// With the server SVID (`spiffe://<td>/sigil/server`).
    HttpsSpiffe,
    /// With an operator's certificate chain and key (PEM files).
    HttpsWeb {
        /// Certificate chain file.
        cert: PathBuf,
        /// Private key file.
        key: PathBuf,
    },
}

/// `--bundle-bind` and its profile.
#[derive(Debug, Clone)]
pub struct BundleEndpointConfig {
    /// Where to listen.
    pub bind: SocketAddr,
    /// How to authenticate.
    pub profile: BundleProfile,
}

/// The document served, prepared once per bundle change.
#[derive(Debug)]
pub(super) struct Document {
    etag: HeaderValue,
    cache_control: HeaderValue,
    body: Bytes,
}

impl Document {
    /// The bundle as served: its JWKS, an ETag from its sequence and
    /// content, and a max-age of its refresh hint.
    pub(super) fn of(bundle: &Bundle) -> Arc<Self> {
        let body = bundle.to_jwks();
        let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
        let short: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let etag = format!("\"{}-{short}\"", bundle.sequence());
        let max_age = format!("max-age={}", bundle.refresh_hint().unwrap_or(0));
        Arc::new(Document {
            etag: HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\"")),
            cache_control: HeaderValue::from_str(&max_age)
                .unwrap_or(HeaderValue::from_static("no-cache")),
            body: Bytes::from(body),
        })
    }
}

fn reply(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// Answers one request from the current document.
pub(super) fn respond<B>(doc: &Document, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/" {
        return reply(StatusCode::NOT_FOUND);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED);
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let matches = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == doc.etag
        });
    let mut r = if matches {
        reply(StatusCode::NOT_MODIFIED)
    } else if req.method() == Method::HEAD {
        reply(StatusCode::OK)
    } else {
        Response::new(Full::new(doc.body.clone()))
    };
    let ok = r.status() == StatusCode::OK;
    let h = r.headers_mut();
    h.insert(header::ETAG, doc.etag.clone());
    h.insert(header::CACHE_CONTROL, doc.cache_control.clone());
    if ok {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    r
}

/// Serves until `shutdown`: each TLS connection (HTTP/1.1) answered from the
/// latest document.
pub(super) async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<TlsAcceptor>,
    docs: watch::Receiver<Arc<Document>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut incoming = crate::edge::tls_incoming("bundle", listener, tls, ConnLimits::NODE);
    loop {
        let conn = tokio::select! {
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "bundle endpoint: connection failed");
                    continue;
                }
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let docs = docs.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let doc = docs.borrow().clone();
                async move { Ok::<_, Infallible>(respond(&doc, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::TrustDomain;

    fn get(path: &str, etag: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(path);
        if let Some(e) = etag {
            b = b.header(header::IF_NONE_MATCH, e);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn etag_304_cache_control_and_errors() {
        let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
        bundle.set_sequence(7);
        bundle.set_refresh_hint(Some(300));
        let doc = Document::of(&bundle);
        let ok = respond(&doc, &get("/", None));
        assert_eq!(ok.status(), StatusCode::OK);
        let etag = ok.headers()[header::ETAG].to_str().unwrap().to_string();
        assert!(etag.starts_with("\"7-"), "{etag}");
        assert_eq!(ok.headers()[header::CACHE_CONTROL], "max-age=300");
        assert_eq!(ok.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            respond(&doc, &get("/", Some(&etag))).status(),
            StatusCode::NOT_MODIFIED
        );
        assert_eq!(
            respond(&doc, &get("/", Some(&format!("\"x\", W/{etag}")))).status(),
            StatusCode::NOT_MODIFIED
        );
        assert_eq!(
            respond(&doc, &get("/", Some("\"6-0\""))).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&doc, &get("/x", None)).status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::builder().method("POST").uri("/").body(()).unwrap();
        assert_eq!(
            respond(&doc, &post).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        // A changed bundle gets another tag.
        bundle.set_sequence(8);
        assert_ne!(Document::of(&bundle).etag, doc.etag);
    }
}
