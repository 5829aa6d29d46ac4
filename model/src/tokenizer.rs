//! Tokenizers through HF `tokenizers`: read from `tokenizer.json`, or built from GGUF tokenizer metadata.
//!
//! GGUF tokenizers are turned into the equivalent `tokenizer.json` document and parsed by the same library, so both
//! paths share one encoder and decoder.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use serde_json::{Value as Json, json};
use tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::metaspace::PrependScheme;

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value};

/// Token ids and the byte range of `text` each one covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokensWithOffsets {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

/// A tokenizer plus the special-token facts that generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Built on first use by [`Tokenizer::encode_protected`]: copies that read special-token text as plain text.
    plain: OnceLock<PlainText>,
    /// Text of the BOS/EOS tokens, for chat templates that print them.
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos_token)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    fn new(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner,
            plain: OnceLock::new(),
            bos_token: None,
            eos_token: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::malformed(path, "tokenizer.json", e.to_string()))?;
        Ok(Self::new(inner))
    }

    pub fn from_json(json: &Json) -> Result<Self> {
        let inner: tokenizers::Tokenizer = serde_json::from_value(json.clone()).map_err(tok_err)?;
        Ok(Self::new(inner))
    }

    /// Sets the BOS/EOS token texts from their ids.
    pub fn with_special_ids(mut self, bos: Option<u32>, eos: Option<u32>) -> Self {
        self.bos_token = bos.and_then(|id| self.inner.id_to_token(id));
        self.eos_token = eos.and_then(|id| self.inner.id_to_token(id));
        self
    }

    /// Encodes text. Special tokens written in the text (`<|im_start|>`) become their ids; `add_special_tokens`
    /// adds what the tokenizer's post-processor adds (a BOS for LLaMA-2 style tokenizers). Only for text that is
    /// trusted as a whole: a chat prompt goes through [`Tokenizer::encode_protected`].
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Encodes text without added special tokens, with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<TokensWithOffsets> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(TokensWithOffsets {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Encodes `text` (no added special tokens) where special-token text inside the `protected` byte ranges (the
    /// messages' contents in a rendered chat prompt) is ordinary text, so a user who types `<|im_end|>` cannot end
    /// a turn or forge a system one; special tokens outside them (the template's own markers) stay special.
    ///
    /// A text with no special token inside a protected range encodes exactly as [`Tokenizer::encode`] does. Else the
    /// text is cut at the template's markers and each piece between them is encoded with special tokens read as
    /// text; `tokenizers` also encodes the pieces between special tokens independently, so the pieces without a
    /// forged marker get the same ids as before.
    pub fn encode_protected(&self, text: &str, protected: &[Range<usize>]) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let plain = self.plain();
        let mut markers = Vec::new();
        let mut forged = false;
        for (&id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            let Some(content) = plain.special.get(&id) else {
                continue;
            };
            // lstrip/rstrip tokens also cover the spaces around them: where the token's own text begins decides.
            let core = start
                + text
                    .get(start..end)
                    .and_then(|t| t.find(content.as_str()))
                    .unwrap_or(0);
            if protected.iter().any(|r| r.contains(&core)) {
                forged = true;
            } else {
                markers.push((start, end, id));
            }
        }
        if !forged {
            return Ok(enc.get_ids().to_vec());
        }
        let mut out = Vec::with_capacity(enc.len());
        let mut pos = 0;
        for (start, end, id) in markers {
            if start > pos {
                out.extend(plain.encode_piece(text, pos..start)?);
            }
            out.push(id);
            pos = pos.max(end);
        }
        if pos < text.len() {
            out.extend(plain.encode_piece(text, pos..text.len())?);
        }
        Ok(out)
    }

    /// Whether `text` holds the text of a special token (as the tokenizer matches them, normalization included).
    pub fn has_special_text(&self, text: &str) -> Result<bool> {
        let ids = self.encode(text, false)?;
        let special = &self.plain().special;
        Ok(ids.iter().any(|id| special.contains_key(id)))
    }

    fn plain(&self) -> &PlainText {
        self.plain.get_or_init(|| PlainText::of(&self.inner))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Writes the tokenizer as `tokenizer.json` (for exports).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(tok_err)
    }

    /// The tokenizer as `tokenizer.json` holds it.
    pub fn to_json(&self) -> Result<Json> {
        serde_json::to_value(&self.inner).map_err(tok_err)
    }

    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.model` `gpt2` or `llama`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let json = gguf_tokenizer_json(file)?;
        let id = |key: &str| file.get(key).and_then(Value::as_u64).map(|v| v as u32);
        Ok(Self::from_json(&json)?.with_special_ids(
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
        ))
    }
}

/// The tokenizer's special tokens and two copies of it that read their text as plain text: one for a piece at the
/// start of the text, one for a piece after a marker (a SentencePiece `Metaspace` with prepend scheme `first` puts
/// its `▁` only in front of the piece at offset 0, as `tokenizers` does when it encodes the text whole).
#[derive(Clone)]
struct PlainText {
    special: HashMap<u32, String>,
    first: tokenizers::Tokenizer,
    rest: tokenizers::Tokenizer,
}

impl PlainText {
    fn of(inner: &tokenizers::Tokenizer) -> Self {
        let special = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        let mut first = inner.clone();
        first.set_encode_special_tokens(true);
        let mut rest = first.clone();
        if let Some(pre) = rest.get_pre_tokenizer().cloned() {
            rest.with_pre_tokenizer(Some(without_first_prepend(pre)));
        }
        Self { special, first, rest }
    }

    fn encode_piece(&self, text: &str, range: Range<usize>) -> Result<Vec<u32>> {
        let tok = if range.start == 0 { &self.first } else { &self.rest };
        let piece = text.get(range.clone()).ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "bytes {range:?} of the prompt are not on character boundaries"
            ))
        })?;
        Ok(tok.encode(piece, false).map_err(tok_err)?.get_ids().to_vec())
    }
}

/// The pre-tokenizer with each `Metaspace` prepend scheme `first` turned into `never`.
fn without_first_prepend(pre: PreTokenizerWrapper) -> PreTokenizerWrapper {
    match pre {
        PreTokenizerWrapper::Metaspace(mut m) => {
            if m.get_prepend_scheme() == PrependScheme::First {
                m.set_prepend_scheme(PrependScheme::Never);
            }
            PreTokenizerWrapper::Metaspace(m)
        }
        PreTokenizerWrapper::Sequence(seq) => {
            PreTokenizerWrapper::Sequence(tokenizers::pre_tokenizers::sequence::Sequence::new(
                seq.into_iter().map(without_first_prepend).collect(),
            ))
        }
        other => other,
    }
}

/// GPT-2's reversible byte → printable-character map.
fn bytes_to_unicode() -> HashMap<u8, char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = HashMap::new();
    let mut extra = 0u32;
    for b in 0u32..=255 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map.insert(b as u8, char::from_u32(c).unwrap_or('?'));
    }
    map
}

const GGUF_CONTROL: u64 = 3;
/// The sum of squared token lengths a SentencePiece vocabulary may have when its merges are derived (about a
/// second of work; real vocabularies need under 1% of it).
const MERGE_DERIVATION_BUDGET: u64 = 1 << 30;
const GGUF_USER_DEFINED: u64 = 4;

/// llama.cpp's pre-tokenizer splits by `tokenizer.ggml.pre`, as HF pre-tokenizer JSON. Unknown names use GPT-2's.
fn byte_level_pre_tokenizer(pre: &str) -> Json {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false)]})
    };
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        // SmolLM and StarCoder vocabularies were trained with every digit on its own (llama.cpp's `smollm`,
        // `starcoder`, `refact` pre types; the published tokenizer.json uses Digits + ByteLevel).
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => split(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2),
        _ => byte_level(true),
    }
}

/// llama.cpp's pre-tokenizer name for a byte-level pre-tokenizer: the one whose rules [`byte_level_pre_tokenizer`]
/// rebuilds exactly, else `default`.
pub fn pre_tokenizer_name(pre: &Json) -> &'static str {
    ["smollm", "llama-bpe", "qwen2"]
        .into_iter()
        .find(|name| byte_level_pre_tokenizer(name) == *pre)
        .unwrap_or("default")
}

fn string_array<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let arr = file
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| ModelError::malformed(file.path(), "GGUF tokenizer", format!("missing {key}")))?;
    arr.iter()
        .map(|v| {
            v.as_str().ok_or_else(|| {
                ModelError::malformed(file.path(), "GGUF tokenizer", format!("{key} holds a non-string"))
            })
        })
        .collect()
}

fn added_token(id: usize, content: &str, special: bool) -> Json {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

/// The `tokenizer.json` document equivalent to a GGUF file's tokenizer metadata.
pub fn gguf_tokenizer_json(file: &GgufFile) -> Result<Json> {
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("<missing>");
    let tokens = string_array(file, "tokenizer.ggml.tokens")?;
    let types: Vec<u64> = file
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    match model {
        "gpt2" => {
            let spelling = bytes_to_unicode();
            let alphabet: HashSet<char> = spelling.values().copied().collect();
            let mut vocab = serde_json::Map::new();
            let mut added = Vec::new();
            for (id, tok) in tokens.iter().enumerate() {
                let spelled = if tok.chars().all(|c| alphabet.contains(&c)) {
                    (*tok).to_string()
                } else {
                    tok.bytes().map(|b| spelling[&b]).collect()
                };
                vocab.insert(spelled, json!(id));
                let ty = types.get(id).copied().unwrap_or(1);
                if ty == GGUF_CONTROL && tok.chars().all(|c| alphabet.contains(&c)) {
                    added.push(added_token(id, tok, true));
                } else if ty == GGUF_USER_DEFINED {
                    added.push(added_token(id, tok, false));
                }
            }
            let merges = string_array(file, "tokenizer.ggml.merges")?;
            let pre = file
                .get("tokenizer.ggml.pre")
                .and_then(Value::as_str)
                .unwrap_or("default");
            Ok(json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
                "pre_tokenizer": byte_level_pre_tokenizer(pre),
                "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            }))
        }
        "llama" => sentencepiece_json(file, &tokens, &types),
        other => Err(ModelError::Unsupported(format!(
            "GGUF tokenizer model {other:?} (supported: gpt2 byte-level BPE, llama SentencePiece)"
        ))),
    }
}

/// LLaMA/Mistral SentencePiece BPE: merges derived from the vocabulary scores (as transformers does), byte fallback
/// for `<0xNN>` tokens, `▁` for spaces.
fn sentencepiece_json(file: &GgufFile, tokens: &[&str], types: &[u64]) -> Result<Json> {
    let scores: Vec<f64> = file
        .get("tokenizer.ggml.scores")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect())
        .ok_or_else(|| {
            ModelError::malformed(file.path(), "GGUF tokenizer", "missing tokenizer.ggml.scores")
        })?;
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    // Deriving a token's merges hashes every split of it: quadratic in its length. Real vocabularies cost a few
    // million; a hostile file of long tokens would hold the loader for hours.
    let mut work = 0u64;
    let derive = file.get("tokenizer.ggml.merges").is_none();
    for (id, tok) in tokens.iter().enumerate().filter(|_| derive) {
        work = work.saturating_add((tok.len() as u64).saturating_pow(2));
        if work > MERGE_DERIVATION_BUDGET {
            return Err(ModelError::malformed(
                file.path(),
                "GGUF tokenizer",
                format!(
                    "tokenizer.ggml.tokens[{id}]: the tokens are too long in all to derive merges from \
                     (give tokenizer.ggml.merges)"
                ),
            ));
        }
        let mut local: Vec<(&str, &str, f64)> = tok
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&tok[..i], &tok[i..]))
            .filter(|(l, r)| index.contains_key(l) && index.contains_key(r))
            .map(|(l, r)| (l, r, scores.get(id).copied().unwrap_or(0.0)))
            .collect();
        local.sort_by_key(|(l, r, _)| (index[l], index[r]));
        merges.extend(local);
    }
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then(b.0.chars().count().cmp(&a.0.chars().count()))
            .then(b.1.chars().count().cmp(&a.1.chars().count()))
    });
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        match types.get(id).copied().unwrap_or(1) {
            GGUF_CONTROL => added.push(added_token(id, tok, true)),
            GGUF_USER_DEFINED => added.push(added_token(id, tok, false)),
            _ => {}
        }
    }
    let unk = file
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(Value::as_u64)
        .and_then(|id| tokens.get(id as usize))
        .copied()
        .unwrap_or("<unk>");
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t).to_string(), json!(i)))
        .collect();
    let merges: Vec<Json> = match file.get("tokenizer.ggml.merges") {
        Some(_) => string_array(file, "tokenizer.ggml.merges")?
            .into_iter()
            .map(Json::from)
            .collect(),
        None => merges.iter().map(|(l, r, _)| json!([l, r])).collect(),
    };
    let add_prefix = file
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    // Spaces become `▁` and one is put in front of the text, as transformers' LlamaTokenizer does (Metaspace).
    let prepend_scheme = if add_prefix { "first" } else { "never" };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": prepend_scheme, "split": false},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}
