//! Interoperability: stock clients (curl, `openssl s_client`) presenting an X.509-SVID to the
//! inbound listener; gRPC (unary and server streaming) through two proxies with per-method
//! authorization; and a long-lived gRPC stream that survives SVID rotation, including rotation
//! to a new root while the bundle holds both roots.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::{HEADER, Mesh, TD};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tonic::{Code, Status};
use ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ward_proto::workload::{
    JwtBundlesRequest, Jwtsvid, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest,
    X509BundlesResponse,
};
use ward_proxy::Proxy;
use ward_proxy::config::{
    AccessLog, Authorization, Inbound, Listener, Outbound, Protocol, ProxyConfig, TlsMode,
};
use ward_testing::Pki;

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// Runs a program with stdin closed and a hard timeout; returns its output.
async fn run(program: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish in 30 s"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// curl's result: exit status, HTTP status, negotiated HTTP version, body, stderr.
#[derive(Debug)]
struct Curl {
    ok: bool,
    code: String,
    version: String,
    body: String,
    stderr: String,
}

async fn curl(port: u16, http: &str, cert: Option<(&Path, &Path)>, bundle: &Path) -> Curl {
    let url = format!("https://127.0.0.1:{port}/api/hello");
    let mut args: Vec<&str> = vec![
        "-sS",
        "--max-time",
        "10",
        http,
        "--cacert",
        s(bundle),
        // SPIFFE server certificates carry no DNS name: skip the host check. The client
        // certificate is what this test is about.
        "-k",
        "-w",
        "\n%{http_code} %{http_version}",
    ];
    if let Some((c, k)) = cert {
        args.extend(["--cert", s(c), "--key", s(k)]);
    }
    args.push(&url);
    let out = run("curl", &args).await;
    let (stdout, stderr) = text(&out);
    let (body, trailer) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let (code, version) = trailer.split_once(' ').unwrap_or((trailer, ""));
    Curl {
        ok: out.status.success(),
        code: code.to_owned(),
        version: version.to_owned(),
        body: body.to_owned(),
        stderr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_openssl_present_an_svid_to_the_inbound_listener() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(dir.path()).await;
    let port = mesh.inbound().port();
    let cdir = dir.path().join("curl");
    std::fs::create_dir_all(&cdir).unwrap();
    let (cert, key) = mesh.pki.svid("/frontend").write(&cdir, "curl");
    let bundle = mesh.pki.write_bundle(&cdir);

    // With the SVID: allowed by `backend-allow-frontend`, and the application sees the peer ID
    // taken from the client certificate, over HTTP/1.1 and over HTTP/2 (ALPN h2).
    for (flag, version, app_version) in [
        ("--http1.1", "1.1", "HTTP/1.1"),
        ("--http2", "2", "HTTP/2.0"),
    ] {
        let r = curl(port, flag, Some((&cert, &key)), &bundle).await;
        assert!(r.ok, "{flag}: curl failed: {r:?}");
        assert_eq!(r.code, "200", "{flag}: {r:?}");
        assert_eq!(r.version, version, "{flag}: {r:?}");
        let j: serde_json::Value =
            serde_json::from_str(&r.body).unwrap_or_else(|_| panic!("{flag}: not JSON: {r:?}"));
        assert_eq!(
            j["peers"],
            serde_json::json!(["spiffe://mesh.test/frontend"]),
            "{flag}: {j}"
        );
        assert_eq!(j["path"], "/api/hello", "{flag}: {j}");
        assert_eq!(j["version"], app_version, "{flag}: {j}");
    }

    // Policy still applies to a stock client: the same SVID on a denied path gets 403.
    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "-k",
            "--cert",
            s(&cert),
            "--key",
            s(&key),
            "-w",
            "\n%{http_code}",
            &format!("https://127.0.0.1:{port}/api/admin/users"),
        ],
    )
    .await;
    let (stdout, _) = text(&out);
    assert!(stdout.ends_with("\n403"), "{stdout}");
    assert!(stdout.contains("backend-deny-admin"), "{stdout}");

    // Without a client certificate the handshake is refused: curl exits non-zero and no HTTP
    // status is ever received ("000"). With TLS 1.3 the refusal arrives as a
    // `certificate_required` alert after the client's Finished. How curl reports it is a race
    // and is not asserted: with --http1.1 it is the alert on the first read (exit 56); with
    // --http2 curl writes its connection preface at once, the proxy has already closed the
    // socket, and curl sees the alert (56), "Connection reset by peer" or ENOTCONN (55).
    for flag in ["--http1.1", "--http2"] {
        let r = curl(port, flag, None, &bundle).await;
        assert!(!r.ok, "{flag}: curl without a certificate succeeded: {r:?}");
        assert_eq!(r.code, "000", "{flag}: {r:?}");
        assert!(!r.body.contains("peers"), "{flag}: {r:?}");
        eprintln!("curl {flag} without certificate: {}", r.stderr.trim());
    }

    // A certificate for the right ID from a CA outside the bundle is refused the same way.
    let rogue = Pki::new(TD);
    let (rc, rk) = rogue.svid("/frontend").write(&cdir, "rogue");
    let r = curl(port, "--http1.1", Some((&rc, &rk)), &bundle).await;
    assert!(!r.ok, "rogue-CA certificate accepted: {r:?}");
    assert_eq!(r.code, "000", "{r:?}");

    // openssl s_client with the SVID: the handshake completes, OpenSSL verifies the SPIFFE
    // server certificate against the bundle, and ALPN h2 is negotiated.
    let addr = format!("127.0.0.1:{port}");
    let out = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &addr,
            "-cert",
            s(&cert),
            "-key",
            s(&key),
            "-CAfile",
            s(&bundle),
            "-alpn",
            "h2",
            "-brief",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    let all = format!("{stdout}{stderr}");
    eprintln!("openssl s_client with certificate:\n{all}");
    assert!(all.contains("CONNECTION ESTABLISHED"), "{all}");
    assert!(all.contains("Protocol version: TLSv1.3"), "{all}");
    assert!(all.contains("Verification: OK"), "{all}");
    // `-brief` does not print the ALPN result (OpenSSL 3.0); the full output does.
    let out = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &addr,
            "-cert",
            s(&cert),
            "-key",
            s(&key),
            "-CAfile",
            s(&bundle),
            "-alpn",
            "h2",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    let all = format!("{stdout}{stderr}");
    eprintln!("openssl s_client (full) with certificate:\n{all}");
    assert!(all.contains("ALPN protocol: h2"), "{all}");
    assert!(all.contains("Verify return code: 0 (ok)"), "{all}");

    // openssl s_client without a certificate. TLS 1.3: the client finishes its side of the
    // handshake before the server has judged its (empty) certificate, so whether s_client
    // prints "CONNECTION ESTABLISHED" first is a race; what is deterministic is that the
    // server answers with a `certificate required` alert and closes. `-ign_eof` keeps
    // s_client reading until then (stdin is closed), so the alert is always observed.
    let out = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &addr,
            "-CAfile",
            s(&bundle),
            "-alpn",
            "h2",
            "-brief",
            "-ign_eof",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    let all = format!("{stdout}{stderr}");
    eprintln!("openssl s_client TLS 1.3 without certificate:\n{all}");
    assert!(
        all.contains("alert certificate required"),
        "expected a certificate_required alert: {all}"
    );
    // TLS 1.2: the client certificate is part of the handshake, which fails outright.
    let out = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &addr,
            "-CAfile",
            s(&bundle),
            "-alpn",
            "h2",
            "-brief",
            "-tls1_2",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    let all = format!("{stdout}{stderr}");
    eprintln!("openssl s_client TLS 1.2 without certificate:\n{all}");
    assert!(!out.status.success(), "{all}");
    assert!(!all.contains("CONNECTION ESTABLISHED"), "{all}");
    assert!(all.contains("alert"), "{all}");

    mesh.stop().await;
}

