//! The CA's operations, independent of transport: attestation, agent renewal, workload SVID
//! signing and JWT minting, each with its authorization check and audit record.
//!
//! The gRPC services in `node_api` and `admin_api` only translate messages and call these.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ward_net::PeerInfo;
use ward_spiffe::x509::{self, Profile};
use ward_spiffe::{Bundle, Clock, SpiffeId};
use ward_store::{Batch, Store};

use crate::agents::{AgentRecord, AgentRepo, CallerCheck, check_caller};
use crate::audit::AuditRecord;
use crate::authority::Authorities;
use crate::config::CaConfig;
use crate::db::{self, unix};
use crate::entries::EntryRepo;
use crate::error::ApiError;
use crate::keys::KeyManager;
use crate::metrics::Metrics;

/// Most CSRs in one batch request.
pub const MAX_BATCH: usize = 1000;
/// Most audiences in one JWT request.
pub const MAX_AUDIENCES: usize = 16;

/// An issued X.509 chain with its facts.
#[derive(Debug, Clone)]
pub struct Issued {
    /// SPIFFE ID.
    pub id: SpiffeId,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// Leaf expiry.
    pub not_after: SystemTime,
    /// Hex serial.
    pub serial: String,
}

fn issued(id: SpiffeId, chain: Vec<Vec<u8>>, info: x509::LeafInfo) -> Issued {
    Issued {
        id,
        chain,
        not_after: info.not_after,
        serial: hex::encode(info.serial),
    }
}

/// Everything the CA's APIs act on.
#[derive(Debug)]
pub struct CaCore {
    /// Configuration.
    pub cfg: CaConfig,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Registration entries.
    pub entries: EntryRepo,
    /// The entry change log as sync streams read it: once per CA, in memory.
    pub feed: crate::feed::ChangeFeed,
    /// Agents and join tokens.
    pub agents: AgentRepo,
    /// Authorization policies.
    pub policies: crate::policies::PolicyRepo,
    /// The mesh's egress configuration.
    pub egress: crate::egress::EgressRepo,
    /// Mesh services.
    pub services: crate::services::ServiceRepo,
    /// Signing authorities and the bundle.
    pub authorities: Authorities,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Metrics.
    pub metrics: Metrics,
    /// Set when the CA is stopping; long-lived streams end at once.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Kubernetes clusters whose agents attest with service-account tokens.
    pub clusters: crate::k8s::psat::Clusters,
    /// Signings per agent.
    pub signing: crate::limits::SigningLimiter,
    /// This replica's standing in the election for the singleton work; its fence goes with
    /// every store write of that work.
    pub leadership: Arc<ward_store::Leadership>,
}

impl CaCore {
    /// Builds the core over an opened store (schema already checked).
    pub async fn open(
        cfg: CaConfig,
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyManager>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ApiError> {
        let indexed = crate::audit::index_log(store.as_ref(), clock.now()).await?;
        if indexed > 0 {
            tracing::info!(
                svids = indexed,
                "indexed the unexpired SVIDs of the issuance log by holder"
            );
        }
        let leadership = Arc::new(store.elect("ca-singletons", keys.holder()));
        let authorities = Authorities::open(&cfg, store.clone(), keys, clock.clone()).await?;
        let metrics = Metrics::new();
        let clusters = crate::k8s::psat::Clusters::new(
            &cfg.kubernetes.clusters,
            &metrics.jwks_refresh_suppressed,
        )
        .await
        .map_err(ApiError::FailedPrecondition)?;
        let td = cfg.trust_domain.clone();
        let entries = EntryRepo::new(store.clone(), td.clone());
        let feed = crate::feed::ChangeFeed::start(entries.clone(), crate::feed::WINDOW).await?;
        let core = Self {
            entries,
            feed,
            agents: AgentRepo::new(store.clone(), td),
            policies: crate::policies::PolicyRepo::new(store.clone()),
            egress: crate::egress::EgressRepo::new(store.clone()),
            services: crate::services::ServiceRepo::new(store.clone()),
            signing: crate::limits::SigningLimiter::new(cfg.limits),
            authorities,
            store,
            clock,
            metrics,
            cfg,
            stopping: tokio::sync::watch::channel(false).0,
            clusters,
            leadership,
        };
        core.update_gauges();
        Ok(core)
    }

    /// Refreshes gauges that mirror state.
    pub fn update_gauges(&self) {
        let set = self.authorities.current();
        self.metrics.bundle_sequence.set(set.bundle.sequence as i64);
        self.metrics
            .x509_authority_expiry
            .set(unix(set.x509.not_after));
        // Dropped authorities disappear from the families.
        self.metrics.authority_state.clear();
        self.metrics.authority_expiry.clear();
        for (kind, a) in &set.authorities {
            for s in crate::authority::AuthorityState::ALL {
                self.metrics
                    .authority_state
                    .get_or_create(&crate::metrics::AuthorityStateLabel {
                        kind: kind.as_str().into(),
                        id: a.id.clone(),
                        state: s.as_str().into(),
                    })
                    .set(i64::from(a.state == s));
            }
            self.metrics
                .authority_expiry
                .get_or_create(&crate::metrics::AuthorityLabel {
                    kind: kind.as_str().into(),
                    id: a.id.clone(),
                })
                .set(unix(a.not_after));
        }
    }

    /// The current bundle.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.authorities.current().bundle.clone()
    }

