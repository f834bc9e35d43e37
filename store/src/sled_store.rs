//! The embedded default backend on sled.
//!
//! Durability: a write is applied to sled, then the caller waits for a flush that started after
//! the write (group commit: one flusher thread serves every writer waiting at that moment, so
//! concurrent writers share one fsync).

use std::path::Path;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::notify::Notifier;
use crate::{Batch, Entry, Op, Store, StoreError, Watch, conflict};

type FlushReply = oneshot::Sender<Result<(), String>>;

/// sled-backed store.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    flush_tx: Option<mpsc::Sender<FlushReply>>,
    flusher: Option<std::thread::JoinHandle<()>>,
    notifier: Notifier,
}

/// The most sled keeps in its own page cache.
const CACHE_BYTES: u64 = 64 << 20;

impl SledStore {
    /// Opens (or creates) a store in directory `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        // sled caches up to 1 GiB of pages by default, which is most of the CA's memory with
        // 100,000 entries; the OS page cache keeps what the bounded cache lets go.
        let config = sled::Config::new().path(path).cache_capacity(CACHE_BYTES);
        // sled panics on some forms of corruption instead of returning an error; turn that
        // into a clear start-up error.
        let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()))
            .map_err(|_| {
                open_err("sled panicked while recovering; the files are corrupted".into())
            })?
            .map_err(|e| open_err(e.to_string()))?;
        let (flush_tx, flush_rx) = mpsc::channel::<FlushReply>();
        let flusher_db = db.clone();
        let handle = std::thread::Builder::new()
            .name("ward-store-flush".into())
            .spawn(move || flusher(flusher_db, flush_rx))
            .map_err(|e| open_err(format!("cannot start flusher thread: {e}")))?;
        Ok(Self {
            db,
            flush_tx: Some(flush_tx),
            flusher: Some(handle),
            notifier: Notifier::default(),
        })
    }

    async fn durable(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.flush_tx
            .as_ref()
            .ok_or_else(|| StoreError::Backend("store is closing".into()))?
            .send(tx)
            .map_err(|_| StoreError::Backend("flusher stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Backend("flusher stopped".into()))?
            .map_err(StoreError::Backend)
    }
}

impl Drop for SledStore {
    /// Stops the flusher and waits for it, so that the directory lock is released when the
    /// store is dropped and the same directory can be opened again at once.
    fn drop(&mut self) {
        self.flush_tx.take();
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
        let _ = self.db.flush();
    }
}

fn flusher(db: sled::Db, rx: mpsc::Receiver<FlushReply>) {
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        waiters.extend(rx.try_iter());
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(backend)?.map(|v| v.to_vec()))
    }

    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        use std::ops::Bound;
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_vec()),
            _ => Bound::Included(prefix.to_vec()),
        };
        let mut out = Vec::new();
        for item in self.db.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let (k, v) = item.map_err(backend)?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        self.db
            .compare_and_swap(key, expected, new)
            .map_err(backend)?
            .map_err(|_| conflict(key))?;
        self.durable().await?;
        self.notifier.notify(std::iter::once(key));
        Ok(())
    }

    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let result = self.db.transaction(|tx| {
            for c in &batch.conditions {
                let current = tx.get(&c.key)?;
                if current.as_deref() != c.expected.as_deref() {
                    return Err(ConflictableTransactionError::Abort(c.key.clone()));
                }
            }
            for op in &batch.ops {
                match op {
                    Op::Put(k, v) => {
                        tx.insert(k.as_slice(), v.as_slice())?;
                    }
                    Op::Delete(k) => {
                        tx.remove(k.as_slice())?;
                    }
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Abort(key)) => return Err(conflict(&key)),
            Err(TransactionError::Storage(e)) => return Err(backend(e)),
        }
        self.durable().await?;
        self.notifier.notify(batch.touched_keys());
        Ok(())
    }

    fn watch(&self, prefix: &[u8]) -> Watch {
        self.notifier.subscribe(prefix)
    }
}
