//! Matrix multiply through the `gemm` crate, with bounds checked once at the boundary so the
//! kernels above it stay safe code; or, with bf16 operands, through [`super::bf16`].

use super::bf16::Kernel;
use gemm::Parallelism;

/// What the convolutions' and the linear layer's matrix multiplies take: f32 values, or
/// values rounded to bf16 (PyTorch's CPU autocast; sums stay f32 either way) multiplied by
/// the given kernel. A property of the backend value ([`super::Cpu`]), handed to each product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operands {
    F32,
    Bf16(Kernel),
}

impl Operands {
    pub fn is_bf16(self) -> bool {
        matches!(self, Operands::Bf16(_))
    }
}

/// A strided, read-only matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major, row i starting at `i * stride` (packed rows: the stride is the column
    /// count; a larger one reads a block of columns out of a wider matrix).
    pub fn rows(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            rs: stride,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix whose rows are `stride` apart.
    pub fn transposed(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: stride,
        }
    }
    pub(super) fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(
            last < self.data.len(),
            "gemm: {what} view [{rows}x{cols}] exceeds its buffer"
        );
    }
}

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// A product's sizes: `(m, n, k)` for `[m, k] x [k, n]`.
pub type Dims = (usize, usize, usize);

/// Where a product's `m x n` result goes: `data`'s rows, `rs` values apart, overwritten or
/// (`add`) added to.
pub struct Out<'a> {
    pub data: &'a mut [f32],
    pub rs: usize,
    pub add: bool,
}

impl<'a> Out<'a> {
    /// Rows `rs` apart in `data`, overwritten.
    pub fn new(data: &'a mut [f32], rs: usize) -> Self {
        Self { data, rs, add: false }
    }

    /// Rows `rs` apart in `data`, added to where `add`.
    pub fn adding(data: &'a mut [f32], rs: usize, add: bool) -> Self {
        Self { data, rs, add }
    }
}

/// `out[m, n] = a[m, k] * b[k, n]` (`+ out` with `out.add`), on every thread of the pool,
/// with `ops` operands.
pub fn matmul(ops: Operands, dims: Dims, a: Mat, b: Mat, out: Out) {
    multiply(true, ops, dims, a, b, out)
}

/// [`matmul`] on the calling thread alone: for many independent products run side by side.
pub fn matmul_serial(ops: Operands, dims: Dims, a: Mat, b: Mat, out: Out) {
    multiply(false, ops, dims, a, b, out)
}

fn multiply(parallel: bool, ops: Operands, dims: Dims, a: Mat, b: Mat, mut out: Out) {
    let (m, n, k) = dims;
    if !dst_needs_product(dims, &mut out) {
        return;
    }
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    match ops {
        Operands::F32 => {
            let parallelism = if parallel { parallelism() } else { Parallelism::None };
            f32_product(parallelism, dims, a, b, out)
        }
        Operands::Bf16(kernel) => super::bf16::matmul(kernel, parallel, dims, a, b, out),
    }
}

/// Checks the destination view `[m, n]` against its buffer and settles the products with
/// nothing to sum (k = 0: zeros, unless adding); whether a product remains.
pub(super) fn dst_needs_product((m, n, k): Dims, out: &mut Out) -> bool {
    if m == 0 || n == 0 {
        return false;
    }
    assert!(n <= out.rs || m == 1, "gemm: dst row stride smaller than its width");
    assert!(
        (m - 1) * out.rs + n <= out.data.len(),
        "gemm: dst view exceeds its buffer"
    );
    if k == 0 {
        if !out.add {
            for row in out.data.chunks_mut(out.rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return false;
    }
    true
}

/// The gemm crate's f32 product of views checked by the caller.
fn f32_product(parallelism: Parallelism, (m, n, k): Dims, a: Mat, b: Mat, out: Out) {
    let Out {
        data: dst,
        rs: dst_rs,
        add: accumulate,
    } = out;
    // SAFETY: every view was checked against its slice by the caller; dst does not alias a or b
    // (it is a unique &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Right-hand sides shared by many products: `count` row-major `k x n` matrices, one after
/// another in `data` (Winograd's transformed filters, one per tile position, used by every
/// chunk of images). With bf16 operands they are packed once here instead of once a product.
pub struct SharedRhs<'a> {
    ops: Operands,
    k: usize,
    n: usize,
    data: &'a [f32],
    /// bf16: every matrix packed, `bf16::packed_len(k, n)` values each; kept between calls
    /// in a per-thread buffer (taken here, given back on drop).
    packed: Vec<u32>,
}

thread_local! {
    static SHARED_PACKED: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<'a> SharedRhs<'a> {
    pub fn new(ops: Operands, count: usize, k: usize, n: usize, data: &'a [f32]) -> Self {
        let data = &data[..count * k * n];
        let mut packed = Vec::new();
        if let Operands::Bf16(kernel) = ops {
            use rayon::prelude::*;
            let each = super::bf16::packed_len(k, n);
            packed = SHARED_PACKED.with(|b| std::mem::take(&mut *b.borrow_mut()));
            packed.resize(count * each, 0);
            packed.par_chunks_mut(each.max(1)).enumerate().for_each(|(i, out)| {
                super::bf16::PackedB::pack(
                    kernel,
                    false,
                    k,
                    n,
                    Mat::rows(&data[i * k * n..(i + 1) * k * n], n),
                    out,
                );
            });
        }
        Self {
            ops,
            k,
            n,
            data,
            packed,
        }
    }

    /// `out[m, n] = a[m, k] rhs_i[k, n]` (`+ out` with `out.add`), on the calling thread.
    pub fn matmul_serial(&self, i: usize, m: usize, a: Mat, out: Out) {
        let (k, n) = (self.k, self.n);
        match self.ops {
            Operands::F32 => {
                let b = Mat::rows(&self.data[i * k * n..(i + 1) * k * n], n);
                multiply(false, Operands::F32, (m, n, k), a, b, out)
            }
            Operands::Bf16(kernel) => {
                let each = super::bf16::packed_len(k, n);
                let packed = super::bf16::PackedB::view(kernel, k, n, &self.packed[i * each..(i + 1) * each]);
                super::bf16::matmul_packed(false, m, super::bf16::Lhs::Mat(a), &packed, out)
            }
        }
    }
}

impl Drop for SharedRhs<'_> {
    fn drop(&mut self) {
        let packed = std::mem::take(&mut self.packed);
        if packed.capacity() > 0 {
            SHARED_PACKED.with(|b| *b.borrow_mut() = packed);
        }
    }
}
