//! Sigil: a SPIFFE certificate authority.
//!
//! The modules follow the architecture in `docs/architecture.md`: pure SPIFFE types
//! (`spiffe`), key and bundle material (`x509`), JWT-SVIDs (`jwt`), the CA
//! (`ca`) and persistence (`store`). Generated protobuf types live in `proto`
//! and never leave the service edges.

pub mod agent;
pub mod attest;
pub mod ca;
pub mod cli;
pub mod config;
pub mod edge;
pub mod jwt;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod spiffe;
pub mod store;
pub mod workload_api;
pub mod x509;

pub mod proto {
    //! Generated protobuf types; converted to domain types at each service edge.
    #![allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
    /// The SPIFFE Workload API (the proto has no package).
    pub mod workload {
        tonic::include_proto!("_");
    }
    /// Sigil's own APIs; module paths mirror the proto packages.
    pub mod sigil {
        /// The node API (agent → server).
        pub mod node {
            /// Version 1.
            pub mod v1 {
                tonic::include_proto!("sigil.node.v1");
            }
        }
        /// The admin API (operator → server, Unix socket).
        pub mod admin {
            /// Version 1.
            pub mod v1 {
                tonic::include_proto!("sigil.admin.v1");
            }
        }
    }
    /// Encoded descriptors of every compiled proto, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sigil_descriptor");
    pub use sigil::admin::v1 as admin;
    pub use sigil::node::v1 as node;
}

pub use ca::{CaError, IssuedX509, JwtAuthority, X509Authority, X509SvidParams};
pub use spiffe::{Selector, SpiffeId, TrustDomain};
pub use store::{MemoryStore, SledStore, Store};
pub use x509::{Bundle, KeyAlgorithm, PrivateKey};
