//! Matrix-vector products for single-token decoding on CPU.
//!
//! Decoding one sequence reads every weight once per token, so its speed is memory bandwidth. libtorch sends
//! `[1, in] x [out, in]^T` to MKL's sgemv, which runs on one core here and reads about 10 GB/s of a machine that
//! delivers about 28 GB/s to two cores. This kernel splits the output rows over all cores and streams the weight
//! rows once; everything else (batches, prefill, training, GPU) stays on libtorch.

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Rows handed to one task: large enough that scheduling costs nothing next to reading them.
const ROWS_PER_TASK: usize = 64;
const LANES: usize = 16;

/// Borrowed views of a CPU tensor's storage. This is the one place the model reads libtorch memory directly.
#[allow(unsafe_code)]
mod storage {
    use tch::{Device, Kind, Tensor};

    /// The elements of a contiguous CPU f32 tensor.
    pub fn f32s(t: &Tensor) -> Option<&[f32]> {
        if t.device() != Device::Cpu || t.kind() != Kind::Float || !t.is_contiguous() {
            return None;
        }
        let len = t.numel();
        let ptr = t.data_ptr() as *const f32;
        if len == 0 || ptr.is_null() {
            return None;
        }
        // SAFETY: the tensor is contiguous, on the CPU and of kind Float, so its storage holds `len` f32 values
        // starting at `data_ptr()` (which accounts for the storage offset). The slice borrows `t`, whose storage
        // stays alive and is not resized while borrowed; model weights are not written during a forward pass.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }

    /// The raw bits of a contiguous CPU bf16 tensor.
    pub fn bf16s(t: &Tensor) -> Option<&[u16]> {
        if t.device() != Device::Cpu || t.kind() != Kind::BFloat16 || !t.is_contiguous() {
            return None;
        }
        let len = t.numel();
        let ptr = t.data_ptr() as *const u16;
        if len == 0 || ptr.is_null() {
            return None;
        }
        // SAFETY: as for `f32s`; bf16 values are 2-byte elements, read here as their bit patterns.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }
}

fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (wc, wr) = w.as_chunks::<LANES>();
    let (xc, xr) = x.as_chunks::<LANES>();
    for (a, b) in wc.iter().zip(xc) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    acc.iter().sum::<f32>() + wr.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>()
}

fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (wc, wr) = w.as_chunks::<LANES>();
    let (xc, xr) = x.as_chunks::<LANES>();
    for (a, b) in wc.iter().zip(xc) {
        for i in 0..LANES {
            acc[i] += bf16_to_f32(a[i]) * b[i];
        }
    }
    acc.iter().sum::<f32>() + wr.iter().zip(xr).map(|(a, b)| bf16_to_f32(*a) * b).sum::<f32>()
}

/// `y = [W_1; W_2; ...] x` for row-major `[out_i, in]` weights in one parallel pass: the projections that read the
/// same input (Q, K, V; gate, up) share one dispatch to the thread pool.
fn gemv_many<W: Sync>(weights: &[&[W]], input: &[f32], dot: impl Fn(&[W], &[f32]) -> f32 + Sync) -> Vec<f32> {
    let cols = input.len();
    let mut starts = Vec::with_capacity(weights.len());
    let mut total = 0;
    for w in weights {
        starts.push(total);
        total += w.len() / cols;
    }
    let mut out = vec![0f32; total];
    out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(chunk, ys)| {
        let first = chunk * ROWS_PER_TASK;
        for (i, y) in ys.iter_mut().enumerate() {
            let row = first + i;
            let m = starts.partition_point(|&s| s <= row) - 1;
            let local = row - starts[m];
            *y = dot(&weights[m][local * cols..(local + 1) * cols], input);
        }
    });
    out
}

