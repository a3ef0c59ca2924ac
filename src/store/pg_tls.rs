//! TLS to PostgreSQL, with libpq's meanings of `sslmode` and `sslrootcert`
//! read from the datastore URL (tokio-postgres knows only disable, prefer
//! and require, and no root file):
//!
//! | `sslmode` | encrypted | server certificate checked |
//! | --- | --- | --- |
//! | `disable` | no | - |
//! | `prefer` (default) | if the server offers it | no (as `require`) |
//! | `require` | yes | no; against `sslrootcert` when it is given (libpq) |
//! | `verify-ca` | yes | chains to `sslrootcert` (or the system's roots) |
//! | `verify-full` | yes | as `verify-ca`, and names the URL's host |

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::{ClientConfig, WebPkiServerVerifier};
use tokio_rustls::rustls::{self, CertificateError, DigitallySignedStruct, SignatureScheme};

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Encryption only (libpq's `prefer` and `require` without a root file).
    None,
    /// The chain, not the name.
    Chain,
    /// The chain and the host name.
    Full,
}

/// The TLS settings of a datastore URL, and the URL left for tokio-postgres.
#[derive(Debug)]
pub(super) struct Settings {
    /// The URL without `sslmode` and `sslrootcert`.
    pub url: String,
    /// What tokio-postgres is told.
    pub mode: SslMode,
    /// The connector, used unless `mode` is `Disable`.
    pub tls: MakeRustls,
}

/// Splits libpq's TLS parameters off `url` and builds the connector.
pub(super) fn settings(url: &str) -> Result<Settings, String> {
    let mut parsed = url::Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
    let mut sslmode = None;
    let mut rootcert = None;
    let mut rest = Vec::new();
    for (k, v) in parsed.query_pairs() {
        match k.as_ref() {
            "sslmode" => sslmode = Some(v.into_owned()),
            "sslrootcert" => rootcert = Some(v.into_owned()),
            _ => rest.push((k.into_owned(), v.into_owned())),
        }
    }
    if rest.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(rest);
    }
    let (mode, check) = match sslmode.as_deref().unwrap_or("prefer") {
        "disable" => (SslMode::Disable, Check::None),
        "prefer" => (SslMode::Prefer, Check::None),
        "require" if rootcert.is_some() => (SslMode::Require, Check::Chain),
        "require" => (SslMode::Require, Check::None),
        "verify-ca" => (SslMode::Require, Check::Chain),
        "verify-full" => (SslMode::Require, Check::Full),
        other => {
            return Err(format!(
                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            ));
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The roots are read only when the certificate is checked: `prefer`
    // and `require` work on a machine with no CA certificates at all.
    let webpki = match check {
        Check::None => None,
        Check::Chain | Check::Full => Some(webpki_verifier(
            rootcert.as_deref(),
            sslmode.as_deref().unwrap_or("require"),
            provider.clone(),
        )?),
    };
    let verifier = Arc::new(Verifier {
        check,
        webpki,
        signatures: crate::runtime::https::HandshakeSignatures(provider.clone()),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Settings {
        url: parsed.to_string(),
        mode,
        tls: MakeRustls(Arc::new(config)),
    })
}

/// The certificate checker for `sslrootcert` (a PEM file, or `system` or
/// nothing for the system's roots).
fn webpki_verifier(
    rootcert: Option<&str>,
    sslmode: &str,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let roots = match rootcert {
        None | Some("system") => {
            let roots = crate::runtime::https::web_pki_roots(&[])?;
            if roots.is_empty() {
                return Err(format!(
                    "sslmode={sslmode} checks the database's certificate, but this system has no CA certificates: give sslrootcert=FILE"
                ));
            }
            roots
        }
        Some(path) => {
            let pem =
                std::fs::read_to_string(path).map_err(|e| format!("sslrootcert {path}: {e}"))?;
            let mut roots = rustls::RootCertStore::empty();
            for der in
                crate::x509::certs_from_pem(&pem).map_err(|e| format!("sslrootcert {path}: {e}"))?
            {
                roots
                    .add(CertificateDer::from(der))
                    .map_err(|e| format!("sslrootcert {path}: {e}"))?;
            }
            roots
        }
    };
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("sslrootcert: {e}"))
}

/// Checks the server certificate as `check` says (with `webpki`, present
/// unless nothing is checked); handshake signatures are always verified.
#[derive(Debug)]
struct Verifier {
    check: Check,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    signatures: crate::runtime::https::HandshakeSignatures,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// tokio-postgres's TLS hook, on rustls.
#[derive(Debug, Clone)]
pub(super) struct MakeRustls(Arc<ClientConfig>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = rustls_pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, Self::Error> {
        Ok(Connect {
            config: self.0.clone(),
            name: ServerName::try_from(host.to_string())?,
        })
    }
}

/// One connection's TLS handshake.
pub(super) struct Connect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(Stream(tls))
        })
    }
}

/// A TLS connection to PostgreSQL.
pub(super) struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    /// `tls-server-end-point` (RFC 5929): the hash of the server
    /// certificate, with its signature's hash (SHA-256 at least), so SCRAM
    /// can bind the login to this TLS connection.
    fn channel_binding(&self) -> ChannelBinding {
        let Some(cert) = self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        else {
            return ChannelBinding::none();
        };
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
            return ChannelBinding::none();
        };
        let oid = parsed.signature_algorithm.algorithm.to_id_string();
        let algorithm = match oid.as_str() {
            // ecdsa-with-SHA384, sha384WithRSAEncryption
            "1.2.840.10045.4.3.3" | "1.2.840.113549.1.1.12" => &ring::digest::SHA384,
            // ecdsa-with-SHA512, sha512WithRSAEncryption
            "1.2.840.10045.4.3.4" | "1.2.840.113549.1.1.13" => &ring::digest::SHA512,
            // SHA-256 for the rest (and for MD5 and SHA-1, per the RFC);
            // Ed25519 has no defined hash: no binding.
            "1.3.101.112" => return ChannelBinding::none(),
            _ => &ring::digest::SHA256,
        };
        ChannelBinding::tls_server_end_point(
            ring::digest::digest(algorithm, cert).as_ref().to_vec(),
        )
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tls_parameters_are_taken_off_the_url() {
        let s = settings("postgres://u@h:5432/db?sslmode=verify-full&application_name=x").unwrap();
        assert_eq!(s.url, "postgres://u@h:5432/db?application_name=x");
        assert_eq!(s.mode, SslMode::Require);
        let s = settings("postgres://u@h:5432/db").unwrap();
        assert_eq!(s.url, "postgres://u@h:5432/db");
        assert_eq!(s.mode, SslMode::Prefer);
        let s = settings("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(s.mode, SslMode::Disable);
        let e = settings("postgres://u@h/db?sslmode=allow").unwrap_err();
        assert!(e.contains("sslmode=allow"), "{e}");
        let e = settings("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
            .unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
