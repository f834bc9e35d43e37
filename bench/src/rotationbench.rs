//! `ward-bench rotation`: how fast authority changes reach every subscriber.
//!
//! Two set-ups against a real `ward-ca` process, each going through `rounds` full rotations
//! (prepare → activate → taint → revoke of the X.509 authority, through the admin API):
//!
//! - one real `ward-agent` process with one workload holding an open `FetchX509SVID` stream:
//!   time from each admin call to the stream message that carries its effect;
//! - `agents` simulated agents in this process, each attested with a join token, holding one
//!   workload SVID and following its own sync stream like the real agent does (a new bundle is
//!   applied; an SVID signed by a tainted key is re-signed at once): time until *every* one of
//!   them holds the effect.
//!
//! Prepare is the step that changes trust (the new root is published); activate changes nothing
//! that subscribers hold; taint makes every SVID of the old authority be replaced; revoke takes
//! the old root out of the bundle.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use ward_proto::admin::{self, admin_client::AdminClient};
use ward_proto::node::{self, SyncRequest};
use ward_proto::workload::X509svidRequest;

use crate::procs::{self, Ward};
use crate::{csr, percentile};

type Admin = AdminClient<tonic::transport::Channel>;

/// Options.
pub(crate) struct Opts {
    /// Simulated agents.
    pub(crate) agents: usize,
    /// Full rotations per set-up.
    pub(crate) rounds: usize,
}

pub(crate) async fn change(
    adm: &mut Admin,
    action: &str,
    id: &str,
    force: bool,
) -> Result<admin::Authority> {
    Ok(adm
        .change_authority(admin::ChangeAuthorityRequest {
            kind: "x509".into(),
            action: action.into(),
            id: id.into(),
            force,
        })
        .await
        .with_context(|| format!("authority {action} {id}"))?
        .into_inner())
}

pub(crate) async fn active(adm: &mut Admin) -> Result<String> {
    let list = adm
        .list_authorities(admin::ListAuthoritiesRequest {
            kind: "x509".into(),
        })
        .await?
        .into_inner()
        .authorities;
    Ok(list
        .into_iter()
        .find(|a| a.state == "active")
        .context("no active authority")?
        .id)
}

/// The key (SPKI) of the root in `roots` that signed `leaf`.
fn signer(leaf: &[u8], roots: &[Vec<u8>]) -> Option<Vec<u8>> {
    roots
        .iter()
        .filter_map(|r| ward_spiffe::x509::spki_der(r).ok())
        .find(|k| ward_spiffe::x509::signed_by(leaf, k))
}

/// Samples of each step.
#[derive(Default)]
struct Steps {
    prepare: Vec<Duration>,
    taint: Vec<Duration>,
    drained: Vec<Duration>,
    revoke: Vec<Duration>,
}

/// Polls the CA until no live SVID chains to authority `id`; returns the time since `t0`.
async fn drained(adm: &mut Admin, id: &str, t0: Instant) -> Result<Duration> {
    loop {
        let list = adm
            .list_authorities(admin::ListAuthoritiesRequest {
                kind: "x509".into(),
            })
            .await?
            .into_inner()
            .authorities;
        let live = list.iter().find(|a| a.id == id).map_or(0, |a| a.live_svids);
        if live == 0 {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("{live} SVIDs still chain to {id} after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn report(name: &str, s: &mut Steps) {
    for (step, v) in [
        ("prepare → new root held", &mut s.prepare),
        ("taint   → SVID re-issued", &mut s.taint),
        ("taint   → none live (CA)", &mut s.drained),
        ("revoke  → old root gone", &mut s.revoke),
    ] {
        v.sort();
        println!(
            "  {name:<30} {step:<26} p50 {:>8.1?}  max {:>8.1?}",
            percentile(v, 0.5),
            v.last().copied().unwrap_or_default(),
        );
    }
}

type X509Stream = tonic::Streaming<ward_proto::workload::X509svidResponse>;

/// The leaf and bundle roots of a Workload API message.
fn parts(m: &ward_proto::workload::X509svidResponse) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
    let s = m.svids.first().context("no SVID")?;
    let leaf = ward_spiffe::x509::split_der(&s.x509_svid)?
        .into_iter()
        .next()
        .context("empty chain")?;
    Ok((leaf, ward_spiffe::x509::split_der(&s.bundle)?))
}

/// Reads the stream until a message satisfies `f`; returns the time since `t0` and its parts.
async fn next_matching(
    stream: &mut X509Stream,
    t0: Instant,
    f: impl Fn(&[u8], &[Vec<u8>]) -> bool,
) -> Result<(Duration, Vec<u8>, Vec<Vec<u8>>)> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .context("no Workload API update within 30 s")??
            .context("stream ended")?;
        let (leaf, roots) = parts(&m)?;
        if f(&leaf, &roots) {
            return Ok((t0.elapsed(), leaf, roots));
        }
    }
}

