//! Two proxies on loopback: application → outbound proxy → mTLS → inbound proxy → application,
//! with per-request authorization, the peer-ID header, path normalization, HTTP/1.1 and HTTP/2,
//! the access log and the metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{HEADER, Mesh, get, request};
use std::time::Duration;

/// A policy file letting the frontend reach the backend over opaque TCP; returns its path.
fn tcp_policy(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("tcp-policies.yaml");
    std::fs::write(
        &p,
        "policies:\n  - name: frontend\n    target: { spiffe_ids: [\"spiffe://mesh.test/backend\"] }\n    action: ALLOW\n    rules: [ { from: [ { principals: [\"spiffe://mesh.test/frontend\"] } ] } ]\n",
    )
    .unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_authorized_and_carry_the_peer_id() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(dir.path()).await;
    let out = mesh.outbound();

    // Allowed; the app sees exactly one peer-ID header, the verified one, even when the client
    // tried to set its own.
    let r = request(
        out,
        "GET",
        "/api/hello?x=1",
        &[(HEADER, "spiffe://mesh.test/admin")],
        false,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(
        j["peers"],
        serde_json::json!(["spiffe://mesh.test/frontend"])
    );
    assert_eq!(j["path"], "/api/hello?x=1");
    assert_eq!(j["host"], "svc.local");

    // HTTP/2 from the application works the same.
    let r = request(out, "POST", "/api/items", &[], true).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["method"], "POST");

    // Denied: no ALLOW rule matches, or a DENY rule does.
    let r = get(out, "/other").await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("no ALLOW policy matched"), "{}", r.body);
    let r = get(out, "/api/admin/users").await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("backend-deny-admin"), "{}", r.body);
    let r = request(out, "DELETE", "/api/items", &[], false).await;
    assert_eq!(r.status, 403);

    // Path tricks: normalized before matching, ambiguous ones refused.
    let r = get(out, "/api//hello").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/api/hello");
    let r = get(out, "/api/%2e%2e/admin/users").await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = get(out, "/api/./admin/x").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("backend-deny-admin"), "{}", r.body);
    for bad in ["/api/a%2fb", "/api/a%5cb", "/api/%zz"] {
        let r = get(out, bad).await;
        assert_eq!(r.status, 403, "{bad}: {}", r.body);
        assert!(
            r.body.contains("ambiguous request path"),
            "{bad}: {}",
            r.body
        );
    }

    // Every decision is in the backend's access log, and the chain verifies.
    let lines = common::log_lines(&mesh.dir.join("backend-access.jsonl"), 11).await;
    let decisions = common::count_by(&lines, "decision");
    assert_eq!(decisions.get("allow"), Some(&3), "{decisions:?}");
    assert_eq!(decisions.get("deny"), Some(&8), "{decisions:?}");
    let report = ward_proxy::access_log::verify(&mesh.dir.join("backend-access.jsonl")).unwrap();
    assert_eq!(report.broken, None);
    let first_allow = lines
        .iter()
        .find(|l| l["access"]["decision"] == "allow")
        .unwrap();
    assert_eq!(first_allow["access"]["src"], "spiffe://mesh.test/frontend");
    assert_eq!(first_allow["access"]["dst"], "spiffe://mesh.test/backend");
    assert_eq!(first_allow["access"]["policy"], "backend-allow-frontend");
    assert_eq!(first_allow["access"]["status"], 200);
    assert!(first_allow["access"]["bytes_out"].as_u64().unwrap() > 0);

    // Metrics count decisions by policy.
    let m = common::admin(mesh.backend.admin_addr, "/metrics").await;
    assert!(m.contains("ward_proxy_requests_total{listener=\"public\",decision=\"deny\",policy=\"backend-deny-admin\"}"), "{m}");
    assert!(m.contains("ward_proxy_requests_total{listener=\"public\",decision=\"allow\",policy=\"backend-allow-frontend\"} 3"), "{m}");
    ward_testing::promtool_check(&m);
    assert_eq!(
        common::get(mesh.backend.admin_addr, "/readyz").await.status,
        200
    );
    let (dir, root) = (mesh.dir.clone(), mesh.pki.root_der().to_vec());
    mesh.stop().await;
    // Stopped: the backend's log ends with an anchor its SVID signed, so every record is
    // proven against the trust domain's bundle.
    let r = ward_proxy::access_log::verify_with(
        &dir.join("backend-access.jsonl"),
        Some(&ward_proxy::access_log::Trust {
            roots: vec![root.into()],
        }),
    )
    .unwrap();
    assert_eq!(r.broken, None);
    assert!(r.closed && r.unproven == 0, "{r:?}");
    assert_eq!(r.signers, vec!["spiffe://mesh.test/backend".to_owned()]);
}

