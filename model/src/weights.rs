//! Loading weights into tensors keyed by HF checkpoint names (`model.layers.0.self_attn.q_proj.weight`), from
//! safetensors (single file or shards) or GGUF (dequantized, with llama.cpp's Q/K row permutation undone).

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::quant::GgmlType;

/// Where and in which precision to place weights.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// The dtype of dense weights and of the activations.
    pub dtype: Kind,
    pub device: Device,
    /// Keep a GGUF file's quantized matrices as their blocks (on the CPU, for the types with a kernel) instead of
    /// dequantizing them to `dtype`.
    pub keep_quantized: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: Kind::Float,
            device: Device::Cpu,
            keep_quantized: false,
        }
    }
}

pub type Weights = HashMap<String, Tensor>;
/// The GGML block type of each weight kept quantized (a `[rows, row bytes]` u8 tensor), by HF name.
pub type QuantTypes = HashMap<String, GgmlType>;

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

/// The largest safetensors JSON header read: real ones are kilobytes (a 70B model's shard lists under a thousand
/// tensors); the `safetensors` crate would take 100 MB, which its JSON parse multiplies in memory.
pub const MAX_SAFETENSORS_HEADER: u64 = 32 << 20;
/// The most dimensions a tensor may have (LLaMA weights have at most 2).
pub const MAX_SAFETENSORS_RANK: usize = 8;

/// One tensor of a safetensors file, checked: a dtype camelid loads, a shape whose dims fit libtorch's i64 and whose
/// byte size (checked arithmetic) is exactly its data's, and data inside the file, not overlapping another's.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetensorsEntry {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<i64>,
    /// Absolute byte range of the data in the file.
    pub data: std::ops::Range<usize>,
}

/// Reads and checks the header of a whole safetensors file held in `bytes`; touches no file and no libtorch, so it
/// is the fuzzing entry point of the safetensors loader. Refuses a header length over [`MAX_SAFETENSORS_HEADER`] or
/// past the end, offsets that are out of range, overlap, leave gaps or disagree with dtype × shape (computed
/// with checked arithmetic by the `safetensors` crate, whose checks this relies on and repeats where cheap), more
/// than [`MAX_SAFETENSORS_RANK`] dims, dims over `i64::MAX`, and dtypes camelid does not load.
pub fn read_safetensors_header(bytes: &[u8]) -> Result<Vec<SafetensorsEntry>> {
    parse_safetensors(bytes, Path::new("<memory>"))
}

fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<Vec<SafetensorsEntry>> {
    let malformed = |detail: String| ModelError::malformed(path, "safetensors file", detail);
    let len_bytes: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| {
        malformed(format!(
            "{} bytes: too short for the 8-byte header length",
            bytes.len()
        ))
    })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_SAFETENSORS_HEADER {
        return Err(malformed(format!(
            "header length {header_len} (bytes 0..8) is over the {MAX_SAFETENSORS_HEADER}-byte limit"
        )));
    }
    let data_start = 8 + header_len as usize;
    if data_start > bytes.len() {
        return Err(malformed(format!(
            "header length {header_len} (bytes 0..8) runs past the end of the {}-byte file",
            bytes.len()
        )));
    }
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| malformed(format!("{e:?}")))?;
    let mut infos: Vec<(String, &safetensors::tensor::TensorInfo)> = metadata.tensors().into_iter().collect();
    infos.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut entries = Vec::with_capacity(infos.len());
    for (name, info) in infos {
        let tensor_err = |detail: String| ModelError::Tensor {
            path: path.into(),
            name: name.clone(),
            detail,
        };
        if safetensors_kind(info.dtype).is_none() {
            return Err(tensor_err(format!("unsupported dtype {:?}", info.dtype)));
        }
        if info.shape.len() > MAX_SAFETENSORS_RANK {
            return Err(tensor_err(format!(
                "{} dimensions (at most {MAX_SAFETENSORS_RANK})",
                info.shape.len()
            )));
        }
        let shape = info
            .shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<std::result::Result<Vec<i64>, _>>()
            .map_err(|_| tensor_err(format!("shape {:?} has a dimension over i64::MAX", info.shape)))?;
        let expected = info
            .shape
            .iter()
            .try_fold(info.dtype.size(), |n, &d| n.checked_mul(d))
            .ok_or_else(|| tensor_err(format!("shape {:?} overflows a byte size", info.shape)))?;
        let (begin, end) = info.data_offsets;
        let data = data_start
            .checked_add(begin)
            .zip(data_start.checked_add(end))
            .map(|(s, e)| s..e)
            .filter(|d| d.start <= d.end && d.end <= bytes.len() && d.len() == expected)
            .ok_or_else(|| {
                tensor_err(format!(
                    "data_offsets [{begin}, {end}] are not {expected} bytes inside the {}-byte data section",
                    bytes.len() - data_start
                ))
            })?;
        entries.push(SafetensorsEntry {
            name,
            dtype: info.dtype,
            shape,
            data,
        });
    }
    let mut by_offset: Vec<&SafetensorsEntry> = entries.iter().collect();
    by_offset.sort_by_key(|e| (e.data.start, e.data.end));
    for pair in by_offset.windows(2) {
        if pair[1].data.start < pair[0].data.end {
            return Err(ModelError::Tensor {
                path: path.into(),
                name: pair[1].name.clone(),
                detail: format!(
                    "data {:?} overlaps {}'s {:?}",
                    pair[1].data, pair[0].name, pair[0].data
                ),
            });
        }
    }
    Ok(entries)
}

