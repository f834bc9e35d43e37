//! CLI exit codes as `--help` and README document them: bad flags exit 2 and name the flag and
//! the offending character, an address in use exits 7 and names the flag, a call cut off by
//! the CA going away exits 9 for a change (it may have been applied) and 6 for a read,
//! durations list their units.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cli::{KillOnDrop, Out, run_bin, wait_output};

/// Asserts the exit code and that stderr contains every needle (stderr may hold log lines
/// before the message of a command that started logging).
fn check(out: &Out, code: i32, needles: &[&str]) {
    assert_eq!(out.code, Some(code), "{out:#?}");
    for n in needles {
        assert!(out.stderr.contains(n), "stderr lacks {n:?}: {out:#?}");
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn help_lists_the_exit_codes() {
    let out = run_bin(&args(&["--help"]));
    assert_eq!(out.code, Some(0), "{out:#?}");
    for want in [
        "Exit codes:",
        "2  invalid argument or usage",
        "6  CA unreachable",
        "7  cannot listen",
        "9  connection lost during a change",
    ] {
        assert!(out.stdout.contains(want), "--help lacks {want:?}: {out:#?}");
    }
    let agent = Command::new(common::agent_bin())
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&agent.stdout);
    assert!(
        text.contains("Exit codes:") && text.contains("7  cannot listen"),
        "{text}"
    );
}

#[test]
fn dev_names_a_bad_flag_and_its_character() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let out = run_bin(&args(&[
        "dev",
        "--data-dir",
        &d,
        "--trust-domain",
        "Example.org",
    ]));
    out.fails(2)
        .stderr_has("invalid --trust-domain \"Example.org\"")
        .stderr_has("'E'");
    let out = run_bin(&args(&[
        "dev",
        "--data-dir",
        &d,
        "--trust-domain",
        "ex ample",
    ]));
    out.fails(2).stderr_has("' '");
    // Durations name their units, for every flag that takes one.
    let out = run_bin(&args(&["dev", "--data-dir", &d, "--x509-svid-ttl", "5"]));
    check(
        &out,
        2,
        &["--x509-svid-ttl", "accepted units: ms, s, m, h, d"],
    );
    let out = run_bin(&args(&[
        "token",
        "create",
        "--ttl",
        "10x",
        "--data-dir",
        &d,
    ]));
    check(&out, 2, &["--ttl", "unknown unit \"x\"", "accepted units"]);
}

#[test]
fn an_address_in_use_exits_7_and_names_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();

    let out = run_bin(&args(&["dev", "--data-dir", &d, "--bind-address", &addr]));
    check(
        &out,
        7,
        &["node API address", &addr, "in use", "(--bind-address)"],
    );
    let out = run_bin(&args(&["dev", "--data-dir", &d, "--health-address", &addr]));
    check(&out, 7, &["health address", "in use", "(--health-address)"]);
    let out = run_bin(&args(&[
        "run",
        "--trust-domain",
        "exit.test",
        "--data-dir",
        &format!("{d}/run"),
        "--bind-address",
        &addr,
    ]));
    check(&out, 7, &["node API address", "in use"]);
    // The agent child of `dev` cannot listen: its exit code 7 is dev's.
    let child = Command::new(common::ca_bin())
        .args(["dev", "--data-dir", &format!("{d}/agent")])
        .args(["--agent-health-address", &addr])
        .arg("--agent-bin")
        .arg(common::agent_bin())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(KillOnDrop(Some(child)), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("health address") && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(stderr.contains("--agent-health-address"), "{stderr}");
    drop(taken);
}

/// A socket that speaks just enough HTTP/2 to take a request, then hangs up: a CA that went
/// away during the call.
fn hang_up_after_the_request(path: &std::path::Path) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap(); // SETTINGS
        let mut preface = [0u8; 24];
        s.read_exact(&mut preface).unwrap();
        loop {
            let mut h = [0u8; 9];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).unwrap();
            if h[3] == 0x1 {
                return; // HEADERS of the call: drop the connection.
            }
        }
    })
}

#[test]
fn a_call_cut_off_by_the_ca_going_away_says_what_may_have_happened() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let s = sock.display().to_string();

    let t = hang_up_after_the_request(&sock);
    let out = run_bin(&args(&[
        "entry",
        "create",
        "--socket",
        &s,
        "--spiffe-id",
        "spiffe://exit.test/w",
        "--parent-id",
        "spiffe://exit.test/ward/agent/x",
        "--selector",
        "unix:uid:1",
    ]));
    t.join().unwrap();
    out.fails(9)
        .stderr_has("connection to the CA was lost during the call")
        .stderr_has("the change may already have been applied")
        .stderr_has("refused with exit 4");

    std::fs::remove_file(&sock).unwrap();
    let t = hang_up_after_the_request(&sock);
    let out = run_bin(&args(&["entry", "list", "--socket", &s]));
    t.join().unwrap();
    out.fails(6)
        .stderr_has("lost during the call")
        .stderr_has("nothing was changed");

    // Nobody listening: nothing was sent.
    std::fs::remove_file(&sock).unwrap();
    drop(UnixListener::bind(&sock).unwrap());
    let out = run_bin(&args(&["token", "create", "--socket", &s]));
    out.fails(6)
        .stderr_has("cannot connect")
        .stderr_has("nothing was sent");
}
