//! Egress with real kernel rules: pod `a` runs a real `ward-proxy` behind `ward-proxy init`'s
//! capture with `unknown: egress`; pod `b` plays the internet — two HTTPS/HTTP servers ("A" on
//! 10.250.2.2, "B" on 10.250.2.3) and dnsmasq as its DNS. The application in pod `a` (curl)
//! dials whatever address it likes; what it reaches is decided by the SNI or Host it sends and
//! the proxy's own resolution. Needs root, `ip`, `nft`, `setpriv`, `curl`, `python3` and
//! `dnsmasq`; a missing one fails the test with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pods::*;
use serde_json::Value;
use ward_proxy::config::{Listener, UnknownDestination};
use ward_proxy::egress::EgressCfg;
use ward_testing::netns::run;

const A_IP: &str = "10.250.2.2";
const B_IP: &str = "10.250.2.3";

const POLICY: &str = r#"
default: deny
services:
  - name: allowed-api
    protocol: tls
    hosts: [api.allowed.test]
    ports: [443]
    from: [ { principals: ["spiffe://capture.test/a"] } ]
  - name: wild
    protocol: tls
    hosts: ["*.wild.test"]
    ports: [443]
    from: [ { principals: ["spiffe://capture.test/a"] } ]
  - name: b-only
    protocol: tls
    hosts: [b-only.test]
    ports: [443]
    from: [ { principals: ["spiffe://capture.test/b"] } ]
  - name: status
    protocol: http
    hosts: [status.allowed.test]
    ports: [80]
    from: [ { principals: ["*"] } ]
  - name: secure-status
    protocol: http
    hosts: [secure.allowed.test]
    ports: [80]
    originate_tls: 443
    from: [ { principals: ["*"] } ]
"#;

/// The DNS records of the "internet" (dnsmasq `addn-hosts`).
fn hosts(api_ip: &str) -> String {
    format!(
        "{api_ip} api.allowed.test\n{A_IP} b-only.test\n{A_IP} status.allowed.test\n{A_IP} secure.allowed.test\n{B_IP} other.test\n"
    )
}

