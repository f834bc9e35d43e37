//! The ingress gateway role: public HTTPS from clients outside the mesh, routed by host and path
//! to mesh services over mTLS with the gateway's own SPIFFE ID — so every backend authorizes the
//! gateway like any other caller. It runs the proxy's one pipeline (listen → TLS → detect → plan
//! → balance → forward → observe); what is its own lives here: certificates chosen by server
//! name ([`certs`]), the forwarding headers ([`forwarded`]), per-client rate limits ([`limit`]),
//! and the shared settings ([`config`]).

pub mod acme;
pub mod certs;
pub mod config;
pub mod forwarded;
pub mod limit;

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use tokio::sync::watch;
use ward_spiffe::vhost::VirtualHosts;

use crate::metrics::{CertLabel, Metrics};
use certs::{CertStore, Served};
use config::{CertFiles, GatewayCfg};
use limit::ClientLimiter;

/// How often certificate files are looked at for changes.
const FILE_POLL: Duration = Duration::from_secs(5);

/// A gateway's state, shared by its listeners.
pub struct Gateway {
    hosts: RwLock<Arc<VirtualHosts>>,
    /// The certificates served.
    pub certs: Arc<CertStore>,
    tls: Arc<rustls::ServerConfig>,
    /// Per-client rate limit, when configured.
    pub limiter: Option<ClientLimiter>,
    hsts: Option<HeaderValue>,
    /// The largest request body a client may declare.
    pub max_body: Option<u64>,
    files: Vec<CertFiles>,
    /// Certificates from ACME, when configured.
    pub acme: Option<Arc<acme::Acme>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Compiles the routes and loads the certificate files of `cfg`.
    pub fn new(cfg: &GatewayCfg, metrics: &Metrics) -> Result<Self, String> {
        let hosts = VirtualHosts::compile(&cfg.routes).map_err(|e| format!("gateway: {e}"))?;
        let store = Arc::new(CertStore::default());
        for f in &cfg.certificates {
            let s = certs::load_files(&f.cert, &f.key).map_err(|e| format!("gateway: {e}"))?;
            record_expiry(metrics, &s);
            store.put(s);
        }
        let hsts = cfg
            .hsts
            .map(|h| HeaderValue::from_str(&h.header()))
            .transpose()
            .map_err(|e| format!("gateway.hsts: {e}"))?;
        let acme = cfg
            .acme
            .as_ref()
            .map(|a| Arc::new(acme::Acme::new(a, hosts.exact_hostnames())));
        Ok(Self {
            acme,
            hosts: RwLock::new(Arc::new(hosts)),
            tls: certs::server_config(store.clone()),
            certs: store,
            limiter: cfg.rate_limit.map(ClientLimiter::new),
            hsts,
            max_body: cfg.max_request_body_bytes,
            files: cfg.certificates.clone(),
        })
    }

    /// The routes in force.
    pub fn hosts(&self) -> Arc<VirtualHosts> {
        self.hosts.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The server config of HTTPS listeners (its certificates change under it).
    pub fn tls(&self) -> Arc<rustls::ServerConfig> {
        self.tls.clone()
    }

    /// The answer to an ACME HTTP-01 challenge for `token`, while its validation runs.
    pub fn http01_answer(&self, token: &str) -> Option<String> {
        self.acme.as_ref().and_then(|a| a.tokens.get(token))
    }

    /// What `/gateway` on the admin endpoint shows: the certificates served and, with ACME,
    /// each hostname's state.
    pub fn view(&self) -> serde_json::Value {
        let certs: Vec<serde_json::Value> = self
            .certs
            .all()
            .iter()
            .map(|s| {
                serde_json::json!({
                    "origin": s.origin,
                    "names": s.names,
                    "not_after": ward_net::process::rfc3339_millis(s.not_after),
                })
            })
            .collect();
        let hosts = self.hosts();
        serde_json::json!({
            "certificates": certs,
            "route_hostnames": hosts.exact_hostnames().collect::<Vec<_>>(),
            "acme": self.acme.as_ref().map(|a| a.status()),
        })
    }

    /// The `Strict-Transport-Security` value HTTPS responses carry, when configured.
    pub fn hsts(&self) -> Option<&HeaderValue> {
        self.hsts.as_ref()
    }

    /// Re-reads certificate files when they change (a renewed Kubernetes Secret, a cron job):
    /// the new certificate serves the next handshake; one that cannot be loaded leaves the old
    /// one serving and is logged and counted.
    pub async fn watch_files(self: Arc<Self>, metrics: Metrics, mut stop: watch::Receiver<bool>) {
        let mut seen: Vec<Vec<Option<(SystemTime, u64)>>> =
            self.files.iter().map(fingerprint).collect();
        loop {
            tokio::select! {
                () = tokio::time::sleep(FILE_POLL) => {}
                _ = ward_net::process::until_set(&mut stop) => return,
            }
            for (i, f) in self.files.iter().enumerate() {
                let now = fingerprint(f);
                if now == seen[i] {
                    continue;
                }
                match certs::load_files(&f.cert, &f.key) {
                    Ok(s) => {
                        tracing::info!(cert = %f.cert.display(), names = ?s.names,
                            "gateway certificate reloaded");
                        record_expiry(&metrics, &s);
                        // Replaces the one loaded from the same file.
                        self.certs.put(s);
                        seen[i] = now;
                    }
                    // A half-written pair loads once its writing ends (the files change again); until
                    // then the old certificate serves.
                    Err(e) => {
                        tracing::warn!(cert = %f.cert.display(), error = %e,
                            "gateway certificate files changed but cannot be loaded; the old certificate keeps serving");
                        metrics
                            .gateway_cert_errors
                            .get_or_create(&CertLabel {
                                name: f.cert.display().to_string(),
                            })
                            .inc();
                        seen[i] = now;
                    }
                }
            }
        }
    }
}

fn fingerprint(f: &CertFiles) -> Vec<Option<(SystemTime, u64)>> {
    crate::identity::fingerprint(&[&f.cert, &f.key])
}

/// Sets the expiry gauge of a certificate now served.
pub fn record_expiry(metrics: &Metrics, s: &Served) {
    let secs = s
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    metrics
        .gateway_cert_expiry
        .get_or_create(&CertLabel {
            name: s.names.first().cloned().unwrap_or_default(),
        })
        .set(i64::try_from(secs).unwrap_or(i64::MAX));
}
