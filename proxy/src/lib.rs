//! ward-proxy: Ward's sidecar and the mesh's one data plane. Every listener runs the same
//! stages ([`pipeline`]): listen → TLS → detect → plan → forward → observe, and its role
//! (inbound: mTLS in, authorize, deliver to the local application; outbound: the
//! application's plaintext out to a peer proxy over mTLS, checking its SPIFFE ID) decides
//! which. Identity comes from the agent's Workload API or PEM files; every decision goes to a
//! hash-chained access log. `main.rs` only calls [`cli::main`].

pub mod access_log;
pub mod authz;
pub mod balance;
pub mod capture;
pub mod cli;
pub mod config;
pub mod detect;
pub mod discover;
pub mod egress;
pub mod forward;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod inject;
pub mod listen;
pub mod metrics;
pub mod observe;
pub mod pipeline;
pub mod plan;
pub mod refusal;
pub mod server;
pub mod tls;

pub use config::ProxyConfig;
pub use server::Proxy;
