//! The `ward-ca` command line against a real `ward-ca run` child process: every admin
//! subcommand's output (text and JSON) and exit code, refusals of invalid arguments that leave
//! the store untouched, an unreachable CA, and `run`/`check-config` with configuration files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cli::{CaProcess, TD, cli_in, run_bin};
const PARENT: &str = "spiffe://cli.test/ward/agent/join_token/parent";

fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z'
        && s.chars()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10 | 13 | 16 | 19) || c.is_ascii_digit())
}

/// An invalid `entry create`: spiffe_id, parent_id, selectors, extra arguments, and a word
/// the error message must contain (the field's name).
type BadCase = (
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    &'static str,
);

fn create_args<'a>(spiffe_id: &'a str, parent_id: &'a str, selectors: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        parent_id,
    ];
    for s in selectors {
        a.push("--selector");
        a.push(s);
    }
    a
}

#[test]
fn token_create_text_and_json() {
    let ca = CaProcess::start();

    let out = ca.cli(&["token", "create"]);
    out.ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out:#?}");
    let token = lines[0].strip_prefix("Token:").expect("Token: line").trim();
    assert!(
        token.len() >= 32 && token.bytes().all(|c| c.is_ascii_hexdigit()),
        "{out:#?}"
    );
    let agent = lines[1]
        .strip_prefix("Agent ID:")
        .expect("Agent ID: line")
        .trim();
    assert!(
        agent.starts_with("spiffe://cli.test/ward/agent/join_token/"),
        "{out:#?}"
    );
    let expires = lines[2]
        .strip_prefix("Expires at:")
        .expect("Expires at: line")
        .trim();
    assert!(is_rfc3339_utc(expires), "{out:#?}");

    let out = ca.cli(&["token", "create", "--ttl", "5m", "-o", "json"]);
    out.ok();
    let v = out.json();
    let obj = v.as_object().expect("JSON object");
    let t = obj["token"].as_str().expect("token is a string");
    assert!(t.len() >= 32 && t != token, "{out:#?}");
    let a = obj["agent_id"].as_str().expect("agent_id is a string");
    assert!(
        a.starts_with("spiffe://cli.test/ward/agent/join_token/") && a != agent,
        "{out:#?}"
    );
    assert!(
        is_rfc3339_utc(obj["expires_at"].as_str().expect("expires_at is a string")),
        "{out:#?}"
    );

    // A TTL above the CA's maximum (7 days) is an invalid argument.
    ca.cli(&["token", "create", "--ttl", "8d"])
        .fails(2)
        .stderr_has("7 days");
    // An unparsable TTL is a usage error reported by the argument parser.
    let out = ca.cli(&["token", "create", "--ttl", "ten minutes"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stdout.is_empty(), "{out:#?}");
}

#[test]
fn entry_lifecycle() {
    let ca = CaProcess::start();
    let web = "spiffe://cli.test/web";
    assert!(ca.entries().is_empty());

    // Create, text output.
    let mut args = create_args(web, PARENT, &["unix:uid:1000", "unix:gid:1000"]);
    args.extend(["--dns-name", "web.cli.test", "--hint", "front"]);
    let out = ca.cli(&args);
    out.ok();
    let field = |name: &str| -> Vec<String> {
        out.stdout
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    };
    let text_id = field("Entry ID").pop().expect("Entry ID line");
    assert_eq!(field("SPIFFE ID"), vec![web.to_owned()], "{out:#?}");
    assert_eq!(field("Parent ID"), vec![PARENT.to_owned()], "{out:#?}");
    let mut selectors = field("Selector");
    selectors.sort();
    assert_eq!(selectors, ["unix:gid:1000", "unix:uid:1000"], "{out:#?}");
    assert_eq!(
        field("DNS name"),
        vec!["web.cli.test".to_owned()],
        "{out:#?}"
    );
    assert_eq!(field("Hint"), vec!["front".to_owned()], "{out:#?}");
    assert_eq!(
        field("X509-SVID TTL"),
        vec!["default".to_owned()],
        "{out:#?}"
    );

    // Create, JSON output.
    let api = "spiffe://cli.test/api";
    let mut args = create_args(api, PARENT, &["unix:uid:1001"]);
    args.extend(["--x509-svid-ttl", "10m", "-o", "json"]);
    let out = ca.cli(&args);
    out.ok();
    let e = out.json();
    let id = e["id"].as_str().expect("id").to_owned();
    assert!(!id.is_empty() && id != text_id, "{out:#?}");
    assert_eq!(e["spiffe_id"], api, "{out:#?}");
    assert_eq!(e["parent_id"], PARENT, "{out:#?}");
    assert_eq!(
        e["selectors"],
        serde_json::json!(["unix:uid:1001"]),
        "{out:#?}"
    );
    assert_eq!(e["x509_svid_ttl"], 600, "{out:#?}");
    let rev = e["revision"].as_u64().expect("revision is a number");
    assert!(rev >= 1, "{out:#?}");

    // Both are listed, and `entry show` agrees with what create returned.
    let list = ca.entries();
    assert_eq!(list.len(), 2, "{list:#?}");
    let shown = ca.cli(&["entry", "show", &id, "-o", "json"]);
    shown.ok();
    assert_eq!(shown.json(), e);
    let shown = ca.cli(&["entry", "show", &text_id]);
    shown.ok();
    assert!(shown.stdout.contains(web), "{shown:#?}");

    // The same entry again: already exists, nothing stored.
    ca.cli(&create_args(api, PARENT, &["unix:uid:1001"]))
        .fails(4)
        .stderr_has(&id);
    assert_eq!(ca.entries(), list);

    // Unknown and malformed IDs.
    ca.cli(&["entry", "show", "00000000-0000-0000-0000-000000000000"])
        .fails(3)
        .stderr_has("not found");
    ca.cli(&["entry", "show", "no/such/id"]).fails(2);

    // Update with a stale revision: conflict, unchanged.
    let moved = "spiffe://cli.test/api-v2";
    let mut args = vec!["entry", "update", id.as_str()];
    args.extend(&create_args(moved, PARENT, &["unix:uid:1001"])[2..]);
    let stale = (rev + 100).to_string();
    let mut stale_args = args.clone();
    stale_args.extend(["--revision", stale.as_str()]);
    ca.cli(&stale_args).fails(4).stderr_has("revision");
    assert_eq!(ca.entries(), list);

    // Update with the current revision: applied, new revision.
    let cur = rev.to_string();
    let mut ok_args = args.clone();
    ok_args.extend(["--revision", cur.as_str(), "-o", "json"]);
    let out = ca.cli(&ok_args);
    out.ok();
    let updated = out.json();
    assert_eq!(updated["id"], id.as_str(), "{out:#?}");
    assert_eq!(updated["spiffe_id"], moved, "{out:#?}");
    let new_rev = updated["revision"].as_u64().unwrap();
    assert!(new_rev > rev, "{out:#?}");
    let shown = ca.cli(&["entry", "show", &id, "-o", "json"]);
    shown.ok();
    assert_eq!(shown.json()["revision"], new_rev);
    assert_eq!(shown.json()["spiffe_id"], moved);
    // The old revision is now stale too.
    ca.cli(&ok_args).fails(4);

    // Filters.
    let out = ca.cli(&["entry", "list", "--spiffe-id", moved, "-o", "json"]);
    out.ok();
    assert_eq!(out.json().as_array().unwrap().len(), 1, "{out:#?}");
    let out = ca.cli(&["entry", "list"]);
    out.ok();
    assert!(out.stdout.starts_with("Found 2 entries"), "{out:#?}");

    // Delete, then it is gone.
    let out = ca.cli(&["entry", "delete", &id]);
    out.ok();
    assert!(out.stdout.contains(&id), "{out:#?}");
    ca.cli(&["entry", "show", &id]).fails(3);
    ca.cli(&["entry", "delete", &id]).fails(3);
    let list = ca.entries();
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["id"], text_id.as_str());
    // Updating a deleted entry is "not found".
    let mut gone = vec!["entry", "update", id.as_str()];
    gone.extend(&create_args(moved, PARENT, &["unix:uid:1001"])[2..]);
    ca.cli(&gone).fails(3);
}

