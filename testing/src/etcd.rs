//! A real etcd (Debian's `etcd-server`, `/usr/bin/etcd`) for tests: one member or a cluster of
//! several on loopback ports, in a temporary directory, killed when dropped. Members can be
//! killed (`SIGKILL`) and started again on the same data to test failover.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The etcd binary (`WARD_TEST_ETCD` overrides).
pub fn etcd_bin() -> PathBuf {
    std::env::var_os("WARD_TEST_ETCD").map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from)
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    /// Plain-HTTP `/health` (`--listen-metrics-urls`), whatever the client URLs speak.
    metrics: SocketAddr,
    child: Option<Child>,
}

/// PEM files of a TLS cluster: the CA that signed the members' serving certificates, and a
/// client certificate the members require (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// A client certificate it signed.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// A running etcd cluster.
pub struct Etcd {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
    tls: Option<TlsFiles>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints())
            .finish_non_exhaustive()
    }
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr")
}

impl Etcd {
    /// Starts a one-member cluster and waits until it serves.
    pub fn start() -> Self {
        Self::cluster(1)
    }

    /// Starts an `n`-member cluster and waits until every member serves.
    pub fn cluster(n: usize) -> Self {
        Self::build(n, false)
    }

    /// A one-member cluster whose clients must speak TLS with a client certificate.
    pub fn start_tls() -> Self {
        Self::build(1, true)
    }

    /// The TLS files of a [`start_tls`](Self::start_tls) cluster.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    fn build(n: usize, tls: bool) -> Self {
        // Ports are chosen free and then released, so another test may take one before etcd
        // binds it; etcd then exits at once. Such a start is tried again on fresh ports.
        let mut failure = String::new();
        for _ in 0..3 {
            match Self::try_build(n, tls) {
                Ok(etcd) => return etcd,
                Err(e) => failure = e,
            }
        }
        panic!("{failure}");
    }

    fn try_build(n: usize, tls: bool) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = tls.then(|| {
            let pki = crate::Pki::new("etcd.test");
            let ca = pki.write_bundle(dir.path());
            let server = pki.leaf(
                "/etcd",
                &crate::LeafOpts {
                    ip_sans: vec![std::net::Ipv4Addr::LOCALHOST.into()],
                    ..Default::default()
                },
            );
            let (server_cert, server_key) = server.write(dir.path(), "server");
            let (client_cert, client_key) = pki.svid("/client").write(dir.path(), "client");
            TlsFiles {
                ca,
                client_cert,
                client_key,
                server_cert,
                server_key,
            }
        });
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                metrics: free_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Self {
            dir,
            members,
            initial_cluster,
            tls,
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        for i in 0..n {
            etcd.wait_ready(i)?;
        }
        Ok(etcd)
    }

    fn spawn(&mut self, i: usize) {
        let data = self.dir.path().join(&self.members[i].name);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let m = &mut self.members[i];
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("etcd log file");
        let mut cmd = Command::new(etcd_bin());
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&t.ca);
        }
        let child = cmd
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("{scheme}://{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("{scheme}://{}", m.client))
            .arg("--listen-metrics-urls")
            .arg(format!("http://{}", m.metrics))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg("ward-test")
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (Debian package etcd-server): {e}",
                    etcd_bin().display()
                )
            });
        m.child = Some(child);
    }

    /// Waits until member `i` answers `/health` with `"health":"true"` (it has a leader).
    pub fn wait_healthy(&mut self, i: usize) {
        if let Err(e) = self.wait_ready(i) {
            panic!("{e}");
        }
    }

    /// [`wait_healthy`](Self::wait_healthy), or why not (the member exited or never became
    /// healthy).
    fn wait_ready(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = self.members[i].metrics;
        let mut why = "not healthy in 30 s";
        while Instant::now() < deadline {
            if health(addr) {
                return Ok(());
            }
            let exited = self.members[i]
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                why = "exited";
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default();
        Err(format!("etcd member {i} at {addr} {why}; its log:\n{log}"))
    }

    /// Client URLs, one per member (`http://127.0.0.1:port`, `https://` with TLS).
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://{}", m.client))
            .collect()
    }

    /// Kills member `i` with SIGKILL (no clean shutdown).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory (after [`kill`](Self::kill)).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        // Same flags: with an existing data directory etcd ignores the initial-cluster ones.
        self.spawn(i);
    }
}

impl Etcd {
    /// The member that is the raft leader now (from its `etcd_server_is_leader` metric).
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.child.is_some()
                && get(m.metrics, "/metrics")
                    .is_some_and(|b| b.contains("\netcd_server_is_leader 1"))
        })
    }
}

impl Etcd {
    /// Compacts member `i`'s keyspace up to its current revision (etcd's JSON gateway,
    /// `/v3/kv/range` then `/v3/kv/compaction`, plaintext clusters only); returns the revision.
    /// A watch that resumes from an earlier one is told it was compacted.
    pub fn compact(&self, i: usize) -> i64 {
        let addr = self.members[i].client;
        // The range reply's header carries the store's revision, as a JSON string.
        let reply = request(addr, "POST", "/v3/kv/range", r#"{"key":"AA=="}"#)
            .expect("etcd range over the JSON gateway");
        let rev: i64 = reply
            .split("\"revision\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no revision in {reply}"));
        let body = format!(r#"{{"revision":"{rev}","physical":true}}"#);
        let done = request(addr, "POST", "/v3/kv/compaction", &body)
            .expect("etcd compaction over the JSON gateway");
        assert!(
            done.starts_with("HTTP/1.1 200") || done.starts_with("HTTP/1.0 200"),
            "{done}"
        );
        rev
    }
}

/// One HTTP/1.0 GET; the whole response, head and body.
fn get(addr: SocketAddr, path: &str) -> Option<String> {
    request(addr, "GET", path, "")
}

/// One HTTP/1.0 request; the whole response, head and body.
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!(
            "{method} {path} HTTP/1.0\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    Some(reply)
}

/// Whether the member's `/health` says it has a leader.
fn health(addr: SocketAddr) -> bool {
    get(addr, "/health").is_some_and(|b| b.contains("\"health\":\"true\""))
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
