//! The CUDA backend: buffers live in GPU memory (`CudaSlice<f32>`), convolutions run in cuDNN,
//! the linear layer in cuBLAS, and everything else in our own kernels (`kernels.cu`, compiled at
//! start-up with NVRTC for the GPU at hand). All work goes to one stream in order; the host
//! waits only when it reads a result back (`download`).
//!
//! The libraries are loaded at run time (cudarc's dynamic loading), so the binary builds and runs
//! on machines without CUDA; there [`Cuda::new`] returns a one-line reason instead.

mod compile;
mod conv;
mod libs;
pub mod nccl;

use super::{
    AdamStep, BatchNormEval, BatchNormSaved, BatchNormTrain, BatchOps, ConvGeom, ConvOp, ConvOps, CropPlan, Epilogue,
    FusedOps, GradSlots, Layout, LinearDims, LinearOps, LossOps, Memory, NormOps, OptimOps, ParamStep, PointwiseOps,
    PoolGeom, PoolOps, SgdStep, Shape4, Targets,
};
pub use conv::LayerPlan;
use conv::{ConvPlan, Dnn};
use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, PoisonError};

const KERNELS: &str = include_str!("kernels.cu");

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;
/// Row slices of a batch-norm reduction at most (blockIdx.y), and rows per slice at least.
const BN_MAX_PARTS: usize = 512;
const BN_MIN_ROWS_PER_PART: usize = 64;

/// Numerical mode of the convolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Full fp32 arithmetic everywhere (what the golden tests check).
    Fp32,
    /// cuDNN may use TF32 tensor cores for convolutions, as PyTorch does by default.
    Tf32,
}

crate::named::choices!(Precision, "precision", {
    Fp32 => "fp32",
    Tf32 => "tf32",
});

/// Declares `Kernels`, one `CudaFunction` a kernel of `kernels.cu`, with the list of their
/// names (which the NVRTC test checks against the compiled module) and the loader.
macro_rules! kernels {
    ($($field:ident = $name:literal,)*) => {
        struct Kernels {
            $($field: CudaFunction,)*
        }

        impl Kernels {
            #[cfg(test)]
            const NAMES: &[&str] = &[$($name),*];

            fn load(f: impl Fn(&str) -> Result<CudaFunction, String>) -> Result<Self, String> {
                Ok(Self { $($field: f($name)?,)* })
            }
        }
    };
}

kernels! {
    fill = "fill_f32",
    augment = "augment",
    add_assign = "add_assign_f32",
    scale = "scale_f32",
    lerp = "lerp_f32",
    bn_partial_sums = "bn_partial_sums",
    bn_var = "bn_var",
    bn_apply = "bn_apply",
    bn_backward_sums = "bn_backward_sums",
    bn_backward_finalize = "bn_backward_finalize",
    bn_backward_dx = "bn_backward_dx",
    max_pool_forward = "max_pool_forward",
    max_pool_backward = "max_pool_backward",
    gap_forward = "global_avg_pool_forward",
    gap_backward = "global_avg_pool_backward",
    broadcast_rows = "broadcast_rows",
    partial_column_sums = "partial_column_sums",
    bias_add = "bias_add",
    relu_forward = "relu_forward",
    relu_backward = "relu_backward",
    gelu_forward = "gelu_forward",
    gelu_backward = "gelu_backward",
    column_sums = "column_sums",
    cross_entropy = "cross_entropy",
    watch_loss = "watch_loss",
    adam = "adam_step",
    sgd = "sgd_step",
}

/// Device scratch that ops borrow for the length of a call.
struct Scratch {
    partials: CudaSlice<f64>,
    /// A synchronised batch norm's whole-batch gradient sums (`[dbeta | dgamma]`).
    bn_sums: CudaSlice<f32>,
    labels: CudaSlice<i32>,
    /// A batch plan's `[index, top, left, flip]` items.
    items: CudaSlice<u32>,
}

pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    dnn: Dnn,
    k: Kernels,
    plans: Mutex<HashMap<ConvGeom, ConvPlan>>,
    scratch: Mutex<Scratch>,
    precision: Precision,
    device_name: String,
    sms: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PoolDims {
    n: i32,
    h: i32,
    w: i32,
    c: i32,
    oh: i32,
    ow: i32,
    k: i32,
    stride: i32,
    pad: i32,
}
unsafe impl DeviceRepr for PoolDims {}

