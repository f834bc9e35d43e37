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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// Superseded; still published until it expires.
    Old,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BundleRecord {
    sequence: u64,
    #[serde(with = "b64")]
    x509: Vec<Vec<u8>>,
    jwt: Vec<(String, String)>,
}

/// Lifecycle step chosen by [`plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create and publish a successor.
    Prepare,
    /// Make the prepared authority `0` active; the current active becomes old.
    Activate(String),
    /// Forget the expired old authority `0`.
    Drop(String),
}

/// Lifetime fractions at which rotation steps happen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Fraction of the active authority's lifetime at which a successor is prepared.
    pub prepare_at: f64,
    /// Fraction at which the successor becomes active.
    pub activate_at: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            prepare_at: 0.5,
            activate_at: 5.0 / 6.0,
        }
    }
}

/// Decides the rotation steps due at `now` for a set of authorities given as
/// `(id, state, not_before, not_after)`. Pure.
pub fn plan(
    authorities: &[(String, AuthorityState, SystemTime, SystemTime)],
    schedule: Schedule,
    now: SystemTime,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for (id, state, _, not_after) in authorities {
        if *state == AuthorityState::Old && *not_after <= now {
            steps.push(Step::Drop(id.clone()));
        }
    }
    let active = authorities.iter().find(|a| a.1 == AuthorityState::Active);
    let prepared = authorities.iter().find(|a| a.1 == AuthorityState::Prepared);
    let Some((_, _, nb, na)) = active else {
        match prepared {
            Some((id, ..)) => steps.push(Step::Activate(id.clone())),
            None => steps.push(Step::Prepare),
        }
        return steps;
    };
    let life = na.duration_since(*nb).unwrap_or_default();
    let at = |f: f64| *nb + life.mul_f64(f);
    match prepared {
        None if now >= at(schedule.prepare_at) => steps.push(Step::Prepare),
        Some((id, ..)) if now >= at(schedule.activate_at) => steps.push(Step::Activate(id.clone())),
        _ => {}
    }
    steps
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
    upstream: Option<Upstream>,
    schedule: Schedule,
}

/// Owns the authorities of one trust domain.
pub struct Authorities {
    records: Records,
    clock: Arc<dyn Clock>,
    current: RwLock<Arc<ActiveSet>>,
    bundle_tx: watch::Sender<Arc<Bundle>>,
    lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Authorities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorities")
            .field("td", &self.records.td)
            .finish_non_exhaustive()
    }
}

fn x509_key(id: &str) -> Vec<u8> {
    format!("authority/x509/{id}").into_bytes()
}

fn jwt_key(kid: &str) -> Vec<u8> {
    format!("authority/jwt/{kid}").into_bytes()
}

const BUNDLE_KEY: &[u8] = b"bundle";

