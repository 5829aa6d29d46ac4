//! AVX2 (and AVX-512 VNNI) tiles for interleaved groups of eight Q8_0, Q4_0 or Q4_1 rows (`crate::interleave`)
//! against Q8 activations.
//!
//! Per block of a group, the eight rows' scales load and convert as one vector. Each 32-byte register of values
//! (row r in 32-bit lane r) is multiplied by a broadcast of the four activation bytes its values meet and summed
//! into its lane, so lane r ends with row r's integer dot; one conversion and one FMA then scale all eight.
//! Q4_0's offset of 8 is taken off in integers (the sum starts at -8 times the activation block's sum; the row-by-row
//! tiles and the scalar reference take it through that sum rounded to f16, as ggml's scalar code does, so a Q4_0
//! row's last bits differ between the two layouts, while a loaded model's matrices keep one each); Q4_1's
//! minimum adds `m * s` per block. Q8_0's signed weights take the sign trick (`|w|` times `x` signed by `w`).
//!
//! With VNNI, `vpdpbusd` multiplies and sums a register in one instruction. Without it, `maddubs` sums pairs to
//! 16 bits, where a block's eight 4-bit registers fit (8 * 2 * 15 * 128 < 2^15; Q8_0 widens each one), and one
//! `madd` widens to 32. Both give the same integers and the float steps are the same, so a row gets the same bits
//! on either, alone or in a batch. Against the row-by-row tiles of `qdot_avx2.rs` this does about a third of the
//! instructions per weight: a 4-bit row block took ~16, here ~5.

use std::arch::x86_64::{
    __m256i, _mm_loadu_si128, _mm256_abs_epi8, _mm256_add_epi16, _mm256_add_epi32, _mm256_and_si256,
    _mm256_cvtepi32_ps, _mm256_cvtph_ps, _mm256_dpbusd_epi32, _mm256_fmadd_ps, _mm256_loadu_si256,
    _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_mul_ps, _mm256_set1_epi8, _mm256_set1_epi16,
    _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps, _mm256_setzero_si256, _mm256_sign_epi8,
    _mm256_srli_epi16, _mm256_storeu_ps,
};
use std::ops::Range;
use std::sync::OnceLock;

use super::qdot::{Q8Row, Q8Rows, QK};
use super::qdot_avx2::prefetch_ahead;
use crate::interleave::GROUP;
use crate::quant::GgmlType;

/// Input rows per batched tile: each group block's registers are loaded and unpacked once for this many rows.
const BLOCK: usize = 4;

/// Whether the CPU has AVX2, FMA and F16C: every tile here needs them.
pub(crate) fn available() -> bool {
    super::qdot_avx2::available()
}

/// Whether the CPU has 256-bit VNNI (`vpdpbusd` on ymm registers).
fn vnni() -> bool {
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| {
        available() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
    })
}

/// Rows `rows` of the interleaved matrix `w` (rows of `row_bytes`, in groups of [`GROUP`]) dotted with each of the
/// `batch` rows of `x`, appended to `out` in `[input][row]` order.
pub(crate) fn products(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    x: &Q8Rows,
    batch: usize,
    out: &mut Vec<f32>,
) {
    products_on(vnni(), ty, w, row_bytes, rows, x, batch, out);
}

/// [`products`] on VNNI or on plain AVX2.
#[allow(clippy::too_many_arguments)]
fn products_on(
    vnni: bool,
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    x: &Q8Rows,
    batch: usize,
    out: &mut Vec<f32>,
) {
    assert!(available() && crate::interleave::parts(ty).is_some());
    assert!(rows.end.next_multiple_of(GROUP) * row_bytes <= w.len());
    assert!(x.blocks * ty.block().1 as usize == row_bytes && x.d.len() >= batch * x.blocks);
    let args = (w, row_bytes, rows, x, batch, out);
    // SAFETY: the CPU has AVX2, FMA and F16C (asserted), and VNNI where `vnni` (checked by the caller through
    // `vnni()`, or by tests); the kernels read `w` and `x` through slices whose lengths were checked above.
    unsafe {
        match (ty, vnni) {
            (GgmlType::Q8_0, false) => run_avx2::<Q8_0>(args),
            (GgmlType::Q4_0, false) => run_avx2::<Q4_0>(args),
            (_, false) => run_avx2::<Q4_1>(args),
            (GgmlType::Q8_0, true) => run_vnni::<Q8_0>(args),
            (GgmlType::Q4_0, true) => run_vnni::<Q4_0>(args),
            (_, true) => run_vnni::<Q4_1>(args),
        }
    }
}

