//! AVX2 tiles for Q8_0, Q4_0 and Q4_1 weights against Q8 activations (ggml's layout and arithmetic).
//!
//! A block's 32 products come from one `maddubs` (unsigned 8-bit times signed 8-bit, summed in pairs to 16 bits;
//! the largest pair, 2 * 128 * 127, fits), one `madd` against ones (pairs to 32 bits) and a conversion to f32,
//! then one FMA with the two blocks' scales; the lanes are reduced once per row. Q4_1's minimum (and Q4_0's
//! offset of 8, folded into a minimum of `-8 d`) adds `m * s` per block, where `s` is the activation block's sum.
//!
//! A tile holds accumulators for M input rows by N weight rows, so each weight block is unpacked once for M
//! products; every pair is summed by the same sequence of instructions in any tile, so a row gets the same bits
//! alone or in a batch.

use std::arch::x86_64::{
    __m256, __m256i, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT, _MM_HINT_T0, _mm_add_ps, _mm_cvtph_ps,
    _mm_cvtsi32_si128, _mm_cvtss_f32, _mm_hadd_ps, _mm_loadu_si128, _mm_max_ps, _mm_max_ss, _mm_movehdup_ps,
    _mm_movehl_ps, _mm_prefetch, _mm_srli_epi16, _mm256_abs_epi8, _mm256_and_si256, _mm256_andnot_ps,
    _mm256_castps256_ps128, _mm256_cvtepi32_ps, _mm256_cvtps_epi32, _mm256_extractf128_ps, _mm256_fmadd_ps,
    _mm256_loadu_ps, _mm256_loadu_si256, _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_max_ps,
    _mm256_mul_ps, _mm256_round_ps, _mm256_set_m128i, _mm256_set1_epi8, _mm256_set1_epi16, _mm256_set1_ps,
    _mm256_setzero_ps, _mm256_sign_epi8, _mm256_storeu_si256,
};
use std::ops::Range;
use std::sync::OnceLock;

use super::qdot::{Q8Row, Q8Rows, QK};
use crate::quant::GgmlType;

/// Bytes of weight rows kept in L2 while every block of input rows passes over them.
const CHUNK_BYTES: usize = 128 * 1024;
/// Input rows per batched tile.
const BLOCK: usize = 4;
/// Weight rows per batched tile.
const TILE_ROWS: usize = 2;
/// Weight rows per single-input tile: each row of a tile is a stream the prefetchers follow, and fewer streams
/// came from memory faster. Four rows with a 2 KiB prefetch streamed SmolLM2's Q8_0 matrices at 5 to 7 GB/s; two
/// rows with a 4 KiB prefetch at 8.5 to 10 (Q4_1: 6 to 8 against 7.5 to 8.5; `examples/qkernel_speed`, 2 cores
/// whose plain read loop reaches 16 GB/s). End to end (`camelid generate`, 4 interleaved runs), one row against
/// two gave Q8_0 56-66 tok/s against 43-48, Q4_0 73-82 against 72-100 and Q4_1 71-81 against 68-82: Q8_0 takes
/// one, the 4-bit types two.
const SINGLE_ROWS_Q8_0: usize = 1;
const SINGLE_ROWS_Q4: usize = 2;
/// How far ahead of a single-input tile weights are prefetched, here and in the K-quant kernels' rows: 4 KiB
/// measured best of none and 1 to 16 KiB with two-row tiles (none: 4 to 5.5 GB/s on the same matrices); Q4_K
/// decoded at 1.26-1.28x llama.cpp with it against 1.15x with 2 KiB and four-row tiles.
const PREFETCH_BYTES: usize = 4096;

pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// Whether this module computes `ty` on this CPU.
pub(crate) fn handles(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) && available()
}

