//! The service controller against the fake API server, through the real kube client: Services
//! and EndpointSlices become mesh services whose endpoints carry the SPIFFE IDs the identity
//! controller gave their pods; slices are merged, conditions kept, unmeshed endpoints left
//! out, and deleted Services removed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::k8s::{cluster, ep, eventually, node, pod, service, slice};
use serde_json::json;
use ward_testing::kube::FakeKube;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_follow_endpointslices_with_pod_identities() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    fake.put(&node("n1", "node-1"));
    fake.put(&pod("shop", "api-1", "u1", "n1", "api"));
    fake.put(&pod("shop", "api-2", "u2", "n1", "api"));
    fake.put_json("services", service("api", "10.96.0.10"));
    fake.put_json(
        "endpointslices",
        slice(
            "api-a",
            "api",
            json!([
                ep("10.1.0.1", "api-1", "u1", true, false),
                ep("10.1.0.9", "stranger", "no-such-pod", true, false),
            ]),
        ),
    );
    fake.put_json(
        "endpointslices",
        slice(
            "api-b",
            "api",
            json!([
                ep("10.1.0.1", "api-1", "u1", true, false),
                ep("10.1.0.2", "api-2", "u2", false, true),
            ]),
        ),
    );
    // A Service none of whose endpoints is meshed.
    fake.put_json("services", service("legacy", "10.96.0.20"));
    fake.put_json(
        "endpointslices",
        slice(
            "legacy-a",
            "legacy",
            json!([ep("10.1.0.7", "old", "unknown", true, false)]),
        ),
    );

    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path())];
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    let id = "spiffe://k8s.test/ns/shop/sa/api";
    let svc = |ca: &ward_ca::CaServer| {
        let core = ca.core.clone();
        async move { core.services.get("api.shop").await.unwrap() }
    };
    eventually("api.shop with both meshed endpoints", || async {
        let Some(r) = svc(&ca).await else {
            return Err("no service yet".into());
        };
        let got: Vec<(String, bool, bool, Vec<String>)> = r
            .service
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.address.to_string(),
                    e.ready,
                    e.terminating,
                    e.ids.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        let want = vec![
            ("10.1.0.1".to_owned(), true, false, vec![id.to_owned()]),
            ("10.1.0.2".to_owned(), false, true, vec![id.to_owned()]),
        ];
        if got == want && r.origin == "k8s/c1" {
            Ok(())
        } else {
            Err(format!("{got:?} ({})", r.origin))
        }
    })
    .await;
    let r = svc(&ca).await.unwrap();
    assert_eq!(r.service.addresses[0].to_string(), "10.96.0.10");
    let targets = ward_spiffe::service::resolve(&r.service, 80).unwrap();
    assert_eq!(
        targets[0].addr.to_string(),
        "10.1.0.1:8080",
        "named target port"
    );
    assert!(targets[1].draining);
    assert!(
        ca.core.services.get("legacy.shop").await.unwrap().is_none(),
        "a Service with no meshed endpoint is not a mesh service"
    );
    // The admin may not edit what the controller keeps.
    let e = ca
        .core
        .services
        .delete("api.shop", "admin")
        .await
        .unwrap_err();
    assert!(
        matches!(e, ward_ca::error::ApiError::FailedPrecondition(_)),
        "{e:?}"
    );

    // The terminating pod's slice entry goes away.
    fake.put_json(
        "endpointslices",
        slice(
            "api-b",
            "api",
            json!([ep("10.1.0.1", "api-1", "u1", true, false)]),
        ),
    );
    eventually("one endpoint left", || async {
        match svc(&ca).await {
            Some(r) if r.service.endpoints.len() == 1 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // The Service is deleted: so is the mesh service.
    assert!(fake.delete("services", Some("shop"), "api"));
    eventually("api.shop removed", || async {
        match svc(&ca).await {
            None => Ok(()),
            Some(r) => Err(format!("still there: {r:?}")),
        }
    })
    .await;
    ca.shutdown().await;
}
