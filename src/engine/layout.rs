//! How a tensor is laid out inside a backend relative to PyTorch's layout: each backend picks
//! the conv weight layout its kernels read best, and parameters convert at the state_dict
//! boundary.

/// How a tensor is laid out inside the engine relative to PyTorch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Same as PyTorch (row-major in PyTorch's shape).
    Torch,
    /// A conv weight PyTorch holds as `[out, in, kh, kw]`, stored `[kh, kw, in, out]` (HWIO):
    /// the CPU backend's GEMM reads it as a `[k, out]` matrix without packing.
    ConvHwio,
    /// A conv weight stored `[out, kh, kw, in]` (OHWI): cuDNN's NHWC filter layout.
    ConvOhwi,
    /// A linear weight `[out, c*h*w]` that reads a flattened activation: PyTorch flattens NCHW
    /// (`c, y, x` order), the engine NHWC (`y, x, c`), so the columns are permuted.
    LinearNhwc { h: usize, w: usize, c: usize },
}

impl Layout {
    /// Engine offset of PyTorch's element `[o, i, y, x]` of a `[o, i, kh, kw]` conv weight.
    pub(crate) fn conv_offset(self, [o, i, kh, kw]: [usize; 4], [oc, ic, y, x]: [usize; 4]) -> usize {
        match self {
            Layout::ConvHwio => ((y * kw + x) * i + ic) * o + oc,
            Layout::ConvOhwi => ((oc * kh + y) * kw + x) * i + ic,
            Layout::Torch | Layout::LinearNhwc { .. } => unreachable!("not a conv layout"),
        }
    }

    /// Engine offset of PyTorch's element `flat` of a tensor of `shape`.
    pub fn offset(self, shape: &[usize], flat: usize) -> usize {
        match self {
            Layout::Torch => flat,
            Layout::LinearNhwc { h, w, c } => {
                let din = h * w * c;
                let (o, col) = (flat / din, flat % din);
                let (ch, y, x) = (col / (h * w), col / w % h, col % w);
                o * din + (y * w + x) * c + ch
            }
            _ => {
                let dims = conv_dims(shape);
                self.conv_offset(dims, torch_index(dims, flat))
            }
        }
    }
}

fn torch_index([_, i, kh, kw]: [usize; 4], flat: usize) -> [usize; 4] {
    [flat / (i * kh * kw), flat / (kh * kw) % i, flat / kw % kh, flat % kw]
}

fn conv_dims(shape: &[usize]) -> [usize; 4] {
    match *shape {
        [o, i, kh, kw] => [o, i, kh, kw],
        _ => panic!("conv weight must be 4-D, got {shape:?}"),
    }
}
