//! Traffic capture with real kernel rules: two "pods" and a "node" as network namespaces joined
//! by veth pairs (IPv4 and IPv6), each pod running a plain application bound to all addresses
//! and a real `ward-proxy` (as its own uid) after `ward-proxy init` installed the nftables
//! rules. Needs root, `ip`, `nft`, `setpriv`, `curl` and `python3`; a missing one fails the test
//! with the reason (nothing is skipped).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::pods::*;
use serde_json::Value;
use ward_proxy::config::{Authorization, Listener, Probe, ProxyConfig};
use ward_spiffe::policy::DefaultPolicy;
use ward_testing::netns::{must, run};

const POLICIES: &str = r#"
policies:
  - name: b-allows-a
    target: { spiffe_ids: ["spiffe://capture.test/b"] }
    action: ALLOW
    rules: [ { from: [ { principals: ["spiffe://capture.test/a"] } ], to: [ { ports: [8080], paths: ["/api/*"] } ] } ]
"#;

fn with_policies(pod: &Pod, default: DefaultPolicy) -> impl FnOnce(&mut ProxyConfig) + use<> {
    let path = pod.dir.join("policies.yaml");
    std::fs::write(&path, POLICIES).unwrap();
    move |c: &mut ProxyConfig| {
        c.authorization = Authorization {
            default,
            policy_files: vec![path],
            ..Default::default()
        };
    }
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn meshed_pods_talk_over_mtls_and_nothing_goes_around_the_proxy() {
    let mut t = Topology::new();
    t.a.start_app("a");
    t.b.start_app("b");
    for pod in [&t.a, &t.b] {
        let out = pod.init(&["--exclude-inbound-ports", "9090"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pa = with_policies(&t.a, DefaultPolicy::Deny);
    t.a.start_proxy(&t.pki, "a", pa);
    let pb = with_policies(&t.b, DefaultPolicy::Deny);
    let probes = vec![Probe {
        port: 8080,
        path: "/healthz".into(),
    }];
    t.b.start_proxy(&t.pki, "b", move |c| {
        pb(c);
        if let Listener::InboundCapture(i) = &mut c.listeners[0] {
            i.probes = probes;
        }
    });

    // The application in pod a calls pod b's IP and port in plain HTTP, unchanged: its proxy
    // captures the call, carries it over mTLS, pod b's proxy authorizes it and delivers it.
    let (code, body) = t.a.curl(&format!("http://{}:8080/api/hello", t.b.v4));
    assert_eq!(code, 200, "{body}");
    let got = json(&body);
    assert_eq!(got["pod"], "b");
    assert_eq!(got["peer"], "spiffe://capture.test/a", "{got}");
    let rec =
        t.b.wait_record("for /api/hello on b", |r| r["path"] == "/api/hello");
    assert_eq!(rec["src"], "spiffe://capture.test/a", "{rec}");
    assert_eq!(rec["decision"], "allow", "{rec}");
    assert_eq!(rec["plan"], "deliver", "{rec}");
    assert_eq!(rec["orig_dst"], format!("{}:8080", t.b.v4), "{rec}");
    let out =
        t.a.wait_record("for /api/hello on a", |r| r["path"] == "/api/hello");
    assert_eq!(out["plan"], "mesh", "{out}");
    assert_eq!(out["dst"], "spiffe://capture.test/b", "{out}");
    assert_eq!(out["orig_dst"], format!("{}:8080", t.b.v4), "{out}");
    // The proxy's own connection was not captured again: one outbound record, no loop.
    assert_eq!(
        t.a.log()
            .iter()
            .filter(|r| r["path"] == "/api/hello")
            .count(),
        1,
        "{:#?}",
        t.a.log()
    );

    // IPv6 works the same way.
    let (code, body) = t.a.curl(&format!("http://[{}]:8080/api/six", t.b.v6));
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["peer"], "spiffe://capture.test/a");
    let rec = t.b.wait_record("for /api/six", |r| r["path"] == "/api/six");
    assert_eq!(rec["orig_dst"], format!("[{}]:8080", t.b.v6), "{rec}");

    // A meshed caller that policy denies gets 403, never the application.
    let (code, body) = t.a.curl(&format!("http://{}:8080/admin", t.b.v4));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("forbidden"), "{body}");
    let denied = t.b.wait_record("for /admin", |r| r["path"] == "/admin");
    assert_eq!(denied["decision"], "deny");

    // An unmeshed caller (the node, no proxy) dialling the pod IP and application port is
    // captured too, and refused under default deny; the kubelet's probe path is let in.
    let (code, body) = curl(
        t.node.cmd("curl"),
        &format!("http://{}:8080/api/hello", t.b.v4),
    );
    assert_eq!(code, 403, "{body}");
    let unauth = t.b.wait_record("unauthenticated", |r| {
        r["src"].is_null() && r["path"] == "/api/hello"
    });
    assert_eq!(unauth["decision"], "deny", "{unauth}");
    let (code, body) = curl(
        t.node.cmd("curl"),
        &format!("http://{}:8080/healthz", t.b.v4),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["peer"], Value::Null);
    let probe = t.b.wait_record("probe", |r| r["path"] == "/healthz");
    assert_eq!(probe["policy"], "probe", "{probe}");
    // By IPv6 as well.
    let (code, _) = curl(
        t.node.cmd("curl"),
        &format!("http://[{}]:8080/api/hello", t.b.v6),
    );
    assert_eq!(code, 403);

    // An excluded port reaches the application directly.
    let (code, body) = curl(
        t.node.cmd("curl"),
        &format!("http://{}:9090/direct", t.b.v4),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["port"], 9090);
    assert!(
        !t.b.log().iter().any(|r| r["path"] == "/direct"),
        "the excluded port did not go through the proxy"
    );

    // A destination outside the mesh table is passed through (plaintext, as dialled): pod b's
    // excluded port 9090 from pod a.
    let (code, body) = t.a.curl(&format!("http://{}:9090/outside", t.b.v4));
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["peer"], Value::Null);
    let pass =
        t.a.wait_record("passthrough", |r| r["plan"] == "passthrough");
    assert_eq!(pass["orig_dst"], format!("{}:9090", t.b.v4), "{pass}");

    // UDP is not captured: the echo answers directly.
    let udp = t
        .a
        .ns
        .as_user(APP_UID, SYSTEM_PYTHON)
        .args([
            "-c",
            &format!(
                "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); \
                 s.sendto(b'ping', ('{}', 5353)); print(s.recv(100).decode())",
                t.b.v4
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&udp.stdout).trim(),
        "b:ping",
        "{udp:?}"
    );
}

#[test]
fn all_unauthenticated_lets_unmeshed_callers_in_and_strict_ports_refuse_plaintext() {
    let mut t = Topology::new();
    t.b.start_app("b");
    assert!(t.b.init(&[]).status.success());
    // No ALLOW policy targets b, so its default decides.
    t.b.start_proxy(&t.pki, "b", move |c| {
        c.authorization.default = DefaultPolicy::AllUnauthenticated;
        if let Listener::InboundCapture(i) = &mut c.listeners[0] {
            i.ports.insert(
                9090,
                ward_proxy::config::PortMode {
                    tls: ward_proxy::config::TlsMode::Strict,
                    ..Default::default()
                },
            );
        }
    });
    let (code, body) = curl(t.node.cmd("curl"), &format!("http://{}:8080/open", t.b.v4));
    assert_eq!(code, 200, "{body}");
    // A packet routed to pod b for another address is not captured: b's proxy (which lets
    // anyone in here) must not relay it to pod a.
    t.a.start_app("a");
    t.node.ip(&[
        "route",
        "replace",
        &format!("{}/32", t.a.v4),
        "via",
        &t.b.v4,
    ]);
    let (relayed, text) = curl(t.node.cmd("curl"), &format!("http://{}:8080/relay", t.a.v4));
    assert_eq!(
        relayed, 0,
        "the proxy relayed a foreign destination: {text}"
    );
    t.node.ip(&["route", "del", &format!("{}/32", t.a.v4)]);
    assert_eq!(json(&body)["peer"], Value::Null, "no identity is invented");
    let rec = t.b.wait_record("open", |r| r["path"] == "/open");
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["src"], Value::Null);
    // A strict port takes mTLS only: the plaintext caller gets a closed connection.
    let (code, _) = curl(
        t.node.cmd("curl"),
        &format!("http://{}:9090/strict", t.b.v4),
    );
    assert_eq!(code, 0, "plaintext on a strict port must not be answered");
}

#[test]
fn init_is_idempotent_prints_with_dry_run_and_remove_restores_reachability() {
    let mut t = Topology::new();
    t.b.start_app("b");
    let list = |p: &Pod| must(p.ns.cmd("nft").args(["list", "table", "inet", "ward"]));
    let out = t.b.init(&[
        "--exclude-outbound-cidrs",
        "169.254.169.254/32",
        "--exclude-outbound-ports",
        "53",
    ]);
    assert!(out.status.success(), "{out:?}");
    let first = list(&t.b);
    assert!(
        first.contains("redirect to :15006") && first.contains("redirect to :15001"),
        "{first}"
    );
    assert!(first.contains("meta skuid 1337 return"), "{first}");
    assert!(first.contains("fib daddr type != local return"), "{first}");
    let again = t.b.init(&[
        "--exclude-outbound-cidrs",
        "169.254.169.254/32",
        "--exclude-outbound-ports",
        "53",
    ]);
    assert!(again.status.success());
    assert_eq!(list(&t.b), first, "running init twice changes nothing");
    let ruleset = must(t.b.ns.cmd("nft").args(["list", "ruleset"]));
    assert_eq!(ruleset.matches("table inet ward").count(), 1, "{ruleset}");
    // Dry run prints the script and installs nothing new.
    let dry =
        run(t
            .b
            .ns
            .cmd(proxy_bin().to_str().unwrap())
            .args(["init", "--dry-run", "--no-outbound"]));
    let script = String::from_utf8_lossy(&dry.stdout);
    assert!(
        script.contains("chain inbound") && !script.contains("chain outbound"),
        "{script}"
    );
    assert_eq!(list(&t.b), first);
    // Captured: with no proxy listening, the application is not reachable from the node.
    let (code, _) = curl(t.node.cmd("curl"), &format!("http://{}:8080/x", t.b.v4));
    assert_eq!(
        code, 0,
        "captured port must not reach the app without its proxy"
    );
    // Removed: reachable directly again; removing twice is fine.
    assert!(t.b.init(&["--remove"]).status.success());
    assert!(t.b.init(&["--remove"]).status.success());
    assert!(
        !run(t.b.ns.cmd("nft").args(["list", "table", "inet", "ward"]))
            .status
            .success()
    );
    let (code, body) = curl(t.node.cmd("curl"), &format!("http://{}:8080/x", t.b.v4));
    assert_eq!(code, 200, "{body}");
}

#[test]
fn init_without_net_admin_says_what_is_missing() {
    let t = Topology::new();
    let out = run(t
        .b
        .ns
        .as_user(APP_UID, proxy_bin().to_str().unwrap())
        .arg("init"));
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    assert!(
        !run(t.b.ns.cmd("nft").args(["list", "table", "inet", "ward"]))
            .status
            .success()
    );
    let out =
        run(t
            .b
            .ns
            .cmd(proxy_bin().to_str().unwrap())
            .args(["init", "--nft", "/nonexistent/nft"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("install nftables"));
}