/// One block of 32 activations quantized to Q8 and appended to `out`, bit for bit as [`Q8Rows::push_block`]
/// (whose scalar rounding is a libm call per value: it cost 3% of a Q4_0 decode).
pub(crate) fn quantize_block(block: &[f32], out: &mut Q8Rows) {
    assert!(available());
    match <&[f32; QK]>::try_from(block) {
        // SAFETY: the CPU has AVX2, FMA and F16C (asserted through `available`), all `quantize_avx2` needs.
        Ok(block) => unsafe { quantize_avx2(block, out) },
        Err(_) => out.push_block(block),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_avx2(block: &[f32; QK], out: &mut Q8Rows) {
    // SAFETY: four 8-value loads from an array of 32.
    let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(block.as_ptr().add(8 * i)) });
    let sign = _mm256_set1_ps(-0.0);
    let abs = v.map(|x| _mm256_andnot_ps(sign, x));
    let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let mut q = [0i32; QK];
    for (i, x) in v.into_iter().enumerate() {
        let rounded =
            _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, id));
        // SAFETY: eight i32 stored in `q[8 * i..8 * i + 8]`, inside the array.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().add(8 * i).cast(), _mm256_cvtps_epi32(rounded)) };
    }
    // Finite input rounds into [-127, 127] (|x| <= amax), where `as i8` is exact, as in the reference. A NaN or
    // infinite value, or a block so small that `1 / d` overflows, makes some lane NaN or infinite, which the
    // conversion turns into i32::MIN: such a block goes to the reference, which saturates as Rust's casts do.
    if q.iter().any(|v| !(-127..=127).contains(v)) {
        return out.push_block(block);
    }
    out.q.extend(q.iter().map(|&v| v as i8));
    out.push_scales(d, q.iter().sum());
}

/// Rows `rows` of `w` (rows of `row_bytes`) dotted with each of the `batch` rows of `x`, appended to `out` in
/// `[input][row]` order.
pub(crate) fn products(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    x: &Q8Rows,
    batch: usize,
    out: &mut Vec<f32>,
) {
    assert!(handles(ty) && rows.end * row_bytes <= w.len());
    assert!(x.blocks * ty.block().1 as usize == row_bytes && x.d.len() >= batch * x.blocks);
    // SAFETY: the CPU has AVX2, FMA and F16C (`handles`), all the kernels need; they read `w` and `x` through
    // slices whose lengths were checked above.
    unsafe {
        match ty {
            GgmlType::Q8_0 => run::<Q8_0, SINGLE_ROWS_Q8_0>(w, row_bytes, rows, x, batch, out),
            GgmlType::Q4_0 => run::<Q4_0, SINGLE_ROWS_Q4>(w, row_bytes, rows, x, batch, out),
            _ => run::<Q4_1, SINGLE_ROWS_Q4>(w, row_bytes, rows, x, batch, out),
        }
    }
}

/// A 32-value block type's unpacking into registers.
trait Block {
    const BYTES: usize;
    /// Whether the weights are signed (Q8_0), so the product needs the sign trick.
    const SIGNED: bool;
    /// Whether blocks have a minimum (Q4_1; Q4_0's offset of 8 is one), so each adds `m * s`.
    const HAS_MIN: bool = !Self::SIGNED;
    /// The block's 32 weights as bytes, its scale and its minimum (0 for none).
    ///
    /// # Safety
    /// AVX2 and F16C are available, and `b` holds at least [`Block::BYTES`] bytes.
    unsafe fn load(b: &[u8]) -> (__m256i, f32, f32);
}

struct Q8_0;
struct Q4_0;
struct Q4_1;

/// The f16 at `b[i..i + 2]` as f32, by the F16C instruction (a software conversion per block would cost as much
/// as the block's products).
#[inline(always)]
pub(super) unsafe fn f16_at(b: &[u8], i: usize) -> f32 {
    let bits = u16::from_le_bytes([b[i], b[i + 1]]);
    // SAFETY: the caller has F16C.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits)))) }
}

/// Prefetches `bytes` moved [`PREFETCH_BYTES`] on (clipped at `end`) into the cache, one line at a time: the
/// rows a few tiles on come from memory while this tile computes (a layer's matrices are short streams that the
/// hardware prefetcher alone leaves waiting on memory).
#[inline(always)]
pub(crate) fn prefetch_ahead(w: &[u8], bytes: Range<usize>, end: usize) {
    let end = end.min(w.len());
    let from = (bytes.start + PREFETCH_BYTES).min(end);
    let to = (bytes.end + PREFETCH_BYTES).min(end);
    for at in (from..to).step_by(64) {
        // SAFETY: `at < end <= w.len()`, so the address is inside `w`; a prefetch has no architectural effect.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().add(at).cast()) };
    }
}

/// 32 nibbles packed ggml's way (value j low in byte j, value j + 16 high) as 32 bytes in value order.
#[inline(always)]
unsafe fn nibbles(p: &[u8]) -> __m256i {
    assert!(p.len() >= 16);
    // SAFETY: 16 readable bytes (asserted); the caller has AVX2.
    unsafe {
        let packed = _mm_loadu_si128(p.as_ptr().cast());
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }
}

