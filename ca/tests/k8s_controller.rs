//! The identity controller against the fake API server, through the real kube client: entries
//! follow pods, nodes, namespaces and IdentityPolicy resources; render failures land in the
//! policy's status; a CA restart converges without duplicates or losses; AuthorizationPolicy
//! resources become CA policies; an agent on another node cannot get a pod's SVID.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::k8s::{cluster, eventually, node, pod};

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;
use serde_json::{Value, json};
use tonic::Code;
use ward_ca::entries::Entry;
use ward_proto::node::{
    AttestRequest, BatchNewX509SvidRequest, K8sPsatAttestation, NewX509SvidParams,
    attest_request::Method,
};
use ward_testing::kube::{FakeKube, TokenSpec};

fn namespace(name: &str, labels: Value) -> Namespace {
    serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } })).unwrap()
}

fn identity_policy(name: &str, template: &str, app: &str) -> Value {
    json!({
        "apiVersion": "ward.dev/v1alpha1",
        "kind": "IdentityPolicy",
        "metadata": { "name": name },
        "spec": {
            "spiffeIdTemplate": template,
            "podSelector": { "matchLabels": { "app": app } },
            "dnsNameTemplates": ["{pod_name}.{namespace}.svc"],
            "x509SvidTtl": "15m"
        }
    })
}

/// Generated entries as (SPIFFE ID, parent, origin), sorted.
async fn generated(ca: &ward_ca::CaServer) -> Vec<(String, String, String)> {
    let mut v: Vec<(String, String, String)> = ca
        .core
        .entries
        .list(None, None)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.origin.starts_with("k8s/"))
        .map(|e| (e.spiffe_id.to_string(), e.parent_id.to_string(), e.origin))
        .collect();
    v.sort();
    v
}

fn agent_of(node_uid: &str) -> String {
    format!("spiffe://k8s.test/ward/agent/k8s_psat/c1/{node_uid}")
}

fn row(id: &str, node_uid: &str, origin: &str) -> (String, String, String) {
    (
        format!("spiffe://k8s.test/{id}"),
        agent_of(node_uid),
        format!("k8s/c1/{origin}"),
    )
}

async fn expect_rows(ca: &ward_ca::CaServer, what: &str, want: Vec<(String, String, String)>) {
    let mut want = want;
    want.sort();
    eventually(what, || {
        let want = want.clone();
        async move {
            let got = generated(ca).await;
            if got == want {
                Ok(())
            } else {
                Err(format!("have {got:#?}\nwant {want:#?}"))
            }
        }
    })
    .await;
}