    fn issue_chain(
        &self,
        key: &impl rcgen::PublicKeyData,
        id: &SpiffeId,
        dns: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Issued, String), ApiError> {
        let set = self.authorities.current();
        let (chain, info) = set
            .x509
            .issue_svid(key, id, dns, ttl, &set.bundle, now, &mut rand::rng())
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok((issued(id.clone(), chain, info), set.x509.id.clone()))
    }

    /// Issues the CA's own server SVID for a fresh key; returns the chain and PKCS#8 key.
    pub fn issue_server_svid(&self) -> Result<(Vec<Vec<u8>>, Vec<u8>), ApiError> {
        let key = rcgen::KeyPair::generate().map_err(|e| ApiError::Internal(e.to_string()))?;
        let id = self.authorities.server_id();
        let (iss, _) =
            self.issue_chain(&key, &id, &[], self.cfg.ttl.x509_svid, self.clock.now())?;
        Ok((iss.chain, key.serialize_der()))
    }

    /// Attests a node with a join token and issues its agent SVID for the key in `csr`.
    pub async fn attest_join_token(&self, token: &str, csr: &[u8]) -> Result<Issued, ApiError> {
        let now = self.clock.now();
        let valid = self.agents.check_join_token(token, now).await?;
        let key = crate::csr::parse(csr, Some(&valid.agent_id))?;
        let key_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            rcgen::PublicKeyData::subject_public_key_info(&key),
        ));
        let agent_id = valid.agent_id.clone();
        match valid.used_by() {
            None => {}
            // The same agent, with the same key, retrying an attestation that committed but
            // whose answer it never got: issue again for the agent it became.
            Some(h) if h == key_hash => {
                return self.reattest_join_token(&agent_id, &key, now).await;
            }
            Some(_) => {
                return Err(ApiError::PermissionDenied(
                    "join token is unknown or has already been used".into(),
                ));
            }
        }
        let (iss, authority) =
            self.issue_chain(&key, &agent_id, &[], self.cfg.ttl.agent_svid, now)?;
        let record = AgentRecord {
            id: agent_id.clone(),
            attestation_type: "join_token".into(),
            selectors: vec![format!(
                "join_token:{}",
                agent_id.path().rsplit('/').next().unwrap_or("")
            )],
            serial: iss.serial.clone(),
            prev_serial: None,
            expires_at: unix(iss.not_after),
            attested_at: unix(now),
            evicted: false,
        };
        let mut b = Batch::new();
        self.agents
            .attest_with_token(&mut b, valid, &key_hash, &record)?;
        let mut rec = AuditRecord::new(now, "attest", agent_id.as_str(), agent_id.as_str());
        rec.serial = iss.serial.clone();
        rec.not_after = unix(iss.not_after);
        rec.authority = authority;
        rec.add_to(&mut b)?;
        self.store.commit(b).await.map_err(|e| match e {
            ward_store::StoreError::Conflict { .. } => {
                ApiError::PermissionDenied("join token is unknown or has already been used".into())
            }
            other => other.into(),
        })?;
        self.metrics.issued("agent", 1);
        tracing::info!(agent = %agent_id, "agent attested with join token");
        Ok(iss)
    }

    /// A join-token attestation retried by the key that used the token: a new SVID for that
    /// agent, as a renewal would give it.
    async fn reattest_join_token(
        &self,
        agent_id: &SpiffeId,
        key: &crate::csr::CsrKey,
        now: SystemTime,
    ) -> Result<Issued, ApiError> {
        let (mut rec, raw) = match self.agents.get_raw(agent_id).await? {
            Some((r, _)) if r.evicted => {
                return Err(ApiError::PermissionDenied(format!(
                    "agent {agent_id} has been evicted"
                )));
            }
            Some(found) => found,
            None => {
                return Err(ApiError::PermissionDenied(
                    "join token is unknown or has already been used".into(),
                ));
            }
        };
        let (iss, authority) =
            self.issue_chain(key, agent_id, &[], self.cfg.ttl.agent_svid, now)?;
        rec.serial = iss.serial.clone();
        rec.prev_serial = None;
        rec.expires_at = unix(iss.not_after);
        let mut b = Batch::new();
        self.agents.put(&mut b, &rec, raw)?;
        let mut audit = AuditRecord::new(now, "attest", agent_id.as_str(), agent_id.as_str());
        audit.serial = iss.serial.clone();
        audit.not_after = unix(iss.not_after);
        audit.authority = authority;
        audit.add_to(&mut b)?;
        self.store.commit(b).await?;
        self.metrics.issued("agent", 1);
        tracing::info!(agent = %agent_id, "agent retried its join-token attestation with the same key");
        Ok(iss)
    }

    /// Attests a Kubernetes node with its agent's projected service-account token. The agent ID
    /// comes from the node's UID, so a restarted or re-deployed agent on the same node gets the
    /// same ID (and its previous SVIDs stop working).
    pub async fn attest_k8s_psat(
        &self,
        cluster: &str,
        token: &str,
        csr: &[u8],
    ) -> Result<Issued, ApiError> {
        let now = self.clock.now();
        let c = self.clusters.get(cluster).ok_or_else(|| {
            ApiError::PermissionDenied(format!("cluster {cluster:?} is not configured"))
        })?;
        let node = c.attest(&self.cfg.trust_domain, token, now).await?;
        let key = crate::csr::parse(csr, Some(&node.agent_id))?;
        let (iss, authority) =
            self.issue_chain(&key, &node.agent_id, &[], self.cfg.ttl.agent_svid, now)?;
        let mut b = Batch::new();
        match self.agents.get_raw(&node.agent_id).await? {
            Some((rec, _)) if rec.evicted => {
                return Err(ApiError::PermissionDenied(format!(
                    "agent {} has been evicted",
                    rec.id
                )));
            }
            Some((mut rec, raw)) => {
                rec.serial = iss.serial.clone();
                rec.prev_serial = None;
                rec.selectors = node.selectors.clone();
                rec.expires_at = unix(iss.not_after);
                self.agents.put(&mut b, &rec, raw)?;
            }
            None => {
                let rec = AgentRecord {
                    id: node.agent_id.clone(),
                    attestation_type: "k8s_psat".into(),
                    selectors: node.selectors.clone(),
                    serial: iss.serial.clone(),
                    prev_serial: None,
                    expires_at: unix(iss.not_after),
                    attested_at: unix(now),
                    evicted: false,
                };
                self.agents.create(&mut b, &rec)?;
            }
        }
        let mut rec = AuditRecord::new(
            now,
            "attest",
            node.agent_id.as_str(),
            node.agent_id.as_str(),
        );
        rec.serial = iss.serial.clone();
        rec.not_after = unix(iss.not_after);
        rec.authority = authority;
        rec.add_to(&mut b)?;
        self.store.commit(b).await?;
        self.metrics.issued("agent", 1);
        tracing::info!(agent = %node.agent_id, cluster, "agent attested with a service-account token");
        Ok(iss)
    }

    /// Authorizes a call from an agent: a verified client SVID whose agent is attested, not
    /// evicted, and whose SVID is the newest (or the one before, until the newest is used).
    pub async fn authorize_agent(&self, peer: Option<&PeerInfo>) -> Result<AgentRecord, ApiError> {
        let peer =
            peer.ok_or_else(|| ApiError::Unauthenticated("no TLS peer information".into()))?;
        let id = peer
            .peer_id
            .as_ref()
            .ok_or_else(|| ApiError::Unauthenticated("an agent SVID is required".into()))?;
        let leaf = peer
            .peer_chain
            .first()
            .ok_or_else(|| ApiError::Unauthenticated("an agent SVID is required".into()))?;
        let info = x509::check_leaf(leaf, Profile::Peer)
            .map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
        // TLS checked validity at the handshake; a long-lived connection must not outlive it.
        if info.not_after <= self.clock.now() {
            return Err(ApiError::Unauthenticated(
                "agent SVID has expired; reconnect".into(),
            ));
        }
        // The handshake verified the chain against the bundle of its time; a connection can
        // outlive a revocation, so check it against the bundle in force, and refuse chains
        // through a revoked intermediate whose upstream root is still trusted.
        let set = self.authorities.current();
        if peer.peer_chain.iter().skip(1).any(|c| {
            set.revoked_signing
                .iter()
                .any(|r| r.as_slice() == c.as_ref())
        }) {
            return Err(ApiError::Unauthenticated(
                "agent SVID is signed by a revoked authority; attest again".into(),
            ));
        }
        let chain = &peer.peer_chain;
        let roots: Vec<rustls_pki_types::CertificateDer<'_>> = set
            .bundle
            .x509_authorities
            .iter()
            .map(|c| c.as_slice().into())
            .collect();
        x509::verify_path(
            &info,
            chain,
            &roots,
            &self.cfg.trust_domain,
            self.clock.now(),
            x509::Usage::Client,
        )
        .map_err(|e| {
            ApiError::Unauthenticated(format!(
                "agent SVID does not verify against the current bundle ({e}); attest again"
            ))
        })?;
        let serial = hex::encode(info.serial);
        let found = self.agents.get_raw(id).await?;
        let check = check_caller(found.as_ref().map(|(r, _)| r), &serial)?;
        let (mut record, raw) =
            found.ok_or_else(|| ApiError::PermissionDenied("agent is not attested".into()))?;
        if check == CallerCheck::PromoteNew {
            record.prev_serial = None;
            let mut b = Batch::new();
            self.agents.put(&mut b, &record, raw)?;
            // A concurrent promotion by another call of the same agent is fine.
            match self.store.commit(b).await {
                Ok(()) | Err(ward_store::StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(record)
    }

    /// Renews an agent's SVID for the key in `csr`.
    pub async fn renew_agent(
        &self,
        peer: Option<&PeerInfo>,
        csr: &[u8],
    ) -> Result<Issued, ApiError> {
        let agent = self.authorize_agent(peer).await?;
        let now = self.clock.now();
        let key = crate::csr::parse(csr, Some(&agent.id))?;
        let (iss, authority) =
            self.issue_chain(&key, &agent.id, &[], self.cfg.ttl.agent_svid, now)?;
        let (mut record, raw) = self
            .agents
            .get_raw(&agent.id)
            .await?
            .ok_or_else(|| ApiError::PermissionDenied("agent is not attested".into()))?;
        record.prev_serial = Some(std::mem::replace(&mut record.serial, iss.serial.clone()));
        record.expires_at = unix(iss.not_after);
        let mut b = Batch::new();
        self.agents.put(&mut b, &record, raw)?;
        let mut rec = AuditRecord::new(now, "agent-svid", agent.id.as_str(), agent.id.as_str());
        rec.serial = iss.serial.clone();
        rec.not_after = unix(iss.not_after);
        rec.authority = authority;
        rec.add_to(&mut b)?;
        self.store.commit(b).await?;
        self.metrics.issued("agent", 1);
        Ok(iss)
    }

    /// Signs a batch of workload CSRs for `agent`. Each item succeeds or fails on its own; all
    /// successes are acknowledged only after their audit records are durable.
    pub async fn sign_batch(
        &self,
        agent: &AgentRecord,
        params: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<Result<Issued, ApiError>>, ApiError> {
        if params.len() > MAX_BATCH {
            return Err(ApiError::InvalidArgument(format!(
                "at most {MAX_BATCH} CSRs per batch"
            )));
        }
        let started = std::time::Instant::now();
        let now = self.clock.now();
        let mut results = Vec::with_capacity(params.len());
        // One commit per group that fits the store's transaction (etcd: 128 operations): the
        // items are independent, and each is acknowledged only once its group is durable.
        let limits = self.store.limits();
        let mut group = Batch::new();
        let mut members = Vec::new();
        for (entry_id, csr) in params {
            let mut item = Batch::new();
            let r = self.sign_one(agent, &entry_id, &csr, now, &mut item).await;
            if r.is_err() {
                self.metrics.refused("x509");
            } else {
                let mut both = group.clone();
                both.append(item.clone());
                if !group.is_empty() && !limits.admits(&both) {
                    self.commit_group(std::mem::take(&mut group), &mut members, &mut results)
                        .await?;
                }
                group.append(item);
                members.push(results.len());
            }
            results.push(r);
        }
        self.commit_group(group, &mut members, &mut results).await?;
        let n = results.iter().filter(|r| r.is_ok()).count() as u64;
        self.metrics.issued("x509", n);
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(results)
    }

    /// Commits one group of [`sign_batch`](Self::sign_batch). When an earlier group is already
    /// durable, a failed one fails only its own items; otherwise the call fails.
    async fn commit_group(
        &self,
        group: Batch,
        members: &mut Vec<usize>,
        results: &mut [Result<Issued, ApiError>],
    ) -> Result<(), ApiError> {
        let items = std::mem::take(members);
        if group.is_empty() {
            return Ok(());
        }
        let first = items.first().copied().unwrap_or(0);
        let earlier_durable = results[..first].iter().any(|r| r.is_ok());
        match self.store.commit(group).await {
            Ok(()) => Ok(()),
            Err(e) if earlier_durable => {
                let e = ApiError::from(e);
                tracing::warn!(error = %e, items = items.len(), "a group of signed SVIDs was not recorded");
                for i in items {
                    results[i] = Err(ApiError::Unavailable(e.to_string()));
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn sign_one(
        &self,
        agent: &AgentRecord,
        entry_id: &str,
        csr: &[u8],
        now: SystemTime,
        batch: &mut Batch,
    ) -> Result<Issued, ApiError> {
        let entry = self.authorized_entry(agent, entry_id).await?;
        let key = crate::csr::parse(csr, Some(&entry.spiffe_id))?;
        let ttl = match entry.x509_svid_ttl {
            0 => self.cfg.ttl.x509_svid,
            s => Duration::from_secs(u64::from(s)),
        };
        let (iss, authority) =
            self.issue_chain(&key, &entry.spiffe_id, &entry.dns_names, ttl, now)?;
        let mut rec = AuditRecord::new(
            now,
            "x509-svid",
            agent.id.as_str(),
            entry.spiffe_id.as_str(),
        );
        rec.serial = iss.serial.clone();
        rec.not_after = unix(iss.not_after);
        rec.authority = authority;
        rec.entry_id = entry.id.clone();
        rec.add_to(batch)?;
        Ok(iss)
    }

    async fn authorized_entry(
        &self,
        agent: &AgentRecord,
        entry_id: &str,
    ) -> Result<crate::entries::Entry, ApiError> {
        // Unknown and foreign entries get the same answer, so an agent learns nothing about
        // entries that are not its own.
        let denied = || {
            ApiError::PermissionDenied(format!("entry {entry_id} is not authorized for this agent"))
        };
        match self.entries.get(entry_id).await {
            Ok(Some(e)) if e.parent_id == agent.id => Ok(e),
            Ok(_) => Err(denied()),
            Err(ApiError::InvalidArgument(_)) => Err(denied()),
            Err(e) => Err(e),
        }
    }

    /// Mints a JWT-SVID for an entry of `agent`.
    pub async fn mint_jwt(
        &self,
        agent: &AgentRecord,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(SpiffeId, String, SystemTime), ApiError> {
        if audience.is_empty() || audience.len() > MAX_AUDIENCES {
            return Err(ApiError::InvalidArgument(format!(
                "between 1 and {MAX_AUDIENCES} audiences are required"
            )));
        }
        if audience
            .iter()
            .any(|a| a.is_empty() || a.len() > 512 || a.chars().any(char::is_control))
        {
            return Err(ApiError::InvalidArgument(
                "audiences must be non-empty printable strings".into(),
            ));
        }
        let entry = self.authorized_entry(agent, entry_id).await?;
        let now = self.clock.now();
        let ttl = match entry.jwt_svid_ttl {
            0 => self.cfg.ttl.jwt_svid,
            s => Duration::from_secs(u64::from(s)),
        };
        let set = self.authorities.current();
        let (token, exp) = set
            .jwt
            .mint(
                &entry.spiffe_id,
                audience,
                ttl,
                self.cfg.oidc.as_ref().map(|o| o.issuer.as_str()),
                &set.bundle,
                now,
            )
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut b = Batch::new();
        let mut rec =
            AuditRecord::new(now, "jwt-svid", agent.id.as_str(), entry.spiffe_id.as_str());
        rec.not_after = unix(exp);
        rec.authority = set.jwt.key_id.clone();
        rec.entry_id = entry.id.clone();
        rec.serial = audience.join(",");
        rec.add_to(&mut b)?;
        self.store.commit(b).await?;
        self.metrics.issued("jwt", 1);
        Ok((entry.spiffe_id, token, exp))
    }

    /// A new random entry ID (UUID-shaped).
    pub fn new_entry_id() -> String {
        let h = db::random_hex(&mut rand::rng(), 16);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}
