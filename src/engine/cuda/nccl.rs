//! NCCL: the [`Collective`] of the CUDA backend. Gradients are averaged and weights broadcast
//! in GPU memory, on the backend's own stream (so they queue behind the backward pass like any
//! kernel); host values (evaluation counts, the stop vote, SyncBatchNorm's sums) and NCCL's
//! own start-up go through the host collective the ranks were launched with (MPI).
//!
//! NCCL is loaded at run time, so the binary builds and runs without it. We bind the six
//! functions we call ourselves instead of using cudarc's `nccl` module: cudarc 0.19 opens the
//! library as `libnccl.so` (or `.so.<CUDA major>`), a name only NCCL's development package
//! provides, while the library itself is `libnccl.so.2` (Debian's `libnccl2`, PyTorch's
//! `nvidia-nccl` wheels).

use super::{Cuda, libs};
use crate::engine::collective::{Collective, StatsSum};
use cudarc::driver::CudaSlice;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

/// NCCL's soname (the ABI has been 2 since 2017).
const LIBRARY: &str = "libnccl.so.2";

/// `ncclUniqueId`: the 128 bytes rank 0 makes and every rank needs to join the communicator.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId([c_char; 128]);

type Comm = *mut c_void;

/// `ncclFloat32`, `ncclAvg` (NCCL 2.10 and later).
const FLOAT32: c_int = 7;
const AVG: c_int = 4;

type Reduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int;

/// The functions of `nccl.h` this backend calls.
struct Api {
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    /// `ncclAllReduce(send, recv, count, type, op, comm, stream)`.
    all_reduce: Reduce,
    /// `ncclBroadcast(send, recv, count, type, root, comm, stream)` (same shape).
    broadcast: Reduce,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    /// Keeps the functions above valid.
    _lib: libloading::Library,
}

impl Api {
    fn version(&self) -> Result<c_int, String> {
        let mut v: c_int = 0;
        self.check("version", unsafe { (self.get_version)(&mut v) })?;
        Ok(v)
    }

    fn check(&self, what: &str, code: c_int) -> Result<(), String> {
        if code == 0 {
            return Ok(());
        }
        let text = unsafe { CStr::from_ptr((self.error_string)(code)) };
        Err(format!("NCCL {what}: {} (code {code})", text.to_string_lossy()))
    }
}

/// Loads NCCL once per process, or says in one line why it cannot.
pub fn load() -> Result<(), String> {
    api().map(|_| ())
}

fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let lib = libs::open_library(LIBRARY)
            .map_err(|e| format!("NCCL is needed to train on GPUs under several ranks: {e}"))?;
        let api = Api {
            get_version: symbol(&lib, "ncclGetVersion")?,
            get_unique_id: symbol(&lib, "ncclGetUniqueId")?,
            comm_init_rank: symbol(&lib, "ncclCommInitRank")?,
            all_reduce: symbol(&lib, "ncclAllReduce")?,
            broadcast: symbol(&lib, "ncclBroadcast")?,
            comm_destroy: symbol(&lib, "ncclCommDestroy")?,
            error_string: symbol(&lib, "ncclGetErrorString")?,
            _lib: lib,
        };
        // The mean (ncclAvg) came with 2.10.
        let v = api.version()?;
        if v < 21000 {
            return Err(format!("{LIBRARY} is NCCL {}, and 2.10 or later is needed", dotted(v)));
        }
        Ok(api)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Loads NCCL on each of `ranks` ranks together (`sum` adds host values over them): when any
/// rank lacks it, every rank fails, so that none waits in NCCL for one that gave up.
pub fn load_on_all_ranks(sum: &dyn Fn(&mut [f64]), ranks: usize) -> Result<(), String> {
    let loaded = load();
    let mut missing = [loaded.is_err() as u8 as f64];
    sum(&mut missing);
    loaded?;
    if missing[0] > 0.0 {
        return Err(format!("NCCL is missing on {} of the {ranks} ranks", missing[0]));
    }
    Ok(())
}

/// The function `name` of NCCL, typed as `nccl.h` declares it (the caller's `T`).
fn symbol<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T, String> {
    unsafe { lib.get::<T>(name) }
        .map(|s| *s)
        .map_err(|e| format!("{LIBRARY}: {e}"))
}

