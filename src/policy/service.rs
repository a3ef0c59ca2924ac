//! The Envoy ext_authz v3 `Check` service, and hot reload of the policy
//! directory. CheckRequests are converted to domain requests at this edge.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::ext_authz::v3::pb::{
    Address, Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderValue,
    HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::google::rpc;
use tokio::sync::watch;
use tonic::{Request as GrpcRequest, Response, Status};

use super::{Decision, Evaluator, PolicySet, RemoteJwks, Request, load_dir, split_path_query};
use crate::x509::Bundle;

/// How often the policy directory is checked for changes.
const RELOAD_EVERY: Duration = Duration::from_millis(300);
/// How long startup waits for the first fetch of each `jwksUri`.
const FIRST_FETCH_WAIT: Duration = Duration::from_secs(6);
/// How long a reload waits for a newly named `jwksUri` (keeps reloads under 1 s).
const RELOAD_FETCH_WAIT: Duration = Duration::from_millis(600);

/// Converts an Envoy CheckRequest into a domain request; `remote.ip` comes
/// from `X-Forwarded-For` past `trusted_proxies` hops.
pub fn request_from_check(c: &CheckRequest, trusted_proxies: usize) -> Request {
    let attrs = c.attributes.clone().unwrap_or_default();
    let source = attrs.source.unwrap_or_default();
    let destination = attrs.destination.unwrap_or_default();
    let socket = |a: Option<envoy_types::pb::envoy::config::core::v3::Address>| match a
        .and_then(|a| a.address)
    {
        Some(Address::SocketAddress(s)) => Some(s),
        _ => None,
    };
    let src_socket = socket(source.address);
    let dst_socket = socket(destination.address);
    let http = attrs.request.and_then(|r| r.http).unwrap_or_default();
    // No HTTP attributes: TCP traffic (Envoy's network ext_authz filter),
    // which has no path to normalize.
    let (path, query) = if http.method.is_empty() && http.path.is_empty() {
        (Ok(String::new()), Default::default())
    } else {
        split_path_query(&http.path)
    };
    let principal = |p: String| {
        (!p.is_empty()).then(|| {
            if p.contains("://") {
                p
            } else {
                format!("spiffe://{p}")
            }
        })
    };
    let xff = http
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
        .map(|(_, v)| v.clone());
    Request {
        source_principal: principal(source.principal),
        source_ip: src_socket.as_ref().and_then(|s| s.address.parse().ok()),
        remote_ip: crate::policy::remote_from_xff(xff.as_deref(), trusted_proxies),
        destination_ip: dst_socket.as_ref().and_then(|s| s.address.parse().ok()),
        destination_ns: attrs
            .context_extensions
            .get("namespace")
            .filter(|n| !n.is_empty())
            .cloned(),
        destination_principal: principal(destination.principal),
        destination_labels: destination.labels.into_iter().collect(),
        destination_port: dst_socket.and_then(|s| match s.port_specifier {
            Some(PortSpecifier::PortValue(p)) => u16::try_from(p).ok(),
            _ => None,
        }),
        method: http.method,
        path: path.clone().unwrap_or_default(),
        path_error: path.err(),
        host: http.host,
        headers: http
            .headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect(),
        query,
        sni: attrs.tls_session.map(|t| t.sni).filter(|s| !s.is_empty()),
        auth: None,
    }
}

/// The identity headers Sigil sets upstream on allow. A client may send
/// them too; they are always overwritten or removed, never passed on.
const IDENTITY_HEADERS: [&str; 2] = ["x-sigil-principal", "x-sigil-request-principal"];

/// A header that replaces whatever the client sent under the same name.
fn header(key: &str, value: &str) -> HeaderValueOption {
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        // ext_authz already overwrites when `append` is unset; say so anyway.
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// Builds the CheckResponse for a decision.
pub fn response_for(d: &Decision, peer: Option<&str>) -> CheckResponse {
    let decided_by = match (&d.policy, d.rule) {
        (Some(p), Some(r)) => format!("{p} rule {r}"),
        (Some(p), None) => p.clone(),
        (None, _) => "default".to_string(),
    };
    if d.allow {
        let values = [peer, d.request_principal.as_deref()];
        let mut headers = Vec::new();
        let mut headers_to_remove = Vec::new();
        for (name, value) in IDENTITY_HEADERS.into_iter().zip(values) {
            match value {
                Some(v) => headers.push(header(name, v)),
                None => headers_to_remove.push(name.to_string()),
            }
        }
        // The jwtRule's outputs, and the token removed (forwardOriginalToken).
        headers.extend(d.rewrite.set_headers.iter().map(|(k, v)| header(k, v)));
        headers_to_remove.extend(d.rewrite.remove_headers.iter().cloned());
        return CheckResponse {
            status: Some(rpc::Status {
                code: tonic::Code::Ok as i32,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers,
                headers_to_remove,
                query_parameters_to_remove: d.rewrite.remove_params.clone(),
                ..Default::default()
            })),
            ..Default::default()
        };
    }
    let (code, http) = match d.status {
        400 => (tonic::Code::InvalidArgument, 400),
        401 => (tonic::Code::Unauthenticated, 401),
        _ => (tonic::Code::PermissionDenied, 403),
    };
    let body = serde_json::json!({
        "decision": "deny",
        "status": d.status,
        "policy": d.policy,
        "rule": d.rule,
        "explanation": d.explanation,
    })
    .to_string();
    CheckResponse {
        status: Some(rpc::Status {
            code: code as i32,
            message: format!("denied by {decided_by}"),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: http }),
            headers: vec![
                header("x-sigil-policy", &decided_by),
                header("content-type", "application/json"),
            ],
            body,
        })),
        ..Default::default()
    }
}

