//! Stored authority records and keys: creating, changing and dropping authorities in the
//! store (with their journal records), and building the signers and bundle from them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use ward_spiffe::{Bundle, JwtAuthority, TrustDomain};
use ward_store::{Batch, Store, scan_all};

use super::lifecycle::{Op, Schedule, Step, plan, transition};
use super::{
    ActiveSet, Actor, AuthorityState, JwtRecord, Kind, Live, Taints, View, X509Record, b64,
    server_id,
};
use crate::config::UpstreamConfig;
use crate::db::{self, from_unix, unix};
use crate::error::ApiError;
use crate::issuer::{JwtSigner, X509Signer};
use crate::keys::{KeyManager, PrivateKey};

const BUNDLE_KEY: &[u8] = b"bundle";

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

/// Upstream key material loaded from disk.
pub(super) struct Upstream {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    chain: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
}

pub(super) fn load_upstream(cfg: &UpstreamConfig) -> Result<Upstream, ApiError> {
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
pub(super) struct Records {
    pub(super) store: Arc<dyn Store>,
    pub(super) keys: Arc<dyn KeyManager>,
    pub(super) td: TrustDomain,
    pub(super) ca_ttl: Duration,
    pub(super) upstream: Option<UpstreamConfig>,
    pub(super) schedule: Schedule,
}

impl Records {
    /// This replica's key store name.
    pub(super) fn holder(&self) -> &str {
        self.keys.holder()
    }

    /// Every X.509 authority of every replica (records from before replicas are this one's).
    pub(super) async fn x509_records(&self) -> Result<Vec<X509Record>, ApiError> {
        let mut out: Vec<X509Record> = self.decode_all(Kind::X509).await?;
        for r in &mut out {
            self.own_if_unnamed(&mut r.holder);
        }
        Ok(out)
    }

    /// Every JWT authority of every replica.
    pub(super) async fn jwt_records(&self) -> Result<Vec<JwtRecord>, ApiError> {
        let mut out: Vec<JwtRecord> = self.decode_all(Kind::Jwt).await?;
        for r in &mut out {
            self.own_if_unnamed(&mut r.holder);
        }
        Ok(out)
    }

    async fn decode_all<T: serde::de::DeserializeOwned>(
        &self,
        kind: Kind,
    ) -> Result<Vec<T>, ApiError> {
        scan_all(self.store.as_ref(), kind.prefix())
            .await?
            .iter()
            .map(|(k, v)| db::decode(k, v))
            .collect()
    }

    /// A record written before replicas names no holder: it is this (the only) replica's.
    fn own_if_unnamed(&self, holder: &mut String) {
        if holder.is_empty() {
            *holder = self.holder().to_owned();
        }
    }

    /// The authorities of `kind` held by `holder`.
    pub(super) async fn views_of(&self, kind: Kind, holder: &str) -> Result<Vec<View>, ApiError> {
        let mut v = self.views(kind).await?;
        v.retain(|a| a.holder == holder);
        Ok(v)
    }

    pub(super) async fn views(&self, kind: Kind) -> Result<Vec<View>, ApiError> {
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
    pub(super) async fn run_steps(&self, now: SystemTime) -> Result<(), ApiError> {
        let mut first_err = None;
        for kind in [Kind::X509, Kind::Jwt] {
            if let Err(e) = self.run_kind(kind, now).await {
                tracing::error!(kind = kind.as_str(), error = %e, "authority rotation step failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    pub(super) async fn run_kind(&self, kind: Kind, now: SystemTime) -> Result<(), ApiError> {
        let all = self.views(kind).await?;
        // Another replica's authority that has expired verifies nothing any more; if that
        // replica is gone, nobody else would ever remove it from the bundle.
        for a in all
            .iter()
            .filter(|a| a.holder != self.holder() && a.not_after <= now)
        {
            self.drop_foreign(kind, a, now).await?;
        }
        let views: Vec<View> = all
            .into_iter()
            .filter(|a| a.holder == self.holder())
            .collect();
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

    /// Removes another replica's expired authority, only as it was read (two replicas may
    /// both try; one wins, the other finds it changed and leaves it).
    async fn drop_foreign(&self, kind: Kind, a: &View, now: SystemTime) -> Result<(), ApiError> {
        let key = kind.key(&a.id);
        let Some(raw) = self.store.get(&key).await? else {
            return Ok(());
        };
        let mut b = Batch::new();
        b.require(key.clone(), Some(raw)).delete(key);
        journal(&mut b, now, kind, &a.id, "dropped", Actor::Schedule)?;
        match self.store.commit(b).await {
            Ok(()) => {
                tracing::info!(kind = kind.as_str(), authority = %a.id, holder = %a.holder, "another replica's expired authority removed");
                Ok(())
            }
            Err(ward_store::StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Adds a new authority of `kind` to `b`: prepared, or active if there is no active one.
    pub(super) async fn prepare(
        &self,
        kind: Kind,
        now: SystemTime,
        actor: Actor,
        b: &mut Batch,
    ) -> Result<String, ApiError> {
        let views = self.views_of(kind, self.holder()).await?;
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
                    holder: self.holder().to_owned(),
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
                    holder: self.holder().to_owned(),
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
    pub(super) async fn apply(
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

    /// The SVIDs `a` signed that are unexpired at `now` and not superseded by a newer SVID for
    /// the same holder (agent SVIDs: the agent; workload SVIDs: agent and entry). JWT-SVIDs are
    /// bearer tokens nobody can recall: every unexpired one counts.
    pub(super) async fn live_svids(
        &self,
        kind: Kind,
        a: &View,
        now: SystemTime,
    ) -> Result<Live, ApiError> {
        crate::audit::live(self.store.as_ref(), kind == Kind::Jwt, &a.id, now).await
    }

    pub(super) fn new_x509_signer(
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
    pub(super) async fn load_set(&self) -> Result<ActiveSet, ApiError> {
        // Replicas on one store race to publish a new sequence; the loser reads again.
        for _ in 0..8 {
            if let Some(set) = self.try_load_set().await? {
                return Ok(set);
            }
        }
        Err(ApiError::Aborted(
            "the trust bundle kept changing under this replica; try again".into(),
        ))
    }

    /// One attempt: `None` when another replica stored a bundle meanwhile. The stored bundle
    /// is read before the authorities, so a bundle computed here is never older than the one
    /// it replaces, and it replaces only the one that was read (compare-and-swap).
    async fn try_load_set(&self) -> Result<Option<ActiveSet>, ApiError> {
        use AuthorityState::*;
        let stored_raw = self.store.get(BUNDLE_KEY).await?;
        let x509 = self.x509_records().await?;
        let jwt = self.jwt_records().await?;
        let me = self.holder();
        let active_x509 = x509
            .iter()
            .find(|r| r.state == Active && r.holder == me)
            .ok_or_else(|| ApiError::Internal(format!("no active X.509 authority held by {me}")))?;
        let active_jwt = jwt
            .iter()
            .find(|r| r.state == Active && r.holder == me)
            .ok_or_else(|| ApiError::Internal(format!("no active JWT authority held by {me}")))?;
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

        let stored: Option<BundleRecord> = stored_raw
            .as_deref()
            .map(|raw| db::decode(BUNDLE_KEY, raw))
            .transpose()?;
        let record = match stored {
            Some(s) if s.x509 == roots && s.jwt == jwt_keys && s.tainted == tainted => s,
            prev => {
                let rec = BundleRecord {
                    sequence: prev.map_or(1, |p| p.sequence + 1),
                    x509: roots.clone(),
                    jwt: jwt_keys,
                    tainted,
                };
                match self
                    .store
                    .compare_and_swap(BUNDLE_KEY, stored_raw.as_deref(), Some(&db::encode(&rec)?))
                    .await
                {
                    Ok(()) => {}
                    Err(ward_store::StoreError::Conflict { .. }) => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
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
        Ok(Some(ActiveSet {
            x509: Arc::new(signer),
            jwt: Arc::new(jwt_signer),
            bundle: Arc::new(bundle),
            taints: Arc::new(taints),
            revoked_signing,
            authorities,
        }))
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
