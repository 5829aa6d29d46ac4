//! Writing a model as an HF directory (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`, `chat_template.jinja`) that camelid and transformers load.

use std::path::Path;

use serde_json::json;
use tch::Kind;

use crate::error::{ModelError, Result};
use crate::template::{ChatTemplate, VICUNA_JINJA};
use crate::{LoadedModel, weights};

/// Writes `model` into `dir` (created if missing) with its weights cast to `dtype`.
///
/// Tied embeddings are written once (`model.embed_tokens.weight`), as transformers does. The chat template is
/// the one the model was trained with; `vicuna_v1.1` is written as an equivalent Jinja template that camelid
/// recognizes and loads back as `vicuna_v1.1`.
pub fn export_hf_dir(model: &LoadedModel, dir: &Path, dtype: Kind) -> Result<()> {
    let _span = tracing::info_span!("export", dir = %dir.display()).entered();
    if model.model.is_quantized() {
        return Err(ModelError::Unsupported(
            "exporting a model loaded with quantized weights: load it with --dtype f32 (or bf16) to export"
                .into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let write_json = |name: &str, value: &serde_json::Value| -> Result<()> {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| ModelError::Unsupported(format!("cannot serialize {name}: {e}")))?;
        std::fs::write(&path, text + "\n").map_err(|e| ModelError::io(&path, e))
    };
    let config = model.config();
    let mut hf_config = config.to_hf_json();
    hf_config["torch_dtype"] = json!(dtype_name(dtype)?);
    write_json("config.json", &hf_config)?;

    let tensors = model
        .model
        .named_parameters()
        .into_iter()
        .map(|(name, t)| Ok((name, t.f_detach()?.f_to_kind(dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    weights::write_safetensors(&dir.join("model.safetensors"), &tensors)?;

    model.tokenizer.save(&dir.join("tokenizer.json"))?;
    let template = match &model.template {
        ChatTemplate::Vicuna => VICUNA_JINJA.to_string(),
        ChatTemplate::Jinja { source, .. } => source.clone(),
    };
    let jinja_path = dir.join("chat_template.jinja");
    std::fs::write(&jinja_path, &template).map_err(|e| ModelError::io(&jinja_path, e))?;
    write_json(
        "tokenizer_config.json",
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": model.tokenizer.bos_token,
            "eos_token": model.tokenizer.eos_token,
            "add_bos_token": model.prompt_bos.is_some(),
            "clean_up_tokenization_spaces": false,
            "model_max_length": config.max_position_embeddings,
        }),
    )?;
    write_json(
        "generation_config.json",
        &json!({
            "bos_token_id": config.bos_token_id,
            "eos_token_id": model.eos_token_ids,
            "pad_token_id": config.pad_token_id,
        }),
    )?;
    Ok(())
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        other => {
            return Err(ModelError::Unsupported(format!(
                "export dtype {other:?} (use f32, bf16 or f16)"
            )));
        }
    })
}
