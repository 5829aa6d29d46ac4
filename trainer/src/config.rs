//! Training settings resolved: Vicuna's defaults, overridden by a YAML/JSON config file, overridden by flags (both
//! parsed into [`TrainerSettings`], the contract the operator writes). The part that decides the math (and the data
//! file's checksum) is hashed into every checkpoint, so a resume with other settings is refused instead of silently
//! training a different run.

use std::path::{Path, PathBuf};

use camelid_contracts::TrainerSettings;
pub use camelid_contracts::settings::{Checkpointing, Device, ExportDtype, Method, Precision};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Every training setting with its value decided; the fields are [`TrainerSettings`]'s, so each is a `train` flag
/// and a config-file field of the same name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainConfig {
    pub model: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub checkpoint_dir: Option<PathBuf>,
    pub epochs: f64,
    pub max_steps: Option<u64>,
    pub max_length: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub checkpoint_interval_steps: u64,
    /// Complete checkpoints kept; 0 keeps only the newest while training and deletes it after the export.
    pub checkpoint_keep: usize,
    pub activation_checkpointing: Checkpointing,
    pub group_by_length: bool,
    /// A micro-batch's samples back to back in one row, without padding (see `data::batching`).
    pub packing: bool,
    pub precision: Precision,
    pub device: Device,
    /// `vicuna_v1.1`, or unset for the model's own template (vicuna_v1.1 when it has none).
    pub template: Option<String>,
    pub min_turn_chars: usize,
    pub blocklist: Vec<String>,
    /// dtype of the exported weights: `f32` or `bf16`.
    pub export_dtype: ExportDtype,
    pub method: Method,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_target_modules: Vec<String>,
    pub lora_merge: bool,
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
            max_length: 2048,
            micro_batch: 4,
            grad_accum: 32,
            learning_rate: 2e-5,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            checkpoint_interval_steps: 100,
            checkpoint_keep: 2,
            activation_checkpointing: Checkpointing::Full,
            group_by_length: true,
            packing: true,
            precision: Precision::Auto,
            device: Device::Auto,
            template: None,
            min_turn_chars: 0,
            blocklist: Vec::new(),
            export_dtype: ExportDtype::F32,
            // LoRA: rank 16 with alpha twice the rank on every linear projection (QLoRA's finding that adapting
            // all of them is what matches full fine-tuning).
            method: Method::Full,
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_target_modules: vec!["all-linear".into()],
            lora_merge: false,
        }
    }
}

impl TrainConfig {
    /// Reads a YAML or JSON config file (JSON is YAML) of settings; unknown fields are errors that name the field.
    pub fn read_file(path: &Path) -> Result<TrainerSettings, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_yaml_ng::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Vicuna's defaults with each layer of settings laid over them in order (a config file, then the flags):
    /// a setting a later layer sets wins.
    pub fn from_settings(layers: &[&TrainerSettings]) -> Result<Self, String> {
        // The two structs share their field names (a test holds them to it), so the layers lay over the defaults
        // as JSON objects.
        let mut merged = serde_json::Map::new();
        for value in std::iter::once(serde_json::to_value(Self::default()))
            .chain(layers.iter().map(serde_json::to_value))
        {
            if let serde_json::Value::Object(set) = value.map_err(|e| e.to_string())? {
                merged.extend(set);
            }
        }
        serde_json::from_value(serde_json::Value::Object(merged)).map_err(|e| e.to_string())
    }

