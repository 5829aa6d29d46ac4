//! AVX2 dot products of K-quant weight rows (Q4_K, Q5_K, Q6_K) with Q8_K activation rows.
//!
//! Per 256-value super-block, each sub-block's products come from one `maddubs` (unsigned weight bytes times
//! signed activations, pairs summed to 16 bits) and one `madd` against the sub-block's integer scale (so the scale
//! is applied in the integer domain), summed to one i32 vector per super-block; that is converted and scaled by
//! `d` once. The minimums (Q4_K, Q5_K) and Q6_K's offset of 32 use the activation sums per 16 that Q8_K carries.
//! One weight row and one input row at a time: a pair is summed the same way alone or in a batch.

use std::arch::x86_64::{
    __m256i, _mm_loadl_epi64, _mm256_add_epi32, _mm256_and_si256, _mm256_cvtepi32_ps, _mm256_cvtepu8_epi32,
    _mm256_fmadd_ps, _mm256_loadu_si256, _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_mullo_epi32,
    _mm256_or_si256, _mm256_set_epi16, _mm256_set1_epi8, _mm256_set1_epi16, _mm256_set1_ps,
    _mm256_setzero_ps, _mm256_setzero_si256, _mm256_slli_epi16, _mm256_srli_epi16,
};
use std::ops::Range;

use super::qdot::{Q8KRow, Q8KRows, QK_K};
use super::qdot_avx2::{f16_at, hsum};
use crate::quant::GgmlType;

pub(crate) fn handles(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) && super::qdot_avx2::available()
}

/// Rows `rows` of `w` (rows of `row_bytes`) dotted with each of the `batch` rows of `x`, appended to `out` in
/// `[input][row]` order.
pub(crate) fn products(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    x: &Q8KRows,
    batch: usize,
    out: &mut Vec<f32>,
) {
    let block_bytes = ty.block().1 as usize;
    assert!(handles(ty) && rows.end * row_bytes <= w.len());
    assert!(x.blocks * block_bytes == row_bytes && x.d.len() >= batch * x.blocks);
    let base = out.len();
    out.resize(base + rows.len() * batch, 0.0);
    for (j, r) in rows.clone().enumerate() {
        super::qdot_avx2::prefetch_ahead(w, r * row_bytes..(r + 1) * row_bytes, w.len());
        let wrow = &w[r * row_bytes..(r + 1) * row_bytes];
        for i in 0..batch {
            // SAFETY: the CPU has AVX2, FMA and F16C (`handles`); the dot functions check their slices' lengths.
            out[base + i * rows.len() + j] = unsafe {
                match ty {
                    GgmlType::Q6K => dot_q6k(wrow, x.row(i)),
                    _ => dot_q45k(wrow, x.row(i), ty == GgmlType::Q5K),
                }
            };
        }
    }
}

/// The eight 6-bit scales and minimums of a Q4_K/Q5_K block from its 12 packed bytes, as ggml unpacks them:
/// bytes 0-3 hold scales 0-3 (low 6 bits) and the top bits of scales 4-7, bytes 4-7 the same for the minimums,
/// bytes 8-11 the low nibbles of scales and minimums 4-7.
#[inline(always)]
fn scales_and_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let (a, b, c) = (word(0), word(1), word(2));
    let scales_hi = (c & LOW4) | (((a >> 6) & LOW2) << 4);
    let mins_hi = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    sc[..4].copy_from_slice(&(a & LOW6).to_le_bytes());
    sc[4..].copy_from_slice(&scales_hi.to_le_bytes());
    m[..4].copy_from_slice(&(b & LOW6).to_le_bytes());
    m[4..].copy_from_slice(&mins_hi.to_le_bytes());
    (sc, m)
}