#[test]
fn invalid_entries_are_refused_and_nothing_is_stored() {
    let ca = CaProcess::start();
    // One valid entry so that "nothing new" is compared against a non-empty list.
    ca.cli(&create_args(
        "spiffe://cli.test/existing",
        PARENT,
        &["unix:uid:1"],
    ))
    .ok();
    let before = ca.entries();
    assert_eq!(before.len(), 1);

    let good_id = "spiffe://cli.test/new";
    let cases: &[BadCase] = &[
        (
            "spiffe://cli.test/a//b",
            PARENT,
            &["unix:uid:1"],
            &[],
            "spiffe_id",
        ),
        ("http://x/y", PARENT, &["unix:uid:1"], &[], "spiffe_id"),
        (
            "spiffe://other.test/web",
            PARENT,
            &["unix:uid:1"],
            &[],
            "spiffe_id",
        ),
        (
            "spiffe://cli.test",
            PARENT,
            &["unix:uid:1"],
            &[],
            "spiffe_id",
        ),
        (
            "spiffe://CLI.test/web",
            PARENT,
            &["unix:uid:1"],
            &[],
            "spiffe_id",
        ),
        ("", PARENT, &["unix:uid:1"], &[], "spiffe_id"),
        (
            good_id,
            "spiffe://cli.test",
            &["unix:uid:1"],
            &[],
            "parent_id",
        ),
        (
            good_id,
            "spiffe://other.test/ward/agent/x",
            &["unix:uid:1"],
            &[],
            "parent_id",
        ),
        (
            good_id,
            "spiffe://cli.test/a//b",
            &["unix:uid:1"],
            &[],
            "parent_id",
        ),
        (good_id, PARENT, &["nocolon"], &[], "selector"),
        (good_id, PARENT, &["Unix:x"], &[], "selector"),
        (good_id, PARENT, &["unix:"], &[], "selector"),
        // A bad selector after a good one.
        (good_id, PARENT, &["unix:uid:1", "unix: a"], &[], "selector"),
        (
            good_id,
            PARENT,
            &["unix:uid:1"],
            &["--dns-name", "bad_name"],
            "dns name",
        ),
        (
            good_id,
            PARENT,
            &["unix:uid:1"],
            &["--dns-name", "ok.example", "--dns-name", "bad-.example"],
            "dns name",
        ),
        (
            good_id,
            PARENT,
            &["unix:uid:1"],
            &["--dns-name", "a..b"],
            "dns name",
        ),
    ];
    for (spiffe_id, parent_id, selectors, extra, word) in cases {
        let mut args = create_args(spiffe_id, parent_id, selectors);
        args.extend(*extra);
        ca.cli(&args).fails(2).stderr_has(word);
        assert_eq!(
            ca.entries(),
            before,
            "refused create {args:?} changed the stored entries"
        );
    }

    // Missing required flags are usage errors from the argument parser (exit 2).
    let out = ca.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        good_id,
        "--parent-id",
        PARENT,
    ]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stderr.contains("--selector"), "{out:#?}");
    assert_eq!(ca.entries(), before);

    // The same validation applies to updates, which leave the entry unchanged.
    let id = before[0]["id"].as_str().unwrap();
    let mut args = vec!["entry", "update", id];
    args.extend(&create_args("spiffe://cli.test/a//b", PARENT, &["unix:uid:1"])[2..]);
    ca.cli(&args).fails(2).stderr_has("spiffe_id");
    let mut args = vec!["entry", "update", id];
    args.extend(&create_args(good_id, PARENT, &["Unix:x"])[2..]);
    ca.cli(&args).fails(2).stderr_has("selector");
    assert_eq!(ca.entries(), before);
}

