//! f32 and bf16 products with explicit AVX2 FMA: the compiler's vectorization of [`super::dot_rows`] keeps its
//! accumulators in memory and reaches a fraction of what the FMA units do, which matters once a batch makes
//! decoding compute-bound.
//!
//! A register tile holds one accumulator per (input row, weight row) pair: 4 input rows by 3 weight rows for
//! batches (7 loads feed 12 FMAs, so the FMA units, not the load ports, set the pace), and 1 by 1 for a single
//! row (one weight row at a time is one sequential stream, which the prefetchers serve best: in two sets of
//! interleaved runs on 2 cores, SmolLM2 in f32 decoded at a median 27.8 tok/s against 21.9 with eight rows at once,
//! then 23.9 against 22.4). Weight rows go in chunks that stay in L2 while every block of 4 input rows (in L1)
//! passes over them, so each weight is read from memory once per product whatever the batch.
//!
//! Every pair is summed the same way in any tile: one 8-lane FMA chain over the row, the lanes reduced as a
//! fixed tree ([`reduce4`]), then the scalar tail. So a sequence gets the same bits alone or in a batch of any size.

use std::arch::x86_64::{
    __m128i, __m256, _mm_add_ps, _mm_hadd_ps, _mm_loadu_si128, _mm_storeu_ps, _mm256_castps256_ps128,
    _mm256_castsi256_ps, _mm256_cvtepu16_epi32, _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_loadu_ps,
    _mm256_set1_ps, _mm256_setzero_ps, _mm256_slli_epi32, _mm256_storeu_ps,
};
use std::ops::Range;
use std::sync::OnceLock;

/// Bytes of weight rows a chunk holds: a quarter of a 512 KiB L2, leaving room for the input rows and the other
/// matrices' prefetched lines (128 to 256 KiB measured alike on SmolLM2's shapes).
const CHUNK_BYTES: usize = 128 * 1024;
/// Input rows per block of the batched tile.
const BLOCK: usize = 4;
/// Weight rows per batched tile.
const TILE_ROWS: usize = 3;
/// Weight rows per single-input tile (see the module's note).
const SINGLE_ROWS: usize = 1;

pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// A weight element type the kernel widens to f32 in registers: f32 as is, bf16 by a shift (its bits are the high
/// half of an f32's), so bf16 weights cost half the memory traffic and no extra passes.
pub trait Weight: Copy {
    /// Eight weights from `p` widened to f32.
    ///
    /// # Safety
    /// The CPU has AVX2, and `p` points at eight readable elements.
    unsafe fn load8(p: *const Self) -> __m256;
    fn widen(self) -> f32;
}

impl Weight for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees eight readable f32 at `p` and AVX2.
        unsafe { _mm256_loadu_ps(p) }
    }
    fn widen(self) -> f32 {
        self
    }
}

impl Weight for u16 {
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> __m256 {
        // SAFETY: the caller guarantees eight readable u16 (16 bytes, one unaligned 128-bit load) and AVX2.
        unsafe {
            let half = _mm_loadu_si128(p.cast::<__m128i>());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(half)))
        }
    }
    fn widen(self) -> f32 {
        super::bf16_to_f32(self)
    }
}

/// Rows `rows` of the row-major `[_, cols]` matrix `w`, each dotted with every `cols`-wide row of `x`, appended to
/// `out` in `[input][row]` order.
pub fn products<W: Weight>(w: &[W], cols: usize, rows: Range<usize>, x: &[f32], out: &mut Vec<f32>) {
    assert!(available(), "avx2::products called without AVX2 and FMA");
    assert!(rows.end * cols <= w.len() && cols > 0 && x.len().is_multiple_of(cols));
    // SAFETY: the CPU has AVX2 and FMA (asserted above), which is all `products_avx2` requires; it indexes `w`
    // and `x` through checked slices.
    unsafe { products_avx2(w, cols, rows, x, out) }
}

