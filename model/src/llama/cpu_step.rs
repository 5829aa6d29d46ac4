//! One decode step on the CPU without libtorch: the projections on the [`DecodePool`] kernel and everything
//! between them (embedding, RMSNorm, RoPE, the residual stream, SwiGLU, attention over the KV cache) as plain
//! loops over f32 rows.
//!
//! Why: a decode step of a small model is some 60 tiny tensor ops a layer, and libtorch spends microseconds
//! dispatching each one, so on SmolLM2 the ops between the products cost as much as reading the weights (about
//! 18 ms a token on a 2-core machine, measured with `perf`), and the pool's helper threads sat idle meanwhile.
//! Here the same arithmetic costs a few microseconds a layer.
//!
//! The step rounds to the model's dtype wherever the libtorch path stores an intermediate in it ([`Precision`]),
//! so a bf16 model decodes as it does through libtorch (and as transformers does), not in a higher precision that
//! would change its greedy answers. Every row is computed alone, so a sequence gets the same bits in any batch.

use tch::{Device, Kind, Tensor};

use super::lora::RowAdapters;
use super::{Linear, Llama, compute_rope};
use crate::cpu_gemv::{DecodePool, MAX_ROWS, WeightRef, qdot};
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, with_views};
use crate::lora::LoraAdapter;
use crate::quant::QuantFormat;
use crate::storage;

/// The dtype intermediates are stored in: f32 keeps them, bf16 rounds them (to nearest, ties to even, as
/// libtorch converts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precision {
    F32,
    Bf16,
}

