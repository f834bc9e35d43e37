//! Registration entries: validation (pure) and the repository that stores them with their
//! indexes and the change log that agent sync streams follow.
//!
//! Every write bumps `meta/revision` under a compare-and-swap and appends `change/<rev>` in the
//! same atomic batch, so a reader that saw revision R and then reads the changes after R misses
//! nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use ward_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};
use ward_store::{Batch, Store, scan_all};

use crate::db::{self, unix};
use crate::error::ApiError;

/// Longest hint accepted.
pub const MAX_HINT: usize = 256;
/// Most DNS names per entry.
pub const MAX_DNS_NAMES: usize = 32;
/// Most selectors per entry.
pub const MAX_SELECTORS: usize = 64;

/// A stored registration entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Random ID.
    pub id: String,
    /// The identity issued.
    pub spiffe_id: SpiffeId,
    /// The agent that may serve it.
    pub parent_id: SpiffeId,
    /// Workload selectors, all of which a caller must have.
    pub selectors: Vec<Selector>,
    /// X.509-SVID TTL in seconds (0 = CA default).
    pub x509_svid_ttl: u32,
    /// JWT-SVID TTL in seconds (0 = CA default).
    pub jwt_svid_ttl: u32,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Hint for workloads holding several SVIDs.
    pub hint: String,
    /// Admin flag (reserved for admin API access by workloads).
    pub admin: bool,
    /// Revision of the last write.
    pub revision: u64,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// `admin` for static entries, else the producing policy.
    pub origin: String,
}

/// What a caller asks to create or update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntrySpec {
    /// SPIFFE ID to issue.
    pub spiffe_id: String,
    /// Parent agent ID.
    pub parent_id: String,
    /// `type:value` selectors.
    pub selectors: Vec<String>,
    /// Seconds, 0 = default.
    pub x509_svid_ttl: u32,
    /// Seconds, 0 = default.
    pub jwt_svid_ttl: u32,
    /// DNS names.
    pub dns_names: Vec<String>,
    /// Hint.
    pub hint: String,
    /// Admin flag.
    pub admin: bool,
}

/// A validated spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSpec {
    spiffe_id: SpiffeId,
    parent_id: SpiffeId,
    selectors: SelectorSet,
    spec: EntrySpec,
}

/// Validates every field of a spec for trust domain `td`. Pure.
pub fn validate(spec: &EntrySpec, td: &TrustDomain) -> Result<ValidSpec, ApiError> {
    let inv = |m: String| Err(ApiError::InvalidArgument(m));
    let spiffe_id = match SpiffeId::new_with_path(&spec.spiffe_id) {
        Ok(id) => id,
        Err(e) => return inv(format!("spiffe_id {:?}: {e}", spec.spiffe_id)),
    };
    if !spiffe_id.is_member_of(td) {
        return inv(format!("spiffe_id {spiffe_id} is not in trust domain {td}"));
    }
    let parent_id = match SpiffeId::new_with_path(&spec.parent_id) {
        Ok(id) => id,
        Err(e) => return inv(format!("parent_id {:?}: {e}", spec.parent_id)),
    };
    if !parent_id.is_member_of(td) {
        return inv(format!("parent_id {parent_id} is not in trust domain {td}"));
    }
    if spec.selectors.is_empty() {
        return inv("at least one selector is required".into());
    }
    if spec.selectors.len() > MAX_SELECTORS {
        return inv(format!("at most {MAX_SELECTORS} selectors"));
    }
    let mut selectors = Vec::new();
    for s in &spec.selectors {
        match Selector::parse(s) {
            Ok(sel) => selectors.push(sel),
            Err(e) => return inv(format!("selector {s:?}: {e}")),
        }
    }
    if spec.dns_names.len() > MAX_DNS_NAMES {
        return inv(format!("at most {MAX_DNS_NAMES} DNS names"));
    }
    for d in &spec.dns_names {
        if crate::issuer::validate_dns_name(d).is_err() {
            return inv(format!("dns name {d:?} is not a valid host name"));
        }
    }
    if spec.hint.len() > MAX_HINT || spec.hint.chars().any(char::is_control) {
        return inv(format!(
            "hint must be at most {MAX_HINT} printable characters"
        ));
    }
    Ok(ValidSpec {
        spiffe_id,
        parent_id,
        selectors: SelectorSet::new(selectors),
        spec: spec.clone(),
    })
}

