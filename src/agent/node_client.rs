//! The agent's side of the node API: connecting over TLS (mTLS once it has
//! an SVID) and attesting with a join token or x509pop.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::node::{self as pn, node_client::NodeClient};
use crate::registry::SERVER_DNS_NAME;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::x509::{Bundle, KeyAlgorithm, PrivateKey, certs_to_pem, x509pop_challenge_message};

/// A failed call, worded for what happened: a broken connection or a
/// server that is unavailable did not refuse anything. (Sigil's server
/// answers every refusal with a specific code; `Unknown` comes from the
/// transport, e.g. a connection cut mid-call.)
fn status_text(s: &tonic::Status) -> String {
    match s.code() {
        tonic::Code::Unknown => format!("lost the connection to the server: {}", s.message()),
        tonic::Code::Unavailable => format!("the server is unavailable: {}", s.message()),
        code => format!("server refused: {} ({code:?})", s.message()),
    }
}

impl NodeClientError {
    /// Whether the server, not the request, is at fault: it cannot serve now
    /// (`UNAVAILABLE`: cut off from its datastore, shutting down), the call
    /// got no answer in time, or the connection broke. Another server of the
    /// list may do better.
    pub fn server_failing(&self) -> bool {
        match self {
            NodeClientError::Connect { .. } => true,
            NodeClientError::Status(s) => matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
            ),
            _ => false,
        }
    }
}

/// Why talking to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeClientError {
    /// Could not connect (address, TLS).
    #[error("cannot connect to the server at {addr}: {reason}")]
    Connect {
        /// The server address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The server refused, or the connection to it broke mid-call.
    #[error("{}", status_text(.0))]
    Status(#[from] tonic::Status),
    /// The server answered something unusable.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// Local key material problem.
    #[error(transparent)]
    Key(#[from] crate::x509::KeyError),
    /// The agent is configured for another trust domain than the server serves.
    #[error(
        "this agent is configured for trust domain {configured}, but the server serves {served}; fix trust_domain (or leave it to the trust bundle)"
    )]
    TrustDomainMismatch {
        /// The agent's trust domain.
        configured: String,
        /// The server's.
        served: String,
    },
}

/// The agent's identity: its SVID, key and the bundle it came with.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    /// `spiffe://<td>/sigil/agent/...`.
    pub spiffe_id: SpiffeId,
    /// DER chain, leaf first.
    pub cert_chain: Vec<Vec<u8>>,
    /// The SVID's key (generated here; never sent).
    pub key: PrivateKey,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
    /// The trust bundle.
    pub bundle: Bundle,
}

/// How often the agent pings its server over an open connection, by default
/// (`server_keepalive`): a connection that died without a word (a host gone,
/// a NAT entry dropped) ends the session within this plus [`ping_timeout`],
/// where it would otherwise wait on a sync stream forever.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);
/// The longest any one call may wait for the server's answer (its response
/// headers: a sync stream, once open, runs on). The server answers a signing
/// request it cannot take soon with `RESOURCE_EXHAUSTED`, so a call this slow
/// means a server that is stuck, and the agent moves on.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an unanswered keepalive ping is given before the connection is
/// dropped: the ping interval, at most 20 s.
pub fn ping_timeout(keepalive: Duration) -> Duration {
    keepalive.min(Duration::from_secs(20))
}

/// Opens a channel to the server, verifying it against `bundle_pem`, and
/// presenting `identity` as client certificate when given.
pub async fn connect(
    addr: &str,
    bundle_pem: &str,
    identity: Option<&AgentIdentity>,
) -> Result<NodeClient<Channel>, NodeClientError> {
    connect_with(addr, bundle_pem, identity, DEFAULT_KEEPALIVE).await
}

