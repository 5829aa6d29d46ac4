//! Loading weights into tensors keyed by HF checkpoint names (`model.layers.0.self_attn.q_proj.weight`), from
//! safetensors (single file or shards) or GGUF (dequantized, with llama.cpp's Q/K row permutation undone).

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// Where and in which precision to place weights.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub dtype: Kind,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: Kind::Float,
            device: Device::Cpu,
        }
    }
}

pub type Weights = HashMap<String, Tensor>;

fn safetensors_kind(dtype: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype;
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Reads every tensor of one `.safetensors` file.
pub fn read_safetensors(path: &Path, opts: LoadOptions, out: &mut Weights) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: read-only private mapping of a file we do not modify; see `GgufFile::open`.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| ModelError::malformed(path, "safetensors file", e.to_string()))?;
    for (name, view) in st.tensors() {
        let kind = safetensors_kind(view.dtype()).ok_or_else(|| ModelError::Tensor {
            path: path.into(),
            name: name.clone(),
            detail: format!("unsupported dtype {:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        let t = if matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            t.f_to_kind(opts.dtype)?
        } else {
            t
        };
        out.insert(name, t.f_to_device(opts.device)?);
    }
    Ok(())
}

/// Reads an HF model directory: `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
pub fn read_hf_dir(dir: &Path, opts: LoadOptions) -> Result<Weights> {
    let mut out = Weights::new();
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::malformed(&index, "shard index", e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::malformed(&index, "shard index", "no weight_map object"))?;
        let mut files: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        for f in files {
            read_safetensors(&dir.join(f), opts, &mut out)?;
        }
        if let Some(missing) = map.keys().find(|k| !out.contains_key(*k)) {
            return Err(ModelError::malformed(
                &index,
                "shard index",
                format!("{missing} is listed but in no shard"),
            ));
        }
    } else {
        let single = dir.join("model.safetensors");
        if !single.exists() {
            return Err(ModelError::malformed(
                dir,
                "model directory",
                "has neither model.safetensors nor model.safetensors.index.json",
            ));
        }
        read_safetensors(&single, opts, &mut out)?;
    }
    Ok(out)
}

/// GGUF tensor name → HF checkpoint name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        "rope_freqs.weight" => Some("rope_freqs.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = suffix.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's `permute` of Q/K rows (it interleaves the two RoPE halves of each head).
pub fn unpermute_rows(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let shape = t.size();
    let rows = shape[0];
    let head = rows / n_heads as i64;
    let rest: Vec<i64> = shape[1..].to_vec();
    let mut split = vec![n_heads as i64, head / 2, 2];
    split.extend(&rest);
    Ok(t.f_reshape(&split)?
        .f_transpose(1, 2)?
        .f_contiguous()?
        .f_reshape(&shape)?)
}

/// Reads and dequantizes every tensor of a LLaMA GGUF file under HF names.
pub fn read_gguf(file: &GgufFile, cfg: &Config, opts: LoadOptions) -> Result<Weights> {
    let mut out = Weights::new();
    for info in &file.tensors {
        let name = hf_name(&info.name).ok_or_else(|| ModelError::Tensor {
            path: file.path().into(),
            name: info.name.clone(),
            detail: "is not a LLaMA tensor camelid knows".into(),
        })?;
        let values = file.dequantize(info)?;
        let mut t = Tensor::f_from_slice(&values)?.f_reshape(info.torch_shape())?;
        if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias") {
            t = unpermute_rows(&t, cfg.num_heads)?;
        } else if name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.k_proj.bias") {
            t = unpermute_rows(&t, cfg.num_kv_heads)?;
        }
        let t = if name == "rope_freqs.weight" {
            t
        } else {
            t.f_to_kind(opts.dtype)?
        };
        out.insert(name, t.f_to_device(opts.device)?);
    }
    Ok(out)
}

fn safetensors_dtype(kind: Kind) -> Result<safetensors::Dtype> {
    use safetensors::Dtype;
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        other => {
            return Err(ModelError::Unsupported(format!(
                "cannot write {other:?} tensors to safetensors"
            )));
        }
    })
}

/// Writes `tensors` as one `.safetensors` file with `{"format": "pt"}` metadata (transformers checks it) and
/// syncs it to disk before returning, so a caller can rely on it surviving a crash.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        let dtype = safetensors_dtype(t.kind())?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)?;
        owned.push((name.clone(), dtype, shape, bytes));
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Unsupported(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, &metadata, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(e) => ModelError::io(path, e),
        other => ModelError::Unsupported(format!("cannot serialize safetensors: {other}")),
    })?;
    let io = |e| ModelError::io(path, e);
    std::fs::File::open(path).map_err(io)?.sync_all().map_err(io)
}
