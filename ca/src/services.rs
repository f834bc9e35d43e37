//! Mesh services stored in the CA: declared through the admin API (`ward-ca service apply`) or
//! kept by the Kubernetes controller from Services and EndpointSlices. Every write bumps one
//! revision and records which service changed, so agents are sent only what changed since
//! their last update (as for entries).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use ward_spiffe::service::Service;
use ward_store::{Batch, Store, scan_all};

use crate::db;
use crate::error::ApiError;

/// Prefix of service and service-change records (watch it to learn of service writes).
pub const SERVICE_WATCH_PREFIX: &[u8] = b"service";
const SERVICE_PREFIX: &[u8] = b"service/";
const CHANGE_PREFIX: &[u8] = b"service_change/";
const REVISION_KEY: &[u8] = b"meta/service_revision";
const FLOOR_KEY: &[u8] = b"meta/service_change_floor";
/// Change records kept; an agent further behind gets the full set.
const KEEP_CHANGES: u64 = 10_000;

/// A stored service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The service.
    pub service: Service,
    /// Service revision of its last write.
    pub revision: u64,
    /// `admin` or `k8s/<cluster>`.
    pub origin: String,
}

fn key(name: &str) -> Vec<u8> {
    format!("service/{name}").into_bytes()
}

fn change_key(rev: u64) -> Vec<u8> {
    format!("service_change/{rev:020}").into_bytes()
}

/// One write of a batch.
#[derive(Debug, Clone)]
pub enum ServiceOp {
    /// Create or replace.
    Put(Service),
    /// Remove (absent is fine).
    Delete(String),
}

/// The service repository.
#[derive(Debug)]
pub struct ServiceRepo {
    store: Arc<dyn Store>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

async fn counter(store: &dyn Store, k: &[u8]) -> Result<(Option<Vec<u8>>, u64), ApiError> {
    let raw = store.get(k).await?;
    let n = raw
        .as_deref()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    Ok((raw, n))
}

impl ServiceRepo {
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

    /// Every stored service, by name.
    pub async fn list(&self) -> Result<Vec<ServiceRecord>, ApiError> {
        scan_all(self.store.as_ref(), SERVICE_PREFIX)
            .await?
            .iter()
            .map(|(k, v)| db::decode(k, v))
            .collect()
    }

    /// One service.
    pub async fn get(&self, name: &str) -> Result<Option<ServiceRecord>, ApiError> {
        db::get(self.store.as_ref(), &key(name)).await
    }

    /// The current service revision.
    pub async fn revision(&self) -> Result<u64, ApiError> {
        Ok(counter(self.store.as_ref(), REVISION_KEY).await?.1)
    }

    /// Applies `ops` with `origin` in one durable commit; nothing is written if any service is
    /// invalid, or if a service named in `ops` is kept by another origin (an admin cannot
    /// edit what the Kubernetes controller keeps, and the other way round).
    pub async fn write(
        &self,
        ops: Vec<ServiceOp>,
        origin: &str,
    ) -> Result<Vec<ServiceRecord>, ApiError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let mut seen = std::collections::BTreeSet::new();
        for op in &ops {
            let name = match op {
                ServiceOp::Put(s) => {
                    s.validate()
                        .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
                    &s.name
                }
                ServiceOp::Delete(n) => n,
            };
            if !seen.insert(name.clone()) {
                return Err(ApiError::InvalidArgument(format!(
                    "service {name:?} is named twice"
                )));
            }
        }
        let _g = self.lock.lock().await;
        let (raw_rev, mut rev) = counter(self.store.as_ref(), REVISION_KEY).await?;
        let mut b = Batch::new();
        b.require(REVISION_KEY.to_vec(), raw_rev);
        let mut out = Vec::new();
        for op in ops {
            let name = match &op {
                ServiceOp::Put(s) => s.name.clone(),
                ServiceOp::Delete(n) => n.clone(),
            };
            let k = key(&name);
            let raw = self.store.get(&k).await?;
            if let Some(r) = &raw {
                let cur: ServiceRecord = db::decode(&k, r)?;
                if cur.origin != origin {
                    return Err(ApiError::FailedPrecondition(format!(
                        "service {name} is kept by {}; change it there",
                        cur.origin
                    )));
                }
            }
            rev += 1;
            b.require(k.clone(), raw.clone());
            b.put(change_key(rev), name.clone().into_bytes());
            match op {
                ServiceOp::Put(service) => {
                    let rec = ServiceRecord {
                        service,
                        revision: rev,
                        origin: origin.to_owned(),
                    };
                    b.put(k, db::encode(&rec)?);
                    out.push(rec);
                }
                ServiceOp::Delete(_) if raw.is_none() => {}
                ServiceOp::Delete(_) => {
                    b.delete(k);
                }
            }
        }
        b.put(REVISION_KEY.to_vec(), rev.to_string().into_bytes());
        self.store.commit(b).await?;
        self.compact(rev).await?;
        Ok(out)
    }

