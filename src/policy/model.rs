//! Istio-style AuthorizationPolicy documents: strict parsing from YAML into
//! validated types. Unknown fields, unknown condition keys and bad values are
//! errors naming the file, the document and the field path.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::jwt::{JwkParams, JwtPublicKey};

/// Why a policy file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: document {document}: {}{reason}", if path.is_empty() { String::new() } else { format!("{path}: ") }, file = file.display())]
pub struct PolicyError {
    /// The file.
    pub file: PathBuf,
    /// Zero-based document index in the file.
    pub document: usize,
    /// The field path, e.g. `spec.rules[0].from[0].source.ipBlocks[1]`.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

/// What an AuthorizationPolicy does when one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Allow (the default).
    Allow,
    /// Deny.
    Deny,
    /// Mark the request for audit; never changes the decision.
    Audit,
}

/// A string matcher: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Present (any value).
    Presence,
}

impl Matcher {
    /// Parses Istio's match syntax.
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            Matcher::Presence
        } else if let Some(p) = s.strip_suffix('*') {
            Matcher::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            Matcher::Suffix(p.to_string())
        } else {
            Matcher::Exact(s.to_string())
        }
    }

    /// True when `value` matches (`case_insensitive` for hosts).
    pub fn matches(&self, value: &str, case_insensitive: bool) -> bool {
        let (v, norm);
        if case_insensitive {
            norm = value.to_ascii_lowercase();
            v = norm.as_str();
        } else {
            v = value;
        }
        let fold = |s: &str| {
            if case_insensitive {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        match self {
            Matcher::Exact(e) => v == fold(e),
            Matcher::Prefix(p) => v.starts_with(&fold(p)),
            Matcher::Suffix(s) => v.ends_with(&fold(s)),
            Matcher::Presence => !v.is_empty(),
        }
    }
}

/// An IPv4 or IPv6 CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (a single host).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }

    /// True when `ip` is inside the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn bits(a: IpAddr) -> u128 {
            match a {
                IpAddr::V4(v) => u128::from(u32::from(v)),
                IpAddr::V6(v) => u128::from(v),
            }
        }
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let width = if ip.is_ipv4() { 32 } else { 128 };
        if self.prefix == 0 {
            return true;
        }
        let shift = width - u32::from(self.prefix);
        bits(self.addr) >> shift == bits(ip) >> shift
    }
}

/// A field of a source or operation: values that must match (any of them)
/// and values that must not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<T> {
    /// The positive form (`principals`); empty when absent.
    pub values: Vec<T>,
    /// The negative form (`notPrincipals`).
    pub not_values: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            values: Vec::new(),
            not_values: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    /// Whether the policy names any value (or excluded value) for it.
    pub fn is_set(&self) -> bool {
        !self.values.is_empty() || !self.not_values.is_empty()
    }
}

/// `rules[].from[].source`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    /// Peer principals (SPIFFE IDs without `spiffe://`).
    pub principals: Field<Matcher>,
    /// Request principals (`iss/sub`).
    pub request_principals: Field<Matcher>,
    /// Peer namespaces.
    pub namespaces: Field<Matcher>,
    /// Peer IP blocks.
    pub ip_blocks: Field<Cidr>,
    /// The original client's IP blocks (`remote.ip`).
    pub remote_ip_blocks: Field<Cidr>,
    /// Peer service accounts, `ns/sa`.
    pub service_accounts: Field<Matcher>,
}

/// `rules[].to[].operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    /// Hosts (case-insensitive).
    pub hosts: Field<Matcher>,
    /// Destination ports.
    pub ports: Field<u16>,
    /// HTTP methods.
    pub methods: Field<Matcher>,
    /// HTTP paths.
    pub paths: Field<Matcher>,
}

/// The keys a `when` condition may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    /// `request.headers[name]` (name lowercased).
    Header(String),
    /// `source.ip`.
    SourceIp,
    /// `remote.ip`: the original client (X-Forwarded-For, trusted hops).
    RemoteIp,
    /// `destination.ip`.
    DestinationIp,
    /// `source.namespace`.
    SourceNamespace,
    /// `source.principal`.
    SourcePrincipal,
    /// `request.auth.principal`.
    AuthPrincipal,
    /// `request.auth.audiences`.
    AuthAudiences,
    /// `request.auth.presenter`.
    AuthPresenter,
    /// `request.auth.claims[a][b]...` (nested).
    AuthClaim(Vec<String>),
    /// `destination.port`.
    DestinationPort,
    /// `connection.sni`.
    ConnectionSni,
}

