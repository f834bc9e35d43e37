//! The CA's signing authorities (X.509 and JWT), their stored records, the trust bundle derived
//! from them, and the automatic rotation schedule.
//!
//! Records (certificates, public keys, states) live in the store; private keys live in the key
//! manager. The bundle is recomputed from the records after every change and its
//! `spiffe_sequence` bumped, and subscribers (agent sync streams, the CA's own TLS) learn of it
//! through a `watch` channel.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use ward_spiffe::{Bundle, Clock, JwtAuthority, SpiffeId, TrustDomain};
use ward_store::{Batch, Store, scan_all};

use crate::config::{CaConfig, UpstreamConfig};
use crate::db::{self, from_unix, unix};
use crate::error::ApiError;
use crate::issuer::{JwtSigner, X509Signer};
use crate::keys::{KeyManager, PrivateKey};

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
}

impl X509Record {
    fn view(&self) -> View {
        View {
            id: self.id.clone(),
            state: self.state,
            not_before: from_unix(self.not_before),
            not_after: from_unix(self.not_after),
            upstream: self.upstream,
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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BundleRecord {
    sequence: u64,
    #[serde(with = "b64")]
    x509: Vec<Vec<u8>>,
    jwt: Vec<(String, String)>,
    /// `x509:<id>` / `jwt:<kid>` of tainted authorities: a taint changes what agents must do,
    /// so it is a new bundle sequence too.
    #[serde(default)]
    tainted: Vec<String>,
}

/// Lifecycle step chosen by [`plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create and publish a successor.
    Prepare,
    /// Make the prepared authority `0` active; the current active becomes old.
    Activate(String),
    /// Forget the expired authority `0` (old, tainted or revoked).
    Drop(String),
}

/// Lifetime fractions at which rotation steps happen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Rotate on the schedule at all.
    pub automatic: bool,
    /// Fraction of the active authority's lifetime at which a successor is prepared.
    pub prepare_at: f64,
    /// Fraction at which the successor becomes active.
    pub activate_at: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        let r = crate::config::RotationConfig::default();
        Self {
            automatic: r.automatic,
            prepare_at: r.prepare_at,
            activate_at: r.activate_at,
        }
    }
}

/// Decides the rotation steps due at `now`. Pure. With no active authority (an empty store) the
/// first one is prepared and activated even when the schedule is not automatic.
pub fn plan(authorities: &[View], schedule: Schedule, now: SystemTime) -> Vec<Step> {
    use AuthorityState::*;
    let mut steps = Vec::new();
    for a in authorities {
        if matches!(a.state, Old | Tainted | Revoked) && a.not_after <= now {
            steps.push(Step::Drop(a.id.clone()));
        }
    }
    let active = authorities.iter().find(|a| a.state == Active);
    let prepared = authorities.iter().find(|a| a.state == Prepared);
    let Some(active) = active else {
        match prepared {
            Some(p) => steps.push(Step::Activate(p.id.clone())),
            None => steps.push(Step::Prepare),
        }
        return steps;
    };
    if !schedule.automatic {
        return steps;
    }
    let life = active
        .not_after
        .duration_since(active.not_before)
        .unwrap_or_default();
    let at = |f: f64| active.not_before + life.mul_f64(f);
    match prepared {
        None if now >= at(schedule.prepare_at) => steps.push(Step::Prepare),
        Some(p) if now >= at(schedule.activate_at) => {
            // A successor must be published for as long as the schedule intends (prepare_at →
            // activate_at) before it signs, so every peer holds its root first — unless the
            // active authority is about to expire (after an outage, or a late prepare).
            let gap = life.mul_f64(schedule.activate_at - schedule.prepare_at);
            let deadline = active.not_after - life.mul_f64((1.0 - schedule.activate_at) / 2.0);
            if now >= p.not_before + gap || now >= deadline {
                steps.push(Step::Activate(p.id.clone()));
            }
        }
        _ => {}
    }
    steps
}

/// A state change an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a successor (published, not signing).
    Prepare,
    /// Make the prepared authority (the named one, or the only one) active.
    Activate(Option<String>),
    /// Have agents replace everything the authority signed, at once.
    Taint(String),
    /// Remove the authority from the bundle.
    Revoke(String),
}

