//! `ward-bench access-log`: what the evidence log costs. The two-hop topology of
//! `ward-bench proxy` (client → outbound proxy → mTLS → inbound proxy → nginx, each proxy on
//! one worker thread), run once per access-log mode, one mode after the other in the same run:
//! off; on in the default mode (`on_full: drop`, `fsync: interval`, signed anchors); on as
//! evidence (`on_full: refuse`, `fsync: every_record`, signed anchors); and, when given, a
//! baseline binary with the log on (an earlier build, to show what a change did). Reported:
//! both proxies' CPU per request at fixed rates, latency, maximum throughput, and the log's
//! share of the proxy's CPU per request. Each log is verified at the end (`log verify
//! --strict --bundle`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::process::Command;

use crate::proxybench::{Stage, cpu_ticks, oha, port, spawn, stage, stop, wait_port, ward_configs};

/// Options from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) ward_proxy: PathBuf,
    pub(crate) baseline: Option<PathBuf>,
    pub(crate) nginx: PathBuf,
    pub(crate) duration: Duration,
    pub(crate) rates: Vec<u32>,
}

struct Mode {
    name: &'static str,
    bin: PathBuf,
    /// The access_log settings after `path` (None: no access log).
    log: Option<&'static str>,
    /// Verify the log with `--strict` at the end (not for a baseline that predates it).
    strict: bool,
}

#[derive(Debug, Default)]
struct Row {
    /// Per rate: (CPU µs per request of both proxies, p50 ms, p99 ms).
    at: Vec<(f64, f64, f64)>,
    max_rps: f64,
    max_cpu_us: f64,
    verified: String,
}

pub(crate) async fn run(o: Opts) -> Result<()> {
    let Stage {
        dir,
        bundle,
        ng1,
        ng2,
        mut nginx,
        ..
    } = stage(&o.nginx).await?;
    let d = dir.path();

    let mut modes = vec![
        Mode {
            name: "off",
            bin: o.ward_proxy.clone(),
            log: None,
            strict: false,
        },
        Mode {
            name: "on: drop, fsync interval, signed anchors (default)",
            bin: o.ward_proxy.clone(),
            log: Some(""),
            strict: true,
        },
        Mode {
            name: "on: refuse, fsync every_record, signed anchors (evidence)",
            bin: o.ward_proxy.clone(),
            log: Some("  on_full: refuse\n  fsync: every_record\n"),
            strict: true,
        },
    ];
    if let Some(b) = &o.baseline {
        modes.push(Mode {
            name: "on: baseline binary",
            bin: b.clone(),
            log: Some(""),
            strict: false,
        });
    }
    let tick_us = 10_000.0; // USER_HZ = 100
    let mut rows = Vec::new();
    for (i, m) in modes.iter().enumerate() {
        let wi = (port()?, port()?, port()?, port()?);
        let wo = (port()?, port()?, port()?, port()?);
        let (mut bcfg, mut fcfg) = ward_configs(d, (ng1, ng2, ng2), wi, wo);
        let logs = [
            d.join(format!("{i}-backend.jsonl")),
            d.join(format!("{i}-frontend.jsonl")),
        ];
        if let Some(extra) = m.log {
            bcfg.push_str(&format!(
                "access_log:\n  path: \"{}\"\n{extra}",
                logs[0].display()
            ));
            fcfg.push_str(&format!(
                "access_log:\n  path: \"{}\"\n{extra}",
                logs[1].display()
            ));
        }
        std::fs::write(d.join(format!("{i}-backend.yaml")), bcfg)?;
        std::fs::write(d.join(format!("{i}-frontend.yaml")), fcfg)?;
        let start = |side: &str| {
            spawn(
                &format!("ward-{side}"),
                Command::new(&m.bin)
                    .env("WARD_PROXY_WORKER_THREADS", "1")
                    .args(["run", "--config"])
                    .arg(d.join(format!("{i}-{side}.yaml"))),
            )
        };
        let mut wb = start("backend")?;
        let mut wf = start("frontend")?;
        wait_port(SocketAddr::from(([127, 0, 0, 1], wi.0))).await?;
        wait_port(SocketAddr::from(([127, 0, 0, 1], wo.0))).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let url = format!("http://127.0.0.1:{}/", wo.0);
        let pids = [wf.pid(), wb.pid()];
        let ticks = || pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
        let warm = oha(&url, None, 4, Duration::from_secs(1)).await?;
        if warm.ok < 0.999 {
            bail!("{}: requests fail ({:.1}% ok)", m.name, warm.ok * 100.0);
        }
        let mut row = Row::default();
        for rate in &o.rates {
            let (before, t0) = (ticks(), Instant::now());
            let l = oha(&url, Some(*rate), 50, o.duration).await?;
            let reqs = l.rps * t0.elapsed().as_secs_f64();
            let cpu = (ticks() - before) as f64 * tick_us / reqs.max(1.0);
            row.at.push((cpu, l.p50, l.p99));
        }
        let (before, t0) = (ticks(), Instant::now());
        let l = oha(&url, None, 64, o.duration).await?;
        row.max_rps = l.rps;
        row.max_cpu_us =
            (ticks() - before) as f64 * tick_us / (l.rps * t0.elapsed().as_secs_f64()).max(1.0);
        stop(&mut wf).await;
        stop(&mut wb).await;
        if m.log.is_some() {
            let mut args = vec!["log", "verify"];
            if m.strict {
                args.extend(["--strict", "--bundle", bundle.to_str().unwrap_or_default()]);
            }
            let out = Command::new(&m.bin)
                .args(&args)
                .arg(&logs[0])
                .output()
                .await?;
            let text = String::from_utf8_lossy(&out.stdout);
            let records = text
                .lines()
                .next()
                .and_then(|l| l.rsplit(": ").next())
                .unwrap_or_default()
                .to_owned();
            row.verified = format!(
                "{} ({records})",
                if out.status.success() { "OK" } else { "FAILED" }
            );
            if !out.status.success() {
                eprintln!("{}: log verify failed:\n{text}", m.name);
            }
        }
        rows.push(row);
    }
    stop(&mut nginx).await;

    println!(
        "## Access log cost (loopback, {} cores; two proxies, 1 worker thread each; {}s per point)\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        o.duration.as_secs()
    );
    let mut head = "| access log |".to_owned();
    let mut sep = "|---|".to_owned();
    for r in &o.rates {
        head.push_str(&format!(" CPU µs/req @{r}/s | p50 / p99 ms @{r}/s |"));
        sep.push_str("---|---|");
    }
    println!("{head} max req/s | CPU µs/req at max | backend log verify |");
    println!("{sep}---|---|---|");
    for (m, r) in modes.iter().zip(&rows) {
        let mut line = format!("| {} |", m.name);
        for (cpu, p50, p99) in &r.at {
            line.push_str(&format!(" {cpu:.1} | {p50:.3} / {p99:.3} |"));
        }
        println!(
            "{line} {:.0} | {:.1} | {} |",
            r.max_rps, r.max_cpu_us, r.verified
        );
    }
    let off = &rows[0];
    println!();
    for (m, r) in modes.iter().zip(&rows).skip(1) {
        let mut parts = Vec::new();
        for (k, rate) in o.rates.iter().enumerate() {
            let (on, base) = (r.at[k].0, off.at[k].0);
            parts.push(format!(
                "{:.0}% of CPU per request at {rate}/s",
                (on - base) / on * 100.0
            ));
        }
        println!(
            "log share, {}: {}; max req/s {:.2}x of off",
            m.name,
            parts.join(", "),
            r.max_rps / off.max_rps
        );
    }
    Ok(())
}
