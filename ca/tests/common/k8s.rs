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
        jwks_min_refresh_interval: std::time::Duration::from_secs(10),
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

/// A Service in namespace `shop` with port 80 (`http`, target port `web`).
pub fn service(name: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": "shop", "uid": format!("svc-{name}") },
        "spec": { "clusterIP": ip, "clusterIPs": [ip],
                  "ports": [ { "name": "http", "port": 80, "targetPort": "web" } ] }
    })
}

/// An EndpointSlice of Service `svc` in `shop`, port `http` 8080.
pub fn slice(name: &str, svc: &str, eps: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": name, "namespace": "shop", "labels": { "kubernetes.io/service-name": svc } },
        "addressType": "IPv4",
        "ports": [ { "name": "http", "port": 8080 } ],
        "endpoints": eps
    })
}

/// An endpoint of a slice: a pod in `shop`.
pub fn ep(addr: &str, pod: &str, uid: &str, ready: bool, terminating: bool) -> serde_json::Value {
    json!({
        "addresses": [addr],
        "conditions": { "ready": ready, "serving": true, "terminating": terminating },
        "targetRef": { "kind": "Pod", "name": pod, "namespace": "shop", "uid": uid }
    })
}
