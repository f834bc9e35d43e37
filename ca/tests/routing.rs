//! Mesh routing end to end (Gateway API rules attached to a service, as `ward-ca service
//! apply` or the HTTPRoute controller writes them): a real CA and agent, real proxies, apps
//! that echo what reached them. Weighted splits, header matches, redirects, rewrites and
//! header filters, per-rule timeouts, the 404/500 answers, and a change of routes taking
//! effect without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use bytes::Bytes;
use common::mesh::{TD, app, backend, frontend_logged, mesh, send};
use http_body_util::Full;
use ward_ca::services::ServiceOp;
use ward_proxy::config::DiscoveryCfg;
use ward_spiffe::service::Service;

fn svc(name: &str, endpoint: Option<(std::net::SocketAddr, &str)>) -> Service {
    let eps: Vec<serde_json::Value> = endpoint
        .iter()
        .map(|(a, id)| {
            serde_json::json!({
                "address": a.ip().to_string(), "ports": { "http": a.port() },
                "ids": [format!("spiffe://{TD}/{id}")],
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "name": name, "ports": [ { "name": "http", "port": 80 } ], "endpoints": eps,
    }))
    .unwrap()
}

/// The parent service: no endpoints of its own, everything by route.
fn parent(v1_weight: u32, v2_weight: u32) -> Service {
    let mut s = svc("api.shop", None);
    s.addresses = vec!["10.96.0.10".parse().unwrap()];
    s.routes = serde_yaml_ng::from_str(&format!(
        r#"
- name: shop/api
  rules:
    - matches: [ {{ path: {{ type: prefix, value: /split }} }} ]
      backends: [ {{ service: api-v1.shop, port: 80, weight: {v1_weight} }},
                  {{ service: api-v2.shop, port: 80, weight: {v2_weight} }} ]
    - matches: [ {{ path: {{ type: exact, value: /canary }}, headers: [ {{ name: x-canary, value: "yes" }} ] }} ]
      backends: [ {{ service: api-v2.shop, port: 80 }} ]
    - matches: [ {{ path: {{ type: prefix, value: /old }} }} ]
      filters: [ {{ type: redirect, status: 301, path: {{ type: prefix, value: /new }} }} ]
    - matches: [ {{ path: {{ type: prefix, value: /rw }} }} ]
      backends: [ {{ service: api-v1.shop, port: 80 }} ]
      filters:
        - {{ type: rewrite, hostname: internal.shop, path: {{ type: prefix, value: /inner }} }}
        - {{ type: request_headers, set: [ {{ name: x-added, value: "1" }} ], remove: [ x-drop ] }}
        - {{ type: response_headers, add: [ {{ name: x-route, value: rw }} ] }}
    - matches: [ {{ path: {{ type: prefix, value: /slow }} }} ]
      backends: [ {{ service: slow.shop, port: 80 }} ]
      timeout: 300
    - matches: [ {{ path: {{ type: prefix, value: /nobackend }} }} ]
    - matches: [ {{ path: {{ type: prefix, value: /ghost }} }} ]
      backends: [ {{ service: ghost.shop, port: 80 }} ]
"#
    ))
    .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_follow_route_rules() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent) = mesh(dir.path(), &["client", "api-v1", "api-v2", "slow"]).await;
    let sock = agent.socket_path.clone();
    let hits = || Arc::new(AtomicUsize::new(0));
    let v1 = backend(&sock, "api-v1", app("v1", Duration::ZERO, hits()).await).await;
    let v2 = backend(&sock, "api-v2", app("v2", Duration::ZERO, hits()).await).await;
    let slow = backend(
        &sock,
        "slow",
        app("slow", Duration::from_secs(3), hits()).await,
    )
    .await;
    let ep = |p: &ward_proxy::Proxy, id: &'static str| Some((p.inbound_addr("in").unwrap(), id));
    ca.core
        .services
        .write(
            vec![
                ServiceOp::Put(parent(90, 10)),
                ServiceOp::Put(svc("api-v1.shop", ep(&v1, "api-v1"))),
                ServiceOp::Put(svc("api-v2.shop", ep(&v2, "api-v2"))),
                ServiceOp::Put(svc("slow.shop", ep(&slow, "slow"))),
            ],
            "admin",
        )
        .await
        .unwrap();

    // Routes are checked when written: a bad one is refused and nothing changes.
    let mut bad = parent(1, 1);
    bad.routes[0].rules[0].matches[0].path = Some(ward_spiffe::route::PathMatch::Regex("(".into()));
    let e = ca
        .core
        .services
        .write(vec![ServiceOp::Put(bad)], "admin")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("route shop/api") && e.contains("regex"), "{e}");

    let log = dir.path().join("access.log");
    let d = DiscoveryCfg {
        request_timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    };
    let (fp, out) = frontend_logged(&sock, d, Some(&log)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut first = send(&client, out, "GET", "/split", &[]).await;
    for _ in 0..100 {
        if first.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        first = send(&client, out, "GET", "/split", &[]).await;
    }
    assert_eq!(first.status, 200, "{}", first.body);

    // A 90/10 split: 400 requests give v2 40 ± 6 (one standard deviation); 20..60 is more
    // than three either side.
    let mut by: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let g = send(&client, out, "GET", "/split/x", &[]).await;
        assert_eq!(g.status, 200, "{}", g.body);
        *by.entry(g.body).or_default() += 1;
    }
    let v2n = by.get("v2").copied().unwrap_or(0);
    assert!((20..=60).contains(&v2n), "v2 got {v2n} of 400: {by:?}");
    assert_eq!(by.get("v1").copied().unwrap_or(0) + v2n, 400, "{by:?}");

    // Header match; without it no rule matches: 404.
    let g = send(&client, out, "GET", "/canary", &[("x-canary", "yes")]).await;
    assert_eq!((g.status, g.body.as_str()), (200, "v2"));
    let g = send(&client, out, "GET", "/canary", &[("x-canary", "no")]).await;
    assert_eq!(g.status, 404, "{}", g.body);
    assert!(
        g.body
            .contains("no route rule of api.shop matches GET /canary"),
        "{}",
        g.body
    );
    let g = send(&client, out, "GET", "/elsewhere", &[]).await;
    assert_eq!(g.status, 404);

    // Redirect, the prefix replaced and the query kept.
    let g = send(&client, out, "GET", "/old/page?q=1", &[]).await;
    assert_eq!(g.status, 301, "{}", g.body);
    assert_eq!(g.headers["location"], "http://api.shop/new/page?q=1");

    // Rewrite and header filters: what the app saw, and what the caller got back.
    let g = send(
        &client,
        out,
        "GET",
        "/rw/a?z=1",
        &[("x-drop", "1"), ("x-keep", "k")],
    )
    .await;
    assert_eq!((g.status, g.body.as_str()), (200, "v1"), "{:?}", g.headers);
    assert_eq!(g.headers["x-echo-path"], "/inner/a?z=1");
    assert_eq!(g.headers["x-echo-host"], "internal.shop");
    assert_eq!(g.headers["x-echo-x-added"], "1");
    assert_eq!(g.headers["x-echo-x-keep"], "k");
    assert!(g.headers.get("x-echo-x-drop").is_none(), "{:?}", g.headers);
    assert_eq!(g.headers["x-route"], "rw");

    // The rule's timeout, not the configured 10 s.
    let started = std::time::Instant::now();
    let g = send(&client, out, "GET", "/slow", &[]).await;
    assert_eq!(g.status, 504, "{}", g.body);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(g.body.contains("timed out after 300ms"), "{}", g.body);

    // Rules that cannot forward: 500 with the reason.
    let g = send(&client, out, "GET", "/nobackend", &[]).await;
    assert_eq!(g.status, 500);
    assert!(g.body.contains("has no backend"), "{}", g.body);
    let g = send(&client, out, "GET", "/ghost", &[]).await;
    assert_eq!(g.status, 500);
    assert!(
        g.body.contains("ghost.shop:80") && g.body.contains("not a mesh service"),
        "{}",
        g.body
    );

    // New weights take effect without a restart.
    ca.core
        .services
        .write(vec![ServiceOp::Put(parent(0, 1))], "admin")
        .await
        .unwrap();
    let mut all_v2 = false;
    for _ in 0..100 {
        let mut seen = Vec::new();
        for _ in 0..20 {
            seen.push(send(&client, out, "GET", "/split", &[]).await.body);
        }
        if seen.iter().all(|b| b == "v2") {
            all_v2 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(all_v2, "the new weights never applied");

    // Per-rule metrics.
    let (_, metrics) = common::mesh::admin_get(&fp, "/metrics").await;
    for want in [
        "ward_proxy_route_requests_total{route=\"shop/api#0\",outcome=\"2xx\"}",
        "ward_proxy_route_requests_total{route=\"shop/api#2\",outcome=\"3xx\"} 1",
        "ward_proxy_route_requests_total{route=\"shop/api#4\",outcome=\"5xx\"} 1",
        "ward_proxy_route_request_duration_seconds_count{route=\"shop/api#3\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} not in\n{metrics}");
    }

    // The access log names the rule that applied and the endpoint.
    fp.shutdown().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let rw = text
        .lines()
        .find(|l| l.contains("\"route\":\"shop/api#3\""))
        .unwrap_or_else(|| panic!("no record of rule 3:\n{text}"));
    assert!(
        rw.contains(&v1.inbound_addr("in").unwrap().to_string()),
        "{rw}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("\"plan\":\"redirect\"") && l.contains("\"status\":301"))
    );
    for p in [v1, v2, slow] {
        p.shutdown().await;
    }
    agent.shutdown().await;
    ca.shutdown().await;
}

