//! Evaluating AuthorizationPolicies against a request, Istio's order:
//! any matching DENY → deny; no ALLOW policy applies → allow; a matching
//! ALLOW → allow; otherwise deny. AUDIT marks without deciding. Every
//! decision says which policy and rule decided, and a default deny says why
//! each candidate ALLOW rule failed.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use super::jwks::{JwksKeys, RemoteJwks};
use super::model::{
    Action, AuthorizationPolicy, Cidr, Condition, ConditionKey, Field, JwksSource, JwtRule,
    Matcher, MtlsMode, Operation, PolicySet, RequestAuthentication, Rule, Source,
};
use crate::jwt::{JwtPublicKey, UnverifiedJwt};
use crate::x509::Bundle;

/// The authenticated end user, from a validated JWT.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestAuth {
    /// `iss/sub`.
    pub principal: String,
    /// `aud`.
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// All claims.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// What the upstream request gets on allow (the jwtRule's outputs, and
    /// the token removed unless `forwardOriginalToken`).
    pub rewrite: Rewrite,
}

/// Changes to the request forwarded upstream, applied on allow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// Headers to set (name, value).
    pub set_headers: Vec<(String, String)>,
    /// Headers to remove.
    pub remove_headers: Vec<String>,
    /// Query parameters to remove.
    pub remove_params: Vec<String>,
}

/// Where a token was found.
enum TokenAt {
    Header(String),
    Param(String),
    Cookie(String),
}

