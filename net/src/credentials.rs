//! The one credential sink of a process: every source of an SVID (the CA's own issuance, the
//! agent's attestation, the Workload API stream, PEM files) hands it here. The sink checks the
//! new chain against the current bundle, builds fresh rustls configs, and publishes them over a
//! `watch` channel. Live connections keep the config they were made with, so rotation never
//! drops them; new handshakes pick up the newest config.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;
use ward_spiffe::x509::{self, Usage};
use ward_spiffe::{Bundle, SpiffeId};
use zeroize::Zeroizing;

use crate::verify::{
    PeerError, PeerPolicy, SpiffeClientVerifier, SpiffeServerVerifier, TrustStore,
};

/// An X.509-SVID with its private key.
#[derive(Clone)]
pub struct Svid {
    /// The SVID's ID.
    pub id: SpiffeId,
    /// DER chain, leaf first (no root).
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER private key; wiped when the last copy is dropped.
    pub key: Arc<Zeroizing<Vec<u8>>>,
    /// Leaf expiry.
    pub not_after: SystemTime,
    /// Leaf start of validity.
    pub not_before: SystemTime,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// Builds an SVID from DER parts, reading the ID and validity from the leaf.
    pub fn from_parts(chain: Vec<Vec<u8>>, key_pkcs8: Vec<u8>) -> Result<Self, CredentialError> {
        let leaf = chain
            .first()
            .ok_or(CredentialError::Svid(x509::SvidError::EmptyChain))?;
        let info = x509::check_leaf(leaf, x509::Profile::Peer)?;
        Ok(Self {
            id: info.id,
            chain: chain.into_iter().map(CertificateDer::from).collect(),
            key: Arc::new(Zeroizing::new(key_pkcs8)),
            not_after: info.not_after,
            not_before: info.not_before,
        })
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.as_slice().to_vec()))
    }
}

/// Whether a server requires client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Handshakes without a client certificate fail.
    Required,
    /// Clients may connect without one; the application decides.
    Optional,
}

/// How the sink builds its configs.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Which clients our servers accept.
    pub accept_clients: PeerPolicy,
    /// Whether client certificates are required.
    pub client_auth: ClientAuth,
    /// Which servers our clients accept.
    pub accept_servers: PeerPolicy,
    /// ALPN protocols offered on both sides (e.g. `h2` for gRPC).
    pub alpn: Vec<Vec<u8>>,
    /// Also speak TLS 1.2 (for a non-Ward peer that cannot speak 1.3; under TLS 1.2 the client
    /// certificate, the caller's identity, crosses the wire in the clear). Default: 1.3 only.
    pub tls12: bool,
}

/// The protocol versions of Ward's TLS: 1.3, and 1.2 only where a setting allows it.
fn versions(tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    if tls12 { &BOTH } else { &TLS13_ONLY }
}

/// The configs built from one SVID.
#[derive(Debug)]
pub struct TlsConfigs {
    /// Our identity.
    pub id: SpiffeId,
    /// For accepting connections.
    pub server: Arc<ServerConfig>,
    /// For opening connections.
    pub client: Arc<ClientConfig>,
    /// When the SVID expires.
    pub not_after: SystemTime,
    /// The SVID itself.
    pub svid: Svid,
}

