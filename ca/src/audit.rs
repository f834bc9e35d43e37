//! The issuance and attestation log: who was issued what, when, by which authority — and the
//! index of SVIDs still chained to each authority.
//!
//! Records are added to the same atomic batch as the state change they describe where there is
//! one, so an issued SVID is acknowledged only after its record is durable. No API deletes or
//! rewrites a record; the leader drops records older than `[audit] retention` ([`prune`]), so
//! the log does not grow without bound against a shared store's quota.
//!
//! Log keys sort by the writing replica's clock, and replicas' clocks differ: nothing that must
//! be exact reads the log in key order. Which SVID of a holder is the newest — what revocation
//! needs — is the live index instead (`live/…`, [`live`]): one record per holder, written in the
//! same batch as the issuance, so the store's commit order decides, not a clock.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use ward_store::{Batch, Store};

use crate::db;
use crate::error::ApiError;

const LOG_PREFIX: &[u8] = b"audit/";
const LIVE_PREFIX: &[u8] = b"live/";
/// Set once the live index holds every SVID the log held before the index existed.
const INDEXED_KEY: &[u8] = b"meta/live-index";

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix nanoseconds.
    pub time_ns: u128,
    /// What happened: `attest`, `agent-svid`, `x509-svid`, `jwt-svid`, `entry-*`, `evict`, ...
    pub event: String,
    /// The caller (agent ID, or `admin`).
    pub caller: String,
    /// The identity concerned.
    pub spiffe_id: String,
    /// Certificate serial (hex) or JWT expiry, when relevant.
    pub serial: String,
    /// Expiry, Unix seconds (0 if none).
    pub not_after: i64,
    /// Signing authority ID or key ID.
    pub authority: String,
    /// Entry ID, when relevant.
    pub entry_id: String,
}

impl AuditRecord {
    /// A record of `event` by `caller` about `spiffe_id` at `now`.
    pub fn new(now: SystemTime, event: &str, caller: &str, spiffe_id: &str) -> Self {
        Self {
            time_ns: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
            event: event.to_owned(),
            caller: caller.to_owned(),
            spiffe_id: spiffe_id.to_owned(),
            serial: String::new(),
            not_after: 0,
            authority: String::new(),
            entry_id: String::new(),
        }
    }

    /// Adds this record to `batch`, and for an issued SVID its holder's live-index record. Log
    /// keys sort by time; a random suffix keeps them unique.
    pub fn add_to(&self, batch: &mut Batch) -> Result<(), ApiError> {
        let key = format!(
            "audit/{:020}-{}",
            self.time_ns,
            db::random_hex(&mut rand::rng(), 4)
        );
        batch.require(key.clone().into_bytes(), None);
        batch.put(key.into_bytes(), db::encode(self)?);
        if let Some(live) = self.live_key() {
            let rec = LiveRecord {
                authority: self.authority.clone(),
                not_after: self.not_after,
            };
            batch.put(live, db::encode(&rec)?);
        }
        Ok(())
    }

    /// The live-index key of the SVID this record issued. An X.509-SVID replaces its holder's
    /// previous one (an agent's own SVID: the agent; a workload SVID: agent and entry). A
    /// JWT-SVID is a bearer token nobody can recall: each authority, holder and audience set
    /// keeps the latest expiry.
    fn live_key(&self) -> Option<Vec<u8>> {
        let key = match self.event.as_str() {
            "attest" | "agent-svid" => format!("live/x509/agent\0{}", self.spiffe_id),
            "x509-svid" => format!("live/x509/svid\0{}\0{}", self.caller, self.entry_id),
            "jwt-svid" => format!(
                "live/jwt/{}\0{}\0{}\0{}",
                self.authority, self.caller, self.entry_id, self.serial
            ),
            _ => return None,
        };
        Some(key.into_bytes())
    }
}

/// The newest SVID of one holder (X.509), or one holder's latest JWT-SVID from one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LiveRecord {
    authority: String,
    /// Unix seconds.
    not_after: i64,
}

/// SVIDs chained to one authority that have not expired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Live {
    /// X.509: holders whose newest SVID it signed; JWT: holders and audience sets with an
    /// unexpired token from it.
    pub count: u64,
    /// When the last of them expires.
    pub until: Option<SystemTime>,
}

/// Counts the unexpired SVIDs authority `authority` signed, from the live index (durable, so
/// the answer survives restarts, and exact across replicas). `jwt` picks JWT-SVIDs over X.509.
pub async fn live(
    store: &dyn Store,
    jwt: bool,
    authority: &str,
    now: SystemTime,
) -> Result<Live, ApiError> {
    let prefix = if jwt {
        format!("live/jwt/{authority}\0")
    } else {
        "live/x509/".to_owned()
    };
    let now_s = db::unix(now);
    let mut out = Live::default();
    for (k, v) in ward_store::scan_all(store, prefix.as_bytes()).await? {
        let r: LiveRecord = db::decode(&k, &v)?;
        if r.authority == authority && r.not_after > now_s {
            out.count += 1;
            out.until = out.until.max(Some(db::from_unix(r.not_after)));
        }
    }
    Ok(out)
}

