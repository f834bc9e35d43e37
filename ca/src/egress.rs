//! The mesh's egress configuration in the CA: the operator's record (`ward-ca egress apply`:
//! default, namespace overrides, services; replaced as a whole) plus the external services the
//! Kubernetes controller keeps from `ExternalService` resources, one record each. Every write
//! is checked against the whole resulting configuration first (a refused one changes nothing,
//! so the last good configuration stays in force); it is streamed to agents with the policies
//! and explainable (`ward-ca egress explain`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use ward_spiffe::egress::{EgressDoc, EgressSet, ExternalService};
use ward_store::{Batch, Store, scan_all};

use crate::db;
use crate::error::ApiError;

/// Prefix of the egress record (watch it to learn of writes).
pub const EGRESS_PREFIX: &[u8] = b"egress/";
const KEY: &[u8] = b"egress/config";
const K8S_PREFIX: &str = "egress/k8s/";
const REVISION_KEY: &[u8] = b"meta/egress_revision";

fn k8s_key(cluster: &str, name: &str) -> Vec<u8> {
    format!("{K8S_PREFIX}{cluster}/{name}").into_bytes()
}

/// The stored configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRecord {
    /// The configuration.
    pub doc: EgressDoc,
    /// How many times it was written (0: never; the empty default applies).
    pub revision: u64,
}