/// `access_log.on_full: refuse` serves nothing it could not record: with room for one record,
/// a TCP connection that holds it makes the next one close unserved (counted), and once it
/// ends (its record written) the next is served. `block` makes the next one wait instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_access_log_refuses_or_holds_what_it_cannot_record() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    async fn echo(s: &mut tokio::net::TcpStream) -> std::io::Result<u8> {
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(1)) => Ok(b[0]),
            Ok(Ok(_)) => Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
    for mode in [
        ward_proxy::config::OnFull::Refuse,
        ward_proxy::config::OnFull::Block,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let tcp_policy = tcp_policy(dir.path());
        let mesh = Mesh::start_with(
            dir.path(),
            ward_proxy::config::Protocol::Tcp,
            |b| {
                b.authorization.policy_files = vec![tcp_policy.clone()];
                let log = b.access_log.as_mut().unwrap();
                log.queue = 1;
                log.on_full = mode;
            },
            |_| {},
        )
        .await;
        let mut first = tokio::net::TcpStream::connect(mesh.outbound())
            .await
            .unwrap();
        assert_eq!(echo(&mut first).await.unwrap(), b'x');
        let mut second = tokio::net::TcpStream::connect(mesh.outbound())
            .await
            .unwrap();
        let m = || common::admin(mesh.backend.admin_addr, "/metrics");
        match mode {
            ward_proxy::config::OnFull::Refuse => {
                assert!(echo(&mut second).await.is_err(), "served without a record");
                assert!(
                    m().await.contains("ward_proxy_access_log_refused_total 1"),
                    "{}",
                    m().await
                );
                drop(first);
                // The first connection's record is written; the log has room again.
                let mut third = None;
                for _ in 0..100 {
                    let mut s = tokio::net::TcpStream::connect(mesh.outbound())
                        .await
                        .unwrap();
                    if echo(&mut s).await.is_ok() {
                        third = Some(s);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert!(third.is_some(), "no connection served after room was made");
            }
            _ => {
                // Held, not refused: it is served as soon as the first one ends.
                let held = tokio::spawn(async move { echo(&mut second).await.map(|_| second) });
                tokio::time::sleep(Duration::from_millis(300)).await;
                assert!(!held.is_finished(), "served while the log had no room");
                drop(first);
                let second = held.await.unwrap().unwrap();
                drop(second);
                assert!(m().await.contains("ward_proxy_access_log_refused_total 0"));
            }
        }
        let lines = common::log_lines(&mesh.dir.join("backend-access.jsonl"), 2).await;
        assert!(lines.iter().all(|l| l["access"]["decision"] == "allow"));
        mesh.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_only_applications_work_across_the_http2_hop() {
    let dir = tempfile::tempdir().unwrap();
    let app = common::start_app_h1().await;
    let mesh = Mesh::start_with(
        dir.path(),
        ward_proxy::config::Protocol::Http,
        |b| b.inbound_mut()[0].forward_to = app.to_string(),
        |_| {},
    )
    .await;
    // An HTTP/1.1 client reaches the HTTP/1.1-only application although the proxies speak
    // HTTP/2 to each other (a spoofed orig-proto header changes nothing).
    let r = request(
        mesh.outbound(),
        "GET",
        "/api/v",
        &[("x-ward-orig-proto", "HTTP/2")],
        false,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["version"], "HTTP/1.1");
    // With `auto`, an HTTP/2 client gets HTTP/2 to the application, which this one refuses...
    let r = request(mesh.outbound(), "GET", "/api/v", &[], true).await;
    assert_eq!(r.status, 502, "{}", r.body);
    mesh.stop().await;

    // ...and `app_protocol: http1` translates.
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start_with(
        dir.path(),
        ward_proxy::config::Protocol::Http,
        |b| {
            b.inbound_mut()[0].forward_to = app.to_string();
            b.inbound_mut()[0].app_protocol = ward_proxy::config::AppProtocol::Http1;
        },
        |_| {},
    )
    .await;
    let r = request(mesh.outbound(), "POST", "/api/v", &[], true).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["version"], "HTTP/1.1");
    mesh.stop().await;
}

/// What reaches the application is what was authorized: no look-alike of the peer-ID header,
/// no method override (unless configured), one Host; and a refused HEAD has no body, so an
/// HTTP/2 client gets the status instead of a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_app_as_they_were_authorized() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(dir.path()).await;
    let out = mesh.outbound();
    let r = request(
        out,
        "GET",
        "/api/hello",
        &[
            ("x_ward_peer_id", "spiffe://mesh.test/admin"),
            ("X-Ward-Peer-Id", "spiffe://mesh.test/admin2"),
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-kept", "1"),
        ],
        false,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(
        j["peers"],
        serde_json::json!(["spiffe://mesh.test/frontend"])
    );
    let names: Vec<&str> = j["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(names.contains(&"x-kept"), "{names:?}");
    for gone in [
        "x_ward_peer_id",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        assert!(!names.contains(&gone), "{gone} reached the app: {names:?}");
    }

    // Two Host headers: 400 (RFC 9112), at the first proxy already.
    let tcp = tokio::net::TcpStream::connect(out).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .uri("/api/hello")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    req.headers_mut().append("host", "a.local".parse().unwrap());
    req.headers_mut().append("host", "b.local".parse().unwrap());
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);

    // A refused HEAD over HTTP/2: the status, no body, no protocol error.
    let r = request(out, "HEAD", "/other", &[], true).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body, "");
    let r = request(out, "HEAD", "/other", &[], false).await;
    assert_eq!(r.status, 403);
    mesh.stop().await;
}

/// `authorization.forward_method_override` passes the overrides on, for applications that
/// need them and whose policies account for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_overrides_pass_only_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start_with(
        dir.path(),
        ward_proxy::config::Protocol::Http,
        |b| b.authorization.forward_method_override = true,
        |_| {},
    )
    .await;
    let r = request(
        mesh.outbound(),
        "GET",
        "/api/hello",
        &[("x-http-method-override", "PATCH")],
        false,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let names = r.json()["names"].clone();
    assert!(
        names
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "x-http-method-override"),
        "{names}"
    );
    mesh.stop().await;
}

