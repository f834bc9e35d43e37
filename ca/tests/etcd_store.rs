//! A CA whose state lives in a real etcd (Debian's etcd-server): a real agent attests, syncs
//! and gets SVIDs through it; with etcd gone the CA reports not-ready with the reason and
//! refuses writes with UNAVAILABLE (fail closed), and it recovers without a restart; its
//! state is in etcd, under its prefix, after the CA process is gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;
use ward_ca::config::{EtcdConfig, StoreBackend};
use ward_proto::admin::admin_client::AdminClient;
use ward_proto::workload as wl;
use ward_store::Store;
use ward_testing::etcd::Etcd;

async fn until_ready(addr: SocketAddr, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = common::http_get(addr, "/readyz").await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status} ({body}), want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn entry(id: &str, parent: &str) -> ward_proto::admin::EntrySpec {
    ward_proto::admin::EntrySpec {
        spiffe_id: format!("spiffe://etcd.test/{id}"),
        parent_id: parent.to_owned(),
        selectors: vec![common::my_uid_selector()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_on_etcd_serves_agents_and_fails_closed_without_it() {
    let mut etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::ca_config(&dir.path().join("ca"), "etcd.test");
    cfg.store.backend = StoreBackend::Etcd;
    let mut e = EtcdConfig::new(etcd.endpoints());
    e.prefix = "/td/etcd.test/".into();
    e.request_timeout = Duration::from_secs(1);
    cfg.store.etcd = Some(e);
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    until_ready(ca.health_addr, 200).await;
    assert!(
        !dir.path().join("ca").join("store").exists(),
        "a sled store was made beside etcd"
    );

    // A real agent attests, syncs and serves an SVID through the CA on etcd.
    let agent = common::start_agent(common::agent_config(&ca, dir.path()).await).await;
    let parent = agent.identity.id().unwrap().to_string();
    let mut admin = AdminClient::new(ward_net::process::unix_channel(&ca.admin_socket));
    admin.create_entry(entry("web", &parent)).await.unwrap();
    let mut wl_client = common::workload_client(&agent.socket_path);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = wl_client
            .fetch_x509svid(common::with_header(wl::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        if let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_secs(2), s.message()).await {
            assert_eq!(m.svids[0].spiffe_id, "spiffe://etcd.test/web");
            break;
        }
        assert!(Instant::now() < deadline, "no SVID through a CA on etcd");
    }

    // etcd gone: not ready, with the reason; writes refused as UNAVAILABLE, not lost later.
    etcd.kill(0);
    let body = until_ready(ca.health_addr, 503).await;
    assert!(body.contains("store"), "{body}");
    let err = admin.create_entry(entry("db", &parent)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The agent keeps serving what it has.
    let mut s = wl_client
        .fetch_x509svid(common::with_header(wl::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_some());

    // Back: ready again without a restart, and writes go through.
    etcd.restart(0);
    etcd.wait_healthy(0);
    until_ready(ca.health_addr, 200).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match admin.create_entry(entry("db", &parent)).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    agent.shutdown().await;
    ca.shutdown().await;

    // The state is in etcd under the prefix (and nothing outside it).
    let store = ward_store::EtcdStore::open(
        ward_store::EtcdOptions::plaintext(&etcd.endpoints(), b"/td/etcd.test/").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        store.get(b"meta/schema").await.unwrap().as_deref(),
        Some(&b"ward-ca/1"[..])
    );
    let entries = ward_store::scan_all(&store, b"entry/").await.unwrap();
    assert!(entries.len() >= 2, "{} entries stored", entries.len());
    let outside = ward_store::EtcdStore::open(
        ward_store::EtcdOptions::plaintext(&etcd.endpoints(), b"/other/").unwrap(),
    )
    .await
    .unwrap();
    assert!(outside.scan(b"", None, 1).await.unwrap().is_empty());
}

/// `https://` endpoints with `[store.etcd.tls]`: the CA verifies the members' certificate
/// against `tls.ca` and presents its client certificate (etcd runs `--client-cert-auth`).
/// Without the client certificate, or trusting another CA, start-up fails and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_reaches_etcd_over_tls_with_a_client_certificate() {
    let etcd = Etcd::start_tls();
    let files = etcd.tls().unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let config = |tls: ward_ca::config::EtcdTls| {
        let mut cfg = common::ca_config(&dir.path().join("ca"), "etcd.test");
        cfg.store.backend = StoreBackend::Etcd;
        let mut e = EtcdConfig::new(etcd.endpoints());
        e.request_timeout = Duration::from_secs(2);
        e.tls = Some(tls);
        cfg.store.etcd = Some(e);
        cfg.validate().unwrap();
        cfg
    };
    let start_err = |cfg| async move {
        match ward_ca::CaServer::start_with_clock(cfg, Arc::new(ward_spiffe::SystemClock)).await {
            Ok(ca) => {
                ca.shutdown().await;
                panic!("started")
            }
            Err(e) => e.to_string(),
        }
    };

    let no_client_cert = ward_ca::config::EtcdTls {
        ca: files.ca.clone(),
        cert: None,
        key: None,
    };
    let e = start_err(config(no_client_cert)).await;
    assert!(e.contains(&etcd.endpoints()[0]), "{e}");
    assert!(e.contains("store.etcd.tls.cert"), "{e}");

    let other = ward_testing::Pki::new("other.test");
    std::fs::create_dir_all(dir.path().join("other")).unwrap();
    let other_ca = other.write_bundle(&dir.path().join("other"));
    let wrong_ca = ward_ca::config::EtcdTls {
        ca: other_ca,
        cert: Some(files.client_cert.clone()),
        key: Some(files.client_key.clone()),
    };
    let e = start_err(config(wrong_ca)).await;
    assert!(e.contains(&etcd.endpoints()[0]), "{e}");
    assert!(e.contains("certificate"), "{e}");

    let good = ward_ca::config::EtcdTls {
        ca: files.ca.clone(),
        cert: Some(files.client_cert.clone()),
        key: Some(files.client_key.clone()),
    };
    let ca = common::start_ca(config(good), Arc::new(ward_spiffe::SystemClock)).await;
    until_ready(ca.health_addr, 200).await;
    let mut admin = AdminClient::new(ward_net::process::unix_channel(&ca.admin_socket));
    admin
        .create_entry(entry("tls", "spiffe://etcd.test/ward/agent/x"))
        .await
        .unwrap();
    ca.shutdown().await;
}

/// The Kubernetes controller writes its entries in transactions etcd accepts (128 operations
/// at most): 150 pods become 150 entries on a CA on etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_controller_fits_its_writes_into_etcd_transactions() {
    use common::k8s::{cluster, eventually, node, pod};
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let fake = ward_testing::kube::FakeKube::start().await;
    fake.put(&node("n1", "node-1"));
    fake.put_json(
        "namespaces",
        serde_json::json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop" } }),
    );
    for i in 0..150 {
        fake.put(&pod(
            "shop",
            &format!("p{i}"),
            &format!("uid-{i}"),
            "n1",
            &format!("sa{i}"),
        ));
    }
    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path())];
    cfg.store.backend = StoreBackend::Etcd;
    cfg.store.etcd = Some(EtcdConfig::new(etcd.endpoints()));
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    eventually("150 generated entries on etcd", || {
        let ca = &ca;
        async move {
            let n = ca
                .core
                .entries
                .list(None, None)
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .filter(|e| e.origin.starts_with("k8s/"))
                .count();
            if n == 150 {
                Ok(())
            } else {
                Err(format!("{n} entries"))
            }
        }
    })
    .await;
    ca.shutdown().await;
}

async fn create(
    admin: &mut AdminClient<tonic::transport::Channel>,
    name: &str,
) -> Result<(), tonic::Status> {
    admin
        .create_entry(entry(name, "spiffe://etcd.test/ward/agent/x"))
        .await
        .map(|_| ())
}

/// On three etcd members: killing the raft leader costs writes only until the survivors elect
/// another; killing a majority makes the CA not ready and refuse writes; bringing the
/// members back makes it ready again without a restart, with every acknowledged write there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rides_out_the_etcd_leader_and_a_lost_majority() {
    let mut etcd = Etcd::cluster(3);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::ca_config(&dir.path().join("ca"), "etcd.test");
    cfg.store.backend = StoreBackend::Etcd;
    let mut e = EtcdConfig::new(etcd.endpoints());
    e.request_timeout = Duration::from_secs(1);
    cfg.store.etcd = Some(e);
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    let mut admin = AdminClient::new(ward_net::process::unix_channel(&ca.admin_socket));
    let mut acked = Vec::new();
    for i in 0..5 {
        create(&mut admin, &format!("before{i}")).await.unwrap();
        acked.push(format!("before{i}"));
    }

    let leader = etcd.leader().expect("a raft leader");
    etcd.kill(leader);
    let killed = Instant::now();
    let mut i = 0;
    let resumed = loop {
        let name = format!("during{i}");
        match create(&mut admin, &name).await {
            Ok(()) => {
                acked.push(name);
                break killed.elapsed();
            }
            // A write that timed out may have been applied (not acknowledged: not counted).
            Err(e)
                if e.code() == Code::Unavailable && killed.elapsed() < Duration::from_secs(20) =>
            {
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    eprintln!("writes resumed {resumed:?} after the etcd leader was killed");

    // A majority gone: not ready, writes refused.
    let second = (0..3).find(|m| *m != leader).unwrap();
    etcd.kill(second);
    let body = until_ready(ca.health_addr, 503).await;
    assert!(body.contains("store"), "{body}");
    let err = create(&mut admin, "no-quorum").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // Back: ready and writing again, and every acknowledged entry is there.
    etcd.restart(leader);
    etcd.restart(second);
    etcd.wait_healthy(leader);
    until_ready(ca.health_addr, 200).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match create(&mut admin, "after").await {
            Ok(()) => break,
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    acked.push("after".into());
    let listed: Vec<String> = admin
        .list_entries(ward_proto::admin::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.spiffe_id)
        .collect();
    for name in &acked {
        let id = format!("spiffe://etcd.test/{name}");
        assert!(listed.contains(&id), "acknowledged {id} is missing");
    }
    ca.shutdown().await;
}

/// The service controller, too: 150 Kubernetes Services become 150 mesh services on a CA on
/// etcd (two store operations each: one commit of them all would be far over etcd's 128).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_controller_fits_its_writes_into_etcd_transactions() {
    use common::k8s::{cluster, ep, eventually, node, pod, service, slice};
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let fake = ward_testing::kube::FakeKube::start().await;
    fake.put(&node("n1", "node-1"));
    fake.put(&pod("shop", "api-1", "u1", "n1", "api"));
    for i in 0..150 {
        fake.put_json(
            "services",
            service(
                &format!("s{i}"),
                &format!("10.96.{}.{}", i / 200, 1 + i % 200),
            ),
        );
        fake.put_json(
            "endpointslices",
            slice(
                &format!("s{i}-a"),
                &format!("s{i}"),
                // Large enough that 63 services (etcd's operations limit) are over its
                // 1.5 MiB request limit: the controller must group by size too.
                serde_json::Value::Array(
                    (0..200)
                        .map(|j| {
                            ep(
                                &format!("10.1.{}.{}", j / 250, 1 + j % 250),
                                "api-1",
                                "u1",
                                true,
                                false,
                            )
                        })
                        .collect(),
                ),
            ),
        );
    }
    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path())];
    cfg.store.backend = StoreBackend::Etcd;
    cfg.store.etcd = Some(EtcdConfig::new(etcd.endpoints()));
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    eventually("150 services on etcd", || {
        let ca = &ca;
        async move {
            let n = ca
                .core
                .services
                .list()
                .await
                .map_err(|e| e.to_string())?
                .len();
            if n == 150 {
                Ok(())
            } else {
                Err(format!("{n} services"))
            }
        }
    })
    .await;
    ca.shutdown().await;
}

/// A node whose workloads all start at once: the agent asks for 150 SVIDs in one batch, more
/// than one etcd transaction holds (128 operations) once each carries its issuance record. The
/// CA commits them in groups that fit, and every workload gets its SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_csrs_larger_than_one_etcd_transaction_is_signed() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::ca_config(&dir.path().join("ca"), "etcd.test");
    cfg.store.backend = StoreBackend::Etcd;
    cfg.store.etcd = Some(EtcdConfig::new(etcd.endpoints()));
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    until_ready(ca.health_addr, 200).await;
    // The agent's ID is known before it attests: its join token's.
    let mut agent_cfg = common::agent_config(&ca, dir.path()).await;
    let (token, rec) = ca
        .core
        .agents
        .create_join_token(Duration::from_secs(600), ca.core.clock.now())
        .await
        .unwrap();
    agent_cfg.join_token = Some(token);
    let parent = ca
        .core
        .agents
        .join_token_agent_id(&rec.id)
        .unwrap()
        .to_string();
    let mut admin = AdminClient::new(ward_net::process::unix_channel(&ca.admin_socket));
    const N: usize = 150;
    for i in 0..N {
        admin
            .create_entry(entry(&format!("w{i}"), &parent))
            .await
            .unwrap();
    }
    let agent = common::start_agent(agent_cfg).await;
    let mut wl_client = common::workload_client(&agent.socket_path);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut s = wl_client
            .fetch_x509svid(common::with_header(wl::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        if let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_secs(2), s.message()).await
            && m.svids.len() == N
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node's {N} SVIDs were not all issued"
        );
    }
    let issued = ward_ca::audit::tail(ca.core.store.as_ref(), 10 * N)
        .await
        .unwrap();
    let svids = issued.iter().filter(|r| r.event == "x509-svid").count();
    assert!(svids >= N, "{svids} issuance records");
    agent.shutdown().await;
    ca.shutdown().await;
}
