//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building needs no system `protoc`.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "pairdb/common/v1/common.proto",
    "pairdb/kv/v1/kv.proto",
    "pairdb/admin/v1/admin.proto",
    "pairdb/cluster/v1/cluster.proto",
    "pairdb/storage/v1/storage.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not baked in with env!(): a build script binary reused from another checkout
    // of the workspace must watch this checkout's files.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }
    let descriptors = protox::compile(PROTO_FILES, [&proto_root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::StrictCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
