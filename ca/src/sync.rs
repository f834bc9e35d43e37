//! The per-agent sync stream: the agent's entries and the bundle, in full first (or only the
//! changes since the agent's last revision when the change log still covers it), then every
//! change as it is committed.
//!
//! The stream watches the CA's change feed and the bundle *before* reading state, so no write
//! can fall between the read and the wait. It ends with `PermissionDenied` when the agent is
//! evicted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use ward_net::PeerInfo;
use ward_proto::node::SyncUpdate;

use crate::agents::AgentRecord;
use crate::authority::ActiveSet;
use crate::convert::{bundle_to_proto, entry_to_proto};
use crate::core::CaCore;
use crate::error::ApiError;
use crate::feed::{Delta, delta};

/// What the stream task hands to the response.
type Item = Box<Result<SyncUpdate, Status>>;

/// How many change records are read per page.
const PAGE: usize = 1000;
/// How often a quiet stream re-checks that its agent may still sync.
const RECHECK: Duration = Duration::from_secs(30);

/// Computes the update that brings an agent from revision `after` to now, or `None` if the
/// change log no longer reaches back that far (a full resync is needed). The CA's shared feed
/// answers from memory; only a stream further behind reads the store's log.
async fn incremental(
    core: &CaCore,
    agent: &str,
    after: u64,
) -> Result<Option<(u64, SyncUpdate)>, ApiError> {
    let (rev, deltas) = match core.feed.since(agent, after) {
        Some(found) => found,
        None => match from_store(core, agent, after).await? {
            Some(found) => found,
            None => return Ok(None),
        },
    };
    let mut update = SyncUpdate {
        revision: rev,
        ..Default::default()
    };
    for (id, d) in deltas {
        match d {
            Delta::Upsert => match core.entries.get(&id).await? {
                // The entry may have moved or gone since; the later change handles that, but the
                // current state decides what we send.
                Some(e) if e.parent_id.as_str() == agent => {
                    update.upserted.push(entry_to_proto(&e))
                }
                _ => update.removed.push(id),
            },
            Delta::Remove => update.removed.push(id),
        }
    }
    Ok(Some((rev, update)))
}

/// The changes after `after` that concern `agent`, read from the store's change log.
async fn from_store(
    core: &CaCore,
    agent: &str,
    after: u64,
) -> Result<Option<(u64, BTreeMap<String, Delta>)>, ApiError> {
    let mut rev = after;
    let mut deltas = BTreeMap::new();
    loop {
        let page = core.entries.changes_since(rev, PAGE).await?;
        let n = page.len();
        // The log has no gaps (see `feed`): one after `after` means it was compacted past it.
        if rev == after {
            let gone = match page.first() {
                Some(c) => c.revision > after + 1,
                None => core.entries.revision().await? > after,
            };
            if gone {
                return Ok(None);
            }
        }
        for c in page {
            rev = c.revision;
            if let Some(d) = delta(&c, agent) {
                deltas.insert(c.entry_id, d);
            }
        }
        if n < PAGE {
            return Ok(Some((rev, deltas)));
        }
    }
}

async fn full(core: &CaCore, agent: &str) -> Result<(u64, SyncUpdate), ApiError> {
    let rev = core.entries.revision().await?;
    let entries = core.entries.by_parent(agent).await?;
    Ok((
        rev,
        SyncUpdate {
            revision: rev,
            full: true,
            upserted: entries.iter().map(entry_to_proto).collect(),
            removed: Vec::new(),
            bundle: None,
            ..Default::default()
        },
    ))
}

/// Puts the bundle and the taints that come with it into `update`.
fn add_bundle(set: &ActiveSet, update: &mut SyncUpdate) {
    update.bundle = Some(bundle_to_proto(&set.bundle));
    update.tainted_x509_keys = set.taints.x509_keys.clone();
    update.tainted_jwt_key_ids = set.taints.jwt_key_ids.clone();
}