/// Checks an operator's `op` against the lifecycle rules and returns the state changes it makes
/// (none for `Prepare`, which creates an authority). Pure; the rails that need the store (live
/// SVIDs) or crypto (a usable root) are checked by [`Authorities::operate`].
pub fn transition(
    kind: Kind,
    authorities: &[View],
    op: &Op,
) -> Result<Vec<(String, AuthorityState)>, ApiError> {
    use AuthorityState::*;
    let k = kind.as_str();
    let find = |id: &str| {
        authorities.iter().find(|a| a.id == id).ok_or_else(|| {
            ApiError::NotFound(format!(
                "no {k} authority {id:?} (see `ward-ca authority {k} show`)"
            ))
        })
    };
    let refuse = |m: String| Err(ApiError::FailedPrecondition(m));
    match op {
        Op::Prepare => match authorities.iter().find(|a| a.state == Prepared) {
            Some(p) => refuse(format!(
                "{k} authority {} is already prepared; activate it or taint it first",
                p.id
            )),
            None => Ok(Vec::new()),
        },
        Op::Activate(id) => {
            let target = match id {
                Some(id) => find(id)?,
                None => authorities
                    .iter()
                    .find(|a| a.state == Prepared)
                    .ok_or_else(|| {
                        ApiError::FailedPrecondition(format!(
                            "no prepared {k} authority to activate; run `ward-ca authority {k} \
                             prepare` first"
                        ))
                    })?,
            };
            if target.state != Prepared {
                return refuse(format!(
                    "{k} authority {} is {}; only a prepared authority can be activated",
                    target.id,
                    target.state.as_str()
                ));
            }
            let mut changes = vec![(target.id.clone(), Active)];
            changes.extend(
                authorities
                    .iter()
                    .filter(|a| a.state == Active)
                    .map(|a| (a.id.clone(), Old)),
            );
            Ok(changes)
        }
        Op::Taint(id) => {
            let a = find(id)?;
            match a.state {
                Active => refuse(format!(
                    "{k} authority {id} is active and signs every new SVID; prepare and activate \
                     a successor first, then taint it"
                )),
                Tainted | Revoked => refuse(format!(
                    "{k} authority {id} is already {}",
                    a.state.as_str()
                )),
                Prepared | Old => Ok(vec![(a.id.clone(), Tainted)]),
            }
        }
        Op::Revoke(id) => {
            let a = find(id)?;
            match a.state {
                Active => refuse(format!(
                    "{k} authority {id} is active; revoking it would leave nothing to sign with \
                     and agents with no usable root. Prepare and activate a successor first"
                )),
                Revoked => refuse(format!("{k} authority {id} is already revoked")),
                Prepared | Old | Tainted => Ok(vec![(a.id.clone(), Revoked)]),
            }
        }
    }
}

/// SVIDs an authority signed that are still valid and not replaced by a newer one for the
/// same holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Live {
    /// How many.
    pub count: u64,
    /// When the last of them expires.
    pub until: Option<SystemTime>,
}

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

/// Upstream key material loaded from disk.
struct Upstream {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    chain: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
}

fn load_upstream(cfg: &UpstreamConfig) -> Result<Upstream, ApiError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| {
            ApiError::FailedPrecondition(format!("upstream: cannot read {}: {e}", p.display()))
        })
    };
    let bad = |m: String| ApiError::FailedPrecondition(format!("upstream: {m}"));
    let chain = ward_spiffe::bundle::pem_certificates(&read(&cfg.cert_file)?)
        .map_err(|e| bad(format!("{}: {e}", cfg.cert_file.display())))?;
    let signing = chain
        .first()
        .ok_or_else(|| bad(format!("{} holds no certificate", cfg.cert_file.display())))?;
    ward_spiffe::x509::check_signing_cert(signing)
        .map_err(|e| bad(format!("{}: {e}", cfg.cert_file.display())))?;
    let key_pem = zeroize::Zeroizing::new(
        String::from_utf8(read(&cfg.key_file)?).map_err(|_| bad("key file is not PEM".into()))?,
    );
    let key = rcgen::KeyPair::from_pem(&key_pem)
        .map_err(|e| bad(format!("{}: {e}", cfg.key_file.display())))?;
    if rcgen::PublicKeyData::subject_public_key_info(&key)
        != ward_spiffe::x509::spki_der(signing).map_err(|e| bad(e.to_string()))?
    {
        return Err(bad("key_file does not match cert_file".into()));
    }
    let roots = ward_spiffe::bundle::pem_certificates(&read(&cfg.bundle_file)?)
        .map_err(|e| bad(format!("{}: {e}", cfg.bundle_file.display())))?;
    if roots.is_empty() {
        return Err(bad(format!(
            "{} holds no certificate",
            cfg.bundle_file.display()
        )));
    }
    let issuer = rcgen::Issuer::from_ca_cert_der(&signing.as_slice().into(), key)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Upstream {
        issuer,
        chain,
        roots,
    })
}

