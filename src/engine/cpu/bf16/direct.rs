//! 3x3, stride-1, padding-1 convolutions with bf16 operands on AMX tiles, reading the image
//! where it lies: no im2col and no Winograd transforms, as oneDNN's AMX convolutions do.
//!
//! A chunk of images is written once as bf16 in a "stack": the images' rows one after the
//! other, `pitch` pixels apart, with one row of zeros above each image and below the last. In
//! the stack, output place `p` reads tap (dy, dx) at pixel `p + dy pitch + dx` for dy, dx in
//! -1..=1: for every tap, 32 consecutive places read 32 consecutive pixels, so an AMX
//! left-hand tile (16 rows of 32 channels) loads straight from the stack with a row stride of
//! one pixel. The zero rows are the vertical padding. The horizontal padding is either a zero
//! column closing each row (`pitch = w + 1`), or, on maps up to 8 wide where that column would
//! be an eighth or more of the work, three copies of rows of `w`: taps reading to the left
//! read a copy whose last column is zeros (the pixel left of column 0 is the row above's last),
//! taps reading to the right one whose first column is zeros, the others the plain one. A
//! 32 x 32 block of outputs is then one run of tile products over the 9 taps and the input
//! channels, 32 at a time, against the weights packed once per call as B panels (one per
//! tap). Each 16-row half of the left-hand tiles is a segment of 16 places with consecutive
//! outputs (a piece of an image row, or with three copies of an image), its own start, so
//! that no place of a zero row or column is computed (they were 6% of the work on 32x32
//! maps, 13% on 16x16 and 8x8, 25% on 4x4), and the tiles store whole segments' sums straight
//! into the output. Measured: 3-5% of a cifar-stem bf16 training step, 4% of its inference,
//! 5% and 17% on the seed stem (3 alternating `bench` runs each).
//!
//! Stride 2 (3x3 padding 1, and the 1x1 shortcuts; forward pass only, the gradients stay on
//! `conv.rs`'s im2col path) is the same product over the input's four phases, the pixels of
//! one row and column parity: input row `2y + ky - 1` is row `y + dy` of phase `py`, dy in
//! -1..=0, so each phase is stacked like a stride-1 input on the output's grid and each tap
//! reads one phase (a 1x1 only the even-even one). Against the im2col path, cifar stem bf16
//! inference a call, batch norm fused in both (ms): 32x32x64 -> 128 3.00 against 3.72,
//! 16x16x128 -> 256 2.06 against 2.46, 8x8x256 -> 512 2.10 against 2.62, the 1x1s 1.58 / 0.94
//! / 0.50 against 1.97 / 0.98 / 0.56-0.67.
//!
//! In eval mode a residual block's two convolutions run as one call ([`Direct::forward_pair`]):
//! the first's outputs, through their batch norm and ReLU, are rounded to bf16 and written
//! straight into the stack of the whole batch that the second reads ([`sink`]), so the
//! block's inner activation never goes through memory as f32 and the second fills nothing
//! (cifar stem bf16 inference +12-15%). The cifar stem's 3x3 on 3 channels, whose patch
//! of 27 values fits one tile row, runs as a 1x1 over its patches ([`Direct::patch`]).
//!
//! The input gradient is the same product over the output gradient's stack, with each tap's
//! filter transposed and the taps mirrored (`dx[p] = sum over taps t of dy[p - t] w_t^T`).
//! The weight gradient sums over the places instead: the stack transposed (a row of pixels
//! per channel, which a tile row reads at any offset) times the output gradient in pairs of
//! places (the places of zero rows and columns among them, with zeros for the gradient); with
//! three copies, the taps reading to a side take a copy of the output gradient whose places
//! that read across a row's end are zeros.
//!
//! Measured on a 2-core Xeon with AMX (docs/results/bf16-cpu-log.md), cifar stem, ms a call forward /
//! backward, against Winograd's 4-point tiles before: 32x32x64 4.7-4.9 / 9.9-10.7 against
//! 14.7 / 30; 4x4x512 (tap classes before) 4.3-4.5 / 11.3-12.0 against 6.7 / 14.2.

mod fill;
mod sink;

use super::amx::{Block, BlockOut, ROWS, Tiles};
use super::{KC, Kernel, NR, PackedB, packed_len, with_buffer};
use crate::engine::ConvGeom;
use crate::engine::cpu::batch_norm::Affine;
use crate::engine::cpu::gemm::Mat;
use fill::{fill, fill_patches, fill_phases, place_pairs, transposed};
use rayon::prelude::*;
use sink::{Input, Sink};
use std::cell::RefCell;

/// Channels a tile row holds (64 bytes of bf16): both channel counts are multiples of it.
const CHANNELS: usize = 32;

/// Maps with fewer pixels than this (2x2, 1x1) stay on the tap classes of `conv.rs`, which
/// skip the taps that read padding: most of them there.
const MIN_PIXELS: usize = 16;

/// Bytes of a chunk's stack copies (forward pass, input gradient) or of both operands of the
/// weight gradient's products (the stack transposed and the output gradient's place pairs):
/// chunks of images this size stay in cache between their conversion and their products, and
/// bound the buffers (a few MiB where one batch-wide stack took 19 MiB on the cifar stem).
/// Measured, cifar stem bf16 training (3 alternating `bench` runs each): 1 MiB 152-157 img/s,
/// 1.5 MiB 178-180, 2 MiB 180-189, 3 MiB 170-175, 4 MiB 147-165.
const CHUNK_BYTES: usize = 2 << 20;

/// A convolution this module computes: its batch, input map, channels, and its kernel's side
/// and stride (3x3 stride 1, or forward only, 3x3 and 1x1 stride 2, and the stems' patches).
#[derive(Clone, Copy, Debug)]
pub struct Direct {
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    side: usize,
    stride: usize,
    /// A stride-1 convolution whose whole patch fits a tile row (`side * side * channels <=
    /// 32`: the cifar stem's 3x3 on 3 channels) runs as a 1x1 over its patches, stacked as
    /// 32 channels ([`fill_patches`]): `(side, channels)` of its kernel and input. Forward
    /// only. One tile product per block where the im2col product packed each patch row by
    /// row: the stem 3.95 -> 1.9 ms a call in a bf16 inference batch of 64, the same bits.
    patch: Option<(usize, usize)>,
}

