//! Tiny random-weight models built in the test: the KV cache must reproduce full recomputation exactly (GQA and
//! multi-head, tied and untied embeddings), and a GGUF written with llama.cpp's layout must load back to the same
//! model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use camelid_model::config::Config;
use camelid_model::gguf::{Value, writer};
use camelid_model::quant::GgmlType;
use camelid_model::{Llama, weights::Weights};
use tch::{Device, Kind, Tensor};

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
}

fn full_logits(model: &Llama, ids: &[u32]) -> Tensor {
    let t: Vec<i64> = ids.iter().map(|&x| i64::from(x)).collect();
    model
        .forward(&Tensor::from_slice(&t).unsqueeze(0), None)
        .unwrap()
        .squeeze_dim(0)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn check_cache_equals_recompute(config: Config) {
    check_cache_equals_recompute_in(config, Kind::Float, 1e-5);
}

fn check_cache_equals_recompute_in(config: Config, kind: Kind, tolerance: f64) {
    let _g = tch::no_grad_guard();
    let model = Llama::random(config.clone(), kind, Device::Cpu, 42).unwrap();
    let ids = tokens(12, config.vocab_size);
    let full = full_logits(&model, &ids);
    // Prefill 5, then a chunk of 3 (needs the offset causal mask), then one at a time.
    let mut cache = model.new_cache();
    let mut rows = vec![];
    for chunk in [&ids[0..5], &ids[5..8]] {
        let t: Vec<i64> = chunk.iter().map(|&x| i64::from(x)).collect();
        rows.push(
            model
                .forward(&Tensor::from_slice(&t).unsqueeze(0), Some(&mut cache))
                .unwrap()
                .squeeze_dim(0),
        );
    }
    // Single tokens alternate between libtorch and the CPU decode kernel; both must agree with recomputation.
    camelid_model::cpu_gemv::with_decode_pool(|pool| {
        for (i, &id) in ids[8..].iter().enumerate() {
            let pool = (i % 2 == 0).then_some(pool);
            rows.push(
                model
                    .forward_last_in(&[id], &mut cache, pool)
                    .unwrap()
                    .unsqueeze(0),
            );
        }
    });
    assert_eq!(cache.len(), ids.len());
    let stepped = Tensor::cat(&rows, 0);
    let diff = max_diff(&full, &stepped);
    eprintln!(
        "{kind:?}: max |logit| {}, max |diff| {diff}",
        full.abs().max().double_value(&[])
    );
    assert!(
        diff < tolerance,
        "{kind:?}: cached decoding differs from recomputation by {diff}"
    );
}

#[test]
fn kv_cache_equals_recompute_in_bf16() {
    // bf16 weights; on CPU attention and the cache run in f32, products through libtorch and the decode kernel.
    check_cache_equals_recompute_in(Config::tiny(4, 2, true), Kind::BFloat16, 2e-3);
}

#[test]
fn kv_cache_equals_recompute_with_gqa_and_tied_embeddings() {
    check_cache_equals_recompute(Config::tiny(4, 2, true));
}

#[test]
fn kv_cache_equals_recompute_with_mha_and_untied_embeddings() {
    check_cache_equals_recompute(Config::tiny(2, 2, false));
}

#[test]
fn kv_cache_equals_recompute_with_multi_query_attention() {
    check_cache_equals_recompute(Config::tiny(4, 1, false));
}

#[test]
fn batched_forward_equals_single_sequences() {
    let _g = tch::no_grad_guard();
    let config = Config::tiny(4, 2, true);
    let model = Llama::random(config.clone(), Kind::Float, Device::Cpu, 3).unwrap();
    let (a, b) = (tokens(6, 97), tokens(7, 97)[1..].to_vec());
    let batch: Vec<i64> = a.iter().chain(&b).map(|&x| i64::from(x)).collect();
    let both = model
        .forward(&Tensor::from_slice(&batch).view([2, 6]), None)
        .unwrap();
    assert!(max_diff(&both.get(0), &full_logits(&model, &a)) < 1e-5);
    assert!(max_diff(&both.get(1), &full_logits(&model, &b)) < 1e-5);
}

#[test]
fn context_overflow_is_an_error_not_a_panic() {
    let model = Llama::random(Config::tiny(2, 2, true), Kind::Float, Device::Cpu, 1).unwrap();
    let mut cache = model.new_cache();
    let err = model.forward_last(&tokens(300, 97), &mut cache).unwrap_err();
    assert_eq!(err.category(), "context_overflow", "{err}");
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let config = Config::tiny(2, 2, true);
    let model = Llama::random(config.clone(), Kind::Float, Device::Cpu, 1).unwrap();
    let mut weights: Weights = model
        .named_parameters()
        .into_iter()
        .map(|(k, t)| (k, t.copy()))
        .collect();
    weights.remove("model.layers.1.mlp.up_proj.weight");
    let err = Llama::from_weights(config.clone(), weights)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    let mut weights: Weights = model
        .named_parameters()
        .into_iter()
        .map(|(k, t)| (k, t.copy()))
        .collect();
    weights.insert(
        "model.norm.weight".into(),
        Tensor::ones([3], (Kind::Float, Device::Cpu)),
    );
    let err = Llama::from_weights(config, weights).unwrap_err().to_string();
    assert!(
        err.contains("model.norm.weight") && err.contains("shape"),
        "{err}"
    );
}

/// llama.cpp's `permute` from convert_hf_to_gguf.py, applied to Q/K rows when writing GGUF.
fn llama_cpp_permute(t: &Tensor, heads: i64) -> Tensor {
    let s = t.size();
    t.reshape([heads, 2, s[0] / heads / 2, s[1]])
        .transpose(1, 2)
        .reshape([s[0], s[1]])
}

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, module) = rest.split_once('.').unwrap();
    let module = module.strip_suffix(".weight").unwrap();
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("{other}"),
    };
    format!("blk.{layer}.{short}.weight")
}

