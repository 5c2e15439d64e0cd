//! What the direct convolutions' forward products read and where their sums go: f32 values,
//! or (eval mode's residual blocks) a whole batch's stack that one convolution writes as bf16
//! for the next to read ([`super::Direct::forward_pair`]).

use super::super::avx512::{self, RowsOut};
use super::super::{NR, line_pairs};
use super::{Segment, Stack};
use crate::engine::cpu::batch_norm::Affine;

/// What the forward products read: f32 NHWC values, converted chunk by chunk into the
/// stack's copies, or the whole batch's copies staged before ([`super::Direct::forward_pair`]).
#[derive(Clone, Copy)]
pub(super) enum Input<'a> {
    Values(&'a [f32]),
    Staged(&'a [&'a [u32]]),
}

/// Where the forward products' outputs go (through `then` where given): f32 NHWC values from
/// output `from` on, or a stack's copies for the next convolution ([`Staged`]).
pub(super) enum Sink<'a> {
    Values { out: &'a mut [f32], from: usize },
    Stack(Staged<'a>),
}

/// A whole batch's stack as the next convolution reads it, its copies from pixel `from` on,
/// as bf16 pairs of channels, the column each copy's side masks zeros.
pub(super) struct Staged<'a> {
    stack: Stack,
    sides: Vec<isize>,
    copies: Vec<&'a mut [u32]>,
    from: usize,
}

impl<'a> Sink<'a> {
    pub(super) fn values(out: &'a mut [f32]) -> Self {
        Sink::Values { out, from: 0 }
    }

    /// `copies` of `stack` for sources of these `sides`, from its first pixel on.
    pub(super) fn stack(stack: Stack, sides: Vec<isize>, copies: Vec<&'a mut [u32]>) -> Self {
        Sink::Stack(Staged {
            stack,
            sides,
            copies,
            from: 0,
        })
    }

    /// The outputs of `images` (`per_image` outputs of `c` channels each), their own first
    /// output 0: a chunk's.
    pub(super) fn images(&mut self, images: std::ops::Range<usize>, per_image: usize, c: usize) -> Sink<'_> {
        match self {
            Sink::Values { out, from } => {
                assert_eq!(*from, 0);
                let out = &mut out[images.start * per_image * c..images.end * per_image * c];
                Sink::Values { out, from: 0 }
            }
            Sink::Stack(staged) => {
                assert_eq!(staged.from, 0);
                // The same layout from the zero row above the first image on.
                let stack = Stack {
                    images: images.len(),
                    ..staged.stack
                };
                let at = stack.image_place(images.start) * c / 2;
                let len = stack.pixels() * c / 2;
                let copies = staged.copies.iter_mut().map(|copy| &mut copy[at..][..len]).collect();
                Sink::stack(stack, staged.sides.clone(), copies)
            }
        }
    }

    /// The outputs before output `o` and those from it on (`c` channels each).
    pub(super) fn split_at(self, o: usize, c: usize) -> (Self, Self) {
        match self {
            Sink::Values { out, from } => {
                let (head, tail) = out.split_at_mut((o - from) * c);
                (Sink::Values { out: head, from }, Sink::Values { out: tail, from: o })
            }
            Sink::Stack(Staged {
                stack,
                sides,
                copies,
                from,
            }) => {
                let pixel = stack.first() + stack.place(o);
                let at = (pixel - from) * c / 2;
                let (heads, tails) = copies.into_iter().map(|copy| copy.split_at_mut(at)).unzip();
                let part = |copies, from| Staged {
                    stack,
                    sides: sides.clone(),
                    copies,
                    from,
                };
                (Sink::Stack(part(heads, from)), Sink::Stack(part(tails, pixel)))
            }
        }
    }

    /// Channels `c0..c0 + NR` of the outputs of segment `s` (`c` channels each) from their
    /// sums (`NR` a row), through `then` (with the index of output 0 for its residual).
    /// Where the sink is a stack, the segment's places are its places there too (the same
    /// map, images and pitch: [`super::Direct::forward_pair`]).
    pub(super) fn rows(&mut self, s: Segment, c0: usize, c: usize, sums: &[f32], then: Option<(&Affine, usize)>) {
        let span = (s.len - 1) * c + NR;
        let sums = &sums[..s.len * NR];
        match self {
            Sink::Values { out, from } => {
                let out = &mut out[(s.out - *from) * c + c0..][..span];
                match then {
                    Some(then) => affine_rows(then, s.out, c0, c, sums, RowsOut::Values(out.as_mut_ptr(), c)),
                    None => {
                        for (out, sums) in out.chunks_mut(c).zip(sums.chunks_exact(NR)) {
                            out[..NR].copy_from_slice(sums);
                        }
                    }
                }
            }
            Sink::Stack(staged) => staged.rows(s, c0, c, span, sums, then),
        }
    }
}

impl Staged<'_> {
    /// [`Sink::rows`] into the stack: the unmasked copy first, then the others from it,
    /// masked.
    fn rows(&mut self, s: Segment, c0: usize, c: usize, span: usize, sums: &[f32], then: Option<(&Affine, usize)>) {
        let (stack, copies) = (self.stack, &mut self.copies);
        let pixel = stack.first() + s.place - self.from;
        let at = |r: usize| (pixel + r) * c / 2 + c0 / 2;
        let plain = self.sides.iter().position(|&side| side == 0).expect("a stride-1 stack");
        let out = &mut copies[plain][at(0)..][..span / 2];
        match then {
            Some(then) => affine_rows(then, s.out, c0, c, sums, RowsOut::Pairs(out.as_mut_ptr(), c / 2)),
            None => {
                for (out, sums) in out.chunks_mut(c / 2).zip(sums.chunks_exact(NR)) {
                    line_pairs(sums, &mut out[..NR / 2]);
                }
            }
        }
        for (copy, &side) in self.sides.iter().enumerate().filter(|&(copy, _)| copy != plain) {
            let masked = stack.masked(side);
            for r in 0..s.len {
                let mut pairs = [0; NR / 2];
                if !masked((s.place + r) % stack.pitch) {
                    pairs.copy_from_slice(&copies[plain][at(r)..][..NR / 2]);
                }
                copies[copy][at(r)..][..NR / 2].copy_from_slice(&pairs);
            }
        }
    }
}

/// The rows of `sums` (`NR` each: outputs `o..` of `c` channels, channels `c0..c0 + NR`)
/// through `affine` (with the index of output 0 for its residual) into `out`, as
/// [`Affine::row`] computes them, on AVX-512.
fn affine_rows((affine, first): (&Affine, usize), o: usize, c0: usize, c: usize, sums: &[f32], out: RowsOut) {
    assert!(sums.len().is_multiple_of(NR) && affine.scale.len() == c && c0 + NR <= c);
    let rows = sums.len() / NR;
    let columns = |v: &[f32]| v[c0..c0 + NR].as_ptr();
    let per_column = [columns(affine.center), columns(&affine.scale), columns(affine.shift)];
    let residual = affine
        .residual
        .map(|r| (r[(first + o) * c + c0..][..(rows - 1) * c + NR].as_ptr(), c));
    // SAFETY: the CPU has AVX512_BF16 (AMX chosen); `sums` holds the rows, each per-column
    // pointer NR values, the residual (sliced above) and `out` (the caller's slice) every row
    // at its distance.
    unsafe { avx512::affine_rows(sums.as_ptr(), rows, per_column, residual, affine.relu, out) }
}
