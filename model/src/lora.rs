//! LoRA adapters (low-rank adaptation): for a targeted projection `y = W x`, the adapted model computes
//! `y = W x + s · B (A x)` with `A` `[rank, in]`, `B` `[out, rank]` and `s = alpha / rank` (`alpha / sqrt(rank)` with
//! rsLoRA). The base stays frozen; an adapter is a few megabytes, so one base serves many of them.
//!
//! Adapters are read and written in PEFT's layout (`adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), so adapters trained by PEFT load here and
//! ours load in PEFT, vLLM and every other server that reads that format. A file is hostile until checked: every
//! key must name a module the config targets in a layer the base has, with the shapes the base implies and finite
//! values, and every targeted module must have both halves.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::weights::{self, LoadOptions, Weights};

/// The projections an adapter can target, in a layer's order (`Layer::linears`).
pub const LORA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The largest rank accepted: real adapters use 4 to 256; a huge rank in a hostile config would only allocate.
pub const MAX_LORA_RANK: usize = 1024;

/// The names of PEFT's files in an adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// An adapter's hyperparameters (PEFT's `LoraConfig` fields that change the computation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`).
    pub dropout: f64,
    /// Indices into [`LORA_MODULES`], sorted and without repeats.
    pub targets: Vec<usize>,
    /// rsLoRA: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
    pub use_rslora: bool,
}

impl LoraConfig {
    /// A config from user-facing values: module names as PEFT spells them (`q_proj`, ..., or `all-linear`).
    pub fn new(rank: usize, alpha: f64, dropout: f64, modules: &[String], use_rslora: bool) -> Result<Self> {
        let config = Self {
            rank,
            alpha,
            dropout,
            targets: parse_targets(modules)?,
            use_rslora,
        };
        config.validate()?;
        Ok(config)
    }

    /// The factor `s` the adapter's product is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// The target modules' names, in layer order.
    pub fn target_names(&self) -> Vec<&'static str> {
        self.targets.iter().map(|&m| LORA_MODULES[m]).collect()
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(ModelError::InvalidRequest(format!("LoRA: {detail}")));
        if self.rank == 0 || self.rank > MAX_LORA_RANK {
            return bad(format!("rank {} is outside 1..={MAX_LORA_RANK}", self.rank));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return bad(format!("alpha {} must be a positive number", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} must lie in [0, 1)", self.dropout));
        }
        if self.targets.is_empty() {
            return bad("no target modules".into());
        }
        if self.targets.iter().any(|&m| m >= LORA_MODULES.len()) || !self.targets.is_sorted() {
            return bad("target module indices out of range".into());
        }
        Ok(())
    }
}

/// Module names (`q_proj`, `self_attn.q_proj`, `all-linear`) as sorted indices into [`LORA_MODULES`].
fn parse_targets(modules: &[String]) -> Result<Vec<usize>> {
    let mut targets = Vec::new();
    for name in modules {
        if name == "all-linear" {
            targets.extend(0..LORA_MODULES.len());
            continue;
        }
        let short = name.rsplit('.').next().unwrap_or(name);
        let index = LORA_MODULES.iter().position(|m| *m == short).ok_or_else(|| {
            ModelError::InvalidRequest(format!(
                "LoRA: target module {name:?} is not one of {} (or all-linear)",
                LORA_MODULES.join(", ")
            ))
        })?;
        targets.push(index);
    }
    targets.sort_unstable();
    targets.dedup();
    Ok(targets)
}

/// One adapted projection: `A` `[rank, in]` and `B` `[out, rank]`, f32.
#[derive(Debug)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// A LoRA adapter for one base model: a [`LoraPair`] per layer and targeted module.
#[derive(Debug)]
pub struct LoraAdapter {
    config: LoraConfig,
    /// `layers[i][m]`: layer `i`'s module `LORA_MODULES[m]`, present exactly for the targets.
    layers: Vec<[Option<LoraPair>; 7]>,
}

/// `(in, out)` of module `m` in a model of `config`.
pub(crate) fn module_shape(config: &Config, m: usize) -> (i64, i64) {
    let (h, q, kv, ff) = (
        config.hidden_size as i64,
        (config.num_heads * config.head_dim) as i64,
        (config.num_kv_heads * config.head_dim) as i64,
        config.intermediate_size as i64,
    );
    match m {
        0 => (h, q),
        1 | 2 => (h, kv),
        3 => (q, h),
        4 | 5 => (h, ff),
        _ => (ff, h),
    }
}

/// The PEFT module path of layer `i`'s module `m`, without the `base_model.model.` prefix.
pub fn module_path(i: usize, m: usize) -> String {
    format!("model.layers.{i}.{}.{}", block_of(m), LORA_MODULES[m])
}

