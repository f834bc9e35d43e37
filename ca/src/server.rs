//! Starting and stopping a CA: opens the store and keys, builds the core, and serves the node
//! API (TLS), the admin API (Unix socket) and the health endpoint, with the background tasks
//! that rotate authorities, renew the CA's own server SVID and compact the change log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use ward_net::{ClientAuth, CredentialSink, PeerPolicy, Svid, TlsSettings, TrustStore};
use ward_spiffe::{Clock, SystemClock};
use ward_store::{EtcdStore, Store};

use crate::admin_api::AdminService;
use crate::config::CaConfig;
use crate::core::CaCore;
use crate::keys::DiskKeyManager;
use crate::node_api::NodeService;

/// Why the CA could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Filesystem problem with the data directory.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The store cannot be opened or is not ours.
    #[error("{0}")]
    Store(String),
    /// Keys or authorities are unusable.
    #[error("{0}")]
    Authority(String),
    /// A listener could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

impl StartError {
    /// The CLI exit code for this failure: [`crate::cli::EXIT_CANNOT_LISTEN`] for an address
    /// or socket that is in use or not permitted, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Bind { source, .. } if cannot_listen(source) => {
                crate::cli::EXIT_CANNOT_LISTEN
            }
            _ => 1,
        }
    }
}

/// An operator's problem with a listen address, rather than a fault of the CA.
pub(crate) fn cannot_listen(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::AddrInUse | K::AddrNotAvailable | K::PermissionDenied
    )
}

/// How often authorities are checked for rotation.
const MAINTAIN_EVERY: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight calls before cutting connections.
pub const DRAIN: Duration = Duration::from_secs(5);
/// Change records kept for incremental agent resync.
const KEEP_CHANGES: u64 = 100_000;