#[repr(C)]
#[derive(Clone, Copy)]
struct AdamConsts {
    step_size: f32,
    bc2_sqrt: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    eps: f32,
    wd: f32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SgdConsts {
    lr: f32,
    momentum: f32,
    one_minus_dampening: f32,
    wd: f32,
    nesterov: i32,
    first: i32,
}

/// A kernel argument: the address of a value that outlives the launch call.
fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

impl Cuda {
    /// Opens GPU `ordinal`. Fails with one line when there is no driver, library or device.
    pub fn new(ordinal: usize, precision: Precision) -> Result<Self, String> {
        libs::load()?;
        // cudarc panics on some failures inside the libraries' loaders; report them as errors.
        // (The panic hook stays as it is: swapping the process's hook would race with other
        // threads; the libraries were loaded above, so such panics are rare.)
        let made = std::panic::catch_unwind(|| Self::open(ordinal, precision));
        match made {
            Ok(r) => r,
            Err(p) => Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "CUDA initialisation failed".into())),
        }
    }

    fn open(ordinal: usize, precision: Precision) -> Result<Self, String> {
        let count = CudaContext::device_count().map_err(|e| format!("CUDA driver: {e:?}"))?;
        if ordinal >= count.max(0) as usize {
            return Err(format!("no CUDA device {ordinal} (this machine has {count})"));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA device {ordinal}: {e:?}"))?;
        // One stream, used in order: cudarc's per-buffer event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| format!("CUDA stream: {e:?}"))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| format!("{e:?}"))?;
        let arch = format!("sm_{major}{minor}");
        let versions = || {
            format!(
                "NVRTC {}, driver's CUDA {}, {arch}",
                compile::nvrtc_version(),
                compile::driver_version()
            )
        };
        let cubin = compile::cubin(KERNELS, &arch)
            .map_err(|e| format!("NVRTC could not compile the kernels ({}): {e}", versions()))?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| format!("loading the kernels ({}): {e:?}", versions()))?;
        let f = |name: &str| module.load_function(name).map_err(|e| format!("kernel {name}: {e:?}"));
        let k = Kernels::load(f)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e:?}"))?;
        let handle = cudarc::cudnn::result::create_handle().map_err(|e| format!("cuDNN: {e:?}"))?;
        unsafe { cudarc::cudnn::result::set_stream(handle, stream.cu_stream() as _) }
            .map_err(|e| format!("cuDNN: {e:?}"))?;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| format!("{e:?}"))? as u32;
        let scratch = Scratch {
            partials: stream.alloc_zeros(1).map_err(|e| format!("{e:?}"))?,
            bn_sums: stream.alloc_zeros(1).map_err(|e| format!("{e:?}"))?,
            labels: stream.alloc_zeros(1).map_err(|e| format!("{e:?}"))?,
            items: stream.alloc_zeros(1).map_err(|e| format!("{e:?}"))?,
        };
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(Self {
            ctx,
            stream,
            blas,
            dnn: Dnn(handle),
            k,
            plans: Mutex::new(HashMap::new()),
            scratch: Mutex::new(scratch),
            precision,
            device_name,
            sms,
        })
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// Waits for all queued work (for timing).
    pub fn synchronize(&self) {
        self.stream.synchronize().expect("CUDA synchronize");
    }

    fn ptr<T>(&self, b: &CudaSlice<T>) -> u64 {
        b.device_ptr(&self.stream).0
    }

    /// The device address of `len` values at `at` in `b` (a parameter's gradient in the
    /// arena), checked against the buffer's length.
    fn window(&self, b: &CudaSlice<f32>, at: usize, len: usize) -> u64 {
        assert!(at + len <= b.len(), "window {at}+{len} beyond a buffer of {}", b.len());
        self.ptr(b) + 4 * at as u64
    }

    /// The device address of `b`, checked to hold `len` values: the CPU backend panics on a
    /// short slice, where a kernel would write past the buffer and fault later, far from the
    /// cause.
    fn ptr_n(&self, b: &CudaSlice<f32>, len: usize, what: &str) -> u64 {
        assert!(
            len <= b.len(),
            "{what}: {len} values needed, the buffer holds {}",
            b.len()
        );
        self.ptr(b)
    }

    /// A convolution's input, weights and workspace, each checked against what `g` needs
    /// (the workspace against its plan): their addresses and the workspace's bytes.
    fn conv_operands(
        &self,
        g: &ConvGeom,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        ws: &CudaSlice<f32>,
    ) -> (u64, u64, u64, usize) {
        let ws_bytes = ws.len() * 4;
        let needed = self.plan(g, |p| p.workspace_bytes);
        assert!(
            needed <= ws_bytes,
            "conv workspace: {needed} bytes needed, {ws_bytes} given"
        );
        let xp = self.ptr_n(x, g.input.numel(), "conv x");
        (xp, self.ptr_n(w, g.weight_len(), "conv w"), self.ptr(ws), ws_bytes)
    }

    fn opt_ptr(&self, b: Option<&CudaSlice<f32>>) -> u64 {
        b.map_or(0, |b| self.ptr(b))
    }

    /// Makes the backend's context current on the calling thread (the driver keeps one per
    /// thread; callers of a shared backend, such as tests, come from several threads).
    fn bind(&self) {
        self.ctx
            .bind_to_thread()
            .unwrap_or_else(|e| panic!("CUDA context: {e:?}"));
    }

    fn launch(&self, f: &CudaFunction, grid: (u32, u32), block: (u32, u32), args: &mut [*mut c_void]) {
        self.bind();
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                (grid.0.max(1), grid.1.max(1), 1),
                (block.0, block.1, 1),
                0,
                self.stream.cu_stream(),
                args,
            )
        }
        .unwrap_or_else(|e| panic!("CUDA kernel launch: {e:?}"));
    }

    /// Grid for a grid-stride loop over `n` elements.
    fn grid(&self, n: usize) -> (u32, u32) {
        let blocks = n.div_ceil(BLOCK as usize).min(self.sms as usize * 16);
        (blocks as u32, 1)
    }

    fn elementwise(&self, f: &CudaFunction, n: usize, args: &mut [*mut c_void]) {
        self.launch(f, self.grid(n), (BLOCK, 1), args);
    }

    fn plan<R>(&self, g: &ConvGeom, f: impl FnOnce(&ConvPlan) -> R) -> R {
        self.bind();
        let mut plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        let plan = plans
            .entry(*g)
            .or_insert_with(|| ConvPlan::new(&self.dnn, g, self.precision == Precision::Tf32));
        f(plan)
    }

    /// Row slices for a batch-norm reduction over `rows`, and the scratch holding their
    /// partial sums (two arrays of `parts * c` values).
    fn bn_parts(&self, rows: usize, c: usize) -> (usize, std::sync::MutexGuard<'_, Scratch>) {
        let parts = rows.div_ceil(BN_MIN_ROWS_PER_PART).clamp(1, BN_MAX_PARTS);
        let mut s = self.scratch.lock().unwrap_or_else(PoisonError::into_inner);
        if s.partials.len() < 2 * parts * c {
            s.partials = self.stream.alloc_zeros(2 * parts * c).expect("CUDA alloc");
        }
        (parts, s)
    }

    /// Per-channel sums on the host of the `parts x c` partial sums at `at` in `partials` (a
    /// synchronised batch norm sends them to the other ranks).
    fn host_column_sums(&self, partials: &CudaSlice<f64>, at: usize, parts: usize, c: usize) -> Vec<f64> {
        let mut host = vec![0f64; parts * c];
        self.stream
            .memcpy_dtoh(&partials.slice(at..at + parts * c), &mut host)
            .expect("CUDA download");
        self.synchronize();
        let mut sums = vec![0f64; c];
        for row in host.chunks_exact(c) {
            for (t, v) in sums.iter_mut().zip(row) {
                *t += v;
            }
        }
        sums
    }

    /// Replaces the partial sums by the ranks' totals (`sums`, one part), for the kernels that
    /// finish a reduction.
    fn upload_totals(&self, sums: &[f64], partials: &mut CudaSlice<f64>) {
        self.stream
            .memcpy_htod(sums, &mut partials.slice_mut(..sums.len()))
            .expect("CUDA upload");
    }

    fn channel_grid(c: usize) -> (u32, u32) {
        (c.div_ceil(BLOCK as usize) as u32, 1)
    }

    /// C[m, n] (column-major) = op(A) op(B), cuBLAS's sgemm with beta 0 or 1: `(ta, tb)`
    /// whether A and B are transposed, `(m, n, k)`, each matrix as (address, leading
    /// dimension).
    fn sgemm(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, lda): (u64, usize),
        (b, ldb): (u64, usize),
        beta: f32,
        (c, ldc): (u64, usize),
    ) {
        self.bind();
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let alpha = 1f32;
        unsafe {
            blas::sgemm(
                *self.blas.handle(),
                op(ta),
                op(tb),
                m as i32,
                n as i32,
                k as i32,
                &alpha,
                a as *const f32,
                lda as i32,
                b as *const f32,
                ldb as i32,
                &beta,
                c as *mut f32,
                ldc as i32,
            )
        }
        .unwrap_or_else(|e| panic!("cuBLAS sgemm: {e:?}"));
    }

    /// y = relu?((x - mean) * scale + beta + residual?), with `stats` = (mean, invstd, false)
    /// from a training pass or (running_mean, running_var, true) for evaluation, and the
    /// affine's `(eps, gamma, beta)`.
    fn bn_apply(
        &self,
        s: &Shape4,
        x: &CudaSlice<f32>,
        stats: (u64, u64, bool),
        (eps, gamma, beta): (f32, &CudaSlice<f32>, &CudaSlice<f32>),
        then: Epilogue<'_, CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) {
        let Epilogue { residual, relu } = then;
        let (rows, c) = (s.rows() as i64, s.c as i32);
        let (mean, stat, eval) = (stats.0, stats.1, stats.2 as i32);
        let relu = relu as i32;
        let (xp, gp, bp, resp, yp) = (
            self.ptr(x),
            self.ptr(gamma),
            self.ptr(beta),
            self.opt_ptr(residual),
            self.ptr(y),
        );
        self.elementwise(
            &self.k.bn_apply,
            s.numel(),
            &mut [
                arg(&xp),
                arg(&rows),
                arg(&c),
                arg(&mean),
                arg(&stat),
                arg(&eval),
                arg(&eps),
                arg(&gp),
                arg(&bp),
                arg(&resp),
                arg(&relu),
                arg(&yp),
            ],
        );
    }

    fn pool_dims(g: &PoolGeom) -> PoolDims {
        let (s, o) = (g.input, g.output());
        PoolDims {
            n: s.n as i32,
            h: s.h as i32,
            w: s.w as i32,
            c: s.c as i32,
            oh: o.h as i32,
            ow: o.w as i32,
            k: g.k as i32,
            stride: g.stride as i32,
            pad: g.pad as i32,
        }
    }
}

