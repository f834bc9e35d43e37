//! Follows the CA's sync stream: applies full and incremental entry updates and bundle changes
//! to the cache, resumes from the last applied revision after a reconnect, and reconnects when
//! the agent SVID (and so the channel) changes.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use ward_proto::node::{SyncRequest, SyncUpdate};

use crate::cache::{Cache, CachedEntry, Snapshot};
use crate::identity::Identity;
use crate::metrics::Metrics;

/// Applies one update to a snapshot. Pure.
pub fn apply(s: &mut Snapshot, u: &SyncUpdate) -> Result<(), String> {
    if u.full {
        s.entries.clear();
    }
    for e in &u.upserted {
        match CachedEntry::from_proto(e) {
            Some(c) => {
                s.entries.insert(c.id.clone(), Arc::new(c));
            }
            None => tracing::error!(entry = %e.id, "CA sent an invalid entry; ignored"),
        }
    }
    for id in &u.removed {
        s.entries.remove(id);
    }
    if let Some(b) = &u.bundle {
        let bundle = ward_proto::convert::bundle_from_proto(b)?;
        s.bundle = Some(Arc::new(bundle));
        s.taints = Arc::new(crate::cache::Taints {
            x509_keys: u.tainted_x509_keys.clone(),
            jwt_key_ids: u.tainted_jwt_key_ids.clone(),
        });
    }
    if u.policies_changed {
        // The CA only stores sets that compile; a set that does not is refused whole.
        let parsed = u
            .policies
            .iter()
            .map(ward_proto::convert::policy_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .and_then(|p| ward_spiffe::policy::PolicySet::compile(p).map_err(|e| e.to_string()));
        match parsed {
            Ok(set) => s.policies = Arc::new(set),
            Err(e) => {
                tracing::error!(error = %e, "policies from the CA refused; keeping the previous set")
            }
        }
    }
    if u.egress_changed
        && let Some(m) = &u.egress
    {
        // The CA only stores configurations that compile; one that does not is refused.
        let checked = ward_proto::convert::egress_from_proto(m)
            .and_then(|d| ward_spiffe::egress::EgressSet::compile(d).map_err(|e| e.to_string()));
        match checked {
            Ok(_) => s.egress = Some(Arc::new(m.clone())),
            Err(e) => tracing::error!(error = %e,
                "egress configuration from the CA refused; keeping the previous one"),
        }
    }
    if u.services_full || !u.services_upserted.is_empty() || !u.services_removed.is_empty() {
        let mut upserted = Vec::with_capacity(u.services_upserted.len());
        for m in &u.services_upserted {
            match ward_proto::convert::service_from_proto(m) {
                Ok(svc) => upserted.push(svc),
                Err(e) => tracing::error!(error = %e, "CA sent an invalid service; ignored"),
            }
        }
        Arc::make_mut(&mut s.services).apply(u.services_full, upserted, &u.services_removed);
    }
    s.revision = u.revision;
    s.synced = true;
    Ok(())
}

/// Runs the sync loop until the process ends.
pub async fn run(cache: Arc<Cache>, identity: Arc<Identity>, metrics: Metrics) {
    let mut backoff = Duration::from_millis(200);
    let mut generation = identity.generation();
    loop {
        generation.borrow_and_update();
        let since = cache.snapshot().revision;
        let result = tokio::select! {
            r = follow(&cache, &identity, &metrics, since) => r,
            _ = generation.changed() => {
                tracing::debug!("agent SVID changed; reconnecting sync stream");
                continue;
            }
        };
        metrics.sync_connected.set(0);
        let (received, result) = result;
        if received {
            // The stream worked before it broke: start over with a short wait.
            backoff = Duration::from_millis(200);
        }
        match result {
            Ok(()) => tracing::info!("sync stream ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "sync stream failed"),
        }
        let jitter = rand::rng().random_range(0.8..1.2);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Follows one stream; returns whether any update arrived, and how the stream ended.
async fn follow(
    cache: &Cache,
    identity: &Identity,
    metrics: &Metrics,
    since: u64,
) -> (bool, Result<(), String>) {
    let mut received = false;
    let r = follow_inner(cache, identity, metrics, since, &mut received).await;
    (received, r)
}

async fn follow_inner(
    cache: &Cache,
    identity: &Identity,
    metrics: &Metrics,
    since: u64,
    received: &mut bool,
) -> Result<(), String> {
    let mut stream = identity
        .node()
        .sync(SyncRequest {
            since_revision: since,
        })
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    metrics.sync_connected.set(1);
    while let Some(u) = stream
        .message()
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
    {
        *received = true;
        let mut bundle_changed = None;
        let mut err = None;
        cache.update(|s| {
            let before = s.bundle.as_ref().map(|b| b.sequence);
            if let Err(e) = apply(s, &u) {
                err = Some(e);
            }
            if s.bundle.as_ref().map(|b| b.sequence) != before {
                bundle_changed = s.bundle.clone();
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        if let Some(b) = bundle_changed {
            if let Err(e) = identity.set_bundle((*b).clone()) {
                tracing::error!(error = %e, "bundle update refused");
            }
            identity.set_taints(cache.snapshot().taints.clone());
        }
        metrics.entries.set(cache.snapshot().entries.len() as i64);
        metrics.sync_updates.inc();
        metrics
            .sync_bytes
            .inc_by(prost::Message::encoded_len(&u) as u64);
    }
    Ok(())
}
