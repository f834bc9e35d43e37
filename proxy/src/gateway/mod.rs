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
pub mod secrets;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use tokio::sync::watch;
use ward_spiffe::vhost::VirtualHosts;

use crate::metrics::{CertLabel, Metrics};
use certs::{CertStore, Served};
use config::{CertFiles, GatewayCfg};
use limit::ClientLimiter;

/// Where a gateway's routes come from.
#[derive(Debug)]
enum Hosts {
    /// The configuration file: the same for every listener.
    Static(Arc<VirtualHosts>),
    /// A Kubernetes Gateway: per Gateway listener port, as the CA last sent them.
    Followed(HashMap<u16, Arc<VirtualHosts>>),
}

/// How often certificate files are looked at for changes.
const FILE_POLL: Duration = Duration::from_secs(5);

/// A gateway's state, shared by its listeners.
pub struct Gateway {
    /// The routes of the configuration (for every listener), or, following a Kubernetes
    /// Gateway, those of each Gateway listener port.
    hosts: RwLock<Hosts>,
    /// The Gateway followed (its mesh service record), if any.
    pub record: Option<String>,
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
            hosts: RwLock::new(match &cfg.kubernetes_gateway {
                None => Hosts::Static(Arc::new(hosts)),
                Some(_) => Hosts::Followed(HashMap::new()),
            }),
            record: cfg
                .kubernetes_gateway
                .as_deref()
                .and_then(config::record_name),
            tls: certs::server_config(store.clone()),
            certs: store,
            limiter: cfg.rate_limit.map(ClientLimiter::new),
            hsts,
            max_body: cfg.max_request_body_bytes,
            files: cfg.certificates.clone(),
        })
    }

    /// The routes in force for requests to Gateway listener port `port`.
    pub fn hosts(&self, port: u16) -> Arc<VirtualHosts> {
        match &*self.hosts.read().unwrap_or_else(|p| p.into_inner()) {
            Hosts::Static(h) => h.clone(),
            Hosts::Followed(m) => m.get(&port).cloned().unwrap_or_default(),
        }
    }

    /// Follows the routes of Gateway listener port `port` from the Gateway's mesh service
    /// record, through the agent at `socket`, until `stop`. Routes that cannot be compiled
    /// leave the last good ones in force (logged); a record that is gone leaves none (404).
    pub async fn follow_routes(
        self: Arc<Self>,
        socket: std::path::PathBuf,
        port: u16,
        mut stop: watch::Receiver<bool>,
    ) {
        let Some(record) = self.record.clone() else {
            return;
        };
        let authority = format!("{record}:{port}");
        let follow = crate::discover::updates(&socket, &authority, |u| {
            use ward_proto::agent::destination_update::Kind;
            let routes = match u.kind {
                Some(Kind::Endpoints(e)) => e.routes,
                Some(Kind::NoEndpoints(n)) => n.routes,
                Some(Kind::NoSuchService(_)) | None => Vec::new(),
            };
            let compiled = ward_proto::convert::routes_from_proto(&routes)
                .and_then(|r| VirtualHosts::compile(&r).map_err(|e| e.to_string()));
            match compiled {
                Ok(h) => {
                    tracing::info!(gateway = %record, port, routes = routes.len(), "gateway routes updated");
                    let mut hosts = self.hosts.write().unwrap_or_else(|p| p.into_inner());
                    if let Hosts::Followed(m) = &mut *hosts {
                        m.insert(port, Arc::new(h));
                    }
                }
                Err(e) => {
                    tracing::warn!(gateway = %record, port, error = %e,
                        "gateway routes from the CA cannot be used; the previous ones stay in force");
                }
            }
            true
        });
        tokio::select! {
            () = follow => {}
            _ = ward_net::process::until_set(&mut stop) => {}
        }
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
        let hosts: Vec<String> = match &*self.hosts.read().unwrap_or_else(|p| p.into_inner()) {
            Hosts::Static(h) => h.exact_hostnames().map(str::to_owned).collect(),
            Hosts::Followed(m) => {
                let mut v: Vec<String> = m
                    .values()
                    .flat_map(|h| h.exact_hostnames().map(str::to_owned))
                    .collect();
                v.sort();
                v.dedup();
                v
            }
        };
        serde_json::json!({
            "kubernetes_gateway": self.record,
            "certificates": certs,
            "route_hostnames": hosts,
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
