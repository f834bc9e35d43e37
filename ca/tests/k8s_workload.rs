//! Pod workload attestation on a real agent: a fake proc tree with real cgroup formats, the fake
//! kubelet over TLS with a bearer token, and the Workload API answering by pod identity.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use tonic::Code;
use ward_ca::config::{ClusterConfig, PsatMode};
use ward_ca::entries::EntrySpec;
use ward_proto::workload as wl;
use ward_testing::kube::{FakeKube, TokenSpec};

const WEB_UID: &str = "2c1f5d6e-8b7a-4c3d-9e0f-1a2b3c4d5e6f";
const DB_UID: &str = "9d8e7f6a-5b4c-4d3e-8f2a-1b0c9d8e7f6a";
const LATE_UID: &str = "11111111-2222-4333-8444-555555555555";
const CID: &str = "7a3c9f0e1d2b4a5c6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";

fn pod(name: &str, ns: &str, uid: &str, node: &str, sa: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "namespace": ns, "uid": uid, "labels": { "app": name } },
        "spec": { "nodeName": node, "serviceAccountName": sa, "containers": [ { "name": "app", "image": format!("{name}:1") } ] },
        "status": { "containerStatuses": [ { "name": "app", "image": format!("{name}:1"), "imageID": "x",
            "containerID": format!("containerd://{CID}"), "ready": true, "restartCount": 0 } ] }
    }))
    .unwrap()
}

/// Points this test process at `pod_uid` in the fake proc tree (cgroup v2, systemd driver).
fn set_cgroup(root: &std::path::Path, pod_uid: &str) {
    let me = std::process::id().to_string();
    let dir = root.join(&me);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(format!("/proc/{me}/stat"), dir.join("stat")).unwrap();
    let u = pod_uid.replace('-', "_");
    std::fs::write(
        dir.join("cgroup"),
        format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope\n"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_are_attested_as_pods() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    fake.put(
        &serde_json::from_value::<Node>(
            serde_json::json!({ "metadata": { "name": "n1", "uid": "node-1" } }),
        )
        .unwrap(),
    );
    fake.put(&pod(
        "ward-agent-x",
        "ward",
        "agent-pod-uid",
        "n1",
        "ward-agent",
    ));
    fake.put(&pod("web-1", "shop", WEB_UID, "n1", "web"));
    fake.put(&pod("db-1", "shop", DB_UID, "n2", "db"));
    let kubelet = fake.kubelet("n1", "kubelet-token").await;

    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![ClusterConfig {
        name: "c1".into(),
        kubeconfig: Some(fake.write_kubeconfig(dir.path(), "c1")),
        service_account_allow_list: vec!["ward:ward-agent".into()],
        audience: "ward-ca".into(),
        mode: PsatMode::TokenReview,
        issuer: None,
        jwks_file: None,
        jwks_discovery: false,
        jwks_ca_file: None,
        jwks_min_refresh_interval: std::time::Duration::from_secs(10),
        node_label_allow_list: vec![],
        pod_label_allow_list: vec![],
        // These tests manage entries themselves.
        controller: ward_ca::config::ControllerConfig {
            enabled: Some(false),
            ..Default::default()
        },
        bundle_config_map: None,
    }];
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;

    let token = dir.path().join("psat");
    std::fs::write(
        &token,
        fake.token(&TokenSpec::new(
            "ward",
            "ward-agent",
            ("ward-agent-x", "agent-pod-uid"),
            "ward-ca",
        )),
    )
    .unwrap();
    let kubelet_token = dir.path().join("kubelet-token");
    std::fs::write(&kubelet_token, "kubelet-token\n").unwrap();
    let ca_file = dir.path().join("kubelet-ca.pem");
    std::fs::write(&ca_file, &kubelet.ca_pem).unwrap();
    let proc_root = dir.path().join("proc");
    set_cgroup(&proc_root, WEB_UID);

    let mut acfg = common::agent_config(&ca, dir.path()).await;
    acfg.join_token = None;
    acfg.k8s_psat = Some(ward_agent::config::PsatConfig {
        cluster: "c1".into(),
        token_path: token,
    });
    acfg.unix.proc_root = proc_root.clone();
    acfg.k8s = Some(ward_agent::k8s::K8sConfig {
        node_name: "n1".into(),
        kubelet_url: format!("https://127.0.0.1:{}", kubelet.addr.port()),
        kubelet_ca: Some(ca_file),
        kubelet_insecure: false,
        token_path: kubelet_token,
        retries: 10,
        retry_interval: Duration::from_millis(100),
    });
    let agent = common::start_agent(acfg).await;
    let agent_id = agent.identity.id().unwrap().to_string();
    for (id, uid) in [
        ("ns/shop/sa/web", WEB_UID),
        ("ns/shop/sa/late", LATE_UID),
        ("ns/shop/sa/db", DB_UID),
    ] {
        ca.core
            .entries
            .create(
                &EntrySpec {
                    spiffe_id: format!("spiffe://k8s.test/{id}"),
                    parent_id: agent_id.clone(),
                    selectors: vec![format!("k8s:pod-uid:{uid}")],
                    ..Default::default()
                },
                "admin",
                ward_ca::core::CaCore::new_entry_id(),
                ca.core.clock.now(),
            )
            .await
            .unwrap();
    }
    let mut c = common::workload_client(&agent.socket_path);
    let fetch =
        |c: &mut ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
            tonic::transport::Channel,
        >| {
            let mut c = c.clone();
            async move {
                let mut s = c
                    .fetch_x509svid(common::with_header(wl::X509svidRequest {}))
                    .await?
                    .into_inner();
                tokio::time::timeout(Duration::from_secs(10), s.message())
                    .await
                    .expect("answer in time")
            }
        };

    // The caller is in web-1's cgroup: it gets web's identity only.
    let m = fetch(&mut c).await.unwrap().unwrap();
    assert_eq!(
        m.svids
            .iter()
            .map(|s| s.spiffe_id.as_str())
            .collect::<Vec<_>>(),
        vec!["spiffe://k8s.test/ns/shop/sa/web"]
    );
    assert!(kubelet.hits.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    // A cgroup pointing at a pod of another node: this kubelet does not list it.
    set_cgroup(&proc_root, DB_UID);
    let e = fetch(&mut c).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A container that just started: the kubelet lists its pod only after the agent has asked
    // once without finding it, so the answer comes from the agent's retry (whatever the
    // machine's speed), not from a race against a fixed pause.
    set_cgroup(&proc_root, LATE_UID);
    let f = fake.clone();
    let hits = kubelet.hits.clone();
    let before = hits.load(std::sync::atomic::Ordering::Relaxed);
    tokio::spawn(async move {
        while hits.load(std::sync::atomic::Ordering::Relaxed) <= before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        f.put(&pod("late-1", "shop", LATE_UID, "n1", "late"));
    });
    let m = fetch(&mut c).await.unwrap().unwrap();
    assert_eq!(m.svids[0].spiffe_id, "spiffe://k8s.test/ns/shop/sa/late");

    agent.shutdown().await;
    ca.shutdown().await;
}
