//! Writing a loaded model as a GGUF file with quantized matrices (`camelid quantize`), in the layout llama.cpp
//! reads: llama.* hyperparameters, the byte-level BPE vocabulary as `tokenizer.ggml.*`, the chat template, and
//! the tensors under GGML names with Q/K rows permuted as llama.cpp's converter does.
//!
//! A fine-tune the trainer exported (an HF directory) can so be served quantized by camelid, llama.cpp or any
//! GGUF runtime.

use std::path::Path;

use serde_json::Value as Json;
use tch::{Kind, Tensor};

use crate::config::RopeScaling;
use crate::error::{ModelError, Result};
use crate::gguf::Value;
use crate::gguf::writer::{RawTensor, to_bytes};
use crate::quant::GgmlType;
use crate::quantize::quantize;
use crate::template::{ChatTemplate, VICUNA_JINJA};
use crate::weights::{FIXED_NAMES, LAYER_MODULES};
use crate::{LoadedModel, tokenizer};

/// What [`write_quantized_gguf`] wrote: each tensor's type, and the file's size.
#[derive(Debug, Default)]
pub struct QuantizeReport {
    pub tensors: Vec<(String, GgmlType)>,
    pub bytes: u64,
}

/// The type a matrix of `cols` columns gets when `ty` was asked for: `ty` when the row is a whole number of its
/// blocks, else the nearest 32-value type (a K-quant's 256-value blocks do not divide SmolLM2's 576 columns;
/// llama.cpp's quantizer falls back the same way).
pub fn matrix_type(ty: GgmlType, cols: usize) -> GgmlType {
    let fits = |t: GgmlType| cols.is_multiple_of(t.block().0 as usize);
    if fits(ty) {
        return ty;
    }
    let fallback = match ty {
        GgmlType::Q6K | GgmlType::Q5K => GgmlType::Q8_0,
        _ => GgmlType::Q4_1,
    };
    if fits(fallback) { fallback } else { GgmlType::F32 }
}

/// Writes `model` to `path` as GGUF, its matrices quantized to `ty` (see [`matrix_type`]) and everything else in
/// f32. The file is written whole to a temporary name first, so a failure leaves no partial file.
pub fn write_quantized_gguf(model: &LoadedModel, ty: GgmlType, path: &Path) -> Result<QuantizeReport> {
    if model.model.is_quantized() {
        return Err(ModelError::Unsupported(
            "the source model was loaded quantized; load it with --dtype f32 to requantize".into(),
        ));
    }
    let mut metadata = hyperparameters(model)?;
    metadata.extend(tokenizer_metadata(model)?);
    let mut report = QuantizeReport::default();
    let mut tensors = Vec::new();
    for (name, t) in model.model.named_parameters() {
        let (gguf, t) = gguf_tensor(model, &name, t)?;
        let size = t.size();
        let values = Vec::<f32>::try_from(t.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)?;
        let cols = *size.last().unwrap_or(&1) as usize;
        let tensor_ty = if size.len() == 2 {
            matrix_type(ty, cols)
        } else {
            GgmlType::F32
        };
        let data = quantize(tensor_ty, &values).map_err(|detail| ModelError::Tensor {
            path: path.into(),
            name: name.clone(),
            detail,
        })?;
        report.tensors.push((gguf.clone(), tensor_ty));
        tensors.push(RawTensor {
            name: gguf,
            dims: size.iter().rev().map(|&d| d as u64).collect(),
            ggml_type: tensor_ty,
            data,
        });
    }
    let bytes = to_bytes(&metadata, &tensors);
    report.bytes = bytes.len() as u64;
    let partial = path.with_extension("gguf.partial");
    std::fs::write(&partial, &bytes).map_err(|e| ModelError::io(&partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| ModelError::io(path, e))?;
    Ok(report)
}

fn string(s: impl Into<String>) -> Value {
    Value::String(s.into())
}

fn u32_of(v: usize) -> Value {
    Value::U32(v as u32)
}

/// `general.*` and `llama.*`: the inverse of `Config::from_gguf`.
fn hyperparameters(model: &LoadedModel) -> Result<Vec<(String, Value)>> {
    let c = model.model.config();
    let name = model
        .source
        .file_stem()
        .map_or("camelid".into(), |s| s.to_string_lossy().into_owned());
    let mut out = vec![
        ("general.architecture".into(), string("llama")),
        ("general.name".into(), string(name)),
        ("llama.vocab_size".into(), u32_of(c.vocab_size)),
        ("llama.context_length".into(), u32_of(c.max_position_embeddings)),
        ("llama.embedding_length".into(), u32_of(c.hidden_size)),
        ("llama.block_count".into(), u32_of(c.num_layers)),
        ("llama.feed_forward_length".into(), u32_of(c.intermediate_size)),
        ("llama.attention.head_count".into(), u32_of(c.num_heads)),
        ("llama.attention.head_count_kv".into(), u32_of(c.num_kv_heads)),
        ("llama.attention.key_length".into(), u32_of(c.head_dim)),
        ("llama.attention.value_length".into(), u32_of(c.head_dim)),
        ("llama.rope.dimension_count".into(), u32_of(c.head_dim)),
        ("llama.rope.freq_base".into(), Value::F32(c.rope_theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
    ];
    match c.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            out.push(("llama.rope.scaling.type".into(), string("linear")));
            out.push(("llama.rope.scaling.factor".into(), Value::F32(factor as f32)));
        }
        RopeScaling::Llama3 { .. } => {
            return Err(ModelError::Unsupported(
                "writing GGUF for Llama 3 RoPE scaling (rope_freqs) is not supported yet".into(),
            ));
        }
    }
    if c.attention_bias || c.mlp_bias {
        return Err(ModelError::Unsupported(
            "llama.cpp's LLaMA graph has no projection biases; this model has some".into(),
        ));
    }
    Ok(out)
}

/// `tokenizer.ggml.*` for a byte-level BPE vocabulary (SmolLM, Llama 3, Qwen and GPT-2 style), and the chat
/// template.
fn tokenizer_metadata(model: &LoadedModel) -> Result<Vec<(String, Value)>> {
    let json = model.tokenizer.to_json()?;
    let bpe = json["model"]["type"] == "BPE" && json["decoder"]["type"] == "ByteLevel";
    if !bpe {
        return Err(ModelError::Unsupported(
            "writing GGUF for a vocabulary other than byte-level BPE (SentencePiece needs scores) is not supported \
             yet"
            .into(),
        ));
    }
    let vocab_size = model.model.config().vocab_size;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: u64, text: &str, kind: i32| {
        if let Some(slot) = usize::try_from(id).ok().and_then(|id| tokens.get_mut(id)) {
            *slot = Some((text.to_string(), kind));
        }
    };
    for (text, id) in json["model"]["vocab"].as_object().into_iter().flatten() {
        put(id.as_u64().unwrap_or(u64::MAX), text, 1);
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let kind = if added["special"] == true { 3 } else { 4 };
        put(
            added["id"].as_u64().unwrap_or(u64::MAX),
            added["content"].as_str().unwrap_or_default(),
            kind,
        );
    }
    // Ids the vocabulary leaves unused (a padded embedding) get placeholder tokens, as llama.cpp's converter does.
    let (texts, kinds): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            let (text, kind) = t.unwrap_or_else(|| (format!("[PAD{id}]"), 5));
            (string(text), Value::I32(kind))
        })
        .unzip();
    let merges: Vec<Value> = json["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(string(s.as_str())),
            Json::Array(pair) => Some(string(format!(
                "{} {}",
                pair.first()?.as_str()?,
                pair.get(1)?.as_str()?
            ))),
            _ => None,
        })
        .collect();
    let c = model.model.config();
    let mut out = vec![
        ("tokenizer.ggml.model".into(), string("gpt2")),
        (
            "tokenizer.ggml.pre".into(),
            string(tokenizer::pre_tokenizer_name(&json["pre_tokenizer"])),
        ),
        ("tokenizer.ggml.tokens".into(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".into(), Value::Array(kinds)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(model.prompt_bos.is_some()),
        ),
    ];
    let ids = [
        ("bos", c.bos_token_id),
        ("eos", c.eos_token_ids.first().copied()),
        ("padding", c.pad_token_id),
    ];
    for (key, id) in ids {
        if let Some(id) = id {
            out.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id)));
        }
    }
    let template = match &model.template {
        ChatTemplate::Vicuna => VICUNA_JINJA.to_string(),
        ChatTemplate::Jinja { source, .. } => source.clone(),
    };
    out.push(("tokenizer.chat_template".into(), string(template)));
    Ok(out)
}

