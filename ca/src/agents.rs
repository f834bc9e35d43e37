//! Node agents: join tokens, attested-agent records, and the check every agent call passes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use ward_spiffe::{SpiffeId, TrustDomain};
use ward_store::{Batch, Store, scan_all};

use crate::db::{self, from_unix, unix};
use crate::error::ApiError;

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Agent ID.
    pub id: SpiffeId,
    /// `join_token`, `k8s_psat`, ...
    pub attestation_type: String,
    /// Node selectors from attestation.
    pub selectors: Vec<String>,
    /// Hex serial of the newest agent SVID.
    pub serial: String,
    /// Hex serial of the previous SVID, accepted until the agent first uses the new one.
    pub prev_serial: Option<String>,
    /// Expiry of the newest SVID, Unix seconds.
    pub expires_at: i64,
    /// First attestation, Unix seconds.
    pub attested_at: i64,
    /// Evicted agents are refused everything.
    pub evicted: bool,
}

/// A join token (stored under the SHA-256 of the token, never the token itself). A used token
/// is kept until it expires, naming the key it attested, so that an attestation whose commit
/// was acknowledged too late (a timeout, a CA replica dying) can be retried by the same agent
/// with the same key; the leader removes expired tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Token ID, part of the agent ID.
    pub id: String,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// Creation, Unix seconds.
    pub created_at: i64,
    /// Once used: SHA-256 (hex) of the public key it attested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
}

fn agent_key(id: &SpiffeId) -> Vec<u8> {
    format!("agent/{id}").into_bytes()
}

fn token_key(token: &str) -> Vec<u8> {
    format!("token/{}", hex::encode(Sha256::digest(token.as_bytes()))).into_bytes()
}

/// What the caller check concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerCheck {
    /// The presented SVID is the current one.
    Current,
    /// The agent presented its newest SVID for the first time: forget the previous one.
    PromoteNew,
}

/// Decides whether an agent presenting an SVID with `serial` may call the CA. Pure.
pub fn check_caller(record: Option<&AgentRecord>, serial: &str) -> Result<CallerCheck, ApiError> {
    let r = record.ok_or_else(|| ApiError::PermissionDenied("agent is not attested".into()))?;
    if r.evicted {
        return Err(ApiError::PermissionDenied(format!(
            "agent {} has been evicted",
            r.id
        )));
    }
    if r.serial == serial {
        return Ok(if r.prev_serial.is_some() {
            CallerCheck::PromoteNew
        } else {
            CallerCheck::Current
        });
    }
    if r.prev_serial.as_deref() == Some(serial) {
        return Ok(CallerCheck::Current);
    }
    Err(ApiError::PermissionDenied(
        "agent SVID has been superseded by a newer one".into(),
    ))
}

/// Agent and join-token records.
#[derive(Debug)]
pub struct AgentRepo {
    store: Arc<dyn Store>,
    td: TrustDomain,
}

/// A join token that passed validation, with what is needed to consume it atomically.
#[derive(Debug)]
pub struct ValidToken {
    key: Vec<u8>,
    raw: Vec<u8>,
    record: JoinTokenRecord,
    /// The agent ID it grants.
    pub agent_id: SpiffeId,
}

impl ValidToken {
    /// The public key (SHA-256, hex) that already attested with this token, if it was used.
    pub fn used_by(&self) -> Option<&str> {
        self.record.used_by.as_deref()
    }
}

impl AgentRepo {
    /// A repository over `store`.
    pub fn new(store: Arc<dyn Store>, td: TrustDomain) -> Self {
        Self { store, td }
    }

    /// The same repository writing through `fence` (singleton work: token pruning).
    pub fn fenced(&self, fence: ward_store::Condition) -> Self {
        Self {
            store: Arc::new(ward_store::Fenced::new(self.store.clone(), fence)),
            td: self.td.clone(),
        }
    }

