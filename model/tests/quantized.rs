//! Quantized models end to end on the real SmolLM2-135M-Instruct: `camelid quantize`'s writer turns an HF
//! directory into GGUF files, camelid runs them on their blocks, and transformers (through gguf-py, llama.cpp's
//! own GGUF reader) runs the same files dequantized to f32. Also: a quantized model gives a sequence the same bits
//! alone or in a batch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use camelid_model::cpu_gemv::with_decode_pool;
use camelid_model::gguf_export::write_quantized_gguf;
use camelid_model::quant::GgmlType;
use camelid_model::{ChatMessage, GenerateRequest, LoadOptions, LoadedModel, SamplingParams};
use camelid_test_support::{python, workspace};
use serde_json::{Value, json};
use tch::Kind;

const MAX_NEW_TOKENS: usize = 24;

fn prompts() -> Vec<Vec<ChatMessage>> {
    [
        "What is the capital of France?",
        "Name three uses of a llama.",
        "Explain in one sentence what a camel's hump stores.",
        "Write a haiku about the desert.",
    ]
    .into_iter()
    .map(|q| vec![ChatMessage::new("user", q)])
    .collect()
}

fn quantized(path: &Path) -> LoadedModel {
    let opts = LoadOptions {
        keep_quantized: true,
        ..LoadOptions::default()
    };
    camelid_model::load(path, opts).unwrap()
}

fn greedy(loaded: &LoadedModel, prompt_ids: Vec<u32>) -> Vec<u32> {
    let request = GenerateRequest {
        prompt_ids,
        max_tokens: MAX_NEW_TOKENS,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        eos_token_ids: loaded.eos_token_ids.clone(),
    };
    camelid_model::generate(&loaded.model, &loaded.tokenizer, &request, |_| true)
        .unwrap()
        .token_ids
}

