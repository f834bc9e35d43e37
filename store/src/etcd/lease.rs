//! Elections on etcd: `leader/<name>` created only if absent, bound to a lease this process
//! keeps alive (etcd's own recipe, as in its `concurrency` package).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, lease_client::LeaseClient, request_op,
};
use super::{Members, compare, range_one};
use crate::lease::leader_key;

/// One candidacy: who campaigns for what, where.
pub(super) struct Candidacy {
    pub(super) members: Arc<Members>,
    pub(super) shared: Arc<super::watch::Shared>,
    pub(super) prefix: Vec<u8>,
    pub(super) name: String,
    pub(super) candidate: String,
    pub(super) ttl: Duration,
}

/// Runs until resigned (or aborted when the [`Leadership`](crate::Leadership) drops),
/// reporting the standing on `tx`.
pub(super) async fn campaign(
    c: Candidacy,
    tx: watch::Sender<bool>,
    mut resign: watch::Receiver<bool>,
) {
    let Candidacy {
        members,
        shared,
        prefix,
        name,
        candidate,
        ttl,
    } = c;
    let mut key = prefix.clone();
    key.extend_from_slice(&leader_key(&name));
    let mut changes = shared.notifier.subscribe(&leader_key(&name));
    let mut member = 0usize;
    loop {
        let (_, channel) = members.list[member % members.list.len()].clone();
        let r = round(
            &channel,
            &key,
            &candidate,
            ttl,
            &tx,
            &mut changes,
            &mut resign,
        )
        .await;
        if *resign.borrow() {
            tx.send_replace(false);
            tracing::info!(election = %name, "leadership given up");
            return;
        }
        match r {
            Ok(()) => {}
            Err(reason) => {
                if tx.send_replace(false) {
                    tracing::warn!(election = %name, %reason, "leadership lost; stepping down");
                } else {
                    tracing::debug!(election = %name, %reason, "campaign round failed");
                }
                member += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One lease: campaign until elected, lead while the lease is renewed. Returns `Ok` when the
/// key was taken by someone else and the campaign should start over, `Err` on any failure.
async fn round(
    channel: &tonic::transport::Channel,
    key: &[u8],
    candidate: &str,
    ttl: Duration,
    tx: &watch::Sender<bool>,
    changes: &mut crate::Watch,
    resign: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let st = |s: tonic::Status| format!("{}: {}", s.code(), s.message());
    let mut leases = LeaseClient::new(channel.clone());
    let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(5);
    let grant = tokio::time::timeout(
        ttl,
        leases.lease_grant(LeaseGrantRequest { ttl: secs, id: 0 }),
    )
    .await
    .map_err(|_| "lease grant timed out".to_string())?
    .map_err(st)?
    .into_inner();
    if !grant.error.is_empty() {
        return Err(grant.error);
    }
    let lease = grant.id;
    let granted = Instant::now();
    // Keep the lease alive from now on, leader or not, so a win below is never on a lease
    // about to lapse.
    let (ka_tx, ka_rx) = tokio::sync::mpsc::channel(1);
    // etcd answers the call only with its first message: send one before awaiting it.
    ka_tx
        .send(LeaseKeepAliveRequest { id: lease })
        .await
        .map_err(|_| "keep-alive stream closed".to_string())?;
    let mut ka = leases
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(ka_rx))
        .await
        .map_err(st)?
        .into_inner();
    let mut renew = tokio::time::interval(ttl / 3);
    let mut last_renewed = granted;
    let mut kv = super::pb::etcdserverpb::kv_client::KvClient::new(channel.clone());
    let result: Result<(), String> = async {
        loop {
            // Take the key if nobody holds it.
            let txn = TxnRequest {
                compare: vec![compare(key.to_vec(), None)],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.to_vec(),
                        value: candidate.as_bytes().to_vec(),
                        lease,
                        ..Default::default()
                    })),
                }],
                failure: vec![range_one(key.to_vec())],
            };
            let won = tokio::time::timeout(ttl, kv.txn(txn))
                .await
                .map_err(|_| "campaign timed out".to_string())?
                .map_err(st)?
                .into_inner()
                .succeeded;
            if won {
                tx.send_replace(true);
                tracing::info!(key = %String::from_utf8_lossy(key), "leadership won");
            }
            // Lead, or wait for the key to go, while renewing the lease. A leader that has
            // not renewed within two thirds of the TTL steps down before the lease can lapse.
            let mut poll = tokio::time::interval(ttl);
            poll.tick().await;
            loop {
                let limit = if won { ttl * 2 / 3 } else { ttl };
                if last_renewed.elapsed() > limit {
                    return Err("lease not renewed in time".to_string());
                }
                tokio::select! {
                    () = async { let _ = resign.wait_for(|r| *r).await; } => {
                        return Err("resigned".to_string());
                    }
                    _ = renew.tick() => {
                        ka_tx
                            .send(LeaseKeepAliveRequest { id: lease })
                            .await
                            .map_err(|_| "keep-alive stream closed".to_string())?;
                    }
                    m = ka.message() => match m {
                        Ok(Some(r)) if r.ttl > 0 => last_renewed = Instant::now(),
                        Ok(Some(_)) => return Err("lease expired".to_string()),
                        Ok(None) => return Err("keep-alive stream ended".to_string()),
                        Err(s) => return Err(st(s)),
                    },
                    alive = changes.changed() => {
                        if !alive {
                            return Err("store closed".to_string());
                        }
                        let held = kv
                            .range(RangeRequest { key: key.to_vec(), ..Default::default() })
                            .await
                            .map_err(st)?
                            .into_inner();
                        let holder = held.kvs.first().map(|kv| kv.value.clone());
                        if won && holder.as_deref() != Some(candidate.as_bytes()) {
                            return Err("the leader key no longer names this process".to_string());
                        }
                        if !won && holder.is_none() {
                            break; // free: campaign again
                        }
                    }
                    // Poll too: a watch that is reconnecting must not keep a follower waiting.
                    _ = poll.tick(), if !won => break,
                }
            }
        }
    }
    .await;
    // Give the lease back at once (a successor need not wait for it to lapse).
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        leases.lease_revoke(LeaseRevokeRequest { id: lease }),
    )
    .await;
    result
}