impl Authorities {
    /// Loads the authorities from the store, creating the first ones in an empty store.
    pub async fn open(
        cfg: &CaConfig,
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyManager>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ApiError> {
        let records = Records {
            store,
            keys,
            td: cfg.trust_domain.clone(),
            ca_ttl: cfg.ttl.ca,
            upstream: cfg.upstream.as_ref().map(load_upstream).transpose()?,
            schedule: Schedule::default(),
        };
        records.run_steps(clock.now()).await?;
        let set = Arc::new(records.load_set().await?);
        let (bundle_tx, _) = watch::channel(set.bundle.clone());
        Ok(Self {
            records,
            clock,
            current: RwLock::new(set),
            bundle_tx,
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

    /// Subscribes to bundle changes.
    pub fn watch_bundle(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle_tx.subscribe()
    }

    /// Runs the rotation schedule once and publishes the result. Called periodically.
    pub async fn maintain(&self) -> Result<(), ApiError> {
        let _g = self.lock.lock().await;
        self.records.run_steps(self.clock.now()).await?;
        let set = Arc::new(self.records.load_set().await?);
        let bundle = set.bundle.clone();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = set;
        self.bundle_tx.send_if_modified(|b| {
            if **b != *bundle {
                *b = bundle.clone();
                true
            } else {
                false
            }
        });
        Ok(())
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
        scan_all(self.store.as_ref(), b"authority/x509/")
            .await?
            .iter()
            .map(|(k, v)| db::decode(k, v))
            .collect()
    }

    async fn jwt_records(&self) -> Result<Vec<JwtRecord>, ApiError> {
        scan_all(self.store.as_ref(), b"authority/jwt/")
            .await?
            .iter()
            .map(|(k, v)| db::decode(k, v))
            .collect()
    }

    /// Prepares, activates and drops authorities as the schedule says is due at `now`.
    async fn run_steps(&self, now: SystemTime) -> Result<(), ApiError> {
        let x509 = self.x509_records().await?;
        let view: Vec<_> = x509
            .iter()
            .map(|r| {
                (
                    r.id.clone(),
                    r.state,
                    from_unix(r.not_before),
                    from_unix(r.not_after),
                )
            })
            .collect();
        for step in plan(&view, self.schedule, now) {
            let mut b = Batch::new();
            match step {
                Step::Prepare => {
                    let id = format!("x509-{}", db::random_hex(&mut rand::rng(), 8));
                    let key = self
                        .keys
                        .generate(&id)
                        .map_err(|e| ApiError::Internal(e.to_string()))?;
                    let signer = self.new_x509_signer(&id, key, now, &mut rand::rng())?;
                    let state = if view.iter().any(|v| v.1 == AuthorityState::Active) {
                        AuthorityState::Prepared
                    } else {
                        AuthorityState::Active
                    };
                    let rec = X509Record {
                        id: id.clone(),
                        state,
                        signing_chain: signer.signing_chain.clone(),
                        roots: signer.roots.clone(),
                        not_before: unix(now),
                        not_after: unix(signer.not_after),
                        upstream: !signer.self_signed,
                    };
                    tracing::info!(authority = %id, ?state, "X.509 authority created");
                    b.require(x509_key(&id), None)
                        .put(x509_key(&id), db::encode(&rec)?);
                }
                Step::Activate(id) => {
                    for r in &x509 {
                        let new_state = if r.id == id {
                            AuthorityState::Active
                        } else if r.state == AuthorityState::Active {
                            AuthorityState::Old
                        } else {
                            continue;
                        };
                        let rec = X509Record {
                            state: new_state,
                            ..r.clone()
                        };
                        b.put(x509_key(&r.id), db::encode(&rec)?);
                    }
                    tracing::info!(authority = %id, "X.509 authority activated");
                }
                Step::Drop(id) => {
                    b.delete(x509_key(&id));
                    tracing::info!(authority = %id, "expired X.509 authority removed");
                }
            }
            self.store.commit(b).await?;
        }

        let jwt = self.jwt_records().await?;
        let view: Vec<_> = jwt
            .iter()
            .map(|r| {
                (
                    r.key_id.clone(),
                    r.state,
                    from_unix(r.not_before),
                    from_unix(r.not_after),
                )
            })
            .collect();
        for step in plan(&view, self.schedule, now) {
            let mut b = Batch::new();
            match step {
                Step::Prepare => {
                    let kid = db::random_hex(&mut rand::rng(), 16);
                    let key_name = format!("jwt-{kid}");
                    let key = self
                        .keys
                        .generate(&key_name)
                        .map_err(|e| ApiError::Internal(e.to_string()))?;
                    let state = if view.iter().any(|v| v.1 == AuthorityState::Active) {
                        AuthorityState::Prepared
                    } else {
                        AuthorityState::Active
                    };
                    let rec = JwtRecord {
                        key_id: kid.clone(),
                        key_name,
                        state,
                        public_key: vec![key.public_key_der()],
                        not_before: unix(now),
                        not_after: unix(now + self.ca_ttl),
                    };
                    tracing::info!(key_id = %kid, ?state, "JWT authority created");
                    b.require(jwt_key(&kid), None)
                        .put(jwt_key(&kid), db::encode(&rec)?);
                }
                Step::Activate(kid) => {
                    for r in &jwt {
                        let new_state = if r.key_id == kid {
                            AuthorityState::Active
                        } else if r.state == AuthorityState::Active {
                            AuthorityState::Old
                        } else {
                            continue;
                        };
                        let rec = JwtRecord {
                            state: new_state,
                            ..r.clone()
                        };
                        b.put(jwt_key(&r.key_id), db::encode(&rec)?);
                    }
                    tracing::info!(key_id = %kid, "JWT authority activated");
                }
                Step::Drop(kid) => {
                    b.delete(jwt_key(&kid));
                    tracing::info!(key_id = %kid, "expired JWT authority removed");
                }
            }
            self.store.commit(b).await?;
        }
        Ok(())
    }

    fn new_x509_signer(
        &self,
        id: &str,
        key: PrivateKey,
        now: SystemTime,
        rng: &mut impl rand::RngCore,
    ) -> Result<X509Signer, ApiError> {
        let internal = |e: crate::issuer::IssueError| ApiError::Internal(e.to_string());
        match &self.upstream {
            None => {
                X509Signer::self_signed(id, key, &self.td, now, self.ca_ttl, rng).map_err(internal)
            }
            Some(up) => X509Signer::intermediate(
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
            .map_err(|e| ApiError::FailedPrecondition(format!("upstream signing failed: {e}"))),
        }
    }

    /// Builds the active signers and the bundle from the stored records; bumps and stores the
    /// bundle sequence if the published keys changed.
    async fn load_set(&self) -> Result<ActiveSet, ApiError> {
        let x509 = self.x509_records().await?;
        let jwt = self.jwt_records().await?;
        let active_x509 = x509
            .iter()
            .find(|r| r.state == AuthorityState::Active)
            .ok_or_else(|| ApiError::Internal("no active X.509 authority".into()))?;
        let active_jwt = jwt
            .iter()
            .find(|r| r.state == AuthorityState::Active)
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

        let mut roots: Vec<Vec<u8>> = Vec::new();
        for r in &x509 {
            for root in &r.roots {
                if !roots.contains(root) {
                    roots.push(root.clone());
                }
            }
        }
        let jwt_keys: Vec<(String, String)> = jwt
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
        let stored: Option<BundleRecord> = db::get(self.store.as_ref(), BUNDLE_KEY).await?;
        let record = match stored {
            Some(s) if s.x509 == roots && s.jwt == jwt_keys => s,
            prev => {
                let rec = BundleRecord {
                    sequence: prev.map_or(1, |p| p.sequence + 1),
                    x509: roots.clone(),
                    jwt: jwt_keys,
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
            jwt_authorities: jwt
                .iter()
                .map(|r| JwtAuthority {
                    key_id: r.key_id.clone(),
                    public_key: r.public_key.first().cloned().unwrap_or_default(),
                })
                .collect(),
            sequence: record.sequence,
            refresh_hint_secs: Some(300),
        };
        Ok(ActiveSet {
            x509: Arc::new(signer),
            jwt: Arc::new(jwt_signer),
            bundle: Arc::new(bundle),
        })
    }
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

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn rotation_plan_table() {
        use AuthorityState::*;
        let s = Schedule::default();
        let a = |id: &str, st, nb, na| (id.to_owned(), st, t(nb), t(na));
        let cases: Vec<(
            Vec<(String, AuthorityState, SystemTime, SystemTime)>,
            u64,
            Vec<Step>,
        )> = vec![
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
        ];
        for (i, (auths, now, want)) in cases.into_iter().enumerate() {
            assert_eq!(plan(&auths, s, t(now)), want, "case {i}");
        }
    }
}
