//! The first phase of a run: check the settings and find the run's files, load the model onto its device, read,
//! clean and tokenize the data, and join the gang (picking the step engine). The `prepare` command runs its model
//! and data half too, through [`load_model`] and [`prepare_data`].

use std::path::{Path, PathBuf};

use camelid_model::{ChatTemplate, LoadOptions, LoadedModel};
use tch::{Device, Kind};

use super::{RunOptions, write_json};
use camelid_model::lora::LoraAdapter;

use crate::config::{Checkpointing, Device as DeviceSetting, Method, Precision, TrainConfig, hash_file};
use crate::data::tokenize::{self, Sample};
use crate::data::{self, CleanOptions, DataError};
use crate::error::TrainError;
use crate::step::{Backend, Engine, ShardedEngine};
use crate::torchrun::Comm;

/// Where the run reads and writes.
pub(super) struct Paths {
    pub(super) model: PathBuf,
    pub(super) data: PathBuf,
    pub(super) output: PathBuf,
    pub(super) checkpoint_dir: PathBuf,
}

/// What the later phases start from: the run's files, the model on its device, the data, the engine and the gang.
pub(super) struct Prepared {
    pub(super) paths: Paths,
    /// SHA-256 of the data file (part of the run's identity).
    pub(super) data_sha: String,
    pub(super) model: LoadedModel,
    pub(super) samples: Vec<Sample>,
    pub(super) engine: Backend,
    pub(super) comm: Comm,
}

/// Checks the settings, loads the model and the data, joins the gang (if any) and writes the data report (rank 0).
pub(super) fn prepare(cfg: &TrainConfig, opts: &RunOptions) -> Result<Prepared, TrainError> {
    cfg.validate().map_err(TrainError::Config)?;
    let (paths, data_sha) = locate(cfg)?;
    let cuda_index = opts.dist.as_ref().map_or(0, |d| d.local_rank);
    let (mut model, compute_kind) = load_model(cfg, &paths.model, cuda_index)?;
    let (samples, report) = prepare_data(cfg, &paths.data, &model)?;
    let (engine, comm) = setup_engine(cfg, opts, &mut model, compute_kind)?;
    let report_path = paths.output.join("data_report.json");
    if comm.is_leader() {
        write_json(&report_path, &report)?;
    }
    tracing::info!(
        samples = samples.len(),
        report = %report_path.display(),
        dropped = %report["cleaning"]["dropped"],
        truncated = %report["tokenization"]["truncated_exchanges"],
        "data ready"
    );
    Ok(Prepared {
        paths,
        data_sha,
        model,
        samples,
        engine,
        comm,
    })
}

/// The run's files (the output folder created) and the data file's hash.
fn locate(cfg: &TrainConfig) -> Result<(Paths, String), TrainError> {
    let model = match &cfg.model {
        Some(p) => p.clone(),
        None => camelid_model::default_model_path()?,
    };
    let data = required(&cfg.data, "--data")?.clone();
    let output = required(&cfg.output, "--output")?.clone();
    let checkpoint_dir = cfg
        .checkpoint_dir
        .clone()
        .unwrap_or_else(|| output.join("checkpoints"));
    std::fs::create_dir_all(&output).map_err(|e| TrainError::Io {
        path: output.clone(),
        source: e,
    })?;
    let data_sha = hash_file(&data).map_err(|source| DataError::Io {
        path: data.clone(),
        source,
    })?;
    let paths = Paths {
        model,
        data,
        output,
        checkpoint_dir,
    };
    Ok((paths, data_sha))
}

fn required<'a>(v: &'a Option<PathBuf>, flag: &str) -> Result<&'a PathBuf, TrainError> {
    v.as_ref()
        .ok_or_else(|| TrainError::Config(format!("{flag} is required")))
}

/// The data, cleaned and tokenized for `model`, with the report of everything dropped or changed.
pub fn prepare_data(
    cfg: &TrainConfig,
    data_path: &Path,
    model: &LoadedModel,
) -> Result<(Vec<Sample>, serde_json::Value), TrainError> {
    let conversations = data::read_conversations(data_path)?;
    let (kept, cleaning) = data::clean(
        conversations,
        &CleanOptions {
            min_turn_chars: cfg.min_turn_chars,
            blocklist: cfg.blocklist.clone(),
        },
    );
    let (samples, tokens) = tokenize::tokenize(&kept, model, cfg.max_length)?;
    let report = serde_json::json!({"file": data_path, "cleaning": cleaning, "tokenization": tokens});
    if samples.is_empty() {
        return Err(TrainError::Config(format!(
            "{}: no trainable samples are left after cleaning and tokenization (report: {report})",
            data_path.display()
        )));
    }
    Ok((samples, report))
}