/// The cookies of a `Cookie` header: name → value.
fn cookies(header: Option<&String>) -> Vec<(String, String)> {
    header
        .map(|h| {
            h.split(';')
                .filter_map(|c| c.trim().split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// A claim by dotted path (`a.b`), as header text.
fn claim_text(claims: &serde_json::Map<String, serde_json::Value>, path: &str) -> Option<String> {
    let mut parts = path.split('.');
    let mut cur = claims.get(parts.next()?)?;
    for p in parts {
        cur = cur.get(p)?;
    }
    match cur {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// What is known about a request, in domain terms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    /// Why the request's path could not be normalized: refused with 400.
    pub path_error: Option<String>,
    /// The peer's SPIFFE ID (`spiffe://td/ns/x/sa/y`), if mTLS.
    pub source_principal: Option<String>,
    /// The peer's address.
    pub source_ip: Option<IpAddr>,
    /// The original client's address as the trusted proxies reported it
    /// (`remote.ip`); the peer's when there are none.
    pub remote_ip: Option<IpAddr>,
    /// The destination's address.
    pub destination_ip: Option<IpAddr>,
    /// The destination's namespace when given explicitly (an ext_authz
    /// context extension `namespace`, `--destination-namespace`).
    pub destination_ns: Option<String>,
    /// The destination workload's SPIFFE ID.
    pub destination_principal: Option<String>,
    /// The destination workload's labels.
    pub destination_labels: BTreeMap<String, String>,
    /// The destination port.
    pub destination_port: Option<u16>,
    /// HTTP method.
    pub method: String,
    /// HTTP path (without the query).
    pub path: String,
    /// HTTP host / authority.
    pub host: String,
    /// Headers, names lowercased.
    pub headers: BTreeMap<String, String>,
    /// Query parameters.
    pub query: BTreeMap<String, String>,
    /// TLS SNI.
    pub sni: Option<String>,
    /// The validated end-user JWT, if any.
    pub auth: Option<RequestAuth>,
}

impl Request {
    /// The destination's namespace: given explicitly, else from its SPIFFE
    /// ID (`/ns/<ns>/`), else from its `namespace` label.
    pub fn destination_namespace(&self) -> Option<&str> {
        self.destination_ns
            .as_deref()
            .or_else(|| self.destination_principal.as_deref().and_then(namespace_of))
            .or_else(|| self.destination_labels.get("namespace").map(String::as_str))
    }

    /// A request without HTTP attributes (plain TCP through Envoy's network
    /// ext_authz filter).
    pub fn is_tcp(&self) -> bool {
        self.method.is_empty() && self.path.is_empty()
    }

    /// `remote.ip`: what the trusted proxies reported, else the peer.
    pub fn remote_ip(&self) -> Option<IpAddr> {
        self.remote_ip.or(self.source_ip)
    }
}

/// The original client from `X-Forwarded-For` with `trusted` proxies in
/// front (Envoy's `xff_num_trusted_hops`): the address `trusted` places left
/// of the right end; with none trusted, `None` (the peer is the client).
pub fn remote_from_xff(xff: Option<&str>, trusted: usize) -> Option<IpAddr> {
    if trusted == 0 {
        return None;
    }
    let hops: Vec<&str> = xff?.split(',').map(str::trim).collect();
    let at = hops.len().checked_sub(trusted)?;
    hops.get(at)?.parse().ok()
}

/// Splits `/p?a=1&b` into the path, normalized for matching, and its query
/// parameters. A path that cannot be normalized safely is an error naming why
/// (the request is then refused with 400, never matched as written).
pub fn split_path_query(full: &str) -> (Result<String, String>, BTreeMap<String, String>) {
    let (path, query) = full.split_once('?').unwrap_or((full, ""));
    let params = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect();
    (normalize_path(path), params)
}

/// The path as a policy must see it, as Envoy's `normalize_path` and
/// `merge_slashes` would leave it, so `//admin`, `/./admin`,
/// `/public/../admin` and `/%61dmin` all match a rule on `/admin`:
/// percent-encoded unreserved characters decoded (other escapes kept, with
/// upper-case hex), `;` path parameters dropped from each segment, repeated
/// slashes merged, `.` and `..` segments resolved (never above the root). An
/// encoded `/` or `\`, a raw `\`, a bad escape or a path not starting with
/// `/` is an error.
pub fn normalize_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("path {path:?} does not start with '/'"));
    }
    if path.contains('\\') {
        return Err("path contains a backslash".into());
    }
    let mut segments: Vec<String> = Vec::new();
    let raw: Vec<&str> = path[1..].split('/').collect();
    for (i, seg) in raw.iter().enumerate() {
        let seg = seg.split(';').next().unwrap_or_default();
        let seg = decode_unreserved(seg)?;
        match seg.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(seg),
        }
        // A trailing slash, `.` or `..` leaves a directory path.
        if i + 1 == raw.len() && matches!(raw[i], "" | "." | "..") && !segments.is_empty() {
            segments.push(String::new());
        }
    }
    Ok(format!("/{}", segments.join("/")))
}

/// Decodes `%XX` escapes of unreserved characters (RFC 3986 §2.3); keeps the
/// others escaped, upper-cased; refuses encoded separators.
fn decode_unreserved(seg: &str) -> Result<String, String> {
    let bytes = seg.as_bytes();
    let mut out = String::with_capacity(seg.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(char::from(bytes[i]));
            i += 1;
            continue;
        }
        let hex = seg
            .get(i + 1..i + 3)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| format!("path has a bad percent-escape at byte {i}"))?;
        let byte = u8::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
        match byte {
            b'/' | b'\\' => return Err(format!("path contains an encoded separator (%{hex})")),
            b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => out.push(char::from(b)),
            _ => {
                out.push('%');
                out.push_str(&hex.to_ascii_uppercase());
            }
        }
        i += 3;
    }
    Ok(out)
}

/// `/ns/<ns>/sa/<sa>` → `<ns>`.
pub fn namespace_of(spiffe_id: &str) -> Option<&str> {
    let path = spiffe_id.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut parts = path.split('/');
    match (parts.next(), parts.next()) {
        (Some("ns"), Some(ns)) if !ns.is_empty() => Some(ns),
        _ => None,
    }
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allowed?
    pub allow: bool,
    /// 200 or 403.
    pub status: u16,
    /// The deciding policy (`ns/name`), if one decided.
    pub policy: Option<String>,
    /// The deciding rule's index.
    pub rule: Option<usize>,
    /// Why, step by step.
    pub explanation: Vec<String>,
    /// Matched by an AUDIT policy.
    pub audit: bool,
    /// The authenticated end user (`iss/sub`), when a valid JWT was presented.
    pub request_principal: Option<String>,
    /// Changes to the forwarded request, on allow.
    pub rewrite: Rewrite,
}

