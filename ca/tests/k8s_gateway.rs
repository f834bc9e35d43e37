//! Gateway API Gateways against the fake API server, through the real kube client: a
//! GatewayClass with Ward's controller name is accepted, a Gateway of it becomes the mesh
//! service record `<name>.<namespace>.gateway` carrying the routes attached to its listeners
//! (hostnames narrowed to each listener's), status is written on the class, the Gateway and
//! its listeners, and the routes; other controllers' classes and Gateways are left alone; a
//! deleted Gateway's record goes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::k8s::{cluster, ep, eventually, node, pod, service, slice};
use serde_json::json;
use ward_testing::kube::FakeKube;

fn condition(v: &serde_json::Value, kind: &str) -> serde_json::Value {
    v["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .cloned()
        .unwrap_or_default()
}

fn route_condition(fake: &FakeKube, plural: &str, name: &str) -> serde_json::Value {
    let Some(r) = fake.get(plural, Some("shop"), name) else {
        return json!(null);
    };
    r["status"]["parents"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["controllerName"] == "ward.dev/gateway"))
        .map(|p| condition(p, "Accepted"))
        .unwrap_or_default()
}

fn route(name: &str, parent: serde_json::Value, hostnames: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": { "name": name, "namespace": "shop", "generation": 1 },
        "spec": {
            "parentRefs": [parent],
            "hostnames": hostnames,
            "rules": [ { "matches": [ { "path": { "type": "PathPrefix", "value": "/api" } } ],
                         "backendRefs": [ { "name": "api", "port": 80 } ] } ]
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_of_wards_class_carry_their_routes_with_status() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    fake.put(&node("n1", "node-1"));
    fake.put(&pod("shop", "api-1", "u1", "n1", "api"));
    fake.put_json("services", service("api", "10.96.0.10"));
    fake.put_json(
        "endpointslices",
        slice(
            "api-a",
            "api",
            json!([ep("10.1.0.1", "api-1", "u1", true, false)]),
        ),
    );
    for (name, controller) in [("ward", "ward.dev/gateway"), ("other", "example.com/gw")] {
        fake.put_json(
            "gatewayclasses",
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                "metadata": { "name": name, "generation": 1 },
                "spec": { "controllerName": controller }
            }),
        );
    }
    fake.put_json(
        "gateways",
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": { "name": "web", "namespace": "shop", "generation": 3 },
            "spec": { "gatewayClassName": "ward", "listeners": [
                { "name": "https", "port": 443, "protocol": "HTTPS", "hostname": "*.example.com",
                  "tls": { "mode": "Terminate", "certificateRefs": [ { "kind": "Secret", "name": "wild-tls" } ] } },
                { "name": "http", "port": 80, "protocol": "HTTP" },
                { "name": "raw", "port": 9000, "protocol": "TCP" }
            ] }
        }),
    );
    fake.put_json(
        "gateways",
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": { "name": "theirs", "namespace": "shop", "generation": 1 },
            "spec": { "gatewayClassName": "other",
                      "listeners": [ { "name": "http", "port": 80, "protocol": "HTTP" } ] }
        }),
    );
    fake.put_json(
        "httproutes",
        route(
            "store",
            json!({ "name": "web" }),
            json!(["store.example.com"]),
        ),
    );
    fake.put_json(
        "httproutes",
        route(
            "stray",
            json!({ "name": "web", "sectionName": "https" }),
            json!(["store.other.org"]),
        ),
    );
    fake.put_json(
        "httproutes",
        route("foreign", json!({ "name": "theirs" }), json!([])),
    );
    fake.put_json(
        "grpcroutes",
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": { "name": "cart", "namespace": "shop", "generation": 1 },
            "spec": {
                "parentRefs": [ { "name": "web", "sectionName": "https" } ],
                "rules": [ { "matches": [ { "method": { "service": "shop.Cart" } } ],
                             "backendRefs": [ { "name": "api", "port": 80 } ] } ]
            }
        }),
    );

    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path())];
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;

    let record = || async {
        ca.core
            .services
            .get("web.shop.gateway")
            .await
            .unwrap()
            .map(|r| r.service)
    };
    eventually("the Gateway's record with three routes", || async {
        match record().await {
            Some(s) if s.routes.len() == 3 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let s = record().await.unwrap();
    let ports: Vec<u16> = s.ports.iter().map(|p| p.port).collect();
    assert_eq!(ports, [443, 80], "the TCP listener is not served");
    assert!(s.endpoints.is_empty());
    let got: Vec<(String, Option<u16>, Vec<String>)> = s
        .routes
        .iter()
        .map(|r| (r.name.clone(), r.port, r.hostnames.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "grpcroute/shop/cart".to_owned(),
                Some(443),
                vec!["*.example.com".to_owned()]
            ),
            (
                "httproute/shop/store".to_owned(),
                Some(443),
                vec!["store.example.com".to_owned()]
            ),
            (
                "httproute/shop/store".to_owned(),
                Some(80),
                vec!["store.example.com".to_owned()]
            ),
        ],
        "created in the same second: ordered by namespace and name, as the Gateway API says"
    );
    assert_eq!(s.routes[1].rules[0].backends[0].service, "api.shop");
    assert!(
        ca.core
            .services
            .get("theirs.shop.gateway")
            .await
            .unwrap()
            .is_none(),
        "another controller's Gateway is not Ward's to serve"
    );

    eventually(
        "status on the class, the Gateway and the routes",
        || async {
            let class = fake.get("gatewayclasses", None, "ward").unwrap();
            let gw = fake.get("gateways", Some("shop"), "web").unwrap();
            let ok = condition(&class["status"], "Accepted")["status"] == "True"
                && condition(&gw["status"], "Programmed")["status"] == "True"
                && route_condition(&fake, "httproutes", "store")["status"] == "True"
                && route_condition(&fake, "httproutes", "stray")["reason"]
                    == "NoMatchingListenerHostname"
                && route_condition(&fake, "grpcroutes", "cart")["status"] == "True";
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "class {} gateway {}",
                    class["status"], gw["status"]
                ))
            }
        },
    )
    .await;
    let gw = fake.get("gateways", Some("shop"), "web").unwrap();
    assert_eq!(
        condition(&gw["status"], "Accepted")["observedGeneration"],
        3
    );
    let listeners = gw["status"]["listeners"].as_array().unwrap();
    let l = |n: &str| listeners.iter().find(|l| l["name"] == n).unwrap().clone();
    assert_eq!(l("https")["attachedRoutes"], 2, "store and cart");
    assert_eq!(l("http")["attachedRoutes"], 1);
    assert_eq!(
        condition(&l("raw"), "Accepted")["reason"],
        "UnsupportedProtocol"
    );
    assert_eq!(condition(&l("https"), "ResolvedRefs")["status"], "True");
    assert_eq!(l("https")["supportedKinds"][0]["kind"], "HTTPRoute");
    assert!(
        fake.get("gatewayclasses", None, "other").unwrap()["status"].is_null()
            && fake.get("gateways", Some("shop"), "theirs").unwrap()["status"].is_null()
            && fake.get("httproutes", Some("shop"), "foreign").unwrap()["status"].is_null(),
        "other controllers' objects get no status from Ward"
    );
    // Written once: our own updates come back as watch events and change nothing.
    let patches = || {
        fake.requests()
            .iter()
            .filter(|r| r.starts_with("PATCH") && r.contains("/gateways/web/status"))
            .count()
    };
    let before = patches();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(patches(), before, "Gateway status is not rewritten");

    // A route moving off the https listener changes the record and the counts.
    fake.delete("grpcroutes", Some("shop"), "cart");
    eventually("cart gone from the record", || async {
        match record().await {
            Some(s) if s.routes.len() == 2 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("https has one route", || async {
        let gw = fake.get("gateways", Some("shop"), "web").unwrap();
        let n = gw["status"]["listeners"][0]["attachedRoutes"].clone();
        if n == 1 { Ok(()) } else { Err(format!("{n}")) }
    })
    .await;

    // The Gateway deleted: its record goes.
    fake.delete("gateways", Some("shop"), "web");
    eventually("record deleted", || async {
        match record().await {
            None => Ok(()),
            Some(s) => Err(format!("{s:?}")),
        }
    })
    .await;
    ca.shutdown().await;
}
