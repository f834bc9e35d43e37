//! `ward-bench proxy`: the two-hop topology client → outbound proxy → inbound proxy → server on
//! loopback, built from ward-proxy and from Envoy in the same run, compared with direct
//! client → server. Load comes from oha (HTTP/1.1) and h2load (HTTP/2 and gRPC); the server is
//! nginx (and a tonic gRPC server for gRPC). Every process is started here and stopped here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// Options from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) envoy: PathBuf,
    pub(crate) ward_proxy: Option<PathBuf>,
    pub(crate) nginx: PathBuf,
    pub(crate) duration: Duration,
    pub(crate) rates: Vec<u32>,
}

pub(crate) fn port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

pub(crate) async fn stop(p: &mut Proc) {
    if let Some(pid) = p.child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(5), p.child.wait())
        .await
        .is_err()
    {
        let _ = p.child.kill().await;
    }
}

pub(crate) fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {name}"))?;
    Ok(Proc {
        name: name.into(),
        child,
    })
}

pub(crate) async fn wait_port(addr: SocketAddr) -> Result<()> {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("nothing listening on {addr}")
}

pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based) = 11 and 12 after the command.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Ports of one topology.
#[derive(Debug, Clone, Copy)]
struct Topology {
    h1: u16,
    h2: u16,
    grpc: u16,
    inbound_h1: u16,
    pids: [u32; 2],
}

/// Results of one oha run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Latency {
    pub(crate) rps: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) ok: f64,
}

