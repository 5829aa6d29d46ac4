//! Sharded training across processes on the CPU, through libtorch's own c10d (TCPStore + ProcessGroupGloo):
//! `camelid-trainer launch --nproc 2 -- train ...` against one process with the same global batch, a coordinated
//! stop on SIGTERM, a rank killed mid-run, and checkpoints that are missing one rank's shard.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use camelid_model::LoadOptions;
use common::*;

/// `launch --nproc 2 -- train ...` with the tiny model's settings (see [`train_command`]).
/// Collectives give up after this long (the default is 600 s): a rank that loses its peer exits within it.
const DIST_TIMEOUT_SECONDS: f64 = 10.0;

fn launch_two(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let train = train_command(data, out, extra);
    let mut cmd = trainer();
    let port = free_port().to_string();
    // The launcher's grace period is longer than the collective timeout, so a rank stuck in a collective gets to
    // fail on its own before the launcher would kill it.
    cmd.args([
        "launch",
        "--nproc",
        "2",
        "--master-port",
        &port,
        "--grace-seconds",
        "60",
        "--",
    ])
    .args(train.get_args())
    .env("CAMELID_DIST_TIMEOUT_SECONDS", DIST_TIMEOUT_SECONDS.to_string());
    cmd
}

fn weights(dir: &Path) -> Vec<(String, tch::Tensor)> {
    let mut w = camelid_model::weights::Weights::new();
    camelid_model::weights::read_safetensors(&dir.join("model.safetensors"), LoadOptions::default(), &mut w)
        .unwrap();
    let mut v: Vec<_> = w.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn steps_logged(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

fn wait_for_steps(child: &mut Child, out: &Path, steps: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while steps_logged(out) < steps {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the gang exited before step {steps}"
        );
        assert!(Instant::now() < deadline, "the gang never reached step {steps}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid of the launcher's child that runs rank `rank`.
fn rank_pid(launcher: u32, rank: usize) -> u32 {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat.rsplit(") ").next().and_then(|rest| rest.split(' ').nth(1));
        if ppid != Some(&launcher.to_string()) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if environ
            .split(|b| *b == 0)
            .any(|kv| kv == format!("RANK={rank}").as_bytes())
        {
            return pid;
        }
    }
    panic!("no child of {launcher} runs rank {rank}");
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn newest_checkpoint(out: &Path) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("step-"))
        .collect();
    dirs.sort();
    dirs.pop().unwrap()
}

#[test]
fn two_ranks_match_one_rank_with_the_same_global_batch_and_each_holds_half() {
    let dir = scratch("fsdp-parity");
    let data = dir.join("data.json");
    write_dataset(&data, 30);
    let (one, two) = (dir.join("one"), dir.join("two"));
    // One process accumulating 2 micro-batches per step; two ranks taking one each. One epoch of 30
    // conversations is 15 micro-batches of 2, so the last step has one micro-batch: rank 1 sits it out.
    let common = ["--epochs", "1", "--resume", "never", "--weight-decay", "0.1"];
    let single = train_command(&data, &one, &[&common[..], &["--grad-accum", "2"]].concat())
        .output()
        .unwrap();
    assert!(single.status.success(), "{}", stderr(&single));
    let sharded = launch_two(&data, &two, &[&common[..], &["--grad-accum", "1"]].concat())
        .output()
        .unwrap();
    assert!(sharded.status.success(), "{}", stderr(&sharded));

    let (a, b) = (step_log(&one), step_log(&two));
    assert_eq!(a.len(), 8);
    assert_eq!(b.len(), 8);
    for ((step, loss_a, lr_a, norm_a), (_, loss_b, lr_b, norm_b)) in a.iter().zip(&b) {
        assert!(
            (loss_a - loss_b).abs() < 1e-4,
            "step {step}: loss {loss_a} vs {loss_b}"
        );
        assert!(
            (norm_a - norm_b).abs() < 1e-3 * norm_a.max(1.0),
            "step {step}: grad norm {norm_a} vs {norm_b}"
        );
        assert_eq!(lr_a, lr_b);
    }
    let (wa, wb) = (weights(&one), weights(&two));
    assert_eq!(wa.len(), wb.len());
    let mut worst: f64 = 0.0;
    for ((name_a, ta), (name_b, tb)) in wa.iter().zip(&wb) {
        assert_eq!(name_a, name_b);
        assert_eq!(ta.size(), tb.size(), "{name_a}");
        worst = worst.max(f64::try_from((ta - tb).abs().max()).unwrap());
    }
    // Eight AdamW steps at lr 1e-3 move a weight by up to ~8e-3; the two runs agree far more closely than that.
    assert!(worst < 5e-4, "largest weight difference {worst}");
    eprintln!("2 ranks vs 1: largest final weight difference {worst:.2e}");

    // Each rank holds half of the f32 parameters, their gradients and AdamW's moments (up to the padding).
    for rank in 0..2 {
        let path = two.join(format!("ranks/rank-{rank:05}.json"));
        let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let full = m["full_parameter_bytes"].as_u64().unwrap();
        let params = m["parameter_bytes"].as_u64().unwrap();
        assert_eq!(m["world"], 2);
        assert!(
            params * 2 >= full && params * 2 <= full + 4 * 2 * 8,
            "rank {rank}: {params} of {full}"
        );
        assert_eq!(m["gradient_bytes"].as_u64().unwrap(), params);
        assert_eq!(m["optimizer_state_bytes"].as_u64().unwrap(), 2 * params);
    }
    let log = stderr(&sharded);
    assert!(
        log.contains("comm "),
        "steps report their communication time: {log}"
    );
}

/// LoRA over a gang: every rank holds the frozen base and the same adapter, and the adapters' gradients are summed
/// over the gang, so two ranks taking one micro-batch each train the adapter one process does with two.
#[test]
fn two_lora_ranks_match_one_rank_with_the_same_global_batch() {
    let dir = scratch("lora-gang");
    let data = dir.join("data.json");
    write_dataset(&data, 30);
    let (one, two) = (dir.join("one"), dir.join("two"));
    let common = [
        "--method",
        "lora",
        "--lora-rank",
        "4",
        "--lora-dropout",
        "0",
        "--max-steps",
        "4",
        "--learning-rate",
        "1e-2",
        "--resume",
        "never",
    ];
    let single = train_command(&data, &one, &[&common[..], &["--grad-accum", "2"]].concat())
        .output()
        .unwrap();
    assert!(single.status.success(), "{}", stderr(&single));
    let gang = launch_two(&data, &two, &[&common[..], &["--grad-accum", "1"]].concat())
        .output()
        .unwrap();
    assert!(gang.status.success(), "{}", stderr(&gang));
    for ((step, loss_a, lr_a, _), (_, loss_b, lr_b, _)) in step_log(&one).iter().zip(&step_log(&two)) {
        assert!(
            (loss_a - loss_b).abs() < 1e-4,
            "step {step}: loss {loss_a} vs {loss_b}"
        );
        assert_eq!(lr_a, lr_b);
    }
    let read = |dir: &Path| {
        let mut w = camelid_model::weights::Weights::new();
        let path = dir.join("adapter_model.safetensors");
        camelid_model::weights::read_safetensors(&path, LoadOptions::default(), &mut w).unwrap();
        w
    };
    let (a, b) = (read(&one), read(&two));
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .map(|(name, t)| f64::try_from((t - &b[name]).abs().max()).unwrap())
        .fold(0.0, f64::max);
    assert!(worst < 1e-4, "largest adapter difference {worst}");
}

#[test]
fn a_stopped_or_broken_gang_resumes_from_its_last_complete_checkpoint() {
    let dir = scratch("fsdp-failures");
    let data = dir.join("data.json");
    write_dataset(&data, 30);
    // Two rounds per step, so a stop can land between the micro-batches of a step.
    let settings = [
        "--max-steps",
        "14",
        "--checkpoint-interval-steps",
        "2",
        "--checkpoint-keep",
        "3",
        "--grad-accum",
        "2",
    ];
    let straight = dir.join("straight");
    let run = launch_two(
        &data,
        &straight,
        &[&settings[..], &["--resume", "never"]].concat(),
    )
    .output()
    .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));

    // SIGTERM to the launcher: every rank agrees on one checkpoint and the gang exits with 75.
    let out = dir.join("broken");
    let mut gang = launch_two(&data, &out, &settings)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&mut gang, &out, 3);
    signal(gang.id(), "-TERM");
    let stopped = gang.wait_with_output().unwrap();
    assert_eq!(stopped.status.code(), Some(75), "{}", stderr(&stopped));
    let at_stop = newest_checkpoint(&out);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(at_stop.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["world_size"], 2);
    assert!(at_stop.join("model.rank-00001-of-00002.safetensors").exists());

    // Resume, then kill rank 1 mid-run: rank 0 fails in its next collective and the gang exits with an error.
    let mut gang = launch_two(&data, &out, &settings)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&mut gang, &out, 7);
    let killed_at = Instant::now();
    signal(rank_pid(gang.id(), 1), "-KILL");
    let broken = gang.wait_with_output().unwrap();
    let exit_seconds = killed_at.elapsed().as_secs_f64();
    let log = stderr(&broken);
    assert_ne!(broken.status.code(), Some(0), "{log}");
    assert_ne!(broken.status.code(), Some(75), "{log}");
    assert!(log.contains("launch: rank 1 exited"), "{log}");
    assert!(
        log.contains("on rank 0"),
        "rank 0 names its failed collective: {log}"
    );
    assert!(
        !log.contains("killing it"),
        "rank 0 exits on its own, not after the grace period: {log}"
    );
    // Usually at once (the closed connection); at worst a collective in flight and one started meanwhile each
    // run into the timeout.
    assert!(
        exit_seconds < 2.0 * DIST_TIMEOUT_SECONDS + 10.0,
        "the gang took {exit_seconds:.1}s to exit"
    );
    eprintln!("gang exited {exit_seconds:.2}s after rank 1 was killed");
    if exit_seconds > 2.0 {
        eprintln!("slow exit; the gang's log:\n{log}");
    }

    // A checkpoint missing one rank's shard is never resumed from.
    let newest = newest_checkpoint(&out);
    std::fs::remove_file(newest.join("model.rank-00001-of-00002.safetensors")).unwrap();
    let resumed = launch_two(&data, &out, &settings).output().unwrap();
    let log = stderr(&resumed);
    assert!(resumed.status.success(), "{log}");
    assert!(
        log.contains("skipping checkpoint")
            && log.contains("model.rank-00001-of-00002.safetensors is missing"),
        "{log}"
    );
    // Bitwise the same as the uninterrupted gang.
    assert_eq!(step_log(&straight), step_log(&out));
    let (wa, wb) = (
        std::fs::read(straight.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap(),
    );
    assert!(wa == wb, "final weights must be bitwise identical");
}

#[test]
fn a_sharded_checkpoint_is_not_resumed_by_another_world_size() {
    let dir = scratch("fsdp-world");
    let data = dir.join("data.json");
    write_dataset(&data, 12);
    let out = dir.join("out");
    let stop = launch_two(
        &data,
        &out,
        &["--max-steps", "4", "--stop-at-step", "1", "--grad-accum", "1"],
    )
    .output()
    .unwrap();
    assert_eq!(stop.status.code(), Some(75), "{}", stderr(&stop));
    let alone = train_command(&data, &out, &["--max-steps", "4", "--grad-accum", "1"])
        .output()
        .unwrap();
    assert_eq!(alone.status.code(), Some(2), "{}", stderr(&alone));
    assert!(
        stderr(&alone).contains("written by 2 rank(s) and this run has 1"),
        "{}",
        stderr(&alone)
    );
}
