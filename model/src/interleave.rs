//! Quantized matrices repacked at load into groups of [`GROUP`] rows interleaved block by block: the layout the
//! decode kernels stream (`cpu_gemv/qdot_x8.rs`).
//!
//! In GGUF a row's blocks follow each other, so a kernel computing eight rows at once follows eight streams and
//! converts eight scales one at a time. Interleaved, a group first holds its values block by block, in 32-byte
//! registers: register `k` of a block holds bytes `4k..4k + 4` of each row's values, row `r` in 32-bit lane `r`.
//! One broadcast of the four activation bytes those values meet then serves all eight rows, and a group's sums
//! land one row per lane, with no horizontal additions. The f16 fields follow, block by block: the eight rows'
//! scales side by side (one load and one conversion for all eight), then for Q4_1 their minimums likewise. Kept
//! apart from the fields, every value register starts on a 32-byte boundary (block fields in between put half of
//! a Q4_0 group's loads across cache lines, which cost a quarter of its speed). A group takes exactly the bytes
//! its rows took, so the matrix keeps its `[rows, row bytes]` shape; only the order of the bytes changes.
//! (llama.cpp repacks Q4_0 at load for the same reasons.)

use crate::quant::GgmlType;

/// Rows per interleaved group.
pub const GROUP: usize = 8;

/// A block's leading bytes of f16 fields (scale, and minimum for Q4_1) and its bytes of packed values, for the
/// types that interleave.
pub(crate) fn parts(ty: GgmlType) -> Option<(usize, usize)> {
    match ty {
        GgmlType::Q4_0 => Some((2, 16)),
        GgmlType::Q4_1 => Some((4, 16)),
        GgmlType::Q8_0 => Some((2, 32)),
        _ => None,
    }
}

/// Whether a `[rows, row bytes]` matrix of `ty` blocks can be interleaved: a type the kernels take so, whole
/// groups of rows, and whole blocks.
pub fn applies(ty: GgmlType, bytes: usize, rows: usize) -> bool {
    let block = ty.block().1 as usize;
    parts(ty).is_some()
        && rows > 0
        && rows.is_multiple_of(GROUP)
        && bytes.is_multiple_of(rows)
        && (bytes / rows).is_multiple_of(block)
}

/// Where byte `i` of block `b` of row `r` (of a group of `blocks` blocks a row) goes within its group: values
/// four bytes at a time, register by register, block after block; then the f16 fields two bytes at a time,
/// field by field, block after block.
fn position(header: usize, values: usize, blocks: usize, b: usize, r: usize, i: usize) -> usize {
    if i < header {
        blocks * values * GROUP + b * header * GROUP + (i / 2) * 2 * GROUP + 2 * r + i % 2
    } else {
        let v = i - header;
        b * values * GROUP + (v / 4) * 4 * GROUP + 4 * r + v % 4
    }
}

/// Calls `each(byte offset in row order, byte offset interleaved, length)` for every piece of `bytes` (a
/// `[rows, _]` matrix of `ty` blocks that [`applies`]), pieces being the 2-byte fields and 4-byte value runs.
fn for_each_piece(ty: GgmlType, len: usize, rows: usize, mut each: impl FnMut(usize, usize, usize)) {
    let Some((header, values)) = parts(ty) else {
        return;
    };
    let block = header + values;
    let row_bytes = len / rows;
    let blocks = row_bytes / block;
    let pieces = pieces(header, block);
    for g in 0..rows / GROUP {
        let group = g * GROUP * row_bytes;
        for b in 0..blocks {
            for r in 0..GROUP {
                let plain_block = group + r * row_bytes + b * block;
                for &(i, n) in &pieces {
                    each(
                        plain_block + i,
                        group + position(header, values, blocks, b, r, i),
                        n,
                    );
                }
            }
        }
    }
}

/// A block's pieces, `(first byte, length)`: its 2-byte fields, then its values four bytes at a time.
fn pieces(header: usize, block: usize) -> Vec<(usize, usize)> {
    (0..header)
        .step_by(2)
        .map(|i| (i, 2))
        .chain((header..block).step_by(4).map(|i| (i, 4)))
        .collect()
}

/// `bytes` (a `[rows, _]` matrix of `ty` blocks in GGUF's order) interleaved; None unless it [`applies`].
pub fn interleave(ty: GgmlType, bytes: &[u8], rows: usize) -> Option<Vec<u8>> {
    regroup(ty, bytes, rows, true)
}

