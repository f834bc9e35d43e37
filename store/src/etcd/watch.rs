//! One etcd watch over the store's prefix feeds every [`Watch`](crate::Watch) of the store, so
//! watchers wake for other replicas' writes too. It resumes from the revision after the last
//! one seen when the stream breaks; when etcd has compacted that revision away, changes may
//! have been missed, so every watcher is woken (callers re-read) and the watch restarts at the
//! oldest revision etcd still has.
//!
//! A write of this process wakes its watchers when it returns (the trait's contract); the
//! watch's event for the same revision then wakes nobody again. `Shared` keeps the revisions
//! committed here that the watch has not delivered yet, under one lock with the last revision
//! it delivered, so each revision wakes watchers exactly once whichever path sees it first.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::pb::etcdserverpb::{
    WatchCreateRequest, WatchRequest, watch_client::WatchClient, watch_request,
};
use super::{MAX_RESPONSE, Members, key_or_zero, prefix_end};
use crate::notify::Notifier;

/// Local revisions kept waiting for their watch event at most (a watch that stays down while
/// writes succeed must not grow this without bound).
const MAX_PENDING: usize = 10_000;

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) notifier: Notifier,
    state: Mutex<State>,
    connected: AtomicBool,
    /// Times a compaction made every watcher re-read.
    rereads: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// The last revision the watch delivered (or the cluster's revision at open).
    seen: i64,
    /// Revisions committed by this process, already notified, not yet seen by the watch.
    local: BTreeSet<i64>,
}

impl Shared {
    pub(super) fn new(revision: i64) -> Self {
        Self {
            notifier: Notifier::default(),
            state: Mutex::new(State {
                seen: revision,
                local: BTreeSet::new(),
            }),
            connected: AtomicBool::new(false),
            rereads: AtomicU64::new(0),
        }
    }

    pub(super) fn rereads(&self) -> u64 {
        self.rereads.load(Ordering::Relaxed)
    }

    pub(super) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This process committed `revision`, touching `keys`.
    pub(super) fn committed<'a>(
        &self,
        revision: i64,
        keys: impl Iterator<Item = &'a [u8]> + Clone,
    ) {
        let mut st = self.lock();
        if revision <= st.seen {
            return; // the watch delivered it first and woke the watchers
        }
        st.local.insert(revision);
        while st.local.len() > MAX_PENDING {
            st.local.pop_first();
        }
        self.notifier.notify(keys);
    }

    /// The watch delivered `revision` with changes to `keys` (prefix stripped).
    fn delivered(&self, revision: i64, keys: &[Vec<u8>]) {
        let mut st = self.lock();
        if !st.local.remove(&revision) {
            self.notifier.notify(keys.iter().map(Vec::as_slice));
        }
        // Events arrive in revision order: a local revision below this one was not ours to
        // wait for (cannot happen for keys under the prefix; keeps the set bounded).
        st.local.retain(|r| *r > revision);
        st.seen = st.seen.max(revision);
    }

    /// Everything up to `revision` has been delivered (a progress notification).
    fn progressed(&self, revision: i64) {
        let mut st = self.lock();
        st.local.retain(|r| *r > revision);
        st.seen = st.seen.max(revision);
    }

    /// Changes may have been lost: wake everyone.
    fn lost(&self) {
        self.rereads.fetch_add(1, Ordering::Relaxed);
        self.notifier.notify_all();
    }
}

/// Follows the prefix from `next` forever (the task is aborted when the store drops).
pub(super) async fn run(
    shared: Arc<Shared>,
    members: Arc<Members>,
    prefix: Vec<u8>,
    mut next: i64,
) {
    let mut backoff = Duration::from_millis(100);
    let mut member = 0usize;
    loop {
        let (name, channel) = members.list[member % members.list.len()].clone();
        match follow(&shared, channel, &prefix, &mut next).await {
            Ok(()) => {}
            Err(reason) => {
                if shared.connected.swap(false, Ordering::Relaxed) {
                    tracing::warn!(member = %name, %reason, resume_at = next, "etcd watch lost; resuming");
                } else {
                    tracing::debug!(member = %name, %reason, "etcd watch not connected");
                }
            }
        }
        shared.connected.store(false, Ordering::Relaxed);
        member += 1;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        if shared.connected() {
            backoff = Duration::from_millis(100);
        }
    }
}

/// One watch stream: returns when it ends, `Ok` when it should be restarted at once (a
/// compaction was handled).
pub(super) async fn follow(
    shared: &Shared,
    channel: tonic::transport::Channel,
    prefix: &[u8],
    next: &mut i64,
) -> Result<(), String> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: key_or_zero(prefix),
                range_end: prefix_end(prefix),
                start_revision: *next,
                progress_notify: true,
                ..Default::default()
            },
        )),
    };
    // `tx` lives as long as the stream: closing the request side would end the watch.
    tx.send(create).await.map_err(|_| "request stream closed")?;
    let mut client = WatchClient::new(channel).max_decoding_message_size(MAX_RESPONSE);
    let mut stream = client
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let strip = prefix.len();
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err("stream ended".into()),
            Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
        };
        if msg.compact_revision > 0 {
            tracing::warn!(
                resume_at = *next,
                compacted_to = msg.compact_revision,
                "etcd compacted revisions this watch had not seen; every watcher re-reads"
            );
            shared.lost();
            *next = msg.compact_revision;
            return Ok(());
        }
        if msg.canceled {
            return Err(format!("watch cancelled: {}", msg.cancel_reason));
        }
        if msg.created {
            shared.connected.store(true, Ordering::Relaxed);
        }
        // Events of one revision (one Txn) arrive together, in revision order.
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut current: Option<i64> = None;
        for ev in msg.events {
            let Some(kv) = ev.kv else { continue };
            if current.is_some_and(|r| r != kv.mod_revision) {
                if let Some(r) = current {
                    shared.delivered(r, &keys);
                }
                keys.clear();
            }
            current = Some(kv.mod_revision);
            let mut k = kv.key;
            k.drain(..strip.min(k.len()));
            keys.push(k);
        }
        if let Some(r) = current {
            shared.delivered(r, &keys);
            *next = (*next).max(r + 1);
        }
        if let Some(h) = msg.header
            && current.is_none()
            && !msg.created
            && h.revision > 0
        {
            shared.progressed(h.revision);
            *next = (*next).max(h.revision + 1);
        }
    }
}