impl ConditionKey {
    /// Whether it reads HTTP request attributes (absent on TCP traffic).
    pub fn is_http_only(&self) -> bool {
        matches!(
            self,
            ConditionKey::Header(_)
                | ConditionKey::AuthPrincipal
                | ConditionKey::AuthAudiences
                | ConditionKey::AuthPresenter
                | ConditionKey::AuthClaim(_)
        )
    }

    /// Whether its values are IP addresses or CIDR blocks.
    pub fn is_ip(&self) -> bool {
        matches!(
            self,
            ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp
        )
    }

    /// Parses a condition key, or explains which keys exist.
    pub fn parse(key: &str) -> Result<Self, String> {
        let bracketed = |rest: &str| -> Option<Vec<String>> {
            let mut out = Vec::new();
            let mut rest = rest;
            while !rest.is_empty() {
                let inner = rest.strip_prefix('[')?;
                let end = inner.find(']')?;
                let name = &inner[..end];
                if name.is_empty() {
                    return None;
                }
                out.push(name.to_string());
                rest = &inner[end + 1..];
            }
            (!out.is_empty()).then_some(out)
        };
        Ok(match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "destination.ip" => ConditionKey::DestinationIp,
            k if k.starts_with("experimental.envoy.filters.") => {
                return Err(format!(
                    "{k:?}: experimental.envoy.filters.* keys read Envoy filter metadata that ext_authz does not receive; Sigil cannot honour them"
                ));
            }
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "request.auth.principal" => ConditionKey::AuthPrincipal,
            "request.auth.audiences" => ConditionKey::AuthAudiences,
            "request.auth.presenter" => ConditionKey::AuthPresenter,
            "destination.port" => ConditionKey::DestinationPort,
            "connection.sni" => ConditionKey::ConnectionSni,
            k if k.starts_with("request.headers[") => {
                match bracketed(&k["request.headers".len()..]) {
                    Some(v) if v.len() == 1 => ConditionKey::Header(v[0].to_ascii_lowercase()),
                    _ => return Err(format!("{k:?}: expected request.headers[NAME]")),
                }
            }
            k if k.starts_with("request.auth.claims[") => {
                match bracketed(&k["request.auth.claims".len()..]) {
                    Some(v) => ConditionKey::AuthClaim(v),
                    None => {
                        return Err(format!(
                            "{k:?}: expected request.auth.claims[NAME] (nested: [a][b])"
                        ));
                    }
                }
            }
            other => {
                return Err(format!(
                    "unknown condition key {other:?} (supported: request.headers[..], source.ip, remote.ip, destination.ip, source.namespace, \
                     source.principal, request.auth.principal, request.auth.audiences, request.auth.presenter, \
                     request.auth.claims[..], destination.port, connection.sni)"
                ));
            }
        })
    }
}

/// `rules[].when[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The attribute.
    pub key: ConditionKey,
    /// The key as written (for explanations).
    pub key_text: String,
    /// Values (any must match) and not-values (none may match).
    pub field: Field<Matcher>,
}

/// One rule: any `from`, any `to`, all `when`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// Sources (empty: any source).
    pub from: Vec<Source>,
    /// Operations (empty: any operation).
    pub to: Vec<Operation>,
    /// Conditions (all must hold).
    pub when: Vec<Condition>,
}

impl Rule {
    /// The HTTP-only fields it names (meaningless for TCP traffic).
    pub fn http_only_fields(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.from.iter().any(|s| s.request_principals.is_set()) {
            out.push("requestPrincipals");
        }
        for (name, set) in [
            ("hosts", self.to.iter().any(|o| o.hosts.is_set())),
            ("methods", self.to.iter().any(|o| o.methods.is_set())),
            ("paths", self.to.iter().any(|o| o.paths.is_set())),
        ] {
            if set {
                out.push(name);
            }
        }
        if self.when.iter().any(|c| c.key.is_http_only()) {
            out.push("when (request.*)");
        }
        out
    }

