//! Matrix-vector products for single-token decoding on CPU, for one sequence or a small batch of them.
//!
//! Decoding one sequence reads every weight once per token, so its speed is memory bandwidth. A batched decode
//! step (a few rows) reads each weight row once too and dots it with every input row while it sits in L1.
//! libtorch sends `[1, in] x [out, in]^T` to MKL's sgemv, which runs on one core here and reads about 10 GB/s of a machine that
//! delivers about 28 GB/s to two cores. [`DecodePool`] splits the output rows between the decoding thread and
//! helper threads that stay awake for the whole decode loop (a wake-up per product would cost more than the
//! product), and streams each weight row once. Everything else (batches, prefill, training, GPU) stays on libtorch.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::error::Result;

const LANES: usize = 16;
/// The most input rows the kernel takes; larger batches are compute-bound and go to libtorch's GEMM.
pub const MAX_ROWS: usize = 64;
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
#[inline(always)]
fn dot<W: Copy>(w: &[W], x: &[f32], widen: impl Fn(W) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (wc, wr) = w.as_chunks::<LANES>();
    let (xc, xr) = x.as_chunks::<LANES>();
    for (a, b) in wc.iter().zip(xc) {
        for i in 0..LANES {
            acc[i] += widen(a[i]) * b[i];
        }
    }
    lane_sum(&acc) + wr.iter().zip(xr).map(|(a, b)| widen(*a) * b).sum::<f32>()
}

/// The sum of the accumulator lanes as a tree (halves added lane-wise), which vectorizes; a left-to-right sum
/// would be a chain of dependent scalar adds costing more than the products of a short row.
#[inline(always)]
fn lane_sum(acc: &[f32; LANES]) -> f32 {
    let h8: [f32; 8] = std::array::from_fn(|i| acc[i] + acc[i + 8]);
    let h4: [f32; 4] = std::array::from_fn(|i| h8[i] + h8[i + 4]);
    (h4[0] + h4[2]) + (h4[1] + h4[3])
}

/// [`dot`] of `w` with each of the `x.len() / w.len()` rows of `x`, appended to `out`. Rows are taken four at a
/// time so each weight chunk is widened and loaded once for four products; every product sums in exactly the
/// order [`dot`] does, so a row gets the same bits alone or in a batch.
fn dot_rows<W: Copy>(w: &[W], x: &[f32], widen: impl Fn(W) -> f32 + Copy, out: &mut Vec<f32>) {
    let cols = w.len();
    let batch = x.len() / cols.max(1);
    let (wc, wr) = w.as_chunks::<LANES>();
    let mut m = 0;
    while m + 4 <= batch {
        let xs: [&[f32]; 4] = std::array::from_fn(|k| &x[(m + k) * cols..(m + k + 1) * cols]);
        let [c0, c1, c2, c3] = xs.map(|r| r.as_chunks::<LANES>().0);
        let mut acc = [[0f32; LANES]; 4];
        for ((((a, b0), b1), b2), b3) in wc.iter().zip(c0).zip(c1).zip(c2).zip(c3) {
            let wv: [f32; LANES] = a.map(widen);
            for i in 0..LANES {
                acc[0][i] += wv[i] * b0[i];
                acc[1][i] += wv[i] * b1[i];
                acc[2][i] += wv[i] * b2[i];
                acc[3][i] += wv[i] * b3[i];
            }
        }
        for k in 0..4 {
            let tail = &xs[k][wc.len() * LANES..];
            out.push(lane_sum(&acc[k]) + wr.iter().zip(tail).map(|(a, b)| widen(*a) * b).sum::<f32>());
        }
        m += 4;
    }
    for r in m..batch {
        out.push(dot(w, &x[r * cols..(r + 1) * cols], widen));
    }
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
    /// Weight row `row` dotted with each `cols`-wide row of `inputs`, appended to `out`.
    fn dots(&self, row: usize, cols: usize, inputs: &[f32], out: &mut Vec<f32>) {
        match self {
            Rows::F32(w) => dot_rows(&w[row * cols..(row + 1) * cols], inputs, |v| v, out),
            Rows::Bf16(w) => dot_rows(&w[row * cols..(row + 1) * cols], inputs, bf16_to_f32, out),
        }
    }
}

