//! One reader of the entry change log per CA, shared by every agent sync stream.
//!
//! Without it each stream read the change log from the store on every entry write: with
//! thousands of streams on etcd, one change cost thousands of range requests. The feed watches
//! `change/` once, reads each change once into a bounded in-memory window, and wakes the
//! streams; a stream picks out the changes that concern its agent from memory and reads from
//! the store only the entries it will send. A stream further behind than the window falls
//! back to the store's change log (and that to a full resync), so the window's size bounds
//! memory, not correctness.
//!
//! The window is contiguous: it holds every change with a revision in `(floor, head]`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::entries::{Change, EntryRepo};
use crate::error::ApiError;

/// Changes held in memory (about 200 bytes each).
pub const WINDOW: usize = 16_384;
/// Changes read per store request.
const PAGE: usize = 1000;
/// Wait before reading again after a store error.
const RETRY: Duration = Duration::from_secs(1);

/// What a change means for one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    /// The entry is (still) the agent's: send its current state.
    Upsert,
    /// The entry left the agent.
    Remove,
}

#[derive(Debug)]
struct Window {
    floor: u64,
    head: u64,
    changes: VecDeque<Change>,
}

impl Window {
    fn push(&mut self, c: Change, cap: usize) {
        if c.revision <= self.head {
            return;
        }
        self.head = c.revision;
        self.changes.push_back(c);
        while self.changes.len() > cap {
            if let Some(old) = self.changes.pop_front() {
                self.floor = old.revision;
            }
        }
    }

    /// The window restarts at `floor` (the store's log moved past it).
    fn reset(&mut self, floor: u64) {
        self.changes.clear();
        self.floor = floor;
        self.head = floor;
    }
}

