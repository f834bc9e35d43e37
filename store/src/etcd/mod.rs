//! The etcd backend: Ward's keys under one prefix of an etcd v3 cluster, so several CA replicas
//! share state on a store that is already distributed (and what Kubernetes itself runs on).
//!
//! The mapping is etcd's own model: a batch is one `Txn` (its conditions are `Compare`s, its
//! writes the success branch, so it is one revision, atomic on every member); a scan is a
//! `Range` in key order; watchers are fed by one etcd watch over the whole prefix, resumed from
//! the last revision seen after a disconnect. A watch whose start revision was compacted wakes
//! every watcher (callers re-read what they watch), so no change is missed silently.
//!
//! etcd's request limits (`--max-txn-ops`, 128 by default; `--max-request-bytes`, 1.5 MiB) are
//! the store's [`Limits`]: a batch over them is refused with [`StoreError::TooLarge`] before it
//! is sent, never split, because split it would no longer be atomic.
//!
//! The client is generated from etcd's published API (`proto/etcd`, compiled with protox like
//! Ward's own protos): the `etcd-client` crate's build needs a system `protoc`, which would
//! break Ward's one-command build.

mod lease;
mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prost::Message as _;
use tonic::transport::Channel;

use crate::{Batch, Condition, Entry, Limits, Op, Store, StoreError, Watch};

#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use pb::etcdserverpb::{
    self as rpc, Compare, RangeRequest, RequestOp, TxnRequest, TxnResponse, compare,
    kv_client::KvClient, request_op, response_op,
};

/// How to reach the cluster and where Ward's keys live in it.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// One channel per etcd member (`http://host:port`, or TLS channels the caller built).
    /// Requests go to one member at a time; a member that cannot be reached is skipped.
    pub members: Vec<(String, Channel)>,
    /// Every key is stored under this prefix (e.g. `/ward/`), so Ward shares a cluster with
    /// nothing of its own outside it.
    pub prefix: Vec<u8>,
    /// Deadline of one request to one member.
    pub request_timeout: Duration,
    /// The cluster's `--max-txn-ops` and `--max-request-bytes`.
    pub limits: Limits,
    /// Lifetime of a leader's lease: how long a dead leader holds its singletons.
    pub lease_ttl: Duration,
}

impl EtcdOptions {
    /// Plaintext channels to `endpoints` (`http://host:port`), etcd's default limits and a 5 s
    /// request deadline.
    pub fn plaintext(endpoints: &[String], prefix: &[u8]) -> Result<Self, StoreError> {
        let members = endpoints
            .iter()
            .map(|e| {
                let ch = tonic::transport::Endpoint::from_shared(e.clone())
                    .map_err(|err| StoreError::Open {
                        path: e.clone(),
                        reason: format!("not an endpoint URL: {err}"),
                    })?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .connect_lazy();
                Ok((e.clone(), ch))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Self {
            members,
            prefix: prefix.to_vec(),
            request_timeout: Duration::from_secs(5),
            limits: Limits::ETCD_DEFAULT,
            lease_ttl: Duration::from_secs(5),
        })
    }
}

/// A [`Store`] on an etcd v3 cluster.
#[derive(Debug)]
pub struct EtcdStore {
    members: Arc<Members>,
    prefix: Vec<u8>,
    limits: Limits,
    lease_ttl: Duration,
    shared: Arc<watch::Shared>,
    watcher: tokio::task::JoinHandle<()>,
}

/// The cluster's members and the one requests go to now.
#[derive(Debug)]
struct Members {
    list: Vec<(String, Channel)>,
    current: AtomicUsize,
    timeout: Duration,
}

/// Largest response the client accepts (a page of large values).
const MAX_RESPONSE: usize = 64 << 20;

impl Members {
    fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(self.list[i].1.clone()).max_decoding_message_size(MAX_RESPONSE)
    }

    /// Runs `f` against the current member; on a transport failure or timeout, a read
    /// (`idempotent`) moves on to the next member, a write returns the error (it may have been
    /// applied) and the next request starts at the next member.
    async fn call<T, F, Fut>(&self, what: &str, idempotent: bool, f: F) -> Result<T, StoreError>
    where
        F: Fn(KvClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.list.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut errors = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let err = match tokio::time::timeout(self.timeout, f(self.kv(idx))).await {
                Ok(Ok(resp)) => {
                    if idx != start {
                        self.current.store(idx, Ordering::Relaxed);
                    }
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) if !transient(&status) => {
                    return Err(StoreError::Backend(format!(
                        "etcd {what} at {}: {}: {}",
                        self.list[idx].0,
                        status.code(),
                        status.message()
                    )));
                }
                Ok(Err(status)) => format!(
                    "{}: {}: {}",
                    self.list[idx].0,
                    status.code(),
                    status.message()
                ),
                Err(_) => format!("{}: no answer in {:?}", self.list[idx].0, self.timeout),
            };
            errors.push(err);
            if !idempotent {
                self.current.store((idx + 1) % n, Ordering::Relaxed);
                break;
            }
        }
        Err(StoreError::Backend(format!(
            "etcd {what}: no member answered ({})",
            errors.join("; ")
        )))
    }
}

