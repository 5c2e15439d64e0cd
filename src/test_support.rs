//! How a test that cannot run on this machine says so, for the unit tests and the integration
//! tests alike. A test that needs what the machine lacks (an instruction set, a GPU, a Python
//! package) calls [`skip`]: the skip is printed, appended to the file `RESNET_CIFAR_SKIP_LOG`
//! names (`.ci/run` lists them after the tests), and where `RESNET_CIFAR_REQUIRE` names the
//! need (a comma-separated list: `bf16`, `amx`, `gpu`, `onnx`, ...: the machine is known to
//! have it) the test fails instead of passing as skipped.

use std::io::Write;

/// Whether `RESNET_CIFAR_REQUIRE` names `need`.
pub fn required(need: &str) -> bool {
    std::env::var("RESNET_CIFAR_REQUIRE").is_ok_and(|list| list.split(',').any(|n| n.trim() == need))
}

/// Reports that the running test (or the part of it `what` names) does not run here for want
/// of `need`; panics where `need` is required.
pub fn skip(need: &str, what: &str, reason: &str) {
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    if required(need) {
        panic!("{test}: {what} needs {need}, which RESNET_CIFAR_REQUIRE says this machine has: {reason}");
    }
    let line = format!("skipped: {test}: {what} (needs {need}: {reason})\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os("RESNET_CIFAR_SKIP_LOG") {
        // One write of a short line to a file opened for appending: lines from tests running
        // side by side do not interleave.
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        let _ = file.and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

/// The bf16 kernels this CPU runs, for tests to run each: AVX512_BF16's where it has it, AMX's
/// where it also has the tiles. A missing one is reported as skipped.
pub fn bf16_kernels() -> Vec<crate::engine::cpu::Bf16Kernel> {
    use crate::engine::cpu::Bf16Kernel;
    let mut kernels = Vec::new();
    match crate::engine::cpu::bf16_support() {
        Ok(()) => kernels.push(Bf16Kernel::Avx512),
        Err(e) => skip("bf16", "bf16 products", &e),
    }
    if Bf16Kernel::amx_available() {
        kernels.push(Bf16Kernel::Amx);
    } else {
        skip("amx", "the AMX kernel's part", "this CPU (or OS) has no AMX-BF16 tiles");
    }
    kernels
}