/// Where a tap reads, relative to the output place: the phase of the input (the row and the
/// column parity of its pixels, with stride 2; (0, 0) with stride 1) and the (dy, dx) it
/// reads in that phase's stack.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Read {
    phase: (usize, usize),
    at: (isize, isize),
}

/// One copy of a chunk's stack: the phase it holds and, on rows of `w` (masked copies), the
/// side its taps read (the column masked: [`Stack::masked`]; 0 where nothing is).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Source {
    phase: (usize, usize),
    side: isize,
}

/// A tap of the forward products: the copy of the stack it reads, where in it, and its filter.
struct Tap<'a> {
    copy: usize,
    at: (isize, isize),
    filter: PackedB<'a>,
}

thread_local! {
    /// A chunk's stacks (or their transposes) and the packed filters (or the output
    /// gradient's place pairs), kept from call to call (megabytes: fresh ones would cost page
    /// faults on every call).
    static STACKS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static PACKED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// A whole batch's stack that one convolution writes and the next reads
    /// ([`Direct::forward_pair`]).
    static STAGED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// A chunk of `images` maps of `h x w` pixels stacked as the module doc says: rows of `pitch`
/// pixels, either `w + 1` (a zero column closing each row: one copy) or `w` (three copies,
/// columns masked).
#[derive(Clone, Copy, Debug)]
struct Stack {
    images: usize,
    h: usize,
    w: usize,
    pitch: usize,
}

/// Up to 16 places of a stack (one half of the tiles' rows) that compute consecutive outputs:
/// a piece of an image row (rows closed by a zero column), or of an image (rows of `w`).
#[derive(Clone, Copy, Debug)]
struct Segment {
    /// The first place.
    place: usize,
    /// Its output (pixel of the chunk's images).
    out: usize,
    /// Places, 16 but at a row's or an image's end.
    len: usize,
}

impl Stack {
    /// Whether rows are `w` pixels, no zero column closing them: the columns a tap reads
    /// across a row's end are then masked, in copies of their own ([`Stack::masked`]).
    fn masked_rows(&self) -> bool {
        self.pitch == self.w
    }

    /// The segments of every output, in the outputs' order.
    fn segments(&self) -> Vec<Segment> {
        let (h, w, pitch, half) = (self.h, self.w, self.pitch, ROWS / 2);
        let mut segments = Vec::new();
        for image in 0..self.images {
            // Place of the image's first pixel, and its first output.
            let (place, out) = (self.image_place(image), image * h * w);
            if self.masked_rows() {
                segments.extend((0..h * w).step_by(half).map(|o| Segment {
                    place: place + o,
                    out: out + o,
                    len: half.min(h * w - o),
                }));
            } else {
                for y in 0..h {
                    segments.extend((0..w).step_by(half).map(|x| Segment {
                        place: place + y * pitch + x,
                        out: out + y * w + x,
                        len: half.min(w - x),
                    }));
                }
            }
        }
        segments
    }

    /// Copies of a stride-1 stack the taps read (one a side on masked rows): the weight
    /// gradient's copies of the output gradient (the forward products list theirs by source).
    fn copies(&self) -> usize {
        if self.masked_rows() { 3 } else { 1 }
    }

    /// The copy of [`Stack::copies`] that taps reading `dx` columns to the side read.
    fn copy(&self, dx: isize) -> usize {
        if self.masked_rows() { (dx + 1) as usize } else { 0 }
    }

    /// Pixels of one copy: one pixel ahead of the first zero row (the top-left tap of the
    /// first place reads it), the rows, and room past them for the last block's 31 extra
    /// places and the farthest tap.
    fn pixels(&self) -> usize {
        1 + (self.images * (self.h + 1) + 1) * self.pitch + ROWS + self.pitch + 1
    }

    /// Pixel of place 0 (the first image's first pixel).
    fn first(&self) -> usize {
        1 + self.pitch
    }

    /// Places from the first image's first pixel to the last one's last row's end.
    fn places(&self) -> usize {
        (self.images * (self.h + 1) - 1) * self.pitch
    }

    /// The place of output `o` (a pixel of the images), the inverse of [`Stack::outputs_from`].
    fn place(&self, o: usize) -> usize {
        let (image, y, x) = (o / (self.h * self.w), o / self.w % self.h, o % self.w);
        self.image_place(image) + y * self.pitch + x
    }

    /// The place of image `image`'s first pixel. A stack of the images from `image` on is
    /// this one's pixels from this many on (from the pixel ahead of the zero row above it).
    fn image_place(&self, image: usize) -> usize {
        image * (self.h + 1) * self.pitch
    }

    /// The first output of the stack's row `r` (row r starts at pixel 1 + r pitch, place (r -
    /// 1) pitch): none for a zero row or past the last image.
    fn row_output(&self, r: usize) -> Option<usize> {
        let row = r.checked_sub(1)?;
        self.outputs_from(row * self.pitch, |_| false).next().flatten()
    }

    /// Zeros into the pixels of `copy` (`pixel` values each) that no output's place holds:
    /// the one ahead, the zero rows, the zero column closing each row, and the room past the
    /// last row. What [`fill()`] writes there, for a stack whose outputs come from elsewhere.
    fn zero_padding(&self, copy: &mut [u32], pixel: usize) {
        let (h, w, pitch, first) = (self.h, self.w, self.pitch, self.first());
        let mut zero = |from: usize, to: usize| copy[from * pixel..to * pixel].fill(0);
        zero(0, first);
        for image in 0..self.images {
            let top = first + self.image_place(image);
            if pitch > w {
                (0..h).for_each(|y| zero(top + y * pitch + w, top + (y + 1) * pitch));
            }
            zero(top + h * pitch, top + (h + 1) * pitch);
        }
        zero(first + self.image_place(self.images), self.pixels());
    }

    /// Where tap (dy, dx) reads, relative to the place: pixels (from the first place's pixel).
    fn offset(&self, (dy, dx): (isize, isize)) -> usize {
        (self.first() as isize + dy * self.pitch as isize + dx) as usize
    }

    /// The outputs (pixels of the images) that places `k0, k0 + 1, ...` compute: none for a
    /// zero row's or column's place and past the last, or where `masked` says so of the
    /// column. Counted on, not divided out place by place.
    fn outputs_from(&self, k0: usize, masked: impl Fn(usize) -> bool) -> impl Iterator<Item = Option<usize>> {
        let (h, w, pitch, places) = (self.h, self.w, self.pitch, self.places());
        let row = k0 / pitch;
        let (mut image, mut y, mut x) = (row / (h + 1), row % (h + 1), k0 % pitch);
        (k0..).map(move |k| {
            let out = (k < places && y < h && x < w && !masked(x)).then(|| (image * h + y) * w + x);
            x += 1;
            if x == pitch {
                x = 0;
                y += 1;
                if y == h + 1 {
                    y = 0;
                    image += 1;
                }
            }
            out
        })
    }

    /// Whether copy `dx`'s column x is zeros: on rows of `w` (masked copies), the last column
    /// in the one read to the left (the pixel left of column 0 is the row above's last) and
    /// the first in the one read to the right.
    fn masked(&self, dx: isize) -> impl Fn(usize) -> bool + Copy + Send + Sync + use<> {
        let (masks, w) = (self.masked_rows(), self.w);
        move |x| masks && ((dx < 0 && x == w - 1) || (dx > 0 && x == 0))
    }
}

impl Direct {
    /// The convolution `g` as this module computes it, if it can (with AMX tiles: the
    /// convolution plan asks only then): channels in multiples of 32,
    /// output maps of at least [`MIN_PIXELS`], and a 3x3 stride-1 padding-1 convolution, or
    /// (its forward pass only: [`Direct::computes_gradients`]) a 3x3 padding-1 or 1x1
    /// padding-0 one of stride 2 on maps of even sides.
    pub fn of(g: &ConvGeom) -> Option<Self> {
        let patch = g.kh == g.kw && g.kh % 2 == 1 && g.stride == 1 && g.pad == g.kh / 2;
        if patch && g.patch_len() <= CHANNELS && !g.input.c.is_multiple_of(CHANNELS) {
            let (channels, map) = (g.cout.is_multiple_of(CHANNELS), g.input.h * g.input.w >= MIN_PIXELS);
            return (channels && map).then_some(Self {
                n: g.input.n,
                h: g.input.h,
                w: g.input.w,
                cin: CHANNELS,
                cout: g.cout,
                side: 1,
                stride: 1,
                patch: Some((g.kh, g.input.c)),
            });
        }
        let even = g.input.h.is_multiple_of(2) && g.input.w.is_multiple_of(2);
        let shape = match (g.kh, g.kw, g.stride, g.pad) {
            (3, 3, 1, 1) => true,
            (3, 3, 2, 1) | (1, 1, 2, 0) => even,
            _ => false,
        };
        let channels = g.input.c.is_multiple_of(CHANNELS) && g.cout.is_multiple_of(CHANNELS);
        let (oh, ow) = g.out_hw();
        let map = oh * ow >= MIN_PIXELS;
        (shape && channels && map).then_some(Self {
            n: g.input.n,
            h: g.input.h,
            w: g.input.w,
            cin: g.input.c,
            cout: g.cout,
            side: g.kh,
            stride: g.stride,
            patch: None,
        })
    }

    /// Whether [`Direct::backward_input`] and [`Direct::backward_weights`] compute this
    /// convolution's gradients (stride 1), or only its forward pass is computed here.
    pub fn computes_gradients(&self) -> bool {
        self.stride == 1 && self.patch.is_none()
    }

    /// The output map's height and width.
    fn out_hw(&self) -> (usize, usize) {
        (self.h / self.stride, self.w / self.stride)
    }

    /// Images a chunk holds when each costs `bytes`.
    fn chunk(&self, bytes: usize) -> usize {
        (CHUNK_BYTES / bytes.max(1)).clamp(1, self.n)
    }

    /// The stack of a chunk (its places are the output's): on output maps up to 8 wide, where
    /// a zero column would add an eighth or more of dropped places (and halve a 16-place
    /// segment on 8x8 maps), rows of `w` in masked copies (three with stride 1, six of the
    /// four phases with stride 2), else the zero column (filling three copies costs more there
    /// than the 1/16 or 1/32 it drops).
    fn stack(&self, images: usize) -> Stack {
        let (h, w) = self.out_hw();
        let pitch = if w <= 8 { w } else { w + 1 };
        Stack { images, h, w, pitch }
    }

    /// Where the forward pass's tap `t` (row by row, HWIO's order) reads: input row `stride y +
    /// ky - pad` is row `y + dy` of phase `py`, with `dy` and `py` the quotient and remainder
    /// of `ky - pad` by the stride (so dy is -1 or 0 with stride 2), the same for columns.
    fn read(&self, t: usize) -> Read {
        let (pad, s) = ((self.side / 2) as isize, self.stride as isize);
        let (ky, kx) = ((t / self.side) as isize - pad, (t % self.side) as isize - pad);
        Read {
            phase: (ky.rem_euclid(s) as usize, kx.rem_euclid(s) as usize),
            at: (ky.div_euclid(s), kx.div_euclid(s)),
        }
    }

    /// `y = then(conv(x, w))`, `then` (eval mode's batch norm) applied to each output as it
    /// leaves the tiles, or `y = conv(x, w)`: `x` NHWC with `cin` channels, `w` HWIO, `y`
    /// NHWC with `cout`.
    pub fn forward_then(&self, x: &[f32], w: &[f32], then: Option<&Affine>, y: &mut [f32]) {
        let padded = self.padded(w);
        let taps = self.forward_taps(padded.as_deref().unwrap_or(w));
        self.run(Input::Values(x), self.cin, self.cout, then, Sink::values(y), taps);
    }

    /// A patch convolution's filter as a 1x1's over 32 channels: zero rows past the patch.
    fn padded(&self, w: &[f32]) -> Option<Vec<f32>> {
        let (side, c) = self.patch?;
        let mut padded = vec![0.0; self.cin * self.cout];
        let len = side * side * c * self.cout;
        padded[..len].copy_from_slice(&w[..len]);
        Some(padded)
    }

    /// Eval mode's two convolutions in a row (a residual block's inner path), `y =
    /// then_b(b(then_a(a(x))))`: `a`'s outputs, through `then_a` and rounded to bf16, go
    /// straight into the stack of the whole batch that `b` reads (its copies, their padding
    /// zeroed first), so they never pass through memory as f32 and `b` converts nothing. The
    /// bits of the two [`Direct::forward_then`] calls one after the other: `b` rounds the
    /// same f32 values to bf16 the same way either way. Each convolution comes with its
    /// weights and the affine after it.
    pub fn forward_pair(
        (a, wa, then_a): (&Self, &[f32], Option<&Affine>),
        (b, wb, then_b): (&Self, &[f32], Option<&Affine>),
        x: &[f32],
        y: &mut [f32],
    ) {
        assert!(b.follows(a), "{a:?} then {b:?}");
        let padded = a.padded(wa);
        let wa = padded.as_deref().unwrap_or(wa);
        let taps = b.forward_taps(wb);
        let staged = b.stack(b.n);
        let sources = b.sources(&taps);
        let copy_len = staged.pixels() * b.cin / 2;
        with_buffer(&STAGED, sources.len() * copy_len, |buffer| {
            let mut copies: Vec<&mut [u32]> = buffer.chunks_exact_mut(copy_len).collect();
            copies
                .par_iter_mut()
                .for_each(|copy| staged.zero_padding(copy, b.cin / 2));
            let sink = Sink::stack(staged, sources.iter().map(|s| s.side).collect(), copies);
            a.run(Input::Values(x), a.cin, a.cout, then_a, sink, a.forward_taps(wa));
            let copies: Vec<&[u32]> = buffer.chunks_exact(copy_len).collect();
            b.run(Input::Staged(&copies), b.cin, b.cout, then_b, Sink::values(y), taps);
        })
    }

    /// Whether this convolution can read `a`'s outputs staged as its stack
    /// ([`Direct::forward_pair`]): a stride-1 one, not over patches, on `a`'s output map and
    /// channels, for the same batch.
    pub fn follows(&self, a: &Self) -> bool {
        let input = (self.n, (self.h, self.w), self.cin);
        self.stride == 1 && self.patch.is_none() && input == (a.n, a.out_hw(), a.cout)
    }

    /// The forward pass's taps: where each reads, and its filter (of `w`, HWIO).
    fn forward_taps<'w>(&self, w: &'w [f32]) -> Vec<(Read, Mat<'w>)> {
        let (cin, cout) = (self.cin, self.cout);
        let filter = |t: usize| Mat::rows(&w[t * cin * cout..][..cin * cout], cout);
        (0..self.side * self.side).map(|t| (self.read(t), filter(t))).collect()
    }

    /// `dx` from `dy` (NHWC, `cout` channels) and the filters `w` (HWIO): tap t's filter,
    /// transposed, applied where the mirrored tap reads.
    pub fn backward_input(&self, dy: &[f32], w: &[f32], dx: &mut [f32]) {
        assert!(self.computes_gradients(), "{self:?}");
        let (cin, cout) = (self.cin, self.cout);
        let filter = |t: usize| Mat::transposed(&w[t * cin * cout..][..cin * cout], cout);
        let taps = (0..9).map(|t| (self.read(8 - t), filter(t))).collect();
        self.run(Input::Values(dy), cout, cin, None, Sink::values(dx), taps);
    }

    /// The distinct sources `taps` read, in the order they first appear: the stack's copies.
    fn sources(&self, taps: &[(Read, Mat)]) -> Vec<Source> {
        let mut sources: Vec<Source> = Vec::new();
        for &(read, _) in taps {
            if !sources.contains(&self.source(read)) {
                sources.push(self.source(read));
            }
        }
        sources
    }

    /// The copy of the stack a tap reads: its phase, and its side with three masked copies.
    fn source(&self, read: Read) -> Source {
        let masked = self.stack(1).masked_rows();
        Source {
            phase: read.phase,
            side: if masked { read.at.1 } else { 0 },
        }
    }

    /// `dst` (`cd` channels) = the sum over the taps of `src` (`cs` channels) read where each
    /// reads times its `cs x cd` filter, through `then` where given. The stack's copies are
    /// [`Direct::sources`]: filled chunk by chunk from f32 values, or staged before for the
    /// whole batch.
    fn run(&self, src: Input, cs: usize, cd: usize, then: Option<&Affine>, mut dst: Sink, taps: Vec<(Read, Mat)>) {
        let (h, w) = (self.h, self.w);
        let (oh, ow) = self.out_hw();
        let one = self.stack(1);
        let sources = self.sources(&taps);
        let chunk = self.chunk(sources.len() * (oh + 1) * one.pitch * cs * 2);
        let per_tap = packed_len(cs, cd);
        with_buffer(&PACKED, taps.len() * per_tap, |packed| {
            let filters: Vec<Mat> = taps.iter().map(|&(_, filter)| filter).collect();
            let taps: Vec<Tap> = PackedB::pack_each(Kernel::Amx, cs, cd, &filters, packed)
                .into_iter()
                .zip(taps)
                .map(|(filter, (read, _))| Tap {
                    copy: sources
                        .iter()
                        .position(|&s| s == self.source(read))
                        .expect("listed above"),
                    at: read.at,
                    filter,
                })
                .collect();
            let copy_len = self.stack(chunk).pixels() * cs / 2;
            let fills = if let Input::Values(_) = src { sources.len() } else { 0 };
            with_buffer(&STACKS, fills * copy_len, |stacks| {
                for first in (0..self.n).step_by(chunk) {
                    let stack = self.stack(chunk.min(self.n - first));
                    let images = first..first + stack.images;
                    let copies: Vec<&[u32]> = match src {
                        Input::Values(src) => {
                            let c = self.patch.map_or(cs, |(_, c)| c);
                            assert_eq!(src.len(), self.n * h * w * c, "input of {self:?}");
                            let src = &src[images.start * h * w * c..images.end * h * w * c];
                            if let Some((side, c)) = self.patch {
                                fill_patches(stack, side, c, src, &mut stacks[..copy_len]);
                            } else if self.stride == 1 {
                                for (source, copy) in sources.iter().zip(stacks.chunks_exact_mut(copy_len)) {
                                    fill(stack, stack.masked(source.side), src, cs, copy);
                                }
                            } else {
                                let copies = stacks.chunks_exact_mut(copy_len);
                                fill_phases(stack, &sources, (h, w), src, cs, copies);
                            }
                            stacks.chunks_exact(copy_len).collect()
                        }
                        // The chunk's images from the whole batch's stack: the same layout
                        // from the zero row above its first image on.
                        Input::Staged(copies) => {
                            assert_eq!(copies.len(), sources.len(), "{self:?}");
                            let at = one.image_place(images.start) * cs / 2;
                            copies.iter().map(|c| &c[at..][..stack.pixels() * cs / 2]).collect()
                        }
                    };
                    let outputs = images.start * oh * ow;
                    let part = dst.images(images, oh * ow, cd);
                    products(stack, &taps, &copies, cs, cd, then.map(|a| (a, outputs)), part);
                }
            })
        })
    }

    /// `dw` (HWIO) = the weights' gradient from `x` (NHWC, `cin` channels) and `dy` (NHWC,
    /// `cout`): for each tap, `x` read at the tap, transposed, times `dy`, summed over every
    /// place of every chunk. K runs over the places 32 at a time. `dw`'s rows come in groups of
    /// 32, one a tap and block of input channels; each task owns a run of groups and sums
    /// their 32 x 32 blocks chunk by chunk in the tiles, which load and store them where they
    /// lie in `dw` (no buffer of sums beside it: for 512 channels that was 9.4 MB zeroed and
    /// copied each call), so the sums run in one order whatever the thread count.
    pub fn backward_weights(&self, x: &[f32], dy: &[f32], dw: &mut [f32]) {
        let (n, h, w, cin, cout) = (self.n, self.h, self.w, self.cin, self.cout);
        assert_eq!((x.len(), dy.len()), (n * h * w * cin, n * h * w * cout), "{self:?}");
        assert_eq!(dw.len(), 9 * cin * cout, "{self:?}");
        let one = self.stack(1);
        let chunk = self.chunk((cin + one.copies() * cout) * (h + 1) * one.pitch * 2);
        let (cb, qb) = (cin / CHANNELS, cout / NR);
        // Group g of dw's rows: tap g / cb, input channels from g % cb * 32.
        let groups = 9 * cb;
        let tasks = rayon::current_num_threads().min(groups);
        // A row of pixels of the transposed stack: whole blocks of 32.
        let row = self.stack(chunk).pixels().next_multiple_of(ROWS);
        let pairs_len = self.stack(chunk).places().next_multiple_of(ROWS) / 2 * cout;
        with_buffer(&STACKS, cin * row / 2, |xt| {
            with_buffer(&PACKED, one.copies() * pairs_len, |dyp| {
                for first in (0..n).step_by(chunk) {
                    let stack = self.stack(chunk.min(n - first));
                    let x = &x[first * h * w * cin..(first + stack.images) * h * w * cin];
                    let dy = &dy[first * h * w * cout..(first + stack.images) * h * w * cout];
                    let steps = stack.places().div_ceil(ROWS);
                    transposed(stack, x, cin, row, xt);
                    // Copy dx: the places whose tap dx reads across a row's end are zeros (the
                    // mirror of the forward's masked columns).
                    for (dx, copy) in (-1..=1).zip(dyp.chunks_exact_mut(pairs_len)) {
                        place_pairs(stack, stack.masked(-dx), dy, cout, &mut copy[..steps * ROWS / 2 * cout]);
                    }
                    let (xt, dyp) = (&*xt, &*dyp);
                    let mut parts = Vec::with_capacity(tasks);
                    let mut rest = &mut dw[..];
                    for task in 0..tasks {
                        let mine = groups * task / tasks..groups * (task + 1) / tasks;
                        let (part, tail) = rest.split_at_mut(mine.len() * ROWS * cout);
                        parts.push((mine, part));
                        rest = tail;
                    }
                    parts.into_par_iter().for_each(|(mine, part)| {
                        let tiles = Tiles::configure();
                        for (g, rows) in mine.zip(part.chunks_exact_mut(ROWS * cout)) {
                            let (t, c0) = (g / cb, g % cb * CHANNELS);
                            let read = self.read(t).at;
                            // The taps reading to a side take the output gradient with the
                            // places zeroed whose read wraps around to another row.
                            let dyp = &dyp[stack.copy(read.1) * pairs_len..][..pairs_len];
                            // The farthest byte read: channel c0 + 31, the last step, the tap.
                            let (start, offset) = (c0 * row * 2, stack.offset(read) * 2);
                            assert!(start + 31 * row * 2 + (steps - 1) * ROWS * 2 + offset + 64 <= xt.len() * 4);
                            let a = xt.as_ptr() as *const u8;
                            for q in 0..qb {
                                let products = (0..steps).map(|s| {
                                    let b = &dyp[s * ROWS / 2 * cout + q * NR..][..(ROWS / 2 - 1) * cout + NR];
                                    // SAFETY: within `xt` (asserted above).
                                    (unsafe { a.add(start + s * ROWS * 2 + offset) }, b.as_ptr())
                                });
                                let top = rows[q * NR..].as_mut_ptr();
                                let bottom = top.wrapping_add(ROWS / 2 * cout);
                                let sums = BlockOut {
                                    top,
                                    bottom,
                                    rs: cout * 4,
                                    add: first > 0,
                                };
                                // SAFETY: A rows `row * 2` bytes apart, 32 of 64 bytes each from
                                // every start (the second half 16 rows on), within `xt`
                                // (asserted above); B 16 rows of NR pairs, `cout` pairs apart,
                                // within the slice each step takes; the sums' two halves 16 rows
                                // of NR values, `cout` apart, in the group's 32 rows.
                                unsafe { tiles.sum_into(products, row * 2, 32 * row, cout * 4, sums) };
                            }
                        }
                    });
                }
            })
        });
    }
}