impl BatchOps for Cuda {
    type Pixels = CudaSlice<u8>;
    fn upload_pixels(&self, bytes: &[u8]) -> Option<CudaSlice<u8>> {
        let pixels = self
            .stream
            .clone_htod(bytes)
            .unwrap_or_else(|e| panic!("CUDA: uploading {} bytes of images: {e:?}", bytes.len()));
        Some(pixels)
    }
    fn crop_flip(&self, pixels: &CudaSlice<u8>, plan: &CropPlan, x: &mut CudaSlice<f32>) {
        let n = plan.items.len();
        let mut s = self.scratch.lock().unwrap_or_else(PoisonError::into_inner);
        if s.items.len() < 4 * n {
            s.items = self.stream.alloc_zeros(4 * n).expect("CUDA alloc");
        }
        let flat: Vec<u32> = plan.items.iter().flatten().copied().collect();
        self.stream
            .memcpy_htod(&flat, &mut s.items.slice_mut(..4 * n))
            .expect("CUDA upload");
        let (pp, ip, xp) = (self.ptr(pixels), self.ptr(&s.items), self.ptr(x));
        let (ni, side, pad, reflect) = (n as i32, plan.side as i32, plan.pad as i32, plan.reflect as i32);
        let (m, sd) = (plan.mean, plan.std);
        self.elementwise(
            &self.k.augment,
            plan.output_len(),
            &mut [
                arg(&pp),
                arg(&ip),
                arg(&ni),
                arg(&side),
                arg(&pad),
                arg(&reflect),
                arg(&m[0]),
                arg(&m[1]),
                arg(&m[2]),
                arg(&sd[0]),
                arg(&sd[1]),
                arg(&sd[2]),
                arg(&xp),
            ],
        );
    }
}