    /// The rule with its HTTP-only fields dropped (DENY rules on TCP).
    pub fn without_http(&self) -> Rule {
        let mut r = self.clone();
        for s in &mut r.from {
            s.request_principals = Field::default();
        }
        for o in &mut r.to {
            o.hosts = Field::default();
            o.methods = Field::default();
            o.paths = Field::default();
        }
        r.when.retain(|c| !c.key.is_http_only());
        r
    }
}

/// A validated AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.selector.matchLabels` (None: every workload in the namespace).
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.action`.
    pub action: Action,
    /// `spec.rules` (empty: matches nothing).
    pub rules: Vec<Rule>,
    /// `istio.io/dry-run: "true"`: evaluated and logged, never enforced.
    pub dry_run: bool,
}

impl AuthorizationPolicy {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

// ---- wire form (serde), converted with full field paths ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDoc {
    api_version: String,
    kind: String,
    metadata: RawMeta,
    #[serde(default)]
    spec: Option<serde_norway::Value>,
    /// What a cluster reports (`kubectl get -o yaml`); not policy.
    #[serde(default)]
    #[expect(dead_code, reason = "Kubernetes status, ignored")]
    status: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "valid Kubernetes metadata that authorization does not use"
    )]
    labels: BTreeMap<String, String>,
    /// When the object was created (orders conflicting PeerAuthentications).
    #[serde(default, rename = "creationTimestamp")]
    creation_timestamp: Option<String>,
    /// The rest of standard object metadata, as `kubectl get -o yaml`
    /// exports it: accepted and ignored.
    #[serde(default, flatten)]
    #[expect(dead_code, reason = "standard Kubernetes metadata, ignored")]
    other: KubeMeta,
}

/// Standard Kubernetes object metadata a policy does not use.
#[derive(Deserialize, Default)]
#[allow(
    dead_code,
    reason = "standard Kubernetes metadata, accepted and ignored"
)]
#[serde(rename_all = "camelCase")]
struct KubeMeta {
    #[serde(default)]
    resource_version: Option<serde_norway::Value>,
    #[serde(default)]
    uid: Option<serde_norway::Value>,
    #[serde(default)]
    generation: Option<serde_norway::Value>,
    #[serde(default)]
    managed_fields: Option<serde_norway::Value>,
    #[serde(default)]
    finalizers: Option<serde_norway::Value>,
    #[serde(default)]
    owner_references: Option<serde_norway::Value>,
    #[serde(default)]
    self_link: Option<serde_norway::Value>,
    #[serde(default)]
    generate_name: Option<serde_norway::Value>,
    #[serde(default)]
    deletion_timestamp: Option<serde_norway::Value>,
    #[serde(default)]
    deletion_grace_period_seconds: Option<serde_norway::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAuthzSpec {
    #[serde(default)]
    selector: Option<RawSelector>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    rules: Option<Vec<RawRule>>,
    #[serde(default)]
    provider: Option<serde_norway::Value>,
    #[serde(default)]
    target_ref: Option<serde_norway::Value>,
    #[serde(default)]
    target_refs: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    from: Vec<RawFrom>,
    #[serde(default)]
    to: Vec<RawTo>,
    #[serde(default)]
    when: Vec<RawCondition>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    source: RawSource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    operation: RawOperation,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    request_principals: Vec<String>,
    #[serde(default)]
    not_request_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
    #[serde(default)]
    remote_ip_blocks: Vec<String>,
    #[serde(default)]
    not_remote_ip_blocks: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<String>,
    #[serde(default)]
    not_service_accounts: Vec<String>,
    #[serde(default)]
    trust_domains: Option<serde_norway::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOperation {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    not_ports: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCondition {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

/// A PeerAuthentication mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Inherit from the enclosing level (workload → namespace → mesh).
    Unset,
    /// Plaintext only.
    Disable,
    /// mTLS or plaintext (the default when nothing is set).
    Permissive,
    /// mTLS only: a request without a peer identity is denied.
    Strict,
}

/// A validated PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthentication {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.selector.matchLabels` (None: namespace-wide, or mesh-wide in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.mtls.mode`.
    pub mode: MtlsMode,
    /// `spec.portLevelMtls`.
    pub port_modes: BTreeMap<u16, MtlsMode>,
    /// `metadata.creationTimestamp` (RFC 3339), if exported with it: among
    /// conflicting policies the oldest wins, as in Istio.
    pub created: Option<String>,
}

impl PeerAuthentication {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Where a JWT rule's verification keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// Keys from `jwks` or a `jwksUri` file, each with its `kid` if any.
    Keys(Vec<(Option<String>, JwtPublicKey)>),
    /// `jwksUri: https://...`: fetched, cached and refreshed (see [`super::RemoteJwks`]).
    Remote(String),
    /// Neither given: the trust domain's own JWT bundle.
    TrustDomainBundle,
}

