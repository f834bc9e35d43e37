//! `ward-bench egress`: what the sidecar's egress check costs a new TLS connection — SNI read
//! from the ClientHello, match against the external services, the allowed name resolved (from
//! the resolver's cache after the first) — against the same connections through the same
//! capture with no egress policy (`unknown: passthrough`), in one run.
//!
//! Topology of the capture tests: pod a (the workload: `ward-proxy init`'s rules, the proxy as
//! uid 1337 with one worker thread, oha as the application) and pod b as the internet (nginx
//! serving HTTPS with an ECDSA P-256 certificate on 10.250.2.2:443, dnsmasq answering
//! `api.bench.test`). oha opens a new TLS connection for every request (`--disable-keepalive`)
//! at a fixed rate. The two proxy configurations alternate in rounds (the proxy restarted
//! between them) and medians are reported.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ward_testing::netns::{Netns, TwoPods, must};

use crate::capturebench::{Kill, PROXY_UID, Point, median, oha_in, spawn, wait_ready};

/// Options from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) ward_proxy: PathBuf,
    pub(crate) nginx: PathBuf,
    pub(crate) oha: PathBuf,
    pub(crate) duration: Duration,
    pub(crate) rate: u32,
    pub(crate) rounds: usize,
}

fn nginx_conf(d: &Path) -> String {
    let d = d.display();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/nb; proxy_temp_path {d}/np; fastcgi_temp_path {d}/nf; uwsgi_temp_path {d}/nu; scgi_temp_path {d}/ns;\n\
         server {{ listen 10.250.2.2:443 ssl; ssl_certificate {d}/origin.crt; ssl_certificate_key {d}/origin.key;\n\
         \x20 location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
    )
}

fn proxy_config(d: &Path, egress: bool) -> String {
    let dd = d.display();
    let (unknown, section) = if egress {
        (
            "egress",
            "egress:\n  dns: 10.250.2.2:53\n  policy:\n    default: deny\n    services:\n\
             \x20     - { name: api, protocol: tls, hosts: [api.bench.test], ports: [443], from: [ { principals: [\"spiffe://bench.test/a\"] } ] }\n",
        )
    } else {
        ("passthrough", "")
    };
    format!(
        "identity:\n  files: {{ chain: \"{dd}/a.pem\", key: \"{dd}/a.key\", bundle: \"{dd}/bundle.pem\", trust_domain: bench.test }}\n\
         admin_address: 127.0.0.1:15020\n\
         log_level: warn\n\
         listeners:\n\
         \x20 - {{ role: outbound-capture, name: capture-out, listen: 127.0.0.1:15001, unknown: {unknown} }}\n\
         {section}"
    )
}

/// Runs the benchmark and prints the table.
pub(crate) async fn run(o: Opts) -> Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(&o)).await?
}

fn start_proxy(o: &Opts, ns: &Netns, d: &Path, egress: bool) -> Result<(Kill, u32)> {
    let path = d.join(if egress { "egress.yaml" } else { "plain.yaml" });
    std::fs::write(&path, proxy_config(d, egress))?;
    let mut c = ns.as_user(PROXY_UID, o.ward_proxy.to_str().unwrap_or("ward-proxy"));
    c.env("WARD_PROXY_WORKER_THREADS", "1")
        .args(["run", "--config"])
        .arg(&path);
    let child = spawn("proxy", c)?;
    let pid = child.id();
    let k = Kill(vec![child]);
    wait_ready(ns, "http://127.0.0.1:15020/readyz")?;
    Ok((k, pid))
}

fn run_blocking(o: &Opts) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("ward-bench egress needs root (network namespaces and nftables)");
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let pki = ward_testing::Pki::new("bench.test");
    let (chain, key) = pki.svid("/a").write(d, "a");
    for f in [chain, key] {
        std::os::unix::fs::chown(f, Some(PROXY_UID), Some(PROXY_UID))?;
    }
    pki.write_bundle(d);
    let cert = rcgen::generate_simple_self_signed(vec!["api.bench.test".into()])?;
    std::fs::write(d.join("origin.crt"), cert.cert.pem())?;
    std::fs::write(d.join("origin.key"), cert.signing_key.serialize_pem())?;
    std::fs::write(d.join("hosts"), "10.250.2.2 api.bench.test\n")?;

    let net = TwoPods::new();
    let mut procs = Kill(Vec::new());
    std::fs::write(d.join("nginx.conf"), nginx_conf(d))?;
    let mut ng = net.b.ns.cmd(o.nginx.to_str().context("nginx path")?);
    ng.arg("-p").arg(d).arg("-c").arg(d.join("nginx.conf"));
    procs.0.push(spawn("nginx", ng)?);
    let mut dns = net.b.ns.cmd("dnsmasq");
    dns.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=10.250.2.2",
        "--port=53",
        "--local-ttl=300",
        "--user=root",
    ])
    .arg(format!("--addn-hosts={}", d.join("hosts").display()))
    .arg(format!("--pid-file={}", d.join("dnsmasq.pid").display()));
    procs.0.push(spawn("dnsmasq", dns)?);
    must(
        net.a
            .ns
            .cmd(o.ward_proxy.to_str().unwrap_or("ward-proxy"))
            .args(["init", "--proxy-uid", &PROXY_UID.to_string()]),
    );

    let url = "https://api.bench.test/";
    let extra = [
        "--insecure",
        "--disable-keepalive",
        "--connect-to",
        "api.bench.test:443:10.250.2.2:443",
    ];
    let modes = [
        ("capture, no egress policy", false),
        ("capture + egress check", true),
    ];
    let mut all: Vec<Vec<Point>> = vec![Vec::new(); modes.len()];
    for round in 0..o.rounds.max(1) {
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let (proxy, pid) = start_proxy(o, &net.a.ns, d, modes[i].1)?;
            // Warm-up: the resolver's cache, the allocator.
            oha_in(
                &o.oha,
                Duration::from_secs(2),
                &net.a.ns,
                url,
                200,
                &[pid],
                &extra,
            )?;
            all[i].push(oha_in(
                &o.oha,
                o.duration,
                &net.a.ns,
                url,
                o.rate,
                &[pid],
                &extra,
            )?);
            drop(proxy);
        }
    }
    println!(
        "| path ({} new TLS connections/s) | conn/s | ok | p50 ms | p99 ms | proxy CPU µs/conn |",
        o.rate
    );
    println!("|---|---|---|---|---|---|");
    let got: Vec<Point> = all.iter().map(|p| median(p)).collect();
    for ((name, _), p) in modes.iter().zip(&got) {
        println!(
            "| {name} | {:.0} | {:.4} | {:.3} | {:.3} | {:.0} |",
            p.rps, p.ok, p.p50, p.p99, p.cpu_us
        );
    }
    let (base, eg) = (got[0], got[1]);
    println!(
        "\nadded by the egress check: p50 {:+.0} µs, p99 {:+.0} µs (aim ≤ 50 µs added p50); CPU {:.3}×",
        (eg.p50 - base.p50) * 1000.0,
        (eg.p99 - base.p99) * 1000.0,
        eg.cpu_us / base.cpu_us
    );
    drop(procs);
    Ok(())
}
