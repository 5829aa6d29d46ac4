//! Sequence packing trains what padding trains: the same samples in the same steps, the same tokens seen, and
//! the same loss curve within float rounding, while computing no padding.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;

/// (tokens, trainable tokens) of every step of `metrics.jsonl`.
fn tokens_seen(out: &Path) -> Vec<(u64, u64)> {
    metrics(out)
        .iter()
        .map(|v| {
            let count = |key: &str| v[key].as_u64().unwrap();
            (count("tokens"), count("trainable_tokens"))
        })
        .collect()
}

#[test]
fn packed_and_padded_runs_see_the_same_tokens_and_follow_the_same_loss_curve() {
    let dir = scratch("packing");
    let data = dir.join("data.json");
    write_dataset(&data, 30);
    // Without length grouping, micro-batches mix short and long conversations: the most padding to save.
    let run = |name: &str, packing: &str| {
        let out = dir.join(name);
        let flags = [
            "--max-steps",
            "5",
            "--group-by-length",
            "false",
            "--packing",
            packing,
        ];
        let done = train_command(&data, &out, &flags).output().unwrap();
        assert!(done.status.success(), "{name}: {}", stderr(&done));
        out
    };
    let (padded, packed) = (run("padded", "false"), run("packed", "true"));

    assert_eq!(tokens_seen(&padded), tokens_seen(&packed));
    let (a, b) = (step_log(&padded), step_log(&packed));
    assert_eq!(a.len(), 5);
    for ((step, loss_a, lr_a, norm_a), (_, loss_b, lr_b, norm_b)) in a.iter().zip(&b) {
        assert_eq!(lr_a, lr_b);
        assert!(
            (loss_a - loss_b).abs() <= 1e-4 * loss_a.abs(),
            "step {step}: loss {loss_a} padded, {loss_b} packed"
        );
        assert!(
            (norm_a - norm_b).abs() <= 1e-3 * norm_a.abs(),
            "step {step}: gradient norm {norm_a} padded, {norm_b} packed"
        );
    }
    // The loss fell in both: five steps of a learning rate of 1e-3 on the tiny model.
    assert!(a[4].1 < a[0].1 && b[4].1 < b[0].1, "{a:?} {b:?}");
}
