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

/// The `proto/` directory of the `envoy-types` package this build resolved.
///
/// First the registry checkout Cargo unpacked it into (the version from
/// Cargo.lock), because `cargo metadata --offline` needs every package of the
/// lockfile on disk, dev-dependencies and other platforms' included, which a
/// plain `cargo build` on a new machine has not downloaded. Then, for vendored
/// or git sources, `cargo metadata`.
fn envoy_types_protos() -> Result<PathBuf, Box<dyn std::error::Error>> {
    // Another envoy-types version is another directory: Cargo.lock says when.
    println!("cargo:rerun-if-changed=Cargo.lock");
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let version = locked_version(&manifest_dir.join("Cargo.lock"), "envoy-types");
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let (Some(version), Some(home)) = (&version, &cargo_home)
        && let Ok(registries) = std::fs::read_dir(home.join("registry").join("src"))
    {
        for registry in registries.flatten() {
            let dir = registry.path().join(format!("envoy-types-{version}")).join("proto");
            if dir.is_dir() {
                return Ok(dir);
            }
        }
    }

    let cargo = env::var("CARGO")?;
    let mut metadata = Command::new(cargo);
    metadata.args(["metadata", "--format-version", "1", "--offline"]).current_dir(&manifest_dir);
    for triple in [env::var("TARGET")?, env::var("HOST")?] {
        metadata.arg("--filter-platform").arg(triple);
    }
    let output = metadata.output()?;
    if !output.status.success() {
        return Err(format!(
            "envoy-types {} is not in {}/registry/src, and cargo metadata failed: {}",
            version.as_deref().unwrap_or("(not in Cargo.lock)"),
            cargo_home.as_deref().unwrap_or(std::path::Path::new("$CARGO_HOME")).display(),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or("cargo metadata lists no envoy-types package")?;
    Ok(PathBuf::from(manifest).parent().ok_or("envoy-types manifest has no directory")?.join("proto"))
}

/// The version Cargo.lock pins for `name`, if it pins exactly one.
fn locked_version(lock: &std::path::Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(lock).ok()?;
    let wanted = format!("name = \"{name}\"");
    let mut versions = text.split("[[package]]").filter_map(|package| {
        let mut lines = package.lines().map(str::trim);
        lines.find(|l| *l == wanted)?;
        let version = lines.find(|l| l.starts_with("version = "))?;
        Some(version.trim_start_matches("version = ").trim_matches('"').to_owned())
    });
    let first = versions.next()?;
    versions.next().is_none().then_some(first)
}
