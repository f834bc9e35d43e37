//! Helpers shared by ward-ca's integration tests: locating (and building) the real binaries and
//! running `ward-ca dev` as a child process.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod cli;
pub mod k8s;
pub mod mesh;
pub mod web;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The ward-ca binary cargo built for this test run.
pub fn ca_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ward-ca"))
}

/// A binary of another workspace package from the same target directory (cargo only builds the
/// binaries of the package under test for its tests; workspace-wide runs build them all).
fn workspace_bin(name: &'static str, slot: &'static OnceLock<PathBuf>) -> PathBuf {
    slot.get_or_init(|| {
        let ca = ca_bin();
        let dir = ca.parent().unwrap();
        let bin = dir.join(name);
        // `./scripts/test` (and any workspace-wide cargo test/nextest run) builds every binary
        // before the tests start. Building again from inside a test would resolve features
        // differently, rebuild dependencies mid-suite and replace binaries other tests are
        // running, so only a missing binary is built.
        if !bin.exists() {
            let release = dir.file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "-p", name, "--bin", name]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "building {name} failed");
        }
        assert!(bin.exists(), "{} missing", bin.display());
        bin
    })
    .clone()
}

pub fn agent_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    workspace_bin("ward-agent", &BUILT)
}

/// The ward-proxy binary.
pub fn proxy_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    workspace_bin("ward-proxy", &BUILT)
}

/// A running `ward-ca dev`.
pub struct Dev {
    pub child: Child,
    pub socket: PathBuf,
    pub spiffe_id: String,
    pub data_dir: PathBuf,
    /// The rest of stdout, line by line.
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Dev {
    /// Starts `ward-ca dev` on `data_dir` and waits for its two lines of output.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Dev {
        let mut child = Command::new(ca_bin())
            .arg("dev")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--agent-bin")
            .arg(agent_bin())
            .arg("--proxy-bin")
            .arg(proxy_bin())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ward-ca dev");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut socket, mut id) = (None, None);
        while socket.is_none() || id.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("ward-ca dev printed its lines in time");
            if let Some(s) = line.strip_prefix("SPIFFE_ENDPOINT_SOCKET=") {
                socket = Some(s.to_owned());
            } else if let Some(s) = line.strip_prefix("SPIFFE_ID=") {
                id = Some(s.to_owned());
            }
        }
        let socket = socket.unwrap();
        let path = PathBuf::from(socket.strip_prefix("unix://").expect("unix:// address"));
        Dev {
            child,
            socket: path,
            spiffe_id: id.unwrap(),
            data_dir: data_dir.to_owned(),
            lines: rx,
        }
    }

    /// The endpoint string for SPIFFE clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "ward-ca dev did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// In-process CA and node-API clients over real TLS.

use std::sync::Arc;

use ward_ca::{CaConfig, CaServer};
use ward_net::{ClientAuth, CredentialSink, PeerPolicy, Svid, TlsSettings, TrustStore};
use ward_proto::node::node_client::NodeClient;
use ward_spiffe::{Clock, TrustDomain};

/// A CA config on ephemeral loopback ports in `dir`.
pub fn ca_config(dir: &Path, td: &str) -> CaConfig {
    let mut cfg = CaConfig::new(TrustDomain::new(td).unwrap(), dir.to_owned());
    cfg.bind_address = "127.0.0.1:0".parse().unwrap();
    cfg.health_address = "127.0.0.1:0".parse().unwrap();
    cfg
}

/// Starts an in-process CA with `clock`.
pub async fn start_ca(cfg: CaConfig, clock: Arc<dyn Clock>) -> CaServer {
    CaServer::start_with_clock(cfg, clock).await.unwrap()
}

/// A node API client that trusts `ca`'s bundle, requires its server ID, and presents `svid`.
pub fn node_client(ca: &CaServer, svid: Option<Svid>) -> NodeClient<tonic::transport::Channel> {
    let td = ca.core.cfg.trust_domain.clone();
    let sink = Arc::new(CredentialSink::new(
        Arc::new(TrustStore::new()),
        TlsSettings {
            accept_clients: PeerPolicy::OneOf(vec![]),
            client_auth: ClientAuth::Required,
            accept_servers: PeerPolicy::OneOf(vec![ward_ca::authority::server_id(&td)]),
            alpn: vec![b"h2".to_vec()],
            tls12: false,
        },
    ));
    sink.update_bundle((*ca.core.bundle()).clone()).unwrap();
    let config = sink.client_config(svid.as_ref()).unwrap();
    let source: ward_net::connector::ConfigSource = Arc::new(move || Some(config.clone()));
    let ch = ward_net::connector::tls_channel(&ca.node_addr.to_string(), source).unwrap();
    NodeClient::new(ch)
}

