//! The CA's signing authorities (X.509 and JWT), their stored records, the trust bundle derived
//! from them, and the automatic rotation schedule.
//!
//! Records (certificates, public keys, states) live in the store; private keys live in the key
//! manager. The bundle is recomputed from the records after every change and its
//! `spiffe_sequence` bumped, and subscribers (agent sync streams, the CA's own TLS) learn of it
//! through a `watch` channel.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

mod lifecycle;
mod records;

pub use lifecycle::{Op, Schedule, Step, plan, transition};

use records::{Records, load_upstream};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use ward_spiffe::{Bundle, Clock, SpiffeId, TrustDomain};
use ward_store::{Batch, Store};

use crate::config::CaConfig;
use crate::db::from_unix;
use crate::error::ApiError;
use crate::issuer::{JwtSigner, X509Signer};
use crate::keys::KeyManager;

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|b| STANDARD.encode(b)))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Where an authority is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// Superseded; still published until it expires.
    Old,
    /// Still published, but agents replace everything it signed at once.
    Tainted,
    /// Removed from the bundle; SVIDs chained to it are refused.
    Revoked,
}

impl AuthorityState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
            Self::Tainted => "tainted",
            Self::Revoked => "revoked",
        }
    }

    /// Every state, for metrics.
    pub const ALL: [Self; 5] = [
        Self::Prepared,
        Self::Active,
        Self::Old,
        Self::Tainted,
        Self::Revoked,
    ];
}

/// The two kinds of authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Signs X.509-SVIDs.
    X509,
    /// Signs JWT-SVIDs.
    Jwt,
}

impl Kind {
    /// `x509` or `jwt`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        }
    }

    /// Parses `x509` or `jwt`.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        match s {
            "x509" => Ok(Self::X509),
            "jwt" => Ok(Self::Jwt),
            other => Err(ApiError::InvalidArgument(format!(
                "authority kind {other:?}: expected x509 or jwt"
            ))),
        }
    }

    fn prefix(self) -> &'static [u8] {
        match self {
            Self::X509 => b"authority/x509/",
            Self::Jwt => b"authority/jwt/",
        }
    }

    fn key(self, id: &str) -> Vec<u8> {
        let mut k = self.prefix().to_vec();
        k.extend_from_slice(id.as_bytes());
        k
    }
}

/// A stored X.509 authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct X509Record {
    /// ID (also the key's ID).
    pub id: String,
    /// State.
    pub state: AuthorityState,
    /// Signing certificate, then upstream intermediates.
    #[serde(with = "b64")]
    pub signing_chain: Vec<Vec<u8>>,
    /// Roots published for it.
    #[serde(with = "b64")]
    pub roots: Vec<Vec<u8>>,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// Expiry, Unix seconds.
    pub not_after: i64,
    /// True if signed by an upstream CA.
    pub upstream: bool,
    /// The key store holding the private key (the replica that signs with it); empty in
    /// records written before replicas (the one replica there was).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub holder: String,
}

/// A stored JWT authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtRecord {
    /// `kid`.
    pub key_id: String,
    /// Key manager ID of the private key.
    pub key_name: String,
    /// State.
    pub state: AuthorityState,
    /// DER SPKI.
    #[serde(with = "b64")]
    pub public_key: Vec<Vec<u8>>,
    /// Start, Unix seconds.
    pub not_before: i64,
    /// Expiry, Unix seconds.
    pub not_after: i64,
    /// The key store holding the private key; empty in records written before replicas.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub holder: String,
}

/// What the lifecycle needs to know about one authority of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Authority ID (X.509) or key ID (JWT).
    pub id: String,
    /// State.
    pub state: AuthorityState,
    /// Start of validity.
    pub not_before: SystemTime,
    /// Expiry.
    pub not_after: SystemTime,
    /// True for an X.509 authority signed by an upstream CA.
    pub upstream: bool,
    /// The replica (key store) that holds its key and signs with it.
    pub holder: String,
}

impl X509Record {
    fn view(&self) -> View {
        View {
            id: self.id.clone(),
            state: self.state,
            not_before: from_unix(self.not_before),
            not_after: from_unix(self.not_after),
            upstream: self.upstream,
            holder: self.holder.clone(),
        }
    }
}

impl JwtRecord {
    fn view(&self) -> View {
        View {
            id: self.key_id.clone(),
            state: self.state,
            not_before: from_unix(self.not_before),
            not_after: from_unix(self.not_after),
            upstream: false,
            holder: self.holder.clone(),
        }
    }
}

