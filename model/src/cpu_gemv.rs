//! Matrix products for decoding and serving on the CPU: one sequence's token, or the rows of a serving step (decoded
//! tokens and prompt chunks together).
//!
//! Decoding one sequence reads every weight once per token, so its speed is memory bandwidth. A step of many rows
//! reads each weight once too and, with enough rows, is bound by the FMA units instead (see `avx2.rs` for the
//! tiles). libtorch sends `[1, in] x [out, in]^T` to MKL's sgemv, which runs on one core here and reads about
//! 10 GB/s of a machine that delivers about 28 GB/s to two cores. [`DecodePool`] splits the output rows between the
//! calling thread and helper threads that stay awake for the whole decode loop (a wake-up per product would cost
//! more than the product), and runs the work between products (attention) on the same threads
//! ([`DecodePool::split`]), so nothing else competes for the cores. Training and GPUs stay on libtorch.

use std::sync::Arc;

use tch::Tensor;

use crate::quant::{GgmlType, QuantFormat};
use crate::storage;
pub use pool::{DecodePool, with_decode_pool};
use qdot::Acts;

/// A weight matrix as the kernels take it: a libtorch tensor, and the GGML block type and layout when it holds
/// quantized blocks (a `[rows, row bytes]` u8 tensor) rather than f32 or bf16 values.
pub type WeightRef<'a> = (&'a Tensor, Option<QuantFormat>);

const LANES: usize = 16;
/// The most input rows the kernel takes at once; the CPU step feeds larger steps through it in slices of this many.
pub const MAX_ROWS: usize = 64;

/// `sum(w[i] * x[i])` with `LANES` independent accumulators (so the loop vectorizes without reassociating), the
/// weights widened to f32 by `widen`.
#[inline(always)]
pub(crate) fn dot<W: Copy>(w: &[W], x: &[f32], widen: impl Fn(W) -> f32) -> f32 {
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

/// The dot products of three queries with four keys of their length (attention scores, `[key][query]`), on the
/// AVX2 kernel where the CPU has it.
pub(crate) fn dots3x4(queries: [&[f32]; 3], keys: [&[f32]; 4]) -> [[f32; 3]; 4] {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        return avx2::dots3x4(queries, keys);
    }
    keys.map(|key| queries.map(|query| dot(query, key, |x| x)))
}

/// `acc[g] += sum_p weights[g][p] * row(p)` for three heads, every row as long as the accumulators (attention's
/// weighted sums of value rows).
pub(crate) fn weighted_rows3<'r>(
    weights: [&[f32]; 3],
    row: impl Fn(usize) -> &'r [f32],
    acc: [&mut [f32]; 3],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        return avx2::weighted_rows3(weights, row, acc);
    }
    for (w, a) in weights.into_iter().zip(acc) {
        for (p, &w) in w.iter().enumerate() {
            for (a, x) in a.iter_mut().zip(row(p)) {
                *a += w * x;
            }
        }
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
    /// GGML blocks of `format`, each row a whole number of blocks.
    Quant {
        format: QuantFormat,
        bytes: &'a [u8],
    },
}

