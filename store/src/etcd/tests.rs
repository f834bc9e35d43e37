#![allow(clippy::unwrap_used)]

use std::time::Duration;

use super::pb::etcdserverpb::CompactionRequest;
use super::*;
use ward_testing::etcd::Etcd;

async fn open(endpoints: &[String], prefix: &[u8]) -> EtcdStore {
    EtcdStore::open(EtcdOptions::plaintext(endpoints, prefix).unwrap())
        .await
        .unwrap()
}

async fn woke(w: &mut Watch, within: Duration) -> bool {
    tokio::time::timeout(within, w.changed()).await.is_ok()
}

#[test]
fn prefix_end_is_the_first_key_after_the_prefix() {
    assert_eq!(prefix_end(b"/ward/"), b"/ward0".to_vec());
    assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    assert_eq!(prefix_end(b""), vec![0]);
}

/// The point of a shared store: a write by one replica wakes the other's watchers, and
/// neither sees keys outside its prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_write_wakes_watchers_and_prefixes_isolate() {
    let etcd = Etcd::start();
    let a = open(&etcd.endpoints(), b"/ward/").await;
    let b = open(&etcd.endpoints(), b"/ward/").await;
    let other = open(&etcd.endpoints(), b"/other/").await;
    let mut wa = a.watch(b"entry/");
    let mut wo = other.watch(b"");
    b.compare_and_swap(b"entry/1", None, Some(b"x"))
        .await
        .unwrap();
    assert!(
        woke(&mut wa, Duration::from_secs(5)).await,
        "no wake for another writer"
    );
    assert_eq!(a.get(b"entry/1").await.unwrap(), Some(b"x".to_vec()));
    assert!(
        !woke(&mut wo, Duration::from_millis(300)).await,
        "woke outside its prefix"
    );
    assert!(other.get(b"entry/1").await.unwrap().is_none());
    assert!(other.scan(b"", None, 10).await.unwrap().is_empty());
    // A condition that fails on another replica's value names the key.
    match a.compare_and_swap(b"entry/1", None, Some(b"y")).await {
        Err(StoreError::Conflict { key }) => assert_eq!(key, "entry/1"),
        r => panic!("{r:?}"),
    }
}

/// A cluster that cannot be reached is an error at open that says where, and a store whose
/// cluster went away answers with an error, not a hang, and recovers when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cluster_fails_closed_and_recovers() {
    let dead = vec!["http://127.0.0.1:9".to_string()];
    let mut opts = EtcdOptions::plaintext(&dead, b"/w/").unwrap();
    opts.request_timeout = Duration::from_millis(500);
    let e = EtcdStore::open(opts).await.unwrap_err().to_string();
    assert!(e.contains("127.0.0.1:9"), "{e}");

    let mut etcd = Etcd::start();
    let mut opts = EtcdOptions::plaintext(&etcd.endpoints(), b"/w/").unwrap();
    opts.request_timeout = Duration::from_millis(500);
    let s = EtcdStore::open(opts).await.unwrap();
    s.compare_and_swap(b"k", None, Some(b"1")).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !s.watching() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watch never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    etcd.kill(0);
    let e = s
        .compare_and_swap(b"k", Some(b"1"), Some(b"2"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Backend(_)), "{e:?}");
    assert!(s.get(b"k").await.is_err());
    etcd.restart(0);
    etcd.wait_healthy(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match s.get(b"k").await {
            Ok(v) => {
                assert_eq!(
                    v,
                    Some(b"1".to_vec()),
                    "the refused write must not have happened"
                );
                break;
            }
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    }
}

/// With three members, losing the one a replica talks to costs nothing: reads, writes and
/// the watch move to another member, and the watch resumes where it stopped (a write made
/// while it was reconnecting still wakes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_is_skipped_and_the_watch_resumes() {
    let mut etcd = Etcd::cluster(3);
    let eps = etcd.endpoints();
    let a = open(&eps, b"/ward/").await;
    let b = open(&[eps[2].clone(), eps[1].clone()], b"/ward/").await;
    let mut w = a.watch(b"k/");
    a.compare_and_swap(b"k/0", None, Some(b"0")).await.unwrap();
    assert!(woke(&mut w, Duration::from_secs(2)).await);
    etcd.kill(0); // a's current member and its watch's
    // While the survivors elect a new raft leader a write may time out; it is retried (a
    // timed-out write may have been applied: then the retry's conflict is its success).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for i in 1..20u32 {
        let key = format!("k/{i}");
        let mut tried = false;
        loop {
            match b.compare_and_swap(key.as_bytes(), None, Some(b"v")).await {
                Ok(()) => break,
                Err(StoreError::Conflict { .. }) if tried => break,
                Err(StoreError::Backend(e)) if tokio::time::Instant::now() < deadline => {
                    tried = true;
                    eprintln!("retrying {key}: {e}");
                }
                Err(e) => panic!("{key}: {e}"),
            }
        }
    }
    assert!(
        woke(&mut w, Duration::from_secs(10)).await,
        "the watch did not resume"
    );
    // Reads fail over at once; a write may fail once (it is not retried: it may have been
    // applied) and then goes to the next member.
    assert_eq!(a.scan(b"k/", None, 100).await.unwrap().len(), 20);
    let mut ok = false;
    for _ in 0..3 {
        if a.compare_and_swap(b"k/x", None, Some(b"1")).await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "writes did not move to a live member");
}