/// f32 products with explicit AVX2 FMA: the compiler's vectorization of [`dot_rows`] keeps its accumulators in
/// memory and reaches a fraction of what the FMA units do, which matters once a batch makes decoding compute-bound.
/// A weight row times four input rows are computed together, loading each weight chunk once for four products.
/// Every (weight row, input row) pair is summed the same way whatever the tiling, so a sequence gets the same bits
/// alone or in a batch.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };
    use std::ops::Range;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// Rows `rows` of the row-major `[_, cols]` matrix `w`, each dotted with every `cols`-wide row of `x`,
    /// appended to `out` in `[row][input]` order.
    pub fn products(w: &[f32], cols: usize, rows: Range<usize>, x: &[f32], out: &mut Vec<f32>) {
        assert!(available(), "avx2::products called without AVX2 and FMA");
        assert!(rows.end * cols <= w.len() && cols > 0 && x.len().is_multiple_of(cols));
        // SAFETY: the CPU has AVX2 and FMA (asserted above), which is all `products_avx2` requires; the bounds it
        // relies on were asserted too.
        unsafe { products_avx2(w, cols, rows, x, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn products_avx2(w: &[f32], cols: usize, rows: Range<usize>, x: &[f32], out: &mut Vec<f32>) {
        let batch = x.len() / cols;
        let base = out.len();
        out.resize(base + rows.len() * batch, 0.0);
        let wrow = |r: usize| &w[r * cols..(r + 1) * cols];
        let xrow = |k: usize| &x[k * cols..(k + 1) * cols];
        let at = |row: usize, k: usize| base + (row - rows.start) * batch + k;
        // Weight rows go two at a time over each block of input rows, so the block is still in L1 for the second
        // (about 1.6x faster at 16 inputs than finishing one weight row before the next).
        for first in rows.clone().step_by(2) {
            let pair = first..(first + 2).min(rows.end);
            let mut k = 0;
            while k + 4 <= batch {
                let xs = [xrow(k), xrow(k + 1), xrow(k + 2), xrow(k + 3)];
                for row in pair.clone() {
                    for (j, value) in tile(wrow(row), xs).into_iter().enumerate() {
                        out[at(row, k + j)] = value;
                    }
                }
                k += 4;
            }
            for k in k..batch {
                for row in pair.clone() {
                    out[at(row, k)] = tile(wrow(row), [xrow(k)])[0];
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn tile<const N: usize>(w: &[f32], x: [&[f32]; N]) -> [f32; N] {
        let cols = w.len();
        let vectorized = cols / 16 * 16;
        // Two accumulators per input row, over 16-value chunks: independent FMA chains keep the single-row
        // (memory-bound) case fast, and every tile width sums a row identically.
        let mut acc: [[__m256; 2]; N] = [[_mm256_setzero_ps(); 2]; N];
        let mut c = 0;
        while c < vectorized {
            // SAFETY: `c + 16 <= vectorized <= cols`, and `w` and every row of `x` hold `cols` values, so the
            // unaligned 8-lane loads at `c` and `c + 8` are in bounds.
            unsafe {
                let p = w.as_ptr().add(c);
                let wv = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
                for k in 0..N {
                    let p = x[k].as_ptr().add(c);
                    acc[k][0] = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(p), acc[k][0]);
                    acc[k][1] = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(p.add(8)), acc[k][1]);
                }
            }
            c += 16;
        }
        std::array::from_fn(|k| {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds the 8 values one unaligned store writes.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[k][0], acc[k][1])) };
            let h4: [f32; 4] = std::array::from_fn(|j| lanes[j] + lanes[j + 4]);
            let tail: f32 = w[vectorized..]
                .iter()
                .zip(&x[k][vectorized..])
                .map(|(a, b)| a * b)
                .sum();
            (h4[0] + h4[2]) + (h4[1] + h4[3]) + tail
        })
    }
}

/// Attention of one query position over the first `len` positions of a cache layer, on the CPU in f32. `q` holds
/// `heads` rows of `head_dim`; `keys` and `values` are the layer's whole buffers, `[1, kv_heads, capacity,
/// head_dim]`, query head `h` attending with key/value head `h / (heads / kv_heads)` (grouped-query attention).
/// Appends `heads * head_dim` values to `out`, or returns false (appending nothing) when the buffers are not
/// contiguous CPU f32. Decoding calls this once per sequence and layer: as a handful of libtorch ops it would cost
/// more in dispatch than in arithmetic.
pub fn attend_cached(q: &[f32], keys: &Tensor, values: &Tensor, len: usize, out: &mut Vec<f32>) -> bool {
    let size = keys.size();
    let (Some(k), Some(v), [_, kv_heads, capacity, head_dim]) =
        (storage::f32s(keys), storage::f32s(values), size.as_slice())
    else {
        return false;
    };
    let (kv_heads, capacity, head_dim) = (*kv_heads as usize, *capacity as usize, *head_dim as usize);
    let heads = q.len() / head_dim.max(1);
    if values.size() != size
        || len > capacity
        || heads == 0
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
    {
        return false;
    }
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut weights = vec![0f32; len];
    let mut acc = vec![0f32; head_dim];
    for h in 0..heads {
        let base = (h / group) * capacity * head_dim;
        let query = &q[h * head_dim..(h + 1) * head_dim];
        let mut max = f32::NEG_INFINITY;
        for (p, w) in weights.iter_mut().enumerate() {
            let at = base + p * head_dim;
            *w = dot(query, &k[at..at + head_dim], |x| x) * scale;
            max = max.max(*w);
        }
        let mut sum = 0f32;
        for w in &mut weights {
            *w = (*w - max).exp();
            sum += *w;
        }
        acc.fill(0.0);
        for (p, w) in weights.iter().enumerate() {
            let at = base + p * head_dim;
            for (a, x) in acc.iter_mut().zip(&v[at..at + head_dim]) {
                *a += w * x;
            }
        }
        out.extend(acc.iter().map(|a| a / sum));
    }
    true
}

/// One matrix-vector product over several stacked matrices: `[W_1; W_2; ...] x`.
#[derive(Clone)]
struct Product<'a> {
    matrices: Arc<Vec<Rows<'a>>>,
    /// First output row of each matrix, and the total.
    starts: Arc<Vec<usize>>,
    /// `batch` input rows of `cols` values.
    input: Arc<Vec<f32>>,
    cols: usize,
    batch: usize,
}

