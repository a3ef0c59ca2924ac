//! Envoy SDS v3 on the Workload API socket, behind the same workload
//! attestation: a proxy gets the TLS certificates and validation contexts of
//! the workload it runs as, and new ones are pushed on every rotation or
//! bundle change.
//!
//! Resource names: `default` (the workload's first SVID) or a SPIFFE ID → a
//! `TlsCertificate`; `ROOTCA` or `spiffe://<td>` → a validation context;
//! `ALL` → a SPIFFE cert-validator config with every bundle; no names →
//! everything the workload may have. A name the workload has no right to is
//! left out and logged, and pushed once it appears; the stream stays open.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source::Specifier, node::UserAgentVersionType,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate,
    secret::Type as SecretType, spiffe_cert_validator_config::TrustDomain as TrustDomainConfig,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use envoy_types::pb::google::protobuf::{Any, value::Kind};
use prost::Message;
use ring::rand::SecureRandom;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{AgentState, CachedSvid, attest_peer};
use crate::attest::UnixAttestor;
use crate::spiffe::Selector;
use crate::x509::{Bundle, certs_to_pem};

/// The type URL of every SDS resource.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
const SPIFFE_VALIDATOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// The workload's first SVID.
const DEFAULT: &str = "default";
/// The workload's own trust domain bundle.
const ROOTCA: &str = "ROOTCA";
/// Every bundle the workload may have, as one SPIFFE validator config.
const ALL: &str = "ALL";
/// Node metadata that turns the SPIFFE validator off for one proxy.
const DISABLE_SPIFFE: &str = "disable_spiffe_cert_validation";

/// How a proxy validates peers: with Envoy's SPIFFE validator (1.18 and
/// later, or an unknown version), or with plain `trusted_ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Validator {
    Spiffe,
    TrustedCa,
}

/// Chosen from the first request of a stream (Envoy omits the node later).
fn validator_for(node: Option<&Node>) -> Validator {
    let disabled = node
        .and_then(|n| n.metadata.as_ref())
        .and_then(|m| m.fields.get(DISABLE_SPIFFE))
        .and_then(|v| v.kind.as_ref())
        .is_some_and(|k| match k {
            Kind::BoolValue(b) => *b,
            Kind::StringValue(s) => s == "true",
            _ => false,
        });
    if disabled {
        return Validator::TrustedCa;
    }
    let version = match node.and_then(|n| n.user_agent_version_type.as_ref()) {
        Some(UserAgentVersionType::UserAgentBuildVersion(b)) => {
            b.version.as_ref().map(|v| (v.major_number, v.minor_number))
        }
        Some(UserAgentVersionType::UserAgentVersion(s)) => {
            let mut parts = s.trim_start_matches('v').split('.').map(str::parse::<u32>);
            match (parts.next(), parts.next()) {
                (Some(Ok(major)), Some(Ok(minor))) => Some((major, minor)),
                _ => None,
            }
        }
        None => None,
    };
    match version {
        Some(v) if v < (1, 18) => Validator::TrustedCa,
        _ => Validator::Spiffe,
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
        ..Default::default()
    })
}

fn tls_certificate(name: &str, svid: &CachedSvid) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(SecretType::TlsCertificate(TlsCertificate {
            certificate_chain: inline(certs_to_pem(&svid.chain).into_bytes()),
            private_key: inline(svid.key.to_pem().as_bytes().to_vec()),
            ..Default::default()
        })),
    }
}

fn validation_context(name: &str, bundles: &[&Bundle], validator: Validator) -> Secret {
    let context = match validator {
        Validator::TrustedCa => CertificateValidationContext {
            trusted_ca: inline(
                bundles
                    .iter()
                    .map(|b| b.to_pem())
                    .collect::<String>()
                    .into_bytes(),
            ),
            ..Default::default()
        },
        Validator::Spiffe => {
            let config = SpiffeCertValidatorConfig {
                trust_domains: bundles
                    .iter()
                    .map(|b| TrustDomainConfig {
                        name: b.trust_domain().name().to_string(),
                        trust_bundle: inline(b.to_pem().into_bytes()),
                    })
                    .collect(),
                trust_bundles: None,
            };
            CertificateValidationContext {
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR.into(),
                    typed_config: Some(Any {
                        type_url: SPIFFE_VALIDATOR_TYPE.into(),
                        value: config.encode_to_vec(),
                    }),
                }),
                ..Default::default()
            }
        }
    };
    Secret {
        name: name.to_string(),
        r#type: Some(SecretType::ValidationContext(context)),
    }
}