/// A watch that resumes at a revision etcd has compacted away may have missed changes:
/// every watcher is woken (callers re-read) and the watch restarts at the oldest revision
/// etcd still has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_watch_wakes_every_watcher() {
    let etcd = Etcd::start();
    let s = open(&etcd.endpoints(), b"/ward/").await;
    for i in 0..5u32 {
        s.compare_and_swap(format!("a/{i}").as_bytes(), None, Some(b"v"))
            .await
            .unwrap();
    }
    let head = {
        let mut kv = s.members.kv(0);
        let r = kv
            .range(RangeRequest {
                key: b"/".to_vec(),
                count_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        r.header.unwrap().revision
    };
    s.members
        .kv(0)
        .compact(CompactionRequest {
            revision: head,
            physical: true,
        })
        .await
        .unwrap();
    let shared = std::sync::Arc::new(watch::Shared::new(1));
    let mut unrelated = shared.notifier.subscribe(b"nothing-written-here/");
    let mut next = 2; // long compacted
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        watch::follow(&shared, s.members.list[0].1.clone(), b"/ward/", &mut next),
    )
    .await
    .unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(next, head, "restarts at the oldest revision etcd kept");
    assert!(woke(&mut unrelated, Duration::from_millis(100)).await);
}

async fn until_leader(l: &crate::Leadership, within: Duration) -> bool {
    let mut rx = l.subscribe();
    tokio::time::timeout(within, rx.wait_for(|v| *v))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// One leader at a time; only the leader's fence holds; when the leader dies without a word
/// (its campaign aborted, its lease left to lapse) the other candidate leads within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_fenced_and_replaced_when_it_dies() {
    let etcd = Etcd::cluster(3);
    let mut oa = EtcdOptions::plaintext(&etcd.endpoints(), b"/ward/").unwrap();
    oa.lease_ttl = Duration::from_secs(2);
    let mut ob = oa.clone();
    ob.members.reverse();
    let a = EtcdStore::open(oa).await.unwrap();
    let b = EtcdStore::open(ob).await.unwrap();
    let la = a.elect("singleton", "a");
    let lb = b.elect("singleton", "b");
    assert!(
        until_leader(&la, Duration::from_secs(5)).await
            || until_leader(&lb, Duration::from_secs(5)).await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(la.is_leader() != lb.is_leader(), "two leaders or none");
    let (leader, follower, lf, ff) = if la.is_leader() {
        (&a, &b, la, lb)
    } else {
        (&b, &a, lb, la)
    };
    let fenced = |f: &crate::Leadership| {
        let mut batch = Batch::new();
        batch.conditions.push(f.fence());
        batch.put(b"singleton/out".to_vec(), b"x".to_vec());
        batch
    };
    leader.commit(fenced(&lf)).await.unwrap();
    assert!(matches!(
        follower.commit(fenced(&ff)).await,
        Err(StoreError::Conflict { .. })
    ));
    let started = std::time::Instant::now();
    drop(lf);
    assert!(
        until_leader(&ff, Duration::from_secs(10)).await,
        "no takeover"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "takeover took {took:?}");
    follower.commit(fenced(&ff)).await.unwrap();
}

/// An embedded store's only process leads at once.
#[tokio::test]
async fn an_embedded_store_leads_alone() {
    let s = crate::MemStore::new();
    let l = s.elect("x", "me");
    assert!(l.is_leader());
    let mut b = Batch::new();
    b.conditions.push(l.fence());
    b.put(b"k".to_vec(), b"v".to_vec());
    s.commit(b).await.unwrap();
}

/// `Limits::admits` errs on the large side: a batch filled until it says no more is one etcd
/// takes, for small writes (the operations limit) and large ones (the bytes limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_filled_to_what_limits_admit_commits() {
    let etcd = Etcd::start();
    let s = open(&etcd.endpoints(), b"/a-rather-long-prefix/for/ward/").await;
    let limits = s.limits();
    for (round, size) in [10usize, 2_000, 60_000, 400_000].into_iter().enumerate() {
        let mut b = Batch::new();
        for i in 0.. {
            let key = format!("k/{round}/{i:05}").into_bytes();
            let mut next = b.clone();
            next.require(key.clone(), None).put(key, vec![b'v'; size]);
            if !limits.admits(&next) {
                break;
            }
            b = next;
        }
        assert!(!b.is_empty(), "nothing fits at {size} bytes per value");
        let n = b.ops.len();
        s.commit(b)
            .await
            .unwrap_or_else(|e| panic!("{n} writes of {size} bytes admitted but refused: {e}"));
    }
}
