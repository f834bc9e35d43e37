//! An agent given several CA addresses when the first is there but silent: it accepts TCP
//! connections and never answers the TLS handshake (a wedged process, or a node cut off behind
//! a proxy). The agent must reach the next address within its per-server bound instead of
//! spending its whole connect timeout on the first and never trying another.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_first_server_is_silent_attests_and_syncs_at_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), "failover.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    // Accepts, holds every connection, reads nothing and writes nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });

    let mut cfg = common::agent_config(&ca, dir.path()).await;
    cfg.server_address = format!("{silent_addr},{}", ca.node_addr);
    let started = Instant::now();
    let agent = tokio::time::timeout(Duration::from_secs(20), common::start_agent(cfg))
        .await
        .expect("the agent attested through the second address");
    let took = started.elapsed();
    eprintln!("attested and synced past a silent first server in {took:?}");
    assert!(
        took >= ward_net::connector::SERVER_CONNECT_TIMEOUT,
        "the silent server was tried first and given its bound ({took:?})"
    );
    assert!(agent.identity.id().is_some());

    // The agent keeps talking to the server that answered: a new entry reaches it without
    // another wait on the silent one.
    let parent = agent.identity.id().unwrap().to_string();
    let mut admin = ward_proto::admin::admin_client::AdminClient::new(
        ward_net::process::unix_channel(&ca.admin_socket),
    );
    admin
        .create_entry(ward_proto::admin::EntrySpec {
            spiffe_id: "spiffe://failover.test/late".into(),
            parent_id: parent,
            selectors: vec![common::my_uid_selector()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut snaps = agent.cache.subscribe();
    tokio::time::timeout(
        Duration::from_secs(5),
        snaps.wait_for(|s| {
            s.entries
                .values()
                .any(|e| e.spiffe_id.to_string().ends_with("/late"))
        }),
    )
    .await
    .expect("the entry reached the agent")
    .unwrap();
    agent.shutdown().await;
    ca.shutdown().await;
    held.abort();
}