/// One real agent, one workload stream.
async fn real_agent(rounds: usize) -> Result<Steps> {
    let ward = Ward::start_ca("rot.bench").await?;
    let agent_id = ward.start_agent().await?;
    let mut adm = ward.admin();
    let uid = nix::unistd::getuid().as_raw();
    adm.create_entry(admin::EntrySpec {
        spiffe_id: "spiffe://rot.bench/w".into(),
        parent_id: agent_id,
        selectors: vec![format!("unix:uid:{uid}")],
        ..Default::default()
    })
    .await?;
    let mut wl = ward.workload_client();
    let (mut stream, mut leaf, mut roots) = loop {
        if let Ok(s) = wl
            .fetch_x509svid(procs::with_header(X509svidRequest {}))
            .await
        {
            let mut s = s.into_inner();
            if let Ok(Ok(Some(m))) =
                tokio::time::timeout(Duration::from_secs(10), s.message()).await
                && let Ok((l, r)) = parts(&m)
            {
                break (s, l, r);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut steps = Steps::default();
    for _ in 0..rounds {
        let old = active(&mut adm).await?;
        let old_key = signer(&leaf, &roots).context("the held SVID verifies to no root")?;
        let n = roots.len();
        let t0 = Instant::now();
        change(&mut adm, "prepare", "", false).await?;
        let (d, _, _) = next_matching(&mut stream, t0, |_, r| r.len() > n).await?;
        steps.prepare.push(d);
        change(&mut adm, "activate", "", false).await?;
        let t0 = Instant::now();
        change(&mut adm, "taint", &old, false).await?;
        let (d, _, r) = next_matching(&mut stream, t0, |leaf, _| {
            !ward_spiffe::x509::signed_by(leaf, &old_key)
        })
        .await?;
        steps.taint.push(d);
        // The agent's own SVID is re-issued too; then nothing live chains to the old authority.
        steps.drained.push(drained(&mut adm, &old, t0).await?);
        let t0 = Instant::now();
        change(&mut adm, "revoke", &old, false).await?;
        let n = r.len();
        let (d, l, r) = next_matching(&mut stream, t0, |_, r| r.len() < n).await?;
        steps.revoke.push(d);
        (leaf, roots) = (l, r);
    }
    ward.stop().await;
    Ok(steps)
}

/// What a simulated agent reports.
enum Event {
    /// Holds the bundle with this sequence.
    Bundle(usize, u64),
    /// Holds a (re-)issued workload SVID.
    Reissued(usize),
}

/// Simulated agents following their sync streams.
async fn simulated(agents: usize, rounds: usize) -> Result<Steps> {
    let ward = Arc::new(Ward::start_ca("rot.bench").await?);
    let mut adm = ward.admin();
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut tasks = Vec::new();
    for i in 0..agents {
        let token = adm
            .create_join_token(admin::CreateJoinTokenRequest { ttl_seconds: 0 })
            .await?
            .into_inner();
        let (client, svid) = ward.attested_node_client(&token.token).await?;
        let id = format!("spiffe://rot.bench/sim{i}");
        let entry = adm
            .create_entry(admin::EntrySpec {
                spiffe_id: id.clone(),
                parent_id: token.agent_id.clone(),
                selectors: vec![format!("unix:uid:{i}")],
                ..Default::default()
            })
            .await?
            .into_inner()
            .id;
        let (tx, ward) = (tx.clone(), ward.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = sim_agent(i, ward, client, svid, entry, id, tx).await {
                eprintln!("simulated agent {i}: {e:#}");
            }
        }));
    }
    drop(tx);
    // Every simulated agent holds its first SVID.
    let t0 = Instant::now();
    collect(&mut rx, agents, t0, |e| matches!(e, Event::Reissued(_))).await?;
    let mut steps = Steps::default();
    let sequence = |adm: &mut Admin| {
        let mut adm = adm.clone();
        async move {
            Ok::<_, anyhow::Error>(
                adm.get_bundle(admin::GetBundleRequest {})
                    .await?
                    .into_inner()
                    .sequence,
            )
        }
    };
    for _ in 0..rounds {
        let old = active(&mut adm).await?;
        while rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        change(&mut adm, "prepare", "", false).await?;
        let seq = sequence(&mut adm).await?;
        steps.prepare.push(
            collect(
                &mut rx,
                agents,
                t0,
                |e| matches!(e, Event::Bundle(_, s) if *s >= seq),
            )
            .await?,
        );
        change(&mut adm, "activate", "", false).await?;
        while rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        change(&mut adm, "taint", &old, false).await?;
        steps
            .taint
            .push(collect(&mut rx, agents, t0, |e| matches!(e, Event::Reissued(_))).await?);
        steps.drained.push(drained(&mut adm, &old, t0).await?);
        let t0 = Instant::now();
        change(&mut adm, "revoke", &old, false).await?;
        let seq = sequence(&mut adm).await?;
        steps.revoke.push(
            collect(
                &mut rx,
                agents,
                t0,
                |e| matches!(e, Event::Bundle(_, s) if *s >= seq),
            )
            .await?,
        );
    }
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    match Arc::try_unwrap(ward) {
        Ok(w) => w.stop().await,
        Err(_) => bail!("processes still shared"),
    }
    Ok(steps)
}

/// Waits until `n` distinct agents reported an event matching `f`; returns the time since
/// `t0`.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    n: usize,
    t0: Instant,
    f: impl Fn(&Event) -> bool,
) -> Result<Duration> {
    let mut seen: HashMap<usize, ()> = HashMap::new();
    while seen.len() < n {
        let e = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .context("simulated agents stalled")?
            .context("simulated agents ended")?;
        if f(&e) {
            let i = match e {
                Event::Bundle(i, _) | Event::Reissued(i) => i,
            };
            seen.insert(i, ());
        }
    }
    Ok(t0.elapsed())
}