/// The forward products of one chunk: `dst` (the chunk's outputs, `cd` channels) from the
/// stack's `copies` (`cs` channels) and the taps' packed filters, through `then` where given
/// (with the index of the chunk's first output, for its residual). A block is two
/// [`Segment`]s, one per 16-row half of the tiles: no place of a zero row or column is
/// computed, and where both halves are whole, nothing follows and the outputs are f32 values,
/// the tiles store their sums straight into `dst`. Tasks are runs of blocks; each sweeps its
/// blocks once per 32 output channels, so that those channels' filters (all taps: 9 x 32 KiB
/// for 512 input channels) stay in cache across its blocks.
fn products(
    stack: Stack,
    taps: &[Tap],
    copies: &[&[u32]],
    cs: usize,
    cd: usize,
    then: Option<(&Affine, usize)>,
    dst: Sink,
) {
    let segments = stack.segments();
    let blocks = segments.len().div_ceil(2);
    let tasks = (4 * rayon::current_num_threads()).min(blocks);
    // Each task's blocks, and its outputs: a contiguous run of `dst` (segments follow the
    // outputs' order).
    let mut parts = Vec::with_capacity(tasks);
    let mut rest = dst;
    for t in 0..tasks {
        let mine = &segments[2 * (blocks * t / tasks)..(2 * (blocks * (t + 1) / tasks)).min(segments.len())];
        let end = mine.last().expect("a block a task at least");
        let (part, tail) = rest.split_at(end.out + end.len, cd);
        parts.push((mine, part));
        rest = tail;
    }
    parts.into_par_iter().for_each(|(mine, mut out)| {
        let tiles = Tiles::configure();
        let mut block = Block([0.0; ROWS * NR]);
        for q in 0..cd / NR {
            for pair in mine.chunks(2) {
                // A lone last segment computes its second half again, dropped.
                let (top, bottom) = (pair[0], pair[pair.len() - 1]);
                let steps = taps.iter().flat_map(|tap| {
                    let (filter, copy) = (&tap.filter, copies[tap.copy]);
                    let at = |s: Segment| (s.place + stack.offset(tap.at)) * cs / 2;
                    let (first, second) = (at(top), at(bottom));
                    // The farthest pair read: row 15 of either half, the last 32 channels.
                    assert!(
                        second >= first && second + 15 * cs / 2 + cs / 2 <= copy.len(),
                        "{stack:?}"
                    );
                    (0..cs).step_by(CHANNELS).map(move |c0| {
                        (
                            copy[first + c0 / 2..].as_ptr() as *const u8,
                            filter.tile_rows(q, c0).as_ptr(),
                        )
                    })
                });
                let a_gap = (bottom.place - top.place) * cs * 2;
                if let Sink::Values { out, from } = &mut out {
                    let row = |s: Segment| (s.out - *from) * cd + q * NR;
                    let whole = |s: Segment| s.len == ROWS / 2 && row(s) + (ROWS / 2 - 1) * cd + NR <= out.len();
                    if then.is_none() && pair.len() == 2 && whole(top) && whole(bottom) {
                        let (t, b) = (out[row(top)..].as_mut_ptr(), out[row(bottom)..].as_mut_ptr());
                        let sums = BlockOut {
                            top: t,
                            bottom: b,
                            rs: cd * 4,
                            add: false,
                        };
                        // SAFETY: every A step reads 16 rows of 16 pairs, `cs / 2` pairs apart,
                        // from its start and `a_gap` bytes on, in its copy (asserted above);
                        // `tile_rows` returns 16 x NR pairs; each half of the sums is 16 rows
                        // of NR values, `cd` apart, in `out` (`whole`).
                        unsafe { tiles.sum_into(steps, cs * 2, a_gap, NR * 4, sums) };
                        continue;
                    }
                }
                let (t, b) = (block.0.as_mut_ptr(), block.0[ROWS / 2 * NR..].as_mut_ptr());
                let sums = BlockOut {
                    top: t,
                    bottom: b,
                    rs: NR * 4,
                    add: false,
                };
                // SAFETY: as above for A and B; the halves are the block's.
                unsafe { tiles.sum_into(steps, cs * 2, a_gap, NR * 4, sums) };
                for (half, &s) in pair.iter().enumerate() {
                    out.rows(s, q * NR, cd, &block.0[half * ROWS / 2 * NR..], then);
                }
            }
        }
    });
}