impl Product<'_> {
    fn total_rows(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Output rows `rows`, each with one value per input row (`[row][batch]` order).
    fn compute(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows.len() * self.batch);
        let mut row = rows.start;
        while row < rows.end {
            let m = self.starts.partition_point(|&s| s <= row) - 1;
            let (first, end) = (self.starts[m], self.starts[m + 1].min(rows.end));
            let local = row - first..end - first;
            match self.matrices[m] {
                #[cfg(target_arch = "x86_64")]
                Rows::F32(w) if avx2::available() => {
                    avx2::products(w, self.cols, local, &self.input, &mut out)
                }
                matrix => {
                    for r in local {
                        matrix.dots(r, self.cols, &self.input, &mut out);
                    }
                }
            }
            row = end;
        }
        out
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
        if out.len() < total * product.batch {
            let done = out.len() / product.batch;
            out.extend(product.compute(done..total));
        }
        out
    }

    /// `x W_i^T (+ b_i)` for each weight when `x` holds at most [`MAX_ROWS`] CPU rows and the weights are
    /// contiguous f32 or bf16 matrices without gradients; None otherwise (the caller uses libtorch).
    pub fn linear_single_row_many(
        &self,
        x: &Tensor,
        weights: &[(&'a Tensor, Option<&Tensor>)],
    ) -> Result<Option<Vec<Tensor>>> {
        let cols = x.size().last().copied().unwrap_or(0);
        let batch = if cols > 0 { x.numel() as i64 / cols } else { 0 };
        let usable = x.device() == Device::Cpu
            && (1..=MAX_ROWS as i64).contains(&batch)
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
        let total = starts[starts.len() - 1] as i64;
        let out = self.run(Product {
            matrices: Arc::new(matrices),
            starts: Arc::new(starts),
            input: Arc::new(input),
            cols: cols as usize,
            batch: batch as usize,
        });
        // Bias is added before rounding to the input's dtype, as libtorch's addmm does.
        let all = Tensor::f_from_slice(&out)?
            .f_view([total, batch])?
            .f_transpose(0, 1)?;
        let mut results = Vec::with_capacity(weights.len());
        let mut offset = 0;
        for (w, bias) in weights {
            let rows = w.size()[0];
            let mut shape = x.size();
            if let Some(last) = shape.last_mut() {
                *last = rows;
            }
            let mut y = all.f_narrow(1, offset, rows)?;
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
    fn batched_rows_get_the_same_bits_as_single_rows() {
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([70, 100], opts);
        let x = Tensor::randn([7, 1, 100], opts);
        let (batched, single) = with_decode_pool(|p| {
            let batched = p
                .linear_single_row(&x, &w, None)
                .unwrap()
                .expect("kernel applies");
            let single: Vec<Tensor> = (0..7)
                .map(|i| {
                    p.linear_single_row(&x.get(i), &w, None)
                        .unwrap()
                        .expect("kernel applies")
                })
                .collect();
            (batched, single)
        });
        assert_eq!(batched.size(), [7, 1, 70]);
        for (i, s) in single.iter().enumerate() {
            assert!(
                batched.get(i as i64).equal(s),
                "row {i} differs from its single-row product"
            );
        }
        assert!(
            (batched - x.linear::<&Tensor>(&w, None))
                .abs()
                .max()
                .double_value(&[])
                < 1e-4
        );
    }

    #[test]
    fn declines_large_batches_and_trainable_weights() {
        let w = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        assert!(with_decode_pool(|p| p
            .linear_single_row(
                &Tensor::randn([MAX_ROWS as i64 + 1, 8], (Kind::Float, Device::Cpu)),
                &w,
                None
            )
            .unwrap()
            .is_none()));
        let w = w.set_requires_grad(true);
        assert!(with_decode_pool(|p| p
            .linear_single_row(&Tensor::randn([1, 8], (Kind::Float, Device::Cpu)), &w, None)
            .unwrap()
            .is_none()));
    }
}
