//! Model configuration: HF `config.json` (serde) or GGUF metadata, both resolved into one [`Config`].

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value};

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF `linear`).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (HF `llama3`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Everything the LLaMA forward pass needs to know, whatever file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl Config {
    /// Checks the relations between sizes that the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(ModelError::Unsupported(msg));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 || self.hidden_size == 0 {
            return bad("config has zero heads, layers or hidden size".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dimension {} is odd; RoPE needs pairs",
                self.head_dim
            ));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 {
            return bad("config has an empty vocabulary or zero context length".into());
        }
        Ok(())
    }

    /// A small LLaMA for tests and examples.
    pub fn tiny(num_heads: usize, num_kv_heads: usize, tie_word_embeddings: bool) -> Self {
        Config {
            vocab_size: 97,
            hidden_size: 16 * num_heads,
            intermediate_size: 40 * num_heads,
            num_layers: 2,
            num_heads,
            num_kv_heads,
            head_dim: 16,
            max_position_embeddings: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            tie_word_embeddings,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize, Default)]
struct HfRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

/// The fields of an HF `config.json` that LLaMA-family models use.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRope>,
    rope_parameters: Option<HfRope>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<u32>,
}

fn rope_scaling_from(rope: Option<&HfRope>) -> Result<RopeScaling> {
    let Some(rope) = rope else {
        return Ok(RopeScaling::None);
    };
    let kind = rope
        .rope_type
        .as_deref()
        .or(rope.legacy_type.as_deref())
        .unwrap_or("default");
    let factor = || {
        rope.factor
            .ok_or_else(|| ModelError::Unsupported(format!("rope scaling {kind} without a factor")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: rope.low_freq_factor.unwrap_or(1.0),
            high_freq_factor: rope.high_freq_factor.unwrap_or(4.0),
            original_max_position_embeddings: rope.original_max_position_embeddings.unwrap_or(8192.0),
        }),
        other => Err(ModelError::Unsupported(format!(
            "rope scaling type {other:?} (supported: default, linear, llama3)"
        ))),
    }
}

