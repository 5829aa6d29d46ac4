//! Products of GGML-quantized weight rows with f32 input rows, computed on the blocks as they are stored.
//!
//! As llama.cpp does, each input row is first quantized to 8 bits per block (Q8 blocks of 32 values for Q8_0,
//! Q4_0 and Q4_1 weights; Q8_K blocks of 256 with sums per 16 for the K-quants), so a block's dot product is an
//! integer sum, scaled once by the two blocks' scales. Reading 4.5 to 8.5 bits a weight instead of 32 is what
//! makes decoding faster: it is bound by memory bandwidth.
//!
//! Every (weight row, input row) pair is summed the same way whatever the batch or the tile it lands in, so a
//! sequence gets the same bits alone or in a batch. The scalar code here is the reference and the fallback for
//! CPUs without AVX2; `qdot_avx2.rs` holds the vector tiles.

use std::ops::Range;

use half::f16;

use crate::interleave;
use crate::quant::{GgmlType, Layout, QuantFormat, f16_at, scale_min_k4};

/// Values per block of the 32-value types and their Q8 activations.
pub(crate) const QK: usize = 32;
/// Values per K-quant super-block.
pub(crate) const QK_K: usize = 256;

/// Whether camelid computes on `ty`'s blocks directly (other types are dequantized when loaded).
pub fn has_kernel(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, Q8_0 | Q4_0 | Q4_1 | Q4K | Q5K | Q6K)
}

/// Whether `ty` matrices are best interleaved at load ([`crate::interleave`]): this CPU has the tiles that stream
/// them so. Elsewhere they stay in GGUF's order, which the row-by-row kernels read.
pub fn prefers_interleaved(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    if interleave::parts(ty).is_some() {
        return super::qdot_x8::available();
    }
    false
}

/// Whether `ty`'s products take Q8_K activations (256-value blocks) rather than Q8 ones (32-value blocks).
pub(crate) fn uses_q8k(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K)
}

/// Input rows quantized to Q8 blocks of 32: per block a scale `d` (rounded through f16, as ggml stores it),
/// `s = d * sum(q)` (for types with a per-block minimum), `sum(q)` itself (for offsets taken off in integers)
/// and 32 signed 8-bit values.
#[derive(Debug, Default)]
pub(crate) struct Q8Rows {
    pub blocks: usize,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub sum: Vec<i32>,
    pub q: Vec<i8>,
}

impl Q8Rows {
    /// `batch` rows of `cols` values (a multiple of 32) from `x`.
    pub fn quantize(x: &[f32], cols: usize) -> Self {
        let total = x.len() / QK;
        let mut out = Q8Rows {
            blocks: cols / QK,
            d: Vec::with_capacity(total),
            s: Vec::with_capacity(total),
            sum: Vec::with_capacity(total),
            q: Vec::with_capacity(x.len()),
        };
        for block in x.chunks_exact(QK) {
            #[cfg(target_arch = "x86_64")]
            if super::qdot_avx2::available() {
                super::qdot_avx2::quantize_block(block, &mut out);
                continue;
            }
            out.push_block(block);
        }
        out
    }

    /// Appends one block of 32 values, quantized: the reference for the vector quantizer, which matches it bit
    /// for bit (every step is exact or rounds once, the same way).
    pub(crate) fn push_block(&mut self, block: &[f32]) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for v in block {
            // Ties to even, as ggml's AVX2 quantizer rounds.
            let q = (v * id).round_ties_even() as i8;
            sum += i32::from(q);
            self.q.push(q);
        }
        self.push_scales(d, sum);
    }

    /// A block's scale `d` and `d * sum(q)`, both rounded through f16 as ggml stores them, and `sum(q)`.
    pub(crate) fn push_scales(&mut self, d: f32, sum: i32) {
        self.d.push(f16::from_f32(d).to_f32());
        self.s.push(f16::from_f32(d * sum as f32).to_f32());
        self.sum.push(sum);
    }

    /// Row `r`'s blocks: scales, sums and values.
    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let b = r * self.blocks..(r + 1) * self.blocks;
        Q8Row {
            d: &self.d[b.clone()],
            s: &self.s[b.clone()],
            sum: &self.sum[b.clone()],
            q: &self.q[b.start * QK..b.end * QK],
        }
    }
}

