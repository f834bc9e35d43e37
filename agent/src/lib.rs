//! ward-agent: the per-node agent. It attests to the CA, follows the entries it may serve,
//! keeps an SVID fresh for each, attests local workloads and serves them the SPIFFE Workload
//! API on a Unix socket, with Envoy SDS, the policies and the destinations local proxies use.
//! `main.rs` only calls [`cli::main`].

pub mod attest;
pub mod cache;
pub mod cli;
pub mod config;
pub mod destinations;
pub mod files;
pub mod helper;
pub mod identity;
pub mod k8s;
pub mod limits;
pub mod manager;
pub mod metrics;
pub mod policies;
pub mod sds;
pub mod server;
pub mod sync;
pub mod workload;

pub use config::AgentConfig;
pub use server::Agent;
