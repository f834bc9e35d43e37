//! `ward-bench soak`: a long run at a fixed rate through two proxies fed by a real agent and
//! CA, while identities and policies change under it: every SVID lives `svid_ttl` (the agent
//! renews at half-life, so both proxies rotate every `svid_ttl / 2`), the backend's policy file
//! changes every minute (the allowed caller stays allowed), and in the middle the X.509 root
//! rotates in full (prepare, activate a minute later, taint the old one a minute after, revoke
//! it two minutes after that). Every minute: RSS and open file descriptors of the CA, the
//! agent and both proxies. At the end: every request's status (from oha), and the backend's
//! and frontend's access logs — every rotated file and the current one, as one chain —
//! verified with `log verify --strict` against both roots.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::discoverybench::{metric, requests};
use crate::lbbench::{app_named, proxy_yaml, spawn};
use crate::procs::{Ward, bin, free_port};
use crate::rotationbench::{active, change};

const TD: &str = "soak.test";

/// Options from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) minutes: u64,
    pub(crate) rate: u32,
    pub(crate) svid_ttl: Duration,
}

const POLICY_A: &str = "policies:\n  - name: api-allow-client\n    target: { spiffe_ids: [\"spiffe://soak.test/api\"] }\n    action: ALLOW\n    rules: [ { from: [ { principals: [\"spiffe://soak.test/client\"] } ] } ]\n";
/// Added to POLICY_A every other minute: a DENY for a path the load never asks for.
const DENY_ADMIN: &str = "  - name: api-deny-admin\n    target: { spiffe_ids: [\"spiffe://soak.test/api\"] }\n    action: DENY\n    rules: [ { to: [ { paths: [\"/admin/*\"] } ] } ]\n";

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_mib(pid: u32) -> f64 {
    crate::procs::status_kib(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0
}

/// Starts a proxy process from `yaml` (written to `<name>.yaml` in `d`).
fn proxy(d: &Path, name: &str, yaml: &str) -> Result<Child> {
    let f = d.join(format!("{name}.yaml"));
    std::fs::write(&f, yaml)?;
    spawn(
        Command::new(bin("ward-proxy")?)
            .env("WARD_PROXY_WORKER_THREADS", "1")
            .args(["run", "--config"])
            .arg(&f),
    )
}

pub(crate) async fn run(o: Opts) -> Result<()> {
    let ward = Ward::start_ca(TD).await?;
    let agent_id = ward.start_agent().await?;
    let uid = nix::unistd::getuid().as_raw();
    for name in ["api", "client"] {
        ward.admin()
            .create_entry(ward_proto::admin::EntrySpec {
                spiffe_id: format!("spiffe://{TD}/{name}"),
                parent_id: agent_id.clone(),
                selectors: vec![format!("unix:uid:{uid}")],
                x509_svid_ttl: u32::try_from(o.svid_ttl.as_secs()).unwrap_or(u32::MAX),
                ..Default::default()
            })
            .await?;
    }
    let first_bundle = std::fs::read_to_string(ward.bundle_path())?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let policies = d.join("policies.yaml");
    std::fs::write(&policies, POLICY_A)?;
    let app = app_named(Duration::ZERO, "ok\n").await?;
    let (bport, fport, badmin, fadmin) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let log = |side: &str| {
        format!(
            "access_log:\n  path: \"{}\"\n  on_full: refuse\n",
            d.join(format!("{side}.jsonl")).display()
        )
    };
    // proxy_yaml puts the listeners last; the backend's policy files and both logs go before.
    let backend_body = format!(
        "  - {{ role: inbound, name: in, listen: 127.0.0.1:{bport}, forward_to: \"{app}\" }}\n{}\
         authorization:\n  default: deny\n  policy_files: [\"{}\"]\n  reload_interval: 1s\n",
        log("backend"),
        policies.display()
    );
    let backend_yaml = proxy_yaml(TD, &ward.agent_socket(), "api", badmin, &backend_body, "")
        .replace("authorization:\n  default: all-authenticated\n", "");
    let mut backend = proxy(d, "backend", &backend_yaml)?;
    let frontend_body = format!(
        "  - {{ role: outbound, name: api, listen: 127.0.0.1:{fport}, upstream: \"127.0.0.1:{bport}\", expected_ids: [\"spiffe://{TD}/api\"] }}\n{}",
        log("frontend")
    );
    let mut frontend = proxy(
        d,
        "frontend",
        &proxy_yaml(
            TD,
            &ward.agent_socket(),
            "client",
            fadmin,
            &frontend_body,
            "",
        ),
    )?;
    // Ready: a request goes through.
    let url = format!("http://127.0.0.1:{fport}/");
    let t0 = Instant::now();
    loop {
        if requests(fport, 1).await? == 1 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the two proxies did not serve a request within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let total = Duration::from_secs(o.minutes * 60);
    let oha = Command::new("oha")
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "-c",
            "50",
            "-q",
            &o.rate.to_string(),
            "--latency-correction",
            "-z",
            &format!("{}s", total.as_secs()),
            &url,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("run oha (cargo install oha)")?;
    let (ca_pid, agent_pid) = ward.pids();
    let pids = [
        ("CA", ca_pid),
        ("agent", agent_pid),
        ("backend proxy", backend.id().unwrap_or(0)),
        ("frontend proxy", frontend.id().unwrap_or(0)),
    ];
    println!(
        "## Soak: {} min at {}/s through two proxies fed by a real agent (SVID TTL {:?}; policy change every minute; root rotation from minute {})\n",
        o.minutes,
        o.rate,
        o.svid_ttl,
        o.minutes / 2
    );
    let mut head = "| minute |".to_owned();
    for (n, _) in &pids {
        head.push_str(&format!(" {n} RSS MiB / fds |"));
    }
    println!("{head} backend SVID expiry (unix) | event |");
    println!("|---|---|---|---|---|---|---|");
    let start = Instant::now();
    let mid = o.minutes / 2;
    let mut old_root = String::new();
    let mut adm = ward.admin();
    let mut samples: Vec<Vec<(f64, usize)>> = Vec::new();
    let mut expiries = std::collections::BTreeSet::new();
    for minute in 0..=o.minutes {
        let at = start + Duration::from_secs(minute * 60);
        tokio::time::sleep_until(at.into()).await;
        let mut event = String::new();
        if minute > 0 && minute < o.minutes {
            let p = if minute % 2 == 1 {
                format!("{POLICY_A}{DENY_ADMIN}")
            } else {
                POLICY_A.to_owned()
            };
            ward_testing::write_atomic(&policies, p.as_bytes());
            event.push_str("policy changed");
        }
        if minute == mid && mid > 0 {
            old_root = active(&mut adm).await?;
            let new = change(&mut adm, "prepare", "", false).await?.id;
            event.push_str(&format!("; root prepared ({new})"));
        } else if minute == mid + 1 && mid > 0 {
            change(&mut adm, "activate", "", false).await?;
            event.push_str("; new root activated");
        } else if minute == mid + 2 && mid > 0 {
            change(&mut adm, "taint", &old_root, false).await?;
            event.push_str(&format!("; old root {old_root} tainted"));
        } else if minute == mid + 4 && mid > 0 && minute < o.minutes {
            match change(&mut adm, "revoke", &old_root, false).await {
                Ok(_) => event.push_str(&format!("; old root {old_root} revoked")),
                Err(e) => event.push_str(&format!("; revoke refused: {e:#}")),
            }
        }
        let row: Vec<(f64, usize)> = pids.iter().map(|(_, p)| (rss_mib(*p), fds(*p))).collect();
        let exp = metric(badmin, "ward_proxy_svid_expiry_timestamp_seconds")
            .await
            .unwrap_or(0.0);
        expiries.insert(exp as u64);
        let mut line = format!("| {minute} |");
        for (rss, n) in &row {
            line.push_str(&format!(" {rss:.1} / {n} |"));
        }
        println!("{line} {exp:.0} | {} |", event.trim_start_matches("; "));
        samples.push(row);
    }
    let out = oha.wait_with_output().await?;
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "oha JSON: {}",
            String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(500)
                .collect::<String>()
        )
    })?;
    let codes = j["statusCodeDistribution"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let ok = codes
        .get("200")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let all_codes: u64 = codes.values().filter_map(serde_json::Value::as_u64).sum();
    let errors: u64 = j["errorDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(serde_json::Value::as_u64).sum())
        .unwrap_or(0);
    // The proxies stop cleanly (drain, then a signed close anchor), then their logs are
    // verified against every root of the run: the first bundle and the last.
    for c in [&mut frontend, &mut backend] {
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
    }
    let roots = d.join("roots.pem");
    std::fs::write(
        &roots,
        format!(
            "{first_bundle}{}",
            std::fs::read_to_string(ward.bundle_path())?
        ),
    )?;
    println!(
        "\nRequests: {} answered 200, {} other statuses, {} transport errors ({:?}); distinct backend SVID expiries seen: {}",
        ok,
        all_codes - ok,
        errors,
        j["errorDistribution"],
        expiries.len()
    );
    for (n, _) in pids.iter().enumerate() {
        let first = samples.get(1).unwrap_or(&samples[0])[n];
        let last = samples[samples.len() - 1][n];
        println!(
            "{}: RSS {:.1} → {:.1} MiB ({:+.1}% from minute 1), fds {} → {}",
            pids[n].0,
            first.0,
            last.0,
            (last.0 - first.0) / first.0.max(0.1) * 100.0,
            first.1,
            last.1
        );
    }
    for side in ["backend", "frontend"] {
        // Rotated files (`<side>.<nanos>.jsonl`, oldest first), then the current one.
        let current = d.join(format!("{side}.jsonl"));
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(d)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{side}.")) && n.ends_with(".jsonl"))
                    && *p != current
            })
            .collect();
        files.sort();
        files.push(current);
        let out = Command::new(bin("ward-proxy")?)
            .args(["log", "verify", "--strict", "--bundle"])
            .arg(&roots)
            .args(&files)
            .output()
            .await?;
        println!(
            "{side} access log (exit {}):\n{}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    ward.stop().await;
    Ok(())
}
