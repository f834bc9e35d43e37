//! The forward stage: carrying a plan out over HTTP ([`http`]) or as an opaque TCP stream
//! ([`tcp`]), through the connection pools of [`pools`].

pub mod balanced;
pub mod external;
pub mod gateway;
pub mod http;
pub mod idle;
pub mod pools;
pub mod routed;
pub mod tcp;

/// An error with its sources, `a: b: c` (hyper's client errors say little on their own).
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
