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
