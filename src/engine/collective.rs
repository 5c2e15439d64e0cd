//! How the processes of a data-parallel run exchange buffers: averages and copies of device
//! buffers across ranks (PyTorch DDP's all-reduce and broadcast). Kept apart from
//! [`Backend`], which is memory and kernels: a backend runs under one process ([`Local`]) or
//! under a transport the cluster already has (MPI between CPU processes, NCCL between GPUs),
//! and the training loop sees only this trait.

use super::Backend;

pub trait Collective<B: Backend> {
    /// This process's index, `0..size()`.
    fn rank(&self) -> usize;
    /// How many processes train together.
    fn size(&self) -> usize;
    /// Replaces the first `len` values of `buf`, on every rank, by their mean over the ranks
    /// (DDP's gradient averaging: one call for the whole gradient arena).
    fn all_reduce_mean(&self, be: &B, buf: &mut B::Buf, len: usize);
    /// Copies the first `len` values of `buf` on rank `root` into `buf` on every other rank.
    fn broadcast(&self, be: &B, buf: &mut B::Buf, len: usize, root: usize);
    /// Sums host values over the ranks, in place on every rank (evaluation counts, losses,
    /// the vote to stop).
    fn all_reduce_host(&self, values: &mut [f64]);
}

/// One process: nothing to exchange, and nothing is copied.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

impl<B: Backend> Collective<B> for Local {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&self, _be: &B, _buf: &mut B::Buf, _len: usize) {}
    fn broadcast(&self, _be: &B, _buf: &mut B::Buf, _len: usize, _root: usize) {}
    fn all_reduce_host(&self, _values: &mut [f64]) {}
}

/// The contiguous slice of a batch of `n` images that `rank` of `size` computes: the first
/// `n % size` ranks take one image more, so that any batch splits (a global batch of 64 on 2
/// ranks: 32 and 32; the seed's last batch of 16 on 3 ranks: 6, 5 and 5).
pub fn rank_slice(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    assert!(rank < size, "rank {rank} of {size}");
    let (base, extra) = (n / size, n % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::rank_slice;

    #[test]
    fn rank_slices_cover_a_batch_in_order() {
        for n in [0, 1, 5, 16, 64] {
            for size in 1..=4 {
                let slices: Vec<_> = (0..size).map(|r| rank_slice(n, r, size)).collect();
                assert_eq!(slices[0].start, 0);
                assert_eq!(slices[size - 1].end, n);
                for w in slices.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "contiguous, in rank order");
                }
                let lens: Vec<usize> = slices.iter().map(|s| s.len()).collect();
                assert!(
                    lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1,
                    "{n} on {size}: {lens:?}"
                );
            }
        }
        assert_eq!(rank_slice(64, 1, 2), 32..64);
        assert_eq!(rank_slice(16, 0, 3), 0..6);
    }
}
