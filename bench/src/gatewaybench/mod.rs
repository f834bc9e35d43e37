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

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::process::Command;

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

mod edges;
mod load;

use edges::*;
use load::*;

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