/// A running CA.
#[derive(Debug)]
pub struct CaServer {
    /// The core (for in-process callers such as `ward-ca dev` and tests).
    pub core: Arc<CaCore>,
    /// Where the node API listens.
    pub node_addr: SocketAddr,
    /// Where `/metrics`, `/healthz`, `/readyz` are served.
    pub health_addr: SocketAddr,
    /// Where OIDC discovery is served, if configured.
    pub oidc_addr: Option<SocketAddr>,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// The bundle file agents can bootstrap from.
    pub bundle_path: PathBuf,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl CaServer {
    /// Starts a CA with the system clock.
    pub async fn start(cfg: CaConfig) -> Result<Self, StartError> {
        Self::start_with_clock(cfg, Arc::new(SystemClock)).await
    }

    /// Starts a CA with an injected clock.
    pub async fn start_with_clock(
        cfg: CaConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartError> {
        use std::os::unix::fs::PermissionsExt;
        for w in cfg.warnings() {
            tracing::warn!("{w}");
        }
        let dd = |source| StartError::DataDir {
            path: cfg.data_dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&cfg.data_dir).map_err(dd)?;
        std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(dd)?;

        let opened = crate::store_open::open(&cfg)
            .await
            .map_err(StartError::Store)?;
        let store: Arc<dyn Store> = opened.store.clone();
        crate::db::check_schema(store.as_ref(), &opened.name)
            .await
            .map_err(|e| StartError::Store(e.to_string()))?;
        let keys = Arc::new(
            DiskKeyManager::open(&cfg.data_dir.join("keys"))
                .map_err(|e| StartError::Authority(e.to_string()))?,
        );
        let core = Arc::new(
            CaCore::open(cfg.clone(), store, keys, clock.clone())
                .await
                .map_err(|e| StartError::Authority(e.to_string()))?,
        );

        let bundle_path = cfg.data_dir.join("bundle.pem");
        write_atomic(&bundle_path, core.bundle().x509_pem().as_bytes()).map_err(dd)?;

        // The CA's own TLS identity.
        let trust = Arc::new(TrustStore::new());
        let sink = Arc::new(CredentialSink::new(
            trust,
            TlsSettings {
                accept_clients: PeerPolicy::TrustDomain(cfg.trust_domain.clone()),
                client_auth: ClientAuth::Optional,
                accept_servers: PeerPolicy::TrustDomain(cfg.trust_domain.clone()),
                alpn: vec![b"h2".to_vec()],
                tls12: false,
            },
        ));
        sink.update_bundle((*core.bundle()).clone())
            .map_err(|e| StartError::Authority(e.to_string()))?;
        refresh_server_svid(&core, &sink).map_err(|e| StartError::Authority(e.to_string()))?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        // Node API.
        let listener = tokio::net::TcpListener::bind(cfg.bind_address)
            .await
            .map_err(|source| StartError::Bind {
                what: format!("node API address {}", cfg.bind_address),
                source,
            })?;
        let node_addr = listener.local_addr().map_err(dd)?;
        let incoming = ward_net::tls_incoming(listener, sink.subscribe(), None);
        let svc = ward_proto::node::node_server::NodeServer::new(NodeService::new(core.clone()))
            .max_decoding_message_size(cfg.limits.node_api_max_message_bytes);
        let refusals = |api: &'static str| -> ward_net::refusal::RefusalCounter {
            let m = core.metrics.clone();
            std::sync::Arc::new(move |_server, code| {
                m.api_refusals
                    .get_or_create(&crate::metrics::RefusalLabel {
                        api: api.into(),
                        code: format!("{code:?}"),
                    })
                    .inc();
            })
        };
        let node_refusals = refusals("node");
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .layer(ward_net::refusal::RefusalLogLayer::new("node API").counted(node_refusals))
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "node API server stopped");
            }
        }));

        // Admin API.
        let admin_socket = cfg.admin_socket_path();
        let admin_listener =
            ward_net::unix::bind_unix(&admin_socket, 0o700, 0o600).map_err(|source| {
                StartError::Bind {
                    what: format!("admin socket {}", admin_socket.display()),
                    source,
                }
            })?;
        let admin =
            ward_proto::admin::admin_server::AdminServer::new(AdminService::new(core.clone()))
                .max_decoding_message_size(cfg.limits.admin_api_max_message_bytes);
        let admin_refusals = refusals("admin");
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let incoming = ward_net::uds::incoming(admin_listener, "admin");
            let r = tonic::transport::Server::builder()
                .layer(ward_net::refusal::RefusalLogLayer::new("admin API").counted(admin_refusals))
                .add_service(admin)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "admin API server stopped");
            }
        }));

        // OIDC discovery.
        let mut oidc_addr = None;
        if let Some(o) = &cfg.oidc {
            let l = tokio::net::TcpListener::bind(o.bind_address)
                .await
                .map_err(|source| StartError::Bind {
                    what: format!("oidc.bind_address {}", o.bind_address),
                    source,
                })?;
            oidc_addr = Some(l.local_addr().map_err(dd)?);
            let mut rx = shutdown_rx.clone();
            tasks.push(tokio::spawn(crate::oidc::serve(
                l,
                core.clone(),
                o.clone(),
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
            )));
        }

        // Health and metrics.
        let mut registry = Registry::default();
        core.metrics.register(&mut registry);
        let health = tokio::net::TcpListener::bind(cfg.health_address)
            .await
            .map_err(|source| StartError::Bind {
                what: format!("health address {}", cfg.health_address),
                source,
            })?;
        let health_addr = health.local_addr().map_err(dd)?;
        let (ready_tx, ready_rx) = watch::channel(Ok(()));
        if let Some(etcd) = opened.etcd.clone() {
            tasks.push(tokio::spawn(store_readiness(
                etcd,
                core.metrics.store_watch_rereads.clone(),
                ready_tx.clone(),
                shutdown_rx.clone(),
            )));
        }
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            ward_net::health::serve_admin(
                health,
                Arc::new(registry),
                ready_rx,
                Default::default(),
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
            )
            .await;
            drop(ready_tx);
        }));

        // Background: rotation, bundle publication, server SVID renewal, log compaction.
        let mut rx = shutdown_rx.clone();
        let (c, s, bp) = (core.clone(), sink.clone(), bundle_path.clone());
        let lead = core.leadership.clone();
        tasks.push(tokio::spawn(async move {
            let mut sets = c.authorities.watch();
            let mut published = sets.borrow_and_update().bundle.sequence;
            // Short SVID lifetimes (tests, demos) need a faster tick than the default.
            let every = MAINTAIN_EVERY
                .min(c.cfg.ttl.x509_svid / 4)
                .max(Duration::from_millis(250));
            let mut tick = tokio::time::interval(every);
            let mut compact = 0u32;
            let mut renew_at = server_renew_at(&c, &s);
            let mut others = c.authorities.record_changes();
            loop {
                tokio::select! {
                    alive = others.changed() => {
                        if !alive { return; }
                        // Another replica's (or this one's) authority write: rebuild at once.
                        if let Err(e) = c.authorities.refresh().await {
                            tracing::error!(error = %e, "authority refresh failed");
                        }
                    }
                    _ = tick.tick() => {
                        if let Err(e) = c.authorities.maintain().await {
                            tracing::error!(error = %e, "authority maintenance failed");
                        }
                        if c.clock.now() >= renew_at {
                            match refresh_server_svid(&c, &s) {
                                Ok(()) => renew_at = server_renew_at(&c, &s),
                                Err(e) => tracing::error!(error = %e, "CA server SVID renewal failed"),
                            }
                        }
                        compact += 1;
                        if compact.is_multiple_of(30) && lead.is_leader() {
                            // Singleton work: every write carries the leadership fence.
                            if let Err(e) = c.entries.fenced(lead.fence()).compact_changes(KEEP_CHANGES).await {
                                tracing::warn!(error = %e, "change log compaction failed");
                            }
                            let fenced = ward_store::Fenced::new(c.store.clone(), lead.fence());
                            match crate::audit::prune(&fenced, c.clock.now(), c.cfg.audit.retention).await {
                                Ok(p) if p.records + p.expired > 0 => tracing::info!(records = p.records, expired = p.expired, "issuance log pruned"),
                                Ok(_) => {}
                                Err(e) => tracing::warn!(error = %e, "issuance log pruning failed"),
                            }
                            if let Err(e) = c.agents.fenced(lead.fence()).prune_tokens(c.clock.now()).await {
                                tracing::warn!(error = %e, "join token pruning failed");
                            }
                        }
                        c.update_gauges();
                    }
                    r = sets.changed() => {
                        if r.is_err() { return; }
                        let set = sets.borrow_and_update().clone();
                        // A new active authority, a taint or a revocation: the CA's own server
                        // SVID moves to the active authority first, so that it still verifies
                        // against the new bundle when the TLS configuration takes it.
                        match refresh_server_svid(&c, &s) {
                            Ok(()) => renew_at = server_renew_at(&c, &s),
                            Err(e) => tracing::error!(error = %e, "CA server SVID renewal failed"),
                        }
                        if set.bundle.sequence != published {
                            published = set.bundle.sequence;
                            if let Err(e) = s.update_bundle((*set.bundle).clone()) {
                                tracing::error!(error = %e, "bundle refused by the CA's TLS");
                            }
                            if let Err(e) = write_atomic(&bp, set.bundle.x509_pem().as_bytes()) {
                                tracing::error!(error = %e, "cannot write bundle file");
                            }
                        }
                        c.update_gauges();
                    }
                    _ = async { let _ = rx.wait_for(|s| *s).await; } => return,
                }
            }
        }));

        // Kubernetes identity controllers and bundle ConfigMaps: on the leader only.
        let singletons = {
            let core = core.clone();
            move |stop: watch::Receiver<bool>| singleton_tasks(&core, &stop)
        };
        // Singleton work (Kubernetes controllers, the bundle ConfigMap, change-log
        // compaction) runs on one elected replica; an embedded store's only one leads at once.
        tasks.push(tokio::spawn(while_leading(
            core.leadership.clone(),
            core.metrics.leader.clone(),
            shutdown_rx.clone(),
            singletons,
        )));

        tracing::info!(
            trust_domain = %cfg.trust_domain,
            node_api = %node_addr,
            admin_socket = %admin_socket.display(),
            health = %health_addr,
            "ward-ca started"
        );
        Ok(Self {
            core,
            node_addr,
            health_addr,
            oidc_addr,
            admin_socket,
            bundle_path,
            shutdown,
            tasks,
        })
    }

    /// Stops every server and task. Servers drain in-flight calls for up to
    /// [`DRAIN`]; long-lived streams (agent sync) are then cut.
    pub async fn shutdown(self) {
        self.core.stopping.send_replace(true);
        let _ = self.shutdown.send(true);
        ward_net::process::join_with_deadline(self.tasks, DRAIN).await;
    }
}

