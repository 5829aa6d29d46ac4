//! The C ABI of `c10d.cpp`. Every function returns 0, or -1 with a malloc'd message in `err`.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::Tensor;
use torch_sys::C_tensor;

/// An opaque `camelid_pg` (a ProcessGroupGloo and its TCPStore).
#[repr(C)]
pub struct RawGroup {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn camelid_c10d_free_error(err: *mut c_char);
    fn camelid_c10d_gloo(
        host: *const c_char,
        port: u16,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        out: *mut *mut RawGroup,
        err: *mut *mut c_char,
    ) -> c_int;
    fn camelid_c10d_has_nccl() -> c_int;
    fn camelid_c10d_nccl(
        host: *const c_char,
        port: u16,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        device: c_int,
        out: *mut *mut RawGroup,
        err: *mut *mut c_char,
    ) -> c_int;
    fn camelid_c10d_free(pg: *mut RawGroup);
    fn camelid_c10d_all_reduce_sum(pg: *mut RawGroup, t: *mut C_tensor, err: *mut *mut c_char) -> c_int;
    fn camelid_c10d_broadcast(
        pg: *mut RawGroup,
        t: *mut C_tensor,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn camelid_c10d_all_gather_into(
        pg: *mut RawGroup,
        out: *mut C_tensor,
        input: *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn camelid_c10d_reduce_scatter_sum(
        pg: *mut RawGroup,
        out: *mut C_tensor,
        input: *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn camelid_c10d_barrier(pg: *mut RawGroup, err: *mut *mut c_char) -> c_int;
    fn camelid_c10d_all_gather_start(
        pg: *mut RawGroup,
        out: *mut C_tensor,
        input: *mut C_tensor,
        work: *mut *mut RawWork,
        err: *mut *mut c_char,
    ) -> c_int;
    fn camelid_c10d_reduce_scatter_start(
        pg: *mut RawGroup,
        out: *mut C_tensor,
        input: *mut C_tensor,
        work: *mut *mut RawWork,
        err: *mut *mut c_char,
    ) -> c_int;
    fn camelid_c10d_work_wait(work: *mut RawWork, err: *mut *mut c_char) -> c_int;
    fn camelid_c10d_work_free(work: *mut RawWork);
}

/// An opaque `camelid_work` (a c10d Work in flight).
#[repr(C)]
pub struct RawWork {
    _private: [u8; 0],
}

/// A collective in flight, with the tensors it reads and writes (kept alive until it is waited for).
pub struct Work {
    raw: NonNull<RawWork>,
    _tensors: (Tensor, Tensor),
}

// SAFETY: a c10d Work may be waited for from any thread; the pointer is freed once, in Drop.
unsafe impl Send for Work {}

impl Work {
    /// Blocks until the collective is done.
    pub fn wait(self) -> Result<(), String> {
        let raw = self.raw.as_ptr();
        // SAFETY: `raw` is live until Drop; its tensors are held by `self`.
        call(|err| unsafe { camelid_c10d_work_wait(raw, err) })
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // Not waited for (an error path): c10d's own work item holds its tensors until the collective ends, so
        // dropping our handle frees nothing it still writes, and the caller is not held up by a collective that
        // may only end at the timeout.
        // SAFETY: created by the shim, freed exactly once here.
        unsafe { camelid_c10d_work_free(self.raw.as_ptr()) }
    }
}

/// A live process group from the shim, freed on drop.
pub struct Group(NonNull<RawGroup>);

// SAFETY: a c10d ProcessGroup may be used from any thread (PyTorch does); every method blocks until the shim
// returns, and the pointer is freed once, in Drop.
unsafe impl Send for Group {}

impl Group {
    /// Rendezvous at `host:port` and a Gloo group; errors are the shim's messages.
    pub fn gloo(host: &CStr, port: u16, rank: c_int, world: c_int, timeout_ms: i64) -> Result<Self, String> {
        let mut raw: *mut RawGroup = std::ptr::null_mut();
        // SAFETY: `host` is NUL-terminated and outlives the call; `raw` and `err` are valid out-pointers.
        call(|err| unsafe {
            camelid_c10d_gloo(host.as_ptr(), port, rank, world, timeout_ms, &mut raw, err)
        })?;
        NonNull::new(raw)
            .map(Self)
            .ok_or_else(|| "the shim returned no group".to_string())
    }

    /// Whether the shim was compiled with ProcessGroupNCCL.
    pub fn has_nccl() -> bool {
        // SAFETY: takes nothing, returns a constant.
        unsafe { camelid_c10d_has_nccl() != 0 }
    }

    /// Rendezvous at `host:port` and an NCCL group on CUDA device `device` (fails without the `nccl` build).
    pub fn nccl(
        host: &CStr,
        port: u16,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        device: c_int,
    ) -> Result<Self, String> {
        let mut raw: *mut RawGroup = std::ptr::null_mut();
        // SAFETY: as in `gloo`.
        call(|err| unsafe {
            camelid_c10d_nccl(
                host.as_ptr(),
                port,
                rank,
                world,
                timeout_ms,
                device,
                &mut raw,
                err,
            )
        })?;
        NonNull::new(raw)
            .map(Self)
            .ok_or_else(|| "the shim returned no group".to_string())
    }

    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), String> {
        let tp = t.as_mut_ptr();
        // SAFETY: `tp` is a live at::Tensor (tch's C_tensor is `torch::Tensor*`) and the group is live.
        call(|err| unsafe { camelid_c10d_all_reduce_sum(self.0.as_ptr(), tp, err) })
    }

    pub fn broadcast(&self, t: &mut Tensor, root: c_int) -> Result<(), String> {
        let tp = t.as_mut_ptr();
        // SAFETY: as in all_reduce_sum.
        call(|err| unsafe { camelid_c10d_broadcast(self.0.as_ptr(), tp, root, err) })
    }

    pub fn all_gather_into(&self, out: &mut Tensor, input: &Tensor) -> Result<(), String> {
        let op = out.as_mut_ptr();
        let ip = input.as_ptr().cast_mut();
        // SAFETY: both tensors are live for the call; c10d only reads `input`.
        call(|err| unsafe { camelid_c10d_all_gather_into(self.0.as_ptr(), op, ip, err) })
    }

    /// Starts an all-gather of `input` into `out`; the returned work holds both until it is waited for.
    pub fn all_gather_start(&self, out: &Tensor, input: &Tensor) -> Result<Work, String> {
        self.start(out, input, camelid_c10d_all_gather_start)
    }

    /// Starts a reduce-scatter (sum) of `input` into `out`; as [`Group::all_gather_start`].
    pub fn reduce_scatter_start(&self, out: &Tensor, input: &Tensor) -> Result<Work, String> {
        self.start(out, input, camelid_c10d_reduce_scatter_start)
    }

    fn start(
        &self,
        out: &Tensor,
        input: &Tensor,
        shim: unsafe extern "C" fn(
            *mut RawGroup,
            *mut C_tensor,
            *mut C_tensor,
            *mut *mut RawWork,
            *mut *mut c_char,
        ) -> c_int,
    ) -> Result<Work, String> {
        let (out, input) = (out.shallow_clone(), input.shallow_clone());
        let op = out.as_ptr().cast_mut();
        let ip = input.as_ptr().cast_mut();
        let mut raw: *mut RawWork = std::ptr::null_mut();
        // SAFETY: both tensors are live and kept alive by the returned Work until the collective is done; c10d
        // writes only `out`.
        call(|err| unsafe { shim(self.0.as_ptr(), op, ip, &mut raw, err) })?;
        let raw = NonNull::new(raw).ok_or_else(|| "the shim returned no work".to_string())?;
        Ok(Work {
            raw,
            _tensors: (out, input),
        })
    }

    pub fn reduce_scatter_sum(&self, out: &mut Tensor, input: &Tensor) -> Result<(), String> {
        let op = out.as_mut_ptr();
        let ip = input.as_ptr().cast_mut();
        // SAFETY: as in all_gather_into.
        call(|err| unsafe { camelid_c10d_reduce_scatter_sum(self.0.as_ptr(), op, ip, err) })
    }

    pub fn barrier(&self) -> Result<(), String> {
        // SAFETY: the group is live.
        call(|err| unsafe { camelid_c10d_barrier(self.0.as_ptr(), err) })
    }
}

/// Set once any c10d call of this process has failed (a peer died or timed out).
static FAILED: AtomicBool = AtomicBool::new(false);

impl Drop for Group {
    fn drop(&mut self) {
        if FAILED.load(Ordering::SeqCst) {
            // c10d's destructor waits for every queued collective, and after a peer died those only end at the
            // timeout (10 minutes by default): the process is failing anyway, so leave the group to the exit.
            return;
        }
        // SAFETY: the pointer came from the shim and is freed exactly once, here.
        unsafe { camelid_c10d_free(self.0.as_ptr()) }
    }
}

/// Runs a shim call and turns its error message into a `String`.
fn call(f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<(), String> {
    let mut err: *mut c_char = std::ptr::null_mut();
    if f(&mut err) == 0 {
        return Ok(());
    }
    FAILED.store(true, Ordering::SeqCst);
    if err.is_null() {
        return Err("c10d failed without a message".into());
    }
    // SAFETY: the shim set `err` to a NUL-terminated string from strdup, which we own and free exactly once.
    let message = unsafe { std::ffi::CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: as above; `err` is not used after this.
    unsafe { camelid_c10d_free_error(err) };
    Err(message)
}
