//! Generates Rust types for the `.proto` files (needs `protoc`, installed by `cargo xtask setup`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=hearth");
    prost_build::Config::new().compile_protos(&["hearth/init/v1/init.proto"], &["."])?;
    // The scheduler API, with tonic client and server code, only for the `grpc` feature.
    #[cfg(feature = "grpc")]
    tonic_prost_build::configure().compile_protos(&["hearth/v1/agent.proto"], &["."])?;
    Ok(())
}