fn field_matches<T>(
    name: &str,
    field: &Field<T>,
    value: Option<&str>,
    check: impl Fn(&T, &str) -> bool,
) -> Result<(), String> {
    if !field.values.is_empty() {
        match value {
            Some(v) if field.values.iter().any(|m| check(m, v)) => {}
            Some(v) => return Err(format!("{name}: {v:?} matches none of the values")),
            None => return Err(format!("{name}: the request has none")),
        }
    }
    if let Some(v) = value {
        if field.not_values.iter().any(|m| check(m, v)) {
            return Err(format!("{name}: {v:?} is excluded"));
        }
    }
    Ok(())
}

fn m(case_insensitive: bool) -> impl Fn(&Matcher, &str) -> bool {
    move |m, v| m.matches(v, case_insensitive)
}

fn source_matches(s: &Source, r: &Request) -> Result<(), String> {
    let principal = r
        .source_principal
        .as_deref()
        .map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
    field_matches("principals", &s.principals, principal, m(false))?;
    let req_principal = r.auth.as_ref().map(|a| a.principal.as_str());
    field_matches(
        "requestPrincipals",
        &s.request_principals,
        req_principal,
        m(false),
    )?;
    let ns = r.source_principal.as_deref().and_then(namespace_of);
    field_matches("namespaces", &s.namespaces, ns, m(false))?;
    // Values are rendered only for the fields a source names: the hot path
    // allocates nothing for the others.
    let in_cidr = |c: &Cidr, v: &str| v.parse().is_ok_and(|ip| c.contains(ip));
    if s.ip_blocks.is_set() {
        let ip = r.source_ip.map(|i| i.to_string());
        field_matches("ipBlocks", &s.ip_blocks, ip.as_deref(), in_cidr)?;
    }
    if s.remote_ip_blocks.is_set() {
        let remote = r.remote_ip().map(|i| i.to_string());
        field_matches(
            "remoteIpBlocks",
            &s.remote_ip_blocks,
            remote.as_deref(),
            in_cidr,
        )?;
    }
    if s.service_accounts.is_set() {
        // `ns/sa` from a principal `td/ns/<ns>/sa/<sa>`.
        let sa = principal.and_then(|p| {
            let rest = p.split_once("/ns/")?.1;
            let (ns, sa) = rest.split_once("/sa/")?;
            (!sa.contains('/')).then(|| format!("{ns}/{sa}"))
        });
        field_matches(
            "serviceAccounts",
            &s.service_accounts,
            sa.as_deref(),
            m(false),
        )?;
    }
    Ok(())
}

fn operation_matches(o: &Operation, r: &Request) -> Result<(), String> {
    let host = (!r.host.is_empty()).then_some(r.host.as_str());
    field_matches("hosts", &o.hosts, host, m(true))?;
    let port = r.destination_port.map(|p| p.to_string());
    field_matches("ports", &o.ports, port.as_deref(), |p: &u16, v| {
        v == p.to_string()
    })?;
    let method = (!r.method.is_empty()).then_some(r.method.as_str());
    field_matches("methods", &o.methods, method, m(false))?;
    let path = (!r.path.is_empty()).then_some(r.path.as_str());
    field_matches("paths", &o.paths, path, m(false))
}