#[target_feature(enable = "avx2,fma")]
fn products_avx2<W: Weight>(w: &[W], cols: usize, rows: Range<usize>, x: &[f32], out: &mut Vec<f32>) {
    let batch = x.len() / cols;
    let base = out.len();
    out.resize(base + rows.len() * batch, 0.0);
    let out = &mut out[base..];
    let wrow = |r: usize| &w[r * cols..(r + 1) * cols];
    let xrow = |k: usize| &x[k * cols..(k + 1) * cols];
    // Out-of-range rows of a partial tile repeat the last real one; their results are not stored.
    let clamp = |i: usize, end: usize| i.min(end - 1);
    if batch == 1 {
        for first in rows.clone().step_by(SINGLE_ROWS) {
            let ws: [&[W]; SINGLE_ROWS] = std::array::from_fn(|j| wrow(clamp(first + j, rows.end)));
            let [sums] = tile(ws, [xrow(0)]);
            for (j, value) in sums.into_iter().enumerate().take(rows.end - first) {
                out[first + j - rows.start] = value;
            }
        }
        return;
    }
    let chunk_rows = (CHUNK_BYTES / (cols * size_of::<W>())).max(TILE_ROWS);
    for chunk in rows.clone().step_by(chunk_rows) {
        let chunk_end = (chunk + chunk_rows).min(rows.end);
        for k in (0..batch).step_by(BLOCK) {
            let xs: [&[f32]; BLOCK] = std::array::from_fn(|j| xrow(clamp(k + j, batch)));
            for first in (chunk..chunk_end).step_by(TILE_ROWS) {
                let ws: [&[W]; TILE_ROWS] = std::array::from_fn(|j| wrow(clamp(first + j, chunk_end)));
                let sums = tile(ws, xs);
                for (i, row_sums) in sums.iter().enumerate().take(batch - k) {
                    for (j, value) in row_sums.iter().enumerate().take(chunk_end - first) {
                        out[(k + i) * rows.len() + first + j - rows.start] = *value;
                    }
                }
            }
        }
    }
}

/// The dot product of every weight row in `w` with every input row in `x` (`[input][weight]`), all of one length.
#[target_feature(enable = "avx2,fma")]
fn tile<W: Weight, const N: usize, const M: usize>(w: [&[W]; N], x: [&[f32]; M]) -> [[f32; N]; M] {
    let cols = x[0].len();
    assert!(w.iter().all(|r| r.len() == cols) && x.iter().all(|r| r.len() == cols));
    let vectorized = cols / 8 * 8;
    let mut acc = [[_mm256_setzero_ps(); N]; M];
    let mut c = 0;
    while c < vectorized {
        // SAFETY: `c + 8 <= vectorized <= cols` and every row holds `cols` values (asserted), so each 8-lane load
        // at `c` is in bounds; the CPU has AVX2 (this function's feature).
        unsafe {
            let wv: [__m256; N] = std::array::from_fn(|j| W::load8(w[j].as_ptr().add(c)));
            for i in 0..M {
                let xv = _mm256_loadu_ps(x[i].as_ptr().add(c));
                for j in 0..N {
                    acc[i][j] = _mm256_fmadd_ps(wv[j], xv, acc[i][j]);
                }
            }
        }
        c += 8;
    }
    let mut sums = [[0f32; N]; M];
    for (i, row) in acc.iter().enumerate() {
        for j in (0..N).step_by(4) {
            let four: [__m256; 4] =
                std::array::from_fn(|l| row.get(j + l).copied().unwrap_or(_mm256_setzero_ps()));
            for (l, value) in reduce4(four).into_iter().enumerate().take(N - j) {
                let tail: f32 = w[j + l][vectorized..]
                    .iter()
                    .zip(&x[i][vectorized..])
                    .map(|(a, b)| a.widen() * b)
                    .sum();
                sums[i][j + l] = value + tail;
            }
        }
    }
    sums
}

