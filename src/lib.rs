//! Sigil: a SPIFFE certificate authority.
//!
//! The modules follow the architecture in `DESIGN.md`: pure SPIFFE types
//! (`spiffe`), key and bundle material (`x509`), JWT-SVIDs (`jwt`), the CA
//! (`ca`) and persistence (`store`). Generated protobuf types live in `proto`
//! and never leave the service edges.

pub mod ca;
pub mod jwt;
pub mod runtime;
pub mod spiffe;
pub mod store;
pub mod x509;

pub mod proto {
    //! Generated protobuf types; converted to domain types at each service edge.
    #![allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
    /// The SPIFFE Workload API (the proto has no package).
    pub mod workload {
        tonic::include_proto!("_");
    }
}

pub use ca::{CaError, IssuedX509, JwtAuthority, X509Authority, X509SvidParams};
pub use spiffe::{Selector, SpiffeId, TrustDomain};
pub use store::{MemoryStore, SledStore, Store};
pub use x509::{Bundle, KeyAlgorithm, PrivateKey};
