//! Kubernetes node attestation against the fake API server, with the real kube client: a real
//! agent attests with a projected token and keeps its ID across restarts; every listed attack is
//! refused with PermissionDenied and stores nothing; offline mode verifies against the JWKS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tonic::Code;
use ward_ca::config::{ClusterConfig, PsatMode};
use ward_proto::node::{AttestRequest, K8sPsatAttestation, attest_request::Method};
use ward_testing::kube::{FakeKube, TokenSpec};

const NODE_UID: &str = "7d1b3c52-0a7e-4b2e-9d59-1f8a6c2b0e11";

fn node(name: &str, uid: &str) -> Node {
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(
        "topology.kubernetes.io/zone".to_owned(),
        "zone-a".to_owned(),
    );
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(uid.into()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn agent_pod(name: &str, uid: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ward".into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some("ward-agent".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn cluster(fake: &FakeKube, dir: &std::path::Path, mode: PsatMode) -> ClusterConfig {
    ClusterConfig {
        name: "c1".into(),
        kubeconfig: Some(fake.write_kubeconfig(dir, "c1")),
        service_account_allow_list: vec!["ward:ward-agent".into()],
        audience: "ward-ca".into(),
        mode,
        issuer: Some(fake.issuer().to_owned()),
        jwks_file: None,
        jwks_discovery: mode == PsatMode::Offline,
        jwks_ca_file: None,
        jwks_min_refresh_interval: std::time::Duration::from_secs(10),
        node_label_allow_list: vec!["topology.kubernetes.io/zone".into()],
        pod_label_allow_list: vec![],
        // These tests manage entries themselves.
        controller: ward_ca::config::ControllerConfig {
            enabled: Some(false),
            ..Default::default()
        },
        bundle_config_map: None,
    }
}

fn req(cluster: &str, token: String) -> AttestRequest {
    let (_, csr) = common::key_and_csr(None);
    AttestRequest {
        method: Some(Method::K8sPsat(K8sPsatAttestation {
            cluster: cluster.into(),
            token,
        })),
        csr,
    }
}

async fn setup(mode: PsatMode) -> (tempfile::TempDir, FakeKube, ward_ca::CaServer) {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    fake.put(&node("n1", NODE_UID));
    fake.put(&agent_pod("ward-agent-abc", "pod-u1", "n1"));
    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path(), mode)];
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    (dir, fake, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_attest_with_projected_tokens_and_keep_their_id() {
    let (dir, fake, ca) = setup(PsatMode::TokenReview).await;
    let token_path = dir.path().join("token");
    std::fs::write(
        &token_path,
        fake.token(&TokenSpec::new(
            "ward",
            "ward-agent",
            ("ward-agent-abc", "pod-u1"),
            "ward-ca",
        )),
    )
    .unwrap();
    let mut cfg = common::agent_config(&ca, dir.path()).await;
    cfg.join_token = None;
    cfg.k8s_psat = Some(ward_agent::config::PsatConfig {
        cluster: "c1".into(),
        token_path: token_path.clone(),
    });
    let agent = common::start_agent(cfg.clone()).await;
    let id = agent.identity.id().unwrap();
    assert_eq!(
        id.as_str(),
        format!("spiffe://k8s.test/ward/agent/k8s_psat/c1/{NODE_UID}")
    );
    let rec = ca.core.agents.get_raw(&id).await.unwrap().unwrap().0;
    for s in [
        "k8s_psat:cluster:c1".to_owned(),
        "k8s_psat:agent_ns:ward".into(),
        "k8s_psat:agent_sa:ward-agent".into(),
        "k8s_psat:agent_pod_name:ward-agent-abc".into(),
        "k8s_psat:agent_pod_uid:pod-u1".into(),
        "k8s_psat:agent_node_name:n1".into(),
        format!("k8s_psat:agent_node_uid:{NODE_UID}"),
        "k8s_psat:agent_node_label:topology.kubernetes.io/zone:zone-a".into(),
    ] {
        assert!(
            rec.selectors.contains(&s),
            "{s} missing from {:?}",
            rec.selectors
        );
    }
    agent.shutdown().await;

    // The agent pod is replaced (new pod, new token, empty data directory): same agent ID.
    fake.delete("pods", Some("ward"), "ward-agent-abc");
    fake.put(&agent_pod("ward-agent-def", "pod-u2", "n1"));
    std::fs::write(
        &token_path,
        fake.token(&TokenSpec::new(
            "ward",
            "ward-agent",
            ("ward-agent-def", "pod-u2"),
            "ward-ca",
        )),
    )
    .unwrap();
    let mut cfg2 = cfg.clone();
    cfg2.data_dir = dir.path().join("agent-data-2");
    let agent2 = common::start_agent(cfg2).await;
    assert_eq!(agent2.identity.id().unwrap(), id);
    assert_eq!(ca.core.agents.list().await.unwrap().len(), 1);
    assert!(fake.token_reviews() >= 2);
    agent2.shutdown().await;
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_are_refused_and_store_nothing() {
    let (_dir, fake, ca) = setup(PsatMode::TokenReview).await;
    let other = FakeKube::start().await;
    let good = TokenSpec::new(
        "ward",
        "ward-agent",
        ("ward-agent-abc", "pod-u1"),
        "ward-ca",
    );
    let mut c = common::node_client(&ca, None);
    let mut cases: Vec<(&str, AttestRequest)> = vec![
        (
            "wrong audience",
            req(
                "c1",
                fake.token(&TokenSpec {
                    audiences: vec!["other".into()],
                    ..good.clone()
                }),
            ),
        ),
        (
            "expired",
            req(
                "c1",
                fake.token(&TokenSpec {
                    not_before: Some(SystemTime::now() - Duration::from_secs(7200)),
                    ttl: Duration::from_secs(600),
                    ..good.clone()
                }),
            ),
        ),
        (
            "not yet valid",
            req(
                "c1",
                fake.token(&TokenSpec {
                    not_before: Some(SystemTime::now() + Duration::from_secs(3600)),
                    ..good.clone()
                }),
            ),
        ),
        (
            "service account not allowed",
            req(
                "c1",
                fake.token(&TokenSpec::new(
                    "ward",
                    "intruder",
                    ("ward-agent-abc", "pod-u1"),
                    "ward-ca",
                )),
            ),
        ),
        (
            "pod uid mismatch",
            req(
                "c1",
                fake.token(&TokenSpec {
                    pod: ("ward-agent-abc".into(), "pod-old".into()),
                    ..good.clone()
                }),
            ),
        ),
        ("token from another cluster", req("c1", other.token(&good))),
        ("unknown cluster", req("c9", fake.token(&good))),
        ("garbage", req("c1", "a.b.c".into())),
    ];
    for (what, r) in cases.drain(..) {
        match c.attest(r).await {
            Ok(_) => panic!("{what}: attested"),
            Err(e) => assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}"),
        }
    }
    // Node deleted: the token is still valid, the node is gone.
    assert!(fake.delete("nodes", None, "n1"), "node deleted");
    let e = c.attest(req("c1", fake.token(&good))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("node n1 does not exist"),
        "{}",
        e.message()
    );
    // Pod deleted.
    fake.put(&node("n1", NODE_UID));
    fake.delete("pods", Some("ward"), "ward-agent-abc");
    let e = c.attest(req("c1", fake.token(&good))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        ca.core.agents.list().await.unwrap().is_empty(),
        "nothing stored"
    );
    // And the good case still works once the pod is back.
    fake.put(&agent_pod("ward-agent-abc", "pod-u1", "n1"));
    c.attest(req("c1", fake.token(&good))).await.unwrap();
    assert_eq!(ca.core.agents.list().await.unwrap().len(), 1);
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_verifies_against_the_jwks() {
    let (_dir, fake, ca) = setup(PsatMode::Offline).await;
    let good = TokenSpec::new(
        "ward",
        "ward-agent",
        ("ward-agent-abc", "pod-u1"),
        "ward-ca",
    );
    let mut c = common::node_client(&ca, None);
    let r = c
        .attest(req("c1", fake.token(&good)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.svid.unwrap().spiffe_id,
        format!("spiffe://k8s.test/ward/agent/k8s_psat/c1/{NODE_UID}")
    );
    assert_eq!(
        fake.token_reviews(),
        0,
        "offline mode must not call TokenReview"
    );
    // A forged signature: flip a byte of the signature part.
    let t = fake.token(&good);
    let (head, sig) = t.rsplit_once('.').unwrap();
    let mut sig = sig.as_bytes().to_vec();
    sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
    let forged = format!("{head}.{}", String::from_utf8(sig).unwrap());
    let e = c.attest(req("c1", forged)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("signature"), "{}", e.message());
    // Another cluster's key: unknown kid; the JWKS was fetched moments ago (for the first
    // token), so it is refused from what is known.
    let other = FakeKube::start().await;
    let e = c.attest(req("c1", other.token(&good))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A flood of unknown keys does not multiply the load on the cluster's OIDC endpoint: the
    // JWKS is fetched again at most once per interval (10 s by default), the rest are refused
    // from what is known, and counted.
    let fetches = || {
        fake.requests()
            .iter()
            .filter(|r| r.contains("openid") || r.contains("jwks"))
            .count()
    };
    let before = fetches();
    for _ in 0..20 {
        let e = c.attest(req("c1", other.token(&good))).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(
            e.message().contains("is not a key of cluster c1"),
            "{}",
            e.message()
        );
    }
    assert_eq!(fetches(), before, "no JWKS fetch within the interval");
    let suppressed = ca
        .core
        .metrics
        .jwks_refresh_suppressed
        .get_or_create(&ward_ca::metrics::ClusterLabel {
            cluster: "c1".into(),
        })
        .get();
    assert_eq!(
        suppressed, 21,
        "the first other-cluster token and the 20 after it"
    );
    // Known keys still work meanwhile.
    c.attest(req("c1", fake.token(&good))).await.unwrap();
    // The pod behind the token was replaced: same name, another UID.
    fake.put(&agent_pod("ward-agent-abc", "pod-u9", "n1"));
    let e = c.attest(req("c1", fake.token(&good))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains(r#"has UID "pod-u9", the token names UID "pod-u1""#),
        "{}",
        e.message()
    );
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_without_api_access_uses_the_node_claim() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, fake.jwks().to_string()).unwrap();
    let mut cl = cluster(&fake, dir.path(), PsatMode::Offline);
    cl.kubeconfig = None;
    cl.jwks_discovery = false;
    cl.jwks_file = Some(jwks);
    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cl];
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    let mut c = common::node_client(&ca, None);
    let with_node = TokenSpec {
        node: Some(("n1".into(), NODE_UID.into())),
        ..TokenSpec::new("ward", "ward-agent", ("p", "u"), "ward-ca")
    };
    let r = c
        .attest(req("c1", fake.token(&with_node)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.svid.unwrap().spiffe_id.ends_with(NODE_UID));
    // Kubernetes < 1.30 tokens have no node claim: with no API access that cannot be attested.
    let without = TokenSpec::new("ward", "ward-agent", ("p", "u"), "ward-ca");
    let e = c.attest(req("c1", fake.token(&without))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("no node claim"), "{}", e.message());
    ca.shutdown().await;
}

/// In token_review mode the node the API server says the token is bound to (Kubernetes ≥ 1.30
/// extras) must be the agent pod's node, as in offline mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_checks_the_tokens_node_against_the_pods() {
    let (_dir, fake, ca) = setup(PsatMode::TokenReview).await;
    let mut c = common::node_client(&ca, None);
    let bound = |node: (&str, &str)| TokenSpec {
        node: Some((node.0.into(), node.1.into())),
        ..TokenSpec::new(
            "ward",
            "ward-agent",
            ("ward-agent-abc", "pod-u1"),
            "ward-ca",
        )
    };
    // The right node: attested.
    let r = c
        .attest(req("c1", fake.token(&bound(("n1", NODE_UID)))))
        .await
        .unwrap()
        .into_inner();
    assert!(r.svid.unwrap().spiffe_id.ends_with(NODE_UID));
    // Another node's name, or the right name with another UID: refused with the reason.
    let e = c
        .attest(req("c1", fake.token(&bound(("n2", "uid-2")))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("is not the agent pod's node"),
        "{}",
        e.message()
    );
    let e = c
        .attest(req("c1", fake.token(&bound(("n1", "uid-2")))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("node UID"), "{}", e.message());
    ca.shutdown().await;
}
