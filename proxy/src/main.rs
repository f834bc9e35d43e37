//! ward-proxy binary: parses the command line and runs it. `WARD_PROXY_WORKER_THREADS` sets
//! the number of runtime worker threads (default: one per core).

fn main() -> std::process::ExitCode {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = std::env::var("WARD_PROXY_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        rt.worker_threads(n);
    }
    match rt.build() {
        Ok(rt) => rt.block_on(ward_proxy::cli::main()),
        Err(e) => {
            eprintln!("ward-proxy: cannot start the runtime: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
