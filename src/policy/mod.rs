//! Istio-style authorization: AuthorizationPolicy documents loaded strictly
//! from YAML and evaluated with an explanation of every decision.
//!
//! Status: the AuthorizationPolicy model and evaluator. PeerAuthentication,
//! RequestAuthentication (JWT rules), the Envoy ext_authz service, hot reload
//! and `sigil policy check` are still to come (issue 5).

mod eval;
mod model;

pub use eval::{Decision, Evaluator, Request, RequestAuth, namespace_of, rule_matches};
pub use model::{
    Action, AuthorizationPolicy, Cidr, Condition, ConditionKey, Field, Matcher, Operation,
    PolicyError, PolicySet, Rule, Source, load_dir, parse_file,
};

#[cfg(test)]
mod tests;
