//! Starting and stopping a proxy: identity source, policies, access log, listeners, admin.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use ward_net::CredentialSink;

use crate::authz::Authz;
use crate::config::ProxyConfig;
use crate::listen::Conns;
use crate::metrics::Metrics;
use crate::observe::Observer;
use crate::pipeline::{ListenerCtx, Shared};

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
    /// Bound listeners: name, role, address.
    pub listeners: Vec<(String, &'static str, SocketAddr)>,
    conns: Arc<Conns>,
    drain_timeout: std::time::Duration,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    log: Option<crate::access_log::AccessLog>,
}

async fn bind(what: String, addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, source })
}

fn is_capture(l: &crate::config::Listener) -> bool {
    matches!(
        l,
        crate::config::Listener::InboundCapture(_) | crate::config::Listener::OutboundCapture(_)
    )
}

/// The errors binding an IPv6 address gives where IPv6 is disabled.
fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::AddrNotAvailable) || e.raw_os_error() == Some(97) // EAFNOSUPPORT
}

impl Proxy {
    /// Starts every part of the proxy.
    pub async fn start(cfg: ProxyConfig) -> Result<Self, StartError> {
        let metrics = Metrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = Vec::new();

        let sink = crate::identity::new_sink(cfg.mesh_tls12);
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

        let egress = match &cfg.egress {
            Some(e) => Some(Arc::new(
                crate::egress::Egress::new(e).map_err(StartError::Config)?,
            )),
            None => None,
        };
        if cfg.authorization.from_agent
            && let crate::config::IdentitySource::WorkloadApi { socket, spiffe_id } = &cfg.identity
        {
            let path = agent_socket(socket);
            tasks.push(tokio::spawn(crate::authz::watch_agent(
                authz.clone(),
                egress.clone().filter(|e| e.from_agent()),
                path,
                spiffe_id.clone(),
                stop.clone(),
            )));
        }

        let log = match &cfg.access_log {
            Some(a) => Some(
                crate::access_log::start(a, Some(sink.clone()), metrics.clone())
                    .map_err(|e| StartError::AccessLog(format!("{}: {e}", a.path.display())))?,
            ),
            None => None,
        };

        let discovery = match (&cfg.discovery, &cfg.identity) {
            (Some(_), crate::config::IdentitySource::WorkloadApi { socket, spiffe_id }) => {
                let path = agent_socket(socket);
                Some(crate::discover::Discovery::new(
                    path,
                    spiffe_id.clone(),
                    cfg.discovery.map(|d| d.retries).unwrap_or_default(),
                    metrics.clone(),
                ))
            }
            _ => None,
        };
        let gateway = match &cfg.gateway {
            Some(g)
                if cfg
                    .listeners
                    .iter()
                    .any(|l| matches!(l, crate::config::Listener::Gateway(_))) =>
            {
                let gw = Arc::new(
                    crate::gateway::Gateway::new(g, &metrics).map_err(StartError::Config)?,
                );
                tasks.push(tokio::spawn(
                    gw.clone().watch_files(metrics.clone(), stop.clone()),
                ));
                if let (Some(k), Some(name)) = (&g.kubernetes, &g.kubernetes_gateway) {
                    tasks.push(tokio::spawn(crate::gateway::secrets::run(
                        gw.clone(),
                        k.clone(),
                        name.clone(),
                        metrics.clone(),
                        stop.clone(),
                    )));
                }
                if let Some(a) = &gw.acme {
                    tasks.push(tokio::spawn(a.clone().run(
                        gw.certs.clone(),
                        metrics.clone(),
                        stop.clone(),
                    )));
                }
                Some(gw)
            }
            _ => None,
        };
        let header = http::HeaderName::from_bytes(cfg.peer_id_header.as_bytes())
            .map_err(|e| StartError::Config(format!("peer_id_header: {e}")))?;
        let shared = Arc::new(Shared {
            server_tls: crate::pipeline::server_tls(sink.clone()),
            sink: sink.clone(),
            authz: authz.clone(),
            obs: Observer {
                log: log.clone(),
                metrics: metrics.clone(),
            },
            header,
            apps: Default::default(),
            upstreams: Default::default(),
            discovery,
            balancer: cfg.discovery.map(|d| d.balancer).unwrap_or_default(),
            discovery_cfg: cfg.discovery.unwrap_or_default(),
            egress,
            forward_method_override: cfg.authorization.forward_method_override,
            http_limits: cfg.http_limits,
            idle_timeout: cfg.connection_limits.idle_timeout,
            gateway,
        });
        let conns = Arc::new(Conns::default());
        let mut listeners = Vec::new();
        let mut followed_ports = std::collections::HashSet::new();
        for l in &cfg.listeners {
            let what = format!("{} listener {}", l.role(), l.name());
            let listener = match bind(what.clone(), l.listen()).await {
                Ok(x) => x,
                // A node without IPv6: the capture listeners fall back to (or skip) it.
                Err(StartError::Bind { source, .. })
                    if l.listen().is_ipv6() && no_ipv6(&source) && is_capture(l) =>
                {
                    if l.listen().ip().is_unspecified() {
                        let v4 = SocketAddr::from(([0, 0, 0, 0], l.listen().port()));
                        tracing::warn!(listener = l.name(), %v4, "no IPv6 here; listening on IPv4 only");
                        bind(what, v4).await?
                    } else {
                        tracing::warn!(listener = l.name(), "no IPv6 here; listener skipped");
                        continue;
                    }
                }
                Err(e) => return Err(e),
            };
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                what: l.name().to_owned(),
                source,
            })?;
            let ctx = Arc::new(ListenerCtx::new(l, addr.port(), shared.clone()));
            // A gateway following a Kubernetes Gateway follows the routes of the port this
            // listener serves (once per port).
            if let (
                Some(gw),
                crate::pipeline::RoleCfg::Gateway { serves_port, .. },
                crate::config::IdentitySource::WorkloadApi { socket, .. },
            ) = (&shared.gateway, &ctx.role, &cfg.identity)
                && gw.record.is_some()
                && followed_ports.insert(*serves_port)
            {
                tasks.push(tokio::spawn(gw.clone().follow_routes(
                    agent_socket(socket),
                    *serves_port,
                    stop.clone(),
                )));
            }
            let drain = conns.draining();
            let caps = cfg.connection_limits;
            // Behind a load balancer speaking the PROXY protocol every connection comes from
            // the balancer's address: only the listener's cap applies there.
            let behind_lb = matches!(&ctx.role, crate::pipeline::RoleCfg::Gateway { proxy_protocol_from, .. } if !proxy_protocol_from.is_empty());
            let per_client = (ctx.role.is_inbound() || ctx.role.is_gateway())
                .then_some(caps.per_client)
                .filter(|_| !behind_lb);
            tasks.push(tokio::spawn(crate::listen::accept_loop(
                listener,
                ctx.name.clone(),
                conns.clone(),
                crate::listen::ConnLimits::new(caps.per_listener, per_client),
                metrics.clone(),
                stop.clone(),
                move |tcp, remote| {
                    crate::pipeline::connection(ctx.clone(), tcp, remote, drain.clone())
                },
            )));
            listeners.push((l.name().to_owned(), l.role(), addr));
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
        let mut views: Vec<(&'static str, ward_net::health::View)> = Vec::new();
        if let Some(eg) = shared.egress.clone() {
            // The egress configuration in force (from the file or, with from_agent, the CA).
            views.push((
                "/egress",
                Arc::new(move || serde_json::to_string_pretty(eg.set().doc()).unwrap_or_default()),
            ));
        }
        if let Some(gw) = shared.gateway.clone() {
            views.push((
                "/gateway",
                Arc::new(move || serde_json::to_string_pretty(&gw.view()).unwrap_or_default()),
            ));
        }
        if shared.discovery.is_some() {
            let sh = shared.clone();
            views.push((
                "/destinations",
                Arc::new(move || {
                    sh.discovery
                        .as_ref()
                        .map(|d| d.view().to_string())
                        .unwrap_or_default()
                }),
            ));
            // Destinations unused for a while are let go.
            let sh = shared.clone();
            let mut s = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
                loop {
                    tokio::select! {
                        _ = tick.tick() => if let Some(d) = &sh.discovery { d.sweep() },
                        _ = ward_net::process::until_set(&mut s) => return,
                    }
                }
            }));
        }
        let mut s = stop.clone();
        tasks.push(tokio::spawn(async move {
            ward_net::health::serve_admin(
                admin,
                Arc::new(registry),
                ready_rx,
                Arc::new(views),
                async move {
                    ward_net::process::until_set(&mut s).await;
                },
            )
            .await;
        }));
        tracing::info!(admin = %admin_addr, ?listeners, "ward-proxy started");
        Ok(Self {
            sink,
            authz,
            metrics,
            admin_addr,
            listeners,
            conns,
            drain_timeout: cfg.drain_timeout,
            shutdown,
            tasks,
            log,
        })
    }

    /// The address of listener `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, a)| *a)
    }

    /// The address of an inbound listener.
    pub fn inbound_addr(&self, name: &str) -> Option<SocketAddr> {
        self.addr(name)
    }

    /// The address of an outbound listener.
    pub fn outbound_addr(&self, name: &str) -> Option<SocketAddr> {
        self.addr(name)
    }

    /// Open connection tasks (tests).
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// Stops accepting, lets open connections finish (HTTP connections close gracefully
    /// after their requests in flight) for up to `drain_timeout`, cuts the rest, then stops
    /// the background tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let cut = self.conns.drain(self.drain_timeout).await;
        if cut > 0 {
            tracing::info!(
                cut,
                "connections still open at the drain deadline were closed"
            );
        }
        ward_net::process::join_with_deadline(self.tasks, std::time::Duration::from_secs(2)).await;
        if let Some(log) = &self.log {
            // After the drain: every served request's record goes in before the close anchor.
            log.close(std::time::Duration::from_secs(5)).await;
        }
    }
}

/// The agent's socket path from the Workload API setting (`unix:///path` or a path).
fn agent_socket(socket: &Option<String>) -> std::path::PathBuf {
    let path = socket.as_deref().unwrap_or_default();
    std::path::PathBuf::from(
        path.trim_start_matches("unix://")
            .trim_start_matches("unix:"),
    )
}