/// Loads the model as f32 masters on the chosen device (CUDA device `cuda_index` for a GPU: a rank's
/// `LOCAL_RANK`) with the chosen template.
pub fn load_model(
    cfg: &TrainConfig,
    path: &Path,
    cuda_index: usize,
) -> Result<(LoadedModel, Kind), TrainError> {
    let device = match cfg.device {
        DeviceSetting::Cpu => Device::Cpu,
        DeviceSetting::Cuda if !tch::Cuda::is_available() => {
            return Err(TrainError::Config(
                "--device cuda, but no CUDA device is available".into(),
            ));
        }
        DeviceSetting::Cuda => Device::Cuda(cuda_index),
        DeviceSetting::Auto if tch::Cuda::is_available() => Device::Cuda(cuda_index),
        DeviceSetting::Auto => Device::Cpu,
    };
    let compute = match (cfg.precision, device) {
        (Precision::F32, _) | (Precision::Auto, Device::Cpu) => Kind::Float,
        _ => Kind::BFloat16,
    };
    let mut model = camelid_model::load(
        path,
        LoadOptions {
            dtype: Kind::Float,
            device,
            // Training updates every weight: quantized blocks are dequantized.
            keep_quantized: false,
        },
    )?;
    if let Some(name) = &cfg.template {
        let template = ChatTemplate::named(name)
            .ok_or_else(|| TrainError::Config(format!("unknown template {name:?}")))?;
        model.set_template(template);
    }
    Ok((model, compute))
}

/// Joins the gang, if any, and picks the engine: the whole model in this process, or this rank's shards.
fn setup_engine(
    cfg: &TrainConfig,
    opts: &RunOptions,
    model: &mut LoadedModel,
    compute_kind: Kind,
) -> Result<(Backend, Comm), TrainError> {
    if cfg.method == Method::Lora {
        return setup_lora(cfg, opts, model, compute_kind);
    }
    let Some(dist) = &opts.dist else {
        let engine = Engine::new(&model.model, compute_kind, cfg.activation_checkpointing)?;
        return Ok((Backend::Single(Box::new(engine)), Comm::default()));
    };
    let group = std::rc::Rc::new(dist.connect(model.model.device())?);
    if cfg.activation_checkpointing != Checkpointing::Full {
        tracing::info!(
            "sharded training recomputes every layer in backward (full activation checkpointing) whatever \
             --activation-checkpointing says: that is what lets a layer's gathered weights be freed between its \
             forward and its backward (the results are the same)"
        );
    }
    let engine = ShardedEngine::new(&mut model.model, compute_kind, group.clone())?;
    Ok((Backend::Sharded(engine), Comm { group: Some(group) }))
}

/// LoRA: the base frozen in the compute dtype (bf16 on a GPU), a fresh adapter (the same on every rank: it is
/// drawn from the run's seed) whose f32 tensors are what trains, and for a gang the adapters' gradients summed
/// over it.
fn setup_lora(
    cfg: &TrainConfig,
    opts: &RunOptions,
    model: &mut LoadedModel,
    compute_kind: Kind,
) -> Result<(Backend, Comm), TrainError> {
    let config = cfg.lora_config().map_err(TrainError::Config)?;
    if compute_kind != Kind::Float {
        let weights = model
            .model
            .named_parameters()
            .into_iter()
            .map(|(n, t)| Ok((n, t.f_to_kind(compute_kind)?)))
            .collect::<Result<camelid_model::weights::Weights, tch::TchError>>()?;
        model.model = camelid_model::Llama::from_weights(model.config().clone(), weights)?;
    }
    let adapter = LoraAdapter::init(config, model.config(), cfg.seed as i64, model.model.device())?;
    tracing::info!(
        rank = cfg.lora_rank,
        modules = ?adapter.config().target_names(),
        adapter_mb = adapter.weight_bytes() as f64 / 1e6,
        "LoRA: the base is frozen; only the adapters train"
    );
    let engine = Box::new(Engine::new_lora(
        &mut model.model,
        adapter,
        cfg.activation_checkpointing,
        cfg.seed,
    )?);
    let Some(dist) = &opts.dist else {
        return Ok((Backend::Single(engine), Comm::default()));
    };
    let group = std::rc::Rc::new(dist.connect(model.model.device())?);
    Ok((
        Backend::Replicated(engine, group.clone()),
        Comm { group: Some(group) },
    ))
}
