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
    /// Ward's service on the agent socket.
    pub mod agent {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("ward.agent.v1");
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

/// The parts of Envoy's API that the agent's SDS server speaks.
pub mod envoy {
    /// Core types.
    pub mod config {
        /// `envoy.config.core`.
        pub mod core {
            /// v3.
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// Services.
    pub mod service {
        /// xDS messages.
        pub mod discovery {
            /// v3.
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        /// SDS.
        pub mod secret {
            /// v3.
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
    }
    /// Extensions.
    pub mod extensions {
        /// Transport sockets.
        pub mod transport_sockets {
            /// TLS.
            pub mod tls {
                /// v3.
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                }
            }
        }
    }
}

/// `google.rpc` (xDS error details).
pub mod google {
    /// `google.rpc`.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub use ward::admin::v1 as admin;
pub use ward::agent::v1 as agent;
pub use ward::node::v1 as node;
pub use ward::types::v1 as types;

pub mod convert;
