//! Golden tests against PyTorch (transformers, in the project's .venv): the exported model loads in transformers
//! with the same logits, chat template and tokenization as in camelid, and one training micro-step gives the
//! same loss and the same gradient for every parameter, with full, selective and no activation checkpointing, and
//! with the micro-batch padded (as transformers gets it) or packed into one row.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use camelid_model::{ChatMessage, LoadOptions};
use camelid_trainer::config::Checkpointing;
use camelid_trainer::data::Conversation;
use camelid_trainer::data::batching::{collate, collate_packed};
use camelid_trainer::data::tokenize::tokenize;
use camelid_trainer::step::Engine;
use common::*;
use serde_json::json;
use tch::{Device, Kind, Tensor};

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = f64::try_from(b.abs().max()).unwrap().max(1e-6);
    f64::try_from((a - b).abs().max()).unwrap() / scale
}

#[test]
fn exported_model_and_training_step_match_transformers() {
    let dir = scratch("reference");
    // A model the trainer itself trained and exported: two steps on the tiny model.
    write_dataset(&dir.join("data.json"), 12);
    let out = dir.join("out");
    let run = train_command(&dir.join("data.json"), &out, &["--max-steps", "2"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));

    let loaded = camelid_model::load(&out, LoadOptions::default()).unwrap();
    let m = ChatMessage::new;
    let chats = vec![
        vec![m("user", "What is 2 plus 2?"), m("assistant", "2 plus 2 is 4.")],
        vec![
            m("system", "You answer briefly."),
            m("user", "Colour?"),
            m("assistant", "Blue — «bleu», 青."),
            m("user", "Code?"),
            m("assistant", "```python\nprint(1)\n```"),
        ],
    ];
    let convs: Vec<Conversation> = chats
        .iter()
        .enumerate()
        .map(|(i, c)| Conversation {
            id: format!("c{i}"),
            line: i + 1,
            messages: c.clone(),
        })
        .collect();
    let (samples, _) = tokenize(&convs, &loaded, 96).unwrap();
    let rows: Vec<_> = samples.iter().collect();
    let pad = loaded.eos_token_ids[0];
    let batch = collate(&rows, pad, Device::Cpu).unwrap();
    let packed = collate_packed(&rows, Device::Cpu).unwrap();
    assert_eq!(packed.trainable, batch.trainable);
    assert!(
        packed.tokens < batch.input.numel(),
        "the padded batch has padding to save"
    );
    let scale = 1.0 / batch.trainable as f64;

    let grads_path = dir.join("reference-grads.safetensors");
    let request = json!({
        "model": out, "input": Vec::<Vec<i64>>::try_from(&batch.input).unwrap(),
        "targets": Vec::<Vec<i64>>::try_from(&batch.targets).unwrap(), "loss_scale": scale,
        "grads": grads_path, "messages": chats,
    });
    std::fs::write(dir.join("request.json"), request.to_string()).unwrap();
    let py = std::process::Command::new(python())
        .arg(workspace().join("trainer/tests/python/train_reference.py"))
        .arg(dir.join("request.json"))
        .arg(dir.join("response.json"))
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    let resp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("response.json")).unwrap()).unwrap();

    // Export round trip: template, tokenization and logits agree.
    for (i, chat) in chats.iter().enumerate() {
        let ours = loaded.template.render(chat, false).unwrap();
        assert_eq!(resp["rendered"][i], ours.as_str());
        let ids = loaded.tokenizer.encode(&ours, false).unwrap();
        assert_eq!(resp["token_ids"][i], json!(ids));
    }
    let logits = loaded.model.forward(&batch.input, None).unwrap().select(1, -1);
    let theirs = Tensor::from_slice2(
        &resp["logits_last"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>(),
    );
    let diff = f64::try_from((&logits - &theirs).abs().max()).unwrap();
    assert!(diff < 1e-4, "exported logits differ from transformers by {diff}");

    // One micro-step: same loss, same gradients, with and without recomputation, padded or packed.
    let mut reference = HashMap::new();
    camelid_model::weights::read_safetensors(&grads_path, LoadOptions::default(), &mut reference).unwrap();
    let loss_ref = resp["loss_sum"].as_f64().unwrap();
    let modes = [Checkpointing::Full, Checkpointing::Selective, Checkpointing::None];
    for (checkpointing, batch) in modes.iter().flat_map(|&c| [(c, &batch), (c, &packed)]) {
        let layout = if batch.segments.is_empty() {
            "padded"
        } else {
            "packed"
        };
        let case = format!("{checkpointing:?} {layout}");
        let fresh = camelid_model::load(&out, LoadOptions::default()).unwrap();
        let mut engine = Engine::new(&fresh.model, Kind::Float, checkpointing).unwrap();
        let loss = f64::try_from(engine.micro_step(&fresh.model, batch, scale).unwrap()).unwrap();
        assert!(
            (loss - loss_ref).abs() / loss_ref < 1e-5,
            "{case}: loss {loss} vs {loss_ref}"
        );
        assert_eq!(engine.names.len(), reference.len());
        for (name, grad) in engine.names.iter().zip(&engine.grads) {
            let (mut ours, mut theirs) = (grad.shallow_clone(), reference[name].shallow_clone());
            if name == "model.embed_tokens.weight"
                && let Some(pad) = fresh.config().pad_token_id
            {
                // transformers builds the embedding with `padding_idx = pad_token_id`, whose row never gets a
                // gradient; SmolLM2's pad token is its end-of-turn token, a real input that camelid does train.
                let keep = Tensor::ones([ours.size()[0]], (Kind::Bool, Device::Cpu));
                let _ = keep.get(pad as i64).fill_(0);
                ours = ours.index(&[Some(&keep)]);
                theirs = theirs.index(&[Some(&keep)]);
            }
            let diff = max_rel_diff(&ours, &theirs);
            assert!(diff < 1e-4, "{case}: gradient of {name} differs by {diff}");
        }
    }
}
