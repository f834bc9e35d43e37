//! `ward-bench gateway`: the ingress path client → HTTPS edge → mTLS → backend proxy → app on
//! loopback, with three edges in one run against the same backend ward-proxy and app:
//!
//! - **ward**: ward-proxy's gateway role (TLS termination, route by host to the mesh service
//!   `shop.bench` found by discovery, mTLS as the gateway's SVID);
//! - **envoy**: Envoy 1.40 configured as the same edge (TLS termination with the same
//!   certificate, route by host, upstream mTLS presenting the gateway's SVID files and checking
//!   the backend's SPIFFE ID by URI SAN);
//! - **nginx**: TLS termination and `proxy_pass` over plain HTTP straight to the app (no mTLS,
//!   no backend proxy): the floor;
//!
//! and **direct** (client → app over plain HTTP), the baseline for added latency. Each edge runs
//! one worker. Figures: maximum req/s with oha (HTTP/1.1 and HTTP/2 over TLS) and the edge's CPU
//! over the same window; latency at fixed rates; new TLS handshakes per second (full handshakes,
//! one request each) with an ECDSA P-256 and then an RSA-2048 certificate, the edges restarted
//! on the second certificate's files. Every process is started and stopped here; every load
//! loop ends at a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::discoverybench::{TD, endpoint, inbound, proxy, put, service};
use crate::lbbench::{api_and_client, app_named};
use crate::procs::{Ward, bin, free_port};
use crate::proxybench::{Latency, Proc, cpu_ticks, spawn, stop};

/// The public name clients ask for (SNI and Host).
const HOST: &str = "shop.bench.test";
/// The mesh service behind it.
const SERVICE: &str = "shop.bench";

/// Options from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) envoy: PathBuf,
    pub(crate) nginx: PathBuf,
    pub(crate) oha: PathBuf,
    pub(crate) duration: Duration,
    pub(crate) rates: Vec<u32>,
    pub(crate) handshake_clients: usize,
}

/// The key of the edge certificate.
#[derive(Debug, Clone, Copy)]
enum KeyKind {
    EcdsaP256,
    Rsa2048,
}

impl KeyKind {
    fn label(self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 => "ECDSA P-256",
            KeyKind::Rsa2048 => "RSA-2048",
        }
    }
}

/// A web PKI of one root (ECDSA P-256) that signs leaves for [`HOST`].
struct WebPki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    root_der: rustls_pki_types::CertificateDer<'static>,
    root_file: PathBuf,
}

/// A leaf's PEM files.
struct CertFiles {
    chain: PathBuf,
    key: PathBuf,
}

impl WebPki {
    fn new(dir: &Path) -> Result<Self> {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Gateway Bench Root");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate()?;
        let root = p.self_signed(&key)?;
        let root_file = dir.join("web-root.pem");
        std::fs::write(&root_file, root.pem())?;
        Ok(Self {
            issuer: rcgen::Issuer::new(p, key),
            root_der: root.der().clone(),
            root_file,
        })
    }

    /// A leaf for [`HOST`] with a new key of `kind`. ring cannot generate RSA keys, so the
    /// RSA key comes from the openssl command line.
    async fn leaf(&self, dir: &Path, kind: KeyKind) -> Result<CertFiles> {
        let tag = match kind {
            KeyKind::EcdsaP256 => "ecdsa",
            KeyKind::Rsa2048 => "rsa",
        };
        let key_file = dir.join(format!("web-{tag}.key"));
        let key = match kind {
            KeyKind::EcdsaP256 => rcgen::KeyPair::generate()?,
            KeyKind::Rsa2048 => {
                let out = Command::new("openssl")
                    .args(["genpkey", "-algorithm", "RSA", "-pkeyopt"])
                    .args(["rsa_keygen_bits:2048", "-out"])
                    .arg(&key_file)
                    .output()
                    .await
                    .context("run openssl")?;
                if !out.status.success() {
                    bail!("openssl genpkey: {}", String::from_utf8_lossy(&out.stderr));
                }
                rcgen::KeyPair::from_pem(&std::fs::read_to_string(&key_file)?)?
            }
        };
        let leaf =
            rcgen::CertificateParams::new(vec![HOST.to_owned()])?.signed_by(&key, &self.issuer)?;
        let chain = dir.join(format!("web-{tag}.pem"));
        std::fs::write(&chain, leaf.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;
        Ok(CertFiles {
            chain,
            key: key_file,
        })
    }

    /// A client trusting the root, with resumption off: every connection is a full handshake.
    fn client(&self) -> Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root_der.clone())?;
        let mut c = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.resumption = rustls::client::Resumption::disabled();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }
}