/// The shared change feed.
#[derive(Debug)]
pub struct ChangeFeed {
    _entries: Arc<EntryRepo>,
    window: Arc<RwLock<Window>>,
    head: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ChangeFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ChangeFeed {
    /// Starts the feed over `entries`, holding up to `cap` changes; it first loads the newest
    /// changes already in the log.
    pub async fn start(entries: EntryRepo, cap: usize) -> Result<Self, ApiError> {
        let cap = cap.max(1);
        let mut wake = entries.watch();
        let rev = entries.revision().await?;
        let floor = entries
            .changes_floor()
            .await?
            .max(rev.saturating_sub(cap as u64));
        let window = Arc::new(RwLock::new(Window {
            floor,
            head: floor,
            changes: VecDeque::new(),
        }));
        let (tx, head) = watch::channel(floor);
        catch_up(&entries, &window, &tx, cap).await?;
        // The task holds the repository weakly: when the CA is dropped its store goes at once
        // (a restarted CA can open it again), its watch ends, and so does the task.
        let entries = Arc::new(entries);
        let weak = Arc::downgrade(&entries);
        let w = window.clone();
        let task = tokio::spawn(async move {
            let limiter = ward_net::ratelog::LogLimiter::for_refusals();
            while wake.changed().await {
                loop {
                    let Some(entries) = weak.upgrade() else {
                        return;
                    };
                    let Err(e) = catch_up(&entries, &w, &tx, cap).await else {
                        break;
                    };
                    drop(entries);
                    if limiter.admit("read").is_some() {
                        tracing::warn!(error = %e, "entry change feed: reading the change log failed; retrying");
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        });
        Ok(Self {
            _entries: entries,
            window,
            head,
            task,
        })
    }

    /// Wakes when the feed has read further.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    /// What changed for `agent` after revision `after`, and the revision it is current to;
    /// `None` when the window does not reach back that far.
    pub fn since(&self, agent: &str, after: u64) -> Option<(u64, BTreeMap<String, Delta>)> {
        let w = self.window.read().unwrap_or_else(|p| p.into_inner());
        if after < w.floor {
            return None;
        }
        let start = w.changes.partition_point(|c| c.revision <= after);
        let mut deltas = BTreeMap::new();
        for c in w.changes.range(start..) {
            if let Some(d) = delta(c, agent) {
                deltas.insert(c.entry_id.clone(), d);
            }
        }
        Some((after.max(w.head), deltas))
    }
}

/// What `c` means for `agent`, if anything.
pub fn delta(c: &Change, agent: &str) -> Option<Delta> {
    if c.new_parent.as_deref() == Some(agent) {
        Some(Delta::Upsert)
    } else if c.old_parent.as_deref() == Some(agent) {
        Some(Delta::Remove)
    } else {
        None
    }
}

/// Reads every change after the window's head into it and publishes the new head.
///
/// Every entry write takes the next revision and writes its change record, so the log has no
/// gaps: a gap after the head means the log was compacted past it, and the window restarts
/// there (what is gone is gone for it too; a stream behind the new floor resyncs in full). No
/// scan of the whole log is needed for that — on etcd 3.4 every range request walks all the
/// keys it spans, whatever its limit.
async fn catch_up(
    entries: &EntryRepo,
    window: &RwLock<Window>,
    tx: &watch::Sender<u64>,
    cap: usize,
) -> Result<(), ApiError> {
    loop {
        let head = window.read().unwrap_or_else(|p| p.into_inner()).head;
        let page = entries.changes_since(head, PAGE).await?;
        let n = page.len();
        let compacted_to = match page.first() {
            Some(c) if c.revision > head + 1 => Some(c.revision - 1),
            Some(_) => None,
            // Nothing after the head: only a log compacted to nothing hides newer writes. The
            // revision is read first, then the log again, so a write landing meanwhile is not
            // taken for a compaction.
            None => {
                let rev = entries.revision().await?;
                if rev > head && !entries.changes_since(head, 1).await?.is_empty() {
                    continue;
                }
                Some(rev).filter(|r| *r > head)
            }
        };
        {
            let mut w = window.write().unwrap_or_else(|p| p.into_inner());
            if let Some(floor) = compacted_to {
                w.reset(floor);
            }
            for c in page {
                w.push(c, cap);
            }
            tx.send_replace(w.head);
        }
        if n < PAGE {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entries::{EntryOp, EntrySpec};
    use std::time::SystemTime;
    use ward_spiffe::TrustDomain;
    use ward_store::MemStore;

    async fn create(repo: &EntryRepo, parent: &str, n: u32) -> crate::entries::Entry {
        repo.create(
            &spec(parent, n),
            "admin",
            format!("e{n}"),
            SystemTime::now(),
        )
        .await
        .unwrap()
    }

    fn repo() -> EntryRepo {
        EntryRepo::new(
            Arc::new(MemStore::new()),
            TrustDomain::new("example.org").unwrap(),
        )
    }

    fn spec(parent: &str, n: u32) -> EntrySpec {
        EntrySpec {
            spiffe_id: format!("spiffe://example.org/w{n}"),
            parent_id: format!("spiffe://example.org/{parent}"),
            selectors: vec!["unix:uid:1".into()],
            ..Default::default()
        }
    }

    async fn wait_for(feed: &ChangeFeed, rev: u64) {
        let mut rx = feed.subscribe();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|h| *h >= rev))
            .await
            .expect("the feed reads the write")
            .unwrap();
    }

    #[tokio::test]
    async fn the_feed_reads_each_change_once_and_answers_per_agent() {
        let repo = repo();
        let a = "spiffe://example.org/a";
        let first = create(&repo, "a", 0).await;
        let feed = ChangeFeed::start(repo.clone(), 4).await.unwrap();
        // What was in the log before the feed started is in its window.
        let (rev, d) = feed.since(a, 0).unwrap();
        assert_eq!(rev, first.revision);
        assert_eq!(d.get(&first.id), Some(&Delta::Upsert));

        let b1 = create(&repo, "b", 1).await;
        wait_for(&feed, b1.revision).await;
        let (rev, d) = feed.since(a, first.revision).unwrap();
        assert_eq!(rev, b1.revision);
        assert!(d.is_empty(), "another agent's entry is nothing to a: {d:?}");

        // Moving an entry from a to b: a removes it, b gets it.
        let mut moved = spec("b", 0);
        moved.spiffe_id = first.spiffe_id.to_string();
        let m = repo.update(&first.id, &moved, 0).await.unwrap();
        wait_for(&feed, m.revision).await;
        assert_eq!(
            feed.since(a, b1.revision).unwrap().1.get(&first.id),
            Some(&Delta::Remove)
        );
        assert_eq!(
            feed.since("spiffe://example.org/b", b1.revision)
                .unwrap()
                .1
                .get(&first.id),
            Some(&Delta::Upsert)
        );

        // Past the window's size, the oldest fall out and a reader that far behind is told so.
        let mut last = m.revision;
        for n in 2..8 {
            last = create(&repo, "a", n).await.revision;
        }
        wait_for(&feed, last).await;
        assert!(feed.since(a, first.revision).is_none());
        let (rev, d) = feed.since(a, last - 2).unwrap();
        assert_eq!((rev, d.len()), (last, 2));
        // A reader ahead of the feed is current to its own revision.
        assert_eq!(
            feed.since(a, last + 5).unwrap(),
            (last + 5, BTreeMap::new())
        );
    }

    #[tokio::test]
    async fn a_log_compacted_past_the_window_moves_it_on() {
        let repo = repo();
        let ops: Vec<EntryOp> = (0..5)
            .map(|n| EntryOp::Create {
                id: format!("e{n}"),
                spec: spec("a", n),
                origin: "admin".into(),
            })
            .collect();
        repo.write_many(ops, SystemTime::now()).await.unwrap();
        // A window that last read revision 0, then the log compacted to its newest two.
        let window = RwLock::new(Window {
            floor: 0,
            head: 0,
            changes: VecDeque::new(),
        });
        assert_eq!(repo.compact_changes(2).await.unwrap(), 3);
        let (tx, rx) = watch::channel(0);
        catch_up(&repo, &window, &tx, 100).await.unwrap();
        {
            let w = window.read().unwrap();
            assert_eq!((w.floor, w.head, w.changes.len()), (3, 5, 2));
            assert_eq!(*rx.borrow(), 5);
        }

        // A log compacted to nothing: the revision says how far it went.
        create(&repo, "a", 9).await;
        assert_eq!(repo.compact_changes(0).await.unwrap(), 3);
        catch_up(&repo, &window, &tx, 100).await.unwrap();
        let w = window.read().unwrap();
        assert_eq!((w.floor, w.head, w.changes.len()), (6, 6, 0));
    }
}