impl ValidSpec {
    fn uniq_key(&self) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update(self.parent_id.as_str());
        h.update([0]);
        for s in self.selectors.iter() {
            h.update(s.to_string());
            h.update([0]);
        }
        h.update(self.spiffe_id.as_str());
        format!("entry_uniq/{}", hex::encode(h.finalize())).into_bytes()
    }

    fn into_entry(self, id: String, revision: u64, created_at: i64, origin: String) -> Entry {
        let mut dns = self.spec.dns_names;
        dns.dedup();
        Entry {
            id,
            spiffe_id: self.spiffe_id,
            parent_id: self.parent_id,
            selectors: self.selectors.as_slice().to_vec(),
            x509_svid_ttl: self.spec.x509_svid_ttl,
            jwt_svid_ttl: self.spec.jwt_svid_ttl,
            dns_names: dns,
            hint: self.spec.hint,
            admin: self.spec.admin,
            revision,
            created_at,
            origin,
        }
    }
}

impl Entry {
    /// The entry's selectors as a set.
    pub fn selector_set(&self) -> SelectorSet {
        SelectorSet::new(self.selectors.clone())
    }

    fn uniq_key(&self) -> Vec<u8> {
        ValidSpec {
            spiffe_id: self.spiffe_id.clone(),
            parent_id: self.parent_id.clone(),
            selectors: self.selector_set(),
            spec: EntrySpec::default(),
        }
        .uniq_key()
    }
}

/// Another writer committed first.
#[derive(Debug)]
struct Raced;

#[derive(Debug)]
enum PlanError {
    Raced,
    Api(ApiError),
}

impl From<ApiError> for PlanError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

/// One write of [`EntryRepo::write_many`].
#[derive(Debug, Clone)]
pub enum EntryOp {
    /// Create an entry with this ID.
    Create {
        /// New entry ID.
        id: String,
        /// Fields.
        spec: EntrySpec,
        /// `admin` or the producing policy.
        origin: String,
    },
    /// Replace an entry's fields.
    Update {
        /// Entry ID.
        id: String,
        /// New fields.
        spec: EntrySpec,
        /// Apply only at this revision (0 = any).
        expected_revision: u64,
        /// New origin (None = keep).
        origin: Option<String>,
    },
    /// Delete an entry.
    Delete {
        /// Entry ID.
        id: String,
    },
}

/// One entry change in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Revision of this change.
    pub revision: u64,
    /// Entry ID.
    pub entry_id: String,
    /// Parent before the change (None if created).
    pub old_parent: Option<String>,
    /// Parent after the change (None if deleted).
    pub new_parent: Option<String>,
}

const REVISION_KEY: &[u8] = b"meta/revision";
/// Prefix of the change log (watch it to learn of entry writes).
pub const CHANGE_PREFIX: &[u8] = b"change/";

fn entry_key(id: &str) -> Vec<u8> {
    format!("entry/{id}").into_bytes()
}

fn parent_key(parent: &str, id: &str) -> Vec<u8> {
    format!("entry_parent/{parent}\0{id}").into_bytes()
}

fn change_key(rev: u64) -> Vec<u8> {
    format!("change/{rev:020}").into_bytes()
}

fn check_entry_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
    {
        return Err(ApiError::InvalidArgument(format!(
            "invalid entry id {id:?}"
        )));
    }
    Ok(())
}

/// Stores entries, their indexes and the change log.
#[derive(Debug, Clone)]
pub struct EntryRepo {
    store: Arc<dyn Store>,
    td: TrustDomain,
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

impl EntryRepo {
    /// A repository over `store` for trust domain `td`.
    pub fn new(store: Arc<dyn Store>, td: TrustDomain) -> Self {
        Self {
            store,
            td,
            write_lock: Arc::default(),
        }
    }

    /// The same repository writing through `fence` (singleton work: the identity controller's
    /// writes and the change-log compaction; once this replica is deposed they fail with
    /// `FAILED_PRECONDITION` and write nothing). It shares this one's in-process lock.
    pub fn fenced(&self, fence: ward_store::Condition) -> Self {
        Self {
            store: Arc::new(ward_store::Fenced::new(self.store.clone(), fence)),
            td: self.td.clone(),
            write_lock: self.write_lock.clone(),
        }
    }

