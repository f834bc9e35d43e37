//! Refusals an operator can see: every refused attestation, SVID/JWT request and admin call is
//! one warn line with the method, the peer, the gRPC code, the reason and (for attestation) the
//! attestor and cluster — and a flood of refusals writes a bounded number of lines.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use tonic::Code;
use ward_proto::admin::{GetEntryRequest, admin_client::AdminClient};
use ward_proto::node::{
    AttestRequest, BatchNewX509SvidRequest, JoinTokenAttestation, K8sPsatAttestation,
    NewJwtSvidRequest, attest_request::Method,
};
use ward_testing::logs::Logs;

fn join(token: &str) -> AttestRequest {
    AttestRequest {
        method: Some(Method::JoinToken(JoinTokenAttestation {
            token: token.to_owned(),
        })),
        csr: common::key_and_csr(None).1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_are_logged_once_with_their_reason_and_floods_are_bounded() {
    let logs = Logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), "refuse.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let mut node = common::node_client(&ca, None);

    // One forged join token: exactly one line, with everything an operator needs.
    let e = node.attest(join("forged-token")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let lines = logs.lines_with(&["WARN", "refused /ward.node.v1.Node/Attest"]);
    assert_eq!(lines.len(), 1, "{}", logs.text());
    eprintln!("{}", lines[0]);
    for want in [
        "node API refused",
        "PermissionDenied",
        "join token is unknown or has already been used",
        "attestor=join_token",
        "peer=127.0.0.1:",
    ] {
        assert!(
            lines[0].contains(want),
            "{want:?} missing from {}",
            lines[0]
        );
    }
    assert!(
        !lines[0].contains("forged-token"),
        "the token itself is never logged"
    );

    // An attestor for a cluster the CA does not know: the cluster is named.
    let e = node
        .attest(AttestRequest {
            method: Some(Method::K8sPsat(K8sPsatAttestation {
                cluster: "nope".into(),
                token: "x.y.z".into(),
            })),
            csr: common::key_and_csr(None).1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let lines = logs.lines_with(&["WARN", "Attest", "attestor=k8s_psat"]);
    assert_eq!(lines.len(), 1, "{}", logs.text());
    assert!(lines[0].contains("cluster=nope"), "{}", lines[0]);
    assert!(lines[0].contains("is not configured"), "{}", lines[0]);

    // SVID and JWT requests without an agent identity.
    let e = node
        .batch_new_x509_svid(BatchNewX509SvidRequest { params: vec![] })
        .await
        .unwrap_err();
    let svid = logs.lines_with(&["WARN", "refused /ward.node.v1.Node/BatchNewX509Svid"]);
    assert_eq!(svid.len(), 1, "{}", logs.text());
    assert!(svid[0].contains(&format!("{:?}", e.code())), "{}", svid[0]);
    assert!(svid[0].contains(e.message()), "{}", svid[0]);
    node.new_jwt_svid(NewJwtSvidRequest {
        entry_id: "e".into(),
        audience: vec!["a".into()],
    })
    .await
    .unwrap_err();
    assert_eq!(
        logs.lines_with(&["WARN", "refused /ward.node.v1.Node/NewJwtSvid"])
            .len(),
        1
    );

    // An admin call: the caller is named by pid and uid.
    let mut admin = AdminClient::new(ward_net::process::unix_channel(&ca.admin_socket));
    let e = admin
        .get_entry(GetEntryRequest {
            id: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let a = logs.lines_with(&["WARN", "admin API refused /ward.admin.v1.Admin/GetEntry"]);
    assert_eq!(a.len(), 1, "{}", logs.text());
    let who = format!(
        "pid={} uid={}",
        std::process::id(),
        nix::unistd::getuid().as_raw()
    );
    assert!(a[0].contains(&who), "{} lacks {who}", a[0]);
    assert!(a[0].contains("NotFound"), "{}", a[0]);

    // 1,000 forged attestations as fast as they go (more than 1,000 a second here): a bounded
    // number of lines, and the CA still answers each with its code.
    let started = std::time::Instant::now();
    let calls = (0..1000).map(|i| {
        let mut c = node.clone();
        async move { c.attest(join(&format!("forged-{i}"))).await }
    });
    let results = futures::future::join_all(calls).await;
    let elapsed = started.elapsed();
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().unwrap_err().code() == Code::PermissionDenied)
    );
    let lines = logs.lines_with(&["WARN", "refused /ward.node.v1.Node/Attest", "join token"]);
    assert!(
        lines.len() <= 3,
        "{} lines for 1,001 refusals in {elapsed:?}",
        lines.len()
    );
    eprintln!("1,000 refusals in {elapsed:?}: {} warn lines", lines.len());
    ca.shutdown().await;
}