/// One edge under test: the port clients connect to and the processes that are its cost.
struct Edge {
    name: &'static str,
    port: u16,
    pids: Vec<u32>,
}

/// The three edges of one certificate, running.
struct Edges {
    edges: Vec<Edge>,
    gateway: Child,
    others: Vec<Proc>,
}

impl Edges {
    async fn stop(mut self) {
        let _ = self.gateway.kill().await;
        for p in &mut self.others {
            stop(p).await;
        }
    }
}

/// What the three edges share: the backend proxy, the app and the gateway's SVID files.
struct Shared<'a> {
    o: &'a Opts,
    ward: &'a Ward,
    dir: &'a Path,
    backend: u16,
    app: SocketAddr,
    svid_dir: PathBuf,
    /// The handshake client (trusts the web root, never resumes).
    client: Arc<rustls::ClientConfig>,
    /// The web root as a PEM file, for oha.
    root: PathBuf,
}

/// The gateway listener and the `gateway` section (the last key of the proxy's YAML).
fn gateway_yaml(port: u16, cert: &CertFiles) -> String {
    format!(
        "  - {{ role: gateway, name: https, listen: 127.0.0.1:{port}, protocol: https }}
gateway:
  certificates: [ {{ cert: \"{}\", key: \"{}\" }} ]
  routes:
    - name: shop
      hostnames: [{HOST}]
      rules: [ {{ backends: [ {{ service: {SERVICE}, port: 80 }} ] }} ]
",
        cert.chain.display(),
        cert.key.display()
    )
}

/// Envoy as the same edge: TLS with the same certificate, host route, mTLS to the backend
/// proxy as the gateway (the agent's SVID files), the backend's ID checked by URI SAN.
fn envoy_yaml(admin: u16, port: u16, backend: u16, cert: &CertFiles, svid: &Path) -> String {
    let (c, k, s) = (cert.chain.display(), cert.key.display(), svid.display());
    format!(
        r#"admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  listeners:
  - name: edge
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: ["h2", "http/1.1"]
            tls_certificates: [ {{ certificate_chain: {{ filename: "{c}" }}, private_key: {{ filename: "{k}" }} }} ]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: edge
          codec_type: AUTO
          strip_any_host_port: true
          route_config:
            virtual_hosts:
            - {{ name: shop, domains: ["{HOST}"], routes: [ {{ match: {{ prefix: "/" }}, route: {{ cluster: shop }} }} ] }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: shop
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: shop
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {backend} }} }} }} }} ] }} ]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          # Ward's mesh hops speak TLS 1.3 only; Envoy's upstream default stops at 1.2.
          tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}
          alpn_protocols: ["h2"]
          tls_certificates: [ {{ certificate_chain: {{ filename: "{s}/svid.pem" }}, private_key: {{ filename: "{s}/svid_key.pem" }} }} ]
          validation_context:
            trusted_ca: {{ filename: "{s}/bundle.pem" }}
            match_typed_subject_alt_names: [ {{ san_type: URI, matcher: {{ exact: "spiffe://{TD}/api" }} }} ]
"#
    )
}

