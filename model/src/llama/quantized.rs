//! Quantized matrices on the paths without a quantized kernel: libtorch's (GPU-less fallbacks, whole-sequence
//! scoring) and the embedding lookup dequantize what they read.

use tch::Tensor;

use crate::error::{ModelError, Result};
use crate::quant::GgmlType;
use crate::storage;

/// The blocks of a quantized `[rows, row bytes]` matrix, and its row bytes.
fn blocks(w: &Tensor) -> Result<(&[u8], usize)> {
    let bytes = storage::u8s(w).ok_or_else(|| {
        ModelError::Unsupported("a quantized matrix that is not contiguous CPU bytes".into())
    })?;
    Ok((bytes, w.size()[1] as usize))
}

/// Row `r` of a quantized matrix dequantized to f32: an embedding lookup.
pub(super) fn row_values(w: &Tensor, ty: GgmlType, r: usize) -> Result<Vec<f32>> {
    let (bytes, row_bytes) = blocks(w)?;
    let row = bytes
        .get(r * row_bytes..(r + 1) * row_bytes)
        .ok_or_else(|| ModelError::InvalidRequest(format!("row {r} is outside the matrix")))?;
    crate::quant::dequantize(ty, row).map_err(ModelError::Unsupported)
}

/// Rows `rows` of a quantized matrix dequantized to f32 `[rows, cols]`.
pub(super) fn dequantized_rows(w: &Tensor, ty: GgmlType, rows: &[usize]) -> Result<Tensor> {
    let mut values = Vec::new();
    for &r in rows {
        values.extend(row_values(w, ty, r)?);
    }
    Ok(Tensor::f_from_slice(&values)?.f_view([rows.len() as i64, -1])?)
}

/// A whole quantized matrix dequantized to f32 `[rows, cols]`: what libtorch's paths (no quantized kernel)
/// compute on.
pub(super) fn dequantized(w: &Tensor, ty: GgmlType) -> Result<Tensor> {
    let (bytes, _) = blocks(w)?;
    let values = crate::quant::dequantize(ty, bytes).map_err(ModelError::Unsupported)?;
    Ok(Tensor::f_from_slice(&values)?.f_view([w.size()[0], -1])?)
}