/// Errors after which another member may answer (the member is down, partitioned, has no
/// leader, or is shutting down).
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

/// The smallest key greater than every key starting with `prefix` (etcd's `range_end`);
/// `[0]` means "to the end of the keyspace".
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last == 0xff {
            end.pop();
        } else {
            if let Some(b) = end.last_mut() {
                *b += 1;
            }
            return end;
        }
    }
    vec![0]
}

/// The compare that holds when `c` does: absent is "version 0" (etcd fails a value compare on
/// a missing key, so `Some(b"")` and absent stay distinct).
fn compare(key: Vec<u8>, expected: Option<&[u8]>) -> Compare {
    match expected {
        None => Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Version as i32,
            key,
            range_end: Vec::new(),
            target_union: Some(compare::TargetUnion::Version(0)),
        },
        Some(v) => Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Value as i32,
            key,
            range_end: Vec::new(),
            target_union: Some(compare::TargetUnion::Value(v.to_vec())),
        },
    }
}

fn range_one(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

impl EtcdStore {
    /// Connects: reads the cluster's current revision (so a cluster that cannot be reached is
    /// an error here, not later) and starts the watch that feeds [`Store::watch`].
    pub async fn open(opts: EtcdOptions) -> Result<Self, StoreError> {
        if opts.members.is_empty() {
            return Err(StoreError::Open {
                path: "etcd".into(),
                reason: "no endpoints configured".into(),
            });
        }
        let names = opts
            .members
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let members = Arc::new(Members {
            list: opts.members,
            current: AtomicUsize::new(0),
            timeout: opts.request_timeout,
        });
        let range = RangeRequest {
            key: key_or_zero(&opts.prefix),
            range_end: prefix_end(&opts.prefix),
            count_only: true,
            ..Default::default()
        };
        let resp = members
            .call("open", true, |mut kv| {
                let r = range.clone();
                async move { kv.range(r).await }
            })
            .await
            .map_err(|e| StoreError::Open {
                path: format!("etcd {names}"),
                reason: e.to_string(),
            })?;
        let revision = resp.header.map_or(0, |h| h.revision);
        let shared = Arc::new(watch::Shared::new(revision));
        let watcher = tokio::spawn(watch::run(
            shared.clone(),
            members.clone(),
            opts.prefix.clone(),
            revision + 1,
        ));
        Ok(Self {
            members,
            prefix: opts.prefix,
            limits: opts.limits,
            lease_ttl: opts.lease_ttl,
            shared,
            watcher,
        })
    }

    /// Whether the watch that follows other writers is connected (readiness).
    pub fn watching(&self) -> bool {
        self.shared.connected()
    }

    /// How many times the watch resumed past a compaction and woke every watcher to re-read
    /// (changes it had not delivered were gone from etcd's history).
    pub fn watch_rereads(&self) -> u64 {
        self.shared.rereads()
    }

    fn full(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        k
    }

    /// Checks a request against the cluster's limits before sending it.
    fn fits(&self, conditions: usize, ops: usize, txn: &TxnRequest) -> Result<(), StoreError> {
        let most = conditions.max(ops);
        if most > self.limits.max_ops {
            return Err(StoreError::TooLarge(format!(
                "a batch of {ops} writes and {conditions} conditions exceeds etcd's {} operations per transaction",
                self.limits.max_ops
            )));
        }
        let bytes = txn.encoded_len();
        if bytes > self.limits.max_bytes {
            return Err(StoreError::TooLarge(format!(
                "a batch of {bytes} bytes exceeds etcd's request limit of {} bytes",
                self.limits.max_bytes
            )));
        }
        Ok(())
    }

    async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, StoreError> {
        self.members
            .call("txn", false, |mut kv| {
                let t = txn.clone();
                async move { kv.txn(t).await }
            })
            .await
    }

    /// Sends a conditional write and reports which condition failed, if one did: the failure
    /// branch reads every condition's key in the same revision the compares saw.
    async fn conditional(
        &self,
        conditions: &[Condition],
        ops: Vec<RequestOp>,
        touched: Vec<&[u8]>,
    ) -> Result<(), StoreError> {
        let txn = TxnRequest {
            compare: conditions
                .iter()
                .map(|c| compare(self.full(&c.key), c.expected.as_deref()))
                .collect(),
            failure: conditions
                .iter()
                .map(|c| range_one(self.full(&c.key)))
                .collect(),
            success: ops,
        };
        self.fits(conditions.len(), txn.success.len(), &txn)?;
        let resp = self.txn(txn).await?;
        if !resp.succeeded {
            for (c, r) in conditions.iter().zip(&resp.responses) {
                let now = match &r.response {
                    Some(response_op::Response::ResponseRange(rr)) => {
                        rr.kvs.first().map(|kv| kv.value.as_slice())
                    }
                    _ => None,
                };
                if now != c.expected.as_deref() {
                    return Err(crate::conflict(&c.key));
                }
            }
            // Every key matched when read: the compare failed on state the reads no longer see
            // (impossible within one revision), so name the first condition.
            let key = conditions.first().map_or(&[][..], |c| c.key.as_slice());
            return Err(crate::conflict(key));
        }
        let revision = resp.header.map_or(0, |h| h.revision);
        self.shared.committed(revision, touched.into_iter());
        Ok(())
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// etcd refuses an empty key; the empty prefix ranges from `\0`.
fn key_or_zero(k: &[u8]) -> Vec<u8> {
    if k.is_empty() { vec![0] } else { k.to_vec() }
}

fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(rpc::PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            rpc::DeleteRangeRequest {
                key,
                ..Default::default()
            },
        )),
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let req = RangeRequest {
            key: self.full(key),
            ..Default::default()
        };
        let resp = self
            .members
            .call("get", true, |mut kv| {
                let r = req.clone();
                async move { kv.range(r).await }
            })
            .await?;
        Ok(resp.kvs.into_iter().next().map(|kv| kv.value))
    }

    async fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new()); // etcd reads limit 0 as "no limit"
        }
        let lo = key_or_zero(&self.full(prefix));
        let end = prefix_end(&self.full(prefix));
        let start = match after {
            Some(a) => {
                let mut k = self.full(a);
                k.push(0); // strictly after
                k.max(lo)
            }
            None => lo,
        };
        if end != [0] && start >= end {
            return Ok(Vec::new());
        }
        let req = RangeRequest {
            key: start,
            range_end: end,
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let resp = self
            .members
            .call("scan", true, |mut kv| {
                let r = req.clone();
                async move { kv.range(r).await }
            })
            .await?;
        let n = self.prefix.len();
        Ok(resp
            .kvs
            .into_iter()
            .map(|kv| {
                let mut key = kv.key;
                key.drain(..n.min(key.len()));
                (key, kv.value)
            })
            .collect())
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let op = match new {
            Some(v) => put(self.full(key), v.to_vec()),
            None => delete(self.full(key)),
        };
        let cond = [Condition {
            key: key.to_vec(),
            expected: expected.map(<[u8]>::to_vec),
        }];
        self.conditional(&cond, vec![op], vec![key]).await
    }

    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        // etcd refuses a key twice in one transaction: the last write of each key is the one
        // that counts (the trait's "later ops win").
        let mut last: HashMap<&[u8], usize> = HashMap::new();
        for (i, op) in batch.ops.iter().enumerate() {
            let (Op::Put(k, _) | Op::Delete(k)) = op;
            last.insert(k.as_slice(), i);
        }
        let mut ops = Vec::with_capacity(last.len());
        let mut touched = Vec::with_capacity(last.len());
        for (i, op) in batch.ops.iter().enumerate() {
            let (Op::Put(k, _) | Op::Delete(k)) = op;
            if last.get(k.as_slice()) != Some(&i) {
                continue;
            }
            touched.push(k.as_slice());
            ops.push(match op {
                Op::Put(k, v) => put(self.full(k), v.clone()),
                Op::Delete(k) => delete(self.full(k)),
            });
        }
        if ops.is_empty() && batch.conditions.is_empty() {
            return Ok(());
        }
        self.conditional(&batch.conditions, ops, touched).await
    }

    fn watch(&self, prefix: &[u8]) -> Watch {
        self.shared.notifier.subscribe(prefix)
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn elect(&self, name: &str, candidate: &str) -> crate::Leadership {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let (resign_tx, resign_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(lease::campaign(
            lease::Candidacy {
                members: self.members.clone(),
                shared: self.shared.clone(),
                prefix: self.prefix.clone(),
                name: name.to_owned(),
                candidate: candidate.to_owned(),
                ttl: self.lease_ttl,
            },
            tx,
            resign_rx,
        ));
        crate::Leadership::campaigning(name, candidate, rx, resign_tx, task)
    }
}

#[cfg(test)]
mod tests;
