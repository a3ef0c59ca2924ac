//! Istio-style authorization: AuthorizationPolicy documents loaded strictly
//! from YAML and evaluated with an explanation of every decision.
//!
//! Status: AuthorizationPolicy and PeerAuthentication, the evaluator and
//! `sigil policy check`. RequestAuthentication (JWT rules), the Envoy ext_authz service, hot reload
//! and the benchmark through gRPC are still to come (issue 5).

mod eval;
mod model;

pub use eval::{Decision, Evaluator, Request, RequestAuth, namespace_of, rule_matches};
pub use model::{
    Action, AuthorizationPolicy, Cidr, Condition, ConditionKey, Field, Matcher, MtlsMode,
    Operation, PeerAuthentication, PolicyError, PolicySet, Rule, Source, load_dir, parse_file,
};

#[cfg(test)]
mod tests;