/// Stored authority records and keys, without the in-memory view.
struct Records {
    store: Arc<dyn Store>,
    keys: Arc<dyn KeyManager>,
    td: TrustDomain,
    ca_ttl: Duration,
    upstream: Option<UpstreamConfig>,
    schedule: Schedule,
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

const BUNDLE_KEY: &[u8] = b"bundle";

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
        let views = self.records.views(kind).await?;
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

impl Records {
    async fn x509_records(&self) -> Result<Vec<X509Record>, ApiError> {
        scan_all(self.store.as_ref(), Kind::X509.prefix())
            .await?
            .iter()
            .map(|(k, v)| db::decode(k, v))
            .collect()
    }

    async fn jwt_records(&self) -> Result<Vec<JwtRecord>, ApiError> {
        scan_all(self.store.as_ref(), Kind::Jwt.prefix())
            .await?
            .iter()
            .map(|(k, v)| db::decode(k, v))
            .collect()
    }

    async fn views(&self, kind: Kind) -> Result<Vec<View>, ApiError> {
        Ok(match kind {
            Kind::X509 => self
                .x509_records()
                .await?
                .iter()
                .map(X509Record::view)
                .collect(),
            Kind::Jwt => self
                .jwt_records()
                .await?
                .iter()
                .map(JwtRecord::view)
                .collect(),
        })
    }