// ---------------------------------------------------------------------------------------------
// gRPC through two proxies
// ---------------------------------------------------------------------------------------------

use ward_testing::grpc::{EchoApi, start_grpc_app};

const GRPC_POLICIES: &str = r#"
policies:
  - name: backend-allow-workload-api
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: ALLOW
    rules:
      - from: [ { principals: ["spiffe://mesh.test/frontend"] } ]
        to: [ { paths: ["/SpiffeWorkloadAPI/*"] } ]
  - name: backend-deny-validate
    target: { spiffe_ids: ["spiffe://mesh.test/backend"] }
    action: DENY
    rules:
      - to: [ { paths: ["/SpiffeWorkloadAPI/ValidateJWTSVID"] } ]
"#;

/// frontend (outbound `backend`, plaintext h2 in) → mTLS → backend (inbound `public`) → the
/// gRPC application. Same shape as `common::Mesh::start_with`.
struct GrpcMesh {
    dir: PathBuf,
    pki: Pki,
    api: EchoApi,
    backend: Proxy,
    frontend: Proxy,
}

impl GrpcMesh {
    async fn start(dir: &Path) -> Self {
        let pki = Pki::new(TD);
        let api = EchoApi::default();
        let app = start_grpc_app(api.clone()).await;
        let policies = dir.join("policies.yaml");
        std::fs::write(&policies, GRPC_POLICIES).unwrap();
        let bcfg = ProxyConfig {
            identity: common::identity(&pki, dir, "backend"),
            admin_address: "127.0.0.1:0".parse().unwrap(),
            listeners: vec![Listener::Inbound(Inbound {
                name: "public".into(),
                listen: "127.0.0.1:0".parse().unwrap(),
                forward_to: app.to_string(),
                protocol: Protocol::Http,
                tls: TlsMode::Strict,
                app_protocol: Default::default(),
            })],
            authorization: Authorization {
                policy_files: vec![policies],
                reload_interval: Duration::from_millis(100),
                ..Default::default()
            },
            peer_id_header: HEADER.into(),
            access_log: Some(AccessLog {
                max_bytes: 1 << 30,
                queue: 1024,
                ..AccessLog::at(dir.join("backend-access.jsonl"))
            }),
            log_level: "info".into(),
            drain_timeout: std::time::Duration::from_secs(1),
            discovery: None,
            egress: None,
            http_limits: Default::default(),
            gateway: None,
            connection_limits: Default::default(),
            mesh_tls12: false,
        };
        let backend = Proxy::start(bcfg).await.unwrap();
        let up = backend.inbound_addr("public").unwrap();
        let fcfg = ProxyConfig {
            identity: common::identity(&pki, dir, "frontend"),
            admin_address: "127.0.0.1:0".parse().unwrap(),
            listeners: vec![Listener::Outbound(Outbound {
                name: "backend".into(),
                listen: "127.0.0.1:0".parse().unwrap(),
                upstream: up.to_string(),
                expected_ids: vec![
                    ward_spiffe::SpiffeId::new("spiffe://mesh.test/backend").unwrap(),
                ],
                protocol: Protocol::Http,
            })],
            authorization: Authorization::default(),
            peer_id_header: HEADER.into(),
            access_log: Some(AccessLog {
                max_bytes: 1 << 30,
                queue: 1024,
                ..AccessLog::at(dir.join("frontend-access.jsonl"))
            }),
            log_level: "info".into(),
            drain_timeout: std::time::Duration::from_secs(1),
            discovery: None,
            egress: None,
            http_limits: Default::default(),
            gateway: None,
            connection_limits: Default::default(),
            mesh_tls12: false,
        };
        let frontend = Proxy::start(fcfg).await.unwrap();
        common::wait_ready(&backend).await;
        common::wait_ready(&frontend).await;
        Self {
            dir: dir.to_owned(),
            pki,
            api,
            backend,
            frontend,
        }
    }