/// nginx as the floor: TLS termination, keep-alive `proxy_pass` to the app. Sessions are
/// neither cached nor ticketed, so it cannot resume what the others would not.
fn nginx_conf(dir: &Path, port: u16, app: SocketAddr, cert: &CertFiles) -> String {
    let d = dir.display();
    let (c, k) = (cert.chain.display(), cert.key.display());
    format!(
        r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;
  keepalive_requests 1000000;
  upstream app {{ server {app}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} ssl http2;
    server_name {HOST};
    ssl_certificate {c};
    ssl_certificate_key {k};
    ssl_session_cache off;
    ssl_session_tickets off;
    http2_max_requests 1000000;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"#
    )
}

/// `pid` and its children (nginx's master and its one worker).
fn with_children(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

/// Starts the three edges on `cert` and waits until each answers 200 through to the app.
async fn start_edges(s: &Shared<'_>, tag: &str, cert: &CertFiles) -> Result<Edges> {
    let (w, e, n) = (free_port()?, free_port()?, free_port()?);
    let (gateway, _) = proxy(
        s.ward,
        s.dir,
        &format!("gateway-{tag}"),
        "client",
        &gateway_yaml(w, cert),
        true,
    )?;
    let envoy_cfg = s.dir.join(format!("envoy-{tag}.yaml"));
    std::fs::write(
        &envoy_cfg,
        envoy_yaml(free_port()?, e, s.backend, cert, &s.svid_dir),
    )?;
    let base_id = std::process::id() % 60000 + 20 + u32::from(tag == "rsa");
    let envoy = spawn(
        "envoy",
        Command::new(&s.o.envoy)
            .args(["--concurrency", "1", "--log-level", "error", "--base-id"])
            .arg(base_id.to_string())
            .arg("-c")
            .arg(&envoy_cfg),
    )?;
    let nd = s.dir.join(format!("nginx-{tag}"));
    std::fs::create_dir_all(&nd)?;
    std::fs::write(nd.join("nginx.conf"), nginx_conf(&nd, n, s.app, cert))?;
    let nginx = spawn(
        "nginx",
        Command::new(&s.o.nginx)
            .arg("-p")
            .arg(&nd)
            .arg("-c")
            .arg(nd.join("nginx.conf")),
    )?;
    let mut edges = Edges {
        edges: Vec::new(),
        gateway,
        others: vec![envoy, nginx],
    };
    let pids = [
        vec![edges.gateway.id().unwrap_or(0)],
        vec![edges.others[0].pid()],
        vec![edges.others[1].pid()],
    ];
    for ((name, port), pids) in [("ward", w), ("envoy", e), ("nginx", n)]
        .into_iter()
        .zip(pids)
    {
        edges.edges.push(Edge { name, port, pids });
    }
    let waits: Vec<_> = edges.edges.iter().map(|e| (e.name, e.port)).collect();
    for (name, port) in waits {
        if let Err(err) = ready(port, &s.client).await {
            edges.stop().await;
            return Err(err.context(format!("{name} edge ({tag})")));
        }
    }
    // nginx forks its worker after it starts listening; it is there once nginx answered.
    let master = edges.edges[2].pids[0];
    edges.edges[2].pids = with_children(master);
    Ok(edges)
}

/// The request every handshake carries.
fn request() -> String {
    format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n")
}

/// One new TLS connection to `port` (SNI [`HOST`]) and one request on it: the status.
async fn get_once(port: u16, cfg: &Arc<rustls::ClientConfig>) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(HOST).map_err(std::io::Error::other)?;
    let mut tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await?;
    tls.write_all(request().as_bytes()).await?;
    // "HTTP/1.1 200"
    let mut head = [0u8; 12];
    tls.read_exact(&mut head).await?;
    std::str::from_utf8(&head[9..])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP/1.1 response"))
}

/// Waits (at most 30 s) until `port` answers 200 over TLS.
async fn ready(port: u16, cfg: &Arc<rustls::ClientConfig>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), get_once(port, cfg)).await {
            Ok(Ok(200)) => return Ok(()),
            Ok(Ok(status)) => last = format!("status {status}"),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timeout".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no 200 on port {port} within 30 s (last: {last})")
}