/// The ext_authz service over a hot-reloaded evaluator.
pub struct ExtAuthz {
    evaluator: watch::Receiver<Arc<Evaluator>>,
    trusted_proxies: usize,
}

impl ExtAuthz {
    /// A service reading the current evaluator; `remote.ip` trusts
    /// `trusted_proxies` hops of `X-Forwarded-For`.
    pub fn new(evaluator: watch::Receiver<Arc<Evaluator>>, trusted_proxies: usize) -> Self {
        ExtAuthz {
            evaluator,
            trusted_proxies,
        }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        req: GrpcRequest<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let r = request_from_check(req.get_ref(), self.trusted_proxies);
        let evaluator = self.evaluator.borrow().clone();
        let d = evaluator.evaluate(&r);
        crate::metrics::metrics()
            .policy_decisions
            .get_or_create(&crate::metrics::label(
                "decision",
                if d.allow { "allow" } else { "deny" },
            ))
            .inc();
        tracing::info!(
            target: "sigil::audit",
            event = "authorize",
            decision = if d.allow { "allow" } else { "deny" },
            status = d.status,
            principal = r.source_principal.as_deref().unwrap_or(""),
            request_principal = d.request_principal.as_deref().unwrap_or(""),
            destination = r.destination_principal.as_deref().unwrap_or(""),
            method = ?r.method,
            path = ?r.path,
            policy = d.policy.as_deref().unwrap_or(""),
            rule = d.rule.map_or(-1, |r| i64::try_from(r).unwrap_or(i64::MAX)),
            audit = d.audit,
            explanation = ?d.explanation,
        );
        Ok(Response::new(response_for(
            &d,
            r.source_principal.as_deref(),
        )))
    }
}

fn fingerprint(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path(), m.modified().ok()?, m.len()))
        })
        .collect();
    v.sort();
    v
}

/// Loads `dir` (failing on a bad policy) and keeps the returned evaluator
/// current: changes apply within a second; a bad file keeps the last good
/// set and logs the error. `jwksUri` keys come from `jwks`, which this keeps
/// fresh; a newly named URL is given a moment to be fetched before the
/// policies that name it take effect. JWT rules naming no JWKS use the
/// latest `bundle`. Stops when `shutdown` turns true.
pub async fn watch_policies(
    dir: PathBuf,
    root_namespace: String,
    mut bundle: watch::Receiver<Option<Bundle>>,
    jwks: Arc<RemoteJwks>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<watch::Receiver<Arc<Evaluator>>, super::PolicyError> {
    let cache = jwks.clone();
    let build = move |set: &PolicySet, bundle: Option<Bundle>| {
        let e = Evaluator::new(set.clone(), root_namespace.clone()).with_remote_jwks(cache.clone());
        Arc::new(match bundle {
            Some(b) => e.with_trust_bundle(b),
            None => e,
        })
    };
    let mut current = load_dir(&dir)?;
    tracing::info!(dir = %dir.display(), policies = current.authorization.len(), "policies loaded");
    tokio::spawn(jwks.clone().run(shutdown.clone()));
    let added = jwks.track(&current.remote_jwks_urls());
    jwks.settled(&added, FIRST_FETCH_WAIT).await;
    let (tx, rx) = watch::channel(build(&current, bundle.borrow_and_update().clone()));
    tokio::spawn(async move {
        let mut seen = fingerprint(&dir);
        let mut bundle_open = true;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
                changed = bundle.changed(), if bundle_open => {
                    bundle_open = changed.is_ok();
                    if bundle_open {
                        tx.send_replace(build(&current, bundle.borrow_and_update().clone()));
                    }
                    continue;
                }
                _ = shutdown.changed() => return,
            }
            let now = fingerprint(&dir);
            if now == seen {
                continue;
            }
            seen = now;
            match load_dir(&dir) {
                Ok(set) => {
                    // Fetch new URLs first; drop old ones only once the old
                    // evaluator, which may still read them, is replaced.
                    let urls = set.remote_jwks_urls();
                    let added = jwks.track(&urls);
                    jwks.settled(&added, RELOAD_FETCH_WAIT).await;
                    tracing::info!(dir = %dir.display(), policies = set.authorization.len(), "policies reloaded");
                    current = set;
                    tx.send_replace(build(&current, bundle.borrow().clone()));
                    jwks.forget_others(&urls);
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy reload failed; keeping the last good policies")
                }
            }
        }
    });
    Ok(rx)
}