/// What one workload may have right now.
struct Entitled {
    svids: Vec<Arc<CachedSvid>>,
    bundles: Vec<Bundle>,
}

impl Entitled {
    fn of(state: &AgentState, selectors: &[Selector]) -> Self {
        Entitled {
            svids: state.svids_for(selectors),
            bundles: state.bundles_for(selectors).into_iter().cloned().collect(),
        }
    }

    /// Every name the workload may ask for, as an empty request means it.
    fn all_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .svids
            .iter()
            .map(|s| s.entry.spiffe_id.to_string())
            .collect();
        names.extend(
            self.bundles
                .iter()
                .map(|b| b.trust_domain().id().to_string()),
        );
        names
    }

    /// The secret named `name`, if the workload may have it.
    fn secret(&self, name: &str, validator: Validator) -> Option<Secret> {
        match name {
            DEFAULT => self.svids.first().map(|s| tls_certificate(name, s)),
            ROOTCA => self
                .bundles
                .first()
                .map(|b| validation_context(name, &[b], validator)),
            ALL => Some(validation_context(
                name,
                &self.bundles.iter().collect::<Vec<_>>(),
                Validator::Spiffe,
            )),
            _ => {
                if let Some(s) = self
                    .svids
                    .iter()
                    .find(|s| s.entry.spiffe_id.as_str() == name)
                {
                    return Some(tls_certificate(name, s));
                }
                self.bundles
                    .iter()
                    .find(|b| b.trust_domain().id().as_str() == name)
                    .map(|b| validation_context(name, &[b], validator))
            }
        }
    }

    /// The secrets for `names` (all when empty), by name, and the names left
    /// out.
    fn secrets(
        &self,
        names: &[String],
        validator: Validator,
    ) -> (BTreeMap<String, Any>, Vec<String>) {
        let wanted = if names.is_empty() {
            self.all_names()
        } else {
            names.to_vec()
        };
        let mut found = BTreeMap::new();
        let mut missing = Vec::new();
        for name in wanted {
            match self.secret(&name, validator) {
                Some(secret) => {
                    found.insert(
                        name,
                        Any {
                            type_url: SECRET_TYPE.into(),
                            value: secret.encode_to_vec(),
                        },
                    );
                }
                None => missing.push(name),
            }
        }
        (found, missing)
    }
}

fn digest(parts: impl IntoIterator<Item = impl AsRef<[u8]>>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.as_ref().len() as u64).to_be_bytes());
        ctx.update(p.as_ref());
    }
    ctx.finish().as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn nonce() -> String {
    let mut bytes = [0u8; 16];
    // A failing system RNG leaves zeros: nonces then only need to differ
    // from the last one, which the version prefix already ensures.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn log_missing(rpc: &str, missing: &[String], selectors: &[Selector]) {
    if !missing.is_empty() {
        tracing::warn!(target: "sigil::audit", event = rpc, caller = %crate::edge::peer_caller(), decision = "omit", names = ?missing, selectors = ?selectors.iter().map(Selector::as_str).collect::<Vec<_>>(), "SDS resources this workload has no entry for are left out until one appears");
    }
}

/// The SDS service.
#[derive(Clone)]
pub struct Sds {
    state: watch::Receiver<Arc<AgentState>>,
    attestor: UnixAttestor,
    shutdown: watch::Receiver<bool>,
    demand: Arc<super::Demand>,
}

impl Sds {
    /// A service reading the agent's published state.
    pub fn new(
        state: watch::Receiver<Arc<AgentState>>,
        attestor: UnixAttestor,
        shutdown: watch::Receiver<bool>,
        demand: Arc<super::Demand>,
    ) -> Self {
        Sds {
            state,
            attestor,
            shutdown,
            demand,
        }
    }