/// A rule's retry policy: requests it selects are sent again on its codes, whatever their
/// method, as many times as it says, with its backoff between; other rules keep the
/// configured retries (idempotent requests, 502/503/504 only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_retry_policy_sends_requests_again() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent) = mesh(dir.path(), &["client", "flaky"]).await;
    let sock = agent.socket_path.clone();
    let hits = Arc::new(AtomicUsize::new(0));
    // Every third request succeeds: 500, 500, 200, 500, 500, 200, ...
    let status: common::mesh::StatusOf = Arc::new(|n| if n % 3 == 2 { 200 } else { 500 });
    let flaky = backend(
        &sock,
        "flaky",
        common::mesh::app_by("flaky", Duration::ZERO, status, hits.clone()).await,
    )
    .await;
    let mut parent = svc("api.shop", None);
    parent.routes = serde_yaml_ng::from_str(
        r#"
- name: shop/api
  rules:
    - matches: [ { path: { type: prefix, value: /retry } } ]
      backends: [ { service: flaky.shop, port: 80 } ]
      retry: { codes: [ 500 ], attempts: 2, backoff: 60 }
    - matches: [ { path: { type: prefix, value: /once } } ]
      backends: [ { service: flaky.shop, port: 80 } ]
      retry: { codes: [ 500 ], attempts: 1 }
    - matches: [ { path: { type: prefix, value: /other-code } } ]
      backends: [ { service: flaky.shop, port: 80 } ]
      retry: { codes: [ 503 ], attempts: 2 }
    - matches: [ { path: { type: prefix, value: /plain } } ]
      backends: [ { service: flaky.shop, port: 80 } ]
    - matches: [ { path: { type: prefix, value: /nobackend } } ]
"#,
    )
    .unwrap();
    let ep = Some((flaky.inbound_addr("in").unwrap(), "flaky"));
    ca.core
        .services
        .write(
            vec![
                ServiceOp::Put(parent),
                ServiceOp::Put(svc("flaky.shop", ep)),
            ],
            "admin",
        )
        .await
        .unwrap();
    let (fp, out) = frontend_logged(&sock, DiscoveryCfg::default(), None).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut ready = false;
    for _ in 0..100 {
        if send(&client, out, "GET", "/nobackend", &[])
            .await
            .body
            .contains("has no backend")
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the routes never arrived");
    let post = |path: &'static str| {
        let client = client.clone();
        async move {
            common::mesh::send_body(
                &client,
                out,
                "POST",
                path,
                &[],
                Bytes::from_static(b"order"),
            )
            .await
        }
    };
    let seen = || hits.load(std::sync::atomic::Ordering::Relaxed);

    // Two 500s, then the answer: a POST, sent three times, with the backoff between.
    let started = std::time::Instant::now();
    let g = post("/retry").await;
    assert_eq!((g.status, g.body.as_str()), (200, "flaky"));
    assert_eq!(
        g.headers["x-echo-body-len"], "5",
        "the body went every time"
    );
    assert_eq!(seen(), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(120),
        "{:?}",
        started.elapsed()
    );

    // No policy: a POST's 500 is the answer; nor is a code the policy does not name retried.
    assert_eq!(post("/plain").await.status, 500);
    assert_eq!(seen(), 4);
    assert_eq!(post("/other-code").await.status, 500);
    assert_eq!(seen(), 5);
    assert_eq!(send(&client, out, "GET", "/plain", &[]).await.status, 200);
    assert_eq!(seen(), 6);

    // One retry at most: 500, 500, and the second is the answer.
    assert_eq!(post("/once").await.status, 500);
    assert_eq!(seen(), 8);
    assert_eq!(common::mesh::retries_of(&fp, "flaky.shop"), 3);

    fp.shutdown().await;
    flaky.shutdown().await;
    agent.shutdown().await;
    ca.shutdown().await;
}