    /// Prepares, activates and drops authorities as the schedule says is due at `now`. A
    /// failure of one kind (say, unreadable upstream files) does not stop the other.
    async fn run_steps(&self, now: SystemTime) -> Result<(), ApiError> {
        let mut first_err = None;
        for kind in [Kind::X509, Kind::Jwt] {
            if let Err(e) = self.run_kind(kind, now).await {
                tracing::error!(kind = kind.as_str(), error = %e, "authority rotation step failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn run_kind(&self, kind: Kind, now: SystemTime) -> Result<(), ApiError> {
        let views = self.views(kind).await?;
        for step in plan(&views, self.schedule, now) {
            match step {
                Step::Prepare => {
                    let mut b = Batch::new();
                    self.prepare(kind, now, Actor::Schedule, &mut b).await?;
                    self.store.commit(b).await?;
                }
                Step::Activate(id) => {
                    let changes = transition(kind, &views, &Op::Activate(Some(id)))?;
                    self.apply(kind, &changes, now, Actor::Schedule).await?;
                }
                Step::Drop(id) => {
                    let mut b = Batch::new();
                    b.delete(kind.key(&id));
                    journal(&mut b, now, kind, &id, "dropped", Actor::Schedule)?;
                    self.store.commit(b).await?;
                    tracing::info!(kind = kind.as_str(), authority = %id, "expired authority removed");
                }
            }
        }
        Ok(())
    }

    /// Adds a new authority of `kind` to `b`: prepared, or active if there is no active one.
    async fn prepare(
        &self,
        kind: Kind,
        now: SystemTime,
        actor: Actor,
        b: &mut Batch,
    ) -> Result<String, ApiError> {
        let views = self.views(kind).await?;
        let state = if views.iter().any(|v| v.state == AuthorityState::Active) {
            AuthorityState::Prepared
        } else {
            AuthorityState::Active
        };
        let internal = |e: crate::keys::KeyError| ApiError::Internal(e.to_string());
        let id = match kind {
            Kind::X509 => {
                let id = format!("x509-{}", db::random_hex(&mut rand::rng(), 8));
                let key = self.keys.generate(&id).map_err(internal)?;
                let signer = self.new_x509_signer(&id, key, now, &mut rand::rng())?;
                let rec = X509Record {
                    id: id.clone(),
                    state,
                    signing_chain: signer.signing_chain.clone(),
                    roots: signer.roots.clone(),
                    not_before: unix(now),
                    not_after: unix(signer.not_after),
                    upstream: !signer.self_signed,
                };
                b.require(kind.key(&id), None)
                    .put(kind.key(&id), db::encode(&rec)?);
                id
            }
            Kind::Jwt => {
                let kid = db::random_hex(&mut rand::rng(), 16);
                let key_name = format!("jwt-{kid}");
                let key = self.keys.generate(&key_name).map_err(internal)?;
                let rec = JwtRecord {
                    key_id: kid.clone(),
                    key_name,
                    state,
                    public_key: vec![key.public_key_der()],
                    not_before: unix(now),
                    not_after: unix(now + self.ca_ttl),
                };
                b.require(kind.key(&kid), None)
                    .put(kind.key(&kid), db::encode(&rec)?);
                kid
            }
        };
        journal(b, now, kind, &id, state.as_str(), actor)?;
        tracing::info!(kind = kind.as_str(), authority = %id, state = state.as_str(), actor = actor.as_str(), "authority created");
        Ok(id)
    }

    /// Applies state changes in one durable batch with their journal records. Each record is
    /// required to be unchanged since it was read.
    async fn apply(
        &self,
        kind: Kind,
        changes: &[(String, AuthorityState)],
        now: SystemTime,
        actor: Actor,
    ) -> Result<(), ApiError> {
        let mut b = Batch::new();
        for (i, (id, state)) in changes.iter().enumerate() {
            let key = kind.key(id);
            let raw = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("authority {id} is gone")))?;
            let new = match kind {
                Kind::X509 => {
                    let mut r: X509Record = db::decode(&key, &raw)?;
                    r.state = *state;
                    db::encode(&r)?
                }
                Kind::Jwt => {
                    let mut r: JwtRecord = db::decode(&key, &raw)?;
                    r.state = *state;
                    db::encode(&r)?
                }
            };
            b.require(key.clone(), Some(raw)).put(key, new);
            // One nanosecond apart, so the journal reads in the order the changes were made.
            let at = now + Duration::from_nanos(i as u64);
            journal(&mut b, at, kind, id, state.as_str(), actor)?;
            tracing::info!(kind = kind.as_str(), authority = %id, state = state.as_str(), actor = actor.as_str(), "authority state changed");
        }
        self.store.commit(b).await?;
        Ok(())
    }

    /// Counts the SVIDs `a` signed that are unexpired at `now` and not superseded by a newer
    /// SVID for the same holder (agent SVIDs: the agent; workload SVIDs: agent and entry),
    /// from the durable issuance log, so the answer survives restarts and crashes. JWT-SVIDs
    /// are bearer tokens nobody can recall: every unexpired one counts.
    async fn live_svids(&self, kind: Kind, a: &View, now: SystemTime) -> Result<Live, ApiError> {
        use std::collections::HashMap;
        const PAGE: usize = 1024;
        let start = a
            .not_before
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let mut after = format!("audit/{start:020}").into_bytes();
        let mut latest: HashMap<String, (bool, i64)> = HashMap::new();
        let mut jwt = Live::default();
        let now_s = unix(now);
        loop {
            let page = self.store.scan(b"audit/", Some(&after), PAGE).await?;
            let n = page.len();
            for (k, v) in &page {
                let r: crate::audit::AuditRecord = db::decode(k, v)?;
                let holder = match (kind, r.event.as_str()) {
                    (Kind::X509, "attest" | "agent-svid") => format!("agent\0{}", r.spiffe_id),
                    (Kind::X509, "x509-svid") => format!("svid\0{}\0{}", r.caller, r.entry_id),
                    (Kind::Jwt, "jwt-svid") => {
                        if r.authority == a.id && r.not_after > now_s {
                            jwt.count += 1;
                            jwt.until = jwt.until.max(Some(from_unix(r.not_after)));
                        }
                        continue;
                    }
                    _ => continue,
                };
                latest.insert(holder, (r.authority == a.id, r.not_after));
            }
            match page.last() {
                Some((k, _)) if n == PAGE => after = k.clone(),
                _ => break,
            }
        }
        if kind == Kind::Jwt {
            return Ok(jwt);
        }
        let mut live = Live::default();
        for (mine, not_after) in latest.into_values() {
            if mine && not_after > now_s {
                live.count += 1;
                live.until = live.until.max(Some(from_unix(not_after)));
            }
        }
        Ok(live)
    }

    fn new_x509_signer(
        &self,
        id: &str,
        key: PrivateKey,
        now: SystemTime,
        rng: &mut impl rand::RngCore,
    ) -> Result<X509Signer, ApiError> {
        let internal = |e: crate::issuer::IssueError| ApiError::Internal(e.to_string());
        let signer = match &self.upstream {
            None => X509Signer::self_signed(id, key, &self.td, now, self.ca_ttl, rng)
                .map_err(internal)?,
            Some(cfg) => {
                // Read the files again: an operator rotates the upstream intermediate (or root)
                // by replacing them, and the next authority follows.
                let up = load_upstream(cfg)?;
                X509Signer::intermediate(
                    id,
                    key,
                    &self.td,
                    &up.issuer,
                    &up.chain,
                    up.roots.clone(),
                    now,
                    self.ca_ttl,
                    rng,
                )
                .map_err(|e| {
                    ApiError::FailedPrecondition(format!("upstream signing failed: {e}"))
                })?
            }
        };
        // A new authority whose chain does not reach the roots published for it would leave
        // agents with no usable root once it signs: prove it with a probe SVID first.
        let probe_key =
            rcgen::KeyPair::generate().map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut probe_bundle = Bundle::new(self.td.clone());
        probe_bundle.x509_authorities = signer.roots.clone();
        signer
            .issue_svid(
                &probe_key,
                &server_id(&self.td),
                &[],
                Duration::from_secs(60),
                &probe_bundle,
                now,
                rng,
            )
            .map_err(|e| {
                ApiError::FailedPrecondition(format!(
                    "the new authority's chain does not verify against the roots it would \
                     publish ({e}); refusing a bundle with no usable root"
                ))
            })?;
        Ok(signer)
    }

    /// Builds the active signers and the bundle from the stored records; bumps and stores the
    /// bundle sequence if the published keys or the taints changed.
    async fn load_set(&self) -> Result<ActiveSet, ApiError> {
        use AuthorityState::*;
        let x509 = self.x509_records().await?;
        let jwt = self.jwt_records().await?;
        let active_x509 = x509
            .iter()
            .find(|r| r.state == Active)
            .ok_or_else(|| ApiError::Internal("no active X.509 authority".into()))?;
        let active_jwt = jwt
            .iter()
            .find(|r| r.state == Active)
            .ok_or_else(|| ApiError::Internal("no active JWT authority".into()))?;
        let key = self.keys.load(&active_x509.id).map_err(|e| {
            ApiError::FailedPrecondition(format!(
                "the key of the active X.509 authority cannot be loaded: {e}"
            ))
        })?;
        let signer = X509Signer::from_stored(
            &active_x509.id,
            key,
            active_x509.signing_chain.clone(),
            active_x509.roots.clone(),
        )
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        let jkey = self.keys.load(&active_jwt.key_name).map_err(|e| {
            ApiError::FailedPrecondition(format!(
                "the key of the active JWT authority cannot be loaded: {e}"
            ))
        })?;
        let jwt_signer = JwtSigner::new(&active_jwt.key_id, jkey, from_unix(active_jwt.not_after));

        // Roots of every authority still published; a root shared with a revoked authority
        // (one upstream root, two intermediates) stays.
        let mut roots: Vec<Vec<u8>> = Vec::new();
        for r in x509.iter().filter(|r| r.state != Revoked) {
            for root in &r.roots {
                if !roots.contains(root) {
                    roots.push(root.clone());
                }
            }
        }
        let published_jwt: Vec<&JwtRecord> = jwt.iter().filter(|r| r.state != Revoked).collect();
        let jwt_keys: Vec<(String, String)> = published_jwt
            .iter()
            .map(|r| {
                use base64::Engine;
                let pk = r.public_key.first().cloned().unwrap_or_default();
                (
                    r.key_id.clone(),
                    base64::engine::general_purpose::STANDARD.encode(pk),
                )
            })
            .collect();
        let mut taints = Taints::default();
        let mut tainted = Vec::new();
        for r in x509.iter().filter(|r| r.state == Tainted) {
            let spki = r
                .signing_chain
                .first()
                .map(|c| ward_spiffe::x509::spki_der(c))
                .transpose()
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            taints.x509_keys.extend(spki);
            tainted.push(format!("x509:{}", r.id));
        }
        for r in jwt.iter().filter(|r| r.state == Tainted) {
            taints.jwt_key_ids.push(r.key_id.clone());
            tainted.push(format!("jwt:{}", r.key_id));
        }
        let revoked_signing = x509
            .iter()
            .filter(|r| r.state == Revoked)
            .filter_map(|r| r.signing_chain.first().cloned())
            .collect();

        let stored: Option<BundleRecord> = db::get(self.store.as_ref(), BUNDLE_KEY).await?;
        let record = match stored {
            Some(s) if s.x509 == roots && s.jwt == jwt_keys && s.tainted == tainted => s,
            prev => {
                let rec = BundleRecord {
                    sequence: prev.map_or(1, |p| p.sequence + 1),
                    x509: roots.clone(),
                    jwt: jwt_keys,
                    tainted,
                };
                let mut b = Batch::new();
                b.put(BUNDLE_KEY.to_vec(), db::encode(&rec)?);
                self.store.commit(b).await?;
                tracing::info!(sequence = rec.sequence, "trust bundle updated");
                rec
            }
        };
        let bundle = Bundle {
            trust_domain: self.td.clone(),
            x509_authorities: roots,
            jwt_authorities: published_jwt
                .iter()
                .map(|r| JwtAuthority {
                    key_id: r.key_id.clone(),
                    public_key: r.public_key.first().cloned().unwrap_or_default(),
                })
                .collect(),
            sequence: record.sequence,
            refresh_hint_secs: Some(300),
        };
        let mut authorities: Vec<(Kind, View)> =
            x509.iter().map(|r| (Kind::X509, r.view())).collect();
        authorities.extend(jwt.iter().map(|r| (Kind::Jwt, r.view())));
        Ok(ActiveSet {
            x509: Arc::new(signer),
            jwt: Arc::new(jwt_signer),
            bundle: Arc::new(bundle),
            taints: Arc::new(taints),
            revoked_signing,
            authorities,
        })
    }
}

/// Adds the journal record of a state change to `b`, in the audit log, so the change and its
/// record are durable together.
fn journal(
    b: &mut Batch,
    now: SystemTime,
    kind: Kind,
    id: &str,
    state: &str,
    actor: Actor,
) -> Result<(), ApiError> {
    let mut rec =
        crate::audit::AuditRecord::new(now, &format!("authority-{state}"), actor.as_str(), "");
    rec.authority = id.to_owned();
    rec.serial = kind.as_str().to_owned();
    rec.add_to(b)
}

/// The CA server's SPIFFE ID for trust domain `td`.
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    // `/ward/server` is a valid path in every trust domain.
    td.id_from_segments(["ward", "server"])
        .expect("ward/server is a valid SPIFFE ID path")
}

#[cfg(test)]
mod tests {
    use super::*;
    use AuthorityState::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn a(id: &str, state: AuthorityState, nb: u64, na: u64) -> View {
        View {
            id: id.to_owned(),
            state,
            not_before: t(nb),
            not_after: t(na),
            upstream: false,
        }
    }

