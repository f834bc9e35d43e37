//! The `ward-agent` command line: `run`, `check-config` and `files`.
//!
//! Exit codes ([`EXIT_CODES`], printed by `--help`): 0 success; 1 runtime failure; 2 invalid
//! configuration or usage; 7 cannot listen (an address or socket in use or not permitted).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{AgentConfig, LogFormat};

/// ward-agent: the Ward node agent and SPIFFE Workload API server.
#[derive(Debug, Parser)]
#[command(name = "ward-agent", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Join token for the first attestation (prefer WARD_AGENT_JOIN_TOKEN).
        #[arg(long)]
        join_token: Option<String>,
    },
    /// Validate a configuration file and print it with defaults filled in.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write this workload's SVID, key and bundle as PEM files (svid.pem, svid_key.pem,
    /// bundle.pem) into a directory and keep them fresh, for software that cannot use the
    /// Workload API; optionally reload it after each update.
    Files {
        /// Workload API socket (unix:///path or a path).
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
        socket: String,
        /// Output directory (must exist and be writable).
        #[arg(long)]
        dir: PathBuf,
        /// Which SVID, when the workload has several.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Also write jwt_svid.token for this audience.
        #[arg(long)]
        jwt_audience: Option<String>,
        /// Write once and exit (init containers).
        #[arg(long)]
        once: bool,
        /// Shell command run after every update (e.g. "nginx -s reload").
        #[arg(long)]
        cmd: Option<String>,
        /// Signal sent after every update (e.g. HUP), to --pid or the pid in --pid-file.
        #[arg(long)]
        signal: Option<String>,
        /// Process to signal.
        #[arg(long)]
        pid: Option<i32>,
        /// File holding the pid to signal.
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
}

/// Exit code: a listener could not be bound (address in use, or not permitted).
pub const EXIT_CANNOT_LISTEN: u8 = 7;

/// What `--help` says about exit codes.
const EXIT_CODES: &str = "Exit codes:
  0  success
  1  runtime failure (the CA unreachable at start, attestation refused, ...)
  2  invalid configuration or usage (the message names the key or flag)
  7  cannot listen: an address or socket is in use or not permitted";

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// Runs the CLI; returns the exit code.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, join_token } => {
            let mut cfg = match AgentConfig::from_file(&config) {
                Ok(c) => c,
                Err(e) => return fail(2, &e),
            };
            if let Err(e) = cfg.apply_env(&env) {
                return fail(2, &e);
            }
            if join_token.is_some() {
                cfg.join_token = join_token;
            }
            ward_net::process::init_logging(&cfg.log_level, cfg.log_format == LogFormat::Json);
            let agent = match crate::Agent::start(cfg).await {
                Ok(a) => a,
                Err(e) => return fail(e.exit_code(), &e),
            };
            ward_net::process::shutdown_signal().await;
            tracing::info!("shutting down");
            agent.shutdown().await;
            ExitCode::SUCCESS
        }
        Command::Files {
            socket,
            dir,
            spiffe_id,
            jwt_audience,
            once,
            cmd,
            signal,
            pid,
            pid_file,
        } => {
            ward_net::process::init_logging("info", false);
            let signal = match signal.as_deref().map(parse_signal).transpose() {
                Ok(s) => s,
                Err(e) => return fail(2, &e),
            };
            let socket = PathBuf::from(socket.strip_prefix("unix://").unwrap_or(&socket));
            let opts = crate::helper::Options {
                socket,
                dir,
                spiffe_id,
                jwt_audience,
                once,
                cmd,
                signal,
                pid,
                pid_file,
            };
            let run = crate::helper::run(opts);
            let result = if once {
                run.await
            } else {
                tokio::select! {
                    r = run => r,
                    _ = ward_net::process::shutdown_signal() => Ok(()),
                }
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ crate::helper::HelperError::Usage(_)) => fail(2, &e),
                Err(e) => fail(1, &e),
            }
        }
        Command::CheckConfig { config } => match AgentConfig::from_file(&config) {
            Ok(cfg) => match toml::to_string_pretty(&cfg) {
                Ok(t) => {
                    #[allow(clippy::print_stdout)]
                    {
                        println!("{t}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e),
            },
            Err(e) => fail(2, &e),
        },
    }
}

fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse()
        .map_err(|_| format!("--signal {s:?} is not a signal name (e.g. HUP, USR1)"))
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("ward-agent: {e}");
    ExitCode::from(code)
}
