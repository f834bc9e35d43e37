//! The one test suite every [`Store`](crate::Store) backend must pass.
//!
//! A backend's crate instantiates it with [`store_conformance!`](crate::store_conformance),
//! giving a [`Harness`] that makes fresh stores; each check becomes its own `#[tokio::test]`.

#![allow(clippy::unwrap_used)] // a test suite: a failed step must panic the test

use std::sync::Arc;
use std::time::Duration;

use crate::{Batch, Store, StoreError, scan_all};

/// A store under test, with a way to reopen the same data after it is dropped.
pub struct Subject {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Opens the same data again (durable backends only). Called after every clone of
    /// `store` is dropped.
    pub reopen: Option<Box<dyn Fn() -> Arc<dyn Store> + Send + Sync>>,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject")
            .field("store", &self.store)
            .finish()
    }
}

/// Makes fresh, empty stores of one backend.
pub trait Harness {
    /// A new empty store.
    fn fresh(&self) -> Subject;
}

fn assert_conflict<T: std::fmt::Debug>(r: Result<T, StoreError>) {
    match r {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("expected Conflict, got {other:?}"),
    }
}

/// Missing keys read as `None`; written keys read back, including binary keys and empty values.
pub async fn get_and_put(h: &dyn Harness) {
    let s = h.fresh().store;
    assert_eq!(s.get(b"missing").await.unwrap(), None);
    let mut b = Batch::new();
    b.put(b"k".to_vec(), b"v".to_vec());
    b.put(vec![0xff, 0x00, 0xfe], Vec::new());
    s.commit(b).await.unwrap();
    assert_eq!(s.get(b"k").await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(s.get(&[0xff, 0x00, 0xfe]).await.unwrap(), Some(Vec::new()));
}

/// Compare-and-swap creates only if absent, swaps only on a match, and deletes.
pub async fn compare_and_swap(h: &dyn Harness) {
    let s = h.fresh().store;
    s.compare_and_swap(b"k", None, Some(b"1")).await.unwrap();
    assert_conflict(s.compare_and_swap(b"k", None, Some(b"2")).await);
    assert_conflict(s.compare_and_swap(b"k", Some(b"0"), Some(b"2")).await);
    assert_eq!(s.get(b"k").await.unwrap(), Some(b"1".to_vec()));
    s.compare_and_swap(b"k", Some(b"1"), Some(b"2"))
        .await
        .unwrap();
    assert_eq!(s.get(b"k").await.unwrap(), Some(b"2".to_vec()));
    assert_conflict(s.compare_and_swap(b"k", Some(b"1"), None).await);
    s.compare_and_swap(b"k", Some(b"2"), None).await.unwrap();
    assert_eq!(s.get(b"k").await.unwrap(), None);
    assert_conflict(s.compare_and_swap(b"k", Some(b"2"), None).await);
}

/// A batch whose condition fails writes nothing; one whose conditions hold writes everything.
pub async fn batch_atomicity(h: &dyn Harness) {
    let s = h.fresh().store;
    let mut b = Batch::new();
    b.put(b"a".to_vec(), b"1".to_vec())
        .put(b"b".to_vec(), b"1".to_vec());
    s.commit(b).await.unwrap();

    let mut b = Batch::new();
    b.require(b"a".to_vec(), Some(b"1".to_vec()))
        .require(b"c".to_vec(), Some(b"x".to_vec()))
        .put(b"a".to_vec(), b"2".to_vec())
        .delete(b"b".to_vec())
        .put(b"d".to_vec(), b"2".to_vec());
    assert_conflict(s.commit(b).await);
    assert_eq!(s.get(b"a").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(s.get(b"b").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(s.get(b"d").await.unwrap(), None);

    let mut b = Batch::new();
    b.require(b"a".to_vec(), Some(b"1".to_vec()))
        .require(b"c".to_vec(), None)
        .put(b"a".to_vec(), b"2".to_vec())
        .delete(b"b".to_vec())
        .put(b"d".to_vec(), b"2".to_vec());
    s.commit(b).await.unwrap();
    assert_eq!(s.get(b"a").await.unwrap(), Some(b"2".to_vec()));
    assert_eq!(s.get(b"b").await.unwrap(), None);
    assert_eq!(s.get(b"d").await.unwrap(), Some(b"2".to_vec()));

    // Later ops in one batch win over earlier ones on the same key.
    let mut b = Batch::new();
    b.put(b"e".to_vec(), b"1".to_vec())
        .delete(b"e".to_vec())
        .put(b"f".to_vec(), b"1".to_vec())
        .put(b"f".to_vec(), b"2".to_vec());
    s.commit(b).await.unwrap();
    assert_eq!(s.get(b"e").await.unwrap(), None);
    assert_eq!(s.get(b"f").await.unwrap(), Some(b"2".to_vec()));
}

/// Scans are ordered, bounded by the prefix, resume strictly after `after`, and honour `limit`.
pub async fn ordered_scan(h: &dyn Harness) {
    let s = h.fresh().store;
    let mut b = Batch::new();
    for k in ["p/3", "p/1", "p0", "p/2", "o/9", "p/10", "p"] {
        b.put(k.as_bytes().to_vec(), k.as_bytes().to_vec());
    }
    b.put(b"p/\xff".to_vec(), b"hi".to_vec());
    s.commit(b).await.unwrap();
    let keys = |v: Vec<(Vec<u8>, Vec<u8>)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let all = keys(s.scan(b"p/", None, 100).await.unwrap());
    assert_eq!(
        all,
        vec![
            b"p/1".to_vec(),
            b"p/10".to_vec(),
            b"p/2".to_vec(),
            b"p/3".to_vec(),
            b"p/\xff".to_vec()
        ]
    );
    let page = keys(s.scan(b"p/", Some(b"p/10"), 2).await.unwrap());
    assert_eq!(page, vec![b"p/2".to_vec(), b"p/3".to_vec()]);
    assert!(s.scan(b"p/", Some(b"p/\xff"), 10).await.unwrap().is_empty());
    assert_eq!(
        keys(s.scan(b"p/", Some(b"a"), 1).await.unwrap()),
        vec![b"p/1".to_vec()]
    );
    assert!(s.scan(b"q", None, 10).await.unwrap().is_empty());
    assert_eq!(s.scan(b"", None, 100).await.unwrap().len(), 8);
    assert_eq!(s.scan(b"p/", None, 0).await.unwrap().len(), 0);
}

/// Paged reads through [`scan_all`] see every key exactly once.
pub async fn scan_all_pages(h: &dyn Harness) {
    let s = h.fresh().store;
    for chunk in (0..2500u32).collect::<Vec<_>>().chunks(100) {
        let mut b = Batch::new();
        for i in chunk {
            b.put(format!("n/{i:05}").into_bytes(), i.to_be_bytes().to_vec());
        }
        s.commit(b).await.unwrap();
    }
    let all = scan_all(s.as_ref(), b"n/").await.unwrap();
    assert_eq!(all.len(), 2500);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
}

async fn fired(w: &mut crate::Watch) -> bool {
    tokio::time::timeout(Duration::from_millis(200), w.changed())
        .await
        .is_ok()
}

/// Watchers wake for writes under their prefix (batches, CAS, deletes) and not for others.
pub async fn watch_prefix(h: &dyn Harness) {
    let s = h.fresh().store;
    let mut w = s.watch(b"x/");
    let mut b = Batch::new();
    b.put(b"y/1".to_vec(), b"1".to_vec());
    s.commit(b).await.unwrap();
    assert!(!fired(&mut w).await, "woke for a write outside the prefix");
    let mut b = Batch::new();
    b.put(b"x/1".to_vec(), b"1".to_vec());
    s.commit(b).await.unwrap();
    assert!(fired(&mut w).await, "no wake for a batch put");
    s.compare_and_swap(b"x/1", Some(b"1"), None).await.unwrap();
    assert!(fired(&mut w).await, "no wake for a CAS delete");
    // A failed write does not wake.
    let _ = s.compare_and_swap(b"x/1", Some(b"nope"), Some(b"2")).await;
    assert!(!fired(&mut w).await, "woke for a failed CAS");
    // Several writes coalesce into at least one wake and leave nothing pending after it.
    for i in 0..5u8 {
        s.compare_and_swap(&[b'x', b'/', b'a' + i], None, Some(b"v"))
            .await
            .unwrap();
    }
    assert!(fired(&mut w).await);
    assert!(!fired(&mut w).await);
}

/// Concurrent read-modify-write loops with CAS lose no updates.
pub async fn concurrent_cas(h: &dyn Harness) {
    let s = h.fresh().store;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                loop {
                    let cur = s.get(b"ctr").await.unwrap();
                    let n = cur
                        .as_deref()
                        .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()));
                    let next = (n + 1).to_be_bytes();
                    match s
                        .compare_and_swap(b"ctr", cur.as_deref(), Some(&next))
                        .await
                    {
                        Ok(()) => break,
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = s.get(b"ctr").await.unwrap().unwrap();
    assert_eq!(u64::from_be_bytes(v.try_into().unwrap()), 200);
}

/// Acknowledged writes are there after the store is closed and opened again.
pub async fn reopen_keeps_acknowledged_writes(h: &dyn Harness) {
    let Subject { store, reopen } = h.fresh();
    let Some(reopen) = reopen else {
        return; // volatile backend: nothing to check
    };
    for i in 0..50u32 {
        let mut b = Batch::new();
        b.put(format!("r/{i:03}").into_bytes(), vec![1; 100]);
        store.commit(b).await.unwrap();
    }
    store
        .compare_and_swap(b"r/000", Some(&[1; 100]), None)
        .await
        .unwrap();
    drop(store);
    let store = reopen();
    let all = scan_all(store.as_ref(), b"r/").await.unwrap();
    assert_eq!(all.len(), 49);
    assert_eq!(all[0].0, b"r/001".to_vec());
}

/// A batch over the backend's limits is refused whole; one at the limit is applied.
pub async fn oversize_batch_is_refused(h: &dyn Harness) {
    let s = h.fresh().store;
    let limits = s.limits();
    if limits == crate::Limits::UNBOUNDED {
        return; // nothing to exceed
    }
    let mut b = Batch::new();
    for i in 0..=limits.max_ops {
        b.put(format!("o/{i:05}").into_bytes(), b"v".to_vec());
    }
    match s.commit(b).await {
        Err(StoreError::TooLarge(why)) => assert!(why.contains("operations"), "{why}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(s.scan(b"o/", None, 10).await.unwrap().is_empty());
    // Writes of one key count once.
    let mut b = Batch::new();
    for i in 0..limits.max_ops {
        b.put(format!("o/{i:05}").into_bytes(), b"v".to_vec());
    }
    b.put(b"o/00000".to_vec(), b"w".to_vec());
    s.commit(b).await.unwrap();
    assert_eq!(s.get(b"o/00000").await.unwrap(), Some(b"w".to_vec()));
    let mut b = Batch::new();
    b.put(b"o/big".to_vec(), vec![7; limits.max_bytes + 1]);
    match s.commit(b).await {
        Err(StoreError::TooLarge(why)) => assert!(why.contains("bytes"), "{why}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(s.get(b"o/big").await.unwrap(), None);
}

/// Instantiates every conformance check as a `#[tokio::test]` for a backend.
///
/// `$harness` is an expression producing a value that implements [`Harness`].
#[macro_export]
macro_rules! store_conformance {
    ($harness:expr) => {
        $crate::store_conformance!(@tests $harness;
            get_and_put, compare_and_swap, batch_atomicity, ordered_scan, scan_all_pages,
            watch_prefix, concurrent_cas, reopen_keeps_acknowledged_writes, oversize_batch_is_refused);
    };
    (@tests $harness:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let h = $harness;
                $crate::conformance::$name(&h).await;
            }
        )*
    };
}
