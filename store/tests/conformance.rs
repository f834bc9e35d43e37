//! Runs the store conformance suite against every backend in this crate.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ward_store::conformance::{Harness, Subject};
use ward_store::{EtcdOptions, EtcdStore, MemStore, SledStore, Store};

struct Mem;

impl Harness for Mem {
    fn fresh(&self) -> Subject {
        Subject {
            store: Arc::new(MemStore::new()),
            reopen: None,
        }
    }
}

/// Each fresh sled store lives in its own temporary directory, removed when the harness drops.
#[derive(Default)]
struct Sled {
    dirs: std::sync::Mutex<Vec<tempfile::TempDir>>,
}

impl Harness for Sled {
    fn fresh(&self) -> Subject {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        self.dirs.lock().unwrap().push(dir);
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&path).unwrap());
        Subject {
            store,
            reopen: Some(Box::new(move || Arc::new(SledStore::open(&path).unwrap()))),
        }
    }
}

mod mem {
    ward_store::store_conformance!(super::Mem);
}

mod sled {
    ward_store::store_conformance!(super::Sled::default());
}

/// A real etcd per test process; each fresh store is its own key prefix in it.
struct Etcd {
    server: ward_testing::etcd::Etcd,
    n: std::sync::atomic::AtomicUsize,
}

impl Etcd {
    fn start() -> Self {
        Self {
            server: ward_testing::etcd::Etcd::start(),
            n: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

fn open_etcd(endpoints: &[String], prefix: &[u8]) -> Arc<dyn Store> {
    let opts = EtcdOptions::plaintext(endpoints, prefix).unwrap();
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current()
            .block_on(async { Arc::new(EtcdStore::open(opts).await.unwrap()) })
    })
}

impl Harness for Etcd {
    fn fresh(&self) -> Subject {
        let i = self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("/ward-test/{i}/").into_bytes();
        let endpoints = self.server.endpoints();
        Subject {
            store: open_etcd(&endpoints, &prefix),
            reopen: Some(Box::new(move || open_etcd(&endpoints, &prefix))),
        }
    }
}

mod etcd {
    ward_store::store_conformance!(super::Etcd::start());
}