impl Precision {
    fn round(self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::Bf16 => bf16_round(x),
        }
    }

    fn round_all(self, xs: &mut [f32]) {
        if self == Precision::Bf16 {
            xs.iter_mut().for_each(|x| *x = bf16_round(*x));
        }
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as an f32.
fn bf16_round(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// `len` values of a contiguous CPU f32 or bf16 tensor from element `offset`, as f32.
fn values_at(t: &Tensor, offset: usize, len: usize) -> Option<Vec<f32>> {
    if let Some(v) = storage::f32s(t) {
        return v.get(offset..offset + len).map(<[f32]>::to_vec);
    }
    let bits = storage::bf16s(t)?.get(offset..offset + len)?;
    Some(bits.iter().map(|&b| f32::from_bits(u32::from(b) << 16)).collect())
}

/// All values of a contiguous CPU f32 or bf16 tensor, as f32.
fn values(t: &Tensor) -> Option<Vec<f32>> {
    values_at(t, 0, t.numel())
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Llama {
    /// Whether [`Llama::cpu_step`] can run this model: on the CPU, in f32 or bf16, every weight a contiguous
    /// matrix the kernel reads.
    fn cpu_step_applies(&self) -> bool {
        let kernel_weight = |t: &Tensor| storage::f32s(t).is_some() || storage::bf16s(t).is_some();
        let matrix = |t: &Tensor, quant: Option<QuantFormat>| match quant {
            Some(format) => qdot::has_kernel(format.ty) && storage::u8s(t).is_some(),
            None => kernel_weight(t),
        };
        let linear = |l: &Linear| {
            matrix(&l.weight, l.quant) && l.bias.as_ref().is_none_or(kernel_weight) && l.lora.is_none()
        };
        self.device() == Device::Cpu
            && matches!(self.kind(), Kind::Float | Kind::BFloat16)
            && matrix(&self.embed_tokens, self.embed_quant)
            && kernel_weight(&self.norm)
            && linear(&self.lm_head)
            && self.layers.iter().all(|l| {
                l.linears().into_iter().all(linear)
                    && kernel_weight(&l.input_layernorm)
                    && kernel_weight(&l.post_attention_layernorm)
            })
    }

    /// Continues each sequence by its tokens (`tokens[j]` appended to `caches[j]`: one decoded token, or a chunk
    /// of a prompt) in one pass over the weights, and returns the next-token logits after each sequence's last
    /// token, `vocab` values per sequence in order; None when the model or a cache does not suit the CPU step
    /// (nothing is changed then, and the caller runs the libtorch path).
    ///
    /// Every row is computed alone (its projections, then attention over its own sequence up to its position),
    /// so a token gets the same bits whether it is decoded, prefilled whole or in chunks, alone or in any batch.
    /// `adapters[j]` is sequence `j`'s LoRA adapter (an empty slice: none for any).
    pub(super) fn cpu_step<'a>(
        &'a self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        pool: &DecodePool<'a>,
        adapters: &[Option<&LoraAdapter>],
    ) -> Result<Option<Vec<f32>>> {
        let precision = match self.kind() {
            Kind::Float => Precision::F32,
            _ => Precision::Bf16,
        };
        let cache_kinds_fit = caches.iter().all(|c| c.is_cpu_f32());
        let shaped =
            !tokens.is_empty() && tokens.len() == caches.len() && tokens.iter().all(|t| !t.is_empty());
        if !shaped || !cache_kinds_fit || !self.cpu_step_applies() {
            return Ok(None);
        }
        self.room_for(caches, tokens.iter().map(|t| t.len()))?;
        // Each row's sequence and how far past that sequence's filled positions it lies.
        let rows: Vec<Row> = tokens
            .iter()
            .enumerate()
            .flat_map(|(seq, t)| (0..t.len()).map(move |ahead| Row { seq, ahead }))
            .collect();
        let lora = RowAdapters {
            rows: rows
                .iter()
                .map(|r| adapters.get(r.seq).copied().flatten())
                .collect(),
        };
        let mut x = self.embed_rows(&tokens.concat())?;
        let rope: Vec<(Vec<f32>, Vec<f32>)> = rows
            .iter()
            .map(|r| self.rope_row(caches[r.seq].len() + r.ahead))
            .collect::<Result<_>>()?;
        for i in 0..self.layers.len() {
            let step = Step {
                pool,
                precision,
                lora: &lora,
            };
            self.cpu_attention_half(i, &mut x, &rows, &rope, caches, &step)?;
            self.cpu_mlp_half(i, &mut x, &step)?;
        }
        for (cache, t) in caches.iter_mut().zip(tokens) {
            cache.advance(t.len());
        }
        // Only each sequence's last row goes on to the head.
        let hidden = self.config.hidden_size;
        let mut last = Vec::with_capacity(tokens.len() * hidden);
        let mut end = 0;
        for t in tokens {
            end += t.len();
            last.extend_from_slice(&x[(end - 1) * hidden..end * hidden]);
        }
        let h = self.norm_rows(&last, &self.norm, precision)?;
        let lm_head = [&self.lm_head];
        let step = Step {
            pool,
            precision,
            lora: &RowAdapters { rows: Vec::new() },
        };
        Ok(Some(self.project_rows(&lm_head, h, tokens.len(), &step, None)?))
    }

    /// The embedding rows of `tokens`, `hidden` values each.
    fn embed_rows(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let (vocab, hidden) = (self.config.vocab_size, self.config.hidden_size);
        let mut x = Vec::with_capacity(tokens.len() * hidden);
        for &t in tokens {
            let t = t as usize;
            if t >= vocab {
                return Err(ModelError::InvalidRequest(format!(
                    "token id {t} is outside the vocabulary of {vocab}"
                )));
            }
            match self.embed_quant {
                Some(format) => x.extend(super::row_values(&self.embed_tokens, format, t)?),
                None => x.extend(kernel(values_at(&self.embed_tokens, t * hidden, hidden))?),
            }
        }
        Ok(x)
    }

    /// cos and sin (`head_dim` values each, in the model's dtype) for `position`.
    fn rope_row(&self, position: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let head_dim = self.config.head_dim;
        if position < self.rope_cos.size()[2] as usize {
            let at = position * head_dim;
            return Ok((
                kernel(values_at(&self.rope_cos, at, head_dim))?,
                kernel(values_at(&self.rope_sin, at, head_dim))?,
            ));
        }
        let (cos, sin) = compute_rope(&self.inv_freq, position, 1, self.kind())?;
        Ok((
            Vec::<f32>::try_from(cos.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)?,
            Vec::<f32>::try_from(sin.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)?,
        ))
    }

    /// RMSNorm of each `hidden`-wide row, as [`super::rms_norm`] computes it: in f32, rounded to the dtype, then
    /// scaled by the weight.
    fn norm_rows(&self, x: &[f32], weight: &Tensor, precision: Precision) -> Result<Vec<f32>> {
        let w = kernel(values(weight))?;
        let eps = self.config.rms_norm_eps as f32;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(w.len()) {
            let variance = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let scale = 1.0 / (variance + eps).sqrt();
            out.extend(
                row.iter()
                    .zip(&w)
                    .map(|(v, w)| precision.round(w * precision.round(v * scale))),
            );
        }
        Ok(out)
    }

    /// Layer `i`'s attention half over every row of `x`, with its residual, writing each row's keys and values to
    /// its sequence's cache.
    #[allow(clippy::too_many_arguments)]
    fn cpu_attention_half<'a>(
        &'a self,
        i: usize,
        x: &mut [f32],
        rows: &[Row],
        rope: &[(Vec<f32>, Vec<f32>)],
        caches: &mut [&mut KvCache],
        step: &Step<'a, '_>,
    ) -> Result<()> {
        let (pool, precision) = (step.pool, step.precision);
        let c = &self.config;
        let layer = &self.layers[i];
        let h = self.norm_rows(x, &layer.input_layernorm, precision)?;
        let qkv_proj = [&layer.q_proj, &layer.k_proj, &layer.v_proj];
        let qkv = self.project_rows(&qkv_proj, h, rows.len(), step, Some((i, &[0, 1, 2])))?;
        let (q_len, kv_len) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut queries = Vec::with_capacity(rows.len() * q_len);
        for ((row, values), (cos, sin)) in rows.iter().zip(qkv.chunks(q_len + 2 * kv_len)).zip(rope) {
            queries.extend(rotate(&values[..q_len], cos, sin, precision));
            let k = rotate(&values[q_len..q_len + kv_len], cos, sin, precision);
            let v = &values[q_len + kv_len..];
            if !caches[row.seq].write_ahead(i, row.ahead, &k, v, c.head_dim)? {
                return Err(ModelError::InvalidRequest(
                    "the KV cache is not a CPU f32 cache".into(),
                ));
            }
        }
        let mut attended = attend_all(caches, i, rows, &queries, pool)?;
        precision.round_all(&mut attended);
        let out = self.project_rows(&[&layer.o_proj], attended, rows.len(), step, Some((i, &[3])))?;
        add_residual(x, &out, precision);
        Ok(())
    }

    /// Layer `i`'s MLP half over every row of `x`, with its residual: `x + down(silu(gate(h)) * up(h))`.
    fn cpu_mlp_half<'a>(&'a self, i: usize, x: &mut [f32], step: &Step<'a, '_>) -> Result<()> {
        let (pool, precision) = (step.pool, step.precision);
        let layer = &self.layers[i];
        let batch = x.len() / self.config.hidden_size;
        let h = self.norm_rows(x, &layer.post_attention_layernorm, precision)?;
        let gate_up = self.project_rows(
            &[&layer.gate_proj, &layer.up_proj],
            h,
            batch,
            step,
            Some((i, &[4, 5])),
        )?;
        let ff = self.config.intermediate_size;
        // SwiGLU's exponentials are the costliest work between products: the rows are split over the pool.
        let parts = split_by_work(&vec![1; batch], pool.parts());
        let swiglu = |part: usize| {
            let mut act = Vec::with_capacity(parts[part].len() * ff);
            for row in gate_up[parts[part].start * 2 * ff..parts[part].end * 2 * ff].chunks(2 * ff) {
                let (gate, up) = row.split_at(ff);
                act.extend(
                    gate.iter()
                        .zip(up)
                        .map(|(g, u)| precision.round(precision.round(silu(*g)) * u)),
                );
            }
            act
        };
        let act = pool.split(&swiglu).concat();
        let out = self.project_rows(&[&layer.down_proj], act, batch, step, Some((i, &[6])))?;
        add_residual(x, &out, precision);
        Ok(())
    }

    /// The projections of `input` (`batch` rows) by `linears`, each row's outputs concatenated in order, with
    /// biases added before rounding to the dtype (as the kernel's libtorch wrapper does), and each row's LoRA
    /// product when `site` names the layer and the modules' indices in [`crate::lora::LORA_MODULES`].
    fn project_rows<'a>(
        &'a self,
        linears: &[&'a Linear],
        input: Vec<f32>,
        batch: usize,
        step: &Step<'a, '_>,
        site: Option<(usize, &[usize])>,
    ) -> Result<Vec<f32>> {
        let (pool, precision) = (step.pool, step.precision);
        let weights: Vec<WeightRef<'a>> = linears.iter().map(|l| l.weight_ref()).collect();
        let cols = input.len() / batch.max(1);
        let mut out = Vec::new();
        // The kernel takes up to MAX_ROWS rows at a time; a row's values do not depend on the rows beside it.
        for rows in input.chunks(MAX_ROWS * cols.max(1)) {
            out.extend(kernel(pool.products(
                &weights,
                rows.to_vec(),
                rows.len() / cols.max(1),
            ))?);
        }
        if linears.iter().any(|l| l.bias.is_some()) {
            let mut bias = Vec::with_capacity(out.len() / batch.max(1));
            for l in linears {
                match &l.bias {
                    Some(b) => bias.extend(kernel(values(b))?),
                    None => bias.extend(std::iter::repeat_n(0.0, l.weight.size()[0] as usize)),
                }
            }
            for row in out.chunks_mut(bias.len()) {
                row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
            }
        }
        if let Some((layer, modules)) = site
            && step.lora.any()
        {
            let widths: Vec<usize> = linears.iter().map(|l| l.weight.size()[0] as usize).collect();
            step.lora
                .add((layer, modules), &widths, &input, cols, &mut out, pool)?;
        }
        precision.round_all(&mut out);
        Ok(out)
    }
}

