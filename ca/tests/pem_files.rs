//! `ward-agent files` with real nginx (Debian): the helper writes svid.pem, svid_key.pem and
//! bundle.pem from the agent's Workload API, nginx serves mutual TLS from them, and when the
//! SVID rotates the helper rewrites the files and sends nginx SIGHUP, after which new
//! connections see the new certificate while nginx keeps serving. Also: `--once`, file modes,
//! and a directory the helper cannot write (clear error, exit 2, old files untouched).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ward_ca::entries::EntrySpec;

/// A GET through curl with the helper's files as client certificate and trust.
fn curl_ok(port: u16, certs: &Path) -> bool {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-k", "--cacert"])
        .arg(certs.join("bundle.pem"))
        .arg("--cert")
        .arg(certs.join("svid.pem"))
        .arg("--key")
        .arg(certs.join("svid_key.pem"))
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello over mTLS")
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_serves_mtls_from_helper_files_across_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::start_ca(
        common::ca_config(&dir.path().join("ca"), "pem.test"),
        Arc::new(ward_spiffe::SystemClock),
    )
    .await;
    let agent = common::start_agent(common::agent_config(&ca, dir.path()).await).await;
    ca.core
        .entries
        .create(
            &EntrySpec {
                spiffe_id: "spiffe://pem.test/nginx".into(),
                parent_id: agent.identity.id().unwrap().to_string(),
                selectors: vec![common::my_uid_selector()],
                // Short, so the agent rotates it (at about half-life) during the test.
                x509_svid_ttl: 8,
                ..Default::default()
            },
            "admin",
            ward_ca::core::CaCore::new_entry_id(),
            ca.core.clock.now(),
        )
        .await
        .unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir(&nginx_dir).unwrap();
    let pid_file = nginx_dir.join("nginx.pid");

    // --once first: writes and exits, key 0600.
    let once = dir.path().join("once");
    std::fs::create_dir(&once).unwrap();
    let out = Command::new(common::agent_bin())
        .args(["files", "--once", "--socket"])
        .arg(&agent.socket_path)
        .arg("--dir")
        .arg(&once)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["svid.pem", "svid_key.pem", "bundle.pem"] {
        assert!(once.join(f).exists(), "{f}");
    }
    let mode = std::fs::metadata(once.join("svid_key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The long-running helper, signalling nginx through its pid file.
    let _helper = common::Kill(
        Command::new(common::agent_bin())
            .args(["files", "--signal", "HUP", "--socket"])
            .arg(&agent.socket_path)
            .arg("--dir")
            .arg(&certs)
            .arg("--pid-file")
            .arg(&pid_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait("helper wrote the files", Duration::from_secs(20), || {
        certs.join("bundle.pem").exists()
    });

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r#"daemon off;
master_process on;
user root;
worker_processes 1;
pid {pid};
error_log stderr warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {c}/svid.pem;
        ssl_certificate_key {c}/svid_key.pem;
        ssl_client_certificate {c}/bundle.pem;
        ssl_verify_client on;
        location / {{ return 200 "hello over mTLS\n"; }}
    }}
}}
"#,
            pid = pid_file.display(),
            d = nginx_dir.display(),
            c = certs.display(),
        ),
    )
    .unwrap();
    let _nginx = common::Kill(
        Command::new("nginx")
            .arg("-p")
            .arg(&nginx_dir)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (Debian package) is installed"),
    );
    wait("nginx serves", Duration::from_secs(20), || {
        curl_ok(port, &certs)
    });
    let first = common::leaf_serial(&std::fs::read(certs.join("svid.pem")).unwrap());
    wait(
        "nginx presents the file's SVID",
        Duration::from_secs(20),
        || common::served_serial(port, &certs) == Some(first.clone()),
    );

    // The agent rotates the SVID; the helper rewrites the files and HUPs nginx.
    wait(
        "the helper wrote a rotated SVID",
        Duration::from_secs(30),
        || std::fs::read(certs.join("svid.pem")).is_ok_and(|p| common::leaf_serial(&p) != first),
    );
    wait(
        "nginx presents the rotated SVID",
        Duration::from_secs(30),
        || {
            let now = common::leaf_serial(&std::fs::read(certs.join("svid.pem")).unwrap());
            common::served_serial(port, &certs).is_some_and(|s| s != first && s == now)
        },
    );
    assert!(
        curl_ok(port, &certs),
        "nginx keeps serving after the reload"
    );

    // A directory the helper cannot write (it runs as nobody; the directory is root's 0755):
    // exit 2, a clear message, the old files untouched.
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(locked.join("svid.pem"), b"old").unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(common::agent_bin())
        .args(["files", "--once", "--socket"])
        .arg(&agent.socket_path)
        .arg("--dir")
        .arg(&locked)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not writable"), "{err}");
    assert_eq!(std::fs::read(locked.join("svid.pem")).unwrap(), b"old");

    // Bad usage: a signal with nobody to send it to.
    let out = Command::new(common::agent_bin())
        .args([
            "files",
            "--signal",
            "HUP",
            "--socket",
            "/nonexistent",
            "--dir",
        ])
        .arg(&once)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pid"));
    ca.shutdown().await;
}