impl PackedB<'_> {
    /// The 16 pair rows of column panel `q` from K value `k0` on (a multiple of 32): one AMX
    /// right-hand tile pair.
    fn tile_rows(&self, q: usize, k0: usize) -> &[u32] {
        assert!(k0.is_multiple_of(CHANNELS) && k0 < self.k && self.kernel == Kernel::Amx);
        &self.panel(k0 / KC, q)[(k0 % KC) / 2 * NR..][..CHANNELS / 2 * NR]
    }
}

#[cfg(test)]
mod tests {
    use super::super::{round, widen};
    use super::*;
    use crate::engine::Shape4;

    /// `y`, `dx` and `dw` of a square-kernel convolution in f64 (`dy`'s gradients through it),
    /// each value with the sum of its terms' magnitudes.
    fn reference(g: &ConvGeom, x: &[f32], w: &[f32], dy: &[f32]) -> [Vec<(f64, f64)>; 3] {
        let Shape4 { n, h, w: wd, c } = g.input;
        let (co, k, (oh, ow)) = (g.cout, g.kh, g.out_hw());
        let zeros = |len| vec![(0f64, 0f64); len];
        let (mut y, mut dx, mut dw) = (zeros(n * oh * ow * co), zeros(x.len()), zeros(w.len()));
        let add = |sum: &mut (f64, f64), a: f32, b: f32| {
            sum.0 += a as f64 * b as f64;
            sum.1 += (a as f64 * b as f64).abs();
        };
        for i in 0..n {
            for (oy, ox) in (0..oh).flat_map(|oy| (0..ow).map(move |ox| (oy, ox))) {
                for t in 0..k * k {
                    let at = |o: usize, kt: usize| (o * g.stride + kt).wrapping_sub(g.pad);
                    let (iy, ix) = (at(oy, t / k), at(ox, t % k));
                    if iy >= h || ix >= wd {
                        continue;
                    }
                    let (xi, yi) = (((i * h + iy) * wd + ix) * c, ((i * oh + oy) * ow + ox) * co);
                    for ci in 0..c {
                        for o in 0..co {
                            let wv = w[(t * c + ci) * co + o];
                            add(&mut y[yi + o], x[xi + ci], wv);
                            add(&mut dx[xi + ci], dy[yi + o], wv);
                            add(&mut dw[(t * c + ci) * co + o], dy[yi + o], x[xi + ci]);
                        }
                    }
                }
            }
        }
        [y, dx, dw]
    }