pub use crate::audit::Live;

/// What agents must replace at once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Taints {
    /// DER SubjectPublicKeyInfo of every tainted X.509 signing key.
    pub x509_keys: Vec<Vec<u8>>,
    /// Key IDs of tainted JWT authorities.
    pub jwt_key_ids: Vec<String>,
}

/// The signers in force and the bundle they make.
#[derive(Debug)]
pub struct ActiveSet {
    /// Signs X.509-SVIDs.
    pub x509: Arc<X509Signer>,
    /// Signs JWT-SVIDs.
    pub jwt: Arc<JwtSigner>,
    /// The trust bundle.
    pub bundle: Arc<Bundle>,
    /// What agents must replace at once.
    pub taints: Arc<Taints>,
    /// Signing certificates (DER) of revoked X.509 authorities: a chain holding one is refused
    /// even where its root is still trusted (upstream mode).
    pub revoked_signing: Vec<Vec<u8>>,
    /// Every authority, for `show` and metrics.
    pub authorities: Vec<(Kind, View)>,
}

/// Owns the authorities of one trust domain.
pub struct Authorities {
    records: Records,
    clock: Arc<dyn Clock>,
    current: RwLock<Arc<ActiveSet>>,
    set_tx: watch::Sender<Arc<ActiveSet>>,
    lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Authorities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorities")
            .field("td", &self.records.td)
            .finish_non_exhaustive()
    }
}

/// Who changed an authority's state, for the journal.
#[derive(Debug, Clone, Copy)]
enum Actor {
    Schedule,
    Admin,
}

impl Actor {
    fn as_str(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::Admin => "admin",
        }
    }
}