/// 32 bytes from `p` (bounds checked by the slice).
#[inline(always)]
unsafe fn load32(p: &[u8]) -> __m256i {
    assert!(p.len() >= 32);
    // SAFETY: 32 readable bytes (asserted); the caller has AVX2.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[inline(always)]
unsafe fn load32_i8(p: &[i8]) -> __m256i {
    assert!(p.len() >= 32);
    // SAFETY: as `load32`.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

/// A Q4_K (or Q5_K, with `fifth`) row against a Q8_K row.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q45k(w: &[u8], x: Q8KRow<'_>, fifth: bool) -> f32 {
    let block_bytes = if fifth { 176 } else { 144 };
    let blocks = x.d.len();
    assert!(w.len() == blocks * block_bytes && x.q.len() == blocks * QK_K && x.bsums.len() == blocks * 16);
    let low = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    assert!(x.sums32.len() == blocks * 8);
    let mut acc = _mm256_setzero_ps();
    for b in 0..blocks {
        let wb = &w[b * block_bytes..(b + 1) * block_bytes];
        let xq = &x.q[b * QK_K..(b + 1) * QK_K];
        // SAFETY: F16C (this function's feature); `wb` holds the whole block.
        let (d, dmin) = unsafe { (f16_at(wb, 0) * x.d[b], f16_at(wb, 2) * x.d[b]) };
        let (sc, m) = scales_and_mins(&wb[4..16]);
        let (qh, qs) = if fifth {
            (&wb[16..48], &wb[48..176])
        } else {
            (&wb[0..0], &wb[16..144])
        };
        let mut sumi = _mm256_setzero_si256();
        for chunk in 0..4 {
            let (sc_lo, sc_hi) = (sc[2 * chunk], sc[2 * chunk + 1]);
            // SAFETY: AVX2 (this function's feature); every load is a checked 32-byte slice.
            unsafe {
                let packed = load32(&qs[32 * chunk..]);
                let mut q_lo = _mm256_and_si256(packed, low);
                let mut q_hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                if fifth {
                    // Bit `2 chunk` of each qh byte is the fifth bit of the low sub-block, the next bit the high's.
                    let bits = load32(qh);
                    let shifted = match chunk {
                        0 => bits,
                        1 => _mm256_srli_epi16::<2>(bits),
                        2 => _mm256_srli_epi16::<4>(bits),
                        _ => _mm256_srli_epi16::<6>(bits),
                    };
                    let b_lo = _mm256_and_si256(shifted, one);
                    let b_hi = _mm256_and_si256(_mm256_srli_epi16::<1>(shifted), one);
                    q_lo = _mm256_or_si256(q_lo, _mm256_slli_epi16::<4>(b_lo));
                    q_hi = _mm256_or_si256(q_hi, _mm256_slli_epi16::<4>(b_hi));
                }
                let x_lo = load32_i8(&xq[64 * chunk..]);
                let x_hi = load32_i8(&xq[64 * chunk + 32..]);
                let p_lo = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(q_lo, x_lo),
                    _mm256_set1_epi16(i16::from(sc_lo)),
                );
                let p_hi = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(q_hi, x_hi),
                    _mm256_set1_epi16(i16::from(sc_hi)),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_lo, p_hi));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        // The minimums: each sub-block's `m` times its activation sum, all eight in one vector.
        // SAFETY: AVX2 (this function's feature); `sums32` holds this block's eight sums (asserted above).
        unsafe {
            let mins = _mm256_cvtepu8_epi32(_mm_loadl_epi64(m.as_ptr().cast()));
            let sums = _mm256_loadu_si256(x.sums32[b * 8..b * 8 + 8].as_ptr().cast());
            acc = _mm256_fmadd_ps(
                _mm256_set1_ps(-dmin),
                _mm256_cvtepi32_ps(_mm256_mullo_epi32(mins, sums)),
                acc,
            );
        }
    }
    hsum(acc)
}