    /// The agent ID for a join token ID.
    pub fn join_token_agent_id(&self, token_id: &str) -> Result<SpiffeId, ApiError> {
        self.td
            .id_from_segments(["ward", "agent", "join_token", token_id])
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// Creates a single-use join token; returns `(token, record)`.
    pub async fn create_join_token(
        &self,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(String, JoinTokenRecord), ApiError> {
        let token = db::random_hex(&mut rand::rng(), 20);
        let rec = JoinTokenRecord {
            id: db::random_hex(&mut rand::rng(), 8),
            expires_at: unix(now + ttl),
            created_at: unix(now),
            used_by: None,
        };
        let key = token_key(&token);
        let mut b = Batch::new();
        b.require(key.clone(), None).put(key, db::encode(&rec)?);
        self.store.commit(b).await?;
        Ok((token, rec))
    }

    /// Checks a join token without consuming it.
    pub async fn check_join_token(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<ValidToken, ApiError> {
        if token.is_empty() || token.len() > 256 {
            return Err(ApiError::InvalidArgument(
                "join token is empty or too long".into(),
            ));
        }
        let key = token_key(token);
        let raw = self.store.get(&key).await?.ok_or_else(|| {
            ApiError::PermissionDenied("join token is unknown or has already been used".into())
        })?;
        let rec: JoinTokenRecord = db::decode(&key, &raw)?;
        if from_unix(rec.expires_at) <= now {
            return Err(ApiError::PermissionDenied("join token has expired".into()));
        }
        Ok(ValidToken {
            key,
            raw,
            agent_id: self.join_token_agent_id(&rec.id)?,
            record: rec,
        })
    }

    /// Adds to `batch` the consumption of `token` by the key with SHA-256 `key_hash` (fails the
    /// batch if it was used meanwhile) and the new agent record.
    pub fn attest_with_token(
        &self,
        batch: &mut Batch,
        token: ValidToken,
        key_hash: &str,
        record: &AgentRecord,
    ) -> Result<(), ApiError> {
        let mut used = token.record;
        used.used_by = Some(key_hash.to_owned());
        batch
            .require(token.key.clone(), Some(token.raw))
            .put(token.key, db::encode(&used)?)
            .require(agent_key(&record.id), None)
            .put(agent_key(&record.id), db::encode(record)?);
        Ok(())
    }

    /// Removes expired join tokens, used or not. Singleton work: the leader runs it through
    /// [`fenced`](Self::fenced).
    pub async fn prune_tokens(&self, now: SystemTime) -> Result<usize, ApiError> {
        let page = self.store.limits().max_ops.saturating_sub(1).clamp(1, 512);
        let now_s = unix(now);
        let mut removed = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let rows = self.store.scan(b"token/", after.as_deref(), page).await?;
            let Some((last, _)) = rows.last() else { break };
            after = Some(last.clone());
            let mut b = Batch::new();
            for (k, v) in &rows {
                let r: JoinTokenRecord = db::decode(k, v)?;
                if r.expires_at <= now_s {
                    b.delete(k.clone());
                }
            }
            let n = b.ops.len();
            if n > 0 {
                self.store.commit(b).await?;
                removed += n;
            }
            if rows.len() < page {
                break;
            }
        }
        Ok(removed)
    }

    /// Adds to `batch` the creation of a new agent record (fails if one exists).
    pub fn create(&self, batch: &mut Batch, record: &AgentRecord) -> Result<(), ApiError> {
        let key = agent_key(&record.id);
        batch
            .require(key.clone(), None)
            .put(key, db::encode(record)?);
        Ok(())
    }

    /// Reads an agent record with its raw bytes (for conditional updates).
    pub async fn get_raw(&self, id: &SpiffeId) -> Result<Option<(AgentRecord, Vec<u8>)>, ApiError> {
        let key = agent_key(id);
        match self.store.get(&key).await? {
            Some(raw) => Ok(Some((db::decode(&key, &raw)?, raw))),
            None => Ok(None),
        }
    }

    /// Adds to `batch` a replacement of agent `record`, conditional on `expected`.
    pub fn put(
        &self,
        batch: &mut Batch,
        record: &AgentRecord,
        expected: Vec<u8>,
    ) -> Result<(), ApiError> {
        let key = agent_key(&record.id);
        batch
            .require(key.clone(), Some(expected))
            .put(key, db::encode(record)?);
        Ok(())
    }

    /// Every agent record.
    pub async fn list(&self) -> Result<Vec<AgentRecord>, ApiError> {
        scan_all(self.store.as_ref(), b"agent/")
            .await?
            .iter()
            .map(|(k, v)| db::decode(k, v))
            .collect()
    }

    /// Marks an agent evicted.
    pub async fn evict(&self, id: &SpiffeId) -> Result<AgentRecord, ApiError> {
        let (mut rec, raw) = self
            .get_raw(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("agent {id} not found")))?;
        rec.evicted = true;
        let mut b = Batch::new();
        self.put(&mut b, &rec, raw)?;
        self.store.commit(b).await?;
        Ok(rec)
    }

    /// Wakes on writes of agent `id`'s record (its renewal, eviction, ban) — not on every
    /// other agent's, so a sync stream costs nothing when another agent renews (an O(agents)
    /// wake-up per renewal otherwise, and a store read each on etcd).
    pub fn watch_one(&self, id: &SpiffeId) -> ward_store::Watch {
        self.store.watch(&agent_key(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(serial: &str, prev: Option<&str>, evicted: bool) -> AgentRecord {
        AgentRecord {
            id: SpiffeId::new("spiffe://td/ward/agent/x").unwrap(),
            attestation_type: "join_token".into(),
            selectors: vec![],
            serial: serial.into(),
            prev_serial: prev.map(Into::into),
            expires_at: 0,
            attested_at: 0,
            evicted,
        }
    }

    #[test]
    fn caller_check_table() {
        assert!(check_caller(None, "a").is_err());
        assert_eq!(
            check_caller(Some(&rec("a", None, false)), "a").unwrap(),
            CallerCheck::Current
        );
        assert!(check_caller(Some(&rec("a", None, false)), "b").is_err());
        assert!(check_caller(Some(&rec("a", None, true)), "a").is_err());
        assert_eq!(
            check_caller(Some(&rec("b", Some("a"), false)), "a").unwrap(),
            CallerCheck::Current
        );
        assert_eq!(
            check_caller(Some(&rec("b", Some("a"), false)), "b").unwrap(),
            CallerCheck::PromoteNew
        );
        assert!(check_caller(Some(&rec("b", Some("a"), false)), "c").is_err());
    }
}
