//! The admin API, served on the 0600 Unix socket. Every change is audited.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::ServerState;
use super::convert::{status, ts};
use crate::ca::X509SvidParams;
use crate::proto::admin::{self as pa, admin_server::Admin};
use crate::proto::node as pn;
use crate::registry::{AgentRecord, EntryParams, Registry, RegistryError, SERVER_DNS_NAME};
use crate::spiffe::{Selector, SpiffeId};
use crate::store::AuthorityKind;
use crate::x509::{KeyAlgorithm, PrivateKey};

/// The admin API.
pub struct AdminService {
    state: Arc<ServerState>,
}

impl AdminService {
    /// A service over the shared server state.
    pub fn new(state: Arc<ServerState>) -> Self {
        AdminService { state }
    }

    /// Ban or evict: parse the ID, act, audit.
    fn agent_action(
        &self,
        event: &str,
        req: Request<pa::AgentIdRequest>,
        act: impl Fn(&Registry, &SpiffeId) -> Result<AgentRecord, RegistryError>,
    ) -> Result<Response<pa::Agent>, Status> {
        let raw = req.into_inner().spiffe_id;
        let result = parse_id("spiffe_id", &raw).and_then(|id| {
            act(&self.state.registry, &id)
                .map(|a| pa::Agent::from(&a))
                .map_err(status)
        });
        audited(event, &raw, result)
    }
}

