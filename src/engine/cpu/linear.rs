//! Fully connected layer: y = x w^T (+ b), weights in PyTorch's `[out, in]` layout.

use super::gemm::{Mat, Operands, Out, matmul};
use crate::engine::LinearDims;

pub fn forward(ops: Operands, d: LinearDims, x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32]) {
    let LinearDims { n, din, dout } = d;
    for row in y[..n * dout].chunks_exact_mut(dout) {
        match b {
            Some(b) => row.copy_from_slice(&b[..dout]),
            None => row.fill(0.0),
        }
    }
    matmul(
        ops,
        (n, dout, din),
        Mat::rows(&x[..n * din], din),
        Mat::transposed(&w[..dout * din], din),
        Out::adding(y, dout, true),
    );
}

/// dx, dw and db, if there is a bias (all overwritten).
pub fn backward(
    ops: Operands,
    d: LinearDims,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    (dw, db): (&mut [f32], Option<&mut [f32]>),
) {
    let LinearDims { n, din, dout } = d;
    let dy = &dy[..n * dout];
    // dw[out, in] = dy^T[out, n] * x[n, in]
    matmul(
        ops,
        (dout, din, n),
        Mat::transposed(dy, dout),
        Mat::rows(&x[..n * din], din),
        Out::new(dw, din),
    );
    // dx[n, in] = dy[n, out] * w[out, in]
    matmul(
        ops,
        (n, din, dout),
        Mat::rows(dy, dout),
        Mat::rows(&w[..dout * din], din),
        Out::new(dx, din),
    );
    if let Some(db) = db {
        db[..dout].fill(0.0);
        for row in dy.chunks_exact(dout) {
            for (d, g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
    }
}
