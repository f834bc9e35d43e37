//! The thin end-to-end path, with the real binaries and the unmodified Rust `spiffe` client:
//! `ward-ca dev` → agent → Workload API → X.509-SVID, bundles, JWT-SVID (fetched and
//! validated), an observed rotation, a clean stop, and a restart that keeps the trust domain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use futures::StreamExt;
use spiffe::{SpiffeId, TrustDomain, WorkloadApiClient};

#[test]
fn demo_shows_an_allowed_and_a_denied_request() {
    let dir = tempfile::tempdir().unwrap();
    let dev = common::Dev::start(&dir.path().join("w"), &["--demo"]);
    let mut lines = Vec::new();
    while !lines
        .last()
        .is_some_and(|l: &String| l.starts_with("demo: access log"))
    {
        lines.push(
            dev.lines
                .recv_timeout(Duration::from_secs(60))
                .expect("demo output"),
        );
    }
    let text = lines.join("\n");
    assert!(
        text.contains(
            "demo: GET /api/hello -> 200 hello from the backend, spiffe://example.org/demo/frontend"
        ),
        "{text}"
    );
    assert!(text.contains("demo: GET /admin -> 403 forbidden"), "{text}");
    // The frontend reached the backend as the static service backend.demo, resolved
    // through the agent to the backend proxy's address and ID.
    let dest = lines
        .iter()
        .find(|l| l.starts_with("demo: destination backend.demo:80 -> 127.0.0.1:"))
        .unwrap_or_else(|| panic!("no destination line:\n{text}"));
    assert!(
        dest.ends_with("(spiffe://example.org/demo/backend)"),
        "{dest}"
    );
    let out = std::process::Command::new(common::ca_bin())
        .args(["service", "list", "-o", "json", "--data-dir"])
        .arg(dir.path().join("w"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["services"][0]["name"], "backend.demo", "{v}");
    let logs: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("demo: log "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logs.len(), 2, "{text}");
    assert_eq!(logs[0]["access"]["decision"], "allow");
    assert_eq!(
        logs[0]["access"]["src"],
        "spiffe://example.org/demo/frontend"
    );
    assert_eq!(logs[1]["access"]["decision"], "deny");
    assert_eq!(logs[1]["access"]["path"], "/admin");
    assert!(dev.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_unmodified_spiffe_clients() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("w");
    let dev = common::Dev::start(
        &data,
        &["--x509-svid-ttl", "12s", "--trust-domain", "e2e.test"],
    );
    let uid = nix::unistd::getuid().as_raw();
    assert_eq!(dev.spiffe_id, format!("spiffe://e2e.test/dev/uid/{uid}"));

    let client = WorkloadApiClient::connect_to(dev.endpoint()).await.unwrap();

    // X.509-SVID and bundles.
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), dev.spiffe_id);
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = TrustDomain::new("e2e.test").unwrap();
    let bundle = bundles.get(&td).expect("bundle for our trust domain");
    assert_eq!(bundle.authorities().len(), 1);
    // The SVID verifies against the bundle with the shared validator.
    let chain: Vec<rustls_pki_types::CertificateDer<'_>> = svid
        .cert_chain()
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.as_bytes()))
        .collect();
    let roots: Vec<rustls_pki_types::CertificateDer<'_>> = bundle
        .authorities()
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.as_bytes()))
        .collect();
    let info = ward_spiffe::x509::verify_chain(
        &chain,
        &roots,
        &ward_spiffe::TrustDomain::new("e2e.test").unwrap(),
        std::time::SystemTime::now(),
        ward_spiffe::x509::Usage::Client,
    )
    .unwrap();
    assert_eq!(info.id.as_str(), dev.spiffe_id);

    // JWT-SVID: fetch, validate through the Workload API, and refuse the wrong audience.
    let jwt = client.fetch_jwt_svid(["payments"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), dev.spiffe_id);
    let validated = client
        .validate_jwt_token("payments", jwt.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id().to_string(), dev.spiffe_id);
    assert!(
        client
            .validate_jwt_token("other", jwt.token())
            .await
            .is_err()
    );
    let wanted = SpiffeId::new(&dev.spiffe_id).unwrap();
    let jwt2 = client
        .fetch_jwt_svid(["payments"], Some(&wanted))
        .await
        .unwrap();
    assert_eq!(jwt2.spiffe_id(), &wanted);
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let jb = jwt_bundles.get(&td).expect("JWT bundle");
    assert!(jb.find_jwt_authority(jwt.key_id()).is_some());

    // Rotation observed on the stream: a 12s SVID is replaced at about half its life.
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let first_leaf = first.leaf().as_bytes().to_vec();
    let rotated = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let next = stream.next().await.unwrap().unwrap();
            if next.leaf().as_bytes() != first_leaf.as_slice() {
                return next;
            }
        }
    })
    .await
    .expect("a rotated SVID within 20s");
    assert_eq!(rotated.spiffe_id(), first.spiffe_id());
    drop(stream);
    drop(client);

    // Clean stop, then a restart on the same data keeps the bundle and the identity.
    let root_before = bundle.authorities()[0].as_bytes().to_vec();
    let status = dev.stop();
    assert!(status.success(), "ward-ca dev exit status {status}");
    let dev = common::Dev::start(
        &data,
        &["--x509-svid-ttl", "12s", "--trust-domain", "e2e.test"],
    );
    let client = WorkloadApiClient::connect_to(dev.endpoint()).await.unwrap();
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let root_after = bundles.get(&td).unwrap().authorities()[0]
        .as_bytes()
        .to_vec();
    assert_eq!(
        root_before, root_after,
        "trust bundle changed across restart"
    );
    assert_eq!(
        client
            .fetch_x509_svid()
            .await
            .unwrap()
            .spiffe_id()
            .to_string(),
        dev.spiffe_id
    );
    assert!(dev.stop().success());
}
