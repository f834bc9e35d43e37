//! The SPIFFE Workload API of a real agent (in process, on a real Unix socket) against a real
//! CA: the security header, callers without identities, streams that follow entry changes,
//! JWT validation errors, and agent restarts without a join token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use ward_ca::entries::EntrySpec;
use ward_proto::workload as wl;

async fn setup(dir: &std::path::Path) -> (ward_ca::CaServer, ward_agent::Agent) {
    let ca = common::start_ca(
        common::ca_config(&dir.join("ca"), "wl.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let cfg = common::agent_config(&ca, dir).await;
    let agent = common::start_agent(cfg).await;
    (ca, agent)
}

/// Creates entry `key` (`spiffe://wl.test/<name>`, this process's uid) and waits until the
/// agent holds it.
async fn entry_for_me(
    ca: &ward_ca::CaServer,
    agent: &ward_agent::Agent,
    parent: &str,
    name: &str,
    key: &str,
) {
    ca.core
        .entries
        .create(
            &entry(name, parent, vec![common::my_uid_selector()]),
            "admin",
            key.into(),
            ca.core.clock.now(),
        )
        .await
        .unwrap();
    let mut snaps = agent.cache.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        snaps.wait_for(|s| s.entries.contains_key(key)),
    )
    .await
    .unwrap()
    .unwrap();
}

fn entry(id: &str, parent: &str, selectors: Vec<String>) -> EntrySpec {
    EntrySpec {
        spiffe_id: format!("spiffe://wl.test/{id}"),
        parent_id: parent.to_owned(),
        selectors,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_requires_the_security_header() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent) = setup(dir.path()).await;
    let mut c = common::workload_client(&agent.socket_path);
    // Each RPC without the header: InvalidArgument naming the header (not some other check).
    let errs = vec![
        c.fetch_x509svid(wl::X509svidRequest {})
            .await
            .map(|_| ())
            .unwrap_err(),
        c.fetch_x509_bundles(wl::X509BundlesRequest {})
            .await
            .map(|_| ())
            .unwrap_err(),
        c.fetch_jwtsvid(wl::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .map(|_| ())
        .unwrap_err(),
        c.fetch_jwt_bundles(wl::JwtBundlesRequest {})
            .await
            .map(|_| ())
            .unwrap_err(),
    ];
    for e in &errs {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("security header"), "{e:?}");
    }
    // ValidateJWTSVID with a token that validates with the header: refused without it.
    let parent = agent.identity.id().unwrap().to_string();
    entry_for_me(&ca, &agent, &parent, "hdr", "e-hdr").await;
    let jwt = c
        .fetch_jwtsvid(common::with_header(wl::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();
    let validate = |header: bool| {
        let msg = wl::ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: jwt.clone(),
        };
        if header {
            common::with_header(msg)
        } else {
            tonic::Request::new(msg)
        }
    };
    c.validate_jwtsvid(validate(true)).await.unwrap();
    let e = c.validate_jwtsvid(validate(false)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("security header"), "{e:?}");
    // A wrong header value is no better.
    let mut r = tonic::Request::new(wl::X509svidRequest {});
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("yes"),
    );
    assert_eq!(
        c.fetch_x509svid(r).await.map(|_| ()).unwrap_err().code(),
        Code::InvalidArgument
    );
    agent.shutdown().await;
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_entries_are_denied() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent) = setup(dir.path()).await;
    // An entry for somebody else only.
    let parent = agent.identity.id().unwrap().to_string();
    ca.core
        .entries
        .create(
            &entry("other", &parent, vec!["unix:uid:4242424".into()]),
            "admin",
            "e1".into(),
            ca.core.clock.now(),
        )
        .await
        .unwrap();
    let mut c = common::workload_client(&agent.socket_path);
    let mut s = c
        .fetch_x509svid(common::with_header(wl::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.message().await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let mut s = c
        .fetch_x509_bundles(common::with_header(wl::X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.message().await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let e = c
        .fetch_jwtsvid(common::with_header(wl::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    agent.shutdown().await;
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_follow_entry_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent) = setup(dir.path()).await;
    let parent = agent.identity.id().unwrap().to_string();
    let now = ca.core.clock.now();
    // The stream answers "no identity" to a caller without entries: wait until the agent has
    // the entry before opening it.
    entry_for_me(&ca, &agent, &parent, "one", "e1").await;

    let mut c = common::workload_client(&agent.socket_path);
    let mut s = c
        .fetch_x509svid(common::with_header(wl::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.svids.len(), 1);
    assert_eq!(first.svids[0].spiffe_id, "spiffe://wl.test/one");
    assert!(!first.svids[0].x509_svid_key.is_empty());
    assert!(!first.svids[0].bundle.is_empty());

    // A second identity for the same caller arrives on the open stream.
    let mut two = entry("two", &parent, vec![common::my_uid_selector()]);
    two.hint = "second".into();
    ca.core
        .entries
        .create(&two, "admin", "e2".into(), now)
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut ids: Vec<_> = next
        .svids
        .iter()
        .map(|s| (s.spiffe_id.clone(), s.hint.clone()))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            ("spiffe://wl.test/one".into(), String::new()),
            ("spiffe://wl.test/two".into(), "second".into())
        ]
    );

    // JWT for a chosen identity; for an identity the caller does not have: denied.
    let jwt = c
        .fetch_jwtsvid(common::with_header(wl::JwtsvidRequest {
            audience: vec!["svc".into()],
            spiffe_id: "spiffe://wl.test/two".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.svids.len(), 1);
    assert_eq!(jwt.svids[0].spiffe_id, "spiffe://wl.test/two");
    let e = c
        .fetch_jwtsvid(common::with_header(wl::JwtsvidRequest {
            audience: vec!["svc".into()],
            spiffe_id: "spiffe://wl.test/three".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let v = c
        .validate_jwtsvid(common::with_header(wl::ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: jwt.svids[0].svid.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.spiffe_id, "spiffe://wl.test/two");
    let claims = v.claims.unwrap();
    assert!(claims.fields.contains_key("exp"));
    for (aud, svid) in [
        ("", jwt.svids[0].svid.clone()),
        ("svc", String::new()),
        ("other", jwt.svids[0].svid.clone()),
        ("svc", "a.b.c".into()),
    ] {
        let e = c
            .validate_jwtsvid(common::with_header(wl::ValidateJwtsvidRequest {
                audience: aud.into(),
                svid,
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{aud}: {e:?}");
    }
    let e = c
        .fetch_jwtsvid(common::with_header(wl::JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Removing every identity ends the stream with PermissionDenied.
    ca.core.entries.delete("e1").await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.svids.len(), 1);
    ca.core.entries.delete("e2").await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .unwrap();
    assert_eq!(end.unwrap_err().code(), Code::PermissionDenied);
    agent.shutdown().await;
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_keeps_its_identity_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), "wl.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let mut cfg = common::agent_config(&ca, dir.path()).await;
    let agent = common::start_agent(cfg.clone()).await;
    let id = agent.identity.id().unwrap();
    agent.shutdown().await;
    cfg.join_token = None;
    let agent = common::start_agent(cfg.clone()).await;
    assert_eq!(agent.identity.id().unwrap(), id);
    agent.shutdown().await;
    // With neither a saved SVID nor a token, the agent refuses to start and says why.
    let mut fresh = common::agent_config(&ca, &dir.path().join("other")).await;
    std::fs::create_dir_all(dir.path().join("other")).unwrap();
    fresh.join_token = None;
    let e = ward_agent::Agent::start(fresh).await.unwrap_err();
    assert!(e.to_string().contains("join token"), "{e}");
    ca.shutdown().await;
}

/// One caller holds at most `limits.max_streams_per_caller` streams of the agent's socket:
/// the next is refused with `RESOURCE_EXHAUSTED` and counted; a stream closed gives its place
/// back; the limit covers every kind of stream (Workload API watches, destination
/// subscriptions) together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_cannot_hold_more_streams_than_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), "wl.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let mut cfg = common::agent_config(&ca, dir.path()).await;
    cfg.limits.max_streams_per_caller = 3;
    let agent = common::start_agent(cfg).await;
    let parent = agent.identity.id().unwrap().to_string();
    entry_for_me(&ca, &agent, &parent, "one", "e1").await;
    let mut c = common::workload_client(&agent.socket_path);
    let open =
        |c: &mut ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
            tonic::transport::Channel,
        >| {
            let mut c = c.clone();
            async move {
                c.fetch_x509svid(common::with_header(wl::X509svidRequest {}))
                    .await
                    .map(|r| r.into_inner())
            }
        };
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = open(&mut c).await.unwrap();
        s.message().await.unwrap().unwrap();
        held.push(s);
    }
    // The third place taken by a destination subscription.
    let mut d = ward_proto::agent::destinations_client::DestinationsClient::new(
        ward_net::process::unix_channel(&agent.socket_path),
    );
    let mut sub = d
        .get(common::with_header(
            ward_proto::agent::GetDestinationRequest {
                authority: "api.shop:80".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    sub.message().await.unwrap().unwrap();
    let e = open(&mut c).await.expect_err("a fourth stream is refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("limits.max_streams_per_caller"),
        "{e:?}"
    );
    let m = common::scrape(agent.health_addr).await;
    assert!(
        m.lines()
            .any(|l| l == "ward_agent_stream_limit_refusals_total 1"),
        "{m}"
    );
    // One closed: its place comes back (once the agent has seen it go).
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        match open(&mut c).await {
            Ok(s) => {
                again = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut s = again.expect("a place was given back");
    s.message().await.unwrap().unwrap();
    drop(sub);
    drop(ca);
}