fn parse_id(field: &str, value: &str) -> Result<SpiffeId, Status> {
    SpiffeId::new(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn optional_id(field: &str, value: &str) -> Result<Option<SpiffeId>, Status> {
    (!value.is_empty())
        .then(|| parse_id(field, value))
        .transpose()
}

/// Entries per ListEntries page by default, and at most.
const DEFAULT_PAGE: usize = 500;
const MAX_PAGE: usize = 5000;
/// A ListEntries page stops once its entries pass this many bytes.
const PAGE_BYTES: usize = 2 * 1024 * 1024;

/// Join tokens live this long at most.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

fn positive_ttl(
    field: &str,
    seconds: i64,
    default: Duration,
    max: Duration,
) -> Result<Duration, Status> {
    match seconds {
        0 => Ok(default),
        s if s < 0 => Err(Status::invalid_argument(format!(
            "{field}: {s} is negative"
        ))),
        s if s.unsigned_abs() > max.as_secs() => Err(Status::invalid_argument(format!(
            "{field}: {s}s exceeds the maximum of {}s",
            max.as_secs()
        ))),
        s => Ok(Duration::from_secs(s.unsigned_abs())),
    }
}

/// The ID of an operator-minted SVID: in this trust domain, with a path, and
/// not in the space reserved for Sigil's agents and server (as for entries).
fn mintable_id(td: &crate::spiffe::TrustDomain, value: &str) -> Result<SpiffeId, Status> {
    let id = parse_id("spiffe_id", value)?;
    if !id.is_member_of(td) {
        return Err(Status::invalid_argument(format!(
            "spiffe_id: {id} is not in trust domain {td}"
        )));
    }
    if id.path().is_empty() {
        return Err(Status::invalid_argument(format!(
            "spiffe_id: {id} has no path; a workload ID needs one"
        )));
    }
    if id.path() == "/sigil" || id.path().starts_with("/sigil/") {
        return Err(Status::invalid_argument(format!(
            "spiffe_id: {id} is reserved for Sigil's own agents and server (/sigil/...)"
        )));
    }
    Ok(id)
}

fn trust_domain_arg(name: &str) -> Result<crate::spiffe::TrustDomain, Status> {
    crate::spiffe::TrustDomain::new(name)
        .map_err(|e| Status::invalid_argument(format!("trust_domain: {e}")))
}

fn bundle_proto(b: &crate::Bundle) -> pa::GetBundleResponse {
    pa::GetBundleResponse {
        bundle_jwks: b.to_jwks().into_bytes(),
        trust_domain: b.trust_domain().to_string(),
    }
}

fn bundle_status(e: crate::registry::BundleError) -> Status {
    use crate::registry::BundleError as B;
    match e {
        B::OwnTrustDomain(_) => Status::invalid_argument(e.to_string()),
        B::SequenceBackwards { .. } => Status::failed_precondition(e.to_string()),
        B::NotFound(_) => Status::not_found(e.to_string()),
        B::Registry(r) => status(r),
    }
}

fn audited<T>(
    action: &str,
    target: &str,
    result: Result<T, Status>,
) -> Result<Response<T>, Status> {
    match &result {
        Ok(_) => {
            tracing::info!(target: "sigil::audit", event = action, caller = %crate::edge::peer_caller(), decision = "allow", subject = target)
        }
        Err(s) => {
            tracing::warn!(target: "sigil::audit", event = action, caller = %crate::edge::peer_caller(), decision = "deny", subject = target, reason = s.message())
        }
    }
    result.map(Response::new)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_entry(
        &self,
        req: Request<pa::EntryParams>,
    ) -> Result<Response<pn::Entry>, Status> {
        let p = req.into_inner();
        let subject = p.spiffe_id.clone();
        let result = EntryParams::try_from(p).and_then(|params| {
            self.state
                .registry
                .create_entry(params, self.state.clock.now())
                .map(|e| pn::Entry::from(&e))
                .map_err(status)
        });
        audited("create_entry", &subject, result)
    }

    async fn update_entry(
        &self,
        req: Request<pa::UpdateEntryRequest>,
    ) -> Result<Response<pn::Entry>, Status> {
        let r = req.into_inner();
        let id = r.id.clone();
        let result = r
            .params
            .ok_or_else(|| Status::invalid_argument("params: required"))
            .and_then(EntryParams::try_from)
            .and_then(|params| {
                self.state
                    .registry
                    .update_entry(&r.id, params)
                    .map(|e| pn::Entry::from(&e))
                    .map_err(status)
            });
        audited("update_entry", &id, result)
    }

    async fn delete_entry(
        &self,
        req: Request<pa::EntryIdRequest>,
    ) -> Result<Response<pa::DeleteEntryResponse>, Status> {
        let id = req.into_inner().id;
        let result = self
            .state
            .registry
            .delete_entry(&id)
            .map(|e| pa::DeleteEntryResponse { id: e.id })
            .map_err(status);
        audited("delete_entry", &id, result)
    }

    async fn get_entry(
        &self,
        req: Request<pa::EntryIdRequest>,
    ) -> Result<Response<pn::Entry>, Status> {
        let id = req.into_inner().id;
        match self.state.registry.entry(&id).map_err(status)? {
            Some(e) => Ok(Response::new(pn::Entry::from(&e))),
            None => Err(Status::not_found(format!("entry {id:?} not found"))),
        }
    }

    async fn list_entries(
        &self,
        req: Request<pa::ListEntriesRequest>,
    ) -> Result<Response<pa::ListEntriesResponse>, Status> {
        let r = req.into_inner();
        let spiffe_id = optional_id("spiffe_id", &r.spiffe_id)?;
        let parent_id = optional_id("parent_id", &r.parent_id)?;
        let selector = (!r.selector.is_empty())
            .then(|| Selector::new(&r.selector))
            .transpose()
            .map_err(|e| Status::invalid_argument(format!("selector: {e}")))?;
        let limit = match r.page_size {
            0 => DEFAULT_PAGE,
            n if n as usize > MAX_PAGE => {
                return Err(Status::invalid_argument(format!(
                    "page_size: {n} is more than the maximum of {MAX_PAGE}"
                )));
            }
            n => n as usize,
        };
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let (entries, more) = self
            .state
            .registry
            .list_entries(
                spiffe_id.as_ref(),
                parent_id.as_ref(),
                selector.as_ref(),
                after,
                limit,
            )
            .map_err(status)?;
        // Pages stop near PAGE_BYTES whatever the entries hold.
        let mut page = Vec::new();
        let mut bytes = 0;
        let mut cut = false;
        for e in &entries {
            let e = pn::Entry::from(e);
            bytes += prost::Message::encoded_len(&e);
            if bytes > PAGE_BYTES && !page.is_empty() {
                cut = true;
                break;
            }
            page.push(e);
        }
        let next_page_token = match page.last() {
            Some(last) if more || cut => last.id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pa::ListEntriesResponse {
            entries: page,
            next_page_token,
        }))
    }

    async fn generate_token(
        &self,
        req: Request<pa::GenerateTokenRequest>,
    ) -> Result<Response<pa::GenerateTokenResponse>, Status> {
        let ttl = positive_ttl(
            "ttl",
            req.get_ref().ttl_seconds,
            Duration::from_secs(600),
            MAX_TOKEN_TTL,
        )?;
        let result = self
            .state
            .registry
            .generate_token(ttl, self.state.clock.now())
            .map(|t| pa::GenerateTokenResponse {
                token: t.token,
                agent_id: t.agent_id.to_string(),
                expires_at: i64::try_from(t.expires_at).unwrap_or(i64::MAX),
            })
            .map_err(status);
        let subject = result
            .as_ref()
            .map(|r| r.agent_id.clone())
            .unwrap_or_default();
        audited("generate_token", &subject, result)
    }

    async fn list_agents(
        &self,
        _req: Request<pa::ListAgentsRequest>,
    ) -> Result<Response<pa::ListAgentsResponse>, Status> {
        let agents = self.state.registry.agents().map_err(status)?;
        Ok(Response::new(pa::ListAgentsResponse {
            agents: agents.iter().map(pa::Agent::from).collect(),
        }))
    }

    async fn ban_agent(
        &self,
        req: Request<pa::AgentIdRequest>,
    ) -> Result<Response<pa::Agent>, Status> {
        self.agent_action("ban_agent", req, Registry::ban_agent)
    }

    async fn evict_agent(
        &self,
        req: Request<pa::AgentIdRequest>,
    ) -> Result<Response<pa::Agent>, Status> {
        self.agent_action("evict_agent", req, Registry::evict_agent)
    }

    async fn get_bundle(
        &self,
        req: Request<pa::GetBundleRequest>,
    ) -> Result<Response<pa::GetBundleResponse>, Status> {
        let own = self.state.registry.trust_domain();
        let asked = &req.get_ref().trust_domain;
        let td = if asked.is_empty() {
            own.clone()
        } else {
            trust_domain_arg(asked)?
        };
        if &td == own {
            return Ok(Response::new(pa::GetBundleResponse {
                bundle_jwks: self.state.bundle_jwks(),
                trust_domain: own.to_string(),
            }));
        }
        match self.state.registry.bundle(&td).map_err(status)? {
            Some(b) => Ok(Response::new(bundle_proto(&b))),
            None => Err(Status::not_found(
                crate::registry::BundleError::NotFound(td.to_string()).to_string(),
            )),
        }
    }

    async fn list_bundles(
        &self,
        _req: Request<pa::ListBundlesRequest>,
    ) -> Result<Response<pa::ListBundlesResponse>, Status> {
        let mut bundles = vec![pa::GetBundleResponse {
            bundle_jwks: self.state.bundle_jwks(),
            trust_domain: self.state.registry.trust_domain().to_string(),
        }];
        let federated = self.state.registry.federated_bundles().map_err(status)?;
        bundles.extend(federated.iter().map(bundle_proto));
        Ok(Response::new(pa::ListBundlesResponse { bundles }))
    }

    async fn set_bundle(
        &self,
        req: Request<pa::SetBundleRequest>,
    ) -> Result<Response<pa::GetBundleResponse>, Status> {
        let r = req.into_inner();
        let result = (|| {
            let td = trust_domain_arg(&r.trust_domain)?;
            let text = String::from_utf8(r.bundle)
                .map_err(|_| Status::invalid_argument("bundle: not UTF-8 text"))?;
            let bundle = match r.format.as_str() {
                "" | "jwks" => crate::Bundle::from_jwks(td.clone(), &text),
                "pem" => crate::Bundle::from_pem(td.clone(), &text),
                other => {
                    return Err(Status::invalid_argument(format!(
                        "format: {other:?} is not jwks or pem"
                    )));
                }
            }
            .map_err(|e| Status::invalid_argument(format!("bundle: {e}")))?;
            self.state
                .registry
                .set_federated_bundle(&bundle, false)
                .map_err(bundle_status)?;
            Ok(bundle_proto(&bundle))
        })();
        audited("set_bundle", &r.trust_domain, result)
    }

    async fn delete_bundle(
        &self,
        req: Request<pa::DeleteBundleRequest>,
    ) -> Result<Response<pa::DeleteBundleResponse>, Status> {
        let r = req.into_inner();
        let result = trust_domain_arg(&r.trust_domain).and_then(|td| {
            self.state
                .registry
                .delete_federated_bundle(&td)
                .map_err(bundle_status)
        });
        audited(
            "delete_bundle",
            &r.trust_domain,
            result.map(|()| pa::DeleteBundleResponse {}),
        )
    }

    async fn mint_x509svid(
        &self,
        req: Request<pa::MintX509svidRequest>,
    ) -> Result<Response<pa::MintX509svidResponse>, Status> {
        let r = req.into_inner();
        let result = (|| {
            let spiffe_id = mintable_id(self.state.registry.trust_domain(), &r.spiffe_id)?;
            if r.dns_names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(SERVER_DNS_NAME))
            {
                return Err(Status::invalid_argument(format!(
                    "dns_names: {SERVER_DNS_NAME:?} is reserved for the server"
                )));
            }
            let ttl = positive_ttl(
                "ttl",
                r.ttl_seconds,
                self.state.options.default_x509_ttl,
                self.state.registry.validation().max_x509_ttl,
            )?;
            let key = PrivateKey::generate(KeyAlgorithm::EcP256)
                .map_err(|e| status(crate::ca::CaError::from(e)))?;
            let params = X509SvidParams {
                spiffe_id,
                dns_names: r.dns_names.clone(),
                ttl,
            };
            let svid = self
                .state
                .ca
                .x509()
                .issue_for_private_key(&key, &params, self.state.clock.now())
                .map_err(status)?;
            super::node::svid_issued("x509");
            Ok(pa::MintX509svidResponse {
                cert_chain: svid.chain().to_vec(),
                private_key: key.pkcs8_der().to_vec(),
                expires_at: ts(svid.not_after()),
            })
        })();
        audited("mint_x509_svid", &r.spiffe_id, result)
    }

    async fn mint_jwtsvid(
        &self,
        req: Request<pa::MintJwtsvidRequest>,
    ) -> Result<Response<pa::MintJwtsvidResponse>, Status> {
        let r = req.into_inner();
        let result = (|| {
            let spiffe_id = mintable_id(self.state.registry.trust_domain(), &r.spiffe_id)?;
            crate::jwt::check_audiences(&r.audience)
                .map_err(|e| Status::invalid_argument(format!("audience: {e}")))?;
            let ttl = positive_ttl(
                "ttl",
                r.ttl_seconds,
                self.state.options.default_jwt_ttl,
                self.state.registry.validation().max_jwt_ttl,
            )?;
            let now = self.state.clock.now();
            let token = self
                .state
                .ca
                .jwt()
                .mint(
                    &spiffe_id,
                    &r.audience,
                    ttl,
                    now,
                    self.state.options.jwt_issuer.as_deref(),
                )
                .map_err(status)?;
            super::node::svid_issued("jwt");
            Ok(pa::MintJwtsvidResponse {
                token,
                expires_at: ts(now.checked_add(ttl).unwrap_or(now)).min(ts(self
                    .state
                    .ca
                    .jwt()
                    .not_after())),
            })
        })();
        audited("mint_jwt_svid", &r.spiffe_id, result)
    }

    async fn health(
        &self,
        _req: Request<pa::HealthRequest>,
    ) -> Result<Response<pa::HealthResponse>, Status> {
        let rotation = self
            .state
            .rotation_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(why) = rotation {
            return Err(Status::unavailable(format!(
                "CA rotation is failing: {why}"
            )));
        }
        // A real read and write of the store: a damaged store or a full disk
        // makes health fail, so `sigil healthcheck` tells the truth.
        let store = self.state.registry.store().clone();
        let probed = tokio::task::spawn_blocking(move || {
            store.probe()?;
            store.revision()
        })
        .await
        .map_err(|e| Status::internal(format!("health probe task failed: {e}")))?;
        let revision = probed.map_err(|e| {
            tracing::error!(error = %e, "health probe: the store failed");
            Status::unavailable(format!("the store failed a read/write probe: {e}"))
        })?;
        Ok(Response::new(pa::HealthResponse {
            trust_domain: self.state.registry.trust_domain().to_string(),
            revision,
            x509_authority_expires_at: ts(self.state.ca.x509().not_after()),
        }))
    }

    async fn list_authorities(
        &self,
        req: Request<pa::AuthorityKindRequest>,
    ) -> Result<Response<pa::AuthoritiesResponse>, Status> {
        let kinds = authority_kinds(&req.get_ref().kind)?;
        let current = self.state.ca.current();
        Ok(Response::new(
            self.with_agents(
                current
                    .list()
                    .iter()
                    .filter(|a| kinds.contains(&a.kind))
                    .map(authority_proto)
                    .collect(),
            ),
        ))
    }

    async fn prepare_authority(
        &self,
        req: Request<pa::AuthorityKindRequest>,
    ) -> Result<Response<pa::AuthoritiesResponse>, Status> {
        let kinds = authority_kinds(&req.get_ref().kind)?;
        self.by_kind("prepare_authority", kinds, |ca, store, kind, now| {
            ca.prepare(store, kind, now)
        })
    }

    async fn activate_authority(
        &self,
        req: Request<pa::AuthorityKindRequest>,
    ) -> Result<Response<pa::AuthoritiesResponse>, Status> {
        let kinds = authority_kinds(&req.get_ref().kind)?;
        // Activating before agents trust the prepared authority would hand
        // them SVIDs they cannot verify each other with.
        let sequence = self.state.ca.bundle().sequence();
        let agents = self.state.agents_with_bundle(sequence);
        let (recent, current) = (agents.recent, agents.current);
        if current < recent && !req.get_ref().force {
            let s = Status::failed_precondition(format!(
                "{} of {recent} recently active agents have not applied bundle sequence {sequence} yet, so they would not trust the prepared authority; wait for them (see `sigil ca show`) or use --force",
                recent - current
            ));
            return audited("activate_authority", "", Err(s));
        }
        self.by_kind("activate_authority", kinds, |ca, store, kind, now| {
            ca.activate(store, kind, now)
        })
    }

    async fn taint_authority(
        &self,
        req: Request<pa::AuthorityIdRequest>,
    ) -> Result<Response<pa::AuthoritiesResponse>, Status> {
        self.by_id(
            "taint_authority",
            &req.into_inner().id,
            crate::ca::CaSet::taint,
        )
    }

    async fn revoke_authority(
        &self,
        req: Request<pa::AuthorityIdRequest>,
    ) -> Result<Response<pa::AuthoritiesResponse>, Status> {
        self.by_id(
            "revoke_authority",
            &req.into_inner().id,
            crate::ca::CaSet::revoke,
        )
    }
}

