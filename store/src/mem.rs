//! A volatile in-memory backend: a `BTreeMap` under a mutex. For tests and for proving the
//! conformance suite is backend-independent; nothing survives the process.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;

use crate::notify::Notifier;
use crate::{Batch, Entry, Op, Store, StoreError, Watch, conflict};

/// In-memory store.
#[derive(Debug, Default)]
pub struct MemStore {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
    notifier: Notifier,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl Store for MemStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(key).cloned())
    }

    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let map = self.lock();
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_vec()),
            _ => Bound::Included(prefix.to_vec()),
        };
        Ok(map
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        {
            let mut map = self.lock();
            if map.get(key).map(Vec::as_slice) != expected {
                return Err(conflict(key));
            }
            match new {
                Some(v) => map.insert(key.to_vec(), v.to_vec()),
                None => map.remove(key),
            };
        }
        self.notifier.notify(std::iter::once(key));
        Ok(())
    }

    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        {
            let mut map = self.lock();
            for c in &batch.conditions {
                if map.get(&c.key) != c.expected.as_ref() {
                    return Err(conflict(&c.key));
                }
            }
            for op in &batch.ops {
                match op {
                    Op::Put(k, v) => map.insert(k.clone(), v.clone()),
                    Op::Delete(k) => map.remove(k),
                };
            }
        }
        self.notifier.notify(batch.touched_keys());
        Ok(())
    }

    fn watch(&self, prefix: &[u8]) -> Watch {
        self.notifier.subscribe(prefix)
    }
}
