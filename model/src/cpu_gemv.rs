//! Matrix-vector products for single-token decoding on CPU.
//!
//! Decoding one sequence reads every weight once per token, so its speed is memory bandwidth. libtorch sends
//! `[1, in] x [out, in]^T` to MKL's sgemv, which runs on one core here and reads about 10 GB/s of a machine that
//! delivers about 28 GB/s to two cores. [`DecodePool`] splits the output rows between the decoding thread and
//! helper threads that stay awake for the whole decode loop (a wake-up per product would cost more than the
//! product), and streams each weight row once. Everything else (batches, prefill, training, GPU) stays on libtorch.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::error::Result;

const LANES: usize = 16;
/// How long an idle helper spins before it blocks (between tokens the decoding thread samples and detokenizes).
const SPIN: Duration = Duration::from_millis(20);

/// Borrowed views of a CPU tensor's storage. This is the one place the model reads libtorch memory directly.
#[allow(unsafe_code)]
mod storage {
    use tch::{Device, Kind, Tensor};

    /// The elements of a contiguous CPU tensor of `kind`, whose elements are `T`-sized.
    fn elements<T>(t: &Tensor, kind: Kind) -> Option<&[T]> {
        if t.device() != Device::Cpu || t.kind() != kind || !t.is_contiguous() {
            return None;
        }
        let len = t.numel();
        let ptr = t.data_ptr() as *const T;
        if len == 0 || ptr.is_null() || kind.elt_size_in_bytes() != std::mem::size_of::<T>() {
            return None;
        }
        // SAFETY: the tensor is contiguous, on the CPU and of `kind`, whose elements have the size of `T`, so its
        // storage holds `len` such values starting at `data_ptr()` (which accounts for the storage offset). The
        // slice borrows `t`, whose storage stays alive and is not resized while borrowed; model weights are not
        // written during a forward pass.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }

    /// The values of a contiguous CPU f32 tensor.
    pub fn f32s(t: &Tensor) -> Option<&[f32]> {
        elements(t, Kind::Float)
    }

    /// The bit patterns of a contiguous CPU bf16 tensor.
    pub fn bf16s(t: &Tensor) -> Option<&[u16]> {
        elements(t, Kind::BFloat16)
    }
}

/// `sum(w[i] * x[i])` with `LANES` independent accumulators (so the loop vectorizes without reassociating), the
/// weights widened to f32 by `widen`.
fn dot<W: Copy>(w: &[W], x: &[f32], widen: impl Fn(W) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (wc, wr) = w.as_chunks::<LANES>();
    let (xc, xr) = x.as_chunks::<LANES>();
    for (a, b) in wc.iter().zip(xc) {
        for i in 0..LANES {
            acc[i] += widen(a[i]) * b[i];
        }
    }
    acc.iter().sum::<f32>() + wr.iter().zip(xr).map(|(a, b)| widen(*a) * b).sum::<f32>()
}

fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Weight rows of one dtype, borrowed from libtorch tensors.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Rows<'_> {
    fn dot(&self, row: usize, input: &[f32]) -> f32 {
        let cols = input.len();
        match self {
            Rows::F32(w) => dot(&w[row * cols..(row + 1) * cols], input, |v| v),
            Rows::Bf16(w) => dot(&w[row * cols..(row + 1) * cols], input, bf16_to_f32),
        }
    }
}

/// One matrix-vector product over several stacked matrices: `[W_1; W_2; ...] x`.
#[derive(Clone)]
struct Product<'a> {
    matrices: Arc<Vec<Rows<'a>>>,
    /// First output row of each matrix, and the total.
    starts: Arc<Vec<usize>>,
    input: Arc<Vec<f32>>,
}

impl Product<'_> {
    fn total_rows(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    fn compute(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let mut m = 0;
        rows.map(|row| {
            while row >= self.starts[m + 1] {
                m += 1;
            }
            self.matrices[m].dot(row - self.starts[m], &self.input)
        })
        .collect()
    }
}

struct Job<'a> {
    product: Product<'a>,
    rows: std::ops::Range<usize>,
}

fn recv_spinning<T>(rx: &Receiver<T>) -> Option<T> {
    let started = Instant::now();
    for spins in 0u32.. {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(TryRecvError::Disconnected) => return None,
            // Reading the clock costs more than a channel poll: look at it only now and then.
            Err(TryRecvError::Empty) if spins % 1024 == 1023 && started.elapsed() >= SPIN => break,
            Err(TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
    rx.recv().ok()
}

/// Helper threads for the matrix-vector products of one decode loop; see [`with_decode_pool`].
pub struct DecodePool<'a> {
    helpers: Vec<(Sender<Job<'a>>, Receiver<Vec<f32>>)>,
}

impl std::fmt::Debug for DecodePool<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodePool")
            .field("helpers", &self.helpers.len())
            .finish()
    }
}

/// Runs `f` with a pool of helper threads (one per core beyond the caller's), joined when `f` returns.
pub fn with_decode_pool<'a, R>(f: impl FnOnce(&DecodePool<'a>) -> R) -> R {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let mut helpers = Vec::with_capacity(threads.saturating_sub(1));
        for _ in 1..threads {
            let (job_tx, job_rx) = std::sync::mpsc::channel::<Job<'a>>();
            let (out_tx, out_rx) = std::sync::mpsc::channel();
            scope.spawn(move || {
                while let Some(job) = recv_spinning(&job_rx) {
                    if out_tx.send(job.product.compute(job.rows)).is_err() {
                        break;
                    }
                }
            });
            helpers.push((job_tx, out_rx));
        }
        // Dropping the pool closes the job channels, which ends the helpers before the scope joins them.
        let pool = DecodePool { helpers };
        f(&pool)
    })
}