/// `x W_i^T (+ b_i)` for each weight through the kernel when `x` is a single CPU row and the weights are contiguous
/// f32 or bf16 matrices (all the same kind) without gradients; None otherwise (the caller uses libtorch).
pub fn linear_single_row_many(x: &Tensor, weights: &[(&Tensor, Option<&Tensor>)]) -> Result<Option<Vec<Tensor>>> {
    let cols = x.numel() as i64;
    let usable = x.device() == Device::Cpu
        && !x.requires_grad()
        && weights.iter().all(|(w, _)| {
            let size = w.size();
            size.len() == 2 && size[1] == cols && !w.requires_grad() && w.kind() == weights[0].0.kind()
        });
    if !usable || weights.is_empty() {
        return Ok(None);
    }
    let input = Vec::<f32>::try_from(x.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)?;
    let f32_weights: Option<Vec<&[f32]>> = weights.iter().map(|(w, _)| storage::f32s(w)).collect();
    let out = if let Some(ws) = f32_weights {
        gemv_many(&ws, &input, dot_f32)
    } else if let Some(ws) = weights.iter().map(|(w, _)| storage::bf16s(w)).collect::<Option<Vec<_>>>() {
        gemv_many(&ws, &input, dot_bf16)
    } else {
        return Ok(None);
    };
    let all = Tensor::f_from_slice(&out)?.f_to_kind(x.kind())?;
    let mut results = Vec::with_capacity(weights.len());
    let mut offset = 0;
    for (w, bias) in weights {
        let rows = w.size()[0];
        let mut shape = x.size();
        if let Some(last) = shape.last_mut() {
            *last = rows;
        }
        let mut y = all.f_narrow(0, offset, rows)?.f_reshape(&shape)?;
        if let Some(b) = bias {
            y = y.f_add(b)?;
        }
        results.push(y);
        offset += rows;
    }
    Ok(Some(results))
}

/// [`linear_single_row_many`] for one weight.
pub fn linear_single_row(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(linear_single_row_many(x, &[(weight, bias)])?.and_then(|mut v| v.pop()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libtorch_linear_in_f32_and_bf16() {
        tch::manual_seed(0);
        for kind in [Kind::Float, Kind::BFloat16] {
            for (out, inp) in [(37, 50), (200, 576), (1, 3)] {
                let w = Tensor::randn([out, inp], (Kind::Float, Device::Cpu)).to_kind(kind);
                let x = Tensor::randn([1, 1, inp], (Kind::Float, Device::Cpu)).to_kind(kind);
                let b = Tensor::randn([out], (Kind::Float, Device::Cpu)).to_kind(kind);
                let ours = linear_single_row(&x, &w, Some(&b)).unwrap().expect("kernel applies");
                let theirs = x.linear(&w, Some(&b));
                assert_eq!(ours.size(), theirs.size());
                assert_eq!(ours.kind(), kind);
                let tol = if kind == Kind::Float { 1e-4 } else { 0.05 };
                let diff = (ours.to_kind(Kind::Float) - theirs.to_kind(Kind::Float)).abs().max().double_value(&[]);
                assert!(diff < tol, "{kind:?} {out}x{inp}: {diff}");
            }
        }
    }

    #[test]
    fn several_projections_in_one_pass_match_separate_ones() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let (q, k) = (Tensor::randn([96, 64], opts), Tensor::randn([33, 64], opts));
        let b = Tensor::randn([33], opts);
        let x = Tensor::randn([1, 1, 64], opts);
        let both = linear_single_row_many(&x, &[(&q, None), (&k, Some(&b))]).unwrap().unwrap();
        for (ours, theirs) in both.iter().zip([x.linear::<&Tensor>(&q, None), x.linear(&k, Some(&b))]) {
            assert_eq!(ours.size(), theirs.size());
            assert!((ours - theirs).abs().max().double_value(&[]) < 1e-4);
        }
    }

    #[test]
    fn declines_batches_and_trainable_weights() {
        let w = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        assert!(linear_single_row(&Tensor::randn([2, 8], (Kind::Float, Device::Cpu)), &w, None).unwrap().is_none());
        let w = w.set_requires_grad(true);
        assert!(linear_single_row(&Tensor::randn([1, 8], (Kind::Float, Device::Cpu)), &w, None).unwrap().is_none());
    }
}
