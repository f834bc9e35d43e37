//! Helpers for tests against the fake Kubernetes API server: objects, the cluster config
//! pointing at it, and waiting for a condition.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use ward_ca::config::{ClusterConfig, ControllerConfig, PsatMode};
use ward_testing::kube::FakeKube;

pub fn node(name: &str, uid: &str) -> Node {
    serde_json::from_value(json!({ "metadata": { "name": name, "uid": uid } })).unwrap()
}

pub fn pod(ns: &str, name: &str, uid: &str, node: &str, sa: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": ns, "uid": uid, "labels": { "app": name.split('-').next().unwrap() } },
        "spec": { "nodeName": node, "serviceAccountName": sa, "containers": [ { "name": "app", "image": "app:1" } ] },
        "status": { "phase": "Running" }
    }))
    .unwrap()
}

pub fn cluster(fake: &FakeKube, dir: &std::path::Path) -> ClusterConfig {
    ClusterConfig {
        name: "c1".into(),
        kubeconfig: Some(fake.write_kubeconfig(dir, "c1")),
        service_account_allow_list: vec!["ward:ward-agent".into()],
        audience: "ward-ca".into(),
        mode: PsatMode::TokenReview,
        issuer: None,
        jwks_file: None,
        jwks_discovery: false,
        jwks_ca_file: None,
        node_label_allow_list: vec![],
        pod_label_allow_list: vec![],
        controller: ControllerConfig::default(),
        bundle_config_map: None,
    }
}

pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
