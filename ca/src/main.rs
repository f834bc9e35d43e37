//! ward-ca binary: parses the command line and runs it.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ward_ca::cli::main().await
}