pub(crate) async fn oha(
    url: &str,
    rate: Option<u32>,
    conns: u32,
    dur: Duration,
) -> Result<Latency> {
    let mut cmd = Command::new("oha");
    cmd.args([
        "--no-tui",
        "--output-format",
        "json",
        "-c",
        &conns.to_string(),
        "-z",
        &format!("{}s", dur.as_secs()),
    ]);
    if let Some(r) = rate {
        cmd.args(["-q", &r.to_string(), "--latency-correction"]);
    }
    cmd.arg(url);
    let out = cmd.output().await.context("run oha (cargo install oha)")?;
    if !out.status.success() {
        bail!("oha failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha JSON")?;
    let ok = j["summary"]["successRate"].as_f64().unwrap_or(0.0);
    Ok(latency_of(&j, ok))
}

/// The rate and latency percentiles (ms) of oha's JSON output, with success rate `ok`.
pub(crate) fn latency_of(j: &serde_json::Value, ok: f64) -> Latency {
    let p = &j["latencyPercentiles"];
    let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN) * 1000.0;
    Latency {
        rps: j["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50: ms(&p["p50"]),
        p99: ms(&p["p99"]),
        p999: ms(&p["p99.9"]),
        ok,
    }
}

/// h2load: returns (req/s, succeeded fraction).
async fn h2load(url: &str, dur: Duration, grpc_body: Option<&Path>) -> Result<(f64, f64)> {
    let mut cmd = Command::new("h2load");
    cmd.args([
        "-D",
        &dur.as_secs().to_string(),
        "-c",
        "16",
        "-m",
        "32",
        "-t",
        "1",
    ]);
    if let Some(body) = grpc_body {
        cmd.arg("-d").arg(body);
        cmd.args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
    }
    cmd.arg(url);
    let out = cmd
        .output()
        .await
        .context("run h2load (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("h2load output: {text}"))?;
    let (mut done, mut ok) = (0f64, 0f64);
    for l in text.lines() {
        if let Some(r) = l.strip_prefix("requests: ") {
            let nums: Vec<f64> = r
                .split(',')
                .filter_map(|p| p.split_whitespace().next()?.parse().ok())
                .collect();
            if nums.len() >= 5 {
                done = nums[2];
                ok = nums[3];
            }
        }
    }
    Ok((rps, if done > 0.0 { ok / done } else { 0.0 }))
}

pub(crate) fn nginx_conf(dir: &Path, h1: u16, h2: u16) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/nb; proxy_temp_path {d}/np; fastcgi_temp_path {d}/nf; uwsgi_temp_path {d}/nu; scgi_temp_path {d}/ns;\n\
         keepalive_requests 1000000;\n\
         server {{ listen 127.0.0.1:{h1}; location / {{ return 200 \"ok\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:{h2} http2; http2_max_requests 1000000; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
    )
}

pub(crate) fn ward_configs(
    dir: &Path,
    app: (u16, u16, u16),
    inb: (u16, u16, u16, u16),
    out: (u16, u16, u16, u16),
) -> (String, String) {
    let d = dir.display();
    let backend = format!(
        "identity:\n  files: {{ chain: \"{d}/backend.pem\", key: \"{d}/backend.key\", bundle: \"{d}/bundle.pem\", trust_domain: bench.test }}\n\
         admin_address: 127.0.0.1:{}\n\
         listeners:\n\
         \x20 - {{ role: inbound, name: h1, listen: 127.0.0.1:{}, forward_to: \"127.0.0.1:{}\", app_protocol: http1 }}\n\
         \x20 - {{ role: inbound, name: h2, listen: 127.0.0.1:{}, forward_to: \"127.0.0.1:{}\", app_protocol: http2 }}\n\
         \x20 - {{ role: inbound, name: grpc, listen: 127.0.0.1:{}, forward_to: \"127.0.0.1:{}\", app_protocol: http2 }}\n\
         authorization:\n  policy_files: [\"{d}/policies.yaml\"]\nlog_level: warn\n",
        inb.3, inb.0, app.0, inb.1, app.1, inb.2, app.2
    );
    let frontend = format!(
        "identity:\n  files: {{ chain: \"{d}/frontend.pem\", key: \"{d}/frontend.key\", bundle: \"{d}/bundle.pem\", trust_domain: bench.test }}\n\
         admin_address: 127.0.0.1:{}\n\
         listeners:\n\
         \x20 - {{ role: outbound, name: h1, listen: 127.0.0.1:{}, upstream: \"127.0.0.1:{}\", expected_ids: [\"spiffe://bench.test/backend\"] }}\n\
         \x20 - {{ role: outbound, name: h2, listen: 127.0.0.1:{}, upstream: \"127.0.0.1:{}\", expected_ids: [\"spiffe://bench.test/backend\"] }}\n\
         \x20 - {{ role: outbound, name: grpc, listen: 127.0.0.1:{}, upstream: \"127.0.0.1:{}\", expected_ids: [\"spiffe://bench.test/backend\"] }}\n\
         log_level: warn\n",
        out.3, out.0, inb.0, out.1, inb.1, out.2, inb.2
    );
    (backend, frontend)
}

pub(crate) const POLICIES: &str = "policies:\n  - name: backend-allow-frontend\n    target: { spiffe_ids: [\"spiffe://bench.test/backend\"] }\n    action: ALLOW\n    rules:\n      - from: [ { principals: [\"spiffe://bench.test/frontend\"] } ]\n        to: [ { paths: [\"/*\"] } ]\n";

fn envoy_inbound(dir: &Path, admin: u16, listeners: &[(u16, u16, bool)]) -> String {
    let d = dir.display();
    let mut s = format!(
        "admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}\nstatic_resources:\n  listeners:\n"
    );
    for (i, (port, _, _)) in listeners.iter().enumerate() {
        s.push_str(&format!(
            "  - name: in{i}\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n    filter_chains:\n    - transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n          common_tls_context:\n            alpn_protocols: [\"h2\", \"http/1.1\"]\n            tls_certificates: [ {{ certificate_chain: {{ filename: \"{d}/backend.pem\" }}, private_key: {{ filename: \"{d}/backend.key\" }} }} ]\n            validation_context: {{ trusted_ca: {{ filename: \"{d}/bundle.pem\" }} }}\n      filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: in{i}\n          codec_type: AUTO\n          forward_client_cert_details: SANITIZE_SET\n          set_current_client_cert_details: {{ uri: true }}\n          route_config: {{ virtual_hosts: [ {{ name: all, domains: [\"*\"], routes: [ {{ match: {{ prefix: \"/\" }}, route: {{ cluster: app{i} }} }} ] }} ] }}\n          http_filters:\n          - name: envoy.filters.http.rbac\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC\n              rules:\n                action: ALLOW\n                policies:\n                  frontend:\n                    permissions: [ {{ url_path: {{ path: {{ prefix: \"/\" }} }} }} ]\n                    principals: [ {{ authenticated: {{ principal_name: {{ exact: \"spiffe://bench.test/frontend\" }} }} }} ]\n          - name: envoy.filters.http.router\n            typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}\n"
        ));
    }
    s.push_str("  clusters:\n");
    for (i, (_, app, h2)) in listeners.iter().enumerate() {
        let proto = if *h2 {
            "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }\n"
        } else {
            ""
        };
        s.push_str(&format!(
            "  - name: app{i}\n    type: STATIC\n    connect_timeout: 5s\n{proto}    load_assignment: {{ cluster_name: app{i}, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {app} }} }} }} }} ] }} ] }}\n"
        ));
    }
    s
}

fn envoy_outbound(dir: &Path, admin: u16, listeners: &[(u16, u16)]) -> String {
    let d = dir.display();
    let mut s = format!(
        "admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}\nstatic_resources:\n  listeners:\n"
    );
    for (i, (port, _)) in listeners.iter().enumerate() {
        s.push_str(&format!(
            "  - name: out{i}\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: out{i}\n          codec_type: AUTO\n          route_config: {{ virtual_hosts: [ {{ name: all, domains: [\"*\"], routes: [ {{ match: {{ prefix: \"/\" }}, route: {{ cluster: up{i} }} }} ] }} ] }}\n          http_filters:\n          - name: envoy.filters.http.router\n            typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}\n"
        ));
    }
    s.push_str("  clusters:\n");
    for (i, (_, up)) in listeners.iter().enumerate() {
        s.push_str(&format!(
            "  - name: up{i}\n    type: STATIC\n    connect_timeout: 5s\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{ http2_protocol_options: {{}} }}\n    load_assignment: {{ cluster_name: up{i}, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {up} }} }} }} }} ] }} ] }}\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        common_tls_context:\n          alpn_protocols: [\"h2\"]\n          tls_certificates: [ {{ certificate_chain: {{ filename: \"{d}/frontend.pem\" }}, private_key: {{ filename: \"{d}/frontend.key\" }} }} ]\n          validation_context:\n            trusted_ca: {{ filename: \"{d}/bundle.pem\" }}\n            match_typed_subject_alt_names: [ {{ san_type: URI, matcher: {{ exact: \"spiffe://bench.test/backend\" }} }} ]\n"
        ));
    }
    s
}

/// A gRPC server (the SPIFFE Workload API service, unary FetchJWTSVID answered from memory).
async fn grpc_backend() -> Result<SocketAddr> {
    use ward_proto::workload::{
        self as wl,
        spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer},
    };
    #[derive(Debug)]
    struct Echo;
    type S<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send>>;
    #[tonic::async_trait]
    impl SpiffeWorkloadApi for Echo {
        async fn fetch_jwtsvid(
            &self,
            r: tonic::Request<wl::JwtsvidRequest>,
        ) -> Result<tonic::Response<wl::JwtsvidResponse>, tonic::Status> {
            Ok(tonic::Response::new(wl::JwtsvidResponse {
                svids: vec![wl::Jwtsvid {
                    spiffe_id: r.into_inner().audience.join(","),
                    svid: "x".into(),
                    hint: String::new(),
                }],
            }))
        }
        type FetchJWTBundlesStream = S<wl::JwtBundlesResponse>;
        async fn fetch_jwt_bundles(
            &self,
            _: tonic::Request<wl::JwtBundlesRequest>,
        ) -> Result<tonic::Response<Self::FetchJWTBundlesStream>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn validate_jwtsvid(
            &self,
            _: tonic::Request<wl::ValidateJwtsvidRequest>,
        ) -> Result<tonic::Response<wl::ValidateJwtsvidResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        type FetchX509SVIDStream = S<wl::X509svidResponse>;
        async fn fetch_x509svid(
            &self,
            _: tonic::Request<wl::X509svidRequest>,
        ) -> Result<tonic::Response<Self::FetchX509SVIDStream>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        type FetchX509BundlesStream = S<wl::X509BundlesResponse>;
        async fn fetch_x509_bundles(
            &self,
            _: tonic::Request<wl::X509BundlesRequest>,
        ) -> Result<tonic::Response<Self::FetchX509BundlesStream>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        let incoming = tonic_incoming(l);
        let _ = tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(Echo))
            .serve_with_incoming(incoming)
            .await;
    });
    Ok(addr)
}

fn tonic_incoming(
    l: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

/// One gRPC message (FetchJWTSVID with audience "bench") as h2load's request body.
fn grpc_body(dir: &Path) -> Result<PathBuf> {
    use prost::Message;
    let msg = ward_proto::workload::JwtsvidRequest {
        audience: vec!["bench".into()],
        spiffe_id: String::new(),
    };
    let payload = msg.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(&payload);
    let p = dir.join("grpc.bin");
    std::fs::write(&p, framed)?;
    Ok(p)
}

/// New mTLS connections per second against `addr` (full handshakes, `conc` at a time).
async fn handshakes(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    dur: Duration,
    conc: usize,
) -> Result<f64> {
    let end = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name =
                    rustls::pki_types::ServerName::try_from("x").map_err(std::io::Error::other)?;
                let mut tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await?;
                // TLS 1.3: the server only judges the client certificate after the client's
                // Finished; a write and a read make the handshake complete on both sides.
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .await?;
                let mut buf = [0u8; 64];
                let got = tls.read(&mut buf).await?;
                if got == 0 {
                    return Err(std::io::Error::other("closed without a response"));
                }
                n += 1;
            }
            Ok::<_, std::io::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / dur.as_secs_f64())
}