impl Memory for Cuda {
    type Buf = CudaSlice<f32>;

    fn name(&self) -> String {
        let p = match self.precision {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32 convolutions",
        };
        format!("cuda:{} ({}, {p})", self.ctx.ordinal(), self.device_name)
    }
    fn precision(&self) -> &'static str {
        self.precision.name()
    }
    fn alloc(&self, len: usize) -> CudaSlice<f32> {
        // Zero-length allocations are not allowed by the driver.
        self.stream
            .alloc_zeros(len.max(1))
            .unwrap_or_else(|e| panic!("CUDA out of memory allocating {len} floats: {e:?}"))
    }
    fn buf_len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn upload(&self, src: &[f32], dst: &mut CudaSlice<f32>) {
        if src.is_empty() {
            return;
        }
        self.stream
            .memcpy_htod(src, &mut dst.slice_mut(..src.len()))
            .expect("CUDA upload");
    }
    fn download(&self, src: &CudaSlice<f32>, dst: &mut [f32]) {
        if dst.is_empty() {
            return;
        }
        self.stream
            .memcpy_dtoh(&src.slice(..dst.len()), dst)
            .expect("CUDA download");
        self.synchronize();
    }
    fn fill(&self, buf: &mut CudaSlice<f32>, len: usize, value: f32) {
        let (p, n) = (self.ptr(buf), len as i64);
        self.elementwise(&self.k.fill, len, &mut [arg(&p), arg(&n), arg(&value)]);
    }
}

impl ConvOps for Cuda {
    fn conv_weight_layout(&self) -> Layout {
        Layout::ConvOhwi
    }
    type ConvPlan = LayerPlan;
    fn conv2d_plan(&self, _g: &ConvGeom) -> LayerPlan {
        LayerPlan {
            tf32: self.precision == Precision::Tf32,
        }
    }
    fn conv2d_workspace_len(&self, g: &ConvGeom, _plan: &LayerPlan) -> usize {
        self.plan(g, |p| p.workspace_bytes.div_ceil(4))
    }
    fn conv2d_forward(&self, c: ConvOp<'_, Self>, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, ws: &mut CudaSlice<f32>) {
        let (g, w) = (c.g, c.w);
        let (xp, wp, wsp, ws_bytes) = self.conv_operands(g, x, w, ws);
        let yp = self.ptr_n(y, g.output().numel(), "conv y");
        self.plan(g, |p| p.forward(&self.dnn, xp, wp, yp, wsp, ws_bytes));
    }
    fn conv2d_backward(
        &self,
        c: ConvOp<'_, Self>,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: Option<&mut CudaSlice<f32>>,
        dw: GradSlots<'_, CudaSlice<f32>>,
        ws: &mut CudaSlice<f32>,
    ) {
        let (g, w) = (c.g, c.w);
        let GradSlots {
            arena: grads,
            weight: dw_at,
            ..
        } = dw;
        let dwp = self.window(grads, dw_at, g.weight_len());
        let (xp, wp, wsp, ws_bytes) = self.conv_operands(g, x, w, ws);
        let dyp = self.ptr_n(dy, g.output().numel(), "conv dy");
        let dxp = dx.map(|d| self.ptr_n(d, g.input.numel(), "conv dx"));
        self.plan(g, |p| {
            p.backward_filter(&self.dnn, xp, dyp, dwp, wsp, ws_bytes);
            if let Some(dxp) = dxp {
                p.backward_data(&self.dnn, wp, dyp, dxp, wsp, ws_bytes);
            }
        });
    }
}