/// One input row's Q8 blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8Row<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub sum: &'a [i32],
    pub q: &'a [i8],
}

/// Input rows quantized to Q8_K blocks of 256: an f32 scale, 256 signed 8-bit values and their sums per 16.
#[derive(Debug, Default)]
pub(crate) struct Q8KRows {
    pub blocks: usize,
    pub d: Vec<f32>,
    pub q: Vec<i8>,
    pub bsums: Vec<i16>,
    /// Sums per 32 (a Q4_K/Q5_K sub-block), computed once for every weight row that reads them.
    pub sums32: Vec<i32>,
}

impl Q8KRows {
    /// `batch` rows of `cols` values (a multiple of 256) from `x`, quantized as ggml's `quantize_row_q8_K`.
    pub fn quantize(x: &[f32], cols: usize) -> Self {
        let blocks = cols / QK_K;
        let mut out = Q8KRows {
            blocks,
            ..Default::default()
        };
        for block in x.chunks_exact(QK_K) {
            // The value of largest magnitude, with its sign: it maps to -127 or 127 exactly.
            let max = block
                .iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            if max == 0.0 {
                out.d.push(0.0);
                out.q.extend([0; QK_K]);
                out.bsums.extend([0i16; QK_K / 16]);
                continue;
            }
            let iscale = -127.0 / max;
            let start = out.q.len();
            out.q.extend(
                block
                    .iter()
                    .map(|v| ((iscale * v).round_ties_even() as i32).min(127) as i8),
            );
            out.bsums.extend(
                out.q[start..]
                    .chunks_exact(16)
                    .map(|g| g.iter().map(|&q| i16::from(q)).sum::<i16>()),
            );
            out.d.push(1.0 / iscale);
        }
        out.sums32 = out
            .bsums
            .chunks_exact(2)
            .map(|p| i32::from(p[0]) + i32::from(p[1]))
            .collect();
        out
    }

    pub fn row(&self, r: usize) -> Q8KRow<'_> {
        let b = r * self.blocks..(r + 1) * self.blocks;
        Q8KRow {
            d: &self.d[b.clone()],
            q: &self.q[b.start * QK_K..b.end * QK_K],
            bsums: &self.bsums[b.start * 16..b.end * 16],
            sums32: &self.sums32[b.start * 8..b.end * 8],
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8KRow<'a> {
    pub d: &'a [f32],
    pub q: &'a [i8],
    pub bsums: &'a [i16],
    pub sums32: &'a [i32],
}

/// The activations a product needs, quantized once for every weight row that reads them.
#[derive(Debug)]
pub(crate) enum Acts {
    Q8(Q8Rows),
    Q8K(Q8KRows),
}

impl Acts {
    pub fn for_type(ty: GgmlType, x: &[f32], cols: usize) -> Self {
        if uses_q8k(ty) {
            Acts::Q8K(Q8KRows::quantize(x, cols))
        } else {
            Acts::Q8(Q8Rows::quantize(x, cols))
        }
    }

