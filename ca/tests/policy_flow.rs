//! Policies stored in the CA reach proxies through the agent: CA admin API → sync stream →
//! agent → `WatchPolicies` on the agent socket → proxy. Two proxies take their SVIDs from the
//! agent's Workload API (one caller, two identities chosen by SPIFFE ID).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use ward_ca::entries::EntrySpec;
use ward_proto::admin;
use ward_proxy::config::{
    Authorization, IdentitySource, Inbound, Listener, Outbound, Protocol, ProxyConfig, TlsMode,
};
use ward_spiffe::SpiffeId;

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "backend")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = s.send_request(req).await.unwrap();
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn proxy_cfg(socket: &std::path::Path, id: &str) -> ProxyConfig {
    ProxyConfig {
        identity: IdentitySource::WorkloadApi {
            socket: Some(format!("unix://{}", socket.display())),
            spiffe_id: Some(SpiffeId::new(id).unwrap()),
        },
        admin_address: "127.0.0.1:0".parse().unwrap(),
        authorization: Authorization {
            from_agent: true,
            ..Default::default()
        },
        peer_id_header: "x-ward-peer-id".into(),
        access_log: None,
        log_level: "info".into(),
        listeners: vec![],
        drain_timeout: std::time::Duration::from_secs(1),
        discovery: None,
        egress: None,
        http_limits: Default::default(),
        gateway: None,
        connection_limits: Default::default(),
        mesh_tls12: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_flow_from_the_ca_to_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), "pf.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let agent = common::start_agent(common::agent_config(&ca, dir.path()).await).await;
    let parent = agent.identity.id().unwrap().to_string();
    let now = ca.core.clock.now();
    for name in ["frontend", "backend"] {
        ca.core
            .entries
            .create(
                &EntrySpec {
                    spiffe_id: format!("spiffe://pf.test/{name}"),
                    parent_id: parent.clone(),
                    selectors: vec![common::my_uid_selector()],
                    hint: name.into(),
                    ..Default::default()
                },
                "admin",
                ward_ca::core::CaCore::new_entry_id(),
                now,
            )
            .await
            .unwrap();
    }
    let mut adm =
        admin::admin_client::AdminClient::new(ward_net::process::unix_channel(&ca.admin_socket));
    let doc: ward_spiffe::policy::PolicyDoc = serde_yaml_ng::from_str(
        r#"
policies:
  - name: backend-allow-frontend
    target: { spiffe_ids: ["spiffe://pf.test/backend"] }
    action: ALLOW
    rules:
      - from: [ { principals: ["spiffe://pf.test/frontend"] } ]
        to: [ { paths: ["/api/*"] } ]
"#,
    )
    .unwrap();
    let to_proto = |d: &ward_spiffe::policy::PolicyDoc| {
        d.policies
            .iter()
            .map(|p| ward_proto::convert::policy_to_proto(p, 0))
            .collect::<Vec<_>>()
    };
    adm.put_policies(admin::PutPoliciesRequest {
        policies: to_proto(&doc),
    })
    .await
    .unwrap();

    let app = common::peer_id_app().await;
    let mut bcfg = proxy_cfg(&agent.socket_path, "spiffe://pf.test/backend");
    bcfg.listeners = vec![Listener::Inbound(Inbound {
        name: "public".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        forward_to: app.to_string(),
        protocol: Protocol::Http,
        tls: TlsMode::Strict,
        app_protocol: Default::default(),
    })];
    let backend = ward_proxy::Proxy::start(bcfg).await.unwrap();
    let mut fcfg = proxy_cfg(&agent.socket_path, "spiffe://pf.test/frontend");
    fcfg.authorization.from_agent = false;
    fcfg.listeners = vec![Listener::Outbound(Outbound {
        name: "backend".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: backend.inbound_addr("public").unwrap().to_string(),
        expected_ids: vec![SpiffeId::new("spiffe://pf.test/backend").unwrap()],
        protocol: Protocol::Http,
    })];
    let frontend = ward_proxy::Proxy::start(fcfg).await.unwrap();
    let out = frontend.outbound_addr("backend").unwrap();

    // Wait until both proxies hold their SVIDs and the backend has the CA's policy.
    let mut ok = false;
    for _ in 0..200 {
        if backend.sink.current().is_some()
            && frontend.sink.current().is_some()
            && backend.authz.policy_set().len() == 1
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ok, "proxies never got identities and policies");
    assert_eq!(
        backend.sink.current().unwrap().id.as_str(),
        "spiffe://pf.test/backend"
    );
    assert_eq!(
        frontend.sink.current().unwrap().id.as_str(),
        "spiffe://pf.test/frontend"
    );

    assert_eq!(
        get(out, "/api/x").await,
        (200, "spiffe://pf.test/frontend".into())
    );
    assert_eq!(get(out, "/other").await.0, 403);

    // The CA says the same.
    let e = adm
        .explain_policy(admin::ExplainPolicyRequest {
            source: "spiffe://pf.test/frontend".into(),
            target: "spiffe://pf.test/backend".into(),
            method: "GET".into(),
            path: "/other".into(),
            port: 0,
            default_policy: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!e.allowed, "{}", e.text);
    assert!(e.text.contains("rule 0: did not match"), "{}", e.text);

    // A policy change in the CA reaches the proxy.
    let mut doc2 = doc.clone();
    doc2.policies[0].rules[0].to[0].paths.push("/other".into());
    adm.put_policies(admin::PutPoliciesRequest {
        policies: to_proto(&doc2),
    })
    .await
    .unwrap();
    let mut allowed = false;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if get(out, "/other").await.0 == 200 {
            allowed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(allowed, "policy change did not reach the proxy in 5s");

    // An invalid policy is refused by the CA; nothing changes.
    let bad = ward_proto::types::AuthzPolicy {
        name: "bad".into(),
        target_spiffe_ids: vec!["spiffe://pf.test//x".into()],
        action: "ALLOW".into(),
        ..Default::default()
    };
    let e = adm
        .put_policies(admin::PutPoliciesRequest {
            policies: vec![bad],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        adm.list_policies(admin::ListPoliciesRequest {})
            .await
            .unwrap()
            .into_inner()
            .policies
            .len(),
        1
    );

    // Deleting it: the backend has no ALLOW policy left, the default (deny) applies.
    adm.delete_policy(admin::DeletePolicyRequest {
        name: "backend-allow-frontend".into(),
    })
    .await
    .unwrap();
    let mut denied = false;
    for _ in 0..200 {
        if get(out, "/api/x").await.0 == 403 {
            denied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(denied, "policy deletion did not reach the proxy");

    frontend.shutdown().await;
    backend.shutdown().await;
    agent.shutdown().await;
    ca.shutdown().await;
}
