//! Keeps a fresh X.509-SVID for every entry the agent serves: generates keys locally, has them
//! signed in batches, and rotates each SVID at half-life with jitter. SVIDs are fetched as soon
//! as an entry arrives, so a workload's first call does not wait for the CA.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use rcgen::KeyPair;
use ward_proto::node::{BatchNewX509SvidRequest, NewX509SvidParams};
use ward_spiffe::Clock;
use zeroize::Zeroizing;

use crate::cache::{Cache, Snapshot, WorkloadSvid, rotation_time};
use crate::identity::{Identity, csr};
use crate::metrics::Metrics;

/// CSRs per batch request.
pub const BATCH: usize = 500;
/// Wait after a failed signing attempt for an entry.
const RETRY: Duration = Duration::from_secs(2);

/// What the manager must do for each entry at `now`: the IDs needing a (new) SVID, each with
/// the reason (`new`, `entry_changed`, `tainted`, `rotation`). Pure.
pub fn due(
    snap: &Snapshot,
    now: SystemTime,
    retry_after: &HashMap<String, SystemTime>,
) -> Vec<(String, &'static str)> {
    let mut ids: Vec<(String, &'static str)> = snap
        .entries
        .values()
        .filter(|e| retry_after.get(&e.id).is_none_or(|t| *t <= now))
        .filter_map(|e| {
            let reason = match snap.svids.get(&e.id) {
                None => "new",
                Some(s) if s.entry_revision != e.revision => "entry_changed",
                Some(s) if snap.taints.taints_chain(&s.chain) => "tainted",
                Some(s) if s.rotate_at <= now => "rotation",
                Some(_) => return None,
            };
            Some((e.id.clone(), reason))
        })
        .collect();
    ids.sort();
    ids
}

/// When the manager next has something to do (earliest rotation or retry), if ever.
fn next_wake(snap: &Snapshot, retry_after: &HashMap<String, SystemTime>) -> Option<SystemTime> {
    snap.svids
        .values()
        .map(|s| s.rotate_at)
        .chain(retry_after.values().copied())
        .min()
}

/// Runs the manager until the process ends.
pub async fn run(
    cache: Arc<Cache>,
    identity: Arc<Identity>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
) {
    let mut rx = cache.subscribe();
    let mut retry_after: HashMap<String, SystemTime> = HashMap::new();
    loop {
        let snap = rx.borrow_and_update().clone();
        let now = clock.now();
        retry_after.retain(|id, t| snap.entries.contains_key(id) && *t > now);
        let due = due(&snap, now, &retry_after);
        for (_, reason) in &due {
            metrics.reissued("workload", reason, 1);
        }
        let ids: Vec<String> = due.into_iter().map(|(id, _)| id).collect();
        for chunk in ids.chunks(BATCH) {
            sign(
                chunk,
                &snap,
                &cache,
                &identity,
                clock.as_ref(),
                &metrics,
                &mut retry_after,
            )
            .await;
        }
        if !ids.is_empty() {
            // The cache changed under us; look again before sleeping.
            continue;
        }
        let sleep = next_wake(&snap, &retry_after)
            .map(|t| t.duration_since(now).unwrap_or_default())
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

async fn sign(
    ids: &[String],
    snap: &Snapshot,
    cache: &Cache,
    identity: &Identity,
    clock: &dyn Clock,
    metrics: &Metrics,
    retry_after: &mut HashMap<String, SystemTime>,
) {
    let mut keys = HashMap::new();
    let mut params = Vec::with_capacity(ids.len());
    for id in ids {
        let Some(entry) = snap.entries.get(id) else {
            continue;
        };
        let key = match KeyPair::generate() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "key generation failed");
                return;
            }
        };
        let csr = match csr(&key, Some(&entry.spiffe_id)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "CSR generation failed");
                return;
            }
        };
        params.push(NewX509SvidParams {
            entry_id: id.clone(),
            csr,
        });
        keys.insert(id.clone(), (key, entry.revision, entry.spiffe_id.clone()));
    }
    let started = std::time::Instant::now();
    let resp = identity
        .node()
        .batch_new_x509_svid(BatchNewX509SvidRequest { params })
        .await;
    metrics
        .sign_seconds
        .observe(started.elapsed().as_secs_f64());
    let now = clock.now();
    let results = match resp {
        Ok(r) => r.into_inner().results,
        Err(e) => {
            tracing::warn!(error = %e, entries = ids.len(), "SVID signing request failed");
            for id in ids {
                retry_after.insert(id.clone(), now + RETRY);
            }
            return;
        }
    };
    let mut fresh = Vec::new();
    for r in results {
        let Some((key, revision, spiffe_id)) = keys.remove(&r.entry_id) else {
            continue;
        };
        let Some(svid) = r.svid.filter(|_| r.error_code == 0) else {
            tracing::warn!(entry = %r.entry_id, code = r.error_code, error = %r.error_message, "CA refused SVID");
            retry_after.insert(r.entry_id, now + RETRY);
            continue;
        };
        let info = match ward_spiffe::x509::check_leaf(
            svid.cert_chain
                .first()
                .map(Vec::as_slice)
                .unwrap_or_default(),
            ward_spiffe::x509::Profile::Peer,
        ) {
            Ok(i) if i.id == spiffe_id => i,
            Ok(i) => {
                tracing::error!(entry = %r.entry_id, got = %i.id, want = %spiffe_id, "CA issued the wrong ID");
                retry_after.insert(r.entry_id, now + RETRY);
                continue;
            }
            Err(e) => {
                tracing::error!(entry = %r.entry_id, error = %e, "CA issued an invalid SVID");
                retry_after.insert(r.entry_id, now + RETRY);
                continue;
            }
        };
        if snap.taints.taints_chain(&svid.cert_chain) {
            // Cannot happen with a CA that never taints its active authority; do not spin.
            tracing::error!(entry = %r.entry_id, "CA issued an SVID from a tainted authority");
            retry_after.insert(r.entry_id, now + RETRY);
            continue;
        }
        let jitter = rand::rng().random_range(-0.1..=0.1);
        fresh.push(WorkloadSvid {
            entry_id: r.entry_id,
            entry_revision: revision,
            spiffe_id,
            chain: svid.cert_chain,
            key: Arc::new(Zeroizing::new(key.serialize_der())),
            not_before: info.not_before,
            not_after: info.not_after,
            rotate_at: rotation_time(now, info.not_after, jitter),
        });
    }
    for (id, _) in keys {
        tracing::warn!(entry = %id, "CA answered nothing for entry");
        retry_after.insert(id, now + RETRY);
    }
    metrics.svids_signed.inc_by(fresh.len() as u64);
    cache.update(|s| {
        for svid in fresh {
            // Only install it if the entry is still there at the revision we asked for.
            if s.entries
                .get(&svid.entry_id)
                .is_some_and(|e| e.revision == svid.entry_revision)
            {
                s.svids.insert(svid.entry_id.clone(), Arc::new(svid));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use ward_testing::Pki;

    use super::*;
    use crate::cache::Taints;
    use crate::cache::fixtures::{entry, svid};

    const T0: Duration = Duration::from_secs(1_700_000_000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    fn pair(id: &str, reason: &'static str) -> (String, &'static str) {
        (id.to_owned(), reason)
    }

    /// A snapshot with one entry for each reason, one that is fresh, and the tainted key.
    fn mixed() -> Snapshot {
        let good = Pki::new("td");
        let bad = Pki::new("td");
        let mut s = Snapshot::default();
        let new = entry("a-new", &[], 1);
        s.entries.insert(new.id.clone(), new);
        // Issued for revision 1; the entry is at 2 now.
        let changed_old = entry("b-changed", &[], 1);
        let changed = entry("b-changed", &[], 2);
        s.svids.insert(
            changed.id.clone(),
            svid(&changed_old, good.svid("/b").chain_der, at(1000)),
        );
        s.entries.insert(changed.id.clone(), changed);
        let tainted = entry("c-tainted", &[], 1);
        s.svids.insert(
            tainted.id.clone(),
            svid(&tainted, bad.svid("/c").chain_der, at(1000)),
        );
        s.entries.insert(tainted.id.clone(), tainted);
        let old = entry("d-rotation", &[], 1);
        s.svids.insert(
            old.id.clone(),
            svid(&old, good.svid("/d").chain_der, at(100)),
        );
        s.entries.insert(old.id.clone(), old);
        let fresh = entry("e-fresh", &[], 1);
        s.svids.insert(
            fresh.id.clone(),
            svid(&fresh, good.svid("/e").chain_der, at(1000)),
        );
        s.entries.insert(fresh.id.clone(), fresh);
        s.taints = Arc::new(Taints {
            x509_keys: vec![ward_spiffe::x509::spki_der(bad.root_der()).unwrap()],
            jwt_key_ids: vec![],
        });
        s
    }

    #[test]
    fn each_reason_is_reported_and_fresh_svids_are_left_alone() {
        let s = mixed();
        assert_eq!(
            due(&s, at(100), &HashMap::new()),
            vec![
                pair("a-new", "new"),
                pair("b-changed", "entry_changed"),
                pair("c-tainted", "tainted"),
                pair("d-rotation", "rotation"),
            ]
        );
        // Just before its rotation time the SVID is not due yet.
        assert_eq!(
            due(&s, at(99), &HashMap::new()),
            vec![
                pair("a-new", "new"),
                pair("b-changed", "entry_changed"),
                pair("c-tainted", "tainted"),
            ]
        );
        // Without taints, the SVID of the formerly tainted authority is fresh.
        let mut clean = s.clone();
        clean.taints = Arc::default();
        assert_eq!(
            due(&clean, at(99), &HashMap::new()),
            vec![pair("a-new", "new"), pair("b-changed", "entry_changed")]
        );
    }

    #[test]
    fn nothing_is_due_when_every_svid_is_fresh() {
        let mut s = Snapshot::default();
        assert!(due(&s, at(0), &HashMap::new()).is_empty());
        for id in ["x", "y"] {
            let e = entry(id, &[], 3);
            s.svids.insert(e.id.clone(), svid(&e, vec![], at(500)));
            s.entries.insert(e.id.clone(), e);
        }
        assert!(due(&s, at(499), &HashMap::new()).is_empty());
        assert_eq!(
            due(&s, at(500), &HashMap::new()),
            vec![pair("x", "rotation"), pair("y", "rotation")]
        );
    }

    #[test]
    fn the_first_matching_reason_wins() {
        let tainter = Pki::new("td");
        let mut s = Snapshot {
            taints: Arc::new(Taints {
                x509_keys: vec![ward_spiffe::x509::spki_der(tainter.root_der()).unwrap()],
                jwt_key_ids: vec![],
            }),
            ..Default::default()
        };
        // Old revision, tainted and past rotation: the entry change is what is reported.
        let old = entry("e", &[], 1);
        let now = entry("e", &[], 2);
        s.svids
            .insert("e".into(), svid(&old, tainter.svid("/e").chain_der, at(0)));
        s.entries.insert("e".into(), now);
        assert_eq!(
            due(&s, at(10), &HashMap::new()),
            vec![pair("e", "entry_changed")]
        );
        // Same revision, tainted and past rotation: tainted.
        let cur = entry("e", &[], 2);
        s.svids
            .insert("e".into(), svid(&cur, tainter.svid("/e").chain_der, at(0)));
        assert_eq!(due(&s, at(10), &HashMap::new()), vec![pair("e", "tainted")]);
    }

    #[test]
    fn retry_after_suppresses_an_entry_until_its_time() {
        let s = mixed();
        let retry = HashMap::from([
            ("a-new".to_owned(), at(150)),
            ("d-rotation".to_owned(), at(120)),
            // An entry the snapshot does not hold changes nothing.
            ("zz-gone".to_owned(), at(10_000)),
        ]);
        assert_eq!(
            due(&s, at(100), &retry),
            vec![
                pair("b-changed", "entry_changed"),
                pair("c-tainted", "tainted")
            ]
        );
        assert_eq!(
            due(&s, at(120), &retry),
            vec![
                pair("b-changed", "entry_changed"),
                pair("c-tainted", "tainted"),
                pair("d-rotation", "rotation"),
            ]
        );
        assert_eq!(due(&s, at(150), &retry), due(&s, at(150), &HashMap::new()));
    }

    #[test]
    fn output_is_sorted_by_entry_id() {
        let mut s = Snapshot::default();
        // Enough entries that a hash map's order is never sorted by chance.
        for i in (0..64).rev() {
            let e = entry(&format!("e{i:02}"), &[], 1);
            s.entries.insert(e.id.clone(), e);
        }
        let got = due(&s, at(0), &HashMap::new());
        let want: Vec<_> = (0..64).map(|i| pair(&format!("e{i:02}"), "new")).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn next_wake_is_the_earliest_rotation_or_retry() {
        let mut s = Snapshot::default();
        assert_eq!(next_wake(&s, &HashMap::new()), None);
        for (id, t) in [("a", 300), ("b", 200), ("c", 400)] {
            let e = entry(id, &[], 1);
            s.svids.insert(e.id.clone(), svid(&e, vec![], at(t)));
            s.entries.insert(e.id.clone(), e);
        }
        assert_eq!(next_wake(&s, &HashMap::new()), Some(at(200)));
        let later = HashMap::from([("a".to_owned(), at(250))]);
        assert_eq!(next_wake(&s, &later), Some(at(200)));
        let sooner = HashMap::from([("a".to_owned(), at(150))]);
        assert_eq!(next_wake(&s, &sooner), Some(at(150)));
        // Only retries pending (no SVID yet): the retry time.
        assert_eq!(next_wake(&Snapshot::default(), &sooner), Some(at(150)));
    }
}