    /// A new gRPC client (a new plaintext h2 connection) to the frontend's outbound listener.
    async fn client(&self) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
        let out = self.frontend.outbound_addr("backend").unwrap();
        SpiffeWorkloadApiClient::connect(format!("http://{out}"))
            .await
            .unwrap()
    }

    fn inbound(&self) -> SocketAddr {
        self.backend.inbound_addr("public").unwrap()
    }

    async fn stop(self) {
        self.frontend.shutdown().await;
        self.backend.shutdown().await;
    }
}

async fn fetch_jwt(
    c: &mut SpiffeWorkloadApiClient<tonic::transport::Channel>,
    audience: &[&str],
) -> Jwtsvid {
    let r = c
        .fetch_jwtsvid(JwtsvidRequest {
            audience: audience.iter().map(|a| (*a).to_owned()).collect(),
            spiffe_id: String::new(),
        })
        .await
        .unwrap_or_else(|s| panic!("FetchJWTSVID failed: {s:?}"))
        .into_inner();
    assert_eq!(r.svids.len(), 1, "{r:?}");
    r.svids.into_iter().next().unwrap()
}

fn counter(m: &X509BundlesResponse) -> u64 {
    let v = m.bundles.get("counter").expect("no counter in message");
    std::str::from_utf8(v).unwrap().parse().unwrap()
}

