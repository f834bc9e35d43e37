//! Leadership of a named singleton among the processes that share a store ([`Store::elect`]).
//!
//! On an embedded store there is one process, which leads at once. On etcd, candidates race to
//! create `leader/<name>` bound to a lease they keep alive; the holder leads until it stops
//! renewing (it dies, or loses the cluster), and then the key vanishes with the lease and
//! another candidate takes it. A leader that cannot renew steps down *before* its lease can
//! have expired, and every store write of singleton work carries [`Leadership::fence`], a
//! condition that holds only while the key still names this candidate: a deposed leader
//! that has not noticed yet still cannot clobber what its successor writes.

use std::sync::Arc;

use tokio::sync::watch;

use crate::{Batch, Condition, Entry, Limits, Store, StoreError, Watch};

/// Where leadership of `name` is recorded (under the store's own key space).
pub fn leader_key(name: &str) -> Vec<u8> {
    format!("leader/{name}").into_bytes()
}

/// This process's standing in one election.
#[derive(Debug)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    fence: Condition,
    _campaign: Option<AbortOnDrop>,
    /// The sole leader's sender, kept so the channel stays open.
    _sole: Option<watch::Sender<bool>>,
    resign: Option<watch::Sender<bool>>,
}

#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Leadership {
    /// The only process: leads for ever; the fence is a key nobody writes.
    pub(crate) fn sole(name: &str) -> Self {
        let (tx, rx) = watch::channel(true);
        Self {
            rx,
            fence: Condition {
                key: leader_key(name),
                expected: None,
            },
            _campaign: None,
            _sole: Some(tx),
            resign: None,
        }
    }

    pub(crate) fn campaigning(
        name: &str,
        candidate: &str,
        rx: watch::Receiver<bool>,
        resign: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self {
            rx,
            fence: Condition {
                key: leader_key(name),
                expected: Some(candidate.as_bytes().to_vec()),
            },
            _campaign: Some(AbortOnDrop(task)),
            _sole: None,
            resign: Some(resign),
        }
    }

    /// Whether this process leads now.
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Follows the standing (true while leading). Dropping the [`Leadership`] ends the
    /// campaign: the receiver then reports a closed channel.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }

    /// Steps down and gives the lease back, so another candidate leads at once rather than
    /// after the lease lapses (a clean shutdown). Waits until it is done, at most 2 s.
    pub async fn resign(&self) {
        if let Some(r) = &self.resign {
            let _ = r.send(true);
            let mut rx = self.rx.clone();
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), rx.wait_for(|l| !*l)).await;
            // The lease revoke follows the step-down; give it a moment.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// A batch condition that holds only while this process leads.
    pub fn fence(&self) -> Condition {
        self.fence.clone()
    }
}

/// A view of a store whose every write carries a leadership fence, for singleton work: the
/// repositories a leader writes through need no fence parameter of their own, and a write
/// made after this process was deposed fails with [`StoreError::Deposed`] and writes nothing.
/// Reads and watches go to the store unchanged.
#[derive(Debug)]
pub struct Fenced {
    inner: Arc<dyn Store>,
    fence: Condition,
}

impl Fenced {
    /// Writes to `inner` only while `fence` holds (from [`Leadership::fence`]).
    pub fn new(inner: Arc<dyn Store>, fence: Condition) -> Self {
        Self { inner, fence }
    }

    fn map(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Conflict { key } if key.as_bytes() == self.fence.key.as_slice() => {
                StoreError::Deposed(key)
            }
            other => other,
        }
    }
}

#[async_trait::async_trait]
impl Store for Fenced {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }

    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.inner.scan(prefix, after, limit).await
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let mut b = Batch::new();
        b.require(key.to_vec(), expected.map(<[u8]>::to_vec));
        match new {
            Some(v) => b.put(key.to_vec(), v.to_vec()),
            None => b.delete(key.to_vec()),
        };
        self.commit(b).await
    }

    async fn commit(&self, mut batch: Batch) -> Result<(), StoreError> {
        // The fence first, so that a deposed writer is told so rather than of a conflict
        // its successor caused.
        batch.conditions.insert(0, self.fence.clone());
        self.inner.commit(batch).await.map_err(|e| self.map(e))
    }

    fn watch(&self, prefix: &[u8]) -> Watch {
        self.inner.watch(prefix)
    }

    fn limits(&self) -> Limits {
        let l = self.inner.limits();
        let fence = self.fence.key.len() + self.fence.expected.as_ref().map_or(0, Vec::len);
        Limits {
            max_ops: l.max_ops.saturating_sub(1),
            max_bytes: l.max_bytes.saturating_sub(2 * fence + 256),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::MemStore;

    #[tokio::test]
    async fn a_fenced_store_writes_only_while_the_fence_holds() {
        let inner = Arc::new(MemStore::new());
        let fence = Condition {
            key: leader_key("x"),
            expected: Some(b"me".to_vec()),
        };
        let f = Fenced::new(inner.clone(), fence);
        // Not (or no longer) the leader: refused as such, nothing written.
        let r = f.compare_and_swap(b"k", None, Some(b"1")).await;
        assert!(matches!(r, Err(StoreError::Deposed(_))), "{r:?}");
        assert_eq!(inner.get(b"k").await.unwrap(), None);
        inner
            .compare_and_swap(&leader_key("x"), None, Some(b"me"))
            .await
            .unwrap();
        f.compare_and_swap(b"k", None, Some(b"1")).await.unwrap();
        assert_eq!(f.get(b"k").await.unwrap(), Some(b"1".to_vec()));
        // Another condition failing is still a conflict, not a deposition.
        let r = f.compare_and_swap(b"k", None, Some(b"2")).await;
        assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}");
        // A successor took over.
        inner
            .compare_and_swap(&leader_key("x"), Some(b"me"), Some(b"other"))
            .await
            .unwrap();
        let mut b = Batch::new();
        b.put(b"k".to_vec(), b"3".to_vec());
        assert!(matches!(f.commit(b).await, Err(StoreError::Deposed(_))));
        assert_eq!(inner.get(b"k").await.unwrap(), Some(b"1".to_vec()));
        // Room is kept for the fence.
        assert_eq!(f.limits().max_ops, usize::MAX - 1);
    }
}
