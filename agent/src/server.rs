//! Starting and stopping an agent: establishes its identity, then runs the sync loop, the SVID
//! manager, agent SVID renewal, the Workload API on its socket, and the health endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use ward_spiffe::{Clock, SystemClock};

use crate::attest::UnixAttestor;
use crate::cache::Cache;
use crate::config::AgentConfig;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::workload::WorkloadApi;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Identity could not be established.
    #[error("{0}")]
    Identity(#[from] crate::identity::IdentityError),
    /// Inconsistent configuration.
    #[error("{0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// Which.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

impl StartError {
    /// The CLI exit code: [`crate::cli::EXIT_CANNOT_LISTEN`] for an address or socket in use or
    /// not permitted, 2 for inconsistent configuration, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        use std::io::ErrorKind as K;
        match self {
            StartError::Bind { source, .. }
                if matches!(
                    source.kind(),
                    K::AddrInUse | K::AddrNotAvailable | K::PermissionDenied
                ) =>
            {
                crate::cli::EXIT_CANNOT_LISTEN
            }
            StartError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The cache (tests read it).
    pub cache: Arc<Cache>,
    /// The agent identity.
    pub identity: Arc<Identity>,
    /// Workload API socket.
    pub socket_path: PathBuf,
    /// Health endpoint address.
    pub health_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Starts an agent with the system clock.
    pub async fn start(cfg: AgentConfig) -> Result<Self, StartError> {
        Self::start_with_clock(cfg, Arc::new(SystemClock)).await
    }

    /// Starts an agent with an injected clock.
    pub async fn start_with_clock(
        cfg: AgentConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartError> {
        let identity = Arc::new(Identity::establish(&cfg, clock.clone()).await?);
        let cache = Arc::new(Cache::new());
        let metrics = Metrics::new();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let stop = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let spawn_until = |fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
                           rx: watch::Receiver<bool>| {
            tokio::spawn(async move {
                tokio::select! {
                    _ = fut => {}
                    _ = stop(rx) => {}
                }
            })
        };
        tasks.push(spawn_until(
            Box::pin(crate::sync::run(
                cache.clone(),
                identity.clone(),
                metrics.clone(),
            )),
            shutdown_rx.clone(),
        ));
        tasks.push(spawn_until(
            Box::pin(crate::manager::run(
                cache.clone(),
                identity.clone(),
                clock.clone(),
                metrics.clone(),
            )),
            shutdown_rx.clone(),
        ));
        tasks.push(spawn_until(
            Box::pin(identity.clone().renewal_loop(metrics.clone())),
            shutdown_rx.clone(),
        ));

        let kubelet = match &cfg.k8s {
            Some(k) => Some(Arc::new(
                crate::k8s::Kubelet::new(k.clone(), &cfg.unix.proc_root)
                    .map_err(StartError::Config)?,
            )),
            None => None,
        };
        // Workload API.
        let listener =
            ward_net::unix::bind_unix(&cfg.socket_path, 0o755, 0o777).map_err(|source| {
                StartError::Bind {
                    what: format!("Workload API socket {}", cfg.socket_path.display()),
                    source,
                }
            })?;
        let api = WorkloadApi::new(
            cache.subscribe(),
            UnixAttestor::new(&cfg.unix),
            identity.clone(),
            clock.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
            kubelet,
        )
        .with_limits(cfg.limits);
        let policies = ward_proto::agent::policies_server::PoliciesServer::new(
            crate::policies::PolicyService::new(api.clone()),
        );
        let destinations = ward_proto::agent::destinations_server::DestinationsServer::new(
            crate::destinations::DestinationService::new(api.clone()),
        );
        let sds = ward_proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer::new(
            crate::sds::SdsService::new(api.clone(), cfg.sds.clone()),
        );
        let svc =
            ward_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(api);
        let rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let incoming = ward_net::uds::incoming(listener, "Workload API");
            let r = tonic::transport::Server::builder()
                .layer(ward_net::refusal::RefusalLogLayer::new("agent"))
                .add_service(svc)
                .add_service(policies)
                .add_service(destinations)
                .add_service(sds)
                .serve_with_incoming_shutdown(incoming, stop(rx))
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "Workload API server stopped");
            }
        }));

        // Health: ready once synced and holding an SVID for every entry.
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let health = tokio::net::TcpListener::bind(cfg.health_address)
            .await
            .map_err(|source| StartError::Bind {
                what: format!("health address {}", cfg.health_address),
                source,
            })?;
        let health_addr = health.local_addr().map_err(|source| StartError::Bind {
            what: "health address".into(),
            source,
        })?;
        let (ready_tx, ready_rx) =
            watch::channel(Err("not synchronized with the CA yet".to_owned()));
        let mut snaps = cache.subscribe();
        tasks.push(spawn_until(
            Box::pin(async move {
                loop {
                    let s = snaps.borrow_and_update().clone();
                    let state = if !s.synced {
                        Err("not synchronized with the CA yet".to_owned())
                    } else if s.entries.keys().any(|k| !s.svids.contains_key(k)) {
                        Err("fetching SVIDs".to_owned())
                    } else {
                        Ok(())
                    };
                    ready_tx.send_if_modified(|cur| {
                        let changed = *cur != state;
                        *cur = state.clone();
                        changed
                    });
                    if snaps.changed().await.is_err() {
                        return;
                    }
                }
            }),
            shutdown_rx.clone(),
        ));
        let rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            ward_net::health::serve_admin(
                health,
                Arc::new(registry),
                ready_rx,
                Default::default(),
                stop(rx),
            )
            .await;
        }));

        tracing::info!(
            id = %identity.id().map(|i| i.to_string()).unwrap_or_default(),
            socket = %cfg.socket_path.display(),
            health = %health_addr,
            "ward-agent started"
        );
        Ok(Self {
            cache,
            identity,
            socket_path: cfg.socket_path.clone(),
            health_addr,
            shutdown,
            tasks,
        })
    }

    /// Stops every task and removes the socket. Workload API streams are long-lived, so
    /// servers get a short drain before connections are cut.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        ward_net::process::join_with_deadline(self.tasks, std::time::Duration::from_secs(2)).await;
        let _ = std::fs::remove_file(&self.socket_path);
    }
}
