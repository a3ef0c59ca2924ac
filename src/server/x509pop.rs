//! x509pop node attestation: the agent's certificate must chain (webpki) to a
//! CA configured on the server, and the agent must sign a fresh server nonce
//! with the certificate's key.

use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
    VerificationAlgorithm,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::{Status, Streaming};
use x509_parser::public_key::PublicKey;

use super::ServerState;
use super::convert::status;
use crate::proto::node as pn;
use crate::registry::random_bytes;
use crate::spiffe::{Selector, SpiffeId};
use crate::x509::x509pop_challenge_message;

const NONCE_LEN: usize = 32;

fn deny(reason: impl std::fmt::Display) -> Status {
    Status::permission_denied(format!("x509pop: {reason}"))
}

/// Verifies the chain, runs the challenge, and returns the agent ID and selectors.
pub async fn attest(
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
    verify_chain(
        &state.options.x509pop_roots,
        leaf,
        intermediates,
        state.clock.now(),
    )?;

    let nonce = random_bytes(NONCE_LEN).map_err(status)?;
    let challenge = pn::AttestAgentResponse {
        step: Some(pn::attest_agent_response::Step::Challenge(nonce.clone())),
    };
    tx.send(Ok(challenge))
        .await
        .map_err(|_| Status::cancelled("agent went away"))?;
    let pn::attest_agent_request::Step::ChallengeResponse(signature) =
        super::node::next_step(inbound).await?
    else {
        return Err(Status::invalid_argument(
            "x509pop: expected a challenge response",
        ));
    };
    verify_possession(leaf, &x509pop_challenge_message(&nonce), &signature)?;

    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(deny)?;
    let fingerprint = super::node::cert_fingerprint(leaf);
    let id = state
        .registry
        .agent_id("x509pop", &fingerprint)
        .map_err(status)?;
    let mut selectors = Vec::new();
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
    {
        if let Ok(s) = Selector::from_parts("x509pop", &format!("subject:cn:{cn}")) {
            selectors.push(s);
        }
    }
    if let Ok(s) = Selector::from_parts("x509pop", &format!("fingerprint:{fingerprint}")) {
        selectors.push(s);
    }
    Ok((id, selectors))
}

fn verify_chain(
    roots: &[Vec<u8>],
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    now: std::time::SystemTime,
) -> Result<(), Status> {
    let anchors = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(r.as_slice()))
                .map(|a| a.to_owned())
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Status::internal(format!("configured x509pop CA is unusable: {e:?}")))?;
    let leaf_der = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| deny(format!("agent certificate is malformed: {e:?}")))?;
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &inter,
        UnixTime::since_unix_epoch(secs),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| deny(format!("certificate does not chain to a trusted CA: {e:?}")))?;
    Ok(())
}

fn verify_possession(leaf: &[u8], message: &[u8], signature: &[u8]) -> Result<(), Status> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(deny)?;
    let spki = cert.public_key();
    let alg: &'static dyn VerificationAlgorithm = match spki.parsed() {
        Ok(PublicKey::EC(p)) if p.key_size() == 256 => &ECDSA_P256_SHA256_ASN1,
        Ok(PublicKey::EC(p)) if p.key_size() == 384 => &ECDSA_P384_SHA384_ASN1,
        Ok(PublicKey::RSA(_)) => &RSA_PKCS1_2048_8192_SHA256,
        _ => return Err(deny("unsupported certificate key type")),
    };
    UnparsedPublicKey::new(alg, spki.subject_public_key.data.as_ref())
        .verify(message, signature)
        .map_err(|_| deny("challenge signature does not verify with the certificate's key"))
}
