//! Istio-style authorization: AuthorizationPolicy documents loaded strictly
//! from YAML and evaluated with an explanation of every decision.
//!
//! `model` parses AuthorizationPolicy, PeerAuthentication and
//! RequestAuthentication; `eval` decides; `jwks` keeps `jwksUri: https://`
//! keys fresh; `service` is the Envoy ext_authz edge and hot reload;
//! `serve` runs it in the server or the agent.

mod eval;
mod jwks;
mod model;
mod serve;
mod service;
mod verified;

pub use eval::{
    Decision, Evaluator, Request, RequestAuth, Rewrite, namespace_of, normalize_path,
    remote_from_xff, rule_matches, split_path_query,
};
pub use model::{
    Action, AuthorizationPolicy, Cidr, Condition, ConditionKey, Field, JwksSource, JwtRule,
    Matcher, MtlsMode, Operation, PeerAuthentication, PolicyError, PolicySet,
    RequestAuthentication, Rule, Source, load_dir, parse_file, parse_jwks,
};

pub use jwks::{JwksKeys, RemoteJwks, check_url, load_ca_file};
pub use serve::{
    DEFAULT_EXT_AUTHZ_BIND, POLICY_KEYS, PolicyConfig, ServeError, ServeFuture, serve_ext_authz,
};
pub use service::{ExtAuthz, request_from_check, response_for, watch_policies};

#[cfg(test)]
mod tests;
