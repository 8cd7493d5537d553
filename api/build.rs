//! Compiles the .proto files with the vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    let mut protos = vec![
        "proto/strait/api/v1/common.proto",
        "proto/strait/api/v1/discovery.proto",
        "proto/strait/api/v1/inbound.proto",
        "proto/strait/api/v1/identity.proto",
    ];
    if std::env::var_os("CARGO_FEATURE_TESTING").is_some() {
        protos.push("proto/strait/testing/v1/echo.proto");
    }
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // Small buffers per call: see `codec`.
    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallBuffers")
        .compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
