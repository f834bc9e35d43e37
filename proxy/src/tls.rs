//! Per-listener rustls configs, rebuilt from the credential sink's current SVID whenever it
//! changes. Live connections keep the config they started with.

use std::sync::{Arc, Mutex};

use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;
use ward_net::credentials::{build_client_config, build_server_config};
use ward_net::{ClientAuth, CredentialSink, PeerPolicy, TlsConfigs};

type Slot<T> = Mutex<Option<(Arc<TlsConfigs>, Arc<T>)>>;

/// Builds and caches one listener's server or client config.
pub struct ListenerTls {
    sink: Arc<CredentialSink>,
    rx: watch::Receiver<Option<Arc<TlsConfigs>>>,
    policy: PeerPolicy,
    alpn: Vec<Vec<u8>>,
    server: Slot<ServerConfig>,
    client: Slot<ClientConfig>,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ListenerTls {
    /// Configs that accept peers allowed by `policy` and offer `alpn`.
    pub fn new(sink: Arc<CredentialSink>, policy: PeerPolicy, alpn: Vec<Vec<u8>>) -> Self {
        Self {
            rx: sink.subscribe(),
            sink,
            policy,
            alpn,
            server: Mutex::new(None),
            client: Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Arc<TlsConfigs>> {
        self.rx.borrow().clone()
    }

    /// The server config for the current SVID (client certificates required).
    pub fn server(&self) -> Option<Arc<ServerConfig>> {
        let cur = self.current()?;
        let mut slot = self.server.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, cfg)) = slot.as_ref()
            && Arc::ptr_eq(k, &cur)
        {
            return Some(cfg.clone());
        }
        let cfg = build_server_config(
            self.sink.trust(),
            self.policy.clone(),
            ClientAuth::Required,
            &cur.svid,
            self.alpn.clone(),
        )
        .map_err(|e| tracing::error!(error = %e, "cannot build server TLS config"))
        .ok()?;
        *slot = Some((cur, cfg.clone()));
        Some(cfg)
    }

    /// The client config for the current SVID.
    pub fn client(&self) -> Option<Arc<ClientConfig>> {
        let cur = self.current()?;
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, cfg)) = slot.as_ref()
            && Arc::ptr_eq(k, &cur)
        {
            return Some(cfg.clone());
        }
        let cfg = build_client_config(
            self.sink.trust(),
            self.policy.clone(),
            Some(&cur.svid),
            self.alpn.clone(),
        )
        .map_err(|e| tracing::error!(error = %e, "cannot build client TLS config"))
        .ok()?;
        *slot = Some((cur, cfg.clone()));
        Some(cfg)
    }

    /// This workload's SPIFFE ID, once an SVID is held.
    pub fn own_id(&self) -> Option<ward_spiffe::SpiffeId> {
        self.current().map(|c| c.id.clone())
    }
}

/// A short reason label for a failed handshake.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "io";
    };
    if let Some(p) = ward_net::verify::peer_error(inner) {
        return p.reason();
    }
    match inner {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::NoApplicationProtocol => "no_alpn",
        _ => "tls_error",
    }
}
