//! Mesh services from the CA to the agent's `Destinations` API: declared through the admin API
//! and `ward-ca service`, sent to agents on the sync stream as they change, and answered per
//! authority (name or virtual IP) with "no such service" and "no endpoints" told apart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use ward_ca::entries::EntrySpec;
use ward_ca::services::ServiceOp;
use ward_proto::agent::destination_update::Kind;
use ward_proto::agent::destinations_client::DestinationsClient;
use ward_proto::agent::{DestinationUpdate, GetDestinationRequest};
use ward_spiffe::service::Service;

fn svc(yaml: &str) -> Service {
    serde_yaml_ng::from_str(yaml).unwrap()
}

async fn next(s: &mut tonic::Streaming<DestinationUpdate>) -> Kind {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("an update in time")
        .unwrap()
        .unwrap()
        .kind
        .unwrap()
}

/// The first answer once the agent has heard of the service: the CA's write may reach the
/// agent after the stream opened, and until then "no such service" is the right answer.
async fn next_known(s: &mut tonic::Streaming<DestinationUpdate>) -> Kind {
    loop {
        match next(s).await {
            Kind::NoSuchService(_) => continue,
            k => return k,
        }
    }
}

fn addrs(k: &Kind) -> Vec<(String, Vec<String>, bool)> {
    match k {
        Kind::Endpoints(e) => e
            .endpoints
            .iter()
            .map(|e| (e.address.clone(), e.spiffe_ids.clone(), e.draining))
            .collect(),
        other => panic!("expected endpoints, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_reach_the_agent_and_are_answered_per_authority() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), "svc.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let cfg = common::agent_config(&ca, dir.path()).await;
    let agent = common::start_agent(cfg).await;
    let parent = agent.identity.id().unwrap().to_string();
    ca.core
        .entries
        .create(
            &EntrySpec {
                spiffe_id: "spiffe://svc.test/client".into(),
                parent_id: parent,
                selectors: vec![common::my_uid_selector()],
                ..Default::default()
            },
            "admin",
            "client".into(),
            ca.core.clock.now(),
        )
        .await
        .unwrap();
    let mut rx = agent.cache.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.svids.contains_key("client")),
    )
    .await
    .unwrap()
    .unwrap();

    let api = svc(r#"
name: api.shop
addresses: [10.96.0.10]
ports: [ { name: http, port: 80, target_port: 8080 } ]
endpoints:
  - { address: 10.0.0.1, ids: [spiffe://svc.test/api] }
  - { address: 10.0.0.2, ids: [spiffe://svc.test/api] }
"#);
    let db = svc("{ name: db.shop, ports: [ { port: 5432 } ] }");
    ca.core
        .services
        .write(
            vec![ServiceOp::Put(api.clone()), ServiceOp::Put(db)],
            "admin",
        )
        .await
        .unwrap();

    let mut client = DestinationsClient::new(ward_net::process::unix_channel(&agent.socket_path));
    let get = |authority: &str| {
        let mut c = client.clone();
        let authority = authority.to_owned();
        async move {
            c.get(common::with_header(GetDestinationRequest { authority }))
                .await
                .unwrap()
                .into_inner()
        }
    };
    // By virtual IP and by name: the endpoints on their target ports, with their IDs.
    let mut by_ip = get("10.96.0.10:80").await;
    let first = next_known(&mut by_ip).await;
    assert_eq!(
        addrs(&first),
        [
            (
                "10.0.0.1:8080".to_owned(),
                vec!["spiffe://svc.test/api".to_owned()],
                false
            ),
            (
                "10.0.0.2:8080".to_owned(),
                vec!["spiffe://svc.test/api".to_owned()],
                false
            )
        ]
    );
    let mut by_name = get("api.shop.svc.cluster.local:80").await;
    assert_eq!(addrs(&next(&mut by_name).await), addrs(&first));
    // Distinct answers for what is not there.
    let mut nope = get("web.shop:80").await;
    assert!(matches!(next(&mut nope).await, Kind::NoSuchService(_)));
    let mut empty = get("db.shop:5432").await;
    assert!(matches!(next(&mut empty).await, Kind::NoEndpoints(e) if e.service == "db.shop"));

    // A change reaches the open streams: one endpoint terminating, one added.
    let mut changed = api.clone();
    changed.endpoints[1].ready = false;
    changed.endpoints[1].terminating = true;
    changed.endpoints.push(svc("{ name: x, ports: [ { port: 1 } ], endpoints: [ { address: 10.0.0.3, ids: [spiffe://svc.test/api] } ] }").endpoints[0].clone());
    ca.core
        .services
        .write(vec![ServiceOp::Put(changed)], "admin")
        .await
        .unwrap();
    let got = addrs(&next(&mut by_ip).await);
    assert_eq!(
        got.iter()
            .map(|(a, _, d)| (a.as_str(), *d))
            .collect::<Vec<_>>(),
        [
            ("10.0.0.1:8080", false),
            ("10.0.0.2:8080", true),
            ("10.0.0.3:8080", false)
        ]
    );
    // Deleted: the stream says so.
    ca.core.services.delete("api.shop", "admin").await.unwrap();
    assert!(matches!(next(&mut by_ip).await, Kind::NoSuchService(_)));

    // A caller without an identity is refused; a malformed authority is an argument error.
    let e = client
        .get(GetDestinationRequest {
            authority: "api.shop:80".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "no security header");
    let e = client
        .get(common::with_header(GetDestinationRequest {
            authority: "no-port".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    agent.shutdown().await;
    ca.shutdown().await;
}

#[test]
fn service_cli_applies_lists_and_deletes() {
    use common::cli::CaProcess;
    let ca = CaProcess::start();
    let file = ca.root.path().join("services.yaml");
    std::fs::write(
        &file,
        r#"
services:
  - name: api.shop
    addresses: [10.96.0.10]
    ports: [ { name: http, port: 80, target_port: 8080 } ]
    endpoints:
      - { address: 10.0.0.1, ids: [spiffe://cli.test/api] }
    routes:
      - name: shop/api
        rules:
          - matches: [ { path: { type: prefix, value: /v2 }, headers: [ { name: x-canary, value: "yes" } ] } ]
            backends: [ { service: api-v2.shop, port: 80, weight: 90 }, { service: api.shop, port: 80, weight: 10 } ]
            filters: [ { type: request_headers, set: [ { name: x-via, value: route } ] } ]
            timeout: 2000
"#,
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let out = ca.cli(&["service", "apply", "-f", f]);
    out.ok();
    assert!(out.stdout.contains("Applied service api.shop"), "{out:?}");
    let out = ca.cli(&["service", "list", "-o", "json"]);
    out.ok();
    let v = out.json();
    assert_eq!(v["services"][0]["name"], "api.shop");
    assert_eq!(
        v["services"][0]["endpoints"][0]["ids"][0],
        "spiffe://cli.test/api"
    );
    assert_eq!(v["services"][0]["origin"], "admin");
    let rule = &v["services"][0]["routes"][0]["rules"][0];
    assert_eq!(rule["backends"][0]["weight"], 90, "{v}");
    assert_eq!(rule["matches"][0]["path"]["value"], "/v2");
    assert_eq!(rule["filters"][0]["type"], "request_headers");
    assert_eq!(rule["timeout"], 2000);
    // Invalid files are refused with the reason, and nothing changes.
    std::fs::write(
        &file,
        "services:\n  - { name: BAD, ports: [ { port: 80 } ] }\n",
    )
    .unwrap();
    ca.cli(&["service", "apply", "-f", f])
        .fails(2)
        .stderr_has("lowercase");
    std::fs::write(&file, "services:\n  - { name: x, ports: [ { port: 80 } ], endpoints: [ { address: 10.0.0.1, ids: [] } ] }\n").unwrap();
    ca.cli(&["service", "apply", "-f", f])
        .fails(2)
        .stderr_has("no SPIFFE ID");
    std::fs::write(&file, "services:\n  - { name: x, ports: [ { port: 80 } ], routes: [ { name: r, rules: [ { matches: [ { path: { type: regex, value: '[' } } ] } ] } ] }\n").unwrap();
    ca.cli(&["service", "apply", "-f", f])
        .fails(2)
        .stderr_has("route r: rule 0: path regex");
    ca.cli(&["service", "delete", "api.shop"]).ok();
    ca.cli(&["service", "delete", "api.shop"]).fails(3);
    let v = ca.cli(&["service", "list", "-o", "json"]).json();
    assert_eq!(v["services"], serde_json::json!([]));
}
