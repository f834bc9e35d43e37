//! The edges under test: certificates, the three edges' configurations, starting them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use super::*;

/// The key of the edge certificate.
#[derive(Debug, Clone, Copy)]
pub(super) enum KeyKind {
    EcdsaP256,
    Rsa2048,
}

impl KeyKind {
    pub(super) fn label(self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 => "ECDSA P-256",
            KeyKind::Rsa2048 => "RSA-2048",
        }
    }
}

/// A web PKI of one root (ECDSA P-256) that signs leaves for [`HOST`].
pub(super) struct WebPki {
    pub(super) issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub(super) root_der: rustls_pki_types::CertificateDer<'static>,
    pub(super) root_file: PathBuf,
}

/// A leaf's PEM files.
pub(super) struct CertFiles {
    pub(super) chain: PathBuf,
    pub(super) key: PathBuf,
}

impl WebPki {
    pub(super) fn new(dir: &Path) -> Result<Self> {
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
    pub(super) async fn leaf(&self, dir: &Path, kind: KeyKind) -> Result<CertFiles> {
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
    pub(super) fn client(&self) -> Result<Arc<rustls::ClientConfig>> {
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
pub(super) struct Edge {
    pub(super) name: &'static str,
    pub(super) port: u16,
    pub(super) pids: Vec<u32>,
}

/// The three edges of one certificate, running.
pub(super) struct Edges {
    pub(super) edges: Vec<Edge>,
    pub(super) gateway: Child,
    pub(super) others: Vec<Proc>,
}

impl Edges {
    pub(super) async fn stop(mut self) {
        let _ = self.gateway.kill().await;
        for p in &mut self.others {
            stop(p).await;
        }
    }
}

/// What the three edges share: the backend proxy, the app and the gateway's SVID files.
pub(super) struct Shared<'a> {
    pub(super) o: &'a Opts,
    pub(super) ward: &'a Ward,
    pub(super) dir: &'a Path,
    pub(super) backend: u16,
    pub(super) app: SocketAddr,
    pub(super) svid_dir: PathBuf,
    /// The handshake client (trusts the web root, never resumes).
    pub(super) client: Arc<rustls::ClientConfig>,
    /// The web root as a PEM file, for oha.
    pub(super) root: PathBuf,
}

/// The gateway listener and the `gateway` section (the last key of the proxy's YAML).
pub(super) fn gateway_yaml(port: u16, cert: &CertFiles) -> String {
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
pub(super) fn envoy_yaml(
    admin: u16,
    port: u16,
    backend: u16,
    cert: &CertFiles,
    svid: &Path,
) -> String {
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
pub(super) fn nginx_conf(dir: &Path, port: u16, app: SocketAddr, cert: &CertFiles) -> String {
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
pub(super) fn with_children(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

/// Starts the three edges on `cert` and waits until each answers 200 through to the app.
pub(super) async fn start_edges(s: &Shared<'_>, tag: &str, cert: &CertFiles) -> Result<Edges> {
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