    /// The 3x3 padding-1 convolution of `n` maps of `h x w x cin` to `cout` channels, and its
    /// plan here (none without AMX).
    fn plan(n: usize, h: usize, w: usize, cin: usize, cout: usize) -> Option<(ConvGeom, Direct)> {
        plan_of(n, h, w, cin, cout, (3, 1))
    }

    /// [`plan`] with a kernel's side and stride (padding: half the side).
    fn plan_of(
        n: usize,
        h: usize,
        w: usize,
        cin: usize,
        cout: usize,
        (side, stride): (usize, usize),
    ) -> Option<(ConvGeom, Direct)> {
        if !Kernel::amx_available() {
            return None;
        }
        let g = ConvGeom {
            input: Shape4::new(n, h, w, cin),
            cout,
            kh: side,
            kw: side,
            stride,
            pad: side / 2,
        };
        Direct::of(&g).map(|direct| (g, direct))
    }

    /// On bf16 operands, stride 2 (3x3 and 1x1) matches the float64 reference to f32
    /// summation error as stride 1 does (its forward pass: the only one it has here), through
    /// the four phases: maps of 16 and 4 output pixels wide, an odd number of output rows, a
    /// 1x1 (one phase only) and two chunks (32 maps of 64 x 32 channels).
    #[test]
    fn stride_two_matches_float64_on_bf16_operands() {
        for (n, h, w, cin, cout, side) in [
            (3, 32, 32, 64, 32, 3),
            (5, 8, 8, 32, 64, 3),
            (2, 10, 12, 32, 32, 3),
            (3, 8, 8, 64, 96, 1),
            (32, 32, 32, 64, 32, 3),
        ] {
            let Some((g, direct)) = plan_of(n, h, w, cin, cout, (side, 2)) else {
                return crate::test_support::skip("amx", "the direct path", "this CPU (or OS) has no AMX-BF16 tiles");
            };
            assert!(!direct.computes_gradients());
            let val = |i: usize, salt: f32| widen(round(((i as f32 * 0.618 + salt).sin() * 1000.0).fract()));
            let x: Vec<f32> = (0..g.input.numel()).map(|i| val(i, 0.1)).collect();
            let wt: Vec<f32> = (0..g.weight_len()).map(|i| val(i, 0.2)).collect();
            let [ry, _, _] = reference(&g, &x, &wt, &vec![0.0; g.output().numel()]);
            let mut y = vec![f32::NAN; g.output().numel()];
            direct.forward_then(&x, &wt, None, &mut y);
            for (i, (a, (b, magnitude))) in y.iter().zip(&ry).enumerate() {
                let bound = ((side * side * cin) as f64 * magnitude).max(1.0) * 6e-8;
                assert!((*a as f64 - b).abs() <= bound, "{g:?} y[{i}]: {a} vs {b}");
            }
        }
    }