/// A client cannot make the proxy hold large or many headers (431), nor hold a connection by
/// trickling its headers (cut off at `header_read_timeout`, counted and logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clients_stay_within_the_limits() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start_with(
        dir.path(),
        ward_proxy::config::Protocol::Http,
        |_| {},
        |f| f.http_limits.header_read_timeout = std::time::Duration::from_millis(800),
    )
    .await;
    let out = mesh.outbound();
    let raw = |text: String| async move {
        let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
        s.write_all(text.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).into_owned()
    };
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let got = raw(format!("GET /api/hello HTTP/1.1\r\nHost: a\r\n{many}\r\n")).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    let big = "a".repeat(100 * 1024);
    let got = raw(format!(
        "GET /api/hello HTTP/1.1\r\nHost: a\r\nx-big: {big}\r\n\r\n"
    ))
    .await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    // Within the limits: fine.
    let got = raw("GET /api/hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".into()).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    // One header byte every 100 ms: cut off after the timeout, not served.
    let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
    s.write_all(b"GET /api/hello HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut closed = false;
    for _ in 0..50 {
        if s.write_all(b"x").await.is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 512];
        match tokio::time::timeout(std::time::Duration::from_millis(100), s.read(&mut b)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "the trickling client was never cut off");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let hits = mesh
        .frontend
        .metrics
        .http_limits
        .get_or_create(&ward_proxy::metrics::TlsFailureLabel {
            listener: "backend".into(),
            reason: "header_read_timeout".into(),
        })
        .get();
    assert_eq!(hits, 1);
    mesh.stop().await;
}