/// A fresh P-256 key and a CSR for it, optionally asking for `id`.
pub fn key_and_csr(id: Option<&str>) -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(id) = id {
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    }
    let csr = p.serialize_request(&key).unwrap().der().to_vec();
    (key, csr)
}

/// Creates a join token and attests with it; returns the agent's SVID.
pub async fn attest_agent(ca: &CaServer) -> Svid {
    let (token, _) = ca
        .core
        .agents
        .create_join_token(Duration::from_secs(600), ca.core.clock.now())
        .await
        .unwrap();
    let (key, csr) = key_and_csr(None);
    let resp = node_client(ca, None)
        .attest(ward_proto::node::AttestRequest {
            method: Some(ward_proto::node::attest_request::Method::JoinToken(
                ward_proto::node::JoinTokenAttestation { token },
            )),
            csr,
        })
        .await
        .unwrap()
        .into_inner();
    Svid::from_parts(resp.svid.unwrap().cert_chain, key.serialize_der()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// In-process agent next to an in-process CA, and Workload API clients.

use ward_agent::{Agent, AgentConfig};
use ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

/// An agent config for `ca` in `dir` (socket `dir/agent.sock`), attesting with a fresh token.
pub async fn agent_config(ca: &CaServer, dir: &Path) -> AgentConfig {
    let (token, _) = ca
        .core
        .agents
        .create_join_token(Duration::from_secs(600), ca.core.clock.now())
        .await
        .unwrap();
    let mut cfg = AgentConfig::new(
        ca.core.cfg.trust_domain.clone(),
        ca.node_addr.to_string(),
        dir.join("agent-data"),
        dir.join("agent.sock"),
    );
    cfg.trust_bundle_path = Some(ca.bundle_path.clone());
    cfg.health_address = "127.0.0.1:0".parse().unwrap();
    cfg.join_token = Some(token);
    cfg
}

/// Starts an agent and waits until it has synced with the CA.
pub async fn start_agent(cfg: AgentConfig) -> Agent {
    let agent = Agent::start(cfg).await.unwrap();
    let mut rx = agent.cache.subscribe();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.synced))
        .await
        .expect("agent synced in time")
        .unwrap();
    agent
}

/// A raw Workload API client on `socket`.
pub fn workload_client(socket: &Path) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    SpiffeWorkloadApiClient::new(ward_net::process::unix_channel(socket))
}

/// Wraps a request with the security header.
pub fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// `unix:uid:<this process's uid>`.
pub fn my_uid_selector() -> String {
    format!("unix:uid:{}", nix::unistd::getuid().as_raw())
}

// ---------------------------------------------------------------------------------------------
// Real peers for end-to-end tests.

/// An HTTP app on loopback that answers every request with the `x-ward-peer-id` header it got
/// (the caller's verified SPIFFE ID, set by the proxy in front of it).
pub async fn peer_id_app() -> std::net::SocketAddr {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let peer = req
                            .headers()
                            .get("x-ward-peer-id")
                            .map(|v| v.to_str().unwrap().to_owned());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(peer.unwrap_or_default()),
                        )))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A child process killed (and reaped) when the test ends, however it ends.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The serial of the leaf certificate in `pem` (the first certificate).
pub fn leaf_serial(pem: &[u8]) -> Vec<u8> {
    let certs = ward_spiffe::bundle::pem_certificates(pem).unwrap();
    ward_spiffe::x509::check_leaf(&certs[0], ward_spiffe::x509::Profile::Peer)
        .unwrap()
        .serial
}

/// The serial of the certificate a TLS server on `port` presents, as `openssl s_client` sees it
/// when it presents `certs/svid.pem` (with `svid_key.pem`) as its client certificate.
pub fn served_serial(port: u16, certs: &Path) -> Option<Vec<u8>> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(certs.join("svid.pem"))
        .arg("-key")
        .arg(certs.join("svid_key.pem"))
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = text[start..].find("-----END CERTIFICATE-----")? + start + 25;
    let der = ward_spiffe::bundle::pem_certificates(text[start..end].as_bytes()).ok()?;
    ward_spiffe::x509::check_leaf(der.first()?, ward_spiffe::x509::Profile::Peer)
        .ok()
        .map(|i| i.serial)
}

/// The Prometheus exposition at `addr`/metrics (a CA's or an agent's health endpoint).
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/metrics")
        .header("host", "ca")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let r = s.send_request(req).await.unwrap();
    String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// One HTTP/1.0 GET: the status and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (
        head.split_whitespace().nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}
