//! The decoder split the way a trainer needs it: embeddings, each layer's attention block and MLP parts, the
//! final norm and the vocabulary projection, so that layers can be recomputed in backward (activation
//! checkpointing), partly kept (selective recomputation) and sharded per layer.

use tch::Tensor;

use super::{Attention, Llama, rms_norm};
use crate::error::{ModelError, Result};

/// cos/sin tables for a training sequence (see [`Llama::rope_for_training`]), or for a row of packed samples
/// (see [`Llama::rope_for_packed`]).
#[derive(Debug)]
pub struct RopeTables {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// `(start, len)` of each packed sample in the row; empty for one causal sequence.
    pub(super) segments: Vec<(i64, i64)>,
}

impl Llama {
    /// Token embeddings `[batch, t, hidden]` of `tokens` (`[batch, t]`, i64).
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let Some(format) = self.embed_quant else {
            return Ok(Tensor::f_embedding(&self.embed_tokens, tokens, -1, false, false)?);
        };
        // A quantized table: only the rows asked for are dequantized.
        let ids = Vec::<i64>::try_from(tokens.f_flatten(0, -1)?)?;
        let vocab = self.config.vocab_size;
        let rows = ids
            .iter()
            .map(|&t| usize::try_from(t).ok().filter(|&t| t < vocab))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| {
                ModelError::InvalidRequest(format!("a token id is outside the vocabulary of {vocab}"))
            })?;
        let mut shape = tokens.size();
        shape.push(self.config.hidden_size as i64);
        let values = super::dequantized_rows(&self.embed_tokens, format, &rows)?;
        Ok(values.f_to_device(tokens.device())?.f_view(&shape[..])?)
    }

    /// RoPE tables for a training sequence of `len` positions from 0, to pass to [`Llama::decoder_layer`].
    pub fn rope_for_training(&self, len: usize) -> Result<RopeTables> {
        if len > self.config.max_position_embeddings {
            return Err(ModelError::ContextOverflow {
                prompt_tokens: len,
                context: self.config.max_position_embeddings,
            });
        }
        let (cos, sin) = self.rope_tables(0, len)?;
        Ok(RopeTables {
            cos,
            sin,
            segments: Vec::new(),
        })
    }

    /// RoPE tables for one row holding several samples back to back (sequence packing): positions restart at 0
    /// for each sample, and attention through these tables stays inside each sample, so every sample computes
    /// what it would alone, with no padding. `lengths` are the samples' token counts in row order.
    pub fn rope_for_packed(&self, lengths: &[usize]) -> Result<RopeTables> {
        if lengths.len() <= 1 {
            return self.rope_for_training(lengths.first().copied().unwrap_or(0));
        }
        let (mut cos, mut sin, mut segments) = (Vec::new(), Vec::new(), Vec::new());
        let mut start = 0i64;
        for &len in lengths {
            let tables = self.rope_for_training(len)?;
            cos.push(tables.cos);
            sin.push(tables.sin);
            segments.push((start, len as i64));
            start += len as i64;
        }
        Ok(RopeTables {
            cos: Tensor::f_cat(&cos, 2)?,
            sin: Tensor::f_cat(&sin, 2)?,
            segments,
        })
    }

    /// Decoder layer `i` over a whole causal sequence (no cache): the unit a trainer recomputes in backward
    /// (activation checkpointing) and shards parameters by. Attention runs in the model's dtype through SDPA.
    pub fn decoder_layer(&self, i: usize, x: &Tensor, rope: &RopeTables) -> Result<Tensor> {
        let x = self.attention_block(i, x, rope)?;
        let (gate, up) = self.mlp_gate_up(i, &self.mlp_norm(i, &x)?)?;
        Ok(x.f_add(&self.mlp_down(i, &gate, &up)?)?)
    }

    /// The attention half of decoder layer `i` with its residual (training, no cache): what
    /// [`Llama::decoder_layer`] computes before the MLP.
    pub fn attention_block(&self, i: usize, x: &Tensor, rope: &RopeTables) -> Result<Tensor> {
        let attention = Attention {
            cos: &rope.cos,
            sin: &rope.sin,
            mask: None,
            is_causal: x.size()[1] > 1,
            segments: &rope.segments,
            // Unlike single-token decoding, training-sized attention is as fast in bf16 as in f32 on CPU (seen:
            // 33 ms against 37 ms forward and backward for SmolLM2 at 2 x 512 tokens).
            kind: self.kind(),
        };
        self.attention_half(i, x, &attention, None, None)
    }

    /// Layer `i`'s MLP input norm (of the attention block's output).
    pub fn mlp_norm(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        rms_norm(
            x,
            &self.layers[i].post_attention_layernorm,
            self.config.rms_norm_eps,
        )
    }

    /// Layer `i`'s gate and up projections of the normed input. A trainer that keeps them from the forward
    /// pass (selective recomputation) skips the two largest matmuls when it recomputes the layer.
    pub fn mlp_gate_up(&self, i: usize, normed: &Tensor) -> Result<(Tensor, Tensor)> {
        let l = &self.layers[i];
        Ok((l.gate_proj.forward(normed)?, l.up_proj.forward(normed)?))
    }

    /// Layer `i`'s MLP output before the residual: `down_proj(silu(gate) * up)`.
    pub fn mlp_down(&self, i: usize, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        self.mlp_output(i, gate, up, None)
    }

    /// Layer `i`'s gate and up projections as `(weight, bias)`, with their checkpoint names' prefixes.
    pub fn mlp_gate_up_params(&self, i: usize) -> [(&Tensor, Option<&Tensor>, String); 2] {
        let l = &self.layers[i];
        [
            (
                &l.gate_proj.weight,
                l.gate_proj.bias.as_ref(),
                format!("model.layers.{i}.mlp.gate_proj"),
            ),
            (
                &l.up_proj.weight,
                l.up_proj.bias.as_ref(),
                format!("model.layers.{i}.mlp.up_proj"),
            ),
        ]
    }

    /// The final RMSNorm alone (a trainer that projects to the vocabulary in chunks applies the head itself).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }

    /// The vocabulary projection `[vocab, hidden]` (the embedding matrix itself when embeddings are tied) and its
    /// checkpoint name.
    pub fn lm_head_weight(&self) -> (&Tensor, &'static str) {
        if self.config.tie_word_embeddings {
            (&self.embed_tokens, "model.embed_tokens.weight")
        } else {
            (&self.lm_head.weight, "lm_head.weight")
        }
    }
}