/// Half of the remaining life of the CA's current server SVID, from now.
fn server_renew_at(core: &CaCore, sink: &CredentialSink) -> std::time::SystemTime {
    let now = core.clock.now();
    sink.current().map_or(now, |cur| {
        now + cur.svid.not_after.duration_since(now).unwrap_or_default() / 2
    })
}

fn refresh_server_svid(core: &CaCore, sink: &CredentialSink) -> Result<(), String> {
    let (chain, key) = core.issue_server_svid().map_err(|e| e.to_string())?;
    let svid = Svid::from_parts(chain, key).map_err(|e| e.to_string())?;
    sink.update_svid(svid, core.clock.now())
        .map_err(|e| e.to_string())
}

/// How often a shared store's reachability is checked for `/readyz`.
const STORE_PROBE_EVERY: Duration = Duration::from_secs(1);

/// Keeps `/readyz` failing while the etcd cluster cannot be read or the watch that follows
/// other replicas is down (the CA would serve stale state); requests meanwhile fail with
/// `UNAVAILABLE` on their own. Logs each change of state once.
async fn store_readiness(
    etcd: Arc<EtcdStore>,
    rereads: prometheus_client::metrics::counter::Counter,
    ready: watch::Sender<Result<(), String>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(STORE_PROBE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let seen = etcd.watch_rereads();
        rereads.inc_by(seen.saturating_sub(rereads.get()));
        let state = match etcd.get(crate::db::SCHEMA_KEY).await {
            Err(e) => Err(format!("store unreachable: {e}")),
            Ok(_) if !etcd.watching() => {
                Err("store: the etcd watch that follows other replicas is not connected".into())
            }
            Ok(_) => Ok(()),
        };
        let changed = ready.send_if_modified(|cur| {
            if *cur == state {
                return false;
            }
            *cur = state.clone();
            true
        });
        if changed {
            match &state {
                Err(reason) => tracing::warn!(%reason, "not ready"),
                Ok(()) => tracing::info!("store reachable again; ready"),
            }
        }
    }
}

