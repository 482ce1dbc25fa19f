//! Generates Rust types for the `.proto` files (needs `protoc`, installed by `cargo xtask setup`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=hearth");
    prost_build::Config::new().compile_protos(&["hearth/init/v1/init.proto"], &["."])?;
    Ok(())
}
