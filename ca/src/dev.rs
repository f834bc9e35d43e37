//! `ward-ca dev`: a whole local trust domain in one command.
//!
//! Starts a CA in this process and a `ward-agent` child attested with a fresh join token,
//! registers an entry for the invoking user's uid, waits until that user's SVID is served on
//! the Workload API, prints `SPIFFE_ENDPOINT_SOCKET=...` and `SPIFFE_ID=...` on stdout, and runs
//! until SIGINT/SIGTERM. Restarted on the same data directory it keeps the trust bundle, the
//! agent (while its SVID is valid) and the entry.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};
use ward_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ward_spiffe::TrustDomain;

use crate::cli::{CliError, EXIT_CANNOT_LISTEN};
use crate::config::CaConfig;
use crate::entries::EntrySpec;
use crate::server::{CaServer, StartError};

/// Flags of `ward-ca dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the CA and the agent keep their state.
    #[arg(long, default_value = ".ward")]
    pub data_dir: PathBuf,
    /// Trust domain of the local CA.
    #[arg(long, default_value = "example.org")]
    pub trust_domain: String,
    /// The ward-agent binary [default: next to this binary].
    #[arg(long, env = "WARD_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,
    /// Node API address of the CA.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub bind_address: std::net::SocketAddr,
    /// Health/metrics address of the CA.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub health_address: std::net::SocketAddr,
    /// Health/metrics address of the agent.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub agent_health_address: std::net::SocketAddr,
    /// Default X.509-SVID TTL of the local CA, e.g. `1h`.
    #[arg(long, value_parser = ward_net::duration::parse, default_value = "1h")]
    pub x509_svid_ttl: Duration,
    /// Log filter.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Also run two demo workloads behind two ward-proxy processes and show one allowed and
    /// one denied request with their access-log lines.
    #[arg(long)]
    pub demo: bool,
    /// The ward-proxy binary for --demo [default: next to this binary].
    #[arg(long, env = "WARD_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,
}

/// What dev mode remembers between runs.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DevState {
    agent_id: String,
    entry_id: String,
}

fn err(e: impl std::fmt::Display) -> CliError {
    CliError::new(1, e.to_string())
}

/// Runs dev mode until a signal arrives. Exit codes as the CLI documents them: 2 for a bad
/// flag (named, with the offending character), 7 when an address is in use (naming the flag
/// that sets it), 1 for the rest.
pub async fn run(a: DevArgs) -> Result<(), CliError> {
    ward_net::process::init_logging(&a.log_level, false);
    let td = TrustDomain::new(&a.trust_domain).map_err(|e| {
        CliError::new(
            2,
            format!("invalid --trust-domain {:?}: {e}", a.trust_domain),
        )
    })?;
    std::fs::create_dir_all(&a.data_dir)
        .map_err(|e| CliError::new(2, format!("--data-dir {}: {e}", a.data_dir.display())))?;
    let data_dir = std::fs::canonicalize(&a.data_dir).map_err(err)?;
    let mut cfg = CaConfig::new(td.clone(), data_dir.join("ca"));
    cfg.bind_address = a.bind_address;
    cfg.health_address = a.health_address;
    cfg.admin_socket = Some(data_dir.join("admin").join("api.sock"));
    cfg.ttl.x509_svid = a.x509_svid_ttl;
    cfg.ttl.agent_svid = a.x509_svid_ttl;
    cfg.validate()
        .map_err(|e| CliError::new(2, e.to_string()))?;
    let server = CaServer::start(cfg).await.map_err(|e| {
        let flag = match &e {
            StartError::Bind { what, .. } if what.starts_with("node API") => " (--bind-address)",
            StartError::Bind { what, .. } if what.starts_with("health") => " (--health-address)",
            _ => "",
        };
        CliError::new(e.exit_code(), format!("{e}{flag}"))
    })?;

    let result = run_with_server(&a, &data_dir, &td, &server).await;
    server.shutdown().await;
    result
}

