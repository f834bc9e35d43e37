//! The health endpoints of a CA and an agent: `/healthz`, `/readyz`, and `/metrics` checked by
//! Prometheus' own `promtool check metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.0 GET; returns (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    get_with(addr, path, "").await
}

async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{headers}\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

fn promtool(text: &str) {
    ward_testing::promtool_check(text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), "m.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    assert_eq!(get(ca.health_addr, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(ca.health_addr, "/readyz").await.0, 200);
    assert_eq!(get(ca.health_addr, "/nope").await.0, 404);

    let cfg = common::agent_config(&ca, dir.path()).await;
    let agent = common::start_agent(cfg).await;
    let parent = agent.identity.id().unwrap().to_string();
    ca.core
        .entries
        .create(
            &ward_ca::entries::EntrySpec {
                spiffe_id: "spiffe://m.test/w".into(),
                parent_id: parent,
                selectors: vec![common::my_uid_selector()],
                ..Default::default()
            },
            "admin",
            "e1".into(),
            ca.core.clock.now(),
        )
        .await
        .unwrap();
    // Ready once the agent holds an SVID for every entry — once it has heard of the entry (an
    // agent that knows no entry is ready at once).
    let mut svids = agent.cache.subscribe();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        svids.wait_for(|s| s.svids.len() == 1),
    )
    .await
    .expect("the agent got the entry's SVID")
    .unwrap();
    let mut ready = false;
    for _ in 0..100 {
        if get(agent.health_addr, "/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ready, "agent never became ready");
    let mut c = common::workload_client(&agent.socket_path);
    let mut s = c
        .fetch_x509svid(common::with_header(
            ward_proto::workload::X509svidRequest {},
        ))
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap().unwrap();

    let (status, ca_metrics) = get(ca.health_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        ca_metrics.contains("ward_ca_svids_issued_total{kind=\"x509\"} 1"),
        "{ca_metrics}"
    );
    assert!(
        ca_metrics.contains("ward_ca_attestations_total{method=\"join_token\",result=\"ok\"} 1"),
        "{ca_metrics}"
    );
    assert!(
        ca_metrics.contains("ward_ca_sync_streams 1"),
        "{ca_metrics}"
    );
    assert!(
        ca_metrics.contains("state=\"active\"} 1")
            && ca_metrics.contains("ward_ca_authority_expiry_timestamp_seconds{kind=\"jwt\""),
        "{ca_metrics}"
    );
    promtool(&ca_metrics);
    let (status, agent_metrics) = get(agent.health_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        agent_metrics
            .contains("ward_agent_workload_api_calls_total{rpc=\"FetchX509SVID\",code=\"OK\"} 1"),
        "{agent_metrics}"
    );
    assert!(
        agent_metrics.contains("ward_agent_entries 1"),
        "{agent_metrics}"
    );
    // The sync stream's bytes are counted (at least the entry and the bundle arrived).
    let sync_bytes: u64 = agent_metrics
        .lines()
        .find_map(|l| l.strip_prefix("ward_agent_sync_bytes_total "))
        .and_then(|v| v.parse().ok())
        .expect("ward_agent_sync_bytes_total");
    assert!(sync_bytes > 200, "{agent_metrics}");
    assert!(
        agent_metrics
            .contains("ward_agent_svids_reissued_total{svid=\"workload\",reason=\"new\"} 1"),
        "{agent_metrics}"
    );
    promtool(&agent_metrics);
    // Scrapers that ask for OpenMetrics get it.
    let (status, om) = get_with(
        ca.health_addr,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE ward_ca_svids_issued counter"), "{om}");
    drop(s);
    agent.shutdown().await;
    ca.shutdown().await;
}