/// The block module `m` belongs to: the attention projections come first in [`LORA_MODULES`].
fn block_of(m: usize) -> &'static str {
    if m < 4 { "self_attn" } else { "mlp" }
}

const PEFT_PREFIX: &str = "base_model.model.";

impl LoraAdapter {
    /// A fresh adapter as PEFT initializes one: `A` uniform in `±1/sqrt(in)` (Kaiming-uniform with `a = sqrt(5)`),
    /// `B` zero, so training starts from the base model's outputs.
    pub fn init(config: LoraConfig, base: &Config, seed: i64, device: Device) -> Result<Self> {
        config.validate()?;
        tch::manual_seed(seed);
        let r = config.rank as i64;
        let layers = (0..base.num_layers)
            .map(|_| -> Result<[Option<LoraPair>; 7]> {
                let mut slots: [Option<LoraPair>; 7] = Default::default();
                for &m in &config.targets {
                    let (input, output) = module_shape(base, m);
                    let bound = 1.0 / (input as f64).sqrt();
                    let a = Tensor::f_rand([r, input], (Kind::Float, device))?
                        .f_mul_scalar(2.0 * bound)?
                        .f_sub_scalar(bound)?;
                    let b = Tensor::f_zeros([output, r], (Kind::Float, device))?;
                    slots[m] = Some(LoraPair { a, b });
                }
                Ok(slots)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { config, layers })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i`'s pair for module `m`, if targeted.
    pub fn pair(&self, i: usize, m: usize) -> Option<&LoraPair> {
        self.layers.get(i).and_then(|l| l[m].as_ref())
    }

    /// Every adapter tensor with its PEFT name (without the `base_model.model.` prefix), layer by layer, `A`
    /// before `B`: the trainable parameters and the checkpoint's names.
    pub fn named_parameters(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (i, slots) in self.layers.iter().enumerate() {
            for (m, pair) in slots.iter().enumerate() {
                if let Some(pair) = pair {
                    out.push((format!("{}.lora_A.weight", module_path(i, m)), &pair.a));
                    out.push((format!("{}.lora_B.weight", module_path(i, m)), &pair.b));
                }
            }
        }
        out
    }

    /// Bytes of the adapter's weights.
    pub fn weight_bytes(&self) -> usize {
        self.named_parameters()
            .iter()
            .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// An adapter from named tensors (PEFT names, with or without the `base_model.model.` prefix), checked against
    /// `config` and the base model's shapes. `origin` names the file in errors.
    pub fn from_tensors(config: LoraConfig, base: &Config, tensors: Weights, origin: &Path) -> Result<Self> {
        config.validate()?;
        let bad = |name: &str, detail: String| ModelError::Tensor {
            path: origin.into(),
            name: name.into(),
            detail,
        };
        let mut layers: Vec<[Option<LoraPair>; 7]> =
            (0..base.num_layers).map(|_| Default::default()).collect();
        let mut halves: BTreeMap<(usize, usize), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (name, tensor) in tensors {
            let (i, m, is_a) = parse_key(&name, base.num_layers)
                .ok_or_else(|| bad(&name, "is not a LoRA weight of a layer this model has".into()))?;
            if !config.targets.contains(&m) {
                return Err(bad(
                    &name,
                    format!(
                        "adapts {}, which the adapter config does not target",
                        LORA_MODULES[m]
                    ),
                ));
            }
            let (input, output) = module_shape(base, m);
            let r = config.rank as i64;
            let want = if is_a { [r, input] } else { [output, r] };
            if tensor.size() != want {
                return Err(bad(
                    &name,
                    format!(
                        "has shape {:?}; rank {r} on this base needs {want:?}",
                        tensor.size()
                    ),
                ));
            }
            let tensor = tensor.f_to_kind(Kind::Float)?;
            if !bool::try_from(tensor.f_isfinite()?.f_all()?)? {
                return Err(bad(&name, "holds NaN or infinite values".into()));
            }
            let slot = halves.entry((i, m)).or_default();
            if is_a {
                slot.0 = Some(tensor)
            } else {
                slot.1 = Some(tensor)
            }
        }
        for (i, slots) in layers.iter_mut().enumerate() {
            for &m in &config.targets {
                let path = module_path(i, m);
                let (a, b) = match halves.remove(&(i, m)) {
                    Some((Some(a), Some(b))) => (a, b),
                    Some((None, _)) | None => {
                        return Err(bad(&format!("{path}.lora_A.weight"), "is missing".into()));
                    }
                    Some((_, None)) => {
                        return Err(bad(&format!("{path}.lora_B.weight"), "is missing".into()));
                    }
                };
                slots[m] = Some(LoraPair { a, b });
            }
        }
        Ok(Self { config, layers })
    }

    /// Reads a PEFT adapter directory for a base model of `base`'s shape.
    pub fn read_peft(dir: &Path, base: &Config, device: Device) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let text = read_small(&config_path)?;
        let config = parse_peft_config(&text, &config_path)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let mut tensors = Weights::new();
        let opts = LoadOptions {
            dtype: Kind::Float,
            device,
            keep_quantized: false,
        };
        weights::read_safetensors(&weights_path, opts, &mut tensors)?;
        Self::from_tensors(config, base, tensors, &weights_path)
    }

    /// Writes the adapter as PEFT does (`adapter_config.json`, `adapter_model.safetensors`), naming
    /// `base_model` as the model it adapts.
    pub fn write_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let tensors = self
            .named_parameters()
            .into_iter()
            .map(|(name, t)| {
                Ok((
                    format!("{PEFT_PREFIX}{name}"),
                    t.f_detach()?.f_to_kind(Kind::Float)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        weights::write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors)?;
        let c = &self.config;
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "target_modules": c.target_names(),
            "use_rslora": c.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "use_dora": false,
        });
        let path = dir.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| ModelError::Unsupported(format!("cannot serialize {ADAPTER_CONFIG}: {e}")))?;
        std::fs::write(&path, text + "\n").map_err(|e| ModelError::io(&path, e))
    }

    /// `s · B A` of layer `i`'s module `m` (`[out, in]`, f32): what merging adds to the base weight.
    pub fn delta(&self, i: usize, m: usize) -> Result<Option<Tensor>> {
        let Some(pair) = self.pair(i, m) else {
            return Ok(None);
        };
        Ok(Some(pair.b.f_matmul(&pair.a)?.f_mul_scalar(self.config.scale())?))
    }
}

/// `(layer, module, is_a)` of a PEFT key such as `base_model.model.model.layers.3.mlp.up_proj.lora_B.weight`.
fn parse_key(name: &str, num_layers: usize) -> Option<(usize, usize, bool)> {
    let rest = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let i: usize = layer.parse().ok().filter(|&i| i < num_layers)?;
    if layer != i.to_string() {
        return None;
    }
    let (module, half) = rest.split_once(".lora_")?;
    let is_a = match half {
        "A.weight" => true,
        "B.weight" => false,
        _ => return None,
    };
    let m = (0..LORA_MODULES.len()).find(|&m| module == format!("{}.{}", block_of(m), LORA_MODULES[m]))?;
    Some((i, m, is_a))
}

/// The largest `adapter_config.json` read (real ones are about a kilobyte).
const MAX_ADAPTER_CONFIG: u64 = 1 << 20;

fn read_small(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if !meta.is_file() || meta.len() > MAX_ADAPTER_CONFIG {
        return Err(ModelError::malformed(
            path,
            "adapter config",
            format!("must be a regular file of at most {MAX_ADAPTER_CONFIG} bytes"),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))
}

/// PEFT's `adapter_config.json`, the fields camelid reads; options that change the computation in ways camelid
/// does not implement are refused by name rather than silently ignored.
#[derive(Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: serde_json::Value,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Parses and checks an `adapter_config.json`.
pub fn parse_peft_config(text: &str, path: &Path) -> Result<LoraConfig> {
    let malformed = |detail: String| ModelError::malformed(path, "adapter config", detail);
    let c: PeftConfig = serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
    if c.peft_type.as_deref().is_some_and(|t| t != "LORA") {
        return Err(malformed(format!("peft_type {:?} is not LORA", c.peft_type)));
    }
    let refuse = |what: &str| Err(malformed(format!("{what} is not supported")));
    if c.bias.as_deref().is_some_and(|b| b != "none") {
        return refuse("bias other than \"none\"");
    }
    if c.fan_in_fan_out {
        return refuse("fan_in_fan_out");
    }
    if c.use_dora {
        return refuse("use_dora (DoRA)");
    }
    if c.modules_to_save.as_ref().is_some_and(|v| !v.is_null()) {
        return refuse("modules_to_save");
    }
    if c.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
        return refuse("layers_to_transform");
    }
    if c.rank_pattern.as_ref().is_some_and(|m| !m.is_empty())
        || c.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty())
    {
        return refuse("rank_pattern or alpha_pattern");
    }
    let modules: Vec<String> = match c.target_modules {
        serde_json::Value::String(s) if s == "all-linear" => vec![s],
        serde_json::Value::String(s) => {
            return Err(malformed(format!(
                "target_modules {s:?} is a regular expression; list the module names instead"
            )));
        }
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Ok(s),
                other => Err(malformed(format!("target_modules holds {other}, not a name"))),
            })
            .collect::<Result<_>>()?,
        other => return Err(malformed(format!("target_modules is {other}, not a list"))),
    };
    LoraConfig::new(c.r, c.lora_alpha, c.lora_dropout, &modules, c.use_rslora)
        .map_err(|e| malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Config {
        Config::tiny(4, 2, true)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keys_parse_only_for_real_modules_and_layers() {
        let n = 2;
        assert_eq!(
            parse_key("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight", n),
            Some((1, 6, true))
        );
        assert_eq!(
            parse_key("model.layers.0.self_attn.q_proj.lora_B.weight", n),
            Some((0, 0, false))
        );
        for bad in [
            "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight",
            "base_model.model.model.layers.01.mlp.down_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_A",
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        ] {
            assert_eq!(parse_key(bad, n), None, "{bad}");
        }
    }

    #[test]
    fn configs_that_change_the_math_unseen_are_refused_by_name() {
        let path = Path::new("adapter_config.json");
        let ok = r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"]}"#;
        let c = parse_peft_config(ok, path).expect("plain config");
        assert_eq!((c.rank, c.targets.clone(), c.scale()), (8, vec![0, 2], 2.0));
        for (text, word) in [
            (
                r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": true}"#,
                "DoRA",
            ),
            (
                r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "all"}"#,
                "bias",
            ),
            (
                r#"{"r": 8, "lora_alpha": 16, "target_modules": ".*proj"}"#,
                "regular expression",
            ),
            (
                r#"{"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens"]}"#,
                "embed_tokens",
            ),
            (
                r#"{"r": 0, "lora_alpha": 16, "target_modules": ["q_proj"]}"#,
                "rank 0",
            ),
            (
                r#"{"r": 99999999, "lora_alpha": 16, "target_modules": ["q_proj"]}"#,
                "rank",
            ),
            (
                r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "layers_to_transform": [0]}"#,
                "layers_to_transform",
            ),
            (
                r#"{"peft_type": "IA3", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}"#,
                "IA3",
            ),
            (
                r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "lora_dropout": 1.5}"#,
                "dropout",
            ),
        ] {
            let err = parse_peft_config(text, path).expect_err(text).to_string();
            assert!(err.contains(word), "{text}: {err}");
            assert!(err.contains("adapter_config.json"), "{err}");
        }
    }

    #[test]
    fn an_adapter_round_trips_through_peft_files_and_hostile_files_are_named() {
        let base = tiny();
        let config = LoraConfig::new(4, 8.0, 0.0, &names(&["q_proj", "down_proj"]), false).expect("config");
        let adapter = LoraAdapter::init(config.clone(), &base, 3, Device::Cpu).expect("init");
        let dir = std::env::temp_dir().join(format!("camelid-lora-{}", std::process::id()));
        adapter.write_peft(&dir, "tiny").expect("write");
        let back = LoraAdapter::read_peft(&dir, &base, Device::Cpu).expect("read");
        assert_eq!(back.config(), adapter.config());
        for ((n1, t1), (n2, t2)) in adapter
            .named_parameters()
            .into_iter()
            .zip(back.named_parameters())
        {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2), "{n1}");
        }
        // A tensor of the wrong shape, one for an untargeted module, a missing half and NaNs are each named.
        let tensors = || -> Weights {
            adapter
                .named_parameters()
                .into_iter()
                .map(|(n, t)| (n, t.shallow_clone()))
                .collect()
        };
        let key = "model.layers.1.mlp.down_proj.lora_A.weight".to_string();
        let cases: Vec<(Weights, &str)> = vec![
            {
                let mut w = tensors();
                w.insert(key.clone(), Tensor::zeros([5, 160], (Kind::Float, Device::Cpu)));
                (w, "shape")
            },
            {
                let mut w = tensors();
                w.insert(
                    "model.layers.0.self_attn.k_proj.lora_A.weight".into(),
                    Tensor::zeros([4, 64], (Kind::Float, Device::Cpu)),
                );
                (w, "does not target")
            },
            {
                let mut w = tensors();
                w.remove("model.layers.0.self_attn.q_proj.lora_B.weight");
                (w, "missing")
            },
            {
                let mut w = tensors();
                w.insert(
                    key.clone(),
                    Tensor::full([4, 160], f64::NAN, (Kind::Float, Device::Cpu)),
                );
                (w, "NaN")
            },
        ];
        for (weights, word) in cases {
            let err = LoraAdapter::from_tensors(config.clone(), &base, weights, Path::new("a.safetensors"))
                .expect_err(word)
                .to_string();
            assert!(
                err.contains(word) && err.contains("a.safetensors"),
                "{word}: {err}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