impl Block for Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn load(b: &[u8]) -> (__m256i, f32, f32) {
        assert!(b.len() >= Self::BYTES);
        // SAFETY: 34 readable bytes (asserted), so the 32-byte load at 2 is in bounds.
        unsafe { (_mm256_loadu_si256(b.as_ptr().add(2).cast()), f16_at(b, 0), 0.0) }
    }
}

impl Block for Q4_0 {
    const BYTES: usize = 18;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn load(b: &[u8]) -> (__m256i, f32, f32) {
        // SAFETY: the caller's contract; `nibbles` checks its 16 bytes.
        unsafe {
            let d = f16_at(b, 0);
            (nibbles(&b[2..18]), d, -8.0 * d)
        }
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn load(b: &[u8]) -> (__m256i, f32, f32) {
        // SAFETY: the caller's contract; `nibbles` checks its 16 bytes.
        unsafe { (nibbles(&b[4..20]), f16_at(b, 0), f16_at(b, 2)) }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn run<B: Block, const S: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    x: &Q8Rows,
    batch: usize,
    out: &mut Vec<f32>,
) {
    let base = out.len();
    out.resize(base + rows.len() * batch, 0.0);
    let out = &mut out[base..];
    let wrow = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
    // Out-of-range rows of a partial tile repeat the last real one; their results are not stored.
    let clamp = |i: usize, end: usize| i.min(end - 1);
    if batch == 1 {
        // Prefetching runs on past `rows` to the matrix's end: the pool hands a thread the chunk after this one.
        let end_byte = w.len();
        for first in rows.clone().step_by(S) {
            prefetch_ahead(w, first * row_bytes..(first + S) * row_bytes, end_byte);
            let ws: [&[u8]; S] = std::array::from_fn(|j| wrow(clamp(first + j, rows.end)));
            let [sums] = tile::<B, S, 1>(ws, [x.row(0)]);
            for (j, value) in sums.into_iter().enumerate().take(rows.end - first) {
                out[first + j - rows.start] = value;
            }
        }
        return;
    }
    let chunk_rows = (CHUNK_BYTES / row_bytes).max(TILE_ROWS);
    for chunk in rows.clone().step_by(chunk_rows) {
        let chunk_end = (chunk + chunk_rows).min(rows.end);
        for k in (0..batch).step_by(BLOCK) {
            let xs: [Q8Row<'_>; BLOCK] = std::array::from_fn(|i| x.row(clamp(k + i, batch)));
            for first in (chunk..chunk_end).step_by(TILE_ROWS) {
                let ws: [&[u8]; TILE_ROWS] = std::array::from_fn(|j| wrow(clamp(first + j, chunk_end)));
                let sums = tile::<B, TILE_ROWS, BLOCK>(ws, xs);
                for (i, row_sums) in sums.iter().enumerate().take(batch - k) {
                    for (j, value) in row_sums.iter().enumerate().take(chunk_end - first) {
                        out[(k + i) * rows.len() + first + j - rows.start] = *value;
                    }
                }
            }
        }
    }
}

/// Every weight row of `w` dotted with every input row of `x` (`[input][weight]`).
#[target_feature(enable = "avx2,fma,f16c")]
fn tile<B: Block, const N: usize, const M: usize>(w: [&[u8]; N], x: [Q8Row<'_>; M]) -> [[f32; N]; M] {
    let blocks = x[0].d.len();
    assert!(w.iter().all(|r| r.len() == blocks * B::BYTES));
    assert!(
        x.iter()
            .all(|r| r.d.len() == blocks && r.s.len() == blocks && r.q.len() == blocks * QK)
    );
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); N]; M];
    let mut mins = [[0f32; N]; M];
    for b in 0..blocks {
        // SAFETY: every row holds `blocks` blocks (asserted), so block `b` of each is in bounds; the CPU has
        // AVX2, FMA and F16C (this function's features).
        unsafe {
            let ws: [(__m256i, f32, f32); N] =
                std::array::from_fn(|j| B::load(&w[j][b * B::BYTES..(b + 1) * B::BYTES]));
            let wbytes: [__m256i; N] = ws.map(|(v, _, _)| if B::SIGNED { _mm256_abs_epi8(v) } else { v });
            for i in 0..M {
                let xq = _mm256_loadu_si256(x[i].q.as_ptr().add(b * QK).cast());
                let (dx, sx) = (x[i].d[b], x[i].s[b]);
                for j in 0..N {
                    let (wv, dw, mw) = ws[j];
                    let xs = if B::SIGNED { _mm256_sign_epi8(xq, wv) } else { xq };
                    let pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(wbytes[j], xs), ones);
                    acc[i][j] =
                        _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), _mm256_cvtepi32_ps(pairs), acc[i][j]);
                    if B::HAS_MIN {
                        mins[i][j] += mw * sx;
                    }
                }
            }
        }
    }
    let mut sums = [[0f32; N]; M];
    for i in 0..M {
        for j in 0..N {
            sums[i][j] = hsum(acc[i][j]) + mins[i][j];
        }
    }
    sums
}

