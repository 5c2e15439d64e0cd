//! 2-D convolutions on NHWC activations: one plan per layer, chosen once from the backend's
//! configuration and the layer's geometry ([`plan`]), and one `match` on it per pass.
//!
//! | path | forward pass when | backward pass when | why |
//! |---|---|---|---|
//! | [`ConvPath::Direct`] | bf16 on AMX tiles; channels in multiples of 32 and output maps of 16 pixels or more; 3x3 stride 1 padding 1, or 3x3 padding 1 and 1x1 padding 0 of stride 2 on maps of even sides, or a stride-1 kernel whose patch fits a tile row (the cifar stem's 3x3 on 3 channels) | 3x3 stride 1 of the forward's cases | the tiles read the padded image where it lies: no im2col, no transforms (`bf16/direct.rs`) |
//! | [`ConvPath::Winograd`] | `--winograd` (the default), 3x3 stride 1 padding 1, 16 channels or more, tiles needing at most 70% of the multiplies of the taps inside the image (4x4 maps and larger); 4-point tiles with bf16 operands, and then 32 input channels or more | as forward, without the 32 channels | 2.25 (6-point tiles) or 4 (4-point) multiply-adds per output and channel pair where im2col spends 9 (`winograd.rs`) |
//! | [`ConvPath::Pointwise`] | 1x1, stride 1, no padding | as forward | an NHWC activation already is its patch matrix: one product |
//! | [`ConvPath::TapClasses`] | skipping the taps that read padding saves a fifth of the multiply-adds or more (maps of 4x4 and smaller) | as forward | each class of outputs multiplies only its valid taps (`classes.rs`) |
//! | [`ConvPath::PatchLines`] | bf16 operands, otherwise | bf16 operands and at most [`im2col::GATHERED_CHANNELS`] input channels (the stems) | the packer reads the patches from the image: no f32 im2col written and read back (`im2col.rs`) |
//! | [`ConvPath::Im2col`] | otherwise | otherwise | im2col in chunks of images, then one product (`im2col.rs`) |
//!
//! The rows are tried in order; the first that takes a pass computes it. `resnet-cifar
//! summary --paths` prints every layer's plan. The plan never depends on the batch size or
//! the thread count, so a layer keeps it for every batch, and the same seed and thread count
//! give the same bits.

mod classes;
mod im2col;
#[cfg(test)]
mod tests;

use super::batch_norm::Affine;
use super::bf16;
use super::gemm::{Mat, Operands, Out, matmul};
use super::winograd::{self, Tiling};
use crate::engine::ConvGeom;
use classes::{Classes, tap_classes, use_tap_classes};

/// The code that computes one pass of a convolution on the CPU (the table above).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPath {
    /// bf16 operands on AMX tiles, reading the image where it lies.
    Direct,
    /// Winograd's minimal filtering with tiles of `points` (4: F(2x2, 3x3); 6: F(4x4, 3x3)).
    Winograd { points: usize },
    /// A 1x1 stride-1 convolution: one product over the activation itself.
    Pointwise,
    /// Outputs grouped by the taps inside the image, one product each.
    TapClasses,
    /// bf16 operands packed from patches read in the image.
    PatchLines,
    /// im2col's patch matrix in chunks of images, then a product.
    Im2col,
}

impl std::fmt::Display for ConvPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConvPath::Direct => write!(f, "direct (AMX tiles)"),
            ConvPath::Winograd { points } => write!(f, "Winograd F({0}x{0}, 3x3)", points - 2),
            ConvPath::Pointwise => write!(f, "pointwise"),
            ConvPath::TapClasses => write!(f, "tap classes"),
            ConvPath::PatchLines => write!(f, "patch lines"),
            ConvPath::Im2col => write!(f, "im2col"),
        }
    }
}

/// How the CPU computes one convolution layer: its operands and the path of each pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPlan {
    pub ops: Operands,
    pub forward: ConvPath,
    pub backward: ConvPath,
}

impl std::fmt::Display for ConvPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.forward == self.backward {
            write!(f, "{}", self.forward)
        } else {
            write!(f, "{}; backward: {}", self.forward, self.backward)
        }
    }
}

/// With bf16 operands, the fewest input channels for which Winograd's path computes the
/// forward pass (fewer take the patch lines).
const BF16_WINOGRAD_FORWARD_CHANNELS: usize = 32;

fn is_pointwise(g: &ConvGeom) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0
}

