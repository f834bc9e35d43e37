//! `ward-bench failover`: two `ward-ca` replicas on a three-member etcd and N real `ward-agent`
//! processes given both addresses (the first replica first). The first replica is killed, or
//! cut off by a kernel rule that drops its packets without a word (as when its node dies); then
//! for every agent: how long until a change made after the fault reaches it through the other
//! replica (its sync resumed there), and how long until its next SVID renewal is signed by the
//! other replica, and how late that renewal is against its own schedule.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use ward_proto::admin;
use ward_proto::workload::X509svidRequest;
use ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ward_spiffe::TrustDomain;

use crate::percentile;
use crate::procs::{self, Ward};

/// How the first replica fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Fault {
    /// SIGKILL: the kernel resets its connections at once.
    Kill,
    /// Its packets are dropped (nftables on loopback): connections go silent.
    Blackhole,
}

/// Workload SVID lifetime: renewals every ~5 s, so each agent renews during the measurement.
const SVID_TTL: &str = "10s";
/// Bound on the whole measurement after the fault.
const WAIT: Duration = Duration::from_secs(120);

/// Drops the first replica's packets on loopback (an nftables table of its own) while it
/// lives; the table goes with it.
struct Blackhole;

const TABLE: &str = "ward_bench_failover";

impl Blackhole {
    fn install(port: u16) -> Result<Self> {
        let rules = format!(
            "table inet {TABLE} {{\n chain input {{\n  type filter hook input priority 0;\n  \
             iifname \"lo\" tcp dport {port} drop\n  iifname \"lo\" tcp sport {port} drop\n }}\n}}\n"
        );
        let f = tempfile::NamedTempFile::new()?;
        std::fs::write(f.path(), rules)?;
        let st = std::process::Command::new("nft")
            .arg("-f")
            .arg(f.path())
            .status()
            .context("run nft")?;
        if !st.success() {
            bail!("nft -f (drop port {port} on lo) failed (root is needed)");
        }
        Ok(Self)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", TABLE])
            .status();
    }
}

/// One update on an agent's FetchX509SVID stream: when it came, and each SVID's ID and leaf.
struct Update {
    agent: usize,
    at: Instant,
    wall: SystemTime,
    svids: Vec<(String, Vec<u8>)>,
}

