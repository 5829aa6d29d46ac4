//! GGML tensor types and their dequantization to f32 (the block layouts of ggml-common.h).

use half::f16;

/// The GGML tensor types we know the size of. Only some can be dequantized: see [`dequantize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Q8K = 15,
    BF16 = 30,
}

impl GgmlType {
    pub fn from_u32(v: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match v {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            30 => BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (u64, u64) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
        }
    }

    /// Bytes taken by `elements` values, or None when they are not a whole number of blocks.
    pub fn byte_size(self, elements: u64) -> Option<u64> {
        let (per_block, bytes) = self.block();
        elements
            .is_multiple_of(per_block)
            .then(|| elements / per_block * bytes)
    }
}

/// How a quantized matrix's blocks lie in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Each row's blocks in turn, as GGUF stores them.
    Rows,
    /// Groups of rows interleaved block by block, as the decode kernels stream them (see `crate::interleave`).
    Interleaved,
}

/// A quantized matrix's block type and layout: what every reader of its bytes needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantFormat {
    pub ty: GgmlType,
    pub layout: Layout,
}

impl QuantFormat {
    /// `ty` blocks in GGUF's row order.
    pub fn rows(ty: GgmlType) -> Self {
        QuantFormat {
            ty,
            layout: Layout::Rows,
        }
    }
}

pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes raw GGML bytes into f32 values in storage order.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let (per_block, block_bytes) = ty.block();
    let (per_block, block_bytes) = (per_block as usize, block_bytes as usize);
    if !bytes.len().is_multiple_of(block_bytes) {
        return Err(format!(
            "{} bytes are not a whole number of {ty:?} blocks",
            bytes.len()
        ));
    }
    let mut out = Vec::with_capacity(bytes.len() / block_bytes * per_block);
    match ty {
        GgmlType::F32 => {
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
        ),
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(block_bytes) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in bytes.chunks_exact(block_bytes) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| (i32::from(q & 0x0F) - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| (i32::from(q >> 4) - 8) as f32 * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in bytes.chunks_exact(block_bytes) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0F) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let has_min = ty == GgmlType::Q5_1;
            for b in bytes.chunks_exact(block_bytes) {
                let d = f16_at(b, 0);
                let (m, rest) = if has_min {
                    (f16_at(b, 2), &b[4..])
                } else {
                    (0.0, &b[2..])
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                // Q5_1 is q * d + min; Q5_0 is (q - 16) * d (no "+ 0.0", which would turn -0.0 into 0.0).
                let value = |q: u32| {
                    if has_min {
                        q as f32 * d + m
                    } else {
                        (q as i32 - 16) as f32 * d
                    }
                };
                out.extend((0..16).map(|j| value(u32::from(qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10))));
                out.extend((0..16).map(|j| value(u32::from(qs[j] >> 4) | ((qh >> (j + 12)) & 0x10))));
            }
        }
        GgmlType::Q6K => {
            for b in bytes.chunks_exact(block_bytes) {
                dequantize_q6k_block(b, &mut out);
            }
        }
        GgmlType::Q4K => {
            for b in bytes.chunks_exact(block_bytes) {
                dequantize_q4k_q5k_block(&b[..16], None, &b[16..144], &mut out);
            }
        }
        GgmlType::Q5K => {
            for b in bytes.chunks_exact(block_bytes) {
                dequantize_q4k_q5k_block(&b[..16], Some(&b[16..48]), &b[48..176], &mut out);
            }
        }
        other => {
            return Err(format!(
                "tensor type {other:?} cannot be loaded (supported: F32, F16, BF16, Q8_0, Q6_K, Q5_K, Q5_0, Q5_1, Q4_K, Q4_0, Q4_1)"
            ));
        }
    }
    Ok(out)
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block (`get_scale_min_k4` in ggml).
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K / Q5_K: 256 values in 8 sub-blocks of 32, each with a 6-bit scale and min under f16 super-scales
/// (`head` = d, dmin, 12 scale bytes); Q5_K adds a fifth bit per value from `qh`.
fn dequantize_q4k_q5k_block(head: &[u8], qh: Option<&[u8]>, qs: &[u8], out: &mut Vec<f32>) {
    let (d, dmin, scales) = (f16_at(head, 0), f16_at(head, 2), &head[4..16]);
    for (chunk, ql) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let high =
            |l: usize, bit: usize| qh.map_or(0.0, |qh| if qh[l] & (1 << bit) != 0 { 16.0 } else { 0.0 });
        out.extend((0..32).map(|l| d1 * (f32::from(ql[l] & 0x0F) + high(l, 2 * chunk)) - min1));
        out.extend((0..32).map(|l| d2 * (f32::from(ql[l] >> 4) + high(l, 2 * chunk + 1)) - min2));
    }
}

