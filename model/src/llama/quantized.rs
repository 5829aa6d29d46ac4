//! Quantized matrices on the paths without a quantized kernel: libtorch's (GPU-less fallbacks, whole-sequence
//! scoring) and the embedding lookup dequantize what they read.

use tch::Tensor;

use crate::error::{ModelError, Result};
use crate::quant::GgmlType;
use crate::storage;

/// Rows of a quantized `[rows, row bytes]` matrix (all of them for `None`) dequantized to f32 `[rows, cols]`:
/// what the paths without a quantized kernel (libtorch's, and an embedding lookup) compute on.
pub(super) fn dequantized_rows(w: &Tensor, ty: GgmlType, rows: Option<&[usize]>) -> Result<Tensor> {
    let bytes = storage::u8s(w).ok_or_else(|| {
        ModelError::Unsupported("a quantized matrix that is not contiguous CPU bytes".into())
    })?;
    let row_bytes = w.size()[1] as usize;
    let all: Vec<usize>;
    let rows = match rows {
        Some(rows) => rows,
        None => {
            all = (0..w.size()[0] as usize).collect();
            &all
        }
    };
    let mut values = Vec::new();
    for &r in rows {
        let row = bytes
            .get(r * row_bytes..(r + 1) * row_bytes)
            .ok_or_else(|| ModelError::InvalidRequest(format!("row {r} is outside the matrix")))?;
        values.extend(crate::quant::dequantize(ty, row).map_err(ModelError::Unsupported)?);
    }
    Ok(Tensor::f_from_slice(&values)?.f_view([rows.len() as i64, -1])?)
}

pub(super) fn dequantized(w: &Tensor, ty: GgmlType) -> Result<Tensor> {
    dequantized_rows(w, ty, None)
}
