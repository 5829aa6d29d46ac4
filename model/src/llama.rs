//! The LLaMA architecture: RMSNorm, rotary embeddings, grouped-query attention through libtorch's
//! `scaled_dot_product_attention`, and the SwiGLU MLP. Parameter names are HF checkpoint keys.

use tch::{Device, Kind, Tensor};

use crate::config::{Config, RopeScaling};
use crate::cpu_gemv::{DecodePool, WeightRef};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::quant::QuantFormat;
use crate::weights::{QuantTypes, Weights};

mod batch;
mod cpu_step;
mod lora;
mod quantized;
mod taker;
use quantized::{dequantized, dequantized_rows, for_kernels, row_values};
use taker::Taker;
mod training;
pub use training::RopeTables;

#[derive(Debug)]
struct Linear {
    /// The `[out, in]` values, or for a quantized matrix its `[out, row bytes]` u8 blocks.
    weight: Tensor,
    bias: Option<Tensor>,
    /// The GGML block type and layout of a quantized `weight`.
    quant: Option<QuantFormat>,
    /// A LoRA adapter's pair attached for training (see [`Llama::attach_lora`]).
    lora: Option<lora::Attached>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.quant {
            None => x.f_linear(&self.weight, self.bias.as_ref())?,
            Some(format) => {
                let w = dequantized(&self.weight, format)?.f_to_kind(x.kind())?;
                x.f_linear(&w, self.bias.as_ref())?
            }
        };
        match &self.lora {
            None => Ok(y),
            Some(adapter) => adapter.add_to(x, y),
        }
    }

    fn weight_ref(&self) -> WeightRef<'_> {
        (&self.weight, self.quant)
    }
}

/// `x W^T + b`: single-token CPU decoding with a [`DecodePool`] goes through its kernel, everything else through
/// libtorch.
fn project<'a>(pool: Option<&DecodePool<'a>>, x: &Tensor, linear: &'a Linear) -> Result<Tensor> {
    let [y] = project_all(pool, x, [linear])?;
    Ok(y)
}

/// Several projections of the same input (one kernel pass on the single-token CPU path).
fn project_all<'a, const N: usize>(
    pool: Option<&DecodePool<'a>>,
    x: &Tensor,
    layers: [&'a Linear; N],
) -> Result<[Tensor; N]> {
    let pairs: Vec<(&'a Tensor, Option<&Tensor>)> =
        layers.iter().map(|l| (&l.weight, l.bias.as_ref())).collect();
    let dense = layers.iter().all(|l| l.quant.is_none() && l.lora.is_none());
    let kernel = match pool {
        Some(pool) if dense => pool.linear_single_row_many(x, &pairs)?,
        _ => None,
    };
    let outputs = match kernel {
        Some(outputs) => outputs,
        None => layers.iter().map(|l| l.forward(x)).collect::<Result<Vec<_>>>()?,
    };
    outputs
        .try_into()
        .map_err(|_| ModelError::InvalidRequest("projection count mismatch".into()))
}

impl Layer {
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
}

#[derive(Debug)]
struct Layer {
    input_layernorm: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: Tensor,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// A LLaMA-family decoder.
#[derive(Debug)]
pub struct Llama {
    config: Config,
    /// `[vocab, hidden]`, or quantized rows of `embed_quant` blocks.
    embed_tokens: Tensor,
    embed_quant: Option<QuantFormat>,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Tensor,
    /// cos/sin for the first [`ROPE_TABLE_POSITIONS`] positions, `[1, 1, positions, head_dim]`; positions past it
    /// are computed per call.
    rope_cos: Tensor,
    rope_sin: Tensor,
}

/// How one attention call masks and in which dtype it runs.
struct Attention<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: Option<&'a Tensor>,
    is_causal: bool,
    /// Packed samples `(start, len)` along the time axis, each attending only within itself; empty for none.
    segments: &'a [(i64, i64)],
    kind: Kind,
}

/// Positions whose RoPE tables are computed once at load (8192 positions of a 128-wide head take 8 MB in f32).
const ROPE_TABLE_POSITIONS: usize = 8192;

/// RoPE inverse frequencies, computed as transformers computes them (in f32).
fn inverse_frequencies(config: &Config, freq_factors: Option<&Tensor>) -> Result<Tensor> {
    let dim = config.head_dim as i64;
    let exponents = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))?
        .f_to_kind(Kind::Float)?
        / dim as f64;
    let base = Tensor::f_from_slice(&[config.rope_theta as f32])?;
    let mut inv = base.f_pow(&exponents)?.f_reciprocal()?;
    match config.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => inv /= factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let wavelen = inv.f_reciprocal()? * (2.0 * std::f64::consts::PI);
            let scaled = inv.f_where_self(&wavelen.f_le(low_wavelen)?, &(&inv / factor))?;
            let smooth =
                (wavelen.f_reciprocal()? * old - low_freq_factor) / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.f_neg()? + 1.0) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen
                .f_ge(high_wavelen)?
                .f_logical_and(&wavelen.f_le(low_wavelen)?)?;
            inv = smoothed.f_where_self(&medium, &scaled)?;
        }
    }
    if let Some(factors) = freq_factors {
        inv = inv.f_div(&factors.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?)?;
    }
    Ok(inv)
}

