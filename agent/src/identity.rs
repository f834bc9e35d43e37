//! The agent's own identity: attestation, the persisted agent SVID, renewal at half-life, and
//! the gRPC channel to the CA that always presents the newest SVID.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::watch;
use tonic::transport::Channel;
use ward_net::{ClientAuth, CredentialSink, PeerPolicy, Svid, TlsSettings, TrustStore};
use ward_proto::node::node_client::NodeClient;
use ward_proto::node::{self, AttestRequest, JoinTokenAttestation};
use ward_spiffe::{Bundle, Clock, SpiffeId};

use crate::config::AgentConfig;
use crate::files::{DataDir, read_pem_bundle};

/// Why the agent cannot obtain or keep an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Local files or configuration.
    #[error("{0}")]
    Local(String),
    /// The CA refused or could not be reached.
    #[error("CA: {0}")]
    Ca(#[from] tonic::Status),
}

/// Makes a CSR for `key`, asking for `id` as its one URI SAN (or none).
pub fn csr(key: &KeyPair, id: Option<&SpiffeId>) -> Result<Vec<u8>, IdentityError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(id) = id {
        let uri = id
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| IdentityError::Local(e.to_string()))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
    }
    Ok(p.serialize_request(key)
        .map_err(|e| IdentityError::Local(e.to_string()))?
        .der()
        .to_vec())
}

/// The agent's identity and its channel to the CA.
#[derive(Debug)]
pub struct Identity {
    cfg: AgentConfig,
    files: DataDir,
    sink: Arc<CredentialSink>,
    channel: RwLock<Channel>,
    clock: Arc<dyn Clock>,
    generation: watch::Sender<u64>,
    /// Tainted authorities, from the sync stream: an agent SVID they signed is renewed at once.
    taints: watch::Sender<Arc<crate::cache::Taints>>,
    /// When the current SVID was installed (renewal is timed from here, not from the
    /// backdated NotBefore).
    installed_at: RwLock<SystemTime>,
}

fn server_id(cfg: &AgentConfig) -> SpiffeId {
    cfg.trust_domain
        .id_from_segments(["ward", "server"])
        .expect("ward/server is a valid SPIFFE ID path")
}

