//! Attention of one decoded position over its sequence's KV cache, on the CPU in f32: decoding calls it per row,
//! layer and key/value head (so one row's heads can run on several cores), where a handful of libtorch ops would
//! cost more in dispatch than in arithmetic.

use std::ops::Range;

use crate::cpu_gemv::{dots3x4, weighted_rows3};

/// A cache layer's keys and values as f32 rows of `head_dim`, wherever they lie.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub head_dim: usize,
    pub kv_heads: usize,
}

/// Attention of `q`'s heads that share the key/value heads `kv` over positions `0..len`, the row of key/value
/// head `h` at position `p` starting at element `at(h, p)` of `rows.keys` and `rows.values` (so contiguous and
/// paged caches share this loop). Heads are independent, so a decoded row's heads can be spread over threads.
/// False, appending nothing, when the shapes do not agree or a row lies outside the buffers.
pub(crate) fn attend<'a>(
    q: &[f32],
    rows: &Rows<'a>,
    len: usize,
    kv: Range<usize>,
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
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || len == 0 || kv.end > kv_heads {
        return false;
    }
    let in_bounds = |h: usize| (0..len).all(|p| at(h, p) + head_dim <= k.len().min(v.len()));
    if !kv.clone().all(in_bounds) {
        return false;
    }
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    // The query heads that share a key/value head go three at a time, so each key and value row is read once for
    // three heads; a group of another size is padded with heads whose weights stay zero.
    let padded = group.div_ceil(3) * 3;
    let mut weights = vec![0f32; padded * len];
    let mut acc = vec![0f32; padded * head_dim];
    let mut sums = vec![0f32; group];
    for kv in kv {
        let query = |g: usize| {
            let h = kv * group + g.min(group - 1);
            &q[h * head_dim..(h + 1) * head_dim]
        };
        let row = |buffer: &'a [f32], p: usize| &buffer[at(kv, p)..at(kv, p) + head_dim];
        for first in (0..group).step_by(3) {
            let queries = std::array::from_fn(|j| query(first + j));
            // Four positions at a time; a last partial group repeats its final key and keeps what it needs.
            for p in (0..len).step_by(4) {
                let keys = std::array::from_fn(|i| row(k, (p + i).min(len - 1)));
                for (i, dots) in dots3x4(queries, keys).iter().enumerate().take(len - p) {
                    for (j, d) in dots.iter().enumerate().take(group - first) {
                        weights[(first + j) * len + p + i] = d * scale;
                    }
                }
            }
        }
        for (scores, sum) in weights.chunks_exact_mut(len).zip(&mut sums) {
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            *sum = 0.0;
            for w in scores.iter_mut() {
                *w = (*w - max).exp();
                *sum += *w;
            }
        }
        acc.fill(0.0);
        for (heads, scores) in acc
            .chunks_exact_mut(3 * head_dim)
            .zip(weights.chunks_exact(3 * len))
        {
            let (a, rest) = heads.split_at_mut(head_dim);
            let (b, c) = rest.split_at_mut(head_dim);
            let scores = std::array::from_fn(|j| &scores[j * len..(j + 1) * len]);
            weighted_rows3(scores, |p| row(v, p), [a, b, c]);
        }
        for (head, sum) in acc.chunks_exact(head_dim).zip(&sums) {
            out.extend(head.iter().map(|a| a / sum));
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_attended_apart_give_the_same_bits_as_all_at_once() {
        // 10 query heads on 2 key/value heads: groups of 5, so the padded three-head path runs too.
        let (heads, kv_heads, head_dim, len) = (10, 2, 8, 13);
        let value = |i: usize, seed: usize| ((i * seed % 97) as f32 / 48.5 - 1.0) * 0.7;
        let q: Vec<f32> = (0..heads * head_dim).map(|i| value(i, 31)).collect();
        let keys: Vec<f32> = (0..kv_heads * len * head_dim).map(|i| value(i, 17)).collect();
        let values: Vec<f32> = (0..kv_heads * len * head_dim).map(|i| value(i, 23)).collect();
        let rows = Rows {
            keys: &keys,
            values: &values,
            head_dim,
            kv_heads,
        };
        let at = |h: usize, p: usize| (h * len + p) * head_dim;
        let mut whole = Vec::new();
        assert!(attend(&q, &rows, len, 0..kv_heads, at, &mut whole));
        let mut apart = Vec::new();
        for kv in 0..kv_heads {
            assert!(attend(&q, &rows, len, kv..kv + 1, at, &mut apart));
        }
        assert_eq!(whole.len(), heads * head_dim);
        assert_eq!(apart, whole);
        // A head range past the cache's heads is refused, not read out of bounds.
        assert!(!attend(&q, &rows, len, 1..3, at, &mut Vec::new()));
    }
}