/// What every projection of one CPU step shares.
struct Step<'a, 'b> {
    pool: &'b DecodePool<'a>,
    precision: Precision,
    lora: &'b RowAdapters<'b>,
}

/// The kernel refused a tensor [`Llama::cpu_step_applies`] accepted: a broken invariant, reported, not a panic.
fn kernel<T>(value: Option<T>) -> Result<T> {
    value.ok_or_else(|| ModelError::InvalidRequest("the CPU decode kernel cannot read a model tensor".into()))
}

/// RoPE of every `head_dim`-wide head in `x` at one position: `x * cos + rotate_half(x) * sin`, rounding each
/// product and the sum as the dtype's ops do.
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], precision: Precision) -> Vec<f32> {
    let head_dim = cos.len();
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(x.len());
    for head in x.chunks(head_dim) {
        for d in 0..head_dim {
            let rotated = if d < half { -head[d + half] } else { head[d - half] };
            let a = precision.round(head[d] * cos[d]);
            let b = precision.round(rotated * sin[d]);
            out.push(precision.round(a + b));
        }
    }
    out
}

/// A row of a step: the sequence it continues, and how many of the step's positions of that sequence precede it.
#[derive(Debug, Clone, Copy)]
struct Row {
    seq: usize,
    ahead: usize,
}