/// The egress repository.
#[derive(Debug)]
pub struct EgressRepo {
    store: Arc<dyn Store>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl EgressRepo {
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

    /// The configuration in force: the operator's, then the services from Kubernetes (never
    /// written: deny everything outside the mesh). The revision counts every write.
    pub async fn get(&self) -> Result<EgressRecord, ApiError> {
        let mut rec: EgressRecord = db::get(self.store.as_ref(), KEY).await?.unwrap_or_default();
        for (_, svc) in self.k8s_services().await? {
            rec.doc.services.push(svc);
        }
        rec.revision = self.revision().await?.1;
        Ok(rec)
    }

    /// The configuration, compiled.
    pub async fn set(&self) -> Result<EgressSet, ApiError> {
        EgressSet::compile(self.get().await?.doc)
            .map_err(|e| ApiError::Internal(format!("stored egress does not compile: {e}")))
    }

    async fn revision(&self) -> Result<(Option<Vec<u8>>, u64), ApiError> {
        let raw = self.store.get(REVISION_KEY).await?;
        let n = raw
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        Ok((raw, n))
    }

    /// The services from Kubernetes, by store key.
    async fn k8s_services(&self) -> Result<Vec<(Vec<u8>, ExternalService)>, ApiError> {
        scan_all(self.store.as_ref(), K8S_PREFIX.as_bytes())
            .await?
            .into_iter()
            .map(|(k, v)| {
                let s = db::decode(&k, &v)?;
                Ok((k, s))
            })
            .collect()
    }

    /// Checks `doc` as the whole configuration; commits `b` with the revision bumped.
    async fn commit_checked(&self, doc: EgressDoc, mut b: Batch) -> Result<u64, ApiError> {
        EgressSet::compile(doc).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let (raw, rev) = self.revision().await?;
        b.require(REVISION_KEY.to_vec(), raw)
            .put(REVISION_KEY.to_vec(), (rev + 1).to_string().into_bytes());
        self.store.commit(b).await?;
        Ok(rev + 1)
    }

    /// Replaces the operator's configuration; the result must validate with the services from
    /// Kubernetes, or nothing is written.
    pub async fn put(&self, doc: EgressDoc) -> Result<EgressRecord, ApiError> {
        EgressSet::compile(doc.clone()).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let _g = self.lock.lock().await;
        let mut merged = doc.clone();
        merged
            .services
            .extend(self.k8s_services().await?.into_iter().map(|(_, s)| s));
        let raw = self.store.get(KEY).await?;
        let rec = EgressRecord { doc, revision: 0 };
        let mut b = Batch::new();
        b.require(KEY.to_vec(), raw)
            .put(KEY.to_vec(), db::encode(&rec)?);
        let revision = self.commit_checked(merged, b).await?;
        Ok(EgressRecord { revision, ..rec })
    }

    /// Creates or replaces the external service `svc` of Kubernetes cluster `cluster`; the
    /// result must validate as a whole, or nothing is written (the error says why).
    pub async fn put_k8s(&self, cluster: &str, svc: ExternalService) -> Result<u64, ApiError> {
        let _g = self.lock.lock().await;
        let key = k8s_key(cluster, &svc.name);
        let mut merged: EgressRecord = db::get(self.store.as_ref(), KEY).await?.unwrap_or_default();
        let mut raw_current = None;
        for (k, s) in self.k8s_services().await? {
            if k == key {
                raw_current = Some(db::encode(&s)?);
            } else {
                merged.doc.services.push(s);
            }
        }
        merged.doc.services.push(svc.clone());
        let encoded = db::encode(&svc)?;
        if raw_current.as_ref() == Some(&encoded) {
            // The same service again (a status update, a relist): nothing to write.
            return Ok(self.revision().await?.1);
        }
        let mut b = Batch::new();
        b.require(key.clone(), raw_current).put(key, encoded);
        self.commit_checked(merged.doc, b).await
    }

    /// Removes an external service of cluster `cluster` (absent: nothing to do).
    pub async fn delete_k8s(&self, cluster: &str, name: &str) -> Result<(), ApiError> {
        let _g = self.lock.lock().await;
        let key = k8s_key(cluster, name);
        let Some(raw) = self.store.get(&key).await? else {
            return Ok(());
        };
        let mut b = Batch::new();
        b.require(key.clone(), Some(raw)).delete(key);
        let (rev_raw, rev) = self.revision().await?;
        b.require(REVISION_KEY.to_vec(), rev_raw)
            .put(REVISION_KEY.to_vec(), (rev + 1).to_string().into_bytes());
        self.store.commit(b).await?;
        Ok(())
    }

    /// Names of the external services cluster `cluster` has in the store.
    pub async fn k8s_names(&self, cluster: &str) -> Result<Vec<String>, ApiError> {
        let prefix = format!("{K8S_PREFIX}{cluster}/");
        Ok(self
            .k8s_services()
            .await?
            .into_iter()
            .filter_map(|(k, _)| {
                String::from_utf8(k)
                    .ok()?
                    .strip_prefix(&prefix)
                    .map(ToOwned::to_owned)
            })
            .collect())
    }

    /// Wakes on every egress write.
    pub fn watch(&self) -> ward_store::Watch {
        self.store.watch(EGRESS_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_store::MemStore;

    #[tokio::test]
    async fn put_validates_and_keeps_the_last_good() {
        let repo = EgressRepo::new(Arc::new(MemStore::new()));
        assert_eq!(repo.get().await.unwrap().revision, 0);
        let good: EgressDoc = serde_json::from_value(serde_json::json!({ "services": [
            { "name": "stripe", "protocol": "tls", "hosts": ["api.stripe.com"], "ports": [443],
              "from": [ { "principals": ["*"] } ] } ] }))
        .unwrap();
        assert_eq!(repo.put(good.clone()).await.unwrap().revision, 1);
        let mut bad = good.clone();
        bad.services[0].hosts = vec!["a.*.com".into()];
        let e = repo.put(bad).await.unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidArgument(m) if m.contains("a.*.com")),
            "{e:?}"
        );
        let now = repo.get().await.unwrap();
        assert_eq!((now.revision, now.doc), (1, good.clone()));

        // Services from Kubernetes join it, checked against the whole.
        let mut k = good.services[0].clone();
        k.name = "k8s-api".into();
        k.hosts = vec!["api.example.com".into()];
        assert_eq!(repo.put_k8s("c1", k.clone()).await.unwrap(), 2);
        let mut dup = k.clone();
        dup.name = "stripe".into();
        let e = repo.put_k8s("c1", dup).await.unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidArgument(m) if m.contains("used twice")),
            "{e:?}"
        );
        let now = repo.get().await.unwrap();
        assert_eq!(now.revision, 2);
        assert_eq!(now.doc.services.len(), 2);
        assert_eq!(repo.k8s_names("c1").await.unwrap(), ["k8s-api"]);
        // The operator's next apply keeps them (and must not clash with them).
        let mut clash = good.clone();
        clash.services[0].name = "k8s-api".into();
        assert!(repo.put(clash).await.is_err());
        repo.put(good.clone()).await.unwrap();
        assert_eq!(repo.get().await.unwrap().doc.services.len(), 2);
        repo.delete_k8s("c1", "k8s-api").await.unwrap();
        repo.delete_k8s("c1", "k8s-api").await.unwrap();
        let now = repo.get().await.unwrap();
        assert_eq!((now.revision, now.doc), (4, good));
    }
}