/// Raw rustls: client and server handshakes in memory, one thread.
fn raw_handshakes(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    dur: Duration,
) -> Result<f64> {
    let end = Instant::now() + dur;
    let mut n = 0u64;
    while Instant::now() < end {
        let name = rustls::pki_types::ServerName::try_from("x")?;
        let mut c = rustls::ClientConnection::new(client.clone(), name)?;
        let mut s = rustls::ServerConnection::new(server.clone())?;
        loop {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf)?;
            }
            if !buf.is_empty() {
                s.read_tls(&mut buf.as_slice())?;
                s.process_new_packets()?;
            }
            let mut buf2 = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf2)?;
            }
            if !buf2.is_empty() {
                c.read_tls(&mut buf2.as_slice())?;
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
                break;
            }
        }
        n += 1;
    }
    Ok(n as f64 / dur.as_secs_f64())
}

fn ms(v: f64) -> String {
    format!("{v:.3}")
}

/// What the proxy benchmarks start from: a directory with the frontend's and backend's SVIDs,
/// the bundle and the policy file, and nginx answering on an HTTP/1.1 and an h2c port.
pub(crate) struct Stage {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) pki: ward_testing::Pki,
    pub(crate) fe: ward_testing::Issued,
    pub(crate) be: ward_testing::Issued,
    pub(crate) bundle: PathBuf,
    pub(crate) ng1: u16,
    pub(crate) ng2: u16,
    pub(crate) nginx: Proc,
}

