//! The agent: attests to the server and (with the agent issue) serves the
//! Workload API. Today: the node API client.

pub mod node_client;

pub use node_client::{AgentIdentity, Attestation, NodeClientError, attest, connect, renew};
