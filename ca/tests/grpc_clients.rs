//! Every gRPC client works with Ward's Unix sockets: the Python SPIFFE library on gRPC's C core
//! (which sends the socket path, percent-encoded, as `:authority`), grpcio with an authority
//! h2 refuses, and a raw HTTP/2 client with a garbage authority, against a real agent and the
//! CA's admin socket; protocol errors on the socket are logged at warn with the caller's pid
//! and uid.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use ward_ca::entries::EntrySpec;
use ward_testing::logs::Logs;

async fn setup(dir: &std::path::Path) -> (ward_ca::CaServer, ward_agent::Agent) {
    let ca = common::start_ca(
        common::ca_config(&dir.join("ca"), "grpc.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let cfg = common::agent_config(&ca, dir).await;
    let agent = common::start_agent(cfg).await;
    let parent = agent.identity.id().unwrap().to_string();
    ca.core
        .entries
        .create(
            &EntrySpec {
                spiffe_id: "spiffe://grpc.test/py".into(),
                parent_id: parent,
                selectors: vec![common::my_uid_selector()],
                ..Default::default()
            },
            "admin",
            "py-entry".into(),
            ca.core.clock.now(),
        )
        .await
        .unwrap();
    // Wait until the agent holds the SVID.
    let mut rx = agent.cache.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.svids.contains_key("py-entry")),
    )
    .await
    .expect("SVID in time")
    .unwrap();
    (ca, agent)
}

fn python() -> String {
    std::env::var("WARD_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_core_clients_work_on_the_agent_and_admin_sockets() {
    let logs = Logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent) = setup(dir.path()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/grpc_clients.py");
    let (agent_sock, admin_sock) = (agent.socket_path.clone(), ca.admin_socket.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .arg(&agent_sock)
            .arg(&admin_sock)
            // gRPC's C core prints the headers it sends: the proof of what went on the wire.
            .env("GRPC_TRACE", "http")
            .env("GRPC_VERBOSITY", "debug")
            .output()
            .expect("run python; ./scripts/test installs spiffe, grpcio and h2")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "Python packages missing; ./scripts/test installs them: {stderr}"
    );
    let tail: String = stderr.lines().rev().take(30).collect::<Vec<_>>().join("\n");
    assert!(out.status.success(), "script failed:\n{stdout}\n{tail}");
    let steps: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let step = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no step {name} in {stdout}"))
            .clone()
    };
    let id = "spiffe://grpc.test/py";
    assert_eq!(step("FetchX509SVID")["spiffe_id"], id);
    assert!(step("FetchX509SVID")["chain"].as_u64().unwrap() >= 1);
    assert_eq!(
        step("FetchX509Bundles")["trust_domains"],
        serde_json::json!(["grpc.test"])
    );
    assert_eq!(step("FetchJWTSVID")["spiffe_id"], id);
    assert_eq!(step("ValidateJWTSVID")["spiffe_id"], id);
    assert!(
        step("forced-authority FetchJWTSVID")["response_bytes"]
            .as_u64()
            .unwrap()
            > 100
    );
    assert_eq!(
        step("forced-authority no-header")["code"],
        "INVALID_ARGUMENT",
        "a refusal is a gRPC status, not a reset stream"
    );
    assert!(
        step("admin ListEntries")["response_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    let raw = step("raw h2 garbage authority");
    assert_eq!(raw["status"], "200", "{raw}");
    assert_eq!(raw["grpc_status"], "0", "{raw}");
    assert!(raw["body"].as_u64().unwrap() > 100, "{raw}");
    assert_eq!(raw["reset"], Value::Null, "{raw}");

    // What went on the wire: py-spiffe on gRPC's C core sent the percent-encoded socket path,
    // and the forced value was sent as given.
    let encoded = agent
        .socket_path
        .display()
        .to_string()
        .trim_start_matches('/')
        .replace('/', "%2F");
    assert!(
        stderr.contains(&format!(":authority: {encoded}")),
        "grpc-core did not send the percent-encoded socket path {encoded:?}"
    );
    assert!(stderr.contains(":authority: tmp%2Fforced%2F[not a host]%"));
    // None of that is a protocol error.
    assert!(
        logs.lines_with(&["WARN", "protocol error"]).is_empty(),
        "{}",
        logs.text()
    );
    agent.shutdown().await;
    ca.shutdown().await;
}

/// Sends `bytes` on a fresh connection to `sock`, then reads until the server closes.
fn send_raw(sock: &std::path::Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_are_logged_with_the_callers_pid_and_uid() {
    let logs = Logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (ca, agent) = setup(dir.path()).await;
    let uid = nix::unistd::getuid().as_raw();
    let pid = std::process::id();
    let who = format!("pid={pid} uid={uid}");

    // HTTP/1.1 on the HTTP/2 socket.
    let sock = agent.socket_path.clone();
    tokio::task::spawn_blocking(move || send_raw(&sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        .await
        .unwrap();
    // A header block that does not decode: h2 closes the connection with an error code.
    let mut bad = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bad.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
    bad.extend_from_slice(&[0, 0, 2, 1, 5, 0, 0, 0, 1, 0xff, 0xff]); // HEADERS, index overflow
    let sock = agent.socket_path.clone();
    let answer = tokio::task::spawn_blocking(move || send_raw(&sock, &bad))
        .await
        .unwrap();
    assert!(!answer.is_empty(), "h2 answers before closing");
    let admin = ca.admin_socket.clone();
    tokio::task::spawn_blocking(move || send_raw(&admin, b"garbage\r\n\r\n"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let preface = logs.lines_with(&[
        "WARN",
        "protocol error on the Workload API socket",
        "did not send the HTTP/2 connection preface",
    ]);
    assert_eq!(preface.len(), 1, "{}", logs.text());
    assert!(
        preface[0].contains(&format!("pid={pid}")) && preface[0].contains(&format!("uid={uid}")),
        "{} lacks {who}",
        preface[0]
    );
    let block = logs.lines_with(&["WARN", "Workload API socket", "malformed header block"]);
    assert_eq!(block.len(), 1, "{}", logs.text());
    let goaway = logs.lines_with(&["WARN", "Workload API socket", "connection closed with"]);
    assert_eq!(goaway.len(), 1, "{}", logs.text());
    assert!(goaway[0].contains(&format!("uid={uid}")));
    let admin = logs.lines_with(&["WARN", "protocol error on the admin socket", "preface"]);
    assert_eq!(admin.len(), 1, "{}", logs.text());

    // A flood of bad connections writes a bounded number of lines.
    let sock = agent.socket_path.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..200 {
            send_raw(&sock, b"GET / HTTP/1.1\r\n\r\n");
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all = logs.lines_with(&[
        "WARN",
        "protocol error on the Workload API socket",
        "preface",
    ]);
    assert!(
        all.len() <= 3,
        "{} lines for 201 bad connections",
        all.len()
    );
    // The agent still serves.
    let mut c = common::workload_client(&agent.socket_path);
    let r = c
        .fetch_x509svid(common::with_header(
            ward_proto::workload::X509svidRequest {},
        ))
        .await
        .unwrap();
    assert!(r.into_inner().message().await.unwrap().is_some());
    agent.shutdown().await;
    ca.shutdown().await;
}