fn seed(fake: &FakeKube) {
    fake.put(&node("n1", "node-1"));
    fake.put(&node("n2", "node-2"));
    for ns in ["shop", "kube-system", "ward"] {
        fake.put(&namespace(ns, json!({})));
    }
    fake.put(&pod("ward", "ward-agent-1", "agent-u1", "n1", "ward-agent"));
    fake.put(&pod("ward", "ward-agent-2", "agent-u2", "n2", "ward-agent"));
    fake.put(&pod("kube-system", "coredns-1", "dns-u1", "n1", "coredns"));
    fake.put(&pod("shop", "web-1", "web-u1", "n1", "web"));
    fake.put(&pod("shop", "db-1", "db-u1", "n2", "db"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_follow_pods_policies_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    seed(&fake);
    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path())];
    let ca = common::start_ca(cfg.clone(), Arc::new(ward_spiffe::SystemClock)).await;

    // The default policy: every pod outside kube-system and ward, parented to its node's agent.
    expect_rows(
        &ca,
        "default policy",
        vec![
            row("ns/shop/sa/web", "node-1", "default"),
            row("ns/shop/sa/db", "node-2", "default"),
        ],
    )
    .await;
    let web = ca
        .core
        .entries
        .list(None, Some("spiffe://k8s.test/ns/shop/sa/web"))
        .await
        .unwrap();
    assert_eq!(web[0].selectors[0].to_string(), "k8s:pod-uid:web-u1");

    // A static entry lives beside generated ones.
    let static_id = ward_ca::core::CaCore::new_entry_id();
    ca.core
        .entries
        .create(
            &ward_ca::entries::EntrySpec {
                spiffe_id: "spiffe://k8s.test/static".into(),
                parent_id: agent_of("node-1"),
                selectors: vec!["unix:uid:0".into()],
                ..Default::default()
            },
            "admin",
            static_id.clone(),
            ca.core.clock.now(),
        )
        .await
        .unwrap();

    // An IdentityPolicy takes over the pods it selects.
    fake.put_json(
        "identitypolicies",
        identity_policy("web", "spiffe://{trust_domain}/app/{pod_label:app}", "web"),
    );
    expect_rows(
        &ca,
        "policy web",
        vec![
            row("app/web", "node-1", "identitypolicy/web"),
            row("ns/shop/sa/db", "node-2", "default"),
        ],
    )
    .await;
    let e = &ca
        .core
        .entries
        .list(None, Some("spiffe://k8s.test/app/web"))
        .await
        .unwrap()[0];
    assert_eq!(e.dns_names, vec!["web-1.shop.svc"]);
    assert_eq!(e.x509_svid_ttl, 900);

    // A template that does not render: reported in the status, and no entry for the pod.
    fake.put_json(
        "identitypolicies",
        identity_policy("broken", "spiffe://{trust_domain}/x/{pod_label:team}", "db"),
    );
    expect_rows(
        &ca,
        "policy broken",
        vec![row("app/web", "node-1", "identitypolicy/web")],
    )
    .await;
    eventually("status of broken", || {
        let fake = fake.clone();
        async move {
            let s = &fake.get("identitypolicies", None, "broken").unwrap()["status"];
            if s["podsSelected"] == 1
                && s["renderFailureCount"] == 1
                && s["renderFailures"][0]["pod"] == "shop/db-1"
                && s["renderFailures"][0]["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("team")
            {
                Ok(())
            } else {
                Err(s.to_string())
            }
        }
    })
    .await;
    eventually("status of web", || {
        let fake = fake.clone();
        async move {
            let s = &fake.get("identitypolicies", None, "web").unwrap()["status"];
            if s["podsSelected"] == 1 && s["renderFailureCount"] == 0 {
                Ok(())
            } else {
                Err(s.to_string())
            }
        }
    })
    .await;
    // Fixing the pod's labels fixes the status.
    let mut db = pod("shop", "db-1", "db-u1", "n2", "db");
    db.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("team".into(), "data".into());
    fake.put(&db);
    expect_rows(
        &ca,
        "broken fixed",
        vec![
            row("app/web", "node-1", "identitypolicy/web"),
            row("x/data", "node-2", "identitypolicy/broken"),
        ],
    )
    .await;
    eventually("status of broken after fix", || {
        let fake = fake.clone();
        async move {
            let s = &fake.get("identitypolicies", None, "broken").unwrap()["status"];
            if s["renderFailureCount"] == 0 && s["renderFailures"] == json!([]) {
                Ok(())
            } else {
                Err(s.to_string())
            }
        }
    })
    .await;

    // Pod events touch only that pod's entry.
    let before: BTreeMap<String, Entry> = ca
        .core
        .entries
        .list(None, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id.clone(), e))
        .collect();
    fake.put(&pod("shop", "api-1", "api-u1", "n2", "api"));
    expect_rows(
        &ca,
        "new pod",
        vec![
            row("app/web", "node-1", "identitypolicy/web"),
            row("x/data", "node-2", "identitypolicy/broken"),
            row("ns/shop/sa/api", "node-2", "default"),
        ],
    )
    .await;
    for e in ca.core.entries.list(None, None).await.unwrap() {
        if let Some(old) = before.get(&e.id) {
            assert_eq!(old.revision, e.revision, "{} was rewritten", e.id);
        }
    }
    fake.delete("pods", Some("shop"), "web-1");
    expect_rows(
        &ca,
        "pod deleted",
        vec![
            row("x/data", "node-2", "identitypolicy/broken"),
            row("ns/shop/sa/api", "node-2", "default"),
        ],
    )
    .await;

    // Restart: while the CA is down, a pod goes, one comes, a node is replaced.
    ca.shutdown().await;
    fake.delete("pods", Some("shop"), "api-1");
    fake.put(&pod("shop", "web-2", "web-u2", "n1", "web"));
    fake.delete("nodes", None, "n2");
    fake.put(&node("n2", "node-2b"));
    let ca = common::start_ca(cfg.clone(), Arc::new(ward_spiffe::SystemClock)).await;
    expect_rows(
        &ca,
        "after restart",
        vec![
            row("app/web", "node-1", "identitypolicy/web"),
            row("x/data", "node-2b", "identitypolicy/broken"),
        ],
    )
    .await;
    // Exactly one entry per pod and policy, and the static entry survived.
    let all = ca.core.entries.list(None, None).await.unwrap();
    assert_eq!(all.len(), 3, "{all:#?}");
    assert!(all.iter().any(|e| e.id == static_id && e.origin == "admin"));

    // Deleting the policy returns its pods to the default.
    fake.delete("identitypolicies", None, "broken");
    expect_rows(
        &ca,
        "policy deleted",
        vec![
            row("app/web", "node-1", "identitypolicy/web"),
            row("ns/shop/sa/db", "node-2b", "default"),
        ],
    )
    .await;
    // Namespace selector and namespace labels.
    fake.put_json(
        "identitypolicies",
        json!({
            "apiVersion": "ward.dev/v1alpha1", "kind": "IdentityPolicy",
            "metadata": { "name": "by-team" },
            "spec": {
                "spiffeIdTemplate": "spiffe://{trust_domain}/team/{namespace_label:team}/{service_account}",
                "namespaceSelector": { "matchExpressions": [ { "key": "team", "operator": "Exists" } ] },
                "podSelector": { "matchLabels": { "app": "db" } }
            }
        }),
    );
    fake.put(&namespace("shop", json!({ "team": "payments" })));
    expect_rows(
        &ca,
        "namespace selector",
        vec![
            row("app/web", "node-1", "identitypolicy/web"),
            row("team/payments/db", "node-2b", "identitypolicy/by-team"),
        ],
    )
    .await;
    let metrics = reqwest_metrics(&ca).await;
    assert!(
        metrics.contains("ward_ca_k8s_managed_entries{cluster=\"c1\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("ward_ca_k8s_synced{cluster=\"c1\"} 1"));
    ca.shutdown().await;
}

async fn names(ca: &ward_ca::CaServer) -> Vec<String> {
    let mut v: Vec<String> = ca
        .core
        .policies
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.policy.name)
        .collect();
    v.sort();
    v
}

