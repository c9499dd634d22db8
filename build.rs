//! Compiles `proto/` with tonic/prost codegen, using the vendored `protoc` so that a fresh
//! machine needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        PathBuf::from("proto/pdgate/v1/access.proto"),
        PathBuf::from("proto/pdgate/v1/policy_admin.proto"),
        PathBuf::from("proto/pdgate/v1/subject_rights.proto"),
        PathBuf::from("proto/pdgate/v1/audit_log.proto"),
        PathBuf::from("proto/demo/customer/v1/customer.proto"),
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    // Imported by the demo's proto, and read by pdgate itself (policy::inspect).
    println!("cargo:rerun-if-changed=proto/pdgate/v1/annotations.proto");
    // `sqlx::migrate!` embeds migrations/ at compile time, and a proc macro cannot ask to be
    // rerun when a file is added there: rerunning this script rebuilds the crate.
    println!("cargo:rerun-if-changed=migrations");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("pdgate_descriptor.bin"))
        .compile_with_config(config, &protos, &includes)?;
    envoy_descriptor_set(&out_dir)?;
    Ok(())
}

/// Envoy's ext_authz service as a descriptor set (with every import), for server reflection:
/// `envoy-types` provides the Rust types but no descriptors. Only compiled, no code generated.
fn envoy_descriptor_set(out_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto/third_party");
    println!("cargo:rerun-if-changed={}", root.display());
    let status = std::process::Command::new(protoc_bin_vendored::protoc_bin_path()?)
        .arg("--include_imports")
        .arg(format!(
            "--descriptor_set_out={}",
            out_dir.join("envoy_ext_authz_descriptor.bin").display()
        ))
        .arg(format!("--proto_path={}", root.display()))
        .arg(format!(
            "--proto_path={}",
            protoc_bin_vendored::include_path()?.display()
        ))
        .arg("envoy/service/auth/v3/external_auth.proto")
        .status()?;
    if !status.success() {
        return Err(format!("protoc failed on Envoy's ext_authz protos: {status}").into());
    }
    Ok(())
}