/// Why the sink refused an update.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The SVID breaks a rule or does not chain to our bundle.
    #[error("SVID rejected: {0}")]
    Svid(#[from] x509::SvidError),
    /// The chain does not verify against the current trust store.
    #[error("SVID rejected: {0}")]
    Peer(#[from] PeerError),
    /// rustls refused the key or chain.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A bundle with no X.509 authorities would trust nothing.
    #[error("bundle for {0} has no X.509 authorities")]
    EmptyBundle(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Publishes fresh rustls configs whenever the SVID changes.
#[derive(Debug)]
pub struct CredentialSink {
    trust: Arc<TrustStore>,
    settings: TlsSettings,
    tx: watch::Sender<Option<Arc<TlsConfigs>>>,
}

impl CredentialSink {
    /// A sink with no SVID yet, trusting what `trust` holds.
    pub fn new(trust: Arc<TrustStore>, settings: TlsSettings) -> Self {
        let (tx, _) = watch::channel(None);
        Self {
            trust,
            settings,
            tx,
        }
    }

    /// The trust store the verifiers read.
    pub fn trust(&self) -> Arc<TrustStore> {
        self.trust.clone()
    }

    /// Receives every published config (`None` until the first SVID).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<TlsConfigs>>> {
        self.tx.subscribe()
    }

    /// The current configs.
    pub fn current(&self) -> Option<Arc<TlsConfigs>> {
        self.tx.borrow().clone()
    }

    /// Replaces a bundle. A bundle without X.509 authorities is refused (it would lock every
    /// peer out).
    ///
    /// A bundle that changes also replaces the published configs (same SVID, fresh rustls
    /// configs): resumed TLS sessions skip certificate verification, so every session cache
    /// and ticket made under the old bundle goes with it — a peer whose root was just revoked
    /// cannot get back in by resuming. This holds whatever the new bundle means for our own
    /// SVID (a new one is published when it arrives).
    pub fn update_bundle(&self, bundle: Bundle) -> Result<(), CredentialError> {
        if bundle.x509_authorities.is_empty() {
            return Err(CredentialError::EmptyBundle(
                bundle.trust_domain.to_string(),
            ));
        }
        if !self.trust.set(bundle) {
            return Ok(());
        }
        if let Some(cur) = self.current() {
            let configs = TlsConfigs {
                id: cur.id.clone(),
                server: self.server_config(&cur.svid)?,
                client: self.client_config(Some(&cur.svid))?,
                not_after: cur.not_after,
                svid: cur.svid.clone(),
            };
            self.tx.send_replace(Some(Arc::new(configs)));
        }
        Ok(())
    }

    /// Validates `svid` against the current bundle of its trust domain at `now` and publishes
    /// configs built from it.
    pub fn update_svid(&self, svid: Svid, now: SystemTime) -> Result<(), CredentialError> {
        let unix = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        for usage in [Usage::Server, Usage::Client] {
            crate::verify::verify_peer(
                &self.trust,
                &PeerPolicy::OneOf(vec![svid.id.clone()]),
                &svid.chain[0],
                &svid.chain[1..],
                unix,
                usage,
            )?;
        }
        let server = self.server_config(&svid)?;
        let client = self.client_config(Some(&svid))?;
        let configs = TlsConfigs {
            id: svid.id.clone(),
            server,
            client,
            not_after: svid.not_after,
            svid,
        };
        self.tx.send_replace(Some(Arc::new(configs)));
        Ok(())
    }

    fn server_config(&self, svid: &Svid) -> Result<Arc<ServerConfig>, CredentialError> {
        build_server_config(
            self.trust.clone(),
            self.settings.accept_clients.clone(),
            self.settings.client_auth,
            svid,
            self.settings.alpn.clone(),
            self.settings.tls12,
        )
    }

    /// Whether TLS 1.2 is allowed besides 1.3.
    pub fn tls12(&self) -> bool {
        self.settings.tls12
    }

    /// A client config that presents `svid` (or no certificate) and verifies servers by the
    /// sink's policy.
    pub fn client_config(&self, svid: Option<&Svid>) -> Result<Arc<ClientConfig>, CredentialError> {
        build_client_config(
            self.trust.clone(),
            self.settings.accept_servers.clone(),
            svid,
            self.settings.alpn.clone(),
            self.settings.tls12,
        )
    }
}

/// A server config presenting `svid` and verifying clients by `accept` against `trust`.
pub fn build_server_config(
    trust: Arc<TrustStore>,
    accept: PeerPolicy,
    client_auth: ClientAuth,
    svid: &Svid,
    alpn: Vec<Vec<u8>>,
    tls12: bool,
) -> Result<Arc<ServerConfig>, CredentialError> {
    let verifier = SpiffeClientVerifier::new(trust, accept, client_auth == ClientAuth::Required);
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(tls12))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(svid.chain.clone(), svid.private_key())?;
    cfg.alpn_protocols = alpn;
    Ok(Arc::new(cfg))
}

/// A client config presenting `svid` (or nothing) and verifying servers by `accept`.
pub fn build_client_config(
    trust: Arc<TrustStore>,
    accept: PeerPolicy,
    svid: Option<&Svid>,
    alpn: Vec<Vec<u8>>,
    tls12: bool,
) -> Result<Arc<ClientConfig>, CredentialError> {
    let verifier = SpiffeServerVerifier::new(trust, accept);
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(tls12))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut cfg = match svid {
        Some(s) => builder.with_client_auth_cert(s.chain.clone(), s.private_key())?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn;
    Ok(Arc::new(cfg))
}