    /// On operands already bf16, the tile products are exact and only the f32 sums round:
    /// the three results match the float64 reference to f32 summation error, with channel counts
    /// that differ (a transposed filter the wrong way round fails), maps whose rows are not a
    /// multiple of the blocks, K over two filter blocks (288 channels), one image (tasks
    /// within it), 4x4 maps (blocks across images) and 32 32x32 maps (two chunks forward, three
    /// for the weight gradient).
    #[test]
    fn matches_float64_on_bf16_operands() {
        let cases = [
            (2, 8, 9, 64, 32),
            (3, 11, 6, 32, 96),
            (1, 16, 16, 288, 32),
            (32, 8, 8, 64, 64),
            (5, 4, 4, 64, 64),
            (32, 32, 32, 32, 32),
        ];
        for (n, h, w, cin, cout) in cases {
            let Some((g, direct)) = plan(n, h, w, cin, cout) else {
                return crate::test_support::skip("amx", "the direct path", "this CPU (or OS) has no AMX-BF16 tiles");
            };
            let val = |i: usize, salt: f32| widen(round(((i as f32 * 0.618 + salt).sin() * 1000.0).fract()));
            let x: Vec<f32> = (0..g.input.numel()).map(|i| val(i, 0.1)).collect();
            let wt: Vec<f32> = (0..g.weight_len()).map(|i| val(i, 0.2)).collect();
            let dy: Vec<f32> = (0..g.output().numel()).map(|i| val(i, 0.3)).collect();
            let [ry, rdx, rdw] = reference(&g, &x, &wt, &dy);
            let mut y = vec![f32::NAN; g.output().numel()];
            direct.forward_then(&x, &wt, None, &mut y);
            let mut dx = vec![f32::NAN; x.len()];
            direct.backward_input(&dy, &wt, &mut dx);
            let mut dw = vec![f32::NAN; wt.len()];
            direct.backward_weights(&x, &dy, &mut dw);
            let sums = [
                ("y", &y, &ry, 9 * cin),
                ("dx", &dx, &rdx, 9 * cout),
                ("dw", &dw, &rdw, n * h * w),
            ];
            for (what, got, want, terms) in sums {
                for (i, (a, (b, magnitude))) in got.iter().zip(want.iter()).enumerate() {
                    // A sum of `terms` products in f32, each add rounding by at most 2^-24 of a
                    // partial sum, itself at most the terms' summed magnitude.
                    let bound = (terms as f64 * magnitude).max(1.0) * 6e-8;
                    assert!((*a as f64 - b).abs() <= bound, "{g:?} {what}[{i}]: {a} vs {b}");
                }
            }
        }
    }

