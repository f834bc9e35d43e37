//! The `ward-proxy` command line: `policy explain`, `log verify`, `check-config`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ward-proxy"))
}

/// A record of request `i` for the access-log tests.
fn entry(i: u64) -> ward_proxy::access_log::Entry {
    ward_proxy::access_log::Entry {
        time: std::time::SystemTime::now(),
        listener: std::sync::Arc::from("in"),
        protocol: "http",
        src: Some("spiffe://td/a".into()),
        dst: Some("spiffe://td/proxy".into()),
        method: Some("GET".into()),
        path: Some(format!("/{i}")),
        orig_dst: None,
        plan: "deliver",
        endpoint: None,
        route: None,
        host: None,
        client: None,
        status: 200,
        decision: "allow",
        policy: "p".into(),
        reason: "r".into(),
        audit: None,
        latency: std::time::Duration::from_micros(1),
        bytes_in: 0,
        bytes_out: 0,
    }
}

/// A credential sink holding `spiffe://td/proxy`'s SVID from `pki`: what signs the anchors.
fn signing_sink(pki: &ward_testing::Pki) -> std::sync::Arc<ward_net::CredentialSink> {
    let issued = pki.svid("/proxy");
    let sink = ward_proxy::identity::new_sink(false);
    let mut b = ward_spiffe::Bundle::new(ward_spiffe::TrustDomain::new("td").unwrap());
    b.x509_authorities = vec![pki.root_der().to_vec()];
    ward_proxy::identity::install(
        &sink,
        b,
        ward_net::Svid::from_parts(issued.chain_der, issued.key_der).unwrap(),
    )
    .unwrap();
    sink
}

const POLICIES: &str = r#"
policies:
  - name: allow-frontend
    target: { spiffe_ids: ["spiffe://td/backend"] }
    action: ALLOW
    rules:
      - from: [ { principals: ["spiffe://td/frontend"] } ]
        to: [ { methods: ["GET"], paths: ["/api/*"] } ]
"#;