/// The plan of the convolution `g` (its batch size aside) with `ops` operands, Winograd's
/// path allowed or not: the module doc's table, row by row.
pub fn plan(ops: Operands, winograd: bool, g: &ConvGeom) -> ConvPlan {
    #[cfg(target_arch = "x86_64")]
    let direct = (ops == Operands::Bf16(bf16::Kernel::Amx))
        .then(|| bf16::direct::Direct::of(g))
        .flatten();
    #[cfg(target_arch = "x86_64")]
    let (direct_forward, direct_backward) = (direct.is_some(), direct.is_some_and(|d| d.computes_gradients()));
    #[cfg(not(target_arch = "x86_64"))]
    let (direct_forward, direct_backward) = (false, false);
    let winograd = winograd.then(|| winograd::points(g, ops)).flatten();
    // With bf16 operands and few input channels, Winograd's products are too short (k = the
    // input channels) to pay for its transforms in the forward pass, where the patch lines'
    // run over all nine taps (k = 9 x channels). Measured on airbench's 24 -> 64 on 31x31 maps,
    // batch 1024, 2-core Zen 4: forward 105 ms against 150, backward no faster than Winograd's.
    let few_channels = ops.is_bf16() && g.input.c < BF16_WINOGRAD_FORWARD_CHANNELS;
    let classes = use_tap_classes(g, &tap_classes(g));
    let common = |direct: bool, winograd: Option<usize>| {
        if direct {
            Some(ConvPath::Direct)
        } else if let Some(points) = winograd {
            Some(ConvPath::Winograd { points })
        } else if is_pointwise(g) {
            Some(ConvPath::Pointwise)
        } else if classes {
            Some(ConvPath::TapClasses)
        } else {
            None
        }
    };
    let forward = common(direct_forward, winograd.filter(|_| !few_channels)).unwrap_or(if ops.is_bf16() {
        ConvPath::PatchLines
    } else {
        ConvPath::Im2col
    });
    let backward =
        common(direct_backward, winograd).unwrap_or(if ops.is_bf16() && g.input.c <= im2col::GATHERED_CHANNELS {
            ConvPath::PatchLines
        } else {
            ConvPath::Im2col
        });
    ConvPlan { ops, forward, backward }
}

/// Scratch values the plan's passes need for `g`.
pub fn workspace_len(plan: &ConvPlan, g: &ConvGeom) -> usize {
    let need = |path: ConvPath| match path {
        ConvPath::Direct | ConvPath::Pointwise => 0,
        ConvPath::Winograd { points } => Tiling::new(points, plan.ops, g).workspace_len(),
        // The forward's patch lines need none; their backward's input gradient goes through
        // im2col's chunks.
        ConvPath::TapClasses | ConvPath::PatchLines | ConvPath::Im2col => {
            im2col::images_per_chunk(g) * im2col::workspace_per_image(g)
        }
    };
    need(plan.forward).max(need(plan.backward))
}

/// The direct module's description of `g`, which the plan found it takes.
#[cfg(target_arch = "x86_64")]
fn direct(g: &ConvGeom) -> bf16::direct::Direct {
    bf16::direct::Direct::of(g).expect("the plan chose the direct path for this geometry")
}

/// Where no AMX kernel is built, the plan never chooses the direct path.
#[cfg(not(target_arch = "x86_64"))]
fn no_direct_here() -> ! {
    unreachable!("the direct path is planned only on x86-64 with AMX tiles")
}

/// One convolution as a plan computes it: its plan, geometry and weights (HWIO).
#[derive(Clone, Copy)]
pub struct Conv<'a> {
    pub plan: &'a ConvPlan,
    pub g: &'a ConvGeom,
    pub w: &'a [f32],
}