    /// Eval mode's batch norm, residual and ReLU applied as the outputs leave the tiles give
    /// the bits of the convolution followed by the batch norm's own pass: on every shape of
    /// the test above (two chunks: the residual read at the chunk's outputs), with and
    /// without the residual and the ReLU.
    #[test]
    fn fused_batch_norm_matches_its_own_pass() {
        for (n, h, w, cin, cout) in [
            (3, 11, 6, 32, 96),
            (32, 8, 8, 64, 64),
            (5, 4, 4, 64, 64),
            (32, 32, 32, 32, 32),
        ] {
            let Some((g, direct)) = plan(n, h, w, cin, cout) else {
                return crate::test_support::skip("amx", "the direct path", "this CPU (or OS) has no AMX-BF16 tiles");
            };
            let val = |i: usize, salt: f32| ((i as f32 * 0.618 + salt).sin() * 1000.0).fract();
            let x: Vec<f32> = (0..g.input.numel()).map(|i| val(i, 0.1)).collect();
            let wt: Vec<f32> = (0..g.weight_len()).map(|i| val(i, 0.2)).collect();
            let residual: Vec<f32> = (0..g.output().numel()).map(|i| val(i, 0.3)).collect();
            let (center, scale, shift): (Vec<f32>, Vec<f32>, Vec<f32>) = (0..cout)
                .map(|c| (val(c, 0.4), 1.0 + val(c, 0.5), val(c, 0.6)))
                .collect();
            let mut conv = vec![f32::NAN; g.output().numel()];
            direct.forward_then(&x, &wt, None, &mut conv);
            for (residual, relu) in [(None, false), (Some(&residual[..]), true)] {
                let affine = Affine {
                    center: &center,
                    scale: scale.clone(),
                    shift: &shift,
                    residual,
                    relu,
                };
                let mut want = vec![f32::NAN; conv.len()];
                affine.apply(g.output().rows(), &conv, &mut want);
                let mut got = vec![f32::NAN; conv.len()];
                direct.forward_then(&x, &wt, Some(&affine), &mut got);
                assert!(direct.chunk(2 * (h + 1) * (w + 1) * cin) < n || h < 32, "two chunks");
                let differ = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(differ, None, "{g:?} relu {relu}");
                assert!(!relu || want.contains(&0.0), "the ReLU clips some outputs");
            }
        }
    }