    #[test]
    fn rotation_plan_table() {
        let s = Schedule::default();
        let cases: Vec<(Vec<View>, u64, Vec<Step>)> = vec![
            (vec![], 0, vec![Step::Prepare]),
            (
                vec![a("p", Prepared, 0, 600)],
                10,
                vec![Step::Activate("p".into())],
            ),
            (vec![a("a", Active, 0, 600)], 299, vec![]),
            (vec![a("a", Active, 0, 600)], 300, vec![Step::Prepare]),
            (
                vec![a("a", Active, 0, 600), a("p", Prepared, 300, 900)],
                499,
                vec![],
            ),
            (
                vec![a("a", Active, 0, 600), a("p", Prepared, 300, 900)],
                500,
                vec![Step::Activate("p".into())],
            ),
            (
                vec![a("o", Old, 0, 600), a("a", Active, 300, 900)],
                599,
                vec![],
            ),
            (
                vec![a("o", Old, 0, 600), a("a", Active, 300, 900)],
                600,
                vec![Step::Drop("o".into()), Step::Prepare],
            ),
            // Tainted and revoked authorities are dropped at expiry too; a tainted prepared
            // authority is not activated, a new one is prepared in its place.
            (
                vec![
                    a("t", Tainted, 0, 600),
                    a("r", Revoked, 0, 500),
                    a("a", Active, 300, 900),
                ],
                600,
                vec![
                    Step::Drop("t".into()),
                    Step::Drop("r".into()),
                    Step::Prepare,
                ],
            ),
            (
                vec![a("a", Active, 0, 600), a("t", Tainted, 300, 900)],
                550,
                vec![Step::Prepare],
            ),
            // Prepared late (after an outage): not activated before it has been published for
            // the schedule's gap (200 s here)...
            (
                vec![a("a", Active, 0, 600), a("p", Prepared, 510, 1110)],
                520,
                vec![],
            ),
            // ...unless the active authority is about to expire (600 - 100/2 = 550).
            (
                vec![a("a", Active, 0, 600), a("p", Prepared, 510, 1110)],
                550,
                vec![Step::Activate("p".into())],
            ),
        ];
        for (i, (auths, now, want)) in cases.into_iter().enumerate() {
            assert_eq!(plan(&auths, s, t(now)), want, "case {i}");
        }
        let manual = Schedule {
            automatic: false,
            ..s
        };
        assert_eq!(plan(&[a("a", Active, 0, 600)], manual, t(590)), vec![]);
        assert_eq!(plan(&[], manual, t(0)), vec![Step::Prepare]);
    }

