//! The fake API server answers the real kube client: get, list, watch, TokenReview.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use ward_testing::kube::{FakeKube, TokenSpec};

fn pod(ns: &str, name: &str, uid: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some("sa".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_kube_client_works_against_the_fake() {
    let fake = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = Kubeconfig::read_from(fake.write_kubeconfig(dir.path(), "c1")).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(cfg).unwrap();

    fake.put(&pod("ns1", "p1", "u1", "n1"));
    fake.put(&Node {
        metadata: ObjectMeta {
            name: Some("n1".into()),
            uid: Some("node-uid-1".into()),
            ..Default::default()
        },
        ..Default::default()
    });
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns1");
    assert_eq!(
        pods.get("p1").await.unwrap().metadata.uid.as_deref(),
        Some("u1")
    );
    assert!(pods.get_opt("nope").await.unwrap().is_none());
    let all: Api<Pod> = Api::all(client.clone());
    assert_eq!(all.list(&Default::default()).await.unwrap().items.len(), 1);
    let nodes: Api<Node> = Api::all(client.clone());
    assert_eq!(
        nodes.get("n1").await.unwrap().metadata.uid.as_deref(),
        Some("node-uid-1")
    );

    // Watch sees additions and deletions after the initial list.
    let w = kube::runtime::watcher(all.clone(), Default::default());
    tokio::pin!(w);
    let mut seen_init = false;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
    {
        if let kube::runtime::watcher::Event::InitDone = ev.unwrap() {
            seen_init = true;
            break;
        }
    }
    assert!(seen_init);
    fake.put(&pod("ns1", "p2", "u2", "n1"));
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, kube::runtime::watcher::Event::Apply(p) if p.metadata.name.as_deref() == Some("p2"))
    );
    fake.delete("pods", Some("ns1"), "p2");
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, kube::runtime::watcher::Event::Delete(p) if p.metadata.name.as_deref() == Some("p2"))
    );

    // TokenReview with a real projected token.
    let token = fake.token(&TokenSpec::new("ns1", "sa", ("p1", "u1"), "ward-ca"));
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.clone()),
            audiences: Some(vec!["ward-ca".into()]),
        },
        ..Default::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let r = api.create(&Default::default(), &tr).await.unwrap();
    let st = r.status.unwrap();
    assert_eq!(st.authenticated, Some(true), "{st:?}");
    assert_eq!(
        st.user.unwrap().username.as_deref(),
        Some("system:serviceaccount:ns1:sa")
    );
    // Wrong audience.
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            audiences: Some(vec!["other".into()]),
        },
        ..Default::default()
    };
    let st = api
        .create(&Default::default(), &tr)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(st.authenticated, Some(false));
}