/// An interleaved matrix back in GGUF's row order (for the paths that dequantize whole matrices).
pub fn deinterleave(ty: GgmlType, bytes: &[u8], rows: usize) -> Option<Vec<u8>> {
    regroup(ty, bytes, rows, false)
}

/// `bytes` moved piece by piece into groups (`into_groups`) or back into rows.
fn regroup(ty: GgmlType, bytes: &[u8], rows: usize, into_groups: bool) -> Option<Vec<u8>> {
    if !applies(ty, bytes.len(), rows) {
        return None;
    }
    let mut out = vec![0u8; bytes.len()];
    for_each_piece(ty, bytes.len(), rows, |plain, grouped, n| {
        let (to, from) = if into_groups {
            (grouped, plain)
        } else {
            (plain, grouped)
        };
        out[to..to + n].copy_from_slice(&bytes[from..from + n]);
    });
    Some(out)
}

/// Row `r` of an interleaved `[rows, _]` matrix in GGUF's order (an embedding lookup); None when `r` is not a
/// row or the matrix is not one that [`applies`].
pub fn row(ty: GgmlType, bytes: &[u8], rows: usize, r: usize) -> Option<Vec<u8>> {
    if !applies(ty, bytes.len(), rows) || r >= rows {
        return None;
    }
    let (header, values) = parts(ty)?;
    let block = header + values;
    let row_bytes = bytes.len() / rows;
    let blocks = row_bytes / block;
    let group = &bytes[(r / GROUP) * GROUP * row_bytes..][..GROUP * row_bytes];
    let mut out = vec![0u8; row_bytes];
    let pieces = pieces(header, block);
    for b in 0..blocks {
        for &(i, n) in &pieces {
            let at = position(header, values, blocks, b, r % GROUP, i);
            out[b * block + i..b * block + i + n].copy_from_slice(&group[at..at + n]);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct bytes, so any misplaced one shows.
    fn matrix(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn interleaving_round_trips_and_rows_read_back_in_gguf_order() {
        for (ty, blocks) in [(GgmlType::Q4_0, 3), (GgmlType::Q4_1, 2), (GgmlType::Q8_0, 5)] {
            let rows = 16;
            let row_bytes = blocks * ty.block().1 as usize;
            let plain = matrix(rows * row_bytes);
            let grouped = interleave(ty, &plain, rows).expect("applies");
            assert_ne!(grouped, plain, "{ty:?}");
            assert_eq!(deinterleave(ty, &grouped, rows).as_ref(), Some(&plain), "{ty:?}");
            for r in 0..rows {
                assert_eq!(
                    row(ty, &grouped, rows, r).as_deref(),
                    Some(&plain[r * row_bytes..(r + 1) * row_bytes]),
                    "{ty:?} row {r}"
                );
            }
            assert_eq!(row(ty, &grouped, rows, rows), None, "a row past the end");
        }
    }

    #[test]
    fn a_group_holds_its_value_registers_then_its_scales_and_minimums() {
        let ty = GgmlType::Q4_1;
        let (rows, blocks) = (8, 2);
        let plain = matrix(rows * 20 * blocks);
        let grouped = interleave(ty, &plain, rows).unwrap();
        for r in 0..8 {
            for b in 0..blocks {
                let src = &plain[r * 20 * blocks + 20 * b..][..20];
                for k in 0..4 {
                    let at = 128 * b + 32 * k + 4 * r;
                    assert_eq!(
                        &grouped[at..at + 4],
                        &src[4 + 4 * k..8 + 4 * k],
                        "row {r} block {b} register {k}"
                    );
                }
                let fields = 128 * blocks + 32 * b;
                assert_eq!(
                    &grouped[fields + 2 * r..][..2],
                    &src[0..2],
                    "scale of row {r} block {b}"
                );
                assert_eq!(
                    &grouped[fields + 16 + 2 * r..][..2],
                    &src[2..4],
                    "minimum of row {r} block {b}"
                );
            }
        }
    }

    #[test]
    fn matrices_that_do_not_fit_whole_groups_or_blocks_stay_as_they_are() {
        assert!(!applies(GgmlType::Q4_0, 12 * 18, 12), "rows not a multiple of 8");
        assert!(!applies(GgmlType::Q4_0, 8 * 19, 8), "rows not whole blocks");
        assert!(
            !applies(GgmlType::Q4K, 8 * 144, 8),
            "a type without an interleaved kernel"
        );
        assert!(!applies(GgmlType::Q8_0, 0, 0));
        assert_eq!(interleave(GgmlType::Q4_0, &matrix(12 * 18), 12), None);
        assert!(applies(GgmlType::Q8_0, 16 * 34 * 2, 16));
    }
}
