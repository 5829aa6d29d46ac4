//! LoRA fine-tuning through the trainer binary: only the adapters train (the checkpoints hold nothing else), the
//! run exports a PEFT adapter and a merged model that computes what base plus adapter computes, and a run killed
//! by SIGTERM or SIGKILL resumes to bitwise the same adapter as a straight run, dropout masks included.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use camelid_model::LoadOptions;
use camelid_model::lora::LoraAdapter;
use common::*;
use tch::{Device, Tensor};

const LORA: [&str; 12] = [
    "--method",
    "lora",
    "--lora-rank",
    "4",
    "--lora-alpha",
    "8",
    "--lora-dropout",
    "0.1",
    "--max-steps",
    "12",
    "--learning-rate",
    "1e-2",
];

fn steps_logged(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

fn logits(model: &camelid_model::Llama) -> Tensor {
    let ids = Tensor::from_slice(&[1i64, 400, 2000, 31, 7, 9000, 12]).unsqueeze(0);
    tch::no_grad(|| model.forward(&ids, None).unwrap())
}

#[test]
fn a_lora_run_trains_only_the_adapters_exports_them_and_resumes_exactly() {
    let dir = scratch("lora");
    let data = dir.join("data.json");
    write_dataset(&data, 30);
    let straight = dir.join("straight");
    let run = train_command(
        &data,
        &straight,
        &[&LORA[..], &["--lora-merge", "true", "--resume", "never"]].concat(),
    )
    .output()
    .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let log = step_log(&straight);
    assert!(log[11].1 < log[0].1 - 0.3, "LoRA training did not learn: {log:?}");

    // The export: a PEFT adapter, no full model beside it, and a merged model equal to base + adapter.
    assert!(!straight.join("model.safetensors").exists());
    let base = camelid_model::load(tiny_model(), LoadOptions::default()).unwrap();
    let adapter = LoraAdapter::read_peft(&straight, base.config(), Device::Cpu).unwrap();
    assert_eq!(adapter.config().rank, 4);
    assert_eq!(adapter.config().target_names().len(), 7, "all-linear by default");
    let base_bytes = std::fs::metadata(tiny_model().join("model.safetensors"))
        .unwrap()
        .len();
    let adapter_bytes = std::fs::metadata(straight.join("adapter_model.safetensors"))
        .unwrap()
        .len();
    assert!(
        adapter_bytes * 20 < base_bytes,
        "adapter {adapter_bytes} B vs base {base_bytes} B"
    );
    let merged = camelid_model::load(&straight.join("merged"), LoadOptions::default()).unwrap();
    let mut attached = base;
    let before = logits(&attached.model);
    attached.model.attach_lora(&adapter, false).unwrap();
    let (want, got) = (logits(&attached.model), logits(&merged.model));
    let diff = f64::try_from((&want - &got).abs().max()).unwrap();
    assert!(diff < 1e-4, "merged model differs from base + adapter by {diff}");
    assert!(
        f64::try_from((&want - &before).abs().max()).unwrap() > 1e-3,
        "the adapter changed nothing"
    );

    // Checkpoints hold the adapters and their AdamW moments only.
    let checkpoint = std::fs::read_dir(straight.join("checkpoints"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let saved = std::fs::metadata(checkpoint.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(
        saved < adapter_bytes + 4096,
        "checkpoint model file {saved} B vs adapter {adapter_bytes} B"
    );

    // SIGTERM mid-run, then SIGKILL after a periodic checkpoint: both resume to the straight run, bit for bit.
    for (signal, name) in [("-TERM", "term"), ("-KILL", "kill")] {
        let out = dir.join(name);
        let flags = [&LORA[..], &["--checkpoint-interval-steps", "3"]].concat();
        let mut child = train_command(&data, &out, &flags)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while steps_logged(&out) < 5 {
            assert!(Instant::now() < deadline, "{name}: the run never reached step 5");
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = child.wait().unwrap();
        assert!(!status.success(), "{name}: the run finished before the signal");
        let resumed = train_command(&data, &out, &[&LORA[..], &["--resume", "auto"]].concat())
            .output()
            .unwrap();
        assert!(resumed.status.success(), "{}", stderr(&resumed));
        assert!(
            stderr(&resumed).contains("resuming"),
            "{name}: {}",
            stderr(&resumed)
        );
        assert_eq!(
            step_log(&out),
            &log[..],
            "{name}: per-step loss, lr and grad norm"
        );
        let (a, b) = (
            std::fs::read(straight.join("adapter_model.safetensors")).unwrap(),
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        );
        assert!(
            a == b,
            "{name}: the resumed adapter differs from the straight run's"
        );
    }
}
