//! `ward-bench capture`: the captured path against today's explicit listeners, in one run, in
//! the namespace topology of the capture tests (two pods and a routing node, real nftables
//! rules from `ward-proxy init`, each proxy as uid 1337 with one worker thread).
//!
//! Pod b runs nginx on :8080 (captured), :9090 (excluded from capture: the direct baseline) and
//! behind an explicit inbound listener on :28080 (excluded from capture). Pod a runs the load
//! generator (oha, at fixed rates) against three URLs:
//! - direct: `10.250.2.2:9090`, no proxy either side;
//! - explicit: `127.0.0.1:15101`, pod a's explicit outbound listener → pod b's :28080;
//! - captured: `10.250.2.2:8080`, as the application dials it: pod a's outbound capture →
//!   mTLS → pod b's inbound capture.
//!
//! Reported: p50/p99 and the latency added over direct, and CPU per request of both proxies
//! together (utime + stime deltas over the run).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ward_testing::netns::{Netns, TwoPods, must};

pub(crate) const PROXY_UID: u32 = 1337;

/// Options from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) ward_proxy: PathBuf,
    pub(crate) nginx: PathBuf,
    pub(crate) oha: PathBuf,
    pub(crate) duration: Duration,
    pub(crate) rates: Vec<u32>,
    pub(crate) rounds: usize,
}

fn nginx_conf(d: &Path) -> String {
    let d = d.display();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/nb; proxy_temp_path {d}/np; fastcgi_temp_path {d}/nf; uwsgi_temp_path {d}/nu; scgi_temp_path {d}/ns;\n\
         keepalive_requests 1000000;\n\
         server {{ listen 8080; listen 9090; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
    )
}

fn proxy_config(d: &Path, name: &str, extra: &str) -> String {
    let d = d.display();
    format!(
        "identity:\n  files: {{ chain: \"{d}/{name}.pem\", key: \"{d}/{name}.key\", bundle: \"{d}/bundle.pem\", trust_domain: bench.test }}\n\
         admin_address: 127.0.0.1:15020\n\
         authorization:\n  default: all-authenticated\n\
         log_level: warn\n\
         listeners:\n\
         \x20 - {{ role: inbound-capture, name: capture-in, listen: \"[::]:15006\" }}\n\
         \x20 - role: outbound-capture\n\
         \x20   name: capture-out\n\
         \x20   listen: 127.0.0.1:15001\n\
         \x20   routes: [ {{ dst: 10.250.2.2, ports: [8080], expected_ids: [\"spiffe://bench.test/b\"] }} ]\n\
         {extra}"
    )
}

pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// The pid of the process `ip netns exec … setpriv … ward-proxy` ends up as: setpriv and ip
/// exec in place, so it is the child's pid.
pub(crate) fn spawn(name: &str, mut cmd: std::process::Command) -> Result<std::process::Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {name}"))
}

pub(crate) struct Kill(pub(crate) Vec<std::process::Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn wait_ready(ns: &Netns, url: &str) -> Result<()> {
    for _ in 0..400 {
        let out = ns
            .cmd("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url])
            .output()?;
        if out.stdout == b"200" {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{url} not ready")
}

/// One measurement: rate reached, latency percentiles (ms), success rate, proxy CPU per
/// request (µs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Point {
    pub(crate) rps: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) ok: f64,
    pub(crate) cpu_us: f64,
}

fn oha(o: &Opts, ns: &Netns, url: &str, rate: u32, pids: &[u32]) -> Result<Point> {
    oha_in(&o.oha, o.duration, ns, url, rate, pids, &[])
}

/// oha in `ns` against `url` at `rate` for `duration` (16 connections, `extra` flags), with the
/// CPU the processes `pids` spent meanwhile.
pub(crate) fn oha_in(
    oha: &Path,
    duration: Duration,
    ns: &Netns,
    url: &str,
    rate: u32,
    pids: &[u32],
    extra: &[&str],
) -> Result<Point> {
    let before: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let out = ns
        .cmd(oha.to_str().context("oha path")?)
        .args(extra)
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "-c",
            "16",
            "-q",
            &rate.to_string(),
            "--latency-correction",
            "-z",
            &format!("{}s", duration.as_secs()),
            url,
        ])
        .output()
        .context("run oha")?;
    if !out.status.success() {
        bail!("oha failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let after: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha JSON")?;
    let p = &j["latencyPercentiles"];
    let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN) * 1000.0;
    let rps = j["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0);
    let requests = rps * duration.as_secs_f64();
    // Clock ticks are 10 ms.
    let cpu_us = if requests > 0.0 {
        (after - before) as f64 * 10_000.0 / requests
    } else {
        f64::NAN
    };
    Ok(Point {
        rps,
        p50: ms(&p["p50"]),
        p99: ms(&p["p99"]),
        ok: j["summary"]["successRate"].as_f64().unwrap_or(0.0),
        cpu_us,
    })
}

pub(crate) fn median(pts: &[Point]) -> Point {
    let m = |f: fn(&Point) -> f64| {
        let mut v: Vec<f64> = pts.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Point {
        rps: m(|p| p.rps),
        p50: m(|p| p.p50),
        p99: m(|p| p.p99),
        ok: m(|p| p.ok),
        cpu_us: m(|p| p.cpu_us),
    }
}

/// Runs the benchmark and prints the table.
pub(crate) async fn run(o: Opts) -> Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(&o)).await?
}