/// [`connect`], pinging the server every `keepalive`.
pub async fn connect_with(
    addr: &str,
    bundle_pem: &str,
    identity: Option<&AgentIdentity>,
    keepalive: Duration,
) -> Result<NodeClient<Channel>, NodeClientError> {
    let err = |reason: String| NodeClientError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("https://{addr}")
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle_pem))
        .domain_name(SERVER_DNS_NAME);
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(
            certs_to_pem(&id.cert_chain),
            id.key.to_pem().as_bytes(),
        ));
    }
    let channel = Endpoint::from_shared(url)
        .map_err(|e| err(e.to_string()))?
        .tls_config(tls)
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(CALL_TIMEOUT)
        .tcp_keepalive(Some(keepalive))
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(ping_timeout(keepalive))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| err(explain_connect_error(&e)))?;
    Ok(NodeClient::new(channel))
}

/// An error and its causes, each said once (transport errors repeat their
/// source in their own message).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.retain(|p| !text.contains(p.as_str()));
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// A failure to reach the node API in words an operator can act on.
pub fn explain_connect_error(e: &dyn std::error::Error) -> String {
    let chain = error_chain(e);
    let bundle = ["BadSignature", "UnknownIssuer", "certificate verify failed"];
    let not_tls = [
        "InvalidContentType",
        "corrupt message",
        "wrong version number",
    ];
    let hint = if bundle.iter().any(|k| chain.contains(k)) {
        Some(
            "the trust bundle does not match this server (its certificate is not signed by a CA in the bundle given)",
        )
    } else if not_tls.iter().any(|k| chain.contains(k)) {
        Some(
            "this address does not speak TLS as a Sigil node API does; is it the server's --bind address?",
        )
    } else if chain.contains("Connection refused") {
        Some("nothing listens there; is `sigil server` running, and is this its --bind address?")
    } else {
        None
    };
    match hint {
        Some(h) => format!("{h} ({chain})"),
        None => chain,
    }
}

fn identity_from(
    svid: pn::AgentSvid,
    key: PrivateKey,
    trust_domain: &TrustDomain,
) -> Result<AgentIdentity, NodeClientError> {
    let spiffe_id = SpiffeId::new(&svid.spiffe_id)
        .map_err(|e| NodeClientError::Protocol(format!("agent SPIFFE ID: {e}")))?;
    let jwks = String::from_utf8(svid.bundle_jwks)
        .map_err(|_| NodeClientError::Protocol("bundle is not UTF-8".into()))?;
    let bundle = Bundle::from_jwks(trust_domain.clone(), &jwks)
        .map_err(|e| NodeClientError::Protocol(format!("bundle: {e}")))?;
    if svid.cert_chain.is_empty() {
        return Err(NodeClientError::Protocol("empty certificate chain".into()));
    }
    Ok(AgentIdentity {
        spiffe_id,
        cert_chain: svid.cert_chain,
        key,
        expires_at: svid.expires_at,
        bundle,
    })
}

/// How the agent proves which node it is.
#[derive(Debug, Clone)]
pub enum Attestation {
    /// A single-use join token.
    JoinToken(String),
    /// A certificate chain (leaf first) and its key.
    X509Pop {
        /// DER chain.
        chain: Vec<Vec<u8>>,
        /// The leaf's key.
        key: PrivateKey,
    },
}