impl NormOps for Cuda {
    fn batch_norm_forward_train(
        &self,
        s: &Shape4,
        x: &CudaSlice<f32>,
        bn: BatchNormTrain<'_, CudaSlice<f32>>,
        then: Epilogue<'_, CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) {
        let BatchNormTrain {
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
            saved,
            sync,
        } = bn;
        let Epilogue { residual, relu } = then;
        let (rows, c) = (s.rows() as i64, s.c as i32);
        for (b, what) in [
            (gamma, "bn gamma"),
            (beta, "bn beta"),
            (&*running_mean, "bn mean"),
            (&*running_var, "bn var"),
        ] {
            self.ptr_n(b, s.c, what);
        }
        self.ptr_n(y, s.numel(), "bn y");
        if let Some(r) = residual {
            self.ptr_n(r, s.numel(), "bn residual");
        }
        let (parts, mut scratch) = self.bn_parts(s.rows(), s.c);
        let partial = self.ptr(&scratch.partials);
        let (xp, sp) = (self.ptr_n(x, s.numel(), "bn x"), self.ptr_n(saved, 2 * s.c, "bn saved"));
        let red_grid = (s.c.div_ceil(32) as u32, parts as u32);
        let null = 0u64;
        // Synchronised, each reduction's partial sums become the ranks' totals (one part).
        let mut parts_i = parts as i32;
        let mut count = rows as f64;
        // Mean, then the sum of squared deviations from it (two passes: no cancellation).
        self.launch(
            &self.k.bn_partial_sums,
            red_grid,
            (32, 8),
            &mut [arg(&xp), arg(&rows), arg(&c), arg(&null), arg(&partial)],
        );
        if let Some(sum) = sync {
            let mut sums = self.host_column_sums(&scratch.partials, 0, parts, s.c);
            sums.push(count);
            sum(&mut sums);
            count = sums[s.c];
            self.upload_totals(&sums[..s.c], &mut scratch.partials);
            parts_i = 1;
        }
        self.launch(
            &self.k.partial_column_sums,
            Self::channel_grid(s.c),
            (BLOCK, 1),
            &mut [arg(&partial), arg(&parts_i), arg(&c), arg(&count), arg(&sp)],
        );
        parts_i = parts as i32;
        self.launch(
            &self.k.bn_partial_sums,
            red_grid,
            (32, 8),
            &mut [arg(&xp), arg(&rows), arg(&c), arg(&sp), arg(&partial)],
        );
        if let Some(sum) = sync {
            let mut sq = self.host_column_sums(&scratch.partials, 0, parts, s.c);
            sum(&mut sq);
            self.upload_totals(&sq, &mut scratch.partials);
            parts_i = 1;
        }
        let count_rows = count as i64;
        let (rm, rv) = (self.ptr(running_mean), self.ptr(running_var));
        self.launch(
            &self.k.bn_var,
            Self::channel_grid(s.c),
            (BLOCK, 1),
            &mut [
                arg(&partial),
                arg(&parts_i),
                arg(&count_rows),
                arg(&c),
                arg(&eps),
                arg(&momentum),
                arg(&sp),
                arg(&rm),
                arg(&rv),
            ],
        );
        drop(scratch);
        let invstd = sp + 4 * s.c as u64;
        self.bn_apply(
            s,
            x,
            (sp, invstd, false),
            (eps, gamma, beta),
            Epilogue { residual, relu },
            y,
        );
    }
    fn batch_norm_forward_eval(
        &self,
        s: &Shape4,
        x: &CudaSlice<f32>,
        bn: &BatchNormEval<'_, CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) {
        let &BatchNormEval {
            gamma,
            beta,
            running_mean,
            running_var,
            eps,
            residual,
            relu,
        } = bn;
        let stats = (self.ptr(running_mean), self.ptr(running_var), true);
        self.bn_apply(s, x, stats, (eps, gamma, beta), Epilogue { residual, relu }, y);
    }
    fn batch_norm_backward(
        &self,
        s: &Shape4,
        x: &CudaSlice<f32>,
        bn: BatchNormSaved<'_, CudaSlice<f32>>,
        dy: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: GradSlots<'_, CudaSlice<f32>>,
    ) {
        let BatchNormSaved {
            gamma,
            saved,
            relu_out,
            sync,
        } = bn;
        let (dgamma_at, dbeta_at) = grads.offsets();
        let grads = grads.arena;
        let (rows, c) = (s.rows() as i64, s.c as i32);
        let (parts, mut scratch) = self.bn_parts(s.rows(), s.c);
        let psum = self.ptr(&scratch.partials);
        let pdot = psum + 8 * (parts * s.c) as u64;
        let (xp, dyp, rp, sp) = (self.ptr(x), self.ptr(dy), self.opt_ptr(relu_out), self.ptr(saved));
        self.launch(
            &self.k.bn_backward_sums,
            (s.c.div_ceil(32) as u32, parts as u32),
            (32, 8),
            &mut [
                arg(&xp),
                arg(&dyp),
                arg(&rp),
                arg(&rows),
                arg(&c),
                arg(&sp),
                arg(&psum),
                arg(&pdot),
            ],
        );
        let parts_i = parts as i32;
        let (dgp, dbp) = (self.window(grads, dgamma_at, s.c), self.window(grads, dbeta_at, s.c));
        self.launch(
            &self.k.bn_backward_finalize,
            Self::channel_grid(s.c),
            (BLOCK, 1),
            &mut [arg(&psum), arg(&pdot), arg(&parts_i), arg(&c), arg(&dgp), arg(&dbp)],
        );
        // dx reads the sums over the rows it normalised with: this rank's (the parameters'
        // gradients), or, synchronised, the whole batch's.
        let (mut dot_p, mut sum_p, mut count) = (dgp, dbp, rows as f64);
        if let Some(sum) = sync {
            let mut all = [
                self.host_column_sums(&scratch.partials, 0, parts, s.c),
                self.host_column_sums(&scratch.partials, parts * s.c, parts, s.c),
                vec![count],
            ]
            .concat();
            sum(&mut all);
            count = all[2 * s.c];
            let totals: Vec<f32> = all[..2 * s.c].iter().map(|&v| v as f32).collect();
            if scratch.bn_sums.len() < totals.len() {
                scratch.bn_sums = self.stream.alloc_zeros(totals.len()).expect("CUDA alloc");
            }
            self.stream
                .memcpy_htod(&totals, &mut scratch.bn_sums.slice_mut(..totals.len()))
                .expect("CUDA upload");
            sum_p = self.ptr(&scratch.bn_sums);
            dot_p = sum_p + 4 * s.c as u64;
        }
        let (gp, dxp) = (self.ptr(gamma), self.ptr(dx));
        self.elementwise(
            &self.k.bn_backward_dx,
            s.numel(),
            &mut [
                arg(&xp),
                arg(&dyp),
                arg(&rows),
                arg(&c),
                arg(&count),
                arg(&sp),
                arg(&gp),
                arg(&dot_p),
                arg(&sum_p),
                arg(&dxp),
            ],
        );
        drop(scratch);
    }
}

