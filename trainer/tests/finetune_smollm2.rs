//! End to end on the real SmolLM2-135M-Instruct with `make demo`'s config and data (`examples/`): `camelid-trainer
//! train` lowers the training loss by a clear margin, and the exported model has learned what the data taught it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use camelid_model::{ChatMessage, GenerateRequest, LoadOptions, SamplingParams};
use common::*;

fn checkpoint_folders(out: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(out.join("checkpoints"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn fine_tuning_smollm2_lowers_the_loss_and_teaches_the_fact() {
    let dir = scratch("finetune-smollm2");
    let examples = workspace().join("examples");
    let out = dir.join("out");
    // `make demo`'s settings and data.
    let run = trainer()
        .arg("train")
        .arg("--config")
        .arg(examples.join("train-demo.yaml"))
        .arg("--data")
        .arg(examples.join("data/mascot.jsonl"))
        .arg("--output")
        .arg(&out)
        .args(["--resume", "never"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        checkpoint_folders(&out).is_empty(),
        "checkpointKeep 0 deletes the checkpoint after the export"
    );
    let log = step_log(&out);
    let (first, last) = (log[0].1, log.last().unwrap().1);
    assert!(
        first > 1.0,
        "SmolLM2 cannot know the fact before training (loss {first})"
    );
    assert!(last < 0.1 * first, "loss fell only from {first} to {last}");

    let model = camelid_model::load(&out, LoadOptions::default()).unwrap();
    let prompt = model
        .chat_prompt(&[ChatMessage::new("user", "What is the name of camelid's mascot?")])
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
