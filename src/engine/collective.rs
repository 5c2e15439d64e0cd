//! How the processes of a data-parallel run exchange buffers: averages and copies of device
//! buffers across ranks (PyTorch DDP's all-reduce and broadcast). Kept apart from
//! [`Backend`], which is memory and kernels: a backend runs under one process ([`Local`]) or
//! under a transport the cluster already has (MPI between CPU processes, NCCL between GPUs),
//! and the training loop sees only this trait.

use super::Backend;
use std::rc::Rc;

/// What a synchronised batch norm keeps to sum its statistics over the ranks (see
/// [`super::SyncStats`]), as PyTorch's SyncBatchNorm keeps its process group.
pub type StatsSum = Rc<dyn Fn(&mut [f64])>;

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
    /// [`Collective::all_reduce_host`] as a handle a model's batch norms can keep
    /// (SyncBatchNorm); `None` with one process, whose batch is the whole batch.
    fn stats_sum(&self) -> Option<StatsSum>;
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
    fn stats_sum(&self) -> Option<StatsSum> {
        None
    }
}

/// A borrowed collective is one too: a command holds the launch's world and hands out either
/// it or a backend's own transport as one boxed type.
impl<B: Backend, C: Collective<B> + ?Sized> Collective<B> for &C {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn all_reduce_mean(&self, be: &B, buf: &mut B::Buf, len: usize) {
        (**self).all_reduce_mean(be, buf, len)
    }
    fn broadcast(&self, be: &B, buf: &mut B::Buf, len: usize, root: usize) {
        (**self).broadcast(be, buf, len, root)
    }
    fn all_reduce_host(&self, values: &mut [f64]) {
        (**self).all_reduce_host(values)
    }
    fn stats_sum(&self) -> Option<StatsSum> {
        (**self).stats_sum()
    }
}