impl PointwiseOps for Cuda {
    fn bias_add(&self, rows: usize, c: usize, bias: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        let (bp, yp) = (self.ptr_n(bias, c, "bias"), self.ptr_n(y, rows * c, "bias_add y"));
        let (r, ci) = (rows as i64, c as i32);
        self.elementwise(&self.k.bias_add, rows * c, &mut [arg(&bp), arg(&r), arg(&ci), arg(&yp)]);
    }
    fn bias_grad(&self, rows: usize, c: usize, dy: &CudaSlice<f32>, grads: &mut CudaSlice<f32>, db_at: usize) {
        let (parts, scratch) = self.bn_parts(rows, c);
        let partial = self.ptr(&scratch.partials);
        let dbp = self.window(grads, db_at, c);
        let (dyp, r, ci, null, one) = (
            self.ptr_n(dy, rows * c, "bias_grad dy"),
            rows as i64,
            c as i32,
            0u64,
            1f64,
        );
        self.launch(
            &self.k.bn_partial_sums,
            (c.div_ceil(32) as u32, parts as u32),
            (32, 8),
            &mut [arg(&dyp), arg(&r), arg(&ci), arg(&null), arg(&partial)],
        );
        let parts_i = parts as i32;
        self.launch(
            &self.k.partial_column_sums,
            Self::channel_grid(c),
            (BLOCK, 1),
            &mut [arg(&partial), arg(&parts_i), arg(&ci), arg(&one), arg(&dbp)],
        );
    }
    fn relu_forward(&self, len: usize, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        let (xp, yp, n) = (self.ptr_n(x, len, "relu x"), self.ptr_n(y, len, "relu y"), len as i64);
        self.elementwise(&self.k.relu_forward, len, &mut [arg(&xp), arg(&n), arg(&yp)]);
    }
    fn relu_backward(&self, len: usize, y: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) {
        let (yp, dyp) = (self.ptr_n(y, len, "relu y"), self.ptr_n(dy, len, "relu dy"));
        let (dxp, n) = (self.ptr_n(dx, len, "relu dx"), len as i64);
        self.elementwise(
            &self.k.relu_backward,
            len,
            &mut [arg(&yp), arg(&dyp), arg(&n), arg(&dxp)],
        );
    }
    fn gelu_forward(&self, len: usize, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        let (xp, yp, n) = (self.ptr_n(x, len, "gelu x"), self.ptr_n(y, len, "gelu y"), len as i64);
        self.elementwise(&self.k.gelu_forward, len, &mut [arg(&xp), arg(&n), arg(&yp)]);
    }
    fn gelu_backward(&self, len: usize, x: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) {
        let (xp, dyp) = (self.ptr_n(x, len, "gelu x"), self.ptr_n(dy, len, "gelu dy"));
        let (dxp, n) = (self.ptr_n(dx, len, "gelu dx"), len as i64);
        self.elementwise(
            &self.k.gelu_backward,
            len,
            &mut [arg(&xp), arg(&dyp), arg(&n), arg(&dxp)],
        );
    }
    fn scale(&self, len: usize, alpha: f32, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        let (xp, yp, n) = (self.ptr_n(x, len, "scale x"), self.ptr_n(y, len, "scale y"), len as i64);
        self.elementwise(&self.k.scale, len, &mut [arg(&xp), arg(&alpha), arg(&n), arg(&yp)]);
    }
    fn lerp(&self, len: usize, weight: f32, end: &CudaSlice<f32>, x: &mut CudaSlice<f32>) {
        let (ep, xp, n) = (
            self.ptr_n(end, len, "lerp end"),
            self.ptr_n(x, len, "lerp x"),
            len as i64,
        );
        self.elementwise(&self.k.lerp, len, &mut [arg(&ep), arg(&weight), arg(&n), arg(&xp)]);
    }
    fn add_assign(&self, len: usize, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) {
        let (sp, dp, n) = (
            self.ptr_n(src, len, "add src"),
            self.ptr_n(dst, len, "add dst"),
            len as i64,
        );
        self.elementwise(&self.k.add_assign, len, &mut [arg(&sp), arg(&dp), arg(&n)]);
    }
}

