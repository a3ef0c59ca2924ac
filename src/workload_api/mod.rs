//! The SPIFFE Workload API on the agent's Unix socket. Every call is
//! attested from the socket's peer credentials; a workload only ever sees
//! SVIDs whose entry selectors are a subset of its own.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::edge::UnixConnInfo;
use prost_types::{ListValue, Struct, Value as PValue, value::Kind};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::attest::{PeerCredentials, UnixAttestor};
use crate::proto::node::{self as pn, node_client::NodeClient};
use crate::proto::workload::{self as pw, spiffe_workload_api_server::SpiffeWorkloadApi};
use crate::spiffe::{Selector, SpiffeId};
use crate::x509::Bundle;

mod demand;
mod jwt_cache;
mod sds;
mod snapshot;

pub use demand::{Demand, Subscribed};
pub use sds::{SECRET_TYPE, Sds};

pub use snapshot::{AgentState, ByAge, CachedSvid, EntryList, issuer_of};

use jwt_cache::{CachedJwt, JwtCache};

/// The metadata every Workload API request must carry.
pub const HEADER: &str = "workload.spiffe.io";

type Stream<T> = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<T, Status>> + Send>>;

/// What a Workload API stream holds between its messages.
struct Watched<T, F> {
    rx: watch::Receiver<Arc<AgentState>>,
    shutdown: watch::Receiver<bool>,
    /// The last message sent (an unchanged one is not sent again).
    last: T,
    selectors: Vec<Selector>,
    build: F,
    /// Who opened it, for the audit record when it ends in a denial.
    caller: String,
    _open: crate::metrics::GaugeGuard,
    _subscribed: Subscribed,
}

/// The Workload API service.
pub struct WorkloadApi {
    state: watch::Receiver<Arc<AgentState>>,
    client: watch::Receiver<Option<NodeClient<Channel>>>,
    attestor: UnixAttestor,
    jwts: Mutex<JwtCache>,
    shutdown: watch::Receiver<bool>,
    demand: Arc<Demand>,
}