impl Conv<'_> {
    /// `y = conv(x, w)`.
    pub fn forward(&self, x: &[f32], y: &mut [f32], ws: &mut [f32]) {
        let (g, w, ops) = (self.g, self.w, self.plan.ops);
        match self.plan.forward {
            ConvPath::Direct => {
                #[cfg(target_arch = "x86_64")]
                return direct(g).forward_then(&x[..g.input.numel()], w, None, &mut y[..g.output().numel()]);
                #[cfg(not(target_arch = "x86_64"))]
                no_direct_here()
            }
            ConvPath::Winograd { points } => Tiling::new(points, ops, g).forward(x, w, y, ws),
            ConvPath::Pointwise => {
                let (m, k) = (g.input.n * im2col::rows_per_image(g), g.patch_len());
                let weight = Mat::rows(&w[..g.weight_len()], g.cout);
                matmul(
                    ops,
                    (m, g.cout, k),
                    Mat::rows(&x[..m * k], k),
                    weight,
                    Out::new(y, g.cout),
                );
            }
            ConvPath::TapClasses => {
                let classes = tap_classes(g);
                let base = Classes {
                    ops,
                    g,
                    classes: &classes,
                    w,
                    packed: None,
                };
                match ops {
                    // A class's run of taps is one packed matrix where a tap's rows are whole k-blocks.
                    Operands::Bf16(kernel) if bf16::whole_blocks(g.input.c) => {
                        classes::with_packed_taps(kernel, g, &classes, w, false, |taps| {
                            Classes {
                                packed: Some(taps),
                                ..base
                            }
                            .forward_all(x, y, ws)
                        })
                    }
                    _ => base.forward_all(x, y, ws),
                }
            }
            ConvPath::PatchLines => match ops {
                Operands::Bf16(kernel) => im2col::forward_lines(kernel, g, x, w, y),
                Operands::F32 => unreachable!("patch lines are planned for bf16 operands"),
            },
            ConvPath::Im2col => im2col::forward(self, x, y, ws),
        }
    }

    /// `y = affine(conv(x, w))`: on the direct path in one pass (the affine applied to each
    /// output as it leaves the tiles; `conv_out` untouched), elsewhere the convolution into
    /// `conv_out` and the affine over it.
    pub fn forward_then(&self, x: &[f32], affine: &Affine, conv_out: &mut [f32], y: &mut [f32], ws: &mut [f32]) {
        let (g, out) = (self.g, self.g.output());
        if self.plan.forward == ConvPath::Direct {
            #[cfg(target_arch = "x86_64")]
            return direct(g).forward_then(&x[..g.input.numel()], self.w, Some(affine), &mut y[..out.numel()]);
            #[cfg(not(target_arch = "x86_64"))]
            no_direct_here()
        }
        self.forward(x, conv_out, ws);
        affine.apply(out.rows(), conv_out, y);
    }

    /// `dw` (overwritten) and, when asked for, `dx` (overwritten), from `dy`.
    pub fn backward(&self, x: &[f32], dy: &[f32], dx: Option<&mut [f32]>, dw: &mut [f32], ws: &mut [f32]) {
        let (g, w, ops) = (self.g, self.w, self.plan.ops);
        match self.plan.backward {
            ConvPath::Direct => {
                #[cfg(target_arch = "x86_64")]
                {
                    let (direct, x, dy) = (direct(g), &x[..g.input.numel()], &dy[..g.output().numel()]);
                    direct.backward_weights(x, dy, &mut dw[..g.weight_len()]);
                    if let Some(dx) = dx {
                        direct.backward_input(dy, w, &mut dx[..g.input.numel()]);
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                no_direct_here()
            }
            ConvPath::Winograd { points } => Tiling::new(points, ops, g).backward(x, w, dy, dx, dw, ws),
            ConvPath::Pointwise => {
                let (m, k) = (g.input.n * im2col::rows_per_image(g), g.patch_len());
                let dy = &dy[..m * g.cout];
                // dw[k, cout] = x^T[k, m] dy[m, cout]
                let (x_t, dy_rows) = (Mat::transposed(&x[..m * k], k), Mat::rows(dy, g.cout));
                matmul(ops, (k, g.cout, m), x_t, dy_rows, Out::new(dw, g.cout));
                if let Some(dx) = dx {
                    // dx[m, k] = dy[m, cout] w^T[cout, k]
                    let weight_t = Mat::transposed(&w[..g.weight_len()], g.cout);
                    matmul(ops, (m, k, g.cout), dy_rows, weight_t, Out::new(dx, k));
                }
            }
            ConvPath::TapClasses => {
                let classes = tap_classes(g);
                let base = Classes {
                    ops,
                    g,
                    classes: &classes,
                    w,
                    packed: None,
                };
                match ops {
                    Operands::Bf16(kernel) if dx.is_some() => {
                        classes::with_packed_taps(kernel, g, &classes, w, true, |taps| {
                            Classes {
                                packed: Some(taps),
                                ..base
                            }
                            .backward_all(x, dy, dx, dw, ws)
                        })
                    }
                    _ => base.backward_all(x, dy, dx, dw, ws),
                }
            }
            ConvPath::PatchLines => match ops {
                Operands::Bf16(kernel) => im2col::backward(self, Some(kernel), x, dy, (dx, dw), ws),
                Operands::F32 => unreachable!("patch lines are planned for bf16 operands"),
            },
            ConvPath::Im2col => im2col::backward(self, None, x, dy, (dx, dw), ws),
        }
    }
}

/// A convolution, the affine its outputs go through, and room for its output where the
/// affine runs apart ([`Conv::forward_then`]).
pub type ThenAffine<'a> = (Conv<'a>, &'a Affine<'a>, &'a mut [f32]);

/// `y = then_b(b(then_a(a(x))))`: where both convolutions take the direct path and the
/// second can read the first's outputs as its stack (`Direct::follows`), they go there as
/// they leave the tiles (`bf16::direct::Direct::forward_pair`), `mid` unwritten; elsewhere
/// two [`Conv::forward_then`] calls through `mid`.
pub fn forward_pair(a: ThenAffine, b: ThenAffine, x: &[f32], mid: &mut [f32], y: &mut [f32], ws: &mut [f32]) {
    let ((a, then_a, out_a), (b, then_b, out_b)) = (a, b);
    #[cfg(target_arch = "x86_64")]
    if a.plan.forward == ConvPath::Direct && b.plan.forward == ConvPath::Direct {
        let (da, db) = (direct(a.g), direct(b.g));
        if db.follows(&da) {
            let (x, y) = (&x[..a.g.input.numel()], &mut y[..b.g.output().numel()]);
            return bf16::direct::Direct::forward_pair((&da, a.w, Some(then_a)), (&db, b.w, Some(then_b)), x, y);
        }
    }
    a.forward_then(x, then_a, out_a, mid, ws);
    b.forward_then(mid, then_b, out_b, y, ws);
}
