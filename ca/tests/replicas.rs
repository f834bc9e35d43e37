//! Several `ward-ca` replicas on one 3-member etcd cluster (Debian's etcd-server): each signs
//! with its own authority (its key never leaves its data directory) and the bundle every
//! replica publishes is the union; an agent attested at one replica is served by another;
//! a join token is consumed once when two replicas race for it; an operator's revoke on one
//! replica reaches the other's signer at once; one replica leads the singleton work, and
//! another takes over when it stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;
use ward_ca::CaServer;
use ward_ca::authority::{AuthorityState, Kind, Op};
use ward_ca::config::{EtcdConfig, StoreBackend};
use ward_testing::etcd::Etcd;

async fn replica(etcd: &Etcd, dir: &std::path::Path, name: &str) -> CaServer {
    let mut cfg = common::ca_config(&dir.join(name), "ha.test");
    cfg.store.backend = StoreBackend::Etcd;
    let mut e = EtcdConfig::new(etcd.endpoints());
    e.prefix = "/ha/".into();
    cfg.store.etcd = Some(e);
    common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await
}

async fn eventually<F: Fn() -> bool>(what: &str, f: F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what} within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn active_holders(ca: &CaServer) -> Vec<String> {
    let mut h: Vec<String> = ca
        .core
        .authorities
        .current()
        .authorities
        .iter()
        .filter(|(k, v)| *k == Kind::X509 && v.state == AuthorityState::Active)
        .map(|(_, v)| v.holder.clone())
        .collect();
    h.sort();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sign_with_their_own_authorities_and_share_everything_else() {
    let etcd = Etcd::cluster(3);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tokio::join!(
        replica(&etcd, dir.path(), "a"),
        replica(&etcd, dir.path(), "b")
    );
    let (ha, hb) = (
        a.core.authorities.holder().to_owned(),
        b.core.authorities.holder().to_owned(),
    );
    assert_ne!(ha, hb);

    // One active X.509 authority per replica, both in one bundle both replicas publish.
    let mut both = vec![ha.clone(), hb.clone()];
    both.sort();
    eventually("both replicas see both active authorities", || {
        active_holders(&a) == both && active_holders(&b) == both
    })
    .await;
    eventually("one bundle with both roots", || {
        let (ba, bb) = (a.core.bundle(), b.core.bundle());
        ba.x509_authorities.len() == 2
            && ba.x509_authorities == bb.x509_authorities
            && ba.sequence == bb.sequence
            && ba.jwt_authorities.len() == 2
    })
    .await;
    assert_ne!(
        a.core.authorities.current().x509.id,
        b.core.authorities.current().x509.id,
        "two replicas sign with one authority"
    );
    // Neither replica's key is anywhere but its own data directory.
    let a_id = a.core.authorities.current().x509.id.clone();
    assert!(
        dir.path()
            .join("a/keys")
            .join(format!("{a_id}.key"))
            .exists()
    );
    assert!(
        !dir.path()
            .join("b/keys")
            .join(format!("{a_id}.key"))
            .exists()
    );

    // A token made at A, raced at A and B: consumed once.
    let (token, _) = a
        .core
        .agents
        .create_join_token(Duration::from_secs(600), a.core.clock.now())
        .await
        .unwrap();
    let attest = |ca: &CaServer, token: String| {
        let mut c = common::node_client(ca, None);
        let (key, csr) = common::key_and_csr(None);
        async move {
            c.attest(ward_proto::node::AttestRequest {
                method: Some(ward_proto::node::attest_request::Method::JoinToken(
                    ward_proto::node::JoinTokenAttestation { token },
                )),
                csr,
            })
            .await
            .map(|r| (r.into_inner(), key))
        }
    };
    let (ra, rb) = tokio::join!(attest(&a, token.clone()), attest(&b, token.clone()));
    let wins = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "a join token attested twice: {ra:?} / {rb:?}");
    let lost = if ra.is_ok() { &rb } else { &ra };
    assert_eq!(lost.as_ref().unwrap_err().code(), Code::PermissionDenied);
    let (resp, key) = if let Ok(r) = ra { r } else { rb.unwrap() };
    let svid =
        ward_net::Svid::from_parts(resp.svid.unwrap().cert_chain, key.serialize_der()).unwrap();

    // That agent renews at the other replica (its record is shared); the new SVID is signed by
    // that replica's authority and verifies against the bundle of the first.
    for ca in [&a, &b] {
        let mut c = common::node_client(ca, Some(svid.clone()));
        let (_k, csr) = common::key_and_csr(None);
        let r = c
            .renew_agent(ward_proto::node::RenewAgentRequest { csr })
            .await
            .unwrap_or_else(|e| panic!("renew at {}: {e:?}", ca.node_addr))
            .into_inner();
        let chain: Vec<rustls_pki_types::CertificateDer<'_>> = r
            .svid
            .unwrap()
            .cert_chain
            .into_iter()
            .map(Into::into)
            .collect();
        let bundle = a.core.bundle();
        let roots: Vec<rustls_pki_types::CertificateDer<'_>> = bundle
            .x509_authorities
            .iter()
            .map(|r| r.clone().into())
            .collect();
        ward_spiffe::x509::verify_chain(
            &chain,
            &roots,
            &bundle.trust_domain,
            std::time::SystemTime::now(),
            ward_spiffe::x509::Usage::Client,
        )
        .unwrap_or_else(|e| panic!("an SVID of {} does not verify: {e}", ca.node_addr));
    }

    // B rotates; its old authority, revoked from A with --force, is revoked in B's signer at
    // once (a store watch, not the next maintenance tick).
    let old_b = b.core.authorities.current().x509.id.clone();
    b.core
        .authorities
        .operate(Kind::X509, Op::Prepare, false)
        .await
        .unwrap();
    b.core
        .authorities
        .operate(Kind::X509, Op::Activate(None), false)
        .await
        .unwrap();
    let e = a
        .core
        .authorities
        .operate(Kind::X509, Op::Activate(None), false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no prepared"), "{e}"); // A's rails see only A's
    a.core
        .authorities
        .operate(Kind::X509, Op::Revoke(old_b.clone()), true)
        .await
        .unwrap();
    let revoked_b = b
        .core
        .authorities
        .current()
        .authorities
        .iter()
        .any(|(_, v)| v.id == old_b && v.state == AuthorityState::Revoked);
    let started = Instant::now();
    eventually("B learns of A's revoke", || {
        b.core
            .authorities
            .current()
            .authorities
            .iter()
            .any(|(_, v)| v.id == old_b && v.state == AuthorityState::Revoked)
    })
    .await;
    eprintln!(
        "revoke on A reached B after {:?} (already: {revoked_b})",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Exactly one replica leads the singleton work; when it stops, the other takes over.
    eventually("one leader", || {
        a.core.metrics.leader.get() + b.core.metrics.leader.get() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.core.metrics.leader.get() + b.core.metrics.leader.get(), 1);
    let (leader, other) = if a.core.metrics.leader.get() == 1 {
        (a, b)
    } else {
        (b, a)
    };
    // Singleton writes carry the leadership fence: the follower's are refused, the leader's
    // go through.
    async fn fenced(
        ca: &CaServer,
        name: &str,
    ) -> Result<
        Vec<Result<ward_ca::entries::Entry, ward_ca::error::ApiError>>,
        ward_ca::error::ApiError,
    > {
        let op = ward_ca::entries::EntryOp::Create {
            id: ward_ca::core::CaCore::new_entry_id(),
            spec: ward_ca::entries::EntrySpec {
                spiffe_id: format!("spiffe://ha.test/{name}"),
                parent_id: "spiffe://ha.test/ward/agent/x".into(),
                selectors: vec!["unix:uid:7".into()],
                ..Default::default()
            },
            origin: "k8s/test".into(),
        };
        ca.core
            .entries
            .fenced(ca.core.leadership.fence())
            .write_many(vec![op], std::time::SystemTime::now())
            .await
    }
    let e = fenced(&other, "from-follower").await.unwrap_err();
    assert!(e.to_string().contains("no longer holds"), "{e}");
    let r = fenced(&leader, "from-leader").await.unwrap();
    assert!(r[0].is_ok(), "{r:?}");

    let started = Instant::now();
    leader.shutdown().await;
    eventually("the other replica leads", || {
        other.core.metrics.leader.get() == 1
    })
    .await;
    eprintln!("leadership moved in {:?}", started.elapsed());
    other.shutdown().await;
}

fn leaf_of(m: &ward_proto::workload::X509svidResponse) -> Vec<u8> {
    ward_spiffe::x509::split_der(&m.svids[0].x509_svid).unwrap()[0].clone()
}

/// The Workload API's current X.509-SVID leaf.
async fn current_leaf(socket: &std::path::Path) -> Option<Vec<u8>> {
    let mut c = common::workload_client(socket);
    let mut s = c
        .fetch_x509svid(common::with_header(
            ward_proto::workload::X509svidRequest {},
        ))
        .await
        .ok()?
        .into_inner();
    let m = tokio::time::timeout(Duration::from_secs(2), s.message())
        .await
        .ok()?
        .ok()??;
    Some(leaf_of(&m))
}

/// An agent given both replicas' addresses: when the one it talks to dies, it renews and
/// syncs at the other without attesting again (new entries reach it, its SVIDs are renewed
/// by the other replica's authority); with no CA at all, it keeps serving what it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_to_another_replica_without_attesting_again() {
    let etcd = Etcd::cluster(3);
    let dir = tempfile::tempdir().unwrap();
    let short = |mut cfg: ward_ca::CaConfig| {
        cfg.ttl.x509_svid = Duration::from_secs(6);
        cfg
    };
    let mk = |name: &'static str| {
        let mut cfg = short(common::ca_config(&dir.path().join(name), "ha.test"));
        cfg.store.backend = StoreBackend::Etcd;
        let mut e = EtcdConfig::new(etcd.endpoints());
        e.prefix = "/ha/".into();
        cfg.store.etcd = Some(e);
        cfg
    };
    let a = common::start_ca(mk("a"), Arc::new(ward_spiffe::SystemClock)).await;
    let b = common::start_ca(mk("b"), Arc::new(ward_spiffe::SystemClock)).await;
    eventually("both roots in A's bundle file", || {
        std::fs::read_to_string(&a.bundle_path)
            .map(|p| p.matches("BEGIN CERTIFICATE").count() == 2)
            .unwrap_or(false)
    })
    .await;
    let mut cfg = common::agent_config(&a, dir.path()).await;
    cfg.server_address = format!("{},{}", a.node_addr, b.node_addr);
    let agent = common::start_agent(cfg).await;
    let agent_id = agent.identity.id().unwrap();
    let parent = agent_id.to_string();
    let entry = |name: &str| ward_proto::admin::EntrySpec {
        spiffe_id: format!("spiffe://ha.test/{name}"),
        parent_id: parent.clone(),
        selectors: vec![common::my_uid_selector()],
        ..Default::default()
    };
    let mut admin_b = ward_proto::admin::admin_client::AdminClient::new(
        ward_net::process::unix_channel(&b.admin_socket),
    );
    admin_b.create_entry(entry("one")).await.unwrap();
    let mut snaps = agent.cache.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        snaps.wait_for(|s| {
            s.entries
                .values()
                .any(|e| e.spiffe_id.to_string().ends_with("/one"))
        }),
    )
    .await
    .expect("entry made at B reaches an agent synced to A")
    .unwrap();

    // A dies. The next entry and the next SVID come through B.
    let b_signing = b.core.authorities.current().x509.signing_chain[0].clone();
    let b_spki = ward_spiffe::x509::spki_der(&b_signing).unwrap();
    let killed = Instant::now();
    a.shutdown().await;
    admin_b.create_entry(entry("two")).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(15),
        snaps.wait_for(|s| {
            s.entries
                .values()
                .any(|e| e.spiffe_id.to_string().ends_with("/two"))
        }),
    )
    .await
    .expect("sync resumed at B")
    .unwrap();
    let synced = killed.elapsed();
    let deadline = Instant::now() + Duration::from_secs(20);
    let renewed = loop {
        if let Some(leaf) = current_leaf(&agent.socket_path).await
            && ward_spiffe::x509::signed_by(&leaf, &b_spki)
        {
            break killed.elapsed();
        }
        assert!(Instant::now() < deadline, "no SVID renewed by B");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("after the replica died: synced at the other in {synced:?}, renewed in {renewed:?}");
    assert_eq!(
        agent.identity.id().unwrap(),
        agent_id,
        "the agent attested again"
    );

    // No CA at all: the Workload API still serves the SVIDs it has.
    b.shutdown().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(current_leaf(&agent.socket_path).await.is_some());
    agent.shutdown().await;
}