/// The singleton tasks of every configured cluster, stopped by `stop`.
fn singleton_tasks(
    core: &Arc<CaCore>,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for cluster in core.clusters.all() {
        let cc = cluster.config();
        if let (Some(target), Some(client)) = (&cc.bundle_config_map, cluster.client()) {
            tasks.push(tokio::spawn(crate::k8s::bundle_cm::run(
                core.clone(),
                client.clone(),
                cluster.name().to_owned(),
                target.clone(),
                stop.clone(),
            )));
        }
        if !cc.controller_enabled() {
            continue;
        }
        let Some(client) = cluster.client() else {
            continue;
        };
        if cc.controller.egress {
            tasks.push(tokio::spawn(crate::k8s::egress::run(
                core.clone(),
                client.clone(),
                cluster.name().to_owned(),
                stop.clone(),
            )));
        }
        if cc.controller.services {
            tasks.push(tokio::spawn(crate::k8s::services::run(
                core.clone(),
                client.clone(),
                cluster.name().to_owned(),
                stop.clone(),
            )));
        }
        let ctl = crate::k8s::controller::Controller::new(
            core.clone(),
            client.clone(),
            cluster.name(),
            cc.controller.clone(),
        );
        tasks.push(tokio::spawn(ctl.run(stop.clone())));
    }
    tasks
}

/// Runs the singleton tasks `start` makes while this replica leads: started on election,
/// stopped (and awaited) when leadership is lost or the CA stops, started again on the next
/// election.
async fn while_leading<F>(
    leadership: Arc<ward_store::Leadership>,
    gauge: prometheus_client::metrics::gauge::Gauge,
    mut shutdown: watch::Receiver<bool>,
    start: F,
) where
    F: Fn(watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>>,
{
    let mut lead = leadership.subscribe();
    loop {
        let elected = tokio::select! {
            r = lead.wait_for(|l| *l) => r.is_ok(),
            _ = shutdown.wait_for(|s| *s) => false,
        };
        if !elected {
            leadership.resign().await;
            return;
        }
        tracing::info!("this replica leads: starting singleton work");
        gauge.set(1);
        let (stop_tx, stop_rx) = watch::channel(false);
        let tasks = start(stop_rx);
        let stopping = tokio::select! {
            _ = lead.wait_for(|l| !*l) => {
                tracing::warn!("this replica no longer leads: stopping singleton work");
                false
            }
            _ = shutdown.wait_for(|s| *s) => true,
        };
        gauge.set(0);
        let _ = stop_tx.send(true);
        ward_net::process::join_with_deadline(tasks, DRAIN).await;
        if stopping {
            // Hand over at once instead of after the lease lapses.
            leadership.resign().await;
            return;
        }
    }
}