/// The NCCL version as `major.minor.patch`.
pub fn version() -> Result<String, String> {
    Ok(dotted(api()?.version()?))
}

/// 2.9 and later encode versions as major * 10000 + minor * 100 + patch.
fn dotted(v: c_int) -> String {
    format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
}

/// Every GPU rank of a launch joined in one NCCL communicator.
pub struct Nccl<'a> {
    host: &'a dyn Collective<Cuda>,
    api: &'static Api,
    comm: Comm,
}

impl<'a> Nccl<'a> {
    /// Joins the communicator of all `host.size()` ranks, each on its own GPU `be` (NCCL
    /// refuses two ranks on one GPU). Every rank calls this together; each returns the same
    /// kind of outcome (when NCCL is missing on any rank, all of them fail, none waits).
    pub fn new(be: &Cuda, host: &'a dyn Collective<Cuda>) -> Result<Self, String> {
        load_on_all_ranks(&|v| host.all_reduce_host(v), host.size())?;
        let api = api()?;
        // Rank 0 makes the id; the host collective's sum carries its bytes to the others
        // (every other rank adds zeros), plus a flag for a failure on rank 0.
        let mut id = UniqueId([0; 128]);
        let mut made = Ok(());
        if host.rank() == 0 {
            made = api.check("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) });
        }
        let mut shared: Vec<f64> = id.0.iter().map(|&b| b as u8 as f64).collect();
        shared.push(made.is_err() as u8 as f64);
        host.all_reduce_host(&mut shared);
        made?;
        if shared[128] > 0.0 {
            return Err("NCCL could not make a communicator id on rank 0".into());
        }
        for (b, &v) in id.0.iter_mut().zip(&shared) {
            *b = v as u8 as c_char;
        }
        // Bound to the backend's device by its context: cudarc binds it to this thread.
        be.ctx.bind_to_thread().map_err(|e| format!("CUDA context: {e:?}"))?;
        let mut comm: Comm = std::ptr::null_mut();
        let (size, rank) = (host.size() as c_int, host.rank() as c_int);
        api.check("ncclCommInitRank", unsafe {
            (api.comm_init_rank)(&mut comm, size, id, rank)
        })?;
        Ok(Self { host, api, comm })
    }

    fn call(&self, be: &Cuda, what: &str, f: Reduce, buf: &mut CudaSlice<f32>, len: usize, arg: c_int) {
        assert!(
            len <= buf.len(),
            "NCCL {what}: {len} values of a buffer of {}",
            buf.len()
        );
        if len == 0 {
            return;
        }
        let p = be.ptr(buf) as *mut c_void;
        let stream = be.stream.cu_stream() as *mut c_void;
        let code = unsafe { f(p, p, len, FLOAT32, arg, self.comm, stream) };
        if let Err(e) = self.api.check(what, code) {
            panic!("{e}");
        }
    }
}

impl Drop for Nccl<'_> {
    fn drop(&mut self) {
        // Waits for the communicator's queued work; nothing to report at exit.
        unsafe { (self.api.comm_destroy)(self.comm) };
    }
}

impl Collective<Cuda> for Nccl<'_> {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn size(&self) -> usize {
        self.host.size()
    }
    fn all_reduce_mean(&self, be: &Cuda, buf: &mut CudaSlice<f32>, len: usize) {
        self.call(be, "all-reduce", self.api.all_reduce, buf, len, AVG);
    }
    fn broadcast(&self, be: &Cuda, buf: &mut CudaSlice<f32>, len: usize, root: usize) {
        self.call(be, "broadcast", self.api.broadcast, buf, len, root as c_int);
    }
    fn all_reduce_host(&self, values: &mut [f64]) {
        self.host.all_reduce_host(values)
    }
    fn stats_sum(&self) -> Option<StatsSum> {
        self.host.stats_sum()
    }
}

#[cfg(test)]
mod tests {
    /// The bindings resolve against the NCCL this machine has (needs no GPU; skipped without
    /// NCCL): every symbol is found and the version reads back.
    #[test]
    fn nccl_loads_without_a_gpu() {
        match super::version() {
            Ok(v) => assert!(v.starts_with("2."), "{v}"),
            Err(e) if e.contains("not found") => crate::test_support::skip("nccl", "loading NCCL", &e),
            Err(e) => panic!("{e}"),
        }
    }
}