/// Reads a server stream in the background so that it is drained continuously, whatever the
/// test is doing meanwhile.
struct StreamWatch {
    rx: mpsc::UnboundedReceiver<Result<u64, Status>>,
    last: Option<u64>,
    total: usize,
}

impl StreamWatch {
    fn spawn(mut stream: tonic::Streaming<X509BundlesResponse>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let item = match stream.message().await {
                    Ok(Some(m)) => Ok(counter(&m)),
                    Ok(None) => Err(Status::aborted("stream ended")),
                    Err(e) => Err(e),
                };
                let end = item.is_err();
                if tx.send(item).is_err() || end {
                    return;
                }
            }
        });
        Self {
            rx,
            last: None,
            total: 0,
        }
    }

    fn accept(&mut self, item: Option<Result<u64, Status>>, what: &str) {
        let n = match item {
            Some(Ok(n)) => n,
            Some(Err(e)) => panic!("{what}: stream failed after {} messages: {e:?}", self.total),
            None => panic!("{what}: stream reader ended"),
        };
        if let Some(l) = self.last {
            assert_eq!(n, l + 1, "{what}: counter jumped from {l} to {n}");
        }
        self.last = Some(n);
        self.total += 1;
    }

    /// Reads exactly `n` messages (each within 5 s).
    async fn read(&mut self, n: usize, what: &str) {
        for _ in 0..n {
            let item = tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{what}: no message within 5 s"));
            self.accept(item, what);
        }
    }

    /// Reads everything that arrives during `d`; returns how many messages that was.
    async fn read_for(&mut self, d: Duration, what: &str) -> usize {
        let deadline = tokio::time::Instant::now() + d;
        let mut got = 0;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(item) => {
                    self.accept(item, what);
                    got += 1;
                }
                Err(_) => return got,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_two_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = GrpcMesh::start(dir.path()).await;
    let mut c = mesh.client().await;

    // Unary: allowed, and the application sees the frontend's verified ID.
    let svid = fetch_jwt(&mut c, &["aud-1", "aud-2"]).await;
    assert_eq!(svid.spiffe_id, "aud-1,aud-2");
    assert_eq!(svid.hint, "spiffe://mesh.test/frontend");

    // Denied by policy: the proxy answers itself with grpc-status 7, and the application is
    // never called.
    let e = c
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "b".into(),
        })
        .await
        .expect_err("ValidateJWTSVID must be denied");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("backend-deny-validate"), "{e:?}");
    assert_eq!(mesh.api.validate_calls.load(Ordering::SeqCst), 0);

    // Allowed by policy but not implemented by the application: the application's own status
    // comes back through both proxies (so the denial above really was the proxy's).
    let e = c
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .expect_err("FetchJWTBundles is unimplemented");
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("echo: FetchJWTBundles"), "{e:?}");

    // Server streaming: messages arrive in order, about every 100 ms.
    let start = Instant::now();
    let mut stream = c
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    for want in 0..6u64 {
        let m = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("stream stalled")
            .unwrap()
            .expect("stream ended");
        assert_eq!(counter(&m), want);
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "6 messages 100 ms apart arrived in {took:?}: not streamed?"
    );
    // The unary channel is still usable while a stream is open on it.
    let svid = fetch_jwt(&mut c, &["again"]).await;
    assert_eq!(svid.spiffe_id, "again");
    drop(stream);

    // The denial is in the backend's access log.
    let log = mesh.dir.join("backend-access.jsonl");
    let mut found = None;
    for _ in 0..100 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        found = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|l| l["access"]["path"] == "/SpiffeWorkloadAPI/ValidateJWTSVID");
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = found.expect("no access-log entry for ValidateJWTSVID");
    assert_eq!(line["access"]["decision"], "deny", "{line}");
    assert_eq!(line["access"]["policy"], "backend-deny-validate", "{line}");
    assert_eq!(
        line["access"]["src"], "spiffe://mesh.test/frontend",
        "{line}"
    );

    mesh.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Rotation under a live stream