fn write_gguf(model: &Llama, ty: GgmlType, path: &std::path::Path) {
    let c = model.config();
    let u32v = |v: usize| Value::U32(v as u32);
    let metadata = vec![
        ("general.architecture".to_string(), Value::String("llama".into())),
        ("llama.context_length".into(), u32v(c.max_position_embeddings)),
        ("llama.embedding_length".into(), u32v(c.hidden_size)),
        ("llama.block_count".into(), u32v(c.num_layers)),
        ("llama.feed_forward_length".into(), u32v(c.intermediate_size)),
        ("llama.attention.head_count".into(), u32v(c.num_heads)),
        ("llama.attention.head_count_kv".into(), u32v(c.num_kv_heads)),
        ("llama.rope.freq_base".into(), Value::F32(c.rope_theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("llama.vocab_size".into(), u32v(c.vocab_size)),
    ];
    let mut tensors = vec![];
    for (name, t) in model.named_parameters() {
        let mut t = t.copy();
        if name.ends_with("q_proj.weight") {
            t = llama_cpp_permute(&t, c.num_heads as i64);
        } else if name.ends_with("k_proj.weight") {
            t = llama_cpp_permute(&t, c.num_kv_heads as i64);
        }
        let values = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        let is_matrix = t.dim() == 2;
        let (ggml_type, data) = match ty {
            GgmlType::Q8_0 if is_matrix => (ty, camelid_model::quant::quantize_q8_0(&values)),
            GgmlType::Q4_1 if is_matrix => (ty, camelid_model::quant::quantize_q4_1(&values)),
            _ => (
                GgmlType::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        };
        tensors.push(writer::RawTensor {
            name: gguf_name(&name),
            dims: t.size().iter().rev().map(|&d| d as u64).collect(),
            ggml_type,
            data,
        });
    }
    std::fs::write(path, writer::to_bytes(&metadata, &tensors)).unwrap();
}

#[test]
fn gguf_with_llama_cpp_layout_loads_back_to_the_same_model() {
    let _g = tch::no_grad_guard();
    let dir = std::env::temp_dir().join(format!("camelid-tiny-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (config, ty, tolerance) in [
        (Config::tiny(4, 2, false), GgmlType::F32, 1e-5),
        (Config::tiny(4, 2, true), GgmlType::Q8_0, 0.05),
        (Config::tiny(4, 1, false), GgmlType::Q4_1, 0.5),
    ] {
        let model = Llama::random(config.clone(), Kind::Float, Device::Cpu, 9).unwrap();
        let path = dir.join(format!("tiny-{ty:?}.gguf"));
        write_gguf(&model, ty, &path);
        let file = camelid_model::gguf::GgufFile::open(&path).unwrap();
        let read_config = Config::from_gguf(&file).unwrap();
        assert_eq!(read_config.tie_word_embeddings, config.tie_word_embeddings);
        assert_eq!(
            (read_config.num_heads, read_config.num_kv_heads),
            (config.num_heads, config.num_kv_heads)
        );
        let (weights, _) =
            camelid_model::weights::read_gguf(&file, &read_config, Default::default()).unwrap();
        let back = Llama::from_weights(read_config, weights).unwrap();
        let ids = tokens(10, config.vocab_size);
        let diff = max_diff(&full_logits(&model, &ids), &full_logits(&back, &ids));
        assert!(diff < tolerance, "{ty:?}: logits differ by {diff}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let model = Llama::random(Config::tiny(2, 2, true), Kind::Float, Device::Cpu, 1).unwrap();
    let dir = std::env::temp_dir().join(format!("camelid-trunc-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.gguf");
    write_gguf(&model, GgmlType::F32, &path);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = camelid_model::gguf::GgufFile::open(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated") || err.contains("past the end"), "{err}");
    std::fs::write(&path, b"not a gguf").unwrap();
    assert!(
        camelid_model::gguf::GgufFile::open(&path)
            .unwrap_err()
            .to_string()
            .contains("magic")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sharded_safetensors_directory_loads_every_shard() {
    let _g = tch::no_grad_guard();
    let config = Config::tiny(4, 2, false);
    let model = Llama::random(config.clone(), Kind::Float, Device::Cpu, 5).unwrap();
    let dir = std::env::temp_dir().join(format!("camelid-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let params = model.named_parameters();
    let (first, second) = params.split_at(params.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        Tensor::write_safetensors(part, dir.join(file)).unwrap();
        for (name, _) in part {
            weight_map.insert(name.clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let weights = camelid_model::weights::read_hf_dir(&dir, Default::default()).unwrap();
    let back = Llama::from_weights(config, weights).unwrap();
    let ids = tokens(9, 97);
    assert!(max_diff(&full_logits(&model, &ids), &full_logits(&back, &ids)) == 0.0);

    // An index that names a tensor no shard holds is an error that names it.
    let mut broken = index.clone();
    broken["weight_map"]["model.extra.weight"] = serde_json::json!("model-00001-of-00002.safetensors");
    std::fs::write(dir.join("model.safetensors.index.json"), broken.to_string()).unwrap();
    let err = camelid_model::weights::read_hf_dir(&dir, Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.extra.weight"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