/// Reads every tensor of one `.safetensors` file (checked by [`read_safetensors_header`] first).
pub fn read_safetensors(path: &Path, opts: LoadOptions, out: &mut Weights) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let meta = file.metadata().map_err(|e| ModelError::io(path, e))?;
    if !meta.is_file() {
        return Err(ModelError::malformed(
            path,
            "safetensors file",
            "is not a regular file",
        ));
    }
    // SAFETY: read-only private mapping of a file we do not modify; see `GgufFile::open`.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    for entry in parse_safetensors(&map, path)? {
        let kind = safetensors_kind(entry.dtype).ok_or_else(|| ModelError::Tensor {
            path: path.into(),
            name: entry.name.clone(),
            detail: format!("unsupported dtype {:?}", entry.dtype),
        })?;
        let bytes = map.get(entry.data.clone()).ok_or_else(|| ModelError::Tensor {
            path: path.into(),
            name: entry.name.clone(),
            detail: format!("data {:?} lies outside the file", entry.data),
        })?;
        let t = Tensor::f_from_data_size(bytes, &entry.shape, kind)?;
        let t = if matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            t.f_to_kind(opts.dtype)?
        } else {
            t
        };
        if out.contains_key(&entry.name) {
            return Err(ModelError::Tensor {
                path: path.into(),
                name: entry.name,
                detail: "is also in another shard".into(),
            });
        }
        out.insert(entry.name, t.f_to_device(opts.device)?);
    }
    Ok(())
}

/// A shard named by `model.safetensors.index.json` must be a plain file name in the model directory: no path
/// separators, no `..`, not absolute, so a hostile index cannot make the loader map `/dev/zero` or another
/// directory's files.
fn shard_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && Path::new(name).file_name().is_some_and(|f| f == name)
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
        let mut files: Vec<&str> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().filter(|f| shard_name_ok(f)).ok_or_else(|| {
                ModelError::malformed(
                    &index,
                    "shard index",
                    format!("weight_map[{tensor:?}] is {file}, not a file name in the model directory"),
                )
            })?;
            files.push(file);
        }
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
/// GGUF names and HF names of the tensors outside the layers, and of each layer's modules (`blk.N.{gguf}` is
/// `model.layers.N.{hf}`): one table for reading GGUF and for writing it.
pub(crate) const FIXED_NAMES: [(&str, &str); 4] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("rope_freqs.weight", "rope_freqs.weight"),
];
pub(crate) const LAYER_MODULES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The HF name of a GGUF LLaMA tensor.
pub(crate) fn hf_name(gguf: &str) -> Option<String> {
    if let Some((_, hf)) = FIXED_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = suffix.rsplit_once('.')?;
    let (_, hf) = LAYER_MODULES.iter().find(|(g, _)| *g == module)?;
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

/// Reads every tensor of a LLaMA GGUF file under HF names: matrices of a type with a kernel stay as their blocks
/// when `opts.keep_quantized` (on the CPU), everything else is dequantized to `opts.dtype`.
pub fn read_gguf(file: &GgufFile, cfg: &Config, opts: LoadOptions) -> Result<(Weights, QuantTypes)> {
    let mut out = Weights::new();
    let mut quant = QuantTypes::new();
    for info in &file.tensors {
        let name = hf_name(&info.name).ok_or_else(|| ModelError::Tensor {
            path: file.path().into(),
            name: info.name.clone(),
            detail: "is not a LLaMA tensor camelid knows".into(),
        })?;
        let ty = info.ggml_type;
        let shape = info.torch_shape();
        let blocks = opts.keep_quantized
            && opts.device == Device::Cpu
            && crate::cpu_gemv::qdot::has_kernel(ty)
            && shape.len() == 2;
        let mut t = if blocks {
            // `[rows, row bytes]`: GGML blocks run along a row, so rows can be permuted as they are.
            let bytes = file.tensor_bytes(info);
            let expected = ty.byte_size(info.element_count());
            if expected != Some(bytes.len() as u64) {
                return Err(ModelError::Tensor {
                    path: file.path().into(),
                    name: info.name.clone(),
                    detail: format!("holds {} bytes, not whole {ty:?} rows", bytes.len()),
                });
            }
            quant.insert(name.clone(), ty);
            Tensor::f_from_slice(bytes)?.f_reshape([shape[0], -1])?
        } else {
            let values = file.dequantize(info)?;
            Tensor::f_from_slice(&values)?.f_reshape(shape)?
        };
        if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias") {
            t = unpermute_rows(&t, cfg.num_heads)?;
        } else if name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.k_proj.bias") {
            t = unpermute_rows(&t, cfg.num_kv_heads)?;
        }
        let t = if name == "rope_freqs.weight" || quant.contains_key(&name) {
            t
        } else {
            t.f_to_kind(opts.dtype)?
        };
        out.insert(name, t.f_to_device(opts.device)?);
    }
    Ok((out, quant))
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