// ---------------------------------------------------------------------------------------------

/// Opens mTLS straight to a proxy's inbound listener with a given client config, recording the
/// leaf certificate the server presented (a new TCP connection and handshake per call).
#[derive(Clone)]
struct DirectTls {
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    server_leaf: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl std::fmt::Debug for DirectTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectTls")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl tower_service::Service<http::Uri> for DirectTls {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(this.addr).await?;
            let sni = ServerName::try_from("ward-upstream").map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(this.cfg)
                .connect(sni, tcp)
                .await?;
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .cloned();
            *this.server_leaf.lock().unwrap() = leaf;
            Ok(TokioIo::new(tls))
        })
    }
}

/// A gRPC call made with the frontend proxy's *current* client config straight to the backend's
/// inbound listener, on a fresh connection: proves that new handshakes use the current SVIDs on
/// both sides. Returns the leaf the backend presented.
async fn direct_call(mesh: &GrpcMesh, what: &str) -> CertificateDer<'static> {
    let cur = mesh.frontend.sink.current().unwrap();
    let conn = DirectTls {
        addr: mesh.inbound(),
        cfg: cur.client.clone(),
        server_leaf: Arc::default(),
    };
    let channel = tonic::transport::Endpoint::from_static("http://ward-upstream")
        .connect_with_connector(conn.clone())
        .await
        .unwrap_or_else(|e| panic!("{what}: direct mTLS connection failed: {e:?}"));
    let mut c = SpiffeWorkloadApiClient::new(channel);
    let svid = fetch_jwt(&mut c, &[what]).await;
    assert_eq!(svid.spiffe_id, what);
    assert_eq!(svid.hint, "spiffe://mesh.test/frontend", "{what}");
    let leaf = conn.server_leaf.lock().unwrap().clone();
    leaf.expect("no server certificate recorded")
}

fn leaf(p: &Proxy) -> CertificateDer<'static> {
    p.sink.current().unwrap().svid.chain[0].clone()
}