/// Full handshakes, one request each, `clients` at a time for `dur`: (200s, failures).
async fn handshakes(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    dur: Duration,
    clients: usize,
) -> Result<(u64, u64)> {
    let end = Instant::now() + dur;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < end {
                    match tokio::time::timeout(Duration::from_secs(5), get_once(port, &cfg)).await {
                        Ok(Ok(200)) => ok += 1,
                        _ => {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let mut sum = (0, 0);
    for t in tasks {
        let (ok, failed) = t.await?;
        sum = (sum.0 + ok, sum.1 + failed);
    }
    Ok(sum)
}

/// Where oha sends its load: a URL and the flags that reach it.
struct Target {
    url: String,
    args: Vec<String>,
}

impl Target {
    fn direct(app: SocketAddr) -> Self {
        Self {
            url: format!("http://{app}/"),
            args: Vec::new(),
        }
    }

    /// `https://HOST:port/`, resolved to loopback, verified against the bench root.
    fn edge(port: u16, root: &Path) -> Self {
        Self {
            url: format!("https://{HOST}:{port}/"),
            args: vec![
                "--cacert".into(),
                root.display().to_string(),
                "--connect-to".into(),
                format!("{HOST}:{port}:127.0.0.1:{port}"),
            ],
        }
    }
}

/// How oha loads a target.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// As fast as it can over keep-alive HTTP/1.1 connections.
    MaxHttp1,
    /// As fast as it can over HTTP/2 connections, many streams each.
    MaxHttp2,
    /// A fixed rate over HTTP/1.1, latency corrected for coordinated omission.
    Rate(u32),
}

/// One oha run. `ok` is the share of answers that were 200 (requests cut off by the deadline
/// are not counted); every request gives up after 10 s and oha itself after the run plus 60 s.
async fn oha(o: &Opts, t: &Target, load: Load) -> Result<Latency> {
    let mut cmd = Command::new(&o.oha);
    cmd.args(["--no-tui", "--output-format", "json", "-t", "10s", "-z"])
        .arg(format!("{}s", o.duration.as_secs()))
        .args(&t.args)
        .kill_on_drop(true);
    match load {
        Load::MaxHttp1 => cmd.args(["-c", "64"]),
        Load::MaxHttp2 => cmd.args(["--http2", "-c", "16", "-p", "16"]),
        Load::Rate(r) => cmd.args(["-c", "50", "--latency-correction", "-q", &r.to_string()]),
    };
    let out = tokio::time::timeout(
        o.duration + Duration::from_secs(60),
        cmd.arg(&t.url).output(),
    )
    .await
    .context("oha did not finish")?
    .context("run oha")?;
    if !out.status.success() {
        bail!("oha {}: {}", t.url, String::from_utf8_lossy(&out.stderr));
    }
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha JSON")?;
    let count = |v: &serde_json::Value, keep: &dyn Fn(&str) -> bool| -> f64 {
        v.as_object().map_or(0.0, |m| {
            m.iter()
                .filter(|(k, _)| keep(k))
                .filter_map(|(_, n)| n.as_f64())
                .sum()
        })
    };
    let answers = count(&j["statusCodeDistribution"], &|_| true)
        + count(&j["errorDistribution"], &|k| !k.contains("deadline"));
    let ok = count(&j["statusCodeDistribution"], &|k| k == "200");
    Ok(crate::proxybench::latency_of(
        &j,
        if answers > 0.0 { ok / answers } else { 0.0 },
    ))
}

/// Runs `f` and returns with it the CPU cores each group of processes used meanwhile.
async fn with_cpu<T>(
    groups: [&[u32]; 2],
    f: impl Future<Output = Result<T>>,
) -> Result<(T, [f64; 2])> {
    let ticks = |g: &[u32]| g.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
    let before = groups.map(ticks);
    let start = Instant::now();
    let v = f.await?;
    let secs = start.elapsed().as_secs_f64();
    let mut cores = [0.0; 2];
    for (i, g) in groups.into_iter().enumerate() {
        // USER_HZ ticks.
        cores[i] = ticks(g).saturating_sub(before[i]) as f64 / 100.0 / secs;
    }
    Ok((v, cores))
}

/// The gateway's SVID (the agent's `client` entry) as PEM files, for Envoy.
async fn svid_files(ward: &Ward, dir: &Path) -> Result<PathBuf> {
    let out = dir.join("gateway-svid");
    std::fs::create_dir_all(&out)?;
    let st = Command::new(bin("ward-agent")?)
        .args(["files", "--once", "--spiffe-id"])
        .arg(format!("spiffe://{TD}/client"))
        .arg("--socket")
        .arg(format!("unix://{}", ward.agent_socket().display()))
        .arg("--dir")
        .arg(&out)
        .status()
        .await?;
    if !st.success() {
        bail!("ward-agent files failed");
    }
    Ok(out)
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}", a / b)
}

/// Maximum throughput and the edges' CPU, for HTTP/1.1 and HTTP/2 over TLS.
async fn throughput(s: &Shared<'_>, edges: &Edges, backend: u32) -> Result<()> {
    let o = s.o;
    println!(
        "Maximum throughput ({}s each; oha HTTP/1.1 -c 64, HTTP/2 -c 16 -p 16; edge CPU = the edge's CPU time / wall time):\n",
        o.duration.as_secs()
    );
    println!(
        "| protocol | path | req/s | 200s | edge CPU (cores) | req/s per edge core | edge CPU µs/req | edge CPU/req vs nginx | backend proxy CPU (cores) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (proto, load) in [("http1", Load::MaxHttp1), ("http2", Load::MaxHttp2)] {
        let d = oha(o, &Target::direct(s.app), load).await?;
        println!(
            "| {proto} | direct (plain HTTP) | {:.0} | {:.1}% | | | | | |",
            d.rps,
            d.ok * 100.0
        );
        let mut measured = Vec::new();
        for e in &edges.edges {
            let (l, [cpu, bcpu]) = with_cpu(
                [&e.pids, &[backend]],
                oha(o, &Target::edge(e.port, &s.root), load),
            )
            .await?;
            let us = cpu * 1e6 / l.rps.max(1.0);
            measured.push((e.name, l, cpu, us, bcpu));
        }
        let nginx_us = measured
            .iter()
            .find(|m| m.0 == "nginx")
            .map_or(f64::NAN, |m| m.3);
        for (name, l, cpu, us, bcpu) in &measured {
            println!(
                "| {proto} | {name} | {:.0} | {:.1}% | {cpu:.2} | {:.0} | {us:.1} | {} | {bcpu:.2} |",
                l.rps,
                l.ok * 100.0,
                l.rps / cpu.max(0.01),
                ratio(*us, nginx_us)
            );
        }
        rows.push((proto, measured));
    }
    println!();
    for (proto, m) in &rows {
        let get = |n: &str| m.iter().find(|x| x.0 == n);
        if let (Some(w), Some(e), Some(n)) = (get("ward"), get("envoy"), get("nginx")) {
            let per_core = |x: &(&str, Latency, f64, f64, f64)| x.1.rps / x.2.max(0.01);
            println!(
                "ratio ward/envoy {proto}: req/s {}, req/s per edge core {} (aim ≥ 1.5); ward/nginx {proto}: req/s {}, edge CPU per request {} (aim ≤ 1.3)",
                ratio(w.1.rps, e.1.rps),
                ratio(per_core(w), per_core(e)),
                ratio(w.1.rps, n.1.rps),
                ratio(w.3, n.3)
            );
        }
    }
    Ok(())
}

/// p50/p99 at fixed rates (HTTP/1.1 over TLS) and what each edge adds to direct.
async fn latency(s: &Shared<'_>, edges: &Edges) -> Result<()> {
    let o = s.o;
    println!(
        "\nLatency at fixed rates, HTTP/1.1 (over TLS to the edges), oha -c 50 --latency-correction, {}s per point (ms):\n",
        o.duration.as_secs()
    );
    println!("| rate | path | achieved req/s | 200s | p50 | p99 | added p50 | added p99 |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut added = Vec::new();
    for rate in &o.rates {
        let d = oha(o, &Target::direct(s.app), Load::Rate(*rate)).await?;
        println!(
            "| {rate}/s | direct | {:.0} | {:.1}% | {:.3} | {:.3} | | |",
            d.rps,
            d.ok * 100.0,
            d.p50,
            d.p99
        );
        for e in &edges.edges {
            let l = oha(o, &Target::edge(e.port, &s.root), Load::Rate(*rate)).await?;
            let a = (l.p50 - d.p50, l.p99 - d.p99);
            println!(
                "| {rate}/s | {} | {:.0} | {:.1}% | {:.3} | {:.3} | {:.3} | {:.3} |",
                e.name,
                l.rps,
                l.ok * 100.0,
                l.p50,
                l.p99,
                a.0,
                a.1
            );
            added.push((*rate, e.name, a));
        }
    }
    println!();
    for rate in &o.rates {
        let get = |n: &str| added.iter().find(|x| x.0 == *rate && x.1 == n).map(|x| x.2);
        if let (Some(w), Some(e), Some(n)) = (get("ward"), get("envoy"), get("nginx")) {
            println!(
                "ratio added latency at {rate}/s: ward/envoy p50 {} p99 {}; ward/nginx p50 {} p99 {}",
                ratio(w.0, e.0),
                ratio(w.1, e.1),
                ratio(w.0, n.0),
                ratio(w.1, n.1)
            );
        }
    }
    Ok(())
}

/// One handshake row: (certificate, edge, handshakes/s, failures, edge cores).
type HandshakeRow = (KeyKind, &'static str, f64, u64, f64);

/// New TLS connections per second against each edge, with the edge's CPU.
async fn handshake_rows(
    s: &Shared<'_>,
    edges: &Edges,
    kind: KeyKind,
    backend: u32,
) -> Result<Vec<HandshakeRow>> {
    let mut rows = Vec::new();
    for e in &edges.edges {
        let ((ok, failed), [cpu, _]) = with_cpu(
            [&e.pids, &[backend]],
            handshakes(e.port, &s.client, s.o.duration, s.o.handshake_clients),
        )
        .await?;
        rows.push((
            kind,
            e.name,
            ok as f64 / s.o.duration.as_secs_f64(),
            failed,
            cpu,
        ));
    }
    Ok(rows)
}

fn print_handshakes(o: &Opts, rows: &[HandshakeRow]) {
    println!(
        "\nNew TLS connections per second (full handshakes, no resumption, TLS 1.3, one HTTP/1.1 request each through to the app; client in the bench process, {} at a time, {}s each):\n",
        o.handshake_clients,
        o.duration.as_secs()
    );
    println!(
        "| certificate | edge | handshakes/s | failed | edge CPU (cores) | handshakes/s per edge core |"
    );
    println!("|---|---|---|---|---|---|");
    for (kind, name, rate, failed, cpu) in rows {
        println!(
            "| {} | {name} | {rate:.0} | {failed} | {cpu:.2} | {:.0} |",
            kind.label(),
            rate / cpu.max(0.01)
        );
    }
    println!();
    for kind in [KeyKind::EcdsaP256, KeyKind::Rsa2048] {
        let get = |n: &str| {
            rows.iter()
                .find(|r| r.0.label() == kind.label() && r.1 == n)
                .map(|r| (r.2, r.2 / r.4.max(0.01)))
        };
        if let (Some(w), Some(e), Some(n)) = (get("ward"), get("envoy"), get("nginx")) {
            println!(
                "ratio handshakes {}: ward/envoy {} (per edge core {}); ward/nginx {} (per edge core {})",
                kind.label(),
                ratio(w.0, e.0),
                ratio(w.1, e.1),
                ratio(w.0, n.0),
                ratio(w.1, n.1)
            );
        }
    }
}

/// Runs everything and prints the report.
pub(crate) async fn run(o: Opts) -> Result<()> {
    let ward = api_and_client(TD).await?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let app = app_named(Duration::ZERO, "ok\n").await?;
    // The backend sidecar: an inbound listener as `api`; the gateway's `client` ID is allowed
    // (default all-authenticated). The service points at it.
    let backend_port = free_port()?;
    let (mut backend, _) = proxy(
        &ward,
        dir,
        "backend",
        "api",
        &inbound(backend_port, app),
        false,
    )?;
    let backend_pid = backend.id().unwrap_or(0);
    put(
        &ward,
        vec![service(SERVICE, vec![endpoint("127.0.0.1", backend_port)])],
    )
    .await?;
    let svid_dir = svid_files(&ward, dir).await?;
    let pki = WebPki::new(dir)?;
    let s = Shared {
        o: &o,
        ward: &ward,
        dir,
        backend: backend_port,
        app,
        svid_dir,
        client: pki.client()?,
        root: pki.root_file.clone(),
    };
    let result = async {
        println!(
            "## Ingress gateway benchmark (loopback, {} cores; each edge on 1 worker; ward and envoy reach the app through the same ward-proxy backend over mTLS, nginx straight over HTTP)\n",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        let mut rows = Vec::new();
        for (kind, tag) in [(KeyKind::EcdsaP256, "ecdsa"), (KeyKind::Rsa2048, "rsa")] {
            let cert = pki.leaf(dir, kind).await?;
            let edges = start_edges(&s, tag, &cert).await?;
            let measured = async {
                if matches!(kind, KeyKind::EcdsaP256) {
                    // Every path answers 200 before anything is measured.
                    for e in &edges.edges {
                        let mut short = o.clone();
                        short.duration = Duration::from_secs(1);
                        let l = oha(&short, &Target::edge(e.port, &s.root), Load::MaxHttp1)
                            .await?;
                        if l.ok < 0.999 {
                            bail!("{}: {:.1}% of answers are 200", e.name, l.ok * 100.0);
                        }
                    }
                    println!("(throughput and latency with the {} certificate)\n", kind.label());
                    throughput(&s, &edges, backend_pid).await?;
                    latency(&s, &edges).await?;
                }
                handshake_rows(&s, &edges, kind, backend_pid).await
            }
            .await;
            edges.stop().await;
            rows.extend(measured?);
        }
        print_handshakes(&o, &rows);
        Ok(())
    }
    .await;
    let _ = backend.kill().await;
    ward.stop().await;
    result
}