impl AdminService {
    /// A response with the agents' progress on the current bundle.
    fn with_agents(&self, authorities: Vec<pa::Authority>) -> pa::AuthoritiesResponse {
        let bundle_sequence = self.state.ca.bundle().sequence();
        let agents = self.state.agents_with_bundle(bundle_sequence);
        pa::AuthoritiesResponse {
            authorities,
            bundle_sequence,
            agents_recent: agents.recent,
            agents_current: agents.current,
            agents_reissuing: agents.reissuing,
            svids_to_reissue: agents.svids_to_reissue,
        }
    }

    /// Runs a transition on one authority by ID.
    fn by_id(
        &self,
        action: &str,
        id: &str,
        run: impl Fn(
            &crate::ca::CaSet,
            &dyn crate::store::Store,
            &str,
            std::time::SystemTime,
        ) -> Result<crate::ca::AuthorityInfo, crate::ca::CaSetError>,
    ) -> Result<Response<pa::AuthoritiesResponse>, Status> {
        let store = self.state.registry.store().clone();
        let result = run(&self.state.ca, store.as_ref(), id, self.state.clock.now())
            .map(|a| self.with_agents(vec![authority_proto(&a)]))
            .map_err(ca_status);
        self.state.registry.notify_committed();
        audited(action, id, result)
    }

