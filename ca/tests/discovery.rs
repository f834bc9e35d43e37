//! Service discovery end to end, with a real CA, a real agent and real proxies on loopback: a
//! service declared in the CA reaches the agent, a frontend proxy resolves it on first use and
//! balances requests across the backends' proxies (P2C over peak-EWMA), each endpoint checked
//! for the SPIFFE ID the service gives it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::mesh::{TD, app, app_with, backend, cfg, frontend, get, mesh};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use ward_ca::entries::EntrySpec;
use ward_ca::services::ServiceOp;
use ward_proxy::config::{DiscoveryCfg, Listener, Outbound, Protocol};
use ward_spiffe::SpiffeId;
use ward_spiffe::service::Service;

fn service(endpoints: &[(SocketAddr, &str)]) -> Service {
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(a, id)| {
            serde_json::json!({
                "address": a.ip().to_string(), "ports": { "http": a.port() },
                "ids": [format!("spiffe://{TD}/{id}")],
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "name": "api.shop", "addresses": ["10.96.0.10"],
        "ports": [ { "name": "http", "port": 80 } ], "endpoints": eps,
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_balanced_across_verified_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), TD),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let agent = common::start_agent(common::agent_config(&ca, dir.path()).await).await;
    let parent = agent.identity.id().unwrap().to_string();
    for name in ["client", "api", "impostor"] {
        ca.core
            .entries
            .create(
                &EntrySpec {
                    spiffe_id: format!("spiffe://{TD}/{name}"),
                    parent_id: parent.clone(),
                    selectors: vec![common::my_uid_selector()],
                    ..Default::default()
                },
                "admin",
                name.into(),
                ca.core.clock.now(),
            )
            .await
            .unwrap();
    }
    let mut rx = agent.cache.subscribe();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.svids.len() == 3))
        .await
        .unwrap()
        .unwrap();

    let hits: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let apps = [
        app("a1", Duration::ZERO, hits[0].clone()).await,
        app("a2", Duration::ZERO, hits[1].clone()).await,
        app("a3", Duration::from_millis(20), hits[2].clone()).await,
        app("imp", Duration::ZERO, hits[3].clone()).await,
    ];
    let sock = agent.socket_path.clone();
    let b1 = backend(&sock, "api", apps[0]).await;
    let b2 = backend(&sock, "api", apps[1]).await;
    let b3 = backend(&sock, "api", apps[2]).await;
    // An endpoint the service says is api, whose proxy presents another ID.
    let bi = backend(&sock, "impostor", apps[3]).await;
    let eps = |v: &[&ward_proxy::Proxy]| -> Vec<(SocketAddr, &'static str)> {
        v.iter()
            .map(|p| (p.inbound_addr("in").unwrap(), "api"))
            .collect()
    };
    ca.core
        .services
        .write(
            vec![ServiceOp::Put(service(&eps(&[&b1, &b2, &b3, &bi])))],
            "admin",
        )
        .await
        .unwrap();

    let mut fc = cfg(&sock, "client");
    fc.discovery = Some(DiscoveryCfg::default());
    fc.listeners = vec![Listener::Outbound(Outbound {
        name: "api".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: "api.shop:80".into(),
        expected_ids: vec![SpiffeId::new(&format!("spiffe://{TD}/api")).unwrap()],
        protocol: Protocol::Http,
    })];
    let frontend = ward_proxy::Proxy::start(fc).await.unwrap();
    let out = frontend.outbound_addr("api").unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    // The first request waits for the frontend's SVID and the destination's first answer.
    let mut first = (0, String::new());
    for _ in 0..100 {
        first = get(&client, out).await;
        if first.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(first.0, 200, "{}", first.1);

    // Four callers at once, 80 requests each (with more callers than fast endpoints, the
    // requests in flight rightly push some load onto the slow one).
    let loads = (0..4).map(|_| {
        let client = client.clone();
        async move {
            let mut got = Vec::new();
            for _ in 0..80 {
                got.push(get(&client, out).await);
            }
            got
        }
    });
    let mut by: HashMap<String, usize> = HashMap::new();
    for (s, body) in futures::future::join_all(loads).await.into_iter().flatten() {
        assert_eq!(s, 200, "{body}");
        *by.entry(body).or_default() += 1;
    }
    let n = |k: &str| by.get(k).copied().unwrap_or(0);
    // Spread over the fast endpoints; the slow one gets much less; the impostor nothing.
    assert!(n("a1") > 60 && n("a2") > 60, "{by:?}");
    // An even share would be a third; P2C over the latency estimate gives the slow one less
    // than a quarter even with four requests in flight.
    assert!(
        n("a3") * 4 < 320 && n("a3") < n("a1").min(n("a2")),
        "the 20 ms endpoint got {} of 320: {by:?}",
        n("a3")
    );
    assert_eq!(
        hits[3].load(Ordering::Relaxed),
        0,
        "the impostor was used: {by:?}"
    );
    assert!(n("imp") == 0);
    let refused: u64 = frontend
        .metrics
        .tls_failures
        .get_or_create(&ward_proxy::metrics::TlsFailureLabel {
            listener: "api".into(),
            reason: "unauthorized_id".into(),
        })
        .get();
    assert!(
        refused >= 1,
        "the impostor's handshake was refused and counted"
    );

    // The admin view shows each endpoint with what the balancer knows; metrics are per
    // endpoint.
    let (status, view) = common::mesh::admin_get(&frontend, "/destinations").await;
    assert_eq!(status, 200, "{view}");
    let v: serde_json::Value = serde_json::from_str(&view).unwrap();
    let d = v["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["authority"] == "api.shop:80")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        (d["state"].as_str(), d["service"].as_str()),
        (Some("endpoints"), Some("api.shop"))
    );
    let ewma = |p: &ward_proxy::Proxy| {
        let a = p.inbound_addr("in").unwrap().to_string();
        d["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == a.as_str())
            .unwrap_or_else(|| panic!("{a} not in {d}"))["ewma_ms"]
            .as_f64()
            .unwrap()
    };
    assert!(
        ewma(&b3) > ewma(&b1).max(ewma(&b2)),
        "the slow endpoint's estimate is the highest: {d}"
    );
    let (_, metrics) = common::mesh::admin_get(&frontend, "/metrics").await;
    let b1_ok = format!(
        "ward_proxy_endpoint_requests_total{{service=\"api.shop\",endpoint=\"{}\",outcome=\"2xx\"}}",
        b1.inbound_addr("in").unwrap()
    );
    assert!(metrics.contains(&b1_ok), "{b1_ok} not in\n{metrics}");
    assert!(
        metrics.contains("ward_proxy_endpoint_ewma_seconds{service=\"api.shop\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("ward_proxy_endpoint_request_duration_seconds_count{service=\"api.shop\"")
    );

    // One endpoint goes away mid-load: GETs keep succeeding (tried elsewhere), and it is
    // ejected after a few failures.
    b1.shutdown().await;
    let mut failed = 0;
    for _ in 0..100 {
        let (s, _) = get(&client, out).await;
        if s != 200 {
            failed += 1;
        }
    }
    assert_eq!(
        failed, 0,
        "idempotent requests must not fail when an endpoint dies"
    );

    // A new endpoint becomes ready: it gets traffic.
    let hits_new = Arc::new(AtomicUsize::new(0));
    let b4 = backend(
        &sock,
        "api",
        app("a4", Duration::ZERO, hits_new.clone()).await,
    )
    .await;
    ca.core
        .services
        .write(
            vec![ServiceOp::Put(service(&eps(&[&b2, &b3, &b4])))],
            "admin",
        )
        .await
        .unwrap();
    let mut seen_new = false;
    for _ in 0..200 {
        let (s, body) = get(&client, out).await;
        assert_eq!(s, 200, "{body}");
        if body == "a4" {
            seen_new = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen_new, "the new endpoint never got a request");

    // No endpoints: a clear 502, not a hang.
    ca.core
        .services
        .write(vec![ServiceOp::Put(service(&[]))], "admin")
        .await
        .unwrap();
    let mut last = (0, String::new());
    for _ in 0..100 {
        last = get(&client, out).await;
        if last.0 == 502 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last.0, 502, "{}", last.1);
    assert!(last.1.contains("no endpoint"), "{}", last.1);
    for p in [frontend, b2, b3, b4, bi] {
        p.shutdown().await;
    }
    agent.shutdown().await;
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_route_around_failures_within_the_budget_and_timeouts_answer_504() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent) = mesh(dir.path(), &["client", "api"]).await;
    let sock = agent.socket_path.clone();
    let (bad_hits, good_hits) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let bad = backend(
        &sock,
        "api",
        app_with("bad", Duration::ZERO, 503, bad_hits.clone()).await,
    )
    .await;
    // The good endpoint is slower than a new endpoint's first estimate (30 ms), so the
    // balancer does try the bad one: otherwise, once the good one had answered fast, it
    // would never pick the other and nothing here would be retried.
    let good = backend(
        &sock,
        "api",
        app("good", Duration::from_millis(40), good_hits.clone()).await,
    )
    .await;
    let put = |v: &[&ward_proxy::Proxy]| {
        let s = service(
            &v.iter()
                .map(|p| (p.inbound_addr("in").unwrap(), "api"))
                .collect::<Vec<_>>(),
        );
        let core = ca.core.clone();
        async move {
            core.services
                .write(vec![ServiceOp::Put(s)], "admin")
                .await
                .unwrap()
        }
    };
    put(&[&bad, &good]).await;
    let (fp, out) = frontend(&sock, DiscoveryCfg::default()).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut first = (0, String::new());
    for _ in 0..100 {
        first = get(&client, out).await;
        if first.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(first.0, 200, "{}", first.1);
    // One endpoint answers 503: every GET still succeeds (retried on the other, and the bad
    // one is ejected after three failures in a row).
    for _ in 0..100 {
        let (s, body) = get(&client, out).await;
        assert_eq!((s, body.as_str()), (200, "good"));
    }
    assert!(
        bad_hits.load(Ordering::Relaxed) <= 10,
        "the failing endpoint kept getting traffic"
    );
    let retried = common::mesh::retries(&fp);
    assert!((1..=10).contains(&retried), "{retried} retries");
    fp.shutdown().await;

    // A full outage: every endpoint answers 503. Retries stay within the budget (20 % of
    // requests plus a small reserve), so they cannot multiply the outage.
    let bad2_hits = Arc::new(AtomicUsize::new(0));
    let bad2 = backend(
        &sock,
        "api",
        app_with("bad2", Duration::ZERO, 503, bad2_hits.clone()).await,
    )
    .await;
    put(&[&bad, &bad2]).await;
    let budget = DiscoveryCfg {
        retries: ward_proxy::config::RetryCfg {
            min_per_second: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let (fp, out) = frontend(&sock, budget).await;
    let before = bad_hits.load(Ordering::Relaxed) + bad2_hits.load(Ordering::Relaxed);
    let mut answered = 0;
    for _ in 0..200 {
        let (s, _) = get(&client, out).await;
        if s == 503 {
            answered += 1;
        }
    }
    assert!(
        answered > 150,
        "the 503s reach the caller ({answered} of 200)"
    );
    let sent = bad_hits.load(Ordering::Relaxed) + bad2_hits.load(Ordering::Relaxed) - before;
    let retries = common::mesh::retries(&fp) as usize;
    assert!(sent >= 200, "{sent}");
    assert!(
        retries <= 200 / 5 + 10 + 2,
        "{retries} retries for 200 requests exceed the budget"
    );
    assert_eq!(sent, 200 + retries, "each request once, plus each retry");
    fp.shutdown().await;

    // A request timeout answers 504 on time.
    let slow = backend(
        &sock,
        "api",
        app(
            "slow",
            Duration::from_secs(3),
            Arc::new(AtomicUsize::new(0)),
        )
        .await,
    )
    .await;
    put(&[&slow]).await;
    let (fp, out) = frontend(
        &sock,
        DiscoveryCfg {
            request_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        },
    )
    .await;
    let mut got = (0, String::new());
    for _ in 0..50 {
        let started = std::time::Instant::now();
        got = get(&client, out).await;
        if got.0 == 504 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got.0, 504, "{}", got.1);
    assert!(got.1.contains("timed out after 300ms"), "{}", got.1);
    for p in [fp, bad, good, bad2, slow] {
        p.shutdown().await;
    }
    agent.shutdown().await;
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_are_retried_after_a_connect_failure_large_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent) = mesh(dir.path(), &["client", "api"]).await;
    let sock = agent.socket_path.clone();
    let good = backend(
        &sock,
        "api",
        app("good", Duration::ZERO, Arc::new(AtomicUsize::new(0))).await,
    )
    .await;
    // An endpoint nothing listens on any more: connections to it are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    ca.core
        .services
        .write(
            vec![ServiceOp::Put(service(&[
                (dead, "api"),
                (good.inbound_addr("in").unwrap(), "api"),
            ]))],
            "admin",
        )
        .await
        .unwrap();
    // Round robin makes the order of picks known: dead, good, dead, good.
    let (fp, out) = frontend(
        &sock,
        DiscoveryCfg {
            balancer: ward_proxy::balance::Balancer::RoundRobin,
            ..Default::default()
        },
    )
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let post = |n: usize| {
        common::mesh::send_body(&client, out, "POST", "/x", &[], Bytes::from(vec![b'x'; n]))
    };
    // First pick: the dead endpoint; 10 KiB is buffered and sent again to the good one, whole.
    let g = post(10 * 1024).await;
    assert_eq!((g.status, g.body.as_str()), (200, "good"), "{g:?}");
    assert_eq!(g.headers["x-echo-body-len"], "10240");
    // The good one.
    let g = post(100 * 1024).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.headers["x-echo-body-len"], "102400");
    // The dead one again: 100 KiB streams and cannot be sent again.
    let g = post(100 * 1024).await;
    assert_eq!(g.status, 502, "{g:?}");
    assert!(g.body.contains("unavailable"), "{}", g.body);
    assert_eq!(common::mesh::retries(&fp), 1);
    for p in [fp, good] {
        p.shutdown().await;
    }
    agent.shutdown().await;
    ca.shutdown().await;
}
