//! Attention of one decoded position over its sequence's KV cache, on the CPU in f32: decoding calls it once per
//! sequence and layer, where a handful of libtorch ops would cost more in dispatch than in arithmetic.

use tch::Tensor;

use crate::cpu_gemv::dot;
use crate::storage;

/// Attention of one query position over the first `len` positions of a cache layer, on the CPU in f32. `q` holds
/// `heads` rows of `head_dim`; `keys` and `values` are the layer's whole buffers, `[1, kv_heads, capacity,
/// head_dim]`, query head `h` attending with key/value head `h / (heads / kv_heads)` (grouped-query attention).
/// Appends `heads * head_dim` values to `out`, or returns false (appending nothing) when the buffers are not
/// contiguous CPU f32. Decoding calls this once per sequence and layer: as a handful of libtorch ops it would cost
/// more in dispatch than in arithmetic.
pub fn attend_cached(q: &[f32], keys: &Tensor, values: &Tensor, len: usize, out: &mut Vec<f32>) -> bool {
    let size = keys.size();
    let (Some(k), Some(v), [_, kv_heads, capacity, head_dim]) =
        (storage::f32s(keys), storage::f32s(values), size.as_slice())
    else {
        return false;
    };
    let (kv_heads, capacity, head_dim) = (*kv_heads as usize, *capacity as usize, *head_dim as usize);
    let heads = q.len() / head_dim.max(1);
    if values.size() != size
        || len > capacity
        || heads == 0
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
    {
        return false;
    }
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut weights = vec![0f32; len];
    let mut acc = vec![0f32; head_dim];
    for h in 0..heads {
        let base = (h / group) * capacity * head_dim;
        let query = &q[h * head_dim..(h + 1) * head_dim];
        let mut max = f32::NEG_INFINITY;
        for (p, w) in weights.iter_mut().enumerate() {
            let at = base + p * head_dim;
            *w = dot(query, &k[at..at + head_dim], |x| x) * scale;
            max = max.max(*w);
        }
        let mut sum = 0f32;
        for w in &mut weights {
            *w = (*w - max).exp();
            sum += *w;
        }
        acc.fill(0.0);
        for (p, w) in weights.iter().enumerate() {
            let at = base + p * head_dim;
            for (a, x) in acc.iter_mut().zip(&v[at..at + head_dim]) {
                *a += w * x;
            }
        }
        out.extend(acc.iter().map(|a| a / sum));
    }
    true
}
