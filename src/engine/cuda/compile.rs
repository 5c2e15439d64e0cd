//! Compiling our kernels with NVRTC into machine code (a CUBIN) for the GPU at hand, `sm_XY`.
//! PTX for `compute_XY` would be compiled once more by the driver, which refuses PTX from an
//! NVRTC newer than itself (CUDA_ERROR_UNSUPPORTED_PTX_VERSION: a PyTorch wheel's NVRTC on an
//! older driver); a CUBIN needs no second compiler. cudarc's compile helper returns PTX only,
//! so the four NVRTC calls are made here.

use cudarc::nvrtc::{result, sys};
use std::ffi::{CStr, CString, c_int};

/// `src` compiled for `arch` (`sm_90`, ...): the CUBIN, or NVRTC's error and log.
pub fn cubin(src: &str, arch: &str) -> Result<Vec<u8>, String> {
    let src = CString::new(src).map_err(|_| "kernel source holds a NUL byte".to_string())?;
    let prog = result::create_program(&src, None).map_err(|e| format!("NVRTC: {e:?}"))?;
    let options = [format!("--gpu-architecture={arch}")];
    // SAFETY: `prog` is a live program until destroyed at the end; the buffers are sized by
    // NVRTC's own answers.
    let out = unsafe {
        match result::compile_program(prog, &options) {
            Err(e) => {
                let log = result::get_program_log(prog).unwrap_or_default();
                let log = CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned();
                Err(format!("{e:?}: {}", log.trim()))
            }
            Ok(()) => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|()| {
                        let mut code = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, code.as_mut_ptr() as *mut _)
                            .result()
                            .map(|()| code)
                    })
                    .map_err(|e| format!("NVRTC gave no CUBIN for {arch}: {e:?}"))
            }
        }
    };
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// NVRTC's version, `major.minor`.
pub fn nvrtc_version() -> String {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: two out-parameters.
    match unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result() {
        Ok(()) => format!("{major}.{minor}"),
        Err(e) => format!("unknown ({e:?})"),
    }
}

/// The CUDA version the driver supports, `major.minor`.
pub fn driver_version() -> String {
    let mut v: c_int = 0;
    // SAFETY: one out-parameter.
    match unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }.result() {
        Ok(()) => format!("{}.{}", v / 1000, (v % 1000) / 10),
        Err(e) => format!("unknown ({e:?})"),
    }
}
