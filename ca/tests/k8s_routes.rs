//! Gateway API mesh routes against the fake API server, through the real kube client: an
//! HTTPRoute or GRPCRoute whose parent is a Service becomes that mesh service's routes, its
//! status says whether it was accepted and its backends resolved, a broken update keeps the
//! last accepted version in force, deleting it removes it, and a cluster without the Gateway
//! API CRDs still gets its services (and routes once the CRDs arrive).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::k8s::{cluster, ep, eventually, node, pod, service, slice};
use serde_json::json;
use ward_spiffe::route::PathMatch;
use ward_testing::kube::FakeKube;

fn http_route(name: &str, generation: i64, rules: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": { "name": name, "namespace": "shop", "generation": generation },
        "spec": {
            "parentRefs": [ { "group": "", "kind": "Service", "name": "api", "port": 80 } ],
            "rules": rules
        }
    })
}

/// The fake's view of a route's condition `kind` written by Ward.
fn condition(fake: &FakeKube, plural: &str, name: &str, kind: &str) -> Option<serde_json::Value> {
    let r = fake.get(plural, Some("shop"), name)?;
    r["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == "ward.dev/mesh")?["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

async fn routes_of(ca: &ward_ca::CaServer) -> Vec<ward_spiffe::route::HttpRoute> {
    ca.core
        .services
        .get("api.shop")
        .await
        .unwrap()
        .map(|r| r.service.routes)
        .unwrap_or_default()
}

fn cluster_with_services(fake: &FakeKube) {
    fake.put(&node("n1", "node-1"));
    for (n, uid) in [("api-1", "u1"), ("api-2", "u2")] {
        fake.put(&pod("shop", n, uid, "n1", "api"));
    }
    for (svc, ip, addr, p, uid) in [
        ("api", "10.96.0.10", "10.1.0.1", "api-1", "u1"),
        ("api-v1", "10.96.0.11", "10.1.0.1", "api-1", "u1"),
        ("api-v2", "10.96.0.12", "10.1.0.2", "api-2", "u2"),
    ] {
        fake.put_json("services", service(svc, ip));
        fake.put_json(
            "endpointslices",
            slice(
                &format!("{svc}-a"),
                svc,
                json!([ep(addr, p, uid, true, false)]),
            ),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_grpc_routes_attach_to_their_service_with_status() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    cluster_with_services(&fake);
    fake.put_json(
        "httproutes",
        http_route(
            "split",
            1,
            json!([ {
                "matches": [ { "path": { "type": "PathPrefix", "value": "/api" },
                               "headers": [ { "name": "x-canary", "value": "yes" } ] } ],
                "filters": [ { "type": "ResponseHeaderModifier",
                               "responseHeaderModifier": { "add": [ { "name": "x-route", "value": "split" } ] } } ],
                "backendRefs": [ { "name": "api-v1", "port": 80, "weight": 90 },
                                 { "name": "api-v2", "port": 80, "weight": 10 } ],
                "timeouts": { "request": "2s" }
            } ]),
        ),
    );
    // A route to a Service that does not exist: accepted, but its refs do not resolve.
    fake.put_json(
        "httproutes",
        http_route(
            "ghost",
            1,
            json!([ { "matches": [ { "path": { "type": "Exact", "value": "/ghost" } } ],
                      "backendRefs": [ { "name": "nowhere", "port": 80 } ] } ]),
        ),
    );
    fake.put_json(
        "grpcroutes",
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": { "name": "cart", "namespace": "shop", "generation": 1 },
            "spec": {
                "parentRefs": [ { "group": "", "kind": "Service", "name": "api" } ],
                "rules": [ { "matches": [ { "method": { "service": "shop.Cart", "method": "Add" } } ],
                             "backendRefs": [ { "name": "api-v2", "port": 80 } ] } ]
            }
        }),
    );
    // A route on a Gateway is not Ward's business.
    fake.put_json(
        "httproutes",
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": { "name": "edge", "namespace": "shop", "generation": 1 },
            "spec": { "parentRefs": [ { "name": "public-gateway" } ], "rules": [] }
        }),
    );

    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path())];
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;

    eventually("three routes on api.shop", || async {
        let names: Vec<String> = routes_of(&ca).await.into_iter().map(|r| r.name).collect();
        if names.len() == 3 {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await;
    let routes = routes_of(&ca).await;
    let split = routes
        .iter()
        .find(|r| r.name == "httproute/shop/split")
        .unwrap();
    assert_eq!(split.port, Some(80));
    let b: Vec<(String, u32)> = split.rules[0]
        .backends
        .iter()
        .map(|b| (b.service.clone(), b.weight))
        .collect();
    assert_eq!(
        b,
        [
            ("api-v1.shop".to_owned(), 90),
            ("api-v2.shop".to_owned(), 10)
        ]
    );
    assert_eq!(
        split.rules[0].timeout,
        Some(std::time::Duration::from_secs(2))
    );
    let cart = routes
        .iter()
        .find(|r| r.name == "grpcroute/shop/cart")
        .unwrap();
    assert_eq!(
        cart.rules[0].matches[0].path,
        Some(PathMatch::Exact("/shop.Cart/Add".into()))
    );

    eventually("status written", || async {
        let a = condition(&fake, "httproutes", "split", "Accepted");
        let r = condition(&fake, "httproutes", "split", "ResolvedRefs");
        let g = condition(&fake, "httproutes", "ghost", "ResolvedRefs");
        let c = condition(&fake, "grpcroutes", "cart", "Accepted");
        match (a, r, g, c) {
            (Some(a), Some(r), Some(g), Some(c))
                if a["status"] == "True"
                    && r["status"] == "True"
                    && g["reason"] == "BackendNotFound"
                    && c["status"] == "True" =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let a = condition(&fake, "httproutes", "split", "Accepted").unwrap();
    assert_eq!(a["observedGeneration"], 1);
    assert!(
        fake.get("httproutes", Some("shop"), "edge").unwrap()["status"].is_null(),
        "a Gateway's route has no status from Ward"
    );
    // Once written, status is not written again and again (our own update comes back as a
    // watch event).
    let patches = || {
        fake.requests()
            .iter()
            .filter(|r| r.starts_with("PATCH") && r.contains("/httproutes/split/status"))
            .count()
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let settled = patches();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(patches(), settled, "status is rewritten in a loop");
    assert!(settled <= 2, "{settled} status writes for one route");

    // A broken update: not accepted, and the last accepted version stays in force.
    fake.put_json(
        "httproutes",
        http_route(
            "split",
            2,
            json!([ { "filters": [ { "type": "RequestMirror",
                                     "requestMirror": { "backendRef": { "name": "api-v2", "port": 80 } } } ],
                      "backendRefs": [ { "name": "api-v2", "port": 80 } ] } ]),
        ),
    );
    eventually("the broken update is refused", || async {
        match condition(&fake, "httproutes", "split", "Accepted") {
            Some(c)
                if c["status"] == "False"
                    && c["reason"] == "UnsupportedValue"
                    && c["observedGeneration"] == 2 =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let c = condition(&fake, "httproutes", "split", "Accepted").unwrap();
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.contains("RequestMirror") && msg.contains("stays in force"),
        "{msg}"
    );
    let split = routes_of(&ca)
        .await
        .into_iter()
        .find(|r| r.name == "httproute/shop/split")
        .expect("the last accepted version is still there");
    assert_eq!(split.rules[0].backends.len(), 2);

    // Deleted: gone from the service, which keeps its own endpoints.
    assert!(fake.delete("httproutes", Some("shop"), "split"));
    eventually("split removed", || async {
        let names: Vec<String> = routes_of(&ca).await.into_iter().map(|r| r.name).collect();
        if names.iter().all(|n| n != "httproute/shop/split") && names.len() == 2 {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await;
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_the_gateway_api_still_gets_services_then_routes() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    fake.set_served("httproutes", false);
    fake.set_served("grpcroutes", false);
    cluster_with_services(&fake);
    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path())];
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    eventually("services published without route CRDs", || async {
        match ca.core.services.get("api-v1.shop").await.unwrap() {
            Some(_) => Ok(()),
            None => Err("no api-v1.shop".into()),
        }
    })
    .await;
    // The CRDs are installed and a route created: the watcher picks it up.
    fake.put_json(
        "httproutes",
        http_route(
            "later",
            1,
            json!([ { "backendRefs": [ { "name": "api-v2", "port": 80 } ] } ]),
        ),
    );
    fake.set_served("httproutes", true);
    eventually("the route arrives", || async {
        let names: Vec<String> = routes_of(&ca).await.into_iter().map(|r| r.name).collect();
        if names == ["httproute/shop/later"] {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await;
    ca.shutdown().await;
}