/// The lanes of each of four accumulators summed, as one fixed tree for every tile: the halves added lane-wise,
/// then adjacent pairs twice (`((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7))`), four sums in a handful of instructions.
#[target_feature(enable = "avx2,fma")]
fn reduce4(v: [__m256; 4]) -> [f32; 4] {
    let h = v.map(|a| _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a)));
    let sums = _mm_hadd_ps(_mm_hadd_ps(h[0], h[1]), _mm_hadd_ps(h[2], h[3]));
    let mut out = [0f32; 4];
    // SAFETY: `out` holds the 4 values one unaligned 128-bit store writes.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), sums) };
    out
}

/// The dot products of three queries with four key rows of their length (attention scores, `[key][query]`), summed
/// as every product of this kernel is: each key is loaded once for the three query heads that share it.
pub fn dots3x4(queries: [&[f32]; 3], keys: [&[f32]; 4]) -> [[f32; 3]; 4] {
    assert!(available(), "avx2::dots3x4 called without AVX2 and FMA");
    // SAFETY: the CPU has AVX2 and FMA (asserted), all `tile` requires; it checks the rows' lengths itself.
    unsafe { tile(queries, keys) }
}

/// `acc[g] += sum_p weights[g][p] * row(p)` for three heads over `p in 0..len`, every row and accumulator of one
/// width: attention's weighted sums of the value rows three query heads share, 32 columns of all three in
/// registers, so each value row is read once for the three.
pub fn weighted_rows3<'r>(weights: [&[f32]; 3], row: impl Fn(usize) -> &'r [f32], acc: [&mut [f32]; 3]) {
    assert!(available(), "avx2::weighted_rows3 called without AVX2 and FMA");
    // SAFETY: the CPU has AVX2 and FMA (asserted), all `weighted_rows3_avx2` requires.
    unsafe { weighted_rows3_avx2(weights, row, acc) }
}

#[target_feature(enable = "avx2,fma")]
fn weighted_rows3_avx2<'r>(weights: [&[f32]; 3], row: impl Fn(usize) -> &'r [f32], acc: [&mut [f32]; 3]) {
    let width = acc[0].len();
    let len = weights[0].len();
    assert!(acc.iter().all(|a| a.len() == width) && weights.iter().all(|w| w.len() == len));
    let vectorized = width / 32 * 32;
    let [a0, a1, a2] = acc;
    // The three heads' weights of each position.
    let per_row = (0..len).map(|p| weights.map(|w| w[p]));
    for c in (0..vectorized).step_by(32) {
        // SAFETY: `c + 32 <= vectorized <= width`, every accumulator holds `width` values (asserted) and every row
        // is checked to hold `width` before it is read, so the 8-lane loads and stores at `c + 8 * l` (l < 4) are
        // in bounds.
        unsafe {
            let ptrs = [
                a0.as_mut_ptr().add(c),
                a1.as_mut_ptr().add(c),
                a2.as_mut_ptr().add(c),
            ];
            let mut sums: [[__m256; 4]; 3] =
                ptrs.map(|a| std::array::from_fn(|l| _mm256_loadu_ps(a.add(8 * l))));
            for (p, ws) in per_row.clone().enumerate() {
                let r = row(p);
                assert_eq!(r.len(), width, "a value row of another width");
                let values: [__m256; 4] = std::array::from_fn(|l| _mm256_loadu_ps(r.as_ptr().add(c + 8 * l)));
                for (head, w) in sums.iter_mut().zip(ws) {
                    let w = _mm256_set1_ps(w);
                    for (sum, value) in head.iter_mut().zip(values) {
                        *sum = _mm256_fmadd_ps(w, value, *sum);
                    }
                }
            }
            for (a, head) in ptrs.into_iter().zip(sums) {
                for (l, sum) in head.into_iter().enumerate() {
                    _mm256_storeu_ps(a.add(8 * l), sum);
                }
            }
        }
    }
    for (p, ws) in per_row.enumerate() {
        let r = &row(p)[vectorized..];
        for (a, w) in [&mut *a0, &mut *a1, &mut *a2].into_iter().zip(ws) {
            for (a, x) in a[vectorized..].iter_mut().zip(r) {
                *a += w * x;
            }
        }
    }
}
