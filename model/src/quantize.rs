//! Quantizing f32 rows to GGML block types, for `camelid quantize` and the kernels' tests: Q8_0, Q4_0 and Q4_1
//! as ggml's reference quantizers, and Q4_K and Q6_K with per-group scales from each group's own range (ggml
//! searches for slightly better scales; ours round-trip within one step of each group, and the files load in
//! llama.cpp because the layout is the same).

use half::f16;

use crate::quant::{GgmlType, quantize_q4_0, quantize_q4_1, quantize_q8_0};

/// `values` (a whole number of `ty` blocks) as `ty` blocks.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, String> {
    let per_block = ty.block().0 as usize;
    if !values.len().is_multiple_of(per_block) {
        return Err(format!(
            "{} values are not a whole number of {ty:?} blocks of {per_block}",
            values.len()
        ));
    }
    Ok(match ty {
        GgmlType::Q8_0 => quantize_q8_0(values),
        GgmlType::Q4_0 => quantize_q4_0(values),
        GgmlType::Q4_1 => quantize_q4_1(values),
        GgmlType::Q4K => values.chunks_exact(256).flat_map(q4k_block).collect(),
        GgmlType::Q6K => values.chunks_exact(256).flat_map(q6k_block).collect(),
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => return Err(format!("camelid does not quantize to {other:?}")),
    })
}

fn nearest(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// One Q4_K block: 8 groups of 32 as `d * sc * q - dmin * m` with 6-bit `sc` and `m` under f16 `d`, `dmin`.
fn q4k_block(x: &[f32]) -> Vec<u8> {
    // Each group's range, the minimum clamped to at most 0 (the format subtracts a non-negative `dmin * m`).
    let groups: Vec<(f32, f32)> = x
        .chunks_exact(32)
        .map(|g| {
            let min = g.iter().copied().fold(0f32, f32::min);
            let max = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            ((max - min) / 15.0, -min)
        })
        .collect();
    let max_scale = groups.iter().fold(0f32, |m, g| m.max(g.0));
    let max_min = groups.iter().fold(0f32, |m, g| m.max(g.1));
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    let (df, dminf) = (d.to_f32(), dmin.to_f32());
    let six = |v: f32, unit: f32| {
        if unit > 0.0 {
            nearest(v / unit).clamp(0, 63) as u8
        } else {
            0
        }
    };
    let sc: Vec<u8> = groups.iter().map(|g| six(g.0, df)).collect();
    let m: Vec<u8> = groups.iter().map(|g| six(g.1, dminf)).collect();
    let mut out = Vec::with_capacity(144);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    let mut scales = [0u8; 12];
    for j in 0..4 {
        scales[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        scales[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        scales[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
    out.extend_from_slice(&scales);
    let q: Vec<u8> = x
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (unit, offset) = (df * f32::from(sc[i / 32]), dminf * f32::from(m[i / 32]));
            if unit > 0.0 {
                nearest((v + offset) / unit).clamp(0, 15) as u8
            } else {
                0
            }
        })
        .collect();
    for chunk in q.chunks_exact(64) {
        out.extend((0..32).map(|l| chunk[l] | (chunk[l + 32] << 4)));
    }
    out
}

/// One Q6_K block: 16 groups of 16 as `d * sc * (q - 32)` with signed 8-bit `sc` under an f16 `d`.
fn q6k_block(x: &[f32]) -> Vec<u8> {
    // Each group's scale maps its value of largest magnitude to -32 (the wider side of the 6-bit range).
    let scales: Vec<f32> = x
        .chunks_exact(16)
        .map(|g| {
            g.iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m })
                / -32.0
        })
        .collect();
    let max_scale = scales
        .iter()
        .copied()
        .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let d = f16::from_f32(if max_scale != 0.0 { max_scale / -128.0 } else { 0.0 });
    let df = d.to_f32();
    let sc: Vec<i8> = scales
        .iter()
        .map(|s| {
            if df != 0.0 {
                nearest(s / df).clamp(-128, 127) as i8
            } else {
                0
            }
        })
        .collect();
    let q: Vec<u8> = x
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let unit = df * f32::from(sc[i / 16]);
            let q = if unit != 0.0 {
                nearest(v / unit).clamp(-32, 31)
            } else {
                0
            };
            (q + 32) as u8
        })
        .collect();
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for half in 0..2 {
        let q = &q[half * 128..];
        for l in 0..32 {
            ql[half * 64 + l] = (q[l] & 0xF) | ((q[l + 64] & 0xF) << 4);
            ql[half * 64 + l + 32] = (q[l + 32] & 0xF) | ((q[l + 96] & 0xF) << 4);
            qh[half * 32 + l] =
                (q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) | ((q[l + 96] >> 4) << 6);
        }
    }
    let mut out = Vec::with_capacity(210);
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32) * 0.61).sin() * (1.0 + (i % 7) as f32 * 0.3))
            .collect()
    }

    /// Each group comes back within one quantization step of its own range (plus the rounding of its scales).
    #[test]
    fn k_quants_round_trip_within_a_step_of_each_group() {
        let x = values(512);
        for (ty, group, levels) in [(GgmlType::Q4K, 32, 15.0), (GgmlType::Q6K, 16, 31.0)] {
            let bytes = quantize(ty, &x).unwrap();
            assert_eq!(bytes.len() as u64, ty.byte_size(512).unwrap());
            let back = dequantize(ty, &bytes).unwrap();
            for (g, (a, b)) in x.chunks(group).zip(back.chunks(group)).enumerate() {
                let range = a.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                let err = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(
                    err <= range / levels * 1.2 + 1e-3,
                    "{ty:?} group {g}: error {err}, range {range}"
                );
            }
        }
    }

    #[test]
    fn ragged_input_and_unknown_types_are_refused() {
        assert!(
            quantize(GgmlType::Q4K, &[0.0; 300])
                .unwrap_err()
                .contains("whole number")
        );
        assert!(quantize(GgmlType::Q2K, &[0.0; 256]).unwrap_err().contains("Q2K"));
        assert!(
            quantize(GgmlType::Q6K, &[0.0; 256]).is_ok(),
            "an all-zero block is valid"
        );
    }
}
