//! Generates the prost messages and tonic services of `proto/*.proto` with protox (a protobuf
//! compiler in Rust), so building needs no `protoc` on the machine.
use std::path::PathBuf;

/// The .proto files, relative to this crate (also the include root).
const PROTOS: &[&str] = &[
    "ca.proto",
    "workload.proto",
    "authorization.proto",
    "xds.proto",
];

fn main() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    for file in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let files: Vec<PathBuf> = PROTOS.iter().map(|f| root.join(f)).collect();
    let fds =
        protox::compile(&files, [&root]).unwrap_or_else(|e| panic!("compiling {PROTOS:?}: {e:?}"));
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating Rust for {PROTOS:?}: {e}"));
}