/// Attention of every row's query (`queries`, a row each) over its sequence's layer `layer` up to and including
/// the row's own position (causal within a prompt chunk too). The work goes to the pool's threads in units of a
/// row's heads that share one key/value head, in parts of about equal work, so a single decoded row's attention is
/// spread over the cores too (a unit's result does not depend on which thread computes it).
fn attend_all(
    caches: &[&mut KvCache],
    layer: usize,
    rows: &[Row],
    queries: &[f32],
    pool: &DecodePool<'_>,
) -> Result<Vec<f32>> {
    let lens: Vec<usize> = rows.iter().map(|r| caches[r.seq].len() + r.ahead + 1).collect();
    let q_len = queries.len() / rows.len().max(1);
    let refs: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
    let attended = with_views(&refs, layer, |views| {
        let kv_heads = views.first().map_or(1, |v| v.kv_heads()).max(1);
        if views.iter().any(|v| v.kv_heads() != kv_heads) {
            return None; // caches of different shapes
        }
        let unit_lens: Vec<usize> = lens
            .iter()
            .flat_map(|&len| std::iter::repeat_n(len, kv_heads))
            .collect();
        let parts = split_by_work(&unit_lens, pool.parts());
        let work = |part: usize| {
            let mut out = Vec::with_capacity(parts[part].len() * q_len / kv_heads);
            for unit in parts[part].clone() {
                let (j, kv) = (unit / kv_heads, unit % kv_heads);
                let query = &queries[j * q_len..(j + 1) * q_len];
                if !views[rows[j].seq].attend(query, lens[j], kv..kv + 1, &mut out) {
                    break;
                }
            }
            out
        };
        Some(pool.split(&work).concat())
    });
    match attended.flatten() {
        Some(out) if out.len() == queries.len() => Ok(out),
        _ => Err(ModelError::InvalidRequest(
            "the KV cache does not suit CPU attention".into(),
        )),
    }
}