#[test]
fn agents_and_bundle() {
    let ca = CaProcess::start();

    let out = ca.cli(&["agent", "list", "-o", "json"]);
    out.ok();
    assert_eq!(out.json(), serde_json::json!([]), "{out:#?}");
    let out = ca.cli(&["agent", "list"]);
    out.ok();
    assert!(out.stdout.starts_with("Found 0 agent"), "{out:#?}");
    ca.cli(&["agent", "evict", "spiffe://cli.test/ward/agent/nope"])
        .fails(3)
        .stderr_has("not found");
    // A token does not create an agent before it is used.
    ca.cli(&["token", "create"]).ok();
    let out = ca.cli(&["agent", "list", "-o", "json"]);
    out.ok();
    assert_eq!(out.json(), serde_json::json!([]), "{out:#?}");

    // SPIFFE bundle document.
    let out = ca.cli(&["bundle", "show"]);
    out.ok();
    let doc = out.json();
    let keys = doc["keys"].as_array().expect("keys array");
    let uses: Vec<&str> = keys.iter().filter_map(|k| k["use"].as_str()).collect();
    assert_eq!(
        uses.iter().filter(|u| **u == "x509-svid").count(),
        1,
        "{out:#?}"
    );
    assert_eq!(
        uses.iter().filter(|u| **u == "jwt-svid").count(),
        1,
        "{out:#?}"
    );
    assert_eq!(uses.len(), keys.len(), "every key has a use: {out:#?}");
    let x509 = keys.iter().find(|k| k["use"] == "x509-svid").unwrap();
    assert_eq!(
        x509["x5c"].as_array().map(Vec::len),
        Some(1),
        "x509-svid key has exactly one certificate: {out:#?}"
    );
    let jwt = keys.iter().find(|k| k["use"] == "jwt-svid").unwrap();
    assert!(
        jwt["kid"].as_str().is_some_and(|k| !k.is_empty()),
        "{out:#?}"
    );
    assert!(doc["spiffe_sequence"].as_u64().is_some(), "{out:#?}");
    // `-o json` does not change the SPIFFE format.
    let again = ca.cli(&["bundle", "show", "-o", "json"]);
    again.ok();
    assert_eq!(again.json(), doc);

    // PEM.
    let out = ca.cli(&["bundle", "show", "--format", "pem"]);
    out.ok();
    let pem = out.stdout.trim_end();
    assert_eq!(
        pem.matches("-----BEGIN CERTIFICATE-----").count(),
        1,
        "{out:#?}"
    );
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{out:#?}");
    assert!(pem.ends_with("-----END CERTIFICATE-----"), "{out:#?}");
    let openssl = Path::new("/usr/bin/openssl");
    if openssl.exists() {
        let file = ca.root.path().join("bundle-cli.pem");
        std::fs::write(&file, &out.stdout).unwrap();
        let o = Command::new(openssl)
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "openssl refused the PEM: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(text.contains("CA:TRUE"), "{text}");
        assert!(text.contains("URI:spiffe://cli.test"), "{text}");
    } else {
        eprintln!("note: /usr/bin/openssl is missing; skipping the openssl check of the PEM");
    }
    // The PEM certificate is the one in the JWKS.
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    assert_eq!(x509["x5c"][0].as_str().unwrap(), b64);
}

#[test]
fn unreachable_ca() {
    // A data directory where no CA ever ran: no socket at all.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin").join("api.sock");
    for args in [
        vec!["entry", "list"],
        vec!["token", "create"],
        vec!["agent", "list", "-o", "json"],
        vec!["bundle", "show"],
    ] {
        cli_in(dir.path(), &args)
            .fails(6)
            .stderr_has("socket")
            .stderr_has(&sock.display().to_string());
    }

    // A CA that was killed: a stale socket file nobody listens on.
    let mut ca = CaProcess::start();
    ca.cli(&["entry", "list"]).ok();
    ca.child.kill().unwrap();
    ca.child.wait().unwrap();
    assert!(
        ca.socket().exists(),
        "SIGKILL leaves the socket file behind"
    );
    ca.cli(&["entry", "list"]).fails(6).stderr_has("socket");

    // --socket overrides --data-dir.
    let other = tempfile::tempdir().unwrap();
    let missing = other.path().join("nope.sock");
    let out = run_bin(&[
        "entry".into(),
        "list".into(),
        "--socket".into(),
        missing.display().to_string(),
    ]);
    out.fails(6).stderr_has(&missing.display().to_string());
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let data = dir.join("data");
    let text = format!(
        "trust_domain = \"{TD}\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:0\"\n\
         health_address = \"127.0.0.1:0\"\n{extra}",
        data.display()
    );
    let path = dir.join("ca.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn run_refuses_unknown_config_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "bogus_key = 1\n");
    let started = Instant::now();
    let out = run_bin(&["run".into(), "--config".into(), cfg.display().to_string()]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ward-ca run took {:?} to refuse the file",
        started.elapsed()
    );
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.code.is_some(), "killed by a signal: {out:#?}");
    assert!(out.stderr.contains("bogus_key"), "{out:#?}");
    assert!(
        !dir.path().join("data").join("admin").exists(),
        "nothing was started"
    );

    // An unknown key in a nested table is refused too.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[ttl]\nx509_svid = \"1h\"\nbogus_ttl = \"1h\"\n",
    );
    let out = run_bin(&["run".into(), "--config".into(), cfg.display().to_string()]);
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("bogus_ttl"), "{out:#?}");
}

