//! Load against an edge: readiness, oha runs, full handshakes, CPU over a window.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use super::*;

/// The request every handshake carries.
pub(super) fn request() -> String {
    format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n")
}

/// One new TLS connection to `port` (SNI [`HOST`]) and one request on it: the status.
pub(super) async fn get_once(port: u16, cfg: &Arc<rustls::ClientConfig>) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(HOST).map_err(std::io::Error::other)?;
    let mut tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await?;
    tls.write_all(request().as_bytes()).await?;
    // "HTTP/1.1 200"
    let mut head = [0u8; 12];
    tls.read_exact(&mut head).await?;
    std::str::from_utf8(&head[9..])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP/1.1 response"))
}

/// Waits (at most 30 s) until `port` answers 200 over TLS.
pub(super) async fn ready(port: u16, cfg: &Arc<rustls::ClientConfig>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), get_once(port, cfg)).await {
            Ok(Ok(200)) => return Ok(()),
            Ok(Ok(status)) => last = format!("status {status}"),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timeout".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no 200 on port {port} within 30 s (last: {last})")
}

/// Full handshakes, one request each, `clients` at a time for `dur`: (200s, failures).
pub(super) async fn handshakes(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    dur: Duration,
    clients: usize,
) -> Result<(u64, u64)> {
    let end = Instant::now() + dur;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < end {
                    match tokio::time::timeout(Duration::from_secs(5), get_once(port, &cfg)).await {
                        Ok(Ok(200)) => ok += 1,
                        _ => {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let mut sum = (0, 0);
    for t in tasks {
        let (ok, failed) = t.await?;
        sum = (sum.0 + ok, sum.1 + failed);
    }
    Ok(sum)
}

/// Where oha sends its load: a URL and the flags that reach it.
pub(super) struct Target {
    pub(super) url: String,
    pub(super) args: Vec<String>,
}

impl Target {
    pub(super) fn direct(app: SocketAddr) -> Self {
        Self {
            url: format!("http://{app}/"),
            args: Vec::new(),
        }
    }

    /// `https://HOST:port/`, resolved to loopback, verified against the bench root.
    pub(super) fn edge(port: u16, root: &Path) -> Self {
        Self {
            url: format!("https://{HOST}:{port}/"),
            args: vec![
                "--cacert".into(),
                root.display().to_string(),
                "--connect-to".into(),
                format!("{HOST}:{port}:127.0.0.1:{port}"),
            ],
        }
    }
}

/// How oha loads a target.
#[derive(Debug, Clone, Copy)]
pub(super) enum Load {
    /// As fast as it can over keep-alive HTTP/1.1 connections.
    MaxHttp1,
    /// As fast as it can over HTTP/2 connections, many streams each.
    MaxHttp2,
    /// A fixed rate over HTTP/1.1, latency corrected for coordinated omission.
    Rate(u32),
}

/// One oha run. `ok` is the share of answers that were 200 (requests cut off by the deadline
/// are not counted); every request gives up after 10 s and oha itself after the run plus 60 s.
pub(super) async fn oha(o: &Opts, t: &Target, load: Load) -> Result<Latency> {
    let mut cmd = Command::new(&o.oha);
    cmd.args(["--no-tui", "--output-format", "json", "-t", "10s", "-z"])
        .arg(format!("{}s", o.duration.as_secs()))
        .args(&t.args)
        .kill_on_drop(true);
    match load {
        Load::MaxHttp1 => cmd.args(["-c", "64"]),
        Load::MaxHttp2 => cmd.args(["--http2", "-c", "16", "-p", "16"]),
        Load::Rate(r) => cmd.args(["-c", "50", "--latency-correction", "-q", &r.to_string()]),
    };
    let out = tokio::time::timeout(
        o.duration + Duration::from_secs(60),
        cmd.arg(&t.url).output(),
    )
    .await
    .context("oha did not finish")?
    .context("run oha")?;
    if !out.status.success() {
        bail!("oha {}: {}", t.url, String::from_utf8_lossy(&out.stderr));
    }
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha JSON")?;
    let count = |v: &serde_json::Value, keep: &dyn Fn(&str) -> bool| -> f64 {
        v.as_object().map_or(0.0, |m| {
            m.iter()
                .filter(|(k, _)| keep(k))
                .filter_map(|(_, n)| n.as_f64())
                .sum()
        })
    };
    let answers = count(&j["statusCodeDistribution"], &|_| true)
        + count(&j["errorDistribution"], &|k| !k.contains("deadline"));
    let ok = count(&j["statusCodeDistribution"], &|k| k == "200");
    Ok(crate::proxybench::latency_of(
        &j,
        if answers > 0.0 { ok / answers } else { 0.0 },
    ))
}

/// Runs `f` and returns with it the CPU cores each group of processes used meanwhile.
pub(super) async fn with_cpu<T>(
    groups: [&[u32]; 2],
    f: impl Future<Output = Result<T>>,
) -> Result<(T, [f64; 2])> {
    let ticks = |g: &[u32]| g.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
    let before = groups.map(ticks);
    let start = Instant::now();
    let v = f.await?;
    let secs = start.elapsed().as_secs_f64();
    let mut cores = [0.0; 2];
    for (i, g) in groups.into_iter().enumerate() {
        // USER_HZ ticks.
        cores[i] = ticks(g).saturating_sub(before[i]) as f64 / 100.0 / secs;
    }
    Ok((v, cores))
}