    /// Splits `ops` into groups that one [`write`](Self::write) each can commit on this store
    /// (etcd: 128 operations and 1.5 MiB per transaction). A service costs a condition, its
    /// record and its change record, plus the revision per group; in bytes, the record it
    /// replaces (the condition's value) and the new one, which is at most as large as the
    /// larger of the two is estimated at twice the new one. A single service over the limit
    /// is a group of its own, refused by the store with a clear error.
    pub fn groups(&self, ops: Vec<ServiceOp>) -> Vec<Vec<ServiceOp>> {
        const PER_OP: usize = 512;
        let limits = self.store.limits();
        let most = (limits.max_ops.saturating_sub(1) / 2).max(1);
        let mut out: Vec<Vec<ServiceOp>> = Vec::new();
        let mut bytes = 0usize;
        for op in ops {
            let size = match &op {
                ServiceOp::Put(s) => 4 * serde_json::to_vec(s).map_or(0, |v| v.len()) + PER_OP,
                ServiceOp::Delete(_) => PER_OP,
            };
            match out.last_mut() {
                Some(g) if g.len() < most && bytes + size <= limits.max_bytes => {
                    bytes += size;
                    g.push(op);
                }
                _ => {
                    bytes = size;
                    out.push(vec![op]);
                }
            }
        }
        out
    }

    /// Deletes one service kept by `origin`.
    pub async fn delete(&self, name: &str, origin: &str) -> Result<(), ApiError> {
        if self.get(name).await?.is_none() {
            return Err(ApiError::NotFound(format!("service {name} not found")));
        }
        self.write(vec![ServiceOp::Delete(name.to_owned())], origin)
            .await
            .map(|_| ())
    }

    /// The oldest revision the change log still covers: an agent at or after it can be sent
    /// only the changes.
    pub async fn changes_floor(&self) -> Result<u64, ApiError> {
        Ok(counter(self.store.as_ref(), FLOOR_KEY).await?.1)
    }

    /// Names of services changed after revision `after` (deduplicated), and the newest
    /// revision among them.
    pub async fn changed_since(&self, after: u64) -> Result<(u64, Vec<String>), ApiError> {
        let mut names = std::collections::BTreeSet::new();
        let mut last = after;
        let mut cursor = change_key(after);
        loop {
            let page = self.store.scan(CHANGE_PREFIX, Some(&cursor), 1000).await?;
            for (k, v) in &page {
                let rev = std::str::from_utf8(&k[CHANGE_PREFIX.len()..])
                    .ok()
                    .and_then(|r| r.parse::<u64>().ok())
                    .unwrap_or(last);
                last = last.max(rev);
                names.insert(String::from_utf8_lossy(v).into_owned());
            }
            match page.last() {
                Some((k, _)) if page.len() == 1000 => cursor = k.clone(),
                _ => break,
            }
        }
        Ok((last, names.into_iter().collect()))
    }

    async fn compact(&self, rev: u64) -> Result<(), ApiError> {
        if rev <= KEEP_CHANGES || !rev.is_multiple_of(1000) {
            return Ok(());
        }
        let floor = rev - KEEP_CHANGES;
        // Within the store's transaction limit (etcd: 128 operations), with the floor put.
        let size = self.store.limits().max_ops.saturating_sub(1).clamp(1, 512);
        loop {
            let page = self.store.scan(CHANGE_PREFIX, None, size).await?;
            let old: Vec<_> = page
                .into_iter()
                .filter(|(k, _)| *k < change_key(floor))
                .collect();
            let more = old.len() == size;
            let mut b = Batch::new();
            for (k, _) in old {
                b.delete(k);
            }
            if !more {
                b.put(FLOOR_KEY.to_vec(), floor.to_string().into_bytes());
                self.store.commit(b).await?;
                return Ok(());
            }
            self.store.commit(b).await?;
        }
    }

    /// Wakes on every service write.
    pub fn watch(&self) -> ward_store::Watch {
        self.store.watch(SERVICE_WATCH_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ward_store::MemStore;

    fn svc(name: &str, ep: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "name": name, "ports": [ { "name": "http", "port": 80 } ],
            "endpoints": [ { "address": ep, "ids": ["spiffe://t/x"] } ]
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn writes_record_changes_and_respect_origins() {
        let repo = ServiceRepo::new(Arc::new(MemStore::new()));
        repo.write(
            vec![
                ServiceOp::Put(svc("a.ns", "10.0.0.1")),
                ServiceOp::Put(svc("b.ns", "10.0.0.2")),
            ],
            "admin",
        )
        .await
        .unwrap();
        assert_eq!(repo.revision().await.unwrap(), 2);
        let (rev, names) = repo.changed_since(0).await.unwrap();
        assert_eq!(
            (rev, names),
            (2, vec!["a.ns".to_owned(), "b.ns".to_owned()])
        );
        repo.write(vec![ServiceOp::Put(svc("a.ns", "10.0.0.9"))], "admin")
            .await
            .unwrap();
        assert_eq!(
            repo.changed_since(2).await.unwrap(),
            (3, vec!["a.ns".to_owned()])
        );
        // Another origin may not touch it; nothing is written.
        let e = repo
            .write(
                vec![
                    ServiceOp::Put(svc("c.ns", "10.0.0.3")),
                    ServiceOp::Delete("a.ns".into()),
                ],
                "k8s/c1",
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::FailedPrecondition(_)), "{e:?}");
        assert!(repo.get("c.ns").await.unwrap().is_none());
        // Invalid: refused whole.
        let mut bad = svc("d.ns", "10.0.0.4");
        bad.endpoints[0].ids.clear();
        assert!(matches!(
            repo.write(vec![ServiceOp::Put(bad)], "admin").await,
            Err(ApiError::InvalidArgument(_))
        ));
        repo.delete("a.ns", "admin").await.unwrap();
        assert!(matches!(
            repo.delete("a.ns", "admin").await,
            Err(ApiError::NotFound(_))
        ));
        assert_eq!(
            repo.changed_since(3).await.unwrap(),
            (4, vec!["a.ns".to_owned()])
        );
        assert_eq!(repo.list().await.unwrap().len(), 1);
    }
}
