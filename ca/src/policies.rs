//! Authorization policies stored in the CA: validated as a whole set on every write (so the
//! stored set always compiles), streamed to agents, and explainable (`ward-ca policy explain`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use ward_spiffe::policy::{Policy, PolicySet};
use ward_store::{Batch, Store, scan_all};

use crate::db;
use crate::error::ApiError;

/// Prefix of policy records (watch it to learn of policy writes).
pub const POLICY_PREFIX: &[u8] = b"policy/";
const REVISION_KEY: &[u8] = b"meta/policy_revision";

/// A stored policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// The policy.
    pub policy: Policy,
    /// Policy revision of its last write.
    pub revision: u64,
}

fn key(name: &str) -> Vec<u8> {
    format!("policy/{name}").into_bytes()
}

/// The policy repository.
#[derive(Debug)]
pub struct PolicyRepo {
    store: Arc<dyn Store>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl PolicyRepo {
    /// A repository over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            lock: Arc::default(),
        }
    }

    /// The same repository writing through `fence` (singleton work: the leader's writes;
    /// after it is deposed they fail with `FAILED_PRECONDITION` and write nothing). It shares
    /// this one's in-process lock.
    pub fn fenced(&self, fence: ward_store::Condition) -> Self {
        Self {
            store: Arc::new(ward_store::Fenced::new(self.store.clone(), fence)),
            lock: self.lock.clone(),
        }
    }

    /// Every stored policy, by name.
    pub async fn list(&self) -> Result<Vec<PolicyRecord>, ApiError> {
        scan_all(self.store.as_ref(), POLICY_PREFIX)
            .await?
            .iter()
            .map(|(k, v)| db::decode(k, v))
            .collect()
    }

    /// One policy.
    pub async fn get(&self, name: &str) -> Result<Option<PolicyRecord>, ApiError> {
        if name.is_empty() || name.contains('/') {
            return Err(ApiError::InvalidArgument(format!(
                "invalid policy name {name:?}"
            )));
        }
        db::get(self.store.as_ref(), &key(name)).await
    }

    /// The stored set, compiled.
    pub async fn set(&self) -> Result<PolicySet, ApiError> {
        let all = self.list().await?.into_iter().map(|r| r.policy).collect();
        PolicySet::compile(all)
            .map_err(|e| ApiError::Internal(format!("stored policies do not compile: {e}")))
    }

    /// Creates or replaces `policies` by name, atomically; the resulting whole set must
    /// validate, or nothing is written.
    pub async fn put(&self, policies: Vec<Policy>) -> Result<Vec<PolicyRecord>, ApiError> {
        if policies.is_empty() {
            return Err(ApiError::InvalidArgument("no policies given".into()));
        }
        for p in &policies {
            if p.name.contains('/') {
                return Err(ApiError::InvalidArgument(format!(
                    "policy name {:?} must not contain '/'",
                    p.name
                )));
            }
        }
        // The new policies must be valid among themselves (this also catches duplicate names)...
        PolicySet::compile(policies.clone())
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let _g = self.lock.lock().await;
        // Another replica writing at the same time changes the revision: validate and write
        // again on what it wrote.
        for attempt in 1..=32u64 {
            match self.try_put(&policies).await {
                Err(ApiError::Aborted(_)) if attempt < 32 => {
                    let ms = attempt.min(8) * rand::random_range(1..=5u64);
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                r => return r,
            }
        }
        Err(ApiError::Aborted(
            "policies kept changing under concurrent writers; try again".into(),
        ))
    }

    async fn try_put(&self, policies: &[Policy]) -> Result<Vec<PolicyRecord>, ApiError> {
        let current = self.list().await?;
        // ...and together with what stays.
        let mut merged: Vec<Policy> = current
            .iter()
            .filter(|r| !policies.iter().any(|p| p.name == r.policy.name))
            .map(|r| r.policy.clone())
            .collect();
        merged.extend(policies.iter().cloned());
        PolicySet::compile(merged).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let raw = self.store.get(REVISION_KEY).await?;
        let rev = raw
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        let mut b = Batch::new();
        b.require(REVISION_KEY.to_vec(), raw)
            .put(REVISION_KEY.to_vec(), rev.to_string().into_bytes());
        let mut out = Vec::new();
        for p in policies.iter().cloned() {
            let rec = PolicyRecord {
                policy: p,
                revision: rev,
            };
            b.put(key(&rec.policy.name), db::encode(&rec)?);
            out.push(rec);
        }
        self.store.commit(b).await?;
        Ok(out)
    }

    /// Deletes a policy.
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        let _g = self.lock.lock().await;
        let k = key(name);
        let raw = self
            .store
            .get(&k)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("policy {name} not found")))?;
        let mut b = Batch::new();
        b.require(k.clone(), Some(raw)).delete(k);
        self.store.commit(b).await?;
        Ok(())
    }

    /// Wakes on every policy write.
    pub fn watch(&self) -> ward_store::Watch {
        self.store.watch(POLICY_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_store::MemStore;

    fn policy(name: &str, target: &str) -> Policy {
        serde_json::from_value(serde_json::json!({
            "name": name, "target": { "spiffe_ids": [target] }, "action": "ALLOW", "rules": [ {} ]
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn put_validates_the_whole_set() {
        let repo = PolicyRepo::new(Arc::new(MemStore::new()));
        repo.put(vec![policy("a", "spiffe://td/a")]).await.unwrap();
        repo.put(vec![
            policy("b", "spiffe://td/b"),
            policy("a", "spiffe://td/a2"),
        ])
        .await
        .unwrap();
        let names: Vec<_> = repo
            .list()
            .await
            .unwrap()
            .iter()
            .map(|r| r.policy.name.clone())
            .collect();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(
            repo.get("a")
                .await
                .unwrap()
                .unwrap()
                .policy
                .target
                .spiffe_ids,
            vec!["spiffe://td/a2"]
        );
        let bad = repo.put(vec![policy("c", "not-an-id")]).await;
        assert!(matches!(bad, Err(ApiError::InvalidArgument(_))));
        let dup = repo
            .put(vec![
                policy("d", "spiffe://td/d"),
                policy("d", "spiffe://td/e"),
            ])
            .await;
        assert!(matches!(dup, Err(ApiError::InvalidArgument(_))));
        assert_eq!(
            repo.list().await.unwrap().len(),
            2,
            "nothing written by refused puts"
        );
        repo.delete("a").await.unwrap();
        assert!(matches!(repo.delete("a").await, Err(ApiError::NotFound(_))));
        assert_eq!(repo.set().await.unwrap().len(), 1);
    }
}