/// How long a new stream waits for SVIDs its entries have but the agent has
/// not signed yet (a capped cache signs them on demand).
pub const FIRST_SVID_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl WorkloadApi {
    /// A service reading the agent's published state.
    pub fn new(
        state: watch::Receiver<Arc<AgentState>>,
        client: watch::Receiver<Option<NodeClient<Channel>>>,
        attestor: UnixAttestor,
        shutdown: watch::Receiver<bool>,
        demand: Arc<Demand>,
    ) -> Self {
        WorkloadApi {
            state,
            client,
            attestor,
            jwts: Mutex::new(JwtCache::new(JwtCache::CAP)),
            shutdown,
            demand,
        }
    }

    /// Checks the security header, then attests the caller.
    async fn caller<T>(&self, req: &Request<T>, rpc: &str) -> Result<Vec<Selector>, Status> {
        let ok = req
            .metadata()
            .get(HEADER)
            .is_some_and(|v| v.to_str().is_ok_and(|v| v == "true"));
        if !ok {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        attest_peer(&self.attestor, req, rpc).await
    }

    /// Why a caller gets nothing: the agent has never had anything to give
    /// (server unreachable, nothing cached) is `Unavailable`, worth a retry;
    /// no entry matching the caller is `PermissionDenied`.
    fn no_identity(&self, rpc: &str, selectors: &[Selector]) -> Status {
        let unreachable = self.client.borrow().is_none() && self.state.borrow().entries.is_empty();
        if unreachable {
            tracing::info!(target: "sigil::audit", event = rpc, caller = %crate::edge::peer_caller(), decision = "deny", reason = "server unreachable, no cached identity");
            return Status::unavailable(
                "the server is unreachable and this agent holds no cached identity yet; retry",
            );
        }
        Self::no_entry(rpc, selectors)
    }

    fn no_entry(rpc: &str, selectors: &[Selector]) -> Status {
        tracing::info!(target: "sigil::audit", event = rpc, caller = %crate::edge::peer_caller(), decision = "deny", reason = "no entry matches", selectors = ?selectors.iter().map(Selector::as_str).collect::<Vec<_>>());
        Status::permission_denied("no identity issued: no registration entry matches this workload")
    }

    /// A stream that sends `build(state)` at once and then whenever it
    /// changes; ends with PermissionDenied if the caller loses every identity.
    /// The connection polls it: no task or channel per stream, so a burst of
    /// new streams costs less.
    async fn stream<T, F>(
        &self,
        rpc: &'static str,
        selectors: Vec<Selector>,
        build: F,
    ) -> Result<Stream<T>, Status>
    where
        T: Clone + PartialEq + Send + 'static,
        F: Fn(&AgentState, &[Selector]) -> Option<T> + Send + 'static,
    {
        use futures_util::StreamExt;
        let subscribed = self.demand.subscribe(&selectors);
        let mut rx = self.state.clone();
        let first = self.first(rpc, &mut rx, &selectors, &build).await?;
        let caller = crate::edge::peer_caller();
        tracing::info!(target: "sigil::audit", event = rpc, caller = %caller, decision = "allow", selectors = ?selectors.iter().map(Selector::as_str).collect::<Vec<_>>());
        let watched = Watched {
            rx,
            shutdown: self.shutdown.clone(),
            last: first.clone(),
            selectors,
            build,
            caller,
            _open: open_stream("workload"),
            _subscribed: subscribed,
        };
        let rest = futures_util::stream::unfold(Some(watched), move |watched| async move {
            let mut w = watched?;
            loop {
                tokio::select! {
                    changed = w.rx.changed() => if changed.is_err() { return None },
                    _ = w.shutdown.changed() => return None,
                }
                let next = (w.build)(&w.rx.borrow_and_update(), &w.selectors);
                match next {
                    Some(msg) if msg != w.last => {
                        w.last = msg.clone();
                        return Some((Ok(msg), Some(w)));
                    }
                    Some(_) => {}
                    None => {
                        let denied = crate::edge::with_caller(w.caller.clone(), || {
                            Self::no_entry(rpc, &w.selectors)
                        });
                        return Some((Err(denied), None));
                    }
                }
            }
        });
        Ok(Box::pin(
            futures_util::stream::once(async { Ok(first) }).chain(rest),
        ))
    }

    /// The first response: at once when there is one; when the workload's
    /// entries have no SVIDs yet (being signed, or signed on demand by a
    /// capped cache), once they are signed, within [`FIRST_SVID_WAIT`].
    async fn first<T>(
        &self,
        rpc: &'static str,
        rx: &mut watch::Receiver<Arc<AgentState>>,
        selectors: &[Selector],
        build: &impl Fn(&AgentState, &[Selector]) -> Option<T>,
    ) -> Result<T, Status> {
        let deadline = tokio::time::Instant::now() + FIRST_SVID_WAIT;
        loop {
            {
                let state = rx.borrow_and_update();
                if let Some(first) = build(&state, selectors) {
                    return Ok(first);
                }
                if state.entries_for(selectors).next().is_none() {
                    return Err(self.no_identity(rpc, selectors));
                }
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return Err(Status::unavailable("the agent is shutting down"));
                },
                _ = tokio::time::sleep_until(deadline) => return Err(self.no_identity(rpc, selectors)),
            }
        }
    }

    async fn jwt_for(
        &self,
        entry_id: &str,
        id: &SpiffeId,
        audience: &[String],
    ) -> Result<String, Status> {
        let mut aud = audience.to_vec();
        aud.sort();
        let key = (id.to_string(), aud);
        let now = SystemTime::now();
        // A token signed by a tainted authority is never served again.
        let tainted = self.state.borrow().tainted.clone();
        let cached = self
            .lock_jwts()
            .get(&key)
            .filter(|c| !tainted.contains(&c.kid));
        if let Some(c) = &cached {
            let half = c.issued + c.expires.duration_since(c.issued).unwrap_or_default() / 2;
            if now < half {
                return Ok(c.token.clone());
            }
        }
        let client = self.client.borrow().clone();
        let Some(mut client) = client else {
            // Server unreachable: an unexpired cached token is still good.
            return match cached {
                Some(c) if now < c.expires => Ok(c.token),
                _ => Err(Status::unavailable(
                    "the server is unreachable and no JWT-SVID is cached",
                )),
            };
        };
        let resp = client
            .new_jwtsvid(pn::NewJwtsvidRequest {
                entry_id: entry_id.to_string(),
                audience: audience.to_vec(),
            })
            .await;
        match resp {
            Ok(r) => {
                let r = r.into_inner();
                let expires =
                    UNIX_EPOCH + Duration::from_secs(u64::try_from(r.expires_at).unwrap_or(0));
                self.lock_jwts().insert(
                    key,
                    CachedJwt {
                        kid: crate::jwt::UnverifiedJwt::parse(&r.token)
                            .map(|j| j.kid)
                            .unwrap_or_default(),
                        token: r.token.clone(),
                        issued: now,
                        expires,
                    },
                    now,
                );
                Ok(r.token)
            }
            Err(s) => match cached {
                Some(c) if now < c.expires => Ok(c.token),
                _ => Err(Status::unavailable(format!(
                    "cannot obtain a JWT-SVID: {}",
                    s.message()
                ))),
            },
        }
    }

    fn lock_jwts(&self) -> std::sync::MutexGuard<'_, JwtCache> {
        self.jwts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts an open stream of `api` (`workload` or `sds`) while alive.
pub(crate) fn open_stream(api: &str) -> crate::metrics::GaugeGuard {
    crate::metrics::GaugeGuard::new(
        crate::metrics::metrics()
            .workload_streams
            .get_or_create(&crate::metrics::label("api", api))
            .clone(),
    )
}

/// Attests the process at the other end of the socket from its peer
/// credentials: its selectors.
pub(crate) async fn attest_peer<T>(
    attestor: &UnixAttestor,
    req: &Request<T>,
    rpc: &str,
) -> Result<Vec<Selector>, Status> {
    let conn = req
        .extensions()
        .get::<UnixConnInfo>()
        .ok_or_else(|| Status::unavailable("workload attestation failed: no peer credentials"))?;
    let peer = conn
        .uds
        .peer_cred
        .ok_or_else(|| Status::unavailable("workload attestation failed: no peer credentials"))?;
    let creds = PeerCredentials {
        pid: peer.pid(),
        uid: peer.uid(),
        gid: peer.gid(),
    };
    // Hashing the executable reads a whole file: keep it off the async
    // workers (a cache hit is cheap, but the first call per binary is not).
    let attested = if attestor.sha256 {
        let (attestor, conn) = (attestor.clone(), conn.attested.clone());
        tokio::task::spawn_blocking(move || attestor.attest_connection(&conn, creds))
            .await
            .map_err(|e| Status::internal(format!("attestation task failed: {e}")))?
    } else {
        attestor.attest_connection(&conn.attested, creds)
    };
    match attested {
        Ok(selectors) => {
            tracing::debug!(rpc, pid = ?creds.pid, uid = creds.uid, "workload attested");
            Ok(selectors)
        }
        Err(e) => {
            tracing::warn!(target: "sigil::audit", event = "workload_attestation", rpc, caller = %crate::edge::peer_caller(), decision = "deny", reason = ?e.to_string());
            Err(Status::unavailable("workload attestation failed"))
        }
    }
}

fn x509_svids(state: &AgentState, selectors: &[Selector]) -> Option<pw::X509svidResponse> {
    let svids = state.svids_for(selectors);
    if svids.is_empty() {
        return None;
    }
    let bundle = state
        .bundle
        .as_ref()
        .map(Bundle::x509_der_concat)
        .unwrap_or_default();
    Some(pw::X509svidResponse {
        svids: svids
            .iter()
            .map(|s| pw::X509svid {
                spiffe_id: s.entry.spiffe_id.to_string(),
                x509_svid: s.chain.concat(),
                x509_svid_key: s.key.pkcs8_der().to_vec(),
                bundle: bundle.clone(),
                hint: s.entry.hint.clone(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: state
            .federated_for(selectors)
            .into_iter()
            .map(|b| (b.trust_domain().id().to_string(), b.x509_der_concat()))
            .collect(),
    })
}

/// The workload's bundles (its own and the federated ones it may have),
/// keyed by trust domain ID (`spiffe://td`).
fn x509_bundles(state: &AgentState, selectors: &[Selector]) -> Option<pw::X509BundlesResponse> {
    state.entries_for(selectors).next()?;
    state.bundle.as_ref()?;
    Some(pw::X509BundlesResponse {
        crl: Vec::new(),
        bundles: state
            .bundles_for(selectors)
            .into_iter()
            .map(|b| (b.trust_domain().id().to_string(), b.x509_der_concat()))
            .collect(),
    })
}

fn jwt_bundles(state: &AgentState, selectors: &[Selector]) -> Option<pw::JwtBundlesResponse> {
    state.entries_for(selectors).next()?;
    state.bundle.as_ref()?;
    let jwt_only = |b: &Bundle| {
        let mut only = Bundle::new(b.trust_domain().clone());
        for (kid, key) in b.jwt_authorities() {
            only.add_jwt_authority(kid.clone(), key.clone());
        }
        only.set_sequence(b.sequence());
        only.to_jwks().into_bytes()
    };
    Some(pw::JwtBundlesResponse {
        bundles: state
            .bundles_for(selectors)
            .into_iter()
            .map(|b| (b.trust_domain().id().to_string(), jwt_only(b)))
            .collect(),
    })
}

fn to_prost(v: &serde_json::Value) -> PValue {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(to_prost).collect(),
        }),
        J::Object(o) => Kind::StructValue(Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), to_prost(v))).collect(),
        }),
    };
    PValue { kind: Some(kind) }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream<pw::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pw::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let selectors = self.caller(&req, "fetch_x509_svid").await?;
        Ok(Response::new(
            self.stream("fetch_x509_svid", selectors, x509_svids)
                .await?,
        ))
    }

    type FetchX509BundlesStream = Stream<pw::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<pw::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let selectors = self.caller(&req, "fetch_x509_bundles").await?;
        Ok(Response::new(
            self.stream("fetch_x509_bundles", selectors, x509_bundles)
                .await?,
        ))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pw::JwtsvidRequest>,
    ) -> Result<Response<pw::JwtsvidResponse>, Status> {
        let selectors = self.caller(&req, "fetch_jwt_svid").await?;
        let r = req.get_ref();
        crate::jwt::check_audiences(&r.audience)
            .map_err(|e| Status::invalid_argument(format!("audience: {e}")))?;
        let wanted = if r.spiffe_id.is_empty() {
            None
        } else {
            Some(
                SpiffeId::new(&r.spiffe_id)
                    .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?,
            )
        };
        let state = self.state.borrow().clone();
        // One token per SPIFFE ID, and hints unique as for X509-SVIDs
        // (Workload API: a hint MUST NOT repeat within one response).
        let mut seen = std::collections::HashSet::new();
        let mut hints = std::collections::HashSet::new();
        let entries: Vec<_> = state
            .entries_for(&selectors)
            .filter(|e| wanted.as_ref().is_none_or(|w| &e.spiffe_id == w))
            .filter(|e| seen.insert(e.spiffe_id.clone()))
            .filter(|e| e.hint.is_empty() || hints.insert(e.hint.clone()))
            .cloned()
            .collect();
        if entries.is_empty() {
            return Err(self.no_identity("fetch_jwt_svid", &selectors));
        }
        let mut svids = Vec::with_capacity(entries.len());
        for e in entries {
            let token = self.jwt_for(&e.id, &e.spiffe_id, &r.audience).await?;
            tracing::info!(target: "sigil::audit", event = "fetch_jwt_svid", caller = %crate::edge::peer_caller(), decision = "allow", subject = %e.spiffe_id, audiences = r.audience.len());
            svids.push(pw::Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(pw::JwtsvidResponse { svids }))
    }

    type FetchJWTBundlesStream = Stream<pw::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pw::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let selectors = self.caller(&req, "fetch_jwt_bundles").await?;
        Ok(Response::new(
            self.stream("fetch_jwt_bundles", selectors, jwt_bundles)
                .await?,
        ))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pw::ValidateJwtsvidRequest>,
    ) -> Result<Response<pw::ValidateJwtsvidResponse>, Status> {
        let selectors = self.caller(&req, "validate_jwt_svid").await?;
        let r = req.get_ref();
        crate::jwt::check_audiences(std::slice::from_ref(&r.audience))
            .map_err(|e| Status::invalid_argument(format!("audience: {e}")))?;
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let state = self.state.borrow().clone();
        state
            .bundle
            .as_ref()
            .ok_or_else(|| Status::unavailable("no bundle yet"))?;
        // The subject's trust domain picks the bundle (verified below): the
        // agent's own, or a federated one this workload may have.
        let subject_td = crate::jwt::UnverifiedJwt::parse(&r.svid)
            .ok()
            .and_then(|j| j.claims.get("sub")?.as_str().map(str::to_string))
            .and_then(|sub| SpiffeId::new(&sub).ok())
            .map(|id| id.trust_domain());
        let bundles = state.bundles_for(&selectors);
        let bundle = subject_td
            .and_then(|td| bundles.iter().find(|b| b.trust_domain() == &td).copied())
            .or(state.bundle.as_ref())
            .ok_or_else(|| Status::unavailable("no bundle yet"))?;
        let v = crate::jwt::validate(
            &r.svid,
            bundle.trust_domain(),
            bundle.jwt_authorities(),
            &r.audience,
            SystemTime::now(),
        )
        .map_err(|e| {
            tracing::info!(target: "sigil::audit", event = "validate_jwt_svid", caller = %crate::edge::peer_caller(), decision = "deny", reason = ?e.to_string());
            Status::invalid_argument(e.to_string())
        })?;
        tracing::info!(target: "sigil::audit", event = "validate_jwt_svid", caller = %crate::edge::peer_caller(), decision = "allow", subject = %v.spiffe_id);
        Ok(Response::new(pw::ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(Struct {
                fields: v
                    .claims
                    .iter()
                    .map(|(k, v)| (k.clone(), to_prost(v)))
                    .collect(),
            }),
        }))
    }

    type FetchWITSVIDStream = Stream<pw::WitsvidResponse>;

    async fn fetch_witsvid(
        &self,
        _req: Request<pw::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }

    type FetchWITBundlesStream = Stream<pw::WitBundlesResponse>;

    async fn fetch_wit_bundles(
        &self,
        _req: Request<pw::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("WIT bundles are not supported"))
    }
}
