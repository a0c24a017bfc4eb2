//! Compiles `proto/` with a vendored protoc, so `cargo build` needs no system
//! protoc, and writes the descriptor set that gRPC reflection serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("takumo_apikeys_v1_descriptor.bin"))
        .compile_protos(&["proto/takumo/apikeys/v1/api_keys.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