fn run_blocking(o: &Opts) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("ward-bench capture needs root (network namespaces and nftables)");
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let pki = ward_testing::Pki::new("bench.test");
    for name in ["a", "b"] {
        let (chain, key) = pki.svid(&format!("/{name}")).write(d, name);
        for f in [chain, key] {
            std::os::unix::fs::chown(f, Some(PROXY_UID), Some(PROXY_UID))?;
        }
    }
    pki.write_bundle(d);
    let net = TwoPods::new();
    let mut procs = Kill(Vec::new());

    std::fs::write(d.join("nginx.conf"), nginx_conf(d))?;
    let mut ng = net.b.ns.cmd(o.nginx.to_str().context("nginx path")?);
    ng.arg("-p").arg(d).arg("-c").arg(d.join("nginx.conf"));
    procs.0.push(spawn("nginx", ng)?);

    let init = |ns: &Netns, extra: &[&str]| {
        must(
            ns.cmd(o.ward_proxy.to_str().unwrap_or("ward-proxy"))
                .args(["init", "--proxy-uid", &PROXY_UID.to_string()])
                .args(extra),
        )
    };
    init(&net.a.ns, &["--exclude-outbound-ports", "9090"]);
    init(&net.b.ns, &["--exclude-inbound-ports", "9090,28080"]);

    std::fs::write(
        d.join("a.yaml"),
        proxy_config(
            d,
            "a",
            "  - { role: outbound, name: explicit, listen: 127.0.0.1:15101, upstream: \"10.250.2.2:28080\", expected_ids: [\"spiffe://bench.test/b\"] }\n",
        ),
    )?;
    std::fs::write(
        d.join("b.yaml"),
        proxy_config(
            d,
            "b",
            "  - { role: inbound, name: explicit, listen: 0.0.0.0:28080, forward_to: \"127.0.0.1:8080\" }\n",
        ),
    )?;
    let mut pids = Vec::new();
    for (ns, name) in [(&net.a.ns, "a"), (&net.b.ns, "b")] {
        let mut c = ns.as_user(PROXY_UID, o.ward_proxy.to_str().unwrap_or("ward-proxy"));
        c.env("WARD_PROXY_WORKER_THREADS", "1")
            .args(["run", "--config"])
            .arg(d.join(format!("{name}.yaml")));
        let child = spawn(name, c)?;
        pids.push(child.id());
        procs.0.push(child);
    }
    for ns in [&net.a.ns, &net.b.ns] {
        wait_ready(ns, "http://127.0.0.1:15020/readyz")?;
    }
    let paths = [
        ("direct", "http://10.250.2.2:9090/"),
        ("explicit", "http://127.0.0.1:15101/"),
        ("captured", "http://10.250.2.2:8080/"),
    ];
    for (_, url) in paths {
        wait_ready(&net.a.ns, url)?;
    }
    // Warm-up: connections, pools, caches.
    for (_, url) in paths {
        oha(o, &net.a.ns, url, 500, &pids)?;
    }
    println!(
        "| rate | path | req/s | ok | p50 ms | p99 ms | added p50 ms | added p99 ms | proxy CPU µs/req |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &rate in &o.rates {
        // Rounds in rotating order; the median of each figure per path, so neither drift nor
        // the order of the paths favours one of them.
        let mut all: Vec<Vec<Point>> = vec![Vec::new(); paths.len()];
        for round in 0..o.rounds.max(1) {
            for k in 0..paths.len() {
                let i = (k + round) % paths.len();
                all[i].push(oha(o, &net.a.ns, paths[i].1, rate, &pids)?);
            }
        }
        let got: Vec<(&str, Point)> = paths
            .iter()
            .zip(&all)
            .map(|((name, _), pts)| (*name, median(pts)))
            .collect();
        let direct = got[0].1;
        for (name, p) in &got {
            let (a50, a99) = if *name == "direct" {
                ("—".to_owned(), "—".to_owned())
            } else {
                (
                    format!("{:.3}", p.p50 - direct.p50),
                    format!("{:.3}", p.p99 - direct.p99),
                )
            };
            let cpu = if *name == "direct" {
                "—".to_owned()
            } else {
                format!("{:.0}", p.cpu_us)
            };
            println!(
                "| {rate} | {name} | {:.0} | {:.4} | {:.3} | {:.3} | {a50} | {a99} | {cpu} |",
                p.rps, p.ok, p.p50, p.p99
            );
        }
        let (e, c) = (got[1].1, got[2].1);
        println!(
            "| {rate} | captured / explicit | | | | | {:.3}× | {:.3}× | {:.3}× |",
            (c.p50 - direct.p50) / (e.p50 - direct.p50),
            (c.p99 - direct.p99) / (e.p99 - direct.p99),
            c.cpu_us / e.cpu_us
        );
    }
    drop(procs);
    Ok(())
}
