//! Taking a model's tensors out of a checkpoint by name, checking each shape against the config.

use tch::Tensor;

use super::{Layer, Linear};
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::quant::QuantFormat;
use crate::weights::{QuantTypes, Weights};

pub(super) struct Taker<'a> {
    pub(super) weights: &'a mut Weights,
    pub(super) quant: &'a QuantTypes,
    pub(super) config: &'a Config,
}

impl Taker<'_> {
    pub(super) fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.weights.remove(name).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "checkpoint has no tensor {name} (is it a LLaMA checkpoint?)"
            ))
        })?;
        let mut expected: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        // A quantized matrix holds its rows as blocks: `[rows, row bytes]`.
        if let (Some(ty), [_, cols]) = (self.quant.get(name), &mut expected[..]) {
            *cols = ty.byte_size(*cols as u64).map_or(-1, |b| b as i64);
        }
        if t.size() != expected {
            return Err(ModelError::Unsupported(format!(
                "tensor {name} has shape {:?}, the config implies {expected:?}",
                t.size()
            )));
        }
        Ok(t)
    }

    /// A weight matrix, and for a quantized one its format: laid out for the decode kernels
    /// ([`super::for_kernels`]) when `products` (an embedding table only looked up by row stays in GGUF's order).
    pub(super) fn matrix(
        &mut self,
        name: &str,
        shape: &[usize],
        products: bool,
    ) -> Result<(Tensor, Option<QuantFormat>)> {
        let t = self.take(name, shape)?;
        match self.quant.get(name) {
            Some(&ty) if !products => Ok((t, Some(QuantFormat::rows(ty)))),
            Some(&ty) => {
                let (t, format) = super::for_kernels(t, ty)?;
                Ok((t, Some(format)))
            }
            None => Ok((t, None)),
        }
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let (weight, quant) = self.matrix(&format!("{prefix}.weight"), &[out, inp], true)?;
        let bias = if bias {
            Some(self.take(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            quant,
            lora: None,
        })
    }

    pub(super) fn layer(&mut self, i: usize) -> Result<Layer> {
        let c = self.config;
        let (h, q, kv, ff) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let p = format!("model.layers.{i}");
        Ok(Layer {
            input_layernorm: self.take(&format!("{p}.input_layernorm.weight"), &[h])?,
            q_proj: self.linear(&format!("{p}.self_attn.q_proj"), q, h, c.attention_bias)?,
            k_proj: self.linear(&format!("{p}.self_attn.k_proj"), kv, h, c.attention_bias)?,
            v_proj: self.linear(&format!("{p}.self_attn.v_proj"), kv, h, c.attention_bias)?,
            o_proj: self.linear(&format!("{p}.self_attn.o_proj"), h, q, c.attention_bias)?,
            post_attention_layernorm: self.take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            gate_proj: self.linear(&format!("{p}.mlp.gate_proj"), ff, h, c.mlp_bias)?,
            up_proj: self.linear(&format!("{p}.mlp.up_proj"), ff, h, c.mlp_bias)?,
            down_proj: self.linear(&format!("{p}.mlp.down_proj"), h, ff, c.mlp_bias)?,
        })
    }
}