type Node = node::node_client::NodeClient<tonic::transport::Channel>;

/// Signs a workload SVID for `entry`.
async fn sign(client: &mut Node, entry: &str, id: &str) -> Result<Vec<Vec<u8>>> {
    let key = rcgen::KeyPair::generate()?;
    let r = client
        .batch_new_x509_svid(node::BatchNewX509SvidRequest {
            params: vec![node::NewX509SvidParams {
                entry_id: entry.into(),
                csr: csr(&key, id)?,
            }],
        })
        .await?
        .into_inner();
    let r = r.results.into_iter().next().context("no result")?;
    Ok(r.svid
        .with_context(|| format!("refused: {}", r.error_message))?
        .cert_chain)
}

/// One simulated agent. Like the real one, it re-issues its agent SVID and its workload SVID
/// at once when a taint covers their signer, and follows the sync stream on a connection that
/// presents its current agent SVID.
async fn sim_agent(
    i: usize,
    ward: Arc<Ward>,
    mut client: Node,
    mut agent: ward_net::Svid,
    entry: String,
    id: String,
    tx: mpsc::UnboundedSender<Event>,
) -> Result<()> {
    let mut chain = sign(&mut client, &entry, &id).await?;
    let _ = tx.send(Event::Reissued(i));
    loop {
        let mut stream = client
            .sync(SyncRequest { since_revision: 0 })
            .await?
            .into_inner();
        let mut reconnect = false;
        while let Some(u) = stream.message().await? {
            let Some(b) = &u.bundle else { continue };
            let _ = tx.send(Event::Bundle(i, b.sequence));
            let tainted = |der: &[u8]| {
                u.tainted_x509_keys
                    .iter()
                    .any(|k| ward_spiffe::x509::signed_by(der, k))
            };
            if tainted(&agent.chain[0]) {
                let key = rcgen::KeyPair::generate()?;
                let resp = client
                    .renew_agent(node::RenewAgentRequest {
                        csr: crate::csr(&key, agent.id.as_str())?,
                    })
                    .await?
                    .into_inner();
                let chain = resp.svid.context("no agent SVID")?.cert_chain;
                agent = ward_net::Svid::from_parts(chain, key.serialize_der())?;
                client = ward.node_client_for(&agent)?;
                reconnect = true;
            }
            if tainted(&chain[0]) {
                chain = sign(&mut client, &entry, &id).await?;
                let _ = tx.send(Event::Reissued(i));
            }
            if reconnect {
                break;
            }
        }
        if !reconnect {
            return Ok(());
        }
    }
}

/// Runs both set-ups and prints the figures.
pub(crate) async fn run(o: Opts) -> Result<()> {
    let mut real = real_agent(o.rounds).await?;
    let mut sim = simulated(o.agents, o.rounds).await?;
    println!(
        "rotation: admin call → effect held by every subscriber ({} rounds)",
        o.rounds
    );
    report("1 agent, Workload API stream", &mut real);
    report(&format!("{} simulated agents", o.agents), &mut sim);
    Ok(())
}