/// Puts the complete current policy set into `update`.
async fn add_policies(core: &CaCore, update: &mut SyncUpdate) -> Result<(), ApiError> {
    update.policies = core
        .policies
        .list()
        .await?
        .iter()
        .map(|r| ward_proto::convert::policy_to_proto(&r.policy, r.revision))
        .collect();
    update.policies_changed = true;
    Ok(())
}

/// Puts the mesh's egress configuration into `update`.
async fn add_egress(core: &CaCore, update: &mut SyncUpdate) -> Result<(), ApiError> {
    let rec = core.egress.get().await?;
    update.egress = Some(ward_proto::convert::egress_to_proto(&rec.doc, rec.revision));
    update.egress_changed = true;
    Ok(())
}

/// Puts the services changed after `after` into `update` (every service when the change log
/// does not reach back that far); returns the revision sent.
async fn add_services(
    core: &CaCore,
    after: Option<u64>,
    update: &mut SyncUpdate,
) -> Result<u64, ApiError> {
    let svc = &core.services;
    let full = match after {
        None => true,
        Some(a) => a < svc.changes_floor().await?,
    };
    if full {
        let rev = svc.revision().await?;
        update.services_full = true;
        update.services_upserted = svc
            .list()
            .await?
            .iter()
            .map(|r| ward_proto::convert::service_to_proto(&r.service, r.revision, &r.origin))
            .collect();
        return Ok(rev);
    }
    let after = after.unwrap_or(0);
    let (rev, names) = svc.changed_since(after).await?;
    for name in names {
        match svc.get(&name).await? {
            Some(r) => update
                .services_upserted
                .push(ward_proto::convert::service_to_proto(
                    &r.service, r.revision, &r.origin,
                )),
            None => update.services_removed.push(name),
        }
    }
    Ok(rev)
}

/// Starts the stream for `agent`.
pub fn stream(
    core: Arc<CaCore>,
    agent: AgentRecord,
    peer: Option<PeerInfo>,
    since: u64,
) -> impl Stream<Item = Result<SyncUpdate, Status>> {
    // Items are boxed: a channel allocates its slots in blocks of 32, and an unboxed update
    // (with its error case) made that block about 12 KB per agent, most of a stream's memory
    // at 10,000 agents.
    let (tx, rx) = mpsc::channel::<Item>(8);
    tokio::spawn(async move {
        core.metrics.sync_streams.inc();
        if let Err(e) = run(&core, &agent, peer.as_ref(), since, &tx).await {
            let _ = tx.send(Box::new(Err(e.into_status()))).await;
        }
        core.metrics.sync_streams.dec();
    });
    ReceiverStream::new(rx).map(|item| *item)
}