/// transformers' prompt and greedy ids for each file and prompt.
fn transformers_greedy(dir: &Path, files: &[(&str, PathBuf)]) -> Value {
    let files: serde_json::Map<String, Value> =
        files.iter().map(|(k, p)| (k.to_string(), json!(p))).collect();
    let request = json!({"files": files, "prompts": prompts(), "max_new_tokens": MAX_NEW_TOKENS});
    let (req, out) = (dir.join("request.json"), dir.join("greedy.json"));
    std::fs::write(&req, request.to_string()).unwrap();
    let status = Command::new(python())
        .arg(workspace().join("tests/python/gguf_greedy.py"))
        .args([&req, &out])
        .status()
        .expect("run gguf_greedy.py");
    assert!(status.success(), "gguf_greedy.py failed: {status}");
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// How many tokens of `ours` agree with `theirs` from the start (EOS and what follows cut from `theirs`), and the
/// longer answer's length.
fn agreement(loaded: &LoadedModel, ours: &[u32], theirs: &Value) -> (usize, usize) {
    let mut theirs = ids(theirs);
    if let Some(end) = theirs.iter().position(|t| loaded.eos_token_ids.contains(t)) {
        theirs.truncate(end);
    }
    let same = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
    (same, ours.len().max(theirs.len()))
}

/// How far apart two runs of the same ggml arithmetic that differ only in the order of their sums put the lead of
/// a greedy token over the runner-up: each product's input is rounded to 8-bit blocks, and a last-bit difference
/// that flips one value's rounding moves it by a step of 1/127 of its block's largest value, so the orders'
/// tiny differences grow layer by layer. Measured on this test's Q8_0 file and prompts: the reference in f32
/// against itself in f64 moved the lead by up to 0.57 logits (median about 0.1); 1.0 leaves room for other
/// machines' orders, and stays under the leads a wrong product gives up (greedy tokens here mostly lead by 1 to 6).
const ORDER_NOISE: f64 = 1.0;

/// The reference that does llama.cpp's arithmetic (transformers with each projection's input rounded to ggml's
/// 8-bit blocks) must give camelid's Q8_0 greedy answers token for token until a near-tie: a step where the
/// reference's token led by less than [`ORDER_NOISE`], which the order of sums alone can flip. Where they part
/// there, the rest are two continuations of different text and are not compared. Against plain transformers
/// (f32 inputs) the answers part at near-ties, as llama.cpp's do (SmolLM2-135M's first token for "What is the
/// capital of France?" is one): that share is printed, not held to a bound.
#[test]
fn quantized_files_from_an_hf_directory_run_on_their_blocks_as_llama_cpp_computes() {
    let _g = tch::no_grad_guard();
    let dir = workspace().join("target/quantized-test");
    std::fs::create_dir_all(&dir).unwrap();
    // The HF directory a fine-tune would be: the shipped model exported.
    let shipped = camelid_model::load(
        &camelid_model::default_model_path().unwrap(),
        LoadOptions::default(),
    )
    .unwrap();
    let hf_dir = dir.join("smollm2-hf");
    camelid_model::export_hf_dir(&shipped, &hf_dir, Kind::Float).unwrap();
    let source = camelid_model::load(&hf_dir, LoadOptions::default()).unwrap();
    let f32_bytes = source.model.weight_bytes();
    let mut files = Vec::new();
    for (key, ty) in [("q8_0", GgmlType::Q8_0), ("q4_k", GgmlType::Q4K)] {
        let path = dir.join(format!("smollm2-{key}.gguf"));
        let report = write_quantized_gguf(&source, ty, &path).unwrap();
        assert!(
            report.tensors.iter().any(|(_, t)| *t == ty),
            "{key}: no tensor of the asked type"
        );
        files.push((key, path));
    }
    let reference = transformers_greedy(&dir, &files);
    for (key, path) in &files {
        let loaded = quantized(path);
        assert!(loaded.model.is_quantized(), "{key} loads as blocks");
        assert!(
            loaded.model.weight_bytes() * 3 < f32_bytes,
            "{key}: blocks take a third of f32 or less"
        );
        let (mut same, mut total) = ((0, 0), (0, 0));
        for (i, messages) in prompts().iter().enumerate() {
            let prompt_ids = loaded.chat_prompt(messages).unwrap();
            assert_eq!(
                prompt_ids,
                ids(&reference[key]["f32"][i]["prompt_ids"]),
                "{key} prompt {i}: the file's template and vocabulary"
            );
            let ours = greedy(&loaded, prompt_ids);
            let ggml_run = &reference[key]["ggml"][i];
            let ggml = agreement(&loaded, &ours, &ggml_run["greedy_ids"]);
            if *key == "q8_0" && ggml.0 < ggml.1 {
                let lead = ggml_run["margins"][ggml.0]
                    .as_f64()
                    .expect("the reference's lead at every step it took");
                assert!(
                    lead < ORDER_NOISE,
                    "{key} prompt {i}: parts from ggml's arithmetic at token {} where its token led by {lead:.3}",
                    ggml.0
                );
            }
            let f32 = agreement(&loaded, &ours, &reference[key]["f32"][i]["greedy_ids"]);
            eprintln!(
                "{key} prompt {i}: {:?}; agrees with ggml arithmetic {ggml:?}, with f32 {f32:?}",
                loaded.tokenizer.decode(&ours, true).unwrap()
            );
            (same.0, same.1) = (same.0 + ggml.0, same.1 + f32.0);
            (total.0, total.1) = (total.0 + ggml.1, total.1 + f32.1);
        }
        eprintln!("{key}: {same:?} of {total:?} tokens agree (ggml arithmetic, f32)");
        if *key == "q8_0" {
            // Near-ties part answers, but not most of them: measured 66 of 94 tokens (94 with other kernels).
            assert!(
                same.0 * 2 >= total.0,
                "{key}: only {} of {} tokens follow ggml's arithmetic",
                same.0,
                total.0
            );
        } else {
            // Q4_1 blocks (the K-quant's fallback for 576-wide rows) add `m * s` with the activation block's sum
            // `s` stored in f16, as ggml's Q8_1 does; the reference does not round it, so near-ties may part.
            // Measured: 59 of 96 tokens with the ggml reference, 72 with f32.
            let best = same.0.max(same.1);
            assert!(
                best * 2 >= total.0,
                "{key}: only {best} of {} tokens agree",
                total.0
            );
        }
    }
}

#[test]
fn a_quantized_model_gives_each_sequence_the_same_bits_alone_or_in_a_batch() {
    let _g = tch::no_grad_guard();
    // The shipped Q4_1 file (its embedding is Q8_0): both 32-value kernels, single-row and batched tiles.
    let loaded = quantized(&camelid_model::default_model_path().unwrap());
    assert!(loaded.model.is_quantized());
    let model = &loaded.model;
    let prompts: Vec<Vec<u32>> = ["Hello there", "Why is the sky blue? Explain.", "1 2 3 4 5 6 7"]
        .iter()
        .map(|p| loaded.tokenizer.encode(p, false).unwrap())
        .collect();
    with_decode_pool(|pool| {
        let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let runs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let batched = model.forward_step(&runs, &mut refs, Some(pool)).unwrap();
        let next: Vec<u32> = (0..prompts.len())
            .map(|i| batched.get(i as i64).argmax(-1, false).int64_value(&[]) as u32)
            .collect();
        let stepped = model.decode_step(&next, &mut refs, Some(pool)).unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let mut alone = model.new_cache();
            let first = model
                .forward_step(&[prompt], &mut [&mut alone], Some(pool))
                .unwrap();
            assert!(
                first.get(0).equal(&batched.get(i as i64)),
                "prompt {i}: prefill differs in a batch"
            );
            let second = model.forward_last_in(&[next[i]], &mut alone, Some(pool)).unwrap();
            assert!(
                second.equal(&stepped.get(i as i64)),
                "prompt {i}: decode step differs in a batch"
            );
        }
    });
}