    fn matches(&self, ty: GgmlType) -> bool {
        matches!(self, Acts::Q8K(_)) == uses_q8k(ty)
    }
}

/// Rows `rows` of the quantized `[_, cols]` matrix `w` (`format` blocks, `row_bytes` a row), each dotted with
/// every input row of `acts`, appended to `out` in `[input][row]` order.
pub(crate) fn products(
    format: QuantFormat,
    w: &[u8],
    cols: usize,
    rows: Range<usize>,
    acts: &Acts,
    batch: usize,
    out: &mut Vec<f32>,
) {
    let ty = format.ty;
    let row_bytes = ty.byte_size(cols as u64).unwrap_or(0) as usize;
    assert!(
        has_kernel(ty) && acts.matches(ty) && row_bytes > 0 && rows.end * row_bytes <= w.len(),
        "quantized product of a {ty:?} matrix with mismatched rows or activations"
    );
    #[cfg(target_arch = "x86_64")]
    match acts {
        Acts::Q8(x) if format.layout == Layout::Interleaved && super::qdot_x8::available() => {
            return super::qdot_x8::products(ty, w, row_bytes, rows, x, batch, out);
        }
        Acts::Q8(x) if format.layout == Layout::Rows && super::qdot_avx2::handles(ty) => {
            return super::qdot_avx2::products(ty, w, row_bytes, rows, x, batch, out);
        }
        Acts::Q8K(x) if super::qdot_kavx2::handles(ty) => {
            return super::qdot_kavx2::products(ty, w, row_bytes, rows, x, batch, out);
        }
        _ => {}
    }
    scalar_products(format, w, row_bytes, rows, acts, batch, out);
}

/// [`products`] by the scalar reference, row by row; an interleaved matrix's rows (on a CPU that loading would not
/// have interleaved for) are each read back in GGUF's order.
fn scalar_products(
    format: QuantFormat,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    acts: &Acts,
    batch: usize,
    out: &mut Vec<f32>,
) {
    let ty = format.ty;
    let matrix_rows = w.len() / row_bytes;
    assert!(
        format.layout == Layout::Rows || interleave::applies(ty, w.len(), matrix_rows),
        "an interleaved {ty:?} matrix that is not whole groups of rows"
    );
    let base = out.len();
    out.resize(base + rows.len() * batch, 0.0);
    for (j, r) in rows.clone().enumerate() {
        let gathered;
        let wrow = match format.layout {
            Layout::Rows => &w[r * row_bytes..(r + 1) * row_bytes],
            Layout::Interleaved => {
                // Whole groups (asserted) and `r` inside them (the caller's check), so the row is there.
                gathered = interleave::row(ty, w, matrix_rows, r).unwrap_or_default();
                &gathered[..]
            }
        };
        for i in 0..batch {
            out[base + i * rows.len() + j] = match acts {
                Acts::Q8(x) => dot_q8(ty, wrow, x.row(i)),
                Acts::Q8K(x) => dot_q8k(ty, wrow, x.row(i)),
            };
        }
    }
}

/// A 32-value-block weight row (Q8_0, Q4_0, Q4_1) dotted with a Q8 input row.
pub(crate) fn dot_q8(ty: GgmlType, w: &[u8], x: Q8Row<'_>) -> f32 {
    let block_bytes = ty.block().1 as usize;
    let mut sum = 0f32;
    for (b, wb) in w.chunks_exact(block_bytes).enumerate() {
        let xq = &x.q[b * QK..(b + 1) * QK];
        let dw = f16_at(wb, 0);
        let (isum, min_term) = match ty {
            GgmlType::Q8_0 => (
                wb[2..34]
                    .iter()
                    .zip(xq)
                    .map(|(&w, &x)| i32::from(w as i8) * i32::from(x))
                    .sum::<i32>(),
                0.0,
            ),
            GgmlType::Q4_0 => (nibble_dot(&wb[2..18], xq), -8.0 * dw * x.s[b]),
            _ => (nibble_dot(&wb[4..20], xq), f16_at(wb, 2) * x.s[b]),
        };
        sum += dw * x.d[b] * isum as f32 + min_term;
    }
    sum
}

/// `sum(q_j * x_j)` over 32 4-bit values packed as ggml packs them: value j in the low nibble of byte j, value
/// j + 16 in its high nibble.
fn nibble_dot(qs: &[u8], x: &[i8]) -> i32 {
    (0..16)
        .map(|j| i32::from(qs[j] & 0x0F) * i32::from(x[j]) + i32::from(qs[j] >> 4) * i32::from(x[j + 16]))
        .sum()
}

/// A K-quant weight row (Q4_K, Q5_K, Q6_K) dotted with a Q8_K input row.
pub(crate) fn dot_q8k(ty: GgmlType, w: &[u8], x: Q8KRow<'_>) -> f32 {
    let block_bytes = ty.block().1 as usize;
    let mut sum = 0f32;
    let mut q = [0i8; QK_K];
    for (b, wb) in w.chunks_exact(block_bytes).enumerate() {
        let xq = &x.q[b * QK_K..(b + 1) * QK_K];
        let bsums = &x.bsums[b * 16..(b + 1) * 16];
        let unpacked = unpack_k(ty, wb, &mut q);
        // Each group of 16 values: its integer dot scaled by its integer scale.
        let mut isum = 0i32;
        for (g, (qg, xg)) in q.chunks_exact(16).zip(xq.chunks_exact(16)).enumerate() {
            let dot: i32 = qg
                .iter()
                .zip(xg)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            isum += unpacked.scales[g] * dot;
        }
        let mins: i32 = (0..16).map(|g| unpacked.mins[g] * i32::from(bsums[g])).sum();
        sum += x.d[b] * (unpacked.d * isum as f32 - unpacked.dmin * mins as f32);
    }
    sum
}

/// One K-quant block as integer values with integer scales and minimums per group of 16:
/// value = d * scale * q - dmin * min.
struct KBlock {
    d: f32,
    dmin: f32,
    scales: [i32; 16],
    mins: [i32; 16],
}

/// Unpacks block `b` of type `ty` into `q` (256 integer values) and its scales.
fn unpack_k(ty: GgmlType, b: &[u8], q: &mut [i8; QK_K]) -> KBlock {
    let mut k = KBlock {
        d: 0.0,
        dmin: 0.0,
        scales: [0; 16],
        mins: [0; 16],
    };
    match ty {
        GgmlType::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            k.d = f16_at(b, 208);
            for half in 0..2 {
                let (ql, qh, y) = (&ql[half * 64..], &qh[half * 32..], &mut q[half * 128..]);
                for l in 0..32 {
                    let six = |low: u8, shift: u8| ((low | (((qh[l] >> shift) & 3) << 4)) as i8) - 32;
                    y[l] = six(ql[l] & 0xF, 0);
                    y[l + 32] = six(ql[l + 32] & 0xF, 2);
                    y[l + 64] = six(ql[l] >> 4, 4);
                    y[l + 96] = six(ql[l + 32] >> 4, 6);
                }
            }
            for (g, s) in sc.iter().enumerate() {
                k.scales[g] = i32::from(*s as i8);
            }
        }
        _ => {
            let high = ty == GgmlType::Q5K;
            let (qh, qs) = if high {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            k.d = f16_at(b, 0);
            k.dmin = f16_at(b, 2);
            for (chunk, ql) in qs.chunks_exact(32).enumerate() {
                for (sub, shift) in [(2 * chunk, 0), (2 * chunk + 1, 4)] {
                    let (sc, m) = scale_min_k4(sub, &b[4..16]);
                    k.scales[2 * sub] = i32::from(sc);
                    k.scales[2 * sub + 1] = i32::from(sc);
                    k.mins[2 * sub] = i32::from(m);
                    k.mins[2 * sub + 1] = i32::from(m);
                    for l in 0..32 {
                        let fifth = if high && qh[l] & (1 << sub) != 0 { 16 } else { 0 };
                        q[sub * 32 + l] = (((ql[l] >> shift) & 0x0F) + fifth) as i8;
                    }
                }
            }
        }
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize_q4_0, quantize_q4_1, quantize_q8_0};

    /// Deterministic values with a spread of magnitudes, like weights.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 2.0
            })
            .collect()
    }

    /// Random bytes for K-quant blocks, with sane f16 scales: every bit pattern of the packed values is valid.
    fn random_k_blocks(ty: GgmlType, blocks: usize, seed: u32) -> Vec<u8> {
        let bytes = ty.block().1 as usize;
        let noise = values(blocks * bytes, seed);
        let mut out: Vec<u8> = noise.iter().map(|v| (v.abs() * 255.0) as u8).collect();
        for b in out.chunks_exact_mut(bytes) {
            let at = if ty == GgmlType::Q6K { 208 } else { 0 };
            b[at..at + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
            if ty != GgmlType::Q6K {
                b[2..4].copy_from_slice(&f16::from_f32(0.003).to_le_bytes());
            }
        }
        out
    }

    fn f32_dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Each kernel against dequantize-then-f32 with the same quantized activations: the only difference is
    /// summation order, so the tolerance is float rounding (1e-4 of the sum of magnitudes).
    #[test]
    fn every_kernel_matches_dequantize_then_f32() {
        let cols = 512;
        let x = values(cols, 7);
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            let w = match ty {
                GgmlType::Q8_0 => quantize_q8_0(&values(cols, 3)),
                GgmlType::Q4_0 => quantize_q4_0(&values(cols, 3)),
                GgmlType::Q4_1 => quantize_q4_1(&values(cols, 3)),
                _ => random_k_blocks(ty, cols / QK_K, 3),
            };
            let wf = dequantize(ty, &w).unwrap();
            let acts = Acts::for_type(ty, &x, cols);
            let (xf, ours) = match &acts {
                Acts::Q8(a) => {
                    let xf: Vec<f32> =
                        a.q.iter()
                            .enumerate()
                            .map(|(i, &q)| f32::from(q) * a.d[i / QK])
                            .collect();
                    (xf, dot_q8(ty, &w, a.row(0)))
                }
                Acts::Q8K(a) => {
                    let xf: Vec<f32> =
                        a.q.iter()
                            .enumerate()
                            .map(|(i, &q)| f32::from(q) * a.d[i / QK_K])
                            .collect();
                    (xf, dot_q8k(ty, &w, a.row(0)))
                }
            };
            let expected = f32_dot(&wf, &xf);
            let scale: f32 = wf.iter().zip(&xf).map(|(a, b)| (a * b).abs()).sum();
            // Q4_0/Q4_1 use the activation sum rounded to f16, as ggml does.
            let tol = scale
                * if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1) {
                    2e-3
                } else {
                    1e-4
                };
            assert!(
                (ours - expected).abs() <= tol,
                "{ty:?}: {ours} vs {expected} (tol {tol})"
            );
            // And against the unquantized activations, within what 8-bit activations cost.
            let exact = f32_dot(&wf, &x);
            assert!((ours - exact).abs() <= scale * 0.02, "{ty:?}: {ours} vs {exact}");
        }
    }

    #[test]
    fn the_scalar_path_reads_an_interleaved_matrix_as_its_rows() {
        let (rows, cols, batch) = (16, 128, 3);
        let x = Acts::for_type(GgmlType::Q4_1, &values(cols * batch, 5), cols);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let w = match ty {
                GgmlType::Q8_0 => quantize_q8_0(&values(rows * cols, 3)),
                GgmlType::Q4_0 => quantize_q4_0(&values(rows * cols, 3)),
                _ => quantize_q4_1(&values(rows * cols, 3)),
            };
            let grouped = interleave::interleave(ty, &w, rows).unwrap();
            let row_bytes = w.len() / rows;
            let (mut plain, mut interleaved) = (Vec::new(), Vec::new());
            scalar_products(QuantFormat::rows(ty), &w, row_bytes, 3..13, &x, batch, &mut plain);
            let format = QuantFormat {
                ty,
                layout: Layout::Interleaved,
            };
            scalar_products(format, &grouped, row_bytes, 3..13, &x, batch, &mut interleaved);
            assert_eq!(plain, interleaved, "{ty:?}");
        }
    }

    #[test]
    fn activations_round_trip_within_half_a_step() {
        let x = values(512, 11);
        let q8 = Q8Rows::quantize(&x, 512);
        for (i, v) in x.iter().enumerate() {
            let back = f32::from(q8.q[i]) * q8.d[i / QK];
            assert!((back - v).abs() <= q8.d[i / QK] * 0.51 + 1e-3, "{i}");
        }
        let q8k = Q8KRows::quantize(&x, 512);
        for (g, s) in q8k.bsums.iter().enumerate() {
            let sum: i16 = q8k.q[g * 16..(g + 1) * 16].iter().map(|&q| i16::from(q)).sum();
            assert_eq!(*s, sum);
        }
        assert!(Q8KRows::quantize(&[0.0; 256], 256).d[0] == 0.0);
    }
}
