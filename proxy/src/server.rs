//! Starting and stopping a proxy: identity source, policies, access log, listeners, admin.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use ward_net::CredentialSink;

use crate::authz::Authz;
use crate::config::ProxyConfig;
use crate::inbound::InboundCtx;
use crate::metrics::Metrics;
use crate::outbound::OutboundCtx;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A policy file is invalid.
    #[error("policies: {0}")]
    Policy(String),
    /// The access log cannot be opened.
    #[error("access log: {0}")]
    AccessLog(String),
    /// A listener could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// Which.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Inconsistent configuration.
    #[error("{0}")]
    Config(String),
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    /// Its credentials.
    pub sink: Arc<CredentialSink>,
    /// Its authorizer.
    pub authz: Arc<Authz>,
    /// Its metrics.
    pub metrics: Metrics,
    /// Admin endpoint.
    pub admin_addr: SocketAddr,
    /// Bound inbound listeners by name.
    pub inbound: Vec<(String, SocketAddr)>,
    /// Bound outbound listeners by name.
    pub outbound: Vec<(String, SocketAddr)>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(what: String, addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, source })
}

impl Proxy {
    /// Starts every part of the proxy.
    pub async fn start(cfg: ProxyConfig) -> Result<Self, StartError> {
        let metrics = Metrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = Vec::new();

        let sink = crate::identity::new_sink();
        tasks.push(tokio::spawn(crate::identity::run(
            cfg.identity.clone(),
            sink.clone(),
            metrics.clone(),
            stop.clone(),
        )));

        let authz = Arc::new(Authz::new(&cfg.authorization, metrics.clone()));
        let files = &cfg.authorization.policy_files;
        let initial = crate::authz::read_policy_files(files).map_err(StartError::Policy)?;
        authz
            .set_file_policies(initial)
            .map_err(StartError::Policy)?;
        if !files.is_empty() {
            tasks.push(tokio::spawn(crate::authz::watch_files(
                authz.clone(),
                files.clone(),
                cfg.authorization.reload_interval,
                stop.clone(),
            )));
        }

        if cfg.authorization.from_agent
            && let crate::config::IdentitySource::WorkloadApi { socket, spiffe_id } = &cfg.identity
        {
            let path = socket.clone().unwrap_or_default();
            let path = std::path::PathBuf::from(
                path.trim_start_matches("unix://")
                    .trim_start_matches("unix:"),
            );
            tasks.push(tokio::spawn(crate::authz::watch_agent(
                authz.clone(),
                path,
                spiffe_id.clone(),
                stop.clone(),
            )));
        }

        let log = match &cfg.access_log {
            Some(a) => Some(
                crate::access_log::start(&a.path, a.max_bytes, a.queue, metrics.clone())
                    .map_err(|e| StartError::AccessLog(format!("{}: {e}", a.path.display())))?,
            ),
            None => None,
        };

        let mut inbound = Vec::new();
        for l in &cfg.inbound {
            let listener = bind(format!("inbound {}", l.name), l.listen).await?;
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                what: l.name.clone(),
                source,
            })?;
            let ctx = InboundCtx::new(
                l.clone(),
                addr.port(),
                sink.clone(),
                authz.clone(),
                log.clone(),
                metrics.clone(),
                &cfg.peer_id_header,
            )
            .map_err(StartError::Config)?;
            tasks.push(tokio::spawn(crate::inbound::serve(
                listener,
                Arc::new(ctx),
                stop.clone(),
            )));
            inbound.push((l.name.clone(), addr));
        }
        let mut outbound = Vec::new();
        for l in &cfg.outbound {
            let listener = bind(format!("outbound {}", l.name), l.listen).await?;
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                what: l.name.clone(),
                source,
            })?;
            let ctx = OutboundCtx::new(l.clone(), sink.clone(), log.clone(), metrics.clone());
            tasks.push(tokio::spawn(crate::outbound::serve(
                listener,
                Arc::new(ctx),
                stop.clone(),
            )));
            outbound.push((l.name.clone(), addr));
        }

        // Ready once an SVID is held.
        let admin = bind("admin address".into(), cfg.admin_address).await?;
        let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
            what: "admin".into(),
            source,
        })?;
        let (ready_tx, ready_rx) = watch::channel(Err("no SVID yet".to_owned()));
        let mut svids = sink.subscribe();
        let mut s = stop.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let held = svids.borrow_and_update().is_some();
                let _ = ready_tx.send_replace(if held {
                    Ok(())
                } else {
                    Err("no SVID yet".into())
                });
                tokio::select! {
                    r = svids.changed() => if r.is_err() { return },
                    _ = ward_net::process::until_set(&mut s) => return,
                }
            }
        }));
        let mut s = stop.clone();
        tasks.push(tokio::spawn(async move {
            ward_net::health::serve_admin(admin, Arc::new(registry), ready_rx, async move {
                ward_net::process::until_set(&mut s).await;
            })
            .await;
        }));
        tracing::info!(admin = %admin_addr, ?inbound, ?outbound, "ward-proxy started");
        Ok(Self {
            sink,
            authz,
            metrics,
            admin_addr,
            inbound,
            outbound,
            shutdown,
            tasks,
        })
    }

    /// The address of an inbound listener.
    pub fn inbound_addr(&self, name: &str) -> Option<SocketAddr> {
        self.inbound
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// The address of an outbound listener.
    pub fn outbound_addr(&self, name: &str) -> Option<SocketAddr> {
        self.outbound
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// Stops accepting and stops background tasks; open connections end with the process.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        ward_net::process::join_with_deadline(self.tasks, std::time::Duration::from_secs(2)).await;
    }
}