    /// Runs a per-kind transition for each requested kind; stops at the
    /// first refusal (earlier kinds stay moved, and the answer says so).
    fn by_kind(
        &self,
        action: &str,
        kinds: Vec<AuthorityKind>,
        run: impl Fn(
            &crate::ca::CaSet,
            &dyn crate::store::Store,
            AuthorityKind,
            std::time::SystemTime,
        ) -> Result<crate::ca::AuthorityInfo, crate::ca::CaSetError>,
    ) -> Result<Response<pa::AuthoritiesResponse>, Status> {
        let store = self.state.registry.store().clone();
        let mut done = Vec::new();
        for kind in kinds {
            match run(&self.state.ca, store.as_ref(), kind, self.state.clock.now()) {
                Ok(a) => done.push(authority_proto(&a)),
                Err(e) => {
                    self.state.registry.notify_committed();
                    let moved: Vec<&str> = done.iter().map(|a| a.id.as_str()).collect();
                    let mut s = ca_status(e);
                    if !moved.is_empty() {
                        s = Status::new(
                            s.code(),
                            format!("{} (already done: {})", s.message(), moved.join(", ")),
                        );
                    }
                    return audited(action, "", Err(s));
                }
            }
        }
        self.state.registry.notify_committed();
        let subject: Vec<String> = done.iter().map(|a| a.id.clone()).collect();
        audited(action, &subject.join(","), Ok(self.with_agents(done)))
    }
}

