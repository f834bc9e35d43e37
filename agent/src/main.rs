//! ward-agent binary: parses the command line and runs it.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ward_agent::cli::main().await
}
