//! Compiles `proto/kms/v1/kms.proto` with `protox` (pure Rust), so no system `protoc` is needed,
//! and writes the descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = protox::compile(["kms/v1/kms.proto"], ["proto"])?;
    std::fs::write(
        out_dir.join("kms_descriptor.bin"),
        prost::Message::encode_to_vec(&files),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(files)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
