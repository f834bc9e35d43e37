//! SPIFFE primitives shared by every Ward component: IDs and trust domains, selectors, the
//! X.509-SVID and JWT-SVID validators, trust bundles, and the injected clock.
//!
//! This crate does no I/O and holds no keys; every decision here is a plain function over
//! plain values so that the CA, the agent and the proxy agree by construction.

pub mod bundle;
pub mod cidr;
pub mod clock;
pub mod egress;
pub mod id;
pub mod jwk;
pub mod jwt;
pub mod route;
pub mod selector;
pub mod service;
pub mod vhost;
pub mod x509;

pub use bundle::{Bundle, JwtAuthority};
pub use clock::{Clock, ManualClock, SystemClock};
pub use id::{IdError, SpiffeId, TrustDomain};
pub use selector::{Selector, SelectorSet};
pub mod policy;