impl Config {
    /// Reads an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_hf_str(&text).map_err(|e| match e {
            ModelError::Malformed { what, detail, .. } => ModelError::malformed(path, what, detail),
            other => other,
        })
    }

    pub fn from_hf_str(text: &str) -> Result<Self> {
        let raw: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ModelError::malformed("config.json", "JSON", e.to_string()))?;
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("<missing>");
        if !matches!(model_type, "llama" | "mistral") {
            return Err(ModelError::Unsupported(format!(
                "architecture {model_type:?} (camelid runs the LLaMA family: model_type llama or mistral)"
            )));
        }
        let hf: HfConfig = serde_json::from_value(raw)
            .map_err(|e| ModelError::malformed("config.json", "model config", e.to_string()))?;
        if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(ModelError::Unsupported(format!(
                "activation {act:?} (LLaMA uses silu)"
            )));
        }
        let max_pos = hf.max_position_embeddings.unwrap_or(2048);
        if let Some(window) = hf.sliding_window.filter(|&w| w < max_pos) {
            return Err(ModelError::Unsupported(format!(
                "{} with a sliding attention window of {window} tokens",
                hf.model_type.as_deref().unwrap_or("model")
            )));
        }
        let rope = hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref());
        let rope_theta = hf
            .rope_theta
            .or(rope.and_then(|r| r.rope_theta))
            .unwrap_or(10000.0);
        let eos_token_ids = match hf.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => vec![],
        };
        let cfg = Config {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            max_position_embeddings: max_pos,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling: rope_scaling_from(rope)?,
            tie_word_embeddings: hf.tie_word_embeddings,
            attention_bias: hf.attention_bias,
            mlp_bias: hf.mlp_bias,
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
            pad_token_id: hf.pad_token_id,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The HF `config.json` of this model (`LlamaForCausalLM`), as exports write it.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let rope_scaling = match self.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings as u64,
            }),
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => serde_json::Value::Null,
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        })
    }

    /// Reads the `llama.*` metadata of a GGUF file; `tie_word_embeddings` is true when it has no `output.weight`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file
            .get("general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("<missing>");
        if arch != "llama" {
            return Err(ModelError::Unsupported(format!(
                "GGUF architecture {arch:?} (camelid runs the LLaMA family: general.architecture llama)"
            )));
        }
        let path = file.path();
        let get = |key: &str| file.get(&format!("llama.{key}"));
        let req = |key: &str| {
            get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| {
                    ModelError::malformed(
                        path,
                        "GGUF metadata",
                        format!("missing or non-integer llama.{key}"),
                    )
                })
        };
        let token_count = file
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(<[Value]>::len);
        let vocab_size = get("vocab_size")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .or(token_count)
            .ok_or_else(|| {
                ModelError::malformed(
                    path,
                    "GGUF metadata",
                    "no llama.vocab_size and no tokenizer.ggml.tokens",
                )
            })?;
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        let head_dim = get("attention.key_length")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(hidden_size / num_heads.max(1));
        let scaling_type = get("rope.scaling.type").and_then(Value::as_str).unwrap_or("none");
        let rope_scaling = match scaling_type {
            "none" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: get("rope.scaling.factor").and_then(Value::as_f64).unwrap_or(1.0),
            },
            other => {
                return Err(ModelError::Unsupported(format!(
                    "GGUF rope scaling type {other:?}"
                )));
            }
        };
        let token_id = |key: &str| file.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let cfg = Config {
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_layers: req("block_count")?,
            num_heads,
            num_kv_heads: get("attention.head_count_kv")
                .and_then(Value::as_u64)
                .map_or(num_heads, |v| v as usize),
            head_dim,
            max_position_embeddings: req("context_length")?,
            rms_norm_eps: get("attention.layer_norm_rms_epsilon")
                .and_then(Value::as_f64)
                .unwrap_or(1e-5),
            rope_theta: get("rope.freq_base").and_then(Value::as_f64).unwrap_or(10000.0),
            rope_scaling,
            tie_word_embeddings: !file.tensors.iter().any(|t| t.name == "output.weight"),
            attention_bias: file.tensors.iter().any(|t| t.name == "blk.0.attn_q.bias"),
            mlp_bias: false,
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            pad_token_id: token_id("tokenizer.ggml.padding_token_id"),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL_LIKE: &str = r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 100000.0,
        "rope_type": "default"}, "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": [2, 0],
        "hidden_act": "silu"}"#;

    #[test]
    fn hf_config_resolves_gqa_head_dim_and_rope_parameters() {
        let c = Config::from_hf_str(SMOL_LIKE).unwrap();
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![2, 0]);
    }

    #[test]
    fn llama3_rope_scaling_is_read_from_legacy_field() {
        let text = SMOL_LIKE.replace(
            r#""rope_parameters": {"rope_theta": 100000.0,
        "rope_type": "default"}"#,
            r#""rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        );
        let c = Config::from_hf_str(&text).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn other_architectures_and_bad_shapes_are_clear_errors() {
        let gpt2 = SMOL_LIKE.replace("\"llama\"", "\"gpt2\"");
        let err = Config::from_hf_str(&gpt2).unwrap_err().to_string();
        assert!(err.contains("\"gpt2\"") && err.contains("LLaMA"), "{err}");
        let bad_gqa = SMOL_LIKE.replace("\"num_key_value_heads\": 3", "\"num_key_value_heads\": 4");
        assert!(
            Config::from_hf_str(&bad_gqa)
                .unwrap_err()
                .to_string()
                .contains("multiple")
        );
        let missing = SMOL_LIKE.replace("\"hidden_size\": 576,", "");
        let err = Config::from_hf_str(&missing).unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
        let yarn = SMOL_LIKE.replace("\"default\"", "\"yarn\"");
        assert!(
            Config::from_hf_str(&yarn)
                .unwrap_err()
                .to_string()
                .contains("yarn")
        );
    }
}