impl PoolOps for Cuda {
    fn max_pool_forward(&self, g: &PoolGeom, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        let d = Self::pool_dims(g);
        let (xp, yp) = (self.ptr(x), self.ptr(y));
        self.elementwise(
            &self.k.max_pool_forward,
            g.output().numel(),
            &mut [arg(&xp), arg(&d), arg(&yp)],
        );
    }
    fn max_pool_backward(
        &self,
        g: &PoolGeom,
        x: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) {
        let d = Self::pool_dims(g);
        let (xp, yp, dyp, dxp) = (self.ptr(x), self.ptr(y), self.ptr(dy), self.ptr(dx));
        self.elementwise(
            &self.k.max_pool_backward,
            g.input.numel(),
            &mut [arg(&xp), arg(&yp), arg(&dyp), arg(&d), arg(&dxp)],
        );
    }
    fn global_avg_pool_forward(&self, s: &Shape4, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        let (n, hw, c) = (s.n as i32, (s.h * s.w) as i32, s.c as i32);
        let (xp, yp) = (self.ptr_n(x, s.numel(), "pool x"), self.ptr_n(y, s.n * s.c, "pool y"));
        self.elementwise(
            &self.k.gap_forward,
            s.n * s.c,
            &mut [arg(&xp), arg(&n), arg(&hw), arg(&c), arg(&yp)],
        );
    }
    fn global_avg_pool_backward(&self, s: &Shape4, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) {
        let (n, hw, c) = (s.n as i32, (s.h * s.w) as i32, s.c as i32);
        let (dyp, dxp) = (
            self.ptr_n(dy, s.n * s.c, "pool dy"),
            self.ptr_n(dx, s.numel(), "pool dx"),
        );
        self.elementwise(
            &self.k.gap_backward,
            s.numel(),
            &mut [arg(&dyp), arg(&n), arg(&hw), arg(&c), arg(&dxp)],
        );
    }
}

impl LinearOps for Cuda {
    fn linear_forward(
        &self,
        d: LinearDims,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) {
        let LinearDims { n, din, dout } = d;
        match b {
            Some(b) => {
                let (bp, yp) = (self.ptr(b), self.ptr(y));
                let (ni, di) = (n as i32, dout as i32);
                self.elementwise(
                    &self.k.broadcast_rows,
                    n * dout,
                    &mut [arg(&bp), arg(&ni), arg(&di), arg(&yp)],
                );
            }
            None => self.fill(y, n * dout, 0.0),
        }
        let (xp, wp, yp) = (self.ptr(x), self.ptr(w), self.ptr(y));
        // Column-major view: y^T[dout, n] += w[dout, din] x^T[din, n].
        self.sgemm((true, false), (dout, n, din), (wp, din), (xp, din), 1.0, (yp, dout));
    }
    fn linear_backward(
        &self,
        d: LinearDims,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: GradSlots<'_, CudaSlice<f32>>,
    ) {
        let LinearDims { n, din, dout } = d;
        let (dw_at, db_at) = (grads.weight, grads.bias);
        let grads = grads.arena;
        let (xp, wp, dyp) = (self.ptr(x), self.ptr(w), self.ptr(dy));
        let (dxp, dwp) = (self.ptr(dx), self.window(grads, dw_at, din * dout));
        // dw^T[din, dout] = x^T[din, n] dy[n, dout]
        self.sgemm((false, true), (din, dout, n), (xp, din), (dyp, dout), 0.0, (dwp, din));
        // dx^T[din, n] = w^T[din, dout] dy^T[dout, n]
        self.sgemm((false, false), (din, n, dout), (wp, din), (dyp, dout), 0.0, (dxp, din));
        if let Some(db_at) = db_at {
            let dbp = self.window(grads, db_at, dout);
            let (ni, di) = (n as i32, dout as i32);
            self.launch(
                &self.k.column_sums,
                Self::channel_grid(dout),
                (BLOCK, 1),
                &mut [arg(&dyp), arg(&ni), arg(&di), arg(&dbp)],
            );
        }
    }
}

