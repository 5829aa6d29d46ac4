//! LoRA adapters against PEFT (the reference implementation users train with) both ways, and served per row: a
//! batch mixing the base model and several adapters gives each sequence what it gets alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use camelid_model::config::Config;
use camelid_model::lora::{LoraAdapter, LoraConfig};
use camelid_model::weights::{Weights, write_safetensors};
use camelid_model::{KvCache, Llama};
use camelid_test_support::{python, workspace};
use tch::{Device, Kind, Tensor};

fn base_model() -> Llama {
    Llama::random(Config::tiny(4, 2, false), Kind::Float, Device::Cpu, 5).unwrap()
}

/// The base as an HF directory transformers loads.
fn write_base(model: &Llama, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::to_string(&model.config().to_hf_json()).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    let tensors: Vec<(String, Tensor)> = model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.shallow_clone()))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
}

/// An adapter whose `B` is not zero (a trained adapter's), so that it changes the outputs.
fn random_adapter(base: &Config, modules: &[&str], seed: i64) -> LoraAdapter {
    let modules: Vec<String> = modules.iter().map(|m| m.to_string()).collect();
    let config = LoraConfig::new(4, 8.0, 0.0, &modules, false).unwrap();
    let fresh = LoraAdapter::init(config.clone(), base, seed, Device::Cpu).unwrap();
    let tensors: Weights = fresh
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.05))
        .collect();
    LoraAdapter::from_tensors(config, base, tensors, Path::new("random")).unwrap()
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = workspace().join("target/lora-test").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `jobs` (see `peft_parity.py`) in one Python process.
fn run_python(dir: &Path, jobs: &[Vec<String>]) {
    let path = dir.join("jobs.json");
    std::fs::write(&path, serde_json::to_string(jobs).unwrap()).unwrap();
    let status = Command::new(python())
        .arg(workspace().join("tests/python/peft_parity.py"))
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success(), "peft_parity.py {jobs:?} failed");
}

const TOKENS: [i64; 12] = [1, 17, 42, 5, 88, 23, 9, 61, 30, 2, 77, 14];

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Logits `[t, vocab]` of [`TOKENS`] and the mean next-token cross entropy, as transformers computes its loss.
fn logits_and_loss(model: &Llama) -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&TOKENS).unsqueeze(0);
    let logits = model.forward(&ids, None).unwrap().squeeze_dim(0);
    let n = TOKENS.len() as i64;
    let loss = logits
        .narrow(0, 0, n - 1)
        .log_softmax(-1, Kind::Float)
        .nll_loss(&Tensor::from_slice(&TOKENS[1..]));
    (logits, loss)
}

#[test]
fn peft_loads_our_adapters_and_we_load_peft_s_with_the_same_logits_and_gradients() {
    let dir = scratch("parity");
    let mut model = base_model();
    write_base(&model, &dir.join("base"));

    // Ours in PEFT: logits, and every adapter weight's gradient of one step's loss.
    let ours = random_adapter(
        model.config(),
        &["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
        7,
    );
    ours.write_peft(&dir.join("ours"), "tiny").unwrap();
    let tokens = serde_json::to_string(&TOKENS).unwrap();
    let (out, theirs_dir, theirs_out) = (
        dir.join("peft.safetensors"),
        dir.join("theirs"),
        dir.join("peft-theirs.safetensors"),
    );
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let base = path(&dir.join("base"));
    run_python(
        &dir,
        &[
            vec![
                "check".into(),
                base.clone(),
                path(&dir.join("ours")),
                tokens.clone(),
                path(&out),
            ],
            vec!["make".into(), base.clone(), path(&theirs_dir), "3".into()],
            vec!["check".into(), base, path(&theirs_dir), tokens, path(&theirs_out)],
        ],
    );
    let reference: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&out).unwrap().into_iter().collect();
    for (_, t) in ours.named_parameters() {
        let _ = t.set_requires_grad(true);
    }
    model.attach_lora(&ours, true).unwrap();
    let (logits, loss) = logits_and_loss(&model);
    let diff = max_diff(&logits, &reference["logits"]);
    assert!(diff < 1e-4, "logits differ from PEFT's by {diff}");
    loss.backward();
    for (name, t) in ours.named_parameters() {
        let theirs = &reference[&format!("grad.base_model.model.{name}")];
        let (diff, scale) = (max_diff(&t.grad(), theirs), theirs.abs().max().double_value(&[]));
        assert!(
            diff <= 1e-4 * scale.max(1e-3),
            "{name}: gradient differs from PEFT's by {diff} (max {scale})"
        );
    }
    model.detach_lora();

    // PEFT's in ours: the adapter it wrote, against its own logits.
    let reference = Tensor::read_safetensors(&theirs_out).unwrap();
    let theirs = LoraAdapter::read_peft(&theirs_dir, model.config(), Device::Cpu).unwrap();
    assert_eq!(
        theirs.config().target_names(),
        ["q_proj", "v_proj", "up_proj", "down_proj"]
    );
    let _g = tch::no_grad_guard();
    let base_logits = logits_and_loss(&model).0;
    model.attach_lora(&theirs, false).unwrap();
    let attached = logits_and_loss(&model).0;
    model.detach_lora();
    let peft_logits = &reference.iter().find(|(n, _)| n == "logits").unwrap().1;
    let diff = max_diff(&attached, peft_logits);
    assert!(diff < 1e-4, "PEFT's adapter: logits differ by {diff}");
    assert!(
        max_diff(&base_logits, peft_logits) > 1e-2,
        "the adapter must change the outputs"
    );
    // Merged into the weights, as PEFT's merge_and_unload.
    model.merge_lora(&theirs).unwrap();
    let diff = max_diff(&logits_and_loss(&model).0, peft_logits);
    assert!(diff < 1e-4, "merged: logits differ by {diff}");
}

