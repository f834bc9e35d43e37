//! The mesh's egress configuration as data: `ward-ca egress apply/show/explain` against a real
//! CA (refused files change nothing; explain's exit code says the decision), and the path
//! every configuration takes to the sidecars — CA store → sync stream → agent → the proxy's
//! policy stream — with real processes in between.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::mesh::{cfg, mesh};
use ward_proxy::config::{Listener, OutboundCapture, UnknownDestination};

const EGRESS: &str = r#"
egress:
  default: deny
  namespaces: { legacy: allow }
  services:
    - name: stripe
      protocol: tls
      hosts: [api.stripe.com]
      ports: [443]
      from: [ { namespaces: [shop] } ]
    - name: db
      protocol: tcp
      addresses: [192.0.2.0/24]
      ports: [5432]
      from: [ { principals: ["*"] } ]
"#;

#[test]
fn egress_is_applied_shown_and_explained_with_the_cli() {
    use common::cli::CaProcess;
    let ca = CaProcess::start();
    let file = ca.root.path().join("egress.yaml");
    std::fs::write(&file, EGRESS).unwrap();
    let f = file.to_str().unwrap();
    let out = ca.cli(&["egress", "apply", "-f", f]);
    out.ok();
    assert!(
        out.stdout
            .contains("Applied egress (revision 1, 2 external services, default deny)"),
        "{out:?}"
    );
    let v = ca.cli(&["egress", "show", "-o", "json"]).json();
    assert_eq!(v["egress"]["revision"], 1);
    assert_eq!(v["egress"]["services"][0]["hosts"][0], "api.stripe.com");
    assert_eq!(v["egress"]["namespaces"]["legacy"], "allow");

    // "May X reach api.stripe.com:443?"
    let web = "spiffe://cli.test/ns/shop/sa/web";
    let out = ca.cli(&[
        "egress",
        "explain",
        "--source",
        web,
        "--host",
        "api.stripe.com",
        "--port",
        "443",
    ]);
    out.ok();
    assert!(
        out.stdout.contains("decision: ALLOW")
            && out.stdout.contains("service:  stripe")
            && out.stdout.contains("own resolution of api.stripe.com"),
        "{out:?}"
    );
    let blog = "spiffe://cli.test/ns/blog/sa/web";
    let out = ca.cli(&[
        "egress",
        "explain",
        "--source",
        blog,
        "--host",
        "api.stripe.com",
        "--port",
        "443",
        "-o",
        "json",
    ]);
    assert_eq!(out.code, Some(8), "{out:?}");
    let v = out.json();
    assert_eq!(v["decision"], "DENY");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("may not use external service stripe"),
        "{v}"
    );
    ca.cli(&[
        "egress",
        "explain",
        "--source",
        blog,
        "--protocol",
        "tcp",
        "--address",
        "192.0.2.7",
        "--port",
        "5432",
    ])
    .ok();
    let out = ca.cli(&[
        "egress",
        "explain",
        "--source",
        web,
        "--host",
        "evil.example",
        "--port",
        "443",
    ]);
    assert_eq!(out.code, Some(8), "{out:?}");
    assert!(
        out.stdout
            .contains("evil.example:443 is not an allowed external service"),
        "{out:?}"
    );
    ca.cli(&[
        "egress",
        "explain",
        "--source",
        "spiffe://cli.test/ns/legacy/sa/x",
        "--host",
        "evil.example",
        "--port",
        "443",
    ])
    .ok();
    ca.cli(&["egress", "explain", "--protocol", "udp", "--port", "53"])
        .fails(2)
        .stderr_has("udp");

    // A refused file changes nothing.
    std::fs::write(&file, EGRESS.replace("api.stripe.com", "api.*.com")).unwrap();
    ca.cli(&["egress", "apply", "-f", f])
        .fails(2)
        .stderr_has("api.*.com");
    std::fs::write(&file, EGRESS.replace("protocol: tcp", "protocol: udp")).unwrap();
    ca.cli(&["egress", "apply", "-f", f])
        .fails(2)
        .stderr_has("udp");
    let v = ca.cli(&["egress", "show", "-o", "json"]).json();
    assert_eq!(v["egress"]["revision"], 1);
    assert_eq!(v["egress"]["services"][0]["hosts"][0], "api.stripe.com");
}

/// Waits until the proxy's `/egress` view satisfies `ok`.
async fn wait_view(p: &ward_proxy::Proxy, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let mut last = String::new();
    for _ in 0..200 {
        let (status, body) = common::mesh::admin_get(p, "/egress").await;
        if status == 200
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
            && ok(&v)
        {
            return;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the proxy never had {what}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_reaches_the_proxy_through_the_agent_and_follows_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent) = mesh(dir.path(), &["client"]).await;
    let mut c = cfg(&agent.socket_path, "client");
    c.authorization.from_agent = true;
    c.egress = Some(ward_proxy::egress::EgressCfg {
        dns: Some("127.0.0.1:53".parse().unwrap()),
        // Only until the agent answers: then the CA's configuration replaces it.
        policy: ward_spiffe::egress::EgressDoc {
            default: ward_spiffe::egress::Mode::Allow,
            ..Default::default()
        },
        from_agent: true,
        gateway: None,
        origination_roots: None,
    });
    c.listeners = vec![Listener::OutboundCapture(OutboundCapture {
        name: "out".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        protocol: Default::default(),
        routes: vec![],
        unknown: UnknownDestination::Egress,
    })];
    let p = ward_proxy::Proxy::start(c).await.unwrap();
    // Before anything is written the CA's empty configuration applies (deny), replacing the
    // file's allow.
    wait_view(&p, "the CA's empty configuration", |v| {
        v["default"] == "deny" && v["services"] == serde_json::json!([])
    })
    .await;
    let doc: ward_spiffe::egress::EgressDoc = serde_yaml_ng::from_value(
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>(EGRESS).unwrap()["egress"].clone(),
    )
    .unwrap();
    ca.core.egress.put(doc.clone()).await.unwrap();
    wait_view(&p, "the applied configuration", |v| {
        v["services"][0]["name"] == "stripe" && v["namespaces"]["legacy"] == "allow"
    })
    .await;
    let mut changed = doc;
    changed.services.remove(0);
    changed.default = ward_spiffe::egress::Mode::Allow;
    ca.core.egress.put(changed).await.unwrap();
    wait_view(&p, "the changed configuration", |v| {
        v["default"] == "allow" && v["services"][0]["name"] == "db"
    })
    .await;
    p.shutdown().await;
    agent.shutdown().await;
    ca.shutdown().await;
}
