//! Epoch plans (which images make each batch) and a background thread that builds batches
//! ahead of the training step, so loading and augmentation overlap with compute.

use super::images::{Images, Normalization};
use super::shard::Shard;
use super::transform::{Augment, Batch, BatchKey, BatchPlan, make_batch, stream_seed};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

/// Batches of one pass over a set of images, in order or shuffled, and the run's seed and the
/// epoch that key each batch's randomness.
#[derive(Clone, Debug)]
pub struct EpochPlan {
    order: Vec<u32>,
    batch_size: usize,
    seed: u64,
    epoch: usize,
}

impl EpochPlan {
    /// The seed's DataLoader keeps the last, partial batch (50,000 / 64: 782 batches).
    pub fn new(n: usize, batch_size: usize, shuffle: bool, seed: u64, epoch: usize) -> Self {
        assert!(batch_size > 0, "batch size must be positive");
        let mut order: Vec<u32> = (0..n as u32).collect();
        if shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(stream_seed(&[
                seed,
                epoch as u64,
                0x5348_5546,
            ])));
        }
        Self {
            order,
            batch_size,
            seed,
            epoch,
        }
    }
    /// The same plan without its last, partial batch (PyTorch's `drop_last`) when `drop`.
    pub fn drop_last(mut self, drop: bool) -> Self {
        if drop {
            self.order
                .truncate(self.order.len() / self.batch_size * self.batch_size);
        }
        self
    }
    /// The key of batch `b`'s randomness (crops, flips): the same on every device and rank.
    pub fn key(&self, b: usize) -> BatchKey {
        BatchKey::new(self.seed, self.epoch, b)
    }
    pub fn num_batches(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }
    pub fn batch(&self, b: usize) -> &[u32] {
        let start = b * self.batch_size;
        &self.order[start..(start + self.batch_size).min(self.order.len())]
    }
}

/// Builds batches `first..` of `plan` (`shard`'s part of each) on a background thread, a few
/// ahead of the consumer. The thread stops when the receiver is dropped.
pub fn spawn_loader(
    images: Arc<Images>,
    plan: EpochPlan,
    first: usize,
    aug: Augment,
    norm: Normalization,
    shard: Shard,
) -> Receiver<Batch> {
    let (tx, rx) = sync_channel(4);
    std::thread::Builder::new()
        .name("batch-loader".into())
        .spawn(move || {
            for b in first..plan.num_batches() {
                let batch = BatchPlan::new(&images, plan.batch(b), aug, plan.key(b))
                    .shard(shard)
                    .into_batch(&images, &norm);
                if tx.send(batch).is_err() {
                    return;
                }
            }
        })
        .expect("spawn the batch loader thread");
    rx
}

/// Batches of `images` in order, without augmentation (evaluation): the ones `shard` owns
/// (all of them for `Shard::WHOLE`).
pub fn eval_batches<'a>(
    images: &'a Images,
    batch_size: usize,
    norm: &'a Normalization,
    shard: Shard,
) -> impl Iterator<Item = Batch> + 'a {
    let plan = EpochPlan::new(images.len(), batch_size, false, 0, 0);
    (0..plan.num_batches())
        .filter(move |&b| shard.owns_batch(b))
        .map(move |b| make_batch(images, plan.batch(b), Augment::NONE, BatchKey::new(0, 0, b), norm))
}