fn claim<'a>(
    claims: &'a serde_json::Map<String, serde_json::Value>,
    path: &[String],
) -> Vec<String> {
    let mut cur: Option<&'a serde_json::Value> = None;
    for (i, k) in path.iter().enumerate() {
        cur = if i == 0 {
            claims.get(k)
        } else {
            cur.and_then(|v| v.get(k))
        };
    }
    match cur {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

fn condition_matches(c: &Condition, r: &Request) -> Result<(), String> {
    let auth = r.auth.as_ref();
    let values: Vec<String> = match &c.key {
        ConditionKey::Header(h) => r.headers.get(h).cloned().into_iter().collect(),
        ConditionKey::SourceIp => r.source_ip.map(|i| i.to_string()).into_iter().collect(),
        ConditionKey::RemoteIp => r.remote_ip().map(|i| i.to_string()).into_iter().collect(),
        ConditionKey::DestinationIp => r
            .destination_ip
            .map(|i| i.to_string())
            .into_iter()
            .collect(),
        ConditionKey::SourceNamespace => r
            .source_principal
            .as_deref()
            .and_then(namespace_of)
            .map(str::to_string)
            .into_iter()
            .collect(),
        ConditionKey::SourcePrincipal => r
            .source_principal
            .as_deref()
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p).to_string())
            .into_iter()
            .collect(),
        ConditionKey::AuthPrincipal => auth.map(|a| a.principal.clone()).into_iter().collect(),
        ConditionKey::AuthAudiences => auth.map(|a| a.audiences.clone()).unwrap_or_default(),
        ConditionKey::AuthPresenter => auth.and_then(|a| a.presenter.clone()).into_iter().collect(),
        ConditionKey::AuthClaim(path) => auth.map(|a| claim(&a.claims, path)).unwrap_or_default(),
        ConditionKey::DestinationPort => r
            .destination_port
            .map(|p| p.to_string())
            .into_iter()
            .collect(),
        ConditionKey::ConnectionSni => r.sni.clone().into_iter().collect(),
    };
    let name = format!("when {}", c.key_text);
    let is_ip = c.key.is_ip();
    let check = |m: &Matcher, v: &str| {
        if is_ip {
            // Values were validated as CIDRs at load time.
            let text = match m {
                Matcher::Exact(e) => e.as_str(),
                _ => return false,
            };
            Cidr::parse(text).is_ok_and(|c| v.parse().is_ok_and(|ip| c.contains(ip)))
        } else {
            m.matches(v, false)
        }
    };
    if !c.field.values.is_empty()
        && !values
            .iter()
            .any(|v| c.field.values.iter().any(|m| check(m, v)))
    {
        return Err(match values.is_empty() {
            true => format!("{name}: the request has none"),
            false => format!("{name}: {values:?} matches none of the values"),
        });
    }
    if values
        .iter()
        .any(|v| c.field.not_values.iter().any(|m| check(m, v)))
    {
        return Err(format!("{name}: {values:?} is excluded"));
    }
    Ok(())
}

/// Whether a rule matches; on failure, the first reason.
/// Istio's TCP semantics: on a request without HTTP attributes, a rule
/// that names HTTP-only fields never matches in an ALLOW (or AUDIT)
/// policy, and matches on its other fields in a DENY policy.
fn rule_matches_as(action: Action, rule: &Rule, r: &Request) -> Result<(), String> {
    if !r.is_tcp() {
        return rule_matches(rule, r);
    }
    let http = rule.http_only_fields();
    if http.is_empty() {
        return rule_matches(rule, r);
    }
    match action {
        Action::Deny => rule_matches(&rule.without_http(), r)
            .map_err(|e| format!("{e} (HTTP-only fields {http:?} ignored: the request is TCP)")),
        _ => Err(format!(
            "names HTTP-only fields {http:?} and the request is TCP: such a rule never matches in an {action:?} policy"
        )),
    }
}

/// Matches one rule against a request (HTTP semantics).
pub fn rule_matches(rule: &Rule, r: &Request) -> Result<(), String> {
    if !rule.from.is_empty() {
        let reasons: Vec<String> = rule
            .from
            .iter()
            .enumerate()
            .filter_map(|(i, s)| source_matches(s, r).err().map(|e| format!("from[{i}] {e}")))
            .collect();
        if reasons.len() == rule.from.len() {
            return Err(reasons.join("; "));
        }
    }
    if !rule.to.is_empty() {
        let reasons: Vec<String> = rule
            .to
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                operation_matches(o, r)
                    .err()
                    .map(|e| format!("to[{i}] {e}"))
            })
            .collect();
        if reasons.len() == rule.to.len() {
            return Err(reasons.join("; "));
        }
    }
    for c in &rule.when {
        condition_matches(c, r)?;
    }
    Ok(())
}

/// The evaluator: a policy set indexed by namespace, and the mesh-wide root namespace.
#[derive(Debug, Clone)]
pub struct Evaluator {
    set: PolicySet,
    root_namespace: String,
    by_namespace: HashMap<String, Vec<usize>>,
    trust_bundle: Option<Bundle>,
    remote_jwks: Option<Arc<RemoteJwks>>,
    /// Tokens already verified (shared by clones; reset on policy reload).
    verified: Arc<super::verified::VerifiedTokens>,
}