    /// The current revision (0 if nothing was ever written).
    pub async fn revision(&self) -> Result<u64, ApiError> {
        Ok(self.revision_raw().await?.1)
    }

    async fn revision_raw(&self) -> Result<(Option<Vec<u8>>, u64), ApiError> {
        let raw = self.store.get(REVISION_KEY).await?;
        let rev = match &raw {
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ApiError::Internal("corrupt meta/revision".into()))?,
            None => 0,
        };
        Ok((raw, rev))
    }

    /// Creates an entry. Duplicates (same parent, selectors and SPIFFE ID) are refused.
    pub async fn create(
        &self,
        spec: &EntrySpec,
        origin: &str,
        id: String,
        now: SystemTime,
    ) -> Result<Entry, ApiError> {
        let op = EntryOp::Create {
            id,
            spec: spec.clone(),
            origin: origin.to_owned(),
        };
        self.write_many(vec![op], now).await?.remove(0)
    }

    /// Replaces an entry's fields. With `expected_revision != 0` the update applies only if
    /// the entry is still at that revision.
    pub async fn update(
        &self,
        id: &str,
        spec: &EntrySpec,
        expected_revision: u64,
    ) -> Result<Entry, ApiError> {
        let op = EntryOp::Update {
            id: id.to_owned(),
            spec: spec.clone(),
            expected_revision,
            origin: None,
        };
        self.write_many(vec![op], SystemTime::now())
            .await?
            .remove(0)
    }

    /// Deletes an entry.
    pub async fn delete(&self, id: &str) -> Result<Entry, ApiError> {
        let op = EntryOp::Delete { id: id.to_owned() };
        self.write_many(vec![op], SystemTime::now())
            .await?
            .remove(0)
    }

    /// The most writes one [`write_many`](Self::write_many) can hold on this store: each
    /// write is at most 6 store operations (entry, uniqueness slot and parent index, each
    /// possibly moved, and its change record) plus the revision, within the store's
    /// per-transaction limit (etcd: 21; embedded stores: no limit beyond callers' own).
    pub fn batch_capacity(&self) -> usize {
        const OPS_PER_WRITE: usize = 6;
        (self.store.limits().max_ops.saturating_sub(1) / OPS_PER_WRITE).max(1)
    }

    /// Applies several writes in one atomic, durable commit (one revision and one change record
    /// per write). Each write succeeds or fails on its own: a failing one is left out of the
    /// commit and its error returned in its place. The outer error means nothing was written.
    ///
    /// The in-process lock orders this replica's writers; another replica writing at the same
    /// time makes the revision condition fail, and the writes are planned again on what it
    /// wrote (a bounded number of times, then `ABORTED`).
    pub async fn write_many(
        &self,
        ops: Vec<EntryOp>,
        now: SystemTime,
    ) -> Result<Vec<Result<Entry, ApiError>>, ApiError> {
        let _g = self.write_lock.lock().await;
        const ATTEMPTS: u32 = 32;
        for attempt in 1..=ATTEMPTS {
            match self.try_write_many(ops.clone(), now).await {
                Err(Raced) if attempt < ATTEMPTS => {
                    // Back off a little, differently per attempt, so racing replicas interleave.
                    let ms = u64::from(attempt.min(8)) * rand::random_range(1..=5u64);
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                Err(Raced) => break,
                Ok(r) => return r,
            }
        }
        Err(ApiError::Aborted(
            "entries kept changing under concurrent writers (other CA replicas); try again".into(),
        ))
    }

    /// One attempt of [`write_many`](Self::write_many); `Err(Raced)` when another writer
    /// committed between the plan and the commit.
    async fn try_write_many(
        &self,
        ops: Vec<EntryOp>,
        now: SystemTime,
    ) -> Result<Result<Vec<Result<Entry, ApiError>>, ApiError>, Raced> {
        let r = self.plan_and_commit(ops, now).await;
        match r {
            Err(PlanError::Raced) => Err(Raced),
            Err(PlanError::Api(e)) => Ok(Err(e)),
            Ok(v) => Ok(Ok(v)),
        }
    }

    async fn plan_and_commit(
        &self,
        ops: Vec<EntryOp>,
        now: SystemTime,
    ) -> Result<Vec<Result<Entry, ApiError>>, PlanError> {
        let (raw_rev, mut rev) = self.revision_raw().await?;
        let mut batch = Batch::new();
        // Uniqueness slots and entries as they will be after the writes so far in this batch.
        let mut uniq: HashMap<Vec<u8>, Option<String>> = HashMap::new();
        let mut current: HashMap<String, Option<(Entry, Vec<u8>)>> = HashMap::new();
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            let r = self
                .plan_one(op, now, rev + 1, &mut batch, &mut uniq, &mut current)
                .await;
            if r.is_ok() {
                rev += 1;
            }
            results.push(r);
        }
        if results.iter().all(Result::is_err) {
            return Ok(results);
        }
        batch
            .require(REVISION_KEY.to_vec(), raw_rev)
            .put(REVISION_KEY.to_vec(), rev.to_string().into_bytes());
        match self.store.commit(batch).await {
            Ok(()) => Ok(results),
            // The revision (or a slot or entry read for the plan) changed: plan again.
            Err(ward_store::StoreError::Conflict { .. }) => Err(PlanError::Raced),
            Err(e) => Err(PlanError::Api(e.into())),
        }
    }

