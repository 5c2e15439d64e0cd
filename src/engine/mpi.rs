//! The [`Collective`] of processes launched by `mpirun` or Slurm's `srun`: MPI through the
//! `mpi` crate (rsmpi) and the MPI library the system has (cargo feature `mpi`).
//!
//! Buffers pass through the host: on the CPU backend that is the buffer itself plus one copy
//! into a persistent receive buffer; a GPU backend's buffers are staged (NCCL is its fast path).

use super::Backend;
use super::collective::{Collective, StatsSum};
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use std::cell::RefCell;
use std::ops::Deref;
use std::rc::Rc;

/// MPI's world: every process of the launch, rank 0 first.
pub struct Mpi {
    world: Rc<World>,
    /// Send and receive buffers kept from step to step (the gradient arena is 45 MB).
    host: RefCell<(Vec<f32>, Vec<f32>)>,
}

/// The communicator and the MPI library's lifetime, shared with the synchronised batch norms
/// that hold a [`StatsSum`]: MPI is finalised after the last of them is gone.
struct World {
    comm: SimpleCommunicator,
    /// The send side of [`World::sum`], kept between calls (a synchronised batch norm sums
    /// three times per layer and step).
    send: RefCell<Vec<f64>>,
    /// Finalises MPI when dropped: declared last, so it goes after the communicator.
    _universe: Universe,
}

impl Deref for World {
    type Target = SimpleCommunicator;
    fn deref(&self) -> &SimpleCommunicator {
        &self.comm
    }
}

impl World {
    fn sum(&self, values: &mut [f64]) {
        let mut send = self.send.borrow_mut();
        send.clear();
        send.extend_from_slice(values);
        self.comm.all_reduce_into(&send[..], values, SystemOperation::sum());
    }
}

impl Mpi {
    /// Initialises MPI (once per process): `None` when it already was.
    pub fn init() -> Option<Self> {
        let universe = mpi::initialize()?;
        Some(Self {
            world: Rc::new(World {
                comm: universe.world(),
                send: RefCell::new(Vec::new()),
                _universe: universe,
            }),
            host: RefCell::new((Vec::new(), Vec::new())),
        })
    }

    /// Ends every rank of the launch with `code` (a rank that cannot go on, so that the others
    /// do not wait for it forever).
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// Makes a panic on this rank end every rank (after the panic's message), instead of
    /// leaving the others waiting in a collective while this one waits in `MPI_Finalize`.
    pub fn abort_on_panic(&self) {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            // SAFETY: MPI is initialised (this `Mpi` exists), and MPI_Abort may be called from
            // any thread; it does not return.
            unsafe { mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101) };
        }));
    }
}

impl<B: Backend> Collective<B> for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_mean(&self, be: &B, buf: &mut B::Buf, len: usize) {
        let mut host = self.host.borrow_mut();
        let (send, recv) = &mut *host;
        recv.resize(len, 0.0);
        let scale = 1.0 / self.world.size() as f32;
        if let Some(values) = be.host_mut(buf) {
            // Host memory: sum straight from it, and scale on the way back.
            self.world
                .all_reduce_into(&values[..len], &mut recv[..], SystemOperation::sum());
            for (v, &s) in values[..len].iter_mut().zip(recv.iter()) {
                *v = s * scale;
            }
            return;
        }
        send.resize(len, 0.0);
        be.download(buf, send);
        self.world
            .all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        recv.iter_mut().for_each(|v| *v *= scale);
        be.upload(recv, buf);
    }

    fn broadcast(&self, be: &B, buf: &mut B::Buf, len: usize, root: usize) {
        let mut host = self.host.borrow_mut();
        let send = &mut host.0;
        send.resize(len, 0.0);
        be.download(buf, send);
        self.world.process_at_rank(root as i32).broadcast_into(&mut send[..]);
        be.upload(send, buf);
    }

    fn all_reduce_host(&self, values: &mut [f64]) {
        self.world.sum(values)
    }

    fn stats_sum(&self) -> Option<StatsSum> {
        let world = Rc::clone(&self.world);
        Some(Rc::new(move |values: &mut [f64]| world.sum(values)))
    }
}
