//! One decode step for several sequences at once (continuous batching): every projection and the MLP run as one
//! matrix product over the batch, while attention runs per sequence against that sequence's own KV cache, so
//! sequences of any length share a step without padding or copying their histories.

use tch::{Kind, Tensor};

use super::{Llama, apply_rope, attend_one, compute_rope, cpu_attention, project, project_all, rms_norm};
use crate::cpu_gemv::DecodePool;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::lora::LoraAdapter;

impl Llama {
    /// Continues each sequence by one token: `tokens[j]` is appended to `caches[j]`. Returns the next-token logits
    /// `[batch, vocab]` in f32, row `j` for sequence `j`. With a [`DecodePool`] (CPU), the projections run on its
    /// kernel, which reads each weight once for the whole batch.
    pub fn decode_step<'a>(
        &'a self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        pool: Option<&DecodePool<'a>>,
    ) -> Result<Tensor> {
        let batch = tokens.len();
        if batch == 0 || batch != caches.len() {
            return Err(ModelError::InvalidRequest(format!(
                "decode_step needs one cache per token, got {batch} tokens and {} caches",
                caches.len()
            )));
        }
        self.room_for_one_more(caches)?;
        let rows: Vec<&[u32]> = tokens.chunks(1).collect();
        if let Some(pool) = pool
            && let Some(logits) = self.cpu_step(&rows, caches, pool, &[])?
        {
            return Ok(Tensor::f_from_slice(&logits)?.f_view([batch as i64, -1])?);
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let input = Tensor::f_from_slice(&ids)?
            .f_to_device(self.device())?
            .f_view([batch as i64, 1])?;
        let (cos, sin) = self.rope_rows(caches)?;
        let mut x = self.embed(&input)?;
        for i in 0..self.layers.len() {
            x = self.batched_attention(i, &x, &cos, &sin, caches, pool)?;
            let (gate, up) = self.mlp_projections(i, &x, pool)?;
            x = x.f_add(&self.mlp_output(i, &gate, &up, pool)?)?;
        }
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        let h = rms_norm(&x, &self.norm, self.config.rms_norm_eps)?.f_view([batch as i64, -1])?;
        Ok(project(pool, &h, &self.lm_head)?.f_to_kind(Kind::Float)?)
    }

    /// Continues each sequence by its tokens in one step, `tokens[j]` appended to `caches[j]`: one decoded token,
    /// or a chunk of a prompt. Returns the next-token logits after each sequence's last token, `[n, vocab]` f32.
    /// On the CPU with a pool every row of the step shares one pass over the weights (see `cpu_step`); otherwise
    /// the single tokens share a [`Llama::decode_step`] and each chunk runs on its own.
    pub fn forward_step<'a>(
        &'a self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        pool: Option<&DecodePool<'a>>,
    ) -> Result<Tensor> {
        self.forward_step_adapted(tokens, caches, pool, &[])
    }

    /// [`Llama::forward_step`] with LoRA: `adapters[j]` is sequence `j`'s adapter (None: the base model), and
    /// sequences of different adapters share the step's pass over the base weights. Adapters run on the CPU
    /// step (a CPU model in f32, bf16 or quantized, with a pool).
    pub fn forward_step_adapted<'a>(
        &'a self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        pool: Option<&DecodePool<'a>>,
        adapters: &[Option<&LoraAdapter>],
    ) -> Result<Tensor> {
        let n = tokens.len();
        if n == 0 || n != caches.len() || tokens.iter().any(|t| t.is_empty()) {
            return Err(ModelError::InvalidRequest(format!(
                "forward_step needs a non-empty run of tokens per cache, got {n} runs and {} caches",
                caches.len()
            )));
        }
        let adapted = adapters.iter().any(Option::is_some);
        if adapted && adapters.len() != n {
            return Err(ModelError::InvalidRequest(format!(
                "forward_step got {} adapters for {n} sequences",
                adapters.len()
            )));
        }
        if let Some(pool) = pool
            && let Some(logits) = self.cpu_step(tokens, caches, pool, adapters)?
        {
            return Ok(Tensor::f_from_slice(&logits)?.f_view([n as i64, -1])?);
        }
        if adapted {
            return Err(ModelError::Unsupported(format!(
                "LoRA adapters are served by the CPU decode step; this model runs on {:?} in {:?}",
                self.device(),
                self.kind()
            )));
        }
        let (mut singles, mut chunks) = (Vec::new(), Vec::new());
        for (j, cache) in caches.iter_mut().enumerate() {
            match tokens[j] {
                [token] => singles.push((j, *token, &mut **cache)),
                run => chunks.push((j, run, &mut **cache)),
            }
        }
        let mut logits: Vec<Option<Tensor>> = (0..n).map(|_| None).collect();
        if !singles.is_empty() {
            let next: Vec<u32> = singles.iter().map(|(_, t, _)| *t).collect();
            let (seqs, mut refs): (Vec<usize>, Vec<&mut KvCache>) =
                singles.into_iter().map(|(j, _, c)| (j, c)).unzip();
            let decoded = self.decode_step(&next, &mut refs, pool)?;
            for (row, j) in seqs.into_iter().enumerate() {
                logits[j] = Some(decoded.f_get(row as i64)?);
            }
        }
        for (j, run, cache) in chunks {
            logits[j] = Some(self.forward_last_in(run, cache, pool)?.f_to_kind(Kind::Float)?);
        }
        Ok(Tensor::f_stack(
            &logits.into_iter().flatten().collect::<Vec<_>>(),
            0,
        )?)
    }

    /// Every cache can take one more position within the model's context.
    pub(super) fn room_for_one_more(&self, caches: &[&mut KvCache]) -> Result<()> {
        self.room_for(caches, std::iter::repeat(1))
    }

    /// Each cache can take its sequence's `more` positions within the model's context.
    pub(super) fn room_for(&self, caches: &[&mut KvCache], more: impl Iterator<Item = usize>) -> Result<()> {
        let context = self.config.max_position_embeddings;
        let mut needed = caches.iter().zip(more).map(|(c, n)| c.len() + n);
        match needed.find(|&n| n > context) {
            Some(prompt_tokens) => Err(ModelError::ContextOverflow {
                prompt_tokens,
                context,
            }),
            None => Ok(()),
        }
    }

    /// cos/sin `[batch, 1, 1, head_dim]` for each sequence's next position.
    fn rope_rows(&self, caches: &[&mut KvCache]) -> Result<(Tensor, Tensor)> {
        let table = self.rope_cos.size()[2] as usize;
        if caches.iter().all(|c| c.len() < table) {
            let positions: Vec<i64> = caches.iter().map(|c| c.len() as i64).collect();
            let index = Tensor::f_from_slice(&positions)?.f_to_device(self.device())?;
            let pick = |t: &Tensor| -> Result<Tensor> {
                Ok(t.f_select(0, 0)?
                    .f_select(0, 0)?
                    .f_index_select(0, &index)?
                    .f_view([caches.len() as i64, 1, 1, -1])?)
            };
            return Ok((pick(&self.rope_cos)?, pick(&self.rope_sin)?));
        }
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for cache in caches {
            let (c, s) = compute_rope(&self.inv_freq, cache.len(), 1, self.kind())?;
            cos.push(c);
            sin.push(s);
        }
        Ok((Tensor::f_cat(&cos, 0)?, Tensor::f_cat(&sin, 0)?))
    }

    /// Layer `i`'s attention half with its residual for a batch of single-token rows.
    fn batched_attention<'a>(
        &'a self,
        i: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [&mut KvCache],
        pool: Option<&DecodePool<'a>>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let layer = &self.layers[i];
        let batch = x.size()[0];
        let h = rms_norm(x, &layer.input_layernorm, c.rms_norm_eps)?;
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            Ok(y.f_view([batch, 1, heads as i64, c.head_dim as i64])?
                .f_transpose(1, 2)?)
        };
        let [q, k, v] = project_all(pool, &h, [&layer.q_proj, &layer.k_proj, &layer.v_proj])?;
        let kind = self.attention_kind();
        let q = apply_rope(&split(q, c.num_heads)?, cos, sin)?.f_to_kind(kind)?;
        let k = apply_rope(&split(k, c.num_kv_heads)?, cos, sin)?.f_to_kind(kind)?;
        let v = split(v, c.num_kv_heads)?.f_to_kind(kind)?;
        let (qs, ks, vs) = (q.f_split(1, 0)?, k.f_split(1, 0)?, v.f_split(1, 0)?);
        // Every sequence's output goes into one buffer, row-major `[batch, heads, head_dim]`.
        let mut values_out = Vec::with_capacity(q.numel());
        for (j, cache) in caches.iter_mut().enumerate() {
            let (keys, values) = cache.append(i, &ks[j], &vs[j])?;
            if !cpu_attention(&qs[j], cache, i, &mut values_out)? {
                let out = attend_one(&qs[j], &keys, &values)?.f_to_kind(Kind::Float)?;
                values_out.extend(Vec::<f32>::try_from(out.f_flatten(0, -1)?)?);
            }
        }
        let attn = Tensor::f_from_slice(&values_out)?
            .f_to_device(self.device())?
            .f_to_kind(self.kind())?
            .f_view([batch, 1, (c.num_heads * c.head_dim) as i64])?;
        Ok(x.f_add(&project(pool, &attn, &layer.o_proj)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tch::Device;

    fn tiny() -> Llama {
        let config = Config::from_hf_str(
            r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-5}"#,
        )
        .expect("config");
        Llama::random(config, Kind::Float, Device::Cpu, 7).expect("model")
    }

    /// A batched step gives each sequence the logits it gets alone, whatever the other sequences' lengths.
    #[test]
    fn batched_step_matches_each_sequence_alone() {
        let model = tiny();
        let _guard = tch::no_grad_guard();
        let prompts: [&[u32]; 3] = [&[1, 2, 3], &[5], &[9, 8, 7, 6, 5, 4, 3]];
        let next = [11u32, 12, 13];
        let mut solo = Vec::new();
        for (p, &n) in prompts.iter().zip(&next) {
            let mut cache = model.new_cache();
            let _ = model.forward_last(p, &mut cache).expect("prefill");
            solo.push(model.forward_last(&[n], &mut cache).expect("decode"));
        }
        let mut caches: Vec<KvCache> = prompts
            .iter()
            .map(|p| {
                let mut cache = model.new_cache();
                let _ = model.forward_last(p, &mut cache).expect("prefill");
                cache
            })
            .collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let batched = model.decode_step(&next, &mut refs, None).expect("step");
        assert_eq!(batched.size(), [3, 97]);
        for (j, expected) in solo.iter().enumerate() {
            let diff = f64::try_from((batched.get(j as i64) - expected).abs().max()).expect("scalar");
            assert!(diff < 1e-4, "sequence {j} differs by {diff}");
        }
        assert_eq!(caches.iter().map(KvCache::len).collect::<Vec<_>>(), [4, 2, 8]);
    }

    /// A step mixing prompt chunks with decoded tokens gives every sequence what it gets alone: on the CPU step
    /// the same bits whether a prompt is prefilled whole or in chunks beside other sequences' decodes, and on the
    /// libtorch path the same logits within summation-order noise.
    #[test]
    fn a_mixed_step_of_chunks_and_decodes_matches_each_sequence_alone() {
        let model = tiny();
        let _guard = tch::no_grad_guard();
        fn run<'a>(model: &'a Llama, pool: Option<&DecodePool<'a>>) -> [f64; 4] {
            let (long, short): (&[u32], &[u32]) = (&[9, 8, 7, 6, 5, 4, 3], &[1, 2]);
            let alone = |prompt: &[u32], next: u32| {
                let mut cache = model.new_cache();
                let first = model
                    .forward_step(&[prompt], &mut [&mut cache], pool)
                    .expect("prefill");
                let second = model
                    .forward_step(&[&[next]], &mut [&mut cache], pool)
                    .expect("decode");
                (first.get(0), second.get(0))
            };
            let (long_first, long_second) = alone(long, 11);
            let (short_first, short_second) = alone(short, 12);
            // The short prompt is prefilled, then decodes beside the long prompt's two chunks and its first decode.
            let (mut a, mut b) = (model.new_cache(), model.new_cache());
            let s1 = model
                .forward_step(&[short], &mut [&mut a], pool)
                .expect("short prefill");
            let s2 = model
                .forward_step(&[&[12], &long[..3]], &mut [&mut a, &mut b], pool)
                .expect("mixed");
            let s3 = model
                .forward_step(&[&[13], &long[3..]], &mut [&mut a, &mut b], pool)
                .expect("mixed");
            let s4 = model.forward_step(&[&[11]], &mut [&mut b], pool).expect("decode");
            assert_eq!((a.len(), b.len()), (4, 8));
            let pairs = [
                (s1.get(0), short_first),
                (s2.get(0), short_second),
                (s3.get(1), long_first),
                (s4.get(0), long_second),
            ];
            pairs.map(|(mixed, alone)| (mixed - alone).abs().max().double_value(&[]))
        }
        let on_kernel = crate::cpu_gemv::with_decode_pool(|pool| run(&model, Some(pool)));
        assert_eq!(on_kernel, [0.0; 4], "the CPU step differs from solo runs");
        let on_libtorch = run(&model, None);
        assert!(on_libtorch.iter().all(|d| *d < 1e-4), "libtorch: {on_libtorch:?}");
    }

    /// On the CPU decode kernel a sequence's logits do not depend on the batch it runs in: greedy replies are the
    /// same whatever else a worker serves.
    #[test]
    fn on_the_decode_kernel_batched_logits_equal_solo_logits_bitwise() {
        let model = tiny();
        let _guard = tch::no_grad_guard();
        let prompts: [&[u32]; 5] = [
            &[1, 2, 3],
            &[5],
            &[9, 8, 7, 6, 5, 4, 3],
            &[4, 4],
            &[60, 61, 62, 63],
        ];
        let prefill = |p: &[u32]| {
            let mut cache = model.new_cache();
            let _ = model.forward_last(p, &mut cache).expect("prefill");
            cache
        };
        crate::cpu_gemv::with_decode_pool(|pool| {
            let solo: Vec<Tensor> = prompts
                .iter()
                .map(|p| {
                    let mut cache = prefill(p);
                    model
                        .forward_last_in(&[11], &mut cache, Some(pool))
                        .expect("decode")
                })
                .collect();
            let mut caches: Vec<KvCache> = prompts.iter().map(|p| prefill(p)).collect();
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let batched = model.decode_step(&[11; 5], &mut refs, Some(pool)).expect("step");
            for (j, expected) in solo.iter().enumerate() {
                assert!(batched.get(j as i64).equal(expected), "sequence {j} differs");
            }
        });
    }
}