type Args<'a, 'o> = (&'a [u8], usize, Range<usize>, &'a Q8Rows, usize, &'o mut Vec<f32>);

/// An interleavable block type: the bytes of one row's block and how its values meet the activations.
trait Block {
    /// Bytes of f16 fields at the front of a row's block (scale, then Q4_1's minimum).
    const HEADER: usize;
    /// 32-byte registers of values per group block (a row's value bytes / 4).
    const REGS: usize;
    /// What the integer sum starts at, times the activation block's sum (Q4_0 stores `q + 8`).
    const OFFSET: i32;
    const HAS_MIN: bool;
    /// 8-bit signed weights (one register meets one broadcast) rather than 4-bit unsigned (two, low and high).
    const SIGNED: bool;
    /// Bytes of one block's value registers in a group, and of its fields.
    const VALUE_BYTES: usize = 32 * Self::REGS;
    const FIELD_BYTES: usize = Self::HEADER * GROUP;
    const GROUP_BYTES: usize = Self::VALUE_BYTES + Self::FIELD_BYTES;
}

struct Q8_0;
struct Q4_0;
struct Q4_1;

impl Block for Q8_0 {
    const HEADER: usize = 2;
    const REGS: usize = 8;
    const OFFSET: i32 = 0;
    const HAS_MIN: bool = false;
    const SIGNED: bool = true;
}

impl Block for Q4_0 {
    const HEADER: usize = 2;
    const REGS: usize = 4;
    const OFFSET: i32 = -8;
    const HAS_MIN: bool = false;
    const SIGNED: bool = false;
}

impl Block for Q4_1 {
    const HEADER: usize = 4;
    const REGS: usize = 4;
    const OFFSET: i32 = 0;
    const HAS_MIN: bool = true;
    const SIGNED: bool = false;
}

/// How unsigned weight bytes times signed activation bytes are summed into 32-bit lanes.
trait Engine {
    type Acc: Copy;
    /// An accumulator whose lanes hold `init`.
    unsafe fn start(init: i32) -> Self::Acc;
    /// Adds a register of 4-bit weights (at most eight per block) times `x`.
    unsafe fn add_narrow(acc: Self::Acc, w: __m256i, x: __m256i) -> Self::Acc;
    /// Adds a register of 8-bit weights times `x`.
    unsafe fn add_wide(acc: Self::Acc, w: __m256i, x: __m256i) -> Self::Acc;
    /// The 32-bit sums.
    unsafe fn finish(acc: Self::Acc) -> __m256i;
}

struct Avx2;
struct Vnni;

/// A block's 4-bit registers meet the activations twice each (low and high nibbles), each `maddubs` lane summing two
/// products of at most 15 * 128: their 16-bit sum must not saturate.
const _: () = assert!(2 * 4 * (2 * 15 * 128) <= i16::MAX as usize);

impl Engine for Avx2 {
    /// 32-bit sums and 16-bit pair sums not yet widened.
    type Acc = (__m256i, __m256i);
    #[inline(always)]
    unsafe fn start(init: i32) -> Self::Acc {
        // SAFETY: the caller has AVX2.
        unsafe { (_mm256_set1_epi32(init), _mm256_setzero_si256()) }
    }
    #[inline(always)]
    unsafe fn add_narrow(acc: Self::Acc, w: __m256i, x: __m256i) -> Self::Acc {
        // SAFETY: the caller has AVX2.
        unsafe { (acc.0, _mm256_add_epi16(acc.1, _mm256_maddubs_epi16(w, x))) }
    }
    #[inline(always)]
    unsafe fn add_wide(acc: Self::Acc, w: __m256i, x: __m256i) -> Self::Acc {
        // SAFETY: the caller has AVX2.
        unsafe {
            let pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
            (_mm256_add_epi32(acc.0, pairs), acc.1)
        }
    }
    #[inline(always)]
    unsafe fn finish(acc: Self::Acc) -> __m256i {
        // SAFETY: the caller has AVX2.
        unsafe { _mm256_add_epi32(acc.0, _mm256_madd_epi16(acc.1, _mm256_set1_epi16(1))) }
    }
}

impl Engine for Vnni {
    type Acc = __m256i;
    #[inline(always)]
    unsafe fn start(init: i32) -> Self::Acc {
        // SAFETY: the caller has AVX2.
        unsafe { _mm256_set1_epi32(init) }
    }
    #[inline(always)]
    unsafe fn add_narrow(acc: Self::Acc, w: __m256i, x: __m256i) -> Self::Acc {
        // SAFETY: the caller has AVX-512 VNNI and VL.
        unsafe { _mm256_dpbusd_epi32(acc, w, x) }
    }
    #[inline(always)]
    unsafe fn add_wide(acc: Self::Acc, w: __m256i, x: __m256i) -> Self::Acc {
        // SAFETY: the caller has AVX-512 VNNI and VL.
        unsafe { _mm256_dpbusd_epi32(acc, w, x) }
    }
    #[inline(always)]
    unsafe fn finish(acc: Self::Acc) -> __m256i {
        acc
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn run_avx2<B: Block>(args: Args<'_, '_>) {
    // SAFETY: this function's features are all `run` needs on the AVX2 engine.
    unsafe { run::<B, Avx2>(args) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn run_vnni<B: Block>(args: Args<'_, '_>) {
    // SAFETY: this function's features are all `run` needs on the VNNI engine.
    unsafe { run::<B, Vnni>(args) }
}

/// Every group the rows touch, one tile per group (and per [`BLOCK`] inputs); rows of a group outside `rows` are
/// computed and dropped.
///
/// # Safety
/// The CPU has the engine's features, and the lengths were checked by [`products_on`].
#[inline(always)]
unsafe fn run<B: Block, E: Engine>((w, row_bytes, rows, x, batch, out): Args<'_, '_>) {
    let base = out.len();
    out.resize(base + rows.len() * batch, 0.0);
    let out = &mut out[base..];
    let group_bytes = row_bytes * GROUP;
    let clamp = |i: usize| i.min(batch - 1);
    for g in rows.start / GROUP..rows.end.div_ceil(GROUP) {
        let gw = &w[g * group_bytes..(g + 1) * group_bytes];
        let kept = (g * GROUP).max(rows.start)..((g + 1) * GROUP).min(rows.end);
        let mut store = |i: usize, sums: &[f32; GROUP]| {
            for r in kept.clone() {
                out[i * rows.len() + r - rows.start] = sums[r - g * GROUP];
            }
        };
        if batch == 1 {
            // Prefetching runs on past this group to the matrix's end: the next group, or the pool's next chunk.
            let ahead = &w[g * group_bytes..];
            // SAFETY: the caller's contract.
            let [sums] = unsafe { tile::<B, E, 1>(gw, [x.row(0)], Some(ahead)) };
            store(0, &sums);
            continue;
        }
        for k in (0..batch).step_by(BLOCK) {
            let xs: [Q8Row<'_>; BLOCK] = std::array::from_fn(|i| x.row(clamp(k + i)));
            // SAFETY: the caller's contract.
            let sums = unsafe { tile::<B, E, BLOCK>(gw, xs, None) };
            for (i, s) in sums.iter().enumerate().take(batch - k) {
                store(k + i, s);
            }
        }
    }
}

/// One group's rows (`w`, its bytes) dotted with `M` input rows: `[input][row of the group]`. `ahead`, the bytes
/// from the group's start to the matrix's end, is prefetched as the row-by-row tiles prefetch (4 KiB on, which
/// measured as well as 1 KiB and better than none here: Q4_0 decoded at 141-192 tok/s against 155-166).
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and the engine's features.
#[inline(always)]
unsafe fn tile<B: Block, E: Engine, const M: usize>(
    w: &[u8],
    x: [Q8Row<'_>; M],
    ahead: Option<&[u8]>,
) -> [[f32; GROUP]; M] {
    let blocks = x[0].d.len();
    assert!(w.len() == blocks * B::GROUP_BYTES);
    assert!(x.iter().all(|r| r.d.len() == blocks
        && r.s.len() == blocks
        && r.sum.len() == blocks
        && r.q.len() == blocks * QK));
    // SAFETY: block `b`'s value registers are `w[b * VALUE_BYTES..][..VALUE_BYTES]` and its fields
    // `w[blocks * VALUE_BYTES + b * FIELD_BYTES..][..FIELD_BYTES]`, inside `w` (its length asserted above);
    // activation bytes `b * QK + 4k` for `k < 8` lie inside each row's `q` (asserted above); prefetches stay
    // inside `ahead`. The caller has the features.
    unsafe {
        let nibble = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); M];
        for b in 0..blocks {
            let p = w.as_ptr().add(b * B::VALUE_BYTES);
            let fields = w.as_ptr().add(blocks * B::VALUE_BYTES + b * B::FIELD_BYTES);
            if let Some(ahead) = ahead {
                prefetch_ahead(ahead, b * B::GROUP_BYTES..(b + 1) * B::GROUP_BYTES, ahead.len());
            }
            let four = |i: usize, at: usize| {
                _mm256_set1_epi32(x[i].q.as_ptr().add(b * QK + at).cast::<i32>().read_unaligned())
            };
            let mut sums: [E::Acc; M] = std::array::from_fn(|i| E::start(B::OFFSET * x[i].sum[b]));
            for k in 0..B::REGS {
                let v = _mm256_loadu_si256(p.add(32 * k).cast());
                if B::SIGNED {
                    let magnitudes = _mm256_abs_epi8(v);
                    for (i, sum) in sums.iter_mut().enumerate() {
                        *sum = E::add_wide(*sum, magnitudes, _mm256_sign_epi8(four(i, 4 * k), v));
                    }
                } else {
                    let low = _mm256_and_si256(v, nibble);
                    let high = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                    for (i, sum) in sums.iter_mut().enumerate() {
                        *sum = E::add_narrow(*sum, low, four(i, 4 * k));
                        *sum = E::add_narrow(*sum, high, four(i, 16 + 4 * k));
                    }
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(fields.cast()));
            for i in 0..M {
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(x[i].d[b]));
                acc[i] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(E::finish(sums[i])), acc[i]);
                if B::HAS_MIN {
                    let m = _mm256_cvtph_ps(_mm_loadu_si128(fields.add(2 * GROUP).cast()));
                    acc[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[i].s[b]), acc[i]);
                }
            }
        }
        acc.map(|a| {
            let mut lanes = [0f32; GROUP];
            _mm256_storeu_ps(lanes.as_mut_ptr(), a);
            lanes
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::qdot::dot_q8;
    use super::*;
    use crate::interleave::interleave;
    use crate::quant::{quantize_q4_0, quantize_q4_1, quantize_q8_0};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + seed * 11) % 101) as f32 / 50.0 - 1.0) * (1.0 + (i % 7) as f32 * 0.2))
            .collect()
    }

    /// A `[rows, cols]` matrix of `ty` blocks in GGUF's order and interleaved.
    fn matrix(ty: GgmlType, rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
        let wf = values(rows * cols, 3);
        let plain = match ty {
            GgmlType::Q8_0 => quantize_q8_0(&wf),
            GgmlType::Q4_0 => quantize_q4_0(&wf),
            _ => quantize_q4_1(&wf),
        };
        let grouped = interleave(ty, &plain, rows).expect("whole groups");
        (plain, grouped)
    }

    /// Row `w` dotted with input row `x` as the tiles should compute it, and the sum of the products' magnitudes
    /// (what float rounding is relative to). Q4_0 in f64 from its dequantized values, exact (ggml's scalar dot,
    /// [`dot_q8`], takes its offset through the activation sum rounded to f16, which the tiles do not); Q8_0 and
    /// Q4_1 by [`dot_q8`], whose arithmetic the tiles share up to summation order.
    fn reference(ty: GgmlType, w: &[u8], x: Q8Row<'_>) -> (f32, f32) {
        let wf = crate::quant::dequantize(ty, w).unwrap();
        let xf =
            x.q.iter()
                .enumerate()
                .map(|(i, &q)| f64::from(q) * f64::from(x.d[i / QK]));
        let terms: Vec<f64> = wf.iter().zip(xf).map(|(&w, x)| f64::from(w) * x).collect();
        let scale = terms.iter().map(|t| t.abs()).sum::<f64>() as f32;
        match ty {
            GgmlType::Q4_0 => (terms.iter().sum::<f64>() as f32, scale),
            _ => (dot_q8(ty, w, x), scale),
        }
    }

    /// The tiles' block constants are the layout's (`interleave::parts`), which is the one definition of it.
    #[test]
    fn each_block_type_reads_the_layout_interleave_writes() {
        fn parts<B: Block>() -> Option<(usize, usize)> {
            Some((B::HEADER, 4 * B::REGS))
        }
        assert_eq!(crate::interleave::parts(GgmlType::Q8_0), parts::<Q8_0>());
        assert_eq!(crate::interleave::parts(GgmlType::Q4_0), parts::<Q4_0>());
        assert_eq!(crate::interleave::parts(GgmlType::Q4_1), parts::<Q4_1>());
    }

    fn engines() -> Vec<bool> {
        if vnni() { vec![false, true] } else { vec![false] }
    }

    #[test]
    fn interleaved_tiles_match_the_scalar_reference_on_rows_in_gguf_order() {
        if !available() {
            return;
        }
        let (rows, cols, batch) = (24, 256, 6);
        let xf = values(cols * batch, 5);
        let x = Q8Rows::quantize(&xf, cols);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let (plain, grouped) = matrix(ty, rows, cols);
            let row_bytes = plain.len() / rows;
            for vnni in engines() {
                // A range that starts and ends inside groups.
                let range = 3..21;
                let mut ours = Vec::new();
                products_on(vnni, ty, &grouped, row_bytes, range.clone(), &x, batch, &mut ours);
                for i in 0..batch {
                    for (j, r) in range.clone().enumerate() {
                        let (reference, scale) =
                            reference(ty, &plain[r * row_bytes..(r + 1) * row_bytes], x.row(i));
                        let got = ours[i * range.len() + j];
                        assert!(
                            (got - reference).abs() <= 1e-5 * scale,
                            "{ty:?} vnni {vnni} input {i} row {r}: {got} vs {reference}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_in_a_batch_and_on_either_engine() {
        if !available() {
            return;
        }
        let (rows, cols, batch) = (16, 128, 7);
        let xf = values(cols * batch, 9);
        let x = Q8Rows::quantize(&xf, cols);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let (plain, grouped) = matrix(ty, rows, cols);
            let row_bytes = plain.len() / rows;
            let mut batched = Vec::new();
            products_on(false, ty, &grouped, row_bytes, 0..rows, &x, batch, &mut batched);
            for vnni in engines() {
                for i in 0..batch {
                    let xi = Q8Rows::quantize(&xf[i * cols..(i + 1) * cols], cols);
                    let mut single = Vec::new();
                    products_on(vnni, ty, &grouped, row_bytes, 0..rows, &xi, 1, &mut single);
                    assert_eq!(
                        single,
                        batched[i * rows..(i + 1) * rows],
                        "{ty:?} vnni {vnni} input {i}"
                    );
                    let mut one_row = Vec::new();
                    products_on(vnni, ty, &grouped, row_bytes, 5..6, &xi, 1, &mut one_row);
                    assert_eq!(one_row[0], single[5], "{ty:?} row 5 alone");
                }
            }
        }
    }

    #[test]
    fn extreme_weights_and_activations_sum_exactly() {
        if !available() {
            return;
        }
        // Every Q8_0 weight -128 (a hostile file; ggml writes -127 at most) or 127, every nibble 15, activations
        // all 127 (the 16-bit sums' largest) or of mixed sign: the integer sums must not saturate on either engine.
        let cols = 64;
        let mixed: Vec<f32> = (0..cols).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        for x in [
            Q8Rows::quantize(&vec![1.0; cols], cols),
            Q8Rows::quantize(&mixed, cols),
        ] {
            for (ty, fill) in [
                (GgmlType::Q8_0, 0x80u8),
                (GgmlType::Q8_0, 0x7F),
                (GgmlType::Q4_0, 0xFF),
                (GgmlType::Q4_1, 0xFF),
            ] {
                let block = ty.block().1 as usize;
                let mut plain = vec![fill; 8 * cols / 32 * block];
                for b in plain.chunks_exact_mut(block) {
                    b[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
                    if ty == GgmlType::Q4_1 {
                        b[2..4].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
                    }
                }
                let grouped = interleave(ty, &plain, 8).unwrap();
                for vnni in engines() {
                    let mut ours = Vec::new();
                    products_on(vnni, ty, &grouped, plain.len() / 8, 0..8, &x, 1, &mut ours);
                    let (reference, scale) = reference(ty, &plain[..plain.len() / 8], x.row(0));
                    assert!(
                        (ours[0] - reference).abs() <= 1e-5 * scale,
                        "{ty:?} {fill:#x}: {} vs {reference}",
                        ours[0]
                    );
                }
            }
        }
    }
}
