//! Compiles the protocol with protox (a pure-Rust protobuf compiler): no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/weft/v1/consortium.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::compile_fds(descriptors)?;
    Ok(())
}