    async fn attest<T>(&self, req: &Request<T>, rpc: &str) -> Result<Vec<Selector>, Status> {
        let selectors = attest_peer(&self.attestor, req, rpc).await?;
        tracing::info!(target: "sigil::audit", event = rpc, caller = %crate::edge::peer_caller(), decision = "allow", selectors = ?selectors.iter().map(Selector::as_str).collect::<Vec<_>>());
        Ok(selectors)
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

/// One state-of-the-world stream's bookkeeping (the xDS nonce rules).
struct SotwStream {
    selectors: Vec<Selector>,
    /// Pinned by the first request.
    validator: Validator,
    names: Vec<String>,
    version: u64,
    nonce: String,
    /// The content last sent (names and resources).
    sent: Option<String>,
    /// The names last reported missing (logged once per change).
    missing: Vec<String>,
}

impl SotwStream {
    /// The response for the current names, unless it is what was last sent.
    fn response(&mut self, state: &AgentState) -> Option<DiscoveryResponse> {
        let (found, missing) =
            Entitled::of(state, &self.selectors).secrets(&self.names, self.validator);
        if missing != self.missing {
            log_missing("sds_stream_secrets", &missing, &self.selectors);
            self.missing = missing;
        }
        let content = digest(
            self.names
                .iter()
                .map(|n| n.as_bytes().to_vec())
                .chain(found.values().map(|a| a.value.clone())),
        );
        if self.sent.as_deref() == Some(content.as_str()) {
            return None;
        }
        self.sent = Some(content);
        self.version += 1;
        self.nonce = nonce();
        Some(DiscoveryResponse {
            version_info: self.version.to_string(),
            resources: found.into_values().collect(),
            type_url: SECRET_TYPE.into(),
            nonce: self.nonce.clone(),
            ..Default::default()
        })
    }

    /// Applies a request after the first one; true when a response is due.
    fn on_request(&mut self, r: DiscoveryRequest) -> bool {
        if r.response_nonce != self.nonce {
            // An answer to an older response: superseded, ignore it.
            tracing::debug!(nonce = %r.response_nonce, current = %self.nonce, "SDS: stale nonce ignored");
            return false;
        }
        if let Some(err) = &r.error_detail {
            // A NACK: never answered with the same content again (it would
            // be refused again); a change of names is still applied.
            tracing::warn!(version = %r.version_info, code = err.code, error = %err.message, "SDS: the proxy rejected a response");
        }
        if r.resource_names != self.names {
            self.names = r.resource_names;
            return true;
        }
        false
    }
}

/// One delta stream's bookkeeping: what is subscribed and which version of
/// each resource the proxy has.
struct DeltaStream {
    selectors: Vec<Selector>,
    validator: Validator,
    /// Explicit subscriptions; none (or `*`) means everything.
    subscribed: BTreeSet<String>,
    /// Resource name → version the proxy holds.
    held: BTreeMap<String, String>,
    version: u64,
    missing: Vec<String>,
}

impl DeltaStream {
    fn on_request(&mut self, r: &DeltaDiscoveryRequest) {
        if let Some(err) = &r.error_detail {
            tracing::warn!(nonce = %r.response_nonce, code = err.code, error = %err.message, "SDS: the proxy rejected a delta response");
        }
        for name in &r.resource_names_unsubscribe {
            self.subscribed.remove(name);
            self.held.remove(name);
        }
        self.subscribed
            .extend(r.resource_names_subscribe.iter().cloned());
    }

    /// What changed for the proxy since it last heard, if anything.
    fn response(&mut self, state: &AgentState) -> Option<DeltaDiscoveryResponse> {
        let names: Vec<String> = self
            .subscribed
            .iter()
            .filter(|n| n.as_str() != "*")
            .cloned()
            .collect();
        let (found, missing) = Entitled::of(state, &self.selectors).secrets(&names, self.validator);
        if missing != self.missing {
            log_missing("sds_delta_secrets", &missing, &self.selectors);
            self.missing = missing;
        }
        let mut resources = Vec::new();
        for (name, any) in found.iter() {
            let version = digest([&any.value]);
            if self.held.get(name) != Some(&version) {
                self.held.insert(name.clone(), version.clone());
                resources.push(Resource {
                    name: name.clone(),
                    version,
                    resource: Some(any.clone()),
                    ..Default::default()
                });
            }
        }
        let removed: Vec<String> = self
            .held
            .keys()
            .filter(|n| !found.contains_key(*n))
            .cloned()
            .collect();
        for name in &removed {
            self.held.remove(name);
        }
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        self.version += 1;
        Some(DeltaDiscoveryResponse {
            system_version_info: self.version.to_string(),
            resources,
            type_url: SECRET_TYPE.into(),
            removed_resources: removed,
            nonce: nonce(),
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = Stream<DiscoveryResponse>;

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let selectors = self.attest(&req, "sds_stream_secrets").await?;
        let subscribed = self.demand.subscribe(&selectors);
        let mut inbound = req.into_inner();
        let (tx, out) = mpsc::channel(4);
        let mut state = self.state.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(crate::edge::as_caller(async move {
            let _open = super::open_stream("sds");
            let _subscribed = subscribed;
            // The first request names what is wanted and pins the node. Any
            // nonce it carries (Envoy reconnecting after an agent restart)
            // belongs to another stream: it is served, not ignored.
            let first = match inbound.message().await {
                Ok(Some(r)) => r,
                _ => return,
            };
            let mut stream = SotwStream {
                selectors,
                validator: validator_for(first.node.as_ref()),
                names: first.resource_names,
                version: 0,
                nonce: String::new(),
                sent: None,
                missing: Vec::new(),
            };
            let mut due = true;
            loop {
                if due {
                    let response = stream.response(&state.borrow_and_update());
                    if let Some(r) = response {
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(r)) => due = stream.on_request(r),
                        _ => return,
                    },
                    changed = state.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        due = true;
                    }
                    _ = shutdown.changed() => return,
                }
            }
        }));
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let selectors = self.attest(&req, "sds_fetch_secrets").await?;
        let r = req.into_inner();
        let validator = validator_for(r.node.as_ref());
        let (found, missing) =
            Entitled::of(&self.state.borrow(), &selectors).secrets(&r.resource_names, validator);
        log_missing("sds_fetch_secrets", &missing, &selectors);
        let version = digest(found.values().map(|a| a.value.clone()));
        Ok(Response::new(DiscoveryResponse {
            version_info: version,
            resources: found.into_values().collect(),
            type_url: SECRET_TYPE.into(),
            nonce: nonce(),
            ..Default::default()
        }))
    }

    type DeltaSecretsStream = Stream<DeltaDiscoveryResponse>;

    async fn delta_secrets(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let selectors = self.attest(&req, "sds_delta_secrets").await?;
        let subscribed = self.demand.subscribe(&selectors);
        let mut inbound = req.into_inner();
        let (tx, out) = mpsc::channel(4);
        let mut state = self.state.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(crate::edge::as_caller(async move {
            let _open = super::open_stream("sds");
            let _subscribed = subscribed;
            let first = match inbound.message().await {
                Ok(Some(r)) => r,
                _ => return,
            };
            let mut stream = DeltaStream {
                selectors,
                validator: validator_for(first.node.as_ref()),
                subscribed: BTreeSet::new(),
                // A reconnecting proxy says what it holds: unchanged
                // resources are not sent again.
                held: first
                    .initial_resource_versions
                    .clone()
                    .into_iter()
                    .collect(),
                version: 0,
                missing: Vec::new(),
            };
            stream.on_request(&first);
            loop {
                let response = stream.response(&state.borrow_and_update());
                if let Some(r) = response {
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(r)) => stream.on_request(&r),
                        _ => return,
                    },
                    changed = state.changed() => if changed.is_err() { return },
                    _ = shutdown.changed() => return,
                }
            }
        }));
        Ok(Response::new(ReceiverStream::new(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::BuildVersion;
    use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
    use envoy_types::pb::google::protobuf::{Struct, Value};

    fn node(version: Option<(u32, u32)>, disable: Option<bool>) -> Node {
        Node {
            user_agent_version_type: version.map(|(major, minor)| {
                UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: major,
                        minor_number: minor,
                        patch: 0,
                    }),
                    metadata: None,
                })
            }),
            metadata: disable.map(|d| Struct {
                fields: [(
                    DISABLE_SPIFFE.to_string(),
                    Value {
                        kind: Some(Kind::BoolValue(d)),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_validator_follows_the_envoy_version_and_the_override() {
        assert_eq!(validator_for(None), Validator::Spiffe);
        assert_eq!(validator_for(Some(&node(None, None))), Validator::Spiffe);
        assert_eq!(
            validator_for(Some(&node(Some((1, 17)), None))),
            Validator::TrustedCa
        );
        assert_eq!(
            validator_for(Some(&node(Some((1, 18)), None))),
            Validator::Spiffe
        );
        assert_eq!(
            validator_for(Some(&node(Some((2, 0)), None))),
            Validator::Spiffe
        );
        assert_eq!(
            validator_for(Some(&node(Some((1, 30)), Some(true)))),
            Validator::TrustedCa
        );
        assert_eq!(
            validator_for(Some(&node(Some((1, 30)), Some(false)))),
            Validator::Spiffe
        );
        let old = Node {
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion("1.12.2".into())),
            ..Default::default()
        };
        assert_eq!(validator_for(Some(&old)), Validator::TrustedCa);
    }
}
