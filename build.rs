//! Compiles `proto/ish/v1/*.proto` with protox (pure Rust), so neither developers nor CI need a
//! system `protoc`. The file descriptor set is also written to OUT_DIR for gRPC reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "common.proto",
        "slave.proto",
        "builds.proto",
        "storage.proto",
    ]
    .map(|f| PathBuf::from("proto/ish/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("ish_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
