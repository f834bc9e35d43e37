//! The scale benchmark: one `ward-ca` (child process, sled or etcd) whose Kubernetes identity
//! controller keeps N entries (pods on M nodes, from the fake API server in this process), and
//! M simulated agents — one per node, each attested with its own projected service-account
//! token (TokenReview against the fake) and holding its own node API connection with its own
//! agent SVID — that all sync at once.
//!
//! Reported: the CA's RSS and peak RSS with the entries and with every agent's sync stream
//! open (and per entry), the time for all agents to complete a full sync, and the bytes one
//! change costs: one pod added on node 0 reaches agent 0 (its update's size against its full
//! sync), and no other agent receives anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use prost::Message;
use ward_proto::node::node_client::NodeClient;
use ward_proto::node::{self, attest_request::Method};
use ward_spiffe::TrustDomain;
use ward_testing::kube::{FakeKube, TokenSpec};

use crate::k8sbench::{metric, node_name, pod_json, uuid, wait_metric};
use crate::procs::{StoreKind, free_port, node_channel, node_sink, spawn_ca, status_kib};

const TD: &str = "bench.scale";

/// Options.
pub(crate) struct Opts {
    pub(crate) agents: usize,
    pub(crate) entries: usize,
    pub(crate) store: StoreKind,
    /// Handshakes and attestations in flight at once.
    pub(crate) concurrency: usize,
}

/// What every agent's stream task counts.
#[derive(Default)]
struct Counters {
    /// Agents that received their full sync with all their entries.
    synced: AtomicUsize,
    /// Updates received after the full sync, by any agent but agent 0.
    others: AtomicU64,
    /// Bytes and count of agent 0's updates after its full sync.
    zero_bytes: AtomicU64,
    zero_updates: AtomicU64,
    /// Encoded size of agent 0's full sync.
    zero_full: AtomicU64,
}

