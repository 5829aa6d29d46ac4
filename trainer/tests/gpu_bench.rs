//! `bench/train_gpu_1b.py --dry-run`: the GPU training bench's whole pipeline (a random model made and saved,
//! camelid in one process and through c10d, PyTorch FSDP2) at a toy shape on the CPU over Gloo, so the script works
//! the day a GPU is lent, where it runs the 1B shape against FSDP2.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_gpu_training_bench_runs_end_to_end_on_cpu() {
    let run = Command::new(python())
        .arg(workspace().join("bench/train_gpu_1b.py"))
        .args(["--dry-run", "--trainer", env!("CARGO_BIN_EXE_camelid-trainer")])
        .arg("--template")
        .arg(tiny_model())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", stderr(&run));
    for side in [
        "camelid, one process",
        "camelid, c10d world 1",
        "PyTorch FSDP2 world 1",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(side))
            .unwrap_or_else(|| panic!("no row for {side}:\n{stdout}"));
        let rate: f64 = line[side.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(rate > 0.0, "{line}");
        // Every side trains the same random model on the same samples: the same first loss, near ln(vocab).
        let first: f64 = line.split_whitespace().rev().nth(2).unwrap().parse().unwrap();
        assert!((first - 49152f64.ln()).abs() < 1.0, "{line}");
    }
}
