//! Attention of one decoded position over its sequence's KV cache, on the CPU in f32: decoding calls it once per
//! sequence and layer, where a handful of libtorch ops would cost more in dispatch than in arithmetic.

use crate::cpu_gemv::dot;

/// A cache layer's keys and values as f32 rows of `head_dim`, wherever they lie.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub head_dim: usize,
    pub kv_heads: usize,
}

/// Attention of `q` over positions `0..len`, the row of key/value head `h` at position `p` starting at element
/// `at(h, p)` of `rows.keys` and `rows.values` (so contiguous and paged caches share this loop). False, appending
/// nothing, when the shapes do not agree or a row lies outside the buffers.
pub(crate) fn attend(
    q: &[f32],
    rows: &Rows<'_>,
    len: usize,
    at: impl Fn(usize, usize) -> usize,
    out: &mut Vec<f32>,
) -> bool {
    let Rows {
        keys: k,
        values: v,
        head_dim,
        kv_heads,
    } = *rows;
    let heads = q.len() / head_dim.max(1);
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || len == 0 {
        return false;
    }
    let in_bounds = |h: usize| (0..len).all(|p| at(h, p) + head_dim <= k.len().min(v.len()));
    if !(0..kv_heads).all(in_bounds) {
        return false;
    }
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut weights = vec![0f32; len];
    let mut acc = vec![0f32; head_dim];
    for h in 0..heads {
        let kv = h / group;
        let query = &q[h * head_dim..(h + 1) * head_dim];
        let mut max = f32::NEG_INFINITY;
        for (p, w) in weights.iter_mut().enumerate() {
            let start = at(kv, p);
            *w = dot(query, &k[start..start + head_dim], |x| x) * scale;
            max = max.max(*w);
        }
        let mut sum = 0f32;
        for w in &mut weights {
            *w = (*w - max).exp();
            sum += *w;
        }
        acc.fill(0.0);
        for (p, w) in weights.iter().enumerate() {
            let start = at(kv, p);
            for (a, x) in acc.iter_mut().zip(&v[start..start + head_dim]) {
                *a += w * x;
            }
        }
        out.extend(acc.iter().map(|a| a / sum));
    }
    true
}