/// cos/sin of `position * inv_freq` for `start..start + len`, `[1, 1, len, head_dim]`, computed in f32 as
/// transformers does and then cast.
fn compute_rope(inv_freq: &Tensor, start: usize, len: usize, kind: Kind) -> Result<(Tensor, Tensor)> {
    let positions = Tensor::f_arange_start(
        start as i64,
        (start + len) as i64,
        (Kind::Float, inv_freq.device()),
    )?;
    let freqs = positions.f_outer(inv_freq)?;
    let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?
        .f_unsqueeze(0)?
        .f_unsqueeze(0)?;
    Ok((emb.f_cos()?.f_to_kind(kind)?, emb.f_sin()?.f_to_kind(kind)?))
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.kind();
    let xf = x.f_to_kind(Kind::Float)?;
    let variance = xf.f_pow_tensor_scalar(2)?.f_mean_dim(-1, true, Kind::Float)?;
    let normed = xf.f_mul(&variance.f_add_scalar(eps)?.f_rsqrt()?)?;
    Ok(weight.f_mul(&normed.f_to_kind(dtype)?)?)
}

/// Attention of one query position (`q`: `[1, heads, 1, head_dim]`) over a cached history (`k`, `v`:
/// `[1, kv_heads, len, head_dim]`), grouped-query heads sharing their key/value head: decoding's fallback where
/// the CPU attention kernel does not apply (GPU, or a cache that is not f32). Single-sequence and batched decode
/// both use it, so a sequence gets the same logits alone or in a batch there too.
fn attend_one(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (heads, head_dim) = (q.size()[1], q.size()[3]);
    let kv_heads = k.size()[1];
    let q = q.f_reshape([kv_heads, heads / kv_heads, head_dim])?;
    let (k, v) = (k.f_select(0, 0)?, v.f_select(0, 0)?);
    let scores = q
        .f_matmul(&k.f_transpose(1, 2)?)?
        .f_mul_scalar(1.0 / (head_dim as f64).sqrt())?;
    let probs = scores.f_softmax(-1, scores.kind())?;
    Ok(probs.f_matmul(&v)?.f_reshape([1, heads, 1, head_dim])?)
}

/// One query's attention (`q`: `[1, heads, 1, head_dim]`) over layer `layer` of `cache`, whose keys and values
/// for this position were just appended (`keys`, `values` are the views `append` returned): the CPU kernel when
/// the cache is CPU f32, else [`attend_one`]. Returns `[1, heads, 1, head_dim]`.
fn attend_cached(
    q: &Tensor,
    cache: &KvCache,
    layer: usize,
    keys: &Tensor,
    values: &Tensor,
) -> Result<Tensor> {
    let mut out = Vec::new();
    if cpu_attention(q, cache, layer, &mut out)? {
        return Ok(Tensor::f_from_slice(&out)?.f_view(q.size().as_slice())?);
    }
    attend_one(q, keys, values)
}