/// The sum of eight lanes, as one fixed tree.
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_hadd_ps(h, h);
    _mm_cvtss_f32(_mm_hadd_ps(h, h))
}

#[cfg(test)]
mod tests {
    use super::super::qdot::dot_q8;
    use super::*;
    use crate::quant::{quantize_q4_0, quantize_q4_1, quantize_q8_0};

    #[test]
    fn the_vector_quantizer_matches_the_reference_bit_for_bit_on_any_block() {
        if !available() {
            return;
        }
        let ramp = |scale: f32| -> Vec<f32> { (0..QK).map(|i| (i as f32 - 15.5) * scale).collect() };
        let mut ties = vec![0.0f32; QK];
        ties[..5].copy_from_slice(&[127.0, 0.5, 1.5, -2.5, -0.5]);
        let mut blocks = vec![vec![0.0; QK], ties, ramp(0.37), ramp(1e-3), ramp(3e4)];
        for odd in [
            1e-38,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ] {
            let mut b = ramp(0.1);
            b[7] = odd;
            blocks.push(b);
        }
        let mut tiny = vec![0.0; QK];
        tiny[3] = 1e-38;
        blocks.push(tiny);
        for block in &blocks {
            let (mut vector, mut scalar) = (Q8Rows::default(), Q8Rows::default());
            quantize_block(block, &mut vector);
            scalar.push_block(block);
            assert_eq!(vector.q, scalar.q, "{block:?}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&vector.d), bits(&scalar.d), "{block:?}");
            assert_eq!(bits(&vector.s), bits(&scalar.s), "{block:?}");
        }
    }

    #[test]
    fn tiles_match_the_scalar_reference_and_batches_match_single_rows() {
        if !available() {
            return;
        }
        let (cols, rows, batch) = (256, 7, 6);
        let wf: Vec<f32> = (0..cols * rows)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3)
            .collect();
        let xf: Vec<f32> = (0..cols * batch)
            .map(|i| ((i * 13 % 59) as f32 / 29.0 - 1.0) * 2.0)
            .collect();
        let x = Q8Rows::quantize(&xf, cols);
        let mut scalar = Q8Rows {
            blocks: cols / QK,
            ..Default::default()
        };
        xf.chunks_exact(QK).for_each(|b| scalar.push_block(b));
        assert_eq!(
            (&x.q, &x.d, &x.s),
            (&scalar.q, &scalar.d, &scalar.s),
            "vector and scalar quantizers"
        );
        for (ty, w) in [
            (GgmlType::Q8_0, quantize_q8_0(&wf)),
            (GgmlType::Q4_0, quantize_q4_0(&wf)),
            (GgmlType::Q4_1, quantize_q4_1(&wf)),
        ] {
            let row_bytes = w.len() / rows;
            let mut batched = Vec::new();
            products(ty, &w, row_bytes, 0..rows, &x, batch, &mut batched);
            for i in 0..batch {
                let xi = Q8Rows::quantize(&xf[i * cols..(i + 1) * cols], cols);
                let mut single = Vec::new();
                products(ty, &w, row_bytes, 0..rows, &xi, 1, &mut single);
                assert_eq!(
                    single,
                    batched[i * rows..(i + 1) * rows],
                    "{ty:?} row {i}: batch invariance"
                );
                for r in 0..rows {
                    let reference = dot_q8(ty, &w[r * row_bytes..(r + 1) * row_bytes], xi.row(0));
                    let got = single[r];
                    assert!(
                        (got - reference).abs() <= 1e-4 * (1.0 + reference.abs()),
                        "{ty:?} {r}: {got} vs {reference}"
                    );
                }
            }
        }
    }
}
