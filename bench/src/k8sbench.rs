//! The Kubernetes benchmark: a real `ward-ca` and `ward-agent` (child processes) against the fake
//! API server and kubelet of `ward-testing`, running in this process.
//!
//! 1. Convergence: N pods on M nodes exist before the CA starts; time from spawning the CA until
//!    its controller reports all N entries managed, and the CA's peak RSS (VmHWM).
//! 2. Bytes to one agent: the agent of node 0 (N/M pods) syncs in full; then one pod is added
//!    on its node, one on another node, and one of its pods deleted. The agent's
//!    `ward_agent_sync_bytes_total` gives the bytes for each (O(change) vs O(all)).
//! 3. Pod created → SVID: this process poses as a container of a new pod on node 0 (through a fake
//!    proc tree the agent reads); the time from creating the pod in the API server until the
//!    agent's Workload API hands this process the pod's SVID.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ward_testing::kube::{FakeKube, TokenSpec};

use crate::procs::{bin, free_port, status_kib, with_header};

const TD: &str = "bench.k8s";
const CID: &str = "7a3c9f0e1d2b4a5c6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";

/// Options.
pub(crate) struct Opts {
    pub(crate) pods: usize,
    pub(crate) nodes: usize,
    pub(crate) samples: usize,
}

pub(crate) fn uuid(kind: u32, i: usize) -> String {
    format!("{kind:08x}-0000-4000-8000-{i:012x}")
}

pub(crate) fn node_name(n: usize) -> String {
    format!("node-{n:03}")
}

pub(crate) fn pod_json(ns: &str, name: &str, uid: &str, node: &str, sa: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "uid": uid, "labels": { "app": sa } },
        "spec": { "nodeName": node, "serviceAccountName": sa,
                  "containers": [ { "name": "app", "image": "registry.example/app:1" } ] },
        "status": { "phase": "Running", "containerStatuses": [ { "name": "app", "image": "registry.example/app:1",
            "imageID": "x", "containerID": format!("containerd://{CID}"), "ready": true, "restartCount": 0 } ] }
    })
}

pub(crate) async fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The value of the first sample of `name` (with labels, if any) on the metrics page.
pub(crate) async fn metric(port: u16, name: &str) -> Result<f64> {
    let page = http_get(port, "/metrics").await?;
    page.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let v = rest.rsplit(' ').next()?;
            (rest.starts_with(' ') || rest.starts_with('{'))
                .then(|| v.parse().ok())
                .flatten()
        })
        .with_context(|| format!("metric {name} not found"))
}

pub(crate) async fn wait_metric(
    port: u16,
    name: &str,
    want: f64,
    limit: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        if metric(port, name).await.ok() == Some(want) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not reach {want} in {limit:?} (now {:?})",
                metric(port, name).await.ok()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Points this process at `pod_uid` in the fake proc tree (cgroup v2, systemd driver).
fn set_cgroup(root: &Path, pod_uid: &str) -> Result<()> {
    let me = std::process::id().to_string();
    let dir = root.join(&me);
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(format!("/proc/{me}/stat"), dir.join("stat"))?;
    let u = pod_uid.replace('-', "_");
    std::fs::write(
        dir.join("cgroup"),
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope\n"
        ),
    )?;
    Ok(())
}

struct Procs {
    ca: Child,
    agent: Option<Child>,
}