#[test]
fn check_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "log_level = \"debug\"\n[ttl]\nx509_svid = \"30m\"\n",
    );
    let out = run_bin(&[
        "check-config".into(),
        "--config".into(),
        cfg.display().to_string(),
    ]);
    out.ok();
    assert!(
        out.stdout.contains("trust_domain = \"cli.test\""),
        "{out:#?}"
    );
    assert!(out.stdout.contains("log_level = \"debug\""), "{out:#?}");
    assert!(out.stdout.contains("[ttl]"), "{out:#?}");
    assert!(out.stdout.contains("x509_svid = \"30m\""), "{out:#?}");
    // Defaults are filled in.
    assert!(out.stdout.contains("jwt_svid = \"5m\""), "{out:#?}");
    // The printed configuration is itself valid and equal to the file's.
    let printed = ward_ca::CaConfig::from_toml(&out.stdout, "stdout").expect("printed config");
    let original = ward_ca::CaConfig::from_file(&cfg).unwrap();
    assert_eq!(printed, original);
    // It only checks: no data directory was created.
    assert!(!dir.path().join("data").exists());

    // Valid but weaker than it looks: said on stderr, still exit 0.
    let cfg = write_config(
        dir.path(),
        "[kubernetes]\n[[kubernetes.clusters]]\nname = \"edge\"\nservice_account_allow_list = [\"ward:ward-agent\"]\n\
         mode = \"offline\"\nissuer = \"https://issuer.example\"\njwks_discovery = true\n",
    );
    let out = run_bin(&[
        "check-config".into(),
        "--config".into(),
        cfg.display().to_string(),
    ]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stderr
            .contains("ward-ca: warning: cluster edge: offline mode without API access")
            && out.stderr.contains("expirationSeconds"),
        "{out:#?}"
    );

    // Invalid files: exit 2 with the reason.
    let cfg = write_config(dir.path(), "bogus_key = 1\n");
    let out = run_bin(&[
        "check-config".into(),
        "--config".into(),
        cfg.display().to_string(),
    ]);
    out.fails(2).stderr_has("bogus_key");
    let cfg = write_config(dir.path(), "[ttl]\nx509_svid = \"48h\"\n");
    let out = run_bin(&[
        "check-config".into(),
        "--config".into(),
        cfg.display().to_string(),
    ]);
    out.fails(2).stderr_has("shorter");
    let missing = dir.path().join("missing.toml");
    let out = run_bin(&[
        "check-config".into(),
        "--config".into(),
        missing.display().to_string(),
    ]);
    out.fails(2).stderr_has("missing.toml");
}