impl Evaluator {
    /// An evaluator over `set`; policies in `root_namespace` apply mesh-wide.
    pub fn new(mut set: PolicySet, root_namespace: impl Into<String>) -> Self {
        let root_namespace = root_namespace.into();
        // Istio ignores a PeerAuthentication with a selector in the root
        // namespace; so does Sigil, saying so.
        set.peer.retain(|p| {
            let ignored = p.namespace == root_namespace && p.selector.is_some();
            if ignored {
                tracing::warn!(policy = %p.id(), "a PeerAuthentication with a selector in the root namespace is ignored (as in Istio): move it to the workload's namespace");
            }
            !ignored
        });
        // Among conflicting PeerAuthentications the oldest wins (Istio's
        // rule); those without a creationTimestamp come after, by name.
        set.peer.sort_by(|a, b| {
            (a.created.is_none(), &a.created, &a.namespace, &a.name).cmp(&(
                b.created.is_none(),
                &b.created,
                &b.namespace,
                &b.name,
            ))
        });
        let mut by_namespace: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, p) in set.authorization.iter().enumerate() {
            by_namespace.entry(p.namespace.clone()).or_default().push(i);
        }
        Evaluator {
            set,
            root_namespace,
            by_namespace,
            trust_bundle: None,
            remote_jwks: None,
            verified: Arc::default(),
        }
    }

    /// Uses `bundle`'s JWT authorities for jwtRules that name no JWKS.
    pub fn with_trust_bundle(mut self, bundle: Bundle) -> Self {
        self.trust_bundle = Some(bundle);
        self
    }

    /// Reads `jwksUri: https://` keys from `cache` (without it such rules
    /// reject every token).
    pub fn with_remote_jwks(mut self, cache: Arc<RemoteJwks>) -> Self {
        self.remote_jwks = Some(cache);
        self
    }

    fn in_scope(
        &self,
        namespace: &str,
        selector: Option<&BTreeMap<String, String>>,
        r: &Request,
    ) -> bool {
        let dest_ns = r.destination_namespace();
        (namespace == self.root_namespace || Some(namespace) == dest_ns)
            && selector.is_none_or(|labels| labels_match(labels, r))
    }

    /// Validates the request's JWT against the applicable RequestAuthentications.
    /// `Ok(None)`: no token (or no RequestAuthentication applies). `Err`: the
    /// deciding policy and why the token is invalid.
    pub fn authenticate(
        &self,
        r: &Request,
        now: SystemTime,
    ) -> Result<Option<RequestAuth>, (String, String)> {
        let policies: Vec<&RequestAuthentication> = self
            .set
            .request
            .iter()
            .filter(|p| self.in_scope(&p.namespace, p.selector.as_ref(), r))
            .collect();
        let rules: Vec<(&RequestAuthentication, &JwtRule)> = policies
            .iter()
            .flat_map(|p| p.rules.iter().map(move |rule| (*p, rule)))
            .collect();
        let jar = cookies(r.headers.get("cookie"));
        let token = rules.iter().find_map(|(_, rule)| {
            let (headers, params) = rule.locations();
            headers
                .iter()
                .find_map(|(name, prefix)| {
                    r.headers
                        .get(name)
                        .and_then(|v| v.strip_prefix(prefix.as_str()))
                        .map(|t| (t.to_string(), TokenAt::Header(name.clone())))
                })
                .or_else(|| {
                    params.iter().find_map(|p| {
                        r.query
                            .get(p)
                            .map(|t| (t.clone(), TokenAt::Param(p.clone())))
                    })
                })
                .or_else(|| {
                    rule.from_cookies.iter().find_map(|c| {
                        jar.iter()
                            .find(|(k, _)| k == c)
                            .map(|(_, v)| (v.clone(), TokenAt::Cookie(c.clone())))
                    })
                })
                .map(|(t, at)| (t.trim().to_string(), at))
                .filter(|(t, _)| !t.is_empty())
        });
        let Some((token, found_at)) = token else {
            return Ok(None);
        };
        let token = token.as_str();
        let first = policies.first().map(|p| p.id()).unwrap_or_default();
        let jwt =
            UnverifiedJwt::parse_third_party(token).map_err(|e| (first.clone(), e.to_string()))?;
        let iss = jwt
            .claims
            .get("iss")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let Some((policy, rule)) = rules.iter().find(|(_, rule)| rule.issuer == iss) else {
            return Err((
                first,
                format!("issuer {iss:?} is not accepted by any jwtRule"),
            ));
        };
        let fail = |why: String| (policy.id(), why);
        let fetched: JwksKeys;
        let bundled: Vec<(Option<String>, JwtPublicKey)>;
        let keys: &[(Option<String>, JwtPublicKey)] = match &rule.jwks {
            JwksSource::Keys(k) => k,
            JwksSource::Remote(url) => {
                let cache = self.remote_jwks.as_ref().ok_or_else(|| {
                    fail(format!(
                        "the JWKS at {url} is not fetched by this evaluator"
                    ))
                })?;
                fetched = cache.keys(url).map_err(fail)?;
                &fetched
            }
            JwksSource::TrustDomainBundle => {
                bundled = self
                    .trust_bundle
                    .as_ref()
                    .ok_or_else(|| {
                        fail("the rule names no JWKS and no trust bundle is loaded".into())
                    })?
                    .jwt_authorities()
                    .iter()
                    .map(|(kid, key)| (Some(kid.clone()), key.clone()))
                    .collect();
                &bundled
            }
        };
        let candidates: Vec<&JwtPublicKey> = keys
            .iter()
            .filter(|(kid, _)| jwt.kid.is_empty() || kid.as_deref() == Some(jwt.kid.as_str()))
            .map(|(_, k)| k)
            .collect();
        if candidates.is_empty() {
            if let (JwksSource::Remote(url), Some(cache)) = (&rule.jwks, &self.remote_jwks) {
                let refetch = if cache.kid_missing(url) {
                    " (a refetch was requested)"
                } else {
                    ""
                };
                return Err(fail(format!(
                    "no key with kid {:?} in the JWKS from {url}{refetch}",
                    jwt.kid
                )));
            }
            return Err(fail(format!("no key with kid {:?} in the JWKS", jwt.kid)));
        }
        // A token verified before by a key still in the JWKS skips the
        // signature check; everything else (time, audiences) runs each time.
        let now_secs = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let digest = super::verified::VerifiedTokens::digest(token);
        let cached = self
            .verified
            .verified_with(&digest, now_secs)
            .filter(|k| candidates.contains(&k));
        let verified_by = match cached {
            Some(k) => k,
            None => candidates
                .iter()
                .find(|k| jwt.verify_signature(k).is_ok())
                .map(|k| (*k).clone())
                .ok_or_else(|| fail("signature does not verify with the JWKS".into()))?,
        };
        let exp = crate::jwt::check_time(&jwt.claims, now).map_err(|e| fail(e.to_string()))?;
        self.verified.insert(digest, verified_by, exp, now_secs);
        let audiences = crate::jwt::audiences(&jwt.claims).unwrap_or_default();
        if !rule.audiences.is_empty() && !audiences.iter().any(|a| rule.audiences.contains(a)) {
            return Err(fail(format!(
                "audiences {audiences:?} include none of {:?}",
                rule.audiences
            )));
        }
        let sub = jwt
            .claims
            .get("sub")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let mut rewrite = Rewrite::default();
        if let Some(h) = &rule.output_payload_to_header {
            let payload = token.split('.').nth(1).unwrap_or_default();
            rewrite.set_headers.push((h.clone(), payload.to_string()));
        }
        for (h, c) in &rule.output_claim_to_headers {
            if let Some(v) = claim_text(&jwt.claims, c) {
                rewrite.set_headers.push((h.clone(), v));
            }
        }
        if !rule.forward_original_token {
            match found_at {
                TokenAt::Header(h) => rewrite.remove_headers.push(h),
                TokenAt::Param(p) => rewrite.remove_params.push(p),
                TokenAt::Cookie(c) => {
                    let kept: Vec<String> = jar
                        .iter()
                        .filter(|(k, _)| *k != c)
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    if kept.is_empty() {
                        rewrite.remove_headers.push("cookie".into());
                    } else {
                        rewrite.set_headers.push(("cookie".into(), kept.join("; ")));
                    }
                }
            }
        }
        Ok(Some(RequestAuth {
            rewrite,
            principal: format!("{iss}/{sub}"),
            audiences,
            presenter: jwt
                .claims
                .get("azp")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            claims: jwt.claims.clone(),
        }))
    }

    /// Policies that apply to the request's destination, in file order:
    /// the root namespace's and the destination namespace's, selector permitting.
    fn applicable(&self, r: &Request) -> Vec<&AuthorizationPolicy> {
        let dest_ns = r.destination_namespace();
        let mut idx: Vec<usize> = self
            .by_namespace
            .get(&self.root_namespace)
            .into_iter()
            .chain(
                dest_ns
                    .filter(|ns| *ns != self.root_namespace)
                    .and_then(|ns| self.by_namespace.get(ns)),
            )
            .flatten()
            .copied()
            .collect();
        idx.sort_unstable();
        idx.into_iter()
            .map(|i| &self.set.authorization[i])
            .filter(|p| {
                p.selector
                    .as_ref()
                    .is_none_or(|labels| labels_match(labels, r))
            })
            .collect()
    }

    /// The effective mTLS mode for the request's destination and port:
    /// workload policy (port level first) over namespace over mesh; UNSET
    /// inherits; PERMISSIVE when nothing is set. Returns the deciding policy.
    pub fn mtls_mode(&self, r: &Request) -> (MtlsMode, Option<String>) {
        let dest_ns = r.destination_namespace();
        let root = self.root_namespace.as_str();
        let peer = &self.set.peer;
        let mesh = peer
            .iter()
            .find(|p| p.namespace == root && p.selector.is_none());
        let namespace = peer.iter().find(|p| {
            Some(p.namespace.as_str()) == dest_ns && p.namespace != root && p.selector.is_none()
        });
        let workload = peer.iter().find(|p| {
            (Some(p.namespace.as_str()) == dest_ns || p.namespace == root)
                && p.selector.as_ref().is_some_and(|l| labels_match(l, r))
        });
        let mut mode = (MtlsMode::Permissive, None);
        for level in [mesh, namespace, workload].into_iter().flatten() {
            let m = r
                .destination_port
                .and_then(|port| level.port_modes.get(&port).copied())
                .filter(|m| *m != MtlsMode::Unset)
                .unwrap_or(level.mode);
            if m != MtlsMode::Unset {
                mode = (m, Some(level.id()));
            }
        }
        mode
    }

    /// Decides a request now and explains the decision.
    pub fn evaluate(&self, r: &Request) -> Decision {
        self.evaluate_at(r, SystemTime::now())
    }

    /// Decides a request at `now`: PeerAuthentication, then
    /// RequestAuthentication (an invalid JWT is a 401), then authorization.
    pub fn evaluate_at(&self, r: &Request, now: SystemTime) -> Decision {
        if let Some(why) = &r.path_error {
            return Decision {
                allow: false,
                status: 400,
                explanation: vec![format!("bad request: {why}; refused before any policy")],
                policy: None,
                rule: None,
                audit: false,
                request_principal: None,
                rewrite: Rewrite::default(),
            };
        }
        match self.authenticate(r, now) {
            Ok(Some(auth)) => {
                let principal = auth.principal.clone();
                let rewrite = auth.rewrite.clone();
                let mut with_auth = r.clone();
                with_auth.auth = Some(auth);
                let mut d = self.decide(&with_auth);
                d.request_principal = Some(principal);
                if d.allow {
                    d.rewrite = rewrite;
                }
                d
            }
            Ok(None) => self.decide(r),
            Err((policy, why)) => Decision {
                allow: false,
                status: 401,
                explanation: vec![format!(
                    "RequestAuthentication {policy}: invalid JWT: {why}"
                )],
                policy: Some(policy),
                rule: None,
                audit: false,
                request_principal: None,
                rewrite: Rewrite::default(),
            },
        }
    }

    fn decide(&self, r: &Request) -> Decision {
        let mut explanation = Vec::new();
        let mut audit = false;
        let (mode, by) = self.mtls_mode(r);
        if mode == MtlsMode::Strict && r.source_principal.is_none() {
            let by = by.unwrap_or_default();
            explanation.push(format!(
                "PeerAuthentication {by}: STRICT mTLS and the request has no peer identity"
            ));
            return Decision {
                allow: false,
                status: 403,
                policy: Some(by),
                rule: None,
                explanation,
                audit,
                request_principal: None,
                rewrite: Rewrite::default(),
            };
        }
        // Namespaced policies cannot be scoped without the destination's
        // namespace: deny rather than guess (Istio always knows it).
        if r.destination_namespace().is_none()
            && self
                .set
                .authorization
                .iter()
                .any(|p| p.namespace != self.root_namespace)
        {
            explanation.push(
                "the destination's namespace is unknown (no /ns/<ns>/ in its SPIFFE ID, no `namespace` context extension or label), so namespaced policies cannot be applied: denied rather than guessed".into(),
            );
            return Decision {
                allow: false,
                status: 403,
                policy: None,
                rule: None,
                explanation,
                audit,
                request_principal: None,
                rewrite: Rewrite::default(),
            };
        }
        let first_match = |p: &AuthorizationPolicy| {
            p.rules
                .iter()
                .position(|rule| rule_matches_as(p.action, rule, r).is_ok())
        };
        let applicable = self.applicable(r);

        for p in applicable.iter().filter(|p| p.action == Action::Audit) {
            if let Some(i) = first_match(p) {
                audit = true;
                explanation.push(format!(
                    "AUDIT {} rule {i} matched (request marked for audit)",
                    p.id()
                ));
            }
        }
        for p in applicable.iter().filter(|p| p.action == Action::Deny) {
            if let Some(i) = first_match(p) {
                if p.dry_run {
                    explanation.push(format!(
                        "dry-run DENY {} rule {i} would deny (not enforced)",
                        p.id()
                    ));
                    continue;
                }
                explanation.push(format!("DENY {} rule {i} matched", p.id()));
                return Decision {
                    allow: false,
                    status: 403,
                    policy: Some(p.id()),
                    rule: Some(i),
                    explanation,
                    audit,
                    request_principal: None,
                    rewrite: Rewrite::default(),
                };
            }
        }
        let allows: Vec<&&AuthorizationPolicy> = applicable
            .iter()
            .filter(|p| p.action == Action::Allow && !p.dry_run)
            .collect();
        for p in applicable
            .iter()
            .filter(|p| p.action == Action::Allow && p.dry_run)
        {
            let would = if first_match(p).is_some() {
                "would allow"
            } else {
                "would not match"
            };
            explanation.push(format!("dry-run ALLOW {} {would} (not enforced)", p.id()));
        }
        if allows.is_empty() {
            explanation
                .push("no ALLOW policy applies to the destination: allowed by default".into());
            return Decision {
                allow: true,
                status: 200,
                policy: None,
                rule: None,
                explanation,
                audit,
                request_principal: None,
                rewrite: Rewrite::default(),
            };
        }
        for p in &allows {
            if let Some(i) = first_match(p) {
                explanation.push(format!("ALLOW {} rule {i} matched", p.id()));
                return Decision {
                    allow: true,
                    status: 200,
                    policy: Some(p.id()),
                    rule: Some(i),
                    explanation,
                    audit,
                    request_principal: None,
                    rewrite: Rewrite::default(),
                };
            }
        }
        explanation.push("ALLOW policies apply but none matched: denied by default".into());
        for p in &allows {
            if p.rules.is_empty() {
                explanation.push(format!("{}: has no rules (allows nothing)", p.id()));
            }
            for (i, rule) in p.rules.iter().enumerate() {
                if let Err(why) = rule_matches_as(p.action, rule, r) {
                    explanation.push(format!("{} rule {i}: {why}", p.id()));
                }
            }
        }
        Decision {
            allow: false,
            status: 403,
            policy: None,
            rule: None,
            explanation,
            audit,
            request_principal: None,
            rewrite: Rewrite::default(),
        }
    }
}

fn labels_match(want: &BTreeMap<String, String>, r: &Request) -> bool {
    want.iter()
        .all(|(k, v)| r.destination_labels.get(k) == Some(v))
}