/// The GGML name of an HF parameter and its values as llama.cpp stores them (Q/K rows permuted).
fn gguf_tensor(model: &LoadedModel, name: &str, t: &Tensor) -> Result<(String, Tensor)> {
    let unknown = || ModelError::Unsupported(format!("no GGUF name for tensor {name}"));
    let gguf = gguf_name(name).ok_or_else(unknown)?;
    let c = model.model.config();
    let t = if name.ends_with("self_attn.q_proj.weight") {
        permute_rows(t, c.num_heads)?
    } else if name.ends_with("self_attn.k_proj.weight") {
        permute_rows(t, c.num_kv_heads)?
    } else {
        t.f_detach()?
    };
    Ok((gguf, t))
}

/// llama.cpp's `permute` of Q/K rows (each head's two RoPE halves interleaved): the inverse of
/// [`crate::weights::unpermute_rows`].
fn permute_rows(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let shape = t.size();
    let head = shape[0] / n_heads as i64;
    let mut split = vec![n_heads as i64, 2, head / 2];
    split.extend(&shape[1..]);
    Ok(t.f_detach()?
        .f_reshape(&split)?
        .f_transpose(1, 2)?
        .f_contiguous()?
        .f_reshape(&shape)?)
}

/// The GGML name of an HF LLaMA parameter: the loader's mapping read the other way.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((gguf, _)) = FIXED_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(gguf.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = suffix.rsplit_once('.')?;
    let (gguf, _) = LAYER_MODULES.iter().find(|(_, h)| *h == module)?;
    Some(format!("blk.{layer}.{gguf}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::unpermute_rows;

    #[test]
    fn names_and_permutation_invert_the_loader() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.3.self_attn.k_proj.weight",
            "model.layers.11.mlp.down_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
        ] {
            let gguf = gguf_name(hf).unwrap();
            assert_eq!(crate::weights::hf_name(&gguf).as_deref(), Some(hf), "{gguf}");
        }
        assert_eq!(gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq"), None);
        let t = Tensor::arange(4 * 8 * 3, (Kind::Float, tch::Device::Cpu)).reshape([32, 3]);
        assert!(
            unpermute_rows(&permute_rows(&t, 4).unwrap(), 4)
                .unwrap()
                .equal(&t)
        );
    }

    #[test]
    fn k_quants_fall_back_where_rows_are_not_whole_blocks() {
        assert_eq!(matrix_type(GgmlType::Q4K, 1536), GgmlType::Q4K);
        assert_eq!(matrix_type(GgmlType::Q4K, 576), GgmlType::Q4_1);
        assert_eq!(matrix_type(GgmlType::Q6K, 576), GgmlType::Q8_0);
        assert_eq!(matrix_type(GgmlType::Q8_0, 100), GgmlType::F32);
    }
}