/// Runs the benchmark and prints its table.
pub(crate) async fn run(o: Opts) -> Result<()> {
    if o.agents < 2 || o.entries < o.agents {
        bail!("need at least two agents and one entry per agent");
    }
    let dir = tempfile::tempdir()?;
    let fake = FakeKube::start().await;
    crate::k8sbench::seed(&fake, o.agents, o.agents, o.entries);
    let etcd = match o.store {
        StoreKind::Sled => None,
        StoreKind::Etcd => Some(ward_testing::etcd::Etcd::start()),
        StoreKind::Etcd3 => Some(ward_testing::etcd::Etcd::cluster(3)),
    };
    let store_toml = match &etcd {
        None => String::new(),
        Some(e) => format!(
            "[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = {:?}\n",
            e.endpoints()
        ),
    };

    // The same CA with nothing to keep: the baseline its RSS per entry is measured from.
    let base_rss = {
        let health = free_port()?;
        let base_dir = dir.path().join("base");
        let toml = format!(
            "trust_domain = {TD:?}\ndata_dir = {:?}\nbind_address = \"127.0.0.1:{}\"\n\
             health_address = \"127.0.0.1:{health}\"\nlog_level = \"warn\"\n\n{}",
            base_dir.display().to_string(),
            free_port()?,
            match &etcd {
                None => String::new(),
                Some(e) => format!(
                    "[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = {:?}\nprefix = \"/base/\"\n",
                    e.endpoints()
                ),
            }
        );
        std::fs::write(dir.path().join("base.toml"), toml)?;
        let mut base = spawn_ca(&dir.path().join("base.toml"))?;
        let pid = base.id().context("baseline CA exited")?;
        wait_metric(health, "ward_ca_leader", 1.0, Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = status_kib(pid, "VmRSS")?;
        let _ = base.kill().await;
        rss
    };

    // The CA converges on the entries.
    let ca_dir = dir.path().join("ca");
    let node_addr = format!("127.0.0.1:{}", free_port()?);
    let ca_health = free_port()?;
    let kubeconfig = fake.write_kubeconfig(dir.path(), "c1");
    let ca_toml = format!(
        "trust_domain = {TD:?}\ndata_dir = {:?}\nbind_address = {node_addr:?}\n\
         health_address = \"127.0.0.1:{ca_health}\"\nlog_level = \"warn\"\n\n\
         [limits]\nsigning_per_second = 100000\nsigning_burst = 100000\n\n\
         [[kubernetes.clusters]]\nname = \"c1\"\nkubeconfig = {:?}\n\
         service_account_allow_list = [\"ward:ward-agent\"]\n\n{store_toml}",
        ca_dir.display().to_string(),
        kubeconfig.display().to_string(),
    );
    std::fs::write(dir.path().join("ca.toml"), ca_toml)?;
    let started = Instant::now();
    let mut ca = spawn_ca(&dir.path().join("ca.toml"))?;
    let ca_pid = ca.id().context("CA exited")?;
    wait_metric(
        ca_health,
        "ward_ca_k8s_managed_entries",
        o.entries as f64,
        Duration::from_secs(1800),
    )
    .await?;
    let converge = started.elapsed();
    let rss_entries = status_kib(ca_pid, "VmRSS")?;
    let hwm_entries = status_kib(ca_pid, "VmHWM")?;
    eprintln!(
        "converged on {} entries in {converge:?}; RSS {rss_entries} KiB",
        o.entries
    );

    // Attest every agent (its own token, its own key).
    let td = TrustDomain::new(TD)?;
    let sink = node_sink(&td, &ca_dir.join("bundle.pem"))?;
    let attest_started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(o.concurrency));
    let mut attests = Vec::with_capacity(o.agents);
    for n in 0..o.agents {
        let token = fake.token(&TokenSpec::new(
            "ward",
            "ward-agent",
            (&format!("ward-agent-{n}"), &uuid(2, n)),
            "ward-ca",
        ));
        let (sem, sink, addr) = (sem.clone(), sink.clone(), node_addr.clone());
        attests.push(tokio::spawn(async move {
            let _p = sem.acquire().await?;
            let key = rcgen::KeyPair::generate()?;
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            let csr = p.serialize_request(&key)?.der().to_vec();
            let resp = NodeClient::new(node_channel(&addr, &sink, None)?)
                .attest(node::AttestRequest {
                    method: Some(Method::K8sPsat(node::K8sPsatAttestation {
                        cluster: "c1".into(),
                        token,
                    })),
                    csr,
                })
                .await
                .with_context(|| format!("attest agent {n}"))?
                .into_inner();
            let chain = resp.svid.context("no SVID")?.cert_chain;
            anyhow::Ok(ward_net::Svid::from_parts(chain, key.serialize_der())?)
        }));
    }
    let mut svids = Vec::with_capacity(o.agents);
    for a in attests {
        svids.push(a.await??);
    }
    let attest_time = attest_started.elapsed();
    eprintln!("attested {} agents in {attest_time:?}", o.agents);

    // Every agent syncs at once; each holds its stream open.
    let counters = Arc::new(Counters::default());
    let per_node: Vec<usize> = (0..o.agents)
        .map(|n| (o.entries - n).div_ceil(o.agents))
        .collect();
    let sync_started = Instant::now();
    let mut streams = Vec::with_capacity(o.agents);
    for (n, svid) in svids.into_iter().enumerate() {
        let (sem, sink, addr, c) = (
            sem.clone(),
            sink.clone(),
            node_addr.clone(),
            counters.clone(),
        );
        let want = per_node[n];
        streams.push(tokio::spawn(async move {
            let mut s = {
                let _p = sem.acquire().await?;
                NodeClient::new(node_channel(&addr, &sink, Some(&svid))?)
                    .max_decoding_message_size(64 << 20)
                    .sync(node::SyncRequest { since_revision: 0 })
                    .await
                    .with_context(|| format!("sync agent {n}"))?
                    .into_inner()
            };
            let mut have = 0usize;
            let mut full_done = false;
            while let Some(u) = s.message().await? {
                if !full_done {
                    have = if u.full {
                        u.upserted.len()
                    } else {
                        have + u.upserted.len()
                    };
                    if have >= want {
                        full_done = true;
                        if n == 0 {
                            c.zero_full.store(u.encoded_len() as u64, Ordering::Relaxed);
                        }
                        c.synced.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                if n == 0 {
                    c.zero_bytes
                        .fetch_add(u.encoded_len() as u64, Ordering::Relaxed);
                    c.zero_updates.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.others.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(1800);
    while counters.synced.load(Ordering::Relaxed) < o.agents {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} agents synced in time",
                counters.synced.load(Ordering::Relaxed),
                o.agents
            );
        }
        if let Some(i) = streams
            .iter()
            .position(tokio::task::JoinHandle::is_finished)
        {
            let r = streams.remove(i).await?;
            bail!("a sync stream ended before all agents synced: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sync_time = sync_started.elapsed();
    // Let the last streams' buffers settle before sampling memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_agents = status_kib(ca_pid, "VmRSS")?;
    let hwm = status_kib(ca_pid, "VmHWM")?;
    eprintln!(
        "{} agents synced in {sync_time:?}; CA RSS {rss_agents} KiB",
        o.agents
    );

    // One change: a pod on node 0.
    let entries_before = metric(ca_health, "ward_ca_k8s_managed_entries").await?;
    let change_started = Instant::now();
    fake.put_json(
        "pods",
        pod_json("team-0", "extra-0", &uuid(4, 0), &node_name(0), "sa-extra"),
    );
    wait_metric(
        ca_health,
        "ward_ca_k8s_managed_entries",
        entries_before + 1.0,
        Duration::from_secs(60),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while counters.zero_updates.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            bail!("agent 0 got no update for its new pod");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let change_time = change_started.elapsed();
    // Time for any stray update to reach the other agents.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let one = counters.zero_bytes.load(Ordering::Relaxed);
    let full = counters.zero_full.load(Ordering::Relaxed);
    let others = counters.others.load(Ordering::Relaxed);

    for s in &streams {
        s.abort();
    }
    if let Some(pid) = ca.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), ca.wait()).await;
    drop(etcd);

    let store = match o.store {
        StoreKind::Sled => "sled",
        StoreKind::Etcd => "etcd (1 member)",
        StoreKind::Etcd3 => "etcd (3 members)",
    };
    let mib = |k: u64| k as f64 / 1024.0;
    let per_entry = |k: u64| (k.saturating_sub(base_rss) * 1024) as f64 / o.entries as f64;
    println!(
        "## Scale: {} agents × {} entries, store {store}",
        o.agents, o.entries
    );
    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| CA RSS with nothing to keep (baseline) | {:.1} MiB |",
        mib(base_rss)
    );
    println!(
        "| controller converges from an empty CA | {:.1} s ({:.0} entries/s) |",
        converge.as_secs_f64(),
        o.entries as f64 / converge.as_secs_f64()
    );
    println!(
        "| CA RSS with the entries (peak so far) | {:.1} MiB ({:.0} B/entry over the baseline; peak {:.1} MiB) |",
        mib(rss_entries),
        per_entry(rss_entries),
        mib(hwm_entries)
    );
    println!(
        "| {} agents attest (PSAT, TokenReview each, {} at a time) | {:.1} s ({:.0}/s) |",
        o.agents,
        o.concurrency,
        attest_time.as_secs_f64(),
        o.agents as f64 / attest_time.as_secs_f64()
    );
    println!(
        "| all agents complete a full sync at once | {:.1} s |",
        sync_time.as_secs_f64()
    );
    println!(
        "| CA RSS with every sync stream open / peak | {:.1} MiB ({:.0} B/entry) / {:.1} MiB |",
        mib(rss_agents),
        per_entry(rss_agents),
        mib(hwm)
    );
    println!(
        "| one pod added on node 0 → agent 0's update | {:.0} ms, {one} B ({:.3} of its full sync, {full} B) |",
        change_time.as_secs_f64() * 1e3,
        one as f64 / full.max(1) as f64
    );
    println!(
        "| updates the other {} agents received for it | {others} |",
        o.agents - 1
    );
    Ok(())
}
