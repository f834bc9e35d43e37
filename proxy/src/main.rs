//! ward-proxy binary: parses the command line and runs it.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ward_proxy::cli::main().await
}