    /// Checks ranges; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max-length", self.max_length),
            ("micro-batch", self.micro_batch),
            ("grad-accum", self.grad_accum),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("--{name} must be at least 1"));
            }
        }
        if self.max_length < 16 {
            return Err("--max-length must be at least 16 tokens".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(format!(
                "--learning-rate must be a positive number, got {}",
                self.learning_rate
            ));
        }
        if !(self.epochs > 0.0 && self.epochs.is_finite()) && self.max_steps.is_none() {
            return Err(format!("--epochs must be positive, got {}", self.epochs));
        }
        if self.max_steps == Some(0) {
            return Err("--max-steps must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(format!(
                "--warmup-ratio must be in [0, 1), got {}",
                self.warmup_ratio
            ));
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return Err("adam betas must be in [0, 1)".into());
        }
        if self.checkpoint_interval_steps == 0 {
            return Err("--checkpoint-interval-steps must be at least 1".into());
        }
        if let Some(t) = &self.template
            && camelid_model::ChatTemplate::named(t).is_none()
        {
            return Err(format!(
                "unknown template {t:?} (known: vicuna_v1.1; leave unset for the model's own)"
            ));
        }
        if self.method == Method::Lora {
            self.lora_config()?;
        }
        Ok(())
    }

    /// The LoRA adapter's settings, checked (the message names the setting).
    pub fn lora_config(&self) -> Result<camelid_model::lora::LoraConfig, String> {
        camelid_model::lora::LoraConfig::new(
            self.lora_rank,
            self.lora_alpha,
            self.lora_dropout,
            &self.lora_target_modules,
            false,
        )
        .map_err(|e| format!("--lora-*: {e}"))
    }

    /// The settings that decide what is computed, as hashed into checkpoints (paths, checkpoint cadence and
    /// reporting are left out: they may change between a run and its resume). The keys are part of the checkpoint
    /// format, older than the settings' names: renaming them would refuse every existing checkpoint.
    pub fn identity(&self, data_sha256: &str) -> serde_json::Value {
        let mut identity = serde_json::json!({
            "data_sha256": data_sha256,
            "epochs": self.epochs, "max_steps": self.max_steps, "seq_len": self.max_length,
            "micro_batch": self.micro_batch, "grad_accum": self.grad_accum, "lr": self.learning_rate,
            "warmup_ratio": self.warmup_ratio, "weight_decay": self.weight_decay,
            "adam_beta1": self.adam_beta1, "adam_beta2": self.adam_beta2, "adam_eps": self.adam_eps,
            "max_grad_norm": self.max_grad_norm, "seed": self.seed, "group_by_length": self.group_by_length,
            "precision": self.precision, "template": self.template, "min_turn_chars": self.min_turn_chars,
            "blocklist": self.blocklist,
        });
        // Full runs keep the identity they always had, so their existing checkpoints still resume.
        if self.method == Method::Lora {
            identity["method"] = serde_json::json!("lora");
            identity["lora"] = serde_json::json!({
                "rank": self.lora_rank, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": self.lora_target_modules,
            });
            // Dropout masks are drawn over the micro-batch's tensor, whose shape packing changes: a packed run
            // resumed padded (or a run of a trainer older than packing resumed packed) would draw other masks.
            if self.packing && self.lora_dropout > 0.0 {
                identity["packing"] = serde_json::json!(true);
            }
        }
        identity
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
        (Some(a), Some(b)) => {
            let changed = a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).map(|(k, v)| {
                format!(
                    "{k}: checkpoint {v}, now {}",
                    b.get(k).unwrap_or(&serde_json::Value::Null)
                )
            });
            // A setting the checkpoint's identity does not name at all (it was added to the identity since).
            let added = b
                .iter()
                .filter(|(k, _)| !a.contains_key(*k))
                .map(|(k, v)| format!("{k}: checkpoint none, now {v}"));
            changed.chain(added).collect()
        }
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_lay_over_the_defaults_under_the_same_names() {
        let settings: TrainerSettings = serde_yaml_ng::from_str(
            "learningRate: 1.0e-4\nmaxLength: 512\nblocklist: [openai]\nactivationCheckpointing: false\n",
        )
        .unwrap();
        let cfg = TrainConfig::from_settings(&[&settings]).unwrap();
        assert_eq!(cfg.activation_checkpointing, Checkpointing::None);
        assert_eq!(
            (cfg.learning_rate, cfg.max_length, cfg.grad_accum),
            (1e-4, 512, 32)
        );
        assert_eq!(cfg.blocklist, ["openai"]);
    }

    /// Each setting set to a valid value.
    fn every_setting() -> TrainerSettings {
        TrainerSettings {
            model: Some("m".into()),
            data: Some("d".into()),
            output: Some("o".into()),
            checkpoint_dir: Some("c".into()),
            epochs: Some(1.0),
            max_steps: Some(3),
            max_length: Some(64),
            micro_batch: Some(1),
            grad_accum: Some(1),
            learning_rate: Some(1e-3),
            warmup_ratio: Some(0.1),
            weight_decay: Some(0.1),
            adam_beta1: Some(0.8),
            adam_beta2: Some(0.9),
            adam_eps: Some(1e-6),
            max_grad_norm: Some(2.0),
            seed: Some(1),
            checkpoint_interval_steps: Some(5),
            checkpoint_keep: Some(1),
            activation_checkpointing: Some(Checkpointing::Selective),
            group_by_length: Some(false),
            packing: Some(false),
            precision: Some(Precision::F32),
            device: Some(Device::Cpu),
            template: Some("vicuna_v1.1".into()),
            min_turn_chars: Some(2),
            blocklist: vec!["x".into()],
            export_dtype: Some(ExportDtype::Bf16),
            method: Some(Method::Lora),
            lora_rank: Some(4),
            lora_alpha: Some(8.0),
            lora_dropout: Some(0.1),
            lora_target_modules: vec!["q_proj".into(), "v_proj".into()],
            lora_merge: Some(true),
        }
    }

    #[test]
    fn flags_override_the_file_setting_by_setting() {
        let file = TrainerSettings {
            learning_rate: Some(1e-4),
            seed: Some(7),
            ..TrainerSettings::default()
        };
        let flags = TrainerSettings {
            seed: Some(9),
            ..TrainerSettings::default()
        };
        let cfg = TrainConfig::from_settings(&[&file, &flags]).unwrap();
        assert_eq!((cfg.learning_rate, cfg.seed), (1e-4, 9));
    }

    #[test]
    fn every_setting_is_a_field_of_the_resolved_config() {
        // from_settings refuses unknown fields, so a setting the contract adds without the trainer knowing fails here.
        let cfg = TrainConfig::from_settings(&[&every_setting()]).unwrap();
        assert_eq!(
            (
                cfg.checkpoint_interval_steps,
                cfg.checkpoint_keep,
                cfg.export_dtype
            ),
            (5, 1, ExportDtype::Bf16)
        );
        assert_eq!(cfg.adam_eps, 1e-6);
    }

    #[test]
    fn the_flags_the_operator_writes_parse_back_into_the_same_settings() {
        #[derive(clap::Parser)]
        struct Train {
            #[command(flatten)]
            settings: TrainerSettings,
        }
        let all = every_setting();
        let args = std::iter::once("train".to_string()).chain(all.to_args().unwrap());
        let parsed = <Train as clap::Parser>::try_parse_from(args).unwrap();
        assert_eq!(parsed.settings, all);
    }

    #[test]
    fn identity_changes_name_the_setting() {
        let a = TrainConfig::default();
        let b = TrainConfig {
            learning_rate: 1e-3,
            ..a.clone()
        };
        let (ia, ib) = (a.identity("x"), b.identity("x"));
        assert_ne!(hash_json(&ia), hash_json(&ib));
        assert_eq!(differences(&ia, &ib), ["lr: checkpoint 0.00002, now 0.001"]);
        let c = TrainConfig {
            checkpoint_interval_steps: 7,
            checkpoint_keep: 9,
            ..a.clone()
        };
        assert_eq!(hash_json(&ia), hash_json(&c.identity("x")));
        // Packing changes only rounding, except LoRA's dropout masks: only a LoRA run with dropout records it.
        let unpacked = |cfg: &TrainConfig| TrainConfig {
            packing: false,
            ..cfg.clone()
        };
        assert_eq!(hash_json(&ia), hash_json(&unpacked(&a).identity("x")));
        let lora = TrainConfig {
            method: Method::Lora,
            ..a.clone()
        };
        assert_eq!(
            differences(&unpacked(&lora).identity("x"), &lora.identity("x")),
            ["packing: checkpoint none, now true"]
        );
        let no_dropout = TrainConfig {
            lora_dropout: 0.0,
            ..lora.clone()
        };
        assert_eq!(
            hash_json(&no_dropout.identity("x")),
            hash_json(&unpacked(&no_dropout).identity("x"))
        );
        assert!(
            TrainConfig { max_length: 0, ..a }
                .validate()
                .unwrap_err()
                .contains("--max-length")
        );
    }
}
