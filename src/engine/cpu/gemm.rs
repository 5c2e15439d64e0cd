//! Matrix multiply through the `gemm` crate, with bounds checked once at the boundary so the
//! kernels above it stay safe code.

use gemm::Parallelism;

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
    fn check(&self, rows: usize, cols: usize, what: &str) {
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

/// `dst[m, n] (row-major, row stride dst_rs) = a[m, k] * b[k, n] (+ dst if accumulate)`, on
/// every thread of the pool.
pub fn matmul(m: usize, n: usize, k: usize, dst: &mut [f32], dst_rs: usize, a: Mat, b: Mat, accumulate: bool) {
    matmul_in(parallelism(), m, n, k, dst, dst_rs, a, b, accumulate)
}

/// [`matmul`] on the calling thread alone: for many independent products run side by side.
pub fn matmul_serial(m: usize, n: usize, k: usize, dst: &mut [f32], dst_rs: usize, a: Mat, b: Mat, accumulate: bool) {
    matmul_in(Parallelism::None, m, n, k, dst, dst_rs, a, b, accumulate)
}

#[allow(clippy::too_many_arguments)]
fn matmul_in(
    parallelism: Parallelism,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= dst_rs || m == 1, "gemm: dst row stride smaller than its width");
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm: dst view exceeds its buffer");
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    // SAFETY: every view was checked against its slice above; dst does not alias a or b
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
