//! Node attestation at the node API's edge: the request/response exchange,
//! then the agent record (compare-and-swap) and its SVID. The attestors'
//! rules live in `crate::attest` (x509pop) and the registry (join tokens).

use std::time::Duration;

use tonic::{Status, Streaming};

use super::ServerState;
use super::convert::status;
use crate::attest::x509pop::{self, X509PopError};
use crate::ca::verify_csr;
use crate::proto::node as pn;
use crate::registry::{AgentRecord, random_bytes, unix};
use crate::spiffe::{Selector, SpiffeId};
use crate::x509::x509pop_challenge_message;

/// How long an attestation may wait for the agent's next message.
const ATTEST_STEP_TIMEOUT: Duration = Duration::from_secs(30);

type Sender<T> = tokio::sync::mpsc::Sender<Result<T, Status>>;

/// The hex serial of a certificate (what an agent record remembers).
pub(super) fn serial_hex(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.raw_serial_as_string())
        .unwrap_or_default()
}

async fn next_step(
    inbound: &mut Streaming<pn::AttestAgentRequest>,
) -> Result<pn::attest_agent_request::Step, Status> {
    let msg = tokio::time::timeout(ATTEST_STEP_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("attestation timed out waiting for the agent"))??
        .ok_or_else(|| Status::invalid_argument("attestation stream ended early"))?;
    msg.step
        .ok_or_else(|| Status::invalid_argument("attestation message has no step"))
}

pub(super) async fn attest(
    state: &ServerState,
    inbound: &mut Streaming<pn::AttestAgentRequest>,
    tx: &Sender<pn::AttestAgentResponse>,
    tried: &mut &'static str,
) -> Result<(pn::AgentSvid, &'static str), Status> {
    use pn::attest_agent_request::Step;
    let Step::Params(params) = next_step(inbound).await? else {
        return Err(Status::invalid_argument(
            "the first attestation message must carry params",
        ));
    };
    *tried = match params.attestor.as_str() {
        "join_token" => "join_token",
        "x509pop" => "x509pop",
        _ => "unknown",
    };
    // Check the CSR before consuming anything (a token is single-use).
    let csr = verify_csr(&params.csr).map_err(status)?;
    let (agent_id, attestor, selectors) = match params.attestor.as_str() {
        "join_token" => {
            let [token] = &params.payload[..] else {
                return Err(Status::invalid_argument(
                    "join_token: payload must hold exactly the token",
                ));
            };
            let token = std::str::from_utf8(token)
                .map_err(|_| Status::invalid_argument("join_token: token is not UTF-8"))?;
            let id = state
                .registry
                .consume_token(token, state.clock.now())
                .map_err(status)?;
            (id, "join_token", Vec::new())
        }
        "x509pop" => {
            let (id, selectors) = x509pop_exchange(state, &params.payload, inbound, tx).await?;
            (id, "x509pop", selectors)
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown attestor {other:?} (expected join_token or x509pop)"
            )));
        }
    };
    let seen = state.registry.agent_snapshot(&agent_id).map_err(status)?;
    if seen.record.as_ref().is_some_and(|a| a.banned) {
        return Err(Status::permission_denied(format!(
            "agent {agent_id} is banned"
        )));
    }
    let svid = state.issue_agent_svid(&csr, &agent_id)?;
    let now = unix(state.clock.now());
    let record = AgentRecord {
        spiffe_id: agent_id.clone(),
        attestor: attestor.to_string(),
        selectors,
        attested_at: seen.record.as_ref().map_or(now, |a| a.attested_at),
        svid_expires_at: unix(svid.not_after()),
        svid_serial: serial_hex(svid.cert_der()),
        banned: false,
        previous_serial: String::new(),
        previous_until: 0,
    };
    // Only over the record read above (or none): a ban in between wins.
    state
        .registry
        .replace_agent(&seen, &record)
        .map_err(status)?;
    Ok((state.agent_svid(&agent_id, &svid), attestor))
}

/// Verifies the chain, runs the challenge, and returns the agent ID and selectors.
async fn x509pop_exchange(
    state: &ServerState,
    payload: &[Vec<u8>],
    inbound: &mut Streaming<pn::AttestAgentRequest>,
    tx: &tokio::sync::mpsc::Sender<Result<pn::AttestAgentResponse, Status>>,
) -> Result<(SpiffeId, Vec<Selector>), Status> {
    if state.options.x509pop_roots.is_empty() {
        return Err(Status::failed_precondition(
            "x509pop is not enabled on this server (set x509pop_ca)",
        ));
    }
    let Some((leaf, intermediates)) = payload.split_first() else {
        return Err(Status::invalid_argument(
            "x509pop: payload must hold the certificate chain",
        ));
    };
    x509pop::verify_chain(
        &state.options.x509pop_roots,
        leaf,
        intermediates,
        state.clock.now(),
    )
    .map_err(deny)?;

    let nonce = random_bytes(x509pop::NONCE_LEN).map_err(status)?;
    let challenge = pn::AttestAgentResponse {
        step: Some(pn::attest_agent_response::Step::Challenge(nonce.clone())),
    };
    tx.send(Ok(challenge))
        .await
        .map_err(|_| Status::cancelled("agent went away"))?;
    let pn::attest_agent_request::Step::ChallengeResponse(signature) = next_step(inbound).await?
    else {
        return Err(Status::invalid_argument(
            "x509pop: expected a challenge response",
        ));
    };
    x509pop::verify_possession(leaf, &x509pop_challenge_message(&nonce), &signature)
        .map_err(deny)?;

    let id = state
        .registry
        .agent_id("x509pop", &x509pop::fingerprint(leaf))
        .map_err(status)?;
    let selectors = x509pop::selectors(leaf).map_err(deny)?;
    Ok((id, selectors))
}

/// How a refusal reaches the agent: the operator's broken CA is an internal
/// error; anything about the agent's evidence is a denial naming why.
fn deny(e: X509PopError) -> Status {
    match e {
        X509PopError::BadRoot(_) => Status::internal(e.to_string()),
        _ => Status::permission_denied(format!("x509pop: {e}")),
    }
}