/// One `jwtRules[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtRule {
    /// `iss` the token must carry.
    pub issuer: String,
    /// Accepted audiences (empty: not checked).
    pub audiences: Vec<String>,
    /// Verification keys.
    pub jwks: JwksSource,
    /// Headers to read the token from: (lowercased name, prefix to strip).
    pub from_headers: Vec<(String, String)>,
    /// Query parameters to read the token from.
    pub from_params: Vec<String>,
    /// Cookies to read the token from.
    pub from_cookies: Vec<String>,
    /// Copy the token's payload (base64url) to this header on allow.
    pub output_payload_to_header: Option<String>,
    /// Copy claims (dotted paths) to headers on allow: (header, claim).
    pub output_claim_to_headers: Vec<(String, String)>,
    /// Keep the token on the request to the upstream (default: removed).
    pub forward_original_token: bool,
}

impl JwtRule {
    /// Where to look for a token: the rule's own locations, or
    /// `Authorization: Bearer` and `access_token` by default.
    pub fn locations(&self) -> (Vec<(String, String)>, Vec<String>) {
        if self.from_headers.is_empty()
            && self.from_params.is_empty()
            && self.from_cookies.is_empty()
        {
            (
                vec![("authorization".into(), "Bearer ".into())],
                vec!["access_token".into()],
            )
        } else {
            (self.from_headers.clone(), self.from_params.clone())
        }
    }
}

/// How a remote JWKS "URL" names an issuer whose keys are found by OIDC
/// discovery (`<issuer>/.well-known/openid-configuration` → `jwks_uri`).
pub const OIDC_PREFIX: &str = "oidc-discovery:";