    /// Two convolutions in a row, the first's outputs staged as the second's stack
    /// ([`Direct::forward_pair`]), give the bits of the two calls one after the other: maps
    /// closed by a zero column (11 x 6 to 11 x 6, 32 x 32 in two chunks of the first, several
    /// of the second), masked copies (8 x 8, 4 x 4), a stride-2 first convolution (16 x 16 to
    /// 8 x 8) and a 1x1 one, with and without a residual on the second. Checked to fail with
    /// the staged stack's zero rows left as they were (NaN) and with the masked column of a
    /// copy written.
    #[test]
    fn staged_pair_matches_two_calls() {
        for (n, h, w, c0, c1, c2, (side, stride)) in [
            (3, 11, 6, 32, 64, 32, (3, 1)),
            (20, 32, 32, 64, 32, 64, (3, 1)),
            (9, 8, 8, 64, 64, 64, (3, 1)),
            (5, 4, 4, 64, 32, 64, (3, 1)),
            (6, 16, 16, 32, 64, 64, (3, 2)),
            (4, 16, 16, 32, 64, 32, (1, 2)),
        ] {
            let Some((ga, a)) = plan_of(n, h, w, c0, c1, (side, stride)) else {
                return crate::test_support::skip("amx", "the direct path", "this CPU (or OS) has no AMX-BF16 tiles");
            };
            let mid = ga.output();
            let (gb, b) = plan(n, mid.h, mid.w, c1, c2).expect("AMX, as the first");
            let val = |i: usize, salt: f32| ((i as f32 * 0.618 + salt).sin() * 1000.0).fract();
            let x: Vec<f32> = (0..ga.input.numel()).map(|i| val(i, 0.1)).collect();
            let wa: Vec<f32> = (0..ga.weight_len()).map(|i| val(i, 0.2)).collect();
            let wb: Vec<f32> = (0..gb.weight_len()).map(|i| val(i, 0.3)).collect();
            let residual: Vec<f32> = (0..gb.output().numel()).map(|i| val(i, 0.4)).collect();
            let statistics = |c: usize, salt: f32| -> (Vec<f32>, Vec<f32>, Vec<f32>) {
                (0..c)
                    .map(|i| (val(i, salt), 1.0 + val(i, salt + 0.1), val(i, salt + 0.2)))
                    .collect()
            };
            let ((ca, sa, ha), (cb, sb, hb)) = (statistics(c1, 0.5), statistics(c2, 0.8));
            let then_a = Affine {
                center: &ca,
                scale: sa,
                shift: &ha,
                residual: None,
                relu: true,
            };
            for residual in [None, Some(&residual[..])] {
                let then_b = Affine {
                    center: &cb,
                    scale: sb.clone(),
                    shift: &hb,
                    residual,
                    relu: residual.is_some(),
                };
                let mut between = vec![f32::NAN; mid.numel()];
                a.forward_then(&x, &wa, Some(&then_a), &mut between);
                let mut want = vec![f32::NAN; gb.output().numel()];
                b.forward_then(&between, &wb, Some(&then_b), &mut want);
                // Stale values in the staged buffer, where padding must be zeros.
                STAGED.with(|buffer| buffer.borrow_mut().fill(f32::NAN.to_bits()));
                let mut got = vec![f32::NAN; want.len()];
                Direct::forward_pair((&a, &wa, Some(&then_a)), (&b, &wb, Some(&then_b)), &x, &mut got);
                let differ = got.iter().zip(&want).position(|(g, w)| g.to_bits() != w.to_bits());
                assert_eq!(differ, None, "{ga:?} then {gb:?}");
            }
            assert!(n < 20 || a.chunk(2 * (h + 1) * (w + 1) * c0) < n, "chunks");
        }
    }
}