/// Writes new SVIDs (same IDs) for both proxies and waits, reading the stream meanwhile, until
/// each proxy's current leaf is the one written. Returns the new backend leaf.
async fn rotate(
    mesh: &GrpcMesh,
    pki: &Pki,
    watch: &mut StreamWatch,
    what: &str,
) -> CertificateDer<'static> {
    let (b_old, f_old) = (leaf(&mesh.backend), leaf(&mesh.frontend));
    let b_new = pki.svid("/backend");
    let f_new = pki.svid("/frontend");
    b_new.write(&mesh.dir, "backend");
    f_new.write(&mesh.dir, "frontend");
    let deadline = Instant::now() + Duration::from_secs(10);
    while leaf(&mesh.backend).as_ref() != b_new.chain_der[0].as_slice()
        || leaf(&mesh.frontend).as_ref() != f_new.chain_der[0].as_slice()
    {
        assert!(
            Instant::now() < deadline,
            "{what}: proxies did not pick up the new SVIDs within 10 s"
        );
        watch.read_for(Duration::from_millis(50), what).await;
    }
    assert_ne!(leaf(&mesh.backend), b_old);
    assert_ne!(leaf(&mesh.frontend), f_old);
    leaf(&mesh.backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_stream_survives_svid_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = GrpcMesh::start(dir.path()).await;
    let td = ward_spiffe::TrustDomain::new(TD).unwrap();
    let mut c = mesh.client().await;
    let stream = c
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut watch = StreamWatch::spawn(stream);
    watch.read(3, "before rotation").await;
    let b0 = leaf(&mesh.backend);
    assert_eq!(direct_call(&mesh, "before").await, b0);

    // 1. Same root, new SVIDs for the same IDs, on both sides.
    let b1 = rotate(&mesh, &mesh.pki, &mut watch, "same-root rotation").await;
    // The stream keeps going: 15 more messages in order, none more than 5 s apart (a count
    // of messages, not a rate the machine's load could miss).
    watch.read(15, "after same-root rotation").await;
    // New requests: through the proxies on a new client connection, and a fresh handshake
    // straight to the backend with the rotated SVIDs on both ends.
    let mut c2 = mesh.client().await;
    assert_eq!(
        fetch_jwt(&mut c2, &["after-1"]).await.hint,
        "spiffe://mesh.test/frontend"
    );
    assert_eq!(
        fetch_jwt(&mut c, &["after-1-old-channel"]).await.spiffe_id,
        "after-1-old-channel"
    );
    assert_eq!(direct_call(&mesh, "after-1").await, b1);

    // 2. A new root. First the bundle carries both roots; then both SVIDs come from the new
    // root.
    let pki2 = Pki::new(TD);
    ward_testing::write_atomic(
        &mesh.dir.join("bundle.pem"),
        format!("{}{}", mesh.pki.bundle_pem(), pki2.bundle_pem()).as_bytes(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in [&mesh.backend, &mesh.frontend] {
        while p.sink.trust().get(&td).map(|b| b.x509_authorities.len()) != Some(2) {
            assert!(
                Instant::now() < deadline,
                "bundle with two roots not installed"
            );
            watch
                .read_for(Duration::from_millis(50), "bundle update")
                .await;
        }
    }
    let b2 = rotate(&mesh, &pki2, &mut watch, "new-root rotation").await;
    watch.read(15, "after new-root rotation").await;
    let mut c3 = mesh.client().await;
    assert_eq!(
        fetch_jwt(&mut c3, &["after-2"]).await.hint,
        "spiffe://mesh.test/frontend"
    );
    assert_eq!(
        fetch_jwt(&mut c, &["after-2-old-channel"]).await.spiffe_id,
        "after-2-old-channel"
    );
    // The fresh handshake verifies a new-root server leaf at the frontend and a new-root
    // client leaf at the backend.
    assert_eq!(direct_call(&mesh, "after-2").await, b2);
    // The stream is still alive at the end.
    watch.read(3, "end").await;
    assert!(watch.total >= 3 + 15 + 15 + 3, "{}", watch.total);

    mesh.stop().await;
}