impl Llama {
    /// Swaps in `tensor` for the parameter `name` (a checkpoint key from [`Llama::named_parameters`]) and
    /// returns the one it replaces. A sharded trainer gathers a layer's parameters into place just before the
    /// layer runs and swaps in empty tensors afterwards, so only the layers in use are ever whole in memory. The
    /// shape is not checked: using the model with a parameter swapped out fails in libtorch. With tied
    /// embeddings the vocabulary projection follows `model.embed_tokens.weight`.
    pub fn replace_parameter(&mut self, name: &str, tensor: Tensor) -> Result<Tensor> {
        let unknown = || ModelError::InvalidRequest(format!("the model has no parameter {name}"));
        let slot: &mut Tensor = match name {
            "model.embed_tokens.weight" => &mut self.embed_tokens,
            "model.norm.weight" => &mut self.norm,
            "lm_head.weight" if !self.config.tie_word_embeddings => &mut self.lm_head.weight,
            _ => {
                let rest = name.strip_prefix("model.layers.").ok_or_else(unknown)?;
                let (index, field) = rest.split_once('.').ok_or_else(unknown)?;
                let layer = index
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| self.layers.get_mut(i))
                    .ok_or_else(unknown)?;
                match field {
                    "input_layernorm.weight" => &mut layer.input_layernorm,
                    "post_attention_layernorm.weight" => &mut layer.post_attention_layernorm,
                    _ => {
                        let (proj, kind) = field.rsplit_once('.').ok_or_else(unknown)?;
                        let linear = match proj {
                            "self_attn.q_proj" => &mut layer.q_proj,
                            "self_attn.k_proj" => &mut layer.k_proj,
                            "self_attn.v_proj" => &mut layer.v_proj,
                            "self_attn.o_proj" => &mut layer.o_proj,
                            "mlp.gate_proj" => &mut layer.gate_proj,
                            "mlp.up_proj" => &mut layer.up_proj,
                            "mlp.down_proj" => &mut layer.down_proj,
                            _ => return Err(unknown()),
                        };
                        match (kind, linear.bias.as_mut()) {
                            ("weight", _) => &mut linear.weight,
                            ("bias", Some(bias)) => bias,
                            _ => return Err(unknown()),
                        }
                    }
                }
            }
        };
        let old = std::mem::replace(slot, tensor);
        if name == "model.embed_tokens.weight" && self.config.tie_word_embeddings {
            self.lm_head.weight = self.embed_tokens.shallow_clone();
        }
        Ok(old)
    }
}
