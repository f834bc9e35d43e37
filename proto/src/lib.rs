//! Generated gRPC types and services: the SPIFFE Workload API and Ward's node and admin APIs.

#![allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    missing_debug_implementations
)]

/// The SPIFFE Workload API (the proto has no package).
pub mod workload {
    tonic::include_proto!("_");
}

/// Ward's own APIs.
pub mod ward {
    /// Shared message types.
    pub mod types {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("ward.types.v1");
        }
    }
    /// The CA's API for node agents.
    pub mod node {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("ward.node.v1");
        }
    }
    /// The CA's admin API.
    pub mod admin {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("ward.admin.v1");
        }
    }
}

pub use ward::admin::v1 as admin;
pub use ward::node::v1 as node;
pub use ward::types::v1 as types;

pub mod convert {
    //! Conversions between the shared SPIFFE types and their messages.

    use crate::types;
    use ward_spiffe::{Bundle, JwtAuthority, TrustDomain};

    /// A bundle as a message.
    pub fn bundle_to_proto(b: &Bundle) -> types::Bundle {
        types::Bundle {
            trust_domain: b.trust_domain.to_string(),
            x509_authorities: b.x509_authorities.clone(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|a| types::JwtKey {
                    key_id: a.key_id.clone(),
                    public_key: a.public_key.clone(),
                    expires_at: 0,
                })
                .collect(),
            sequence: b.sequence,
            refresh_hint_seconds: b.refresh_hint_secs.unwrap_or(0).min(u64::from(u32::MAX)) as u32,
        }
    }

    /// A bundle message as a bundle; fails on an invalid trust domain name.
    pub fn bundle_from_proto(b: &types::Bundle) -> Result<Bundle, String> {
        let td = TrustDomain::new(&b.trust_domain)
            .map_err(|e| format!("bundle trust domain {:?}: {e}", b.trust_domain))?;
        Ok(Bundle {
            trust_domain: td,
            x509_authorities: b.x509_authorities.clone(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|k| JwtAuthority {
                    key_id: k.key_id.clone(),
                    public_key: k.public_key.clone(),
                })
                .collect(),
            sequence: b.sequence,
            refresh_hint_secs: (b.refresh_hint_seconds > 0)
                .then_some(u64::from(b.refresh_hint_seconds)),
        })
    }
}