async fn run_with_server(
    a: &DevArgs,
    data_dir: &Path,
    td: &TrustDomain,
    server: &CaServer,
) -> Result<(), CliError> {
    let core = &server.core;
    let now = core.clock.now();
    let state_path = data_dir.join("dev.json");
    let mut state: DevState = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();

    // Reuse the agent while its SVID is valid; otherwise attest a new one with a fresh token.
    let agents = core.agents.list().await.map_err(err)?;
    let reusable = agents.iter().any(|r| {
        r.id.as_str() == state.agent_id
            && !r.evicted
            && crate::db::from_unix(r.expires_at) > now + Duration::from_secs(30)
    });
    let agent_dir = data_dir.join("agent");
    let mut token = None;
    if !reusable {
        let (t, rec) = core
            .agents
            .create_join_token(Duration::from_secs(600), now)
            .await
            .map_err(err)?;
        state.agent_id = core
            .agents
            .join_token_agent_id(&rec.id)
            .map_err(err)?
            .to_string();
        token = Some(t);
        // A new agent identity: its old files are useless.
        let _ = std::fs::remove_dir_all(&agent_dir);
    }

    // The entry for the invoking user, parented to the current agent.
    let uid = nix::unistd::getuid().as_raw();
    let spec = EntrySpec {
        spiffe_id: format!("spiffe://{}/dev/uid/{uid}", td.name()),
        parent_id: state.agent_id.clone(),
        selectors: vec![format!("unix:uid:{uid}")],
        ..Default::default()
    };
    let existing = core.entries.get(&state.entry_id).await.ok().flatten();
    let entry = match existing {
        Some(e)
            if e.parent_id.as_str() == spec.parent_id && e.spiffe_id.as_str() == spec.spiffe_id =>
        {
            e
        }
        Some(e) => core.entries.update(&e.id, &spec, 0).await.map_err(err)?,
        None => {
            let found = core
                .entries
                .list(Some(&spec.parent_id), Some(&spec.spiffe_id))
                .await
                .map_err(err)?;
            match found.into_iter().next() {
                Some(e) => e,
                None => core
                    .entries
                    .create(&spec, "admin", crate::core::CaCore::new_entry_id(), now)
                    .await
                    .map_err(err)?,
            }
        }
    };
    state.entry_id = entry.id.clone();
    std::fs::write(&state_path, serde_json::to_vec_pretty(&state).map_err(err)?).map_err(err)?;

    // The agent child.
    std::fs::create_dir_all(&agent_dir).map_err(err)?;
    let socket = agent_dir.join("api.sock");
    let agent_cfg = agent_dir.join("agent.toml");
    let toml = format!(
        "trust_domain = {:?}\nserver_address = {:?}\ndata_dir = {:?}\nsocket_path = {:?}\n\
         trust_bundle_path = {:?}\nhealth_address = {:?}\nlog_level = {:?}\n",
        td.name(),
        server.node_addr.to_string(),
        agent_dir.display().to_string(),
        socket.display().to_string(),
        server.bundle_path.display().to_string(),
        a.agent_health_address.to_string(),
        a.log_level,
    );
    std::fs::write(&agent_cfg, toml).map_err(err)?;
    let bin = match &a.agent_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(err)?
            .with_file_name("ward-agent"),
    };
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("run").arg("--config").arg(&agent_cfg);
    if let Some(t) = &token {
        cmd.env("WARD_AGENT_JOIN_TOKEN", t);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        err(format!(
            "cannot start {}: {e} (build it with `cargo build`, or pass --agent-bin)",
            bin.display()
        ))
    })?;

    // One signal future for the whole run: a SIGTERM that arrives while the demo is being set
    // up must not be lost between two handlers.
    let stop = ward_net::process::shutdown_signal();
    tokio::pin!(stop);
    let ready = tokio::select! {
        r = wait_for_svid(&socket, Duration::from_secs(60)) => r.map_err(err),
        s = child.wait() => Err(agent_exit(s.map_err(err)?, "during start-up")),
        _ = &mut stop => Err(err("interrupted")),
    };
    let id = match ready {
        Ok(id) => id,
        Err(e) => {
            stop_child(&mut child).await;
            return Err(e);
        }
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "SPIFFE_ENDPOINT_SOCKET=unix://{}", socket.display()).map_err(err)?;
        writeln!(out, "SPIFFE_ID={id}").map_err(err)?;
        out.flush().map_err(err)?;
    }
    let demo = if a.demo {
        let bin = match &a.proxy_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()
                .map_err(err)?
                .with_file_name("ward-proxy"),
        };
        match crate::demo::run(core, &state.agent_id, &socket, &data_dir.join("demo"), &bin).await {
            Ok(d) => Some(d),
            Err(e) => {
                stop_child(&mut child).await;
                return Err(err(format!("demo: {e}")));
            }
        }
    } else {
        None
    };
    tracing::info!(
        admin_socket = %server.admin_socket.display(),
        health = %server.health_addr,
        "local trust domain ready; stop with Ctrl-C"
    );

    let result = tokio::select! {
        _ = &mut stop => Ok(()),
        s = child.wait() => Err(agent_exit(s.map_err(err)?, "")),
    };
    if let Some(d) = demo {
        d.stop().await;
    }
    stop_child(&mut child).await;
    result
}

/// The error for an agent child that exited: its own exit code 7 (an address in use) stays 7.
fn agent_exit(status: std::process::ExitStatus, when: &str) -> CliError {
    let when = if when.is_empty() {
        String::new()
    } else {
        format!(" {when}")
    };
    if status.code() == Some(i32::from(EXIT_CANNOT_LISTEN)) {
        return CliError::new(
            EXIT_CANNOT_LISTEN,
            format!(
                "ward-agent exited{when}: it cannot listen (see its message above; --agent-health-address)"
            ),
        );
    }
    err(format!("ward-agent exited{when}: {status}"))
}

/// Stops a child with SIGTERM, then SIGKILL after 10 s.
pub async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

/// Polls the Workload API as this process (which runs as the invoking user) until an SVID is
/// served; returns its SPIFFE ID.
async fn wait_for_svid(socket: &Path, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("agent socket not there yet");
    while Instant::now() < deadline {
        if socket.exists() {
            let mut client = SpiffeWorkloadApiClient::new(ward_net::process::unix_channel(socket));
            let mut req = tonic::Request::new(ward_proto::workload::X509svidRequest {});
            req.metadata_mut().insert(
                "workload.spiffe.io",
                tonic::metadata::MetadataValue::from_static("true"),
            );
            match client.fetch_x509svid(req).await {
                Ok(resp) => match resp.into_inner().message().await {
                    Ok(Some(m)) if !m.svids.is_empty() => return Ok(m.svids[0].spiffe_id.clone()),
                    Ok(_) => last = "stream ended without an SVID".into(),
                    Err(s) => last = s.message().to_owned(),
                },
                Err(s) => last = s.message().to_owned(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("no SVID from the agent within {timeout:?}: {last}"))
}