impl Procs {
    async fn stop(mut self) {
        for c in self.agent.iter_mut().chain(std::iter::once(&mut self.ca)) {
            if let Some(pid) = c.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
    }
}

/// Fills `fake` with `nodes` nodes, ten namespaces, an agent pod (service account
/// `ward:ward-agent`) on each of the first `agents` nodes, and `pods` application pods spread
/// over the nodes.
pub(crate) fn seed(fake: &FakeKube, nodes: usize, agents: usize, pods: usize) {
    for n in 0..nodes {
        fake.put_json(
            "nodes",
            json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": node_name(n), "uid": uuid(1, n) } }),
        );
    }
    for n in 0..agents.min(nodes) {
        fake.put_json(
            "pods",
            pod_json(
                "ward",
                &format!("ward-agent-{n}"),
                &uuid(2, n),
                &node_name(n),
                "ward-agent",
            ),
        );
    }
    for ns in 0..10 {
        fake.put_json(
            "namespaces",
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": format!("team-{ns}") } }),
        );
    }
    for i in 0..pods {
        fake.put_json(
            "pods",
            pod_json(
                &format!("team-{}", i % 10),
                &format!("app-{i}"),
                &uuid(3, i),
                &node_name(i % nodes),
                &format!("sa-{}", i % 50),
            ),
        );
    }
}

/// Runs the benchmark and prints its table.
pub(crate) async fn run(o: Opts) -> Result<()> {
    if o.nodes < 2 || o.pods < o.nodes || o.samples == 0 {
        bail!("need at least two nodes, one pod per node and one sample");
    }
    let dir = tempfile::tempdir()?;
    let fake = FakeKube::start().await;
    seed(&fake, o.nodes, 1, o.pods);

    // 1. Convergence from an empty CA.
    let ca_dir = dir.path().join("ca");
    let node_port = free_port()?;
    let ca_health = free_port()?;
    let kubeconfig = fake.write_kubeconfig(dir.path(), "c1");
    let ca_toml = format!(
        "trust_domain = {TD:?}\ndata_dir = {:?}\nbind_address = \"127.0.0.1:{node_port}\"\n\
         health_address = \"127.0.0.1:{ca_health}\"\nlog_level = \"warn\"\n\n\
         [[kubernetes.clusters]]\nname = \"c1\"\nkubeconfig = {:?}\n\
         service_account_allow_list = [\"ward:ward-agent\"]\n",
        ca_dir.display().to_string(),
        kubeconfig.display().to_string(),
    );
    std::fs::write(dir.path().join("ca.toml"), ca_toml)?;
    let started = Instant::now();
    let ca = crate::procs::spawn_ca(&dir.path().join("ca.toml"))?;
    let mut procs = Procs { ca, agent: None };
    let ca_pid = procs.ca.id().context("CA exited")?;
    let done = wait_metric(
        ca_health,
        "ward_ca_k8s_managed_entries",
        o.pods as f64,
        Duration::from_secs(600),
    )
    .await?;
    let converge = done - started;
    let hwm = status_kib(ca_pid, "VmHWM")?;
    let rss = status_kib(ca_pid, "VmRSS")?;

    // 2. One agent, on node 0.
    let token = dir.path().join("psat");
    std::fs::write(
        &token,
        fake.token(&TokenSpec::new(
            "ward",
            "ward-agent",
            ("ward-agent-0", &uuid(2, 0)),
            "ward-ca",
        )),
    )?;
    let kubelet = fake.kubelet(&node_name(0), "kubelet-token").await;
    let kubelet_ca = dir.path().join("kubelet-ca.pem");
    std::fs::write(&kubelet_ca, &kubelet.ca_pem)?;
    let kubelet_token = dir.path().join("kubelet-token");
    std::fs::write(&kubelet_token, "kubelet-token\n")?;
    let proc_root = dir.path().join("proc");
    std::fs::create_dir_all(&proc_root)?;
    let agent_health = free_port()?;
    let socket = dir.path().join("agent.sock");
    let agent_toml = format!(
        "trust_domain = {TD:?}\nserver_address = \"127.0.0.1:{node_port}\"\ndata_dir = {:?}\n\
         socket_path = {:?}\ntrust_bundle_path = {:?}\nhealth_address = \"127.0.0.1:{agent_health}\"\n\
         log_level = \"warn\"\n\n[k8s_psat]\ncluster = \"c1\"\ntoken_path = {:?}\n\n\
         [k8s]\nnode_name = {:?}\nkubelet_url = \"https://127.0.0.1:{}\"\nkubelet_ca = {:?}\n\
         token_path = {:?}\nretries = 20\nretry_interval = \"50ms\"\n\n[unix]\nproc_root = {:?}\n",
        dir.path().join("agent-data").display().to_string(),
        socket.display().to_string(),
        ca_dir.join("bundle.pem").display().to_string(),
        token.display().to_string(),
        node_name(0),
        kubelet.addr.port(),
        kubelet_ca.display().to_string(),
        kubelet_token.display().to_string(),
        proc_root.display().to_string(),
    );
    std::fs::write(dir.path().join("agent.toml"), agent_toml)?;
    procs.agent = Some(
        Command::new(bin("ward-agent")?)
            .args(["run", "--config"])
            .arg(dir.path().join("agent.toml"))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start ward-agent")?,
    );
    let per_node = o.pods.div_ceil(o.nodes);
    wait_metric(
        agent_health,
        "ward_agent_entries",
        per_node as f64,
        Duration::from_secs(60),
    )
    .await?;
    let full_bytes = metric(agent_health, "ward_agent_sync_bytes_total").await?;

    // One pod added on the agent's node.
    let b0 = metric(agent_health, "ward_agent_sync_bytes_total").await?;
    fake.put_json(
        "pods",
        pod_json("team-0", "extra-0", &uuid(4, 0), &node_name(0), "sa-extra"),
    );
    wait_metric(
        agent_health,
        "ward_agent_entries",
        (per_node + 1) as f64,
        Duration::from_secs(30),
    )
    .await?;
    let add_bytes = metric(agent_health, "ward_agent_sync_bytes_total").await? - b0;

    // One pod added on another node: nothing for this agent.
    let b1 = metric(agent_health, "ward_agent_sync_bytes_total").await?;
    let other = node_name(o.nodes - 1);
    fake.put_json(
        "pods",
        pod_json("team-0", "extra-1", &uuid(4, 1), &other, "sa-extra"),
    );
    wait_metric(
        ca_health,
        "ward_ca_k8s_managed_entries",
        (o.pods + 2) as f64,
        Duration::from_secs(30),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other_bytes = metric(agent_health, "ward_agent_sync_bytes_total").await? - b1;

    // One of its pods deleted.
    let b2 = metric(agent_health, "ward_agent_sync_bytes_total").await?;
    fake.delete("pods", Some("team-0"), "extra-0");
    wait_metric(
        agent_health,
        "ward_agent_entries",
        per_node as f64,
        Duration::from_secs(30),
    )
    .await?;
    let del_bytes = metric(agent_health, "ward_agent_sync_bytes_total").await? - b2;

    // 3. Pod created → SVID on the Workload API.
    let mut client = SpiffeWorkloadApiClient::new(ward_net::process::unix_channel(&socket));
    let mut lat = Vec::with_capacity(o.samples);
    for s in 0..o.samples {
        let uid = uuid(5, s);
        let name = format!("fresh-{s}");
        let sa = format!("fresh-sa-{s}");
        set_cgroup(&proc_root, &uid)?;
        // Pods are spaced out as in life; back to back, the agent's 100 ms floor between two
        // kubelet list refreshes would dominate.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let want = format!("spiffe://{TD}/ns/team-1/sa/{sa}");
        let t0 = Instant::now();
        fake.put_json("pods", pod_json("team-1", &name, &uid, &node_name(0), &sa));
        let deadline = t0 + Duration::from_secs(30);
        loop {
            let got = async {
                let mut st = client
                    .fetch_x509svid(with_header(ward_proto::workload::X509svidRequest {}))
                    .await?
                    .into_inner();
                let m = st.message().await?;
                Ok::<_, tonic::Status>(
                    m.is_some_and(|m| m.svids.iter().any(|v| v.spiffe_id == want)),
                )
            }
            .await
            .unwrap_or(false);
            if got {
                lat.push(t0.elapsed());
                break;
            }
            if Instant::now() > deadline {
                bail!("no SVID for {want} within 30s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        fake.delete("pods", Some("team-1"), &name);
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    procs.stop().await;

    println!(
        "## Kubernetes: {} pods on {} nodes (fake API server in the benchmark process)",
        o.pods, o.nodes
    );
    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| converge from an empty CA (spawn → all entries managed) | {:.2} s ({:.0} pods/s) |",
        converge.as_secs_f64(),
        o.pods as f64 / converge.as_secs_f64()
    );
    println!(
        "| CA peak RSS (VmHWM) / RSS after convergence | {:.1} MiB / {:.1} MiB |",
        hwm as f64 / 1024.0,
        rss as f64 / 1024.0
    );
    println!("| agent full sync ({per_node} entries + bundle) | {full_bytes:.0} B |");
    println!(
        "| agent bytes, one pod added on its node | {add_bytes:.0} B ({:.4} of full) |",
        add_bytes / full_bytes
    );
    println!(
        "| agent bytes, one pod deleted on its node | {del_bytes:.0} B ({:.4} of full) |",
        del_bytes / full_bytes
    );
    println!("| agent bytes, one pod added on another node | {other_bytes:.0} B |");
    println!(
        "| pod created → SVID on the Workload API ({} samples) | p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms |",
        lat.len(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.9).as_secs_f64() * 1e3,
        lat[lat.len() - 1].as_secs_f64() * 1e3
    );
    Ok(())
}
