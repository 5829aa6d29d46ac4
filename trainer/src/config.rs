//! Training settings: Vicuna's defaults, overridden by a YAML/JSON config file, overridden by flags. The part
//! that decides the math (and the data file's checksum) is hashed into every checkpoint, so a resume with other
//! settings is refused instead of silently training a different run.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 compute with f32 master weights on GPU, f32 on CPU.
    Auto,
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
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
        match c {
            Checkpointing::Full => "full",
            Checkpointing::Selective => "selective",
            Checkpointing::None => "none",
        }
        .into()
    }
}

/// `activation_checkpointing` in a config file: `full`/`selective`/`none`, or a boolean.
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

/// Every training setting; each is a `train` flag of the same name (with dashes) and a config-file field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub checkpoint_dir: Option<PathBuf>,
    pub epochs: f64,
    pub max_steps: Option<u64>,
    pub seq_len: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub checkpoint_every: u64,
    /// Complete checkpoints kept; 0 keeps only the newest while training and deletes it after the export.
    pub keep_checkpoints: usize,
    pub activation_checkpointing: Checkpointing,
    pub group_by_length: bool,
    pub precision: Precision,
    pub device: DeviceChoice,
    /// `vicuna_v1.1`, or unset for the model's own template (vicuna_v1.1 when it has none).
    pub template: Option<String>,
    pub min_turn_chars: usize,
    pub blocklist: Vec<String>,
    /// dtype of the exported weights: `f32` or `bf16`.
    pub export_dtype: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        // Vicuna's recipe (FastChat train_vicuna_7b.sh): lr 2e-5, 3 epochs, global batch 128, warmup 0.03,
        // weight decay 0, cosine schedule, max length 2048.
        Self {
            model: None,
            data: None,
            output: None,
            checkpoint_dir: None,
            epochs: 3.0,
            max_steps: None,
            seq_len: 2048,
            micro_batch: 4,
            grad_accum: 32,
            lr: 2e-5,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            activation_checkpointing: Checkpointing::Full,
            group_by_length: true,
            precision: Precision::Auto,
            device: DeviceChoice::Auto,
            template: None,
            min_turn_chars: 0,
            blocklist: Vec::new(),
            export_dtype: "f32".into(),
        }
    }
}

impl TrainConfig {
    /// Reads a YAML or JSON config file (JSON is YAML); unknown fields are errors that name the field.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_yaml_ng::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks ranges; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("seq-len", self.seq_len),
            ("micro-batch", self.micro_batch),
            ("grad-accum", self.grad_accum),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("--{name} must be at least 1"));
            }
        }
        if self.seq_len < 16 {
            return Err("--seq-len must be at least 16 tokens".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(format!("--lr must be a positive number, got {}", self.lr));
        }
        if !(self.epochs > 0.0 && self.epochs.is_finite()) && self.max_steps.is_none() {
            return Err(format!("--epochs must be positive, got {}", self.epochs));
        }
        if self.max_steps == Some(0) {
            return Err("--max-steps must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(format!(
                "warmup_ratio must be in [0, 1), got {}",
                self.warmup_ratio
            ));
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return Err("adam betas must be in [0, 1)".into());
        }
        if self.checkpoint_every == 0 {
            return Err("--checkpoint-every must be at least 1".into());
        }
        if !matches!(self.export_dtype.as_str(), "f32" | "bf16") {
            return Err(format!(
                "export_dtype must be f32 or bf16, got {:?}",
                self.export_dtype
            ));
        }
        if let Some(t) = &self.template
            && camelid_model::ChatTemplate::named(t).is_none()
        {
            return Err(format!(
                "unknown template {t:?} (known: vicuna_v1.1; leave unset for the model's own)"
            ));
        }
        Ok(())
    }

    /// The settings that decide what is computed, as hashed into checkpoints (paths, checkpoint cadence and
    /// reporting are left out: they may change between a run and its resume).
    pub fn identity(&self, data_sha256: &str) -> serde_json::Value {
        serde_json::json!({
            "data_sha256": data_sha256,
            "epochs": self.epochs, "max_steps": self.max_steps, "seq_len": self.seq_len,
            "micro_batch": self.micro_batch, "grad_accum": self.grad_accum, "lr": self.lr,
            "warmup_ratio": self.warmup_ratio, "weight_decay": self.weight_decay,
            "adam_beta1": self.adam_beta1, "adam_beta2": self.adam_beta2, "adam_eps": self.adam_eps,
            "max_grad_norm": self.max_grad_norm, "seed": self.seed, "group_by_length": self.group_by_length,
            "precision": self.precision, "template": self.template, "min_turn_chars": self.min_turn_chars,
            "blocklist": self.blocklist,
        })
    }
}

/// Hex SHA-256 of a JSON value's canonical text (serde_json keeps object keys sorted).
pub fn hash_json(value: &serde_json::Value) -> String {
    let digest = Sha256::digest(value.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a file's bytes.
pub fn hash_file(path: &Path) -> Result<String, std::io::Error> {
    let bytes = std::fs::read(path)?;
    let digest = Sha256::digest(&bytes);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Names the settings that differ between two identities, for the resume error.
pub fn differences(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => a
            .iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "{k}: checkpoint {v}, now {}",
                    b.get(k).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_files_override_defaults_and_reject_unknown_fields() {
        let dir = std::env::temp_dir().join(format!("camelid-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("train.yaml");
        std::fs::write(
            &path,
            "lr: 1.0e-4\nseq_len: 512\nblocklist: [openai]\nactivation_checkpointing: false\n",
        )
        .unwrap();
        let cfg = TrainConfig::from_file(&path).unwrap();
        assert_eq!(cfg.activation_checkpointing, Checkpointing::None);
        std::fs::write(&path, "activation_checkpointing: selective\n").unwrap();
        let selective = TrainConfig::from_file(&path).unwrap();
        assert_eq!(selective.activation_checkpointing, Checkpointing::Selective);
        assert_eq!((cfg.lr, cfg.seq_len, cfg.grad_accum), (1e-4, 512, 32));
        assert_eq!(cfg.blocklist, ["openai"]);
        std::fs::write(&path, "{\"learning_rate\": 1}").unwrap();
        let err = TrainConfig::from_file(&path).unwrap_err();
        assert!(err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn identity_changes_name_the_setting() {
        let a = TrainConfig::default();
        let b = TrainConfig {
            lr: 1e-3,
            ..a.clone()
        };
        let (ia, ib) = (a.identity("x"), b.identity("x"));
        assert_ne!(hash_json(&ia), hash_json(&ib));
        assert_eq!(differences(&ia, &ib), ["lr: checkpoint 0.00002, now 0.001"]);
        let c = TrainConfig {
            checkpoint_every: 7,
            keep_checkpoints: 9,
            ..a.clone()
        };
        assert_eq!(hash_json(&ia), hash_json(&c.identity("x")));
        assert!(
            TrainConfig { seq_len: 0, ..a }
                .validate()
                .unwrap_err()
                .contains("--seq-len")
        );
    }
}
