//! Loading the model a command line names: path (or the default model), device, precision and template. Shared
//! by `camelid` and `camelid-worker` so both accept the same flags.

use std::path::PathBuf;

use camelid_model::{ChatTemplate, LoadOptions, LoadedModel, ModelError};
use clap::{Args, ValueEnum};
use tch::{Device, Kind};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DType {
    /// A GGUF file's own types on the CPU (quantized matrices computed on as blocks, the rest f32); f32 for an
    /// HF directory on the CPU, bf16 on CUDA.
    Auto,
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// An HF model directory or a .gguf file (default: CAMELID_MODEL, else SmolLM2-135M-Instruct from .venv).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Weight precision (default: auto, which keeps a GGUF file's quantized types on the CPU, else f32 on CPU and
    /// bf16 on CUDA).
    #[arg(long, value_enum)]
    pub dtype: Option<DType>,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Chat template: `vicuna_v1.1`, or a Jinja file (default: the model's own, else vicuna_v1.1).
    #[arg(long)]
    pub template: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("--device cuda: no CUDA device is available")]
    NoCuda,
    #[error("--template {name}: not vicuna_v1.1 and not a readable Jinja file")]
    Template {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading {path}")]
    Model {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error(transparent)]
    NoModel(ModelError),
}

impl LoadError {
    /// Whether the user can fix it (a bad flag or file) rather than a fault of ours.
    pub fn is_user_error(&self) -> bool {
        match self {
            LoadError::Model { source, .. } | LoadError::NoModel(source) => source.is_user_error(),
            LoadError::NoCuda | LoadError::Template { .. } => true,
        }
    }
}

impl ModelArgs {
    /// The model path: `--model`, else the default model.
    pub fn path(&self) -> Result<PathBuf, LoadError> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => camelid_model::default_model_path().map_err(LoadError::NoModel),
        }
    }

    pub fn load(&self) -> Result<LoadedModel, LoadError> {
        let device = match self.device {
            DeviceArg::Auto => Device::cuda_if_available(),
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
            DeviceArg::Cuda => return Err(LoadError::NoCuda),
        };
        let auto = matches!(self.dtype, None | Some(DType::Auto));
        let dtype = match (self.dtype, device) {
            (Some(DType::F32), _) => Kind::Float,
            (Some(DType::Bf16), _) => Kind::BFloat16,
            (_, Device::Cpu) => Kind::Float,
            _ => Kind::BFloat16,
        };
        let keep_quantized = auto && device == Device::Cpu;
        let path = self.path()?;
        let template = match self.template.as_deref() {
            None => None,
            Some(name) => Some(match ChatTemplate::named(name) {
                Some(t) => t,
                None => ChatTemplate::Jinja {
                    source: std::fs::read_to_string(name).map_err(|source| LoadError::Template {
                        name: name.to_string(),
                        source,
                    })?,
                    bos_token: String::new(),
                    eos_token: String::new(),
                },
            }),
        };
        let started = std::time::Instant::now();
        let mut loaded = camelid_model::load(
            &path,
            LoadOptions {
                dtype,
                device,
                keep_quantized,
            },
        )
        .map_err(|source| LoadError::Model {
            path: path.clone(),
            source,
        })?;
        if let Some(template) = template {
            loaded.set_template(template);
        }
        tracing::info!(
            model = %path.display(), ?device, ?dtype, quantized = loaded.model.is_quantized(),
            weight_mb = loaded.model.weight_bytes() >> 20, template = loaded.template.name(),
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()), "model loaded"
        );
        Ok(loaded)
    }
}

/// The name clients use for a model at `path`: its file or directory name without extension.
pub fn default_served_name(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}