/// Q6_K: 256 values as ql[128] (low 4 bits), qh[64] (high 2 bits), 16 signed 8-bit scales and an f16 super-scale.
fn dequantize_q6k_block(b: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    let mut y = [0f32; 256];
    for half in 0..2 {
        let (ql, qh, sc, y) = (
            &ql[half * 64..],
            &qh[half * 32..],
            &scales[half * 8..],
            &mut y[half * 128..],
        );
        for l in 0..32 {
            let is = l / 16;
            let q1 = (i32::from(ql[l] & 0xF) | (i32::from(qh[l] & 3) << 4)) - 32;
            let q2 = (i32::from(ql[l + 32] & 0xF) | (i32::from((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = (i32::from(ql[l] >> 4) | (i32::from((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = (i32::from(ql[l + 32] >> 4) | (i32::from((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |k: usize| f32::from(sc[is + k] as i8) * d;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
    out.extend_from_slice(&y);
}

/// Quantizes f32 values to Q8_0 the way ggml's reference quantizer does; used to build test models and to
/// check the dequantizer against an independent encoding.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// Quantizes f32 values to Q4_0 (ggml's reference quantizer: the scale comes from the value of largest magnitude).
pub fn quantize_q4_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 18);
    for block in values.chunks(32) {
        let max = block
            .iter()
            .copied()
            .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
        out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
    }
    out
}

/// Quantizes f32 values to Q4_1 (min and scale per block).
pub fn quantize_q4_1(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 20);
    for block in values.chunks(32) {
        let min = block.iter().copied().fold(f32::INFINITY, f32::min);
        let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.37).sin() * 2.5).collect()
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn q8_0_round_trips_within_half_a_step() {
        let v = ramp(96);
        let back = dequantize(GgmlType::Q8_0, &quantize_q8_0(&v)).unwrap();
        assert_eq!(back.len(), 96);
        assert!(max_err(&v, &back) <= 2.5 / 127.0, "{}", max_err(&v, &back));
    }

    #[test]
    fn q4_0_and_q4_1_round_trip_within_one_step() {
        let v = ramp(64);
        let back = dequantize(GgmlType::Q4_0, &quantize_q4_0(&v)).unwrap();
        assert!(max_err(&v, &back) <= 2.5 / 8.0 + 1e-3);
        let back = dequantize(GgmlType::Q4_1, &quantize_q4_1(&v)).unwrap();
        assert!(max_err(&v, &back) <= 5.0 / 15.0 + 1e-3);
    }

    #[test]
    fn q4_0_block_layout_low_nibbles_first() {
        // d = 1.0; byte j holds element j (low nibble) and element j + 16 (high nibble), both offset by 8.
        let mut block = f16::from_f32(1.0).to_le_bytes().to_vec();
        block.extend((0..16u8).map(|j| (j % 16) | ((15 - j) << 4)));
        let v = dequantize(GgmlType::Q4_0, &block).unwrap();
        assert_eq!(v[0], -8.0);
        assert_eq!(v[15], 7.0);
        assert_eq!(v[16], 7.0);
        assert_eq!(v[31], -8.0);
    }

    #[test]
    fn q5_0_uses_the_high_bits() {
        // d = 1, all low nibbles 0, qh all ones: every value is 16 - 16 = 0; with qh = 0 every value is -16.
        let mut block = f16::from_f32(1.0).to_le_bytes().to_vec();
        block.extend_from_slice(&u32::MAX.to_le_bytes());
        block.extend_from_slice(&[0u8; 16]);
        assert!(
            dequantize(GgmlType::Q5_0, &block)
                .unwrap()
                .iter()
                .all(|&v| v == 0.0)
        );
        block[2..6].copy_from_slice(&0u32.to_le_bytes());
        assert!(
            dequantize(GgmlType::Q5_0, &block)
                .unwrap()
                .iter()
                .all(|&v| v == -16.0)
        );
    }

    #[test]
    fn half_precision_types_decode_exactly() {
        let vals = [1.5f32, -2.25, 0.0, 65504.0];
        let f16_bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::F16, &f16_bytes).unwrap(), vals);
        let bf16_bytes: Vec<u8> = vals[..3]
            .iter()
            .flat_map(|&v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::BF16, &bf16_bytes).unwrap(), vals[..3]);
    }

    #[test]
    fn unsupported_types_and_ragged_data_are_errors() {
        assert!(dequantize(GgmlType::Q2K, &[0u8; 84]).unwrap_err().contains("Q2K"));
        assert!(
            dequantize(GgmlType::Q3K, &[0u8; 110])
                .unwrap_err()
                .contains("supported")
        );
        assert!(
            dequantize(GgmlType::Q8_0, &[0u8; 35])
                .unwrap_err()
                .contains("whole number")
        );
    }
}
