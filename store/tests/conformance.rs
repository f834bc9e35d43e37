//! Runs the store conformance suite against every backend in this crate.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ward_store::conformance::{Harness, Subject};
use ward_store::{MemStore, SledStore, Store};

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