/// A validated RequestAuthentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestAuthentication {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.selector.matchLabels`.
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.jwtRules`.
    pub rules: Vec<JwtRule>,
}

impl RequestAuthentication {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A loaded set of policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    /// Every AuthorizationPolicy, in file order.
    pub authorization: Vec<AuthorizationPolicy>,
    /// Every PeerAuthentication, in file order.
    pub peer: Vec<PeerAuthentication>,
    /// Every RequestAuthentication, in file order.
    pub request: Vec<RequestAuthentication>,
}

impl PolicySet {
    /// Every `jwksUri` URL to fetch.
    pub fn remote_jwks_urls(&self) -> BTreeSet<String> {
        self.request
            .iter()
            .flat_map(|p| &p.rules)
            .filter_map(|r| match &r.jwks {
                JwksSource::Remote(url) => Some(url.clone()),
                _ => None,
            })
            .collect()
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRequestSpec {
    #[serde(default)]
    selector: Option<RawSelector>,
    #[serde(default)]
    jwt_rules: Vec<RawJwtRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawJwtRule {
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    jwks: Option<String>,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    from_headers: Vec<RawFromHeader>,
    #[serde(default)]
    from_params: Vec<String>,
    #[serde(default)]
    from_cookies: Vec<String>,
    #[serde(default)]
    output_payload_to_header: Option<String>,
    #[serde(default)]
    output_claim_to_headers: Vec<RawClaimToHeader>,
    #[serde(default)]
    forward_original_token: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaimToHeader {
    header: String,
    claim: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFromHeader {
    name: String,
    #[serde(default)]
    prefix: String,
}

/// Parses a standard JWKS document into keys with their `kid`s.
pub fn parse_jwks(text: &str) -> Result<Vec<(Option<String>, JwtPublicKey)>, String> {
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("a JWKS needs a \"keys\" array")?;
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            let field = |name: &str| k.get(name).and_then(|v| v.as_str()).map(str::to_string);
            let params = JwkParams {
                kty: field("kty").unwrap_or_default(),
                crv: field("crv"),
                x: field("x"),
                y: field("y"),
                n: field("n"),
                e: field("e"),
            };
            let key = JwtPublicKey::from_jwk(&params).map_err(|e| format!("keys[{i}]: {e}"))?;
            Ok((field("kid"), key))
        })
        .collect()
}

fn request_authentication(
    ctx: &Ctx<'_>,
    meta: &RawMeta,
    spec: Option<serde_norway::Value>,
) -> Result<RequestAuthentication, PolicyError> {
    let spec: RawRequestSpec = match spec {
        None => RawRequestSpec::default(),
        Some(v) => serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            ctx.err(format!("spec.{path}"), e.into_inner().to_string())
        })?,
    };
    let mut rules = Vec::new();
    for (i, r) in spec.jwt_rules.iter().enumerate() {
        let at = format!("spec.jwtRules[{i}]");
        if r.issuer.is_empty() {
            return Err(ctx.err(format!("{at}.issuer"), "must not be empty"));
        }
        let jwks = match (&r.jwks, &r.jwks_uri) {
            (Some(_), Some(_)) => {
                return Err(ctx.err(&at, "set jwks or jwksUri, not both"));
            }
            (Some(text), None) => {
                JwksSource::Keys(parse_jwks(text).map_err(|e| ctx.err(format!("{at}.jwks"), e))?)
            }
            (None, Some(uri)) if uri.contains("://") => {
                super::jwks::check_url(uri)
                    .map_err(|e| ctx.err(format!("{at}.jwksUri"), format!("{uri}: {e}")))?;
                JwksSource::Remote(uri.clone())
            }
            (None, Some(uri)) => {
                let path = ctx.file.parent().unwrap_or(Path::new(".")).join(uri);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ctx.err(
                        format!("{at}.jwksUri"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                JwksSource::Keys(
                    parse_jwks(&text).map_err(|e| ctx.err(format!("{at}.jwksUri"), e))?,
                )
            }
            // Issuer only: OIDC discovery for an https:// issuer (as Istio
            // does); any other issuer (e.g. a JWT-SVID's) uses the trust
            // domain's own JWT bundle.
            (None, None) if r.issuer.starts_with("https://") => {
                JwksSource::Remote(format!("{OIDC_PREFIX}{}", r.issuer))
            }
            (None, None) => JwksSource::TrustDomainBundle,
        };
        rules.push(JwtRule {
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            jwks,
            from_headers: r
                .from_headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.prefix.clone()))
                .collect(),
            from_params: r.from_params.clone(),
            from_cookies: r.from_cookies.clone(),
            output_payload_to_header: r
                .output_payload_to_header
                .as_ref()
                .map(|h| h.to_ascii_lowercase()),
            output_claim_to_headers: r
                .output_claim_to_headers
                .iter()
                .map(|c| (c.header.to_ascii_lowercase(), c.claim.clone()))
                .collect(),
            forward_original_token: r.forward_original_token,
        });
    }
    Ok(RequestAuthentication {
        name: meta.name.clone(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        selector: spec.selector.map(|s| s.match_labels),
        rules,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPeerSpec {
    #[serde(default)]
    selector: Option<RawSelector>,
    #[serde(default)]
    mtls: Option<RawMtls>,
    #[serde(default)]
    port_level_mtls: BTreeMap<PortKey, RawMtls>,
}

/// A `portLevelMtls` key: Istio's examples write it as a number, YAML
/// written by hand or tools may quote it.
#[derive(Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(untagged)]
enum PortKey {
    Number(i64),
    Text(String),
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortKey::Number(n) => write!(f, "{n}"),
            PortKey::Text(t) => f.write_str(t),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    #[serde(default)]
    mode: Option<String>,
}

fn mtls_mode(ctx: &Ctx<'_>, path: &str, m: Option<&RawMtls>) -> Result<MtlsMode, PolicyError> {
    match m.and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => Ok(MtlsMode::Unset),
        Some("DISABLE") => Ok(MtlsMode::Disable),
        Some("PERMISSIVE") => Ok(MtlsMode::Permissive),
        Some("STRICT") => Ok(MtlsMode::Strict),
        Some(other) => Err(ctx.err(
            path,
            format!("unknown mode {other:?} (UNSET, DISABLE, PERMISSIVE or STRICT)"),
        )),
    }
}

fn peer_authentication(
    ctx: &Ctx<'_>,
    meta: &RawMeta,
    spec: Option<serde_norway::Value>,
) -> Result<PeerAuthentication, PolicyError> {
    let spec: RawPeerSpec = match spec {
        None => RawPeerSpec::default(),
        Some(v) => serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            ctx.err(format!("spec.{path}"), e.into_inner().to_string())
        })?,
    };
    let mode = mtls_mode(ctx, "spec.mtls.mode", spec.mtls.as_ref())?;
    if !spec.port_level_mtls.is_empty() && spec.selector.is_none() {
        return Err(ctx.err(
            "spec.portLevelMtls",
            "portLevelMtls needs a workload selector",
        ));
    }
    let mut port_modes = BTreeMap::new();
    for (port, m) in &spec.port_level_mtls {
        let path = format!("spec.portLevelMtls[{port}]");
        let p = port
            .to_string()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                ctx.err(
                    path.clone(),
                    format!("\"{port}\" is not a port (1..=65535)"),
                )
            })?;
        port_modes.insert(p, mtls_mode(ctx, &format!("{path}.mode"), Some(m))?);
    }
    Ok(PeerAuthentication {
        name: meta.name.clone(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        selector: spec.selector.map(|s| s.match_labels),
        mode,
        port_modes,
        created: meta.creation_timestamp.clone(),
    })
}

struct Ctx<'a> {
    file: &'a Path,
    document: usize,
}

impl Ctx<'_> {
    fn err(&self, path: impl Into<String>, reason: impl Into<String>) -> PolicyError {
        PolicyError {
            file: self.file.to_path_buf(),
            document: self.document,
            path: path.into(),
            reason: reason.into(),
        }
    }
}

fn matchers(v: &[String]) -> Vec<Matcher> {
    v.iter().map(|s| Matcher::parse(s)).collect()
}

/// Paths, refusing Istio's URI templates rather than matching them as
/// literals (a DENY written with them would silently never match).
fn path_matchers(ctx: &Ctx<'_>, path: &str, v: &[String]) -> Result<Vec<Matcher>, PolicyError> {
    for (i, s) in v.iter().enumerate() {
        if s.contains("{*}") || s.contains("{**}") {
            return Err(ctx.err(
                format!("{path}[{i}]"),
                format!("{s:?}: URI templates ({{*}}, {{**}}) are not supported; use an exact path or a prefix such as \"/api/*\""),
            ));
        }
    }
    Ok(matchers(v))
}

fn cidrs(ctx: &Ctx<'_>, path: &str, v: &[String]) -> Result<Vec<Cidr>, PolicyError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| Cidr::parse(s).map_err(|e| ctx.err(format!("{path}[{i}]"), e)))
        .collect()
}

fn ports(ctx: &Ctx<'_>, path: &str, v: &[String]) -> Result<Vec<u16>, PolicyError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                ctx.err(
                    format!("{path}[{i}]"),
                    format!("{s:?} is not a port (1..=65535)"),
                )
            })
        })
        .collect()
}

/// `serviceAccounts` entries: `namespace/name`, matched exactly.
fn service_accounts(ctx: &Ctx<'_>, at: &str, v: &[String]) -> Result<Vec<Matcher>, PolicyError> {
    v.iter()
        .enumerate()
        .map(|(i, sa)| match sa.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Matcher::Exact(sa.clone()))
            }
            _ => Err(ctx.err(
                format!("{at}[{i}]"),
                format!("{sa:?} must be NAMESPACE/SERVICE_ACCOUNT"),
            )),
        })
        .collect()
}

fn convert_rule(ctx: &Ctx<'_>, r: &RawRule, at: &str) -> Result<Rule, PolicyError> {
    let mut rule = Rule::default();
    for (i, f) in r.from.iter().enumerate() {
        let s = &f.source;
        let p = format!("{at}.from[{i}].source");
        let source = Source {
            principals: Field {
                values: matchers(&s.principals),
                not_values: matchers(&s.not_principals),
            },
            request_principals: Field {
                values: matchers(&s.request_principals),
                not_values: matchers(&s.not_request_principals),
            },
            namespaces: Field {
                values: matchers(&s.namespaces),
                not_values: matchers(&s.not_namespaces),
            },
            ip_blocks: Field {
                values: cidrs(ctx, &format!("{p}.ipBlocks"), &s.ip_blocks)?,
                not_values: cidrs(ctx, &format!("{p}.notIpBlocks"), &s.not_ip_blocks)?,
            },
            remote_ip_blocks: Field {
                values: cidrs(ctx, &format!("{p}.remoteIpBlocks"), &s.remote_ip_blocks)?,
                not_values: cidrs(
                    ctx,
                    &format!("{p}.notRemoteIpBlocks"),
                    &s.not_remote_ip_blocks,
                )?,
            },
            service_accounts: Field {
                values: service_accounts(
                    ctx,
                    &format!("{p}.serviceAccounts"),
                    &s.service_accounts,
                )?,
                not_values: service_accounts(
                    ctx,
                    &format!("{p}.notServiceAccounts"),
                    &s.not_service_accounts,
                )?,
            },
        };
        if s.trust_domains.is_some() {
            return Err(ctx.err(
                format!("{p}.trustDomains"),
                "deprecated and removed from Istio; name the trust domain in principals instead",
            ));
        }
        if !(source.principals.is_set()
            || source.request_principals.is_set()
            || source.namespaces.is_set()
            || source.ip_blocks.is_set()
            || source.remote_ip_blocks.is_set()
            || source.service_accounts.is_set())
        {
            return Err(ctx.err(p, "a source must set at least one field"));
        }
        rule.from.push(source);
    }
    for (i, t) in r.to.iter().enumerate() {
        let o = &t.operation;
        let p = format!("{at}.to[{i}].operation");
        let op = Operation {
            hosts: Field {
                values: matchers(&o.hosts),
                not_values: matchers(&o.not_hosts),
            },
            ports: Field {
                values: ports(ctx, &format!("{p}.ports"), &o.ports)?,
                not_values: ports(ctx, &format!("{p}.notPorts"), &o.not_ports)?,
            },
            methods: Field {
                values: matchers(&o.methods),
                not_values: matchers(&o.not_methods),
            },
            paths: Field {
                values: path_matchers(ctx, &format!("{p}.paths"), &o.paths)?,
                not_values: path_matchers(ctx, &format!("{p}.notPaths"), &o.not_paths)?,
            },
        };
        if !(op.hosts.is_set() || op.ports.is_set() || op.methods.is_set() || op.paths.is_set()) {
            return Err(ctx.err(p, "an operation must set at least one field"));
        }
        rule.to.push(op);
    }
    for (i, c) in r.when.iter().enumerate() {
        let p = format!("{at}.when[{i}]");
        let key = ConditionKey::parse(&c.key).map_err(|e| ctx.err(format!("{p}.key"), e))?;
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(ctx.err(p, "a condition needs values or notValues"));
        }
        if key.is_ip() {
            cidrs(ctx, &format!("{p}.values"), &c.values)?;
            cidrs(ctx, &format!("{p}.notValues"), &c.not_values)?;
        }
        rule.when.push(Condition {
            key,
            key_text: c.key.clone(),
            field: Field {
                values: matchers(&c.values),
                not_values: matchers(&c.not_values),
            },
        });
    }
    Ok(rule)
}

fn authorization(
    ctx: &Ctx<'_>,
    meta: &RawMeta,
    spec: Option<serde_norway::Value>,
) -> Result<AuthorizationPolicy, PolicyError> {
    let spec: RawAuthzSpec = match spec {
        None => RawAuthzSpec::default(),
        Some(v) => serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            ctx.err(format!("spec.{path}"), e.into_inner().to_string())
        })?,
    };
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => {
            return Err(ctx.err(
                "spec.action",
                "CUSTOM (external authorizers) is not supported by Sigil",
            ));
        }
        Some(other) => {
            return Err(ctx.err(
                "spec.action",
                format!("unknown action {other:?} (ALLOW, DENY or AUDIT)"),
            ));
        }
    };
    for (field, set) in [
        ("spec.targetRef", spec.target_ref.is_some()),
        ("spec.targetRefs", spec.target_refs.is_some()),
    ] {
        if set {
            return Err(ctx.err(
                field,
                "Gateway API targets are not supported: select the workloads with spec.selector.matchLabels instead",
            ));
        }
    }
    if spec.provider.is_some() {
        return Err(ctx.err(
            "spec.provider",
            "providers (CUSTOM action) are not supported by Sigil",
        ));
    }
    let rules = spec
        .rules
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, r)| convert_rule(ctx, r, &format!("spec.rules[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let dry_run = match meta.annotations.get("istio.io/dry-run").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ctx.err(
                "metadata.annotations[istio.io/dry-run]",
                format!("{other:?} must be \"true\" or \"false\""),
            ));
        }
    };
    Ok(AuthorizationPolicy {
        name: meta.name.clone(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        selector: spec.selector.map(|s| s.match_labels),
        action,
        rules,
        dry_run,
    })
}

/// Parses every document of one YAML file into `set`. A `kind: List` (as
/// `kubectl get -o yaml` prints several objects) contributes its `items`.
pub fn parse_file(file: &Path, text: &str, set: &mut PolicySet) -> Result<(), PolicyError> {
    for (document, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let ctx = Ctx { file, document };
        let value = serde_norway::Value::deserialize(de)
            .map_err(|e| ctx.err("", format!("not YAML: {e}")))?;
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        let kind = value.get("kind").and_then(serde_norway::Value::as_str);
        if kind.is_some_and(|k| k == "List" || k.ends_with("List")) {
            let items = value
                .get("items")
                .and_then(serde_norway::Value::as_sequence)
                .ok_or_else(|| ctx.err("items", "a List needs an items sequence"))?;
            for (i, item) in items.iter().enumerate() {
                parse_doc(&ctx, item.clone(), &format!("items[{i}]."), set)?;
            }
            continue;
        }
        parse_doc(&ctx, value, "", set)?;
    }
    Ok(())
}

/// One policy object; error paths start with `prefix` (e.g. `items[2].`).
fn parse_doc(
    ctx: &Ctx<'_>,
    value: serde_norway::Value,
    prefix: &str,
    set: &mut PolicySet,
) -> Result<(), PolicyError> {
    let doc: RawDoc = serde_path_to_error::deserialize(value)
        .map_err(|e| ctx.err(format!("{prefix}{}", e.path()), e.into_inner().to_string()))?;
    if !matches!(
        doc.api_version.as_str(),
        "security.istio.io/v1" | "security.istio.io/v1beta1"
    ) {
        return Err(ctx.err(
            format!("{prefix}apiVersion"),
            format!(
                "{:?} is not security.istio.io/v1 or v1beta1",
                doc.api_version
            ),
        ));
    }
    let with_prefix = |e: PolicyError| PolicyError {
        path: format!("{prefix}{}", e.path),
        ..e
    };
    match doc.kind.as_str() {
        "AuthorizationPolicy" => set
            .authorization
            .push(authorization(ctx, &doc.metadata, doc.spec).map_err(with_prefix)?),
        "PeerAuthentication" => set
            .peer
            .push(peer_authentication(ctx, &doc.metadata, doc.spec).map_err(with_prefix)?),
        "RequestAuthentication" => set
            .request
            .push(request_authentication(ctx, &doc.metadata, doc.spec).map_err(with_prefix)?),
        other => {
            return Err(ctx.err(
                format!("{prefix}kind"),
                format!("unknown kind {other:?} (AuthorizationPolicy, PeerAuthentication, RequestAuthentication)"),
            ));
        }
    }
    Ok(())
}

/// Loads every `*.yaml`/`*.yml` file of a directory, in name order.
pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
    let io = |reason: String| PolicyError {
        file: dir.to_path_buf(),
        document: 0,
        path: String::new(),
        reason,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(format!("cannot read directory: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut set = PolicySet::default();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| PolicyError {
            file: f.clone(),
            document: 0,
            path: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
        parse_file(&f, &text, &mut set)?;
    }
    Ok(set)
}