/// Greedy continuation of `prompt` for each sequence (`adapters[j]` for sequence `j`), all in one batch: the
/// prompts prefilled in one step, then every sequence decoded a token per step. Returns the tokens and the
/// logits of every step, per sequence.
fn greedy_batch(
    model: &Llama,
    prompts: &[&[u32]],
    adapters: &[Option<&LoraAdapter>],
    steps: usize,
) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    camelid_model::cpu_gemv::with_decode_pool(|pool| {
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut out: Vec<(Vec<u32>, Vec<Vec<f32>>)> = prompts.iter().map(|_| Default::default()).collect();
        let mut inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        for _ in 0..steps {
            let runs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let logits = model
                .forward_step_adapted(&runs, &mut refs, Some(pool), adapters)
                .unwrap();
            for (j, o) in out.iter_mut().enumerate() {
                let row = Vec::<f32>::try_from(logits.get(j as i64)).unwrap();
                let next = logits.get(j as i64).argmax(-1, false).int64_value(&[]) as u32;
                o.0.push(next);
                o.1.push(row);
                inputs[j] = vec![next];
            }
        }
        out
    })
}

#[test]
fn a_batch_mixing_the_base_and_three_adapters_gives_each_sequence_its_own_answer() {
    let _g = tch::no_grad_guard();
    // One model throughout: `Llama::random` draws from libtorch's global generator, which other tests share.
    let mut model = base_model();
    let c = model.config().clone();
    let adapters = [
        random_adapter(&c, &["q_proj", "v_proj"], 1),
        random_adapter(&c, &["all-linear"], 2),
        random_adapter(&c, &["gate_proj", "up_proj", "down_proj"], 3),
    ];
    let prompts: [&[u32]; 4] = [&[3, 1, 4, 1, 5], &[3, 1, 4, 1, 5], &[9, 2, 6], &[3, 1, 4, 1, 5]];
    let chosen = [None, Some(&adapters[0]), Some(&adapters[1]), Some(&adapters[2])];
    let batch = greedy_batch(&model, &prompts, &chosen, 10);
    for (j, (prompt, adapter)) in prompts.iter().zip(chosen).enumerate() {
        let alone = greedy_batch(&model, &[prompt], &[adapter], 10).remove(0);
        assert_eq!(
            batch[j], alone,
            "sequence {j}: batched differs from alone, bit for bit"
        );
        // The per-row CPU path computes what the attached (libtorch) adapter computes.
        if let Some(adapter) = adapter {
            model.attach_lora(adapter, false).unwrap();
        }
        let mut ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
        ids.extend(alone.0[..9].iter().map(|&t| i64::from(t)));
        let full = model
            .forward(&Tensor::from_slice(&ids).unsqueeze(0), None)
            .unwrap()
            .squeeze_dim(0);
        model.detach_lora();
        for (step, row) in alone.1.iter().enumerate() {
            let position = (prompt.len() - 1 + step) as i64;
            let diff = max_diff(&Tensor::from_slice(row), &full.get(position));
            assert!(
                diff < 1e-4,
                "sequence {j} step {step}: {diff} from the libtorch path"
            );
        }
    }
    // The adapters do change the answers (the batch is not trivially the base model four times).
    assert_ne!(batch[0].0, batch[1].0);
    assert_ne!(batch[0].0, batch[3].0);
}
