//! Networking shared by Ward's processes: SPIFFE TLS verifiers, the credential sink that turns
//! SVIDs into rustls configs, the TLS accept loop and client connector for tonic, Unix-socket
//! binding and the connection type of gRPC servers on Unix sockets, refusal logging, and the
//! admin HTTP endpoint (metrics, health, readiness).

pub mod connector;
pub mod credentials;
pub mod duration;
pub mod health;
pub mod incoming;
#[cfg(feature = "kube")]
pub mod kube_client;
pub mod process;
pub mod ratelog;
pub mod refusal;
pub mod uds;
pub mod unix;
pub mod verify;

pub use credentials::{ClientAuth, CredentialSink, Svid, TlsConfigs, TlsSettings};
pub use incoming::{PeerInfo, tls_incoming};
pub use verify::{PeerPolicy, TrustStore};
