//! Which part of each batch a process computes in a data-parallel run: global batch k holds
//! the same images, with the same augmentation, on any number of ranks, cut into contiguous
//! rank slices.

use std::ops::Range;

/// One rank of `size` training together (`Shard::WHOLE`: a single process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub size: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, size: 1 };

    pub fn new(rank: usize, size: usize) -> Self {
        assert!(rank < size, "rank {rank} of {size}");
        Self { rank, size }
    }

    /// The contiguous slice of a batch of `n` images that this rank computes: the first
    /// `n % size` ranks take one image more, so that any batch splits (a global batch of 64 on
    /// 2 ranks: 32 and 32; a last batch of 16 on 3 ranks: 6, 5 and 5).
    pub fn slice(&self, n: usize) -> Range<usize> {
        let (base, extra) = (n / self.size, n % self.size);
        let start = self.rank * base + self.rank.min(extra);
        start..start + base + usize::from(self.rank < extra)
    }

    /// Whether this rank takes whole batch `b` of a sequence dealt out round-robin
    /// (evaluation: each rank scores whole batches, so sums of batch means add up exactly).
    pub fn owns_batch(&self, b: usize) -> bool {
        b % self.size == self.rank
    }
}

#[cfg(test)]
mod tests {
    use super::Shard;

    #[test]
    fn rank_slices_cover_a_batch_in_order() {
        for n in [0, 1, 5, 16, 64] {
            for size in 1..=4 {
                let slices: Vec<_> = (0..size).map(|r| Shard::new(r, size).slice(n)).collect();
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
        assert_eq!(Shard::new(1, 2).slice(64), 32..64);
        assert_eq!(Shard::new(0, 3).slice(16), 0..6);
        assert_eq!(Shard::WHOLE.slice(7), 0..7);
    }

    #[test]
    fn batches_are_dealt_round_robin() {
        let owners: Vec<usize> = (0..7)
            .map(|b| (0..3).find(|&r| Shard::new(r, 3).owns_batch(b)).unwrap())
            .collect();
        assert_eq!(owners, [0, 1, 2, 0, 1, 2, 0]);
    }
}
