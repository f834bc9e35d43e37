//! `ExternalService` resources against the fake API server, through the real kube client: each
//! becomes an external service of the mesh's egress configuration next to the operator's, its
//! status says whether it was accepted and why not, a broken update keeps the last accepted
//! version in force, a deleted one goes, and one deleted while the CA was down is removed when
//! it comes back. A cluster without the CRD is simply empty.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::k8s::{cluster, eventually};
use serde_json::json;
use ward_testing::kube::FakeKube;

fn es(name: &str, generation: i64, spec: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "ward.dev/v1alpha1", "kind": "ExternalService",
        "metadata": { "name": name, "generation": generation },
        "spec": spec
    })
}

fn stripe(host: &str) -> serde_json::Value {
    json!({ "protocol": "tls", "hosts": [host], "ports": [443],
            "from": [ { "namespaces": ["shop"] } ] })
}

fn accepted(fake: &FakeKube, name: &str) -> Option<serde_json::Value> {
    fake.get("externalservices", None, name)?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
}

async fn hosts_of(ca: &ward_ca::CaServer, name: &str) -> Option<Vec<String>> {
    ca.core
        .egress
        .get()
        .await
        .unwrap()
        .doc
        .services
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| s.hosts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_services_from_the_cluster_join_the_egress_configuration_with_status() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    fake.put_json(
        "externalservices",
        es("stripe", 1, stripe("api.stripe.com")),
    );
    fake.put_json(
        "externalservices",
        es(
            "bad-wildcard",
            1,
            json!({ "protocol": "tls", "hosts": ["a.*.com"], "ports": [443],
                    "from": [ { "principals": ["*"] } ] }),
        ),
    );
    fake.put_json(
        "externalservices",
        es(
            "db",
            1,
            json!({ "protocol": "tcp", "addresses": ["192.0.2.0/24"], "ports": [5432],
                    "from": [ { "principals": ["*"] } ] }),
        ),
    );
    fake.put_json(
        "externalservices",
        es("gone-while-down", 1, stripe("old.example.com")),
    );
    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path())];
    let ca = common::start_ca(cfg.clone(), Arc::new(ward_spiffe::SystemClock)).await;
    // The operator's configuration stays the operator's: the default is applied beside them.
    ca.core
        .egress
        .put(ward_spiffe::egress::EgressDoc {
            default: ward_spiffe::egress::Mode::Allow,
            ..Default::default()
        })
        .await
        .unwrap();

    eventually("stripe and db in force", || async {
        let doc = ca.core.egress.get().await.unwrap().doc;
        let mut names: Vec<String> = doc.services.iter().map(|s| s.name.clone()).collect();
        names.sort();
        if names == ["db", "gone-while-down", "stripe"] {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await;
    assert_eq!(
        ca.core.egress.get().await.unwrap().doc.default,
        ward_spiffe::egress::Mode::Allow
    );
    eventually("statuses", || async {
        let ok = accepted(&fake, "stripe").ok_or("no status on stripe")?;
        let bad = accepted(&fake, "bad-wildcard").ok_or("no status on bad-wildcard")?;
        if ok["status"] == "True" && bad["status"] == "False" {
            Ok(())
        } else {
            Err(format!("{ok} {bad}"))
        }
    })
    .await;
    let bad = accepted(&fake, "bad-wildcard").unwrap();
    assert_eq!(bad["reason"], "Invalid");
    let msg = bad["message"].as_str().unwrap();
    assert!(
        msg.contains("a.*.com") && msg.contains("not in force"),
        "{msg}"
    );
    assert_eq!(accepted(&fake, "stripe").unwrap()["observedGeneration"], 1);

    // A broken update: refused, the last accepted version stays and the status says so.
    fake.put_json("externalservices", es("stripe", 2, stripe("10.0.0.1")));
    eventually("stripe refused", || async {
        let c = accepted(&fake, "stripe").ok_or("no status")?;
        if c["status"] == "False" && c["observedGeneration"] == 2 {
            Ok(())
        } else {
            Err(c.to_string())
        }
    })
    .await;
    let c = accepted(&fake, "stripe").unwrap();
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.contains("IP address") && msg.contains("the last accepted version stays in force"),
        "{msg}"
    );
    assert_eq!(
        hosts_of(&ca, "stripe").await,
        Some(vec!["api.stripe.com".to_owned()])
    );
    // Fixed: in force again.
    fake.put_json(
        "externalservices",
        es("stripe", 3, stripe("api2.stripe.com")),
    );
    eventually("stripe updated", || async {
        match hosts_of(&ca, "stripe").await {
            Some(h) if h == ["api2.stripe.com"] => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Deleted: gone. Deleted while the CA is down: gone once the list completes.
    fake.delete("externalservices", None, "db");
    eventually("db removed", || async {
        match hosts_of(&ca, "db").await {
            None => Ok(()),
            Some(_) => Err("still there".into()),
        }
    })
    .await;
    ca.shutdown().await;
    fake.delete("externalservices", None, "gone-while-down");
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    eventually("gone-while-down removed", || async {
        match hosts_of(&ca, "gone-while-down").await {
            None => Ok(()),
            Some(_) => Err("still there".into()),
        }
    })
    .await;
    assert!(hosts_of(&ca, "stripe").await.is_some());
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_the_crd_has_no_external_services() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    fake.set_served("externalservices", false);
    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path())];
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    // Installed later: picked up.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(ca.core.egress.get().await.unwrap().doc.services.is_empty());
    fake.set_served("externalservices", true);
    fake.put_json(
        "externalservices",
        es("stripe", 1, stripe("api.stripe.com")),
    );
    eventually("stripe in force after the CRD arrived", || async {
        match hosts_of(&ca, "stripe").await {
            Some(_) => Ok(()),
            None => Err("not yet".into()),
        }
    })
    .await;
    ca.shutdown().await;
}
