//! The mesh's egress configuration, stored in the CA as one record: replaced as a whole and
//! validated first (a refused configuration changes nothing, so the last good one stays in
//! force), streamed to agents with the policies, and explainable (`ward-ca egress explain`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use ward_spiffe::egress::{EgressDoc, EgressSet};
use ward_store::{Batch, Store};

use crate::db;
use crate::error::ApiError;

/// Prefix of the egress record (watch it to learn of writes).
pub const EGRESS_PREFIX: &[u8] = b"egress/";
const KEY: &[u8] = b"egress/config";

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
    lock: tokio::sync::Mutex<()>,
}

impl EgressRepo {
    /// A repository over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The configuration in force (never written: deny everything outside the mesh).
    pub async fn get(&self) -> Result<EgressRecord, ApiError> {
        Ok(db::get(self.store.as_ref(), KEY).await?.unwrap_or_default())
    }

    /// The configuration, compiled.
    pub async fn set(&self) -> Result<EgressSet, ApiError> {
        EgressSet::compile(self.get().await?.doc)
            .map_err(|e| ApiError::Internal(format!("stored egress does not compile: {e}")))
    }

    /// Replaces the configuration; it must validate, or nothing is written.
    pub async fn put(&self, doc: EgressDoc) -> Result<EgressRecord, ApiError> {
        EgressSet::compile(doc.clone()).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let _g = self.lock.lock().await;
        let raw = self.store.get(KEY).await?;
        let revision = match &raw {
            Some(v) => db::decode::<EgressRecord>(KEY, v)?.revision + 1,
            None => 1,
        };
        let rec = EgressRecord { doc, revision };
        let mut b = Batch::new();
        b.require(KEY.to_vec(), raw)
            .put(KEY.to_vec(), db::encode(&rec)?);
        self.store.commit(b).await?;
        Ok(rec)
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
        assert_eq!((now.revision, now.doc), (1, good));
    }
}