/// A Q6_K row against a Q8_K row.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k(w: &[u8], x: Q8KRow<'_>) -> f32 {
    const BYTES: usize = 210;
    let blocks = x.d.len();
    assert!(w.len() == blocks * BYTES && x.q.len() == blocks * QK_K && x.bsums.len() == blocks * 16);
    let low = _mm256_set1_epi8(0x0F);
    let two = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_ps();
    for b in 0..blocks {
        let wb = &w[b * BYTES..(b + 1) * BYTES];
        let xq = &x.q[b * QK_K..(b + 1) * QK_K];
        let bsums = &x.bsums[b * 16..(b + 1) * 16];
        let sc: [i16; 16] = std::array::from_fn(|g| i16::from(wb[192 + g] as i8));
        // SAFETY: F16C (this function's feature); `wb` holds the whole block.
        let d = unsafe { f16_at(wb, 208) } * x.d[b];
        // The offset of 32 on every value: each group's scale times its activation sum, sixteen in one `madd`.
        // SAFETY: AVX2 (this function's feature); `sc` and `bsums` hold 16 i16 each.
        unsafe {
            let scales = _mm256_loadu_si256(sc.as_ptr().cast());
            let sums = _mm256_loadu_si256(bsums.as_ptr().cast());
            let offset = _mm256_cvtepi32_ps(_mm256_madd_epi16(scales, sums));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(-32.0 * d), offset, acc);
        }
        let mut sumi = _mm256_setzero_si256();
        for half in 0..2 {
            let (ql, qh) = (&wb[64 * half..], &wb[128 + 32 * half..]);
            let x_half = &xq[128 * half..];
            // SAFETY: AVX2 (this function's feature); every load is a checked 32-byte slice.
            unsafe {
                let (l0, l1, h) = (load32(ql), load32(&ql[32..]), load32(qh));
                let high = |shift: i32| -> __m256i {
                    let s = match shift {
                        0 => h,
                        2 => _mm256_srli_epi16::<2>(h),
                        4 => _mm256_srli_epi16::<4>(h),
                        _ => _mm256_srli_epi16::<6>(h),
                    };
                    _mm256_slli_epi16::<4>(_mm256_and_si256(s, two))
                };
                let q = [
                    _mm256_or_si256(_mm256_and_si256(l0, low), high(0)),
                    _mm256_or_si256(_mm256_and_si256(l1, low), high(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l0), low), high(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l1), low), high(6)),
                ];
                for (k, qv) in q.into_iter().enumerate() {
                    // Values 32k..32k + 32 of this half: groups 8 half + 2k (first 16) and the next.
                    let g = 8 * half + 2 * k;
                    let (a, c) = (sc[g], sc[g + 1]);
                    let scales = _mm256_set_epi16(c, c, c, c, c, c, c, c, a, a, a, a, a, a, a, a);
                    let xv = load32_i8(&x_half[32 * k..]);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(qv, xv), scales));
                }
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}

#[cfg(test)]
mod tests {
    use super::super::qdot::dot_q8k;
    use super::*;
    use crate::quantize::quantize;

    #[test]
    fn packed_scales_unpack_as_ggml_does() {
        let packed: Vec<u8> = (0..12u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
        let (sc, m) = scales_and_mins(&packed);
        for j in 0..8 {
            assert_eq!(
                (sc[j], m[j]),
                crate::quant::scale_min_k4(j, &packed),
                "sub-block {j}"
            );
        }
    }

    #[test]
    fn k_quant_rows_match_the_scalar_reference() {
        if !handles(GgmlType::Q4K) {
            return;
        }
        let cols = 512;
        let wf: Vec<f32> = (0..cols * 3)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3)
            .collect();
        let xf: Vec<f32> = (0..cols * 2)
            .map(|i| ((i * 13 % 59) as f32 / 29.0 - 1.0) * 2.0)
            .collect();
        let x = Q8KRows::quantize(&xf, cols);
        // Q5_K has no quantizer here: Q4_K blocks with random fifth bits spliced in are valid Q5_K blocks.
        let q4k = quantize(GgmlType::Q4K, &wf).unwrap();
        let q5k: Vec<u8> = q4k
            .chunks_exact(144)
            .enumerate()
            .flat_map(|(b, block)| {
                let qh: Vec<u8> = (0..32).map(|l| ((l * 29 + b * 7) % 256) as u8).collect();
                [&block[..16], &qh[..], &block[16..]].concat()
            })
            .collect();
        for (ty, w) in [
            (GgmlType::Q4K, q4k),
            (GgmlType::Q5K, q5k),
            (GgmlType::Q6K, quantize(GgmlType::Q6K, &wf).unwrap()),
        ] {
            let row_bytes = w.len() / 3;
            let mut ours = Vec::new();
            products(ty, &w, row_bytes, 0..3, &x, 2, &mut ours);
            for i in 0..2 {
                for r in 0..3 {
                    let reference = dot_q8k(ty, &w[r * row_bytes..(r + 1) * row_bytes], x.row(i));
                    let got = ours[i * 3 + r];
                    let tol = 1e-4 * (1.0 + reference.abs());
                    assert!(
                        (got - reference).abs() <= tol,
                        "{ty:?} input {i} row {r}: {got} vs {reference}"
                    );
                }
            }
        }
    }
}
