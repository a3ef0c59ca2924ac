//! Istio-style authorization: AuthorizationPolicy documents loaded strictly
//! from YAML and evaluated with an explanation of every decision.
//!
//! Status: AuthorizationPolicy, PeerAuthentication and RequestAuthentication
//! (inline or file JWKS, or the trust domain's bundle), the evaluator and
//! `sigil policy check`. Still to come (issue 5): the Envoy ext_authz
//! service, jwksUri over HTTPS, hot reload, and the gRPC benchmark.

mod eval;
mod model;
mod service;

pub use eval::{
    Decision, Evaluator, Request, RequestAuth, namespace_of, rule_matches, split_path_query,
};
pub use model::{
    Action, AuthorizationPolicy, Cidr, Condition, ConditionKey, Field, JwksSource, JwtRule,
    Matcher, MtlsMode, Operation, PeerAuthentication, PolicyError, PolicySet,
    RequestAuthentication, Rule, Source, load_dir, parse_file, parse_jwks,
};

pub use service::{ExtAuthz, request_from_check, response_for, watch_policies};

#[cfg(test)]
mod tests;