/// `0..lens.len()` cut into `parts` consecutive ranges of about equal total length (attention's work is linear in
/// the positions attended).
fn split_by_work(lens: &[usize], parts: usize) -> Vec<std::ops::Range<usize>> {
    let total: usize = lens.iter().sum();
    let mut ranges = Vec::with_capacity(parts);
    let (mut start, mut done) = (0, 0);
    for part in 1..=parts {
        // A row goes to this part when its midpoint, `done + len / 2`, is at most `total * part / parts`.
        let mut end = start;
        while end < lens.len() && (part == parts || parts * (2 * done + lens[end]) <= 2 * total * part) {
            done += lens[end];
            end += 1;
        }
        ranges.push(start..end);
        start = end;
    }
    ranges
}

fn add_residual(x: &mut [f32], delta: &[f32], precision: Precision) {
    x.iter_mut()
        .zip(delta)
        .for_each(|(x, d)| *x = precision.round(*x + d));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_libtorch() {
        let xs: Vec<f32> = (0..2000)
            .map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i % 7 - 3))
            .collect();
        let theirs = Vec::<f32>::try_from(
            Tensor::from_slice(&xs)
                .to_kind(Kind::BFloat16)
                .to_kind(Kind::Float),
        )
        .unwrap();
        let ours: Vec<f32> = xs.iter().map(|&x| bf16_round(x)).collect();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn work_splits_into_consecutive_parts_of_about_equal_length() {
        assert_eq!(split_by_work(&[10, 10, 10, 10], 2), [0..2, 2..4]);
        assert_eq!(split_by_work(&[100, 1, 1, 1], 2), [0..1, 1..4]);
        assert_eq!(split_by_work(&[5], 2), [0..1, 1..1]);
        assert_eq!(split_by_work(&[], 2), [0..0, 0..0]);
        let whole = split_by_work(&[3, 3, 3], 1);
        assert_eq!((whole.len(), whole[0].clone()), (1, 0..3));
    }

    fn tiny(kind: Kind) -> Llama {
        let config = crate::config::Config::from_hf_str(
            r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-5}"#,
        )
        .expect("config");
        Llama::random(config, kind, Device::Cpu, 11).expect("model")
    }

    /// Greedy decoding through the CPU step follows the libtorch path: the same tokens, and logits within
    /// summation-order noise in f32 and within bf16's rounding of the largest logit in bf16.
    #[test]
    fn the_cpu_step_decodes_as_the_libtorch_path_does() {
        let _guard = tch::no_grad_guard();
        for (kind, tolerance) in [(Kind::Float, 1e-4), (Kind::BFloat16, 0.05)] {
            let model = tiny(kind);
            fn decode<'a>(model: &'a Llama, pool: Option<&DecodePool<'a>>) -> Vec<(u32, Tensor)> {
                let mut cache = model.new_cache();
                let mut logits = model.forward_last(&[3, 1, 4, 1, 5], &mut cache).expect("prefill");
                let mut steps = Vec::new();
                for _ in 0..12 {
                    let next = logits.argmax(-1, false).int64_value(&[]) as u32;
                    logits = model.forward_last_in(&[next], &mut cache, pool).expect("decode");
                    steps.push((next, logits.shallow_clone()));
                }
                steps
            }
            let reference = decode(&model, None);
            let ours = crate::cpu_gemv::with_decode_pool(|pool| {
                assert!(model.cpu_step_applies(), "{kind:?}");
                decode(&model, Some(pool))
            });
            for (step, ((t1, l1), (t2, l2))) in reference.iter().zip(&ours).enumerate() {
                assert_eq!(t1, t2, "{kind:?}: token {step} differs");
                let diff = (l1 - l2).abs().max().double_value(&[]);
                assert!(
                    diff < tolerance,
                    "{kind:?}: logits of step {step} differ by {diff}"
                );
            }
        }
    }
}
