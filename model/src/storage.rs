//! Borrowed views of a CPU tensor's storage: the one place the model reads and writes libtorch memory directly.
//! The decode kernels work on these slices so that a step costs arithmetic, not op dispatch.
#![allow(unsafe_code)]

use tch::{Device, Kind, Tensor};

/// Whether `t` is a contiguous CPU tensor of `kind` whose elements are `T`-sized, and its length.
fn checked<T>(t: &Tensor, kind: Kind) -> Option<usize> {
    if t.device() != Device::Cpu || t.kind() != kind || !t.is_contiguous() {
        return None;
    }
    let len = t.numel();
    if len == 0 || t.data_ptr().is_null() || kind.elt_size_in_bytes() != std::mem::size_of::<T>() {
        return None;
    }
    Some(len)
}

/// The elements of a contiguous CPU tensor of `kind`, whose elements are `T`-sized.
fn elements<T>(t: &Tensor, kind: Kind) -> Option<&[T]> {
    let len = checked::<T>(t, kind)?;
    // SAFETY: the tensor is contiguous, on the CPU and of `kind`, whose elements have the size of `T`, so its
    // storage holds `len` such values starting at `data_ptr()` (which accounts for the storage offset). The
    // slice borrows `t`, whose storage stays alive and is not resized while borrowed; model weights are not
    // written during a forward pass.
    Some(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, len) })
}

/// The values of a contiguous CPU f32 tensor.
pub fn f32s(t: &Tensor) -> Option<&[f32]> {
    elements(t, Kind::Float)
}

/// The bit patterns of a contiguous CPU bf16 tensor.
pub fn bf16s(t: &Tensor) -> Option<&[u16]> {
    elements(t, Kind::BFloat16)
}

/// The bytes of a contiguous CPU u8 tensor (quantized weight blocks).
pub fn u8s(t: &Tensor) -> Option<&[u8]> {
    elements(t, Kind::Uint8)
}

/// The values of a contiguous CPU f32 tensor, writable. Only for tensors whose storage the caller owns alone (a
/// KV cache's buffers, which are never handed out while this borrow lives: it holds `&mut` of their owner).
pub fn f32s_mut(t: &mut Tensor) -> Option<&mut [f32]> {
    let len = checked::<f32>(t, Kind::Float)?;
    // SAFETY: as in `elements`; and the caller holds the tensor mutably and does not share its storage with any
    // other live tensor or slice while this one is used, so the writes alias nothing.
    Some(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, len) })
}
