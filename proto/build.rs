//! Compiles Ward's protobuf definitions with protox (pure Rust, no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/workload.proto",
        "proto/ward/types/v1/types.proto",
        "proto/ward/node/v1/node.proto",
        "proto/ward/admin/v1/admin.proto",
        "proto/ward/agent/v1/agent.proto",
        "proto/envoy/service/secret/v3/sds.proto",
        "proto/envoy/extensions/transport_sockets/tls/v3/secret.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