impl Identity {
    /// Loads trust and a saved SVID, or attests with the join token; returns the identity and
    /// the bundle in force.
    pub async fn establish(
        cfg: &AgentConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, IdentityError> {
        let files = DataDir::open(&cfg.data_dir).map_err(|e| {
            IdentityError::Local(format!("data_dir {}: {e}", cfg.data_dir.display()))
        })?;
        let sink = Arc::new(CredentialSink::new(
            Arc::new(TrustStore::new()),
            TlsSettings {
                accept_clients: PeerPolicy::OneOf(vec![]),
                client_auth: ClientAuth::Required,
                accept_servers: PeerPolicy::OneOf(vec![server_id(cfg)]),
                alpn: vec![b"h2".to_vec()],
                tls12: false,
            },
        ));
        let bundle = match files
            .load_bundle(&cfg.trust_domain)
            .map_err(IdentityError::Local)?
        {
            Some(b) => b,
            None => match &cfg.trust_bundle_path {
                Some(p) => read_pem_bundle(p, &cfg.trust_domain).map_err(IdentityError::Local)?,
                None => {
                    return Err(IdentityError::Local(
                        "no saved bundle and no trust_bundle_path to trust the CA with".into(),
                    ));
                }
            },
        };
        sink.update_bundle(bundle)
            .map_err(|e| IdentityError::Local(e.to_string()))?;
        let (generation, _) = watch::channel(0);
        let installed_at = RwLock::new(clock.now());
        let this = Self {
            installed_at,
            cfg: cfg.clone(),
            channel: RwLock::new(Self::make_channel(cfg, &sink)?),
            files,
            sink,
            clock,
            generation,
            taints: watch::channel(Arc::default()).0,
        };
        if !this.load_saved()? {
            this.attest().await?;
        }
        Ok(this)
    }

    fn make_channel(
        cfg: &AgentConfig,
        sink: &Arc<CredentialSink>,
    ) -> Result<Channel, IdentityError> {
        let s = sink.clone();
        let source: ward_net::connector::ConfigSource = Arc::new(move || match s.current() {
            Some(c) => Some(c.client.clone()),
            None => s.client_config(None).ok(),
        });
        ward_net::connector::tls_channel_any(&cfg.server_addresses(), source)
            .map_err(|e| IdentityError::Local(e.to_string()))
    }

    /// Uses the saved SVID if it is still valid against the trusted bundle.
    fn load_saved(&self) -> Result<bool, IdentityError> {
        let Some((chain, key)) = self.files.load_svid().map_err(IdentityError::Local)? else {
            return Ok(false);
        };
        let svid = match Svid::from_parts(chain, key) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "saved agent SVID is unusable; attesting again");
                return Ok(false);
            }
        };
        if svid.not_after <= self.clock.now() + Duration::from_secs(5) {
            tracing::warn!("saved agent SVID has expired; attesting again");
            return Ok(false);
        }
        match self.sink.update_svid(svid, self.clock.now()) {
            Ok(()) => {
                *self.installed_at.write().unwrap_or_else(|p| p.into_inner()) = self.clock.now();
                tracing::info!(id = %self.id().map(|i| i.to_string()).unwrap_or_default(), "using saved agent SVID");
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(error = %e, "saved agent SVID does not verify; attesting again");
                Ok(false)
            }
        }
    }

    /// Attests with the service-account token (Kubernetes) or the join token.
    async fn attest(&self) -> Result<(), IdentityError> {
        let method = match (&self.cfg.k8s_psat, &self.cfg.join_token) {
            (Some(p), _) => {
                let token = std::fs::read_to_string(&p.token_path).map_err(|e| {
                    IdentityError::Local(format!(
                        "service-account token {}: {e}",
                        p.token_path.display()
                    ))
                })?;
                node::attest_request::Method::K8sPsat(node::K8sPsatAttestation {
                    cluster: p.cluster.clone(),
                    token: token.trim().to_owned(),
                })
            }
            (None, Some(token)) => node::attest_request::Method::JoinToken(JoinTokenAttestation {
                token: token.clone(),
            }),
            (None, None) => {
                return Err(IdentityError::Local(
                    "the agent has no valid SVID and no join token to attest with \
                     (set WARD_AGENT_JOIN_TOKEN; create one with `ward-ca token create`)"
                        .into(),
                ));
            }
        };
        let local = |e: String| IdentityError::Local(format!("attestation key: {e}"));
        let key = match self.files.attestation_key().map_err(local)? {
            Some(der) => {
                let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der.to_vec());
                KeyPair::try_from(&der).map_err(|e| local(e.to_string()))?
            }
            None => {
                let key = KeyPair::generate().map_err(|e| local(e.to_string()))?;
                self.files
                    .save_attestation_key(&key.serialize_der())
                    .map_err(|e| local(e.to_string()))?;
                key
            }
        };
        let req = AttestRequest {
            method: Some(method),
            csr: csr(&key, None)?,
        };
        let resp = self.node().attest(req).await?.into_inner();
        let bundle = resp
            .bundle
            .as_ref()
            .ok_or_else(|| IdentityError::Local("CA sent no bundle".into()))
            .and_then(|b| {
                ward_proto::convert::bundle_from_proto(b).map_err(IdentityError::Local)
            })?;
        self.set_bundle(bundle)?;
        let svid = resp
            .svid
            .ok_or_else(|| IdentityError::Local("CA sent no SVID".into()))?;
        self.install(svid.cert_chain, key.serialize_der())?;
        if let Err(e) = self.files.clear_attestation_key() {
            tracing::warn!(error = %e, "cannot remove the saved attestation key");
        }
        tracing::info!(id = %svid.spiffe_id, "attested");
        Ok(())
    }

    fn install(&self, chain: Vec<Vec<u8>>, key: Vec<u8>) -> Result<(), IdentityError> {
        let svid = Svid::from_parts(chain.clone(), key.clone())
            .map_err(|e| IdentityError::Local(e.to_string()))?;
        self.sink
            .update_svid(svid, self.clock.now())
            .map_err(|e| IdentityError::Local(e.to_string()))?;
        *self.installed_at.write().unwrap_or_else(|p| p.into_inner()) = self.clock.now();
        self.files
            .save_svid(&chain, &key)
            .map_err(|e| IdentityError::Local(format!("saving agent SVID: {e}")))?;
        // New connections must present the new SVID: replace the channel.
        let ch = Self::make_channel(&self.cfg, &self.sink)?;
        *self.channel.write().unwrap_or_else(|p| p.into_inner()) = ch;
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Replaces the trusted bundle and saves it.
    pub fn set_bundle(&self, bundle: Bundle) -> Result<(), IdentityError> {
        self.sink
            .update_bundle(bundle.clone())
            .map_err(|e| IdentityError::Local(e.to_string()))?;
        self.files
            .save_bundle(&bundle)
            .map_err(|e| IdentityError::Local(format!("saving bundle: {e}")))
    }

    /// Records the tainted authorities; wakes the renewal loop if they changed.
    pub fn set_taints(&self, taints: Arc<crate::cache::Taints>) {
        self.taints.send_if_modified(|t| {
            let changed = **t != *taints;
            *t = taints;
            changed
        });
    }

    /// True if a tainted authority signed the current agent SVID.
    fn svid_tainted(&self) -> bool {
        let taints = self.taints.borrow().clone();
        self.sink
            .current()
            .is_some_and(|c| taints.taints_chain(&c.svid.chain))
    }

    /// A node API client on the current channel.
    pub fn node(&self) -> NodeClient<Channel> {
        let ch = self
            .channel
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        NodeClient::new(ch).max_decoding_message_size(64 * 1024 * 1024)
    }

    /// The agent SVID in use.
    pub fn svid(&self) -> Option<Svid> {
        self.sink.current().map(|c| c.svid.clone())
    }

    /// The agent's SPIFFE ID.
    pub fn id(&self) -> Option<SpiffeId> {
        self.sink.current().map(|c| c.id.clone())
    }

    /// When the current SVID should be renewed (half its lifetime).
    pub fn renew_at(&self) -> Option<SystemTime> {
        let installed = *self.installed_at.read().unwrap_or_else(|p| p.into_inner());
        self.sink.current().map(|c| {
            let life = c
                .svid
                .not_after
                .duration_since(installed)
                .unwrap_or_default();
            installed + life / 2
        })
    }

    /// Renews the agent SVID for a fresh key.
    pub async fn renew(&self) -> Result<(), IdentityError> {
        let id = self.id();
        let key = KeyPair::generate().map_err(|e| IdentityError::Local(e.to_string()))?;
        let req = node::RenewAgentRequest {
            csr: csr(&key, id.as_ref())?,
        };
        let resp = self.node().renew_agent(req).await?.into_inner();
        let svid = resp
            .svid
            .ok_or_else(|| IdentityError::Local("CA sent no SVID".into()))?;
        self.install(svid.cert_chain, key.serialize_der())?;
        tracing::info!(id = %svid.spiffe_id, "agent SVID renewed");
        Ok(())
    }

    /// Changes whenever the SVID (and so the channel) is replaced.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Keeps the agent SVID fresh: renews at half-life, retrying with backoff on failure.
    pub async fn renewal_loop(self: Arc<Self>, metrics: crate::metrics::Metrics) {
        let mut backoff = Duration::from_secs(1);
        let mut taints = self.taints.subscribe();
        loop {
            let wait = self
                .renew_at()
                .and_then(|t| t.duration_since(self.clock.now()).ok())
                .unwrap_or_default();
            tracing::debug!(?wait, "agent SVID renewal scheduled");
            let reason = if self.svid_tainted() {
                "tainted"
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => "rotation",
                    r = taints.changed() => {
                        if r.is_err() || !self.svid_tainted() {
                            continue;
                        }
                        "tainted"
                    }
                }
            };
            if reason == "tainted" {
                tracing::info!("the agent SVID's authority was tainted; renewing now");
            }
            metrics.reissued("agent", reason, 1);
            let expired = self.renew_at().is_none()
                || self
                    .sink
                    .current()
                    .is_some_and(|c| c.svid.not_after <= self.clock.now());
            let result = if expired && self.cfg.k8s_psat.is_some() {
                self.attest().await
            } else {
                match self.renew().await {
                    // The CA no longer accepts this SVID (expired, superseded by a newer
                    // instance on the node): attest again when the method allows it.
                    Err(IdentityError::Ca(s))
                        if self.cfg.k8s_psat.is_some()
                            && matches!(
                                s.code(),
                                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                            ) =>
                    {
                        tracing::warn!(error = %s.message(), "renewal refused; attesting again");
                        self.attest().await
                    }
                    r => r,
                }
            };
            match result {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "agent SVID renewal failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}
