//! The `ward-agent` command line: `run` and `check-config`.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 invalid configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{AgentConfig, LogFormat};

/// ward-agent: the Ward node agent and SPIFFE Workload API server.
#[derive(Debug, Parser)]
#[command(name = "ward-agent", version, about)]
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
}

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
                Err(e) => return fail(1, &e),
            };
            ward_net::process::shutdown_signal().await;
            tracing::info!("shutting down");
            agent.shutdown().await;
            ExitCode::SUCCESS
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

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("ward-agent: {e}");
    ExitCode::from(code)
}
