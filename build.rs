//! Generates the ONNX protobuf types (`onnx::proto`) from the vendored schema `proto/onnx.proto`
//! (ONNX 1.23.2, Apache-2.0), with `protox`, a protobuf compiler in Rust, so the build needs no
//! `protoc` on the machine, and `prost-build` for the Rust types.

fn main() {
    let schema = "proto/onnx.proto";
    println!("cargo:rerun-if-changed={schema}");
    println!("cargo:rerun-if-changed=build.rs");
    let descriptors = protox::compile([schema], ["proto"]).expect("proto/onnx.proto compiles");
    prost_build::Config::new()
        .compile_fds(descriptors)
        .expect("prost-build generates the ONNX types");
}