#[test]
fn policy_explain_answers_can_a_call_b() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.yaml");
    std::fs::write(&p, POLICIES).unwrap();
    let run = |args: &[&str]| {
        let out = bin()
            .args(["policy", "explain", "--policies"])
            .arg(&p)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&[
        "--source",
        "spiffe://td/frontend",
        "--target",
        "spiffe://td/backend",
        "--method",
        "GET",
        "--path",
        "/api/x",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("decision: ALLOW")
            && out.contains("allowed by policy allow-frontend (rule 0)"),
        "{out}"
    );
    let (code, out, _) = run(&[
        "--source",
        "spiffe://td/other",
        "--target",
        "spiffe://td/backend",
        "--method",
        "GET",
        "--path",
        "/api/x",
    ]);
    assert_eq!(code, 8, "{out}");
    assert!(
        out.contains("rule 0: did not match: no source matched (`principals`)"),
        "{out}"
    );
    let (code, out, _) = run(&[
        "--source",
        "spiffe://td/frontend",
        "--target",
        "spiffe://td/backend",
        "--method",
        "GET",
        "--path",
        "/api/%2e%2e/x",
        "-o",
        "json",
    ]);
    assert_eq!(code, 8, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["decision"], "DENY");
    let (code, out, _) = run(&[
        "--source",
        "spiffe://td/frontend",
        "--target",
        "spiffe://td/backend",
        "--method",
        "GET",
        "--path",
        "/a%2fb",
    ]);
    assert_eq!(code, 8);
    assert!(out.contains("ambiguous request path"), "{out}");
    // TCP (no method or path) with a default for untargeted workloads.
    let (code, out, _) = run(&[
        "--source",
        "spiffe://td/frontend",
        "--target",
        "spiffe://td/db",
        "--default",
        "same-trust-domain",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("default policy same-trust-domain"), "{out}");
    // Bad input: exit 2 with a message.
    let (code, _, err) = run(&["--target", "not-an-id"]);
    assert_eq!(code, 2);
    assert!(err.contains("--target"), "{err}");
    std::fs::write(&p, "policies: [ { name: x } ]").unwrap();
    let (code, _, err) = run(&["--target", "spiffe://td/b"]);
    assert_eq!(code, 2);
    assert!(err.contains("p.yaml"), "{err}");
}

#[test]
fn log_verify_reports_the_first_broken_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    // Build a real chain with the library's writer, through a running access log whose
    // anchors the proxy's SVID signs.
    let pki = ward_testing::Pki::new("td");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, pki.bundle_pem()).unwrap();
    let sink = signing_sink(&pki);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = ward_proxy::config::AccessLog {
            queue: 64,
            ..ward_proxy::config::AccessLog::at(path.clone())
        };
        let log = ward_proxy::access_log::start(
            &cfg,
            Some(sink.clone()),
            ward_proxy::metrics::Metrics::new(),
        )
        .unwrap();
        for i in 0..5 {
            log.log(None, entry(i));
        }
        // Still open: the records after the (signed) start anchor are unproven; --strict
        // refuses that.
        let mut lines = 0;
        for _ in 0..200 {
            lines = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .count();
            if lines >= 6 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(lines, 6);
        let out = bin().args(["log", "verify"]).arg(&path).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}");
        assert!(
            stdout.contains("6 records") && stdout.contains("UNPROVEN: 5 records"),
            "{stdout}"
        );
        let out = bin()
            .args(["log", "verify", "--strict", "--bundle"])
            .arg(&bundle)
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        log.close(std::time::Duration::from_secs(5)).await;
    });
    // Closed: a signed close anchor proves every record, against the bundle.
    let out = bin()
        .args(["log", "verify", "--strict", "--bundle"])
        .arg(&bundle)
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("7 records")
            && stdout.contains("signed anchors:     2 by spiffe://td/proxy")
            && stdout.contains("closed: the file ends with a signed close anchor")
            && stdout.contains("OK"),
        "{stdout}"
    );
    // A bundle that did not certify the signer.
    let other = dir.path().join("other.pem");
    std::fs::write(&other, ward_testing::Pki::new("td").bundle_pem()).unwrap();
    let out = bin()
        .args(["log", "verify", "--bundle"])
        .arg(&other)
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not trusted by the bundle"));
    let text = std::fs::read_to_string(&path).unwrap();
    let tampered = text.replacen("\"/3\"", "\"/x\"", 1);
    std::fs::write(&path, tampered).unwrap();
    let out = bin().args(["log", "verify"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("BROKEN at line 6"), "{stdout}");
    let out = bin()
        .args(["log", "verify"])
        .arg(dir.path().join("missing.jsonl"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_config_validates_policies_too() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.yaml");
    std::fs::write(&p, POLICIES).unwrap();
    let c = dir.path().join("c.yaml");
    std::fs::write(
        &c,
        format!(
            "identity:\n  files: {{ chain: /c, key: /k, bundle: /b, trust_domain: td }}\nauthorization:\n  policy_files: [\"{}\"]\n",
            p.display()
        ),
    )
    .unwrap();
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&c)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("peer_id_header: x-ward-peer-id"));
    std::fs::write(
        &p,
        "policies:\n  - { name: a, target: { spiffe_ids: [\"bad\"] }, action: ALLOW }\n",
    )
    .unwrap();
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&c)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spiffe_ids"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&c, "identity: {}\nnope: 1\n").unwrap();
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&c)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `log verify` over a rotated log: the files, oldest first, verify as one chain with a signed
/// close at the end of each; a missing file in between is found.
#[test]
fn log_verify_follows_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let pki = ward_testing::Pki::new("td");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, pki.bundle_pem()).unwrap();
    let sink = signing_sink(&pki);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = ward_proxy::config::AccessLog {
            max_bytes: 4096,
            ..ward_proxy::config::AccessLog::at(path.clone())
        };
        let log =
            ward_proxy::access_log::start(&cfg, Some(sink), ward_proxy::metrics::Metrics::new())
                .unwrap();
        for i in 0..60 {
            log.log(None, entry(i));
        }
        log.close(std::time::Duration::from_secs(5)).await;
    });
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl") && *p != path)
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    files.push(path.clone());
    let verify = |files: &[std::path::PathBuf]| {
        let out = bin()
            .args(["log", "verify", "--strict", "--bundle"])
            .arg(&bundle)
            .args(files)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, stdout) = verify(&files);
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(stdout.matches("OK: hash chain intact").count(), files.len());
    // One file in the middle removed from the set: the next one does not continue.
    let mut gap = files.clone();
    gap.remove(1);
    let (code, stdout) = verify(&gap);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("does not continue the one before it"),
        "{stdout}"
    );
}