/// CPU attention ([`KvCache::attend`]) for `q` (`[.., heads, 1, head_dim]` of one sequence) over layer `layer` of
/// `cache` including the position being decoded; false when it does not apply.
fn cpu_attention(q: &Tensor, cache: &KvCache, layer: usize, out: &mut Vec<f32>) -> Result<bool> {
    if q.device() != Device::Cpu || q.kind() != Kind::Float {
        return Ok(false);
    }
    let query = Vec::<f32>::try_from(q.f_flatten(0, -1)?)?;
    cache.attend(layer, &query, cache.len() + 1, out)
}

/// Causal attention within each packed segment `(start, len)` of the time axis (`[batch, heads, t, head_dim]`
/// inputs): one SDPA call per segment, so the work is the sum of the segments' squares, not the row's square
/// under a block-diagonal mask.
fn attend_segments(q: &Tensor, k: &Tensor, v: &Tensor, segments: &[(i64, i64)], gqa: bool) -> Result<Tensor> {
    let parts = segments
        .iter()
        .map(|&(start, len)| {
            Tensor::f_scaled_dot_product_attention(
                &q.f_narrow(2, start, len)?,
                &k.f_narrow(2, start, len)?,
                &v.f_narrow(2, start, len)?,
                None::<&Tensor>,
                0.0,
                len > 1,
                None,
                gqa,
            )
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Tensor::f_cat(&parts, 2)?)
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.size()[3] / 2;
    let x1 = x.f_narrow(3, 0, half)?;
    let x2 = x.f_narrow(3, half, half)?;
    Ok(Tensor::f_cat(&[x2.f_neg()?, x1], 3)?)
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(x.f_mul(cos)?.f_add(&rotate_half(x)?.f_mul(sin)?)?)
}

impl Llama {
    /// Builds the model from checkpoint tensors; every expected tensor must be present with the config's shape,
    /// and no unexpected tensor may be left over.
    pub fn from_weights(config: Config, weights: Weights) -> Result<Self> {
        Self::from_quantized_weights(config, weights, &QuantTypes::new())
    }

    /// [`Llama::from_weights`] where the matrices named in `quant` hold GGML blocks of that type (`[rows, row
    /// bytes]` u8 tensors on the CPU) that the decode kernels compute on as they are.
    pub fn from_quantized_weights(config: Config, mut weights: Weights, quant: &QuantTypes) -> Result<Self> {
        config.validate()?;
        let freq_factors = weights.remove("rope_freqs.weight");
        let mut taker = Taker {
            weights: &mut weights,
            quant,
            config: &config,
        };
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_name = "model.embed_tokens.weight";
        // A tied table is the LM head's matrix too, so it is laid out for products.
        let (embed_tokens, embed_quant) = taker.matrix(embed_name, &[v, h], config.tie_word_embeddings)?;
        let layers = (0..config.num_layers)
            .map(|i| taker.layer(i))
            .collect::<Result<Vec<_>>>()?;
        let norm = taker.take("model.norm.weight", &[h])?;
        let (lm_head_weight, lm_head_quant) = if config.tie_word_embeddings {
            let _ = taker.weights.remove("lm_head.weight");
            (embed_tokens.shallow_clone(), embed_quant)
        } else {
            taker.matrix("lm_head.weight", &[v, h], true)?
        };
        if let Some(extra) = weights
            .keys()
            .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
            .min()
        {
            return Err(ModelError::Unsupported(format!(
                "checkpoint has tensor {extra} that a LLaMA model does not use"
            )));
        }
        let inv_freq =
            inverse_frequencies(&config, freq_factors.as_ref())?.f_to_device(embed_tokens.device())?;
        let table_len = config.max_position_embeddings.min(ROPE_TABLE_POSITIONS);
        // The compute dtype is the norms' (a quantized model's matrices are bytes).
        let (rope_cos, rope_sin) = compute_rope(&inv_freq, 0, table_len, norm.kind())?;
        Ok(Self {
            config,
            embed_tokens,
            embed_quant,
            layers,
            norm,
            lm_head: Linear {
                weight: lm_head_weight,
                bias: None,
                quant: lm_head_quant,
                lora: None,
            },
            inv_freq,
            rope_cos,
            rope_sin,
        })
    }

    /// A model with random weights (normal, std 0.02; norms at 1), for tests and benchmarks.
    pub fn random(config: Config, kind: Kind, device: Device, seed: i64) -> Result<Self> {
        tch::manual_seed(seed);
        let mut w = Weights::new();
        let c = &config;
        let (h, q, kv, ff) = (
            c.hidden_size as i64,
            (c.num_heads * c.head_dim) as i64,
            (c.num_kv_heads * c.head_dim) as i64,
            c.intermediate_size as i64,
        );
        let opts = (kind, device);
        let rand =
            |shape: &[i64]| -> Result<Tensor> { Ok(Tensor::f_randn(shape, opts)?.f_mul_scalar(0.02)?) };
        w.insert(
            "model.embed_tokens.weight".into(),
            rand(&[c.vocab_size as i64, h])?,
        );
        if !c.tie_word_embeddings {
            w.insert("lm_head.weight".into(), rand(&[c.vocab_size as i64, h])?);
        }
        w.insert("model.norm.weight".into(), Tensor::f_ones([h], opts)?);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            for (name, shape) in [
                ("self_attn.q_proj", [q, h]),
                ("self_attn.k_proj", [kv, h]),
                ("self_attn.v_proj", [kv, h]),
                ("self_attn.o_proj", [h, q]),
                ("mlp.gate_proj", [ff, h]),
                ("mlp.up_proj", [ff, h]),
                ("mlp.down_proj", [h, ff]),
            ] {
                w.insert(format!("{p}.{name}.weight"), rand(&shape)?);
            }
            w.insert(format!("{p}.input_layernorm.weight"), Tensor::f_ones([h], opts)?);
            w.insert(
                format!("{p}.post_attention_layernorm.weight"),
                Tensor::f_ones([h], opts)?,
            );
        }
        Self::from_weights(config, w)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// The dtype activations are computed and rounded in (f32 for a quantized model).
    pub fn kind(&self) -> Kind {
        self.norm.kind()
    }

    /// Whether any matrix is kept as quantized blocks.
    pub fn is_quantized(&self) -> bool {
        self.embed_quant.is_some()
            || self.lm_head.quant.is_some()
            || self
                .layers
                .iter()
                .any(|l| l.linears().iter().any(|lin| lin.quant.is_some()))
    }

    /// Bytes the weights take in memory (what a decode step reads).
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let linears = self.layers.iter().flat_map(|l| l.linears());
        let tied = self.config.tie_word_embeddings;
        bytes(&self.embed_tokens)
            + if tied { 0 } else { bytes(&self.lm_head.weight) }
            + linears.map(|l| bytes(&l.weight)).sum::<usize>()
    }

    /// A fresh cache for one sequence, bounded by the model's context.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers, self.config.max_position_embeddings)
    }

    /// All parameters with their checkpoint names (tied embeddings appear once).
    pub fn named_parameters(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), &l.input_layernorm));
            for (name, lin) in [
                ("self_attn.q_proj", &l.q_proj),
                ("self_attn.k_proj", &l.k_proj),
                ("self_attn.v_proj", &l.v_proj),
                ("self_attn.o_proj", &l.o_proj),
                ("mlp.gate_proj", &l.gate_proj),
                ("mlp.up_proj", &l.up_proj),
                ("mlp.down_proj", &l.down_proj),
            ] {
                out.push((format!("{p}.{name}.weight"), &lin.weight));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.{name}.bias"), b));
                }
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &l.post_attention_layernorm,
            ));
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), &self.lm_head.weight));
        }
        out
    }

    /// cos/sin tables for positions `start..start + len`, shaped `[1, 1, len, head_dim]` in the model's dtype.
    fn rope_tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        if start + len <= self.rope_cos.size()[2] as usize {
            let (start, len) = (start as i64, len as i64);
            return Ok((
                self.rope_cos.f_narrow(2, start, len)?,
                self.rope_sin.f_narrow(2, start, len)?,
            ));
        }
        compute_rope(&self.inv_freq, start, len, self.kind())
    }

    /// Runs the decoder over `tokens` (`[batch, t]`, i64) and returns the final hidden states `[batch, t, hidden]`.
    /// With a cache (batch 1), the tokens continue the cached sequence and their keys/values are appended.
    pub fn hidden_states(&self, tokens: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.run(tokens, cache, None)
    }

    fn run<'a>(
        &'a self,
        tokens: &Tensor,
        mut cache: Option<&mut KvCache>,
        pool: Option<&DecodePool<'a>>,
    ) -> Result<Tensor> {
        let (batch, t) = match tokens.size().as_slice() {
            &[b, t] => (b, t),
            other => {
                return Err(ModelError::InvalidRequest(format!(
                    "tokens must be [batch, time], got {other:?}"
                )));
            }
        };
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if offset + t as usize > self.config.max_position_embeddings {
            return Err(ModelError::ContextOverflow {
                prompt_tokens: offset + t as usize,
                context: self.config.max_position_embeddings,
            });
        }
        if cache.is_some() && batch != 1 {
            return Err(ModelError::InvalidRequest(
                "a KV cache holds one sequence; batch must be 1".into(),
            ));
        }
        let (cos, sin) = self.rope_tables(offset, t as usize)?;
        // Causal masking: SDPA's `is_causal` aligns the mask top-left, which is right only without history.
        let mask = if t > 1 && offset > 0 {
            let total = offset as i64 + t;
            let rows =
                Tensor::f_arange_start(offset as i64, total, (Kind::Int64, self.device()))?.f_unsqueeze(1)?;
            let cols = Tensor::f_arange(total, (Kind::Int64, self.device()))?.f_unsqueeze(0)?;
            Some(cols.f_le_tensor(&rows)?)
        } else {
            None
        };
        let is_causal = t > 1 && offset == 0;
        let attention_kind = self.attention_kind();
        let mut x = self.embed(tokens)?;
        for i in 0..self.layers.len() {
            let attention = Attention {
                cos: &cos,
                sin: &sin,
                mask: mask.as_ref(),
                is_causal,
                segments: &[],
                kind: attention_kind,
            };
            x = self.layer_forward(i, &x, &attention, cache.as_deref_mut(), pool)?;
        }
        if let Some(cache) = cache {
            cache.advance(t as usize);
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// The dtype attention runs (and a cache holds keys and values) in. libtorch's CPU attention is several times
    /// slower in bf16 than in f32 (seen: 300 us against 41 us for one decode step of SmolLM2), so bf16 models on
    /// CPU attend in f32.
    fn attention_kind(&self) -> Kind {
        if self.device() == Device::Cpu && self.kind() == Kind::BFloat16 {
            Kind::Float
        } else {
            self.kind()
        }
    }

    /// One decoder layer over `x` (`[batch, t, hidden]`), appending keys/values to `cache` when given.
    fn layer_forward<'a>(
        &'a self,
        i: usize,
        x: &Tensor,
        attention: &Attention<'_>,
        cache: Option<&mut KvCache>,
        pool: Option<&DecodePool<'a>>,
    ) -> Result<Tensor> {
        let x = self.attention_half(i, x, attention, cache, pool)?;
        let (gate, up) = self.mlp_projections(i, &x, pool)?;
        Ok(x.f_add(&self.mlp_output(i, &gate, &up, pool)?)?)
    }

    /// The attention half of layer `i` with its residual: `x + o_proj(attention(norm(x)))`.
    fn attention_half<'a>(
        &'a self,
        i: usize,
        x: &Tensor,
        attention: &Attention<'_>,
        cache: Option<&mut KvCache>,
        pool: Option<&DecodePool<'a>>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let layer = &self.layers[i];
        let (batch, t) = (x.size()[0], x.size()[1]);
        let h = rms_norm(x, &layer.input_layernorm, c.rms_norm_eps)?;
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            Ok(y.f_view([batch, t, heads as i64, c.head_dim as i64])?
                .f_transpose(1, 2)?)
        };
        let [q, k, v] = project_all(pool, &h, [&layer.q_proj, &layer.k_proj, &layer.v_proj])?;
        let q = apply_rope(&split(q, c.num_heads)?, attention.cos, attention.sin)?;
        let k = apply_rope(&split(k, c.num_kv_heads)?, attention.cos, attention.sin)?;
        let v = split(v, c.num_kv_heads)?;
        let (q, k, v) = (
            q.f_to_kind(attention.kind)?,
            k.f_to_kind(attention.kind)?,
            v.f_to_kind(attention.kind)?,
        );
        let (k, v, cache) = match cache {
            Some(cache) => {
                let (k, v) = cache.append(i, &k, &v)?;
                (k, v, Some(&*cache))
            }
            None => (k, v, None),
        };
        let gqa = c.num_heads != c.num_kv_heads;
        let attn = if let Some(cache) = cache.filter(|_| t == 1 && batch == 1) {
            attend_cached(&q, cache, i, &k, &v)?
        } else if !attention.segments.is_empty() {
            attend_segments(&q, &k, &v, attention.segments, gqa)?
        } else {
            Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                attention.mask,
                0.0,
                attention.is_causal,
                None,
                gqa,
            )?
        };
        let attn = attn.f_to_kind(self.kind())?.f_transpose(1, 2)?.f_reshape([
            batch,
            t,
            (c.num_heads * c.head_dim) as i64,
        ])?;
        Ok(x.f_add(&project(pool, &attn, &layer.o_proj)?)?)
    }

    /// The MLP's gate and up projections of `norm(x)`.
    fn mlp_projections<'a>(
        &'a self,
        i: usize,
        x: &Tensor,
        pool: Option<&DecodePool<'a>>,
    ) -> Result<(Tensor, Tensor)> {
        let layer = &self.layers[i];
        let [gate, up] = project_all(pool, &self.mlp_norm(i, x)?, [&layer.gate_proj, &layer.up_proj])?;
        Ok((gate, up))
    }

    /// `down_proj(silu(gate) * up)`.
    fn mlp_output<'a>(
        &'a self,
        i: usize,
        gate: &Tensor,
        up: &Tensor,
        pool: Option<&DecodePool<'a>>,
    ) -> Result<Tensor> {
        project(pool, &gate.f_silu()?.f_mul(up)?, &self.layers[i].down_proj)
    }

    /// Logits `[batch, t, vocab]` in f32 for every position.
    pub fn forward(&self, tokens: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.hidden_states(tokens, cache)?;
        Ok(self.lm_head.forward(&h)?.f_to_kind(Kind::Float)?)
    }

    /// Logits `[vocab]` in f32 of the last position only: what generation needs, without the full vocabulary
    /// projection of every prompt position.
    pub fn forward_last(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        self.forward_last_in(tokens, cache, None)
    }

    /// [`Llama::forward_last`] with single-token projections on a [`DecodePool`] (CPU decoding), and whole prompts
    /// too when the matrices are quantized blocks (the pool's kernels compute on them; libtorch's GEMM, faster for
    /// dense prompts, would need them dequantized).
    pub fn forward_last_in<'a>(
        &'a self,
        tokens: &[u32],
        cache: &mut KvCache,
        pool: Option<&DecodePool<'a>>,
    ) -> Result<Tensor> {
        if let Some(pool) = pool
            && (tokens.len() == 1 || self.is_quantized())
            && let Some(logits) = self.cpu_step(&[tokens], &mut [&mut *cache], pool, &[])?
        {
            return Ok(Tensor::f_from_slice(&logits)?);
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let input = Tensor::f_from_slice(&ids)?
            .f_to_device(self.device())?
            .f_unsqueeze(0)?;
        let h = self.run(&input, Some(cache), pool)?;
        let last = h.f_select(1, -1)?.f_select(0, 0)?;
        Ok(project(pool, &last, &self.lm_head)?.f_to_kind(Kind::Float)?)
    }
}
