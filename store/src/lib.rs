//! Ward's storage seam: an ordered key-value store with compare-and-swap, atomic conditional
//! batches and change notification.
//!
//! Everything durable in the CA goes through [`Store`]. Backends: [`SledStore`] (the embedded
//! default), [`EtcdStore`] (shared by several CA replicas) and [`MemStore`] (volatile, for
//! tests). Every backend must pass the one suite in
//! [`conformance`]. No backend type appears in this trait, so a distributed backend can be
//! added without touching callers.
//!
//! Contract: when a write method returns `Ok`, the write is durable (for durable backends) and
//! watchers of the touched prefixes have been notified.

mod etcd;
mod lease;
mod mem;
mod notify;
mod sled_store;

pub mod conformance;

pub use etcd::{EtcdOptions, EtcdStore};
pub use lease::{Fenced, Leadership, leader_key};
pub use mem::MemStore;
pub use sled_store::SledStore;

/// Errors from a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-swap or batch condition did not hold; nothing was written.
    #[error("condition failed on key {key:?}")]
    Conflict {
        /// The first key whose condition failed (lossy UTF-8).
        key: String,
    },
    /// The backend failed (I/O, corruption). The write may not have happened.
    #[error("storage backend: {0}")]
    Backend(String),
    /// The batch is over the backend's [`Limits`]; nothing was written. Callers make their
    /// batches fit ([`Store::limits`]); a batch is never split, which would break atomicity.
    #[error("batch too large: {0}")]
    TooLarge(String),
    /// Singleton work's write refused: this process no longer leads (the fence on the named
    /// leadership key failed); nothing was written.
    #[error("this process no longer holds {0:?}; the singleton write was refused")]
    Deposed(String),
    /// The store could not be opened.
    #[error("cannot open store at {path}: {reason}")]
    Open {
        /// Where.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The most one batch may hold on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Writes (after collapsing writes of one key) and, separately, conditions.
    pub max_ops: usize,
    /// Encoded size of the request.
    pub max_bytes: usize,
}

impl Limits {
    /// No limit (the embedded backends).
    pub const UNBOUNDED: Self = Self {
        max_ops: usize::MAX,
        max_bytes: usize::MAX,
    };
    /// etcd's defaults: `--max-txn-ops=128`, `--max-request-bytes=1572864`.
    pub const ETCD_DEFAULT: Self = Self::etcd(128, 1_572_864);

    /// The limits of an etcd cluster run with `--max-txn-ops` and `--max-request-bytes`
    /// (less a margin for the raft request's envelope around the Txn).
    pub const fn etcd(max_txn_ops: usize, max_request_bytes: usize) -> Self {
        Self {
            max_ops: max_txn_ops,
            max_bytes: max_request_bytes.saturating_sub(4096),
        }
    }
}

impl Limits {
    /// What a key costs beyond its bytes in the worst case: a store's key prefix and the
    /// request's framing.
    const PER_KEY: usize = 64;

    /// Whether `batch` fits, by an estimate that errs on the large side (for callers that
    /// fill batches up to the limit, such as one commit per group of signed SVIDs).
    pub fn admits(&self, batch: &Batch) -> bool {
        let conditions = batch.conditions.len();
        let bytes: usize = batch
            .conditions
            .iter()
            // The compare, and the read that names a failed condition.
            .map(|c| 2 * (c.key.len() + Self::PER_KEY) + c.expected.as_ref().map_or(0, Vec::len))
            .chain(batch.ops.iter().map(|op| match op {
                Op::Put(k, v) => k.len() + v.len() + Self::PER_KEY,
                Op::Delete(k) => k.len() + Self::PER_KEY,
            }))
            .sum();
        conditions <= self.max_ops && batch.ops.len() <= self.max_ops && bytes <= self.max_bytes
    }
}

/// One write in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put(Vec<u8>, Vec<u8>),
    /// Remove `key` (no error if absent).
    Delete(Vec<u8>),
}

/// A precondition of a batch: `key` must currently hold `expected` (`None` = absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Key to check.
    pub key: Vec<u8>,
    /// Required current value; `None` requires the key to be absent.
    pub expected: Option<Vec<u8>>,
}

/// An atomic, conditional set of writes: either every condition holds and every op is applied,
/// or nothing is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Preconditions.
    pub conditions: Vec<Condition>,
    /// Writes, applied in order.
    pub ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Put(key.into(), value.into()));
        self
    }

    /// Adds a delete.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete(key.into()));
        self
    }

    /// Requires `key` to hold `expected` (`None` = absent) when the batch applies.
    pub fn require(&mut self, key: impl Into<Vec<u8>>, expected: Option<Vec<u8>>) -> &mut Self {
        self.conditions.push(Condition {
            key: key.into(),
            expected,
        });
        self
    }

    /// Whether the batch has neither conditions nor writes.
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty() && self.ops.is_empty()
    }

    /// Appends `other`'s conditions and writes.
    pub fn append(&mut self, other: Batch) -> &mut Self {
        self.conditions.extend(other.conditions);
        self.ops.extend(other.ops);
        self
    }

    fn touched_keys(&self) -> impl Iterator<Item = &[u8]> + Clone {
        self.ops.iter().map(|op| match op {
            Op::Put(k, _) | Op::Delete(k) => k.as_slice(),
        })
    }
}

/// A coalescing change notification for a key prefix: `changed` resolves once at least one
/// write under the prefix has been committed since the last call.
#[derive(Debug)]
pub struct Watch(tokio::sync::watch::Receiver<u64>);

impl Watch {
    /// Waits for the next change under the watched prefix. Returns `false` if the store was
    /// dropped.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

/// A key-value pair from a scan.
pub type Entry = (Vec<u8>, Vec<u8>);

/// The storage trait every backend implements.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Reads one key.
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Reads up to `limit` pairs whose keys start with `prefix`, in key order, starting
    /// strictly after `after` if given.
    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError>;

    /// Sets `key` to `new` (`None` deletes) only if it currently holds `expected`
    /// (`None` = absent). On mismatch returns [`StoreError::Conflict`] and writes nothing.
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(), StoreError>;

    /// Applies a batch atomically if all its conditions hold.
    async fn commit(&self, batch: Batch) -> Result<(), StoreError>;

    /// Subscribes to changes of keys under `prefix`, whoever wrote them (for a shared backend,
    /// other processes too).
    fn watch(&self, prefix: &[u8]) -> Watch;

    /// The most one batch may hold; a larger one is refused with [`StoreError::TooLarge`].
    fn limits(&self) -> Limits {
        Limits::UNBOUNDED
    }

    /// Campaigns for leadership of the singleton `name` as `candidate` (a name unique to this
    /// process and stable across its restarts). An embedded store has one process, which
    /// leads at once; a shared one elects one candidate at a time.
    fn elect(&self, name: &str, candidate: &str) -> Leadership {
        let _ = candidate;
        Leadership::sole(name)
    }
}

/// Reads every pair under `prefix` (convenience over [`Store::scan`]).
pub async fn scan_all(store: &dyn Store, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
    const PAGE: usize = 1024;
    let mut out: Vec<Entry> = Vec::new();
    loop {
        let after = out.last().map(|(k, _)| k.clone());
        let page = store.scan(prefix, after.as_deref(), PAGE).await?;
        let n = page.len();
        out.extend(page);
        if n < PAGE {
            return Ok(out);
        }
    }
}

fn conflict(key: &[u8]) -> StoreError {
    StoreError::Conflict {
        key: String::from_utf8_lossy(key).into_owned(),
    }
}