/// Writes the PKI and policies and starts nginx (`nginx` is its binary).
pub(crate) async fn stage(nginx: &Path) -> Result<Stage> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let pki = ward_testing::Pki::new("bench.test");
    let fe = pki.svid("/frontend");
    let be = pki.svid("/backend");
    fe.write(d, "frontend");
    be.write(d, "backend");
    let bundle = pki.write_bundle(d);
    std::fs::write(d.join("policies.yaml"), POLICIES)?;
    let (ng1, ng2) = (port()?, port()?);
    std::fs::write(d.join("nginx.conf"), nginx_conf(d, ng1, ng2))?;
    let nginx = spawn(
        "nginx",
        Command::new(nginx)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf")),
    )?;
    wait_port(SocketAddr::from(([127, 0, 0, 1], ng1))).await?;
    Ok(Stage {
        dir,
        pki,
        fe,
        be,
        bundle,
        ng1,
        ng2,
        nginx,
    })
}

/// Runs everything and prints the report.
pub(crate) async fn run(o: Opts) -> Result<()> {
    let Stage {
        dir,
        pki,
        fe,
        be,
        ng1,
        ng2,
        mut nginx,
        ..
    } = stage(&o.nginx).await?;
    let d = dir.path();
    let grpc = grpc_backend().await?;

    // Ward.
    let ward_bin = match &o.ward_proxy {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("ward-proxy"),
    };
    let wi = (port()?, port()?, port()?, port()?);
    let wo = (port()?, port()?, port()?, port()?);
    let (bcfg, fcfg) = ward_configs(d, (ng1, ng2, grpc.port()), wi, wo);
    std::fs::write(d.join("ward-backend.yaml"), bcfg)?;
    std::fs::write(d.join("ward-frontend.yaml"), fcfg)?;
    let mut wb = spawn(
        "ward-backend",
        Command::new(&ward_bin)
            .env("WARD_PROXY_WORKER_THREADS", "1")
            .args(["run", "--config"])
            .arg(d.join("ward-backend.yaml")),
    )?;
    let mut wf = spawn(
        "ward-frontend",
        Command::new(&ward_bin)
            .env("WARD_PROXY_WORKER_THREADS", "1")
            .args(["run", "--config"])
            .arg(d.join("ward-frontend.yaml")),
    )?;
    // Envoy.
    let ei = (port()?, port()?, port()?, port()?);
    let eo = (port()?, port()?, port()?, port()?);
    std::fs::write(
        d.join("envoy-in.yaml"),
        envoy_inbound(
            d,
            ei.3,
            &[
                (ei.0, ng1, false),
                (ei.1, ng2, true),
                (ei.2, grpc.port(), true),
            ],
        ),
    )?;
    std::fs::write(
        d.join("envoy-out.yaml"),
        envoy_outbound(d, eo.3, &[(eo.0, ei.0), (eo.1, ei.1), (eo.2, ei.2)]),
    )?;
    let envoy_args = |cfg: &str, id: &str| {
        let mut c = Command::new(&o.envoy);
        c.args([
            "--concurrency",
            "1",
            "--log-level",
            "error",
            "--base-id",
            id,
            "-c",
        ])
        .arg(d.join(cfg));
        c
    };
    let mut eb = spawn(
        "envoy-inbound",
        &mut envoy_args("envoy-in.yaml", &(std::process::id() % 60000).to_string()),
    )?;
    let mut ef = spawn(
        "envoy-outbound",
        &mut envoy_args(
            "envoy-out.yaml",
            &(std::process::id() % 60000 + 1).to_string(),
        ),
    )?;
    for p in [wi.0, wo.0, ei.0, eo.0] {
        wait_port(SocketAddr::from(([127, 0, 0, 1], p))).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Idle: started, holding SVIDs and config, nothing served yet.
    let idle = (rss_kib(wf.pid()), rss_kib(ef.pid()));
    let ward = Topology {
        h1: wo.0,
        h2: wo.1,
        grpc: wo.2,
        inbound_h1: wi.0,
        pids: [wf.pid(), wb.pid()],
    };
    let envoy = Topology {
        h1: eo.0,
        h2: eo.1,
        grpc: eo.2,
        inbound_h1: ei.0,
        pids: [ef.pid(), eb.pid()],
    };
    // Sanity: every path answers 200 before measuring.
    for (name, url) in [
        ("direct", format!("http://127.0.0.1:{ng1}/")),
        ("ward", format!("http://127.0.0.1:{}/", ward.h1)),
        ("envoy", format!("http://127.0.0.1:{}/", envoy.h1)),
    ] {
        let l = oha(&url, None, 1, Duration::from_secs(1)).await?;
        if l.ok < 0.999 {
            bail!("{name}: requests fail ({:.1}% ok)", l.ok * 100.0);
        }
    }

    println!(
        "## Proxy benchmark (loopback, {} cores; each proxy on 1 worker thread)\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "Latency at fixed rates, HTTP/1.1, oha -c 50 --latency-correction, {}s per point (ms):\n",
        o.duration.as_secs()
    );
    println!("| rate | path | p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut added = Vec::new();
    for rate in &o.rates {
        let direct = oha(
            &format!("http://127.0.0.1:{ng1}/"),
            Some(*rate),
            50,
            o.duration,
        )
        .await?;
        println!(
            "| {rate}/s | direct | {} | {} | {} | | | |",
            ms(direct.p50),
            ms(direct.p99),
            ms(direct.p999)
        );
        for (name, t) in [("ward", ward), ("envoy", envoy)] {
            let l = oha(
                &format!("http://127.0.0.1:{}/", t.h1),
                Some(*rate),
                50,
                o.duration,
            )
            .await?;
            let a = (l.p50 - direct.p50, l.p99 - direct.p99, l.p999 - direct.p999);
            println!(
                "| {rate}/s | {name} | {} | {} | {} | {} | {} | {} |",
                ms(l.p50),
                ms(l.p99),
                ms(l.p999),
                ms(a.0),
                ms(a.1),
                ms(a.2)
            );
            added.push((*rate, name, a));
        }
    }
    for rate in &o.rates {
        let w = added
            .iter()
            .find(|x| x.0 == *rate && x.1 == "ward")
            .map(|x| x.2);
        let e = added
            .iter()
            .find(|x| x.0 == *rate && x.1 == "envoy")
            .map(|x| x.2);
        if let (Some(w), Some(e)) = (w, e) {
            println!(
                "\nratio ward/envoy added latency at {rate}/s: p50 {:.2}, p99 {:.2}, p99.9 {:.2}",
                w.0 / e.0,
                w.1 / e.1,
                w.2 / e.2
            );
        }
    }

    println!(
        "\nMaximum throughput ({}s each; proxy CPU = both proxies' CPU time / wall time):\n",
        o.duration.as_secs()
    );
    println!("| protocol | path | req/s | success | proxy CPU (cores) | req/s per proxy core |");
    println!("|---|---|---|---|---|---|");
    let tick = 100.0; // USER_HZ
    let mut per_core = Vec::new();
    let grpc_body = grpc_body(d)?;
    for proto in ["http1", "http2", "grpc"] {
        let direct_url = match proto {
            "http1" => format!("http://127.0.0.1:{ng1}/"),
            "http2" => format!("http://127.0.0.1:{ng2}/"),
            _ => format!(
                "http://127.0.0.1:{}/SpiffeWorkloadAPI/FetchJWTSVID",
                grpc.port()
            ),
        };
        let direct = match proto {
            "http1" => {
                let l = oha(&direct_url, None, 64, o.duration).await?;
                (l.rps, l.ok)
            }
            "http2" => h2load(&direct_url, o.duration, None).await?,
            _ => h2load(&direct_url, o.duration, Some(&grpc_body)).await?,
        };
        println!(
            "| {proto} | direct | {:.0} | {:.1}% | | |",
            direct.0,
            direct.1 * 100.0
        );
        for (name, t) in [("ward", ward), ("envoy", envoy)] {
            let before: u64 = t.pids.iter().map(|p| cpu_ticks(*p)).sum();
            let start = Instant::now();
            let (rps, ok) = match proto {
                "http1" => {
                    let l =
                        oha(&format!("http://127.0.0.1:{}/", t.h1), None, 64, o.duration).await?;
                    (l.rps, l.ok)
                }
                "http2" => h2load(&format!("http://127.0.0.1:{}/", t.h2), o.duration, None).await?,
                _ => {
                    h2load(
                        &format!("http://127.0.0.1:{}/SpiffeWorkloadAPI/FetchJWTSVID", t.grpc),
                        o.duration,
                        Some(&grpc_body),
                    )
                    .await?
                }
            };
            let cpu = (t.pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>() - before) as f64
                / tick
                / start.elapsed().as_secs_f64();
            println!(
                "| {proto} | {name} | {rps:.0} | {:.1}% | {cpu:.2} | {:.0} |",
                ok * 100.0,
                rps / cpu.max(0.01)
            );
            per_core.push((proto, name, rps, rps / cpu.max(0.01)));
        }
    }
    for proto in ["http1", "http2", "grpc"] {
        let w = per_core.iter().find(|x| x.0 == proto && x.1 == "ward");
        let e = per_core.iter().find(|x| x.0 == proto && x.1 == "envoy");
        if let (Some(w), Some(e)) = (w, e) {
            println!(
                "ratio ward/envoy {proto}: req/s {:.2}, req/s per proxy core {:.2}",
                w.2 / e.2,
                w.3 / e.3
            );
        }
    }

    // Memory: idle, then with 1,000 open keep-alive connections on the outbound listener.
    println!("\nMemory of the outbound proxy (VmRSS, MiB):\n");
    println!("| proxy | idle (before load) | 1,000 open connections |");
    println!("|---|---|---|");
    for (name, t, idle) in [("ward", ward, idle.0), ("envoy", envoy, idle.1)] {
        let mut conns = Vec::new();
        for _ in 0..1000 {
            let tcp =
                tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], t.h1))).await?;
            let (mut s, c) = hyper::client::conn::http1::handshake::<
                _,
                http_body_util::Empty<bytes::Bytes>,
            >(hyper_util::rt::TokioIo::new(tcp))
            .await?;
            tokio::spawn(c);
            let r = s
                .send_request(
                    hyper::Request::get("/")
                        .header("host", "x")
                        .body(http_body_util::Empty::new())?,
                )
                .await?;
            let _ = http_body_util::BodyExt::collect(r.into_body()).await?;
            conns.push(s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let busy = rss_kib(t.pids[0]);
        println!(
            "| {name} | {:.1} | {:.1} |",
            idle as f64 / 1024.0,
            busy as f64 / 1024.0
        );
        drop(conns);
    }

    // New mTLS connections per second against the inbound listeners and a raw rustls loop.
    let sink = ward_net::CredentialSink::new(
        Arc::new(ward_net::TrustStore::new()),
        ward_net::TlsSettings {
            accept_clients: ward_net::PeerPolicy::AnyTrusted,
            client_auth: ward_net::ClientAuth::Required,
            accept_servers: ward_net::PeerPolicy::AnyTrusted,
            alpn: vec![b"http/1.1".to_vec()],
            tls12: false,
        },
    );
    let mut b = ward_spiffe::Bundle::new(ward_spiffe::TrustDomain::new("bench.test")?);
    b.x509_authorities = vec![pki.root_der().to_vec()];
    sink.update_bundle(b)?;
    let fe_svid = ward_net::Svid::from_parts(fe.chain_der.clone(), fe.key_der.clone())?;
    let be_svid = ward_net::Svid::from_parts(be.chain_der.clone(), be.key_der.clone())?;
    let client = sink.client_config(Some(&fe_svid))?;
    let mut client_nr = (*client).clone();
    client_nr.resumption = rustls::client::Resumption::disabled();
    let client_nr = Arc::new(client_nr);
    sink.update_svid(be_svid, std::time::SystemTime::now())?;
    let server = sink.current().context("server config")?.server.clone();
    let hd = Duration::from_secs(5);
    let raw = raw_handshakes(server, client_nr.clone(), hd)?;
    let w = handshakes(
        SocketAddr::from(([127, 0, 0, 1], ward.inbound_h1)),
        client_nr.clone(),
        hd,
        4,
    )
    .await?;
    let e = handshakes(
        SocketAddr::from(([127, 0, 0, 1], envoy.inbound_h1)),
        client_nr.clone(),
        hd,
        4,
    )
    .await?;
    println!(
        "\nNew mTLS connections per second (full handshakes, no resumption, ECDSA P-256; client in the bench process, 4 at a time):\n"
    );
    println!("| target | handshakes/s | vs raw rustls |");
    println!("|---|---|---|");
    println!("| raw rustls client+server in memory, 1 thread | {raw:.0} | 1.00 |");
    println!("| ward inbound (1 worker) | {w:.0} | {:.2} |", w / raw);
    println!(
        "| envoy inbound (concurrency 1) | {e:.0} | {:.2} |",
        e / raw
    );

    for p in [&mut wf, &mut wb, &mut ef, &mut eb, &mut nginx] {
        stop(p).await;
    }
    let _ = wb.name.len();
    Ok(())
}
