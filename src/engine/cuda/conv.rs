//! Convolutions through cuDNN: NHWC activations, OHWI filters (cuDNN's NHWC filter format).
//! One plan per geometry holds the descriptors and the algorithms, chosen once by cuDNN's
//! heuristics among the deterministic ones, or PyTorch's deterministic defaults when it lists
//! none (so a run repeats bit for bit); fp32 plans run in FMA math only (no TF32).

use crate::engine::{ConvGeom, Shape4};
use cudarc::cudnn::{result as dnn, sys};
use std::ffi::c_void;

/// Largest workspace an algorithm may ask for.
const MAX_WORKSPACE: usize = 1 << 30;

/// The plan of a convolution layer on CUDA ([`crate::engine::ConvOps::ConvPlan`]): cuDNN
/// with the backend's arithmetic. cuDNN's descriptors and algorithms depend on the batch size
/// too, so the backend keeps those itself, one `ConvPlan` per whole geometry, made on
/// first use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerPlan {
    pub tf32: bool,
}

impl std::fmt::Display for LayerPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let math = if self.tf32 {
            "tf32 tensor cores"
        } else {
            "fp32 FMA math"
        };
        write!(f, "cuDNN, deterministic algorithms, {math}")
    }
}

/// A cuDNN handle bound to the backend's stream.
pub(super) struct Dnn(pub sys::cudnnHandle_t);
// The handle is only used from the thread holding the backend's plan lock or, for launches,
// in stream order; cuDNN handles may move between threads.
unsafe impl Send for Dnn {}
unsafe impl Sync for Dnn {}

pub(super) struct ConvPlan {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    fwd_desc: sys::cudnnConvolutionDescriptor_t,
    bwd_data_desc: sys::cudnnConvolutionDescriptor_t,
    bwd_filter_desc: sys::cudnnConvolutionDescriptor_t,
    fwd: sys::cudnnConvolutionFwdAlgo_t,
    bwd_data: sys::cudnnConvolutionBwdDataAlgo_t,
    bwd_filter: sys::cudnnConvolutionBwdFilterAlgo_t,
    pub workspace_bytes: usize,
}
unsafe impl Send for ConvPlan {}

fn check<T>(what: &str, r: Result<T, dnn::CudnnError>) -> T {
    r.unwrap_or_else(|e| panic!("cuDNN {what}: {e:?}"))
}

fn tensor(s: Shape4) -> sys::cudnnTensorDescriptor_t {
    let d = check("tensor descriptor", dnn::create_tensor_descriptor());
    let dims = [s.n as i32, s.c as i32, s.h as i32, s.w as i32];
    check("tensor descriptor", unsafe {
        dnn::set_tensor4d_descriptor(
            d,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            dims,
        )
    });
    d
}

fn conv_desc(g: &ConvGeom) -> sys::cudnnConvolutionDescriptor_t {
    let d = check("convolution descriptor", dnn::create_convolution_descriptor());
    let (p, s) = (g.pad as i32, g.stride as i32);
    check("convolution descriptor", unsafe {
        dnn::set_convolution2d_descriptor(
            d,
            p,
            p,
            s,
            s,
            1,
            1,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )
    });
    d
}

/// The first result (cuDNN orders them fastest first) that succeeded, is deterministic, fits
/// the workspace limit and uses an allowed math mode; its algorithm and math type. Else
/// `fallback`, the algorithm PyTorch takes in deterministic mode, in the mode's own math.
///
/// fp32 (`tf32` false) runs in FMA math only: cuDNN's default math may use TF32 tensor cores
/// on Ampere and later, which PyTorch rules out when TF32 is off. tf32 allows tensor cores
/// but never `ALLOW_CONVERSION` (down-conversion of fp32 data to fp16 or bf16).
fn choose<A: Copy>(
    results: &[(
        A,
        sys::cudnnStatus_t,
        usize,
        sys::cudnnDeterminism_t,
        sys::cudnnMathType_t,
    )],
    tf32: bool,
    fallback: A,
) -> (A, sys::cudnnMathType_t) {
    use sys::cudnnMathType_t::*;
    let allowed = |math| match math {
        CUDNN_FMA_MATH => true,
        CUDNN_DEFAULT_MATH | CUDNN_TENSOR_OP_MATH => tf32,
        _ => false,
    };
    let ok = |&&(_, status, memory, det, math): &&(A, _, usize, _, sys::cudnnMathType_t)| {
        status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
            && memory <= MAX_WORKSPACE
            && det == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC
            && allowed(math)
    };
    let mode_math = if tf32 { CUDNN_DEFAULT_MATH } else { CUDNN_FMA_MATH };
    results
        .iter()
        .find(ok)
        .map_or((fallback, mode_math), |&(a, _, _, _, m)| (a, m))
}