async fn run(
    core: &CaCore,
    agent: &AgentRecord,
    peer: Option<&PeerInfo>,
    since: u64,
    tx: &mpsc::Sender<Item>,
) -> Result<(), ApiError> {
    let me = agent.id.to_string();
    let mut changes = core.feed.subscribe();
    let mut agents = core.agents.watch_one(&agent.id);
    let mut sets = core.authorities.watch();
    let mut stopping = core.stopping.subscribe();
    let mut policies = core.policies.watch();
    let mut services = core.services.watch();
    let mut egress = core.egress.watch();

    let current = core.entries.revision().await?;
    let first = if since == 0 || since > current {
        None
    } else {
        incremental(core, &me, since).await?
    };
    let (mut rev, mut update) = match first {
        Some(u) => u,
        None => full(core, &me).await?,
    };
    let set = sets.borrow_and_update().clone();
    let mut sent_seq = set.bundle.sequence;
    add_bundle(&set, &mut update);
    add_policies(core, &mut update).await?;
    add_egress(core, &mut update).await?;
    let mut svc_rev = add_services(core, None, &mut update).await?;
    if tx.send(Box::new(Ok(update))).await.is_err() {
        return Ok(());
    }

    loop {
        let mut policies_changed = false;
        let mut services_changed = false;
        let mut egress_changed = false;
        tokio::select! {
            r = changes.changed() => if r.is_err() { return Ok(()) },
            ok = policies.changed() => {
                if !ok { return Ok(()) }
                policies_changed = true;
            }
            ok = services.changed() => {
                if !ok { return Ok(()) }
                services_changed = true;
            }
            ok = egress.changed() => {
                if !ok { return Ok(()) }
                egress_changed = true;
            }
            ok = agents.changed() => {
                if !ok { return Ok(()) }
                core.authorize_agent(peer).await?;
                continue;
            }
            r = sets.changed() => if r.is_err() { return Ok(()) },
            _ = tokio::time::sleep(RECHECK) => {
                core.authorize_agent(peer).await?;
                continue;
            }
            _ = tx.closed() => return Ok(()),
            _ = ward_net::process::until_set(&mut stopping) => {
                return Err(ApiError::Unavailable("the CA is shutting down".into()));
            }
        }
        let (next_rev, mut update) = match incremental(core, &me, rev).await? {
            Some(u) => u,
            None => full(core, &me).await?,
        };
        let set = sets.borrow_and_update().clone();
        if set.bundle.sequence != sent_seq {
            sent_seq = set.bundle.sequence;
            add_bundle(&set, &mut update);
        }
        if policies_changed {
            add_policies(core, &mut update).await?;
        }
        if egress_changed {
            add_egress(core, &mut update).await?;
        }
        if services_changed {
            svc_rev = add_services(core, Some(svc_rev), &mut update).await?;
        }
        let empty = !update.full
            && update.upserted.is_empty()
            && update.removed.is_empty()
            && update.bundle.is_none()
            && !update.policies_changed
            && !update.egress_changed
            && !update.services_full
            && update.services_upserted.is_empty()
            && update.services_removed.is_empty();
        rev = next_rev;
        if empty {
            // Nothing for this agent: stay silent so unrelated changes cost it nothing.
            continue;
        }
        if tx.send(Box::new(Ok(update))).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::SystemTime;

    use futures::StreamExt;
    use ward_spiffe::{SpiffeId, SystemClock};
    use ward_store::{Batch, MemStore, Store, StoreError, Watch};

    use super::*;
    use crate::entries::EntrySpec;

    /// A store that counts the reads of the entry change log.
    #[derive(Debug, Default)]
    struct Counting {
        inner: MemStore,
        change_reads: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Store for Counting {
        async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key).await
        }
        async fn scan(
            &self,
            prefix: &[u8],
            after: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<ward_store::Entry>, StoreError> {
            if prefix == crate::entries::CHANGE_PREFIX {
                self.change_reads.fetch_add(1, Ordering::Relaxed);
            }
            self.inner.scan(prefix, after, limit).await
        }
        async fn compare_and_swap(
            &self,
            key: &[u8],
            expected: Option<&[u8]>,
            new: Option<&[u8]>,
        ) -> Result<(), StoreError> {
            self.inner.compare_and_swap(key, expected, new).await
        }
        async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
            self.inner.commit(batch).await
        }
        fn watch(&self, prefix: &[u8]) -> Watch {
            self.inner.watch(prefix)
        }
    }

    fn agent(n: usize) -> AgentRecord {
        AgentRecord {
            id: SpiffeId::new(&format!("spiffe://example.org/ward/agent/a{n}")).unwrap(),
            attestation_type: "join_token".into(),
            selectors: Vec::new(),
            serial: String::new(),
            prev_serial: None,
            expires_at: i64::MAX,
            attested_at: 0,
            evicted: false,
        }
    }

    async fn core(dir: &std::path::Path, store: Arc<dyn Store>) -> Arc<CaCore> {
        let cfg = crate::config::CaConfig::from_toml(
            &format!(
                "trust_domain = \"example.org\"\ndata_dir = {:?}\n",
                dir.display().to_string()
            ),
            "test",
        )
        .unwrap();
        let keys = Arc::new(crate::keys::DiskKeyManager::open(&dir.join("keys")).unwrap());
        Arc::new(
            CaCore::open(cfg, store, keys, Arc::new(SystemClock))
                .await
                .unwrap(),
        )
    }

    fn spec(n: usize, agent_n: usize) -> EntrySpec {
        EntrySpec {
            spiffe_id: format!("spiffe://example.org/w{n}"),
            parent_id: agent(agent_n).id.to_string(),
            selectors: vec!["unix:uid:1".into()],
            ..Default::default()
        }
    }

    /// A stream further behind than the CA's feed reads the store's log; when that no longer
    /// reaches back to its revision it is told so (and resyncs in full).
    #[tokio::test]
    async fn behind_a_compacted_log_the_store_path_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let core = core(dir.path(), Arc::new(MemStore::new())).await;
        let now = SystemTime::now();
        for n in 0..4 {
            core.entries
                .create(&spec(n, 1), "admin", format!("e{n}"), now)
                .await
                .unwrap();
        }
        let mut head = core.feed.subscribe();
        head.wait_for(|h| *h == 4).await.unwrap();
        let me = agent(1).id.to_string();
        let (rev, d) = from_store(&core, &me, 2).await.unwrap().unwrap();
        assert_eq!((rev, d.len()), (4, 2), "revisions 3 and 4");
        core.entries.compact_changes(1).await.unwrap();
        assert!(
            from_store(&core, &me, 2).await.unwrap().is_none(),
            "3 is gone"
        );
        let (rev, d) = from_store(&core, &me, 3).await.unwrap().unwrap();
        assert_eq!((rev, d.len()), (4, 1));
        assert_eq!(
            from_store(&core, &me, 4).await.unwrap().unwrap(),
            (4, BTreeMap::new())
        );
        core.entries.compact_changes(0).await.unwrap();
        assert!(
            from_store(&core, &me, 3).await.unwrap().is_none(),
            "compacted to nothing"
        );
        // The feed still holds them all, so a stream resuming at 2 is sent only the changes.
        let mut s = Box::pin(stream(core.clone(), agent(1), None, 2));
        let u = s.next().await.unwrap().unwrap();
        assert!(!u.full);
        assert_eq!(u.upserted.len(), 2);
    }

    /// However many agents sync, one entry write costs the CA a bounded number of change-log
    /// reads (the shared feed's), not one or two per stream.
    #[tokio::test]
    async fn one_change_is_read_once_for_all_streams() {
        let dir = tempfile::tempdir().unwrap();
        let counting = Arc::new(Counting::default());
        let core = core(dir.path(), counting.clone()).await;
        const STREAMS: usize = 200;
        let mut streams = Vec::new();
        for n in 0..STREAMS {
            let mut s = Box::pin(stream(core.clone(), agent(n), None, 0));
            let first = s.next().await.unwrap().unwrap();
            assert!(first.full);
            streams.push(s);
        }
        let before = counting.change_reads.load(Ordering::Relaxed);
        let e = core
            .entries
            .create(&spec(0, 7), "admin", "e1".into(), SystemTime::now())
            .await
            .unwrap();
        let update = tokio::time::timeout(Duration::from_secs(10), streams[7].next())
            .await
            .expect("agent 7 is told")
            .unwrap()
            .unwrap();
        assert_eq!(update.upserted.len(), 1);
        assert_eq!(update.upserted[0].id, e.id);
        // Give every other stream time to wake and look.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reads = counting.change_reads.load(Ordering::Relaxed) - before;
        assert!(
            reads <= 4,
            "{reads} change-log reads for one write with {STREAMS} streams"
        );
        // The others heard nothing.
        for (n, s) in streams.iter_mut().enumerate() {
            if n == 7 {
                continue;
            }
            let r = tokio::time::timeout(Duration::from_millis(1), s.next()).await;
            assert!(r.is_err(), "agent {n} was sent {r:?}");
        }
    }
}
