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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::SystemTime;

    use ward_proto::types;
    use ward_spiffe::{Bundle, TrustDomain};

    use super::*;
    use crate::cache::fixtures::svid;

    fn entry(id: &str, path: &str, selectors: &[&str], revision: u64) -> types::Entry {
        types::Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://td{path}"),
            selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
            revision,
            ..Default::default()
        }
    }

    fn bundle(sequence: u64) -> types::Bundle {
        let mut b = Bundle::new(TrustDomain::new("td").unwrap());
        b.x509_authorities = vec![format!("root-{sequence}").into_bytes()];
        b.sequence = sequence;
        ward_proto::convert::bundle_to_proto(&b)
    }

    /// The entries as (id, SPIFFE ID, revision), sorted.
    fn entries(s: &Snapshot) -> Vec<(String, String, u64)> {
        let mut v: Vec<_> = s
            .entries
            .values()
            .map(|e| (e.id.clone(), e.spiffe_id.to_string(), e.revision))
            .collect();
        v.sort();
        v
    }

    fn row(id: &str, spiffe_id: &str, revision: u64) -> (String, String, u64) {
        (id.into(), spiffe_id.into(), revision)
    }

    fn first() -> SyncUpdate {
        SyncUpdate {
            revision: 10,
            full: true,
            upserted: vec![
                entry("a", "/a", &["unix:uid:1"], 3),
                entry("b", "/b", &["unix:uid:2"], 7),
            ],
            bundle: Some(bundle(1)),
            ..Default::default()
        }
    }

    #[test]
    fn a_full_update_replaces_everything_and_marks_the_cache_synced() {
        let mut s = Snapshot::default();
        assert!(!s.synced);
        apply(&mut s, &first()).unwrap();
        assert!(s.synced);
        assert_eq!(s.revision, 10);
        assert_eq!(
            entries(&s),
            vec![row("a", "spiffe://td/a", 3), row("b", "spiffe://td/b", 7)]
        );
        let b = s.bundle.as_ref().unwrap();
        assert_eq!(b.sequence, 1);
        assert_eq!(b.x509_authorities, vec![b"root-1".to_vec()]);
        assert_eq!(
            s.entries["a"].selectors,
            crate::cache::fixtures::caller(&["unix:uid:1"])
        );
        // A later full update drops what it does not list.
        apply(
            &mut s,
            &SyncUpdate {
                revision: 20,
                full: true,
                upserted: vec![entry("c", "/c", &[], 20)],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(entries(&s), vec![row("c", "spiffe://td/c", 20)]);
        assert_eq!(s.revision, 20);
        // No bundle in the update: the one held stays.
        assert_eq!(s.bundle.as_ref().unwrap().sequence, 1);
    }

    #[test]
    fn an_incremental_update_adds_updates_and_deletes() {
        let mut s = Snapshot::default();
        apply(&mut s, &first()).unwrap();
        let u = SyncUpdate {
            revision: 11,
            full: false,
            upserted: vec![
                // b changed its SPIFFE ID.
                entry("b", "/b2", &["unix:uid:2"], 11),
                entry("c", "/c", &["unix:uid:3"], 11),
            ],
            removed: vec!["a".into(), "never-held".into()],
            ..Default::default()
        };
        apply(&mut s, &u).unwrap();
        assert_eq!(
            entries(&s),
            vec![
                row("b", "spiffe://td/b2", 11),
                row("c", "spiffe://td/c", 11)
            ]
        );
        assert_eq!(s.revision, 11);
        assert_eq!(s.bundle.as_ref().unwrap().sequence, 1);
        // An empty update still advances the revision the agent resumes from.
        apply(
            &mut s,
            &SyncUpdate {
                revision: 12,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.revision, 12);
        assert_eq!(entries(&s).len(), 2);
    }

    #[test]
    fn invalid_entries_are_ignored_and_the_rest_applied() {
        let mut s = Snapshot::default();
        let u = SyncUpdate {
            revision: 5,
            full: true,
            upserted: vec![
                entry("ok", "/ok", &["unix:uid:1"], 5),
                // No path: a trust domain, not a workload.
                entry("root", "", &[], 5),
                entry("badsel", "/x", &["no-colon"], 5),
            ],
            ..Default::default()
        };
        apply(&mut s, &u).unwrap();
        assert_eq!(entries(&s), vec![row("ok", "spiffe://td/ok", 5)]);
        assert_eq!(s.revision, 5);
    }

    #[test]
    fn a_bundle_brings_its_taints_and_an_invalid_bundle_is_an_error() {
        let mut s = Snapshot::default();
        apply(&mut s, &first()).unwrap();
        assert_eq!(*s.taints, crate::cache::Taints::default());
        apply(
            &mut s,
            &SyncUpdate {
                revision: 11,
                bundle: Some(bundle(2)),
                tainted_x509_keys: vec![b"old-key".to_vec()],
                tainted_jwt_key_ids: vec!["old-kid".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.bundle.as_ref().unwrap().sequence, 2);
        assert_eq!(s.taints.x509_keys, vec![b"old-key".to_vec()]);
        assert_eq!(s.taints.jwt_key_ids, vec!["old-kid".to_owned()]);
        // Taints come with bundles only: an update without one keeps them...
        apply(
            &mut s,
            &SyncUpdate {
                revision: 12,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.taints.jwt_key_ids, vec!["old-kid".to_owned()]);
        // ...and the next bundle without taints clears them.
        apply(
            &mut s,
            &SyncUpdate {
                revision: 13,
                bundle: Some(bundle(3)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(*s.taints, crate::cache::Taints::default());

        let mut bad = bundle(4);
        bad.trust_domain = "Not A Domain".into();
        let e = apply(
            &mut s,
            &SyncUpdate {
                revision: 14,
                bundle: Some(bad),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.starts_with("bundle trust domain \"Not A Domain\""), "{e}");
        // Refused: neither the bundle nor the revision moved.
        assert_eq!(s.bundle.as_ref().unwrap().sequence, 3);
        assert_eq!(s.revision, 13);
    }

    #[test]
    fn removing_an_entry_through_the_cache_drops_its_svid() {
        let cache = Cache::new();
        cache.update(|s| apply(s, &first()).unwrap());
        cache.update(|s| {
            for id in ["a", "b"] {
                let e = s.entries[id].clone();
                s.svids
                    .insert(id.into(), svid(&e, vec![], SystemTime::UNIX_EPOCH));
            }
        });
        cache.update(|s| {
            apply(
                s,
                &SyncUpdate {
                    revision: 11,
                    removed: vec!["a".into()],
                    ..Default::default()
                },
            )
            .unwrap()
        });
        let snap = cache.snapshot();
        let mut held: Vec<_> = snap.svids.keys().cloned().collect();
        held.sort();
        assert_eq!(held, vec!["b".to_owned()]);
        assert_eq!(snap.revision, 11);
    }
}