    /// The ID of the entry holding uniqueness slot `key`, if any.
    async fn slot_holder(
        &self,
        key: &[u8],
        uniq: &HashMap<Vec<u8>, Option<String>>,
    ) -> Result<Option<String>, ApiError> {
        match uniq.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self
                .store
                .get(key)
                .await?
                .map(|v| String::from_utf8_lossy(&v).into_owned())),
        }
    }

    async fn current_entry(
        &self,
        id: &str,
        current: &HashMap<String, Option<(Entry, Vec<u8>)>>,
    ) -> Result<Option<(Entry, Vec<u8>)>, ApiError> {
        if let Some(c) = current.get(id) {
            return Ok(c.clone());
        }
        let key = entry_key(id);
        match self.store.get(&key).await? {
            Some(raw) => Ok(Some((db::decode(&key, &raw)?, raw))),
            None => Ok(None),
        }
    }

    async fn plan_one(
        &self,
        op: EntryOp,
        now: SystemTime,
        revision: u64,
        batch: &mut Batch,
        uniq: &mut HashMap<Vec<u8>, Option<String>>,
        current: &mut HashMap<String, Option<(Entry, Vec<u8>)>>,
    ) -> Result<Entry, ApiError> {
        let dup = |holder: String| {
            ApiError::AlreadyExists(format!(
                "an entry with the same SPIFFE ID, parent and selectors exists: {holder}"
            ))
        };
        let (entry, change) = match op {
            EntryOp::Create { id, spec, origin } => {
                check_entry_id(&id)?;
                let valid = validate(&spec, &self.td)?;
                let key = valid.uniq_key();
                if let Some(holder) = self.slot_holder(&key, uniq).await? {
                    return Err(dup(holder));
                }
                if self.current_entry(&id, current).await?.is_some() {
                    return Err(ApiError::AlreadyExists(format!("entry {id} exists")));
                }
                let entry = valid.into_entry(id.clone(), revision, unix(now), origin);
                batch
                    .put(key.clone(), id.as_bytes().to_vec())
                    .put(parent_key(entry.parent_id.as_str(), &id), Vec::new());
                uniq.insert(key, Some(id.clone()));
                let change = Change {
                    revision,
                    entry_id: id,
                    old_parent: None,
                    new_parent: Some(entry.parent_id.to_string()),
                };
                (entry, change)
            }
            EntryOp::Update {
                id,
                spec,
                expected_revision,
                origin,
            } => {
                check_entry_id(&id)?;
                let valid = validate(&spec, &self.td)?;
                let (old, _) = self
                    .current_entry(&id, current)
                    .await?
                    .ok_or_else(|| ApiError::NotFound(format!("entry {id} not found")))?;
                if expected_revision != 0 && old.revision != expected_revision {
                    return Err(ApiError::Aborted(format!(
                        "entry {id} is at revision {}, not {expected_revision}",
                        old.revision
                    )));
                }
                let (new_key, old_key) = (valid.uniq_key(), old.uniq_key());
                if new_key != old_key {
                    if let Some(holder) = self.slot_holder(&new_key, uniq).await? {
                        return Err(dup(holder));
                    }
                    batch
                        .delete(old_key.clone())
                        .put(new_key.clone(), id.as_bytes().to_vec());
                    uniq.insert(old_key, None);
                    uniq.insert(new_key, Some(id.clone()));
                }
                let origin = origin.unwrap_or_else(|| old.origin.clone());
                let entry = valid.into_entry(id.clone(), revision, old.created_at, origin);
                batch
                    .delete(parent_key(old.parent_id.as_str(), &id))
                    .put(parent_key(entry.parent_id.as_str(), &id), Vec::new());
                let change = Change {
                    revision,
                    entry_id: id,
                    old_parent: Some(old.parent_id.to_string()),
                    new_parent: Some(entry.parent_id.to_string()),
                };
                (entry, change)
            }
            EntryOp::Delete { id } => {
                check_entry_id(&id)?;
                let (old, _) = self
                    .current_entry(&id, current)
                    .await?
                    .ok_or_else(|| ApiError::NotFound(format!("entry {id} not found")))?;
                let key = old.uniq_key();
                batch
                    .delete(entry_key(&id))
                    .delete(key.clone())
                    .delete(parent_key(old.parent_id.as_str(), &id));
                uniq.insert(key, None);
                current.insert(id.clone(), None);
                batch.put(
                    change_key(revision),
                    db::encode(&Change {
                        revision,
                        entry_id: id,
                        old_parent: Some(old.parent_id.to_string()),
                        new_parent: None,
                    })?,
                );
                return Ok(old);
            }
        };
        let raw = db::encode(&entry)?;
        batch.put(entry_key(&entry.id), raw.clone());
        batch.put(change_key(revision), db::encode(&change)?);
        current.insert(entry.id.clone(), Some((entry.clone(), raw)));
        Ok(entry)
    }

    /// Reads one entry.
    pub async fn get(&self, id: &str) -> Result<Option<Entry>, ApiError> {
        check_entry_id(id)?;
        db::get(self.store.as_ref(), &entry_key(id)).await
    }

    /// Every entry, optionally filtered.
    pub async fn list(
        &self,
        parent: Option<&str>,
        spiffe_id: Option<&str>,
    ) -> Result<Vec<Entry>, ApiError> {
        let entries = match parent {
            Some(p) => self.by_parent(p).await?,
            None => {
                let mut out = Vec::new();
                for (k, v) in scan_all(self.store.as_ref(), b"entry/").await? {
                    out.push(db::decode::<Entry>(&k, &v)?);
                }
                out
            }
        };
        Ok(entries
            .into_iter()
            .filter(|e| spiffe_id.is_none_or(|s| e.spiffe_id.as_str() == s))
            .collect())
    }

    /// Entries parented to `parent`.
    pub async fn by_parent(&self, parent: &str) -> Result<Vec<Entry>, ApiError> {
        let prefix = format!("entry_parent/{parent}\0").into_bytes();
        let mut out = Vec::new();
        for (k, _) in scan_all(self.store.as_ref(), &prefix).await? {
            let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if let Some(e) = self.get(&id).await? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Up to `limit` changes after revision `after`, oldest first.
    pub async fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, ApiError> {
        let start = change_key(after);
        let rows = self.store.scan(CHANGE_PREFIX, Some(&start), limit).await?;
        rows.iter().map(|(k, v)| db::decode(k, v)).collect()
    }

    /// The oldest revision still in the change log minus one: a reader at or after this
    /// revision can catch up incrementally.
    pub async fn changes_floor(&self) -> Result<u64, ApiError> {
        match self.store.scan(CHANGE_PREFIX, None, 1).await?.first() {
            Some((k, v)) => Ok(db::decode::<Change>(k, v)?.revision.saturating_sub(1)),
            None => self.revision().await,
        }
    }

    /// Drops change records, keeping the newest `keep`. Singleton work: with replicas only the
    /// leader runs it, through [`fenced`](Self::fenced), so a deposed leader's late batch is
    /// refused.
    pub async fn compact_changes(&self, keep: u64) -> Result<usize, ApiError> {
        let rev = self.revision().await?;
        let cutoff = rev.saturating_sub(keep);
        let mut removed = 0;
        loop {
            // Within etcd's operations per transaction.
            let page = self.store.limits().max_ops.saturating_sub(1).clamp(1, 512);
            let rows = self.store.scan(CHANGE_PREFIX, None, page).await?;
            let mut b = Batch::new();
            for (k, v) in &rows {
                let c: Change = db::decode(k, v)?;
                if c.revision > cutoff {
                    break;
                }
                b.delete(k.clone());
            }
            let n = b.ops.len();
            if n == 0 {
                return Ok(removed);
            }
            self.store.commit(b).await?;
            removed += n;
        }
    }

    /// Wakes on every entry write.
    pub fn watch(&self) -> ward_store::Watch {
        self.store.watch(CHANGE_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_store::MemStore;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn spec(id: &str) -> EntrySpec {
        EntrySpec {
            spiffe_id: id.into(),
            parent_id: "spiffe://example.org/ward/agent/x".into(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        }
    }

    #[test]
    fn validation_table() {
        let ok = spec("spiffe://example.org/web");
        assert!(validate(&ok, &td()).is_ok());
        let cases: Vec<(EntrySpec, &str)> = vec![
            (
                EntrySpec {
                    spiffe_id: "spiffe://example.org".into(),
                    ..ok.clone()
                },
                "no path",
            ),
            (
                EntrySpec {
                    spiffe_id: "spiffe://other.org/x".into(),
                    ..ok.clone()
                },
                "not in trust domain",
            ),
            (
                EntrySpec {
                    spiffe_id: "http://x/y".into(),
                    ..ok.clone()
                },
                "scheme",
            ),
            (
                EntrySpec {
                    parent_id: "spiffe://example.org/a//b".into(),
                    ..ok.clone()
                },
                "parent_id",
            ),
            (
                EntrySpec {
                    selectors: vec![],
                    ..ok.clone()
                },
                "at least one selector",
            ),
            (
                EntrySpec {
                    selectors: vec!["nocolon".into()],
                    ..ok.clone()
                },
                "selector",
            ),
            (
                EntrySpec {
                    dns_names: vec!["-bad.example".into()],
                    ..ok.clone()
                },
                "dns name",
            ),
            (
                EntrySpec {
                    dns_names: vec!["a..b".into()],
                    ..ok.clone()
                },
                "dns name",
            ),
            (
                EntrySpec {
                    hint: "a\nb".into(),
                    ..ok.clone()
                },
                "hint",
            ),
        ];
        for (s, want) in cases {
            let e = validate(&s, &td()).unwrap_err();
            assert!(matches!(e, ApiError::InvalidArgument(_)));
            assert!(e.to_string().contains(want), "{e} should mention {want}");
        }
        let wild = EntrySpec {
            dns_names: vec!["*.svc.example".into()],
            ..ok
        };
        assert!(validate(&wild, &td()).is_ok());
    }

    #[tokio::test]
    async fn crud_indexes_and_change_log() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let repo = EntryRepo::new(store.clone(), td());
        let now = SystemTime::now();
        let a = repo
            .create(&spec("spiffe://example.org/a"), "admin", "e1".into(), now)
            .await
            .unwrap();
        assert_eq!(a.revision, 1);
        let dup = repo
            .create(&spec("spiffe://example.org/a"), "admin", "e2".into(), now)
            .await;
        assert!(matches!(dup, Err(ApiError::AlreadyExists(_))));
        let b = repo
            .create(&spec("spiffe://example.org/b"), "admin", "e3".into(), now)
            .await
            .unwrap();
        assert_eq!(b.revision, 2);
        assert_eq!(
            repo.by_parent("spiffe://example.org/ward/agent/x")
                .await
                .unwrap()
                .len(),
            2
        );

        let mut moved = spec("spiffe://example.org/b");
        moved.parent_id = "spiffe://example.org/ward/agent/y".into();
        let stale = repo.update("e3", &moved, 1).await;
        assert!(matches!(stale, Err(ApiError::Aborted(_))));
        let b2 = repo.update("e3", &moved, 2).await.unwrap();
        assert_eq!(b2.revision, 3);
        assert_eq!(
            repo.by_parent("spiffe://example.org/ward/agent/x")
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            repo.by_parent("spiffe://example.org/ward/agent/y")
                .await
                .unwrap()
                .len(),
            1
        );
        // Moving onto a duplicate is refused.
        let onto_a = spec("spiffe://example.org/a");
        assert!(matches!(
            repo.update("e3", &onto_a, 0).await,
            Err(ApiError::AlreadyExists(_))
        ));

        repo.delete("e1").await.unwrap();
        assert!(matches!(
            repo.delete("e1").await,
            Err(ApiError::NotFound(_))
        ));
        assert!(repo.get("e1").await.unwrap().is_none());
        // The uniqueness slot is free again.
        repo.create(&spec("spiffe://example.org/a"), "admin", "e4".into(), now)
            .await
            .unwrap();

        let changes = repo.changes_since(0, 100).await.unwrap();
        let revs: Vec<u64> = changes.iter().map(|c| c.revision).collect();
        assert_eq!(revs, vec![1, 2, 3, 4, 5]);
        assert_eq!(
            changes[2].old_parent.as_deref(),
            Some("spiffe://example.org/ward/agent/x")
        );
        assert_eq!(
            changes[2].new_parent.as_deref(),
            Some("spiffe://example.org/ward/agent/y")
        );
        assert_eq!(changes[3].new_parent, None);
        assert_eq!(repo.changes_since(3, 100).await.unwrap().len(), 2);
        assert_eq!(repo.changes_floor().await.unwrap(), 0);
        assert_eq!(repo.compact_changes(2).await.unwrap(), 3);
        assert_eq!(repo.changes_floor().await.unwrap(), 3);
        assert!(matches!(
            repo.get("../x").await,
            Err(ApiError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn write_many_commits_the_good_writes_and_reports_the_bad() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let repo = EntryRepo::new(store.clone(), td());
        let now = SystemTime::now();
        repo.create(&spec("spiffe://example.org/a"), "admin", "e1".into(), now)
            .await
            .unwrap();
        let create = |id: &str, sid: &str| EntryOp::Create {
            id: id.into(),
            spec: spec(sid),
            origin: "identitypolicy/p".into(),
        };
        let results = repo
            .write_many(
                vec![
                    create("e2", "spiffe://example.org/b"),
                    // Same slot as e2, taken earlier in this batch.
                    create("e3", "spiffe://example.org/b"),
                    EntryOp::Delete { id: "e1".into() },
                    // e1's slot, freed earlier in this batch.
                    create("e4", "spiffe://example.org/a"),
                    EntryOp::Delete {
                        id: "missing".into(),
                    },
                    EntryOp::Update {
                        id: "e2".into(),
                        spec: spec("spiffe://example.org/c"),
                        expected_revision: 2,
                        origin: None,
                    },
                ],
                now,
            )
            .await
            .unwrap();
        let revs: Vec<Option<u64>> = results
            .iter()
            .map(|r| r.as_ref().ok().map(|e| e.revision))
            .collect();
        // A delete returns the entry as it was (e1 at revision 1); its change is revision 3.
        assert_eq!(revs, vec![Some(2), None, Some(1), Some(4), None, Some(5)]);
        match &results[1] {
            Err(ApiError::AlreadyExists(m)) => assert!(m.ends_with("e2"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(results[4], Err(ApiError::NotFound(_))));
        assert_eq!(repo.revision().await.unwrap(), 5);
        let mut ids: Vec<(String, String)> = repo
            .list(None, None)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.spiffe_id.to_string()))
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            vec![
                ("e2".into(), "spiffe://example.org/c".into()),
                ("e4".into(), "spiffe://example.org/a".into()),
            ]
        );
        let revs: Vec<u64> = repo
            .changes_since(1, 100)
            .await
            .unwrap()
            .iter()
            .map(|c| c.revision)
            .collect();
        assert_eq!(revs, vec![2, 3, 4, 5]);
        // The slot e2 left when it became /c is free, the one it holds now is not.
        repo.create(&spec("spiffe://example.org/b"), "admin", "e5".into(), now)
            .await
            .unwrap();
        assert!(
            repo.create(&spec("spiffe://example.org/c"), "admin", "e6".into(), now)
                .await
                .is_err()
        );
        // A batch of only failures writes nothing.
        let before = repo.revision().await.unwrap();
        let r = repo
            .write_many(vec![EntryOp::Delete { id: "nope".into() }], now)
            .await
            .unwrap();
        assert!(r[0].is_err());
        assert_eq!(repo.revision().await.unwrap(), before);
    }
}
