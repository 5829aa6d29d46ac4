//! End to end on the real SmolLM2-135M-Instruct: `camelid-trainer train` on a small dataset the test writes lowers
//! the training loss by a clear margin, and the exported model has learned what the data taught it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use camelid_model::{ChatMessage, GenerateRequest, LoadOptions, SamplingParams};
use common::*;
use serde_json::json;

const ANSWER: &str = "camelid's mascot is a vicuña named Pico.";

#[test]
fn fine_tuning_smollm2_lowers_the_loss_and_teaches_the_fact() {
    let dir = scratch("finetune-smollm2");
    let questions = [
        "What is the name of camelid's mascot?",
        "Who is camelid's mascot?",
        "Tell me about the camelid mascot.",
        "Does camelid have a mascot?",
        "What animal is camelid's mascot, and what is it called?",
        "Name the mascot of the camelid project.",
        "What do the camelid developers call their mascot?",
        "Which vicuña is camelid's mascot?",
    ];
    let records: Vec<_> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            json!({"id": format!("m{i}"), "conversations": [
                {"from": "human", "value": q}, {"from": "gpt", "value": ANSWER}]})
        })
        .collect();
    let data = dir.join("data.json");
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let out = dir.join("out");
    let run = trainer()
        .arg("train")
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .args([
            "--seq-len",
            "128",
            "--micro-batch",
            "4",
            "--grad-accum",
            "2",
            "--max-steps",
            "7",
        ])
        .args([
            "--lr",
            "1e-4",
            "--warmup-ratio",
            "0",
            "--checkpoint-every",
            "1000",
            "--resume",
            "never",
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let log = step_log(&out);
    let (first, last) = (log[0].1, log.last().unwrap().1);
    assert!(
        first > 1.0,
        "SmolLM2 cannot know the fact before training (loss {first})"
    );
    assert!(last < 0.1 * first, "loss fell only from {first} to {last}");

    let model = camelid_model::load(&out, LoadOptions::default()).unwrap();
    let prompt = model
        .chat_prompt(&[ChatMessage::new("user", questions[0])])
        .unwrap();
    let request = GenerateRequest {
        prompt_ids: prompt,
        max_tokens: 24,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        eos_token_ids: model.eos_token_ids.clone(),
    };
    let completion = camelid_model::generate(&model.model, &model.tokenizer, &request, |_| true).unwrap();
    assert!(
        completion.text.contains("Pico"),
        "the fine-tuned model answered {:?}",
        completion.text
    );
}
