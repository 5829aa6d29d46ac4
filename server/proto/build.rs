//! Compiles `proto/worker.proto` with protox (a pure-Rust protobuf compiler, so no `protoc` is needed) and
//! generates the tonic client and server into `OUT_DIR`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/worker.proto");
    let descriptors = protox::compile(["proto/worker.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