impl LossOps for Cuda {
    fn cross_entropy(
        &self,
        logits: &CudaSlice<f32>,
        t: &Targets,
        loss: &mut CudaSlice<f32>,
        dlogits: &mut CudaSlice<f32>,
    ) {
        let (n, classes, labels, label_smoothing) = (t.labels.len(), t.classes, t.labels, t.label_smoothing);
        let mut s = self.scratch.lock().unwrap_or_else(PoisonError::into_inner);
        if s.labels.len() < n {
            s.labels = self.stream.alloc_zeros(n).expect("CUDA alloc");
        }
        let host: Vec<i32> = labels[..n].iter().map(|&l| l as i32).collect();
        self.stream
            .memcpy_htod(&host, &mut s.labels.slice_mut(..n))
            .expect("CUDA upload");
        let (zp, lp, lossp, dp) = (self.ptr(logits), self.ptr(&s.labels), self.ptr(loss), self.ptr(dlogits));
        let (ni, ci) = (n as i32, classes as i32);
        self.launch(
            &self.k.cross_entropy,
            (1, 1),
            (256, 1),
            &mut [
                arg(&zp),
                arg(&lp),
                arg(&ni),
                arg(&ci),
                arg(&label_smoothing),
                arg(&lossp),
                arg(&dp),
            ],
        );
    }

    fn watch_loss(&self, loss: &CudaSlice<f32>, step: u64, watch: &mut CudaSlice<f32>) {
        let (lp, wp, s) = (self.ptr(loss), self.ptr(watch), step as f32);
        self.launch(&self.k.watch_loss, (1, 1), (1, 1), &mut [arg(&lp), arg(&s), arg(&wp)]);
    }
}

impl OptimOps for Cuda {
    fn adam_step(
        &self,
        h: &AdamStep,
        p: ParamStep<'_, CudaSlice<f32>>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
    ) {
        let ParamStep {
            len,
            param,
            grads,
            grad_at,
        } = p;
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2 = 1.0 - h.beta2.powi(h.step as i32);
        let k = AdamConsts {
            step_size: (h.lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            one_minus_b1: (1.0 - h.beta1) as f32,
            b2: h.beta2 as f32,
            one_minus_b2: (1.0 - h.beta2) as f32,
            eps: h.eps as f32,
            wd: h.weight_decay as f32,
        };
        let gp = self.window(grads, grad_at, len);
        let (pp, mp, vp, n) = (self.ptr(param), self.ptr(m), self.ptr(v), len as i64);
        self.elementwise(
            &self.k.adam,
            len,
            &mut [arg(&pp), arg(&gp), arg(&mp), arg(&vp), arg(&n), arg(&k)],
        );
    }
    fn sgd_step(&self, h: &SgdStep, p: ParamStep<'_, CudaSlice<f32>>, buf: &mut CudaSlice<f32>) {
        let ParamStep {
            len,
            param,
            grads,
            grad_at,
        } = p;
        let k = SgdConsts {
            lr: h.lr as f32,
            momentum: h.momentum as f32,
            one_minus_dampening: (1.0 - h.dampening) as f32,
            wd: h.weight_decay as f32,
            nesterov: h.nesterov as i32,
            first: h.first as i32,
        };
        let gp = self.window(grads, grad_at, len);
        let (pp, bp, n) = (self.ptr(param), self.ptr(buf), len as i64);
        self.elementwise(&self.k.sgd, len, &mut [arg(&pp), arg(&gp), arg(&bp), arg(&n), arg(&k)]);
    }
}

/// cuDNN has no fused convolution and batch norm of ours: the default bodies.
impl FusedOps for Cuda {}

#[cfg(test)]
mod tests {
    /// The kernel source compiles (needs only NVRTC, no GPU; skipped without it).
    #[test]
    fn kernels_compile_with_nvrtc() {
        if let Err(e) = super::libs::load_nvrtc() {
            return crate::test_support::skip("nvrtc", "compiling the CUDA kernels", &e);
        }
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some("compute_90"),
            ..Default::default()
        };
        let ptx = match cudarc::nvrtc::compile_ptx_with_opts(super::KERNELS, opts) {
            Ok(ptx) => ptx.to_src(),
            Err(e) => panic!("kernels.cu does not compile: {e:?}"),
        };
        // Every kernel the backend loads is an entry point of the module, and every entry
        // point is loaded (a misspelt name would otherwise fail only on a GPU).
        let entries: std::collections::BTreeSet<&str> = ptx
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".visible .entry ")?.split('(').next())
            .collect();
        let loaded: std::collections::BTreeSet<&str> = super::Kernels::NAMES.iter().copied().collect();
        assert_eq!(loaded, entries);
    }

    /// What the backend loads: machine code for a real GPU (`sm_90`, an H100/H200), an ELF
    /// image the driver takes as is, with every kernel's symbol in it.
    #[test]
    fn kernels_compile_to_a_cubin() {
        if let Err(e) = super::libs::load_nvrtc() {
            return crate::test_support::skip("nvrtc", "compiling the CUDA kernels", &e);
        }
        let code = super::compile::cubin(super::KERNELS, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&code[..4], b"\x7fELF", "a CUBIN is an ELF image");
        for name in super::Kernels::NAMES {
            let found = code
                .windows(name.len() + 1)
                .any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0);
            assert!(found, "kernel {name} not in the CUBIN");
        }
        eprintln!(
            "NVRTC {}: {} bytes of sm_90 code",
            super::compile::nvrtc_version(),
            code.len()
        );
    }
}