impl Rows<'_> {
    /// Weight row `row` dotted with each `cols`-wide row of `inputs`, appended to `out` (f32 and bf16 only).
    fn dots(&self, row: usize, cols: usize, inputs: &[f32], out: &mut Vec<f32>) {
        match self {
            Rows::F32(w) => dot_rows(&w[row * cols..(row + 1) * cols], inputs, |v| v, out),
            Rows::Bf16(w) => dot_rows(&w[row * cols..(row + 1) * cols], inputs, bf16_to_f32, out),
            Rows::Quant { .. } => unreachable!("quantized rows go through qdot::products"),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;
mod pool;
pub mod qdot;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod qdot_avx2;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod qdot_kavx2;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod qdot_x8;

/// A product's input rows quantized for its quantized matrices, once per activation format they need. Done by
/// the calling thread before the helpers start: a helper waiting on another thread's quantizing would sleep, and
/// waking it costs more than a layer's product.
#[derive(Default)]
struct QuantizedInput {
    q8: Option<Acts>,
    q8k: Option<Acts>,
}

impl QuantizedInput {
    fn of(matrices: &[Rows<'_>], input: &[f32], cols: usize) -> Self {
        let mut out = QuantizedInput::default();
        for m in matrices {
            if let Rows::Quant { format, .. } = *m {
                let ty = format.ty;
                let cell = if qdot::uses_q8k(ty) {
                    &mut out.q8k
                } else {
                    &mut out.q8
                };
                if cell.is_none() {
                    *cell = Some(Acts::for_type(ty, input, cols));
                }
            }
        }
        out
    }

    fn get(&self, ty: GgmlType) -> Option<&Acts> {
        let cell = if qdot::uses_q8k(ty) { &self.q8k } else { &self.q8 };
        cell.as_ref()
    }
}

/// One matrix-vector product over several stacked matrices: `[W_1; W_2; ...] x`.
#[derive(Clone)]
struct Product<'a> {
    matrices: Arc<Vec<Rows<'a>>>,
    /// First output row of each matrix, and the total.
    starts: Arc<Vec<usize>>,
    /// `batch` input rows of `cols` values.
    input: Arc<Vec<f32>>,
    quantized: Arc<QuantizedInput>,
    cols: usize,
    batch: usize,
}

impl<'a> Product<'a> {
    /// The product of the stacked `matrices` (first rows `starts`) with `batch` rows of `input`, which is
    /// quantized here once for every quantized matrix.
    fn new(matrices: Vec<Rows<'a>>, starts: Vec<usize>, input: Vec<f32>, cols: usize, batch: usize) -> Self {
        Product {
            quantized: Arc::new(QuantizedInput::of(&matrices, &input, cols)),
            matrices: Arc::new(matrices),
            starts: Arc::new(starts),
            input: Arc::new(input),
            cols,
            batch,
        }
    }

    fn total_rows(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Output rows `rows` for every input row, `[batch][rows]` order.
    fn compute(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let (n, batch) = (rows.len(), self.batch);
        let mut segments = Vec::new();
        let mut row = rows.start;
        while row < rows.end {
            let m = self.starts.partition_point(|&s| s <= row) - 1;
            let (first, end) = (self.starts[m], self.starts[m + 1].min(rows.end));
            segments.push((
                row - rows.start,
                end - row,
                self.segment(m, row - first..end - first),
            ));
            row = end;
        }
        if let [(_, _, values)] = &mut segments[..] {
            return std::mem::take(values);
        }
        side_by_side(segments, n, batch)
    }

    /// Rows `local` of matrix `m` for every input row, `[batch][local]` order.
    fn segment(&self, m: usize, local: std::ops::Range<usize>) -> Vec<f32> {
        let (width, batch) = (local.len(), self.batch);
        let mut out = Vec::with_capacity(width * batch);
        match self.matrices[m] {
            #[cfg(target_arch = "x86_64")]
            Rows::F32(w) if avx2::available() => avx2::products(w, self.cols, local, &self.input, &mut out),
            #[cfg(target_arch = "x86_64")]
            Rows::Bf16(w) if avx2::available() => avx2::products(w, self.cols, local, &self.input, &mut out),
            Rows::Quant { format, bytes } => {
                let ty = format.ty;
                // Quantized up front for every quantized matrix of a product; made here only if that was skipped.
                let made;
                let acts = match self.quantized.get(ty) {
                    Some(acts) => acts,
                    None => {
                        made = Acts::for_type(ty, &self.input, self.cols);
                        &made
                    }
                };
                qdot::products(format, bytes, self.cols, local, acts, batch, &mut out);
            }
            matrix => {
                let mut by_row = Vec::with_capacity(width * batch);
                for r in local {
                    matrix.dots(r, self.cols, &self.input, &mut by_row);
                }
                out.resize(width * batch, 0.0);
                for (r, values) in by_row.chunks_exact(batch).enumerate() {
                    for (b, v) in values.iter().enumerate() {
                        out[b * width + r] = *v;
                    }
                }
            }
        }
        out
    }
}

/// Column blocks `(first column, width, [batch][width] values)` of a `[batch][total]` matrix, put side by side.
fn side_by_side(blocks: Vec<(usize, usize, Vec<f32>)>, total: usize, batch: usize) -> Vec<f32> {
    let mut out = vec![0f32; total * batch];
    for (first, width, values) in blocks {
        for (b, chunk) in values.chunks_exact(width.max(1)).enumerate() {
            out[b * total + first..b * total + first + width].copy_from_slice(chunk);
        }
    }
    out
}

/// The kernel's views of `weights` stacked into one product, and the first output row of each (plus the total):
/// None unless every weight is a contiguous CPU f32 or bf16 `[_, cols]` matrix without gradients, or a u8
/// `[_, row bytes]` matrix of blocks of a type with a kernel whose rows hold `cols` values.
fn stacked<'a>(
    weights: impl Iterator<Item = WeightRef<'a>>,
    cols: usize,
) -> Option<(Vec<Rows<'a>>, Vec<usize>)> {
    let mut matrices = Vec::new();
    let mut starts = vec![0];
    for (w, quant) in weights {
        let size = w.size();
        let width = match quant {
            Some(format) if qdot::has_kernel(format.ty) => format.ty.byte_size(cols as u64)? as usize,
            Some(_) => return None,
            None => cols,
        };
        if size.len() != 2 || size[1] as usize != width || w.requires_grad() {
            return None;
        }
        matrices.push(match quant {
            Some(format) => {
                let bytes = storage::u8s(w)?;
                // An interleaved matrix must be whole groups of a type with interleaved tiles.
                let interleaved = format.layout == crate::quant::Layout::Interleaved;
                if interleaved && !crate::interleave::applies(format.ty, bytes.len(), size[0] as usize) {
                    return None;
                }
                Rows::Quant { format, bytes }
            }
            None => storage::f32s(w)
                .map(Rows::F32)
                .or_else(|| storage::bf16s(w).map(Rows::Bf16))?,
        });
        starts.push(starts[starts.len() - 1] + size[0] as usize);
    }
    (!matrices.is_empty()).then_some((matrices, starts))
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

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
    fn declines_interleaved_matrices_that_are_not_whole_groups_of_a_type_with_tiles() {
        use crate::quant::{GgmlType, Layout, QuantFormat};
        let interleaved = |ty| QuantFormat {
            ty,
            layout: Layout::Interleaved,
        };
        // 12 rows tagged as interleaved groups of 8, and Q4_K (no interleaved tiles) tagged so: a malformed
        // model must fall back, not panic in a pool thread.
        let q4 = Tensor::from_slice(&crate::quant::quantize_q4_0(&vec![0.5; 12 * 64])).view([12, -1]);
        let q4k = Tensor::from_slice(&vec![0u8; 8 * 144]).view([8, -1]);
        for (w, format, cols) in [
            (&q4, interleaved(GgmlType::Q4_0), 64),
            (&q4k, interleaved(GgmlType::Q4K), 256),
        ] {
            let x = vec![0.1f32; cols];
            assert!(
                with_decode_pool(|p| p.products(&[(w, Some(format))], x, 1)).is_none(),
                "{format:?}"
            );
        }
        let rows = QuantFormat::rows(GgmlType::Q4_0);
        assert!(with_decode_pool(|p| p.products(&[(&q4, Some(rows))], vec![0.1; 64], 1)).is_some());
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
