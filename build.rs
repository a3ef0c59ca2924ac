//! Compiles the protobuf definitions with a vendored `protoc`, so a fresh
//! machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let include = protoc_bin_vendored::include_path()?;
    let protos = [
        "proto/workload.proto",
        "proto/sigil/node/v1/node.proto",
        "proto/sigil/admin/v1/admin.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("sigil_descriptor.bin"))
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &protos.map(Into::into), &["proto".into(), include])?;
    Ok(())
}
