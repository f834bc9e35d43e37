//! ward-proxy: Ward's sidecar. Inbound listeners accept mutual TLS from other proxies and
//! authorize every HTTP request and TCP connection before forwarding to the local application;
//! outbound listeners carry the application's plaintext to upstream proxies over mutual TLS,
//! checking the upstream's SPIFFE ID. Identity comes from the agent's Workload API or PEM
//! files; every decision goes to a hash-chained access log. `main.rs` only calls [`cli::main`].

pub mod access_log;
pub mod authz;
pub mod cli;
pub mod config;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod inject;
pub mod io;
pub mod metrics;
pub mod outbound;
pub mod server;
pub mod tls;

pub use config::ProxyConfig;
pub use server::Proxy;