/// HTTPS through pod a's capture: `name` dialled at `ip` (curl's `--resolve`, so the
/// application's own idea of the address), certificate not checked (the test asks where the
/// connection landed). `None` when the connection was refused.
fn https(t: &Topology, name: &str, ip: &str) -> Option<Value> {
    let out = run(t.a.ns.as_user(APP_UID, "curl").args([
        "-sk",
        "-m",
        "10",
        "--resolve",
        &format!("{name}:443:{ip}"),
        &format!("https://{name}/x"),
    ]));
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn require_dnsmasq() {
    let ok = Command::new("sh")
        .args(["-c", "command -v dnsmasq"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "dnsmasq is missing (scripts/test-tools.sh installs dnsmasq-base)"
    );
}

/// The internet in pod b: a second address, servers A and B, dnsmasq with `hosts(A_IP)`.
/// Returns the records file and dnsmasq's pid file.
fn internet(t: &mut Topology) -> (std::path::PathBuf, std::path::PathBuf) {
    require_dnsmasq();
    // The internet: a second address, two servers, DNS.
    t.b.ns
        .ip(&["addr", "add", &format!("{B_IP}/32"), "dev", "lo"]);
    let cert = rcgen::generate_simple_self_signed(vec![
        "api.allowed.test".into(),
        "*.wild.test".into(),
        "other.test".into(),
        "b-only.test".into(),
        "secure.allowed.test".into(),
    ])
    .unwrap();
    let (crt, key) = (t.b.dir.join("origin.crt"), t.b.dir.join("origin.key"));
    std::fs::write(&crt, cert.cert.pem()).unwrap();
    std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns/origin.py");
    for (name, ip) in [("A", A_IP), ("B", B_IP)] {
        let mut cmd = t.b.ns.cmd(SYSTEM_PYTHON);
        cmd.args([script, name, ip]).arg(&crt).arg(&key);
        t.b.start_ready(cmd, &format!("origin {name}"));
    }
    let records = t.b.dir.join("hosts");
    std::fs::write(&records, hosts(A_IP)).unwrap();
    let pid_file = t.b.dir.join("dnsmasq.pid");
    let dns =
        t.b.ns
            .cmd("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={A_IP}"),
                "--port=53",
                "--local-ttl=1",
                "--user=root",
                "--address=/wild.test/10.250.2.2",
            ])
            .arg(format!("--addn-hosts={}", records.display()))
            .arg(format!("--pid-file={}", pid_file.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
    t.b.procs.push(Proc(dns, "dnsmasq".into()));

    (records, pid_file)
}

#[test]
fn pods_reach_only_the_external_services_named_for_them() {
    let mut t = Topology::new();
    let (records, pid_file) = internet(&mut t);
    let out = t.a.init(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pki = ward_testing::Pki::new(TD);
    t.a.start_proxy(&pki, "a", |c| {
        for l in &mut c.listeners {
            if let Listener::OutboundCapture(o) = l {
                o.unknown = UnknownDestination::Egress;
            }
        }
        c.egress = Some(EgressCfg {
            dns: Some(format!("{A_IP}:53").parse().unwrap()),
            policy: serde_yaml_ng::from_str(POLICY).unwrap(),
            from_agent: false,
            gateway: None,
            origination_roots: None,
        });
    });

    // The allowed name reaches its server.
    let got = https(&t, "api.allowed.test", A_IP).expect("allowed name refused");
    assert_eq!(
        (got["server"].as_str(), got["sni"].as_str()),
        (Some("A"), Some("api.allowed.test"))
    );
    // The same SNI dialled at the other server's address still lands where the name is.
    let got = https(&t, "api.allowed.test", B_IP).expect("allowed name refused");
    assert_eq!(got["server"], "A", "{got}");
    // Not on the list; an IP literal (no SNI); a wildcard is one label; no grant for a.
    assert!(https(&t, "other.test", B_IP).is_none());
    let out =
        run(t
            .a
            .ns
            .as_user(APP_UID, "curl")
            .args(["-sk", "-m", "10", &format!("https://{B_IP}/")]));
    assert!(!out.status.success(), "an IP literal got through");
    assert_eq!(
        https(&t, "x.wild.test", B_IP).expect("wildcard refused")["server"],
        "A"
    );
    assert!(https(&t, "a.b.wild.test", A_IP).is_none());
    assert!(https(&t, "b-only.test", A_IP).is_none());

    // Plaintext HTTP: the Host decides, and a forged one gets 403 with the reason.
    let (code, body) = t.a.curl_with(
        &format!("http://{B_IP}/p"),
        &["-H", "Host: status.allowed.test"],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["server"], "A");
    let (code, body) =
        t.a.curl_with(&format!("http://{B_IP}/p"), &["-H", "Host: evil.test"]);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("egress denied") && body.contains("evil.test:80"),
        "{body}"
    );

    // The record changes (rebinding): the proxy follows its own resolution once the 1 s TTL
    // ends, wherever the application dials.
    std::fs::write(&records, hosts(B_IP)).unwrap();
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    run(Command::new("kill").args(["-HUP", pid.trim()]));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = https(&t, "api.allowed.test", A_IP).expect("allowed name refused");
        if got["server"] == "B" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new DNS answer never applied"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Every decision is evidence: allowed ones name the host, the address reached and the
    // service; refusals the reason; the chain verifies.
    let ok = t.a.wait_record("allowed egress", |r| {
        r["plan"] == "egress" && r["host"] == "api.allowed.test" && r["decision"] == "allow"
    });
    assert_eq!(ok["policy"], "egress:allowed-api", "{ok}");
    assert!(ok["endpoint"].as_str().unwrap().ends_with(":443"), "{ok}");
    let denied = t.a.wait_record("refused egress", |r| {
        r["decision"] == "deny" && r["host"] == "b-only.test"
    });
    assert_eq!(denied["policy"], "egress:b-only", "{denied}");
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("may not use external service b-only"),
        "{denied}"
    );
    t.a.wait_record("forged Host", |r| {
        r["decision"] == "deny" && r["host"] == "evil.test" && r["status"] == 403
    });
    t.a.wait_record("IP literal", |r| {
        r["decision"] == "deny" && r["policy"] == "egress:default" && r["host"].is_null()
    });
    let verify = run(Command::new(env!("CARGO_BIN_EXE_ward-proxy"))
        .args(["log", "verify"])
        .arg(t.a.dir.join("access.jsonl")));
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// Gateway mode: pod a's sidecar sends every destination outside the mesh, unread, over mTLS
/// to the egress gateway (here in the internet's namespace, on :15008), which decides by the
/// caller's SPIFFE ID. A node rule stands in for the chart's NetworkPolicy: pod a may reach
/// the internet only at the gateway's port.
#[test]
fn the_egress_gateway_decides_for_the_caller_and_nothing_skips_it() {
    let mut t = Topology::new();
    let _ = internet(&mut t);
    let origin_cert = t.b.dir.join("origin.crt");
    std::os::unix::fs::chown(&origin_cert, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    let rules = "table inet wardtest {\n  chain pods {\n    type filter hook forward priority 0; policy accept;\n    ip saddr 10.250.1.0/24 ip daddr 10.250.2.0/24 tcp dport != 15008 drop\n  }\n}\n";
    let rules_file = t.a.dir.join("node-rules.nft");
    std::fs::write(&rules_file, rules).unwrap();
    let out = run(t.node.cmd("nft").arg("-f").arg(&rules_file));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pki = ward_testing::Pki::new(TD);
    t.b.start_proxy(&pki, "gateway", |c| {
        c.listeners = vec![Listener::EgressGateway(ward_proxy::config::EgressGateway {
            name: "egress-gw".into(),
            listen: "0.0.0.0:15008".parse().unwrap(),
        })];
        c.egress = Some(EgressCfg {
            dns: Some(format!("{A_IP}:53").parse().unwrap()),
            policy: serde_yaml_ng::from_str(POLICY).unwrap(),
            from_agent: false,
            gateway: None,
            // The test servers' certificate, as a private CA would be.
            origination_roots: Some(origin_cert.clone()),
        });
    });
    let out = t.a.init(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.a.start_proxy(&pki, "a", |c| {
        for l in &mut c.listeners {
            if let Listener::OutboundCapture(o) = l {
                o.unknown = UnknownDestination::Egress;
            }
        }
        c.egress = Some(EgressCfg {
            dns: None,
            policy: Default::default(),
            from_agent: false,
            gateway: Some(ward_proxy::egress::GatewayRef {
                address: format!("{A_IP}:15008"),
                expected_ids: vec![
                    ward_spiffe::SpiffeId::new(&format!("spiffe://{TD}/gateway")).unwrap(),
                ],
            }),
            origination_roots: None,
        });
    });

    // Through the gateway: the name decides, wherever the application dialled.
    let got = https(&t, "api.allowed.test", B_IP).expect("allowed name refused");
    assert_eq!(
        (got["server"].as_str(), got["sni"].as_str()),
        (Some("A"), Some("api.allowed.test"))
    );
    // The gateway decides for the caller: a name granted only to b is refused for a.
    assert!(https(&t, "b-only.test", A_IP).is_none());
    let (code, body) =
        t.a.curl_with(&format!("http://{B_IP}/p"), &["-H", "Host: evil.test"]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("egress denied"), "{body}");
    // TLS origination at the gateway: the application speaks plain HTTP, the server gets
    // verified HTTPS with the name as SNI.
    let (code, body) = t.a.curl_with(
        &format!("http://{B_IP}/o"),
        &["-H", "Host: secure.allowed.test"],
    );
    assert_eq!(code, 200, "{body}");
    let got: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (got["server"].as_str(), got["sni"].as_str()),
        (Some("A"), Some("secure.allowed.test")),
        "{got}"
    );
    // Skipping the gateway (as the proxy's own uid, which capture does not redirect) reaches
    // nothing: only the gateway's port is open towards the internet.
    let direct = run(t.a.ns.as_user(PROXY_UID, "curl").args([
        "-sk",
        "-m",
        "3",
        &format!("https://{A_IP}/"),
    ]));
    assert!(!direct.status.success(), "a direct connection got through");

    // Evidence on both sides: the sidecar tunnelled, the gateway decided for a.
    t.a.wait_record("tunnelled", |r| {
        r["plan"] == "egress-gateway" && r["decision"] == "allow"
    });
    let ok = t.b.wait_record("allowed at the gateway", |r| {
        r["plan"] == "egress" && r["host"] == "api.allowed.test"
    });
    assert_eq!(ok["src"], format!("spiffe://{TD}/a"), "{ok}");
    assert_eq!(ok["policy"], "egress:allowed-api", "{ok}");
    assert_eq!(ok["orig_dst"], format!("{B_IP}:443"), "{ok}");
    let denied = t.b.wait_record("refused at the gateway", |r| {
        r["decision"] == "deny" && r["host"] == "b-only.test"
    });
    assert_eq!(denied["src"], format!("spiffe://{TD}/a"), "{denied}");
    let verify = run(Command::new(env!("CARGO_BIN_EXE_ward-proxy"))
        .args(["log", "verify"])
        .arg(t.b.dir.join("access.jsonl")));
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}
