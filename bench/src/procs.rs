//! Starting and stopping real `ward-ca` and `ward-agent` processes for benchmarks.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use ward_net::{ClientAuth, CredentialSink, PeerPolicy, Svid, TlsSettings, TrustStore};
use ward_proto::admin::admin_client::AdminClient;
use ward_proto::node::node_client::NodeClient;
use ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ward_spiffe::TrustDomain;

type Channel = tonic::transport::Channel;

/// Wraps a Workload API request with the security header.
pub(crate) fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// TLS settings for a simulated agent: trusts the CA's bundle file, expects the CA's server ID.
pub(crate) fn node_sink(td: &TrustDomain, bundle_pem: &Path) -> Result<Arc<CredentialSink>> {
    let server = td.id_from_segments(["ward", "server"])?;
    let sink = Arc::new(CredentialSink::new(
        Arc::new(TrustStore::new()),
        TlsSettings {
            accept_clients: PeerPolicy::OneOf(vec![]),
            client_auth: ClientAuth::Required,
            accept_servers: PeerPolicy::OneOf(vec![server]),
            alpn: vec![b"h2".to_vec()],
            tls12: false,
        },
    ));
    let pem = std::fs::read(bundle_pem)?;
    let mut b = ward_spiffe::Bundle::new(td.clone());
    b.x509_authorities = ward_spiffe::bundle::pem_certificates(&pem)?;
    sink.update_bundle(b)?;
    Ok(sink)
}

/// A node API channel to `addr` presenting `svid` (none: to attest).
pub(crate) fn node_channel(
    addr: &str,
    sink: &CredentialSink,
    svid: Option<&Svid>,
) -> Result<Channel> {
    let cfg = sink.client_config(svid)?;
    let source: ward_net::connector::ConfigSource = Arc::new(move || Some(cfg.clone()));
    Ok(ward_net::connector::tls_channel(addr, source)?)
}

pub(crate) fn bin(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found; build the workspace binaries first (cargo build --release)",
            p.display()
        );
    }
    Ok(p)
}