    #[test]
    fn transitions_follow_the_rails() {
        let k = Kind::X509;
        let set = vec![
            a("a", Active, 0, 600),
            a("p", Prepared, 300, 900),
            a("o", Old, 0, 500),
        ];
        let code = |r: Result<Vec<(String, AuthorityState)>, ApiError>| match r {
            Ok(_) => "ok",
            Err(ApiError::NotFound(_)) => "not-found",
            Err(ApiError::FailedPrecondition(_)) => "refused",
            Err(_) => "other",
        };
        assert_eq!(code(transition(k, &set, &Op::Prepare)), "refused");
        assert_eq!(
            transition(k, &set, &Op::Activate(None)).unwrap(),
            vec![("p".to_owned(), Active), ("a".to_owned(), Old)]
        );
        assert_eq!(
            code(transition(k, &set, &Op::Activate(Some("o".into())))),
            "refused"
        );
        assert_eq!(code(transition(k, &set, &Op::Taint("a".into()))), "refused");
        assert_eq!(
            code(transition(k, &set, &Op::Revoke("a".into()))),
            "refused"
        );
        assert_eq!(
            code(transition(k, &set, &Op::Taint("zz".into()))),
            "not-found"
        );
        assert_eq!(
            transition(k, &set, &Op::Taint("o".into())).unwrap(),
            vec![("o".to_owned(), Tainted)]
        );
        assert_eq!(
            transition(k, &set, &Op::Revoke("o".into())).unwrap(),
            vec![("o".to_owned(), Revoked)]
        );
        let done = vec![a("a", Active, 0, 600), a("r", Revoked, 0, 500)];
        assert_eq!(
            code(transition(k, &done, &Op::Revoke("r".into()))),
            "refused"
        );
        assert_eq!(
            code(transition(k, &done, &Op::Taint("r".into()))),
            "refused"
        );
        assert_eq!(code(transition(k, &done, &Op::Activate(None))), "refused");
        assert_eq!(code(transition(k, &done, &Op::Prepare)), "ok");
    }
}