/// Writers on two replicas at once: every create is acknowledged (a race with the other
/// replica is planned again, not returned as ABORTED), none is lost, and every entry has its
/// own revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_entry_writes_on_two_replicas_lose_nothing() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tokio::join!(
        replica(&etcd, dir.path(), "a"),
        replica(&etcd, dir.path(), "b")
    );
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let sock = if w % 2 == 0 {
            &a.admin_socket
        } else {
            &b.admin_socket
        };
        let mut admin = ward_proto::admin::admin_client::AdminClient::new(
            ward_net::process::unix_channel(sock),
        );
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                admin
                    .create_entry(ward_proto::admin::EntrySpec {
                        spiffe_id: format!("spiffe://ha.test/w{w}/e{i}"),
                        parent_id: "spiffe://ha.test/ward/agent/x".into(),
                        selectors: vec![format!("unix:uid:{}", 1000 + i)],
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("writer {w} entry {i}: {e:?}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut admin = ward_proto::admin::admin_client::AdminClient::new(
        ward_net::process::unix_channel(&b.admin_socket),
    );
    let entries = admin
        .list_entries(ward_proto::admin::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 100);
    let revisions: std::collections::HashSet<u64> = entries.iter().map(|e| e.revision).collect();
    assert_eq!(revisions.len(), 100, "two entries share a revision");
    a.shutdown().await;
    b.shutdown().await;
}

/// A replica whose only etcd member was down while the other replica wrote, and etcd then
/// compacted those revisions away: its watch resumes past the compaction, so every cache
/// re-reads the store (counted in `ward_ca_store_watch_rereads_total`), and its agent
/// converges — the entries made meanwhile reach it, and the other replica's new authority is
/// in the bundle it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_watch_was_compacted_away_re_reads_and_its_agents_converge() {
    let mut etcd = Etcd::cluster(3);
    let dir = tempfile::tempdir().unwrap();
    let eps = etcd.endpoints();
    let mk = |name: &str, endpoints: Vec<String>| {
        let mut cfg = common::ca_config(&dir.path().join(name), "ha.test");
        cfg.store.backend = StoreBackend::Etcd;
        let mut e = EtcdConfig::new(endpoints);
        e.prefix = "/ha/".into();
        e.request_timeout = Duration::from_secs(1);
        cfg.store.etcd = Some(e);
        cfg
    };
    let clock = || Arc::new(ward_spiffe::SystemClock);
    let a = common::start_ca(mk("a", eps[1..].to_vec()), clock()).await;
    let b = common::start_ca(mk("b", vec![eps[0].clone()]), clock()).await;
    let agent = common::start_agent(common::agent_config(&b, dir.path()).await).await;
    let parent = agent.identity.id().unwrap().to_string();
    let entry = |name: String| ward_proto::admin::EntrySpec {
        spiffe_id: format!("spiffe://ha.test/{name}"),
        parent_id: parent.clone(),
        selectors: vec![common::my_uid_selector()],
        ..Default::default()
    };
    let mut admin_a = ward_proto::admin::admin_client::AdminClient::new(
        ward_net::process::unix_channel(&a.admin_socket),
    );
    admin_a.create_entry(entry("before".into())).await.unwrap();
    let mut snaps = agent.cache.subscribe();
    let has = |n: usize| {
        move |s: &Arc<ward_agent::cache::Snapshot>| {
            s.entries
                .values()
                .filter(|e| e.spiffe_id.path().starts_with("/during-"))
                .count()
                == n
        }
    };
    tokio::time::timeout(
        Duration::from_secs(10),
        snaps.wait_for(|s| s.entries.values().any(|e| e.spiffe_id.path() == "/before")),
    )
    .await
    .expect("an entry made at A reaches B's agent")
    .unwrap();
    eventually("both roots at B", || {
        b.core.bundle().x509_authorities.len() == 2
    })
    .await;

    // B's member goes; A writes; etcd forgets the revisions B never saw.
    etcd.kill(0);
    // If member 0 led, the others elect a new leader first: a write meanwhile is refused
    // (UNAVAILABLE, nothing written) and is tried again.
    let deadline = Instant::now() + Duration::from_secs(15);
    for i in 0..5 {
        loop {
            match admin_a.create_entry(entry(format!("during-{i}"))).await {
                Ok(_) => break,
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("entry during-{i}: {e}"),
            }
        }
    }
    loop {
        match a
            .core
            .authorities
            .operate(Kind::X509, Op::Prepare, false)
            .await
        {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("prepare: {e}; again");
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("prepare: {e}"),
        }
    }
    let compacted = etcd.compact(1);
    etcd.restart(0);
    etcd.wait_healthy(0);

    tokio::time::timeout(Duration::from_secs(20), snaps.wait_for(has(5)))
        .await
        .unwrap_or_else(|_| {
            panic!("B's agent did not converge after the compaction at {compacted}")
        })
        .unwrap();
    eventually("A's prepared authority in B's bundle", || {
        b.core.bundle().x509_authorities.len() == 3
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = common::http_get(b.health_addr, "/metrics").await;
        let n: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("ward_ca_store_watch_rereads_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if n >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no compaction re-read counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}