/// Starts `ward-ca run --config <config>`, killed when the handle is dropped.
pub(crate) fn spawn_ca(config: &std::path::Path) -> Result<tokio::process::Child> {
    Command::new(bin("ward-ca")?)
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start ward-ca with {}", config.display()))
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Processes started for one benchmark, stopped by [`Ward::stop`] (or killed on drop).
pub(crate) struct Ward {
    dir: tempfile::TempDir,
    td: TrustDomain,
    node_addr: String,
    ca: Child,
    agent: tokio::sync::Mutex<Option<Child>>,
}

impl Ward {
    /// Starts `ward-ca run` for trust domain `td` and waits until its admin socket answers.
    pub(crate) async fn start_ca(td: &str) -> Result<Self> {
        Ok(Self::start_ca_on(td, StoreKind::Sled).await?.0)
    }

    /// A CA on the given store; the etcd cluster (if any) lives as long as the returned guard.
    pub(crate) async fn start_ca_on(
        td: &str,
        store: StoreKind,
    ) -> Result<(Self, Option<ward_testing::etcd::Etcd>)> {
        let etcd = match store {
            StoreKind::Sled => None,
            StoreKind::Etcd => Some(ward_testing::etcd::Etcd::start()),
            StoreKind::Etcd3 => Some(ward_testing::etcd::Etcd::cluster(3)),
        };
        let ca = Self::start_replica(td, etcd.as_ref(), "").await?;
        Ok((ca, etcd))
    }

    /// Starts `ward-ca run` for trust domain `td` on `etcd` (none: the embedded sled store),
    /// with `extra` appended to its config file, and waits until its admin socket answers.
    /// Several on one etcd are replicas of one CA.
    pub(crate) async fn start_replica(
        td: &str,
        etcd: Option<&ward_testing::etcd::Etcd>,
        extra: &str,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("ca.toml");
        let endpoints = etcd.map(|e| {
            e.endpoints()
                .iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        });
        let store = match &endpoints {
            None => String::new(),
            Some(eps) => {
                format!("[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [{eps}]\n")
            }
        };
        std::fs::write(
            &config,
            format!("trust_domain = {td:?}\ndata_dir = \"unused\"\n{extra}\n{store}"),
        )?;
        let port = free_port()?;
        let node_addr = format!("127.0.0.1:{port}");
        let ca = Command::new(bin("ward-ca")?)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args([
                "--trust-domain",
                td,
                "--bind-address",
                &node_addr,
                "--health-address",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.path().join("ca"))
            .env("WARD_CA_LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start ward-ca")?;
        let this = Self {
            td: TrustDomain::new(td)?,
            node_addr,
            ca,
            agent: tokio::sync::Mutex::new(None),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if this.admin_socket().exists()
                && this
                    .admin()
                    .get_bundle(ward_proto::admin::GetBundleRequest {})
                    .await
                    .is_ok()
            {
                return Ok(this);
            }
            if Instant::now() > deadline {
                bail!("ward-ca did not come up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node API address (`host:port`).
    pub(crate) fn node_addr(&self) -> &str {
        &self.node_addr
    }

    /// Kills the CA process with SIGKILL, as a crash would.
    pub(crate) async fn kill_ca(&mut self) -> Result<()> {
        self.ca.kill().await.context("kill ward-ca")
    }

    fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("ca/admin/api.sock")
    }

    pub(crate) fn agent_socket(&self) -> PathBuf {
        self.dir.path().join("agent/api.sock")
    }

    /// An admin API client.
    pub(crate) fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(ward_net::process::unix_channel(&self.admin_socket()))
    }

    /// A Workload API client on the agent's socket.
    pub(crate) fn workload_client(&self) -> SpiffeWorkloadApiClient<Channel> {
        SpiffeWorkloadApiClient::new(ward_net::process::unix_channel(&self.agent_socket()))
    }

    fn sink(&self) -> Result<Arc<CredentialSink>> {
        node_sink(&self.td, &self.dir.path().join("ca/bundle.pem"))
    }

    fn channel(&self, sink: &CredentialSink, svid: Option<&Svid>) -> Result<Channel> {
        node_channel(&self.node_addr, sink, svid)
    }

    /// Attests with `token` over the node API (as a simulated agent) and returns a node API
    /// client that presents the resulting agent SVID.
    pub(crate) async fn attested_node_client(
        &self,
        token: &str,
    ) -> Result<(NodeClient<Channel>, Svid)> {
        let sink = self.sink()?;
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        let csr = p.serialize_request(&key)?.der().to_vec();
        let resp = NodeClient::new(self.channel(&sink, None)?)
            .attest(ward_proto::node::AttestRequest {
                method: Some(ward_proto::node::attest_request::Method::JoinToken(
                    ward_proto::node::JoinTokenAttestation {
                        token: token.to_owned(),
                    },
                )),
                csr,
            })
            .await?
            .into_inner();
        let chain = resp.svid.context("no SVID")?.cert_chain;
        let svid = Svid::from_parts(chain, key.serialize_der())?;
        let client = NodeClient::new(self.channel(&sink, Some(&svid))?);
        Ok((client, svid))
    }

    /// A node API client presenting `svid` (after a renewal), trusting the current bundle.
    pub(crate) fn node_client_for(&self, svid: &Svid) -> Result<NodeClient<Channel>> {
        let sink = self.sink()?;
        Ok(NodeClient::new(self.channel(&sink, Some(svid))?))
    }

    /// Starts `ward-agent run` attested with a fresh token; returns its agent ID once its
    /// Workload API socket exists.
    pub(crate) async fn start_agent(&self) -> Result<String> {
        let token = self
            .admin()
            .create_join_token(ward_proto::admin::CreateJoinTokenRequest { ttl_seconds: 0 })
            .await?
            .into_inner();
        let child = spawn_agent(
            &self.td,
            &self.node_addr,
            &self.dir.path().join("agent"),
            &self.agent_socket(),
            &self.bundle_path(),
            &token.token,
        )
        .await?;
        *self.agent.lock().await = Some(child);
        Ok(token.agent_id)
    }

    /// The CA's and the agent's process IDs (0 when not running).
    pub(crate) fn pids(&self) -> (u32, u32) {
        let agent = self
            .agent
            .try_lock()
            .ok()
            .and_then(|a| a.as_ref().and_then(Child::id))
            .unwrap_or(0);
        (self.ca.id().unwrap_or(0), agent)
    }

    /// The trust bundle file the CA writes (PEM).
    pub(crate) fn bundle_path(&self) -> PathBuf {
        self.dir.path().join("ca/bundle.pem")
    }

    /// VmRSS of the CA in KiB.
    pub(crate) fn ca_rss(&self) -> Result<u64> {
        rss(self.ca.id().context("CA exited")?)
    }

    /// VmRSS of the agent in KiB.
    pub(crate) fn agent_rss(&self) -> Result<u64> {
        let pid = self
            .agent
            .try_lock()
            .ok()
            .and_then(|a| a.as_ref().and_then(Child::id))
            .context("no agent")?;
        rss(pid)
    }

    /// Spawns `n` workload processes (`ward-bench workload`), with uids `base_uid + i` if
    /// given, and waits until each holds an SVID. They exit when the returned guard drops.
    pub(crate) async fn spawn_workloads(
        &self,
        n: usize,
        base_uid: Option<u32>,
    ) -> Result<Vec<Child>> {
        let me = std::env::current_exe()?;
        let mut children = Vec::new();
        for i in 0..n {
            let mut cmd = Command::new(&me);
            cmd.arg("workload").arg("--socket").arg(self.agent_socket());
            if let Some(b) = base_uid {
                cmd.uid(b + i as u32);
            }
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true);
            children.push(cmd.spawn().context("spawn workload")?);
        }
        for c in &mut children {
            let out = c.stdout.take().context("stdout")?;
            let mut lines = tokio::io::BufReader::new(out).lines();
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .context("workload not ready in 60s")??;
            if line.as_deref() != Some("ready") {
                bail!("workload said {line:?}");
            }
        }
        Ok(children)
    }

    /// Stops the agent and the CA with SIGTERM.
    pub(crate) async fn stop(mut self) {
        if let Some(mut a) = self.agent.lock().await.take() {
            term(&mut a).await;
        }
        term(&mut self.ca).await;
    }
}

/// Starts `ward-agent run` in `dir` for the CA(s) at `server_address` (comma-separated),
/// trusting `bundle`, attesting with join token `token`; returns once its Workload API socket
/// exists. Killed when the handle drops.
pub(crate) async fn spawn_agent(
    td: &TrustDomain,
    server_address: &str,
    dir: &Path,
    socket: &Path,
    bundle: &Path,
    token: &str,
) -> Result<Child> {
    std::fs::create_dir_all(dir)?;
    let cfg = format!(
        "trust_domain = {:?}\nserver_address = {:?}\ndata_dir = {:?}\nsocket_path = {:?}\n\
         trust_bundle_path = {:?}\nhealth_address = \"127.0.0.1:0\"\nlog_level = \"warn\"\n",
        td.name(),
        server_address,
        dir.join("data").display().to_string(),
        socket.display().to_string(),
        bundle.display().to_string(),
    );
    std::fs::write(dir.join("agent.toml"), cfg)?;
    let child = Command::new(bin("ward-agent")?)
        .args(["run", "--config"])
        .arg(dir.join("agent.toml"))
        .env("WARD_AGENT_JOIN_TOKEN", token)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start ward-agent")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("ward-agent did not come up");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(child)
}

async fn term(c: &mut Child) {
    if let Some(pid) = c.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(10), c.wait())
        .await
        .is_err()
    {
        let _ = c.kill().await;
    }
}

fn rss(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...).
pub(crate) fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} not found"))
}

/// Where a benchmarked CA keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StoreKind {
    /// The embedded default.
    Sled,
    /// A one-member etcd on loopback.
    Etcd,
    /// A three-member etcd cluster on loopback.
    Etcd3,
}