async fn open_stream(
    socket: &Path,
) -> Result<tonic::Streaming<ward_proto::workload::X509svidResponse>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut c = SpiffeWorkloadApiClient::new(ward_net::process::unix_channel(socket));
        if let Ok(s) = c
            .fetch_x509svid(procs::with_header(X509svidRequest {}))
            .await
        {
            return Ok(s.into_inner());
        }
        if Instant::now() > deadline {
            bail!("no Workload API stream at {} in 60 s", socket.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn leaf(chain: &[u8]) -> Result<Vec<u8>> {
    ward_spiffe::x509::split_der(chain)?
        .into_iter()
        .next()
        .context("empty SVID chain")
}

/// Per agent: the base SVID it holds (leaf, received at, renewal due at) and what happened
/// after the fault.
#[derive(Default, Clone)]
struct Seen {
    base: Option<(Vec<u8>, Instant, Instant)>,
    synced: Option<Instant>,
    renewed: Option<(Instant, Instant)>,
}

fn apply(seen: &mut [Seen], u: &Update, td: &str, after_fault: Option<&[u8]>) -> Result<()> {
    let s = &mut seen[u.agent];
    let base_id = format!("spiffe://{td}/a{}/base", u.agent);
    let after_id = format!("spiffe://{td}/a{}/after", u.agent);
    for (id, chain) in &u.svids {
        if *id == after_id && s.synced.is_none() {
            s.synced = Some(u.at);
        }
        if *id != base_id {
            continue;
        }
        let l = leaf(chain)?;
        if s.base.as_ref().is_some_and(|(b, _, _)| *b == l) {
            continue;
        }
        // A new base leaf: after the fault, the first one signed by the other replica is the
        // renewal measured (against the schedule of the one it replaced).
        if let Some(spki) = after_fault
            && s.renewed.is_none()
            && ward_spiffe::x509::signed_by(&l, spki)
            && let Some((_, _, due)) = &s.base
        {
            s.renewed = Some((u.at, *due));
        }
        let (_, not_after) = ward_spiffe::x509::validity(&l)?;
        let life = not_after.duration_since(u.wall).unwrap_or_default();
        s.base = Some((l, u.at, u.at + life / 2));
    }
    Ok(())
}

pub(crate) async fn failover(n: usize, fault: Fault) -> Result<()> {
    let td_name = "bench.test";
    let td = TrustDomain::new(td_name)?;
    let etcd = ward_testing::etcd::Etcd::cluster(3);
    let extra = format!("[ttl]\nx509_svid = {SVID_TTL:?}\n");
    let mut a = Ward::start_replica(td_name, Some(&etcd), &extra).await?;
    let b = Ward::start_replica(td_name, Some(&etcd), &extra).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let roots = loop {
        let pem = std::fs::read(a.bundle_path()).unwrap_or_default();
        let roots = ward_spiffe::bundle::pem_certificates(&pem).unwrap_or_default();
        if roots.len() == 2 {
            break roots;
        }
        if Instant::now() > deadline {
            bail!("the first replica's bundle did not hold both roots in 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // N agents given both replicas, the first first; one base entry each.
    let dir = tempfile::tempdir()?;
    let servers = format!("{},{}", a.node_addr(), b.node_addr());
    let uid = nix::unistd::getuid().as_raw();
    let mut admin_a = a.admin();
    let mut children = Vec::new();
    let mut sockets = Vec::new();
    for i in 0..n {
        let token = admin_a
            .create_join_token(admin::CreateJoinTokenRequest { ttl_seconds: 0 })
            .await?
            .into_inner();
        let adir = dir.path().join(format!("agent{i}"));
        let socket = adir.join("api.sock");
        children.push(
            procs::spawn_agent(
                &td,
                &servers,
                &adir,
                &socket,
                &a.bundle_path(),
                &token.token,
            )
            .await?,
        );
        admin_a
            .create_entry(admin::EntrySpec {
                spiffe_id: format!("spiffe://{td_name}/a{i}/base"),
                parent_id: token.agent_id.clone(),
                selectors: vec![format!("unix:uid:{uid}")],
                ..Default::default()
            })
            .await?;
        sockets.push((socket, token.agent_id));
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Update>();
    for (i, (socket, _)) in sockets.iter().enumerate() {
        let mut stream = open_stream(socket).await?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                let u = Update {
                    agent: i,
                    at: Instant::now(),
                    wall: SystemTime::now(),
                    svids: m
                        .svids
                        .into_iter()
                        .map(|s| (s.spiffe_id, s.x509_svid))
                        .collect(),
                };
                if tx.send(u).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut seen = vec![Seen::default(); n];
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.iter().any(|s| s.base.is_none()) {
        let u = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .context("not every agent served its base SVID in 60 s")?
            .context("streams ended")?;
        apply(&mut seen, &u, td_name, None)?;
    }
    // Which root signs at the first replica: the one that signed the agents' SVIDs so far.
    let spki: Vec<Vec<u8>> = roots
        .iter()
        .map(|r| ward_spiffe::x509::spki_der(r))
        .collect::<Result<_, _>>()?;
    let first_leaf = &seen[0].base.as_ref().context("no base")?.0;
    let a_root = spki
        .iter()
        .position(|k| ward_spiffe::x509::signed_by(first_leaf, k))
        .context("the first SVID is signed by neither root")?;
    let b_spki = spki[1 - a_root].clone();
    let at_b_before = seen
        .iter()
        .filter(|s| {
            s.base
                .as_ref()
                .is_some_and(|(l, _, _)| ward_spiffe::x509::signed_by(l, &b_spki))
        })
        .count();

    // The fault, then one new entry per agent written at the other replica.
    let a_port: u16 = a.node_addr().rsplit_once(':').context("addr")?.1.parse()?;
    let fault_at = Instant::now();
    let _hole = match fault {
        Fault::Kill => {
            a.kill_ca().await?;
            None
        }
        Fault::Blackhole => Some(Blackhole::install(a_port)?),
    };
    let mut admin_b = b.admin();
    for (i, (_, agent_id)) in sockets.iter().enumerate() {
        admin_b
            .create_entry(admin::EntrySpec {
                spiffe_id: format!("spiffe://{td_name}/a{i}/after"),
                parent_id: agent_id.clone(),
                selectors: vec![format!("unix:uid:{uid}")],
                ..Default::default()
            })
            .await?;
    }
    let written = fault_at.elapsed();
    let deadline = fault_at + WAIT;
    while seen
        .iter()
        .any(|s| s.synced.is_none() || s.renewed.is_none())
    {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(u)) => apply(&mut seen, &u, td_name, Some(&b_spki))?,
            Ok(None) => bail!("the Workload API streams ended"),
            Err(_) => break,
        }
    }
    let agents_after = admin_b
        .list_agents(admin::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents
        .len();
    drop(_hole);
    drop(children);
    b.stop().await;
    a.stop().await;

    let mut synced: Vec<Duration> = seen
        .iter()
        .filter_map(|s| s.synced.map(|t| t - fault_at))
        .collect();
    let mut renewed: Vec<Duration> = seen
        .iter()
        .filter_map(|s| s.renewed.map(|(t, _)| t - fault_at))
        .collect();
    let mut late: Vec<Duration> = seen
        .iter()
        .filter_map(|s| {
            s.renewed
                .map(|(t, due)| t.saturating_duration_since(due.max(fault_at)))
        })
        .collect();
    for v in [&mut synced, &mut renewed, &mut late] {
        v.sort();
    }
    let show = |v: &[Duration]| {
        format!(
            "p50 {:.2?} / max {:.2?} ({} of {n})",
            percentile(v, 0.5),
            v.last().copied().unwrap_or_default(),
            v.len()
        )
    };
    println!(
        "failover ({fault:?}): 2 CA replicas on a 3-member etcd, {n} agents, the first replica failed"
    );
    println!("  agents renewing at the second replica before the fault: {at_b_before}");
    println!("  {n} new entries written at the second replica in {written:.2?} after the fault");
    println!(
        "  fault -> the agent's new entry served (sync resumed): {}",
        show(&synced)
    );
    println!(
        "  fault -> its next renewal signed by the second replica: {}",
        show(&renewed)
    );
    println!(
        "  that renewal's delay past its schedule (SVID TTL {SVID_TTL}, renewed at half-life): {}",
        show(&late)
    );
    println!("  agent records after the fault: {agents_after} (none attested again if {n})");
    if synced.len() < n || renewed.len() < n {
        bail!("not every agent failed over within {WAIT:?}");
    }
    Ok(())
}
