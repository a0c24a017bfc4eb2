//! Compiles `proto/` with a vendored protoc, so `cargo build` needs no system
//! protoc, and writes the descriptor sets that gRPC reflection serves: ours,
//! and Envoy's `envoy.service.auth.v3` (the ext_authz protocol), compiled from
//! the `.proto` files the `envoy-types` crate ships, so none are copied here.

use std::{env, path::PathBuf, process::Command};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", &protoc) };
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("takumo_apikeys_v1_descriptor.bin"))
        .compile_protos(&["proto/takumo/apikeys/v1/api_keys.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");

    let envoy = envoy_types_protos()?;
    let mut cmd = Command::new(&protoc);
    for dir in ["data-plane-api", "xds", "protoc-gen-validate", "googleapis", "cel-spec/proto"] {
        cmd.arg("-I").arg(envoy.join(dir));
    }
    let status = cmd
        .arg("-I")
        .arg(protoc_bin_vendored::include_path()?)
        .arg("--include_imports")
        .arg("--descriptor_set_out")
        .arg(out_dir.join("envoy_ext_authz_descriptor.bin"))
        .arg("envoy/service/auth/v3/external_auth.proto")
        .status()?;
    if !status.success() {
        return Err(format!("protoc failed on envoy-types' external_auth.proto ({status})").into());
    }
    Ok(())
}

/// The `proto/` directory of the `envoy-types` package this build resolved,
/// as `cargo metadata` reports it (a registry checkout, a vendor directory or
/// a git checkout alike).
fn envoy_types_protos() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let cargo = env::var("CARGO")?;
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(env::var("CARGO_MANIFEST_DIR")?)
        .output()?;
    if !output.status.success() {
        return Err(format!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or("cargo metadata lists no envoy-types package")?;
    let dir = PathBuf::from(manifest).parent().ok_or("envoy-types manifest has no directory")?.join("proto");
    // Another envoy-types version is another directory: Cargo.lock says when.
    println!("cargo:rerun-if-changed=Cargo.lock");
    Ok(dir)
}