/// Refuses to attest (and spend a single-use token) to a server of another
/// trust domain: its CA certificates name the domain it serves.
async fn check_trust_domain(
    client: &mut NodeClient<Channel>,
    trust_domain: &TrustDomain,
) -> Result<(), NodeClientError> {
    let jwks = client
        .fetch_bundle(pn::FetchBundleRequest {})
        .await?
        .into_inner()
        .bundle_jwks;
    let jwks = String::from_utf8(jwks)
        .map_err(|_| NodeClientError::Protocol("bundle is not UTF-8".into()))?;
    let bundle = Bundle::from_jwks(trust_domain.clone(), &jwks)
        .map_err(|e| NodeClientError::Protocol(format!("bundle: {e}")))?;
    for der in bundle.x509_authorities() {
        if let Ok(id) = crate::x509::svid_id(der) {
            if &id.trust_domain() != trust_domain {
                return Err(NodeClientError::TrustDomainMismatch {
                    configured: trust_domain.to_string(),
                    served: id.trust_domain().to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Attests to the server and returns the agent identity.
pub async fn attest(
    client: &mut NodeClient<Channel>,
    trust_domain: &TrustDomain,
    attestation: &Attestation,
) -> Result<AgentIdentity, NodeClientError> {
    use pn::attest_agent_request::Step as Req;
    use pn::attest_agent_response::Step as Resp;
    check_trust_domain(client, trust_domain).await?;
    let key = PrivateKey::generate(KeyAlgorithm::EcP256)?;
    let csr = key.csr_der(trust_domain.id().as_str())?;
    let (attestor, payload) = match attestation {
        Attestation::JoinToken(t) => ("join_token", vec![t.as_bytes().to_vec()]),
        Attestation::X509Pop { chain, .. } => ("x509pop", chain.clone()),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let first = pn::AttestAgentRequest {
        step: Some(Req::Params(pn::AttestParams {
            attestor: attestor.into(),
            payload,
            csr,
        })),
    };
    tx.send(first)
        .await
        .map_err(|_| NodeClientError::Protocol("attestation stream closed".into()))?;
    let mut inbound = client
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    loop {
        let msg = inbound.message().await?.ok_or_else(|| {
            NodeClientError::Protocol("attestation ended without a result".into())
        })?;
        match msg.step {
            Some(Resp::Result(svid)) => return identity_from(svid, key, trust_domain),
            Some(Resp::Challenge(nonce)) => {
                let Attestation::X509Pop { key: pop_key, .. } = attestation else {
                    return Err(NodeClientError::Protocol("unexpected challenge".into()));
                };
                let signature = pop_key.sign_asn1(&x509pop_challenge_message(&nonce))?;
                tx.send(pn::AttestAgentRequest {
                    step: Some(Req::ChallengeResponse(signature)),
                })
                .await
                .map_err(|_| NodeClientError::Protocol("attestation stream closed".into()))?;
            }
            None => {
                return Err(NodeClientError::Protocol(
                    "empty attestation message".into(),
                ));
            }
        }
    }
}

/// Renews the agent SVID over mTLS with the current one.
pub async fn renew(
    client: &mut NodeClient<Channel>,
    current: &AgentIdentity,
) -> Result<AgentIdentity, NodeClientError> {
    let key = PrivateKey::generate(KeyAlgorithm::EcP256)?;
    let csr = key.csr_der(current.spiffe_id.as_str())?;
    let svid = client
        .renew_agent(pn::RenewAgentRequest { csr })
        .await?
        .into_inner()
        .svid
        .ok_or_else(|| NodeClientError::Protocol("renewal without an SVID".into()))?;
    identity_from(svid, key, current.bundle.trust_domain())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_server_is_tried_only_for_the_servers_faults() {
        let failing = |s| NodeClientError::Status(s).server_failing();
        assert!(failing(tonic::Status::unavailable(
            "cut off from its datastore"
        )));
        assert!(failing(tonic::Status::cancelled("Timeout expired")));
        assert!(failing(tonic::Status::unknown("transport error")));
        // A refusal of this request would be the same on any server.
        assert!(!failing(tonic::Status::permission_denied("not parented")));
        assert!(!failing(tonic::Status::invalid_argument("bad CSR")));
        assert!(!failing(tonic::Status::resource_exhausted("busy")));
        assert!(!NodeClientError::Protocol("odd".into()).server_failing());
    }

    #[test]
    fn a_broken_connection_is_not_called_a_refusal() {
        let e = |s| NodeClientError::Status(s).to_string();
        assert_eq!(
            e(tonic::Status::unknown(
                "h2 protocol error: error reading a body from connection"
            )),
            "lost the connection to the server: h2 protocol error: error reading a body from connection"
        );
        assert_eq!(
            e(tonic::Status::unavailable("the server is shutting down")),
            "the server is unavailable: the server is shutting down"
        );
        assert_eq!(
            e(tonic::Status::permission_denied("agent is banned")),
            "server refused: agent is banned (PermissionDenied)"
        );
    }
}
