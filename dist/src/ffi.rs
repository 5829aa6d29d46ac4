//! The C ABI of `c10d.cpp`. Every function returns 0, or -1 with a malloc'd message in `err`.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int};
use std::ptr::NonNull;

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

impl Drop for Group {
    fn drop(&mut self) {
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