/// A listener holds at most `connection_limits.per_listener` connections, and one serving
/// callers from outside the pod at most `per_client` from one address: more are closed as they
/// arrive, counted and logged; a closed one frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_caps_are_closed_on_arrival() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start_with(
        dir.path(),
        ward_proxy::config::Protocol::Http,
        |b| b.connection_limits.per_client = 2,
        |f| f.connection_limits.per_listener = 2,
    )
    .await;
    // Closed at once: the read ends (0 bytes or a reset) well before any timeout.
    let closed_at_once = |addr: std::net::SocketAddr| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(std::time::Duration::from_millis(500), s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    };
    let hits = |p: &ward_proxy::Proxy, listener: &str, reason: &str| {
        p.metrics
            .http_limits
            .get_or_create(&ward_proxy::metrics::TlsFailureLabel {
                listener: listener.into(),
                reason: reason.into(),
            })
            .get()
    };
    for (proxy, addr, listener, reason) in [
        (
            &mesh.frontend,
            mesh.outbound(),
            "backend",
            "listener_connections",
        ),
        (
            &mesh.backend,
            mesh.backend.inbound_addr("public").unwrap(),
            "public",
            "client_connections",
        ),
    ] {
        let a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The accept loop has taken both before the third arrives.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(closed_at_once(addr).await, "{listener}: a third is refused");
        assert_eq!(hits(proxy, listener, reason), 1, "{listener}");
        drop(a);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !closed_at_once(addr).await,
            "{listener}: a freed place is taken"
        );
    }
    mesh.stop().await;
}

/// A connection that does nothing is closed after `connection_limits.idle_timeout`: an HTTP
/// keep-alive connection with no request, an opaque TCP stream with no byte either way
/// (counted as `idle_timeout`); one in use stays open however long it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_busy_ones_are_not() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let idle = Duration::from_millis(400);
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start_with(
        dir.path(),
        ward_proxy::config::Protocol::Http,
        |_| {},
        |f| f.connection_limits.idle_timeout = idle,
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(mesh.outbound())
        .await
        .unwrap();
    let mut last = Instant::now();
    // Busy for three idle periods: a request every 150 ms on one keep-alive connection.
    for _ in 0..8 {
        s.write_all(b"GET /api/hello HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        // One whole response: the head, then Content-Length bytes.
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte))
                .await
                .unwrap()
                .unwrap();
            got.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(
            head.starts_with("http/1.1 200"),
            "a busy connection is served: {head}"
        );
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("content-length");
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        last = Instant::now();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Then quiet: closed after the idle timeout.
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the idle connection was not closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        last.elapsed() >= Duration::from_millis(300),
        "{:?}",
        last.elapsed()
    );
    let hits = mesh
        .frontend
        .metrics
        .http_limits
        .get_or_create(&ward_proxy::metrics::TlsFailureLabel {
            listener: "backend".into(),
            reason: "idle_timeout".into(),
        })
        .get();
    assert!(hits >= 1);
    mesh.stop().await;

    // Opaque TCP through both proxies: echoed while in use, closed when quiet.
    let dir = tempfile::tempdir().unwrap();
    let tcp_policy = tcp_policy(dir.path());
    let mesh = Mesh::start_with(
        dir.path(),
        ward_proxy::config::Protocol::Tcp,
        |b| {
            b.connection_limits.idle_timeout = idle;
            b.authorization.policy_files = vec![tcp_policy.clone()];
        },
        |f| f.connection_limits.idle_timeout = idle,
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(mesh.outbound())
        .await
        .unwrap();
    let mut last = Instant::now();
    for i in 0..8u8 {
        s.write_all(&[b'a' + i]).await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b[0], b'a' + i);
        last = Instant::now();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the idle TCP stream was not closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        last.elapsed() >= Duration::from_millis(300),
        "{:?}",
        last.elapsed()
    );
    mesh.stop().await;
}