/// Builds the live index from the log, once per store: a store written before the index
/// existed keeps refusing to revoke an authority that unexpired SVIDs still chain to. Safe to
/// run on several replicas at once: a record is only created where none exists, and one that
/// exists was written by a later issuance.
pub async fn index_log(store: &dyn Store, now: SystemTime) -> Result<usize, ApiError> {
    use std::collections::BTreeMap;
    if store.get(INDEXED_KEY).await?.is_some() {
        return Ok(0);
    }
    let now_s = db::unix(now);
    // In log order, which was one replica's issuance order before the index existed.
    let mut latest: BTreeMap<Vec<u8>, LiveRecord> = BTreeMap::new();
    for (k, v) in ward_store::scan_all(store, LOG_PREFIX).await? {
        let r: AuditRecord = db::decode(&k, &v)?;
        if let Some(key) = r.live_key() {
            let e = latest.entry(key).or_insert(LiveRecord {
                authority: String::new(),
                not_after: 0,
            });
            if r.event != "jwt-svid" || r.not_after >= e.not_after {
                e.authority = r.authority;
                e.not_after = r.not_after;
            }
        }
    }
    let mut written = 0;
    for (key, rec) in latest.into_iter().filter(|(_, r)| r.not_after > now_s) {
        match store
            .compare_and_swap(&key, None, Some(&db::encode(&rec)?))
            .await
        {
            Ok(()) => written += 1,
            Err(ward_store::StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match store.compare_and_swap(INDEXED_KEY, None, Some(b"1")).await {
        Ok(()) | Err(ward_store::StoreError::Conflict { .. }) => Ok(written),
        Err(e) => Err(e.into()),
    }
}

/// What one [`prune`] pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Log records older than the retention.
    pub records: usize,
    /// Live-index records of expired SVIDs.
    pub expired: usize,
}

/// Drops log records older than `retention` and the live-index records of expired SVIDs.
/// Singleton work: with replicas only the leader runs it, on a [`ward_store::Fenced`] store.
/// A live-index record is removed only if it still holds what was read, so an SVID issued
/// meanwhile keeps its record.
pub async fn prune(
    store: &dyn Store,
    now: SystemTime,
    retention: Duration,
) -> Result<Pruned, ApiError> {
    let page = store.limits().max_ops.saturating_sub(1).clamp(1, 512);
    let mut out = Pruned::default();
    let cutoff = now
        .checked_sub(retention)
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let end = format!("audit/{cutoff:020}").into_bytes();
    loop {
        let rows = store.scan(LOG_PREFIX, None, page).await?;
        let mut b = Batch::new();
        for (k, _) in rows.iter().take_while(|(k, _)| *k < end) {
            b.delete(k.clone());
        }
        let n = b.ops.len();
        if n == 0 {
            break;
        }
        store.commit(b).await?;
        out.records += n;
    }
    let now_s = db::unix(now);
    let mut after: Option<Vec<u8>> = None;
    loop {
        let rows = store.scan(LIVE_PREFIX, after.as_deref(), page).await?;
        let Some((last, _)) = rows.last() else { break };
        after = Some(last.clone());
        let mut b = Batch::new();
        for (k, v) in &rows {
            let r: LiveRecord = db::decode(k, v)?;
            if r.not_after <= now_s {
                b.require(k.clone(), Some(v.clone())).delete(k.clone());
            }
        }
        let n = b.ops.len();
        if n > 0 {
            match store.commit(b).await {
                Ok(()) => out.expired += n,
                // An SVID issued meanwhile: the next pass looks again.
                Err(ward_store::StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if rows.len() < page {
            break;
        }
    }
    Ok(out)
}

/// Reads the newest `limit` records (oldest first), for the admin API and tests.
pub async fn tail(store: &dyn Store, limit: usize) -> Result<Vec<AuditRecord>, ApiError> {
    let all = ward_store::scan_all(store, LOG_PREFIX).await?;
    let skip = all.len().saturating_sub(limit);
    all[skip..].iter().map(|(k, v)| db::decode(k, v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use ward_store::MemStore;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn svid(
        time_s: u64,
        event: &str,
        holder: &str,
        authority: &str,
        not_after: i64,
    ) -> AuditRecord {
        let mut r = AuditRecord::new(at(time_s), event, "spiffe://td/agent/a", holder);
        r.entry_id = holder.to_owned();
        r.authority = authority.to_owned();
        r.not_after = not_after;
        r
    }

    async fn add(store: &MemStore, r: &AuditRecord) {
        let mut b = Batch::new();
        r.add_to(&mut b).unwrap();
        store.commit(b).await.unwrap();
    }

    /// Replicas' clocks differ: a record written later by a replica whose clock is behind
    /// still replaces its holder's SVID, because commit order decides, not the log's key order.
    #[tokio::test]
    async fn the_newest_svid_of_a_holder_is_the_last_written_whatever_the_clocks() {
        let s = MemStore::new();
        add(&s, &svid(2_000, "x509-svid", "web", "A", 5_000)).await;
        add(&s, &svid(1_000, "x509-svid", "web", "B", 5_000)).await;
        add(
            &s,
            &svid(1_500, "agent-svid", "spiffe://td/agent/a", "A", 4_000),
        )
        .await;
        let a = live(&s, false, "A", at(1_600)).await.unwrap();
        assert_eq!(
            (a.count, a.until),
            (1, Some(at(4_000))),
            "A keeps only the agent's SVID"
        );
        assert_eq!(live(&s, false, "B", at(1_600)).await.unwrap().count, 1);
        // Expired ones do not count.
        assert_eq!(live(&s, false, "A", at(4_000)).await.unwrap().count, 0);
    }

    #[tokio::test]
    async fn every_unexpired_jwt_holder_and_audience_counts_for_its_key() {
        let s = MemStore::new();
        let mut r = svid(1_000, "jwt-svid", "web", "kid1", 1_300);
        r.serial = "aud1".into();
        add(&s, &r).await;
        r.serial = "aud2".into();
        add(&s, &r).await;
        r.not_after = 1_600;
        add(&s, &r).await;
        add(&s, &svid(1_000, "jwt-svid", "db", "kid2", 1_300)).await;
        let k1 = live(&s, true, "kid1", at(1_100)).await.unwrap();
        assert_eq!((k1.count, k1.until), (2, Some(at(1_600))));
        assert_eq!(live(&s, true, "kid1", at(1_400)).await.unwrap().count, 1);
        assert_eq!(live(&s, true, "kid2", at(1_100)).await.unwrap().count, 1);
        // X.509 counts do not see JWT-SVIDs.
        assert_eq!(live(&s, false, "kid1", at(1_100)).await.unwrap().count, 0);
    }

    #[tokio::test]
    async fn pruning_drops_old_records_and_expired_svids_only() {
        let s = MemStore::new();
        let day = 86_400;
        add(&s, &svid(day, "x509-svid", "old", "A", (day + 3600) as i64)).await;
        add(
            &s,
            &svid(10 * day, "x509-svid", "new", "A", (11 * day) as i64),
        )
        .await;
        add(
            &s,
            &AuditRecord::new(at(2 * day), "entry-create", "admin", "spiffe://td/x"),
        )
        .await;
        let p = prune(&s, at(10 * day + 60), Duration::from_secs(5 * day))
            .await
            .unwrap();
        assert_eq!(
            p,
            Pruned {
                records: 2,
                expired: 1
            }
        );
        let left = tail(&s, 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].entry_id, "new");
        assert_eq!(
            live(&s, false, "A", at(10 * day + 60)).await.unwrap().count,
            1
        );
        assert_eq!(
            ward_store::scan_all(&s, LIVE_PREFIX).await.unwrap().len(),
            1
        );
        // Nothing more to do.
        let again = prune(&s, at(10 * day + 60), Duration::from_secs(5 * day)).await;
        assert_eq!(again.unwrap(), Pruned::default());
    }

    #[tokio::test]
    async fn a_deposed_leader_prunes_nothing() {
        let s = Arc::new(MemStore::new());
        add(&s, &svid(1, "x509-svid", "web", "A", 2)).await;
        let fence = ward_store::Condition {
            key: b"leader/x".to_vec(),
            expected: Some(b"me".to_vec()),
        };
        let fenced = ward_store::Fenced::new(s.clone(), fence);
        let r = prune(&fenced, at(100_000_000), Duration::from_secs(3600)).await;
        assert!(matches!(r, Err(ApiError::FailedPrecondition(_))), "{r:?}");
        assert_eq!(tail(s.as_ref(), 10).await.unwrap().len(), 1);
    }

    /// A store written before the index existed: the index is built from the log once, so an
    /// authority with unexpired SVIDs is still seen to have them.
    #[tokio::test]
    async fn a_log_without_an_index_is_indexed_once() {
        let s = MemStore::new();
        for r in [
            svid(1_000, "x509-svid", "web", "A", 5_000),
            svid(1_001, "x509-svid", "web", "B", 5_000),
            svid(1_002, "x509-svid", "db", "A", 5_000),
            svid(1_003, "x509-svid", "gone", "A", 1_100),
        ] {
            let mut b = Batch::new();
            r.add_to(&mut b).unwrap();
            // What an older CA wrote: the log record alone.
            b.ops
                .retain(|op| matches!(op, ward_store::Op::Put(k, _) if k.starts_with(LOG_PREFIX)));
            s.commit(b).await.unwrap();
        }
        assert_eq!(live(&s, false, "A", at(1_200)).await.unwrap().count, 0);
        assert_eq!(index_log(&s, at(1_200)).await.unwrap(), 2);
        assert_eq!(live(&s, false, "A", at(1_200)).await.unwrap().count, 1);
        assert_eq!(live(&s, false, "B", at(1_200)).await.unwrap().count, 1);
        assert_eq!(index_log(&s, at(1_200)).await.unwrap(), 0, "indexed twice");
    }
}
