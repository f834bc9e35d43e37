//! ward-ca: the SPIFFE certificate authority of a Ward trust domain.
//!
//! It attests node agents, keeps registration entries, signs X.509-SVIDs from CSRs and mints
//! JWT-SVIDs, and owns the trust bundle. `main.rs` only parses the command line and calls
//! [`cli::main`].

pub mod admin_api;
pub mod agents;
pub mod audit;
pub mod authority;
pub mod cli;
pub mod config;
pub mod convert;
pub mod core;
pub mod csr;
pub mod db;
pub mod demo;
pub mod dev;
pub mod egress;
pub mod entries;
pub mod error;
pub mod feed;
pub mod issuer;
pub mod k8s;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod node_api;
pub mod oidc;
pub mod policies;
pub mod server;
pub mod services;
mod store_open;
pub mod sync;

pub use config::CaConfig;
pub use server::CaServer;
