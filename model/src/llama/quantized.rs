//! Quantized matrices: laid out for the decode kernels at load, and read back on the paths without a quantized
//! kernel, libtorch's (GPU-less fallbacks, whole-sequence scoring) and the embedding lookup, which dequantize
//! what they read.

use tch::Tensor;

use crate::cpu_gemv::qdot;
use crate::error::{ModelError, Result};
use crate::interleave;
use crate::quant::{GgmlType, Layout, QuantFormat};
use crate::storage;

/// A quantized `[rows, row bytes]` matrix of `ty` blocks laid out as this CPU's kernels stream it best:
/// interleaved where it has the tiles for that ([`crate::interleave`]), else as the file stores it.
pub(super) fn for_kernels(w: Tensor, ty: GgmlType) -> Result<(Tensor, QuantFormat)> {
    let rows = w.size().first().copied().unwrap_or(0) as usize;
    let grouped = match storage::u8s(&w) {
        Some(bytes) if qdot::prefers_interleaved(ty) => interleave::interleave(ty, bytes, rows),
        _ => None,
    };
    match grouped {
        Some(bytes) => Ok((
            Tensor::f_from_slice(&bytes)?.f_view([rows as i64, -1])?,
            QuantFormat {
                ty,
                layout: Layout::Interleaved,
            },
        )),
        None => Ok((w, QuantFormat::rows(ty))),
    }
}

/// The blocks of a quantized `[rows, row bytes]` matrix, and its rows.
fn blocks(w: &Tensor) -> Result<(&[u8], usize)> {
    let bytes = storage::u8s(w).ok_or_else(|| {
        ModelError::Unsupported("a quantized matrix that is not contiguous CPU bytes".into())
    })?;
    Ok((bytes, w.size()[0] as usize))
}

/// Row `r` of a quantized matrix dequantized to f32: an embedding lookup.
pub(super) fn row_values(w: &Tensor, format: QuantFormat, r: usize) -> Result<Vec<f32>> {
    let (bytes, rows) = blocks(w)?;
    let outside = || ModelError::InvalidRequest(format!("row {r} is outside the matrix"));
    let row_bytes = bytes.len() / rows.max(1);
    let gathered;
    let row = match format.layout {
        Layout::Rows => bytes
            .get(r * row_bytes..(r + 1) * row_bytes)
            .ok_or_else(outside)?,
        Layout::Interleaved => {
            gathered = interleave::row(format.ty, bytes, rows, r).ok_or_else(outside)?;
            &gathered[..]
        }
    };
    crate::quant::dequantize(format.ty, row).map_err(ModelError::Unsupported)
}

/// Rows `rows` of a quantized matrix dequantized to f32 `[rows, cols]`.
pub(super) fn dequantized_rows(w: &Tensor, format: QuantFormat, rows: &[usize]) -> Result<Tensor> {
    let mut values = Vec::new();
    for &r in rows {
        values.extend(row_values(w, format, r)?);
    }
    Ok(Tensor::f_from_slice(&values)?.f_view([rows.len() as i64, -1])?)
}

/// A whole quantized matrix dequantized to f32 `[rows, cols]`: what libtorch's paths (no quantized kernel)
/// compute on.
pub(super) fn dequantized(w: &Tensor, format: QuantFormat) -> Result<Tensor> {
    let (bytes, rows) = blocks(w)?;
    let gathered;
    let bytes = match format.layout {
        Layout::Rows => bytes,
        Layout::Interleaved => {
            gathered = interleave::deinterleave(format.ty, bytes, rows).ok_or_else(|| {
                ModelError::Unsupported(format!(
                    "a {:?} matrix that is not whole groups of rows",
                    format.ty
                ))
            })?;
            &gathered[..]
        }
    };
    let values = crate::quant::dequantize(format.ty, bytes).map_err(ModelError::Unsupported)?;
    Ok(Tensor::f_from_slice(&values)?.f_view([rows as i64, -1])?)
}
