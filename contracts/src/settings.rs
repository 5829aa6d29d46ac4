//! The trainer's settings, defined once. The operator fills them from a FineTuneJob and writes them as flags
//! ([`TrainerSettings::to_args`]); the trainer parses the same struct from its flags (clap, feature `clap`) and from
//! a YAML/JSON config file (serde). Each setting has one name: the field `max_length` is the CRD's and the config
//! file's `maxLength` and the flag `--max-length`. Settings the CRD nests under `checkpoints` carry that word in
//! front (`checkpoints.intervalSteps` → `checkpointIntervalSteps`).
//!
//! Every field is optional: unset means "the next layer decides" (flag over file over Vicuna's defaults, which the
//! trainer owns and lays the layers over).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 compute with f32 master weights on GPU, f32 on CPU.
    Auto,
    F32,
    Bf16,
}

/// Where the trainer computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when a GPU is visible, else CPU.
    Auto,
    Cpu,
    Cuda,
}

/// The dtype of the exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    F32,
    Bf16,
}

impl ExportDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportDtype::F32 => "f32",
            ExportDtype::Bf16 => "bf16",
        }
    }
}

/// What a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every weight (Vicuna's recipe).
    Full,
    /// LoRA adapters on a frozen base; the run outputs a PEFT adapter.
    Lora,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Lora => "lora",
        }
    }
}

/// What the backward pass recomputes instead of keeping from the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CheckpointingSetting", into = "String")]
pub enum Checkpointing {
    /// Keep only each decoder layer's input and recompute the layer in backward (least memory).
    Full,
    /// Also keep each layer's MLP gate and up projections, so recomputation skips the two largest matmuls:
    /// about half the recompute for `2 x intermediate_size` more values per token and layer.
    Selective,
    /// Keep every activation.
    None,
}

impl Checkpointing {
    pub fn as_str(self) -> &'static str {
        match self {
            Checkpointing::Full => "full",
            Checkpointing::Selective => "selective",
            Checkpointing::None => "none",
        }
    }
}

impl std::str::FromStr for Checkpointing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" | "true" | "on" => Ok(Self::Full),
            "selective" => Ok(Self::Selective),
            "none" | "false" | "off" => Ok(Self::None),
            other => Err(format!(
                "activation checkpointing {other:?}: expected full, selective or none"
            )),
        }
    }
}

impl From<Checkpointing> for String {
    fn from(c: Checkpointing) -> String {
        c.as_str().into()
    }
}

/// `activationCheckpointing` in a config file: `full`/`selective`/`none`, or a boolean.
#[derive(Deserialize)]
#[serde(untagged)]
enum CheckpointingSetting {
    Bool(bool),
    Name(String),
}

impl TryFrom<CheckpointingSetting> for Checkpointing {
    type Error = String;

    fn try_from(v: CheckpointingSetting) -> Result<Self, String> {
        match v {
            CheckpointingSetting::Bool(true) => Ok(Self::Full),
            CheckpointingSetting::Bool(false) => Ok(Self::None),
            CheckpointingSetting::Name(name) => name.parse(),
        }
    }
}

/// Every training setting, each optional. Doc comments are the flags' help.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainerSettings {
    /// HF directory or .gguf file (default: SmolLM2-135M-Instruct from the project's .venv).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// ShareGPT or OpenAI-style conversations, JSON or JSONL.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Where the exported model, data report and metrics go.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    /// Checkpoint folders (default: OUTPUT/checkpoints).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Passes over the data (default 3); ignored when maxSteps is set.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<f64>,
    /// Train exactly N optimizer steps; the schedule is computed from N.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Tokens per sequence; longer conversations are truncated (default 2048).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// Sequences per forward pass on one rank.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
    /// Micro-batches per optimizer step on one rank.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_accum: Option<usize>,
    /// Peak learning rate of the cosine schedule (default 2e-5).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Share of the steps spent warming the learning rate up (default 0.03).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// AdamW's decoupled weight decay (default 0).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adam_beta1: Option<f64>,
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adam_beta2: Option<f64>,
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adam_eps: Option<f64>,
    /// Gradients are clipped to this norm (default 1).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// Seeds data order and sampling; the same seed and data give the same run.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Optimizer steps between checkpoints.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval_steps: Option<u64>,
    /// Complete checkpoints kept; 0 keeps only the newest while training and deletes it after the export.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_keep: Option<usize>,
    /// What backward recomputes: `full` (each decoder layer; least memory), `selective` (each layer but its
    /// MLP gate/up projections), or `none`. `true`/`false` mean full/none.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_checkpointing: Option<Checkpointing>,
    /// Batch conversations of similar length together (less padding).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_by_length: Option<bool>,
    /// Put each micro-batch's conversations back to back in one row, attention kept within each, instead of
    /// padding them to the longest (default true): the same loss without computing padding.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packing: Option<bool>,
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
    /// `vicuna_v1.1`, or leave unset for the model's own chat template.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Conversations with a turn shorter than this many characters are dropped.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_turn_chars: Option<usize>,
    /// A phrase whose conversations are dropped (repeatable).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocklist: Vec<String>,
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_dtype: Option<ExportDtype>,
    /// `full` (every weight) or `lora` (adapters on a frozen base; outputs a PEFT adapter).
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// LoRA rank (default 16).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<usize>,
    /// LoRA alpha: the adapter's product is scaled by alpha / rank (default 32).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapters' inputs while training (default 0.05).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// Projections that get adapters: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or
    /// all-linear (repeatable; default all-linear).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora_target_modules: Vec<String>,
    /// LoRA: also write the base with the adapter merged in, as a full HF directory under OUTPUT/merged.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_merge: Option<bool>,
}

impl TrainerSettings {
    /// The settings as `--flag value` arguments, one pair per set setting (repeated for lists), named after the
    /// fields as clap names them: `max_length` → `--max-length`. Fails only for a path that is not UTF-8.
    pub fn to_args(&self) -> Result<Vec<String>, serde_json::Error> {
        crate::flags::to_args(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_carry_the_crd_names_in_kebab_case() {
        let s = TrainerSettings {
            learning_rate: Some(2e-5),
            max_length: Some(512),
            checkpoint_interval_steps: Some(200),
            device: Some(Device::Cuda),
            blocklist: vec!["a".into(), "b c".into()],
            ..TrainerSettings::default()
        };
        let args = s.to_args().unwrap();
        let pairs: Vec<(&str, &str)> = args.chunks(2).map(|p| (p[0].as_str(), p[1].as_str())).collect();
        assert!(pairs.contains(&("--learning-rate", "0.00002")), "{pairs:?}");
        assert!(pairs.contains(&("--max-length", "512")));
        assert!(pairs.contains(&("--checkpoint-interval-steps", "200")));
        assert!(pairs.contains(&("--device", "cuda")));
        assert_eq!(pairs.iter().filter(|p| p.0 == "--blocklist").count(), 2);
        assert!(pairs.contains(&("--blocklist", "b c")));
    }

    #[test]
    fn config_files_use_the_same_names_and_unknown_ones_are_named() {
        let s: TrainerSettings = serde_json::from_str(
            r#"{"learningRate": 1e-4, "maxLength": 128, "activationCheckpointing": false}"#,
        )
        .unwrap();
        assert_eq!(s.activation_checkpointing, Some(Checkpointing::None));
        assert_eq!((s.learning_rate, s.max_length), (Some(1e-4), Some(128)));
        let err = serde_json::from_str::<TrainerSettings>(r#"{"lr": 1}"#).unwrap_err();
        assert!(err.to_string().contains("`lr`"), "{err}");
    }
}