fn authority_kinds(kind: &str) -> Result<Vec<AuthorityKind>, Status> {
    match kind {
        "" => Ok(vec![AuthorityKind::X509, AuthorityKind::Jwt]),
        "x509" => Ok(vec![AuthorityKind::X509]),
        "jwt" => Ok(vec![AuthorityKind::Jwt]),
        other => Err(Status::invalid_argument(format!(
            "kind: {other:?} is not x509 or jwt"
        ))),
    }
}

fn authority_proto(a: &crate::ca::AuthorityInfo) -> pa::Authority {
    pa::Authority {
        kind: match a.kind {
            AuthorityKind::X509 => "x509".into(),
            AuthorityKind::Jwt => "jwt".into(),
        },
        id: a.id.clone(),
        state: crate::ca::state_name(a.state).into(),
        not_before: ts(a.not_before),
        not_after: ts(a.not_after),
        upstream: a.upstream,
    }
}

/// A refused transition is the caller's to fix (FailedPrecondition, with why);
/// an unknown ID is NotFound; a concurrent change is Aborted.
fn ca_status(e: crate::ca::CaSetError) -> Status {
    use crate::ca::CaSetError as E;
    match e {
        E::NotFound(_) => Status::not_found(e.to_string()),
        E::Refused(_) => Status::failed_precondition(e.to_string()),
        E::Conflict => Status::aborted(e.to_string()),
        other => {
            tracing::error!(error = %other, "authority transition failed");
            Status::internal("internal error; see the server log")
        }
    }
}
