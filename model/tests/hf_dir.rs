//! Loading an HF model directory end to end with a tiny model the test writes: config, safetensors, tokenizer,
//! generation config; the `vicuna_v1.1` fallback for models without a chat template, with BOS as FastChat adds it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use camelid_model::config::Config;
use camelid_model::{
    ChatMessage, ChatTemplate, FinishReason, GenerateRequest, Llama, LoadOptions, SamplingParams,
};
use serde_json::json;
use tch::{Device, Kind, Tensor};

/// A character-level tokenizer over printable ASCII whose post-processor adds `<s>`, like LLaMA-2's.
fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, special) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(special.to_string(), json!(i));
    }
    for c in ' '..='~' {
        let id = vocab.len();
        vocab.insert(c.to_string(), json!(id));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null, "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

fn write_model_dir(dir: &Path, tokenizer_config: Option<serde_json::Value>) -> Config {
    std::fs::create_dir_all(dir).unwrap();
    let tokenizer = tokenizer_json();
    let vocab_size = tokenizer["model"]["vocab"].as_object().unwrap().len();
    let config = Config {
        vocab_size,
        ..Config::tiny(4, 2, false)
    };
    std::fs::write(
        dir.join("config.json"),
        json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab_size,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads, "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        json!({"eos_token_id": [2, 5]}).to_string(),
    )
    .unwrap();
    if let Some(tc) = tokenizer_config {
        std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    }
    let model = Llama::random(config.clone(), Kind::Float, Device::Cpu, 11).unwrap();
    Tensor::write_safetensors(&model.named_parameters(), dir.join("model.safetensors")).unwrap();
    config
}

fn temp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("camelid-{name}-{}", std::process::id()))
}

#[test]
fn hf_directory_without_chat_template_uses_vicuna_with_bos() {
    let dir = temp_dir("hf-vicuna");
    let config = write_model_dir(&dir, None);
    let loaded = camelid_model::load(&dir, LoadOptions::default()).unwrap();
    assert_eq!(loaded.config(), &config);
    assert!(matches!(loaded.template, ChatTemplate::Vicuna));
    assert_eq!(
        loaded.eos_token_ids,
        [2, 5],
        "config and generation_config EOS ids are merged"
    );

    let messages = [ChatMessage::new("user", "Hi there")];
    let ids = loaded.chat_prompt(&messages).unwrap();
    assert_eq!(
        ids[0], 1,
        "FastChat tokenizes vicuna prompts with the tokenizer's BOS"
    );
    assert_ne!(ids[1], 1, "exactly one BOS");
    let text = loaded.tokenizer.decode(&ids[1..], false).unwrap();
    assert_eq!(text, ChatTemplate::Vicuna.render(&messages, true).unwrap());

    let request = GenerateRequest {
        prompt_ids: ids,
        max_tokens: 5,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        eos_token_ids: vec![],
    };
    let done = camelid_model::generate(&loaded.model, &loaded.tokenizer, &request, |_| true).unwrap();
    assert_eq!(
        (done.token_ids.len(), done.finish_reason),
        (5, FinishReason::Length)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tokenizer_config_can_turn_bos_off_and_supply_a_template() {
    let dir = temp_dir("hf-nobos");
    write_model_dir(&dir, Some(json!({"add_bos_token": false})));
    let loaded = camelid_model::load(&dir, LoadOptions::default()).unwrap();
    let ids = loaded.chat_prompt(&[ChatMessage::new("user", "Hi")]).unwrap();
    assert_ne!(ids[0], 1);
    std::fs::remove_dir_all(&dir).unwrap();

    let dir = temp_dir("hf-jinja");
    write_model_dir(
        &dir,
        Some(
            json!({"chat_template": "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
                    "bos_token": "<s>"}),
        ),
    );
    let loaded = camelid_model::load(&dir, LoadOptions::default()).unwrap();
    let ids = loaded.chat_prompt(&[ChatMessage::new("user", "Hi")]).unwrap();
    assert_eq!(loaded.tokenizer.decode(&ids, false).unwrap(), "<s><user>Hi");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn broken_directories_say_what_is_missing() {
    let dir = temp_dir("hf-broken");
    write_model_dir(&dir, None);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = camelid_model::load(&dir, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::write(dir.join("model.safetensors"), b"garbage").unwrap();
    let err = camelid_model::load(&dir, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("safetensors"), "{err}");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = camelid_model::load(&dir, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let err = camelid_model::load(&dir, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
