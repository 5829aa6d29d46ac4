//! Shared by the trainer's integration tests: a tiny LLaMA with SmolLM2's real tokenizer and template, datasets
//! the tests write, and the `camelid-trainer` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use camelid_model::config::Config;
use camelid_model::{Llama, LoadOptions};
#[allow(unused_imports, reason = "each test binary uses some of them")]
pub use camelid_test_support::{free_port, python, workspace};
use serde_json::json;
use tch::{Device, Kind};

/// A fresh folder under the target directory, named for the test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = workspace().join("target/trainer-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A 4-layer LLaMA (hidden 128, random weights) with SmolLM2-135M-Instruct's tokenizer and chat template,
/// exported once per test binary as an HF directory.
pub fn tiny_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = workspace().join("target/trainer-tests/tiny-model");
        let _ = std::fs::remove_dir_all(&dir);
        let path = camelid_model::default_model_path().unwrap();
        let mut loaded = camelid_model::load(&path, LoadOptions::default()).unwrap();
        let config = Config {
            vocab_size: loaded.config().vocab_size,
            hidden_size: 128,
            intermediate_size: 256,
            num_layers: 4,
            max_position_embeddings: 512,
            bos_token_id: loaded.config().bos_token_id,
            eos_token_ids: loaded.config().eos_token_ids.clone(),
            pad_token_id: loaded.config().pad_token_id,
            ..Config::tiny(4, 2, true)
        };
        loaded.model = Llama::random(config, Kind::Float, Device::Cpu, 7).unwrap();
        camelid_model::export_hf_dir(&loaded, &dir, Kind::Float).unwrap();
        dir
    })
}

/// `n` ShareGPT conversations: short facts, multi-turn chats with a system prompt, unicode and code.
pub fn write_dataset(path: &Path, n: usize) {
    let mut records = Vec::new();
    for i in 0..n {
        let conversations = match i % 3 {
            0 => json!([
                {"from": "human", "value": format!("What is {i} plus {i}?")},
                {"from": "gpt", "value": format!("{i} plus {i} is {}.", 2 * i)},
            ]),
            1 => json!([
                {"from": "system", "value": "You answer briefly."},
                {"from": "human", "value": format!("Name a colour, number {i}.")},
                {"from": "gpt", "value": "Blue — or «bleu» in French, 青 in Japanese."},
                {"from": "human", "value": "And another?"},
                {"from": "gpt", "value": format!("Green, colour number {}.", i + 1)},
            ]),
            _ => json!([
                {"from": "human", "value": format!("Write Python that prints {i}.")},
                {"from": "gpt", "value": format!("```python\nprint({i})\n```")},
            ]),
        };
        records.push(json!({"id": format!("conv-{i}"), "conversations": conversations}));
    }
    std::fs::write(path, serde_json::to_string_pretty(&records).unwrap()).unwrap();
}

pub fn trainer() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_camelid-trainer"));
    cmd.env("CAMELID_LOG", "info");
    cmd
}

/// `train` on the tiny model with short sequences; `extra` adds or overrides flags.
pub fn train_command(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = trainer();
    cmd.arg("train")
        .arg("--model")
        .arg(tiny_model())
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(out)
        .args([
            "--max-length",
            "96",
            "--micro-batch",
            "2",
            "--grad-accum",
            "3",
            "--learning-rate",
            "1e-3",
        ])
        .args(["--warmup-ratio", "0.1", "--seed", "5"])
        .args(extra);
    cmd
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every line of `metrics.jsonl`, one step each.
pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (step, loss, learning rate, grad norm) of every line of `metrics.jsonl`.
pub fn step_log(out: &Path) -> Vec<(u64, f64, f64, f64)> {
    metrics(out)
        .into_iter()
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["learning_rate"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}