impl Authorities {
    /// Loads the authorities from the store, creating the first ones in an empty store, and
    /// carries on with any rotation step that fell due while the CA was down.
    pub async fn open(
        cfg: &CaConfig,
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyManager>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ApiError> {
        if let Some(up) = &cfg.upstream {
            // Fail at start-up, not at the first rotation, if the files are unusable.
            load_upstream(up)?;
        }
        let records = Records {
            store,
            keys,
            td: cfg.trust_domain.clone(),
            ca_ttl: cfg.ttl.ca,
            upstream: cfg.upstream.clone(),
            schedule: Schedule {
                automatic: cfg.rotation.automatic,
                prepare_at: cfg.rotation.prepare_at,
                activate_at: cfg.rotation.activate_at,
            },
        };
        records.run_steps(clock.now()).await?;
        let set = Arc::new(records.load_set().await?);
        let (set_tx, _) = watch::channel(set.clone());
        Ok(Self {
            records,
            clock,
            current: RwLock::new(set),
            set_tx,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The signers and bundle in force.
    pub fn current(&self) -> Arc<ActiveSet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Wakes when any replica changes an authority record; the caller then runs
    /// [`refresh`](Self::refresh), so another replica's rotation, taint or revoke reaches this
    /// one's signer, bundle and sync streams at once rather than at the next maintenance tick.
    pub fn record_changes(&self) -> ward_store::Watch {
        self.records.store.watch(b"authority/")
    }

    /// Rebuilds the set in force from the store (after [`record_changes`](Self::record_changes)).
    pub async fn refresh(&self) -> Result<(), ApiError> {
        let _g = self.lock.lock().await;
        self.publish().await
    }

    /// This replica's key store name: the holder of the authorities it signs with.
    pub fn holder(&self) -> &str {
        self.records.holder()
    }

    /// Subscribes to changes of the published set (bundle, taints, revocations).
    pub fn watch(&self) -> watch::Receiver<Arc<ActiveSet>> {
        self.set_tx.subscribe()
    }

    /// Runs the rotation schedule once and publishes the result (also when a step failed, so
    /// what did happen reaches subscribers). Called periodically.
    pub async fn maintain(&self) -> Result<(), ApiError> {
        let _g = self.lock.lock().await;
        let steps = self.records.run_steps(self.clock.now()).await;
        let published = self.publish().await;
        steps.and(published)
    }

    /// Rebuilds the set in force from the store and tells subscribers if the bundle sequence
    /// (roots, keys, taints) or the active signers changed.
    async fn publish(&self) -> Result<(), ApiError> {
        let set = Arc::new(self.records.load_set().await?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = set.clone();
        self.set_tx.send_if_modified(|cur| {
            let changed = cur.bundle.sequence != set.bundle.sequence
                || cur.x509.id != set.x509.id
                || cur.jwt.key_id != set.jwt.key_id
                || cur.authorities != set.authorities;
            *cur = set.clone();
            changed
        });
        Ok(())
    }

    /// Applies an operator's state change with its safety rails, journals it and publishes the
    /// result at once. `force` lets a revoke through while SVIDs still chain to the authority.
    pub async fn operate(&self, kind: Kind, op: Op, force: bool) -> Result<View, ApiError> {
        let _g = self.lock.lock().await;
        let now = self.clock.now();
        let all = self.records.views(kind).await?;
        // Each replica's authorities follow the rails among themselves: Prepare and Activate
        // act on this replica's (it holds the keys); Taint and Revoke on the named authority's
        // holder's, from any replica (an operator reacting to a compromise uses any replica).
        let me = self.records.holder().to_owned();
        let holder = match &op {
            Op::Taint(id) | Op::Revoke(id) => all
                .iter()
                .find(|a| &a.id == id)
                .map_or(me.clone(), |a| a.holder.clone()),
            Op::Activate(Some(id)) => match all.iter().find(|a| &a.id == id) {
                Some(a) if a.holder != me => {
                    return Err(ApiError::FailedPrecondition(format!(
                        "{} authority {id} is held by replica {}; activate it there",
                        kind.as_str(),
                        a.holder
                    )));
                }
                _ => me.clone(),
            },
            Op::Prepare | Op::Activate(None) => me.clone(),
        };
        let views: Vec<View> = all.into_iter().filter(|a| a.holder == holder).collect();
        let changes = transition(kind, &views, &op)?;
        let id = match &op {
            Op::Prepare => {
                let mut b = Batch::new();
                let id = self
                    .records
                    .prepare(kind, now, Actor::Admin, &mut b)
                    .await?;
                self.records.store.commit(b).await?;
                id
            }
            Op::Revoke(id) => {
                let a = views.iter().find(|a| &a.id == id).cloned();
                let live = match &a {
                    Some(a) => self.records.live_svids(kind, a, now).await?,
                    None => Live::default(),
                };
                if live.count > 0 && !force {
                    let until = live.until.map(ward_net::process::rfc3339);
                    return Err(ApiError::FailedPrecondition(format!(
                        "{} authority {id} still has {} unexpired SVID(s) chained to it (the \
                         last expires at {}); taint it so agents replace them, wait until they \
                         expire, or pass --force",
                        kind.as_str(),
                        live.count,
                        until.map(|t| t.to_string()).unwrap_or_default()
                    )));
                }
                if live.count > 0 {
                    tracing::warn!(authority = %id, live = live.count, "revoking with --force while SVIDs still chain to it");
                }
                self.records
                    .apply(kind, &changes, now, Actor::Admin)
                    .await?;
                id.clone()
            }
            Op::Activate(_) | Op::Taint(_) => {
                self.records
                    .apply(kind, &changes, now, Actor::Admin)
                    .await?;
                changes[0].0.clone()
            }
        };
        self.publish().await?;
        self.records
            .views(kind)
            .await?
            .into_iter()
            .find(|a| a.id == id)
            .ok_or_else(|| ApiError::Internal(format!("authority {id} vanished")))
    }

    /// Every authority of `kind` with the SVIDs still chained to it.
    pub async fn show(&self, kind: Kind) -> Result<Vec<(View, Live)>, ApiError> {
        let now = self.clock.now();
        let mut out = Vec::new();
        for v in self.records.views(kind).await? {
            let live = self.records.live_svids(kind, &v, now).await?;
            out.push((v, live));
        }
        Ok(out)
    }

    /// The SVIDs still chained to authority `a` of `kind`.
    pub async fn live(&self, kind: Kind, a: &View) -> Result<Live, ApiError> {
        self.records.live_svids(kind, a, self.clock.now()).await
    }

    /// All stored X.509 authority records.
    pub async fn x509_authorities(&self) -> Result<Vec<X509Record>, ApiError> {
        self.records.x509_records().await
    }

    /// The ID the CA's own server SVID carries.
    pub fn server_id(&self) -> SpiffeId {
        server_id(&self.records.td)
    }
}

/// The CA server's SPIFFE ID for trust domain `td`.
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    // `/ward/server` is a valid path in every trust domain.
    td.id_from_segments(["ward", "server"])
        .expect("ward/server is a valid SPIFFE ID path")
}