impl<'a> DecodePool<'a> {
    fn run(&self, product: Product<'a>) -> Vec<f32> {
        let total = product.total_rows();
        let parts = self.helpers.len() + 1;
        let per_part = total.div_ceil(parts);
        let mut sent = Vec::with_capacity(self.helpers.len());
        for (i, (tx, rx)) in self.helpers.iter().enumerate() {
            let start = ((i + 1) * per_part).min(total);
            let end = ((i + 2) * per_part).min(total);
            if start < end
                && tx
                    .send(Job {
                        product: product.clone(),
                        rows: start..end,
                    })
                    .is_ok()
            {
                sent.push((rx, start..end));
            }
        }
        let mut out = product.compute(0..per_part.min(total));
        for (rx, rows) in sent {
            // A helper only disappears if it panicked; compute its share here rather than lose it.
            match recv_spinning(rx) {
                Some(part) => out.extend(part),
                None => out.extend(product.compute(rows)),
            }
        }
        if out.len() < total {
            let done = out.len();
            out.extend(product.compute(done..total));
        }
        out
    }

    /// `x W_i^T (+ b_i)` for each weight when `x` is a single CPU row and the weights are contiguous f32 or bf16
    /// matrices without gradients; None otherwise (the caller uses libtorch).
    pub fn linear_single_row_many(
        &self,
        x: &Tensor,
        weights: &[(&'a Tensor, Option<&Tensor>)],
    ) -> Result<Option<Vec<Tensor>>> {
        let cols = x.numel() as i64;
        let usable = x.device() == Device::Cpu
            && !x.requires_grad()
            && !weights.is_empty()
            && weights.iter().all(|(w, _)| {
                let size = w.size();
                size.len() == 2 && size[1] == cols && !w.requires_grad()
            });
        if !usable {
            return Ok(None);
        }
        let matrices: Option<Vec<Rows<'a>>> = weights
            .iter()
            .map(|(w, _)| {
                storage::f32s(w)
                    .map(Rows::F32)
                    .or_else(|| storage::bf16s(w).map(Rows::Bf16))
            })
            .collect();
        let Some(matrices) = matrices else { return Ok(None) };
        let mut starts = vec![0];
        for (w, _) in weights {
            starts.push(starts[starts.len() - 1] + w.size()[0] as usize);
        }
        let input = Vec::<f32>::try_from(x.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)?;
        let out = self.run(Product {
            matrices: Arc::new(matrices),
            starts: Arc::new(starts),
            input: Arc::new(input),
        });
        // Bias is added before rounding to the input's dtype, as libtorch's addmm does.
        let all = Tensor::f_from_slice(&out)?;
        let mut results = Vec::with_capacity(weights.len());
        let mut offset = 0;
        for (w, bias) in weights {
            let rows = w.size()[0];
            let mut shape = x.size();
            if let Some(last) = shape.last_mut() {
                *last = rows;
            }
            let mut y = all.f_narrow(0, offset, rows)?;
            if let Some(b) = bias {
                y = y.f_add(&b.f_to_kind(Kind::Float)?)?;
            }
            results.push(y.f_to_kind(x.kind())?.f_reshape(&shape)?);
            offset += rows;
        }
        Ok(Some(results))
    }

    /// [`DecodePool::linear_single_row_many`] for one weight.
    pub fn linear_single_row(
        &self,
        x: &Tensor,
        weight: &'a Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        Ok(self
            .linear_single_row_many(x, &[(weight, bias)])?
            .and_then(|mut v| v.pop()))
    }
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
                let ours = with_decode_pool(|p| {
                    p.linear_single_row(&x, &w, Some(&b))
                        .unwrap()
                        .expect("kernel applies")
                });
                let theirs = x.linear(&w, Some(&b));
                assert_eq!(ours.size(), theirs.size());
                assert_eq!(ours.kind(), kind);
                // f32: summation order only; bf16: at most one rounding step of the largest output.
                let scale = theirs.to_kind(Kind::Float).abs().max().double_value(&[]);
                let tol = if kind == Kind::Float { 1e-4 } else { scale / 128.0 };
                let diff = (ours.to_kind(Kind::Float) - theirs.to_kind(Kind::Float))
                    .abs()
                    .max()
                    .double_value(&[]);
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
        let both = with_decode_pool(|p| {
            p.linear_single_row_many(&x, &[(&q, None), (&k, Some(&b))])
                .unwrap()
                .unwrap()
        });
        for (ours, theirs) in both
            .iter()
            .zip([x.linear::<&Tensor>(&q, None), x.linear(&k, Some(&b))])
        {
            assert_eq!(ours.size(), theirs.size());
            assert!((ours - theirs).abs().max().double_value(&[]) < 1e-4);
        }
    }

    #[test]
    fn declines_batches_and_trainable_weights() {
        let w = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        assert!(with_decode_pool(|p| p
            .linear_single_row(&Tensor::randn([2, 8], (Kind::Float, Device::Cpu)), &w, None)
            .unwrap()
            .is_none()));
        let w = w.set_requires_grad(true);
        assert!(with_decode_pool(|p| p
            .linear_single_row(&Tensor::randn([1, 8], (Kind::Float, Device::Cpu)), &w, None)
            .unwrap()
            .is_none()));
    }
}