/// The fields [`choose`] reads from the first `count` of cuDNN's algorithm results (each
/// direction has its own result struct with the same fields).
macro_rules! rows {
    ($perf:expr, $count:expr) => {
        $perf[..$count as usize]
            .iter()
            .map(|p| (p.algo, p.status, p.memory, p.determinism, p.mathType))
            .collect::<Vec<_>>()
    };
}

impl ConvPlan {
    /// Descriptors and algorithms for `g`. With `tf32` false, only full-fp32 math is allowed.
    pub fn new(dnn_h: &Dnn, g: &ConvGeom, tf32: bool) -> Self {
        let h = dnn_h.0;
        let x = tensor(g.input);
        let y = tensor(g.output());
        let w = check("filter descriptor", dnn::create_filter_descriptor());
        check("filter descriptor", unsafe {
            dnn::set_filter4d_descriptor(
                w,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                [g.cout as i32, g.input.c as i32, g.kh as i32, g.kw as i32],
            )
        });
        let math = if tf32 {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        };
        let [fwd_desc, bwd_data_desc, bwd_filter_desc] = [(); 3].map(|_| {
            let d = conv_desc(g);
            check("math type", unsafe { dnn::set_convolution_math_type(d, math) });
            d
        });
        const N: usize = 16;
        let mut count = 0;

        let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; N];
        check("forward algorithm", unsafe {
            dnn::get_convolution_forward_algorithm(h, x, w, fwd_desc, y, N as i32, &mut count, perf.as_mut_ptr())
        });
        let r = rows!(perf, count);
        let (fwd, fwd_math) = choose(
            &r,
            tf32,
            sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        );