async fn reqwest_metrics(ca: &ward_ca::CaServer) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(ca.health_addr)
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn web_gets_db(set: &ward_spiffe::policy::PolicySet) -> ward_spiffe::policy::Verdict {
    let web = ward_spiffe::SpiffeId::new("spiffe://k8s.test/ns/shop/sa/web").unwrap();
    let db = ward_spiffe::SpiffeId::new("spiffe://k8s.test/ns/shop/sa/db").unwrap();
    set.evaluate(
        &ward_spiffe::policy::Request {
            source: Some(&web),
            target: &db,
            method: Some("GET"),
            path: Some("/"),
            port: 8080,
        },
        ward_spiffe::policy::DefaultPolicy::Deny,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_become_ca_policies() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    seed(&fake);
    let ap = |name: &str, action: &str| {
        json!({
            "apiVersion": "ward.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": { "name": name },
            "spec": {
                "targetSpiffeIds": ["spiffe://k8s.test/ns/shop/sa/db"],
                "action": action,
                "rules": [ { "from": [ { "principals": ["spiffe://k8s.test/ns/shop/sa/web"] } ], "to": [ { "methods": ["GET"] } ] } ]
            }
        })
    };
    fake.put_json("authorizationpolicies", ap("db-readers", "ALLOW"));
    fake.put_json("authorizationpolicies", ap("stale-later", "DENY"));
    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path())];
    let ca = common::start_ca(cfg.clone(), Arc::new(ward_spiffe::SystemClock)).await;
    eventually("policies stored", || async {
        let n = names(&ca).await;
        (n == ["k8s:c1:db-readers", "k8s:c1:stale-later"])
            .then_some(())
            .ok_or(format!("{n:?}"))
    })
    .await;
    let set = ca.core.policies.set().await.unwrap();
    let d = web_gets_db(&set);
    assert!(!d.allowed, "the DENY policy wins: {d:?}");

    // An invalid resource is refused; the stored set is untouched.
    fake.put_json("authorizationpolicies", ap("bad", "MAYBE"));
    // Admins cannot edit the mirrored policies.
    let mut admin = ward_proto::admin::admin_client::AdminClient::new(
        ward_net::process::unix_channel(&ca.admin_socket),
    );
    let e = admin
        .delete_policy(ward_proto::admin::DeletePolicyRequest {
            name: "k8s:c1:db-readers".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Deleted while the CA is down: gone after the restart's listing.
    ca.shutdown().await;
    fake.delete("authorizationpolicies", None, "stale-later");
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    eventually("stale policy removed", || async {
        let n = names(&ca).await;
        (n == ["k8s:c1:db-readers"])
            .then_some(())
            .ok_or(format!("{n:?}"))
    })
    .await;
    let set = ca.core.policies.set().await.unwrap();
    let d = web_gets_db(&set);
    assert!(d.allowed, "{d:?}");
    fake.delete("authorizationpolicies", None, "db-readers");
    eventually("deleted policy removed", || async {
        let n = names(&ca).await;
        n.is_empty().then_some(()).ok_or(format!("{n:?}"))
    })
    .await;
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_get_a_pod_of_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    seed(&fake);
    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    cfg.kubernetes.clusters = vec![cluster(&fake, dir.path())];
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    expect_rows(
        &ca,
        "default policy",
        vec![
            row("ns/shop/sa/web", "node-1", "default"),
            row("ns/shop/sa/db", "node-2", "default"),
        ],
    )
    .await;
    let web = ca
        .core
        .entries
        .list(None, Some("spiffe://k8s.test/ns/shop/sa/web"))
        .await
        .unwrap()
        .remove(0);

    // The agent of n2 attests with its projected token.
    let token = fake.token(&TokenSpec::new(
        "ward",
        "ward-agent",
        ("ward-agent-2", "agent-u2"),
        "ward-ca",
    ));
    let (key, csr) = common::key_and_csr(None);
    let resp = common::node_client(&ca, None)
        .attest(AttestRequest {
            method: Some(Method::K8sPsat(K8sPsatAttestation {
                cluster: "c1".into(),
                token,
            })),
            csr,
        })
        .await
        .unwrap()
        .into_inner();
    let svid =
        ward_net::Svid::from_parts(resp.svid.unwrap().cert_chain, key.serialize_der()).unwrap();
    assert_eq!(svid.id.as_str(), agent_of("node-2"));
    let (_, csr) = common::key_and_csr(None);
    let r = common::node_client(&ca, Some(svid))
        .batch_new_x509_svid(BatchNewX509SvidRequest {
            params: vec![NewX509SvidParams {
                entry_id: web.id.clone(),
                csr,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.results[0].error_code,
        Code::PermissionDenied as i32,
        "{r:?}"
    );
    assert!(r.results[0].svid.is_none());
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_is_published_to_a_config_map() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::start().await;
    let mut cfg = common::ca_config(&dir.path().join("ca"), "k8s.test");
    let mut c = cluster(&fake, dir.path());
    c.controller.enabled = Some(false);
    c.bundle_config_map = Some("ward/ward-bundle".into());
    cfg.kubernetes.clusters = vec![c];
    let ca = common::start_ca(cfg, Arc::new(ward_spiffe::SystemClock)).await;
    let published = |n: usize| {
        let fake = fake.clone();
        let ca = &ca;
        async move {
            let Some(cm) = fake.get("configmaps", Some("ward"), "ward-bundle") else {
                return Err("no ConfigMap".to_owned());
            };
            let pem = cm["data"]["bundle.pem"].as_str().unwrap_or("");
            let roots = ward_spiffe::bundle::pem_certificates(pem.as_bytes()).unwrap_or_default();
            let spiffe = cm["data"]["bundle.spiffe"].as_str().unwrap_or("");
            let ok = roots.len() == n
                && roots == ca.core.bundle().x509_authorities
                && ward_spiffe::Bundle::from_spiffe_json(ca.core.cfg.trust_domain.clone(), spiffe)
                    .is_ok_and(|b| b.sequence == ca.core.bundle().sequence)
                && cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ward-ca";
            if ok {
                Ok(())
            } else {
                Err(format!("ConfigMap not (yet) right: {cm}"))
            }
        }
    };
    eventually("bundle ConfigMap written", || published(1)).await;
    // A prepared authority is published there too.
    ca.core
        .authorities
        .operate(
            ward_ca::authority::Kind::X509,
            ward_ca::authority::Op::Prepare,
            false,
        )
        .await
        .unwrap();
    eventually("bundle ConfigMap updated", || published(2)).await;
    ca.shutdown().await;
}