        let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>() }; N];
        check("backward-data algorithm", unsafe {
            dnn::get_convolution_backward_data_algorithm(
                h,
                w,
                y,
                bwd_data_desc,
                x,
                N as i32,
                &mut count,
                perf.as_mut_ptr(),
            )
        });
        let r = rows!(perf, count);
        let (bwd_data, data_math) = choose(
            &r,
            tf32,
            sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        );

        let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>() }; N];
        check("backward-filter algorithm", unsafe {
            dnn::get_convolution_backward_filter_algorithm(
                h,
                x,
                y,
                bwd_filter_desc,
                w,
                N as i32,
                &mut count,
                perf.as_mut_ptr(),
            )
        });
        let r = rows!(perf, count);
        let (bwd_filter, filter_math) = choose(
            &r,
            tf32,
            sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        );

        unsafe {
            check("math type", dnn::set_convolution_math_type(fwd_desc, fwd_math));
            check("math type", dnn::set_convolution_math_type(bwd_data_desc, data_math));
            check(
                "math type",
                dnn::set_convolution_math_type(bwd_filter_desc, filter_math),
            );
        }
        let workspace_bytes = unsafe {
            let f = check(
                "workspace size",
                dnn::get_convolution_forward_workspace_size(h, x, w, fwd_desc, y, fwd),
            );
            let d = check(
                "workspace size",
                dnn::get_convolution_backward_data_workspace_size(h, w, y, bwd_data_desc, x, bwd_data),
            );
            let b = check(
                "workspace size",
                dnn::get_convolution_backward_filter_workspace_size(h, x, y, bwd_filter_desc, w, bwd_filter),
            );
            f.max(d).max(b)
        };
        Self {
            x,
            y,
            w,
            fwd_desc,
            bwd_data_desc,
            bwd_filter_desc,
            fwd,
            bwd_data,
            bwd_filter,
            workspace_bytes,
        }
    }

    /// y = conv(x, w). Pointers are device addresses; `ws_bytes` the workspace's size.
    pub fn forward(&self, h: &Dnn, x: u64, w: u64, y: u64, ws: u64, ws_bytes: usize) {
        let (one, zero) = (1f32, 0f32);
        check("convolution forward", unsafe {
            dnn::convolution_forward(
                h.0,
                &one as *const f32 as *const c_void,
                self.x,
                x as *const c_void,
                self.w,
                w as *const c_void,
                self.fwd_desc,
                self.fwd,
                ws as *mut c_void,
                ws_bytes,
                &zero as *const f32 as *const c_void,
                self.y,
                y as *mut c_void,
            )
        });
    }

    pub fn backward_filter(&self, h: &Dnn, x: u64, dy: u64, dw: u64, ws: u64, ws_bytes: usize) {
        let (one, zero) = (1f32, 0f32);
        check("convolution backward filter", unsafe {
            dnn::convolution_backward_filter(
                h.0,
                &one as *const f32 as *const c_void,
                self.x,
                x as *const c_void,
                self.y,
                dy as *const c_void,
                self.bwd_filter_desc,
                self.bwd_filter,
                ws as *mut c_void,
                ws_bytes,
                &zero as *const f32 as *const c_void,
                self.w,
                dw as *mut c_void,
            )
        });
    }

    pub fn backward_data(&self, h: &Dnn, w: u64, dy: u64, dx: u64, ws: u64, ws_bytes: usize) {
        let (one, zero) = (1f32, 0f32);
        check("convolution backward data", unsafe {
            dnn::convolution_backward_data(
                h.0,
                &one as *const f32 as *const c_void,
                self.w,
                w as *const c_void,
                self.y,
                dy as *const c_void,
                self.bwd_data_desc,
                self.bwd_data,
                ws as *mut c_void,
                ws_bytes,
                &zero as *const f32 as *const c_void,
                self.x,
                dx as *mut c_void,
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnDeterminism_t::*;
    use sys::cudnnMathType_t::*;
    use sys::cudnnStatus_t::*;

    /// Which of cuDNN's listed algorithms a plan takes (no GPU needed: the choice is ours).
    #[test]
    fn plans_keep_fp32_in_fma_math_and_fall_back_to_deterministic_defaults() {
        let fine = |a: u32, math| (a, CUDNN_STATUS_SUCCESS, 0usize, CUDNN_DETERMINISTIC, math);
        let listed = [
            (0, CUDNN_STATUS_NOT_SUPPORTED, 0, CUDNN_DETERMINISTIC, CUDNN_FMA_MATH),
            (1, CUDNN_STATUS_SUCCESS, 0, CUDNN_NON_DETERMINISTIC, CUDNN_FMA_MATH),
            (
                2,
                CUDNN_STATUS_SUCCESS,
                MAX_WORKSPACE + 1,
                CUDNN_DETERMINISTIC,
                CUDNN_FMA_MATH,
            ),
            fine(3, CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION),
            fine(4, CUDNN_DEFAULT_MATH),
            fine(5, CUDNN_TENSOR_OP_MATH),
            fine(6, CUDNN_FMA_MATH),
        ];
        // fp32: the first deterministic, successful, small-enough one in FMA math.
        assert_eq!(choose(&listed, false, 99), (6, CUDNN_FMA_MATH));
        // tf32: tensor cores allowed, down-conversion never.
        assert_eq!(choose(&listed, true, 99), (4, CUDNN_DEFAULT_MATH));
        // Nothing usable listed: the fallback, in the mode's math.
        assert_eq!(choose(&listed[..4], false, 99), (99, CUDNN_FMA_MATH));
        assert_eq!(choose(&listed[..4], true, 99), (99, CUDNN_DEFAULT_MATH));
    }
}
